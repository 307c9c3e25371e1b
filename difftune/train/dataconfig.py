"""The ``data`` section of the training config (`config.TrainConfig.data`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import bad_value
from .checks import MAX_RESOLUTION, SUFFIX, check_finite, check_name, check_range

IMAGE_KINDS = ("captions", "dreambooth", "classes", "control")
DATA_FREE_KINDS = ("prompts", "none")  #: for methods whose trainer plugin has its own objective (no images)


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
    cache_latents: bool = False  #: encode every image with the VAE once (needs center crop and no flip)
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

    def __post_init__(self) -> None:
        check_finite(self, "data")
        self._check_buckets()
        self._check_captions()
        if self.masks and self.kind not in ("captions", "classes"):
            raise bad_value("data.masks", self.masks, f"unset with data.kind {self.kind!r}",
                            "masks weight the loss of data.kind captions and classes")
        if self.kind in DATA_FREE_KINDS:
            self._check_data_free()
        else:
            self._check_images()
        if (self.condition or self.condition_path) and self.kind != "control":
            raise bad_value("data.condition", self.condition or self.condition_path, "unset unless data.kind is "
                            "'control'", "data.kind: control pairs each image with a condition image")
        if self.kind == "control" and not (self.condition or self.condition_path):
            raise bad_value("data.condition", None, "an extractor name or data.condition_path with data.kind "
                            "'control'", "e.g. condition: canny")
        if self.class_path and self.kind != "dreambooth":
            raise bad_value("data.class_path", self.class_path, "unset unless data.kind is 'dreambooth'")
        if not 0 <= self.label_dropout < 1:
            raise bad_value("data.label_dropout", self.label_dropout, "in [0, 1)")
        if not 8 <= self.resolution <= MAX_RESOLUTION or self.resolution % 8:
            raise bad_value("data.resolution", self.resolution, f"a multiple of 8 in [8, {MAX_RESOLUTION}]",
                            "SD1.x trains at 512, SDXL at 1024.")
        check_range("data.repeats", self.repeats, 1, 10_000, "Each image is seen `repeats` times per epoch.")
        check_range("data.num_workers", self.num_workers, 0, 256)
        check_name("data.caption_ext", self.caption_ext, SUFFIX, "a file suffix such as '.txt'",
                   "Captions are read from <image name><caption_ext> beside each image.")
        if self.prior_loss_weight < 0:
            raise bad_value("data.prior_loss_weight", self.prior_loss_weight, "a number >= 0")
        if self.cache_latents and (self.random_flip or not self.center_crop):
            raise bad_value("data.cache_latents", True, "false when random_flip or random crops are on",
                            "cached latents cannot be re-augmented; turn off random_flip and set center_crop: true")

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

    def _check_images(self) -> None:
        if not self.path:
            raise bad_value("data.path", self.path, "an image folder",
                            "data-free training (data.kind: prompts or none) is for methods with their own objective")
        for key in ("prompts", "prompts_file", "num_samples"):
            if getattr(self, key):
                raise bad_value(f"data.{key}", getattr(self, key), "unset unless data.kind is 'prompts' or 'none'",
                                f"data.kind is {self.kind!r}, which reads images from data.path")
        if self.kind == "dreambooth" and not self.instance_prompt:
            raise bad_value("data.instance_prompt", self.instance_prompt, "a prompt for DreamBooth instance images",
                            "e.g. 'a photo of sks dog'")

    def _check_data_free(self) -> None:
        # Image options would be silently ignored: refuse them, naming the key.
        image_only = {"path": "", "instance_prompt": None, "class_prompt": None, "default_caption": None,
                      "random_flip": False, "cache_latents": False, "label_dropout": 0.0}
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
