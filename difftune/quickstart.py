"""``difftune quickstart`` (``make demo``): personalize a shipped reference model to a digit it never saw.

sd-mini (``--model flow-mini``: the flow-matching MMDiT, same digits and captions) was pretrained on real MNIST
digits 0–8 only. The quickstart fine-tunes a LoRA on 20 real 9s captioned
"a handwritten digit zxq", with 5 regularization images per known digit (real training digits captioned "a handwritten
digit <word>", kohya-style: without them the shared words drift and prompts for 0–8 start producing 9s), then judges
samples before and after with the shipped classifier: how many trigger-prompt samples are 9s, and whether the prompts
for 0–8 keep their accuracy. Everything goes to ``outputs/quickstart/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import DifftuneError, bad_value

#: the models the quickstart runs on, each with its recipe configs/quickstart/<model>-lora.yaml
MODELS = ("sd-mini", "flow-mini")


def _config_path(model: str = "sd-mini") -> Path:
    """configs/ of the repository, or its copy installed as the ``difftune.configs`` package data."""
    import importlib.util

    name = f"{model}-lora.yaml"
    spec = importlib.util.find_spec("difftune.configs")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    roots.append(Path(__file__).resolve().parents[1] / "configs")
    for root in roots:
        if (root / "quickstart" / name).is_file():
            return root / "quickstart" / name
    raise DifftuneError(f"configs/quickstart/{name} is missing from this installation; reinstall difftune")


def _judge(pipe: Any, n: int, steps: int, guidance: float) -> tuple[dict[str, Any], list[Image.Image]]:
    from .eval import evaluate, generate_digits
    from .zoo.mnist import SUBJECT_PROMPT

    per_digit = max(1, n // 2)
    trig_imgs, trig_labels = generate_digits(pipe, [9], n, prompt=SUBJECT_PROMPT, steps=steps, guidance=guidance)
    base_imgs, base_labels = generate_digits(pipe, list(range(9)), per_digit, steps=steps, guidance=guidance)
    trig = evaluate(trig_imgs, trig_labels)
    base = evaluate(base_imgs, base_labels)
    metrics = {"trigger_prompt": SUBJECT_PROMPT, "trigger_nines": trig["predicted_counts"][9],
               "trigger_accuracy": trig["accuracy"], "trigger_fd": trig["fd"], "trigger_fd_floor": trig["fd_floor"],
               "digits_0_8_accuracy": base["accuracy"], "digits_0_8_fd": base["fd"],
               "digits_0_8_fd_floor": base["fd_floor"], "n_trigger": n, "n_per_digit": per_digit}
    row = trig_imgs[:9] + [base_imgs[d * per_digit] for d in range(9)]  # 9 trigger samples, then one of each 0-8
    return metrics, row


def run_quickstart(out: Path, steps: int | None = None, n: int = 20, sample_steps: int = 20,
                   guidance: float = 4.0, model_name: str = "sd-mini") -> dict[str, Any]:
    from .basemodel import absent_components
    from .config import load_config
    from .generation import call_defaults, load_pipeline
    from .loading import load_adapter
    from .train import TrainConfig, main
    from .train.reporting import labelled_grid
    from .zoo import path as zoo_path
    from .zoo.mnist import write_personalization_set

    if model_name not in MODELS:
        raise bad_value("--model", model_name, f"one of {', '.join(MODELS)}",
                        "the quickstart's recipe and judge are made for the shipped MNIST reference models")
    if n < 2:
        raise bad_value("--n", n, "an integer >= 2 (trigger samples; n/2 per digit 0-8)")
    if sample_steps < 1:
        raise bad_value("--sample-steps", sample_steps, "an integer >= 1")
    out.mkdir(parents=True, exist_ok=True)
    model = zoo_path(model_name)
    data = write_personalization_set(out / "data" / "subject-nine")  # 20 nines + 5 regularization digits 0-8 each
    # the quickstart is meant to be run again: its own previous run is replaced
    overrides = [f"model.path={model}", f"data.path={data}", f"output_dir={out / 'train'}", "overwrite=true"]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    cfg = load_config(TrainConfig, _config_path(model_name), overrides)

    print(f"[1/3] judging {model_name} before fine-tuning")
    pipe = load_pipeline(model)
    before, row_before = _judge(pipe, n, sample_steps, guidance)
    print(f"[2/3] fine-tuning a LoRA on {data} ({cfg.train.max_steps} steps)")
    adapter = main(cfg)
    print(f"[3/3] judging {model_name} + the adapter")
    load_adapter(pipe, adapter)
    after, row_after = _judge(pipe, n, sample_steps, guidance)

    labelled_grid([row_before, row_after], ["before", "after (LoRA)"],
                  f"9 x '{before['trigger_prompt']}', then digits 0-8", scale=3).save(out / "before_after.png")
    result = {"before": before, "after": after, "adapter": str(adapter), "train_steps": cfg.train.max_steps,
              "guidance": guidance, "sample_steps": sample_steps, "model": model_name}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"trigger prompt {before['trigger_prompt']!r}: {before['trigger_nines']}/{n} nines before, "
          f"{after['trigger_nines']}/{n} after")
    print(f"digits 0-8 accuracy ({before['n_per_digit']} samples each): {before['digits_0_8_accuracy']:.1%} before, "
          f"{after['digits_0_8_accuracy']:.1%} after")
    print(f"wrote {out / 'before_after.png'} (top: before, bottom: after; 9 trigger samples, then digits 0-8), "
          f"{out / 'metrics.json'}, adapter {adapter}")
    cls, extra = type(pipe).__name__, call_defaults(pipe)
    absent = "".join(f", {k}=None" for k in absent_components(model))
    call = "".join(f", {k}={v!r}" for k, v in extra.items())
    print("load the adapter into a diffusers pipeline:")
    print("    import difftune as dt")
    print(f"    from diffusers import {cls}")
    print(f"    pipe = {cls}.from_pretrained({str(model)!r}{absent})")
    print(f"    dt.load_adapter(pipe, {str(adapter)!r})")
    print(f"    pipe({before['trigger_prompt']!r}, guidance_scale={guidance}{call}).images[0]")
    return result
