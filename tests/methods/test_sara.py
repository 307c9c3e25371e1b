"""SaRA: selection, unstructural backpropagation, nuclear norm, PPA, saving and the one-line API."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import difftune as dt
from difftune.counting import inspect_adapter
from difftune.methods.plugin import plugin_for
from difftune.methods.sara import (
    SaRAAdamW,
    SaRAAdapter,
    SaRAConfig,
    auto_lr,
    pack_bits,
    sara_summary,
    threshold_for_fraction,
    unpack_bits,
)
from difftune.methods.verbs import hosts
from difftune.testing import randomize_adapter, tiny_unet

THETA = 0.02


def _inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([10, 500][:batch])), {
        "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g)}


def _out(model):
    args, kwargs = _inputs()
    with torch.no_grad():
        return model(*args, **kwargs).sample


def _train(model, opt, steps, seed=0):
    args, kwargs = _inputs()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        target = torch.randn(args[0].shape, generator=g)
        loss = (model(*args, **kwargs).sample - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_auto_lr_matches_the_paper():
    for theta, lr in ((2e-4, 9.32e-4), (8e-4, 7.56e-4), (2e-3, 4.97e-4), (5e-3, 1.74e-4), (1e-2, 3.02e-5)):
        assert auto_lr(theta) == pytest.approx(lr, rel=5e-3)  # the notes' values, 3 digits
    assert plugin_for(SaRAConfig(threshold=2e-3), "s").default_lr() == pytest.approx(4.966e-4, rel=1e-3)


def test_selected_fraction_is_the_fraction_below_threshold():
    model = tiny_unet(0)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    below = sum(int((p.abs() < THETA).sum()) for p in params.values())
    dt.inject(model, SaRAConfig(threshold=THETA), name="s")
    summary = sara_summary(model, "s")
    assert summary["total"] == sum(p.numel() for p in params.values())  # every parameter of the UNet is covered
    assert summary["selected"] == below == dt.trainable_parameter_count(model)
    assert 0.05 < summary["density"] < 0.95
    # per tensor too, with the same entries
    for name, host in hosts(model):
        adapter = host.adapters["s"]
        for p in adapter.pnames:
            w0 = params[f"{name}.{p}"]
            expected = (w0.abs() < THETA).reshape(-1).nonzero().squeeze(1)
            assert torch.equal(adapter.index(p).long(), expected)


def test_patterns_restrict_the_selection():
    model = tiny_unet(0)
    dt.inject(model, SaRAConfig(threshold=THETA, target_modules=["to_q", "to_k"]), name="s")
    names = [n for n, _ in hosts(model)]
    assert names and all(n.endswith(("to_q", "to_k")) for n in names)


def test_bit_packing_round_trips():
    mask = torch.rand(1001, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_bits(packed, 1001), mask)


@pytest.mark.parametrize("fused", [False, True])
def test_training_leaves_unselected_entries_bit_identical_and_keeps_no_dense_grads(fused):
    model = tiny_unet(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SaRAAdamW(model, threshold=THETA, lr=1e-3, fused_training=fused)
    deltas = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [p for p in model.parameters() if id(p) not in deltas]
    args, kwargs = _inputs()
    for _ in range(3):
        model(*args, **kwargs).sample.pow(2).mean().backward()
        # unstructural backprop: gradients exist only for the flat vectors, never for a full-size weight
        assert all(p.grad is None for p in frozen)
        assert all(p.grad is not None and p.grad.shape == p.shape for g in opt.param_groups for p in g["params"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    # Adam's moments are |M|-sized
    for p, state in opt.state.items():
        assert state["exp_avg"].shape == p.shape and p.dim() == 1
    changed = 0
    for name, host in hosts(model):
        adapter = host.adapters["sara"]
        for p in adapter.pnames:
            w0, w = before[f"{name}.{p}"].reshape(-1), getattr(host.base_layer, p).detach().reshape(-1)
            if not fused:  # the base keeps W0 and M is read off it; Δ moved
                assert torch.equal(w, w0) and p in adapter._derived, f"{name}.{p}"
                w = w.clone().index_put_((adapter.index(p),), w0[adapter.index(p)] + adapter.delta_vector(p).detach())
            keep = torch.ones_like(w0, dtype=torch.bool)
            keep[adapter.index(p).long()] = False
            assert torch.equal(w[keep], w0[keep]), f"{name}.{p}"
            changed += int((w[~keep] != w0[~keep]).sum())
    assert changed > 1000  # the selected entries moved (fused: in place, the model holds W0 + Δ)


def test_gradient_routing_equals_autograd_through_the_dense_weight(monkeypatch):
    """The merged (in-place, UB) path, the unfused path that makes each weight in blocks (`unfused.UnfusedLayer`)
    and autograd through a dense index_put copy give the same outputs and ∂L/∂Δ."""
    outs, grads = [], []
    for route in ("merged", "blocks", "dense"):
        if route == "dense":
            monkeypatch.setattr(SaRAAdapter, "layer_output", lambda self, x, layer, weight: None)
        model = tiny_unet(0)
        dt.inject(model, SaRAConfig(threshold=THETA), name="s")
        randomize_adapter(model, "s", seed=3, std=0.01)
        if route == "merged":
            dt.merge(model)
        args, kwargs = _inputs()
        out = model(*args, **kwargs).sample
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad for p in dt.methods.verbs.adapter_parameters(model, "s")]))
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, grads[0], atol=1e-6, rtol=1e-5)
        assert grad.abs().max() > 1e-3


def _nuclear(model, name, min_dim):
    total = 0.0
    for _, host in hosts(model):
        adapter = host.adapters[name]
        shape = adapter.shapes.get("weight", ())
        if len(shape) == 2 and min(shape) > min_dim:
            total += float(torch.linalg.matrix_norm(adapter.delta_weight(host.base_value("weight")), "nuc"))
    return total


def test_nuclear_norm_term_lowers_the_updates_rank():
    norms = {}
    for lam in (0.0, 0.1):
        torch.manual_seed(0)
        model = tiny_unet(0)
        opt = SaRAAdamW(model, threshold=THETA, lr=2e-3, rank_weight=lam, rank_min_dim=16, weight_decay=0.0)
        _train(model, opt, 12)
        norms[lam] = _nuclear(model, "sara", 16)
    assert norms[0.1] < 0.9 * norms[0.0], norms


def _deltas(opt):
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def test_nuclear_norm_draw_is_the_same_on_every_process_and_resumes():
    """Issue 31: the weight that gets each step's nuclear-norm term is drawn from the optimizer's own seeded generator.
    DDP processes hold the same weights and all-reduced gradients but each its own global RNG (seed + rank), and the
    term is added after the all-reduce: with a global-RNG draw the replicas diverged."""
    def run(global_seed, seed=3, steps=4):
        model = tiny_unet(0)
        opt = SaRAAdamW(model, threshold=THETA, lr=2e-3, rank_weight=0.1, rank_min_dim=16, seed=seed)
        torch.manual_seed(global_seed)  # what differs between the processes
        _train(model, opt, steps)
        return model, opt

    first, other = _deltas(run(0)[1]), _deltas(run(1)[1])
    assert all(torch.equal(a, b) for a, b in zip(first, other))
    # the draw matters (so the equality is not vacuous): another optimizer seed picks other weights
    assert not all(torch.equal(a, b) for a, b in zip(first, _deltas(run(0, seed=4)[1])))

    # the generator and the step count travel with the optimizer's state: a reloaded optimizer draws on as before
    model, opt = run(0, steps=2)
    saved = copy.deepcopy(opt.state_dict())
    _train(model, opt, 2, seed=1)
    model_b, opt_b = run(0, steps=2)
    opt_b.generator.manual_seed(12345)  # a fresh process: another generator state, no steps taken
    opt_b.steps_taken = 0
    opt_b.load_state_dict(saved)
    _train(model_b, opt_b, 2, seed=1)
    assert opt_b.steps_taken == 4 and all(torch.equal(a, b) for a, b in zip(_deltas(opt), _deltas(opt_b)))


def test_progressive_adjustment_keeps_exactly_the_entries_still_below_threshold():
    model = tiny_unet(0)
    opt = SaRAAdamW(model, threshold=THETA, lr=5e-3, progressive_step=4)
    _train(model, opt, 4)  # PPA runs right after step 4
    assert opt.progressed and all(not s for s in opt.state.values())  # moments reset
    expected_training = 0
    snapshot = {}
    for _, host in hosts(model):
        adapter = host.adapters["sara"]
        for p in adapter.pnames:
            current = adapter.base_values(p).float() + adapter.delta_vector(p).detach()
            assert torch.equal(adapter.train_mask(p), current.abs() < THETA)
            expected_training += int((current.abs() < THETA).sum())
            snapshot[(id(adapter), p)] = adapter.delta_vector(p).detach().clone()
    summary = sara_summary(model, "sara")
    assert summary["training"] == expected_training < summary["selected"]
    _train(model, opt, 3, seed=1)
    moved = 0
    for _, host in hosts(model):
        adapter = host.adapters["sara"]
        for p in adapter.pnames:
            old, new, keep = snapshot[(id(adapter), p)], adapter.delta_vector(p).detach(), adapter.train_mask(p)
            assert torch.equal(new[~keep], old[~keep])  # adjusted-out entries keep their trained value
            moved += int((new[keep] != old[keep]).sum())
    assert moved > 0


def test_clipping_acts_on_the_trained_values():
    model = tiny_unet(0)
    opt = SaRAAdamW(model, threshold=THETA, lr=1e-3, max_grad_norm=1e-4, rank_weight=0.0)
    args, kwargs = _inputs()
    (model(*args, **kwargs).sample.pow(2).mean() * 1e3).backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    assert torch.linalg.vector_norm(torch.cat([p.grad for p in params])) > 1e-3
    opt.step()
    norm = torch.linalg.vector_norm(torch.cat([p.grad for p in params]))
    assert norm <= 1e-4 * 1.001


def test_save_load_round_trip_scale_and_merge(tmp_path):
    model = tiny_unet(0)
    base_out = _out(model)
    dt.inject(model, SaRAConfig(threshold=THETA), name="s")
    randomize_adapter(model, "s", seed=5, std=0.01)
    expected = _out(model)
    path = dt.save_adapter(model, tmp_path / "s", name="s")
    info = inspect_adapter(path)
    assert info["parameters"] == dt.trainable_parameter_count(model)
    assert info["density"] == pytest.approx(sara_summary(model, "s")["density"])
    tensors = load_file(path / "adapter_model.safetensors")
    assert any(k.endswith("sara_mask_weight") and v.dtype == torch.uint8 for k, v in tensors.items())
    assert not any(".idx_" in k or ".w0_" in k for k in tensors)

    fresh = tiny_unet(0)
    dt.load_adapter(fresh, path, name="s")
    torch.testing.assert_close(_out(fresh), expected, atol=0, rtol=0)
    # α = 0 is the base model exactly, unfused and fused; α scales Δ
    dt.set_adapter_weights(fresh, {"s": 0.0})
    assert torch.equal(_out(fresh), base_out)
    dt.fuse(fresh)
    assert torch.equal(_out(fresh), base_out)
    dt.set_adapter_weights(fresh, {"s": 1.0})
    torch.testing.assert_close(_out(fresh), expected, atol=1e-5, rtol=0)
    dt.unfuse(fresh)
    dt.delete_adapter(fresh, "s")
    assert torch.equal(_out(fresh), base_out)


def test_the_stored_mask_is_used_not_recomputed(tmp_path):
    model = tiny_unet(0)
    dt.inject(model, SaRAConfig(threshold=THETA), name="s")
    randomize_adapter(model, "s", seed=5, std=0.01)
    path = dt.save_adapter(model, tmp_path / "s", name="s")
    count = dt.trainable_parameter_count(model)
    # push two selected entries of one weight just over θ: recomputing |W0| < θ would now select two fewer
    fresh = tiny_unet(0)
    w = fresh.conv_in.weight
    with torch.no_grad():
        flat = w.view(-1)
        picks = (flat.abs() < THETA).nonzero().squeeze(1)[:2]
        flat[picks] = THETA * 1.0001
    dt.load_adapter(fresh, path, name="s")
    assert dt.trainable_parameter_count(fresh) == count


def test_a_low_precision_copy_of_the_base_loads(tmp_path):
    model = tiny_unet(0)
    dt.inject(model, SaRAConfig(threshold=THETA), name="s")
    randomize_adapter(model, "s", seed=5, std=0.01)
    path = dt.save_adapter(model, tmp_path / "s", name="s")
    for dtype in (torch.float16, torch.bfloat16):
        fresh = tiny_unet(0).to(dtype)
        dt.load_adapter(fresh, path, name="s")
        assert dt.trainable_parameter_count(fresh) == dt.trainable_parameter_count(model)
        dt.fuse(fresh)
        dt.unfuse(fresh)
        dt.delete_adapter(fresh, "s")
        assert all(torch.equal(p, q.to(dtype)) for p, q in zip(fresh.parameters(), tiny_unet(0).parameters()))


def test_a_different_base_is_rejected(tmp_path):
    model = tiny_unet(0)
    dt.inject(model, SaRAConfig(threshold=THETA), name="s")
    path = dt.save_adapter(model, tmp_path / "s", name="s")
    other = tiny_unet(1)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(dt.DifftuneError, match=r"(?s)base values of .* differ .*exact base model"):
        dt.load_adapter(other, path, name="s")
    assert dt.list_adapters(other) == {}  # rolled back
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())


def test_combines_with_lora_and_other_sara_adapters_and_unfuses_exactly():
    model = tiny_unet(0)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    dt.inject(model, SaRAConfig(threshold=THETA), name="s1")
    dt.inject(model, SaRAConfig(threshold=THETA / 2), name="s2")
    dt.inject(model, dt.LoRAConfig(rank=2, target_modules=["to_q", "to_v"]), name="l")
    for i, n in enumerate(("s1", "s2", "l")):
        randomize_adapter(model, n, seed=i, std=0.01)
    dt.set_adapter_weights(model, {"s1": 0.6, "s2": 0.6, "l": 0.8})  # the paper merges two SaRA deltas at 0.6
    unfused = _out(model)
    dt.fuse(model)
    torch.testing.assert_close(_out(model), unfused, atol=1e-5, rtol=0)
    for _ in range(20):
        dt.unfuse(model)
        dt.fuse(model)
    dt.unfuse(model)
    dt.remove(model)
    assert all(torch.equal(originals[n], p) for n, p in model.named_parameters())


def test_remove_with_merge_bakes_sara_and_keeps_others_exact():
    model = tiny_unet(0)
    dt.inject(model, SaRAConfig(threshold=THETA), name="a")
    dt.inject(model, SaRAConfig(threshold=THETA), name="b")
    randomize_adapter(model, "a", seed=1, std=0.01)
    randomize_adapter(model, "b", seed=2, std=0.01)
    dt.fuse(model)
    both = _out(model)
    dt.remove(model, "a", merge=True)  # a becomes part of the base
    torch.testing.assert_close(_out(model), both, atol=1e-5, rtol=0)
    dt.unfuse(model)
    dt.remove(model)
    only_a = tiny_unet(0)
    dt.inject(only_a, SaRAConfig(threshold=THETA), name="a")
    randomize_adapter(only_a, "a", seed=1, std=0.01)
    torch.testing.assert_close(_out(model), _out(only_a), atol=1e-5, rtol=0)


def test_meta_device_and_bad_config_give_clear_errors():
    from diffusers import UNet2DConditionModel

    from difftune.testing import build_on_meta, sd15_unet_config

    meta = build_on_meta(UNet2DConditionModel, sd15_unet_config())
    with pytest.raises(dt.DifftuneError, match="meta device"):
        dt.inject(meta, SaRAConfig(), name="s")
    for field, value in (("threshold", 0.0), ("threshold", "2e-3"), ("rank_weight", -1.0),
                         ("progressive_fraction", 1.5)):
        with pytest.raises(dt.DifftuneError, match=field):
            SaRAConfig(**{field: value})
    with pytest.raises(dt.DifftuneError, match="progressive_step"):
        SaRAAdamW(tiny_unet(0), threshold=THETA, progressive_step=0)


def test_threshold_for_fraction():
    model = tiny_unet(0)
    theta = threshold_for_fraction(model, 0.05)
    dt.inject(model, SaRAConfig(threshold=theta), name="s")
    assert sara_summary(model, "s")["density"] == pytest.approx(0.05, abs=0.01)


def test_one_line_api_then_save_and_load_into_a_pipeline(tmp_path, sd_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sd_dir)
    opt = SaRAAdamW(pipe.unet, threshold=THETA)  # the paper's one line
    assert opt.param_groups[0]["lr"] == pytest.approx(auto_lr(THETA))
    _train(pipe.unet, opt, 2)
    path = dt.save_adapter(pipe, tmp_path / "sara")
    image = pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    other = DiffusionPipeline.from_pretrained(sd_dir)
    dt.load_adapter(other, path)
    dt.fuse(other)
    again = other("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert abs(image - again).max() < 1e-4
    assert not isinstance(next(m for n, m in other.unet.named_modules() if n == "conv_in"), nn.Conv2d)


def test_corrupt_mask_is_a_clear_error(tmp_path):
    model = tiny_unet(0)
    dt.inject(model, SaRAConfig(threshold=THETA), name="s")
    path = dt.save_adapter(model, tmp_path / "s", name="s")
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("conv_in.sara_mask_weight"))
    tensors[key] = tensors[key][:-1]
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    save_file(tensors, file, metadata=meta)
    (path / "adapter_config.json").unlink()
    with pytest.raises(dt.DifftuneError, match=r"conv_in.*packed bytes"):
        dt.load_adapter(tiny_unet(0), file, name="s")


def test_two_saved_sara_adapters_merge_through_the_loader_and_inspect_reports_density(tmp_path, capsys):
    from difftune.cli import main as cli

    paths = []
    for i in range(2):
        model = tiny_unet(0)
        dt.inject(model, SaRAConfig(threshold=THETA), name=f"s{i}")
        randomize_adapter(model, f"s{i}", seed=10 + i, std=0.01)
        paths.append(dt.save_adapter(model, tmp_path / f"s{i}", name=f"s{i}"))
    model = tiny_unet(0)
    dt.inject(model, SaRAConfig(threshold=THETA), name="s0")
    dt.inject(model, SaRAConfig(threshold=THETA), name="s1")
    randomize_adapter(model, "s0", seed=10, std=0.01)
    randomize_adapter(model, "s1", seed=11, std=0.01)
    dt.set_adapter_weights(model, {"s0": 0.6, "s1": 0.6})
    expected = _out(model)
    fresh = tiny_unet(0)
    for path in paths:
        dt.load_adapter(fresh, path, weight=0.6)
    dt.fuse(fresh)
    torch.testing.assert_close(_out(fresh), expected, atol=1e-5, rtol=0)
    assert cli(["inspect", str(paths[0])]) == 0
    out = capsys.readouterr().out
    assert f"trainable params:  {sara_summary(model, 's0')['selected']:,}" in out
    assert f"density:           {sara_summary(model, 's0')['density']:.4%}" in out
