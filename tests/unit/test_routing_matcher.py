"""Route matching: every form of the match language, on real pydicom data sets."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomgate.errors import ConfigError
from dicomgate.routing.matcher import MatchContext, RouteDecision, Router
from dicomgate.routing.models import RouteConfig

DESTINATIONS = ("pacs", "cloud", "share")
DIMSE = MatchContext(calling_ae="CT_SCANNER1", called_ae="DICOMGATE", source_ip="10.1.2.3")


def _dataset(**attributes: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _ct() -> Dataset:
    return _dataset(
        Modality="CT",
        StudyDescription="HEAD^BRAIN ROUTINE",
        BodyPartExamined="HEAD",
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        SeriesNumber=3,
        SliceThickness="2.5",
        StudyDate="20260315",
        StudyTime="101530.25",
        AcquisitionDateTime="20260315101530.000000+0100",
        PatientName="DOE^JANE",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.2",
        SOPInstanceUID="1.2.840.99999.1.2.3",
    )


def _router(*routes: dict[str, Any]) -> Router:
    configs = [RouteConfig.model_validate({"to": ["pacs"]} | route) for route in routes]
    return Router.compile(configs, DESTINATIONS)


def _matches(match: dict[str, Any], ds: Dataset | None = None, ctx: MatchContext = DIMSE) -> bool:
    router = _router({"name": "r", "match": match})
    return [d.route for d in router.match(_ct() if ds is None else ds, ctx)] == ["r"]


# -- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("CT", True),
        ("MR", False),
        ("ct", False),  # case-sensitive by default
        ("C?", True),
        ("?", False),
        ("*", True),
        ("C*", True),
        ("*T", True),
        ("*X*", False),
        ("ci:ct", True),
        ("ci:c?", True),
        ("re:C[TR]", True),
        ("re:C", False),  # a regular expression must match the whole value
        ("ci:re:c[tr]", True),
        (["MR", "CT"], True),
        (["MR", "PT"], False),
        (["MR", "C*"], True),
        ({"not": "CT"}, False),
        ({"not": ["MR", "PT"]}, True),
        ({"value": "ct", "ignore_case": True}, True),
        ({"value": ["mr", "c*"], "ignore_case": True}, True),
        ({"eq": "C*"}, False),  # literal: no wildcard meaning
        ({"eq": "ct", "ignore_case": True}, True),
        ({"any": ["MR", "re:C."]}, True),
        ({"all": ["C*", "*T"]}, True),
        ({"all": ["C*", "*R"]}, False),
        ("", False),
    ],
)
def test_text_conditions(condition: object, expected: bool) -> None:
    assert _matches({"Modality": condition}) is expected


def test_wildcards_and_regex_on_longer_text() -> None:
    assert _matches({"StudyDescription": "*BRAIN*"})
    assert not _matches({"StudyDescription": "*brain*"})
    assert _matches({"StudyDescription": "ci:*brain*"})
    assert _matches({"StudyDescription": "HEAD^?RAIN*"})
    assert _matches({"StudyDescription": "re:HEAD\\^.*"})
    assert not _matches({"StudyDescription": "re:BRAIN"})
    assert _matches({"StudyDescription": "re:.*BRAIN.*"})
    assert _matches({"StudyDescription": "*.*"}) is False  # "." is not special in wildcards


def test_person_name_matches_as_text() -> None:
    assert _matches({"PatientName": "DOE^*"})
    assert not _matches({"PatientName": "SMITH^*"})


def test_uids_match_exactly_and_by_prefix() -> None:
    assert _matches({"SOPInstanceUID": "1.2.840.99999.1.2.3"})
    assert _matches({"SOPInstanceUID": "1.2.840.99999.*"})
    assert not _matches({"SOPInstanceUID": "1.2.840.99999.1.2"})


def test_multi_valued_attribute_matches_when_any_value_does() -> None:
    assert _matches({"ImageType": "PRIMARY"})
    assert _matches({"ImageType": "AX*"})
    assert not _matches({"ImageType": "DERIVED"})
    assert _matches({"ImageType": {"all": ["ORIGINAL", "PRIMARY"]}})
    assert not _matches({"ImageType": {"all": ["ORIGINAL", "SECONDARY"]}})
    assert _matches({"ImageType": {"not": "DERIVED"}})


def test_missing_or_empty_attribute_matches_only_empty_and_not() -> None:
    for ds in (_dataset(Modality="CT"), _dataset(Modality="CT", BodyPartExamined="")):
        assert _matches({"BodyPartExamined": ""}, ds)
        assert not _matches({"BodyPartExamined": "*"}, ds)
        assert not _matches({"BodyPartExamined": "re:.*"}, ds)
        assert not _matches({"SeriesNumber": {"range": [None, 5]}}, ds)
        assert _matches({"BodyPartExamined": {"not": "HEAD"}}, ds)
        assert _matches({"BodyPartExamined": ["", "HEAD"]}, ds)
    assert not _matches({"BodyPartExamined": ""})
    assert _matches({"BodyPartExamined": {"not": ""}})


def test_numbers() -> None:
    assert _matches({"SeriesNumber": 3})
    assert _matches({"SeriesNumber": "3"})
    assert not _matches({"SeriesNumber": 4})
    assert _matches({"SeriesNumber": [1, 2, 3]})
    assert _matches({"SliceThickness": 2.5})
    assert _matches({"SliceThickness": "2.50"})  # compared as numbers
    assert _matches({"SliceThickness": "2.*"})  # wildcards on the written value
    assert _matches({"SeriesNumber": {"range": [1, 10]}})
    assert _matches({"SeriesNumber": {"range": [3, 3]}})
    assert not _matches({"SeriesNumber": {"range": [4, 10]}})
    assert _matches({"SeriesNumber": {"range": [None, 3]}})
    assert _matches({"SeriesNumber": {"ge": 3, "lt": 4}})
    assert not _matches({"SeriesNumber": {"gt": 3}})
    assert _matches({"SliceThickness": {"le": 2.5, "gt": "1"}})
    assert not _matches({"SliceThickness": {"lt": 2.5}})
    assert _matches({"SeriesNumber": {"not": {"range": [10, 20]}}})
    # The "lo-hi" form dates use works on numeric attributes too (ends included).
    assert _matches({"SeriesNumber": "1-10"})
    assert _matches({"SeriesNumber": "3-3"})
    assert not _matches({"SeriesNumber": "4-10"})
    assert _matches({"SeriesNumber": "2-"})
    assert not _matches({"SeriesNumber": "4-"})
    assert _matches({"SliceThickness": "2-2.5"})
    assert _matches({"SeriesNumber": ["10-20", "1-3"]})
    with pytest.raises(ConfigError, match="empty range"):
        _matches({"SeriesNumber": "10-1"})


@pytest.mark.parametrize(
    ("match", "key"),
    [
        ({"SeriesNumber": "1-10-20"}, "SeriesNumber"),
        ({"SeriesNumber": "1--"}, "SeriesNumber"),
        ({"SeriesNumber": "1-x"}, "SeriesNumber"),
        ({"SeriesNumber": "abc"}, "SeriesNumber"),
        ({"StudyDate": "yesterday"}, "StudyDate"),
        ({"StudyDate": "20261301-"}, "StudyDate"),
        ({"StudyDate": "20260132"}, "StudyDate"),
        ({"StudyTime": "25-"}, "StudyTime"),
        ({"StudyTime": "1260"}, "StudyTime"),
        ({"SeriesNumber": ["1-3", "x"]}, "SeriesNumber[1]"),
    ],
)
def test_values_that_could_never_match_are_config_errors(match: dict[str, Any], key: str) -> None:
    """A malformed number range or an impossible date or time passed check-config and then
    matched nothing, so images were silently not routed: now a config error naming it."""
    with pytest.raises(ConfigError, match=re.escape(key)):
        _router({"name": "r", "match": match})
    # What they meant is accepted.
    _router(
        {
            "name": "ok",
            "match": {"SeriesNumber": "-10", "StudyDate": "2026-", "StudyTime": "0800-1800"},
        }
    )


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("20260315", True),
        (20260315, True),  # YAML reads an unquoted date as a number
        ("20260101-20261231", True),
        ("20260101-", True),
        ("-20261231", True),
        ("20260316-", False),
        ("-20260314", False),
        ("20260315-20260315", True),
        ("2026-", True),  # bounds compare at their own precision
        ("202603-202603", True),
        ("2025-2025", False),
        ({"range": ["20260301", "20260331"]}, True),
        ({"range": [20260401, None]}, False),
        ({"ge": "202603", "lt": "202604"}, True),
        ({"gt": "2026"}, False),
        (["20250101-20251231", "20260301-"], True),
        ({"not": "-20251231"}, True),
        ("2026*", True),
    ],
)
def test_dates(condition: object, expected: bool) -> None:
    assert _matches({"StudyDate": condition}) is expected


def test_acr_nema_date_and_time_forms() -> None:
    with pytest.warns(UserWarning, match="Invalid value for VR"):  # pydicom's, not ours
        old = _dataset(StudyDate="2026.03.15", StudyTime="10:15:30")
    assert _matches({"StudyDate": "20260301-20260331"}, old)
    assert _matches({"StudyTime": "1000-1100"}, old)


def test_times_and_datetimes() -> None:
    assert _matches({"StudyTime": "0800-1200"})
    assert _matches({"StudyTime": "1015-1015"})
    assert not _matches({"StudyTime": "1200-"})
    assert _matches({"StudyTime": "101530.25"})
    assert _matches({"AcquisitionDateTime": "20260315-20260315"})
    assert _matches({"AcquisitionDateTime": "2026031510-2026031511"})
    assert not _matches({"AcquisitionDateTime": "-20260314"})
    assert _matches({"AcquisitionDateTime": {"ge": "20260315101530"}})


def test_several_keys_are_anded() -> None:
    assert _matches({"Modality": "CT", "BodyPartExamined": "HEAD"})
    assert not _matches({"Modality": "CT", "BodyPartExamined": "CHEST"})
    assert _matches({"Modality": "CT", "BodyPartExamined": "HEAD", "calling_ae": "CT_*"})


def test_any_all_not_compose_whole_matches() -> None:
    assert _matches({"any": [{"Modality": "MR"}, {"BodyPartExamined": "HEAD"}]})
    assert not _matches({"any": [{"Modality": "MR"}, {"BodyPartExamined": "CHEST"}]})
    assert _matches({"all": [{"Modality": "CT"}, {"BodyPartExamined": "HEAD"}]})
    assert not _matches({"all": [{"Modality": "CT"}, {"BodyPartExamined": "CHEST"}]})
    assert _matches({"not": {"Modality": "MR"}})
    assert not _matches({"not": {"Modality": "CT", "BodyPartExamined": "HEAD"}})
    nested = {
        "Modality": ["CT", "MR"],
        "any": [
            {"all": [{"calling_ae": "MR*"}, {"BodyPartExamined": "KNEE"}]},
            {"all": [{"calling_ae": "CT*"}, {"not": {"StudyDescription": "*RESEARCH*"}}]},
        ],
    }
    assert _matches(nested)


# -- keys --------------------------------------------------------------------------------------


def test_tag_notation_public_and_private() -> None:
    ds = _ct()
    block = ds.private_block(0x0019, "ACME 1.0", create=True)
    block.add_new(0x0C, "LO", "B1000")
    assert _matches({"(0008,0060)": "CT"}, ds)
    assert _matches({"(0019,100C)": "B1*"}, ds)
    assert _matches({"(0019,100c)": "B1000"}, ds)
    assert not _matches({"(0019,100D)": "*"}, ds)
    assert _matches({"(0019,100D)": ""}, ds)


def test_private_tag_read_as_unknown_bytes_from_implicit_vr() -> None:
    # Implicit VR: pydicom cannot know a private element's VR and hands out bytes (UN).
    ds = _dataset(Modality="MR", SOPClassUID="1.2.840.10008.5.1.4.1.1.4", SOPInstanceUID="1.2.3")
    ds.add_new(0x00190010, "LO", "ACME 1.0")  # a creator pydicom has no dictionary for
    ds.add_new(0x0019100C, "IS", "1000")
    read = _roundtrip(ds, implicit=True)
    assert isinstance(read[0x0019100C].value, bytes)
    assert _matches({"(0019,100C)": "1000"}, read)
    assert _matches({"(0019,100C)": 1000}, read)
    assert _matches({"(0019,100C)": {"range": [500, 1500]}}, read)
    assert not _matches({"(0019,100C)": {"gt": 1000}}, read)


def test_context_keys() -> None:
    assert _matches({"calling_ae": "CT_SCANNER1"})
    assert _matches({"calling_ae": "CT_*"})
    assert not _matches({"calling_ae": "ct_*"})  # AE titles are case-sensitive
    assert _matches({"called_ae": "DICOMGATE"})
    assert _matches({"received_via": "dimse"})
    assert not _matches({"received_via": ["stow", "folder"]})
    assert _matches({"received_via": "stow"}, ctx=MatchContext(received_via="stow"))
    assert _matches({"calling_ae": ""}, ctx=MatchContext(received_via="stow"))


@pytest.mark.parametrize(
    ("source_ip", "condition", "expected"),
    [
        ("10.1.2.3", "10.0.0.0/8", True),
        ("10.1.2.3", "10.1.2.3", True),
        ("10.1.2.3", "10.1.2.4", False),
        ("10.1.2.3", ["192.168.0.0/16", "10.1.0.0/16"], True),
        ("10.1.2.3", {"not": "10.0.0.0/8"}, False),
        ("::ffff:10.1.2.3", "10.0.0.0/8", True),  # IPv4-mapped IPv6 peer
        ("fd00::17", "fd00::/8", True),
        ("fd00::17", "10.0.0.0/8", False),
        ("", "10.0.0.0/8", False),
        ("", "", True),
        ("not-an-ip", "0.0.0.0/0", False),
        ("not-an-ip", {"not": "10.0.0.0/8"}, True),
    ],
)
def test_source_ip(source_ip: str, condition: object, expected: bool) -> None:
    ctx = MatchContext(calling_ae="X", source_ip=source_ip)
    assert _matches({"source_ip": condition}, ctx=ctx) is expected


# -- routes --------------------------------------------------------------------------------------


def test_all_matching_routes_apply_in_config_order() -> None:
    router = _router(
        {"name": "all-ct", "match": {"Modality": "CT"}, "to": ["pacs", "cloud"]},
        {"name": "mr", "match": {"Modality": "MR"}},
        {"name": "head", "match": {"BodyPartExamined": "HEAD"}, "to": ["share"]},
    )
    decisions = router.match(_ct(), DIMSE)
    assert [d.route for d in decisions] == ["all-ct", "head"]
    assert decisions[0].destinations == ("pacs", "cloud")
    assert decisions[1].destinations == ("share",)


def test_final_stops_after_a_match_only() -> None:
    router = _router(
        {"name": "mr", "match": {"Modality": "MR"}, "final": True},
        {"name": "ct", "match": {"Modality": "CT"}, "final": True},
        {"name": "everything", "match": {}},
    )
    assert [d.route for d in router.match(_ct(), DIMSE)] == ["ct"]
    assert [d.route for d in router.match(_dataset(Modality="US"), DIMSE)] == ["everything"]


def test_fallback_catches_what_nothing_else_did() -> None:
    router = _router(
        {"name": "ct", "match": {"Modality": "CT"}},
        {"name": "head", "match": {"BodyPartExamined": "HEAD"}},
        {"name": "rest", "match": {}, "fallback": True, "to": ["share"]},
    )
    assert [d.route for d in router.match(_ct(), DIMSE)] == ["ct", "head"]
    assert [d.route for d in router.match(_dataset(Modality="US"), DIMSE)] == ["rest"]
    assert [d.route for d in router.match(Dataset(), MatchContext())] == ["rest"]


def test_decision_carries_trigger_delay_and_priority() -> None:
    router = _router(
        {"name": "a", "trigger": "study_stable", "stable_after": "5m", "priority": "high"},
        {"name": "b", "stable_after": 90, "priority": "low"},
        {"name": "c", "trigger": "series_stable", "stable_after": "1h30m", "priority": 3},
        {"name": "d"},
    )
    assert router.match(_ct(), DIMSE) == [
        RouteDecision("a", ("pacs",), "study_stable", 300.0, 10),
        RouteDecision("b", ("pacs",), "instance", 90.0, -10),
        RouteDecision("c", ("pacs",), "series_stable", 5400.0, 3),
        RouteDecision("d", ("pacs",), "instance", 60.0, 0),
    ]


def test_empty_router() -> None:
    router = Router.compile([], DESTINATIONS)
    assert router.empty
    assert router.match(_ct(), DIMSE) == []
    assert not _router({"name": "x"}).empty


# -- odd data never raises -------------------------------------------------------------------------


def _roundtrip(ds: Dataset, *, implicit: bool = False) -> Dataset:
    """``ds`` written and read back: elements stay raw until accessed, like at ingest."""
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


def test_lazily_converted_dataset() -> None:
    read = _roundtrip(_ct())
    assert isinstance(read.get_item(0x00080060), RawDataElement)
    assert _matches({"Modality": "CT", "StudyDate": "2026-", "ImageType": "PRIMARY"}, read)
    assert _matches({"SeriesNumber": {"range": [1, 5]}, "SliceThickness": 2.5}, read)


def test_bundled_ct_file() -> None:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = dcmread(path)
    assert _matches({"Modality": "CT", "ImageType": "ORIGINAL"}, ds)
    assert _matches({"Manufacturer": "ci:ge*"}, ds)
    assert not _matches({"Modality": "MR"}, ds)


def test_unparseable_values_do_not_match_and_do_not_raise() -> None:
    ds = Dataset()
    ds[0x00200011] = RawDataElement(BaseTag(0x00200011), "US", 3, b"\x01\x02\x03", 0, False, True)
    ds.set_original_encoding(False, True)
    for condition in (1, "*", {"range": [0, 70000]}, ""):
        assert not _matches({"SeriesNumber": condition}, ds)
    assert _matches({"SeriesNumber": {"not": 1}}, ds)


def test_values_of_the_wrong_type_do_not_match() -> None:
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):  # pydicom's, not ours
        ds = _dataset(Modality="CT", SeriesNumber=3, StudyDate="not a date")
    ds.private_block(0x0029, "ACME 1.0", create=True).add_new(0x10, "SQ", Sequence([Dataset()]))
    assert not _matches({"StudyDate": "20260101-"}, ds)
    assert not _matches({"StudyDate": {"ge": "1900"}}, ds)
    assert not _matches({"SeriesNumber": "re:x"}, ds)
    assert _matches({"SeriesNumber": "re:3"}, ds)
    assert not _matches({"(0029,1010)": "*"}, ds)  # a sequence has no text ...
    assert not _matches({"(0029,1010)": {"ge": 0}}, ds)
    assert _matches({"(0029,1010)": {"not": ""}}, ds)  # ... but is present


def test_raw_text_in_a_declared_character_set() -> None:
    ds = _ct()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDescription = "Schädel^Routine"
    for read in (_roundtrip(ds), _roundtrip(ds, implicit=True)):
        assert isinstance(read.get_item(0x00081030), RawDataElement)
        assert _matches({"StudyDescription": "Schädel^*"}, read)
        assert _matches({"StudyDescription": "ci:schädel*"}, read)
        assert _matches({"ImageType": "PRIMARY", "Modality": "CT"}, read)
