"""The acceptor's state of one association (``server.py``, ``messages.py``): the
association, a C-STORE or Q/R request being received, the Q/R channel, the exceptions that
end an association, and the C-STORE failure status of an ingest error (PS3.4 B.2.3)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dicomgate.dimse import pdu
from dicomgate.dimse.commands import Command, Status
from dicomgate.dimse.qr import Request
from dicomgate.errors import (
    DicomgateError,
    DuplicateRejected,
    IndexUnavailable,
    InvalidInstance,
    StoreError,
)
from dicomgate.ingest import InstanceMismatch, TransferSyntaxNotSupported
from dicomgate.store.filestore import SpoolFile

if TYPE_CHECKING:
    from dicomgate.dimse.messages import DimseMessages

READ_CHUNK = 1 << 20


class NotAuthorized(DicomgateError):
    """The calling AE may not use this service (``dimse.allow``)."""


class NotStorageContext(DicomgateError):
    """A C-STORE-RQ on a presentation context of a service that is not storage
    (Verification, a Q/R information model ...): 0x0122, SOP Class not Supported (PS3.7 C.5.4)."""


class PduBody:
    """The body of one P-DATA-TF PDU: read whole when small, else from the socket."""

    def __init__(self, data: bytes | None) -> None:
        self.view = memoryview(data) if data is not None else None
        self.pos = 0

    def take(self, n: int) -> memoryview:
        assert self.view is not None
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out


class Abort(Exception):
    """Abort the association with an A-ABORT carrying ``reason``."""

    def __init__(self, message: str, reason: pdu.AbortReason) -> None:
        super().__init__(message)
        self.reason = reason


class PeerGone(Exception):
    """The peer closed, aborted or timed out; nothing more to send."""


def reject_code(source: int, reason: int) -> str:
    """A short, stable ``reason`` for the ``association.rejected`` event (audit, metrics)."""
    if source == pdu.RejectSource.SERVICE_PROVIDER_PRESENTATION:
        return "limit"
    if source == pdu.RejectSource.SERVICE_USER:
        if reason == pdu.RejectReason.CALLED_AE_NOT_RECOGNIZED:
            return "called_ae"
        if reason == pdu.RejectReason.CALLING_AE_NOT_RECOGNIZED:
            return "calling_ae"
        if reason == pdu.RejectReason.APPLICATION_CONTEXT_NOT_SUPPORTED:
            return "application_context"
    return "protocol_version"


def status_for(error: DicomgateError) -> int:
    """Map an ingest error to a C-STORE failure status (PS3.4 B.2.3)."""
    if isinstance(error, NotAuthorized):
        return Status.NOT_AUTHORIZED
    if isinstance(error, NotStorageContext):
        return Status.SOP_CLASS_NOT_SUPPORTED
    if isinstance(error, InstanceMismatch):
        return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(error, TransferSyntaxNotSupported):
        return Status.TRANSFER_SYNTAX_NOT_SUPPORTED
    if isinstance(error, InvalidInstance):
        return Status.CANNOT_UNDERSTAND
    if isinstance(error, DuplicateRejected):
        return Status.DUPLICATE_SOP_INSTANCE
    if isinstance(error, StoreError | IndexUnavailable):
        return Status.OUT_OF_RESOURCES
    return Status.PROCESSING_FAILURE


@dataclass
class Incoming:
    """A C-STORE whose data set is being received."""

    context_id: int
    command: Command
    spool: SpoolFile | None  # None: refused up front, the data set is read and dropped
    data_offset: int = 0
    # The syntax written in the file meta: the context's, or the other Little Endian one
    # for a data set in the other VR encoding (then the context's is
    # ``declared_transfer_syntax``; store/scan.py stored_transfer_syntax).
    transfer_syntax: str = ""
    declared_transfer_syntax: str = ""
    # The file meta, for the syntax to write and the declared one, while it waits for the
    # first bytes of the data set (Implicit and Explicit VR Little Endian contexts); None
    # once written.
    file_meta: Callable[[str, str], bytes] | None = None
    head: bytearray | None = None  # first fragments shorter than an element header
    error: DicomgateError | None = None
    fragments: int = 0
    identifier: bytearray | None = None  # C-FIND/C-MOVE/C-GET: the identifier, collected


@dataclass
class Association:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer_ip: str
    calling_ae: str = ""
    called_ae: str = ""
    peer_max_pdu: int = 0
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (sop, ts)
    stored: int = 0
    failed: int = 0
    may_store: bool = True  # dimse.allow.store, decided once per association
    scp_role_classes: set[str] = field(default_factory=set)  # requestor took the SCP role
    fuzzy_contexts: set[int] = field(default_factory=set)  # C-FIND: fuzzy PN negotiated
    # C-FIND: combined date-time matching negotiated (extended negotiation byte 1)
    combined_datetime_contexts: set[int] = field(default_factory=set)
    # Q/R operations running, by Message ID; C-STORE-RSPs awaited by C-GET sub-operations.
    operations: dict[int, tuple[Request, asyncio.Task[None]]] = field(default_factory=dict)
    store_waiters: dict[int, asyncio.Future[Command]] = field(default_factory=dict)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_operation_end: float = 0.0
    message_id: int = 0  # of the sub-operations we request (C-GET)


class Channel:
    """The :class:`dicomgate.dimse.qr.Channel` of one association."""

    def __init__(self, server: DimseMessages, assoc: Association) -> None:
        self.server = server
        self.assoc = assoc
        self.peer_max_pdu = assoc.peer_max_pdu

    async def send(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        limit = self.assoc.peer_max_pdu
        data = pdu.encode_p_data(context_id, command, command=True, max_pdu_length=limit)
        if dataset is not None:
            data += pdu.encode_p_data(context_id, dataset, command=False, max_pdu_length=limit)
        async with self.assoc.write_lock:
            await self.server._send(self.assoc, data)

    def storage_contexts(self, sop_class_uid: str) -> list[tuple[int, str]]:
        if sop_class_uid not in self.assoc.scp_role_classes:
            return []
        return [(cid, ts) for cid, (sop, ts) in self.assoc.contexts.items() if sop == sop_class_uid]

    def next_message_id(self) -> int:
        self.assoc.message_id = self.assoc.message_id % 0xFFFF + 1
        return self.assoc.message_id

    async def store(
        self,
        context_id: int,
        command: bytes,
        message_id: int,
        dataset: bytes | tuple[Path, int],
        timeout: float,
    ) -> Command:
        assoc = self.assoc
        future: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
        assoc.store_waiters[message_id] = future
        try:
            async with assoc.write_lock:
                await self._write_store(context_id, command, dataset)
            async with asyncio.timeout(timeout):
                return await future
        finally:
            assoc.store_waiters.pop(message_id, None)

    async def _write_store(
        self, context_id: int, command: bytes, dataset: bytes | tuple[Path, int]
    ) -> None:
        send, assoc = self.server._send, self.assoc
        limit = assoc.peer_max_pdu
        await send(
            assoc, pdu.encode_p_data(context_id, command, command=True, max_pdu_length=limit)
        )
        if isinstance(dataset, bytes):
            await send(
                assoc, pdu.encode_p_data(context_id, dataset, command=False, max_pdu_length=limit)
            )
            return
        # Stream the stored file: 1 MiB reads, PDUs no larger than the peer accepts.
        path, offset = dataset
        if 0 < limit < pdu.MIN_MAX_PDU_LENGTH:  # refused at negotiation (server.py)
            raise ValueError(f"a maximum PDU length of {limit} cannot carry a PDV item")
        fragment = min((limit or READ_CHUNK) - 6, READ_CHUNK - 6)
        block_size = READ_CHUNK - READ_CHUNK % fragment  # whole fragments per read
        with path.open("rb") as fh:
            left = await asyncio.to_thread(lambda: fh.seek(0, 2) - offset)
            fh.seek(offset)
            if left <= 0:
                await send(assoc, pdu.encode_pdv_pdu(context_id, b"", command=False, last=True))
                return
            while left > 0:
                block = await asyncio.to_thread(fh.read, min(left, block_size))
                if not block:
                    raise OSError("stored file shorter than its size")
                left -= len(block)
                view = memoryview(block)
                out = []
                for start in range(0, len(view), fragment):
                    chunk = view[start : start + fragment]
                    last = left == 0 and start + fragment >= len(view)
                    out.append(pdu.encode_pdv_pdu(context_id, chunk, command=False, last=last))
                await send(assoc, b"".join(out))


__all__ = [
    "READ_CHUNK",
    "Abort",
    "Association",
    "Channel",
    "Incoming",
    "NotAuthorized",
    "NotStorageContext",
    "PduBody",
    "PeerGone",
    "reject_code",
    "status_for",
]
