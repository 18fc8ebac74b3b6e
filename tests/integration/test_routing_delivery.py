"""Routing and durable delivery end to end: storescu -> dicomgate -> DCMTK storescp / folder.

Real peers on loopback: the gateway is the console script, the destinations are DCMTK
``storescp`` processes and folders; the queue lives in the gateway's SQLite index.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from tests.conftest import (
    Corpus,
    GatewayProcess,
    Orthanc,
    dcmtk_env,
    free_port,
    needs_dcmtk,
    sop_uid_of,
    wait_until,
)

pytestmark = [pytest.mark.timeout(180), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]


class StoreSCP:
    """A DCMTK storescp on a free port writing into ``folder``."""

    def __init__(self, folder: Path, aet: str = "PACS", port: int | None = None) -> None:
        self.folder = folder
        self.aet = aet
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> StoreSCP:
        self.proc = subprocess.Popen(
            [
                "storescp",
                "--output-directory",
                str(self.folder),
                "-aet",
                self.aet,
                "+xa",
                str(self.port),
            ],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Listening is enough (a TCP probe, not echoscu): a gateway already retrying this
        # destination may take the one association a single-process storescp serves, and
        # an echoscu queued behind it would wait for the gateway's to idle out (seen in CI).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("storescp did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def received(self) -> dict[str, Path]:
        """The files storescp has finished writing, by SOP Instance UID.

        storescp writes each file in place under its final name, so a test polling while
        deliveries are in flight can meet one half written: its header may not parse yet,
        it may end before its pixel data, or its pixel data may be short of its length
        (pydicom reads a short value without complaint). Such a file is left for the next
        poll; one that never completes keeps the caller's wait from being met, so it still
        fails the test. Every instance these tests send is an image.
        """
        out = {}
        for path in self.folder.iterdir():
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path)
                uid = str(ds.SOPInstanceUID)
            except (InvalidDicomError, EOFError, OSError, AttributeError, struct.error):
                continue
            pixels = ds.get_item(0x7FE00010)
            if pixels is None or pixels.length not in (0xFFFFFFFF, len(pixels.value)):
                continue
            out[uid] = path
        return out


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    started: list[StoreSCP] = []

    def factory(name: str = "pacs", aet: str = "PACS", start: bool = True) -> StoreSCP:
        scp = StoreSCP(tmp_path / f"scp-{name}", aet)
        started.append(scp)
        return scp.start() if start else scp

    yield factory
    for scp in started:
        scp.stop()


def _pixels_equal(a: Path, b: Path) -> bool:
    return bool(pydicom.dcmread(a).PixelData == pydicom.dcmread(b).PixelData)


def test_fan_out_to_two_dimse_destinations_and_a_folder(
    gateway: Gateway, storescp: Callable[..., StoreSCP], corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("route-fanout", 20, seed=401)
    pacs, ai = storescp("pacs", "PACS"), storescp("ai", "AI")
    share = tmp_path / "share"
    gw = gateway(
        {
            "destinations": {
                "pacs": {
                    "type": "dimse",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": pacs.port,
                },
                "ai": {"type": "dimse", "ae_title": "AI", "host": "127.0.0.1", "port": ai.port},
                "share": {"type": "folder", "path": str(share)},
            },
            "routes": [
                {
                    "name": "mr-everywhere",
                    "match": {"Modality": "MR"},
                    "to": ["pacs", "ai", "share"],
                },
                {"name": "ct-only", "match": {"Modality": "CT"}, "to": ["pacs"]},
            ],
        }
    )
    assert gw.storescu(files).returncode == 0
    sops = {sop_uid_of(f) for f in files}
    wait_until(
        lambda: set(pacs.received()) == sops and set(ai.received()) == sops,
        60,
        "both DIMSE destinations to receive every instance",
    )
    wait_until(lambda: len(list(share.rglob("*.dcm"))) == len(files), 30, "the folder copies")
    by_sop = {sop_uid_of(f): f for f in files}
    for sop, path in pacs.received().items():
        assert _pixels_equal(path, by_sop[sop])
    assert gw.log_count("delivery.done") >= 1


def test_a_peer_serving_one_association_at_a_time_gets_no_stall(
    gateway: Gateway, storescp: Callable[..., StoreSCP], corpus: Corpus
) -> None:
    """DCMTK storescp without --fork serves one association at a time. With the default
    two associations, the second waited unanswered until the first idled out (30 s,
    idle_timeout); now the sender gives it up, carries on over the first, logs the peer
    as one-association, and the backlog is delivered at once, each job in one attempt."""
    files = corpus.mr("route-serial", 48, seed=407)
    pacs = storescp("pacs", "PACS")
    destination = {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
    gw = gateway(
        {
            "destinations": {"pacs": destination},  # max_associations: 2, idle_timeout: 30
            "routes": [{"name": "all", "to": ["pacs"]}],
        }
    )

    def post(path: str) -> None:
        request = urllib.request.Request(gw.url(path), method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=5) as rsp:
            assert json.loads(rsp.read())

    post("/api/destinations/pacs/pause")  # a backlog: both workers lease at once on resume
    assert gw.storescu(files).returncode == 0
    post("/api/destinations/pacs/resume")
    resumed = time.monotonic()
    sops = {sop_uid_of(f) for f in files}
    wait_until(lambda: set(pacs.received()) == sops, 60, "the backlog delivered")
    assert time.monotonic() - resumed < 15, "a second association held a batch back"
    gw.wait_log("egress.dimse_one_association")
    status, body = gw.http_get("/api/queue?destination=pacs&limit=1000")
    assert status == 200, body
    assert {(j["state"], j["attempts"]) for j in body["jobs"]} == {("done", 1)}


def test_destination_down_then_up_gets_everything(
    gateway: Gateway, storescp: Callable[..., StoreSCP], corpus: Corpus
) -> None:
    files = corpus.mr("route-down", 10, seed=402)
    pacs = storescp("pacs", "PACS", start=False)
    gw = gateway(
        {
            "destinations": {
                "pacs": {
                    "type": "dimse",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": pacs.port,
                }
            },
            "routes": [{"name": "all", "to": ["pacs"]}],
            "queue": {"retry": {"initial": 0.2, "max": 1.0}},
        }
    )
    assert gw.storescu(files).returncode == 0  # acknowledged although the PACS is down
    wait_until(lambda: gw.log_count("delivery.failed") >= 1, 20, "a failed delivery attempt")
    pacs.start()
    sops = {sop_uid_of(f) for f in files}
    wait_until(lambda: set(pacs.received()) == sops, 90, "delivery after the PACS came back")


def test_kill9_during_delivery_loses_nothing(
    gateway: Gateway, storescp: Callable[..., StoreSCP], corpus: Corpus
) -> None:
    files = corpus.mr("route-kill", 60, seed=403)
    pacs = storescp("pacs", "PACS", start=False)
    gw = gateway(
        {
            "destinations": {
                "pacs": {
                    "type": "dimse",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": pacs.port,
                }
            },
            "routes": [{"name": "all", "to": ["pacs"]}],
            "queue": {"retry": {"initial": 0.2, "max": 1.0}, "lease_seconds": 5},
        }
    )
    assert gw.storescu(files).returncode == 0
    gw.close_index()
    gw.kill9()
    pacs.start()
    gw.restart()
    sops = {sop_uid_of(f) for f in files}
    wait_until(lambda: set(pacs.received()) >= sops, 90, "every instance delivered after restart")


def test_study_stable_trigger_survives_a_restart(
    gateway: Gateway, storescp: Callable[..., StoreSCP], corpus: Corpus
) -> None:
    files = corpus.mr("route-stable", 5, seed=404)
    pacs = storescp("pacs", "PACS")
    gw = gateway(
        {
            "destinations": {
                "pacs": {
                    "type": "dimse",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": pacs.port,
                }
            },
            "routes": [
                {
                    "name": "whole-study",
                    "to": ["pacs"],
                    "trigger": "study_stable",
                    "stable_after": "4s",
                }
            ],
        }
    )
    assert gw.storescu(files).returncode == 0
    time.sleep(1)
    assert not any(pacs.folder.iterdir()), "a study_stable route must wait for the quiet study"
    assert gw.terminate() == 0  # restart between the last instance and the deadline
    gw.restart()
    sops = {sop_uid_of(f) for f in files}
    wait_until(lambda: set(pacs.received()) == sops, 30, "the stable study after the restart")


def test_two_stable_routes_to_one_destination_deliver_each_instance_once(
    gateway: Gateway, storescp: Callable[..., StoreSCP], corpus: Corpus
) -> None:
    """A study_stable route and a series_stable route (no pipeline) both match and both
    send to the PACS: when they fire, each instance is delivered there once (one job),
    as for instance routes."""
    files = corpus.mr("route-stable-twice", 4, seed=406)
    pacs = storescp("pacs", "PACS")
    destination = {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
    gw = gateway(
        {
            "destinations": {"pacs": destination},
            "routes": [
                {
                    "name": "mr-study",
                    "match": {"Modality": "MR"},
                    "to": ["pacs"],
                    "trigger": "study_stable",
                    "stable_after": "1s",
                },
                {
                    "name": "any-series",
                    "to": ["pacs"],
                    "trigger": "series_stable",
                    "stable_after": "1s",
                },
            ],
        }
    )
    assert gw.storescu(files).returncode == 0
    sops = {sop_uid_of(f) for f in files}
    wait_until(lambda: set(pacs.received()) == sops, 30, "the stable study delivered")

    def jobs() -> list[dict[str, object]]:
        status, body = gw.http_get("/api/queue?destination=pacs&limit=1000")
        assert status == 200, body
        return list(body["jobs"])

    wait_until(lambda: all(j["state"] == "done" for j in jobs()), 30, "every job done")
    time.sleep(2)  # both timers had their time: nothing more is queued
    done = jobs()
    assert len(done) == len(files), done
    assert {j["state"] for j in done} == {"done"}


def test_route_to_a_dicomweb_destination_stores_in_orthanc(
    gateway: Gateway, corpus: Corpus, orthanc: Orthanc
) -> None:
    """storescu -> dicomgate -> STOW-RS -> Orthanc's DICOMweb plugin (batched)."""
    files = corpus.mr("route-stow", 12, seed=405)
    gw = gateway(
        {
            "destinations": {
                "cloud": {
                    "type": "dicomweb",
                    "url": f"http://127.0.0.1:{orthanc.http_port}/dicom-web",
                }
            },
            "routes": [{"name": "to-cloud", "match": {"Modality": "MR"}, "to": ["cloud"]}],
        }
    )
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: len(orthanc.get("/instances")) == len(files), 60, "Orthanc to hold all")
    sops = {
        orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
        for i in orthanc.get("/instances")
    }
    assert sops == {sop_uid_of(f) for f in files}


def test_a_stable_route_sends_only_the_instances_its_match_took(
    gateway: Gateway, tmp_path: Path, corpus: Corpus
) -> None:
    """One study: two CT instances, one of them in a PRIVATE series that a `final` route
    keeps for the archive, an MR and an SR-like OT instance. A study_stable route matching
    Modality CT sends the CT instance the final route let through, nothing else; a
    series_stable route on `calling_ae` sends only what that AE sent. Before, a fired timer
    queued every instance of its study or series, whatever the match said."""
    ct = corpus.ct("stable-ct", 2, seed=431)
    mr = corpus.mr("stable-mr", 1, seed=432)
    other = corpus.mr("stable-ot", 1, seed=433)
    study = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    for path, modality, description in (
        (ct[1], "CT", "PRIVATE"),
        (mr[0], "MR", None),
        (other[0], "OT", None),
    ):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.Modality = study, modality
        if description is not None:
            ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}.9"
            ds.SeriesDescription = description
        ds.save_as(path, enforce_file_format=True)
    folders = {name: tmp_path / name for name in ("archive", "ai", "fromct")}
    gw = gateway(
        {
            "destinations": {n: {"type": "folder", "path": str(p)} for n, p in folders.items()},
            "routes": [
                {
                    "name": "stopper",
                    "match": {"SeriesDescription": "PRIVATE"},
                    "final": True,
                    "to": ["archive"],
                },
                {
                    "name": "ct-study",
                    "match": {"Modality": "CT"},
                    "to": ["ai"],
                    "trigger": "study_stable",
                    "stable_after": "1s",
                },
                {
                    "name": "from-ct",
                    "match": {"calling_ae": "CT*"},
                    "to": ["fromct"],
                    "trigger": "series_stable",
                    "stable_after": "1s",
                },
            ],
        }
    )
    assert gw.storescu([ct[0], ct[1]], "-aet", "CT1").returncode == 0
    assert gw.storescu([mr[0], other[0]], "-aet", "MR1").returncode == 0

    def sent(folder: Path) -> set[str]:
        if not folder.exists():
            return set()
        return {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in folder.rglob("*")
            if p.is_file()
        }

    wait_until(lambda: sent(folders["ai"]) and sent(folders["fromct"]), 30, "both timers fired")
    time.sleep(2)  # anything else would have come by now
    assert sent(folders["archive"]) == {sop_uid_of(ct[1])}
    assert sent(folders["ai"]) == {sop_uid_of(ct[0])}
    assert sent(folders["fromct"]) == {sop_uid_of(ct[0])}  # the PRIVATE one went to archive only


def test_a_route_matches_a_value_longer_than_16_kib(
    gateway: Gateway, tmp_path: Path, corpus: Corpus
) -> None:
    """A private UT report of 20 KB and an ImageType of 3,001 values: the router saw
    values past the scan's 16 KiB as missing, so these routes never fired (`route test`,
    which reads the whole file, said they matched)."""
    long_private, long_comment = corpus.mr("route-long", 2, seed=441)
    ds = pydicom.dcmread(long_private)
    block = ds.private_block(0x0019, "ACME", create=True)
    block.add_new(0x20, "UT", "LONG" + "x" * 20_000)
    private_tag = block.get_tag(0x20)
    ds.save_as(long_private, enforce_file_format=True)
    ds = pydicom.dcmread(long_comment)
    ds.ImageType = ["DERIVED"] * 3000 + ["MARKER"]
    ds.save_as(long_comment, enforce_file_format=True)
    out = {name: tmp_path / name for name in ("private", "comment")}
    gw = gateway(
        {
            "destinations": {n: {"type": "folder", "path": str(p)} for n, p in out.items()},
            "routes": [
                {
                    "name": "by-private",
                    "match": {f"({private_tag >> 16:04X},{private_tag & 0xFFFF:04X})": "LONG*"},
                    "to": ["private"],
                },
                {"name": "by-type", "match": {"ImageType": "MARKER"}, "to": ["comment"]},
            ],
        }
    )
    assert gw.storescu([long_private, long_comment]).returncode == 0

    def sent(folder: Path) -> set[str]:
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}

    wait_until(lambda: sent(out["private"]) and sent(out["comment"]), 30, "both routes")
    assert sent(out["private"]) == {sop_uid_of(long_private)}
    assert sent(out["comment"]) == {sop_uid_of(long_comment)}
