"""``python -m core.train``: train a classifier on a folder of labelled MRI slices.

Builds a typed ``TrainConfig`` from the command line, shows a tqdm bar per epoch and a line
per epoch, and ends with the test-report summary and where the files are. Exit codes: 0 done,
2 bad arguments or data (message on stderr), 130 cancelled with Ctrl-C (``last.pt`` kept so
``--resume auto`` continues).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from core.config import (
    ARCHITECTURES,
    CLIP_MODES,
    CROP_MODES,
    DEVICES,
    OPTIMIZERS,
    SCHEDULERS,
    TrainConfig,
)

if TYPE_CHECKING:  # the result types, for annotations only (nothing heavy at import)
    from core.training_report import EpochMetrics, TrainResult

EXIT_USAGE = 2
EXIT_CANCELLED = 130

_DEFAULTS = TrainConfig(data_dir=Path("."), out_dir=Path("."))


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m core.train",
        description=(
            "Train a CNN on brain MRI slices in class folders (15 classes or 44 class+sequence "
            "labels). Writes best.pt (with a temperature fitted on the validation split), "
            "last.pt, metrics.json, test_report.json, confusion_matrix.png, "
            "training_curves.png and the evaluation plots into --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, type=Path, help="data folder (class folders, "
                   "optionally under train/ val/ test/)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--arch", default=d.arch, choices=ARCHITECTURES)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--scheduler", default=d.scheduler, choices=SCHEDULERS)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--clip", default=d.clip, choices=CLIP_MODES, help="gradient clipping")
    p.add_argument("--clip-value", type=float, default=d.clip_value,
                   help="max gradient norm (--clip norm) or value (--clip value)")
    p.add_argument("--finetune", action="store_true",
                   help="train only the classification head (backbone frozen)")
    p.add_argument("--weights", default=d.weights,
                   help="auto | none | imagenet | PATH (state_dict or mriq checkpoint)")
    p.add_argument("--labels", default=d.labels, choices=("15", "44"))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, choices=DEVICES)
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="last.pt to resume from, or 'auto' (OUT/last.pt when present)")
    p.add_argument("--init-checkpoint", type=Path, default=None, metavar="CKPT",
                   help="warm start from this mriq checkpoint's weights")
    p.add_argument("--no-weighted-loss", action="store_true",
                   help="plain cross-entropy instead of 1/count class weights")
    p.add_argument("--oversample", type=float, default=d.oversample,
                   help="sampler draws per epoch as a multiple of the training set")
    p.add_argument("--patience", type=int, default=d.early_stopping_patience,
                   help="early-stopping patience in epochs (0 = off)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--crop", default=d.crop, choices=CROP_MODES)
    p.add_argument("--rotation", type=float, default=d.rotation_degrees,
                   help="max random rotation in degrees (training only)")
    p.add_argument("--hflip", type=float, default=d.hflip_p,
                   help="horizontal flip probability (training only)")
    p.add_argument("--skip-unknown", action="store_true",
                   help="skip folders whose names match no class instead of failing")
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--no-channels-last", action="store_true",
                   help="keep NCHW memory layout on CUDA")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Typed config from parsed arguments (raises ValueError on invalid combinations)."""
    # One keyword per option, spelled out: the flag names differ from the field names
    # (--no-amp, --patience, --rotation), so the look-alike lines (duplicates pairs them with
    # each other and with bench/services.py's keyword calls) are not shared logic.
    return TrainConfig(
        data_dir=args.data,
        out_dir=args.out,
        arch=args.arch,
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        momentum=args.momentum,
        scheduler=args.scheduler,
        warmup_epochs=args.warmup_epochs,
        clip=args.clip,
        clip_value=args.clip_value,
        finetune=args.finetune,
        weights=args.weights,
        labels=args.labels,
        seed=args.seed,
        device=args.device,
        resume=args.resume,
        weighted_loss=not args.no_weighted_loss,
        oversample=args.oversample,
        early_stopping_patience=args.patience,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        crop=args.crop,
        rotation_degrees=args.rotation,
        hflip_p=args.hflip,
        num_workers=args.num_workers,
        amp=not args.no_amp,
        channels_last=not args.no_channels_last,
        skip_unknown=args.skip_unknown,
        init_checkpoint=args.init_checkpoint,
    )


def _check_data_dir(path: Path) -> str | None:
    if not path.exists():
        return f"{path}: data folder does not exist"
    if not path.is_dir():
        return f"{path}: data path is not a folder"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits with 2
    problem = _check_data_dir(config.data_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    return _run(config)


class _Progress:
    """The tqdm bar of the current epoch and the line printed after each epoch."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.epoch = 0
        self.bar: Any = None
        self.stop_requested = False

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_batch(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=total, desc=f"epoch {self.epoch + 1}/{self.epochs}", unit="batch",
                leave=False, dynamic_ncols=True,
            )
        self.bar.update(done - self.bar.n)

    def on_epoch(self, m: EpochMetrics) -> None:
        from tqdm import tqdm

        self.close_bar()
        self.epoch = m.epoch
        tqdm.write(
            f"epoch {m.epoch:3d}/{self.epochs}  train_loss {m.train_loss:.4f}  "
            f"val_loss {m.val_loss:.4f}  val_acc {m.val_accuracy:.4f}  "
            f"val_macro_f1 {m.val_macro_f1:.4f}  lr {m.lr:.2e}  {m.seconds:.1f}s"
        )

    def on_log(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message)

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        from tqdm import tqdm

        if self.stop_requested:  # second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.stop_requested = True
        tqdm.write("stopping after the current batch (Ctrl-C again to abort) ...")


def _run(config: TrainConfig) -> int:
    # Heavy imports after argument parsing so --help and usage errors are instant.
    from core.devices import DeviceUnavailableError
    from core.errors import ImageReadError
    from core.models import WeightsUnavailableError
    from core.training import train

    progress = _Progress(config.epochs)
    previous = signal.signal(signal.SIGINT, progress.on_sigint)
    try:
        result = train(
            config,
            on_epoch=progress.on_epoch,
            on_batch=progress.on_batch,
            should_stop=lambda: progress.stop_requested,
            on_log=progress.on_log,
        )
    except (
        # Data/argument problems: UnknownFolderError, TrainingDataError, CheckpointError and
        # the dataset's own errors are all ValueErrors carrying the file and the reason.
        ValueError,
        WeightsUnavailableError,
        DeviceUnavailableError,
        ImageReadError,
        FileNotFoundError,
        NotADirectoryError,
    ) as exc:
        progress.close_bar()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        progress.close_bar()
        print("aborted", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        signal.signal(signal.SIGINT, previous)
    progress.close_bar()
    return _print_result(result, config.out_dir)


def _print_result(result: TrainResult, out: Path) -> int:
    """The closing lines of a run: test summary and where the files are; the exit code."""
    if result.cancelled:
        print(
            f"cancelled; resume with --resume auto (state in {result.last_checkpoint})",
            file=sys.stderr,
        )
        return EXIT_CANCELLED
    if result.stopped_early:
        print(f"stopped early after epoch {result.epochs[-1].epoch}")
    report = result.test_report
    if report is not None:
        print(
            f"test: n={report.n}  accuracy {report.accuracy:.4f}  macro_f1 "
            f"{report.macro_f1:.4f}  weighted_f1 {report.weighted_f1:.4f}  top3 "
            f"{report.top3_accuracy:.4f}"
        )
        if report.ece is not None and report.ece_uncalibrated is not None:
            print(
                f"test: temperature {report.temperature:.3f}"
                f"{'' if report.calibrated else ' (not calibrated)'}  ECE "
                f"{report.ece_uncalibrated:.4f} -> {report.ece:.4f}  NLL "
                f"{report.nll_uncalibrated:.4f} -> {report.nll:.4f}"
            )
        if report.errors:
            print(f"test: {len(report.errors)} unreadable image(s) excluded")
    else:
        print("test: no test images, no test report")
    print(f"best model: {result.best_checkpoint} (sha256 {result.best_sha256})")
    print(f"resume state: {result.last_checkpoint}")
    print(f"metrics: {out / 'metrics.json'}, curves: {out / 'training_curves.png'}")
    if report is not None:
        print(f"report: {out / 'test_report.json'}, confusion: {out / 'confusion_matrix.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
