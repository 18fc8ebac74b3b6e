"""A DIMSE destination that breaks PS3.8 / PS3.7: every way it misbehaves ends in a clear,
retryable delivery failure and a closed connection, never an exception out of the sender
(the dispatcher would log it as a bug and keep the jobs leased) nor a wait for a timeout.

DCMTK and pynetdicom cannot be made to send malformed PDUs, so the peer here is a small
asyncio acceptor on a loopback port that answers the gateway's real association requestor
the way each case says.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from tests.conftest import bundled_file, delivery_of

from dicomgate.dimse import pdu
from dicomgate.dimse.commands import CommandField, decode_command, encode_response
from dicomgate.egress.base import Outcome
from dicomgate.egress.dimse import DimseSender
from dicomgate.egress.models import DimseDestination

_AC_FIXED = 6 + 68  # PDU header and the A-ASSOCIATE-AC's fixed fields


def _accept(rq_body: bytes, *, max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-AC accepting each proposed context in its first transfer syntax."""
    rq = pdu.parse_associate_rq(rq_body)
    contexts = [
        pdu.PresentationContextAC(
            c.context_id, pdu.ContextResult.ACCEPTANCE, c.transfer_syntaxes[0]
        )
        for c in rq.contexts
    ]
    return pdu.encode_associate_ac(
        rq,
        contexts,
        max_pdu_length=max_pdu,
        implementation_class_uid="1.2.3.4",
        implementation_version_name="BADPEER",
    )


def _with_result(ac: bytes, result: int) -> bytes:
    """``ac`` with its first presentation context's result byte set to ``result``."""
    out = bytearray(ac)
    item = out.index(b"\x21\x00", _AC_FIXED)
    out[item + 6] = result
    return bytes(out)


def _with_item_length(ac: bytes, length: int) -> bytes:
    """``ac`` with its first item's length field set to ``length``."""
    out = bytearray(ac)
    out[_AC_FIXED + 2 : _AC_FIXED + 4] = struct.pack(">H", length)
    return bytes(out)


async def _read_pdu(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    pdu_type, _, length = struct.unpack(">BBI", await reader.readexactly(6))
    return pdu_type, await reader.readexactly(length)


@dataclass
class Request:
    """A C-STORE-RQ as the peer received it."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


def _success(rq: Request, message_id: int | None = None, status: int = 0) -> bytes:
    rsp = encode_response(
        CommandField.C_STORE_RSP,
        rq.message_id if message_id is None else message_id,
        status,
        sop_class_uid=rq.sop_class_uid,
        sop_instance_uid=rq.sop_instance_uid,
    )
    return pdu.encode_p_data(rq.context_id, rsp, command=True, max_pdu_length=0)


Answer = Callable[[Request], bytes]


@dataclass
class BadPeer:
    """``associate`` answers the A-ASSOCIATE-RQ body; ``answer`` (if any) each C-STORE-RQ."""

    associate: Callable[[bytes], bytes]
    answer: Answer | None = None
    pdu_sizes: list[int] = field(default_factory=list)
    closed: int = 0  # connections the gateway closed (EOF seen by the peer)
    connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            _, body = await _read_pdu(reader)
            writer.write(self.associate(body))
            await writer.drain()
            command = bytearray()
            while True:
                pdu_type, body = await _read_pdu(reader)
                self.pdu_sizes.append(len(body))
                if pdu_type == pdu.PduType.RELEASE_RQ:
                    writer.write(pdu.encode_release_rp())
                    await writer.drain()
                    continue
                if pdu_type != pdu.PduType.P_DATA_TF:
                    continue
                pos, last_data, context_id = 0, False, 0
                while pos < len(body):
                    (length,) = struct.unpack_from(">I", body, pos)
                    context_id, control = body[pos + 4], body[pos + 5]
                    if control & 1:
                        command += body[pos + 6 : pos + 4 + length]
                    else:
                        last_data = bool(control & 2)
                    pos += 4 + length
                if last_data and self.answer is not None:
                    cmd = decode_command(bytes(command))
                    command.clear()
                    rq = Request(
                        context_id,
                        cmd.message_id,
                        cmd.affected_sop_class_uid,
                        cmd.affected_sop_instance_uid,
                    )
                    writer.write(self.answer(rq))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed += 1
        finally:
            writer.close()


async def _deliver(peer: BadPeer) -> list[Outcome]:
    """Two instances to ``peer``; then wait until the gateway closed every connection."""
    server = await asyncio.start_server(peer.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    model = DimseDestination.model_validate(
        {"type": "dimse", "ae_title": "BAD", "host": "127.0.0.1", "port": port, "dimse_timeout": 5}
    )
    sender = DimseSender("bad", model, calling_ae="DICOMGATE")
    files = [bundled_file("CT_small.dcm"), bundled_file("MR_small.dcm")]
    try:
        async with asyncio.timeout(4):  # well within dimse_timeout: no case waits for it
            outcomes = await sender.send([delivery_of(f, n) for n, f in enumerate(files)])
    finally:
        await sender.close()
        async with asyncio.timeout(5):
            while peer.closed < peer.connections:
                await asyncio.sleep(0.02)
        server.close()
        await server.wait_closed()
    return outcomes


def _garbage_pdu(_: bytes) -> bytes:
    return struct.pack(">BBI", 0x09, 0, 4) + b"abcd"


def _huge_pdu(_: bytes) -> bytes:
    return struct.pack(">BBI", pdu.PduType.ASSOCIATE_AC, 0, 0x7FFFFFFF)


def _short_reject(_: bytes) -> bytes:
    return struct.pack(">BBI", pdu.PduType.ASSOCIATE_RJ, 0, 1) + b"\x00"


def _garbage_command(rq: Request) -> bytes:
    return pdu.encode_p_data(
        rq.context_id, b"\x00\x00\x00\x01garbage!", command=True, max_pdu_length=0
    )


def _data_instead_of_response(rq: Request) -> bytes:
    return pdu.encode_p_data(rq.context_id, b"ab", command=False, max_pdu_length=0)


def _unknown_pdu(_: Request) -> bytes:
    return struct.pack(">BBI", 0x0A, 0, 2) + b"zz"


def _release_request(_: Request) -> bytes:
    return pdu._pdu(pdu.PduType.RELEASE_RQ, bytes(4))


CASES: dict[str, tuple[BadPeer, str]] = {
    "undefined context result": (
        BadPeer(lambda rq: _with_result(_accept(rq), 9)),
        "malformed A-ASSOCIATE-AC from the peer: presentation context result 9 is not defined",
    ),
    "item runs past the PDU": (
        BadPeer(lambda rq: _with_item_length(_accept(rq), 0xFFFF)),
        "malformed A-ASSOCIATE-AC from the peer: A-ASSOCIATE-AC: item 0x10 length 65535"
        " runs past the PDU",
    ),
    "maximum PDU length too small for any data": (
        BadPeer(lambda rq: _accept(rq, max_pdu=6), _success),
        "peer's maximum PDU length 6 is too small to carry data",
    ),
    "unknown PDU type instead of an answer": (
        BadPeer(_garbage_pdu),
        "unexpected PDU 0x09 instead of A-ASSOCIATE-AC",
    ),
    "2 GB PDU announced": (
        BadPeer(_huge_pdu),
        "malformed answer to A-ASSOCIATE-RQ: PDU of 2147483647 bytes",
    ),
    "truncated A-ASSOCIATE-RJ": (BadPeer(_short_reject), "association rejected"),
    "response to another message": (
        BadPeer(_accept, lambda rq: _success(rq, message_id=rq.message_id + 7)),
        "bad response: response to another message",
    ),
    "undecodable response command": (
        BadPeer(_accept, _garbage_command),
        "bad response: element (0000,0100) length 1651663207 runs past the end",
    ),
    "data set fragment instead of a response": (
        BadPeer(_accept, _data_instead_of_response),
        "bad response: data set fragment where a C-STORE-RSP was expected",
    ),
    "unknown PDU type instead of a response": (
        BadPeer(_accept, _unknown_pdu),
        "bad response: unexpected PDU 0x0A while awaiting C-STORE-RSP",
    ),
    "A-RELEASE-RQ instead of a response": (
        BadPeer(_accept, _release_request),
        "association released by the peer before responding",
    ),
    "undefined status": (BadPeer(_accept, lambda rq: _success(rq, status=0xFFFF)), "status 0xFFFF"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_misbehaving_peer_fails_the_batch_retryably_and_is_disconnected(case: str) -> None:
    spec, error = CASES[case]
    peer = BadPeer(spec.associate, spec.answer)
    outcomes = asyncio.run(_deliver(peer))
    assert [(o.delivered, o.retryable, o.error) for o in outcomes] == [(False, True, error)] * 2
    assert peer.connections >= 1


def test_a_tiny_maximum_pdu_length_is_respected() -> None:
    """PS3.8 D.1: the peer's Maximum Length Received bounds every P-DATA-TF we send, down
    to one byte of message per PDU."""
    peer = BadPeer(lambda rq: _accept(rq, max_pdu=7), _success)
    outcomes = asyncio.run(_deliver(peer))
    assert outcomes == [Outcome(0, True), Outcome(1, True)]
    assert max(peer.pdu_sizes) == 7
    assert len(peer.pdu_sizes) > 10_000  # CT_small's data set, a byte at a time


def _reject_every_context(result: pdu.ContextResult) -> Callable[[bytes], bytes]:
    """An A-ASSOCIATE-AC rejecting each proposed context with ``result``."""

    def associate(rq_body: bytes) -> bytes:
        rq = pdu.parse_associate_rq(rq_body)
        contexts = [
            pdu.PresentationContextAC(c.context_id, result, c.transfer_syntaxes[0])
            for c in rq.contexts
        ]
        return pdu.encode_associate_ac(
            rq,
            contexts,
            max_pdu_length=16384,
            implementation_class_uid="1.2.3.4",
            implementation_version_name="BADPEER",
        )

    return associate


@pytest.mark.parametrize(
    ("result", "words"),
    [
        (pdu.ContextResult.USER_REJECTION, "user-rejection"),
        (pdu.ContextResult.NO_REASON, "provider-rejection (no reason)"),
    ],
)
def test_contexts_rejected_for_another_reason_fail_for_good_after_the_lossless_offer(
    result: pdu.ContextResult, words: str
) -> None:
    """Every context rejected, but not as an unsupported SOP class: the lossless compressed
    syntaxes are offered in a second association request; refused again, the instances
    fail for good (the same proposal gets the same answer), not as a lost association
    retried and counted against the circuit breaker."""
    peer = BadPeer(_reject_every_context(result))
    outcomes = asyncio.run(_deliver(peer))
    assert [(o.delivered, o.retryable) for o in outcomes] == [(False, False)] * 2, outcomes
    for outcome, name in zip(outcomes, ("CT Image Storage", "MR Image Storage"), strict=True):
        assert outcome.error.startswith(f"peer accepted {name} "), outcome.error
        assert "JPEGLSLossless, JPEGLosslessSV1, JPEG2000Lossless, RLELossless" in outcome.error
        assert outcome.error.endswith(f"presentation context result: {words})"), outcome.error
    assert peer.connections == 2
