"""``/review``: the review queue over HTTP (the rules live in :mod:`scheduler.review`).

``GET /review`` pages the queue (most uncertain first, keyset ``cursor``), ``GET
/review/{item}`` shows one item with its decision history, ``POST /review/{item}`` accepts,
corrects or flags it. The reviewer is the token's identity (:data:`TOKEN_REVIEWER`) when the
API has a token, so a client cannot record decisions in someone else's name; without a
token it is the body's ``reviewer`` or ``anonymous``.

The router takes the session factory and the settings from :mod:`scheduler.endpoints.deps`.
Unknown items are 404 (the app's NotFoundError handler), a label outside the model's
classes 422 naming the valid ones, a decision on an error row 409.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from sqlalchemy.orm import Session

from scheduler import review
from scheduler.api_models import (
    ERROR_RESPONSES,
    MAX_ID,
    ErrorOut,
    ReviewActionRequest,
    ReviewDecisionOut,
    ReviewItemDetail,
    ReviewItemOut,
    ReviewItemPath,
    ReviewPage,
    ReviewStatusQuery,
)
from scheduler.endpoints.deps import SessionsDep, SettingsDep, require_token
from scheduler.schema import ReviewStatus

__all__ = ["ANONYMOUS_REVIEWER", "TOKEN_REVIEWER", "review_router"]

#: The reviewer recorded for decisions made with the API token (it names no person).
TOKEN_REVIEWER = "api-token"
ANONYMOUS_REVIEWER = "anonymous"


def _token_identity(
    settings: SettingsDep, _checked: Annotated[None, Depends(require_token)]
) -> str | None:
    """The caller's identity: the token's when the API has one (``require_token`` has
    checked it, behind the middleware that refuses a wrong one before the body is read)."""
    return None if settings.api_token is None else TOKEN_REVIEWER


IdentityDep = Annotated[str | None, Depends(_token_identity)]

review_router = APIRouter(prefix="/review", tags=["review"],
                          responses={401: ERROR_RESPONSES[401]})


def _out(items: list[review.ReviewItem], session: Session) -> list[ReviewItemOut]:
    artifacts = review.explanation_artifacts(session, items)
    return [
        ReviewItemOut(
            item_id=i.item_id, job_id=i.job_id, item_index=i.item_index, path=i.path,
            label=i.label, confidence=i.confidence, top_k=list(i.top_k), entropy=i.entropy,
            status=i.status, flagged=i.flagged,
            explanation_url=(f"/artifacts/{artifacts[i.item_id]}"
                             if i.item_id in artifacts else None),
            reviewed_label=i.reviewed_label, reviewer=i.reviewer, decided_at=i.decided_at,
            review_id=i.review_id,
        )
        for i in items
    ]


def _detail(session: Session, item_id: int) -> ReviewItemDetail:
    item = review.get_item(session, item_id)
    return ReviewItemDetail(
        item=_out([item], session)[0],
        history=[ReviewDecisionOut.model_validate(d) for d in review.history(session, item_id)],
    )


@review_router.get("", response_model=ReviewPage)
def list_review(
    sessions: SessionsDep,
    _identity: IdentityDep,
    job: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Only this job.")] = None,
    status: ReviewStatusQuery = "pending",
    limit: Annotated[int, Query(ge=1, le=review.MAX_LIMIT)] = review.DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> ReviewPage:
    """Review items, most uncertain (highest entropy) first; ``status=all`` lists pending
    and decided ones."""
    wanted = None if status == "all" else ReviewStatus(status)
    with sessions() as session:
        try:
            items = review.queue(session, job_id=job, status=wanted, limit=limit, after=cursor)
        except review.ReviewError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return ReviewPage(items=_out(items, session), limit=limit,
                          next_cursor=items[-1].cursor if len(items) == limit else None)


@review_router.get("/{item_id}", response_model=ReviewItemDetail, responses=ERROR_RESPONSES)
def get_review_item(
    item_id: ReviewItemPath, sessions: SessionsDep, _identity: IdentityDep
) -> ReviewItemDetail:
    """One item with every decision made on it."""
    with sessions() as session:
        return _detail(session, item_id)


@review_router.post(
    "/{item_id}", response_model=ReviewItemDetail,
    responses={**ERROR_RESPONSES, 409: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)
def decide_review_item(
    item_id: ReviewItemPath,
    body: ReviewActionRequest,
    sessions: SessionsDep,
    identity: IdentityDep,
) -> ReviewItemDetail:
    """Accept the predicted label, correct it (``label``: one of the model's classes) or
    flag the item into the queue. A new decision supersedes the current one; the history
    keeps both."""
    reviewer = identity or body.reviewer or ANONYMOUS_REVIEWER
    with sessions() as session:
        try:
            with session.begin():
                if body.action == "flag":
                    review.flag(session, item_id, reviewer=reviewer)
                else:
                    status = (ReviewStatus.ACCEPTED if body.action == "accept"
                              else ReviewStatus.CORRECTED)
                    review.decide(session, item_id, status=status, label=body.label,
                                  reviewer=reviewer)
        except review.NotReviewableError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        except review.ReviewError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return _detail(session, item_id)
