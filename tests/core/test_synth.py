from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from core.imaging import read_image
from core.labels import CLASSES_15, SEQUENCES, parse_folder_name
from core.synth import FOLDERS_44C, REAL_COUNTS, main, render_slice, synthesize
from tests.factories import SMALL_FOLDERS, make_dataset, synth_summary

SHARED_CSV = Path(__file__).resolve().parents[3] / "shared" / "kaggle44c-folders.csv"


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_embedded_folders_are_the_44_real_ones() -> None:
    assert len(FOLDERS_44C) == 44
    for name in FOLDERS_44C:
        parsed = parse_folder_name(name)
        assert parsed is not None and parsed.cls in CLASSES_15 and parsed.sequence in SEQUENCES
    if SHARED_CSV.is_file():
        with SHARED_CSV.open(newline="") as fh:
            rows = {r["folder"]: int(r["images"]) for r in csv.DictReader(fh)}
        assert dict(REAL_COUNTS) == rows


def test_writes_every_real_folder(tmp_path: Path) -> None:
    summary = synth_summary(tmp_path, per_folder=1, size=32, formats=("png",))
    on_disk = sorted(p.name for p in summary.out.iterdir())
    assert on_disk == sorted(FOLDERS_44C)
    assert summary.n_images == 44
    assert all(len(list((summary.out / f).iterdir())) == 1 for f in FOLDERS_44C)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = make_dataset(tmp_path, per_folder=2, folders=SMALL_FOLDERS, seed=3, name="a")
    b = make_dataset(tmp_path, per_folder=2, folders=SMALL_FOLDERS, seed=3, name="b")
    c = make_dataset(tmp_path, per_folder=2, folders=SMALL_FOLDERS, seed=4, name="c")
    assert _digests(a) == _digests(b)
    assert _digests(a) != _digests(c)


def test_more_images_keep_the_first_ones(tmp_path: Path) -> None:
    small = make_dataset(tmp_path, per_folder=2, folders=SMALL_FOLDERS[:2], name="s")
    big = make_dataset(tmp_path, per_folder=4, folders=SMALL_FOLDERS[:2], name="b")
    ds, db = _digests(small), _digests(big)
    assert all(db[k] == v for k, v in ds.items())


def test_real_counts_scale(tmp_path: Path) -> None:
    folders = ("Meningioma T1C+", "Ganglioglioma T1C+", "_NORMAL T2")
    summary = synthesize(tmp_path / "d", real_counts_scale=0.02, folders=folders,
                         image_size_range=(32, 32), formats=("png",))
    expected = {f: max(1, round(REAL_COUNTS[f] * 0.02)) for f in folders}
    assert dict(summary.counts) == expected == {"Meningioma T1C+": 7, "Ganglioglioma T1C+": 1,
                                               "_NORMAL T2": 5}
    for f, n in expected.items():
        assert len(list((summary.out / f).iterdir())) == n
    assert summary.n_images == sum(expected.values())


def test_folders_csv_overrides_names_and_counts(tmp_path: Path) -> None:
    csv_path = tmp_path / "f.csv"
    csv_path.write_text("folder,class,sequence,images\nSchwannoma T2,Schwannoma,T2,100\n"
                        "_NORMAL T1,Normal,T1,50\n")
    summary = synthesize(tmp_path / "d", real_counts_scale=0.03, folders_csv=csv_path,
                         image_size_range=(32, 32))
    assert dict(summary.counts) == {"Schwannoma T2": 3, "_NORMAL T1": 2}


def test_images_decode_with_sizes_in_range_and_mixed_formats(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, per_folder=6, folders=SMALL_FOLDERS, size=(40, 56))
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert {p.suffix for p in files} >= {".png", ".jpg"}
    for p in files:
        name = p.name
        assert name[:3].isdigit() and name[3] == "_"
        img = read_image(p)
        assert img.ndim == 2 and img.dtype == np.float32
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert all(40 <= side <= 56 for side in img.shape)
        # Dark background corners, brighter head in the middle.
        h, w = img.shape
        assert img[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean() > img[:4, :4].mean() + 0.15


def test_lesion_classes_differ_from_normal() -> None:
    # Same generator state: only the class-specific lesion drawing differs.
    normal = render_slice("Normal", "T1C+", np.random.default_rng(1), size_range=(64, 64))
    for cls in CLASSES_15:
        if cls == "Normal":
            continue
        img = render_slice(cls, "T1C+", np.random.default_rng(1), size_range=(64, 64))
        assert img.shape == normal.shape
        assert np.abs(img.astype(int) - normal.astype(int)).mean() > 0.5, cls


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_folder": None},
        {"real_counts_scale": 0.0},
        {"image_size_range": (64, 32)},
        {"formats": ("gif",)},
        {"folders": ("Nope T1",)},
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        synthesize(tmp_path / "d", **kwargs)  # type: ignore[arg-type]


def test_cli_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--per-folder", "1", "--seed", "2", "--size-min", "32",
                 "--size-max", "40"]) == 0
    text = capsys.readouterr().out
    assert "wrote 44 images in 44 folders" in text
    assert len([p for p in out.rglob("*") if p.is_file()]) == 44


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--real-counts" in capsys.readouterr().out
