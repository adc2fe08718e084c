"""Shared pieces of the benchmarks: image set, model checkpoint, timing, results table.

Every script measures mriq and its baselines *in one run* on the same image files and the
same weights, because absolute throughput on a shared machine drifts by tens of percent
between runs while ratios taken minutes apart stay meaningful. The results table therefore
always shows absolute figures next to ratios against the two references: the model-only
ceiling and the reference notebook's way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.cpus import available_cpus

REPO = Path(__file__).resolve().parents[1]

#: The allocator setting mriq's worker runs with (same values as
#: ``worker.runtime.ALLOCATOR_ENV``; copied so the benchmarks need not import the worker).
#: glibc reads them only at process start, hence the re-exec in :func:`reexec_with_allocator`.
ALLOCATOR_ENV: dict[str, str] = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}
#: Set in a re-exec'd benchmark process so a failed tuning can never loop.
_REEXEC_MARK = "MRIQ_BENCH_REEXECED"

#: Sizes used by ``--smoke``: just enough to run every code path in a few seconds.
SMOKE_ARCH = "resnet18"
SMOKE_IMAGE_SIZE = 64
SMOKE_N = 16
SMOKE_SOURCE_SIZE = 128


# --------------------------------------------------------------------------------------
# process environment


def allocator_tuned(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """True when the glibc allocator variables mriq's worker uses are set in ``env``."""
    env = os.environ if env is None else env
    return all(env.get(k) == v for k, v in ALLOCATOR_ENV.items())


def env_without_allocator() -> dict[str, str]:
    """The current environment minus the MALLOC_* tuning (glibc defaults in a child)."""
    return {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}


def env_with_allocator() -> dict[str, str]:
    env = dict(os.environ)
    env.update(ALLOCATOR_ENV)
    return env


def reexec_with_allocator(module: str, argv: Sequence[str]) -> None:
    """Re-exec ``python -m module argv`` with the worker's allocator setting, once.

    glibc reads MALLOC_* only at start-up, so a running process cannot change them. Running
    every in-process baseline under the same allocator as mriq's worker keeps the comparison
    about code, not allocator; the allocator's own effect is measured separately in a child.
    """
    if os.environ.get(_REEXEC_MARK) or allocator_tuned():
        return
    env = env_with_allocator()
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for benchmark subprocesses: repo importable, no stray MRIQ_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRIQ_")}
    env.pop(_REEXEC_MARK, None)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) if not path else f"{REPO}{os.pathsep}{path}"
    if extra:
        env.update(extra)
    return env


def machine_description(device: str | None) -> dict[str, Any]:
    """What the numbers were measured on (printed and stored with every result).

    ``device=None`` leaves torch out (the SQL benchmark never imports it).
    """
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpus": available_cpus(),
        "python": platform.python_version(),
        "allocator_tuned": allocator_tuned(),
    }
    if device is None:
        return info
    import torch

    info |= {
        "torch": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_mb(pid: int | None = None) -> float | None:
    """Resident set size of ``pid`` (default: this process) in MiB; None where unknown."""
    try:
        text = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return None


class RssSampler:
    """Samples another process's RSS in a thread, to show memory staying flat over a job."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.samples:
            return "rss n/a"
        s = self.samples
        return f"rss start {s[0]:.0f} MiB, peak {max(s):.0f}, end {s[-1]:.0f}"


# --------------------------------------------------------------------------------------
# workspace, images, model


@contextmanager
def workspace(path: Path | None, *, keep: bool) -> Iterator[Path]:
    """A scratch folder (``path`` or a fresh temp dir), removed afterwards unless ``keep``."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    folder = Path(tempfile.mkdtemp(prefix="mriq-bench-")).resolve()
    try:
        yield folder
    finally:
        if keep:
            print(f"kept workspace {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def make_images(
    folder: Path, n: int, *, size: int = 512, distinct: int = 32, seed: int = 0
) -> list[Path]:
    """``n`` MRI-like ``size`` x ``size`` grayscale JPEGs (from ``core.synth``) in ``folder``.

    Rendering a 512 px slice costs ~0.15 s, so only ``distinct`` slices are rendered and the
    files are variations of them (flips, 90-degree turns, JPEG quality): decoding and
    preprocessing cost the same as for all-distinct images, which is all a benchmark needs.
    Names are zero-padded so every reader sees the files in the same order.
    """
    import numpy as np
    from PIL import Image

    from core.labels import CLASSES_15, SEQUENCES
    from core.synth import render_slice

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = [
        render_slice(
            CLASSES_15[i % len(CLASSES_15)],
            SEQUENCES[i % len(SEQUENCES)],
            rng,
            size_range=(size, size),
        )
        for i in range(max(1, min(distinct, n)))
    ]
    paths: list[Path] = []
    for i in range(n):
        arr = pool[i % len(pool)]
        variant = i // len(pool)
        if variant % 2:
            arr = arr[:, ::-1]
        arr = np.rot90(arr, k=(variant // 2) % 4)
        path = folder / f"slice_{i:06d}.jpg"
        Image.fromarray(np.ascontiguousarray(arr), mode="L").save(
            path, format="JPEG", quality=int(rng.integers(80, 96))
        )
        paths.append(path)
    return paths


@dataclass(frozen=True)
class BenchModel:
    """The one set of weights every baseline of a run uses, as an mriq checkpoint."""

    path: Path
    sha256: str
    arch: str
    image_size: int
    classes: tuple[str, ...]


def make_checkpoint(
    path: Path, *, arch: str, image_size: int, crop: str = "brain", seed: int = 0
) -> BenchModel:
    """Randomly initialised ``arch`` over the 15 classes, saved as an mriq checkpoint.

    Random weights (weights="none") cost exactly what trained ones cost to run and need no
    download; seeding makes the weights the same in every run.
    """
    import torch

    from core.checkpoint import CheckpointMeta, save_checkpoint
    from core.labels import classes_for
    from core.models import build_model
    from core.transforms import PresetParams

    torch.manual_seed(seed)
    classes = tuple(classes_for("15"))
    model = build_model(arch, len(classes), weights="none")
    meta = CheckpointMeta(
        arch=arch,
        classes=classes,
        label_mode="15",
        preset=PresetParams(image_size=image_size, crop=crop),  # type: ignore[arg-type]
        metrics={"note": "random weights for benchmarking"},
    )
    sha = save_checkpoint(path, model=model, meta=meta)
    return BenchModel(path=path, sha256=sha, arch=arch, image_size=image_size, classes=classes)


# --------------------------------------------------------------------------------------
# timing


def sync(device: Any) -> None:
    """Wait for queued CUDA work, so a timer measures the work rather than its launch."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (perf_counter, monotonic)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Log how long a step of the script took (stderr), so slow set-up is visible."""
    start = time.perf_counter()
    cpu = time.process_time()
    try:
        yield
    finally:
        print(
            f"  [{name}: {time.perf_counter() - start:.1f} s wall, "
            f"{time.process_time() - cpu:.1f} s cpu in this process]",
            file=sys.stderr,
            flush=True,
        )


# --------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Measurement:
    """``items`` processed in ``seconds`` (a throughput row of the table)."""

    name: str
    items: int
    seconds: float
    unit: str = "img"
    note: str = ""

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class Ratio:
    """``value`` = numerator / denominator; ``skipped`` says why there is no value."""

    name: str
    value: float | None
    target: str = ""
    skipped: str | None = None
    percent: bool = False


@dataclass
class Report:
    """Rows and ratios of one benchmark run; renders the table and the JSON output."""

    title: str
    context: dict[str, Any]
    ceiling: str | None = None  # name of the model-only row ("vs model-only" column)
    notebook: str | None = None  # name of the notebook row ("vs notebook" column)
    rows: list[Measurement] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Rows that were asked for and broke (also listed as skipped, with the reason): the
    #: run still prints everything it measured, and the script exits non-zero.
    failed: list[str] = field(default_factory=list)

    def add(self, m: Measurement) -> Measurement:
        self.rows.append(m)
        print(
            f"  measured {m.name}: {m.rate:,.1f} {m.unit}/s ({m.items} in {m.seconds:.2f} s)"
            + (f" [{m.note}]" if m.note else ""),
            file=sys.stderr,
            flush=True,
        )
        return m

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append((name, reason))
        print(f"  skipped {name}: {reason}", file=sys.stderr, flush=True)

    def fail(self, name: str, reason: str) -> None:
        self.failed.append(name)
        self.skip(name, f"FAILED: {reason}")

    def row(self, name: str | None) -> Measurement | None:
        return next((m for m in self.rows if m.name == name), None) if name else None

    def ratio(
        self, name: str, numerator: str | None, denominator: str | None, *, target: str = ""
    ) -> Ratio:
        """Throughput ratio of two rows (skipped, with the reason, when either is missing)."""
        num, den = self.row(numerator), self.row(denominator)
        missing = [n for n, m in ((numerator, num), (denominator, den)) if m is None]
        if num is None or den is None:
            reasons = dict(self.skipped)
            why = "; ".join(f"{n}: {reasons.get(n or '', 'not measured')}" for n in missing)
            r = Ratio(name, None, target, skipped=why)
        else:
            r = Ratio(name, num.rate / den.rate, target)
        self.ratios.append(r)
        return r

    def add_ratio(self, r: Ratio) -> Ratio:
        self.ratios.append(r)
        return r

    # ---- output ------------------------------------------------------------------------

    def render(self) -> str:
        ceiling, notebook = self.row(self.ceiling), self.row(self.notebook)
        ctx = ", ".join(f"{k}={v}" for k, v in self.context.items())
        lines = [f"== {self.title} ==", ctx, ""]
        refs = ceiling is not None or notebook is not None
        head = f"{'measurement':<50} {'rate':>16} {'seconds':>9}"
        if refs:
            head += f" {'vs model-only':>14} {'vs notebook':>12}"
        lines += [head + "  note", "-" * (len(head) + 6)]
        for m in self.rows:
            line = f"{m.name:<50} {f'{m.rate:,.1f} {m.unit}/s':>16} {m.seconds:>9.2f}"
            if refs:
                same_unit = m.unit == "img"
                vs_c = f"{m.rate / ceiling.rate:.2f}x" if ceiling and same_unit else ""
                vs_n = f"{m.rate / notebook.rate:.2f}x" if notebook and same_unit else ""
                line += f" {vs_c:>14} {vs_n:>12}"
            lines.append(f"{line}  {m.note}".rstrip())
        for name, reason in self.skipped:
            lines.append(f"{name:<50} skipped: {reason}")
        lines.append("")
        for r in self.ratios:
            target = f"  (target {r.target})" if r.target else ""
            if r.value is None:
                lines.append(f"ratio {r.name}: skipped: {r.skipped}{target}")
            elif r.percent:
                lines.append(f"ratio {r.name}: {r.value * 100:.1f}%{target}")
            else:
                lines.append(f"ratio {r.name}: {r.value:.3f}x{target}")
        if self.notes:
            lines.append("")
            lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "context": self.context,
            "rows": [asdict(m) | {"rate": m.rate} for m in self.rows],
            "ratios": [asdict(r) for r in self.ratios],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "notes": list(self.notes),
            "failed": list(self.failed),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def finish(self, json_out: Path | None) -> None:
        """Print the table on stdout and write the JSON file when asked."""
        print(self.render(), flush=True)
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
            print(f"wrote {json_out}", file=sys.stderr)


# --------------------------------------------------------------------------------------
# arguments


def add_common_args(parser: argparse.ArgumentParser, *, arch: str, image_size: int, n: int) -> None:
    parser.add_argument("--arch", default=arch, help="model architecture (%(default)s)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=image_size,
        help="model input size in pixels (%(default)s)",
    )
    parser.add_argument("--n", type=int, default=n, help="number of images (%(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weights/images seed (%(default)s)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch folder (default: a temporary folder, removed after)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json-out", type=Path, default=None, help="also write results as JSON")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads here and in child processes (default: all CPUs "
        "this process may use, as mriq's worker does; --smoke uses 1)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny run that only checks the script works ({SMOKE_ARCH} at "
        f"{SMOKE_IMAGE_SIZE} px, {SMOKE_N} images); its numbers mean nothing",
    )


def apply_smoke(args: argparse.Namespace) -> None:
    """Shrink a run to the smoke sizes (in place) and pin the thread count.

    Smoke runs use one thread: on a busy CI machine spinning OpenMP threads of several test
    processes fight over the cores and a 2-thread smoke run burns several times the CPU.
    """
    if args.smoke:
        args.arch = SMOKE_ARCH
        args.image_size = SMOKE_IMAGE_SIZE
        args.n = SMOKE_N
        if args.threads is None:
            args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        # Entry point only: children (core.predict, the worker, allocator child) inherit it.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)


def resolve_device(spec: str) -> str:
    from core.devices import select_device

    return str(select_device(spec))


SMOKE_NOTE = "smoke run: tiny sizes, the numbers mean nothing"


def start_report(
    args: argparse.Namespace, title: str, context: dict[str, Any], **fields: Any
) -> tuple[str, Report]:
    """A benchmark's device (``--device`` resolved, ``--threads`` applied) and its report,
    headed by ``context``, ``--smoke`` and the machine; ``fields`` go to :class:`Report`."""
    from core.devices import configure_cpu_threads

    device = resolve_device(args.device)
    # Same thread count for every row (the worker and core.predict size theirs the same way).
    configure_cpu_threads(args.threads)
    context = context | {"smoke": args.smoke} | machine_description(device)
    return device, Report(title=title, context=context, **fields)


def run_report(
    module: str, raw: Sequence[str], args: argparse.Namespace, run: Callable[..., Report]
) -> Report:
    """A benchmark's ``main`` after parsing: re-exec with the worker's allocator (unless
    ``--no-reexec``), ``run(args)``, then print the report (with :data:`SMOKE_NOTE` on a
    ``--smoke`` run) and write ``--json-out``."""
    if not args.no_reexec:
        reexec_with_allocator(module, raw)
    report = run(args)
    if args.smoke:
        report.notes.append(SMOKE_NOTE)
    report.finish(args.json_out)
    return report


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Stop a child that may still run: SIGTERM, 20 s to exit, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
