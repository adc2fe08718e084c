"""The jobs list, the job page (filters, keyset pages, CSV) and their error paths."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.schema import JobKind, JobStatus
from scheduler.web import jobs as web_jobs
from tests.scheduler.web.conftest import csrf_of, seed_classify


def _item_indices(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<td class="num"><a href="/ui/jobs/\d+/items/(\d+)">',
                                       html)]


def test_root_and_ui_redirect_to_the_jobs_page(client: TestClient) -> None:
    for url in ("/", "/ui"):
        response = client.get(url, follow_redirects=False)
        assert response.status_code in (307, 308)
        assert response.headers["location"].endswith("/ui/")


def test_jobs_page_shows_progress_counts_and_filters(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded = seed_classify(sessions, root, n=6, errors=2)
    page = client.get("/ui/").text
    assert f'href="/ui/jobs/{seeded.job_id}"' in page
    row = page[page.index(f'data-job-id="{seeded.job_id}"'):]
    row = row[:row.index("</tr>")]
    assert "6 / 6" in row and "100 %" in row and ">2</td>" in row  # done, bar, errors
    assert "succeeded" in row
    only_train = client.get("/ui/?kind=train").text
    assert f'href="/ui/jobs/{seeded.job_id}"' not in only_train
    with sessions() as s:
        train_id = repository.get_model_version(s, seeded.model_id).training_job_id
    assert f'data-job-id="{train_id}"' in only_train
    assert f'href="/ui/jobs/{seeded.job_id}"' not in client.get("/ui/?status=failed").text


def test_jobs_page_pages_by_keyset_without_overlap(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    with sessions() as s, s.begin():
        for _ in range(web_jobs.JOBS_PER_PAGE + 5):
            repository.create_job(s, kind=JobKind.EVALUATE, params={})
    first = client.get("/ui/").text
    older = re.search(r'href="(/ui/\?[^"]*before=(\d+))"', first)
    assert older, "no link to the older jobs"
    second = client.get(older.group(1).replace("&amp;", "&")).text
    ids_1 = set(re.findall(r'data-job-id="(\d+)"', first))
    ids_2 = set(re.findall(r'data-job-id="(\d+)"', second))
    assert len(ids_1) == web_jobs.JOBS_PER_PAGE and len(ids_2) == 5
    assert not ids_1 & ids_2
    assert max(map(int, ids_2)) < int(older.group(2))


def test_jobs_page_refuses_bad_filters(client: TestClient) -> None:
    response = client.get("/ui/?status=bogus")
    assert response.status_code == 422 and "status: must be one of" in response.text
    assert client.get("/ui/?before=0").status_code == 422
    assert client.get("/ui/jobs/progress.json?ids=1,x").status_code == 422


def test_job_page_unknown_or_malformed_id(client: TestClient) -> None:
    response = client.get("/ui/jobs/999")
    assert response.status_code == 404 and "job 999 not found" in response.text
    assert "text/html" in response.headers["content-type"]
    assert client.get("/ui/jobs/abc").status_code == 422
    assert client.get("/ui/jobs/0").status_code == 422
    assert client.get("/ui/jobs/999/progress.json").status_code == 404
    assert client.get("/ui/jobs/999/predictions.csv").status_code == 404


def test_job_page_lists_predictions_errors_and_chunks(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded = seed_classify(sessions, root, n=6, errors=1)
    page = client.get(f"/ui/jobs/{seeded.job_id}").text
    assert _item_indices(page) == list(range(6))
    assert "Errors (1)" in page and "not an image" in page
    assert page.count('class="chunk chunk-succeeded"') == 2  # 6 items in chunks of 4
    assert f"/ui/jobs/{seeded.job_id}/items/0/image?side=64" in page
    progress = client.get(f"/ui/jobs/{seeded.job_id}/progress.json").json()
    assert progress["percent"] == 100 and progress["terminal"] is True
    assert progress["errors"] == 1 and progress["done"] == progress["total"] == 6


def test_prediction_filters(client: TestClient, sessions: sessionmaker[Session],
                            root: Path) -> None:
    seeded = seed_classify(sessions, root, n=6, errors=1)
    url = f"/ui/jobs/{seeded.job_id}"
    assert _item_indices(client.get(url, params={"label": "Meningioma"}).text) == [1, 4]
    band = client.get(url, params={"min_confidence": "0.55", "max_confidence": "0.85"}).text
    assert _item_indices(band) == [1, 2, 3]  # 0.8, 0.7, 0.6
    assert _item_indices(client.get(url, params={"errors": "1"}).text) == [5]
    ascending = client.get(url, params={"sort": "confidence_asc"}).text
    assert _item_indices(ascending) == [5, 4, 3, 2, 1, 0]  # the error row sorts lowest
    none = client.get(url, params={"label": "Normal", "min_confidence": "0.95"}).text
    assert "match the filter" in none


def test_prediction_filters_refuse_bad_values(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded = seed_classify(sessions, root, n=2, errors=0)
    url = f"/ui/jobs/{seeded.job_id}"
    for params, message in (
        ({"min_confidence": "high"}, "min_confidence: must be a number"),
        ({"max_confidence": "1.5"}, "max_confidence: must be between 0 and 1"),
        ({"sort": "random"}, "sort: must be one of"),
        ({"after": "x:y"}, "after: not a page position"),
        ({"after": "nan:3", "sort": "confidence_desc"}, "after: not a page position"),
    ):
        response = client.get(url, params=params)
        assert response.status_code == 422, params
        assert message in response.text, params


def test_prediction_pages_by_confidence_keyset(
    client: TestClient, sessions: sessionmaker[Session], root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(web_jobs, "PREDICTIONS_PER_PAGE", 4)
    seeded = seed_classify(sessions, root, n=7, errors=1)
    url = f"/ui/jobs/{seeded.job_id}"
    first = client.get(url, params={"sort": "confidence_desc"}).text
    assert _item_indices(first) == [0, 1, 2, 3]
    link = re.search(r'href="(\?[^"]*after=[^"#]+)', first)
    assert link
    second = client.get(url + link.group(1).replace("&amp;", "&")).text
    assert _item_indices(second) == [4, 5, 6]
    assert "next page" not in second


def test_csv_download_is_the_api_export(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded = seed_classify(sessions, root, n=3, errors=1)
    response = client.get(f"/ui/jobs/{seeded.job_id}/predictions.csv")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["path"] for r in rows] == list(seeded.paths)
    assert rows[2]["error"] and not rows[0]["error"] and rows[0]["label"] == "Glioblastoma"


def test_cancel_needs_the_csrf_token(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    with sessions() as s, s.begin():
        job_id = int(repository.create_job(s, kind=JobKind.EVALUATE, params={}).id)
    page = client.get(f"/ui/jobs/{job_id}").text
    refused = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": "forged"})
    assert refused.status_code == 403
    with sessions() as s:
        assert repository.get_job(s, job_id).status is JobStatus.QUEUED
    done = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": csrf_of(page)},
                       follow_redirects=False)
    assert done.status_code == 303
    with sessions() as s:
        assert repository.get_job(s, job_id).status is JobStatus.CANCELLED


def test_progress_rate_and_eta_of_a_running_job() -> None:
    from datetime import UTC, datetime, timedelta

    from scheduler.schema import Job

    start = datetime(2026, 1, 1, tzinfo=UTC)
    job = Job(id=1, kind=JobKind.CLASSIFY, status=JobStatus.RUNNING, progress_done=30,
              progress_total=120, started_at=start)
    p = web_jobs.progress_of(job, now=start + timedelta(seconds=10))
    assert (p.percent, p.rate, p.eta_s, p.terminal) == (25, 3.0, 30.0, False)
    job.status, job.progress_done = JobStatus.SUCCEEDED, 120
    job.finished_at = start + timedelta(seconds=40)
    p = web_jobs.progress_of(job, now=start + timedelta(hours=1))
    assert (p.percent, p.rate, p.eta_s, p.terminal) == (100, 3.0, None, True)
    queued = Job(id=2, kind=JobKind.TRAIN, status=JobStatus.QUEUED, progress_done=0,
                 progress_total=0)
    assert web_jobs.progress_of(queued).percent == 0 and web_jobs.progress_of(queued).rate is None
    queued.status = JobStatus.SUCCEEDED  # a job that counted nothing but finished
    assert web_jobs.progress_of(queued).percent == 100


def test_jobs_progress_json_for_the_live_list(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded = seed_classify(sessions, root, n=4, errors=0)
    with sessions() as s, s.begin():
        queued = int(repository.create_job(s, kind=JobKind.EVALUATE, params={}).id)
    body = client.get(f"/ui/jobs/progress.json?ids={seeded.job_id},{queued},9999").json()
    assert set(body) == {str(seeded.job_id), str(queued)}
    assert body[str(seeded.job_id)]["percent"] == 100 and body[str(seeded.job_id)]["terminal"]
    assert body[str(queued)]["status"] == "queued" and not body[str(queued)]["terminal"]
    page = client.get("/ui/").text
    assert 'data-live-jobs="/ui/jobs/progress.json"' in page  # a job is still open
    assert f'data-job-id="{queued}" data-running="1"' in page
