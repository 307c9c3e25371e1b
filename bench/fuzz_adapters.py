"""Fuzz the adapter loader (issue 17): mutated adapter files of every registered adapter method, loaded into the tiny
SD UNet and inspected; each case must load or raise `DifftuneError` within 5 s, and a failed load must leave the model
exactly as it was.

For each method a real adapter is trained-looking (random values) and saved; each case copies it and applies one
mutation drawn from ``MUTATIONS``: a header field (top level or ``config.<field>``) set to a hostile value or removed
(lists for strings, 10⁶ ranks, 1e400, NaN, regex bombs, deep nesting, ...), raw header text damage (non-UTF-8 bytes,
truncation, 10⁵-deep brackets, NaN/Infinity literals), tensor damage (missing/extra keys, shapes, dtypes, NaN values),
and file damage (truncation, flipped bytes, a huge header length, missing files). Issues 29/32 added: module patterns
with Python >= 3.11 syntax (atomic groups, possessive repeats) and nested repeats; finite but huge values in any
tensor of any method (one value, a whole tensor, or every tensor just under the per-value limit); header scales and
sizes of 1e30 / 10⁹; float8 tensors; and safetensors headers of up to 10⁶ empty entries. The header is damaged in
``adapter_config.json`` or, for a third of the cases, in the safetensors metadata read when the ``.safetensors`` file
is loaded alone. Every case runs in a forked child (`fuzz_common.run_forked`) with a 5 s limit and a 4 GiB memory cap;
an adapter that loads is then run (the tiny UNet, with the method's per-call inputs), and a NaN/inf output is a bug
("nan": a clean load must never poison outputs).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fuzz_adapters.py --cases 1600 --seed 0
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import struct
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from fuzz_common import REGEX_BOMBS, run_forked, summarize  # noqa: E402
from fuzz_common import cli as fuzz_cli  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import difftune as dt  # noqa: E402
from difftune.counting import inspect_adapter  # noqa: E402
from difftune.errors import DifftuneError  # noqa: E402
from difftune.methods import METHODS  # noqa: E402
from difftune.serialization import CONFIG_NAME, METADATA_KEY, WEIGHTS_NAME  # noqa: E402
from difftune.testing import randomize_adapter, tiny_unet  # noqa: E402

DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE = [None, True, False, -1, 0, 1, 3.5, 10**6, 200_000, 10**30, 2**63, -(2**63), 1e308, -1e308, "", "x" * 100_000,
           [], ["a"], [1, 2], {}, {"a": 1}, {"modules": "3", "sha256": 5}, "(.*.*)*Z", ["(.*.*)*Z"], [".*" * 40 + "Z"],
           ["(a|aa)*b"], ["(x+x+)+y"], ["to_q" * 100], ["["], "lora", "krona", "sara", "full", "nonexistent", "unet",
           ["unet"], "transformer", "vae", "a.b", "_x", "1e400", {"deep": [[[[[[[[[[[]]]]]]]]]]]}]
RAW_NUMBERS = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" * 5000, "0.0000000001e-400"]
#: header fields that scale or size what a load allocates or computes (method config fields)
SIZE_FIELDS = {"alpha": [1e30, -1e30, 1e300], "scale": [-1e30, 1e30], "pre_hint_channels": [10**9, 5000, 2**40],
               "rank": [10**12], "a1": [10**7], "learngenes": [10**9], "text_length": [10**6], "num_anchors": [10**6],
               "classes": [[1, 10**9], list(range(5000))], "skips": [[0, 10**8]], "concepts": [["x"] * 2000],
               "tailors_per_class": [10**8], "down_ratio": [1e30]}


def method_cases() -> dict[str, dict]:
    """Every registered adapter method with a config that fits the tiny UNet (contract cases where they exist)."""
    sys.path.insert(0, str(REPO / "tests" / "methods"))
    try:
        from contract import CASES
    except ImportError:
        CASES = {}
    out = {}
    for name, cls in sorted(METHODS.items()):
        if not cls.is_adapter:
            continue
        case = CASES.get(name)
        fields = dict(case.config) if case else {}
        if case and case.targets.get("unet"):
            fields["target_modules"] = case.targets["unet"]
        out[name] = {"fields": fields, "inputs": dict(case.inputs.get("unet", {})) if case else {}}
    return out


def snapshot(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__name__};".encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for k, p in model.named_parameters():
        h.update(f"{k}:{p.requires_grad};".encode())
    return h.hexdigest()


def make_bases(root: Path, base: torch.nn.Module) -> dict[str, Path]:
    folders = {}
    for name, spec in method_cases().items():
        model = copy.deepcopy(base)
        try:
            cfg = dt.methods.get_method(name).from_dict(spec["fields"])
            dt.inject(model, cfg, name="fuzz")
            randomize_adapter(model, "fuzz", seed=1)
            folders[name] = dt.save_adapter(model, root / f"base-{name}", "fuzz")
        except DifftuneError as e:
            print(f"[fuzz] skipping {name}: it does not build on the tiny UNet ({e})", flush=True)
    return folders


# --- mutations: each takes (rng, folder) and damages the copy in `folder`; returns a label -------------------------

def _header(folder: Path) -> dict:
    return json.loads((folder / CONFIG_NAME).read_text())


def _write_header(folder: Path, header_text: str | bytes, rng: random.Random) -> str:
    """Write the damaged header to adapter_config.json, or (a third of the time) into the safetensors metadata."""
    data = header_text.encode("utf-8", "surrogatepass") if isinstance(header_text, str) else header_text
    if rng.random() < 1 / 3:
        weights = folder / WEIGHTS_NAME
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        text = data.decode("utf-8", "replace") if rng.random() < 0.5 else data.decode("latin-1")
        save_file(tensors, str(weights), metadata={"format": "pt", METADATA_KEY: text})
        (folder / CONFIG_NAME).unlink()
        return "metadata"
    (folder / CONFIG_NAME).write_bytes(data)
    return "config"


def m_field(rng: random.Random, folder: Path) -> str:
    header = _header(folder)
    if rng.random() < 0.5:
        key = rng.choice(sorted(header))
        target, label = header, key
    else:
        key = rng.choice(sorted(header["config"]) + ["rank", "alpha", "target_modules", "a1", "threshold"])
        target, label = header["config"], f"config.{key}"
    if rng.random() < 0.15:
        target.pop(key, None)
        return f"drop {label} ({_write_header(folder, json.dumps(header), rng)})"
    value = rng.choice(HOSTILE)
    target[key] = value
    text = json.dumps(header, allow_nan=True)
    return f"{label}={str(value)[:30]!r} ({_write_header(folder, text, rng)})"


def m_raw_number(rng: random.Random, folder: Path) -> str:
    header = _header(folder)
    key = rng.choice(["rank", "alpha", "a1", "threshold", "scale", "dropout", "format_version", "modules"])
    marker = "__NUMBER__"
    where = header["config"] if key not in ("format_version", "modules") else header
    if key == "modules":
        where = header.setdefault("target_fingerprint", {}) or {}
        header["target_fingerprint"] = where
    where[key] = marker
    raw = rng.choice(RAW_NUMBERS)
    return f"{key}={raw[:12]} ({_write_header(folder, json.dumps(header).replace(json.dumps(marker), raw), rng)})"


def m_raw_text(rng: random.Random, folder: Path) -> str:
    text = (folder / CONFIG_NAME).read_bytes()
    kind = rng.choice(["truncate", "bytes", "deep", "empty", "huge", "notjson", "array", "dup"])
    if kind == "truncate":
        data = text[: rng.randrange(len(text))]
    elif kind == "bytes":
        i = rng.randrange(len(text))
        data = text[:i] + bytes([0xFF, 0xFE, 0xC3]) + text[i + 1:]
    elif kind == "deep":
        data = text.replace(b'"config": {', b'"config": {"x": ' + DEEP.encode() + b', ', 1)
    elif kind == "empty":
        data = b""
    elif kind == "huge":
        data = text[:-2] + b', "pad": "' + b"y" * (3 << 20) + b'"}'
    elif kind == "notjson":
        data = b"\x80\x04\x95 pickle-like \x00\x01"
    elif kind == "array":
        data = b"[" + text + b"]"
    else:  # duplicate keys: JSON allows them, the last wins
        data = text.replace(b'"method": "', b'"method": "full", "method": "', 1)
    return f"raw {kind} ({_write_header(folder, data, rng)})"


def _read(weights: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(weights), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def m_tensors(rng: random.Random, folder: Path) -> str:
    weights = folder / WEIGHTS_NAME
    meta, tensors = _read(weights)
    key = rng.choice(sorted(tensors))
    kind = rng.choice(["drop", "extra", "shape", "dtype", "nan", "inf", "rename", "empty", "scalar", "bigrank"])
    t = tensors[key]
    if kind == "drop":
        tensors.pop(key)
    elif kind == "extra":
        tensors["down_blocks.0.nonexistent.lora_A"] = torch.zeros(2, 2)
    elif kind == "shape":
        tensors[key] = torch.zeros(*(s + 1 for s in t.shape)) if t.dim() else torch.zeros(3)
    elif kind == "dtype":
        tensors[key] = t.to(rng.choice([torch.int32, torch.float16, torch.bool, torch.uint8, torch.float64]))
    elif kind == "nan" and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[0] = float("nan")
        tensors[key] = t
    elif kind == "inf" and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[-1] = float("inf")
        tensors[key] = t
    elif kind == "rename":
        tensors["up_blocks.9." + key] = tensors.pop(key)
    elif kind == "empty":
        tensors[key] = torch.zeros(0)
    elif kind == "scalar":
        tensors[key] = torch.tensor(1.0)
    elif kind == "bigrank":  # header rank raised with the tensors left alone
        header = _header(folder)
        header["config"]["rank"] = rng.choice([200_000, 10**6, 10**9])
        text = json.dumps(header)
        (folder / CONFIG_NAME).write_text(text)
        meta = {**meta, METADATA_KEY: text}
    save_file(tensors, str(weights), metadata=meta)
    return f"tensor {kind} {key[-30:]}"


def m_file(rng: random.Random, folder: Path) -> str:
    weights = folder / WEIGHTS_NAME
    data = weights.read_bytes()
    kind = rng.choice(["truncate", "flip", "headerlen", "missing_weights", "missing_config", "config_dir", "garbage"])
    if kind == "truncate":
        weights.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(b), 8 + struct.unpack("<Q", data[:8])[0] + 64))
            b[i] ^= 1 << rng.randrange(8)
        weights.write_bytes(bytes(b))
    elif kind == "headerlen":
        weights.write_bytes(struct.pack("<Q", rng.choice([2**63, 10**12, 0, len(data)])) + data[8:])
    elif kind == "missing_weights":
        weights.unlink()
    elif kind == "missing_config":
        (folder / CONFIG_NAME).unlink()
    elif kind == "config_dir":
        (folder / CONFIG_NAME).unlink()
        (folder / CONFIG_NAME).mkdir()
    else:
        weights.write_bytes(os.urandom(rng.randint(0, 4096)))
    return f"file {kind}"


def m_regex(rng: random.Random, folder: Path) -> str:
    header = _header(folder)
    field = rng.choice(["target_modules", "exclude_modules"])
    header["config"][field] = [rng.choice(REGEX_BOMBS)] + (["to_q"] if field == "target_modules" else [])
    return f"config.{field}={header['config'][field][0][:20]!r} ({_write_header(folder, json.dumps(header), rng)})"


def m_huge(rng: random.Random, folder: Path) -> str:
    """Finite but huge values: one value or a whole tensor at 1e5..1e38, or every tensor scaled to just under the
    per-value limit (each value passes it; the loaded adapter's effect must not)."""
    weights = folder / WEIGHTS_NAME
    meta, tensors = _read(weights)
    values = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.numel() and ".sara_base_" not in k)
    kind = rng.choice(["one", "tensor", "all"])
    size = 10.0 ** rng.uniform(5, 38) * rng.choice([1, -1])
    key = rng.choice(values)
    if kind == "one":
        t = tensors[key].clone()
        t.view(-1)[rng.randrange(t.numel())] = size
        tensors[key] = t
    elif kind == "tensor":
        tensors[key] = torch.full_like(tensors[key], size)
    else:
        limit = rng.choice([3e4, 9e4, 1e3])
        tensors = {k: v / v.abs().max() * limit if k in values and v.abs().max() > 0 else v
                   for k, v in tensors.items()}
        key, size = "every tensor", limit
    save_file(tensors, str(weights), metadata=meta)
    return f"huge {kind} {key[-30:]} {size:.1e}"


def m_sizes(rng: random.Random, folder: Path) -> str:
    header = _header(folder)
    field = rng.choice(sorted(SIZE_FIELDS))
    header["config"][field] = rng.choice(SIZE_FIELDS[field])
    return f"config.{field}={str(header['config'][field])[:20]} ({_write_header(folder, json.dumps(header), rng)})"


def m_float8(rng: random.Random, folder: Path) -> str:
    weights = folder / WEIGHTS_NAME
    meta, tensors = _read(weights)
    keys = sorted(k for k, v in tensors.items() if v.is_floating_point())
    key = rng.choice(keys)
    tensors[key] = tensors[key].clamp(-400, 400).to(rng.choice([torch.float8_e4m3fn, torch.float8_e5m2]))
    save_file(tensors, str(weights), metadata=meta)
    return f"float8 {key[-30:]}"


def m_entries(rng: random.Random, folder: Path) -> str:
    """A safetensors header of many empty tensor entries (the file keeps its difftune metadata)."""
    weights = folder / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    n = rng.choice([300_000, 1_000_000])
    head = json.dumps({"__metadata__": meta})[1:-1]
    body = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n))
    raw = ("{" + head + "," + body + "}").encode()
    raw += b" " * (-len(raw) % 8)
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return f"entries {n}"


MUTATIONS = [(m_field, 5), (m_raw_number, 2), (m_raw_text, 2), (m_tensors, 3), (m_file, 2), (m_regex, 2), (m_huge, 4),
             (m_sizes, 2), (m_float8, 1), (m_entries, 1)]
#: the generators issues 29/32 added (`run(..., kinds=NEW)` samples them alone)
NEW = ["m_regex", "m_huge", "m_sizes", "m_float8", "m_entries"]


def make_case(model: torch.nn.Module, path: Path, inputs: dict):
    def case() -> str:
        before = snapshot(model)
        notes = []
        try:
            inspect_adapter(path)
            notes.append("inspect ok")
        except DifftuneError:
            notes.append("inspect refused")
        target = path / WEIGHTS_NAME if (path / ".alone").exists() else path
        try:
            name = dt.load_adapter(model, target)
        except DifftuneError:
            if snapshot(model) != before:
                return "changed after a failed load"
            raise
        g = torch.Generator().manual_seed(1)
        args = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]))
        with torch.no_grad(), dt.adapter_inputs(**inputs):
            out = model(*args, encoder_hidden_states=torch.randn(2, 7, 32, generator=g)).sample
        dt.delete_adapter(model, name)
        if not bool(torch.isfinite(out).all()):
            return "nan: the adapter loaded cleanly and the output holds NaN/inf"
        return "loaded; " + ", ".join(notes)
    return case


def run(cases: int, seed: int, timeout: float, root: Path, verbose: bool = False,
        kinds: list[str] | None = None) -> tuple[dict, list[dict]]:
    """``kinds``: only these mutations (names in `MUTATIONS`), e.g. `NEW`."""
    torch.manual_seed(0)
    base = tiny_unet(0)
    bases = make_bases(root, base)
    specs = method_cases()
    rng = random.Random(seed)
    funcs, weights = zip(*[(f, w) for f, w in MUTATIONS if kinds is None or f.__name__ in kinds], strict=True)
    rows = []
    for i in range(cases):
        method = sorted(bases)[i % len(bases)]
        folder = root / f"case-{i}"
        shutil.copytree(bases[method], folder)
        mutate = rng.choices(funcs, weights)[0]
        label = mutate(rng, folder)
        if (folder / CONFIG_NAME).exists() is False and (folder / WEIGHTS_NAME).exists() and rng.random() < 0.5:
            (folder / ".alone").touch()  # load the .safetensors file alone
        outcome, detail, seconds = run_forked(make_case(base, folder, specs[method]["inputs"]), timeout)
        row = {"i": i, "method": method, "kind": mutate.__name__, "mutation": label, "outcome": outcome,
               "s": round(seconds, 3), "detail": detail[:400]}
        rows.append(row)
        if verbose or outcome not in ("ok", "refused"):
            print(json.dumps(row), flush=True)
        shutil.rmtree(folder)
    summary = summarize(rows)
    summary["methods"] = sorted(bases)
    summary["by_method"] = {m: sum(r["method"] == m for r in rows) for m in sorted(bases)}
    summary["by_mutation"] = {f.__name__: sum(r["kind"] == f.__name__ for r in rows) for f in funcs}
    return summary, rows


def cli(argv: list[str] | None = None) -> int:
    return fuzz_cli(run, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(cli())
