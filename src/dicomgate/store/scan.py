"""One pass over a received data set: completeness check + header for the index.

pydicom reads a truncated file without complaint (it stops at end of file), so a gateway
that trusted it would acknowledge half an image. :func:`scan_dataset` walks every element
header of the encoded data set (PS3.5 section 7), refuses it when any element, item or
sequence runs past the end, and at the same time collects the top-level elements small
enough to matter for indexing and routing as pydicom ``RawDataElement`` s, which pydicom
converts lazily on access. A small file is read whole (one system call); a large one is
walked through a memory map, so bulk values (pixel data, large blobs) are never read and
the cost does not grow with the instance size. Several times cheaper than ``dcmread``.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from typing import BinaryIO

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, AllTransferSyntaxes

from dicomgate.errors import InvalidInstance

LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xE000, 0xE00D, 0xE0DD
MAX_SEQUENCE_DEPTH = 64  # sequences in sequences; deeper is refused (real data: < 10)
KEEP_VALUE_MAX = 16384  # top-level values up to this size are kept for index and routing
KEEP_SEQUENCE_MAX = 1 << 20
# Text values (explicit VR) are kept up to this size: a route may match a long report text
# or a private UT, or a CS with thousands of values; past 16 KiB the router saw them as
# missing (and `dicomgate route test`, which reads the whole file, did not).
KEEP_TEXT_MAX = 1 << 20
_TEXT_VR_BYTES = frozenset(b"AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
_READ_WHOLE_MAX = 256 << 10  # bytes; larger files are memory-mapped
_INFLATE_BLOCK = 1 << 20  # bytes read, and inflated, at a time
_INFLATE_IN_MEMORY = 64 << 20  # inflated bytes kept in memory; more go to a temporary file
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"

# What every ingress accepts (the Storage SCP's Annex A in docs/conformance.md): every
# transfer syntax pydicom knows, plus retired JPEG processes and Encapsulated Uncompressed.
# We store the bytes as received, so decoding support is not needed to accept.
ACCEPTED_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    [str(uid) for uid in AllTransferSyntaxes]
    + [f"1.2.840.10008.1.2.4.{n}" for n in range(52, 67)]
    + ["1.2.840.10008.1.2.1.98"]
)


def implicit_under_explicit(first: bytes | memoryview) -> bool:
    """True when a data set whose first bytes are ``first`` (at least 6) is in Implicit VR
    although its transfer syntax says explicit: the first element header has no VR where
    PS3.5 7.1.2 puts one. Some senders do this; pydicom reads such a data set the same
    way. The scan (:func:`_scan`) and the ingresses that write the file meta
    (:func:`stored_transfer_syntax`) decide with this one test, so they always agree."""
    vr = bytes(first[4:6])
    return len(vr) == 2 and not (vr[:1].isalpha() and vr[1:].isalpha())


# Every VR of PS3.5 6.2: two bytes that name one of these where an Implicit VR data set
# has the low half of its first element's 32-bit length (a length of 16,705 bytes or
# more, "AA"), which no first element has.
_VR_NAMES_KNOWN = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI"
    b" UL UN UR US UT UV".split()
)


def explicit_under_implicit(first: bytes | memoryview) -> bool:
    """True when a data set whose first bytes are ``first`` (at least 6) is in Explicit VR
    although its transfer syntax says Implicit VR Little Endian: a VR stands where the
    first element's length is. The reverse slip of :func:`implicit_under_explicit`;
    pydicom reads such a data set the same way (DCMTK's storescp aborts the association)."""
    return bytes(first[4:6]) in _VR_NAMES_KNOWN


def stored_transfer_syntax(received: str, first: bytes | memoryview) -> str:
    """The transfer syntax to write in the stored file's meta for a data set received
    under ``received`` whose first bytes are ``first``.

    Explicit VR Little Endian over an Implicit VR data set is relabelled Implicit VR Little
    Endian: the data set bytes are those of that syntax (PS3.5 A.1 and A.2 differ only in
    the VR fields), so the file then says truthfully what it holds, and every reader and
    destination gets a syntax that matches. Implicit VR Little Endian over an Explicit VR
    data set is relabelled Explicit VR Little Endian, the same way round. Any other syntax
    is kept: implicit VR has no big endian, deflated or encapsulated counterpart to
    relabel to (docs/conformance.md).
    A data set shorter than one element header is left to the scan, which refuses it."""
    if received == EXPLICIT_LE and len(first) >= 6 and implicit_under_explicit(first):
        return IMPLICIT_LE
    if received == IMPLICIT_LE and len(first) >= 6 and explicit_under_implicit(first):
        return EXPLICIT_LE
    return received


def _tag(group: int, element: int) -> str:
    return f"({group:04X},{element:04X})"


_VR_NAMES: dict[bytes, str] = {}  # b"CS" -> "CS": two upper-case letters, filled as seen


def _new_vr_name(vr: bytes) -> str | None:
    """A VR not seen yet: its name (remembered in ``_VR_NAMES``), or None when the two
    bytes are not a VR."""
    if len(vr) == 2 and 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90:
        name = _VR_NAMES[vr] = vr.decode("ascii")
        return name
    return None


@functools.lru_cache(maxsize=64)
def _encoding(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(deflated, explicit VR, little endian) of a transfer syntax. Private or unknown
    syntaxes are explicit VR little endian, the only encoding a new transfer syntax may
    use (PS3.5 10)."""
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax:
        return False, True, True
    return bool(uid.is_deflated), uid.is_implicit_VR is False, bool(uid.is_little_endian)


# JPIP Referenced (PS3.5 A.4.7-8): the pixels are fetched from a provider; Pixel Data, if a
# sender puts one in, is not the syntax's concern.
_JPIP = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95"})


@functools.lru_cache(maxsize=64)
def _encapsulated(transfer_syntax: str) -> bool | None:
    """Whether ``transfer_syntax`` carries Pixel Data encapsulated (PS3.5 A.4); None when
    the syntax does not say (unknown, private, JPIP)."""
    uid = UID(transfer_syntax)
    if transfer_syntax in _JPIP or not uid.is_transfer_syntax:
        return None
    return bool(uid.is_encapsulated)


def _check_pixel_encoding(encapsulated: bool, transfer_syntax: str) -> None:
    """Refuse top-level Pixel Data encoded against its transfer syntax (PS3.5 A.4: under an
    encapsulated syntax it is a sequence of fragments of undefined length; under a native
    one, a defined-length value). Such a file is complete, but every reader decodes its
    pixels wrongly: compressed bytes drawn as native ones, or native ones fed to a codec."""
    expected = _encapsulated(transfer_syntax)
    if expected is None or expected == encapsulated:
        return
    if expected:
        raise InvalidInstance(
            f"Pixel Data is native, but transfer syntax {transfer_syntax} requires it "
            "encapsulated (PS3.5 A.4)"
        )
    raise InvalidInstance(
        f"Pixel Data is encapsulated, but transfer syntax {transfer_syntax} is native (PS3.5 A.4)"
    )


class _Walker:
    def __init__(self, buf: mmap.mmap | bytes, end: int, little: bool) -> None:
        self.buf = buf
        self.end = end
        self.prefix = "<" if little else ">"
        self.u32 = struct.Struct(self.prefix + "I")
        self.hhi = struct.Struct(self.prefix + "HHI")
        # group, element, VR, 16-bit length: an explicit VR element header in one unpack
        self.explicit_head = struct.Struct(self.prefix + "HH2sH")
        self.little = little
        # The top-level Pixel Data: None (absent), True (encapsulated), False (native).
        self.pixels_encapsulated: bool | None = None

    def _need(self, pos: int, n: int, what: str) -> None:
        if pos + n > self.end:
            raise InvalidInstance(f"data set truncated inside {what}")

    def dataset(
        self,
        pos: int,
        explicit: bool,
        depth: int,
        in_item: bool,
        keep: dict[BaseTag, DataElement | RawDataElement] | None,
    ) -> int:
        """Walk elements from ``pos``; return the position after the data set (or item end).

        The loop runs once per element of every received instance, so the common case
        (a defined length) is written out inline, with the struct methods held locally."""
        if depth > MAX_SEQUENCE_DEPTH:
            raise InvalidInstance("sequences nested too deep")
        buf, end, little, implicit = self.buf, self.end, self.little, not explicit
        explicit_head = self.explicit_head.unpack_from
        implicit_head = self.hhi.unpack_from
        u32 = self.u32.unpack_from
        while True:
            if pos >= end:
                if in_item:
                    raise InvalidInstance("data set truncated inside an undefined-length item")
                return pos
            if pos + 8 > end:
                raise InvalidInstance("data set truncated inside an element header")
            if explicit:
                group, element, vr, length = explicit_head(buf, pos)
                if group == 0xFFFE:
                    if element == _ITEM_END and in_item:
                        return pos + 8
                    raise InvalidInstance(f"unexpected delimiter {_tag(group, element)}")
                if vr in LONG_VRS:
                    if pos + 12 > end:
                        raise InvalidInstance("data set truncated inside an element header")
                    (length,) = u32(buf, pos + 8)
                    value_pos = pos + 12
                else:
                    value_pos = pos + 8
                vr_name = _VR_NAMES.get(vr) or _new_vr_name(vr)
                if vr_name is None:
                    raise InvalidInstance(f"element {_tag(group, element)} has no valid VR")
            else:
                group, element, length = implicit_head(buf, pos)
                if group == 0xFFFE:
                    if element == _ITEM_END and in_item:
                        return pos + 8
                    raise InvalidInstance(f"unexpected delimiter {_tag(group, element)}")
                vr = b""
                vr_name = None
                value_pos = pos + 8
            if length != _UNDEFINED:
                next_pos = value_pos + length
                if next_pos > end:
                    raise InvalidInstance(
                        f"element {_tag(group, element)} has length {length}, "
                        "past the end of the data set"
                    )
                if group == 0x7FE0 and element == 0x0010 and keep is not None:
                    self.pixels_encapsulated = False
                if keep is not None and (
                    length <= KEEP_VALUE_MAX
                    or (vr == b"SQ" and length <= KEEP_SEQUENCE_MAX)
                    or (length <= KEEP_TEXT_MAX and vr in _TEXT_VR_BYTES)
                ):
                    tag = BaseTag(group << 16 | element)
                    keep[tag] = RawDataElement(
                        tag, vr_name, length, buf[value_pos:next_pos], value_pos, implicit, little
                    )
                pos = next_pos
                continue
            if (group, element) == (0x7FE0, 0x0010) and vr != b"SQ":
                # Encapsulated Pixel Data (also under implicit VR, as some senders write it).
                pos = self.fragments(value_pos)
                if keep is not None:
                    self.pixels_encapsulated = True
            elif vr == b"UN" or (explicit and vr == b"SQ") or not explicit:
                # PS3.5 6.2.2: UN of undefined length holds Implicit VR Little Endian items.
                inner = explicit and vr == b"SQ"
                pos = self.sequence(value_pos, inner, depth + 1, _tag(group, element))
                size = pos - 8 - value_pos  # without the sequence delimiter
                if keep is not None and size <= KEEP_SEQUENCE_MAX and vr != b"UN":
                    tag = BaseTag(group << 16 | element)
                    keep[tag] = RawDataElement(
                        tag,
                        "SQ",
                        size,
                        buf[value_pos : value_pos + size],
                        value_pos,
                        not inner,
                        little,
                    )
            else:
                raise InvalidInstance(
                    f"element {_tag(group, element)} ({vr.decode('ascii', 'replace')}) "
                    "has undefined length"
                )

    def sequence(self, pos: int, explicit: bool, depth: int, tag: str) -> int:
        while True:
            self._need(pos, 8, f"sequence {tag}")
            group, element, length = self.hhi.unpack_from(self.buf, pos)
            pos += 8
            if group != 0xFFFE:
                raise InvalidInstance(f"sequence {tag} holds a non-item element")
            if element == _SEQ_END:
                return pos
            if element != _ITEM:
                raise InvalidInstance(f"sequence {tag} holds an unexpected delimiter")
            if length == _UNDEFINED:
                pos = self.dataset(pos, explicit, depth, in_item=True, keep=None)
            else:
                if pos + length > self.end:
                    raise InvalidInstance(f"an item of {tag} runs past the end of the data set")
                pos += length

    def fragments(self, pos: int) -> int:
        """Encapsulated Pixel Data (PS3.5 A.4): defined-length items, then a delimiter."""
        while True:
            self._need(pos, 8, "encapsulated pixel data")
            group, element, length = self.hhi.unpack_from(self.buf, pos)
            pos += 8
            if (group, element) == (0xFFFE, _SEQ_END):
                return pos
            if (group, element) != (0xFFFE, _ITEM) or length == _UNDEFINED:
                raise InvalidInstance("bad fragment item in encapsulated Pixel Data")
            if pos + length > self.end:
                raise InvalidInstance("a Pixel Data fragment runs past the end of the data set")
            pos += length


def scan_dataset(
    fh: BinaryIO,
    start: int,
    end: int,
    transfer_syntax: str,
    room: Callable[[], None] | None = None,
) -> Dataset:
    """Check the data set in ``fh[start:end]`` is complete; return its small top-level elements.

    Raises :class:`InvalidInstance` when the encoding is truncated or broken. A file up to
    ``_READ_WHOLE_MAX`` is read at once (cheaper than mapping it); a larger one is mapped,
    so only the pages holding element headers are touched. A deflated data set is inflated
    first (:func:`_scan_deflated`; ``room`` is called as it grows, to refuse one that
    would fill the disk).
    """
    if _encoding(transfer_syntax)[0]:
        return _scan_deflated(fh, start, end, room)
    if end <= start:
        raise InvalidInstance("empty data set")
    if end <= _READ_WHOLE_MAX:
        buf = os.pread(fh.fileno(), end, 0)
        if len(buf) < end:
            raise InvalidInstance("data set truncated: the file is shorter than received")
        return _scan(buf, start, end, transfer_syntax)
    with mmap.mmap(fh.fileno(), end, access=mmap.ACCESS_READ) as mapped:
        return _scan(mapped, start, end, transfer_syntax)


def _scan_deflated(fh: BinaryIO, start: int, end: int, room: Callable[[], None] | None) -> Dataset:
    """Inflate a Deflated Explicit VR Little Endian data set (PS3.5 A.5: raw deflate, no
    zlib header) and scan the result like any other: pydicom inflates without complaint a
    stream that ends early, or one that holds half a data set, and would have had half an
    image acknowledged. Up to ``_INFLATE_IN_MEMORY`` bytes are inflated in memory, more
    into a temporary file beside ``fh`` (``room`` checks the disk every block)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    memory = bytearray()
    spill: BinaryIO | None = None
    try:
        fh.seek(start)
        left = end - start
        while left > 0 and not inflater.eof:
            data = fh.read(min(left, _INFLATE_BLOCK))
            if not data:
                raise InvalidInstance("data set truncated: the file is shorter than received")
            left -= len(data)
            while data and not inflater.eof:
                try:
                    piece = inflater.decompress(data, _INFLATE_BLOCK)
                except zlib.error:
                    raise InvalidInstance("the deflated data set does not inflate") from None
                data = inflater.unconsumed_tail
                if spill is None and len(memory) + len(piece) > _INFLATE_IN_MEMORY:
                    folder = os.path.dirname(getattr(fh, "name", "") or "") or None
                    spill = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (closed below)
                    spill.write(memory)
                    memory = bytearray()
                if spill is not None:
                    spill.write(piece)
                    if room is not None:
                        room()
                else:
                    memory += piece
        if not inflater.eof:
            raise InvalidInstance("deflated data set truncated: its deflate stream does not end")
        # Bytes after the stream's end (a pad byte to an even length, PS3.5 A.5) are left.
        if spill is None:
            if not memory:
                raise InvalidInstance("empty data set")
            return _scan(bytes(memory), 0, len(memory), EXPLICIT_LE)
        spill.flush()
        size = spill.tell()
        with mmap.mmap(spill.fileno(), size, access=mmap.ACCESS_READ) as mapped:
            return _scan(mapped, 0, size, EXPLICIT_LE)
    finally:
        if spill is not None:
            spill.close()


def scan_buffer(buf: bytes, start: int, transfer_syntax: str) -> Dataset | None:
    """:func:`scan_dataset` of a whole file already in memory (``buf[start:]`` is the
    data set): no file to open and read again. ``None`` for a deflated data set: the
    caller scans its file (:func:`scan_dataset` inflates it)."""
    if _encoding(transfer_syntax)[0]:
        return None
    if len(buf) <= start:
        raise InvalidInstance("empty data set")
    return _scan(buf, start, len(buf), transfer_syntax)


def _scan(buf: mmap.mmap | bytes, start: int, end: int, transfer_syntax: str) -> Dataset:
    _, explicit, little = _encoding(transfer_syntax)
    if explicit and end - start >= 6 and implicit_under_explicit(buf[start : start + 6]):
        # Some senders encode Implicit VR under an explicit syntax; detect it from the
        # first element's VR bytes like pydicom does, rather than refuse it. Under Explicit
        # VR Little Endian the ingresses have relabelled the file already.
        explicit = False
    keep: dict[BaseTag, DataElement | RawDataElement] = {}
    walker = _Walker(buf, end, little)
    walker.dataset(start, explicit, 0, in_item=False, keep=keep)
    if walker.pixels_encapsulated is not None:
        _check_pixel_encoding(walker.pixels_encapsulated, transfer_syntax)
    ds = Dataset(keep)  # a dict argument is adopted as is: no per-element __setitem__
    ds.set_original_encoding(not explicit, little)
    return ds
