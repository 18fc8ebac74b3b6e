"""The study row's own copy of the Patient Module (see index/schema.py study).

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


def downgrade() -> None:
    op.drop_index("ix_study_patient_name", table_name="study")
    op.drop_index("ix_study_patient_name_search", table_name="study")
    with op.batch_alter_table("study") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
