"""The controls of the page that depend on the model, as Gradio updates: drawn again after a switch of the model
dropdown (the size rule, the family's steps and guidance, its samplers and classes, the negative prompt, the img2img
tab)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from . import modes
from .engine import Studio
from .models import Slot


def title(studio: Studio) -> str:
    return (f"## difftune studio — {studio.main.label}" + (
        f" (A/B model: {studio.compare_slot.label})" if studio.compare_slot else "") +
        f"\nAdapters folder: `{studio.root.name}`")  # its name: the page must not show server paths


def has_negative(slot: Slot) -> bool:
    """Whether the model takes a negative prompt: not a class-conditional DiT (no text), not Flux (its guidance is
    the distilled value embedded in the transformer; true CFG is not offered, `engine.Studio.check`)."""
    return slot.kind not in ("dit", "flux")


def guidance_label(slot: Slot) -> str:
    """The guidance slider's label: Flux's value is its distilled guidance, not classifier-free guidance."""
    if slot.kind == "flux":
        return "Guidance (Flux: distilled guidance value; no negative prompt)"
    return "Guidance (CFG)"


def model_controls(studio: Studio) -> list[Any]:
    """The updates of the controls that depend on the model (after a switch): title, prompt boxes, class, steps,
    guidance, size, sampler, the img2img tab and its mode."""
    slot = studio.main
    size, step, fixed = slot.size_rule()
    classes, family, lim = slot.class_choices(), slot.defaults(), studio.limits
    text = slot.kind != "dit"
    return [title(studio), gr.update(visible=text), gr.update(visible=has_negative(slot), value=""),
            gr.update(choices=classes, value=classes[0][1] if slot.kind == "dit" else None, visible=bool(classes)),
            min(family["steps"], lim.max_steps),
            gr.update(value=min(family["guidance"], lim.max_guidance), label=guidance_label(slot)),
            *[gr.update(value=size, step=step, minimum=step, interactive=not fixed) for _ in range(2)],
            gr.update(choices=list(slot.samplers), value=next(iter(slot.samplers))),
            gr.update(visible=slot.kind in modes.PIPELINES), modes.TXT2IMG]
