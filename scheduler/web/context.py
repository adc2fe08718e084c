"""What every dashboard router shares: settings, sessions, templates, the browser session.

:class:`WebContext` is built once by :func:`scheduler.web.create_router`. Pages render
through :meth:`WebContext.render`, which also hands a new browser its session cookie (the
CSRF token needs one). :class:`PageRoute` turns the refusals the JSON API maps to status
codes (unknown id, path outside the roots, bad submission) into HTML pages with the same
status and message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from scheduler import repository, submission
from scheduler.dispatch import Dispatcher
from scheduler.paths import InvalidPathError, PathOutsideRootsError
from scheduler.settings import Settings
from scheduler.web.session import (
    COOKIE_NAME,
    CSRF_FIELD,
    SESSION_MAX_AGE_S,
    BrowserSession,
    SessionKeys,
)
from scheduler.web.thumbnails import FileRefusedError

__all__ = ["BadFormError", "CsrfError", "WebContext", "page_route_class", "refusal_of"]

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).with_name("templates")
STATIC_DIR = Path(__file__).with_name("static")


class BadFormError(ValueError):
    """A form or query value the page cannot use (422, the message says which and why)."""


class CsrfError(PermissionError):
    """A POST without the session's CSRF token (403)."""


def _duration(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return ""
    seconds = int(((end or datetime.now(UTC)) - start).total_seconds())
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    templates.env.filters["duration"] = lambda job: _duration(job.started_at, job.finished_at)
    templates.env.filters["when"] = _when
    return templates


@dataclass(frozen=True)
class WebContext:
    settings: Settings
    sessions: Callable[[], Session]
    dispatcher: Callable[[], Dispatcher]
    keys: SessionKeys
    templates: Jinja2Templates

    @classmethod
    def build(cls, settings: Settings, sessions: Callable[[], Session],
              dispatcher: Callable[[], Dispatcher]) -> WebContext:
        token = settings.api_token.get_secret_value() if settings.api_token is not None else None
        return cls(settings, sessions, dispatcher, SessionKeys.for_token(token), _templates())

    def browser_session(self, request: Request) -> BrowserSession | None:
        return self.keys.verify(request.cookies.get(COOKIE_NAME))

    def set_cookie(self, response: Response, value: str) -> None:
        response.set_cookie(COOKIE_NAME, value, max_age=SESSION_MAX_AGE_S, httponly=True,
                            samesite="strict", path="/")

    def render(self, request: Request, name: str, data: Mapping[str, Any] | None = None,
               *, status: int = 200) -> Response:
        session = self.browser_session(request)
        cookie = None
        if session is None:
            cookie, session = self.keys.issue(authenticated=False)
        context = {
            "csrf_field": CSRF_FIELD,
            "csrf": self.keys.csrf_token(session),
            "login_required": self.keys.token_required,
            "logged_in": session.authenticated,
            **(data or {}),
        }
        response = self.templates.TemplateResponse(request, name, context, status_code=status)
        if cookie is not None:
            self.set_cookie(response, cookie)
        return response

    def error(self, request: Request, status: int, message: str) -> Response:
        return self.render(request, "error.html", {"status": status, "message": message},
                           status=status)

    async def form(self, request: Request) -> dict[str, str]:
        """The POSTed form, once its CSRF token matched the session's (else CsrfError)."""
        form = await request.form()
        values = {k: v for k, v in form.items() if isinstance(v, str)}
        if not self.keys.csrf_ok(self.browser_session(request), values.get(CSRF_FIELD)):
            raise CsrfError("the form has expired or did not come from this dashboard; "
                            "reload the page and send it again")
        return values


def refusal_of(exc: Exception) -> tuple[int, str] | None:
    """The status and message of a refusal the pages show, or None for a real bug."""
    if isinstance(exc, repository.NotFoundError):
        return 404, str(exc)
    if isinstance(exc, PathOutsideRootsError):
        # Rebuilt without ``resolved``, as the API does: where a link leads is private.
        return 403, str(PathOutsideRootsError(exc.path, exc.roots))
    if isinstance(exc, RequestValidationError | ValidationError):
        # A path/query error's loc starts with where the value came from; a form model's
        # with the field itself.
        skip = 1 if isinstance(exc, RequestValidationError) else 0
        return 422, "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[skip:])}: {e.get('msg', '')}"
            for e in exc.errors()
        )
    if isinstance(exc, InvalidPathError | BadFormError):
        return 422, str(exc)
    if isinstance(exc, CsrfError):
        return 403, str(exc)
    if isinstance(exc, FileRefusedError):
        return exc.status, exc.reason
    if isinstance(exc, repository.NoRollbackTargetError):
        return 409, str(exc)
    if isinstance(exc, submission.SubmissionError):
        if isinstance(exc, submission.TooManyInputsError):
            return 413, str(exc)
        if isinstance(exc, submission.NoProductionModelError):
            return 409, str(exc)
        return 422, str(exc)
    if isinstance(exc, submission.DispatchError):
        log.warning("%s", exc)
        return 503, exc.public_message
    if isinstance(exc, SQLAlchemyError):
        return 503, f"database unavailable: {type(exc).__name__}"
    return None


def page_route_class(ctx: WebContext) -> type[APIRoute]:
    """An APIRoute whose refusals become HTML pages (the app's handlers answer JSON)."""

    class PageRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    mapped = refusal_of(exc)
                    if mapped is None:
                        raise
                    return ctx.error(request, *mapped)

            return guarded

    return PageRoute

