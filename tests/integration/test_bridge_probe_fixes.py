"""Defects an outside probe of the DIMSE <-> DICOMweb bridge found, each against real peers:
Orthanc (DIMSE and DICOMweb), DCMTK movescu / findscu / storescp, pynetdicom scripted PACS
and a scripted DICOMweb server where a behaviour of a real one cannot be provoked."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from tests.conftest import GatewayProcess, free_port, needs_dcmtk
from tests.integration.test_bridge_dimse import post_instance, qr_tool, start_orthanc
from tests.integration.test_qr_scp import StoreSCP

pytestmark = [pytest.mark.timeout(240), needs_dcmtk]


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None
    return Path(str(path))


def _pacs(port: int) -> dict[str, Any]:
    return {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": port}


# -- 1, 2: forward C-MOVE of a JPEG 2000 instance; CLOUD C-MOVE of rtplan ------------------


@pytest.fixture(scope="module")
def orthanc_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, StoreSCP]]:
    root = tmp_path_factory.mktemp("probe-fixes")
    scp = StoreSCP(root / "scp", "ARCHIVE")
    orthanc = start_orthanc(root / "orthanc", {})
    try:
        for name in ("MR_small_jp2klossless.dcm", "rtplan.dcm"):
            post_instance(orthanc, _testdata(name))
        yield orthanc, scp
    finally:
        orthanc.stop()
        scp.stop()


def _orthanc_gateway(
    gateway: Callable[..., GatewayProcess], orthanc: Any, scp: StoreSCP
) -> GatewayProcess:
    return gateway(
        {
            "dimse": {"move_destinations": {"ARCHIVE": {"host": "127.0.0.1", "port": scp.port}}},
            "destinations": {
                "cloud": {
                    "type": "dicomweb",
                    "url": f"http://127.0.0.1:{orthanc.http_port}/dicom-web",
                },
                "orthanc": {
                    "type": "dimse",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                },
            },
            "query": {
                "ae_titles": {
                    "CLOUD": {"source": "cloud", "timeout": 10},
                    "FWD": {"source": "orthanc", "move": "forward", "timeout": 10},
                }
            },
        }
    )


def test_forward_move_delivers_a_jpeg2000_instance(
    gateway: Callable[..., GatewayProcess], orthanc_site: tuple[Any, StoreSCP]
) -> None:
    """``move: forward``: Orthanc (no JPEG 2000 decoder) can send a JPEG 2000 instance only
    as it is stored; the gateway offers that syntax in its C-GET and transcodes for
    storescp, which accepts only uncompressed ones."""
    orthanc, scp = orthanc_site
    scp.clear()
    original = pydicom.dcmread(_testdata("MR_small_jp2klossless.dcm"))
    gw = _orthanc_gateway(gateway, orthanc, scp)
    keys: dict[str, str | None] = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": str(original.StudyInstanceUID),
    }
    moved = qr_tool("movescu", "FWD", gw.dimse_port, keys, "-aem", "ARCHIVE", out=None)
    assert moved.final == 0x0000, moved.output[-3000:]
    received = scp.files()
    assert list(received) == [str(original.SOPInstanceUID)]
    got = pydicom.dcmread(received[str(original.SOPInstanceUID)])
    assert (got.pixel_array == original.pixel_array).all()


def test_cloud_move_names_the_data_sets_sop_instance_uid(
    gateway: Callable[..., GatewayProcess], orthanc_site: tuple[Any, StoreSCP]
) -> None:
    """rtplan.dcm's file meta names another SOP Instance UID than its data set: the C-STORE
    to storescp names the data set's (PS3.7 9.3.1.1), so storescp takes it."""
    orthanc, scp = orthanc_site
    scp.clear()
    original = pydicom.dcmread(_testdata("rtplan.dcm"))
    assert original.file_meta.MediaStorageSOPInstanceUID != original.SOPInstanceUID
    gw = _orthanc_gateway(gateway, orthanc, scp)
    keys: dict[str, str | None] = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": str(original.StudyInstanceUID),
    }
    moved = qr_tool("movescu", "CLOUD", gw.dimse_port, keys, "-aem", "ARCHIVE", out=None)
    assert moved.final == 0x0000, moved.output[-3000:]
    assert list(scp.files()) == [str(original.SOPInstanceUID)]


# -- 3: a DICOMweb upstream that caps its pages -------------------------------------------


class _CappingQido(BaseHTTPRequestHandler):
    """QIDO-RS with 12 studies, 5 a page at most whatever ``limit`` asks, and the
    PS3.18 8.3.4.4 Warning while more exist."""

    protocol_version = "HTTP/1.1"
    total, cap = 12, 5

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)
        offset = int(query.get("offset", ["0"])[0])
        limit = int(query.get("limit", ["100"])[0])
        items = [
            {
                "0020000D": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.8.498.77.{i}"]},
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": f"Capped^{i}"}]},
            }
            for i in range(self.total)
        ]
        page = items[offset : offset + min(limit, self.cap)]
        body = json.dumps(page).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        if offset + len(page) < self.total:
            self.send_header(
                "Warning",
                '299 capped "The number of results exceeded the maximum supported by the'
                ' server. Additional results can be requested."',
            )
        self.end_headers()
        self.wfile.write(body)


def test_find_through_a_capping_dicomweb_upstream_reads_every_page(
    gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CappingQido)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dw"
        gw = gateway(
            {
                "destinations": {"capped": {"type": "dicomweb", "url": url}},
                "query": {"ae_titles": {"CAPPED": {"source": "capped", "timeout": 5}}},
            }
        )
        keys: dict[str, str | None] = {
            "QueryRetrieveLevel": "STUDY",
            "StudyInstanceUID": None,
            "PatientName": None,
        }
        found = qr_tool("findscu", "CAPPED", gw.dimse_port, keys, out=tmp_path / "f")
        assert found.final == 0x0000, found.output[-3000:]
        uids = {str(ds.StudyInstanceUID) for ds in found.responses}
        assert len(uids) == 12
    finally:
        server.shutdown()
        server.server_close()


# -- scripted DIMSE PACS (pynetdicom) --------------------------------------------------------


class ScriptedPacs:
    """A pynetdicom PACS answering C-FIND with ``matches`` matches and C-GET with ``count``
    copies of MR_small, ``delay`` s apart; it records cancels, releases and aborts."""

    def __init__(self, matches: int = 50, count: int = 0, delay: float = 0.05) -> None:
        self.matches, self.count, self.delay = matches, count, delay
        self.found_sent = 0
        self.cancelled: list[str] = []
        self.released = 0
        self.aborted = 0
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        for context in StoragePresentationContexts[:100]:
            ae.add_supported_context(str(context.abstract_syntax), scu_role=True, scp_role=True)
        self.ae = ae
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_FIND, self._find),
                (evt.EVT_C_GET, self._get),
                (evt.EVT_RELEASED, self._on_released),
                (evt.EVT_ABORTED, self._on_aborted),
            ],
        )
        assert server is not None
        self.server = server

    def _on_released(self, event: evt.Event) -> None:
        self.released += 1

    def _on_aborted(self, event: evt.Event) -> None:
        self.aborted += 1

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        level = str(event.identifier.QueryRetrieveLevel)
        total = self.count if level == "IMAGE" and self.count else self.matches
        for i in range(total):
            if event.is_cancelled:
                self.cancelled.append("find")
                yield 0xFE00, None
                return
            ds = Dataset()
            ds.QueryRetrieveLevel = level
            ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.88.{i}"
            if level == "IMAGE":
                ds.SOPClassUID = MRImageStorage
            self.found_sent += 1
            yield 0xFF00, ds
            time.sleep(self.delay)
        yield 0x0000, None

    def _get(self, event: evt.Event) -> Iterator[Any]:
        yield self.count
        base = pydicom.dcmread(_testdata("MR_small.dcm"))
        uid = str(base.SOPInstanceUID)
        for i in range(self.count):
            if event.is_cancelled:
                self.cancelled.append("get")
                yield 0xFE00, None
                return
            ds = base.copy()
            ds.SOPInstanceUID = f"{uid}.{i + 1}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            time.sleep(self.delay)
            yield 0xFF00, ds

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedPacs]]:
    started: list[ScriptedPacs] = []

    def start(**kwargs: Any) -> ScriptedPacs:
        pacs = ScriptedPacs(**kwargs)
        started.append(pacs)
        return pacs

    yield start
    for pacs in started:
        pacs.stop()


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- 4: a QIDO-RS limit stops the PACS -------------------------------------------------------


def test_qido_limit_cancels_the_upstream_find(
    gateway: Callable[..., GatewayProcess], scripted: Callable[..., ScriptedPacs]
) -> None:
    """limit=3 of 50 matches: the PACS gets a C-CANCEL-RQ once 4 are in (one to know more
    exist) and the association is released; not all 50 are read."""
    pacs = scripted(matches=50, delay=0.05)
    gw = gateway(
        {
            "destinations": {"pacs": _pacs(pacs.port)},
            "query": {"dicomweb": {"source": "pacs", "timeout": 10}},
        }
    )
    with urllib.request.urlopen(gw.url("/dicomweb/studies?limit=3"), timeout=20) as resp:
        body = json.loads(resp.read())
    assert len(body) == 3
    assert _wait(lambda: pacs.released >= 1), (pacs.released, pacs.aborted)
    assert pacs.cancelled == ["find"]
    assert pacs.found_sent < 50
    assert pacs.aborted == 0


# -- 5: malformed QIDO-RS queries are refused before going upstream -----------------------


@pytest.mark.parametrize(
    "query",
    [
        "StudyDate=2023x",
        "StudyDate=20231231-20230101",
        "PatientBirthDate=abc",
        # A space: no UID holds one. A letter is a tolerated slip (test_uid_slips.py),
        # which the local search matches too, so 1.2.abc is not refused.
        "StudyInstanceUID=1.2%203",
    ],
)
def test_malformed_bridged_qido_is_400_before_the_upstream(
    gateway: Callable[..., GatewayProcess], scripted: Callable[..., ScriptedPacs], query: str
) -> None:
    pacs = scripted(matches=1, delay=0)
    gw = gateway(
        {
            "destinations": {"pacs": _pacs(pacs.port)},
            "query": {"dicomweb": {"source": "pacs", "timeout": 5}},
        }
    )
    status, body = gw.http_get(f"/dicomweb/studies?{query}", timeout=10)
    assert status == 400 and "error" in body, (query, status, body)
    assert pacs.found_sent == 0 and pacs.released == 0
    ok, _ = gw.http_get("/dicomweb/studies", timeout=10)
    assert ok == 200


# -- 6: cancelling a forward C-MOVE cancels the PACS's C-GET ---------------------------------


def test_cancelled_forward_move_sends_the_pacs_a_cancel_and_releases(
    gateway: Callable[..., GatewayProcess], scripted: Callable[..., ScriptedPacs], tmp_path: Path
) -> None:
    pacs = scripted(matches=1, count=40, delay=0.1)
    scp = StoreSCP(tmp_path / "scp", "ARCHIVE")
    try:
        gw = gateway(
            {
                "dimse": {
                    "move_destinations": {"ARCHIVE": {"host": "127.0.0.1", "port": scp.port}}
                },
                "destinations": {"pacs": _pacs(pacs.port)},
                "query": {
                    "ae_titles": {"FWD": {"source": "pacs", "move": "forward", "timeout": 10}}
                },
            }
        )
        keys: dict[str, str | None] = {
            "QueryRetrieveLevel": "STUDY",
            "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.88.0",
        }
        released = pacs.released
        moved = qr_tool(
            "movescu", "FWD", gw.dimse_port, keys, "-aem", "ARCHIVE", "--cancel", "1", out=None
        )
        assert moved.final == 0xFE00, moved.output[-3000:]
        assert _wait(lambda: "get" in pacs.cancelled), pacs.cancelled
        assert _wait(lambda: pacs.released > released), (pacs.released, pacs.aborted)
        assert pacs.aborted == 0
        assert len(scp.files()) < 40
    finally:
        scp.stop()
