"""The DIMSE message layer of the acceptor (``server.py``): each command of an established
association — C-ECHO (PS3.7 9.1.5), C-STORE (PS3.4 B.2.3) with its data set copied to the
spool file fragment by fragment, C-FIND/C-MOVE/C-GET handed to ``qr.py`` as tasks, C-CANCEL
(PS3.7 9.3.2.3) and unrecognized operations (PS3.7 C.4.2). The association and PDU state
machine that calls these methods is :class:`dicomgate.dimse.server.DimseServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

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
from dicomgate.dimse.negotiation import (
    QR_SOP_CLASSES,
    VERIFICATION,
    QRService,
    ae_matches,
    is_storage_class,
)
from dicomgate.dimse.qr import QueryRetrieve, Request
from dicomgate.dimse.session import READ_CHUNK as _READ_CHUNK
from dicomgate.dimse.session import Abort as _Abort
from dicomgate.dimse.session import Association as _Association
from dicomgate.dimse.session import Channel as _Channel
from dicomgate.dimse.session import Incoming as _Incoming
from dicomgate.dimse.session import NotAuthorized, NotStorageContext, status_for
from dicomgate.dimse.session import PeerGone as _PeerGone
from dicomgate.errors import (
    INDEX_UNAVAILABLE,
    DicomgateError,
    IndexUnavailable,
    InvalidInstance,
    StoreError,
)
from dicomgate.ingest import IngestJob, Ingestor, InstanceMismatch
from dicomgate.observability.logging import uid_hash
from dicomgate.store.part10 import arrival_json, encode_file_meta
from dicomgate.store.scan import EXPLICIT_LE, IMPLICIT_LE, stored_transfer_syntax

log = logging.getLogger("dicomgate.dimse")

_MAX_IDENTIFIER = 1 << 20  # a C-FIND/C-MOVE/C-GET identifier larger than this is refused
QR_SERVICES = {
    CommandField.C_FIND_RQ: QRService.FIND,
    CommandField.C_MOVE_RQ: QRService.MOVE,
    CommandField.C_GET_RQ: QRService.GET,
}
_QR_SERVICES = QR_SERVICES
# The Command Field values of PS3.7 Annex E (Table E.1-1): requests, and their responses
# (the request's value with bit 15 set; C-CANCEL-RQ has none, PS3.7 9.3.2.3).
_REQUESTS = frozenset(
    [0x0001, 0x0010, 0x0020, 0x0021, 0x0030, 0x0100, 0x0110, 0x0120, 0x0130, 0x0140, 0x0150]
)
_DEFINED_FIELDS = _REQUESTS | {f | 0x8000 for f in _REQUESTS} | {CommandField.C_CANCEL_RQ}


class DimseMessages:
    """Command handling of :class:`~dicomgate.dimse.server.DimseServer` (its base class),
    which provides the attributes below and the socket I/O."""

    config: DimseConfig
    ingestor: Ingestor
    qr: QueryRetrieve

    async def _send(self, assoc: _Association, data: bytes) -> None:
        raise NotImplementedError

    async def _read(self, assoc: _Association, n: int, timeout: float) -> bytes:
        raise NotImplementedError

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
            if incoming.identifier is not None:
                if len(incoming.identifier) + len(data) > _MAX_IDENTIFIER:
                    incoming.identifier = None
                    incoming.error = InvalidInstance("identifier larger than 1 MiB")
                else:
                    incoming.identifier += data
            return
        DimseMessages._spool_write(incoming, data, last=False)

    @staticmethod
    def _spool_write(incoming: _Incoming, data: bytes | memoryview, last: bool) -> None:
        """Data set bytes to the spool file, the file meta first once it can be decided
        (:meth:`_start_file`); a store error drops the spool file and is kept for the
        answer."""
        assert incoming.spool is not None
        try:
            if incoming.file_meta is not None:
                started = DimseMessages._start_file(incoming, data, last)
                if started is None:
                    return
                data = started
            if data:
                incoming.spool.write(data)
        except StoreError as exc:
            incoming.spool.discard()
            incoming.spool = None
            incoming.error = exc

    @staticmethod
    def _start_file(
        incoming: _Incoming, data: bytes | memoryview, last: bool
    ) -> bytes | memoryview | None:
        """Write the file meta once the first element header of the data set is here, for
        the syntax it is really encoded in (store/scan.py ``stored_transfer_syntax``);
        return the bytes to write after it, or None while fewer than 6 have come."""
        assert incoming.file_meta is not None and incoming.spool is not None
        if incoming.head is not None or len(data) < 6:  # a peer sending tiny fragments
            incoming.head = (incoming.head or bytearray()) + data
            if len(incoming.head) < 6 and not last:
                return None
            data, incoming.head = bytes(incoming.head), None
        received = incoming.transfer_syntax
        stored = stored_transfer_syntax(received, data)
        if stored != received:
            incoming.transfer_syntax = stored
            incoming.declared_transfer_syntax = received
        header = incoming.file_meta(stored, incoming.declared_transfer_syntax)
        incoming.file_meta = None
        incoming.spool.write(header)
        incoming.data_offset = len(header)
        return data

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
        if field_ not in _DEFINED_FIELDS:
            # Not a DIMSE command (PS3.7 E.1-1 enumerates them): no response can name it
            # (answering 0x0000 with 0x8000, or 0xFFFF with itself, invents a message), so
            # it is treated like an undecodable command set.
            raise _Abort(
                f"command set with undefined Command Field 0x{field_:04X}",
                pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        if field_ & 0x8000:
            return self._on_response(assoc, context_id, command)
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
            if sop_class in QR_SOP_CLASSES or not is_storage_class(sop_class):
                # Verification, a Q/R information model ...: not a storage SOP class, so
                # nothing is stored (private and unknown classes are storage, negotiation.py).
                incoming.error = NotStorageContext(
                    "C-STORE on a presentation context that is not a storage SOP class"
                )
                return incoming
            if not assoc.may_store:
                incoming.error = NotAuthorized(f"{assoc.calling_ae!r} may not store here")
                return incoming
            # PS3.7 Table 9.3-1: both are mandatory in a C-STORE-RQ; say which is missing
            # rather than that it "differs" (the data set is read and dropped either way).
            for name, value in (
                ("Class", command.affected_sop_class_uid),
                ("Instance", command.affected_sop_instance_uid),
            ):
                if not value:
                    incoming.error = InstanceMismatch(f"C-STORE-RQ without Affected SOP {name} UID")
                    return incoming
            if command.affected_sop_class_uid != sop_class:
                incoming.error = InstanceMismatch(
                    "Affected SOP Class UID differs from the presentation context's"
                )
                return incoming

            def file_meta(stored: str, declared: str) -> bytes:
                return encode_file_meta(
                    sop_class,
                    command.affected_sop_instance_uid,
                    stored,
                    assoc.calling_ae,
                    arrival_json(
                        assoc.calling_ae, assoc.called_ae, assoc.peer_ip, "dimse", declared
                    ),
                )

            incoming.transfer_syntax = transfer_syntax
            try:
                self.ingestor.store.check_space()
                spool = self.ingestor.store.new_spool()
                if transfer_syntax in (EXPLICIT_LE, IMPLICIT_LE):
                    # Written with the first fragment: the data set may be in the other
                    # VR encoding (store/scan.py stored_transfer_syntax).
                    incoming.file_meta = file_meta
                else:
                    header = file_meta(transfer_syntax, "")
                    spool.write(header)
                    incoming.data_offset = len(header)
            except StoreError as exc:
                incoming.error = exc
                return incoming
            incoming.spool = spool
            return incoming
        if field_ in _QR_SERVICES:
            incoming = _Incoming(context_id, command, None, identifier=bytearray())
            if command.has_dataset:
                return incoming
            await self._start_operation(assoc, incoming)
            return None
        if field_ == CommandField.C_CANCEL_RQ:
            # PS3.7 9.3.2.3: no response; the operation ends with status Cancel (0xFE00).
            running = assoc.operations.get(command.message_id_responded_to or 0)
            if running is not None:
                running[0].cancelled = True
            log.info(
                "cancel requested",
                extra={"event": "dimse.cancel", "calling_ae": assoc.calling_ae},
            )
            return None
        # Any other request (N-GET-RQ ...): PS3.7 C.4.2 "unrecognized operation" in its
        # response (the request's Command Field with bit 15 set); data set (if any) dropped.
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

    @staticmethod
    def _on_response(assoc: _Association, context_id: int, command: Command) -> _Incoming | None:
        """A response from the peer. The only ones we await are the C-STORE-RSPs of a
        C-GET's sub-operations; any other is unexpected and ignored with a warning. It is
        never answered: a response applies to a request its receiver sent (PS3.7
        9.1.1.1.2, 9.1.2.1.2 ...: Message ID Being Responded To), so there is no response
        to a response; and answering it could set two peers answering each other's
        answers."""
        responded = command.message_id_responded_to
        if command.command_field == CommandField.C_STORE_RSP and responded is not None:
            waiter = assoc.store_waiters.pop(responded, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(command)
                return _Incoming(context_id, command, None) if command.has_dataset else None
        log.warning(
            "unexpected response 0x%04X (%s): ignored",
            command.command_field,
            "no request of ours is waiting for it"
            if responded is not None
            else "no Message ID Being Responded To",
            extra={
                "event": "dimse.unexpected_response",
                "calling_ae": assoc.calling_ae,
                "peer": assoc.peer_ip,
            },
        )
        # A data set announced with it is read and dropped (_finish_store).
        return _Incoming(context_id, command, None) if command.has_dataset else None

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
        if command.command_field == CommandField.C_ECHO_RQ or command.command_field & 0x8000:
            return  # a response's data set, or an echo's: dropped, never answered
        if command.command_field != CommandField.C_STORE_RQ:
            if command.command_field in _QR_SERVICES:
                await self._start_operation(assoc, incoming)
                return
            await self._reply_unsupported(assoc, incoming)
            return
        if incoming.file_meta is not None and incoming.spool is not None:
            # A data set shorter than an element header: written as is, the scan refuses it.
            self._spool_write(incoming, b"", last=True)
        error = incoming.error
        if error is None and incoming.spool is not None:
            sop_class, _ = assoc.contexts[incoming.context_id]
            loop = asyncio.get_running_loop()
            job = IngestJob(
                spool=incoming.spool,
                data_offset=incoming.data_offset,
                transfer_syntax=incoming.transfer_syntax,
                declared_transfer_syntax=incoming.declared_transfer_syntax,
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
            # The sender is told the index is down, not the driver's text (host, port and
            # name of the database).
            comment = INDEX_UNAVAILABLE if isinstance(error, IndexUnavailable) else str(error)
            if incoming.error is not None:  # refused before the ingestor saw it
                log.warning(
                    "instance refused: %s",
                    error,
                    extra={
                        "event": "instance.refused",
                        "reason": (
                            "not_authorized"
                            if isinstance(error, NotAuthorized)
                            else type(error).__name__
                        ),
                        "status": f"0x{status:04X}",
                        "calling_ae": assoc.calling_ae,
                        "peer": assoc.peer_ip,
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
        data = pdu.encode_p_data(
            context_id, command, command=True, max_pdu_length=assoc.peer_max_pdu
        )
        if assoc.operations:  # an operation may be half-way through writing a message
            async with assoc.write_lock:
                await self._send(assoc, data)
        else:
            await self._send(assoc, data)

    # -- Query/Retrieve -----------------------------------------------------------------

    async def _start_operation(self, assoc: _Association, incoming: _Incoming) -> None:
        """Check a C-FIND/C-MOVE/C-GET request, then serve it as a task (``qr.py``)."""
        command, context_id = incoming.command, incoming.context_id
        service = _QR_SERVICES[CommandField(command.command_field)]
        sop_class, transfer_syntax = assoc.contexts[context_id]
        known = QR_SOP_CLASSES.get(sop_class)
        status, comment = 0, ""
        if known is None or known[1] is not service:
            status, comment = Status.SOP_CLASS_NOT_SUPPORTED, "not this context's service"
        elif command.affected_sop_class_uid != sop_class:
            status, comment = Status.SOP_CLASS_NOT_SUPPORTED, "SOP class differs from context's"
        elif command.message_id in assoc.operations:
            status, comment = Status.DUPLICATE_INVOCATION, "Message ID already in use"
        elif not ae_matches(assoc.calling_ae, getattr(self.config.allow, service.value)):
            status, comment = Status.NOT_AUTHORIZED, f"{assoc.calling_ae} may not {service.value}"
        elif incoming.error is not None:
            status, comment = Status.UNABLE_TO_PROCESS, str(incoming.error)
        if status:
            log.warning(
                "%s refused: %s",
                service.value,
                comment,
                extra={
                    "event": f"{service.value}.refused",
                    "calling_ae": assoc.calling_ae,
                    "status": f"0x{status:04X}",
                    "peer": assoc.peer_ip,
                    "sop_class": command.affected_sop_class_uid or "",
                },
            )
            await self._respond(
                assoc,
                context_id,
                encode_response(
                    command.command_field | 0x8000,
                    command.message_id,
                    status,
                    sop_class_uid=command.affected_sop_class_uid,
                    error_comment=comment,
                ),
            )
            return
        assert known is not None
        request = Request(
            context_id=context_id,
            command=command,
            identifier=bytes(incoming.identifier or b""),
            transfer_syntax=transfer_syntax,
            model=known[0],
            service=service,
            calling_ae=assoc.calling_ae,
            called_ae=assoc.called_ae,
            peer_ip=assoc.peer_ip,
            fuzzy=context_id in assoc.fuzzy_contexts,
            combined_datetime=context_id in assoc.combined_datetime_contexts,
        )
        task = asyncio.get_running_loop().create_task(self._run_operation(assoc, request))
        assoc.operations[command.message_id] = (request, task)

    async def _run_operation(self, assoc: _Association, request: Request) -> None:
        try:
            await self.qr.serve(request, _Channel(self, assoc))
        except _PeerGone:
            assoc.writer.transport.abort()  # the reader ends the association
        except TimeoutError:
            # A bridged C-GET's sub-operation (bridge/dimse_scp.py) got no C-STORE-RSP; the
            # local one (qr.py) counts it as failed and goes on.
            log.warning(
                "no C-STORE-RSP from the C-GET requestor within dimse.move_timeout (%g s):"
                " association aborted",
                self.config.move_timeout,
                extra={"event": "association.aborted", "calling_ae": assoc.calling_ae},
            )
            with contextlib.suppress(_PeerGone):
                await self._send(assoc, pdu.encode_abort(pdu.AbortReason.NOT_SPECIFIED))
            assoc.writer.transport.abort()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "%s failed",
                request.service.value,
                extra={"event": "association.internal_error", "calling_ae": assoc.calling_ae},
            )
            with contextlib.suppress(_PeerGone):
                await self._send(assoc, pdu.encode_abort(pdu.AbortReason.NOT_SPECIFIED))
            assoc.writer.transport.abort()
        finally:
            assoc.operations.pop(request.command.message_id, None)
            assoc.last_operation_end = time.monotonic()

    @staticmethod
    async def _end_operations(assoc: _Association) -> None:
        """Cancel what is still running (a release during an operation) and wait for it."""
        tasks = [task for _, task in assoc.operations.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


__all__ = ["QR_SERVICES", "DimseMessages"]
