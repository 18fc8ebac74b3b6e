"""The DICOM JSON Model (PS3.18 F.2) of a stored instance, from its header only.

The file is read by pydicom with values over ``BULK_THRESHOLD`` bytes *deferred* (their
bytes are skipped, not read). Pixel Data, and every value of VR OB, OD, OF, OL, OV, OW or
UN longer than ``BULK_THRESHOLD``, become a ``BulkDataURI`` (PS3.18 F.2.6) instead of a
value, so pixel data are never read nor decoded. A deferred value of another VR (a long
text, a long list of numbers) is read and written inline.

Bulk data URIs are ``{instance URL}/bulkdata/{tag path}``: the tag path is the element's
tag in 8 hex digits, preceded for a nested element by its sequence's tag and the 0-based
item number (``00400275/0/00091010``). :func:`locate_bulk` resolves one.

File Meta Information (group 0002), group lengths and Data Set Trailing Padding are left
out. Used by WADO-RS metadata; kept apart so QIDO-RS can share it.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "BULK_THRESHOLD",
    "BULK_VRS",
    "BulkValue",
    "MetadataCache",
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


def _element_json(elem: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = elem.to_json_dict(None, 0)
        return result
    except Exception:
        # A value that breaks its VR (stored as received, rule 6): send its text as is.
        raw = elem.value if isinstance(elem.value, bytes) else None
        if raw is not None and elem.VR in _TEXT_VRS:
            text = raw.decode("latin-1").rstrip(" \x00")
            return {"vr": elem.VR, "Value": text.split("\\")} if text else {"vr": elem.VR}
        return {"vr": elem.VR}


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
            raw = raw._replace(value=fh.read(raw.length))
            elem = convert_raw_data_element(raw, encoding=ds._character_set, ds=ds)
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
        encoded = json.dumps(instance_json(path, instance_url), separators=(",", ":")).encode()
        with self._lock:
            if key not in self._entries and len(encoded) <= self._max // 8:
                self._entries[key] = encoded
                self._size += len(encoded)
                while self._size > self._max:
                    _, dropped = self._entries.popitem(last=False)
                    self._size -= len(dropped)
        return encoded
