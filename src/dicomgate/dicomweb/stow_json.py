"""STOW-RS metadata + bulk data uploads (PS3.18 10.5.1.2.2, 8.6.1.2):
``multipart/related; type="application/dicom+json"``.

The request holds one or more ``application/dicom+json`` parts (each a JSON array of
instances, PS3.18 Annex F) and bulk data parts, each named by its ``Content-Location``
header and referenced from the metadata by a ``BulkDataURI``. Metadata parts are small and
parsed in memory (at most :data:`MAX_METADATA_BYTES` in all); bulk data parts are written
to spool files as they arrive, never held in memory (DESIGN rule 2). When the body is
complete, each instance becomes a Part 10 file in its own spool file, written by pydicom
with the bulk values streamed from their spool files, and is ingested like any other
STOW-RS part.

Bulk data parts:

* ``application/octet-stream`` (no ``transfer-syntax`` parameter, or an uncompressed one):
  the value's bytes as they are, for any element (PS3.18 8.7.3.3.1: little endian);
* a compressed pixel data part (``image/jpeg``, ``image/jls``, ``image/jp2``,
  ``image/dicom-rle`` ... or ``application/octet-stream; transfer-syntax=UID``) for Pixel
  Data: ONE compressed frame, encapsulated as the single fragment of a single-frame image
  (PS3.5 A.4); the file's transfer syntax is the part's ``transfer-syntax`` parameter, or
  the metadata's TransferSyntaxUID (0002,0010), or the media type's default.

An instance whose metadata cannot be used (no SOP Class / Instance UID, a BulkDataURI no
part provides, a compressed frame for a multi-frame image, two transfer syntaxes) fails
alone with FailureReason 0xC000 ("cannot understand", PS3.18 Table 10.5.3-2); a request
whose metadata is not a JSON array of objects is refused with 400.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from dicomgate.dicomweb.multipart import PartStart, parse_content_type
from dicomgate.ingress.sniff import Sniffed
from dicomgate.store.part10 import encode_file_meta
from dicomgate.store.scan import MAX_SEQUENCE_DEPTH

if TYPE_CHECKING:
    from dicomgate.store.filestore import ContentStore, SpoolFile

__all__ = ["MAX_METADATA_BYTES", "JsonStager", "MetadataError"]

DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CANNOT_UNDERSTAND = 0xC000
MAX_METADATA_BYTES = 64 * 1024 * 1024
_PIXEL_DATA = 0x7FE00010
_MARK = b"\x00dicomgate-bulk\x00"

#: Media types of single compressed frames and the transfer syntax each implies
#: (PS3.18 Table 8.7.3-5: the default transfer syntax of each media type).
_FRAME_TYPES = {
    "image/jpeg": "1.2.840.10008.1.2.4.50",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.201",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
}
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


class MetadataError(ValueError):
    """The request's metadata is not usable at all (the whole request is refused)."""


class _InstanceError(Exception):
    """One instance cannot be built (it fails alone with 0xC000)."""


@dataclass
class _Bulk:
    spool: SpoolFile
    transfer_syntax: str  # "" for raw bytes (native little endian)


@dataclass
class Built:
    """An instance written as a Part 10 spool file, ready for the ingestor."""

    spool: SpoolFile
    sniffed: Sniffed


@dataclass
class Unbuilt:
    sop_class_uid: str
    sop_instance_uid: str
    reason: int
    why: str


@dataclass
class JsonStager:
    """Collects the parts of one metadata + bulk data request (parser events)."""

    store: ContentStore
    private_information: bytes
    metadata: list[dict[str, Any]] = field(default_factory=list)
    _bulk: dict[str, _Bulk] = field(default_factory=dict)
    _json: bytearray | None = None
    _json_bytes: int = 0
    _current: _Bulk | None = None
    _part: int = 0

    # -- parser events --------------------------------------------------------------------

    def start(self, event: PartStart) -> None:
        self._part += 1
        media, params = parse_content_type(event.content_type or DICOM_JSON)
        if media in (DICOM_JSON, "application/json"):
            self._json = bytearray()
            return
        location = event.headers.get("content-location", "").strip()
        if not location:
            raise MetadataError(
                f"part {self._part} ({media}) has no Content-Location: a bulk data part must"
                " name the BulkDataURI it provides"
            )
        if location in self._bulk:
            raise MetadataError(f"part {self._part}: Content-Location {location} given twice")
        syntax = params.get("transfer-syntax", "")
        if media != OCTET_STREAM:
            if media not in _FRAME_TYPES:
                raise MetadataError(
                    f"part {self._part} is {media}; bulk data parts are"
                    f" {OCTET_STREAM} or one of {', '.join(sorted(_FRAME_TYPES))}"
                )
            syntax = syntax or _FRAME_TYPES[media]
        if syntax in _NATIVE:
            syntax = ""
        self._current = _Bulk(self.store.new_spool(), syntax)
        self._bulk[location] = self._current

    def data(self, chunk: bytes) -> None:
        if self._json is not None:
            self._json_bytes += len(chunk)
            if self._json_bytes > MAX_METADATA_BYTES:
                raise MetadataError(
                    f"the metadata parts exceed {MAX_METADATA_BYTES >> 20} MiB; send bulk"
                    " values as bulk data parts"
                )
            self._json += chunk
        elif self._current is not None:
            self._current.spool.write(chunk)

    def end(self) -> None:
        if self._json is not None:
            self.metadata.extend(_instances(bytes(self._json), self._part))
            self._json = None
        elif self._current is not None:
            self._current.spool.park()
            self._current = None

    def discard(self) -> None:
        for bulk in self._bulk.values():
            bulk.spool.discard()
        self._bulk.clear()

    # -- building -------------------------------------------------------------------------

    def build(self) -> tuple[list[Built], list[Unbuilt]]:
        """One Part 10 spool file per instance of the metadata; the bulk spools are gone
        afterwards (their bytes are copied into the instances that reference them)."""
        if not self.metadata:
            raise MetadataError("the request has no application/dicom+json metadata part")
        built: list[Built] = []
        failed: list[Unbuilt] = []
        try:
            for doc in self.metadata:
                try:
                    built.append(self._build_one(doc))
                except _InstanceError as exc:
                    failed.append(
                        Unbuilt(_uid(doc, "00080016"), _uid(doc, "00080018"), CANNOT_UNDERSTAND,
                                str(exc))
                    )  # fmt: skip
        except BaseException:
            for b in built:
                b.spool.discard()
            raise
        finally:
            self.discard()
        return built, failed

    def _build_one(self, doc: dict[str, Any]) -> Built:
        sop_class, sop_instance = _uid(doc, "00080016"), _uid(doc, "00080018")
        if not sop_class or not sop_instance:
            raise _InstanceError("the metadata has no SOPClassUID or SOPInstanceUID")
        meta_syntax = _uid(doc, "00020010")
        body = {k: v for k, v in doc.items() if not k.startswith("0002")}
        if _check_structure(body) > MAX_SEQUENCE_DEPTH:
            raise _InstanceError("sequences nested too deep")
        used: list[tuple[DataElement, _Bulk]] = []

        def bulk_value(tag: str, vr: str, uri: str) -> bytes:
            return _MARK + uri.encode("utf-8", "surrogateescape")

        try:
            with warnings.catch_warnings():
                # pydicom warns and drops or replaces what it cannot take (an AT that is
                # not a tag): that would be a coerced instance answered as stored.
                warnings.simplefilter("error")
                ds = Dataset.from_json(body, bulk_data_uri_handler=bulk_value)
        except Exception as exc:  # pydicom raises many kinds for bad JSON
            raise _InstanceError(_why("the metadata is not valid DICOM JSON", exc)) from None
        if "SpecificCharacterSet" not in ds and not json.dumps(body).isascii():
            ds.SpecificCharacterSet = "ISO_IR 192"  # JSON text is Unicode (PS3.18 F.2)
        for elem in _elements(ds):
            value = elem.value
            if isinstance(value, bytes) and value.startswith(_MARK):
                uri = value[len(_MARK) :].decode("utf-8", "surrogateescape")
                bulk = self._find(uri)
                if bulk is None:
                    raise _InstanceError(f"no bulk data part has Content-Location {uri}")
                used.append((elem, bulk))
        syntax = meta_syntax if meta_syntax and meta_syntax not in _NATIVE else ""
        for elem, bulk in used:
            if bulk.transfer_syntax:
                if elem.tag != _PIXEL_DATA:
                    raise _InstanceError(f"a compressed bulk data part for {elem.tag}")
                if syntax and syntax != bulk.transfer_syntax:
                    raise _InstanceError("the pixel data and the metadata name two syntaxes")
                syntax = bulk.transfer_syntax
        file_syntax = syntax or (meta_syntax if meta_syntax in _NATIVE else EXPLICIT_LE)
        if file_syntax == "1.2.840.10008.1.2.2":
            file_syntax = EXPLICIT_LE  # bulk data is little endian (PS3.18 8.7.3.3.1)
        out = self.store.new_spool()
        try:
            header = encode_file_meta(
                sop_class, sop_instance, file_syntax, private_information=self.private_information
            )
            out.write(header)
            with contextlib.ExitStack() as files:
                for elem, bulk in used:
                    fh = files.enter_context(open(bulk.spool.path, "rb"))
                    if bulk.transfer_syntax:
                        frames = int(ds.get("NumberOfFrames", 1) or 1)
                        if frames != 1:
                            raise _InstanceError(
                                "a compressed pixel data part holds one frame; this image has"
                                f" {frames} (send it as application/dicom)"
                            )
                        elem.value = encapsulate([fh.read()])  # one compressed frame
                        elem.VR = "OB"
                        elem.is_undefined_length = True
                    else:
                        elem.value = fh  # streamed by pydicom's writer from the spool file
                with warnings.catch_warnings():
                    # A value pydicom cannot encode as asked (text outside the character
                    # set: '?'; a value too long for its VR: written as UN) is refused.
                    warnings.simplefilter("error")
                    _write(out, ds, UID(file_syntax))
        except _InstanceError:
            out.discard()
            raise
        except Exception as exc:  # pydicom's writer raises many kinds (an unknown VR ...)
            out.discard()
            raise _InstanceError(_why("cannot write the instance", exc)) from None
        out.park()
        return Built(out, Sniffed(len(header), file_syntax, sop_class, sop_instance, True))

    def _find(self, uri: str) -> _Bulk | None:
        """The part for a BulkDataURI: the same string, or the same path when one of them
        is relative (clients write either)."""
        found = self._bulk.get(uri)
        if found is not None:
            return found
        for location, bulk in self._bulk.items():
            if uri.endswith("/" + location.lstrip("/")) or location.endswith("/" + uri.lstrip("/")):
                return bulk
        return None


def _instances(raw: bytes, part: int) -> list[dict[str, Any]]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise MetadataError(f"part {part} is not valid JSON: {exc}") from None
    except RecursionError:
        raise MetadataError(f"part {part}: JSON nested too deep") from None
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
        raise MetadataError(f"part {part}: expected a JSON array of DICOM JSON objects")
    return doc


def _check_structure(doc: dict[str, Any]) -> int:
    """How deep sequence items nest in a DICOM JSON object (0: no sequence), counted
    without recursion and only up to one level past the limit: pydicom's reader and writer
    recurse per level, so a deep enough upload would end in RecursionError. Raises
    :class:`_InstanceError` for a key that is not a data element's tag (PS3.18 F.2.1.1:
    eight hexadecimal digits; pydicom would read "0008" as (0000,0008), a command element,
    and a keyword as the tag it names) or one of the command group 0000."""
    deepest = 0
    todo = [(doc, 0)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if depth > MAX_SEQUENCE_DEPTH:
            break
        for key, element in item.items():
            if _TAG_KEY.fullmatch(key) is None or key.startswith("0000"):
                shown = key[:16].encode("ascii", "backslashreplace").decode()
                raise _InstanceError(f"{shown!r} is not a data element tag (8 hex digits)")
            if not isinstance(element, dict) or element.get("vr") != "SQ":
                continue  # a person name's value is an object too, not an item
            values = element.get("Value")
            if isinstance(values, list):
                todo.extend((v, depth + 1) for v in values if isinstance(v, dict))
    return deepest


_TAG_KEY = re.compile(r"[0-9A-Fa-f]{8}")
# Where pydicom names the element at fault: from_json ("Data element '00100020' could not
# be loaded ...") and the writer ("With tag (0010,0020) got exception ...").
_TAG_IN_MESSAGE = re.compile(
    r"^Data element '([0-9A-Fa-f]{4})([0-9A-Fa-f]{4})'"
    r"|^With tag \(([0-9A-Fa-f]{4}), ?([0-9A-Fa-f]{4})\)"
)


def _why(what: str, exc: Exception) -> str:
    """``what`` with the kind of error and the element it is about, never the error's own
    text: pydicom's messages quote the offending value (a patient's name or ID), and the
    reason is logged."""
    found = _TAG_IN_MESSAGE.search(str(exc))
    element = ""
    if found:
        group, number = (found[1], found[2]) if found[1] else (found[3], found[4])
        element = f" in ({group.upper()},{number.upper()})"
    return f"{what} ({type(exc).__name__}{element})"


def _uid(doc: dict[str, Any], tag: str) -> str:
    value = doc.get(tag, {}).get("Value") if isinstance(doc.get(tag), dict) else None
    return str(value[0]).strip() if isinstance(value, list) and value else ""


def _elements(ds: Dataset) -> Iterator[DataElement]:
    for elem in ds:
        if elem.VR == "SQ" and isinstance(elem.value, Sequence):
            for item in elem.value:
                yield from _elements(item)
        else:
            yield elem


class _SpoolWriter(io.RawIOBase):
    """A SpoolFile as the write-only binary file pydicom's writer wants."""

    def __init__(self, spool: SpoolFile) -> None:
        self.spool = spool
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.spool.write(view)
        self.pos += len(view)
        return len(view)

    def tell(self) -> int:
        return self.pos


def _write(spool: SpoolFile, ds: Dataset, syntax: UID) -> None:
    fp = DicomFileLike(_SpoolWriter(spool))
    fp.is_little_endian = True
    fp.is_implicit_VR = syntax == "1.2.840.10008.1.2"
    if syntax.is_deflated:
        raise _InstanceError("a deflated transfer syntax is not accepted for metadata uploads")
    write_dataset(fp, ds)
