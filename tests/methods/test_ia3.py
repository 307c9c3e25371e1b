"""(IA)³: equality with peft's IA3 (output scaling, feed-forward input scaling, merged weights and biases), ΔW from the
supplied W0, init, config validation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import difftune as dt


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_k = nn.Linear(20, 12)
        self.ff = nn.Linear(12, 20)
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.conv_ff = nn.Conv2d(5, 4, 1)

    def forward(self, x, img):
        return self.ff(self.to_k(x)), self.conv_ff(self.conv(img))


TARGETS = ["to_k", "ff", "conv", "conv_ff"]
FEEDFORWARD = ["ff", "conv_ff"]


def test_equals_peft_ia3_on_identical_weights():
    from peft import IA3Config, inject_adapter_in_model

    torch.manual_seed(0)
    ours = Net()
    theirs = inject_adapter_in_model(IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD,
                                               init_ia3_weights=False), copy.deepcopy(ours))
    dt.inject(ours, dt.IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD))
    x, img = torch.randn(4, 20), torch.randn(2, 3, 9, 9)
    base = [y.detach() for y in ours(x, img)]
    with torch.no_grad():
        for mod in TARGETS:
            a, theirs_l = getattr(ours, mod).adapters["default"], getattr(theirs, mod).ia3_l["default"]
            assert a.ia3_l.shape == theirs_l.shape and a.feedforward == (mod in FEEDFORWARD)
            a.ia3_l.copy_(theirs_l)
        for got, want, b in zip(ours(x, img), theirs(x, img), base):
            assert (want - b).abs().max() > 1e-2
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        w0 = {m: {p: t.detach().clone() for p, t in getattr(ours, m).base_layer.named_parameters()} for m in TARGETS}
        deltas = {m: getattr(ours, m).adapters["default"].delta_params(w0[m]) for m in TARGETS}
        theirs.apply(lambda m: m.merge() if hasattr(m, "ia3_l") else None)  # peft writes l·W (and l·b) in place
        for m in TARGETS:
            layer = getattr(theirs, m).base_layer
            assert deltas[m].keys() == ({"weight"} if m in FEEDFORWARD else {"weight", "bias"})
            for p, d in deltas[m].items():
                torch.testing.assert_close(w0[m][p] + d, getattr(layer, p), atol=1e-6, rtol=1e-6)


def test_delta_follows_the_supplied_w0_not_the_layer():
    from difftune.methods.ia3 import IA3Adapter

    layer = nn.Linear(6, 4)
    adapter = IA3Adapter(layer, dt.IA3Config(target_modules=["0"]), feedforward=False)
    with torch.no_grad():
        adapter.ia3_l.copy_(torch.tensor([[2.0], [0.5], [1.0], [0.0]]))
    w0 = torch.randn(4, 6)
    want = torch.tensor([1.0, -0.5, 0.0, -1.0])[:, None] * w0  # (diag(l) − I) W0
    torch.testing.assert_close(adapter.delta_weight(w0), want, atol=0, rtol=0)


def test_a_fresh_ia3_changes_nothing():
    torch.manual_seed(0)
    net = Net()
    x, img = torch.randn(2, 20), torch.randn(1, 3, 8, 8)
    before = net(x, img)
    dt.inject(net, dt.IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD))
    assert all(bool((a.adapters["default"].ia3_l == 1).all()) for a in (net.to_k, net.ff, net.conv, net.conv_ff))
    for a, b in zip(before, net(x, img)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert dt.trainable_parameter_count(net) == 12 + 12 + 5 + 5  # d_out, d_in, C_out, C_in


@pytest.mark.parametrize(("value", "match"), [([""], "`feedforward_modules`"), ([3], "`feedforward_modules`"),
                                              ("(a+)*", "'\\(a\\+\\)\\*' is refused")])
def test_bad_feedforward_modules_are_refused(value, match):
    with pytest.raises(dt.DifftuneError, match=match):
        dt.IA3Config(feedforward_modules=value)
