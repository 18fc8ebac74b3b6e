"""FHIR R4 ImagingStudy on a real gateway, validated with ``fhir.resources`` (R4B models)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from tests.conftest import GatewayProcess, loaded_gateway, needs_dcmtk
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
        assert bundle.total == len(bundle.entry or [])
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


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({}, 400),
        ({"name": "Doe"}, 400),
        ({"patient": "Q*"}, 400),
        ({"identifier": "urn:oid:1.2.x"}, 400),
        ({"identifier": "urn:oid:1.2.3,QA1"}, 400),
        ({"patient": "QP1", "_count": "0"}, 400),
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
