"""``mriq classify``, ``train`` and ``evaluate``: submission and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from scheduler import options
from tests.scheduler.cli.runner import make_model, mriq


def test_classify_refusals(env: dict[str, str], root: Path, tmp_path: Path,
                           sessions: sessionmaker[Session]) -> None:
    make_model(sessions, promote=True)
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

    model_id = make_model(sessions)
    result = mriq(env, "evaluate", "--model", str(model_id), "--data", str(root / "data"),
                  "--json")
    assert result.exit_code == 0, result.output
    eval_id = json.loads(result.stdout)["id"]
    assert json.loads(mriq(env, "jobs", "show", str(eval_id), "--json").stdout)["kind"] == (
        "evaluate"
    )


def test_train_options_come_from_the_job_options(
    env: dict[str, str], root: Path, sessions: sessionmaker[Session]
) -> None:
    """Defaults, help and bounds of ``mriq train`` are scheduler.options' (TrainConfig's)."""
    shown = mriq(env, "train", "--help")
    assert shown.exit_code == 0
    flat = " ".join(shown.stdout.split())  # Rich wraps long help lines
    for name in ("epochs", "image_size", "batch_size", "seed"):
        assert " ".join(options.option_help(name).split()) in flat, name
    assert "--labels <15|44>" in flat
    (root / "data").mkdir()
    high = int(options.option_bounds("epochs")[1] or 0)
    refused = mriq(env, "train", "--data", str(root / "data"), "--epochs", str(high + 1))
    assert refused.exit_code == 2 and "--epochs" in refused.output
    refused = mriq(env, "train", "--data", str(root / "data"), "--labels", "16")
    assert refused.exit_code == 2 and "--labels" in refused.output

    job_id = json.loads(mriq(env, "train", "--data", str(root / "data"), "--json").stdout)["id"]
    params = json.loads(mriq(env, "jobs", "show", str(job_id), "--json").stdout)["params"]
    for name in ("arch", "epochs", "image_size", "batch_size", "lr", "labels", "seed"):
        assert params[name] == options.option_default(name), name


def test_classify_review_options(env: dict[str, str], root: Path,
                                 sessions: sessionmaker[Session]) -> None:
    make_model(sessions, promote=True)
    (root / "a.png").write_bytes(b"x")
    result = mriq(env, "classify", str(root), "--review-below", "0.4", "--explain", "uncertain",
                  "--json")
    assert result.exit_code == 0, result.output
    job = json.loads(mriq(env, "jobs", "show", str(json.loads(result.stdout)["id"]),
                          "--json").stdout)
    assert job["review_below"] == 0.4 and job["params"]["explain"] == "uncertain"
    bad = mriq(env, "classify", str(root), "--review-below", "1.5")
    assert bad.exit_code == 2 and "--review-below" in bad.output
    bad = mriq(env, "classify", str(root), "--explain", "some")
    assert bad.exit_code == 2 and "--explain" in bad.output


def test_train_with_reviews(env: dict[str, str], root: Path,
                            sessions: sessionmaker[Session]) -> None:
    (root / "data").mkdir()
    result = mriq(env, "train", "--data", str(root / "data"), "--with-reviews", "--json")
    assert result.exit_code == 0, result.output
    train_id = json.loads(result.stdout)["id"]
    params = json.loads(mriq(env, "jobs", "show", str(train_id), "--json").stdout)["params"]
    assert params["with_reviews"] is True and params["reviews_from"] is None
    bad = mriq(env, "train", "--data", str(root / "data"), "--reviews-from", str(train_id))
    assert bad.exit_code == 2
    assert f"reviews_from: job {train_id} is a train job, not a classify job" in bad.stderr
