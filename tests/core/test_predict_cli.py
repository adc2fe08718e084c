"""``python -m core.predict`` end to end (subprocess) plus in-process edge cases."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.predict import CSV_COLUMNS, main
from tests.core.test_inference import make_tiny_checkpoint_file, write_gray_png

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.predict", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    # main() sizes torch's (process-wide) thread pool for its forward streams, as an entry
    # point should; the rest of this test process keeps its own setting.
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return make_tiny_checkpoint_file(tmp_path_factory.mktemp("pred"))


def test_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--checkpoint", "--out", "--top-k", "--batch-size", "--device",
                 "--num-workers", "--streams", "--sha256", "INPUT"):
        assert flag in result.stdout


def test_csv_rows_columns_and_errors(ckpt: tuple[Path, str], tmp_path: Path) -> None:
    path, sha = ckpt
    folder = tmp_path / "imgs"
    good = [write_gray_png(folder / f"sub/{i}.png", seed=i) for i in range(3)]
    broken = folder / "zzz.jpg"
    broken.write_bytes(b"")
    single = write_gray_png(tmp_path / "single.png", seed=9)
    listed = tmp_path / "list.txt"
    listed.write_text("# inputs\nsingle.png\n\nmissing.png\n")
    out = tmp_path / "res" / "preds.csv"
    result = run_cli(
        "--checkpoint", str(path), str(folder), f"@{listed}", "--out", str(out),
        "--top-k", "2", "--batch-size", "2", "--device", "cpu", "--sha256", sha,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # the CSV went to --out; nothing else on stdout
    assert "6 file(s): 4 classified, 2 error(s)" in result.stderr
    with out.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS == ("path", "label", "confidence", "top_k", "error")
    body = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    # A folder's own files come before its subfolders' (core.inputs).
    assert [r["path"] for r in body] == [
        str(broken), *(str(p) for p in good), str(single), str(tmp_path / "missing.png"),
    ]
    for r in body:
        if r["error"]:
            assert r["label"] == r["confidence"] == r["top_k"] == ""
        else:
            pairs = [item.rsplit(":", 1) for item in r["top_k"].split(";")]
            assert len(pairs) == 2
            assert pairs[0][0] == r["label"]
            assert float(pairs[0][1]) == pytest.approx(float(r["confidence"]))
            assert 0.0 < float(r["confidence"]) <= 1.0
    assert sum(1 for r in body if r["error"]) == 2


def test_csv_to_stdout_in_process(ckpt: tuple[Path, str], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = ckpt
    img = write_gray_png(tmp_path / "a.png", seed=1)
    assert main(["--checkpoint", str(path), str(img), "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.reader(io.StringIO(captured.out)))
    assert len(rows) == 2 and rows[1][0] == str(img) and len(rows[1][3].split(";")) == 3
    assert "1 file(s): 1 classified, 0 error(s)" in captured.err


def test_failures_exit_1(ckpt: tuple[Path, str], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = ckpt
    img = write_gray_png(tmp_path / "a.png", seed=1)
    assert main(["--checkpoint", str(path), str(img), "--sha256", "f" * 64]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    assert main(["--checkpoint", str(path), f"@{tmp_path / 'nolist.txt'}",
                 "--device", "cpu", "--no-progress"]) == 1
    assert "list file not found" in capsys.readouterr().err
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert main(["--checkpoint", str(path), str(empty), "--device", "cpu",
                 "--no-progress"]) == 1
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(path), str(img), "--top-k", "0"])


def test_streams_give_the_same_rows(ckpt: tuple[Path, str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from core.devices import cpu_parallelism

    path, _ = ckpt
    folder = tmp_path / "imgs"
    for i in range(7):
        write_gray_png(folder / f"{i}.png", seed=i)
    (folder / "bad.png").write_bytes(b"")
    split = cpu_parallelism()
    rows = {}
    for streams in ("1", "2", "auto"):
        out = tmp_path / f"s{streams}.csv"
        assert main(["--checkpoint", str(path), str(folder), "--device", "cpu", "--no-progress",
                     "--batch-size", "2", "--streams", streams, "--out", str(out)]) == 0
        with out.open(newline="") as fh:
            rows[streams] = list(csv.DictReader(fh))
        # the CPUs are shared out between the streams
        expected = max(1, split.streams * split.threads // int(streams)) if streams != "auto" \
            else split.threads
        assert torch.get_num_threads() == expected
    assert len(rows["1"]) == 8
    for other in ("2", "auto"):
        for a, b in zip(rows["1"], rows[other], strict=True):
            assert (a["path"], a["label"], a["error"]) == (b["path"], b["label"], b["error"])
            if a["confidence"]:
                assert float(a["confidence"]) == pytest.approx(float(b["confidence"]), abs=1e-5)
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            main(["--checkpoint", str(path), str(folder), "--streams", bad])
    assert "--streams must be" in capsys.readouterr().err
