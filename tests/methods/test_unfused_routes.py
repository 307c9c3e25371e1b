"""The unfused forwards of LoHa, (IA)³ and diff without a second full-size product: LoHa's ΔW·x as U (V x) (its
rank-r² Khatri–Rao form), (IA)³ and diff replacing the base output at weight 1 (`Adapter.replace_output`). Each new
route is compared with the route it replaced (outputs and gradients, at weight 1, another weight and per-item
weights) at a tolerance a real bug exceeds by orders of magnitude (the adapters change the outputs by ~1, and a
mis-paired Khatri–Rao product is shown to fail it), and shown not to run the product twice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import difftune as dt
import difftune.methods.base as base_module
import difftune.methods.diff as diff_module
import difftune.methods.ia3 as ia3_module
from difftune.methods.base import Adapter
from difftune.methods.diff import DiffAdapter, DiffConfig
from difftune.methods.ia3 import IA3Adapter
from difftune.methods.loha import LoHaAdapter

TARGETS = ["lin", "conv", "nobias"]
ATOL, RTOL = 2e-5, 1e-5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(24, 16)
        self.conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.nobias = nn.Linear(16, 24, bias=False)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.nobias(self.lin(x)), self.conv(img)


CONFIGS = {
    "loha": dt.LoHaConfig(rank=2, alpha=3.0, target_modules=TARGETS),
    "ia3 (outputs)": dt.IA3Config(target_modules=TARGETS, feedforward_modules=[]),
    "ia3 (inputs)": dt.IA3Config(target_modules=TARGETS, feedforward_modules=TARGETS),
    "diff": DiffConfig(target_modules=TARGETS),
    "diff (weight only)": DiffConfig(target_modules=TARGETS, params=["weight"]),
}


def _old_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routes before this change: LoHa's dense ΔW·x (`Adapter.delta`), and the host's ``base(x) + δ(x)``."""
    monkeypatch.setattr(LoHaAdapter, "delta", Adapter.delta)
    monkeypatch.setattr(IA3Adapter, "replace_output", Adapter.replace_output)
    monkeypatch.setattr(DiffAdapter, "replace_output", Adapter.replace_output)


def _adapted(config: dt.MethodConfig) -> Net:
    torch.manual_seed(0)
    net = Net()
    dt.inject(net, config, name="a")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if ".adapters." in n:  # values that change each output by ~1 (IA³: l around 1)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "ia3_" in n else 0.0))
    return net


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 5, 24, generator=g), torch.randn(2, 6, 9, 9, generator=g)


def _run(net: Net, weight: float | list[float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs and the gradients of the adapter's tensors, at a global or per-item weight."""
    x, img = _inputs()
    params = [p for n, p in net.named_parameters() if ".adapters." in n]
    for p in params:
        p.grad = None
    if isinstance(weight, list):
        context = dt.adapter_inputs(adapter_weights={"a": weight})
    else:
        dt.set_adapter_weights(net, {"a": weight})
        context = dt.adapter_inputs()
    with context:
        outs = net(x, img)
    sum(o.square().mean() for o in outs).backward()
    return [o.detach() for o in outs], [p.grad.clone() for p in params]


@pytest.mark.parametrize("weight", [1.0, 0.6, [1.0, 0.3]], ids=["weight 1", "weight 0.6", "per-item"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_the_new_route_is_the_old_one(monkeypatch, method, weight):
    net = _adapted(CONFIGS[method])
    outs, grads = _run(net, weight)
    dt.disable_adapters(net, "a")
    with torch.no_grad():
        bare = net(*_inputs())
    dt.enable_adapters(net, "a")
    # the adapter moves every output by far more than the tolerance: a wrong term or a dropped one fails it
    assert all((o - b).abs().max() > 1000 * ATOL for o, b in zip(outs, bare))
    _old_route(monkeypatch)
    want, want_grads = _run(net, weight)
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, atol=ATOL, rtol=RTOL)
    assert len(grads) == len(want_grads) and all(g.abs().max() > 0 for g in grads)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_weight_one_runs_no_second_full_size_product(monkeypatch, method):
    """W0 x (IA³) or ΔW·x (LoHa's dense ΔW, diff's Δ) once more, with another weight: each went through
    `apply_weight`, which now never runs at weight 1; nor is LoHa's dense ΔW built."""
    net = _adapted(CONFIGS[method])

    def refuse(*args: object) -> None:
        raise AssertionError("a second full-size product")

    for module in (base_module, ia3_module, diff_module):
        monkeypatch.setattr(module, "apply_weight", refuse)
    monkeypatch.setattr(LoHaAdapter, "delta_weight", refuse)
    outs, _ = _run(net, 1.0)
    assert len(outs) == 2


def test_loha_factors_are_its_delta_weight_and_a_mispairing_fails_the_tolerance():
    net = _adapted(CONFIGS["loha"])
    for name in TARGETS:
        adapter = getattr(net, name).adapters["a"]
        assert adapter.factored
        up, down = adapter.low_rank_factors()
        dw = adapter.delta_weight(None).flatten(1)
        torch.testing.assert_close(up @ down, dw, atol=ATOL, rtol=RTOL)
        # the Khatri–Rao columns paired the other way round (w1a_i ⊙ w2a_j with w1b_j ⊙ w2b_i): a plausible bug
        r = adapter.hada_w1_a.shape[1]
        swapped = down.view(r, r, -1).transpose(0, 1).reshape(down.shape)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(up @ swapped, dw, atol=ATOL, rtol=RTOL)


def test_loha_keeps_the_dense_route_where_the_factors_cost_more(monkeypatch):
    """r² (d_out + d_in) ≥ d_out d_in: rank 8 on a 16 × 24 layer (64·40 > 384) computes ΔW·x as before, bit for bit."""
    net = _adapted(dt.LoHaConfig(rank=8, alpha=3.0, target_modules=["lin"]))
    adapter = net.lin.adapters["a"]
    assert not adapter.factored
    outs, grads = _run(net, 0.6)
    _old_route(monkeypatch)
    want, want_grads = _run(net, 0.6)
    for got, w in zip(outs + grads, want + want_grads):
        torch.testing.assert_close(got, w, atol=0, rtol=0)


class OwnForward(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_diff_takes_the_host_route_where_one_product_would_differ():
    """fp16/bf16 weights (W0 + Δ would round a small Δ away), a Linear subclass with its own forward (F.linear is
    not what it computes), and a Δ of the bias only (nothing to save)."""
    for layer, params in ((nn.Linear(8, 4).half(), ["weight", "bias"]), (nn.Linear(8, 4).bfloat16(), ["weight"]),
                          (OwnForward(8, 4), ["weight", "bias"]), (nn.Linear(8, 4), ["bias"])):
        model = nn.Sequential(layer)
        dt.inject(model, DiffConfig(target_modules=["0"], params=params), name="a")
        host = model[0]
        x = torch.randn(3, 8, dtype=layer.weight.dtype)
        assert host.adapters["a"].replace_output(x, host.base_layer, host.base_params()) is None
    model = nn.Sequential(OwnForward(8, 4))
    dt.inject(model, DiffConfig(target_modules=["0"]), name="a")
    with torch.no_grad():
        model[0].adapters["a"].diff_weight.fill_(0.1)
        x = torch.randn(3, 8)
        want = model[0].base_layer(x) + x.sum(-1, keepdim=True) * 0.1  # its own forward, then ΔW x
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)


def test_ia3_under_autocast_scales_by_l_in_its_own_dtype():
    """fp32 weights and l, bf16 autocast: l = 1.003 is 1 in bf16, so scaling by a bf16 l would change nothing; the
    route multiplies by the fp32 l and rounds the product once."""
    layer = nn.Linear(32, 64)
    model = nn.Sequential(layer)
    dt.inject(model, dt.IA3Config(target_modules=["0"], feedforward_modules=[]), name="a")
    with torch.no_grad():
        model[0].adapters["a"].ia3_l.fill_(1.003)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, y = model(x), layer(x)
    assert got.dtype == y.dtype == torch.bfloat16
    torch.testing.assert_close(got, (y.float() * 1.003).to(torch.bfloat16), atol=0, rtol=0)
    assert (got != y).float().mean() > 0.2  # the scale shows in the bf16 output
