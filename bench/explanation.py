"""``python -m bench.explanation``: classification + Grad-CAM vs plain classification.

    python -m bench.explanation [--archs efficientnet_b0:224,resnet18:224] [--n 64]
                                [--batch-size 16] [--device auto] [--smoke | --quick]

For each model (random weights, the 15 classes, brain crop) the same synthetic files
(``core.synth`` slices, 512 px JPEGs) go through ``core.inference.Predictor`` (plain
classification: BatchNorm folded, decode thread) and through ``core.explanation.Explainer``
(the same prediction plus one batched Grad-CAM backward, the overlay PNG and the map .npy
written per image), with the same batch size and device. Each side gets a warm-up batch
first. The ratio is the explainer's time per image over the predictor's; target <= 3x.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    SMOKE_ARCH,
    SMOKE_IMAGE_SIZE,
    SMOKE_SOURCE_SIZE,
    Measurement,
    Report,
    Stopwatch,
    add_common_args,
    apply_smoke,
    machine_description,
    make_checkpoint,
    make_images,
    phase,
    reexec_with_allocator,
    resolve_device,
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
    parser.add_argument("--source-size", type=int, default=512, help="image files' side (512)")
    parser.add_argument("--no-reexec", action="store_true", help="skip the allocator re-exec")
    args = parser.parse_args(argv)
    apply_smoke(args)
    if args.smoke:
        args.archs = [(SMOKE_ARCH, SMOKE_IMAGE_SIZE)]
        args.source_size = SMOKE_SOURCE_SIZE
        args.batch_size = min(args.batch_size, 8)
    if args.n < 1 or args.batch_size < 1:
        parser.error("--n and --batch-size must be >= 1")
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
        with phase(f"{arch}@{size} predictor"):
            list(predictor.predict(warm))
            with Stopwatch() as plain:
                predictions = list(predictor.predict(images))
        explainer = Explainer(ckpt, device=device, batch_size=args.batch_size)
        out = workdir / f"explanations-{arch}-{size}"
        with phase(f"{arch}@{size} explainer"):
            list(explainer.explain(warm, out))
            with Stopwatch() as explained:
                explanations = list(explainer.explain(images, out))
        failed = sum(not e.ok for e in explanations) + sum(not p.ok for p in predictions)
        if failed:
            report.fail(explainer_row(arch, size), f"{failed} error rows on good images")
            continue
        agree = sum(e.label == p.label for e, p in zip(explanations, predictions, strict=True))
        note = f"bs {args.batch_size}, writes PNG + .npy"
        report.add(Measurement(predictor_row(arch, size), len(images), plain.seconds))
        report.add(
            Measurement(explainer_row(arch, size), len(images), explained.seconds, note=note)
        )
        report.ratio(
            f"{arch}@{size} explain/classify time per image",
            predictor_row(arch, size),
            explainer_row(arch, size),
            target=TARGET,
        )
        report.notes.append(f"{arch}@{size}: labels agree on {agree}/{len(images)} images")


def run(args: argparse.Namespace) -> Report:
    from core.inference import configure_cpu_threads

    device = resolve_device(args.device)
    configure_cpu_threads(args.threads)
    report = Report(
        title="mriq explanation benchmark (Grad-CAM cost per image)",
        context={
            "models": ",".join(f"{a}@{s}" for a, s in args.archs),
            "n": args.n,
            "batch_size": args.batch_size,
            "smoke": args.smoke,
        }
        | machine_description(device),
    )
    with workspace(args.workdir, keep=args.keep) as workdir:
        with phase("images"):
            images = make_images(workdir / "images", args.n, size=args.source_size, seed=args.seed)
        measure(report, args, workdir, images, device)
    if args.smoke:
        report.notes.append("smoke run: tiny sizes, the numbers mean nothing")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if not args.no_reexec:
        reexec_with_allocator("bench.explanation", raw)
    report = run(args)
    report.finish(args.json_out)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
