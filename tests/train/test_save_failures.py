"""Issue 29 item 5 and issue 32 items 2-3: a write that fails (a full disk) at any save step of a run says what
failed, leaves no temp behind, keeps the last complete checkpoint and prints the command that resumes it; cleanup
touches only difftune's own temp names; the output folder's lock is released on every exit path."""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
from pathlib import Path

import accelerate.checkpointing as acp
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from difftune import serialization
from difftune.cli import main as cli_main
from difftune.config import load_config
from difftune.errors import DifftuneError
from difftune.fileio import TMP_PREFIX
from difftune.train import TrainConfig, main
from difftune.train import checkpoints as ck
from difftune.train.lock import LOCK_FILE
from difftune.train.saving import SaveFailed

REPO = Path(__file__).resolve().parents[2]
# checkpoints at 2 and 4 (limit 1: 2 is deleted at 4), a grid at step 3 and at the end (5)
SETS = ("train.max_steps=5", "checkpointing.checkpointing_steps=2", "checkpointing.checkpoints_total_limit=1",
        "validation.prompts=[a photo of a cat]", "validation.num_inference_steps=1", "validation.every_steps=3",
        "validation.at_start=false", "schedule.name=cosine", "method.dropout=0.1")
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"  # torch.save on a full disk


def _cfg(tiny, out: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={tiny['sd']}", f"data.path={tiny['captions']}", f"output_dir={out}", *SETS, *sets])


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter of the uninterrupted run."""
    return load_file(main(_cfg(tiny, tmp_path_factory.mktemp("reference") / "out")) / "adapter_model.safetensors")


def _full_disk(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _inject(monkeypatch, owner: object, name: str, when, error=_full_disk, times: int = 1) -> dict[str, int]:
    """Make ``owner.name`` raise ``error(path)`` on its first ``times`` calls for which ``when(path, args)`` holds;
    ``path`` is the call's first str/Path argument (a Path method's own path; an image's file name)."""
    real = getattr(owner, name)
    fired = {"n": 0}

    def wrapper(*args, **kwargs):
        path = next((str(a) for a in args if isinstance(a, (str, Path))), "")
        if fired["n"] < times and when(path, args):
            fired["n"] += 1
            raise error(path)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return fired


#: case -> (where the failure is injected, which call fails, the error, the step the message names, what is intact)
CASES = {
    "optimizer": (acp, "save", lambda p, a: "tmp-checkpoint-4" in p, _full_disk,
                  "saving checkpoint step 4", "checkpoint-2"),
    "optimizer-torch": (acp, "save", lambda p, a: "tmp-checkpoint-4" in p, lambda p: RuntimeError(TORCH_FULL),
                        "saving checkpoint step 4", "checkpoint-2"),
    "trainable": (safetensors.torch, "save_file", lambda p, a: "tmp-checkpoint-4" in p, _full_disk,
                  "saving checkpoint step 4", "checkpoint-2"),
    "state": (Path, "write_text", lambda p, a: "tmp-checkpoint-4" in p and "trainer_state" in p, _full_disk,
              "saving checkpoint step 4", "checkpoint-2"),
    "rename": (os, "replace", lambda p, a: Path(a[1]).name == "checkpoint-4", _full_disk,
               "saving checkpoint step 4", "checkpoint-2"),
    "rotation": (shutil, "rmtree", lambda p, a: "trash-checkpoint-2" in p, _full_disk,
                 "deleting old checkpoints (checkpointing.checkpoints_total_limit: 1)", "checkpoint-4"),
    "grid": (Image.Image, "save", lambda p, a: "step-000003" in p, _full_disk,
             "writing the validation grid of step 3", "checkpoint-2"),
    "adapter-weights": (serialization, "save_file", lambda p, a: "adapter_model" in p,
                        lambda p: SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                                  "error 28)"), "saving the result", "checkpoint-4"),
    "adapter-config": (Path, "write_text", lambda p, a: "adapter_config" in p, _full_disk,
                       "saving the result", "checkpoint-4"),
    "final-grid": (Image.Image, "save", lambda p, a: "step-000005" in p, _full_disk,
                   "writing the validation grid of step 5", "result"),
    "model-card": (Path, "write_text", lambda p, a: "README.md" in p, _full_disk, "writing the model card",
                   "result"),
}


def _no_temp_and_no_lock(out: Path) -> None:
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX)]
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("case", list(CASES))
def test_a_failed_write_at_each_save_step_says_what_is_intact_and_the_resume_command_resumes(
        tiny, tmp_path, monkeypatch, capsys, reference, case):
    owner, name, when, error, step, intact = CASES[case]
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        fired = _inject(m, owner, name, when, error)
        with pytest.raises(SaveFailed) as info:
            main(_cfg(tiny, out))
    assert fired["n"] == 1
    message = str(info.value)
    assert message.startswith(step) and " failed at " in message, message
    if case == "optimizer-torch":  # torch's writer names no OS error: the message cannot say "disk full"
        assert f"torch could not write a file of it (RuntimeError: {TORCH_FULL})" in message, message
    else:  # an OSError, or safetensors' text for one (errno 28 read from it)
        assert "No space left on device" in message, message
    assert "free space there:" in message and "Nothing half-written was left behind" in message
    _no_temp_and_no_lock(out)
    capsys.readouterr()
    if intact == "result":  # the result was saved before the failing step: complete and the uninterrupted one
        assert f"The result {out / 'adapter'} is complete and can be used" in message
        got = load_file(out / "adapter" / "adapter_model.safetensors")
    else:
        checkpoint = out / "checkpoints" / intact
        assert ck.checkpoint_dirs(out) == [checkpoint]
        assert not (out / "adapter").exists()  # no partial result that would count as a finished run
        command = re.search(r"resume with: (difftune train .*)$", message).group(1)
        assert command == (f"difftune train {out / 'config.yaml'} "
                           f"--set checkpointing.resume_from_checkpoint={checkpoint}")
        assert f"The last complete checkpoint, {checkpoint}, is intact. " in message
        fix = "Fix the cause (a full disk is the usual one)" if case == "optimizer-torch" else "Free some space"
        assert f"{fix}, then resume with: " in message
        torch.manual_seed(4321)  # the resuming process starts from another RNG state
        assert cli_main(shlex.split(command)[1:]) == 0
        assert f"resumed from {checkpoint} at step {intact.split('-')[1]}" in capsys.readouterr().out
        got = load_file(out / "adapter" / "adapter_model.safetensors")
        _no_temp_and_no_lock(out)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)


def test_the_cli_prints_the_failure_without_a_traceback_and_exits_2(tiny, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text((REPO / "configs" / "debug" / "tiny_sd.yaml").read_text())
    out = tmp_path / "out"
    _inject(monkeypatch, serialization, "save_file", lambda p, a: "adapter_model" in p)
    code = cli_main(["train", str(cfg), "--set", f"model.path={tiny['sd']}", "--set", f"data.path={tiny['captions']}",
                     "--set", f"output_dir={out}", "--set", "validation.prompts=[]"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("difftune: error: ")]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"difftune: error: saving the result {out / 'adapter'} failed at "), err
    assert "Traceback" not in err
    # tiny_sd.yaml saves no periodic checkpoint: the message says so instead of naming one
    assert "No checkpoint of this run exists (checkpointing.checkpointing_steps: 0)" in err
    _no_temp_and_no_lock(out)


def test_the_trained_base_pipeline_of_kind_is_saved_whole_or_not_at_all(tiny, tmp_path, monkeypatch, capsys):
    def kind_cfg(*extra: str) -> TrainConfig:  # as tests/train/test_kind_training.py
        return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_dit.yaml", [
            f"model.path={tiny['dit']}", f"data.path={tiny['classes']}", f"output_dir={out}",
            "method={name: kind, learngenes: 2, tailors_per_class: 1, classes: [0, 3], train_base: true}",
            "optimizer.lr=1e-2", "validation.class_labels=[]", "train.max_steps=3",
            "checkpointing.checkpointing_steps=2", *extra])

    out = tmp_path / "out"
    with monkeypatch.context() as m:  # the pipeline is written after the adapter: both must go
        fired = _inject(m, safetensors.torch, "save_file", lambda p, a: "/pipeline/" in p)
        with pytest.raises(SaveFailed, match=r"^saving the result .*out/adapter failed at .*result-.*/pipeline/"):
            main(kind_cfg())
    assert fired["n"] == 1
    assert not (out / "adapter").exists() and not (out / "pipeline").exists()
    _no_temp_and_no_lock(out)
    assert ck.checkpoint_dirs(out) == [out / "checkpoints" / "checkpoint-2"]
    capsys.readouterr()
    main(kind_cfg("checkpointing.resume_from_checkpoint=latest"))
    assert f"[difftune] saved {out / 'pipeline'} (next to the result)" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
    _no_temp_and_no_lock(out)


def test_a_full_disk_while_preparing_the_folder_leaves_no_lock(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _inject(m, Path, "write_text", lambda p, a: "config.yaml" in p)
        with pytest.raises(SaveFailed, match=r"^preparing the output folder failed at .*config\.yaml.*No space"):
            main(_cfg(tiny, out))
    _no_temp_and_no_lock(out)
    with monkeypatch.context() as m:  # the lock file itself cannot be written
        _inject(m, os, "pwrite", lambda p, a: True, lambda p: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        with pytest.raises(SaveFailed, match=r"^preparing the output folder failed at .*out: No space left"):
            main(_cfg(tiny, out))
    _no_temp_and_no_lock(out)


# ------------------------------------------------------------------------------------------------------------------
# the lock on every exit path (issue 32 item 3)


def test_no_lock_is_left_after_a_refusal_or_an_exception(tiny, tmp_path, monkeypatch):
    from difftune.train import trainer as trainer_module

    out = tmp_path / "out"
    sets = ("validation.prompts=[]", "validation.every_steps=0", "checkpointing.checkpointing_steps=0")
    main(_cfg(tiny, out, *sets))
    assert not (out / LOCK_FILE).exists()
    with pytest.raises(DifftuneError, match="already holds a finished run"):  # refused: no --overwrite
        main(_cfg(tiny, out, *sets))
    assert not (out / LOCK_FILE).exists()

    def crashes(run, batch):
        raise RuntimeError("a bug in a plugin")

    monkeypatch.setattr(trainer_module, "step_loss", crashes)
    with pytest.raises(RuntimeError, match="a bug in a plugin"):  # any exception, passed on unchanged
        main(_cfg(tiny, out, *sets, "overwrite=true"))
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------------------------
# cleanup touches only our own temp names (issue 32 item 2)


def test_a_run_keeps_foreign_tmp_files_and_removes_its_own_leftovers(tiny, tmp_path, capsys, caplog):
    out = tmp_path / "D"
    foreign = [out / "notes" / ".draft.tmp", out / ".draft.tmp", out / "checkpoints" / ".mine.tmp",
               out / "validation" / ".x.png.tmp", out / ".tmp-notes", out / "notes" / f"{TMP_PREFIX}not-ours-here"]
    for p in foreign:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    ours = [out / f"{TMP_PREFIX}config.yaml.k3j2.tmp", out / f"{TMP_PREFIX}result-ab12cd" / "adapter" / "a",
            out / "checkpoints" / f"{TMP_PREFIX}checkpoint-3" / "optimizer.bin",
            out / "checkpoints" / f"{TMP_PREFIX}trash-checkpoint-1-0123abcd" / "x",
            out / "checkpoints" / ".tmp-checkpoint-2" / "optimizer.bin",  # difftune's names before the prefix
            out / "validation" / f"{TMP_PREFIX}step-000001.png.q1.tmp"]
    for p in ours:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    main(_cfg(tiny, out, "validation.prompts=[]", "validation.every_steps=0", "train.max_steps=2"))
    assert all(p.read_text() == "x" for p in foreign)
    assert "removed 6 leftover(s)" in caplog.text
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX) and p not in foreign]
    assert not (out / "checkpoints" / ".tmp-checkpoint-2").exists()


def test_the_advice_follows_the_error(tmp_path):
    from types import SimpleNamespace

    from difftune.train.saving import saving

    cfg = SimpleNamespace(output_dir=str(tmp_path), checkpointing=SimpleNamespace(checkpointing_steps=0))
    denied = OSError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "a"))
    for error, advice in [(_full_disk(tmp_path / "a"), "free some space"), (denied, "fix the cause above"),
                          (RuntimeError(TORCH_FULL), "fix the cause (a full disk is the usual one)")]:
        with pytest.raises(SaveFailed, match=re.escape(f"{advice}, then train again")), saving(cfg, "a", tmp_path):
            raise error
    with pytest.raises(RuntimeError, match="a bug"), saving(cfg, "a", tmp_path):  # not a write error: unchanged
        raise RuntimeError("a bug")
