"""Route configuration: every route mistake is a config error at load time, naming its key."""

from __future__ import annotations

from typing import Any

import pytest

from dicomgate.config import parse_config
from dicomgate.errors import ConfigError
from dicomgate.routing.matcher import Router
from dicomgate.routing.models import RouteConfig, parse_duration

DESTINATIONS = {
    "pacs": {"type": "dimse", "ae_title": "PACS", "host": "10.0.0.5", "port": 104},
    "share": {"type": "folder", "path": "/mnt/out"},
}


def _config(*routes: dict[str, Any]) -> dict[str, Any]:
    return {"destinations": DESTINATIONS, "routes": [{"to": ["pacs"]} | r for r in routes]}


def _error(*routes: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(*routes), {})
    return info.value


def test_a_rich_configuration_loads_and_compiles() -> None:
    cfg = parse_config(
        _config(
            {
                "name": "ct",
                "match": {
                    "Modality": ["CT", "PT"],
                    "StudyDescription": {"value": "*brain*", "ignore_case": True},
                    "StudyDate": "20260101-",
                    "SeriesNumber": {"range": [1, 100]},
                    "(0019,100C)": "re:B[0-9]+",
                    "calling_ae": "CT*",
                    "source_ip": ["10.0.0.0/8", "fd00::/8"],
                    "received_via": ["dimse", "stow"],
                    "any": [{"BodyPartExamined": "HEAD"}, {"not": {"ImageType": "DERIVED"}}],
                },
                "final": True,
                "priority": "high",
            },
            {"name": "rest", "match": {}, "fallback": True, "to": ["share"]},
        ),
        {},
    )
    router = Router.compile(cfg.routes, cfg.destinations)
    assert not router.empty
    assert router.route_names == ("ct", "rest")


@pytest.mark.parametrize(
    ("match", "key", "problem"),
    [
        ({"Modalty": "CT"}, "routes[0].match.Modalty", "did you mean 'Modality'"),
        ({"modality": "CT"}, "routes[0].match.modality", "did you mean 'Modality'"),
        ({"(0019,10XC)": "x"}, "routes[0].match.(0019,10XC)", "unknown key"),
        ({"Modality": "re:C[T"}, "routes[0].match.Modality", "invalid regular expression"),
        ({"Modality": ["MR", "re:("]}, "routes[0].match.Modality[1]", "invalid regular"),
        ({"Modality": {"not": "re:)"}}, "routes[0].match.Modality.not", "invalid regular"),
        ({"Modality": "re:"}, "routes[0].match.Modality", "empty regular expression"),
        ({"Modality": []}, "routes[0].match.Modality", "empty list"),
        ({"Modality": None}, "routes[0].match.Modality", "quote it"),
        ({"Modality": True}, "routes[0].match.Modality", "quote it"),
        ({"Modality": 1.5}, "routes[0].match.Modality", "quotes"),
        ({"Modality": {"nott": "CT"}}, "routes[0].match.Modality.nott", "unknown condition"),
        ({"Modality": {}}, "routes[0].match.Modality", "empty mapping"),
        ({"Modality": {"ignore_case": True}}, "routes[0].match.Modality.ignore_case", "value"),
        (
            {"Modality": {"value": "ct", "ignore_case": "yes"}},
            "routes[0].match.Modality.ignore_case",
            "true or false",
        ),
        ({"Modality": {"ge": 1}}, "routes[0].match.Modality", "numbers and dates"),
        ({"PixelData": "x"}, "routes[0].match.PixelData", "cannot be matched"),
        ({"ReferencedImageSequence": "x"}, "routes[0].match.ReferencedImageSequence", "VR SQ"),
        ({"SeriesNumber": {"range": [1]}}, "routes[0].match.SeriesNumber.range", "two bounds"),
        ({"SeriesNumber": {"range": [None, None]}}, "routes[0].match.SeriesNumber.range", "two"),
        ({"SeriesNumber": {"range": "1-10"}}, "routes[0].match.SeriesNumber.range", "two bounds"),
        ({"SeriesNumber": {"range": [10, 1]}}, "routes[0].match.SeriesNumber.range", "empty"),
        ({"SeriesNumber": {"gt": 5, "lt": 2}}, "routes[0].match.SeriesNumber", "empty range"),
        ({"SeriesNumber": {"ge": "ten"}}, "routes[0].match.SeriesNumber.ge", "not a number"),
        ({"StudyDate": "20261231-20260101"}, "routes[0].match.StudyDate", "empty range"),
        ({"StudyDate": "2026-01-01"}, "routes[0].match.StudyDate", "bad DA range"),
        ({"StudyDate": "-"}, "routes[0].match.StudyDate", "bad DA range"),
        ({"StudyDate": "2026x-"}, "routes[0].match.StudyDate.ge", "bad DA bound"),
        ({"StudyDate": {"ge": 2.5}}, "routes[0].match.StudyDate.ge", "a DA bound"),
        ({"StudyTime": "25x-"}, "routes[0].match.StudyTime.ge", "bad TM bound"),
        ({"source_ip": "10.0.0.300/8"}, "routes[0].match.source_ip", "not an IP address"),
        ({"source_ip": "10.*"}, "routes[0].match.source_ip", "not an IP address"),
        ({"source_ip": 10}, "routes[0].match.source_ip", "address or network"),
        ({"received_via": "dicomweb"}, "routes[0].match.received_via", "dimse, stow"),
        ({"received_via": ["dimse", "ftp"]}, "routes[0].match.received_via[1]", "not 'ftp'"),
        ({"any": []}, "routes[0].match.any", "non-empty list"),
        ({"any": {"Modality": "CT"}}, "routes[0].match.any", "non-empty list"),
        (
            {"all": [{"Modality": "CT"}, {"Modalty": "MR"}]},
            "routes[0].match.all[1].Modalty",
            "unknown",
        ),
        ({"any": ["CT"]}, "routes[0].match.any[0]", "a match is a mapping"),
        ({"not": {"Modality": "re:["}}, "routes[0].match.not.Modality", "invalid regular"),
        (
            {"Modality": {"any": [{"not": "re:["}]}},
            "routes[0].match.Modality.any[0].not",
            "invalid",
        ),
    ],
)
def test_bad_match_names_the_key(match: dict[str, Any], key: str, problem: str) -> None:
    err = _error({"name": "r", "match": match})
    assert err.key == key
    assert problem in err.problem
    assert str(err).startswith(f"{key}: ")


def test_error_in_a_later_route_names_its_index() -> None:
    err = _error(
        {"name": "a", "match": {"Modality": "CT"}},
        {"name": "b"},
        {"name": "c", "match": {"Modality": "CT", "BodyPartExamined": "re:*"}},
    )
    assert err.key == "routes[2].match.BodyPartExamined"


@pytest.mark.parametrize(
    ("route", "key", "problem"),
    [
        ({"name": "r", "to": ["pacs", "nowhere"]}, "routes[0].to", "unknown destination 'nowhere'"),
        ({"name": "r", "to": []}, "routes[0].to", ""),
        ({"name": "r", "stable_after": "soon"}, "routes[0].stable_after", "not a duration"),
        ({"name": "r", "stable_after": "5 minutes"}, "routes[0].stable_after", "not a duration"),
        ({"name": "r", "stable_after": "0s"}, "routes[0].stable_after", "positive"),
        ({"name": "r", "stable_after": -5}, "routes[0].stable_after", "positive"),
        ({"name": "r", "stable_after": [60]}, "routes[0].stable_after", "duration"),
        ({"name": "r", "priority": "urgent"}, "routes[0].priority", "high, normal, low"),
        ({"name": "r", "priority": True}, "routes[0].priority", "high, normal, low"),
        ({"name": "r", "priority": [1]}, "routes[0].priority", "high, normal, low"),
        ({"name": "r", "trigger": "study"}, "routes[0].trigger", ""),
        ({"name": " "}, "routes[0].name", "needs a name"),
        ({"name": "r", "matches": {}}, "routes[0].matches", "unknown key"),
    ],
)
def test_bad_route_names_the_key(route: dict[str, Any], key: str, problem: str) -> None:
    err = _error(route)
    assert err.key == key
    assert problem in err.problem


def test_duplicate_route_names() -> None:
    err = _error({"name": "a"}, {"name": "b"}, {"name": "a"})
    assert err.key == "routes[2].name"
    assert "routes[0]" in err.problem


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        (2.5, 2.5),
        ("90", 90.0),
        ("60s", 60.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("500ms", 0.5),
        (" 1.5m ", 90.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_compile_checks_models_built_in_code() -> None:
    # Router.compile is the check: a RouteConfig built without the file still gets it.
    route = RouteConfig.model_construct(name="r", match={"Modality": "re:("}, to=["pacs"])
    with pytest.raises(ConfigError) as info:
        Router.compile([route], ["pacs"])
    assert info.value.key == "routes[0].match.Modality"
    bad_priority = RouteConfig.model_construct(
        name="r", to=["pacs"], match={}, stable_after="60s", priority="urgent"
    )
    with pytest.raises(ConfigError) as info:
        Router.compile([bad_priority], ["pacs"])
    assert info.value.key == "routes[0].priority"


def test_route_and_destination_names_fit_the_queue() -> None:
    """The queue's columns keep 64 characters: on PostgreSQL a longer route name made
    every instance the route matched fail its commit. Now a config error."""
    parse_config(_config({"name": "r" * 64}), {})
    err = _error({"name": "r" * 65})
    assert str(err).startswith("routes[0].name") and "at most 64" in str(err)
    with pytest.raises(ConfigError) as info:
        parse_config({"destinations": {"d" * 65: DESTINATIONS["share"]}}, {})
    assert str(info.value).startswith("destinations") and "1-64 characters" in str(info.value)
    parse_config({"destinations": {"d" * 64: DESTINATIONS["share"]}}, {})
