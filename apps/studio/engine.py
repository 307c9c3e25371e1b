"""The studio's logic, without Gradio: models, the adapter mix, generation, A/B comparisons and saved mixes.

`Studio` owns one pipeline (``--model``) and optionally a second one to compare with (``--compare``: a BK student
pipeline folder, or a compressed model from `difftune.compress` that is loaded onto ``--model``'s other
components). Each model is a `Slot` with its own lock, so one job runs at a time per model whatever calls it (the
browser, the API, a test).

A mix is a list of (adapter key, weight). Adapters are loaded once per model under a name derived from the key and
then only enabled, disabled and re-weighted; a file that changed on disk since it was loaded is loaded again.
Fused mode bakes the enabled weight-space adapters into the weights (`difftune.fuse`, exact to undo); the others
keep running as modules. Every bad input is a `DifftuneError` that names the field; the UI shows it as gr.Error.
What a caller sees of an error names files relative to the adapters folder, never a server path (`_public`), and
echoes at most a short prefix of a long value (`paths.clip`).
"""

from __future__ import annotations

import functools
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from difftune import loading
from difftune.components import denoiser_name, pipeline_kind
from difftune.errors import DifftuneError, bad_value
from difftune.serialization import WEIGHTS_NAME
from difftune.version import __version__

from . import library, paths
from .infotext import format_infotext, save_png
from .library import MixItem
from .paths import clip

#: A1111 sampler names → diffusers scheduler classes; a pipeline offers those its scheduler lists as compatible.
SAMPLERS = {
    "DDIM": "DDIMScheduler", "Euler": "EulerDiscreteScheduler", "Euler a": "EulerAncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler", "DPM++ 2S": "DPMSolverSinglestepScheduler",
    "UniPC": "UniPCMultistepScheduler", "DEIS": "DEISMultistepScheduler", "Heun": "HeunDiscreteScheduler",
    "PNDM": "PNDMScheduler", "LMS": "LMSDiscreteScheduler", "DDPM": "DDPMScheduler", "LCM": "LCMScheduler",
}
EXTRACTORS = ("none", "canny", "sobel", "outline", "skeleton")
MIX_FOLDER = "studio-mixes"  #: where "save this mix" writes, inside the adapters folder
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (a public studio must not be made to allocate without limit)."""

    max_size: int = 1024
    max_steps: int = 150
    max_batch: int = 8
    max_guidance: float = 30.0
    max_prompt: int = 2000


@dataclass
class Request:
    """One generation request; `Studio.check` validates it against the model and `Limits`."""

    prompt: str = ""
    negative: str = ""
    steps: int = 20
    guidance: float = 4.0
    width: int | None = None
    height: int | None = None
    sampler: str = ""
    batch: int = 1
    seed: int = 0
    randomize: bool = False
    mix: list[MixItem] = field(default_factory=list)
    fused: bool = False
    transport: bool = True  # SPM facilitated transport
    control: Image.Image | None = None  # SCEdit CSC control image
    extractor: str = "none"
    control_scale: float | None = None
    class_label: int | None = None  # class-conditional DiT


@dataclass
class Result:
    images: list[Path]
    seed: int
    infotexts: list[str]
    notes: list[str]
    condition: Image.Image | None = None


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


def _slug(key: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_]+", "_", key).strip("_") or "adapter"
    base = base if base[0].isalpha() else f"a_{base}"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _hash_files(files: list[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:10]


def load_model(path: str | Path, base: str | Path | None = None, device: str | None = None) -> tuple[Any, str]:
    """(pipeline, model hash) for a diffusers pipeline folder, or a compressed denoiser loaded onto ``base``."""
    from difftune.generation import load_pipeline

    folder = Path(path)
    if (folder / "model_index.json").is_file():
        pipe = load_pipeline(folder, device=device)
        den = denoiser_name(pipe.components) or ""
        files = sorted((folder / den).glob("*.safetensors"))
    elif (folder / "model.safetensors").is_file() and base is not None:
        from difftune.compress import load_compressed_pipeline

        pipe = load_compressed_pipeline(base, folder, device=device or "cpu")
        pipe.set_progress_bar_config(disable=True)
        files = [folder / "model.safetensors"]
    else:
        raise bad_value("--model/--compare", str(path), "a diffusers pipeline folder (model_index.json) or a "
                        "compressed model folder (model.safetensors, with --model as its base)")
    from difftune.zoo import path as zoo_path

    if pipeline_kind(pipe) == "dit" and Path(base or folder).resolve() == zoo_path("dit-mini").resolve():
        from difftune.zoo.mnist import DIGIT_WORDS

        pipe.labels = {word: i for i, word in enumerate(DIGIT_WORDS)}  # as difftune.zoo.load does
    return pipe, _hash_files(files) if files else ""


class Slot:
    """One loaded model: its pipeline, lock, scheduler choices and the adapters loaded into it."""

    def __init__(self, label: str, pipe: Any, model_hash: str) -> None:
        self.label, self.pipe, self.model_hash = label, pipe, model_hash
        self.kind = pipeline_kind(pipe)
        self.lock = threading.Lock()
        self.loaded: dict[str, tuple[str, str]] = {}  # key -> (adapter name, file hash at load)
        self.scheduler_config = dict(pipe.scheduler.config)
        own = type(pipe.scheduler).__name__
        compatible = {c.__name__: c for c in [type(pipe.scheduler), *getattr(pipe.scheduler, "compatibles", [])]}
        self.samplers: dict[str, type] = {}
        for a1111, cls_name in [(k, v) for k, v in SAMPLERS.items() if v == own] + list(SAMPLERS.items()):
            cls = compatible.get(cls_name)
            if cls is not None and a1111 not in self.samplers:
                try:  # some need optional packages (LMS: scipy); offer only what builds here
                    cls.from_config(self.scheduler_config)
                except (ImportError, ValueError, TypeError):
                    continue
                self.samplers[a1111] = cls
        if not self.samplers:
            self.samplers[own] = type(pipe.scheduler)
        self.denoiser = loading.component_of(pipe)[1]

    # -- sizes and classes
    def size_rule(self) -> tuple[int, int, bool]:
        """(default size, step, fixed): images are multiples of ``step`` px; DiT samples at one size only."""
        vae = int(getattr(self.pipe, "vae_scale_factor", 8))
        cfg = self.denoiser.config
        if self.kind == "dit":
            return int(cfg.sample_size) * vae, int(cfg.sample_size) * vae, True
        if self.kind == "pixart":
            return int(cfg.sample_size) * vae, vae * int(cfg.patch_size), False
        down = len(getattr(cfg, "down_block_types", ()) or (0,))
        return int(cfg.sample_size) * vae, vae * 2 ** (down - 1), False

    def class_choices(self) -> list[tuple[str, int]]:
        """(label, id) pairs: a class-conditional DiT's classes; for PixArt the classes of the KIND adapters in the
        folder are offered by the UI (KIND's class gate reads ``class_labels``); [] for other text pipelines."""
        if self.kind == "pixart":
            return [(str(i), i) for i in range(1000)]
        if self.kind != "dit":
            return []
        labels = getattr(self.pipe, "labels", None)
        if isinstance(labels, dict) and labels:
            return sorted(((f"{i}: {w}", int(i)) for w, i in labels.items()), key=lambda p: p[1])
        n = int(getattr(self.denoiser.config, "num_embeds_ada_norm", 1000) or 1000)
        return [(str(i), i) for i in range(min(n, 1000))]

    # -- the mix
    def apply_mix(self, root: Path, items: list[MixItem], fused: bool) -> list[str]:
        """Load (once), enable and weight the mix's adapters; disable the others; fuse what can be fused."""
        notes: list[str] = []
        wanted: dict[str, float] = {}
        for item in items:
            if item.key.endswith(library.BUNDLE_SUFFIX):
                raise bad_value("mix", clip(item.key), "adapter keys (load a bundle with 'load mix' first)")
            path = library.adapter_folder(root, item.key)
            digest = library.file_hash(root, path / WEIGHTS_NAME, item.key)
            name, old = self.loaded.get(item.key, ("", ""))
            if name and old != digest:  # the file was rewritten (a lab ran again): load the new values
                loading.delete_adapter(self.pipe, name)
                del self.loaded[item.key]
                name = ""
            if not name:
                name = _slug(item.key, {n for n, _ in self.loaded.values()} | set(loading.list_adapters(self.pipe)))
                try:
                    loading.load_adapter(self.pipe, path, name=name, weight=item.weight)
                except DifftuneError as e:
                    raise DifftuneError(f"adapter {item.key!r} cannot be used with {self.label}: {e}") from None
                self.loaded[item.key] = (name, digest)
            wanted[name] = item.weight
        loading.unfuse(self.pipe)  # back to the exact base weights before changing anything
        others = [n for n, _ in self.loaded.values() if n not in wanted]
        if others:
            loading.disable_adapters(self.pipe, others)
        if wanted:
            loading.enable_adapters(self.pipe, list(wanted))
            loading.set_adapter_weights(self.pipe, wanted)
        if fused:
            info = loading.list_adapters(self.pipe)
            for key, (name, _) in self.loaded.items():
                if name not in wanted:
                    continue
                if info[name]["method"] == "spm" and self._transport(name):
                    notes.append(f"{key}: SPM with transport on runs unfused (fusing would drop its per-prompt γ)")
                    continue
                try:
                    loading.fuse(self.pipe, name)
                except DifftuneError:
                    notes.append(f"{key}: {info[name]['method']} acts on activations; it runs unfused")
        return notes

    def names(self, method: str | None = None) -> list[str]:
        """Enabled adapters (of ``method``)."""
        return [n for n, i in loading.list_adapters(self.pipe).items()
                if i["enabled"] and (method is None or i["method"] == method)]

    def _transport(self, name: str) -> bool:
        from difftune.methods.verbs import model_part

        part = model_part(self.denoiser, name)
        return bool(getattr(part, "transport", False)) and getattr(part.config, "matching", "") != "fixed"

    def key_of(self, name: str) -> str:
        return next(k for k, (n, _) in self.loaded.items() if n == name)


class Studio:
    """The app's state: the adapters folder, the model(s), where images are written, and the limits."""

    def __init__(self, model: str | Path, adapters: str | Path, compare: str | Path | None = None,
                 out: str | Path = "outputs/studio", device: str | None = None, limits: Limits | None = None) -> None:
        self.root = Path(adapters).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.out = Path(out).resolve()
        self.limits = limits or Limits()
        pipe, h = load_model(model, device=device)
        self.main = Slot(Path(model).resolve().name, pipe, h)
        self.compare_slot: Slot | None = None
        if compare is not None:
            cpipe, ch = load_model(compare, base=model, device=device)
            self.compare_slot = Slot(Path(compare).resolve().name, cpipe, ch)
        self.cancel_event = threading.Event()

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
            inputs, condition = self._method_inputs(slot, req)
            images = self._run(slot, req, seed, inputs, progress)
            notes += self._gamma_notes(slot, req)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths, texts = [], []
        for i, img in enumerate(images):
            text = self.infotext(slot, req, seed, i)
            texts.append(text)
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

    def _method_inputs(self, slot: Slot, req: Request) -> tuple[dict[str, Any], Image.Image | None]:
        """Per-call inputs of the method panels: SPM transport, SCEdit control image and scale."""
        from difftune.methods.spm import set_transport

        for name in slot.names("spm"):
            set_transport(slot.denoiser, name, req.transport)
        inputs: dict[str, Any] = {}
        condition = None
        if slot.kind != "dit" and req.class_label is not None and slot.names("kind"):
            # KIND on a text pipeline (PixArt): the class gate reads `class_labels`, one per prompt (the pipeline
            # expands it to the images and both guidance halves)
            inputs["class_labels"] = [int(req.class_label)]
        csc = slot.names("csc")
        if csc:
            from difftune.methods.scedit.conditions import control_inputs, extract

            if req.control is None:
                raise bad_value("control image", None, f"an image for the enabled CSC adapter(s) "
                                f"{[slot.key_of(n) for n in csc]}", "Upload one in the SCEdit panel, or disable them.")
            condition = req.control if req.extractor == "none" else extract(req.extractor, req.control)
            inputs["control"] = control_inputs(slot.pipe, {n: condition for n in csc}, req.batch)
            if req.control_scale is not None:
                if not -library.MAX_WEIGHT <= req.control_scale <= library.MAX_WEIGHT:
                    raise bad_value("control scale", clip(req.control_scale), "a number in [-2, 2]")
                loading.set_adapter_weights(slot.pipe, {n: float(req.control_scale) for n in csc})
        return inputs, condition

    def _run(self, slot: Slot, req: Request, seed: int, inputs: dict[str, Any],
             progress: Callable[[int, int], None] | None) -> list[Image.Image]:
        from difftune.pipeline_mixin import DifftuneAdapterMixin, call_with_adapter_inputs

        pipe = slot.pipe
        sampler = req.sampler or next(iter(slot.samplers))
        pipe.scheduler = slot.samplers[sampler].from_config(slot.scheduler_config)
        kwargs: dict[str, Any] = {"num_inference_steps": req.steps, "guidance_scale": float(req.guidance),
                                  "generator": torch.Generator("cpu").manual_seed(seed)}
        if slot.kind == "dit":
            kwargs["class_labels"] = [int(req.class_label or 0)] * req.batch
        else:
            kwargs.update(prompt=req.prompt, negative_prompt=req.negative or None, num_images_per_prompt=req.batch,
                          height=req.height, width=req.width)
            if slot.kind == "pixart":
                kwargs.update(use_resolution_binning=False, clean_caption=False)
        calls = [0]
        expected = req.steps * (2 if sampler == "Heun" else 1)

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

    def _gamma_notes(self, slot: Slot, req: Request) -> list[str]:
        """The γ each SPM gave the prompt (and the negative prompt) in the last denoiser call."""
        from difftune.methods.verbs import model_part

        notes = []
        for name in slot.names("spm"):
            part = model_part(slot.denoiser, name)
            gamma = getattr(part, "gamma", None)
            key = slot.key_of(name)
            if gamma is None:
                notes.append(f"SPM {key}: transport off, γ = 1 on every prompt")
                continue
            n = req.batch
            guided = gamma.numel() == 2 * n
            cond = gamma[n] if guided and slot.kind != "dit" else gamma[0]
            text = f"SPM {key}: γ = {float(cond):.2f} for the prompt"
            if guided and slot.kind != "dit":
                text += f", {float(gamma[0]):.2f} for the negative prompt"
            notes.append(text)
        return notes

    def infotext(self, slot: Slot, req: Request, seed: int, index: int) -> str:
        sampler = req.sampler or next(iter(slot.samplers))
        adapters = []
        for key, (name, digest) in slot.loaded.items():
            info = loading.list_adapters(slot.pipe)[name]
            if info["enabled"]:
                adapters.append((key, float(info["weight"]), digest))
        params: dict[str, Any] = {"Steps": req.steps, "Sampler": sampler, "CFG scale": req.guidance, "Seed": seed,
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
            params["Control extractor"] = req.extractor
        params["Version"] = f"difftune {__version__}"
        return format_infotext(req.prompt if slot.kind != "dit" else "", req.negative if slot.kind != "dit" else "",
                               params, adapters)

    # -- saved mixes
    @_public
    def save_mix(self, name: str, items: list[MixItem], fused: bool, how: str = "auto") -> tuple[str, str]:
        """Save the mix as one merged LoRA (weight-space adapters only) or as a bundle that reloads it.

        Both are written only into a real ``studio-mixes`` folder inside the adapters folder (`paths.make_folder`
        refuses a symlink out of it) and without following symlinks (`paths.write_file`, `paths.copy_folder`).

        Args:
            how: "merged", "bundle", or "auto" (merged when possible, else a bundle).

        Returns:
            (the new entry's key, a sentence saying what was written).
        """
        from .merging import NotMergeable, save_merged

        library.check_save_name(name)
        if how not in ("auto", "merged", "bundle"):
            raise bad_value("save as", clip(how), "'auto', 'merged' or 'bundle'")
        items = library.check_mix(items)
        if not items:
            raise bad_value("mix", [], "at least one enabled adapter")
        folder = paths.make_folder(self.root, MIX_FOLDER)
        if any(os.path.lexists(folder / n) for n in (name, f"{name}{library.BUNDLE_SUFFIX}")):  # a link counts too
            raise bad_value("mix name", name, "a name not used yet in the adapters folder", "Pick another name.")
        why = ""
        if how in ("auto", "merged"):
            slot = self.main
            with slot.lock:
                slot.apply_mix(self.root, items, fused=False)
                names = [slot.loaded[i.key][0] for i in items]
                try:
                    # written to a private temporary folder, then copied in without following any symlink
                    with tempfile.TemporaryDirectory(prefix="difftune-studio-") as tmp:
                        _, rank = save_merged(slot.pipe, names, Path(tmp) / name,
                                              adapter_name=f"mix_{name.replace('-', '_')}")
                        paths.copy_folder(self.root, Path(tmp) / name, folder / name, f"{MIX_FOLDER}/{name}")
                    return f"{MIX_FOLDER}/{name}", (f"merged {len(items)} adapter(s) into one LoRA of rank {rank}: "
                                                    f"{MIX_FOLDER}/{name}")
                except NotMergeable as e:
                    if how == "merged":
                        raise
                    why = f" ({e})"
        key = library.write_bundle(self.root, MIX_FOLDER, name, items, fused, self.main.label)
        return key, f"saved a bundle that reloads the mix{why}: {key}"

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
