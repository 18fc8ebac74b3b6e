"""The study row's own copy of the Patient Module (see index/schema.py study), and
stable_member: the instances a stable timer sends (those its route matched).

Studies indexed before keep the values their patient row had then (the latest instance
of that Patient ID): the files are not read again. An instance received again, or a new
one of the study, sets the study's own values.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_COLUMNS = (
    ("patient_name", 194),
    ("patient_name_search", 194),
    ("patient_birth_date", 8),
    ("patient_sex", 16),
)


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        for name, length in _COLUMNS:
            batch.add_column(sa.Column(name, sa.String(length=length), nullable=True))
    copied = ", ".join(
        f"{name} = (SELECT patient.{name} FROM patient WHERE patient.id = study.patient_pk)"
        for name, _ in _COLUMNS
    )
    op.execute(f"UPDATE study SET {copied}")
    # Names are now indexed without trailing empty components and groups (PS3.5 6.2.1.1,
    # extract.trim_name), so that 'Doe^John^^^' is found by 'Doe^John'. rtrim cuts them at
    # the end of a name; a multi-group name keeps those inside until it is received again.
    for table, column in (
        ("patient", "patient_name"),
        ("study", "patient_name"),
        ("study", "referring_physician_name"),
    ):
        op.execute(
            f"UPDATE {table} SET {column} = rtrim({column}, '^=')"
            f" WHERE {column} LIKE '%^' OR {column} LIKE '%='"
        )
    op.create_index("ix_study_patient_name_search", "study", ["patient_name_search"])
    op.create_index("ix_study_patient_name", "study", ["patient_name"])
    op.create_table(
        "stable_member",
        sa.Column("route", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("uid", sa.String(length=128), nullable=False),
        sa.Column("instance_pk", _KEY, nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_pk"],
            ["instance.id"],
            name=op.f("fk_stable_member_instance_pk_instance"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "route", "level", "uid", "instance_pk", name=op.f("pk_stable_member")
        ),
    )
    op.create_index("ix_stable_member_instance_pk", "stable_member", ["instance_pk"])
    op.create_table(
        "request_attribute",
        sa.Column("series_pk", _KEY, nullable=False),
        sa.Column("requested_procedure_id", sa.String(length=16), nullable=False),
        sa.Column("scheduled_procedure_step_id", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_pk"],
            ["series.id"],
            name=op.f("fk_request_attribute_series_pk_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "series_pk",
            "requested_procedure_id",
            "scheduled_procedure_step_id",
            name=op.f("pk_request_attribute"),
        ),
    )
    # Series indexed before: the one item their row kept (the files are not read again).
    op.execute(
        "INSERT INTO request_attribute"
        " (series_pk, requested_procedure_id, scheduled_procedure_step_id)"
        " SELECT id, coalesce(requested_procedure_id, ''),"
        " coalesce(scheduled_procedure_step_id, '')"
        " FROM series"
        " WHERE requested_procedure_id IS NOT NULL OR scheduled_procedure_step_id IS NOT NULL"
    )
    # Timers armed before: they send what they always did, every current instance of
    # their series or study.
    op.execute(
        "INSERT INTO stable_member (route, level, uid, instance_pk)"
        " SELECT t.route, t.level, t.uid, i.id FROM stable_timer t"
        " JOIN series s ON t.level = 'series' AND s.series_instance_uid = t.uid"
        " JOIN instance i ON i.series_pk = s.id AND i.is_current = true"
    )
    op.execute(
        "INSERT INTO stable_member (route, level, uid, instance_pk)"
        " SELECT t.route, t.level, t.uid, i.id FROM stable_timer t"
        " JOIN study st ON t.level = 'study' AND st.study_instance_uid = t.uid"
        " JOIN series s ON s.study_pk = st.id"
        " JOIN instance i ON i.series_pk = s.id AND i.is_current = true"
    )


def downgrade() -> None:
    op.drop_table("request_attribute")
    op.drop_index("ix_stable_member_instance_pk", table_name="stable_member")
    op.drop_table("stable_member")
    op.drop_index("ix_study_patient_name", table_name="study")
    op.drop_index("ix_study_patient_name_search", table_name="study")
    with op.batch_alter_table("study") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
