"""Turn a dataset into the rows the index stores.

Values are read from the raw bytes and decoded with the dataset's Specific Character Set
(PS3.5 6.1, including ISO 2022 code extensions, PS3.5 6.1.2.5), without pydicom's value
validation: a non-conforming value is indexed as well as it can be, never refused and never
a warning. Only the four identifying UIDs are required.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.valuerep import TEXT_VR_DELIMS, PersonName

from dicomgate.errors import InvalidInstance
from dicomgate.index.schema import COLUMN_LENGTHS, SH, storable

_SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)
_DATE_RE = re.compile(r"^\d{8}$")
# Patient Module columns the study row keeps a copy of (schema.study).
STUDY_PATIENT_COLUMNS = ("patient_name", "patient_name_search", "patient_birth_date", "patient_sex")
_LEGACY_DATE_RE = re.compile(r"^(\d{4})\.(\d{2})\.(\d{2})$")  # ACR-NEMA form, PS3.5 6.2 note


@dataclass(frozen=True)
class InstanceRecord:
    """Index rows of one instance: column -> value per table, and its identifying UIDs."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]  # attributes from the dataset only
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    # Columns whose value did not decode in the declared character set (kept with U+FFFD
    # in place of what did not): the instance.stored line names them.
    undecodable: tuple[str, ...] = ()
    # (Requested Procedure ID, Scheduled Procedure Step ID) of every Request Attributes
    # Sequence item, '' for none (schema.request_attribute: sequence matching, C.2.2.2.6).
    requests: tuple[tuple[str, str], ...] = ()


def extract_record(ds: Dataset) -> InstanceRecord:
    """Read the indexed attributes of ``ds``; InvalidInstance if an identifying UID is missing."""
    encodings = _encodings(ds, [default_encoding])
    uids = {
        keyword: _uid(ds, tag, keyword)
        for keyword, tag in (
            ("StudyInstanceUID", 0x0020000D),
            ("SeriesInstanceUID", 0x0020000E),
            ("SOPInstanceUID", 0x00080018),
            ("SOPClassUID", 0x00080016),
        )
    }
    patient_name = _person_name(ds, 0x00100010, encodings)
    referring = _person_name(ds, 0x00080090, encodings)
    patient = {
        "patient_id": _text(ds, 0x00100020, encodings) or "",
        "issuer_of_patient_id": _text(ds, 0x00100021, encodings) or "",
        "patient_name": patient_name,
        "patient_name_search": search_name(patient_name),
        "patient_birth_date": _date(ds, 0x00100030),
        "patient_sex": _ascii(ds, 0x00100040),
    }
    issuer_item = _first_item(ds, 0x00080051)  # Issuer of Accession Number Sequence
    study = {
        "study_instance_uid": uids["StudyInstanceUID"],
        "study_date": _date(ds, 0x00080020),
        "study_time": _ascii(ds, 0x00080030),
        "accession_number": _text(ds, 0x00080050, encodings),
        "issuer_of_accession_number": (
            _text(issuer_item, 0x00400031, _encodings(issuer_item, encodings))  # Local Namespace
            if issuer_item is not None
            else None
        ),
        "referring_physician_name": referring,
        "referring_physician_name_search": search_name(referring),
        "study_id": _text(ds, 0x00200010, encodings),
        "study_description": _text(ds, 0x00081030, encodings),
        # The study's own copy of the Patient Module (schema.study).
        **{k: patient[k] for k in STUDY_PATIENT_COLUMNS},
    }
    request = _first_item(ds, 0x00400275)  # Request Attributes Sequence
    request_encodings = _encodings(request, encodings) if request is not None else encodings
    series = {
        "series_instance_uid": uids["SeriesInstanceUID"],
        "modality": _ascii(ds, 0x00080060),
        "series_number": _integer(ds, 0x00200011),
        "series_description": _text(ds, 0x0008103E, encodings),
        "body_part_examined": _ascii(ds, 0x00180015),
        "series_date": _date(ds, 0x00080021),
        "series_time": _ascii(ds, 0x00080031),
        "performed_procedure_step_start_date": _date(ds, 0x00400244),
        "performed_procedure_step_start_time": _ascii(ds, 0x00400245),
        "scheduled_procedure_step_id": _text(request, 0x00400009, request_encodings),
        "requested_procedure_id": _text(request, 0x00401001, request_encodings),
    }
    instance = {
        "sop_instance_uid": uids["SOPInstanceUID"],
        "sop_class_uid": uids["SOPClassUID"],
        "instance_number": _integer(ds, 0x00200013),
        "rows": _unsigned_short(ds, 0x00280010),
        "columns": _unsigned_short(ds, 0x00280011),
        "bits_allocated": _unsigned_short(ds, 0x00280100),
        "number_of_frames": _integer(ds, 0x00280008),
        "specific_character_set": _ascii(ds, _SPECIFIC_CHARACTER_SET),
    }
    rows = {
        "patient": _fit("patient", patient),
        "study": _fit("study", study),
        "series": _fit("series", series),
        "instance": _fit("instance", instance),
    }
    return InstanceRecord(
        requests=_request_items(ds, encodings),
        **rows,
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        undecodable=tuple(
            f"{table}.{column}"
            for table, row in rows.items()
            for column, value in row.items()
            if isinstance(value, str) and "\ufffd" in value and not column.endswith("_search")
        ),
    )


def search_name(name: str | None) -> str | None:
    """Return the search form of a person name: upper case, accents stripped, NFKC.

    'Buc^Jérôme' -> 'BUC^JEROME'; half-width katakana become full-width. Diacritics are
    dropped only from Latin, Greek and Cyrillic letters (a Japanese voicing mark is not an
    accent). Empty trailing components and groups are removed (PS3.5 6.2.1).
    """
    if not name:
        return None
    kept: list[str] = []
    base = ""
    for char in unicodedata.normalize("NFKD", name):
        if unicodedata.combining(char):
            if base and ord(base) < 0x0530:
                continue
        else:
            base = char
        kept.append(char)
    folded = unicodedata.normalize("NFKC", "".join(kept)).upper()
    groups = [
        "^".join(part.strip() for part in group.split("^")).rstrip("^")
        for group in folded.split("=")
    ]
    return "=".join(groups).rstrip("=") or None


def _uid(ds: Dataset, tag: int, keyword: str) -> str:
    value = _ascii(ds, tag)
    if not value:
        raise InvalidInstance(f"{keyword} is missing or empty")
    if len(value) > COLUMN_LENGTHS["instance"]["sop_instance_uid"]:
        # Truncating an identifier would merge different objects.
        raise InvalidInstance(f"{keyword} is {len(value)} characters long (PS3.5 9.1: 64 at most)")
    if _UNNAMEABLE.search(value):
        # PS3.5 9.1 allows digits and '.'. Other slips (a letter, an empty component) are
        # stored as received: a gateway forwards, it does not repair (see nameable_uid).
        # These characters could never be named in a WADO-RS path or a UID list: stored,
        # such an instance could not be retrieved (a '/' split its URL).
        raise InvalidInstance(
            f"{keyword} holds a character no UID may (PS3.5 9.1): '/', '\\', '?', '#', '%',"
            " ',', a space or a control character"
        )
    return value


_UNNAMEABLE = re.compile(r"[/\\?#%,\s\x00-\x1f\x7f]")


def nameable_uid(value: str) -> bool:
    """Whether ``value`` is a UID the gateway stores, so one a client may ask for: 1 to 64
    characters, none that a URL path or a UID list could not carry.

    Stricter than what ingest keeps would be wrong: an instance stored with a slip from
    PS3.5 9.1 (a letter, a leading zero, an empty component; old modalities write them)
    must be found by its UID in a QIDO-RS path or key, a C-FIND/C-MOVE/C-GET identifier,
    a FHIR id and a STOW-RS/folder file meta as well as it is in a WADO-RS path.
    """
    return 0 < len(value) <= 64 and _UNNAMEABLE.search(value) is None


def _fit(table: str, row: dict[str, Any]) -> dict[str, Any]:
    """Strings as ``table`` keeps them: NULs inside made spaces (:func:`storable`), cut to
    the column widths."""
    lengths = COLUMN_LENGTHS[table]
    for column, value in row.items():
        if not isinstance(value, str):
            continue
        value = storable(value)
        limit = lengths.get(column)
        if limit is not None and len(value) > limit:
            value = value[:limit].rstrip()
        row[column] = value
    return row


def _encodings(ds: Dataset, inherited: list[str]) -> list[str]:
    """Python codecs for ``ds``: its own Specific Character Set, else the enclosing one's."""
    terms = _ascii(ds, _SPECIFIC_CHARACTER_SET, first_only=False)
    if not terms:
        return inherited
    return convert_encodings(terms.split("\\"))


def _element(ds: Dataset | None, tag: int) -> RawDataElement | DataElement | None:
    if ds is None:
        return None
    return ds.get_item(tag)  # None when absent


def _raw_bytes(element: RawDataElement | DataElement) -> bytes | None:
    """The undecoded value of a raw element, or None for one pydicom already decoded."""
    if isinstance(element, RawDataElement):
        value = element.value
        return bytes(value) if value is not None else b""
    return None


def _decoded(element: DataElement) -> str | None:
    value = element.value
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(item) for item in value) or None
    if isinstance(value, bytes):
        return value.decode(default_encoding, errors="replace")
    return str(value)


def _ascii(ds: Dataset | None, tag: int, *, first_only: bool = False) -> str | None:
    """A value of a VR with the default repertoire (AE, CS, DA, TM, UI, IS)."""
    element = _element(ds, tag)
    if element is None:
        return None
    raw = _raw_bytes(element)
    if raw is None:
        if not isinstance(element, DataElement):
            return None
        text = _decoded(element)
    else:
        text = raw.decode(default_encoding, errors="replace")
    if text is None:
        return None
    if first_only:
        text = text.split("\\", 1)[0]
    text = text.strip("\0 ")
    return text or None


def _text(ds: Dataset | None, tag: int, encodings: list[str]) -> str | None:
    """A value of a text VR (SH, LO, ...), decoded with ``encodings``."""
    element = _element(ds, tag)
    if element is None:
        return None
    raw = _raw_bytes(element)
    if raw is None:
        text = _decoded(element) if isinstance(element, DataElement) else None
    else:
        text = decode_bytes(raw, encodings, TEXT_VR_DELIMS)
    if text is None:
        return None
    return text.strip("\0 ") or None


def trim_name(name: str) -> str:
    """A PN value without the trailing empty components and groups of each of its values:
    PS3.5 6.2.1.1 lets them be left out, so 'Doe^John^^^' and 'Doe^John' are one name
    (stored and matched in this form; :func:`search_name` folds further)."""
    return "\\".join(
        "=".join(group.rstrip("^") for group in value.split("=")).rstrip("=")
        for value in name.split("\\")
    )


def _person_name(ds: Dataset | None, tag: int, encodings: list[str]) -> str | None:
    """A PN value; each component group decoded on its own (PS3.5 6.1.2.5.3)."""
    element = _element(ds, tag)
    if element is None:
        return None
    raw = _raw_bytes(element)
    if raw is None:
        text = _decoded(element) if isinstance(element, DataElement) else None
    else:
        raw = raw.rstrip(b"\0 ")
        if not raw:
            return None
        name = PersonName(raw, encodings, validation_mode=pydicom_config.IGNORE)
        text = str(name)
    if text is None:
        return None
    return trim_name(text.strip("\0 ")) or None


def _date(ds: Dataset | None, tag: int) -> str | None:
    """A DA value as 'YYYYMMDD'; anything else (ranges, garbage) is not indexed."""
    text = _ascii(ds, tag, first_only=True)
    if text is None:
        return None
    if _DATE_RE.match(text):
        return text
    legacy = _LEGACY_DATE_RE.match(text)
    return "".join(legacy.groups()) if legacy else None


def _integer(ds: Dataset | None, tag: int) -> int | None:
    """An IS value; an unparsable or out-of-range one is not indexed."""
    text = _ascii(ds, tag, first_only=True)
    if text is None:
        return None
    try:
        number = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            return None
        if not as_float.is_integer():
            return None
        number = int(as_float)
    return number if -(2**31) <= number < 2**31 else None


def _unsigned_short(ds: Dataset | None, tag: int) -> int | None:
    element = _element(ds, tag)
    if element is None:
        return None
    if isinstance(element, RawDataElement):
        raw = element.value
        if not raw or len(raw) < 2:
            return None
        return int.from_bytes(raw[:2], "little" if element.is_little_endian else "big")
    value = element.value
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _request_items(ds: Dataset, encodings: list[str]) -> tuple[tuple[str, str], ...]:
    """Every Request Attributes Sequence item's (Requested Procedure ID, Scheduled Procedure
    Step ID), each cut to its column, '' for none; items with neither are left out."""
    if _element(ds, 0x00400275) is None:
        return ()
    try:
        items = ds[BaseTag(0x00400275)].value
    except (KeyError, ValueError, TypeError, NotImplementedError):
        return ()
    if not isinstance(items, DicomSequence):
        return ()
    found: dict[tuple[str, str], None] = {}
    for item in items[:64]:  # a few in practice; a bound against a hostile sequence
        item_encodings = _encodings(item, encodings)
        key = (
            (_text(item, 0x00401001, item_encodings) or "")[:SH],
            (_text(item, 0x00400009, item_encodings) or "")[:SH],
        )
        if any(key):
            found[key] = None
    return tuple(found)


def _first_item(ds: Dataset, tag: int) -> Dataset | None:
    element = _element(ds, tag)
    if element is None:
        return None
    try:
        value = ds[BaseTag(tag)].value
    except (KeyError, ValueError, TypeError, NotImplementedError):
        return None
    if isinstance(value, DicomSequence) and len(value) > 0:
        item: Dataset = value[0]
        return item
    return None
