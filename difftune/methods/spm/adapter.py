"""SPM: concept semi-permeable membranes (Lyu et al., "One-dimensional Adapter to Rule Them All: Concepts, Diffusion
Models and Erasing Applications", CVPR 2024, arXiv 2312.16145; official code Con6924/SPM).

**Membrane.** A rank-1 LoRA-style ΔW on every Linear and Conv2d inside the denoiser's transformer blocks (proj_in,
proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, the GEGLU/GELU input ff.net.0.proj, ff.net.2), as the official
``SPMNetwork`` (all Linear/Conv2d children of every ``Transformer2DModel``)::

    δ_i(x) = γ_i · s · U (D x),    D ∈ R^{r × d_in (× k × k)},  U ∈ R^{d_out × r},  s = α / r,  r = 1, α = 1

D is Kaiming-uniform (a = √5), U = 0, so a fresh membrane changes nothing. On SD1.x that is 192 layers and 423,936
parameters (1.70 MB fp32).

**Facilitated transport.** γ_i is the permeability for batch item i, computed once per denoiser call by the
adapter's model-level part (`SPMPart.begin_call`) from the item's text embedding E(p_i) (the denoiser's own
``encoder_hidden_states``, (B, L, D); on SD3/Flux the pooled CLIP ``pooled_projections``, (B, 1, P):
`transport_embedding`) and its prompt p_i (added by the difftune pipelines)::

    γ_i = max( cos(vec E(p_i), vec E(c)),  |tok(p_i) ∩ tok(c)| / |tok(c)| )     ("clipcos_tokenuni")

maximised over the SPM's erased concepts c; "clipcos" and "tokenuni" use one rule, "fixed" sets γ = 1 (the
adapter weight is then the strength). Several SPMs are separate adapters: each keeps its own rank-1 term and γ,
so they compose exactly (output = base + Σ_k w_k γ_{k,i} δ_k), and γ = 0 gives the base output bit for bit.

Deliberate deviations from the official code (methods.md §4(d)), each tested:

* **γ is linear** by default. The official inference multiplies every tensor of the SPM (down, up and alpha) by γ,
  so ΔW scales with γ²; ``gamma_mode="squared"`` reproduces that.
* **No cross terms.** The official merge sums the down vectors and the up vectors of several SPMs into one rank-1
  pair, ΔW = (Σ γ_i u_i)(Σ γ_j d_j)ᵀ; we keep one adapter per SPM.
* **γ per batch item.** The official inference computes one γ per prompt and applies it to the whole pipeline call,
  the unconditional half of classifier-free guidance included; here each item of the denoiser's batch has its own
  γ, so the unconditional half gets the γ of its own (negative) prompt.
* **γ is clamped to [0, 1]**: a negative cosine would otherwise *amplify* the concept.
* **Token overlap uses words** (lower-cased ``\\w+``), not the CLIP tokenizer: the denoiser never sees a tokenizer.
  For whole-word concepts the two agree.
* **E(c) is stored in the adapter** (``spm_concept_embeds``, (n_concepts, L, D), written by the trainer with the
  training model's text encoder, or by `encode_concepts`): the denoiser cannot run a text encoder. It adds L·D
  values per concept to the file (59,136 on SD1.x: 0.24 MB fp32); zeros mean "unknown", and the cosine rule then
  gives 0. Fused, an SPM has no transport (γ = 1 for every prompt): `delta_params` warns.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import DifftuneError, bad_value
from ..base import MAX_SCALE, MAX_SIZE, Adapter, MethodConfig, Site, register_method

#: Every Linear/Conv2d of the transformer blocks: UNet Transformer2DModels ("attentions.N") and DiT/PixArt blocks;
#: on SD3/Flux the attention and MLP linears of both streams of the joint blocks and of Flux's single blocks (the
#: MMDiT default targets, `difftune.architectures.mmdit_default_targets`; their AdaLN modulations are not adapted).
TARGETS = [r".*attentions\.\d+\.proj_(in|out)", r".*transformer_blocks\.\d+\.attn[12]\.to_(q|k|v|out\.0)",
           r".*transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
           r".*transformer_blocks\.\d+\.attn\.(to_(q|k|v|out\.0|add_out)|add_[qkv]_proj)",
           r".*transformer_blocks\.\d+\.ff_context\.net\.(0\.proj|2)",
           r"single_transformer_blocks\.\d+\.proj_(mlp|out)"]
MATCHING = ("clipcos_tokenuni", "clipcos", "tokenuni", "fixed")
GAMMA_MODES = ("linear", "squared")
ACTIONS = ("erase_with_la", "erase")
_WORD = re.compile(r"\w+")


@register_method("spm")
@dataclass
class SPMConfig(MethodConfig):
    """SPM hyperparameters (paper/official names in brackets).

    Attributes:
        rank: r, the membrane's width (1: "one-dimensional").
        alpha: α; ΔW is scaled by α / r (official 1.0).
        concepts: the erased concepts c (official ``target`` prompts); their text drives facilitated transport.
        surrogates: per concept, the prompt it is mapped to (official ``neutral``; "" = erase to the unconditional).
        matching: how γ is computed at inference ("clipcos_tokenuni", "clipcos", "tokenuni", or "fixed" γ = 1).
        gamma_mode: "linear" (γ·ΔW) or "squared" (γ²·ΔW, what the official inference does).
        text_length: L, the token length of the text embeddings E(·) stored for transport (77 for CLIP).
        action: "erase_with_la" (erasing + latent anchoring) or "erase" (no anchoring).
        guidance: η, the negative-guidance strength of the erasing target (official ``guidance_scale`` 1.0).
        la_strength: λ_LA, the weight of the latent-anchoring loss (official 1000).
        num_anchors: K, anchors sampled per step (official ``sampling_batch_size`` 4).
        anchors: anchor prompts to sample from; empty = random anchor embeddings as the official code.
        sampling_steps: T of the DDIM schedule x_t is sampled on (official ``max_denoising_steps`` 30).
        sampling_guidance: CFG scale of that on-policy sampling (official 3).
    """

    target_modules: list[str] = field(default_factory=lambda: list(TARGETS))
    rank: int = 1
    alpha: float = 1.0
    concepts: list[str] = field(default_factory=list)
    surrogates: list[str] = field(default_factory=list)
    matching: str = "clipcos_tokenuni"
    gamma_mode: str = "linear"
    text_length: int = 77
    action: str = "erase_with_la"
    guidance: float = 1.0
    la_strength: float = 1000.0
    num_anchors: int = 4
    anchors: list[str] = field(default_factory=list)
    sampling_steps: int = 30
    sampling_guidance: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_types()
        if self.rank < 1:
            raise bad_value("rank", self.rank, "an integer >= 1", "SPM's membrane is rank 1.")
        if not 0 < self.alpha <= MAX_SCALE:  # α/r scales ΔW: a 1e30 α loads as NaN outputs
            raise bad_value("alpha", self.alpha, f"a positive number up to {MAX_SCALE:g}",
                            "The official value is 1.0.")
        for name in ("concepts", "surrogates", "anchors"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise bad_value(name, value, "a list of strings", "e.g. concepts: [seven]")
        if any(not c.strip() for c in self.concepts):
            raise bad_value("concepts", self.concepts, "non-empty concept texts")
        if self.surrogates and len(self.surrogates) != len(self.concepts):
            raise bad_value("surrogates", self.surrogates, f"one prompt per concept ({len(self.concepts)})",
                            "Leave it empty to erase every concept towards the empty prompt.")
        for name, allowed in (("matching", MATCHING), ("gamma_mode", GAMMA_MODES), ("action", ACTIONS)):
            if getattr(self, name) not in allowed:
                raise bad_value(name, getattr(self, name), f"one of {allowed}")
        for name, most in (("text_length", 1024), ("num_anchors", 1024), ("sampling_steps", 1000)):
            if not 1 <= getattr(self, name) <= most:  # a text length, a batch of anchors per step, DDIM steps
                raise bad_value(name, getattr(self, name), f"an integer in [1, {most}]")
        if len(self.concepts) * self.text_length > MAX_SIZE:  # the part stores E(c): concepts × L × D values
            raise bad_value("concepts", f"{len(self.concepts)} concepts of text_length {self.text_length}",
                            f"at most {MAX_SIZE:,} stored embedding rows (concepts × text_length)",
                            "One SPM erases a few concepts; train several SPMs for more.")
        if self.la_strength < 0 or self.sampling_guidance < 0:
            raise bad_value("la_strength/sampling_guidance", (self.la_strength, self.sampling_guidance),
                            "non-negative numbers")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def probe_inputs(self, name: str) -> tuple[int, dict[str, Any]]:
        # the loader's probe sees the membrane at full strength: each concept as a prompt (γ = 1 under the token rule)
        return 4, {"prompt": [self.concepts[i % len(self.concepts)] if self.concepts else "" for i in range(4)]}

    def make_model_part(self, model: nn.Module) -> nn.Module | None:
        source = transport_embedding(model, self.text_length)
        return SPMPart(self, *source) if source else None

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        if isinstance(base_layer, nn.Linear) or (isinstance(base_layer, nn.Conv2d) and base_layer.groups == 1):
            width = max(base_layer.weight.shape[0], math.prod(base_layer.weight.shape[1:]))
            if self.rank > width:  # U D would hold more values than a dense ΔW: refused before allocating
                raise bad_value("rank", self.rank, f"at most max(d_out, d_in) = {width} for this layer",
                                "SPM's membrane is rank 1.")
            return SPMAdapter(base_layer, self)
        return None


def text_width(model: nn.Module) -> int | None:
    """D of the text embeddings the denoiser is called with (None: not text-conditioned, e.g. DiT)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    width = getattr(config, "caption_channels", None) or getattr(config, "cross_attention_dim", None)
    return int(width) if isinstance(width, int) else None


def transport_embedding(model: nn.Module, text_length: int) -> tuple[int, str, int] | None:
    """(D, the denoiser's keyword argument E(p) is read from, L) for facilitated transport, or None (no text).

    UNets, PixArt: the per-token ``encoder_hidden_states`` (L = ``text_length``). SD3 and Flux: the pooled CLIP
    embedding ``pooled_projections`` (L = 1; SD3 2048 = CLIP-L + CLIP-G, Flux 768 = CLIP-L), the CLIP text embedding
    the "clipcos" rule is named after; their per-token sequence is mostly T5 (SD3 also holds the CLIP tokens padded
    to 4096), would store L × 4096 values per concept (2M for Flux's 512 tokens) and its flattened cosine would
    include every padding position."""
    config = getattr(model, "config", None)
    pooled = getattr(config, "pooled_projection_dim", None) if getattr(config, "joint_attention_dim", None) else None
    if isinstance(pooled, int):
        return pooled, "pooled_projections", 1
    width = text_width(model)
    return (width, "encoder_hidden_states", text_length) if width else None


def words(text: str) -> set[str]:
    """The word set a prompt's token overlap is computed on (lower-cased ``\\w+``)."""
    return set(_WORD.findall(text.lower()))


def token_overlap(prompt: str, concept: str) -> float:
    """|tok(p) ∩ tok(c)| / |tok(c)| (official "tokenuni"), 0 for an empty concept."""
    c = words(concept)
    return len(words(prompt) & c) / len(c) if c else 0.0


def permeability(config: SPMConfig, prompts: Sequence[str] | None, embeds: Tensor | None,
                 concept_embeds: Tensor | None) -> Tensor | None:
    """γ per batch item (B,), or None for γ = 1 everywhere.

    Args:
        prompts: the items' prompts (None: unknown, the token rule gives 0).
        embeds: E(p), (B, L, D) (None: unknown, the cosine rule gives 0).
        concept_embeds: E(c) per concept, (n, L, D); all-zero rows are unknown.
    """
    rule = config.matching
    if rule == "fixed":
        return None
    n = len(prompts) if prompts is not None else (embeds.shape[0] if embeds is not None else None)
    if n is None:
        raise DifftuneError("SPM facilitated transport needs each item's prompt or text embedding, and this call has "
                            "neither; call the denoiser with encoder_hidden_states, use a difftune pipeline, or set "
                            "matching='fixed'")
    gamma = torch.zeros(n)
    if rule in ("clipcos_tokenuni", "clipcos") and embeds is not None and concept_embeds is not None:
        known = concept_embeds.flatten(1).abs().sum(1) > 0  # (n_concepts,)
        if known.any() and embeds.shape[1:] == concept_embeds.shape[1:]:
            e = embeds.detach().flatten(1).float()  # (B, L·D)
            c = concept_embeds[known].flatten(1).float().to(e.device)  # (k, L·D)
            cos = F.cosine_similarity(e[:, None, :], c[None, :, :], dim=-1)  # (B, k)
            gamma = torch.maximum(gamma, cos.max(dim=1).values.cpu())
    if rule in ("clipcos_tokenuni", "tokenuni") and prompts is not None:
        tok = torch.tensor([max((token_overlap(p, c) for c in config.concepts), default=0.0) for p in prompts])
        gamma = torch.maximum(gamma, tok)
    gamma = gamma.clamp(0.0, 1.0)
    return gamma * gamma if config.gamma_mode == "squared" else gamma


class SPMPart(nn.Module):
    """The SPM's model-level part: E(c) of its concepts, and γ of the running call (``begin_call``)."""

    prefix = "spm_"

    def __init__(self, config: SPMConfig, width: int, key: str = "encoder_hidden_states",
                 length: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.key = key  #: the denoiser argument E(p) is read from (`transport_embedding`)
        n = max(1, len(config.concepts))
        self.register_buffer("spm_concept_embeds", torch.zeros(n, length or config.text_length, width))
        #: False while training (the membrane is fully on) or when a user forces fixed strengths.
        self.transport = True
        self.gamma: Tensor | None = None

    def begin_call(self, inputs: Mapping[str, Any]) -> None:
        if not self.transport:
            self.gamma = None
            return
        prompts = inputs.get("prompt")
        if isinstance(prompts, str):
            prompts = [prompts]
        embeds = inputs.get(self.key)
        if isinstance(embeds, Tensor) and embeds.dim() == 2:  # pooled (B, P): a sequence of one
            embeds = embeds[:, None]
        self.gamma = permeability(self.config, prompts, embeds if isinstance(embeds, Tensor) else None,
                                  self.spm_concept_embeds)


class SPMAdapter(Adapter):
    """y = W x + w · γ_i · s · U(D x); D keeps the base conv's kernel, stride and padding, U is 1×1."""

    prefix = "spm_"

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, config: SPMConfig) -> None:
        super().__init__(config)
        w = base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        r = config.rank
        if isinstance(base_layer, nn.Conv2d):
            down: tuple[int, ...] = (r, base_layer.in_channels, *base_layer.kernel_size)
            up: tuple[int, ...] = (base_layer.out_channels, r, 1, 1)
        else:
            down, up = (r, base_layer.in_features), (base_layer.out_features, r)
        self.spm_down = nn.Parameter(torch.empty(down, device=w.device, dtype=dtype))
        self.spm_up = nn.Parameter(torch.zeros(up, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.spm_down, a=math.sqrt(5))
        self.scale = config.scale

    def delta_weight(self, w0: Tensor) -> Tensor:
        """ΔW = s · U D in fp32 (γ is not in it: a fused SPM acts on every prompt); W0 plays no part."""
        d, u = self.spm_down.float(), self.spm_up.float()
        return (u.flatten(1) @ d.flatten(1)).view(u.shape[0], *d.shape[1:]) * self.scale

    def delta_params(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        part = self.model_part
        if part is not None and part.transport and self.config.matching != "fixed":
            _warn_fused()
        return {"weight": self.delta_weight(base["weight"])}

    def delta(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor:
        x = x.to(self.spm_down.dtype)
        if isinstance(base_layer, nn.Conv2d):
            return F.conv2d(base_layer._conv_forward(x, self.spm_down, None), self.spm_up) * self.scale
        return F.linear(F.linear(x, self.spm_down), self.spm_up) * self.scale

    def forward(self, x: Tensor, out: Tensor, weight: float | Tensor, base_layer: nn.Module,
                base: Mapping[str, Tensor]) -> Tensor:
        part = self.model_part
        gamma = part.gamma if part is not None else None
        if gamma is not None:
            if gamma.numel() != out.shape[0]:
                raise DifftuneError(f"SPM: {gamma.numel()} permeabilities for a batch of {out.shape[0]}; the prompts "
                                    "must match the denoiser's batch (use adapter_inputs= on a difftune pipeline)")
            if not bool(gamma.any()):
                return out  # γ = 0 for every item: exactly the base output
            weight = weight * gamma.to(out.device, out.dtype).view(-1, *([1] * (out.dim() - 1)))
        return out + weight * self.delta(x, base_layer, base).to(out.dtype)


_WARNED: list[bool] = []


def _warn_fused() -> None:
    if not _WARNED:  # once per process: every layer of every fuse would repeat it
        _WARNED.append(True)
        warnings.warn("fusing an SPM turns facilitated transport off: the fused membrane acts on every prompt with "
                      "γ = 1. Keep it unfused to let γ follow each prompt.", stacklevel=3)


def set_transport(model: nn.Module, name: str, on: bool) -> None:
    """Turn facilitated transport of SPM ``name`` on or off (off: γ = 1, the adapter weight is the strength)."""
    from ..verbs import get_config, model_part

    if not isinstance(get_config(model, name), SPMConfig):
        raise bad_value("name", name, "the name of an SPM adapter")
    part = model_part(model, name)
    if part is not None:
        part.transport = bool(on)


def _denoiser(pipe: Any) -> nn.Module:
    from ...components import denoiser_name

    name = denoiser_name(k for k, v in pipe.components.items() if isinstance(v, nn.Module))
    if name is None:
        raise bad_value("pipe", type(pipe).__name__, "a pipeline with a unet or transformer")
    return getattr(pipe, name)


def set_matching(model: nn.Module, name: str, matching: str) -> None:
    """Switch SPM ``name``'s transport rule at inference ("clipcos_tokenuni", "clipcos", "tokenuni", "fixed")."""
    from ..verbs import get_config

    config = get_config(model, name)
    if not isinstance(config, SPMConfig):
        raise bad_value("name", name, "the name of an SPM adapter")
    if matching not in MATCHING:
        raise bad_value("matching", matching, f"one of {MATCHING}")
    config.matching = matching  # the part and every layer share this config object


@torch.no_grad()
def encode_concepts(pipe: Any, name: str) -> Tensor:
    """Store E(c) of SPM ``name``'s concepts, encoded with ``pipe``'s own text encoder(s); returns them (n, L, D).

    Needed after importing an official SPM file or to match another text encoder; the trainer does it itself.
    """
    from ...families import family_for
    from ..verbs import get_config, model_part

    model = _denoiser(pipe)
    config = get_config(model, name)
    part = model_part(model, name)
    if not isinstance(config, SPMConfig) or part is None:
        raise bad_value("name", name, "a text-conditioned SPM adapter in the pipeline")
    family = family_for(pipe, model)
    device = part.spm_concept_embeds.device
    for i, concept in enumerate(config.concepts):
        e = family.encode([concept], device)[part.key][0]  # (L, D); pooled (P,)
        e = e.reshape(1, -1) if e.dim() == 1 else e
        if e.shape != part.spm_concept_embeds.shape[1:]:
            raise bad_value("text_length", config.text_length, f"the text encoder's length {e.shape[0]}",
                            "Set text_length to the pipeline's sequence length (77 for CLIP, 120 for PixArt).")
        part.spm_concept_embeds[i].copy_(e)
    return part.spm_concept_embeds
