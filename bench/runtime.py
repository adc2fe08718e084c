"""``python -m bench.runtime``: eager PyTorch against ONNX Runtime on this CPU, one run.

    python -m bench.runtime [--arch efficientnet_b0 --image-size 224 --n 256] [--e2e]
                            [--json-out FILE] [--smoke]

Rows (the same images, the same weights, one process, the same thread count):

* ``model-only ceiling (torch eager)``: forward passes of pre-decoded tensors through the
  model as mriq prepares it (BatchNorm folded, channels_last, inference_mode), batch 32.
* ``model-only (onnxruntime)``: the same tensors through the verified ONNX export
  (``core.export``) in ONNX Runtime (``core.ort_runtime.OrtModel``), batch 32.
* ``Predictor (torch|onnxruntime)``: ``core.inference.Predictor`` over the image files:
  decoding, the brain crop, preprocessing and the forward pass, each runtime.
* ``--e2e``: ``mriq classify --wait`` through Redis, a worker and PostgreSQL with
  ``MRIQ_RUNTIME=torch`` and then ``onnxruntime`` (bench.inference's e2e row).

The ratio ``onnxruntime / torch model-only`` decides ``Settings.runtime``'s CPU default:
issue 14 asks for >= 1.2x before ONNX Runtime becomes it. OpenVINO: see bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    Measurement,
    Report,
    add_common_args,
    apply_smoke,
    machine_description,
    make_checkpoint,
    make_images,
    phase,
    run_report,
    workspace,
)
from bench.services import add_service_args

CEILING = "model-only ceiling (torch eager)"
ORT_MODEL = "model-only (onnxruntime)"
OV_MODEL = "model-only (openvino, f32)"
BATCH = 32
RUNTIMES = ("torch", "onnxruntime")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.runtime", description=__doc__.split("\n")[0]
    )
    add_common_args(parser, arch="efficientnet_b0", image_size=224, n=256)
    parser.add_argument("--source-size", type=int, default=512, help="JPEG side (%(default)s)")
    parser.add_argument("--e2e", action="store_true", help="also the worker e2e per runtime")
    parser.add_argument("--chunk-size", type=int, default=256, help="e2e chunk (%(default)s)")
    parser.add_argument("--inference-streams", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs (%(default)s)")
    parser.add_argument("--no-reexec", action="store_true", help="keep the environment as is")
    add_service_args(parser)
    args = parser.parse_args(argv)
    apply_smoke(args)
    if args.smoke:
        args.source_size = min(args.source_size, 128)
        args.chunk_size = min(args.chunk_size, 8)
        args.repeats = 1
    return args


def _time(call: Callable[[], Any], steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        call()
    start = time.perf_counter()
    for _ in range(steps):
        call()
    return time.perf_counter() - start


def model_only_rows(
    report: Report, ckpt: Any, pool: Any, n: int, onnx: Path, repeats: int
) -> None:
    import torch

    from core.model_preparation import prepare_inference_model
    from core.ort_runtime import OrtModel

    bs = min(BATCH, n)
    x = pool[:bs].contiguous()
    steps = max(1, n // bs)
    model = prepare_inference_model(ckpt.model, torch.device("cpu"))
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def eager() -> None:
        with torch.inference_mode():
            model(x_cl).argmax(dim=1)

    ort = OrtModel(onnx, threads=torch.get_num_threads())
    calls: dict[str, Callable[[], Any]] = {CEILING: eager, ORT_MODEL: lambda: ort(x)}
    openvino = _openvino(onnx, torch.get_num_threads())
    if isinstance(openvino, str):
        report.skip(OV_MODEL, openvino)
    else:
        calls[OV_MODEL] = lambda: openvino(x)
    best = dict.fromkeys(calls, float("inf"))
    # Interleaved, fastest of each kept: load from elsewhere on the host hits all alike.
    for _ in range(repeats):
        for name, call in calls.items():
            best[name] = min(best[name], _time(call, steps))
    note = f"batch {bs}, best of {repeats}"
    for name, seconds in best.items():
        report.add(Measurement(name, steps * bs, seconds, note=note))


def _openvino(onnx: Path, threads: int) -> Callable[[Any], Any] | str:
    """OpenVINO's CPU runtime over the same ONNX file, or why it is not measured (it is no
    dependency of mriq: installed by hand for this comparison)."""
    try:
        import openvino as ov
    except ImportError as exc:
        return f"openvino not installed ({exc})"
    # f32: OpenVINO's CPU default on AMX hosts is bf16, which cannot meet the 1e-4 the
    # runtimes must agree within; the comparison is at the precision mriq would run.
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(str(onnx), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x.numpy()})


def predictor_rows(
    report: Report, ckpt: Any, paths: Sequence[Path], onnx: Path, repeats: int
) -> None:
    import torch

    from core.inference import Predictor
    from core.ort_runtime import OrtModel

    predictors = {
        name: Predictor(
            ckpt,
            batch_size=BATCH,
            forward_model=OrtModel(onnx, threads=torch.get_num_threads())
            if name != "torch"
            else None,
        )
        for name in RUNTIMES
    }
    best = dict.fromkeys(RUNTIMES, float("inf"))
    for predictor in predictors.values():
        list(predictor.predict(paths[:BATCH]))  # warm-up: first-call allocations
    for _ in range(repeats):
        for name, predictor in predictors.items():
            start = time.perf_counter()
            rows = list(predictor.predict(paths))
            best[name] = min(best[name], time.perf_counter() - start)
            if not all(r.ok for r in rows):
                raise RuntimeError(f"Predictor ({name}): error rows")
    for name, seconds in best.items():
        note = f"files -> rows, best of {repeats}"
        report.add(Measurement(f"Predictor ({name})", len(paths), seconds, note=note))


def e2e_rows(
    report: Report, args: argparse.Namespace, workdir: Path, folder: Path, paths: Any, model: Any
) -> None:
    import shutil

    from bench.inference import E2E, run_e2e

    for name in RUNTIMES:
        sub = Report(title="", context={})
        args.runtime = name
        # Own images below the run's data root (the worker confines its reads to it).
        root = workdir / f"e2e-{name}"
        images = Path(shutil.copytree(folder, root / "images"))
        own = [images / p.name for p in paths]
        run_e2e(sub, args, root, images, own, model.path, model.sha256, "cpu")
        for m in sub.rows:
            if m.name == E2E:
                report.add(Measurement(f"{E2E} ({name})", m.items, m.seconds, note=m.note))
        for row, reason in sub.skipped:
            report.skip(f"{row} ({name})", reason)
        report.failed += [f"{f} ({name})" for f in sub.failed]


def run(args: argparse.Namespace) -> Report:
    import torch

    from bench.inference import predecode
    from core.checkpoint import load_checkpoint
    from core.devices import configure_cpu_threads
    from core.ort_runtime import cached_onnx_export

    configure_cpu_threads(args.threads)
    report = Report(
        title="mriq CPU runtime benchmark",
        context={"arch": args.arch, "image_size": args.image_size, "n": args.n}
        | {"threads": torch.get_num_threads(), "smoke": args.smoke}
        | machine_description("cpu"),
        ceiling=CEILING,
    )
    with workspace(args.workdir, keep=args.keep) as workdir:
        folder = workdir / "images"
        with phase("images"):
            paths = make_images(folder, args.n, size=args.source_size, seed=args.seed)
        model = make_checkpoint(
            workdir / "model.pt", arch=args.arch, image_size=args.image_size, seed=args.seed
        )
        ckpt = load_checkpoint(model.path, expected_sha256=model.sha256)
        with phase("onnx export"):
            onnx = cached_onnx_export(ckpt, model.path)
        pool = predecode(paths, ckpt.meta.preset)
        model_only_rows(report, ckpt, pool, args.n, onnx, args.repeats)
        predictor_rows(report, ckpt, paths, onnx, args.repeats)
        if args.e2e:
            e2e_rows(report, args, workdir, folder, paths, model)
    report.ratio("onnxruntime / torch, model-only", ORT_MODEL, CEILING, target=">= 1.2x")
    report.ratio("openvino / torch, model-only", OV_MODEL, CEILING)
    report.ratio("onnxruntime / torch, Predictor", "Predictor (onnxruntime)", "Predictor (torch)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    report = run_report("bench.runtime", raw, args, run)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
