"""Judge generated digits with the shipped MNIST classifier: accuracy, Fréchet distance, ink, diversity.

- **accuracy**: fraction classified as the intended digit.
- **fd**: Fréchet distance between the classifier's 128-d penultimate features of the samples and of the real
  *training-split* digits of the same classes; **fd_floor** is the same distance for as many *held-out* real digits
  of each class (at most the 100 held out per class; ``n_floor``), i.e. what perfect samples would score at this
  sample size. Both are None below 2 samples.
- **ink**: mean fraction of pixels above 0.5 (stroke thickness; the "bold" style roughly doubles it).
- **diversity**: mean pairwise feature distance between samples of the same intended digit, next to the same for
  held-out real digits (**diversity_real**).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..components import pipeline_kind
from ..generation import call_defaults
from .classifier import DigitClassifier, load_classifier, to_tensor


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """||μa − μb||² + Tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), with symmetric square roots by eigendecomposition.

    None when either set has fewer than 2 samples (no covariance).
    """
    if len(a) < 2 or len(b) < 2:
        return None
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def sqrtm(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    ra = sqrtm(sa)
    cross = sqrtm(ra @ sb @ ra)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.trace(cross))


@torch.no_grad()
def digit_features(clf: DigitClassifier, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``clf``'s penultimate features (N, 128) float64 and predicted digits (N,) for ``digits`` (N, 28, 28)."""
    x = to_tensor(digits)
    feats = clf.features(x)
    return feats.numpy().astype(np.float64), clf.head(feats).argmax(1).numpy()


def _diversity(feats: np.ndarray, labels: np.ndarray) -> float:
    values = []
    for d in np.unique(labels):
        f = feats[labels == d]
        if len(f) > 1:
            dist = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
            values.append(dist[np.triu_indices(len(f), 1)].mean())
    return float(np.mean(values)) if values else 0.0


@functools.cache
def default_classifier() -> DigitClassifier:
    """The shipped MNIST classifier, loaded once per process (the judge of `evaluate` and SPM's erasure report)."""
    return load_classifier()


@functools.cache
def _reference_features(classes: tuple[int, ...]) -> np.ndarray:
    from ..zoo.mnist import split

    return digit_features(default_classifier(), split("train", classes)[0])[0]


def evaluate(images: Sequence[Image.Image | np.ndarray], labels: Sequence[int],
             classifier: DigitClassifier | None = None) -> dict[str, Any]:
    """Metrics for generated ``images`` whose intended digits are ``labels``."""
    from ..zoo.mnist import from_rgb32, split

    clf = classifier or default_classifier()
    labels = np.asarray(labels)
    digits = np.stack([from_rgb32(im) for im in images])
    feats, pred = digit_features(clf, digits)
    classes = tuple(int(d) for d in np.unique(labels))
    xh, yh = split("heldout", classes)
    ref_feats = (_reference_features(classes) if classifier is None
                 else digit_features(clf, split("train", classes)[0])[0])
    # The floor: as many held-out real digits of each class as there are samples of it (at most the 100 held out
    # per class), so it carries the same small-sample bias as `fd`.
    rng = np.random.default_rng(0)
    pick = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(yh == d), size=min(int((labels == d).sum()), int((yh == d).sum())), replace=False)
        for d in classes]))
    held_feats, _ = digit_features(clf, xh[pick])
    per_digit = {int(d): float((pred[labels == d] == d).mean()) for d in classes}
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()),
        "per_digit_accuracy": per_digit,
        "predicted_counts": {int(d): int((pred == d).sum()) for d in range(10)},
        "fd": frechet_distance(feats, ref_feats),
        "fd_floor": frechet_distance(held_feats, ref_feats),
        "n_floor": int(len(pick)),
        "ink": float((digits > 0.5).mean()),
        "ink_real": float((xh[pick] / 255.0 > 0.5).mean()),
        "diversity": _diversity(feats, labels),
        "diversity_real": _diversity(held_feats, yh[pick]),
    }


def grid(images: Sequence[Image.Image], rows: int, scale: int = 2) -> Image.Image:
    """Images laid out in ``rows`` rows (row-major), upscaled ``scale``× for viewing."""
    cols = -(-len(images) // rows)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        out.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST)


def generate_digits(pipe: Any, digits: Sequence[int], n: int, prompt: str | None = None, seed: int = 0,
                    steps: int = 25, guidance: float = 4.0, batch: int = 50) -> tuple[list[Image.Image], list[int]]:
    """``n`` samples per digit: class labels for DiT, "a handwritten digit <word>" (or ``prompt``) for text models."""
    from ..errors import bad_value
    from ..zoo.mnist import DIGIT_WORDS

    if n < 1 or steps < 1:
        raise bad_value("--n" if n < 1 else "--steps", n if n < 1 else steps, "an integer >= 1")
    images: list[Image.Image] = []
    labels: list[int] = []
    is_dit = pipeline_kind(pipe) == "dit"
    recorded = call_defaults(pipe)
    for d in digits:
        for start in range(0, n, batch):
            k = min(batch, n - start)
            g = torch.Generator("cpu").manual_seed(seed + 1000 * d + start)
            if is_dit:
                out = pipe(class_labels=[d] * k, num_inference_steps=steps, guidance_scale=guidance, generator=g)
            else:
                text = prompt or f"a handwritten digit {DIGIT_WORDS[d]}"
                out = pipe(prompt=[text] * k, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                           **recorded)
            images.extend(out.images)
            labels.extend([d] * k)
    return images, labels


def write_report(out: str | Path, metrics: dict[str, Any], images: Sequence[Image.Image], rows: int) -> Path:
    from ..errors import bad_value

    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise bad_value("--out", str(out), "a folder that can be created", str(e)) from e
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    grid(images, rows).save(folder / "grid.png")
    return folder
