"""``mriq models export ID --format ...``: the task sent, the refusals, ``models show``."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.dispatch import EXPORT_TASK
from tests.scheduler.api_factories import sent_tasks
from tests.scheduler.cli.runner import make_model, mriq


def test_models_export_sends_the_task_and_show_lists_exports(
    env: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    model_id = make_model(sessions)
    result = mriq(env, "models", "export", str(model_id), "--format", "torchscript", "--json")
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.stdout)["id"]
    assert sent_tasks(Path(env["MRIQ_DATA_DIR"])) == [(EXPORT_TASK, [job_id])]
    bad = mriq(env, "models", "export", str(model_id), "--format", "tflite")
    assert bad.exit_code == 2 and "format must be one of onnx, torchscript" in bad.stderr
    assert mriq(env, "models", "export", "999999", "--format", "onnx").exit_code == 1
    assert len(sent_tasks(Path(env["MRIQ_DATA_DIR"]))) == 1
    # What the worker records once the file is verified, as models show lists it.
    with sessions() as s, s.begin():
        repository.record_artifact(s, job_id=job_id, kind=repository.EXPORT_ARTIFACT,
                                   path="/m/model-1.torchscript.pt", model_version_id=model_id)
    shown = mriq(env, "models", "show", str(model_id), "--json")
    assert json.loads(shown.stdout)["exports"] == ["/m/model-1.torchscript.pt"]
