"""``--json`` documents are the API's response schemas (plus the CLI's server paths), and the
``--status``/``--kind`` choices are the schema's enums."""

from __future__ import annotations

import json

from sqlalchemy.orm import Session, sessionmaker

from scheduler import export, repository
from scheduler.api_models import ArtifactCliOut, EpochOut, EvaluationOut, JobOut, ModelCliOut
from scheduler.schema import JobKind, JobStatus
from tests.scheduler.cli.runner import make_model, mriq


def test_json_documents_have_the_api_schemas_fields(
    env: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    model_id = make_model(sessions)
    with sessions() as s, s.begin():
        job_id = int(repository.get_model_version(s, model_id).training_job_id or 0)
        repository.record_epoch_metric(s, job_id, epoch=1, train_loss=1.0, val_loss=0.5,
                                       val_accuracy=0.6, val_macro_f1=0.5, lr=1e-3, seconds=2.0)
        repository.record_evaluation(s, job_id=job_id, model_version_id=model_id,
                                     dataset="test", report={"accuracy": 0.6, "macro_f1": 0.5})
        repository.record_artifact(s, job_id=job_id, kind="report", path="/m/report.json",
                                   model_version_id=model_id)

    doc = json.loads(mriq(env, "jobs", "show", str(job_id), "--json").stdout)
    assert set(doc) == set(JobOut.model_fields) | {"epochs", "evaluation", "artifacts"}
    assert doc["status"] == "queued" and doc["created_at"]
    assert [set(e) for e in doc["epochs"]] == [set(EpochOut.model_fields)]
    assert set(doc["evaluation"]) == set(EvaluationOut.model_fields) - {"report"}
    assert doc["evaluation"]["accuracy"] == 0.6
    # The CLI runs on the server: it names the artifact's file (the API gives a URL instead).
    (artifact,) = doc["artifacts"]
    assert set(artifact) == set(ArtifactCliOut.model_fields) - {"url"}
    assert artifact["path"] == "/m/report.json" and artifact["kind"] == "report"

    listed = json.loads(mriq(env, "jobs", "list", "--json").stdout)
    assert [set(j) for j in listed] == [set(JobOut.model_fields)]
    (model,) = json.loads(mriq(env, "models", "list", "--json").stdout)
    assert set(model) == set(ModelCliOut.model_fields)
    assert model["checkpoint_path"] == "/m/best.pt" and model["stage"] == "candidate"


def test_prediction_json_keeps_the_csv_columns(
    env: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    with sessions() as s, s.begin():
        job_id = int(repository.create_job(s, kind=JobKind.CLASSIFY, params={}).id)
        repository.add_job_items(s, job_id, ["/x/a.png"], chunk_size=2)
        repository.record_predictions(s, job_id, [repository.PredictionRecord(
            item_index=0, path="/x/a.png", file_sha256="b" * 64, label="Normal",
            confidence=0.7, top_k=(("Normal", 0.7), ("Glioma", 0.3)), error=None)])
    (row,) = json.loads(mriq(env, "results", str(job_id), "--format", "json").stdout)
    assert list(row) == list(export.PREDICTION_COLUMNS)
    assert row["top_k"] == [["Normal", 0.7], ["Glioma", 0.3]]


def test_jobs_list_choices_are_the_schema_enums(
    env: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    shown = mriq(env, "jobs", "list", "--help").stdout
    for value in [*JobStatus, *JobKind]:
        assert value.value in shown, value
    refused = mriq(env, "jobs", "list", "--status", "finished")
    assert refused.exit_code == 2 and "finished" in refused.output
    for status in JobStatus:
        result = mriq(env, "jobs", "list", "--status", status.value, "--json")
        assert result.exit_code == 0 and json.loads(result.stdout) == []
