"""Cluster wake-ups on PostgreSQL: ``LISTEN/NOTIFY`` for new jobs, a lock per node name.

Nodes sharing one PostgreSQL database share one delivery queue. The transaction that
creates delivery jobs (:meth:`dicomgate.index.db.Index.record`) also runs
``pg_notify('dicomgate_jobs', 'dest1,dest2')``; PostgreSQL delivers it to every listening
session when (and only if) that transaction commits. :class:`JobListener` holds one
dedicated connection per node that listens on the channel and wakes the local delivery
workers of those destinations (``Dispatcher.notify``), so a job stored through node A starts
at once on node B instead of at B's next poll (``queue.poll_interval`` remains the fallback:
a lost connection loses wake-ups, never jobs).

The same connection holds a session advisory lock on the node name: two live nodes with the
same ``node.name`` would share one spool and one run marker in a shared store, so the second
is refused at start-up (when they share ``storage.path``, the node folder's lock file,
:class:`dicomgate.recovery.NodeLock`, refuses it first, before its spool is touched). The
lock goes with the session, so a node killed with ``kill -9`` releases it as soon as
PostgreSQL notices the closed connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import URL

from dicomgate.config import DatabaseConfig
from dicomgate.errors import DicomgateError
from dicomgate.observability.logging import Outage

log = logging.getLogger("dicomgate.queue.notify")

CHANNEL = "dicomgate_jobs"
_RECONNECT_SECONDS = 2.0
_NOTIFY_WAIT_SECONDS = 1.0  # how often the listener thread looks at its stop flag


def node_lock_id(node: str) -> int:
    """A stable signed 64-bit advisory lock key for ``node`` (same on every node)."""
    digest = hashlib.sha256(f"dicomgate-node:{node}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def notify_statement() -> str:
    """SQL (psycopg paramstyle) that announces new jobs for a comma-separated list."""
    return f"SELECT pg_notify('{CHANNEL}', %s)"


def parse_payload(payload: str) -> list[str]:
    """Destination names of one notification payload (empty names dropped)."""
    return [name for name in payload.split(",") if name]


def _conninfo(url: URL, timeout: float) -> str:
    """A libpq connection string from a SQLAlchemy URL (password kept, never logged)."""
    from psycopg.conninfo import make_conninfo

    from dicomgate.index.db import pg_connect_args  # db imports this module

    params: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    params.update({str(k): v for k, v in url.query.items() if isinstance(v, str)})
    # The same bounds as the index's connections: a partition ends this connection too,
    # and the listener reconnects (wake-ups lost meanwhile, never jobs).
    params.update(pg_connect_args(url, timeout))
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


class JobListener:
    """One node's listening connection (a thread); see the module docstring."""

    def __init__(
        self,
        url: URL,
        node: str,
        on_jobs: Callable[[Sequence[str]], None],
        timeout: float = DatabaseConfig.model_fields["timeout"].default,
    ) -> None:
        self._conninfo = _conninfo(url, timeout)
        self.node = node
        self._on_jobs = on_jobs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: Any = None
        self.received = 0  # notifications handled (for tests and diagnostics)

    def start(self) -> None:
        """Connect, take the node-name lock, LISTEN; a DicomgateError if the name is taken."""
        self._connection = self._connect(first=True)
        self._thread = threading.Thread(target=self._run, name="job-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and close the connection (releases the node-name lock)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_NOTIFY_WAIT_SECONDS + 5)
        self._close()

    # -- internals ------------------------------------------------------------------------

    def _connect(self, *, first: bool) -> Any:
        import psycopg

        try:
            connection = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as error:
            raise DicomgateError(
                f"database.url: cannot open the notification connection: {error}".splitlines()[0]
            ) from error
        try:
            row = connection.execute(
                "SELECT pg_try_advisory_lock(%s)", (node_lock_id(self.node),)
            ).fetchone()
            if not (row and row[0]):
                raise DicomgateError(
                    f"node.name: another live node named {self.node!r} uses this database;"
                    " give every node its own node.name"
                    if first
                    else f"node.name: {self.node!r} was taken while reconnecting"
                )
            connection.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def _run(self) -> None:
        import psycopg

        outage = Outage(
            log,
            "job notifications (deliveries poll meanwhile)",
            "notify.disconnected",
            "notify.reconnected",
            level=logging.WARNING,
            expected=(psycopg.Error, DicomgateError),
        )
        while not self._stop.is_set():
            try:
                if self._connection is None:
                    self._connection = self._connect(first=False)
                    outage.ok()
                for note in self._connection.notifies(timeout=_NOTIFY_WAIT_SECONDS):
                    self.received += 1
                    names = parse_payload(note.payload)
                    if names:
                        self._on_jobs(names)
            except (psycopg.Error, DicomgateError) as error:
                self._close()
                if self._stop.is_set():
                    return
                outage.failed(error)
                self._stop.wait(_RECONNECT_SECONDS)
