"""``standardize``: rule-based coercion of header attributes (set, remove, copy, regex, map).

Each rule is one action and an optional ``match:`` in the route match language
(:mod:`dicomgate.routing.matcher`), evaluated on the data set as the previous rules left it
and on how the instance arrived (calling AE, ...; kept in the stored file's meta, PS3.10
7.1 Private Information). Attributes are addressed by:

- a keyword (``DiffusionBValue``) or a tag (``(0018,9087)`` or ``0018,9087``);
- a private attribute by its creator and element offset, ``"SIEMENS MR HEADER,0019,0C"``:
  the block is found through the Private Creator element of that group (PS3.5 7.8.1),
  wherever the scanner put it, and created when a rule writes into a missing block;
- a path through sequences, ``RequestAttributesSequence[0].ScheduledProcedureStepID`` (one
  item, counted from 0) or ``ReferencedSeriesSequence[*].SeriesInstanceUID`` (every item).

Values are converted to the target's VR (a private DS/IS/FD/UN b-value to FD
DiffusionBValue); a value that does not fit refuses the instance with ``cannot_standardize``
rather than sending a broken header. ``charset: utf8`` re-encodes every text value as
ISO_IR 192 (PS3.5 6.1.2.3) and sets Specific Character Set.
"""

from __future__ import annotations

import copy
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core.core_schema import ValidationInfo
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, get_private_entry, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.valuerep import DS, IS, DSfloat, PersonName, validate_value
from pydicom.values import convert_value

from dicomgate.errors import ConfigError, without_values
from dicomgate.models import ConfigModel
from dicomgate.processing.base import ProcessingError, Step
from dicomgate.routing.matcher import MatchContext, _Instance, _match_predicate
from dicomgate.store.part10 import parse_arrival

__all__ = ["Address", "Standardize", "parse_address"]

REASON: Final = "cannot_standardize"
_RAISE: Final = 2  # pydicom.config.RAISE: validate_value raises ValueError

_TEXT_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI"}
    | {"UR", "UT"}
)
_SINGLE_TEXT_VRS: Final = frozenset({"LT", "ST", "UR", "UT"})  # no backslash delimiter
_INT_RANGES: Final = {
    "US": (0, 2**16 - 1),
    "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1),
    "SL": (-(2**31), 2**31 - 1),
    "UV": (0, 2**64 - 1),
    "SV": (-(2**63), 2**63 - 1),
    "IS": (-(2**31), 2**31 - 1),
}
_BINARY_NUMBER_FORMATS: Final = {
    "FD": "d",
    "FL": "f",
    "US": "H",
    "SS": "h",
    "UL": "L",
    "SL": "l",
    "UV": "Q",
    "SV": "q",
}
_BYTES_VRS: Final = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_KNOWN_VRS: Final = _TEXT_VRS | set(_BINARY_NUMBER_FORMATS) | _BYTES_VRS | {"SQ", "AT"}

# -- addresses -------------------------------------------------------------------------------

_PRIVATE_RE: Final = re.compile(r"([^,\[\]]+?),\s*([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{2})")
_TAG_RE: Final = re.compile(r"\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?")
_KEYWORD_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_INDEX_RE: Final = re.compile(r"\[(\d+|\*)\]")


@dataclass(frozen=True)
class _Element:
    """One attribute of one data set: a fixed tag, or a private creator + element offset."""

    tag: int | None  # fixed tag (standard, or private given as a tag)
    creator: str | None = None  # private creator text, when addressed by creator
    group: int = 0
    offset: int = 0  # element offset within the creator's block (0x00-0xFF)

    def describe(self) -> str:
        if self.tag is not None:
            return f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"
        return f'"{self.creator}",{self.group:04X},{self.offset:02X}'


@dataclass(frozen=True)
class _Hop:
    """A sequence on the way to the attribute and which of its items: n or every (-1)."""

    element: _Element
    index: int  # -1 = every item


@dataclass(frozen=True)
class Address:
    """A parsed attribute address (see the module docstring)."""

    text: str
    hops: tuple[_Hop, ...]
    leaf: _Element
    vr: str | None  # the dictionary VR (standard or known private), None when unknown

    @property
    def every_item(self) -> bool:
        return any(hop.index < 0 for hop in self.hops)


def _parse_element(text: str) -> _Element:
    found = _PRIVATE_RE.fullmatch(text)
    if found:
        group = int(found[2], 16)
        if group % 2 == 0:
            raise ValueError(f"{text!r}: group {group:04X} is not private (odd groups are)")
        return _Element(None, found[1].strip(), group, int(found[3], 16))
    found = _TAG_RE.fullmatch(text)
    if found:
        return _Element(int(found[1], 16) << 16 | int(found[2], 16))
    if _KEYWORD_RE.fullmatch(text):
        tag = tag_for_keyword(text)
        if tag is None:
            raise ValueError(f"{text!r} is not a DICOM keyword")
        return _Element(int(tag))
    raise ValueError(
        f"{text!r} is not a keyword, a tag like (0010,0020) or a private attribute like"
        ' "SIEMENS MR HEADER,0019,0C"'
    )


def _dictionary_vr(element: _Element) -> str | None:
    try:
        if element.tag is not None:
            vr = dictionary_VR(element.tag)
        else:
            assert element.creator is not None
            tag = element.group << 16 | 0x1000 | element.offset
            vr = get_private_entry(tag, element.creator)[0]
    except KeyError:
        return None
    return vr if vr in _KNOWN_VRS else None  # "US or SS", "OB or OW": resolved by the user


def parse_address(text: str) -> Address:
    """Parse ``Keyword``, ``(gggg,eeee)``, ``"CREATOR,gggg,ee"`` or a sequence path."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("an attribute address is a keyword, a tag or a private attribute")
    rest, hops = text.strip(), []
    while True:
        found = _INDEX_RE.search(rest)
        if found is None:
            break
        head = rest[: found.start()]
        tail = rest[found.end() :]
        if not tail.startswith(".") or len(tail) < 2:
            raise ValueError(
                f"{text!r}: an item index must be followed by .Attribute, e.g. Seq[0].PatientID"
            )
        element = _parse_element(head)
        vr = _dictionary_vr(element)
        if vr not in (None, "SQ"):
            raise ValueError(f"{text!r}: {head} is not a sequence")
        hops.append(_Hop(element, -1 if found[1] == "*" else int(found[1])))
        rest = tail[1:]
    if "." in rest and _PRIVATE_RE.fullmatch(rest) is None:
        raise ValueError(f"{text!r}: give each sequence an item index, e.g. Seq[0].X or Seq[*].X")
    leaf = _parse_element(rest)
    if leaf.tag is not None and leaf.tag >> 16 == 0x0002:
        raise ValueError(
            f"{text!r}: file meta attributes (group 0002) are not part of the data set"
        )
    return Address(text, tuple(hops), leaf, _dictionary_vr(leaf))


def _check_address(value: str) -> str:
    parse_address(value)
    return value


def _check_vr(value: str | None) -> str | None:
    if value is not None and value not in _KNOWN_VRS:
        raise ValueError(f"unknown VR {value!r}")
    return value


# -- reading and converting values -----------------------------------------------------------


def _tag_in(ds: Dataset, element: _Element, create: bool) -> int | None:
    """The tag of ``element`` in ``ds`` (the private block looked up, or created)."""
    if element.tag is not None:
        return element.tag
    assert element.creator is not None
    try:
        block = ds.private_block(element.group, element.creator, create=create)
    except KeyError:
        return None
    return int(block.get_tag(element.offset))


def _datasets(ds: Dataset, address: Address) -> Iterator[Dataset]:
    """The data sets (``ds`` itself or sequence items) that hold the address's attribute."""
    current = [ds]
    for hop in address.hops:
        following: list[Dataset] = []
        for item in current:
            tag = _tag_in(item, hop.element, create=False)
            if tag is None or tag not in item:
                continue
            value = item[tag].value
            if not isinstance(value, DicomSequence):
                continue
            if hop.index < 0:
                following += list(value)
            elif hop.index < len(value):
                following.append(value[hop.index])
        current = following
    yield from current


def _number_text(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [v for v in value]
    return [value]


def _decode_un(raw: bytes, vr: str, tag: int) -> list[object]:
    """The values of a UN element whose real VR is ``vr`` (implicit VR little endian)."""
    element = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, True, True)
    return _values(convert_value(vr, element))


def _infer_un(raw: bytes, source: str, from_vr: str | None, known: str | None) -> str:
    if from_vr is not None:
        return from_vr
    if known is not None:
        return known
    text = raw.rstrip(b"\x00 ")
    if text and all(0x20 <= b < 0x7F for b in text):
        return "LO"  # printable ASCII: what scanners write for text and number strings
    raise ProcessingError(
        REASON,
        f"{source} is stored as UN and its VR is unknown; set from_vr on the copy rule",
    )


def _source_values(
    ds: Dataset, tag: int, address: Address, from_vr: str | None
) -> tuple[str, list[object]] | None:
    """(VR, values) of the source attribute, UN decoded; None when absent."""
    if tag not in ds:
        return None
    elem = ds[tag]
    vr = str(elem.VR)
    if vr == "SQ":
        return vr, [elem.value]
    if vr == "UN" or (from_vr is not None and vr != from_vr and isinstance(elem.value, bytes)):
        raw = bytes(elem.value or b"")
        real = _infer_un(raw, address.text, from_vr, address.vr)
        try:
            return real, _decode_un(raw, real, tag)
        except (ValueError, struct.error) as exc:
            raise ProcessingError(
                REASON, f"{address.text}: cannot read it as {real}: {exc}"
            ) from exc
    if vr in _BYTES_VRS:
        return vr, [elem.value] if elem.value else []
    return vr, _values(elem.value)


def convert(values: list[object], vr: str, where: str) -> object:
    """``values`` as the value of an element with ``vr``; ValueError naming the problem."""
    if vr == "SQ":
        if not values:
            return DicomSequence([])
        if len(values) == 1 and isinstance(values[0], DicomSequence):
            return copy.deepcopy(values[0])
        raise ValueError(f"{where}: only a sequence can be copied into a sequence")
    if vr in _BYTES_VRS:
        if not values:
            return None
        if len(values) == 1 and isinstance(values[0], bytes):
            return values[0]
        raise ValueError(f"{where}: binary {vr} values can only be copied from binary values")
    if vr == "AT":
        raise ValueError(f"{where}: AT values cannot be converted")
    out = [_convert_one(value, vr, where) for value in values]
    if vr in _SINGLE_TEXT_VRS and len(out) > 1:
        raise ValueError(f"{where}: {vr} holds one value, not {len(out)}")
    for value in out:
        try:
            validate_value(vr, str(value) if vr in ("DS", "IS") else value, _RAISE)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if not out:
        return None if vr not in _TEXT_VRS else ""
    return out[0] if len(out) == 1 else out


def _as_float(value: object, vr: str, where: str) -> float:
    if isinstance(value, bool | bytes | DicomSequence | Dataset):
        raise ValueError(f"{where}: {value!r} is not a number for {vr}")
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {str(value)!r} is not a number for {vr}") from None
    return number


def _convert_one(value: object, vr: str, where: str) -> object:
    if isinstance(value, bytes | DicomSequence | Dataset):
        raise ValueError(f"{where}: a binary or sequence value cannot become {vr}")
    if vr in ("FD", "FL"):
        return _as_float(value, vr, where)
    if vr in _INT_RANGES:
        number = _as_float(value, vr, where)
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"{where}: '{_number_text(number)}' is not a whole number for {vr}")
        low, high = _INT_RANGES[vr]
        if not low <= int(number) <= high:
            raise ValueError(f"{where}: '{int(number)}' is out of range for {vr}")
        return IS(int(number)) if vr == "IS" else int(number)
    if vr == "DS":
        number = _as_float(value, vr, where)
        if not math.isfinite(number):
            raise ValueError(f"{where}: '{number}' is not a DS value")
        if isinstance(value, str) and len(value.strip()) <= 16:
            return DS(value.strip())
        return DS(number, auto_format=True)
    # text VRs
    if isinstance(value, float):
        text = _number_text(value)
    elif isinstance(value, int | str | PersonName):
        text = str(value)
    else:
        text = str(value)
    return text if vr != "PN" else PersonName(text)


def _write(ds: Dataset, tag: int, vr: str, value: object) -> None:
    ds[tag] = DataElement(tag, vr, value)


def _text_values(elem: DataElement, address: Address) -> tuple[str, list[str]]:
    """(VR to write, values as text) of an element a text rule works on."""
    vr = str(elem.VR)
    if vr == "UN":
        raw = bytes(elem.value or b"")
        real = _infer_un(raw, address.text, None, address.vr)
        return real, [str(v) for v in _decode_un(raw, real, int(elem.tag))]
    if vr in _BYTES_VRS or vr in ("SQ", "AT"):
        raise ProcessingError(REASON, f"{address.text} has VR {vr}; it holds no text")
    return vr, [_as_text(v) for v in _values(elem.value)]


def _as_text(value: object) -> str:
    if isinstance(value, float) and not isinstance(value, DSfloat):
        return _number_text(value)
    return str(value)


# -- the configuration -----------------------------------------------------------------------

Scalar = str | int | float


class SetAction(ConfigModel):
    tag: str = Field(description="The attribute to write (keyword, tag, private or path).")
    vr: str | None = Field(
        default=None,
        description="VR of a private attribute the dictionary does not know (e.g. LO, FD).",
    )
    value: Scalar | list[Scalar] | None = Field(
        description="The value; a list for several values; null for an empty value."
    )

    _check_tag = field_validator("tag")(_check_address)
    _check_vr = field_validator("vr")(_check_vr)

    @field_validator("value")
    @classmethod
    def _value_fits(cls, value: object, info: ValidationInfo) -> object:
        if "tag" not in info.data:
            return value
        address = parse_address(info.data["tag"])
        vr = info.data.get("vr") or address.vr
        if vr is None:
            raise ValueError(f"the VR of {address.text} is unknown: add vr: to the rule")
        values = value if isinstance(value, list) else [] if value is None else [value]
        convert(list(values), vr, address.text)
        return value


class RemoveAction(ConfigModel):
    tag: str = Field(description="The attribute to remove (keyword, tag, private or path).")

    _check_tag = field_validator("tag")(_check_address)


class CopyAction(ConfigModel):
    source: str = Field(
        alias="from", description="The attribute to read (one item: no [*] in the path)."
    )
    to: str = Field(description="The attribute to write; created (with its private block).")
    vr: str | None = Field(
        default=None, description="VR of a private target the dictionary does not know."
    )
    from_vr: str | None = Field(
        default=None,
        description="VR to decode a source stored as UN with (e.g. IS, FD), when the"
        " dictionary does not know it.",
    )

    @field_validator("source")
    @classmethod
    def _one_source(cls, value: str) -> str:
        if parse_address(value).every_item:
            raise ValueError("the source is one attribute: use an item index, not [*]")
        return value

    _check_to = field_validator("to")(_check_address)
    _check_vr = field_validator("vr", "from_vr")(_check_vr)


class RegexReplaceAction(ConfigModel):
    tag: str = Field(description="The text attribute to change (each of its values).")
    pattern: str = Field(description="A Python regular expression (re.sub).")
    replacement: str = Field(description=r"The replacement; \1 or \g<name> insert groups.")

    _check_tag = field_validator("tag")(_check_address)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("replacement")
    @classmethod
    def _groups_exist(cls, value: str, info: ValidationInfo) -> str:
        if "pattern" not in info.data:
            return value
        compiled = re.compile(info.data["pattern"])
        for number, name in re.findall(r"\\(\d+)|\\g<([^>]*)>", value):
            group = number or name
            if group.isdigit() and int(group) > compiled.groups:
                raise ValueError(
                    f"refers to group {group}; the pattern has {compiled.groups} group(s)"
                )
            if not group.isdigit() and group not in compiled.groupindex:
                raise ValueError(f"refers to group {group!r}, which the pattern does not name")
        return value


class MapAction(ConfigModel):
    tag: str = Field(description="The attribute whose values are looked up (each value).")
    values: dict[str, Scalar | None] = Field(
        description="Old value -> new value (exact text; null empties the value)."
    )
    default: Scalar | None = Field(
        default=None, description="New value for values not in the table; absent: kept."
    )

    _check_tag = field_validator("tag")(_check_address)

    @field_validator("values", mode="before")
    @classmethod
    def _keys_as_text(cls, value: object) -> object:
        if isinstance(value, dict):
            return {_yaml_text(k): v for k, v in value.items()}
        return value


def _yaml_text(value: object) -> object:
    if isinstance(value, bool) or value is None:
        return value  # left to pydantic: refused as a key
    if isinstance(value, int | float):
        return _number_text(float(value)) if isinstance(value, float) else str(value)
    return value


_ACTIONS: Final = ("set", "remove", "copy", "regex_replace", "map")


class Rule(ConfigModel):
    match: dict[str, Any] | None = Field(
        default=None,
        description="Apply the rule only to instances matching this (the route match"
        " language, calling_ae included); absent: every instance.",
    )
    set: SetAction | None = Field(default=None, description="Write a value.")
    remove: RemoveAction | None = Field(default=None, description="Delete an attribute.")
    copy_: CopyAction | None = Field(
        default=None, alias="copy", description="Copy one attribute's value into another."
    )
    regex_replace: RegexReplaceAction | None = Field(
        default=None, description="Rewrite text values with a regular expression."
    )
    map: MapAction | None = Field(default=None, description="Translate values by a table.")

    @field_validator("match")
    @classmethod
    def _match_compiles(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                _match_predicate(value, "match")
            except ConfigError as exc:
                where = exc.key.removeprefix("match").lstrip(".")
                raise ValueError(f"{where}: {exc.problem}" if where else exc.problem) from None
        return value

    @model_validator(mode="after")
    def _one_action(self) -> Rule:
        present = [name for name in _ACTIONS if self.action(name) is not None]
        if len(present) != 1:
            raise ValueError(
                f"a rule has exactly one action ({', '.join(_ACTIONS)}), plus an optional"
                f" match; found {', '.join(present) or 'none'}"
            )
        return self

    def action(self, name: str) -> ConfigModel | None:
        found: ConfigModel | None = getattr(self, "copy_" if name == "copy" else name)
        return found


class StandardizeConfig(ConfigModel):
    rules: list[Rule] = Field(
        default_factory=list,
        description="Rules applied in order; each sees the changes of the ones before.",
    )
    charset: Literal["utf8"] | None = Field(
        default=None,
        description="utf8: re-encode every text value as UTF-8 (Specific Character Set"
        " ISO_IR 192) before the rules run; absent: the character set is kept.",
    )


# -- compiled rules --------------------------------------------------------------------------

Action = Callable[[Dataset], None]


def _set_action(spec: SetAction) -> Action:
    address = parse_address(spec.tag)
    vr = spec.vr or address.vr
    assert vr is not None  # checked by the config model
    raw = spec.value if isinstance(spec.value, list) else [] if spec.value is None else [spec.value]
    value = convert(list(raw), vr, address.text)

    def apply(ds: Dataset) -> None:
        for item in _datasets(ds, address):
            tag = _tag_in(item, address.leaf, create=True)
            assert tag is not None
            _write(item, tag, vr, copy.deepcopy(value))

    return apply


def _remove_action(spec: RemoveAction) -> Action:
    address = parse_address(spec.tag)

    def apply(ds: Dataset) -> None:
        for item in _datasets(ds, address):
            tag = _tag_in(item, address.leaf, create=False)
            if tag is not None and tag in item:
                del item[tag]

    return apply


def _copy_action(spec: CopyAction) -> Action:
    source, target = parse_address(spec.source), parse_address(spec.to)

    def apply(ds: Dataset) -> None:
        holders = list(_datasets(ds, source))
        if not holders:
            return
        tag = _tag_in(holders[0], source.leaf, create=False)
        found = None if tag is None else _source_values(holders[0], tag, source, spec.from_vr)
        if found is None:
            return  # nothing to copy: the target is left as it is
        source_vr, values = found
        vr = spec.vr or target.vr or source_vr
        try:
            value = convert(values, vr, f"{source.text} -> {target.text}")
        except ValueError as exc:
            raise ProcessingError(REASON, without_values(str(exc))) from None
        for item in _datasets(ds, target):
            target_tag = _tag_in(item, target.leaf, create=True)
            assert target_tag is not None
            _write(item, target_tag, vr, copy.deepcopy(value))

    return apply


def _rewrite_action(address: Address, change: Callable[[str], str | None]) -> Action:
    """Rewrite each text value of ``address`` with ``change`` (None: value dropped)."""

    def apply(ds: Dataset) -> None:
        for item in _datasets(ds, address):
            tag = _tag_in(item, address.leaf, create=False)
            if tag is None or tag not in item:
                continue
            vr, texts = _text_values(item[tag], address)
            new = [text for old in texts if (text := change(old)) is not None]
            if new == texts:
                continue
            try:
                value = convert(list(new), vr, address.text)
            except ValueError as exc:
                raise ProcessingError(REASON, without_values(str(exc))) from None
            _write(item, tag, vr, value)

    return apply


def _regex_action(spec: RegexReplaceAction) -> Action:
    pattern = re.compile(spec.pattern)

    def change(text: str) -> str:
        try:
            return pattern.sub(spec.replacement, text)
        except re.error as exc:
            raise ProcessingError(REASON, f"{spec.tag}: bad replacement: {exc}") from exc

    return _rewrite_action(parse_address(spec.tag), change)


def _map_action(spec: MapAction) -> Action:
    table = {key.strip(): value for key, value in spec.values.items()}
    default = spec.default

    def change(text: str) -> str | None:
        key = text.strip()
        new = table.get(key, default if default is not None else key)
        return None if new is None else _as_text(new)

    return _rewrite_action(parse_address(spec.tag), change)


_BUILDERS: Final[dict[str, Callable[[Any], Action]]] = {
    "set": _set_action,
    "remove": _remove_action,
    "copy": _copy_action,
    "regex_replace": _regex_action,
    "map": _map_action,
}


def _arrival(ds: Dataset) -> MatchContext:
    """How the instance arrived, from the stored file's meta (see store/part10.py)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return MatchContext(received_via="")
    arrival = parse_arrival(meta.get("PrivateInformation"))
    return MatchContext(
        calling_ae=arrival.get(
            "calling_ae", str(meta.get("SourceApplicationEntityTitle", "") or "").strip()
        ),
        called_ae=arrival.get("called_ae", ""),
        source_ip=arrival.get("source_ip", ""),
        received_via=arrival.get("received_via", ""),
    )


def convert_to_utf8(ds: Dataset) -> None:
    """Decode every text value with the data set's character set, then declare ISO_IR 192.

    Values stored as UN (private attributes of implicit VR files) are bytes of an unknown
    encoding and stay as they are.
    """
    try:
        ds.decode()
    except (LookupError, ValueError) as exc:
        raise ProcessingError(REASON, f"cannot decode the text values: {exc}") from exc

    def drop_item_charsets(item: Dataset) -> None:
        for elem in item:
            if elem.VR == "SQ":
                for child in elem.value:
                    if "SpecificCharacterSet" in child:
                        del child.SpecificCharacterSet
                    drop_item_charsets(child)

    drop_item_charsets(ds)
    ds.SpecificCharacterSet = "ISO_IR 192"


class Standardize(Step):
    """Coerce header attributes by rules (see the module docstring)."""

    name = "standardize"
    Config = StandardizeConfig

    def __init__(self, config: StandardizeConfig, context: Any) -> None:
        super().__init__(config, context)
        self._rules: list[tuple[Callable[[_Instance], bool] | None, Action]] = []
        for rule in config.rules:
            predicate = None if rule.match is None else _match_predicate(rule.match, "match")
            ((name, spec),) = [(n, a) for n in _ACTIONS if (a := rule.action(n)) is not None]
            self._rules.append((predicate, _BUILDERS[name](spec)))

    def apply(self, ds: Dataset) -> list[Dataset]:
        if self.config.charset == "utf8":
            convert_to_utf8(ds)
        context = _arrival(ds)
        for predicate, action in self._rules:
            if predicate is not None and not predicate(_Instance(ds, context)):
                continue
            try:
                action(ds)
            except (ValueError, TypeError, OverflowError, struct.error) as exc:
                # The reason is logged and kept in the queue: the instance's own values
                # (quoted in the messages) stay out of it (rule 5).
                raise ProcessingError(REASON, without_values(str(exc))) from exc
        return [ds]
