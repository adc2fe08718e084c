"""Label spaces: the 15 diagnostic classes and the 44 class+sequence labels.

The order of classes is fixed here, once, and stored with every model: a model's output
index i always means ``classes_for(mode)[i]``. Folder names from the Kaggle 44c layout, a
plain 15-folder layout and hand-merged copies (odd case, trailing spaces, ``Normal`` /
``_NORMAL`` / ``NORMAL``) all map onto these names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

# Spellings follow the public data set (Astrocitoma, Ependimoma, ... are Portuguese/Spanish
# spellings); they are the names users see in their folders, so we keep them.
CLASSES_15: tuple[str, ...] = (
    "Astrocitoma",
    "Carcinoma",
    "Ependimoma",
    "Ganglioglioma",
    "Germinoma",
    "Glioblastoma",
    "Granuloma",
    "Meduloblastoma",
    "Meningioma",
    "Neurocitoma",
    "Normal",
    "Oligodendroglioma",
    "Papiloma",
    "Schwannoma",
    "Tuberculoma",
)
SEQUENCES: tuple[str, ...] = ("T1", "T1C+", "T2")
NORMAL = "Normal"
# The public set has no contrast-enhanced normal scans, hence 14 * 3 + 2 = 44 labels.
NORMAL_SEQUENCES: tuple[str, ...] = ("T1", "T2")

CLASSES_44: tuple[str, ...] = tuple(
    f"{cls} {seq}"
    for cls in CLASSES_15
    for seq in (NORMAL_SEQUENCES if cls == NORMAL else SEQUENCES)
)


class LabelMode(StrEnum):
    """Which label space a model predicts."""

    CLASSES_15 = "15"
    CLASSES_44 = "44"


def as_label_mode(mode: LabelMode | str | int) -> LabelMode:
    """Accept ``LabelMode``, ``"15"``/``"44"`` or 15/44."""
    if isinstance(mode, LabelMode):
        return mode
    try:
        return LabelMode(str(mode))
    except ValueError:
        raise ValueError(f"label mode must be 15 or 44, not {mode!r}") from None


def classes_for(mode: LabelMode | str | int) -> tuple[str, ...]:
    """The ordered class names for a label mode (``"15"`` or ``"44"``)."""
    return CLASSES_15 if as_label_mode(mode) is LabelMode.CLASSES_15 else CLASSES_44


class UnknownFolderError(ValueError):
    """Raised when folder names cannot be mapped to a label; lists every offending name."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(sorted(set(names)))
        listed = ", ".join(repr(n) for n in self.names)
        super().__init__(
            f"{len(self.names)} folder name(s) match no known class: {listed}. "
            f"Known classes: {', '.join(CLASSES_15)} (optionally followed by "
            f"{' | '.join(SEQUENCES)}). Use --skip-unknown to skip them."
        )


@dataclass(frozen=True)
class FolderLabel:
    """What a folder name says: a class and, in the 44c layout, an MRI sequence."""

    cls: str
    sequence: str | None

    def label(self, mode: LabelMode | str | int) -> str | None:
        """The label in ``mode``; None when a 44-label mode meets a folder with no sequence."""
        if as_label_mode(mode) is LabelMode.CLASSES_15:
            return self.cls
        if self.sequence is None:
            return None
        name = f"{self.cls} {self.sequence}"
        return name if name in CLASSES_44 else None


_CLASS_KEYS = {c.casefold(): c for c in CLASSES_15}
_NORMAL_ALIASES = {"normal", "_normal", "no tumor", "notumor", "no_tumor", "healthy"}
_SEQUENCE_KEYS = {s.casefold(): s for s in SEQUENCES} | {
    "t1c": "T1C+",
    "t1c+": "T1C+",
    "t1+c": "T1C+",
    "t1ce": "T1C+",
}


def parse_folder_name(name: str) -> FolderLabel | None:
    """Map a folder name to its class (and sequence), or None if it is not a known class.

    Tolerates surrounding/trailing whitespace, any letter case, repeated spaces, underscores
    as separators and the ``_NORMAL`` / ``NORMAL`` / ``Normal`` spellings.
    """
    text = re.sub(r"\s+", " ", name.strip())
    if not text:
        return None
    words = text.split(" ")
    sequence: str | None = None
    if len(words) > 1 and words[-1].casefold() in _SEQUENCE_KEYS:
        sequence = _SEQUENCE_KEYS[words[-1].casefold()]
        words = words[:-1]
    head = " ".join(words).casefold()
    if head in _NORMAL_ALIASES or head.strip("_ ") in _NORMAL_ALIASES:
        cls = NORMAL
    else:
        cls_or_none = _CLASS_KEYS.get(head) or _CLASS_KEYS.get(head.strip("_ "))
        if cls_or_none is None:
            return None
        cls = cls_or_none
    # A "Normal T1C+" folder is absent from the public set; FolderLabel.label() gives it a
    # 15-class label and no 44-class one.
    return FolderLabel(cls=cls, sequence=sequence)


def label_index(label: str, mode: LabelMode | str | int) -> int:
    """Index of ``label`` in the fixed class order of ``mode``."""
    classes = classes_for(mode)
    try:
        return classes.index(label)
    except ValueError:
        raise ValueError(
            f"{label!r} is not a label of the {as_label_mode(mode).value}-label space"
        ) from None
