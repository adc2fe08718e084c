"""On-demand Grad-CAM explanations: one prediction of a classify job, explained by a worker.

:func:`request_explanation` checks the item and sends :data:`scheduler.dispatch.EXPLAIN_TASK`
(args: job id, item id) through the dispatcher; the API
(``POST /jobs/{id}/predictions/{item}/explanation``), ``mriq explain`` and the dashboard's
button all call it. The worker writes ``<job folder>/explanations/<item_id>.png`` (and
``.npy``), then sets ``predictions.explanation`` and records the artifact
(``repository.set_explanation``). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.orm import Session

from scheduler import repository
from scheduler.schema import JobKind, PredictionRow

__all__ = [
    "ExplainDispatcher",
    "ExplanationNotSentError",
    "NotExplainableError",
    "explanation_of",
    "request_explanation",
]


class ExplainDispatcher(Protocol):
    """What an explanation request needs of ``scheduler.dispatch.Dispatcher``."""

    def explain(self, job_id: int, item_id: int) -> Any: ...


class NotExplainableError(ValueError):
    """The item cannot be explained: an error row, or not a classify job's (API: 409)."""


class ExplanationNotSentError(RuntimeError):
    """The broker refused the explanation task; nothing changed (API: 503)."""

    def __init__(self, job_id: int, item_id: int, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"explanation of item {item_id} of job {job_id} not queued: the task broker is "
            "unavailable; ask again later"
        )


def explanation_of(session: Session, job_id: int, item_id: int) -> PredictionRow:
    """The prediction ``item_id`` of classify job ``job_id``, checked to be explainable.

    Raises ``repository.NotFoundError`` for an unknown job, or an item that is not one of
    the job's; :class:`NotExplainableError` for a job of another kind or an error row."""
    job = repository.get_job(session, job_id)
    if job.kind != JobKind.CLASSIFY:
        raise NotExplainableError(
            f"job {job_id} is a {JobKind(job.kind).value} job: only the predictions of "
            "classify jobs can be explained"
        )
    row = session.get(PredictionRow, item_id)
    if row is None or row.job_id != job_id:
        raise repository.NotFoundError(f"job {job_id} item", item_id)
    if row.error is not None:
        raise NotExplainableError(
            f"item {item_id} of job {job_id} is an error row ({row.error}): there is no "
            "prediction to explain"
        )
    return row


def request_explanation(
    sessions: Callable[[], Session], dispatcher: ExplainDispatcher, job_id: int, item_id: int
) -> None:
    """Check the item (:func:`explanation_of`) and queue its explanation.

    Asking again re-explains it (the worker's files and the artifact are replaced). Raises
    :class:`ExplanationNotSentError` when the broker refuses the task."""
    with sessions() as session:
        explanation_of(session, job_id, item_id)
    try:
        dispatcher.explain(job_id, item_id)
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ExplanationNotSentError(job_id, item_id, reason) from exc
