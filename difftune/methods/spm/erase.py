"""`difftune erase`: how well a concept-erasing model erases, on a fixed, recorded prompt set.

Protocol (as MACE/GLoCE report it; ecosystem.md §3): for every concept, ``n`` images per prompt template with fixed
seeds, judged by a pluggable judge that says, per image, whether it shows the concept.

* efficacy = 1 − (share of the erased concepts' images judged to show their concept), averaged over erased concepts;
* specificity = share of the kept concepts' images still judged to show their concept, averaged over kept concepts;
* H = harmonic mean of efficacy and specificity.

Every knob (prompts, seeds, steps, guidance, judge, adapters and their weights) goes into the JSON, so a number can be
regenerated. The shipped judge is "mnist": concepts are digit words ("seven") and the shipped classifier decides.
A judge is any ``callable(images, concept) -> list[bool]`` registered in `JUDGES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...errors import bad_value
from ...fileio import atomic_write

Judge = Callable[[Sequence[Image.Image], str], list[bool]]


def mnist_judge(images: Sequence[Image.Image], concept: str) -> list[bool]:
    """True where the shipped MNIST classifier sees digit ``concept`` (a digit word, e.g. "seven")."""
    from ...eval import default_classifier, digit_features
    from ...zoo.mnist import DIGIT_WORDS, from_rgb32

    if concept not in DIGIT_WORDS:
        raise bad_value("concept", concept, f"a digit word {DIGIT_WORDS} for the mnist judge")
    _, pred = digit_features(default_classifier(), np.stack([from_rgb32(im) for im in images]))
    return [bool(p == DIGIT_WORDS.index(concept)) for p in pred]


JUDGES: dict[str, Judge] = {"mnist": mnist_judge}


def generate(pipe: Any, prompt: str, n: int, seed: int, steps: int, guidance: float) -> list[Image.Image]:
    """``n`` images of ``prompt`` from one seeded generator (the same seed gives the same noise to every model)."""
    from ...pipeline_mixin import DifftuneAdapterMixin, call_with_adapter_inputs

    g = torch.Generator("cpu").manual_seed(seed)
    kwargs = {"prompt": [prompt] * n, "num_inference_steps": steps, "guidance_scale": guidance, "generator": g}
    if isinstance(pipe, DifftuneAdapterMixin):
        return pipe(**kwargs).images
    # a stock pipeline: still pass each item's prompt to the adapters (what SPM's transport reads)
    return call_with_adapter_inputs(pipe, pipe.__call__, (), kwargs).images


def evaluate_erasure(pipe: Any, erased: Sequence[str], kept: Sequence[str], judge: str | Judge = "mnist",
                     templates: Sequence[str] = ("a handwritten digit {}",), n: int = 20, seed: int = 0,
                     steps: int = 20, guidance: float = 4.0) -> dict[str, Any]:
    """Efficacy, specificity and H of ``pipe`` (with whatever adapters it carries) on ``erased``/``kept`` concepts.

    Returns a JSON-ready dict: per concept and template the share judged to show the concept, and every knob.
    """
    if isinstance(judge, str):
        if judge not in JUDGES:
            raise bad_value("judge", judge, f"one of {sorted(JUDGES)} or a callable(images, concept) -> list[bool]")
        judge_name, judge_fn = judge, JUDGES[judge]
    elif callable(judge):
        judge_name, judge_fn = getattr(judge, "__name__", "custom"), judge
    else:
        raise bad_value("judge", judge, "a judge name or a callable")
    if not erased:
        raise bad_value("erased", erased, "at least one concept")
    if n < 1 or steps < 1:
        raise bad_value("n/steps", (n, steps), "integers >= 1")
    present: dict[str, dict[str, float]] = {}
    for ci, concept in enumerate([*erased, *kept]):
        present[concept] = {}
        for ti, template in enumerate(templates):
            prompt = template.format(concept)
            images = generate(pipe, prompt, n, seed + 1000 * ci + 100 * ti, steps, guidance)
            present[concept][prompt] = float(np.mean(judge_fn(images, concept)))
    rate = {c: float(np.mean(list(v.values()))) for c, v in present.items()}
    efficacy = 1.0 - float(np.mean([rate[c] for c in erased]))
    specificity = float(np.mean([rate[c] for c in kept])) if kept else None
    h = None
    if specificity is not None:
        h = 0.0 if efficacy + specificity == 0 else 2 * efficacy * specificity / (efficacy + specificity)
    return {"efficacy": efficacy, "specificity": specificity, "harmonic_mean": h, "present": rate,
            "present_per_prompt": present,
            "knobs": {"erased": list(erased), "kept": list(kept), "judge": judge_name, "templates": list(templates),
                      "n": n, "seed": seed, "seed_rule": "seed + 1000·concept index + 100·template index",
                      "steps": steps, "guidance": guidance, "adapters": _adapters(pipe)}}


def _adapters(pipe: Any) -> Mapping[str, Any]:
    from ...loading import list_adapters

    return {k: {f: v for f, v in info.items() if isinstance(v, (str, int, float, bool)) or v is None}
            for k, info in list_adapters(pipe).items()}


def write_report(result: Mapping[str, Any], out: str | Path) -> Path:
    """The result as ``out`` (a .json path), written atomically."""
    text = json.dumps(result, indent=2) + "\n"
    return atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
