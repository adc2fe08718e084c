"""The web dashboard in a real browser: Playwright driving Debian's Chromium against
``mriq api`` (with MRIQ_API_TOKEN) and a real ``mriq worker`` on PostgreSQL and Redis.

One browser session walks the pages in order: refused without the token, log in, submit a
classify job through the form, watch its bar reach 100 % without a reload, filter the
predictions, open an image, correct the first review item with a keyboard shortcut, promote
a model behind its confirmation, log out. Screenshots of each page go to
``test-output/screenshots/``. Playwright's own browser download cannot
work offline: ``scripts/test.sh`` installs ``chromium`` with apt-get when it is missing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.database import make_engine, make_session_factory, upgrade
from scheduler.dispatch import CPU_QUEUE, GPU_QUEUE, Dispatcher
from scheduler.schema import JobKind, JobStatus, ModelStage
from scheduler.settings import Settings
from tests.e2e.conftest import (
    REPO,
    Services,
    clean_env,
    free_port,
    mriq_argv,
    wait_until,
    write_inbox,
)

pytestmark = [pytest.mark.e2e, pytest.mark.services]

CHROMIUM = Path(os.environ.get("MRIQ_TEST_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = REPO / "test-output" / "screenshots"
TOKEN = "browser-t0ken"
N_IMAGES = 40
N_BROKEN = 5  # write_inbox adds five unreadable files
CHUNK_SIZE = 8
IMAGE_SIZE = 32
#: Waits for the browser (page loads are local; the job needs the worker to start).
PAGE_TIMEOUT_MS = 15_000
JOB_TIMEOUT_MS = 120_000

playwright_api = pytest.importorskip(
    "playwright.sync_api",
    reason="playwright is not installed (pip install playwright; scripts/test.sh does)",
)
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium; scripts/test.sh "
                "does when it runs as root)", allow_module_level=True)


@dataclass
class Dashboard:
    url: str
    root: Path
    env: dict[str, str]
    services: Services
    sessions: sessionmaker[Session]
    settings: Settings
    candidate_id: int
    worker: str


def _register_models(sessions: sessionmaker[Session], settings: Settings) -> tuple[int, int]:
    """Two versions of an untrained resnet18 at 32 px: one in production, one candidate
    (with a plot among its training job's artifacts, as a real train job leaves)."""
    import torch
    from PIL import Image

    from core.checkpoint import CheckpointMeta, save_checkpoint
    from core.labels import classes_for
    from core.models import build_model
    from core.transforms import PresetParams

    torch.manual_seed(0)
    classes = tuple(classes_for("15"))
    model = build_model("resnet18", len(classes), weights="none")
    meta = CheckpointMeta(arch="resnet18", classes=classes, label_mode="15",
                          preset=PresetParams(image_size=IMAGE_SIZE, crop="none"))
    ids = []
    for n, metrics in enumerate(({"test_macro_f1": 0.41, "test_accuracy": 0.52},
                                 {"test_macro_f1": 0.47, "test_accuracy": 0.58})):
        with sessions() as s, s.begin():
            train = repository.create_job(s, kind=JobKind.TRAIN,
                                          params={"data": str(settings.data_roots[0])})
            out = settings.jobs_dir / str(train.id)
            out.mkdir(parents=True, exist_ok=True)
            path = out / "best.pt"
            sha = save_checkpoint(path, model=model, meta=meta)
            plot = out / "training_curves.png"
            Image.new("RGB", (320, 200), (235, 240, 250)).save(plot)
            version = repository.register_model_version(
                s, training_job_id=train.id, arch="resnet18", label_mode="15",
                classes=list(classes), checkpoint_path=str(path), checkpoint_sha256=sha,
                metrics=metrics,
            )
            repository.record_artifact(s, job_id=train.id, kind="training_curves",
                                       path=str(plot), model_version_id=version.id)
            repository.finish_job(s, train.id, JobStatus.SUCCEEDED)
            if n == 0:
                repository.promote_model_version(s, version.id)
            ids.append(int(version.id))
    return ids[0], ids[1]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory, e2e_postgres_url: str,
              e2e_redis_url: str, services: Services) -> Iterator[Dashboard]:
    root = tmp_path_factory.mktemp("dashboard")
    data_dir = root / "data"
    upgrade(e2e_postgres_url)
    settings = Settings(data_dir=data_dir, database_url=e2e_postgres_url,
                        broker_url=e2e_redis_url, data_roots=(root,), chunk_size=CHUNK_SIZE)
    env = clean_env({
        "MRIQ_DATABASE_URL": e2e_postgres_url, "MRIQ_BROKER_URL": e2e_redis_url,
        "MRIQ_DATA_DIR": str(data_dir), "MRIQ_DATA_ROOTS": str(root),
        "MRIQ_CHUNK_SIZE": str(CHUNK_SIZE), "MRIQ_DEFAULT_DEVICE": "cpu",
        "MRIQ_API_TOKEN": TOKEN,
    })
    # Both processes boot while this one builds the models. The worker consumes the cpu
    # queue only: the classify test lets it take the gpu queue (the chunks') once the job
    # page is open, so the page sees the job at 0 % and has to follow it to 100 %.
    port = free_port()
    api = services.start("api", mriq_argv("api", "--port", str(port)), env, root)
    hostname = f"web-{uuid.uuid4().hex[:8]}@localhost"
    worker = services.start("worker", mriq_argv("worker", "--hostname", hostname,
                                                "--queues", CPU_QUEUE), env, root)
    url = f"http://127.0.0.1:{port}"
    engine = make_engine(e2e_postgres_url)
    sessions = make_session_factory(engine)
    _, candidate = _register_models(sessions, settings)
    write_inbox(root / "inbox", N_IMAGES)

    def answers() -> bool:
        assert api.alive(), api.log()
        try:
            return httpx.get(url + "/health", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    wait_until(answers, timeout=90, what="mriq api to answer /health")
    dispatcher = Dispatcher(settings)
    try:
        def pinged() -> bool:
            assert worker.alive(), worker.log()
            return hostname in dispatcher.ping(timeout=1.0)

        wait_until(pinged, timeout=90, what=f"worker {hostname} to answer ping")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        yield Dashboard(url, root, env, services, sessions, settings, candidate, hostname)
    finally:
        dispatcher.close()
        engine.dispose()


@pytest.fixture(scope="module")
def page(dashboard: Dashboard) -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            browser.close()


def _shot(page: Any, name: str, *, full_page: bool = True) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


def test_refused_without_the_token_then_logged_in(dashboard: Dashboard, page: Any) -> None:
    page.goto(dashboard.url + "/ui/models")
    assert page.url.endswith("/ui/login")
    assert httpx.get(dashboard.url + "/jobs").status_code == 401  # the API too
    page.fill("input[name=token]", "not-the-token")
    page.click("button[type=submit]")
    assert "wrong token" in page.inner_text("[role=alert]")
    _shot(page, "login")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/")
    assert page.is_visible("text=Log out")
    cookie = next(c for c in page.context.cookies() if c["name"] == "mriq_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"


def test_classify_through_the_form_and_follow_it_live(dashboard: Dashboard,
                                                      page: Any) -> None:
    page.goto(dashboard.url + "/ui/submit")
    page.fill("textarea[name=inputs]", str(dashboard.root / "outside" / ".." / ".." / "x"))
    page.click("#classify button[type=submit]")
    assert "outside the allowed data roots" in page.inner_text("#submit-error")
    page.fill("textarea[name=inputs]", str(dashboard.root / "inbox"))
    page.click("#classify button[type=submit]")
    page.wait_for_url("**/ui/jobs/*")
    bar = page.locator("#job-progress [role=progressbar]")
    assert int(bar.get_attribute("aria-valuenow")) < 100  # no worker yet
    page.evaluate("window.__notReloaded = true")
    dispatcher = Dispatcher(dashboard.settings)
    try:
        replies = dispatcher.app.control.add_consumer(
            GPU_QUEUE, destination=[dashboard.worker], reply=True, timeout=10)
    finally:
        dispatcher.close()
    assert replies, "the worker did not take the gpu queue"
    page.wait_for_function(
        "document.querySelector('#job-progress [role=progressbar]')"
        ".getAttribute('aria-valuenow') === '100'", timeout=JOB_TIMEOUT_MS)
    page.wait_for_selector("#job-status.status-succeeded", timeout=JOB_TIMEOUT_MS)
    assert page.evaluate("window.__notReloaded") is True
    assert page.is_visible("text=show the results")
    page.reload()
    assert page.locator("tr.prediction").count() == N_IMAGES + N_BROKEN
    assert f"Errors ({N_BROKEN})" in page.inner_text("body")
    page.wait_for_load_state("networkidle")  # the thumbnails
    _shot(page, "job")
    page.evaluate("document.getElementById('predictions').scrollIntoView()")
    _shot(page, "dashboard", full_page=False)  # README's docs/dashboard.png


def test_filter_predictions_and_open_an_image(dashboard: Dashboard, page: Any) -> None:
    label = page.locator("tr.prediction:not(.is-error)").first.get_attribute("data-label")
    assert label
    page.select_option("select[name=label]", label)
    page.click("#prediction-filter button[type=submit]")
    page.wait_for_load_state()
    labels = {page.locator("tr.prediction").nth(i).get_attribute("data-label")
              for i in range(page.locator("tr.prediction").count())}
    assert labels == {label}
    page.check("input[name=errors]")
    page.select_option("select[name=label]", "")
    page.click("#prediction-filter button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("tr.prediction.is-error").count() == N_BROKEN
    assert page.locator("tr.prediction:not(.is-error)").count() == 0
    page.uncheck("input[name=errors]")
    page.click("#prediction-filter button[type=submit]")
    page.wait_for_load_state()
    page.locator("tr.prediction:not(.is-error) img.thumb").first.click()
    page.wait_for_url("**/items/*")
    page.wait_for_load_state("networkidle")
    widths = page.eval_on_selector_all(".images img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 2 and all(w > 0 for w in widths), widths
    assert page.locator(".topbar").count() == 3
    _shot(page, "image")


def test_correct_a_review_item_with_a_shortcut(dashboard: Dashboard, page: Any) -> None:
    with dashboard.sessions() as s, s.begin():
        job = repository.list_jobs(s, kind=JobKind.CLASSIFY, limit=1)[0]
        job.review_below = 1.0  # every error-free prediction of the job is queued
        job_id = int(job.id)
    page.goto(f"{dashboard.url}/ui/review?job={job_id}")
    current = page.locator("#review-current")
    first = current.get_attribute("data-item-id")
    assert page.inner_text("[data-field=pending]") == str(N_IMAGES)
    assert page.inner_text("[data-field=decided]") == "0"
    item_url = current.locator("h2 a[href*='/items/']").get_attribute("href")
    label = page.locator("button[data-key='2']").get_attribute("value")  # the 2nd of top-k
    page.wait_for_load_state("networkidle")
    _shot(page, "review")
    with page.expect_navigation():
        page.keyboard.press("2")
    assert page.locator("#review-current").get_attribute("data-item-id") != first
    assert page.inner_text("[data-field=pending]") == str(N_IMAGES - 1)
    assert page.inner_text("[data-field=decided]") == "1"
    page.goto(dashboard.url + item_url)
    decision = page.locator("#history tr.decision").first
    assert decision.locator("td").nth(1).inner_text() == "corrected"
    assert decision.locator("td").nth(2).inner_text() == label
    assert decision.locator("td").nth(3).inner_text() == "api-token"
    assert page.inner_text("[data-field=review-status]") == "corrected"
    page.wait_for_load_state("networkidle")
    _shot(page, "image-review")


def test_promote_a_model_behind_its_confirmation(dashboard: Dashboard, page: Any) -> None:
    page.goto(dashboard.url + "/ui/models")
    _shot(page, "models")
    page.click(f"a[href='/ui/models/{dashboard.candidate_id}/promote']")
    assert "will be archived" in page.inner_text("main")
    page.click("button.primary")
    page.wait_for_url("**/ui/models")
    stage = page.inner_text(f"#model-{dashboard.candidate_id} [data-field=stage]")
    assert stage == "production"
    with dashboard.sessions() as s:
        version = repository.get_model_version(s, dashboard.candidate_id)
        assert version.stage is ModelStage.PRODUCTION


def test_jobs_and_workers_pages_then_log_out(dashboard: Dashboard, page: Any) -> None:
    page.goto(dashboard.url + "/ui/")
    assert page.locator("tr[data-job-id]").count() == 3  # two train jobs and the classify
    _shot(page, "jobs")
    page.goto(dashboard.url + "/ui/workers")
    assert page.locator("table.workers td").first.inner_text().startswith("web-")
    _shot(page, "workers")
    page.goto(dashboard.url + "/ui/submit")
    _shot(page, "submit")
    page.click("text=Log out")
    page.wait_for_url("**/ui/login")
    page.goto(dashboard.url + "/ui/")
    assert page.url.endswith("/ui/login")

