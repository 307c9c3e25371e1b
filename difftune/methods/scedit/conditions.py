"""Condition images for controllable tuners (SCEdit's CSC-Tuner): edge and shape maps with numpy and PIL only.

Every extractor takes an image (PIL, a (H, W[, C]) numpy array in [0, 255] or [0, 1], or a path) and returns a
greyscale PIL image, white structure on black, the same size. ``EXTRACTORS`` maps the names used by configs
(``data.condition``) and the CLI to the functions; `to_tensor` turns any image into the (1, 3, H, W) [0, 1] tensor
a control input expects.

* ``canny``: Canny's detector (Gaussian blur σ, Sobel gradients, non-maximum suppression across the gradient
  direction in 4 bins, double threshold with hysteresis). Thresholds are fractions of the largest gradient.
* ``sobel``: the Sobel gradient magnitude, normalised to [0, 255] (a soft edge map).
* ``outline``: the boundary of the thresholded shape (pixels of the shape with a background 4-neighbour).
* ``skeleton``: the shape thinned to 1-pixel lines (Zhang & Suen, 1984).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...errors import bad_value


def _grey(image: Any) -> np.ndarray:
    """(H, W) float array in [0, 1]."""
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.transpose(1, 2, 0)
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        a = image.astype(np.float64)
        a = a.mean(axis=2) if a.ndim == 3 else a
        return a / 255.0 if a.max() > 1.0 else a
    raise bad_value("image", type(image).__name__, "a PIL image, a path, or a (H, W[, C]) array/tensor")


def _image(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def _filter(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """2-D correlation with edge padding (small kernels only)."""
    r0, r1 = k.shape[0] // 2, k.shape[1] // 2
    p = np.pad(a, ((r0, r0), (r1, r1)), mode="edge")
    out = np.zeros_like(a)
    for i in range(k.shape[0]):
        for j in range(k.shape[1]):
            out += k[i, j] * p[i:i + a.shape[0], j:j + a.shape[1]]
    return out


def _gradients(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    kx = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    return _filter(a, kx), _filter(a, kx.T)


def sobel(image: Any) -> Image.Image:
    """Sobel gradient magnitude, scaled so the strongest edge is white."""
    gx, gy = _gradients(_grey(image))
    mag = np.hypot(gx, gy)
    return _image(mag / mag.max() if mag.max() > 0 else mag)


def canny(image: Any, low: float = 0.1, high: float = 0.3, sigma: float = 1.0) -> Image.Image:
    """Canny edges (binary). ``low``/``high`` are fractions of the largest gradient magnitude; ``sigma`` blurs."""
    if not 0 <= low <= high <= 1:
        raise bad_value("low/high", (low, high), "0 <= low <= high <= 1", "fractions of the largest gradient")
    a = _grey(image)
    if sigma > 0:
        r = max(1, int(round(2 * sigma)))
        g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
        g /= g.sum()
        a = _filter(_filter(a, g[None, :]), g[:, None])
    gx, gy = _gradients(a)
    mag = np.hypot(gx, gy)
    if mag.max() == 0:
        return _image(np.zeros_like(mag))
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    bins = (np.round(angle / 45.0).astype(int)) % 4  # 0: horizontal gradient, 1: 45°, 2: vertical, 3: 135°
    p = np.pad(mag, 1)
    h, w = mag.shape
    shifts = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros_like(mag, dtype=bool)
    for b, ((dy1, dx1), (dy2, dx2)) in shifts.items():
        n1 = p[1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        n2 = p[1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        keep |= (bins == b) & (mag >= n1) & (mag >= n2)
    thin = np.where(keep, mag / mag.max(), 0.0)
    strong, weak = thin >= high, thin >= low
    edges = strong
    while True:  # hysteresis: weak pixels 8-connected to a strong one join, until nothing changes
        grown = _dilate(edges) & weak
        if np.array_equal(grown, edges):
            break
        edges = grown
    return _image(edges.astype(np.float64))


def _dilate(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    out = np.zeros_like(m)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
    return out


def _mask(image: Any, threshold: float) -> np.ndarray:
    if not 0 < threshold < 1:
        raise bad_value("threshold", threshold, "a number in (0, 1)", "0.5 separates ink from paper")
    return _grey(image) > threshold


def outline(image: Any, threshold: float = 0.5) -> Image.Image:
    """The boundary of the shape ``image > threshold``: shape pixels with a background 4-neighbour."""
    m = _mask(image, threshold)
    p = np.pad(m, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return _image((m & ~interior).astype(np.float64))


def skeleton(image: Any, threshold: float = 0.5) -> Image.Image:
    """The shape ``image > threshold`` thinned to 1-pixel lines (Zhang-Suen)."""
    m = np.pad(_mask(image, threshold), 1).astype(np.uint8)
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            p2, p3, p4 = m[:-2, 1:-1], m[:-2, 2:], m[1:-1, 2:]
            p5, p6, p7 = m[2:, 2:], m[2:, 1:-1], m[2:, :-2]
            p8, p9 = m[1:-1, :-2], m[:-2, :-2]
            ring = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
            neighbours = sum(ring[:8])
            transitions = sum(((ring[i] == 0) & (ring[i + 1] == 1)).astype(np.uint8) for i in range(8))
            first = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)  # the two sub-iterations peel opposite sides
            c = first if step == 0 else (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            centre = m[1:-1, 1:-1]
            drop = (centre == 1) & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & c
            if drop.any():
                centre[drop] = 0
                changed = True
    return _image(m[1:-1, 1:-1].astype(np.float64))


EXTRACTORS: dict[str, Callable[..., Image.Image]] = {
    "canny": canny, "sobel": sobel, "outline": outline, "skeleton": skeleton}


def extract(name: str, image: Any) -> Image.Image:
    """The condition ``name`` (`EXTRACTORS`) of ``image``."""
    if name not in EXTRACTORS:
        raise bad_value("condition", name, f"one of {sorted(EXTRACTORS)}", "or give ready condition images")
    return EXTRACTORS[name](image)


def to_tensor(image: Any, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """(1, 3, H, W) float tensor in [0, 1] of ``image`` (resized to ``size`` when given); tensors pass through."""
    if isinstance(image, torch.Tensor):
        t = image.float()
        t = t[None] if t.dim() == 3 else t
        if t.dim() != 4:
            raise bad_value("control", tuple(image.shape), "a (C, H, W) or (B, C, H, W) tensor")
        return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        image = _image(_grey(image))
    if not isinstance(image, Image.Image):
        raise bad_value("control", type(image).__name__, "a PIL image, a path, an array or a tensor")
    image = image.convert("RGB")
    if size is not None:
        image = image.resize((size, size) if isinstance(size, int) else (size[1], size[0]), Image.BILINEAR)
    a = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


# -- control images for CSC adapters in a pipeline ------------------------------------------------------------------


def control_adapters(pipe: Any) -> list[str]:
    """Names of the loaded adapters that take a control image (method ``csc``)."""
    from ...loading import list_adapters

    return [n for n, info in list_adapters(pipe).items() if info["method"] == "csc"]


def _batch(value: Any) -> torch.Tensor:
    if isinstance(value, (list, tuple)):  # one image per prompt
        return torch.cat([to_tensor(v) for v in value]) if value else to_tensor(value)
    return to_tensor(value)


def control_inputs(pipe: Any, control: Any, num_images_per_prompt: int = 1) -> dict[str, torch.Tensor]:
    """``{CSC adapter name: (B, 3, H, W) tensor}`` from ``control``: an image (PIL, path, array, tensor) for the
    only CSC adapter, or a mapping ``{adapter name: image}``; a list of images gives one per prompt."""
    names = control_adapters(pipe)
    if not isinstance(control, Mapping):
        if len(names) != 1:
            raise bad_value("control", type(control).__name__, f"a mapping {{adapter name: image}} over the CSC "
                            f"adapters {names}" if names else "no control image: no CSC adapter is loaded",
                            "One image is enough only when exactly one CSC adapter is loaded.")
        control = {names[0]: control}
    unknown = sorted(set(control) - set(names))
    if unknown:
        raise bad_value("control", unknown, f"names of loaded CSC adapters {names}")
    out = {}
    for name, value in control.items():
        t = _batch(value)
        out[name] = t.repeat_interleave(num_images_per_prompt, dim=0) if t.shape[0] > 1 else t
    return out


@contextlib.contextmanager
def control_scales(pipe: Any, scale: float | Mapping[str, float] | None) -> Iterator[None]:
    """Set CSC adapters' weights (the control scale) for the block and put the old ones back after."""
    from ...loading import list_adapters, set_adapter_weights

    if scale is None:
        yield
        return
    names = control_adapters(pipe)
    if not isinstance(scale, Mapping):
        if len(names) != 1:
            raise bad_value("control_scale", scale, f"a mapping {{adapter name: scale}} over {names}")
        scale = {names[0]: scale}
    old = {n: info["weight"] for n, info in list_adapters(pipe).items() if n in scale}
    set_adapter_weights(pipe, scale)
    try:
        yield
    finally:
        set_adapter_weights(pipe, old)


class ControlMixin:
    """``control=`` and ``control_scale=`` on a difftune pipeline's ``__call__`` (SCEdit's CSC adapters)."""

    def __call__(self, *args: Any, control: Any = None, control_scale: float | Mapping[str, float] | None = None,
                 adapter_inputs: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        inputs = dict(adapter_inputs or {})
        if control is not None:
            inputs["control"] = control_inputs(self, control, int(kwargs.get("num_images_per_prompt") or 1))
        with control_scales(self, control_scale):
            return super().__call__(*args, adapter_inputs=inputs, **kwargs)
