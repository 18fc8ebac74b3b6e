"""Why a route matched an instance or not, key by key: the dry-run of the console and CLI.

:func:`explain` replays :meth:`Router.match <dicomgate.routing.matcher.Router.match>` on
one instance and, for each route, evaluates each top-level key of its ``match:`` on its own
(compiled by the matcher's own ``_match_predicate``, so the verdict cannot drift from the
real routing), together with the values the instance has for that key. :func:`header_diff`
lists what a pipeline changed between the input and output headers.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence as DicomSequence

from dicomgate.processing.base import ProcessingError
from dicomgate.processing.pipeline import Pipeline
from dicomgate.routing.matcher import (
    _CONTEXT_KINDS,
    _TAG_RE,
    MatchContext,
    _Instance,
    _match_predicate,
)
from dicomgate.routing.models import RouteConfig

__all__ = ["DiffRow", "KeyCheck", "RouteExplanation", "explain", "header_diff", "run_pipeline"]

Verdict = Literal["matched", "not matched", "skipped"]


@dataclass(frozen=True)
class KeyCheck:
    """One top-level key of a route's match and how the instance fared on it."""

    key: str  # "Modality", "(0019,100C)", "calling_ae", "any", "not" ...
    condition: str  # the configured condition, as compact JSON
    actual: str  # the instance's value(s) for the key ("" when missing; "-" for any/all/not)
    ok: bool


@dataclass(frozen=True)
class RouteExplanation:
    """One route's verdict for an instance."""

    route: str
    destinations: tuple[str, ...]
    verdict: Verdict
    reason: str  # why, in a sentence
    checks: tuple[KeyCheck, ...] = ()
    has_pipeline: bool = False


def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(", ", ": "))


def _actual(inst: _Instance, ds: Dataset, ctx: MatchContext, key: str) -> str:
    if key in ("any", "all", "not"):
        return "-"
    if key in _CONTEXT_KINDS:
        return str(getattr(ctx, key))
    found = _TAG_RE.fullmatch(key)
    try:
        element = ds[int(found[1] + found[2], 16)] if found else ds.data_element(key)
    except (KeyError, ValueError, TypeError):
        return ""
    if element is None:
        return ""
    return _element_text(element)


def _key_checks(route: RouteConfig, index: int, ds: Dataset, ctx: MatchContext) -> list[KeyCheck]:
    inst = _Instance(ds, ctx)
    checks = []
    for key, operand in route.match.items():
        predicate = _match_predicate({key: operand}, f"routes[{index}].match")
        checks.append(
            KeyCheck(
                key=str(key),
                condition=_compact(operand),
                actual=_actual(inst, ds, ctx, str(key)),
                ok=bool(predicate(inst)),
            )
        )
    return checks


def explain(
    routes: Sequence[RouteConfig], ds: Dataset, ctx: MatchContext
) -> list[RouteExplanation]:
    """Each route's verdict for ``ds`` received as ``ctx``, in evaluation order.

    Follows :meth:`Router.match`: every matching route applies, a matching ``final`` route
    ends the evaluation, a ``fallback`` route counts only while nothing has matched. The
    routes must already have been checked (``Router.compile``), as a loaded config's are.
    """
    out: list[RouteExplanation] = []
    matched_any = False
    final_route: str | None = None
    for i, route in enumerate(routes):
        checks = _key_checks(route, i, ds, ctx)
        matches = bool(_match_predicate(route.match, f"routes[{i}].match")(_Instance(ds, ctx)))
        base = RouteExplanation(
            route=route.name,
            destinations=tuple(dict.fromkeys(route.to)),
            verdict="skipped",
            reason="",
            checks=tuple(checks),
            has_pipeline=bool(route.pipeline),
        )
        if final_route is not None:
            reason = f"not evaluated: the final route {final_route!r} matched before it"
            out.append(replace(base, verdict="skipped", reason=reason))
            continue
        if route.fallback and matched_any:
            reason = "not evaluated: a fallback route applies only when no earlier route matched"
            out.append(replace(base, verdict="skipped", reason=reason))
            continue
        if matches:
            matched_any = True
            reason = "every match key holds" if checks else "no match keys: matches everything"
            if route.final:
                final_route = route.name
                reason += " (final: later routes are not evaluated)"
            out.append(replace(base, verdict="matched", reason=reason))
        else:
            failed = [check.key for check in checks if not check.ok]
            reason = f"does not hold: {', '.join(failed)}" if failed else "the match does not hold"
            out.append(replace(base, verdict="not matched", reason=reason))
    return out


@dataclass(frozen=True)
class DiffRow:
    """One attribute of the header before and after a pipeline."""

    tag: str  # "(0010,0010)"
    keyword: str
    before: str  # "" when absent
    after: str  # "" when absent
    change: Literal["changed", "removed", "added", "same"]


_MAX_VALUE = 120


def _element_text(element: DataElement) -> str:
    if element.VR == "SQ" or isinstance(element.value, DicomSequence):
        return f"<sequence of {len(element.value or [])} items>"
    if element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") or isinstance(
        element.value, bytes | bytearray
    ):
        return f"<{len(element.value or b'')} bytes>"
    try:
        text = str(element.value) if element.value is not None else ""
    except (ValueError, TypeError, LookupError):
        return "<unreadable>"
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 1] + "…"


def _texts(ds: Dataset) -> dict[int, tuple[str, str]]:
    out: dict[int, tuple[str, str]] = {}
    for element in ds:
        if element.tag == 0x7FE00010:  # Pixel Data: compared by size only
            out[int(element.tag)] = ("PixelData", f"<{len(element.value or b'')} bytes>")
            continue
        keyword = keyword_for_tag(element.tag) or ("private" if element.tag.is_private else "")
        out[int(element.tag)] = (keyword, _element_text(element))
    return out


def header_diff(before: Dataset, after: Dataset, *, include_same: bool = False) -> list[DiffRow]:
    """The top-level attributes of two headers side by side, in tag order."""
    old, new = _texts(before), _texts(after)
    rows = []
    for tag in sorted(old.keys() | new.keys()):
        keyword = (old.get(tag) or new[tag])[0]
        a = old[tag][1] if tag in old else ""
        b = new[tag][1] if tag in new else ""
        if tag not in new:
            change: Literal["changed", "removed", "added", "same"] = "removed"
        elif tag not in old:
            change = "added"
        else:
            change = "same" if a == b else "changed"
        if change != "same" or include_same:
            rows.append(DiffRow(f"({tag >> 16:04X},{tag & 0xFFFF:04X})", keyword, a, b, change))
    return rows


@dataclass
class PipelineResult:
    """A route's pipeline run on a copy of the instance."""

    route: str
    outputs: list[Dataset] = field(default_factory=list)
    error: str = ""


def run_pipeline(route: str, pipeline: Pipeline | None, ds: Dataset) -> PipelineResult:
    """Run ``pipeline`` on a deep copy of ``ds`` (the input stays untouched)."""
    result = PipelineResult(route)
    if not pipeline:
        result.outputs = [ds]
        return result
    try:
        result.outputs = pipeline.run(copy.deepcopy(ds))
    except ProcessingError as exc:
        result.error = str(exc)
    return result


def explanation_json(explanations: Sequence[RouteExplanation]) -> list[dict[str, Any]]:
    """The explanations as plain JSON-able dicts."""
    return [
        {
            "route": e.route,
            "destinations": list(e.destinations),
            "verdict": e.verdict,
            "reason": e.reason,
            "checks": [c.__dict__ for c in e.checks],
        }
        for e in explanations
    ]
