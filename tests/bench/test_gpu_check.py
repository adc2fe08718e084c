"""bench/gpu_check.sh on a host without CUDA: every CUDA row skipped cleanly, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.common import Measurement, Report
from bench.gpu_summary import summarize

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA: the rows would run")
def test_gpu_check_skips_cuda_rows_and_exits_0(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "== mriq GPU check (smoke) =="
    rows = [line for line in lines if line.startswith(("inference", "training", "expl", "pre"))]
    assert len(rows) == 4
    assert all("skipped: no CUDA" in line for line in rows)
    assert len((tmp_path / "rows.tsv").read_text().splitlines()) == 4


def test_summary_is_one_line_of_rows_ratios_and_skips() -> None:
    report = Report(title="t", context={})
    report.add(Measurement("model-only ceiling", 100, 2.0))
    report.add(Measurement("Predictor", 100, 4.0))
    report.ratio("Predictor / ceiling", "Predictor", "model-only ceiling")
    report.skip("e2e", "no PostgreSQL")
    line = summarize(report.to_dict())
    assert line == (
        "model-only ceiling: 50.0 img/s; Predictor: 25.0 img/s; Predictor / ceiling 0.50x; "
        "e2e: skipped (no PostgreSQL)"
    )
