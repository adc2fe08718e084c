"""The review queue: decisions on predictions, the flag and entropy they are queued by.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

``review_decisions`` keeps every decision (accepted or corrected) a reviewer made on a
prediction; the current one per prediction is the row not ``superseded`` (a partial unique
index guarantees at most one). Predictions gain ``entropy`` (NULL for existing rows: the
queue estimates it from their top-k), ``explanation`` and the user's ``flagged`` mark; jobs
gain ``review_below`` (existing jobs get the default 0.6); model versions their review
lineage (NULL: trained without reviews). Batch mode because SQLite cannot drop columns in
place.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# The create_table/add_column calls below look alike to ``duplicates`` (each other, and 0001
# vs 0004): they are frozen history. A revision's body is never edited or factored onto a
# shared helper, since a helper changing later would silently change what an old revision does.

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_PREDICTION_COLUMNS = ("flagged_at", "flagged_by", "flagged", "explanation", "entropy")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("review_below", sa.Float(), server_default="0.6", nullable=False)
        )
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("entropy", sa.Float(), nullable=True))
        batch.add_column(sa.Column("explanation", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("flagged", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.add_column(sa.Column("flagged_by", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("flagged_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("review_ids", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("reviews_used", sa.Integer(), nullable=True))
    op.create_table(
        "review_decisions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("prediction_id", _BIG_ID, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("label", sa.String(length=100), nullable=False),
        sa.Column("reviewer", sa.String(length=200), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("superseded", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.ForeignKeyConstraint(
            ["prediction_id"], ["predictions.id"], ondelete="CASCADE",
            name="fk_review_decisions_prediction_id_predictions",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], ondelete="CASCADE", name="fk_review_decisions_job_id_jobs"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_review_decisions"),
    )
    op.create_index(
        "ix_review_decisions_prediction_id", "review_decisions", ["prediction_id"]
    )
    op.create_index(
        "ix_review_decisions_job_id_superseded", "review_decisions", ["job_id", "superseded"]
    )
    op.create_index(
        "uq_review_decisions_current",
        "review_decisions",
        ["prediction_id"],
        unique=True,
        sqlite_where=sa.text("superseded = 0"),
        postgresql_where=sa.text("superseded = false"),
    )


def downgrade() -> None:
    op.drop_index("uq_review_decisions_current", table_name="review_decisions")
    op.drop_index("ix_review_decisions_job_id_superseded", table_name="review_decisions")
    op.drop_index("ix_review_decisions_prediction_id", table_name="review_decisions")
    op.drop_table("review_decisions")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("reviews_used")
        batch.drop_column("review_ids")
    with op.batch_alter_table("predictions") as batch:
        for name in _PREDICTION_COLUMNS:
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("review_below")
