"""Smoke runs of the benchmark scripts: they must keep working, their numbers are not checked.

Each script runs once with ``--smoke`` (resnet18 at 64 px, a handful of images, one torch
thread) as a real subprocess, exactly as a person would start it; the test checks the exit
status, that the results table has its ratio lines and that ``--json-out`` wrote valid JSON.
The end-to-end part of ``bench.inference`` (``--e2e``: a real worker on Redis database 11 and
a fresh PostgreSQL database) and ``bench.worker_rss`` (a private redis-server) run here too,
at smoke sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Generous per script; all of them together take under two minutes on a quiet 2-core box.
TIMEOUT_S = 300


def _smoke(module: str, *args: str) -> str:
    """``python -m module --smoke args`` as a person starts it; its stdout (exit 0 asserted)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRIQ_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", module, "--smoke", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{module} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _run(module: str, tmp_path: Path, *extra: str) -> tuple[str, dict[str, object]]:
    out = tmp_path / f"{module}.json"
    stdout = _smoke(module, "--json-out", str(out), "--workdir", str(tmp_path / "work"), *extra)
    data = json.loads(out.read_text())
    assert isinstance(data, dict) and data["ratios"], data
    return stdout, data


def _ratio_value(lines: dict[str, str], name: str) -> float:
    """The number of a rendered ratio ("0.812x  (target ...)" or "3.1%  (target ...)")."""
    text = lines[name].split()[0]
    return float(text.rstrip("x%"))


def _ratio_lines(stdout: str) -> dict[str, str]:
    """``ratio NAME: VALUE`` lines of the table, keyed by NAME."""
    lines: dict[str, str] = {}
    for line in stdout.splitlines():
        if line.startswith("ratio ") and ": " in line:
            name, value = line[len("ratio ") :].split(": ", 1)
            lines[name] = value
    return lines


@pytest.mark.slow
def test_inference_smoke(tmp_path: Path) -> None:
    stdout, data = _run("bench.inference", tmp_path)
    ratios = _ratio_lines(stdout)
    for name in (
        "predictor/model-only",
        "core.predict/model-only",
        "predictor/notebook",
        "allocator (tuned/glibc default)",
        "BatchNorm folding (ceiling/unfolded)",
    ):
        assert name in ratios and ratios[name].endswith(("x", ")")), (name, stdout)
        assert not ratios[name].startswith("skipped"), (name, ratios[name])
    # e2e is not part of a smoke run, but its ratios are always reported (as skipped).
    assert ratios["e2e/model-only"].startswith("skipped")
    assert ratios["e2e/notebook"].startswith("skipped")
    names = {row["name"] for row in data["rows"]}  # type: ignore[attr-defined]
    assert {"model-only ceiling", "core Predictor (in-process, bs 32)"} <= names
    # the notebook runs twice: as a notebook runs (glibc allocator, child) and tuned
    notebooks = {n for n in names if n.startswith("notebook way")}
    assert len(notebooks) == 2, names


@pytest.mark.slow
@pytest.mark.services
def test_inference_e2e_smoke(tmp_path: Path) -> None:
    """``--e2e`` through a real worker: the path the issue's main target is measured on."""
    stdout, data = _run(
        "bench.inference", tmp_path, "--e2e", "--skip", "allocator,notebook,core.predict"
    )
    ratios = _ratio_lines(stdout)
    for name in ("e2e/model-only", "queue+SQL overhead (share of e2e wall)"):
        assert not ratios[name].startswith("skipped"), (name, ratios[name], stdout)
    assert _ratio_value(ratios, "e2e/model-only") > 0
    rows = {row["name"]: row for row in data["rows"]}  # type: ignore[attr-defined]
    e2e = rows["mriq classify e2e (submit -> last row)"]
    assert e2e["items"] == 16 and e2e["seconds"] > 0, e2e
    assert "chunk 8" in e2e["note"], e2e
    assert data["failed"] == []
    # The profile of where the job's wall time went: 16 images in chunks of 8.
    assert any(n.startswith("e2e timeline:") and "2 chunks" in n for n in data["notes"]), data[
        "notes"
    ]


@pytest.mark.slow
@pytest.mark.services
def test_worker_rss_smoke() -> None:
    stdout = _smoke("bench.worker_rss")
    assert "48 images, 3 chunks" in stdout, stdout
    assert "start (first chunk done" in stdout, stdout
    assert "succeeded" in stdout and "RSS start" in stdout, stdout


@pytest.mark.slow
@pytest.mark.services
def test_sql_insert_smoke(tmp_path: Path) -> None:
    stdout, _ = _run("bench.sql_insert", tmp_path)
    ratios = _ratio_lines(stdout)
    inserts = [v for k, v in ratios.items() if k.startswith("record_predictions/executemany")]
    assert inserts and not any(v.startswith("skipped") for v in inserts), stdout
    submits = [v for k, v in ratios.items() if k.startswith("submit ")]
    assert submits and not any(v.startswith("skipped") for v in submits), stdout


@pytest.mark.slow
def test_training_smoke(tmp_path: Path) -> None:
    stdout, _ = _run("bench.training", tmp_path)
    ratios = _ratio_lines(stdout)
    assert "mriq epoch time / plain loop epoch time" in ratios, stdout
    assert ratios["mriq epoch time / plain loop epoch time"].endswith("(target <= 1.1)")


@pytest.mark.slow
def test_explanation_smoke(tmp_path: Path) -> None:
    stdout, data = _run("bench.explanation", tmp_path)
    ratios = _ratio_lines(stdout)
    name = "resnet18@64 explain/classify time per image"
    assert name in ratios and ratios[name].endswith("(target <= 3x)"), stdout
    assert _ratio_value(ratios, name) > 0
    assert data["failed"] == []
    notes: list[str] = data["notes"]  # type: ignore[assignment]
    assert "resnet18@64: labels agree on 16/16 images" in notes, notes


@pytest.mark.slow
def test_preprocess_quick(tmp_path: Path) -> None:
    stdout, data = _run("bench.preprocess", tmp_path, "--decode-workers", "1,2")
    stages: dict[str, float] = data["ms_per_image"]  # type: ignore[assignment]
    for name in ("decode (full size)", "crop before (numpy)", "crop after (OpenCV)",
                 "resize+normalise", "total before"):
        assert stages[name] > 0, stages
    assert set(data["decode_crop_images_per_s"]) == {"1", "2"}  # type: ignore[arg-type]
    assert "decode + crop throughput" in stdout and "CPU flags" in stdout


@pytest.mark.slow
def test_expansion_smoke(tmp_path: Path) -> None:
    stdout, data = _run("bench.expansion", tmp_path)
    ratios = _ratio_lines(stdout)
    assert "flat RSS growth (mriq/old)" in ratios and "flat seconds (mriq/old)" in ratios
    # The limit refuses the glob in both variants; mriq never walks the loops for ever.
    assert data["flat/mriq"]["refused"] and data["flat/old"]["refused"]  # type: ignore[index]
    assert not data["loops/mriq"].get("timed_out")  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.services
def test_api_load_smoke(tmp_path: Path) -> None:
    """3 locust clients for 10 s against a real ``mriq api`` with a worker: every request
    and job accounted for (the full run is 50 clients for 5 minutes)."""
    stdout, data = _run("bench.api_load", tmp_path)
    ratios = _ratio_lines(stdout)
    for name in ("reads p99 / 500 ms", "server errors (5xx) / requests",
                 "jobs lost / accepted", "pool-exhausted 503s / requests"):
        assert name in ratios and not ratios[name].startswith("skipped"), (name, stdout)
    assert _ratio_value(ratios, "server errors (5xx) / requests") == 0
    assert _ratio_value(ratios, "jobs lost / accepted") == 0
    rows = {row["name"]: row for row in data["rows"]}  # type: ignore[attr-defined]
    assert rows["POST /jobs/classify"]["items"] > 0, rows
    assert data["failed"] == []
    notes: list[str] = data["notes"]  # type: ignore[assignment]
    assert any(n.startswith("jobs: ") and " 0 lost" in n for n in notes), notes


@pytest.mark.slow
@pytest.mark.services
def test_web_render_smoke(tmp_path: Path) -> None:
    """The dashboard's render bench at quick size on SQLite and PostgreSQL: every page
    renders (the bench raises on a non-200) and both backends report their worst p95."""
    out = tmp_path / "web_render.json"
    stdout = _smoke("bench.web_render", "--json-out", str(out), "--workdir", str(tmp_path / "w"))
    data = json.loads(out.read_text())
    assert set(data["pages"]) == {"sqlite", "postgresql"}, stdout
    for backend in ("sqlite", "postgresql"):
        assert len(data["pages"][backend]) == 7, data
        assert data["ratios"][f"{backend} worst p95 / 300 ms"] is not None, stdout
