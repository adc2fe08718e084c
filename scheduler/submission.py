"""Job submission shared by the CLI and the HTTP API.

Expands the user's inputs (:mod:`scheduler.expansion`), validates training options
(:mod:`scheduler.options`), stores the job with its items and chunks in one transaction and
only then hands the work to the broker through the :class:`DispatcherLike` dispatcher.
Nothing here imports torch. The refusals (:mod:`scheduler.refusals`) are re-exported here
because the CLI and the API catch them as ``submission.SubmissionError`` and kin.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy.orm import Session

from core.formats import EXPORT_FORMATS
from scheduler import repository
from scheduler.expansion import data_folder, read_spool, spool_inputs
from scheduler.options import (
    REVIEW_BELOW_DEFAULT,
    validate_classify_options,
    validate_train_options,
)
from scheduler.refusals import (
    DispatchError,
    ExpansionTimeoutError,
    InvalidInputError,
    InvalidOptionsError,
    NoInputsError,
    NoProductionModelError,
    SubmissionError,
    TooManyInputsError,
)
from scheduler.schema import JobKind, JobStatus
from scheduler.settings import Settings

__all__ = [
    "DispatchError",
    "DispatcherLike",
    "ExportDispatcher",
    "ExpansionTimeoutError",
    "InvalidInputError",
    "InvalidOptionsError",
    "NoInputsError",
    "NoProductionModelError",
    "SessionFactory",
    "SubmissionError",
    "TooManyInputsError",
    "cancel_job",
    "submit_classify",
    "submit_evaluate",
    "submit_export",
    "submit_train",
]


class DispatcherLike(Protocol):
    """What submission needs from ``scheduler.dispatch.Dispatcher`` (kept structural so the
    module does not import Celery at import time)."""

    def train(self, job_id: int) -> Any: ...
    def evaluate(self, job_id: int) -> Any: ...
    def classify_chunks(self, job_id: int, chunk_indices: Sequence[int]) -> Any: ...
    def revoke(self, job_id: int) -> Any: ...


SessionFactory = Callable[[], Session]


def _dispatch_or_fail(
    session_factory: SessionFactory, job_id: int, send: Callable[[], Any]
) -> None:
    """Send the job's tasks; if the broker refuses, fail the stored job so it never hangs
    as "queued" without any task behind it.

    Interruptions (Ctrl-C, SIGTERM's SystemExit) mid-send fail the job too, then propagate:
    some chunks may be sent and others not, and a job nobody will complete must not look
    queued. Chunks that did reach the broker are skipped by workers (the job is terminal).
    """
    try:
        send()
    except BaseException as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        with session_factory() as session, session.begin():
            repository.finish_job(
                session, job_id, JobStatus.FAILED,
                error=f"not dispatched: the broker refused the tasks ({reason})",
            )
        if not isinstance(exc, Exception):
            raise
        raise DispatchError(job_id, reason) from exc


def submit_classify(
    session_factory: SessionFactory,
    dispatcher: DispatcherLike,
    settings: Settings,
    inputs: Iterable[str],
    *,
    model_version_id: int | None = None,
    submitter: str | None = None,
    top_k: int = 3,
    review_below: float = REVIEW_BELOW_DEFAULT,
    explain: str = "none",
) -> int:
    """Store a classify job over ``inputs`` and dispatch its chunks; returns the job id.

    ``review_below`` goes to the job's column (the review queue's rule reads it there),
    ``top_k`` and ``explain`` to its params. Raises ``PathOutsideRootsError``/
    ``TooManyInputsError``/``SubmissionError`` before anything is stored,
    ``repository.NotFoundError`` for an unknown model version.
    """
    chosen = validate_classify_options(top_k=top_k, review_below=review_below, explain=explain)
    inputs = [inputs] if isinstance(inputs, str) else inputs
    # Resolve the model first: a missing model should not cost a folder walk.
    with session_factory() as session:
        if model_version_id is None:
            production = repository.get_production_model(session)
            if production is None:
                raise NoProductionModelError()
            model_version_id = int(production.id)
        else:
            repository.get_model_version(session, model_version_id)
    spool, count = spool_inputs(inputs, settings)
    chunk_size = settings.chunk_size
    with spool, session_factory() as session, session.begin():
        job = repository.create_job(
            session,
            kind=JobKind.CLASSIFY,
            params={"top_k": chosen["top_k"], "explain": chosen["explain"], "count": count},
            submitter=submitter,
            model_version_id=model_version_id,
            review_below=chosen["review_below"],
        )
        job_id = int(job.id)
        repository.add_job_items(session, job_id, read_spool(spool), chunk_size=chunk_size)
    n_chunks = math.ceil(count / chunk_size)
    _dispatch_or_fail(
        session_factory, job_id, lambda: dispatcher.classify_chunks(job_id, range(n_chunks))
    )
    return job_id


def submit_train(
    session_factory: SessionFactory,
    dispatcher: DispatcherLike,
    settings: Settings,
    data_dir: str | os.PathLike[str],
    options: Mapping[str, Any] | None = None,
    *,
    submitter: str | None = None,
) -> int:
    """Store a train job on ``data_dir`` (a class-folder tree) and dispatch it.

    ``params`` holds ``data`` plus every validated option, so the worker never guesses
    defaults; ``warm_start`` asks the worker to start from the production model's weights,
    ``with_reviews``/``reviews_from`` to add the reviewed predictions (of one classify job).
    """
    folder = data_folder(data_dir, settings.data_roots)
    params = validate_train_options(
        options, roots=settings.data_roots, default_device=settings.default_device
    )
    with session_factory() as session, session.begin():
        warm_from: int | None = None
        if params["warm_start"]:
            production = repository.get_production_model(session)
            if production is None:
                raise InvalidOptionsError("warm_start: there is no production model to start from")
            warm_from = int(production.id)
        if params["reviews_from"] is not None:
            _check_reviews_from(session, int(params["reviews_from"]))
        job = repository.create_job(
            session,
            kind=JobKind.TRAIN,
            params={"data": str(folder), **params},
            submitter=submitter,
            model_version_id=warm_from,
        )
        job_id = int(job.id)
    _dispatch_or_fail(session_factory, job_id, lambda: dispatcher.train(job_id))
    return job_id


def _check_reviews_from(session: Session, job_id: int) -> None:
    try:
        job = repository.get_job(session, job_id)
    except repository.NotFoundError:
        raise InvalidOptionsError(f"reviews_from: there is no job {job_id}") from None
    if job.kind != JobKind.CLASSIFY:
        kind = JobKind(job.kind).value
        raise InvalidOptionsError(
            f"reviews_from: job {job_id} is a {kind} job, not a classify job (only "
            "classify jobs have reviewed predictions)"
        )


def submit_evaluate(
    session_factory: SessionFactory,
    dispatcher: DispatcherLike,
    settings: Settings,
    *,
    model_version_id: int,
    data_dir: str | os.PathLike[str],
    submitter: str | None = None,
) -> int:
    """Store an evaluate job (every image below ``data_dir``, no split) and dispatch it."""
    folder = data_folder(data_dir, settings.data_roots)
    with session_factory() as session, session.begin():
        repository.get_model_version(session, model_version_id)
        job = repository.create_job(
            session,
            kind=JobKind.EVALUATE,
            params={"data": str(folder)},
            submitter=submitter,
            model_version_id=model_version_id,
        )
        job_id = int(job.id)
    _dispatch_or_fail(session_factory, job_id, lambda: dispatcher.evaluate(job_id))
    return job_id


class ExportDispatcher(Protocol):
    """What an export needs of ``scheduler.dispatch.Dispatcher``."""

    def export(self, job_id: int) -> Any: ...


def submit_export(
    session_factory: SessionFactory,
    dispatcher: ExportDispatcher,
    settings: Settings,
    model_version_id: int,
    fmt: str,
    *,
    submitter: str | None = None,
) -> int:
    """Store an export job of model version ``model_version_id`` to ``fmt`` and dispatch it.

    The worker writes the verified export (core.export) into the job's folder and records it
    as an artifact of the job and of the model version (``mriq models show`` lists it)."""
    del settings  # the export is written where the worker keeps job files
    if fmt not in EXPORT_FORMATS:
        raise InvalidOptionsError(
            f"format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}"
        )
    with session_factory() as session, session.begin():
        repository.get_model_version(session, model_version_id)
        job = repository.create_job(
            session,
            kind=JobKind.EXPORT,
            params={"format": fmt},
            submitter=submitter,
            model_version_id=model_version_id,
        )
        job_id = int(job.id)
    _dispatch_or_fail(session_factory, job_id, lambda: dispatcher.export(job_id))
    return job_id


def cancel_job(session_factory: SessionFactory, dispatcher: DispatcherLike, job_id: int) -> str:
    """Request cancellation; returns the job's status afterwards.

    The database flag is the source of truth (workers check it between batches/epochs);
    revoking queued tasks is only a shortcut, so broker errors are ignored.
    """
    with session_factory() as session, session.begin():
        job = repository.request_cancel(session, job_id)
        status = job.status
    with contextlib.suppress(Exception):  # best effort: the DB flag already stops the work
        dispatcher.revoke(job_id)
    return status.value if hasattr(status, "value") else str(status)
