"""Bad input on the DIMSE port: a scripted raw peer (plain sockets, PDUs built by hand).

DESIGN rule 6: bad input gets a clear error, changes nothing, and the process keeps
serving. After every bad peer a normal echoscu and storescu must still succeed, and the
gateway's log must carry the reason of the refusal.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from tests.conftest import GatewayProcess, bundled_file, needs_dcmtk

pytestmark = [pytest.mark.timeout(60), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

STATUS_SUCCESS = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_DATASET_DOES_NOT_MATCH = 0xA900


# -- PDU building (PS3.8 9.3) ---------------------------------------------------------------


def _uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def associate_rq(
    called: str,
    calling: str,
    contexts: list[tuple[int, str, list[str]]],
    max_pdu: int = 65536,
    user_items: bytes = b"",
) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2) with the given presentation contexts; ``user_items``
    are more user information sub-items (role selection ...)."""
    body = struct.pack(">HH", 1, 0)
    body += called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += _item(0x10, _uid(APPLICATION_CONTEXT))
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, _uid(abstract)) + b"".join(_item(0x40, _uid(ts)) for ts in syntaxes)
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + user_items)
    return _pdu(0x01, body)


def scp_role(sop_class: str) -> bytes:
    """SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4) taking the SCP role, as a C-GET
    requestor does for the storage classes it wants to receive."""
    uid = sop_class.encode()
    return _item(0x54, struct.pack(">H", len(uid)) + uid + bytes([0, 1]))


def p_data(context_id: int, payload: bytes, *, command: bool, last: bool = True) -> bytes:
    """One P-DATA-TF PDU holding one PDV (PS3.8 9.3.5, E.2)."""
    control = (1 if command else 0) | (2 if last else 0)
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
    return _pdu(0x04, pdv)


def release_rq() -> bytes:
    return _pdu(0x05, bytes(4))


def _element(tag: int, value: bytes) -> bytes:
    """Implicit VR little endian element (command sets are always encoded so)."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """C-STORE-RQ command set (PS3.7 9.3.1.1), with a data set following."""
    elements = (
        _element(0x00000002, sop_class.encode())
        + _element(0x00000100, struct.pack("<H", 0x0001))
        + _element(0x00000110, struct.pack("<H", message_id))
        + _element(0x00000700, struct.pack("<H", 0))
        + _element(0x00000800, struct.pack("<H", 0x0000))
        + _element(0x00001000, sop_instance.encode())
    )
    return _element(0x00000000, struct.pack("<I", len(elements))) + elements


def parse_command(raw: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(raw):
        group, element, length = struct.unpack_from("<HHI", raw, pos)
        out[(group << 16) | element] = raw[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file: everything after its File Meta group."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    pos = 132
    while pos < len(raw):
        group, _element_no = struct.unpack_from("<HH", raw, pos)
        if group != 0x0002:
            break
        vr = raw[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            (length,) = struct.unpack_from("<I", raw, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", raw, pos + 6)
            pos += 8 + length
    return raw[pos:]


# -- a scripted peer ------------------------------------------------------------------------


@dataclass
class Pdu:
    pdu_type: int
    body: bytes


class RawPeer:
    """A socket that speaks (or misspeaks) the upper layer protocol by hand."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepted: dict[int, str] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also when an assertion failed: no association left to the gateway

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def read_pdu(self) -> Pdu:
        head = self._exactly(6)
        pdu_type, _, length = struct.unpack(">BBI", head)
        return Pdu(pdu_type, self._exactly(length))

    def closed_by_peer(self) -> bool:
        """True once the gateway has closed the connection (reads EOF or a reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def associate(
        self,
        called: str,
        contexts: list[tuple[int, str, list[str]]],
        max_pdu: int = 65536,
        user_items: bytes = b"",
        calling: str = "RAWPEER",
    ) -> None:
        self.send(associate_rq(called, calling, contexts, max_pdu, user_items))
        answer = self.read_pdu()
        assert answer.pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got {answer}"
        pos = 68
        while pos < len(answer.body):
            item_type, _, length = struct.unpack_from(">BBH", answer.body, pos)
            value = answer.body[pos + 4 : pos + 4 + length]
            if item_type == 0x21 and value[2] == 0:
                ts_length = struct.unpack_from(">H", value, 6)[0]
                self.accepted[value[0]] = value[8 : 8 + ts_length].rstrip(b"\x00").decode()
            pos += 4 + length

    def c_store(self, context_id: int, sop_class: str, sop_instance: str, data: bytes) -> int:
        """Send a C-STORE-RQ and its data set (in 16 KiB PDUs); return the status."""
        self.send(p_data(context_id, c_store_rq(1, sop_class, sop_instance), command=True))
        step = 16384
        for start in range(0, len(data), step):
            chunk = data[start : start + step]
            self.send(p_data(context_id, chunk, command=False, last=start + step >= len(data)))
        answer = self.read_pdu()
        assert answer.pdu_type == 0x04, f"expected P-DATA-TF, got {answer}"
        command = parse_command(answer.body[6:])
        assert struct.unpack("<H", command[0x00000100])[0] == 0x8001  # C-STORE-RSP
        status: int = struct.unpack("<H", command[0x00000900])[0]
        return status

    def read_message(self, max_pdu: int = 0) -> tuple[dict[int, bytes], bytes | None]:
        """The next whole message: its command set and data set (None without one), in
        PDUs no longer than ``max_pdu`` (when given)."""
        command, data = b"", b""
        while True:
            answer = self.read_pdu()
            assert answer.pdu_type == 0x04, f"expected P-DATA-TF, got {answer}"
            assert not max_pdu or len(answer.body) <= max_pdu, len(answer.body)
            pos = 0
            while pos < len(answer.body):
                (length,) = struct.unpack_from(">I", answer.body, pos)
                control = answer.body[pos + 5]
                fragment = answer.body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & 1:
                    command += fragment
                    if control & 2:
                        parsed = parse_command(command)
                        if struct.unpack("<H", parsed[0x00000800])[0] == 0x0101:
                            return parsed, None
                else:
                    data += fragment
                    if control & 2:
                        return parse_command(command), data

    def release(self) -> None:
        self.send(release_rq())
        assert self.read_pdu().pdu_type == 0x06


def assert_still_serves(gw: GatewayProcess) -> None:
    """A well-behaved peer still gets a normal service after the bad one."""
    assert gw.echoscu().returncode == 0, gw.log_tail()
    result = gw.storescu([bundled_file("CT_small.dcm")])
    assert result.returncode == 0, result.stdout + gw.log_tail()
    assert gw.index.instance("1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322") is not None
    assert gw.running()


def assert_abort(peer: RawPeer, reason: int) -> None:
    answer = peer.read_pdu()
    assert answer.pdu_type == 0x07, f"expected A-ABORT, got {answer}"
    source, got_reason = answer.body[2], answer.body[3]
    assert source == 2  # service provider (PS3.8 9.3.8)
    assert got_reason == reason
    assert peer.closed_by_peer()


# -- protocol errors ------------------------------------------------------------------------


def test_garbage_bytes(gateway: Gateway) -> None:
    gw = gateway()
    peer = RawPeer(gw.dimse_port)
    peer.send(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")
    assert_abort(peer, reason=1)  # unrecognized PDU
    peer.close()
    gw.wait_log("association.aborted")
    assert "expected A-ASSOCIATE-RQ, got PDU type 0x47" in gw.log_text()
    assert_still_serves(gw)


def test_truncated_pdu_then_close(gateway: Gateway) -> None:
    gw = gateway()
    peer = RawPeer(gw.dimse_port)
    rq = associate_rq(gw.ae_title, "RAWPEER", [(1, VERIFICATION, [IMPLICIT_LE])])
    peer.send(rq[: len(rq) // 2])
    peer.close()
    gw.wait_log("association.lost")
    assert "peer closed the connection" in gw.log_text()
    assert_still_serves(gw)


def test_associate_rq_with_absurd_length(gateway: Gateway) -> None:
    gw = gateway()
    peer = RawPeer(gw.dimse_port)
    peer.send(struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + b"\x00\x01\x00\x00")
    assert_abort(peer, reason=6)  # invalid PDU parameter value
    peer.close()
    gw.wait_log("association.aborted")
    assert "absurd length" in gw.log_text()
    assert_still_serves(gw)


def test_p_data_before_association(gateway: Gateway) -> None:
    gw = gateway()
    peer = RawPeer(gw.dimse_port)
    peer.send(p_data(1, c_store_rq(1, MR_IMAGE_STORAGE, "1.2.3.4"), command=True))
    assert_abort(peer, reason=2)  # unexpected PDU
    peer.close()
    gw.wait_log("association.aborted")
    assert "expected A-ASSOCIATE-RQ, got PDU type 0x04" in gw.log_text()
    assert_still_serves(gw)


# -- bad data sets --------------------------------------------------------------------------


def _sop_of(path: Path) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) from the data set (not the file meta)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    ds_uid = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    return str(ds.SOPClassUID), str(ds_uid.SOPInstanceUID)


def _store_raw(gw: GatewayProcess, path: Path, sop_instance: str | None = None) -> int:
    """C-STORE the data set bytes of ``path`` exactly as they are in the file."""
    sop_class, sop = _sop_of(path)
    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    peer = RawPeer(gw.dimse_port)
    try:
        peer.associate(gw.ae_title, [(1, sop_class, [ts])])
        assert peer.accepted == {1: ts}
        status = peer.c_store(1, sop_class, sop_instance or sop, dataset_bytes(path))
        peer.release()
    finally:
        peer.close()
    return status


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_truncated_dataset_is_refused(gateway: Gateway, name: str) -> None:
    gw = gateway()
    path = bundled_file(name)
    _, sop = _sop_of(path)
    assert _store_raw(gw, path) == STATUS_CANNOT_UNDERSTAND
    assert gw.index.instance(sop) is None
    assert gw.index.count_instances(current_only=False) == 0
    assert list((gw.data / "store").rglob("*.dcm")) == []
    gw.wait_log("instance.refused")
    refusals = [line for line in gw.log_text().splitlines() if " instance.refused " in line]
    assert any("truncated" in line or "past the end" in line for line in refusals), refusals
    assert_still_serves(gw)


def test_bad_vr_values_are_stored_as_received(gateway: Gateway) -> None:
    # Decision: invalid values (IS '1A' and the like) do not refuse an image; the bytes
    # are kept exactly as received.
    gw = gateway()
    path = bundled_file("badVR.dcm")
    _, sop = _sop_of(path)
    assert _store_raw(gw, path) == STATUS_SUCCESS
    row = gw.index.instance(sop)
    assert row is not None
    stored = gw.stored_path(row).read_bytes()
    assert stored.endswith(dataset_bytes(path))
    assert_still_serves(gw)


def test_sop_instance_mismatch_is_refused(gateway: Gateway) -> None:
    gw = gateway()
    path = bundled_file("MR_small.dcm")
    _, sop = _sop_of(path)
    announced = "1.2.826.0.1.3680043.8.498.1"
    assert _store_raw(gw, path, sop_instance=announced) == STATUS_DATASET_DOES_NOT_MATCH
    assert gw.index.instance(sop) is None
    assert gw.index.instance(announced) is None
    assert gw.index.count_instances(current_only=False) == 0
    gw.wait_log("instance.refused")
    assert "SOP Instance UID in the data set differs from the command's" in gw.log_text()
    assert_still_serves(gw)


def test_c_store_without_affected_sop_instance_uid_says_so(gateway: Gateway) -> None:
    """PS3.7 Table 9.3-1 makes it mandatory: 0xA900, and the reason names the missing field
    (it said the data set's UID "differs"); nothing stored, the association goes on."""
    gw = gateway()
    path = bundled_file("MR_small.dcm")
    sop_class, sop = _sop_of(path)
    peer = RawPeer(gw.dimse_port)
    try:
        peer.associate(gw.ae_title, [(1, sop_class, ["1.2.840.10008.1.2.1"])])
        assert peer.c_store(1, sop_class, "", dataset_bytes(path)) == STATUS_DATASET_DOES_NOT_MATCH
        assert peer.c_store(1, sop_class, sop, dataset_bytes(path)) == 0x0000  # still serving
        peer.release()
    finally:
        peer.close()
    gw.wait_log("instance.refused")
    assert "C-STORE-RQ without Affected SOP Instance UID" in gw.log_text()
    assert gw.index.count_instances(current_only=False) == 1


# -- timeouts -------------------------------------------------------------------------------


def test_silent_connection_is_aborted_after_acse_timeout(gateway: Gateway) -> None:
    gw = gateway({"dimse": {"acse_timeout": 1}})
    peer = RawPeer(gw.dimse_port)
    assert_abort(peer, reason=0)  # nothing sent: ARTIM expiry (PS3.8 9.2.3), A-ABORT
    peer.close()
    assert "no data for 1 s" in gw.log_text()
    assert_still_serves(gw)


def test_idle_association_is_aborted_after_network_timeout(gateway: Gateway) -> None:
    gw = gateway({"dimse": {"network_timeout": 1}})
    peer = RawPeer(gw.dimse_port)
    peer.associate(gw.ae_title, [(1, VERIFICATION, [IMPLICIT_LE])])
    assert_abort(peer, reason=0)
    peer.close()
    gw.wait_log("association.aborted")
    assert_still_serves(gw)


def test_data_set_that_stalls_is_aborted_after_dimse_timeout(gateway: Gateway) -> None:
    gw = gateway({"dimse": {"dimse_timeout": 1}})
    peer = RawPeer(gw.dimse_port)
    peer.associate(gw.ae_title, [(1, MR_IMAGE_STORAGE, [IMPLICIT_LE])])
    peer.send(p_data(1, c_store_rq(1, MR_IMAGE_STORAGE, "1.2.3.4"), command=True))
    peer.send(p_data(1, b"\x08\x00\x16\x00", command=False, last=False))  # then silence
    assert_abort(peer, reason=0)
    peer.close()
    gw.wait_log("association.aborted")
    assert gw.index.count_instances() == 0
    spool = gw.spool
    assert all(p.stat().st_size == 0 for p in spool.iterdir()), "half data set left in spool"
    assert_still_serves(gw)


# -- upper layer: what cannot be an association -----------------------------------------------

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PRIVATE_STORAGE = "1.2.826.0.1.3680043.10.1234.99.1"
CT_SMALL_SOP = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"


def test_abort_before_association_is_not_answered(gateway: Gateway) -> None:
    # PS3.8 9.2.3, state table: Sta2 + Evt16 (A-ABORT PDU received) -> AA-2, close the
    # transport connection. An A-ABORT is never answered (it used to get one back).
    gw = gateway()
    with RawPeer(gw.dimse_port) as peer:
        peer.send(_pdu(0x07, bytes(4)))
        assert peer.closed_by_peer()  # closed, nothing sent first
    gw.wait_log("association.lost")
    assert "peer sent A-ABORT before any association" in gw.log_text()
    assert gw.log_count("association.aborted") == 0
    assert_still_serves(gw)


@pytest.mark.parametrize("max_pdu", [1, 6])
def test_max_pdu_length_too_small_to_carry_data_is_rejected(gateway: Gateway, max_pdu: int) -> None:
    # A P-DATA-TF whose variable field is below 7 bytes cannot carry one byte of a message
    # (PS3.8 9.3.5: a PDV item header is 6 bytes). Accepted before: a C-GET then divided by
    # zero (6) or sent C-STORE-RQs without their data set (1-5).
    gw = gateway()
    with RawPeer(gw.dimse_port) as peer:
        contexts = [(1, VERIFICATION, [IMPLICIT_LE])]
        peer.send(associate_rq(gw.ae_title, "RAWPEER", contexts, max_pdu))
        answer = peer.read_pdu()
        assert answer.pdu_type == 0x03, f"expected A-ASSOCIATE-RJ, got {answer}"
        # PS3.8 Table 9-21: rejected-permanent, DICOM UL service-user, no-reason-given.
        assert tuple(answer.body[1:4]) == (1, 1, 1)
    gw.wait_log("association.rejected")
    assert f"maximum PDU length {max_pdu} is too small to carry data" in gw.log_text()
    assert_still_serves(gw)


def test_duplicate_presentation_context_id_is_aborted(gateway: Gateway) -> None:
    # PS3.8 9.3.2.2: a presentation context ID identifies one context of the association.
    # Both were accepted before, and the A-ASSOCIATE-AC carried two answers for ID 1.
    gw = gateway()
    with RawPeer(gw.dimse_port) as peer:
        contexts = [(1, VERIFICATION, [IMPLICIT_LE]), (1, CT_IMAGE_STORAGE, [EXPLICIT_LE])]
        peer.send(associate_rq(gw.ae_title, "RAWPEER", contexts))
        assert_abort(peer, reason=6)  # invalid PDU parameter value
    gw.wait_log("association.aborted")
    assert "presentation context ID 1 proposed twice" in gw.log_text()
    assert_still_serves(gw)


# -- DIMSE: commands that are not requests we serve --------------------------------------------


def command_set(
    field: int,
    *,
    message_id: int | None = None,
    responded: int | None = None,
    sop_class: str = VERIFICATION,
    dataset: bool = False,
    status: int | None = None,
) -> bytes:
    """A command set (PS3.7 E.1) with any Command Field, request or response."""
    elements = _element(0x00000002, sop_class.encode())
    elements += _element(0x00000100, struct.pack("<H", field))
    if message_id is not None:
        elements += _element(0x00000110, struct.pack("<H", message_id))
    if responded is not None:
        elements += _element(0x00000120, struct.pack("<H", responded))
    elements += _element(0x00000800, struct.pack("<H", 0x0000 if dataset else 0x0101))
    if status is not None:
        elements += _element(0x00000900, struct.pack("<H", status))
    return _element(0x00000000, struct.pack("<I", len(elements))) + elements


def u16(command: dict[int, bytes], tag: int) -> int:
    value: int = struct.unpack("<H", command[tag])[0]
    return value


def assert_echo_answered_next(peer: RawPeer, context_id: int, message_id: int) -> None:
    """The next message from the gateway answers a C-ECHO-RQ sent now: nothing was sent
    back to what came before."""
    peer.send(p_data(context_id, command_set(0x0030, message_id=message_id), command=True))
    command, _ = peer.read_message()
    assert u16(command, 0x00000100) == 0x8030, command
    assert u16(command, 0x00000120) == message_id
    assert u16(command, 0x00000900) == STATUS_SUCCESS


@pytest.mark.parametrize(
    ("field", "responded", "dataset"),
    [
        (0x8030, None, False),  # C-ECHO-RSP
        (0x8001, 999, False),  # C-STORE-RSP of no sub-operation of ours
        (0x8020, 1, True),  # C-FIND-RSP with an identifier
        (0x8110, 7, False),  # N-GET-RSP
    ],
)
def test_unexpected_responses_are_not_answered(
    gateway: Gateway, field: int, responded: int | None, dataset: bool
) -> None:
    # A response applies to a request its receiver sent (PS3.7 9.1.1.1.2: Message ID Being
    # Responded To); there is no response to a response. It used to get one (0x0211).
    gw = gateway()
    with RawPeer(gw.dimse_port) as peer:
        peer.associate(gw.ae_title, [(1, VERIFICATION, [IMPLICIT_LE])])
        rsp = command_set(field, responded=responded, dataset=dataset)
        peer.send(p_data(1, rsp, command=True))
        if dataset:
            peer.send(p_data(1, b"\x10\x00\x10\x00\x04\x00\x00\x00DOE^", command=False))
        assert_echo_answered_next(peer, 1, 42)
        peer.release()
    gw.wait_log("dimse.unexpected_response")
    assert f"unexpected response 0x{field:04X}" in gw.log_text()
    assert "DOE" not in gw.log_text()
    assert_still_serves(gw)


@pytest.mark.parametrize("field", [0x0000, 0xFFFF, 0x8000, 0x1234])
def test_undefined_command_field_is_aborted(gateway: Gateway, field: int) -> None:
    # PS3.7 E.1-1 enumerates the Command Field values; no response can name another one
    # (0x0000 was answered as 0x8000, 0xFFFF echoed as 0xFFFF): treated like an
    # undecodable command set.
    gw = gateway()
    with RawPeer(gw.dimse_port) as peer:
        peer.associate(gw.ae_title, [(1, VERIFICATION, [IMPLICIT_LE])])
        peer.send(p_data(1, command_set(field, message_id=5), command=True))
        assert_abort(peer, reason=6)
    gw.wait_log("association.aborted")
    assert f"undefined Command Field 0x{field:04X}" in gw.log_text()
    assert_still_serves(gw)


def test_request_we_do_not_serve_gets_unrecognized_operation(gateway: Gateway) -> None:
    # PS3.7 C.4.2: 0x0211 in the request's own response (N-GET-RQ -> N-GET-RSP).
    gw = gateway()
    with RawPeer(gw.dimse_port) as peer:
        peer.associate(gw.ae_title, [(1, VERIFICATION, [IMPLICIT_LE])])
        peer.send(p_data(1, command_set(0x0110, message_id=9), command=True))
        command, _ = peer.read_message()
        assert (u16(command, 0x00000100), u16(command, 0x00000120)) == (0x8110, 9)
        assert u16(command, 0x00000900) == 0x0211
        peer.release()
    assert_still_serves(gw)


@pytest.mark.parametrize(
    ("abstract", "status"),
    [
        (VERIFICATION, 0x0122),
        (STUDY_ROOT_FIND, 0x0122),
        (PRIVATE_STORAGE, STATUS_SUCCESS),  # private classes are storage classes: kept
    ],
)
def test_store_on_a_non_storage_context_is_refused(
    gateway: Gateway, abstract: str, status: int
) -> None:
    # A C-STORE on the Verification or a Q/R context, with the data set's SOP Class UID
    # made to match, was stored and indexed as an "instance" of that class. PS3.7 C.5.4:
    # 0x0122, Refused: SOP Class not Supported; nothing stored.
    from pynetdicom.dsutils import encode

    gw = gateway()
    ds = pydicom.dcmread(bundled_file("CT_small.dcm"))
    ds.SOPClassUID = abstract
    data = encode(ds, True, True)
    assert data is not None
    with RawPeer(gw.dimse_port) as peer:
        peer.associate(gw.ae_title, [(1, abstract, [IMPLICIT_LE])])
        assert peer.accepted == {1: IMPLICIT_LE}
        assert peer.c_store(1, abstract, CT_SMALL_SOP, data) == status
        peer.release()
    if status == STATUS_SUCCESS:
        assert gw.index.count_instances(current_only=False) == 1
        return
    assert gw.index.count_instances(current_only=False) == 0
    assert list((gw.data / "store").rglob("*.dcm")) == []
    gw.wait_log("instance.refused")
    assert "not a storage SOP class" in gw.log_text()
    assert_still_serves(gw)


# -- C-GET requestors that misbehave -----------------------------------------------------------


def _get_identifier() -> bytes:
    """IMAGE-level C-GET identifier of CT_small (Implicit VR Little Endian)."""
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    ct = pydicom.dcmread(bundled_file("CT_small.dcm"), stop_before_pixels=True)
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = ct.StudyInstanceUID
    ds.SeriesInstanceUID = ct.SeriesInstanceUID
    ds.SOPInstanceUID = ct.SOPInstanceUID
    raw = encode(ds, True, True)
    assert raw is not None
    return raw


def _start_get(gw: GatewayProcess, max_pdu: int = 65536) -> RawPeer:
    """CT_small stored, then a raw C-GET of it (context 1) by a requestor that takes the
    SCP role of CT Image Storage (context 3); Verification on context 5."""
    stored = gw.storescu([bundled_file("CT_small.dcm")])
    assert stored.returncode == 0, stored.stdout + gw.log_tail()
    peer = RawPeer(gw.dimse_port)
    contexts = [
        (1, STUDY_ROOT_GET, [IMPLICIT_LE]),
        (3, CT_IMAGE_STORAGE, [EXPLICIT_LE]),
        (5, VERIFICATION, [IMPLICIT_LE]),
    ]
    peer.associate(gw.ae_title, contexts, max_pdu, scp_role(CT_IMAGE_STORAGE))
    assert peer.accepted == {1: IMPLICIT_LE, 3: EXPLICIT_LE, 5: IMPLICIT_LE}
    rq = command_set(0x0010, message_id=7, sop_class=STUDY_ROOT_GET, dataset=True)
    peer.send(p_data(1, rq, command=True))
    peer.send(p_data(1, _get_identifier(), command=False))
    return peer


def test_get_with_the_smallest_max_pdu_length_sends_whole_data_sets(gateway: Gateway) -> None:
    # 7 bytes: one byte of a message per P-DATA-TF, never more than the requestor accepts.
    gw = gateway()
    with _start_get(gw, max_pdu=7) as peer:
        command, data = peer.read_message(max_pdu=7)
        assert u16(command, 0x00000100) == 0x0001  # C-STORE-RQ
        row = gw.index.instance(CT_SMALL_SOP)
        assert row is not None and row["transfer_syntax_uid"] == EXPLICIT_LE
        assert data == dataset_bytes(gw.stored_path(row))  # sent as stored
        store_rsp = command_set(
            0x8001, responded=u16(command, 0x00000110), sop_class=CT_IMAGE_STORAGE, status=0
        )
        peer.send(p_data(3, store_rsp, command=True))
        final, _ = peer.read_message(max_pdu=7)
        assert (u16(final, 0x00000100), u16(final, 0x00000900)) == (0x8010, STATUS_SUCCESS)
        peer.release()
    assert_still_serves(gw)


def test_get_requestor_that_never_answers_a_sub_operation(gateway: Gateway) -> None:
    # The sub-operation fails after dimse.move_timeout and the log says so (it said "cannot
    # read the stored file: TimeoutError"); a C-STORE-RSP arriving late is not answered.
    gw = gateway({"dimse": {"move_timeout": 1}})
    with _start_get(gw) as peer:
        command, data = peer.read_message()
        assert u16(command, 0x00000100) == 0x0001 and data  # C-STORE-RQ, not answered
        final, _ = peer.read_message()
        assert u16(final, 0x00000100) == 0x8010
        assert u16(final, 0x00000900) == 0xA702  # the one sub-operation failed
        assert u16(final, 0x00001022) == 1
        log = gw.log_text()  # the sub-operation's failure is logged before the answer
        assert "no C-STORE-RSP from the requestor within dimse.move_timeout (1 s)" in log
        assert "cannot read the stored file" not in log
        late = command_set(
            0x8001, responded=u16(command, 0x00000110), sop_class=CT_IMAGE_STORAGE, status=0
        )
        peer.send(p_data(3, late, command=True))
        assert_echo_answered_next(peer, 5, 43)
        peer.release()
    gw.wait_log("dimse.unexpected_response")
    assert_still_serves(gw)
