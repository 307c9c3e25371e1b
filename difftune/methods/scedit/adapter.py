"""SCEdit: efficient and controllable editing of the UNet's skip connections (Jiang et al., CVPR 2024, arXiv
2312.11392); official code modelscope/scepter (``scetuning.py``, ``unet_module.py``) and modelscope/swift.

The decoder of a UNet concatenates each encoder feature x_j (B, C_j, H_j, W_j) with its own path h. SCEdit edits
only x_j, so the encoder is never differentiated: with the base frozen no activation of the down blocks needs a
gradient, and backward stops at the skips (tested with hooks on the down blocks).

**SC-Tuner** (method ``scedit``), per skip j, per spatial token (1×1 convolutions)::

    T_j(x) = W_up · GELU(W_down · x + b_down) + b_up,   W_down: (L, C_j), W_up: (C_j, L), L = int(C_j · down_ratio)
    x'_j = x_j + s · T_j(x_j)                            s = the adapter weight (scepter's ``tuner_scale``)

W_down is Kaiming-uniform (a = √5, torch's default), W_up and b_up are zero: a new tuner is the identity.
Parameters Σ_j (2 C_j L_j + L_j + C_j): 19,680,000 on SD1.5/2.1 with down_ratio 1 (12 skips, tested).

**CSC-Tuner** (method ``csc``): a condition image c (B, 3, 8h, 8w) goes through a "pre-hint" stack of 3×3 convs
with SiLU between (3→16→16→32(s2)→32→96(s2)→96→P(s2), P = 256; channels × ``pre_hint_ratio``), giving (B, P, h, w)
at the latent resolution, then through a cascade of dense-hint blocks, one per encoder feature in encoder order,
each SiLU + a zero-initialised conv of kernel k (``hint_kernel``) from the previous hint's channels to C_j, stride 2
where the encoder downsamples: c_j (B, C_j, H_j, W_j). Each skip then gets its own tuner T_j::

    x'_j = x_j + s · [c_j + T_j(x_j + c_j)]              (= (x_j + c_j) + T_j(x_j + c_j) at s = 1)

With 3×3 hints SD1.5 has 348,880 (pre-hint) + 79,082,880 (dense) + 19,680,000 (tuners) = 99,111,760 parameters.

Wiring (module replacement, no patched forward): the adapters live on ``up_blocks.*.resnets.*`` (each resnet's
input is cat([h, x_j]) along channels); `pre_forward` splits the last C_j channels off, edits them and
re-concatenates. The hint encoder is the CSC adapter's model-level part; it encodes its control image once per
denoiser call, lazily, when the first active layer asks (so a disabled CSC adapter needs no image).

The control image: per-call input ``control``, a (B, 3, H, W) tensor in [0, 1] (1 channel is repeated), or a mapping
``{adapter name: tensor}`` when several CSC adapters need different images. A batch of 1 or of the prompts is
repeated to the denoiser's batch (the guidance halves are consecutive copies). A CSC adapter that runs without one
raises a `DifftuneError`.

Deliberate deviations from scepter:
- the control image is resized (bilinear) to 8× the latent size before the pre-hint stack, so the hints match the
  skips for any VAE factor (sd-mini's VAE downsamples 4×; SD's 8× images pass unchanged);
- several adapters on one skip compose in injection order (each edits the skip the previous one left); scepter sums
  every CSC term and the SC term over the unedited skip. Equal when at most one adapter is active per skip or when
  the tuners are small; the pipeline injects the SC-Tuner last, so CSC tuners see the unedited skip as in scepter;
- scepter switches between "CSC only" and "CSC + SC" by testing whether the SC tuner output is ≈ 0 (atol 1e-6);
  here every adapter simply contributes w · its term.
- ``skips`` counts decoder positions in up-block resnet order (SWIFT's convention), not scepter's encoder order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import DifftuneError, bad_value
from ..base import Adapter, MethodConfig, Site, register_method

UP_RESNETS = r"up_blocks\.\d+\.resnets\.\d+"
#: P beyond this is a typo (SD uses 256, SDXL 320); each hint conv holds P·C·k² weights
MAX_HINT_CHANNELS = 4096


def encoder_skips(config: Any) -> list[tuple[int, bool]]:
    """(channels, made by a downsampler) of every encoder feature a diffusers UNet2DConditionModel passes to its
    decoder, in encoder order: conv_in, each down block's resnets, then its downsampler (all blocks but the last)."""
    widths = list(config.block_out_channels)
    lpb = config.layers_per_block
    lpb = [lpb] * len(widths) if isinstance(lpb, int) else list(lpb)
    skips = [(widths[0], False)]
    for i, w in enumerate(widths):
        skips += [(w, False)] * lpb[i] + ([(w, True)] if i < len(widths) - 1 else [])
    return skips


def decoder_index(model: nn.Module, site: Site) -> int:
    """The skip's position in decoder order (0 = the deepest) of the resnet at ``site``."""
    block, resnet = site.index("up_blocks"), site.index("resnets")
    if block is None or resnet is None or not hasattr(model, "up_blocks"):
        raise DifftuneError(f"SCEdit adapts UNet up-block resnets (up_blocks.<i>.resnets.<j>); {site.name!r} is "
                            "not one")
    return sum(len(model.up_blocks[b].resnets) for b in range(block)) + resnet


def skip_patterns(skips: list[int], resnets_per_block: int = 3) -> list[str]:
    """Target patterns for decoder skip indices, on UNets with 3 resnets per up block (SD1.x, SD2.x, SDXL)."""
    return [rf"up_blocks\.{k // resnets_per_block}\.resnets\.{k % resnets_per_block}" for k in skips]


def refuse_transformers(method: str, model: nn.Module) -> None:
    """SCEdit and CSC tune a UNet's skip connections; a transformer denoiser (DiT, PixArt, SD3, Flux) has none."""
    kind = type(model).__name__
    if kind.endswith("Transformer2DModel") and not hasattr(model, "up_blocks"):
        raise DifftuneError(
            f"method {method!r} edits a UNet's skip connections (the encoder features its up-block resnets take); "
            f"{kind} is a transformer and has no skip connections to tune. On a transformer use LoRA, LoHa, KronA, "
            "SaRA or full fine-tuning (their MMDiT default targets: docs/sd3-flux.md)"
            + ("; difftune has no control-image method for transformers" if method == "csc" else ""))


def _check_common(cfg: Any) -> None:
    cfg.check_types()
    if not 0 < cfg.down_ratio <= 4:
        raise bad_value("down_ratio", cfg.down_ratio, "a number in (0, 4]",
                        "L = int(C·down_ratio); 1.0 is the paper's.")
    if cfg.skips is not None:
        ok = isinstance(cfg.skips, list) and cfg.skips and all(isinstance(k, int) and not isinstance(k, bool)
                                                             and k >= 0 for k in cfg.skips)
        if not ok or len(set(cfg.skips)) != len(cfg.skips):
            raise bad_value("skips", cfg.skips, "null (all skips) or a list of distinct decoder indices >= 0",
                            "SD1.x/2.x have skips 0-11 and SDXL 0-8, 0 being the deepest (up_blocks.0.resnets.0).")
        cfg.target_modules = skip_patterns(sorted(cfg.skips))


def _check_site(cfg: Any, site: Site) -> int:
    """The decoder index of ``site``; with ``skips`` set, the model must have the SD layout the patterns assume."""
    k = decoder_index(site.model, site)
    if cfg.skips is not None and any(len(b.resnets) != 3 for b in site.model.up_blocks):
        raise bad_value("skips", cfg.skips, "skips of a UNet with 3 resnets per up block (SD1.x, SD2.x, SDXL)",
                        "On other layouts select the resnets with `target_modules` instead.")
    return k


class _TunerMixin:
    """T(x) = up(GELU(down(x))) with 1×1 convolutions: the per-token MLP of the paper, without a permute."""

    @staticmethod
    def _make(width: int, ratio: float, device: torch.device) -> tuple[nn.Conv2d, nn.Conv2d]:
        inner = int(width * ratio)
        if inner < 1:
            raise bad_value("down_ratio", ratio, f"large enough that int({width}·down_ratio) >= 1")
        down = nn.Conv2d(width, inner, 1, device=device)  # torch's default init: Kaiming-uniform a=√5, as scepter
        up = nn.Conv2d(inner, width, 1, device=device)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        return down, up


@register_method("scedit")
@dataclass
class SCEditConfig(MethodConfig):
    """SC-Tuner hyperparameters (the inference scale s is the adapter weight).

    Attributes:
        down_ratio: L / C, the tuner's hidden width relative to the skip's channels (scepter ``DOWN_RATIO``, 1.0).
        skips: decoder skip indices to tune (scepter/SWIFT ``USE_LAYERS``), None = all (12 on SD1.x/2.x, 9 on SDXL).
    """

    target_modules: list[str] = field(default_factory=lambda: [UP_RESNETS])
    down_ratio: float = 1.0
    skips: list[int] | None = None

    def __post_init__(self) -> None:
        _check_common(self)
        super().__post_init__()

    def check_model(self, model: nn.Module) -> None:
        refuse_transformers("scedit", model)

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        k = _check_site(self, site)
        width = encoder_skips(site.model.config)[::-1][k][0]
        return SCEditAdapter(self, width, _device(base_layer))


class SCEditAdapter(Adapter, _TunerMixin):
    """x = cat(h, x_j) → cat(h, x_j + w·T(x_j)) on one up-block resnet's input."""

    prefix = "scedit_"

    def __init__(self, config: SCEditConfig, width: int, device: torch.device) -> None:
        super().__init__(config)
        self.width = width
        self.scedit_down, self.scedit_up = self._make(width, config.down_ratio, device)

    def pre_forward(self, x: Tensor, weight: float | Tensor) -> Tensor:
        h, s = x[:, : -self.width], x[:, -self.width:]  # (B, C_h, H, W), (B, C_j, H, W)
        t = self.scedit_up(F.gelu(self.scedit_down(s.to(self.scedit_down.weight.dtype))))
        return torch.cat([h, s + weight * t.to(s.dtype)], dim=1)


@register_method("csc")
@dataclass
class CSCConfig(MethodConfig):
    """CSC-Tuner hyperparameters (the control scale is the adapter weight).

    Attributes:
        down_ratio: L / C of each skip's tuner (scepter ``DOWN_RATIO``, 1.0).
        skips: decoder skip indices to tune, None = all. The hint cascade is always built whole (it feeds itself).
        hint_kernel: k of the dense-hint convs: 3 (default) = scepter's released ``DENSE_HINT_KERNAL`` and its
            checkpoints (99,111,760 parameters on SD1.5); 1 = the size the paper's "7.9 % of ControlNet" implies.
        pre_hint_channels: P, the pre-hint stack's output channels (256 for SD1.x/2.x, 320 for SDXL).
        pre_hint_ratio: multiplier of the stack's inner widths 16/32/96 (scepter ``PRE_HINT_DIM_RATIO``; SDXL 2.0).
    """

    target_modules: list[str] = field(default_factory=lambda: [UP_RESNETS])
    down_ratio: float = 1.0
    skips: list[int] | None = None
    hint_kernel: int = 3
    pre_hint_channels: int = 256
    pre_hint_ratio: float = 1.0

    def __post_init__(self) -> None:
        _check_common(self)
        super().__post_init__()
        if self.hint_kernel not in (1, 3):
            raise bad_value("hint_kernel", self.hint_kernel, "1 or 3", "3 as released by scepter; 1 is ~4× smaller.")
        if not 1 <= self.pre_hint_channels <= MAX_HINT_CHANNELS or not 0 < self.pre_hint_ratio <= 8:
            raise bad_value("pre_hint_channels/pre_hint_ratio", (self.pre_hint_channels, self.pre_hint_ratio),
                            f"channels in [1, {MAX_HINT_CHANNELS}] and a ratio in (0, 8]",
                            "SD: 256 and 1.0; SDXL: 320 and 2.0.")

    def probe_inputs(self, name: str) -> tuple[int, dict[str, Any]]:
        # an 8x8 control image for a 1x1 latent: the hint encoder's three stride-2 convs bring every hint to 1x1, the
        # size of the loader's probe of each tuner
        control = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        return 1, {"control": {name: control}, "sample": torch.zeros(1, 4, 1, 1)}

    def check_model(self, model: nn.Module) -> None:
        refuse_transformers("csc", model)

    def make_model_part(self, model: nn.Module) -> nn.Module:
        if not hasattr(model, "up_blocks") or not hasattr(getattr(model, "config", None), "block_out_channels"):
            raise DifftuneError("method 'csc' adapts diffusers UNets (UNet2DConditionModel); got "
                                f"{type(model).__name__}")
        return HintEncoder(self, encoder_skips(model.config), _device(model))

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        k = _check_site(self, site)
        width = encoder_skips(site.model.config)[::-1][k][0]
        return CSCAdapter(self, width, k, _device(base_layer))


class HintEncoder(nn.Module):
    """The CSC adapter's model-level part: control image → one hint per skip (built lazily once per call)."""

    prefix = "csc_"

    def __init__(self, config: CSCConfig, skips: list[tuple[int, bool]], device: torch.device) -> None:
        super().__init__()
        r, p = config.pre_hint_ratio, config.pre_hint_channels
        widths = [3, int(16 * r), int(16 * r), int(32 * r), int(32 * r), int(96 * r), int(96 * r), p]
        strides = [1, 1, 2, 1, 2, 1, 2]
        layers: list[nn.Module] = []
        for i, s in enumerate(strides):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, stride=s, padding=1, device=device)]
            layers += [nn.SiLU()] if i < len(strides) - 1 else []
        self.csc_pre_hint = nn.Sequential(*layers)  # (B, 3, 8h, 8w) -> (B, P, h, w)
        dense, ch, k = [], p, config.hint_kernel
        for width, down in skips:
            conv = nn.Conv2d(ch, width, k, stride=2 if down else 1, padding=k // 2, device=device)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            dense.append(nn.Sequential(nn.SiLU(), conv))
            ch = width
        self.csc_dense = nn.ModuleList(dense)
        self._hints: list[Tensor] | None = None
        # set by `inject` (the key of this part in model.difftune_parts): which control image is ours
        self.adapter_name: str | None = None

    def begin_call(self, inputs: Mapping[str, Any]) -> None:
        self._hints = None  # encoded when the first active layer of this call asks (`hint`)

    def hint(self, k: int, inputs: Mapping[str, Any], like: Tensor) -> Tensor:
        """The hint c_j for decoder skip ``k``, shaped and typed like ``like`` (B, C_j, H_j, W_j)."""
        if self._hints is None:
            self._hints = self.encode(self.control_image(inputs, like.shape[0]), inputs)
        return self._hints[::-1][k].to(like.dtype)

    def control_image(self, inputs: Mapping[str, Any], batch: int) -> Tensor:
        name = self.adapter_name or "?"
        control = inputs.get("control")
        if isinstance(control, Mapping):
            control = control.get(name)
        if control is None:
            raise DifftuneError(
                f"CSC adapter {name!r} ran without a control image. Pass `control` per call: "
                f"pipe(..., control={{{name!r}: image}}), adapter_inputs={{'control': {{{name!r}: tensor}}}} or "
                f"`difftune generate --control IMAGE:{name}`; or disable the adapter (dt.disable) to run without it.")
        if not isinstance(control, Tensor) or control.dim() != 4 or control.shape[1] not in (1, 3):
            raise bad_value(f"control[{name!r}]", getattr(control, "shape", type(control).__name__),
                            "a (B, 1 or 3, H, W) tensor in [0, 1]",
                            "difftune.methods.scedit.to_tensor converts images.")
        if control.shape[1] == 1:
            control = control.expand(-1, 3, -1, -1)
        n = control.shape[0]
        if batch % n:
            raise bad_value(f"control[{name!r}]", f"{n} images", f"1 image or a divisor of the batch ({batch})",
                            "With guidance the denoiser's batch is twice the prompts'.")
        return control.repeat(batch // n, 1, 1, 1)  # guidance halves [uncond, cond] are consecutive copies

    def encode(self, control: Tensor, inputs: Mapping[str, Any]) -> list[Tensor]:
        """All hints in encoder order, the first at the latent resolution."""
        sample = inputs.get("sample")
        if isinstance(sample, Tensor) and sample.dim() == 4:
            size = (8 * sample.shape[-2], 8 * sample.shape[-1])  # three stride-2 convs -> the latent size
            if tuple(control.shape[-2:]) != size:
                control = F.interpolate(control.float(), size=size, mode="bilinear", align_corners=False)
        w = self.csc_pre_hint[0].weight
        h = self.csc_pre_hint(control.to(w.device, w.dtype))  # (B, P, h, w)
        hints = []
        for block in self.csc_dense:
            h = block(h)  # (B, C_j, H_j, W_j): the cascade feeds each hint to the next
            hints.append(h)
        return hints


class CSCAdapter(Adapter, _TunerMixin):
    """x = cat(h, x_j) → cat(h, x_j + w·[c_j + T(x_j + c_j)]) with c_j from the hint encoder."""

    prefix = "csc_"

    def __init__(self, config: CSCConfig, width: int, index: int, device: torch.device) -> None:
        super().__init__(config)
        self.width, self.index = width, index
        self.csc_down, self.csc_up = self._make(width, config.down_ratio, device)

    def pre_forward(self, x: Tensor, weight: float | Tensor) -> Tensor:
        h, s = x[:, : -self.width], x[:, -self.width:]  # (B, C_h, H, W), (B, C_j, H, W)
        c = self.model_part.hint(self.index, self.inputs(), s)
        xc = s + c
        t = self.csc_up(F.gelu(self.csc_down(xc.to(self.csc_down.weight.dtype)))).to(s.dtype)
        return torch.cat([h, s + weight * (c + t)], dim=1)


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
