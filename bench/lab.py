"""Shared lab-benchmark helpers: train an adapter on sd-mini through the trainer, then judge it.

Used by ``bench/sara_lab.py`` and ``bench/krona_lab.py`` (``import lab`` from a script in bench/). Everything runs on
the shipped reference model (sd-mini, trained on real MNIST 0–8) and is judged by the shipped classifier:

* subject task: 20 real 9s captioned "a handwritten digit zxq" (+ 5 regularization images per digit 0–8).
  subject accuracy = share of trigger-prompt samples classified 9; FD of those samples against real 9s.
* style task: bold (dilated) digits 0–4 captioned "bold <phrasing>" (+ the same regularization images).
  style score = how much of the ink gap between plain and bold real digits the "bold ..." samples close (1 = as
  bold as the training style, 0 = plain), over digits 0–8 and separately over 5–8, never seen bold;
  style accuracy = the bold samples still show the prompted digit; FD of bold samples against bold real digits.
* retention (both): accuracy on digits 0–8 prompted without the trigger/style word.

VLHI (SaRA paper eq. 8), computed over all the methods of one task:
    VLHI_i = (max FD − FD_i)/(max FD − min FD) + (S_i − min S)/(max S − min S),
S being subject accuracy or style score (the paper uses FID and CLIP score).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import difftune as dt
from difftune.config import load_config
from difftune.counting import inspect_adapter
from difftune.eval import default_classifier, digit_features, evaluate, frechet_distance, generate_digits
from difftune.generation import load_pipeline
from difftune.train import TrainConfig, main
from difftune.zoo import path as zoo_path
from difftune.zoo.mnist import (
    DIGIT_WORDS,
    STYLE_WORD,
    SUBJECT_PROMPT,
    bold,
    split,
    write_regularization_set,
    write_style_set,
    write_subject_set,
)

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "quickstart" / "sd-mini-lora.yaml"


def subject_data(root: Path) -> Path:
    folder = root / "subject-nine"
    if not folder.exists():
        write_subject_set(folder)
        write_regularization_set(folder, per_digit=5)
    return folder


def style_data(root: Path) -> Path:
    folder = root / "style-bold"
    if not folder.exists():
        write_style_set(folder, per_digit=40)
        write_regularization_set(folder, per_digit=5)
    return folder


def train(method: dict[str, Any], data: Path, out: Path, steps: int, lr: float | None, batch_size: int = 16,
          seed: int = 0, extra: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Train ``method`` (a method mapping, e.g. {"name": "lora", "rank": 8}) on sd-mini; returns adapter facts."""
    overrides = [f"model.path={zoo_path('sd-mini')}", f"data.path={data}", f"output_dir={out}",
                 f"method={json.dumps(method)}", f"train.max_steps={steps}", f"train.batch_size={batch_size}",
                 f"seed={seed}", "validation.prompts=[]", "logging.progress_bar=false",
                 f"optimizer.lr={'null' if lr is None else lr}", *extra]
    cfg = load_config(TrainConfig, BASE_CONFIG, overrides)
    t0 = time.perf_counter()
    adapter = main(cfg)
    seconds = time.perf_counter() - t0
    info = inspect_adapter(adapter)
    return {"adapter": adapter, "seconds": seconds, "trainable": info["parameters"],
            "adapter_bytes": info["file_bytes"], "density": info.get("density")}


def load(adapter: Path | None, weight: float = 1.0) -> Any:
    """sd-mini with ``adapter`` loaded and fused (zero overhead at sampling), or the base model."""
    pipe = load_pipeline(zoo_path("sd-mini"))
    if adapter is not None:
        dt.load_adapter(pipe, adapter, name="lab", weight=weight)
        dt.fuse(pipe)
    return pipe


def judge_subject(pipe: Any, n: int = 20, steps: int = 20, guidance: float = 4.0) -> dict[str, Any]:
    per_digit = max(1, n // 2)
    trig, labels = generate_digits(pipe, [9], n, prompt=SUBJECT_PROMPT, steps=steps, guidance=guidance)
    t = evaluate(trig, labels)
    imgs, labels = generate_digits(pipe, list(range(9)), per_digit, steps=steps, guidance=guidance)
    r = evaluate(imgs, labels)
    return {"subject_accuracy": t["accuracy"], "fd": t["fd"], "fd_floor": t["fd_floor"],
            "retention": r["accuracy"], "retention_fd": r["fd"]}


def _ink(digits: np.ndarray) -> float:
    return float((digits > 0.5).mean())


def judge_style(pipe: Any, n: int = 10, steps: int = 20, guidance: float = 4.0) -> dict[str, Any]:
    """``n`` samples per digit 0–8 prompted "bold a handwritten digit <word>", and as many plain ones."""
    from difftune.zoo.mnist import from_rgb32

    clf = default_classifier()
    digits = list(range(9))
    images, labels = [], []
    for d in digits:
        im, lb = generate_digits(pipe, [d], n, prompt=f"{STYLE_WORD} a handwritten digit {DIGIT_WORDS[d]}",
                                 steps=steps, guidance=guidance)
        images += im
        labels += lb
    gen = np.stack([from_rgb32(im) for im in images])
    labels = np.asarray(labels)
    feats, pred = digit_features(clf, gen)
    real, real_labels = split("heldout", tuple(digits))
    real = real.astype(np.float32) / 255.0
    real_bold = np.stack([bold(x) for x in real])
    plain_ink, bold_ink = _ink(real), _ink(real_bold)

    def score(mask: np.ndarray) -> float:
        return (_ink(gen[mask]) - plain_ink) / (bold_ink - plain_ink)

    bold_feats, _ = digit_features(clf, real_bold)
    plain_imgs, plain_labels = generate_digits(pipe, digits, n, steps=steps, guidance=guidance)
    plain = evaluate(plain_imgs, plain_labels)
    return {"style_score": score(np.ones(len(labels), bool)), "style_score_unseen": score(labels >= 5),
            "style_accuracy": float((pred == labels).mean()), "fd": frechet_distance(feats, bold_feats),
            "retention": plain["accuracy"], "retention_ink": plain["ink"], "ink_real_plain": plain_ink,
            "ink_real_bold": bold_ink}


def vlhi(rows: list[dict[str, Any]], fd_key: str = "fd", score_key: str = "subject_accuracy") -> list[float]:
    """The SaRA paper's VLHI over ``rows`` (one task, all methods)."""
    fds = [r[fd_key] for r in rows]
    scores = [r[score_key] for r in rows]
    f_span = (max(fds) - min(fds)) or 1.0
    s_span = (max(scores) - min(scores)) or 1.0
    return [(max(fds) - f) / f_span + (s - min(scores)) / s_span for f, s in zip(fds, scores)]


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are (header, key, format) with format e.g. '{:.1%}'."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            value = r.get(key)
            cells.append("—" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
