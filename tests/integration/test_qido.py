"""QIDO-RS on a real gateway, searched with ``dicomweb-client`` (a client we did not write).

One gateway per module: the query corpus (tests/qido_corpus.py) is sent once with DCMTK
storescu, then every test only reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from tests.conftest import GatewayProcess, loaded_gateway, needs_dcmtk
from tests.qido_corpus import QueryCorpus, write_query_corpus

pytestmark = needs_dcmtk


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, QueryCorpus]]:
    root = tmp_path_factory.mktemp("qido")
    corpus = write_query_corpus(root / "corpus")
    with loaded_gateway(root / "gw", corpus.files) as gw:
        yield gw, corpus


@pytest.fixture(scope="module")
def client(served: tuple[GatewayProcess, QueryCorpus]) -> DICOMwebClient:
    return DICOMwebClient(url=served[0].url("/dicomweb"))


@pytest.fixture(scope="module")
def corpus(served: tuple[GatewayProcess, QueryCorpus]) -> QueryCorpus:
    return served[1]


def values(results: list[dict[str, Any]], tag: str) -> list[Any]:
    """The first value of ``tag`` in each result (None when it has none)."""
    out = []
    for result in results:
        element = result.get(tag, {})
        out.append(element["Value"][0] if element.get("Value") else None)
    return out


def study_keys(corpus: QueryCorpus, results: list[dict[str, Any]]) -> list[str]:
    return [corpus.key_of(uid) for uid in values(results, "0020000D")]


def test_every_resource_answers_with_default_attributes(
    served: tuple[GatewayProcess, QueryCorpus], client: DICOMwebClient
) -> None:
    gw, corpus = served
    studies = client.search_for_studies()
    assert study_keys(corpus, studies) == ["A", "B", "C", "D"]
    first = studies[0]
    assert first["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert first["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert first["00201206"] == {"vr": "IS", "Value": [2]}
    assert first["00201208"] == {"vr": "IS", "Value": [3]}
    assert first["00080056"] == {"vr": "CS", "Value": ["ONLINE"]}
    assert first["00081190"]["Value"] == [gw.url(f"/dicomweb/studies/{corpus.study['A']}")]
    assert all("vr" in element for element in first.values())

    series = client.search_for_series(study_instance_uid=corpus.study["A"])
    assert values(series, "0020000E") == corpus.series["A"]
    assert values(series, "00080060") == ["MR", "CT"]
    assert values(series, "00201209") == [2, 1]
    assert "00100010" not in series[0]  # study attributes only when the study is not fixed
    assert series[1]["00081190"]["Value"] == [
        gw.url(f"/dicomweb/studies/{corpus.study['A']}/series/{corpus.series['A'][1]}")
    ]

    all_series = client.search_for_series()
    assert len(all_series) == 5
    assert values(all_series, "00100020") == ["QP1", "QP1", "QP2", "QP3", "QP4"]
    # Study-level computed attributes are the study's, not the series' (default study
    # attributes come with /series).
    assert values(all_series, "00201206") == [2, 2, 1, 1, 1]
    assert values(all_series, "00201208") == [3, 3, 2, 1, 1]
    assert values(all_series, "00201209") == [2, 1, 2, 1, 1]

    instances = client.search_for_instances(
        study_instance_uid=corpus.study["A"], series_instance_uid=corpus.series["A"][0]
    )
    assert values(instances, "00080018") == corpus.instances["A"][:2]
    assert values(instances, "00280010") == [64, 64]
    assert values(instances, "00200013") == [1, 2]
    url = instances[0]["00081190"]["Value"][0]
    assert url.endswith(
        f"/studies/{corpus.study['A']}/series/{corpus.series['A'][0]}"
        f"/instances/{corpus.instances['A'][0]}"
    )

    in_study = client.search_for_instances(study_instance_uid=corpus.study["A"])
    assert values(in_study, "00080018") == corpus.instances["A"]
    assert values(in_study, "00080060") == ["MR", "MR", "CT"]  # series attributes included

    everything = client.search_for_instances()
    assert len(everything) == 7
    assert "00100010" in everything[0] and "00080060" in everything[0]

    assert client.search_for_series(study_instance_uid="1.2.3.999") == []


@pytest.mark.parametrize(
    ("filters", "fuzzy", "expected"),
    [
        ({"PatientID": "QP2"}, None, ["B"]),
        ({"00100020": "QP3"}, None, ["C"]),  # tag as key
        ({"PatientName": "Doe^John"}, None, ["A"]),
        ({"PatientName": "DOE^JOHN"}, None, []),  # literal matching is case-sensitive
        ({"PatientName": "Doe*"}, None, ["A"]),
        ({"PatientName": "D?E^J*"}, None, ["C"]),
        ({"AccessionNumber": "QA?"}, None, ["A", "B", "C", "D"]),
        ({"StudyDate": "20230101-20230109"}, None, ["A"]),
        ({"StudyDate": "20230110-"}, None, ["B", "C"]),
        ({"StudyDate": "-20221231"}, None, ["D"]),
        ({"StudyTime": "080000-120000"}, None, ["A", "B"]),
        ({"StudyDate": "20230105-20230110", "StudyTime": "100000-090000"}, None, ["A", "B"]),
        ({"ModalitiesInStudy": "CT"}, None, ["A"]),
        ({"PatientName": "jerome"}, True, ["B"]),
        ({"PatientName": "jerome"}, False, []),
        ({"PatientName": "john doe"}, True, ["A"]),
        ({"PatientName": "doe"}, True, ["A", "C"]),
        ({"PatientName": "JÉRÔ*"}, True, ["B"]),
    ],
)
def test_study_matching(
    client: DICOMwebClient,
    corpus: QueryCorpus,
    filters: dict[str, str],
    fuzzy: bool | None,
    expected: list[str],
) -> None:
    results = client.search_for_studies(search_filters=filters, fuzzymatching=fuzzy)
    assert study_keys(corpus, results) == expected
    for key in filters:
        if not key.startswith("0"):  # matching keys come back in every result
            tag = {
                "PatientID": "00100020",
                "PatientName": "00100010",
                "AccessionNumber": "00080050",
                "StudyDate": "00080020",
                "StudyTime": "00080030",
                "ModalitiesInStudy": "00080061",
            }[key]
            assert all(tag in result for result in results)


def test_uid_lists(client: DICOMwebClient, corpus: QueryCorpus) -> None:
    wanted = [corpus.study["D"], corpus.study["B"]]
    repeated = client.search_for_studies(search_filters={"StudyInstanceUID": wanted})
    assert study_keys(corpus, repeated) == ["B", "D"]
    joined = client.search_for_studies(search_filters={"StudyInstanceUID": ",".join(wanted)})
    assert study_keys(corpus, joined) == ["B", "D"]
    sops = corpus.instances["A"][1:] + corpus.instances["C"]
    found = client.search_for_instances(search_filters={"SOPInstanceUID": "\\".join(sops)})
    assert values(found, "00080018") == sops


def test_a_uid_key_and_the_path_constrain_together(
    client: DICOMwebClient, corpus: QueryCorpus
) -> None:
    """The study in the path and a StudyInstanceUID key both apply: another study in the
    key leaves nothing (the key was dropped, and study A's series came back)."""
    a, b = corpus.study["A"], corpus.study["B"]
    other = client.search_for_series(study_instance_uid=a, search_filters={"StudyInstanceUID": b})
    assert other == []
    both = client.search_for_series(
        study_instance_uid=a, search_filters={"StudyInstanceUID": f"{b},{a}"}
    )
    assert values(both, "0020000E") == corpus.series["A"]
    series = client.search_for_instances(
        study_instance_uid=a,
        series_instance_uid=corpus.series["A"][0],
        search_filters={"SeriesInstanceUID": corpus.series["B"][0]},
    )
    assert series == []


def test_series_and_instance_matching(client: DICOMwebClient, corpus: QueryCorpus) -> None:
    ct = client.search_for_series(search_filters={"Modality": "CT"})
    assert values(ct, "0020000E") == [corpus.series["A"][1]]
    numbered = client.search_for_series(search_filters={"SeriesNumber": "4"})
    assert values(numbered, "0020000E") == [corpus.series["A"][1]]
    second = client.search_for_instances(
        study_instance_uid=corpus.study["B"], search_filters={"InstanceNumber": "2"}
    )
    assert values(second, "00080018") == [corpus.instances["B"][1]]
    by_class = client.search_for_instances(
        search_filters={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}
    )
    assert values(by_class, "00080018") == [corpus.instances["A"][2]]


def test_includefield_limit_and_offset(client: DICOMwebClient, corpus: QueryCorpus) -> None:
    described = client.search_for_studies(fields=["StudyDescription", "00081030"])
    assert values(described, "00081030") == ["MR BRAIN", "MR HEAD", "MR KNEE", "OTHER"]
    every = client.search_for_series(study_instance_uid=corpus.study["A"], fields=["all"])
    assert {"00180015", "0008103E", "00200011"} <= set(every[0])
    assert values(every, "0008103E") == ["t2_tse_tra", "ct localizer"]

    pages = [client.search_for_studies(limit=3, offset=offset) for offset in (0, 3, 6)]
    assert [study_keys(corpus, page) for page in pages] == [["A", "B", "C"], ["D"], []]
    remaining = client.search_for_studies(limit=1, get_remaining=True)
    assert study_keys(corpus, remaining) == ["A", "B", "C", "D"]


def test_accept_header(served: tuple[GatewayProcess, QueryCorpus]) -> None:
    gw, _ = served
    url = gw.url("/dicomweb/studies")
    plain = httpx.get(url, headers={"Accept": "application/json"})
    assert plain.status_code == 200
    assert plain.headers["content-type"].startswith("application/json")
    dicom = httpx.get(url)
    assert dicom.headers["content-type"].startswith("application/dicom+json")
    xml = httpx.get(url, headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert xml.status_code == 406
    assert "dicom+xml" in xml.json()["error"]


def test_accept_parameter_typed_with_a_plus(
    served: tuple[GatewayProcess, QueryCorpus], corpus: QueryCorpus
) -> None:
    """``?accept=application/dicom+json`` as people type it: form decoding makes the ``+`` a
    space ("cannot answer in 'application/dicom json'" was a 406). Read back as ``+``, in
    QIDO-RS and in WADO-RS, which share the parser."""
    gw, _ = served
    for query in ("accept=application/dicom+json", "accept=application/dicom%2Bjson"):
        answer = httpx.get(gw.url(f"/dicomweb/studies?{query}"))
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("application/dicom+json")
    plain = httpx.get(gw.url("/dicomweb/studies?accept=application/json"))
    assert plain.headers["content-type"].startswith("application/json")
    metadata = httpx.get(
        gw.url(f"/dicomweb/studies/{corpus.study['C']}/metadata?accept=application/dicom+json")
    )
    assert metadata.status_code == 200, metadata.text
    assert metadata.headers["content-type"].startswith("application/dicom+json")


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/dicom+json;q=0", 406),
        ("application/dicom+json;q=0, application/json", "application/json"),
        ("application/dicom+json;q=0, */*", "application/json"),
        ("application/*;q=0", 406),
        ("application/json;q=0.5, application/dicom+json;q=0.8", "application/dicom+json"),
        ("application/dicom+json;q=0.2, application/json", "application/json"),
        ("*/*, application/dicom+json;q=0", "application/json"),
        ("application/json;q=0, */*", "application/dicom+json"),
    ],
)
def test_accept_qualities_and_q_zero(
    served: tuple[GatewayProcess, QueryCorpus], accept: str, expected: int | str
) -> None:
    """RFC 9110 12.4.2: ``q=0`` is "not acceptable"; 12.5.1: the most specific range
    naming a type gives its quality (was 200 dicom+json for ``dicom+json;q=0``)."""
    gw, _ = served
    answer = httpx.get(gw.url("/dicomweb/studies"), headers={"Accept": accept})
    if expected == 406:
        assert answer.status_code == 406, answer.text
        assert answer.json()["error"].startswith("cannot answer in")
    else:
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].split(";")[0] == expected


def test_empty_and_multiple_value_matching_parameters(
    served: tuple[GatewayProcess, QueryCorpus], corpus: QueryCorpus
) -> None:
    """PS3.18 Table 8.3.4-1 lists both (they were 400 "unknown attribute")."""
    gw, _ = served
    url = gw.url("/dicomweb/studies")
    # 8.3.4.5: an entity without a value for the key matches it too; no warning.
    empty = httpx.get(url, params={"emptyvaluematching": "true", "PatientID": "QP2"})
    assert empty.status_code == 200, empty.text
    assert study_keys(corpus, empty.json()) == ["B"]  # every study has a Patient ID
    assert "warning" not in empty.headers
    quiet = httpx.get(url, params={"emptyvaluematching": "false", "PatientID": "QP2"})
    assert study_keys(corpus, quiet.json()) == ["B"]
    assert "warning" not in quiet.headers
    # No series of the corpus has a Performed Procedure Step Start Date.
    series_url = gw.url("/dicomweb/series")
    dated = {"PerformedProcedureStepStartDate": "20230105"}
    assert httpx.get(series_url, params=dated).json() == []
    with_empty = httpx.get(series_url, params={**dated, "emptyvaluematching": "true"})
    every_series = sorted(uid for uids in corpus.series.values() for uid in uids)
    assert sorted(values(with_empty.json(), "0020000E")) == every_series
    in_range = {"StudyDate": "20230101-20230106", "emptyvaluematching": "true"}
    assert study_keys(corpus, httpx.get(url, params=in_range).json()) == ["A"]
    # 8.3.4.6 / PS3.4 C.2.2.2.8: a value per alternative, any one matching: what matching
    # does with a backslash-separated value anyway; no warning.
    several = {"ModalitiesInStudy": "OT\\CT", "multiplevaluematching": "true"}
    multiple = httpx.get(url, params=several)
    assert multiple.status_code == 200, multiple.text
    assert study_keys(corpus, multiple.json()) == ["A", "D"]
    assert "warning" not in multiple.headers
    # "false" asks for no Multiple Value Matching: a several-valued key cannot be searched.
    refused = httpx.get(url, params={**several, "multiplevaluematching": "false"})
    assert refused.status_code == 400
    assert "multiplevaluematching=false" in refused.json()["error"]
    single = httpx.get(url, params={"ModalitiesInStudy": "OT", "multiplevaluematching": "false"})
    assert study_keys(corpus, single.json()) == ["D"]
    # UID lists are List of UID Matching (PS3.4 C.2.2.2.2), not several values.
    uids = f"{corpus.study['C']}\\{corpus.study['D']}"
    listed = httpx.get(url, params={"StudyInstanceUID": uids, "multiplevaluematching": "false"})
    assert study_keys(corpus, listed.json()) == ["C", "D"]
    for name in ("emptyvaluematching", "multiplevaluematching"):
        for bad in ("yes", "TRUE", "1", ""):
            answer = httpx.get(url, params={name: bad})
            assert answer.status_code == 400, (name, bad)
            assert answer.json() == {"error": f"{name} must be true or false, not {bad!r}"}
        twice = httpx.get(url, params=[(name, "true"), (name, "true")])
        assert twice.status_code == 400
        assert "more than once" in twice.json()["error"]


@pytest.mark.parametrize("limit", ["1000000000", "99999999999999999999", "00000000000000001001"])
def test_a_limit_beyond_the_maximum_is_cut_to_it(
    served: tuple[GatewayProcess, QueryCorpus], corpus: QueryCorpus, limit: str
) -> None:
    """PS3.18 8.3.4.4 lets the server answer fewer than ``limit`` (``uint``): a limit past
    the maximum is the maximum (``limit=1000000000`` was a 400)."""
    gw, _ = served
    answer = httpx.get(gw.url("/dicomweb/studies"), params={"limit": limit})
    assert answer.status_code == 200, answer.text
    assert study_keys(corpus, answer.json()) == ["A", "B", "C", "D"]
    assert "warning" not in answer.headers  # nothing was cut: all four are here


def test_unsupported_keys_are_reported_in_a_warning_header(
    served: tuple[GatewayProcess, QueryCorpus],
) -> None:
    gw, _ = served
    response = httpx.get(
        gw.url("/dicomweb/studies"),
        params={"PatientWeight": "70", "Modality": "MR", "includefield": "PatientAge"},
    )
    assert response.status_code == 200
    assert len(response.json()) == 4  # the unsupported keys did not filter
    warnings = response.headers.get_list("warning")
    assert len(warnings) == 3
    host = f"127.0.0.1:{gw.http_port}"
    assert (
        warnings[0] == f'299 {host} "The query key PatientWeight is not supported and was ignored."'
    )
    assert "Modality" in warnings[1] and "study level" in warnings[1]
    assert "PatientAge" in warnings[2]
    assert "warning" not in httpx.get(gw.url("/dicomweb/studies")).headers


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/studies?NoSuchKeyword=1", "unknown attribute"),
        ("/studies?StudyDate=2023-01-05", "StudyDate"),
        ("/studies?StudyDate=20231301", "does not exist"),
        ("/studies?StudyTime=99", "HH[MM"),
        ("/studies?StudyInstanceUID=1.2%2F3", "not a UID"),  # no UID stored holds a '/'
        ("/studies?limit=-1", "limit"),
        ("/studies?limit=ten", "limit"),
        ("/studies?offset=1.5", "offset"),
        ("/studies?fuzzymatching=yes", "fuzzymatching"),
        ("/studies?includefield=NotAnAttribute", "unknown attribute"),
        ("/studies?PatientID=a&PatientID=b", "more than once"),
        ("/studies?limit=1&limit=2", "more than once"),
        ("/studies/1.2%203/series", "not a UID"),
        ("/studies/" + "1" * 65 + "/series", "not a UID"),
        ("/series?SeriesNumber=x", "not an integer"),
        ("/instances?Rows=many", "not an integer"),
    ],
)
def test_malformed_requests_get_400_with_a_json_error(
    served: tuple[GatewayProcess, QueryCorpus], client: DICOMwebClient, path: str, message: str
) -> None:
    gw, _ = served
    response = httpx.get(gw.url("/dicomweb" + path))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


def test_dicomweb_client_sees_errors_as_http_errors(client: DICOMwebClient) -> None:
    with pytest.raises(requests.HTTPError) as raised:
        client.search_for_studies(search_filters={"StudyDate": "yesterday"})
    assert raised.value.response.status_code == 400


def test_the_answers_come_from_the_index_not_the_files(
    served: tuple[GatewayProcess, QueryCorpus], client: DICOMwebClient, tmp_path: Path
) -> None:
    gw, _ = served
    store = gw.data / "store"
    moved = tmp_path / "moved"
    store.rename(moved)  # the files are gone for a moment; the index still answers
    try:
        assert len(client.search_for_instances()) == 7
    finally:
        moved.rename(store)


def test_includefield_of_a_sequence_names_its_item_attributes(
    served: tuple[GatewayProcess, QueryCorpus], corpus: QueryCorpus
) -> None:
    """`includefield=RequestAttributesSequence` at the series level returns the items'
    attributes the index holds, without the "not available" Warning it used to get (while
    the same sequence came back by default); at the study level it is still unavailable."""
    gw, _ = served
    series = httpx.get(
        gw.url(f"/dicomweb/studies/{corpus.study['A']}/series"),
        params={"includefield": "RequestAttributesSequence"},
    )
    assert series.status_code == 200, series.text
    assert "warning" not in series.headers
    studies = httpx.get(
        gw.url("/dicomweb/studies"), params={"includefield": "RequestAttributesSequence"}
    )
    assert "RequestAttributesSequence is not available" in studies.headers["warning"]
