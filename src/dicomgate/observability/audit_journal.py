"""Audit rows the database could not take, kept in a file until it can.

While the index database is away, the audit writer appends its rows here (one JSON object
per line, flushed to disk per batch) instead of dropping them; once the database answers
again they are inserted in order, before any newer row, and the file is removed. The file
lives in the node's directory of the store and holds what the rows hold (PHI included),
so it is created readable by its owner only.

Replay is at least once: the position reached is saved beside the file after each batch
inserted, so a crash during a replay inserts at most that one batch twice. A line that
cannot be read (a crash in the middle of an append) is skipped and counted.

Only the audit writer thread uses a journal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

from dicomgate.index.schema import audit_event
from dicomgate.store.filestore import fsync_dir

# The columns a journaled row may carry (those of AuditEvent.row: the table's, but its
# key); anything else in a line makes it unreadable rather than reaching the insert.
_COLUMNS = frozenset(column.name for column in audit_event.columns if column.name != "id")


class JournalFull(Exception):
    """Appending would take the journal past its size limit."""


def _encode(row: dict[str, Any]) -> bytes:
    out = dict(row)
    out["time"] = row["time"].isoformat()
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _decode(line: bytes) -> dict[str, Any]:
    """One journaled row; ValueError when the line is not one."""
    if not line.endswith(b"\n"):
        raise ValueError("a line cut short")
    row = json.loads(line)
    if not isinstance(row, dict) or not _COLUMNS.issuperset(row) or "event" not in row:
        raise ValueError("not an audit row")
    row["time"] = datetime.fromisoformat(row["time"])
    if row["time"].tzinfo is None:
        raise ValueError("a time without an offset")
    return row


class AuditJournal:
    """An append-only file of audit rows waiting for the database, and its replay."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._position_path = path.with_name(path.name + ".position")
        self._position = self._read_position()
        self.pending = self._count()  # rows waiting (unreadable lines included)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Add ``rows`` durably (flushed and synced). JournalFull or OSError: none added."""
        blob = b"".join(_encode(row) for row in rows)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size + len(blob) > self.max_bytes:
                raise JournalFull(f"{self.path} would pass {self.max_bytes} bytes")
            if size and os.pread(fd, 1, size - 1) != b"\n":
                blob = b"\n" + blob  # a line cut short by a crash stays a line of its own
            try:
                _write_all(fd, blob)
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # a disk that filled up: no half batch left behind
                raise
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        self.pending += len(rows)

    def replay(self, insert: Callable[[list[dict[str, Any]]], None], batch: int) -> int:
        """Give every waiting row to ``insert``, ``batch`` at a time, oldest first, then
        remove the file. Returns the lines that could not be read (skipped). What
        ``insert`` raises is raised; the rows it took before that are not given again."""
        unreadable = 0
        if self.pending == 0:
            return 0
        with open(self.path, "rb") as f:
            f.seek(self._position)
            for lines in _chunks(f, batch):
                rows = []
                for line in lines:
                    try:
                        rows.append(_decode(line))
                    except ValueError:
                        unreadable += 1
                if rows:
                    insert(rows)
                self._position = f.tell()
                self._save_position()
                self.pending = max(0, self.pending - len(lines))
        self.path.unlink()
        self._position_path.unlink(missing_ok=True)
        self._position = 0
        self.pending = 0
        return unreadable

    def _read_position(self) -> int:
        try:
            position = int(self._position_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0
        return max(0, position)

    def _save_position(self) -> None:
        # Not synced: losing it in a power cut replays a batch again (rows twice, not lost).
        tmp = self._position_path.with_name(self._position_path.name + ".tmp")
        tmp.write_text(str(self._position))
        os.replace(tmp, self._position_path)

    def _count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                if self._position > os.fstat(f.fileno()).st_size:
                    self._position = 0  # a position of another file: replay all of it
                f.seek(self._position)
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0


def _chunks(f: Any, size: int) -> Iterator[list[bytes]]:
    while lines := list(islice(f, size)):
        yield lines


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


__all__ = ["AuditJournal", "JournalFull"]
