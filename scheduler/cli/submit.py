"""``mriq classify``, ``mriq train`` and ``mriq evaluate``: submit a job through
:mod:`scheduler.submission` (the same code as the API) and print its id or follow it.
"""

from __future__ import annotations

import getpass
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from scheduler import options, submission
from scheduler.cli.app import app, runtime
from scheduler.cli.render import JsonOpt
from scheduler.cli.waiting import WaitOpt, report_submitted


def submitter() -> str:
    try:
        return f"cli:{getpass.getuser()}"[:200]
    except Exception:  # no passwd entry in some containers
        return "cli"


# The explanation modes as Typer choices (``--explain [none|uncertain|all]``).
ExplainChoice = StrEnum(  # type: ignore[misc]  # members from options, not literals
    "ExplainChoice", {mode: mode for mode in options.EXPLAIN_MODES}
)


@app.command()
def classify(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(
        ..., help="Image files, folders (recursive), globs or @list.txt (one path per line)."
    ),
    model: int | None = typer.Option(
        None, "--model", "-m", help="Model version id (default: the production model)."
    ),
    top_k: int = typer.Option(
        3, "--top-k", min=1, max=options.MAX_TOP_K, help="Labels kept per image."
    ),
    review_below: float = typer.Option(
        options.REVIEW_BELOW_DEFAULT, "--review-below", min=0.0, max=1.0,
        help="Predictions less confident than this enter the review queue.",
    ),
    explain: ExplainChoice = typer.Option(
        ExplainChoice("none"), "--explain",
        help="Grad-CAM explanations: none, uncertain (what enters the review queue) or all.",
    ),
    wait: bool = WaitOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Classify images with a model version (a classify job, split into chunks)."""
    rt = runtime(ctx)
    job_id = submission.submit_classify(
        rt.sessions(),
        rt.dispatcher,
        rt.settings,
        inputs,
        model_version_id=model,
        submitter=submitter(),
        top_k=top_k,
        review_below=review_below,
        explain=ExplainChoice(explain).value,
    )
    report_submitted(rt, job_id, wait=wait, as_json=as_json)


def _train_option(name: str, *flags: str) -> Any:
    """A ``mriq train`` option whose default, help and bounds are the job option's
    (:mod:`scheduler.options`, derived from ``core.config.TrainConfig``)."""
    low, high = options.option_bounds(name)
    default = options.option_default(name)
    if name == "labels":
        default = LabelsChoice(default)
    return typer.Option(default, *flags, help=options.option_help(name), min=low, max=high)


# The label spaces as Typer choices (``--labels [15|44]``), named by their values. An
# unknown architecture, by contrast, is refused by submission with the list, as the API
# refuses it, rather than spelling all of them in the usage line.
LabelsChoice = StrEnum(  # type: ignore[misc]  # members from options, not literals
    "LabelsChoice", {choice: choice for choice in options.option_choices("labels")}
)


@app.command()
def train(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="Folder of class folders (Kaggle 44c layout)."),
    arch: str = _train_option("arch"),
    epochs: int = _train_option("epochs"),
    image_size: int = _train_option("image_size", "--image-size"),
    batch_size: int = _train_option("batch_size", "--batch-size"),
    lr: float = _train_option("lr", "--lr"),
    finetune: bool = _train_option("finetune", "--finetune/--no-finetune"),
    weights: str = _train_option("weights"),
    labels: LabelsChoice = _train_option("labels"),
    seed: int = _train_option("seed"),
    device: str | None = _train_option("device"),
    warm_start: bool = _train_option("warm_start", "--warm-start"),
    with_reviews: bool = _train_option("with_reviews", "--with-reviews"),
    reviews_from: int | None = _train_option("reviews_from", "--reviews-from"),
    wait: bool = WaitOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Train a model version on a folder (a train job; the worker registers a candidate)."""
    rt = runtime(ctx)
    chosen = {
        "arch": arch,
        "epochs": epochs,
        "image_size": image_size,
        "batch_size": batch_size,
        "lr": lr,
        "finetune": finetune,
        "weights": weights,
        "labels": labels.value,
        "seed": seed,
        "device": device,
        "warm_start": warm_start,
        "with_reviews": with_reviews,
        "reviews_from": reviews_from,
    }
    job_id = submission.submit_train(
        rt.sessions(), rt.dispatcher, rt.settings, data, chosen, submitter=submitter()
    )
    report_submitted(rt, job_id, wait=wait, as_json=as_json)


@app.command()
def evaluate(
    ctx: typer.Context,
    model: int = typer.Option(..., "--model", "-m", help="Model version id."),
    data: Path = typer.Option(..., "--data", help="Folder of class folders; every image used."),
    wait: bool = WaitOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Evaluate a model version on a labelled folder (an evaluate job)."""
    rt = runtime(ctx)
    job_id = submission.submit_evaluate(
        rt.sessions(),
        rt.dispatcher,
        rt.settings,
        model_version_id=model,
        data_dir=data,
        submitter=submitter(),
    )
    report_submitted(rt, job_id, wait=wait, as_json=as_json)
