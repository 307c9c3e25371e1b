"""The A/B partner model (``--compare``): loading the mix's adapters onto a BK student or a compressed model of
``--model``, as far as it can hold them.

A compressed model (`difftune.compress`) keeps every layer, so adapters load as on ``--model``. A BK student
(`difftune.compress.block_removal`) lost whole blocks and renumbered some of the rest; its folder is a plain
diffusers pipeline that does not record its plan, so the plan is found by building each named plan's student config
from the teacher's and keeping the one whose changes are exactly the student's (`find_plan`). An adapter then loads
through `difftune.methods.bk.transfer_adapter` (keys renamed by the plan, the parts on removed blocks dropped, which
the note names). What the partner cannot hold at all (model-level parts tied to the teacher's block layout, such as
SCEdit's hint encoders; anything else the loader refuses) is left out of B and named; the rest of the mix runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from difftune import loading
from difftune.errors import DifftuneError


def _plain(config: Any) -> dict[str, Any]:
    """A denoiser config as plain JSON values (tuples as lists), without diffusers' private keys."""
    return {k: v for k, v in json.loads(json.dumps(dict(config), default=str)).items() if not k.startswith("_")}


def find_plan(teacher: Any, student: Any) -> str | None:
    """The named BK plan (``base``/``small``/``tiny``) that turns the ``teacher`` denoiser config into the
    ``student``'s; None when the two have one structure (not a student) or no named plan gives the student."""
    from difftune.compress.block_removal import NAMED_PLANS, student_config

    t, s = _plain(teacher), _plain(student)
    keys = set(t) | set(s)
    changed = {k: s.get(k) for k in keys if s.get(k) != t.get(k)}
    if not changed:
        return None
    for name in NAMED_PLANS:
        try:
            built = _plain(student_config(dict(teacher), name))
        except (DifftuneError, KeyError, TypeError, ValueError):  # a plan this teacher cannot take
            continue
        if {k: built.get(k) for k in set(built) | set(t) if built.get(k) != t.get(k)} == changed:
            return name
    return None


def load(pipe: Any, path: Path, key: str, name: str, weight: float, teacher: Any, plan: str | None,
         label: str) -> tuple[bool, str]:
    """Load adapter ``key`` (folder ``path``) as ``name`` onto the partner ``pipe`` (BK ``plan`` from the teacher
    config ``teacher``, or None to load as usual).

    Returns:
        (loaded, note): whether it loaded, and what the partner ``label`` could not hold of it ("" when it holds all).
    """
    try:
        if plan is None:
            loading.load_adapter(pipe, path, name=name, weight=weight)
            return True, ""
        from difftune.methods.bk import transfer_adapter

        got = transfer_adapter(path, loading.component_of(pipe)[1], teacher, plan, name=name, weight=weight)
    except DifftuneError as e:
        return False, f"{key}: {label} cannot hold it ({e}); B runs without it"
    dropped = got["modules_dropped"]
    if not dropped:
        return True, ""
    kept = len(got["modules_kept"])
    return True, (f"{key}: {len(dropped)} of its {len(dropped) + kept} layers lie on blocks {label} removed (BK plan "
                  f"{plan!r}; first: {dropped[0]}); B runs the other {kept}")
