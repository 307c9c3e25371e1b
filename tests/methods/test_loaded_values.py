"""Issue 29 item 3 and issue 32 item 7: a loaded adapter never silently poisons outputs. For every registered method
(its contract cases, so a new method is covered when it joins), finite but huge values in any saved tensor, or
values each below the per-value limit that together blow a layer up, are refused at load naming the tensor or layer;
so are output scales of 1e30 in a header and values that overflow a float16 model. fp16 SaRA files load.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from contract import CASES, adapted, build, config, kinds, run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import difftune as dt
from difftune.adapter_checks import MAX_VALUE, is_statistic
from difftune.errors import DifftuneError
from difftune.serialization import CONFIG_NAME, WEIGHTS_NAME
from difftune.testing import randomize_adapter, tiny_unet

PARAMS = [pytest.param(m, k, id=f"{m}-{k}") for m in sorted(CASES) for k in kinds(m)[:2]]


def _saved(method: str, kind: str, tmp_path) -> tuple:
    model = adapted(method, kind)
    path = dt.save_adapter(model.module, tmp_path / "ad", name="a")
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
    return path, load_file(path / WEIGHTS_NAME), meta, config(method, model)


def _values(tensors: dict, cfg) -> list[str]:
    """One saved key per distinct tensor name (lora_B, kind_tU.<class>, csc_dense.<i>.weight, ...) holding trained
    values: the name from the method's prefix on, without indices."""
    seen: dict[str, str] = {}
    for k, v in sorted(tensors.items()):
        if v.is_floating_point() and v.numel() and not is_statistic(k, cfg):
            local = k[k.index(f"{cfg.method}_"):] if f"{cfg.method}_" in k else k
            seen.setdefault(re.sub(r"\.\d+", "", local), k)
    return sorted(seen.values())


def _refused(method: str, kind: str, path, match: str) -> None:
    fresh = build(method, kind)
    with pytest.raises(DifftuneError, match=match):
        dt.load_adapter(fresh.module, path, name="a")
    assert not dt.list_adapters(fresh.module)


@pytest.mark.parametrize(("method", "kind"), PARAMS)
def test_a_huge_value_in_any_tensor_is_refused_naming_it(method, kind, tmp_path):
    path, tensors, meta, cfg = _saved(method, kind, tmp_path)
    keys = _values(tensors, cfg)
    assert keys
    for key in keys:
        save_file({**tensors, key: torch.full_like(tensors[key], 1e30)}, path / WEIGHTS_NAME, metadata=meta)
        _refused(method, kind, path, re.escape(key))


@pytest.mark.parametrize(("method", "kind"), PARAMS)
def test_values_below_the_limit_that_together_blow_a_layer_up_are_refused(method, kind, tmp_path):
    """Each value is within MAX_VALUE (so only the loaded adapter's effect can tell), as in a diverged run."""
    path, tensors, meta, cfg = _saved(method, kind, tmp_path)
    trained = {k for k, v in tensors.items()
               if v.is_floating_point() and v.numel() and v.abs().max() > 0 and not is_statistic(k, cfg)}
    big = {k: v / v.abs().max() * MAX_VALUE / 2 if k in trained else v for k, v in tensors.items()}
    save_file(big, path / WEIGHTS_NAME, metadata=meta)
    _refused(method, kind, path, "times the layer's own size|not finite")


@pytest.mark.parametrize(("method", "field", "value"), [
    ("lora", "alpha", 1e30), ("krona", "scale", -1e30), ("spm", "alpha", 1e30), ("csc", "pre_hint_channels", 10**9)])
def test_a_huge_scale_or_size_in_the_header_is_refused_naming_it(method, field, value, tmp_path):
    kind = kinds(method)[0]
    path, *_ = _saved(method, kind, tmp_path)
    header = json.loads((path / CONFIG_NAME).read_text())
    header["config"][field] = value
    (path / CONFIG_NAME).write_text(json.dumps(header))
    _refused(method, kind, path, f"`{field}`")


def test_values_that_overflow_a_float16_model_are_refused(tmp_path):
    model = tiny_unet(0)
    dt.inject(model, dt.LoRAConfig(rank=2, target_modules=["to_q"]), name="a")
    randomize_adapter(model, "a", seed=1)
    path = dt.save_adapter(model, tmp_path / "ad", "a")
    tensors = load_file(path / WEIGHTS_NAME)
    key = sorted(k for k in tensors if k.endswith("lora_B"))[0]
    tensors[key] = torch.full_like(tensors[key], 7e4)  # below MAX_VALUE, beyond float16's 65,504
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    half = tiny_unet(0).half()
    with pytest.raises(DifftuneError, match=rf"float16.*{re.escape(key)}"):
        dt.load_adapter(half, path)
    assert not dt.list_adapters(half)


@pytest.mark.parametrize(("method", "kind"), PARAMS)
def test_a_clean_load_gives_the_saved_outputs(method, kind, tmp_path):
    """The probe changes nothing: a loaded adapter computes exactly what the saved one did (per-call state of a
    model-level part, such as an encoded control image, is not left behind)."""
    model = adapted(method, kind)
    expected = run(method, kind, model)
    dt.save_adapter(model.module, tmp_path / "ad", name="a")
    fresh = build(method, kind)
    dt.load_adapter(fresh.module, tmp_path / "ad", name="a")
    torch.testing.assert_close(run(method, kind, fresh), expected, atol=0, rtol=0)


# -- SaRA in float16 (issue 32 item 7): its base fingerprint (numel, Σ W0², Σ W0) overflowed float16

def _sara(model: torch.nn.Module) -> torch.nn.Module:
    dt.inject(model, dt.methods.get_method("sara").from_dict({"threshold": 0.05}), name="s")
    randomize_adapter(model, "s", seed=1)
    return model


def test_a_float16_sara_model_saves_a_file_that_loads(tmp_path):
    model = _sara(tiny_unet(0)).half()
    path = dt.save_adapter(model, tmp_path / "s", "s")
    saved = load_file(path / WEIGHTS_NAME)
    assert all(v.dtype == torch.float64 for k, v in saved.items() if ".sara_base_" in k)  # not cast by .half()
    for dtype in (torch.float16, torch.float32):
        fresh = tiny_unet(0).to(dtype)
        dt.load_adapter(fresh, path)
        loaded = dt.methods.verbs.adapter_state_dict(fresh, "s")
        for k, v in saved.items():
            assert torch.equal(loaded[k].to(v.dtype), v), k


def test_a_sara_file_converted_to_float16_loads_and_still_knows_its_base(tmp_path):
    model = _sara(tiny_unet(0))
    path = dt.save_adapter(model, tmp_path / "s", "s")
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path / WEIGHTS_NAME).items()}
    assert any(not torch.isfinite(v).all() for k, v in tensors.items() if ".sara_base_" in k)  # a count overflowed
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    fresh = tiny_unet(0)
    dt.load_adapter(fresh, path)
    x = (torch.randn(1, 4, 16, 16), torch.tensor([10]))
    kw = {"encoder_hidden_states": torch.randn(1, 7, 32)}
    assert torch.isfinite(fresh(*x, **kw).sample).all()
    other = tiny_unet(1)  # another base: refused for what it is, not as "NaN/inf ... diverged"
    with pytest.raises(DifftuneError, match="differ from those the adapter was trained on"):
        dt.load_adapter(other, path)


def test_the_probe_leaves_the_global_rng_alone():
    """Probe inputs come from their own generator: the check does not shift a seeded run (inject itself draws its
    initial values from the global generator, as torch's layers do)."""
    from difftune.adapter_checks import check_loaded

    model = adapted("lora", "unet")
    state = torch.get_rng_state()
    check_loaded(model.module, "a", "probe")
    assert torch.equal(torch.get_rng_state(), state)


def test_a_method_that_does_not_declare_its_probe_inputs_is_named(tmp_path, monkeypatch):
    """CSC's tuners read the control image; without it in `probe_inputs` the load says what the method lacks."""
    path = dt.save_adapter(adapted("csc", "unet").module, tmp_path / "ad", name="a")
    default = dt.methods.MethodConfig.probe_inputs
    monkeypatch.setattr(dt.methods.get_method("csc"), "probe_inputs", default)
    _refused("csc", "unet", path, "probe_inputs")


def test_an_spm_with_facilitated_transport_is_judged_by_its_full_membrane(tmp_path):
    """Its output is γ·ΔW·x with γ from the prompt; the load probes the membrane at full strength (its probe inputs),
    so huge membrane values are refused, naming them."""
    model = tiny_unet(0)
    dt.inject(model, dt.methods.get_method("spm").from_dict({"concepts": ["cat"]}), name="s")
    randomize_adapter(model, "s", seed=1)
    path = dt.save_adapter(model, tmp_path / "s", "s")
    dt.load_adapter(tiny_unet(0), path)
    tensors = load_file(path / WEIGHTS_NAME)
    up = sorted(k for k in tensors if k.endswith("spm_up"))
    save_file({**tensors, **{k: torch.full_like(tensors[k], MAX_VALUE / 2) for k in up}}, path / WEIGHTS_NAME,
              metadata={"format": "pt"})
    with pytest.raises(DifftuneError, match="spm_up"):
        dt.load_adapter(tiny_unet(0), path)
