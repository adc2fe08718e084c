"""Expanding a huge glob against the job limit: memory and time, mriq vs the old way.

A submission of ``<folder>/*.png`` over a folder of ``--n`` images with a job limit of
``--limit`` must be refused after about ``limit`` files, not after the whole folder was
listed and sorted. Each variant runs in a fresh child process (so peak RSS is its own):

- ``old``: what submission did before: ``sorted(glob.iglob(pattern, recursive=True))``,
  then the limit applied while walking the sorted list;
- ``mriq``: ``scheduler.expansion.expand_inputs(..., max_items=limit)``, consumed until
  the limit refuses it (``TooManyInputsError``).

Printed: seconds and RSS growth (peak minus start, MiB) of each, and their ratios.
Also a tree with two symlink loops under ``**`` (``old`` is given ``--loop-timeout``
seconds and reported as timed out when it does not finish), and ``list/mriq``: an
``@list.txt`` of ``--n`` lines (relative lines naming the folder's files, absolute lines
naming missing files: both are items) expanded in full.

    .venv/bin/python -m bench.expansion --n 200000 --limit 1000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _rss_now_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _child(variant: str, pattern: str, root: str, limit: int) -> None:
    """Child mode: one expansion; prints {"seconds", "cpu_seconds", "rss_growth_mib", "items"}
    as JSON."""
    import glob

    from scheduler import expansion, refusals

    before = _rss_now_kib()
    start = time.perf_counter()
    cpu_start = time.process_time()  # CPU seconds: comparable on a loaded machine
    items = 0
    refused = False
    if variant == "old":
        for _match in sorted(glob.iglob(pattern, recursive=True)):
            items += 1
            if items > limit:
                refused = True
                break
    else:
        try:
            for _path in expansion.expand_inputs([pattern], [Path(root)], max_items=limit):
                items += 1
                if items > limit:
                    refused = True
                    break
        except refusals.TooManyInputsError:
            refused = True
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_growth_mib": max(0, peak - before) / 1024,
        "items": items,
        "refused": refused,
    }))


def _run_child(
    variant: str, pattern: str, root: Path, limit: int, timeout: float
) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRIQ_")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "bench.expansion", "--child", variant, pattern, str(root),
           str(limit)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=REPO, check=False)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "seconds": timeout}
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} child exited {proc.returncode}: {proc.stderr[-500:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _make_flat(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # Empty files: expansion never opens them, and creating 200k stays quick.
        (folder / f"img_{i:07d}.png").touch()


def _make_list(list_file: Path, flat: Path, n: int) -> None:
    with list_file.open("w", encoding="utf-8") as fh:
        for i in range(n):
            line = f"flat/img_{i:07d}.png" if i % 2 else f"{flat}/missing_{i:07d}.png"
            fh.write(line + "\n")


def _make_loops(folder: Path) -> None:
    (folder / "a").mkdir(parents=True, exist_ok=True)
    (folder / "a" / "x.png").touch()
    (folder / "a" / "up").symlink_to("..")
    (folder / "a" / "up2").symlink_to("../..")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="files in the folder")
    parser.add_argument("--limit", type=int, default=1000, help="the job limit")
    parser.add_argument("--loop-timeout", type=float, default=30.0,
                        help="seconds the old way gets on the symlink loops")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, numbers mean nothing")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.limit, args.loop_timeout = 2000, 50, 5.0
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mriq-bench-expansion-", dir=args.workdir))
    try:
        return _measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _measure(args: argparse.Namespace, workdir: Path) -> int:
    flat, loops = workdir / "flat", workdir / "loops"
    _make_flat(flat, args.n)
    _make_loops(loops)
    results: dict[str, Any] = {"n": args.n, "limit": args.limit}
    pattern = str(flat / "*.png")
    for variant in ("old", "mriq"):
        results[f"flat/{variant}"] = _run_child(variant, pattern, flat, args.limit, 600.0)
    loop_pattern = str(loops / "**" / "*.png")
    for variant in ("old", "mriq"):
        results[f"loops/{variant}"] = _run_child(
            variant, loop_pattern, loops, args.limit, args.loop_timeout
        )
    list_file = workdir / "list.txt"
    _make_list(list_file, flat, args.n)
    results["list/mriq"] = _run_child("mriq", f"@{list_file}", workdir, args.n + 1, 600.0)
    old, new = results["flat/old"], results["flat/mriq"]
    ratios = {
        "flat RSS growth (mriq/old)": new["rss_growth_mib"] / max(old["rss_growth_mib"], 1e-3),
        "flat seconds (mriq/old)": new["seconds"] / max(old["seconds"], 1e-9),
    }
    results["ratios"] = ratios
    print(f"glob over {args.n:,} files, job limit {args.limit:,}")
    for key in ("flat/old", "flat/mriq", "loops/old", "loops/mriq", "list/mriq"):
        r = results[key]
        if r.get("timed_out"):
            print(f"{key:12} timed out after {r['seconds']:.0f} s")
        else:
            print(f"{key:12} {r['seconds']:8.3f} s (CPU {r['cpu_seconds']:.3f} s)  "
                  f"RSS +{r['rss_growth_mib']:7.1f} MiB  items {r['items']:,}  "
                  f"refused={r['refused']}")
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.3f}x")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
