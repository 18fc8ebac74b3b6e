"""STOW-RS into a real gateway: dicomweb-client and raw HTTP, good and malformed requests.

Every check reads what the gateway really stored (index rows and store files) and what a
route delivered; a refused request must leave the index empty.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import socket
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian
from tests.conftest import (
    Corpus,
    GatewayProcess,
    Orthanc,
    bundled_file,
    delivery_of,
    large_mr,
    sop_uid_of,
    wait_until,
)

from dicomgate.egress.base import Delivery, Outcome
from dicomgate.egress.dicomweb import DicomwebSender
from dicomgate.egress.models import DicomwebDestination
from dicomgate.ingress.sniff import sniff

pytestmark = [pytest.mark.timeout(180)]

Gateway = Callable[..., GatewayProcess]

# The pydicom test files, at least one in each transfer syntax pydicom bundles (checked by
# test_bundled_covers_every_transfer_syntax_of_the_pydicom_test_files).
BUNDLED = [
    "CT_small.dcm",  # explicit little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPGExtended.dcm",
    "image_dfl.dcm",  # deflated
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1 (1.2.840.10008.1.2.4.70)
    "JPEGLSNearLossless_08.dcm",  # JPEG-LS near-lossless (1.2.840.10008.1.2.4.81)
]


def dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file, without its file meta."""
    data = path.read_bytes()
    return data[sniff(data, complete=True).data_offset :]


BOUNDARY = "dicomgate-test-boundary"


def multipart(files: list[bytes], boundary: str = BOUNDARY) -> bytes:
    body = b""
    for data in files:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def post(
    gw: GatewayProcess, body: bytes, path: str = "/dicomweb/studies", **headers: str
) -> httpx.Response:
    headers.setdefault(
        "content-type",
        'multipart/related; type="application/dicom"; boundary=dicomgate-test-boundary',
    )
    return httpx.post(gw.url(path), content=body, headers=headers, timeout=60)


def failed_reasons(answer: dict[str, Any]) -> dict[str, int]:
    items = answer.get("00081198", {}).get("Value", [])  # Type 1C: absent when empty
    return {i["00081155"]["Value"][0]: i["00081197"]["Value"][0] for i in items}


def referenced(answer: dict[str, Any]) -> list[str]:
    items = answer.get("00081199", {}).get("Value", [])  # Type 1C: absent when empty
    return [i["00081155"]["Value"][0] for i in items]


@pytest.fixture
def stow_gateway(gateway: Gateway, tmp_path: Path) -> Iterator[GatewayProcess]:
    yield gateway(
        {
            "destinations": {"share": {"type": "folder", "path": str(tmp_path / "share")}},
            "routes": [{"name": "web", "match": {"received_via": "stow"}, "to": ["share"]}],
            "queue": {"poll_interval": 0.1},
        }
    )


def test_dicomweb_client_stores_every_transfer_syntax_and_routes_them(
    stow_gateway: GatewayProcess, corpus: Corpus, tmp_path: Path
) -> None:
    gw = stow_gateway
    files = [bundled_file(name) for name in BUNDLED] + corpus.mr("stow-mr", 20, seed=91)
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:  # the MR_small variants share one SOP Instance UID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.{uuid.uuid4().int}"
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):  # the JPEG-LS lossy files
            if keyword not in ds:  # lack both, and an instance without them is refused
                setattr(ds, keyword, f"2.25.{uuid.uuid4().int}")
    client = DICOMwebClient(url=gw.url("/dicomweb"))
    answer = client.store_instances(datasets[: len(BUNDLED)])
    answer2 = client.store_instances(datasets[len(BUNDLED) :])
    stored = referenced(answer.to_json_dict()) + referenced(answer2.to_json_dict())
    assert sorted(stored) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for path, ds in zip(files, datasets, strict=True):
        row = gw.index.instance(str(ds.SOPInstanceUID))
        assert row is not None and row["received_via"] == "stow"
        # dicomweb-client re-encodes what it sends; the gateway keeps its data set exactly.
        sent = pydicom.dcmread(gw.stored_path(row))
        assert sent.SOPInstanceUID == ds.SOPInstanceUID
        assert sent.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        if "PixelData" in ds:
            assert sent.PixelData == ds.PixelData, path.name
    share = tmp_path / "share"
    wait_until(lambda: len(list(share.rglob("*.dcm"))) == len(files), 30, "routed copies")


def test_bundled_covers_every_transfer_syntax_of_the_pydicom_test_files() -> None:
    folder = bundled_file("CT_small.dcm").parent
    bundled: set[str] = set()
    for path in folder.rglob("*.dcm"):
        try:
            with warnings.catch_warnings():  # some are deliberately odd; only the meta counts
                warnings.simplefilter("ignore")
                meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        except (InvalidDicomError, AttributeError, ValueError):
            continue  # files without (usable) file meta carry no transfer syntax
        if "TransferSyntaxUID" in meta:
            bundled.add(str(meta.TransferSyntaxUID))
    ours = {str(pydicom.dcmread(bundled_file(n)).file_meta.TransferSyntaxUID) for n in BUNDLED}
    assert len(bundled) >= 12 and bundled <= ours, sorted(bundled - ours)


def test_dicomweb_client_stores_to_one_study_and_a_stranger_fails(
    stow_gateway: GatewayProcess, corpus: Corpus
) -> None:
    """``store_instances(..., study_instance_uid=)`` POSTs to /studies/{uid} (PS3.18 10.5.1):
    the instance of another study fails with 0xA900, the others are stored."""
    gw = stow_gateway
    mine = [pydicom.dcmread(f) for f in corpus.mr("stow-client-study-a", 2, seed=96)]
    stranger = pydicom.dcmread(corpus.mr("stow-client-study-b", 1, seed=97)[0])
    study = str(mine[0].StudyInstanceUID)
    assert str(stranger.StudyInstanceUID) != study
    client = DICOMwebClient(url=gw.url("/dicomweb"))

    answer = client.store_instances([*mine, stranger], study_instance_uid=study).to_json_dict()
    assert sorted(referenced(answer)) == sorted(str(ds.SOPInstanceUID) for ds in mine)
    assert failed_reasons(answer) == {str(stranger.SOPInstanceUID): 0xA900}
    assert answer["00081190"]["Value"] == [gw.url(f"/dicomweb/studies/{study}")]
    for ds in mine:
        row = gw.index.instance(str(ds.SOPInstanceUID))
        assert row is not None and row["received_via"] == "stow"
    assert gw.index.instance(str(stranger.SOPInstanceUID)) is None

    # Nothing of that study: 409, which dicomweb-client raises, and still nothing stored.
    with pytest.raises(requests.HTTPError) as raised:
        client.store_instances([stranger], study_instance_uid=study)
    assert raised.value.response is not None and raised.value.response.status_code == 409
    assert failed_reasons(raised.value.response.json()) == {str(stranger.SOPInstanceUID): 0xA900}
    assert gw.index.instance(str(stranger.SOPInstanceUID)) is None


def test_retrieve_urls_carry_the_port_the_client_reached(
    stow_gateway: GatewayProcess, corpus: Corpus
) -> None:
    """dicomweb-client sends ``Host: 127.0.0.1`` without the port; the RetrieveURLs must
    still point at this gateway (as QIDO's and FHIR's do), and work."""
    gw = stow_gateway
    ds = pydicom.dcmread(corpus.mr("stow-retrieve-url", 1, seed=98)[0])
    client = DICOMwebClient(url=gw.url("/dicomweb"))
    answer = client.store_instances([ds]).to_json_dict()
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    assert answer["00081190"]["Value"] == [gw.url(f"/dicomweb/studies/{study}")]
    (item,) = answer["00081199"]["Value"]
    url = item["00081190"]["Value"][0]
    assert url == gw.url(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}")
    fetched = httpx.get(url, headers={"accept": 'multipart/related; type="application/dicom"'})
    assert fetched.status_code == 200 and str(sop).encode() in fetched.content
    # Behind a proxy that forwards its own Host (with its port), the URLs name the proxy.
    r = post(
        gw,
        multipart([corpus.mr("stow-retrieve-url", 1, seed=98)[0].read_bytes()]),
        host="pacs.example.org:8443",
    )
    assert r.status_code == 200, r.text
    assert r.json()["00081190"]["Value"] == [
        f"http://pacs.example.org:8443/dicomweb/studies/{study}"
    ]


def test_raw_multipart_is_stored_byte_for_byte(
    stow_gateway: GatewayProcess, corpus: Corpus
) -> None:
    gw = stow_gateway
    files = corpus.ct("stow-ct", 3, seed=92)
    r = post(gw, multipart([f.read_bytes() for f in files]), accept="application/dicom+json")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    answer = r.json()
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert answer["00081190"]["Value"] == [gw.url(f"/dicomweb/studies/{study}")]
    assert "00081198" not in answer  # PS3.18 Table I.1-1: Type 1C, no failure
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        row = gw.index.instance(uid)
        assert row is not None
        assert dataset_bytes(gw.stored_path(row)) == dataset_bytes(f)
        item = next(i for i in answer["00081199"]["Value"] if i["00081155"]["Value"] == [uid])
        assert item["00081190"]["Value"][0].endswith(f"/instances/{uid}")
    # A single application/dicom body is one instance.
    one = bundled_file("MR_small.dcm")
    r = post(gw, one.read_bytes(), **{"content-type": "application/dicom"})
    assert r.status_code == 200, r.text
    assert referenced(r.json()) == [str(pydicom.dcmread(one).SOPInstanceUID)]


def test_study_in_the_path_must_match(stow_gateway: GatewayProcess, corpus: Corpus) -> None:
    gw = stow_gateway
    mine = corpus.mr("stow-study-a", 2, seed=93)
    other = corpus.mr("stow-study-b", 1, seed=94)
    study = str(pydicom.dcmread(mine[0], stop_before_pixels=True).StudyInstanceUID)
    r = post(gw, multipart([f.read_bytes() for f in mine + other]), f"/dicomweb/studies/{study}")
    assert r.status_code == 202, r.text
    other_uid = str(pydicom.dcmread(other[0], stop_before_pixels=True).SOPInstanceUID)
    assert failed_reasons(r.json()) == {other_uid: 0xA900}
    assert len(referenced(r.json())) == 2
    assert gw.index.instance(other_uid) is None
    r = post(gw, multipart([other[0].read_bytes()]), f"/dicomweb/studies/{study}")
    assert r.status_code == 409 and failed_reasons(r.json()) == {other_uid: 0xA900}


@pytest.mark.parametrize("damage", ["does not inflate", "half the data set"])
def test_a_broken_deflated_instance_fails_alone(
    stow_gateway: GatewayProcess, corpus: Corpus, damage: str
) -> None:
    """Its data set does not inflate (zlib.error from pydicom): it failed the whole ingest
    batch, the other instances of the request (or of other senders at that moment) with it,
    as 0xA700 and an internal-error traceback. Or its deflate stream is complete but holds
    half the data set: pydicom reads that without complaint, and it was stored and
    acknowledged. Now each fails alone with 0xC000."""
    gw = stow_gateway
    (good,) = corpus.mr("stow-deflate-good", 1, seed=95)
    ds = pydicom.dcmread(corpus.mr("stow-deflate-bad", 1, seed=96)[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    start = 144 + int.from_bytes(raw[140:144], "little")  # the deflated data set
    if damage == "does not inflate":
        bad = raw[:start] + bytes(b ^ 0x5A for b in raw[start : start + 200]) + raw[start + 200 :]
    else:
        whole = zlib.decompress(raw[start:], -zlib.MAX_WBITS)
        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        bad = raw[:start] + deflater.compress(whole[: len(whole) // 2]) + deflater.flush()
    r = post(gw, multipart([good.read_bytes(), bad]))
    assert r.status_code == 202, r.text
    assert referenced(r.json()) == [sop_uid_of(good)]
    assert failed_reasons(r.json()) == {str(ds.SOPInstanceUID): 0xC000}
    assert gw.index.count_instances() == 1
    assert gw.log_count("ingest.internal_error") == 0


def test_duplicate_under_reject_policy_is_a_failed_instance(
    gateway: Gateway, corpus: Corpus
) -> None:
    gw = gateway({"storage": {"duplicates": "reject"}})
    f = corpus.mr("stow-dup", 1, seed=95)[0]
    assert post(gw, multipart([f.read_bytes()])).status_code == 200
    r = post(gw, multipart([f.read_bytes()]))
    assert r.status_code == 409
    assert list(failed_reasons(r.json()).values()) == [0x0111]


@pytest.mark.parametrize("policy", ["keep_both", "overwrite"])
def test_duplicate_stored_under_keep_both_or_overwrite_is_a_plain_success(
    gateway: Gateway, corpus: Corpus, tmp_path: Path, policy: str
) -> None:
    """No WarningReason (0008,1196) for a duplicate the policy stores: C-STORE answers the
    same duplicate 0x0000 Success (not a PS3.4 B.2.3 warning), and STOW mirrors it."""
    gw = gateway({"storage": {"duplicates": policy}})
    first = corpus.mr("stow-dup-stored", 1, seed=99)[0]
    ds = pydicom.dcmread(first)
    ds.StudyDescription = "SECOND VERSION"
    second = tmp_path / "second.dcm"
    ds.save_as(second, enforce_file_format=True)
    sop = str(ds.SOPInstanceUID)

    assert post(gw, multipart([first.read_bytes()])).status_code == 200
    r = post(gw, multipart([second.read_bytes()]))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert "00081198" not in answer
    (item,) = answer["00081199"]["Value"]
    assert item["00081155"]["Value"] == [sop] and "00081196" not in item
    current = gw.index.instance(sop)
    assert current is not None
    assert pydicom.dcmread(gw.stored_path(current)).StudyDescription == "SECOND VERSION"
    assert len(gw.index.instances(sop)) == (2 if policy == "keep_both" else 1)

    # The DIMSE path for the same case: Success, which STOW's plain 200 mirrors.
    sent = gw.storescu([first], "-v")
    assert sent.returncode == 0 and "Received Store Response (Success)" in sent.stdout


def test_orthanc_answers_a_duplicate_without_warning_reason_too(
    orthanc: Orthanc, corpus: Corpus
) -> None:
    """The reference DICOMweb server agrees: a re-sent instance is a plain 200 item."""
    f = corpus.mr("stow-dup-orthanc", 1, seed=100)[0]
    url = f"http://127.0.0.1:{orthanc.http_port}/dicom-web/studies"
    headers = {
        "content-type": (
            'multipart/related; type="application/dicom"; boundary=dicomgate-test-boundary'
        ),
        "accept": "application/dicom+json",
    }
    for _ in range(2):
        r = httpx.post(url, content=multipart([f.read_bytes()]), headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        (item,) = r.json()["00081199"]["Value"]
        assert "00081196" not in item


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("no-boundary", 400),
        ("wrong-boundary", 400),
        ("truncated", 400),
        ("not-dicom-part", 400),
        ("truncated-meta", 400),
        ("json-part", 415),
        ("xml-type", 415),
        ("text-body", 415),
        ("xml-accept", 406),
        ("json-refused-by-q0", 406),
    ],
)
def test_malformed_requests_store_nothing(
    stow_gateway: GatewayProcess, corpus: Corpus, case: str, status: int
) -> None:
    gw = stow_gateway
    good = [f.read_bytes() for f in corpus.mr("stow-bad", 2, seed=96)]
    b = "dicomgate-test-boundary"
    mp = f'multipart/related; type="application/dicom"; boundary={b}'
    body, headers = multipart(good), {"content-type": mp}
    if case == "no-boundary":
        headers["content-type"] = 'multipart/related; type="application/dicom"'
    elif case == "wrong-boundary":
        headers["content-type"] = mp.replace(b, "other")
    elif case == "truncated":
        body = body[: len(body) - 200]
    elif case == "not-dicom-part":
        body = multipart([*good, b"this is a text file, not DICOM" * 10])
    elif case == "truncated-meta":
        body = multipart([good[0][:150]])
    elif case == "json-part":
        body = body.replace(
            b"Content-Type: application/dicom\r\n", b"Content-Type: application/dicom+json\r\n", 1
        )
    elif case == "xml-type":
        headers["content-type"] = mp.replace("application/dicom", "application/dicom+xml")
    elif case == "text-body":
        headers["content-type"] = "text/plain"
    elif case == "xml-accept":
        headers["accept"] = "multipart/related; type=application/dicom+xml"
    elif case == "json-refused-by-q0":  # RFC 9110 12.4.2: q=0 is "not acceptable"
        headers["accept"] = "application/dicom+json;q=0, application/json; q=0.0"
    r = post(gw, body, **headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]
    assert gw.index.count_instances() == 0
    assert not list((gw.data / "store").rglob("*.dcm"))
    assert not [p for p in gw.spool.iterdir() if p.stat().st_size > 0]
    # ...and the gateway keeps serving.
    assert post(gw, multipart(good)).status_code == 200


# -- the response data set (PS3.18 Annex I) -------------------------------------------------


def test_the_response_has_the_attributes_of_table_i_1_1(gateway: Gateway, corpus: Corpus) -> None:
    """PS3.18 Annex I, Table I.1-1: Retrieve URL (0008,1190) is Type 2, so present and empty
    when no one study can be named (it was left out); Failed SOP Sequence (0008,1198) and
    Referenced SOP Sequence (0008,1199) are Type 1C, present only with items (they were
    sent empty). dicomweb-client and our own DICOMweb egress read every shape."""
    gw = gateway({"storage": {"duplicates": "reject"}})
    (a,) = corpus.mr("stow-table-a", 1, seed=103)
    (b,) = corpus.mr("stow-table-b", 1, seed=104)
    (c,) = corpus.mr("stow-table-c", 1, seed=105)
    study_a = str(pydicom.dcmread(a, stop_before_pixels=True).StudyInstanceUID)

    one = post(gw, multipart([a.read_bytes()])).json()  # 200, one study
    assert one["00081190"] == {"vr": "UR", "Value": [gw.url(f"/dicomweb/studies/{study_a}")]}
    assert "00081198" not in one and referenced(one) == [sop_uid_of(a)]
    r = post(gw, multipart([a.read_bytes(), b.read_bytes()]))  # 202: a duplicate, b stored
    assert r.status_code == 202, r.text
    assert r.json()["00081190"]["Value"] == [gw.url(f"/dicomweb/studies/{sop_study(b)}")]
    assert failed_reasons(r.json()) == {sop_uid_of(a): 0x0111}
    r = post(gw, multipart([c.read_bytes()]), f"/dicomweb/studies/{study_a}")  # 409
    assert r.status_code == 409, r.text
    assert r.json()["00081190"] == {"vr": "UR"}
    assert "00081199" not in r.json() and failed_reasons(r.json()) == {sop_uid_of(c): 0xA900}

    # Two studies in one request: no one study to name.
    d, e = corpus.mr("stow-table-d", 1, seed=106)[0], corpus.mr("stow-table-e", 1, seed=107)[0]
    client = DICOMwebClient(url=gw.url("/dicomweb"))
    answer = client.store_instances([pydicom.dcmread(d), pydicom.dcmread(e)])
    assert answer.to_json_dict()["00081190"] == {"vr": "UR"}
    assert "FailedSOPSequence" not in answer and len(answer.ReferencedSOPSequence) == 2

    # Our own STOW-RS client (egress, `dicomgate send`) reads a 200 without Failed SOP
    # Sequence and a 409 without Referenced SOP Sequence.
    (f,) = corpus.mr("stow-table-f", 1, seed=108)
    assert send_to(gw, [delivery_of(f, 1)]) == [Outcome(1, True)]
    (again,) = send_to(gw, [delivery_of(f, 1)])
    assert not again.delivered and "FailureReason 0x0111" in again.error


def sop_study(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def send_to(gw: GatewayProcess, deliveries: list[Delivery]) -> list[Outcome]:
    model = DicomwebDestination.model_validate({"type": "dicomweb", "url": gw.url("/dicomweb")})

    async def run() -> list[Outcome]:
        sender = DicomwebSender("self", model)
        try:
            return await sender.send(deliveries)
        finally:
            await sender.close()

    return asyncio.run(run())


# -- part types and content codings ---------------------------------------------------------

DICOM_PART = b"Content-Type: application/dicom\r\n"


@pytest.mark.parametrize(
    "part_type",
    ["application/octet-stream", 'multipart/related; type="application/dicom"; boundary=inner'],
)
def test_a_bulk_data_part_under_type_dicom_says_how_to_send_one(
    stow_gateway: GatewayProcess, corpus: Corpus, part_type: str
) -> None:
    """Metadata + bulk data uploads are supported (type="application/dicom+json"); the 415
    said they were not. It now says what the request's type allows and how to send them."""
    gw = stow_gateway
    good = [f.read_bytes() for f in corpus.mr("stow-bulk-part", 2, seed=109)]
    # The first part application/dicom, the second of the other type.
    body = multipart(good).replace(DICOM_PART, f"Content-Type: {part_type}\r\n".encode())
    body = body.replace(f"Content-Type: {part_type}\r\n".encode(), DICOM_PART, 1)
    r = post(gw, body)
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert "not supported" not in error
    assert f"part 2 is {part_type.split(';')[0]}" in error
    assert 'type="application/dicom+json"' in error and "PS3.18 10.5.1.2.2" in error
    assert gw.index.count_instances() == 0


def encoded(body: bytes, coding: str) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(body)
    if coding == "deflate":
        return zlib.compress(body)
    if coding == "raw deflate":  # RFC 1951 without the RFC 1950 header, as some clients send
        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        return deflater.compress(body) + deflater.flush()
    return body


@pytest.mark.parametrize(
    ("coding", "header"),
    [
        ("gzip", "gzip"),
        ("x-gzip", "x-gzip"),
        ("deflate", "deflate"),
        ("raw deflate", "deflate"),
        ("gzip", "identity, GZIP"),
        ("identity", "identity"),
    ],
)
def test_a_gzip_or_deflate_body_is_decoded(
    stow_gateway: GatewayProcess, corpus: Corpus, coding: str, header: str
) -> None:
    """RFC 9110 8.4: ``Content-Encoding: gzip`` (as Orthanc decodes it) was answered 400
    "no part with the declared boundary". The body is now decoded as it arrives and each
    instance stored byte for byte."""
    gw = stow_gateway
    files = corpus.ct("stow-coded", 2, seed=110)
    r = post(gw, encoded(multipart([f.read_bytes() for f in files]), coding), **{
        "content-encoding": header
    })  # fmt: skip
    assert r.status_code == 200, r.text
    assert sorted(referenced(r.json())) == sorted(sop_uid_of(f) for f in files)
    for f in files:
        row = gw.index.instance(sop_uid_of(f))
        assert row is not None and dataset_bytes(gw.stored_path(row)) == dataset_bytes(f)
    # One application/dicom body; for gzip, in two members (RFC 1952 2.2).
    one = bundled_file("MR_small.dcm").read_bytes()
    body = encoded(one, coding)
    if coding == "gzip":
        body = gzip.compress(one[:1000]) + gzip.compress(one[1000:])
    headers = {"content-type": "application/dicom", "content-encoding": header}
    r = post(gw, body, **headers)
    assert r.status_code == 200, r.text
    row = gw.index.instance(sop_uid_of(bundled_file("MR_small.dcm")))
    assert row is not None and dataset_bytes(gw.stored_path(row)) == dataset_bytes(
        bundled_file("MR_small.dcm")
    )


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("br", 415, "Content-Encoding br is not supported"),
        ("gzip twice", 415, "Content-Encoding gzip, gzip is not supported"),
        ("corrupt gzip", 400, "the gzip body cannot be decoded"),
        ("truncated gzip", 400, "the gzip body is truncated"),
        ("deflate then junk", 400, "data after the end of the deflate body"),
    ],
)
def test_a_body_we_cannot_decode_stores_nothing(
    stow_gateway: GatewayProcess, corpus: Corpus, case: str, status: int, words: str
) -> None:
    """RFC 9110 15.5.16: 415 for a content coding we do not decode, with Accept-Encoding
    naming those we do (12.5.3); the header was ignored and the body stored as sent."""
    gw = stow_gateway
    body = multipart([f.read_bytes() for f in corpus.mr("stow-bad-coding", 2, seed=111)])
    coding, sent = ("gzip" if "gzip" in case else case.split()[0]), body
    if case == "gzip twice":
        coding, sent = "gzip, gzip", gzip.compress(gzip.compress(body))
    elif case == "corrupt gzip":
        sent = gzip.compress(body)
        sent = sent[:200] + bytes(b ^ 0x5A for b in sent[200:400]) + sent[400:]
    elif case == "truncated gzip":
        sent = gzip.compress(body)[:-2000]
    elif case == "deflate then junk":
        sent = zlib.compress(body) + b"junk"
    r = post(gw, sent, **{"content-encoding": coding})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert words in r.json()["error"]
    if status == 415:
        assert r.headers["accept-encoding"] == "gzip, deflate, identity"
    assert gw.index.count_instances() == 0
    assert not list((gw.data / "store").rglob("*.dcm"))
    assert not [p for p in gw.spool.iterdir() if p.stat().st_size > 0]


def zeros_gzip(prefix: bytes, zeros: int, suffix: bytes) -> Iterator[bytes]:
    """gzip of ``prefix + bytes(zeros) + suffix``, made and sent a piece at a time."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    yield deflater.compress(prefix)
    block = bytes(1 << 20)
    for _ in range(zeros >> 20):
        yield deflater.compress(block)
    yield deflater.compress(suffix) + deflater.flush()


def test_a_gzip_bomb_is_cut_off_at_the_body_limit(gateway: Gateway, corpus: Corpus) -> None:
    """About 1 MB of gzip that decodes to 1 GiB: decoded a step at a time into the spool
    file (memory stays flat) and refused with 413 once past http.limits.max_stow_bytes,
    which counts decoded bytes too; nothing is kept."""
    gw = gateway({"http": {"limits": {"max_stow_bytes": 8 * 1024 * 1024}}})
    (f,) = corpus.mr("stow-bomb", 1, seed=112)
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes()
    sent = b"".join(zeros_gzip(head, 1 << 30, f"\r\n--{BOUNDARY}--\r\n".encode()))
    assert len(sent) < 2 * 1024 * 1024
    before = psutil.Process(gw.pid).memory_info().rss
    r = post(gw, sent, **{"content-encoding": "gzip"})
    assert r.status_code == 413, r.text
    assert "max_stow_bytes" in r.json()["error"]
    grown = psutil.Process(gw.pid).memory_info().rss - before
    assert grown < 60 * 1024 * 1024, f"RSS grew by {grown / 1e6:.0f} MB"
    assert gw.index.count_instances() == 0
    assert not [p for p in gw.spool.iterdir() if p.stat().st_size > 0]
    assert post(gw, multipart([f.read_bytes()])).status_code == 200  # and it keeps serving


def test_a_large_gzip_upload_is_decoded_as_it_arrives(gateway: Gateway, tmp_path: Path) -> None:
    """A ~150 MB instance sent gzip-coded and chunked: decoded to disk in steps, the
    gateway's memory stays flat, and the data set is stored exactly."""
    gw = gateway()
    big = large_mr(tmp_path / "big.dcm", 150)
    proc = psutil.Process(gw.pid)
    before = proc.memory_info().rss

    def chunks() -> Iterator[bytes]:
        deflater = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        yield deflater.compress(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        with big.open("rb") as fh:
            while block := fh.read(1 << 20):
                yield deflater.compress(block)
        yield deflater.compress(f"\r\n--{BOUNDARY}--\r\n".encode()) + deflater.flush()

    r = httpx.post(
        gw.url("/dicomweb/studies"),
        content=chunks(),
        headers={
            "content-type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "content-encoding": "gzip",
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    grown = proc.memory_info().rss - before
    assert grown < 60 * 1024 * 1024, f"RSS grew by {grown / 1e6:.0f} MB"
    row = gw.index.instance(sop_uid_of(big))
    assert row is not None
    assert dataset_bytes(gw.stored_path(row)) == dataset_bytes(big)


def test_large_upload_is_streamed(gateway: Gateway, tmp_path: Path) -> None:
    """A ~150 MB instance goes to disk in chunks: the gateway's memory stays flat."""
    gw = gateway()
    big = large_mr(tmp_path / "big.dcm", 150)
    proc = psutil.Process(gw.pid)
    before = proc.memory_info().rss
    boundary = "big-boundary"

    def chunks() -> Iterator[bytes]:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with big.open("rb") as fh:
            while block := fh.read(1 << 20):
                yield block
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(
        gw.url("/dicomweb/studies"),
        content=chunks(),
        headers={
            "content-type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    grown = proc.memory_info().rss - before
    assert grown < 60 * 1024 * 1024, f"RSS grew by {grown / 1e6:.0f} MB"
    row = gw.index.instance(str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID))
    assert row is not None
    assert dataset_bytes(gw.stored_path(row)) == dataset_bytes(big)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_1gb_upload_streams_with_flat_memory(gateway: Gateway, tmp_path: Path) -> None:
    """A ~1 GB STOW-RS upload (chunked, one part) goes socket -> disk: the gateway's RSS,
    sampled every 50 ms while it receives, grows by less than 100 MB (DESIGN rule 2). CI
    runs the 150 MB test_large_upload_is_streamed instead."""
    from tests.corpus import make_large_instance
    from tests.integration.test_large_instance import (
        MAX_GROWTH,
        MB,
        RssSampler,
        dataset_sha256,
        rss_bytes,
    )

    source = make_large_instance(tmp_path / "large.dcm", 1024 * MB)
    gw = gateway()
    stored: Path | None = None
    boundary = "large-boundary"

    def chunks() -> Iterator[bytes]:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with source.open("rb") as fh:
            while block := fh.read(1 << 20):
                yield block
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        # Warm up: the first request loads code paths the large one must not be blamed for.
        warm = bundled_file("CT_small.dcm").read_bytes()
        assert post(gw, multipart([warm])).status_code == 200
        time.sleep(0.5)
        baseline = rss_bytes(gw.pid)
        sampler = RssSampler(gw.pid)
        sampler.start()
        try:
            started = time.monotonic()
            r = httpx.post(
                gw.url("/dicomweb/studies"),
                content=chunks(),
                headers={
                    "content-type": (
                        f'multipart/related; type="application/dicom"; boundary={boundary}'
                    )
                },
                timeout=600,
            )
            elapsed = time.monotonic() - started
        finally:
            sampler.stop()
        assert r.status_code == 200, r.text
        assert sampler.samples >= 3, "receipt too quick to sample"
        growth = sampler.peak - baseline
        assert growth < MAX_GROWTH, (
            f"RSS grew {growth / MB:.0f} MB receiving 1024 MB over STOW-RS in {elapsed:.1f} s"
        )
        uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert referenced(r.json()) == [uid]
        row = gw.index.instance(uid)
        assert row is not None and row["received_via"] == "stow"
        stored = gw.stored_path(row)
        assert row["size"] == stored.stat().st_size
        assert dataset_sha256(stored) == dataset_sha256(source)
    finally:
        source.unlink(missing_ok=True)
        if stored is not None:
            stored.unlink(missing_ok=True)  # keep pytest's retained tmp folders small


def test_a_client_gone_mid_upload_is_not_a_server_error(
    stow_gateway: GatewayProcess, corpus: Corpus
) -> None:
    """A viewer closed or a network cut mid-upload: nothing is kept, one warning line, and
    the request counts as 499 (client closed request) in the metrics, not as a 500 with an
    ASGI traceback (5xx alerts watch that counter)."""
    gw = stow_gateway
    (source,) = corpus.mr("stow-gone", 1, seed=97)
    body = multipart([source.read_bytes()])
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=10) as upload:
        upload.sendall(
            b"POST /dicomweb/studies HTTP/1.1\r\nHost: gw\r\n"
            b'Content-Type: multipart/related; type="application/dicom"; '
            b"boundary=dicomgate-test-boundary\r\n"
            + f"Content-Length: {len(body) * 4}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        wait_until(lambda: any(gw.spool.iterdir()), 10, "the upload's spool file")
    wait_until(lambda: gw.log_count("stow.client_gone") == 1, 10, "the client_gone line")
    assert "Exception in ASGI application" not in gw.log_text()
    metrics = httpx.get(gw.url("/metrics"), timeout=10).text
    assert 'route="/dicomweb/studies",status="499"} 1.0' in metrics
    assert 'route="/dicomweb/studies",status="500"' not in metrics
    assert gw.index.count_instances() == 0
    assert post(gw, body).status_code == 200  # and it keeps serving


@pytest.mark.parametrize(
    ("uid", "stored"),
    [("1.2.826.0.1.3680043.9.7777/1", False), ("1.2.826.0.1.3680043.9.7777.1a", True)],
)
def test_a_uid_no_url_can_name_is_refused(
    stow_gateway: GatewayProcess, corpus: Corpus, uid: str, stored: bool
) -> None:
    """A Study Instance UID with a '/' was stored, listed by QIDO-RS with a RetrieveURL
    that WADO-RS answered 404: an image no one could retrieve. It now fails with 0xC000.
    A UID with another slip (a letter) is stored as received (a gateway does not repair)."""
    gw = stow_gateway
    ds = pydicom.dcmread(corpus.mr(f"stow-uid-{stored}", 1, seed=98)[0])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: "Invalid value for VR UI", the point here
        ds.StudyInstanceUID = uid
        ds.save_as(buffer, enforce_file_format=True)
    r = post(gw, multipart([buffer.getvalue()]))
    if stored:
        assert r.status_code == 200, r.text
        assert gw.index.count_instances() == 1
    else:
        assert r.status_code == 409, r.text
        assert failed_reasons(r.json()) == {str(ds.SOPInstanceUID): 0xC000}
        assert gw.index.count_instances() == 0
        assert "StudyInstanceUID holds a character no UID may" in gw.log_text()
