"""``mriq jobs list|show|cancel|wait``."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.schema import JobKind, JobStatus
from tests.scheduler.cli.runner import make_image, make_model, mriq


def test_classify_json_and_jobs_list_show(
    env: dict[str, str], root: Path, sessions: sessionmaker[Session]
) -> None:
    model_id = make_model(sessions, promote=True)
    for i in range(3):
        make_image(root, f"imgs/{i}.png")
    result = mriq(env, "classify", str(root / "imgs"), str(root / "missing.png"), "--json",
                  "--top-k", "2")
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.stdout)["id"]

    plain = mriq(env, "classify", str(root / "imgs"))
    assert plain.exit_code == 0
    assert plain.stdout.strip() == str(job_id + 1)

    listed = json.loads(mriq(env, "jobs", "list", "--kind", "classify", "--json").stdout)
    assert [j["id"] for j in listed] == [job_id + 1, job_id]
    assert listed[1]["kind"] == "classify" and listed[1]["status"] == "queued"
    assert listed[1]["progress_total"] == 4
    assert listed[1]["model_version_id"] == model_id
    filtered = json.loads(mriq(env, "jobs", "list", "--kind", "train", "--json").stdout)
    assert all(j["kind"] == "train" for j in filtered)
    paged = json.loads(
        mriq(env, "jobs", "list", "--limit", "1", "--offset", "1", "--json").stdout
    )
    assert [j["id"] for j in paged] == [job_id]

    shown = mriq(env, "jobs", "show", str(job_id), "--json")
    assert shown.exit_code == 0
    doc = json.loads(shown.stdout)
    assert doc["id"] == job_id and doc["params"]["top_k"] == 2
    assert doc["predictions"] == 0 and doc["artifacts"] == [] and doc["evaluation"] is None

    table = mriq(env, "jobs", "list")
    assert table.exit_code == 0 and "classify" in table.stdout
    assert mriq(env, "jobs", "show", str(job_id)).exit_code == 0


def test_jobs_cancel_wait_and_not_found(
    env: dict[str, str], root: Path, sessions: sessionmaker[Session]
) -> None:
    (root / "data").mkdir()
    job_id = json.loads(mriq(env, "train", "--data", str(root / "data"), "--json").stdout)["id"]
    result = mriq(env, "jobs", "cancel", str(job_id), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"id": job_id, "status": "cancelled"}
    # Waiting on a finished job needs no worker; not succeeded -> exit 1.
    result = mriq(env, "jobs", "wait", str(job_id), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "cancelled"

    with sessions() as s, s.begin():
        done = repository.create_job(s, kind=JobKind.TRAIN, params={})
        repository.finish_job(s, done.id, JobStatus.SUCCEEDED)
        done_id = int(done.id)
    result = mriq(env, "jobs", "wait", str(done_id))
    assert result.exit_code == 0
    assert "succeeded" in result.stdout

    for args in (["jobs", "show", "424242"], ["jobs", "cancel", "424242"],
                 ["jobs", "wait", "424242"], ["results", "424242"]):
        result = mriq(env, *args)
        assert result.exit_code == 1, args
        assert "job 424242 not found" in result.stderr
        assert "Traceback" not in result.output
