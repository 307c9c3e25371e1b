"""Fuzz the studio's inputs (issue 32): hostile mixes, symlinks planted in the adapters folder, and hostile text, each
through `apps.studio.Studio` on the tiny SD pipeline. Every case must finish ("ok") or be refused with a
`DifftuneError` within the time limit; a refusal's message must be short (< 1000 characters) and name no path of the
work folder; nothing outside the adapters folder may be read through a link or written.

Generators (``GENERATORS``): ``mix`` (JSON mixes up to 2 MiB: many distinct keys, duplicates, hostile keys and
weights, deep nesting; parsed and refused within 1 CPU-s), ``links`` (a layout of symlinks out of the folder, or
inside it, then the action that would follow it: generate, load, save merged/bundle, list) and ``text`` (prompts,
sampler names, mix names and keys of up to 10 MB). Each case runs in a forked child (`fuzz_common.run_forked`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fuzz_studio.py --cases 300 --seed 0
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from fuzz_common import cli as fuzz_cli  # noqa: E402
from fuzz_common import run_forked, summarize  # noqa: E402

from difftune.errors import DifftuneError  # noqa: E402

KEYS = ["/etc/passwd", "../x", "labs/../../x", "~root", "a\x00b", "a\\b", "", "k" * 100_000, 5, None, ["a"],
        {"a": 1}, "labs/style/adapter_model.safetensors", "studio-mixes/x.mix.json", "labs", "."]
WEIGHTS = [1.0, -2.0, 2.0000001, 3, True, None, "1", 1e308, 10**400, [], {}]
MAX_MESSAGE = 1000
Case = Callable[[], str]


def _tree(folder: Path) -> str:
    """A digest of every file below ``folder`` (names, link targets, bytes): what a case must leave unchanged."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def guarded(studio, work: Path, outside: Path, action: Callable[[], str], cpu_limit: float | None = None) -> Case:
    """``action`` with the invariants: a short refusal naming no work path, ``outside`` unchanged, and (when given)
    at most ``cpu_limit`` CPU seconds."""
    def case() -> str:
        before, t0 = _tree(outside), time.process_time()
        refusal: DifftuneError | None = None
        try:
            result = action()
        except DifftuneError as e:
            msg, refusal, result = str(e), e, ""
            faults = ([f"{len(msg):,} characters long"] if len(msg) > MAX_MESSAGE else []) + (
                ["naming the work path"] if str(work) in msg or str(work.resolve()) in msg else [])
            if faults:
                raise AssertionError(f"a message {' and '.join(faults)}: {msg[:300]}") from e
        spent = time.process_time() - t0
        if cpu_limit is not None and spent > cpu_limit:
            raise AssertionError(f"{spent:.2f} CPU-s, over {cpu_limit}")
        if _tree(outside) != before:
            raise AssertionError("a file outside the adapters folder changed")
        if refusal is not None:
            raise refusal
        return result
    return case


def g_mix(rng: random.Random, studio, root: Path) -> tuple[str, Callable[[], str], float | None]:
    from apps.studio import Request, library

    kind = rng.choice(["distinct", "duplicates", "items", "deep", "shape"])
    if kind == "distinct":  # the shape whose duplicate check was quadratic
        n = rng.choice([10, 64, 65, 1000, 30_000, 70_000])
        text = json.dumps([{"key": f"k{i:07d}", "weight": 1.0} for i in range(n)])
    elif kind == "duplicates":
        n = rng.randint(2, 64)
        text = json.dumps([{"key": "labs/style", "weight": 0.5}] * n)
    elif kind == "items":
        text = json.dumps([{"key": rng.choice(KEYS), "weight": rng.choice(WEIGHTS)}
                           for _ in range(rng.randint(1, 3))], default=str)
    elif kind == "deep":
        d = rng.choice([10, 40, 100_000])
        text = "[" * d + "]" * d
    else:
        text = rng.choice(['{"key": "labs/style"}', "[1, 2]", '[{"key": "labs/style", "extra": 1}]', "null", "\"x\"",
                           '[{"key": "labs/style", "weight": NaN}]', "[" + "{},"*50_000 + "{}]"])
    if rng.random() < 0.5:  # the same text as a saved bundle
        bundle = root / "fuzz.mix.json"
        bundle.write_text(f'{{"format": "difftune-mix", "format_version": 1, "fused": false, "adapters": {text}}}')
        return f"bundle:{kind}:{len(text)}", lambda: str(studio.load_mix("fuzz.mix.json")["items"])[:80], 1.0

    def act() -> str:
        t0 = time.process_time()
        try:
            mix = library.parse_mix(text)
        finally:  # the parse is what must stay under 1 CPU-s (generation is not)
            if time.process_time() - t0 > 1.0:
                raise AssertionError(f"parsing a {len(text):,}-character mix took over 1 CPU-s")
        studio.generate(Request(prompt="a cat", steps=1, mix=mix))
        return f"generated with {len(mix)} adapter(s)"
    return f"text:{kind}:{len(text)}", act, None


def g_links(rng: random.Random, studio, root: Path, outside: Path) -> tuple[str, Callable[[], str], None]:
    """Plant one link (out of the folder, or inside it) and return the action that would follow it."""
    from apps.studio import Request
    from apps.studio.library import MixItem

    style = root / "labs" / "style"
    layout = rng.choice(["weights-out", "config-out", "folder-out", "parent-out", "mixes-out", "name-dangling",
                         "bundle-out", "inside"])
    shutil.copytree(style, outside / "style")
    (outside / "b.mix.json").write_text(json.dumps({"format": "difftune-mix", "format_version": 1, "fused": False,
                                                   "adapters": [{"key": "labs/style", "weight": 1.0}]}))
    key, want = "x", "refused"
    if layout in ("weights-out", "config-out", "inside"):
        shutil.copytree(style, root / "x")
        name = "adapter_config.json" if layout == "config-out" else "adapter_model.safetensors"
        (root / "x" / name).unlink()
        os.symlink((style if layout == "inside" else outside / "style") / name, root / "x" / name)
        want = "ok" if layout == "inside" else "refused"
    elif layout == "folder-out":
        os.symlink(outside / "style", root / "x")
    elif layout == "parent-out":
        os.symlink(outside, root / "p")
        key = "p/style"
    elif layout == "mixes-out":
        os.symlink(outside, root / "studio-mixes")
    else:
        (root / "studio-mixes").mkdir(exist_ok=True)
        target = outside / ("gone" if layout == "name-dangling" else "b.mix.json")
        os.symlink(target, root / "studio-mixes" / ("m" if layout == "name-dangling" else "m.mix.json"))
    action = rng.choice(["generate", "load", "save-merged", "save-bundle", "list"])
    if layout in ("mixes-out", "name-dangling", "bundle-out"):
        action = rng.choice(["save-merged", "save-bundle"] + (["load"] if layout != "name-dangling" else []))

    def follow() -> None:
        if action == "generate":
            studio.generate(Request(prompt="a cat", steps=1, mix=[MixItem(key, 1.0)]))
        elif action == "load":
            studio.load_mix({"mixes-out": "studio-mixes/b.mix.json", "bundle-out": "studio-mixes/m.mix.json"}.get(
                layout, key))
        elif action.startswith("save"):
            items = [MixItem(key if layout not in ("mixes-out", "name-dangling", "bundle-out") else "labs/style", 1.0)]
            studio.save_mix("m", items, fused=False, how=action.split("-")[1])

    def act() -> str:
        if action == "list":  # listing is never refused: an entry leading out of the folder is left out
            listed = key in {e.key for e in studio.entries()}
            return "ok" if listed == (want == "ok") else f"changed: {layout}: {key!r} listed is {listed}"
        try:
            follow()
        except DifftuneError as e:
            if want == "ok":
                return f"changed: a link inside the folder was refused: {str(e)[:200]}"
            raise
        return "ok" if want == "ok" else f"changed: {layout} + {action} was not refused"
    return f"{layout}:{action}", act, None


def g_text(rng: random.Random, studio, root: Path) -> tuple[str, Callable[[], str], None]:
    from apps.studio import Request

    size = rng.choice([2001, 100_000, 10_000_000])
    text = rng.choice(["x", "é", "\x00", "/work/"]) * size
    field = rng.choice(["prompt", "negative", "sampler", "name", "key", "bundle"])

    def act() -> str:
        if field in ("prompt", "negative", "sampler"):
            studio.generate(Request(**{"prompt": "a cat", "steps": 1, field: text}))
        elif field == "name":
            studio.save_mix(text, [], False)
        else:
            studio.load_mix(text + (".mix.json" if field == "bundle" else ""))
        return f"changed: a {size:,}-character {field} was accepted"
    return f"{field}:{size}", act, None


GENERATORS = [("mix", 3), ("links", 4), ("text", 2)]


def make_studio(work: Path):
    """A studio on the tiny SD pipeline with one LoRA (``labs/style``) in its adapters folder (a template)."""
    import difftune as dt
    from apps.studio import Studio
    from difftune.generation import load_pipeline
    from difftune.testing import randomize_adapter, save_tiny_pipeline

    model = save_tiny_pipeline("sd", work / "model")
    pipe = load_pipeline(model)
    dt.inject(pipe, dt.LoRAConfig(rank=2, alpha=2), name="style")
    randomize_adapter(pipe.unet, "style", std=0.3)
    dt.save_adapter(pipe, work / "template" / "labs" / "style", name="style", base_model=str(model))
    return Studio(model, work / "template", out=work / "out")


def run(cases: int, seed: int, timeout: float, root: Path, verbose: bool = False) -> tuple[dict, list[dict]]:
    studio = make_studio(root)
    template = studio.root
    rng = random.Random(seed)
    names, weights = zip(*GENERATORS, strict=True)
    rows = []
    for i in range(cases):
        kind = rng.choices(names, weights)[0]
        case_dir = root / f"case-{i}"
        folder, outside = case_dir / "adapters", case_dir / "outside"
        shutil.copytree(template, folder, symlinks=True)
        outside.mkdir()
        studio.root = folder.resolve()  # the fork sees this folder; the parent's loaded adapters stay valid
        if kind == "mix":
            label, act, cpu = g_mix(rng, studio, folder)
        elif kind == "links":
            label, act, cpu = g_links(rng, studio, folder, outside)
        else:
            label, act, cpu = g_text(rng, studio, folder)
        outcome, detail, seconds = run_forked(guarded(studio, root, outside, act, cpu), timeout)
        row = {"i": i, "kind": kind, "case": label, "outcome": outcome, "s": round(seconds, 3), "detail": detail[:400]}
        rows.append(row)
        if verbose or outcome not in ("ok", "refused"):
            print(json.dumps(row), flush=True)
        shutil.rmtree(case_dir)
    studio.root = template
    summary = summarize(rows)
    summary["by_kind"] = {k: sum(r["kind"] == k for r in rows) for k in names}
    return summary, rows


def cli(argv: list[str] | None = None) -> int:
    return fuzz_cli(run, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(cli())
