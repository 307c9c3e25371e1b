"""The contract every registered method honours, on nn.Linear, nn.Conv2d, the tiny UNet and the tiny DiT.

A method joins by registering and adding its test config to CASES (a test fails until it does).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import difftune as dt
from difftune.methods import METHODS, AdapterHost
from difftune.methods.model import adapter_parameters, hosts
from difftune.testing import randomize_adapter, tiny_dit, tiny_unet

# Per-method test config (non-default where it makes the tiny models meaningful) and merge tolerance.
CASES: dict[str, dict] = {
    "krona": {"a1": 2, "a2": 2},  # 2 divides every width of the tiny models (conv 4→6 and 6→2, linear 16→24→8)
    "lora": {"rank": 2, "alpha": 4.0},
    "sara": {"threshold": 0.05},  # selects 10-40% of the tiny models' entries
}
ATOL = {"krona": 1e-5, "lora": 1e-5, "sara": 1e-5}


class TinyLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 24)
        self.head = nn.Linear(24, 8)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)))


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x)))


def _linear(seed=0):
    torch.manual_seed(seed)
    return TinyLinear(), ["proj", "head"], (torch.randn(3, 16),), {}


def _conv(seed=0):
    torch.manual_seed(seed)
    return TinyConv(), ["conv", "out"], (torch.randn(2, 4, 8, 8),), {}


def _unet(seed=0):
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]))
    return tiny_unet(seed), ["to_q", "to_k", "to_v", "to_out.0"], inputs, {
        "encoder_hidden_states": torch.randn(2, 7, 32, generator=g)}


def _dit(seed=0):
    g = torch.Generator().manual_seed(1)
    model = tiny_dit(seed)
    size = model.config.sample_size
    inputs = (torch.randn(2, 4, size, size, generator=g),)
    return model, ["to_q", "to_k", "to_v", "to_out.0"], inputs, {
        "timestep": torch.tensor([10, 500]), "class_labels": torch.tensor([1, 3])}


MODELS = {"linear": _linear, "conv": _conv, "unet": _unet, "dit": _dit}


def _out(model, inputs, kwargs):
    with torch.no_grad():
        out = model(*inputs, **kwargs)
    return out.sample if hasattr(out, "sample") else out


def _config(method, targets):
    return METHODS[method](target_modules=targets, **CASES[method])


def _adapted(method, kind, name="a", seed=11, weight=1.0):
    model, targets, inputs, kwargs = MODELS[kind]()
    model.eval()
    dt.inject(model, _config(method, targets), name=name, weight=weight)
    randomize_adapter(model, name, seed=seed)
    return model, targets, inputs, kwargs


def _mergeable(method):
    model, targets, _, _ = _linear()
    dt.inject(model, _config(method, targets), name="probe")
    return all(h.adapters["probe"].mergeable for _, h in hosts(model))


ADAPTER_METHODS = sorted(m for m, cls in METHODS.items() if cls.is_adapter)


def test_every_method_has_a_case():
    assert set(ADAPTER_METHODS) == set(CASES), "add a CASES entry for each registered adapter method"


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", ADAPTER_METHODS)
class TestContract:
    def test_inject_changes_output_and_merge_matches(self, method, kind):
        model, targets, inputs, kwargs = MODELS[kind]()
        model.eval()
        base_out = _out(model, inputs, kwargs)
        dt.inject(model, _config(method, targets), name="a")
        randomize_adapter(model, "a", seed=11)
        assert any(isinstance(m, AdapterHost) for m in model.modules())
        unmerged = _out(model, inputs, kwargs)
        assert (unmerged - base_out).abs().max() > 1e-3
        if not _mergeable(method):
            with pytest.raises(dt.DifftuneError, match="cannot be merged"):
                dt.merge(model)
            return
        dt.merge(model)
        merged = _out(model, inputs, kwargs)
        torch.testing.assert_close(merged, unmerged, atol=ATOL[method], rtol=0)

    def test_unmerge_restores_weights_without_drift(self, method, kind):
        if not _mergeable(method):
            pytest.skip("not weight-space")
        model, *_ = _adapted(method, kind)
        originals = {n: h.base_layer.weight.detach().clone() for n, h in hosts(model)}
        for _ in range(100):
            dt.fuse(model)
            dt.unfuse(model)
        for n, h in hosts(model):
            w0 = originals[n]
            rel = (h.base_layer.weight - w0).norm() / w0.norm()
            assert rel <= 1e-6, n
        dt.fuse(model)
        assert any((h.base_layer.weight - originals[n]).abs().max() > 0 for n, h in hosts(model))

    def test_train_step_updates_only_the_adapter(self, method, kind):
        model, targets, inputs, kwargs = _adapted(method, kind)
        model.train()
        params = adapter_parameters(model, "a")
        before = [p.detach().clone() for p in params]
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen, "inject must freeze the base"
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        out = model(*inputs, **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        out.pow(2).mean().backward()
        assert all(p.grad is not None for p in params)
        opt.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, params))
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(frozen[n], p), n

    def test_save_load_round_trip(self, method, kind, tmp_path):
        model, targets, inputs, kwargs = _adapted(method, kind)
        expected = _out(model, inputs, kwargs)
        dt.save_adapter(model, tmp_path / "ad", name="a")
        fresh, *_ = MODELS[kind]()
        fresh.eval()
        for path in (tmp_path / "ad", tmp_path / "ad" / "adapter_model.safetensors"):
            dt.load_adapter(fresh, path, name="a")
            torch.testing.assert_close(_out(fresh, inputs, kwargs), expected, atol=0, rtol=0)
            dt.delete_adapter(fresh, "a")

    def test_remove_restores_original_modules(self, method, kind):
        model, targets, inputs, kwargs = MODELS[kind]()
        model.eval()
        before = dict(model.named_modules())
        base_out = _out(model, inputs, kwargs)
        dt.inject(model, _config(method, targets), name="a")
        randomize_adapter(model, "a", seed=3)
        if _mergeable(method):
            dt.merge(model)
        dt.remove(model)
        after = dict(model.named_modules())
        assert before.keys() == after.keys()
        assert all(before[k] is after[k] for k in before)
        torch.testing.assert_close(_out(model, inputs, kwargs), base_out, atol=0, rtol=0)

    def test_two_adapters_combine_linearly(self, method, kind):
        """Per adapted layer, w1·δ1 + w2·δ2 (unfused and fused); the whole network is not linear in w."""
        if not _mergeable(method):
            pytest.skip("activation-space adapters do not combine linearly")
        model, targets, _, _ = MODELS[kind]()
        dt.inject(model, _config(method, targets), name="a")
        dt.inject(model, _config(method, targets), name="b")
        randomize_adapter(model, "a", seed=1)
        randomize_adapter(model, "b", seed=2)
        _, layer = next(hosts(model))
        base = layer.base_layer
        x = torch.randn(5, base.in_features) if isinstance(base, nn.Linear) else torch.randn(1, base.in_channels, 6, 6)
        with torch.no_grad():
            y0 = base(x)
            dt.set_adapter_weights(model, {"a": 1.0, "b": 0.0})
            da = layer(x) - y0
            dt.set_adapter_weights(model, {"a": 0.0, "b": 1.0})
            db = layer(x) - y0
            assert da.abs().max() > 1e-3 and db.abs().max() > 1e-3
            dt.set_adapter_weights(model, {"a": 0.7, "b": -0.4})
            torch.testing.assert_close(layer(x) - y0, 0.7 * da - 0.4 * db, atol=1e-5, rtol=1e-5)
            dt.fuse(model)
            assert layer.merged == ["a", "b"]
            torch.testing.assert_close(layer.base_layer(x) - y0, 0.7 * da - 0.4 * db, atol=1e-5, rtol=1e-5)
            dt.set_adapter_weights(model, {"a": 0.2, "b": 0.5})  # fused adapters are re-fused with the new weights
            torch.testing.assert_close(layer(x) - y0, 0.2 * da + 0.5 * db, atol=1e-5, rtol=1e-5)
            dt.unfuse(model, "a")
            torch.testing.assert_close(layer.base_layer(x) - y0, 0.5 * db, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer(x) - y0, 0.2 * da + 0.5 * db, atol=1e-5, rtol=1e-5)

    def test_delete_frees_parameters(self, method, kind):
        model, *_ = _adapted(method, kind)
        dt.inject(model, _config(method, MODELS[kind]()[1]), name="b")
        refs = [weakref.ref(p) for p in adapter_parameters(model, "a")]
        kept = adapter_parameters(model, "b")
        assert refs
        dt.delete_adapter(model, "a")
        gc.collect()
        assert all(r() is None for r in refs)
        assert dt.list_adapters(model).keys() == {"b"}
        assert all(p is q for p, q in zip(kept, adapter_parameters(model, "b")))
