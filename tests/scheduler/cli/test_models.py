"""``mriq models list|show|promote|rollback``."""

from __future__ import annotations

import json

from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.schema import JobKind
from tests.scheduler.cli.runner import make_model, mriq


def test_models_list_show_promote_rollback(
    env: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    first = make_model(sessions, acc=0.6)
    second = make_model(sessions, acc=0.8)
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


def test_models_show_json_has_calibration_fields(
    env: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    old = make_model(sessions)  # registered without calibration: trained before it existed
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


def test_models_show_prints_the_review_lineage(
    env: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    from scheduler import review

    model_id = make_model(sessions)
    with sessions() as s, s.begin():
        review.record_lineage(s, model_id, review_ids=[3, 1])
    doc = json.loads(mriq(env, "models", "show", str(model_id), "--json").stdout)
    assert doc["reviews_used"] == 2 and doc["review_ids"] == [1, 3]
    table = mriq(env, "models", "show", str(model_id)).stdout
    assert "reviews_used" in table and "[1, 3]" in table
    plain = json.loads(mriq(env, "models", "show", str(make_model(sessions)), "--json").stdout)
    assert plain["reviews_used"] is None and plain["review_ids"] is None
