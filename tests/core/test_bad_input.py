"""Bad input through core: every file gets a prediction or a readable error row, in order.

The corpus comes from :mod:`tests.badinput` (also used by the worker/API fault tests).

Symlinks pointing outside the data root: at the core level such a link is just a readable
file and is classified (``symlink_outside_root`` expects a prediction). Refusing it is the
scheduler's job at submission time (``scheduler.paths.confine``); that is checked here too,
and in the scheduler's own tests.

Unreadable files: tests run as root, which reads a chmod-000 file anyway, so the
``no_read_permission`` kind expects whatever opening the file actually did (see the
corpus module).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from core.errors import (
    CorruptImageError,
    EmptyFileError,
    ImageReadError,
    ImageTooLargeError,
    ImageTooSmallError,
    NotAFileError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from core.imaging import read_image
from core.inference import Prediction, Predictor
from core.inputs import expand_inputs
from tests.badinput import (
    BadInput,
    make_corpus,
    make_dataset_with_bad_files,
    make_dataset_with_empty_class,
    make_empty_folder,
    make_list_file,
    make_single_class_dataset,
    non_utf8_name,
)
from tests.core.test_inference import make_tiny_checkpoint_file

# What read_image must do per kind: None = decode, else the error class it raises.
READ_IMAGE_OUTCOME: dict[str, type[ImageReadError] | None] = {
    "good_png": None,
    "zero_bytes": EmptyFileError,
    "truncated_jpeg": CorruptImageError,
    "truncated_png": CorruptImageError,
    "jpeg_cut_in_header": CorruptImageError,
    "text_named_jpg": UnsupportedFormatError,
    "html_named_jpg": UnsupportedFormatError,
    "pdf_named_jpg": UnsupportedFormatError,
    "random_bytes_named_png": UnsupportedFormatError,
    "webp_named_jpg": UnsupportedFormatError,
    "one_by_one": ImageTooSmallError,
    "tiny_4x4": ImageTooSmallError,
    "png_header_bomb_30000": ImageTooLargeError,
    "png_header_9000_over_budget": ImageTooLargeError,
    "jpeg_header_bomb_30000": ImageTooLargeError,
    "huge_aspect_10000x8": None,
    "huge_aspect_10000x4": ImageTooSmallError,
    "blank_black": None,
    "gray16_png": None,
    "gray16_tiff": None,
    "float32_tiff_with_nan_and_inf": None,
    "cmyk_jpeg": None,
    "palette_png_with_alpha": None,
    "rgba_png": None,
    "la_png": None,
    "one_bit_png": None,
    "bmp": None,
    "exif_rotated_jpeg": None,
    "animated_gif": None,
    "gif_with_transparency": None,
    "multipage_tiff": None,
    "jpeg_named_png": None,
    "uppercase_suffix": None,
    "dicom_monochrome2": None,
    "dicom_monochrome1": None,
    "dicom_without_preamble": None,
    "dicom_without_pixel_data": UnsupportedFormatError,
    "dicom_unsupported_transfer_syntax": UnsupportedFormatError,
    "dicom_truncated_pixel_data": CorruptImageError,
    "nifti": UnsupportedFormatError,
    "nifti_gz": UnsupportedFormatError,
    "nifti_named_png": UnsupportedFormatError,
    "symlink_outside_root": None,
    "broken_symlink": UnreadableFileError,
    "symlink_loop": UnreadableFileError,
    "missing_file": UnreadableFileError,
    "directory_named_jpg": NotAFileError,
    "fifo_named_jpg": NotAFileError,
    "no_read_permission": UnreadableFileError,  # only when the file really is unreadable
    "non_utf8_file_name": None,
    "spaces_and_unicode_path": None,
    "same_path_twice": None,
}

# Text that would mean an exception's guts leaked into a user-facing reason.
_LEAKS = ("Traceback", 'File "', "\n", "<class ", "object at 0x")


def _assert_readable(reason: str | None, expected: str | None, kind: str) -> None:
    assert reason, f"{kind}: empty error reason"
    assert reason.strip() == reason, f"{kind}: untrimmed reason {reason!r}"
    for leak in _LEAKS:
        assert leak not in reason, f"{kind}: reason leaks {leak!r}: {reason!r}"
    if expected is not None:
        assert expected.lower() in reason.lower(), f"{kind}: {expected!r} not in {reason!r}"


@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("bad_input")
    return base / "data root", base / "elsewhere"


@pytest.fixture(scope="module")
def corpus(corpus_dirs: tuple[Path, Path]) -> list[BadInput]:
    root, outside = corpus_dirs
    return make_corpus(root, outside_root=outside)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return make_tiny_checkpoint_file(tmp_path_factory.mktemp("ckpt"))


def _predictor(
    checkpoint: tuple[Path, str], *, batch_size: int, num_workers: int = 0
) -> Predictor:
    from core.checkpoint import load_checkpoint

    path, sha = checkpoint
    return Predictor(
        load_checkpoint(path, expected_sha256=sha), batch_size=batch_size, num_workers=num_workers
    )


@pytest.fixture(scope="module")
def predictor(checkpoint: tuple[Path, str]) -> Predictor:
    return _predictor(checkpoint, batch_size=8)


def _by_kind(corpus: list[BadInput]) -> dict[str, BadInput]:
    return {b.kind: b for b in corpus}


# --------------------------------------------------------------------------- the corpus


def test_corpus_has_25_plus_kinds_and_builds_fast(tmp_path: Path) -> None:
    started = time.perf_counter()
    entries = make_corpus(tmp_path / "root", outside_root=tmp_path / "outside")
    elapsed = time.perf_counter() - started
    kinds = [b.kind for b in entries]
    assert len(set(kinds)) == len(kinds) >= 25
    assert set(kinds) == set(READ_IMAGE_OUTCOME)
    assert elapsed < 2.0, f"corpus took {elapsed:.2f} s"
    same = _by_kind(entries)["same_path_twice"]
    assert sum(b.path == same.path for b in entries) == 2
    assert all(b.reason_contains is None for b in entries if b.expect == "prediction")
    assert all(b.reason_contains for b in entries if b.expect == "error")
    outside = _by_kind(entries)["symlink_outside_root"].path
    assert outside.is_symlink() and not outside.resolve().is_relative_to(tmp_path / "root")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(READ_IMAGE_OUTCOME))
def test_read_image_per_kind(corpus: list[BadInput], kind: str) -> None:
    entry = _by_kind(corpus)[kind]
    error_class = READ_IMAGE_OUTCOME[kind] if entry.expect == "error" else None
    if error_class is None:
        assert entry.expect == "prediction"
        img = read_image(entry.path)
        assert img.ndim == 2 and img.dtype == np.float32
        assert min(img.shape) >= 8
        assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    else:
        with pytest.raises(error_class) as info:
            read_image(entry.path)
        assert info.value.path == entry.path
        _assert_readable(info.value.reason, entry.reason_contains, kind)


def test_decoded_kinds_mean_what_they_say(corpus: list[BadInput]) -> None:
    """Spot checks that 'decodes' means decoded correctly, not just 'did not raise'."""
    k = _by_kind(corpus)
    # EXIF orientation 6 turns the stored 48x32 (WxH) into a 32-wide, 48-high slice.
    assert read_image(k["exif_rotated_jpeg"].path).shape == (48, 32)
    # MONOCHROME1 is the inverse of the same pixels as MONOCHROME2.
    mono1 = read_image(k["dicom_monochrome1"].path)
    mono2 = read_image(k["dicom_monochrome2"].path)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # NaN/inf dead pixels must not blank the slice; NaN -> 0, +inf -> 1.
    floats = read_image(k["float32_tiff_with_nan_and_inf"].path)
    assert floats[:4, :4].max() == 0.0 and floats[-1, -1] == 1.0
    assert floats[10:38, 10:38].max() > 0.5
    # Content, not the name, decides the format.
    np.testing.assert_allclose(
        read_image(k["jpeg_named_png"].path), read_image(k["uppercase_suffix"].path)
    )
    assert read_image(k["huge_aspect_10000x8"].path).shape == (8, 10_000)
    assert read_image(k["blank_black"].path).max() == 0.0
    assert os.fsencode(k["non_utf8_file_name"].path.name) == os.fsencode(non_utf8_name())


# --------------------------------------------------------------------------- predictor


def _check_rows(entries: list[BadInput], rows: list[Prediction], classes: tuple[str, ...]) -> None:
    assert len(rows) == len(entries)
    for entry, row in zip(entries, rows, strict=True):
        assert row.path == str(entry.path), f"{entry.kind}: out of order"
        if entry.expect == "prediction":
            assert row.ok, f"{entry.kind}: unexpected error {row.error!r}"
            assert row.label in classes
            assert row.confidence is not None and 0.0 < row.confidence <= 1.0
            assert len(row.top_k) == 3 and row.top_k[0] == (row.label, row.confidence)
        else:
            assert not row.ok, f"{entry.kind}: expected an error, got {row.label}"
            assert row.label is None and row.confidence is None and row.top_k == ()
            _assert_readable(row.error, entry.reason_contains, entry.kind)


@pytest.mark.timeout(120)
def test_predictor_answers_every_input_once_in_order(
    corpus: list[BadInput], predictor: Predictor
) -> None:
    rows = list(predictor.predict([b.path for b in corpus]))
    _check_rows(corpus, rows, predictor.classes)
    # The same path twice gets the same answer twice (to float noise: the two copies sit in
    # different batches, and batch composition changes the summation order).
    a, b = [r for r in rows if r.path == str(_by_kind(corpus)["same_path_twice"].path)]
    assert a.label == b.label and a.confidence == pytest.approx(b.confidence, abs=1e-5)


@pytest.mark.timeout(180)
def test_predictor_with_worker_processes(
    corpus: list[BadInput], checkpoint: tuple[Path, str]
) -> None:
    """DataLoader workers: reasons cross the process boundary, the FIFO blocks no worker."""
    workers = _predictor(checkpoint, batch_size=4, num_workers=2)
    rows = list(workers.predict(str(b.path) for b in corpus))
    _check_rows(corpus, rows, workers.classes)


@pytest.mark.timeout(120)
def test_walking_the_corpus_folder_never_hangs(
    corpus: list[BadInput], corpus_dirs: tuple[Path, Path], predictor: Predictor
) -> None:
    """A folder input walks into symlink loops, FIFOs and 'x.jpg' directories safely."""
    root, _ = corpus_dirs
    paths = list(expand_inputs([str(root)]))
    names = {p.name for p in paths}
    # Image-suffixed non-files are yielded (and become error rows); the folder named
    # folder.jpg is walked into; NIfTI volumes are not image suffixes, so a walk skips them.
    assert {"pipe.jpg", "loop_a.png", "broken_link.png", "inside.png"} <= names
    assert "folder.jpg" not in names and "volume.nii" not in names
    assert len(paths) == len(set(paths))
    rows = list(predictor.predict(paths))
    assert [r.path for r in rows] == [str(p) for p in paths]
    for row in rows:
        if not row.ok:
            _assert_readable(row.error, None, row.path)


# --------------------------------------------------------------------------- list file


@pytest.fixture(scope="module")
def list_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    return make_list_file(tmp_path_factory.mktemp("list"))


def test_ten_thousand_line_list_expands_lazily_with_missing_paths(
    list_file: tuple[Path, int],
) -> None:
    path, n_missing = list_file
    assert n_missing == 10_000 // 97
    expanded: Iterator[Path] = expand_inputs([f"@{path}"])
    first = list(islice(expanded, 5))  # streams: nothing forces the whole list
    rest = list(expanded)
    paths = first + rest
    assert len(paths) == 10_000
    missing = [p for p in paths if not p.exists()]
    assert len(missing) == n_missing
    assert all(p.name.startswith("missing_") for p in missing)
    # Relative lines resolve against the list's folder; the non-UTF-8 line round-trips.
    assert all(p.is_absolute() for p in paths)
    assert any(os.fsencode(p.name) == os.fsencode(non_utf8_name()) and p.is_file()
               for p in paths)


@pytest.mark.timeout(180)
def test_list_slice_through_the_predictor(
    list_file: tuple[Path, int], checkpoint: tuple[Path, str]
) -> None:
    path, _ = list_file
    paths = list(islice(expand_inputs([f"@{path}"]), 300))
    rows = list(_predictor(checkpoint, batch_size=32).predict(paths))
    assert [r.path for r in rows] == [str(p) for p in paths]
    errors = [r for r in rows if not r.ok]
    assert len(errors) == 300 // 97
    for row in errors:
        assert Path(row.path).name.startswith("missing_")
        _assert_readable(row.error, "not found", row.path)
    assert all(r.label is not None for r in rows if r.ok)


# --------------------------------------------------------------------------- data sets


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    from core.dataset import load_splits, scan_folder

    folder = make_empty_folder(tmp_path)
    with pytest.raises(ValueError, match="no images found"):
        scan_folder(folder, mode="15")
    with pytest.raises(ValueError, match="no images found"):
        load_splits(folder, mode="15", seed=0)
    # As a classify input an empty folder expands to nothing; the submission refuses a job
    # without items (scheduler), core just yields no paths.
    assert list(expand_inputs([str(folder)])) == []


def test_single_class_dataset_is_refused(tmp_path: Path) -> None:
    from core.dataset import load_splits, scan_folder

    data = make_single_class_dataset(tmp_path)
    with pytest.raises(ValueError, match="at least 2 classes.*Glioblastoma"):
        scan_folder(data, mode="15")
    with pytest.raises(ValueError, match="at least 2 classes"):
        load_splits(data, mode="44", seed=0)


def test_empty_class_folder_warns_but_scans(tmp_path: Path) -> None:
    from core.dataset import load_splits, scan_folder
    from core.labels import CLASSES_15

    data = make_dataset_with_empty_class(tmp_path)
    warnings: list[str] = []
    samples = scan_folder(data, mode="15", on_warning=warnings.append)
    assert {CLASSES_15[s.label] for s in samples} == {"Glioblastoma", "Meningioma"}
    assert len(samples) == 8
    assert any("Schwannoma T1" in w and "no images" in w for w in warnings), warnings
    splits = load_splits(data, mode="15", seed=0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 8


@pytest.mark.timeout(60)
def test_dataset_with_fifo_and_broken_files_never_hangs(tmp_path: Path) -> None:
    from core.dataset import load_splits

    data = make_dataset_with_bad_files(tmp_path)
    warnings: list[str] = []
    splits = load_splits(data, mode="15", seed=0, on_warning=warnings.append)
    everything = [*splits.train, *splits.val, *splits.test]
    assert len(everything) == 11  # bad files are kept; they fail by name when read
    for name, cause in (("pipe.jpg", "not a regular file"), ("empty.jpg", "empty"),
                        ("notes.png", "text")):
        assert any(name in w and cause in w for w in warnings), (name, warnings)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("factory", [make_empty_folder, make_single_class_dataset])
def test_training_refuses_before_it_starts(
    tmp_path: Path, factory: Callable[[Path], Path]
) -> None:
    from core.config import TrainConfig
    from core.training import train

    epochs: list[object] = []
    out = tmp_path / "run"
    config = TrainConfig(data_dir=factory(tmp_path), out_dir=out, arch="resnet18", epochs=1,
                         image_size=32, batch_size=2, weights="none", device="cpu")
    with pytest.raises(ValueError, match="no images found|at least 2 classes"):
        train(config, on_epoch=epochs.append)
    assert epochs == []
    assert not any(out.glob("*.pt"))


# --------------------------------------------------------------------------- confinement


def test_scheduler_confine_refuses_symlink_outside_root(
    corpus: list[BadInput], corpus_dirs: tuple[Path, Path]
) -> None:
    paths = pytest.importorskip("scheduler.paths")
    root, outside = corpus_dirs
    k = _by_kind(corpus)
    with pytest.raises(paths.PathOutsideRootsError) as info:
        paths.confine(str(k["symlink_outside_root"].path), [root])
    assert str(outside.resolve()) in str(info.value)
    assert paths.confine(str(k["good_png"].path), [root]) == k["good_png"].path.resolve()
    # Every other corpus path is either accepted or refused with a reason: never a crash.
    for entry in corpus:
        try:
            paths.confine(str(entry.path), [root])
        except paths.InvalidPathError as exc:
            assert entry.kind in ("symlink_outside_root", "symlink_loop"), (entry.kind, exc)
