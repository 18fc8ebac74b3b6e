"""Protocol bridging for DIMSE clients (issue #5): C-FIND / C-MOVE / C-GET to a virtual AE
title of the gateway answered by an upstream, with Orthanc as that upstream.

* ``CLOUD``: Orthanc's DICOMweb (QIDO-RS / WADO-RS);
* ``PROXY``: Orthanc's DIMSE port (C-FIND / C-MOVE relayed);
* ``DEAD``, ``HANG``, ``BADURL``: upstreams that refuse connections, never answer, or
  answer 404: the request fails with the right status and the gateway keeps serving.

Answers through the gateway are compared with the answers ``findscu`` gets from Orthanc's
own DIMSE port for the same query.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.multival import MultiValue
from tests.conftest import (
    AE_TITLE,
    DICOMWEB_PLUGIN,
    ORTHANC,
    Corpus,
    GatewayProcess,
    OrthancProcess,
    dcmtk_env,
    free_port,
    launch_orthanc,
    needs_dcmtk,
)
from tests.integration.test_qr_scp import (
    ALL_INSTANCES,
    UID_ROOT,
    Answer,
    StoreSCP,
    _keys,
    write_corpus,
)

pytestmark = [pytest.mark.timeout(240), needs_dcmtk]

STUDY_ROOT = "-S"
ORTHANC_AET = "ORTHANC"


Upstream = OrthancProcess


def start_orthanc(root: Path, modalities: dict[str, list[Any]]) -> Upstream:
    """Orthanc with DICOMweb and a DICOM port, knowing ``modalities`` (C-MOVE targets);
    ``--trace-dicom`` logs each incoming DIMSE message (its SOP class among them)."""
    return launch_orthanc(
        root,
        {
            "Name": "dicomgate-bridge-test",
            "DicomAet": ORTHANC_AET,
            "DicomServerEnabled": True,
            "DicomModalities": modalities,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomCheckModalityHost": False,
        },
        ("--verbose", "--trace-dicom"),
    )


def post_instance(upstream: Upstream, path: Path) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{upstream.http_port}/instances", data=path.read_bytes(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def qr_tool(
    tool: str,
    aec: str,
    port: int,
    keys: dict[str, str | None],
    *extra: str,
    out: Path | None,
    model: str = STUDY_ROOT,
) -> Answer:
    args = [tool, "-d", "-to", "20", model, "-aet", "QRSCU", "-aec", aec]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            old.unlink()
        args += ["-od", str(out)] + (["-X"] if tool == "findscu" else [])
    proc = subprocess.run(
        [*args, *extra, *_keys(keys), "127.0.0.1", str(port)],  # type: ignore[arg-type]
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=90,
        check=False,
    )
    responses = []
    if tool == "findscu" and out is not None:
        responses = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return Answer(proc.returncode, proc.stdout, responses)


@dataclass
class Site:
    gw: GatewayProcess
    orthanc: Upstream
    scp: StoreSCP
    files: dict[str, Path]  # SOP Instance UID -> the file loaded into Orthanc
    hang: socket.socket
    root: Path

    def find(
        self, aec: str, keys: dict[str, str | None], name: str, model: str = STUDY_ROOT
    ) -> Answer:
        port = self.orthanc.dicom_port if aec == ORTHANC_AET else self.gw.dimse_port
        out = self.root / "find" / f"{name}-{aec}{model}"
        return qr_tool("findscu", aec, port, keys, out=out, model=model)

    def orthanc_log_mark(self) -> int:
        return len(self.orthanc.log.read_bytes())

    def orthanc_log_since(self, mark: int) -> str:
        return self.orthanc.log.read_bytes()[mark:].decode(errors="replace")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        pytest.skip("needs orthanc and orthanc-dicomweb")
    root = tmp_path_factory.mktemp("bridge")
    paths = write_corpus(root / "corpus")
    scp = StoreSCP(root / "scp", "ARCHIVE")
    orthanc = start_orthanc(root / "orthanc", {"archive": ["ARCHIVE", "127.0.0.1", scp.port]})
    hang = socket.socket()  # accepts connections (backlog), never answers
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)
    data = root / "gw" / "data"
    (root / "gw").mkdir()
    web = f"http://127.0.0.1:{orthanc.http_port}"
    gw = GatewayProcess(
        root=root / "gw",
        config={
            "storage": {"path": str(data)},
            "database": {"url": f"sqlite:///{data}/index.db"},
            "dimse": {
                "ae_title": AE_TITLE,
                "host": "127.0.0.1",
                "port": free_port(),
                "check_called_ae": True,
                # Known to the gateway only, not to Orthanc (the same storescp).
                "move_destinations": {"HIDDEN": {"host": "127.0.0.1", "port": scp.port}},
            },
            "http": {"host": "127.0.0.1", "port": free_port()},
            "destinations": {
                "cloud": {"type": "dicomweb", "url": f"{web}/dicom-web"},
                "badurl": {"type": "dicomweb", "url": f"{web}/no-such-root"},
                "dead": {"type": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/dicom-web"},
                "hang": {
                    "type": "dicomweb",
                    "url": f"http://127.0.0.1:{hang.getsockname()[1]}/dicom-web",
                },
                "orthanc_dimse": {
                    "type": "dimse",
                    "ae_title": ORTHANC_AET,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                },
                "archive": {
                    "type": "dimse",
                    "ae_title": "ARCHIVE",
                    "host": "127.0.0.1",
                    "port": scp.port,
                },
                "pacs_down": {
                    "type": "dimse",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": free_port(),  # nothing listens there
                },
            },
            "query": {
                "ae_titles": {
                    "CLOUD": {"source": "cloud", "timeout": 10},
                    "PROXY": {"source": "orthanc_dimse", "timeout": 10},
                    "DEAD": {"source": "dead", "timeout": 2},
                    "HANG": {"source": "hang", "timeout": 1},
                    "BADURL": {"source": "badurl", "timeout": 5},
                    "PACSDOWN": {"source": "pacs_down", "timeout": 5},
                    # The requestor's VIEWER is the PACS's ARCHIVE.
                    "MAPPED": {
                        "source": "orthanc_dimse",
                        "timeout": 10,
                        "move_destination_map": {"VIEWER": "ARCHIVE"},
                    },
                    # C-GET from the PACS, C-STORE to our own move destinations.
                    "FORWARD": {"source": "orthanc_dimse", "timeout": 10, "move": "forward"},
                }
            },
        },
    )
    try:
        for path in paths:
            post_instance(orthanc, path)
        gw.start()
        yield Site(gw, orthanc, scp, {p.stem: p for p in paths}, hang, root)
    finally:
        gw.close_index()
        if gw.proc is not None:
            gw.terminate()
        orthanc.stop()
        scp.stop()
        hang.close()


def _rows(answer: Answer, keys: dict[str, str | None], unique: str) -> dict[str, dict[str, Any]]:
    assert answer.final == 0x0000, answer.output[-3000:]
    rows: dict[str, dict[str, Any]] = {}
    for ds in answer.responses:
        row: dict[str, Any] = {}
        for keyword in keys:
            value = ds.get(keyword, "")
            if keyword == "ModalitiesInStudy":  # an unordered set
                value = sorted(value) if isinstance(value, MultiValue) else [value]
            row[keyword] = [str(v) for v in value] if isinstance(value, list) else str(value)
        rows[str(ds[unique].value)] = row
    return rows


STUDY_KEYS: dict[str, str | None] = {
    "QueryRetrieveLevel": "STUDY",
    "StudyInstanceUID": None,
    "PatientName": None,
    "PatientID": None,
    "StudyDate": None,
    "StudyTime": None,
    "AccessionNumber": None,
    "StudyDescription": None,
    "ModalitiesInStudy": None,
    "NumberOfStudyRelatedInstances": None,
}

QUERIES: list[tuple[str, dict[str, str | None], str]] = [
    ("all-studies", STUDY_KEYS, "StudyInstanceUID"),
    ("date-range", {**STUDY_KEYS, "StudyDate": "20230101-20231231"}, "StudyInstanceUID"),
    ("modality", {**STUDY_KEYS, "ModalitiesInStudy": "MR"}, "StudyInstanceUID"),
    ("name-wildcard", {**STUDY_KEYS, "PatientName": "DOE*"}, "StudyInstanceUID"),
    (
        "series",
        {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": UID_ROOT + "1",
            "SeriesInstanceUID": None,
            "Modality": None,
            "SeriesNumber": None,
            "NumberOfSeriesRelatedInstances": None,
        },
        "SeriesInstanceUID",
    ),
    (
        "images",
        {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": UID_ROOT + "1",
            "SeriesInstanceUID": UID_ROOT + "1.1",
            "SOPInstanceUID": None,
            "SOPClassUID": None,
            "InstanceNumber": None,
        },
        "SOPInstanceUID",
    ),
]


@pytest.mark.parametrize("aec", ["CLOUD", "PROXY"])
@pytest.mark.parametrize(("name", "keys", "unique"), QUERIES, ids=[q[0] for q in QUERIES])
def test_find_through_bridge_equals_orthanc_direct(
    site: Site, aec: str, name: str, keys: dict[str, str | None], unique: str
) -> None:
    direct = _rows(site.find(ORTHANC_AET, keys, name), keys, unique)
    bridged = _rows(site.find(aec, keys, name), keys, unique)
    assert direct, "the query matches something in Orthanc"
    assert bridged == direct


def test_find_answers_exactly_the_keys_asked(site: Site) -> None:
    keys: dict[str, str | None] = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": UID_ROOT + "2",
        "PatientID": None,
    }
    answer = site.find("CLOUD", keys, "exact")
    assert answer.final == 0x0000, answer.output[-2000:]
    (ds,) = answer.responses
    assert {e.keyword for e in ds} == {"QueryRetrieveLevel", "StudyInstanceUID", "PatientID"}
    assert ds.PatientID == "P2"


def _same_pixels(received: Path, original: Path) -> None:
    got, want = pydicom.dcmread(received), pydicom.dcmread(original)
    assert got.SOPInstanceUID == want.SOPInstanceUID
    assert got.PixelData == want.PixelData
    assert got.PatientName == want.PatientName


@pytest.mark.parametrize("aec", ["CLOUD", "PROXY"])
def test_move_study_to_storescp(site: Site, aec: str) -> None:
    site.scp.clear()
    keys: dict[str, str | None] = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": UID_ROOT + "1",
    }
    answer = qr_tool("movescu", aec, site.gw.dimse_port, keys, "-aem", "ARCHIVE", out=None)
    assert answer.final == 0x0000, answer.output[-3000:]
    *pendings, final = answer.counts()
    assert final[1:] == (4, 0, 0)  # completed, failed, warning
    for remaining, completed, failed, warning in pendings:
        assert remaining + completed + failed + warning == 4
    received = site.scp.files()
    assert sorted(received) == sorted(u for u in site.files if u.startswith(UID_ROOT + "1."))
    for uid, path in received.items():
        _same_pixels(path, site.files[uid])


def test_move_series_and_image_levels_through_cloud(site: Site) -> None:
    site.scp.clear()
    series: dict[str, str | None] = {
        "QueryRetrieveLevel": "SERIES",
        "StudyInstanceUID": UID_ROOT + "2",
        "SeriesInstanceUID": UID_ROOT + "2.1",
    }
    answer = qr_tool("movescu", "CLOUD", site.gw.dimse_port, series, "-aem", "ARCHIVE", out=None)
    assert answer.final == 0x0000, answer.output[-3000:]
    assert sorted(site.scp.files()) == [UID_ROOT + "2.1.1", UID_ROOT + "2.1.2"]
    site.scp.clear()
    image = {**series, "QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": UID_ROOT + "2.1.2"}
    answer = qr_tool("movescu", "CLOUD", site.gw.dimse_port, image, "-aem", "ARCHIVE", out=None)
    assert answer.final == 0x0000, answer.output[-3000:]
    assert list(site.scp.files()) == [UID_ROOT + "2.1.2"]


def test_move_to_unknown_destination_is_refused(site: Site) -> None:
    keys: dict[str, str | None] = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": UID_ROOT + "1",
    }
    answer = qr_tool("movescu", "CLOUD", site.gw.dimse_port, keys, "-aem", "NOWHERE", out=None)
    assert answer.final == 0xA801, answer.output[-2000:]


@pytest.mark.parametrize("aec", ["CLOUD", "PROXY"])
def test_get_study(site: Site, aec: str) -> None:
    out = site.root / f"get-{aec}"
    keys: dict[str, str | None] = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": UID_ROOT + "1",
    }
    answer = qr_tool("getscu", aec, site.gw.dimse_port, keys, out=out)
    assert answer.final == 0x0000, answer.output[-3000:]
    assert answer.counts()[-1][1:] == (4, 0, 0)
    got = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in out.iterdir()}
    assert len(got) == 4
    for uid, path in got.items():
        _same_pixels(path, site.files[uid])


@pytest.mark.parametrize(
    ("aec", "status"),
    [("DEAD", 0xA700), ("HANG", 0xA700), ("BADURL", 0xC000)],
)
def test_upstream_failure_gets_a_status_and_the_gateway_keeps_serving(
    site: Site, aec: str, status: int
) -> None:
    before = site.gw.log_count("bridge.upstream_failed")
    answer = site.find(aec, STUDY_KEYS, f"fail-{aec}")
    assert answer.final == status, answer.output[-2000:]
    assert not answer.responses
    site.gw.wait_log("bridge.upstream_failed", before + 1)
    move_keys: dict[str, str | None] = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": UID_ROOT + "1",
    }
    moved = qr_tool("movescu", aec, site.gw.dimse_port, move_keys, "-aem", "ARCHIVE", out=None)
    assert moved.final == (0xA701 if status == 0xA700 else status), moved.output[-2000:]
    # still serving: the same query through the live upstream answers in full
    again = site.find("CLOUD", STUDY_KEYS, f"after-{aec}")
    assert again.final == 0x0000 and len(again.responses) == 3


def test_local_queries_stay_local(site: Site) -> None:
    """The gateway's own AE title still answers from its (empty) store."""
    answer = site.find(AE_TITLE, STUDY_KEYS, "local")
    assert answer.final == 0x0000, answer.output[-2000:]
    assert answer.responses == []
    assert len(site.files) == ALL_INSTANCES


# -- information model, Move Destination translation, DIMSE upstream down -------------------

PATIENT_ROOT = "-P"


def requested_classes(orthanc_log: str) -> set[str]:
    """The Q/R SOP classes of the requests Orthanc received and sent (DCMTK's names)."""
    found = re.findall(r"Affected SOP Class UID\s*:\s*=?(\w+)", orthanc_log)
    return {name for name in found if name.endswith("QueryRetrieveInformationModel")}


@pytest.mark.parametrize(
    "keys",
    [
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": None, "StudyDate": None},
        {
            "QueryRetrieveLevel": "IMAGE",
            "PatientID": "P1",
            "StudyInstanceUID": UID_ROOT + "1",
            "SeriesInstanceUID": UID_ROOT + "1.1",
            "SOPInstanceUID": None,
        },
    ],
    ids=["study", "image"],
)
def test_proxy_find_keeps_the_requestors_information_model(
    site: Site, keys: dict[str, str | None]
) -> None:
    """A Patient Root C-FIND goes to the PACS as a Patient Root C-FIND (not as Study Root
    because of its level), and its matches carry Patient ID (PS3.4 C.6.1)."""
    unique = "StudyInstanceUID" if keys["QueryRetrieveLevel"] == "STUDY" else "SOPInstanceUID"
    mark = site.orthanc_log_mark()
    bridged = site.find("PROXY", keys, "model", PATIENT_ROOT)
    seen = requested_classes(site.orthanc_log_since(mark))
    assert seen == {"FINDPatientRootQueryRetrieveInformationModel"}
    direct = site.find(ORTHANC_AET, {**keys, "PatientID": keys.get("PatientID")}, "model")
    with_pid = {**keys, "PatientID": None}
    assert _rows(bridged, with_pid, unique) == _rows(direct, with_pid, unique)
    assert all(ds.PatientID in ("P1", "P2") for ds in bridged.responses)

    mark = site.orthanc_log_mark()
    study_root = site.find("PROXY", keys, "model-s", STUDY_ROOT)
    seen = requested_classes(site.orthanc_log_since(mark))
    assert seen == {"FINDStudyRootQueryRetrieveInformationModel"}
    assert study_root.final == 0x0000


def test_patient_root_find_through_cloud_carries_patient_id(site: Site) -> None:
    """Patient Root at SERIES level through a DICOMweb source: Patient ID is asked of the
    QIDO-RS service and returned with each match (PS3.4 C.6.1), not only the keys asked."""
    keys: dict[str, str | None] = {
        "QueryRetrieveLevel": "SERIES",
        "PatientID": None,
        "StudyInstanceUID": UID_ROOT + "1",
        "SeriesInstanceUID": None,
    }
    asked = {k: v for k, v in keys.items() if k != "PatientID"}
    answer = site.find("CLOUD", asked, "pid-cloud", PATIENT_ROOT)
    direct = site.find(ORTHANC_AET, keys, "pid-cloud", PATIENT_ROOT)
    assert _rows(answer, keys, "SeriesInstanceUID") == _rows(direct, keys, "SeriesInstanceUID")
    assert [ds.PatientID for ds in answer.responses] == ["P1", "P1"]


def test_proxy_move_destination_is_translated(site: Site) -> None:
    """``move_destination_map``: the requestor's VIEWER is ARCHIVE on the PACS; without the
    map (PROXY) the PACS does not know VIEWER and refuses."""
    keys: dict[str, str | None] = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": UID_ROOT + "2",
    }
    site.scp.clear()
    refused = qr_tool("movescu", "PROXY", site.gw.dimse_port, keys, "-aem", "VIEWER", out=None)
    assert refused.final == 0xC000, refused.output[-2000:]  # Orthanc: unknown destination
    assert site.scp.files() == {}
    moved = qr_tool("movescu", "MAPPED", site.gw.dimse_port, keys, "-aem", "VIEWER", out=None)
    assert moved.final == 0x0000, moved.output[-3000:]
    assert sorted(site.scp.files()) == [UID_ROOT + "2.1.1", UID_ROOT + "2.1.2"]


def test_proxy_forward_moves_through_the_gateway(site: Site) -> None:
    """``move: forward``: the PACS is asked for a C-GET by our AE title; the instances go
    to HIDDEN, a move destination only the gateway knows, with pending counts."""
    keys: dict[str, str | None] = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": UID_ROOT + "1",
    }
    site.scp.clear()
    mark = site.orthanc_log_mark()
    moved = qr_tool("movescu", "FORWARD", site.gw.dimse_port, keys, "-aem", "HIDDEN", out=None)
    assert moved.final == 0x0000, moved.output[-3000:]
    assert moved.counts()[-1][1:] == (4, 0, 0)
    # A Study Root C-GET by our AE title (no C-MOVE: the PACS does not know HIDDEN), after
    # an IMAGE-level C-FIND naming the SOP classes to offer.
    assert requested_classes(site.orthanc_log_since(mark)) == {
        "FINDStudyRootQueryRetrieveInformationModel",
        "GETStudyRootQueryRetrieveInformationModel",
    }
    received = site.scp.files()
    assert sorted(received) == sorted(u for u in site.files if u.startswith(UID_ROOT + "1."))
    for uid, path in received.items():
        _same_pixels(path, site.files[uid])
    unknown = qr_tool("movescu", "FORWARD", site.gw.dimse_port, keys, "-aem", "NOWHERE", out=None)
    assert unknown.final == 0xA801, unknown.output[-2000:]


def test_dimse_upstream_down_gets_a_status_and_the_gateway_keeps_serving(site: Site) -> None:
    """A DIMSE upstream on a closed port: C-FIND 0xA700, C-MOVE and C-GET 0xA701, each
    logged with the cause; the gateway answers the next query in full."""
    before = site.gw.log_count("bridge.upstream_failed")
    found = site.find("PACSDOWN", STUDY_KEYS, "down")
    assert found.final == 0xA700, found.output[-2000:]
    assert not found.responses
    keys: dict[str, str | None] = {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": UID_ROOT + "1",
    }
    moved = qr_tool("movescu", "PACSDOWN", site.gw.dimse_port, keys, "-aem", "ARCHIVE", out=None)
    assert moved.final == 0xA701, moved.output[-2000:]
    got = qr_tool("getscu", "PACSDOWN", site.gw.dimse_port, keys, out=site.root / "get-down")
    assert got.final == 0xA701, got.output[-2000:]
    assert list((site.root / "get-down").iterdir()) == []
    site.gw.wait_log("bridge.upstream_failed", before + 3)
    assert "pacs_down" in site.gw.log_text()
    again = site.find("PROXY", STUDY_KEYS, "after-down")
    assert again.final == 0x0000 and len(again.responses) == 3


def test_proxy_passes_a_cancel_on_to_the_pacs(
    gateway: Callable[..., GatewayProcess], corpus: Corpus, tmp_path: Path
) -> None:
    """movescu's C-CANCEL-RQ during a relayed C-MOVE reaches the PACS (here another
    dicomgate, which stops between two batches of sub-operations); the PACS's Cancel
    answer, with its counts, comes back through the proxy."""
    files = corpus.mr("bridge-cancel", 200, seed=5201)
    scp = StoreSCP(tmp_path / "scp", "ARCHIVE")
    try:
        pacs = gateway(
            {
                "dimse": {
                    "ae_title": "UPSTREAM",
                    "move_destinations": {"ARCHIVE": {"host": "127.0.0.1", "port": scp.port}},
                }
            }
        )
        assert pacs.storescu(files).returncode == 0
        proxy = gateway(
            {
                "destinations": {
                    "pacs": {
                        "type": "dimse",
                        "ae_title": "UPSTREAM",
                        "host": "127.0.0.1",
                        "port": pacs.dimse_port,
                    }
                },
                "query": {"ae_titles": {"PROXY": {"source": "pacs", "timeout": 10}}},
            }
        )
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        keys: dict[str, str | None] = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
        answer = qr_tool(
            "movescu", "PROXY", proxy.dimse_port, keys, "-aem", "ARCHIVE", "--cancel", "1", out=None
        )
        assert answer.final == 0xFE00, answer.output[-3000:]
        remaining, completed, failed, _ = answer.counts()[-1]
        assert remaining > 0 and 0 < completed < len(files) and failed == 0
        assert completed + remaining == len(files)
        assert "cancel requested" in pacs.log_text()  # the PACS got the C-CANCEL-RQ
        proxy.wait_log("move.answered")
        assert "cancel passed on" in proxy.log_text()
        assert len(scp.files()) == completed
        # The next move through the proxy runs to its end.
        scp.clear()
        full = qr_tool("movescu", "PROXY", proxy.dimse_port, keys, "-aem", "ARCHIVE", out=None)
        assert full.final == 0x0000, full.output[-3000:]
        assert len(scp.files()) == len(files)
    finally:
        scp.stop()


# -- streaming: the first instance reaches the destination during the download -------------


class SlowLink:
    """A TCP relay on a free port in front of ``port`` that passes the server's bytes on (or,
    with ``slow_replies=False``, the client's) at about ``rate`` bytes per second, the
    other direction at full speed; :attr:`last_byte` is when it relayed the last slow one."""

    def __init__(self, port: int, rate: int, *, slow_replies: bool = True) -> None:
        self.target, self.chunk = port, max(rate // 20, 1024)  # 20 chunks a second
        self.slow_replies = slow_replies
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.last_byte = 0.0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            slow = self.slow_replies
            for src, dst, throttled in ((client, server, not slow), (server, client, slow)):
                threading.Thread(target=self._pump, args=(src, dst, throttled), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while data := src.recv(self.chunk if slow else 65536):
                dst.sendall(data)
                if slow:
                    self.last_byte = time.time()
                    time.sleep(0.05)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def test_cancelled_bridged_find_sends_the_pacs_a_cancel(
    gateway: Callable[..., GatewayProcess], corpus: Corpus, tmp_path: Path
) -> None:
    """findscu cancels a C-FIND relayed to a PACS (another dicomgate behind a slow link, so
    it is still answering): the proxy answers 0xFE00 at once and passes a C-CANCEL-RQ on to
    the PACS, reads it out to its final response and releases the association instead of
    aborting it; the next query through the proxy is answered in full."""
    files = corpus.mr("bridge-find-cancel", 60, seed=5202)
    pacs = gateway({"dimse": {"ae_title": "UPSTREAM"}})
    assert pacs.storescu(files).returncode == 0
    link = SlowLink(pacs.dimse_port, rate=8_000)  # the PACS's answers at ~8 KB/s
    try:
        proxy = gateway(
            {
                "destinations": {
                    "pacs": {
                        "type": "dimse",
                        "ae_title": "UPSTREAM",
                        "host": "127.0.0.1",
                        "port": link.port,
                    }
                },
                "query": {"ae_titles": {"PROXY": {"source": "pacs", "timeout": 20}}},
            }
        )
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        keys: dict[str, str | None] = {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": study,
            "SeriesInstanceUID": None,
            "SOPInstanceUID": None,
        }
        released = pacs.log_count("association.released")
        answer = qr_tool(
            "findscu", "PROXY", proxy.dimse_port, keys, "--cancel", "1", out=tmp_path / "f"
        )
        assert answer.final == 0xFE00, answer.output[-3000:]
        assert 1 <= len(answer.responses) < len(files)
        pacs.wait_log("dimse.cancel", timeout=20)  # the PACS got the C-CANCEL-RQ ...
        pacs.wait_log("association.released", released + 1, timeout=20)  # ... and a release
        whole = qr_tool("findscu", "PROXY", proxy.dimse_port, keys, out=tmp_path / "g")
        assert whole.final == 0x0000 and len(whole.responses) == len(files)
    finally:
        link.close()


def test_bridged_move_streams_instances_while_the_study_downloads(
    gateway: Callable[..., GatewayProcess], corpus: Corpus, tmp_path: Path
) -> None:
    """C-MOVE through a DICOMweb source: the first instance is stored by storescp while
    the WADO-RS answer is still arriving (a 4 MB study over a ~1.3 MB/s link), not after
    the whole study was downloaded."""
    files = corpus.ct("bridge-stream", 8, seed=5401)  # ~514 KB each
    orthanc = launch_orthanc(tmp_path / "orthanc")
    scp = StoreSCP(tmp_path / "scp", "ARCHIVE")
    link = SlowLink(orthanc.http_port, rate=1_300_000)
    try:
        for path in files:
            post_instance(orthanc, path)
        gw = gateway(
            {
                "destinations": {
                    "slow": {"type": "dicomweb", "url": f"http://127.0.0.1:{link.port}/dicom-web"},
                    "archive": {
                        "type": "dimse",
                        "ae_title": "ARCHIVE",
                        "host": "127.0.0.1",
                        "port": scp.port,
                    },
                },
                "query": {"ae_titles": {"SLOW": {"source": "slow", "timeout": 20}}},
            }
        )
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        keys: dict[str, str | None] = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
        moved = qr_tool("movescu", "SLOW", gw.dimse_port, keys, "-aem", "ARCHIVE", out=None)
        assert moved.final == 0x0000, moved.output[-3000:]
        received = sorted(p.stat().st_mtime for p in scp.folder.iterdir())
        assert len(received) == len(files)
        # The download took ~3 s; the first instance was stored well before its end.
        assert link.last_byte - received[0] > 1.0, (received, link.last_byte)
        # ... and pending responses went out meanwhile (every 0.5 s at least).
        assert len(moved.counts()) >= 3
    finally:
        link.close()
        scp.stop()
        orthanc.stop()
