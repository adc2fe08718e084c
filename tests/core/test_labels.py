"""The fixed label spaces and the folder-name parser."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from core.labels import (
    CLASSES_15,
    CLASSES_44,
    LabelMode,
    UnknownFolderError,
    as_label_mode,
    classes_for,
    label_index,
    parse_folder_name,
)

SHARED_CSV = Path(__file__).resolve().parents[3] / "shared" / "kaggle44c-folders.csv"


def test_fifteen_classes_are_fourteen_tumours_and_normal_in_fixed_order() -> None:
    assert len(CLASSES_15) == 15
    assert "Normal" in CLASSES_15
    # The order is part of every stored model: changing it silently relabels old models.
    assert tuple(sorted(CLASSES_15)) == CLASSES_15
    assert classes_for("15") is CLASSES_15
    assert classes_for(LabelMode.CLASSES_15) is CLASSES_15


def test_forty_four_labels_have_no_contrast_enhanced_normal() -> None:
    assert len(CLASSES_44) == 44
    assert len(set(CLASSES_44)) == 44
    assert "Normal T1C+" not in CLASSES_44
    assert {"Normal T1", "Normal T2", "Meningioma T1C+"} <= set(CLASSES_44)
    assert classes_for(44) is CLASSES_44


@pytest.mark.skipif(not SHARED_CSV.exists(), reason="../shared is only beside a checkout")
def test_every_real_kaggle_folder_maps_to_its_class_and_sequence() -> None:
    with SHARED_CSV.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 44
    labels_44 = set()
    for row in rows:
        parsed = parse_folder_name(row["folder"])
        assert parsed is not None, row["folder"]
        assert (parsed.cls, parsed.sequence) == (row["class"], row["sequence"])
        assert parsed.label("15") == row["class"]
        labels_44.add(parsed.label("44"))
    assert labels_44 == set(CLASSES_44)


@pytest.mark.parametrize(
    ("name", "cls", "sequence"),
    [
        ("_NORMAL T1", "Normal", "T1"),
        ("NORMAL", "Normal", None),
        ("normal  t2 ", "Normal", "T2"),
        ("Meningioma T1C+ ", "Meningioma", "T1C+"),
        ("  meningioma   t1c+", "Meningioma", "T1C+"),
        ("GLIOBLASTOMA", "Glioblastoma", None),
        ("Schwannoma\tT2", "Schwannoma", "T2"),
    ],
)
def test_hand_merged_names_are_tolerated(name: str, cls: str, sequence: str | None) -> None:
    parsed = parse_folder_name(name)
    assert parsed is not None
    assert (parsed.cls, parsed.sequence) == (cls, sequence)


@pytest.mark.parametrize("name", ["", "   ", "Tumour", "Meningioma T4", "T1", "images"])
def test_unknown_names_are_not_guessed(name: str) -> None:
    assert parse_folder_name(name) is None


def test_a_folder_without_sequence_has_no_44_label() -> None:
    parsed = parse_folder_name("Glioblastoma")
    assert parsed is not None
    assert parsed.label("15") == "Glioblastoma"
    assert parsed.label("44") is None


def test_unknown_folder_error_lists_every_name_once() -> None:
    err = UnknownFolderError(["zeta", "alpha", "zeta"])
    assert err.names == ("alpha", "zeta")
    message = str(err)
    assert "'alpha'" in message and "'zeta'" in message
    assert "--skip-unknown" in message


def test_label_index_and_modes() -> None:
    assert label_index("Astrocitoma", "15") == 0
    assert label_index("Tuberculoma T2", "44") == 43
    with pytest.raises(ValueError, match="15-label"):
        label_index("Meningioma T1", "15")
    with pytest.raises(ValueError, match="15 or 44"):
        as_label_mode("30")
