"""FHIR R4 ImagingStudy on a real gateway, validated with ``fhir.resources`` (R4B models)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from tests.conftest import GatewayProcess, loaded_gateway, needs_dcmtk
from tests.corpus import make_mr_series
from tests.qido_corpus import QueryCorpus, write_query_corpus

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
