"""Latent caching on disk (``data.cache_latents: disk``, issue 25): a second run reads instead of encoding, a changed
image or VAE is never served a stale entry, and random_flip works through the flipped variant."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import difftune as dt
from difftune.config import load_config
from difftune.testing import save_tiny_pipeline
from difftune.train import TrainConfig, cache, loss, main

REPO = Path(__file__).resolve().parents[2]
SIZES = [(64, 32), (70, 36), (32, 64), (40, 40), (36, 40)]
BUCKETS = ["data.buckets=true", "data.bucket_min_size=16", "data.bucket_max_size=64", "data.bucket_step=8"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("cache") / "sd")


@pytest.fixture
def photos(tmp_path, write_photos):
    return write_photos(tmp_path / "photos", SIZES, ["a photo of a cat", "a red car"])


@pytest.fixture
def counted(monkeypatch):
    """Counts the images the cache sends through the VAE, and the cache keys the steps read."""
    seen = {"encoded": 0, "keys": []}
    encode, keys = cache.encode_posterior, loss.latent_keys

    def count(vae, pixels):
        seen["encoded"] += len(pixels)
        return encode(vae, pixels)

    monkeypatch.setattr(cache, "encode_posterior", count)
    monkeypatch.setattr(loss, "latent_keys", lambda batch, prefix: seen["keys"].extend(keys(batch, prefix))
                        or keys(batch, prefix))
    return seen


def _run(sd, photos: Path, out: Path, cache_dir: Path, *sets: str) -> dict:
    cfg = load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={sd}", f"data.path={photos}", f"output_dir={out}", "validation.prompts=[]",
        "data.cache_latents=disk", f"data.cache_dir={cache_dir}", "data.random_flip=true", "train.max_steps=6",
        "train.batch_size=1", *BUCKETS, *sets])
    return load_file(main(cfg) / "adapter_model.safetensors")


def _files(cache_dir: Path) -> set[Path]:
    return set(cache_dir.rglob("*.safetensors"))


def test_a_second_run_reads_the_disk_cache_instead_of_encoding(sd, photos, tmp_path, counted):
    cache_dir = tmp_path / "cache"
    first = _run(sd, photos, tmp_path / "a", cache_dir)
    # batch 1: one VAE call per image and orientation, both orientations of all 5 images on disk
    assert counted["encoded"] == 2 * len(SIZES) and len(_files(cache_dir)) == 2 * len(SIZES)
    assert {flag for _, _, flag in counted["keys"]} == {0, 1}  # steps trained on flipped and unflipped images
    counted["encoded"] = 0
    second = _run(sd, photos, tmp_path / "b", cache_dir)
    assert counted["encoded"] == 0  # every latent read from disk
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_changed_image_resolution_or_vae_is_never_served_a_stale_entry(sd, photos, tmp_path, counted):
    cache_dir = tmp_path / "cache"
    _run(sd, photos, tmp_path / "a", cache_dir, "train.max_steps=1")
    before = _files(cache_dir)
    edited = np.asarray(Image.open(photos / "2.png")).copy()
    edited[:4] = 255  # the user edits one photo
    Image.fromarray(edited).save(photos / "2.png")
    counted["encoded"] = 0
    _run(sd, photos, tmp_path / "b", cache_dir, "train.max_steps=1")
    assert counted["encoded"] == 2 and len(_files(cache_dir) - before) == 2  # only it, both orientations
    counted["encoded"] = 0
    _run(sd, photos, tmp_path / "c", cache_dir, "train.max_steps=1", "data.resolution=24",
         "data.bucket_min_size=8")
    assert counted["encoded"] == 2 * len(SIZES)  # other buckets: other pixels, other keys

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd / "vae")
    fingerprint = cache.vae_fingerprint(vae)
    assert {p.parent.parent.name for p in _files(cache_dir)} == {fingerprint}
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(1e-3)  # a fine-tuned VAE
    assert cache.vae_fingerprint(vae) != fingerprint
    vae.decoder.conv_in.bias.data.add_(1.0)  # the decoder does not change what the encoder gives
    with torch.no_grad():
        vae.encoder.conv_in.bias.sub_(1e-3)
    assert cache.vae_fingerprint(vae) == fingerprint


def test_the_flipped_variant_is_the_encoding_of_the_mirrored_image(sd, photos, tmp_path):
    from diffusers import AutoencoderKL

    from difftune.train.data import CaptionFolder

    cache_dir = tmp_path / "cache"
    _run(sd, photos, tmp_path / "a", cache_dir, "train.max_steps=1")
    vae = AutoencoderKL.from_pretrained(sd / "vae")
    store = cache.LatentStore(cache_dir, vae)
    ds = CaptionFolder(photos, 32)  # no flip, no buckets: the square
    pixels = ds[0]["pixel_values"]
    _run(sd, photos, tmp_path / "b", cache_dir, "train.max_steps=1", "data.buckets=false")
    plain, mirrored = store.get(store.key(pixels)), store.get(store.key(pixels.flip(-1)))
    assert plain is not None and mirrored is not None
    want_plain = loss.encode_posterior(vae, pixels[None])
    want_mirrored = loss.encode_posterior(vae, pixels.flip(-1)[None])
    for got, want in ((plain, want_plain), (mirrored, want_mirrored)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[0], mirrored[0], atol=1e-3)  # a real variant, not a copy


@pytest.mark.parametrize(("sets", "key"), [
    (["data.cache_latents=disk", "data.center_crop=false"], "data.cache_latents"),
    (["data.cache_latents=true", "data.cache_dir=somewhere"], "data.cache_dir"),
    (["data.cache_latents=memory"], "data.cache_latents"),
])
def test_bad_cache_settings_name_the_key(sd, tmp_path, sets, key):
    with pytest.raises(dt.DifftuneError, match=re.escape(f"`{key}`")):
        load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [f"output_dir={tmp_path}", *sets])


def test_an_unreadable_cache_file_is_a_clear_error(sd, photos, tmp_path):
    cache_dir = tmp_path / "cache"
    _run(sd, photos, tmp_path / "a", cache_dir, "train.max_steps=1")
    victim = sorted(_files(cache_dir))[0]
    victim.write_bytes(b"not a safetensors file")
    with pytest.raises(dt.DifftuneError, match=r"latent cache file .* unreadable.*delete it"):
        _run(sd, photos, tmp_path / "b", cache_dir, "train.max_steps=1")
