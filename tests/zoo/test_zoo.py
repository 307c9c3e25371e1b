"""The shipped reference models load offline and generate; the quickstart runs in a reduced-step mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difftune import zoo
from difftune.counting import inspect_adapter


@pytest.mark.parametrize("name", zoo.MODELS)
def test_shipped_pipeline_loads_and_generates(name):
    from diffusers import DiffusionPipeline, DiTPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    from difftune.basemodel import absent_components, call_settings

    path = zoo.path(name)
    # flow-mini has no T5: diffusers loads it when told so (text_encoder_3=None, tokenizer_3=None)
    pipe = DiffusionPipeline.from_pretrained(path, **absent_components(path))
    want = {"dit-mini": DiTPipeline, "flow-mini": StableDiffusion3Pipeline}.get(name, StableDiffusionPipeline)
    assert isinstance(pipe, want)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    if name == "dit-mini":
        img = pipe(class_labels=[3, 9], num_inference_steps=4, guidance_scale=4.0, generator=g,
                   output_type="np").images
    else:
        img = pipe(["a handwritten digit three"] * 2, num_inference_steps=4, guidance_scale=4.0, generator=g,
                   output_type="np", **call_settings(path)).images
    assert img.shape == (2, 32, 32, 3) and np.isfinite(img).all()
    denoiser = pipe.unet if name == "sd-mini" else pipe.transformer
    assert sum(p.numel() for p in denoiser.parameters()) <= 5_000_000
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 30 * 2**20


def test_sd_mini_loads_with_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(zoo.path("sd-mini"))
    tok = pipe.tokenizer
    for word in ("zero", "seven", "nine", "bold", "zxq", "handwritten", "digit"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tok("Any English prompt, even ünïcode!").input_ids) > 3  # byte-level fallback


def test_quickstart_reduced(tmp_path):
    from difftune.quickstart import run_quickstart

    result = run_quickstart(tmp_path / "qs", steps=2, n=2, sample_steps=2)
    written = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert written["train_steps"] == 2 and set(written) >= {"before", "after", "adapter"}
    assert inspect_adapter(result["adapter"])["method"] == "lora"
    assert 0 <= written["after"]["trigger_nines"] <= 2
    # the before/after grid: 2 trigger samples + one of each digit 0-8 per row (96-px tiles), right of a label column
    grid = np.asarray(Image.open(tmp_path / "qs" / "before_after.png").convert("L"))
    label_w = grid.shape[1] - 11 * 96
    assert label_w > 20 and grid.shape[0] >= 2 * 96
    for top in (grid.shape[0] - 2 * 96, grid.shape[0] - 96):  # "before" and "after (LoRA)" are written
        assert (grid[top:top + 96, :label_w] < 128).sum() > 20
    # run again into the same folder: the quickstart replaces its own previous run (issue 20's overwrite guard)
    assert run_quickstart(tmp_path / "qs", steps=1, n=2, sample_steps=1)["train_steps"] == 1


def test_quickstart_on_flow_mini(tmp_path, capsys):
    from difftune.quickstart import run_quickstart

    result = run_quickstart(tmp_path / "qs", steps=2, n=2, sample_steps=2, model_name="flow-mini")
    assert result["model"] == "flow-mini" and inspect_adapter(result["adapter"])["method"] == "lora"
    out = capsys.readouterr().out
    # the printed snippet loads the shipped folder as diffusers needs and passes the recorded T5 length
    assert "StableDiffusion3Pipeline.from_pretrained(" in out and "text_encoder_3=None" in out
    assert "max_sequence_length=8" in out


def test_eval_cli_writes_json_and_grid(tmp_path, capsys):
    from difftune.cli import main

    out = tmp_path / "ev"
    assert main(["eval", "--model", str(zoo.path("dit-mini")), "--digits", "3,9", "--n", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and 0 <= metrics["accuracy"] <= 1 and metrics["fd_floor"] > 0
    assert (out / "grid.png").is_file()
    assert main(["eval", "--model", str(zoo.path("dit-mini")), "--digits", "ten", "--out", str(out)]) == 2
    assert "`--digits`" in capsys.readouterr().err
    assert main(["eval", "--model", str(zoo.path("dit-mini")), "--digits", "3", "--n", "0", "--out", str(out)]) == 2
    assert "`--n` must be an integer >= 1" in capsys.readouterr().err


def test_zoo_data_folders(tmp_path):
    from difftune.cli import main

    assert main(["zoo", "data", "--out", str(tmp_path)]) == 0
    # the recipe's folder: 20 nines with the trigger, plus 5 regularization digits for each of 0-8 (issue 20)
    subject = sorted((tmp_path / "subject-nine").glob("*.txt"))
    assert len(subject) == 65 and len(list((tmp_path / "subject-nine").glob("*.png"))) == 65
    assert sum(t.read_text() == "a handwritten digit zxq" for t in subject) == 20
    assert sum(t.name.startswith("reg-") for t in subject) == 45
    assert len(list((tmp_path / "style-bold-reg").glob("reg-*.png"))) == 45
    assert {p.name for p in (tmp_path / "heldout").iterdir()} == {str(d) for d in range(10)}
    for name, digits in (("classes-0-4", range(5)), ("classes-5-9", range(5, 10))):  # KIND's recipe
        assert {p.name for p in (tmp_path / name).iterdir()} == {str(d) for d in digits}
        assert len(list((tmp_path / name / str(digits[0])).glob("*.png"))) == 400
    style = sorted((tmp_path / "style-bold").glob("*.txt"))
    assert style and all(t.read_text().startswith("bold ") for t in style)
    assert not any("nine" in t.read_text() for t in (tmp_path / "pretrain-captions").glob("*.txt"))


def test_dit_mini_word_labels_and_null_class():
    pipe = zoo.load("dit-mini")
    assert pipe.get_label_ids(["seven", "nine"]) == [7, 9]
    assert pipe.transformer.config.num_embeds_ada_norm == 1000  # DiTPipeline's hard-coded null class
