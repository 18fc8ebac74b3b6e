"""DICOM Part 10 file header (PS3.10 7.1): 128-byte preamble, 'DICM', group 0002."""

from __future__ import annotations

import struct

from dicomgate import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME


def _short(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str = ""
) -> bytes:
    """Preamble + File Meta Information, Explicit VR Little Endian (PS3.10 7.1)."""
    body = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
    body += _short(0x0002, b"UI", sop_class_uid.encode("ascii", "replace"), b"\x00")
    body += _short(0x0003, b"UI", sop_instance_uid.encode("ascii", "replace"), b"\x00")
    body += _short(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00")
    body += _short(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00")
    body += _short(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")
    if source_ae:
        body += _short(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16], b" ")
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return bytes(128) + b"DICM" + group_length + body
