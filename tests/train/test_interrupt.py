"""Issue 20: the trainer as a person uses it: Ctrl-C, a finished output_dir, model names, what it prints."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import difftune as dt
from difftune.cli import main as cli_main
from difftune.config import load_config
from difftune.train import TrainConfig, main
from difftune.train import trainer as trainer_module
from difftune.train.interrupt import TrainingInterrupted

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cfg(tiny, out: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={tiny['sd']}", f"data.path={tiny['captions']}", f"output_dir={out}", *sets])


SETS = ("train.max_steps=5", "validation.prompts=[]", "schedule.name=cosine", "method.dropout=0.1")


def test_sigint_mid_run_saves_a_checkpoint_and_the_printed_command_resumes_bit_exactly(tiny, tmp_path, monkeypatch,
                                                                                        capsys):
    full = main(_cfg(tiny, tmp_path / "full", *SETS))
    step_loss = trainer_module.step_loss

    def signalling(run, batch):  # a real SIGINT, delivered while step 3 is being computed
        if run.progress["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return step_loss(run, batch)

    monkeypatch.setattr(trainer_module, "step_loss", signalling)
    with pytest.raises(TrainingInterrupted) as info:
        main(_cfg(tiny, tmp_path / "cut", *SETS))
    monkeypatch.setattr(trainer_module, "step_loss", step_loss)
    out = capsys.readouterr().out
    checkpoint = tmp_path / "cut" / "checkpoints" / "checkpoint-3"
    assert info.value.checkpoint == checkpoint and (checkpoint / "trainer_state.json").is_file()
    assert info.value.exit_code == 130
    assert not (tmp_path / "cut" / "adapter").exists()  # no result: the run did not finish
    lines = [line for line in out.splitlines() if "resume with:" in line]
    assert len(lines) == 1 and "interrupted at step 3/5" in lines[0]
    command = lines[0].split("resume with: ", 1)[1]
    assert command.startswith("difftune train ")
    torch.manual_seed(1234)  # the resuming process starts from some other RNG state
    assert cli_main(shlex.split(command)[1:]) == 0  # the printed command, as a user would paste it
    assert f"[difftune] resumed from {checkpoint} at step 3" in capsys.readouterr().out
    a, b = load_file(full / "adapter_model.safetensors"), load_file(tmp_path / "cut" / "adapter" /
                                                                    "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_in_the_cli_exits_130_without_a_traceback(tiny, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text((REPO / "configs" / "debug" / "tiny_sd.yaml").read_text())
    proc = subprocess.Popen(
        [sys.executable, "-m", "difftune", "train", str(cfg), "--set", f"model.path={tiny['sd']}",
         "--set", f"data.path={tiny['captions']}", "--set", f"output_dir={tmp_path / 'out'}",
         "--set", "train.max_steps=100000", "--set", "validation.prompts=[]"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    for line in proc.stdout:  # training has started once the learning rate is announced
        if "learning rate" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert len(re.findall(r"resume with: difftune train \S+config.yaml --set "
                          r"checkpointing.resume_from_checkpoint=\S+checkpoint-\d+", out)) == 1, out
    assert list((tmp_path / "out" / "checkpoints").glob("checkpoint-*"))


def test_a_second_signal_exits_at_once(tmp_path):
    script = ("import os, signal, time\n"
              "from difftune.train.interrupt import InterruptFlag\n"
              "with InterruptFlag() as flag:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    assert flag.signum == signal.SIGINT\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(60)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 130 and time.monotonic() - start < 30
    assert "exiting now without saving" in proc.stderr and "Traceback" not in proc.stderr


def test_a_finished_output_dir_is_refused_unless_overwrite_or_resume(tiny, tmp_path):
    sets = ("train.max_steps=2", "validation.prompts=[]", "checkpointing.checkpointing_steps=2")
    main(_cfg(tiny, tmp_path / "out", *sets))
    before = (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(dt.DifftuneError, match=r"already holds a finished run \(adapter.*--overwrite"):
        main(_cfg(tiny, tmp_path / "out", *sets, "seed=1"))
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes() == before
    main(_cfg(tiny, tmp_path / "out", "train.max_steps=3", "validation.prompts=[]",
              "checkpointing.checkpointing_steps=2", "checkpointing.resume_from_checkpoint=latest"))
    main(_cfg(tiny, tmp_path / "out", *sets, "seed=1", "overwrite=true"))
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes() != before
    # the CLI flag is the same switch
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text((REPO / "configs" / "debug" / "tiny_sd.yaml").read_text())
    base = ["train", str(cfg), "--set", f"model.path={tiny['sd']}", "--set", f"data.path={tiny['captions']}",
            "--set", f"output_dir={tmp_path / 'out'}", "--set", "validation.prompts=[]"]
    assert cli_main(base) == 2
    assert cli_main([*base, "--overwrite"]) == 0


def test_shipped_model_names_resolve_from_any_folder(tmp_path, monkeypatch):
    from difftune.basemodel import resolve_model
    from difftune.zoo import path as zoo_path

    monkeypatch.chdir(tmp_path)
    assert resolve_model("sd-mini").folder == zoo_path("sd-mini")
    assert resolve_model("dit-mini").folder == zoo_path("dit-mini")
    with pytest.raises(dt.DifftuneError, match=r"model.path.*sd-mini, dit-mini, flow-mini"):
        resolve_model("difftune/assets/sd-mini")  # relative to a folder that is not the repository
    shipped = [c for c in sorted((REPO / "configs").glob("*/sd-mini*.yaml")) if c.parent.name != "zoo"]
    assert len(shipped) >= 6  # configs/zoo builds the reference models themselves (model.architecture)
    for config in shipped:
        cfg = load_config(TrainConfig, config)
        assert cfg.model.path == "sd-mini", config
        assert resolve_model(cfg.model.path).folder.is_dir()


def test_sd_mini_trains_by_name_from_another_folder(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = main(load_config(TrainConfig, REPO / "configs" / "quickstart" / "sd-mini-lora.yaml", [
        f"data.path={tiny['captions']}", "output_dir=run", "train.max_steps=1", "train.batch_size=2",
        "checkpointing.checkpointing_steps=1", "validation.prompts=[a handwritten digit zxq]",
        "validation.seeds=[0, 1]", "validation.num_inference_steps=2"]))
    assert result == Path("run") / "adapter" and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "[difftune] checkpoint step 1: run/checkpoints/checkpoint-1" in out
    assert "[difftune] validation grid (step 0): run/validation/step-000000.png" in out
    assert "[difftune] validation grid (step 1): run/validation/step-000001.png" in out
    assert "[difftune] saved run/adapter" in out
    grid = Image.open(tmp_path / "run" / "validation" / "step-000000.png").convert("L")
    w, h = grid.size
    assert w > 2 * 64 and h >= 64  # two 32-px samples enlarged to 64 px, plus the label column
    label = torch.tensor(list(grid.crop((0, h - 64, w - 2 * 64, h)).getdata()))  # below the title line
    assert (label < 128).sum() > 20  # dark text on the white label column: the prompt is written there


def test_missing_zoo_data_names_the_command(tmp_path):
    from difftune.train.data import check_dir

    with pytest.raises(dt.DifftuneError, match=r"difftune zoo data --out .*outputs/zoo/data"):
        check_dir(tmp_path / "outputs" / "zoo" / "data" / "subject-nine", "data.path")


def _signal_during_the_final_save(monkeypatch, times: int = 1) -> None:
    """A real SIGINT (``times`` of them) as the adapter's first file is about to be written."""
    from difftune import serialization

    real = serialization.atomic_write
    sent = {"n": 0}

    def signalling(path, write):
        if sent["n"] == 0:
            for _ in range(times):
                sent["n"] += 1
                os.kill(os.getpid(), signal.SIGINT)
        return real(path, write)

    monkeypatch.setattr(serialization, "atomic_write", signalling)


def test_sigint_during_the_final_save_finishes_it_when_no_checkpoint_exists(tiny, tmp_path, monkeypatch, capsys):
    """Issue 32: tiny_sd.yaml saves no periodic checkpoint; a Ctrl-C during the final save lost the whole run."""
    sets = ("validation.prompts=[a photo of a cat]", "validation.num_inference_steps=1", "validation.at_start=false")
    full = main(_cfg(tiny, tmp_path / "full", *sets))
    assert (tmp_path / "full" / "validation" / "step-000002.png").is_file()
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        _signal_during_the_final_save(m)
        with pytest.raises(TrainingInterrupted) as info:
            main(_cfg(tiny, out, *sets))
    assert info.value.exit_code == 130 and info.value.result == out / "adapter"
    printed = capsys.readouterr()
    assert "SIGINT: finishing the final save first" in printed.err
    assert (f"interrupted during the final save, which was finished first: the result {out / 'adapter'} is "
            "complete (the final validation grid was skipped)") in printed.out
    a, b = load_file(full / "adapter_model.safetensors"), load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "README.md").is_file() and not (out / "validation").exists()
    assert not (out / ".difftune.lock").exists() and not list(out.glob(".difftune-tmp-*"))
    # as a user runs it: the CLI exits 130, the result is there
    with monkeypatch.context() as m:
        _signal_during_the_final_save(m)
        code = cli_main(["train", str(REPO / "configs" / "debug" / "tiny_sd.yaml"),
                         *[a for s in (f"model.path={tiny['sd']}", f"data.path={tiny['captions']}",
                                       f"output_dir={tmp_path / 'cli'}", *sets) for a in ("--set", s)]])
    assert code == 130 and (tmp_path / "cli" / "adapter" / "adapter_model.safetensors").is_file()


_TWICE = """
import os, signal, sys
from difftune import serialization
from difftune.config import load_config
from difftune.train import TrainConfig, main
real = serialization.atomic_write
def twice(path, write):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    return real(path, write)
serialization.atomic_write = twice
main(load_config(TrainConfig, sys.argv[1], sys.argv[2:]))
"""


def test_a_second_sigint_during_the_final_save_leaves_no_partial_result(tiny, tmp_path):
    sets = [f"model.path={tiny['sd']}", f"data.path={tiny['captions']}", f"output_dir={tmp_path / 'out'}",
            "validation.prompts=[]"]
    config = str(REPO / "configs" / "debug" / "tiny_sd.yaml")
    proc = subprocess.run([sys.executable, "-c", _TWICE, config, *sets], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "SIGINT again: exiting now without saving the result: no checkpoint exists" in proc.stderr
    # nothing that would count as a finished run: the half-written result is a temp folder, removed at the next start
    assert not (tmp_path / "out" / "adapter").exists()
    assert len(list((tmp_path / "out").glob(".difftune-tmp-result-*"))) == 1
    assert main(load_config(TrainConfig, config, sets)) == tmp_path / "out" / "adapter"
    assert not list((tmp_path / "out").glob(".difftune-tmp-*"))
