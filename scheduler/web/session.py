"""The dashboard's browser session: a signed cookie, the CSRF token derived from it.

The cookie holds ``<session id>.<issued unix time>.<authenticated 0/1>.<signature>``,
signed with HMAC-SHA256. With ``MRIQ_API_TOKEN`` set the key is derived from the token, so
only someone who typed the token into the login form holds an authenticated cookie, and
changing the token logs every browser out. Without a token the dashboard is open and the key
is random per process (sessions only carry the CSRF token then).

CSRF: every state-changing form carries ``csrf`` = HMAC(key, "csrf:" + session id); a POST
without the cookie's matching value is refused. Cookies are HttpOnly and SameSite=Strict, so
another site can neither read them nor make the browser send them along with its own form.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie

__all__ = [
    "COOKIE_NAME",
    "CSRF_FIELD",
    "SESSION_MAX_AGE_S",
    "UI_PREFIX",
    "BrowserSession",
    "SessionKeys",
    "is_public_ui_path",
    "is_ui_path",
]

COOKIE_NAME = "mriq_session"
CSRF_FIELD = "csrf"
UI_PREFIX = "/ui"
#: A browser session lasts a working day; after that the token is asked for again.
SESSION_MAX_AGE_S = 12 * 3600
#: Paths of the dashboard that need no login: the form itself and the assets it uses.
_PUBLIC_UI_PATHS = frozenset({"/", f"{UI_PREFIX}/login"})
_PUBLIC_UI_PREFIXES = (f"{UI_PREFIX}/static/",)


def is_public_ui_path(path: str) -> bool:
    """True for the dashboard paths served without a login (login form, CSS/JS, ``/``)."""
    return path in _PUBLIC_UI_PATHS or path.startswith(_PUBLIC_UI_PREFIXES)


def is_ui_path(path: str) -> bool:
    """True for every path of the dashboard (the only routes that accept the cookie)."""
    return path == "/" or path == UI_PREFIX or path.startswith(f"{UI_PREFIX}/")


@dataclass(frozen=True)
class BrowserSession:
    """A verified session cookie."""

    session_id: str
    issued: int
    authenticated: bool


@dataclass(frozen=True)
class SessionKeys:
    """Signs and verifies session cookies and CSRF tokens with one key."""

    key: bytes
    token_required: bool

    @classmethod
    def for_token(cls, token: str | None) -> SessionKeys:
        if token is None:
            return cls(key=secrets.token_bytes(32), token_required=False)
        # A derived key: the cookie's signature never is a MAC keyed with the raw token
        # that also opens the JSON API.
        key = hmac.new(token.encode(), b"mriq dashboard session", hashlib.sha256).digest()
        return cls(key=key, token_required=True)

    def _sign(self, message: str) -> str:
        return hmac.new(self.key, message.encode(), hashlib.sha256).hexdigest()

    def issue(self, *, authenticated: bool, now: float | None = None) -> tuple[str, BrowserSession]:
        """A new session (fresh id: a login never keeps the pre-login id) and its cookie."""
        session = BrowserSession(
            session_id=secrets.token_urlsafe(18),
            issued=int(time.time() if now is None else now),
            authenticated=authenticated,
        )
        body = f"{session.session_id}.{session.issued}.{int(authenticated)}"
        return f"{body}.{self._sign(body)}", session

    def verify(self, cookie: str | None, *, now: float | None = None) -> BrowserSession | None:
        """The session a cookie value stands for, or None (forged, malformed, expired)."""
        if not cookie or len(cookie) > 256:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            return None
        parts = body.split(".")
        if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in ("0", "1"):
            return None
        issued = int(parts[1])
        age = (time.time() if now is None else now) - issued
        if not 0 <= age <= SESSION_MAX_AGE_S + 60:
            return None
        return BrowserSession(parts[0], issued, parts[2] == "1")

    def csrf_token(self, session: BrowserSession) -> str:
        return self._sign(f"csrf:{session.session_id}")

    def csrf_ok(self, session: BrowserSession | None, given: str | None) -> bool:
        if session is None or not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf_token(session).encode())

    def authenticated(self, session: BrowserSession | None) -> bool:
        """Whether a session may see the dashboard (always, when no token is configured)."""
        if not self.token_required:
            return True
        return session is not None and session.authenticated

    def from_cookie_header(self, header: bytes | None) -> BrowserSession | None:
        """The verified session in a raw ``Cookie`` header (used by the ASGI token guard)."""
        if not header:
            return None
        try:
            jar: SimpleCookie = SimpleCookie(header.decode("latin-1"))
        except Exception:  # a malformed Cookie header is just no session
            return None
        morsel = jar.get(COOKIE_NAME)
        return self.verify(morsel.value if morsel is not None else None)
