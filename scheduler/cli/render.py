"""What the CLI prints: consoles, table cells, number formats and the ``--json`` documents.

Tables go to stdout (``--json`` prints exactly one JSON document instead); progress bars and
notes go to stderr so stdout stays pipeable. JSON documents are the API's response schemas
(:mod:`scheduler.api_models`, imported on first use so a table costs no FastAPI import),
plus the server paths only a CLI running on the server may print.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from scheduler.schema import (
        Artifact,
        EpochMetric,
        EvaluationReport,
        Job,
        ModelVersion,
        PredictionRow,
    )

JsonOpt: bool = typer.Option(False, "--json", help="Print exactly one JSON document on stdout.")


def stderr_console() -> Console:
    # soft_wrap: notes carry long paths that are more useful unbroken than wrapped.
    return Console(stderr=True, soft_wrap=True)


def stdout_console() -> Console:
    # Created per call so test runners that swap sys.stdout capture the output. Piped
    # output gets a wide fixed width instead of Rich's 80 columns, so rows are not folded
    # (COLUMNS still wins when set).
    tty = sys.stdout.isatty()
    return Console(file=sys.stdout, width=None if tty or os.environ.get("COLUMNS") else 160)


def cells(*values: object) -> list[Text]:
    """Table cells as plain Text: paths and errors may contain [brackets] Rich would eat."""
    return [v if isinstance(v, Text) else Text(str(v)) for v in values]


def _plain(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        return isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def print_json(doc: object) -> None:
    sys.stdout.write(json.dumps(doc, default=_plain, indent=2) + "\n")


def fmt_float(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"


def short(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def metric(metrics: dict[str, Any] | None, *keys: str) -> float | None:
    for key in keys:
        if metrics and metrics.get(key) is not None:
            return float(metrics[key])
    return None


def job_doc(job: Job) -> dict[str, Any]:
    from scheduler.api_models import JobOut

    return JobOut.model_validate(job).model_dump(mode="json")


def model_doc(model: ModelVersion) -> dict[str, Any]:
    from scheduler.api_models import ModelCliOut

    return ModelCliOut.model_validate(model).model_dump(mode="json")


def prediction_doc(row: PredictionRow) -> dict[str, Any]:
    from scheduler.api_models import PredictionOut
    from scheduler.export import explanation_cell

    # The export keeps the CSV's columns (export.PREDICTION_COLUMNS): no file hash, no
    # item id, and the explanation as the CSV names it (relative to the job folder).
    out = PredictionOut.model_validate(row).with_explanation(explanation_cell(row) or None)
    return out.model_dump(mode="json", exclude={"file_sha256", "item_id"})


def epoch_doc(row: EpochMetric) -> dict[str, Any]:
    from scheduler.api_models import EpochOut

    return EpochOut.model_validate(row).model_dump(mode="json")


def evaluation_doc(row: EvaluationReport) -> dict[str, Any]:
    from scheduler.api_models import EvaluationOut

    # The full report is the API's /metrics and the report artifact; a summary suffices here.
    return EvaluationOut.model_validate(row).model_dump(mode="json", exclude={"report"})


def artifact_doc(row: Artifact) -> dict[str, Any]:
    from scheduler.api_models import ArtifactCliOut

    # No download URL: the CLI reads the file at ``path``, not through the HTTP API.
    return ArtifactCliOut.model_validate(row).model_dump(mode="json", exclude={"url"})
