"""Result export: the CSV layout of predictions and the all-or-nothing export file."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

import pytest

from scheduler.export import (
    PREDICTION_COLUMNS,
    explanation_cell,
    export_to_file,
    prediction_csv_row,
    write_predictions_csv,
)


def _row(index: int, *, error: str | None = None) -> SimpleNamespace:
    if error:
        return SimpleNamespace(item_index=index, path=f"/d/{index}.png", label=None,
                               confidence=None, top_k=None, error=error)
    return SimpleNamespace(item_index=index, path=f"/d/{index}.png", label="Normal",
                           confidence=0.1 + 0.2, top_k=[("Normal", 0.3), ("Glioma", 0.2)],
                           error=None)


def test_csv_rows_round_trip() -> None:
    out = io.StringIO()
    assert write_predictions_csv([_row(0), _row(1, error="cannot decode")], out) == 2
    header, good, bad = list(csv.reader(io.StringIO(out.getvalue())))
    assert tuple(header) == PREDICTION_COLUMNS
    assert float(good[3]) == 0.1 + 0.2  # repr: no precision lost
    assert json.loads(good[4]) == [["Normal", 0.3], ["Glioma", 0.2]]
    assert bad == ["1", "/d/1.png", "", "", "[]", "cannot decode", ""]
    assert prediction_csv_row(_row(2))[:3] == [2, "/d/2.png", "Normal"]


def test_explanation_is_exported_relative_to_the_job_folder() -> None:
    def cell(path: str | None, job_id: int = 12) -> str:
        return explanation_cell(SimpleNamespace(job_id=job_id, explanation=path))

    assert cell("/srv/state/jobs/12/explanations/7.png") == "explanations/7.png"
    # The nearest folder named by the job: a data dir under /12/ does not confuse it.
    assert cell("/12/state/jobs/12/explanations/7.png") == "explanations/7.png"
    assert cell("explanations/7.png") == "explanations/7.png"
    assert cell("/elsewhere/7.png") == "7.png"  # never a server path
    assert cell(None) == cell("") == ""
    assert prediction_csv_row(SimpleNamespace(**vars(_row(0)), job_id=3,
                                              explanation="/s/3/explanations/1.png"))[-1] == (
        "explanations/1.png")


def test_export_file_is_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    assert export_to_file(target, lambda fh: write_predictions_csv([_row(0)], fh)) == 1
    assert target.read_text(encoding="utf-8").startswith("item_index,path")

    def fail_midway(fh: TextIO) -> int:
        fh.write("item_index,path\n")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        export_to_file(target, fail_midway)
    # The earlier export is untouched and no part file is left behind.
    assert target.read_text(encoding="utf-8").startswith("item_index,path,label")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
