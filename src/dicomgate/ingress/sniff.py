"""Is this file DICOM, and which instance is it? Decided from its first bytes only.

A folder or zip member may hold a DICOM Part 10 file (PS3.10 7.1: 128-byte preamble,
``DICM``, File Meta Information), a Part 10 file without the preamble, or a bare data set
without any file meta (Implicit VR Little Endian, or Explicit VR Little/Big Endian), as old
systems export. :func:`sniff` reads the head of such a file (never the whole file: DESIGN
rule 2) and returns where the data set starts, its transfer syntax and its SOP Class and
Instance UIDs; the data set itself is checked for completeness later, by the ingestor.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import NoReturn

from dicomgate.errors import InvalidInstance
from dicomgate.index.extract import nameable_uid

HEAD_BYTES = 1 << 18  # how much of a file is read to decide; the data set's UIDs come early
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR (PS3.10 8.6, PS3.3 F)
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"  # retired, still found on old media
ZIP_MAGIC = b"PK\x03\x04"

# PS3.5 7.1.2: VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
_VRS = _LONG_VRS | frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNDEFINED = 0xFFFFFFFF
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018


class NotDicom(InvalidInstance):
    """The file is neither a DICOM Part 10 file nor a bare DICOM data set."""


@dataclass(frozen=True)
class Sniffed:
    """What the head of a DICOM file says about it."""

    data_offset: int  # where the data set starts in the file (after any file meta)
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    has_meta: bool  # False: a bare data set (its transfer syntax was deduced)

    @property
    def is_dicomdir(self) -> bool:
        """A Media Storage Directory (DICOMDIR): an index of media, not an instance."""
        return self.sop_class_uid == MEDIA_STORAGE_DIRECTORY


def is_zip(head: bytes) -> bool:
    """A zip archive (local file header signature, APPNOTE 4.3.7), not a DICOM file."""
    return head[:4] == ZIP_MAGIC and head[128:132] != b"DICM"


def sniff(head: bytes, complete: bool) -> Sniffed:
    """Decide from ``head`` (the first bytes of a file; ``complete`` when it is the whole file).

    Raises :class:`NotDicom` when it is not DICOM at all and :class:`InvalidInstance` when it
    is DICOM but unusable (file meta truncated, no SOP Class/Instance UID).
    """
    if not head:
        raise NotDicom("empty file")
    if len(head) >= 132 and head[128:132] == b"DICM":
        return _part10(head, 132, complete)
    if len(head) >= 8 and struct.unpack_from("<H", head)[0] == 0x0002:
        return _part10(head, 0, complete)  # file meta without the preamble
    return _bare(head, complete)


def _part10(head: bytes, pos: int, complete: bool) -> Sniffed:
    """File Meta Information (PS3.10 7.1): group 0002, Explicit VR Little Endian."""
    meta: dict[int, str] = {}
    while True:
        if pos + 8 > len(head):
            if complete and pos == len(head):
                break  # a file of nothing but file meta: the ingestor refuses the empty set
            _short_meta(complete)
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                _short_meta(complete)
            (length,) = struct.unpack_from("<I", head, pos + 8)
            value_pos = pos + 12
        elif vr in _VRS:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            value_pos = pos + 8
        else:  # some writers encode the file meta in Implicit VR
            (length,) = struct.unpack_from("<I", head, pos + 4)
            value_pos = pos + 8
        if length == _UNDEFINED or value_pos + length > len(head):
            _short_meta(complete)
        if element in (0x0002, 0x0003, 0x0010):
            meta[element] = _text(head[value_pos : value_pos + length])
        pos = value_pos + length
    data_offset = pos
    transfer_syntax = meta.get(0x0010, "")
    if transfer_syntax and not _UID_RE.match(transfer_syntax):
        raise InvalidInstance("the file meta holds a malformed Transfer Syntax UID")
    if not transfer_syntax:
        # PS3.10 requires it; without it, read the data set as pydicom and DCMTK do.
        transfer_syntax = _guess_syntax(head, data_offset)
    sop_class, sop_instance = meta.get(0x0002, ""), meta.get(0x0003, "")
    if not (sop_class and sop_instance):
        if transfer_syntax not in (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE):
            raise InvalidInstance("the file meta lacks the Media Storage SOP Class/Instance UID")
        sop_class, sop_instance = _find_sop_uids(head, data_offset, transfer_syntax, complete)
    # A SOP Class UID names a class this gateway knows by its digits; a SOP Instance UID
    # with a slip from PS3.5 9.1 (a letter) is stored as received, as over DIMSE.
    if not (_UID_RE.match(sop_class) and len(sop_class) <= 64 and nameable_uid(sop_instance)):
        raise InvalidInstance("the file meta holds a malformed SOP Class or Instance UID")
    return Sniffed(data_offset, transfer_syntax, sop_class, sop_instance, has_meta=True)


def _short_meta(complete: bool) -> NoReturn:
    if complete:
        raise InvalidInstance("file meta information truncated")
    raise InvalidInstance(f"file meta information longer than {HEAD_BYTES} bytes")


def _bare(head: bytes, complete: bool) -> Sniffed:
    """A data set without file meta: its first element must be in group 0008 (PS3.5 7.1)."""
    if len(head) < 8:
        raise NotDicom("not a DICOM file (too short)")
    if struct.unpack_from("<H", head)[0] == 0x0008:
        little = True
    elif struct.unpack_from(">H", head)[0] == 0x0008:
        little = False
    else:
        raise NotDicom("not a DICOM file (no DICM prefix and no DICOM data set)")
    explicit = head[4:6] in _VRS
    if not little and not explicit:
        raise NotDicom("not a DICOM file (no DICM prefix and no DICOM data set)")
    syntax = EXPLICIT_BE if not little else (EXPLICIT_LE if explicit else IMPLICIT_LE)
    try:
        sop_class, sop_instance = _find_sop_uids(head, 0, syntax, complete)
    except InvalidInstance as exc:
        # Without a DICM prefix the bytes are DICOM only if they parse as a data set.
        raise NotDicom(f"not a DICOM file ({exc})") from exc
    return Sniffed(0, syntax, sop_class, sop_instance, has_meta=False)


def _guess_syntax(head: bytes, pos: int) -> str:
    return EXPLICIT_LE if head[pos + 4 : pos + 6] in _VRS else IMPLICIT_LE


def _find_sop_uids(head: bytes, pos: int, syntax: str, complete: bool) -> tuple[str, str]:
    """SOP Class and Instance UID (0008,0016/0018) from the top level of the data set."""
    little = syntax != EXPLICIT_BE
    explicit = syntax != IMPLICIT_LE
    u16, u32 = ("<H", "<I") if little else (">H", ">I")
    found: dict[int, str] = {}
    previous = -1
    while _SOP_INSTANCE not in found:
        if pos + 8 > len(head):
            if complete:
                raise InvalidInstance("no SOP Class/Instance UID in the data set")
            raise InvalidInstance(f"no SOP Class/Instance UID in the first {HEAD_BYTES} bytes")
        group, element = struct.unpack_from(u16 + u16[1], head, pos)
        tag = group << 16 | element
        if tag <= previous:
            raise InvalidInstance("data set elements out of order")
        if tag > _SOP_INSTANCE:
            break
        previous = tag
        if explicit:
            vr = head[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > len(head):
                    raise InvalidInstance("data set truncated inside an element header")
                (length,) = struct.unpack_from(u32, head, pos + 8)
                value_pos = pos + 12
            elif vr in _VRS:
                (length,) = struct.unpack_from(u16, head, pos + 6)
                value_pos = pos + 8
            else:
                raise InvalidInstance(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no VR")
        else:
            (length,) = struct.unpack_from(u32, head, pos + 4)
            value_pos = pos + 8
        if length == _UNDEFINED:
            raise InvalidInstance("an undefined-length element precedes the SOP Instance UID")
        if tag in (_SOP_CLASS, _SOP_INSTANCE):
            if value_pos + length > len(head) or length > 64:
                raise InvalidInstance("the SOP Class or Instance UID is truncated or too long")
            found[tag] = _text(head[value_pos : value_pos + length])
        pos = value_pos + length
    sop_class, sop_instance = found.get(_SOP_CLASS, ""), found.get(_SOP_INSTANCE, "")
    if not (_UID_RE.match(sop_class) and nameable_uid(sop_instance)):
        raise InvalidInstance("no valid SOP Class/Instance UID in the data set")
    return sop_class, sop_instance


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").strip("\x00 ")
