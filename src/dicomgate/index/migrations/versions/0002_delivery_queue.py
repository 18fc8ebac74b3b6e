"""Delivery queue: delivery_job and stable_timer (see index/schema.py, queue/jobs.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "delivery_job",
        sa.Column("id", _KEY, autoincrement=True, nullable=False),
        sa.Column("instance_pk", _KEY, nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("route", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("leased_by", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_pk"],
            ["instance.id"],
            name=op.f("fk_delivery_job_instance_pk_instance"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_job")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_delivery_job_lease",
        "delivery_job",
        ["destination", "state", sa.text("priority DESC"), "not_before"],
        unique=False,
    )
    op.create_index(
        "ix_delivery_job_state_not_before",
        "delivery_job",
        ["state", "not_before"],
        unique=False,
    )
    op.create_index("ix_delivery_job_instance_pk", "delivery_job", ["instance_pk"], unique=False)
    op.create_table(
        "stable_timer",
        sa.Column("route", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("uid", sa.String(length=128), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("destinations", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("route", "level", "uid", name=op.f("pk_stable_timer")),
    )
    op.create_index("ix_stable_timer_deadline", "stable_timer", ["deadline"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_stable_timer_deadline", table_name="stable_timer")
    op.drop_table("stable_timer")
    op.drop_index("ix_delivery_job_instance_pk", table_name="delivery_job")
    op.drop_index("ix_delivery_job_state_not_before", table_name="delivery_job")
    op.drop_index("ix_delivery_job_lease", table_name="delivery_job")
    op.drop_table("delivery_job")
