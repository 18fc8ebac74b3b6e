"""The ``transcode`` step: re-encode an instance's pixel data in another transfer syntax.

Decoding uses pydicom 3's pixel data framework and its plug-ins (pylibjpeg, pylibjpeg-libjpeg,
pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls), so any source pydicom can decode is accepted.
Encoding uses pydicom's encoders where they exist (RLE, JPEG-LS, JPEG 2000) and imagecodecs
where they do not (JPEG baseline / extended / lossless SV1 with libjpeg-turbo, HTJ2K with
OpenJPH). Frames are decoded and encoded one at a time.

Rules (PS3.5 section 8 and PS3.3 C.7.6.1.1.5):

* Lossless targets keep every stored pixel value. The photometric interpretation is kept,
  except that YCbCr from lossy JPEG (``YBR_FULL_422``, ``YBR_FULL``) and the sub-sampled
  ``YBR_*_422/420`` are converted to ``RGB`` (what DCMTK and GDCM do when decompressing), and
  RGB becomes ``YBR_RCT`` in JPEG 2000 / HTJ2K (the reversible colour transform).
* Lossy targets set Lossy Image Compression ``01`` and append the ratio and method; the
  output is a new image (Image Type ``DERIVED``, a new SOP Instance UID derived from the old
  one and the settings, so a retried delivery carries the same UID, and a Source Image
  Sequence item pointing to the original).
* What a target cannot hold (bit depths, signed data, colour models outside PS3.5's tables)
  is refused with :class:`ProcessingError` ``cannot_transcode``; nothing is sent broken.
* Instances without Pixel Data (SR, RT plans, ...) or with float Pixel Data are only
  re-encoded when the target is uncompressed; otherwise they are passed on unchanged.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator, model_validator
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import VR

from dicomgate.models import ConfigModel
from dicomgate.processing.base import ProcessingError, Step, StepContext

__all__ = [
    "TARGETS",
    "Transcode",
    "TranscodeOptions",
    "can_produce",
    "choose_transfer_syntax",
    "resolve_transfer_syntax",
    "transcode_dataset",
]

REASON = "cannot_transcode"

# Namespace of the derived SOP Instance UIDs of lossy outputs (uuid5, PS3.5 B.2 "2.25.").
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicomgate:transcode")


@dataclass(frozen=True)
class _Target:
    uid: UID
    backend: str  # "native", "pydicom" or "imagecodecs"
    method: str = ""  # Lossy Image Compression Method (PS3.3 C.7.6.1.1.5.1) if lossy

    @property
    def lossy(self) -> bool:
        return bool(self.method)


#: What :func:`transcode_dataset` can produce (when its codec is installed).
TARGETS: dict[UID, _Target] = {
    t.uid: t
    for t in (
        _Target(ImplicitVRLittleEndian, "native"),
        _Target(ExplicitVRLittleEndian, "native"),
        _Target(DeflatedExplicitVRLittleEndian, "native"),
        _Target(RLELossless, "pydicom"),
        _Target(JPEGBaseline8Bit, "imagecodecs", "ISO_10918_1"),
        _Target(JPEGExtended12Bit, "imagecodecs", "ISO_10918_1"),
        _Target(JPEGLosslessSV1, "imagecodecs"),
        _Target(JPEGLSLossless, "pydicom"),
        _Target(JPEGLSNearLossless, "pydicom", "ISO_14495_1"),
        _Target(JPEG2000Lossless, "pydicom"),
        _Target(JPEG2000, "pydicom", "ISO_15444_1"),
        _Target(HTJ2KLossless, "imagecodecs"),
    )
}

_LOSSY_JPEG_SOURCES = {JPEGBaseline8Bit, JPEGExtended12Bit}
# Syntaxes that may be lossy or not: the codestream says (JPEG-LS NEAR > 0; JPEG 2000's
# irreversible 9-7 wavelet). Their Lossy Image Compression Method (PS3.3 C.7.6.1.1.5.1).
_MAYBE_LOSSY = {
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    UID("1.2.840.10008.1.2.4.203"): "ISO_15444_15",  # HTJ2K (lossy or lossless)
}


def _lossy_source_method(ds: Dataset, source: UID) -> str | None:
    """The compression method when the received pixels are lossy, else None: JPEG
    baseline/extended always; JPEG-LS near-lossless with NEAR > 0 and JPEG 2000 / HTJ2K
    with the irreversible wavelet, read from the first frame's codestream (a stream that
    cannot be read counts as lossy: the syntax allows it, and claiming a loss that is not
    there is the safer mistake)."""
    if source in _LOSSY_JPEG_SOURCES:
        return "ISO_10918_1"
    method = _MAYBE_LOSSY.get(source)
    if method is None:
        return None
    try:
        from pydicom.encaps import generate_frames

        frames = int(ds.get("NumberOfFrames", 1) or 1)
        first = next(generate_frames(ds.PixelData, number_of_frames=frames))
        if source == JPEGLSNearLossless:
            sos = first.index(b"\xff\xda")  # Start of Scan: Ls, Ns, Ns x (Ci, Tm), NEAR
            return method if first[sos + 5 + 2 * first[sos + 4]] else None
        cod = first.index(b"\xff\x52")  # COD: L(2) Scod SGcod(4) levels, xcb, ycb, style
        return method if first[cod + 13] == 0 else None  # 0: 9-7 irreversible (ISO 15444-1 A.6.1)
    except (ValueError, IndexError, StopIteration):
        return method


_SUBSAMPLED = {"YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420"}

# PS3.5 Tables 8.2.1-1, 8.2.1-2, 8.2.3-1, 8.2.4-1, 8.2.2-1 (HTJ2K, 8.2.14, follows 8.2.4):
# photometric interpretation after encoding -> (samples, pixel representations,
# bits allocated, bits stored).
_Profile = tuple[int, tuple[int, ...], tuple[int, ...], range]
_MONO = ("MONOCHROME1", "MONOCHROME2")
# The standard allows up to 38 bits for JPEG 2000; the openjpeg encoder takes up to 24, and
# OpenJPH's HTJ2K above 16 bits is not readable by the openjpeg decoder: we stop there.
_J2K_BITS: _Profile = (1, (0, 1), (8, 16, 24, 32), range(1, 25))
_J2K_COLOR: _Profile = (3, (0,), (8, 16, 24, 32), range(1, 25))
_HTJ2K_BITS: _Profile = (1, (0, 1), (8, 16), range(1, 17))
_HTJ2K_COLOR: _Profile = (3, (0,), (8, 16), range(1, 17))


def _mono(profiles: list[_Profile]) -> dict[str, list[_Profile]]:
    return {pi: list(profiles) for pi in _MONO}


def _profiles() -> dict[UID, dict[str, list[_Profile]]]:
    jpeg_lossless: dict[str, list[_Profile]] = {
        **_mono([(1, (0, 1), (8, 16), range(2, 17))]),
        "PALETTE COLOR": [(1, (0,), (8, 16), range(2, 17))],
        "YBR_FULL": [(3, (0,), (8, 16), range(2, 17))],
        "RGB": [(3, (0,), (8, 16), range(2, 17))],
    }
    j2k_lossless: dict[str, list[_Profile]] = {
        **_mono([_J2K_BITS]),
        "PALETTE COLOR": [(1, (0,), (8, 16), range(1, 17))],
        "YBR_RCT": [_J2K_COLOR],
        "YBR_FULL": [_J2K_COLOR],
    }
    return {
        JPEGBaseline8Bit: {
            **_mono([(1, (0,), (8,), range(8, 9))]),
            "YBR_FULL_422": [(3, (0,), (8,), range(8, 9))],
        },
        JPEGExtended12Bit: _mono([(1, (0,), (8,), range(8, 9)), (1, (0,), (16,), range(12, 13))]),
        JPEGLosslessSV1: jpeg_lossless,
        JPEGLSLossless: {
            **_mono([(1, (0, 1), (8, 16), range(2, 17))]),
            "PALETTE COLOR": [(1, (0,), (8, 16), range(2, 17))],
            "YBR_FULL": [(3, (0,), (8,), range(2, 9))],
            "RGB": [(3, (0,), (8, 16), range(2, 17))],
        },
        JPEGLSNearLossless: {
            **_mono([(1, (0, 1), (8, 16), range(2, 17))]),
            "YBR_FULL": [(3, (0,), (8,), range(2, 9))],
            "RGB": [(3, (0,), (8, 16), range(2, 17))],
        },
        JPEG2000Lossless: j2k_lossless,
        JPEG2000: {
            **_mono([_J2K_BITS]),
            "YBR_ICT": [_J2K_COLOR],
            "YBR_FULL": [_J2K_COLOR],
        },
        HTJ2KLossless: {
            **_mono([_HTJ2K_BITS]),
            "PALETTE COLOR": [(1, (0,), (8, 16), range(1, 17))],
            "YBR_RCT": [_HTJ2K_COLOR],
            "YBR_FULL": [_HTJ2K_COLOR],
        },
        RLELossless: {
            **_mono([(1, (0, 1), (8, 16), range(1, 17))]),
            "PALETTE COLOR": [(1, (0,), (8, 16), range(1, 17))],
            "YBR_FULL": [(3, (0,), (8,), range(1, 9))],
            "RGB": [(3, (0,), (8, 16), range(1, 17))],
        },
    }


_PROFILES = _profiles()


def resolve_transfer_syntax(value: str) -> UID:
    """A pydicom UID keyword (``JPEGLSLossless``) or a dotted UID -> the UID; ValueError if
    it names no transfer syntax."""
    import pydicom.uid

    text = value.strip()
    found = getattr(pydicom.uid, text, None) if text.isidentifier() else UID(text)
    if not isinstance(found, UID) or not found.is_transfer_syntax:
        raise ValueError(f"{value!r} is not a transfer syntax (a pydicom keyword or a UID)")
    return found


@cache
def _unavailable_reason(target: UID) -> str:
    """Why ``target`` cannot be produced here ('' when it can)."""
    spec = TARGETS.get(target)
    if spec is None:
        names = ", ".join(t.keyword for t in TARGETS)
        return f"{target.name} is not a supported target; supported: {names}"
    if spec.backend == "pydicom":
        from pydicom.pixels.encoders.base import get_encoder

        encoder = get_encoder(target)
        if not encoder.is_available:
            return f"no encoder for {target.name}: " + "; ".join(encoder.missing_dependencies)
    if spec.backend == "imagecodecs":
        try:
            import imagecodecs
        except ImportError:
            return f"{target.name} needs the imagecodecs package"
        codec = imagecodecs.HTJ2K if target == HTJ2KLossless else imagecodecs.JPEG8
        if not codec.available:
            return f"imagecodecs was built without the codec for {target.name}"
    return ""


def can_produce(transfer_syntax_uid: str) -> bool:
    """True when :func:`transcode_dataset` can write ``transfer_syntax_uid`` on this machine
    (it may still refuse a particular image the syntax cannot hold)."""
    try:
        target = resolve_transfer_syntax(transfer_syntax_uid)
    except ValueError:
        return False
    return not _unavailable_reason(target)


def choose_transfer_syntax(source: str, accepted: Sequence[str]) -> str | None:
    """For a destination that takes "whatever it accepts": ``source`` when accepted, else
    the first accepted lossless syntax we can produce, else None. Lossy syntaxes are never
    chosen implicitly."""
    if source in accepted:
        return source
    for ts in accepted:
        if ts in TARGETS and not TARGETS[UID(ts)].lossy and can_produce(ts):
            return ts
    return None


@dataclass(frozen=True)
class TranscodeOptions:
    """Encoder settings (see :class:`Transcode.Config` for their meaning)."""

    quality: int = 90
    near_lossless: int = 2
    compression_ratio: float = 10.0
    new_uid_for_lossy: bool = True


def transcode_dataset(ds: Dataset, transfer_syntax_uid: str, **options: Any) -> Dataset:
    """Re-encode ``ds`` (changed in place and returned) in ``transfer_syntax_uid``.

    ``options`` are the fields of :class:`TranscodeOptions`. Raises
    :class:`ProcessingError` with reason ``cannot_transcode`` when the target is unknown or
    unavailable, or cannot hold this image, or its pixel data cannot be decoded.
    """
    try:
        target = resolve_transfer_syntax(transfer_syntax_uid)
    except ValueError as exc:
        raise ProcessingError(REASON, str(exc)) from None
    if why := _unavailable_reason(target):
        raise ProcessingError(REASON, why)
    opts = TranscodeOptions(**options)
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise ProcessingError(REASON, "the data set has no Transfer Syntax UID")
    source = UID(meta.TransferSyntaxUID)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd but decodable input
            for _ in ds.iterall():  # parse every raw element now (some files mislabel their
                pass  # VR encoding; once parsed, pydicom writes them correctly)
            if source == target:
                return ds
            _transcode(ds, source, TARGETS[target], opts)
    except ProcessingError:
        raise
    except Exception as exc:  # the codecs raise anything on bad data
        raise ProcessingError(REASON, f"{source.name} -> {target.name}: {exc}") from exc
    return ds


def _transcode(ds: Dataset, source: UID, target: _Target, opts: TranscodeOptions) -> None:
    if source == ExplicitVRBigEndian:
        _to_little_endian(ds)
        source = ExplicitVRLittleEndian
    has_pixels = "PixelData" in ds
    method = _lossy_source_method(ds, source) if has_pixels else None
    if method is not None:
        # PS3.3 C.7.6.1.1.5: once lossy, always lossy. The output's syntax (lossless, or
        # native) no longer shows the loss; only these attributes say it.
        _record_lossy_source(ds, method)
    if target.backend == "native":
        if has_pixels and source.is_compressed:
            ds.decompress(as_rgb=_as_rgb(ds, source, target), generate_instance_uid=False)
        elif has_pixels:
            _check_native_length(ds)
        ds.file_meta.TransferSyntaxUID = target.uid
        return
    if not has_pixels:  # SR, RT plan, float pixel data: nothing to compress
        return
    _encode(ds, source, target, opts)


def _check_native_length(ds: Dataset) -> None:
    """Refuse native Pixel Data shorter than its Image Pixel attributes say (PS3.5 8.1.1);
    it would be sent on as broken as it came."""
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if not ds.get(k)]
    if missing:
        raise ProcessingError(REASON, f"Pixel Data without {', '.join(missing)}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        samples = 2  # PS3.3 C.7.6.3.1.2: two values per pixel when sub-sampled
    expected = (pixels * samples * frames * bits + 7) // 8
    if len(ds.PixelData) < expected:
        raise ProcessingError(
            REASON,
            f"Pixel Data holds {len(ds.PixelData)} bytes, fewer than the {expected} its "
            "Image Pixel attributes require",
        )


def _as_rgb(ds: Dataset, source: UID, target: _Target) -> bool:
    """Whether YCbCr pixel data is converted to RGB while decoding."""
    pi = str(ds.get("PhotometricInterpretation", ""))
    if pi in _SUBSAMPLED or source in _LOSSY_JPEG_SOURCES:
        return True  # JPEG's YCbCr is a coding detail; RGB is what it stands for
    if target.backend == "native":
        return False
    allowed = _PROFILES[target.uid]
    return "YBR_FULL" not in allowed or target.uid in _LOSSY_JPEG_SOURCES


# ---- compressed targets ----------------------------------------------------------------


def _encode(ds: Dataset, source: UID, target: _Target, opts: TranscodeOptions) -> None:
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.pixels.utils import as_pixel_options

    for keyword in ("FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            raise ProcessingError(REASON, f"{keyword} cannot be compressed")
    if int(ds.get("BitsAllocated", 0) or 0) == 1:
        raise ProcessingError(REASON, f"1-bit pixel data cannot be stored as {target.uid.name}")
    decoder = get_decoder(source)
    options = as_pixel_options(ds, as_rgb=_as_rgb(ds, source, target))
    frames = decoder.iter_array(ds, validate=True, **options)
    first, meta = next(frames)
    attrs = _ImageAttrs.of(meta)
    pi_out = _output_photometric(attrs, target)
    _check_profile(attrs, pi_out, target.uid)
    if target.uid == JPEG2000 and min(attrs.rows, attrs.columns) < 32:
        raise ProcessingError(
            REASON, "lossy JPEG 2000 needs 32 pixels a side (openjpeg's six resolution levels)"
        )
    encode_frame = _frame_encoder(attrs, pi_out, target, opts)
    encoded = [encode_frame(first)]
    encoded += [encode_frame(frame) for frame, _ in frames]
    _set_encapsulated(ds, encoded)
    ds.SamplesPerPixel = attrs.samples
    ds.PhotometricInterpretation = pi_out
    ds.BitsAllocated = attrs.bits_allocated
    ds.BitsStored = attrs.bits_stored
    ds.HighBit = attrs.bits_stored - 1
    ds.PixelRepresentation = int(attrs.signed)
    if attrs.samples == 3:
        ds.PlanarConfiguration = 0  # PS3.5 8.2: colour-by-pixel in the compressed stream
    elif "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    ds.file_meta.TransferSyntaxUID = target.uid
    lossy = target.lossy and not (target.uid == JPEGLSNearLossless and opts.near_lossless == 0)
    if lossy:
        raw_size = attrs.frame_bytes * len(encoded)
        _mark_lossy(ds, target, raw_size / sum(len(f) for f in encoded), opts)


@dataclass(frozen=True)
class _ImageAttrs:
    """The Image Pixel attributes of the decoded frames (from the decoder's report)."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str

    @classmethod
    def of(cls, meta: dict[str, Any]) -> _ImageAttrs:
        pi = str(getattr(meta["photometric_interpretation"], "value", None) or "")
        pi = pi or str(meta["photometric_interpretation"])
        if pi in ("YBR_RCT", "YBR_ICT"):
            pi = "RGB"  # the JPEG 2000 decoders undo the colour transform
        return cls(
            rows=int(meta["rows"]),
            columns=int(meta["columns"]),
            samples=int(meta["samples_per_pixel"]),
            bits_allocated=int(meta["bits_allocated"]),
            bits_stored=int(meta["bits_stored"]),
            signed=int(meta.get("pixel_representation", 0)) == 1,
            photometric=pi,
        )

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples * (self.bits_allocated // 8)


def _output_photometric(attrs: _ImageAttrs, target: _Target) -> str:
    pi = attrs.photometric
    if pi != "RGB":
        return pi
    if target.uid == JPEGBaseline8Bit:
        return "YBR_FULL_422"  # libjpeg converts to YCbCr and sub-samples 2:1 horizontally
    if target.uid in (JPEG2000Lossless, HTJ2KLossless):
        return "YBR_RCT"  # reversible colour transform (PS3.5 8.2.4)
    if target.uid == JPEG2000:
        return "YBR_ICT"
    return pi


def _check_profile(attrs: _ImageAttrs, pi_out: str, target: UID) -> None:
    profiles = _PROFILES[target].get(pi_out)
    what = (
        f"{pi_out}, {attrs.samples} sample(s), {attrs.bits_allocated}/{attrs.bits_stored} "
        f"bits allocated/stored, {'signed' if attrs.signed else 'unsigned'}"
    )
    if not profiles:
        raise ProcessingError(REASON, f"{target.name} cannot hold {pi_out} images ({what})")
    for samples, pixel_reps, allocated, stored in profiles:
        if (
            attrs.samples == samples
            and int(attrs.signed) in pixel_reps
            and attrs.bits_allocated in allocated
            and attrs.bits_stored in stored
        ):
            return
    raise ProcessingError(REASON, f"{target.name} (PS3.5 section 8) cannot hold this image: {what}")


def _frame_encoder(
    attrs: _ImageAttrs, pi_out: str, target: _Target, opts: TranscodeOptions
) -> Callable[[np.ndarray], bytes]:
    """A function encoding one decoded frame (rows, columns[, samples]) into ``target``."""
    mask = (1 << attrs.bits_stored) - 1
    unsigned = np.dtype(f"u{max(1, attrs.bits_allocated // 8)}")

    def stored_bits(frame: np.ndarray) -> np.ndarray:
        # Only the Bits Stored bits are pixel data (PS3.5 8.1.1); signed values go to the
        # codecs as their two's complement bit pattern, decoders sign-extend them again.
        if attrs.bits_stored == attrs.bits_allocated and not attrs.signed:
            return frame
        out: np.ndarray = frame.astype(unsigned, copy=False) & unsigned.type(mask)
        return out

    if target.backend == "pydicom":
        from pydicom.pixels.encoders.base import get_encoder

        encoder = get_encoder(target.uid)
        kwargs: dict[str, Any] = {
            "rows": attrs.rows,
            "columns": attrs.columns,
            "samples_per_pixel": attrs.samples,
            "bits_allocated": attrs.bits_allocated,
            "bits_stored": attrs.bits_stored,
            "pixel_representation": int(attrs.signed),
            "photometric_interpretation": pi_out,
            "number_of_frames": 1,
            "planar_configuration": 0,
        }
        if target.uid == JPEGLSNearLossless:
            kwargs["jls_error"] = opts.near_lossless
        if target.uid == JPEG2000:
            kwargs["j2k_cr"] = [opts.compression_ratio]

        fallback = _fallback_encoder(attrs, pi_out, target, stored_bits)

        def encode_pydicom(frame: np.ndarray) -> bytes:
            # pydicom's encoders take the signed array and handle the sign themselves
            try:
                return bytes(encoder.encode(frame, validate=False, **kwargs))
            except RuntimeError:
                if fallback is None:
                    raise
                return fallback(frame)

        return encode_pydicom

    import imagecodecs

    def contiguous(frame: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(frame)  # some decoders return planar views

    if target.uid == HTJ2KLossless:

        def encode_htj2k(frame: np.ndarray) -> bytes:
            rgb = attrs.samples == 3 and pi_out == "YBR_RCT"
            return bytes(
                imagecodecs.htj2k_encode(contiguous(frame), reversible=True, rgb=rgb, planar=False)
            )

        return encode_htj2k

    if target.uid == JPEGLosslessSV1:

        def encode_sv1(frame: np.ndarray) -> bytes:
            colorspace = "RGB" if attrs.samples == 3 else None
            return bytes(
                imagecodecs.jpeg8_encode(
                    contiguous(stored_bits(frame)),
                    lossless=True,
                    predictor=1,
                    bitspersample=attrs.bits_stored,
                    colorspace=colorspace,
                    outcolorspace=colorspace,
                )
            )

        return encode_sv1

    # JPEG baseline (8 bits) and extended (12 bits), lossy DCT.
    def encode_dct(frame: np.ndarray) -> bytes:
        color = attrs.samples == 3
        return bytes(
            imagecodecs.jpeg8_encode(
                contiguous(stored_bits(frame)),
                level=opts.quality,
                bitspersample=attrs.bits_stored,
                colorspace="RGB" if color else None,
                outcolorspace="YCbCr" if color else None,
                subsampling="422" if color else None,
            )
        )

    return encode_dct


def _fallback_encoder(
    attrs: _ImageAttrs,
    pi_out: str,
    target: _Target,
    stored_bits: Callable[[np.ndarray], np.ndarray],
) -> Callable[[np.ndarray], bytes] | None:
    """imagecodecs for the few lossless images pydicom's encoders refuse (CharLS in pyjpegls
    fails on images of a few pixels, openjpeg needs 32 pixels a side for its default six
    resolution levels); None where there is no such fallback."""
    if target.uid not in (JPEGLSLossless, JPEG2000Lossless):
        return None
    try:
        import imagecodecs
    except ImportError:
        return None

    def encode(frame: np.ndarray) -> bytes:
        frame = np.ascontiguousarray(frame)
        if target.uid == JPEGLSLossless:
            return bytes(imagecodecs.jpegls_encode(np.ascontiguousarray(stored_bits(frame))))
        levels = max(1, min(6, min(attrs.rows, attrs.columns).bit_length()))
        return bytes(
            imagecodecs.jpeg2k_encode(
                frame,
                codecformat="J2K",
                reversible=True,
                resolutions=levels,
                mct=pi_out == "YBR_RCT",
            )
        )

    return encode


def _set_encapsulated(ds: Dataset, encoded: list[bytes]) -> None:
    """PS3.5 A.4: encapsulated Pixel Data, OB, undefined length, one fragment per frame."""
    total = sum(len(f) for f in encoded) + 8 * len(encoded)
    if total > 2**32 - 1:
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
            encoded
        )
    else:
        ds.PixelData = encapsulate(encoded)
        for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
            if keyword in ds:
                delattr(ds, keyword)
    elem = ds["PixelData"]
    elem.VR = VR.OB
    elem.is_undefined_length = True


# ---- lossy bookkeeping -----------------------------------------------------------------


def derived_uid(original: str, target: UID, opts: TranscodeOptions) -> UID:
    """The SOP Instance UID of a lossy copy: a name-based UUID (PS3.5 B.2, ``2.25.``) of the
    original UID and the settings, so the same input always gives the same UID."""
    name = f"{original}|{target}|q{opts.quality}|n{opts.near_lossless}|r{opts.compression_ratio}"
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


def _mark_lossy(ds: Dataset, target: _Target, ratio: float, opts: TranscodeOptions) -> None:
    """PS3.3 C.7.6.1.1.5: Lossy Image Compression, its ratio and method (values appended
    to those of earlier compressions), and, for a compressed copy of a DICOM image,
    Image Type DERIVED and a new SOP Instance UID."""
    ratios = _values(ds, "LossyImageCompressionRatio")
    methods = _values(ds, "LossyImageCompressionMethod")
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, f"{ratio:.2f}"[:16]]
    ds.LossyImageCompressionMethod = [*methods, target.method]
    if not opts.new_uid_for_lossy:
        return
    if "ImageType" in ds and ds.ImageType:
        values = list(ds.ImageType) if ds["ImageType"].VM > 1 else [ds.ImageType]
        ds.ImageType = ["DERIVED", *values[1:]]
    original = str(ds.SOPInstanceUID)
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = original
    purpose = Dataset()  # DCM 121320 "Uncompressed predecessor" (PS3.16 CID 7202)
    purpose.CodeValue = "121320"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Uncompressed predecessor"
    reference.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    sources = list(ds.get("SourceImageSequence", []))
    ds.SourceImageSequence = DicomSequence([*sources, reference])
    ds.SOPInstanceUID = derived_uid(original, target.uid, opts)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _record_lossy_source(ds: Dataset, method: str) -> None:
    """Mark a source whose received pixels are lossy (``method`` is how they were
    compressed): Lossy Image Compression ``01`` whatever the sender said, and Ratio and
    Method with one value each per compression (PS3.3 C.7.6.1.1.5: "corresponding
    values"), so that the pair a lossy target appends lines up. A list the sender left
    short is completed with this source's own compression: ``method`` and the ratio of its
    Pixel Data (what the sender omitted is the latest compression, the one we can see)."""
    ds.LossyImageCompression = "01"
    ratios = _values(ds, "LossyImageCompressionRatio")
    methods = _values(ds, "LossyImageCompressionMethod")
    if len(methods) < len(ratios) or not methods:
        methods += [method] * max(1, len(ratios) - len(methods))
    if len(ratios) < len(methods) and (ratio := _source_ratio(ds)):
        ratios += [ratio] * (len(methods) - len(ratios))
    ds.LossyImageCompressionMethod = methods
    if ratios:
        ds.LossyImageCompressionRatio = ratios


def _source_ratio(ds: Dataset) -> str | None:
    """The compression ratio of encapsulated Pixel Data (decoded size / encoded size, as a
    DS), or None when the Image Pixel attributes cannot tell the decoded size."""
    from pydicom.encaps import generate_fragments

    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        raw = int(ds.Rows) * int(ds.Columns) * samples * frames * int(ds.BitsAllocated) // 8
        encoded = sum(len(f) for f in generate_fragments(ds.PixelData))
    except (AttributeError, TypeError, ValueError):
        return None
    return f"{raw / encoded:.2f}"[:16] if raw and encoded else None


def _values(ds: Dataset, keyword: str) -> list[Any]:
    if keyword not in ds or ds[keyword].VM == 0:
        return []
    value = ds[keyword].value
    return list(value) if ds[keyword].VM > 1 else [value]


# ---- big endian sources ----------------------------------------------------------------

_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _to_little_endian(ds: Dataset) -> None:
    """An Explicit VR Big Endian data set made ready to be written little endian: pydicom
    converts numbers and text when elements are read; the bytes of OW/OF/OL/OD/OV values
    (Pixel Data included) are swapped here (PS3.5 7.3: per pixel for multi-byte pixels)."""
    bits = int(ds.get("BitsAllocated", 8) or 8)
    for elem in _walk(ds):
        width = _SWAP_WIDTH.get(str(elem.VR), 0)
        if elem.tag == 0x7FE00010 and bits >= 16:
            width = bits // 8
        if width and isinstance(elem.value, bytes) and len(elem.value) % width == 0:
            elem.value = np.frombuffer(elem.value, f">u{width}").astype(f"<u{width}").tobytes()
    for item in _datasets(ds):
        item.set_original_encoding(False, True, item.original_character_set)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _walk(ds: Dataset) -> Iterator[DataElement]:
    yield from ds.iterall()


def _datasets(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for elem in ds:
        if elem.VR == VR.SQ:
            for item in elem.value:
                yield from _datasets(item)


# ---- the step --------------------------------------------------------------------------


class TranscodeConfig(ConfigModel):
    transfer_syntax: str = Field(
        description=(
            "Transfer syntax to send in: a pydicom keyword (JPEGLSLossless, JPEG2000Lossless, "
            "HTJ2KLossless, JPEGLosslessSV1, RLELossless, ExplicitVRLittleEndian, "
            "ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGLSNearLossless, "
            "JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit) or its UID."
        )
    )
    quality: int = Field(
        90,
        ge=1,
        le=100,
        description="JPEGBaseline8Bit / JPEGExtended12Bit only: JPEG quality, 1-100.",
    )
    near_lossless: int = Field(
        2,
        ge=0,
        le=255,
        description=(
            "JPEGLSNearLossless only: the largest difference allowed between an original "
            "and a decoded pixel value (JPEG-LS NEAR); 0 is lossless."
        ),
    )
    compression_ratio: float = Field(
        10.0,
        gt=1,
        le=1000,
        description="JPEG2000 (lossy) only: target compression ratio, e.g. 10 for 10:1.",
    )
    new_uid_for_lossy: bool = Field(
        True,
        description=(
            "Lossy targets: give the compressed copy a new SOP Instance UID (derived from "
            "the original, the same on every retry), Image Type DERIVED and a Source Image "
            "Sequence item, as PS3.3 C.7.6.1.1.5 requires. false keeps the original UID."
        ),
    )

    @field_validator("transfer_syntax")
    @classmethod
    def _known_target(cls, value: str) -> str:
        target = resolve_transfer_syntax(value)
        if why := _unavailable_reason(target):
            raise ValueError(why)
        return str(target)

    @model_validator(mode="after")
    def _options_fit_target(self) -> TranscodeConfig:
        target = UID(self.transfer_syntax)
        applies = {
            "quality": {JPEGBaseline8Bit, JPEGExtended12Bit},
            "near_lossless": {JPEGLSNearLossless},
            "compression_ratio": {JPEG2000},
        }
        for key, targets in applies.items():
            if key in self.model_fields_set and target not in targets:
                names = " / ".join(sorted(t.keyword for t in targets))
                raise ValueError(f"{key} applies only to {names}, not to {target.keyword}")
        return self


class Transcode(Step):
    """Re-encode the pixel data in the configured transfer syntax."""

    name: ClassVar[str] = "transcode"
    Config: ClassVar[type[ConfigModel]] = TranscodeConfig

    def __init__(self, config: TranscodeConfig, context: StepContext) -> None:
        super().__init__(config, context)
        self.target = UID(config.transfer_syntax)
        self.options = TranscodeOptions(
            quality=config.quality,
            near_lossless=config.near_lossless,
            compression_ratio=config.compression_ratio,
            new_uid_for_lossy=config.new_uid_for_lossy,
        )

    def apply(self, ds: Dataset) -> list[Dataset]:
        return [transcode_dataset(ds, self.target, **vars(self.options))]
