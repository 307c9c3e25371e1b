"""The contract every registered adapter method honours (the checks live in contract.py), on each model its case
names: nn.Linear, nn.Conv2d, a strided/dilated Conv2d, the tiny UNet and the tiny DiT, or its own.

A method joins by registering and adding a `contract.Case` to `contract.CASES` (a test fails until it does).
"""

from __future__ import annotations

import pytest
from contract import CASES, CHECKS, adapter_methods, kinds, method_of, run_check

from difftune.methods import METHODS

PARAMS = [pytest.param(m, k, id=f"{m}-{k}") for m in sorted(CASES) for k in kinds(m)]


def test_every_method_has_a_case():
    assert set(adapter_methods()) <= {method_of(c) for c in CASES if kinds(c)}, \
        "add a contract.CASES entry for each registered adapter method"
    assert {m for m in METHODS} == {c for c in CASES if CASES[c].smoke}, \
        "every registered method's case says how the trainer runs it (`contract.Smoke`)"


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize(("method", "kind"), PARAMS)
def test_contract(check, method, kind, tmp_path):
    run_check(check, method, kind, tmp_path)
