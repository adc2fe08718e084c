"""``python -m bench.runtime --smoke``: both runtimes measured on the same images, ratios out."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.test_bench_smoke import _run


@pytest.mark.slow
def test_runtime_smoke(tmp_path: Path) -> None:
    _, data = _run("bench.runtime", tmp_path)
    rows = {r["name"]: r for r in data["rows"]}  # type: ignore[union-attr]
    for name in ("model-only ceiling (torch eager)", "model-only (onnxruntime)",
                 "Predictor (torch)", "Predictor (onnxruntime)"):
        assert rows[name]["items"] == 16 and rows[name]["rate"] > 0
    ratios = {r["name"]: r for r in data["ratios"]}  # type: ignore[union-attr]
    assert ratios["onnxruntime / torch, model-only"]["value"] > 0
    assert data["failed"] == []
