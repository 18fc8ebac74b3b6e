"""Unusual and malformed HTTP parameters on a real gateway (found by fuzzing): never a 500,
every JSON error in the documented shape ``{"error": "..."}`` (400 for bad input, 404, 405),
and a keep-alive connection that stays usable after an error.

One gateway per module holds the C-FIND corpus of test_qr_scp (study 1: an MR and a CT
series; studies 2 and 3: CT), so QIDO-RS and C-FIND answers can be compared.
"""

from __future__ import annotations

import http.client
import io
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import MRImageStorage
from tests.conftest import GatewayProcess, bundled_file, loaded_gateway, needs_dcmtk, sqlite_only
from tests.integration.test_qr_scp import STUDY_ROOT, UID_ROOT, findscu, write_corpus

from dicomgate.security.http_auth import hash_api_key, new_api_key

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

S1, S2, S3 = UID_ROOT + "1", UID_ROOT + "2", UID_ROOT + "3"
BIG = str(2**64)  # beyond SQLite's (and PostgreSQL's BIGINT) 64-bit integers


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("bad-params")
    with loaded_gateway(root / "gw", write_corpus(root / "corpus")) as gw:
        yield gw


@pytest.fixture
def client(gw: GatewayProcess) -> Iterator[httpx.Client]:
    """One client, one keep-alive connection for the whole test."""
    with httpx.Client(base_url=gw.url(""), timeout=30) as client:
        yield client


def uids(answer: httpx.Response, tag: str) -> list[str]:
    assert answer.status_code == 200, answer.text
    return [item[tag]["Value"][0] for item in answer.json()]


def assert_error(answer: httpx.Response, status: int, *words: str) -> str:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    for word in words:
        assert word in body["error"], body
    return str(body["error"])


# -- QIDO-RS ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["limit", "offset"])
@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662"])
def test_qido_limit_and_offset_take_ascii_digits_only(
    client: httpx.Client, name: str, value: str
) -> None:
    """'²'.isdigit() is True yet int('²') fails (was a 500); '١٢' and '1_0' were taken as
    12 and 10."""
    assert_error(client.get("/dicomweb/studies", params={name: value}), 400, name)
    # The same connection answers the next request.
    assert len(client.get("/dicomweb/studies", params={name: "1"}).json()) >= 1


@pytest.mark.parametrize(
    ("path", "key", "value"),
    [
        ("/dicomweb/series", "SeriesNumber", "99999999999999999999"),
        ("/dicomweb/series", "SeriesNumber", BIG),
        ("/dicomweb/series", "SeriesNumber", "-" + BIG),
        ("/dicomweb/series", "SeriesNumber", str(2**31)),  # beyond IS (PS3.5 6.2)
        ("/dicomweb/instances", "Rows", "99999999999999999999"),
        ("/dicomweb/instances", "InstanceNumber", "1" * 200),
        (f"/dicomweb/studies/{S1}/series", "SeriesNumber", BIG),
    ],
)
def test_qido_integer_beyond_range_matches_nothing(
    client: httpx.Client, path: str, key: str, value: str
) -> None:
    """An integer no stored value can equal is a valid query with no match (was a 500:
    OverflowError from SQLite)."""
    answer = client.get(path, params={key: value})
    assert answer.status_code == 200, answer.text
    assert answer.json() == []


def test_qido_integer_keys_still_match_and_refuse_non_integers(client: httpx.Client) -> None:
    numbers = client.get("/dicomweb/series", params={"SeriesNumber": "+1"})
    assert uids(numbers, "0020000E") == [S1 + ".1", S2 + ".1", S3 + ".1"]
    for bad in ("\u0661", "1_0", "1.5", "x"):
        assert_error(client.get("/dicomweb/series", params={"SeriesNumber": bad}), 400)


def test_cfind_integer_beyond_range_matches_nothing(gw: GatewayProcess, tmp_path: Path) -> None:
    keys = {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "", "SeriesNumber": BIG}
    answer = findscu(gw, STUDY_ROOT, keys, tmp_path)
    assert answer.final == 0x0000, answer.output[-2000:]
    assert answer.responses == []


@pytest.mark.parametrize(
    ("path", "params", "tag", "expected"),
    [
        ("/dicomweb/series", {"ModalitiesInStudy": "MR"}, "0020000E", [S1 + ".1", S1 + ".2"]),
        (
            "/dicomweb/series",
            {"ModalitiesInStudy": "CT"},
            "0020000E",
            [S1 + ".1", S1 + ".2", S2 + ".1", S3 + ".1"],
        ),
        ("/dicomweb/series", {"ModalitiesInStudy": "US\\M?"}, "0020000E", [S1 + ".1", S1 + ".2"]),
        (f"/dicomweb/studies/{S1}/series", {"ModalitiesInStudy": "CT"}, "0020000E", None),
        (f"/dicomweb/studies/{S2}/series", {"ModalitiesInStudy": "MR"}, "0020000E", []),
        (
            "/dicomweb/instances",
            {"ModalitiesInStudy": "MR"},
            "00080018",
            [f"{S1}.1.{i}" for i in (1, 2, 3)] + [f"{S1}.2.1"],
        ),
        (
            f"/dicomweb/studies/{S1}/instances",
            {"ModalitiesInStudy": "M*"},
            "00080018",
            [f"{S1}.1.{i}" for i in (1, 2, 3)] + [f"{S1}.2.1"],
        ),
        (f"/dicomweb/studies/{S2}/instances", {"ModalitiesInStudy": "MR"}, "00080018", []),
        (  # with the other computed study key, which (aliased too) worked before
            "/dicomweb/series",
            {"SOPClassesInStudy": MRImageStorage, "ModalitiesInStudy": "CT"},
            "0020000E",
            [S1 + ".1", S1 + ".2"],
        ),
        (
            f"/dicomweb/studies/{S1}/series/{S1}.2/instances",
            {"SOPClassesInStudy": MRImageStorage, "ModalitiesInStudy": "MR"},
            "00080018",
            [f"{S1}.2.1"],
        ),
    ],
)
def test_qido_study_keys_filter_series_and_instance_searches(
    client: httpx.Client, path: str, params: dict[str, str], tag: str, expected: list[str] | None
) -> None:
    """Study-level computed keys at a lower level (PS3.18 10.6.1.2.2) filter by the study's
    modalities / SOP classes (was a 500: SQLAlchemy 'returned no FROM clauses')."""
    answer = client.get(path, params=params)
    got = uids(answer, tag)
    assert got == (expected if expected is not None else [S1 + ".1", S1 + ".2"])
    if "ModalitiesInStudy" in params:  # returned, with the study's value
        modalities = {S1: ["CT", "MR"], S2: ["CT"], S3: ["CT"]}
        for result in answer.json():
            study = result["0020000D"]["Value"][0] if "0020000D" in result else S1
            assert result["00080061"]["Value"] == modalities[study]


@pytest.mark.parametrize(
    ("level", "keys", "expected"),
    [
        ("SERIES", {"SeriesInstanceUID": ""}, [S1 + ".1", S1 + ".2"]),
        ("IMAGE", {"SOPInstanceUID": ""}, [f"{S1}.1.{i}" for i in (1, 2, 3)] + [f"{S1}.2.1"]),
    ],
)
def test_cfind_modalities_in_study_below_study_level(
    gw: GatewayProcess, tmp_path: Path, level: str, keys: dict[str, str], expected: list[str]
) -> None:
    """C-FIND shares the query engine: the same key at SERIES and IMAGE level."""
    identifier = {"QueryRetrieveLevel": level, "ModalitiesInStudy": "MR", **keys}
    answer = findscu(gw, STUDY_ROOT, identifier, tmp_path)
    assert answer.final == 0x0000, answer.output[-2000:]
    unique = "SeriesInstanceUID" if level == "SERIES" else "SOPInstanceUID"
    assert sorted(answer.values(unique)) == sorted(expected)
    assert {tuple(ds.ModalitiesInStudy) for ds in answer.responses} == {("CT", "MR")}


# -- /api and /ui ---------------------------------------------------------------------------


def test_api_ids_and_offsets_beyond_64_bits(client: httpx.Client) -> None:
    """Were 500s (OverflowError from SQLite): an id no row can have is not found, an offset
    past every row is an empty page."""
    page = client.get("/api/queue", params={"offset": BIG})
    assert page.status_code == 200, page.text
    assert page.json()["jobs"] == []
    audit = client.get("/api/audit", params={"offset": BIG})
    assert audit.status_code == 200, audit.text
    assert audit.json()["events"] == []
    for job in (BIG, "-" + BIG, str(2**63), "0"):
        assert_error(client.get(f"/api/queue/{job}"), 404, "no job")
        assert_error(client.post(f"/api/queue/{job}/retry"), 404, "no job")
    page = client.get(f"/ui/queue/{BIG}")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "No such job." in page.text


@pytest.mark.parametrize(
    ("method", "path", "status", "words"),
    [
        ("GET", "/api/queue?limit=abc", 400, ["limit: must be an integer"]),
        ("GET", "/api/queue?offset=1.5", 400, ["offset: must be an integer"]),
        ("GET", "/api/audit?limit=%C2%B2", 400, ["limit: must be an integer"]),
        ("GET", "/api/queue/abc", 400, ["job_id: must be an integer"]),
        ("POST", "/api/queue/abc/retry", 400, ["job_id: must be an integer"]),
        ("GET", "/dicomweb/studies/abc%2Fdef/series", 404, ["not found"]),
        ("GET", "/no/such/path", 404, ["not found"]),
        ("GET", "/api/nothing", 404, ["not found"]),
        ("DELETE", "/healthz", 405, ["method not allowed"]),
        ("PUT", "/dicomweb/studies", 405, ["method not allowed"]),
    ],
)
def test_errors_have_the_documented_shape(
    client: httpx.Client, method: str, path: str, status: int, words: list[str]
) -> None:
    """Not FastAPI's 422 ``{"detail": [...]}`` nor ``{"detail": "Not Found"}``."""
    answer = client.request(method, path)
    assert_error(answer, status, *words)
    if status == 405:
        assert answer.headers["allow"]
    assert client.get("/healthz").status_code == 200  # same connection


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        # Starlette named only the first route whose path matched: "GET" (/api/queue/{job_id})
        ("PUT", "/api/queue/retry-dead", {"GET", "HEAD", "POST"}),
        ("PUT", "/api/queue/7/retry", {"POST"}),
        ("DELETE", "/dicomweb/studies", {"GET", "HEAD", "POST"}),
        # Every GET resource serves HEAD (RFC 9110 9.1), and its Allow says so.
        ("DELETE", "/healthz", {"GET", "HEAD"}),
        ("POST", f"/dicomweb/studies/{S1}/metadata", {"GET", "HEAD"}),
    ],
)
def test_405_allow_names_every_method_the_path_serves(
    client: httpx.Client, method: str, path: str, allowed: set[str]
) -> None:
    answer = client.request(method, path)
    assert_error(answer, 405, "method not allowed")
    assert {m.strip() for m in answer.headers["allow"].split(",")} == allowed
    for other in allowed:  # each one it names is served (not another 405)
        assert client.request(other, path).status_code != 405


def test_console_pages_answer_bad_parameters_with_a_page(client: httpx.Client) -> None:
    page = client.get("/ui/queue/abc")
    assert page.status_code == 400
    assert page.headers["content-type"].startswith("text/html")
    assert "job_id: must be an integer" in page.text


def test_openapi_documents_400_errors(client: httpx.Client) -> None:
    document = client.get("/api/openapi.json").json()
    text = json.dumps(document)
    assert '"422"' not in text and "HTTPValidationError" not in text
    responses = document["paths"]["/api/queue"]["get"]["responses"]
    assert responses["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }


@pytest.mark.parametrize(
    ("path", "method", "statuses"),
    [
        ("/api/queue", "get", {"400", "503"}),
        ("/api/queue", "delete", {"400", "503"}),
        ("/api/queue/{job_id}", "get", {"400", "404", "503"}),
        ("/api/queue/{job_id}/retry", "post", {"400", "404", "409", "503"}),
        ("/api/queue/retry-dead", "post", {"400", "404", "503"}),
        ("/api/destinations/{name}/pause", "post", {"400", "404"}),
        ("/api/destinations/{name}/resume", "post", {"400", "404"}),
        ("/api/audit", "get", {"400", "503"}),
    ],
)
def test_openapi_lists_the_errors_each_admin_route_answers(
    client: httpx.Client, path: str, method: str, statuses: set[str]
) -> None:
    """Only 400 was listed (where FastAPI had its 422): a client generated from the
    document knew nothing of the 404 for an unknown job, the 409 for a leased one, or
    the 503 while the index database is away (schemathesis, session 14). Every route
    with a parameter lists 400 (app.py, where FastAPI lists its 422)."""
    responses = client.get("/api/openapi.json").json()["paths"][path][method]["responses"]
    errors = {code for code in responses if code.startswith(("4", "5"))}
    assert errors == statuses
    for code in statuses:
        assert responses[code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }


def test_sign_in_page_status_comes_from_its_error_code_only(
    gateway: Callable[..., GatewayProcess],
) -> None:
    """The sign-in page's status followed a ``status`` integer in its URL (99999 is no HTTP
    status); now only a known ``error`` code sets it, and the URL's ``status`` is ignored."""
    keys = [{"name": "ops", "sha256": hash_api_key(new_api_key()), "scopes": ["admin"]}]
    gw = gateway({"http": {"auth": {"api_keys": keys}}})
    with httpx.Client(base_url=gw.url(""), timeout=30) as client:
        for params, expected in (
            ({"error": "refused", "status": "99999"}, 200),  # unknown code: no error shown
            ({"error": "invalid_api_key", "status": "200"}, 401),
            ({"error": "invalid_api_key", "status": "-1"}, 401),
            ({"error": "keys_unavailable", "status": "403"}, 503),
        ):
            page = client.get("/ui/login", params=params)
            assert page.status_code == expected, (params, page.status_code)
            assert page.headers["content-type"].startswith("text/html")
        assert client.get("/healthz").status_code == 200


# -- an unexpected error --------------------------------------------------------------------


@sqlite_only("corrupts a row of the SQLite index by hand")
def test_unexpected_error_is_a_json_500_and_keeps_the_connection(
    gateway: Callable[..., GatewayProcess],
) -> None:
    """An index row no handler expects (a text where an integer belongs, as a hand-edited or
    damaged database can hold) makes QIDO-RS fail unexpectedly: answered 500 with the
    documented JSON body, logged once as http.internal_error without the value, and the
    keep-alive connection serves the next request (it was closed: ECONNRESET)."""
    gw = gateway()
    ds = pydicom.dcmread(bundled_file("CT_small.dcm"))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    stored = httpx.post(
        gw.url("/dicomweb/studies"),
        content=buffer.getvalue(),
        headers={"Content-Type": "application/dicom"},
        timeout=30,
    )
    assert stored.status_code == 200, stored.text
    with sqlite3.connect(gw.data / "index.db") as db:
        db.execute("UPDATE instance SET rows = 'SECRETVALUE'")

    connection = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    try:
        answers: list[tuple[int, str, Any]] = []
        for path in ("/dicomweb/instances", "/healthz", "/dicomweb/instances", "/healthz"):
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            answers.append((response.status, response.getheader("content-type", ""), body))
    finally:
        connection.close()
    assert [a[0] for a in answers] == [500, 200, 500, 200]
    assert answers[0][1].startswith("application/json")
    assert json.loads(answers[0][2]) == {"error": "internal error"}

    log = gw.log_text()
    assert gw.log_count("http.internal_error") == 2, gw.log_tail()
    assert "Exception in ASGI application" not in log
    assert "SECRETVALUE" not in log
    line = next(x for x in log.splitlines() if " http.internal_error " in x)
    assert "ValueError" in line and "route=/dicomweb/instances" in line
    assert "dicomgate/index/query.py:" in line  # the frames, on the same line
    metrics = httpx.get(gw.url("/metrics")).text
    assert 'route="/dicomweb/instances",status="500"} 2.0' in metrics
