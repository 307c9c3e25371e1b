"""Every endpoint of the studio through gradio_client, on a tiny SD pipeline and a folder of tiny adapters."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[1], verbose=False)


def _path(item):
    """A gallery item as gradio_client returns it: a dict {"image": {...}} or (path, caption)."""
    if isinstance(item, dict):
        image = item.get("image", item)
        return image["path"] if isinstance(image, dict) else image
    return item[0] if isinstance(item, (list, tuple)) else item


def _gen_args(**kw):
    args = dict(p="a cat", neg="", st=3, g=4.0, w=32, h=32, samp="DDIM", b=1, s=7, rnd=False, mix="[]",
                fu=False, tr=True, ctrl=None, ex="none", cs=1.0, cl=None, md="txt2img", im=None, mk=None, sg=0.75)
    args.update(kw)
    return list(args.values())


def _gen(client, mix, **kw):
    return client.predict(*_gen_args(mix=json.dumps(mix), **kw), api_name="/generate")


def test_endpoints_are_named(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/generate", "/compare", "/list_adapters", "/save_mix", "/load_mix", "/read_parameters",
            "/cancel"} <= names


def test_list_adapters_with_badges(client, studio_files):
    listing = client.predict(api_name="/list_adapters")
    by_key = {e["key"]: e for e in listing}
    keys = studio_files[2]
    assert by_key[keys["style"]]["method"] == "lora" and "lora · base" in by_key[keys["style"]]["badges"]
    assert by_key[keys["subject"]]["method"] == "krona" and by_key[keys["edges"]]["method"] == "csc"
    assert by_key[keys["style"]]["parameters"] > 0 and len(by_key[keys["style"]]["sha256"]) == 12
    # made for another model: the row says so before anything is ticked (the fixture's DiT LoRA, base dit-model)
    assert "⚠ made for dit-model, not model" in by_key[keys["dit"]]["badges"]
    assert "⚠" not in by_key[keys["style"]]["badges"]


def test_generate_writes_infotext_and_seed(client, studio_files):
    keys = studio_files[2]
    mix = [{"key": keys["style"], "weight": 0.8}, {"key": keys["subject"], "weight": -0.5},
           {"key": keys["erase"], "weight": 1.0}]
    gallery, seed, text, _ = _gen(client, mix, b=2)
    assert seed == 7 and len(gallery) == 2
    path = _path(gallery[0])
    with Image.open(path) as img:
        info = img.info["parameters"]
    assert "<lora:labs/style:0.8>" in info and "Seed: 7" in info and "Size: 32x32" in info
    assert "SPM labs/erase: γ =" in text  # the SPM panel's report
    # the same seed and mix give the same image; a randomised seed is shown back
    again = _gen(client, mix, b=2)[0]
    p2 = _path(again[0])
    assert list(Image.open(path).getdata()) == list(Image.open(p2).getdata())
    assert _gen(client, [], rnd=True)[1] != -1


def test_incompatible_adapter_is_a_clear_error(client, studio_files):
    with pytest.raises(Exception, match="cannot be used"):
        _gen(client, [{"key": studio_files[2]["dit"], "weight": 1.0}])
    with pytest.raises(Exception, match="adapters folder"):
        _gen(client, [{"key": "../adapters/labs/style", "weight": 1.0}])


def test_save_and_load_mix(client, studio_files):
    keys = studio_files[2]
    mix = json.dumps([{"key": keys["style"], "weight": 0.5}, {"key": keys["subject"], "weight": 1.5}])
    msg, listing = client.predict("api-merged", mix, False, "auto", api_name="/save_mix")
    assert "merged 2 adapter(s)" in msg and any(e["key"] == "studio-mixes/api-merged" for e in listing)
    mix2 = json.dumps([{"key": keys["style"], "weight": 0.5}, {"key": keys["edges"], "weight": 0.7}])
    msg, listing = client.predict("api-bundle", mix2, True, "auto", api_name="/save_mix")
    assert "bundle" in msg and "csc acts on activations" in msg
    loaded, fused, _ = client.predict("studio-mixes/api-bundle.mix.json", api_name="/load_mix")
    assert json.loads(loaded) == json.loads(mix2) and fused is True


def test_read_parameters(client, studio_files):
    gallery = _gen(client, [{"key": studio_files[2]["style"], "weight": 1.0}])[0]
    path = _path(gallery[0])
    text, parsed = client.predict(gradio_client.handle_file(path), api_name="/read_parameters")
    assert text.startswith("a cat <lora:labs/style:1>")
    assert parsed["adapters"][0]["key"] == "labs/style" and parsed["params"]["Sampler"] == "DDIM"


def test_compare_same_seed(client, studio_files):
    args = ["a cat", "", 3, 4.0, 32, 32, "DDIM", 1, 3, False,
            json.dumps([{"key": studio_files[2]["style"], "weight": 1.5}]), False, True, None, "none", 1.0, None,
            "txt2img", None, None, 0.75]
    a, b, text = client.predict(*args, "adapters", api_name="/compare")
    assert "seed 3" in text and list(Image.open(a).getdata()) != list(Image.open(b).getdata())
    a, b, text = client.predict(*args, "model", api_name="/compare")  # FP vs RTN 4-bit, the same LoRA on both
    assert "B: unet-rtn4" in text


def test_cancel_endpoint(client, served):
    client.predict(api_name="/cancel")
    assert served[0].cancel_event.is_set()
    served[0].cancel_event.clear()


# -- issue 32: the same refusals through the HTTP API ---------------------------------------------------------------


def _message(call) -> str:
    with pytest.raises(Exception) as e:  # noqa: PT011 (gradio_client raises AppError; the message is what counts)
        call()
    return str(e.value)


def test_api_refuses_symlinks_out_of_the_folder(client, studio_files, tmp_path, tmp_path_factory):
    root, keys = studio_files[1], studio_files[2]
    base = str(tmp_path_factory.getbasetemp())
    # a real sub-folder whose weights file links out of the adapters folder
    shutil.copytree(root / keys["style"], tmp_path / "elsewhere")
    sneaky = root / "api-sneaky"
    shutil.copytree(root / keys["style"], sneaky)
    (sneaky / "adapter_model.safetensors").unlink()
    os.symlink(tmp_path / "elsewhere" / "adapter_model.safetensors", sneaky / "adapter_model.safetensors")
    # a planted studio-mixes link (the real one, if an earlier test made it, is set aside meanwhile)
    mixes, aside, outside = root / "studio-mixes", root / ".studio-mixes-aside", tmp_path / "outside"
    outside.mkdir()
    had_mixes = mixes.exists()
    if had_mixes:
        mixes.rename(aside)
    os.symlink(outside, mixes)
    try:
        msg = _message(lambda: _gen(client, [{"key": "api-sneaky", "weight": 1.0}]))
        assert "symlink out of the folder" in msg and base not in msg
        mix = json.dumps([{"key": keys["style"], "weight": 0.5}])
        for how in ("merged", "bundle"):
            msg = _message(lambda how=how: client.predict("api-escape", mix, False, how, api_name="/save_mix"))
            assert "symlink out of the folder" in msg and base not in msg
        assert list(outside.iterdir()) == []
        (outside / "b.mix.json").write_text(json.dumps({"format": "difftune-mix", "format_version": 1, "fused": False,
                                                        "adapters": [{"key": keys["style"], "weight": 1.0}]}))
        msg = _message(lambda: client.predict("studio-mixes/b.mix.json", api_name="/load_mix"))
        assert "symlink out of the folder" in msg and base not in msg
    finally:
        shutil.rmtree(sneaky)
        mixes.unlink()
        if had_mixes:
            aside.rename(mixes)


def test_api_bounds_hostile_inputs(client, tmp_path_factory):
    msg = _message(lambda: _gen(client, [], neg="x" * 1_000_000))
    assert "negative prompt" in msg and "1,000,000 characters" in msg and len(msg) < 400
    hostile = json.dumps([{"key": f"k{i:07d}", "weight": 1.0} for i in range(30_000)])  # ~1 MiB
    msg = _message(lambda: client.predict(*_gen_args(mix=hostile), api_name="/generate"))
    assert "mix" in msg and len(msg) < 400
    msg = _message(lambda: _gen(client, [{"key": "/etc/passwd", "weight": 1.0}]))
    assert str(tmp_path_factory.getbasetemp()) not in msg


def test_dit_mini_png_size_equals_the_size_shown(tmp_path):
    """Issue 28: dit-mini's VAE scales by 4, not the 8 once assumed: the size the sliders and the infotext show is
    the PNG's size; steps and guidance start at the DiT pipeline's own defaults."""
    from apps.studio import Request, Studio
    from apps.studio.ui import build_demo
    from difftune.zoo import path

    st = Studio(path("dit-mini"), tmp_path / "adapters", out=tmp_path / "out")
    shown = {c["props"]["elem_id"]: c["props"]["value"] for c in build_demo(st).config["components"]
             if c.get("props", {}).get("elem_id") in ("width", "height", "steps")}
    r = st.generate(Request(steps=2, class_label=7))
    with Image.open(r.images[0]) as img:
        size = img.size
    assert size == (shown["width"], shown["height"]) == (32, 32)
    assert "Size: 32x32" in r.infotexts[0]
    assert st.main.defaults() == {"steps": 50, "guidance": 4.0} and shown["steps"] == 50
