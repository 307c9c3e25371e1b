"""Issue 17: crash-safe checkpoints, one run per output folder, hostile adapter files and configs that cannot hang,
allocate without bound or train NaN. A seeded sample of bench/crash_harness.py and the two fuzzers runs here (seconds);
the long runs are the bench scripts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import difftune as dt
from difftune.config import load_config, read_yaml
from difftune.counting import inspect_adapter
from difftune.errors import DifftuneError
from difftune.serialization import CONFIG_NAME, WEIGHTS_NAME, read_header
from difftune.targeting import check_pattern, find_targets
from difftune.testing import randomize_adapter, tiny_unet
from difftune.train import TrainConfig
from difftune.train import checkpoints as ck
from difftune.train import config as tc
from difftune.train.lock import LOCK_FILE, hold_output_dir, release_output_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import crash_harness  # noqa: E402
import fuzz_adapters  # noqa: E402
import fuzz_configs  # noqa: E402

# ------------------------------------------------------------------------------------------------------------------
# checkpoint rotation and restore, with a stand-in accelerator (the real one runs in the crash-harness sample below)


class FakeAccelerator:
    is_main_process, process_index = True, 0

    def __init__(self, fail: dict[str, Exception] | None = None, restore_rng: bool = True):
        self.fail, self.restore_rng, self.loaded = fail or {}, restore_rng, []

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "optimizer.bin").write_text("opt")
        (Path(folder) / ck.CHECKPOINT_FILE).write_text("w")

    def load_state(self, folder):
        name = Path(folder).name
        if name in self.fail:
            raise self.fail[name]
        if self.restore_rng:
            torch.manual_seed(int(name.split("-")[-1]))
            import random
            random.seed(int(name.split("-")[-1]))
        self.loaded.append(name)


def _cfg(out: Path, **checkpointing) -> SimpleNamespace:
    return SimpleNamespace(output_dir=str(out), checkpointing=SimpleNamespace(
        checkpoints_total_limit=checkpointing.get("limit"), resume_from_checkpoint=checkpointing.get("resume"),
        allow_inexact_resume=checkpointing.get("inexact", False)))


def _write_state(folder: Path) -> None:
    (folder / ck.STATE_FILE).write_text("{}")


@pytest.mark.parametrize("limit", [1, 2])
def test_rotation_keeps_the_limit_and_leaves_nothing_behind(tmp_path, limit):
    acc, cfg = FakeAccelerator(), _cfg(tmp_path, limit=limit)
    for step in range(1, 5):
        ck.save_checkpoint(acc, cfg, step, _write_state)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"checkpoint-{s}" for s in range(5 - limit, 5)]


def test_a_kill_during_deletion_never_touches_the_newest_checkpoint(tmp_path, monkeypatch):
    acc, cfg = FakeAccelerator(), _cfg(tmp_path, limit=1)
    ck.save_checkpoint(acc, cfg, 1, _write_state)
    def dies_half_way(path, *a, **k):
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this line runs

    with monkeypatch.context() as m:
        m.setattr("shutil.rmtree", dies_half_way)
        with pytest.raises(KeyboardInterrupt):
            ck.save_checkpoint(acc, cfg, 2, _write_state)
    # the new checkpoint was complete before the old one was touched; the half-deleted one is out of the namespace
    assert [p.name for p in ck.checkpoint_dirs(tmp_path)] == ["checkpoint-2"]
    assert any(p.name.startswith(ck.TRASH_PREFIX) for p in (tmp_path / "checkpoints").iterdir())
    (tmp_path / ".difftune-tmp-adapter_model.safetensors.x1.tmp").write_text("half")
    removed = ck.clean_leftovers(tmp_path)
    assert len(removed) == 2 and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_a_kill_while_writing_leaves_only_a_temp_folder(tmp_path, monkeypatch):
    acc, cfg = FakeAccelerator(), _cfg(tmp_path, limit=1)
    ck.save_checkpoint(acc, cfg, 1, _write_state)

    def dies(folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(acc, cfg, 2, dies)
    assert [p.name for p in ck.checkpoint_dirs(tmp_path)] == ["checkpoint-1"]
    ck.clean_leftovers(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-1"]


def _three_checkpoints(tmp_path: Path) -> None:
    acc = FakeAccelerator()
    for step in (1, 2, 3):
        ck.save_checkpoint(acc, _cfg(tmp_path), step, _write_state)


def test_latest_falls_back_past_an_unreadable_checkpoint_with_a_warning(tmp_path, caplog):
    _three_checkpoints(tmp_path)
    acc = FakeAccelerator(fail={"checkpoint-3": RuntimeError("corrupt optimizer.bin")})
    with caplog.at_level(logging.WARNING, logger="difftune.train"):
        assert ck.restore(acc, _cfg(tmp_path, resume="latest")).name == "checkpoint-2"
    assert "cannot resume from" in caplog.text and "checkpoint-3" in caplog.text and "previous" in caplog.text
    # every checkpoint unreadable: an error listing them, not a raw exception
    acc = FakeAccelerator(fail={f"checkpoint-{s}": ValueError("bad") for s in (1, 2, 3)})
    with pytest.raises(DifftuneError, match="no readable checkpoint.*checkpoint-3.*checkpoint-1"):
        ck.restore(acc, _cfg(tmp_path, resume="latest"))
    # a named checkpoint is not replaced by another one
    acc = FakeAccelerator(fail={"checkpoint-2": RuntimeError("x")})
    with pytest.raises(DifftuneError, match="checkpoint-2"):
        ck.restore(acc, _cfg(tmp_path, resume=str(tmp_path / "checkpoints" / "checkpoint-2")))


def test_an_rng_state_that_does_not_restore_is_an_error_unless_allowed(tmp_path, caplog):
    _three_checkpoints(tmp_path)
    named = str(tmp_path / "checkpoints" / "checkpoint-3")
    with pytest.raises(DifftuneError, match="RNG state.*allow_inexact_resume"):
        ck.restore(FakeAccelerator(restore_rng=False), _cfg(tmp_path, resume=named))
    with caplog.at_level(logging.WARNING, logger="difftune.train"):
        got = ck.restore(FakeAccelerator(restore_rng=False), _cfg(tmp_path, resume=named, inexact=True))
    assert got.name == "checkpoint-3" and "NOT reproduce" in caplog.text


def test_non_finite_trained_values_are_never_written():
    with pytest.raises(DifftuneError, match="diverged.*NaN/inf"):
        ck.check_finite_tensors({"a": torch.tensor([1.0, float("nan")])}, "the result")
    ck.check_finite_tensors({"a": torch.ones(2), "i": torch.tensor([3])}, "the result")


# ------------------------------------------------------------------------------------------------------------------
# the real trainer: SIGKILL and resume (crash harness sample), corrupt RNG state, NaN loss

@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return crash_harness.make_fixture(tmp_path_factory.mktemp("reliability"))


def test_crash_harness_sample_resumes_bit_exactly(fixture, tmp_path):
    reference = tmp_path / "reference"
    assert crash_harness.run_child(crash_harness.config(fixture, reference, 1, False), 300)[0] == "ok"
    expected = crash_harness.result_tensors(reference)
    for i, (event, n, limit) in enumerate([("delete_old", 3, 1), ("rename_into_place", 5, 2), ("final_save", 2, 1)]):
        out = tmp_path / f"trial-{i}"
        first, _ = crash_harness.run_child(crash_harness.config(fixture, out, limit, False), 300, event=(event, n))
        assert first == "killed", event
        second, _ = crash_harness.run_child(crash_harness.config(fixture, out, limit, True), 300)
        assert second == "ok", event
        got = crash_harness.result_tensors(out)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), event
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # leftovers cleaned


def test_corrupt_rng_state_falls_back_to_the_previous_checkpoint(fixture, tmp_path, caplog):
    out = tmp_path / "run"
    full = crash_harness.config(fixture, out, None, False)
    full.train.max_steps = 3
    dt.train.main(full)
    expected = load_file(out / "adapter" / WEIGHTS_NAME)
    (out / "checkpoints" / "checkpoint-3" / "random_states_0.pkl").write_bytes(b"garbage")
    (out / "adapter" / WEIGHTS_NAME).unlink()
    resumed = crash_harness.config(fixture, out, None, True)
    resumed.train.max_steps = 3
    with caplog.at_level(logging.WARNING, logger="difftune.train"):
        dt.train.main(resumed)
    assert "checkpoint-3" in caplog.text and "falling back" in caplog.text
    got = load_file(out / "adapter" / WEIGHTS_NAME)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_nan_loss_stops_training_and_saves_no_result(fixture, tmp_path, monkeypatch):
    from difftune.train import loss as loss_module

    real = loss_module.StepInputs.default_loss
    monkeypatch.setattr(loss_module.StepInputs, "default_loss", lambda self: real(self) * float("nan"))
    cfg = crash_harness.config(fixture, tmp_path / "run", None, False)
    with pytest.raises(DifftuneError, match="diverged: the loss is nan at step 1"):
        dt.train.main(cfg)
    assert not (tmp_path / "run" / "adapter").exists()
    release_output_dir(tmp_path / "run")


# ------------------------------------------------------------------------------------------------------------------
# the output-folder lock

_HOLDER = """
import sys, time
from difftune.train.lock import hold_output_dir
hold_output_dir(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_the_folder_is_refused_naming_the_first(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(DifftuneError, match=rf"in use by another training run \(pid {proc.pid} on host"):
            hold_output_dir(tmp_path)
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="difftune.train"):
        hold_output_dir(tmp_path)
    try:
        assert f"pid {proc.pid}" in caplog.text and "no longer alive" in caplog.text
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        hold_output_dir(tmp_path)  # re-entrant within one process
    finally:
        release_output_dir(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()  # released cleanly: the next run takes it without a warning


# ------------------------------------------------------------------------------------------------------------------
# configs

BASE_YAML = "model: {path: m}\nmethod: {name: lora}\ndata: {path: d}\noutput_dir: out\n"


def _yaml(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "c.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


@pytest.mark.parametrize("text, match", [
    (BASE_YAML + "train: {max_steps: 3}\ntrain: {max_steps: 5}\n", "duplicate key 'train'"),
    (BASE_YAML.replace("{name: lora}", "{name: lora, rank: 2, rank: 8}"), "duplicate key 'rank'"),
    (BASE_YAML + "seed: &s 3\nadapter_name: *s\n", "anchors"),
    ("a: &a [1]\n" + BASE_YAML + "validation: {seeds: *a}\n", "anchors"),
    (BASE_YAML + "train:\n  1: 2\n", "keys must be strings"),
    (BASE_YAML + "yes: 1\n", "keys must be strings"),
    (BASE_YAML + "x: " + "[" * 50_000 + "]" * 50_000 + "\n", "deeper|too deeply"),
    (BASE_YAML + "train: {max_grad_norm: .nan}\n", "train.max_grad_norm.*finite"),
    (BASE_YAML + "train: {noise_offset: .inf}\n", "train.noise_offset.*finite"),
    (BASE_YAML.replace("{name: lora}", "{name: lora, alpha: .nan}"), "alpha.*finite"),
    (BASE_YAML.replace("output_dir: out", "output_dir: ''"), "output_dir"),
    (BASE_YAML + "seed: 18446744073709551617\n", "seed"),
    (BASE_YAML.replace("{name: lora}", "{name: lora, target_modules: ['(.*.*)*Z']}"), "nested quantifiers"),
    (b"model: {path: \xff\xfe}\n", "not UTF-8"),
    (BASE_YAML + "# " + "z" * (2 << 20) + "\n", "over the"),
])
def test_hostile_configs_are_refused_quickly(tmp_path, text, match):
    t0 = time.time()
    with pytest.raises(DifftuneError, match=match):
        load_config(TrainConfig, _yaml(tmp_path, text))
    assert time.time() - t0 < 2


def test_an_alias_bomb_is_refused_in_milliseconds(tmp_path):
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    assert len(bomb) < 900
    t0 = time.time()
    with pytest.raises(DifftuneError, match="alias|anchor"):
        read_yaml(_yaml(tmp_path, bomb))
    assert time.time() - t0 < 0.5


def _float_fields() -> list[str]:
    out = []
    for section in ("data", "optimizer", "schedule", "train", "validation"):
        cls = typing.get_type_hints(TrainConfig)[section]
        for f in dataclasses.fields(cls):
            if "float" in str(typing.get_type_hints(cls)[f.name]):
                out.append(f"{section}.{f.name}")
    return out


@pytest.mark.parametrize("field", _float_fields())
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_float_field_refuses_non_finite_values(tmp_path, field, value):
    raw = f"[{value}, 0.9]" if field == "optimizer.betas" else value
    with pytest.raises(DifftuneError, match=rf"`?{field}.*finite"):
        load_config(TrainConfig, _yaml(tmp_path, BASE_YAML), [f"{field}={raw}"])


def test_non_finite_values_are_refused_in_python_too():
    with pytest.raises(DifftuneError, match="train.max_grad_norm"):
        tc.TrainLoopConfig(max_grad_norm=float("nan"))
    with pytest.raises(DifftuneError, match="optimizer.lr"):
        tc.OptimizerConfig(lr=float("nan"))


def test_valid_configs_still_load(tmp_path):
    for example in sorted((REPO / "configs").rglob("*.yaml")):
        try:
            read_yaml(example)
        except DifftuneError as e:  # only the hardening's refusals matter here, not missing keys of a partial file
            assert not any(w in str(e) for w in ("alias", "anchor", "duplicate", "finite", "UTF-8")), (example, e)


# ------------------------------------------------------------------------------------------------------------------
# patterns

def test_a_catastrophic_regex_returns_within_a_second():
    model = tiny_unet(0)
    for pattern in [r"(.*.*)*Z", r"(a+)+$", r"(x|xx)*y", r".*.*.*.*.*.*.*.*.*.*Z", r"(?=.*)(.*)*"]:
        t0 = time.time()
        with pytest.raises(DifftuneError, match="refused"):
            find_targets(model, [pattern])
        assert time.time() - t0 < 1, pattern


def test_ordinary_patterns_are_accepted():
    for pattern in ["to_q", "to_out.0", r".*attn2\.to_[kv]", r"down_blocks\.\d+\..*", r".*attn[12]\..*to_(q|k|v)",
                    r"(down|up)_blocks\.1\..*"]:
        assert check_pattern(pattern) == pattern
    assert find_targets(tiny_unet(0), [r".*attn2\.to_[kv]"])


# ------------------------------------------------------------------------------------------------------------------
# adapter files

@pytest.fixture
def saved(tmp_path):
    model = tiny_unet(0)
    dt.inject(model, dt.LoRAConfig(rank=2, target_modules=["to_q", "to_v"]), name="x")
    randomize_adapter(model, "x", seed=1)
    path = dt.save_adapter(model, tmp_path / "adapter", "x")
    dt.delete_adapter(model, "x")
    return model, path


def _edit_header(path: Path, edit) -> None:
    header = json.loads((path / CONFIG_NAME).read_text())
    edit(header)
    (path / CONFIG_NAME).write_text(json.dumps(header, allow_nan=True))


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.update(name=["a"]), "`name` must be a string"),
    (lambda h: h.update(component=["unet"]), "`component` must be a string"),
    (lambda h: h.update(target_fingerprint="abc"), "target_fingerprint"),
    (lambda h: h["config"].update(alpha=float("nan")), "NaN"),
    (lambda h: h["config"].update(alpha=float("inf")), "Infinity"),
    (lambda h: h["config"].update(alpha=1e308), "alpha"),
    (lambda h: h["config"].update(rank=200_000), "rank"),
    (lambda h: h["config"].update(rank=3), "rank of the saved tensors"),
    (lambda h: h["config"].update(target_modules=["(.*.*)*Z"]), "refused"),
    (lambda h: h.update(config=[1, 2]), "config"),
    (lambda h: h.update(format_version=True), "format_version"),
])
def test_malformed_headers_are_refused_and_leave_the_model_alone(saved, edit, match):
    model, path = saved
    _edit_header(path, edit)
    before = _state(model)
    t0 = time.time()
    with pytest.raises(DifftuneError, match=match):
        dt.load_adapter(model, path)
    assert time.time() - t0 < 2
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("raw, match", [
    (b'{"format": "difftune-adapter", "method": "lora", "config": {"alpha": 1e400}}', "beyond float range"),
    (b'{"format": "difftune-adapter", "method": "lora", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "deeper"),
    (b'{"format": "difftune-adapter", "method": "lora\xff"}', "not UTF-8"),
    (b'{"format": "difftune-adapter", "method": "full", "method": "lora"}', "repeats the key 'method'"),
])
def test_raw_header_damage_is_a_difftune_error(saved, raw, match):
    _, path = saved
    (path / CONFIG_NAME).write_bytes(raw)
    with pytest.raises(DifftuneError, match=match):
        read_header(path)


def test_inspect_refuses_a_string_fingerprint(saved):
    _, path = saved
    _edit_header(path, lambda h: h.update(target_fingerprint="deadbeef"))
    with pytest.raises(DifftuneError, match="target_fingerprint"):
        inspect_adapter(path)


def test_a_huge_header_size_is_refused_before_allocation_for_any_method(tmp_path):
    """A method without `check_saved` (here: a rank field SPM reads from the header) is covered by the loader's
    allocation guard: rank 10⁹ fails at once instead of allocating."""
    from difftune.methods import METHODS

    model = tiny_unet(0)
    name = "spm" if "spm" in METHODS else "lora"
    dt.inject(model, dt.methods.get_method(name).from_dict({}), name="x")
    path = dt.save_adapter(model, tmp_path / "a", "x")
    dt.delete_adapter(model, "x")
    _edit_header(path, lambda h: h["config"].update(rank=10**6 if name == "spm" else 10**9))
    t0 = time.time()
    with pytest.raises(DifftuneError, match="rank|shape"):
        dt.load_adapter(model, path)
    assert time.time() - t0 < 2


def test_nan_adapter_values_are_refused(saved):
    model, path = saved
    tensors = load_file(path / WEIGHTS_NAME)
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(DifftuneError, match="NaN/inf"):
        dt.load_adapter(model, path)
    assert not dt.list_adapters(model)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 1e308, 10**400])
def test_lora_alpha_must_be_finite_and_sane(alpha):
    with pytest.raises(DifftuneError, match="alpha"):
        dt.LoRAConfig(alpha=alpha)


# ------------------------------------------------------------------------------------------------------------------
# seeded fuzzer samples (the long runs: bench/fuzz_adapters.py, bench/fuzz_configs.py)

def test_adapter_fuzzer_sample(tmp_path):
    summary, rows = fuzz_adapters.run(48, seed=17, timeout=10.0, root=tmp_path)
    bad = [r for r in rows if r["outcome"] not in ("ok", "refused")]
    assert not bad, bad[:3]
    assert summary["refused"] > 0


def test_config_fuzzer_sample(tmp_path):
    summary, rows = fuzz_configs.run(60, seed=17, timeout=10.0, root=tmp_path)
    bad = [r for r in rows if r["outcome"] not in ("ok", "refused")]
    assert not bad, bad[:3]
    assert summary["refused"] > 0 and summary["ok"] > 0


def test_adapter_fuzzer_sample_of_the_issue_29_and_32_generators(tmp_path):
    """Regex forms, huge values per method (a NaN/inf output after a clean load counts as a bug), huge scales and
    sizes, float8 tensors and 10⁶-entry headers: each refused (or loaded with finite outputs) within the limit."""
    summary, rows = fuzz_adapters.run(28, seed=29, timeout=10.0, root=tmp_path, kinds=fuzz_adapters.NEW)
    bad = [r for r in rows if r["outcome"] not in ("ok", "refused")]
    assert not bad, bad[:3]
    assert all(summary["by_mutation"][k] for k in fuzz_adapters.NEW) and summary["refused"] > 0


def test_config_fuzzer_sample_of_the_issue_29_and_32_generators(tmp_path):
    """Regex forms in configs and `--set`, huge integers, sizes and training settings: each must be refused."""
    summary, rows = fuzz_configs.run(32, seed=29, timeout=10.0, root=tmp_path, kinds=fuzz_configs.NEW)
    bad = [r for r in rows if r["outcome"] not in ("ok", "refused")]
    assert not bad, bad[:3]
    assert all(summary["by_mutation"][k] for k in fuzz_configs.NEW)
