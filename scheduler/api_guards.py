"""ASGI guards that run before FastAPI touches a request: the token, then the body size.

Order matters. FastAPI reads and JSON-parses a request body *before* it runs a route's
dependencies, so a token check written as a dependency comes too late: an anonymous client
could send a body just under the size limit (~100 MB) made of tiny JSON values and have the
process build gigabytes of Python objects before hearing 401. :class:`TokenAuthMiddleware`
therefore answers from the headers alone and never reads a byte of the body; only requests
with the right token reach :class:`BodyLimitMiddleware` and then the app.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from fastapi import HTTPException
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.web.session import UI_PREFIX, SessionKeys, is_public_ui_path, is_ui_path

__all__ = ["BodyLimitMiddleware", "TokenAuthMiddleware", "bearer_token_matches"]

UNAUTHORIZED_DETAIL = "missing or invalid bearer token"
WWW_AUTHENTICATE = 'Bearer realm="mriq"'


def bearer_token_matches(authorization: bytes | None, token: bytes) -> bool:
    """True when an ``Authorization`` header value is ``Bearer <token>``.

    Parsed like FastAPI's ``HTTPBearer`` (scheme before the first space, case-insensitive;
    credentials stripped) and compared as bytes in constant time, so a non-ASCII guess is
    simply wrong instead of an error.
    """
    if not authorization:
        return False
    scheme, _, credentials = authorization.partition(b" ")
    given = credentials.strip()
    if scheme.lower() != b"bearer" or not given:
        return False
    return hmac.compare_digest(given, token)


class TokenAuthMiddleware:
    """401 for every HTTP request but ``public`` paths unless it carries the bearer token.

    Decided on the headers only: the body is never received, so an unauthenticated request
    costs the server no more than its headers (the server's own read buffer aside).

    The dashboard's paths (``/ui/...`` and ``/``) take the dashboard's session cookie
    instead (:mod:`scheduler.web.session`); without one a page request is redirected to the
    login form. Only those paths accept the cookie: the JSON API keeps needing the header,
    so a browser session never lends its authority to a cross-site request to the API.
    """

    def __init__(self, app: ASGIApp, *, token: str, public: Iterable[str]) -> None:
        self.app = app
        self.token = token.encode()
        self.public = frozenset(public)
        self.sessions = SessionKeys.for_token(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.public:
            await self.app(scope, receive, send)
            return
        if is_ui_path(path):
            await self._dashboard(scope, receive, send)
            return
        authorization = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                authorization = value
                break
        if bearer_token_matches(authorization, self.token):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"detail": UNAUTHORIZED_DETAIL},
            status_code=401,
            # The body was not read: the connection cannot carry another request.
            headers={"WWW-Authenticate": WWW_AUTHENTICATE, "Connection": "close"},
        )
        await response(scope, receive, send)


    async def _dashboard(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        cookie = next((v for n, v in scope.get("headers", []) if n == b"cookie"), None)
        if is_public_ui_path(path) or self.sessions.authenticated(
            self.sessions.from_cookie_header(cookie)
        ):
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD"):
            response: JSONResponse | RedirectResponse = RedirectResponse(
                f"{UI_PREFIX}/login", status_code=303
            )
        else:
            response = JSONResponse(
                {"detail": "log in to the dashboard first"}, status_code=401,
                headers={"Connection": "close"},
            )
        await response(scope, receive, send)


class _BodyTooLarge(HTTPException):
    # An HTTPException, because FastAPI turns any other error raised while it reads the
    # body into "400 error parsing the body"; this way a streamed (chunked) body over the
    # limit gets its 413 from the app's own handler.
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body larger than {limit} bytes")


class BodyLimitMiddleware:
    """Refuse request bodies above ``limit`` bytes with 413 before they are parsed.

    Checks Content-Length up front and also counts streamed (chunked) bodies, so a client
    cannot make the server buffer an unbounded JSON document.
    """

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False  # the server rejects malformed lengths itself
                if too_big:
                    await self._reject(scope, receive, send)
                    return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body larger than {self.limit} bytes"}, status_code=413
        )
        await response(scope, receive, send)
