"""scheduler.dispatch: Celery configuration, the embedded filesystem broker, ping."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from kombu import Connection, Exchange, Queue

from scheduler.dispatch import (
    CLASSIFY_CHUNK_TASK,
    CPU_QUEUE,
    EVALUATE_TASK,
    GPU_QUEUE,
    RETRAIN_TASK,
    TRAIN_TASK,
    Dispatcher,
    clean_filesystem_broker,
    make_celery,
)
from scheduler.settings import Settings
from tests.worker.conftest import REPO, make_settings, redis_url


def _fs_settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", broker_url=None
    )


def test_task_names_and_routes(tmp_path: Path) -> None:
    app = make_celery(_fs_settings(tmp_path))
    conf = app.conf
    assert (TRAIN_TASK, EVALUATE_TASK, CLASSIFY_CHUNK_TASK, RETRAIN_TASK) == (
        "mriq.train",
        "mriq.evaluate",
        "mriq.classify_chunk",
        "mriq.retrain",
    )
    routes = conf.task_routes
    assert routes[TRAIN_TASK]["queue"] == GPU_QUEUE
    assert routes[EVALUATE_TASK]["queue"] == GPU_QUEUE
    assert routes[CLASSIFY_CHUNK_TASK]["queue"] == GPU_QUEUE
    assert routes[RETRAIN_TASK]["queue"] == CPU_QUEUE
    # Routing as the producer actually resolves it (not just the dict we wrote).
    assert app.amqp.router.route({}, TRAIN_TASK)["queue"].name == GPU_QUEUE
    assert app.amqp.router.route({}, RETRAIN_TASK)["queue"].name == CPU_QUEUE


def test_reliability_settings(tmp_path: Path) -> None:
    conf = make_celery(_fs_settings(tmp_path)).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_send_task_events is True
    assert conf.task_send_sent_event is True
    assert conf.task_serializer == "json"
    assert conf.result_backend is None
    assert conf.broker_connection_retry_on_startup is True
    # No task code in the producer app: the scheduler sends by name only.
    assert not [
        name for name in make_celery(_fs_settings(tmp_path)).tasks if name.startswith("mriq.")
    ]


def test_redis_transport_options(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url="sqlite://", broker_url=redis_url())
    settings = settings.model_copy(update={"visibility_timeout": 99_999})
    app = make_celery(settings)
    assert app.conf.broker_url == redis_url()
    assert app.conf.broker_transport_options == {"visibility_timeout": 99_999}


def test_filesystem_transport_folders(tmp_path: Path) -> None:
    settings = _fs_settings(tmp_path)
    options = make_celery(settings).conf.broker_transport_options
    broker = Path(settings.data_dir) / "broker"
    # Producers and consumers share one folder, so in == out.
    assert options["data_folder_in"] == options["data_folder_out"] == str(broker / "queue")
    assert options["control_folder"] == str(broker / "control")
    # Claims are same-filesystem renames (see the dispatch module docstring).
    assert options["processed_folder"] == str(broker / "processed")
    for name in ("queue", "control", "processed"):
        assert (broker / name).is_dir()


def test_filesystem_send_consume_and_cleanup(tmp_path: Path) -> None:
    """Send with the Dispatcher, consume with kombu as a worker would, then clean up."""
    settings = _fs_settings(tmp_path)
    broker = Path(settings.data_dir) / "broker"
    dispatcher = Dispatcher(settings)
    ids = dispatcher.classify_chunks(7, [0, 1, 2])
    dispatcher.train(8)
    queue_files = sorted(p.name for p in (broker / "queue").iterdir())
    assert len([n for n in queue_files if n.endswith(".gpu.msg")]) == 4

    received: list[tuple[str, list[int]]] = []
    app = dispatcher.app
    with Connection(
        app.conf.broker_url, transport_options=app.conf.broker_transport_options
    ) as conn:
        queue = Queue(GPU_QUEUE, Exchange(GPU_QUEUE), routing_key=GPU_QUEUE)
        with conn.Consumer(queue, accept=["json"]) as consumer:

            def on_message(body: object, message: object) -> None:
                headers = message.headers  # type: ignore[attr-defined]
                received.append((headers["task"], body[0]))  # type: ignore[index]
                message.ack()  # type: ignore[attr-defined]

            consumer.register_callback(on_message)
            deadline = time.monotonic() + 10
            while len(received) < 4 and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.5)
    # Files are named "<monotonic ms>_<uuid>", so messages sent within one millisecond come
    # out in random order: the filesystem broker is FIFO only to the millisecond.
    assert sorted(received) == sorted(
        [(CLASSIFY_CHUNK_TASK, [7, i]) for i in range(3)] + [(TRAIN_TASK, [8])]
    )
    assert len(ids) == 3
    # kombu removed the messages from the queue folder when it claimed them ...
    assert not [p for p in (broker / "queue").iterdir() if p.name.endswith(".gpu.msg")]
    # ... into processed/, which it never empties: that is the janitor's job.
    assert len(list((broker / "processed").iterdir())) == 4
    assert clean_filesystem_broker(settings, processed_age_s=0.0) == 4
    assert list((broker / "processed").iterdir()) == []
    dispatcher.close()


def test_janitor_keeps_task_messages_and_young_files(tmp_path: Path) -> None:
    settings = _fs_settings(tmp_path)
    broker = Path(settings.data_dir) / "broker"
    Dispatcher(settings).classify_chunks(1, [0])  # creates the folders and a task message
    stale = broker / "queue" / "1_abc.deadworker@host.celery.pidbox.msg"
    stale.write_text("{}")
    young = broker / "processed" / "2_def.gpu.msg"
    young.write_text("{}")
    now = time.time()
    # Nothing is old enough yet.
    assert clean_filesystem_broker(settings, now=now) == 0
    # An hour later: the stale broadcast and the consumed file go, the task message stays.
    assert clean_filesystem_broker(settings, now=now + 3600) == 2
    assert not stale.exists() and not young.exists()
    assert len([p for p in (broker / "queue").iterdir() if p.name.endswith(".gpu.msg")]) == 1


def test_no_env_read_at_import() -> None:
    """Importing the worker/dispatch modules reads no settings (the app is created lazily)."""
    code = (
        "import os; os.environ['MRIQ_CHUNK_SIZE'] = 'not-a-number'\n"
        "import scheduler.dispatch, worker.app, worker.tasks, worker.runtime, worker.beat\n"
        "import sys; assert 'torch' not in sys.modules, 'torch imported at import time'\n"
        "try:\n"
        "    worker.app.app\n"
        "except Exception as exc:\n"
        "    print('lazy:', type(exc).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    # Only touching worker.app.app read the (invalid) environment.
    assert "lazy: ValidationError" in out.stdout


def test_lazy_app_uses_environment(tmp_path: Path) -> None:
    code = (
        "import worker.app as m\n"
        "app = m.app\n"
        "assert app is m.app\n"
        "print(app.conf.mriq_settings.data_dir)\n"
        "print(sorted(n for n in app.tasks if n.startswith('mriq.')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRIQ_")}
    env.update(MRIQ_DATA_DIR=str(tmp_path / "d"), PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "d") in out.stdout
    for name in (TRAIN_TASK, EVALUATE_TASK, CLASSIFY_CHUNK_TASK, RETRAIN_TASK):
        assert name in out.stdout
