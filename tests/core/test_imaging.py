"""read_image on real files of every supported kind, and on the broken ones."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

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
from core.imaging import IMAGE_SUFFIXES, is_image_path, read_image
from tests.core.imagefiles import (
    phantom,
    to_uint8,
    truncate,
    write_dicom,
    write_gray,
    write_pil,
    write_png16,
    write_png_header_bomb,
)


def _assert_gray01(img: np.ndarray, shape: tuple[int, int]) -> None:
    assert img.dtype == np.float32
    assert img.shape == shape
    assert img.flags.c_contiguous
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


# ------------------------------------------------------------------------ suffixes


def test_image_suffixes_and_is_image_path() -> None:
    for suffix in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".dcm"):
        assert suffix in IMAGE_SUFFIXES
    assert is_image_path(Path("a/b/SCAN.JPG"))
    assert is_image_path("x.dcm")
    assert not is_image_path("notes.txt")
    assert not is_image_path("vol.nii.gz")


# ------------------------------------------------------------------ Pillow formats


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".gif"])
def test_lossless_gray_roundtrip(tmp_path: Path, suffix: str) -> None:
    src = phantom(40, 48)
    path = write_gray(tmp_path / f"slice{suffix}", src)
    img = read_image(path)
    _assert_gray01(img, (40, 48))
    np.testing.assert_allclose(img, to_uint8(src) / 255.0, atol=1e-6)


def test_jpeg_gray(tmp_path: Path) -> None:
    src = phantom(48, 40)
    img = read_image(write_gray(tmp_path / "slice.jpeg", src, quality=95))
    _assert_gray01(img, (48, 40))
    assert np.abs(img - src).mean() < 0.02


def test_rgb_uses_luma_weights(tmp_path: Path) -> None:
    rgb = np.zeros((16, 24, 3), dtype=np.uint8)
    rgb[:, :8, 0] = 255
    rgb[:, 8:16, 1] = 255
    rgb[:, 16:, 2] = 255
    img = read_image(_save(tmp_path / "rgb.png", Image.fromarray(rgb, mode="RGB")))
    _assert_gray01(img, (16, 24))
    np.testing.assert_allclose(img[0, [0, 8, 16]], [0.299, 0.587, 0.114], atol=1e-5)


def test_rgba_composited_on_black(tmp_path: Path) -> None:
    rgba = np.full((16, 24, 4), 255, dtype=np.uint8)
    rgba[:, :8, 3] = 0
    rgba[:, 8:16, 3] = 128
    img = read_image(_save(tmp_path / "rgba.png", Image.fromarray(rgba, mode="RGBA")))
    np.testing.assert_allclose(img[0, [0, 8, 16]], [0.0, 128 / 255, 1.0], atol=1e-3)


def test_la_composited_on_black(tmp_path: Path) -> None:
    la = np.full((16, 16, 2), 200, dtype=np.uint8)
    la[:, :8, 1] = 0
    la[:, 8:, 1] = 255
    img = read_image(_save(tmp_path / "la.png", Image.fromarray(la, mode="LA")))
    np.testing.assert_allclose(img[0, [0, 8]], [0.0, 200 / 255], atol=1e-3)


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, 255, 255, 255, 255, 255, 255] + [0] * (256 * 3 - 9))
    px = np.zeros((16, 16), dtype=np.uint8)
    px[:, :8] = 1  # white but transparent -> black on composite
    px[:, 8:] = 2  # white and opaque
    im.putdata(px.flatten().tolist())
    path = _save(tmp_path / "pal.png", im, transparency=1)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    img = read_image(path)
    np.testing.assert_allclose(img[0, [0, 8]], [0.0, 1.0], atol=1e-6)


def test_palette_without_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (16, 16), 1)
    im.putpalette([0, 0, 0, 128, 128, 128] + [0] * (256 * 3 - 6))
    img = read_image(_save(tmp_path / "pal.bmp", im))
    np.testing.assert_allclose(img, 128 / 255, atol=1e-6)


def test_one_bit_image(tmp_path: Path) -> None:
    im = Image.new("1", (16, 16), 0)
    im.paste(1, (0, 0, 8, 16))
    img = read_image(_save(tmp_path / "bits.bmp", im))
    assert img[0, 0] == 1.0 and img[0, 15] == 0.0


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = np.zeros((16, 16, 4), dtype=np.uint8)  # all zero ink = white
    cmyk[:, 8:, 3] = 255  # full black ink
    path = _save(tmp_path / "cmyk.jpg", Image.fromarray(cmyk, mode="CMYK"), quality=100)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    img = read_image(path)
    assert img[:, :6].mean() > 0.9
    assert img[:, 10:].mean() < 0.1


def test_png_16bit_is_min_max_scaled(tmp_path: Path) -> None:
    values = np.zeros((16, 16), dtype=np.uint16)
    values[:, 4:8] = 1000
    values[:, 8:12] = 2000
    values[:, 12:] = 4000  # a 12-bit scanner: the top of the 16-bit range is never used
    path = write_png16(tmp_path / "deep.png", values)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    img = read_image(path)
    np.testing.assert_allclose(img[0, [0, 4, 8, 12]], [0.0, 0.25, 0.5, 1.0], atol=1e-6)


def test_animated_gif_reads_first_frame(tmp_path: Path) -> None:
    first = Image.new("L", (16, 16), 255)
    second = Image.new("L", (16, 16), 0)
    path = tmp_path / "anim.gif"
    first.save(path, save_all=True, append_images=[second], duration=50, loop=0)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 2
    assert read_image(path).mean() > 0.99


def test_multipage_tiff_reads_first_page(tmp_path: Path) -> None:
    path = tmp_path / "pages.tif"
    Image.new("L", (16, 16), 200).save(
        path, save_all=True, append_images=[Image.new("L", (16, 16), 50)]
    )
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 2
    np.testing.assert_allclose(read_image(path), 200 / 255, atol=1e-6)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 tall with the left half bright; orientation 6 means "rotate 90
    # degrees clockwise to display", so the viewer sees 20 wide x 40 tall, bright on top.
    stored = np.zeros((20, 40), dtype=np.uint8)
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "rotated.jpg", Image.fromarray(stored), exif=exif.tobytes())
    img = read_image(path)
    assert img.shape == (40, 20)
    assert img[:18].mean() > 0.9
    assert img[22:].mean() < 0.1


# ---------------------------------------------------------------------------- DICOM


def test_dicom_16bit_without_window_is_min_max(tmp_path: Path) -> None:
    values = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 3).astype(np.uint16)
    img = read_image(write_dicom(tmp_path / "a.dcm", values, bits_stored=12))
    _assert_gray01(img, (32, 32))
    assert img[0, 0] == 0.0 and img[-1, -1] == 1.0
    np.testing.assert_allclose(img, values / values.max(), atol=1e-6)


def test_dicom_rescale_and_window(tmp_path: Path) -> None:
    # HU = 2 * stored - 1024; window centre 0, width 400 -> [-200, 200] spans [0, 1].
    values = np.zeros((16, 16), dtype=np.uint16)
    values[:, 4:8] = 300  # -424 HU: below the window
    values[:, 8:12] = 512  # 0 HU: the window centre
    values[:, 12:] = 700  # 376 HU: above the window
    path = write_dicom(
        tmp_path / "ct.dcm", values, slope=2.0, intercept=-1024.0, window=(0.0, 400.0)
    )
    img = read_image(path)
    np.testing.assert_allclose(img[0, [0, 4, 8, 12]], [0.0, 0.0, 0.5, 1.0], atol=0.01)


def test_dicom_multivalued_window_uses_first(tmp_path: Path) -> None:
    values = np.tile(np.arange(0, 160, 10, dtype=np.uint16), (16, 1))
    path = write_dicom(tmp_path / "mv.dcm", values, window=([50.0, 500.0], [20.0, 1000.0]))
    img = read_image(path)
    # Window [40, 60]: 30 -> 0, 50 -> ~0.5, 70 -> 1.
    np.testing.assert_allclose(img[0, [3, 5, 7]], [0.0, 0.5, 1.0], atol=0.05)


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    values = np.zeros((16, 16), dtype=np.uint16)
    values[:, 8:] = 1000
    img = read_image(write_dicom(tmp_path / "m1.dcm", values, photometric="MONOCHROME1"))
    assert img[0, 0] == 1.0 and img[0, 15] == 0.0


def test_dicom_signed_16bit(tmp_path: Path) -> None:
    values = np.full((16, 16), -500, dtype=np.int16)
    values[:, 8:] = 500
    img = read_image(write_dicom(tmp_path / "signed.dcm", values))
    assert img[0, 0] == 0.0 and img[0, 15] == 1.0


def test_dicom_8bit(tmp_path: Path) -> None:
    values = to_uint8(phantom(24, 24))
    img = read_image(write_dicom(tmp_path / "eight.dcm", values))
    _assert_gray01(img, (24, 24))
    assert img.max() == 1.0


def test_dicom_found_by_magic_without_suffix(tmp_path: Path) -> None:
    values = np.arange(256, dtype=np.uint16).reshape(16, 16)
    path = write_dicom(tmp_path / "IM0001", values)
    assert not is_image_path(path)
    assert read_image(path).shape == (16, 16)


def test_mislabelled_dcm_files(tmp_path: Path) -> None:
    jpeg_as_dcm = write_gray(tmp_path / "export.dcm", phantom(24, 24), format="JPEG")
    assert read_image(jpeg_as_dcm).shape == (24, 24)
    text_as_dcm = tmp_path / "notes.dcm"
    text_as_dcm.write_bytes(b"patient notes, not an image\n" * 8)
    with pytest.raises(UnsupportedFormatError, match="text"):
        read_image(text_as_dcm)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "report.dcm", np.zeros((16, 16), np.uint16), with_pixels=False)
    with pytest.raises(UnsupportedFormatError, match="no pixel data"):
        read_image(path)


def test_dicom_compressed_without_decoder(tmp_path: Path) -> None:
    jpeg_ls = "1.2.840.10008.1.2.4.80"
    path = write_dicom(
        tmp_path / "jls.dcm",
        np.zeros((16, 16), np.uint16),
        transfer_syntax=jpeg_ls,
        raw_pixel_bytes=b"\xff\xd8" + b"\x00" * 64,
    )
    with pytest.raises(ImageReadError, match="JPEG-LS") as info:
        read_image(path)
    assert isinstance(info.value, UnsupportedFormatError | CorruptImageError)
    assert "transfer syntax" in info.value.reason


def test_dicom_too_large_before_decoding(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "big.dcm", np.zeros((64, 64), np.uint16))
    with pytest.raises(ImageTooLargeError):
        read_image(path, max_pixels=1000)


def test_dicom_garbage_after_magic(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(64))
    with pytest.raises(ImageReadError):
        read_image(path)


# ------------------------------------------------------------------ bad input files


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(EmptyFileError) as info:
        read_image(path)
    assert str(info.value) == f"{path}: {info.value.reason}"
    assert info.value.path == path


def test_directory_named_like_an_image(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.mkdir()
    with pytest.raises(NotAFileError, match="directory"):
        read_image(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError, match="not found"):
        read_image(tmp_path / "nope.png")


def test_permission_denied_chmod(tmp_path: Path) -> None:
    path = write_gray(tmp_path / "secret.png", phantom(16, 16))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reads")
        with pytest.raises(UnreadableFileError, match="permission denied"):
            read_image(path)
    finally:
        path.chmod(0o644)


def test_permission_denied_on_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores file modes, so simulate the kernel's answer at open() for this one path.
    # The file is opened with os.open (non-blocking, see core.safefile), so that is the call
    # that answers.
    path = write_gray(tmp_path / "secret.png", phantom(16, 16))
    real_open = os.open

    def deny(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(os.fspath(file)) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(UnreadableFileError, match="permission denied"):
        read_image(path)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"just some notes, not a picture\n" * 4, "text"),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
    ],
)
def test_non_image_named_jpg(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "scan.jpg"
    path.write_bytes(content)
    with pytest.raises(UnsupportedFormatError, match=needle) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_random_bytes_named_png(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(UnsupportedFormatError):
        read_image(path)


def test_load_truncated_images_is_off() -> None:
    # Turned on, it would make truncated files load as half-grey images without an error.
    import core.cropping  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(("suffix", "fraction"), [(".jpg", 0.6), (".png", 0.6), (".png", 0.03)])
def test_truncated_files(tmp_path: Path, suffix: str, fraction: float) -> None:
    rng = np.random.default_rng(1)
    noisy = np.clip(phantom(64, 64) + rng.random((64, 64)) * 0.3, 0, 1)
    path = truncate(write_gray(tmp_path / f"cut{suffix}", noisy), fraction)
    with pytest.raises(CorruptImageError):
        read_image(path)


def test_corrupt_png_chunk(tmp_path: Path) -> None:
    path = write_gray(tmp_path / "bad.png", phantom(64, 64))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = b"\xa5" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError):
        read_image(path)


@pytest.mark.parametrize("name", ["brain.nii", "brain.nii.gz", "BRAIN.NII.GZ"])
def test_nifti_rejected(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00" * 400)
    with pytest.raises(UnsupportedFormatError, match="NIfTI volumes are not supported"):
        read_image(path)


def test_nifti_by_magic(tmp_path: Path) -> None:
    path = tmp_path / "volume.img"
    header = bytearray(352)
    header[344:348] = b"n+1\x00"
    path.write_bytes(bytes(header))
    with pytest.raises(UnsupportedFormatError, match="NIfTI"):
        read_image(path)


def test_header_bomb_rejected_quickly(tmp_path: Path) -> None:
    path = write_png_header_bomb(tmp_path / "bomb.png", 30000, 30000)
    assert path.stat().st_size < 200
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError):
        read_image(path)
    assert time.perf_counter() - start < 1.0


def test_header_over_budget_but_under_pillow_limit(tmp_path: Path) -> None:
    path = write_png_header_bomb(tmp_path / "bomb.png", 9000, 9000)  # 81 Mpx > 64 Mpx
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        read_image(path)
    assert time.perf_counter() - start < 1.0


def test_max_pixels_is_honoured(tmp_path: Path) -> None:
    path = write_gray(tmp_path / "ok.png", phantom(64, 64))
    with pytest.raises(ImageTooLargeError):
        read_image(path, max_pixels=64 * 64 - 1)
    assert read_image(path, max_pixels=64 * 64).shape == (64, 64)


def test_too_small(tmp_path: Path) -> None:
    path = write_gray(tmp_path / "tiny.png", np.ones((4, 30), np.float32))
    with pytest.raises(ImageTooSmallError, match="at least 8"):
        read_image(path)
    assert read_image(path, min_side=4).shape == (4, 30)


def test_errors_pickle_and_format(tmp_path: Path) -> None:
    err = CorruptImageError(tmp_path / "a.png", "truncated")
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is CorruptImageError
    assert clone.path == err.path and clone.reason == "truncated"
    assert str(clone) == f"{tmp_path / 'a.png'}: truncated"
    assert isinstance(clone, ImageReadError)


def _save(path: Path, im: Image.Image, **kwargs: Any) -> Path:
    im.save(path, **kwargs)
    return path


# ------------------------------------------------------- reduced-scale JPEG decode (issue 14)


def test_jpeg_decodes_at_the_largest_reduction_that_keeps_min_decode_side(tmp_path: Path) -> None:
    img = phantom(128, 96, center=(64.0, 48.0), radii=(40.0, 30.0))
    path = write_gray(tmp_path / "s.jpg", to_uint8(img), quality=95)
    full = read_image(path)
    assert full.shape == (128, 96)
    assert read_image(path, min_decode_side=48).shape == (64, 48)  # 1/2: 48 still fits
    assert read_image(path, min_decode_side=24).shape == (32, 24)  # 1/4
    assert read_image(path, min_decode_side=49).shape == (128, 96)  # 1/2 would be too small
    assert read_image(path, min_decode_side=1000).shape == (128, 96)  # never enlarged
    reduced = read_image(path, min_decode_side=48)
    _assert_gray01(reduced, (64, 48))
    # libjpeg's DCT scaling is a smoothed 2x2 average of the full decode, not other content.
    halved = full.reshape(64, 2, 48, 2).mean(axis=(1, 3))
    assert float(np.abs(reduced - halved).mean()) < 0.01


def test_colour_jpeg_reduced_decode_keeps_the_luma_path(tmp_path: Path) -> None:
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red: luma 0.299 * 200 / 255
    path = write_pil(tmp_path / "c.jpg", Image.fromarray(rgb, "RGB"), quality=95)
    reduced = read_image(path, min_decode_side=16)
    assert reduced.shape == (16, 16)
    np.testing.assert_allclose(reduced, 0.299 * 200 / 255, atol=0.02)


def test_min_decode_side_leaves_other_formats_alone(tmp_path: Path) -> None:
    img = phantom(64, 64, center=(32.0, 32.0), radii=(20.0, 20.0))
    png = write_gray(tmp_path / "s.png", to_uint8(img))
    png16 = write_png16(tmp_path / "s16.png", (img * 4095).astype(np.uint16))
    dcm = write_dicom(tmp_path / "s.dcm", (img * 4095).astype(np.uint16))
    for path in (png, png16, dcm):
        np.testing.assert_array_equal(read_image(path, min_decode_side=16), read_image(path))


def test_min_decode_side_must_be_positive(tmp_path: Path) -> None:
    path = write_gray(tmp_path / "s.jpg", to_uint8(phantom(32, 32)))
    with pytest.raises(ValueError, match="min_decode_side"):
        read_image(path, min_decode_side=0)
