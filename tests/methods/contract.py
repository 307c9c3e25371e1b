"""The contract every registered method honours, as plain check functions (test_contract.py runs them over every
method and model; test_mutants.py shows that deliberately broken methods fail them).

A method joins by adding a `Case` to CASES. A case names the method's test config and, where the standard models
do not suit it, its own targets, models and per-call inputs (e.g. a skip tuner targets the UNet's up-block resnets;
a class gate needs labels); a variant of a method (DoRA is ``lora`` with ``use_dora``) is a case of its own.
Weight-space adapters (those with ΔW) must merge exactly; activation-space ones must honour their weight and
`disable`, and refuse an explicit fuse. Every adapter must act on the true base weights: fusing another adapter into
its layers changes neither its output nor its ΔW.
"""

from __future__ import annotations

import gc
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from contract_models import MODELS, Model
from torch import nn

import difftune as dt
from difftune.methods import METHODS, AdapterHost
from difftune.methods.plugin import plugin_for
from difftune.methods.verbs import adapter_parameters, hosts, unmerge
from difftune.targeting import canonical_name
from difftune.testing import randomize_adapter


@dataclass
class Smoke:
    """How the trainer runs the method: its 2-step smoke run (tests/train/test_trainer.py) and its 2-process DDP run
    (tests/train/test_ddp.py), on the tiny pipelines of `difftune.testing`.

    Attributes:
        fields: the method's config fields for the run (``method: {name: <method>, **fields}``).
        trained: the suffix of a saved tensor that starts at zero, so non-zero means it trained; "" to compare the
            saved tensors with a fresh injection's instead (initialised from the base weights); None for methods that
            save a whole pipeline.
        kinds: the tiny pipelines it trains on ("sd", "dit").
        sets: extra ``--set`` overrides the run needs.
        ddp_sets: extra overrides for the DDP run only.
    """

    fields: dict[str, Any]
    trained: str | None
    kinds: tuple[str, ...] = ("sd", "dit")
    sets: tuple[str, ...] = ()
    ddp_sets: tuple[str, ...] = ()


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
        method: the registered method when the case is a variant of it under another key (default: the key).
        held: what the method treats as a constant in its backward pass by design, as a context manager that holds
            it at its current value (DoRA's norm, paper §4.3); the gradient check's finite difference runs inside it.
        smoke: how the trainer runs it (`Smoke`); every registered method has one, adapters or not.
    """

    config: dict[str, Any]
    atol: float = 1e-5
    models: list[str] | None = None
    targets: dict[str, list[str]] = field(default_factory=dict)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    builders: dict[str, Callable[..., Model]] = field(default_factory=dict)
    method: str | None = None
    held: Callable[[], AbstractContextManager] | None = None
    smoke: Smoke | None = None


@contextmanager
def dora_norms_held() -> Iterator[None]:
    """DoRA's ‖W0 + sBA‖ per output channel, detached in its forward: held at the values first computed."""
    from difftune.methods.lora import DoRAAdapter

    computed = DoRAAdapter.weight_norm
    held: dict[int, torch.Tensor] = {}

    def weight_norm(self, w0):
        return held.setdefault(id(self), computed(self, w0))

    DoRAAdapter.weight_norm = weight_norm
    try:
        yield
    finally:
        DoRAAdapter.weight_norm = computed


# A CSC adapter trains on images paired with conditions and needs a control image to generate (no validation images);
# SPM trains data-free.
_CSC_SETS = ("data.kind=control", "data.condition=canny", "validation.prompts=[]")
_SPM_SETS = ("data.kind=none", "data.num_samples=4", "data.path=''", "data.label_dropout=0.0")

CASES: dict[str, Case] = {
    # KIND (linears only): class labels pick tailor groups (the DiT's own [1, 3]; given per call to the linear model)
    "kind": Case({"learngenes": 4, "tailors_per_class": 2, "classes": [1, 3]}, models=["linear", "dit"],
                 inputs={"linear": {"class_labels": torch.tensor([1, 3, 3])}},
                 # SVD-initialised from the base weights: nothing starts at zero
                 smoke=Smoke({"learngenes": 2, "tailors_per_class": 1, "classes": [0, 3]}, "", kinds=("dit",))),
    # a dense Δ per parameter; on the UNet also its GroupNorm/LayerNorm scales and shifts and the conv biases
    "diff": Case({}, targets={"unet": ["to_q", "to_out.0", "norm1", "conv1", "proj_in"]},
                 smoke=Smoke({}, "diff_weight")),
    "krona": Case({"a1": 2, "a2": 2}, smoke=Smoke({"a1": 4, "a2": 4}, "krona_B")),  # 2 divides every tiny width
    "lora": Case({"rank": 2, "alpha": 4.0}, smoke=Smoke({"rank": 2}, "lora_B")),
    "dora": Case({"rank": 2, "alpha": 4.0, "use_dora": True}, method="lora", held=dora_norms_held),
    # α/r = 32: the product of two N(0, 0.1²)-factor products is small
    "loha": Case({"rank": 2, "alpha": 64.0}, smoke=Smoke({"rank": 2}, "hada_w2_b")),
    # the linear and conv models' second layer and the attention output scale their input, the others their output
    "ia3": Case({"feedforward_modules": ["head", "out", "to_out.0"]},
                smoke=Smoke({}, "")),  # l starts at ones: compared with a fresh injection
    # selects 10-40% of the tiny models' entries; the tiny 2-D weights are at most 64 wide, SaRA's default
    # rank_min_dim: without the DDP override its nuclear-norm term (the one that diverged in issue 31) never runs
    "sara": Case({"threshold": 0.05}, smoke=Smoke({"threshold": 0.02}, "sara_delta_weight",
                                                  ddp_sets=("method.rank_min_dim=16",))),
    # skip tuners on the UNet's up-block resnets; the CSC tuner's control image reaches its hint encoder per call
    "scedit": Case({}, models=["unet"], targets={"unet": [r"up_blocks\.\d+\.resnets\.\d+"]},
                   smoke=Smoke({}, "scedit_up.weight", kinds=("sd",))),
    "csc": Case({}, models=["unet"], targets={"unet": [r"up_blocks\.\d+\.resnets\.\d+"]},
                inputs={"unet": {"control": torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))}},
                smoke=Smoke({}, "csc_up.weight", kinds=("sd",), sets=_CSC_SETS)),
    # γ = 1: the contract sees the plain membrane (transport: test_spm.py)
    "spm": Case({"matching": "fixed"}, smoke=Smoke({"concepts": ["cat"], "sampling_steps": 3}, "spm_up",
                                                  kinds=("sd",), sets=_SPM_SETS)),
    # methods that add no adapter (they save a whole pipeline) run only through the trainer: no contract models
    "full": Case({}, models=[], smoke=Smoke({}, None)),
    # one plan for both: UNet fields for SD, drop_every for the DiT
    "bk": Case({}, models=[], smoke=Smoke({"plan": {"pairs": 1, "mid_block": False, "drop_every": 2}}, None)),
}


def adapter_methods() -> list[str]:
    return sorted(m for m, cls in METHODS.items() if cls.is_adapter)


def method_of(case: str) -> str:
    """The registered method a case exercises."""
    return CASES[case].method or case


def kinds(method: str) -> list[str]:
    case = CASES[method]
    return case.models if case.models is not None else [*MODELS, *case.builders]


def build(method: str, kind: str, seed: int = 0) -> Model:
    case = CASES[method]
    model = {**MODELS, **case.builders}[kind](seed)
    model.module.eval()
    if kind in case.targets:
        model.targets = case.targets[kind]
    return model


def config(method: str, model: Model) -> Any:
    return METHODS[method_of(method)](target_modules=model.targets, **CASES[method].config)


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
    moves only what the plugin trains, all of which the plugin's saved result holds: loaded into a fresh model it gives
    the trained model's output (a plugin training a tensor it never saves completes runs that lose its values)."""
    model = _float64(build(method, kind))
    frozen = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    plugin = plugin_for(config(method, model), "a")
    model.module = plugin.prepare(None, model.module)
    randomize_adapter(model.module, "a", seed=7, std=0.05)
    params = plugin.trainable_parameters(model.module)
    assert params, "the training route trains nothing"
    g = torch.Generator().manual_seed(3)
    with (CASES[method].held or nullcontext)():
        _check_gradient(method, kind, model, params, g)
    before = [p.detach().clone() for p in params]
    torch.optim.SGD(params, lr=1e-2).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    trained = run(method, kind, model)
    with tempfile.TemporaryDirectory() as tmp:
        saved = plugin.save_trained(None, model.module, Path(tmp) / "adapter", "", "")
        fresh = _float64(build(method, kind))
        dt.load_adapter(fresh.module, saved, name="a")
        diff = float((run(method, kind, fresh) - trained).abs().max())
    assert diff <= CASES[method].atol, f"the saved result lacks trained values (output differs by {diff:.3g})"
    unmerge(model.module)  # a route that merges for training (SaRA) must still restore the exact base
    for n, p in model.module.named_parameters():
        canon = n.replace(".base_layer", "")
        if canon in frozen and not any(p is q for q in params):
            assert torch.equal(frozen[canon], p), f"frozen {canon} changed"


def _check_gradient(method: str, kind: str, model: Model, params: list[nn.Parameter], g: torch.Generator) -> None:
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


def check_unmerge_restores_without_drift(method: str, kind: str) -> None:
    """100 fuse/unfuse cycles give back every base parameter bit for bit: `unfuse` promises the exact W0 (an in-place
    ``W += ΔW`` / ``W -= ΔW`` merge drifts by rounding and fails here)."""
    model = adapted(method, kind)
    if not weight_space(model.module, "a"):
        return
    originals = {(n, p): t.detach().clone() for n, h in hosts(model.module)
                 for p, t in h.base_layer.named_parameters(recurse=False)}
    for _ in range(100):
        dt.fuse(model.module)
        dt.unfuse(model.module)
    for n, h in hosts(model.module):
        for p, t in h.base_layer.named_parameters(recurse=False):
            assert torch.equal(t, originals[n, p]), f"{n}.{p} drifted by {(t - originals[n, p]).abs().max():.3g}"
    dt.fuse(model.module)
    assert any((h.base_layer.weight - originals[n, "weight"]).abs().max() > 0 for n, h in hosts(model.module))


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
    # the first Linear/Conv2d (a case may also adapt norms, which have no input width to draw x from)
    layer = next(h for _, h in hosts(model.module) if isinstance(h.base_layer, (nn.Linear, nn.Conv2d)))
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


def check_fused_neighbour_changes_nothing(method: str, kind: str) -> None:
    """With a LoRA fused into every Linear/Conv2d the adapter sits on, its output and ΔW are those it has with the
    LoRA unfused (it reads the true W0 the host supplies, not the fused weight); fusing it too gives the same output,
    and unfusing both restores the base weights bit for bit."""
    probe = adapted(method, kind)
    layers = [canonical_name(n) for n, h in hosts(probe.module) if "a" in h.adapters and (
        isinstance(h.base_layer, nn.Linear) or isinstance(h.base_layer, nn.Conv2d) and h.base_layer.groups == 1)]
    if not layers:
        return  # nothing a LoRA can share (e.g. a skip tuner on whole resnet blocks)
    # the LoRA goes in first, so unfused it runs before the adapter, as it does fused (an activation-space adapter
    # transforms whatever output reaches it)
    model = build(method, kind)
    dt.inject(model.module, dt.LoRAConfig(rank=2, target_modules=layers), name="o")
    randomize_adapter(model.module, "o", seed=4)
    dt.inject(model.module, config(method, model), name="a")
    randomize_adapter(model.module, "a", seed=11)
    originals = {n: {p: t.detach().clone() for p, t in h.base_layer.named_parameters(recurse=False)}
                 for n, h in hosts(model.module)}
    weight_space_a = weight_space(model.module, "a")

    def deltas() -> dict[str, dict[str, torch.Tensor]]:
        with torch.no_grad():
            return {n: h.adapters["a"].delta_params(h.base_params()) for n, h in hosts(model.module)
                    if "a" in h.adapters} if weight_space_a else {}

    unfused, delta = run(method, kind, model), deltas()
    dt.fuse(model.module, "o")
    assert_equal(run(method, kind, model), unfused, CASES[method].atol)
    for n, d in deltas().items():  # the same W0 (the kept original), so the same ΔW bit for bit
        assert all(torch.equal(d[p], delta[n][p]) for p in d), f"the ΔW of {n} changed with a LoRA fused beside it"
    if weight_space_a:
        dt.fuse(model.module, "a")
        assert_equal(run(method, kind, model), unfused, CASES[method].atol)
    dt.unfuse(model.module)
    for n, h in hosts(model.module):
        for p, t in h.base_layer.named_parameters(recurse=False):
            assert torch.equal(t, originals[n][p]), f"{n}.{p} is not restored exactly"


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
        check_remove_restores_original_modules, check_two_adapters_combine, check_fused_neighbour_changes_nothing,
        check_delete_frees_parameters)}


def run_check(name: str, method: str, kind: str, tmp_path: Any = None) -> None:
    if name == "save_load_round_trip":
        CHECKS[name](method, kind, tmp_path)
    else:
        CHECKS[name](method, kind)
