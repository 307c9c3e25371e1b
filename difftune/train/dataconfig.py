"""The ``data`` section of the training config (`config.TrainConfig.data`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from ..errors import bad_value
from .checks import MAX_RESOLUTION, SUFFIX, check_finite, check_name, check_range

IMAGE_KINDS = ("captions", "dreambooth", "classes", "control")
DATA_FREE_KINDS = ("prompts", "none")  #: for methods whose trainer plugin has its own objective (no images)
MULTI_KINDS = ("captions", "classes", "dreambooth")  #: the kinds ``data.datasets`` serves
MAX_CLASS_IMAGES = 100_000


@dataclass
class DatasetEntry:
    """One image folder of ``data.datasets``. A key left unset (null) takes the ``data`` section's value of the same
    meaning (``caption_extension``: ``data.caption_ext``), as kohya's per-subset settings fall back to the general
    ones; ``path``, ``masks`` and ``class_path`` belong to the folder."""

    path: str = ""  #: the image folder, laid out as ``data.path`` is for ``data.kind``
    repeats: int | None = None  #: how many times its images appear per epoch
    caption_extension: str | None = None  #: its caption sidecar suffix (``.txt``, ``.caption``)
    default_caption: str | None = None  #: the caption of its images that have none
    instance_prompt: str | None = None  #: DreamBooth: the prompt of its images
    masks: str | None = None  #: its loss masks (a folder named as its images)
    class_path: str | None = None  #: DreamBooth: its class images (prior preservation)
    class_prompt: str | None = None  #: DreamBooth: the prompt of its class images
    num_class_images: int | None = None  #: DreamBooth: generate class images up to this count (0: none)

    def __post_init__(self) -> None:
        self.key = "data"  #: the config key the entry came from (``data.datasets[i]``; ``data``: the shorthand)

    def key_of(self, name: str) -> str:
        """The config key of field ``name``, for error messages (the shorthand names its suffix ``caption_ext``)."""
        if self.key == "data" and name == "caption_extension":
            name = "caption_ext"
        return f"{self.key}.{name}"


@dataclass
class DataConfig:
    #: captions / dreambooth / classes: image folders at ``path``. prompts: captions only (``prompts`` and/or
    #: ``prompts_file``); none: indices only (``num_samples`` per epoch). The data-free kinds serve methods whose
    #: trainer plugin defines its own objective (e.g. data-free concept erasing).
    kind: Literal["captions", "dreambooth", "classes", "prompts", "none", "control"] = "captions"
    path: str = ""  #: image folder (captions: .txt beside each image or metadata.jsonl; classes: one folder per class)
    prompts: list[str] = field(default_factory=list)  #: kind prompts: the captions, in order
    prompts_file: str | None = None  #: kind prompts: a UTF-8 text file, one caption per line (blank lines skipped)
    num_samples: int | None = None  #: kind none: items per epoch (each item is its index)
    instance_prompt: str | None = None  #: DreamBooth: the prompt for every instance image ("a photo of sks dog")
    class_path: str | None = None  #: DreamBooth prior preservation: folder of class images
    class_prompt: str | None = None  #: DreamBooth prior preservation: their prompt ("a photo of a dog")
    prior_loss_weight: float = 1.0  #: weight of the prior-preservation loss
    default_caption: str | None = None  #: caption for images that have none
    caption_ext: str = ".txt"
    resolution: int = 512  #: images are resized (shorter side) and cropped to this size (data-free: sampled at it)
    center_crop: bool = True  #: center crop (else random crop)
    random_flip: bool = False  #: random horizontal flip
    repeats: int = 1  #: repeat the dataset this many times per epoch
    label_dropout: float = 0.0  #: probability of replacing a caption by "" (class by the null class), for CFG
    #: encode every image with the VAE once, before training (needs center crop; with random_flip both orientations
    #: are cached): true keeps the latents in memory, ``disk`` also in files under ``cache_dir`` that later runs
    #: read instead of encoding (keyed by the image's pixels at their bucket and by the VAE: never stale)
    cache_latents: bool | Literal["disk"] = False
    cache_dir: str | None = None  #: ``cache_latents: disk``'s folder (default ``~/.cache/difftune/latents``)
    cache_text_embeddings: bool = False  #: encode every caption once
    num_workers: int = 0  #: dataloader workers
    #: kind control (captioned images with a condition image each, for SCEdit's CSC-Tuner): an extractor applied to
    #: each augmented image (difftune.methods.scedit: canny, sobel, outline, skeleton), or ``condition_path``
    condition: str | None = None
    condition_path: str | None = None  #: kind control: folder of condition images named as the images in ``path``
    #: aspect-ratio buckets (kinds captions and classes): each image trains at the bucket nearest its aspect ratio,
    #: area about resolution², resized without stretching and the excess cropped; a batch holds one bucket
    buckets: bool = False
    bucket_min_size: int = 256  #: shortest bucket side (pixels)
    bucket_max_size: int = 1024  #: longest bucket side (pixels)
    bucket_step: int = 64  #: bucket sides are multiples of this (a multiple of 8 and of the VAE's scale factor)
    bucket_max_crop: float = 0.25  #: the most of a side an image's crop may cut; an image needing more is refused
    #: kohya-style tags (kinds captions and control; captions are comma-separated tags): shuffle the tags after the
    #: first ``keep_tokens`` each epoch, and drop each of those with probability ``caption_tag_dropout``
    shuffle_caption: bool = False
    keep_tokens: int = 0  #: the first N tags (e.g. the trigger word) stay in place and are never dropped
    caption_tag_dropout: float = 0.0  #: per-tag drop probability (whole captions: label_dropout)
    #: masked loss (kinds captions and classes): a folder of grayscale masks named as the images in ``path``, each of
    #: its image's size (white: train, black: ignored); the loss is weighted by it in latent space
    masks: str | None = None
    #: several image folders, each with its own repeats, captions, masks and class images (`DatasetEntry`); they
    #: train as one data set (buckets, caption tags and DDP sharding across all). ``data.path`` is the shorthand
    #: for one folder and is unset when this lists them
    datasets: list[DatasetEntry] = field(default_factory=list)
    #: DreamBooth prior preservation: when ``class_path`` holds fewer class images than this, the base model
    #: generates the rest with ``class_prompt`` before training (diffusers' train_dreambooth); 0: use what is there
    num_class_images: int = 0

    def __post_init__(self) -> None:
        check_finite(self, "data")
        self._check_buckets()
        self._check_captions()
        if self.kind in DATA_FREE_KINDS:
            self._check_data_free()
        else:
            self._check_images()
            self._check_datasets()
        if (self.condition or self.condition_path) and self.kind != "control":
            raise bad_value("data.condition", self.condition or self.condition_path, "unset unless data.kind is "
                            "'control'", "data.kind: control pairs each image with a condition image")
        if self.kind == "control" and not (self.condition or self.condition_path):
            raise bad_value("data.condition", None, "an extractor name or data.condition_path with data.kind "
                            "'control'", "e.g. condition: canny")
        if not 0 <= self.label_dropout < 1:
            raise bad_value("data.label_dropout", self.label_dropout, "in [0, 1)")
        if not 8 <= self.resolution <= MAX_RESOLUTION or self.resolution % 8:
            raise bad_value("data.resolution", self.resolution, f"a multiple of 8 in [8, {MAX_RESOLUTION}]",
                            "SD1.x trains at 512, SDXL at 1024.")
        check_range("data.repeats", self.repeats, 1, 10_000, "Each image is seen `repeats` times per epoch.")
        check_range("data.num_workers", self.num_workers, 0, 256)
        check_name("data.caption_ext", self.caption_ext, SUFFIX, "a file suffix such as '.txt'",
                   "Captions are read from <image name><caption_ext> beside each image.")
        if isinstance(self.num_class_images, bool) or not isinstance(self.num_class_images, int):
            raise bad_value("data.num_class_images", self.num_class_images, "an integer >= 0")
        check_range("data.num_class_images", self.num_class_images, 0, MAX_CLASS_IMAGES)
        if self.prior_loss_weight < 0:
            raise bad_value("data.prior_loss_weight", self.prior_loss_weight, "a number >= 0")
        if self.cache_latents and not self.center_crop:
            raise bad_value("data.cache_latents", self.cache_latents, "false when random crops are on",
                            "cached latents cannot be re-cropped; set center_crop: true (random_flip works: both "
                            "orientations are cached)")
        if self.cache_dir and self.cache_latents != "disk":
            raise bad_value("data.cache_dir", self.cache_dir, "unset unless data.cache_latents is 'disk'",
                            "in-memory caching (cache_latents: true) writes no files")

    def _check_buckets(self) -> None:
        for key in ("bucket_min_size", "bucket_max_size", "bucket_step"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
                raise bad_value(f"data.{key}", value, "a positive multiple of 8")
        if self.bucket_min_size > self.bucket_max_size:
            raise bad_value("data.bucket_min_size", self.bucket_min_size,
                            f"at most data.bucket_max_size ({self.bucket_max_size})")
        if not 0 <= self.bucket_max_crop < 1:
            raise bad_value("data.bucket_max_crop", self.bucket_max_crop, "in [0, 1)")
        if not self.buckets:
            return
        if self.kind not in ("captions", "classes"):
            raise bad_value("data.buckets", True, f"false with data.kind {self.kind!r}",
                            "buckets work with data.kind captions and classes")
        if not self.bucket_min_size <= self.resolution <= self.bucket_max_size:
            raise bad_value("data.resolution", self.resolution, f"within [data.bucket_min_size, "
                            f"data.bucket_max_size] = [{self.bucket_min_size}, {self.bucket_max_size}] with "
                            "data.buckets on", "the target area is resolution²; the square bucket has this side")

    def _check_captions(self) -> None:
        if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int) or self.keep_tokens < 0:
            raise bad_value("data.keep_tokens", self.keep_tokens, "an integer >= 0")
        if not 0 <= self.caption_tag_dropout < 1:
            raise bad_value("data.caption_tag_dropout", self.caption_tag_dropout, "in [0, 1)")
        if not (self.shuffle_caption or self.caption_tag_dropout):
            return
        key = "data.shuffle_caption" if self.shuffle_caption else "data.caption_tag_dropout"
        value = self.shuffle_caption or self.caption_tag_dropout
        if self.kind not in ("captions", "control"):
            raise bad_value(key, value, f"off with data.kind {self.kind!r}",
                            "tag handling applies to captions read from files (data.kind captions or control)")
        if self.cache_text_embeddings:
            raise bad_value(key, value, "off with data.cache_text_embeddings",
                            "every epoch makes new captions; cached embeddings would hold each variant (as kohya, "
                            "turn one of the two off)")

    def entries(self) -> list[DatasetEntry]:
        """The image folders, each with every inheritable key filled in: ``data.datasets``, else one entry made of
        the shorthand keys (``data.path``, ``data.repeats``, ...). Empty for the data-free kinds."""
        if self.kind in DATA_FREE_KINDS:
            return []
        inherited = {"repeats": self.repeats, "caption_extension": self.caption_ext,
                     "default_caption": self.default_caption, "instance_prompt": self.instance_prompt,
                     "class_prompt": self.class_prompt, "num_class_images": self.num_class_images}
        if not self.datasets:
            entry = DatasetEntry(self.path, masks=self.masks, class_path=self.class_path, **inherited)
            return [entry]
        out = []
        for i, e in enumerate(self.datasets):
            own = {k: v for k, v in inherited.items() if getattr(e, k) is None}
            resolved = replace(e, **own)
            resolved.key = f"data.datasets[{i}]"
            out.append(resolved)
        return out

    def _check_datasets(self) -> None:
        if self.datasets:
            self._parse_datasets()
        entries = self.entries()
        for e in entries:
            _check_entry(e, self.kind)
        with_class = [bool(e.class_path) for e in entries]
        if any(with_class) and not all(with_class):
            e = entries[with_class.index(False)]
            raise bad_value(e.key_of("class_path"), e.class_path, "a class folder, as every other entry has one",
                            "prior preservation pairs each instance image with a class image: give every "
                            "data.datasets entry a class_path, or none")

    def _parse_datasets(self) -> None:
        from ..config import from_dict

        if not isinstance(self.datasets, list):
            raise bad_value("data.datasets", self.datasets, "a list of folders ({path: ..., repeats: ...})")
        if self.kind not in MULTI_KINDS:
            raise bad_value("data.datasets", f"{len(self.datasets)} folder(s)", f"unset with data.kind {self.kind!r}",
                            f"several folders train with data.kind {', '.join(MULTI_KINDS)}; use data.path")
        for key in ("path", "masks", "class_path"):
            if getattr(self, key):
                raise bad_value(f"data.{key}", getattr(self, key), "unset when data.datasets lists the folders",
                                f"give each data.datasets entry its own {key}; data.{key} is the one-folder shorthand")
        self.datasets = [e if isinstance(e, DatasetEntry) else from_dict(DatasetEntry, e, f"data.datasets[{i}]")
                         if isinstance(e, Mapping) else _not_a_mapping(i, e) for i, e in enumerate(self.datasets)]

    def _check_images(self) -> None:
        if not self.path and not self.datasets:
            raise bad_value("data.path", self.path, "an image folder (or data.datasets: a list of them)",
                            "data-free training (data.kind: prompts or none) is for methods with their own objective")
        for key in ("prompts", "prompts_file", "num_samples"):
            if getattr(self, key):
                raise bad_value(f"data.{key}", getattr(self, key), "unset unless data.kind is 'prompts' or 'none'",
                                f"data.kind is {self.kind!r}, which reads images from data.path")

    def _check_data_free(self) -> None:
        # Image options would be silently ignored: refuse them, naming the key.
        image_only = {"path": "", "instance_prompt": None, "class_prompt": None, "default_caption": None,
                      "random_flip": False, "cache_latents": False, "label_dropout": 0.0, "masks": None,
                      "class_path": None, "datasets": [], "num_class_images": 0, "cache_dir": None}
        for key, unset in image_only.items():
            if getattr(self, key) != unset:
                raise bad_value(f"data.{key}", getattr(self, key), f"unset with data.kind {self.kind!r} (no images)",
                                "the method's objective makes its own inputs; image options do not apply")
        if self.kind == "prompts":
            if self.num_samples is not None:
                raise bad_value("data.num_samples", self.num_samples, "unset with data.kind 'prompts'",
                                "an epoch is every prompt once (times data.repeats)")
            if not isinstance(self.prompts, list) or not all(isinstance(p, str) for p in self.prompts):
                raise bad_value("data.prompts", self.prompts, "a list of strings")
            if not self.prompts and not self.prompts_file:
                raise bad_value("data.prompts", self.prompts, "at least one prompt with data.kind 'prompts'",
                                "set data.prompts: [...] and/or data.prompts_file (one prompt per line)")
        else:
            for key in ("prompts", "prompts_file"):
                if getattr(self, key):
                    raise bad_value(f"data.{key}", getattr(self, key), "unset with data.kind 'none'",
                                    "use data.kind: prompts to iterate over prompts")
            if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
                raise bad_value("data.num_samples", self.num_samples, "an integer >= 1 with data.kind 'none'",
                                "the number of items (indices) per epoch, e.g. 64")
            check_range("data.num_samples", self.num_samples, 1, 1 << 24, "An epoch is shuffled as a whole.")
        if self.cache_text_embeddings and self.kind == "none":
            raise bad_value("data.cache_text_embeddings", True, "false with data.kind 'none' (no captions)")


def _not_a_mapping(i: int, value: object) -> DatasetEntry:
    raise bad_value(f"data.datasets[{i}]", value, "a mapping of keys to values",
                    f"e.g. {{path: photos/, repeats: 2}}; known keys: {[f.name for f in fields(DatasetEntry)]}")


def _check_entry(e: DatasetEntry, kind: str) -> None:
    """The checks of one image folder (``data.datasets[i]`` or the shorthand), naming its keys."""
    if not isinstance(e.path, str) or not e.path:
        raise bad_value(e.key_of("path"), e.path, "an image folder",
                        "data-free training (data.kind: prompts or none) is for methods with their own objective")
    if isinstance(e.repeats, bool) or not isinstance(e.repeats, int):
        raise bad_value(e.key_of("repeats"), e.repeats, "an integer >= 1")
    check_range(e.key_of("repeats"), e.repeats, 1, 10_000, "Each image is seen `repeats` times per epoch.")
    check_name(e.key_of("caption_extension"), e.caption_extension, SUFFIX, "a file suffix such as '.txt'",
               "Captions are read from <image name><suffix> beside each image.")
    if e.masks and kind not in ("captions", "classes"):
        raise bad_value(e.key_of("masks"), e.masks, f"unset with data.kind {kind!r}",
                        "masks weight the loss of data.kind captions and classes")
    if kind != "dreambooth":
        if e.class_path:
            raise bad_value(e.key_of("class_path"), e.class_path, "unset unless data.kind is 'dreambooth'")
        return
    if not e.instance_prompt:
        raise bad_value(e.key_of("instance_prompt"), e.instance_prompt, "a prompt for DreamBooth instance images",
                        "e.g. 'a photo of sks dog'")
    if isinstance(e.num_class_images, bool) or not isinstance(e.num_class_images, int):
        raise bad_value(e.key_of("num_class_images"), e.num_class_images, "an integer >= 0")
    check_range(e.key_of("num_class_images"), e.num_class_images, 0, MAX_CLASS_IMAGES)
    if e.num_class_images and not (e.class_path and e.class_prompt):
        missing = "class_path" if not e.class_path else "class_prompt"
        raise bad_value(e.key_of(missing), getattr(e, missing), f"set with num_class_images {e.num_class_images}",
                        "class images are generated into class_path with class_prompt")
