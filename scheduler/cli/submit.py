"""``mriq classify``, ``mriq train`` and ``mriq evaluate``: submit a job through
:mod:`scheduler.submission` (the same code as the API) and print its id or follow it.
"""

from __future__ import annotations

import getpass
from enum import StrEnum
from pathlib import Path

import typer

from scheduler import submission
from scheduler.cli.app import app, runtime
from scheduler.cli.render import JsonOpt
from scheduler.cli.waiting import WaitOpt, report_submitted


def submitter() -> str:
    try:
        return f"cli:{getpass.getuser()}"[:200]
    except Exception:  # no passwd entry in some containers
        return "cli"


@app.command()
def classify(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(
        ..., help="Image files, folders (recursive), globs or @list.txt (one path per line)."
    ),
    model: int | None = typer.Option(
        None, "--model", "-m", help="Model version id (default: the production model)."
    ),
    top_k: int = typer.Option(3, "--top-k", min=1, max=44, help="Labels kept per image."),
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
    )
    report_submitted(rt, job_id, wait=wait, as_json=as_json)


class LabelsChoice(StrEnum):
    fifteen = "15"
    fortyfour = "44"


@app.command()
def train(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="Folder of class folders (Kaggle 44c layout)."),
    arch: str = typer.Option(
        "efficientnet_b0", help=f"Architecture: {', '.join(submission.ARCHITECTURES)}."
    ),
    epochs: int = typer.Option(10, min=1),
    image_size: int = typer.Option(224, "--image-size", min=32, max=2048),
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=4096),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate."),
    finetune: bool = typer.Option(
        False, "--finetune/--no-finetune", help="Train only the head of a pretrained backbone."
    ),
    weights: str = typer.Option("auto", help="auto, none, imagenet or a checkpoint path."),
    labels: LabelsChoice = typer.Option(LabelsChoice.fifteen, help="Label space: 15 or 44."),
    seed: int = typer.Option(0, min=0),
    device: str | None = typer.Option(
        None, help="auto, cpu, cuda or cuda:N (default: settings.default_device)."
    ),
    warm_start: bool = typer.Option(
        False, "--warm-start", help="Start from the production model's weights."
    ),
    wait: bool = WaitOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Train a model version on a folder (a train job; the worker registers a candidate)."""
    rt = runtime(ctx)
    options = {
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
    }
    job_id = submission.submit_train(
        rt.sessions(), rt.dispatcher, rt.settings, data, options, submitter=submitter()
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
