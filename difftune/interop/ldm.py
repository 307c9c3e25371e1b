"""LDM module names of a diffusers UNet: how the original Stable Diffusion code (CompVis ``ldm``, Stability's
``sgm``), kohya sd-scripts' SDXL UNet and ComfyUI name the layers diffusers calls ``down_blocks``/``mid_block``/
``up_blocks``.

kohya's SDXL LoRAs (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), kohya files of SD1.x/2.x models
trained on LDM checkpoints, and ComfyUI's generic keys (``diffusion_model.input_blocks.4.1.proj_in.lora_up.weight``)
address a UNet by these names. The mapping is derived from the model's own blocks, mirroring the index arithmetic of
diffusers' ``convert_ldm_unet_checkpoint`` (``diffusers.loaders.single_file_utils``), which turns an LDM checkpoint
into a diffusers UNet; the tests run that converter over every parameter of the SD1.5, SD2.1 and SDXL UNets to check
this module gives the inverse::

    LDM (one flat list per side)                 diffusers
    input_blocks.0.0                             conv_in
    input_blocks.n.0 / input_blocks.n.1          down_blocks.b.resnets.i / down_blocks.b.attentions.i
    input_blocks.n.0.op                          down_blocks.b.downsamplers.0.conv
    middle_block.0 / .1 / .2                     mid_block.resnets.0 / mid_block.attentions.0 / mid_block.resnets.1
    output_blocks.n.0 / output_blocks.n.1        up_blocks.b.resnets.i / up_blocks.b.attentions.i
    output_blocks.n.{1|2}.conv                   up_blocks.b.upsamplers.0.conv (index 2 after an attention)
    time_embed.0/2, label_emb.0.0/0.2, out.0/2   time_embedding.linear_1/2, add_embedding.linear_1/2, conv_norm_out/out

    inside a ResNet block: in_layers.0 → norm1, in_layers.2 → conv1, emb_layers.1 → time_emb_proj,
    out_layers.0 → norm2, out_layers.3 → conv2, skip_connection → conv_shortcut; attentions keep their names.
"""

from __future__ import annotations

from torch import nn

__all__ = ["LDM_COMPONENT", "LDM_PREFIX", "is_ldm_unet", "ldm_blocks", "ldm_names", "to_ldm"]

#: ComfyUI's generic key prefix for the denoiser (``diffusion_model.<LDM path>.<part>``).
LDM_PREFIX = "diffusion_model."
#: The pipeline component those keys address.
LDM_COMPONENT = "unet"

#: Top-level layers (diffusers → LDM), as in diffusers' ``DIFFUSERS_TO_LDM_MAPPING["unet"]``.
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",  # class_embed_type "timestep"/"projection"
    "class_embedding.linear_2": "label_emb.0.2",
    "class_embedding": "label_emb",  # num_class_embeds: an nn.Embedding
}
#: Layers of a ResNet block (diffusers → LDM), as in diffusers' ``update_unet_resnet_ldm_to_diffusers``.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def is_ldm_unet(model: nn.Module) -> bool:
    """Whether ``model`` is a diffusers ``UNet2DConditionModel`` (the UNet the LDM names describe)."""
    from diffusers import UNet2DConditionModel

    return isinstance(model, UNet2DConditionModel)


def ldm_blocks(model: nn.Module) -> dict[str, tuple[str, str]]:
    """{diffusers block path: (LDM block path, kind)} with kind "resnet", "attention", "down" or "up"."""
    out: dict[str, tuple[str, str]] = {}
    n = 1  # input_blocks.0 is conv_in
    for b, block in enumerate(model.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for i in range(len(block.resnets)):
            out[f"down_blocks.{b}.resnets.{i}"] = (f"input_blocks.{n}.0", "resnet")
            if i < len(attentions):
                out[f"down_blocks.{b}.attentions.{i}"] = (f"input_blocks.{n}.1", "attention")
            n += 1
        if getattr(block, "downsamplers", None):
            out[f"down_blocks.{b}.downsamplers.0"] = (f"input_blocks.{n}.0", "down")
            n += 1
    mid = getattr(model, "mid_block", None)
    if mid is not None:  # LDM's middle_block is [resnet, attention, resnet, ...]
        for i in range(len(mid.resnets)):
            out[f"mid_block.resnets.{i}"] = (f"middle_block.{2 * i}", "resnet")
        for i in range(len(getattr(mid, "attentions", None) or [])):
            out[f"mid_block.attentions.{i}"] = (f"middle_block.{2 * i + 1}", "attention")
    n = 0
    for b, block in enumerate(model.up_blocks):
        attentions = getattr(block, "attentions", None) or []
        for i in range(len(block.resnets)):
            out[f"up_blocks.{b}.resnets.{i}"] = (f"output_blocks.{n}.0", "resnet")
            if i < len(attentions):
                out[f"up_blocks.{b}.attentions.{i}"] = (f"output_blocks.{n}.1", "attention")
            n += 1
        if getattr(block, "upsamplers", None):  # in the block's last entry, after its attention if it has one
            out[f"up_blocks.{b}.upsamplers.0"] = (f"output_blocks.{n - 1}.{2 if attentions else 1}", "up")
    return out


def to_ldm(name: str, blocks: dict[str, tuple[str, str]]) -> str | None:
    """The LDM name of the diffusers module ``name`` (canonical), or None when LDM has no module of that name
    (containers such as ``down_blocks.0``; ``blocks`` from `ldm_blocks`)."""
    for diffusers, ldm in _TOP.items():
        if name == diffusers or name.startswith(diffusers + "."):
            return ldm + name[len(diffusers):]
    parts = name.split(".")
    depth = 2 if parts[0] == "mid_block" else 3  # mid_block.resnets.0 / down_blocks.0.resnets.0
    block, rest = ".".join(parts[:depth + 1]), parts[depth + 1:]
    if block not in blocks or not rest:
        return None
    ldm, kind = blocks[block]
    if kind == "resnet":
        if rest[0] not in _RESNET:
            return None
        rest = [_RESNET[rest[0]], *rest[1:]]
    elif kind == "down":  # LDM's Downsample keeps its conv as `op`
        rest = ["op" if rest[0] == "conv" else rest[0], *rest[1:]]
    return ".".join([ldm, *rest])


def ldm_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """{LDM name: diffusers name} for the diffusers module ``names`` of ``model`` that LDM names (empty for any model
    other than a ``UNet2DConditionModel``)."""
    if not is_ldm_unet(model):
        return {}
    blocks = ldm_blocks(model)
    out = {}
    for name in names:
        ldm = to_ldm(name, blocks)
        if ldm is not None:
            out[ldm] = name
    return out
