"""``deidentify``: the PS3.15 Annex E Basic Application Level Confidentiality Profile.

Every attribute of the data set, at every depth of every sequence, gets the action that
PS3.15 Table E.1-1 (the generated :mod:`dicomgate.processing.ps315_tables`, edition in
``EDITION``) gives it, changed by the chosen options (PS3.15 E.3):

* ``X`` remove, ``Z`` zero length, ``D`` a dummy value of the same VR, ``K`` keep,
  ``U`` a consistent replacement UID, ``C`` clean (dates shifted, free text scrubbed of
  the patient's identifiers, sequences cleaned item by item);
* the compound actions (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) keep the
  attribute (zero length, or a dummy when it had a value, so a Type 1 attribute stays
  valid) -- the output must stay a valid instance of its IOD;
* an attribute without a row of its own inside a sequence being replaced (D) or cleaned
  (C, U*) gets a dummy or is cleaned too (coded values, numbers and structure stay), and
  every instance UID is mapped, listed or not (see :meth:`Deidentify._inherit`);
* private attributes are removed, except the configured safe ones with
  ``retain_safe_private``; curves (50xx) and overlays (60xx) are removed whole unless
  ``clean_graphics``.

UIDs become ``2.25.<HMAC-SHA256(secret, uid) as a UUID>``: the same input UID gives the
same output UID in every instance, run and node that share the secret, references
(ReferencedSOPInstanceUID, FrameOfReferenceUID, ...) included, so a study stays coherent.
PatientID/PatientName become a keyed pseudonym or come from a lookup table. Instances
whose pixels may carry burned-in text are masked by a configured rule or refused
(``burned_in_annotation``); they are never sent on silently.
"""

from __future__ import annotations

import csv
import datetime as dt
import fnmatch
import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydicom import Dataset
from pydicom import config as pydicom_config
from pydicom._dicom_dict import DicomDictionary
from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomgate import __version__
from dicomgate.models import ConfigModel
from dicomgate.observability.logging import uid_hash
from dicomgate.processing import ps315_tables as table
from dicomgate.processing.base import ProcessingError, Step, StepContext

__all__ = ["Deidentify", "DeidentifyConfig"]

Option = Literal[
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_full_dates",
    "retain_longitudinal_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
]

_PRIVATE_RE = re.compile(r"^(?P<creator>[^,]+),(?P<group>[0-9A-Fa-f]{4}),(?P<elem>[0-9A-Fa-f]{2})$")


class MaskMatch(ConfigModel):
    """Which instances a mask rule applies to (all given keys must match)."""

    Manufacturer: str | None = Field(
        None, description="Manufacturer (0008,0070); shell wildcards * and ? allowed."
    )
    ManufacturerModelName: str | None = Field(
        None, description="Manufacturer's Model Name (0008,1090); wildcards allowed."
    )
    Rows: int | None = Field(None, ge=1, description="Rows (0028,0010) of the image.")
    Columns: int | None = Field(None, ge=1, description="Columns (0028,0011) of the image.")


class MaskRule(ConfigModel):
    """Black rectangles painted over the pixels of matching instances."""

    match: MaskMatch = Field(
        default_factory=MaskMatch,
        description="Manufacturer / ManufacturerModelName / Rows / Columns to match.",
    )
    rectangles: list[tuple[int, int, int, int]] = Field(
        min_length=1,
        description="Areas to black out, each [x, y, width, height] in pixels from the top "
        "left corner (clipped to the image).",
    )

    @field_validator("rectangles")
    @classmethod
    def _sizes(cls, value: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        for x, y, w, h in value:
            if x < 0 or y < 0 or w <= 0 or h <= 0:
                raise ValueError("a rectangle is [x, y, width, height] with x, y >= 0, w, h > 0")
        return value


class BurnedInConfig(ConfigModel):
    """What to do with pixel data that may show the patient's identity."""

    assume_for: list[str] = Field(
        default_factory=lambda: ["US", "SC"],
        description="Modalities treated as carrying burned-in text whatever their "
        "BurnedInAnnotation says; US and SC also cover their SOP classes (Ultrasound, "
        "Secondary Capture). An empty list trusts BurnedInAnnotation alone.",
    )
    masks: list[MaskRule] = Field(
        default_factory=list,
        description="Mask rules; the first that matches is applied. An instance with "
        "burned-in text that no rule matches is refused (dead-letter reason "
        "burned_in_annotation).",
    )


class DeidentifyConfig(ConfigModel):
    """Settings of the ``deidentify`` step."""

    profile: Literal["basic"] = Field(
        "basic",
        description="The PS3.15 Annex E profile: basic (Basic Application Level "
        "Confidentiality Profile), the only one.",
    )
    options: list[Option] = Field(
        default_factory=list,
        description="PS3.15 E.3 options: retain_safe_private, retain_uids, "
        "retain_device_identity, retain_institution_identity, "
        "retain_patient_characteristics, retain_longitudinal_full_dates, "
        "retain_longitudinal_modified_dates (dates shifted per patient), clean_descriptors, "
        "clean_structured_content, clean_graphics.",
    )
    secret_env: str | None = Field(
        None,
        description="Name of the environment variable holding the secret key (16 characters "
        "or more) for UIDs, pseudonyms and date shifts. Required unless retain_uids is set "
        "and neither pseudonyms: hmac nor modified dates are used. Never logged.",
    )
    pseudonyms: Literal["hmac", "table", "empty"] = Field(
        "hmac",
        description="PatientID and PatientName: hmac = keyed pseudonym (prefix + 16 hex "
        "digits, the same for the same PatientID everywhere); table = from lookup_table "
        "(a patient missing from it is refused); empty = zero length.",
    )
    pseudonym_prefix: str = Field(
        "ANON", max_length=32, description="Prefix of hmac pseudonyms (e.g. a project code)."
    )
    lookup_table: str | None = Field(
        None,
        description="CSV file for pseudonyms: table: original PatientID, pseudonym "
        "PatientID, optional pseudonym PatientName; an optional header row starts with "
        "'original' or 'PatientID'. Relative to the config file's folder.",
    )
    max_date_shift_days: int = Field(
        3650,
        ge=1,
        le=36500,
        description="retain_longitudinal_modified_dates: dates move back by 1 to this many "
        "days, one offset per patient (from the secret and PatientID), the same in all of "
        "the patient's studies.",
    )
    safe_private: list[str] = Field(
        default_factory=list,
        description='Private attributes kept with retain_safe_private, as "CREATOR,gggg,ee" '
        '(e.g. "SIEMENS MR HEADER,0019,0C"); every other private attribute is removed.',
    )
    burned_in: BurnedInConfig = Field(
        default_factory=BurnedInConfig,
        description="Burned-in annotation handling: assume_for and masks.",
    )

    @field_validator("safe_private")
    @classmethod
    def _private_keys(cls, value: list[str]) -> list[str]:
        for item in value:
            m = _PRIVATE_RE.match(item.strip())
            if m is None or not int(m["group"], 16) & 1:
                raise ValueError(f'{item!r}: expected "CREATOR,gggg,ee" with an odd group')
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DeidentifyConfig:
        dates = {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"}
        if dates <= set(self.options):
            raise ValueError("options: choose full dates or modified dates, not both")
        if len(set(self.options)) != len(self.options):
            raise ValueError("options: an option is listed twice")
        if self.pseudonyms == "table" and not self.lookup_table:
            raise ValueError("lookup_table: required with pseudonyms: table")
        if self.lookup_table and self.pseudonyms != "table":
            raise ValueError("lookup_table: only used with pseudonyms: table")
        if self.safe_private and "retain_safe_private" not in self.options:
            raise ValueError("safe_private: only used with the retain_safe_private option")
        return self


# --------------------------------------------------------------------------- actions

# Resolved operations (one per tag, decided when the step is built).
_REMOVE, _EMPTY, _DUMMY, _DUMMY_OR_EMPTY, _UID, _UID_OR_EMPTY, _CLEAN, _SHIFT, _KEEP = range(9)
#: An instance UID the table does not list (e.g. MultiFrameSourceSOPInstanceUID): mapped
#: like ``U`` so that it neither leaks the original nor breaks a reference.
_UID_REF = 9
_OPS = {
    "X": _REMOVE,
    "Z": _EMPTY,
    "D": _DUMMY,
    "K": _KEEP,
    "C": _CLEAN,
    "U": _UID,
    # Compound actions keep the attribute so that the IOD stays valid (PS3.15 E.1.1 lets
    # the de-identifier choose; removal could break a Type 1 or Type 2 attribute).
    "X/Z": _EMPTY,
    "X/D": _DUMMY,
    "Z/D": _DUMMY_OR_EMPTY,
    "X/Z/D": _DUMMY_OR_EMPTY,
    "X/Z/U*": _UID_OR_EMPTY,
}
#: Options whose "C" means "dates moved" (PS3.15 E.3.6) rather than "text cleaned".
_DATE_OPTIONS = frozenset({"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"})

#: Dummy values per VR (PS3.5 6.2); binary VRs get no bytes.
_DUMMIES: dict[str, Any] = {
    "AE": "ANONYMOUS",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UR": "urn:anonymized",
    "UT": "ANONYMIZED",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
}
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_STRING_VRS = _TEXT_VRS | {"AS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"}
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: VRs an inherited action leaves alone: coded enumerations, ages and numbers.
_KEPT_VRS = frozenset(
    {"CS", "AS", "DS", "IS", "AT", "FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"}
)

_PATIENT_ID = BaseTag(0x00100020)
_PATIENT_NAME = BaseTag(0x00100010)
_MODALITY = BaseTag(0x00080060)
_SOP_CLASS_UID = BaseTag(0x00080016)
_BURNED_IN = BaseTag(0x00280301)
_PIXEL_DATA = (BaseTag(0x7FE00010), BaseTag(0x7FE00008), BaseTag(0x7FE00009))

#: SOP classes of the burned-in families (PS3.4 B.5): Ultrasound and Secondary Capture.
_FAMILIES = {
    "US": ("1.2.840.10008.5.1.4.1.1.6.", "1.2.840.10008.5.1.4.1.1.3.1"),
    "SC": ("1.2.840.10008.5.1.4.1.1.7",),
}


#: UI attributes that name a class, syntax or standard resource, not an instance: kept.
_KEPT_UID_KEYWORDS = re.compile(
    r"Class|TransferSyntax|CodingScheme|ContextGroupExtensionCreator|^ContextUID$|"
    r"MappingResource|CreatorVersion|PrivateInformationCreator|SegmentationTemplate"
)


@functools.cache
def _kept_uid_tags() -> frozenset[int]:
    """Public UI attributes naming a SOP class, transfer syntax, coding scheme, ..."""
    return frozenset(
        tag
        for tag, entry in DicomDictionary.items()
        if entry[0] == "UI" and _KEPT_UID_KEYWORDS.search(entry[4])
    )


@functools.cache
def _untabled_instance_uids() -> frozenset[int]:
    """Public UI attributes that Table E.1-1 does not list and that hold instance UIDs
    (references, frames of reference, ...), from the data dictionary."""
    return frozenset(
        tag
        for tag, entry in DicomDictionary.items()
        if entry[0] == "UI"
        and tag not in table.BASIC_PROFILE
        and tag >> 16 != 0x0002
        and tag not in _kept_uid_tags()
    )


@functools.cache
def _sequence_tags() -> frozenset[int]:
    """Every public tag whose dictionary VR is SQ (to recurse without decoding)."""
    return frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")


def _vr_of(elem: DataElement | RawDataElement, tag: int) -> str:
    vr = elem.VR
    if vr and vr not in ("UN", "OB or OW", "US or SS", "US or OW", "US or SS or OW"):
        return str(vr)
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return str(vr or "UN")


def _element(tag: BaseTag, vr: str, value: Any) -> DataElement:
    # Our values are valid for their VR by construction: skip pydicom's per-value checks.
    return DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE)


def compile_actions(options: Iterable[str]) -> tuple[dict[int, int], list[tuple[int, int, int]]]:
    """(tag -> operation, [(mask, value, operation)] for repeating groups) of the Basic
    Profile with ``options``; where two options disagree, C (clean) wins over K (keep)."""
    chosen = set(options)
    ops = {tag: _OPS[action] for tag, action in table.BASIC_PROFILE.items()}
    overrides: dict[int, int] = {}
    for option in sorted(chosen):
        for tag, action in table.OPTIONS.get(option, {}).items():
            op = _SHIFT if action == "C" and option in _DATE_OPTIONS else _OPS[action]
            if overrides.get(tag) not in (_CLEAN, _SHIFT):
                overrides[tag] = op
    ops.update(overrides)
    if "retain_uids" not in chosen:
        ops.update(dict.fromkeys(_untabled_instance_uids() - ops.keys(), _UID_REF))
    groups = [(mask, value, _OPS[action]) for mask, value, action, _ in table.BASIC_PROFILE_GROUPS]
    for option, mask, value, action in table.OPTION_GROUPS:
        if option in chosen:
            groups = [
                (m, v, _OPS[action]) if (m, v) == (mask, value) else (m, v, o) for m, v, o in groups
            ]
    return ops, groups


# --------------------------------------------------------------------------- the step


class _Instance:
    """What processing one data set needs to remember (its date shift, scrub pattern)."""

    __slots__ = ("date_shift", "scrub")

    def __init__(self) -> None:
        self.date_shift: dt.timedelta | None = None
        self.scrub: re.Pattern[str] | None = None


class Deidentify(Step):
    """PS3.15 Basic Application Level Confidentiality Profile with options."""

    name: ClassVar[str] = "deidentify"
    Config: ClassVar[type[DeidentifyConfig]] = DeidentifyConfig

    def __init__(self, config: DeidentifyConfig, context: StepContext) -> None:
        super().__init__(config, context)
        self.config: DeidentifyConfig = config
        opts = set(config.options)
        self._opts = opts
        self._ops, self._groups = compile_actions(opts)
        overlay_data = next(op for _, value, op in self._groups if value == 0x60003000)
        self._overlay_rest = _REMOVE if overlay_data == _REMOVE else _KEEP
        self._scrubs = _CLEAN in self._ops.values() or any(o == _CLEAN for *_, o in self._groups)
        self._modified_dates = "retain_longitudinal_modified_dates" in opts
        self._full_dates = "retain_longitudinal_full_dates" in opts
        self._safe_private = {
            (m["creator"].strip(), int(m["group"], 16), int(m["elem"], 16))
            for m in (_PRIVATE_RE.match(s.strip()) for s in config.safe_private)
            if m is not None
        }
        secret = context.environ.get(config.secret_env) if config.secret_env else None
        self._key = secret.encode("utf-8") if secret else None
        self._mac = hmac.new(self._key or b"", digestmod=hashlib.sha256)
        self.map_uid: Callable[[str], str] = functools.lru_cache(maxsize=1 << 16)(self._new_uid)
        self._table: dict[str, tuple[str, str]] | None = None
        order = list(table.METHOD_CODES)
        self._codes = [table.METHOD_CODES["basic"]] + [
            table.METHOD_CODES[o] for o in sorted(opts, key=order.index)
        ]

    # -- start-up checks ------------------------------------------------------------------

    def _needs_secret(self) -> bool:
        return (
            "retain_uids" not in self._opts
            or self.config.pseudonyms == "hmac"
            or self._modified_dates
        )

    def check(self) -> None:
        cfg = self.config
        if self._needs_secret():
            if not cfg.secret_env:
                raise ValueError("secret_env: required (names the variable holding the key)")
            if self._key is None:
                raise ValueError(f"secret_env: environment variable {cfg.secret_env} is not set")
            if len(self._key) < 16:
                raise ValueError(f"secret_env: the key in {cfg.secret_env} is shorter than 16")
        if cfg.pseudonyms == "table":
            self._load_table()

    def _load_table(self) -> dict[str, tuple[str, str]]:
        if self._table is not None:
            return self._table
        path = Path(self.config.lookup_table or "")
        if not path.is_absolute():
            path = self.context.base_dir / path
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ValueError(f"lookup_table: cannot read {path}: {exc.strerror}") from None
        rows: dict[str, tuple[str, str]] = {}
        for n, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not "".join(row).strip():
                continue
            if n == 1 and row[0].strip().lower() in ("original", "patientid", "patient_id"):
                continue
            if len(row) not in (2, 3) or not row[0].strip() or not row[1].strip():
                raise ValueError(
                    f"lookup_table: {path.name} line {n}: expected original,pseudonym[,name]"
                )
            pid = row[1].strip()
            name = row[2].strip() if len(row) == 3 and row[2].strip() else pid
            rows[row[0].strip()] = (pid, name)
        if not rows:
            raise ValueError(f"lookup_table: {path.name} has no rows")
        self._table = rows
        return rows

    # -- keyed values ---------------------------------------------------------------------

    def _digest(self, purpose: bytes, value: str) -> bytes:
        mac = self._mac.copy()
        mac.update(purpose + b"\x00" + value.encode("utf-8", "surrogateescape"))
        return mac.digest()

    def _new_uid(self, uid: str) -> str:
        """``2.25.`` + the HMAC as a UUID (version 8, RFC 9562 variant), PS3.5 B.2."""
        raw = bytearray(self._digest(b"uid", uid.strip("\x00 "))[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80
        raw[8] = (raw[8] & 0x3F) | 0x80
        return f"2.25.{int.from_bytes(raw, 'big')}"

    def _pseudonym(self, patient_id: str) -> tuple[str, str]:
        """(PatientID, PatientName) replacing ``patient_id``."""
        mode = self.config.pseudonyms
        if mode == "empty":
            return "", ""
        if mode == "table":
            found = self._load_table().get(patient_id)
            if found is None:
                raise ProcessingError(
                    "patient_not_in_lookup_table",
                    f"PatientID {uid_hash(patient_id)} (sha256 prefix) is not in "
                    f"{Path(self.config.lookup_table or '').name}",
                )
            return found
        if not patient_id:
            return "", ""
        token = self._digest(b"patient", patient_id).hex()[:16].upper()
        value = f"{self.config.pseudonym_prefix}{token}"
        return value, value

    def _date_shift(self, patient_id: str) -> dt.timedelta:
        n = int.from_bytes(self._digest(b"date-shift", patient_id)[:8], "big")
        return dt.timedelta(days=1 + n % self.config.max_date_shift_days)

    # -- the step -------------------------------------------------------------------------

    def apply(self, ds: Dataset) -> list[Dataset]:
        masked = self._burned_in(ds)
        state = _Instance()
        patient_id = _first(ds, _PATIENT_ID)
        new_id, new_name = self._pseudonym(patient_id)
        if self._modified_dates:
            state.date_shift = self._date_shift(patient_id)
        if self._scrubs:
            state.scrub = _scrub_pattern(ds)
        self._walk(ds, state)
        raw = ds._dict
        if _PATIENT_ID in raw:
            raw[_PATIENT_ID] = _element(_PATIENT_ID, "LO", new_id)
        if _PATIENT_NAME in raw:
            raw[_PATIENT_NAME] = _element(_PATIENT_NAME, "PN", new_name)
        self._mark(ds, masked)
        return [ds]

    def _walk(self, ds: Dataset, state: _Instance, inherited: int | None = None) -> None:
        """Apply the actions to every element of ``ds`` and, recursively, of its items.

        ``inherited`` is the action of the enclosing sequence (``_DUMMY`` or ``_CLEAN``)
        when one of them is being replaced or cleaned: an attribute inside it that the
        table does not list (TextValue in a ContentSequence, CodeValue in a
        PersonIdentificationCodeSequence, UnformattedTextValue in a GraphicAnnotation
        Sequence, ...) gets that action too instead of passing through unchanged."""
        ops = self._ops
        sequences = _sequence_tags()
        raw = ds._dict  # elements as read: values we keep are never decoded
        for tag in list(raw):
            group = tag >> 16
            if group & 1:
                self._private(ds, tag)
                continue
            op = ops.get(tag)
            if op is None and 0x5000 <= group <= 0x60FF:
                op = self._repeating_op(tag)
            if op is None and tag not in DicomDictionary and not 0x5000 <= group <= 0x60FF:
                # A public attribute no dictionary we have knows (a later edition's, or a
                # sender's invention): it cannot be shown to be safe, so it goes, as the
                # Basic Profile removes what may identify (PS3.15 E.2).
                del raw[tag]
                continue
            if op is None and inherited is not None:
                self._inherit(ds, tag, inherited, state)
                continue
            if op is None or op == _KEEP:
                if tag in sequences or raw[tag].VR == "SQ":
                    for item in ds[tag].value:
                        self._walk(item, state, inherited)
                continue
            self._act(ds, tag, op, state)

    def _repeating_op(self, tag: int) -> int | None:
        """Curves (50xx) and overlays (60xx): the table's rule, else an overlay plane's
        other attributes go with its Overlay Data (a plane without data is invalid)."""
        for mask, value, op in self._groups:
            if tag & mask == value:
                return op
        if tag >> 24 == 0x60 and (tag >> 16) & 0xFF <= 0x1E:
            return self._overlay_rest
        return None

    def _act(self, ds: Dataset, tag: BaseTag, op: int, state: _Instance) -> None:
        raw = ds._dict
        elem = raw[tag]
        if op == _REMOVE:
            del raw[tag]
            return
        vr = _vr_of(elem, tag)
        if vr == "SQ":
            if op == _EMPTY:
                raw[tag] = _element(tag, "SQ", Sequence())
            else:  # D, C, U*: keep the items, each attribute in them gets its own action
                # A reference sequence (U*) keeps its content like a cleaned one.
                inner = _DUMMY if op in (_DUMMY, _DUMMY_OR_EMPTY) else _CLEAN
                for item in ds[tag].value:
                    self._walk(item, state, inner)
            return
        if op == _EMPTY or (op in (_DUMMY_OR_EMPTY, _UID_OR_EMPTY) and _is_empty(elem)):
            raw[tag] = _element(tag, vr, "" if vr in _STRING_VRS else None)
        elif vr == "UI" and op != _CLEAN and op != _SHIFT:
            self._map_uids(raw, tag, elem)
        elif op in (_DUMMY, _DUMMY_OR_EMPTY, _UID, _UID_OR_EMPTY):
            raw[tag] = _element(tag, vr, _DUMMIES.get(vr))
        elif op == _SHIFT:
            if state.date_shift is not None and vr in ("DA", "DT"):
                days = [_shift(v, vr, state.date_shift) for v in _strings(elem)]
                raw[tag] = _element(tag, vr, days[0] if len(days) == 1 else days)
        elif op == _UID_REF:
            pass  # an instance-UID attribute written with another VR: left as it is
        elif vr in _TEXT_VRS:  # _CLEAN of free text
            if state.scrub is not None:
                self._scrub_text(ds, tag, vr, state.scrub)
        elif op == _CLEAN and vr in _BINARY_VRS and not 0x5000 <= (tag >> 16) <= 0x60FF:
            # A binary or unknown value (Maker Note, OB/OW/UN) under a cleaning option: no
            # way to clean it of identifying information, so it goes (PS3.15 E.1-1 "C").
            # Curve and overlay data stay with clean_graphics (docs/processing.md).
            del raw[tag]

    def _inherit(self, ds: Dataset, tag: BaseTag, inherited: int, state: _Instance) -> None:
        """An attribute the table does not list, inside a sequence being replaced with
        dummies (``_DUMMY``) or cleaned (``_CLEAN``).

        Coded enumerations (CS) and numbers stay, so the structure of a content tree or
        graphic annotation still parses; UIDs are mapped (kept with retain_uids); dates
        and times follow the temporal option; free text becomes a dummy (``_DUMMY``) or is
        scrubbed of the patient's identifiers (``_CLEAN``); binary and unknown (UN)
        values are emptied, as they cannot be cleaned."""
        raw = ds._dict
        elem = raw[tag]
        vr = _vr_of(elem, tag)
        if vr == "SQ":
            for item in ds[tag].value:
                self._walk(item, state, inherited)
        elif vr in _KEPT_VRS or _is_empty(elem):
            return
        elif vr == "UI":
            if "retain_uids" not in self._opts and tag not in _kept_uid_tags():
                self._map_uids(raw, tag, elem)
        elif vr in ("DA", "DT", "TM"):
            if self._full_dates:
                return
            if state.date_shift is not None:
                if vr != "TM":
                    days = [_shift(v, vr, state.date_shift) for v in _strings(elem)]
                    raw[tag] = _element(tag, vr, days[0] if len(days) == 1 else days)
            else:
                raw[tag] = _element(tag, vr, _DUMMIES[vr])
        elif vr in _TEXT_VRS or vr == "UR":
            if inherited == _CLEAN:
                if state.scrub is not None:
                    self._scrub_text(ds, tag, vr, state.scrub)
            else:
                raw[tag] = _element(tag, vr, _DUMMIES[vr])
        elif vr == "UN" or inherited == _DUMMY:
            raw[tag] = _element(tag, vr, None)

    def _map_uids(self, raw: MutableMapping[BaseTag, Any], tag: BaseTag, elem: Any) -> None:
        """Each value replaced by its keyed UID; well-known (registered) UIDs stay."""
        uids = [self.map_uid(v) if v and v not in UID_dictionary else v for v in _strings(elem)]
        raw[tag] = _element(tag, "UI", uids[0] if len(uids) == 1 else uids)

    @staticmethod
    def _scrub_text(ds: Dataset, tag: BaseTag, vr: str, pattern: re.Pattern[str]) -> None:
        if vr == "PN":
            # A person's name is identifying whoever it names: replaced, not scrubbed (a
            # PersonName iterates over its characters, which were kept one by one).
            ds._dict[tag] = _element(tag, vr, _DUMMIES["PN"])
            return
        value = ds[tag].value  # decoded with the data set's character set
        if isinstance(value, MultiValue | list | tuple):
            ds._dict[tag] = _element(tag, vr, [_scrub(str(v), pattern) for v in value])
        elif value is not None:
            ds._dict[tag] = _element(tag, vr, _scrub(str(value), pattern))

    def _private(self, ds: Dataset, tag: BaseTag) -> None:
        """Private attributes go unless retain_safe_private lists them (PS3.15 E.3.10)."""
        if self._safe_private:
            group, elem = tag >> 16, tag & 0xFFFF
            if 0x10 <= elem <= 0xFF:  # a private creator: kept while a safe block uses it
                creator = _first(ds, tag)
                if any(c == creator and g == group for c, g, _ in self._safe_private):
                    return
            elif elem >= 0x1000:
                creator = _first(ds, BaseTag((group << 16) | (elem >> 8)))
                if (creator, group, elem & 0xFF) in self._safe_private:
                    return
        del ds[tag]

    def _mark(self, ds: Dataset, masked: bool) -> None:
        """PS3.15 E.1.1: say what was done (PatientIdentityRemoved, method, codes)."""
        codes = list(self._codes)
        if masked:
            codes.insert(1, ("113101", "Clean Pixel Data Option"))
        methods = [
            f"PS3.15-{table.EDITION} Basic Application Level Confidentiality Profile",
            *(meaning for _, meaning in codes[1:]),
            f"dicomgate {__version__}",
        ]
        items = []
        for value, meaning in codes:
            item = Dataset()
            item._dict[_CODE_VALUE] = _element(_CODE_VALUE, "SH", value)
            item._dict[_CODING_SCHEME] = _element(_CODING_SCHEME, "SH", "DCM")
            item._dict[_CODE_MEANING] = _element(_CODE_MEANING, "LO", meaning)
            items.append(item)
        if self._modified_dates:
            temporal = "MODIFIED"
        else:
            temporal = "UNMODIFIED" if self._full_dates else "REMOVED"
        raw = ds._dict
        raw[_IDENTITY_REMOVED] = _element(_IDENTITY_REMOVED, "CS", "YES")
        raw[_METHOD] = _element(_METHOD, "LO", methods)
        raw[_METHOD_CODES] = _element(_METHOD_CODES, "SQ", Sequence(items))
        raw[_TEMPORAL] = _element(_TEMPORAL, "CS", temporal)
        if masked:
            raw[_BURNED_IN] = _element(_BURNED_IN, "CS", "NO")

    # -- burned-in annotation -------------------------------------------------------------

    def _burned_in(self, ds: Dataset) -> bool:
        """Mask the pixels when they may show text; True when masked. Refuses the instance
        (``burned_in_annotation``) when no mask rule matches (PS3.15 E.1.1: the Basic
        Profile requires pixel data without burned-in identification)."""
        raw = ds._dict
        if not any(t in raw for t in _PIXEL_DATA):
            return False
        if _first(ds, _BURNED_IN).upper() == "YES":
            why: str | None = "BurnedInAnnotation YES"
        else:
            why = self._assumed(ds)
        if why is None:
            return False
        for rule in self.config.burned_in.masks:
            if _matches(rule.match, ds):
                _mask_pixels(ds, rule.rectangles)
                return True
        raise ProcessingError(
            "burned_in_annotation",
            f"the pixel data may show burned-in text ({why}) and no mask rule matches it",
        )

    def _assumed(self, ds: Dataset) -> str | None:
        """Which ``assume_for`` entry covers ``ds`` (by its Modality, or by its SOP class
        for US and SC), said for the refusal message; None when none does."""
        modality = _first(ds, _MODALITY).upper()
        sop_class = _first(ds, _SOP_CLASS_UID)
        for family in self.config.burned_in.assume_for:
            family = family.strip().upper()
            if modality == family:
                return f"Modality {family}, listed in burned_in.assume_for"
            if any(sop_class.startswith(p) for p in _FAMILIES.get(family, ())):
                name = UID(sop_class).name
                return f"SOP class {name}, covered by {family} in burned_in.assume_for"
        return None


_CODE_VALUE = BaseTag(0x00080100)
_CODING_SCHEME = BaseTag(0x00080102)
_CODE_MEANING = BaseTag(0x00080104)
_IDENTITY_REMOVED = BaseTag(0x00120062)
_METHOD = BaseTag(0x00120063)
_METHOD_CODES = BaseTag(0x00120064)
_TEMPORAL = BaseTag(0x00280303)


# --------------------------------------------------------------------------- helpers


def _strings(elem: DataElement | RawDataElement) -> list[str]:
    """The values of an ASCII-valued element (UI, DA, DT, CS...) without pydicom's
    conversion of the whole element."""
    value = elem.value
    if value is None:
        return []
    if isinstance(value, bytes):
        text = value.decode("latin-1").rstrip("\x00 ")
        return [v.strip() for v in text.split("\\")] if text else []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    return [str(v).strip() for v in value]


def _first(ds: Dataset, tag: BaseTag) -> str:
    """The first value of a top-level string element, '' when absent or empty."""
    elem = ds._dict.get(tag)
    if elem is None:
        return ""
    values = _strings(elem)
    return values[0] if values else ""


def _is_empty(elem: DataElement | RawDataElement) -> bool:
    if isinstance(elem, RawDataElement):
        return not elem.length
    return bool(elem.is_empty)


def _shift(value: str, vr: str, delta: dt.timedelta) -> str:
    """A date (DA) or the date part of a date-time (DT) moved back by ``delta``; a value
    that is not a full date cannot be shifted and becomes empty."""
    try:
        day = dt.date(int(value[0:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return ""
    shifted = (day - delta).strftime("%Y%m%d")
    return shifted + value[8:] if vr == "DT" else shifted


_SCRUB_NAMES = (
    "PatientName",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
)
_SCRUB_VALUES = (
    "PatientID",
    "OtherPatientIDs",
    "AccessionNumber",
    "PatientBirthDate",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "MedicalRecordLocator",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "InstitutionName",
    "InstitutionAddress",
)


def _scrub_pattern(ds: Dataset) -> re.Pattern[str] | None:
    """The patient's identifiers as this data set spells them (names, IDs, birth date,
    accession number, institution), to remove from the free text that an option keeps.

    Three characters or more are removed wherever they stand; shorter ASCII ones (a name
    'Li', an ID 'P7') only as whole words, so that they do not cut other words apart; a
    name in another script (山田) at any length, as such text has no spaces between words.
    Dates are also removed as people write them: 1961-02-03, 1961/02/03, 03/02/1961,
    02/03/1961, 03.02.1961."""
    words: set[str] = set()
    for keyword in _SCRUB_NAMES:
        for name in _values(ds.get(keyword)):
            words.update(w for w in re.split(r"[\^=\s,]+", name) if w)
    for keyword in _SCRUB_VALUES:
        for value in (v.strip() for v in _values(ds.get(keyword))):
            if value:
                words.add(value)
                words.update(_date_spellings(value))
    parts = []
    for word in sorted(words, key=len, reverse=True):
        if len(word) >= 3 or not word.isascii():
            parts.append(re.escape(word))
        elif word.isalnum():
            parts.append(rf"(?<!\w){re.escape(word)}(?!\w)")
    if not parts:
        return None
    return re.compile("|".join(parts), re.IGNORECASE)


_DATE_VALUE = re.compile(r"(\d{4})(\d{2})(\d{2})")


def _date_spellings(value: str) -> list[str]:
    """A DA value (YYYYMMDD) as free text writes it: ISO, slashes, day or month first."""
    found = _DATE_VALUE.fullmatch(value)
    if found is None:
        return []
    y, m, d = found.groups()
    return [f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"]


def _values(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _scrub(text: str, pattern: re.Pattern[str]) -> str:
    return " ".join(pattern.sub(" ", text).split())


def _matches(match: MaskMatch, ds: Dataset) -> bool:
    for keyword in ("Manufacturer", "ManufacturerModelName"):
        wanted = getattr(match, keyword)
        if wanted is not None and not fnmatch.fnmatchcase(
            str(ds.get(keyword, "") or "").strip().upper(), wanted.upper()
        ):
            return False
    for keyword in ("Rows", "Columns"):
        wanted = getattr(match, keyword)
        if wanted is not None and int(ds.get(keyword, 0) or 0) != wanted:
            return False
    return True


def _mask_pixels(ds: Dataset, rectangles: list[tuple[int, int, int, int]]) -> None:
    """Paint ``rectangles`` black on every frame.

    The pixels are decoded without colour conversion and written back as native data
    (compressed input leaves as explicit VR little endian) with what the decoder reports:
    a subsampled YBR_FULL_422 image comes back as full-resolution YBR_FULL, JPEG 2000's
    YBR_ICT/RCT as RGB, colour-by-plane as colour-by-pixel. The SOP Instance UID is not
    regenerated here (the UID mapping decides it), so the output stays a pure function
    of the input and the secret."""
    if _PIXEL_DATA[0] not in ds._dict:
        raise ProcessingError("burned_in_annotation", "float pixel data cannot be masked")
    try:
        decoder: Any = get_decoder(ds.file_meta.TransferSyntaxUID)  # its kwargs are untyped
        arr, meta = decoder.as_array(ds, as_rgb=False)
        arr = arr.copy()
    except Exception as exc:  # any codec failure: refuse rather than send unmasked pixels
        raise ProcessingError(
            "burned_in_annotation", f"cannot decode the pixel data to mask it: {exc}"
        ) from exc
    photometric = str(meta["photometric_interpretation"])
    if photometric == "YBR_FULL_422":  # the decoder returns every chroma sample
        photometric = "YBR_FULL"
    elif photometric in ("YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"):  # not valid native
        arr = decoder.as_array(ds, as_rgb=True)[0].copy()
        photometric = "RGB"
    frames = int(meta.get("number_of_frames", 1) or 1)
    view = arr if frames > 1 else arr[None, ...]
    if arr.ndim - (frames > 1) == 3:  # colour: black is 0, in YCbCr with neutral chroma
        black: Any = [0, 0, 0]
        if photometric.startswith("YBR"):
            black[1] = black[2] = 1 << (int(meta["bits_stored"]) - 1)
    else:
        black = view.max() if photometric == "MONOCHROME1" else view.min()
    for x, y, w, h in rectangles:
        view[:, y : y + h, x : x + w] = black
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(arr, photometric, int(meta["bits_stored"]), generate_instance_uid=False)
