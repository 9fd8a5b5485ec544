"""``make gpu-check`` without a GPU, and its measurement functions at tiny sizes on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_make_gpu_check_without_a_gpu_fails_in_one_line():
    # No visible CUDA device (also on a GPU machine); `-o` keeps make from reinstalling.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["make", "-s", "-o", ".venv/.installed", "gpu-check"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    # make adds its own "make: *** [...] Error 1" trailer; the check itself says one line.
    lines = [line for line in (done.stdout + done.stderr).splitlines()
             if line.strip() and not line.startswith("make")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu-check: no CUDA device") and "make gpu-check" in lines[0]


def test_measurement_functions_run_on_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "gpu_check.md"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--compile-backend", "aot_eager",
                           "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert "FAILED" not in text and "skipped" not in text, text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    steps = [r for r in rows if r.startswith(("| Lightning Trainer", "| bare PyTorch loop"))]
    assert len(steps) == 4  # eager and compiled, both loops
    for row in steps:
        assert float(row.split("|")[3]) > 0  # images/s
    assert sum(r.startswith("| search:") for r in rows) == 3
    assert sum(r.startswith("| k-means:") for r in rows) == 3
    # Every search, eager or compiled, agrees with the fp64 assignment on these sizes.
    assert all("1.000000 of assignments" in r for r in rows if r.startswith("| search:"))
