"""The `difftune` command line, end to end on the tiny SD pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import difftune as dt
from difftune.cli import main, parse_adapter_spec
from difftune.counting import inspect_adapter
from difftune.testing import randomize_adapter
from difftune.zoo import path as zoo_path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, sd_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sd_dir)
    dt.inject(pipe, dt.LoRAConfig(rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), name="style")
    randomize_adapter(pipe.unet, "style", std=0.3)
    return dt.save_adapter(pipe, tmp_path_factory.mktemp("ad") / "style")


def test_help_runs_as_console_script():
    out = subprocess.run([sys.executable, "-m", "difftune", "--help"], capture_output=True, text=True, check=True)
    assert "inspect" in out.stdout and "generate" in out.stdout
    assert out.stderr == ""  # issue 20: no dependency warnings


def test_a_command_that_loads_a_pipeline_prints_no_dependency_notice():
    # loading sd-mini imports transformers' CLIP image processor, whose torchvision notice the CLI drops
    out = subprocess.run([sys.executable, "-m", "difftune", "inspect", "--method", "lora", "--model",
                          str(zoo_path("sd-mini"))], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "trainable params" in out.stdout
    assert "torchvision" not in out.stderr and "Loading weights" not in out.stderr, out.stderr


def test_inspect(adapter, capsys):
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "method:            lora" in out and "component:         unet" in out
    n = inspect_adapter(adapter)["parameters"]
    assert f"trainable params:  {n:,}" in out


def test_inspect_counts_a_method_on_an_architecture(capsys):
    # LoRA r=4 on q/k/v/out of SD1.5, on the meta device: 797,184 (the figure every LoRA tool reports).
    assert main(["inspect", "--method", "lora", "--architecture", "sd15"]) == 0
    out = capsys.readouterr().out
    assert "adapted modules:   128" in out and "trainable params:  797,184" in out
    assert main(["inspect", "--method", "lora", "--set", "rank=8", "--architecture", "sd15", "--json"]) == 0
    assert '"parameters": 1594368' in capsys.readouterr().out


def test_inspect_takes_every_published_architecture(capsys):
    from difftune.counting import ARCHITECTURES

    # LoRA r=4 on q/k/v/out of DiT-L/2's 24 blocks: 96 square 1024 linears, 4 · (1024 + 1024) each
    assert main(["inspect", "--method", "lora", "--architecture", "dit-l2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["modules"], info["parameters"], info["base_parameters"]) == (96, 786_432, 511_609_888)
    assert main(["inspect", "--method", "lora", "--architecture", "sd3"]) == 2
    err = capsys.readouterr().err
    assert "`architecture` must be one of" in err and all(f"'{name}'" in err for name in ARCHITECTURES)
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also after hyphens
    assert all(name in help_text for name in ARCHITECTURES)


def test_inspect_method_errors(sd_dir, capsys):
    assert main(["inspect", "--method", "lora"]) == 2
    assert "--architecture/--model" in capsys.readouterr().err
    assert main(["inspect", "--method", "lora", "--set", "rank=x", "--architecture", "sd15"]) == 2
    assert "rank" in capsys.readouterr().err
    assert main(["inspect", "--method", "lora", "--model", str(sd_dir), "--component", "vae_x"]) == 2
    assert "vae_x" in capsys.readouterr().err


def test_generate_at_two_weights_writes_different_images(adapter, sd_dir, tmp_path):
    outs = []
    for w in ("1.0", "0.2"):
        out = tmp_path / f"w{w}.png"
        rc = main(["generate", "--model", str(sd_dir), "--adapter", f"{adapter}:{w}", "--prompt", "a photo of a cat",
                   "--seed", "3", "--steps", "3", "--out", str(out)])
        assert rc == 0 and out.is_file()
        outs.append(np.asarray(Image.open(out), dtype=np.float32))
    assert outs[0].shape == outs[1].shape and np.abs(outs[0] - outs[1]).max() > 1


def test_generate_negative_prompt_and_t5_length(sd_dir, tmp_path, capsys):
    from difftune.testing import save_tiny_pipeline

    def run(model: str, *extra: str) -> np.ndarray:
        out = tmp_path / "x.png"
        assert main(["generate", "--model", model, "--prompt", "a photo of a cat", "--seed", "3", "--steps", "2",
                     "--guidance", "4", "--out", str(out), *extra]) == 0
        return np.asarray(Image.open(out), dtype=np.float32)

    plain = run(str(sd_dir))
    assert np.abs(run(str(sd_dir), "--negative-prompt", "a dog") - plain).max() > 1  # it reaches the pipeline
    sd3 = str(save_tiny_pipeline("sd3", tmp_path / "sd3"))
    assert np.abs(run(sd3, "--max-sequence-length", "4") - run(sd3, "--max-sequence-length", "16")).max() > 1
    assert main(["generate", "--model", str(sd_dir), "--prompt", "x", "--max-sequence-length", "8",
                 "--out", str(tmp_path / "y.png")]) == 2
    assert "only SD3 and Flux" in capsys.readouterr().err


def test_generate_errors_are_clear(adapter, sd_dir, tmp_path, capsys):
    rc = main(["generate", "--model", str(sd_dir), "--adapter", f"{adapter}:strong", "--prompt", "x",
               "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "`--adapter` must be PATH or PATH:WEIGHT" in capsys.readouterr().err
    rc = main(["generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "model_index.json" in capsys.readouterr().err


def test_parse_adapter_spec(tmp_path):
    assert parse_adapter_spec("out/a:0.5") == ("out/a", 0.5)
    assert parse_adapter_spec("out/a") == ("out/a", 1.0)
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_adapter_spec(str(odd)) == (str(odd), 1.0)


def test_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "dt.load_adapter" in out
    grid = Image.open(tmp_path / "demo" / "weights.png")
    thirds = np.split(np.asarray(grid, dtype=np.float32), 3, axis=1)
    assert np.abs(thirds[0] - thirds[2]).max() > 1  # weight 0 vs weight 1 differ
    assert inspect_adapter(tmp_path / "demo" / "adapter")["method"] == "lora"
