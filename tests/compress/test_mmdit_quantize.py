"""VQ4DiT / k-means / RTN on SD3 and Flux linears: `difftune quantize --architecture flux-dev --dry-run` size
accounting (numbers by hand from the layer shapes), and the tiny pipelines quantized through the CLI, loaded back,
with every joint and single block linear replaced and the model computing with the dequantized weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difftune import DifftuneError
from difftune.compress import load_compressed_pipeline, replaced_modules
from difftune.compress.vq4dit import block_linears
from difftune.testing import save_tiny_pipeline

MiB = 2**20


def test_flux_dev_dry_run_sizes_by_hand(capsys):
    from difftune.cli import main

    w, mlp = 3072, 12288
    # joint block, per stream: AdaLN-Zero (6w), q, k, v, out, feed-forward in/out; single: AdaLN (3w), q, k, v,
    # MLP in, fused out (w + mlp → w)
    joint_w, joint_b = 2 * (6 * w * w + 4 * w * w + 2 * w * mlp), 2 * (6 * w + 4 * w + mlp + w)
    single_w, single_b = 3 * w * w + 3 * w * w + w * mlp + (w + mlp) * w, 3 * w + 3 * w + mlp + w
    weights, biases = 19 * joint_w + 38 * single_w, 19 * joint_b + 38 * single_b
    assert (weights, biases) == (11_834_228_736, 3_035_136)
    assert main(["quantize", "--architecture", "flux-dev", "--dry-run"]) == 0  # 2bit: k = 256, d = 4
    out = capsys.readouterr().out
    linears = 19 * 14 + 38 * 6
    total = weights / 4 + linears * 256 * 4 * 4 + biases * 4  # one byte per 4 weights, FP32 codebooks and biases
    assert f"quantized linears: {linears} ({weights:,} weights, {biases:,} biases)" in out
    assert f"FP32 blocks: {(weights + biases) * 4 / MiB:.2f} MiB" in out and "45155.58 MiB" in out
    assert f"total 2bit quantized: {total / MiB:.2f} MiB" in out and "2835.01 MiB (15.93x smaller)" in out


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("q-mmdit")
    return {k: save_tiny_pipeline(k, root / k) for k in ("sd3", "flux")}


def _dequantized_copy(fp: nn.Module, quantized: nn.Module) -> nn.Module:
    """The FP model with each replaced Linear's weight set to its dequantized weight (plain nn.Linear)."""
    with torch.no_grad():
        for name, module in replaced_modules(quantized).items():
            target = fp.get_submodule(name)
            target.weight.copy_(module.dequantized_weight(torch.float32))
            if target.bias is not None:
                target.bias.copy_(module.bias.float())
    return fp


@pytest.mark.parametrize("kind, method", [("flux", "rtn"), ("flux", "kmeans"), ("sd3", "rtn")])
def test_quantized_tiny_pipelines_load_back_and_compute_with_the_dequantized_weights(pipes, tmp_path, kind, method):
    from diffusers import DiffusionPipeline

    from difftune.cli import main

    assert main(["quantize", "--model", str(pipes[kind]), "--preset", "3bit", "--method", method,
                 "--kmeans-iters", "2", "--out", str(tmp_path / "q")]) == 0
    pipe = load_compressed_pipeline(pipes[kind], tmp_path / "q")
    fp = DiffusionPipeline.from_pretrained(pipes[kind]).transformer
    replaced = replaced_modules(pipe.transformer)
    # flux: 1 joint block (14) + 2 single blocks (6 each); sd3: a joint block (14) + the last one (11)
    assert sorted(replaced) == sorted(block_linears(fp)) and len(replaced) == (26 if kind == "flux" else 25)
    if kind == "flux":
        assert {"single_transformer_blocks.1.proj_out", "single_transformer_blocks.0.norm.linear"} <= set(replaced)
    assert {m.method for m in replaced.values()} == {"vq4dit" if method == "kmeans" else "rtn"}
    assert "proj_out" not in replaced and "x_embedder" not in replaced  # embedders and the output stay FP
    image = pipe("a photo of a cat", height=32, width=32, num_inference_steps=2, output_type="np",
                 max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(torch.as_tensor(image)).all()
    # the loaded model computes what the FP model computes with the dequantized weights (other kernels: close)
    ref = _dequantized_copy(fp, pipe.transformer)
    g = torch.Generator().manual_seed(0)
    if kind == "flux":
        inputs = {"hidden_states": torch.randn(1, 16, 64, generator=g), "img_ids": torch.zeros(16, 3),
                  "txt_ids": torch.zeros(4, 3), "guidance": torch.tensor([3.5]), "timestep": torch.tensor([0.5]),
                  "encoder_hidden_states": torch.randn(1, 4, 32, generator=g),
                  "pooled_projections": torch.randn(1, 32, generator=g)}
    else:
        inputs = {"hidden_states": torch.randn(1, 16, 4, 4, generator=g), "timestep": torch.tensor([500.0]),
                  "encoder_hidden_states": torch.randn(1, 4, 64, generator=g),
                  "pooled_projections": torch.randn(1, 64, generator=g)}
    with torch.no_grad():
        out, expect = pipe.transformer(**inputs).sample, ref(**inputs).sample
        plain = DiffusionPipeline.from_pretrained(pipes[kind]).transformer(**inputs).sample
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-4)
    assert (out - plain).abs().max() > 1e-3  # 3-bit weights: not the FP model


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_vq4dit_calibration_along_the_flow_matching_trajectory(pipes, kind):
    """The FP pipeline's own Euler sampler drives the trajectory (SD3 with CFG, Flux [dev] with its guidance value and
    packed latents); calibration lowers the block-output error over every joint and single block's image stream."""
    from diffusers import DiffusionPipeline

    from difftune.compress.vq4dit import VQ4DiTConfig
    from difftune.compress.vq4dit_calib import quantize_vq4dit

    pipe = DiffusionPipeline.from_pretrained(pipes[kind])
    with pytest.raises(DifftuneError, match="prompts"):
        quantize_vq4dit(pipe, VQ4DiTConfig(preset="3bit", k=8, iterations=1, steps=2, kmeans_iters=2),
                        log=lambda s: None)
    with pytest.raises(DifftuneError, match="block_inputs"):
        quantize_vq4dit(pipe, VQ4DiTConfig(preset="3bit", block_inputs="teacher", prompts=["a cat"]))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    config = VQ4DiTConfig(preset="2bit", k=16, iterations=4, steps=3, batch=2, kmeans_iters=3, resolution=32,
                          prompts=["a photo of a cat", "a red car"], guidance=2.0)
    model, stats = quantize_vq4dit(pipe, config, log=lambda s: None)
    mse = [h["block_mse"] for h in stats["history"]]
    assert len(mse) == 4 and mse[-1] < mse[0], mse  # calibration lowers the block-output error
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in before.items())  # the teacher is intact
    assert sorted(replaced_modules(model)) == sorted(block_linears(pipe.transformer))
    pipe.transformer = model
    image = pipe("a photo of a cat", height=32, width=32, num_inference_steps=2, output_type="np",
                 max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(torch.as_tensor(image)).all()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_calibration_trajectory_is_the_pipelines_own_sampler(pipes, kind):
    """Stepping the trajectory with the FP transformer's velocities gives the latents the pipeline itself samples
    from the same x_T, prompts and guidance (SD3: CFG with the empty negative prompt; Flux: its σ schedule, dynamic
    shift, packed latents and guidance embedding)."""
    from diffusers import DiffusionPipeline

    from difftune.compress.vq4dit import VQ4DiTConfig
    from difftune.compress.vq4dit_flow import FlowTrajectory

    pipe = DiffusionPipeline.from_pretrained(pipes[kind])
    prompts = ["a photo of a cat", "a red car"]
    config = VQ4DiTConfig(preset="3bit", steps=3, batch=2, resolution=32, prompts=prompts, guidance=2.5)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    traj = FlowTrajectory(pipe, config, gen, torch.device("cpu"))
    picked = [prompts[i] for i in torch.randint(2, (2,), generator=torch.Generator().manual_seed(0)).tolist()]
    x_T = traj.x.clone()
    with torch.no_grad():
        for t in traj.timesteps:
            traj.advance(pipe.transformer(**traj.model_kwargs(t), return_dict=False)[0], t)
        theirs = pipe(picked, height=32, width=32, num_inference_steps=3, guidance_scale=2.5, latents=x_T,
                      output_type="latent").images
    torch.testing.assert_close(traj.x, theirs, atol=1e-5, rtol=1e-5)
    assert (traj.x - x_T).abs().max() > 0.1  # it moved
