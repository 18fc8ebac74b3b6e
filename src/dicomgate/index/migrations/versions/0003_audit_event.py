"""Audit trail: audit_event (see index/schema.py, observability/audit.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_event",
        sa.Column("id", _KEY, autoincrement=True, nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=64), server_default="", nullable=False),
        sa.Column("source_ip", sa.String(length=45), server_default="", nullable=False),
        sa.Column("node", sa.String(length=64), server_default="", nullable=False),
        sa.Column("object", sa.String(length=1024), server_default="", nullable=False),
        sa.Column("study_uid", sa.String(length=128), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("patient_name", sa.String(length=194), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_event")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_audit_event_time", "audit_event", ["time"], unique=False)
    op.create_index("ix_audit_event_event_time", "audit_event", ["event", "time"], unique=False)
    op.create_index("ix_audit_event_actor_time", "audit_event", ["actor", "time"], unique=False)
    op.create_index("ix_audit_event_study_uid", "audit_event", ["study_uid"], unique=False)
    op.create_index("ix_audit_event_patient_id", "audit_event", ["patient_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_audit_event_patient_id", table_name="audit_event")
    op.drop_index("ix_audit_event_study_uid", table_name="audit_event")
    op.drop_index("ix_audit_event_actor_time", table_name="audit_event")
    op.drop_index("ix_audit_event_event_time", table_name="audit_event")
    op.drop_index("ix_audit_event_time", table_name="audit_event")
    op.drop_table("audit_event")
