"""The studio's logic, without Gradio: models, the adapter mix, generation, A/B comparisons and saved mixes.

`Studio` owns one pipeline (``--model``) and optionally a second one to compare with (``--compare``: a BK student
pipeline folder, or a compressed model from `difftune.compress` that is loaded onto ``--model``'s other
components). Each model is a `models.Slot` with its own lock, so one job runs at a time per model whatever calls it
(the browser, the API, a test).

A mix is a list of (adapter key, weight). Adapters are loaded once per model under a name derived from the key and
then only enabled, disabled and re-weighted; a file that changed on disk since it was loaded is loaded again.
Fused mode bakes the enabled weight-space adapters into the weights (`difftune.fuse`, exact to undo); the others
keep running as modules. Every bad input is a `DifftuneError` that names the field; the UI shows it as gr.Error.
What a caller sees of an error names files relative to the adapters folder, never a server path (`_public`), and
echoes at most a short prefix of a long value (`paths.clip`).
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from difftune import loading
from difftune.errors import DifftuneError, bad_value
from difftune.version import __version__

from . import compat, library, modes, panels, paths
from .infotext import LORA, format_infotext, save_png
from .library import MixItem
from .models import Slot, load_model
from .partner import find_plan
from .paths import clip
from .request import Limits, Request, Result

EXTRACTORS = ("none", "canny", "sobel", "outline", "skeleton")
SEED_MAX = 2**32 - 1


class Cancelled(DifftuneError):
    """The user pressed Cancel; raised from inside the denoising loop."""


def _public(method: Callable[..., Any]) -> Callable[..., Any]:
    """A `Studio` method whose errors name no server path: a `DifftuneError` keeps its type with the message passed
    through `paths.public_message`; an `OSError` (a full disk, a file that vanished) becomes a `DifftuneError` saying
    so. The original stays chained for the server's log."""
    @functools.wraps(method)
    def wrapped(self: Studio, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except DifftuneError as e:
            text = paths.public_message(str(e), self.root)
            if text == str(e):
                raise
            raise type(e)(text) from e
        except OSError as e:
            raise DifftuneError("the studio could not read or write a file: "
                                f"{paths.public_message(str(e), self.root)}") from e
    return wrapped


class Studio:
    """The app's state: the adapters folder, the model(s), where images are written, and the limits."""

    def __init__(self, model: str | Path, adapters: str | Path, compare: str | Path | None = None,
                 out: str | Path = "outputs/studio", device: str | None = None, limits: Limits | None = None,
                 models: str | Path | None = None) -> None:
        self.root = Path(adapters).resolve()
        self.models_folder, self.device = models, device  # the model dropdown's folder (catalog.py)
        self.root.mkdir(parents=True, exist_ok=True)
        self.out = Path(out).resolve()
        self.limits = limits or Limits()
        pipe, h = load_model(model, device=device)
        self.model_path = self.started = Path(model).resolve()
        self.main = self._slot(model, pipe, h)
        self.compare_slot: Slot | None = None
        if compare is not None:
            cpipe, ch = load_model(compare, base=model, device=device)
            self.compare_slot = Slot(Path(compare).resolve().name, cpipe, ch)
            # a BK student or a compressed model of --model takes --model's adapters (what it cannot hold is named)
            self.compare_slot.bases = compat.model_names(Path(compare).resolve()) | self.main.bases
            self.compare_slot.partner, self.compare_slot.teacher = True, self.main.denoiser.config
            self.compare_slot.plan = find_plan(self.main.denoiser.config, self.compare_slot.denoiser.config)
        self.cancel_event = threading.Event()

    def _slot(self, model: str | Path, pipe: Any, model_hash: str) -> Slot:
        slot = Slot(Path(model).resolve().name, pipe, model_hash)
        slot.bases = compat.model_names(Path(model).resolve()) | compat.model_names(model)
        return slot

    # -- the model dropdown
    def model_choices(self) -> dict[str, Path]:
        """Label -> folder of every model the dropdown offers (`catalog.models`), the running one first."""
        from . import catalog

        return catalog.models(self.models_folder, self.model_path, self.started)

    @_public
    def switch_model(self, label: str, mix: list[MixItem] | None = None) -> tuple[list[MixItem], list[str]]:
        """Run the model the dropdown's ``label`` names instead of the current one (no restart). The A/B model stays.

        Returns:
            the mix re-validated for the new model (`models.Slot.revalidate`: what it cannot take is dropped) and
            notes.
        """
        choices = self.model_choices()
        if label not in choices:  # only what the server listed: the page never names a path to load
            raise bad_value("model", clip(label), "one of the models the dropdown lists", "Press 'Refresh models'.")
        if choices[label] != self.model_path:
            pipe, h = load_model(choices[label], device=self.device)
            slot = self._slot(choices[label], pipe, h)
            with self.main.lock:  # a job of the old model finishes first
                self.main, self.model_path = slot, choices[label]
        return self.main.revalidate(self.root, library.check_mix(mix or []))

    # -- listing
    @_public
    def entries(self) -> list[library.Entry]:
        return library.scan(self.root)

    # -- validation
    def check(self, req: Request, slot: Slot) -> Request:
        lim = self.limits
        for name, text in (("prompt", req.prompt), ("negative prompt", req.negative)):
            if not isinstance(text, str) or len(text) > lim.max_prompt:  # echoed clipped: a 10 MB prompt stays here
                raise bad_value(name, clip(text), f"text of at most {lim.max_prompt:,} characters", "Shorten it.")
        if slot.kind == "flux" and req.negative.strip():
            # FluxPipeline would run a second, "true CFG" pass only with true_cfg_scale > 1, and FLUX.1 [dev] was
            # distilled without it: its guidance is the value embedded in the transformer. Never drop it silently.
            raise bad_value("negative prompt", clip(req.negative), "empty for a Flux model (true classifier-free "
                            "guidance is not supported here)", "Flux's guidance slider sets its distilled guidance "
                            "value; describe what you want in the prompt instead.")
        req.steps = _int_in("steps", req.steps, 1, lim.max_steps)
        req.batch = _int_in("batch", req.batch, 1, lim.max_batch)
        if isinstance(req.guidance, bool) or not isinstance(req.guidance, (int, float)) or not (
                0 <= req.guidance <= lim.max_guidance):
            raise bad_value("guidance", clip(req.guidance), f"a number in [0, {lim.max_guidance:g}]")
        if not req.randomize:
            req.seed = _int_in("seed", req.seed, -1, SEED_MAX)
        default, step, fixed = slot.size_rule()
        for name in ("width", "height"):
            v = getattr(req, name)
            if v is None or fixed:
                setattr(req, name, default)
                continue
            v = _int_in(name, v, step, lim.max_size)
            setattr(req, name, v)
            if v % step:
                raise bad_value(name, v, f"a multiple of {step} px for this model",
                                f"e.g. {max(step, v // step * step)}")
        if req.sampler and req.sampler not in slot.samplers:
            raise bad_value("sampler", clip(req.sampler), f"one of {list(slot.samplers)}")
        scale = req.control_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not -library.MAX_WEIGHT <= scale <= library.MAX_WEIGHT):
            raise bad_value("control scale", clip(req.control_scale), "a number in [-2, 2]")
        modes.check(req, slot.kind)
        if req.extractor not in EXTRACTORS:
            raise bad_value("extractor", clip(req.extractor), f"one of {list(EXTRACTORS)}")
        if slot.kind in ("dit", "pixart") and (slot.kind == "dit" or req.class_label is not None):
            ids = {i for _, i in slot.class_choices()}
            label = 0 if req.class_label is None else req.class_label
            label = int(label) if isinstance(label, float) and label.is_integer() else label
            if isinstance(label, bool) or not isinstance(label, int) or label not in ids:
                raise bad_value("class", clip(req.class_label), f"a class id of this model ({min(ids)}..{max(ids)})")
            req.class_label = label
        return req

    def effective_seed(self, req: Request) -> int:
        """The seed used: the given one, or a fresh random one when randomise is on (or the seed is -1)."""
        if req.randomize or req.seed == -1:
            return random.SystemRandom().randint(0, SEED_MAX)
        return int(req.seed)

    # -- generation
    @_public
    def generate(self, req: Request, progress: Callable[[int, int], None] | None = None,
                 slot: Slot | None = None, seed: int | None = None, tag: str = "") -> Result:
        """Generate ``req.batch`` images with the mix; PNGs with infotext are written under ``out``."""
        slot = slot or self.main
        req = self.check(req, slot)
        seed = self.effective_seed(req) if seed is None else seed
        with slot.lock:
            self.cancel_event.clear()
            notes = slot.apply_mix(self.root, req.mix, req.fused)
            if slot.partner:  # B runs what the partner holds; the notes name the rest
                req = Request(**{**req.__dict__, "mix": [i for i in req.mix if i.key in slot.loaded]})
            inputs, condition = panels.method_inputs(slot, req)
            images = self._run(slot, req, seed, inputs, progress)
            notes += panels.gamma_notes(slot, req)
            refs = {"control": self.save_input(req.control)} if condition is not None else {}
            if req.mode != modes.TXT2IMG:  # the input images, stored so that the infotext can name them
                refs["init"] = self.save_input(req.image)
                if req.mode == modes.INPAINT:
                    refs["mask"] = self.save_input(req.mask)
            texts = [self.infotext(slot, req, seed, i, refs) for i in range(len(images))]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = []
        for i, (img, text) in enumerate(zip(images, texts)):
            paths.append(save_png(img, self.out / f"{stamp}-{seed}{tag}-{i}-{random.randrange(16**6):06x}.png", text))
        return Result(paths, seed, texts, notes, condition)

    @_public
    def compare(self, req: Request, mode: str, progress: Callable[[int, int], None] | None = None
                ) -> tuple[Result, Result]:
        """A/B at one seed: ``"adapters"`` (A without the mix, B with it) or ``"model"`` (A ``--model``, B
        ``--compare``, both with the mix)."""
        if mode == "adapters":
            seed = self.effective_seed(self.check(req, self.main))
            plain = Request(**{**req.__dict__, "mix": [], "batch": 1})
            with_mix = Request(**{**req.__dict__, "batch": 1})
            return (self.generate(plain, progress, seed=seed, tag="-A"),
                    self.generate(with_mix, progress, seed=seed, tag="-B"))
        if mode == "model":
            if self.compare_slot is None:
                raise bad_value("compare mode", mode, "'adapters' (no --compare model was given)",
                                "Start the app with --compare DIR (a BK student or a compressed model).")
            seed = self.effective_seed(self.check(req, self.main))
            one = Request(**{**req.__dict__, "batch": 1})
            return (self.generate(one, progress, seed=seed, tag="-A"),
                    self.generate(Request(**one.__dict__), progress, slot=self.compare_slot, seed=seed, tag="-B"))
        raise bad_value("compare mode", clip(mode), "'adapters' or 'model'")

    def cancel(self) -> None:
        self.cancel_event.set()

    def _run(self, slot: Slot, req: Request, seed: int, inputs: dict[str, Any],
             progress: Callable[[int, int], None] | None) -> list[Image.Image]:
        import inspect

        from difftune.generation import call_defaults
        from difftune.pipeline_mixin import DifftuneAdapterMixin, call_with_adapter_inputs

        pipe = slot.variant(req.mode)  # the loaded pipeline, or its img2img/inpaint sibling sharing its modules
        sampler = req.sampler or next(iter(slot.samplers))
        pipe.scheduler = slot.samplers[sampler].from_config(slot.scheduler_config)
        # the settings the model's folder records for its calls (flow-mini's T5 length 8: the pipeline's default is
        # not what it learned), then the request's; Flux's guidance_scale is its distilled guidance value
        kwargs: dict[str, Any] = {**call_defaults(slot.pipe), "num_inference_steps": req.steps,
                                  "guidance_scale": float(req.guidance),
                                  "generator": torch.Generator("cpu").manual_seed(seed)}
        if slot.kind == "dit":
            kwargs["class_labels"] = [int(req.class_label or 0)] * req.batch
        else:
            kwargs.update(prompt=req.prompt, negative_prompt=req.negative or None, num_images_per_prompt=req.batch,
                          height=req.height, width=req.width)
            if slot.kind == "pixart":
                kwargs.update(use_resolution_binning=False, clean_caption=False)
            if req.mode == modes.IMG2IMG and "height" not in inspect.signature(type(pipe).__call__).parameters:
                del kwargs["height"], kwargs["width"]  # SD/SDXL img2img: the size is the (resized) init image's
            kwargs.update(modes.arguments(req))
        calls = [0]
        expected = modes.denoiser_calls(req, req.steps) * (2 if sampler == "Heun" else 1)

        def step(module: Any, args: Any) -> None:  # runs before every denoiser call: progress and cancel
            if self.cancel_event.is_set():
                raise Cancelled(f"cancelled at step {calls[0]}/{expected}")
            calls[0] += 1
            if progress is not None:
                progress(min(calls[0], expected), expected)

        # prepend: runs before the adapters' input capture, so a cancel leaves no captured call half-open
        handle = slot.denoiser.register_forward_pre_hook(step, prepend=True)
        try:
            # the stock __call__ (a difftune pipeline's own would expand the inputs a second time)
            mixin = isinstance(pipe, DifftuneAdapterMixin)
            call = super(DifftuneAdapterMixin, pipe).__call__ if mixin else pipe.__call__
            return list(call_with_adapter_inputs(pipe, call, (), kwargs, inputs).images)
        finally:
            handle.remove()

    def infotext(self, slot: Slot, req: Request, seed: int, index: int, refs: dict[str, str] | None = None) -> str:
        """The image's infotext: every setting *Send to Generate* puts back. Each adapter is written at its row's
        weight (the mix's, not the pipeline's: the control scale multiplies a CSC adapter's) with its file hash; the
        method panels' settings follow while an adapter of their method is enabled, and the mode's (img2img,
        inpaint). ``refs``: the stored input images' references (`save_input`) by role: control, init, mask."""
        refs = refs or {}
        sampler = req.sampler or next(iter(slot.samplers))
        info = loading.list_adapters(slot.pipe)
        adapters, loras = [], set()
        for item in req.mix:
            name, digest = slot.loaded[item.key]
            adapters.append((item.key, item.weight, digest))
            if info[name]["method"] == LORA:
                loras.add(item.key)
        # Flux's value is its distilled guidance: written as Forge writes it (no CFG runs: "CFG scale: 1")
        guidance = {"CFG scale": 1, "Distilled CFG Scale": req.guidance} if slot.kind == "flux" else {
            "CFG scale": req.guidance}
        params: dict[str, Any] = {"Steps": req.steps, "Sampler": sampler, **guidance, "Seed": seed,
                                  "Size": f"{req.width}x{req.height}", "Model hash": slot.model_hash,
                                  "Model": slot.label}
        if slot.kind == "dit" or (req.class_label is not None and slot.names("kind")):
            params["Class"] = req.class_label
        if req.batch > 1:
            params.update({"Batch size": req.batch, "Batch pos": index})
        if adapters:
            params["Adapters mode"] = "fused" if req.fused else "unfused"
        if slot.names("spm"):
            params["SPM transport"] = "on" if req.transport else "off"
        if slot.names("csc"):
            params.update({"Control extractor": req.extractor, "Control image": refs.get("control"),
                           "Control scale": 1.0 if req.control_scale is None else req.control_scale})
        params.update(modes.params(req, refs))
        params["Version"] = f"difftune {__version__}"
        return format_infotext(req.prompt if slot.kind != "dit" else "", req.negative if slot.kind != "dit" else "",
                               params, adapters, loras)

    # -- input images (control, init, mask): stored by content so an infotext can name the ones an image used
    def save_input(self, image: Image.Image) -> str:
        return panels.save_input(self.out, image)

    def stored_image(self, ref: object) -> Image.Image | None:
        return panels.stored_image(self.out, ref)

    # -- saved mixes
    @_public
    def save_mix(self, name: str, items: list[MixItem], fused: bool, how: str = "auto") -> tuple[str, str]:
        """Save the mix as one merged LoRA or as a bundle that reloads it (`merging.save_mix`); returns (the new
        entry's key, a sentence saying what was written)."""
        from .merging import save_mix

        return save_mix(self.root, self.main, name, items, fused, how)

    @_public
    def load_mix(self, key: str) -> dict[str, Any]:
        """A bundle's mix, or a single adapter as a one-item mix at weight 1."""
        if isinstance(key, str) and key.endswith(library.BUNDLE_SUFFIX):
            return library.read_bundle(self.root, key)
        library.adapter_folder(self.root, key)
        return {"items": [MixItem(key, 1.0)], "fused": False, "notes": []}


def _int_in(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():  # the UI's number boxes send 20.0
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad_value(name, clip(value), f"an integer in [{lo}, {hi}]")
    return value
