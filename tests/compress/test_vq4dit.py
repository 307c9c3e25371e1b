"""VQ4DiT: packed codes, decoding, chunked distances, k-means, size accounting (DiT-XL/2 on meta), calibration
mechanics (candidates, ratios, freezing, codebook schedules), save → load, PixArt, adapters on top, the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import difftune as dt
from difftune import DifftuneError
from difftune.architectures import build_architecture
from difftune.compress import load_compressed, load_compressed_pipeline, replaced_modules, save_compressed
from difftune.compress.kmeans import kmeans, kmeans_pp_init, nearest, squared_distances
from difftune.compress.vq4dit import (
    VQ4DiTConfig,
    VQLinear,
    block_linears,
    format_size_report,
    quantize_kmeans_,
    set_decode_mode,
    size_report,
)
from difftune.compress.vq4dit_calib import VQCalibLinear, quantize_vq4dit
from difftune.testing import tiny_dit, tiny_dit_pipeline

MiB = 2**20


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(k: int = 64, d: int = 2, out: int = 12, inp: int = 16) -> tuple[VQLinear, torch.Tensor, torch.Tensor]:
    codebook = torch.randn(k, d, generator=_gen(1))
    codes = torch.randint(k, (out * inp // d,), generator=_gen(2))
    return VQLinear.from_codes(codebook, codes, torch.randn(out, generator=_gen(3)), inp), codebook, codes


@pytest.mark.parametrize(("k", "d"), [(256, 4), (64, 2), (16, 4), (2, 1)])
def test_codes_pack_and_decode_to_the_codebook_rows(k, d):
    layer, codebook, codes = _layer(k, d)
    bits = k.bit_length() - 1
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == (codes.numel() * bits + 7) // 8
    assert torch.equal(layer.codes().reshape(-1), codes)  # packing round trip
    expected = codebook[codes].reshape(12, 16)  # sub-vectors are contiguous along each row
    assert torch.equal(layer.dequantized_weight(), expected)
    x = torch.randn(3, 16, generator=_gen(4))
    assert torch.equal(layer(x), nn.functional.linear(x, expected, layer.bias))


def test_decode_once_equals_on_the_fly_and_follows_edits():
    layer, _, _ = _layer()
    x = torch.randn(5, 16, generator=_gen(5))
    with torch.no_grad():
        cached = layer(x)
        assert layer._cache is not None
        set_decode_mode(layer, False)
        assert layer._cache is None and torch.equal(layer(x), cached) and layer._cache is None
        set_decode_mode(layer, True)
        layer(x)
        layer.codebook.mul_(2)  # an in-place edit of the codebook must not serve the stale decoded weight
        assert torch.allclose(layer(x) - layer.bias, 2 * (cached - layer.bias), atol=1e-5)
    with pytest.raises(DifftuneError, match="cannot be assigned"):
        layer.weight = torch.zeros(12, 16)


def test_chunked_distances_equal_unchunked():
    x = torch.randn(1000, 4, generator=_gen(0))
    c = torch.randn(37, 4, generator=_gen(1))
    brute = ((x[:, None] - c[None]) ** 2).sum(-1)
    assert torch.equal(squared_distances(x, c, chunk=7), squared_distances(x, c, chunk=10**6))
    assert torch.allclose(squared_distances(x, c, chunk=7), brute, atol=1e-5)
    for n in (1, 3):
        i_small, d_small = nearest(x, c, n, chunk=13)
        i_big, d_big = nearest(x, c, n, chunk=10**6)
        assert torch.equal(i_small, i_big) and torch.equal(d_small, d_big)
        ref_d, ref_i = brute.topk(n, dim=1, largest=False)
        assert torch.allclose(d_small, ref_d, atol=1e-5) and torch.equal(i_small, ref_i)


def test_kmeans_finds_separated_clusters_and_seeds_from_points():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centres[:, None] + 0.1 * torch.randn(4, 50, 2, generator=_gen(0))).reshape(-1, 2)
    seeds = kmeans_pp_init(x, 4, _gen(1))
    assert all((x == s).all(1).any() for s in seeds)
    cb, assign = kmeans(x, 4, iters=20, seed=0, chunk=16)
    found = torch.cdist(centres, cb).min(dim=1).values
    assert (found < 0.1).all() and assign.unique().numel() == 4
    with pytest.raises(DifftuneError, match="`k`"):
        kmeans(x, 1000)


def test_dit_xl2_sizes_counted_like_the_paper():
    model = build_architecture("dit-xl2")
    assert len(block_linears(model)) == 196 and not any(".norm1.emb." in n for n in block_linears(model))
    two = size_report(model, 256, 4)
    assert f"{two['fp32_bytes'] / MiB:.2f}" == "2553.35"
    assert f"{two['index_bytes'] / MiB:.2f}" == "159.47"
    assert f"{two['codebook_bytes'] / MiB:.2f}" == "0.77"
    assert f"{two['total_bytes'] / MiB:.2f}" == "162.08"
    assert two["file_bytes"] == two["total_bytes"]  # 8-bit indices: the stored layers are exactly the paper's count
    three = size_report(model, 64, 2)
    assert three["index_bytes"] == 668_860_416 / 2 * 6 / 8 and three["codebook_bytes"] == 196 * 64 * 2 * 4
    assert f"{three['total_bytes'] / MiB:.2f}" == "241.14"
    lines = format_size_report(two, "2bit")
    assert "FP32 blocks: 2553.35 MiB" in lines and any(ln.startswith("total") and "162.08 MiB" in ln for ln in lines)


def test_config_presets_variants_and_errors():
    assert (VQ4DiTConfig().k, VQ4DiTConfig().d) == (256, 4)
    assert (VQ4DiTConfig(preset="3bit").k, VQ4DiTConfig(preset="3bit").d) == (64, 2)
    default, official = VQ4DiTConfig(), VQ4DiTConfig.official()
    # default: the code's choices, but codebooks and biases calibrated jointly at 1e-3 (the module docstring says why)
    assert (default.candidates, default.ratio_init, default.regularizer) == (2, "distance", "gated")
    assert (default.codebook, default.lr_codebook, default.lr_bias) == ("joint", 1e-3, 1e-3)
    assert (official.codebook, official.lr_codebook, official.lr_bias) == ("after_freeze", 1e-4, 1e-4)
    assert VQ4DiTConfig.official(lr_codebook=5e-4).lr_codebook == 5e-4
    paper = VQ4DiTConfig.paper()
    assert (paper.candidates, paper.ratio_init, paper.regularizer, paper.codebook) == (3, "uniform", "eq9", "joint")
    for bad in ({"preset": "1bit"}, {"k": 100}, {"ratio_init": "random"}, {"candidates": 0},
                {"preset": "3bit", "candidates": 65}, {"freeze_threshold": 1.5}, {"lr_ratio": -1.0}):
        with pytest.raises(DifftuneError):
            VQ4DiTConfig(**bad)
    with pytest.raises(DifftuneError, match="divisor"):
        VQLinear(10, 4, 256, 4)


def _calib(config: VQ4DiTConfig) -> VQCalibLinear:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    cb, _ = kmeans(linear.weight.detach().reshape(-1, config.d), config.k, iters=5)
    return VQCalibLinear(linear, cb, config)


def test_ratio_inits_regularizers_and_freezing():
    code = _calib(VQ4DiTConfig.official(preset="3bit", k=8))
    r = code.ratios()
    assert torch.allclose(r.sum(1), torch.ones(len(r)))
    assert (r[:, 0] >= r[:, 1]).all()  # inverse-distance init: the nearest codeword has the larger ratio
    uniform = _calib(VQ4DiTConfig.paper(preset="3bit", k=8))
    assert torch.allclose(uniform.ratios(), torch.full((64, 3), 1 / 3))
    assert torch.allclose(uniform.regularizer("eq9"), torch.tensor(3 * (1 - 1 / 3)))  # Σ_n (1 − |2r − 1|)
    assert torch.allclose(_calib(VQ4DiTConfig(preset="3bit", k=8, ratio_init="uniform")).regularizer("gated"),
                          torch.tensor(2 * 0.25))  # n · mean(r(1 − r))
    with torch.no_grad():
        code.logits[:40] = torch.tensor([10.0, 0.0])
    code.freeze_step(0.99, 0.9, "after_freeze")
    assert code.frozen[:40].all() and not code.frozen[40:].any() and not code.hard
    assert not code.codebook.requires_grad
    with torch.no_grad():
        code.logits[:] = torch.tensor([0.0, 10.0])
    code.freeze_step(0.99, 0.9, "after_freeze")
    assert code.hard and code.codebook.requires_grad  # code: the codebook trains once the layer is frozen
    # frozen rows keep their codeword (one-hot r) even though the logits moved to the other candidate
    assert torch.equal(code.ratios()[:40].argmax(1), torch.zeros(40, dtype=torch.long))
    joint = _calib(VQ4DiTConfig.paper(preset="3bit", k=8))
    assert joint.codebook.requires_grad  # paper: codebooks calibrated from the start
    assert _calib(VQ4DiTConfig(preset="3bit", k=8)).codebook.requires_grad  # so does the default


def test_uncalibrated_vq4dit_equals_kmeans_only_and_save_load_equal_outputs(tmp_path):
    pipe = tiny_dit_pipeline()
    config = VQ4DiTConfig(preset="3bit", iterations=0, kmeans_iters=5)
    vq, _ = quantize_vq4dit(pipe, config, log=lambda s: None)
    km = tiny_dit()
    quantize_kmeans_(km, config)
    for name, layer in replaced_modules(vq).items():  # nearest candidate first: argmax of the init = k-means codes
        assert torch.equal(layer.codes(), km.get_submodule(name).codes())
    assert not any(isinstance(m, nn.Linear) and not isinstance(m, VQLinear) and n.startswith("transformer_blocks")
                   and ".norm1.emb." not in n for n, m in vq.named_modules())
    save_compressed(vq, tmp_path / "vq")
    loaded = load_compressed(tmp_path / "vq")
    x, t, y = torch.randn(2, 4, 16, 16, generator=_gen(0)), torch.tensor([500, 20]), torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(vq(x, timestep=t, class_labels=y).sample, loaded(x, timestep=t, class_labels=y).sample)
    assert {type(m) for m in replaced_modules(loaded).values()} == {VQLinear}


@pytest.mark.parametrize("block_inputs", ["student", "teacher"])
def test_calibration_reduces_block_error_and_loads_into_a_pipeline(tmp_path, block_inputs):
    pipe = tiny_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    config = VQ4DiTConfig(preset="2bit", k=16, iterations=6, steps=4, batch=2, kmeans_iters=5,
                          block_inputs=block_inputs, lr_ratio=5e-2, class_labels=[0, 1, 2])
    teacher_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    model, stats = quantize_vq4dit(pipe, config, log=lambda s: None)
    mse = [h["block_mse"] for h in stats["history"]]
    assert len(mse) == 6 and mse[-1] < mse[0]  # calibration lowers the block-output error
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in teacher_before.items())  # teacher intact
    save_compressed(model, tmp_path / "q")
    base = tmp_path / "base"
    pipe.save_pretrained(base)
    loaded = load_compressed_pipeline(base, tmp_path / "q")
    loaded.set_progress_bar_config(disable=True)
    pipe.transformer = model
    a = pipe(class_labels=[1], num_inference_steps=3, generator=_gen(0), output_type="np").images
    b = loaded(class_labels=[1], num_inference_steps=3, generator=_gen(0), output_type="np").images
    assert (a == b).all()


def test_pixart_calibration_needs_prompts_and_runs():
    from difftune.testing import tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline()
    with pytest.raises(DifftuneError, match="prompts"):
        quantize_vq4dit(pipe, VQ4DiTConfig(preset="3bit", k=8, iterations=1, steps=2, kmeans_iters=2),
                        log=lambda s: None)
    config = VQ4DiTConfig(preset="3bit", k=8, iterations=1, steps=2, kmeans_iters=2, prompts=["a cat", "a dog"])
    model, stats = quantize_vq4dit(pipe, config, log=lambda s: None)
    names = list(replaced_modules(model))
    assert any(".attn2." in n for n in names) and any(".ff." in n for n in names)
    assert stats["history"][0]["block_mse"] > 0


def test_lora_trains_on_a_vq_base():
    model = tiny_dit()
    quantize_kmeans_(model, VQ4DiTConfig(preset="3bit", k=8, kmeans_iters=2))
    x, t, y = torch.randn(2, 4, 16, 16, generator=_gen(0)), torch.tensor([10, 10]), torch.tensor([1, 2])
    with torch.no_grad():
        before = model(x, timestep=t, class_labels=y).sample
    dt.inject(model, dt.LoRAConfig(rank=2, target_modules=["to_q", "to_v"]), name="q")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    model(x, timestep=t, class_labels=y).sample.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
        assert not torch.allclose(model(x, timestep=t, class_labels=y).sample, before)


def test_cli_dry_run_prints_the_paper_sizes(capsys):
    from difftune.cli import main

    assert main(["quantize", "--architecture", "dit-xl2", "--preset", "2bit", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "FP32 blocks: 2553.35 MiB" in out
    assert any(line.startswith("total") and "162.08 MiB" in line for line in out.splitlines())
    assert main(["quantize", "--architecture", "dit-xl2", "--preset", "3bit", "--dry-run"]) == 0
    assert "241.14 MiB" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["kmeans", "rtn"])
def test_cli_quantizes_a_pipeline_folder_that_loads_back(tmp_path, method, capsys):
    from difftune.cli import main

    pipe = tiny_dit_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    args = ["quantize", "--model", str(tmp_path / "base"), "--preset", "3bit", "--method", method,
            "--kmeans-iters", "2", "--out", str(tmp_path / "q")]
    assert main(args) == 0
    loaded = load_compressed_pipeline(tmp_path / "base", tmp_path / "q")
    kinds = {m.method for m in replaced_modules(loaded.transformer).values()}
    assert kinds == {"vq4dit" if method == "kmeans" else "rtn"}
    assert (tmp_path / "q" / "quantize_report.json").is_file()
    assert main(["quantize", "--preset", "2bit"]) == 2  # neither a model nor a dry run: a clear error
    assert "--model/--out" in capsys.readouterr().err


def test_cli_schedule_flags_pick_the_config(monkeypatch, capsys):
    import difftune.compress.vq4dit_calib as calib
    from difftune.cli import main

    seen: list[VQ4DiTConfig] = []
    monkeypatch.setattr(calib, "quantize_pipeline_folder", lambda model, out, method, config: seen.append(config))
    for flags, codebook in (([], "joint"), (["--official"], "after_freeze"), (["--paper"], "joint")):
        assert main(["quantize", "--model", "m", "--out", "o", *flags]) == 0
        assert seen[-1].codebook == codebook
    assert (seen[1].lr_codebook, seen[2].candidates) == (1e-4, 3)
    assert main(["quantize", "--model", "m", "--out", "o", "--paper", "--official"]) == 2
    assert "--paper/--official" in capsys.readouterr().err
