"""Chunk liveness: which worker holds a chunk, and how often one was abandoned.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

``job_chunks.worker`` is the Celery node name of the worker that last claimed the chunk, so
a restarted worker (same node name) re-sends what its previous incarnation held at once,
and other workers tell a dead holder (no ``inspect ping`` answer) from a slow one
(worker/recovery.py). ``job_chunks.abandons`` counts the times the chunk missed its deadline
and was abandoned by its worker (worker/liveness.py): re-sent once, then failed.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_chunks") as batch:
        batch.add_column(sa.Column("worker", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("abandons", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("job_chunks") as batch:
        batch.drop_column("abandons")
        batch.drop_column("worker")
