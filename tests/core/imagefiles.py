"""Factories that write real image files (PIL / pydicom) for tests.

Each ``write_*`` function writes one file and returns its path. ``phantom`` draws a
synthetic brain slice (bright ellipse on black) that the croppers can find.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def phantom(
    h: int = 64,
    w: int = 64,
    *,
    center: tuple[float, float] | None = None,
    radii: tuple[float, float] | None = None,
    value: float = 0.7,
) -> np.ndarray:
    """HxW float32 in [0, 1]: an ellipse of ``value`` (with a darker core) on black."""
    cy, cx = center if center is not None else (h / 2, w / 2)
    ry, rx = radii if radii is not None else (h * 0.35, w * 0.3)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    img = np.zeros((h, w), dtype=np.float32)
    img[r2 < 1.0] = value
    img[r2 < 0.3] = value * 0.6  # ventricles-ish: structure inside, still above threshold
    return img


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def write_pil(path: Path, image: Image.Image, **save_kwargs: Any) -> Path:
    image.save(path, **save_kwargs)
    return path


def write_gray(path: Path, img: np.ndarray, **save_kwargs: Any) -> Path:
    """Save a float [0, 1] array as 8-bit grayscale in the format of ``path``'s suffix."""
    return write_pil(path, Image.fromarray(to_uint8(img), mode="L"), **save_kwargs)


def write_png16(path: Path, values: np.ndarray) -> Path:
    """Save a uint16 array as a 16-bit grayscale PNG."""
    im = Image.fromarray(np.asarray(values, dtype=np.uint16))
    im.save(path, format="PNG")
    return path


def write_png_header_bomb(path: Path, width: int, height: int) -> Path:
    """A ~100-byte PNG whose IHDR claims ``width`` x ``height`` 8-bit gray pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # nowhere near enough rows; never decoded
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
    data += chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def truncate(path: Path, fraction: float) -> Path:
    """Cut ``path`` to ``fraction`` of its bytes, in place."""
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    return path


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float | Sequence[float], float | Sequence[float]] | None = None,
    with_pixels: bool = True,
    transfer_syntax: str | None = None,
    raw_pixel_bytes: bytes | None = None,
) -> Path:
    """Write a single-frame grayscale DICOM (MR Image Storage) with the given tags.

    ``pixels`` must be uint8, uint16 or int16; the dtype sets BitsAllocated and
    PixelRepresentation. ``window`` is (centre, width), either may be multi-valued.
    ``transfer_syntax``/``raw_pixel_bytes`` write an encapsulated (compressed) data set
    whose payload is ``raw_pixel_bytes``, for decoder-missing tests.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    arr = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientName = "Phantom^Test"
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = arr.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored if bits_stored is not None else bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        if raw_pixel_bytes is not None:
            ds.PixelData = encapsulate([raw_pixel_bytes])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
