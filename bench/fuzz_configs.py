"""Fuzz training-config parsing (issue 17): mutated YAML configs and ``--set`` overrides must build a `TrainConfig` or
raise `DifftuneError` within 5 s; a config that builds then has its method injected into the tiny SD UNet (what
``difftune train`` does first with ``target_modules``), which must also finish within the limit.

Mutations of a valid config (configs/debug/tiny_sd.yaml with paths filled in), one per case, drawn from ``MUTATIONS``:
a value (any key, method fields included) replaced by a hostile YAML scalar or node (``.nan``, ``.inf``, 1e400,
400-digit integers, lists, mappings, dates, ``!!python`` and ``!!binary`` tags, regex bombs for
``target_modules``, ...);
structural damage (duplicate keys, anchors/aliases and an alias bomb, merge keys, 10⁵-deep nesting, non-string and
complex keys, non-UTF-8 bytes, truncation, flipped bytes, a 2 MB file, a top-level list); hostile ``--set`` overrides.
Issues 29/32 added: module patterns in Python >= 3.11 syntax (atomic groups, possessive repeats) in
``target_modules``/``exclude_modules`` of the file or ``--set method={...}``; integers of 30 to 4,301 digits; method
sizes that would allocate terabytes (``pre_hint_channels: 1000000000``); and training settings that used to fail only
later (``data.resolution=1000000``, a path as ``model.variant``, ``data.caption_ext=/``, ...). Those three kinds must
be refused: a config that builds with one of them is a bug ("accepted").
Each case runs in a forked child (`fuzz_common.run_forked`) with a 5 s limit and a 4 GiB memory cap.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fuzz_configs.py --cases 1600 --seed 0
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from fuzz_common import REGEX_BOMBS, run_forked, summarize  # noqa: E402
from fuzz_common import cli as fuzz_cli  # noqa: E402

import difftune as dt  # noqa: E402
from difftune.config import load_config  # noqa: E402
from difftune.testing import tiny_unet  # noqa: E402
from difftune.train import TrainConfig  # noqa: E402

BASE = """model:
  path: {model}
method:
  name: lora
  rank: 2
  alpha: 4.0
  target_modules: [to_q, to_v]
data:
  path: {data}
  resolution: 32
  label_dropout: 0.1
optimizer:
  lr: 1.0e-4
  betas: [0.9, 0.999]
train:
  max_steps: 2
  batch_size: 2
  max_grad_norm: 1.0
  noise_offset: 0.0
  ema_decay: 0.9999
logging:
  report_to: none
  progress_bar: false
validation:
  prompts: ["a photo of a cat"]
  num_inference_steps: 2
  guidance_scale: 7.5
checkpointing:
  checkpointing_steps: 0
output_dir: {out}
seed: 0
"""
KEYS = ["model.path", "model.architecture", "model.variant", "model.component", "model.prediction_type", "method.name",
        "method.rank", "method.alpha", "method.dropout", "method.target_modules", "method.exclude_modules",
        "method.init", "method.use_rslora", "data.kind", "data.path", "data.resolution", "data.label_dropout",
        "data.repeats", "data.prior_loss_weight", "data.prompts", "data.num_samples", "optimizer.name",
        "optimizer.lr", "optimizer.betas", "optimizer.weight_decay", "optimizer.eps", "schedule.name",
        "schedule.warmup_steps", "schedule.power", "schedule.num_cycles", "train.max_steps", "train.batch_size",
        "train.max_grad_norm", "train.snr_gamma", "train.noise_offset", "train.ema_decay", "train.kl_weight",
        "train.gradient_accumulation_steps", "train.mixed_precision", "validation.guidance_scale",
        "validation.seeds", "validation.every_steps", "checkpointing.checkpointing_steps",
        "checkpointing.checkpoints_total_limit", "checkpointing.resume_from_checkpoint", "output_dir", "seed",
        "adapter_name", "method.a1", "method.threshold"]
SCALARS = [".nan", ".NaN", ".inf", "-.inf", "1e400", "-1e400", "1" * 400, "nan", "NaN", "inf", "-1", "0", "1e-400",
           '""', "''", "[]", "{}", "[1, [2, [3]]]", "null", "~", "true", "yes", "no", "2001-01-01", "0x10", "0o17",
           "1_000", "!!binary aGk=", '!!python/object/apply:os.system ["echo pwned"]', "!!set {a, b}",
           '"(.*.*)*Z"', '["(.*.*)*Z"]', '["(a|aa)*b"]', '[".*.*.*.*.*.*.*.*Z"]', "[" + "x" * 300 + "]",
           '"' + "x" * 100_000 + '"', "{a: 1}", "[to_q, 1]", "-0.0", "4294967296", "18446744073709551617",
           "!!float 1e5", "!!int 12", "!!str 3", "full", "lora", "krona", "sara", '"  "', "/", ".", "|\n    multi\n"]
OVERRIDE_KEYS = KEYS + ["a..b", "", "train.max_steps.x", "method", "train", "=", "method.name.x", " "]
#: (method, field, value) sizes that would allocate without bound or overflow outputs: each must be refused
HUGE_SIZES = [("csc", "pre_hint_channels", 10**9), ("csc", "pre_hint_channels", 5000), ("lora", "rank", 10**9),
              ("lora", "alpha", 1e30), ("krona", "scale", -1e30), ("krona", "a1", 10**7), ("spm", "alpha", 1e30),
              ("spm", "text_length", 10**6), ("spm", "num_anchors", 10**7), ("kind", "learngenes", 10**9),
              ("kind", "classes", [1, 10**9]), ("kind", "tailors_per_class", 10**8), ("scedit", "skips", [0, 10**8]),
              ("sara", "rank_min_dim", 2**40), ("spm", "concepts", ["x"] * 2000)]
#: training settings that passed the config and failed later (MemoryError, ValueError): each must be refused
BAD_SETTINGS = [("data.resolution", "1000000"), ("data.resolution", "4104"), ("data.resolution", "1024000"),
                ("validation.num_inference_steps", "2147483648"), ("validation.num_inference_steps", "100000"),
                ("model.variant", "../../../etc/passwd"), ("model.variant", "/etc/passwd"), ("model.variant", "a/b"),
                ("data.caption_ext", "/"), ("data.caption_ext", "../x"), ("data.caption_ext", "txt"),
                ("model.component", "../unet"), ("train.batch_size", "1000000000"), ("data.repeats", "10000000000"),
                ("data.num_workers", "100000"), ("validation.seeds", "[-1]"),
                ("validation.seeds", "[18446744073709551616]"),
                ("train.max_steps", "10000000000000"), ("validation.guidance_scale", "1e30"),
                ("validation.class_labels", "[-1]"), ("adapter_name", "a.b")]


def set_value(text: str, key: str, value: str) -> str:
    """``text`` with ``key`` (section.field) set to the raw YAML ``value`` (appended in its section if absent)."""
    lines = text.splitlines()
    if "." in key:
        section, field = key.split(".", 1)
        try:
            start = lines.index(f"{section}:")
        except ValueError:
            return text + f"\n{section}:\n  {field}: {value}\n"
        end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
        for i in range(start + 1, end):
            if lines[i].startswith(f"  {field}:"):
                lines[i] = f"  {field}: {value}"
                return "\n".join(lines) + "\n"
        lines.insert(start + 1, f"  {field}: {value}")
        return "\n".join(lines) + "\n"
    for i, line in enumerate(lines):
        if line.startswith(f"{key}:"):
            lines[i] = f"{key}: {value}"
            return "\n".join(lines) + "\n"
    return text + f"{key}: {value}\n"


def m_value(rng: random.Random, text: str) -> tuple[str, list[str], str]:
    key, value = rng.choice(KEYS), rng.choice(SCALARS)
    return set_value(text, key, value), [], f"{key}={value[:20]}"


def m_structure(rng: random.Random, text: str) -> tuple[str | bytes, list[str], str]:
    kind = rng.choice(["dup", "dup_section", "anchor", "bomb", "merge", "deep", "deep_flow", "intkey", "boolkey",
                       "nullkey", "complexkey", "nonutf8", "bom", "tabs", "truncate", "flip", "huge", "list", "empty",
                       "scalar", "longline", "mixed_method_keys"])
    if kind == "dup":
        return text.replace("  rank: 2", "  rank: 2\n  rank: 64"), [], kind
    if kind == "dup_section":
        return text + "train:\n  max_steps: 100000\n", [], kind
    if kind == "anchor":
        return text.replace("  rank: 2", "  rank: &r 2\n  alpha: *r").replace("  alpha: 4.0\n", "", 1), [], kind
    if kind == "bomb":
        bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
            f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
        return text + "validation:\n  prompts: *i\n" if rng.random() < 0.5 else bomb + text, [], kind
    if kind == "merge":
        return "base: &base {max_steps: 3}\n" + text.replace("train:\n", "train:\n  <<: *base\n"), [], kind
    if kind == "deep":
        return text + "method:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(400)), [], kind
    if kind == "deep_flow":
        return text.replace("  rank: 2", "  rank: " + "[" * 100_000 + "]" * 100_000), [], kind
    if kind == "intkey":
        return text.replace("train:\n", "train:\n  1: 2\n"), [], kind
    if kind == "boolkey":
        return text + "yes: 1\n", [], kind
    if kind == "nullkey":
        return text.replace("method:\n", "method:\n  ~: 3\n"), [], kind
    if kind == "complexkey":
        return text + "? [a, b]\n: c\n", [], kind
    if kind == "nonutf8":
        data = text.encode()
        i = rng.randrange(len(data))
        return data[:i] + bytes([0xFF, 0xC3, 0x28]) + data[i:], [], kind
    if kind == "bom":
        return "\ufeff".encode() + text.encode("utf-16"), [], kind
    if kind == "tabs":
        return text.replace("  ", "\t"), [], kind
    if kind == "truncate":
        return text[: rng.randrange(len(text))], [], kind
    if kind == "flip":
        data = bytearray(text.encode())
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data), [], kind
    if kind == "huge":
        return text + "# " + "z" * (2 << 20) + "\n", [], kind
    if kind == "list":
        return "- " + text.replace("\n", "\n  "), [], kind
    if kind == "empty":
        return "", [], kind
    if kind == "scalar":
        return "42\n", [], kind
    if kind == "longline":
        return text.replace("a photo of a cat", "cat " * 200_000), [], kind
    return text.replace("  rank: 2", "  rank: 2\n  3: x"), [], kind


def m_override(rng: random.Random, text: str) -> tuple[str, list[str], str]:
    sets = []
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(OVERRIDE_KEYS)
        value = rng.choice(SCALARS + ["", "=", "{name: lora, rank: 1000000000}", "[", "{", ": :"])
        sets.append(f"{key}={value}" if rng.random() < 0.9 else key)
    return text, sets, f"--set {' '.join(s[:20] for s in sets)}"


def m_regex(rng: random.Random, text: str) -> tuple[str, list[str], str]:
    field, bomb = rng.choice(["target_modules", "exclude_modules"]), json.dumps(rng.choice(REGEX_BOMBS))
    if rng.random() < 0.5:
        return set_value(text, f"method.{field}", f"[{bomb}]"), [], f"must refuse: method.{field}={bomb[:20]}"
    method = f"{{name: lora, target_modules: [to_q], {field}: [{bomb}]}}"
    return text, [f"method={method}"], f"must refuse: --set method={{{field}: {bomb[:20]}}}"


def m_bigint(rng: random.Random, text: str) -> tuple[str, list[str], str]:
    key, digits = rng.choice(KEYS), rng.choice([30, 41, 400, 4300, 4301, 10_000])
    value = rng.choice(["", "-"]) + "9" * digits
    if rng.random() < 0.5:
        return set_value(text, key, value), [], f"{key}=<{digits} digits>"
    return text, [f"{key}={value}"], f"--set {key}=<{digits} digits>"


def m_size(rng: random.Random, text: str) -> tuple[str, list[str], str]:
    method, field, value = rng.choice(HUGE_SIZES)
    label = f"must refuse: {method}.{field}={value!s:.20}"
    return text, [f"method={json.dumps({'name': method, field: value})}"], label


def m_setting(rng: random.Random, text: str) -> tuple[str, list[str], str]:
    key, value = rng.choice(BAD_SETTINGS)
    if rng.random() < 0.5:
        return set_value(text, key, json.dumps(value) if "/" in value or value == "a.b" else value), [], \
            f"must refuse: {key}={value[:20]}"
    return text, [f"{key}={value}"], f"must refuse: --set {key}={value[:20]}"


MUTATIONS = [(m_value, 5), (m_structure, 4), (m_override, 2), (m_regex, 2), (m_bigint, 1), (m_size, 2),
             (m_setting, 2)]
#: the generators issues 29/32 added (`run(..., kinds=NEW)` samples them alone)
NEW = ["m_regex", "m_bigint", "m_size", "m_setting"]


def make_case(path: Path, sets: list[str], model: torch.nn.Module, must_refuse: bool = False):
    def case() -> str:
        cfg = load_config(TrainConfig, path, sets)
        if must_refuse:
            return "accepted: a value that must be refused built a config"
        dt.inject(model, cfg.method_config(), name="fuzz")  # what `difftune train` does first with the patterns
        return "built and injected"
    return case


def run(cases: int, seed: int, timeout: float, root: Path, verbose: bool = False,
        kinds: list[str] | None = None) -> tuple[dict, list[dict]]:
    """``kinds``: only these mutations (names in `MUTATIONS`), e.g. `NEW`."""
    torch.manual_seed(0)
    model = tiny_unet(0)
    base = BASE.format(model=root / "model", data=root / "images", out=root / "out")
    rng = random.Random(seed)
    funcs, weights = zip(*[(f, w) for f, w in MUTATIONS if kinds is None or f.__name__ in kinds], strict=True)
    rows = []
    for i in range(cases):
        mutate = rng.choices(funcs, weights)[0]
        text, sets, label = mutate(rng, base)
        path = root / f"case-{i}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        outcome, detail, seconds = run_forked(make_case(path, sets, model, label.startswith("must refuse")), timeout)
        row = {"i": i, "kind": mutate.__name__, "mutation": label[:80], "outcome": outcome, "s": round(seconds, 3),
               "detail": detail[:400]}
        rows.append(row)
        if verbose or outcome not in ("ok", "refused"):
            print(json.dumps(row), flush=True)
        path.unlink()
    summary = summarize(rows)
    summary["by_mutation"] = {f.__name__: sum(r["kind"] == f.__name__ for r in rows) for f in funcs}
    return summary, rows


def cli(argv: list[str] | None = None) -> int:
    return fuzz_cli(run, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(cli())
