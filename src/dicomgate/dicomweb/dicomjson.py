"""The DICOM JSON Model (PS3.18 F.2) of a stored instance, from its header only.

The file is read by pydicom with values over ``BULK_THRESHOLD`` bytes *deferred* (their
bytes are skipped, not read). Pixel Data, and every value of VR OB, OD, OF, OL, OV, OW or
UN longer than ``BULK_THRESHOLD``, become a ``BulkDataURI`` (PS3.18 F.2.6) instead of a
value, so pixel data are never read nor decoded. A deferred value of another VR (a long
text, a long list of numbers) is read and written inline.

Bulk data URIs are ``{instance URL}/bulkdata/{tag path}``: the tag path is the element's
tag in 8 hex digits, preceded for a nested element by its sequence's tag and the 0-based
item number (``00400275/0/00091010``). :func:`locate_bulk` resolves one.

Values are written by :func:`_element_json`, not pydicom's ``to_json_dict`` (which raises
on an empty value inside a multi-valued DS, IS or PN, and writes empty PN component groups
and bare ``Infinity``/``NaN``):

- an empty value inside a multi-valued attribute is ``null`` (PS3.18 F.2.5), for every VR;
- a PN value holds only its non-empty component groups (PS3.18 F.2.2);
- DS and IS are JSON numbers, or their stored text when it is not a number JSON can hold
  (``inf``, ``1e999``, ``abc``): PS3.18 Table F.2.3-1 allows "Number or String" for them;
- FL and FD infinities and NaN, which neither JSON (RFC 8259 section 6) nor Annex F can
  write as numbers, are the strings ``"Infinity"``, ``"-Infinity"`` and ``"NaN"`` (what
  pydicom's ``from_json`` and JavaScript's ``Number()`` read back).

The encoded JSON never holds a bare ``NaN`` or ``Infinity``: it is dumped with
``allow_nan=False``.

File Meta Information (group 0002), group lengths and Data Set Trailing Padding are left
out. Used by WADO-RS metadata; kept apart so QIDO-RS can share it.
"""

from __future__ import annotations

import json
import math
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "BULK_THRESHOLD",
    "BULK_VRS",
    "BulkValue",
    "MetadataCache",
    "bulk_path",
    "encode_json",
    "instance_json",
    "locate_bulk",
]

BULK_THRESHOLD = 1024  # bytes; longer binary values are sent as BulkDataURI
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PIXEL_DATA = 0x7FE00010
_SKIPPED = {0xFFFCFFFC}
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_DECIMAL_VRS = frozenset({"DS", "IS"})  # numbers written as text (PS3.5 Table 6.2-1)
_FLOAT_VRS = frozenset({"FL", "FD"})
_INTEGER_VRS = frozenset({"SL", "SS", "UL", "US", "SV", "UV", "US or SS"})
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")  # PS3.18 F.2.2
# PS3.5 Table 6.2-1: IS is an optionally signed integer, DS a fixed or floating point
# number, both ASCII (Python's int() and float() also take "1_0", "inf", Arabic-Indic digits).
_IS_TEXT = re.compile(r"[+-]?[0-9]+")
_DS_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _read(fh: BinaryIO) -> Any:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(fh, defer_size=BULK_THRESHOLD)


def _resolve_vr(ds: Any, tag: int, vr: str | None, undefined_length: bool) -> str:
    """The VR of a deferred element of an implicit VR data set (or an ambiguous one)."""
    from pydicom.datadict import dictionary_VR

    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return "UN"
    if vr == "OB or OW":
        bits = ds.get("BitsAllocated", 8) if hasattr(ds, "get") else 8
        return "OB" if undefined_length or int(bits or 8) <= 8 else "OW"
    if vr in ("US or SS or OW", "US or OW"):
        return "OW"
    if vr == "US or SS":
        return "SS" if int(ds.get("PixelRepresentation", 0) or 0) else "US"
    return vr


def _decimal_json(vr: str, text: str) -> int | float | str | None:
    """One DS or IS value: ``null`` when empty (PS3.18 F.2.5), a number, or the stored text
    when it is no number JSON can hold (Table F.2.3-1 allows "Number or String")."""
    text = text.strip(" \x00")
    if not text:
        return None
    if _IS_TEXT.fullmatch(text):
        return int(text) if vr == "IS" else float(text)
    if _DS_TEXT.fullmatch(text):
        number = float(text)
        if math.isfinite(number):
            if vr == "DS":
                return number
            if number.is_integer():  # "1.0" as an IS, as pydicom reads it
                return int(number)
    return text


def _float_json(value: float) -> float | str:
    """FL/FD: a JSON number, or "NaN", "Infinity", "-Infinity" (not numbers in JSON)."""
    number = float(value)
    if math.isfinite(number):
        return number
    return "NaN" if math.isnan(number) else _NON_FINITE[number]


def _pn_json(value: Any) -> dict[str, str] | None:
    """A PN value: its non-empty component groups only (PS3.18 F.2.2); ``null`` if none."""
    components = getattr(value, "components", None)
    if components is None:
        components = str(value).split("=")
    groups = {name: text for name, text in zip(_PN_GROUPS, components, strict=False) if text}
    return groups or None


def _value_json(vr: str, value: Any) -> Any:
    """One value of a multi-valued attribute; an empty one is ``null`` (PS3.18 F.2.5)."""
    if value is None or (isinstance(value, str) and not value and vr != "PN"):
        return None
    if vr == "PN":
        return _pn_json(value)
    if vr in _DECIMAL_VRS:
        return _decimal_json(vr, str(value))
    if vr in _FLOAT_VRS:
        return _float_json(value)
    if vr in _INTEGER_VRS:
        return int(value)
    if vr == "AT":
        return f"{int(value):08X}"
    return str(value)


def _decimal_element(vr: str, raw: bytes) -> dict[str, Any]:
    """A DS or IS element from its stored bytes (ASCII), never converted by pydicom: a
    value pydicom cannot read as a number is not lost."""
    text = raw.decode("latin-1").strip(" \x00")
    if not text:
        return {"vr": vr}
    return {"vr": vr, "Value": [_decimal_json(vr, piece) for piece in text.split("\\")]}


def _element_json(elem: Any) -> dict[str, Any]:
    """The JSON of one element that is neither a sequence nor bulk data."""
    vr = elem.VR
    value = elem.value
    if isinstance(value, bytes) and vr in _TEXT_VRS:
        # A value that breaks its VR (stored as received, rule 6): send its text as is.
        if vr in _DECIMAL_VRS:
            return _decimal_element(vr, value)
        text = value.decode("latin-1").rstrip(" \x00")
        values = [piece or None for piece in text.split("\\")]
        return {"vr": vr, "Value": values} if text else {"vr": vr}
    if vr not in _TEXT_VRS and vr not in _FLOAT_VRS | _INTEGER_VRS | {"PN", "AT"}:
        # Binary VRs (InlineBinary) and VRs left ambiguous: pydicom's encoding.
        try:
            result: dict[str, Any] = elem.to_json_dict(None, 0)
            return result
        except Exception:  # a value pydicom cannot encode: the attribute, empty
            return {"vr": vr}
    if elem.is_empty:
        return {"vr": vr}  # PS3.18 F.2.5: present but empty, no "Value"
    values = list(value) if isinstance(value, MutableSequence | tuple) else [value]
    encoded = [_value_json(vr, v) for v in values]
    if encoded == [None]:  # a single value with nothing in it (a PN of "=" only)
        return {"vr": vr}
    return {"vr": vr, "Value": encoded}


def _dataset_json(
    ds: Any, fh: BinaryIO, uri: Callable[[str], str], prefix: str, top: bool
) -> dict[str, Any]:
    from pydicom.dataelem import RawDataElement, convert_raw_data_element

    out: dict[str, Any] = {}
    for tag in sorted(ds._dict):
        if tag.group == 0x0002 or tag.element == 0 or tag in _SKIPPED:
            continue
        key = f"{tag:08X}"
        path = prefix + key
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            vr = _resolve_vr(ds, tag, raw.VR, raw.length == 0xFFFFFFFF)
            if tag == PIXEL_DATA or vr in BULK_VRS:
                out[key] = {"vr": vr, "BulkDataURI": uri(path)}
                continue
            fh.seek(raw.value_tell)
            stored = fh.read(raw.length)
            if vr in _DECIMAL_VRS:
                out[key] = _decimal_element(vr, stored)
                continue
            raw = raw._replace(value=stored)
            elem = convert_raw_data_element(raw, encoding=ds._character_set, ds=ds)
        elif isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
            vr = _resolve_vr(ds, tag, raw.VR, raw.length == 0xFFFFFFFF)
            if vr in _DECIMAL_VRS:  # from the stored text: nothing pydicom cannot parse
                out[key] = _decimal_element(vr, raw.value)
                continue
            elem = ds[tag]
        else:
            elem = ds[tag]
        if elem.VR == "SQ":
            items = [
                _dataset_json(item, fh, uri, f"{path}/{n}/", False)
                for n, item in enumerate(elem.value)
            ]
            out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        elif (tag == PIXEL_DATA and top) or (
            elem.VR in BULK_VRS
            and isinstance(elem.value, bytes)
            and len(elem.value) > BULK_THRESHOLD
        ):
            vr = _resolve_vr(ds, tag, elem.VR, bool(getattr(elem, "is_undefined_length", False)))
            out[key] = {"vr": vr, "BulkDataURI": uri(path)}
        else:
            out[key] = _element_json(elem)
    return out


def instance_json(path: Path, instance_url: str) -> dict[str, Any]:
    """The DICOM JSON object of the stored file ``path``; bulk data URIs under
    ``instance_url`` (the WADO-RS URL of the instance)."""

    def uri(tag_path: str) -> str:
        return f"{instance_url}/bulkdata/{tag_path}"

    with open(path, "rb") as fh:
        ds = _read(fh)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _dataset_json(ds, fh, uri, "", True)


def encode_json(document: Any) -> bytes:
    """``document`` as compact UTF-8 JSON (RFC 8259). ``allow_nan=False``: a non-finite
    number the encoders above missed is a ``ValueError`` (a 500 saying why), never a bare
    ``NaN``/``Infinity`` that strict JSON parsers refuse."""
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class BulkValue:
    """Where a bulk value is: a span of the file, or bytes already read (nested values)."""

    vr: str
    offset: int = -1  # file offset of the value (top-level elements), or -1
    length: int = 0
    data: bytes | None = None  # the value when it is not read from the file as a span
    big_endian: bool = False  # the value's bytes need swapping to little endian
    pixel_data: bool = False  # top-level Pixel Data: served as frames instead


def _parse_path(tag_path: str) -> list[int]:
    pieces = tag_path.strip("/").split("/")
    if len(pieces) % 2 != 1:
        raise ValueError("a bulk data path is tag[/item/tag]...")
    out: list[int] = []
    for n, piece in enumerate(pieces):
        if n % 2 == 0:
            if len(piece) != 8:
                raise ValueError(f"not a tag: {piece!r}")
            out.append(int(piece, 16))
        else:
            if not piece.isdigit():
                raise ValueError(f"not an item number: {piece!r}")
            out.append(int(piece))
    return out


def bulk_path(tag_path: str) -> str:
    """The bulk data path as :func:`instance_json` writes it (``7fe00010`` ->
    ``7FE00010``); ``ValueError`` for a malformed path."""
    steps = _parse_path(tag_path)
    return "/".join(f"{step:08X}" if n % 2 == 0 else str(step) for n, step in enumerate(steps))


def locate_bulk(path: Path, tag_path: str) -> BulkValue | None:
    """Resolve a bulk data path of :func:`instance_json`; ``None`` if there is no such
    value. Raises ``ValueError`` for a malformed path."""
    from pydicom.dataelem import RawDataElement

    steps = _parse_path(tag_path)
    with open(path, "rb") as fh:
        ds = _read(fh)
        _, little = ds.original_encoding
        big = little is False
        for n in range(0, len(steps) - 1, 2):
            tag, item = steps[n], steps[n + 1]
            if tag not in ds._dict:
                return None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                elem = ds[tag]
            if elem.VR != "SQ" or item >= len(elem.value):
                return None
            ds = elem.value[item]
        tag = steps[-1]
        if tag not in ds._dict:
            return None
        top = len(steps) == 1
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None:
            vr = _resolve_vr(ds, tag, raw.VR, raw.length == 0xFFFFFFFF)
            if top and tag == PIXEL_DATA:
                return BulkValue(vr, pixel_data=True)
            if not top:  # nested values are never deferred by pydicom; defensive
                fh.seek(raw.value_tell)
                return BulkValue(vr, data=fh.read(raw.length), big_endian=big)
            return BulkValue(vr, offset=raw.value_tell, length=raw.length, big_endian=big)
        if top and tag == PIXEL_DATA:
            return BulkValue("OB", pixel_data=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            elem = ds[tag]
        if not isinstance(elem.value, bytes):
            return None
        return BulkValue(elem.VR, data=elem.value, big_endian=big)


class MetadataCache:
    """An LRU of encoded instance metadata, bounded in bytes (thread-safe).

    Keyed by the stored file's path and the instance URL: stored files never change
    (DESIGN rule 4), so an entry is never stale; a replaced instance has a new path.
    """

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._max = max_bytes
        self._size = 0
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, instance_url: str) -> bytes:
        """The JSON (UTF-8) of :func:`instance_json`, from the cache when possible."""
        key = (str(path), instance_url)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        encoded = encode_json(instance_json(path, instance_url))
        with self._lock:
            if key not in self._entries and len(encoded) <= self._max // 8:
                self._entries[key] = encoded
                self._size += len(encoded)
                while self._size > self._max:
                    _, dropped = self._entries.popitem(last=False)
                    self._size -= len(dropped)
        return encoded
