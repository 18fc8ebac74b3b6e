"""DIMSE destination: C-STORE SCU (PS3.4 B) over pooled, reused associations.

Each destination keeps up to ``max_associations`` associations. A ``send()`` call takes
an idle association whose presentation contexts cover its batch, or opens one, sends the
batch over it and gives it back; associations idle for ``idle_timeout`` are released.
Associations are :class:`dicomgate.dimse.association.StoreAssociation`: asyncio, on the
gateway's event loop, no thread per association; TLS (PS3.15 B) when ``tls`` is set.

Presentation contexts are built with :func:`dicomgate.dimse.scu.plan_associations` from
what is being sent: each (SOP class, transfer syntax) exactly, plus a fallback context
per SOP class proposing Explicit and Implicit VR Little Endian. A new association also
proposes the contexts of recent batches (up to the 128 allowed, PS3.8 9.3.2.2), so that a
mixed stream of instances keeps reusing it. A file sent in its own syntax is streamed
from disk in PDUs no larger than the peer accepts (design rule 2). When the peer refused
the file's own syntax it is transcoded losslessly in a worker thread
(:func:`dicomgate.processing.transcode.choose_transfer_syntax`) to a syntax the peer
accepted: the one case where a whole instance is read into memory.

A SOP class the peer accepted no context of (PS3.8 9.3.3.2; the association may still be
accepted for the batch's other classes, or carry none and be aborted) is decided per
class, the same on every attempt and whatever was sent before: result
``abstract-syntax-not-supported`` means the peer does not support the class, and its
instances fail permanently ("SOP class not supported", like status 0x0122); any other
result makes a second association propose, for that class, one context per lossless
compressed syntax this gateway can encode (:data:`dicomgate.dimse.scu.LOSSLESS_COMPRESSED_SYNTAXES`:
JPEG-LS Lossless, JPEG Lossless SV1, JPEG 2000 Lossless, RLE Lossless) when one of its
instances can be transcoded; still refused, they fail permanently too, the reason naming
what was offered. Such failures say nothing of the destination's health: they do not count
against its circuit breaker, and the batch's other instances are sent. Peers that accept
what is first proposed never see the second association.

Per-instance statuses (PS3.4 B.2.3): success; B000/B006/B007 delivered with a warning;
failures retried or dead-lettered by :func:`dicomgate.egress.base.failure_status_retryable`.
A refused, rejected or lost association fails the rest of the batch as retryable; the
next ``send()`` reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicomgate.dimse import pdu
from dicomgate.dimse.association import (
    AssociationError,
    AssociationLost,
    ContextsRejected,
    StoreAssociation,
    client_ssl_context,
    describe_refusal,
    request_association,
)
from dicomgate.dimse.scu import (
    FALLBACK_SYNTAXES,
    LOSSLESS_COMPRESSED_SYNTAXES,
    MAX_CONTEXTS,
    WARNING_STATUSES,
    ContextSpec,
    ScannedFile,
    UnreadableDicom,
    lossless_contexts,
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
from dicomgate.errors import DicomgateError
from dicomgate.observability.logging import uid_hash
from dicomgate.processing.transcode import (
    can_produce,
    choose_transfer_syntax,
    transcode_dataset,
)

__all__ = ["NOT_SENT", "DimseSender", "outcome_of_status"]

LOGGER = logging.getLogger(__name__)

# The error of an instance a send() was asked to stop before (a C-MOVE's C-CANCEL).
NOT_SENT = "not sent: cancelled"

_REAP_MIN_INTERVAL = 0.05
_REAP_MAX_INTERVAL = 5.0
_RECENT_CONTEXTS = 512  # how many recently used contexts are remembered
_RELEASE_TIMEOUT = 5.0  # s; a peer slower than this to answer A-RELEASE is aborted
# A second association still unanswered this long after another one came back idle: the
# peer serves one association at a time (DCMTK storescp without --fork, many modalities).
_SERIAL_AFTER = 1.0  # s
_SERIAL_RETRY = 300.0  # s; then a second association is tried again

_Signature = tuple[tuple[int, int, int], ...]


def _files_signature(paths: Iterable[str | Path]) -> _Signature:
    """(mtime, size, inode) of each file; a missing file counts as (0, 0, 0)."""
    signature = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            signature.append((0, 0, 0))
        else:
            signature.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(signature)


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

    assoc: StoreAssociation
    proposed: frozenset[ContextSpec]  # the peer has answered for each of these
    last_used: float = field(default_factory=time.monotonic)

    def covers(self, needed: Sequence[ContextSpec]) -> bool:
        return self.assoc.is_open and self.proposed.issuperset(needed)


@dataclass(frozen=True)
class _Item:
    """One instance to send: where its data set is and how it is encoded."""

    delivery: Delivery
    scanned: ScannedFile
    offset: int | None  # of the data set in the file; None: re-encode it before sending


class _NotAccepted(Exception):
    """The peer accepted no context this instance can be sent in."""


class _Rejected(ContextsRejected):
    """:class:`ContextsRejected`, with the contexts that were proposed."""

    def __init__(
        self,
        message: str,
        refusals: dict[str, frozenset[pdu.ContextResult]],
        proposal: frozenset[ContextSpec],
    ) -> None:
        super().__init__(message, refusals)
        self.proposal = proposal


# How the syntaxes offered for a SOP class are listed in a failure's reason.
_OFFER_ORDER: dict[str, int] = {
    str(ts): n for n, ts in enumerate((*FALLBACK_SYNTAXES, *LOSSLESS_COMPRESSED_SYNTAXES))
}


def _offer_order(transfer_syntax: str) -> tuple[int, str]:
    return _OFFER_ORDER.get(transfer_syntax, -1), transfer_syntax


def _dataset_offset(path: Path) -> int | None:
    """Where the data set of a Part 10 file starts, or None (no preamble or group length)."""
    with path.open("rb") as fh:
        head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        return None
    return 144 + int.from_bytes(head[140:144], "little")


def _encoded(path: Path, stored_syntax: str, target: str, force: bool) -> bytes:
    """The data set of ``path`` transcoded to ``target`` and encoded (whole in memory)."""
    ds = dcmread(path, force=force)
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(stored_syntax)
    if stored_syntax != target:
        transcode_dataset(ds, target)
    body = encode(ds, target == ImplicitVRLittleEndian, True, UID(target).is_deflated)
    if body is None:
        raise DicomgateError("cannot encode the data set")
    return body


class DimseSender:
    """C-STORE SCU of one destination (see the module docstring).

    ``move_originator`` (AE title, message id) is put into each C-STORE-RQ when the sender
    serves a C-MOVE's sub-operations (PS3.7 9.3.1.1; PS3.4 C.4.2.2).
    """

    def __init__(
        self,
        name: str,
        model: DimseDestination,
        *,
        calling_ae: str,
        move_originator: tuple[str, int] | None = None,
    ) -> None:
        self.name = name
        self.max_batch = model.batch_max_instances
        self.concurrency = model.max_associations
        self.associations_opened = 0  # for metrics and tests
        self._model = model
        self._calling_ae = calling_ae
        self._move_originator = move_originator
        self._idle: list[_Link] = []
        self._open = 0  # associations open or being opened, idle or in use
        self._recent: dict[ContextSpec, None] = {}  # insertion order = least recent first
        self._reaper: asyncio.Task[None] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._ssl_signature: _Signature = ()  # of the files self._ssl was built from
        self._ssl_failed: _Signature | None = None  # of files that did not load
        self._returned = asyncio.Event()  # set by each check-in (see _checkout)
        self._serial_until = 0.0  # monotonic time until which one association is used
        self._lossless: list[UID] | None = None  # see _lossless_syntaxes

    # ------------------------------------------------------------------ public

    async def send(
        self, batch: Sequence[Delivery], stop: Callable[[], bool] | None = None
    ) -> list[Outcome]:
        """Deliver ``batch``; ``stop`` (a C-MOVE's cancel) is asked before each instance,
        and once it says so the rest are not sent: their outcome's error is
        :data:`NOT_SENT`."""
        if not batch:
            return []
        self._start_reaper()
        outcomes: dict[int, Outcome] = {}
        items: list[_Item] = []
        for delivery in batch:
            try:
                item = self._item(delivery)
            except OSError as exc:
                outcomes[id(delivery)] = self._failed(
                    delivery, f"cannot read the stored file: {os_error_reason(exc)}", True
                )
                continue
            except UnreadableDicom as exc:
                outcomes[id(delivery)] = self._failed(delivery, str(exc), False)
                continue
            if item is None:
                outcomes[id(delivery)] = self._failed(delivery, "not a DICOM instance", False)
                continue
            items.append(item)
        if items:
            await self._send_items(items, outcomes, stop)
        return [outcomes[id(d)] for d in batch]

    async def _send_items(
        self, items: list[_Item], outcomes: dict[int, Outcome], stop: Callable[[], bool] | None
    ) -> None:
        """Negotiate (at most twice, see :meth:`_refused`) and send ``items``: those of a
        SOP class the peer accepted no context of fail for good, the others are sent."""
        needed = [c for plan in plan_associations(i.scanned for i in items) for c in plan.contexts]
        link: _Link | None = None
        refused: dict[int, str] = {}
        for second in (False, True):
            try:
                link = await self._checkout(needed)
            except _Rejected as exc:
                link, refusals, proposed = None, exc.refusals, exc.proposal
            except AssociationError as exc:
                LOGGER.warning(
                    "association to %s failed: %s",
                    self.name,
                    exc,
                    extra={"event": "egress.dimse_association_failed", "destination": self.name},
                )
                for item in items:
                    outcomes[id(item.delivery)] = Outcome(
                        item.delivery.job_id, False, True, str(exc)
                    )
                return
            else:
                refusals, proposed = link.assoc.refusals, link.proposed
            room = 0 if second else MAX_CONTEXTS - len(needed)  # PS3.8 9.3.2.2: 128 at most
            refused, more = self._refused(items, refusals, proposed, room > 0)
            if not more:
                break
            # Propose lossless compressed syntaxes for the refused classes: this link
            # goes back to the pool, and a new association is asked for (the contexts
            # join the recent ones, so later associations propose them at once).
            if link is not None:
                self._checkin(link)
                link = None
            more = more[:room]
            LOGGER.info(
                "%s accepted no proposed transfer syntax for %d SOP class(es): proposing"
                " lossless compressed ones",
                self.name,
                len({c.sop_class_uid for c in more}),
                extra={"event": "egress.dimse_lossless_fallback", "destination": self.name},
            )
            needed = needed + more
        sendable = []
        for item in items:
            reason = refused.get(id(item))
            if reason is not None:
                outcomes[id(item.delivery)] = self._failed(item.delivery, reason, False)
            elif link is None:  # cannot happen: every class of a rejected proposal is refused
                outcomes[id(item.delivery)] = self._failed(
                    item.delivery, "peer accepted none of the proposed presentation contexts", True
                )
            else:
                sendable.append(item)
        if link is None:
            return
        try:
            await self._store_all(link, sendable, outcomes, stop)
        finally:
            self._checkin(link)

    def _refused(
        self,
        items: list[_Item],
        refusals: dict[str, frozenset[pdu.ContextResult]],
        proposed: frozenset[ContextSpec],
        may_propose_more: bool,
    ) -> tuple[dict[int, str], list[ContextSpec]]:
        """The items of the SOP classes the peer accepted no context of (PS3.8 9.3.3.2):
        ``id(item)`` -> why it cannot be sent (a permanent failure: the same proposal gets
        the same answer), and the contexts to propose in a second association instead.

        Result ``abstract-syntax-not-supported``: the peer does not support the SOP class
        (like status 0x0122), nothing else is tried. Any other result (the transfer
        syntaxes, a user rejection, none given): the lossless compressed syntaxes this
        gateway can produce (:data:`LOSSLESS_COMPRESSED_SYNTAXES`) not proposed yet, when
        the class has an instance that can be transcoded and ``may_propose_more``.
        """
        reasons: dict[int, str] = {}
        more: list[ContextSpec] = []
        by_class: dict[UID, list[_Item]] = {}
        for item in items:
            if item.scanned.sop_class_uid in refusals:
                by_class.setdefault(item.scanned.sop_class_uid, []).append(item)
        for sop_class, class_items in by_class.items():
            results = refusals[sop_class]
            name = f"{sop_class.name} ({sop_class})" if sop_class.name != sop_class else sop_class
            if pdu.ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED in results:
                why = (
                    f"SOP class not supported: the peer rejected {name}"
                    f" (presentation context result: {describe_refusal(results)})"
                )
                reasons.update((id(i), why) for i in class_items)
                continue
            alternatives = [
                c
                for c in lossless_contexts(sop_class, self._lossless_syntaxes())
                if c not in proposed
            ]
            if (
                may_propose_more
                and alternatives
                and any(i.scanned.convertible for i in class_items)
            ):
                more += alternatives
                continue
            syntaxes = {
                ts for c in proposed if c.sop_class_uid == sop_class for ts in c.transfer_syntaxes
            }
            offered = ", ".join(UID(ts).keyword or ts for ts in sorted(syntaxes, key=_offer_order))
            why = (
                f"peer accepted {name} in none of the transfer syntaxes offered ({offered};"
                f" presentation context result: {describe_refusal(results)})"
            )
            for i in class_items:
                stored = i.scanned.transfer_syntax_uid
                reasons[id(i)] = why + (
                    "" if i.scanned.convertible else f"; {stored.name} cannot be converted here"
                )
        return reasons, more

    def _lossless_syntaxes(self) -> list[UID]:
        """The syntaxes of :data:`LOSSLESS_COMPRESSED_SYNTAXES` this machine can encode."""
        if self._lossless is None:
            self._lossless = [ts for ts in LOSSLESS_COMPRESSED_SYNTAXES if can_produce(ts)]
        return self._lossless

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        await self._release(idle)

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
            expired = [ln for ln in self._idle if now - ln.last_used >= timeout]
            if expired:
                self._idle = [ln for ln in self._idle if ln not in expired]
                self._open -= len(expired)
                await self._release(expired)

    async def _release(self, links: list[_Link]) -> None:
        for link in links:
            if link.assoc.is_open:
                await link.assoc.release(min(_RELEASE_TIMEOUT, self._model.dimse_timeout))
                LOGGER.info(
                    "association to %s released",
                    self.name,
                    extra={"event": "egress.dimse_released", "destination": self.name},
                )

    async def _checkout(self, needed: list[ContextSpec]) -> _Link:
        """An established association proposing every context of `needed`."""
        for spec in needed:  # most recent last
            self._recent.pop(spec, None)
            self._recent[spec] = None
        while len(self._recent) > _RECENT_CONTEXTS:
            del self._recent[next(iter(self._recent))]
        while True:
            link = self._take_idle(needed)
            if link is not None:
                return link
            serial = time.monotonic() < self._serial_until
            if not (serial and self._open > len(self._idle)):
                break
            # The peer serves one association at a time and ours is busy: wait for it
            # (bounded: should the count of open ones ever be off, connect as before).
            self._returned.clear()
            try:
                await asyncio.wait_for(self._returned.wait(), self._model.dimse_timeout)
            except TimeoutError:
                break
        victim: _Link | None = None
        limit = 1 if serial else self._model.max_associations
        if self._open >= limit and self._idle:
            victim = self._idle.pop(0)  # its slot goes to the new association
        else:
            self._open += 1
        extra = [s for s in reversed(self._recent) if s not in needed]
        if victim is not None:
            await self._release([victim])
        proposal = needed + extra[: max(0, MAX_CONTEXTS - len(needed))]
        return await self._establish(proposal, needed)

    async def _establish(self, proposal: list[ContextSpec], needed: list[ContextSpec]) -> _Link:
        """Open an association, minding the others (two may be opening at once). A peer
        serving one association at a time answers a second only once the first is
        released, so if ours is still unanswered ``_SERIAL_AFTER`` s on and another of ours
        is idle, give ours up and use (or, lacking contexts, release) the idle one instead
        of holding the batch until it times out; for ``_SERIAL_RETRY`` s no further one is
        opened (logged once)."""
        # The event loop may end a wait up to its clock resolution early: a margin, so
        # that the wait ending at the deadline counts as past it.
        deadline = time.monotonic() + _SERIAL_AFTER - 0.01
        connecting = asyncio.ensure_future(self._connect(proposal))
        try:
            while True:
                self._returned.clear()
                returned = asyncio.ensure_future(self._returned.wait())
                left = deadline - time.monotonic()
                try:
                    await asyncio.wait(
                        {connecting, returned},
                        timeout=left + 0.02 if left > 0 else None,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    returned.cancel()
                if connecting.done():
                    return connecting.result()
                if time.monotonic() < deadline or not self._idle:
                    continue
                self._one_at_a_time()
                link = self._take_idle(needed)
                if link is None:  # idle ones with other contexts: release, ours gets in
                    idle, self._idle = self._idle, []
                    self._open -= len(idle)
                    await self._release(idle)
                    continue
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                self._open -= 1
                return link
        except BaseException:
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
            if connecting.cancelled() or connecting.exception() is not None:
                self._open -= 1
            else:
                self._checkin(connecting.result())
            raise

    def _one_at_a_time(self) -> None:
        if time.monotonic() >= self._serial_until:
            LOGGER.warning(
                "%s answers one association at a time: using one for %.0f s",
                self.name,
                _SERIAL_RETRY,
                extra={"event": "egress.dimse_one_association", "destination": self.name},
            )
        self._serial_until = time.monotonic() + _SERIAL_RETRY

    def _take_idle(self, needed: list[ContextSpec]) -> _Link | None:
        """An idle, open association proposing every context of ``needed``, taken out of
        the pool; closed idle ones are dropped."""
        alive = [ln for ln in self._idle if ln.assoc.is_open]
        self._open -= len(self._idle) - len(alive)  # closed by the peer meanwhile
        for link in self._idle:
            if link not in alive:
                link.assoc.abort()
        self._idle = alive
        for link in alive:
            if link.covers(needed):
                self._idle.remove(link)
                return link
        return None

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for a new association, rebuilt when ``tls.cert``/``key``/``ca``
        changed on disk (a renewal, a CA bundle edited; SIGHUP needs nothing more). A
        renewal that does not load is logged once and the previous context stays in use."""
        tls = self._model.tls
        if tls is None:
            return None
        signature = _files_signature(p for p in (tls.cert, tls.key, tls.ca) if p is not None)
        if self._ssl is not None and signature in (self._ssl_signature, self._ssl_failed):
            return self._ssl
        try:
            context = client_ssl_context(tls)
        except (OSError, ssl.SSLError) as exc:
            if self._ssl is None:
                raise AssociationError(f"TLS settings unusable: {exc}") from None
            self._ssl_failed = signature
            LOGGER.error(
                "TLS files of destination %s do not load; the previous ones stay in use: %s",
                self.name,
                exc,
                extra={"event": "egress.tls_reload_failed", "destination": self.name},
            )
            return self._ssl
        if self._ssl is not None:
            LOGGER.info(
                "TLS files of destination %s read again",
                self.name,
                extra={"event": "egress.tls_reloaded", "destination": self.name},
            )
        self._ssl, self._ssl_signature, self._ssl_failed = context, signature, None
        return self._ssl

    async def _connect(self, proposal: list[ContextSpec]) -> _Link:
        model = self._model
        try:
            assoc = await request_association(
                model.host,
                model.port,
                calling_ae=self._calling_ae,
                called_ae=model.ae_title,
                contexts=[(c.sop_class_uid, c.transfer_syntaxes) for c in proposal],
                timeout=model.dimse_timeout,
                ssl_context=self._ssl_context(),
                server_name=model.tls.server_name if model.tls else None,
            )
        except ContextsRejected as exc:
            raise _Rejected(str(exc), exc.refusals, frozenset(proposal)) from None
        self.associations_opened += 1
        LOGGER.info(
            "association to %s established (%d of %d contexts accepted)",
            self.name,
            len(assoc.accepted),
            len(proposal),
            extra={"event": "egress.dimse_associated", "destination": self.name},
        )
        return _Link(assoc, frozenset(proposal))

    def _checkin(self, link: _Link) -> None:
        self._returned.set()
        if link.assoc.is_open:
            link.last_used = time.monotonic()
            self._idle.append(link)
            return
        self._open -= 1

    # ------------------------------------------------------------------ sending

    @staticmethod
    def _item(delivery: Delivery) -> _Item | None:
        """What to send for ``delivery``: the index's UIDs and the file's data set offset
        (no header parse), or a header scan for a file that is not plain Part 10."""
        if delivery.sop_class_uid and delivery.transfer_syntax_uid:
            offset = _dataset_offset(delivery.path)
            if offset is not None:
                scanned = ScannedFile(
                    path=delivery.path,
                    sop_class_uid=UID(delivery.sop_class_uid),
                    sop_instance_uid=UID(delivery.sop_instance_uid),
                    transfer_syntax_uid=UID(delivery.transfer_syntax_uid),
                    streamable=True,
                )
                # An odd-length data set (an unpadded deflate stream, against PS3.5 A.5)
                # is refused by peers as an odd PDV fragment: re-encode it.
                odd = (delivery.path.stat().st_size - offset) % 2 == 1
                return _Item(delivery, scanned, None if odd else offset)
        scanned_file = scan_file(delivery.path)
        if scanned_file is None:
            return None
        return _Item(delivery, scanned_file, None)

    async def _store_all(
        self,
        link: _Link,
        items: list[_Item],
        outcomes: dict[int, Outcome],
        stop: Callable[[], bool] | None = None,
    ) -> None:
        for n, item in enumerate(items):
            if stop is not None and stop():
                for rest in items[n:]:
                    outcomes[id(rest.delivery)] = Outcome(
                        rest.delivery.job_id, False, True, NOT_SENT
                    )
                return
            try:
                outcomes[id(item.delivery)] = await self._store_one(link, item)
            except AssociationLost as exc:
                link.assoc.abort()
                LOGGER.warning(
                    "association to %s lost: %s",
                    self.name,
                    exc,
                    extra={"event": "egress.dimse_association_lost", "destination": self.name},
                )
                for rest in items[n:]:
                    outcomes[id(rest.delivery)] = Outcome(
                        rest.delivery.job_id, False, True, str(exc)
                    )
                return

    async def _payload(self, link: _Link, item: _Item) -> tuple[int, bytes | tuple[Path, int]]:
        """The context id to send on and the data set: the file (streamed) or bytes."""
        f = item.scanned
        accepted = link.assoc.accepted_syntaxes(f.sop_class_uid)
        stored = str(f.transfer_syntax_uid)
        if stored in accepted and item.offset is not None:
            return accepted[stored], (f.path, item.offset)
        target = choose_transfer_syntax(stored, list(accepted))
        if target is None:
            raise _NotAccepted(
                f"peer accepted neither {f.sop_class_uid.name} in {f.transfer_syntax_uid.name}"
                " nor a syntax it can be converted to losslessly"
            )
        body = await asyncio.to_thread(_encoded, f.path, stored, target, item.offset is None)
        return accepted[target], body

    async def _store_one(self, link: _Link, item: _Item) -> Outcome:
        delivery = item.delivery
        try:
            context_id, payload = await self._payload(link, item)
        except _NotAccepted as exc:
            return self._failed(delivery, str(exc), False)
        except OSError as exc:
            return self._failed(delivery, f"cannot read: {os_error_reason(exc)}", True)
        except Exception as exc:  # a codec failure repeats on every attempt
            return self._failed(delivery, f"cannot convert: {exception_reason(exc)}", False)
        try:
            response = await link.assoc.store(
                context_id,
                item.scanned.sop_class_uid,
                item.scanned.sop_instance_uid,
                payload,
                timeout=self._model.dimse_timeout,
                move_originator=self._move_originator,
            )
        except OSError as exc:  # reading the file failed mid-send: the association is gone
            outcome = self._failed(delivery, f"cannot read: {os_error_reason(exc)}", True)
            raise AssociationLost(outcome.error) from exc
        link.last_used = time.monotonic()
        outcome = outcome_of_status(delivery.job_id, response.status, response.error_comment)
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
