"""FHIR R4 ImagingStudy (read and search) and the server's CapabilityStatement, from the index.

* ``GET /fhir/metadata``: the CapabilityStatement (http.html "capabilities": a server
  SHALL return one there).
* ``GET /fhir/ImagingStudy/{id}``: the study whose Study Instance UID is ``id`` (a UID is
  a valid FHIR id: digits and dots, at most 64 characters); 404 with an OperationOutcome
  when the index does not hold it.
* ``GET /fhir/ImagingStudy?patient=...&identifier=...`` and ``POST
  /fhir/ImagingStudy/_search`` (form body plus any query string; search.html "Introduction":
  servers SHALL support both): a ``searchset`` Bundle. ``patient`` matches the DICOM
  Patient ID (``P123`` or ``Patient/P123``; the gateway has no Patient resources, so the id
  *is* the Patient ID). ``identifier`` is a token matched against the two identifiers a
  study carries: ``urn:dicom:uid`` + ``urn:oid:<Study Instance UID>``, and the Accession
  Number (type ACSN, no system); a comma means "or". ``_count`` is the page size
  (default 50, at most 1000) and ``_offset`` the number of matches to skip (default 0).
  ``total`` is the number of matches of the whole search, not of the page, and a ``next``
  link (the same search with ``_offset`` moved on by ``_count``) is present while matches
  remain (search.html "Paging"); ``previous`` likewise once ``_offset`` is past 0.
  ``_summary=count`` answers the total only. Any other parameter is a 400 unless the
  client sent ``Prefer: handling=lenient`` (search.html "Handling Errors"): by default a
  search that silently ignored a criterion would return studies the caller did not ask for.
* Anything else under ``/fhir``: a 404 (or 405 with ``Allow``) OperationOutcome.

Only JSON is served: ``_format`` (json, application/json, application/fhir+json) or else
``Accept`` must allow it, or the answer is a 406 OperationOutcome.

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
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Request, Response
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute
from starlette.routing import Match as RouteMatch

from dicomgate import __version__
from dicomgate.dicomweb.multipart import parse_content_type
from dicomgate.dicomweb.negotiate import AcceptError, parse_accept
from dicomgate.dicomweb.qido import public_base_url
from dicomgate.dicomweb.server import PREFIX, retry_later
from dicomgate.errors import INDEX_UNAVAILABLE, IndexUnavailable
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
FHIR_VERSION = "4.0.1"
DEFAULT_COUNT = 50
MAX_COUNT = 1000
MAX_OFFSET = 10**9
MAX_SEARCH_BODY = 64 * 1024  # bytes of a POST _search form: criteria, not uploads
MAX_SEARCH_FIELDS = 100
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID_SYSTEM = "urn:dicom:uid"
# The search parameters (criteria) and the result and format parameters we apply.
_CRITERIA = ("patient", "identifier")
_CONTROLS = ("_count", "_offset", "_summary", "_format", "_pretty")
# http.html "Content Types and encodings": these _format values all mean FHIR JSON.
_JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json"})
# Accept media ranges that allow FHIR JSON (application/json+fhir: the DSTU2 name).
_JSON_RANGES = frozenset(
    {"*/*", "application/*", "application/json", FHIR_JSON, "application/json+fhir"}
)
# http.html "FHIR Version parameter": major.minor of the version we serve.
_FHIR_VERSIONS = frozenset({"4.0", FHIR_VERSION})
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
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
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


@dataclass
class _Search:
    """A parsed ImagingStudy search."""

    keys: dict[str, str]  # index query keys
    count: int = DEFAULT_COUNT
    offset: int = 0
    summary_count: bool = False  # _summary=count: the total only
    matches_nothing: bool = False  # every identifier token names what no study carries
    used: list[tuple[str, str]] = field(default_factory=list)  # for the links, in order
    ignored: list[str] = field(default_factory=list)  # names dropped by handling=lenient


def router(gateway: Gateway) -> APIRouter:
    """``/fhir``: metadata, ImagingStudy read and search, OperationOutcomes elsewhere."""
    api = APIRouter(prefix="/fhir", tags=["FHIR"])
    # The instance's capabilities are fixed when it starts: that is its statement's date.
    started = datetime.now(UTC).isoformat(timespec="seconds")

    def respond(
        body: Mapping[str, Any],
        status: int = 200,
        pretty: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Response:
        return Response(
            json.dumps(body, ensure_ascii=False, indent=2 if pretty else None).encode("utf-8"),
            status_code=status,
            media_type=FHIR_JSON,
            headers=retry_later(status, headers),
        )

    def failed(error: _FhirError, pretty: bool, headers: dict[str, str] | None = None) -> Response:
        headers = {**(headers or {}), **(error.headers or {})}
        return respond(outcome(error.code, error.message), error.status, pretty, headers)

    def run(
        request: Request, keys: dict[str, str], count: int, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        base = public_base_url(request)
        with gateway.index.engine.connect() as connection:
            return imaging_studies(connection, keys, base, count, offset)

    @api.get("/metadata")
    def capabilities(request: Request) -> Response:
        """The CapabilityStatement of this server (http.html "capabilities")."""
        items = request.query_params.multi_items()
        pretty = _pretty_requested(items)
        try:
            _check_format(items, request.headers.get("accept"))
            _check_pretty(items)
        except _FhirError as error:
            return failed(error, pretty)
        return respond(capability_statement(public_base_url(request), started), pretty=pretty)

    @api.get("/ImagingStudy/{study_id}")
    def read_imaging_study(study_id: str, request: Request) -> Response:
        """One ImagingStudy by id (= Study Instance UID)."""
        items = request.query_params.multi_items()
        pretty = _pretty_requested(items)
        try:
            _check_format(items, request.headers.get("accept"))
            _check_pretty(items)
            if not nameable_uid(study_id):
                raise _FhirError(404, "not-found", f"no ImagingStudy {study_id!r}")
            found, _ = run(request, {"StudyInstanceUID": study_id}, 1)
            if not found:
                raise _FhirError(404, "not-found", f"no ImagingStudy {study_id!r}")
        except _FhirError as error:
            return failed(error, pretty)
        except IndexUnavailable:
            return respond(outcome("transient", INDEX_UNAVAILABLE), 503, pretty)
        return respond(found[0], pretty=pretty)

    def answer_search(request: Request, items: list[tuple[str, str]]) -> Response:
        pretty = _pretty_requested(items)
        handling = _handling_preference(request)
        # RFC 7240: say which preference was honoured (both values are).
        applied = {"Preference-Applied": f"handling={handling}"} if handling else {}
        found: list[dict[str, Any]] = []
        try:
            _check_format(items, request.headers.get("accept"))
            wanted = _parse_search(items, lenient=handling == "lenient")
            if wanted.matches_nothing:
                total = 0
            elif wanted.summary_count:
                with gateway.index.engine.connect() as connection:
                    total = count_studies(connection, wanted.keys)
            else:
                found, total = run(request, wanted.keys, wanted.count, wanted.offset)
        except _FhirError as error:
            return failed(error, pretty, applied)
        except InvalidQuery as error:
            return failed(_FhirError(400, "invalid", str(error)), pretty, applied)
        except IndexUnavailable:
            return respond(outcome("transient", INDEX_UNAVAILABLE), 503, pretty)
        base = public_base_url(request)
        return respond(_search_bundle(base, wanted, found, total), pretty=pretty, headers=applied)

    @api.get("/ImagingStudy")
    def search_imaging_study(request: Request) -> Response:
        """Search ImagingStudy by patient and identifier: a searchset Bundle."""
        return answer_search(request, request.query_params.multi_items())

    @api.post("/ImagingStudy/_search")
    async def search_imaging_study_by_post(request: Request) -> Response:
        """The same search with its parameters in a form body (plus the query string)."""
        query = request.query_params.multi_items()
        try:
            form = await _form_parameters(request)
        except _FhirError as error:
            return failed(error, _pretty_requested(query))
        # The audit row of a query (observability/http.py) records the query string: make
        # it the whole search, as its GET form would have been.
        request.scope["query_string"] = urlencode(query + form).encode("ascii")
        return await run_in_threadpool(answer_search, request, query + form)

    known: list[BaseRoute] = list(api.routes)

    def unknown_path(request: Request) -> Response:
        """Every other path under /fhir: an OperationOutcome, not the gateway's {"error"}."""
        allowed = [
            method
            for method in _METHODS
            if any(
                route.matches({**request.scope, "method": method})[0] == RouteMatch.FULL
                for route in known
            )
        ]
        if (
            "GET" in allowed and "HEAD" not in allowed
        ):  # every GET resource answers HEAD (http_semantics.HeadAsGet)
            allowed.insert(allowed.index("GET") + 1, "HEAD")
        if allowed:
            return respond(
                outcome("not-supported", f"{request.method} is not supported here"),
                405,
                headers={"Allow": ", ".join(allowed)},
            )
        return respond(outcome("not-found", f"no FHIR endpoint at {request.url.path}"), 404)

    api.add_api_route("", unknown_path, methods=list(_METHODS), include_in_schema=False)
    api.add_api_route("/{path:path}", unknown_path, methods=list(_METHODS), include_in_schema=False)
    return api


def outcome(code: str, message: str, severity: str = "error") -> dict[str, Any]:
    """An OperationOutcome with one issue."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": message}],
    }


def capability_statement(base: str, date: str) -> dict[str, Any]:
    """What this server does (CapabilityStatement, R4 4.0.1), for ``GET /fhir/metadata``."""
    paging = (
        "_count is the page size (1..1000, default 50), _offset the number of matches to "
        "skip; _summary=count answers the total only; _format (JSON only) and _pretty are "
        "accepted. Other parameters are refused (400) unless the request carries "
        "Prefer: handling=lenient, which ignores them and reports them in an "
        "OperationOutcome entry (search.mode=outcome)."
    )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "dicomgate",
        "kind": "instance",
        "software": {"name": "dicomgate", "version": __version__},
        "implementation": {
            "description": "dicomgate: ImagingStudy resources built from its DICOM index",
            "url": f"{base}/fhir",
        },
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Read-only: ImagingStudy read and search (GET, or POST "
                "_search with a form body). Each study names a WADO-RS endpoint "
                "(contained Endpoint, dicom-wado-rs) to retrieve its instances.",
                "resource": [
                    {
                        "type": "ImagingStudy",
                        "profile": "http://hl7.org/fhir/StructureDefinition/ImagingStudy",
                        "documentation": "id is the Study Instance UID. " + paging,
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "versioning": "no-version",
                        "readHistory": False,
                        "updateCreate": False,
                        "conditionalCreate": False,
                        "conditionalRead": "not-supported",
                        "conditionalUpdate": False,
                        "conditionalDelete": "not-supported",
                        "searchParam": [
                            {
                                "name": "patient",
                                "definition": "http://hl7.org/fhir/SearchParameter/"
                                "clinical-patient",
                                "type": "reference",
                                "documentation": "The DICOM Patient ID, as P123 or "
                                "Patient/P123 (one value, no wildcards).",
                            },
                            {
                                "name": "identifier",
                                "definition": "http://hl7.org/fhir/SearchParameter/"
                                "clinical-identifier",
                                "type": "token",
                                "documentation": "urn:dicom:uid|urn:oid:<Study Instance "
                                "UID>, or the Accession Number (no system: |ACC or ACC); "
                                "comma-separated values mean or, but study UIDs and "
                                "accession numbers cannot be mixed in one search.",
                            },
                        ],
                    }
                ],
            }
        ],
    }


def _search_bundle(
    base: str, wanted: _Search, found: list[dict[str, Any]], total: int
) -> dict[str, Any]:
    """The searchset Bundle of one page of matches (search.html "Paging")."""
    count, offset = wanted.count, wanted.offset
    links = [{"relation": "self", "url": _search_url(base, wanted.used, count, offset)}]
    if not wanted.summary_count and offset + len(found) < total:
        url = _search_url(base, wanted.used, count, offset + count)
        links.append({"relation": "next", "url": url})
    if not wanted.summary_count and offset > 0:
        url = _search_url(base, wanted.used, count, max(0, offset - count))
        links.append({"relation": "previous", "url": url})
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/fhir/ImagingStudy/{study['id']}",
            "resource": study,
            "search": {"mode": "match"},
        }
        for study in found
    ]
    if wanted.ignored:
        # search.html "Handling Errors": a lenient server may say what it ignored.
        message = f"ignored unsupported search parameter(s): {', '.join(wanted.ignored)}"
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": outcome("not-supported", message, severity="warning"),
                "search": {"mode": "outcome"},
            }
        )
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
    }
    if entries:  # json.html: FHIR JSON never carries an empty array
        bundle["entry"] = entries
    return bundle


def _search_url(base: str, used: list[tuple[str, str]], count: int, offset: int) -> str:
    """The GET form of this search (only the parameters applied) for the page at ``offset``."""
    params = [*used, ("_count", str(count)), ("_offset", str(offset))]
    return f"{base}/fhir/ImagingStudy?{urlencode(params)}"


def _handling_preference(request: Request) -> str | None:
    """``lenient`` or ``strict`` from ``Prefer: handling=...`` (RFC 7240), else None."""
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            name, _, value = preference.split(";")[0].partition("=")
            if name.strip().lower() == "handling":
                value = value.strip().strip('"').lower()
                return value if value in ("lenient", "strict") else None
    return None


def _pretty_requested(items: Sequence[tuple[str, str]]) -> bool:
    return ("_pretty", "true") in items


def _check_pretty(items: Sequence[tuple[str, str]]) -> None:
    """http.html "general parameters": ``_pretty`` is a boolean (pretty-printing optional)."""
    values = [value for name, value in items if name == "_pretty"]
    if len(values) > 1:
        raise _FhirError(400, "invalid", "_pretty is given more than once")
    if values and values[0] not in ("true", "false"):
        raise _FhirError(400, "invalid", f"_pretty must be true or false, not {values[0]!r}")


def _check_format(items: Sequence[tuple[str, str]], accept: str | None) -> None:
    """406 unless FHIR JSON may be the answer.

    http.html "Content Types and encodings": ``_format`` overrides Accept, and json,
    application/json and application/fhir+json name the same format; "FHIR Version
    parameter": a server that does not serve the version asked for answers 406.
    """
    formats = [value for name, value in items if name == "_format"]
    if len(formats) > 1:
        raise _FhirError(400, "invalid", "_format is given more than once")
    if formats:
        media, params = parse_content_type(formats[0])
        version = params.get("fhirversion")
        if media in _JSON_FORMATS and version in (None, *_FHIR_VERSIONS):
            return
        raise _FhirError(
            406, "not-supported", f"only FHIR R4 JSON is served, not _format={formats[0]!r}"
        )
    try:
        ranges = parse_accept(accept)
    except AcceptError as error:
        raise _FhirError(400, "invalid", str(error)) from None
    for entry in ranges:
        version = entry.params.get("fhirversion")
        if entry.media_type in _JSON_RANGES and version in (None, *_FHIR_VERSIONS):
            return
    raise _FhirError(406, "not-supported", f"only FHIR R4 JSON is served, not Accept: {accept}")


async def _form_parameters(request: Request) -> list[tuple[str, str]]:
    """The parameters of a POST _search body (search.html "Introduction": a form,
    application/x-www-form-urlencoded), at most MAX_SEARCH_BODY bytes."""
    too_long = _FhirError(413, "too-long", f"a search body is at most {MAX_SEARCH_BODY} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_SEARCH_BODY:
        raise too_long
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SEARCH_BODY:
            raise too_long
    if not body:
        return []
    media, params = parse_content_type(request.headers.get("content-type", ""))
    charset = params.get("charset", "utf-8").lower()
    if media != "application/x-www-form-urlencoded" or charset != "utf-8":
        raise _FhirError(
            415, "not-supported", "a search body is application/x-www-form-urlencoded (UTF-8)"
        )
    try:
        return parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            errors="strict",
            max_num_fields=MAX_SEARCH_FIELDS,
        )
    except UnicodeDecodeError:
        raise _FhirError(400, "invalid", "the search body is not UTF-8") from None
    except ValueError:
        raise _FhirError(
            400, "invalid", f"a search body has at most {MAX_SEARCH_FIELDS} parameters"
        ) from None


def _parse_search(items: Sequence[tuple[str, str]], lenient: bool) -> _Search:
    """The search that ``items`` (name, value pairs in request order) asks for."""
    given: dict[str, list[str]] = {}
    for name, value in items:
        given.setdefault(name, []).append(value)
    wanted = _Search(keys={})
    for name in list(given):
        if name in _CRITERIA or name in _CONTROLS:
            continue
        # search.html "Handling Errors": with handling=lenient, unknown and unsupported
        # parameters are ignored (and reported); by default (strict) they are refused.
        # A modifier or chain on a criterion we do apply (patient:missing,
        # identifier:of-type, patient.name) is refused either way: dropping it would
        # change that criterion rather than leave out one the client can do without.
        root = name.split(":")[0].split(".")[0]
        if lenient and root not in _CRITERIA:
            wanted.ignored.append(name)
            del given[name]
    unknown = sorted(set(given) - {*_CRITERIA, *_CONTROLS})
    if unknown:
        raise _FhirError(400, "not-supported", f"unsupported search parameter(s): {unknown}")
    for name, values in given.items():
        if len(values) > 1:
            raise _FhirError(400, "invalid", f"{name} is given more than once")
    params = {name: values[0] for name, values in given.items()}
    wanted.used = [(name, value) for name, value in params.items() if name in _CRITERIA]
    wanted.used += [
        (name, value) for name, value in params.items() if name in ("_summary", "_format")
    ]
    _check_pretty(items)
    if "_pretty" in params:
        wanted.used.append(("_pretty", params["_pretty"]))
    if "_count" in params:
        value = params["_count"]
        if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= MAX_COUNT:
            raise _FhirError(400, "invalid", f"_count must be 1..{MAX_COUNT}, not {value!r}")
        wanted.count = int(value)
    if "_offset" in params:
        value = params["_offset"]
        if not (value.isascii() and value.isdigit()) or int(value) > MAX_OFFSET:
            raise _FhirError(400, "invalid", f"_offset must be 0..{MAX_OFFSET}, not {value!r}")
        wanted.offset = int(value)
    # search.html "Summary": count is the total only; false is the whole resource.
    summary = params.get("_summary", "false")
    if summary not in ("count", "false"):
        raise _FhirError(
            400, "not-supported", f"_summary={summary!r} is not supported (count, false are)"
        )
    wanted.summary_count = summary == "count"
    if "patient" in params:
        patient = params["patient"].strip()
        patient = patient.removeprefix("Patient/")
        if not patient or "," in patient or "*" in patient or "?" in patient:
            raise _FhirError(400, "invalid", f"patient must be one Patient ID, not {patient!r}")
        wanted.keys["PatientID"] = patient
    any_identifier = False
    if "identifier" in params:
        key, any_identifier = _identifier_key(params["identifier"])
        if key is None and not any_identifier:
            wanted.matches_nothing = True
        elif key is not None:
            wanted.keys.update(key)
    if not wanted.keys and not wanted.matches_nothing:
        # Refused rather than a listing of every study: FHIR does not require one and a
        # large archive would answer slowly (urn:dicom:uid| alone is such a search).
        why = "an identifier value" if any_identifier else "and/or identifier"
        raise _FhirError(400, "invalid", f"give patient {why}")
    return wanted


def _identifier_key(text: str) -> tuple[dict[str, str] | None, bool]:
    """The index key for an ``identifier`` token list, and whether it matches every study.

    search.html "token": ``code`` matches an identifier value whatever its system,
    ``system|code`` only an identifier with that system, ``|code`` only one with no
    system, ``system|`` any identifier with that system. A study carries exactly two:
    ``urn:dicom:uid`` + ``urn:oid:<Study Instance UID>``, and its Accession Number with
    no system (typed ACSN; the type's code system is not the identifier's system). So a
    UID is found by ``urn:oid:`` with no system or ``urn:dicom:uid``; an accession number
    by a code with no system or ``|``; any other system matches nothing. A ``urn:oid:``
    code with no system is taken as a UID (an Accession Number, 16 characters at most,
    so shaped is not searched for). ``(None, False)``: the tokens match no study.
    """
    uids: list[str] = []
    accessions: list[str] = []
    matches_all = False
    for token in _split_escaped(text, ","):
        parts = [_unescape(part) for part in _split_escaped(token.strip(), "|")]
        if len(parts) > 2 or not any(parts):
            raise _FhirError(400, "invalid", f"identifier {token!r} is not a token")
        system: str | None = parts[0] if len(parts) == 2 else None
        code = parts[-1]
        if not code:  # system| : every identifier with that system
            matches_all = matches_all or system == DICOM_UID_SYSTEM
            continue
        if code.startswith("urn:oid:") and system in (None, DICOM_UID_SYSTEM):
            uid = code.removeprefix("urn:oid:")
            if not nameable_uid(uid):
                raise _FhirError(400, "invalid", f"{code!r} is not a urn:oid: UID")
            uids.append(uid)
        elif system in (None, ""):
            if any(c in code for c in "*?\\"):  # DICOM wildcards and value separator
                raise _FhirError(400, "invalid", f"identifier {token!r} is not usable")
            accessions.append(code)
        # else: a system no identifier of ours carries (or a urn:dicom:uid that is not a
        # urn:oid:): the token matches nothing.
    if matches_all:
        return None, True
    if uids and accessions:
        raise _FhirError(400, "not-supported", "identifier mixes study UIDs and accession numbers")
    if uids:
        return {"StudyInstanceUID": "\\".join(uids)}, False
    if accessions:
        return {"AccessionNumber": "\\".join(accessions)}, False
    return None, False


def _split_escaped(text: str, separator: str) -> list[str]:
    """``text`` cut at each ``separator`` not escaped by a backslash (search.html
    "Escaping Search Parameters"); the escapes are kept for :func:`_unescape`."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    """``\\,``, ``\\|``, ``\\$`` and ``\\\\`` as the characters they stand for."""
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        out.append(next(chars, char) if char == "\\" else char)
    return "".join(out)


def count_studies(connection: Connection, keys: Mapping[str, str]) -> int:
    """The number of studies matching ``keys``."""
    # Only the identifying columns: counting the matches costs no computed attributes.
    return len(search(connection, Level.STUDY, dict(keys)).matches)


def imaging_studies(
    connection: Connection, keys: Mapping[str, str], base: str, count: int, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """ImagingStudy resources of the page of matches of ``keys`` (at most ``count`` from
    ``offset``) and the number of matches of the whole search."""
    total = count_studies(connection, keys)
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
