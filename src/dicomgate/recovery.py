"""Crash and power-loss recovery of the store and the index.

Files are the source of truth. With SQLite, index commits are crash-safe at once but only
power-loss-safe after :meth:`Index.sync` (WAL ``synchronous=NORMAL``; a per-commit flush
costs a disk round trip per instance). The committer runs that barrier every few seconds and
records its time in a marker file. A marker found at start-up means the last run did not
stop cleanly: every store file newer than the last barrier (minus a margin) is checked
against the index and indexed if its row was lost; files that are not complete DICOM
instances (torn by a power cut before they were acknowledged) move to ``quarantine/``.

With PostgreSQL commits are synchronous, so no acknowledged row is ever lost; but a node
killed between moving a file into the (shared) store and committing its row leaves that
never-acknowledged file without a row. The same scan finds it, run ``storage.recovery_grace``
seconds after start-up and limited to files older than the start, so that another node's
commit still in flight (milliseconds old) is never taken for one. A file whose instance is
already indexed with the same bytes (the sender resent it) is removed instead of indexed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicomgate.errors import DicomgateError

log = logging.getLogger("dicomgate.recovery")

MARKER_NAME = ".dicomgate-running"
MARGIN_SECONDS = 120.0  # a file written before a barrier may be committed just after it


@dataclass(frozen=True)
class RecoveryReport:
    checked: int
    indexed: int
    quarantined: int


class RunMarker:
    """``<storage>/.dicomgate-running``: present while a gateway runs on this store."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / MARKER_NAME

    def previous_durable_until(self) -> float | None:
        """The last barrier time of an unclean previous run, or None after a clean stop."""
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            return float(doc["durable_until"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0  # unreadable marker: check everything

    def write(self, durable_until: float) -> None:
        tmp = self.path.with_name(f"{MARKER_NAME}.{uuid.uuid4().hex}")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"pid": os.getpid(), "durable_until": durable_until}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


LOCK_NAME = ".dicomgate-lock"


class NodeLock:
    """``<storage>/.dicomgate-lock`` (``<storage>/nodes/<name>/`` on PostgreSQL), held with
    ``flock`` for the life of the process that serves that store or node.

    A second ``dicomgate serve`` on the same store (an administrator starting one by hand
    beside the service) must stop before it touches anything: its start-up would remove
    the running gateway's half-received spool files, take its run marker for a crashed
    run's and, once its own ports failed to bind, remove that marker as after a clean stop
    (the running gateway's next power loss would then go unrecovered). The kernel drops the
    lock when the process ends in any way, ``kill -9`` included, so a crash never leaves a
    stale lock behind.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, folder: Path, what: str) -> NodeLock:
        """Take the lock of ``folder`` (created if missing); :class:`DicomgateError` naming
        ``what`` and the holder's pid when another process holds it."""
        path = Path(folder) / LOCK_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DicomgateError(f"{what}: cannot create {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise DicomgateError(
                f"{what} is in use by another dicomgate process (pid {holder}); one gateway"
                " serves one store (nodes sharing a PostgreSQL index need their own node.name)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def candidate_files(store_dir: Path, since: float, until: float | None = None) -> list[Path]:
    """Store files modified at or after ``since`` (and before ``until``); folders older
    than ``since`` are skipped."""
    found: list[Path] = []
    if not store_dir.is_dir():
        return found
    for study in os.scandir(store_dir):
        if not study.is_dir(follow_symlinks=False):
            continue
        for series in os.scandir(study.path):
            if not series.is_dir(follow_symlinks=False):
                continue
            if series.stat().st_mtime < since:
                continue  # a rename into it would have touched its mtime
            for entry in os.scandir(series.path):
                if not entry.is_file(follow_symlinks=False):
                    continue
                mtime = entry.stat().st_mtime
                if mtime >= since and (until is None or mtime < until):
                    found.append(Path(entry.path))
    return found


def recover(
    store_root: Path, since: float, adopt: Callable[[Path], bool], until: float | None = None
) -> RecoveryReport:
    """Index lost rows for files newer than ``since`` (and older than ``until``; see the
    module docstring)."""
    started = time.monotonic()
    files = candidate_files(Path(store_root) / "store", since - MARGIN_SECONDS, until)
    indexed = quarantined = 0
    quarantine = Path(store_root) / "quarantine"
    for path in files:
        try:
            if adopt(path):
                indexed += 1
        except FileNotFoundError:
            continue  # removed meanwhile (a replaced version an earlier file superseded)
        except DicomgateError as exc:
            quarantine.mkdir(exist_ok=True)
            os.replace(path, quarantine / f"{uuid.uuid4().hex}-{path.name}")
            quarantined += 1
            log.warning(
                "quarantined an incomplete store file: %s",
                exc,
                extra={"event": "recovery.quarantined"},
            )
    report = RecoveryReport(checked=len(files), indexed=indexed, quarantined=quarantined)
    log.warning(
        "unclean shutdown: checked %d recent files in %.1f s, re-indexed %d, quarantined %d",
        report.checked,
        time.monotonic() - started,
        indexed,
        quarantined,
        extra={"event": "recovery.done"},
    )
    return report
