"""Typed FastAPI dependencies on what :func:`scheduler.api.create_app` keeps in ``app.state``.

Routers declare what they need as parameters (``settings: SettingsDep``,
``sessions: SessionsDep``, ``dispatcher: DispatcherDep``) and never build engines, session
factories or Celery apps themselves: the app owns one of each for the life of the process.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from scheduler.api_guards import UNAUTHORIZED_DETAIL, WWW_AUTHENTICATE
from scheduler.settings import Settings

if TYPE_CHECKING:
    from scheduler.dispatch import Dispatcher

__all__ = [
    "ApiState",
    "AuthDependencies",
    "DispatcherDep",
    "SessionsDep",
    "SettingsDep",
    "StateDep",
    "api_state",
    "require_token",
]


@dataclass
class ApiState:
    """The objects one API process shares between requests (``app.state.mriq``)."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    _dispatcher: Dispatcher | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def dispatcher(self) -> Dispatcher:
        # Created on first use: building the Celery app costs time the docs page does not need.
        with self._lock:
            if self._dispatcher is None:
                from scheduler.dispatch import Dispatcher

                self._dispatcher = Dispatcher(self.settings)
            return self._dispatcher

    def close(self) -> None:
        """Release the broker connections (if any were made) and the database pool."""
        if self._dispatcher is not None:
            with contextlib.suppress(Exception):  # shutting down: nobody left to tell
                self._dispatcher.close()
        self.engine.dispose()


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.mriq
    return state


def get_settings(request: Request) -> Settings:
    return api_state(request).settings


def get_sessions(request: Request) -> sessionmaker[Session]:
    return api_state(request).sessions


def get_dispatcher(request: Request) -> Dispatcher:
    return api_state(request).dispatcher()


SettingsDep = Annotated[Settings, Depends(get_settings)]
StateDep = Annotated[ApiState, Depends(api_state)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
DispatcherDep = Annotated["Dispatcher", Depends(get_dispatcher)]

_bearer = HTTPBearer(auto_error=False, description="Required when MRIQ_API_TOKEN is set.")


def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless the bearer token matches ``settings.api_token`` (when one is set).

    TokenAuthMiddleware refuses a wrong token before the body is read; this dependency
    declares the scheme in the OpenAPI document and checks again behind it.
    """
    if settings.api_token is None:
        return
    token = settings.api_token.get_secret_value()
    given = credentials.credentials if credentials is not None else ""
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(
            status_code=401,
            detail=UNAUTHORIZED_DETAIL,
            headers={"WWW-Authenticate": WWW_AUTHENTICATE},
        )


#: ``dependencies=`` of every router but /health: the bearer token when one is configured.
AuthDependencies = [Depends(require_token)]
