"""The models page (promote and roll back behind a confirmation and the CSRF token), the
submit forms (the API's validation and messages) and the workers page."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.schema import JobKind, ModelStage
from tests.scheduler.web.conftest import add_model, csrf_of, write_png


def _stage(sessions: sessionmaker[Session], model_id: int) -> ModelStage:
    with sessions() as s:
        return repository.get_model_version(s, model_id).stage


def test_models_page_lists_versions_with_metrics_and_lineage(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    first = add_model(sessions, promote=True)
    second = add_model(sessions, metrics={"val_macro_f1": 0.42})
    page = client.get("/ui/models").text
    assert page.index(f'id="model-{second}"') < page.index(f'id="model-{first}"')
    assert "0.610" in page and "0.700" in page and "0.420" in page
    assert "/d/train" in page and "trained by #" in page
    assert f'href="/ui/models/{second}/promote"' in page
    assert f'href="/ui/models/{first}/promote"' not in page  # already production


def test_models_page_shows_the_reviews_a_version_trained_on(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    from scheduler import review

    plain = add_model(sessions)
    reviewed = add_model(sessions)
    with sessions() as s, s.begin():
        review.record_lineage(s, reviewed, review_ids=[5, 6, 7])
    page = client.get("/ui/models").text
    row = page[page.index(f'id="model-{reviewed}"'):page.index(f'id="model-{plain}"')]
    assert "/d/train" in row and "+ 3 reviews" in row
    assert "review" not in page[page.index(f'id="model-{plain}"'):].split("</tr>")[0]


def test_promote_confirms_then_needs_csrf(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    first = add_model(sessions, promote=True)
    second = add_model(sessions)
    confirm = client.get(f"/ui/models/{second}/promote")
    assert confirm.status_code == 200
    assert f"Model version {first} (resnet18) will be archived" in confirm.text
    assert client.post(f"/ui/models/{second}/promote", data={}).status_code == 403
    assert _stage(sessions, second) is ModelStage.CANDIDATE
    done = client.post(f"/ui/models/{second}/promote", data={"csrf": csrf_of(confirm.text)},
                       follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/ui/models"
    assert _stage(sessions, second) is ModelStage.PRODUCTION
    assert _stage(sessions, first) is ModelStage.ARCHIVED
    # Roll back restores the first one, through the same confirmation.
    confirm = client.get("/ui/models/rollback")
    assert f"Archive model version {second}" in confirm.text
    client.post("/ui/models/rollback", data={"csrf": csrf_of(confirm.text)})
    assert _stage(sessions, first) is ModelStage.PRODUCTION


def test_promote_and_rollback_error_paths(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    assert client.get("/ui/models/999/promote").status_code == 404
    assert client.get("/ui/models/0/promote").status_code == 422
    assert client.get("/ui/models/rollback").status_code == 409
    csrf = csrf_of(client.get("/ui/submit").text)
    assert client.post("/ui/models/999/promote", data={"csrf": csrf}).status_code == 404
    only = add_model(sessions, promote=True)
    refused = client.post("/ui/models/rollback", data={"csrf": csrf})
    assert refused.status_code == 409
    assert f"model version {only} is the only model" in refused.text


def test_submit_classify_through_the_form(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    add_model(sessions, promote=True)
    for i in range(3):
        write_png(root / "inbox" / f"a_{i}.png", seed=i)
    csrf = csrf_of(client.get("/ui/submit").text)
    response = client.post("/ui/submit/classify", follow_redirects=False, data={
        "csrf": csrf, "inputs": f"{root}/inbox\n", "model_version_id": "", "top_k": "2"})
    assert response.status_code == 303
    job_id = int(response.headers["location"].rsplit("/", 1)[1])
    with sessions() as s:
        job = repository.get_job(s, job_id)
        assert job.kind is JobKind.CLASSIFY and job.progress_total == 3
        assert job.params["top_k"] == 2 and job.submitter == "web"


def test_submit_classify_refusals_read_like_the_cli(
    client: TestClient, sessions: sessionmaker[Session], root: Path, tmp_path: Path
) -> None:
    csrf = csrf_of(client.get("/ui/submit").text)
    outside = write_png(tmp_path / "elsewhere" / "x.png")

    def post(**fields: str) -> tuple[int, str]:
        r = client.post("/ui/submit/classify", data={"csrf": csrf, **fields})
        return r.status_code, r.text

    status, text = post(inputs=str(root))
    assert status == 409 and "no production model" in text.lower()
    add_model(sessions, promote=True)
    status, text = post(inputs=str(outside))
    assert status == 403 and "outside the allowed data roots" in text
    assert str(outside) in text  # the message names what was submitted, as the CLI's does
    status, text = post(inputs=f"{root}/nothing-here/*.png")
    assert status == 422
    status, text = post(inputs=str(root), top_k="0")
    assert status == 422 and "top_k" in text
    status, text = post(inputs="\n".join(f"{root}/f{i}.png" for i in range(21)))
    assert status == 413
    status, text = post(inputs=str(root), model_version_id="abc")
    assert status == 422 and "model_version_id" in text
    assert 'name="inputs"' in text and str(root) in text  # the form again, with its values
    with sessions() as s:
        assert repository.list_jobs(s, kind=JobKind.CLASSIFY) == []
    assert client.post("/ui/submit/classify", data={"inputs": str(root)}).status_code == 403


def test_submit_train_validates_like_the_api(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    data = root / "train"
    data.mkdir()
    csrf = csrf_of(client.get("/ui/submit").text)
    bad = client.post("/ui/submit/train", data={"csrf": csrf, "data": str(data),
                                                 "epochs": "many"})
    assert bad.status_code == 422 and "epochs" in bad.text
    bad_arch = client.post("/ui/submit/train", data={"csrf": csrf, "data": str(data),
                                                      "arch": "vgg99"})
    assert bad_arch.status_code == 422 and "arch" in bad_arch.text
    missing = client.post("/ui/submit/train", data={"csrf": csrf, "data": str(root / "no")})
    assert missing.status_code == 422 and "not a directory" in missing.text
    ok = client.post("/ui/submit/train", follow_redirects=False, data={
        "csrf": csrf, "data": str(data), "arch": "resnet18", "epochs": "1",
        "image_size": "32", "finetune": "on"})
    assert ok.status_code == 303
    job_id = int(ok.headers["location"].rsplit("/", 1)[1])
    with sessions() as s:
        params = repository.get_job(s, job_id).params
    assert params["arch"] == "resnet18" and params["epochs"] == 1
    assert params["finetune"] is True and params["warm_start"] is False


def test_workers_page_without_workers(client: TestClient) -> None:
    page = client.get("/ui/workers").text
    assert "No worker answered" in page and ":5555/" in page


def test_submit_forms_carry_the_review_options(
    client: TestClient, sessions: sessionmaker[Session], root: Path
) -> None:
    add_model(sessions, promote=True)
    write_png(root / "inbox" / "a.png")
    (root / "train").mkdir()
    page = client.get("/ui/submit").text
    assert 'name="review_below"' in page and 'name="explain"' in page
    assert 'name="with_reviews"' in page and 'name="reviews_from"' in page
    csrf = csrf_of(page)
    done = client.post("/ui/submit/classify", follow_redirects=False, data={
        "csrf": csrf, "inputs": str(root / "inbox"), "review_below": "0.35",
        "explain": "uncertain"})
    assert done.status_code == 303, done.text
    classify_id = int(done.headers["location"].rsplit("/", 1)[1])
    bad = client.post("/ui/submit/classify", data={
        "csrf": csrf, "inputs": str(root / "inbox"), "review_below": "2"})
    assert bad.status_code == 422 and "review_below" in bad.text
    bad = client.post("/ui/submit/train", data={
        "csrf": csrf, "data": str(root / "train"), "reviews_from": "999"})
    assert bad.status_code == 422 and "reviews_from: there is no job 999" in bad.text
    done = client.post("/ui/submit/train", follow_redirects=False, data={
        "csrf": csrf, "data": str(root / "train"), "reviews_from": str(classify_id)})
    assert done.status_code == 303, done.text
    train_id = int(done.headers["location"].rsplit("/", 1)[1])
    with sessions() as s:
        job = repository.get_job(s, classify_id)
        assert job.review_below == 0.35 and job.params["explain"] == "uncertain"
        params = repository.get_job(s, train_id).params
        assert params["reviews_from"] == classify_id and params["with_reviews"] is True
