"""A load balancer's TCP health check on the DICOM TLS port (connect, then close without a
byte) is counted and logged at DEBUG, not audited as a refused handshake; a client that
sends bytes and fails the handshake (DCMTK ``echoscu`` without ``+tls``, which sends a
plain A-ASSOCIATE-RQ) still is, and so is one that connects and then says nothing."""

from __future__ import annotations

import socket
import struct
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import GatewayProcess, needs_dcmtk, wait_until
from tests.integration.test_dimse_security import (
    ClientCa,
    audit,
    dcmtk,
    rejected_codes,
    tls_config,
    tls_failures,
    tls_port,
)

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]


@pytest.fixture
def pki(tmp_path: Path) -> ClientCa:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = ClientCa(folder)
    ca.issue("dicomgate", folder / "server.crt", folder / "server.key")
    return ca


def probes(gw: GatewayProcess) -> float:
    with urllib.request.urlopen(gw.url("/metrics"), timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dicomgate_dimse_tls_probes_total":
                return float(sample.value)
    raise AssertionError("dicomgate_dimse_tls_probes_total is not exposed")


def health_check(port: int, *, reset: bool = False) -> None:
    """What HAProxy's ``check`` (mode tcp) does: connect, close, send nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if reset:  # some balancers end with a RST instead of a FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_tcp_health_checks_are_counted_not_audited(gateway: Gateway, pki: ClientCa) -> None:
    gw = gateway({"dimse": {"tls": tls_config(pki)}, "logging": {"level": "DEBUG"}})
    port = tls_port(gw)
    for _ in range(5):
        health_check(port)
    for _ in range(2):
        health_check(port, reset=True)
    wait_until(lambda: probes(gw) == 7, 10, "7 health checks counted")
    assert gw.log_count("dimse.tls_probe") == 7  # DEBUG lines (the level is DEBUG here)
    assert gw.log_count("association.rejected") == 0
    assert rejected_codes(gw) == []
    assert tls_failures(gw) == 0

    # Bytes that are not a ClientHello: DCMTK echoscu speaking plain DICOM to the TLS port.
    plain = dcmtk("echoscu", gw)
    assert plain.returncode != 0, plain.stdout
    wait_until(lambda: len(rejected_codes(gw)) == 1, 10, "the failed handshake audited")
    (row,) = audit(gw, event="association.rejected")
    assert row["detail"]["code"] == "tls_handshake_failed" and row["source_ip"] == "127.0.0.1"
    assert row["detail"]["tls_error"]
    assert tls_failures(gw) == 1
    assert probes(gw) == 7

    # After all that, a real DICOM TLS client is served.
    ok = dcmtk("echoscu", gw, "+tla", "+cf", str(pki.path))
    assert ok.returncode == 0, ok.stdout


def test_a_silent_connection_is_still_a_refused_handshake(gateway: Gateway, pki: ClientCa) -> None:
    """Connected and silent until ``acse_timeout``: a half-open client, audited ``timeout``
    (only a connection that ends before any byte is a health check). At INFO level the
    health checks leave no log line at all."""
    gw = gateway({"dimse": {"tls": tls_config(pki), "acse_timeout": 1}})
    health_check(tls_port(gw))
    with socket.create_connection(("127.0.0.1", tls_port(gw)), timeout=10) as silent:
        assert silent.recv(1) == b""  # the gateway closes it after acse_timeout
    wait_until(lambda: len(rejected_codes(gw)) == 1, 10, "the silent client audited")
    (row,) = audit(gw, event="association.rejected")
    assert row["detail"]["tls_error"] == "timeout"
    wait_until(lambda: probes(gw) == 1, 10, "the health check counted")
    assert gw.log_count("dimse.tls_probe") == 0
