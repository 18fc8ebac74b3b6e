"""Retention: in ``relay`` mode, delete instances once delivered and ``keep_for`` old.

An instance is deleted when, in one write transaction, all of these hold:

- it was received more than ``keep_for`` ago;
- every delivery job of it is ``done`` (a pending, leased or dead-lettered job keeps it:
  an operator may still re-drive a dead one; jobs of a destination removed from the config
  keep it too);
- no series_stable / study_stable timer of its series or study is armed (those would create
  jobs for it when they fire).

The rows go first (the instance, its done jobs, then series, study and patient rows left
empty), the files after the commit, and with SQLite after the WAL barrier: a crash in
between leaves a file without a row (recovery may index it again, at worst one extra
delivery, DESIGN rule 3), never a row without a file. On PostgreSQL the candidate rows
are locked ``FOR UPDATE SKIP LOCKED``: a job being created for an instance at the same
moment (its foreign key locks the row) either makes the instance skipped or fails and is
retried, so deletion never races delivery. Nodes sharing a database sweep one at a time
(a transaction-scoped advisory lock). Emptied store folders are removed; the
committer re-creates a folder that vanished between its mkdir and its rename.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import and_, delete, exists, func, or_, select
from sqlalchemy import exc as sa_exc

from dicomgate.index import let_writers_in
from dicomgate.index.schema import delivery_job, instance, patient, series, stable_timer, study
from dicomgate.observability.logging import Outage

if TYPE_CHECKING:
    from dicomgate.index.db import Index
    from dicomgate.store.filestore import ContentStore

log = logging.getLogger("dicomgate.retention")

_BATCH = 500
# Any 64-bit constant: one node at a time sweeps a shared PostgreSQL database (the lock
# goes with the transaction, so a survivor takes over when a sweeping node dies).
_RETENTION_LOCK_ID = 0x646963_6F6D72


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Retention:
    """Deletes delivered instances in batches; :meth:`run` sweeps every ``interval``."""

    def __init__(
        self,
        index: Index,
        store: ContentStore,
        keep_for: float,
        *,
        interval: float = 60.0,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.index = index
        self.store = store
        self.keep_for = keep_for
        self.interval = interval
        self._clock = clock
        self._postgres = index.engine.dialect.name == "postgresql"
        self.deleted = 0

    def sweep(self) -> int:
        """Delete every instance that may go now; returns how many were deleted."""
        total = 0
        while True:
            relpaths = self._delete_batch()
            if not relpaths:
                return total
            if self.index.relaxed_commits:
                self.index.sync()  # the deletion is durable before a file disappears
            for relpath in relpaths:
                self._remove_file(relpath)
            total += len(relpaths)
            self.deleted += len(relpaths)
            if len(relpaths) < _BATCH:
                return total
            let_writers_in(not self._postgres)  # a committer waiting for the write lock

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep until ``stop`` is set; failures are logged and retried next interval."""
        outage = Outage(log, "retention sweep", "retention.error", "retention.recovered")
        while not stop.is_set():
            try:
                deleted = await asyncio.to_thread(self.sweep)
            except Exception as exc:
                outage.failed(exc)
            else:
                outage.ok()
                if deleted:
                    log.info(
                        "deleted %d delivered instances",
                        deleted,
                        extra={"event": "retention.deleted", "instances": deleted},
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    # -- internals ------------------------------------------------------------------------

    def _delete_batch(self) -> list[str]:
        i, s, st, j, t = instance.c, series.c, study.c, delivery_job.c, stable_timer.c
        cutoff = self._clock() - timedelta(seconds=self.keep_for)
        unfinished = exists().where(j.instance_pk == i.id, j.state != "done")
        armed = exists().where(
            or_(
                and_(t.level == "series", t.uid == s.series_instance_uid),
                and_(t.level == "study", t.uid == st.study_instance_uid),
            )
        )
        query = (
            select(i.id, i.relpath, i.series_pk, s.study_pk, st.patient_pk)
            .select_from(
                instance.join(series, i.series_pk == s.id).join(study, s.study_pk == st.id)
            )
            .where(i.received_at < cutoff, ~unfinished, ~armed)
            .order_by(i.id)
            .limit(_BATCH)
        )
        if self._postgres:
            query = query.with_for_update(of=instance, skip_locked=True)
        engine = self.index.engine
        lock = self.index.write_lock if not self._postgres else contextlib.nullcontext()
        try:
            with lock, engine.connect() as connection:
                if not self._postgres:
                    connection = connection.execution_options(sqlite_immediate=True)
                with connection.begin():
                    if (
                        self._postgres
                        and not connection.execute(
                            select(func.pg_try_advisory_xact_lock(_RETENTION_LOCK_ID))
                        ).scalar_one()
                    ):
                        return []  # another node is sweeping right now
                    rows = connection.execute(query).all()
                    if not rows:
                        return []
                    ids = [row.id for row in rows]
                    connection.execute(delete(delivery_job).where(j.instance_pk.in_(ids)))
                    connection.execute(delete(instance).where(i.id.in_(ids)))
                    series_pks = {row.series_pk for row in rows}
                    study_pks = {row.study_pk for row in rows}
                    patient_pks = {row.patient_pk for row in rows}
                    connection.execute(
                        delete(series).where(
                            s.id.in_(series_pks), ~exists().where(i.series_pk == s.id)
                        )
                    )
                    connection.execute(
                        delete(study).where(
                            st.id.in_(study_pks), ~exists().where(s.study_pk == st.id)
                        )
                    )
                    p = patient.c
                    connection.execute(
                        delete(patient).where(
                            p.id.in_(patient_pks), ~exists().where(st.patient_pk == p.id)
                        )
                    )
        except sa_exc.DBAPIError as error:
            # e.g. a row locked by a concurrent ingest: nothing was deleted; next sweep.
            log.warning(
                "retention batch rolled back: %s",
                type(error.orig).__name__,
                extra={"event": "retention.retry"},
            )
            return []
        return [row.relpath for row in rows]

    def _remove_file(self, relpath: str) -> None:
        path = self.store.path_of(relpath)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.error(
                "cannot delete a file: %s",
                exc.strerror,
                extra={"event": "retention.unlink_failed"},
            )
            return
        # Remove the series folder, then the study folder, when this left them empty.
        folder = path.parent
        for _ in range(2):
            if folder == self.store.store_dir:
                break
            try:
                os.rmdir(folder)
            except OSError:  # not empty (or gone): stop here
                break
            folder = folder.parent
