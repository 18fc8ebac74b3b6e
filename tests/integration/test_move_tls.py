"""C-MOVE sub-operations over DICOM TLS (PS3.15 Annex B) to a ``dimse.move_destinations``
entry with ``tls``: DCMTK ``movescu`` asks, a DCMTK ``storescp +tls`` (mutual TLS) receives.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from tests.conftest import dcmtk_env, free_port, needs_dcmtk
from tests.integration.test_dimse_security import ClientCa
from tests.integration.test_qr_scp import (
    STUDY_ROOT,
    UID_ROOT,
    assert_serving,
    movescu,
    start_gateway,
    write_corpus,
)

pytestmark = [pytest.mark.timeout(180), needs_dcmtk]

STUDY = UID_ROOT + "1"  # 4 instances in the Q/R corpus


class TlsStoreScp:
    """DCMTK ``storescp +tls`` on a free port: our CA's server certificate, and it requires a
    client certificate from the same CA (DCMTK's default ``--require-peer-cert``)."""

    def __init__(self, folder: Path, ca: ClientCa) -> None:
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "storescp",
                "--output-directory",
                str(folder),
                "-aet",
                "SECUREWS",
                "+tls",
                str(ca.folder / "storescp.key"),
                str(ca.folder / "storescp.crt"),
                "+cf",
                str(ca.path),
                str(self.port),
            ],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("storescp +tls did not start")

    def received(self) -> set[str]:
        return {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in self.folder.iterdir()
            if p.is_file()
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def pki(tmp_path: Path) -> ClientCa:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = ClientCa(folder)
    ca.issue("storescp", folder / "storescp.crt", folder / "storescp.key")
    ca.issue_client("dicomgate", folder)
    return ca


@pytest.fixture
def scp(tmp_path: Path, pki: ClientCa) -> Iterator[TlsStoreScp]:
    peer = TlsStoreScp(tmp_path / "received", pki)
    yield peer
    peer.stop()


def test_move_to_a_tls_move_destination(tmp_path: Path, pki: ClientCa, scp: TlsStoreScp) -> None:
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    wrong_ca = ClientCa(stranger).path  # a CA that did not sign storescp's certificate
    client = {"cert": str(pki.folder / "dicomgate.crt"), "key": str(pki.folder / "dicomgate.key")}
    where = {"host": "127.0.0.1", "port": scp.port}
    gw = start_gateway(
        tmp_path / "gw",
        {
            "move_destinations": {
                "SECUREWS": {**where, "tls": {"ca": str(pki.path), **client}},
                "WRONGCA": {**where, "tls": {"ca": str(wrong_ca), **client}},
                "PLAINWS": where,  # plain DICOM to a TLS port: no association either
            },
            "move_timeout": 10,
        },
    )
    try:
        sent = gw.storescu(write_corpus(tmp_path / "corpus"))
        assert sent.returncode == 0, sent.stdout
        gw.close_index()
        study = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY}
        expected = {f"{UID_ROOT}1.1.{i}" for i in (1, 2, 3)} | {f"{UID_ROOT}1.2.1"}

        # The peer's certificate is not signed by the configured CA: the handshake fails,
        # every sub-operation fails (PS3.4 C.4.2.1.5: 0xA702, counts 0 completed / 4
        # failed), nothing arrives.
        for destination in ("WRONGCA", "PLAINWS"):
            refused = movescu(gw, STUDY_ROOT, study, destination)
            assert refused.final == 0xA702, refused.output[-2000:]
            assert refused.counts()[-1] == (-1, 0, 4, 0), refused.output[-2000:]
            assert scp.received() == set()
            assert_serving(gw)

        moved = movescu(gw, STUDY_ROOT, study, "SECUREWS")
        assert moved.final == 0x0000, moved.output[-2000:]
        assert moved.counts()[-1] == (-1, 4, 0, 0)
        assert scp.received() == expected
        assert_serving(gw)
    finally:
        gw.close_index()
        assert gw.terminate() == 0, gw.log_tail()
