"""Delivery history: delivery_attempt (see index/schema.py, queue/jobs.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "delivery_attempt",
        sa.Column("id", _KEY, autoincrement=True, nullable=False),
        sa.Column("job_id", _KEY, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("node", sa.String(length=64), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["delivery_job.id"],
            name=op.f("fk_delivery_attempt_job_id_delivery_job"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempt")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_delivery_attempt_job_id", "delivery_attempt", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_delivery_attempt_job_id", table_name="delivery_attempt")
    op.drop_table("delivery_attempt")
