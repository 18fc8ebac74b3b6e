"""Initial schema: patient, study, series, instance (see index/schema.py).

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patient",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("patient_id", sa.String(length=64), server_default="", nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), server_default="", nullable=False),
        sa.Column("patient_name", sa.String(length=194), nullable=True),
        sa.Column("patient_name_search", sa.String(length=194), nullable=True),
        sa.Column("patient_birth_date", sa.String(length=8), nullable=True),
        sa.Column("patient_sex", sa.String(length=16), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient")),
        sa.UniqueConstraint(
            "patient_id",
            "issuer_of_patient_id",
            name=op.f("uq_patient_patient_id_issuer_of_patient_id"),
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_patient_patient_name", "patient", ["patient_name"], unique=False)
    op.create_index(
        "ix_patient_patient_name_search", "patient", ["patient_name_search"], unique=False
    )
    op.create_table(
        "study",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("study_instance_uid", sa.String(length=128), nullable=False),
        sa.Column(
            "patient_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("study_time", sa.String(length=16), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("issuer_of_accession_number", sa.String(length=64), nullable=True),
        sa.Column("referring_physician_name", sa.String(length=194), nullable=True),
        sa.Column("referring_physician_name_search", sa.String(length=194), nullable=True),
        sa.Column("study_id", sa.String(length=16), nullable=True),
        sa.Column("study_description", sa.String(length=64), nullable=True),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["patient_pk"], ["patient.id"], name=op.f("fk_study_patient_pk_patient")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_study_study_instance_uid")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_study_accession_number", "study", ["accession_number"], unique=False)
    op.create_index("ix_study_patient_pk", "study", ["patient_pk"], unique=False)
    op.create_index("ix_study_study_date", "study", ["study_date"], unique=False)
    op.create_table(
        "series",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("series_instance_uid", sa.String(length=128), nullable=False),
        sa.Column("study_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(length=64), nullable=True),
        sa.Column("body_part_examined", sa.String(length=16), nullable=True),
        sa.Column("series_date", sa.String(length=8), nullable=True),
        sa.Column("series_time", sa.String(length=16), nullable=True),
        sa.Column("performed_procedure_step_start_date", sa.String(length=8), nullable=True),
        sa.Column("performed_procedure_step_start_time", sa.String(length=16), nullable=True),
        sa.Column("scheduled_procedure_step_id", sa.String(length=16), nullable=True),
        sa.Column("requested_procedure_id", sa.String(length=16), nullable=True),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["study_pk"], ["study.id"], name=op.f("fk_series_study_pk_study")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("series_instance_uid", name=op.f("uq_series_series_instance_uid")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_series_modality", "series", ["modality"], unique=False)
    op.create_index("ix_series_study_pk", "series", ["study_pk"], unique=False)
    op.create_table(
        "instance",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("sop_instance_uid", sa.String(length=128), nullable=False),
        sa.Column(
            "series_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("sop_class_uid", sa.String(length=128), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("bits_allocated", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("specific_character_set", sa.String(length=64), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(length=128), nullable=False),
        sa.Column("relpath", sa.String(length=1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), server_default="", nullable=False),
        sa.Column("called_ae", sa.String(length=16), server_default="", nullable=False),
        sa.Column("source_ip", sa.String(length=45), server_default="", nullable=False),
        sa.Column("received_via", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("is_current", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.CheckConstraint("size >= 0", name=op.f("ck_instance_size_not_negative")),
        sa.ForeignKeyConstraint(
            ["series_pk"], ["series.id"], name=op.f("fk_instance_series_pk_series")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance")),
    )
    op.create_index(
        "ix_instance_series_pk_is_current", "instance", ["series_pk", "is_current"], unique=False
    )
    op.create_index("ix_instance_sop_class_uid", "instance", ["sop_class_uid"], unique=False)
    op.create_index("ix_instance_sop_instance_uid", "instance", ["sop_instance_uid"], unique=False)
    op.create_index(
        "uq_instance_current_sop_instance_uid",
        "instance",
        ["sop_instance_uid"],
        unique=True,
        sqlite_where=sa.text("is_current = true"),
        postgresql_where=sa.text("is_current = true"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_instance_current_sop_instance_uid",
        table_name="instance",
        sqlite_where=sa.text("is_current = true"),
        postgresql_where=sa.text("is_current = true"),
    )
    op.drop_index("ix_instance_sop_instance_uid", table_name="instance")
    op.drop_index("ix_instance_sop_class_uid", table_name="instance")
    op.drop_index("ix_instance_series_pk_is_current", table_name="instance")
    op.drop_table("instance")
    op.drop_index("ix_series_study_pk", table_name="series")
    op.drop_index("ix_series_modality", table_name="series")
    op.drop_table("series")
    op.drop_index("ix_study_study_date", table_name="study")
    op.drop_index("ix_study_patient_pk", table_name="study")
    op.drop_index("ix_study_accession_number", table_name="study")
    op.drop_table("study")
    op.drop_index("ix_patient_patient_name_search", table_name="patient")
    op.drop_index("ix_patient_patient_name", table_name="patient")
    op.drop_table("patient")
