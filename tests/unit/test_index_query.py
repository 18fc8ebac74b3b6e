"""QIDO/C-FIND matching (index/query.py) on a real index: SQLite, and PostgreSQL.

Every test runs on both backends (PostgreSQL at 127.0.0.1:5432; skipped with the reason
when unreachable): wildcards are GLOB on SQLite and LIKE on PostgreSQL, and both must be
case-sensitive and treat '[', '%' and '_' literally.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from dicomgate.config import DuplicatePolicy
from dicomgate.index.db import Index, StoredInstance
from dicomgate.index.extract import extract_record
from dicomgate.index.query import InvalidQuery, Level, QueryOptions, QueryResult, search

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"

# (patient id, name, study uid, date, time, accession, description, [(series uid, modality,
# number, sop class, instance count)])
STUDIES: list[tuple[str, str, str, str, str, str, str, list[tuple[str, str, int, str, int]]]] = [
    (
        "P1",
        "Doe^John",
        "1.2.1",
        "20230105",
        "101500",
        "ACC1",
        "MR BRAIN",
        [("1.2.1.1", "MR", 1, MRImageStorage, 3), ("1.2.1.2", "CT", 2, CTImageStorage, 1)],
    ),
    (
        "P2",
        "Buc^Jérôme",
        "1.2.2",
        "20230110",
        "083000",
        "ACC2",
        "CT CHEST",
        [("1.2.2.1", "CT", 1, CTImageStorage, 2)],
    ),
    (
        "P3",
        "DOE^JANE",
        "1.2.3",
        "20230110",
        "170000",
        "acc3",
        "mr knee",
        [("1.2.3.1", "MR", 1, MRImageStorage, 1)],
    ),
    (
        "P4",
        "Smith^Anna Maria",
        "1.2.4",
        "20221231",
        "235959.5",
        "ACC4",
        "X[1]_%test",
        [("1.2.4.1", "SR", 7, SR_STORAGE, 1)],
    ),
]


def _items() -> Iterator[StoredInstance]:
    for pid, name, study_uid, day, time, accession, description, all_series in STUDIES:
        for series_uid, modality, number, sop_class, count in all_series:
            for i in range(1, count + 1):
                ds = Dataset()
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.PatientID = pid
                ds.PatientName = name
                ds.PatientBirthDate = "19700101"
                ds.PatientSex = "M"
                ds.StudyInstanceUID = study_uid
                ds.StudyDate = day
                ds.StudyTime = time
                ds.AccessionNumber = accession
                ds.StudyDescription = description
                ds.ReferringPhysicianName = "Referrer^Rita"
                ds.StudyID = study_uid[-1]
                ds.SeriesInstanceUID = series_uid
                ds.Modality = modality
                ds.SeriesNumber = number
                ds.SeriesDate = day
                ds.SOPClassUID = sop_class
                ds.SOPInstanceUID = f"{series_uid}.{i}"
                ds.InstanceNumber = i
                ds.Rows = 64
                ds.Columns = 64
                ds.BitsAllocated = 16
                yield StoredInstance(
                    record=extract_record(ds),
                    relpath=f"{study_uid}/{series_uid}/{i}.dcm",
                    size=100,
                    sha256="ab" * 32,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    calling_ae="MODALITY",
                    called_ae="DICOMGATE",
                    source_ip="10.0.0.7",
                    received_via="dimse",
                    received_at=T0,
                )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def index(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Index]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('query')}/index.db"
    else:
        url = request.getfixturevalue("database_url")
    idx = Index.open(url)
    idx.record(list(_items()), DuplicatePolicy.KEEP_BOTH)
    yield idx
    idx.close()


def find(idx: Index, level: Level, keys: dict[str, str], **options: Any) -> QueryResult:
    with idx.engine.connect() as connection:
        return search(connection, level, keys, QueryOptions(**options))


def studies(idx: Index, keys: dict[str, str], **options: Any) -> list[str]:
    return [str(m.study_uid) for m in find(idx, Level.STUDY, keys, **options).matches]


def value(result: QueryResult, keyword: str, row: int = 0) -> Any:
    for attribute, found in result.matches[row].values.items():
        if attribute.keyword == keyword:
            return found
    raise KeyError(keyword)


def test_single_value_matching_is_exact_and_case_sensitive(index: Index) -> None:
    assert studies(index, {"PatientID": "P1"}) == ["1.2.1"]
    assert studies(index, {"AccessionNumber": "ACC3"}) == []
    assert studies(index, {"AccessionNumber": "acc3"}) == ["1.2.3"]
    assert studies(index, {"00100020": "P2"}) == ["1.2.2"]  # a tag works as a key
    assert studies(index, {"PatientName": "Doe^John"}) == ["1.2.1"]
    assert studies(index, {"PatientName": "DOE^JOHN"}) == []


def test_universal_matching_returns_everything_in_arrival_order(index: Index) -> None:
    assert studies(index, {}) == ["1.2.1", "1.2.2", "1.2.3", "1.2.4"]
    assert studies(index, {"PatientName": ""}) == ["1.2.1", "1.2.2", "1.2.3", "1.2.4"]
    assert studies(index, {"PatientName": "*"}) == ["1.2.1", "1.2.2", "1.2.3", "1.2.4"]


def test_wildcards_are_case_sensitive_and_other_characters_literal(index: Index) -> None:
    assert studies(index, {"PatientName": "Doe*"}) == ["1.2.1"]
    assert studies(index, {"PatientName": "DOE*"}) == ["1.2.3"]
    assert studies(index, {"PatientName": "D?E^*"}) == ["1.2.3"]
    assert studies(index, {"PatientName": "*r*"}) == ["1.2.2", "1.2.4"]
    assert studies(index, {"StudyDescription": "*[1]_%*"}) == ["1.2.4"]
    assert studies(index, {"StudyDescription": "*_*"}) == ["1.2.4"]
    assert studies(index, {"StudyDescription": "X[1]?%test"}) == ["1.2.4"]
    assert studies(index, {"StudyDescription": "%"}) == []


def test_date_ranges(index: Index) -> None:
    assert studies(index, {"StudyDate": "20230101-20230109"}) == ["1.2.1"]
    assert studies(index, {"StudyDate": "20230110-"}) == ["1.2.2", "1.2.3"]
    assert studies(index, {"StudyDate": "-20221231"}) == ["1.2.4"]
    assert studies(index, {"StudyDate": "20230110"}) == ["1.2.2", "1.2.3"]


def test_time_ranges_compare_any_precision(index: Index) -> None:
    assert studies(index, {"StudyTime": "080000-120000"}) == ["1.2.1", "1.2.2"]
    assert studies(index, {"StudyTime": "1700-"}) == ["1.2.3", "1.2.4"]
    assert studies(index, {"StudyTime": "-10"}) == ["1.2.1", "1.2.2"]  # to 10:59:59.999999
    assert studies(index, {"StudyTime": "-09"}) == ["1.2.2"]
    assert studies(index, {"StudyTime": "101500-101500"}) == ["1.2.1"]
    assert studies(index, {"StudyTime": "235959"}) == ["1.2.4"]  # 23:59:59.5 is in 23:59:59


def test_date_and_time_ranges_combine_into_one_datetime_range(index: Index) -> None:
    # PS3.4 C.2.2.2.5.1: from 2023-01-05 10:00 to 2023-01-10 09:00, not two separate ranges.
    keys = {"StudyDate": "20230105-20230110", "StudyTime": "100000-090000"}
    assert studies(index, keys) == ["1.2.1", "1.2.2"]
    assert studies(index, {"StudyDate": "20230105-", "StudyTime": "110000-"}) == ["1.2.2", "1.2.3"]


def test_uid_lists(index: Index) -> None:
    assert studies(index, {"StudyInstanceUID": "1.2.1\\1.2.3"}) == ["1.2.1", "1.2.3"]
    assert studies(index, {"StudyInstanceUID": "1.2.4,1.2.2"}) == ["1.2.2", "1.2.4"]
    assert studies(index, {"StudyInstanceUID": "1.2.9"}) == []


def test_fuzzy_person_names_ignore_case_accents_and_component_order(index: Index) -> None:
    assert studies(index, {"PatientName": "jerome"}, fuzzy=True) == ["1.2.2"]
    assert studies(index, {"PatientName": "jerome"}) == []
    assert studies(index, {"PatientName": "john doe"}, fuzzy=True) == ["1.2.1"]
    assert studies(index, {"PatientName": "doe"}, fuzzy=True) == ["1.2.1", "1.2.3"]
    assert studies(index, {"PatientName": "BUC^JÉR*"}, fuzzy=True) == ["1.2.2"]
    assert studies(index, {"PatientName": "maria"}, fuzzy=True) == ["1.2.4"]
    assert studies(index, {"PatientName": "oe"}, fuzzy=True) == []  # words start components
    assert studies(index, {"ReferringPhysicianName": "rita"}, fuzzy=True) == [
        "1.2.1",
        "1.2.2",
        "1.2.3",
        "1.2.4",
    ]


def test_modalities_in_study_matches_and_is_computed(index: Index) -> None:
    assert studies(index, {"ModalitiesInStudy": "CT"}) == ["1.2.1", "1.2.2"]
    assert studies(index, {"ModalitiesInStudy": "CT\\SR"}) == ["1.2.1", "1.2.2", "1.2.4"]
    result = find(index, Level.STUDY, {"PatientID": "P1"}, default_levels=[Level.STUDY])
    assert value(result, "ModalitiesInStudy") == ["CT", "MR"]
    assert value(result, "NumberOfStudyRelatedSeries") == 2
    assert value(result, "NumberOfStudyRelatedInstances") == 4
    assert value(result, "InstanceAvailability") == "ONLINE"
    sop = find(index, Level.STUDY, {"SOPClassesInStudy": SR_STORAGE})
    assert [m.study_uid for m in sop.matches] == ["1.2.4"]


def test_series_and_instance_levels(index: Index) -> None:
    result = find(index, Level.SERIES, {"StudyInstanceUID": "1.2.1"}, default_levels=[Level.SERIES])
    assert [m.series_uid for m in result.matches] == ["1.2.1.1", "1.2.1.2"]
    assert value(result, "NumberOfSeriesRelatedInstances", 0) == 3
    assert value(result, "SeriesNumber", 1) == 2
    assert [m.series_uid for m in find(index, Level.SERIES, {"Modality": "CT"}).matches] == [
        "1.2.1.2",
        "1.2.2.1",
    ]
    assert [m.series_uid for m in find(index, Level.SERIES, {"SeriesNumber": "7"}).matches] == [
        "1.2.4.1"
    ]
    images = find(
        index,
        Level.IMAGE,
        {"SeriesInstanceUID": "1.2.1.1", "InstanceNumber": "2"},
        default_levels=[Level.IMAGE],
    )
    assert [m.sop_instance_uid for m in images.matches] == ["1.2.1.1.2"]
    assert value(images, "Rows") == 64
    assert images.matches[0].study_uid == "1.2.1"
    ct = find(index, Level.IMAGE, {"SOPClassUID": CTImageStorage, "PatientID": "P2"})
    assert [m.sop_instance_uid for m in ct.matches] == ["1.2.2.1.1", "1.2.2.1.2"]


def test_patient_level(index: Index) -> None:
    result = find(
        index, Level.PATIENT, {"PatientName": "DOE*", "NumberOfPatientRelatedInstances": ""}
    )
    assert [value(result, "PatientID", i) for i in range(len(result.matches))] == ["P3"]
    assert value(result, "NumberOfPatientRelatedInstances") == 1


def test_limit_and_offset_page_stably(index: Index) -> None:
    pages = [studies(index, {}, limit=2, offset=offset) for offset in (0, 2, 4)]
    assert pages == [["1.2.1", "1.2.2"], ["1.2.3", "1.2.4"], []]
    first = find(index, Level.STUDY, {}, limit=3)
    assert first.more and len(first.matches) == 3
    assert not find(index, Level.STUDY, {}, limit=4).more
    assert find(index, Level.STUDY, {}, limit=0).matches == []


def test_includefield_and_all(index: Index) -> None:
    result = find(index, Level.STUDY, {"PatientID": "P1"}, include=["StudyDescription", "00100040"])
    keywords = {a.keyword for a in result.matches[0].values}
    assert keywords == {"PatientID", "StudyDescription", "PatientSex", "StudyInstanceUID"}
    everything = find(index, Level.SERIES, {"Modality": "SR"}, include_all=True)
    keywords = {a.keyword for a in everything.matches[0].values}
    assert {"BodyPartExamined", "PatientBirthDate", "NumberOfStudyRelatedInstances"} <= keywords
    assert "SOPInstanceUID" not in keywords


def test_unsupported_keys_are_reported_not_matched(index: Index) -> None:
    result = find(index, Level.STUDY, {"PatientWeight": "70", "Modality": "CT"})
    assert [m.study_uid for m in result.matches] == ["1.2.1", "1.2.2", "1.2.3", "1.2.4"]
    assert len(result.warnings) == 2
    assert "PatientWeight" in result.warnings[0]
    assert "Modality" in result.warnings[1] and "study level" in result.warnings[1]
    counted = find(index, Level.STUDY, {"NumberOfStudyRelatedSeries": "2"})
    assert len(counted.matches) == 4 and "not supported" in counted.warnings[0]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"NoSuchAttribute": "x"}, "unknown attribute"),
        ({"StudyDate": "2023-01-05"}, "not a value or a range"),
        ({"StudyDate": "20230132"}, "does not exist"),
        ({"StudyDate": "20230110-20230101"}, "ends before"),
        ({"StudyDate": "-"}, "empty range"),
        ({"StudyTime": "2500"}, "HH[MM"),
        ({"StudyInstanceUID": "1.2/3"}, "not a UID"),
        ({"StudyInstanceUID": "1.2.3\\" + "4" * 65}, "not a UID"),
        ({"SeriesNumber": "two"}, "not an integer"),
        ({"PatientName": "x" * 2000}, "longer than"),
    ],
)
def test_malformed_keys_are_refused(index: Index, keys: dict[str, str], message: str) -> None:
    level = Level.SERIES if "SeriesNumber" in keys else Level.STUDY
    with pytest.raises(InvalidQuery, match=message.replace("[", r"\[")):
        find(index, level, keys)


def test_json_rendering_follows_ps3_18_f2(index: Index) -> None:
    result = find(index, Level.STUDY, {"PatientID": "P2"}, default_levels=[Level.STUDY])
    body = result.matches[0].to_json()
    assert body["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Buc^Jérôme"}]}
    assert body["00201208"] == {"vr": "IS", "Value": [2]}
    assert body["00080061"] == {"vr": "CS", "Value": ["CT"]}
    assert body["0020000D"] == {"vr": "UI", "Value": ["1.2.2"]}
    assert body["00081190"] == {"vr": "UR"}  # RetrieveURL: the QIDO layer fills it
    assert list(body) == sorted(body)
    assert all("vr" in element for element in body.values())


def test_dataset_rendering_for_c_find(index: Index) -> None:
    result = find(index, Level.SERIES, {"SeriesInstanceUID": "1.2.2.1", "PatientName": ""})
    ds = result.matches[0].to_dataset()
    assert ds.SeriesInstanceUID == "1.2.2.1"
    assert ds.StudyInstanceUID == "1.2.2"
    assert str(ds.PatientName) == "Buc^Jérôme"
    assert ds.SpecificCharacterSet == "ISO_IR 192"


def test_sequence_item_keys(index: Index, tmp_path: Path) -> None:
    result = find(
        index,
        Level.SERIES,
        {"RequestAttributesSequence.RequestedProcedureID": "", "SeriesInstanceUID": "1.2.4.1"},
    )
    assert result.matches[0].to_json()["00400275"] == {"vr": "SQ"}


# -- C-FIND identifiers and retrieve files (issue #5) --------------------------------------


def test_identifier_keys_flatten_sequences_and_skip_non_keys() -> None:
    from dicomgate.index.query import identifier_keys

    item = Dataset()
    item.RequestedProcedureID = "RP7"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = ["1.2.1", "1.2.2"]
    ds.PatientName = ""
    ds.RequestAttributesSequence = [item]
    assert identifier_keys(ds) == {
        "StudyInstanceUID": "1.2.1\\1.2.2",
        "PatientName": "",
        "RequestAttributesSequence.RequestedProcedureID": "RP7",
    }
    empty = Dataset()
    empty.RequestAttributesSequence = []  # universal: every item attribute the index holds
    assert set(identifier_keys(empty)) == {
        "RequestAttributesSequence.ScheduledProcedureStepID",
        "RequestAttributesSequence.RequestedProcedureID",
    }
    two = Dataset()
    two.RequestAttributesSequence = [Dataset(), Dataset()]
    with pytest.raises(InvalidQuery, match="one item"):
        identifier_keys(two)


def test_sequence_matching_on_item_values(index: Index) -> None:
    result = find(
        index,
        Level.SERIES,
        {"RequestAttributesSequence.RequestedProcedureID": "NOPE", "SeriesInstanceUID": ""},
    )
    assert result.matches == []


def test_instance_files_of_matching_entities(index: Index) -> None:
    from dicomgate.index.query import instance_files

    with index.engine.connect() as connection:
        files = instance_files(connection, {"StudyInstanceUID": "1.2.1"})
        assert [f.sop_instance_uid for f in files][:1] and len(files) == 4
        assert {f.series_instance_uid for f in files} == {"1.2.1.1", "1.2.1.2"}
        assert files[0].relpath.startswith("1.2.1/")
        assert instance_files(connection, {"PatientID": "P2", "Modality": "CT"})[0].size == 100
        assert instance_files(connection, {"SOPInstanceUID": "9.9"}) == []
