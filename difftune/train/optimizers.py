"""The optimizer ``cfg.optimizer`` names: adamw, adamw8bit, sgd, prodigy, schedulefree_adamw, or any
``torch.optim.Optimizer`` subclass by its import path (``optimizer.class: "torch.optim.RAdam"`` with
``optimizer.kwargs``).

Prodigy (``prodigyopt``) and schedule-free AdamW (``schedulefree``) are optional extras: ``pip install
difftune[optimizers]``. Schedule-free keeps two weight sequences: it trains on one and evaluates on the other, so the
trainer calls ``optimizer.train()`` before training, `eval_weights` around each validation and `eval_mode` before
the final save. Checkpoints are written in train mode (weights and optimizer state as the next step needs them),
which keeps resume exact.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import bad_value
from ..methods.plugin import TrainerPlugin
from ..methods.verbs import refresh
from .config import TrainConfig

#: ``optimizer.name`` values served by an optional package: (import path of the class, pip package)
EXTRA_OPTIMIZERS = {"prodigy": ("prodigyopt.Prodigy", "prodigyopt"),
                    "schedulefree_adamw": ("schedulefree.AdamWScheduleFree", "schedulefree")}


def optimizer_class(path: str, key: str = "optimizer.class", package: str | None = None) -> type:
    """The ``torch.optim.Optimizer`` subclass at import path ``path`` ("package.module.Class").

    Raises:
        DifftuneError: naming ``key``: not a dotted path, not importable (``package``: the pip package to install),
            no such attribute, or not an optimizer class.
    """
    module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise bad_value(key, path, "an import path 'package.module.Class'", "e.g. torch.optim.RAdam")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = f"pip install {package} (or difftune[optimizers])" if package else f"{e}; is its package installed?"
        raise bad_value(key, path, "an importable module's optimizer class", hint) from e
    cls = getattr(module, name, None)
    if cls is None:
        public = sorted(n for n in dir(module) if isinstance(getattr(module, n), type)
                        and issubclass(getattr(module, n), torch.optim.Optimizer))[:8]
        raise bad_value(key, path, f"a class that {module_name} defines", f"its optimizers include {public}")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise bad_value(key, path, "a torch.optim.Optimizer subclass", f"{path} is {type(cls).__name__}")
    return cls


def _construct(cls: type, params: list[Any], kwargs: dict[str, Any], key: str) -> Any:
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as e:  # an unknown keyword or a value the optimizer refuses
        raise bad_value(key, kwargs, f"arguments {cls.__name__} accepts",
                        f"{cls.__name__} said: {e}") from e


def build_optimizer(cfg: TrainConfig, plugin: TrainerPlugin, params: list[nn.Parameter], lr: float) -> Any:
    """The plugin's own optimizer if it makes one, else ``cfg.optimizer``'s."""
    own = plugin.make_optimizer(params, cfg.optimizer, lr)
    return own if own is not None else default_optimizer(cfg, params, lr)


def default_optimizer(cfg: TrainConfig, params: list[Any], lr: float) -> Any:
    """``cfg.optimizer``'s optimizer over ``params`` (parameters, or parameter groups whose own ``lr`` wins)."""
    o = cfg.optimizer
    if o.class_:
        return _construct(optimizer_class(o.class_), params, {"lr": lr, **o.kwargs}, "optimizer.kwargs")
    common = {"lr": lr, "weight_decay": o.weight_decay}
    adam = {**common, "betas": tuple(o.betas), "eps": o.eps}
    if o.name in EXTRA_OPTIMIZERS:
        path, package = EXTRA_OPTIMIZERS[o.name]
        return _construct(optimizer_class(path, "optimizer.name", package), params, {**adam, **o.kwargs},
                          "optimizer.kwargs")
    if o.name == "sgd":
        return _construct(torch.optim.SGD, params, {**common, **o.kwargs}, "optimizer.kwargs")
    if o.name == "adamw8bit":
        if not torch.cuda.is_available():
            raise bad_value("optimizer.name", "adamw8bit", "'adamw' on a machine without CUDA",
                            "8-bit Adam (bitsandbytes) runs on CUDA GPUs only")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise bad_value("optimizer.name", "adamw8bit", "usable only with bitsandbytes installed",
                            "pip install bitsandbytes") from e
        return _construct(bnb.optim.AdamW8bit, params, {**adam, **o.kwargs}, "optimizer.kwargs")
    return _construct(torch.optim.AdamW, params, {**adam, **o.kwargs}, "optimizer.kwargs")


def _switches(optimizer: Any) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    return callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))


def train_mode(optimizer: Any) -> None:
    """Put a schedule-free optimizer in train mode (a no-op for other optimizers)."""
    if _switches(optimizer):
        optimizer.train()


def eval_mode(optimizer: Any, model: nn.Module) -> None:
    """Put a schedule-free optimizer's evaluation weights in place in ``model`` (a no-op for other optimizers)."""
    if _switches(optimizer):
        optimizer.eval()
        refresh(model)  # the swap writes the parameters in place; merged adapters rewrite their base weights


@contextmanager
def eval_weights(optimizer: Any, model: nn.Module) -> Iterator[None]:
    """Within the block, a schedule-free optimizer's evaluation weights are in place in ``model``; after it, the
    training weights exactly as they were (restored from a copy: the inverse swap alone is not exact in floating
    point, and a run that validates must train on as one that resumed past the validation)."""
    if not _switches(optimizer):
        yield
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept = [p.detach().clone() for p in params]
    eval_mode(optimizer, model)
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, value in zip(params, kept):
                p.copy_(value)
        refresh(model)
