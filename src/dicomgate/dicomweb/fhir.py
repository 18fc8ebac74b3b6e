"""FHIR R4 ImagingStudy (read and search), built from the index.

* ``GET /fhir/ImagingStudy/{id}``: the study whose Study Instance UID is ``id`` (a UID is
  a valid FHIR id: digits and dots, at most 64 characters); 404 with an OperationOutcome
  when the index does not hold it.
* ``GET /fhir/ImagingStudy?patient=...&identifier=...&_count=...``: a ``searchset``
  Bundle. ``patient`` matches the DICOM Patient ID (``P123`` or ``Patient/P123``; the
  gateway has no Patient resources, so the id *is* the Patient ID). ``identifier`` is a
  token: ``urn:oid:<uid>`` (with or without the ``urn:dicom:uid|`` system) matches the
  Study Instance UID, any other value the Accession Number; a comma means "or".
  ``_count`` is the page size (default 50, at most 1000) and ``_offset`` the number of
  matches to skip (default 0). ``total`` is the number of matches of the whole search,
  not of the page, and a ``next`` link (the same search with ``_offset`` moved on by
  ``_count``) is present while matches remain (FHIR R4 3.1.1.4 "Paging"); ``previous``
  likewise once ``_offset`` is past 0. Any other parameter is a 400: a search that
  silently ignored a criterion would return studies the caller did not ask for.

The series and instances of the matched studies are fetched by Study Instance UID lists
cut to fit the index's per-key limits (the limits that protect QIDO from oversized user
input), so a patient with any number of studies can be searched.

Each ImagingStudy carries a contained Endpoint (connectionType ``dicom-wado-rs``, address
the gateway's ``/dicomweb``) referenced by the study and each series, so a client can
retrieve what it found. DICOM dates carry no time zone and FHIR requires one with a
time, so ``started`` is the study date only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from sqlalchemy import Connection

from dicomgate.dicomweb.qido import public_base_url
from dicomgate.dicomweb.server import PREFIX, retry_later
from dicomgate.errors import IndexUnavailable
from dicomgate.index.extract import nameable_uid
from dicomgate.index.query import (
    MAX_KEY_VALUE,
    MAX_LIST_ITEMS,
    InvalidQuery,
    Level,
    Match,
    QueryOptions,
    search,
)

if TYPE_CHECKING:
    from dicomgate.service import Gateway

FHIR_JSON = "application/fhir+json"
DEFAULT_COUNT = 50
MAX_COUNT = 1000
DCM = "http://dicom.nema.org/resources/ontology/DCM"
_SEARCH_PARAMS = {"patient", "identifier", "_count", "_offset", "_format"}
MAX_OFFSET = 10**9
_STUDY_FIELDS = (
    "StudyDescription",
    "StudyDate",
    "AccessionNumber",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_SERIES_FIELDS = (
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "NumberOfSeriesRelatedInstances",
)


class _FhirError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def router(gateway: Gateway) -> APIRouter:
    """``/fhir/ImagingStudy`` read and search."""
    api = APIRouter(prefix="/fhir", tags=["FHIR"])

    def respond(body: Mapping[str, Any], status: int = 200) -> Response:
        return Response(
            json.dumps(body, ensure_ascii=False).encode("utf-8"),
            status_code=status,
            media_type=FHIR_JSON,
            headers=retry_later(status),
        )

    def run(
        request: Request, keys: dict[str, str], count: int, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        base = public_base_url(request)
        with gateway.index.engine.connect() as connection:
            return imaging_studies(connection, keys, base, count, offset)

    @api.get("/ImagingStudy/{study_id}")
    def read_imaging_study(study_id: str, request: Request) -> Response:
        """One ImagingStudy by id (= Study Instance UID)."""
        try:
            if not nameable_uid(study_id):
                raise _FhirError(404, "not-found", f"no ImagingStudy {study_id!r}")
            found, _ = run(request, {"StudyInstanceUID": study_id}, 1)
            if not found:
                raise _FhirError(404, "not-found", f"no ImagingStudy {study_id!r}")
        except _FhirError as error:
            return respond(outcome(error.code, error.message), error.status)
        except IndexUnavailable as error:
            return respond(outcome("transient", f"index unavailable: {error}"), 503)
        return respond(found[0])

    @api.get("/ImagingStudy")
    def search_imaging_study(request: Request) -> Response:
        """Search ImagingStudy by patient and identifier: a searchset Bundle."""
        try:
            keys, count, offset = _search_keys(request)
            found, total = run(request, keys, count, offset)
        except _FhirError as error:
            return respond(outcome(error.code, error.message), error.status)
        except InvalidQuery as error:
            return respond(outcome("invalid", str(error)), 400)
        except IndexUnavailable as error:
            return respond(outcome("transient", f"index unavailable: {error}"), 503)
        base = public_base_url(request)
        links = [{"relation": "self", "url": _page_url(request, base, count, offset)}]
        if offset + len(found) < total:
            links.append(
                {"relation": "next", "url": _page_url(request, base, count, offset + count)}
            )
        if offset > 0:
            previous = max(0, offset - count)
            links.append({"relation": "previous", "url": _page_url(request, base, count, previous)})
        return respond(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": total,
                "link": links,
                "entry": [
                    {
                        "fullUrl": f"{base}/fhir/ImagingStudy/{study['id']}",
                        "resource": study,
                        "search": {"mode": "match"},
                    }
                    for study in found
                ],
            }
        )

    return api


def outcome(code: str, message: str) -> dict[str, Any]:
    """An OperationOutcome with one error issue."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": message}],
    }


def _page_url(request: Request, base: str, count: int, offset: int) -> str:
    """This search's URL (as the client reached us) for the page at ``offset``."""
    params = [
        (k, v) for k, v in request.query_params.multi_items() if k not in ("_count", "_offset")
    ]
    params += [("_count", str(count)), ("_offset", str(offset))]
    return f"{base}/fhir/ImagingStudy?{urlencode(params)}"


def _search_keys(request: Request) -> tuple[dict[str, str], int, int]:
    keys: dict[str, str] = {}
    count = DEFAULT_COUNT
    offset = 0
    params = request.query_params
    unknown = sorted(set(params) - _SEARCH_PARAMS)
    if unknown:
        raise _FhirError(400, "not-supported", f"unsupported search parameter(s): {unknown}")
    for name in ("patient", "identifier", "_count", "_offset"):
        if len(params.getlist(name)) > 1:
            raise _FhirError(400, "invalid", f"{name} is given more than once")
    if "_format" in params and params["_format"] not in ("json", "application/fhir+json"):
        raise _FhirError(406, "not-supported", "only application/fhir+json is supported")
    if "_count" in params:
        value = params["_count"]
        if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= MAX_COUNT:
            raise _FhirError(400, "invalid", f"_count must be 1..{MAX_COUNT}, not {value!r}")
        count = int(value)
    if "_offset" in params:
        value = params["_offset"]
        if not (value.isascii() and value.isdigit()) or int(value) > MAX_OFFSET:
            raise _FhirError(400, "invalid", f"_offset must be 0..{MAX_OFFSET}, not {value!r}")
        offset = int(value)
    if "patient" in params:
        patient = params["patient"].strip()
        patient = patient.removeprefix("Patient/")
        if not patient or "," in patient or "*" in patient or "?" in patient:
            raise _FhirError(400, "invalid", f"patient must be one Patient ID, not {patient!r}")
        keys["PatientID"] = patient
    if "identifier" in params:
        uids: list[str] = []
        accessions: list[str] = []
        for token in params["identifier"].split(","):
            system, _, value = token.strip().rpartition("|")
            if value.startswith("urn:oid:") and system in (
                "",
                "urn:dicom:uid",
                "urn:ietf:rfc:3986",
            ):
                uid = value.removeprefix("urn:oid:")
                if not nameable_uid(uid):
                    raise _FhirError(400, "invalid", f"{value!r} is not a urn:oid: UID")
                uids.append(uid)
            elif value and not any(c in value for c in "*?\\"):
                accessions.append(value)
            else:
                raise _FhirError(400, "invalid", f"identifier {token!r} is not usable")
        if uids and accessions:
            raise _FhirError(
                400, "not-supported", "identifier mixes study UIDs and accession numbers"
            )
        if uids:
            keys["StudyInstanceUID"] = "\\".join(uids)
        else:
            keys["AccessionNumber"] = "\\".join(accessions)
    if not keys:
        raise _FhirError(400, "invalid", "give patient and/or identifier")
    return keys, count, offset


def imaging_studies(
    connection: Connection, keys: Mapping[str, str], base: str, count: int, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """ImagingStudy resources of the page of matches of ``keys`` (at most ``count`` from
    ``offset``) and the number of matches of the whole search."""
    # Only the identifying columns: counting the matches costs no computed attributes.
    total = len(search(connection, Level.STUDY, dict(keys)).matches)
    studies = search(
        connection,
        Level.STUDY,
        dict(keys),
        QueryOptions(limit=count, offset=offset, include=_STUDY_FIELDS),
    ).matches
    if not studies:
        return [], total
    all_series: list[Match] = []
    all_instances: list[Match] = []
    for uid_list in _uid_lists([str(s.study_uid) for s in studies]):
        key = {"StudyInstanceUID": uid_list}
        all_series += search(
            connection, Level.SERIES, key, QueryOptions(include=_SERIES_FIELDS)
        ).matches
        all_instances += search(
            connection, Level.IMAGE, key, QueryOptions(include=("SOPClassUID", "InstanceNumber"))
        ).matches
    instances_of: dict[str, list[Match]] = {}
    for found in all_instances:
        instances_of.setdefault(str(found.series_uid), []).append(found)
    series_of: dict[str, list[Match]] = {}
    for found in all_series:
        series_of.setdefault(str(found.study_uid), []).append(found)
    resources = [
        _imaging_study(study, series_of.get(str(study.study_uid), []), instances_of, base)
        for study in studies
    ]
    return resources, total


def _uid_lists(uids: list[str]) -> list[str]:
    """``uids`` as backslash-joined key values each within the index's per-key limits."""
    chunks: list[str] = []
    current: list[str] = []
    length = 0
    for uid in uids:
        if current and (length + 1 + len(uid) > MAX_KEY_VALUE or len(current) >= MAX_LIST_ITEMS):
            chunks.append("\\".join(current))
            current, length = [], 0
        length += len(uid) + (1 if current else 0)
        current.append(uid)
    if current:
        chunks.append("\\".join(current))
    return chunks


def _imaging_study(
    study: Match, series: list[Match], instances_of: dict[str, list[Match]], base: str
) -> dict[str, Any]:
    uid = str(study.study_uid)
    endpoint = [{"reference": "#wado-rs"}]
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": uid,
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "wado-rs",
                "status": "active",
                "connectionType": {
                    "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                    "code": "dicom-wado-rs",
                },
                "payloadType": [{"text": "DICOM WADO-RS"}],
                "payloadMimeType": ["application/dicom"],
                "address": base + PREFIX,
            }
        ],
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
    }
    accession = study.get("AccessionNumber")
    if accession:
        resource["identifier"].append(
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                    ]
                },
                "value": accession,
            }
        )
    modalities = study.get("ModalitiesInStudy") or []
    if modalities:
        resource["modality"] = [{"system": DCM, "code": code} for code in modalities]
    subject: dict[str, Any] = {"type": "Patient"}
    patient_id = study.get("PatientID")
    if patient_id:
        identifier: dict[str, Any] = {"value": patient_id}
        issuer = study.get("IssuerOfPatientID")
        if issuer:
            identifier["assigner"] = {"display": issuer}
        subject["identifier"] = identifier
    name = study.get("PatientName")
    subject["display"] = str(name).split("=")[0] if name else "unknown"
    resource["subject"] = subject
    started = _fhir_date(study.get("StudyDate"))
    if started:
        resource["started"] = started
    resource["endpoint"] = endpoint
    resource["numberOfSeries"] = study.get("NumberOfStudyRelatedSeries") or 0
    resource["numberOfInstances"] = study.get("NumberOfStudyRelatedInstances") or 0
    description = study.get("StudyDescription")
    if description:
        resource["description"] = description
    if series:
        resource["series"] = [_series(s, instances_of.get(str(s.series_uid), [])) for s in series]
    return resource


def _series(series: Match, instances: list[Match]) -> dict[str, Any]:
    out: dict[str, Any] = {"uid": str(series.series_uid)}
    number = series.get("SeriesNumber")
    if number is not None and number >= 0:
        out["number"] = number
    out["modality"] = {"system": DCM, "code": series.get("Modality") or "OT"}
    description = series.get("SeriesDescription")
    if description:
        out["description"] = description
    out["numberOfInstances"] = series.get("NumberOfSeriesRelatedInstances") or 0
    out["endpoint"] = [{"reference": "#wado-rs"}]
    started = _fhir_date(series.get("SeriesDate"))
    if started:
        out["started"] = started
    out["instance"] = [_instance(i) for i in instances]
    if not out["instance"]:
        del out["instance"]
    return out


def _instance(found: Match) -> dict[str, Any]:
    out: dict[str, Any] = {
        "uid": str(found.sop_instance_uid),
        "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{found.get('SOPClassUID')}"},
    }
    number = found.get("InstanceNumber")
    if number is not None and number >= 0:
        out["number"] = number
    return out


def _fhir_date(value: Any) -> str | None:
    """YYYYMMDD -> YYYY-MM-DD (a FHIR dateTime without a time needs no time zone)."""
    if not value or len(str(value)) != 8:
        return None
    text = str(value)
    return f"{text[:4]}-{text[4:6]}-{text[6:]}"
