"""DIMSE destination against real peers: DCMTK storescp and a pynetdicom SCP."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, MRImageStorage, RTPlanStorage
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer
from tests.conftest import bundled_file, dcmtk_env, delivery_of, free_port

from dicomgate.egress.base import Outcome
from dicomgate.egress.dimse import DimseSender
from dicomgate.egress.models import DimseDestination

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None, reason="needs DCMTK")


def _wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"storescp exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"nothing listens on {port}")


class StoreScp:
    """A DCMTK storescp on a free port; its verbose log counts associations."""

    def __init__(self, root: Path, accept_all: bool) -> None:
        self.port = free_port()
        self.out = root / f"storescp-{self.port}"
        self.out.mkdir()
        self.log = root / f"storescp-{self.port}.log"
        self.accept_all = accept_all
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["storescp", "-v", "-aet", "STORESCP", "-od", str(self.out)]
        args += ["+xa"] if self.accept_all else []
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*args, str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env()
            )
        _wait_listening(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def associations(self) -> int:
        return self.log.read_text(errors="replace").count("Association Acknowledged")

    def received(self) -> dict[str, pydicom.Dataset]:
        return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, self.out.iterdir())}


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[[bool], StoreScp]]:
    started: list[StoreScp] = []

    def factory(accept_all: bool = True) -> StoreScp:
        scp = StoreScp(tmp_path, accept_all)
        scp.start()
        started.append(scp)
        return scp

    yield factory
    for scp in started:
        scp.stop()


def _model(port: int, **extra: object) -> DimseDestination:
    return DimseDestination.model_validate(
        {"type": "dimse", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port, **extra}
    )


def test_batches_are_delivered_over_one_reused_association(
    storescp: Callable[[bool], StoreScp],
) -> None:
    scp = storescp(True)
    files = [bundled_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")]

    async def run() -> tuple[list[Outcome], list[Outcome], int]:
        sender = DimseSender("pacs", _model(scp.port), calling_ae="DICOMGATE")
        try:
            first = await sender.send([delivery_of(f, n) for n, f in enumerate(files)])
            second = await sender.send([delivery_of(files[0], 10), delivery_of(files[2], 11)])
            return first, second, sender.associations_opened
        finally:
            await sender.close()

    first, second, opened = asyncio.run(run())
    assert first == [Outcome(0, True), Outcome(1, True), Outcome(2, True)]
    assert second == [Outcome(10, True), Outcome(11, True)]
    assert opened == 1
    assert scp.associations() == 1
    received = scp.received()
    for f in files:
        sent = pydicom.dcmread(f)
        assert received[str(sent.SOPInstanceUID)].SOPClassUID == sent.SOPClassUID
    got = received[str(pydicom.dcmread(files[0]).SOPInstanceUID)]
    assert np.array_equal(got.pixel_array, pydicom.dcmread(files[0]).pixel_array)


def test_jpeg2000_is_decompressed_for_a_peer_taking_only_uncompressed(
    storescp: Callable[[bool], StoreScp],
) -> None:
    scp = storescp(False)
    source = bundled_file("MR_small_jp2klossless.dcm")

    async def run() -> list[Outcome]:
        sender = DimseSender("pacs", _model(scp.port), calling_ae="DICOMGATE")
        try:
            return await sender.send([delivery_of(source, 1)])
        finally:
            await sender.close()

    assert asyncio.run(run()) == [Outcome(1, True)]
    (got,) = scp.received().values()
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(got.pixel_array, pydicom.dcmread(source).pixel_array)


def test_destination_down_fails_the_batch_retryably() -> None:
    port = free_port()  # nothing listens there
    files = [bundled_file("CT_small.dcm"), bundled_file("MR_small.dcm")]

    async def run() -> list[Outcome]:
        sender = DimseSender("pacs", _model(port, dimse_timeout=5), calling_ae="DICOMGATE")
        try:
            return await sender.send([delivery_of(f, n) for n, f in enumerate(files)])
        finally:
            await sender.close()

    outcomes = asyncio.run(run())
    assert [(o.delivered, o.retryable, o.error) for o in outcomes] == [
        (False, True, "connection refused")
    ] * 2


def test_peer_restart_between_calls_reconnects(storescp: Callable[[bool], StoreScp]) -> None:
    scp = storescp(True)
    ct = bundled_file("CT_small.dcm")

    async def run() -> tuple[list[Outcome], int]:
        sender = DimseSender("pacs", _model(scp.port, dimse_timeout=5), calling_ae="DICOMGATE")
        try:
            assert await sender.send([delivery_of(ct, 1)]) == [Outcome(1, True)]
            scp.stop()  # the idle association dies with it
            scp.start()
            outcomes = await sender.send([delivery_of(ct, 2)])
            if not outcomes[0].delivered:  # the loss was seen only while sending
                assert outcomes[0].retryable, outcomes
                outcomes = await sender.send([delivery_of(ct, 2)])
            return outcomes, sender.associations_opened
        finally:
            await sender.close()

    outcomes, opened = asyncio.run(run())
    assert outcomes == [Outcome(2, True)]
    assert opened == 2


# ----------------------------------------------------------------- scripted statuses

STATUS_BY_CLASS = {CTImageStorage: 0xA700, MRImageStorage: 0xC000, RTPlanStorage: 0xB000}


@pytest.fixture
def status_scp() -> Iterator[tuple[int, ThreadedAssociationServer]]:
    """A pynetdicom SCP answering each C-STORE with a status chosen by SOP class."""

    def on_store(event: evt.Event) -> int:
        sop_class = event.request.AffectedSOPClassUID
        assert sop_class is not None
        return STATUS_BY_CLASS[sop_class]

    ae = AE(ae_title="STORESCP")
    ae.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        yield port, server
    finally:
        server.shutdown()


def test_failure_statuses_are_classified_per_instance(
    status_scp: tuple[int, ThreadedAssociationServer],
) -> None:
    port, server = status_scp
    files = [bundled_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")]

    async def run() -> tuple[list[Outcome], int]:
        sender = DimseSender("pacs", _model(port, idle_timeout=0.2), calling_ae="DICOMGATE")
        try:
            outcomes = await sender.send([delivery_of(f, n) for n, f in enumerate(files)])
            assert len(server.active_associations) == 1  # kept open for reuse
            await asyncio.sleep(1.0)  # past idle_timeout: released
            return outcomes, len(server.active_associations)
        finally:
            await sender.close()

    outcomes, still_open = asyncio.run(run())
    ct, mr, plan = outcomes
    assert (ct.delivered, ct.retryable) == (False, True) and "0xA700" in ct.error
    assert (mr.delivered, mr.retryable) == (False, False) and "0xC000" in mr.error
    assert plan.delivered and "0xB000" in plan.warning
    assert still_open == 0
