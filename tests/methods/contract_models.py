"""The models the contract (contract.py) adapts: nn.Linear, nn.Conv2d, a strided/dilated Conv2d, the tiny UNet and the
tiny DiT, each with the patterns to target in it and the inputs of one forward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from difftune.testing import tiny_dit, tiny_unet


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
