"""The studio's models: loading a pipeline folder (or a compressed denoiser onto one) and the `Slot` that holds a
loaded model with its lock, its sampler choices and the adapters of the mix (loaded once, then enabled, disabled,
re-weighted and fused). `engine.Studio` owns one slot per model.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from difftune import loading
from difftune.components import denoiser_name, pipeline_kind
from difftune.errors import DifftuneError, bad_value
from difftune.serialization import WEIGHTS_NAME, read_header

from . import compat, library, partner
from .library import MixItem
from .paths import clip

#: A1111 sampler names → diffusers scheduler classes; a pipeline offers those its scheduler lists as compatible.
SAMPLERS = {
    "DDIM": "DDIMScheduler", "Euler": "EulerDiscreteScheduler", "Euler a": "EulerAncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler", "DPM++ 2S": "DPMSolverSinglestepScheduler",
    "UniPC": "UniPCMultistepScheduler", "DEIS": "DEISMultistepScheduler", "Heun": "HeunDiscreteScheduler",
    "PNDM": "PNDMScheduler", "LMS": "LMSDiscreteScheduler", "DDPM": "DDPMScheduler", "LCM": "LCMScheduler",
}
#: the A1111/Forge name of a flow-matching pipeline's own scheduler (SD3, Flux: Forge writes "Sampler: Euler")
FLOW_SAMPLERS = {"FlowMatchEulerDiscreteScheduler": "Euler"}

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


#: how errors name the base model's settings: the app takes a Hub id at its main revision, and a single-file
#: checkpoint with the configs diffusers infers for it (`difftune generate` has --revision and --config)
STUDIO_KEYS = {"path": "--model", "revision": "--model's revision (main: the app has no --revision)",
               "config": "--model's configs (inferred: the app has no --config)", "variant": "--model's variant"}


def load_model(path: str | Path, base: str | Path | None = None, device: str | None = None) -> tuple[Any, str]:
    """(pipeline, model hash) for a base model (a pipeline folder, shipped name, Hub id or single-file checkpoint:
    `difftune.basemodel.resolve_model`), or a compressed denoiser loaded onto ``base``."""
    from difftune.basemodel import resolve_model
    from difftune.generation import load_pipeline

    folder = Path(path)
    if (folder / "model.safetensors").is_file() and base is not None:
        from difftune.compress import load_compressed_pipeline

        pipe = load_compressed_pipeline(base, folder, device=device or "cpu")
        pipe.set_progress_bar_config(disable=True)
        files = [folder / "model.safetensors"]
    else:
        try:
            model = resolve_model(path, keys=STUDIO_KEYS)
        except DifftuneError as e:
            raise bad_value("--model/--compare", str(path), "a base model (a pipeline folder, a shipped model, a Hub "
                            "repo id or a .safetensors checkpoint) or a compressed model folder (model.safetensors, "
                            "with --model as its base)", str(e)) from None
        pipe = load_pipeline(model, device=device)
        den = denoiser_name(pipe.components) or ""
        files = [model.file] if model.file else sorted((model.folder / den).glob("*.safetensors"))
        folder = model.folder
    from difftune.zoo import path as zoo_path

    if pipeline_kind(pipe) == "dit" and Path(base or folder).resolve() == zoo_path("dit-mini").resolve():
        from difftune.zoo.mnist import DIGIT_WORDS

        pipe.labels = {word: i for i, word in enumerate(DIGIT_WORDS)}  # as difftune.zoo.load does
    return pipe, _hash_files(files) if files else ""


class Slot:
    """One loaded model: its pipeline, lock, scheduler choices and the adapters loaded into it."""

    def __init__(self, label: str, pipe: Any, model_hash: str) -> None:
        self.label, self.pipe, self.model_hash = label, pipe, model_hash
        self.bases: set[str] = set()  # the names of the models whose adapters it takes (compat.model_names)
        self.warnings: dict[str, str] = {}  # key -> the note of compat.check for a loaded adapter ("" if none)
        # an A/B partner (--compare) holds what it can of the mix and names the rest (partner.py): a BK student's
        # plan is found from its teacher's denoiser config; `refused` keeps (hash, note) of what it could not hold
        self.partner, self.teacher, self.plan = False, None, None
        self.refused: dict[str, tuple[str, str]] = {}
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
            self.samplers[FLOW_SAMPLERS.get(own, own)] = type(pipe.scheduler)
        self.denoiser = loading.component_of(pipe)[1]
        self._variants: dict[str, Any] = {}  # mode -> the img2img/inpaint pipeline built from this one

    def variant(self, mode: str) -> Any:
        """The pipeline for ``mode`` (`modes.MODES`): the loaded one for text-to-image, else diffusers' img2img or
        inpaint pipeline built once by ``from_pipe`` (it shares the loaded modules, so the adapters act on it too)."""
        from . import modes

        if mode == modes.TXT2IMG:
            return self.pipe
        if mode not in self._variants:
            import diffusers

            pipe = getattr(diffusers, modes.PIPELINES[self.kind][mode]).from_pipe(self.pipe)
            pipe.set_progress_bar_config(disable=True)
            self._variants[mode] = pipe
        return self._variants[mode]

    # -- sizes, defaults and classes
    def vae_scale(self) -> int:
        """Pixels per latent: the real VAE's downsampling (2 ** (blocks - 1)). DiTPipeline has no
        ``vae_scale_factor`` and a VAE of any depth (dit-mini's has 3 blocks: 4, not the 8 of SD's)."""
        vae = getattr(self.pipe, "vae", None)
        blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
        if blocks:
            return 2 ** (len(blocks) - 1)
        return int(getattr(self.pipe, "vae_scale_factor", 8))

    def size_rule(self) -> tuple[int, int, bool]:
        """(default size, step, fixed): the model's native size (its denoiser's sample size in pixels); images are
        multiples of ``step`` px; DiT samples at its one size only. Flux's transformer records no sample size: its
        pipeline's default (128 latents) is native, and its latents are packed 2×2, so sizes step by 2 latents; SD3
        steps by its patch (both pipelines refuse or resize other sizes)."""
        vae = self.vae_scale()
        cfg = self.denoiser.config
        if self.kind == "flux":
            return int(getattr(self.pipe, "default_sample_size", 128)) * vae, vae * 2, False
        native = int(cfg.sample_size) * vae
        if self.kind == "dit":
            return native, native, True
        if self.kind in ("pixart", "sd3"):
            return native, vae * int(cfg.patch_size), False
        down = len(getattr(cfg, "down_block_types", ()) or (0,))
        return native, vae * 2 ** (down - 1), False

    def defaults(self) -> dict[str, Any]:
        """The family's defaults for steps and guidance: those of its diffusers pipeline's ``__call__`` (SD: 50
        steps, CFG 7.5; DiT: 50, 4.0; PixArt-α: 20, 4.5), so each family starts where its pipeline does."""
        import inspect

        params = inspect.signature(type(self.pipe).__call__).parameters
        out: dict[str, Any] = {"steps": 20, "guidance": 4.0}
        for name, key in (("num_inference_steps", "steps"), ("guidance_scale", "guidance")):
            value = params[name].default if name in params else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = value
        return out

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
            if item.sha256 and digest != item.sha256:  # the row showed another file than the one there now
                raise bad_value(f"adapter {item.key!r}", f"hash {digest}", f"the file listed with hash {item.sha256}",
                                "It changed on disk since the folder was listed: press 'Refresh folder'.")
            name, old = self.loaded.get(item.key, ("", ""))
            if name and old != digest:  # the file was rewritten (a lab ran again): load the new values
                loading.delete_adapter(self.pipe, name)
                del self.loaded[item.key]
                name = ""
            if not name and self.refused.get(item.key, ("",))[0] == digest:
                notes.append(self.refused[item.key][1])  # a partner that could not hold it: tried once per file
                continue
            if not name:
                name = _slug(item.key, {n for n, _ in self.loaded.values()} | set(loading.list_adapters(self.pipe)))
                warning = self._load(path, item, name, digest)
                if warning is None:
                    notes.append(self.refused[item.key][1])
                    continue
                self.loaded[item.key] = (name, digest)
                self.warnings[item.key] = warning
            if self.warnings.get(item.key):
                notes.append(self.warnings[item.key])
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

    def _load(self, path: Path, item: MixItem, name: str, digest: str) -> str | None:
        """Load ``item`` (folder ``path``) as ``name``, its recorded base checked first (`compat`: a KIND adapter
        for another model is refused before it loads). Returns the note for its images ("" for none), or None when
        this A/B partner cannot hold it (the note is in `refused`)."""
        header = read_header(path)
        try:
            reason = compat.unusable(header, self.denoiser, loading.modules_of(self.pipe), self.label)
            if reason:
                raise DifftuneError(reason)
            warning = compat.check(header, item.key, self.label, self.bases)
            if self.partner:
                loaded, note = partner.load(self.pipe, path, item.key, name, item.weight, self.teacher, self.plan,
                                            self.label)
                if not loaded:
                    self.refused[item.key] = (digest, note)
                    return None
                return "; ".join(n for n in (warning, note) if n)
            loading.load_adapter(self.pipe, path, name=name, weight=item.weight)
            return warning
        except DifftuneError as e:
            if self.partner:
                self.refused[item.key] = (digest, f"{item.key}: {self.label} cannot hold it ({e}); B runs without it")
                return None
            other = compat.other_base(header, self.bases)
            made = f" (it was made for {other!r})" if other else ""
            raise DifftuneError(f"adapter {item.key!r} cannot be used with {self.label}{made}: {e}") from None

    def revalidate(self, root: Path, items: list[MixItem]) -> tuple[list[MixItem], list[str]]:
        """The mix kept for this model after a model switch, and notes: an adapter that cannot run here
        (`compat.unusable`: made for the other denoiser family, a UNet's on a DiT, or of a method that does not apply,
        SCEdit on Flux) or a `compat.STRICT` one made for another model is dropped and named; one made for another
        model of the same shapes stays, with `compat.check`'s note. Read from the headers: nothing is loaded here."""
        kept, notes = [], []
        for item in items:
            header = read_header(library.adapter_folder(root, item.key))
            reason = compat.unusable(header, self.denoiser, loading.modules_of(self.pipe), self.label)
            if reason:
                notes.append(f"{item.key}: {reason}: unticked")
                continue
            try:
                note = compat.check(header, item.key, self.label, self.bases)
            except DifftuneError as e:
                notes.append(f"{e} (unticked)")
                continue
            kept.append(item)
            notes += [note] if note else []
        return kept, notes

    def unusable(self, root: Path, key: str) -> str:
        """Why the adapter ``key`` of the folder cannot run on this model at all (`compat.unusable`), "" when it can
        or when its header cannot be read (the listing shows that error)."""
        try:
            header = read_header(library.adapter_folder(root, key))
        except DifftuneError:
            return ""
        return compat.unusable(header, self.denoiser, loading.modules_of(self.pipe), self.label)

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
