"""Dashboard page of workers: who answers, their queues and current tasks, a Flower link.

Asked through the dispatcher's Celery app (``inspect``), as ``mriq workers`` is: a worker
that does not answer within the timeout is not listed, an unreachable broker is said so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response

from scheduler.web.context import WebContext, page_route_class

__all__ = ["FLOWER_PORT", "WorkerView", "router"]

log = logging.getLogger(__name__)

#: ``mriq flower``'s default port; the link assumes Flower runs beside the API.
FLOWER_PORT = 5555
INSPECT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class WorkerView:
    name: str
    queues: tuple[str, ...]
    tasks: tuple[str, ...]  # "<task name> <args>" of what it runs now


def _task_text(task: dict[str, Any]) -> str:
    return f"{task.get('name', '?')} {task.get('args', '')}".strip()


def inspect_workers(ctx: WebContext) -> tuple[list[WorkerView], str | None]:
    """Answering workers with queues and active tasks, and an error text if the broker
    could not be asked."""
    try:
        inspect = ctx.dispatcher().app.control.inspect(timeout=INSPECT_TIMEOUT_S)
        pings = inspect.ping() or {}
        queues = inspect.active_queues() or {} if pings else {}
        active = inspect.active() or {} if pings else {}
    except Exception as exc:
        log.info("inspect failed: %s", exc)
        return [], f"the broker could not be asked: {type(exc).__name__}"
    views = [
        WorkerView(
            name=name,
            queues=tuple(str(q.get("name", "?")) for q in queues.get(name, [])),
            tasks=tuple(_task_text(t) for t in active.get(name, [])),
        )
        for name in sorted(pings)
    ]
    return views, None


def router(ctx: WebContext) -> APIRouter:
    api = APIRouter(route_class=page_route_class(ctx), include_in_schema=False)

    @api.get("/ui/workers")
    def workers_page(request: Request) -> Response:
        views, error = inspect_workers(ctx)
        host = request.url.hostname or "127.0.0.1"
        return ctx.render(request, "workers.html", {
            "workers": views, "error": error, "flower": f"http://{host}:{FLOWER_PORT}/",
        })

    return api
