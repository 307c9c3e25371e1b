"""``logging.report_to`` takes every tracker accelerate supports (issue 25, item 6): the validation grid goes to the
trackers too, and a tracker that is not accelerate's or whose package is missing is an error naming the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import difftune as dt
from difftune.config import load_config
from difftune.train import TrainConfig, main

REPO = Path(__file__).resolve().parents[2]


def _cfg(tiny, out: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={tiny['sd']}", f"data.path={tiny['captions']}", f"output_dir={out}", "train.max_steps=1",
        "validation.at_start=false", *sets])


class Recorder:
    """A tracker registered with accelerate the way users add their own (``register_tracker_class``): it keeps
    what it is given."""

    calls: list[tuple[str, dict, int | None]] = []

    def __init__(self, run_name: str, **kwargs) -> None:
        from accelerate.tracking import GeneralTracker

        GeneralTracker.__init__(self)

    name = "recorder"
    requires_logging_directory = False
    main_process_only = True
    tracker = None

    def start(self) -> None: ...

    def store_init_configuration(self, values: dict) -> None:
        Recorder.calls.append(("config", values, None))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        Recorder.calls.append(("log", values, step))

    def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        Recorder.calls.append(("images", values, step))

    def finish(self) -> None: ...


def test_validation_grid_goes_to_tensorboard_and_a_registered_tracker(tiny, tmp_path, monkeypatch):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setitem(LOGGER_TYPE_TO_CLASS, "recorder", type("Recorder", (Recorder, GeneralTracker), {}))
    monkeypatch.setattr(Recorder, "calls", [])
    out = tmp_path / "out"
    main(_cfg(tiny, out, "logging.report_to=tensorboard,recorder"))
    grid = np.asarray(Image.open(out / "validation" / "step-000001.png").convert("RGB"))
    images = [(values, step) for kind, values, step in Recorder.calls if kind == "images"]
    assert len(images) == 1 and images[0][1] == 1
    assert np.array_equal(images[0][0]["validation"][0], grid)  # the grid written to disk, pixel for pixel
    assert any(kind == "config" for kind, _, _ in Recorder.calls)
    events = [EventAccumulator(str(p.parent)).Reload() for p in (out / "logs").rglob("events.out.tfevents.*")]
    tagged = [e for e in events if "validation" in e.Tags()["images"]]
    assert len(tagged) == 1
    shot = tagged[0].Images("validation")[-1]
    assert shot.step == 1 and (shot.width, shot.height) == (grid.shape[1], grid.shape[0])


def test_a_tracker_accelerate_does_not_know_is_refused_naming_the_key(tiny, tmp_path):
    with pytest.raises(dt.DifftuneError, match=r"`logging.report_to` must be 'none', 'all', or trackers accelerate "
                                               r"supports separated by commas: .*tensorboard.*wandb.*'neptune'"):
        _cfg(tiny, tmp_path, "logging.report_to=neptune")
    with pytest.raises(dt.DifftuneError, match=r"`logging.report_to`"):
        _cfg(tiny, tmp_path, "logging.report_to=none,tensorboard")


def test_a_tracker_whose_package_is_missing_is_an_error_naming_the_pip_package(tiny, tmp_path):
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    from difftune.train.tracking import PIP_PACKAGES

    available = {t.value for t in get_available_trackers()}
    missing = [t.value for t in LoggerType if t.value not in available | {"all"}]
    if not missing:
        pytest.skip("every tracker accelerate supports is installed here")
    name = "wandb" if "wandb" in missing else missing[0]
    with pytest.raises(dt.DifftuneError, match=rf"`logging.report_to` names the tracker '{name}', but its package is "
                                               rf"not installed.*pip install {PIP_PACKAGES.get(name, name)}"):
        main(_cfg(tiny, tmp_path / "out", f"logging.report_to={name}"))
