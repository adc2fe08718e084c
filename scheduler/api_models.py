"""Request and response models of the HTTP API (:mod:`scheduler.api`), and its bounds.

The one home of these schemas: the routers (:mod:`scheduler.endpoints`) declare them as
``response_model`` and the CLI's ``--json`` output is built from them.

Responses carry ids and download URLs, never server paths: a model's checkpoint file and an
artifact's location on the host are the server's business (``/artifacts/{id}`` serves the
file). Paths a client submitted itself (inputs, ``params.data``) are echoed back as given.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from core.formats import ExportFormat
from scheduler.options import MAX_TOP_K, ExplainMode, TrainOptions
from scheduler.pathtext import PathText
from scheduler.schema import REVIEW_BELOW_DEFAULT, JobKind, JobStatus, ModelStage, ReviewStatus

__all__ = [
    "BODY_BYTES_BASE",
    "BODY_BYTES_PER_PATH",
    "ERROR_RESPONSES",
    "MAX_ID",
    "MAX_PAGE",
    "ArtifactOut",
    "ClassifyRequest",
    "EpochOut",
    "ErrorOut",
    "EvaluateRequest",
    "EvaluationOut",
    "ExplanationRequested",
    "HealthOut",
    "Id",
    "JobCreated",
    "JobIdPath",
    "JobOut",
    "JobPage",
    "MetricsOut",
    "ModelIdPath",
    "ModelOut",
    "PredictionOut",
    "PredictionPage",
    "TrainRequest",
    "printable",
]

# Ids are INTEGER columns: a larger value would overflow in PostgreSQL (a 500), so refuse it.
MAX_ID = 2**31 - 1
# Budget per classify input when bounding the request body (paths average far less).
BODY_BYTES_PER_PATH = 1024
BODY_BYTES_BASE = 64 * 1024
MAX_PAGE = 1000


def printable(value: Any) -> Any:
    """``value`` safe to put in a JSON response: ints stay, text loses lone surrogates."""
    if isinstance(value, int):
        return value
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


Id = Annotated[int, Field(ge=1, le=MAX_ID)]
JobIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="Job id.")]
ModelIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="Model version id.")]


# --------------------------------------------------------------------------------------
# Request / response models
# --------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Request):
    inputs: list[PathText] = Field(
        ...,
        min_length=1,
        description=(
            "Image files, folders (recursive), globs or @list.txt files on the server, inside "
            "the data roots. At most settings.max_paths_per_job entries (413 beyond)."
        ),
    )
    model_version_id: Id | None = Field(None, description="Default: the production model.")
    top_k: int = Field(3, ge=1, le=MAX_TOP_K)
    review_below: float = Field(
        REVIEW_BELOW_DEFAULT, ge=0.0, le=1.0,
        description="Predictions less confident than this enter the review queue.",
    )
    explain: ExplainMode = Field(
        "none",
        description=("Grad-CAM explanations: none, uncertain (exactly the predictions that "
                     "enter the review queue) or all."),
    )


class TrainRequest(TrainOptions):
    """The training options (``scheduler.options``, from ``core.config.TrainConfig``)."""

    data: PathText = Field(..., description="Folder of class folders on the server.")


class EvaluateRequest(_Request):
    model_version_id: Id
    data: PathText = Field(..., description="Folder of class folders; every image is used.")


class ExportRequest(_Request):
    format: ExportFormat = Field(..., description="onnx or torchscript.")


class JobCreated(BaseModel):
    id: int


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: JobKind
    status: JobStatus
    params: dict[str, Any]
    progress_done: int
    progress_total: int
    submitter: str | None
    error: str | None
    cancel_requested: bool
    model_version_id: int | None
    review_below: float | None = Field(
        None, description="Classify jobs: the review queue's confidence threshold."
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobPage(BaseModel):
    items: list[JobOut]
    limit: int
    offset: int
    next_offset: int | None


class PredictionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    item_id: int = Field(validation_alias="id", description="The prediction's id (review item).")
    item_index: int
    path: str
    file_sha256: str | None
    label: str | None
    confidence: float | None
    top_k: list[tuple[str, float]]
    error: str | None
    # Read from no attribute (the row's ``explanation`` is a server path): the endpoint fills
    # it in with the artifact's download URL (:func:`with_explanation`).
    explanation: str | None = Field(
        None, validation_alias="explanation_url",
        description="Download URL of the Grad-CAM explanation (/artifacts/{id}), if any.",
    )

    def with_explanation(self, explanation: str | None) -> PredictionOut:
        """This prediction with its explanation (a URL in the API, a path in the CLI)."""
        return self.model_copy(update={"explanation": explanation})


class ExplanationRequested(BaseModel):
    """The answer to an explanation request: the task is queued; the prediction as it is
    now (``explanation`` set once the worker has written it)."""

    job_id: int
    item_id: int
    item: PredictionOut


class PredictionPage(BaseModel):
    job_id: int
    total: int
    offset: int
    limit: int
    items: list[PredictionOut]


class EpochOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    train_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    val_macro_f1: float | None
    lr: float | None
    seconds: float | None


class EvaluationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    model_version_id: int | None
    dataset: str | None
    accuracy: float | None
    macro_f1: float | None
    report: dict[str, Any]


class MetricsOut(BaseModel):
    job_id: int
    epochs: list[EpochOut]
    evaluation: EvaluationOut | None


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    job_id: int
    model_version_id: int | None
    kind: str
    created_at: datetime
    url: str = Field("", description="Download URL of the file (GET, same authentication).")


class ArtifactCliOut(ArtifactOut):
    """An artifact as the CLI prints it: the CLI runs on the server, so it names the file."""

    path: str


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    id: int
    arch: str
    label_mode: str
    classes: list[str]
    checkpoint_sha256: str
    training_job_id: int | None
    metrics: dict[str, Any]
    stage: ModelStage
    created_at: datetime
    promoted_at: datetime | None
    temperature: float = Field(
        1.0, description="Temperature the reported confidences are scaled with (1.0: raw)."
    )
    calibrated: bool = Field(
        False, description="False for a model trained before calibration (temperature 1.0)."
    )
    ece: float | None = Field(None, description="Test-split ECE after the temperature.")
    ece_uncalibrated: float | None = Field(None, description="Test-split ECE before it.")
    nll: float | None = Field(None, description="Test-split NLL after the temperature.")
    nll_uncalibrated: float | None = Field(None, description="Test-split NLL before it.")
    reviews_used: int | None = Field(
        None, description="Review decisions it was trained on (None: trained without reviews)."
    )
    review_ids: list[int] | None = Field(
        None, description="Ids of those review decisions (None: trained without reviews)."
    )


class ModelCliOut(ModelOut):
    """A model version as the CLI prints it: the CLI runs on the server, so it names the file."""

    checkpoint_path: str


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    database: bool
    broker: bool


class ErrorOut(BaseModel):
    detail: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or wrong bearer token."},
    404: {"model": ErrorOut, "description": "Unknown job, model version or artifact."},
}



# --------------------------------------------------------------------------------------
# Review queue (scheduler/endpoints/review.py)
# --------------------------------------------------------------------------------------

ReviewStatusQuery = Literal["pending", "accepted", "corrected", "all"]
ReviewItemPath = Annotated[int, Path(ge=1, le=2**63 - 1, description="Review item id.")]


class ReviewActionRequest(_Request):
    action: Literal["accept", "correct", "flag"]
    label: str | None = Field(
        None, min_length=1, max_length=100, description="The corrected label (correct only)."
    )
    reviewer: str | None = Field(
        None, min_length=1, max_length=200,
        description="Who decides; ignored when the API has a token (its identity is used).",
    )


# Alike to scheduler.review.ReviewItem by field list only: the wire schema (URL, not path)
# and the domain record change for different reasons.
class ReviewItemOut(BaseModel):
    """A prediction in the review queue. ``path`` is the input path as submitted (as in the
    predictions API); the Grad-CAM explanation is served by ``explanation_url``."""

    item_id: int
    job_id: int
    item_index: int
    path: str
    label: str
    confidence: float | None
    top_k: list[tuple[str, float]]
    entropy: float
    status: ReviewStatus
    flagged: bool
    explanation_url: str | None = Field(None, description="Download URL of the explanation.")
    reviewed_label: str | None
    reviewer: str | None
    decided_at: datetime | None
    review_id: int | None


class ReviewPage(BaseModel):
    items: list[ReviewItemOut]
    limit: int
    next_cursor: str | None = Field(None, description="Pass as ``cursor`` for the next page.")


class ReviewDecisionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    prediction_id: int
    decision: ReviewStatus
    label: str
    reviewer: str
    decided_at: datetime
    superseded: bool


class ReviewItemDetail(BaseModel):
    item: ReviewItemOut
    history: list[ReviewDecisionOut] = Field(description="Every decision, oldest first.")
