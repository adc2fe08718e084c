"""The ``mriq`` CLI against a real SQLite database and the embedded filesystem broker.

Rows are created through the repository (as workers would), commands run through Typer's
CliRunner (and once through a real subprocess). No worker runs here: ``--wait`` is exercised
on jobs that are already finished, so no embedded worker is started.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from scheduler import cli, repository
from scheduler.cli import services
from scheduler.database import make_engine, make_session_factory, upgrade
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind, JobStatus

runner = CliRunner()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def env(
    tmp_path: Path, root: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    # Run from tmp so no ./.env of the developer leaks into the settings.
    monkeypatch.chdir(tmp_path)
    return {
        "MRIQ_DATA_DIR": str(tmp_path / "state"),
        "MRIQ_DATABASE_URL": sqlite_url,
        "MRIQ_DATA_ROOTS": str(root),
        "MRIQ_CHUNK_SIZE": "2",
    }


@pytest.fixture
def sessions(env: dict[str, str]) -> Iterator[sessionmaker[Session]]:
    upgrade(env["MRIQ_DATABASE_URL"])
    engine = make_engine(env["MRIQ_DATABASE_URL"])
    yield make_session_factory(engine)
    engine.dispose()


def mriq(env: dict[str, str], *args: str) -> Any:
    return runner.invoke(cli.app, list(args), env=env)


def _model(sessions: sessionmaker[Session], *, promote: bool = False, acc: float = 0.5) -> int:
    with sessions() as s, s.begin():
        train = repository.create_job(s, kind=JobKind.TRAIN, params={"data": "/d"})
        version = repository.register_model_version(
            s, training_job_id=train.id, arch="resnet18", label_mode="15",
            classes=["Glioblastoma", "Normal"], checkpoint_path="/m/best.pt",
            checkpoint_sha256="a" * 64, metrics={"accuracy": acc, "macro_f1": acc / 2},
        )
        if promote:
            repository.promote_model_version(s, version.id)
        return int(version.id)


def _image(root: Path, name: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not really an image")
    return path


# ----------------------------------------------------------------------------- help & errors


def test_help_texts() -> None:
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0
    for command in ("classify", "train", "evaluate", "jobs", "results", "models", "worker",
                    "api", "flower", "db", "demo"):
        assert command in result.stdout
    expectations = {
        ("classify",): ["--model", "--top-k", "--wait", "--json", "@list.txt"],
        ("train",): ["--data", "--arch", "--epochs", "--image-size", "--batch-size", "--lr",
                     "--finetune", "--weights", "--labels", "--seed", "--device",
                     "--warm-start", "--wait"],
        ("evaluate",): ["--model", "--data", "--wait"],
        ("jobs",): ["list", "show", "cancel", "wait"],
        ("results",): ["--format", "--out"],
        ("models",): ["list", "show", "promote", "rollback"],
        ("worker",): ["--queues", "--concurrency"],
        ("api",): ["--host", "--port"],
        ("flower",): ["--port"],
        ("db",): ["upgrade"],
        ("demo",): ["--epochs", "--json"],
    }
    for args, words in expectations.items():
        result = runner.invoke(cli.app, [*args, "--help"])
        assert result.exit_code == 0, result.output
        for word in words:
            assert word in result.stdout, (args, word)


def test_unmigrated_database_stops_with_message(env: dict[str, str]) -> None:
    for args in (["jobs", "list"], ["models", "list", "--json"], ["classify", "x.png"],
                 ["worker"], ["api"]):
        result = mriq(env, *args)
        assert result.exit_code == 1, (args, result.output)
        assert "mriq db upgrade" in result.stderr
        assert "Traceback" not in result.output
        assert result.stdout == ""


def test_unmigrated_database_via_subprocess(env: dict[str, str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler", "jobs", "list"],
        env={**_base_env(), **env}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "not migrated" in proc.stderr and "mriq db upgrade" in proc.stderr
    assert "Traceback" not in proc.stderr


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MRIQ_")}


def test_db_upgrade_then_empty_lists(env: dict[str, str]) -> None:
    result = mriq(env, "db", "upgrade")
    assert result.exit_code == 0, result.output
    assert "up to date" in result.stderr
    for args in (["jobs", "list", "--json"], ["models", "list", "--json"]):
        result = mriq(env, *args)
        assert result.exit_code == 0
        assert json.loads(result.stdout) == []


def test_invalid_settings_exit_2(env: dict[str, str]) -> None:
    result = mriq({**env, "MRIQ_CHUNK_SIZE": "0"}, "jobs", "list")
    assert result.exit_code == 2
    assert "invalid MRIQ_* settings" in result.stderr


# ----------------------------------------------------------------------------- submit & jobs


def test_classify_json_and_jobs_list_show(
    env: dict[str, str], root: Path, sessions: sessionmaker[Session]
) -> None:
    model_id = _model(sessions, promote=True)
    for i in range(3):
        _image(root, f"imgs/{i}.png")
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


def test_classify_refusals(env: dict[str, str], root: Path, tmp_path: Path,
                           sessions: sessionmaker[Session]) -> None:
    _model(sessions, promote=True)
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"x")
    result = mriq(env, "classify", str(outside))
    assert result.exit_code == 2
    assert "outside the allowed data roots" in result.stderr
    result = mriq(env, "classify", str(root / "x.png"), "--model", "999")
    assert result.exit_code == 1 and "model version 999 not found" in result.stderr
    result = mriq({**env, "MRIQ_MAX_PATHS_PER_JOB": "1"}, "classify", str(root / "a.png"),
                  str(root / "b.png"))
    assert result.exit_code == 2 and "too many inputs" in result.stderr
    assert json.loads(mriq(env, "jobs", "list", "--json").stdout)[0]["kind"] == "train"


def test_train_and_evaluate_submission(
    env: dict[str, str], root: Path, sessions: sessionmaker[Session]
) -> None:
    (root / "data").mkdir()
    result = mriq(env, "train", "--data", str(root / "data"), "--arch", "resnet18",
                  "--epochs", "2", "--image-size", "64", "--labels", "44", "--json")
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.stdout)["id"]
    doc = json.loads(mriq(env, "jobs", "show", str(job_id), "--json").stdout)
    assert doc["kind"] == "train"
    assert doc["params"]["arch"] == "resnet18" and doc["params"]["labels"] == "44"

    bad = mriq(env, "train", "--data", str(root / "data"), "--arch", "vgg")
    assert bad.exit_code == 2 and "arch" in bad.stderr
    bad = mriq(env, "train", "--data", str(root / "data"), "--labels", "12")
    assert bad.exit_code == 2  # Typer's own choice validation

    model_id = _model(sessions)
    result = mriq(env, "evaluate", "--model", str(model_id), "--data", str(root / "data"),
                  "--json")
    assert result.exit_code == 0, result.output
    eval_id = json.loads(result.stdout)["id"]
    assert json.loads(mriq(env, "jobs", "show", str(eval_id), "--json").stdout)["kind"] == (
        "evaluate"
    )


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


# ----------------------------------------------------------------------------- results


def _classified_job(env: dict[str, str], root: Path, sessions: sessionmaker[Session]) -> int:
    _model(sessions, promote=True)
    for i in range(5):
        _image(root, f"in/{i}, odd \"name\".png")
    job_id = json.loads(mriq(env, "classify", str(root / "in"), "--json").stdout)["id"]
    with sessions() as s, s.begin():
        items = list(repository.iter_job_items(s, job_id))
        records = [
            PredictionRecord(
                item_index=i, path=p, file_sha256="b" * 64, label="Normal",
                confidence=0.75 + i / 100,
                top_k=(("Normal", 0.75 + i / 100), ("Glioblastoma", 0.1)),
            )
            for i, p in items[:4]
        ]
        records.append(PredictionRecord(item_index=items[4][0], path=items[4][1],
                                        file_sha256=None, label=None, confidence=None,
                                        error=f"{items[4][1]}: cannot identify image file"))
        # Out of order on purpose: the export must follow item_index.
        repository.record_predictions(s, job_id, list(reversed(records)))
    return job_id


def test_results_csv_equals_database_rows(
    env: dict[str, str], root: Path, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = _classified_job(env, root, sessions)
    result = mriq(env, "results", str(job_id))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    with sessions() as s:
        db_rows = repository.list_predictions(s, job_id)
    assert list(rows[0]) == ["item_index", "path", "label", "confidence", "top_k", "error"]
    assert len(rows) == len(db_rows) == 5
    for got, want in zip(rows, db_rows, strict=True):
        assert int(got["item_index"]) == want.item_index
        assert got["path"] == want.path
        assert (got["label"] or None) == want.label
        assert (float(got["confidence"]) if got["confidence"] else None) == want.confidence
        assert json.loads(got["top_k"]) == [list(p) for p in want.top_k]
        assert (got["error"] or None) == want.error

    as_json = mriq(env, "results", str(job_id), "--format", "json")
    assert as_json.exit_code == 0
    docs = json.loads(as_json.stdout)
    assert [d["item_index"] for d in docs] == [r.item_index for r in db_rows]
    assert docs[4]["error"] and docs[4]["label"] is None

    out = tmp_path / "export.csv"
    result = mriq(env, "results", str(job_id), "--out", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    assert out.read_text("utf-8") == mriq(env, "results", str(job_id)).stdout


def test_results_of_a_train_job_is_an_error(
    env: dict[str, str], root: Path, sessions: sessionmaker[Session]
) -> None:
    with sessions() as s, s.begin():
        job_id = int(repository.create_job(s, kind=JobKind.TRAIN, params={}).id)
    result = mriq(env, "results", str(job_id))
    assert result.exit_code == 1 and "only classify jobs" in result.stderr


# ----------------------------------------------------------------------------- models


def test_models_list_show_promote_rollback(
    env: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    first = _model(sessions, acc=0.6)
    second = _model(sessions, acc=0.8)
    listed = json.loads(mriq(env, "models", "list", "--json").stdout)
    assert [m["id"] for m in listed] == [second, first]
    assert {m["stage"] for m in listed} == {"candidate"}

    result = mriq(env, "models", "promote", str(first), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["stage"] == "production"
    result = mriq(env, "models", "promote", str(second))
    assert result.exit_code == 0 and f"model version {second} is now production" in result.stdout
    stages = {m["id"]: m["stage"] for m in json.loads(mriq(env, "models", "list", "--json").stdout)}
    assert stages == {first: "archived", second: "production"}

    result = mriq(env, "models", "rollback", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["id"] == first
    shown = json.loads(mriq(env, "models", "show", str(first), "--json").stdout)
    assert shown["stage"] == "production" and shown["metrics"]["accuracy"] == 0.6

    table = mriq(env, "models", "list")
    assert table.exit_code == 0 and "resnet18" in table.stdout and "0.600" in table.stdout
    assert mriq(env, "models", "show", str(first)).exit_code == 0

    missing = mriq(env, "models", "promote", "999")
    assert missing.exit_code == 1 and "model version 999 not found" in missing.stderr
    mriq(env, "models", "rollback")  # back to second
    result = mriq(env, "models", "rollback")
    assert result.exit_code in (0, 1)
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- services


def test_worker_and_flower_exec(
    env: dict[str, str], sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[list[str], dict[str, str]]] = []

    def fake_exec(path: str, argv: list[str], environ: dict[str, str]) -> None:
        calls.append((list(argv), dict(environ)))

    monkeypatch.setattr(services, "replace_process", fake_exec)
    result = mriq(env, "worker", "--queues", "gpu", "--concurrency", "2")
    assert result.exit_code == 0, result.output
    argv = calls[-1][0]
    assert argv[1:3] == ["-m", "worker"]
    assert argv[3:] == ["--queues", "gpu", "--concurrency", "2", "--pool", "threads"]
    assert mriq(env, "worker", "--pool", "solo", "--concurrency", "2").exit_code == 2

    result = mriq({**env, "MRIQ_FLOWER_BASIC_AUTH": "admin:s3cret"}, "flower", "--port", "5600")
    assert result.exit_code == 0, result.output
    argv, environ = calls[-1]
    assert argv[1:] == ["-m", "celery", "-A", "worker.app", "flower", "--port=5600",
                        "--address=127.0.0.1"]
    assert environ["FLOWER_BASIC_AUTH"] == "admin:s3cret"
    assert "FLOWER_UNAUTHENTICATED_API" not in environ
    assert "s3cret" not in " ".join(argv)  # credentials never on the command line

    result = mriq({**env, "FLOWER_UNAUTHENTICATED_API": ""}, "flower")
    assert result.exit_code == 0
    assert calls[-1][1]["FLOWER_UNAUTHENTICATED_API"] == "true"
    assert "FLOWER_BASIC_AUTH" not in calls[-1][1] or not calls[-1][1]["FLOWER_BASIC_AUTH"]
    assert "without authentication" in result.stderr


# ----------------------------------------------------------------------------- api


@pytest.mark.parametrize(
    ("args", "extra_env"),
    [
        (["--host", "0.0.0.0"], {}),
        (["--host", "::"], {}),
        (["--host", "192.0.2.10"], {}),
        (["--host", "api.example.org"], {}),
        ([], {"MRIQ_API_HOST": "0.0.0.0"}),
    ],
)
def test_api_refuses_non_loopback_without_token(
    env: dict[str, str], sessions: sessionmaker[Session], args: list[str],
    extra_env: dict[str, str],
) -> None:
    result = mriq({**env, **extra_env}, "api", *args)
    assert result.exit_code == 2, result.output
    assert "without a token" in result.stderr and "--insecure" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert services.is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.org", "127.0.0.1.nip.io", ""):
        assert not services.is_loopback(host), host


@pytest.mark.slow
def test_api_serves_non_loopback_with_token_or_insecure(
    env: dict[str, str], sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The refusal is only for the tokenless case: with a token, or with --insecure (and
    a warning), ``mriq api --host 0.0.0.0`` starts and serves."""
    import httpx

    from tests.scheduler.apiproc import running_api

    with running_api({**env, "MRIQ_API_TOKEN": "tok-cli"}, tmp_path, "--host", "0.0.0.0") as api:
        assert httpx.get(api.url + "/jobs", timeout=10).status_code == 401
        ok = httpx.get(api.url + "/jobs", headers={"Authorization": "Bearer tok-cli"}, timeout=10)
        assert ok.status_code == 200
    with running_api(env, tmp_path, "--host", "0.0.0.0", "--insecure") as api:
        assert httpx.get(api.url + "/jobs", timeout=10).status_code == 200
        assert "without a token (--insecure)" in api.log()


def test_models_show_json_has_calibration_fields(
    env: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    old = _model(sessions)  # registered without calibration: trained before it existed
    with sessions() as s, s.begin():
        train = repository.create_job(s, kind=JobKind.TRAIN, params={"data": "/d"})
        new = int(repository.register_model_version(
            s, training_job_id=train.id, arch="resnet18", label_mode="15",
            classes=["Glioblastoma", "Normal"], checkpoint_path="/m/b.pt",
            checkpoint_sha256="b" * 64, metrics={},
            calibration={"temperature": 1.7, "calibrated": True, "ece": 0.02,
                         "ece_uncalibrated": 0.09, "nll": 0.4, "nll_uncalibrated": 0.6},
        ).id)
    shown = json.loads(mriq(env, "models", "show", str(new), "--json").stdout)
    assert {k: shown[k] for k in ("temperature", "calibrated", "ece", "ece_uncalibrated",
                                  "nll", "nll_uncalibrated")} == {
        "temperature": 1.7, "calibrated": True, "ece": 0.02, "ece_uncalibrated": 0.09,
        "nll": 0.4, "nll_uncalibrated": 0.6,
    }
    legacy = json.loads(mriq(env, "models", "show", str(old), "--json").stdout)
    assert legacy["temperature"] == 1.0 and legacy["calibrated"] is False
    assert legacy["ece"] is None and legacy["nll"] is None
    table = mriq(env, "models", "show", str(new))
    assert table.exit_code == 0 and "temperature" in table.stdout
