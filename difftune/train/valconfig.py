"""The ``validation.loss`` config section (the validation loss itself: `difftune.train.valloss`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import bad_value


@dataclass
class ValidationLossConfig:
    #: a held-out folder laid out as ``data.path`` (captions beside the images; class folders for DiT); null: off
    path: str | None = None
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])  #: fixed, each image at each
    batch_size: int = 4  #: images per forward pass

    def __post_init__(self) -> None:
        if not self.timesteps or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.timesteps):
            raise bad_value("validation.loss.timesteps", self.timesteps, "a non-empty list of integers >= 0")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad_value("validation.loss.batch_size", self.batch_size, "an integer >= 1")
