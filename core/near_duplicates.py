"""Near-duplicate images: a perceptual hash per file and the groups of files whose hashes are
close, so that a split never puts copies of one slice on both sides (a leak that inflates
validation and test scores)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import ImageReadError
from core.imaging import read_image
from core.safefile import open_input

__all__ = [
    "HASH_BITS",
    "NEAR_DUPLICATE_DISTANCE",
    "group_near_duplicates",
    "hamming_distance",
    "perceptual_hash",
]

# A 16x16 difference hash (256 bits). Measured on synthetic slices (which, like real ones,
# share one layout: dark frame, oval head): the 64-bit 8x8 hash put distinct slices within
# 1-2 bits of each other while JPEG re-encodes drifted by as much, so no threshold separated
# them. With 256 bits, re-encodes (quality 85) stay within 8 bits and distinct slices are 19+
# bits apart.
HASH_SIDE = 16
HASH_BITS = HASH_SIDE * HASH_SIDE
# Default grouping threshold in bits (see above).
NEAR_DUPLICATE_DISTANCE = 8
# Gradients smaller than this (grey levels, 0..255) count as "not brighter": the dark frame
# is flat, and without a margin its bits would follow compression noise.
_HASH_MARGIN = 2.0


def _thumbnail(path: Path) -> np.ndarray:
    size = (HASH_SIDE + 1, HASH_SIDE)
    # open_input never blocks (Image.open on a FIFO named x.jpg waits for a writer) and
    # refuses anything but a regular file; read_image then names the reason.
    try:
        fh = open_input(path)
    except ImageReadError:
        fh = None
    if fh is not None:
        try:
            with fh, Image.open(fh) as im:
                if im.format in ("JPEG", "PNG", "BMP", "GIF", "TIFF", "MPO") and im.mode in (
                    "L", "RGB", "RGBA", "P", "LA", "CMYK", "1"
                ):
                    # JPEG draft mode decodes at 1/2..1/8 scale: most of the speed of hashing.
                    im.draft("L", (4 * size[0], 4 * size[1]))
                    return np.asarray(im.convert("L").resize(size, Image.Resampling.BOX),
                                      dtype=np.float32)
        except Exception:
            pass  # fall back to the full reader: it knows DICOM and 16-bit data, names errors
    arr = read_image(path) * np.float32(255.0)
    return np.asarray(Image.fromarray(arr, mode="F").resize(size, Image.Resampling.BOX),
                      dtype=np.float32)


def perceptual_hash(path: Path) -> int:
    """256-bit difference hash (dHash) of the image's 17x16 grayscale thumbnail, as an int.

    Exact and re-encoded/rescaled copies get equal or close hashes (compare with
    :func:`hamming_distance`). Raises :class:`~core.errors.ImageReadError` for files that
    cannot be decoded.
    """
    thumb = _thumbnail(Path(path))
    bits = (thumb[:, 1:] > thumb[:, :-1] + _HASH_MARGIN).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming_distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller index becomes the root: group ids are then order-independent.
            self.parent[max(ra, rb)] = min(ra, rb)


def group_near_duplicates(
    hashes: Sequence[int | None], *, max_distance: int = 0, bits: int = HASH_BITS
) -> list[int]:
    """A group id per item (the smallest index in its group); ``None`` hashes stay alone.

    Items whose hashes differ in at most ``max_distance`` bits are joined (transitively).
    Candidates are found by multi-index hashing: with the hash cut into ``max_distance + 1``
    blocks, two hashes that close agree exactly on at least one block, so only items
    sharing a block value are compared - near-linear for ordinary data.
    """
    n = len(hashes)
    uf = _UnionFind(n)
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, not {max_distance}")
    if max_distance == 0:
        first: dict[int, int] = {}
        for i, h in enumerate(hashes):
            if h is not None:
                uf.union(first.setdefault(h, i), i)
        return [uf.find(i) for i in range(n)]
    n_blocks = max_distance + 1
    width = -(-bits // n_blocks)
    mask = (1 << width) - 1
    # Hashes as rows of 64-bit words, so one candidate is compared against a whole bucket
    # in numpy: MRI hashes share long runs of background bits, so some buckets are large.
    n_words = -(-bits // 64)
    words = np.zeros((n, n_words), dtype=np.uint64)
    for i, h in enumerate(hashes):
        if h is not None:
            for w in range(n_words):
                words[i, w] = (h >> (64 * w)) & 0xFFFF_FFFF_FFFF_FFFF
    for block in range(n_blocks):
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(hashes):
            if h is not None:
                buckets[(h >> (block * width)) & mask].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            idx = np.asarray(members)
            rows = words[idx]
            for pos in range(len(members) - 1):
                dist = np.bitwise_count(rows[pos + 1 :] ^ rows[pos]).sum(axis=1)
                for other in idx[pos + 1 :][dist <= max_distance]:
                    uf.union(members[pos], int(other))
    return [uf.find(i) for i in range(n)]
