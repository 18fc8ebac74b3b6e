"""DIMSE destination: C-STORE SCU (PS3.4 B) over pooled, reused associations.

Each destination keeps up to ``max_associations`` associations. A ``send()`` call takes
an idle association whose presentation contexts cover its batch, or opens one, sends the
batch over it and gives it back; associations idle for ``idle_timeout`` are released.
pynetdicom is blocking: every association is used from a thread of the sender's own
executor, which has ``max_associations`` threads.

Presentation contexts are built with :func:`dicomgate.dimse.scu.plan_associations` from
what is being sent: each (SOP class, transfer syntax) exactly, plus a fallback context
per SOP class proposing Explicit and Implicit VR Little Endian. A new association also
proposes the contexts of recent batches (up to the 128 allowed, PS3.8 9.3.2.2), so that a
mixed stream of instances keeps reusing it. A file sent in its own syntax is streamed
from disk (pynetdicom's chunked send, design rule 2). When the peer refused the file's
own syntax it is decompressed or re-encoded in memory with pydicom's codecs and sent in
the fallback syntax: the one case where a whole instance is read into memory.

Per-instance statuses (PS3.4 B.2.3): success; B000/B006/B007 delivered with a warning;
failures retried or dead-lettered by :func:`dicomgate.egress.base.failure_status_retryable`.
A refused, rejected or lost association fails the rest of the batch as retryable; the
next ``send()`` reconnects.

pynetdicom's two threads per association poll with 1 ms sleeps (its DUL reactor and its
association reactor; pynetdicom issues #650, #917): an idle pooled association costs
~2,000 wake-ups a second, and every C-STORE waits up to a millisecond twice. Our
associations use :class:`_ReactiveDUL`, which blocks on the socket and a wake-up socket
instead, and :class:`_QuietAssociation`, whose reactor checks for a peer release or abort
every 20 ms instead of every millisecond while it stays out of the way of the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import _config, build_context, evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS
from pynetdicom.transport import AddressInformation, AssociationSocket

from dicomgate.dimse.scu import (
    FALLBACK_SYNTAXES,
    MAX_CONTEXTS,
    WARNING_STATUSES,
    ContextSpec,
    ScannedFile,
    UnreadableDicom,
    _AssociationFailed,
    _load_for_conversion,
    _open_association,
    plan_associations,
    scan_file,
)
from dicomgate.egress.base import (
    Delivery,
    Outcome,
    exception_reason,
    failure_status_retryable,
    os_error_reason,
)
from dicomgate.egress.models import DimseDestination
from dicomgate.observability.logging import uid_hash

__all__ = ["DimseSender", "outcome_of_status"]

LOGGER = logging.getLogger(__name__)

_REAP_MIN_INTERVAL = 0.05
_REAP_MAX_INTERVAL = 5.0
_RECENT_CONTEXTS = 512  # how many recently used contexts are remembered
_DUL_IDLE_WAIT = 0.05  # s; longest DUL wait with nothing to do (its ARTIM timer's granularity)
_REACTOR_INTERVAL = 0.02  # s; how often an association reactor looks for a release or abort


def outcome_of_status(job_id: int, code: int, comment: str = "") -> Outcome:
    """The outcome of a C-STORE response status (PS3.4 B.2.3)."""
    if code == 0x0000:
        return Outcome(job_id, True)
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))[1]
    reason = f"status 0x{code:04X}" + (f" {meaning}" if meaning else "")
    if comment:
        reason += f": {comment[:64]}"
    if code in WARNING_STATUSES:
        return Outcome(job_id, True, warning=reason)
    return Outcome(job_id, False, failure_status_retryable(code), reason)


@dataclass
class _Link:
    """One established association and what we know of it."""

    ae: ApplicationEntity
    assoc: Association
    proposed: frozenset[ContextSpec]  # the peer has answered for each of these
    last_used: float = field(default_factory=time.monotonic)

    def covers(self, needed: Sequence[ContextSpec]) -> bool:
        return self.assoc.is_established and self.proposed.issuperset(needed)

    def accepted_syntaxes(self, sop_class: UID) -> set[UID]:
        return {
            UID(cx.transfer_syntax[0])
            for cx in self.assoc.accepted_contexts
            if cx.abstract_syntax == sop_class and cx.transfer_syntax
        }


class _Lost(Exception):
    """The association went away while sending (abort, timeout, connection closed)."""


class DimseSender:
    """C-STORE SCU of one destination (see the module docstring)."""

    def __init__(self, name: str, model: DimseDestination, *, calling_ae: str) -> None:
        # Process-wide pynetdicom switch: a path given to send_c_store is streamed.
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.name = name
        self.max_batch = model.batch_max_instances
        self.concurrency = model.max_associations
        self.associations_opened = 0  # for metrics and tests
        self._model = model
        self._calling_ae = calling_ae
        self._executor = ThreadPoolExecutor(
            max_workers=model.max_associations, thread_name_prefix=f"egress-dimse-{name}"
        )
        self._lock = threading.Lock()
        self._idle: list[_Link] = []
        self._open = 0  # associations open or being opened, idle or in use
        self._recent: dict[ContextSpec, None] = {}  # insertion order = least recent first
        self._reaper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ public

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        if not batch:
            return []
        self._start_reaper()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._send_blocking, list(batch))

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        with self._lock:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        await asyncio.to_thread(self._release, idle)
        await asyncio.to_thread(self._executor.shutdown, True)

    # ------------------------------------------------------------------ pool

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap_forever(), name=f"egress-dimse-{self.name}-reaper"
            )

    async def _reap_forever(self) -> None:
        timeout = self._model.idle_timeout
        interval = min(max(timeout / 4, _REAP_MIN_INTERVAL), _REAP_MAX_INTERVAL)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            with self._lock:
                expired = [ln for ln in self._idle if now - ln.last_used >= timeout]
                self._idle = [ln for ln in self._idle if ln not in expired]
                self._open -= len(expired)
            if expired:
                await asyncio.to_thread(self._release, expired)

    def _release(self, links: list[_Link]) -> None:
        for link in links:
            if link.assoc.is_established:
                link.assoc.release()
                LOGGER.info(
                    "association to %s released",
                    self.name,
                    extra={"event": "egress.dimse_released", "destination": self.name},
                )

    def _checkout(self, needed: list[ContextSpec]) -> _Link:
        """An established association proposing every context of `needed`."""
        victim: _Link | None = None
        with self._lock:
            for spec in needed:  # most recent last
                self._recent.pop(spec, None)
                self._recent[spec] = None
            while len(self._recent) > _RECENT_CONTEXTS:
                del self._recent[next(iter(self._recent))]
            alive = [ln for ln in self._idle if ln.assoc.is_established]
            self._open -= len(self._idle) - len(alive)  # closed by the peer meanwhile
            self._idle = alive
            for link in alive:
                if link.covers(needed):
                    self._idle.remove(link)
                    return link
            if self._open >= self._model.max_associations and self._idle:
                victim = self._idle.pop(0)  # its slot goes to the new association
            else:
                self._open += 1
            extra = [s for s in reversed(self._recent) if s not in needed]
        if victim is not None:
            self._release([victim])
        proposal = needed + extra[: max(0, MAX_CONTEXTS - len(needed))]
        try:
            return self._connect(proposal)
        except BaseException:
            with self._lock:
                self._open -= 1
            raise

    def _connect(self, proposal: list[ContextSpec]) -> _Link:
        timeout = self._model.dimse_timeout
        ae = _ReactiveAE(ae_title=self._calling_ae)
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        ae.connection_timeout = timeout
        contexts = [build_context(c.sop_class_uid, list(c.transfer_syntaxes)) for c in proposal]
        assoc = _open_association(
            ae, self._model.host, self._model.port, self._model.ae_title, contexts, timeout
        )
        self.associations_opened += 1
        LOGGER.info(
            "association to %s established (%d of %d contexts accepted)",
            self.name,
            len(assoc.accepted_contexts),
            len(contexts),
            extra={"event": "egress.dimse_associated", "destination": self.name},
        )
        return _Link(ae, assoc, frozenset(proposal))

    def _checkin(self, link: _Link) -> None:
        with self._lock:
            if link.assoc.is_established:
                link.last_used = time.monotonic()
                self._idle.append(link)
                return
            self._open -= 1

    # ------------------------------------------------------------------ sending

    def _send_blocking(self, batch: list[Delivery]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        files: list[tuple[Delivery, ScannedFile]] = []
        for delivery in batch:
            try:
                scanned = scan_file(delivery.path)
            except OSError as exc:
                outcomes[id(delivery)] = self._failed(
                    delivery, f"cannot read the stored file: {os_error_reason(exc)}", True
                )
                continue
            except UnreadableDicom as exc:
                outcomes[id(delivery)] = self._failed(delivery, str(exc), False)
                continue
            if scanned is None:
                outcomes[id(delivery)] = self._failed(delivery, "not a DICOM instance", False)
                continue
            files.append((delivery, scanned))

        if files:
            needed = [c for plan in plan_associations(f for _, f in files) for c in plan.contexts]
            try:
                link = self._checkout(needed)
            except _AssociationFailed as exc:
                LOGGER.warning(
                    "association to %s failed: %s",
                    self.name,
                    exc,
                    extra={"event": "egress.dimse_association_failed", "destination": self.name},
                )
                for delivery, _ in files:
                    outcomes[id(delivery)] = Outcome(delivery.job_id, False, True, str(exc))
            else:
                try:
                    self._store_all(link, files, outcomes)
                finally:
                    self._checkin(link)
        return [outcomes[id(d)] for d in batch]

    def _store_all(
        self,
        link: _Link,
        files: list[tuple[Delivery, ScannedFile]],
        outcomes: dict[int, Outcome],
    ) -> None:
        for n, (delivery, scanned) in enumerate(files):
            try:
                outcomes[id(delivery)] = self._store_one(link, delivery, scanned)
            except _Lost as exc:
                # Abort rather than release a dead link (a release would wait for an
                # A-RELEASE-RP that never comes); the next send() reconnects.
                link.assoc.abort()
                LOGGER.warning(
                    "association to %s lost: %s",
                    self.name,
                    exc,
                    extra={"event": "egress.dimse_association_lost", "destination": self.name},
                )
                for rest, _ in files[n:]:
                    outcomes[id(rest)] = Outcome(rest.job_id, False, True, str(exc))
                return

    def _payload(self, link: _Link, f: ScannedFile) -> Dataset | None:
        """What to give send_c_store: the path (streamed) or a data set in memory."""
        accepted = link.accepted_syntaxes(f.sop_class_uid)
        if f.transfer_syntax_uid in accepted:
            if f.streamable:
                return None  # stream the file
            ds = dcmread(f.path, force=True)
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = f.transfer_syntax_uid
            return ds
        if f.convertible and accepted & set(FALLBACK_SYNTAXES):
            return _load_for_conversion(f)
        raise _NotAccepted(
            f"peer accepted neither {f.sop_class_uid.name} in {f.transfer_syntax_uid.name}"
            + (" nor uncompressed" if f.convertible else " (no conversion possible)")
        )

    def _store_one(self, link: _Link, delivery: Delivery, f: ScannedFile) -> Outcome:
        try:
            payload = self._payload(link, f)
        except _NotAccepted as exc:
            return self._failed(delivery, str(exc), False)
        except OSError as exc:
            return self._failed(delivery, f"cannot read: {os_error_reason(exc)}", True)
        except Exception as exc:  # a codec failure repeats on every attempt
            return self._failed(delivery, f"cannot convert: {exception_reason(exc)}", False)
        started = time.monotonic()
        try:
            status = link.assoc.send_c_store(f.path if payload is None else payload)
        except OSError as exc:
            return self._failed(delivery, f"cannot read: {os_error_reason(exc)}", True)
        except Exception as exc:  # reported per instance; the batch goes on
            if not link.assoc.is_established:
                raise _Lost(f"association lost: {exception_reason(exc)}") from exc
            return self._failed(delivery, f"cannot send: {exception_reason(exc)}", True)
        link.last_used = time.monotonic()
        if "Status" not in status:
            waited = time.monotonic() - started
            if waited >= self._model.dimse_timeout:
                raise _Lost(f"no C-STORE response within {self._model.dimse_timeout:g} s")
            raise _Lost("association aborted or connection closed by the peer")
        outcome = outcome_of_status(
            delivery.job_id, int(status.Status), str(status.get("ErrorComment") or "")
        )
        if not outcome.delivered:
            self._log_failure(delivery, outcome)
        elif outcome.warning:
            LOGGER.info(
                "C-STORE to %s delivered with a warning: %s",
                self.name,
                outcome.warning,
                extra={
                    "event": "egress.dimse_warning",
                    "destination": self.name,
                    "sop": uid_hash(delivery.sop_instance_uid),
                },
            )
        return outcome

    def _failed(self, delivery: Delivery, error: str, retryable: bool) -> Outcome:
        outcome = Outcome(delivery.job_id, False, retryable, error)
        self._log_failure(delivery, outcome)
        return outcome

    def _log_failure(self, delivery: Delivery, outcome: Outcome) -> None:
        LOGGER.warning(
            "C-STORE to %s failed: %s",
            self.name,
            outcome.error,
            extra={
                "event": "egress.dimse_failed",
                "destination": self.name,
                "sop": uid_hash(delivery.sop_instance_uid),
                "retryable": outcome.retryable,
            },
        )


class _NotAccepted(Exception):
    """The peer accepted no context this instance can be sent in."""


# --------------------------------------------------------------------------- pynetdicom


class _ReactiveDUL(DULServiceProvider):
    """pynetdicom's DUL reactor that blocks until there is work instead of polling.

    pynetdicom's loop sleeps ``_run_loop_delay`` (1 ms) whenever it found nothing to do. Here
    that sleep is zero and, just before the loop looks for work, the thread blocks in
    ``select`` until the peer's socket is readable, another thread queued a primitive
    (:meth:`send_pdu`) or asked it to stop, or :data:`_DUL_IDLE_WAIT` passed (timers).
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._run_loop_delay = 0
        self._waker_lock = threading.Lock()
        self._waker, self._wakee = socket.socketpair()
        self._waker.setblocking(False)
        self._wakee.setblocking(False)

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            with self._waker_lock:
                self._waker.close()
                self._wakee.close()

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wake()
        if threading.current_thread() is not self:
            self.join()
        return True

    def _process_recv_primitive(self) -> bool:
        if self._idle():
            self._wait_for_work()
        return bool(super()._process_recv_primitive())

    def _wake(self) -> None:
        with self._waker_lock, contextlib.suppress(OSError):  # full: awake already; closed
            self._waker.send(b"\0")

    def _idle(self) -> bool:
        return (
            not self._kill_thread
            and self.to_provider_queue.empty()
            and self.event_queue.empty()
            # Sta13 closes the connection as soon as no data is left: do not wait there.
            and self.state_machine.current_state != "Sta13"
            and not self.artim_timer.expired
        )

    def _wait_for_work(self) -> None:
        waiting: list[socket.socket] = [self._wakee]
        transport: AssociationSocket | None = self.socket
        peer = transport.socket if transport is not None else None
        if peer is not None and getattr(transport, "_is_connected", False):
            if isinstance(peer, ssl.SSLSocket) and peer.pending():
                return  # decrypted bytes are buffered: select would not see them
            waiting.append(peer)
        try:
            select.select(waiting, [], [], _DUL_IDLE_WAIT)
        except (OSError, ValueError):  # closed meanwhile: the loop finds out and acts
            return
        with contextlib.suppress(OSError):
            while self._wakee.recv(512):
                pass


class _QuietAssociation(Association):
    """An association (requestor) whose reactor looks for a peer's release or abort every
    :data:`_REACTOR_INTERVAL` instead of every millisecond.

    While it waits it counts as paused, so a ``send_*()`` call proceeds at once, and it
    gives the DIMSE queue up to any ``send_*()`` that started while it was not paused. The
    checks are pynetdicom 3.0's ``Association._run_reactor``.
    """

    _quiet_wake: threading.Event

    def kill(self) -> None:
        self._quiet_wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        while not self._kill:
            self._is_paused = True
            self._quiet_wake.wait(_REACTOR_INTERVAL)
            self._reactor_checkpoint.wait()  # blocks while a send_*() owns the association
            self._is_paused = False
            if not self._reactor_checkpoint.is_set() or self._kill:
                continue  # a send_*() began in between: it takes the next message
            context_id, msg = self.dimse.get_msg(block=False)
            if msg is not None and context_id is not None:
                self._serve_request(msg, context_id)
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                self.abort()  # network timeout; pynetdicom's default response
                self.kill()
                return


class _ReactiveAE(ApplicationEntity):
    """An AE whose requested associations are :class:`_QuietAssociation` over a
    :class:`_ReactiveDUL`.

    ``_create_socket`` is the one hook ``AE.associate`` calls after building the
    association and before starting its threads.
    """

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        assoc.__class__ = _QuietAssociation
        assoc._quiet_wake = threading.Event()  # type: ignore[attr-defined]
        assoc.dul = _ReactiveDUL(assoc)
        # Association.__init__ gave its timeouts to the DUL it made; give them to ours.
        assoc.acse_timeout = assoc.acse_timeout
        assoc.network_timeout = assoc.network_timeout
        return super()._create_socket(assoc, address, tls_args)
