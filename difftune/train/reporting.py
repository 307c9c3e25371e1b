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
from .objectives import changes_scheduler
from .tracking import log_grid
from .valconfig import resolve_prompt


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
    # (generate's keyword arguments, seeds, row label) per row
    if family.conditioning == "class":
        jobs = [({"class_label": c, "steps": v.num_inference_steps, "guidance": v.guidance_scale}, list(v.seeds),
                 f"class {c}") for c in v.class_labels]
    else:
        jobs = [_prompt_job(item, v) for item in v.prompts]
    if not jobs:
        return None
    was_training = denoiser.training
    denoiser.eval()
    rows = []
    autocast = torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    with autocast:
        for kw, seeds, _ in jobs:
            rows.append([generate(pipe, seed=s, **kw)[0] for s in seeds])
    denoiser.train(was_training)
    # tiles of tiny models (32 px) are enlarged to at least 64 px so the grid can be read next to its labels
    smallest = min(row[0].size[0] for row in rows)
    grid = labelled_grid(rows, [label for _, _, label in jobs], f"step {step}", scale=max(1, 64 // smallest))
    path = Path(cfg.output_dir) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    say(f"validation grid (step {step}): {path}")
    log_grid(accelerator, grid, step)  # to every tracker of logging.report_to that takes images
    return path


def _prompt_job(item: Any, v: Any) -> tuple[dict[str, Any], list[int], str]:
    """One validation prompt's `generate` arguments, seeds and row label (``validation.prompts`` item ``item``)."""
    p, seeds = resolve_prompt(item, v)
    kw = {"prompt": p.prompt, "negative_prompt": p.negative_prompt, "steps": p.steps, "guidance": p.guidance_scale,
          "width": p.width, "height": p.height}
    label = p.prompt if p.negative_prompt is None else f"{p.prompt} (not: {p.negative_prompt})"
    return kw, seeds, label


def labelled_grid(rows: list[list[Any]], labels: list[str], title: str | None = None, scale: int = 1) -> Any:
    """``rows`` of images side by side (equal-size within a row; rows may differ, e.g. per-prompt sizes), each row
    preceded by its label (PIL's default font), under an optional title line; tiles are enlarged ``scale`` times
    (nearest) so that 32-pixel samples stay visible."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    tiles = [(row[0].size[0] * scale, row[0].size[1] * scale) for row in rows]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    pad = 4
    label_w = max(size(t)[0] for t in labels) + 2 * pad
    text_h = max(size(t)[1] for t in labels) + 2 * pad
    row_hs = [max(h, text_h) for _, h in tiles]
    title_h = size(title)[1] + 2 * pad if title else 0
    width = max(w * len(row) for (w, _), row in zip(tiles, rows))
    grid = Image.new("RGB", (label_w + width, title_h + sum(row_hs)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for r, (row, text, (w, h)) in enumerate(zip(rows, labels, tiles)):
        y, row_h = title_h + sum(row_hs[:r]), row_hs[r]
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
                  f"dt.load_adapter(pipe, {str(result)!r}, weight=1.0)"]
        # model.train_text_encoder: one adapter per text encoder beside the denoiser's (textenc.py)
        lines += [f"dt.load_adapter(pipe, {str(p)!r}, weight=1.0)"
                  for p in sorted(result.parent.glob(f"{result.name}_text_encoder*"))
                  if p.is_dir() and cfg.model.train_text_encoder]
        if changes_scheduler(cfg):  # trained with another prediction type / schedule than the base's (objectives.py)
            out = str(result.parent)
            lines += ["# the run's scheduler (prediction type, zero terminal SNR): sample with it",
                      f"pipe.scheduler = pipe.scheduler.from_pretrained({out!r}, subfolder='scheduler')"]
        lines += ["```"]
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
