"""Data access for the control plane: every read and write of the job tables goes through here.

A package split by noun (``jobs``, ``chunks``, ``predictions``, ``metrics``, ``models``,
``artifacts``; shared helpers in ``base``); every public name is re-exported here, so callers
write ``from scheduler import repository; repository.create_job(...)``.

Rules (binding for the API, the CLI and the workers; see docs/ARCHITECTURE.md):

- Every function takes a :class:`~sqlalchemy.orm.Session` first and **never commits**: callers
  own the transaction (``with session_factory() as s, s.begin(): ...``, or
  :func:`scheduler.database.run_in_transaction`, which also retries lost connections).
- Writes are idempotent, so a redelivered task or a retried transaction is harmless:
  predictions are inserted with ``ON CONFLICT (job_id, item_index) DO NOTHING``, epoch metrics
  are upserted, model versions / evaluations / artifacts are keyed by their job.
- Missing rows raise :class:`NotFoundError` (``str()`` is e.g. ``"job 42 not found"``).
- Functions that change a job's state lock the job row first (``SELECT ... FOR UPDATE`` on
  PostgreSQL; on SQLite every transaction is already ``BEGIN IMMEDIATE``, see
  :func:`scheduler.database.make_engine`), so concurrent workers finishing the last chunks of a
  job finalise it exactly once.

Lifecycle of a classify job: ``create_job`` -> ``add_job_items`` (items + chunks) -> per chunk
task: ``claim_chunk`` -> ``record_predictions`` (per batch) -> ``complete_chunk`` (or
``fail_chunk`` after the last retry). The job finishes when its last chunk does:
``succeeded`` (per-file read errors inside a successful chunk are normal outcomes), ``partial``
(some chunks failed), ``failed`` (every chunk failed) or ``cancelled`` (cancel was requested).
"""

from __future__ import annotations

from scheduler.repository.artifacts import (
    EXPORT_ARTIFACT,
    artifact_ids,
    get_artifact,
    list_artifacts,
    list_model_artifacts,
    record_artifact,
)
from scheduler.repository.base import (
    NoRollbackTargetError,
    NotFoundError,
)
from scheduler.repository.chunks import (
    abandon_chunk,
    chunk_status_counts,
    claim_chunk,
    complete_chunk,
    fail_chunk,
    get_chunk,
    list_chunks,
    pending_chunk_indices,
    release_chunk,
    running_chunks,
    take_dead_chunk,
    take_stale_chunks,
    touch_chunk,
)
from scheduler.repository.jobs import (
    ITEM_BATCH_SIZE,
    add_job_items,
    create_job,
    finish_job,
    get_job,
    is_cancel_requested,
    iter_job_items,
    list_jobs,
    list_open_jobs,
    mark_job_running,
    request_cancel,
    set_progress,
)
from scheduler.repository.metrics import (
    get_evaluation,
    list_epoch_metrics,
    record_epoch_metric,
    record_evaluation,
)
from scheduler.repository.models import (
    CALIBRATION_FIELDS,
    get_model_version,
    get_production_model,
    list_model_versions,
    promote_model_version,
    register_model_version,
    rollback_production,
)
from scheduler.repository.predictions import (
    EXPLANATION_KIND,
    PredictionRecord,
    count_prediction_errors,
    count_predictions,
    iter_predictions,
    list_predictions,
    record_predictions,
    set_explanation,
)

__all__ = [
    "EXPORT_ARTIFACT",
    "CALIBRATION_FIELDS",
    "EXPLANATION_KIND",
    "ITEM_BATCH_SIZE",
    "NoRollbackTargetError",
    "NotFoundError",
    "PredictionRecord",
    "abandon_chunk",
    "artifact_ids",
    "add_job_items",
    "chunk_status_counts",
    "claim_chunk",
    "complete_chunk",
    "count_prediction_errors",
    "count_predictions",
    "create_job",
    "fail_chunk",
    "finish_job",
    "get_artifact",
    "get_chunk",
    "get_evaluation",
    "get_job",
    "get_model_version",
    "get_production_model",
    "is_cancel_requested",
    "iter_job_items",
    "iter_predictions",
    "list_artifacts",
    "list_model_artifacts",
    "list_chunks",
    "list_epoch_metrics",
    "list_jobs",
    "list_model_versions",
    "list_open_jobs",
    "list_predictions",
    "mark_job_running",
    "pending_chunk_indices",
    "promote_model_version",
    "record_artifact",
    "record_epoch_metric",
    "record_evaluation",
    "record_predictions",
    "register_model_version",
    "release_chunk",
    "request_cancel",
    "rollback_production",
    "running_chunks",
    "set_explanation",
    "set_progress",
    "take_dead_chunk",
    "take_stale_chunks",
    "touch_chunk",
]
