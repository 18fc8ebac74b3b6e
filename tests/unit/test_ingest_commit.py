"""The ingest committer's batch: index statements beside the flushes, commit after them.

Real files, a real SQLite index, the real flush thread; only a failing disk flush is
simulated (a unit test of Ingestor._commit_batch's failure path).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomgate.config import DuplicatePolicy
from dicomgate.errors import DicomgateError, InvalidInstance, StoreError
from dicomgate.index.db import Index
from dicomgate.ingest import IngestJob, Ingestor, _data_offset
from dicomgate.recovery import recover
from dicomgate.store.filestore import ContentStore

STUDY = "1.2.826.0.1.3680043.8.498.20"


def _part10(sop_uid: str) -> tuple[bytes, str, str]:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = STUDY + ".1"
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


@pytest.fixture
def ingestor(tmp_path: Path) -> Iterator[Ingestor]:
    store = ContentStore(tmp_path / "data", fsync=True)
    store.open()
    index = Index.open(f"sqlite:///{tmp_path}/index.db", durable=False)
    ingestor = Ingestor(store, index, DuplicatePolicy.KEEP_BOTH)
    yield ingestor
    ingestor._flusher.shutdown()
    ingestor._folder_flusher.shutdown()
    index.close()


def _job(ingestor: Ingestor, loop: asyncio.AbstractEventLoop, sop_uid: str) -> IngestJob:
    data, sop_class, syntax = _part10(sop_uid)
    spool = ingestor.store.new_spool()
    spool.write(data)
    with open(spool.path, "rb") as fh:
        offset = _data_offset(fh)
    return IngestJob(
        spool=spool,
        data_offset=offset,
        transfer_syntax=syntax,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_uid,
        calling_ae="MODALITY",
        called_ae="DICOMGATE",
        source_ip="127.0.0.1",
        received_via="dimse",
        loop=loop,
        future=loop.create_future(),
    )


def _failing_flush() -> None:
    raise StoreError("cannot flush spool file: Input/output error")


def _commit(
    ingestor: Ingestor,
    series: int,
    count: int,
    monkeypatch: pytest.MonkeyPatch | None = None,
    failing: tuple[int, ...] = (),
) -> tuple[list[IngestJob], list[object]]:
    """One batch of ``count`` instances through the committer, the flushes of ``failing``
    made to fail; the jobs and what each one's future was resolved with."""
    loop = asyncio.new_event_loop()
    try:
        jobs = [_job(ingestor, loop, f"{STUDY}.{series}.{n}") for n in range(count)]
        for n in failing:
            assert monkeypatch is not None
            monkeypatch.setattr(jobs[n].spool, "flush", _failing_flush)
        ingestor._commit_batch(jobs)
        loop.run_until_complete(asyncio.sleep(0))  # run the call_soon_threadsafe resolutions
        return jobs, [job.future.result() for job in jobs]
    finally:
        loop.close()


def test_batch_is_stored_and_indexed(ingestor: Ingestor) -> None:
    jobs, outcomes = _commit(ingestor, 1, 3)
    assert outcomes == [None, None, None]
    for job in jobs:
        row = ingestor.index.instance(job.sop_instance_uid)
        assert row is not None
        assert ingestor.store.path_of(row["relpath"]).read_bytes()[128:132] == b"DICM"
    assert list(ingestor.store.spool_dir.glob("*.part")) == []


def test_a_failed_flush_refuses_that_file_and_indexes_the_rest(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs, outcomes = _commit(ingestor, 2, 3, monkeypatch, failing=(1,))
    broken = jobs[1].spool
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], DicomgateError)
    assert "Input/output error" in str(outcomes[1])
    # The refused instance has no row and no file; the others have both.
    assert ingestor.index.instance(jobs[1].sop_instance_uid) is None
    assert not broken.path.exists()
    for job in (jobs[0], jobs[2]):
        row = ingestor.index.instance(job.sop_instance_uid)
        assert row is not None
        assert ingestor.store.path_of(row["relpath"]).is_file()
    assert ingestor.index.count_instances() == 2


def test_every_flush_failing_stores_nothing(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, outcomes = _commit(ingestor, 3, 2, monkeypatch, failing=(0, 1))
    assert all(isinstance(o, DicomgateError) for o in outcomes)
    assert ingestor.index.count_instances() == 0
    assert [p for p in ingestor.store.store_dir.rglob("*.dcm")] == []


def test_the_garbage_collector_is_settled_once_ready() -> None:
    """Start-up's objects are frozen out of the collector's sight and the youngest
    generation's threshold raised (service.settle_garbage_collector); in a fresh
    interpreter, since both are process-wide."""
    import subprocess
    import sys

    code = (
        "import gc\n"
        "from dicomgate.service import GC_YOUNG_THRESHOLD, settle_garbage_collector\n"
        "before = gc.get_threshold()\n"
        "assert gc.get_freeze_count() == 0\n"
        "settle_garbage_collector()\n"
        "assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()\n"
        "assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:]), gc.get_threshold()\n"
        "assert gc.isenabled()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(str(getattr(record, "event", "")))

    def stored(self) -> int:
        return self.events.count("instance.stored")


@pytest.fixture
def lines() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger("dicomgate.ingest")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.setLevel(level)
    logger.removeHandler(handler)


def test_stored_lines_wait_until_the_answers_are_out(ingestor: Ingestor, lines: _Lines) -> None:
    """The committer answers a batch and keeps its instance.stored lines; they are written
    later (when it is idle, or _LINES_MAX wait), not while the event loop sends the answers."""
    _, outcomes = _commit(ingestor, 6, 3)
    assert outcomes == [None, None, None]
    assert lines.stored() == 0
    assert len(ingestor._lines) == 3
    ingestor._write_lines()
    assert lines.stored() == 3
    assert ingestor._lines == []


async def _ingest_all(ingestor: Ingestor, jobs: list[IngestJob]) -> list[object]:
    return list(await asyncio.gather(*(ingestor.ingest(j) for j in jobs)))


def test_the_committer_writes_waiting_lines_when_idle_and_at_stop(
    ingestor: Ingestor, lines: _Lines
) -> None:
    ingestor.start()
    loop = asyncio.new_event_loop()
    try:
        first = [_job(ingestor, loop, f"{STUDY}.7.{n}") for n in range(2)]
        results = loop.run_until_complete(_ingest_all(ingestor, first))
        assert results == [None, None]
        deadline = time.monotonic() + 5
        while lines.stored() < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert lines.stored() == 2  # written once the committer had nothing to do
        more = [_job(ingestor, loop, f"{STUDY}.8.{n}") for n in range(3)]
        results = loop.run_until_complete(_ingest_all(ingestor, more))
        assert results == [None, None, None]
    finally:
        ingestor.stop()  # writes whatever still waits
        loop.close()
    assert lines.stored() == 5


def test_recovery_leaves_an_indexed_file_alone_whatever_a_later_rule_says(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance indexed under an earlier version (a UID with a '/', say) that a later
    version's extraction refuses: recovery after an unclean stop moved it to quarantine,
    and its row named a file that was gone. Indexed at its path, it is left alone."""
    jobs, outcomes = _commit(ingestor, 2, 2)
    assert outcomes == [None, None]

    def refuse(_ds: object) -> None:
        raise InvalidInstance("StudyInstanceUID holds a character no UID may")

    monkeypatch.setattr("dicomgate.ingest.extract_record", refuse)
    report = recover(ingestor.store.root, 0.0, ingestor.adopt)
    assert (report.checked, report.indexed, report.quarantined) == (2, 0, 0)
    for job in jobs:
        row = ingestor.index.instance(job.sop_instance_uid)
        assert row is not None and ingestor.store.path_of(row["relpath"]).is_file()
