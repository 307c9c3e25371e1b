"""The model card (huggingface_hub's ModelCard) and ``hub.push`` (issue 25, item 6), tested up to the upload call:
with the network off the run's result stays intact and the error says how to push it later."""

from __future__ import annotations

from pathlib import Path

import pytest

import difftune as dt
from difftune.config import load_config
from difftune.serialization import read_header
from difftune.train import TrainConfig, main

REPO = Path(__file__).resolve().parents[2]


def _cfg(tiny, out: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={tiny['sd']}", f"data.path={tiny['captions']}", f"output_dir={out}", "train.max_steps=2",
        "validation.prompts=[]", *sets])


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_model_card_is_a_hub_model_card(tiny, tmp_path):
    from huggingface_hub import ModelCard

    main(_cfg(tiny, tmp_path / "out"))
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "difftune" and card.data.tags == ["difftune", "lora"]
    assert card.data.base_model is None  # a local folder is no Hub repo: the metadata names none
    assert f"base model: `{tiny['sd']}`" in card.text and "load_adapter" in card.text


def test_push_with_the_network_off_keeps_the_result_and_says_how_to_push_later(tiny, tmp_path, offline):
    out = tmp_path / "out"
    with pytest.raises(dt.DifftuneError, match=r"uploading to the Hub repo 'me/tiny-lora' failed \(OfflineMode"
                                               r"IsEnabled.*The result is intact in .*out.*push it with: "
                                               r"difftune push .*out me/tiny-lora --private"):
        main(_cfg(tiny, out, "hub.push=true", "hub.repo_id=me/tiny-lora", "hub.private=true"))
    assert read_header(out / "adapter")["method"] == "lora" and (out / "README.md").is_file()
    from difftune.cli import main as cli_main

    assert cli_main(["push", str(out), "me/tiny-lora"]) == 2  # later, still offline: the same clear error


def test_push_uploads_the_run_folder_without_its_checkpoints(tiny, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "https://hf/c/1")
    out = tmp_path / "out"
    main(_cfg(tiny, out, "hub.push=true", "hub.repo_id=me/tiny-lora", "checkpointing.checkpointing_steps=1"))
    assert (out / "checkpoints").is_dir()
    (create, repo, create_kw), (upload, upload_kw) = calls
    assert (create, repo, create_kw) == ("create", "me/tiny-lora", {"private": False, "exist_ok": True})
    assert upload_kw["repo_id"] == "me/tiny-lora" and Path(upload_kw["folder_path"]) == out
    assert "checkpoints/*" in upload_kw["ignore_patterns"]
    saved = (out / "config.yaml").read_text()
    assert "token: null" in saved or "token:" not in saved


@pytest.mark.parametrize(("sets", "match"), [
    (["hub.token=hf_secret123"], r"`hub.token` must be left out, got '<hidden>'.*HF_TOKEN"),
    (["hub.push=true"], r"`hub.repo_id` must be set with hub.push: true"),
    (["hub.repo_id=not a repo"], r"`hub.repo_id` must be a Hub repo id"),
])
def test_hub_settings_are_checked(tiny, tmp_path, sets, match):
    with pytest.raises(dt.DifftuneError, match=match) as e:
        _cfg(tiny, tmp_path, *sets)
    assert "hf_secret123" not in str(e.value)
