"""explain_items: overlay artifacts named by item id, idempotent across re-runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.checkpoint import LoadedCheckpoint
from core.explanation import Explainer
from tests.core.test_explanation import make_explain_checkpoint, write_slices
from worker.explaining import explain_items


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> LoadedCheckpoint:
    return make_explain_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_overlays_are_named_by_item_id_and_a_rerun_overwrites(
    ckpt: LoadedCheckpoint, tmp_path: Path
) -> None:
    good = write_slices(tmp_path / "in", 2)
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not a png")
    items = [(41, str(good[0])), (7, str(broken)), (1003, str(good[1]))]
    job_dir = tmp_path / "job"
    explainer = Explainer(ckpt, batch_size=2)

    first = explain_items(explainer, items, job_dir)
    assert first == {41: "explanations/41.png", 1003: "explanations/1003.png"}
    assert all((job_dir / rel).is_file() for rel in first.values())
    assert (job_dir / "explanations" / "41.npy").is_file()

    again = explain_items(explainer, items, job_dir)
    assert again == first
    assert sorted(p.name for p in (job_dir / "explanations").iterdir()) == [
        "1003.npy", "1003.png", "41.npy", "41.png"
    ]
