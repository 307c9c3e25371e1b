"""img2img and inpainting for the SD families, SD3 and Flux: the request's checks, the pipeline and the call's
arguments.

The img2img and inpaint pipelines are diffusers' own, built once per model by ``from_pipe`` from the loaded pipeline
(`models.Slot.variant`): they share its modules, so the adapters injected into its denoiser (and their weights,
fusing, SPM transport, CSC control inputs) act on them exactly as on text-to-image. Inpainting works with a plain
(4-channel) UNet too: diffusers then keeps the unmasked latents from the init image at every step; SD3's and Flux's
inpaint pipelines always work that way (their transformers take no mask channels).

The init image and the mask are resized to the request's size (an uploaded photo of any size works, and the PNG's
size is the size shown); the mask is white where the image is repainted. ``strength`` is diffusers' (and A1111's
"Denoising strength"): the share of the steps that run, from a noised init image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import Image

from difftune.errors import bad_value

from .paths import clip

if TYPE_CHECKING:
    from .request import Request

TXT2IMG, IMG2IMG, INPAINT = "txt2img", "img2img", "inpaint"
MODES = (TXT2IMG, IMG2IMG, INPAINT)
#: diffusers' pipeline classes per family and mode
PIPELINES = {"sd": {IMG2IMG: "StableDiffusionImg2ImgPipeline", INPAINT: "StableDiffusionInpaintPipeline"},
             "sdxl": {IMG2IMG: "StableDiffusionXLImg2ImgPipeline", INPAINT: "StableDiffusionXLInpaintPipeline"},
             "sd3": {IMG2IMG: "StableDiffusion3Img2ImgPipeline", INPAINT: "StableDiffusion3InpaintPipeline"},
             "flux": {IMG2IMG: "FluxImg2ImgPipeline", INPAINT: "FluxInpaintPipeline"}}


def check(req: Request, kind: str) -> None:
    """The mode, its images and strength, for a model of family ``kind`` (img2img and inpainting: the families of
    `PIPELINES`)."""
    if req.mode not in MODES:
        raise bad_value("mode", clip(req.mode), f"one of {list(MODES)}")
    if req.mode == TXT2IMG:
        return
    if kind not in PIPELINES:
        raise bad_value("mode", req.mode, f"{TXT2IMG!r} for this model ({kind})",
                        f"img2img and inpainting are offered for the SD families, SD3 and Flux {sorted(PIPELINES)}.")
    for name, image in (("init image", req.image), ("mask", req.mask if req.mode == INPAINT else True)):
        if image is None:
            raise bad_value(name, None, f"an image for {req.mode}", "Upload one in the img2img / inpaint tab.")
        if image is not True and not isinstance(image, Image.Image):
            raise bad_value(name, type(image).__name__, "an image")
    s = req.strength
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
        raise bad_value("strength", clip(s), "a number in (0, 1]", "1 repaints fully; 0.3 keeps most of the image.")


def arguments(req: Request) -> dict[str, Any]:
    """The call's extra arguments for the mode (img2img's pipeline takes no width/height: the image is resized)."""
    if req.mode == TXT2IMG:
        return {}
    size = (int(req.width), int(req.height))
    out: dict[str, Any] = {"image": req.image.convert("RGB").resize(size, Image.LANCZOS),
                           "strength": float(req.strength)}
    if req.mode == INPAINT:
        out["mask_image"] = req.mask.convert("L").resize(size, Image.NEAREST)
    return out


def denoiser_calls(req: Request, steps: int) -> int:
    """Denoiser calls of ``steps`` at the request's strength (diffusers runs ``int(steps · strength)`` of them)."""
    return steps if req.mode == TXT2IMG else max(1, min(int(steps * float(req.strength)), steps))


def params(req: Request, refs: dict[str, str]) -> dict[str, Any]:
    """The infotext's fields for the mode: A1111's "Denoising strength" and the stored images' references."""
    if req.mode == TXT2IMG:
        return {}
    out: dict[str, Any] = {"Mode": req.mode, "Denoising strength": req.strength, "Init image": refs.get("init")}
    if req.mode == INPAINT:
        out["Mask"] = refs.get("mask")
    return out
