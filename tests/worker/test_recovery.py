"""The recovery sweep's identity rules (worker/recovery.py) on real PostgreSQL and Redis.

Which workers answer ping is the one input given directly (``live``): the fault tests
(tests/faults/test_worker_faults.py, test_liveness_faults.py) cover it with real workers.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.dispatch import GPU_QUEUE, Dispatcher
from scheduler.schema import ChunkStatus, JobChunk, JobKind, utcnow
from tests.worker.conftest import make_settings, migrated_factory
from worker import recovery

pytestmark = pytest.mark.services

ME, OTHER, GONE = "me@host", "other@host", "gone@host"
CONFIG = recovery.RecoveryConfig(heartbeat_s=1, dead_after_s=5, stale_after_s=300, interval_s=1)


def _job(factory: sessionmaker[Session], n_chunks: int) -> int:
    with factory.begin() as session:
        job = repository.create_job(session, kind=JobKind.CLASSIFY, params={})
        repository.add_job_items(
            session, job.id, [f"/x/{i}.png" for i in range(n_chunks)], chunk_size=1
        )
        return int(job.id)


def _hold(
    factory: sessionmaker[Session], job_id: int, index: int, worker: str, age_s: float
) -> None:
    """Chunk ``index`` claimed by ``worker`` and last stamped ``age_s`` seconds ago."""
    with factory.begin() as session:
        repository.claim_chunk(session, job_id, index, worker=worker)
        session.execute(
            update(JobChunk)
            .where(JobChunk.job_id == job_id, JobChunk.chunk_index == index)
            .values(updated_at=utcnow() - timedelta(seconds=age_s))
        )


def _statuses(factory: sessionmaker[Session], job_id: int) -> list[ChunkStatus]:
    with factory() as session:
        return [ChunkStatus(c.status) for c in repository.list_chunks(session, job_id)]


@pytest.fixture
def setup(tmp_path: Path, postgres_url: str, redis_broker: str):  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, database_url=postgres_url, broker_url=redis_broker)
    factory = migrated_factory(postgres_url)
    dispatcher = Dispatcher(settings)
    try:
        yield settings, factory, dispatcher
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()


def test_restarted_worker_resends_only_what_its_previous_incarnation_held(setup) -> None:  # type: ignore[no-untyped-def]
    """Same node name, stamped before this incarnation started: dead, re-sent at once (no
    staleness window). Stamped since: this incarnation's own, alive. Another worker's chunk,
    whatever its age, is not ours to judge without ping answers."""
    settings, factory, dispatcher = setup
    job_id = _job(factory, 3)
    _hold(factory, job_id, 0, ME, age_s=2)  # previous incarnation, 2 s ago
    _hold(factory, job_id, 2, OTHER, age_s=200)
    identity = recovery.Identity(hostname=ME, started=utcnow() - timedelta(seconds=1))
    _hold(factory, job_id, 1, ME, age_s=0)  # claimed by this incarnation
    taken = recovery._take_dead_chunks(settings, CONFIG, dispatcher, identity, live=None)
    assert [(j, i) for j, i, _ in taken] == [(job_id, 0)]
    assert "previous incarnation" in taken[0][2]
    assert _statuses(factory, job_id) == [
        ChunkStatus.PENDING,
        ChunkStatus.RUNNING,
        ChunkStatus.RUNNING,
    ]
    assert dispatcher.queue_size(GPU_QUEUE) == 1
    # Taken once: a second sweep (or a racing peer) finds nothing more.
    assert recovery._take_dead_chunks(settings, CONFIG, dispatcher, identity, live=None) == []
    assert dispatcher.queue_size(GPU_QUEUE) == 1


def test_chunk_of_a_worker_that_does_not_answer_ping_is_resent_after_dead_after(setup) -> None:  # type: ignore[no-untyped-def]
    """A holder missing from the ping answers is dead once the chunk went unstamped for
    dead_after_s (5 s): re-sent. Fresher stamps wait; a holder that answers ping keeps its
    chunk however stale (a slow chunk, or its heartbeats failing in a database outage)."""
    settings, factory, dispatcher = setup
    job_id = _job(factory, 3)
    _hold(factory, job_id, 0, GONE, age_s=6)
    _hold(factory, job_id, 1, GONE, age_s=1)
    _hold(factory, job_id, 2, OTHER, age_s=1000)
    identity = recovery.Identity(hostname=ME, started=utcnow())
    live = {ME, OTHER}
    taken = recovery._take_dead_chunks(settings, CONFIG, dispatcher, identity, live)
    assert [(j, i) for j, i, _ in taken] == [(job_id, 0)]
    assert f"held by {GONE}, which does not answer ping" in taken[0][2]
    assert _statuses(factory, job_id) == [
        ChunkStatus.PENDING,
        ChunkStatus.RUNNING,
        ChunkStatus.RUNNING,
    ]
    # Without trusted ping answers (live=None) nobody else's chunk is judged dead.
    _hold(factory, job_id, 0, GONE, age_s=60)
    assert recovery._take_dead_chunks(settings, CONFIG, dispatcher, identity, None) == []


def test_stale_sweep_spares_chunks_of_live_workers(setup) -> None:  # type: ignore[no-untyped-def]
    """The staleness fallback (holder's liveness unknown) skips holders known alive."""
    _, factory, _ = setup
    job_id = _job(factory, 3)
    _hold(factory, job_id, 0, OTHER, age_s=400)
    _hold(factory, job_id, 1, GONE, age_s=400)
    with factory.begin() as session:
        repository.claim_chunk(session, job_id, 2)  # no worker recorded (an older worker)
        session.execute(
            update(JobChunk)
            .where(JobChunk.job_id == job_id, JobChunk.chunk_index == 2)
            .values(updated_at=utcnow() - timedelta(seconds=400))
        )
    before = utcnow() - timedelta(seconds=300)
    with factory.begin() as session:
        taken = repository.take_stale_chunks(
            session,
            job_id,
            statuses=[ChunkStatus.RUNNING],
            before=before,
            exclude_workers=[ME, OTHER],
        )
    assert taken == [1, 2]
    # Without trusted ping answers only the chunk that names no holder would go.
    _hold(factory, job_id, 1, GONE, age_s=400)
    with factory.begin() as session:
        session.execute(
            update(JobChunk)
            .where(JobChunk.job_id == job_id, JobChunk.chunk_index == 2)
            .values(status=ChunkStatus.RUNNING, updated_at=utcnow() - timedelta(seconds=400))
        )
        taken = repository.take_stale_chunks(
            session, job_id, statuses=[ChunkStatus.RUNNING], before=before, unowned_only=True
        )
    assert taken == [2]


def test_recovery_config_rejects_a_dead_window_under_two_heartbeats() -> None:
    with pytest.raises(ValueError, match="dead_after_s"):
        recovery.RecoveryConfig(heartbeat_s=10, dead_after_s=15)


def test_sweep_resends_a_stale_unowned_chunk_exactly_once(setup) -> None:  # type: ignore[no-untyped-def]
    """sweep() itself: a running chunk that names no holder and went unstamped past
    stale_after_s is re-sent once; its fresh neighbours stay, and a second sweep (the
    message now queued, the chunk pending and freshly stamped) sends nothing more."""
    settings, factory, dispatcher = setup
    job_id = _job(factory, 3)
    with factory.begin() as session:
        repository.claim_chunk(session, job_id, 0)  # an older worker: no name recorded
        session.execute(
            update(JobChunk)
            .where(JobChunk.job_id == job_id, JobChunk.chunk_index == 0)
            .values(updated_at=utcnow() - timedelta(seconds=400))
        )
    _hold(factory, job_id, 1, OTHER, age_s=0)
    result = recovery.sweep(settings, CONFIG, dispatcher)
    assert result.chunks == ((job_id, 0),) and result.jobs == ()
    assert _statuses(factory, job_id) == [
        ChunkStatus.PENDING,
        ChunkStatus.RUNNING,
        ChunkStatus.PENDING,
    ]
    assert dispatcher.queue_size(GPU_QUEUE) == 1
    assert not recovery.sweep(settings, CONFIG, dispatcher)
    assert dispatcher.queue_size(GPU_QUEUE) == 1
