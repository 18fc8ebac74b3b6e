"""Ingest: turn a received spool file into a durable, indexed instance, then answer.

Every ingress (DIMSE C-STORE now, STOW-RS later) hands a finished spool file to
:class:`Ingestor`. One committer thread takes whatever jobs are waiting (group commit):
for each it checks the data set is complete, parses the header, fsyncs and renames the
file into the store; then it records all of them in ONE index transaction and only then
resolves each job's future. The caller sends success only for a resolved ``None`` error
(DESIGN rule 1: acknowledge only what is durable).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from dicomgate.errors import (
    CommitUncertain,
    DicomgateError,
    DuplicateRejected,
    InvalidInstance,
    StoreError,
    error_type,
)
from dicomgate.index.db import Outcome, RecordResult, StoredInstance
from dicomgate.index.extract import InstanceRecord, extract_record
from dicomgate.observability.audit import FAILURE, SUCCESS, AuditEvent
from dicomgate.observability.logging import uid_hash
from dicomgate.queue.jobs import NewJob, NewTimer
from dicomgate.routing.matcher import MatchContext, Router
from dicomgate.store.part10 import parse_arrival
from dicomgate.store.scan import (
    ACCEPTED_TRANSFER_SYNTAXES,
    IMPLICIT_LE,
    scan_buffer,
    scan_dataset,
)

if TYPE_CHECKING:
    from dicomgate.config import DuplicatePolicy
    from dicomgate.index.db import Index
    from dicomgate.observability.audit import AuditTrail
    from dicomgate.store.filestore import ContentStore, SpoolFile, StoredFile

log = logging.getLogger("dicomgate.ingest")

_BATCH_MAX = 128


class _FlushFailed(Exception):
    """Files of a batch whose data flush failed (index position -> error)."""

    def __init__(self, errors: dict[int, DicomgateError]) -> None:
        super().__init__(f"{len(errors)} flushes failed")
        self.errors = errors


class InstanceMismatch(InvalidInstance):
    """The data set's SOP Class/Instance UID differs from the one the sender announced."""


class TransferSyntaxNotSupported(InvalidInstance):
    """A file meta naming a transfer syntax no ingress accepts (an unknown or private UID):
    its data set cannot be checked, decoded or sent on. The Storage SCP refuses such a
    syntax at negotiation; STOW-RS answers FailureReason 0xC122 (PS3.18 I.2)."""


class StudyMismatch(InstanceMismatch):
    """STOW-RS to a study URL: the instance belongs to another study."""


@dataclass
class IngestJob:
    """A fully received spool file waiting to become durable."""

    spool: SpoolFile
    data_offset: int  # byte offset of the data set (after the Part 10 header)
    transfer_syntax: str
    sop_class_uid: str  # as announced by the sender (e.g. the C-STORE command)
    sop_instance_uid: str
    calling_ae: str
    called_ae: str
    source_ip: str
    received_via: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[DicomgateError | None] = field(repr=False)
    # STOW-RS to /studies/{uid}: the instance must belong to that study (PS3.18 10.5.1).
    expected_study_uid: str | None = None
    # The syntax the sender announced, when ``transfer_syntax`` (the file meta's) differs:
    # a data set sent in the other VR encoding than its Little Endian syntax says
    # (store/scan.py stored_transfer_syntax).
    declared_transfer_syntax: str = ""
    # Set by the scan: an Implicit VR data set under an explicit syntax that could not be
    # relabelled (big endian, deflated, encapsulated); stored as received.
    mislabelled: bool = field(default=False, repr=False)
    # Set by the committer before the future resolves with success.
    stored: InstanceRecord | None = field(default=None, repr=False)
    # time.monotonic() when the instance was fully received: the ack latency starts here.
    submitted_at: float = field(default_factory=time.monotonic, repr=False)
    # STOW-RS: the authenticated user or API key name (the audit rows' actor).
    user: str = ""
    # Set by the committer: the job was answered (``_resolve``); its index transaction
    # committed (its file is named by a row, or was refused as a duplicate). The
    # committer's last-resort handler must leave such files alone.
    answered: bool = field(default=False, repr=False)
    committed: bool = field(default=False, repr=False)


class Ingestor:
    """Owns the committer thread. ``submit`` from the event loop, ``await`` the future."""

    def __init__(
        self,
        store: ContentStore,
        index: Index,
        policy: DuplicatePolicy,
        on_durable: Callable[[float], None] | None = None,
        router: Router | None = None,
        on_jobs: Callable[[list[str]], None] | None = None,
        sync_interval: float = 5.0,
        audit: AuditTrail | None = None,
    ) -> None:
        self.store = store
        self.index = index
        self.policy = policy
        self._on_durable = on_durable
        self.router = router
        self._on_jobs = on_jobs
        self._sync_interval = sync_interval
        self.audit = audit
        self._unsynced = False
        # instance.stored lines of answered instances, written once the committer has
        # nothing to do for _LINES_IDLE seconds, or _LINES_MAX are waiting (see _finish).
        self._lines: list[tuple[IngestJob, StoredInstance, RecordResult, float]] = []
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="dicomgate-flush")
        # The folder flushes of a batch run beside its data flushes, on a thread of their
        # own: on one thread they waited for the last data flush (~0.2 ms per CT instance).
        self._folder_flusher = ThreadPoolExecutor(1, thread_name_prefix="dicomgate-folder-flush")
        self._queue: queue.SimpleQueue[IngestJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dicomgate-committer", daemon=True)
        self.stored_count = 0
        # (monotonic start, jobs) of the batch being committed; one attribute, so that a
        # reader on another thread (/readyz) never pairs one batch's start with another's jobs
        self._busy: tuple[float, list[IngestJob]] | None = None
        # (SOP Instance UID, store path, file mtime) of instances whose commit's outcome is
        # unknown
        self._uncertain: list[tuple[str, str, float]] = []
        self._stopping = False

    def stalled_for(self, allowed: float, disk_rate: float) -> float:
        """Seconds the batch being committed has taken beyond ``allowed`` plus the time
        its files' flushes need at ``disk_rate`` bytes/s (0 when idle or in time): the
        index database or the store's disk not answering shows here first (``/readyz``),
        and a batch holding a 2 GB instance is not taken for a stall."""
        busy = self._busy
        if busy is None:
            return 0.0
        since, batch = busy
        size = sum(job.spool.size for job in batch)
        return max(0.0, time.monotonic() - since - allowed - size / disk_rate)

    @property
    def unsettled_since(self) -> float | None:
        """After :meth:`stop`: the modification time of the oldest store file whose commit's
        outcome is still unknown (the next start's recovery must look at it), else None."""
        return min((mtime for _, _, mtime in self._uncertain), default=None)

    @property
    def dead(self) -> bool:
        """The committer thread ended without being stopped (a bug): nothing is stored
        any more, and ``/readyz`` must say so."""
        return self._thread.ident is not None and not self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        self.store.start_spool_refiller()
        self._thread.start()

    def stop(self) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join()
        self._flusher.shutdown()
        self._folder_flusher.shutdown()
        self.store.stop_spool_refiller()

    async def ingest(self, job: IngestJob) -> DicomgateError | None:
        """Queue ``job``; returns ``None`` once durable and indexed, else the error."""
        self._queue.put(job)
        return await job.future

    def adopt(self, path: Path) -> bool:
        """Index a store file whose row was lost (recovery); True if it was indexed.

        Raises :class:`DicomgateError` when the file is not a complete instance.
        """
        relpath = path.relative_to(self.store.root).as_posix()
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            offset = _data_offset(fh)
            fh.seek(0)
            meta = _parse(fh)
            # Indexed already at this path: nothing to do, whatever the checks below would
            # say of it now (a rule of a later version must not quarantine an acknowledged,
            # indexed file, and leave its row naming a file that is gone).
            sop = meta.get("SOPInstanceUID") or meta.file_meta.get("MediaStorageSOPInstanceUID")
            if sop and any(
                row.get("relpath") == relpath for row in self.index.instances(str(sop).strip())
            ):
                return False
            size = os.fstat(fh.fileno()).st_size
            transfer_syntax = str(meta.file_meta.TransferSyntaxUID)
            scan_dataset(fh, offset, size, transfer_syntax)
            fh.seek(0)
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        record = extract_record(meta)
        sha256 = digest.hexdigest()
        rows = self.index.instances(record.sop_instance_uid)
        if any(row.get("relpath") == relpath for row in rows):
            return False
        if any(
            row.get("sha256") == sha256 and self.store.path_of(str(row["relpath"])).is_file()
            for row in rows
        ):
            # A byte-identical copy is indexed and on disk (the sender resent what was never
            # acknowledged): this one is a leftover, not an instance to keep twice.
            _drop_leftover(path, record.sop_instance_uid, "duplicate_removed", "copy")
            return False
        mtime = path.stat().st_mtime
        if self.policy == "overwrite" and any(  # DuplicatePolicy.OVERWRITE (a StrEnum)
            row.get("is_current") and _mtime(self.store.path_of(str(row["relpath"]))) > mtime
            for row in rows
        ):
            # A version this one's newer replacement was committed over: the crash came
            # between that commit and the removal of this file. Indexing it would put the
            # old version back as current (and remove the newer one's file).
            _drop_leftover(path, record.sop_instance_uid, "replaced_removed", "replaced version")
            return False
        item = StoredInstance(
            record=record,
            relpath=relpath,
            size=size,
            sha256=sha256,
            transfer_syntax_uid=transfer_syntax,
            calling_ae=str(meta.file_meta.get("SourceApplicationEntityTitle", "") or ""),
            called_ae="",
            source_ip="",
            received_via="recovery",
            received_at=datetime.fromtimestamp(mtime, UTC),
        )
        arrival = parse_arrival(meta.file_meta.get("PrivateInformation"))
        ctx = MatchContext(
            calling_ae=arrival.get("calling_ae", item.calling_ae),
            called_ae=arrival.get("called_ae", ""),
            source_ip=arrival.get("source_ip", ""),
            received_via=arrival.get("received_via", "recovery"),
        )
        job_list, timer_list = self._route(record, meta, ctx)
        (result,) = self.index.record([item], self.policy, jobs=[job_list], timers=[timer_list])
        if job_list and self._on_jobs is not None:
            self._on_jobs(sorted({j.destination for j in job_list}))
        if result.outcome is Outcome.REJECTED:
            self.store.remove(relpath)
            return False
        if result.obsolete_relpath and result.obsolete_relpath != relpath:
            self.store.remove(result.obsolete_relpath)
        log.info(
            "re-indexed",
            extra={"event": "recovery.indexed", "sop": uid_hash(record.sop_instance_uid)},
        )
        return True

    # -- committer thread ---------------------------------------------------------------

    def _barrier(self) -> None:
        """Make relaxed index commits durable and tell the run marker (see recovery.py)."""
        started = time.time()
        try:
            self.index.sync()
        except OSError as exc:
            log.error("index sync failed: %s", exc, extra={"event": "index.sync_failed"})
            return
        self._unsynced = False
        if self._on_durable is not None:
            self._on_durable(started)

    def _run(self) -> None:
        stopping = False
        last_sync = time.monotonic()
        while not stopping:
            try:
                first = self._queue.get(timeout=_LINES_IDLE if self._lines else self._sync_interval)
            except queue.Empty:
                if self._lines:
                    self._write_lines()
                    continue
                if self._unsynced:
                    self._barrier()
                last_sync = time.monotonic()
                continue
            if first is None:
                break
            if self._unsynced and time.monotonic() - last_sync >= self._sync_interval:
                self._barrier()
                last_sync = time.monotonic()
            batch = [first]
            while len(batch) < _BATCH_MAX:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._busy = (time.monotonic(), batch)
            try:
                self._unsynced = True
                self._commit_batch(batch)
            except Exception:  # a bug must fail the batch, never kill the committer
                log.exception("ingest batch failed", extra={"event": "ingest.internal_error"})
                self._fail_unanswered(batch)
            finally:
                self._busy = None
            if len(self._lines) >= _LINES_MAX:
                self._write_lines()
        self._write_lines()
        self._barrier()
        if self._uncertain:
            self._settle_uncertain()
        if self._uncertain:
            log.warning(
                "%d instances of commits with an unknown outcome stay in the store, for the"
                " next start's recovery",
                len(self._uncertain),
                extra={"event": "ingest.commit_unsettled", "instances": len(self._uncertain)},
            )

    @staticmethod
    def _fail_unanswered(batch: list[IngestJob]) -> None:
        """After an unexpected error in a batch: answer the jobs not answered yet. A job
        whose transaction committed keeps its file (a row names it; removing it lost an
        acknowledged instance when the removal of a replaced file failed after the
        commit); it is answered with a failure all the same (the sender sends again, a
        duplicate of what is stored), never with a success this handler cannot vouch
        for. The others' files go."""
        for job in batch:
            if job.answered:
                continue
            if job.committed:
                _resolve(job, StoreError("internal error after storing; send it again"))
                continue
            job.spool.discard()
            _resolve(job, StoreError("internal error while storing"))

    def _inspect(self, job: IngestJob) -> tuple[InstanceRecord, Dataset]:
        """Check the data set is complete and the instance the sender announced."""
        if job.transfer_syntax not in ACCEPTED_TRANSFER_SYNTAXES:
            raise TransferSyntaxNotSupported(f"transfer syntax {job.transfer_syntax} not supported")
        content = job.spool.content
        ds = None if content is None else scan_buffer(content, job.data_offset, job.transfer_syntax)
        if ds is None:  # too large to be kept in memory, or deflated
            job.spool.drain()  # its last writes may still be on the writer thread
            with open(job.spool.path, "rb") as fh:
                ds = scan_dataset(
                    fh,
                    job.data_offset,
                    job.spool.size,
                    job.transfer_syntax,
                    room=self.store.check_space,
                )
        if ds.original_encoding[0] and job.transfer_syntax != IMPLICIT_LE:
            job.mislabelled = True
        record = extract_record(ds)
        # PS3.4 B.2.3: the data set must be the instance the command announced.
        if record.sop_instance_uid != job.sop_instance_uid:
            raise InstanceMismatch("SOP Instance UID in the data set differs from the command's")
        if record.sop_class_uid != job.sop_class_uid:
            raise InstanceMismatch("SOP Class UID in the data set differs from the command's")
        if job.expected_study_uid is not None and record.study_uid != job.expected_study_uid:
            raise StudyMismatch("Study Instance UID differs from the one in the request")
        return record, ds

    def _refuse(self, job: IngestJob, exc: DicomgateError) -> None:
        job.spool.discard()
        _refused(job, exc)

    def _commit_batch(self, batch: list[IngestJob]) -> None:
        """Durable and indexed, or refused, for every job of the batch.

        Disk flushes run on two helper threads while this one works: each file's data flush
        starts at once, the folder flushes as soon as the renames are done; meanwhile this thread
        scans the headers, renames the files into the store and runs the index statements.
        The transaction commits only once every flush is done (``before_commit``), so a
        committed row never names a file whose data or name is not durable yet, on SQLite
        (relaxed commits, made durable by the next barrier) as on PostgreSQL (synchronous
        commits). A file renamed before its flush is never acknowledged before it, and a
        crash meanwhile leaves a store file without a row, which recovery checks
        (recovery.py). A flush that fails rolls the transaction back; the batch is then
        indexed again without that file, which is refused.
        """
        fsync = self.store.fsync
        if fsync and len(batch) > 1:
            # Every file's writes are started first (on the flush thread, ahead of the
            # flushes), so the disk takes them together rather than one flush at a time.
            self._flusher.submit(_start_writeback, batch)
        flushes = [self._flusher.submit(job.spool.flush) if fsync else None for job in batch]
        inspected: list[tuple[IngestJob, InstanceRecord, Dataset, Future[None] | None]] = []
        for job, flush in zip(batch, flushes, strict=True):
            try:
                record, ds = self._inspect(job)
            except Exception as exc:
                if not isinstance(exc, DicomgateError):
                    # A data set pydicom or our extraction chokes on (a corrupt deflate
                    # stream, a value no decoder expected): this instance is refused, not
                    # the batch, which holds other senders' instances. Only the error's
                    # type is said: its text may quote a value (patient data); the
                    # traceback is for a DEBUG log.
                    log.debug(
                        "data set not understood",
                        exc_info=True,
                        extra={"event": "ingest.unparsable", "sop": uid_hash(job.sop_instance_uid)},
                    )
                    exc = InvalidInstance(f"cannot parse data set ({error_type(exc)})")
                if flush is not None:
                    flush.exception()  # wait: the file must not be removed under the flush
                self._refuse(job, exc)
                continue
            inspected.append((job, record, ds, flush))
        prepared: list[tuple[IngestJob, StoredInstance]] = []
        pending: list[Future[None] | None] = []
        folders: list[Path] = []
        routing: list[tuple[list[NewJob], list[NewTimer]]] = []
        for job, record, ds, flush in inspected:
            try:
                stored, touched = self.store.place(
                    job.spool, record.study_uid, record.series_uid, record.sop_instance_uid
                )
            except DicomgateError as exc:
                if flush is not None:
                    flush.exception()
                self._refuse(job, exc)
                continue
            folders += touched
            prepared.append((job, self._stored_instance(job, record, stored)))
            pending.append(flush)
            routing.append(self._route(record, ds, job))
        if not prepared:
            return
        folder_sync = (
            self._folder_flusher.submit(self.store.sync_folders, folders) if fsync else None
        )
        while prepared:
            try:
                results, audited = self._record(prepared, routing, pending, folder_sync)
                break
            except _FlushFailed as failed:  # rolled back: refuse those, index the rest again
                for i, error in failed.errors.items():
                    job, item = prepared[i]
                    log.error(
                        "store flush failed: %s",
                        error,
                        extra={
                            "event": "ingest.flush_failed",
                            "sop": uid_hash(job.sop_instance_uid),
                        },
                    )
                    self._refuse_placed(job, item, error)
                keep = [i for i in range(len(prepared)) if i not in failed.errors]
                prepared = [prepared[i] for i in keep]
                routing = [routing[i] for i in keep]
                pending = [pending[i] for i in keep]
            except CommitUncertain as exc:
                # Refused (the sender sends again), but the files stay: if the server did
                # commit, its rows name them. Settled once the index answers again.
                log.error(
                    "index commit outcome unknown: %s",
                    exc,
                    extra={"event": "ingest.commit_uncertain", "instances": len(prepared)},
                )
                now = time.time()
                for job, item in prepared:
                    try:
                        mtime = (self.store.root / item.relpath).stat().st_mtime
                    except OSError:
                        mtime = now
                    self._uncertain.append((job.sop_instance_uid, item.relpath, mtime))
                    _refused(job, exc)
                return
            except DicomgateError as exc:
                log.error(
                    "store or index commit failed: %s",
                    exc,
                    extra={"event": "ingest.commit_failed", "instances": len(prepared)},
                )
                for job, item in prepared:
                    self._refuse_placed(job, item, exc)
                return
        if not prepared:  # every flush failed
            return
        for job, _ in prepared:
            job.committed = True
        self._finish(prepared, results)
        if self._uncertain:  # the index answers again
            self._settle_uncertain()
        if self.audit is not None:
            self.audit.stored(audited)
        if self._on_jobs is not None:
            destinations = sorted(
                {
                    j.destination
                    for (r, (js, _)) in zip(results, routing, strict=True)
                    if r.outcome is not Outcome.REJECTED
                    for j in js
                }
            )
            if destinations:
                self._on_jobs(destinations)

    def _settle_uncertain(self) -> None:
        """For each instance whose commit's outcome was unknown, ask the index (which has
        just answered): a row naming the file means the commit went through, and the file
        stays; no row, it did not, and the refused file goes, as for any other refusal.
        Before, the file was removed in both cases: a committed row then named a missing
        file, and a sender's resend could be taken as a duplicate of it."""
        waiting, self._uncertain = self._uncertain, []
        for i, (sop, relpath, _) in enumerate(waiting):
            try:
                rows = self.index.instances(sop)
            except DicomgateError:
                self._uncertain = waiting[i:]  # the index went again: at the next batch
                return
            committed = any(row.get("relpath") == relpath for row in rows)
            if not committed:
                self.store.remove(relpath)
            log.warning(
                "index commit outcome settled: %s",
                "it went through; the instance is stored" if committed else "rolled back",
                extra={
                    "event": "ingest.commit_settled",
                    "sop": uid_hash(sop),
                    "committed": committed,
                },
            )

    def _refuse_placed(self, job: IngestJob, item: StoredInstance, exc: DicomgateError) -> None:
        """A file already renamed into the store that will not be indexed: remove it."""
        self.store.remove(item.relpath)
        _refused(job, exc)

    def _record(
        self,
        prepared: list[tuple[IngestJob, StoredInstance]],
        routing: list[tuple[list[NewJob], list[NewTimer]]],
        flushes: list[Future[None] | None],
        folder_sync: Future[None] | None,
    ) -> tuple[list[RecordResult], list[AuditEvent]]:
        """One index transaction for the batch, committed once every flush is done."""
        audited: list[AuditEvent] = []
        audit_rows: Callable[[list[RecordResult]], list[dict[str, Any]]] | None = None
        if self.audit is not None:
            trail = self.audit

            def audit_rows(results: list[RecordResult]) -> list[dict[str, Any]]:
                audited[:] = _received_events(prepared, results)
                return trail.rows(audited)

        def durable() -> None:
            errors: dict[int, DicomgateError] = {}
            for i, flush in enumerate(flushes):
                if flush is not None and (exc := flush.exception()) is not None:
                    errors[i] = (
                        exc if isinstance(exc, DicomgateError) else StoreError(f"flush: {exc}")
                    )
            if folder_sync is not None:
                folder_sync.result()  # a StoreError fails the whole batch
            if errors:
                raise _FlushFailed(errors)

        results = self.index.record(
            [item for _, item in prepared],
            self.policy,
            jobs=[jobs for jobs, _ in routing],
            timers=[timers for _, timers in routing],
            audit=audit_rows,
            before_commit=durable,
        )
        return results, audited

    def _route(
        self, record: InstanceRecord, ds: Dataset, ctx: MatchContext | IngestJob
    ) -> tuple[list[NewJob], list[NewTimer]]:
        """Jobs and stable-trigger timers for one instance (rule 1: same transaction)."""
        if self.router is None or self.router.empty:
            return [], []
        if isinstance(ctx, IngestJob):
            ctx = MatchContext(ctx.calling_ae, ctx.called_ae, ctx.source_ip, ctx.received_via)
        try:
            decisions = self.router.match(ds, ctx)
        except Exception:  # the matcher must not raise; if it does, store and say so loudly
            log.exception(
                "routing failed; instance stored without deliveries",
                extra={"event": "route.error", "sop": uid_hash(record.sop_instance_uid)},
            )
            return [], []
        jobs: list[NewJob] = []
        timers: list[NewTimer] = []
        # One job per (destination, pipeline): two matching routes that send the instance
        # unchanged (or through the same steps) to one destination deliver it once, at the
        # higher of their priorities, under the first route's name.
        by_target: dict[tuple[str, str], int] = {}
        for d in decisions:
            if d.trigger == "instance":
                for dest in d.destinations:
                    seen = by_target.get((dest, d.pipeline_key))
                    if seen is None:
                        by_target[(dest, d.pipeline_key)] = len(jobs)
                        jobs.append(NewJob(dest, d.route, d.priority))
                    elif d.priority > jobs[seen].priority:
                        jobs[seen] = NewJob(dest, jobs[seen].route, d.priority)
            else:
                level = "series" if d.trigger == "series_stable" else "study"
                uid = record.series_uid if level == "series" else record.study_uid
                timers.append(
                    NewTimer(d.route, level, uid, d.stable_after, d.destinations, d.priority)
                )
        return jobs, timers

    @staticmethod
    def _stored_instance(
        job: IngestJob, record: InstanceRecord, stored: StoredFile
    ) -> StoredInstance:
        return StoredInstance(
            record=record,
            relpath=stored.relpath,
            size=stored.size,
            sha256=stored.sha256,
            transfer_syntax_uid=job.transfer_syntax,
            calling_ae=job.calling_ae,
            called_ae=job.called_ae,
            source_ip=job.source_ip,
            received_via=job.received_via,
            received_at=datetime.now(UTC),
        )

    def _finish(
        self, prepared: list[tuple[IngestJob, StoredInstance]], results: list[RecordResult]
    ) -> None:
        # Every sender is answered first, then the lines are logged: formatting and writing
        # a line per instance is not the sender's wait.
        lines: list[tuple[IngestJob, StoredInstance, RecordResult, float]] = []
        for (job, item), result in zip(prepared, results, strict=True):
            if result.outcome is Outcome.REJECTED:
                self.store.remove(item.relpath)
                _resolve(job, DuplicateRejected("SOP Instance UID already stored"))
            else:
                if result.obsolete_relpath and result.obsolete_relpath != item.relpath:
                    self.store.remove(result.obsolete_relpath)
                self.stored_count += 1
                job.stored = item.record
                _resolve(job, None)
            lines.append((job, item, result, time.monotonic() - job.submitted_at))
        self._lines += lines

    def _write_lines(self) -> None:
        """Log the waiting ``instance.stored`` lines. Written right after the answers, each
        line's output handed the interpreter's lock to the event loop and the committer then
        waited for it back, just when the event loop had an answer to send: with one small
        instance per STOW-RS request, the line cost ~8% of the rate (bench/README.md)."""
        lines, self._lines = self._lines, []
        for job, item, result, seconds in lines:
            sop = uid_hash(item.record.sop_instance_uid)
            if result.outcome is Outcome.REJECTED:
                log.warning(
                    "duplicate refused", extra={"event": "instance.duplicate_rejected", "sop": sop}
                )
                continue
            if job.declared_transfer_syntax or job.mislabelled:
                _log_mislabelled(job, sop)
            extra = {
                "event": "instance.stored",
                "sop": sop,
                "bytes": item.size,
                "calling_ae": job.calling_ae,
                "via": job.received_via,
                "replaced": result.outcome is Outcome.REPLACED,
                "seconds": round(seconds, 6),
            }
            if item.record.undecodable:  # names only, never the values (PHI)
                extra["undecodable"] = ",".join(item.record.undecodable)
            log.info("stored", extra=extra)


_LINES_IDLE = 0.002  # seconds without work before waiting instance.stored lines are logged
_LINES_MAX = 64


def _syntax_name(uid: str) -> str:
    return UID(uid).keyword or uid


def _log_mislabelled(job: IngestJob, sop: str) -> None:
    """One line for a stored instance whose data set is not in the VR encoding its
    transfer syntax says: relabelled (Implicit and Explicit VR Little Endian, either way
    round) or kept as received."""
    relabelled = bool(job.declared_transfer_syntax)
    fields = {
        "sop": sop,
        "calling_ae": job.calling_ae,
        "via": job.received_via,
        "declared": _syntax_name(job.declared_transfer_syntax or job.transfer_syntax),
    }
    if relabelled:
        stored = _syntax_name(job.transfer_syntax)
        log.info(
            "data set encoded in another VR encoding than its transfer syntax says: stored"
            " as %s (file meta relabelled, data set as received)",
            stored,
            extra={"event": "instance.relabelled", **fields, "stored": stored},
        )
    else:
        log.warning(
            "data set in Implicit VR under an explicit transfer syntax that has no Implicit VR"
            " form: stored as received, under the syntax the sender announced",
            extra={"event": "instance.mislabelled", **fields},
        )


def _received_events(
    prepared: list[tuple[IngestJob, StoredInstance]], results: list[RecordResult]
) -> list[AuditEvent]:
    """``instance.received`` audit events of a committed batch: one per study, sender and
    outcome (a duplicate refused under ``reject`` is a failure), with the PHI the log lacks."""
    groups: dict[tuple[str, ...], tuple[InstanceRecord, dict[str, Any]]] = {}
    for (job, item), result in zip(prepared, results, strict=True):
        rec = item.record
        outcome = FAILURE if result.outcome is Outcome.REJECTED else SUCCESS
        key = (
            rec.study_uid,
            job.calling_ae or job.user,
            job.called_ae,
            job.source_ip,
            job.received_via,
            outcome,
            str(rec.patient.get("patient_id") or ""),
        )
        _, detail = groups.setdefault(
            key,
            (
                rec,
                {
                    "via": job.received_via,
                    "called_ae": job.called_ae,
                    "instances": 0,
                    "bytes": 0,
                    "sop_classes": [],
                    "sop_instance_uids": [],
                },
            ),
        )
        detail["instances"] += 1
        detail["bytes"] += item.size
        if rec.sop_class_uid not in detail["sop_classes"]:
            detail["sop_classes"].append(rec.sop_class_uid)
        detail["sop_instance_uids"].append(rec.sop_instance_uid)
        if result.outcome is Outcome.REJECTED:
            detail["reason"] = "duplicate SOP Instance UID refused (storage.duplicates: reject)"
    return [
        AuditEvent(
            event="instance.received",
            outcome=key[5],
            actor=key[1],
            source_ip=key[3],
            object=rec.study_uid,
            study_uid=rec.study_uid,
            patient_id=rec.patient.get("patient_id"),
            patient_name=rec.patient.get("patient_name"),
            detail=detail,
        )
        for key, (rec, detail) in groups.items()
    ]


def _parse(fh: BinaryIO) -> Dataset:
    """pydicom's full header parse (deflated data sets, recovery)."""
    fh.seek(0)
    try:
        return dcmread(fh, stop_before_pixels=True, defer_size=65536)
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError) as exc:
        raise InvalidInstance(f"cannot parse data set: {exc}") from exc
    except zlib.error:
        raise InvalidInstance("cannot parse data set: the deflated data does not inflate") from None


def _data_offset(fh: BinaryIO) -> int:
    """Offset of the data set in a Part 10 file we wrote (preamble, DICM, group length)."""
    head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise InvalidInstance("not a Part 10 file with a File Meta Information Group Length")
    return 144 + int.from_bytes(head[140:144], "little")


def _start_writeback(batch: list[IngestJob]) -> None:
    for job in batch:
        job.spool.start_writeback()


def _set(future: asyncio.Future[DicomgateError | None], value: DicomgateError | None) -> None:
    if not future.done():  # the association may have gone away meanwhile
        future.set_result(value)


def _refused(job: IngestJob, exc: DicomgateError) -> None:
    """Answer ``job`` with its refusal, and log it as ``instance.refused`` (counted in
    ``dicomgate_instances_refused_total`` and audited), whatever refused it: the instance
    itself, its flush, or the index (an outage: 0xA700, counted per instance since
    2026-12-07)."""
    _resolve(job, exc)
    log.warning(
        "instance refused: %s",
        exc,
        extra={
            "event": "instance.refused",
            "sop": uid_hash(job.sop_instance_uid),
            "calling_ae": job.calling_ae,
            "reason": type(exc).__name__,
            "peer": job.source_ip,
            "user": job.user,
        },
    )


def _drop_leftover(path: Path, sop_instance_uid: str, event: str, what: str) -> None:
    """Recovery: remove a store file no row should name (``recovery.<event>``)."""
    path.unlink(missing_ok=True)
    log.info(
        "removed an unindexed %s of an indexed instance",
        what,
        extra={"event": f"recovery.{event}", "sop": uid_hash(sop_instance_uid)},
    )


def _mtime(path: Path) -> float:
    """``path``'s modification time, or -inf when it is gone."""
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")


def _resolve(job: IngestJob, value: DicomgateError | None) -> None:
    job.answered = True
    job.loop.call_soon_threadsafe(_set, job.future, value)
