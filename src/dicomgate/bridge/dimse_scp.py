"""C-FIND / C-MOVE / C-GET answered by an upstream query source (``bridge/sources.py``).

``dimse/qr.py`` hands a request here when its called AE title is a key of
``query.ae_titles`` (or when ``query.dimse.source`` is not ``local``). The request is
decoded and checked exactly as for local queries; then:

* **C-FIND**: each upstream match is sent on as a pending response as soon as it is
  received, holding exactly the keys asked (PS3.4 C.4.1.1.3.2), the Query/Retrieve Level,
  and Specific Character Set ``ISO_IR 192`` when a value is not ASCII.
* **C-MOVE** to a ``dicomweb`` source: WADO-RS; each instance is spooled as its part
  arrives and sent on at once to the move destination (a pending response after each
  :data:`~dicomgate.dimse.qr.RETRIEVE_BATCH` instances or
  :data:`~dicomgate.dimse.qr.PENDING_INTERVAL` seconds).
* **C-MOVE** to a ``dimse`` source, ``move: relay``: relayed in the requestor's model,
  Move Destination translated by ``move_destination_map`` (the PACS sends the instances
  to that AE title itself, so it must know it); the PACS's pending and final responses
  are relayed, and a C-CANCEL-RQ of the requestor is passed on (PS3.4 C.4.2.3.2).
  ``move: forward``: C-GET from the PACS, each instance C-STOREd to the move destination
  (one of ours) as it arrives, as for a ``dicomweb`` source.
* **C-GET**: the source's instances (WADO-RS, or C-GET on the PACS) go back over the
  requestor's association as they arrive.

Upstream failures (PS3.4 C.4.1.1.4, C.4.2.1.5): unreachable / timed out / 5xx ->
0xA700 (C-FIND) or 0xA701 (C-MOVE, C-GET, before any sub-operation); the upstream refused
the request (HTTP 4xx, a DIMSE failure) -> 0xC000; the cause goes to the Error Comment
and to the log (``bridge.upstream_failed``). An upstream failing in the middle of a
retrieve ends it with the sub-operation counts so far (0xB000 / 0xA702).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode

from dicomgate.bridge.sources import (
    DimseSource,
    QuerySourceClient,
    Relay,
    Retrieved,
    UpstreamFailed,
    remove_spooled,
    sop_class_for,
)
from dicomgate.dimse.commands import Status, SubOperations, encode_response, encode_store_rq
from dicomgate.dimse.qr import (
    PENDING_INTERVAL,
    RETRIEVE_BATCH,
    Channel,
    QueryRetrieve,
    Request,
    _converted,
    _Refusal,
    dataset_offset,
    decode_identifier,
    identifier_level,
)
from dicomgate.dimse.scu import FALLBACK_SYNTAXES, can_send_uncompressed
from dicomgate.egress.base import Delivery
from dicomgate.egress.dimse import DimseSender
from dicomgate.observability.logging import uid_hash

log = logging.getLogger("dicomgate.bridge")

_QUERY_LEVEL = 0x00080052
_CHARSET = 0x00080005
_RETRIEVE_AE = 0x00080054
_CANCEL_POLL = 0.05  # s; how often a relayed C-MOVE looks for the requestor's C-CANCEL-RQ


class BridgedQR:
    """Serves Q/R requests from one upstream source (see the module docstring)."""

    def __init__(
        self,
        source: QuerySourceClient,
        timeout: float,
        *,
        move: str = "relay",
        move_destination_map: Mapping[str, str] | None = None,
    ) -> None:
        self.source = source
        self.timeout = timeout
        # A dimse source: ``relay`` the C-MOVE to the PACS, or ``forward`` (C-GET from the
        # PACS, C-STORE to the move destination ourselves).
        self.move_mode = move
        self.move_destination_map = dict(move_destination_map or {})

    async def serve(self, qr: QueryRetrieve, request: Request, channel: Channel) -> None:
        """Answer ``request``; raises ``_Refusal`` for a failure before any answer."""
        handler = {"find": self.find, "move": self.move, "get": self.get}[request.service.value]
        await handler(qr, request, channel)

    def _failed(self, request: Request, exc: UpstreamFailed, *, retrieve: bool) -> _Refusal:
        log.warning(
            "%s to %s failed: %s",
            request.service.value.upper(),
            self.source.name,
            exc,
            extra={
                "event": "bridge.upstream_failed",
                "source": self.source.name,
                "calling_ae": request.calling_ae,
            },
        )
        if exc.client_error:
            status = int(Status.UNABLE_TO_PROCESS)
        elif retrieve:
            status = int(Status.OUT_OF_RESOURCES_MATCHES)
        else:
            status = int(Status.OUT_OF_RESOURCES)
        return _Refusal(status, str(exc)[:64])

    # -- C-FIND ---------------------------------------------------------------------

    async def find(self, qr: QueryRetrieve, request: Request, channel: Channel) -> None:
        ds = decode_identifier(request.identifier, request.transfer_syntax)
        _level, level_text = identifier_level(ds, request.model)
        implicit = request.transfer_syntax == ImplicitVRLittleEndian
        sent = 0
        if "PATIENT" in request.model.value and level_text != "PATIENT":
            # Patient Root: Patient ID, the patient level's unique key, is returned with
            # every match (PS3.4 C.6.1), asked or not.
            ds.setdefault("PatientID", None)
        matches = self.source.find(level_text, ds, request.model)
        try:
            async for match in matches:
                if request.cancelled:
                    await qr._final(request, channel, Status.CANCEL)
                    return
                body = _response_identifier(ds, match, level_text, qr.config.ae_title)
                await channel.send(
                    request.context_id,
                    encode_response(
                        request.response_field,
                        request.command.message_id,
                        Status.PENDING,
                        sop_class_uid=request.command.affected_sop_class_uid,
                        has_dataset=True,
                    ),
                    encode(body, implicit, True),
                )
                sent += 1
        except UpstreamFailed as exc:
            raise self._failed(request, exc, retrieve=False) from None
        finally:
            await matches.aclose()  # type: ignore[attr-defined]
        await qr._final(request, channel, Status.CANCEL if request.cancelled else Status.SUCCESS)
        log.info(
            "C-FIND %s via %s: %d matches in %.1f ms",
            level_text,
            self.source.name,
            sent,
            (time.monotonic() - request.started) * 1000,
            extra={"event": "find.answered", "calling_ae": request.calling_ae},
        )

    # -- C-MOVE ---------------------------------------------------------------------

    async def move(self, qr: QueryRetrieve, request: Request, channel: Channel) -> None:
        destination = request.command.move_destination
        if isinstance(self.source, DimseSource) and self.move_mode == "relay":
            await self._relay_move(qr, request, channel, destination)
            return
        target = qr.targets.get(destination)
        if target is None:
            raise _Refusal(
                Status.MOVE_DESTINATION_UNKNOWN, f"unknown move destination {destination[:16]!r}"
            )
        sender = DimseSender(
            f"c-move:{destination}",
            # Instances are sent one at a time: one association, replaced (not joined by a
            # second one) when an instance needs a context it lacks. A receiver serving one
            # association at a time (DCMTK storescp) would otherwise hold the second one
            # back until the pool released the first, idle_timeout later.
            target.model.model_copy(update={"max_associations": 1}),
            calling_ae=target.model.calling_ae_title or qr.config.ae_title,
            move_originator=(request.calling_ae, request.command.message_id),
        )
        try:

            async def send_one(item: Retrieved) -> tuple[bool, bool]:
                delivery = Delivery(
                    job_id=0,
                    path=item.path,
                    sop_class_uid=item.sop_class_uid,
                    sop_instance_uid=item.sop_instance_uid,
                    transfer_syntax_uid=item.transfer_syntax_uid,
                    study_instance_uid="",
                    series_instance_uid="",
                    size=item.size,
                    route="c-move",
                )
                (outcome,) = await sender.send([delivery])
                return outcome.delivered, bool(outcome.warning)

            await self._retrieve(qr, request, channel, send_one)
        finally:
            await sender.close()

    async def _relay_move(
        self, qr: QueryRetrieve, request: Request, channel: Channel, destination: str
    ) -> None:
        """C-MOVE relayed to the PACS, Move Destination translated by
        ``move_destination_map``; a C-CANCEL-RQ of the requestor is passed on (PS3.4
        C.4.2.3.2) and the PACS's answer to it relayed."""
        assert isinstance(self.source, DimseSource)
        ds = decode_identifier(request.identifier, request.transfer_syntax)
        level, _ = identifier_level(ds, request.model)
        implicit = request.transfer_syntax == ImplicitVRLittleEndian
        upstream_destination = self.move_destination_map.get(destination, destination)
        relay = Relay()
        responses = self.source.move_raw(
            ds, sop_class_for(request.model, level.name, "move"), upstream_destination, relay
        )
        final: tuple[Dataset, Dataset | None] | None = None
        cancel_asked = 0.0  # when the requestor's C-CANCEL-RQ was passed on
        next_response: asyncio.Future[tuple[Dataset, Dataset | None]] | None = None
        try:
            while True:
                if next_response is None:
                    next_response = asyncio.ensure_future(anext(responses))
                done, _ = await asyncio.wait({next_response}, timeout=_CANCEL_POLL)
                if request.cancelled and not cancel_asked:
                    cancel_asked = time.monotonic()
                    relay.cancel()  # queues the C-CANCEL-RQ; does not block
                if not done:
                    if cancel_asked and time.monotonic() - cancel_asked > self.timeout:
                        break  # the PACS ignores the cancel: answer it ourselves
                    continue
                try:
                    status, found = next_response.result()
                except StopAsyncIteration:
                    break
                next_response = None
                code = int(status.get("Status", 0xC000))
                if code in (0xFF00, 0xFF01):
                    await qr._pending(request, channel, _counts(status))
                    continue
                final = (status, found)
                break
        except UpstreamFailed as exc:
            if not cancel_asked:
                raise self._failed(request, exc, retrieve=True) from None
        finally:
            if next_response is not None and not next_response.done():
                next_response.cancel()
            await responses.aclose()  # type: ignore[attr-defined]
        if final is None and cancel_asked:
            log.info(
                "C-MOVE relayed to %s: cancelled, no final answer from it",
                self.source.name,
                extra={"event": "move.answered", "calling_ae": request.calling_ae},
            )
            await qr._final(request, channel, Status.CANCEL, counts=SubOperations(None))
            return
        if final is None:
            missing = UpstreamFailed(f"{self.source.name} sent no final C-MOVE response")
            raise self._failed(request, missing, retrieve=True)
        status, found = final
        code = int(status.get("Status", 0xC000))
        if code not in (0x0000, 0xB000, 0xFE00, 0xA702):
            log.warning(
                "C-MOVE relayed to %s: 0x%04X",
                self.source.name,
                code,
                extra={"event": "bridge.upstream_failed", "source": self.source.name},
            )
        log.info(
            "C-MOVE relayed to %s: 0x%04X%s",
            self.source.name,
            code,
            ", cancel passed on" if relay.cancel_sent else "",
            extra={"event": "move.answered", "calling_ae": request.calling_ae},
        )
        await qr._final(
            request,
            channel,
            code,
            str(status.get("ErrorComment", "") or ""),
            counts=_counts(status),
            identifier=encode(found, implicit, True) if found is not None and len(found) else None,
        )

    # -- C-GET ----------------------------------------------------------------------

    async def get(self, qr: QueryRetrieve, request: Request, channel: Channel) -> None:
        async def send_one(item: Retrieved) -> tuple[bool, bool]:
            code = await _get_one(qr, request, channel, item)
            if code is None:
                return False, False
            if code in (0xB000, 0xB006, 0xB007):
                return True, True
            return code == 0, False

        await self._retrieve(qr, request, channel, send_one)

    # -- shared ---------------------------------------------------------------------

    async def _retrieve(
        self, qr: QueryRetrieve, request: Request, channel: Channel, send_one: Any
    ) -> None:
        ds = decode_identifier(request.identifier, request.transfer_syntax)
        _level, level_text = identifier_level(ds, request.model)
        try:
            retrieval = await self.source.retrieve(level_text, ds, request.model)
        except UpstreamFailed as exc:
            raise self._failed(request, exc, retrieve=True) from None
        counts = SubOperations(retrieval.total if retrieval.total is not None else 0)
        failed_uids: list[str] = []
        last_pending = time.monotonic()
        since_pending = 0
        instances = retrieval.instances
        upstream_error: UpstreamFailed | None = None
        try:
            async for item in instances:
                try:
                    if request.cancelled:
                        break
                    delivered, warning = await send_one(item)
                finally:
                    remove_spooled(item)
                if not delivered:
                    counts.failed += 1
                    failed_uids.append(item.sop_instance_uid)
                elif warning:
                    counts.warning += 1
                else:
                    counts.completed += 1
                done = counts.completed + counts.failed + counts.warning
                counts.remaining = max((retrieval.total or 0) - done, 0)
                since_pending += 1
                now = time.monotonic()
                if since_pending >= RETRIEVE_BATCH or now - last_pending >= PENDING_INTERVAL:
                    since_pending, last_pending = 0, now
                    await qr._pending(request, channel, counts)
        except UpstreamFailed as exc:
            upstream_error = exc
        finally:
            await instances.aclose()  # type: ignore[attr-defined]
        if upstream_error is not None:
            if not (counts.completed or counts.warning or counts.failed):
                raise self._failed(request, upstream_error, retrieve=True)
            self._failed(request, upstream_error, retrieve=True)
            counts.failed += counts.remaining or 0
            counts.remaining = 0
            if not counts.failed:
                counts.failed = 1
        if not request.cancelled:
            counts.remaining = 0
        await qr._retrieve_final(request, channel, counts, failed_uids)


def _counts(status: Dataset) -> SubOperations:
    def get(keyword: str) -> int:
        value = status.get(keyword)
        return int(value) if value not in (None, "") else 0

    remaining = status.get("NumberOfRemainingSuboperations")
    return SubOperations(
        int(remaining) if remaining not in (None, "") else None,
        get("NumberOfCompletedSuboperations"),
        get("NumberOfFailedSuboperations"),
        get("NumberOfWarningSuboperations"),
    )


def _response_identifier(asked: Dataset, match: Dataset, level: str, our_ae: str) -> Dataset:
    """The keys of ``asked`` with their values in ``match`` (PS3.4 C.4.1.1.3.2)."""
    out = Dataset()
    for element in asked:
        if element.tag in (_QUERY_LEVEL, _CHARSET):
            continue
        if element.tag == _RETRIEVE_AE:
            out.add_new(_RETRIEVE_AE, "AE", our_ae)
            continue
        found = match.get(element.tag)
        if found is not None:
            out.add(found)
        else:
            out.add_new(element.tag, element.VR, None)
    out.QueryRetrieveLevel = level
    text = "".join(
        str(e.value) for e in out.iterall() if e.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC")
    )
    if not text.isascii():
        out.SpecificCharacterSet = "ISO_IR 192"
    return out


async def _get_one(
    qr: QueryRetrieve, request: Request, channel: Channel, item: Retrieved
) -> int | None:
    """One C-GET sub-operation of a spooled instance; its C-STORE-RSP status, or None."""
    contexts = channel.storage_contexts(item.sop_class_uid)
    as_is = next((cid for cid, ts in contexts if ts == item.transfer_syntax_uid), None)
    payload: bytes | tuple[Any, int]
    try:
        if as_is is not None:
            context_id = as_is
            payload = (item.path, await asyncio.to_thread(dataset_offset, item.path))
        else:
            fallback = next(((cid, ts) for cid, ts in contexts if ts in FALLBACK_SYNTAXES), None)
            if fallback is None or not can_send_uncompressed(UID(item.transfer_syntax_uid)):
                _sub_failed(request, item, "no accepted context for its class and syntax")
                return None
            context_id = fallback[0]
            payload = await asyncio.to_thread(
                _converted, item.path, item.transfer_syntax_uid, fallback[1]
            )
    except Exception as exc:  # a codec or file failure: this instance only
        _sub_failed(request, item, f"cannot send: {type(exc).__name__}")
        return None
    message_id = channel.next_message_id()
    command = encode_store_rq(
        message_id, item.sop_class_uid, item.sop_instance_uid, priority=request.command.priority
    )
    response = await channel.store(context_id, command, message_id, payload, qr.config.move_timeout)
    return int(response.status if response.status is not None else Status.UNABLE_TO_PROCESS)


def _sub_failed(request: Request, item: Retrieved, why: str) -> None:
    log.warning(
        "sub-operation failed: %s",
        why,
        extra={
            "event": f"{request.service.value}.suboperation_failed",
            "calling_ae": request.calling_ae,
            "sop": uid_hash(item.sop_instance_uid),
        },
    )


def build_bridges(
    query: Any,
    destinations: Mapping[str, Any],
    *,
    our_ae: str,
    spool_dir: Any,
) -> tuple[dict[str, BridgedQR | None], BridgedQR | None]:
    """The bridge of each virtual AE title (None: local), and the one for ``query.dimse``
    (None: local), from the ``query`` and ``destinations`` settings."""
    from dicomgate.bridge.sources import DicomwebSource
    from dicomgate.egress.models import DicomwebDestination, DimseDestination

    made: dict[tuple[Any, ...], BridgedQR] = {}

    def bridge(entry: Any) -> BridgedQR | None:
        source, timeout = entry.source, entry.timeout
        if source == "local":
            return None
        key = (source, timeout, entry.move, tuple(sorted(entry.move_destination_map.items())))
        if key in made:
            return made[key]
        model = destinations[source]
        client: QuerySourceClient
        if isinstance(model, DicomwebDestination):
            client = DicomwebSource(source, model, spool_dir=spool_dir, timeout=timeout)
        elif isinstance(model, DimseDestination):
            client = DimseSource(
                source, model, calling_ae=our_ae, spool_dir=spool_dir, timeout=timeout
            )
        else:  # config validation refuses other kinds
            raise ValueError(f"destination {source!r} cannot answer queries")
        made[key] = BridgedQR(
            client,
            timeout,
            move=entry.move,
            move_destination_map=entry.move_destination_map,
        )
        return made[key]

    by_ae = {t: bridge(q) for t, q in query.ae_titles.items()}
    default = bridge(query.dimse)
    return by_ae, default


__all__ = ["BridgedQR", "build_bridges"]
