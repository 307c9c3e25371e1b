"""kohya's ``ss_*`` metadata for exported files: the base model's version, as kohya sd-scripts writes it, and the
training facts from the run's model card.

A1111/Forge read ``ss_base_model_version`` (``sdxl_*`` → SDXL) and ``ss_v2`` (``"True"`` → SD2) to hide LoRAs made
for another base, so a wrong value hides a LoRA from the page it belongs on. The version is found, in this order,
from: the components exported (``text_encoder_2`` exists only in SDXL), the recorded base model's folder
(``model_index.json`` and the UNet/text-encoder configs), the adapter's own tensor shapes (the cross-attention
context width: 768 SD1, 1024 SD2, 2048 SDXL), and last the base model's name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..version import __version__

__all__ = ["BASE_VERSIONS", "base_version", "base_version_metadata", "export_metadata", "training_metadata"]

#: Our family name → kohya's ``ss_base_model_version`` (sd-scripts: ``sd_v1``/``sd_v2`` + ``_v`` for
#: v-parameterization, ``sdxl_base_v1-0`` for SDXL).
BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
#: Width of the UNet's cross-attention context (the text encoders' output) per family.
_CONTEXT_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no readable config: the version is decided by the next clue instead
    return data if isinstance(data, dict) else {}


def _from_folder(base_model: str) -> tuple[str | None, bool | None]:
    """(family, v-prediction) from a local diffusers folder's configs; (None, None) where there is none."""
    folder = Path(base_model) if base_model else None
    if folder is None or not (folder / "model_index.json").is_file():
        return None, None
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    v_pred = scheduler.get("prediction_type") == "v_prediction" if scheduler else None
    name = str(index.get("_class_name", ""))
    if "XL" in name or "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time":
        return "sdxl", v_pred
    if not name.startswith("StableDiffusion"):
        return None, v_pred  # DiT, PixArt, ...: kohya and A1111 have no version for them
    return ("sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"), v_pred


def _from_updates(components: Iterable[tuple[str, dict[str, Any]]]) -> str | None:
    """The family from a low-rank update's input width: a UNet's cross-attention key/value (the text context) or a
    text encoder's attention (its hidden width)."""
    for component, updates in components:
        for module, update in updates.items():
            down = getattr(update, "down", None)  # LowRank (r, d_in[, k, k]); other updates give no clue here
            if down is None or down.dim() < 2:
                continue
            if component in ("", "unet") and re.search(r"attn2\.to_[kv]$", module):
                return _CONTEXT_WIDTH.get(int(down.shape[1]))
            if component == "text_encoder" and module.endswith("self_attn.q_proj") and int(down.shape[1]) == 1024:
                return "sd2"  # OpenCLIP-H; 768 (CLIP-L) is SD1's and also SDXL's first encoder, so it decides nothing
    return None


def _from_name(base_model: str) -> str | None:
    name = base_model.lower()
    if "xl" in name:
        return "sdxl"
    if re.search(r"stable-diffusion-2|sd-?2|v2-", name):
        return "sd2"
    if re.search(r"stable-diffusion-v1|sd-?1|v1-", name):
        return "sd1"
    return None


def base_version(components: list[str], base_model: str, updates: list[tuple[str, dict[str, Any]]]
                 ) -> tuple[str | None, bool | None]:
    """(family "sd1" | "sd2" | "sdxl" | None, v-prediction or None when unknown) of the exported adapters.

    Args:
        components: the pipeline components the file holds (``"unet"``, ``"text_encoder"``, ...; ``""`` bare).
        base_model: the adapters' recorded base model (a folder, a Hub id or a name).
        updates: (component, {module: update}) per adapter (`updates.LowRank` etc.), for the shape clue.
    """
    folder_family, v_pred = _from_folder(base_model)
    if "text_encoder_2" in components:
        return "sdxl", v_pred
    family = folder_family or _from_updates(updates) or _from_name(base_model)
    return family, v_pred


def base_version_metadata(family: str | None, v_pred: bool | None) -> dict[str, str]:
    """kohya's ``ss_base_model_version`` / ``ss_v2`` / ``ss_v_parameterization`` for ``family`` (none if unknown)."""
    if family not in BASE_VERSIONS:
        return {}
    version = BASE_VERSIONS[family]
    meta = {"ss_base_model_version": version + ("_v" if v_pred and family != "sdxl" else ""),
            "ss_v2": str(family == "sd2")}
    if v_pred is not None:
        meta["ss_v_parameterization"] = str(bool(v_pred))
    return meta


def export_metadata(format: str, header: dict[str, Any], adapter: str | Path, updates: dict[str, Any],
                    version: dict[str, str]) -> dict[str, str]:
    """kohya's ``ss_*`` metadata for an export of ``adapter`` (its difftune ``header``) as ``format`` with ``updates``
    (rank, alpha, network module and args, base model version, what the run's model card records)."""
    meta: dict[str, str] = {}
    low = [u for u in updates.values() if getattr(u, "down", None) is not None]  # LowRank: rank and alpha
    ranks = sorted({u.rank for u in low})
    alphas = sorted({(u.alpha if u.alpha is not None and not u.rslora else u.scale * u.rank) for u in low})
    dora = any(u.magnitude is not None for u in low)
    # kohya's own networks.lora has no DoRA: LyCORIS writes it (algo lora with dora_wd), as it writes LoHa and full
    meta["ss_network_module"] = "networks.lora" if format == "kohya" and not dora else "lycoris.kohya"
    if format == "diff" or format == "loha" or dora:
        meta["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": True} if dora and format == "kohya" else
                                             {"algo": "full" if format == "diff" else format})
    if ranks:
        meta["ss_network_dim"] = str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks)
        meta["ss_network_alpha"] = _num(alphas[0]) if len(alphas) == 1 else json.dumps(alphas)
    meta.update(version)
    meta["ss_sd_model_name"] = header.get("base_model", "") or ""
    meta["ss_training_comment"] = f"difftune {__version__} {header['method']} adapter, exported as {format}"
    if header["method"] == "spm":  # what the official SPM code writes, so `load_spm` recovers the concepts
        config = header.get("config", {})
        meta.update(prompts=",".join(config.get("concepts", [])), rank=str(config.get("rank", "")),
                    alpha=str(config.get("alpha", "")))
    meta.update(training_metadata(adapter))
    return meta


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def training_metadata(adapter: str | Path) -> dict[str, str]:
    """kohya ``ss_*`` training facts from the run's model card next to the adapter (steps, resolution, seed, lr,
    tag frequency of the captions), where a difftune trainer wrote one; {} otherwise."""
    import yaml

    folder = Path(adapter) if Path(adapter).is_dir() else Path(adapter).parent
    card = folder.parent / "README.md"
    if not card.is_file() or "library_name: difftune" not in card.read_text(encoding="utf-8", errors="replace"):
        return {}
    text = card.read_text(encoding="utf-8", errors="replace")
    out: dict[str, str] = {}
    steps = re.search(r"optimizer steps: (\d+)", text)
    if steps:
        out["ss_steps"] = out["ss_max_train_steps"] = steps.group(1)
    block = re.search(r"## Training config\n\n```yaml\n(.*?)```", text, re.S)
    if not block:
        return out
    try:
        cfg = yaml.safe_load(block.group(1))
    except yaml.YAMLError:
        return out  # a hand-edited card: the facts stay unknown rather than wrong
    if not isinstance(cfg, dict):
        return out
    data, opt = cfg.get("data") or {}, cfg.get("optimizer") or {}
    if isinstance(data, dict) and isinstance(data.get("resolution"), int):
        out["ss_resolution"] = f"({data['resolution']}, {data['resolution']})"
    if isinstance(cfg.get("seed"), int):
        out["ss_seed"] = str(cfg["seed"])
    if isinstance(opt, dict) and isinstance(opt.get("lr"), (int, float)):
        out["ss_learning_rate"] = repr(float(opt["lr"]))
    if isinstance(data, dict) and isinstance(data.get("path"), str) and Path(data["path"]).is_dir():
        out["ss_tag_frequency"] = json.dumps({Path(data["path"]).name: _tag_frequency(Path(data["path"]))})
    return out


def _tag_frequency(folder: Path) -> dict[str, int]:
    """kohya's tag counts: captions split at commas, over the ``.txt`` captions of ``folder`` (first 10,000)."""
    counts: dict[str, int] = {}
    for caption in sorted(folder.rglob("*.txt"))[:10_000]:
        for tag in caption.read_text(encoding="utf-8", errors="replace").split(","):
            tag = tag.strip()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
