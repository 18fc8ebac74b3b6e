"""Index schema: patient -> study -> series -> instance (SQLAlchemy Core).

The columns hold the attributes QIDO-RS (PS3.18 Table 10.6.1-5) and C-FIND (PS3.4 C.6.1.1
and C.6.2.1, the required and unique keys of the Patient Root and Study Root models) match
on, plus what the gateway records about each received file. Natural keys are unique;
surrogate integer keys link the levels.

This module is the *current* shape. The database gets it through Alembic revisions in
``index/migrations/versions``; a change here needs a new revision (a test compares the
migrated database with this metadata).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.types import TypeDecorator

# Column widths follow the VR maximum lengths of PS3.5 Table 6.2-1 (counted in characters).
UI = 128  # UIDs are 64 at most; the slack keeps a sloppy sender's UID intact
LO = 64
SH = 16
CS = 16
PN = 3 * 64 + 2  # three component groups of 64 characters joined by '='
DA = 8
TM = 16  # HHMMSS.FFFFFF = 13; a little slack for a trailing offset
AE = 16

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
SurrogateKey = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("received_at must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        result: datetime = value
        if result.tzinfo is None:
            return result.replace(tzinfo=UTC)
        return result.astimezone(UTC)


patient = Table(
    "patient",
    metadata,
    Column("id", SurrogateKey, primary_key=True, autoincrement=True),
    # Key columns hold '' instead of NULL so the unique key is NULL-safe on every backend.
    Column("patient_id", String(LO), nullable=False, server_default=""),
    Column("issuer_of_patient_id", String(LO), nullable=False, server_default=""),
    Column("patient_name", String(PN)),
    Column("patient_name_search", String(PN)),
    Column("patient_birth_date", String(DA)),
    Column("patient_sex", String(CS)),
    UniqueConstraint("patient_id", "issuer_of_patient_id"),
    sqlite_autoincrement=True,  # keys are never reused (db._LevelCache relies on it)
)

study = Table(
    "study",
    metadata,
    Column("id", SurrogateKey, primary_key=True, autoincrement=True),
    Column("study_instance_uid", String(UI), nullable=False),
    Column("patient_pk", SurrogateKey, ForeignKey("patient.id"), nullable=False),
    Column("study_date", String(DA)),
    Column("study_time", String(TM)),
    Column("accession_number", String(SH)),
    Column("issuer_of_accession_number", String(LO)),
    Column("referring_physician_name", String(PN)),
    Column("referring_physician_name_search", String(PN)),
    Column("study_id", String(SH)),
    Column("study_description", String(LO)),
    Column("last_received_at", UtcDateTime()),
    # The Patient Module as this study's instances carry it (PS3.4 C.6.2: in the Study
    # Root model the patient attributes are study attributes). The patient row keeps the
    # latest values per Patient ID (and Issuer) for Patient Root queries; two studies with
    # one Patient ID but another name, or with no Patient ID at all, keep their own here.
    Column("patient_name", String(PN)),
    Column("patient_name_search", String(PN)),
    Column("patient_birth_date", String(DA)),
    Column("patient_sex", String(CS)),
    UniqueConstraint("study_instance_uid"),
    sqlite_autoincrement=True,
)

series = Table(
    "series",
    metadata,
    Column("id", SurrogateKey, primary_key=True, autoincrement=True),
    Column("series_instance_uid", String(UI), nullable=False),
    Column("study_pk", SurrogateKey, ForeignKey("study.id"), nullable=False),
    Column("modality", String(CS)),
    Column("series_number", Integer),
    Column("series_description", String(LO)),
    Column("body_part_examined", String(CS)),
    Column("series_date", String(DA)),
    Column("series_time", String(TM)),
    Column("performed_procedure_step_start_date", String(DA)),
    Column("performed_procedure_step_start_time", String(TM)),
    Column("scheduled_procedure_step_id", String(SH)),
    Column("requested_procedure_id", String(SH)),
    Column("last_received_at", UtcDateTime()),
    UniqueConstraint("series_instance_uid"),
    sqlite_autoincrement=True,
)

instance = Table(
    "instance",
    metadata,
    Column("id", SurrogateKey, primary_key=True, autoincrement=True),
    Column("sop_instance_uid", String(UI), nullable=False),
    Column("series_pk", SurrogateKey, ForeignKey("series.id"), nullable=False),
    Column("sop_class_uid", String(UI), nullable=False),
    Column("instance_number", Integer),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("bits_allocated", Integer),
    Column("number_of_frames", Integer),
    Column("specific_character_set", String(LO)),
    Column("transfer_syntax_uid", String(UI), nullable=False),
    Column("relpath", String(1024), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("calling_ae", String(AE), nullable=False, server_default=""),
    Column("called_ae", String(AE), nullable=False, server_default=""),
    Column("source_ip", String(45), nullable=False, server_default=""),
    Column("received_via", String(16), nullable=False),
    Column("received_at", UtcDateTime(), nullable=False),
    Column("is_current", Boolean(create_constraint=False), nullable=False, server_default=true()),
    CheckConstraint("size >= 0", name="size_not_negative"),
)

# At most one current row per SOP Instance UID; older copies (policy keep_both) are not current.
Index(
    "uq_instance_current_sop_instance_uid",
    instance.c.sop_instance_uid,
    unique=True,
    sqlite_where=instance.c.is_current == true(),
    postgresql_where=instance.c.is_current == true(),
)
Index("ix_instance_sop_instance_uid", instance.c.sop_instance_uid)
# is_current is indexed with what it filters: a lone boolean index is useless and SQLite's
# planner, without statistics, prefers it to the UID index (a scan of every current row).
Index("ix_instance_series_pk_is_current", instance.c.series_pk, instance.c.is_current)
Index("ix_instance_sop_class_uid", instance.c.sop_class_uid)
Index("ix_series_study_pk", series.c.study_pk)
Index("ix_series_modality", series.c.modality)
Index("ix_study_patient_pk", study.c.patient_pk)
Index("ix_study_study_date", study.c.study_date)
Index("ix_study_accession_number", study.c.accession_number)
Index("ix_patient_patient_name_search", patient.c.patient_name_search)
Index("ix_patient_patient_name", patient.c.patient_name)
Index("ix_study_patient_name_search", study.c.patient_name_search)
Index("ix_study_patient_name", study.c.patient_name)
# patient_id is the leading column of the unique key, which serves as its index.

# Every Request Attributes Sequence item of a series' instances (Requested Procedure ID,
# Scheduled Procedure Step ID; '' for none): sequence matching looks for any item (PS3.4
# C.2.2.2.6). The series row keeps one item (the first of the last instance) to return.
request_attribute = Table(
    "request_attribute",
    metadata,
    Column(
        "series_pk",
        SurrogateKey,
        ForeignKey("series.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("requested_procedure_id", String(SH), primary_key=True),
    Column("scheduled_procedure_step_id", String(SH), primary_key=True),
)

# -- delivery queue (queue/jobs.py) --------------------------------------------------------

# One delivery of one instance to one destination, decided by a route. State machine:
# pending -> leased -> done | pending (retry, postpone) | dead; dead -> pending (re-drive).
# instance_pk cascades: when an instance row is deleted, its jobs go with it. The overwrite
# duplicate policy first re-points the unfinished jobs to the new row (index/db.py), so only
# finished (done) jobs of the replaced version are deleted.
delivery_job = Table(
    "delivery_job",
    metadata,
    Column("id", SurrogateKey, primary_key=True, autoincrement=True),
    Column(
        "instance_pk",
        SurrogateKey,
        ForeignKey("instance.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("destination", String(LO), nullable=False),
    Column("route", String(LO), nullable=False),
    Column("state", String(CS), nullable=False),  # queue.jobs.JobState
    Column("priority", Integer, nullable=False, server_default="0"),  # higher first
    Column("attempts", Integer, nullable=False, server_default="0"),  # counted at lease
    Column("not_before", UtcDateTime(), nullable=False),  # due time of a pending job
    Column("lease_until", UtcDateTime()),  # a leased job past this is handed out again
    Column("leased_by", String(LO)),
    Column("last_error", Text),
    Column("created_at", UtcDateTime(), nullable=False),  # max_age counts from here
    Column("updated_at", UtcDateTime(), nullable=False),
    sqlite_autoincrement=True,  # ids order jobs of equal priority (oldest first)
)
# The lease query walks this index in its ORDER BY (priority DESC, not_before) and stops at
# LIMIT: no sort, whatever the backlog. Done jobs sit under another state and cost nothing.
Index(
    "ix_delivery_job_lease",
    delivery_job.c.destination,
    delivery_job.c.state,
    delivery_job.c.priority.desc(),
    delivery_job.c.not_before,
)
# Which destinations have due work, without reading the (kept) done jobs.
Index("ix_delivery_job_state_not_before", delivery_job.c.state, delivery_job.c.not_before)
# Re-pointing and cascading on instance deletion, and the "already has a job" check.
Index("ix_delivery_job_instance_pk", delivery_job.c.instance_pk)

# The history of one job: a row per finished delivery attempt (written in the transaction
# that completes or fails the job, queue/jobs.py) and per operator re-drive, which resets the
# job's ``attempts`` counter. Deleted with the job (purge, retention, overwrite) by cascade.
delivery_attempt = Table(
    "delivery_attempt",
    metadata,
    Column("id", SurrogateKey, primary_key=True, autoincrement=True),
    Column(
        "job_id",
        SurrogateKey,
        ForeignKey("delivery_job.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("attempt", Integer, nullable=False),  # the job's attempts counter for this try
    Column("started_at", UtcDateTime(), nullable=False),  # when the job was leased
    Column("finished_at", UtcDateTime(), nullable=False),
    Column("outcome", String(CS), nullable=False),  # queue.jobs.AttemptOutcome
    Column("error", Text),
    Column("node", String(LO), nullable=False, server_default=""),  # the lease holder
    sqlite_autoincrement=True,  # ids order the history
)
# A job's history, and the cascade when jobs are deleted.
Index("ix_delivery_attempt_job_id", delivery_attempt.c.job_id)

# A series_stable / study_stable trigger waiting for quiet: each new instance of the series
# or study pushes ``deadline``; once it passes, one job per current instance and destination.
stable_timer = Table(
    "stable_timer",
    metadata,
    Column("route", String(LO), primary_key=True),
    Column("level", String(CS), primary_key=True),  # 'series' | 'study'
    Column("uid", String(UI), primary_key=True),  # Series or Study Instance UID
    Column("deadline", UtcDateTime(), nullable=False),
    Column("destinations", Text, nullable=False),  # JSON list of destination names
    Column("priority", Integer, nullable=False, server_default="0"),
)
Index("ix_stable_timer_deadline", stable_timer.c.deadline)

# The instances a stable timer sends when it fires: those its route matched (a study_stable
# route on Modality CT sends the study's CT instances, not its MR or SR ones, nor one a
# `final` route kept from it). Deleted with the timer; with the instance (cascade).
stable_member = Table(
    "stable_member",
    metadata,
    Column("route", String(LO), primary_key=True),
    Column("level", String(CS), primary_key=True),
    Column("uid", String(UI), primary_key=True),
    Column(
        "instance_pk",
        SurrogateKey,
        ForeignKey("instance.id", ondelete="CASCADE"),
        primary_key=True,
    ),
)
Index("ix_stable_member_instance_pk", stable_member.c.instance_pk)

# -- audit trail (observability/audit.py) -------------------------------------------------

# One security-relevant or data-moving event. Unlike the application log it may hold PHI
# (patient ID and name, study UID): it is the audit trail of DESIGN rule 5. Never updated;
# deleted only by age (audit.keep_for).
audit_event = Table(
    "audit_event",
    metadata,
    Column("id", SurrogateKey, primary_key=True, autoincrement=True),
    Column("time", UtcDateTime(), nullable=False),
    Column("event", String(LO), nullable=False),  # e.g. instance.received, association.rejected
    Column("outcome", String(CS), nullable=False),  # success | failure
    Column("actor", String(LO), nullable=False, server_default=""),  # AE title, user, key name
    Column("source_ip", String(45), nullable=False, server_default=""),
    Column("node", String(LO), nullable=False, server_default=""),  # the gateway that saw it
    Column("object", String(1024), nullable=False, server_default=""),  # study/SOP UID, dest.
    Column("study_uid", String(UI)),
    Column("patient_id", String(LO)),
    Column("patient_name", String(PN)),
    Column("detail", Text),  # JSON object
    sqlite_autoincrement=True,
)
# The filters of /api/audit: a time range, alone or with an event kind, an actor, a study or
# a patient; retention deletes by time.
Index("ix_audit_event_time", audit_event.c.time)
Index("ix_audit_event_event_time", audit_event.c.event, audit_event.c.time)
Index("ix_audit_event_actor_time", audit_event.c.actor, audit_event.c.time)
Index("ix_audit_event_study_uid", audit_event.c.study_uid)
Index("ix_audit_event_patient_id", audit_event.c.patient_id)


def storable(text: str) -> str:
    """``text`` as every index database keeps it: PostgreSQL refuses a NUL character in a
    text value (the whole transaction fails), so each one becomes a space, on SQLite too so
    both answer alike. Senders put NULs inside values (a slip: PS3.5 allows one only as a
    UI's trailing padding); the instance's own file keeps its bytes as received."""
    return text.replace("\x00", " ") if "\x00" in text else text


# Widths of the string columns, for truncation at extraction time.
COLUMN_LENGTHS: dict[str, dict[str, int]] = {
    table.name: {
        column.name: column.type.length
        for column in table.columns
        if isinstance(column.type, String) and column.type.length is not None
    }
    for table in (patient, study, series, instance)
}
