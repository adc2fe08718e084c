"""SQL schema of the control plane (SQLAlchemy 2.0 typed models).

The tables and their constraints are the binding contract between the scheduler (API/CLI) and
the workers; see docs/ARCHITECTURE.md. The Alembic revision in ``scheduler/migrations`` creates
exactly this schema (a test compares them), so every change here needs a new revision.

Portability choices (the same schema runs on SQLite and PostgreSQL):
- enums are stored as short strings (``native_enum=False``, no CHECK constraint) so adding a
  member never needs an ``ALTER TYPE``;
- timestamps are ``DateTime(timezone=True)`` wrapped in :class:`UTCDateTime`, which makes SQLite
  (that stores no offset) hand back aware UTC datetimes like PostgreSQL does;
- JSON columns use the generic ``JSON`` type (we never query inside them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "Artifact",
    "Base",
    "ChunkStatus",
    "EpochMetric",
    "EvaluationReport",
    "Job",
    "JobChunk",
    "JobItem",
    "JobKind",
    "JobStatus",
    "ModelStage",
    "ModelVersion",
    "Prediction",
    "PredictionRow",
    "REVIEW_BELOW_DEFAULT",
    "ReviewDecision",
    "ReviewStatus",
    "TERMINAL_CHUNK_STATUSES",
    "TERMINAL_JOB_STATUSES",
    "UTCDateTime",
    "utcnow",
]


def utcnow() -> datetime:
    """The current time as an aware UTC datetime (the only clock the schema uses)."""
    return datetime.now(UTC)


class JobKind(StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    CLASSIFY = "classify"
    #: ONNX/TorchScript export of a model version (issue 14); VARCHAR column: no migration.
    EXPORT = "export"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_JOB_STATUSES


class ChunkStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_CHUNK_STATUSES


class ReviewStatus(StrEnum):
    """Where a prediction stands in the review queue; only decisions are stored, so a row of
    ``review_decisions`` is accepted or corrected and "pending" means no current decision."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    CORRECTED = "corrected"


#: A classify job's default ``review_below``: predictions less confident than this are queued.
REVIEW_BELOW_DEFAULT = 0.6


class ModelStage(StrEnum):
    CANDIDATE = "candidate"
    PRODUCTION = "production"
    ARCHIVED = "archived"


TERMINAL_JOB_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED, JobStatus.CANCELLED}
)
TERMINAL_CHUNK_STATUSES: frozenset[ChunkStatus] = frozenset(
    {ChunkStatus.SUCCEEDED, ChunkStatus.FAILED, ChunkStatus.CANCELLED}
)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always stores and returns aware UTC datetimes.

    SQLite keeps no offset, so values are normalised to UTC before storing and tagged as UTC
    when read back; PostgreSQL returns ``timestamptz`` in the session time zone, so results are
    converted to UTC too. Naive datetimes given to us are taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _enum(enum_cls: type[StrEnum]) -> SAEnum:
    # Store the lowercase *values* (not member names) as VARCHAR(16) without a CHECK
    # constraint: portable, readable in SQL, and new members need no schema migration.
    return SAEnum(
        enum_cls,
        native_enum=False,
        create_constraint=False,
        length=16,
        validate_strings=True,
        values_callable=lambda cls: [member.value for member in cls],
    )


# Deterministic constraint names, so Alembic revisions can refer to (and drop) them.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Predictions can reach billions of rows over a deployment's life; SQLite only autoincrements
# an ``INTEGER PRIMARY KEY`` so it gets plain Integer (which is 64-bit there anyway).
_BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class Job(Base):
    """A train, evaluate or classify request and its lifecycle."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind), index=True)
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus), index=True, default=JobStatus.QUEUED
    )
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    submitter: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # ``use_alter``: model_versions also points at jobs (training_job_id); the cycle is broken
    # by adding this foreign key after both tables exist.
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", use_alter=True, ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Classify jobs: predictions whose (calibrated) confidence is below this enter the review
    #: queue (scheduler/review.py). Other kinds keep the default and never use it.
    review_below: Mapped[float] = mapped_column(
        Float, default=REVIEW_BELOW_DEFAULT, server_default=str(REVIEW_BELOW_DEFAULT)
    )

    @property
    def is_terminal(self) -> bool:
        return JobStatus(self.status).is_terminal

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, kind={self.kind!s}, status={self.status!s})"


class JobItem(Base):
    """One input path of a classify job, stored once (chunks refer to index ranges)."""

    __tablename__ = "job_items"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    item_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)


class JobChunk(Base):
    """A contiguous range ``[start_index, stop_index)`` of a classify job's items; one task."""

    __tablename__ = "job_chunks"
    __table_args__ = (
        # complete_chunk counts a job's chunks per status on every chunk completion.
        Index("ix_job_chunks_job_id_status", "job_id", "status"),
    )

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    chunk_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_index: Mapped[int] = mapped_column(Integer)
    stop_index: Mapped[int] = mapped_column(Integer)
    status: Mapped[ChunkStatus] = mapped_column(_enum(ChunkStatus), default=ChunkStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    #: Celery node name of the worker that last claimed the chunk: tells a dead holder from
    #: a slow one, and a restarted worker which chunks its previous incarnation held.
    worker: Mapped[str | None] = mapped_column(String(255))
    #: Times the chunk missed its deadline and was abandoned (re-sent once, then failed).
    abandons: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class PredictionRow(Base):
    """The outcome for one input of a classify job (a label or a per-file error)."""

    __tablename__ = "predictions"
    __table_args__ = (
        # The idempotency key: redelivered chunks insert with ON CONFLICT DO NOTHING. It also
        # serves every per-job query (count, ordered listing), so no separate job_id index.
        UniqueConstraint("job_id", "item_index"),
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    item_index: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    file_sha256: Mapped[str | None] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(100))
    confidence: Mapped[float | None] = mapped_column(Float)
    # JSON list of [label, probability] pairs, best first.
    top_k: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Review queue (scheduler/review.py). ``entropy`` of the calibrated probabilities, NULL
    # for rows written before it was recorded (the queue then estimates it from top_k);
    # ``explanation`` is the path of the Grad-CAM artifact when one was made.
    entropy: Mapped[float | None] = mapped_column(Float)
    explanation: Mapped[str | None] = mapped_column(Text)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    flagged_by: Mapped[str | None] = mapped_column(String(200))
    flagged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# The contract (docs/ARCHITECTURE.md) calls the row type ``Prediction`` in places.
Prediction = PredictionRow


class EpochMetric(Base):
    """Per-epoch training metrics of a train job (upserted, so resumed epochs overwrite)."""

    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("job_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    # Nullable: SQLite stores NaN (a diverged loss, an empty validation split) as NULL.
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    val_macro_f1: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class EvaluationReport(Base):
    """The evaluation report a train (test split) or evaluate job produced; one per job."""

    __tablename__ = "evaluation_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), index=True
    )
    dataset: Mapped[str | None] = mapped_column(Text)
    accuracy: Mapped[float | None] = mapped_column(Float)
    macro_f1: Mapped[float | None] = mapped_column(Float)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelVersion(Base):
    """A trained checkpoint and its stage; at most one row is ``production`` at a time."""

    __tablename__ = "model_versions"
    __table_args__ = (
        # The database itself guarantees "exactly one production model": a partial unique index
        # over the rows whose stage is production (both SQLite and PostgreSQL support it).
        Index(
            "uq_model_versions_single_production",
            "stage",
            unique=True,
            sqlite_where=text("stage = 'production'"),
            postgresql_where=text("stage = 'production'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    arch: Mapped[str] = mapped_column(String(64))
    label_mode: Mapped[str] = mapped_column(String(16))
    classes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    checkpoint_path: Mapped[str] = mapped_column(Text)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    training_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), unique=True
    )
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stage: Mapped[ModelStage] = mapped_column(_enum(ModelStage), default=ModelStage.CANDIDATE)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When it last became production / stopped being it; rollback picks the most recently
    # archived version that had been production (promoted_at set).
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    archived_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Temperature scaling fitted on the validation split at the end of training; a version
    # trained before calibration existed has temperature 1.0 and calibrated False. ECE/NLL
    # are those of its test-split report, after and before the temperature.
    temperature: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    calibrated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    ece: Mapped[float | None] = mapped_column(Float)
    ece_uncalibrated: Mapped[float | None] = mapped_column(Float)
    nll: Mapped[float | None] = mapped_column(Float)
    nll_uncalibrated: Mapped[float | None] = mapped_column(Float)
    # Lineage: the review decisions (ids) the version was trained on, beside its data folder;
    # NULL for versions trained without reviews (and before reviews existed).
    review_ids: Mapped[list[Any] | None] = mapped_column(JSON)
    reviews_used: Mapped[int | None] = mapped_column(Integer)

    def __repr__(self) -> str:
        return f"ModelVersion(id={self.id!r}, arch={self.arch!r}, stage={self.stage!s})"


class Artifact(Base):
    """A file a job produced (plot, CSV, report); idempotent on (job_id, path)."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), index=True
    )
    kind: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ReviewDecision(Base):
    """One reviewer's verdict on a prediction. Every decision is kept (the history); the
    current one is the row with ``superseded`` false, at most one per prediction (a partial
    unique index, like the single production model)."""

    __tablename__ = "review_decisions"
    __table_args__ = (
        Index(
            "uq_review_decisions_current",
            "prediction_id",
            unique=True,
            sqlite_where=text("superseded = 0"),
            postgresql_where=text("superseded = false"),
        ),
        Index("ix_review_decisions_job_id_superseded", "job_id", "superseded"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prediction_id: Mapped[int] = mapped_column(
        _BigId, ForeignKey("predictions.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    decision: Mapped[ReviewStatus] = mapped_column(_enum(ReviewStatus))
    #: The label the item has after this decision: the predicted one when accepted.
    label: Mapped[str] = mapped_column(String(100))
    reviewer: Mapped[str] = mapped_column(String(200))
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
