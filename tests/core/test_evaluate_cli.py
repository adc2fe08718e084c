"""``python -m core.evaluate`` end to end (subprocess) and its helpers (in process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.evaluate import main, remap_to_checkpoint
from tests.core.test_inference import make_tiny_checkpoint_file, write_gray_png

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.evaluate", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path, Path]:
    """(checkpoint, sha256, data folder, the broken file inside it)."""
    root = tmp_path_factory.mktemp("eval")
    ckpt, sha = make_tiny_checkpoint_file(root)
    data = root / "data"
    for c, cls in enumerate(["Glioblastoma", "Normal", "Meningioma"]):
        for i in range(2):
            write_gray_png(data / cls / f"{i}.png", seed=10 * c + i)
    broken = data / "Normal" / "broken.jpg"
    broken.write_text("not an image")
    return ckpt, sha, data, broken


def test_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--checkpoint", "--data", "--out", "--json", "--batch-size", "--device",
                 "--labels-from-checkpoint"):
        assert flag in result.stdout


def test_json_output_and_out_dir(setup: tuple[Path, str, Path, Path], tmp_path: Path) -> None:
    ckpt, sha, data, broken = setup
    out = tmp_path / "out"
    result = run_cli(
        "--checkpoint", str(ckpt), "--data", str(data), "--json", "--out", str(out),
        "--device", "cpu", "--batch-size", "4", "--sha256", sha,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert isinstance(payload, dict)
    for key in ("n", "accuracy", "macro_f1", "per_class", "confusion_matrix", "classes",
                "top3_accuracy", "roc_auc_ovr_macro", "errors", "checkpoint_sha256"):
        assert key in payload, key
    assert payload["n"] == 6
    assert payload["checkpoint_sha256"] == sha
    assert [e["path"] for e in payload["errors"]] == [str(broken)]
    assert len(payload["classes"]) == 15
    assert json.loads((out / "report.json").read_text())["n"] == 6
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("reliability_diagram", "per_class_metrics", "roc_curves", "confident_mistakes"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # The tiny checkpoint predates calibration: temperature 1.0, ECE the same both ways.
    assert payload["temperature"] == 1.0 and payload["calibrated"] is False
    assert payload["ece"] == payload["ece_uncalibrated"] is not None
    assert payload["nll"] == payload["nll_uncalibrated"] is not None


def test_summary_table(
    setup: tuple[Path, str, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _, data, broken = setup
    rc = main(["--checkpoint", str(ckpt), "--data", str(data), "--device", "cpu",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "accuracy" in out and "Glioblastoma" in out and "macro" in out
    assert str(broken) in out  # unreadable files are listed, not hidden


def test_errors_exit_1(setup: tuple[Path, str, Path, Path], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, _, data, _ = setup
    assert main(["--checkpoint", str(ckpt), "--data", str(data), "--sha256", "0" * 64]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "none.pt"), "--data", str(data)]) == 1
    unknown = tmp_path / "weird"
    write_gray_png(unknown / "NotAClass" / "a.png", seed=1)
    assert main(["--checkpoint", str(ckpt), "--data", str(unknown), "--device", "cpu"]) == 1
    assert "NotAClass" in capsys.readouterr().err


def test_remap_to_checkpoint_by_name() -> None:
    from core.dataset import Sample
    from core.labels import CLASSES_15

    g = CLASSES_15.index("Glioblastoma")
    n = CLASSES_15.index("Normal")
    samples = [Sample(Path("a.png"), g, "Glioblastoma"), Sample(Path("b.png"), n, "Normal")]
    kept, dropped = remap_to_checkpoint(samples, "15", CLASSES_15, drop_unknown=False)
    assert kept == samples and dropped == {}
    subset = ("Normal", "Glioblastoma")
    kept, _ = remap_to_checkpoint(samples, "15", subset, drop_unknown=False)
    assert [s.label for s in kept] == [1, 0]
    with pytest.raises(ValueError, match="--labels-from-checkpoint"):
        remap_to_checkpoint(samples, "15", ("Normal", "Meningioma"), drop_unknown=False)
    kept, dropped = remap_to_checkpoint(samples, "15", ("Normal", "Meningioma"),
                                        drop_unknown=True)
    assert [s.path.name for s in kept] == ["b.png"] and dropped == {"Glioblastoma": 1}
