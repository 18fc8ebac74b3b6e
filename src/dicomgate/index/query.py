"""Query matching on the index: QIDO-RS (PS3.18 8.3.4, 10.6) and C-FIND (PS3.4 C.2.2.2).

Input: a level, a mapping ``{keyword or tag: value string}`` and :class:`QueryOptions`.
Output: :class:`Match` rows that render to DICOM JSON (PS3.18 F.2) or to a pydicom
:class:`~pydicom.dataset.Dataset`. Nothing here knows about HTTP: the C-FIND SCP feeds it
the elements of its identifier (an empty value is a return key, PS3.4 C.2.2.1.1).

Matching (PS3.4 C.2.2.2), per key value:

* empty, or ``*`` alone: universal matching (the attribute is returned, nothing filtered);
* UI: single value or a UID list (``\\`` or ``,`` separated), C.2.2.2.2;
* DA and TM: single value or range ``a-b``, ``a-``, ``-b`` (C.2.2.2.5); a date and a time
  key of the same pair (StudyDate/StudyTime ...) with a range match as one datetime range
  (C.2.2.2.5.1, combined datetime matching);
* IS, US: single value;
* other strings: single value (case-sensitive), ``*`` / ``?`` wildcards (C.2.2.2.4), and a
  ``\\``-separated list of alternatives;
* PN with ``fuzzy``: case- and accent-insensitive, each word of the key is the start of a
  name component, in any order ('john doe' matches 'Doe^John', 'jer*' matches 'Buc^Jérôme').

C-FIND identifiers become keys with :func:`identifier_keys`, which flattens sequence keys
(C.2.2.2.6): a sequence with one item matches on each attribute of the item
(``RequestAttributesSequence.RequestedProcedureID``); a sequence with no item asks for
every item attribute the index holds. C-MOVE and C-GET find the files to send with
:func:`instance_files`, on the same matching.

Keys the index cannot match are reported in :attr:`QueryResult.warnings`, never silently
dropped; a key that is no DICOM attribute at all, or an unparsable value, raises
:class:`InvalidQuery`. Results come in the order of the level's surrogate key (first
arrival), so ``offset`` pages are stable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import Enum
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    String,
    and_,
    exists,
    false,
    func,
    literal_column,
    or_,
    select,
    true,
)
from sqlalchemy import exc as sa_exc

from dicomgate.errors import DicomgateError, IndexUnavailable
from dicomgate.index.extract import nameable_uid, search_name, trim_name
from dicomgate.index.schema import instance, patient, request_attribute, series, study

MAX_KEY_VALUE = 1024  # characters of one key value
MAX_LIST_ITEMS = 1000  # UIDs (or alternatives) in one key value
RETRIEVE_URL_TAG = 0x00081190


class InvalidQuery(DicomgateError):
    """A query key or value that cannot be understood (HTTP 400, C-FIND 0xA900/0xC000)."""


class Level(Enum):
    """Query/Retrieve levels (PS3.4 C.6), in hierarchy order."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class Computed(Enum):
    """Attributes the index derives instead of storing (PS3.4 C.3.4, C.6.1.1)."""

    PATIENT_STUDIES = "NumberOfPatientRelatedStudies"
    PATIENT_SERIES = "NumberOfPatientRelatedSeries"
    PATIENT_INSTANCES = "NumberOfPatientRelatedInstances"
    STUDY_SERIES = "NumberOfStudyRelatedSeries"
    STUDY_INSTANCES = "NumberOfStudyRelatedInstances"
    MODALITIES = "ModalitiesInStudy"
    SOP_CLASSES = "SOPClassesInStudy"
    SERIES_INSTANCES = "NumberOfSeriesRelatedInstances"
    AVAILABILITY = "InstanceAvailability"
    RETRIEVE_URL = "RetrieveURL"  # filled by the caller, who knows its base URL


@dataclass(frozen=True, eq=False)
class Attribute:
    """One attribute the index can match on and/or return."""

    keyword: str
    tag: int
    vr: str
    level: Level
    column: Any = None  # a Column of the level's table, or None when computed
    search: Any = None  # PN: the column holding the search form (extract.search_name)
    computed: Computed | None = None
    parent: int | None = None  # the sequence it is an item attribute of
    hex: str = ""  # the tag as the DICOM JSON key, 'GGGGEEEE'
    # A patient attribute's copy in the study row: what a search at the study level or
    # below matches and returns (PS3.4 C.6.2.1: in the Study Root model the patient
    # attributes are the study's). The patient row's column serves patient-level searches.
    study_column: Any = None
    study_search: Any = None

    def column_at(self, level: Level) -> Any:
        """The column holding this attribute for a search at ``level``."""
        if self.study_column is not None and level.value >= Level.STUDY.value:
            return self.study_column
        return self.column

    def search_at(self, level: Level) -> Any:
        """The PN search-form column for a search at ``level``."""
        if self.study_search is not None and level.value >= Level.STUDY.value:
            return self.study_search
        return self.search

    @property
    def matchable(self) -> bool:
        return self.column is not None or self.computed in (
            Computed.MODALITIES,
            Computed.SOP_CLASSES,
        )

    @property
    def key(self) -> str:
        return self.keyword if self.parent is None else f"{_KEYWORDS[self.parent]}.{self.keyword}"


_REQUEST_ATTRIBUTES = 0x00400275
_KEYWORDS = {_REQUEST_ATTRIBUTES: "RequestAttributesSequence"}


def _a(keyword: str, level: Level, column: Any = None, **extra: Any) -> Attribute:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Attribute(keyword, tag, dictionary_VR(tag), level, column, hex=f"{tag:08X}", **extra)


P, ST, SE, IM = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE
ATTRIBUTES: tuple[Attribute, ...] = (
    _a(
        "PatientName",
        P,
        patient.c.patient_name,
        search=patient.c.patient_name_search,
        study_column=study.c.patient_name,
        study_search=study.c.patient_name_search,
    ),
    _a("PatientID", P, patient.c.patient_id),
    _a("IssuerOfPatientID", P, patient.c.issuer_of_patient_id),
    _a(
        "PatientBirthDate", P, patient.c.patient_birth_date, study_column=study.c.patient_birth_date
    ),
    _a("PatientSex", P, patient.c.patient_sex, study_column=study.c.patient_sex),
    _a("NumberOfPatientRelatedStudies", P, computed=Computed.PATIENT_STUDIES),
    _a("NumberOfPatientRelatedSeries", P, computed=Computed.PATIENT_SERIES),
    _a("NumberOfPatientRelatedInstances", P, computed=Computed.PATIENT_INSTANCES),
    _a("StudyInstanceUID", ST, study.c.study_instance_uid),
    _a("StudyDate", ST, study.c.study_date),
    _a("StudyTime", ST, study.c.study_time),
    _a("AccessionNumber", ST, study.c.accession_number),
    _a(
        "ReferringPhysicianName",
        ST,
        study.c.referring_physician_name,
        search=study.c.referring_physician_name_search,
    ),
    _a("StudyID", ST, study.c.study_id),
    _a("StudyDescription", ST, study.c.study_description),
    _a("ModalitiesInStudy", ST, computed=Computed.MODALITIES),
    _a("SOPClassesInStudy", ST, computed=Computed.SOP_CLASSES),
    _a("NumberOfStudyRelatedSeries", ST, computed=Computed.STUDY_SERIES),
    _a("NumberOfStudyRelatedInstances", ST, computed=Computed.STUDY_INSTANCES),
    _a("SeriesInstanceUID", SE, series.c.series_instance_uid),
    _a("Modality", SE, series.c.modality),
    _a("SeriesNumber", SE, series.c.series_number),
    _a("SeriesDescription", SE, series.c.series_description),
    _a("BodyPartExamined", SE, series.c.body_part_examined),
    _a("SeriesDate", SE, series.c.series_date),
    _a("SeriesTime", SE, series.c.series_time),
    _a("PerformedProcedureStepStartDate", SE, series.c.performed_procedure_step_start_date),
    _a("PerformedProcedureStepStartTime", SE, series.c.performed_procedure_step_start_time),
    _a(
        "ScheduledProcedureStepID",
        SE,
        series.c.scheduled_procedure_step_id,
        parent=_REQUEST_ATTRIBUTES,
    ),
    _a("RequestedProcedureID", SE, series.c.requested_procedure_id, parent=_REQUEST_ATTRIBUTES),
    _a("NumberOfSeriesRelatedInstances", SE, computed=Computed.SERIES_INSTANCES),
    _a("SOPInstanceUID", IM, instance.c.sop_instance_uid),
    _a("SOPClassUID", IM, instance.c.sop_class_uid),
    _a("InstanceNumber", IM, instance.c.instance_number),
    _a("Rows", IM, instance.c.rows),
    _a("Columns", IM, instance.c.columns),
    _a("BitsAllocated", IM, instance.c.bits_allocated),
    _a("NumberOfFrames", IM, instance.c.number_of_frames),
    _a("AvailableTransferSyntaxUID", IM, instance.c.transfer_syntax_uid),
    # InstanceAvailability and RetrieveURL exist at every level; their level here only
    # says from which query level on they are known.
    _a("InstanceAvailability", ST, computed=Computed.AVAILABILITY),
    _a("RetrieveURL", ST, computed=Computed.RETRIEVE_URL),
)
_BY_KEY: dict[str, Attribute] = {a.key: a for a in ATTRIBUTES}
_BY_PATH: dict[tuple[int, ...], Attribute] = {
    ((a.parent, a.tag) if a.parent is not None else (a.tag,)): a for a in ATTRIBUTES
}
_UID_KEY = {ST: "StudyInstanceUID", SE: "SeriesInstanceUID", IM: "SOPInstanceUID"}

# PS3.18 Tables 6.7.1-2, -2a, -2b (TimezoneOffsetFromUTC is not kept, so never returned).
DEFAULT_RETURN: dict[Level, tuple[str, ...]] = {
    Level.PATIENT: (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
    ),
    Level.STUDY: (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "InstanceAvailability",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "RetrieveURL",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "Modality",
        "SeriesDescription",
        "RetrieveURL",
        "SeriesInstanceUID",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "RequestAttributesSequence.ScheduledProcedureStepID",
        "RequestAttributesSequence.RequestedProcedureID",
    ),
    Level.IMAGE: (
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceAvailability",
        "RetrieveURL",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ),
}

# Date/time pairs matched as one datetime range (PS3.4 C.2.2.2.5.1).
_DATETIME_PAIRS = (
    ("StudyDate", "StudyTime"),
    ("SeriesDate", "SeriesTime"),
    ("PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"),
)

_LEVEL_TABLE = {Level.PATIENT: patient, Level.STUDY: study, Level.SERIES: series, IM: instance}
_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?$")
_TAG_RE = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")
_TIME_TOP = "~"  # sorts after every TM character: 'hhmm~' is the end of minute hhmm
_INTEGER_RE = re.compile(r"^[+-]?[0-9]+$")
# An integer key outside the IS range (PS3.5 6.2: 32-bit signed; US values fit in it)
# matches nothing: no stored value can equal it, and neither SQLite (64-bit) nor a
# PostgreSQL INTEGER column can be compared with it.
INTEGER_MIN, INTEGER_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class QueryOptions:
    """How to run a query (the QIDO-RS parameters of PS3.18 8.3.4, minus the keys)."""

    fuzzy: bool = False  # fuzzymatching=true: fuzzy semantic matching of PN (C.2.2.2.1)
    # emptyvaluematching=true (PS3.18 8.3.4.5): an entity without a value for a key
    # matches it too, as well as one whose value matches.
    empty_matches: bool = False
    # A date and a time key with a range are one datetime range (PS3.4 C.2.2.2.5.1). C-FIND
    # does so only when the SCU negotiated it (C.5.1.1.2); otherwise, and for a date or
    # time alone, each is matched on its own (C.2.2.2.5).
    combined_datetime: bool = True
    limit: int | None = None  # at most this many matches (None: no limit)
    offset: int = 0  # skip this many matches first
    include: Sequence[str] = ()  # includefield: more attributes to return
    include_all: bool = False  # includefield=all: every attribute of the levels queried
    default_levels: Sequence[Level] = ()  # levels whose PS3.18 default attributes to return


@dataclass
class Match:
    """One matching entity: the returned attributes and its identifying UIDs."""

    values: dict[Attribute, Any]  # None = attribute without a value (zero length)
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None

    def get(self, keyword: str) -> Any:
        """The value of the attribute ``keyword`` (None when not returned or empty)."""
        for attribute, value in self.values.items():
            if attribute.keyword == keyword:
                return value
        return None

    def to_json(self) -> dict[str, Any]:
        """The DICOM JSON model of this match (PS3.18 F.2), keys in tag order."""
        out: dict[str, Any] = {}
        for attribute, value in self.values.items():  # in tag order (see _plan)
            if attribute.parent is None:
                out[attribute.hex] = _json_element(attribute.vr, value)
                continue
            sequence = out.setdefault(f"{attribute.parent:08X}", {"vr": "SQ"})
            if value is not None:
                item = sequence.setdefault("Value", [{}])[0]
                item[attribute.hex] = _json_element(attribute.vr, value)
        return out

    def to_dataset(self) -> Dataset:
        """The match as a C-FIND response identifier (without the Query/Retrieve Level)."""
        ds = Dataset()
        items: dict[int, Dataset] = {}
        text = ""
        for attribute, value in self.values.items():
            if attribute.computed is Computed.RETRIEVE_URL:
                continue
            target = ds
            if attribute.parent is not None:
                target = items.setdefault(attribute.parent, Dataset())
            if isinstance(value, list):
                value = [str(v) for v in value]
                text += "".join(value)
            elif isinstance(value, str):
                text += value
            target.add_new(attribute.tag, attribute.vr, value)
        for parent, item in items.items():
            ds.add_new(parent, "SQ", [item])
        if not text.isascii():
            ds.SpecificCharacterSet = "ISO_IR 192"
        return ds


@dataclass
class QueryResult:
    """The matches of one page and what the caller must tell the requester."""

    matches: list[Match]
    warnings: list[str] = field(default_factory=list)
    more: bool = False  # matches exist beyond ``limit``


def resolve_key(key: str) -> Attribute | None:
    """The attribute a query key names (keyword, tag, or ``Seq.Item`` path).

    None for a DICOM attribute the index does not hold; InvalidQuery for no attribute at all.
    """
    path: list[int] = []
    for part in key.strip().split("."):
        tag = _tag_of(part)
        if tag is None:
            raise InvalidQuery(f"unknown attribute {key!r}: not a DICOM keyword or tag")
        path.append(tag)
    return _BY_PATH.get(tuple(path))


def _item_attributes(key: str) -> list[Attribute]:
    """The item attributes the index holds of the sequence ``key`` names (keyword or tag)."""
    tag = _tag_of(key.strip()) if "." not in key else None
    return [a for a in ATTRIBUTES if tag is not None and a.parent == tag]


def _tag_of(part: str) -> int | None:
    found = _TAG_RE.match(part)
    if found:
        return int(found.group(1) + found.group(2), 16)
    tag = tag_for_keyword(part)
    return int(tag) if tag is not None else None


def attributes_at(level: Level) -> list[Attribute]:
    """Every attribute a query at ``level`` can return (its level and the levels above)."""
    return [a for a in ATTRIBUTES if a.level.value <= level.value]


def search(
    connection: Connection,
    level: Level,
    keys: Mapping[str, str],
    options: QueryOptions | None = None,
) -> QueryResult:
    """Run a query on the index; InvalidQuery for a bad key or value."""
    options = options or QueryOptions()
    plan = _plan(level, keys, options, connection.dialect.name)
    try:
        return _run(connection, plan)
    except sa_exc.OperationalError as error:
        raise IndexUnavailable(str(error.orig or error).splitlines()[0]) from error


# Not query keys in a C-FIND identifier: Specific Character Set, Query/Retrieve Level
# (PS3.4 C.4.1.1.3.1), Timezone Offset From UTC (timezone adjustment is not negotiated).
_NOT_KEYS = {0x00080005, 0x00080052, 0x00080201}


def identifier_keys(identifier: Dataset) -> dict[str, str]:
    """The query keys of a C-FIND/C-MOVE/C-GET identifier, for :func:`search`.

    Values become strings (multiple values joined with ``\\``, the DICOM separator). A
    sequence is matched by its item's attributes (PS3.4 C.2.2.2.6); more than one item is
    refused with InvalidQuery.
    """
    keys: dict[str, str] = {}
    for element in identifier:
        tag = int(element.tag)
        if tag in _NOT_KEYS or element.tag.element == 0:
            continue
        name = keyword_for_tag(tag) or f"{tag:08X}"
        if element.VR == "SQ":
            items = list(element.value or [])
            if len(items) > 1:
                raise InvalidQuery(f"{name}: a sequence key holds one item, not {len(items)}")
            if not items:
                known = [a.key for a in ATTRIBUTES if a.parent == tag]
                for key in known or [name]:
                    keys[key] = ""
                continue
            for item_element in items[0]:
                if item_element.tag.element == 0 or item_element.VR == "SQ":
                    continue
                item_tag = int(item_element.tag)
                item_name = keyword_for_tag(item_tag) or f"{item_tag:08X}"
                keys[f"{name}.{item_name}"] = _key_value(item_element.value)
            continue
        keys[name] = _key_value(element.value)
    return keys


def _key_value(value: Any) -> str:
    if value is None or isinstance(value, bytes | bytearray):
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class InstanceFile:
    """A stored instance a C-MOVE or C-GET sends (PS3.4 C.4.2, C.4.3)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    relpath: str
    size: int
    study_instance_uid: str
    series_instance_uid: str


def instance_files(connection: Connection, keys: Mapping[str, str]) -> list[InstanceFile]:
    """The current instances below every entity matching ``keys``, in arrival order."""
    plan = _plan(Level.IMAGE, keys, QueryOptions(), connection.dialect.name)
    query = (
        select(
            instance.c.sop_class_uid,
            instance.c.sop_instance_uid,
            instance.c.transfer_syntax_uid,
            instance.c.relpath,
            instance.c.size,
            study.c.study_instance_uid,
            series.c.series_instance_uid,
        )
        .select_from(_joined(Level.IMAGE))
        .where(*plan.conditions, instance.c.is_current == true())
        .order_by(instance.c.id)
    )
    try:
        return [InstanceFile(*row) for row in connection.execute(query)]
    except sa_exc.OperationalError as error:
        raise IndexUnavailable(str(error.orig or error).splitlines()[0]) from error


# -- planning ------------------------------------------------------------------------------


@dataclass
class _Plan:
    level: Level
    returned: list[Attribute]
    conditions: list[ColumnElement[bool]]
    options: QueryOptions
    warnings: list[str]


def validate(level: Level, keys: Mapping[str, str], options: QueryOptions) -> None:
    """Check every key and value as :func:`search` would (:class:`InvalidQuery`), without
    running it: for a search answered elsewhere (the bridge to an upstream server)."""
    _plan(level, keys, options, "sqlite")


def _plan(level: Level, keys: Mapping[str, str], options: QueryOptions, dialect: str) -> _Plan:
    if options.limit is not None and options.limit < 0:
        raise InvalidQuery("limit must not be negative")
    if options.offset < 0:
        raise InvalidQuery("offset must not be negative")
    warnings: list[str] = []
    returned: dict[Attribute, None] = {}
    values: dict[Attribute, str] = {}
    for key, value in keys.items():
        attribute = resolve_key(key)
        if attribute is None or attribute.level.value > level.value:
            where = "" if attribute is None else f" at the {level.name.lower()} level"
            warnings.append(f"The query key {key} is not supported{where} and was ignored.")
            continue
        if len(value) > MAX_KEY_VALUE:
            raise InvalidQuery(f"{key}: value longer than {MAX_KEY_VALUE} characters")
        returned[attribute] = None
        value = value.strip()
        if value in ("", "*"):
            continue
        if not attribute.matchable:
            warnings.append(
                f"Matching on {attribute.key} is not supported; it is returned, not matched."
            )
            continue
        values[attribute] = value
    conditions = _conditions(
        level,
        values,
        options.fuzzy,
        dialect,
        options.empty_matches,
        options.combined_datetime,
    )

    for default_level in options.default_levels:
        for name in DEFAULT_RETURN[default_level]:
            attribute = _BY_KEY[name]
            if attribute.level.value <= level.value:
                returned.setdefault(attribute, None)
    if options.include_all:
        for attribute in attributes_at(level):
            returned.setdefault(attribute, None)
    for key in options.include:
        attribute = resolve_key(key)
        items = _item_attributes(key) if attribute is None else []
        if items and all(a.level.value <= level.value for a in items):
            # A sequence named whole (includefield=RequestAttributesSequence): the item
            # attributes the index holds. It was "not available" while returned by default.
            for item in items:
                returned.setdefault(item, None)
            continue
        if attribute is None or attribute.level.value > level.value:
            warnings.append(f"The attribute {key} is not available and was not included.")
            continue
        returned.setdefault(attribute, None)
    # The unique keys of the level and the levels above identify each match (C.2.2.1.1).
    unique = [_UID_KEY[lv] for lv in (ST, SE, IM) if lv.value <= level.value] or ["PatientID"]
    for name in unique:
        returned.setdefault(_BY_KEY[name], None)
    # Tag order, an item attribute at its sequence's place: Match.to_json relies on it.
    ordered = sorted(returned, key=lambda a: (a.tag if a.parent is None else a.parent, a.tag))
    return _Plan(level, ordered, conditions, options, warnings)


def _conditions(
    level: Level,
    values: dict[Attribute, str],
    fuzzy: bool,
    dialect: str,
    empty_matches: bool = False,
    combined_datetime: bool = True,
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []

    def or_empty(condition: ColumnElement[bool], column: Any) -> ColumnElement[bool]:
        """With Empty Value Matching, also the entities that hold no value (NULL; an
        empty string in the key columns, which hold '' for none)."""
        if not empty_matches:
            return condition
        if isinstance(column.type, String):
            return or_(condition, column.is_(None), column == "")
        return or_(condition, column.is_(None))

    by_name = {a.keyword: a for a in values}
    combined: set[Attribute] = set()
    for date_key, time_key in _DATETIME_PAIRS if combined_datetime else ():
        day, time = by_name.get(date_key), by_name.get(time_key)
        if day is None or time is None:
            continue
        day_range = _date_range(values[day], day.key)
        time_range = _time_range(values[time], time.key)
        if "-" in values[day] or "-" in values[time]:
            conditions.append(
                or_empty(
                    _datetime_range(day.column, time.column, day_range, time_range), day.column
                )
            )
            combined.update((day, time))
    items = {a: v for a, v in values.items() if a.parent == _REQUEST_ATTRIBUTES}
    if items:
        conditions.append(_sequence_condition(items, fuzzy, dialect, empty_matches))
    for attribute, value in values.items():
        if attribute in combined or attribute in items:
            continue
        if attribute.computed is not None:
            conditions.append(_computed_condition(attribute, value, dialect))
        else:
            column = attribute.column_at(level)
            condition = _condition(
                attribute, column, value, fuzzy, dialect, attribute.search_at(level)
            )
            conditions.append(or_empty(condition, column))
    return conditions


def _sequence_condition(
    items: dict[Attribute, str], fuzzy: bool, dialect: str, empty_matches: bool
) -> ColumnElement[bool]:
    """Sequence matching (PS3.4 C.2.2.2.6): the series has an item of its instances'
    Request Attributes Sequence in which every key matches (``request_attribute``; the
    series row keeps only the first item of the last instance)."""
    r = request_attribute.c
    columns = {
        "RequestedProcedureID": r.requested_procedure_id,
        "ScheduledProcedureStepID": r.scheduled_procedure_step_id,
    }
    matched = exists().where(
        r.series_pk == series.c.id,
        *(_condition(a, columns[a.keyword], v, fuzzy, dialect) for a, v in items.items()),
    )
    if empty_matches:  # a series without any item matches too (PS3.18 8.3.4.5)
        return or_(matched, ~exists().where(r.series_pk == series.c.id))
    return matched


def _condition(
    attribute: Attribute,
    column: Any,
    value: str,
    fuzzy: bool,
    dialect: str,
    search: Any = None,
) -> ColumnElement[bool]:
    vr = attribute.vr
    if vr == "UI":
        return column.in_(_uid_list(attribute, value))  # type: ignore[no-any-return]
    if vr == "DA":
        low, high = _date_range(value, attribute.key)
        return _between(column, low, high)
    if vr == "TM":
        low, high = _time_range(value, attribute.key)
        return _between(column, low, high)
    if vr in ("IS", "US", "SS", "UL", "SL"):
        if not _INTEGER_RE.match(value):  # ASCII only: int() also takes '٣' and '1_0'
            raise InvalidQuery(f"{attribute.key}: {value!r} is not an integer")
        number = int(value)
        if not INTEGER_MIN <= number <= INTEGER_MAX:
            # No stored value can equal it (and the database could not compare it).
            return false()
        return column == number  # type: ignore[no-any-return]
    alternatives = _alternatives(attribute, value)
    if vr == "PN" and fuzzy:
        return or_(*(_fuzzy_name(search, v, dialect) for v in alternatives))
    if vr == "PN":  # 'Doe^John^' is 'Doe^John', the form the index holds (PS3.5 6.2.1.1)
        alternatives = [trim_name(v) for v in alternatives]
    return or_(*(_string_match(column, v, dialect) for v in alternatives))


def _computed_condition(attribute: Attribute, value: str, dialect: str) -> ColumnElement[bool]:
    """A study-level computed key, at the study level or below (a series or instance
    search filtered by its study's modalities or SOP classes). The subquery reads aliases
    of series and instance: with the tables themselves it would correlate them with the
    outer series/instance row and be left without a FROM clause."""
    of_study = _S.c.study_pk == study.c.id
    if attribute.computed is Computed.MODALITIES:
        alternatives = _alternatives(attribute, value)
        match = or_(*(_string_match(_S.c.modality, v, dialect) for v in alternatives))
        return exists(select(1).select_from(_S).where(of_study, match))
    uids = _uid_list(attribute, value)
    return exists(select(1).select_from(_S_CURRENT).where(of_study, _I.c.sop_class_uid.in_(uids)))


def _alternatives(attribute: Attribute, value: str) -> list[str]:
    parts = [part for part in value.split("\\") if part != ""]
    if len(parts) > MAX_LIST_ITEMS:
        raise InvalidQuery(f"{attribute.key}: more than {MAX_LIST_ITEMS} values")
    return parts or [""]


def _uid_list(attribute: Attribute, value: str) -> list[str]:
    uids = [uid.strip() for uid in re.split(r"[\\,]", value) if uid.strip()]
    if len(uids) > MAX_LIST_ITEMS:
        raise InvalidQuery(f"{attribute.key}: more than {MAX_LIST_ITEMS} UIDs")
    for uid in uids:
        if not nameable_uid(uid):
            raise InvalidQuery(f"{attribute.key}: {uid!r} is not a UID (PS3.5 9.1)")
    return uids


def _split_range(value: str, what: str) -> tuple[str | None, str | None, bool]:
    if value.count("-") > 1:
        raise InvalidQuery(f"{what}: {value!r} is not a value or a range")
    if "-" not in value:
        return value, value, False
    low, high = (part.strip() for part in value.split("-"))
    if not low and not high:
        raise InvalidQuery(f"{what}: {value!r} is an empty range")
    return low or None, high or None, True


def _date_range(value: str, key: str) -> tuple[str | None, str | None]:
    low, high, _ = _split_range(value, key)
    for bound in (low, high):
        if bound is not None:
            if not _DATE_RE.match(bound):
                raise InvalidQuery(f"{key}: date {bound!r} is not YYYYMMDD")
            try:
                date(int(bound[:4]), int(bound[4:6]), int(bound[6:]))
            except ValueError:
                raise InvalidQuery(f"{key}: date {bound!r} does not exist") from None
    if low is not None and high is not None and low > high:
        raise InvalidQuery(f"{key}: date range {value!r} ends before it starts")
    return low, high


def _time_range(value: str, key: str) -> tuple[str | None, str | None]:
    """TM bounds comparable with stored TM strings of any precision (PS3.5 6.2).

    A lower bound drops trailing zero components ('101500' -> '1015', which every value of
    10:15 sorts at or after); an upper bound gets a character above every TM character
    ('12' -> '12~': anything in hour 12, fractions included).
    """
    low, high, _ = _split_range(value, key)
    for bound in (low, high):
        if bound is not None and not _TIME_RE.match(bound):
            raise InvalidQuery(f"{key}: time {bound!r} is not HH[MM[SS[.FFFFFF]]]")
    if low is not None:
        low = low.split(".")[0] if set(low.partition(".")[2]) <= {"0"} else low
        while len(low) > 2 and low.endswith("00"):
            low = low[:-2]
    return low, (high + _TIME_TOP if high is not None else None)


def _between(column: Any, low: str | None, high: str | None) -> ColumnElement[bool]:
    parts = []
    if low is not None:
        parts.append(column >= low)
    if high is not None:
        parts.append(column <= high)
    return and_(*parts)


def _datetime_range(
    day: Any,
    time: Any,
    days: tuple[str | None, str | None],
    times: tuple[str | None, str | None],
) -> ColumnElement[bool]:
    """Combined datetime range of a date and a time attribute (PS3.4 C.2.2.2.5.1)."""
    parts: list[ColumnElement[bool]] = []
    (day_low, day_high), (time_low, time_high) = days, times
    if day_low is not None:
        parts.append(
            day > day_low if time_low is not None else day >= day_low,
        )
        if time_low is not None:
            parts[-1] = or_(parts[-1], and_(day == day_low, time >= time_low))
    if day_high is not None:
        parts.append(day < day_high if time_high is not None else day <= day_high)
        if time_high is not None:
            parts[-1] = or_(parts[-1], and_(day == day_high, time <= time_high))
    if day_low is None and day_high is None:
        return _between(time, time_low, time_high)
    return and_(*parts)


def _string_match(column: Any, value: str, dialect: str) -> ColumnElement[bool]:
    """Single value or wildcard matching, case-sensitive on both backends (C.2.2.2.4)."""
    if "*" not in value and "?" not in value:
        return column == value  # type: ignore[no-any-return]
    if dialect == "sqlite":  # LIKE is case-insensitive there; GLOB is not
        return column.op("GLOB")(value.replace("[", "[[]"))  # type: ignore[no-any-return]
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")  # type: ignore[no-any-return]


def _fuzzy_name(column: Any, value: str, dialect: str) -> ColumnElement[bool]:
    """Every word of ``value`` starts some component of the name, in any order."""
    words = [w for w in re.split(r"[\^=,\s]+", search_name(value.replace("^", " ")) or "") if w]
    if not words:
        return true()
    parts = []
    for word in words:
        starts = [f"{word}*", f"*^{word}*", f"* {word}*", f"*={word}*", f"*-{word}*"]
        parts.append(or_(*(_string_match(column, p, dialect) for p in starts)))
    return and_(*parts)


# -- running -------------------------------------------------------------------------------


def _run(connection: Connection, plan: _Plan) -> QueryResult:
    level, options = plan.level, plan.options
    table = _LEVEL_TABLE[level]
    stored = [a for a in plan.returned if a.column is not None]
    computed = list(
        dict.fromkeys(
            a.computed
            for a in plan.returned
            if a.computed is not None
            and a.computed not in (Computed.AVAILABILITY, Computed.RETRIEVE_URL)
        )
    )
    columns = [table.c.id.label("_pk")] + [
        a.column_at(level).label(f"c{i}") for i, a in enumerate(stored)
    ]
    uid_levels = [lv for lv in (ST, SE, IM) if lv.value <= level.value]
    columns += [_BY_KEY[_UID_KEY[lv]].column.label(f"uid{lv.value}") for lv in uid_levels]
    dialect = connection.dialect.name
    columns += [_computed_column(kind, dialect).label(kind.name) for kind in computed]

    page: Select[Any] = select(table.c.id).select_from(_joined(level)).where(*plan.conditions)
    if level is Level.IMAGE:
        page = page.where(instance.c.is_current == true())
    page = page.order_by(table.c.id)
    if options.limit is not None:
        page = page.limit(options.limit + 1)
    if options.offset:
        page = page.offset(options.offset)
    if options.limit == 0:
        page = page.where(false())
    # The page is chosen first; the computed attributes are then derived for its rows only.
    chosen = page.subquery("page")
    query = (
        select(*columns)
        .select_from(_joined(level).join(chosen, chosen.c.id == table.c.id))
        .order_by(table.c.id)
    )
    rows = connection.execute(query).all()
    more = options.limit is not None and len(rows) > options.limit
    if more:
        rows = rows[: options.limit]

    matches = []
    for row in rows:
        mapping = row._mapping
        stored_values = {a: mapping[f"c{i}"] for i, a in enumerate(stored)}
        values: dict[Attribute, Any] = {}
        for attribute in plan.returned:
            kind = attribute.computed
            if kind is None:
                values[attribute] = stored_values[attribute]
            elif kind is Computed.AVAILABILITY:
                values[attribute] = "ONLINE"
            elif kind is Computed.RETRIEVE_URL:
                values[attribute] = None
            elif kind in (Computed.MODALITIES, Computed.SOP_CLASSES):
                found = mapping[kind.name]
                values[attribute] = sorted(set(found.split(","))) if found else None
            else:
                values[attribute] = int(mapping[kind.name] or 0)
        uids = {lv: mapping[f"uid{lv.value}"] for lv in uid_levels}
        matches.append(Match(values, uids.get(ST), uids.get(SE), uids.get(IM)))
    return QueryResult(matches, list(plan.warnings), more)


def _joined(level: Level) -> Any:
    joined: Any = patient
    if level.value >= Level.STUDY.value:
        joined = study.join(patient, study.c.patient_pk == patient.c.id)
    if level.value >= Level.SERIES.value:
        joined = series.join(joined, series.c.study_pk == study.c.id)
    if level is Level.IMAGE:
        joined = instance.join(joined, instance.c.series_pk == series.c.id)
    return joined


# Aliases inside the computed-attribute subqueries, so that they correlate only with the
# outer row's study / series / patient and never with a table of the same name.
_S, _I, _ST = series.alias("sub_series"), instance.alias("sub_instance"), study.alias("sub_study")
_S_CURRENT = _S.join(_I, and_(_I.c.series_pk == _S.c.id, _I.c.is_current == true()))


def _computed_column(kind: Computed, dialect: str) -> Any:
    """A scalar subquery deriving ``kind`` for the outer row (PS3.4 C.3.4, C.6.1.1.5)."""

    def joined(values: Any) -> Any:
        if dialect == "sqlite":
            return func.group_concat(values.distinct())
        return func.string_agg(values.distinct(), literal_column("','"))

    count = func.count()
    of_study = _S.c.study_pk == study.c.id
    of_patient = _ST.c.patient_pk == patient.c.id
    query: Any
    if kind is Computed.SERIES_INSTANCES:
        query = (
            select(count)
            .select_from(_I)
            .where(_I.c.series_pk == series.c.id, _I.c.is_current == true())
        )
    elif kind is Computed.STUDY_SERIES:
        query = select(count).select_from(_S).where(of_study)
    elif kind is Computed.STUDY_INSTANCES:
        query = select(count).select_from(_S_CURRENT).where(of_study)
    elif kind is Computed.MODALITIES:
        query = select(joined(_S.c.modality)).select_from(_S).where(of_study)
    elif kind is Computed.SOP_CLASSES:
        query = select(joined(_I.c.sop_class_uid)).select_from(_S_CURRENT).where(of_study)
    elif kind is Computed.PATIENT_STUDIES:
        query = select(count).select_from(_ST).where(of_patient)
    elif kind is Computed.PATIENT_SERIES:
        query = select(count).select_from(_ST.join(_S, _S.c.study_pk == _ST.c.id)).where(of_patient)
    else:
        query = (
            select(count)
            .select_from(_ST.join(_S_CURRENT, _S.c.study_pk == _ST.c.id))
            .where(of_patient)
        )
    return query.scalar_subquery()


# -- rendering -----------------------------------------------------------------------------

_NUMBER_VRS = {"IS", "US", "SS", "UL", "SL", "UV", "SV", "DS", "FL", "FD"}


def _json_element(vr: str, value: Any) -> dict[str, Any]:
    """One attribute in the DICOM JSON model (PS3.18 F.2.2 - F.2.3)."""
    if value is None or value == "" or value == []:
        return {"vr": vr}
    if vr == "PN":
        # One object per value, of its non-empty groups; an empty value among others is
        # null (PS3.18 F.2.2, F.2.5).
        names = value if isinstance(value, list) else str(value).split("\\")
        out: list[dict[str, str] | None] = []
        for name in names:
            groups = str(name).split("=")
            person = {label: g for label, g in zip(_PN_GROUPS, groups, strict=False) if g}
            out.append(person or None)
        return {"vr": vr, "Value": out}
    if isinstance(value, list):
        values = value
    elif isinstance(value, str):
        values = value.split("\\") if "\\" in value else [value]
    else:
        values = [value]
    if vr in _NUMBER_VRS:
        kind = float if vr in ("DS", "FL", "FD") else int
        return {"vr": vr, "Value": [kind(v) for v in values]}
    return {"vr": vr, "Value": values}


_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


__all__ = [
    "ATTRIBUTES",
    "DEFAULT_RETURN",
    "Attribute",
    "Computed",
    "InstanceFile",
    "InvalidQuery",
    "Level",
    "Match",
    "QueryOptions",
    "QueryResult",
    "attributes_at",
    "identifier_keys",
    "instance_files",
    "resolve_key",
    "search",
    "validate",
]
