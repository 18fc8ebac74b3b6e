"""Event-driven DIMSE acceptor for the ingest services (C-ECHO, C-STORE).

Why not pynetdicom's SCP: its reactor threads poll with 1 ms sleeps (pynetdicom #650,
#917), capping one association near 330-450 instances/s here, below Orthanc. This acceptor
runs on asyncio, wakes on socket readiness, and writes P-DATA fragments of a data set
straight to the spool file as they arrive (DESIGN rule 2), so memory stays flat whatever
the instance size. pynetdicom stays our SCU (``scu.py``). See DESIGN.md "DIMSE".

State machine: PS3.8 9.2, acceptor side (Sta2 -> Sta3 -> Sta6 -> Sta13).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field

from dicomgate import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomgate.config import DimseConfig
from dicomgate.dimse import pdu
from dicomgate.dimse.commands import (
    Command,
    CommandError,
    CommandField,
    Status,
    decode_command,
    encode_response,
)
from dicomgate.dimse.negotiation import VERIFICATION, ae_matches, negotiate
from dicomgate.errors import (
    DicomgateError,
    DuplicateRejected,
    IndexUnavailable,
    InvalidInstance,
    StoreError,
)
from dicomgate.ingest import IngestJob, Ingestor, InstanceMismatch
from dicomgate.observability.logging import uid_hash
from dicomgate.store.filestore import SpoolFile
from dicomgate.store.part10 import arrival_json, encode_file_meta

log = logging.getLogger("dicomgate.dimse")

_MAX_RQ_LENGTH = 1 << 20  # an A-ASSOCIATE-RQ larger than 1 MiB is not a real one
_MAX_COMMAND_LENGTH = 1 << 16
_READ_CHUNK = 1 << 20
_WHOLE_PDU = 1 << 20  # P-DATA-TF PDUs up to this size are read in one call
_DRAIN_ABOVE = 1 << 18


class _PduBody:
    """The body of one P-DATA-TF PDU: read whole when small, else from the socket."""

    def __init__(self, data: bytes | None) -> None:
        self.view = memoryview(data) if data is not None else None
        self.pos = 0

    def take(self, n: int) -> memoryview:
        assert self.view is not None
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out


class _Abort(Exception):
    """Abort the association with an A-ABORT carrying ``reason``."""

    def __init__(self, message: str, reason: pdu.AbortReason) -> None:
        super().__init__(message)
        self.reason = reason


class _PeerGone(Exception):
    """The peer closed, aborted or timed out; nothing more to send."""


def status_for(error: DicomgateError) -> int:
    """Map an ingest error to a C-STORE failure status (PS3.4 B.2.3)."""
    if isinstance(error, InstanceMismatch):
        return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(error, InvalidInstance):
        return Status.CANNOT_UNDERSTAND
    if isinstance(error, DuplicateRejected):
        return Status.DUPLICATE_SOP_INSTANCE
    if isinstance(error, StoreError | IndexUnavailable):
        return Status.OUT_OF_RESOURCES
    return Status.PROCESSING_FAILURE


@dataclass
class _Incoming:
    """A C-STORE whose data set is being received."""

    context_id: int
    command: Command
    spool: SpoolFile | None  # None: refused up front, the data set is read and dropped
    data_offset: int = 0
    error: DicomgateError | None = None
    fragments: int = 0


@dataclass
class _Association:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer_ip: str
    calling_ae: str = ""
    called_ae: str = ""
    peer_max_pdu: int = 0
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (sop, ts)
    stored: int = 0
    failed: int = 0


class DimseServer:
    """Accepts associations and serves C-ECHO and C-STORE into an :class:`Ingestor`."""

    def __init__(self, config: DimseConfig, ingestor: Ingestor) -> None:
        self.config = config
        self.ingestor = ingestor
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_ae: Counter[str] = Counter()
        self._active = 0
        self.port = config.port

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection,
            self.config.host,
            self.config.port,
            limit=_READ_CHUNK,
            reuse_address=True,
            backlog=128,
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info(
            "listening on %s:%d as %s",
            self.config.host,
            self.port,
            self.config.ae_title,
            extra={"event": "dimse.listening"},
        )

    async def stop(self, grace: float) -> None:
        """Stop accepting; give open associations ``grace`` seconds, then abort them."""
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

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Without it every PDU may wait ~40 ms for a delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        task = asyncio.get_running_loop().create_task(
            self._serve(_Association(reader, writer, peer[0] if peer else "?"))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        if rejection is not None:
            result, source, reason, why = rejection
            log.warning(
                "association rejected: %s",
                why,
                extra={
                    "event": "association.rejected",
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
        # SCP/SCU role selection (PS3.7 D.3.3.4): we are SCP only for storage; answer no roles.
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
            ),
        )
        log.info(
            "association accepted",
            extra={
                "event": "association.accepted",
                "calling_ae": rq.calling_ae,
                "peer": assoc.peer_ip,
                "contexts": f"{len(assoc.contexts)}/{len(rq.contexts)}",
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
        if cfg.check_called_ae and rq.called_ae != cfg.ae_title:
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
                head = await self._read(assoc, 6, timeout)
                pdu_type, length = head[0], struct.unpack(">I", head[2:6])[0]
                if pdu_type == pdu.PduType.RELEASE_RQ:
                    await self._read(assoc, length, cfg.acse_timeout)
                    if incoming is not None and incoming.spool is not None:
                        incoming.spool.discard()
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
                    raise _PeerGone("peer sent A-ABORT")
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
            raise

    async def _receive_fragment(self, assoc: _Association, incoming: _Incoming, n: int) -> None:
        """Copy ``n`` bytes of data set from the socket to the spool file, in chunks."""
        while n > 0:
            chunk = await self._read(assoc, min(n, _READ_CHUNK), self.config.dimse_timeout)
            n -= len(chunk)
            self._write_fragment(incoming, chunk)

    @staticmethod
    def _write_fragment(incoming: _Incoming, data: bytes | memoryview) -> None:
        incoming.fragments += 1
        if incoming.spool is None:
            return
        try:
            incoming.spool.write(data)
        except StoreError as exc:
            incoming.spool.discard()
            incoming.spool = None
            incoming.error = exc

    async def _on_command(
        self, assoc: _Association, context_id: int, raw: bytes
    ) -> _Incoming | None:
        try:
            command = decode_command(raw)
        except CommandError as exc:
            raise _Abort(
                f"undecodable command set: {exc}", pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE
            ) from None
        sop_class, transfer_syntax = assoc.contexts[context_id]
        field_ = command.command_field
        if field_ == CommandField.C_ECHO_RQ:
            await self._respond(
                assoc,
                context_id,
                encode_response(
                    CommandField.C_ECHO_RSP,
                    command.message_id,
                    Status.SUCCESS,
                    sop_class_uid=VERIFICATION,
                ),
            )
            log.debug("echo", extra={"event": "echo.answered", "calling_ae": assoc.calling_ae})
            if command.has_dataset:
                return _Incoming(context_id, command, None)
            return None
        if field_ == CommandField.C_STORE_RQ and command.has_dataset:
            incoming = _Incoming(context_id, command, None)
            if command.affected_sop_class_uid != sop_class:
                incoming.error = InstanceMismatch(
                    "Affected SOP Class UID differs from the presentation context's"
                )
                return incoming
            try:
                self.ingestor.store.check_space()
                spool = self.ingestor.store.new_spool()
                header = encode_file_meta(
                    sop_class,
                    command.affected_sop_instance_uid,
                    transfer_syntax,
                    assoc.calling_ae,
                    arrival_json(assoc.calling_ae, assoc.called_ae, assoc.peer_ip, "dimse"),
                )
                spool.write(header)
            except StoreError as exc:
                incoming.error = exc
                return incoming
            incoming.spool = spool
            incoming.data_offset = len(header)
            return incoming
        # Anything else: PS3.7 C.4.2 "unrecognized operation", data set (if any) dropped.
        log.warning(
            "unsupported command 0x%04X",
            field_,
            extra={"event": "dimse.unsupported_command", "calling_ae": assoc.calling_ae},
        )
        incoming = _Incoming(context_id, command, None)
        incoming.error = DicomgateError("unrecognized operation")
        if command.has_dataset:
            return incoming
        await self._reply_unsupported(assoc, incoming)
        return None

    async def _reply_unsupported(self, assoc: _Association, incoming: _Incoming) -> None:
        command = incoming.command
        await self._respond(
            assoc,
            incoming.context_id,
            encode_response(
                command.command_field | 0x8000,
                command.message_id,
                Status.UNRECOGNIZED_OPERATION,
                sop_class_uid=command.affected_sop_class_uid,
            ),
        )

    async def _finish_store(self, assoc: _Association, incoming: _Incoming) -> None:
        command = incoming.command
        if command.command_field == CommandField.C_ECHO_RQ:
            return
        if command.command_field != CommandField.C_STORE_RQ:
            await self._reply_unsupported(assoc, incoming)
            return
        error = incoming.error
        if error is None and incoming.spool is not None:
            sop_class, transfer_syntax = assoc.contexts[incoming.context_id]
            loop = asyncio.get_running_loop()
            job = IngestJob(
                spool=incoming.spool,
                data_offset=incoming.data_offset,
                transfer_syntax=transfer_syntax,
                sop_class_uid=sop_class,
                sop_instance_uid=command.affected_sop_instance_uid,
                calling_ae=assoc.calling_ae,
                called_ae=assoc.called_ae,
                source_ip=assoc.peer_ip,
                received_via="dimse",
                loop=loop,
                future=loop.create_future(),
            )
            incoming.spool = None  # owned by the ingestor from here on
            error = await self.ingestor.ingest(job)
        if error is None:
            assoc.stored += 1
            status, comment = int(Status.SUCCESS), ""
        else:
            assoc.failed += 1
            status = status_for(error)
            comment = str(error)
            if incoming.error is not None:  # refused before the ingestor saw it
                log.warning(
                    "instance refused: %s",
                    error,
                    extra={
                        "event": "instance.refused",
                        "calling_ae": assoc.calling_ae,
                        "sop": uid_hash(command.affected_sop_instance_uid),
                    },
                )
        await self._respond(
            assoc,
            incoming.context_id,
            encode_response(
                CommandField.C_STORE_RSP,
                command.message_id,
                status,
                sop_class_uid=command.affected_sop_class_uid,
                sop_instance_uid=command.affected_sop_instance_uid,
                error_comment=comment,
            ),
        )

    async def _respond(self, assoc: _Association, context_id: int, command: bytes) -> None:
        await self._send(
            assoc,
            pdu.encode_p_data(context_id, command, command=True, max_pdu_length=assoc.peer_max_pdu),
        )
