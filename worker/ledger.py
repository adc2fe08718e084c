"""The database side of one classify chunk attempt: :class:`ChunkLedger`.

Every write is its own transaction through :func:`worker.sessions.with_session`, so each one
rides out a database outage and is safe to repeat (the repository's writes are idempotent).
The classify task talks to the ledger only; it never opens a session itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler import repository
from scheduler.schema import ChunkStatus, JobStatus
from worker import explaining, sessions

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from scheduler.settings import Settings

#: Predictions are recorded per batch of this many images (one INSERT per batch).
DEFAULT_BATCH_SIZE = 32


class PermanentChunkError(Exception):
    """An error that a retry cannot fix (the job has no model version): fail at once."""


@dataclass(frozen=True)
class ChunkWork:
    """What a claim hands out: the items still without a prediction and how to classify them."""

    items: list[tuple[int, str]]
    attempts: int
    checkpoint_path: str
    checkpoint_sha256: str
    top_k: int
    batch_size: int
    #: The job's ``explain`` option (worker/explaining.py): "none", "uncertain" or "all".
    explain: str = "none"
    #: The chunk's item range [start, stop), for the explanations a retry still owes.
    start_index: int = 0
    stop_index: int = 0


class ChunkLedger:
    """Claims, records and finishes chunk ``chunk_index`` of classify job ``job_id``."""

    def __init__(self, settings: Settings, job_id: int, chunk_index: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.chunk_index = chunk_index

    def claim(self, worker: str | None = None) -> ChunkWork | None:
        """Mark the chunk running under ``worker`` (attempts += 1); None when there is nothing
        to do (the chunk or job is terminal). Raises :class:`PermanentChunkError` when the job
        has no model to classify with."""
        job_id, chunk_index = self.job_id, self.chunk_index

        def fn(session: Session) -> ChunkWork | None:
            items = repository.claim_chunk(session, job_id, chunk_index, worker=worker)
            if items is None:
                return None
            job = repository.get_job(session, job_id)
            chunk = repository.get_chunk(session, job_id, chunk_index)
            if job.model_version_id is None:
                raise PermanentChunkError(f"classify job {job_id} has no model version")
            version = repository.get_model_version(session, job.model_version_id)
            params = dict(job.params or {})
            return ChunkWork(
                items=items,
                attempts=int(chunk.attempts),
                checkpoint_path=str(version.checkpoint_path),
                checkpoint_sha256=str(version.checkpoint_sha256),
                top_k=int(params.get("top_k", 3)),
                batch_size=int(params.get("batch_size", DEFAULT_BATCH_SIZE)),
                explain=str(params.get("explain") or "none"),
                start_index=int(chunk.start_index),
                stop_index=int(chunk.stop_index),
            )

        return sessions.with_session(self.settings, fn)

    def record(self, records: Sequence[repository.PredictionRecord]) -> bool:
        """Record one batch; returns whether cancellation of the job has been requested.

        The cancel flag is read in the same transaction (one PK lookup in a transaction we
        run anyway), so a cancelled chunk stops at the next batch.
        """
        job_id = self.job_id

        def fn(session: Session) -> bool:
            repository.record_predictions(session, job_id, records)
            return repository.is_cancel_requested(session, job_id)

        return sessions.with_session(self.settings, fn)

    def explanation_targets(self, work: ChunkWork) -> list[tuple[int, str]]:
        """(item id, path) of the chunk's predictions ``work.explain`` selects that have no
        explanation yet."""
        return sessions.with_session(
            self.settings,
            lambda s: explaining.explanation_targets(
                s, self.job_id, mode=work.explain, start=work.start_index, stop=work.stop_index
            ),
        )

    def record_explanations(self, out_dir: Path, overlays: dict[int, str]) -> None:
        """Record one batch of explanations (rows point at them, artifact rows)."""
        sessions.with_session(
            self.settings,
            lambda s: explaining.record_explanations(s, self.job_id, out_dir, overlays),
        )

    def complete(self, status: ChunkStatus = ChunkStatus.SUCCEEDED) -> JobStatus | None:
        """Mark the chunk ``status``; the job's final status if that finished it."""
        return sessions.with_session(
            self.settings,
            lambda s: repository.complete_chunk(s, self.job_id, self.chunk_index, status=status),
        )

    def fail(self, reason: str, *, attempts: int | None = None) -> JobStatus | None:
        """Error rows for the items without a prediction, the chunk failed with ``reason``.

        ``attempts`` bounds the retries where waiting out an outage is wrong (the worker's
        event loop); by default the outage limit applies.
        """
        return sessions.with_session(
            self.settings,
            lambda s: repository.fail_chunk(s, self.job_id, self.chunk_index, reason),
            attempts=attempts,
        )

    def abandon(self) -> int:
        """Count a missed deadline; returns the abandons so far (0: no longer running)."""
        return sessions.with_session(
            self.settings, lambda s: repository.abandon_chunk(s, self.job_id, self.chunk_index)
        )

    def release(self, not_before: datetime) -> None:
        """Back to pending until a retry is due (best effort: two attempts)."""
        sessions.with_session(
            self.settings,
            lambda s: repository.release_chunk(
                s, self.job_id, self.chunk_index, not_before=not_before
            ),
            attempts=2,
        )
