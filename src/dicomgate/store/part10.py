"""DICOM Part 10 file header (PS3.10 7.1): 128-byte preamble, 'DICM', group 0002."""

from __future__ import annotations

import json
import struct
from typing import BinaryIO

from dicomgate import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomgate.store.scan import LONG_VRS


def _short(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    source_ae: str = "",
    private_information: bytes = b"",
) -> bytes:
    """Preamble + File Meta Information, Explicit VR Little Endian (PS3.10 7.1).

    ``private_information`` goes to (0002,0102) under our Private Information Creator UID
    (0002,0100): dicomgate keeps how the instance arrived there (see :func:`arrival_json`),
    so recovery can route an instance whose index row was lost exactly as at arrival.
    """
    body = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
    body += _short(0x0002, b"UI", sop_class_uid.encode("ascii", "replace"), b"\x00")
    body += _short(0x0003, b"UI", sop_instance_uid.encode("ascii", "replace"), b"\x00")
    body += _short(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00")
    body += _short(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00")
    body += _short(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")
    if source_ae:
        body += _short(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16], b" ")
    if private_information:
        body += _short(0x0100, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00")
        value = private_information + (b" " if len(private_information) % 2 else b"")
        body += struct.pack("<HH2sHI", 0x0002, 0x0102, b"OB", 0, len(value)) + value
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return bytes(128) + b"DICM" + group_length + body


def arrival_json(
    calling_ae: str,
    called_ae: str,
    source_ip: str,
    received_via: str,
    declared_transfer_syntax: str = "",
) -> bytes:
    """How an instance arrived, for (0002,0102) Private Information.

    ``declared_transfer_syntax``: the transfer syntax the sender announced (the presentation
    context, or its file meta) when the file meta says another, the one its data set is
    really encoded in (:func:`dicomgate.store.scan.stored_transfer_syntax`)."""
    doc = {
        "calling_ae": calling_ae,
        "called_ae": called_ae,
        "source_ip": source_ip,
        "received_via": received_via,
    }
    if declared_transfer_syntax:
        doc["declared_transfer_syntax"] = declared_transfer_syntax
    return json.dumps(doc, separators=(",", ":")).encode("ascii", "replace")


def parse_arrival(private_information: bytes | None) -> dict[str, str]:
    """The arrival context written by :func:`arrival_json`; {} when absent or unreadable."""
    if not private_information:
        return {}
    try:
        doc = json.loads(private_information.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


_OURS = frozenset({0x0100, 0x0102})  # Private Information Creator UID, Private Information
_META_MAX = 1 << 16  # a file meta longer than this is not one we wrote: sent as it is


def relay_header(fh: BinaryIO) -> tuple[bytes, int]:
    """What a relay sends instead of a stored file's first bytes: ``(header, offset)``, the
    preamble and file meta without our arrival context ((0002,0100), (0002,0102): the
    sender's AE titles and IP address, which are ours to keep, not the destination's), its
    group length fixed; then the file from ``offset`` on. ``(b"", 0)`` when there is
    nothing to take out (the file is sent as it is)."""
    head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return b"", 0
    group_length = int.from_bytes(head[140:144], "little")
    if group_length > _META_MAX:
        return b"", 0
    meta = fh.read(group_length)
    if len(meta) < group_length:
        return b"", 0
    kept, pos, dropped = bytearray(), 0, False
    while pos + 8 <= len(meta):
        group, element, vr = struct.unpack_from("<HH2s", meta, pos)
        if vr in LONG_VRS:
            if pos + 12 > len(meta):
                return b"", 0
            end = pos + 12 + int.from_bytes(meta[pos + 8 : pos + 12], "little")
        else:
            end = pos + 8 + int.from_bytes(meta[pos + 6 : pos + 8], "little")
        if group != 0x0002 or end > len(meta):
            return b"", 0
        if element in _OURS:
            dropped = True
        else:
            kept += meta[pos:end]
        pos = end
    if not dropped or pos != len(meta):
        return b"", 0
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(kept))
    return head[:132] + length + bytes(kept), 144 + group_length
