"""STOW-RS metadata + bulk data (``type="application/dicom+json"``) into a real gateway.

Each instance is uploaded as DICOM JSON with its large values in bulk data parts, then
retrieved with WADO-RS and compared with the original, element by element and pixel by
pixel; bad requests store nothing and bad instances fail alone.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom import Dataset
from pydicom.encaps import generate_frames
from tests.conftest import GatewayProcess, bundled_file

pytestmark = [pytest.mark.timeout(120)]

Gateway = Callable[..., GatewayProcess]
BOUNDARY = "dicomgate-json-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'


@pytest.fixture
def gw(gateway: Gateway, tmp_path: Path) -> Iterator[GatewayProcess]:
    yield gateway(
        {
            "destinations": {"share": {"type": "folder", "path": str(tmp_path / "share")}},
            "routes": [{"name": "web", "match": {"received_via": "stow"}, "to": ["share"]}],
            "queue": {"poll_interval": 0.1},
        }
    )


def as_json(ds: Dataset, prefix: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``ds`` as DICOM JSON with every value over 1 KiB moved to a bulk data part."""
    parts: dict[str, bytes] = {}

    def bulk(elem: pydicom.DataElement) -> str:
        uri = f"{prefix}/bulk/{elem.tag:08X}"
        parts[uri] = elem.value
        return uri

    with warnings.catch_warnings():  # rtdose.dcm has a malformed UID; it travels as it is
        warnings.simplefilter("ignore")
        doc = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=bulk)
    return doc, parts


def body(
    docs: list[dict[str, Any]], parts: dict[str, bytes], media: dict[str, str] | None = None
) -> bytes:
    out = bytearray()
    out += f"--{BOUNDARY}\r\nContent-Type: application/dicom+json\r\n\r\n".encode()
    out += json.dumps(docs).encode() + b"\r\n"
    for uri, data in parts.items():
        kind = (media or {}).get(uri, "application/octet-stream")
        out += f"--{BOUNDARY}\r\nContent-Type: {kind}\r\nContent-Location: {uri}\r\n\r\n".encode()
        out += data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def post(gw: GatewayProcess, data: bytes, content_type: str = CONTENT_TYPE) -> httpx.Response:
    return httpx.post(
        gw.url("/dicomweb/studies"),
        content=data,
        headers={"content-type": content_type, "accept": "application/dicom+json"},
        timeout=60,
    )


def retrieve(gw: GatewayProcess, ds: Dataset) -> Dataset:
    url = gw.url(
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    r = httpx.get(url, headers={"accept": 'multipart/related; type="application/dicom"; '
                                          "transfer-syntax=*"}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    boundary = r.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    part = r.content.split(f"--{boundary}".encode())[1]
    return pydicom.dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]))


def referenced(answer: dict[str, Any]) -> list[str]:
    return [i["00081155"]["Value"][0] for i in answer.get("00081199", {}).get("Value", [])]


def failed(answer: dict[str, Any]) -> dict[str, int]:
    items = answer.get("00081198", {}).get("Value", [])
    return {i["00081155"]["Value"][0]: i["00081197"]["Value"][0] for i in items}


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "rtdose.dcm"])
def test_native_instances_round_trip(gw: GatewayProcess, name: str) -> None:
    src = pydicom.dcmread(bundled_file(name))
    doc, parts = as_json(src, "http://client.example/upload")
    assert any(uri.endswith("7FE00010") for uri in parts)  # the pixels went as bulk data
    r = post(gw, body([doc], parts))
    assert r.status_code == 200, r.text
    assert referenced(r.json()) == [src.SOPInstanceUID]
    got = retrieve(gw, src)
    for elem in src:
        if elem.tag.group != 0x0002 and elem.VR != "SQ":
            assert got[elem.tag].value == elem.value, elem.keyword
    assert (got.pixel_array == src.pixel_array).all()
    # Routed like any STOW-RS instance.
    assert gw.index.count_instances() == 1


def test_compressed_frame_and_relative_uris(gw: GatewayProcess) -> None:
    src = pydicom.dcmread(bundled_file("SC_rgb_jpeg_dcmtk.dcm"))  # one JPEG baseline frame
    frame = next(generate_frames(src.PixelData, number_of_frames=1))
    meta = copy.deepcopy(src)
    del meta.PixelData
    doc, _ = as_json(meta, "")
    doc["7FE00010"] = {"vr": "OB", "BulkDataURI": "frames/1"}  # relative, as clients send
    r = post(gw, body([doc], {"/frames/1": frame}, {"/frames/1": "image/jpeg"}))
    assert r.status_code == 200, r.text
    got = retrieve(gw, src)
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert (got.pixel_array == src.pixel_array).all()


def test_several_instances_one_failing_alone(gw: GatewayProcess) -> None:
    good = pydicom.dcmread(bundled_file("CT_small.dcm"))
    other = pydicom.dcmread(bundled_file("MR_small.dcm"))
    doc1, parts1 = as_json(good, "/up/1")
    doc2, _ = as_json(other, "/up/2")  # its pixel data part is never sent
    no_uid = dict(doc1)
    del no_uid["00080018"]
    r = post(gw, body([doc1, doc2, no_uid], parts1))
    assert r.status_code == 202, r.text
    answer = r.json()
    assert referenced(answer) == [good.SOPInstanceUID]
    assert failed(answer)[other.SOPInstanceUID] == 0xC000
    assert len(answer["00081198"]["Value"]) == 2
    assert gw.index.count_instances() == 1


def _nested(doc: dict[str, Any], depth: int) -> dict[str, Any]:
    """``doc`` with ``depth`` Referenced SOP Sequences nested in one another."""
    inner: dict[str, Any] = {}
    for _ in range(depth):
        inner = {"00081199": {"vr": "SQ", "Value": [inner]}}
    return {**doc, **inner}


def test_sequences_nested_too_deep_are_refused(gw: GatewayProcess) -> None:
    """64 levels, as the DIMSE and Part 10 parser takes them, are stored; 65 fail that
    instance with 0xC000; JSON too deep for the parser is a 400 (both were a 500 from a
    RecursionError in pydicom or the JSON parser)."""
    src = pydicom.dcmread(bundled_file("CT_small.dcm"))
    doc, parts = as_json(src, "/up")
    deep = json.dumps([_nested(doc, 64)]).encode()
    r = post(gw, body([doc], parts).replace(json.dumps([doc]).encode(), deep))
    assert r.status_code == 200, r.text
    assert retrieve(gw, src).ReferencedSOPSequence[0].ReferencedSOPSequence  # kept nested
    other = pydicom.dcmread(bundled_file("MR_small.dcm"))
    doc, parts = as_json(other, "/up")
    too_deep = json.dumps([_nested(doc, 65)]).encode()
    r = post(gw, body([doc], parts).replace(json.dumps([doc]).encode(), too_deep))
    assert r.status_code == 409, r.text
    assert failed(r.json()) == {other.SOPInstanceUID: 0xC000}
    nested = b'[{"00081199": {"vr": "SQ", "Value": [' * 100_000
    r = post(gw, body([doc], parts).replace(json.dumps([doc]).encode(), nested))
    assert (r.status_code, r.json()) == (400, {"error": "part 1: JSON nested too deep"})
    assert gw.index.count_instances() == 1
    assert "Traceback" not in gw.log_text()


SECRET = "PHI-SECRET-4711"  # a patient ID that must never reach the log
COERCED = {
    "unknown VR": {"00080020": {"vr": "ZZ", "Value": ["20260101"]}},
    "AT that is not a tag": {"00209165": {"vr": "AT", "Value": ["GGGGHHHH"]}},
    "LO longer than 64 KiB": {"00081030": {"vr": "LO", "Value": ["x" * 70_000]}},
    "text outside the character set": {
        "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
        "00081030": {"vr": "LO", "Value": ["Zürich 日本"]},
    },
    "four-digit key": {"0008": {"vr": "CS", "Value": ["X"]}},
    "keyword key": {"StudyDescription": {"vr": "LO", "Value": ["X"]}},
    "command group element": {"00000900": {"vr": "US", "Value": [0]}},
    "patient ID as a number": {"00100020": {"vr": "US", "Value": [SECRET]}},
}


@pytest.mark.parametrize("case", list(COERCED))
def test_metadata_that_would_be_coerced_fails_its_instance(gw: GatewayProcess, case: str) -> None:
    """pydicom drops or replaces what it cannot take (an AT that is not a tag, text outside
    the character set as '?', an LO too long as UN), raises NotImplementedError for a VR it
    does not know (a 500 that left a spool file behind), and reads "0008" as the command
    element (0000,0008); each was stored as something else than was sent, or failed the
    request. Now the instance fails with 0xC000, and the log names no value."""
    src = pydicom.dcmread(bundled_file("CT_small.dcm"))
    doc, parts = as_json(src, "/up")
    doc = {**doc, **COERCED[case]}
    r = post(gw, body([doc], parts))
    assert r.status_code == 409, r.text
    assert failed(r.json()) == {src.SOPInstanceUID: 0xC000}
    assert gw.index.count_instances() == 0
    log = gw.log_text()
    assert "Traceback" not in log and SECRET not in log
    assert gw.log_count("stow.instance_refused") == 1


BAD_CASES = [
    "not-json",
    "json-list-of-numbers",
    "bulk-without-location",
    "no-metadata",
    "text-bulk",
    "truncated",
]


def test_bad_requests_store_nothing(gw: GatewayProcess) -> None:
    """Each malformed request is refused whole with 400 and a JSON error, stores nothing,
    leaves no spool file behind; the gateway goes on serving (one gateway for all)."""
    src = pydicom.dcmread(bundled_file("CT_small.dcm"))
    doc, parts = as_json(src, "/up")
    metadata = json.dumps([doc]).encode()
    for case in BAD_CASES:
        data = body([doc], parts)
        if case == "not-json":
            data = data.replace(metadata, b"{not json")
        elif case == "json-list-of-numbers":
            data = data.replace(metadata, b"[1, 2, 3]")
        elif case == "bulk-without-location":
            data = data.replace(b"Content-Location: ", b"X-Other: ")
        elif case == "no-metadata":
            data = data.replace(
                b"Content-Type: application/dicom+json\r\n\r\n" + metadata,
                b"Content-Type: application/octet-stream\r\nContent-Location: /x\r\n\r\nabc",
            )
        elif case == "text-bulk":
            data = body([doc], parts, {next(iter(parts)): "text/plain"})
        elif case == "truncated":
            data = data[:-300]
        r = post(gw, data)
        assert r.status_code == 400, (case, r.text)
        assert r.json()["error"], case
        assert gw.index.count_instances() == 0, case
        assert not list((gw.data / "store").rglob("*.dcm")), case
        assert not [p for p in gw.spool.iterdir() if p.stat().st_size > 0], case
    assert post(gw, body([doc], parts)).status_code == 200  # and it keeps serving
