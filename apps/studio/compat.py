"""Whether an adapter was made for the model the studio runs, checked from its header before it loads.

Every difftune adapter records the base model it was trained on (``base_model``: a folder, a Hub id or a shipped
model's name). The loader already refuses an adapter whose layers do not exist or have other shapes here; what it
cannot see is an adapter made for *another model of the same architecture* (two DiTs of one size): its tensors fit
and it runs, giving noise for methods that replace the base's layers. So before loading, the studio compares the
recorded base with the names the model goes by (`model_names`):

- a KIND adapter (its layers are rebuilt from the base's own weights: on another base it is noise) for another base
  is refused, naming the adapter and both models;
- any other adapter for another base loads (a LoRA trained on SD 1.5 on a fine-tune of it is normal use) and each
  image made with it carries a note saying so;
- an adapter that records no base, or a model with no name to compare, is not judged.

Names are compared, not paths: the same model lies in different folders on different machines. A reference's names
are its last path part and, for a Hub id or a Hub-cache folder (``models--org--name``), ``org/name`` and ``name``.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from difftune.errors import DifftuneError

#: methods whose layers are built from the base's own weights: on another base of the same shapes they are noise
STRICT = {"kind": "KIND builds its layers from the base model's own weights"}


def model_names(reference: object) -> set[str]:
    """The names a model reference (a folder, a Hub id, a Hub-cache snapshot folder) goes by, lower-cased."""
    text = str(reference or "").strip().replace("\\", "/").rstrip("/")
    parts = [p for p in PurePosixPath(text).parts if p not in ("/", ".", "..")]
    if not parts:
        return set()
    cache = next((p for p in parts if p.startswith("models--")), None)
    if cache:  # the Hub cache: .../models--org--name/snapshots/<commit>
        repo = cache[len("models--"):].replace("--", "/").lower()
        return {repo, repo.rsplit("/", 1)[-1]}
    names = {parts[-1].lower()}
    if len(parts) == 2 and not text.startswith("/") and not Path(text).exists():  # a Hub id "org/name"
        names.add("/".join(parts).lower())
    return names


def other_base(header: dict[str, Any], names: set[str]) -> str:
    """The name of the model the adapter (its ``header``) was made for when that is not one of ``names``; "" when
    it was made for it, or when this cannot be told (no base recorded, no names)."""
    recorded = str(header.get("base_model") or "")
    if not recorded or not names or model_names(recorded) & names:
        return ""
    return PurePosixPath(recorded.replace("\\", "/")).name or recorded


def check(header: dict[str, Any], key: str, model: str, names: set[str]) -> str:
    """A note when the adapter ``key`` (its ``header``) was made for a model other than ``model`` (the label shown;
    ``names``: every name it goes by, `model_names`), "" when it was made for it or this cannot be told.

    Raises:
        DifftuneError: a `STRICT` method's adapter made for another model.
    """
    made_for = other_base(header, names)
    if not made_for:
        return ""
    method = str(header.get("method", ""))
    if method in STRICT:
        raise DifftuneError(
            f"adapter {key!r} ({method}) was made for the model {made_for!r}, not {model!r}: {STRICT[method]}, so on "
            f"another model it gives noise even where the shapes fit. Hint: start the studio with --model set to "
            f"{made_for!r}, or pick an adapter trained on {model!r}.")
    return (f"{key}: made for the model {made_for!r}, not {model!r}; it fits this model's layers and runs, but may "
            "not do here what it did there")


def unusable(header: dict[str, Any], denoiser: Any, parts: dict[str, Any], model: str) -> str:
    """Why the adapter (its ``header``) cannot run on ``model`` at all, "" when it can as far as the header tells
    (whether its layers exist here only loading tells): made for the other denoiser family (a UNet's adapter on a
    transformer), or its method does not apply to this denoiser as a whole (`MethodConfig.check_model`: SCEdit and
    CSC edit a UNet's skip connections, which SD3, Flux, DiT and PixArt transformers lack; KIND's class gate needs
    class labels, which SD3 and Flux take none of). ``parts``: the pipeline's components (`loading.modules_of`)."""
    from difftune.components import denoiser_name
    from difftune.serialization import config_from_header

    try:  # the method's own reason first: it says what to use instead
        config_from_header(header, "the adapter").check_model(denoiser)
    except DifftuneError as e:
        return str(e)
    component = str(header.get("component") or "")
    if component in ("unet", "transformer") and component not in parts:
        return f"made for a {component}, {model}'s denoiser is a {denoiser_name(parts) or 'no denoiser'}"
    return ""


def flag(entry: dict[str, Any], model: str, names: set[str], reason: str = "") -> dict[str, Any]:
    """A listing entry (`library.Entry.to_dict`) with a warning added to its badges when it was made for another
    model than ``model`` (its ``names``): the row says so before anything is ticked. ``reason`` (`unusable`): why
    it cannot run on this model at all; the entry then says so too, is marked ``incompatible`` and cannot be ticked."""
    if entry.get("kind") != "adapter" or entry.get("error"):
        return entry
    out = dict(entry)
    made_for = other_base(entry, names)
    if made_for:
        what = "refused here" if entry.get("method") in STRICT else "may not do here what it did there"
        out["badges"] = f"{out.get('badges', '')} · ⚠ made for {made_for}, not {model}: {what}"
    if reason:
        out["incompatible"] = reason
        out["badges"] = f"{out.get('badges', '')} · ⛔ incompatible with {model}: {reason}"
    return out
