"""The SCEdit control pipelines (SD and SDXL), condition extractors and ``difftune generate --control``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import difftune as dt
from difftune import testing
from difftune.cli import main as cli_main
from difftune.cli import parse_control_spec
from difftune.methods.scedit import conditions
from difftune.testing import randomize_adapter


def _square(size: int = 32, lo: int = 8, hi: int = 24) -> np.ndarray:
    a = np.zeros((size, size))
    a[lo:hi, lo:hi] = 1.0
    return a


def _sd(cls_name: str = "sd"):
    if cls_name == "sd":
        from difftune.pipelines.difftune_scedit import DifftuneSCEditPipeline as cls

        pipe = cls(**testing.tiny_sd_pipeline().components)
    else:
        from difftune.pipelines.difftune_scedit_xl import DifftuneSCEditXLPipeline as cls

        pipe = cls(**testing.tiny_sdxl_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, prompts=("a square",), **kw):
    return pipe(list(prompts), num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


def test_extractors_find_the_edges_of_a_square():
    sq = _square()
    ring = np.zeros_like(sq, dtype=bool)
    ring[8:24, 8:24] = True
    ring[9:23, 9:23] = False
    assert np.array_equal(np.asarray(conditions.outline(sq)) > 127, ring)
    edges = np.asarray(conditions.canny(sq)) > 127
    assert edges.sum() > 40 and not edges[12:20, 12:20].any() and not edges[:4].any()  # on the border only
    near = np.zeros_like(ring)
    near[6:26, 6:26] = True
    near[11:21, 11:21] = False
    assert not (edges & ~near).any()
    sob = np.asarray(conditions.sobel(sq))
    assert sob.max() == 255 and sob[16, 16] == 0
    bar = np.zeros((20, 20))
    bar[8:12, 2:18] = 1  # a 4-pixel-thick bar thins to one line
    sk = np.asarray(conditions.skeleton(bar)) > 127
    assert sk.any() and sk.sum(axis=0).max() == 1
    t = conditions.to_tensor(Image.fromarray((sq * 255).astype(np.uint8)), size=64)
    assert t.shape == (1, 3, 64, 64) and t.min() >= 0 and t.max() <= 1
    with pytest.raises(dt.DifftuneError, match="condition"):
        conditions.extract("hed", sq)
    with pytest.raises(dt.DifftuneError, match="low/high"):
        conditions.canny(sq, low=0.5, high=0.1)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_control_pipeline_with_two_conditions_and_an_sc_tuner(kind):
    pipe = _sd(kind)
    base = _images(pipe)
    for i, name in enumerate(("edge", "outline")):
        dt.inject(pipe, dt.CSCConfig(), name=name)
        randomize_adapter(pipe.unet, name, seed=i, std=0.2)
    dt.inject(pipe, dt.SCEditConfig(), name="style")
    randomize_adapter(pipe.unet, "style", seed=5, std=0.2)
    with pytest.raises(dt.DifftuneError, match="without a control image"):
        _images(pipe)
    with pytest.raises(dt.DifftuneError, match="mapping"):
        _images(pipe, control=_square())  # two CSC adapters: say which image is whose
    a, b = Image.fromarray((_square() * 255).astype(np.uint8)), conditions.outline(_square(lo=4, hi=20))
    both = _images(pipe, control={"edge": a, "outline": b})
    swapped = _images(pipe, control={"edge": b, "outline": a})
    assert np.abs(both - swapped).max() > 1e-3 and np.abs(both - base).max() > 1e-3
    # control_scale 0 for both conditions = only the SC-Tuner; the weights come back after the call
    scaled = _images(pipe, control={"edge": a, "outline": b}, control_scale={"edge": 0.0, "outline": 0.0})
    assert dt.list_adapters(pipe)["edge"]["weight"] == 1.0
    dt.disable_adapters(pipe, ["edge", "outline"])
    np.testing.assert_allclose(_images(pipe), scaled, atol=1e-6)
    dt.enable_adapters(pipe, ["edge", "outline"])
    # per-prompt images: two prompts, two images each
    out = _images(pipe, ("a square", "a ring"), control={"edge": [a, b], "outline": b}, num_images_per_prompt=2)
    assert out.shape[0] == 4
    dt.fuse(pipe)  # nothing fusable: the tuners keep running
    assert not any(info["fused"] for info in dt.list_adapters(pipe).values())
    np.testing.assert_allclose(_images(pipe, control={"edge": a, "outline": b}), both, atol=1e-6)


def test_control_inputs_expand_per_prompt_images():
    pipe = _sd()
    dt.inject(pipe, dt.CSCConfig(), name="edge")
    one = conditions.control_inputs(pipe, _square())
    assert set(one) == {"edge"} and one["edge"].shape == (1, 3, 32, 32)
    two = conditions.control_inputs(pipe, {"edge": [_square(), _square(lo=2)]}, num_images_per_prompt=3)
    assert two["edge"].shape[0] == 6 and torch.equal(two["edge"][0], two["edge"][2])
    with pytest.raises(dt.DifftuneError, match="edge"):
        conditions.control_inputs(pipe, {"other": _square()})


def test_custom_pipeline_route_and_generate_with_control(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    import difftune.pipelines

    model_dir = testing.save_tiny_pipeline("sd", tmp_path / "model")
    pipe = _sd()
    dt.inject(pipe, dt.CSCConfig(), name="edge")
    randomize_adapter(pipe.unet, "edge", seed=0, std=0.2)
    dt.save_adapter(pipe, tmp_path / "edge", name="edge")
    custom = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=difftune.pipelines.path("scedit"),
                                               trust_remote_code=True)
    custom.set_progress_bar_config(disable=True)
    assert type(custom).__name__ == "DifftuneSCEditPipeline"
    custom.load_adapter(tmp_path / "edge")
    img = tmp_path / "edges.png"
    conditions.canny(_square()).save(img)
    assert np.abs(_images(custom, control=img) - _images(custom, control=img, control_scale=0.5)).max() > 1e-4

    outs = []
    for i, spec in enumerate([f"{img}:edge", f"{img}:edge:0.0", f"{img}"]):
        out = tmp_path / f"g{i}.png"
        assert cli_main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "edge"), "--control",
                         spec, "--prompt", "a square", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
        outs.append(np.asarray(Image.open(out), dtype=np.float64))
    plain = tmp_path / "plain.png"
    cli_main(["generate", "--model", str(model_dir), "--prompt", "a square", "--steps", "2", "--device", "cpu",
              "--out", str(plain)])
    assert np.abs(outs[0] - outs[1]).max() > 0 and np.array_equal(outs[0], outs[2])
    np.testing.assert_array_equal(outs[1], np.asarray(Image.open(plain), dtype=np.float64))  # scale 0 = no control
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "edge"), "--prompt", "x",
                     "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "x.png")]) != 0
    assert "ran without a control image" in capsys.readouterr().err
    assert parse_control_spec("e.png:canny:0.5") == ("e.png", "canny", 0.5)
    with pytest.raises(dt.DifftuneError, match="SCALE"):
        parse_control_spec("e.png:canny:big")
