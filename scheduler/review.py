"""The review queue: which predictions a person should look at, and what they decided.

The one home of the rule "what is in the review queue" (the API, the CLI and the dashboard
all call :func:`queue`): an error-free prediction of a classify job is *in the queue* when
its calibrated confidence is below the job's ``review_below`` (default 0.6) or a user
flagged it; it is *pending* while it has no current decision. The queue is ordered by
uncertainty, the entropy of the calibrated probabilities, most uncertain first (ties: lower
item id first). Rows recorded before the entropy was stored get an estimate from their
top-k (:func:`estimated_entropy`).

Decisions (accept the predicted label, or correct it to another class of the model) are
never overwritten: a new decision supersedes the current one and both stay in the history
(:func:`history`). :func:`reviewed_items` gives the current decision per item, the labels a
retrained model learns from; :func:`review_lineage` what that model records about them, and
:mod:`scheduler.review_export` writes them as a dataset ``core.train`` reads.

Functions take a ``Session`` first and never commit (callers own ``session.begin()``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Select, and_, false, or_, select, true, update
from sqlalchemy.orm import Session

from core.calibration import entropy
from core.labels import classes_for
from scheduler.repository import NotFoundError
from scheduler.review_export import (
    ExportSummary,
    ReviewedItem,
    export_dataset,
    export_folder_name,
)
from scheduler.schema import (
    REVIEW_BELOW_DEFAULT,
    Artifact,
    Job,
    ModelVersion,
    PredictionRow,
    ReviewDecision,
    ReviewStatus,
    utcnow,
)

__all__ = [
    "DEFAULT_LIMIT",
    "ITEM_KIND",
    "REVIEW_BELOW_DEFAULT",
    "ExportSummary",
    "InvalidLabelError",
    "TrainingSet",
    "MAX_LIMIT",
    "NotReviewableError",
    "ReviewError",
    "ReviewItem",
    "ReviewedItem",
    "check_review_below",
    "decide",
    "decode_cursor",
    "encode_cursor",
    "estimated_entropy",
    "explanation_artifacts",
    "export_dataset",
    "export_folder_name",
    "flag",
    "get_item",
    "history",
    "lineage",
    "model_classes",
    "next_item",
    "queue",
    "record_lineage",
    "review_lineage",
    "reviewed_items",
    "training_set",
]

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
#: The kind named in NotFoundError for an unknown item ("review item 7 not found").
ITEM_KIND = "review item"


class ReviewError(ValueError):
    """A review request that cannot be carried out; ``str()`` says why."""


class NotReviewableError(ReviewError):
    """The item is a per-file error row (nothing was predicted, so nothing to review)."""

    def __init__(self, item_id: int, error: str | None) -> None:
        self.item_id = item_id
        super().__init__(
            f"review item {item_id} is an error row ({error or 'no prediction'}): "
            "only predictions can be reviewed"
        )


class InvalidLabelError(ReviewError):
    """A corrected label that is not one of the model's classes; lists the valid ones."""

    def __init__(self, label: str | None, classes: Sequence[str]) -> None:
        self.label = label
        self.classes = tuple(classes)
        given = "no label given" if label is None else f"{label!r} is not a class of the model"
        super().__init__(f"{given}; valid labels: {', '.join(self.classes)}")


# The domain record; api_models.ReviewItemOut is its wire form (see the note there).
@dataclass(frozen=True)
class ReviewItem:
    """A prediction as the review queue shows it, with its current decision if any."""

    item_id: int
    job_id: int
    item_index: int
    path: str
    label: str
    confidence: float | None
    top_k: tuple[tuple[str, float], ...]
    explanation: str | None
    status: ReviewStatus
    entropy: float
    flagged: bool
    reviewed_label: str | None
    reviewer: str | None
    decided_at: datetime | None
    review_id: int | None

    @property
    def cursor(self) -> str:
        """The position after this item, for :func:`queue`'s ``after``."""
        return encode_cursor(self.entropy, self.item_id)




# --------------------------------------------------------------------------- rules


def check_review_below(value: float) -> float:
    """A classify job's ``review_below``: a probability in [0, 1] (0 queues only flags)."""
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ReviewError(f"review_below must be between 0 and 1, not {value!r}")
    return float(value)


def estimated_entropy(top_k: Iterable[Sequence[Any]], n_classes: int) -> float:
    """The entropy of a prediction known only by its top-k: the mass the top-k leave is
    spread evenly over the other classes (the most uncertain completion, so an old row is
    never ranked as surer than it may have been)."""
    probs = [max(0.0, float(pair[1])) for pair in top_k]
    rest = max(0.0, 1.0 - sum(probs))
    others = n_classes - len(probs)
    if others > 0 and rest > 0.0:
        probs.extend([rest / others] * others)
    return entropy(probs)


def encode_cursor(key: float, item_id: int) -> str:
    # float.hex round-trips exactly, so the next page starts precisely after this item.
    return f"{float(key).hex()}_{int(item_id)}"


def decode_cursor(cursor: str) -> tuple[float, int]:
    try:
        key, _, item = cursor.partition("_")
        return float.fromhex(key), int(item)
    except (ValueError, OverflowError):
        raise ReviewError(f"invalid cursor {cursor!r}") from None


# --------------------------------------------------------------------------- queries


_CURRENT = and_(
    ReviewDecision.prediction_id == PredictionRow.id, ReviewDecision.superseded == false()
)
_IN_QUEUE = and_(
    PredictionRow.error.is_(None),
    PredictionRow.label.is_not(None),
    or_(PredictionRow.flagged == true(), PredictionRow.confidence < Job.review_below),
)


_Selection = Select[PredictionRow, ReviewDecision, int | None]


def _selection(job_id: int | None, status: ReviewStatus | None) -> _Selection:
    stmt = (
        select(PredictionRow, ReviewDecision, Job.model_version_id)
        .join(Job, Job.id == PredictionRow.job_id)
        .outerjoin(ReviewDecision, _CURRENT)
    )
    if job_id is not None:
        stmt = stmt.where(PredictionRow.job_id == job_id)
    if status is None:
        return stmt.where(or_(_IN_QUEUE, ReviewDecision.id.is_not(None)))
    if ReviewStatus(status) is ReviewStatus.PENDING:
        return stmt.where(_IN_QUEUE, ReviewDecision.id.is_(None))
    return stmt.where(ReviewDecision.decision == ReviewStatus(status))


def _item(row: PredictionRow, decision: ReviewDecision | None, key: float) -> ReviewItem:
    return ReviewItem(
        item_id=int(row.id), job_id=row.job_id, item_index=row.item_index, path=row.path,
        label=row.label or "", confidence=row.confidence,
        top_k=tuple((str(p[0]), float(p[1])) for p in (row.top_k or [])),
        explanation=row.explanation,
        status=ReviewStatus.PENDING if decision is None else ReviewStatus(decision.decision),
        entropy=key, flagged=bool(row.flagged),
        reviewed_label=None if decision is None else decision.label,
        reviewer=None if decision is None else decision.reviewer,
        decided_at=None if decision is None else decision.decided_at,
        review_id=None if decision is None else decision.id,
    )


def _class_counts(session: Session, version_ids: set[int | None]) -> dict[int | None, int]:
    counts: dict[int | None, int] = {None: len(classes_for("15"))}
    ids = {v for v in version_ids if v is not None}
    if ids:
        for vid, classes, mode in session.execute(
            select(ModelVersion.id, ModelVersion.classes, ModelVersion.label_mode)
            .where(ModelVersion.id.in_(ids))
        ):
            counts[vid] = len(classes) if classes else len(classes_for(mode))
    return counts


def queue(
    session: Session,
    *,
    job_id: int | None = None,
    status: ReviewStatus | str | None = ReviewStatus.PENDING,
    limit: int = DEFAULT_LIMIT,
    after: str | None = None,
) -> list[ReviewItem]:
    """One page of the review queue, most uncertain first; ``after`` is the ``cursor`` of
    the last item of the previous page. ``status`` None lists pending and decided items.

    Rows with a stored entropy are ordered and paged in SQL; rows without (recorded before
    the column existed, a bounded and shrinking set) are estimated in Python and merged in,
    so paging stays exact across both.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise ReviewError(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
    wanted = None if status is None else ReviewStatus(status)
    base = _selection(job_id, wanted)
    cut = decode_cursor(after) if after is not None else None

    stored = base.where(PredictionRow.entropy.is_not(None))
    if cut is not None:
        stored = stored.where(or_(
            PredictionRow.entropy < cut[0],
            and_(PredictionRow.entropy == cut[0], PredictionRow.id > cut[1]),
        ))
    stored = stored.order_by(PredictionRow.entropy.desc(), PredictionRow.id).limit(limit)
    page = [(r.entropy, r, d) for r, d, _ in session.execute(stored) if r.entropy is not None]

    legacy = session.execute(base.where(PredictionRow.entropy.is_(None))).all()
    if legacy:
        counts = _class_counts(session, {vid for _, _, vid in legacy})
        for row, decision, vid in legacy:
            key = estimated_entropy(row.top_k or [], counts.get(vid, counts[None]))
            if cut is None or (-key, int(row.id)) > (-cut[0], cut[1]):
                page.append((key, row, decision))
    page.sort(key=lambda entry: (-entry[0], int(entry[1].id)))
    return [_item(row, decision, key) for key, row, decision in page[:limit]]


def next_item(session: Session, *, job_id: int | None = None) -> ReviewItem | None:
    """The most uncertain pending item, or None when the queue is empty."""
    items = queue(session, job_id=job_id, status=ReviewStatus.PENDING, limit=1)
    return items[0] if items else None


def get_item(session: Session, item_id: int) -> ReviewItem:
    """One item (whether or not it is in the queue) with its current decision."""
    found = session.execute(
        select(PredictionRow, ReviewDecision, Job.model_version_id)
        .join(Job, Job.id == PredictionRow.job_id)
        .outerjoin(ReviewDecision, _CURRENT)
        .where(PredictionRow.id == item_id)
    ).first()
    if found is None:
        raise NotFoundError(ITEM_KIND, item_id)
    row, decision, vid = found
    key = row.entropy
    if key is None:
        key = estimated_entropy(row.top_k or [], _class_counts(session, {vid})[vid])
    return _item(row, decision, float(key))


def _reviewable(session: Session, item_id: int) -> PredictionRow:
    # FOR UPDATE: two reviewers deciding at once on PostgreSQL take turns, so the second
    # supersedes the first instead of breaking the one-current-decision index.
    row = session.get(PredictionRow, item_id, with_for_update=True)
    if row is None:
        raise NotFoundError(ITEM_KIND, item_id)
    if row.error is not None or row.label is None:
        raise NotReviewableError(item_id, row.error)
    return row


def model_classes(session: Session, job_id: int) -> tuple[str, ...]:
    """The class names of the model a classify job used (its labels are the valid ones)."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFoundError("job", job_id)
    version = session.get(ModelVersion, job.model_version_id) if job.model_version_id else None
    if version is None:
        raise ReviewError(f"job {job_id} has no model version: its classes are unknown")
    return tuple(version.classes or classes_for(version.label_mode))


def decide(
    session: Session,
    item_id: int,
    *,
    status: ReviewStatus | str,
    label: str | None = None,
    reviewer: str,
    now: datetime | None = None,
) -> ReviewDecision:
    """Record a decision on an item; it supersedes the current one (kept in the history).

    ``accepted`` keeps the predicted label (``label``, if given, must be that one);
    ``corrected`` needs ``label``, one of the model's classes (:class:`InvalidLabelError`
    lists them). Error rows raise :class:`NotReviewableError`, unknown items NotFoundError.
    """
    decision = ReviewStatus(status)
    if decision is ReviewStatus.PENDING:
        raise ReviewError("a decision is accepted or corrected; pending means none yet")
    reviewer = reviewer.strip()[:200]
    if not reviewer:
        raise ReviewError("a decision needs a reviewer")
    row = _reviewable(session, item_id)
    predicted = str(row.label)
    if decision is ReviewStatus.ACCEPTED:
        if label is not None and label != predicted:
            raise ReviewError(
                f"accept keeps the predicted label {predicted!r}; to set {label!r}, correct"
            )
        label = predicted
    else:
        classes = model_classes(session, row.job_id)
        if label is None or label not in classes:
            raise InvalidLabelError(label, classes)
    session.execute(
        update(ReviewDecision)
        .where(ReviewDecision.prediction_id == item_id, ReviewDecision.superseded == false())
        .values(superseded=True)
    )
    record = ReviewDecision(
        prediction_id=item_id, job_id=row.job_id, decision=decision, label=label,
        reviewer=reviewer, decided_at=now or utcnow(), superseded=False,
    )
    session.add(record)
    session.flush()
    return record


def flag(session: Session, item_id: int, *, reviewer: str, now: datetime | None = None) -> None:
    """Put an error-free prediction into the queue whatever its confidence (idempotent:
    the first flag's reviewer and time are kept)."""
    row = _reviewable(session, item_id)
    if not row.flagged:
        row.flagged = True
        row.flagged_by = reviewer.strip()[:200] or None
        row.flagged_at = now or utcnow()
        session.flush()


def history(session: Session, item_id: int) -> list[ReviewDecision]:
    """Every decision on an item, oldest first (the last one is current)."""
    if session.get(PredictionRow, item_id) is None:
        raise NotFoundError(ITEM_KIND, item_id)
    return list(session.scalars(
        select(ReviewDecision)
        .where(ReviewDecision.prediction_id == item_id)
        .order_by(ReviewDecision.id)  # the order they were made in: the last is current
    ))


def reviewed_items(session: Session, *, job_id: int | None = None) -> list[ReviewedItem]:
    """The current decision of every reviewed item (optionally of one job), by item id;
    ``label`` is the corrected label or the accepted predicted one."""
    stmt = (
        select(ReviewDecision, PredictionRow.path)
        .join(PredictionRow, PredictionRow.id == ReviewDecision.prediction_id)
        .where(ReviewDecision.superseded == false())
        .order_by(ReviewDecision.prediction_id)
    )
    if job_id is not None:
        stmt = stmt.where(ReviewDecision.job_id == job_id)
    return [
        ReviewedItem(
            review_id=d.id, item_id=int(d.prediction_id), job_id=d.job_id, path=path,
            label=d.label, decision=ReviewStatus(d.decision), reviewer=d.reviewer,
            decided_at=d.decided_at,
        )
        for d, path in session.execute(stmt)
    ]


def explanation_artifacts(session: Session, items: Iterable[ReviewItem]) -> dict[int, int]:
    """item id -> id of the artifact holding its explanation (the API serves artifacts by id,
    never by their server path); items whose explanation is not a recorded artifact are
    left out."""
    wanted = {(i.job_id, i.explanation): i.item_id for i in items if i.explanation}
    if not wanted:
        return {}
    rows = session.execute(
        select(Artifact.id, Artifact.job_id, Artifact.path).where(
            Artifact.job_id.in_({job for job, _ in wanted}),
            Artifact.path.in_({path for _, path in wanted}),
        )
    )
    return {wanted[(job, path)]: int(aid) for aid, job, path in rows if (job, path) in wanted}


def review_lineage(items: Iterable[ReviewedItem]) -> tuple[int, list[int]]:
    """What a model version trained on ``items`` records: (count, sorted review ids)."""
    ids = sorted({item.review_id for item in items})
    return len(ids), ids


@dataclass(frozen=True)
class TrainingSet:
    """The folder a ``--with-reviews`` train job trains on, and the reviews it holds."""

    data_dir: Path
    reviews_used: int
    review_ids: tuple[int, ...]
    export: ExportSummary


def training_set(
    session: Session,
    *,
    data_dir: Path,
    out_dir: Path,
    roots: Sequence[Path],
    reviews_from: int | None = None,
) -> TrainingSet:
    """``data_dir`` plus every reviewed item (or those of job ``reviews_from``), linked into
    ``out_dir`` (reviews go to its ``train/`` split when ``data_dir`` has splits). Only
    exported reviews count in the lineage: a skipped file was not trained on."""
    items = reviewed_items(session, job_id=reviews_from)
    summary = export_dataset(items, out_dir, roots=roots, base=data_dir)
    skipped = {path for path, _ in summary.skipped}
    count, ids = review_lineage(i for i in items if i.path not in skipped)
    return TrainingSet(data_dir=summary.out_dir, reviews_used=count, review_ids=tuple(ids),
                       export=summary)


def record_lineage(
    session: Session, model_version_id: int, *, review_ids: Sequence[int]
) -> ModelVersion:
    """Store on a model version which review decisions it was trained on."""
    version = session.get(ModelVersion, model_version_id)
    if version is None:
        raise NotFoundError("model version", model_version_id)
    version.review_ids = sorted({int(i) for i in review_ids})
    version.reviews_used = len(version.review_ids)
    session.flush()
    return version


def lineage(version: ModelVersion) -> dict[str, Any]:
    """A model version's review lineage as ``mriq models show`` / the API print it."""
    return {"reviews_used": version.reviews_used,
            "review_ids": list(version.review_ids) if version.review_ids is not None else None}

