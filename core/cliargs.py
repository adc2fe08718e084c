"""The command-line options that ``python -m core.predict`` and ``core.evaluate`` share."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = [
    "checkpoint_parser",
    "add_runtime_arguments",
    "add_sha256_argument",
    "check_at_least",
]


def checkpoint_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``python -m <module>``, with its required ``--checkpoint``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file (.pt)")
    return parser


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--device`` and ``--num-workers``: how a checkpoint is run."""
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (32)")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N] (auto)"
    )
    parser.add_argument(
        "--num-workers", type=int, default=0, help="image-decoding worker processes (0)"
    )


def add_sha256_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sha256", default=None, help="refuse the checkpoint unless its sha256 matches"
    )


def check_at_least(parser: argparse.ArgumentParser, name: str, value: int, low: int) -> None:
    """A usage error (exit 2) unless ``value >= low``."""
    if value < low:
        parser.error(f"{name} must be >= {low}, not {value}")
