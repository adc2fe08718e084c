"""``mriq results``: CSV and JSON exports equal the database rows."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind
from tests.scheduler.cli.runner import make_image, make_model, mriq


def _classified_job(env: dict[str, str], root: Path, sessions: sessionmaker[Session]) -> int:
    make_model(sessions, promote=True)
    for i in range(5):
        make_image(root, f"in/{i}, odd \"name\".png")
    job_id = json.loads(mriq(env, "classify", str(root / "in"), "--json").stdout)["id"]
    with sessions() as s, s.begin():
        items = list(repository.iter_job_items(s, job_id))
        records = [
            PredictionRecord(
                item_index=i, path=p, file_sha256="b" * 64, label="Normal",
                confidence=0.75 + i / 100,
                top_k=(("Normal", 0.75 + i / 100), ("Glioblastoma", 0.1)),
            )
            for i, p in items[:4]
        ]
        records.append(PredictionRecord(item_index=items[4][0], path=items[4][1],
                                        file_sha256=None, label=None, confidence=None,
                                        error=f"{items[4][1]}: cannot identify image file"))
        # Out of order on purpose: the export must follow item_index.
        repository.record_predictions(s, job_id, list(reversed(records)))
        first = repository.list_predictions(s, job_id, limit=1)[0]
        state = Path(env["MRIQ_DATA_DIR"])
        repository.set_explanation(
            s, first.id, str(state / "jobs" / str(job_id) / "explanations" / f"{first.id}.png"))
    return job_id


def test_results_csv_equals_database_rows(
    env: dict[str, str], root: Path, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = _classified_job(env, root, sessions)
    result = mriq(env, "results", str(job_id))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    with sessions() as s:
        db_rows = repository.list_predictions(s, job_id)
    assert list(rows[0]) == ["item_index", "path", "label", "confidence", "top_k", "error",
                             "explanation"]
    # The explanation relative to the job folder: never the server's path.
    assert rows[0]["explanation"] == f"explanations/{db_rows[0].id}.png"
    assert [r["explanation"] for r in rows[1:]] == [""] * 4
    assert len(rows) == len(db_rows) == 5
    for got, want in zip(rows, db_rows, strict=True):
        assert int(got["item_index"]) == want.item_index
        assert got["path"] == want.path
        assert (got["label"] or None) == want.label
        assert (float(got["confidence"]) if got["confidence"] else None) == want.confidence
        assert json.loads(got["top_k"]) == [list(p) for p in want.top_k]
        assert (got["error"] or None) == want.error

    as_json = mriq(env, "results", str(job_id), "--format", "json")
    assert as_json.exit_code == 0
    docs = json.loads(as_json.stdout)
    assert [d["item_index"] for d in docs] == [r.item_index for r in db_rows]
    assert docs[4]["error"] and docs[4]["label"] is None
    assert docs[0]["explanation"] == rows[0]["explanation"] and docs[1]["explanation"] is None

    out = tmp_path / "export.csv"
    result = mriq(env, "results", str(job_id), "--out", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    assert out.read_text("utf-8") == mriq(env, "results", str(job_id)).stdout


def test_results_of_a_train_job_is_an_error(
    env: dict[str, str], root: Path, sessions: sessionmaker[Session]
) -> None:
    with sessions() as s, s.begin():
        job_id = int(repository.create_job(s, kind=JobKind.TRAIN, params={}).id)
    result = mriq(env, "results", str(job_id))
    assert result.exit_code == 1 and "only classify jobs" in result.stderr
