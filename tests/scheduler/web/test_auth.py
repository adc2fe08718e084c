"""Dashboard login with MRIQ_API_TOKEN: the session cookie, its flags, logout, refusals,
and that the cookie opens the dashboard only, never the JSON API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from scheduler.api import create_app
from scheduler.database import upgrade
from scheduler.settings import Settings
from scheduler.web.session import COOKIE_NAME, SESSION_MAX_AGE_S, SessionKeys
from tests.scheduler.web.conftest import csrf_of, web_settings

TOKEN = "dashboard-t0ken"


@pytest.fixture
def token_client(tmp_path: Path, root: Path, sqlite_url: str) -> Iterator[TestClient]:
    upgrade(sqlite_url)
    settings: Settings = web_settings(tmp_path, root, sqlite_url, api_token=TOKEN)
    with TestClient(create_app(settings)) as c:
        yield c


def _login(client: TestClient, token: str = TOKEN) -> int:
    form = client.get("/ui/login")
    response = client.post("/ui/login", data={"csrf": csrf_of(form.text), "token": token},
                           follow_redirects=False)
    return response.status_code


def test_without_a_session_pages_redirect_to_login(token_client: TestClient) -> None:
    for url in ("/ui/", "/ui/jobs/1", "/ui/models", "/ui/submit", "/ui/workers",
                "/ui/jobs/1/items/0/image", "/ui/artifacts/1"):
        response = token_client.get(url, follow_redirects=False)
        assert response.status_code == 303, url
        assert response.headers["location"] == "/ui/login"
    refused = token_client.post("/ui/jobs/1/cancel", data={"csrf": "x"})
    assert refused.status_code == 401
    assert token_client.get("/ui/static/mriq.css").status_code == 200  # the login page's CSS
    assert token_client.get("/ui/login").status_code == 200


def test_login_sets_a_strict_httponly_cookie_and_logout_ends_it(
    token_client: TestClient,
) -> None:
    assert _login(token_client, "wrong") == 401
    assert token_client.get("/ui/", follow_redirects=False).status_code == 303
    form = token_client.get("/ui/login")
    response = token_client.post("/ui/login", data={"csrf": csrf_of(form.text),
                                                    "token": TOKEN}, follow_redirects=False)
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = token_client.get("/ui/")
    assert page.status_code == 200 and "Log out" in page.text
    # The cookie does not open the JSON API: that keeps needing the bearer header.
    assert token_client.get("/jobs").status_code == 401
    logout = token_client.post("/ui/logout", data={"csrf": csrf_of(page.text)},
                               follow_redirects=False)
    assert logout.status_code == 303 and logout.headers["location"] == "/ui/login"
    assert token_client.get("/ui/", follow_redirects=False).status_code == 303


def test_login_needs_the_csrf_token(token_client: TestClient) -> None:
    token_client.get("/ui/login")
    response = token_client.post("/ui/login", data={"token": TOKEN}, follow_redirects=False)
    assert response.status_code == 403
    assert token_client.get("/ui/", follow_redirects=False).status_code == 303


def test_a_forged_or_expired_cookie_is_no_session(token_client: TestClient) -> None:
    keys = SessionKeys.for_token(TOKEN)
    good, _ = keys.issue(authenticated=True)
    assert keys.authenticated(keys.verify(good))
    anonymous, _ = keys.issue(authenticated=False)
    body, _, signature = anonymous.rpartition(".")
    promoted = f"{body[:-1]}1.{signature}"  # the flag flipped, the signature kept
    assert keys.verify(promoted) is None
    assert keys.verify(f"{body}.{'f' * 64}") is None
    assert keys.verify("garbage") is None and keys.verify("a.b.c.d") is None
    old, _ = keys.issue(authenticated=True, now=0)
    assert keys.verify(old, now=SESSION_MAX_AGE_S + 3600) is None
    assert SessionKeys.for_token("other").verify(good) is None  # a new token logs out
    token_client.cookies.set(COOKIE_NAME, promoted)
    assert token_client.get("/ui/", follow_redirects=False).status_code == 303
    token_client.cookies.set(COOKIE_NAME, anonymous)
    assert token_client.get("/ui/", follow_redirects=False).status_code == 303
    token_client.cookies.set(COOKIE_NAME, good)
    assert token_client.get("/ui/").status_code == 200


def test_open_dashboard_without_a_token(client: TestClient) -> None:
    page = client.get("/ui/")
    assert page.status_code == 200 and "Log out" not in page.text
    assert client.get("/ui/login", follow_redirects=False).headers["location"] == "/ui/"
    assert COOKIE_NAME in page.headers.get("set-cookie", "")  # carries the CSRF session
