"""Delivery workers: lease jobs per destination, send them, record the outcome.

One asyncio task per (destination, slot), ``sender.concurrency`` slots per destination, so a
slow destination never blocks another's queue. Database calls run in threads (the queue is
synchronous SQLAlchemy). Idle workers sleep until new jobs are announced (:meth:`notify`,
called after each ingest commit, wakes one of them) or ``queue.poll_interval`` passes; a
woken worker waits ``queue.batch_wait`` (50 ms) for more jobs before leasing, and one whose
leases empty the queue leases at most once per ``batch_wait``, so instances arriving one by
one still travel in batches instead of a worker chasing the stream one instance a turn
(see :meth:`Dispatcher._work`). A backlog is leased without waiting.

Traffic control per destination (queue/traffic.py, keys in egress/models.py): outside its
``schedule`` windows a destination's workers lease nothing and jobs wait; its
``rate_limit`` is booked after each lease (the next lease waits for the booking), so the
long-run rate is exact; its circuit breaker stops leasing after ``breaker.failures``
consecutive whole-batch failures (connection refused, association rejected, HTTP 5xx for
everything): jobs then wait untouched, without burning their retry budget, and one job
probes the destination after ``breaker.cooldown``. A paused destination
(:meth:`Dispatcher.pause`, ``POST /api/destinations/{name}/pause``) leases nothing either,
like a closed schedule, until it is resumed; the pause lives in this process only (a
restart resumes). Delivery is at-least-once (DESIGN rule 3): a job is marked done only
after the destination acknowledged it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from dicomgate.egress.base import Delivery, Outcome, Sender
from dicomgate.errors import IndexUnavailable
from dicomgate.observability.audit import FAILURE, SUCCESS, AuditEvent
from dicomgate.observability.logging import Outage, uid_hash
from dicomgate.processing.base import ProcessingError
from dicomgate.processing.pipeline import Pipeline
from dicomgate.queue.jobs import Job, JobQueue, JobState
from dicomgate.queue.traffic import Breaker, RateLimiter, Schedule
from dicomgate.store.filestore import ContentStore

if TYPE_CHECKING:
    from dicomgate.egress.models import DestinationControls
    from dicomgate.observability.audit import AuditTrail

log = logging.getLogger("dicomgate.delivery")
_T = TypeVar("_T")
# Waits between attempts to record delivery results while the database is unavailable.
_RECORD_RETRY_FIRST = 0.5
_RECORD_RETRY_MAX = 5.0


@dataclass
class _Destination:
    name: str
    sender: Sender
    breaker: Breaker
    limiter: RateLimiter
    schedule: Schedule
    idle: deque[asyncio.Event] = field(default_factory=deque)  # sleeping workers
    signalled: bool = False  # jobs were announced while no worker was asleep
    collectors: set[int] = field(default_factory=set)  # slots taking a stream's new jobs
    # Jobs wait in numbers (a full lease, a resume, fired stable timers): a woken worker
    # leases at once instead of letting a batch gather. Cleared by a lease that empties
    # the queue.
    backlog: bool = False
    delivered: int = 0
    failed: int = 0
    closed_logged: bool = False
    paused: bool = False  # by an administrator: lease nothing until resumed
    resumed: asyncio.Event = field(default_factory=asyncio.Event)  # set when not paused
    held_until: float = 0.0  # monotonic: the destination's Retry-After; lease nothing before


def _controls(name: str, sender: Sender, model: DestinationControls | None) -> _Destination:
    if model is None:  # defaults: no rate limit, always open, breaker 5 failures / 30 s
        return _Destination(name, sender, Breaker(5, 30.0), RateLimiter(None, None), Schedule([]))
    rate = model.rate_limit
    mbps = rate.megabytes_per_second
    return _Destination(
        name,
        sender,
        Breaker(model.breaker.failures, model.breaker.cooldown),
        RateLimiter(rate.instances_per_second, None if mbps is None else mbps * 1e6),
        model.traffic_schedule(),
    )


def _per_job(outcomes: list[Outcome]) -> dict[int, Outcome]:
    """One outcome per job: a job split into several instances is delivered only when all
    of them are; it is retried if any failure is retryable; the errors are joined."""
    grouped: dict[int, list[Outcome]] = {}
    for outcome in outcomes:
        grouped.setdefault(outcome.job_id, []).append(outcome)
    merged: dict[int, Outcome] = {}
    for job_id, items in grouped.items():
        if len(items) == 1:
            merged[job_id] = items[0]
            continue
        failed = [o for o in items if not o.delivered]
        if not failed:
            warnings = "; ".join(o.warning for o in items if o.warning)
            merged[job_id] = Outcome(job_id, True, warning=warnings)
            continue
        errors = "; ".join(dict.fromkeys(o.error for o in failed))
        merged[job_id] = Outcome(
            job_id,
            False,
            any(o.retryable for o in failed),
            f"{len(failed)} of {len(items)} instances failed: {errors}",
            retry_after=max(o.retry_after for o in failed),
        )
    return merged


def _wake_one(dest: _Destination, *, backlog: bool = False) -> None:
    """New jobs: wake one sleeping worker (the others would find nothing to lease).
    ``backlog``: a lease came back full; the woken worker leases at once."""
    if backlog:
        dest.backlog = True
    elif dest.collectors:
        # A worker leases within batch_wait and takes them. Should it stop collecting
        # instead (its lease came back empty), the next sleep returns at once.
        dest.signalled = True
        return
    while dest.idle:
        event = dest.idle.popleft()
        if not event.is_set():
            event.set()
            return
    dest.signalled = True


def _wake_all(dest: _Destination) -> None:
    dest.backlog = True  # resumed, stable timers fired, or stopping: lease at once
    for event in list(dest.idle):
        event.set()
    dest.idle.clear()
    dest.signalled = True


def _delivery_events(
    destination: str,
    jobs: list[Job],
    done: list[int],
    dead: set[int],
    by_id: Mapping[int, Outcome],
) -> list[AuditEvent]:
    """Audit events of one delivery attempt: one per study and outcome (``delivery.done``,
    ``delivery.failed`` = will be retried, ``delivery.dead_lettered``)."""
    delivered = set(done)
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for job in jobs:
        if job.id in delivered:
            kind = "delivery.done"
        elif job.id in dead:
            kind = "delivery.dead_lettered"
        else:
            kind = "delivery.failed"
        detail = groups.setdefault(
            (kind, job.study_instance_uid),
            {"instances": 0, "routes": [], "sop_instance_uids": [], "jobs": []},
        )
        detail["instances"] += 1
        detail["jobs"].append(job.id)
        detail["sop_instance_uids"].append(job.sop_instance_uid)
        if job.route not in detail["routes"]:
            detail["routes"].append(job.route)
        outcome = by_id.get(job.id)
        if kind != "delivery.done" and outcome is not None and outcome.error:
            detail["error"] = outcome.error
    return [
        AuditEvent(
            event=kind,
            outcome=SUCCESS if kind == "delivery.done" else FAILURE,
            actor=destination,
            object=destination,
            study_uid=study or None,
            detail=detail,
        )
        for (kind, study), detail in groups.items()
    ]


class Dispatcher:
    """Runs the delivery workers of every configured destination."""

    def __init__(
        self,
        queue: JobQueue,
        senders: dict[str, Sender],
        store: ContentStore,
        *,
        poll_interval: float = 0.5,
        timer_interval: float = 1.0,
        batch_wait: float = 0.05,
        controls: Mapping[str, DestinationControls] | None = None,
        pipelines: Mapping[str, Pipeline] | None = None,
        work_dir: Path | None = None,
        audit: AuditTrail | None = None,
        node: str | None = None,
    ) -> None:
        self.queue = queue
        self.store = store
        self.poll_interval = poll_interval
        self.batch_wait = batch_wait
        self.timer_interval = timer_interval
        # Leases name the node (``leased_by``); the pid tells restarts apart.
        self.node = node or socket.gethostname()
        self.worker_id = f"{self.node}:{os.getpid()}"
        controls = controls or {}
        self.pipelines: Mapping[str, Pipeline] = pipelines or {}
        self.work_dir = work_dir or store.root / "egress"
        self.audit = audit
        self._destinations = {
            name: _controls(name, sender, controls.get(name)) for name, sender in senders.items()
        }
        # One log line when a loop starts failing (the database down), then reminders.
        self._leasing = {
            name: Outage(
                log,
                "leasing jobs",
                "delivery.lease_error",
                "delivery.lease_recovered",
                extra={"destination": name},
            )
            for name in self._destinations
        }
        self._timer_outage = Outage(
            log, "stable timers", "delivery.timer_error", "delivery.timer_recovered"
        )
        self._recording = Outage(
            log,
            "recording delivery results (kept until the database answers)",
            "delivery.record_waiting",
            "delivery.record_resumed",
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_event = asyncio.Event()  # set by stop(): ends every timed wait at once
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Processed copies of a previous run's in-flight jobs: made again when retried.
        shutil.rmtree(self.work_dir, ignore_errors=True)
        await self._warn_orphans()
        await self._expire_own_leases()
        for dest in self._destinations.values():
            for slot in range(max(1, dest.sender.concurrency)):
                task = self._worker(dest, slot)
                self._tasks.append(asyncio.create_task(task, name=f"deliver-{dest.name}-{slot}"))
        self._tasks.append(asyncio.create_task(self._timers(), name="stable-timers"))
        log.info(
            "delivery started for %d destinations",
            len(self._destinations),
            extra={"event": "delivery.started"},
        )

    async def stop(self, grace: float = 10.0) -> None:
        """Let in-flight sends finish within ``grace``, then cancel; close the senders."""
        self._stopping = True
        self._stop_event.set()
        for dest in self._destinations.values():
            _wake_all(dest)
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for dest in self._destinations.values():
            with contextlib.suppress(Exception):
                await dest.sender.close()

    def notify(self, destinations: Sequence[str]) -> None:
        """Thread-safe: new jobs exist for these destinations (called after a commit)."""
        loop = self._loop
        if loop is None:
            return
        for name in set(destinations):
            dest = self._destinations.get(name)
            if dest is not None:
                loop.call_soon_threadsafe(_wake_one, dest)

    def pause(self, name: str, *, by: Mapping[str, str] | None = None) -> bool:
        """Stop leasing for destination ``name`` (sends under way finish); False: unknown.
        ``by``: who asked (``actor``, ``source_ip``), for the audit row."""
        dest = self._destinations.get(name)
        if dest is None:
            return False
        if not dest.paused:
            dest.paused = True
            dest.resumed.clear()
            log.info(
                "destination paused",
                extra={"event": "delivery.paused", "destination": name, **(by or {})},
            )
        return True

    def resume(self, name: str, *, by: Mapping[str, str] | None = None) -> bool:
        """Lease again for destination ``name``; False: unknown. ``by`` as for pause."""
        dest = self._destinations.get(name)
        if dest is None:
            return False
        if dest.paused:
            dest.paused = False
            dest.resumed.set()
            _wake_all(dest)
            log.info(
                "destination resumed",
                extra={"event": "delivery.resumed", "destination": name, **(by or {})},
            )
        return True

    def states(self) -> dict[str, dict[str, Any]]:
        """Per destination: paused, breaker, schedule and the delivered/failed counters."""
        return {
            name: {
                "paused": d.paused,
                "breaker": "open" if d.breaker.is_open else "closed",
                "schedule": "open" if d.schedule.is_open() else "closed",
                "delivered": d.delivered,
                "failed": d.failed,
            }
            for name, d in self._destinations.items()
        }

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "delivered": d.delivered,
                "failed": d.failed,
                "breaker_open": int(d.breaker.is_open),
                "schedule_open": int(d.schedule.is_open()),
                "paused": int(d.paused),
            }
            for name, d in self._destinations.items()
        }

    async def _expire_own_leases(self) -> None:
        """Jobs this node's previous process held when it ended are leased again at once
        (:meth:`JobQueue.expire_leases_of`) instead of after ``queue.lease_seconds``."""
        try:
            expired = await asyncio.to_thread(
                self.queue.expire_leases_of, self.node, self.worker_id
            )
        except Exception as exc:  # they expire on their own
            log.warning(
                "cannot release the previous run's leases: %s",
                exc,
                extra={"event": "delivery.lease_error"},
            )
            return
        if expired:
            log.info(
                "%d jobs leased by this node's previous run are due again",
                expired,
                extra={"event": "delivery.leases_released", "jobs": expired},
            )

    async def _warn_orphans(self) -> None:
        """Jobs of destinations no longer in the config wait; say so at every start."""
        try:
            counts = await asyncio.to_thread(self.queue.counts)
        except Exception:
            log.exception("queue count failed", extra={"event": "delivery.lease_error"})
            return
        orphans: dict[str, int] = {}
        for (destination, state), n in counts.items():
            if destination not in self._destinations and state != JobState.DONE.value:
                orphans[destination] = orphans.get(destination, 0) + n
        for destination, n in sorted(orphans.items()):
            log.warning(
                "%d unfinished jobs for destination %r, which is not in the config: they"
                " wait until it is configured again, or are purged (dicomgate queue purge)",
                n,
                destination,
                extra={"event": "queue.orphaned", "destination": destination, "jobs": n},
            )

    async def _timers(self) -> None:
        while not self._stopping:
            try:
                created = await asyncio.to_thread(self.queue.fire_due_timers)
            except Exception as exc:
                self._timer_outage.failed(exc)
                created = 0
            else:
                self._timer_outage.ok()
            if created:
                log.info(
                    "stable trigger fired: %d jobs",
                    created,
                    extra={"event": "route.stable_fired", "jobs": created},
                )
                for dest in self._destinations.values():
                    _wake_all(dest)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), self.timer_interval)

    async def _worker(self, dest: _Destination, slot: int) -> None:
        """Run one worker's loop until the stop; an error that escapes it (a bug) is logged
        and the loop starts again: a worker that ended would stop its destination's
        deliveries for good, silently, until a restart."""
        try:
            while not self._stopping:
                try:
                    await self._work(dest, slot)
                except Exception:
                    log.exception(
                        "delivery worker failed; it starts again",
                        extra={"event": "delivery.worker_error", "destination": dest.name},
                    )
                    dest.collectors.discard(slot)
                    await self._sleep_unwoken(self.poll_interval * 4)
        finally:
            dest.collectors.discard(slot)

    async def _record(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Record what a delivery did (done, failed, postponed) in the queue.

        The send happened: while the database is unavailable the result is kept here and
        written again and again until it answers, instead of being lost with the worker (the
        jobs would then stay leased until their lease expired and be sent a second time).
        A stop cancels the wait after its grace; the jobs are then sent again after the
        restart (at-least-once, DESIGN rule 3).
        """
        wait = _RECORD_RETRY_FIRST
        while True:
            try:
                result = await asyncio.to_thread(call, *args, **kwargs)
            except IndexUnavailable as exc:
                self._recording.failed(exc)
                await asyncio.sleep(wait)
                wait = min(wait * 2, _RECORD_RETRY_MAX)
                continue
            self._recording.ok()
            return result

    async def _work(self, dest: _Destination, slot: int) -> None:
        """One worker's loop. A steady stream of new jobs is taken by one worker, the
        collector: after a lease that emptied the queue it delivers, then leases what
        arrived meanwhile in one batch, ``batch_wait`` after its previous lease (at once if
        the send took longer); announcements wake no other worker meanwhile. Chasing the
        stream instead (the next lease right after each send, or a second worker woken for
        it) cost a lease and a completion transaction per one or two instances: 629 turns
        for 1000 instances from storescu. A full lease (a backlog) wakes a peer, and the
        workers share it."""
        rest = False  # a short lease while another worker collects: sleep, don't chase
        while not self._stopping:
            if dest.paused:  # jobs wait, no attempt spent; resume() or stop() wakes us
                dest.collectors.discard(slot)
                rest = False  # once resumed, lease at once: the jobs piled up meanwhile
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(dest.resumed.wait(), 0.5)
                continue
            closed_for = dest.schedule.seconds_until_open()
            if closed_for > 0:
                dest.collectors.discard(slot)
                if not dest.closed_logged:
                    dest.closed_logged = True
                    log.info(
                        "outside the schedule; deliveries resume in %.0f s",
                        closed_for,
                        extra={"event": "delivery.schedule_closed", "destination": dest.name},
                    )
                await self._sleep_unwoken(min(closed_for, 60.0))  # new jobs wait for it
                continue
            if dest.closed_logged:
                dest.closed_logged = False
                log.info(
                    "schedule window open",
                    extra={"event": "delivery.schedule_open", "destination": dest.name},
                )
            held_for = dest.held_until - time.monotonic()
            if held_for > 0:  # the peer asked us to wait (Retry-After): no request before
                dest.collectors.discard(slot)
                await self._sleep_unwoken(held_for)
                continue
            allowed = dest.breaker.allow()
            if allowed == 0:
                dest.collectors.discard(slot)
                # New jobs must not wake an open breaker into a busy loop.
                await self._sleep_unwoken(dest.breaker.cooldown / 10)
                continue
            ready_in = dest.limiter.ready_in()
            if ready_in > 0:
                if allowed == 1:
                    dest.breaker.release_probe()
                await self._sleep_unwoken(ready_in)
                continue
            limit = dest.limiter.batch_size(max(1, dest.sender.max_batch))
            if allowed is not None:
                limit = allowed
            if rest:
                rest = False
                if allowed == 1:
                    dest.breaker.release_probe()  # leases after the sleep, if any, probe
                woken = await self._sleep(dest, self.poll_interval, unless_collected=True)
                if woken and not dest.backlog and not dest.paused:
                    # (Paused: jobs announced meanwhile wait; all workers lease at resume.)
                    await self._collect(dest, slot, limit)
                continue
            leased_at = time.monotonic()
            try:
                jobs = await asyncio.to_thread(self.queue.lease, dest.name, limit, self.worker_id)
            except Exception as exc:
                dest.collectors.discard(slot)
                self._leasing[dest.name].failed(exc)
                if allowed == 1:
                    dest.breaker.release_probe()
                await self._sleep(dest, self.poll_interval * 4)
                continue
            self._leasing[dest.name].ok()
            if not jobs:
                if allowed == 1:
                    dest.breaker.release_probe()
                dest.collectors.discard(slot)
                dest.backlog = False
                rest = True
                continue
            wait = dest.limiter.book(len(jobs), sum(job.size for job in jobs))
            if wait > self.queue.config.lease_seconds / 2:
                # Another slot booked a large send meanwhile: give the jobs back rather than
                # hold them past their lease.
                await self._record(self.queue.postpone, [j.id for j in jobs], wait)
                continue
            if wait > 0:
                await self._sleep_unwoken(wait)
            if len(jobs) == limit:
                dest.collectors.discard(slot)
                if limit > 1:
                    _wake_one(dest, backlog=True)  # a sleeping peer helps with the rest
                await self._deliver(dest, jobs)
                continue
            dest.backlog = False  # this lease emptied the queue
            if dest.collectors - {slot}:
                dest.collectors.discard(slot)  # another worker takes the stream
                await self._deliver(dest, jobs)
                rest = True
            else:
                dest.collectors.add(slot)
                await self._deliver(dest, jobs)
                # One lease per batch_wait at most: after a send that took longer, what
                # arrived meanwhile is leased at once.
                await self._sleep_unwoken(self.batch_wait - (time.monotonic() - leased_at))

    async def _collect(self, dest: _Destination, slot: int, limit: int) -> None:
        """Woken by new jobs: let a batch gather before leasing (fewer transactions per
        instance, fuller STOW-RS requests); a backlog never waits here."""
        if limit > 1 and self.batch_wait > 0:
            dest.collectors.add(slot)
            await self._sleep_unwoken(self.batch_wait)

    def _hold(self, dest: _Destination, retry_after: float) -> None:
        """Lease nothing for the destination during the peer's Retry-After (a cloud
        service's 429 when over quota, a 503 while it cannot store), up to the retry
        policy's ``max``: its failed jobs wait as long (:meth:`JobQueue.fail`)."""
        seconds = min(retry_after, self.queue.config.retry.max)
        if seconds <= 0:
            return
        dest.held_until = max(dest.held_until, time.monotonic() + seconds)
        log.warning(
            "destination asked us to wait; no request for %.0f s",
            seconds,
            extra={"event": "delivery.held", "destination": dest.name, "seconds": seconds},
        )

    async def _sleep_unwoken(self, seconds: float) -> None:
        """Sleep that only a stop cuts short (new jobs do not shorten a rate-limit wait)."""
        end = time.monotonic() + seconds
        while not self._stopping and (left := end - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), left)

    async def _sleep(
        self, dest: _Destination, seconds: float, *, unless_collected: bool = False
    ) -> bool:
        """Sleep until new jobs are announced (True) or ``seconds`` pass (False).

        Each announcement wakes one sleeping worker of the destination; one made while none
        sleeps (they are all leasing or sending) makes the next sleep return at once. With
        ``unless_collected``, neither that nor the timeout ends the sleep while another
        worker collects the destination's jobs (it leases them within ``batch_wait``).
        """
        while True:
            if self._stopping:
                return True
            if dest.signalled and not (unless_collected and dest.collectors):
                dest.signalled = False
                return True
            event = asyncio.Event()
            dest.idle.append(event)
            try:
                await asyncio.wait_for(event.wait(), seconds)
                return True
            except TimeoutError:
                if not (unless_collected and dest.collectors):
                    return False
            finally:
                with contextlib.suppress(ValueError):
                    dest.idle.remove(event)

    async def _prepare(self, job: Job) -> list[Delivery] | Outcome:
        """The deliveries of one job: the stored file itself, or the outputs of its route's
        pipeline written under ``work_dir`` (an Outcome when processing refused it)."""
        original = Delivery(
            job_id=job.id,
            path=self.store.path_of(job.relpath),
            sop_class_uid=job.sop_class_uid,
            sop_instance_uid=job.sop_instance_uid,
            transfer_syntax_uid=job.transfer_syntax_uid,
            study_instance_uid=job.study_instance_uid,
            series_instance_uid=job.series_instance_uid,
            size=job.size,
            route=job.route,
        )
        pipeline = self.pipelines.get(job.route)
        if not pipeline:
            return [original]
        out_dir = self.work_dir / str(job.id)
        try:
            outputs = await asyncio.to_thread(pipeline.process_file, original.path, out_dir)
        except ProcessingError as exc:
            log.error(
                "processing refused the instance: %s",
                exc,
                extra={
                    "event": "processing.refused",
                    "route": job.route,
                    "job": job.id,
                    "reason": exc.reason,
                    "sop": uid_hash(job.sop_instance_uid),
                },
            )
            return Outcome(job.id, False, False, str(exc))
        except Exception as exc:  # a step bug: keep the job, retry later, say so loudly
            log.exception(
                "processing failed",
                extra={"event": "processing.error", "route": job.route, "job": job.id},
            )
            return Outcome(job.id, False, True, f"processing error: {type(exc).__name__}")
        return [
            Delivery(
                job_id=job.id,
                path=out.path,
                sop_class_uid=out.sop_class_uid,
                sop_instance_uid=out.sop_instance_uid,
                transfer_syntax_uid=out.transfer_syntax_uid,
                study_instance_uid=out.study_instance_uid,
                series_instance_uid=out.series_instance_uid,
                size=out.size,
                route=job.route,
            )
            for out in outputs
        ]

    async def _send(self, dest: _Destination, batch: list[Delivery]) -> list[Outcome]:
        """The sender's outcomes of ``batch``. A sender that raises (a bug, or an instance it
        cannot cope with) must not lose the jobs, nor let one instance hold back the
        others for ever (every retry of the batch would raise again, and open the circuit
        breaker): the batch is sent again one instance at a time, and only those that raise
        alone get a retryable internal-error outcome."""
        if not batch:
            return []
        try:
            return await dest.sender.send(batch)
        except Exception as exc:
            log.exception(
                "sender failed", extra={"event": "delivery.sender_error", "destination": dest.name}
            )
            if len(batch) == 1:
                return [
                    Outcome(batch[0].job_id, False, True, f"internal error: {type(exc).__name__}")
                ]
        outcomes: list[Outcome] = []
        for delivery in batch:
            outcomes += await self._send(dest, [delivery])
        return outcomes

    async def _deliver(self, dest: _Destination, jobs: list[Job]) -> None:
        batch: list[Delivery] = []
        refused: list[Outcome] = []
        for job in jobs:
            prepared = await self._prepare(job)
            if isinstance(prepared, Outcome):
                refused.append(prepared)
            else:
                batch += prepared
        started = time.monotonic()
        try:
            outcomes = await self._send(dest, batch)
        finally:
            for job in jobs:
                if self.pipelines.get(job.route):
                    shutil.rmtree(self.work_dir / str(job.id), ignore_errors=True)
        # The send's own time: recording the result can wait for the database (_record).
        elapsed = time.monotonic() - started
        by_id = _per_job(outcomes + refused)
        delivered = [j for j in jobs if by_id.get(j.id) is not None and by_id[j.id].delivered]
        done = [j.id for j in delivered]
        if delivered:
            await self._record(self.queue.complete, delivered)
        failed = [j for j in jobs if j.id not in done]
        self._hold(dest, max((o.retry_after for o in outcomes), default=0.0))
        dead: set[int] = set()
        for job in failed:
            outcome = by_id.get(job.id) or Outcome(job.id, False, True, "no outcome from sender")
            state = await self._record(
                self.queue.fail,
                job,
                outcome.error,
                retryable=outcome.retryable,
                wait=outcome.retry_after,
            )
            if state is JobState.DEAD:
                dead.add(job.id)
            level = logging.ERROR if state is JobState.DEAD else logging.WARNING
            log.log(
                level,
                "delivery failed: %s",
                outcome.error,
                extra={
                    "event": "delivery.dead_lettered"
                    if state is JobState.DEAD
                    else "delivery.failed",
                    "destination": dest.name,
                    "job": job.id,
                    "attempt": job.attempts,  # counted at lease: this one included
                    "sop": uid_hash(job.sop_instance_uid),
                },
            )
        for outcome in outcomes:
            if outcome.delivered and outcome.warning:
                log.warning(
                    "delivered with warning: %s",
                    outcome.warning,
                    extra={
                        "event": "delivery.warning",
                        "destination": dest.name,
                        "job": outcome.job_id,
                    },
                )
        dest.delivered += len(done)
        dest.failed += len(failed)
        if self.audit is not None:
            self.audit.record(*_delivery_events(dest.name, jobs, done, dead, by_id))
        if done:
            log.info(
                "delivered %d in %.0f ms",
                len(done),
                elapsed * 1000,
                extra={
                    "event": "delivery.done",
                    "destination": dest.name,
                    "instances": len(done),
                    "seconds": round(elapsed, 6),
                },
            )
        if not batch:  # every job was refused by processing: says nothing of the destination
            return
        sent = {d.job_id for d in batch}
        whole_batch_failed = not done and all(
            (by_id.get(j) is None or by_id[j].retryable) for j in sent
        )
        if dest.breaker.record(not whole_batch_failed):
            log.error(
                "destination unreachable, pausing deliveries for %.0f s",
                dest.breaker.cooldown,
                extra={"event": "delivery.circuit_open", "destination": dest.name},
            )
