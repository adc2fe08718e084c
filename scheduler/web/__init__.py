"""The web dashboard, served by the API's app under ``/ui/`` (``/`` redirects there).

Server-rendered HTML (Jinja2 templates in ``templates/``, plain CSS and a little JavaScript
of our own in ``static/``: no build step, no CDN) over the same repository and submission
functions as the JSON API. :func:`create_router` assembles the page routers; the API's
:class:`scheduler.api_guards.TokenAuthMiddleware` lets ``/ui/`` requests in on the
dashboard's session cookie (:mod:`scheduler.web.session`) when a token is configured.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, RedirectResponse
from sqlalchemy.orm import Session

from scheduler.dispatch import Dispatcher
from scheduler.settings import Settings
from scheduler.web import auth, jobs, models, review, submit, workers
from scheduler.web.context import STATIC_DIR, WebContext

__all__ = ["STATIC_FILES", "create_router"]

#: The dashboard's assets by URL name.
STATIC_FILES = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in (".css", ".js", ".svg")}


def create_router(settings: Settings, sessions: Callable[[], Session],
                  dispatcher: Callable[[], Dispatcher]) -> APIRouter:
    """Every dashboard route, for ``app.include_router`` in :func:`scheduler.api.create_app`."""
    ctx = WebContext.build(settings, sessions, dispatcher)
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @router.get("/ui")
    def ui() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @router.get("/ui/static/{name}")
    def static(name: str) -> Response:
        # A fixed set of files, looked up by name: nothing else under the package is served.
        path = STATIC_FILES.get(name)
        if path is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=300"})

    for page_group in (auth, jobs, models, review, submit, workers):
        router.include_router(page_group.router(ctx))
    return router
