"""Model versions record their calibration: temperature, calibrated flag, ECE and NLL.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

Existing rows were trained before temperature scaling: they get temperature 1.0 and
calibrated false (their confidences are the raw softmax), and no ECE/NLL. Batch mode because
SQLite cannot drop columns in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FLOATS = ("ece", "ece_uncalibrated", "nll", "nll_uncalibrated")


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(
            sa.Column("temperature", sa.Float(), server_default="1.0", nullable=False)
        )
        batch.add_column(
            sa.Column("calibrated", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        for name in _FLOATS:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        for name in (*reversed(_FLOATS), "calibrated", "temperature"):
            batch.drop_column(name)
