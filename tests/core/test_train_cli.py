"""``python -m core.train``: help, a tiny real run and clear exit-2 errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.train import build_parser, config_from_args, main
from tests.factories import make_flat_dataset

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.train", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_help_lists_the_options() -> None:
    proc = run_cli("--help", timeout=120)
    assert proc.returncode == 0
    for option in ("--data", "--out", "--arch", "--epochs", "--image-size", "--batch-size",
                   "--lr", "--finetune", "--weights", "--labels", "--seed", "--device",
                   "--resume", "--optimizer", "--scheduler", "--weight-decay", "--clip",
                   "--clip-value", "--no-weighted-loss", "--patience", "--crop",
                   "--skip-unknown", "--num-workers", "efficientnet_b0"):
        assert option in proc.stdout, option


def test_arguments_map_onto_the_config(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--arch", "resnet18",
        "--epochs", "3", "--image-size", "64", "--batch-size", "8", "--lr", "0.01",
        "--finetune", "--weights", "none", "--labels", "44", "--seed", "5", "--device", "cpu",
        "--resume", "auto", "--optimizer", "sgd", "--scheduler", "cosine", "--clip", "value",
        "--clip-value", "0.1", "--no-weighted-loss", "--patience", "0", "--crop", "profile",
        "--skip-unknown", "--num-workers", "1",
    ])
    cfg = config_from_args(args)
    assert (cfg.arch, cfg.epochs, cfg.image_size, cfg.batch_size, cfg.lr) == (
        "resnet18", 3, 64, 8, 0.01)
    assert cfg.finetune and cfg.weights == "none" and cfg.labels == "44" and cfg.seed == 5
    assert cfg.resume == "auto" and cfg.optimizer == "sgd" and cfg.scheduler == "cosine"
    assert cfg.clip == "value" and cfg.clip_value == 0.1 and not cfg.weighted_loss
    assert cfg.early_stopping_patience == 0 and cfg.crop == "profile"
    assert cfg.skip_unknown and cfg.num_workers == 1 and cfg.device == "cpu"


def test_missing_data_dir_exits_2(tmp_path: Path) -> None:
    proc = run_cli("--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "does not exist" in proc.stderr


def test_invalid_option_value_exits_2(tmp_path: Path) -> None:
    proc = run_cli("--data", str(tmp_path), "--out", str(tmp_path / "o"), "--epochs", "0")
    assert proc.returncode == 2 and "epochs" in proc.stderr


def test_unknown_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process: the error path needs torch imported, which a subprocess pays for again.
    data = make_flat_dataset(tmp_path, folders={"Meningioma": 2, "Holiday photos": 2}, size=32)
    code = main(["--data", str(data), "--out", str(tmp_path / "o"), "--arch", "resnet18",
                 "--weights", "none", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Holiday photos" in err and "--skip-unknown" in err


def test_empty_data_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    code = main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                 "--weights", "none", "--device", "cpu"])
    assert code == 2 and "data" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run(tmp_path: Path) -> None:
    data = make_flat_dataset(tmp_path, folders={"Glioblastoma": 6, "Meningioma": 6}, size=40)
    out = tmp_path / "out"
    proc = run_cli("--data", str(data), "--out", str(out), "--arch", "resnet18", "--epochs", "1",
                   "--image-size", "32", "--batch-size", "4", "--weights", "none",
                   "--device", "cpu", "--crop", "none", "--oversample", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Glioblastoma" in proc.stdout  # the class table
    assert "epoch   1/1" in proc.stdout and "val_macro_f1" in proc.stdout
    assert "test: n=" in proc.stdout and str(out / "best.pt") in proc.stdout
    report = json.loads((out / "test_report.json").read_text())
    assert report["n"] >= 1
    for name in ("best.pt", "last.pt", "metrics.json", "confusion_matrix.png",
                 "training_curves.png"):
        assert (out / name).is_file(), name
