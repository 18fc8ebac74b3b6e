"""The audit journal: rows the database could not take, on disk, then replayed in order.

The last test runs the audit writer against a PostgreSQL database of its own that goes
away and comes back (the gateway-level tests are in test_database_outage.py).
"""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import pg_cut_off, wait_until

from dicomgate.index.db import Index
from dicomgate.observability.audit import AuditEvent, AuditQuery, AuditTrail
from dicomgate.observability.audit_journal import AuditJournal, JournalFull

T0 = datetime(2026, 12, 7, 9, 30, tzinfo=UTC)


def rows(first: int, count: int) -> list[dict[str, Any]]:
    return [
        AuditEvent(
            f"event.{i}",
            actor="MODALITY",
            patient_name="Doe^Jane",
            detail={"n": i, "name": "Müller"},
            time=T0 + timedelta(seconds=i),
        ).row("node-a")
        for i in range(first, first + count)
    ]


class Sink:
    """Collects what a replay inserts; raises on the ``fail_on``-th call."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.got: list[dict[str, Any]] = []
        self.calls = 0
        self.fail_on = fail_on

    def __call__(self, batch: list[dict[str, Any]]) -> None:
        self.calls += 1
        if self.calls == self.fail_on:
            raise ConnectionError("database went away again")
        self.got.extend(batch)


def test_rows_come_back_in_order_and_equal_then_the_file_goes(tmp_path: Path) -> None:
    path = tmp_path / "audit-journal.jsonl"
    journal = AuditJournal(path, 1 << 20)
    journal.append(rows(0, 3))
    journal.append(rows(3, 4))
    assert journal.pending == 7
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # rows hold patient names
    sink = Sink()
    assert journal.replay(sink, batch=3) == 0
    assert sink.got == rows(0, 7)  # same values and types (aware datetimes) as inserted
    assert sink.calls == 3
    assert journal.pending == 0 and not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_restart_finds_what_waits(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    AuditJournal(path, 1 << 20).append(rows(0, 5))
    again = AuditJournal(path, 1 << 20)
    assert again.pending == 5
    sink = Sink()
    again.replay(sink, batch=100)
    assert [r["event"] for r in sink.got] == [f"event.{i}" for i in range(5)]


def test_a_failed_replay_resumes_where_it_stopped_even_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = AuditJournal(path, 1 << 20)
    journal.append(rows(0, 10))
    sink = Sink(fail_on=2)
    with pytest.raises(ConnectionError):
        journal.replay(sink, batch=4)
    assert [r["event"] for r in sink.got] == [f"event.{i}" for i in range(4)]
    assert journal.pending == 6 and path.exists()
    restarted = AuditJournal(path, 1 << 20)  # the saved position survives the process
    assert restarted.pending == 6
    rest = Sink()
    restarted.replay(rest, batch=4)
    assert [r["event"] for r in rest.got] == [f"event.{i}" for i in range(4, 10)]


def test_a_line_cut_short_by_a_crash_is_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = AuditJournal(path, 1 << 20)
    journal.append(rows(0, 2))
    with open(path, "ab") as f:  # a crash in the middle of an append
        f.write(b'{"time":"2026-12-07T09:30:00+00:00","event":"cut')
    journal = AuditJournal(path, 1 << 20)
    journal.append(rows(2, 2))  # starts on a line of its own
    sink = Sink()
    assert journal.replay(sink, batch=100) == 1
    assert [r["event"] for r in sink.got] == ["event.0", "event.1", "event.2", "event.3"]


@pytest.mark.parametrize(
    "line",
    [
        b"[1, 2]\n",
        b'{"time": "2026-12-07T09:30:00", "event": "no offset"}\n',
        b'{"time": "2026-12-07T09:30:00+00:00", "event": "x", "id": 5}\n',
        b'{"time": "2026-12-07T09:30:00+00:00"}\n',
        b"\xff\xfe\n",
    ],
)
def test_a_line_that_is_not_a_row_never_reaches_the_insert(tmp_path: Path, line: bytes) -> None:
    path = tmp_path / "j.jsonl"
    journal = AuditJournal(path, 1 << 20)
    journal.append(rows(0, 1))
    with open(path, "ab") as f:
        f.write(line)
    journal = AuditJournal(path, 1 << 20)
    sink = Sink()
    assert journal.replay(sink, batch=100) == 1
    assert [r["event"] for r in sink.got] == ["event.0"]


def test_a_full_journal_takes_nothing_of_a_batch(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = AuditJournal(path, 2000)
    journal.append(rows(0, 2))
    size = path.stat().st_size
    with pytest.raises(JournalFull):
        journal.append(rows(2, 20))
    assert path.stat().st_size == size and journal.pending == 2


def test_a_row_the_database_refuses_is_dropped_not_held_for_ever(
    tmp_path: Path, own_database: tuple[str, str]
) -> None:
    """A journaled row PostgreSQL refuses while it answers (here a NUL in text, as a
    journal written before rows were cleaned of NULs holds) is dropped and counted at the
    replay; the rows around it are written, and the writer goes on."""
    name, url = own_database
    path = tmp_path / "audit-journal.jsonl"
    poison = rows(1, 1)
    poison[0]["actor"] = "NUL\x00HERE"
    AuditJournal(path, 1 << 20).append(rows(0, 1) + poison + rows(2, 1))
    index = Index.open(url)
    lost: list[str] = []
    trail = AuditTrail(index.engine, node="node-a", journal=path, on_failure=lost.append)
    trail.start()
    try:
        wait_until(lambda: trail.health().journaled == 0, 30, "the journal replayed")
        events = [r["event"] for r in trail.query(AuditQuery(event="event."))]
        assert sorted(events) == ["event.0", "event.2"]
        assert trail.health().dropped == 1 and lost == ["database"]
        assert not path.exists()
        pg_cut_off(name, allow=False)  # and the journal works again for the next outage
        try:
            trail.record(AuditEvent("test.meanwhile", actor="NUL\x00TOO"))
            wait_until(lambda: trail.health().journaled == 1, 30, "a row journaled")
        finally:
            pg_cut_off(name, allow=True)
        wait_until(lambda: trail.health().journaled == 0, 30, "the journal replayed again")
        (row,) = trail.query(AuditQuery(event="test.meanwhile"))
        assert row["actor"] == "NUL TOO" and trail.health().dropped == 1
    finally:
        trail.stop()
        index.close()
