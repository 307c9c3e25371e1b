"""The studio's logic without Gradio: folder safety, bounded inputs, mixes (merged = the live mix), infotext, DiT
classes, cancel."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from apps.studio import Limits, Request, Studio, library
from apps.studio.engine import Cancelled
from apps.studio.infotext import format_infotext, parse_infotext
from apps.studio.library import MixItem
from difftune.errors import DifftuneError


@pytest.fixture(scope="module")
def studio(studio_files, tmp_path_factory):
    model, root, _, _ = studio_files
    return Studio(model, root, out=tmp_path_factory.mktemp("logic-out"), limits=Limits(max_steps=10, max_batch=2))


def test_keys_cannot_leave_the_folder(studio_files, tmp_path):
    root = studio_files[1]
    for key in ("../adapters/labs/style", "/etc", "labs/../../x", "", "labs\\style"):
        with pytest.raises(DifftuneError, match="adapter"):
            library.resolve(root, key)
    outside = tmp_path / "evil"
    outside.mkdir()
    (outside / "adapter_model.safetensors").write_bytes(b"x")
    link = root / "planted"
    os.symlink(outside, link)
    try:
        with pytest.raises(DifftuneError, match="symlink out of the folder") as e:
            library.resolve(root, "planted")
        assert str(root) not in str(e.value) and str(outside) not in str(e.value)  # no server path in the message
        assert "planted" not in {e.key for e in library.scan(root)}
    finally:
        link.unlink()


def test_inputs_are_bounded(studio, studio_files):
    for bad, field in ((dict(steps=11), "steps"), (dict(batch=3), "batch"), (dict(width=30), "width"),
                       (dict(width=4096), "width"), (dict(guidance=float("nan")), "guidance"),
                       (dict(sampler="nope"), "sampler"), (dict(seed=2**40), "seed")):
        with pytest.raises(DifftuneError, match=field):
            studio.generate(Request(prompt="a cat", **{**dict(steps=2), **bad}))
    with pytest.raises(DifftuneError, match="weight"):
        library.parse_mix('[{"key": "labs/style", "weight": 3}]')


def test_merged_mix_equals_the_live_mix(studio, studio_files, tmp_path):
    from difftune.generation import load_pipeline
    from difftune.loading import load_adapter

    keys = studio_files[2]
    mix = [MixItem(keys["style"], 0.7), MixItem(keys["subject"], -1.2)]
    key, msg = studio.save_mix("logic-merged", mix, fused=False, how="merged")
    assert "merged 2 adapter(s)" in msg
    studio.main.apply_mix(studio.root, mix, fused=False)
    fresh = load_pipeline(studio_files[0])
    load_adapter(fresh, studio.root / key)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 4, 32)
    with torch.no_grad():
        live = studio.main.pipe.unet(x, t, ctx).sample
        merged = fresh.unet(x, t, ctx).sample
        studio.main.apply_mix(studio.root, [], fused=False)
        base = studio.main.pipe.unet(x, t, ctx).sample
    assert (live - base).abs().max() > 1e-3  # the mix does something
    assert torch.allclose(live, merged, atol=1e-4)


def test_fused_and_unfused_give_the_same_image(studio, studio_files):
    from PIL import Image

    mix = [MixItem(studio_files[2]["style"], 0.9)]
    a = studio.generate(Request(prompt="a cat", steps=2, seed=5, mix=mix, fused=False)).images[0]
    b = studio.generate(Request(prompt="a cat", steps=2, seed=5, mix=mix, fused=True)).images[0]
    pa, pb = list(Image.open(a).getdata()), list(Image.open(b).getdata())
    assert max(abs(u - v) for p, q in zip(pa, pb) for u, v in zip(p, q)) <= 2


def test_infotext_round_trip():
    text = format_infotext("a cat, sitting", "blurry, dark", {"Steps": 20, "Sampler": "Euler a", "Seed": 3,
                                                               "Model": "sd-mini"}, [("labs/style", 0.8, "abc123")])
    parsed = parse_infotext(text)
    assert parsed["prompt"] == "a cat, sitting" and parsed["negative_prompt"] == "blurry, dark"
    assert parsed["params"]["Sampler"] == "Euler a" and parsed["params"]["Seed"] == "3"
    assert parsed["adapters"] == [{"key": "labs/style", "weight": 0.8, "hash": "abc123", "method": ""}]


def test_cancel_stops_the_run_and_the_next_one_works(studio):
    def cancel_at_first_step(i, n):
        studio.cancel()

    with pytest.raises(Cancelled, match="cancelled at step"):
        studio.generate(Request(prompt="a cat", steps=5), progress=cancel_at_first_step)
    assert len(studio.generate(Request(prompt="a cat", steps=2)).images) == 1


def test_dit_class_picker(tmp_path):
    from difftune.testing import save_tiny_pipeline

    model = save_tiny_pipeline("dit", tmp_path / "dit")
    st = Studio(model, tmp_path / "adapters", out=tmp_path / "out")
    choices = st.main.class_choices()
    assert choices and choices[0][1] == 0
    r = st.generate(Request(steps=2, class_label=choices[1][1]))
    assert "Class: 1" in r.infotexts[0] and st.main.size_rule()[2]  # DiT samples at its one size
    with pytest.raises(DifftuneError, match="class"):
        st.generate(Request(steps=2, class_label=10**6))


def test_pixart_class_picker_feeds_kind(tmp_path):
    """A PixArt pipeline with a KIND adapter: the chosen class reaches the class gate (different class, different
    image; the same class, the same image)."""
    from difftune.methods import METHODS

    if "kind" not in METHODS:
        pytest.skip("KIND is not registered in this checkout")
    import difftune as dt
    from difftune.generation import load_pipeline
    from difftune.methods.kind import KINDConfig
    from difftune.testing import randomize_adapter, save_tiny_pipeline

    model = save_tiny_pipeline("pixart", tmp_path / "pixart")
    pipe = load_pipeline(model)
    dt.inject(pipe, KINDConfig(learngenes=2, tailors_per_class=2, classes=[0, 1], init="random"), name="kind")
    randomize_adapter(pipe.transformer, "kind", std=0.5)
    dt.save_adapter(pipe, tmp_path / "adapters" / "kind", name="kind")
    st = Studio(model, tmp_path / "adapters", out=tmp_path / "out")
    mix = [MixItem("kind", 1.0)]
    runs = [st.generate(Request(prompt="a cat", steps=2, guidance=1.0, mix=mix, class_label=c)) for c in (0, 1, 0)]
    from PIL import Image

    pixels = [list(Image.open(r.images[0]).getdata()) for r in runs]
    assert pixels[0] != pixels[1] and pixels[0] == pixels[2] and "Class: 1" in runs[1].infotexts[0]


# -- issue 32: symlinks out of the folder, hostile mixes, long prompts, server paths in messages --------------------


def _no_server_path(message: str, tmp_path_factory) -> None:
    """Every folder the tests make (adapters, models, outputs) lies under pytest's base temp: none may be named."""
    base = tmp_path_factory.getbasetemp()
    assert str(base) not in message and str(base.resolve()) not in message, message


@pytest.mark.parametrize("linked", ["adapter_model.safetensors", "adapter_config.json"])
def test_symlinked_file_in_a_real_folder_is_refused(studio, studio_files, tmp_path, linked, tmp_path_factory):
    """A real sub-folder whose weights (or config) file links out of the folder is neither listed nor loaded."""
    root, keys = studio_files[1], studio_files[2]
    outside = tmp_path / "elsewhere"
    shutil.copytree(root / keys["style"], outside)
    sneaky = root / "sneaky"
    shutil.copytree(root / keys["style"], sneaky)
    (sneaky / linked).unlink()
    os.symlink(outside / linked, sneaky / linked)
    try:
        with pytest.raises(DifftuneError, match=f"{linked} is a symlink out of the folder") as e:
            studio.generate(Request(prompt="a cat", steps=1, mix=[MixItem("sneaky", 1.0)]))
        _no_server_path(str(e.value), tmp_path_factory)
        with pytest.raises(DifftuneError, match="symlink out of the folder"):
            studio.load_mix("sneaky")
        assert "sneaky" not in {x.key for x in studio.entries()}
        assert "sneaky" not in studio.main.loaded
    finally:
        shutil.rmtree(sneaky)


def test_symlink_inside_the_folder_still_loads(studio, studio_files):
    """Symlinks that stay inside the folder are allowed (the README refuses only symlinks *out*)."""
    root, keys = studio_files[1], studio_files[2]
    alias = root / "alias"
    alias.mkdir()
    for f in (root / keys["style"]).iterdir():
        os.symlink(f, alias / f.name)
    try:
        assert "alias" in {x.key for x in studio.entries()}
        assert studio.load_mix("alias")["items"] == [MixItem("alias", 1.0)]
    finally:
        shutil.rmtree(alias)


@pytest.fixture()
def own_studio(studio_files, tmp_path):
    """A studio on a fresh adapters folder holding only the LoRA ``labs/style`` (its ``studio-mixes`` is ours)."""
    model, root, keys, _ = studio_files
    shutil.copytree(root / keys["style"], tmp_path / "adapters" / "labs" / "style")
    return Studio(model, tmp_path / "adapters", out=tmp_path / "out")


@pytest.mark.parametrize("how", ["merged", "bundle"])
def test_symlinked_mixes_folder_is_refused_for_save(own_studio, tmp_path, how, tmp_path_factory):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, own_studio.root / "studio-mixes")
    with pytest.raises(DifftuneError, match="symlink out of the folder") as e:
        own_studio.save_mix("escape", [MixItem("labs/style", 0.5)], fused=False, how=how)
    _no_server_path(str(e.value), tmp_path_factory)
    assert list(outside.iterdir()) == []  # nothing written through the link


def test_symlinked_mix_names_are_not_written_through(own_studio, tmp_path):
    """A real mixes folder whose entries are planted links (dangling or not): refused as names in use."""
    outside = tmp_path / "outside"
    outside.mkdir()
    mixes = own_studio.root / "studio-mixes"
    mixes.mkdir()
    os.symlink(outside / "gone", mixes / "dangling")  # a merged save would create the folder at the link's target
    os.symlink(outside / "b.mix.json", mixes / "linked.mix.json")
    for name, how in (("dangling", "merged"), ("linked", "bundle")):
        with pytest.raises(DifftuneError, match="not used yet"):
            own_studio.save_mix(name, [MixItem("labs/style", 0.5)], fused=False, how=how)
    assert list(outside.iterdir()) == []
    # saving works in the real folder, and what is written is a plain file/folder inside it
    own_studio.save_mix("fine", [MixItem("labs/style", 0.5)], fused=False, how="bundle")
    own_studio.save_mix("fine-merged", [MixItem("labs/style", 0.5)], fused=False, how="merged")
    assert (mixes / "fine.mix.json").is_file() and not (mixes / "fine.mix.json").is_symlink()
    assert sorted(p.name for p in (mixes / "fine-merged").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    assert not [p for p in mixes.iterdir() if p.name.endswith(".tmp")]


def test_symlinked_mixes_folder_is_refused_for_load(own_studio, tmp_path, tmp_path_factory):
    own_studio.save_mix("real", [MixItem("labs/style", 0.5)], fused=False, how="bundle")
    outside = tmp_path / "outside"
    shutil.move(own_studio.root / "studio-mixes", outside)  # a valid bundle, now outside the folder
    os.symlink(outside, own_studio.root / "studio-mixes")
    with pytest.raises(DifftuneError, match="symlink out of the folder") as e:
        own_studio.load_mix("studio-mixes/real.mix.json")
    _no_server_path(str(e.value), tmp_path_factory)
    # a real mixes folder whose bundle file links out: refused as well
    (own_studio.root / "studio-mixes").unlink()
    (own_studio.root / "studio-mixes").mkdir()
    os.symlink(outside / "real.mix.json", own_studio.root / "studio-mixes" / "real.mix.json")
    with pytest.raises(DifftuneError, match="symlink out of the folder"):
        own_studio.load_mix("studio-mixes/real.mix.json")
    assert library.scan(own_studio.root) and "studio-mixes/real.mix.json" not in {
        x.key for x in library.scan(own_studio.root)}


def _hostile_mix(size: int) -> str:
    """A JSON mix of distinct keys just under ``size`` bytes (the shape that made the old duplicate check
    quadratic: ~39 CPU-s for 1 MiB)."""
    item = '{"key": "k%07d", "weight": 1.0}'
    n = (size - 2) // (len(item % 0) + 2)
    return "[" + ", ".join(item % i for i in range(n)) + "]"


def test_a_1mib_mix_is_refused_within_a_cpu_second(own_studio):
    text = _hostile_mix((1 << 20) - 64)  # under the old 1 MiB file limit, so the old code parsed it item by item
    bundle = own_studio.root / "hostile.mix.json"
    bundle.write_text('{"format": "difftune-mix", "format_version": 1, "fused": false, "adapters": '
                      f"{_hostile_mix((1 << 20) - 128)}}}")
    assert (1 << 20) - 128 < bundle.stat().st_size <= 1 << 20
    for call in (lambda: library.parse_mix(text), lambda: own_studio.load_mix("hostile.mix.json"),
                 lambda: library.check_mix(json.loads(text))):
        t0 = time.process_time()
        with pytest.raises(DifftuneError, match="mix|bundle"):
            call()
        assert time.process_time() - t0 < 1.0
    with pytest.raises(DifftuneError, match="each adapter once"):  # duplicates are still found
        library.parse_mix('[{"key": "a", "weight": 1}, {"key": "b", "weight": 1}, {"key": "a", "weight": 0.5}]')


def test_long_prompts_are_not_echoed_whole(studio):
    huge = "x" * 10_000_000
    for field, req in (("negative prompt", Request(prompt="a cat", negative=huge)),
                       ("prompt", Request(prompt=huge)), ("sampler", Request(prompt="a cat", steps=2, sampler=huge))):
        with pytest.raises(DifftuneError, match=field) as e:
            studio.generate(req)
        assert len(str(e.value)) < 400 and "10,000,000 characters" in str(e.value)
    for call in (lambda: studio.load_mix("k" * 1_000_000), lambda: studio.save_mix(huge, [], False),
                 lambda: library.parse_mix(json.dumps([{"key": "x" * 100_000, "weight": 9}]))):
        with pytest.raises(DifftuneError) as e:
            call()
        assert len(str(e.value)) < 400


def test_errors_name_no_server_path(studio, studio_files, tmp_path, tmp_path_factory):
    root, keys = studio_files[1], studio_files[2]
    # an adapter made for another model: the loader's message names its file; the studio's, its key
    with pytest.raises(DifftuneError, match="cannot be used") as e:
        studio.generate(Request(prompt="a cat", steps=1, mix=[MixItem(keys["dit"], 1.0)]))
    assert "other/dit" in str(e.value)
    _no_server_path(str(e.value), tmp_path_factory)
    # an unreadable weights file: listed with an error that names it relative to the folder
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    try:
        entry = next(x for x in studio.entries() if x.key == "broken")
        assert entry.error and "broken/adapter_model.safetensors" in entry.error
        _no_server_path(entry.error, tmp_path_factory)
    finally:
        shutil.rmtree(broken)
    # an errno message (the output folder is a file): a DifftuneError without the path
    out, studio.out = studio.out, tmp_path / "a-file"
    studio.out.write_text("x")
    try:
        with pytest.raises(DifftuneError, match="could not read or write a file") as e:
            studio.generate(Request(prompt="a cat", steps=1))
        assert "a-file" in str(e.value)
        _no_server_path(str(e.value), tmp_path_factory)
    finally:
        studio.out = out


def test_studio_fuzzer_sample(tmp_path):
    """A seeded sample of bench/fuzz_studio.py (hostile mixes, planted links, long text): each case finishes or is
    refused briefly, without a server path, and nothing outside the folder changes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import fuzz_studio

    summary, rows = fuzz_studio.run(36, seed=17, timeout=10.0, root=tmp_path)
    bad = [r for r in rows if r["outcome"] not in ("ok", "refused")]
    assert not bad, bad[:3]
    assert summary["refused"] > 0 and summary["ok"] > 0 and all(summary["by_kind"].values())


def test_a_mix_selected_with_another_hash_is_refused(studio, studio_files):
    """Issue 28: Generate runs the adapter a row showed, never a file rewritten since the listing."""
    key = studio_files[2]["style"]
    digest = next(e.sha256 for e in studio.entries() if e.key == key)
    studio.generate(Request(prompt="a cat", steps=1, mix=[MixItem(key, 0.5, digest)]))
    with pytest.raises(DifftuneError, match="changed on disk since the folder was listed"):
        studio.generate(Request(prompt="a cat", steps=1, mix=[MixItem(key, 0.5, "0" * 12)]))
    with pytest.raises(DifftuneError, match="sha256"):
        library.parse_mix(json.dumps([{"key": key, "weight": 1, "sha256": "../x"}]))
