"""``mriq explain JOB_ID ITEM_ID``: the task sent (read back from the real broker), the
refusals, and ``--wait`` printing the file once the row names it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import redis
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.dispatch import EXPLAIN_TASK, GPU_QUEUE
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind
from tests.scheduler.api_factories import sent_tasks
from tests.scheduler.cli.runner import make_image, make_model, mriq


def _classified(sessions: sessionmaker[Session], root: Path) -> tuple[int, int, int]:
    """A classify job with one prediction and one error row: (job, item, error item)."""
    model_id = make_model(sessions, promote=True)
    paths = [str(make_image(root, f"in/{i}.png")) for i in range(2)]
    with sessions() as s, s.begin():
        job_id = int(repository.create_job(s, kind=JobKind.CLASSIFY, params={"top_k": 3},
                                           model_version_id=model_id).id)
        repository.add_job_items(s, job_id, paths, chunk_size=2)
        repository.record_predictions(s, job_id, [
            PredictionRecord(item_index=0, path=paths[0], file_sha256=None, label="Normal",
                             confidence=0.5, top_k=(("Normal", 0.5),)),
            PredictionRecord(item_index=1, path=paths[1], file_sha256=None, label=None,
                             confidence=None, error="unreadable"),
        ])
        good, bad = (int(r.id) for r in repository.list_predictions(s, job_id))
    return job_id, good, bad


def test_explain_sends_the_task_and_refuses(
    env: dict[str, str], root: Path, sessions: sessionmaker[Session]
) -> None:
    job_id, good, bad = _classified(sessions, root)
    state = Path(env["MRIQ_DATA_DIR"])
    result = mriq(env, "explain", str(job_id), str(good), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"job_id": job_id, "item_id": good, "queued": True,
                                         "explanation": None}
    assert sent_tasks(state) == [(EXPLAIN_TASK, [job_id, good])]
    error_row = mriq(env, "explain", str(job_id), str(bad))
    assert error_row.exit_code == 2 and "is an error row (unreadable)" in error_row.stderr
    unknown = mriq(env, "explain", str(job_id), "999999")
    assert unknown.exit_code == 1 and f"job {job_id} item 999999 not found" in unknown.stderr
    with sessions() as s:
        train_id = repository.list_jobs(s, kind=JobKind.TRAIN)[0].id
    not_classify = mriq(env, "explain", str(train_id), str(good))
    assert not_classify.exit_code == 2 and "only the predictions of classify" in (
        not_classify.stderr)
    assert len(sent_tasks(state)) == 1


def test_explain_wait_prints_the_written_file(
    env: dict[str, str], root: Path, sessions: sessionmaker[Session], redis_broker: str
) -> None:
    # A shared broker: --wait starts no embedded worker, this test plays the worker.
    env = {**env, "MRIQ_BROKER_URL": redis_broker}
    job_id, good, _ = _classified(sessions, root)
    png = Path(env["MRIQ_DATA_DIR"]) / "jobs" / str(job_id) / "explanations" / f"{good}.png"

    def worker() -> None:
        time.sleep(1.0)
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(b"png")
        with sessions() as s, s.begin():
            repository.set_explanation(s, good, str(png))

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        result = mriq(env, "explain", str(job_id), str(good), "--wait", "--timeout", "30")
    finally:
        thread.join()
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{png}\n"
    client = redis.Redis.from_url(redis_broker)
    try:
        (message,) = client.lrange(GPU_QUEUE, 0, -1)
        assert json.loads(message)["headers"]["task"] == EXPLAIN_TASK
    finally:
        client.close()
