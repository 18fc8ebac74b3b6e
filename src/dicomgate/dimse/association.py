"""An asyncio association requestor for C-STORE (PS3.8 section 7, PS3.7 9.1.1).

:func:`request_association` connects (TCP_NODELAY, optional TLS, PS3.15 B), sends an
A-ASSOCIATE-RQ and reads the answer; the :class:`StoreAssociation` it returns sends
C-STORE-RQs whose data set is streamed from the stored file in P-DATA-TF PDUs no larger
than the peer's maximum PDU length, reads each C-STORE-RSP, and ends with A-RELEASE or
A-ABORT. One request is outstanding at a time (no asynchronous operations window).
The association keeps, per SOP class the peer accepted no context of, the presentation
context results it gave (``refusals``); when it accepted no context at all the
association is aborted and :class:`ContextsRejected` carries them, so that the caller can
tell a SOP class the peer does not support from transfer syntaxes it does not take.

Everything runs on the event loop: there is no thread per association. Small files are
read in one go; larger ones in 1 MiB blocks from a worker thread, so that a multi-GB
instance never sits in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomgate.dimse import pdu
from dicomgate.dimse.commands import CommandError, CommandField, decode_command, encode_store_rq
from dicomgate.errors import DicomgateError
from dicomgate.security.dimse_models import DestinationTls

__all__ = [
    "AssociationError",
    "AssociationLost",
    "ContextsRejected",
    "StoreAssociation",
    "StoreResponse",
    "client_ssl_context",
    "dataset_offset",
    "describe_refusal",
    "request_association",
]

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1161.1"
IMPLEMENTATION_VERSION = "DICOMGATE_SCU"
OUR_MAX_PDU = 1 << 20  # what we accept; only C-STORE-RSPs come back, but say it
_READ_BLOCK = 1 << 20  # bytes read from a stored file at once
_SYNC_READ_LIMIT = 4 << 20  # files up to this size are read on the loop (page cache: µs)
_MAX_PEER_PDU = 1 << 20  # we never send larger PDUs, even when the peer allows them
_CONTEXT_RESULTS = frozenset(int(r) for r in pdu.ContextResult)
_BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM"


class AssociationError(DicomgateError):
    """No association: connection refused or timed out, rejected, aborted, or no context."""


class _MalformedAnswer(AssociationError):
    """An A-ASSOCIATE-AC that violates PS3.8: the association is aborted."""


class ContextsRejected(AssociationError):
    """The peer accepted the association but rejected every proposed presentation context
    (PS3.8 9.3.3.2); ``refusals`` holds, per abstract syntax proposed, the results given
    for its contexts. The association was aborted."""

    def __init__(self, message: str, refusals: dict[str, frozenset[pdu.ContextResult]]) -> None:
        super().__init__(message)
        self.refusals = refusals


def describe_refusal(results: frozenset[pdu.ContextResult]) -> str:
    """The presentation context results a peer gave a SOP class's contexts, in words
    (PS3.8 Table 9-18): ``abstract-syntax-not-supported`` wins over the others."""
    order = (
        pdu.ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
        pdu.ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
        pdu.ContextResult.USER_REJECTION,
        pdu.ContextResult.NO_REASON,
    )
    names = [_RESULT_NAMES[r] for r in order if r in results]
    return ", ".join(names) or "no reason given"


_RESULT_NAMES = {
    pdu.ContextResult.USER_REJECTION: "user-rejection",
    pdu.ContextResult.NO_REASON: "provider-rejection (no reason)",
    pdu.ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED: "abstract-syntax-not-supported",
    pdu.ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED: "transfer-syntaxes-not-supported",
}


class AssociationLost(DicomgateError):
    """The association went away while in use (abort, timeout, connection closed)."""


@dataclass(frozen=True)
class StoreResponse:
    """A C-STORE-RSP (PS3.7 9.3.1.2): its status and error comment."""

    status: int
    error_comment: str = ""


def client_ssl_context(tls: DestinationTls) -> ssl.SSLContext:
    """The TLS client context of a destination (PS3.15 B.1, BCP 195)."""
    ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.set_ciphers(tls.ciphers or _BCP195_CIPHERS)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    return ctx


def dataset_offset(path: Path) -> int:
    """Where the data set starts in a Part 10 file: after preamble, DICM and file meta."""
    with path.open("rb") as fh:
        head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise DicomgateError(f"{path.name}: not a Part 10 file with a File Meta group length")
    return 144 + int.from_bytes(head[140:144], "little")


def encode_associate_rq(
    called_ae: str,
    calling_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    max_pdu_length: int = OUR_MAX_PDU,
) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing ``contexts`` with ids 1, 3, 5 ..."""
    fixed = (
        struct.pack(">HH", 1, 0)
        + called_ae.encode("ascii").ljust(16)[:16]
        + calling_ae.encode("ascii").ljust(16)[:16]
        + bytes(32)
    )
    items = [pdu._item(0x10, pdu.APPLICATION_CONTEXT.encode())]
    for n, (abstract, syntaxes) in enumerate(contexts):
        sub = pdu._item(0x30, abstract.encode())
        sub += b"".join(pdu._item(0x40, ts.encode()) for ts in syntaxes)
        items.append(pdu._item(0x20, bytes([2 * n + 1, 0, 0, 0]) + sub))
    user = (
        pdu._item(0x51, struct.pack(">I", max_pdu_length))
        + pdu._item(0x52, IMPLEMENTATION_CLASS_UID.encode())
        + pdu._item(0x55, IMPLEMENTATION_VERSION.encode())
    )
    items.append(pdu._item(0x50, user))
    return pdu._pdu(pdu.PduType.ASSOCIATE_RQ, fixed + b"".join(items))


@dataclass
class AssociateAC:
    """The parts of an A-ASSOCIATE-AC (PS3.8 9.3.3) a requestor uses."""

    contexts: dict[int, tuple[pdu.ContextResult, str]]  # id -> (result, transfer syntax)
    max_pdu_length: int  # 0 = no limit


def parse_associate_ac(body: bytes) -> AssociateAC:
    """Parse the body (after the PDU header) of an A-ASSOCIATE-AC."""
    if len(body) < 68:
        raise pdu.PduError("A-ASSOCIATE-AC shorter than its fixed fields")
    ac = AssociateAC({}, 0)
    for item_type, value in pdu._items(body[68:], "A-ASSOCIATE-AC"):
        if item_type == 0x21 and len(value) >= 4:
            ts = ""
            for sub_type, sub in pdu._items(value[4:], "presentation context"):
                if sub_type == 0x40:
                    ts = pdu._uid(sub)
            if value[2] not in _CONTEXT_RESULTS:
                raise pdu.PduError(f"presentation context result {value[2]} is not defined")
            ac.contexts[value[0]] = (pdu.ContextResult(value[2]), ts)
        elif item_type == 0x50:
            for sub_type, sub in pdu._items(value, "user information"):
                if sub_type == 0x51 and len(sub) == 4:
                    (ac.max_pdu_length,) = struct.unpack(">I", sub)
    return ac


_RJ_SOURCES = {1: "service user", 2: "service provider (ACSE)", 3: "service provider"}
_RJ_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def describe_associate_rj(body: bytes) -> str:
    """Why an A-ASSOCIATE-RJ (PS3.8 9.3.4) rejected us, in words."""
    if len(body) < 4:
        return "association rejected"
    result, source, reason = body[1], body[2], body[3]
    kind = "permanent" if result == 1 else "transient"
    return (
        f"association rejected ({kind}, {_RJ_SOURCES.get(source, f'source {source}')}):"
        f" {_RJ_REASONS.get((source, reason), f'reason {reason}')}"
    )


async def _connect(
    host: str, port: int, ssl_context: ssl.SSLContext | None, server_name: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=ssl_context,
            server_hostname=(server_name or host) if ssl_context else None,
            limit=1 << 20,
        )
    except ConnectionRefusedError:
        raise AssociationError("connection refused") from None
    except socket.gaierror as exc:
        raise AssociationError(f"cannot resolve host {host!r} ({exc.strerror})") from None
    except ssl.SSLError as exc:
        raise AssociationError(f"TLS handshake failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise AssociationError(f"cannot connect: {exc.strerror or exc}") from None
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def _read_pdu(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await reader.readexactly(6)
    pdu_type, _, length = struct.unpack(">BBI", header)
    if length > 64 << 20:
        raise pdu.PduError(f"PDU of {length} bytes")
    return pdu_type, await reader.readexactly(length)


async def request_association(
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> StoreAssociation:
    """Connect and negotiate; raise :class:`AssociationError` saying why it failed.

    ``timeout`` bounds the TCP connection (with its TLS handshake) and, again, the wait
    for the A-ASSOCIATE answer (the ARTIM timer, PS3.8 9.1.1).
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(host, port, ssl_context, server_name)
    except TimeoutError:
        raise AssociationError(f"connection timed out after {timeout:g} s") from None
    assoc: StoreAssociation | None = None
    try:
        writer.write(encode_associate_rq(called_ae, calling_ae, contexts))
        async with asyncio.timeout(timeout):
            await writer.drain()
            pdu_type, body = await _read_pdu(reader)
        if pdu_type == pdu.PduType.ASSOCIATE_RJ:
            raise AssociationError(describe_associate_rj(body))
        if pdu_type == pdu.PduType.ABORT:
            raise AssociationError("association aborted by the peer during negotiation")
        if pdu_type != pdu.PduType.ASSOCIATE_AC:
            raise AssociationError(f"unexpected PDU 0x{pdu_type:02X} instead of A-ASSOCIATE-AC")
        try:
            ac = parse_associate_ac(body)
        except pdu.PduError as exc:
            raise _MalformedAnswer(f"malformed A-ASSOCIATE-AC from the peer: {exc}") from None
        accepted: dict[int, tuple[str, str]] = {}
        rejected: dict[str, set[pdu.ContextResult]] = {}
        for n, (abstract, _) in enumerate(contexts):
            # A context the AC leaves out was not accepted (PS3.8 9.3.3.2).
            result, ts = ac.contexts.get(2 * n + 1, (pdu.ContextResult.NO_REASON, ""))
            if result == pdu.ContextResult.ACCEPTANCE and ts:
                accepted[2 * n + 1] = (abstract, ts)
            else:
                if result == pdu.ContextResult.ACCEPTANCE:  # accepted without a syntax
                    result = pdu.ContextResult.NO_REASON
                rejected.setdefault(abstract, set()).add(result)
        refusals = {
            abstract: frozenset(results)
            for abstract, results in rejected.items()
            if not any(a == abstract for a, _ in accepted.values())
        }
        assoc = StoreAssociation(reader, writer, accepted, ac.max_pdu_length, refusals)
        if 0 < ac.max_pdu_length < pdu.MIN_MAX_PDU_LENGTH:
            # PS3.8 D.1: a P-DATA-TF PDU of that length cannot carry one byte of a message.
            assoc.abort()
            raise AssociationError(
                f"peer's maximum PDU length {ac.max_pdu_length} is too small to carry data"
            )
        if not accepted:
            assoc.abort()
            raise ContextsRejected(
                f"peer accepted none of the {len(contexts)} proposed presentation contexts",
                refusals,
            )
        return assoc
    except TimeoutError:
        writer.close()
        raise AssociationError(
            f"association request timed out after {timeout:g} s (no answer)"
        ) from None
    except _MalformedAnswer as exc:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write(pdu.encode_abort(pdu.AbortReason.INVALID_PDU_PARAMETER_VALUE, source=0))
        writer.close()
        raise AssociationError(str(exc)) from None
    except pdu.PduError as exc:
        writer.close()
        raise AssociationError(f"malformed answer to A-ASSOCIATE-RQ: {exc}") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        writer.close()
        raise AssociationError(
            f"connection closed during negotiation ({type(exc).__name__})"
        ) from None
    except (AssociationError, asyncio.CancelledError):  # cancelled: the caller gave up
        writer.close()
        raise


class StoreAssociation:
    """An established association on which we are the C-STORE SCU."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        accepted: dict[int, tuple[str, str]],
        peer_max_pdu: int,
        refusals: dict[str, frozenset[pdu.ContextResult]] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        # context id -> (abstract syntax, transfer syntax), accepted ones only
        self.accepted = accepted
        # abstract syntax -> the results of its contexts, for the SOP classes of which
        # the peer accepted no context at all
        self.refusals = refusals or {}
        self.peer_max_pdu = peer_max_pdu
        self._message_id = 0
        self._closed = False
        self._lost = ""  # why it was lost, when it was

    @property
    def is_open(self) -> bool:
        """Usable for the next request: not closed, and the peer has said nothing since the
        last response (anything unread between requests is an A-ABORT or A-RELEASE-RQ)."""
        return (
            not self._closed
            and not self._reader.at_eof()
            and not self._writer.is_closing()
            and not getattr(self._reader, "_buffer", b"")
        )

    def accepted_syntaxes(self, sop_class_uid: str) -> dict[str, int]:
        """Transfer syntax -> context id, of the contexts accepted for ``sop_class_uid``."""
        out: dict[str, int] = {}
        for cid, (abstract, ts) in self.accepted.items():
            if abstract == sop_class_uid:
                out.setdefault(ts, cid)
        return out

    async def store(
        self,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        data: bytes | tuple[Path, int],
        *,
        timeout: float,
        move_originator: tuple[str, int] | None = None,
    ) -> StoreResponse:
        """Send one C-STORE-RQ (PS3.7 9.1.1) and wait up to ``timeout`` for its response.

        ``data`` is the encoded data set, or (path, offset) of a file to stream from
        ``offset`` to its end. Raises :class:`AssociationLost` when the association went
        away (it is then aborted) and ``OSError`` when the file cannot be read (the
        association is then aborted too: a half-sent data set cannot be taken back).
        """
        if not self.is_open:
            raise AssociationLost(self._lost or "association closed")
        self._message_id = self._message_id % 0xFFFF + 1
        command = encode_store_rq(
            self._message_id,
            sop_class_uid,
            sop_instance_uid,
            move_originator_ae=move_originator[0] if move_originator else "",
            move_originator_message_id=move_originator[1] if move_originator else None,
        )
        limit = min(self.peer_max_pdu or _MAX_PEER_PDU, _MAX_PEER_PDU)
        try:
            async with asyncio.timeout(timeout):
                head = pdu.encode_p_data(context_id, command, command=True, max_pdu_length=limit)
                await self._write_dataset(context_id, head, data, limit)
                response = await self._read_response()
        except TimeoutError:
            self.abort()
            raise AssociationLost(f"no C-STORE response within {timeout:g} s") from None
        except OSError as exc:
            if isinstance(exc, ConnectionError):
                self.abort()
                raise AssociationLost(f"connection lost ({type(exc).__name__})") from None
            self.abort()
            raise
        except (asyncio.IncompleteReadError, pdu.PduError, CommandError) as exc:
            self.abort()
            reason = (
                "association aborted or connection closed by the peer"
                if isinstance(exc, asyncio.IncompleteReadError)
                else f"bad response: {exc}"
            )
            raise AssociationLost(reason) from None
        return response

    async def _write_dataset(
        self, context_id: int, head: bytes, data: bytes | tuple[Path, int], limit: int
    ) -> None:
        """Write ``head`` (the command's PDUs) and the data set's PDUs, a block at a time
        in one write each (one system call for a small instance)."""
        writer = self._writer
        if isinstance(data, bytes):
            body = pdu.encode_p_data(context_id, data, command=False, max_pdu_length=limit)
            writer.writelines([head, body])
            await writer.drain()
            return
        path, offset = data
        fragment = limit - 6
        block_size = max(fragment, _READ_BLOCK - _READ_BLOCK % fragment)  # whole fragments
        with path.open("rb") as fh:
            left = os.fstat(fh.fileno()).st_size - offset
            fh.seek(offset)
            if left <= 0:
                writer.writelines(
                    [head, pdu.encode_pdv_pdu(context_id, b"", command=False, last=True)]
                )
                await writer.drain()
                return
            in_thread = left > _SYNC_READ_LIMIT
            while left > 0:
                size = min(left, block_size)
                block = await asyncio.to_thread(fh.read, size) if in_thread else fh.read(size)
                if len(block) != size:
                    raise OSError("stored file shorter than its size")
                left -= size
                view = memoryview(block)
                out: list[bytes | memoryview] = [head] if head else []
                head = b""
                for start in range(0, size, fragment):
                    chunk = view[start : start + fragment]
                    last = left == 0 and start + fragment >= size
                    # Header, then the fragment as a view of the block: the transport
                    # writes them together (writev), without copying each fragment twice.
                    out.append(pdu.pdv_pdu_header(context_id, len(chunk), command=False, last=last))
                    out.append(chunk)
                writer.writelines(out)
                await writer.drain()

    async def _read_response(self) -> StoreResponse:
        """Read PDUs until a whole C-STORE-RSP command set arrived."""
        command = bytearray()
        while True:
            pdu_type, body = await _read_pdu(self._reader)
            if pdu_type == pdu.PduType.ABORT:
                self._close("association aborted by the peer")
                raise AssociationLost("association aborted by the peer")
            if pdu_type == pdu.PduType.RELEASE_RQ:
                # PS3.8 7.2: a peer asking to release while we wait; answer and report.
                self._writer.write(pdu.encode_release_rp())
                self._close("association released by the peer")
                raise AssociationLost("association released by the peer before responding")
            if pdu_type != pdu.PduType.P_DATA_TF:
                raise pdu.PduError(f"unexpected PDU 0x{pdu_type:02X} while awaiting C-STORE-RSP")
            pos = 0
            while pos + 6 <= len(body):
                (length,) = struct.unpack_from(">I", body, pos)
                control = body[pos + 5]
                end = pos + 4 + length
                if length < 2 or end > len(body):
                    raise pdu.PduError("PDV item length does not fit its PDU")
                if not control & 1:
                    raise pdu.PduError("data set fragment where a C-STORE-RSP was expected")
                command += body[pos + 6 : end]
                pos = end
                if control & 2:
                    rsp = decode_command(bytes(command))
                    if rsp.command_field != CommandField.C_STORE_RSP:
                        raise CommandError(f"command 0x{rsp.command_field:04X} not C-STORE-RSP")
                    if rsp.message_id_responded_to != self._message_id:
                        raise CommandError("response to another message")
                    return StoreResponse(
                        rsp.status if rsp.status is not None else 0xC000, rsp.error_comment
                    )

    async def release(self, timeout: float) -> None:
        """A-RELEASE (PS3.8 7.2); abort when the peer does not answer within ``timeout``."""
        if not self.is_open:
            self._close("released")
            return
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(pdu._pdu(pdu.PduType.RELEASE_RQ, bytes(4)))
                await self._writer.drain()
                while True:
                    pdu_type, _ = await _read_pdu(self._reader)
                    if pdu_type in (pdu.PduType.RELEASE_RP, pdu.PduType.ABORT):
                        break
        except (TimeoutError, OSError, asyncio.IncompleteReadError, pdu.PduError):
            self.abort()
            return
        self._close("released")

    def abort(self) -> None:
        """A-ABORT (service user, PS3.8 7.3.1) and close the connection."""
        if self._closed:
            return
        with contextlib.suppress(OSError, RuntimeError):
            if not self._writer.is_closing():
                self._writer.write(pdu.encode_abort(source=0))
        self._close("aborted")

    def _close(self, why: str) -> None:
        self._closed = True
        self._lost = self._lost or why
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.close()
