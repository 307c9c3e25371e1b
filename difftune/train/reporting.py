"""What a run shows: the validation grid (fixed prompts or class labels and seeds) and the model card."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import to_dict
from ..families import Family
from ..fileio import atomic_write
from .config import TrainConfig
from .tracking import log_grid


def say(message: str) -> None:
    """One ``[difftune] ...`` line on stdout, on a line of its own even while the progress bar is drawn."""
    tqdm.write(f"[difftune] {message}", file=sys.stdout)
    sys.stdout.flush()


@torch.no_grad()
def validate(cfg: TrainConfig, accelerator: Any, pipe: Any, family: Family, denoiser: nn.Module, step: int,
             weight_dtype: torch.dtype) -> Path | None:
    """Images for the validation prompts (or class labels) with fixed seeds, as one grid PNG labelled with each row's
    prompt (or class) and the step; main process only. Prints one line with its path."""
    from ..generation import generate

    v = cfg.validation
    conds = v.class_labels if family.conditioning == "class" else v.prompts
    if not conds:
        return None
    was_training = denoiser.training
    denoiser.eval()
    rows = []
    autocast = torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    with autocast:
        for c in conds:
            kw = {"class_label": c} if family.conditioning == "class" else {"prompt": c}
            rows.append([generate(pipe, seed=s, steps=v.num_inference_steps, guidance=v.guidance_scale, **kw)[0]
                         for s in v.seeds])
    denoiser.train(was_training)
    labels = [f"class {c}" if family.conditioning == "class" else str(c) for c in conds]
    # tiles of tiny models (32 px) are enlarged to at least 64 px so the grid can be read next to its labels
    grid = labelled_grid(rows, labels, f"step {step}", scale=max(1, 64 // rows[0][0].size[0]))
    path = Path(cfg.output_dir) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    say(f"validation grid (step {step}): {path}")
    log_grid(accelerator, grid, step)  # to every tracker of logging.report_to that takes images
    return path


def labelled_grid(rows: list[list[Any]], labels: list[str], title: str | None = None, scale: int = 1) -> Any:
    """``rows`` of equal-size images side by side, each row preceded by its label (PIL's default font), under an
    optional title line; tiles are enlarged ``scale`` times (nearest) so that 32-pixel samples stay visible."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    pad = 4
    label_w = max(size(t)[0] for t in labels) + 2 * pad
    row_h = max(h, max(size(t)[1] for t in labels) + 2 * pad)
    title_h = size(title)[1] + 2 * pad if title else 0
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + w * cols, title_h + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for r, (row, text) in enumerate(zip(rows, labels)):
        y = title_h + r * row_h
        draw.text((pad, y + (row_h - size(text)[1]) // 2), text, fill="black", font=font)
        for c, img in enumerate(row):
            tile = img.convert("RGB")
            if scale != 1:
                tile = tile.resize((w, h), Image.NEAREST)
            grid.paste(tile, (label_w + c * w, y))
    return grid


def write_model_card(cfg: TrainConfig, result: Path, grid: Path | None, progress: dict[str, Any], digest: str) -> Path:
    """``OUTPUT_DIR/README.md``, a Hugging Face model card (huggingface_hub's ``ModelCard``): its metadata names the
    base model's Hub repo id when it has one; the text gives the base, method, steps, digest, how to load the result,
    the grid and the config."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    from ..basemodel import hub_repo_id

    m, base = cfg.method_config(), cfg.model.path
    data = ModelCardData(base_model=hub_repo_id(base), library_name="difftune", tags=["difftune", m.method])
    at = f" (revision {cfg.model.revision})" if cfg.model.revision else ""
    at += f" (configs: {cfg.model.config})" if cfg.model.config else ""
    lines = [
        f"# {m.method} trained with difftune", "",
        f"- base model: `{base}`{at} (component: {cfg.model.component or 'auto'})",
        f"- method: `{m.method}`; optimizer steps: {progress['step']}; trainable-weights digest: `{digest}`",
        f"- result: `{result.name}/`",
    ]
    if progress.get("resumed"):
        lines.append(f"- resumed from {progress['resumed']}")
    if m.is_adapter:
        options = "".join(f", {k}={v!r}" for k, v in (("revision", cfg.model.revision), ("config", cfg.model.config))
                          if v)
        lines += ["", "Load it into a diffusers pipeline:", "", "```python", "import difftune as dt",
                  "from difftune.generation import load_pipeline", "",
                  f"pipe = load_pipeline({base!r}{options})  # a folder, shipped model, Hub id or checkpoint file",
                  f"dt.load_adapter(pipe, {str(result)!r}, weight=1.0)", "```"]
    if grid is not None:
        lines += ["", "## Validation samples", "", f"![samples]({grid.relative_to(Path(cfg.output_dir))})"]
    lines += ["", "## Training config", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```"]
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n")
    return atomic_write(Path(cfg.output_dir) / "README.md", lambda tmp: Path(tmp).write_text(str(card)))


def flat_hparams(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``d`` flattened to dotted keys with scalar values (TensorBoard hparams take scalars only)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
