"""Deliberately broken methods must fail the contract (contract.py) or, for method-specific faults, their method's
own tests. Each mutant is applied with monkeypatch and the check that must catch it is run; the unbroken code passes
the same check in test_contract.py. This file is the project's mutation check: `pytest tests/methods/test_mutants.py`.

It also admits an activation-space method (``toy_act``, defined here): the whole contract passes on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import contract
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import difftune.methods.verbs as core
from difftune.methods import base
from difftune.methods.base import Adapter, MethodConfig, Site
from difftune.methods.host import AdapterHost


@dataclass
class ToyActConfig(MethodConfig):
    """out → out + w · s ⊙ tanh(out), s per output channel: acts on activations, has no ΔW."""

    target_modules: list[str] = field(default_factory=lambda: ["to_q"])

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        if isinstance(base_layer, nn.Linear):
            return ToyActAdapter(self, (base_layer.out_features,))
        if isinstance(base_layer, nn.Conv2d):
            return ToyActAdapter(self, (base_layer.out_channels, 1, 1))
        return None


class ToyActAdapter(Adapter):
    prefix = "act_"

    def __init__(self, config: ToyActConfig, shape: tuple[int, ...]) -> None:
        super().__init__(config)
        self.act_scale = nn.Parameter(torch.zeros(shape))

    def forward(self, x: Tensor, out: Tensor, weight: float | Tensor, base_layer: nn.Module,
                base: Mapping[str, Tensor]) -> Tensor:
        return out + weight * self.act_scale * torch.tanh(out)


@pytest.fixture
def toy_act():
    base.register_method("toy_act")(ToyActConfig)
    contract.CASES["toy_act"] = contract.Case({})
    yield "toy_act"
    del base.METHODS["toy_act"], contract.CASES["toy_act"]


@pytest.mark.parametrize("check", sorted(contract.CHECKS))
def test_the_contract_admits_an_activation_space_method(toy_act, check, tmp_path):
    for kind in contract.kinds(toy_act):
        contract.run_check(check, toy_act, kind, tmp_path)


def _fails(check: str, method: str, kind: str, tmp_path, match: str = "", errors: tuple = (AssertionError,)) -> None:
    """The check fails with one of ``errors`` whose message contains ``match`` (not some unrelated error)."""
    with pytest.raises(errors, match=match):
        contract.run_check(check, method, kind, tmp_path)


def test_base_biases_left_trainable_fail_the_contract(monkeypatch, tmp_path):
    inject = core.inject

    def leaky(model, config, name="default", weight=1.0, freeze_base=True):
        names = inject(model, config, name=name, weight=weight, freeze_base=freeze_base)
        for _, host in core.hosts(model):
            if getattr(host.base_layer, "bias", None) is not None:
                host.base_layer.bias.requires_grad_(True)
        return names

    monkeypatch.setattr(core, "inject", leaky)
    _fails("only_the_adapter_trains", "lora", "linear", tmp_path, match="left trainable")


def test_krona_ignoring_conv_stride_fails_the_contract(monkeypatch, tmp_path):
    from difftune.methods.krona import KronAAdapter

    def stride_one(self, x, base_layer):
        n, _, h, w = x.shape
        z = F.conv2d(x.reshape(n * self.a2, self.b2, h, w), self.krona_B, padding=base_layer.padding,
                     dilation=base_layer.dilation)  # the stride is lost
        z = z.view(n, self.a2, self.b1, *z.shape[-2:])
        y = torch.einsum("qr,nrphw->nqphw", self.krona_A, z)
        return y.reshape(n, self.a1 * self.b1, *y.shape[-2:]) * self.scale

    monkeypatch.setattr(KronAAdapter, "_conv_delta", stride_one)
    contract.run_check("inject_changes_output_and_merge", "krona", "conv", tmp_path)  # stride 1: still right
    # a strided conv's output is smaller than the unstrided ΔW·x: the sum fails on the shapes
    _fails("inject_changes_output_and_merge", "krona", "strided_conv", tmp_path, match="size of tensor",
           errors=(RuntimeError,))


@pytest.mark.parametrize("route", ["unfused", "weight_grad", "route_grad"])
def test_sara_routing_zero_gradients_fails_the_contract(route, monkeypatch, tmp_path):
    """Each of SaRA's gradient routes: `UnfusedLayer` (how it trains by default), and trained fused (its
    ``fused_training``) `WeightGrad` (a stock Linear/Conv2d) and `RouteGrad` (any parameter; taken here by making
    the Linear ineligible for the first)."""
    import dataclasses

    import difftune.methods.sara.adapter as sara_adapter
    import difftune.methods.sara.grads as sara_grads
    import difftune.methods.sara.training as sara_training
    import difftune.methods.sara.unfused as sara_unfused

    if route != "unfused":
        prepare = sara_training.prepare_sara
        monkeypatch.setattr(sara_training, "prepare_sara", lambda model, config, name: prepare(
            model, dataclasses.replace(config, fused_training=True), name))
    if route == "route_grad":
        monkeypatch.setattr(sara_adapter, "gradient_rule", lambda layer: False)
    node = {"unfused": sara_unfused.UnfusedLayer, "weight_grad": sara_grads.WeightGrad,
            "route_grad": sara_grads.RouteGrad}[route]
    deltas = {"unfused": (2,), "weight_grad": (2, 3), "route_grad": (0,)}[route]  # Δ's gradients in each backward
    original = node.backward

    def zero(ctx, grad):
        return tuple(torch.zeros_like(g) if g is not None and i in deltas else g
                     for i, g in enumerate(original(ctx, grad)))

    monkeypatch.setattr(node, "backward", staticmethod(zero))
    _fails("training_route", "sara", "linear", tmp_path, match="finite difference")


def test_activation_adapter_ignoring_its_weight_fails_the_contract(toy_act, monkeypatch, tmp_path):
    def unweighted(self, x, out, weight, base_layer, base):
        return out + self.act_scale * torch.tanh(out)

    monkeypatch.setattr(ToyActAdapter, "forward", unweighted)
    _fails("weight_and_disable", toy_act, "linear", tmp_path, match="not (close|equal)")


def test_disable_ignored_fails_the_contract(toy_act, monkeypatch, tmp_path):
    def active(self):
        return [(n, a, self.adapter_weights[n]) for n, a in self.adapters.items() if n not in self.merged]

    monkeypatch.setattr(AdapterHost, "active", active)
    _fails("weight_and_disable", toy_act, "conv", tmp_path, match="not (close|equal)")
    _fails("weight_and_disable", "lora", "dit", tmp_path, match="not (close|equal)")


def test_an_unexplained_merge_refusal_is_not_required(toy_act, tmp_path):
    """A correct activation-space adapter makes `dt.merge(model)` a no-op for itself rather than an error."""
    contract.run_check("inject_changes_output_and_merge", toy_act, "unet", tmp_path)


def test_lora_scale_doubled_fails_loras_own_tests(monkeypatch):
    import test_lora

    from difftune.methods.lora import LoRAConfig

    monkeypatch.setattr(LoRAConfig, "scale", property(lambda self: 2 * self.alpha / self.rank))
    with pytest.raises(AssertionError):
        test_lora.test_equals_peft_lora_on_identical_weights(use_rslora=False)


def test_an_adapter_reading_the_fused_weight_fails_the_contract(monkeypatch, tmp_path):
    """DoRA normalising ``base_layer.weight`` (W0 plus whatever else is fused) instead of the supplied W0."""
    from difftune.methods.lora import DoRAAdapter

    delta = DoRAAdapter.delta

    def live(self, x, base_layer, base):
        return delta(self, x, base_layer, {"weight": base_layer.weight})

    monkeypatch.setattr(DoRAAdapter, "delta", live)
    _fails("fused_neighbour_changes_nothing", "dora", "linear", tmp_path, match="not (close|equal)")


@pytest.mark.parametrize(("method", "kind"), [("dora", "conv"), ("ia3", "linear"), ("kind", "linear")])
def test_a_host_handing_out_the_fused_weight_fails_the_contract(monkeypatch, tmp_path, method, kind):
    """The host passing the live parameter as W0: every method whose ΔW or output depends on W0 notices."""

    def live(self, pname):
        return getattr(self.base_layer, pname)

    monkeypatch.setattr(AdapterHost, "base_value", live)
    _fails("fused_neighbour_changes_nothing", method, kind, tmp_path, match="not (close|equal)|changed")


def test_an_in_place_merge_that_drifts_fails_the_contract(monkeypatch, tmp_path):
    """peft's merge: W += w·ΔW on fuse, W -= w·ΔW on unfuse. Each cycle rounds, so W drifts (by ~1e-8 after 100
    cycles here, which a relative tolerance of 1e-6 let pass); `unfuse` promises W0 bit for bit."""
    from difftune.methods.host import BaseParams

    def add(host, names, sign):
        with torch.no_grad():
            live = BaseParams(host)
            for n in names:
                for p, d in host.adapters[n].delta_params(live).items():
                    param = getattr(host.base_layer, p)
                    param.add_(sign * host.adapter_weights[n] * d.to(param.dtype))

    def merge(self, names):
        names = [n for n in names if n not in self.merged]
        add(self, names, 1.0)
        self.merged.extend(names)

    def unmerge(self, names=None):
        drop = [n for n in self.merged if names is None or n in names]
        add(self, drop, -1.0)
        self.merged = [n for n in self.merged if n not in drop]

    monkeypatch.setattr(AdapterHost, "merge", merge)
    monkeypatch.setattr(AdapterHost, "unmerge", unmerge)
    _fails("unmerge_restores_without_drift", "lora", "linear", tmp_path, match="drifted")


def test_a_plugin_training_tensors_it_never_saves_fails_the_contract_and_the_trainer(monkeypatch, tmp_path):
    """A plugin that also trains the base biases: the run would complete with an adapter lacking the trained biases."""
    from difftune.methods.plugin import TrainerPlugin, check_trained_tensors_are_kept, plugin_for

    trainable = TrainerPlugin.trainable_parameters

    def with_biases(self, model):
        biases = [h.base_layer.bias for _, h in core.hosts(model) if getattr(h.base_layer, "bias", None) is not None]
        for b in biases:
            b.requires_grad_(True)
        return trainable(self, model) + biases

    monkeypatch.setattr(TrainerPlugin, "trainable_parameters", with_biases)
    _fails("training_route", "lora", "linear", tmp_path, match="saved result lacks trained values")
    model = contract.build("lora", "linear")
    plugin = plugin_for(contract.config("lora", model), "a")
    module = plugin.prepare(None, model.module)
    with pytest.raises(core.DifftuneError, match=r"trains 2 tensor\(s\) that its saved result would not hold.*"
                                                 r"proj\.base_layer\.bias"):
        check_trained_tensors_are_kept(plugin, module, plugin.trainable_parameters(module))
