"""``python -m bench.explanation``: classification + Grad-CAM vs plain classification.

    python -m bench.explanation [--archs efficientnet_b0:224,resnet18:224] [--n 64]
                                [--batch-size 16] [--repeats 3] [--device auto]
                                [--smoke | --quick]

For each model (random weights, the 15 classes, brain crop) the same synthetic files
(``core.synth`` slices, 512 px JPEGs) go through ``core.inference.Predictor`` (plain
classification: BatchNorm folded, decode thread) and through ``core.explanation.Explainer``
(the same prediction plus one batched Grad-CAM backward, the overlay PNG and the map .npy
written per image), with the same batch size and device. Each side gets a warm-up batch
first; then the two run interleaved ``--repeats`` times and the fastest of each is kept. The
ratio is the explainer's time per image over the predictor's; target <= 3x. The same ratio of
CPU seconds (this process, all threads) is printed too: on a shared machine it is the steadier
of the two.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    SMOKE_ARCH,
    SMOKE_IMAGE_SIZE,
    SMOKE_SOURCE_SIZE,
    Measurement,
    Ratio,
    Report,
    Stopwatch,
    add_common_args,
    apply_smoke,
    make_checkpoint,
    make_images,
    phase,
    run_report,
    start_report,
    workspace,
)

DEFAULT_MODELS = "efficientnet_b0:224,resnet18:224"
TARGET = "<= 3x"


def predictor_row(arch: str, size: int) -> str:
    return f"{arch}@{size} Predictor (classification)"


def explainer_row(arch: str, size: int) -> str:
    return f"{arch}@{size} Explainer (classification + Grad-CAM)"


def parse_models(text: str) -> list[tuple[str, int]]:
    """``"arch:size,arch:size"`` -> [(arch, size), ...]."""
    models = []
    for part in text.split(","):
        arch, _, size = part.strip().partition(":")
        if not arch or not size.isdigit():
            raise argparse.ArgumentTypeError(f"{part!r}: expected ARCH:SIZE")
        models.append((arch, int(size)))
    return models


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.explanation", description=__doc__.split("\n")[0]
    )
    add_common_args(parser, arch="efficientnet_b0", image_size=224, n=64)
    parser.add_argument("--quick", dest="smoke", action="store_true", help="same as --smoke")
    parser.add_argument(
        "--archs",
        type=parse_models,
        default=parse_models(DEFAULT_MODELS),
        help=f"models to measure, ARCH:SIZE,... ({DEFAULT_MODELS}; --arch/--image-size ignored)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="(%(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved runs, fastest kept (%(default)s)"
    )
    parser.add_argument("--source-size", type=int, default=512, help="image files' side (512)")
    parser.add_argument("--no-reexec", action="store_true", help="skip the allocator re-exec")
    args = parser.parse_args(argv)
    apply_smoke(args)
    if args.smoke:
        args.archs = [(SMOKE_ARCH, SMOKE_IMAGE_SIZE)]
        args.source_size = SMOKE_SOURCE_SIZE
        args.batch_size = min(args.batch_size, 8)
        args.repeats = 1
    if min(args.n, args.batch_size, args.repeats) < 1:
        parser.error("--n, --batch-size and --repeats must be >= 1")
    return args


def measure(
    report: Report, args: argparse.Namespace, workdir: Path, images: list[Path], device: str
) -> None:
    """One model: a Predictor row, an Explainer row and their ratio."""
    from core.checkpoint import load_checkpoint
    from core.explanation import Explainer
    from core.inference import Predictor

    for arch, size in args.archs:
        bench_model = make_checkpoint(
            workdir / f"{arch}-{size}.pt", arch=arch, image_size=size, seed=args.seed
        )
        ckpt = load_checkpoint(bench_model.path, expected_sha256=bench_model.sha256)
        warm = images[: args.batch_size]
        predictor = Predictor(ckpt, device=device, batch_size=args.batch_size)
        explainer = Explainer(ckpt, device=device, batch_size=args.batch_size)
        out = workdir / f"explanations-{arch}-{size}"
        with phase(f"{arch}@{size} warm-up"):
            list(predictor.predict(warm))
            list(explainer.explain(warm, out))
        plain: list[float] = []
        explained: list[float] = []
        # CPU seconds of this process (all its threads): on a machine shared with other
        # jobs, wall time measures the neighbours too; the CPU time is the work done.
        plain_cpu: list[float] = []
        explained_cpu: list[float] = []
        # Interleaved, fastest of each kept: a burst of load from elsewhere hits both sides.
        for rep in range(args.repeats):
            cpu = time.process_time()
            with phase(f"{arch}@{size} predictor #{rep + 1}"), Stopwatch() as sw:
                predictions = list(predictor.predict(images))
            plain.append(sw.seconds)
            plain_cpu.append(time.process_time() - cpu)
            cpu = time.process_time()
            with phase(f"{arch}@{size} explainer #{rep + 1}"), Stopwatch() as sw:
                explanations = list(explainer.explain(images, out))
            explained.append(sw.seconds)
            explained_cpu.append(time.process_time() - cpu)
        failed = sum(not e.ok for e in explanations) + sum(not p.ok for p in predictions)
        if failed:
            report.fail(explainer_row(arch, size), f"{failed} error rows on good images")
            continue
        agree = sum(e.label == p.label for e, p in zip(explanations, predictions, strict=True))
        note = f"bs {args.batch_size}, writes PNG + .npy"
        report.add(Measurement(predictor_row(arch, size), len(images), min(plain)))
        report.add(Measurement(explainer_row(arch, size), len(images), min(explained), note=note))
        report.ratio(
            f"{arch}@{size} explain/classify time per image",
            predictor_row(arch, size),
            explainer_row(arch, size),
            target=TARGET,
        )
        report.add_ratio(
            Ratio(
                f"{arch}@{size} explain/classify CPU time per image",
                min(explained_cpu) / min(plain_cpu),
                TARGET,
            )
        )
        report.notes.append(f"{arch}@{size}: labels agree on {agree}/{len(images)} images")
        report.notes.append(
            f"{arch}@{size} seconds per run: predictor "
            + ", ".join(f"{t:.2f}" for t in plain)
            + "; explainer "
            + ", ".join(f"{t:.2f}" for t in explained)
            + "; CPU seconds: predictor "
            + ", ".join(f"{t:.2f}" for t in plain_cpu)
            + "; explainer "
            + ", ".join(f"{t:.2f}" for t in explained_cpu)
        )


def run(args: argparse.Namespace) -> Report:
    device, report = start_report(
        args,
        "mriq explanation benchmark (Grad-CAM cost per image)",
        {
            "models": ",".join(f"{a}@{s}" for a, s in args.archs),
            "n": args.n,
            "batch_size": args.batch_size,
        },
    )
    with workspace(args.workdir, keep=args.keep) as workdir:
        with phase("images"):
            images = make_images(workdir / "images", args.n, size=args.source_size, seed=args.seed)
        measure(report, args, workdir, images, device)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    report = run_report("bench.explanation", raw, args, run)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
