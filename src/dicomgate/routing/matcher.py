"""Route matching: which routes apply to an instance, as a pure function of header + context.

:meth:`Router.compile` turns the ``routes:`` of the configuration into predicates once, at
start-up (keywords to tag numbers, wildcards and ``re:`` patterns to compiled regexes,
ranges to comparisons, CIDR strings to networks), and refuses every mistake with a
:class:`~dicomgate.errors.ConfigError` that names the key, e.g. ``routes[2].match.Modality``.
:meth:`Router.match` then runs on the ingest hot path: it reads each attribute a route
needs at most once per instance and never raises for odd values (a value that cannot be
read or parsed simply does not match).

The match language (the reference in ``docs/configuration.md`` is rendered from
``routing/models.py``; keep the two in step):

- keys: a DICOM keyword (``Modality``), tag notation ``(0019,100C)``, or a context key
  ``calling_ae``, ``called_ae``, ``source_ip``, ``received_via``; several keys are ANDed;
  ``any: [...]``, ``all: [...]`` and ``not: {...}`` compose whole sub-matches.
- values: exact text; ``*``/``?`` wildcards; ``re:`` regular expressions (full match);
  ``ci:`` prefix or ``{value: ..., ignore_case: true}`` for case-insensitive text; a list
  (any of); ``{not: ...}``; ``{eq: ...}`` (literal, no wildcards); numeric comparisons
  ``{gt, ge, lt, le}`` and ``{range: [lo, hi]}``; DICOM range matching ``"lo-hi"`` on DA,
  DT and TM attributes (PS3.4 C.2.2.2.5) and the same form on numeric attributes
  (``SeriesNumber: "1-10"``, ``"100-"``); ``""`` matches an empty or missing attribute,
  which nothing else but ``not`` matches. Multi-valued attributes match when any value does.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import math
import operator
import re
import struct
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal, TypeVar

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import BytesLengthException
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from dicomgate.errors import ConfigError
from dicomgate.routing.models import NAME_MAX, PRIORITIES, RouteConfig, parse_duration

__all__ = ["MatchContext", "RouteDecision", "Router", "parse_duration"]

Trigger = Literal["instance", "series_stable", "study_stable"]
ReceivedVia = Literal["dimse", "stow", "folder", "recovery"]
RECEIVED_VIA: Final = ("dimse", "stow", "folder", "recovery")


@dataclass(frozen=True)
class MatchContext:
    """How an instance arrived: the part of a match that is not in its header."""

    calling_ae: str = ""  # the sender's AE title (DIMSE); "" when not over DIMSE
    called_ae: str = ""  # the AE title the sender called us by
    source_ip: str = ""  # peer address, IPv4 or IPv6 text; "" when unknown
    received_via: str = "dimse"  # dimse | stow | folder | recovery


@dataclass(frozen=True)
class RouteDecision:
    """One route that applies to an instance: where to send it, when and how urgently."""

    route: str  # the route's name
    destinations: tuple[str, ...]  # destination names, in the route's `to` order
    trigger: Trigger  # "instance" | "series_stable" | "study_stable"
    stable_after: float  # seconds of quiet before a *_stable trigger fires
    priority: int  # higher first: high = 10, normal = 0, low = -10, or the route's int
    # The route's pipeline as canonical JSON ("" for none): two routes sending an instance
    # to the same destination through the same pipeline make ONE delivery job.
    pipeline_key: str = ""


# -- values of one attribute ---------------------------------------------------------------

Values = tuple[object, ...]  # the values of one attribute; () when missing or empty
Test = Callable[[Values], bool]  # a condition on one attribute
Predicate = Callable[["_Instance"], bool]  # a condition on the whole instance


class _Unreadable:
    """Marks an attribute that is present but whose value pydicom could not convert."""

    __slots__ = ()


_UNREADABLE: Final = (_Unreadable(),)
# What converting an odd raw value can raise inside pydicom (bad lengths, bad text).
_VALUE_ERRORS: Final = (
    ValueError,
    TypeError,
    OverflowError,
    LookupError,
    struct.error,
    BytesLengthException,
)


def _values_of(value: object) -> Values:
    """An element value as a tuple of its non-empty values (PS3.5 6.4: VM > 1 is a list)."""
    if type(value) is str:
        value = value.strip(" ")
        return (value,) if value else ()
    if value is None:
        return ()
    if isinstance(value, str):
        return _values_of(str(value))
    if isinstance(value, MultiValue | list | tuple):
        return tuple(v for item in value for v in _values_of(item))
    if isinstance(value, bytes | bytearray):
        # UN (e.g. private tags in implicit VR) or OB: text is its likeliest meaning.
        text = bytes(value).rstrip(b"\x00 ").decode("latin-1")
        return tuple(v for part in text.split("\\") if (v := part.strip(" \x00")))
    if isinstance(value, DicomSequence):
        return (value,) if len(value) else ()
    return (value,)


def _raw_text_values(raw: bytes) -> Values | None:
    """Values of a still-encoded text element, when decoding cannot depend on the charset.

    Pure ASCII without escape sequences reads the same in every character set a data set
    may declare (PS3.5 6.1.2.5.3), so it is split here, several times faster than pydicom's
    conversion; anything else returns None and goes through pydicom.
    """
    if not raw.isascii() or b"\x1b" in raw:
        return None
    text = raw.decode("ascii")
    if "\\" not in text:
        text = text.strip(" \x00")
        return (text,) if text else ()
    return tuple(v for part in text.split("\\") if (v := part.strip(" \x00")))


def _as_text(value: object) -> str | None:
    if type(value) is str:
        return value
    if isinstance(value, str | PersonName):
        return str(value)
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return str(value)
    return None


def _as_number(value: object) -> float | None:
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return None if math.isnan(number) else number


class _Instance:
    """One instance during :meth:`Router.match`: reads each attribute at most once."""

    __slots__ = ("_cache", "_ds", "ctx")

    def __init__(self, ds: Dataset, ctx: MatchContext) -> None:
        self._ds = ds
        self.ctx = ctx
        self._cache: dict[int | str, Values] = {}  # plain ints: BaseTag compares in Python

    def attribute(self, tag: int, base_tag: BaseTag, raw_text: bool) -> Values:
        values = self._cache.get(tag)
        if values is not None:
            return values
        try:
            element = self._ds.get_item(base_tag)  # raw elements stay unconverted here
            if element is None:
                values = ()
            elif (
                raw_text
                and isinstance(element, RawDataElement)
                and element.value is not None
                and (element.VR is None or element.VR in _RAW_TEXT_VRS)
            ):
                values = _raw_text_values(element.value)
                if values is None:
                    values = _values_of(self._ds[base_tag].value)
            else:
                values = _values_of(self._ds[base_tag].value)
        except _VALUE_ERRORS:
            values = _UNREADABLE
        self._cache[tag] = values
        return values

    def context(self, key: str) -> Values:
        values = self._cache.get(key)
        if values is not None:
            return values
        if key == "source_ip":
            values = _address_values(self.ctx.source_ip)
        else:
            values = _values_of(getattr(self.ctx, key))
        self._cache[key] = values
        return values


@functools.lru_cache(maxsize=1024)  # senders are few; parsing an address costs microseconds
def _address_values(text: str) -> Values:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return _UNREADABLE if text.strip() else ()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)  # "::ffff:10.0.0.7" is the IPv4 peer 10.0.0.7
    return (address,)


_T = TypeVar("_T")


# -- small combinators (closures: the fastest calls CPython has for this) --------------------


def _negated(inner: Callable[[_T], bool]) -> Callable[[_T], bool]:
    return lambda arg: not inner(arg)


def _any_test(parts: Sequence[Callable[[_T], bool]]) -> Callable[[_T], bool]:
    return lambda arg: any(part(arg) for part in parts)


def _all_tests(parts: Sequence[Callable[[_T], bool]]) -> Callable[[_T], bool]:
    if len(parts) == 1:
        return parts[0]
    return lambda arg: all(part(arg) for part in parts)


def _number_equals(target: float) -> Callable[[float], bool]:
    return lambda number: number == target


def _number_comparison(op: Callable[[Any, Any], Any], limit: float) -> Callable[[float], bool]:
    return lambda number: bool(op(number, limit))


# -- the kinds of keys -----------------------------------------------------------------------

# How a key's values are compared; the VR decides for DICOM attributes (PS3.5 6.2).
Kind = Literal["text", "number", "DA", "DT", "TM", "other", "ip", "via"]
_NUMBER_VRS: Final = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
# Text VRs whose raw ASCII bytes the matcher splits itself (see _raw_text_values); LT, ST and
# UT are left to pydicom: a backslash is not a delimiter in them (PS3.5 6.2).
_RAW_TEXT_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"}
)
_UNMATCHABLE_VRS: Final = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV"})
_CONTEXT_KINDS: Final[dict[str, Kind]] = {
    "calling_ae": "text",
    "called_ae": "text",
    "source_ip": "ip",
    "received_via": "via",
}
_TAG_RE: Final = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")
_BOUND_RE: Final[dict[str, re.Pattern[str]]] = {
    "DA": re.compile(r"\d{1,8}"),
    "TM": re.compile(r"\d{1,6}(\.\d{1,6})?"),
    "DT": re.compile(r"\d{1,14}(\.\d{1,6})?"),
}
_DATE_VALUE_RE: Final = re.compile(r"\d+(\.\d*)?")
_COMPARISONS: Final = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}
_VALUE_KEYS: Final = ("not", "any", "all", "value", "ignore_case", "eq", "range", *_COMPARISONS)


def _key_predicate(name: str, path: str, spec: object) -> Predicate:
    """``name: spec`` of a match as one predicate (one call level less than composing)."""
    kind, where = _resolve_key(name, path)
    test = _condition(spec, kind, path)
    if isinstance(where, str):
        return lambda inst: test(inst.context(where))
    number, tag, raw_text = where
    return lambda inst: test(inst.attribute(number, tag, raw_text))


def _resolve_key(name: str, path: str) -> tuple[Kind, str | tuple[int, BaseTag, bool]]:
    """The kind of a match key and where its values are: a context field or a tag."""
    if name in _CONTEXT_KINDS:
        return _CONTEXT_KINDS[name], name
    found = _TAG_RE.fullmatch(name)
    if found:
        tag = BaseTag(int(found[1], 16) << 16 | int(found[2], 16))
    elif (number := tag_for_keyword(name)) is not None:
        tag = BaseTag(number)
    else:
        raise ConfigError(path, _unknown_key_problem(name))
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = ""  # private or unknown: the element's own VR decides the value's type
    choices = set(vr.split(" or ")) if vr else set()
    if choices & _UNMATCHABLE_VRS:
        raise ConfigError(
            path, f"{name} has VR {vr}; sequences and binary values cannot be matched"
        )
    raw_text = vr in _RAW_TEXT_VRS
    kind: Kind
    if choices and choices <= _NUMBER_VRS:
        kind = "number"  # also "US or SS" (PS3.5 6.2: resolved by Pixel Representation)
    elif vr in ("DA", "DT", "TM"):
        kind = "DA" if vr == "DA" else "DT" if vr == "DT" else "TM"
    elif vr in ("", "UN") or " or " in vr:
        kind = "other"
    else:
        kind = "text"
    return kind, (int(tag), tag, raw_text)


def _unknown_key_problem(name: str) -> str:
    problem = (
        f"unknown key {name!r}: not a DICOM keyword, a tag like (0010,0020), any/all/not, or"
        f" one of {', '.join(_CONTEXT_KINDS)}"
    )
    by_case = {keyword.lower(): keyword for keyword in keyword_dict}
    close = [by_case[name.lower()]] if name.lower() in by_case else []
    close = close or difflib.get_close_matches(name, [*keyword_dict, *_CONTEXT_KINDS], n=1)
    return f"{problem} (did you mean {close[0]!r}?)" if close else problem


# -- compiling conditions on one attribute ----------------------------------------------------


def _is_empty(values: Values) -> bool:
    return not values


def _on_text(check: Callable[[str], bool]) -> Test:
    def test(values: Values) -> bool:
        for value in values:
            text = value if type(value) is str else _as_text(value)
            if text is not None and check(text):
                return True
        return False

    return test


def _on_number(check: Callable[[float], bool]) -> Test:
    def test(values: Values) -> bool:
        for value in values:
            number = _as_number(value)
            if number is not None and check(number):
                return True
        return False

    return test


def _wildcard_check(pattern: str, ignore_case: bool) -> Callable[[str], bool]:
    """``*`` any run of characters, ``?`` one character, everything else literal."""
    if not ignore_case and "?" not in pattern:
        core = pattern.strip("*")
        if "*" not in core:  # the common shapes, without a regex
            starts, ends = pattern.startswith("*"), pattern.endswith("*")
            if not core:
                return lambda text: True
            if starts and ends:
                return lambda text: core in text
            if ends:
                return lambda text: text.startswith(core)
            return lambda text: text.endswith(core)
    regex = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )
    compiled = re.compile(regex, re.DOTALL | (re.IGNORECASE if ignore_case else 0))
    return lambda text: compiled.fullmatch(text) is not None


def _text_check(spec: str, path: str, ignore_case: bool) -> Callable[[str], bool]:
    """A check of one text value: exact, wildcard or ``re:`` (``ci:`` already removed)."""
    if spec.startswith("re:"):
        try:
            compiled = re.compile(spec[3:], re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise ConfigError(path, f"invalid regular expression {spec[3:]!r}: {exc}") from None
        if not spec[3:]:
            raise ConfigError(path, 'empty regular expression (use "" for an empty value)')
        return lambda text: compiled.fullmatch(text) is not None
    if "*" in spec or "?" in spec:
        return _wildcard_check(spec, ignore_case)
    if ignore_case:
        folded = spec.casefold()
        return lambda text: text.casefold() == folded
    return lambda text: text == spec


def _is_literal(spec: object) -> bool:
    """A plain exact string: no prefix, no wildcard, no range."""
    return (
        isinstance(spec, str)
        and spec != ""
        and "*" not in spec
        and "?" not in spec
        and not spec.startswith(("re:", "ci:"))
    )


def _date_bound(text: str, kind: Kind, path: str, what: str = "bound") -> str:
    bound = text.strip().replace(":", "") if kind == "TM" else text.strip()
    if not _BOUND_RE[kind].fullmatch(bound) or not _on_the_calendar(bound, kind):
        where = " in a range" if what == "bound" else ""
        raise ConfigError(path, f"bad {kind} {what} {text!r}{where}")
    return bound


def _on_the_calendar(bound: str, kind: Kind) -> bool:
    """The fields a (partial) DA, DT or TM bound has are in range: month 01-12, day 01-31,
    hour 00-23, minute 00-59, second 00-60 (a leap second). ``20261301`` or ``25`` would
    pass the digit pattern and then never match anything."""
    digits = bound.split(".", 1)[0]
    fields: list[tuple[int, int, int, int]] = []  # (start, end, low, high)
    if kind in ("DA", "DT"):
        fields += [(4, 6, 1, 12), (6, 8, 1, 31)]
    time_at = 8 if kind == "DT" else 0
    if kind in ("DT", "TM"):
        fields += [(time_at, time_at + 2, 0, 23), (time_at + 2, time_at + 4, 0, 59)]
        fields += [(time_at + 4, time_at + 6, 0, 60)]
    for start, end, low, high in fields:
        part = digits[start:end]
        if len(part) == 2 and not low <= int(part) <= high:
            return False
    return True


def _date_text(value: str, kind: str) -> str:
    """A DA/DT/TM value in the form bounds are compared with (digits, no separators)."""
    if kind == "TM":
        return value.replace(":", "")  # ACR-NEMA style HH:MM:SS
    if kind == "DA":
        return value.replace(".", "")  # ACR-NEMA style YYYY.MM.DD
    for sign in "+-":  # DT: the UTC offset is not part of the comparison
        value = value.partition(sign)[0]
    return value


def _date_comparison(op_name: str, bound: str, kind: str) -> Callable[[str], bool]:
    """Compare at the bound's precision: ``ge 202601`` means "from January 2026 on"."""
    width = len(bound)
    op = _COMPARISONS[op_name]

    def check(text: str) -> bool:
        value = _date_text(text, kind)
        if not _DATE_VALUE_RE.fullmatch(value):
            return False  # not a date or time at all: never in a range
        head = value[:width]
        if op_name in ("gt", "ge"):
            head = head.ljust(width, "0")
        return bool(op(head, bound))

    return check


def _refuse_empty_date_range(bounds: dict[str, object], kind: Kind, path: str) -> None:
    """A lower and an upper bound that no value meets, compared as the checks compare: each
    at its own precision (``2026-13`` is "from 2026 on, up to year 13xx": empty)."""
    texts = {name: str(bound).strip() for name, bound in bounds.items()}
    if kind == "TM":
        texts = {name: text.replace(":", "") for name, text in texts.items()}
    low = texts.get("ge", texts.get("gt"))
    high = texts.get("le", texts.get("lt"))
    if low is None or high is None:
        return
    # The smallest value meeting the lower bound, cut to the upper bound's precision (a
    # "gt" bound is taken as "ge": only a sure emptiness is refused).
    smallest = low.ljust(len(high), "0")[: len(high)]
    if smallest > high or (smallest == high and "lt" in texts):
        raise ConfigError(
            path,
            f"empty range: nothing is at or after {low} and up to {high} (each bound"
            f" compares at its own precision: {high} ends with the values that begin {high})",
        )


def _comparisons(bounds: dict[str, object], kind: Kind, path: str) -> Test:
    """``{gt, ge, lt, le}`` (and ``range``, already turned into ge/le): one value meets all."""
    if kind in ("text", "ip", "via"):
        raise ConfigError(path, f"ranges and comparisons apply to numbers and dates, not {kind}")
    if kind in ("DA", "DT", "TM"):
        checks = []
        for name, bound in bounds.items():
            text = str(bound) if isinstance(bound, int) and not isinstance(bound, bool) else bound
            if not isinstance(text, str):
                raise ConfigError(f"{path}.{name}", f"a {kind} bound is a string like 20260101")
            checks.append(_date_comparison(name, _date_bound(text, kind, f"{path}.{name}"), kind))
        _refuse_empty_date_range(bounds, kind, path)
        return _on_text(_all_tests(checks))
    number_checks: list[Callable[[float], bool]] = []
    numbers: dict[str, float] = {}
    for name, bound in bounds.items():
        number = None if isinstance(bound, bool) else _as_number(bound)
        if number is None:
            raise ConfigError(f"{path}.{name}", f"{bound!r} is not a number")
        numbers[name] = number
        op, limit = _COMPARISONS[name], number
        number_checks.append(_number_comparison(op, limit))
    low = max((numbers[k] for k in ("gt", "ge") if k in numbers), default=-math.inf)
    high = min((numbers[k] for k in ("lt", "le") if k in numbers), default=math.inf)
    if low > high:
        raise ConfigError(path, f"empty range: nothing is above {low} and below {high}")
    return _on_number(_all_tests(number_checks))


def _range_list(spec: object, kind: Kind, path: str) -> Test:
    """``{range: [lo, hi]}``, both ends included; ``null`` leaves an end open."""
    if not isinstance(spec, list) or len(spec) != 2 or spec == [None, None]:
        raise ConfigError(path, "a range is a list of two bounds, [low, high] (null = open)")
    low, high = spec
    bounds = {name: bound for name, bound in (("ge", low), ("le", high)) if bound is not None}
    if (
        kind in ("DA", "DT", "TM")
        and low is not None
        and high is not None
        and len(str(low)) == len(str(high))
        and str(low) > str(high)
    ):
        raise ConfigError(path, f"empty range: {low} is after {high}")
    return _comparisons(bounds, kind, path)


_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RANGE = re.compile(rf"\s*(?P<low>{_NUMBER})?\s*-\s*(?P<high>{_NUMBER})?\s*")


def _dicom_range(spec: str, kind: Kind, path: str) -> Test:
    """PS3.4 C.2.2.2.5 range matching: ``lo-hi``, ``lo-`` or ``-hi``, ends included."""
    low, sep, high = spec.partition("-")
    if not sep or "-" in high or not (low or high):
        raise ConfigError(path, f"bad {kind} range {spec!r}; write 20260101-20261231")
    bounds: dict[str, object] = {}
    if low:
        bounds["ge"] = low
    if high:
        bounds["le"] = high
    return _comparisons(bounds, kind, path)


def _ip_condition(spec: object, path: str) -> Test:
    if not isinstance(spec, str):
        raise ConfigError(path, "source_ip takes an address or network, e.g. 10.0.0.0/8")
    try:
        network = ipaddress.ip_network(spec.strip(), strict=False)
    except ValueError:
        raise ConfigError(path, f"{spec!r} is not an IP address or CIDR network") from None

    def test(values: Values) -> bool:
        for value in values:
            if (
                isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address)
                and value.version == network.version
                and value in network
            ):
                return True
        return False

    return test


def _condition(spec: object, kind: Kind, path: str) -> Test:
    """Compile the value side of one match key."""
    if isinstance(spec, bool) or spec is None:
        raise ConfigError(
            path,
            f"{spec!r} is not a value to match; quote it (YAML reads yes/no/true/false/null"
            ' as booleans or nothing), or use "" for an empty or missing attribute',
        )
    if isinstance(spec, list):
        return _any_of(spec, kind, path)
    if isinstance(spec, dict):
        return _condition_mapping(spec, kind, path)
    if kind == "ip":
        return _is_empty if spec == "" else _ip_condition(spec, path)
    if isinstance(spec, float) and kind in ("number", "other"):
        return _on_number(_number_equals(spec))
    if isinstance(spec, int):
        if kind in ("number", "other"):
            return _on_number(_number_equals(float(spec)))
        spec = str(spec)  # e.g. StudyDate: 20260101 (YAML reads it as a number)
    if not isinstance(spec, str):
        raise ConfigError(path, f"{spec!r} is not a value to match; write it in quotes")
    return _string_condition(spec, kind, path, ignore_case=False)


def _string_condition(spec: str, kind: Kind, path: str, *, ignore_case: bool) -> Test:
    if spec.startswith("ci:"):
        spec, ignore_case = spec[3:], True
    if spec == "":
        return _is_empty
    if kind == "via" and _is_literal(spec) and spec not in RECEIVED_VIA:
        raise ConfigError(path, f"received_via is one of {', '.join(RECEIVED_VIA)}, not {spec!r}")
    if kind in ("DA", "DT", "TM") and "-" in spec and _is_literal(spec):
        return _dicom_range(spec, kind, path)
    if kind in ("DA", "TM") and _is_literal(spec):
        # One date or time: it must be one ('yesterday', '20261301' never match). A DT
        # literal may carry a UTC offset ('+0100'), which its ranges handle.
        _date_bound(spec, kind, path, "value")
    if kind in ("number", "other") and _is_literal(spec) and not ignore_case:
        number = _as_number(spec.strip())
        if number is not None:  # SliceThickness: "5" also matches a DS of "5.0"
            text_check = _text_check(spec, path, False)
            text_test, number_test = _on_text(text_check), _on_number(lambda v: v == number)
            return lambda values: number_test(values) or text_test(values)
        numeric_range = _NUMBER_RANGE.fullmatch(spec)
        if kind == "number" and numeric_range and (numeric_range["low"] or numeric_range["high"]):
            # SeriesNumber: "1-10", the range form dates use; ends included.
            bounds = {"ge": numeric_range["low"], "le": numeric_range["high"]}
            return _comparisons({k: v for k, v in bounds.items() if v}, kind, path)
        if kind == "number":  # '1-10-20', '1-x', 'abc' would never match a number
            raise ConfigError(
                path,
                f"{spec!r} is not a number nor a range like 1-10 (an open end: {{ge: 1}};"
                " '-10' is the number minus ten)",
            )
    return _on_text(_text_check(spec, path, ignore_case))


def _any_of(specs: list[object], kind: Kind, path: str) -> Test:
    if not specs:
        raise ConfigError(path, "an empty list matches nothing; list at least one value")
    if kind in ("text", "via", "DA", "DT", "TM") and all(
        _is_literal(spec) and not (kind != "text" and "-" in str(spec)) for spec in specs
    ):
        for j, spec in enumerate(specs):  # validated one by one for precise error keys
            _condition(spec, kind, f"{path}[{j}]")
        members = frozenset(str(spec) for spec in specs)
        return _on_text(members.__contains__)
    tests = [_condition(spec, kind, f"{path}[{j}]") for j, spec in enumerate(specs)]
    return _any_test(tests)


def _condition_mapping(spec: dict[Any, Any], kind: Kind, path: str) -> Test:
    """``{not: X}``, ``{any: [...]}``, ``{value: X, ignore_case: true}``, ``{ge: 1}`` ...: ANDed."""
    if not spec:
        raise ConfigError(path, f"an empty mapping; use one of {', '.join(_VALUE_KEYS)}")
    for name in spec:
        if name not in _VALUE_KEYS:
            raise ConfigError(f"{path}.{name}", f"unknown condition; use {', '.join(_VALUE_KEYS)}")
    ignore_case = spec.get("ignore_case", False)
    if not isinstance(ignore_case, bool):
        raise ConfigError(f"{path}.ignore_case", "true or false")
    if "ignore_case" in spec and "value" not in spec and "eq" not in spec:
        raise ConfigError(f"{path}.ignore_case", "applies to `value` or `eq`; add one")
    tests: list[Test] = []
    for name, operand in spec.items():
        where = f"{path}.{name}"
        if name == "not":
            inner = _condition(operand, kind, where)
            tests.append(_negated(inner))
        elif name in ("any", "all"):
            if not isinstance(operand, list) or not operand:
                raise ConfigError(where, f"`{name}` takes a non-empty list of conditions")
            parts = [_condition(item, kind, f"{where}[{j}]") for j, item in enumerate(operand)]
            tests.append(_any_test(parts) if name == "any" else _all_tests(parts))
        elif name == "value":
            tests.append(_value_with_case(operand, kind, where, ignore_case))
        elif name == "eq":
            tests.append(_literal(operand, kind, where, ignore_case))
        elif name == "range":
            tests.append(_range_list(operand, kind, where))
    bounds = {name: spec[name] for name in _COMPARISONS if name in spec}
    if bounds:
        tests.append(_comparisons(bounds, kind, path))
    return _all_tests(tests)


def _value_with_case(spec: object, kind: Kind, path: str, ignore_case: bool) -> Test:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(path, "an empty list matches nothing; list at least one value")
        parts = [
            _value_with_case(item, kind, f"{path}[{j}]", ignore_case) for j, item in enumerate(spec)
        ]
        return _any_test(parts)
    if isinstance(spec, str) and kind != "ip":
        return _string_condition(spec, kind, path, ignore_case=ignore_case)
    return _condition(spec, kind, path)


def _literal(spec: object, kind: Kind, path: str, ignore_case: bool) -> Test:
    """``{eq: "A*B"}``: the exact text, with no wildcard, prefix or range meaning."""
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return _condition(spec, kind, path)
    if not isinstance(spec, str) or kind == "ip":
        raise ConfigError(path, "`eq` takes one text value")
    if spec == "":
        return _is_empty
    if ignore_case:
        folded = spec.casefold()
        return _on_text(lambda text: text.casefold() == folded)
    return _on_text(lambda text: text == spec)


# -- compiling whole matches -----------------------------------------------------------------


def _always(inst: _Instance) -> bool:
    return True


def _match_predicate(spec: object, path: str) -> Predicate:
    """Compile a match mapping: every key must hold (AND)."""
    if not isinstance(spec, dict):
        raise ConfigError(path, "a match is a mapping of keys to conditions")
    predicates: list[Predicate] = []
    for key, operand in spec.items():
        where = f"{path}.{key}"
        if key in ("any", "all"):
            if not isinstance(operand, list) or not operand:
                raise ConfigError(where, f"`{key}` takes a non-empty list of matches")
            parts = [_match_predicate(item, f"{where}[{j}]") for j, item in enumerate(operand)]
            predicates.append(_any_test(parts) if key == "any" else _all_tests(parts))
        elif key == "not":
            inner = _match_predicate(operand, where)
            predicates.append(_negated(inner))
        else:
            if not isinstance(key, str):
                raise ConfigError(where, "a match key is a keyword, a tag or a context key")
            predicates.append(_key_predicate(key, where, operand))
    if not predicates:
        return _always
    if len(predicates) == 1:
        return predicates[0]
    if len(predicates) == 2:
        first, second = predicates
        return lambda inst: first(inst) and second(inst)
    return lambda inst: all(predicate(inst) for predicate in predicates)


def _priority(value: object, path: str) -> int:
    if isinstance(value, str) and value in PRIORITIES:
        return PRIORITIES[value]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(path, f"{value!r}: use high, normal, low or an integer")


@dataclass(frozen=True)
class _CompiledRoute:
    decision: RouteDecision
    predicate: Predicate
    final: bool
    fallback: bool


class Router:
    """The compiled ``routes:`` of a configuration; :meth:`match` says which apply."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Sequence[_CompiledRoute]) -> None:
        self._routes = tuple(routes)

    @classmethod
    def compile(cls, routes: Sequence[RouteConfig], destinations: Collection[str]) -> Router:
        """Check and compile routes; raises :class:`ConfigError` naming the bad key."""
        compiled: list[_CompiledRoute] = []
        seen: dict[str, int] = {}
        known = set(destinations)
        for i, route in enumerate(routes):
            prefix = f"routes[{i}]"
            if not route.name.strip():
                raise ConfigError(f"{prefix}.name", "a route needs a name")
            if len(route.name) > NAME_MAX:
                # Every delivery job row names its route (PostgreSQL refused longer ones,
                # so every instance the route matched was refused).
                raise ConfigError(f"{prefix}.name", f"at most {NAME_MAX} characters")
            if route.name in seen:
                raise ConfigError(
                    f"{prefix}.name",
                    f"duplicate route name {route.name!r} (also routes[{seen[route.name]}])",
                )
            seen[route.name] = i
            if not route.to:
                raise ConfigError(f"{prefix}.to", "name at least one destination")
            for name in route.to:
                if name not in known:
                    raise ConfigError(f"{prefix}.to", f"unknown destination {name!r}")
            try:
                stable_after = parse_duration(route.stable_after)
            except ValueError as exc:
                raise ConfigError(f"{prefix}.stable_after", str(exc)) from None
            decision = RouteDecision(
                route=route.name,
                destinations=tuple(dict.fromkeys(route.to)),
                trigger=route.trigger,
                stable_after=stable_after,
                priority=_priority(route.priority, f"{prefix}.priority"),
                pipeline_key=(
                    json.dumps(route.pipeline, sort_keys=True, default=str)
                    if route.pipeline
                    else ""
                ),
            )
            predicate = _match_predicate(route.match, f"{prefix}.match")
            compiled.append(_CompiledRoute(decision, predicate, route.final, route.fallback))
        return cls(compiled)

    def match(self, ds: Dataset, ctx: MatchContext) -> list[RouteDecision]:
        """The routes that apply to the instance ``ds`` received as ``ctx``, in config order.

        Every matching route applies; a matching ``final`` route ends the evaluation; a
        ``fallback`` route is considered only while no earlier route has matched.
        """
        inst = _Instance(ds, ctx)
        decisions: list[RouteDecision] = []
        for route in self._routes:
            if route.fallback and decisions:
                continue
            if route.predicate(inst):
                decisions.append(route.decision)
                if route.final:
                    break
        return decisions

    @property
    def empty(self) -> bool:
        """True when there are no routes: nothing is ever forwarded."""
        return not self._routes

    @property
    def route_names(self) -> tuple[str, ...]:
        """The routes' names, in evaluation order."""
        return tuple(route.decision.route for route in self._routes)

    def same_pipeline(self) -> dict[str, tuple[str, ...]]:
        """For each route, the routes (itself included) with the same ``pipeline``: their
        jobs deliver the same bytes, so one job per instance and destination among them is
        enough (the stable timers' dedupe, :meth:`JobQueue.fire_due_timers`)."""
        groups: dict[str, list[str]] = {}
        for route in self._routes:
            groups.setdefault(route.decision.pipeline_key, []).append(route.decision.route)
        return {
            route.decision.route: tuple(groups[route.decision.pipeline_key])
            for route in self._routes
        }
