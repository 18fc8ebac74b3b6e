"""Configuration model of a route (``routes:`` in the YAML).

The match language is compiled and checked by :mod:`dicomgate.routing.matcher`; the
descriptions here are what ``docs/configuration.md`` shows, so they document it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, StrictInt, field_validator

from dicomgate.models import ConfigModel as _Model

PRIORITIES = {"high": 10, "normal": 0, "low": -10}  # route priority words, as ints

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

# Longest route and destination name: the width of the queue's name columns (LO in
# index/schema.py). A longer one is a config error, not a refusal of every instance.
NAME_MAX = 64


def parse_duration(value: str | float) -> float:
    """Seconds from ``90``, ``"90"``, ``"60s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"1d"``.

    Raises :class:`ValueError` for anything else, or a duration that is not positive.
    """
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a number with a unit")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for found in _DURATION_RE.finditer(text):
                if found.start() != pos:
                    break
                seconds += float(found[1]) * _UNIT_SECONDS[found[2]]
                pos = found.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"{value!r} is not a duration; write e.g. 90, 60s, 5m, 1h30m"
                ) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r} is not a positive duration")
    return seconds


MATCH_DESCRIPTION = (
    "Which instances the route takes. Keys: a DICOM keyword (`Modality`, `StudyDescription`,"
    " `BodyPartExamined`, `ImageType`), a tag as `(0019,100C)` (private tags are matched by"
    " their tag number; the private creator is not checked), or a context key: `calling_ae`,"
    " `called_ae`, `source_ip`, `received_via` (`dimse`, `stow`, `folder` or `recovery`)."
    " Several keys are all required (AND); `any: [{...}, {...}]` needs one of the listed"
    " matches, `all: [...]` every one, `not: {...}` its match to fail. Values:"
    " exact text, case-sensitive (`Modality: CT`);"
    ' `*` (any characters) and `?` (one character) wildcards (`StudyDescription: "*BRAIN*"`);'
    ' a `ci:` prefix for case-insensitive text (`"ci:*brain*"`, same as'
    ' `{value: "*brain*", ignore_case: true}`);'
    " `re:` and a Python regular expression that must match the whole value"
    ' (`"re:(?i).*head.*"`);'
    " a list meaning any of them (`Modality: [CT, MR]`);"
    " `{not: CT}` or `{not: [CT, MR]}`;"
    ' `{eq: "A*B"}` for text taken literally;'
    " numeric comparisons on number attributes (`SeriesNumber: {ge: 1, lt: 100}`,"
    " `SliceThickness: {range: [0.5, 2]}`, both ends included, `null` for an open end;"
    ' or the range form dates use, `SeriesNumber: "1-10"`, `"100-"`; `"-10"` is the'
    " number minus ten, write `{le: 10}` for an open lower end);"
    ' DICOM ranges on dates and times (`StudyDate: "20260101-20261231"`,'
    ' `"20260101-"`, `"-20261231"`, `StudyTime: "0800-1800"`; bounds compare at their'
    ' own precision, so `"2026-"` means from 2026 on; `{ge:, lt:}` work too);'
    ' `source_ip` takes an address or a CIDR network, IPv4 or IPv6 (`[10.0.0.0/8, "fd00::/8"]`).'
    " A multi-valued attribute (`ImageType: ORIGINAL\\PRIMARY`) matches when any of its"
    " values does; `ImageType: {all: [ORIGINAL, PRIMARY]}` needs both."
    ' A missing or empty attribute matches only `""` (e.g. `BodyPartExamined: ""`) and'
    ' `not` conditions, so `Modality: "*"` means "present". A value that cannot be read'
    " never matches; nor does a top-level value the ingest scan does not keep: a text value"
    " over 1 MiB, any other over 16 KiB (before, text over 16 KiB too), or, in an Implicit"
    " VR data set, any value over 16 KiB."
    ' Quote values YAML would read otherwise (`"NO"`, `"0012"`).'
    " `match: {}` matches every instance. Mistakes (unknown keyword, bad regular"
    " expression, bad range, a number attribute given text that is no number nor range,"
    " a date or time off the calendar such as `20261301`) stop the gateway at start-up"
    " with the key named, e.g. `routes[2].match.Modality`."
)


class RouteConfig(_Model):
    """One forwarding rule: which instances, changed how, sent where.

    Routes are evaluated in order and every matching route applies, unless a matching route
    is `final`. To catch what nothing else did, put a route with `match: {}` last and mark it
    `fallback: true` (or mark every route before it `final: true`).
    """

    name: str = Field(
        description=(
            "Name of the route, unique, 1-64 characters, shown in logs, metrics and the queue."
        )
    )
    match: dict[str, Any] = Field(default_factory=dict, description=MATCH_DESCRIPTION)
    pipeline: list[dict[str, Any]] = Field(
        default_factory=list,
        description=(
            "Processing steps applied to the copy sent (never to the stored original), in"
            " order; each is a one-key mapping: `deidentify`, `standardize`, `transcode` or"
            " `split`. Empty sends the instance unchanged."
        ),
    )
    to: list[str] = Field(
        min_length=1,
        description=(
            "Names of destinations (keys of `destinations`) to send to; at least one. When"
            " several matching routes send an instance to the same destination with the same"
            " `pipeline` (none, or identical steps), it is delivered once: one job, at the"
            " highest of their priorities, named after the first of them; with different"
            " pipelines each processed copy is its own delivery. The same holds for"
            " `*_stable` routes: a firing timer adds no job for an instance that already has"
            " one there from a route with the same pipeline (the first to fire names it)."
            " A route with a `pipeline` cannot send to a `webhook` destination:"
            " notifications link to the stored original."
        ),
    )
    final: bool = Field(
        False,
        description=(
            "When this route matches, do not evaluate the routes after it (routes before it"
            " still apply)."
        ),
    )
    fallback: bool = Field(
        False,
        description=(
            "Consider this route only when no earlier route matched: with `match: {}` as the"
            " last route, it catches what nothing else did."
        ),
    )
    trigger: Literal["instance", "series_stable", "study_stable"] = Field(
        "instance",
        description=(
            "When to send: `instance` as each instance arrives; `series_stable` or"
            " `study_stable` once the series or study has received nothing new for"
            " `stable_after`. A stable route sends the instances its `match` took (as"
            " `dicomgate route test` shows), not every instance of the series or study: to"
            " send a whole study once it holds a CT, match what all its instances share."
        ),
    )
    stable_after: str | float = Field(
        "60s",
        description=(
            "Quiet time before a series or study counts as complete, for the `*_stable`"
            " triggers: seconds (`90`) or a number with a unit `ms`, `s`, `m`, `h`, `d`"
            " (`60s`, `5m`, `1h30m`); more than zero."
        ),
    )
    priority: Literal["high", "normal", "low"] | StrictInt = Field(
        "normal",
        description=(
            "Queue priority of this route's deliveries: `high` (10), `normal` (0), `low`"
            " (-10), or an integer; higher is sent first when a destination has a backlog."
        ),
    )

    @field_validator("stable_after", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if not isinstance(value, str | int | float):
            raise ValueError("a duration is a number of seconds or a number with a unit")
        parse_duration(value)
        return value

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_word_or_int(cls, value: object) -> object:
        if (isinstance(value, str) and value in PRIORITIES) or (
            isinstance(value, int) and not isinstance(value, bool)
        ):
            return value
        raise ValueError(f"{value!r}: use high, normal, low or an integer")
