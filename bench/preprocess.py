"""``python -m bench.preprocess``: ms per image per preprocessing stage, before and after.

    python -m bench.preprocess [--n 64] [--source-size 512] [--image-size 224]
                               [--repeats 3] [--decode-workers 1,2] [--json-out FILE]
                               [--quick | --smoke]

The same synthetic slices (``core.synth``, ``--source-size`` px JPEGs) go through each stage
on one core (this process pinned to one CPU; OpenCV and torch at one thread), the fastest of
``--repeats`` passes kept per stage:

* ``decode``: :func:`core.imaging.read_image` at full size, and with ``min_decode_side`` =
  ``--image-size`` (libjpeg DCT scaling; implemented, not yet on the inference path).
* ``crop``: the numpy brain crop this replaced (``tests/core/crop_reference.py``, "before")
  and :func:`core.cropping.brain_bbox` on OpenCV ("after"), on the same decoded arrays.
* ``resize+normalise``: the eval preset's letterbox and normalisation of the crop.

Then the scaling curve: decode + crop throughput (images/s) with a process pool of each
``--decode-workers`` size, every worker at one thread, the files shared out in chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import torch

from bench.common import machine_description, workspace
from core.cropping import brain_bbox, crop_to_brain
from core.imaging import read_image
from core.synth import REAL_COUNTS, synthesize
from core.transforms import EvalPreset, PresetParams
from tests.core import crop_reference

QUICK_N = 8
QUICK_SOURCE_SIZE = 128
QUICK_IMAGE_SIZE = 64


def pin_one_core() -> int:
    """Pin this process to its first allowed CPU, with one OpenCV and one torch thread."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    return cpu


def cpu_flags() -> list[str]:
    """The AVX flags the kernel reports (what SIMD paths OpenCV/Pillow/torch can take)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith("avx"))
    return []


def make_slices(out: Path, n: int, size: int) -> list[Path]:
    folders = list(REAL_COUNTS)
    per_folder = max(1, -(-n // len(folders)))
    synthesize(out, per_folder=per_folder, image_size_range=(size, size), formats=("jpeg",))
    return sorted(p for p in out.rglob("*") if p.is_file())[:n]


def best_ms(fn: Callable[[Any], object], items: Sequence[Any], repeats: int) -> float:
    """Fastest pass of ``fn`` over ``items``, in ms per item (after an untimed warm-up)."""
    for item in items[:4]:
        fn(item)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - t0)
    return best / len(items) * 1000.0


def stage_times(paths: list[Path], image_size: int, repeats: int) -> dict[str, float]:
    full = [read_image(p) for p in paths]
    preset = EvalPreset(params=PresetParams(image_size=image_size, crop="none"))
    crops = [crop_to_brain(img) for img in full]
    reduced = [read_image(p, min_decode_side=image_size) for p in paths]
    reduced_crops = [crop_to_brain(img) for img in reduced]
    return {
        "decode (full size)": best_ms(read_image, paths, repeats),
        "decode (reduced, min_decode_side)": best_ms(
            lambda p: read_image(p, min_decode_side=image_size), paths, repeats
        ),
        "crop before (numpy)": best_ms(crop_reference.brain_bbox, full, repeats),
        "crop after (OpenCV)": best_ms(brain_bbox, full, repeats),
        "crop after, on the reduced decode": best_ms(brain_bbox, reduced, repeats),
        "resize+normalise": best_ms(preset, crops, repeats),
        "resize+normalise, reduced decode": best_ms(preset, reduced_crops, repeats),
    }


def _worker_init() -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _decode_and_crop(chunk: Sequence[str]) -> int:
    for p in chunk:
        brain_bbox(read_image(p))
    return len(chunk)


def pool_throughput(paths: list[Path], workers: int, repeats: int) -> float:
    """Decode + crop images/s with ``workers`` processes (the best of ``repeats``)."""
    keys = [str(p) for p in paths]
    chunk = max(1, len(keys) // (workers * 4))
    chunks = [keys[i : i + chunk] for i in range(0, len(keys), chunk)]
    best = float("inf")
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        list(pool.map(_decode_and_crop, chunks[:workers]))  # start and warm every worker
        for _ in range(repeats):
            t0 = time.perf_counter()
            done = sum(pool.map(_decode_and_crop, chunks))
            best = min(best, time.perf_counter() - t0)
    assert done == len(keys)
    return len(keys) / best


def parse_workers(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--decode-workers wants positive ints, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.preprocess", description=__doc__)
    parser.add_argument("--n", type=int, default=64, help="images (default 64)")
    parser.add_argument("--source-size", type=int, default=512, help="JPEG side (512)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (224)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per stage (3)")
    parser.add_argument(
        "--decode-workers", type=parse_workers, default=[1, 2], help="pool sizes (1,2)"
    )
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep --workdir's files")
    parser.add_argument(
        "--quick", "--smoke", dest="quick", action="store_true",
        help=f"{QUICK_N} images of {QUICK_SOURCE_SIZE} px, 1 repeat: exercises the code only",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.n, args.source_size, args.image_size = QUICK_N, QUICK_SOURCE_SIZE, QUICK_IMAGE_SIZE
        args.repeats = 1
    with workspace(args.workdir, keep=args.keep) as work:
        print(f"writing {args.n} synthetic {args.source_size} px JPEGs ...", file=sys.stderr)
        paths = make_slices(work / "slices", args.n, args.source_size)
        # The pool runs first, before this process pins itself to one core.
        scaling = {w: pool_throughput(paths, w, args.repeats) for w in args.decode_workers}
        cpu = pin_one_core()
        stages = stage_times(paths, args.image_size, args.repeats)
    before = stages["decode (full size)"] + stages["crop before (numpy)"]
    before += stages["resize+normalise"]
    after = stages["decode (full size)"] + stages["crop after (OpenCV)"]
    after += stages["resize+normalise"]
    reduced = stages["decode (reduced, min_decode_side)"]
    reduced += stages["crop after, on the reduced decode"]
    reduced += stages["resize+normalise, reduced decode"]
    totals = {
        "total before": before,
        "total after (as shipped: full decode)": after,
        "total after, reduced decode": reduced,
    }
    print(f"\nms per image, one core (CPU {cpu}), {len(paths)} x {args.source_size} px JPEG "
          f"-> {args.image_size} px, best of {args.repeats}")
    for name, ms in {**stages, **totals}.items():
        print(f"  {name:40s} {ms:7.3f} ms")
    speedup = stages["crop before (numpy)"] / stages["crop after (OpenCV)"]
    print(f"  {'crop speed-up (before / after)':40s} {speedup:7.2f}x")
    print("\ndecode + crop throughput, process pool (one thread per worker)")
    base = scaling[args.decode_workers[0]]
    for workers, rate in scaling.items():
        print(f"  {workers:2d} worker(s)  {rate:8.1f} images/s  {rate / base:5.2f}x")
    flags = cpu_flags()
    print(f"\nCPU flags: {' '.join(flags) or '(none found)'}")
    if args.json_out is not None:
        payload = {
            "machine": machine_description("cpu"),
            "cpu_flags": flags,
            "n": len(paths),
            "source_size": args.source_size,
            "image_size": args.image_size,
            "ms_per_image": {**stages, **totals},
            "decode_crop_images_per_s": {str(k): v for k, v in scaling.items()},
            "ratios": {
                "crop before/after": speedup,
                "total before/after": before / after,
                "total before/after, reduced decode": before / reduced,
                **{f"pool {w}/{args.decode_workers[0]}": r / base for w, r in scaling.items()},
            },
        }
        args.json_out.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
