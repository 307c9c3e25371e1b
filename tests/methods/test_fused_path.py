"""A fused host adds nothing to the forward but its own Python: the fused model's transformer blocks (where every
host is) call exactly the torch functions the bare model's call (same ones, same count), for every mergeable method
the overhead bench times on a DiT. (The model-level input capture, once per call, reads the batch size: two tensor
attribute reads, not counted here.)"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

import difftune as dt
from difftune.methods.diff import DiffConfig
from difftune.methods.verbs import hosts
from difftune.testing import randomize_adapter, tiny_dit


class Calls(TorchFunctionMode):
    """Counts every torch function and tensor method called inside the block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names[getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))] += 1
        return func(*args, **(kwargs or {}))


def _calls(model: torch.nn.Module) -> tuple[collections.Counter[str], torch.Tensor]:
    """The calls of the model's transformer blocks on one input, and their output."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 16, model.config.num_attention_heads * model.config.attention_head_dim, generator=g)
    with torch.no_grad(), Calls() as calls:
        for block in model.transformer_blocks:
            h = block(h, timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 3]))
    return calls.names, h


@pytest.mark.parametrize("config", [dt.LoRAConfig(rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                                    dt.LoHaConfig(rank=2), dt.IA3Config(), DiffConfig()],
                         ids=["lora", "loha", "ia3", "diff"])
def test_a_fused_model_calls_what_the_bare_model_calls(config):
    bare = tiny_dit(0).eval()
    fused = copy.deepcopy(bare)
    dt.inject(fused, config, name="a")
    randomize_adapter(fused, "a", seed=0, std=0.05)
    dt.fuse(fused)
    assert all(n.startswith("transformer_blocks.") for n, _ in hosts(fused))
    want, bare_out = _calls(bare)
    got, fused_out = _calls(fused)
    assert sum(want.values()) > 100 and (fused_out - bare_out).abs().max() > 1e-4  # it is fused, and counted
    assert got == want
