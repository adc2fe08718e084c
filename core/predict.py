"""``python -m core.predict``: classify image files with a checkpoint and write a CSV.

Inputs are files, folders (recursive), globs and ``@list.txt`` files, expanded by
:mod:`core.inputs` (the rules the scheduler's submission uses); they are expanded and
classified as a stream, and each row is written as soon as its batch is done, so any number
of files runs in flat memory and an interrupted run keeps the rows written so far.
Columns: ``path,label,confidence,top_k,error`` with ``top_k`` as ``label:prob;label:prob``.
Progress and the final summary go to stderr; stdout carries the CSV when ``--out`` is absent.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from core.cliargs import (
    add_runtime_arguments,
    add_sha256_argument,
    check_at_least,
    checkpoint_parser,
)

if TYPE_CHECKING:  # torch: only once a run starts
    from core.inference import Predictor

CSV_COLUMNS: tuple[str, ...] = ("path", "label", "confidence", "top_k", "error")


def build_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(
        "core.predict",
        "Classify brain MRI slices with a trained checkpoint; writes one CSV row "
        "per input (unreadable files get an error row).",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image file, folder (searched recursively), glob or @list.txt (one path per line)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="CSV file to write (default: stdout)"
    )
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per row (3)")
    add_runtime_arguments(parser)
    parser.add_argument(
        "--streams",
        default="auto",
        help="batches run through the model at once on CPU, each on its share of the cores "
        "(auto: one per 4 cores, at most 4; 1 = one batch on all cores); ignored on CUDA",
    )
    add_sha256_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def format_row(pred: object) -> list[str]:
    """CSV cells for a :class:`core.inference.Prediction` (probabilities with 6 decimals)."""
    from core.inference import Prediction

    assert isinstance(pred, Prediction)
    return [
        pred.path,
        pred.label or "",
        "" if pred.confidence is None else f"{pred.confidence:.6f}",
        ";".join(f"{label}:{prob:.6f}" for label, prob in pred.top_k),
        pred.error or "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_at_least(parser, "--top-k", args.top_k, 1)
    check_at_least(parser, "--batch-size", args.batch_size, 1)
    check_at_least(parser, "--num-workers", args.num_workers, 0)
    streams: int | None = None
    if args.streams != "auto":
        try:
            streams = int(args.streams)
        except ValueError:
            parser.error(f"--streams must be auto or a number, not {args.streams!r}")
        check_at_least(parser, "--streams", streams, 1)

    predictor = _load_predictor(args, streams)
    if predictor is None:
        return 1
    return _write_predictions(args, predictor)


def _load_predictor(args: argparse.Namespace, streams: int | None) -> Predictor | None:
    """The checkpoint on its device, ready to predict (None after an error message)."""
    # Heavy imports after argument parsing so --help and usage errors answer instantly.
    from core.checkpoint import CheckpointError, load_checkpoint
    from core.devices import (
        DeviceUnavailableError,
        configure_cpu_threads,
        cpu_parallelism,
        select_device,
    )
    from core.inference import Predictor

    err = sys.stderr
    try:
        device = select_device(args.device)
        ckpt = load_checkpoint(args.checkpoint, expected_sha256=args.sha256, device=device)
    except (CheckpointError, DeviceUnavailableError, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return None
    if device.type == "cpu":
        split = cpu_parallelism(streams=streams)
        # The CPUs shared out between the streams (process-wide in torch).
        configure_cpu_threads(split.threads)
        streams = split.streams
    predictor = Predictor(
        ckpt,
        device=device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        top_k=args.top_k,
        forward_streams=streams or 1,
    )
    print(
        f"checkpoint {args.checkpoint} ({ckpt.meta.arch}, {len(ckpt.meta.classes)} classes, "
        f"sha256 {ckpt.sha256[:12]}) on {device}",
        file=err,
    )
    return predictor


def _write_predictions(args: argparse.Namespace, predictor: Predictor) -> int:
    """Expand the inputs, write one CSV row per input and the summary; the exit code."""
    from tqdm import tqdm

    from core.inputs import ListFileError, NestedListError, expand_inputs

    err = sys.stderr
    total = ok = 0
    labels: Counter[str] = Counter()
    interrupted = False
    with ExitStack() as stack:
        out: TextIO
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(args.out.open("w", newline="", encoding="utf-8"))
        else:
            out = sys.stdout
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        progress = stack.enter_context(
            tqdm(desc="predict", unit="img", file=err, disable=args.no_progress, leave=False)
        )

        def flush_batch(n: int) -> None:
            # Rows of the previous batch reach the disk before the next forward pass, so a
            # killed run loses at most one batch of work.
            out.flush()

        try:
            for pred in predictor.predict(expand_inputs(args.inputs), on_batch=flush_batch):
                writer.writerow(format_row(pred))
                total += 1
                if pred.label is not None:
                    ok += 1
                    labels[pred.label] += 1
                progress.update(1)
        except (ListFileError, NestedListError) as exc:  # @list file
            print(f"error: {exc}", file=err)
            return 1
        except KeyboardInterrupt:
            interrupted = True
        out.flush()

    errors = total - ok
    dest = str(args.out) if args.out is not None else "stdout"
    print(f"{total} file(s): {ok} classified, {errors} error(s) -> {dest}", file=err)
    if labels:
        common = ", ".join(f"{name} {count}" for name, count in labels.most_common(5))
        print(f"most frequent labels: {common}", file=err)
    if interrupted:
        print("interrupted: the rows above are complete, the rest was not processed", file=err)
        return 130
    if total == 0:
        print("error: no input files found", file=err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
