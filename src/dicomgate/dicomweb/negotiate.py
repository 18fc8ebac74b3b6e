"""Accept header negotiation for WADO-RS (PS3.18 8.7).

An ``Accept`` header is parsed into :class:`MediaRange` s ordered by quality; the
``choose_*`` functions walk them in that order and return the first representation we
can produce, or ``None`` (the caller answers 406). :func:`choose_by_quality` weighs each
offered type by the most specific range that names it (RFC 9110 12.5.1), so ``q=0``
refuses a type even where ``*/*`` would allow it.

The ``accept`` query parameter (PS3.18 8.3.3.1) is parsed the same way. Typed into an
address, ``application/dicom+json`` reaches us as ``application/dicom json``: form
decoding reads ``+`` as a space. Media types never contain spaces (RFC 9110 8.3.1: type
and subtype are tokens), so a space inside one is read back as the ``+`` it was.

Media types of compressed pixel data follow PS3.18 Table 8.7.3-2 (Frames and Bulk Data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dicomgate.dicomweb.transcode import EXPLICIT_VR_LITTLE_ENDIAN, can_transcode

__all__ = [
    "FRAME_MEDIA_TYPES",
    "LOSSY_TRANSFER_SYNTAXES",
    "AcceptError",
    "FrameEncoding",
    "MediaRange",
    "choose_by_quality",
    "choose_frame_encoding",
    "choose_instance_syntax",
    "choose_simple",
    "parse_accept",
]

# PS3.18 Table 8.7.3-2: the media type of a compressed frame, by transfer syntax.
FRAME_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.110": "image/jxl",
    "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg2",
    "1.2.840.10008.1.2.4.101": "video/mpeg2",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}
# Synonyms some clients send (dicomweb-client offers both spellings).
_MEDIA_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}

# Pixel data that is lossy as stored: PS3.18 8.7.3.5.2 lets the origin server send it in
# its own syntax when the request names no transfer syntax (decompressing it to Explicit
# VR Little Endian would only make it bigger).
LOSSY_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.111",
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),
    }
)

# Uncompressed pixel data: implicit/explicit little endian, deflated, big endian.
_NATIVE = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}
)


class AcceptError(ValueError):
    """The Accept header cannot be parsed (answered 400)."""


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header."""

    media_type: str  # lower case, e.g. "multipart/related", "image/jpeg", "*/*"
    params: dict[str, str] = field(default_factory=dict)  # keys lower case, values unquoted
    q: float = 1.0

    @property
    def inner_type(self) -> str:
        """The ``type`` parameter of a multipart range (lower case), ``*/*`` if absent."""
        raw = self.params.get("type", "*/*").lower()
        return _MEDIA_ALIASES.get(raw, raw)

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise AcceptError("unbalanced quotes in Accept")
    parts.append("".join(current))
    return parts


def _media_token(text: str) -> str:
    """A media type (or a ``type`` parameter's value) in lower case, with a space inside it
    read as the ``+`` that form decoding turned into one (``application/dicom json``)."""
    return "+".join(text.strip().lower().split())


def _ranges(header: str | None) -> list[MediaRange]:
    """Every media range of an Accept header in the order given, ``q=0`` ones included."""
    if header is None or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    for item in _split(header, ","):
        pieces = [p.strip() for p in _split(item, ";")]
        media_type = _media_token(pieces[0])
        if not media_type:
            continue
        if media_type.count("/") != 1:
            raise AcceptError(f"not a media type in Accept: {pieces[0]!r}")
        params: dict[str, str] = {}
        q = 1.0
        for piece in pieces[1:]:
            if not piece:
                continue
            name, eq, value = piece.partition("=")
            if not eq:
                raise AcceptError(f"bad media type parameter in Accept: {piece!r}")
            name = name.strip().lower()
            value = value.strip().strip('"')
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    raise AcceptError(f"bad quality value in Accept: {value!r}") from None
                if q != q:  # NaN: float() takes "nan"; no quality at all
                    q = 0.0
            elif name == "type":
                params[name] = _media_token(value)
            else:
                params[name] = value
        ranges.append(MediaRange(media_type, params, q))
    return ranges


def parse_accept(header: str | None) -> list[MediaRange]:
    """The acceptable media ranges of an Accept header, best first; no header means
    ``*/*``. A range with ``q=0`` is "not acceptable" (RFC 9110 12.4.2) and left out."""
    ranked = sorted(enumerate(_ranges(header)), key=lambda item: (-item[1].q, item[0]))
    return [entry for _, entry in ranked if entry.q > 0]


def choose_by_quality(header: str | None, offered: Sequence[str]) -> str | None:
    """The one of ``offered`` (single-part media types, the first preferred) the client
    rates highest, or ``None`` when it accepts none of them.

    RFC 9110 12.5.1: the quality of a type is that of the most specific range naming it
    (``type/subtype``, then ``type/*``, then ``*/*``), so ``application/dicom+json;q=0,
    */*`` refuses application/dicom+json; ``q=0`` is "not acceptable" (12.4.2). Of types
    rated alike, the one whose range the client listed first, then the first offered.
    Raises :class:`AcceptError` for a header that is no list of media ranges.
    """
    ranges = list(enumerate(_ranges(header)))
    best: tuple[float, int, int] | None = None
    chosen: str | None = None
    for rank, candidate in enumerate(offered):
        major = candidate.split("/")[0]
        deciding: tuple[int, float, int] | None = None  # (specificity, q, position)
        for position, entry in ranges:
            specificity = {candidate: 2, f"{major}/*": 1, "*/*": 0}.get(entry.media_type)
            if specificity is None:
                continue
            if deciding is None or (specificity, entry.q) > deciding[:2]:
                deciding = (specificity, entry.q, position)
        if deciding is None or deciding[1] <= 0:
            continue
        key = (-deciding[1], deciding[2], rank)
        if best is None or key < best:
            best, chosen = key, candidate
    return chosen


def _is_multipart(entry: MediaRange) -> bool:
    return entry.media_type in ("multipart/related", "multipart/*", "*/*")


def default_syntax(stored: str) -> str:
    """The syntax sent when the request names none (PS3.18 8.7.3.5.2): Explicit VR Little
    Endian, except for lossy pixel data and what we cannot transcode (sent as stored)."""
    if stored in LOSSY_TRANSFER_SYNTAXES:
        return stored
    if stored == EXPLICIT_VR_LITTLE_ENDIAN or can_transcode(stored, EXPLICIT_VR_LITTLE_ENDIAN):
        return EXPLICIT_VR_LITTLE_ENDIAN
    return stored


def choose_instance_syntax(accept: list[MediaRange], stored: str) -> str | None:
    """The transfer syntax to send an instance stored in ``stored`` in as
    ``multipart/related; type="application/dicom"``, or ``None`` if nothing acceptable."""
    for entry in accept:
        if not _is_multipart(entry):
            continue
        inner = entry.params.get("type", "application/dicom").lower()
        if inner not in ("application/dicom", "application/*", "*/*"):
            continue
        wanted = entry.transfer_syntax
        if wanted == "*" or wanted == stored:
            return stored
        if wanted is None:
            return default_syntax(stored)
        if can_transcode(stored, wanted):
            return wanted
    return None


@dataclass(frozen=True)
class FrameEncoding:
    """How to send frames (or pixel bulk data) of an instance."""

    media_type: str  # of each part
    transfer_syntax: str  # the part's transfer-syntax parameter
    decode: bool  # True: decompress the stored frames to native little endian


def is_native(transfer_syntax: str) -> bool:
    """Uncompressed pixel data (offset arithmetic applies after inflation/byte swap)."""
    return transfer_syntax in _NATIVE


def choose_frame_encoding(accept: list[MediaRange], stored: str) -> FrameEncoding | None:
    """How to send frames of an instance stored in ``stored``, or ``None`` (406)."""
    native = FrameEncoding("application/octet-stream", EXPLICIT_VR_LITTLE_ENDIAN, False)
    own_type = FRAME_MEDIA_TYPES.get(stored)
    for entry in accept:
        if not _is_multipart(entry):
            continue
        inner = entry.inner_type if entry.media_type == "multipart/related" else "*/*"
        wanted = entry.transfer_syntax
        if is_native(stored):
            if inner in ("application/octet-stream", "application/*", "*/*") and wanted in (
                None,
                "*",
                EXPLICIT_VR_LITTLE_ENDIAN,
                stored,
            ):
                return native
            continue
        if own_type is None:
            continue
        major = own_type.split("/")[0]
        if inner in (own_type, "*/*", f"{major}/*") and wanted in (None, "*", stored):
            return FrameEncoding(own_type, stored, False)
        if (
            inner in ("application/octet-stream", "application/*")
            and wanted in ("*", stored)
            and major != "video"
        ):
            # A client that names any syntax (or the stored one) takes the frame as stored,
            # labelled with its syntax, as OHIF asks (transfer-syntax=*): no decoding on the
            # server, and a frame our decoders cannot read still reaches a viewer that can.
            return FrameEncoding("application/octet-stream", stored, False)
        if (
            inner in ("application/octet-stream", "application/*")
            and wanted in (None, "*", EXPLICIT_VR_LITTLE_ENDIAN)
            and can_transcode(stored, EXPLICIT_VR_LITTLE_ENDIAN)
        ):
            return FrameEncoding("application/octet-stream", EXPLICIT_VR_LITTLE_ENDIAN, True)
    return None


def choose_simple(accept: list[MediaRange], offered: list[str]) -> str | None:
    """The first of ``offered`` (single-part media types, first = default) that ``accept``
    allows, in the client's order of preference."""
    for entry in accept:
        media = entry.media_type
        if media == "*/*":
            return offered[0]
        for candidate in offered:
            major = candidate.split("/")[0]
            if media in (candidate, f"{major}/*"):
                return candidate
    return None
