"""lycoris-lora as the reference reader of kohya/LyCORIS files (LoCon, LoHa, LoKr, full, norms)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def lycoris_loader(monkeypatch):
    """lycoris-lora's own loader over a model, reading kohya ``<prefix>_*`` keys as written: {kohya name: module}."""
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    def load(path, model, prefix="lora_unet"):
        monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", prefix)  # its default names modules "lycoris_<path>"
        network, _ = create_lycoris_from_weights(1.0, str(path), model)
        return {m.lora_name: m for m in network.loras}

    return load


@torch.no_grad()
def lycoris_delta(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW, Δb) of a lycoris-lora module: for LoHa/LoKr what its forward adds (``get_weight``; their
    ``get_diff_weight`` applies α/r twice), else its ``get_diff_weight``."""
    if type(module).__name__ in ("LohaModule", "LokrModule"):
        return module.get_weight(module.shape), None
    return module.get_diff_weight()


@pytest.fixture
def lycoris_error():
    """max |ΔW_lycoris − ΔW_ours| over {module name: {"weight": ΔW[, "bias": Δb]}} (kohya names under ``prefix``)."""

    def error(modules, ours, prefix="lora_unet"):
        worst = 0.0
        for name, delta in ours.items():
            w, b = lycoris_delta(modules[f"{prefix}_{name.replace('.', '_')}"])
            worst = max(worst, float((w.reshape(delta["weight"].shape) - delta["weight"]).abs().max()))
            if "bias" in delta:
                worst = max(worst, float((b.reshape(delta["bias"].shape) - delta["bias"]).abs().max()))
        return worst

    return error
