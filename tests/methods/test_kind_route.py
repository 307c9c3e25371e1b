"""KIND's replacing route (`Adapter.replace_output`): at weight 1 the host returns W_y x + b without running the base
layer, the same function as the host's ``base(x) + δ(x)`` route it replaced (compared here at a tolerance a wrong
bias, tailor or gate exceeds by orders of magnitude), and the host falls back to that route whenever the two differ.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import difftune as dt
from difftune.methods.kind import KINDAdapter, KINDConfig, KINDPlugin, kind_adapters
from difftune.methods.lora import LoRAConfig
from difftune.methods.verbs import hosts
from difftune.testing import randomize_adapter, tiny_dit

S = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
LABELS = [1, 3, 1000, 3]  # two classes with tailor groups, the null class (learngenes only), a repeat


def _pretraining_model(adaln: bool = False) -> tuple[nn.Module, list[nn.Parameter]]:
    """tiny DiT under KIND pretraining (``train_base``): random factors, trained tailors, class rows; with ``adaln``
    also the adaLN linears (one token per item: their output is reshaped, a view, so the tailors add out of place)."""
    model = tiny_dit(0)
    plugin = KINDPlugin(KINDConfig(target_modules=S, learngenes=20, tailors_per_class=6, classes=[1, 3],
                                   init="random", train_base=True, adaln=adaln), "k")
    plugin.prepare(None, model)
    randomize_adapter(model, "k", seed=5, std=0.05)
    return model, plugin.trainable_parameters(model)


def _step(model: nn.Module, params: list[nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(LABELS), 4, 16, 16, generator=g)
    for p in params:
        p.grad = None
    out = model(x, timestep=torch.tensor([10, 400, 999, 10]), class_labels=torch.tensor(LABELS)).sample
    F.mse_loss(out[:, :4], x).backward()
    return out.detach(), [p.grad.clone() for p in params]


def _host_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The route before the hook: the host runs the base layer, then adds δ(x) = W_y x − W0 x."""
    monkeypatch.setattr(KINDAdapter, "replace_output", lambda self, x, base_layer, base: None)


def _base_calls(model: nn.Module) -> list[str]:
    calls: list[str] = []
    for n, h in hosts(model):
        if isinstance(h.base_layer, nn.Linear):
            h.base_layer.register_forward_hook(lambda m, i, o, n=n: calls.append(n))  # returns None
    return calls


@pytest.mark.parametrize("adaln", [False, True])
def test_the_replacing_route_is_the_host_route_without_running_the_base_layer(monkeypatch, adaln):
    model, params = _pretraining_model(adaln)
    calls = _base_calls(model)
    out, grads = _step(model, params)
    assert calls == []  # no KIND layer ran W0 x
    assert out.abs().max() > 0.1 and all(g.abs().max() > 0 for g in grads[:3])
    _host_route(monkeypatch)
    want, want_grads = _step(model, params)
    assert len(calls) == 2 * (len(S) + adaln)  # the old route: every KIND layer runs its base layer
    # only rounding differs (W0 x no longer cancels); the gradients of every trained tensor (factors, class rows,
    # embedders, adaLN, biases) agree too. The layer-level test below shows a real bug is far above this tolerance.
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-3)


def test_every_layer_gives_the_host_routes_output_on_its_real_inputs():
    model, _ = _pretraining_model()
    seen: dict[str, torch.Tensor] = {}
    for n, h in hosts(model):
        if isinstance(h.base_layer, nn.Linear):
            h.register_forward_hook(lambda m, i, o, n=n: seen.update({n: i[0].detach()}))  # returns None
    with torch.no_grad():
        x = torch.randn(len(LABELS), 4, 16, 16, generator=torch.Generator().manual_seed(2))
        model(x, timestep=torch.tensor([10, 400, 999, 10]), class_labels=torch.tensor(LABELS))
    assert len(seen) == 2 * len(S)
    for n, h in hosts(model):
        if n not in seen:
            continue
        a, x, base = h.adapters["k"], seen[n], h.base_params()
        with torch.no_grad(), dt.adapter_inputs(class_labels=torch.tensor(LABELS)):
            got = a.replace_output(x, h.base_layer, base)
            want = h.base_layer(x) + a.delta(x, h.base_layer, base)
            no_bias, no_tailors = a.kind_forward(x), a._learngenes(x, None, base["bias"])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the same tolerance catches the real bugs: a dropped bias, or any item's tailors dropped
        for wrong, items in ((no_bias, range(len(LABELS))), (no_tailors, (0, 1, 3))):
            for i in items:
                with pytest.raises(AssertionError):
                    torch.testing.assert_close(wrong[i], want[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[2], no_tailors[2], atol=1e-6, rtol=0)  # the null class: learngenes only


def _layer(bias: bool = True, weight: float = 1.0) -> tuple[nn.Module, KINDAdapter]:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(24, 40, bias=bias))
    dt.inject(model, KINDConfig(target_modules=["proj"], learngenes=16, tailors_per_class=4, classes=[2, 5],
                                init="random"), name="k", weight=weight)
    randomize_adapter(model, "k", seed=1, std=0.1)
    (_, a), *_ = kind_adapters(model, "k")
    return model, a


def _expected(model: nn.Module, a: KINDAdapter, x: torch.Tensor, labels: list[int], w: float) -> torch.Tensor:
    base = model.proj.base_layer
    rows = [x[i] @ (base.weight + w * (a.dense_weight(c) - base.weight)).T for i, c in enumerate(labels)]
    return torch.stack(rows) + (0 if base.bias is None else base.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_a_single_layer_at_weight_one_is_w_y_x_plus_b(bias):
    model, a = _layer(bias)
    calls = _base_calls(model)
    x, labels = torch.randn(3, 7, 24), [5, 9, 2]  # 9: no group
    with torch.no_grad(), dt.adapter_inputs(class_labels=torch.tensor(labels)):
        got = model(x)
    assert calls == [] and got.dtype == x.dtype
    torch.testing.assert_close(got, _expected(model, a, x, labels, 1.0), atol=1e-5, rtol=1e-5)


def test_the_host_falls_back_where_replacing_is_another_function():
    x, labels = torch.randn(3, 7, 24), [5, 9, 2]
    # weight 0.5: (1 − w) W0 x + w W_y x + b needs W0 x
    model, a = _layer(weight=0.5)
    calls = _base_calls(model)
    with torch.no_grad(), dt.adapter_inputs(class_labels=torch.tensor(labels)):
        got = model(x)
    assert calls == ["proj"]
    torch.testing.assert_close(got, _expected(model, a, x, labels, 0.5), atol=1e-5, rtol=1e-5)
    # per-item weights, then a LoRA fused into the same layer (KIND keeps its change on top): the base layer runs
    model, a = _layer()
    calls = _base_calls(model)
    with torch.no_grad(), dt.adapter_inputs(class_labels=torch.tensor(labels), adapter_weights={"k": [1.0, 1.0, 0.0]}):
        got = model(x)
    assert calls == ["proj"]
    want = _expected(model, a, x, labels, 1.0)
    torch.testing.assert_close(got[:2], want[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], model.proj.base_layer(x[2]), atol=1e-6, rtol=0)
    dt.inject(model, LoRAConfig(rank=2, alpha=2.0, target_modules=["proj"]), name="l")
    randomize_adapter(model, "l", seed=2, std=0.1)
    lora_delta = model.proj.adapters["l"].delta_weight(model.proj.base_layer.weight)
    dt.merge(model, "l")
    calls.clear()
    with torch.no_grad(), dt.adapter_inputs(class_labels=torch.tensor(labels)):
        got = model(x)
    assert calls == ["proj"]
    torch.testing.assert_close(got, want + x @ lora_delta.T, atol=1e-5, rtol=1e-5)


def test_under_autocast_the_output_has_the_base_layers_dtype():
    model, a = _layer()
    x, labels = torch.randn(3, 7, 24), [5, 9, 2]
    with torch.no_grad(), dt.adapter_inputs(class_labels=torch.tensor(labels)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
            base = model.proj.base_layer(x)
        plain = model(x)
    assert got.dtype == base.dtype == torch.bfloat16 and plain.dtype == torch.float32
    torch.testing.assert_close(got.float(), plain, atol=0.1, rtol=0.05)  # bf16 rounding of the same function


def test_gradients_through_the_in_place_tailors_and_folded_bias_match_the_dense_weights():
    # the training route: learngenes (fresh output), then tailors and bias added into it in place; the reference
    # differentiates x_i W_{y_i}ᵀ + b built from the same factors (`dense_weight`), per item
    model, a = _layer()
    bias = model.proj.base_layer.bias
    bias.requires_grad_(True)
    labels = [5, 9, 2, 5]
    x = torch.randn(4, 7, 24, requires_grad=True)
    params = [x, bias, *a.learngene_parameters(), *a.tailor_parameters(2), *a.tailor_parameters(5)]
    in_place: list[bool] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.baddbmm_, torch.baddbmm):
                in_place.append(func is torch.Tensor.baddbmm_)
            return func(*args, **(kwargs or {}))

    g = torch.randn(4, 7, 40)
    with dt.adapter_inputs(class_labels=torch.tensor(labels)), Spy():
        got = torch.autograd.grad((model(x) * g).sum(), params)
    assert in_place == [True]
    want_out = torch.stack([x[i] @ a.dense_weight(c).T for i, c in enumerate(labels)]) + bias
    want = torch.autograd.grad((want_out * g).sum(), params)
    for name, u, w in zip(["x", "bias", "gU", "gS", "gV", "tU2", "tS2", "tV2", "tU5", "tS5", "tV5"], got, want):
        torch.testing.assert_close(u, w, atol=1e-5, rtol=1e-4, msg=name)
