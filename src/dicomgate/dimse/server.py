"""Event-driven DIMSE acceptor: C-ECHO, C-STORE, and the Query/Retrieve services.

Why not pynetdicom's SCP: its reactor threads poll with 1 ms sleeps (pynetdicom #650,
#917), capping one association near 330-450 instances/s here, below Orthanc. This acceptor
runs on asyncio, wakes on socket readiness, and writes P-DATA fragments of a data set
straight to the spool file as they arrive (DESIGN rule 2), so memory stays flat whatever
the instance size. pynetdicom stays our SCU (``scu.py``). See DESIGN.md "DIMSE".

State machine: PS3.8 9.2, acceptor side (Sta2 -> Sta3 -> Sta6 -> Sta13).

C-FIND, C-MOVE and C-GET (``qr.py``) run as tasks beside the read loop, which keeps reading
so that it sees a C-CANCEL-RQ and, for C-GET, the C-STORE-RSPs of the sub-operations. While
an operation runs, every message is written under the association's write lock, so the
fragments of two messages never interleave; C-STORE and C-ECHO take no lock otherwise.

This module is the listeners and the association/PDU state machine; what each command
does is in ``messages.py`` (the base class of :class:`DimseServer`), the per-association
state in ``session.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from dicomgate import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomgate.bridge.dimse_scp import build_bridges
from dicomgate.bridge.models import QueryConfig
from dicomgate.config import DimseConfig
from dicomgate.dimse import pdu
from dicomgate.dimse.messages import DimseMessages
from dicomgate.dimse.negotiation import (
    ae_matches,
    negotiate,
    negotiate_extended,
    negotiate_roles,
)
from dicomgate.dimse.qr import QueryRetrieve, move_targets
from dicomgate.dimse.session import READ_CHUNK as _READ_CHUNK
from dicomgate.dimse.session import Abort as _Abort
from dicomgate.dimse.session import Association as _Association
from dicomgate.dimse.session import Incoming as _Incoming
from dicomgate.dimse.session import NotAuthorized, status_for
from dicomgate.dimse.session import PduBody as _PduBody
from dicomgate.dimse.session import PeerGone as _PeerGone
from dicomgate.dimse.session import reject_code as _reject_code
from dicomgate.dimse.tls_listener import TlsListener, handshake_reason
from dicomgate.errors import DicomgateError
from dicomgate.ingest import Ingestor
from dicomgate.security.dimse_access import AeHostBinding
from dicomgate.security.ip_filter import IpAllowList
from dicomgate.security.tls import ServerTls

log = logging.getLogger("dicomgate.dimse")


class _PeerAborted(_PeerGone):
    """The peer sent an A-ABORT during the association."""


_MAX_RQ_LENGTH = 1 << 20  # an A-ASSOCIATE-RQ larger than 1 MiB is not a real one
_MAX_COMMAND_LENGTH = 1 << 16
_WHOLE_PDU = 1 << 20  # P-DATA-TF PDUs up to this size are read in one call
_DRAIN_ABOVE = 1 << 18


class DimseServer(DimseMessages):
    """Accepts associations; serves C-ECHO and C-STORE into an :class:`Ingestor`, and
    C-FIND, C-MOVE and C-GET from its index and store (``qr.py``).

    ``destinations`` (the gateway's ``destinations``) adds the ``dimse`` ones as move
    destinations, beside ``dimse.move_destinations``.
    """

    def __init__(
        self,
        config: DimseConfig,
        ingestor: Ingestor,
        destinations: Mapping[str, Any] | None = None,
        query: QueryConfig | None = None,
    ) -> None:
        self.config = config
        self.ingestor = ingestor
        # query: where C-FIND/C-MOVE/C-GET go, by called AE title (``bridge/``).
        bridges, default_bridge = build_bridges(
            query or QueryConfig(),
            destinations or {},
            our_ae=config.ae_title,
            spool_dir=ingestor.store.spool_dir,
        )
        self.virtual_aes = frozenset(bridges)  # accepted even with check_called_ae
        self.qr = QueryRetrieve(
            config,
            ingestor.index,
            ingestor.store,
            move_targets(config, destinations),
            bridges,
            default_bridge,
        )
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_ae: Counter[str] = Counter()
        self._active = 0
        self.port = config.port
        # DICOM TLS (PS3.15 B.1): its own listener; the context is loaded in start().
        self.tls: ServerTls | None = None
        self.tls_port = config.tls.port if config.tls is not None else 0
        self._tls_listener: TlsListener | None = None
        self._tls_watch: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._allowed_ips = IpAllowList(config.allowed_ips) if config.allowed_ips else None
        self._ae_hosts = AeHostBinding(config.ae_hosts)

    @property
    def listening(self) -> bool:
        serving = [s.is_serving() for s in (self._server,) if s is not None]
        if self._tls_listener is not None:
            serving.append(self._tls_listener.serving)
        return bool(serving) and all(serving)

    async def start(self) -> None:
        """Listen on ``dimse.port`` (unless ``tls.plain`` is false) and ``dimse.tls.port``.

        Raises :class:`DicomgateError` naming ``dimse.tls`` when the certificate, key or CA
        do not load or the TLS port cannot be bound; :class:`OSError` for the plain port.
        """
        cfg = self.config
        if cfg.tls is not None:
            # Each handshake (tls_listener.py, bounded by acse_timeout) takes the context of
            # the moment; a reload builds a fresh one and swaps it in, so a CA removed from
            # the bundle is no longer trusted (loading into a context only adds CAs).
            self.tls = ServerTls(cfg.tls, section="dimse.tls", swap=True)
            self.tls.load()
        if cfg.tls is None or cfg.tls.plain:
            self._server = await self._listen(cfg.port, secure=False)
            self.port = self._server.sockets[0].getsockname()[1]
            log.info(
                "listening on %s:%d as %s",
                cfg.host,
                self.port,
                cfg.ae_title,
                extra={"event": "dimse.listening"},
            )
        if cfg.tls is not None and self.tls is not None:
            tls = self.tls
            self._tls_listener = TlsListener(
                cfg.host,
                cfg.tls.port,
                lambda: tls.context,
                handshake_timeout=cfg.acse_timeout,
                allows=lambda peer_ip: not self._ip_refused(peer_ip),
                on_connected=lambda r, w, peer_ip: self._on_connection(r, w, secure=True),
                on_refused=self._handshake_failed,
                on_probe=self._probed,
            )
            try:
                await self._tls_listener.start()
            except OSError as exc:
                raise DicomgateError(
                    f"dimse.tls.port: cannot listen on {cfg.host}:{cfg.tls.port}:"
                    f" {exc.strerror or exc}"
                ) from exc
            self.tls_port = self._tls_listener.port
            log.info(
                "listening for DICOM TLS on %s:%d as %s",
                cfg.host,
                self.tls_port,
                cfg.ae_title,
                extra={"event": "dimse.listening", "tls": True},
            )
            if cfg.tls.check_interval > 0:
                self._tls_watch = asyncio.get_running_loop().create_task(
                    self.tls.watch(self._stopping), name="dimse-tls-watch"
                )

    async def _listen(self, port: int, *, secure: bool) -> asyncio.Server:
        def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._on_connection(reader, writer, secure=secure)

        return await asyncio.start_server(
            on_connection,
            self.config.host,
            port,
            limit=_READ_CHUNK,
            reuse_address=True,
            backlog=128,
        )

    def reload_tls(self, why: str = "sighup") -> None:
        """Load the DICOM TLS certificate, key and CA again, for new associations."""
        if self.tls is not None:
            self.tls.reload(why)

    async def stop(self, grace: float) -> None:
        """Stop accepting; give open associations ``grace`` seconds, then abort them."""
        self._stopping.set()
        if self._tls_watch is not None:
            self._tls_watch.cancel()
        if self._tls_listener is not None:
            self._tls_listener.close()
        if self._server is not None:
            self._server.close()
        if self._tasks:
            log.info(
                "waiting up to %.0f s for %d associations",
                grace,
                len(self._tasks),
                extra={"event": "dimse.draining"},
            )
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        log.info("stopped", extra={"event": "dimse.stopped"})

    # -- connection handling ------------------------------------------------------------

    def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, secure: bool
    ) -> None:
        """A new connection (on the TLS port: after the handshake, ``secure``)."""
        peer = writer.get_extra_info("peername")
        peer_ip = str(peer[0]) if peer else "?"
        if not secure and self._ip_refused(peer_ip):  # TLS: checked before the handshake
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Without it every PDU may wait ~40 ms for a delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.get_running_loop().create_task(
            self._serve(_Association(reader, writer, peer_ip))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ip_refused(self, peer_ip: str) -> bool:
        """dimse.allowed_ips: a refused peer is closed before anything is read or sent
        (docs/security.md)."""
        if self._allowed_ips is None or self._allowed_ips.allows(peer_ip):
            return False
        log.warning(
            "connection refused: %s is not in dimse.allowed_ips",
            peer_ip,
            extra={"event": "association.rejected", "reason": "ip_not_allowed", "peer": peer_ip},
        )
        return True

    def _probed(self, peer_ip: str) -> None:
        """A TCP connection closed before any byte: a load balancer's health check, most
        likely. Not a refused handshake (no audit row, no warning): DEBUG, and counted
        (``dicomgate_dimse_tls_probes_total``) by the events handler, which is handed the
        record even below the logger's level."""
        record = log.makeRecord(
            log.name,
            logging.DEBUG,
            __file__,
            0,
            "connection to the DICOM TLS port closed before any byte (a health check?)",
            (),
            None,
            extra={"event": "dimse.tls_probe", "peer": peer_ip},
        )
        log.handle(record)

    def _handshake_failed(self, peer_ip: str, exc: BaseException) -> None:
        log.warning(
            "DICOM TLS handshake failed: %s",
            exc,
            extra={
                "event": "association.rejected",
                "reason": "tls_handshake_failed",
                "tls_error": handshake_reason(exc),
                "peer": peer_ip,
            },
        )

    async def _serve(self, assoc: _Association) -> None:
        counted = False
        try:
            counted = await self._establish(assoc)
            if counted:
                await self._data_transfer(assoc)
        except _Abort as exc:
            log.warning(
                "association aborted: %s",
                exc,
                extra={
                    "event": "association.aborted",
                    "calling_ae": assoc.calling_ae,
                    "peer": assoc.peer_ip,
                },
            )
            await self._send(assoc, pdu.encode_abort(exc.reason))
        except _PeerAborted as exc:
            # The peer's A-ABORT (PS3.8 7.3) ends it as aborted, not lost: counted as
            # associations_ended_total{how="aborted"}, like an abort of ours.
            log.info(
                "association aborted by the peer: %s",
                exc,
                extra={
                    "event": "association.aborted",
                    "by": "peer",
                    "calling_ae": assoc.calling_ae,
                    "peer": assoc.peer_ip,
                },
            )
        except _PeerGone as exc:
            log.info(
                "association ended: %s",
                exc,
                extra={
                    "event": "association.lost",
                    "calling_ae": assoc.calling_ae,
                    "peer": assoc.peer_ip,
                },
            )
        except asyncio.CancelledError:
            log.warning(
                "association aborted at shutdown",
                extra={"event": "association.aborted", "calling_ae": assoc.calling_ae},
            )
            await self._send(assoc, pdu.encode_abort(pdu.AbortReason.NOT_SPECIFIED))
        except Exception:
            log.exception("association failed", extra={"event": "association.internal_error"})
            await self._send(assoc, pdu.encode_abort(pdu.AbortReason.NOT_SPECIFIED))
        finally:
            if counted:
                self._active -= 1
                self._per_ae[assoc.calling_ae] -= 1
                if self._per_ae[assoc.calling_ae] <= 0:
                    del self._per_ae[assoc.calling_ae]
            assoc.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(assoc.writer.wait_closed(), 2)

    async def _send(self, assoc: _Association, data: bytes) -> None:
        try:
            assoc.writer.write(data)
            # Waiting for drain costs a scheduling round per response; only wait when the
            # peer is not reading (flow control), which is what drain is for.
            if assoc.writer.transport.get_write_buffer_size() > _DRAIN_ABOVE:
                async with asyncio.timeout(self.config.network_timeout):
                    await assoc.writer.drain()
        except (OSError, TimeoutError, ConnectionError) as exc:
            raise _PeerGone(f"cannot send: {exc}") from None

    async def _read(self, assoc: _Association, n: int, timeout: float) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await assoc.reader.readexactly(n)
        except TimeoutError:
            raise _Abort(f"no data for {timeout:.0f} s", pdu.AbortReason.NOT_SPECIFIED) from None
        except asyncio.IncompleteReadError:
            raise _PeerGone("peer closed the connection") from None
        except (OSError, ConnectionError) as exc:
            raise _PeerGone(f"connection error: {exc}") from None

    async def _establish(self, assoc: _Association) -> bool:
        """Sta2 -> Sta6. Returns True when the association was accepted (and counted)."""
        cfg = self.config
        head = await self._read(assoc, 6, cfg.acse_timeout)
        pdu_type, length = head[0], struct.unpack(">I", head[2:6])[0]
        if pdu_type == pdu.PduType.ABORT:
            # PS3.8 9.2.3 state table: Sta2 + Evt16 (A-ABORT PDU received) -> AA-2, close
            # the transport connection; nothing is sent (an A-ABORT is never answered).
            raise _PeerGone("peer sent A-ABORT before any association")
        if pdu_type != pdu.PduType.ASSOCIATE_RQ:
            raise _Abort(
                f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                pdu.AbortReason.UNEXPECTED_PDU
                if pdu_type in pdu.PduType._value2member_map_
                else pdu.AbortReason.UNRECOGNIZED_PDU,
            )
        if length > _MAX_RQ_LENGTH or length < 68:
            raise _Abort(
                f"A-ASSOCIATE-RQ with absurd length {length}",
                pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        body = await self._read(assoc, length, cfg.acse_timeout)
        try:
            rq = pdu.parse_associate_rq(body)
        except pdu.PduError as exc:
            raise _Abort(f"malformed A-ASSOCIATE-RQ: {exc}", exc.reason) from None
        assoc.calling_ae, assoc.called_ae = rq.calling_ae, rq.called_ae
        rejection = self._rejection(rq)
        code = _reject_code(*rejection[1:3]) if rejection is not None else ""
        if rejection is None and 0 < rq.max_pdu_length < pdu.MIN_MAX_PDU_LENGTH:
            # A P-DATA-TF whose variable field is below 7 bytes cannot carry one byte of a
            # message (PS3.8 9.3.5: a PDV item header is 6 bytes; D.1). The maximum length
            # is the requestor's user information (PS3.7 D.3.3.1), so the refusal is the
            # service user's; PS3.8 Table 9-21 has no closer reason than 1, no reason given.
            # Permanent: the same request would be refused again.
            rejection = (
                pdu.RejectResult.PERMANENT,
                pdu.RejectSource.SERVICE_USER,
                pdu.RejectReason.NO_REASON,
                f"maximum PDU length {rq.max_pdu_length} is too small to carry data"
                f" (at least {pdu.MIN_MAX_PDU_LENGTH}: a PDV item header is 6 bytes)",
            )
            code = "max_pdu_length"
        if rejection is None and not await self._ae_hosts.allows(rq.calling_ae, assoc.peer_ip):
            # dimse.ae_hosts: an AE title is not a credential; PS3.8 9.3.4 reason 3.
            rejection = (
                pdu.RejectResult.PERMANENT,
                pdu.RejectSource.SERVICE_USER,
                pdu.RejectReason.CALLING_AE_NOT_RECOGNIZED,
                f"calling AE title {rq.calling_ae!r} may not call from {assoc.peer_ip}",
            )
            code = "ae_host"
        if rejection is not None:
            result, source, reason, why = rejection
            log.warning(
                "association rejected: %s",
                why,
                extra={
                    "event": "association.rejected",
                    "reason": code,
                    "calling_ae": rq.calling_ae,
                    "called_ae": rq.called_ae,
                    "peer": assoc.peer_ip,
                },
            )
            await self._send(assoc, pdu.encode_associate_rj(result, source, reason))
            return False
        answers = negotiate(rq.contexts)
        for ctx, answer in zip(rq.contexts, answers, strict=True):
            if answer.result == pdu.ContextResult.ACCEPTANCE:
                assoc.contexts[ctx.context_id] = (ctx.abstract_syntax, answer.transfer_syntax)
        assoc.peer_max_pdu = rq.max_pdu_length
        accepted = {sop for sop, _ in assoc.contexts.values()}
        # SCP/SCU role selection (PS3.7 D.3.3.4): a C-GET requestor takes the SCP role of the
        # storage classes it wants to receive; extended negotiation: C-FIND options.
        roles = negotiate_roles(rq.roles, accepted)
        assoc.scp_role_classes = {r.sop_class_uid for r in roles if r.scp_role}
        extended = negotiate_extended(rq.extended, accepted)
        fuzzy = {e.sop_class_uid for e in extended if len(e.info) > 2 and e.info[2]}
        assoc.fuzzy_contexts = {cid for cid, (sop, _) in assoc.contexts.items() if sop in fuzzy}
        combined = {e.sop_class_uid for e in extended if len(e.info) > 1 and e.info[1]}
        assoc.combined_datetime_contexts = {
            cid for cid, (sop, _) in assoc.contexts.items() if sop in combined
        }
        assoc.may_store = ae_matches(rq.calling_ae, cfg.allow.store)
        self._active += 1
        self._per_ae[rq.calling_ae] += 1
        await self._send(
            assoc,
            pdu.encode_associate_ac(
                rq,
                answers,
                max_pdu_length=cfg.max_pdu_size,
                implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                implementation_version_name=IMPLEMENTATION_VERSION_NAME,
                roles=roles,
                extended=extended,
            ),
        )
        log.info(
            "association accepted",
            extra={
                "event": "association.accepted",
                "calling_ae": rq.calling_ae,
                "peer": assoc.peer_ip,
                "contexts": f"{len(assoc.contexts)}/{len(rq.contexts)}",
                "tls": assoc.writer.get_extra_info("ssl_object") is not None,
            },
        )
        return True

    def _rejection(
        self, rq: pdu.AssociateRQ
    ) -> tuple[pdu.RejectResult, pdu.RejectSource, int, str] | None:
        cfg = self.config
        perm, trans = pdu.RejectResult.PERMANENT, pdu.RejectResult.TRANSIENT
        user = pdu.RejectSource.SERVICE_USER
        if not rq.protocol_version & 1:
            return perm, pdu.RejectSource.SERVICE_PROVIDER_ACSE, 2, "protocol version unsupported"
        if rq.application_context != pdu.APPLICATION_CONTEXT:
            return (
                perm,
                user,
                pdu.RejectReason.APPLICATION_CONTEXT_NOT_SUPPORTED,
                ("application context not supported"),
            )
        invalid = rq.invalid_ae_title()  # PS3.5 6.2: e.g. a newline, which forges log lines
        if invalid is not None:
            return perm, user, invalid[0], invalid[1]
        if (
            cfg.check_called_ae
            and rq.called_ae != cfg.ae_title
            and rq.called_ae not in self.virtual_aes
        ):
            return (
                perm,
                user,
                pdu.RejectReason.CALLED_AE_NOT_RECOGNIZED,
                (f"called AE title {rq.called_ae!r} is not {cfg.ae_title!r}"),
            )
        if not ae_matches(rq.calling_ae, cfg.allowed_calling_aets):
            return (
                perm,
                user,
                pdu.RejectReason.CALLING_AE_NOT_RECOGNIZED,
                (f"calling AE title {rq.calling_ae!r} is not allowed"),
            )
        if self._active >= cfg.max_associations:
            return (
                trans,
                pdu.RejectSource.SERVICE_PROVIDER_PRESENTATION,
                2,
                (f"limit of {cfg.max_associations} associations reached"),
            )
        if self._per_ae[rq.calling_ae] >= cfg.max_associations_per_ae:
            return (
                trans,
                pdu.RejectSource.SERVICE_PROVIDER_PRESENTATION,
                2,
                (f"limit of {cfg.max_associations_per_ae} associations per calling AE reached"),
            )
        return None

    # -- Sta6: data transfer ------------------------------------------------------------

    async def _data_transfer(self, assoc: _Association) -> None:
        cfg = self.config
        command_buf = bytearray()
        command_ctx = 0
        incoming: _Incoming | None = None
        try:
            while True:
                timeout = cfg.dimse_timeout if (incoming or command_buf) else cfg.network_timeout
                try:
                    head = await self._read(assoc, 6, timeout)
                except _Abort:
                    # An operation of ours (a long C-MOVE) keeps the association busy.
                    if assoc.operations or (time.monotonic() - assoc.last_operation_end < timeout):
                        continue
                    raise
                pdu_type, length = head[0], struct.unpack(">I", head[2:6])[0]
                if pdu_type == pdu.PduType.RELEASE_RQ:
                    if length != 4:  # PS3.8 9.3.6: four reserved bytes
                        raise _Abort(
                            f"A-RELEASE-RQ of length {length}",
                            pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                        )
                    await self._read(assoc, length, cfg.acse_timeout)
                    if incoming is not None and incoming.spool is not None:
                        incoming.spool.discard()
                    await self._end_operations(assoc)
                    await self._send(assoc, pdu.encode_release_rp())
                    log.info(
                        "association released",
                        extra={
                            "event": "association.released",
                            "calling_ae": assoc.calling_ae,
                            "stored": assoc.stored,
                            "failed": assoc.failed,
                        },
                    )
                    return
                if pdu_type == pdu.PduType.ABORT:
                    if incoming is not None and incoming.spool is not None:
                        incoming.spool.discard()
                    raise _PeerAborted("peer sent A-ABORT")
                if pdu_type != pdu.PduType.P_DATA_TF:
                    if incoming is not None and incoming.spool is not None:
                        incoming.spool.discard()
                    known = pdu_type in pdu.PduType._value2member_map_
                    raise _Abort(
                        f"unexpected PDU type 0x{pdu_type:02X} during data transfer",
                        pdu.AbortReason.UNEXPECTED_PDU
                        if known
                        else pdu.AbortReason.UNRECOGNIZED_PDU,
                    )
                if cfg.max_pdu_size and length > cfg.max_pdu_size:
                    # PS3.8 D.1: the sender must respect the maximum we announced; a
                    # longer PDU is a broken or hostile peer, refused before its body.
                    if incoming is not None and incoming.spool is not None:
                        incoming.spool.discard()
                    raise _Abort(
                        f"P-DATA-TF of {length} bytes, above the {cfg.max_pdu_size} announced",
                        pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                    )
                remaining = length
                whole = length <= _WHOLE_PDU
                body = _PduBody(
                    await self._read(assoc, length, cfg.dimse_timeout) if whole else None
                )
                while remaining > 0:
                    if remaining < 6:
                        raise _Abort(
                            "P-DATA-TF with a truncated PDV item",
                            pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                        )
                    item = (
                        body.take(6)
                        if body.view is not None
                        else await self._read(assoc, 6, cfg.dimse_timeout)
                    )
                    item_length, context_id, control = struct.unpack(">IBB", item)
                    data_length = item_length - 2
                    if item_length < 2 or data_length + 6 > remaining:
                        raise _Abort(
                            f"PDV item length {item_length} does not fit its PDU",
                            pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                        )
                    remaining -= 6 + data_length
                    if context_id not in assoc.contexts:
                        raise _Abort(
                            f"PDV on presentation context {context_id}, not accepted",
                            pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                        )
                    is_command, last = bool(control & 1), bool(control & 2)
                    if is_command:
                        if incoming is not None:
                            raise _Abort(
                                "command fragment while a data set is arriving",
                                pdu.AbortReason.UNEXPECTED_PDU_PARAMETER,
                            )
                        if command_buf and context_id != command_ctx:
                            raise _Abort(
                                "command fragments on different contexts",
                                pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                            )
                        command_ctx = context_id
                        command_buf += (
                            body.take(data_length)
                            if body.view is not None
                            else await self._read(assoc, data_length, cfg.dimse_timeout)
                        )
                        if len(command_buf) > _MAX_COMMAND_LENGTH:
                            raise _Abort(
                                "command set larger than 64 KiB",
                                pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
                            )
                        if last:
                            raw = bytes(command_buf)
                            command_buf.clear()
                            incoming = await self._on_command(assoc, context_id, raw)
                    else:
                        if incoming is None or context_id != incoming.context_id:
                            raise _Abort(
                                "data set fragment without a command on its context",
                                pdu.AbortReason.UNEXPECTED_PDU_PARAMETER,
                            )
                        if body.view is not None:
                            self._write_fragment(incoming, body.take(data_length))
                        else:
                            await self._receive_fragment(assoc, incoming, data_length)
                        if last:
                            done, incoming = incoming, None
                            await self._finish_store(assoc, done)
        except BaseException:
            # Whatever ends the association mid-instance (timeout, abort, bug), the half
            # data set must not stay in the spool.
            if incoming is not None and incoming.spool is not None:
                incoming.spool.discard()
            for _, task in assoc.operations.values():
                task.cancel()
            raise


__all__ = ["DimseServer", "NotAuthorized", "status_for"]
