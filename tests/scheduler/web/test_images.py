"""The image page, thumbnails (cached, confined to the data roots) and artifact files
(confined to the job and model folders), as the API confines them."""

from __future__ import annotations

import io
import os
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.schema import JobKind
from scheduler.settings import Settings
from scheduler.web.thumbnails import cache_dir
from tests.scheduler.web.conftest import seed_classify, write_png


def test_item_page_shows_slice_crop_and_top_k(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded = seed_classify(sessions, root, n=3, errors=1)
    page = client.get(f"/ui/jobs/{seeded.job_id}/items/0").text
    assert f"/ui/jobs/{seeded.job_id}/items/0/image?side=512&amp;rendering=cropped" in page
    assert "Glioblastoma" in page and 'class="topbar"' in page
    # No explanation recorded: no overlay, a button that requests one.
    assert 'alt="Grad-CAM overlay"' not in page and "Request a Grad-CAM explanation" in page
    failed = client.get(f"/ui/jobs/{seeded.job_id}/items/2").text
    assert "not an image" in failed and "/image?" not in failed


def test_item_page_unknown_items(client: TestClient, sessions: sessionmaker[Session],
                                 root: Path) -> None:
    seeded = seed_classify(sessions, root, n=2, errors=0)
    assert client.get(f"/ui/jobs/{seeded.job_id}/items/7").status_code == 404
    assert client.get(f"/ui/jobs/{seeded.job_id}/items/-1").status_code == 422
    assert client.get(f"/ui/jobs/{seeded.job_id + 50}/items/0").status_code == 404
    assert client.get(f"/ui/jobs/{seeded.job_id}/items/0/explanation").status_code == 404


def test_thumbnail_is_a_small_png_made_once(
    client: TestClient, sessions: sessionmaker[Session], root: Path, settings: Settings
) -> None:
    seeded = seed_classify(sessions, root, n=2, errors=0)
    url = f"/ui/jobs/{seeded.job_id}/items/0/image"
    response = client.get(url, params={"side": 64})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as img:
        assert max(img.size) <= 64
    cached = list(cache_dir(settings).rglob("*.png"))
    assert len(cached) == 1
    before = cached[0].stat().st_mtime_ns
    assert client.get(url, params={"side": 64}).content == response.content
    assert cached[0].stat().st_mtime_ns == before  # served from the cache
    cropped = client.get(url, params={"side": 128, "rendering": "cropped"})
    assert cropped.status_code == 200
    with Image.open(io.BytesIO(cropped.content)) as img:
        width, height = img.size  # the bright centre, not the whole 48x40 slice
        assert width < 48 and height < 40


def test_thumbnail_refuses_bad_sizes_and_renderings(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded = seed_classify(sessions, root, n=1, errors=0)
    url = f"/ui/jobs/{seeded.job_id}/items/0/image"
    assert client.get(url, params={"side": 4000}).status_code == 422
    assert client.get(url, params={"side": "big"}).status_code == 422
    assert client.get(url, params={"rendering": "raw"}).status_code == 422


def test_thumbnail_outside_the_data_roots_is_403(
    client: TestClient, sessions: sessionmaker[Session], root: Path, tmp_path: Path
) -> None:
    secret = write_png(tmp_path / "elsewhere" / "secret.png")
    seeded = seed_classify(sessions, root, n=2, errors=0, outside=secret)
    response = client.get(f"/ui/jobs/{seeded.job_id}/items/0/image")
    assert response.status_code == 403
    assert "outside the data roots" in response.text and "secret" not in response.text
    # A link inside the roots that leads outside them is refused the same way.
    link = root / "inbox" / "img_1.png"
    link.unlink()
    os.symlink(secret, link)
    assert client.get(f"/ui/jobs/{seeded.job_id}/items/1/image").status_code == 403


def test_thumbnail_of_a_missing_or_broken_file_is_404(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded = seed_classify(sessions, root, n=2, errors=0)
    Path(seeded.paths[0]).unlink()
    Path(seeded.paths[1]).write_bytes(b"not a png at all")
    gone = client.get(f"/ui/jobs/{seeded.job_id}/items/0/image")
    assert gone.status_code == 404 and "gone" in gone.text
    broken = client.get(f"/ui/jobs/{seeded.job_id}/items/1/image")
    assert broken.status_code == 404 and "cannot read the image" in broken.text


def test_artifacts_are_served_only_from_the_job_and_model_folders(
    client: TestClient, sessions: sessionmaker[Session], settings: Settings
) -> None:
    plot = write_png(settings.jobs_dir / "1" / "confusion_matrix.png")
    with sessions() as s, s.begin():
        job = repository.create_job(s, kind=JobKind.TRAIN, params={"data": "/d"})
        ok = repository.record_artifact(s, job_id=job.id, kind="confusion_matrix",
                                        path=str(plot))
        db = repository.record_artifact(s, job_id=job.id, kind="report",
                                        path=str(settings.data_dir / "mriq.db"))
        gone = repository.record_artifact(s, job_id=job.id, kind="report",
                                          path=str(settings.jobs_dir / "1" / "gone.json"))
        ids = (ok.id, db.id, gone.id, job.id)
    assert client.get(f"/ui/artifacts/{ids[0]}").content == plot.read_bytes()
    assert client.get(f"/ui/artifacts/{ids[1]}").status_code == 403
    assert client.get(f"/ui/artifacts/{ids[2]}").status_code == 404
    assert client.get("/ui/artifacts/99999").status_code == 404
    page = client.get(f"/ui/jobs/{ids[3]}").text  # the train job shows its plot
    assert f'src="/ui/artifacts/{ids[0]}"' in page
