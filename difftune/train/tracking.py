"""Experiment trackers (``logging.report_to``): every tracker accelerate supports, checked before a run starts, and
the validation grid logged to each through accelerate's tracker API.

accelerate itself drops a named tracker whose package is missing with a debug-level log line only, so a run asked
to log to W&B would train for hours and log nowhere; here that is an error naming the key and the pip package.
"""

from __future__ import annotations

from typing import Any

from ..errors import DifftuneError, bad_value

#: pip package of each accelerate tracker whose package name differs from the tracker's name
PIP_PACKAGES = {"comet_ml": "comet-ml"}
#: how many images each tracker's ``log_images`` takes per key: a batch (N, H, W, C), one image, or a list
_ONE_IMAGE = ("aim", "clearml")


def supported_trackers() -> list[str]:
    """The tracker names accelerate knows: its own, and any registered with ``accelerate.tracking.
    register_tracker_class``."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def tracker_names(report_to: str) -> list[str]:
    """``logging.report_to`` ('none', 'all', or comma-separated tracker names) as a list, checked against
    accelerate's trackers; errors name the key."""
    if not isinstance(report_to, str):
        raise bad_value("logging.report_to", report_to, "a tracker name, several separated by commas, 'all' or 'none'")
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    known = supported_trackers()
    expected = f"'none', 'all', or trackers accelerate supports separated by commas: {', '.join(known)}"
    if not names or (len(names) > 1 and ({"none", "all"} & set(names))):
        raise bad_value("logging.report_to", report_to, expected)
    unknown = [n for n in names if n not in known and n not in ("none", "all")]
    if unknown:
        raise bad_value("logging.report_to", report_to, expected,
                        f"{unknown[0]!r} is not one of them; a custom tracker is registered with "
                        "accelerate.tracking.register_tracker_class")
    return names


def check_trackers(report_to: str) -> list[str] | None:
    """What to pass as ``Accelerator(log_with=...)``: None for 'none', else the names, each tracker's package
    importable (an error naming ``logging.report_to`` and the pip package otherwise)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = tracker_names(report_to)
    if names == ["none"]:
        return None
    builtin = {t.value for t in LoggerType}
    available = {t.value for t in get_available_trackers()}
    for name in names:
        if name in builtin and name != "all" and name not in available:
            package = PIP_PACKAGES.get(name, name)
            raise DifftuneError(
                f"`logging.report_to` names the tracker {name!r}, but its package is not installed (accelerate would "
                f"silently log nowhere). Hint: pip install {package}, or set logging.report_to: none")
    return names


def log_grid(accelerator: Any, grid: Any, step: int) -> list[str]:
    """Log the validation ``grid`` (a PIL image) to every tracker whose accelerate class logs images; returns the
    names of those that got it (MLflow, Comet, DVCLive and Trackio have no ``log_images`` in accelerate)."""
    import numpy as np

    image = np.asarray(grid.convert("RGB"))
    logged = []
    for tracker in accelerator.trackers:
        log_images = getattr(tracker, "log_images", None)
        if log_images is None:
            continue
        if tracker.name == "tensorboard":
            log_images({"validation": image[None]}, step, dataformats="NHWC")
        elif tracker.name in _ONE_IMAGE:
            log_images({"validation": image}, step)
        else:  # W&B, SwanLab and custom trackers take a list of images per key
            log_images({"validation": [image]}, step)
        logged.append(tracker.name)
    return logged
