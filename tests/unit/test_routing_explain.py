"""The dry-run explanation: each route's verdict and each match key's, as Router.match sees it."""

from __future__ import annotations

from pydicom import Dataset

from dicomgate.routing.explain import explain, header_diff
from dicomgate.routing.matcher import MatchContext, Router
from dicomgate.routing.models import RouteConfig


def _routes(*specs: dict[str, object]) -> list[RouteConfig]:
    routes = [RouteConfig.model_validate({"to": ["pacs"], **spec}) for spec in specs]
    Router.compile(routes, ["pacs"])
    return routes


def _ct() -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = "Doe^Jane"
    return ds


def test_verdicts_follow_router_match_with_final_and_fallback() -> None:
    routes = _routes(
        {"name": "mr", "match": {"Modality": "MR", "calling_ae": "MRI*"}},
        {"name": "chest", "match": {"BodyPartExamined": ["CHEST", "LUNG"]}, "final": True},
        {"name": "after-final", "match": {}},
        {"name": "fallback", "match": {}, "fallback": True},
    )
    ctx = MatchContext(calling_ae="MRI_1")
    result = explain(routes, _ct(), ctx)
    assert [(x.route, x.verdict) for x in result] == [
        ("mr", "not matched"),
        ("chest", "matched"),
        ("after-final", "skipped"),
        ("fallback", "skipped"),
    ]
    mr = result[0]
    assert mr.reason == "does not hold: Modality"
    assert [(c.key, c.ok, c.actual) for c in mr.checks] == [
        ("Modality", False, "CT"),
        ("calling_ae", True, "MRI_1"),
    ]
    assert "final" in result[1].reason and "'chest'" in result[2].reason
    matched = [d.route for d in Router.compile(routes, ["pacs"]).match(_ct(), ctx)]
    assert matched == [x.route for x in result if x.verdict == "matched"]


def test_fallback_applies_when_nothing_matched_and_composite_keys() -> None:
    routes = _routes(
        {"name": "not-ct", "match": {"not": {"Modality": "CT"}}},
        {"name": "any", "match": {"any": [{"Modality": "MR"}, {"(0018,0015)": "LUNG"}]}},
        {"name": "fallback", "match": {}, "fallback": True},
    )
    result = explain(routes, _ct(), MatchContext())
    assert [x.verdict for x in result] == ["not matched", "not matched", "matched"]
    assert result[0].checks[0].actual == "-" and not result[0].checks[0].ok
    assert result[2].reason == "no match keys: matches everything"


def test_header_diff_lists_changed_removed_and_added() -> None:
    before = _ct()
    after = _ct()
    after.PatientName = "ANON"
    del after.BodyPartExamined
    after.PatientIdentityRemoved = "YES"
    rows = {row.keyword: row for row in header_diff(before, after)}
    assert rows["PatientName"].change == "changed" and rows["PatientName"].before == "Doe^Jane"
    assert rows["BodyPartExamined"].change == "removed" and rows["BodyPartExamined"].after == ""
    assert rows["PatientIdentityRemoved"].change == "added"
    assert "Modality" not in rows
    assert len(header_diff(before, after, include_same=True)) == 4
