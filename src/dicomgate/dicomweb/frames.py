"""Find frames in a stored Part 10 file without reading the pixel data (DESIGN rule 2).

:func:`locate_pixel_data` reads the header up to Pixel Data (7FE0,0010) with pydicom and
the Pixel Data element header itself. Then:

- native frames are found by offset arithmetic (PS3.5 8.1.1, 8.2): frame ``i`` of
  ``rows x columns x samples x bits allocated`` bits starts at ``i`` times that size
  (YBR_FULL_422 holds 2 samples per pixel, not 3: PS3.3 C.7.6.3.1.2);
- a deflated data set (PS3.5 A.5) has no usable file offsets: it is inflated whole with
  pydicom (:func:`inflated_pixel_data`) and its frames cut from the Pixel Data value;
- encapsulated frames (PS3.5 A.4) come from the Extended Offset Table (7FE0,0001/0002)
  when present, else the Basic Offset Table, else by walking the fragment item headers
  (8 bytes each, values skipped): one fragment per frame when the counts match, else a
  new frame at each fragment that starts with a codestream marker (JPEG SOI, JPEG 2000
  SOC, JP2 signature box).

Only the bytes of the requested frames are read, in chunks of ``CHUNK_SIZE``.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dicomgate.errors import os_error_reason

__all__ = [
    "CHUNK_SIZE",
    "FrameError",
    "PixelLayout",
    "all_fragments",
    "decode_frame",
    "encapsulated_frames",
    "inflated_pixel_data",
    "locate_pixel_data",
    "native_frame",
    "native_frame_chunks",
    "pydicom_muted",
    "read_span_chunks",
]

CHUNK_SIZE = 1 << 20
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_FRAME_STARTS = (b"\xff\xd8\xff", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")

Span = tuple[int, int]  # (file offset, length)


class FrameError(Exception):
    """The pixel data cannot be cut into frames as the header describes."""


@dataclass(frozen=True)
class PixelLayout:
    """Where the Pixel Data of a stored instance lives and how it is laid out."""

    transfer_syntax: str
    rows: int
    columns: int
    samples: int  # Samples per Pixel
    bits_allocated: int
    frames: int  # Number of Frames (1 when absent)
    photometric: str
    little_endian: bool
    deflated: bool  # value offsets are meaningless (the data set is deflated)
    value_offset: int  # file offset of the Pixel Data value (first item for encapsulated)
    value_length: int  # bytes; -1 for encapsulated (undefined length)
    extended_offsets: tuple[int, ...] = ()  # Extended Offset Table, if any
    extended_lengths: tuple[int, ...] = ()

    @property
    def needs_decoder(self) -> bool:
        """Frames cannot be read at file offsets, pydicom must read them: deflated data
        sets (inflated by ``dcmread``, then cut: :func:`native_frame`), and big endian
        8-bit pixels (swapped in 16-bit word pairs, PS3.5 8.2: decoded)."""
        return self.deflated or (not self.little_endian and self.bits_allocated <= 8)

    @property
    def encapsulated(self) -> bool:
        return self.value_length < 0

    @property
    def frame_bits(self) -> int:
        """Bits of one native frame as stored.

        YBR_FULL_422 subsamples Cb and Cr horizontally: each pair of pixels is stored as
        Y Y Cb Cr, two samples per pixel instead of three (PS3.3 C.7.6.3.1.2, PS3.5 8.2.3).
        """
        samples = self.samples
        if self.photometric.strip().upper() == "YBR_FULL_422" and samples == 3:
            samples = 2
        return self.rows * self.columns * samples * self.bits_allocated

    @property
    def decoded_frame_bytes(self) -> int:
        """Bytes of one frame once decoded (what pydicom's arrays hold, colour as 3 samples)."""
        return self.rows * self.columns * self.samples * max(1, (self.bits_allocated + 7) // 8)


def _ints(value: object, fmt: str) -> tuple[int, ...]:
    if not isinstance(value, bytes | bytearray) or len(value) % 8:
        return ()
    return struct.unpack(f"<{len(value) // 8}{fmt}", value)


def locate_pixel_data(path: Path) -> PixelLayout | None:
    """The Pixel Data layout of the file at ``path``; ``None`` when it has no Pixel Data."""
    import pydicom
    from pydicom.uid import UID

    with open(path, "rb") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        position = fh.tell()
        meta = getattr(ds, "file_meta", None)
        syntax = UID(str(meta.TransferSyntaxUID)) if meta and "TransferSyntaxUID" in meta else None
        if syntax is None or "Rows" not in ds:
            return None
        deflated = syntax == "1.2.840.10008.1.2.1.99"
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
        header = b"" if deflated else fh.read(12)
    common = {
        "transfer_syntax": str(syntax),
        "rows": int(ds.Rows),
        "columns": int(ds.get("Columns", 0)),
        "samples": int(ds.get("SamplesPerPixel", 1) or 1),
        "bits_allocated": int(ds.get("BitsAllocated", 8) or 8),
        "frames": max(1, int(ds.get("NumberOfFrames", 1) or 1)),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "little_endian": bool(little),
        "extended_offsets": _ints(ds.get("ExtendedOffsetTable"), "Q"),
        "extended_lengths": _ints(ds.get("ExtendedOffsetTableLengths"), "Q"),
    }
    if deflated:
        return PixelLayout(deflated=True, value_offset=0, value_length=0, **common)  # type: ignore[arg-type]
    if len(header) < 8:
        return None
    prefix = "<" if little else ">"
    group, element = struct.unpack_from(prefix + "HH", header)
    if (group, element) != (0x7FE0, 0x0010):
        return None
    if not implicit and header[4:6] in _LONG_VRS:
        if len(header) < 12:
            return None
        (length,) = struct.unpack_from(prefix + "I", header, 8)
        value_offset = position + 12
    elif not implicit and header[4:6].isalpha():
        (length,) = struct.unpack_from(prefix + "H", header, 6)
        value_offset = position + 8
    else:
        (length,) = struct.unpack_from(prefix + "I", header, 4)
        value_offset = position + 8
    return PixelLayout(
        deflated=False,
        value_offset=value_offset,
        value_length=-1 if length == _UNDEFINED else length,
        **common,  # type: ignore[arg-type]
    )


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise FrameError("pixel data ends before the header says")
    return data


def read_span_chunks(fh: BinaryIO, spans: list[Span], chunk: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The bytes of ``spans`` of an open file, in chunks of at most ``chunk``."""
    fd = fh.fileno()
    for offset, length in spans:
        done = 0
        while done < length:
            n = min(chunk, length - done)
            yield _pread(fd, n, offset + done)
            done += n


def _bit_packed_frame(raw: bytes, skip: int, bits: int) -> bytes:
    """``bits`` bits of ``raw`` from bit ``skip`` on, re-packed from bit 0 (1-bit frames
    need not start on a byte boundary, PS3.5 8.1.1)."""
    import numpy as np

    unpacked = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
    return np.packbits(unpacked[skip : skip + bits], bitorder="little").tobytes()


def native_frame_chunks(fh: BinaryIO, layout: PixelLayout, index: int) -> Iterator[bytes]:
    """Native frame ``index`` (0-based) in little endian, in chunks."""
    bits = layout.frame_bits
    if bits % 8:
        first, last = index * bits, (index + 1) * bits
        start = first // 8
        raw = _pread(fh.fileno(), (last + 7) // 8 - start, layout.value_offset + start)
        yield _bit_packed_frame(raw, first - start * 8, bits)
        return
    size = bits // 8
    if layout.value_length < (index + 1) * size:
        raise FrameError(f"pixel data holds fewer than {index + 1} frames")
    spans = [(layout.value_offset + index * size, size)]
    swap = 0 if layout.little_endian else layout.bits_allocated // 8
    if swap < 2:
        yield from read_span_chunks(fh, spans)
        return
    import numpy as np

    dtype = np.dtype(f">u{swap}")
    for data in read_span_chunks(fh, spans, CHUNK_SIZE - CHUNK_SIZE % 8):
        yield np.frombuffer(data, dtype).astype(dtype.newbyteorder("<")).tobytes()


def native_frame(value: bytes, layout: PixelLayout, index: int) -> bytes:
    """Native frame ``index`` (0-based) cut from a little endian Pixel Data ``value`` held
    in memory (the inflated value of a deflated data set)."""
    bits = layout.frame_bits
    first, last = index * bits, (index + 1) * bits
    if len(value) * 8 < last:
        raise FrameError(f"pixel data holds fewer than {index + 1} frames")
    if bits % 8:
        start = first // 8
        return _bit_packed_frame(value[start : (last + 7) // 8], first - start * 8, bits)
    return value[first // 8 : last // 8]


def inflated_pixel_data(path: Path) -> bytes:
    """The Pixel Data value of the deflated data set at ``path`` (PS3.5 A.5), inflated.

    pydicom's ``pixel_array(path)`` reads the file without inflating it (and finds no
    Pixel Data); ``dcmread`` inflates the whole data set in memory.
    """
    import pydicom

    with warnings.catch_warnings(), pydicom_muted():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
            value = ds.get("PixelData")
        except OSError:
            raise
        except Exception as exc:  # zlib.error, or pydicom's own on a corrupt data set
            raise FrameError(
                f"the deflated data set cannot be read ({type(exc).__name__})"
            ) from exc
    if not isinstance(value, bytes | bytearray):
        raise FrameError("the deflated data set holds no Pixel Data")
    return bytes(value)


def _fragments(fh: BinaryIO, layout: PixelLayout) -> tuple[list[int], list[Span], int]:
    """(Basic Offset Table, fragments as (value offset, length), offset of the first
    fragment's item tag)."""
    fd = fh.fileno()
    prefix = "<" if layout.little_endian else ">"
    item = struct.Struct(prefix + "HHI")
    pos = layout.value_offset
    group, element, length = item.unpack(_pread(fd, 8, pos))
    if (group, element) != (0xFFFE, 0xE000) or length == _UNDEFINED:
        raise FrameError("encapsulated pixel data does not start with an offset table item")
    bot_raw = _pread(fd, length, pos + 8) if length else b""
    offsets = list(struct.unpack(f"{prefix}{length // 4}I", bot_raw[: length - length % 4]))
    pos += 8 + length
    first = pos
    fragments: list[Span] = []
    size = os.fstat(fd).st_size
    while True:
        if pos + 8 > size:
            raise FrameError("encapsulated pixel data ends without a sequence delimiter")
        group, element, length = item.unpack(_pread(fd, 8, pos))
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000) or length == _UNDEFINED:
            raise FrameError("bad fragment item in encapsulated pixel data")
        if pos + 8 + length > size:
            raise FrameError("a pixel data fragment runs past the end of the file")
        fragments.append((pos + 8, length))
        pos += 8 + length
    return offsets, fragments, first


def all_fragments(fh: BinaryIO, layout: PixelLayout) -> list[Span]:
    """Every fragment of encapsulated pixel data (a video stream is sent whole)."""
    return _fragments(fh, layout)[1]


def encapsulated_frames(fh: BinaryIO, layout: PixelLayout) -> list[list[Span]]:
    """The fragments (file spans) of every frame of encapsulated pixel data."""
    frames = layout.frames
    if layout.extended_offsets and len(layout.extended_offsets) == frames:
        fd = fh.fileno()
        _, _, first = _fragments_head(fh, layout)
        spans: list[list[Span]] = []
        for offset, length in zip(
            layout.extended_offsets, layout.extended_lengths or (0,) * frames, strict=False
        ):
            header = _pread(fd, 8, first + offset)
            (item_length,) = struct.unpack_from("<I", header, 4)
            spans.append([(first + offset + 8, length or item_length)])
        return spans
    offsets, fragments, first = _fragments(fh, layout)
    if not fragments:
        raise FrameError("encapsulated pixel data holds no fragments")
    if frames == 1:
        return [fragments]
    if len(offsets) == frames:
        starts = [first + o for o in offsets]
        grouped: list[list[Span]] = [[] for _ in range(frames)]
        frame = -1
        for value_pos, length in fragments:
            while frame + 1 < frames and value_pos - 8 >= starts[frame + 1]:
                frame += 1
            if frame < 0:
                raise FrameError("basic offset table does not match the fragments")
            grouped[frame].append((value_pos, length))
        if all(grouped):
            return grouped
    if len(fragments) == frames:
        return [[span] for span in fragments]
    grouped = []
    fd = fh.fileno()
    for value_pos, length in fragments:
        head = _pread(fd, min(length, 12), value_pos)
        if not grouped or any(head.startswith(marker) for marker in _FRAME_STARTS):
            grouped.append([])
        grouped[-1].append((value_pos, length))
    if len(grouped) != frames:
        raise FrameError(
            f"cannot tell {frames} frames apart in {len(fragments)} fragments without an "
            "offset table"
        )
    return grouped


def _fragments_head(fh: BinaryIO, layout: PixelLayout) -> tuple[list[int], list[Span], int]:
    """The offset table and the position of the first fragment, without walking fragments."""
    fd = fh.fileno()
    prefix = "<" if layout.little_endian else ">"
    group, element, length = struct.unpack(prefix + "HHI", _pread(fd, 8, layout.value_offset))
    if (group, element) != (0xFFFE, 0xE000) or length == _UNDEFINED:
        raise FrameError("encapsulated pixel data does not start with an offset table item")
    return [], [], layout.value_offset + 8 + length


class _ThreadMute(logging.Filter):
    """Drops the log records of the threads inside :func:`pydicom_muted`."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in self.threads


# pydicom logs each failing decoder plugin's traceback at ERROR before raising: the error
# we raise in its place is the one log line (and answer) a frame that cannot be decoded
# deserves.
_PYDICOM_LOGGERS = ("pydicom", "pydicom.pixels.decoders.base")


@contextmanager
def pydicom_muted() -> Iterator[None]:
    """Silence pydicom's loggers for the calling thread only (others keep logging)."""
    ident = threading.get_ident()
    mutes = []
    for name in _PYDICOM_LOGGERS:
        logger = logging.getLogger(name)
        mute = next((f for f in logger.filters if isinstance(f, _ThreadMute)), None)
        if mute is None:
            mute = _ThreadMute()
            logger.addFilter(mute)
        mute.threads.add(ident)
        mutes.append(mute)
    try:
        yield
    finally:
        for mute in mutes:
            mute.threads.discard(ident)


def decode_frame(path: Path, index: int) -> bytes:
    """Frame ``index`` (0-based) decoded by pydicom to native little endian (colour as RGB).

    Used to answer ``application/octet-stream`` for compressed pixel data (and big endian
    8-bit native pixels); only that frame is decoded. ``FrameError`` when it cannot be;
    its message never holds the file's path (made of the UIDs).
    """
    import numpy as np
    from pydicom.pixels.utils import pixel_array

    with warnings.catch_warnings(), pydicom_muted():
        warnings.simplefilter("ignore")
        try:
            array = pixel_array(path, index=index)
        except OSError as exc:
            raise FrameError(f"cannot read the stored instance: {os_error_reason(exc)}") from exc
        except Exception as exc:  # the codecs raise anything on bad data
            # pydicom lists each plugin's failure on a line of its own: one line here.
            reason = " ".join(str(exc).replace(str(path), "<stored file>").split())[:500]
            reason = reason or type(exc).__name__
            raise FrameError(f"cannot decode frame {index + 1}: {reason}") from exc
    array = np.ascontiguousarray(array)
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
