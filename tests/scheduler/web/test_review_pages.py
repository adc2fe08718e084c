"""The dashboard's review queue (/ui/review) and the review controls of the image page:
order and progress, decisions through the forms, the reviewer rule, and the error paths
(unknown item, bad label, missing CSRF, error row)."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from scheduler import review
from scheduler.api import create_app
from scheduler.database import upgrade
from scheduler.dispatch import EXPLAIN_TASK
from scheduler.endpoints.review import TOKEN_REVIEWER
from scheduler.schema import Job, PredictionRow, ReviewStatus
from scheduler.settings import Settings
from scheduler.web.review import default_reviewer
from tests.scheduler.api_factories import sent_tasks
from tests.scheduler.web.conftest import CLASSES, SeededJob, csrf_of, seed_classify, web_settings

TOKEN = "review-t0ken"


def _seed(sessions: sessionmaker[Session], root: Path, *, review_below: float = 0.95,
          n: int = 6) -> tuple[SeededJob, dict[int, int]]:
    """A classify job whose error-free items (confidence 0.9 .. 0.5) are all below
    ``review_below``; returns it and item index -> review item id."""
    seeded = seed_classify(sessions, root, n=n, errors=1)
    with sessions() as s, s.begin():
        s.execute(update(Job).where(Job.id == seeded.job_id).values(review_below=review_below))
        rows = s.execute(select(PredictionRow.item_index, PredictionRow.id)
                         .where(PredictionRow.job_id == seeded.job_id))
        ids = {int(index): int(item_id) for index, item_id in rows}
    return seeded, ids


def _current(html: str) -> int | None:
    match = re.search(r'id="review-current" data-item-id="(\d+)"', html)
    return int(match.group(1)) if match else None


def _post(client: TestClient, item_id: int, **fields: str) -> object:
    csrf = csrf_of(client.get("/ui/review").text)
    return client.post(f"/ui/review/{item_id}", data={"csrf": csrf, **fields},
                       follow_redirects=False)


def test_queue_page_shows_the_most_uncertain_first_and_the_progress(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded, ids = _seed(sessions, root)
    page = client.get("/ui/review").text
    assert _current(page) == ids[4]  # confidence 0.5: the highest entropy
    upcoming = [int(i) for i in re.findall(r'<tr class="review-item" data-item-id="(\d+)"', page)]
    with sessions() as s:
        expected = [i.item_id for i in review.queue(s, job_id=seeded.job_id)]
    assert [ids[4], *upcoming] == expected  # the queue's own order, nothing re-sorted
    assert ids[5] not in expected  # the error row never enters the queue
    assert re.search(r'data-field="pending">5</strong> pending / '
                     r'<strong data-field="decided">0</strong> decided', page)
    assert page.count('class="topbar"') == 2  # the current item's top-k (two stored)
    assert 'data-key="a"' in page and 'data-key="1"' in page and 'data-key="n"' in page
    for name in CLASSES:  # the correct select offers every class of the model
        assert f'<option value="{name}"' in page
    # Skipping (n) moves past the current item without deciding it.
    skip = re.search(r'href="([^"]+)" data-key="n"', page)
    assert skip
    skipped = client.get(skip.group(1).replace("&amp;", "&")).text
    assert _current(skipped) == expected[1]
    assert "back to the most uncertain" in skipped
    assert client.get("/ui/review?after=bogus").status_code == 422


def test_correcting_advances_the_queue_and_lands_in_the_history(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded, ids = _seed(sessions, root)
    first = _current(client.get("/ui/review").text)
    assert first == ids[4]
    response = _post(client, first, pick="Glioblastoma", back="/ui/review")
    assert response.status_code == 303 and response.headers["location"] == "/ui/review"
    page = client.get("/ui/review").text
    assert _current(page) not in (first, None)
    assert re.search(r'data-field="pending">4</strong> pending / '
                     r'<strong data-field="decided">1</strong> decided', page)
    # Item 4 was predicted Meningioma (labels cycle), so the pick is a correction ...
    item = client.get(f"/ui/jobs/{seeded.job_id}/items/4").text
    history = item[item.index('id="history"'):]
    assert "corrected" in history and "<strong>Glioblastoma</strong>" in history
    assert default_reviewer() in history
    # ... and picking the predicted label (or the accept button) is an acceptance.
    with sessions() as s:
        predicted = review.get_item(s, ids[3]).label
    back = f"/ui/jobs/{seeded.job_id}/items/3"
    response = _post(client, ids[3], pick=predicted, back=back, reviewer="dr-lee")
    assert response.status_code == 303 and response.headers["location"] == back
    with sessions() as s:
        decided = review.get_item(s, ids[3])
        assert (decided.status, decided.reviewed_label, decided.reviewer) == (
            ReviewStatus.ACCEPTED, predicted, "dr-lee")
    # A redirect target outside the dashboard is not followed.
    response = _post(client, ids[2], action="accept", back="//evil.example/")
    assert response.headers["location"] == "/ui/review"


def test_review_forms_refuse_unknown_items_bad_labels_missing_csrf_and_error_rows(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    _, ids = _seed(sessions, root)
    unknown = _post(client, 99_999, action="accept")
    assert unknown.status_code == 404 and "review item 99999 not found" in unknown.text
    bad = _post(client, ids[0], action="correct", label="Dragon")
    assert bad.status_code == 422
    assert "'Dragon' is not a class of the model" in html.unescape(bad.text)
    assert "valid labels: " + ", ".join(CLASSES) in bad.text
    assert _post(client, ids[0], action="dance").status_code == 422
    no_csrf = client.post(f"/ui/review/{ids[0]}", data={"action": "accept"})
    assert no_csrf.status_code == 403 and "reload the page" in no_csrf.text
    error_row = _post(client, ids[5], action="flag")
    assert error_row.status_code == 409 and "is an error row" in error_row.text
    with sessions() as s:
        assert review.history(s, ids[0]) == []  # nothing was recorded by the refusals


def test_image_page_review_controls_flag_and_explanation(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded, ids = _seed(sessions, root, review_below=0.6)
    page = client.get(f"/ui/jobs/{seeded.job_id}/items/0").text
    assert f'action="/ui/review/{ids[0]}"' in page
    assert f'value="/ui/jobs/{seeded.job_id}/items/0"' in page  # comes back here
    assert "Request a Grad-CAM explanation" in page and 'alt="Grad-CAM overlay"' not in page
    # Confidence 0.9 is above review_below: flagging puts it in the queue.
    with sessions() as s:
        assert ids[0] not in [i.item_id for i in review.queue(s)]
    response = _post(client, ids[0], action="flag", back=f"/ui/jobs/{seeded.job_id}/items/0")
    assert response.status_code == 303
    with sessions() as s:
        assert ids[0] in [i.item_id for i in review.queue(s)]
    assert "Flag for review" not in client.get(f"/ui/jobs/{seeded.job_id}/items/0").text
    # The error row: no review form, no explanation button; requesting one is refused.
    error_page = client.get(f"/ui/jobs/{seeded.job_id}/items/5").text
    assert "review-form" not in error_page and "Grad-CAM" not in error_page
    csrf = csrf_of(page)
    refused = client.post(f"/ui/jobs/{seeded.job_id}/items/5/explanation", data={"csrf": csrf})
    assert refused.status_code == 409
    assert client.post(f"/ui/jobs/{seeded.job_id}/items/0/explanation").status_code == 403
    assert client.post(f"/ui/jobs/{seeded.job_id}/items/99/explanation",
                       data={"csrf": csrf}).status_code == 404
    # An overlay the worker wrote (under the job's folder) replaces the button.
    overlay = settings.jobs_dir / str(seeded.job_id) / "explanations" / f"{ids[1]}.png"
    overlay.parent.mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 40, 40)).save(overlay)
    with sessions() as s, s.begin():
        s.execute(update(PredictionRow).where(PredictionRow.id == ids[1])
                  .values(explanation=str(overlay)))
    shown = client.get(f"/ui/jobs/{seeded.job_id}/items/1").text
    assert 'alt="Grad-CAM overlay"' in shown and "Request a Grad-CAM" not in shown
    served = client.get(f"/ui/jobs/{seeded.job_id}/items/1/explanation")
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"


def test_requesting_an_explanation_sends_the_task(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded, ids = _seed(sessions, root)
    csrf = csrf_of(client.get(f"/ui/jobs/{seeded.job_id}/items/0").text)
    response = client.post(f"/ui/jobs/{seeded.job_id}/items/0/explanation",
                           data={"csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == (
        f"/ui/jobs/{seeded.job_id}/items/0?explanation=requested")
    assert sent_tasks(settings.data_dir) == [(EXPLAIN_TASK, [seeded.job_id, ids[0]])]
    page = client.get(response.headers["location"]).text
    assert "Explanation requested" in page and "Request again" in page
    # The error row is refused by request_explanation itself: nothing more is sent.
    refused = client.post(f"/ui/jobs/{seeded.job_id}/items/5/explanation", data={"csrf": csrf})
    assert refused.status_code == 409 and "is an error row" in refused.text
    assert len(sent_tasks(settings.data_dir)) == 1


@pytest.fixture
def token_client(tmp_path: Path, root: Path, sqlite_url: str) -> Iterator[TestClient]:
    upgrade(sqlite_url)
    with TestClient(create_app(web_settings(tmp_path, root, sqlite_url,
                                            api_token=TOKEN))) as c:
        form = c.get("/ui/login")
        assert c.post("/ui/login", data={"csrf": csrf_of(form.text), "token": TOKEN},
                      follow_redirects=False).status_code == 303
        yield c


def test_with_a_token_the_reviewer_is_the_tokens_identity(
    token_client: TestClient, tmp_path: Path, root: Path, sqlite_url: str
) -> None:
    from scheduler.database import make_engine, make_session_factory

    engine = make_engine(sqlite_url)
    try:
        sessions = make_session_factory(engine)
        _, ids = _seed(sessions, root)
        page = token_client.get("/ui/review").text
        assert 'name="reviewer"' not in page  # nobody can type another name
        response = _post(token_client, ids[4], action="accept", reviewer="someone-else")
        assert response.status_code == 303
        with sessions() as s:
            assert review.get_item(s, ids[4]).reviewer == TOKEN_REVIEWER
    finally:
        engine.dispose()


def test_queue_of_one_job_and_no_shortcuts_on_the_image_page(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    seeded, ids = _seed(sessions, root)
    other, _ = _seed(sessions, root)
    page = client.get(f"/ui/review?job={other.job_id}").text
    assert _current(page) not in ids.values()
    assert client.get("/ui/review?job=9999").status_code == 404
    item = client.get(f"/ui/jobs/{seeded.job_id}/items/4").text
    assert "review-form" in item and "data-key=" not in item  # no decision by a stray key
    # Enter in a text field submits the form's default button: a disabled one.
    form = item[item.index('id="review-form"'):]
    default = re.search(r"<button [^>]*>", form)
    assert default and "disabled" in default.group(0)
