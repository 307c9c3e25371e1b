"""SCEdit's trainer plugin: a CSC adapter trains on images paired with condition images (``data.kind: control``)."""

from __future__ import annotations

from torch import Tensor

from ...errors import DifftuneError
from ..context import adapter_inputs
from ..plugin import TrainerPlugin, TrainingStep, register_plugin


@register_plugin("csc")
class CSCPlugin(TrainerPlugin):
    """Training a CSC adapter: the default denoising loss, with the batch's condition images (``data.kind:
    control``) as this adapter's control input."""

    @property
    def needs_images(self) -> bool:
        return True

    def objective(self, step: TrainingStep) -> Tensor | None:
        control = step.batch.get("control")
        if control is None:
            raise DifftuneError(f"CSC adapter {self.name!r} trains on images paired with condition images: set "
                                "data.kind: control with data.condition (e.g. canny) or data.condition_path")
        with adapter_inputs(control={self.name: control.to(step.device)}):
            return step.default_loss()
