"""The results table of the benchmarks (``bench.common.Report``): failures stay visible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.common import Measurement, Report


def test_a_failed_row_is_reported_and_its_ratios_say_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = Report("t", {}, ceiling="ceiling")
    report.add(Measurement("ceiling", 100, 2.0))
    report.fail("e2e", "RuntimeError: job 3: status failed, 7/16 rows")
    r = report.ratio("e2e/model-only", "e2e", "ceiling", target=">= 0.8")

    assert report.failed == ["e2e"]
    assert r.value is None and r.skipped is not None and "FAILED: RuntimeError" in r.skipped
    report.finish(tmp_path / "out.json")
    out = capsys.readouterr().out
    assert "e2e" in out and "skipped: FAILED: RuntimeError: job 3" in out
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["failed"] == ["e2e"]
    assert data["rows"][0]["rate"] == pytest.approx(50.0)


def test_a_skipped_row_is_not_a_failure() -> None:
    report = Report("t", {})
    report.skip("e2e", "not requested")
    assert report.failed == []
    assert report.to_dict()["failed"] == []
