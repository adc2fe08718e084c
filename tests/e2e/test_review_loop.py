"""The review loop end to end on real services: PostgreSQL, Redis and a ``mriq worker``,
driven through the ``mriq`` CLI as an operator would:

    mriq train --wait -> mriq classify DIR --review-below 0.99 --explain uncertain --wait
    -> the queued items have Grad-CAM files and artifact rows (mriq review list)
    -> mriq explain JOB ITEM --wait (on demand, again) -> mriq review correct / accept
    -> mriq train --with-reviews --wait -> mriq models show --json: the lineage, and the
       new version's evaluation is recorded

Tiny on purpose (three class folders of 40-48 px images, resnet18 at 32 px, one epoch), so
the loop runs in well under a minute on an idle 2-core machine.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from scheduler import repository
from scheduler.database import make_engine, make_session_factory
from scheduler.dispatch import Dispatcher
from scheduler.schema import Artifact, ReviewDecision
from scheduler.settings import Settings
from tests.e2e.conftest import Cli, Services, clean_env, mriq_argv, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.services]

FOLDERS = ("Astrocitoma T1", "Carcinoma T1", "Ependimoma T1")
TRAIN_ARGS = ("--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--weights", "none",
              "--batch-size", "8")


@pytest.fixture(scope="module")
def loop(
    tmp_path_factory: pytest.TempPathFactory,
    e2e_postgres_url: str,
    e2e_redis_url: str,
    services: Services,
) -> Iterator[tuple[Cli, Path, str]]:
    """A migrated database and one running ``mriq worker``, set up through the CLI."""
    from core.synth import synthesize

    root = tmp_path_factory.mktemp("e2e-review-loop")
    env = clean_env({
        "MRIQ_DATABASE_URL": e2e_postgres_url,
        "MRIQ_BROKER_URL": e2e_redis_url,
        "MRIQ_DATA_DIR": str(root / "data"),
        "MRIQ_DATA_ROOTS": str(root),
        "MRIQ_DEFAULT_DEVICE": "cpu",
    })
    cli = Cli(env=env, cwd=root)
    cli.run("db", "upgrade")
    synthesize(root / "train", per_folder=6, seed=0, image_size_range=(40, 48),
               folders=list(FOLDERS))
    synthesize(root / "inbox", per_folder=2, seed=1, image_size_range=(40, 48),
               folders=list(FOLDERS))
    hostname = f"e2e-review-{uuid.uuid4().hex[:8]}@localhost"
    worker = services.start("worker", mriq_argv("worker", "--hostname", hostname), env, root)
    settings = Settings(data_dir=root / "data", database_url=e2e_postgres_url,
                        broker_url=e2e_redis_url, data_roots=(root,))
    dispatcher = Dispatcher(settings)
    try:
        def answered() -> bool:
            assert worker.alive(), f"worker exited:\n{worker.log()}"
            return hostname in dispatcher.ping(timeout=1.0)

        wait_until(answered, timeout=90, interval=0.5, what="the worker to answer ping")
    finally:
        dispatcher.close()
    yield cli, root, e2e_postgres_url


def _version_of(cli: Cli, train_job: int) -> dict[str, object]:
    mine = [m for m in cli.run("models", "list", "--json").json()
            if m.get("training_job_id") == train_job]
    assert len(mine) == 1, mine
    doc: dict[str, object] = cli.run("models", "show", str(mine[0]["id"]), "--json").json()
    return doc


def test_classify_explain_review_and_retrain_with_the_reviews(
    loop: tuple[Cli, Path, str],
) -> None:
    cli, root, url = loop
    first = cli.run("train", "--data", str(root / "train"), *TRAIN_ARGS, "--wait", "--json")
    assert first.json()["status"] == "succeeded", first.describe()
    model = _version_of(cli, first.json()["id"])
    assert model["reviews_used"] is None and model["review_ids"] is None

    classified = cli.run("classify", str(root / "inbox"), "--model", str(model["id"]),
                         "--review-below", "0.99", "--explain", "uncertain", "--wait", "--json")
    job = classified.json()
    assert job["status"] == "succeeded", classified.describe()
    job_id = int(job["id"])

    # Every queued item (confidence < 0.99: all of them, for a one-epoch model) was
    # explained while the job ran: a file in the job's folder, and its artifact row.
    queued = cli.run("review", "list", "--job", str(job_id), "--json").json()
    assert len(queued) == len(FOLDERS) * 2
    explanations = {int(i["item_id"]): i["explanation"] for i in queued}
    assert all(explanations.values()), queued
    folder = (root / "data" / "jobs" / str(job_id) / "explanations").resolve()
    for item_id, path in explanations.items():
        assert Path(path) == folder / f"{item_id}.png" and Path(path).is_file()
        assert (folder / f"{item_id}.npy").is_file()
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        with sessions() as s:
            recorded = set(s.scalars(select(Artifact.path).where(
                Artifact.job_id == job_id, Artifact.kind == "explanation")))
        assert recorded == set(explanations.values())

        # On demand: the worker explains the item again (same file, newer).
        item = min(explanations)
        before = os.stat(explanations[item]).st_mtime_ns
        again = cli.run("explain", str(job_id), str(item), "--wait", "--json").json()
        assert again["explanation"] == explanations[item]
        assert os.stat(explanations[item]).st_mtime_ns > before

        # Review: correct two, accept one.
        items = sorted(explanations)
        cli.run("review", "correct", str(items[0]), "Ependimoma", "--reviewer", "dr-a")
        cli.run("review", "correct", str(items[1]), "Carcinoma", "--reviewer", "dr-a")
        cli.run("review", "accept", str(items[2]), "--reviewer", "dr-b")
        with sessions() as s:
            review_ids = sorted(s.scalars(select(ReviewDecision.id).where(
                ReviewDecision.job_id == job_id, ReviewDecision.superseded.is_(False))))
        assert len(review_ids) == 3

        second = cli.run("train", "--data", str(root / "train"), *TRAIN_ARGS, "--with-reviews",
                         "--wait", "--json")
        assert second.json()["status"] == "succeeded", second.describe()
        retrained = _version_of(cli, second.json()["id"])
        assert retrained["reviews_used"] == 3
        assert retrained["review_ids"] == review_ids
        with sessions() as s:
            evaluation = repository.get_evaluation(s, int(second.json()["id"]))
            assert evaluation.model_version_id == retrained["id"]
            assert evaluation.report["n"] > 0
    finally:
        engine.dispose()
