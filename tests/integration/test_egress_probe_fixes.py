"""Delivery defects found by an outside probe of egress, each driven against real peers.

- a SOP class the DIMSE destination does not support (its presentation contexts rejected,
  PS3.8 9.3.3.2 result 3) fails those instances for good at once, without opening the
  circuit breaker or holding back the other instances;
- a destination taking only lossless compressed syntaxes (JPEG Lossless SV1, ...) gets
  uncompressed instances from a fresh gateway: the gateway proposes the lossless syntaxes
  it can encode when the uncompressed ones are refused, and transcodes;
- a folder template without ``{SOPInstanceUID}`` is warned of (check-config, start-up) and
  each replaced file of another instance is logged, without patient data;
- a delivered job keeps no ``last_error`` of an earlier failed attempt;
- ``retry-dead`` of an unknown destination answers 404.

Peers: pynetdicom SCPs scripted in this process (which SOP classes and transfer syntaxes
they accept), DCMTK storescu as the modality, the scripted STOW-RS server.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    UID,
    CTImageStorage,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer
from tests.conftest import (
    DICOMGATE,
    Corpus,
    GatewayProcess,
    bundled_file,
    delivery_of,
    free_port,
    needs_dcmtk,
    sop_uid_of,
    wait_until,
)
from tests.stow_server import StowRequest, StowServer, stow_body, stow_server

from dicomgate.egress.base import Outcome
from dicomgate.egress.dimse import DimseSender
from dicomgate.egress.models import DimseDestination

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]


# ----------------------------------------------------------------- a scripted storage SCP


@dataclass
class StorageScp:
    """A pynetdicom Storage SCP on a free port accepting only ``classes`` (None: every
    storage class) in only ``syntaxes``; it keeps what it received."""

    port: int
    server: ThreadedAssociationServer
    received: list[pydicom.Dataset] = field(default_factory=list)
    associations: int = 0  # A-ASSOCIATE-RQs answered

    @property
    def destination(self) -> dict[str, Any]:
        return {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": self.port}


@pytest.fixture
def storage_scp() -> Iterator[Callable[..., StorageScp]]:
    servers: list[ThreadedAssociationServer] = []
    lock = threading.Lock()

    def start(classes: Sequence[str] | None, syntaxes: Sequence[str]) -> StorageScp:
        ae = AE(ae_title="PACS")
        for cx in AllStoragePresentationContexts:
            abstract = cx.abstract_syntax
            if abstract is not None and (classes is None or abstract in classes):
                ae.add_supported_context(abstract, list(syntaxes))
        port = free_port()
        scp: StorageScp

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with lock:
                scp.received.append(ds)
            return 0x0000

        def on_requested(_: evt.Event) -> None:
            with lock:
                scp.associations += 1

        server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_REQUESTED, on_requested)],
        )
        assert server is not None
        servers.append(server)
        scp = StorageScp(port, server)
        return scp

    yield start
    for server in servers:
        server.shutdown()


def _model(port: int) -> DimseDestination:
    return DimseDestination.model_validate(
        {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": port}
    )


def _send_twice(port: int, first: list[Path], second: list[Path]) -> tuple[list[Outcome], int]:
    """Two sends through one fresh sender; its outcomes and the associations it opened."""

    async def run() -> tuple[list[Outcome], int]:
        sender = DimseSender("pacs", _model(port), calling_ae="DICOMGATE")
        try:
            outcomes = await sender.send([delivery_of(f, n) for n, f in enumerate(first)])
            if second:
                batch = [delivery_of(f, 100 + n) for n, f in enumerate(second)]
                outcomes += await sender.send(batch)
            return outcomes, sender.associations_opened
        finally:
            await sender.close()

    return asyncio.run(run())


# ----------------------------------------------------------------- the sender


@pytest.mark.parametrize(
    "only", [JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless], ids=lambda u: u.name
)
def test_a_peer_taking_one_lossless_compressed_syntax_gets_uncompressed_instances(
    storage_scp: Callable[..., StorageScp], only: UID
) -> None:
    """A fresh sender, nothing compressed sent before: the refused uncompressed contexts
    are followed by the lossless compressed ones, the instance is transcoded, and the
    association proposing them is the one reused afterwards."""
    scp = storage_scp(None, [only])
    ct = bundled_file("CT_small.dcm")
    outcomes, opened = _send_twice(scp.port, [ct], [ct])
    assert outcomes == [Outcome(0, True), Outcome(100, True)]
    assert opened == 1  # the one that took the compressed contexts, kept for the second send
    assert scp.associations == 2  # the refused first proposal, then that one
    assert [str(ds.file_meta.TransferSyntaxUID) for ds in scp.received] == [only] * 2
    original = pydicom.dcmread(ct)
    for got in scp.received:
        assert got.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(got.pixel_array, original.pixel_array)


def test_a_sop_class_the_peer_does_not_support_fails_for_good_and_the_rest_is_sent(
    storage_scp: Callable[..., StorageScp],
) -> None:
    scp = storage_scp([CTImageStorage], ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ct, mr = bundled_file("CT_small.dcm"), bundled_file("MR_small.dcm")
    # A mixed batch (the association is accepted for CT), then MR alone (accepted for none).
    outcomes, _ = _send_twice(scp.port, [mr, ct], [mr])
    mixed_mr, mixed_ct, alone_mr = outcomes
    assert mixed_ct == Outcome(1, True)
    for outcome in (mixed_mr, alone_mr):
        assert (outcome.delivered, outcome.retryable) == (False, False), outcome
        assert outcome.error == (
            "SOP class not supported: the peer rejected MR Image Storage"
            " (1.2.840.10008.5.1.4.1.1.4) (presentation context result:"
            " abstract-syntax-not-supported)"
        )
    assert len(scp.received) == 1


def test_transfer_syntaxes_refused_even_compressed_fail_for_good_naming_what_was_offered(
    storage_scp: Callable[..., StorageScp],
) -> None:
    """A peer taking CT only in lossy JPEG Baseline, which is never chosen implicitly."""
    scp = storage_scp([CTImageStorage], [JPEGBaseline8Bit])
    (outcome,), opened = _send_twice(scp.port, [bundled_file("CT_small.dcm")], [])
    assert (outcome.delivered, outcome.retryable) == (False, False), outcome
    assert outcome.error == (
        "peer accepted CT Image Storage (1.2.840.10008.5.1.4.1.1.2) in none of the transfer"
        " syntaxes offered (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless,"
        " JPEGLosslessSV1, JPEG2000Lossless, RLELossless; presentation context result:"
        " transfer-syntaxes-not-supported)"
    )
    assert opened == 0 and scp.associations == 2 and not scp.received


# ----------------------------------------------------------------- the gateway


def _jobs(gw: GatewayProcess, destination: str) -> list[dict[str, Any]]:
    status, body = gw.http_get(f"/api/queue?destination={destination}&limit=1000")
    assert status == 200, body
    jobs: list[dict[str, Any]] = body["jobs"]
    return jobs


def _post(gw: GatewayProcess, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(gw.url(path), method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_unsupported_sop_class_is_dead_lettered_at_once_and_holds_back_nothing(
    gateway: Gateway, storage_scp: Callable[..., StorageScp], corpus: Corpus
) -> None:
    """Probe t13b: 3 MR to a CT-only PACS, then a CT. The MR were retried as a failed
    association, opened the breaker, and the CT waited 107 s behind them."""
    scp = storage_scp([CTImageStorage], ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    gw = gateway(
        {"destinations": {"pacs": scp.destination}, "routes": [{"name": "all", "to": ["pacs"]}]}
    )
    mrs = corpus.mr("probe-unsupported-mr", 3, seed=1301)
    assert gw.storescu(mrs).returncode == 0

    def dead() -> list[dict[str, Any]]:
        return [j for j in _jobs(gw, "pacs") if j["state"] == "dead"]

    wait_until(lambda: len(dead()) == 3, 20, "the 3 MR dead-lettered")
    for job in dead():
        assert job["attempts"] == 1, job
        assert job["last_error"].startswith("SOP class not supported"), job
    status, states = gw.http_get("/api/destinations")
    assert status == 200 and states["destinations"]["pacs"]["breaker"] == "closed", states
    assert gw.log_count("delivery.circuit_open") == 0

    (ct,) = corpus.ct("probe-unsupported-ct", 1, seed=1302)
    sent = time.monotonic()
    assert gw.storescu([ct]).returncode == 0
    wait_until(lambda: any(j["state"] == "done" for j in _jobs(gw, "pacs")), 10, "the CT delivered")
    assert time.monotonic() - sent < 10
    assert [str(ds.SOPInstanceUID) for ds in scp.received] == [sop_uid_of(ct)]


def test_a_fresh_gateway_delivers_uncompressed_instances_to_a_jpeg_lossless_only_peer(
    gateway: Gateway, storage_scp: Callable[..., StorageScp], corpus: Corpus
) -> None:
    """Probe t4b: uncompressed CT to a peer accepting only JPEG Lossless SV1 were all
    dead-lettered by a fresh gateway, and delivered once a JPEG instance had been sent."""
    scp = storage_scp(None, [JPEGLosslessSV1])
    gw = gateway(
        {
            "destinations": {"pacs": scp.destination},
            "routes": [{"name": "all", "to": ["pacs"]}],
            "queue": {"retry": {"max_attempts": 1}},  # no second chance: the first must do
        }
    )
    files = corpus.ct("probe-jpeg-only", 3, seed=1401)
    assert gw.storescu(files).returncode == 0
    wait_until(
        lambda: (
            [j["state"] for j in _jobs(gw, "pacs")].count("done") == 3
            or any(j["state"] == "dead" for j in _jobs(gw, "pacs"))
        ),
        30,
        "the 3 CT delivered or dead",
    )
    assert [j["state"] for j in _jobs(gw, "pacs")] == ["done"] * 3, _jobs(gw, "pacs")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in scp.received}
    assert set(by_uid) == {sop_uid_of(f) for f in files}
    for f in files:
        got = by_uid[sop_uid_of(f)]
        assert got.file_meta.TransferSyntaxUID == JPEGLosslessSV1
        assert np.array_equal(got.pixel_array, pydicom.dcmread(f).pixel_array)


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DICOMGATE, "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_folder_template_without_the_sop_instance_uid_is_warned_of_and_replacements_logged(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    """Probe t7: ``{PatientID}/{SeriesNumber}.dcm`` left one file of four, all jobs done,
    nothing said."""
    out = tmp_path / "series"
    gw = gateway(
        {
            "destinations": {
                "series": {
                    "type": "folder",
                    "path": str(out),
                    "template": "{PatientID}/{SeriesNumber}.dcm",
                },
                "share": {"type": "folder", "path": str(tmp_path / "share")},
            },
            "routes": [{"name": "all", "to": ["series", "share"]}],
        },
        start=False,
    )
    checked = _check_config(gw.config_path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.count("warning:") == 1, checked.stderr  # the default template: none
    assert checked.stderr.startswith(
        "warning: destinations.series.template: template '{PatientID}/{SeriesNumber}.dcm'"
        " has no {SOPInstanceUID}"
    ), checked.stderr

    gw.start()
    assert gw.log_count("config.folder_template_overwrites") == 1
    files = corpus.mr("probe-folder-collide", 4, seed=1501)
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: [j["state"] for j in _jobs(gw, "series")].count("done") == 4, 20, "4 done")
    assert len(list(out.rglob("*.dcm"))) == 1
    assert len(list((tmp_path / "share").rglob("*.dcm"))) == 4
    gw.wait_log("egress.folder_replaced")
    lines = [ln for ln in gw.log_text().splitlines() if " egress.folder_replaced " in ln]
    first = pydicom.dcmread(files[0])
    for line in lines:
        assert "destination=series" in line and "replaced_sop=" in line, line
        assert str(first.PatientID) not in line and str(first.PatientName) not in line
        assert not any(sop_uid_of(f) in line for f in files), line  # hashed


@pytest.fixture
def stow() -> Iterator[StowServer]:
    with stow_server() as server:
        yield server


def test_a_delivered_job_keeps_no_error_of_an_earlier_attempt(
    gateway: Gateway, stow: StowServer, corpus: Corpus
) -> None:
    refused: list[str] = []

    def respond(request: StowRequest) -> tuple[int, bytes]:
        if not refused:
            refused.extend(request.uids)
            return 500, b'{"error": "busy"}'
        return 200, stow_body(request.uids)

    stow.respond = respond
    gw = gateway(
        {
            "destinations": {"cloud": {"type": "dicomweb", "url": stow.url, "timeout": 30}},
            "routes": [{"name": "all", "to": ["cloud"]}],
            "queue": {"retry": {"initial": 0.2, "max": 1.0, "jitter": 0.0}},
        }
    )
    (f,) = corpus.mr("probe-last-error", 1, seed=1601)
    assert gw.storescu([f]).returncode == 0
    wait_until(lambda: _jobs(gw, "cloud")[0]["state"] == "done", 20, "delivered after a 500")
    (job,) = _jobs(gw, "cloud")
    assert refused == [sop_uid_of(f)]
    assert job["attempts"] == 2 and job["last_error"] is None, job
    status, shown = gw.http_get(f"/api/queue/{job['id']}")
    assert status == 200 and shown["last_error"] is None
    history = [(h["outcome"], h["error"]) for h in shown["history"]]
    assert history == [("failed", "HTTP 500"), ("delivered", None)], history


def test_retry_dead_of_an_unknown_destination_is_404_and_of_a_removed_one_redrives(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")
    gw = gateway(
        {
            "destinations": {
                "share": {"type": "folder", "path": str(tmp_path / "share")},
                "old": {"type": "folder", "path": str(blocked)},
            },
            "routes": [{"name": "all", "to": ["share", "old"]}],
            "queue": {"retry": {"max_attempts": 1}},
        }
    )
    assert gw.storescu(corpus.mr("probe-retry-dead", 2, seed=1701)).returncode == 0
    wait_until(lambda: [j["state"] for j in _jobs(gw, "old")] == ["dead", "dead"], 20, "2 dead")
    assert _post(gw, "/api/queue/retry-dead?destination=nosuch") == (
        404,
        {"error": "no destination 'nosuch'"},
    )
    assert _post(gw, "/api/queue/retry-dead?destination=share") == (200, {"retried": 0})

    # "old" leaves the configuration; its dead jobs are still there, and can be re-driven
    # (they wait for it to come back, or for a node that has it).
    gw.config["destinations"].pop("old")
    gw.config["routes"] = [{"name": "all", "to": ["share"]}]
    gw.restart()
    assert _post(gw, "/api/queue/retry-dead?destination=old") == (200, {"retried": 2})
    assert _post(gw, "/api/queue/retry-dead?destination=nosuch")[0] == 404
    assert _post(gw, "/api/queue/retry-dead") == (200, {"retried": 0})
