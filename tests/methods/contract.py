"""The contract every registered method honours, as plain check functions (test_contract.py runs them over every
method and model; test_mutants.py shows that deliberately broken methods fail them).

A method joins by adding a `Case` to CASES. A case names the method's test config and, where the standard models
do not suit it, its own targets, models and per-call inputs (e.g. a skip tuner targets the UNet's up-block resnets;
a class gate needs labels). Weight-space adapters (those with ΔW) must merge exactly; activation-space ones must
honour their weight and `disable`, and refuse an explicit fuse.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import difftune as dt
from difftune.methods import METHODS, AdapterHost
from difftune.methods.plugin import plugin_for
from difftune.methods.verbs import adapter_parameters, hosts, unmerge
from difftune.testing import randomize_adapter, tiny_dit, tiny_unet


class TinyLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 24)
        self.head = nn.Linear(24, 8)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)))


class TinyConv(nn.Module):
    def __init__(self, stride: int = 1):
        super().__init__()
        # strided, padded and dilated: an adapter that ignores the base conv's geometry gives another output
        self.conv = nn.Conv2d(4, 6, 3, padding=1, stride=stride)
        self.out = nn.Conv2d(6, 2, 3, padding=2, dilation=2, stride=(stride, 1))

    def forward(self, x):
        return self.out(torch.relu(self.conv(x)))


@dataclass
class Model:
    """A model to adapt, the patterns to target in it, and the inputs of one forward."""

    module: nn.Module
    targets: list[str]
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)


def linear(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    return Model(TinyLinear(), ["proj", "head"], (torch.randn(3, 16),))


def conv(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    return Model(TinyConv(), ["conv", "out"], (torch.randn(2, 4, 8, 8),))


def strided_conv(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    return Model(TinyConv(stride=2), ["conv", "out"], (torch.randn(2, 4, 9, 9),))


def unet(seed: int = 0) -> Model:
    g = torch.Generator().manual_seed(1)
    return Model(tiny_unet(seed), ["to_q", "to_k", "to_v", "to_out.0"],
                 (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500])),
                 {"encoder_hidden_states": torch.randn(2, 7, 32, generator=g)})


def dit(seed: int = 0) -> Model:
    g = torch.Generator().manual_seed(1)
    model = tiny_dit(seed)
    size = model.config.sample_size
    return Model(model, ["to_q", "to_k", "to_v", "to_out.0"], (torch.randn(2, 4, size, size, generator=g),),
                 {"timestep": torch.tensor([10, 500]), "class_labels": torch.tensor([1, 3])})


MODELS: dict[str, Callable[..., Model]] = {
    "linear": linear, "conv": conv, "strided_conv": strided_conv, "unet": unet, "dit": dit}


@dataclass
class Case:
    """How the contract exercises one method.

    Attributes:
        config: the method's config fields (non-default where that makes the tiny models meaningful).
        atol: its merge tolerance (a method attribute, never an `if` in a shared test).
        models: the model kinds it runs on (default: all of `MODELS`).
        targets: per kind, patterns replacing the model's default targets.
        inputs: per kind, per-call inputs (`difftune.adapter_inputs`) every forward runs with.
        builders: extra model kinds of its own ({kind: builder}).
    """

    config: dict[str, Any]
    atol: float = 1e-5
    models: list[str] | None = None
    targets: dict[str, list[str]] = field(default_factory=dict)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    builders: dict[str, Callable[..., Model]] = field(default_factory=dict)


CASES: dict[str, Case] = {
    # KIND (linears only): class labels pick tailor groups (the DiT's own [1, 3]; given per call to the linear model)
    "kind": Case({"learngenes": 4, "tailors_per_class": 2, "classes": [1, 3]}, models=["linear", "dit"],
                 inputs={"linear": {"class_labels": torch.tensor([1, 3, 3])}}),
    "krona": Case({"a1": 2, "a2": 2}),  # 2 divides every width of the tiny models
    "lora": Case({"rank": 2, "alpha": 4.0}),
    "sara": Case({"threshold": 0.05}),  # selects 10-40% of the tiny models' entries
    # skip tuners on the UNet's up-block resnets; the CSC tuner's control image reaches its hint encoder per call
    "scedit": Case({}, models=["unet"], targets={"unet": [r"up_blocks\.\d+\.resnets\.\d+"]}),
    "csc": Case({}, models=["unet"], targets={"unet": [r"up_blocks\.\d+\.resnets\.\d+"]},
                inputs={"unet": {"control": torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))}}),
    "spm": Case({"matching": "fixed"}),  # γ = 1: the contract sees the plain membrane (transport: test_spm.py)
}


def adapter_methods() -> list[str]:
    return sorted(m for m, cls in METHODS.items() if cls.is_adapter)


def kinds(method: str) -> list[str]:
    case = CASES[method]
    return case.models or [*MODELS, *case.builders]


def build(method: str, kind: str, seed: int = 0) -> Model:
    case = CASES[method]
    model = {**MODELS, **case.builders}[kind](seed)
    model.module.eval()
    if kind in case.targets:
        model.targets = case.targets[kind]
    return model


def config(method: str, model: Model) -> Any:
    return METHODS[method](target_modules=model.targets, **CASES[method].config)


def adapted(method: str, kind: str, name: str = "a", seed: int = 11, weight: float = 1.0) -> Model:
    model = build(method, kind)
    dt.inject(model.module, config(method, model), name=name, weight=weight)
    randomize_adapter(model.module, name, seed=seed)
    return model


def inputs(method: str, kind: str):
    return dt.adapter_inputs(**CASES[method].inputs.get(kind, {}))


def run(method: str, kind: str, model: Model, grad: bool = False) -> torch.Tensor:
    with inputs(method, kind), torch.set_grad_enabled(grad):
        out = model.module(*model.args, **model.kwargs)
    return out.sample if hasattr(out, "sample") else out


def weight_space(model: nn.Module, name: str) -> bool:
    return all(h.adapters[name].mergeable for _, h in hosts(model) if name in h.adapters)


def assert_equal(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# -- the checks ----------------------------------------------------------------------------------------------------


def check_inject_changes_output_and_merge(method: str, kind: str) -> None:
    model = build(method, kind)
    base_out = run(method, kind, model)
    dt.inject(model.module, config(method, model), name="a")
    randomize_adapter(model.module, "a", seed=11)
    assert any(isinstance(m, AdapterHost) for m in model.module.modules())
    unmerged = run(method, kind, model)
    assert (unmerged - base_out).abs().max() > 1e-3, "the adapter does not change the output"
    dt.merge(model.module)  # merges what can be merged; activation-space adapters keep running as modules
    assert_equal(run(method, kind, model), unmerged, CASES[method].atol)
    if not weight_space(model.module, "a"):
        assert not dt.list_adapters(model.module)["a"]["fused"]
        try:
            dt.fuse(model.module, "a")
        except dt.DifftuneError as e:
            assert "cannot be merged" in str(e)
        else:
            raise AssertionError("an explicit fuse of an activation-space adapter must be refused")


def check_weight_and_disable(method: str, kind: str) -> None:
    """w = 0 and `disable` give the base output; the weight scales the effect; `enable` brings it back."""
    model = build(method, kind)
    base_out = run(method, kind, model)
    dt.inject(model.module, config(method, model), name="a")
    randomize_adapter(model.module, "a", seed=5)
    full = run(method, kind, model)
    dt.set_adapter_weights(model.module, {"a": 0.0})
    assert_equal(run(method, kind, model), base_out, CASES[method].atol)
    dt.set_adapter_weights(model.module, {"a": 0.5})
    half = run(method, kind, model)
    assert (half - full).abs().max() > 1e-4 and (half - base_out).abs().max() > 1e-4, "the weight is ignored"
    dt.disable_adapters(model.module, "a")
    assert_equal(run(method, kind, model), base_out)
    dt.enable_adapters(model.module, "a")
    assert_equal(run(method, kind, model), half)


def check_only_the_adapter_trains(method: str, kind: str) -> None:
    """After inject exactly the adapter's tensors require grad (no base bias, norm or weight left trainable)."""
    model = build(method, kind)
    dt.inject(model.module, config(method, model), name="a")
    trainable = {id(p) for p in model.module.parameters() if p.requires_grad}
    adapter = {id(p) for p in adapter_parameters(model.module, "a")}
    assert adapter, "the adapter has no parameters"
    assert trainable == adapter, f"{len(trainable - adapter)} base tensor(s) left trainable"


def _float64(model: Model) -> Model:
    model.module.double()
    model.args = tuple(a.double() if torch.is_floating_point(a) else a for a in model.args)
    model.kwargs = {k: v.double() if torch.is_tensor(v) and torch.is_floating_point(v) else v
                    for k, v in model.kwargs.items()}
    return model


def check_training_route(method: str, kind: str) -> None:
    """The method's own training route (its trainer plugin's `prepare`) gives the true gradient: the directional
    derivative along a random direction equals the finite difference of the loss (float64), and one SGD step
    moves only what the plugin trains."""
    model = _float64(build(method, kind))
    frozen = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    plugin = plugin_for(config(method, model), "a")
    model.module = plugin.prepare(None, model.module)
    randomize_adapter(model.module, "a", seed=7, std=0.05)
    params = plugin.trainable_parameters(model.module)
    assert params, "the training route trains nothing"
    g = torch.Generator().manual_seed(3)
    out0 = run(method, kind, model)
    probe = torch.randn(out0.shape, generator=g, dtype=out0.dtype)

    def loss() -> torch.Tensor:
        return (run(method, kind, model, grad=True) * probe).sum()

    for p in params:
        p.grad = None
    loss().backward()
    assert all(p.grad is not None for p in params), "a trainable tensor got no gradient"
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]
    analytic = sum(float((p.grad.double() * d.double()).sum()) for p, d in zip(params, direction))
    eps = 1e-4 if all(p.dtype == torch.float64 for p in params) else 1e-3
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        plus = float(loss())
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        minus = float(loss())
        for p, d in zip(params, direction):
            p.add_(eps * d)
    numeric = (plus - minus) / (2 * eps)
    assert abs(numeric) > 1e-6, "the loss does not depend on the trained tensors"
    assert abs(analytic - numeric) <= 2e-2 * abs(numeric) + 1e-6, f"gradient {analytic:.6g} vs finite difference " \
                                                                   f"{numeric:.6g}"
    before = [p.detach().clone() for p in params]
    torch.optim.SGD(params, lr=1e-2).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    unmerge(model.module)  # a route that merges for training (SaRA) must still restore the exact base
    for n, p in model.module.named_parameters():
        canon = n.replace(".base_layer", "")
        if canon in frozen and not any(p is q for q in params):
            assert torch.equal(frozen[canon], p), f"frozen {canon} changed"


def check_unmerge_restores_without_drift(method: str, kind: str) -> None:
    model = adapted(method, kind)
    if not weight_space(model.module, "a"):
        return
    originals = {n: h.base_layer.weight.detach().clone() for n, h in hosts(model.module)}
    for _ in range(100):
        dt.fuse(model.module)
        dt.unfuse(model.module)
    for n, h in hosts(model.module):
        w0 = originals[n]
        assert (h.base_layer.weight - w0).norm() / w0.norm() <= 1e-6, n
    dt.fuse(model.module)
    assert any((h.base_layer.weight - originals[n]).abs().max() > 0 for n, h in hosts(model.module))


def check_save_load_round_trip(method: str, kind: str, tmp_path: Any) -> None:
    model = adapted(method, kind)
    expected = run(method, kind, model)
    dt.save_adapter(model.module, tmp_path / "ad", name="a")
    fresh = build(method, kind)
    for path in (tmp_path / "ad", tmp_path / "ad" / "adapter_model.safetensors"):
        dt.load_adapter(fresh.module, path, name="a")
        assert_equal(run(method, kind, fresh), expected)
        dt.delete_adapter(fresh.module, "a")


def check_remove_restores_original_modules(method: str, kind: str) -> None:
    model = build(method, kind)
    before = dict(model.module.named_modules())
    base_out = run(method, kind, model)
    dt.inject(model.module, config(method, model), name="a")
    randomize_adapter(model.module, "a", seed=3)
    dt.merge(model.module)
    dt.remove(model.module)
    after = dict(model.module.named_modules())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert_equal(run(method, kind, model), base_out)


def check_two_adapters_combine(method: str, kind: str) -> None:
    """Per adapted layer, w1·δ1 + w2·δ2 (unfused and fused) for weight-space adapters; activation-space adapters
    compose as modules: removing one leaves exactly the model with the other."""
    model = build(method, kind)
    dt.inject(model.module, config(method, model), name="a")
    dt.inject(model.module, config(method, model), name="b")
    randomize_adapter(model.module, "a", seed=1)
    randomize_adapter(model.module, "b", seed=2)
    if not weight_space(model.module, "a"):
        both = run(method, kind, model)
        dt.delete_adapter(model.module, "b")
        only_a = run(method, kind, model)
        assert (both - only_a).abs().max() > 1e-4
        solo = build(method, kind)
        dt.inject(solo.module, config(method, solo), name="a")
        randomize_adapter(solo.module, "a", seed=1)
        assert_equal(run(method, kind, solo), only_a)
        return
    _, layer = next(hosts(model.module))
    base = layer.base_layer
    x = torch.randn(5, base.in_features) if isinstance(base, nn.Linear) else torch.randn(1, base.in_channels, 6, 6)
    with torch.no_grad(), inputs(method, kind):
        y0 = base(x)
        dt.set_adapter_weights(model.module, {"a": 1.0, "b": 0.0})
        da = layer(x) - y0
        dt.set_adapter_weights(model.module, {"a": 0.0, "b": 1.0})
        db = layer(x) - y0
        assert da.abs().max() > 1e-3 and db.abs().max() > 1e-3
        dt.set_adapter_weights(model.module, {"a": 0.7, "b": -0.4})
        torch.testing.assert_close(layer(x) - y0, 0.7 * da - 0.4 * db, atol=1e-5, rtol=1e-5)
        dt.fuse(model.module)
        assert layer.merged == ["a", "b"]
        torch.testing.assert_close(layer.base_layer(x) - y0, 0.7 * da - 0.4 * db, atol=1e-5, rtol=1e-5)
        dt.set_adapter_weights(model.module, {"a": 0.2, "b": 0.5})  # fused adapters are re-fused
        torch.testing.assert_close(layer(x) - y0, 0.2 * da + 0.5 * db, atol=1e-5, rtol=1e-5)
        dt.unfuse(model.module, "a")
        torch.testing.assert_close(layer.base_layer(x) - y0, 0.5 * db, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x) - y0, 0.2 * da + 0.5 * db, atol=1e-5, rtol=1e-5)


def check_delete_frees_parameters(method: str, kind: str) -> None:
    model = adapted(method, kind)
    dt.inject(model.module, config(method, model), name="b")
    refs = [weakref.ref(p) for p in adapter_parameters(model.module, "a")]
    kept = adapter_parameters(model.module, "b")
    assert refs
    dt.delete_adapter(model.module, "a")
    gc.collect()
    assert all(r() is None for r in refs)
    assert dt.list_adapters(model.module).keys() == {"b"}
    assert all(p is q for p, q in zip(kept, adapter_parameters(model.module, "b")))


CHECKS: dict[str, Callable[..., None]] = {
    f.__name__.removeprefix("check_"): f for f in (
        check_inject_changes_output_and_merge, check_weight_and_disable, check_only_the_adapter_trains,
        check_training_route, check_unmerge_restores_without_drift, check_save_load_round_trip,
        check_remove_restores_original_modules, check_two_adapters_combine, check_delete_frees_parameters)}


def run_check(name: str, method: str, kind: str, tmp_path: Any = None) -> None:
    if name == "save_load_round_trip":
        CHECKS[name](method, kind, tmp_path)
    else:
        CHECKS[name](method, kind)
