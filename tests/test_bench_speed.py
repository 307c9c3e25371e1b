"""The speed benchmarks of issue 27 keep running: bench/inference_overhead.py gives every registered adapter method a
row (timed, with an output it changed, or skipped with the reason), and bench/gpu_check.py's training step (its CPU
subset) trains with a finite loss and gives the base weights back exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import gpu_check  # noqa: E402
import inference_overhead  # noqa: E402

from difftune.methods import METHODS  # noqa: E402


def test_inference_overhead_has_a_row_for_every_registered_method():
    rows = inference_overhead.run(["sd15"], rounds=1, threads=1, quick=True, out=None)["sd15"]
    labels = [r["variant"] for r in rows]
    settings = inference_overhead.settings("sd15", True, 16)
    adapters = [m for m, cls in METHODS.items() if cls.is_adapter]
    for method in adapters:
        label = settings[method][0] if method in settings else f"{method} (config defaults)"
        assert label in labels, f"no row for {method}"
    assert {"bare model", "peft LoRA r=4 (unmerged)", "8 LoRAs r=4 at once", "fused LoRA r=4"} <= set(labels)
    for row in rows[1:]:
        assert row.get("skipped") or row["max_output_change"] > 0, row  # an adapter that did nothing is not timed
        assert row.get("skipped") or len(row["seconds"]) == 1


def test_gpu_check_cpu_step_trains_and_restores_the_base():
    device, dtype = torch.device("cpu"), torch.bfloat16
    unet = gpu_check.build_unet("sd15", device, dtype)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    for method in ("sara", "lora"):
        row = gpu_check.train(unet, "sd15", method, dtype, "sdpa", 2, device)
        assert row["ok"] and row["trainable"] > 0, row
    assert all(torch.equal(before[n], p) for n, p in unet.named_parameters())


def test_inference_overhead_rows_times_only_the_named_rows(monkeypatch, capsys):
    rows = inference_overhead.run(["dit-xl2"], rounds=1, threads=1, quick=True, out=None,
                                  only=["loha", "fused-lora"])["dit-xl2"]
    assert [r["variant"] for r in rows] == ["bare model", "loha (config defaults)", "fused LoRA r=4"]
    assert all(len(r["seconds"]) == 1 for r in rows)
    monkeypatch.setattr(sys, "argv", ["inference_overhead.py", "--quick", "--rows", "loha", "lohaa"])
    with pytest.raises(SystemExit) as exit_info:  # argparse's error: status 2, the bad name and the known ones
        inference_overhead.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown --rows ['lohaa']" in err and "fused-lora" in err
