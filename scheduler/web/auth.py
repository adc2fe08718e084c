"""Dashboard login and logout (with ``MRIQ_API_TOKEN`` set; open without one).

The login form takes the API token and, when it matches, replaces the browser's session
with a new authenticated one (a fresh id, so a session planted before the login is not
promoted). Logout replaces it with an anonymous one. Both forms carry the CSRF token.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from scheduler.web.context import WebContext, page_route_class

__all__ = ["router"]


def router(ctx: WebContext) -> APIRouter:
    api = APIRouter(route_class=page_route_class(ctx), include_in_schema=False)
    token = ctx.settings.api_token

    @api.get("/ui/login")
    def login_page(request: Request) -> Response:
        if token is None:
            return RedirectResponse("/ui/", status_code=303)
        return ctx.render(request, "login.html")

    @api.post("/ui/login")
    async def login(request: Request) -> Response:
        form = await ctx.form(request)
        if token is None:
            return RedirectResponse("/ui/", status_code=303)
        given = form.get("token", "").strip().encode()
        if not given or not hmac.compare_digest(given, token.get_secret_value().encode()):
            return ctx.render(request, "login.html", {"error": "wrong token"}, status=401)
        cookie, _session = ctx.keys.issue(authenticated=True)
        response = RedirectResponse("/ui/", status_code=303)
        ctx.set_cookie(response, cookie)
        return response

    @api.post("/ui/logout")
    async def logout(request: Request) -> Response:
        await ctx.form(request)
        cookie, _session = ctx.keys.issue(authenticated=False)
        target = "/ui/login" if token is not None else "/ui/"
        response = RedirectResponse(target, status_code=303)
        ctx.set_cookie(response, cookie)
        return response

    return api
