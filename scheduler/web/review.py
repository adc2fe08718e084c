"""The dashboard's review queue: ``/ui/review`` and the decision forms every page posts.

The queue, its order and the decisions are :mod:`scheduler.review`'s (the API and the CLI
call the same functions); this module only renders them. ``GET /ui/review`` shows the most
uncertain pending item large (slice, overlay when one exists, top-3 bars, accept / correct
/ flag) and the next ones below it; ``after`` (a :attr:`ReviewItem.cursor`) skips past an
item without deciding it. ``POST /ui/review/{item}`` records a decision or a flag and
redirects to the page the form came from (the queue or the image page), so the pages work
without JavaScript; ``static/mriq.js`` only adds the keyboard shortcuts (a, 1-9, n) that
click the same buttons.

The reviewer is :data:`scheduler.endpoints.review.TOKEN_REVIEWER` when the API has a token
(the dashboard's login is that token, so it names no person, as in the JSON API); without
one it is the form's ``reviewer`` or the OS user running the server.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session

from scheduler import repository, review
from scheduler.api_models import MAX_ID
from scheduler.endpoints.review import ANONYMOUS_REVIEWER, TOKEN_REVIEWER
from scheduler.schema import ReviewStatus
from scheduler.web.context import BadFormError, WebContext, page_route_class

__all__ = ["ACTIONS", "QUEUE_SHOWN", "ReviewControls", "controls_of", "reviewer_of", "router"]

#: What a review form can do; "accept" and "correct" decide, "flag" queues the item.
ACTIONS = ("accept", "correct", "flag")
#: Items listed under the current one (the queue's next page of work).
QUEUE_SHOWN = 12
#: Top-k labels that get a button (and a digit shortcut, 1-9).
MAX_LABEL_BUTTONS = 9
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]


@dataclass(frozen=True)
class ReviewControls:
    """What the review form of one item needs: the item, the model's classes (the correct
    select), the page to come back to, and the reviewer placeholder (None: a token-guarded
    dashboard, where the reviewer is the token's identity and no field is shown)."""

    item: review.ReviewItem
    classes: tuple[str, ...]
    back: str
    reviewer_placeholder: str | None
    #: Keyboard shortcuts (the queue page only: browsing images never decides by a stray key).
    shortcuts: bool = False

    @property
    def picks(self) -> tuple[tuple[str, float], ...]:
        """The top-k labels that get a button (and a digit shortcut)."""
        return self.item.top_k[:MAX_LABEL_BUTTONS]


@dataclass(frozen=True)
class QueueCounts:
    """The queue's progress line: pending (capped) and decided items."""

    pending: int
    pending_capped: bool
    decided: int


def default_reviewer() -> str:
    """The OS user running the server: who decides on an open (token-less) dashboard."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (some containers)
        return ANONYMOUS_REVIEWER


def reviewer_of(ctx: WebContext, form: dict[str, str]) -> str:
    """The reviewer a decision records (the JSON API's identity rule)."""
    if ctx.settings.api_token is not None:
        return TOKEN_REVIEWER
    return form.get("reviewer", "").strip()[:200] or default_reviewer()


def controls_of(ctx: WebContext, session: Session, item: review.ReviewItem,
                back: str, *, shortcuts: bool = False) -> ReviewControls:
    """The form's data for one item; a job without a model version offers no correction."""
    try:
        classes = review.model_classes(session, item.job_id)
    except review.ReviewError:
        classes = ()
    placeholder = None if ctx.settings.api_token is not None else default_reviewer()
    return ReviewControls(item, classes, back, placeholder, shortcuts)


def _safe_back(value: str | None, default: str) -> str:
    # Only a dashboard path: a form must not turn into a redirect to another site.
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


def _counts(session: Session, job_id: int | None) -> QueueCounts:
    pending = review.queue(session, job_id=job_id, status=ReviewStatus.PENDING,
                           limit=review.MAX_LIMIT)
    decided = review.reviewed_items(session, job_id=job_id)
    return QueueCounts(len(pending), len(pending) == review.MAX_LIMIT, len(decided))


def _queue_url(job_id: int | None, after: str | None) -> str:
    params = [f"job={job_id}"] if job_id is not None else []
    if after:
        params.append(f"after={after}")
    return "/ui/review" + ("?" + "&".join(params) if params else "")


def router(ctx: WebContext) -> APIRouter:
    api = APIRouter(route_class=page_route_class(ctx), include_in_schema=False)

    @api.get("/ui/review")
    def review_page(request: Request,
                    job: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
                    after: Annotated[str | None, Query(max_length=64)] = None) -> Response:
        with ctx.sessions() as session:
            if job is not None:
                repository.get_job(session, job)  # an unknown job is a 404, not "all done"
            try:
                items = review.queue(session, job_id=job, limit=QUEUE_SHOWN + 1,
                                     after=after or None)
            except review.ReviewError as exc:
                raise BadFormError(f"after: {exc}") from None
            current = items[0] if items else None
            here = _queue_url(job, after)
            data: dict[str, Any] = {
                "current": current,
                "upcoming": items[1:],
                "counts": _counts(session, job),
                "job_filter": job,
                "skipped": bool(after),
                "first_url": _queue_url(job, None),
                "skip_url": _queue_url(job, current.cursor) if current else None,
                "controls": (controls_of(ctx, session, current, here, shortcuts=True)
                             if current else None),
            }
            return ctx.render(request, "review.html", data)

    @api.post("/ui/review/{item_id}")
    async def decide(request: Request, item_id: IdPath) -> Response:
        form = await ctx.form(request)
        action, label = form.get("action", ""), form.get("label") or None
        if form.get("pick"):  # a top-k button: that label (the predicted one = accept)
            action, label = "pick", form["pick"]
        elif action not in ACTIONS:
            raise BadFormError(f"action: must be one of {', '.join(ACTIONS)}, not {action!r}")
        reviewer = reviewer_of(ctx, form)
        with ctx.sessions() as session:
            try:
                with session.begin():
                    if action == "pick":
                        predicted = review.get_item(session, item_id).label
                        action = "accept" if label == predicted else "correct"
                        label = None if action == "accept" else label
                    if action == "flag":
                        review.flag(session, item_id, reviewer=reviewer)
                    else:
                        status = (ReviewStatus.ACCEPTED if action == "accept"
                                  else ReviewStatus.CORRECTED)
                        review.decide(session, item_id, status=status, label=label,
                                      reviewer=reviewer)
            except review.NotReviewableError as exc:
                return ctx.error(request, 409, str(exc))
            except review.ReviewError as exc:
                return ctx.error(request, 422, str(exc))
        return RedirectResponse(_safe_back(form.get("back"), "/ui/review"), status_code=303)

    return api
