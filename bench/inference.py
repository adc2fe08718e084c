"""``python -m bench.inference``: mriq's inference throughput against its baselines, one run.

    python -m bench.inference --arch efficientnet_b0 --image-size 224 --n 512 [--device auto]
                              [--e2e] [--compile] [--json-out FILE] [--smoke]

Rows (same image files, same weights, same process unless said otherwise):

* ``model-only ceiling``: forward passes over pre-decoded tensors already on the device,
  batch sizes swept, the model prepared as mriq prepares it (BatchNorm folded,
  channels_last) + inference_mode (+ autocast on CUDA); the best is the ceiling every other
  row is compared with. ``model-only, BatchNorm not folded`` shows what folding is worth.
* ``model-only default settings``: the same forward passes the way PyTorch runs them out
  of the box (NCHW, ``no_grad``, batch 32): what the settings are worth.
* ``model-only ceiling, glibc default allocator``: the ceiling configuration in a child
  process *without* the MALLOC_* tuning (glibc reads it only at start-up): what the
  allocator is worth.
* ``notebook way``: the reference notebook's pipeline: ``torchvision.io.read_image`` +
  its centred profile crop + resize + the weights' ``transforms()`` preset in a DataLoader
  at batch 32, NCHW, eval mode, ``no_grad``, in a child process with the allocator a
  notebook runs with (glibc's defaults). ``notebook way, tuned allocator`` is the same
  pipeline in-process under mriq's allocator setting: a faster notebook than users run.
* ``core Predictor (in-process)``: ``core.inference.Predictor`` over the files, batch 32.
* ``python -m core.predict (whole command)``: the CLI as a subprocess, timed from spawn to
  exit, so process start-up, checkpoint loading and CSV writing are in it.
* ``--e2e``: ``mriq classify <folder> --wait`` through Redis, a worker and PostgreSQL,
  measured from the job's submission to its last row being committed.

The script re-execs itself once with the worker's allocator setting so every in-process row
runs under the allocator mriq's worker uses (``--no-reexec`` keeps the environment as is).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from bench.common import (
    ALLOCATOR_ENV,
    Measurement,
    Ratio,
    Report,
    RssSampler,
    Stopwatch,
    add_common_args,
    allocator_tuned,
    apply_smoke,
    child_env,
    make_checkpoint,
    make_images,
    phase,
    run_report,
    start_report,
    sync,
    workspace,
)
from bench.services import ServiceArgs, add_service_args

if TYPE_CHECKING:
    import torch
    from torch import nn

    from core.checkpoint import LoadedCheckpoint
    from core.transforms import PresetParams

CEILING = "model-only ceiling"
UNFOLDED = "model-only, BatchNorm not folded (best bs)"
DEFAULT_SETTINGS = "model-only default settings (NCHW, no_grad, bs 32)"
OTHER_ALLOCATOR = "model-only ceiling, {alloc} (child process)"
COMPILED = "model-only torch.compile (best bs)"
NOTEBOOK = "notebook way (read_image+crop+resize+preset; glibc allocator, child)"
NOTEBOOK_TUNED = "notebook way, tuned allocator (in-process)"
PREDICTOR = "core Predictor (in-process, bs 32)"
PREDICT_CLI = "python -m core.predict (whole command)"
E2E = "mriq classify e2e (submit -> last row)"
E2E_CLI = "mriq classify --wait (CLI wall time)"
NOTEBOOK_BATCH = 32
PREDICTOR_BATCH = 32
SMOKE_E2E_CHUNK = 8
#: Row groups ``--skip`` can leave out (the ceiling and the Predictor always run: every
#: ratio needs them).
SKIPPABLE = ("allocator", "notebook", "core.predict")
#: Distinct pre-decoded images the model-only rows cycle through (content does not change
#: the cost of a forward pass; holding n decoded 224 px images would cost n x 600 KB).
POOL = 64


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.inference", description=__doc__.split("\n")[0]
    )
    add_common_args(parser, arch="efficientnet_b0", image_size=224, n=512)
    parser.add_argument(
        "--batch-sizes", default="16,32,64", help="model-only batch sizes to try (%(default)s)"
    )
    parser.add_argument(
        "--source-size",
        type=int,
        default=512,
        help="side of the generated JPEGs in pixels (%(default)s)",
    )
    parser.add_argument(
        "--crop",
        default="brain",
        choices=("brain", "profile", "none"),
        help="crop stored in the checkpoint's preset, i.e. mriq's (%(default)s)",
    )
    parser.add_argument(
        "--notebook-workers",
        type=int,
        default=0,
        help="DataLoader workers of the notebook baseline (%(default)s, like "
        "mriq's Predictor default)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also try torch.compile in the model-only sweep (slow to compile)",
    )
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="also run mriq classify --wait through Redis, a worker and PostgreSQL (with "
        "--smoke: 16 images in chunks of 8, so CI checks that path too)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=512, help="MRIQ_CHUNK_SIZE for --e2e (%(default)s)"
    )
    parser.add_argument(
        "--inference-streams",
        type=int,
        default=None,
        help="forward streams of the Predictor row and the e2e worker (MRIQ_INFERENCE_STREAMS; "
        "default: the worker's own choice)",
    )
    parser.add_argument(
        "--model-only-n",
        type=int,
        default=1024,
        help="images per model-only measurement, at most --n (%(default)s): a forward "
        "pass costs the same whatever the image, so rates settle long before 5,000",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated row groups to leave out, from: "
        + ", ".join(SKIPPABLE)
        + " (e.g. a 5,000-image overhead run: --skip allocator,notebook,core.predict)",
    )
    parser.add_argument(
        "--no-reexec",
        action="store_true",
        help="do not re-exec with the worker's allocator setting",
    )
    parser.add_argument("--child-model-only", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-notebook", type=Path, default=None, help=argparse.SUPPRESS)
    add_service_args(parser)
    args = parser.parse_args(argv)
    apply_smoke(args)
    if args.smoke:
        args.batch_sizes = "4,8"
        args.source_size = min(args.source_size, 128)
        # --smoke --e2e still runs the job system (CI's check that this path works), in
        # chunks small enough that the job has several.
        args.chunk_size = min(args.chunk_size, SMOKE_E2E_CHUNK)
        args.compile = False
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    args.skip = {part.strip() for part in str(args.skip).split(",") if part.strip()}
    unknown = sorted(args.skip - set(SKIPPABLE))
    if unknown:
        parser.error(f"--skip: unknown row groups {unknown}; choose from {', '.join(SKIPPABLE)}")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.n < 1:
        parser.error("--n and --batch-sizes must be positive")
    return args


# --------------------------------------------------------------------------------------
# model-only


def predecode(paths: Sequence[Path], params: PresetParams) -> torch.Tensor:
    """mriq's own preprocessing of the first files, stacked (the model-only input pool)."""
    import torch

    from core.imaging import read_image
    from core.transforms import EvalPreset

    preset = EvalPreset(params=params)
    return torch.stack([preset(read_image(p)) for p in paths[:POOL]])


def _batch_from_pool(pool: torch.Tensor, bs: int) -> torch.Tensor:
    import torch

    reps = math.ceil(bs / pool.shape[0])
    return torch.cat([pool] * reps)[:bs].contiguous()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's (process-wide) intra-op thread count set to ``n`` for a block."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_forward(
    model: nn.Module,
    pool: torch.Tensor,
    *,
    n: int,
    bs: int,
    device: torch.device,
    channels_last: bool,
    inference_mode: bool,
    amp: bool,
    warmup: int = 2,
    streams: int = 1,
) -> float:
    """Seconds for ceil(n / bs) forward passes of a bs batch already on the device.

    ``streams`` > 1 (CPU): that many threads run the passes side by side, torch's threads
    shared out between them, as mriq's Predictor does with ``forward_streams``.
    """
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=fmt).eval()
    x = _batch_from_pool(pool, bs).to(device).contiguous(memory_format=fmt)
    grad_ctx: Callable[[], Any] = torch.inference_mode if inference_mode else torch.no_grad
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    steps = math.ceil(n / bs)
    streams = 1 if cuda else max(1, streams)

    def passes(count: Callable[[], bool]) -> None:
        # grad mode and autocast are thread-local: entered in every stream's thread.
        with grad_ctx(), torch.autocast("cuda", dtype=dtype) if amp and cuda else nullcontext():
            out = None
            while count():
                # .argmax + the host copy on the last step only: like a real consumer, but
                # the per-step sync of a .cpu() would understate what the device can do.
                out = model(x)
            if out is not None:
                out.float().argmax(dim=1).cpu()

    with torch_threads(torch.get_num_threads() // streams):
        left = [warmup]
        passes(lambda: _take(left))
        sync(device)
        left = [steps]
        lock = threading.Lock()

        def take() -> bool:
            with lock:
                return _take(left)

        start = time.perf_counter()
        threads = [threading.Thread(target=passes, args=(take,)) for _ in range(streams - 1)]
        for t in threads:
            t.start()
        passes(take)
        for t in threads:
            t.join()
        sync(device)
    return (time.perf_counter() - start) * n / (steps * bs)  # per n images exactly


def _take(left: list[int]) -> bool:
    """Counts one step down; False when none are left."""
    if left[0] <= 0:
        return False
    left[0] -= 1
    return True


# ``duplicates`` pairs this keyword call by shape with core/training_data.py's
# TrainingData(...): unrelated calls that only look alike.
def time_best_settings(
    model: nn.Module,
    pool: torch.Tensor,
    *,
    n: int,
    bs: int,
    device: torch.device,
    warmup: int = 2,
    streams: int = 1,
) -> float:
    """:func:`time_forward` with the ceiling's settings: channels_last, inference_mode and
    (on CUDA) autocast."""
    # Keywords spelled out: alike by shape to core.training_data's keyword calls, no logic.
    return time_forward(
        model,
        pool,
        n=n,
        bs=bs,
        device=device,
        channels_last=True,
        inference_mode=True,
        amp=True,
        warmup=warmup,
        streams=streams,
    )


@dataclasses.dataclass(frozen=True)
class Best:
    """The ceiling's configuration: batch size and forward streams."""

    bs: int
    streams: int

    def describe(self) -> str:
        return f"bs {self.bs}" + (f", {self.streams} streams" if self.streams > 1 else "")


def stream_choices(device: torch.device) -> list[int]:
    """Forward-stream counts the sweep tries: 1, 2 (where there are 2 cores) and the split
    mriq's worker picks; whichever is fastest is the ceiling, whatever the worker uses."""
    import torch

    from core.devices import cpu_parallelism

    if device.type != "cpu":
        return [1]
    cores = torch.get_num_threads()
    return sorted({1, min(2, cores), cpu_parallelism(cores).streams})


def model_only_sweep(
    report: Report,
    net: nn.Module,
    pool: torch.Tensor,
    *,
    n: int,
    batch_sizes: Sequence[int],
    device: torch.device,
    compile_too: bool,
) -> Best:
    """Ceiling and default-settings rows; returns the best batch size and stream count."""
    from core.model_preparation import prepare_inference_model

    # The same preparation the Predictor applies (BatchNorm folded, channels_last): the
    # best settings found are the ceiling, and mriq is measured against them.
    model = prepare_inference_model(net, device)
    timings: dict[Best, float] = {}
    for streams in stream_choices(device):
        for bs in batch_sizes:
            timings[Best(bs, streams)] = time_best_settings(
                model, pool, n=n, bs=bs, device=device, streams=streams
            )
    best = min(timings, key=lambda b: timings[b])
    sweep = ", ".join(f"{b.describe()}: {n / s:,.1f} img/s" for b, s in timings.items())
    report.add(
        Measurement(
            CEILING,
            n,
            timings[best],
            note=f"{best.describe()}, BatchNorm folded, channels_last, inference_mode"
            + (", autocast" if device.type == "cuda" else ""),
        )
    )
    seconds_unfolded = time_best_settings(
        copy.deepcopy(net), pool, n=n, bs=best.bs, device=device, streams=best.streams
    )
    report.add(
        Measurement(UNFOLDED, n, seconds_unfolded, note=f"{best.describe()}, channels_last")
    )
    report.notes.append(
        f"model-only sweep ({'tuned' if allocator_tuned() else 'default'} allocator): {sweep}"
    )
    # Default settings: fewer images, it is the slow row and only shows the settings' worth.
    n_default = min(n, 128)
    seconds = time_forward(
        copy.deepcopy(net),
        pool,
        n=n_default,
        bs=min(32, n),
        device=device,
        channels_last=False,
        inference_mode=False,
        amp=False,
    )
    report.add(Measurement(DEFAULT_SETTINGS, n_default, seconds, note="fp32, NCHW, 1 stream"))
    if compile_too:
        _compiled_row(report, net, pool, n=n, bs=best.bs, device=device)
    return best


def recheck_ceiling(
    report: Report, net: nn.Module, pool: torch.Tensor, *, n: int, best: Best, device: torch.device
) -> None:
    """Times the ceiling again after the long rows; the faster of the two counts.

    A shared machine's speed drifts by 10-20 % over minutes. Every ratio divides by the
    ceiling, so taking the faster measurement makes the drift count against mriq, never for.
    """
    from core.model_preparation import prepare_inference_model

    first = report.row(CEILING)
    if first is None:
        return
    seconds = time_best_settings(
        prepare_inference_model(net, device),
        pool,
        n=n,
        bs=best.bs,
        device=device,
        streams=best.streams,
    )
    again = n / seconds
    report.notes.append(
        f"model-only ceiling at the start {first.rate:,.1f} img/s, re-measured after the other "
        f"rows {again:,.1f} img/s ({best.describe()}); the faster is the ceiling"
    )
    if again > first.rate:
        report.rows[report.rows.index(first)] = dataclasses.replace(
            first, items=n, seconds=seconds, note=first.note + ", re-measured at the end"
        )


def _compiled_row(
    report: Report, net: nn.Module, pool: torch.Tensor, *, n: int, bs: int, device: torch.device
) -> None:
    import torch

    from core.model_preparation import prepare_inference_model

    try:
        model = prepare_inference_model(net, device)
        # torch.compile returns an OptimizedModule (an nn.Module) for a module.
        compiled = cast("nn.Module", torch.compile(model))
        with Stopwatch() as compile_sw:
            time_best_settings(compiled, pool, n=bs, bs=bs, device=device, warmup=1)
        seconds = time_best_settings(compiled, pool, n=n, bs=bs, device=device)
    except Exception as exc:  # compile needs a C compiler etc.; its absence is not fatal
        report.skip(COMPILED, f"torch.compile failed: {type(exc).__name__}: {exc}"[:200])
        return
    report.add(
        Measurement(
            COMPILED, n, seconds, note=f"bs {bs}, first call {compile_sw.seconds:.0f} s (compile)"
        )
    )


def _child_setup(spec_path: Path) -> tuple[dict[str, Any], torch.device, LoadedCheckpoint]:
    """A child's spec, its device and the checkpoint loaded there, threads sized as asked."""
    import torch

    from core.checkpoint import load_checkpoint
    from core.devices import configure_cpu_threads

    spec: dict[str, Any] = json.loads(spec_path.read_text())
    configure_cpu_threads(spec.get("threads"))
    device = torch.device(spec["device"])
    return spec, device, load_checkpoint(Path(spec["checkpoint"]), device=device)


def child_model_only(spec_path: Path) -> int:
    """Child mode: time the ceiling configuration under this process's allocator."""
    from core.model_preparation import prepare_inference_model

    spec, device, loaded = _child_setup(spec_path)
    pool = predecode([Path(p) for p in spec["paths"]], loaded.meta.preset)
    model = prepare_inference_model(loaded.model, device)
    seconds = time_best_settings(
        model, pool, n=spec["n"], bs=spec["bs"], device=device, streams=spec.get("streams", 1)
    )
    print(json.dumps({"seconds": seconds, "n": spec["n"], "tuned": allocator_tuned()}))
    return 0


def _other_allocator_env() -> dict[str, str]:
    """A child's environment with the allocator setting this process does not have."""
    tuned_here = allocator_tuned()
    env = child_env()
    for key, value in ALLOCATOR_ENV.items():
        if tuned_here:
            env.pop(key, None)  # glibc defaults in the child
        else:
            env[key] = value
    return env


def _other_allocator_row_name() -> str:
    """The name of the ceiling row measured under the allocator this process does not have."""
    other = "glibc default allocator" if allocator_tuned() else "tuned allocator"
    return OTHER_ALLOCATOR.format(alloc=other)


def other_allocator_row(
    report: Report,
    workdir: Path,
    checkpoint: Path,
    paths: Sequence[Path],
    *,
    n: int,
    best: Best,
    device: str,
    threads: int | None,
) -> None:
    """The ceiling configuration in a child under the *other* allocator setting."""
    run_child(
        report,
        _other_allocator_row_name(),
        "--child-model-only",
        workdir / "child-model-only.json",
        {
            "checkpoint": str(checkpoint),
            "paths": [str(p) for p in paths[:POOL]],
            "n": n,
            "bs": best.bs,
            "streams": best.streams,
            "device": device,
            "threads": threads,
        },
        note=best.describe(),
        timeout=1800,
    )


def run_child(
    report: Report,
    name: str,
    mode: str,
    spec_file: Path,
    spec: dict[str, Any],
    *,
    note: str,
    timeout: float,
) -> None:
    """Runs ``python -m bench.inference <mode> <spec_file>`` under the allocator setting this
    process does not have and adds its ``{"n", "seconds"}`` answer as the row ``name``."""
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.inference", mode, str(spec_file), "--no-reexec"],
        env=_other_allocator_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        report.skip(name, f"child failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        return
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    report.add(Measurement(name, int(result["n"]), float(result["seconds"]), note=note))


# --------------------------------------------------------------------------------------
# notebook way


def _profile_crop(img: torch.Tensor, *, threshold: float = 0.1, frame: int = 5) -> torch.Tensor:
    """The notebook's crop on a uint8 CxHxW tensor (``core.cropping.crop_profile``'s rule).

    Middle row/column profiles give the object's extent; the crop of that size is centred on
    the image centre, as the notebook's CenterCrop-based crop does.
    """
    import torch

    gray = img[0]
    h, w = gray.shape
    if h <= 2 * frame or w <= 2 * frame:
        return img
    peak = int(gray.max())
    if peak == 0:
        return img
    cut = threshold * peak
    xs = torch.nonzero(gray[h // 2, frame : w - frame] > cut).flatten()
    ys = torch.nonzero(gray[frame : h - frame, w // 2] > cut).flatten()
    if xs.numel() == 0 or ys.numel() == 0:
        return img
    crop_w = int(xs[-1] - xs[0] + 1)
    crop_h = int(ys[-1] - ys[0] + 1)
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img[:, top : top + crop_h, left : left + crop_w]


def weights_preset(arch: str, image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The architecture's ImageNet weights' ``transforms()`` preset, scaled to image_size.

    ``Weights.transforms()`` only builds the preset (resize, centre crop, to float,
    normalise); nothing is downloaded. At the weights' own size (224 for EfficientNet-B0:
    resize 256 bicubic, crop 224) it is exactly the notebook's; other sizes keep the
    resize/crop proportion.
    """
    from torchvision.models import get_model_weights

    weights: Any = get_model_weights(arch).DEFAULT
    preset: Callable[[torch.Tensor], torch.Tensor] = weights.transforms()
    crop = list(getattr(preset, "crop_size", [224]))[0]
    if image_size != crop:
        resize = list(getattr(preset, "resize_size", [256]))[0]
        preset = weights.transforms(
            crop_size=image_size, resize_size=round(image_size * resize / crop)
        )
    return preset


def _notebook_dataset(
    paths: Sequence[Path], image_size: int, preset: Callable[[torch.Tensor], torch.Tensor]
) -> Any:
    from torch.utils.data import Dataset
    from torchvision.io import ImageReadMode, read_image
    from torchvision.transforms.v2 import functional as tvf

    class NotebookImages(Dataset[Any]):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, index: int) -> Any:
            img = read_image(str(paths[index]), mode=ImageReadMode.RGB)
            img = _profile_crop(img)
            img = tvf.resize(img, [image_size, image_size], antialias=True)
            return preset(img)

    return NotebookImages()


def time_notebook(
    net: nn.Module,
    paths: Sequence[Path],
    *,
    arch: str,
    image_size: int,
    device: torch.device,
    workers: int,
) -> tuple[int, float]:
    """(images, seconds) of the notebook's pipeline over ``paths``, after a warm-up batch."""
    import torch
    from torch.utils.data import DataLoader

    model = copy.deepcopy(net).to(device).to(memory_format=torch.contiguous_format).eval()
    dataset = _notebook_dataset(paths, image_size, weights_preset(arch, image_size))
    loader = DataLoader(dataset, batch_size=NOTEBOOK_BATCH, shuffle=False, num_workers=workers)
    with torch.no_grad():
        # Warm-up (untimed), as every in-process row gets: first-call kernel selection.
        model(torch.stack([dataset[i] for i in range(min(len(paths), NOTEBOOK_BATCH))]).to(device))
        sync(device)
        done = 0
        with Stopwatch() as sw:
            for x in loader:
                probs = torch.softmax(model(x.to(device)), dim=1)
                probs.argmax(dim=1).cpu()
                done += x.shape[0]
    return done, sw.seconds


def child_notebook(spec_path: Path) -> int:
    """Child mode: the notebook row under this process's allocator."""
    spec, device, loaded = _child_setup(spec_path)
    done, seconds = time_notebook(
        loaded.model.eval(),
        [Path(p) for p in spec["paths"]],
        arch=spec["arch"],
        image_size=spec["image_size"],
        device=device,
        workers=spec["workers"],
    )
    print(json.dumps({"seconds": seconds, "n": done, "tuned": allocator_tuned()}))
    return 0


def run_notebook(
    report: Report,
    net: nn.Module,
    paths: Sequence[Path],
    *,
    workdir: Path,
    checkpoint: Path,
    arch: str,
    image_size: int,
    device: torch.device,
    workers: int,
    threads: int | None,
) -> None:
    """The notebook row twice: in-process, and in a child under the other allocator.

    The notebook sets no allocator variables, so the row the ratios use is the one under
    glibc's defaults; the tuned-allocator row shows how much of the gap is the allocator.
    """
    tuned_here = allocator_tuned()
    note = f"bs {NOTEBOOK_BATCH}, {workers} loader workers, fp32 NCHW"
    done, seconds = time_notebook(
        net, paths, arch=arch, image_size=image_size, device=device, workers=workers
    )
    report.add(Measurement(NOTEBOOK_TUNED if tuned_here else NOTEBOOK, done, seconds, note=note))
    run_child(
        report,
        NOTEBOOK if tuned_here else NOTEBOOK_TUNED,
        "--child-notebook",
        workdir / "child-notebook.json",
        {
            "checkpoint": str(checkpoint),
            "paths": [str(p) for p in paths],
            "arch": arch,
            "image_size": image_size,
            "device": str(device),
            "workers": workers,
            "threads": threads,
        },
        note=note,
        timeout=3600,
    )


# --------------------------------------------------------------------------------------
# mriq: Predictor and core.predict


def run_predictor(
    report: Report,
    loaded: LoadedCheckpoint,
    paths: Sequence[Path],
    *,
    device: torch.device,
    streams: int | None = None,
) -> Measurement:
    import torch

    from core.devices import CpuParallelism, cpu_parallelism
    from core.inference import Predictor

    # The worker's configuration: on CPU the cores split into forward streams
    # (worker.runtime.inference_streams); the Predictor prepares its own model copy
    # (cached, shared with the ceiling rows).
    cores = torch.get_num_threads()
    split = (
        cpu_parallelism(cores, streams=None if streams is None else min(streams, cores))
        if device.type == "cpu"
        else CpuParallelism(streams=1, threads=cores)
    )
    streams = split.streams
    with torch_threads(split.threads):
        predictor = Predictor(
            loaded, device=device, batch_size=PREDICTOR_BATCH, forward_streams=streams
        )
        for _ in predictor.predict(paths[:PREDICTOR_BATCH]):  # warm-up, untimed
            pass
        errors = 0
        with Stopwatch() as sw:
            for pred in predictor.predict(paths):
                errors += pred.error is not None
    note = f"{predictor.forward_streams} stream(s)" + (f", {errors} errors" if errors else "")
    return report.add(Measurement(PREDICTOR, len(paths), sw.seconds, note=note))


def run_predict_cli(
    report: Report, checkpoint: Path, folder: Path, workdir: Path, n: int, *, device: str
) -> None:
    out = workdir / "predict.csv"
    cmd = [
        sys.executable,
        "-m",
        "core.predict",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--no-progress",
        "--device",
        device,
        "--batch-size",
        str(PREDICTOR_BATCH),
        str(folder),
    ]
    with Stopwatch() as sw:
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        report.skip(PREDICT_CLI, f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return
    rows = sum(1 for _ in out.open(encoding="utf-8")) - 1
    if rows != n:
        report.skip(PREDICT_CLI, f"wrote {rows} rows for {n} images")
        return
    report.add(Measurement(PREDICT_CLI, n, sw.seconds, note="spawn to exit"))


# --------------------------------------------------------------------------------------
# end to end


def run_e2e(
    report: Report,
    args: argparse.Namespace,
    workdir: Path,
    folder: Path,
    paths: Sequence[Path],
    checkpoint: Path,
    sha256: str,
    device: str,
) -> None:
    """``mriq classify --wait`` through Redis, one worker and PostgreSQL."""
    from bench.services import missing_modules, postgres_problem, redis_problem

    svc = ServiceArgs.from_args(args)
    reason = (
        missing_modules(
            "scheduler.submission",
            "scheduler.dispatch",
            "scheduler.cli",
            "scheduler.repository",
            "worker.tasks",
            "celery",
            "redis",
            "psycopg",
        )
        or postgres_problem(svc)
        or redis_problem(svc)
    )
    if reason:
        report.skip(E2E, reason)
        return
    try:
        _run_e2e(report, args, svc, workdir, folder, paths, checkpoint, sha256, device)
    except Exception as exc:  # report it with the other rows, then exit non-zero (main)
        report.fail(E2E, f"{type(exc).__name__}: {str(exc)[-400:]}")


def _classify(env: dict[str, str], inputs: Sequence[str], model_id: int) -> dict[str, Any]:
    from bench.services import mriq_command

    cmd = [*mriq_command(), "classify", *inputs, "--wait", "--model", str(model_id), "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(
            f"mriq classify exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-600:]}"
        )
    snap: dict[str, Any] = json.loads(proc.stdout[proc.stdout.index("{") :])
    return snap


# The parameters run_e2e hands on (plus the services): a look-alike parameter list, not
# logic twice.
def _run_e2e(
    report: Report,
    args: argparse.Namespace,
    svc: ServiceArgs,
    workdir: Path,
    folder: Path,
    paths: Sequence[Path],
    checkpoint: Path,
    sha256: str,
    device: str,
) -> None:
    from sqlalchemy import func, select

    from bench.services import fresh_database, mriq_env, owned_redis_db, running_worker
    from scheduler import repository
    from scheduler.database import make_engine, make_session_factory
    from scheduler.schema import PredictionRow
    from scheduler.settings import Settings

    data_dir = workdir / "mriq-data"
    with fresh_database(svc) as db_url, owned_redis_db(svc) as broker_url:
        engine = make_engine(db_url)
        try:
            sessions = make_session_factory(engine)
            with sessions() as s, s.begin():
                version = repository.register_model_version(
                    s,
                    training_job_id=None,
                    arch=args.arch,
                    label_mode="15",
                    classes=list(_classes()),
                    checkpoint_path=str(checkpoint),
                    checkpoint_sha256=sha256,
                    metrics={},
                )
                model_id = int(version.id)
            settings = Settings(
                data_dir=data_dir,
                database_url=db_url,
                broker_url=broker_url,
                data_roots=(workdir,),
                chunk_size=args.chunk_size,
            )
            env = mriq_env(
                data_dir=data_dir,
                database_url=db_url,
                broker_url=broker_url,
                roots=workdir,
                chunk_size=args.chunk_size,
                device=device,
                inference_streams=args.inference_streams,
                runtime=getattr(args, "runtime", None),
            )
            with running_worker(env, workdir / "worker.log", settings) as worker:
                # Warm-up job: the worker loads and caches the model once per process.
                _classify(env, [str(p) for p in paths[:PREDICTOR_BATCH]], model_id)
                with RssSampler(worker.proc.pid) as rss, Stopwatch() as sw:
                    snap = _classify(env, [str(folder)], model_id)
            job_id = int(snap["id"])
            with sessions() as s:
                job = repository.get_job(s, job_id)
                rows = repository.count_predictions(s, job_id)
                last_row = s.scalar(
                    select(func.max(PredictionRow.created_at)).where(PredictionRow.job_id == job_id)
                )
                created, finished = job.created_at, job.finished_at
                stamps = [
                    (int(i), t)
                    for i, t in s.execute(
                        select(PredictionRow.item_index, PredictionRow.created_at)
                        .where(PredictionRow.job_id == job_id)
                        .order_by(PredictionRow.item_index)
                    )
                ]
        finally:
            engine.dispose()
    n = len(paths)
    if snap.get("status") != "succeeded" or rows != n or finished is None:
        raise RuntimeError(f"job {job_id}: status {snap.get('status')}, {rows}/{n} rows")
    end = max(finished, last_row) if last_row is not None else finished
    seconds = (end - created).total_seconds()
    report.add(
        Measurement(E2E, n, seconds, note=f"chunk {args.chunk_size}, worker {rss.summary()}")
    )
    report.add(Measurement(E2E_CLI, n, sw.seconds, note="CLI start-up + 0.5 s polling"))
    profile = e2e_timeline(created, stamps, args.chunk_size)
    if profile:
        report.notes.append(profile)


def e2e_timeline(created: Any, stamps: Sequence[tuple[int, Any]], chunk_size: int) -> str:
    """Where an e2e job's wall time went, from its rows' commit times (a profile).

    Start-up is submission to the first row committed (submit, dispatch, the first batches'
    decoding and forward); a changeover is the gap between a chunk's last row and the next
    chunk's first, minus the median gap between batches inside chunks (what any batch costs).
    """
    if not stamps:
        return ""
    by_chunk: dict[int, list[float]] = {}
    for index, at in stamps:
        by_chunk.setdefault(index // chunk_size, []).append((at - created).total_seconds())
    chunks = [sorted(v) for _, v in sorted(by_chunk.items())]
    # Rows of one model batch are written together (microseconds apart): only gaps over
    # 5 ms are between batches.
    inner = sorted(
        b - a for times in chunks for a, b in zip(times, times[1:], strict=False) if b - a > 0.005
    )
    batch_gap = inner[len(inner) // 2] if inner else 0.0
    changes = [nxt[0] - cur[-1] - batch_gap for cur, nxt in zip(chunks, chunks[1:], strict=False)]
    total = chunks[-1][-1]
    extra = sum(max(0.0, c) for c in changes)
    return (
        f"e2e timeline: first row {chunks[0][0]:.2f} s after submission; "
        f"{len(chunks)} chunks, median batch-to-batch {batch_gap:.3f} s; chunk changeovers "
        f"add {extra:.2f} s in all ({100 * extra / total:.1f}% of {total:.1f} s)"
        + (f", the longest {max(changes):.2f} s" if changes else "")
    )


def _classes() -> tuple[str, ...]:
    from core.labels import classes_for

    return tuple(classes_for("15"))


# --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Report:
    import torch

    from core.checkpoint import load_checkpoint

    device_name, report = start_report(
        args,
        "mriq inference benchmark",
        {
            "arch": args.arch,
            "image_size": args.image_size,
            "n": args.n,
            "source": f"{args.source_size}px JPEG",
        },
        ceiling=CEILING,
        notebook=NOTEBOOK,
    )
    device = torch.device(device_name)
    with workspace(args.workdir, keep=args.keep) as workdir:
        print(
            f"preparing {args.n} images and a {args.arch} checkpoint in {workdir}",
            file=sys.stderr,
            flush=True,
        )
        folder = workdir / "images"
        with phase("images"):
            paths = make_images(folder, args.n, size=args.source_size, seed=args.seed)
        with phase("checkpoint"):
            model = make_checkpoint(
                workdir / "model.pt",
                arch=args.arch,
                image_size=args.image_size,
                crop=args.crop,
                seed=args.seed,
            )
            loaded = load_checkpoint(model.path, expected_sha256=model.sha256)
            net = loaded.model.eval()
        with phase("model-only"):
            pool = predecode(paths, loaded.meta.preset)
            best = model_only_sweep(
                report,
                net,
                pool,
                n=min(args.n, max(1, args.model_only_n)),
                batch_sizes=args.batch_sizes,
                device=device,
                compile_too=args.compile,
            )
            del pool
        if "allocator" in args.skip:
            report.skip(_other_allocator_row_name(), "--skip allocator")
        else:
            with phase("model-only, other allocator (child)"):
                other_allocator_row(
                    report,
                    workdir,
                    model.path,
                    paths,
                    n=min(args.n, max(1, args.model_only_n)),
                    best=best,
                    device=device_name,
                    threads=args.threads,
                )
        if "notebook" in args.skip:
            report.skip(NOTEBOOK, "--skip notebook")
        else:
            with phase("notebook"):
                run_notebook(
                    report,
                    net,
                    paths,
                    workdir=workdir,
                    checkpoint=model.path,
                    threads=args.threads,
                    arch=args.arch,
                    image_size=args.image_size,
                    device=device,
                    workers=args.notebook_workers,
                )
        with phase("predictor"):
            predictor = run_predictor(
                report, loaded, paths, device=device, streams=args.inference_streams
            )
        if "core.predict" in args.skip:
            report.skip(PREDICT_CLI, "--skip core.predict")
        else:
            with phase("core.predict"):
                run_predict_cli(report, model.path, folder, workdir, args.n, device=device_name)
        if args.e2e:
            with phase("e2e"):
                run_e2e(report, args, workdir, folder, paths, model.path, model.sha256, device_name)
        else:
            report.skip(E2E, "not requested (pass --e2e; needs Redis, PostgreSQL, a worker)")
        with phase("model-only ceiling again"):
            recheck_ceiling(
                report,
                net,
                predecode(paths, loaded.meta.preset),
                n=min(args.n, max(1, args.model_only_n)),
                best=best,
                device=device,
            )

    tuned = allocator_tuned()
    report.ratio("predictor/model-only", PREDICTOR, CEILING, target=">= 0.8 (as e2e)")
    report.ratio("core.predict/model-only", PREDICT_CLI, CEILING)
    report.ratio("e2e/model-only", E2E, CEILING, target=">= 0.8")
    report.ratio("e2e/notebook", E2E, NOTEBOOK, target=">= 3.5")
    report.ratio("e2e/notebook with tuned allocator", E2E, NOTEBOOK_TUNED)
    report.ratio("predictor/notebook", PREDICTOR, NOTEBOOK)
    report.ratio("BatchNorm folding (ceiling/unfolded)", CEILING, UNFOLDED)
    report.ratio("model-only settings (ceiling/default settings)", CEILING, DEFAULT_SETTINGS)
    other = _other_allocator_row_name()
    if tuned:
        report.ratio("allocator (tuned/glibc default)", CEILING, other, target="2-3x on CPU")
    else:
        report.ratio("allocator (tuned/glibc default)", other, CEILING, target="2-3x on CPU")
    e2e = report.row(E2E)
    if e2e is not None:
        # What the queue, the worker's task handling and SQL add on top of the same Predictor.
        overhead = max(0.0, e2e.seconds - predictor.seconds) / e2e.seconds
        report.add_ratio(
            Ratio(
                "queue+SQL overhead (share of e2e wall)",
                overhead,
                "<= 5% for a 5,000-image job",
                percent=True,
            )
        )
    else:
        report.add_ratio(
            Ratio(
                "queue+SQL overhead (share of e2e wall)",
                None,
                "<= 5% for a 5,000-image job",
                skipped="e2e not measured",
            )
        )
    report.notes.append(
        "in-process rows run under the "
        + (
            "tuned allocator (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=1 GiB), as mriq's "
            "worker does"
            if tuned
            else "environment's allocator (--no-reexec)"
        )
        + "; the notebook row the ratios use runs in a child under glibc's defaults, as a "
        "notebook does"
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.child_model_only is not None:
        return child_model_only(args.child_model_only)
    if args.child_notebook is not None:
        return child_notebook(args.child_notebook)
    report = run_report("bench.inference", raw, args, run)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
