"""Transcoding for WADO-RS: the one place that changes an instance's transfer syntax.

Today it can only produce Explicit VR Little Endian: from the other uncompressed syntaxes
(implicit, deflated, big endian) by re-encoding, from compressed ones with pydicom (and the
pylibjpeg, pyjpegls and RLE plug-ins) decoding the pixel data. The processing pipeline (issue #6)
will replace :func:`can_transcode` and :func:`transcode` with its own transcoder; callers
only use these two functions.

Transcoding decodes the whole instance in memory: it is the exception to DESIGN rule 2
(an instance sent as stored streams from disk). The decoded size is bounded by
``MAX_TRANSCODE_BYTES``; a bigger instance is refused rather than risk the process.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "MAX_TRANSCODE_BYTES",
    "TranscodeError",
    "can_transcode",
    "transcode",
]

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
MAX_TRANSCODE_BYTES = 1 << 30  # decoded pixel data of one instance


class TranscodeError(Exception):
    """The instance could not be transcoded (corrupt or unsupported pixel data)."""


def can_transcode(source: str, target: str) -> bool:
    """True when :func:`transcode` can turn ``source`` into ``target``."""
    if target != EXPLICIT_VR_LITTLE_ENDIAN:
        return False
    if source in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, DEFLATED, BIG_ENDIAN):
        return True
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(source).is_available)
    except NotImplementedError:
        return False


_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _to_little_endian(ds: Any) -> None:
    """Big endian data set -> values ready to be written little endian: numbers and text
    are converted by pydicom; the bytes of OW/OF/OL/OD/OV values (Pixel Data included)
    are swapped here (pydicom keeps them as read)."""
    import numpy as np

    bits = int(ds.get("BitsAllocated", 8) or 8)
    for elem in ds.iterall():  # converts every raw element
        width = _SWAP_WIDTH.get(str(elem.VR), 0)
        if elem.tag == 0x7FE00010 and bits >= 16:
            width = bits // 8  # PS3.5 8.2: multi-byte pixels are swapped per pixel
        if width and isinstance(elem.value, bytes) and len(elem.value) % width == 0:
            elem.value = np.frombuffer(elem.value, f">u{width}").astype(f"<u{width}").tobytes()


def transcode(path: Path, target: str) -> bytes:
    """The Part 10 file at ``path`` re-encoded in ``target`` (see :func:`can_transcode`)."""
    import pydicom
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import UID

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
            source = UID(ds.file_meta.TransferSyntaxUID)
            if source.is_compressed and "PixelData" in ds:
                rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
                frames = int(ds.get("NumberOfFrames", 1) or 1)
                size = rows * cols * frames * int(ds.get("SamplesPerPixel", 1))
                size *= max(1, int(ds.get("BitsAllocated", 8)) // 8)
                if size > MAX_TRANSCODE_BYTES:
                    raise TranscodeError("instance too large to transcode")
                ds.decompress()
            out = io.BytesIO()
            if source == BIG_ENDIAN:
                _to_little_endian(ds)
                ds.file_meta.TransferSyntaxUID = UID(target)
                # save_as refuses to change byte order; dcmwrite re-encodes what we converted.
                dcmwrite(out, ds, implicit_vr=False, little_endian=True, force_encoding=True)
            else:
                ds.file_meta.TransferSyntaxUID = UID(target)
                ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
        except TranscodeError:
            raise
        except Exception as exc:  # pydicom and the codecs raise anything on bad data
            raise TranscodeError(f"{type(exc).__name__}: {exc}") from exc
    return out.getvalue()
