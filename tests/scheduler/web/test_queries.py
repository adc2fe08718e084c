"""The dashboard's keyset queries on SQLite and PostgreSQL: order, cursors, filters, caps."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind, JobStatus
from scheduler.web import queries
from scheduler.web.queries import PredictionCursor, PredictionFilter


def _job(sessions: sessionmaker[Session], confidences: list[float | None]) -> int:
    with sessions() as s, s.begin():
        job = repository.create_job(s, kind=JobKind.CLASSIFY, params={})
        repository.record_predictions(s, job.id, [
            PredictionRecord(item_index=i, path=f"/d/{i}.png", file_sha256=None,
                             label=None if c is None else ("A" if i % 2 else "B"),
                             confidence=c, top_k=(), error="bad" if c is None else None)
            for i, c in enumerate(confidences)])
        return int(job.id)


def _walk(session: Session, job_id: int, flt: PredictionFilter, limit: int) -> list[int]:
    """Every item index, page by page through the cursors."""
    seen: list[int] = []
    after = None
    while True:
        rows = queries.filtered_predictions(session, job_id, flt, after=after, limit=limit)
        seen += [r.item_index for r in rows]
        if len(rows) < limit:
            return seen
        after = PredictionCursor.decode(queries.cursor_after(rows[-1], flt).encode())


def test_confidence_pages_cover_every_row_once_ties_included(
    session_factory: sessionmaker[Session],
) -> None:
    confs: list[float | None] = [0.5, 0.9, None, 0.5, 0.1, 0.9, 0.5, None, 0.3]
    job_id = _job(session_factory, confs)
    with session_factory() as s:
        desc = _walk(s, job_id, PredictionFilter(sort="confidence_desc"), limit=2)
        assert desc == [1, 5, 0, 3, 6, 8, 4, 2, 7]  # ties by index, error rows last
        asc = _walk(s, job_id, PredictionFilter(sort="confidence_asc"), limit=3)
        assert asc == [2, 7, 4, 8, 0, 3, 6, 1, 5]
        assert _walk(s, job_id, PredictionFilter(), limit=4) == list(range(9))
        band = PredictionFilter(label="A", min_confidence=0.4, sort="confidence_desc")
        assert _walk(s, job_id, band, limit=10) == [1, 5, 3]
        assert queries.count_filtered_predictions(s, job_id, band) == 3
        assert queries.count_filtered_predictions(s, job_id, PredictionFilter(), cap=4) == 5
        errors = PredictionFilter(errors_only=True)
        assert [r.item_index for r in queries.filtered_predictions(s, job_id, errors)] == [2, 7]


def test_jobs_before_and_error_counts(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as s, s.begin():
        ids = [int(repository.create_job(s, kind=JobKind.EVALUATE, params={}).id)
               for _ in range(5)]
        repository.finish_job(s, ids[1], JobStatus.FAILED, error="x")
    classify = _job(session_factory, [0.2, None, None])
    with session_factory() as s:
        page = queries.jobs_before(s, before=ids[3], limit=2)
        assert [j.id for j in page] == [ids[2], ids[1]]
        failed = queries.jobs_before(s, status=JobStatus.FAILED)
        assert [j.id for j in failed] == [ids[1]]
        assert [j.id for j in queries.jobs_before(s, kind=JobKind.CLASSIFY)] == [classify]
        assert queries.error_counts(s, [classify, ids[0]]) == {classify: 2}
        assert queries.error_counts(s, []) == {}
