"""``python -m core.evaluate``: score a checkpoint on every labelled image under a folder.

The folder is scanned with :func:`core.dataset.scan_folder` in the checkpoint's label mode
(no split: every image counts) and evaluated with the checkpoint's deterministic eval preset.
With ``--json`` stdout carries exactly one JSON object (the report plus checkpoint/data
fields); otherwise a readable summary. Progress, warnings and errors go to stderr only.
``--out DIR`` writes ``report.json``, ``confusion_matrix.png`` and the plots of
:mod:`core.plots` (reliability diagram, per-class bars, ROC curves, confident mistakes).
Confidences use the checkpoint's temperature; ECE/NLL/Brier are reported before and after.

Exit status: 0 success, 1 bad checkpoint/data/device, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.atomicio import write_text_atomically
from core.cliargs import (
    add_runtime_arguments,
    add_sha256_argument,
    check_at_least,
    checkpoint_parser,
)

if TYPE_CHECKING:
    import torch

    from core.checkpoint import LoadedCheckpoint
    from core.dataset import Sample
    from core.evaluation import EvalOutputs, EvalReport

MAX_ERRORS_SHOWN = 20


def build_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(
        "core.evaluate",
        "Evaluate a trained checkpoint on every image of a labelled folder "
        "(class folders as for training; train/val/test subfolders are all included).",
    )
    parser.add_argument("--data", required=True, type=Path, help="folder of class folders")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="write report.json, confusion_matrix.png and the other plots here"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as one JSON object on stdout"
    )
    add_runtime_arguments(parser)
    add_sha256_argument(parser)
    parser.add_argument(
        "--skip-unknown", action="store_true", help="skip folders that name no known class"
    )
    parser.add_argument(
        "--labels-from-checkpoint",
        action="store_true",
        help="score only images whose class is in the checkpoint's class list and skip the "
        "rest (for checkpoints trained on a subset of classes). Without it, an image of a "
        "class the checkpoint cannot predict is an error. The label mode (15/44) always "
        "comes from the checkpoint.",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def remap_to_checkpoint(
    samples: Sequence[Sample], mode: str, ckpt_classes: Sequence[str], *, drop_unknown: bool
) -> tuple[list[Sample], dict[str, int]]:
    """Re-index sample labels by class *name* into the checkpoint's class list.

    ``scan_folder`` labels index ``classes_for(mode)``; a checkpoint may order or subset its
    classes differently, and indexing by position would then silently score wrong labels.
    Returns the kept samples and a count of dropped samples per class name. Raises
    ``ValueError`` for unknown classes unless ``drop_unknown``.
    """
    from dataclasses import replace

    from core.labels import classes_for

    names = classes_for(mode)
    index = {name: i for i, name in enumerate(ckpt_classes)}
    kept: list[Sample] = []
    dropped: dict[str, int] = {}
    for s in samples:
        name = names[s.label]
        if name in index:
            kept.append(s if index[name] == s.label else replace(s, label=index[name]))
        else:
            dropped[name] = dropped.get(name, 0) + 1
    if dropped and not drop_unknown:
        listed = ", ".join(f"{n} ({c})" for n, c in sorted(dropped.items()))
        raise ValueError(
            f"the data holds classes the checkpoint does not predict: {listed}; "
            "use --labels-from-checkpoint to score only the checkpoint's classes"
        )
    return kept, dropped


def _calibration_line(report: EvalReport) -> str:
    if report.ece is None or report.ece_uncalibrated is None:
        return "calibration   n/a"
    if not report.calibrated:
        return f"calibration   none (temperature 1.0)   ECE {report.ece:.4f}"
    return (
        f"calibration   temperature {report.temperature:.3f}   ECE "
        f"{report.ece_uncalibrated:.4f} -> {report.ece:.4f}   NLL "
        f"{report.nll_uncalibrated:.4f} -> {report.nll:.4f}"
    )


def format_summary(report: EvalReport) -> str:
    """A fixed-width table for terminals."""
    width = max([len("class"), *(len(c) for c in report.classes)])
    auc = "n/a" if report.roc_auc_ovr_macro is None else f"{report.roc_auc_ovr_macro:.4f}"
    lines = [
        f"images        {report.n}   (unreadable: {len(report.errors)})",
        f"accuracy      {report.accuracy:.4f}      top-3 accuracy  {report.top3_accuracy:.4f}",
        f"macro    P/R/F1  {report.macro_precision:.4f} / {report.macro_recall:.4f} / "
        f"{report.macro_f1:.4f}",
        f"weighted P/R/F1  {report.weighted_precision:.4f} / {report.weighted_recall:.4f} / "
        f"{report.weighted_f1:.4f}",
        f"ROC-AUC (one-vs-rest, macro)  {auc}",
        _calibration_line(report),
        "",
        f"{'class':<{width}}  precision  recall     f1  support  roc_auc",
    ]
    for cm, roc in zip(report.per_class, report.roc_auc_per_class, strict=True):
        roc_text = "    n/a" if roc is None else f"{roc:7.4f}"
        lines.append(
            f"{cm.name:<{width}}  {cm.precision:9.4f}  {cm.recall:6.4f}  {cm.f1:.4f}  "
            f"{cm.support:7d}  {roc_text}"
        )
    if report.errors:
        lines += ["", f"unreadable files ({len(report.errors)}, excluded from the metrics):"]
        lines += [f"  {p}: {r}" for p, r in report.errors[:MAX_ERRORS_SHOWN]]
        if len(report.errors) > MAX_ERRORS_SHOWN:
            lines.append(f"  ... and {len(report.errors) - MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    # Atomic so a concurrent reader never sees a truncated report.
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_at_least(parser, "--batch-size", args.batch_size, 1)
    check_at_least(parser, "--num-workers", args.num_workers, 0)
    loaded = _load(args)
    if loaded is None:
        return 1
    ckpt, device, samples = loaded
    outputs = _evaluate(args, ckpt, device, samples)
    if outputs is None:
        return 130
    _write_report(args, ckpt, outputs)
    return 0


def _load(
    args: argparse.Namespace,
) -> tuple[LoadedCheckpoint, torch.device, list[Sample]] | None:
    """The checkpoint, its device and the samples to score (None after an error message)."""
    # Heavy imports after argument parsing so --help and usage errors answer instantly.
    from core.checkpoint import CheckpointError, load_checkpoint
    from core.dataset import scan_folder
    from core.devices import DeviceUnavailableError, select_device
    from core.labels import UnknownFolderError

    err = sys.stderr

    def warn(message: str) -> None:
        print(f"warning: {message}", file=err)

    try:
        device = select_device(args.device)
        ckpt = load_checkpoint(args.checkpoint, expected_sha256=args.sha256, device=device)
        mode = ckpt.meta.label_mode
        samples = scan_folder(
            args.data, mode=mode, skip_unknown=args.skip_unknown, on_warning=warn
        )
        samples, dropped = remap_to_checkpoint(
            samples, mode, ckpt.meta.classes, drop_unknown=args.labels_from_checkpoint
        )
    except (CheckpointError, DeviceUnavailableError, UnknownFolderError) as exc:
        print(f"error: {exc}", file=err)
        return None
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return None
    for name, count in sorted(dropped.items()):
        warn(f"skipped {count} image(s) of {name!r}: not a class of this checkpoint")
    if not samples:
        print("error: no images left to evaluate", file=err)
        return None
    return ckpt, device, samples


def _evaluate(
    args: argparse.Namespace,
    ckpt: LoadedCheckpoint,
    device: torch.device,
    samples: list[Sample],
) -> EvalOutputs | None:
    """The outputs with a progress bar (None when interrupted)."""
    from tqdm import tqdm

    from core.evaluation import evaluate_checkpoint_outputs

    err = sys.stderr
    try:
        with tqdm(
            total=len(samples), desc="evaluate", unit="img", file=err,
            disable=args.no_progress, leave=False,
        ) as bar:

            def advance(done: int, total: int) -> None:
                bar.update(done - bar.n)

            return evaluate_checkpoint_outputs(
                ckpt, samples, batch_size=args.batch_size, device=device,
                num_workers=args.num_workers, on_batch=advance,
            )
    except KeyboardInterrupt:
        print("interrupted", file=err)
        return None


def _write_report(args: argparse.Namespace, ckpt: LoadedCheckpoint, outputs: EvalOutputs) -> None:
    """report.json and the plots under --out, then the JSON or the table on stdout."""
    from core.plots import plot_confusion_matrix, write_evaluation_plots

    report = outputs.report
    payload: dict[str, Any] = {
        **report.to_dict(),
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": ckpt.sha256,
        "arch": ckpt.meta.arch,
        "label_mode": ckpt.meta.label_mode,
        "data": str(args.data),
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        _write_json(args.out / "report.json", payload)
        plot_confusion_matrix(report, args.out / "confusion_matrix.png")
        plots = write_evaluation_plots(outputs, args.out)
        names = ", ".join(p.name for p in plots.values())
        print(f"wrote {args.out / 'report.json'}, confusion_matrix.png, {names}", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        print(f"checkpoint    {args.checkpoint} ({ckpt.meta.arch}, sha256 {ckpt.sha256[:12]})")
        print(f"data          {args.data}")
        print(format_summary(report))


if __name__ == "__main__":
    sys.exit(main())
