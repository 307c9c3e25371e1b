"""The shared core: targeting, weights, enable/disable, low-precision fuse, nested hosts, activation-space methods."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

import difftune as dt
from difftune.methods import base, verbs
from difftune.methods.base import Adapter, MethodConfig, Site
from difftune.methods.host import AdapterHost
from difftune.targeting import canonical_name, find_targets, name_matches
from difftune.testing import randomize_adapter


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(x))


def test_pattern_rules():
    assert name_matches("down.0.attn1.to_q", "to_q")
    assert name_matches("down.0.attn1.to_out.0", "to_out.0")
    assert not name_matches("down.0.attn1.to_qk", "to_q")
    assert name_matches("down.0.attn2.to_k", r".*attn2\.to_[kv]")
    assert not name_matches("down.0.attn1.to_k", r".*attn2\.to_[kv]")
    assert find_targets(Net(), ["block.0", "head"], exclude_modules=["head"]) == ["block.0"]
    assert canonical_name("a.base_layer.b.base_layer") == "a.b"


def test_enable_disable():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 8)
    base_out = net(x)
    dt.inject(net, dt.LoRAConfig(target_modules=["head"]), name="a")
    randomize_adapter(net, "a")
    adapted = net(x)
    dt.disable_adapters(net, "a")
    torch.testing.assert_close(net(x), base_out, atol=0, rtol=0)
    assert not dt.list_adapters(net)["a"]["enabled"]
    dt.enable_adapters(net)
    torch.testing.assert_close(net(x), adapted, atol=0, rtol=0)
    dt.fuse(net)
    with pytest.raises(dt.DifftuneError, match="unmerge before disabling"):
        dt.disable_adapters(net, "a")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fuse_is_fp32_and_unfuse_exact(dtype):
    torch.manual_seed(0)
    net = Net().to(dtype)
    w0 = net.head.weight.detach().clone()
    dt.inject(net, dt.LoRAConfig(rank=2, target_modules=["head"]), name="a")
    randomize_adapter(net, "a", std=0.2)
    host = net.head
    a, b = host.adapters["a"].lora_A.float(), host.adapters["a"].lora_B.float()
    expected = (w0.float() + (b @ a) * host.adapters["a"].scale).to(dtype)  # computed in fp32, rounded once
    dt.fuse(net)
    assert host.base_layer.weight.dtype == dtype
    assert torch.equal(host.base_layer.weight, expected)
    for _ in range(100):
        dt.unfuse(net)
        dt.fuse(net)
    dt.unfuse(net)
    assert torch.equal(host.base_layer.weight, w0)


def test_remove_with_merge_bakes_the_update():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 8)
    dt.inject(net, dt.LoRAConfig(target_modules=["block.0", "head"]), name="a")
    dt.inject(net, dt.LoRAConfig(target_modules=["head"]), name="b", freeze_base=False)
    randomize_adapter(net, "a", seed=1)
    randomize_adapter(net, "b", seed=2)
    dt.set_adapter_weights(net, {"a": 0.5})
    expected = net(x).detach()
    dt.fuse(net, "b")
    dt.remove(net, "a", merge=True)
    assert isinstance(net.block[0], nn.Linear)  # a was its only adapter
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=0)
    dt.unfuse(net)  # b comes off exactly, a stays baked in
    dt.disable_adapters(net, "b")
    dt.enable_adapters(net, "b")
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=0)
    dt.remove(net)
    assert dict(net.named_modules()).keys() == dict(Net().named_modules()).keys()


# -- an activation-space method defined here, to show the core carries methods that wrap containers -------------


@dataclass
class GateConfig(MethodConfig):
    target_modules: list[str] = field(default_factory=lambda: ["block"])

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        return GateAdapter(self, base_layer.out_features if hasattr(base_layer, "out_features") else 8)


class GateAdapter(Adapter):
    prefix = "gate_"

    def __init__(self, config: GateConfig, dim: int) -> None:
        super().__init__(config)
        self.gate_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, out: Tensor, weight: float, base_layer: nn.Module,
                base: Mapping[str, Tensor]) -> Tensor:
        return out * (1 + weight * torch.tanh(self.gate_scale))


@pytest.fixture
def gate_method():
    base.register_method("gate_test")(GateConfig)
    yield GateConfig
    del base.METHODS["gate_test"]


def test_activation_method_nests_with_lora(gate_method, tmp_path):
    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 8)
    base_out = net(x)
    dt.inject(net, GateConfig(), name="g")
    dt.inject(net, dt.LoRAConfig(target_modules=["block.0", "block.2"]), name="l")  # inside the gated container
    assert isinstance(net.block.base_layer[0], AdapterHost)
    randomize_adapter(net, "g", seed=1)
    randomize_adapter(net, "l", seed=2)
    out = net(x)
    with pytest.raises(dt.DifftuneError, match="cannot be merged"):
        dt.fuse(net, "g")
    assert set(verbs.adapter_state_dict(net, "l")) == {"block.0.lora_A", "block.0.lora_B", "block.2.lora_A",
                                                       "block.2.lora_B"}
    dt.save_adapter(net, tmp_path / "g", name="g")
    dt.save_adapter(net, tmp_path / "l", name="l")
    # the other injection order gives the same canonical keys, so the files load either way
    fresh = Net()
    fresh.load_state_dict({canonical_name(k): v for k, v in net.state_dict().items() if ".adapters." not in k})
    dt.load_adapter(fresh, tmp_path / "l")
    dt.load_adapter(fresh, tmp_path / "g")
    torch.testing.assert_close(fresh(x), out, atol=1e-6, rtol=0)
    dt.fuse(fresh, "l")  # the weight-space adapter still fuses under the activation-space one
    torch.testing.assert_close(fresh(x), out, atol=1e-5, rtol=0)
    dt.remove(fresh)
    torch.testing.assert_close(fresh(x), base_out, atol=0, rtol=0)
    assert isinstance(fresh.block, nn.Sequential) and isinstance(fresh.block[0], nn.Linear)


def test_refused_fuse_changes_nothing(gate_method):
    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 8)
    dt.inject(net, dt.LoRAConfig(target_modules=["block.0"]), name="l")
    dt.inject(net, GateConfig(target_modules=["block.0"]), name="g")  # same host, activation-space
    randomize_adapter(net, "l", seed=1)
    randomize_adapter(net, "g", seed=2)
    out = net(x)
    with pytest.raises(dt.DifftuneError, match="cannot be merged"):
        dt.fuse(net, ["l", "g"])
    assert net.block[0].merged == [] and not dt.list_adapters(net)["l"]["fused"]
    torch.testing.assert_close(net(x), out, atol=0, rtol=0)
    dt.fuse(net)  # the default fuses what can be fused and leaves activation-space adapters running
    assert dt.list_adapters(net)["l"]["fused"] and not dt.list_adapters(net)["g"]["fused"]
    torch.testing.assert_close(net(x), out, atol=1e-5, rtol=0)
    dt.unfuse(net)
    dt.disable_adapters(net, "l")
    with pytest.raises(dt.DifftuneError, match="disabled"):
        dt.fuse(net, "l")


def test_bad_regex_is_named():
    with pytest.raises(dt.DifftuneError, match=r"'to_q\(' is neither a module name nor a valid regular expression"):
        dt.inject(Net(), dt.LoRAConfig(target_modules=["head", "to_q("]))
