"""SD3 LoRA files in Stability AI's (SAI) layout, the naming kohya sd-scripts (``sd3_train_network.py``) and ComfyUI
use: ``lora_unet_joint_blocks_{i}_x_block_attn_qkv``, ``lora_unet_joint_blocks_{i}_context_block_mlp_fc1``, ...

Stability AI's reference MMDiT code (and kohya's ``library/sd3_models.py`` after it) names each joint block's image
stream ``x_block`` and its text stream ``context_block``, and fuses each stream's q, k and v into one ``qkv`` linear
where diffusers' `SD3Transformer2DModel` has ``attn.to_q``/``to_k``/``to_v`` (image) and
``attn.add_q_proj``/``add_k_proj``/``add_v_proj`` (text); their LoRAs are fused and split as
`difftune.interop.fused` says. The table mirrors diffusers' own converter of SAI checkpoints
(``convert_sd3_transformer_checkpoint_to_diffusers`` in ``diffusers.loaders.single_file_utils``), which the tests run
on the files' ΔW:

==========================================  =====================================================================
SAI layer (``lora_unet_`` + …)              diffusers module(s) of ``SD3Transformer2DModel``
==========================================  =====================================================================
``joint_blocks_{i}_x_block_attn_qkv``       ``transformer_blocks.{i}.attn.to_q``, ``to_k``, ``to_v`` (fused)
``joint_blocks_{i}_x_block_attn_proj``      ``attn.to_out.0``
``joint_blocks_{i}_x_block_attn2_qkv``      ``attn2.to_q``, ``to_k``, ``to_v`` (SD3.5's second attention, fused)
``joint_blocks_{i}_x_block_attn2_proj``     ``attn2.to_out.0``
``joint_blocks_{i}_x_block_mlp_fc1/fc2``    ``ff.net.0.proj`` / ``ff.net.2``
``joint_blocks_{i}_x_block_adaLN_``         ``norm1.linear``
``modulation_1``
``joint_blocks_{i}_context_block_…``        the same for the text stream: ``attn.add_{q,k,v}_proj`` (fused),
                                            ``attn.to_add_out``, ``ff_context.…``, ``norm1_context.linear``
``x_embedder_proj``, ``context_embedder``,  ``pos_embed.proj`` (the patch conv), ``context_embedder``,
``t_embedder_mlp_{0,2}``,                   ``time_text_embed.timestep_embedder.linear_{1,2}``,
``y_embedder_mlp_{0,2}``,                   ``time_text_embed.text_embedder.linear_{1,2}``,
``final_layer_linear``,                     ``proj_out``,
``final_layer_adaLN_modulation_1``          ``norm_out.linear``
==========================================  =====================================================================

The last joint block's text stream only feeds the attention (no output projection or MLP): its modulation has two
parts, (shift, scale) in SAI's order and (scale, shift) in diffusers' ``AdaLayerNormContinuous``, as has the final
layer's; those rows are swapped both ways. A modulation with twice its input's rows is such a one (the other blocks'
have six parts, SD3.5's image streams nine), so the file alone says which to swap.
"""

from __future__ import annotations

import re

from ..errors import DifftuneError
from .fused import Layout, out_in
from .updates import Update

__all__ = ["JOINT", "SAI", "TOP", "is_sai"]

#: SAI layer in joint_blocks.{i} (with "_" for ".") → diffusers module(s) in transformer_blocks.{i}
JOINT = {
    "x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block_attn_proj": ("attn.to_out.0",),
    "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block_attn2_proj": ("attn2.to_out.0",),
    "x_block_mlp_fc1": ("ff.net.0.proj",),
    "x_block_mlp_fc2": ("ff.net.2",),
    "x_block_adaLN_modulation_1": ("norm1.linear",),
    "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block_attn_proj": ("attn.to_add_out",),
    "context_block_mlp_fc1": ("ff_context.net.0.proj",),
    "context_block_mlp_fc2": ("ff_context.net.2",),
    "context_block_adaLN_modulation_1": ("norm1_context.linear",),
}
#: SAI's layers outside the joint blocks → diffusers' modules
TOP = {
    "x_embedder_proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
_BLOCK = re.compile(r"joint_blocks_(\d+)_(.+)")
_PATH = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def is_sai(name: str) -> bool:
    """Whether a kohya module name without prefix is SAI's (a joint block's; only SD3's MMDiT has ``joint_blocks``)."""
    return bool(_BLOCK.match(name))


def _sai_layer(path: str) -> tuple[str, tuple[str, ...]]:
    """(SAI name without prefix, the diffusers members of that layer, in order) of an SD3 module path."""
    m = _PATH.fullmatch(path)
    if m:
        i, rest = m.groups()
        for name, members in JOINT.items():
            if rest in members:
                return f"joint_blocks_{i}_{name}", tuple(f"transformer_blocks.{i}.{x}" for x in members)
    for name, module in TOP.items():
        if path == module:
            return name, (module,)
    raise DifftuneError(f"module {path!r} has no name in SAI's SD3 layout; kohya's SD3 format holds the "
                        "transformer's joint blocks, embedders and final layer only")


def _diffusers_members(name: str) -> tuple[str, ...]:
    """The diffusers module paths of a SAI module name (without prefix)."""
    m = _BLOCK.fullmatch(name)
    if m and m[2] in JOINT:
        return tuple(f"transformer_blocks.{m[1]}.{x}" for x in JOINT[m[2]])
    if not m and name in TOP:
        return (TOP[name],)
    raise DifftuneError(f"lora_unet_{name}: no such layer in SAI's SD3 layout (known: joint_blocks_<i>_"
                        f"{{{', '.join(JOINT)}}}, {', '.join(TOP)})")


def _swap(path: str, update: Update) -> bool:
    """A two-part modulation (the final layer's, the last block's text stream's): SAI (shift, scale), diffusers
    (scale, shift)."""
    if path == "norm_out.linear":
        return True
    rows, d_in = out_in(update)
    return path.endswith(".norm1_context.linear") and rows == 2 * d_in


SAI = Layout("SAI SD3", _sai_layer, _diffusers_members, _swap)
