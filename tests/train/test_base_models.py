"""Base models the way users name them (issue 25, item 1): a Hub repo id resolved offline from a Hub-layout cache
(with a revision), a single-file LDM checkpoint trained from (the result equals training from the folder), and the
errors: not cached while offline, pickle checkpoints, settings that do not apply."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from ldm_single_file import write_single_file
from safetensors.torch import load_file

import difftune as dt
from difftune.basemodel import resolve_model
from difftune.config import load_config
from difftune.generation import load_pipeline
from difftune.serialization import read_header
from difftune.train import TrainConfig, main
from difftune.zoo import path as zoo_path

REPO = Path(__file__).resolve().parents[2]
REPO_ID = "difftune-test/sd-mini"
MAIN, V_PRED = "a" * 40, "b" * 40  # commit hashes of the two cached revisions


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache (the layout huggingface_hub writes) holding sd-mini as REPO_ID: refs/main → MAIN, and
    a second commit V_PRED whose scheduler predicts v."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    for commit in (MAIN, V_PRED):
        shutil.copytree(zoo_path("sd-mini"), repo / "snapshots" / commit)
    sched = repo / "snapshots" / V_PRED / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    return cache


@pytest.fixture
def offline_cache(hub_cache, monkeypatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


@pytest.fixture(scope="module")
def single_file(tmp_path_factory) -> Path:
    """sd-mini as one original-layout (LDM) checkpoint."""
    pipe = load_pipeline("sd-mini", device="cpu")
    return write_single_file(pipe, tmp_path_factory.mktemp("ckpt") / "sd-mini.safetensors")


@pytest.fixture
def cfg(tiny):
    """``cfg(out, *sets)``: a 3-step LoRA run on the tiny caption set; the sets name the base model."""
    return lambda out, *sets: _cfg(tiny, out, *sets)


def _cfg(tiny, out: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"data.path={tiny['captions']}", f"output_dir={out}", "validation.prompts=[]",
        "train.max_steps=3", "train.batch_size=2", *sets])


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v for c in ("unet", "vae", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def test_hub_repo_id_resolves_offline_from_the_cache_at_a_revision(offline_cache):
    snapshots = offline_cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots"
    model = resolve_model(REPO_ID)
    assert model.folder == snapshots / MAIN and model.repo_id == REPO_ID
    assert resolve_model(REPO_ID, revision=V_PRED).folder == snapshots / V_PRED
    pipe = load_pipeline(REPO_ID, device="cpu", revision=V_PRED)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.name_or_path == REPO_ID  # an adapter saved from it records the repo id, not the cache folder
    default = load_pipeline(REPO_ID, device="cpu")
    assert default.scheduler.config.prediction_type == "epsilon"


def test_hub_repo_id_not_cached_while_offline_is_an_error_that_says_so(cfg, offline_cache, tmp_path):
    with pytest.raises(dt.DifftuneError, match=r"`model.path` names the Hub repo 'nobody/absent', which is not in the "
                                               r"Hugging Face cache .*HF_HUB_OFFLINE=1"):
        main(cfg(tmp_path / "out", "model.path=nobody/absent"))
    with pytest.raises(dt.DifftuneError, match=rf"'{REPO_ID}' at revision 'v9'.*not in the Hugging Face cache"):
        resolve_model(REPO_ID, revision="v9")


def test_training_from_a_hub_id_records_the_repo_id(cfg, offline_cache, tmp_path):
    result = main(cfg(tmp_path / "out", f"model.path={REPO_ID}", "train.max_steps=1"))
    assert read_header(result)["base_model"] == REPO_ID
    from huggingface_hub import ModelCard

    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == REPO_ID  # the Hub's base_model field
    from difftune.cli import main as cli_main

    png = tmp_path / "x.png"  # no --model: the base the adapter records, resolved from the cache again
    assert cli_main(["generate", "--adapter", str(result), "--prompt", "a 3", "--steps", "2", "--out", str(png)]) == 0
    assert png.is_file()


def test_single_file_checkpoint_loads_bit_identically(single_file):
    folder, one = load_pipeline("sd-mini", device="cpu"), load_pipeline(single_file, device="cpu", config="sd-mini")
    a, b = _weights(folder), _weights(one)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert one.scheduler.config == folder.scheduler.config and one.name_or_path == str(single_file)


def test_training_from_a_single_file_equals_training_from_the_folder(cfg, single_file, tmp_path):
    # The checkpoint loads bit-identically (test above) and the same kernels run in the same order, so the trained
    # adapters must be equal bit for bit.
    a = main(cfg(tmp_path / "folder", "model.path=sd-mini"))
    b = main(cfg(tmp_path / "file", f"model.path={single_file}", "model.config=sd-mini"))
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(v.abs().sum() > 0 for v in ta.values())  # it trained: LoRA's up matrices left zero
    assert read_header(b)["base_model"] == str(single_file)


def test_ckpt_is_read_only_when_it_is_safetensors_inside(cfg, single_file, tmp_path):
    renamed = tmp_path / "model.ckpt"
    shutil.copy(single_file, renamed)
    pipe = load_pipeline(renamed, device="cpu", config=str(zoo_path("sd-mini")))
    assert torch.equal(pipe.unet.conv_in.weight, load_pipeline("sd-mini", device="cpu").unet.conv_in.weight)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, pickled)
    with pytest.raises(dt.DifftuneError, match=r"`model.path` .*pickled.ckpt.* is not a safetensors file.*does not "
                                               r"load pickle checkpoints"):
        main(cfg(tmp_path / "out", f"model.path={pickled}", "model.config=sd-mini"))


def test_single_file_with_configs_of_another_model_is_an_error(tiny, single_file):
    with pytest.raises(dt.DifftuneError, match=r"`--model` '.*sd-mini.safetensors' could not be loaded with the "
                                               r"configs of .*Hint: --config must name the pipeline"):
        load_pipeline(single_file, device="cpu", config=str(tiny["sd"]))


def test_single_file_without_config_offline_names_model_config(cfg, single_file, offline_cache, tmp_path):
    # diffusers recognises an SD1 checkpoint; its reference configs are not in this cache
    with pytest.raises(dt.DifftuneError, match=r"`model.config` names the Hub repo '[^']*stable-diffusion-v1-5[^']*'"
                                               r", which is not in the Hugging Face cache"):
        main(cfg(tmp_path / "out", f"model.path={single_file}"))


@pytest.mark.parametrize(("sets", "match"), [
    (["model.path=sd-mini", "model.revision=main"], r"`model.revision` must be left out: model.path 'sd-mini' is "
                                                    r"not a Hub repo id"),
    (["model.path=sd-mini", "model.config=sd-mini"], r"`model.config` must be left out"),
    ([f"model.path={REPO_ID}", "model.revision=../../etc"], r"`model.revision` must be a branch, tag or commit"),
    (["model.path=stable-diffusion-xl-base-1.0"],
     r"`model.path` must be an existing pipeline folder or checkpoint file, a shipped model "
     r"\(sd-mini, dit-mini, flow-mini\) or a Hub repo id"),
    (["model.path=missing.safetensors"], r"`model.path` must be an existing checkpoint file"),
])
def test_base_model_settings_that_do_not_apply_are_refused(cfg, sets, match, tmp_path):
    with pytest.raises(dt.DifftuneError, match=match):
        main(cfg(tmp_path / "out", *sets))


def test_generate_takes_a_hub_id(offline_cache, tmp_path, capsys):
    from difftune.cli import main as cli_main

    out = tmp_path / "x.png"
    assert cli_main(["generate", "--model", REPO_ID, "--revision", MAIN, "--prompt", "a 3", "--steps", "2",
                     "--out", str(out)]) == 0
    assert out.is_file()
    assert cli_main(["generate", "--model", "nobody/absent", "--prompt", "x", "--out", str(out)]) == 2
    assert "`--model` names the Hub repo 'nobody/absent'" in capsys.readouterr().err


def test_shipped_configs_name_base_models_the_resolver_finds():
    # configs/lora/sdxl.yaml named `stable-diffusion-xl-base-1.0`, a relative folder that exists nowhere; a config
    # may name the outputs/ folder of a run that comes before it (configs/zoo, the KIND transfer lab)
    from difftune.basemodel import hub_repo_id
    from difftune.zoo import MODELS

    configs = [c for c in sorted((REPO / "configs").rglob("*.yaml")) if c.parent.name not in ("accelerate", "debug")]
    named = {c: load_config(TrainConfig, c).model.path for c in configs}
    bad = {str(c.relative_to(REPO)): p for c, p in named.items()
           if p and p not in MODELS and not p.startswith("outputs/") and not hub_repo_id(p)}
    assert not bad and sum(bool(hub_repo_id(p)) for p in named.values()) >= 10, bad


def test_the_studio_takes_a_hub_id_and_a_single_file(offline_cache, single_file):
    from apps.studio.models import load_model

    pipe, digest = load_model(REPO_ID, device="cpu")
    assert pipe.name_or_path == REPO_ID and digest
    # a checkpoint's configs are the reference repo diffusers infers (SD 1.5 here), not in this cache
    with pytest.raises(dt.DifftuneError, match=r"`--model's configs \(inferred: the app has no --config\)` names the "
                                               r"Hub repo '[^']*stable-diffusion-v1-5[^']*', which is not in the"):
        load_model(single_file, device="cpu")
