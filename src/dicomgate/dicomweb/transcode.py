"""Transcoding for WADO-RS: the one place that changes an instance's transfer syntax.

It delegates to the processing pipeline's transcoder (:mod:`dicomgate.processing.transcode`):
any syntax pydicom can decode can be sent in any syntax that transcoder produces
(uncompressed, deflated, RLE, JPEG, JPEG-LS, JPEG 2000, HTJ2K). A lossy rendition asked for
by a client keeps the instance's SOP Instance UID (it is the same instance in transit, not
a new derived one stored anywhere) and is marked LossyImageCompression.

Transcoding decodes the whole instance in memory: it is the exception to DESIGN rule 2
(an instance sent as stored streams from disk). The decoded size is bounded by
``MAX_TRANSCODE_BYTES``; a bigger instance is refused rather than risk the process.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

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

    def __init__(self, message: str, *, unacceptable: bool = False) -> None:
        super().__init__(message)
        # True: the target cannot hold this image (e.g. 16-bit signed in JPEG baseline):
        # the client asked for something we cannot give (406), not a server failure.
        self.unacceptable = unacceptable


def can_transcode(source: str, target: str) -> bool:
    """True when :func:`transcode` can turn ``source`` into ``target``."""
    from dicomgate.processing.transcode import can_produce

    if not can_produce(target):
        return False
    if source in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, DEFLATED, BIG_ENDIAN):
        return True
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(source).is_available)
    except NotImplementedError:
        return False


def transcode(path: Path, target: str) -> bytes:
    """The Part 10 file at ``path`` re-encoded in ``target`` (see :func:`can_transcode`)."""
    import pydicom

    from dicomgate.processing.base import ProcessingError
    from dicomgate.processing.pipeline import write_part10
    from dicomgate.processing.transcode import transcode_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" in ds:
                rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
                frames = int(ds.get("NumberOfFrames", 1) or 1)
                size = rows * cols * frames * int(ds.get("SamplesPerPixel", 1))
                size *= max(1, int(ds.get("BitsAllocated", 8)) // 8)
                if size > MAX_TRANSCODE_BYTES:
                    raise TranscodeError("instance too large to transcode")
            transcode_dataset(ds, target, new_uid_for_lossy=False)
            out = io.BytesIO()
            write_part10(ds, out)
        except TranscodeError:
            raise
        except ProcessingError as exc:
            raise TranscodeError(str(exc), unacceptable=exc.reason == "cannot_transcode") from exc
        except Exception as exc:  # pydicom and the codecs raise anything on bad data
            raise TranscodeError(f"{type(exc).__name__}: {exc}") from exc
    return out.getvalue()
