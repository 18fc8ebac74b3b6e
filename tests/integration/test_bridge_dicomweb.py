"""DICOMweb in, DIMSE upstream: QIDO-RS / WADO-RS on dicomgate answered by Orthanc over DIMSE.

Orthanc (Debian's, with its DICOMweb plugin) holds the corpus (REST upload). The gateway's
``query.dicomweb.source`` names Orthanc as a ``dimse`` destination, so every search becomes a
C-FIND and every retrieve a C-GET. ``dicomweb-client`` through dicomgate must get what it
gets from Orthanc's own DICOMweb plugin; metadata then frames of one instance retrieve once;
an upstream that is down or silent is a 502 / 504 JSON answer and the gateway keeps serving.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from tests.conftest import (
    AE_TITLE,
    Corpus,
    GatewayProcess,
    OrthancProcess,
    free_port,
    launch_orthanc,
)

UID = {"study": "0020000D", "series": "0020000E", "sop": "00080018"}
# Never compared: RetrieveURL (each server's own URL), SpecificCharacterSet (Orthanc echoes
# the file's, we answer UTF-8 JSON), RetrieveAETitle / InstanceAvailability (Orthanc's
# DICOMweb plugin and its C-FIND SCP fill them differently).
NOT_COMPARED = {"00081190", "00080005", "00080054", "00080056"}


@dataclass
class Pacs(OrthancProcess):
    """Orthanc with its DICOM server (C-FIND / C-GET open to our AE) and DICOMweb."""

    def rest(self, path: str, data: bytes | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def upload(self, files: list[Path]) -> None:
        for path in files:
            self.rest("/instances", path.read_bytes())

    def dicomweb(self) -> DICOMwebClient:
        return DICOMwebClient(url=f"http://127.0.0.1:{self.http_port}/dicom-web")


@pytest.fixture
def gw_dimse_port() -> int:
    """The gateway's DIMSE port, known to Orthanc (C-MOVE destination)."""
    return free_port()


@pytest.fixture
def pacs(tmp_path: Path, gw_dimse_port: int) -> Iterator[Pacs]:
    launched = launch_orthanc(
        tmp_path,
        {
            "DicomAet": "ORTHANC",
            "DicomServerEnabled": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomModalities": {
                "dicomgate": {
                    "AET": AE_TITLE,
                    "Host": "127.0.0.1",
                    "Port": gw_dimse_port,
                    "AllowFind": True,
                    "AllowGet": True,
                }
            },
        },
        ("--verbose",),
    )
    server = Pacs(launched.http_port, launched.dicom_port, launched.proc, launched.log)
    try:
        yield server
    finally:
        server.stop()


def bridged(
    gateway: Callable[..., GatewayProcess], port: int, dimse_port: int = 0, **query: Any
) -> GatewayProcess:
    return gateway(
        {
            **({"dimse": {"port": dimse_port}} if dimse_port else {}),
            "destinations": {
                "pacs": {"type": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port}
            },
            "query": {"dicomweb": {"source": "pacs", "timeout": 5, **query}},
        }
    )


@pytest.fixture
def loaded(corpus: Corpus, pacs: Pacs) -> tuple[list[Path], list[Path]]:
    mr = corpus.mr("bridge-mr", 3, seed=5101)
    ct = corpus.ct("bridge-ct", 2, seed=5102)
    pacs.upload(mr + ct)
    return mr, ct


def _uid(item: dict[str, Any], tag: str) -> str:
    return str(item[tag]["Value"][0])


def _by_uid(items: list[dict[str, Any]], tag: str) -> dict[str, dict[str, Any]]:
    return {_uid(item, tag): item for item in items}


def _assert_same(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], tag: str) -> None:
    mine, other = _by_uid(ours, tag), _by_uid(theirs, tag)
    assert sorted(mine) == sorted(other)
    compared = 0
    for uid, item in mine.items():
        for key in (set(item) & set(other[uid])) - NOT_COMPARED:
            assert item[key].get("Value") == other[uid][key].get("Value"), (key, uid)
            compared += 1
    assert compared >= len(mine) * 3  # the answers carry real attributes, not only UIDs


def test_searches_through_the_bridge_equal_orthanc_dicomweb(
    gateway: Callable[..., GatewayProcess], pacs: Pacs, loaded: tuple[list[Path], list[Path]]
) -> None:
    mr, _ = loaded
    gw = bridged(gateway, pacs.dicom_port)
    ours, theirs = DICOMwebClient(url=gw.url("/dicomweb")), pacs.dicomweb()

    studies = ours.search_for_studies()
    assert len(studies) == 2
    _assert_same(studies, theirs.search_for_studies(), UID["study"])
    mr_ds = pydicom.dcmread(mr[0], stop_before_pixels=True)
    study, series = str(mr_ds.StudyInstanceUID), str(mr_ds.SeriesInstanceUID)
    for search in (
        {"search_filters": {"PatientID": str(mr_ds.PatientID)}},
        {"search_filters": {"StudyInstanceUID": study}},
    ):
        found = ours.search_for_studies(**search)
        assert [_uid(s, UID["study"]) for s in found] == [study]
        _assert_same(found, theirs.search_for_studies(**search), UID["study"])
    _assert_same(ours.search_for_series(), theirs.search_for_series(), UID["series"])
    _assert_same(
        ours.search_for_series(study_instance_uid=study, search_filters={"Modality": "MR"}),
        theirs.search_for_series(study_instance_uid=study, search_filters={"Modality": "MR"}),
        UID["series"],
    )
    instances = ours.search_for_instances(study, series)
    assert len(instances) == 3
    _assert_same(instances, theirs.search_for_instances(study, series), UID["sop"])
    # The RetrieveURL points at us; limit/offset are applied on our side.
    url = instances[0]["00081190"]["Value"][0]
    assert url.startswith(gw.url("/dicomweb/studies/"))
    page = ours.search_for_instances(study, series, limit=2, offset=1)
    assert len(page) == 2
    assert ours.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
    # C-FIND has no Empty Value Matching: answered without it, with the standard's warning.
    bridged_empty = httpx.get(
        gw.url("/dicomweb/studies"),
        params={"PatientID": str(mr_ds.PatientID), "emptyvaluematching": "true"},
        timeout=30,
    )
    assert bridged_empty.status_code == 200, bridged_empty.text
    assert [_uid(s, UID["study"]) for s in bridged_empty.json()] == [study]
    assert "Empty Value Matching has not been performed" in bridged_empty.headers["warning"]


def test_retrieve_series_gives_orthanc_pixels_and_metadata_then_frames_fetch_once(
    gateway: Callable[..., GatewayProcess], pacs: Pacs, loaded: tuple[list[Path], list[Path]]
) -> None:
    mr, ct = loaded
    gw = bridged(gateway, pacs.dicom_port)
    client = DICOMwebClient(url=gw.url("/dicomweb"))
    ct_ds = pydicom.dcmread(ct[0], stop_before_pixels=True)
    got = client.retrieve_series(str(ct_ds.StudyInstanceUID), str(ct_ds.SeriesInstanceUID))
    assert len(got) == 2
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in ct}
    for ds in got:
        original = originals[str(ds.SOPInstanceUID)]
        assert np.array_equal(ds.pixel_array, original.pixel_array)
        assert ds.PatientID == original.PatientID
    gw.wait_log("bridge.retrieved")
    assert gw.log_count("bridge.retrieved") == 1

    # A viewer: metadata, then frames, then rendered, of one instance -> one C-GET.
    mr_ds = pydicom.dcmread(mr[1])
    uids = (str(mr_ds.StudyInstanceUID), str(mr_ds.SeriesInstanceUID), str(mr_ds.SOPInstanceUID))
    metadata = client.retrieve_instance_metadata(*uids)
    assert metadata["00080018"]["Value"] == [uids[2]]
    assert "BulkDataURI" in metadata["7FE00010"]
    frames = client.retrieve_instance_frames(*uids, frame_numbers=[1])
    expected = mr_ds.pixel_array.astype("<u2").tobytes()
    assert frames == [expected]
    status, _ = gw.http_get(
        f"/dicomweb/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/metadata"
    )
    assert status == 200
    assert gw.log_count("bridge.retrieved") == 2  # the CT series, then this instance once
    # The rest of the MR series is also one C-GET, answered from the study's ...
    series_meta = client.retrieve_series_metadata(uids[0], uids[1])
    assert sorted(m["00080018"]["Value"][0] for m in series_meta) == sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in mr
    )
    assert gw.log_count("bridge.retrieved") == 3
    # ... and a later instance of that series comes from the series entry: no new C-GET.
    first = pydicom.dcmread(mr[0], stop_before_pixels=True)
    client.retrieve_instance_metadata(uids[0], uids[1], str(first.SOPInstanceUID))
    assert gw.log_count("bridge.retrieved") == 3
    status, body = gw.http_get(f"/dicomweb/studies/{uids[0]}/series/1.2.3.4/metadata")
    assert status == 404, body
    assert "error" in body


def test_upstream_down_is_502_and_the_gateway_keeps_serving(
    gateway: Callable[..., GatewayProcess], pacs: Pacs, loaded: tuple[list[Path], list[Path]]
) -> None:
    mr, ct = loaded
    gw = bridged(gateway, pacs.dicom_port)
    ds = pydicom.dcmread(mr[0], stop_before_pixels=True)
    study = str(ds.StudyInstanceUID)
    status, body = gw.http_get(f"/dicomweb/studies/{study}/metadata")
    assert status == 200 and len(body) == 3
    pacs.stop()
    other = pydicom.dcmread(ct[0], stop_before_pixels=True)  # not in the cache
    for path in (
        "/dicomweb/studies",
        f"/dicomweb/studies/{other.StudyInstanceUID}/series/{other.SeriesInstanceUID}",
        f"/dicomweb/studies/{other.StudyInstanceUID}/metadata",
    ):
        status, body = gw.http_get(path, timeout=10)
        assert status == 502, (path, body)
        assert "connection refused" in body["error"]
    gw.wait_log("bridge.upstream_failed", count=3)
    # Still serving: health, and what the cache holds (the study fetched before), also a
    # series of it (answered from the study's entry).
    assert gw.http_get("/healthz")[0] == 200
    status, body = gw.http_get(f"/dicomweb/studies/{study}/metadata")
    assert status == 200 and len(body) == 3
    status, body = gw.http_get(f"/dicomweb/studies/{study}/series/{ds.SeriesInstanceUID}/metadata")
    assert status == 200 and len(body) == 3


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A TCP port that accepts connections and never says anything."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_silent_upstream_is_504_after_the_timeout(
    gateway: Callable[..., GatewayProcess], silent_peer: int
) -> None:
    gw = bridged(gateway, silent_peer, timeout=1)
    started = time.monotonic()
    status, body = gw.http_get("/dicomweb/studies", timeout=10)
    assert status == 504, body
    assert "error" in body
    assert time.monotonic() - started < 5
    status, body = gw.http_get("/dicomweb/studies/1.2.3/metadata", timeout=10)
    assert status == 504, body
    gw.wait_log("bridge.upstream_failed", count=2)
    assert gw.http_get("/healthz")[0] == 200


def test_bad_query_is_400_without_asking_the_upstream(
    gateway: Callable[..., GatewayProcess], silent_peer: int
) -> None:
    gw = bridged(gateway, silent_peer, timeout=1)
    for path in ("/dicomweb/studies?limit=x", "/dicomweb/studies?NoSuchKeyword=1"):
        status, body = gw.http_get(path)
        assert status == 400 and "error" in body, (path, body)
    assert gw.log_count("bridge.upstream_failed") == 0
    try:
        # a space: no stored UID holds one (a letter is a key, test_uid_slips.py)
        urllib.request.urlopen(gw.url("/dicomweb/studies/1.2%203/series"), timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 400
        exc.close()
    else:
        pytest.fail("a bad UID in the path was accepted")


def test_retrieve_move_ingests_into_our_store_then_serves_it(
    gateway: Callable[..., GatewayProcess],
    pacs: Pacs,
    gw_dimse_port: int,
    loaded: tuple[list[Path], list[Path]],
) -> None:
    """``retrieve: move``: C-MOVE to our own AE; the instances are ingested (stored, indexed,
    routed like any C-STORE) and served from the store; a second request moves nothing."""
    mr, _ = loaded
    gw = bridged(gateway, pacs.dicom_port, gw_dimse_port, retrieve="move")
    client = DICOMwebClient(url=gw.url("/dicomweb"))
    ds = pydicom.dcmread(mr[0], stop_before_pixels=True)
    got = client.retrieve_series(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in mr}
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(originals)
    for item in got:
        assert np.array_equal(item.pixel_array, originals[str(item.SOPInstanceUID)].pixel_array)
    assert gw.log_count("bridge.retrieved") == 1
    client.retrieve_series_metadata(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    assert gw.log_count("bridge.retrieved") == 1  # all local now: no second C-MOVE


def test_retrieve_move_streams_before_the_move_ends(
    gateway: Callable[..., GatewayProcess], corpus: Corpus, tmp_path: Path
) -> None:
    """``retrieve: move``: WADO-RS sends each instance once it is stored, while the PACS is
    still sending the rest (its C-STOREs cross a ~1.3 MB/s link: 8 CT, ~4 MB, ~3 s), not
    after the final C-MOVE response."""
    from tests.integration.test_bridge_dimse import SlowLink

    files = corpus.ct("bridge-stream", 8, seed=5401)  # ~514 KB each
    gw_port = free_port()
    link = SlowLink(gw_port, rate=1_300_000, slow_replies=False)  # Orthanc -> gateway
    launched = launch_orthanc(
        tmp_path / "orthanc",
        {
            "DicomAet": "ORTHANC",
            "DicomServerEnabled": True,
            "DicomAlwaysAllowFind": True,
            "DicomModalities": {
                "dicomgate": {"AET": AE_TITLE, "Host": "127.0.0.1", "Port": link.port}
            },
        },
    )
    pacs = Pacs(launched.http_port, launched.dicom_port, launched.proc, launched.log)
    try:
        pacs.upload(files)
        gw = bridged(gateway, pacs.dicom_port, gw_port, retrieve="move", timeout=20)
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        request = urllib.request.Request(
            gw.url(f"/dicomweb/studies/{study}"),
            headers={"Accept": 'multipart/related; type="application/dicom"'},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            head = response.read(65536)
            first_bytes = time.time()
            body = head + response.read()
        assert body.count(b"Content-Type: application/dicom") == len(files)
        # The first instance reached the client well before the last C-STORE's data had
        # crossed the link, so before the PACS could send its final C-MOVE response.
        assert link.last_byte - first_bytes > 1.0, (first_bytes, link.last_byte)
        gw.wait_log("bridge.retrieved")
        assert gw.index.count_instances() == len(files)  # ingested, as before
    finally:
        link.close()
        pacs.stop()
