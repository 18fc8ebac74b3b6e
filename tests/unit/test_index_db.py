"""Index on a real SQLite file: migrations, group commit, duplicate policies, failures."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydicom.data import get_testdata_file
from sqlalchemy import create_engine, text

from dicomgate.config import DuplicatePolicy
from dicomgate.errors import IndexError_, IndexUnavailable
from dicomgate.index import db as index_db
from dicomgate.index.db import Index, Outcome, RecordResult, StoredInstance, normalize_url
from dicomgate.index.extract import extract_record
from dicomgate.index.schema import metadata

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _testdata(name: str) -> str:
    path = get_testdata_file(name)
    if not isinstance(path, str):
        raise LookupError(f"pydicom test file {name} is missing")
    return path


def make_item(
    sop_uid: str = "1.2.3.4.5.1",
    *,
    relpath: str | None = None,
    series_uid: str = "1.2.3.4",
    study_uid: str = "1.2.3",
    size: int = 1000,
    received_at: datetime = T0,
    **attributes: object,
) -> StoredInstance:
    ds = pydicom.dcmread(_testdata("CT_small.dcm"), stop_before_pixels=True)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return StoredInstance(
        record=extract_record(ds),
        relpath=relpath or f"{study_uid}/{series_uid}/{sop_uid}.dcm",
        size=size,
        sha256="ab" * 32,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MODALITY",
        called_ae="DICOMGATE",
        source_ip="10.0.0.7",
        received_via="dimse",
        received_at=received_at,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    """The same tests on the embedded SQLite and on PostgreSQL at 127.0.0.1:5432."""
    if request.param == "postgresql":
        idx = Index.open(_fresh_postgres(request))
    else:
        idx = Index.open(f"sqlite:///{tmp_path}/nested/dir/index.db")
    yield idx
    idx.close()


def _fresh_postgres(request: pytest.FixtureRequest) -> str:
    """The module's PostgreSQL database, emptied (the ``database_url`` fixture)."""
    url = str(request.getfixturevalue("database_url"))
    engine = create_engine(normalize_url(url))
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP SCHEMA public CASCADE")
        connection.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()
    return url


def _scalar(idx: Index, sql: str) -> object:
    with idx.engine.connect() as connection:
        return connection.exec_driver_sql(sql).scalar()


def test_open_creates_the_folder_and_sets_sqlite_pragmas(tmp_path: Path) -> None:
    idx = Index.open(f"sqlite:///{tmp_path}/a/b/index.db")
    try:
        assert (tmp_path / "a" / "b" / "index.db").is_file()
        assert _scalar(idx, "PRAGMA journal_mode") == "wal"
        assert _scalar(idx, "PRAGMA synchronous") == 2  # FULL
        assert _scalar(idx, "PRAGMA foreign_keys") == 1
        assert _scalar(idx, "PRAGMA busy_timeout") == 5000
        idx.ping()
    finally:
        idx.close()
    relaxed = Index.open(f"sqlite:///{tmp_path}/a/b/index.db", durable=False)
    try:
        assert _scalar(relaxed, "PRAGMA synchronous") == 1  # NORMAL
    finally:
        relaxed.close()


def test_open_twice_keeps_data_and_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/index.db"
    first = Index.open(url)
    first.record([make_item()], DuplicatePolicy.KEEP_BOTH)
    first.close()
    second = Index.open(url)
    try:
        assert second.count_instances() == 1
        assert _scalar(second, "SELECT version_num FROM alembic_version") == index_db.SCHEMA_HEAD
    finally:
        second.close()


def test_schema_head_is_the_newest_migration() -> None:
    assert index_db.head_revision() == index_db.SCHEMA_HEAD


def test_a_database_at_the_head_opens_without_alembic(tmp_path: Path) -> None:
    """The start-up of a migrated index reads its revision itself: no alembic import."""
    url = f"sqlite:///{tmp_path}/index.db"
    Index.open(url).close()
    script = (
        "import sys\n"
        "from dicomgate.index.db import Index\n"
        f"Index.open({url!r}).close()\n"
        "print('alembic' in sys.modules)\n"
    )
    opened = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert opened.stdout.strip() == "False", opened.stderr


def test_a_database_behind_the_head_is_migrated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/index.db"
    engine = create_engine(url)
    with engine.connect() as connection:
        index_db.migrate(connection, "0003")
        connection.commit()
        assert not index_db._at_head(connection)
    engine.dispose()
    opened = Index.open(url)
    try:
        assert _scalar(opened, "SELECT version_num FROM alembic_version") == index_db.SCHEMA_HEAD
        assert _scalar(opened, "SELECT count(*) FROM delivery_attempt") == 0
    finally:
        opened.close()


def test_a_revision_alembic_cannot_reach_is_index_unavailable(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/index.db")
    try:
        with engine.connect() as connection, pytest.raises(IndexUnavailable, match="0009"):
            index_db.migrate(connection, "0009")
    finally:
        engine.dispose()


def test_migrated_schema_matches_schema_module(index: Index) -> None:
    with index.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []


def test_unusable_database_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(IndexUnavailable):
        Index.open(f"sqlite:///{blocker}/index.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(IndexUnavailable, match=r"garbage\.db"):
        Index.open(f"sqlite:///{garbage}")


def test_unreachable_postgresql_is_unavailable() -> None:
    with pytest.raises(IndexUnavailable, match=r"127\.0\.0\.1") as caught:
        Index.open("postgresql://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_postgresql_waits_are_bounded_by_the_timeout() -> None:
    args = index_db.pg_connect_args(normalize_url("postgresql://u@h/db"), 30)
    assert args == {
        "connect_timeout": "10",
        "keepalives": "1",
        "keepalives_idle": "10",
        "keepalives_interval": "5",
        "keepalives_count": "3",
        "tcp_user_timeout": "30000",
        "options": "-c statement_timeout=30000",
    }
    short = index_db.pg_connect_args(normalize_url("postgresql://u@h/db"), 1.5, durable=False)
    assert short["connect_timeout"] == "2"  # libpq's least
    assert short["keepalives_interval"] == "1"
    assert short["tcp_user_timeout"] == "1000"
    assert short["options"] == "-c synchronous_commit=off -c statement_timeout=1000"
    # What the URL says wins; its options are kept, ours added.
    given = normalize_url("postgresql://u@h/db?connect_timeout=3&options=-c%20search_path%3Dx")
    mine = index_db.pg_connect_args(given, 30)
    assert "connect_timeout" not in mine
    assert mine["options"] == "-c search_path=x -c statement_timeout=30000"


@pytest.mark.postgres
def test_no_free_pooled_connection_is_unavailable(database_url: str) -> None:
    """Every pooled connection busy for ``timeout``: IndexUnavailable (503, 0xA700), not
    SQLAlchemy's TimeoutError (a 500 with a traceback)."""
    engine = index_db._create_engine(normalize_url(database_url), durable=True, timeout=1)
    held = []
    try:
        pool = engine.pool
        for _ in range(pool.size() + pool._max_overflow):  # type: ignore[attr-defined]
            held.append(engine.connect())
        with pytest.raises(IndexUnavailable, match=r"no free database connection within 1 s"):
            engine.connect()
        with held[0] as connection:  # the settings reached the server
            assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "1s"
            libpq = connection.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
            assert libpq["tcp_user_timeout"] == "1000" and libpq["keepalives"] == "1"
    finally:
        for connection in held:
            connection.close()
        engine.dispose()


def test_postgresql_urls_select_psycopg() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_record_stores_and_joins_every_level(index: Index) -> None:
    results = index.record([make_item()], DuplicatePolicy.KEEP_BOTH)
    assert results == [RecordResult(Outcome.STORED, None)]
    row = index.instance("1.2.3.4.5.1")
    assert row is not None
    assert row["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2"
    assert row["series_instance_uid"] == "1.2.3.4"
    assert row["study_instance_uid"] == "1.2.3"
    assert row["patient_id"] == "1CT1"
    assert row["patient_name"] == "CompressedSamples^CT1"
    assert row["modality"] == "CT"
    assert row["study_date"] == "20040119"
    assert row["relpath"] == "1.2.3/1.2.3.4/1.2.3.4.5.1.dcm"
    assert row["received_at"] == T0
    assert row["received_at"].tzinfo is not None
    assert row["is_current"] is True
    assert index.instance("9.9.9") is None


def test_study_and_patient_take_the_newest_values(index: Index) -> None:
    index.record([make_item("1.1", StudyDescription="first")], DuplicatePolicy.KEEP_BOTH)
    index.record(
        [make_item("1.2", StudyDescription="second", PatientName="Renamed^Patient")],
        DuplicatePolicy.KEEP_BOTH,
    )
    index.record(
        [make_item("1.3", StudyDescription="", PatientName="Renamed^Patient")],
        DuplicatePolicy.KEEP_BOTH,
    )
    row = index.instance("1.1")
    assert row is not None
    assert row["study_description"] == "second"  # an empty value does not erase
    assert row["patient_name"] == "Renamed^Patient"
    assert row["patient_name_search"] == "RENAMED^PATIENT"
    assert _scalar(index, "SELECT count(*) FROM patient") == 1
    assert _scalar(index, "SELECT count(*) FROM study") == 1
    assert _scalar(index, "SELECT count(*) FROM series") == 1


def test_patient_key_is_id_plus_issuer_null_safe(index: Index) -> None:
    index.record(
        [
            make_item("1.1", study_uid="9.1", series_uid="9.1.1", PatientID="P1"),
            make_item("1.2", study_uid="9.2", series_uid="9.2.1", PatientID="P1"),
            make_item(
                "1.3", study_uid="9.3", series_uid="9.3.1", PatientID="P1", IssuerOfPatientID="H2"
            ),
        ],
        DuplicatePolicy.KEEP_BOTH,
    )
    assert _scalar(index, "SELECT count(*) FROM patient") == 2


def test_keep_both_keeps_the_old_row_not_current(index: Index) -> None:
    index.record([make_item(relpath="old.dcm")], DuplicatePolicy.KEEP_BOTH)
    results = index.record([make_item(relpath="new.dcm")], DuplicatePolicy.KEEP_BOTH)
    assert results == [RecordResult(Outcome.STORED, None)]
    current = index.instance("1.2.3.4.5.1")
    assert current is not None and current["relpath"] == "new.dcm"
    rows = index.instances("1.2.3.4.5.1")
    assert [(r["relpath"], r["is_current"]) for r in rows] == [
        ("old.dcm", False),
        ("new.dcm", True),
    ]
    assert index.count_instances() == 1
    assert index.count_instances(current_only=False) == 2


def test_keep_both_within_one_batch(index: Index) -> None:
    results = index.record(
        [make_item(relpath="a.dcm"), make_item(relpath="b.dcm"), make_item(relpath="c.dcm")],
        DuplicatePolicy.KEEP_BOTH,
    )
    assert [r.outcome for r in results] == [Outcome.STORED] * 3
    assert [r["is_current"] for r in index.instances("1.2.3.4.5.1")] == [False, False, True]
    assert index.count_instances() == 1


def test_reject_writes_nothing_for_the_duplicate_only(index: Index) -> None:
    index.record([make_item(relpath="old.dcm")], DuplicatePolicy.REJECT)
    results = index.record(
        [
            make_item(relpath="new.dcm", StudyDescription="changed"),
            make_item("1.2.3.4.5.2", relpath="other.dcm"),
        ],
        DuplicatePolicy.REJECT,
    )
    assert results == [
        RecordResult(Outcome.REJECTED, None),
        RecordResult(Outcome.STORED, None),
    ]
    assert [r["relpath"] for r in index.instances("1.2.3.4.5.1")] == ["old.dcm"]
    row = index.instance("1.2.3.4.5.2")
    assert row is not None and row["study_description"] == "e+1"  # the rejected item wrote nothing


def test_reject_within_one_batch(index: Index) -> None:
    results = index.record(
        [make_item(relpath="a.dcm"), make_item(relpath="b.dcm")], DuplicatePolicy.REJECT
    )
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.REJECTED]
    assert [r["relpath"] for r in index.instances("1.2.3.4.5.1")] == ["a.dcm"]


def test_overwrite_replaces_and_names_the_obsolete_file(index: Index) -> None:
    index.record([make_item(relpath="old.dcm")], DuplicatePolicy.OVERWRITE)
    results = index.record([make_item(relpath="new.dcm")], DuplicatePolicy.OVERWRITE)
    assert results == [RecordResult(Outcome.REPLACED, "old.dcm")]
    assert [r["relpath"] for r in index.instances("1.2.3.4.5.1")] == ["new.dcm"]


def test_overwrite_within_one_batch(index: Index) -> None:
    results = index.record(
        [make_item(relpath="a.dcm"), make_item(relpath="b.dcm")], DuplicatePolicy.OVERWRITE
    )
    assert results == [RecordResult(Outcome.STORED, None), RecordResult(Outcome.REPLACED, "a.dcm")]
    assert [r["relpath"] for r in index.instances("1.2.3.4.5.1")] == ["b.dcm"]


def test_overwrite_with_the_same_path_never_names_the_live_file(index: Index) -> None:
    index.record([make_item(relpath="same.dcm")], DuplicatePolicy.OVERWRITE)
    results = index.record([make_item(relpath="same.dcm")], DuplicatePolicy.OVERWRITE)
    assert results == [RecordResult(Outcome.REPLACED, None)]


def test_a_failing_item_rolls_back_the_whole_batch(index: Index) -> None:
    batch = [
        make_item("2.1", study_uid="2", series_uid="2.0"),
        make_item("2.2", study_uid="2", series_uid="2.0", size=-1),  # violates a CHECK
    ]
    with pytest.raises(IndexError_, match="refused"):
        index.record(batch, DuplicatePolicy.KEEP_BOTH)
    assert index.count_instances(current_only=False) == 0
    assert _scalar(index, "SELECT count(*) FROM study") == 0
    # The rolled-back study/series must not be remembered as written.
    assert index.record([batch[0]], DuplicatePolicy.KEEP_BOTH)[0].outcome is Outcome.STORED
    row = index.instance("2.1")
    assert row is not None and row["study_instance_uid"] == "2"


def test_before_commit_runs_after_the_statements_and_before_the_commit(index: Index) -> None:
    seen: list[int] = []

    def before_commit() -> None:
        # Another connection does not see the rows yet: they are not committed.
        seen.append(index.count_instances())

    index.record([make_item("4.1")], DuplicatePolicy.KEEP_BOTH, before_commit=before_commit)
    assert seen == [0]
    assert index.count_instances() == 1


class _NotDurable(Exception):
    pass


def test_before_commit_raising_rolls_everything_back(index: Index) -> None:
    index.record([make_item("5.1", relpath="old.dcm")], DuplicatePolicy.OVERWRITE)

    def before_commit() -> None:
        raise _NotDurable

    with pytest.raises(_NotDurable):
        index.record(
            [make_item("5.1", relpath="new.dcm"), make_item("5.2")],
            DuplicatePolicy.OVERWRITE,
            before_commit=before_commit,
        )
    # The replaced row is still the current one, and nothing of the batch was written.
    assert [r["relpath"] for r in index.instances("5.1")] == ["old.dcm"]
    assert index.instance("5.2") is None
    # The rolled-back levels are not remembered: the next batch writes them again.
    assert index.record([make_item("5.2")], DuplicatePolicy.KEEP_BOTH)[0].outcome is Outcome.STORED


def test_rows_deleted_behind_the_index_are_recreated(index: Index) -> None:
    index.record([make_item("3.1")], DuplicatePolicy.KEEP_BOTH)
    with index.engine.begin() as connection:
        for table in ("instance", "series", "study", "patient"):
            connection.exec_driver_sql(f"DELETE FROM {table}")
    index.record(
        [make_item("3.2", received_at=T0 + timedelta(milliseconds=1))], DuplicatePolicy.KEEP_BOTH
    )
    row = index.instance("3.2")
    assert row is not None and row["series_instance_uid"] == "1.2.3.4"


def test_locked_database_is_unavailable_and_nothing_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_db, "SQLITE_BUSY_TIMEOUT_MS", 200)
    path = tmp_path / "index.db"
    idx = Index.open(f"sqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(IndexUnavailable, match="locked"):
            idx.record([make_item()], DuplicatePolicy.KEEP_BOTH)
        other.execute("ROLLBACK")
        assert idx.count_instances() == 0
        assert idx.record([make_item()], DuplicatePolicy.KEEP_BOTH)[0].outcome is Outcome.STORED
    finally:
        other.close()
        idx.close()


def test_a_broken_writer_connection_is_replaced(tmp_path: Path) -> None:
    """SQLite: record() keeps one connection for its transactions; when that connection
    breaks, the batch fails with nothing committed and the next batch opens another."""
    idx = Index.open(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        idx.record([make_item("6.1")], DuplicatePolicy.KEEP_BOTH)
        idx._writer.dbapi_connection.close()  # broken behind the index's back
        with pytest.raises(IndexError_):
            idx.record([make_item("6.2")], DuplicatePolicy.KEEP_BOTH)
        assert idx.instance("6.2") is None
        assert idx.record([make_item("6.2")], DuplicatePolicy.KEEP_BOTH)[0].outcome is (
            Outcome.STORED
        )
        assert idx.count_instances() == 2
    finally:
        idx.close()


def test_one_writer_and_readers_in_threads(index: Index) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                index.instance("4.1")
                index.count_instances()
        except BaseException as error:  # reported below
            errors.append(error)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for n in range(100):
            index.record([make_item(f"4.{n}")], DuplicatePolicy.KEEP_BOTH)
    finally:
        done.set()
        for reader in readers:
            reader.join()
    assert errors == []
    assert index.count_instances() == 100


def test_empty_batch_is_a_no_op(index: Index) -> None:
    assert index.record([], DuplicatePolicy.REJECT) == []


def test_duplicate_lookup_uses_the_uid_index(index: Index) -> None:
    # SQLite without statistics once chose a boolean is_current index: a scan per C-STORE.
    # PostgreSQL: with sequential scans off, a plan without the index means it is unusable.
    postgres = index.engine.dialect.name == "postgresql"
    with index.engine.connect() as connection:
        if postgres:
            connection.exec_driver_sql("SET enable_seqscan = off")
        plan = connection.exec_driver_sql(
            ("EXPLAIN" if postgres else "EXPLAIN QUERY PLAN")
            + " SELECT id, relpath FROM instance"
            + " WHERE sop_instance_uid = '1' AND is_current = "
            + ("true" if postgres else "1")
        ).all()
    # PostgreSQL may take the partial unique index of current rows: just as good.
    names = ("ix_instance_sop_instance_uid", "uq_instance_current_sop_instance_uid")
    assert any(name in str(row) for row in plan for name in names[: 2 if postgres else 1]), plan


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_rows_written_by_the_first_revision_survive_migrating_to_head(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A database that an old dicomgate filled: rows written with the 0001 schema (and a
    job with 0002's), migrated up to head, are read back by today's index and queue."""
    from dicomgate.index.db import current_revision, head_revision, migrate
    from dicomgate.index.query import Level, search
    from dicomgate.queue import JobQueue, QueueConfig

    url = _fresh_postgres(request) if backend == "postgresql" else f"sqlite:///{tmp_path}/i.db"
    engine = create_engine(normalize_url(url))
    received = T0
    try:
        with engine.connect() as connection:
            migrate(connection, "0001")
            connection.commit()
            assert current_revision(connection) == "0001"
            for sql in (
                "INSERT INTO patient (id, patient_id, issuer_of_patient_id, patient_name,"
                " patient_name_search, patient_birth_date, patient_sex)"
                " VALUES (7, 'PID-0001', '', 'Doe^Jane^^', 'DOE^JANE', '19700102', 'F')",
                "INSERT INTO study (id, study_instance_uid, patient_pk, study_date,"
                " accession_number, study_description, last_received_at)"
                " VALUES (8, '1.2.840.99.1', 7, '20240501', 'ACC-1', 'Old study', :t)",
                "INSERT INTO series (id, series_instance_uid, study_pk, modality, series_number)"
                " VALUES (9, '1.2.840.99.1.1', 8, 'MR', 3)",
                "INSERT INTO instance (id, sop_instance_uid, series_pk, sop_class_uid,"
                " instance_number, rows, columns, transfer_syntax_uid, relpath, size, sha256,"
                " calling_ae, called_ae, received_via, received_at, is_current)"
                " VALUES (10, '1.2.840.99.1.1.1', 9, '1.2.840.10008.5.1.4.1.1.4', 1, 64, 64,"
                " '1.2.840.10008.1.2.1', 'old/one.dcm', 4242, :sha, 'OLDMOD', 'DICOMGATE',"
                " 'dimse', :t, true)",
            ):
                connection.execute(text(sql), {"t": received, "sha": "cd" * 32})
            connection.commit()
            # 0002 brought the queue: a job an old node left pending.
            migrate(connection, "0002")
            connection.execute(
                text(
                    "INSERT INTO delivery_job (instance_pk, destination, route, state,"
                    " attempts, not_before, created_at, updated_at)"
                    " VALUES (10, 'pacs', 'all', 'pending', 0, :t, :t, :t)"
                ),
                {"t": received},
            )
            # and a study_stable timer armed before 0005: it keeps sending its whole study
            connection.execute(
                text(
                    "INSERT INTO stable_timer (route, level, uid, deadline, destinations,"
                    " priority) VALUES ('whole', 'study', '1.2.840.99.1', :t, '[\"pacs\"]', 0)"
                ),
                {"t": received},
            )
            connection.commit()
            migrate(connection)
            connection.commit()
            assert current_revision(connection) == head_revision()
    finally:
        engine.dispose()

    idx = Index.open(url)  # what a new node does at start-up: nothing left to migrate
    try:
        row = idx.instance("1.2.840.99.1.1.1")
        assert row is not None
        assert (row["relpath"], row["size"], row["sha256"]) == ("old/one.dcm", 4242, "cd" * 32)
        assert (row["calling_ae"], row["received_via"]) == ("OLDMOD", "dimse")
        assert (row["study_instance_uid"], row["series_instance_uid"]) == (
            "1.2.840.99.1",
            "1.2.840.99.1.1",
        )
        assert (row["patient_id"], row["patient_name"], row["modality"]) == (
            "PID-0001",
            "Doe^Jane",
            "MR",
        )
        assert idx.count_instances() == 1
        assert _scalar(idx, "SELECT instance_pk FROM stable_member WHERE route = 'whole'") == 10
        with idx.engine.connect() as connection:
            found = search(connection, Level.STUDY, {"PatientID": "PID-0001"})
            # 0005 copied the patient row's values into the study row, which the study
            # level matches.
            by_name = search(connection, Level.STUDY, {"PatientName": "Doe^Jane"})
            by_birth = search(connection, Level.SERIES, {"PatientBirthDate": "19700102"})
        assert [m.study_uid for m in found.matches] == ["1.2.840.99.1"]
        assert [m.study_uid for m in by_name.matches] == ["1.2.840.99.1"]
        assert [m.series_uid for m in by_birth.matches] == ["1.2.840.99.1.1"]
        # A new instance of the old study joins the old rows (no second patient/study).
        idx.record(
            [
                make_item(
                    "1.2.840.99.1.1.2",
                    series_uid="1.2.840.99.1.1",
                    study_uid="1.2.840.99.1",
                    PatientID="PID-0001",
                )
            ],
            DuplicatePolicy.REJECT,
        )
        assert _scalar(idx, "SELECT count(*) FROM study") == 1
        assert _scalar(idx, "SELECT count(*) FROM series") == 1
        # The old pending job is leased and completed, its history in 0004's table.
        queue = JobQueue(idx.engine, QueueConfig())
        jobs = queue.lease("pacs", 10, "node-new:1")
        assert [(j.destination, j.attempts, j.relpath) for j in jobs] == [
            ("pacs", 1, "old/one.dcm")
        ]
        queue.complete(jobs)
        assert _scalar(idx, "SELECT state FROM delivery_job") == "done"
        assert _scalar(idx, "SELECT outcome FROM delivery_attempt") == "delivered"
    finally:
        idx.close()


def test_each_study_keeps_the_patient_attributes_its_instances_carry(index: Index) -> None:
    """Two studies of one Patient ID under two names (a name corrected between visits), and
    two studies of two patients with no Patient ID at all: each study is found by, and
    answers with, its own patient's name (PS3.4 C.6.2.1). The patient row keeps the
    latest name, for patient-level searches. Before, the last instance stored renamed every
    study of the Patient ID, and every study without one."""
    from dicomgate.index.query import Level, QueryOptions, search

    index.record(
        [
            make_item(
                "1.9.1.1.1",
                series_uid="1.9.1.1",
                study_uid="1.9.1",
                PatientID="P1",
                PatientName="Doe^John",
                PatientBirthDate="19500101",
            ),
            make_item(
                "1.9.2.1.1",
                series_uid="1.9.2.1",
                study_uid="1.9.2",
                PatientID="P1",
                PatientName="Doe^Johnny",
                PatientBirthDate="19500102",
            ),
            make_item(
                "1.9.3.1.1",
                series_uid="1.9.3.1",
                study_uid="1.9.3",
                PatientID="",
                PatientName="Anon^One",
                PatientSex="F",
            ),
            make_item(
                "1.9.4.1.1",
                series_uid="1.9.4.1",
                study_uid="1.9.4",
                PatientID="",
                PatientName="Anon^Two",
                PatientSex="M",
            ),
        ],
        DuplicatePolicy.KEEP_BOTH,
    )

    def names(level: Level, keys: dict[str, str]) -> dict[str, str]:
        with index.engine.connect() as connection:
            found = search(connection, level, keys | {"PatientName": keys.get("PatientName", "")})
        return {
            str(m.study_uid): next(
                str(v) for a, v in m.values.items() if a.keyword == "PatientName"
            )
            for m in found.matches
        }

    assert names(Level.STUDY, {}) == {
        "1.9.1": "Doe^John",
        "1.9.2": "Doe^Johnny",
        "1.9.3": "Anon^One",
        "1.9.4": "Anon^Two",
    }
    assert names(Level.STUDY, {"PatientName": "Doe^John"}) == {"1.9.1": "Doe^John"}
    assert names(Level.STUDY, {"PatientName": "Anon^One"}) == {"1.9.3": "Anon^One"}
    assert names(Level.SERIES, {"PatientSex": "M"}) == {"1.9.4": "Anon^Two"}
    assert names(Level.IMAGE, {"PatientBirthDate": "19500102"}) == {"1.9.2": "Doe^Johnny"}
    with index.engine.connect() as connection:
        fuzzy = search(
            connection,
            Level.STUDY,
            {"PatientName": "johnny doe"},
            QueryOptions(fuzzy=True),
        )
        patients = search(connection, Level.PATIENT, {"PatientID": "P1", "PatientName": ""})
    assert sorted(str(m.study_uid) for m in fuzzy.matches) == ["1.9.2"]
    # The patient level has one entity per Patient ID: the latest name.
    (patient,) = patients.matches
    assert [v for a, v in patient.values.items() if a.keyword == "PatientName"] == ["Doe^Johnny"]
    row = index.instance("1.9.1.1.1")
    assert row is not None and row["patient_name"] == "Doe^John"


def test_person_names_match_without_their_trailing_empty_components(index: Index) -> None:
    """'Doe^John^^^' as a modality wrote it and 'Doe^John^' as a user typed it are the name
    'Doe^John' (PS3.5 6.2.1.1); two values of a name are two PN objects, an empty one null
    (PS3.18 F.2.2, F.2.5)."""
    from dicomgate.index.query import Level, search

    index.record(
        [
            make_item(
                "1.8.1.1.1",
                series_uid="1.8.1.1",
                study_uid="1.8.1",
                PatientName="Doe^John^^^",
                ReferringPhysicianName="Smith^Anne\\Jones^Bob",
            ),
            make_item(
                "1.8.2.1.1",
                series_uid="1.8.2.1",
                study_uid="1.8.2",
                PatientName="Yamada^Tarou=山田^太郎=",
            ),
        ],
        DuplicatePolicy.KEEP_BOTH,
    )

    def found(value: str) -> list[str]:
        with index.engine.connect() as connection:
            answer = search(connection, Level.STUDY, {"PatientName": value})
        return [str(m.study_uid) for m in answer.matches]

    for typed in ("Doe^John", "Doe^John^", "Doe^John^^^^", "Doe^John="):
        assert found(typed) == ["1.8.1"], typed
    assert found("Yamada^Tarou=山田^太郎") == ["1.8.2"]
    assert found("Doe") == []  # a family name alone is another name
    with index.engine.connect() as connection:
        answer = search(
            connection,
            Level.STUDY,
            {"StudyInstanceUID": "1.8.1", "ReferringPhysicianName": "", "PatientName": ""},
        )
    (found_study,) = answer.matches
    match = found_study.to_json()
    assert match["00080090"] == {
        "vr": "PN",
        "Value": [{"Alphabetic": "Smith^Anne"}, {"Alphabetic": "Jones^Bob"}],
    }
    assert match["00100010"]["Value"] == [{"Alphabetic": "Doe^John"}]


def test_sequence_matching_finds_any_item_of_any_instance(index: Index) -> None:
    """PS3.4 C.2.2.2.6: a Request Attributes Sequence key matches when any item of the
    series' instances matches, every key of the query in one item. The index kept one item
    per series (the first of the last instance stored), so RPX and RPY were not found."""
    from pydicom.dataset import Dataset as Item

    from dicomgate.index.query import Level, search

    def item(requested: str, scheduled: str) -> Item:
        found = Item()
        found.RequestedProcedureID, found.ScheduledProcedureStepID = requested, scheduled
        return found

    first = make_item("1.7.1.1.1", series_uid="1.7.1.1", study_uid="1.7.1")
    second = make_item("1.7.1.1.2", series_uid="1.7.1.1", study_uid="1.7.1")
    other = make_item("1.7.2.1.1", series_uid="1.7.2.1", study_uid="1.7.2")
    records = []
    for stored, items in (
        (first, [item("RPX", "S1"), item("RPY", "S2")]),
        (second, [item("RPZ", "S3")]),
        (other, []),
    ):
        ds = pydicom.dcmread(_testdata("CT_small.dcm"), stop_before_pixels=True)
        ds.StudyInstanceUID = stored.record.study_uid
        ds.SeriesInstanceUID = stored.record.series_uid
        ds.SOPInstanceUID = stored.record.sop_instance_uid
        ds.RequestAttributesSequence = items
        records.append(dataclasses.replace(stored, record=extract_record(ds)))
    index.record(records, DuplicatePolicy.KEEP_BOTH)

    def found(keys: dict[str, str]) -> list[str]:
        with index.engine.connect() as connection:
            answer = search(connection, Level.SERIES, keys)
        return sorted(str(m.series_uid) for m in answer.matches)

    rp, sps = (
        "RequestAttributesSequence.RequestedProcedureID",
        "RequestAttributesSequence.ScheduledProcedureStepID",
    )
    for requested in ("RPX", "RPY", "RPZ", "RP?"):
        assert found({rp: requested}) == ["1.7.1.1"], requested
    assert found({rp: "RPW"}) == []
    assert found({rp: "RPX", sps: "S1"}) == ["1.7.1.1"]
    assert found({rp: "RPX", sps: "S2"}) == []  # S2 is in another item
    with index.engine.connect() as connection:
        instances = search(connection, Level.IMAGE, {rp: "RPY"})
    assert sorted(str(m.sop_instance_uid) for m in instances.matches) == ["1.7.1.1.1", "1.7.1.1.2"]
