"""Index on the real PostgreSQL at 127.0.0.1:5432 (a throw-away database per run)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pydicom
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydicom.data import get_charset_files, get_testdata_file

from dicomgate.config import DuplicatePolicy
from dicomgate.errors import IndexError_
from dicomgate.index.db import SCHEMA_HEAD, Index, Outcome, RecordResult, StoredInstance
from dicomgate.index.extract import extract_record
from dicomgate.index.schema import metadata

pytestmark = pytest.mark.postgres

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def index(database_url: str) -> Iterator[Index]:
    idx = Index.open(database_url)
    with idx.engine.begin() as connection:
        connection.exec_driver_sql(
            "TRUNCATE instance, series, study, patient RESTART IDENTITY CASCADE"
        )
    yield idx
    idx.close()


def make_item(
    sop_uid: str = "1.2.3.4.5.1",
    *,
    relpath: str | None = None,
    series_uid: str = "1.2.3.4",
    study_uid: str = "1.2.3",
    size: int = 1000,
    source: str = "CT_small.dcm",
) -> StoredInstance:
    path = get_testdata_file(source) or get_charset_files(source)[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    return StoredInstance(
        record=extract_record(ds),
        relpath=relpath or f"{sop_uid}.dcm",
        size=size,
        sha256="ab" * 32,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MODALITY",
        called_ae="DICOMGATE",
        source_ip="10.0.0.7",
        received_via="stow",
        received_at=T0,
    )


def _scalar(idx: Index, sql: str) -> object:
    with idx.engine.connect() as connection:
        return connection.exec_driver_sql(sql).scalar()


def test_plain_postgresql_url_uses_psycopg_and_migrates_once(
    database_url: str, index: Index
) -> None:
    assert index.engine.dialect.driver == "psycopg"
    index.ping()
    again = Index.open(database_url)
    try:
        assert _scalar(again, "SELECT version_num FROM alembic_version") == SCHEMA_HEAD
        with again.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        again.close()


def test_durable_false_relaxes_synchronous_commit(database_url: str) -> None:
    relaxed = Index.open(database_url, durable=False)
    try:
        assert _scalar(relaxed, "SHOW synchronous_commit") == "off"
    finally:
        relaxed.close()


def test_record_stores_and_joins_every_level(index: Index) -> None:
    assert index.record([make_item()], DuplicatePolicy.KEEP_BOTH) == [
        RecordResult(Outcome.STORED, None)
    ]
    row = index.instance("1.2.3.4.5.1")
    assert row is not None
    assert row["patient_id"] == "1CT1"
    assert row["study_instance_uid"] == "1.2.3"
    assert row["modality"] == "CT"
    assert row["received_at"] == T0
    assert row["is_current"] is True


def test_multibyte_names_round_trip(index: Index) -> None:
    index.record(
        [make_item("7.1", study_uid="7", series_uid="7.1", source="chrH31.dcm")],
        DuplicatePolicy.KEEP_BOTH,
    )
    row = index.instance("7.1")
    assert row is not None
    assert row["patient_name"] == "Yamada^Tarou=山田^太郎=やまだ^たろう"


def test_patient_key_is_null_safe(index: Index) -> None:
    index.record(
        [make_item("1.1", study_uid="9.1"), make_item("1.2", study_uid="9.2", series_uid="9.2.1")],
        DuplicatePolicy.KEEP_BOTH,
    )
    assert _scalar(index, "SELECT count(*) FROM patient") == 1
    assert _scalar(index, "SELECT count(*) FROM study") == 2


def test_keep_both(index: Index) -> None:
    index.record([make_item(relpath="a.dcm")], DuplicatePolicy.KEEP_BOTH)
    results = index.record(
        [make_item(relpath="b.dcm"), make_item(relpath="c.dcm")], DuplicatePolicy.KEEP_BOTH
    )
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.STORED]
    rows = index.instances("1.2.3.4.5.1")
    assert [(r["relpath"], r["is_current"]) for r in rows] == [
        ("a.dcm", False),
        ("b.dcm", False),
        ("c.dcm", True),
    ]
    assert index.count_instances() == 1
    assert index.count_instances(current_only=False) == 3


def test_reject(index: Index) -> None:
    results = index.record(
        [make_item(relpath="a.dcm"), make_item(relpath="b.dcm"), make_item("2.1")],
        DuplicatePolicy.REJECT,
    )
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.REJECTED, Outcome.STORED]
    assert index.record([make_item(relpath="c.dcm")], DuplicatePolicy.REJECT) == [
        RecordResult(Outcome.REJECTED, None)
    ]
    assert [r["relpath"] for r in index.instances("1.2.3.4.5.1")] == ["a.dcm"]


def test_overwrite(index: Index) -> None:
    results = index.record(
        [make_item(relpath="a.dcm"), make_item(relpath="b.dcm")], DuplicatePolicy.OVERWRITE
    )
    assert results == [RecordResult(Outcome.STORED, None), RecordResult(Outcome.REPLACED, "a.dcm")]
    assert index.record([make_item(relpath="c.dcm")], DuplicatePolicy.OVERWRITE) == [
        RecordResult(Outcome.REPLACED, "b.dcm")
    ]
    assert [r["relpath"] for r in index.instances("1.2.3.4.5.1")] == ["c.dcm"]


def test_a_failing_item_rolls_back_the_whole_batch(index: Index) -> None:
    with pytest.raises(IndexError_):
        index.record([make_item("3.1"), make_item("3.2", size=-1)], DuplicatePolicy.KEEP_BOTH)
    assert index.count_instances(current_only=False) == 0
    assert _scalar(index, "SELECT count(*) FROM series") == 0
    assert index.record([make_item("3.1")], DuplicatePolicy.KEEP_BOTH)[0].outcome is Outcome.STORED


def test_two_nodes_storing_the_same_instances_leave_one_current(
    database_url: str, index: Index
) -> None:
    nodes = [index, Index.open(database_url)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(nodes))

    def ingest(node: Index, name: str) -> None:
        try:
            start.wait()
            for n in range(40):
                node.record([make_item(f"5.{n}", relpath=f"{name}/{n}")], DuplicatePolicy.KEEP_BOTH)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [
        threading.Thread(target=ingest, args=(node, f"node{i}")) for i, node in enumerate(nodes)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    nodes[1].close()
    assert errors == []
    assert index.count_instances() == 40
    assert index.count_instances(current_only=False) == 80
