"""scheduler.review: the queue rule and order, decisions and their history, the export, the
0004 migration — on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from scheduler import review
from scheduler.database import alembic_config, make_engine, make_session_factory, upgrade
from scheduler.repository import NotFoundError
from scheduler.review_export import ExportError
from scheduler.schema import ReviewDecision, ReviewStatus
from tests.factories import make_image
from tests.scheduler.reviewdata import (
    CLASSES,
    Pred,
    add_classify_job,
    standard_preds,
    write,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def sqlite_session(sqlite_url: str) -> Iterator[Session]:
    """The export reads files, not SQL: one database is enough."""
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _paths(items: list[review.ReviewItem]) -> list[str]:
    return [Path(i.path).name for i in items]


def test_queue_holds_unsure_and_flagged_predictions_most_uncertain_first(
    session: Session,
) -> None:
    job_id, ids = add_classify_job(session, standard_preds())
    items = review.queue(session, job_id=job_id)
    # a.png is sure (0.95 >= 0.6), e.png an error row; f.png has no stored entropy and is
    # ranked by its estimate (0.45, 0.35 and 0.2 spread over the third class).
    assert _paths(items) == ["f.png", "c.png", "b.png", "d.png"]
    assert items[0].entropy == pytest.approx(review.estimated_entropy(
        [("Normal", 0.45), ("Glioblastoma", 0.35)], len(CLASSES)))
    assert all(i.status is ReviewStatus.PENDING for i in items)
    assert items[1].top_k == (("Meningioma", 0.4),) and items[1].confidence == 0.4
    with write(session):
        review.flag(session, ids[0], reviewer="ann")
    assert "a.png" in _paths(review.queue(session, job_id=job_id))
    assert review.next_item(session, job_id=job_id) == review.queue(session, limit=1)[0]
    with pytest.raises(review.NotReviewableError, match="error row"), write(session):
        review.flag(session, ids[4], reviewer="ann")


def test_threshold_is_per_job(session: Session) -> None:
    strict, _ = add_classify_job(session, standard_preds("/s"), review_below=0.99)
    lax, _ = add_classify_job(session, standard_preds("/l"), review_below=0.42)
    assert len(review.queue(session, job_id=strict)) == 5
    assert _paths(review.queue(session, job_id=lax)) == ["c.png"]
    assert len(review.queue(session)) == 6


def test_pages_are_exact_across_stored_and_estimated_entropies(session: Session) -> None:
    preds = [Pred(f"/p/{i:02d}.png", "Normal", 0.3, (("Normal", 0.3 + i / 100),),
                  None if i % 3 == 0 else 1.0 - i / 50) for i in range(12)]
    preds += [Pred("/p/tie1.png", "Normal", 0.3, (), 0.7), Pred("/p/tie2.png", "Normal", 0.3,
                                                                    (), 0.7)]
    job_id, _ = add_classify_job(session, preds)
    everything = review.queue(session, job_id=job_id, limit=100)
    keys = [(-i.entropy, i.item_id) for i in everything]
    assert keys == sorted(keys) and len(everything) == 14
    paged: list[review.ReviewItem] = []
    after = None
    while True:
        page = review.queue(session, job_id=job_id, limit=3, after=after)
        if not page:
            break
        paged += page
        after = page[-1].cursor
    assert paged == everything
    with pytest.raises(review.ReviewError, match="cursor"):
        review.queue(session, after="nonsense")


def test_decisions_validate_labels_supersede_and_keep_history(session: Session) -> None:
    job_id, ids = add_classify_job(session, standard_preds())
    with write(session):
        first = review.decide(session, ids[1], status="accepted", reviewer="ann", now=T0)
    assert first.label == "Glioblastoma" and first.decided_at == T0
    with pytest.raises(review.InvalidLabelError) as info, write(session):
        review.decide(session, ids[1], status="corrected", label="Glioma", reviewer="bob")
    assert "Glioblastoma, Meningioma, Normal" in str(info.value)
    with pytest.raises(review.InvalidLabelError), write(session):
        review.decide(session, ids[1], status="corrected", reviewer="bob")
    with write(session):
        review.decide(session, ids[1], status="corrected", label="Meningioma", reviewer="bob")
    history = review.history(session, ids[1])
    assert [(d.decision, d.label, d.reviewer, d.superseded) for d in history] == [
        (ReviewStatus.ACCEPTED, "Glioblastoma", "ann", True),
        (ReviewStatus.CORRECTED, "Meningioma", "bob", False),
    ]
    item = review.get_item(session, ids[1])
    assert item.status is ReviewStatus.CORRECTED and item.reviewed_label == "Meningioma"
    assert "b.png" not in _paths(review.queue(session, job_id=job_id))
    assert _paths(review.queue(session, status="corrected")) == ["b.png"]
    assert _paths(review.queue(session, status=None, job_id=job_id)) == [
        "f.png", "c.png", "b.png", "d.png"]
    with pytest.raises(review.NotReviewableError), write(session):
        review.decide(session, ids[4], status="accepted", reviewer="ann")
    with pytest.raises(NotFoundError, match="review item 999999 not found"), write(session):
        review.decide(session, 999999, status="accepted", reviewer="ann")
    with pytest.raises(NotFoundError):
        review.history(session, 999999)
    with pytest.raises(review.ReviewError, match="correct"), write(session):
        review.decide(session, ids[2], status="accepted", label="Normal", reviewer="ann")


def test_database_allows_one_current_decision(session: Session) -> None:
    _, ids = add_classify_job(session, standard_preds())
    with write(session):
        review.decide(session, ids[1], status="accepted", reviewer="ann")
    with pytest.raises(IntegrityError), write(session):
        session.add(ReviewDecision(prediction_id=ids[1], job_id=1, decision="accepted",
                                   label="Normal", reviewer="x", superseded=False))


def test_reviewed_items_and_lineage(session: Session) -> None:
    job_id, ids = add_classify_job(session, standard_preds())
    other, other_ids = add_classify_job(session, standard_preds("/o"))
    with write(session):
        review.decide(session, ids[2], status="accepted", reviewer="ann")
        review.decide(session, ids[3], status="accepted", reviewer="ann")
        review.decide(session, ids[3], status="corrected", label="Meningioma", reviewer="bob")
        review.decide(session, other_ids[1], status="accepted", reviewer="cy")
    items = review.reviewed_items(session, job_id=job_id)
    assert [(Path(i.path).name, i.label, i.reviewer) for i in items] == [
        ("c.png", "Meningioma", "ann"), ("d.png", "Meningioma", "bob")]
    everything = review.reviewed_items(session)
    count, review_ids = review.review_lineage(everything)
    assert count == 3 and review_ids == sorted(i.review_id for i in everything)
    assert review.review_lineage([]) == (0, [])


def test_check_review_below() -> None:
    assert review.check_review_below(0.6) == 0.6
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(review.ReviewError, match="between 0 and 1"):
            review.check_review_below(bad)


def test_export_folder_names() -> None:
    assert review.export_folder_name("Glioblastoma T1C+", "/x/y.png") == "Glioblastoma T1C+"
    assert review.export_folder_name("Meningioma", "/d/Glioblastoma T2/1.png") == "Meningioma T2"
    assert review.export_folder_name("Meningioma", "/d/misc/1.png") == "Meningioma"
    assert review.export_folder_name("Normal", "/d/Glioma T1C+/1.png") == "Normal"
    assert review.export_folder_name("Banana", "/d/1.png") is None


def test_export_is_read_by_scan_folder_and_idempotent(
    sqlite_session: Session, tmp_path: Path
) -> None:
    session = sqlite_session
    from core.dataset import scan_folder
    from core.labels import classes_for

    root = tmp_path / "root"
    sources = [make_image(root / "Glioblastoma T2" / f"{n}.png", size=16, seed=i)
               for i, n in enumerate("abcd")]
    preds = [Pred(str(p), "Glioblastoma", 0.4, (), 0.9) for p in sources]
    preds.append(Pred(str(tmp_path / "outside.png"), "Normal", 0.4, (), 0.9))
    make_image(tmp_path / "outside.png", size=16)
    job_id, ids = add_classify_job(session, preds)
    with write(session):
        review.decide(session, ids[0], status="accepted", reviewer="ann", now=T0)
        review.decide(session, ids[1], status="corrected", label="Normal", reviewer="bob")
        review.decide(session, ids[2], status="corrected", label="Meningioma", reviewer="bob")
        review.decide(session, ids[4], status="accepted", reviewer="ann")
    items = review.reviewed_items(session, job_id=job_id)
    out = tmp_path / "export"
    summary = review.export_dataset(items, out, roots=[root])
    assert summary.written == 3
    assert summary.skipped == ((str(tmp_path / "outside.png"),
                                summary.skipped[0][1]),)
    assert "outside" in summary.skipped[0][1]
    samples = scan_folder(out, mode="15")
    classes = classes_for("15")
    got = sorted((s.path.name, classes[s.label]) for s in samples)
    assert got == [(f"{ids[0]}-a.png", "Glioblastoma"), (f"{ids[1]}-b.png", "Normal"),
                   (f"{ids[2]}-c.png", "Meningioma")]
    assert {s.folder for s in samples} == {"Glioblastoma T2", "Normal T2", "Meningioma T2"}
    assert len(scan_folder(out, mode="44")) == 3  # the source folder's sequence was kept
    assert all(s.path.is_symlink() for s in samples)
    with summary.manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "label", "reviewer", "decided_at", "source_job"]
    assert rows[0] == {"path": f"Glioblastoma T2/{ids[0]}-a.png", "label": "Glioblastoma",
                       "reviewer": "ann", "decided_at": T0.isoformat(),
                       "source_job": str(job_id)}
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    again = review.export_dataset(items, out, roots=[root], copy=True)
    assert again.written == 3
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert not any(p.is_symlink() for p in out.rglob("*.png"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not an earlier review export"):
        review.export_dataset(items, mine, roots=[root])
    assert (mine / "keep.txt").read_text() == "user data"


def test_export_with_base_adds_reviews_to_the_training_split(
    sqlite_session: Session, tmp_path: Path
) -> None:
    session = sqlite_session
    from core.dataset import load_splits

    root = tmp_path / "root"
    for split in ("train", "val", "test"):
        for folder in ("Normal T1", "Meningioma T1"):
            for i in range(2):
                make_image(root / "base" / split / folder / f"{i}.png", size=16, seed=i)
    src = make_image(root / "new" / "x.png", size=16)
    _, ids = add_classify_job(session, [Pred(str(src), "Normal", 0.3, (), 0.9)])
    with write(session):
        review.decide(session, ids[0], status="corrected", label="Meningioma", reviewer="ann")
    summary = review.export_dataset(review.reviewed_items(session), tmp_path / "merged",
                                    roots=[root], base=root / "base")
    assert summary.base_files == 12 and summary.written == 1
    splits = load_splits(tmp_path / "merged", mode="15", seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 4, 4)
    assert (tmp_path / "merged" / "train" / "Meningioma" / f"{ids[0]}-x.png").is_symlink()


def test_review_revision_upgrades_and_downgrades(db_url: str) -> None:
    cfg = alembic_config(db_url)
    command.upgrade(cfg, "0003")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (kind, status, params, progress_done, progress_total, "
                "cancel_requested, created_at) VALUES ('classify', 'queued', '{}', 0, 0, "
                ":f, :now)"), {"f": False, "now": T0})
        command.upgrade(cfg, "0004")
        inspector = inspect(engine)
        assert "review_decisions" in inspector.get_table_names()
        assert {"entropy", "explanation", "flagged"} <= {
            c["name"] for c in inspector.get_columns("predictions")}
        assert {"review_ids", "reviews_used"} <= {
            c["name"] for c in inspector.get_columns("model_versions")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT review_below FROM jobs")).scalar_one() == 0.6
        command.downgrade(cfg, "0003")
        engine.dispose()
        inspector = inspect(engine)
        assert "review_decisions" not in inspector.get_table_names()
        assert "flagged" not in {c["name"] for c in inspector.get_columns("predictions")}
        assert "review_below" not in {c["name"] for c in inspector.get_columns("jobs")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 1
    finally:
        engine.dispose()


def test_training_set_and_lineage(sqlite_session: Session, tmp_path: Path) -> None:
    from core.dataset import scan_folder

    session = sqlite_session
    root = tmp_path / "root"
    for folder in ("Normal T1", "Meningioma T1"):
        for i in range(2):
            make_image(root / "data" / folder / f"{i}.png", size=16, seed=i)
    sources = [make_image(root / "new" / f"{n}.png", size=16) for n in "xyz"]
    job_a, ids_a = add_classify_job(session, [Pred(str(p), "Normal", 0.3, (), 0.9)
                                              for p in sources[:2]])
    _, ids_b = add_classify_job(session, [Pred(str(sources[2]), "Normal", 0.3, (), 0.9),
                                          Pred(str(root / "gone.png"), "Normal", 0.3, (), 0.9)])
    with write(session):
        for item in (*ids_a, *ids_b):
            review.decide(session, item, status="accepted", reviewer="ann")
    only_a = review.training_set(session, data_dir=root / "data", out_dir=tmp_path / "ta",
                                 roots=[root], reviews_from=job_a)
    assert only_a.reviews_used == 2 and len(scan_folder(only_a.data_dir, mode="15")) == 6
    every = review.training_set(session, data_dir=root / "data", out_dir=tmp_path / "tb",
                                roots=[root])
    # gone.png was reviewed but is missing: not exported, so not in the lineage.
    assert every.reviews_used == 3 and len(every.export.skipped) == 1
    with write(session):
        version_id = session.execute(text("SELECT max(id) FROM model_versions")).scalar_one()
        version = review.record_lineage(session, version_id, review_ids=every.review_ids)
    assert review.lineage(version) == {"reviews_used": 3, "review_ids": list(every.review_ids)}
    with pytest.raises(NotFoundError), write(session):
        review.record_lineage(session, 10_000, review_ids=[1])


def test_concurrent_decisions_take_turns_on_postgresql(postgres_url: str) -> None:
    """Two reviewers decide on one item at once: the second waits for the first's commit and
    supersedes it (no unique-index violation, one current decision, both in the history)."""
    import threading

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    try:
        with factory() as s:
            _, ids = add_classify_job(s, standard_preds())
        first = factory()
        first.begin()
        review.decide(first, ids[1], status="accepted", reviewer="ann")  # holds the row lock
        errors: list[BaseException] = []

        def second() -> None:
            try:
                with factory() as s, s.begin():
                    review.decide(s, ids[1], status="corrected", label="Normal", reviewer="bob")
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting for ann's transaction
        first.commit()
        first.close()
        thread.join(30)
        assert errors == []
        with factory() as s:
            history = review.history(s, ids[1])
        assert [(d.reviewer, d.superseded) for d in history] == [("ann", True), ("bob", False)]
    finally:
        engine.dispose()
