"""Read one image file into a 2-D float32 grayscale array in [0, 1].

Every decoder path ends in the same representation (HxW, float32, [0, 1]) so that cropping,
transforms and models never see format differences. Bad input never escapes as a raw
PIL/pydicom/OS exception: callers get an :class:`~core.errors.ImageReadError` subclass that
names the file and the reason, so a batch can record the failure and carry on.

Supported: JPEG, PNG, BMP, TIFF (first page), GIF (first frame) through Pillow, and DICOM
(``.dcm`` or the ``DICM`` magic at offset 128) through pydicom. Notes on the choices:

- Colour is reduced with ITU-R BT.601 luma weights in float, before any rounding.
- Transparent pixels (RGBA, LA, palette with transparency) are composited on black, the
  background of an MRI slice, so a transparent margin never looks like tissue.
- 8-bit and 1-bit data are scaled by their fixed range. 16/32-bit integer and float data
  carry no display window and rarely use their full range (12-bit scanners), so they are
  min-max scaled, like DICOM files without a VOI window.
- The pixel budget is checked against the header size before any pixel is decoded: a
  small file can claim a huge canvas (decompression bomb).
- Pillow's ``LOAD_TRUNCATED_IMAGES`` is never turned on: a truncated file is an error, not
  an image with a grey lower half that would silently poison training.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from core.errors import (
    CorruptImageError,
    EmptyFileError,
    ImageReadError,
    ImageTooLargeError,
    ImageTooSmallError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from core.formats import IMAGE_SUFFIXES
from core.safefile import open_input

__all__ = [
    "IMAGE_SUFFIXES",
    "DecodedImage",
    "is_image_path",
    "read_image",
    "read_open_image",
    "read_open_image_reduced",
]


# Only formats we mean to accept; anything else Pillow could parse (EPS, PSD, ...) would
# widen the attack surface for no gain.
_PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "DIB", "TIFF", "GIF")

_NIFTI_MESSAGE = "NIfTI volumes are not supported; export 2-D slices"
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_HEAD_BYTES = 352  # covers the DICOM preamble+magic (132) and the NIfTI-1 magic (344..348)

# File signatures of the formats we decode: when Pillow cannot identify a file that starts
# with one of these, the file is damaged rather than of an unknown kind.
_KNOWN_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# What a decoder path guarantees about the array it returns, so _finish can skip the
# passes that cannot change it: nothing (float/16-bit/DICOM data), all values finite
# (anything computed from 8-bit samples), or finite and within [0, 1] as well.
_UNCHECKED, _FINITE, _IN_UNIT = 0, 1, 2

# EXIF orientations that ImageOps.exif_transpose acts on (1 and the rest are no-ops).
_EXIF_TRANSPOSED = (2, 3, 4, 5, 6, 7, 8)


def is_image_path(path: Path | str) -> bool:
    """True when the file name has one of the image suffixes we read (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(
    path: Path | str,
    *,
    max_pixels: int = 64_000_000,
    min_side: int = 8,
    roots: Sequence[Path | str] | None = None,
    min_decode_side: int | None = None,
) -> np.ndarray:
    """Decode ``path`` into an HxW float32 array in [0, 1].

    ``min_decode_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's
    DCT scaling, Pillow's ``draft``) as long as both sides stay >= this many pixels. The
    inference and evaluation path passes its preset's ``image_size``: a 512 px JPEG for a
    224 px model decodes at 256 px in a quarter of the time. The pixels are then those of a
    2x2-averaging decoder, not the full decode's; other formats are never reduced.

    Raises only :class:`ImageReadError` subclasses: ``EmptyFileError``, ``NotAFileError``,
    ``UnreadableFileError``, ``UnsupportedFormatError``, ``CorruptImageError``,
    ``ImageTooLargeError`` (more than ``max_pixels`` pixels, checked before decoding),
    ``ImageTooSmallError`` (a side shorter than ``min_side``) and, with ``roots``,
    ``OutsideDataRootsError``: the file is opened by :func:`core.safefile.open_input`, which
    confines it to ``roots`` at the moment it is opened and never blocks on a FIFO.
    """
    p = Path(path)
    with open_input(p, roots=roots) as fh:
        return read_open_image(
            fh, p, max_pixels=max_pixels, min_side=min_side, min_decode_side=min_decode_side
        )


@dataclass(frozen=True)
class DecodedImage:
    """The HxW float32 pixels and how much smaller than the file's they were decoded.

    ``reduction`` is the file's width over ``pixels``' width: 1.0 at full size, about 2, 4
    or 8 after a reduced-scale JPEG decode. Cropping uses it to keep pixel margins the same
    fraction of the anatomy (:func:`core.cropping.apply_crop`).
    """

    pixels: np.ndarray
    reduction: float = 1.0


def read_open_image(
    fh: IO[bytes],
    path: Path | str,
    *,
    max_pixels: int = 64_000_000,
    min_side: int = 8,
    min_decode_side: int | None = None,
) -> np.ndarray:
    """:func:`read_image` on a file already opened (by :func:`core.safefile.open_input`),
    so a caller that also hashes the bytes reads one file, not a name twice. ``path`` only
    names the file in errors and picks the decoder (``.dcm``, ``.nii``)."""
    return read_open_image_reduced(
        fh, path, max_pixels=max_pixels, min_side=min_side, min_decode_side=min_decode_side
    ).pixels


def read_open_image_reduced(
    fh: IO[bytes],
    path: Path | str,
    *,
    max_pixels: int = 64_000_000,
    min_side: int = 8,
    min_decode_side: int | None = None,
) -> DecodedImage:
    """:func:`read_open_image` that also says by how much the decode was reduced."""
    p = Path(path)
    if min_decode_side is not None and min_decode_side < 1:
        raise ValueError(f"min_decode_side must be >= 1, got {min_decode_side}")
    try:
        return _read_checked(
            p, fh, max_pixels=max_pixels, min_side=min_side, min_decode_side=min_decode_side
        )
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageTooLargeError(p, "not enough memory to decode the image") from None
    except Exception as exc:  # a decoder bug must not take the whole batch down
        raise CorruptImageError(
            p, f"could not decode: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc


def _one_line(exc: BaseException) -> str:
    """A library's message on one line: a reason is one row of a CSV/DB, and pydicom lists
    its missing plugins on separate lines."""
    return " ".join(str(exc).split())


def _read_checked(
    p: Path, fh: IO[bytes], *, max_pixels: int, min_side: int, min_decode_side: int | None
) -> DecodedImage:
    try:
        size = os.fstat(fh.fileno()).st_size
    except (OSError, ValueError, io.UnsupportedOperation):
        size = None  # not a real file (a test's BytesIO): reading tells
    if size == 0:
        raise EmptyFileError(p, "file is empty (0 bytes)")
    name = p.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        raise UnsupportedFormatError(p, _NIFTI_MESSAGE)
    try:
        fh.seek(0)
        head = fh.read(_HEAD_BYTES)
        fh.seek(0)
        if not head:
            raise EmptyFileError(p, "file is empty (0 bytes)")
        if head[344:348] in (b"n+1\x00", b"ni1\x00"):
            raise UnsupportedFormatError(p, _NIFTI_MESSAGE)
        if _looks_like_dicom(p, head):
            img = _read_dicom(p, fh, head, max_pixels=max_pixels, min_side=min_side)
            known, reduction = _UNCHECKED, 1.0
        else:
            img, known, reduction = _read_pil(
                p,
                fh,
                head,
                max_pixels=max_pixels,
                min_side=min_side,
                min_decode_side=min_decode_side,
            )
    except OSError as exc:
        # I/O failure while reading an opened file (network share gone, EIO, ...).
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EIO):
            reason = "permission denied" if exc.errno == errno.EACCES else (
                f"cannot read file: {exc.strerror or exc}"
            )
            raise UnreadableFileError(p, reason) from exc
        raise CorruptImageError(p, f"read failed: {exc}") from exc
    return DecodedImage(_finish(p, img, min_side=min_side, known=known), reduction)


def _check_size(p: Path, width: int, height: int, *, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(
            p,
            f"image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,}",
        )
    if min(width, height) < min_side:
        raise ImageTooSmallError(
            p, f"image is {width}x{height}; each side must be at least {min_side} pixels"
        )


def _finish(p: Path, img: np.ndarray, *, min_side: int, known: int = _UNCHECKED) -> np.ndarray:
    if img.ndim != 2:
        raise CorruptImageError(p, f"decoded to an unexpected shape {img.shape}")
    h, w = img.shape
    if min(h, w) < min_side:
        raise ImageTooSmallError(
            p, f"image is {w}x{h}; each side must be at least {min_side} pixels"
        )
    out = img.astype(np.float32, copy=False)
    # One sum tells whether any pixel is NaN/inf (it then is non-finite too), so the common
    # all-finite image skips nan_to_num's copy and four masks. A huge but finite image whose
    # sum overflows merely takes the slow path, which leaves it unchanged. Decoder paths
    # that guarantee finite (or finite and [0, 1]) values skip the passes that would find
    # nothing to change (``known``).
    if known < _FINITE and not np.isfinite(out.sum(dtype=np.float64)):
        out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    elif out is img and not out.flags.writeable:
        out = out.copy()
    if known < _IN_UNIT:
        np.clip(out, 0.0, 1.0, out=out)
    return np.ascontiguousarray(out, dtype=np.float32)


def _min_max(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.float64, copy=False)
    # The range comes from the finite values only: one NaN/inf pixel (a dead detector
    # element, a masked float export) must not turn the whole slice black. The non-finite
    # pixels themselves are mapped by _finish (NaN -> 0, +inf -> 1, -inf -> 0).
    lo, hi = float(a.min()), float(a.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = a[np.isfinite(a)]
        if finite.size == 0:
            return np.zeros(a.shape, dtype=np.float32)
        lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:  # constant image: nothing to stretch
        return np.where(np.isposinf(a), 1.0, 0.0).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return ((a - lo) / (hi - lo)).astype(np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float32) @ _LUMA


# --------------------------------------------------------------------------------- Pillow


def _describe_unknown(head: bytes) -> str:
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "file is an HTML document, not an image"
    if stripped.startswith(b"<?xml") or stripped.startswith(b"<svg"):
        return "file is an XML/SVG document, not a supported raster image"
    if head.startswith(b"%PDF"):
        return "file is a PDF document, not an image"
    if head.startswith(b"\x1f\x8b"):
        return "file is gzip-compressed, not an image"
    if head.startswith(b"PK\x03\x04"):
        return "file is a ZIP archive, not an image"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP images are not supported"
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if head and printable / len(head) > 0.95:
        return "file is text, not an image"
    return "not a recognised image format (expected JPEG, PNG, BMP, TIFF, GIF or DICOM)"


def _read_pil(
    p: Path,
    fh: IO[bytes],
    head: bytes,
    *,
    max_pixels: int,
    min_side: int,
    min_decode_side: int | None,
) -> tuple[np.ndarray, int, float]:
    # Image.open(formats=...) looks the names up in the plugin registry, which holds only
    # the five commonest formats until init() has run (it returns at once after the first).
    Image.init()
    try:
        im = Image.open(fh, formats=_PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(p, f"decompression bomb guard: {exc}") from exc
    except UnidentifiedImageError as exc:
        for magic, fmt in _KNOWN_MAGIC:
            if head.startswith(magic):
                raise CorruptImageError(p, f"damaged or truncated {fmt} header") from exc
        reason = _describe_unknown(head)
        if is_image_path(p):
            reason += f" (despite the {p.suffix} name)"
        raise UnsupportedFormatError(p, reason) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptImageError(p, f"damaged image header: {exc}") from exc
    with im:
        fmt = im.format or "image"
        # Image.open only parsed the header: this check costs nothing and runs before the
        # decoder allocates the canvas.
        _check_size(p, im.width, im.height, max_pixels=max_pixels, min_side=min_side)
        file_width = im.width
        if min_decode_side is not None and fmt == "JPEG":
            # Same mode, smaller scale: libjpeg picks the largest of 1/8..1/1 that keeps
            # both sides >= min_decode_side, so colour still goes through _pil_to_gray.
            im.draft(im.mode, (min_decode_side, min_decode_side))
        try:
            im.seek(0)  # first frame of an animated GIF / first page of a TIFF
            im.load()
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(p, f"decompression bomb guard: {exc}") from exc
        except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
            raise CorruptImageError(p, f"truncated or corrupt {fmt} data: {exc}") from exc
        try:
            # exif_transpose returns a copy of the image when there is nothing to do; the
            # orientation test first spares that copy (getexif() is parsed once, cached).
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            oriented = ImageOps.exif_transpose(im) if orientation in _EXIF_TRANSPOSED else im
        except Exception:
            # A damaged EXIF block should not cost us an otherwise good image.
            oriented = im
        reduction = file_width / im.width  # before the EXIF turn: width is width there
        return (*_pil_to_gray(p, oriented), reduction)


def _pil_to_gray(p: Path, im: Image.Image) -> tuple[np.ndarray, int]:
    """The gray array and what it is known to satisfy (``_UNCHECKED`` ... ``_IN_UNIT``).

    Values from 8-bit and 1-bit samples are finite by construction; ``v / 255`` with
    ``v`` in 0..255, and the product of two such values, lie in [0, 1] exactly. The luma
    weights sum to slightly more than 1 in float32, so colour results keep the clip.
    """
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=bool).astype(np.float32), _IN_UNIT
    if mode == "L":
        gray = np.asarray(im, dtype=np.uint8).astype(np.float32)
        return np.divide(gray, 255.0, out=gray), _IN_UNIT  # in place: one pass fewer
    if mode == "LA":
        la = np.asarray(im, dtype=np.uint8).astype(np.float32) / 255.0
        return la[..., 0] * la[..., 1], _IN_UNIT
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if arr.ndim != 2:
            raise CorruptImageError(p, f"unexpected {mode} pixel layout {arr.shape}")
        return _min_max(arr), _UNCHECKED
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    if mode in ("RGBA", "La", "RGBa", "PA"):
        im = im.convert("RGBA")
        rgba = np.asarray(im, dtype=np.uint8).astype(np.float32) / 255.0
        return _luma(rgba) * rgba[..., 3], _FINITE
    if mode != "RGB":
        # CMYK, YCbCr, LAB, HSV, RGBX, ...: Pillow knows the colour maths, we do not redo it.
        im = im.convert("RGB")
    rgb = np.asarray(im, dtype=np.uint8)
    return _luma(rgb) / 255.0, _FINITE


# ---------------------------------------------------------------------------------- DICOM


def _first_float(value: Any) -> float | None:
    """Window centre/width may be multi-valued (several presets); the first is the default."""
    if value is None:
        return None
    try:
        if hasattr(value, "__getitem__") and not isinstance(value, (str, bytes)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _looks_like_dicom(p: Path, head: bytes) -> bool:
    if head[128:132] == b"DICM":
        return True
    # A .dcm name without the magic is either a preamble-less data set (read it as DICOM)
    # or a mislabelled JPEG/PNG export (let Pillow have it).
    return p.suffix.lower() in _DICOM_SUFFIXES and not any(
        head.startswith(magic) for magic, _ in _KNOWN_MAGIC
    )


def _read_dicom(
    p: Path, fh: IO[bytes], head: bytes, *, max_pixels: int, min_side: int
) -> np.ndarray:
    import pydicom  # deferred: only DICOM inputs pay for importing it
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(fh, force=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise CorruptImageError(p, f"not a valid DICOM file: {exc}") from exc
    if len(ds) == 0:  # force=True accepts anything; nothing parsed means it was not DICOM
        raise UnsupportedFormatError(p, _describe_unknown(head))
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if head[128:132] != b"DICM":
            raise UnsupportedFormatError(p, f"no DICOM pixel data found; {_describe_unknown(head)}")
        raise UnsupportedFormatError(
            p, "DICOM file has no pixel data (a report, structured document or header only)"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CorruptImageError(p, "DICOM file lacks Rows/Columns") from exc
    # Rows x Columns are known before pixel_array decodes anything.
    _check_size(p, cols, rows, max_pixels=max_pixels, min_side=min_side)

    meta = getattr(ds, "file_meta", None)
    tsyntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if tsyntax is None:
        # Files without a meta header (raw datasets) are implicit VR little endian by the
        # standard's default; pydicom needs to be told.
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ImplicitVRLittleEndian

        if meta is None:
            ds.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
        tsyntax = ImplicitVRLittleEndian
    try:
        arr = np.asarray(ds.pixel_array)
    except (NotImplementedError, RuntimeError, ImportError) as exc:
        ts_name = getattr(tsyntax, "name", str(tsyntax))
        raise UnsupportedFormatError(
            p,
            f"DICOM transfer syntax '{ts_name}' ({tsyntax}) cannot be decoded here: "
            f"no installed pixel-data handler supports it ({_one_line(exc)})",
        ) from exc
    except (ValueError, AttributeError, KeyError, TypeError, EOFError) as exc:
        raise CorruptImageError(p, f"DICOM pixel data is damaged: {exc}") from exc

    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if samples > 1:
        # pydicom already converted YBR to RGB; colour DICOMs (secondary captures) have no
        # modality or VOI LUT semantics, so they are treated like an 8-bit RGB picture.
        rgb = arr.astype(np.float32)
        top = float(2 ** int(getattr(ds, "BitsStored", 8) or 8) - 1)
        return _luma(rgb) / top
    if arr.ndim != 2:
        raise CorruptImageError(p, f"unexpected DICOM pixel layout {arr.shape}")

    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    center = _first_float(ds.get("WindowCenter"))
    width = _first_float(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        out = _window(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")).upper())
    elif "VOILUTSequence" in ds:
        out = _min_max(np.asarray(apply_voi_lut(values, ds), dtype=np.float64))
    else:
        out = _min_max(values)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1 means low values are white
    return out


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, mapped to [0, 1] instead of the output bit range."""
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        out = (values - center) / width + 0.5
    else:
        w = max(width - 1.0, 1e-6)  # width 1 is a hard threshold
        out = (values - (center - 0.5)) / w + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)
