"""Structural completeness check of an encoded data set (PS3.5 section 7).

pydicom reads a truncated file without complaint (it stops at end of file). A gateway must
not acknowledge a half image, so before indexing we walk the element headers of the
received data set, seeking over values, and refuse it when any element, item or sequence
runs past the end. Cost: one 8-12 byte read per element header; values are never read.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.uid import UID

from dicomgate.errors import InvalidInstance

_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"SV",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xE000, 0xE00D, 0xE0DD
_MAX_DEPTH = 64


class _Walker:
    def __init__(self, fh: BinaryIO, end: int, explicit: bool, little: bool) -> None:
        self.fh = fh
        self.end = end
        self.explicit = explicit
        self.prefix = "<" if little else ">"

    def _read(self, n: int, what: str) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise InvalidInstance(f"data set truncated inside {what}")
        return data

    def _skip(self, length: int, what: str) -> None:
        pos = self.fh.tell() + length
        if pos > self.end:
            raise InvalidInstance(f"{what} has length {length}, past the end of the data set")
        self.fh.seek(pos)

    def dataset(self, explicit: bool, depth: int, in_item: bool) -> None:
        """Walk elements until end of file (top level) or an item delimiter (in an item)."""
        if depth > _MAX_DEPTH:
            raise InvalidInstance("sequences nested too deep")
        while True:
            if self.fh.tell() >= self.end:
                if in_item:
                    raise InvalidInstance("data set truncated inside an undefined-length item")
                return
            head = self._read(8, "an element header")
            group, element = struct.unpack_from(self.prefix + "HH", head)
            tag = f"({group:04X},{element:04X})"
            if group == 0xFFFE:
                if element == _ITEM_END and in_item:
                    return
                raise InvalidInstance(f"unexpected delimiter {tag}")
            if explicit:
                vr = head[4:6]
                if vr in _LONG_VRS:
                    (length,) = struct.unpack(self.prefix + "I", self._read(4, tag))
                else:
                    (length,) = struct.unpack_from(self.prefix + "H", head, 6)
                    if not (vr[:1].isalpha() and vr[1:].isalpha()):
                        raise InvalidInstance(f"element {tag} has no valid VR")
            else:
                vr = b""
                (length,) = struct.unpack_from(self.prefix + "I", head, 4)
            if length != _UNDEFINED:
                self._skip(length, f"element {tag}")
                continue
            if (group, element) == (0x7FE0, 0x0010) and explicit and vr != b"SQ":
                self.fragments(tag)
            elif vr == b"UN" or (explicit and vr == b"SQ") or not explicit:
                # PS3.5 6.2.2: UN of undefined length holds Implicit VR Little Endian items.
                inner = explicit and vr == b"SQ"
                self.sequence(inner, depth + 1, tag)
            else:
                raise InvalidInstance(
                    f"element {tag} ({vr.decode('ascii', 'replace')}) has undefined length"
                )

    def sequence(self, explicit: bool, depth: int, tag: str) -> None:
        while True:
            head = self._read(8, f"sequence {tag}")
            group, element, length = struct.unpack(self.prefix + "HHI", head)
            if group != 0xFFFE:
                raise InvalidInstance(f"sequence {tag} holds a non-item element")
            if element == _SEQ_END:
                return
            if element != _ITEM:
                raise InvalidInstance(f"sequence {tag} holds an unexpected delimiter")
            if length == _UNDEFINED:
                self.dataset(explicit, depth, in_item=True)
            else:
                self._skip(length, f"an item of {tag}")

    def fragments(self, tag: str) -> None:
        """Encapsulated Pixel Data (PS3.5 A.4): defined-length items, then a delimiter."""
        while True:
            head = self._read(8, "encapsulated pixel data")
            group, element, length = struct.unpack(self.prefix + "HHI", head)
            if (group, element) == (0xFFFE, _SEQ_END):
                return
            if (group, element) != (0xFFFE, _ITEM) or length == _UNDEFINED:
                raise InvalidInstance(f"bad fragment item in {tag}")
            self._skip(length, f"a fragment of {tag}")


def check_complete(fh: BinaryIO, start: int, end: int, transfer_syntax: str) -> None:
    """Raise :class:`InvalidInstance` unless the data set in ``fh[start:end]`` is complete."""
    uid = UID(transfer_syntax)
    if uid.is_deflated:
        return  # checked by the full parse that inflates it
    # Private or unknown syntaxes are assumed to be explicit VR little endian with pixel
    # data encapsulated, the only encoding a new transfer syntax may use (PS3.5 10).
    explicit = uid.is_implicit_VR is False if uid.is_transfer_syntax else True
    little = uid.is_little_endian if uid.is_transfer_syntax else True
    fh.seek(start)
    if explicit and start < end:
        # Some senders encode Implicit VR under an explicit syntax; like pydicom (and DCMTK),
        # detect that from the first element's VR bytes instead of refusing the image.
        head = fh.read(6)
        fh.seek(start)
        if len(head) == 6 and not (head[4:5].isalpha() and head[5:6].isalpha()):
            explicit = False
    _Walker(fh, end, explicit, little).dataset(explicit, 0, in_item=False)
