"""FHIR R4 ImagingStudy on a real gateway, validated with ``fhir.resources`` (R4B models)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from tests.conftest import GatewayProcess, loaded_gateway, needs_dcmtk, wait_until
from tests.corpus import make_mr_series
from tests.qido_corpus import QueryCorpus, write_query_corpus

from dicomgate.security.http_auth import hash_api_key, new_api_key

pytestmark = needs_dcmtk


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, QueryCorpus]]:
    root = tmp_path_factory.mktemp("fhir")
    corpus = write_query_corpus(root / "corpus")
    with loaded_gateway(root / "gw", corpus.files) as gw:
        yield gw, corpus


def get(gw: GatewayProcess, path: str, **params: str) -> httpx.Response:
    return httpx.get(gw.url(path), params=params, timeout=10)


def test_read_one_imaging_study(served: tuple[GatewayProcess, QueryCorpus]) -> None:
    gw, corpus = served
    uid = corpus.study["A"]
    response = get(gw, f"/fhir/ImagingStudy/{uid}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    study = ImagingStudy.model_validate(body)  # raises on any R4 structural error

    assert study.id == uid
    assert study.status == "available"
    assert {(i.system, i.value) for i in study.identifier or []} >= {
        ("urn:dicom:uid", f"urn:oid:{uid}")
    }
    accession = [i for i in study.identifier or [] if i.type is not None]
    assert accession[0].value == "QA1"
    assert accession[0].type.coding[0].code == "ACSN"
    assert study.subject.display == "Doe^John"
    assert study.subject.identifier.value == "QP1"
    assert [m.code for m in study.modality or []] == ["CT", "MR"]
    assert study.numberOfSeries == 2 and study.numberOfInstances == 3
    assert str(study.started) == "2023-01-05"
    assert study.description == "MR BRAIN"

    endpoint = body["contained"][0]
    assert endpoint["resourceType"] == "Endpoint"
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["address"] == gw.url("/dicomweb")
    assert body["endpoint"] == [{"reference": "#wado-rs"}]

    series = study.series or []
    assert [s.uid for s in series] == corpus.series["A"]
    assert [s.modality.code for s in series] == ["MR", "CT"]
    assert [s.numberOfInstances for s in series] == [2, 1]
    instances = [i.uid for s in series for i in s.instance or []]
    assert instances == corpus.instances["A"]
    assert series[1].instance[0].sopClass.code == "urn:oid:1.2.840.10008.5.1.4.1.1.2"
    assert series[0].instance[1].number == 2


def test_unknown_id_is_404_with_an_operation_outcome(
    served: tuple[GatewayProcess, QueryCorpus],
) -> None:
    gw, _ = served
    for missing in ("1.2.3.999", "not-a-uid"):
        response = get(gw, f"/fhir/ImagingStudy/{missing}")
        assert response.status_code == 404
        outcome = OperationOutcome.model_validate(response.json())
        assert outcome.issue[0].code == "not-found"


def test_search_by_patient_and_identifier(served: tuple[GatewayProcess, QueryCorpus]) -> None:
    gw, corpus = served

    def found(**params: str) -> list[str]:
        response = get(gw, "/fhir/ImagingStudy", **params)
        assert response.status_code == 200, response.text
        bundle = Bundle.model_validate(response.json())
        assert bundle.type == "searchset"
        assert bundle.total is not None and bundle.total >= len(bundle.entry or [])
        for entry in bundle.entry or []:
            ImagingStudy.model_validate(entry.resource.model_dump())
            assert entry.fullUrl == gw.url(f"/fhir/ImagingStudy/{entry.resource.id}")
        return [corpus.key_of(str(entry.resource.id)) for entry in bundle.entry or []]

    assert found(patient="QP2") == ["B"]
    assert found(patient="Patient/QP3") == ["C"]
    assert found(patient="nobody") == []
    assert found(identifier=f"urn:oid:{corpus.study['D']}") == ["D"]
    assert found(identifier=f"urn:dicom:uid|urn:oid:{corpus.study['B']}") == ["B"]
    assert found(identifier="QA3") == ["C"]
    assert found(identifier="QA1,QA4") == ["A", "D"]
    assert found(patient="QP1", identifier="QA1") == ["A"]
    assert found(patient="QP1", identifier="QA2") == []
    assert found(identifier="QA1,QA2,QA3", _count="2") == ["A", "B"]
    assert found(identifier="QA1,QA2,QA3", _count="2", _offset="2") == ["C"]

    # total counts every match, not the page; next/previous links walk the pages.
    paged = get(gw, "/fhir/ImagingStudy", identifier="QA1,QA2,QA3", _count="2").json()
    assert paged["total"] == 3 and len(paged["entry"]) == 2
    links = {link["relation"]: link["url"] for link in paged["link"]}
    assert set(links) == {"self", "next"}
    assert links["next"].startswith(gw.url("/fhir/ImagingStudy?"))
    last = httpx.get(links["next"], timeout=10).json()
    assert last["total"] == 3 and [e["resource"]["id"] for e in last["entry"]] == [
        corpus.study["C"]
    ]
    assert {link["relation"] for link in last["link"]} == {"self", "previous"}
    whole = get(gw, "/fhir/ImagingStudy", identifier="QA1,QA2,QA3").json()
    assert whole["total"] == 3 and [link["relation"] for link in whole["link"]] == ["self"]
    beyond = get(gw, "/fhir/ImagingStudy", identifier="QA1", _offset="5").json()
    assert beyond["total"] == 1 and not beyond.get("entry")


MANY_STUDIES = 35


def _study_uid(i: int) -> str:
    """A 64-character UID (the longest PS3.5 allows): the worst case for UID lists."""
    stem = f"1.2.826.0.1.3680043.10.1138.{i}."
    return stem + "1" * (64 - len(stem))


def _many_studies_of_one_patient(folder: Path) -> list[Path]:
    files = []
    for i in range(MANY_STUDIES):
        (path,) = make_mr_series(folder / f"s{i}", 1, seed=7000 + i)
        ds = pydicom.dcmread(path)
        ds.PatientID = "FHIR-MANY"
        ds.StudyInstanceUID = _study_uid(i)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def test_search_a_patient_with_many_studies_pages_through_all(
    gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """35 studies of 64-character UIDs: far more than one 1024-character UID list holds."""
    gw = gateway()
    files = _many_studies_of_one_patient(tmp_path / "many")
    sent = gw.storescu(files)
    assert sent.returncode == 0, sent.stdout
    expected = [_study_uid(i) for i in range(MANY_STUDIES)]

    response = get(gw, "/fhir/ImagingStudy", patient="FHIR-MANY", _count="1000")
    assert response.status_code == 200, response.text
    bundle = Bundle.model_validate(response.json())
    assert bundle.total == MANY_STUDIES
    studies = [ImagingStudy.model_validate(e.resource.model_dump()) for e in bundle.entry or []]
    assert sorted(str(s.id) for s in studies) == sorted(expected)
    for study in studies:  # series and instances of every study, across the UID lists
        assert study.numberOfSeries == 1 and study.numberOfInstances == 1
        assert len(study.series or []) == 1 and len(study.series[0].instance or []) == 1

    seen: list[str] = []
    url: str | None = gw.url("/fhir/ImagingStudy?patient=FHIR-MANY&_count=10")
    pages = 0
    while url is not None:
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200, page.text
        body = Bundle.model_validate(page.json())
        assert body.total == MANY_STUDIES
        seen += [str(e.resource.id) for e in body.entry or []]
        assert all(e.resource.series for e in body.entry or [])
        nexts = [link.url for link in body.link or [] if link.relation == "next"]
        url = str(nexts[0]) if nexts else None
        pages += 1
        assert pages <= 5, "paging does not end"
    assert pages == 4 and len(seen) == MANY_STUDIES and sorted(seen) == sorted(expected)


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({}, 400),
        ({"name": "Doe"}, 400),
        ({"patient": "Q*"}, 400),
        ({"identifier": "urn:oid:1.2/x"}, 400),  # no stored UID holds a '/'
        ({"identifier": "urn:oid:1.2.3,QA1"}, 400),
        ({"patient": "QP1", "_count": "0"}, 400),
        ({"patient": "QP1", "_offset": "-1"}, 400),
        ({"patient": "QP1", "_offset": "x"}, 400),
        ({"patient": "QP1", "_count": "\u00b2"}, 400),  # a digit to str.isdigit, not to int
        ({"patient": "QP1", "_format": "xml"}, 406),
    ],
)
def test_bad_searches_get_an_operation_outcome(
    served: tuple[GatewayProcess, QueryCorpus], params: dict[str, str], status: int
) -> None:
    gw, _ = served
    response = get(gw, "/fhir/ImagingStudy", **params)
    assert response.status_code == status
    outcome = OperationOutcome.model_validate(response.json())
    assert outcome.issue[0].severity == "error"
    assert outcome.issue[0].diagnostics


# --- FHIR R4 conformance: token systems, formats, metadata, POST search, handling ---

ACSN_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"


def valid_bundle(response: httpx.Response) -> Bundle:
    """A searchset Bundle whose every resource validates as its R4 type."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate(response.json())
    assert bundle.type == "searchset"
    for entry in bundle.entry or []:
        kind = entry.resource.get_resource_type()
        model = {"ImagingStudy": ImagingStudy, "OperationOutcome": OperationOutcome}[kind]
        model.model_validate(entry.resource.model_dump())
    return bundle


def refused(response: httpx.Response, status: int) -> OperationOutcome:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = OperationOutcome.model_validate(response.json())
    assert outcome.issue[0].severity == "error" and outcome.issue[0].diagnostics
    return outcome


def matched(corpus: QueryCorpus, bundle: Bundle) -> list[str]:
    return [
        corpus.key_of(str(e.resource.id))
        for e in bundle.entry or []
        if e.search is not None and e.search.mode == "match"
    ]


def test_identifier_token_matches_the_system_the_study_carries(
    served: tuple[GatewayProcess, QueryCorpus],
) -> None:
    """search.html "token": system|code needs that system, |code no system, code any."""
    gw, corpus = served
    uid_b = corpus.study["B"]

    def found(identifier: str, **more: str) -> list[str]:
        response = get(gw, "/fhir/ImagingStudy", identifier=identifier, **more)
        return matched(corpus, valid_bundle(response))

    # What the resource carries: the UID under urn:dicom:uid, the accession with no system.
    study = ImagingStudy.model_validate(get(gw, f"/fhir/ImagingStudy/{uid_b}").json())
    carried = {(i.system, i.value) for i in study.identifier or []}
    assert carried == {("urn:dicom:uid", f"urn:oid:{uid_b}"), (None, "QA2")}

    assert found("QA3") == ["C"]  # any system
    assert found("|QA3") == ["C"]  # no system: the accession number
    assert found("foo|QA3") == []
    assert found(f"{ACSN_TYPE_SYSTEM}|QA3") == []  # the type's system, not the identifier's
    assert found("urn:dicom:uid|QA3") == []
    assert found(f"urn:dicom:uid|urn:oid:{uid_b}") == ["B"]
    assert found(f"urn:oid:{uid_b}") == ["B"]
    assert found(f"urn:ietf:rfc:3986|urn:oid:{uid_b}") == []
    assert found(f"|urn:oid:{uid_b}") == []  # no accession number is that
    assert found("foo|QA1,QA2") == ["B"]  # each token of the list on its own
    assert found("foo|QA1,bar|QA2") == []
    assert found("urn:dicom:uid|", patient="QP1") == ["A"]  # every study has such a UID
    assert found("foo|", patient="QP1") == []
    for bad in ("urn:dicom:uid|", "|", "a|b|c", f"|QA1,urn:oid:{uid_b}"):
        refused(get(gw, "/fhir/ImagingStudy", identifier=bad), 400)


def test_json_format_synonyms_and_xml_is_406_either_way(
    served: tuple[GatewayProcess, QueryCorpus],
) -> None:
    """http.html "Content Types and encodings": json, application/json and
    application/fhir+json are one format; _format overrides Accept."""
    gw, corpus = served
    uid = corpus.study["A"]
    paths = ("/fhir/ImagingStudy", f"/fhir/ImagingStudy/{uid}", "/fhir/metadata")

    def answer(path: str, fmt: str | None = None, accept: str | None = None) -> httpx.Response:
        params = {"patient": "QP1"} if path == paths[0] else {}
        params |= {"_format": fmt} if fmt is not None else {}
        headers = {"Accept": accept} if accept is not None else {}
        return httpx.get(gw.url(path), params=params, headers=headers, timeout=10)

    for path in paths:
        for fmt in ("json", "application/json", "application/fhir+json"):
            assert answer(path, fmt).status_code == 200, (path, fmt)
        assert answer(path, "application/fhir+json; fhirVersion=4.0").status_code == 200
        for accept in ("*/*", "application/json", "application/fhir+xml, application/*;q=0.1"):
            assert answer(path, accept=accept).status_code == 200, (path, accept)
        assert answer(path, "json", accept="application/fhir+xml").status_code == 200
        for fmt in ("xml", "application/fhir+xml", "text/html", "json; fhirVersion=3.0"):
            refused(answer(path, fmt), 406)
        for accept in (
            "application/fhir+xml",
            "application/xml",
            "application/fhir+json; fhirVersion=3.0",
        ):
            refused(answer(path, accept=accept), 406)
        refused(answer(path, "xml", accept="application/fhir+json"), 406)
    bundle = valid_bundle(answer(paths[0], "application/json"))
    assert matched(corpus, bundle) == ["A"]
    # The format asked for is kept in the links, so the next page is JSON too.
    assert "_format=application%2Fjson" in str(bundle.link[0].url)


def test_search_bundle_without_matches_has_no_entry_array(
    served: tuple[GatewayProcess, QueryCorpus],
) -> None:
    """json.html: FHIR JSON never has an empty array: no match, no "entry"."""
    gw, _ = served
    for params in ({"patient": "nobody"}, {"identifier": "QA1", "_offset": "5"}):
        response = get(gw, "/fhir/ImagingStudy", **params)
        valid_bundle(response)
        body = response.json()
        assert "entry" not in body, body
        assert body["total"] == (0 if "patient" in params else 1)


def test_metadata_is_a_capability_statement(served: tuple[GatewayProcess, QueryCorpus]) -> None:
    """http.html "capabilities": GET [base]/metadata SHALL answer a CapabilityStatement."""
    gw, _ = served
    response = get(gw, "/fhir/metadata")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    statement = CapabilityStatement.model_validate(response.json())
    assert statement.status == "active" and statement.kind == "instance"
    assert statement.fhirVersion == "4.0.1" and statement.format == ["json"]
    assert statement.date is not None
    assert statement.implementation is not None
    assert statement.implementation.url == gw.url("/fhir")
    (rest,) = statement.rest or []
    assert rest.mode == "server"
    (resource,) = rest.resource or []
    assert resource.type == "ImagingStudy"
    assert {i.code for i in resource.interaction or []} == {"read", "search-type"}
    assert {(p.name, p.type) for p in resource.searchParam or []} == {
        ("patient", "reference"),
        ("identifier", "token"),
    }
    assert resource.documentation and "handling=lenient" in resource.documentation


def test_unknown_fhir_paths_answer_an_operation_outcome(
    served: tuple[GatewayProcess, QueryCorpus],
) -> None:
    gw, corpus = served
    for path in ("/fhir", "/fhir/Patient/QP1", f"/fhir/ImagingStudy/{corpus.study['A']}/x"):
        outcome = refused(get(gw, path), 404)
        assert outcome.issue[0].code == "not-found"
    for method, path, allow in (
        ("DELETE", f"/fhir/ImagingStudy/{corpus.study['A']}", "GET, HEAD"),
        ("POST", "/fhir/ImagingStudy", "GET, HEAD"),
        ("PUT", "/fhir/metadata", "GET, HEAD"),
        ("GET", "/fhir/ImagingStudy/_search?patient=QP1", None),  # a read of id "_search"
    ):
        response = httpx.request(method, gw.url(path), timeout=10)
        if allow is None:
            refused(response, 404)
            continue
        refused(response, 405)
        assert response.headers["allow"] == allow


def post_search(
    gw: GatewayProcess,
    form: dict[str, str] | str | bytes,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    url = gw.url("/fhir/ImagingStudy/_search") + (f"?{query}" if query else "")
    if isinstance(form, dict):
        return httpx.post(url, data=form, headers=headers, timeout=10)
    kind = {"content-type": "application/x-www-form-urlencoded", **(headers or {})}
    return httpx.post(url, content=form, headers=kind, timeout=10)


def test_search_by_post_is_the_same_search(served: tuple[GatewayProcess, QueryCorpus]) -> None:
    """search.html "Introduction": servers SHALL support search by GET and by POST."""
    gw, corpus = served
    by_post = valid_bundle(post_search(gw, {"patient": "QP2"}))
    assert matched(corpus, by_post) == ["B"]
    by_get = valid_bundle(get(gw, "/fhir/ImagingStudy", patient="QP2"))
    assert by_post.model_dump() == by_get.model_dump()  # links (the GET form) included
    assert by_post.link[0].url == gw.url("/fhir/ImagingStudy?patient=QP2&_count=50&_offset=0")

    # Body and query string together; paging links are GET URLs.
    both = valid_bundle(post_search(gw, {"identifier": "QA1,QA2,QA3"}, query="_count=2"))
    assert matched(corpus, both) == ["A", "B"] and both.total == 3
    nexts = [str(link.url) for link in both.link or [] if link.relation == "next"]
    assert matched(corpus, valid_bundle(httpx.get(nexts[0], timeout=10))) == ["C"]
    assert matched(corpus, valid_bundle(post_search(gw, b"", query="patient=QP3"))) == ["C"]
    no_match = post_search(gw, {"identifier": "foo|QA1"})
    valid_bundle(no_match)
    assert "entry" not in no_match.json()

    # The errors of GET, and a form the right size and type.
    refused(post_search(gw, {"patient": "QP1", "_count": "0"}), 400)
    refused(post_search(gw, {"name": "Doe"}), 400)
    refused(post_search(gw, {"patient": "QP1"}, query="patient=QP2"), 400)  # given twice
    refused(post_search(gw, {"patient": "QP1", "_format": "xml"}), 406)
    refused(post_search(gw, {}), 400)
    refused(post_search(gw, b"patient=%FF"), 400)
    refused(post_search(gw, "&".join(["_pretty=false"] * 101)), 400)
    refused(post_search(gw, b"patient=QP1&x=" + b"a" * 70_000), 413)
    wrong_type = {"content-type": "application/json"}
    refused(post_search(gw, b'{"patient": "QP1"}', headers=wrong_type), 415)
    assert gw.running()


def test_search_by_post_is_audited_with_its_keys(
    served: tuple[GatewayProcess, QueryCorpus],
) -> None:
    """A POST search is a query like its GET form: audited, with the keys of its body."""
    gw, _ = served
    valid_bundle(post_search(gw, {"patient": "QP4"}, query="_count=3"))

    def audited() -> list[dict[str, Any]]:
        status, body = gw.http_get("/api/audit?event=query&limit=1000", timeout=10)
        assert status == 200, body
        return [
            e
            for e in body["events"]
            if e["object"] == "/fhir/ImagingStudy/_search" and "QP4" in e["detail"].get("query", "")
        ]

    wait_until(lambda: bool(audited()), 10, "POST search audited")
    (row,) = audited()
    assert row["outcome"] == "success" and row["detail"]["method"] == "POST"
    assert row["detail"]["query"] == "_count=3&patient=QP4"


def test_search_by_post_needs_only_read_access(
    gateway: Callable[..., GatewayProcess],
) -> None:
    """A search is a read: a key with the read scope may POST one (not only write keys)."""
    key = new_api_key()
    entry = {"name": "viewer", "sha256": hash_api_key(key), "scopes": ["read"]}
    gw = gateway({"http": {"auth": {"api_keys": [entry]}}})
    url = gw.url("/fhir/ImagingStudy/_search")
    assert httpx.post(url, data={"patient": "QP1"}, timeout=10).status_code == 401
    response = httpx.post(url, data={"patient": "QP1"}, headers={"X-API-Key": key}, timeout=10)
    bundle = valid_bundle(response)
    assert bundle.total == 0 and not bundle.entry


def test_lenient_handling_ignores_and_reports_unknown_parameters(
    served: tuple[GatewayProcess, QueryCorpus],
) -> None:
    """search.html "Handling Errors": lenient ignores unsupported parameters; strict (our
    default) refuses them."""
    gw, corpus = served
    params = {"patient": "QP1", "name": "Doe", "_sort": "-date"}
    refused(get(gw, "/fhir/ImagingStudy", **params), 400)
    strict = httpx.get(
        gw.url("/fhir/ImagingStudy"), params=params, headers={"Prefer": "handling=strict"}
    )
    refused(strict, 400)
    assert strict.headers["preference-applied"] == "handling=strict"

    lenient = {"Prefer": "return=minimal, handling=lenient"}
    response = httpx.get(gw.url("/fhir/ImagingStudy"), params=params, headers=lenient)
    assert response.headers["preference-applied"] == "handling=lenient"
    bundle = valid_bundle(response)
    assert matched(corpus, bundle) == ["A"] and bundle.total == 1
    self_url = str(bundle.link[0].url)
    assert self_url == gw.url("/fhir/ImagingStudy?patient=QP1&_count=50&_offset=0")
    outcomes = [e for e in bundle.entry or [] if e.search and e.search.mode == "outcome"]
    (reported,) = outcomes
    issue = reported.resource.issue[0]
    assert issue.severity == "warning" and "name" in issue.diagnostics
    assert "_sort" in issue.diagnostics
    by_post = valid_bundle(post_search(gw, params, headers=lenient))
    assert matched(corpus, by_post) == ["A"]

    # Still refused when lenient: a modifier on a criterion we apply, a bad value.
    for bad in ({"patient:missing": "true"}, {"patient": "QP1", "_count": "x"}):
        refused(httpx.get(gw.url("/fhir/ImagingStudy"), params=bad, headers=lenient), 400)


def test_pretty_and_summary_count(served: tuple[GatewayProcess, QueryCorpus]) -> None:
    """_pretty (http.html general parameters) and _summary=count (search.html "Summary")."""
    gw, corpus = served
    pretty = get(gw, "/fhir/ImagingStudy", patient="QP1", _pretty="true")
    assert matched(corpus, valid_bundle(pretty)) == ["A"]
    assert "\n" in pretty.text
    plain = get(gw, "/fhir/ImagingStudy", patient="QP1", _pretty="false")
    assert matched(corpus, valid_bundle(plain)) == ["A"] and "\n" not in plain.text
    assert "\n" in get(gw, f"/fhir/ImagingStudy/{corpus.study['A']}", _pretty="true").text
    refused(get(gw, "/fhir/ImagingStudy", patient="QP1", _pretty="yes"), 400)

    counted = get(gw, "/fhir/ImagingStudy", identifier="QA1,QA2,QA3", _summary="count")
    bundle = valid_bundle(counted)
    assert bundle.total == 3 and "entry" not in counted.json()
    assert [link.relation for link in bundle.link or []] == ["self"]
    assert "_summary=count" in str(bundle.link[0].url)
    full = valid_bundle(get(gw, "/fhir/ImagingStudy", identifier="QA1,QA2,QA3", _summary="false"))
    assert full.total == 3 and len(full.entry or []) == 3
    for unsupported in ("true", "text", "data"):
        refused(get(gw, "/fhir/ImagingStudy", patient="QP1", _summary=unsupported), 400)
