"""DIMSE security end to end: DICOM TLS (PS3.15 Annex B) with DCMTK, mutual TLS, certificate
reload, the IP allow-list, AE-to-host binding, and abuse while a legitimate sender is served.

Certificates are generated here with ``cryptography``; DCMTK's ``echoscu``/``storescu`` are
the TLS peers (Debian builds them with OpenSSL). Python ``ssl`` sockets stand in where a
test needs a TLS version or a source address DCMTK cannot be told to use.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import (
    DICOMGATE,
    Corpus,
    GatewayProcess,
    dcmtk_env,
    free_port,
    needs_dcmtk,
    wait_until,
)
from tests.integration.test_dimse_bad_input import (
    IMPLICIT_LE,
    VERIFICATION,
    associate_rq,
    release_rq,
)
from tests.integration.test_http_security import Ca

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]
SECOND_LOOPBACK = "127.0.0.2"
ECHO_CONTEXT = [(1, VERIFICATION, [IMPLICIT_LE])]


# -- certificates -----------------------------------------------------------------------


class ClientCa(Ca):
    """:class:`Ca` that also issues client certificates, valid or expired."""

    def issue_client(self, name: str, folder: Path, *, expired: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start = now - datetime.timedelta(days=3 if expired else 0, minutes=5)
        end = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=1)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> ClientCa:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = ClientCa(folder)
    ca.issue("dicomgate", folder / "server.crt", folder / "server.key")
    return ca


def tls_config(ca: Ca, **extra: Any) -> dict[str, Any]:
    return {
        "port": free_port(),
        "cert": str(ca.folder / "server.crt"),
        "key": str(ca.folder / "server.key"),
        "ca": str(ca.path),
        **extra,
    }


def tls_port(gw: GatewayProcess) -> int:
    return int(gw.config["dimse"]["tls"]["port"])


def dcmtk(tool: str, gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``echoscu``/``storescu`` against the TLS port; ARGS before host and port."""
    *options, files = (*args, "") if tool == "echoscu" else args
    command = [tool, "-to", "10", "-aec", gw.ae_title, *options, "127.0.0.1", str(tls_port(gw))]
    if files:
        command += files.split("\0")
    return subprocess.run(
        command,
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )


def audit(gw: GatewayProcess, **filters: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"limit": "1000", **filters})
    status, body = gw.http_get(f"/api/audit?{query}", timeout=10)
    assert status == 200, body
    events: list[dict[str, Any]] = body["events"]
    return events


def tls_failures(gw: GatewayProcess) -> float:
    with urllib.request.urlopen(gw.url("/metrics"), timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dicomgate_auth_failures_total" and sample.labels == {
                "kind": "dimse_tls"
            }:
                return float(sample.value)
    return 0.0


def rejected_codes(gw: GatewayProcess) -> list[str]:
    return [e["detail"].get("code", "") for e in audit(gw, event="association.rejected")]


# -- a raw peer that can bind its source address or speak TLS ---------------------------------


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    pdu_type, _, length = struct.unpack(">BBI", exactly(6))
    return pdu_type, exactly(length)


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def associate(sock: socket.socket, called: str, calling: str = "RAWPEER") -> tuple[int, bytes]:
    sock.sendall(associate_rq(called, calling, ECHO_CONTEXT))
    return read_pdu(sock)


def closed_without_answer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- DICOM TLS ------------------------------------------------------------------------------


def test_tls_with_dcmtk_and_mutual_tls(
    gateway: Gateway, pki: ClientCa, corpus: Corpus, tmp_path: Path
) -> None:
    gw = gateway({"dimse": {"tls": tls_config(pki, require_client_cert=True)}})
    cert, key = pki.issue_client("modality", pki.folder)
    old_cert, old_key = pki.issue_client("expired", pki.folder, expired=True)
    stranger = ClientCa(tmp_path)  # a CA the gateway does not trust
    other_cert, other_key = stranger.issue_client("stranger", tmp_path)
    trust = ("+cf", str(pki.path))

    ok = dcmtk("echoscu", gw, "+tls", str(key), str(cert), *trust)
    assert ok.returncode == 0, ok.stdout
    files = corpus.mr("tls", 3, seed=901)
    stored = dcmtk("storescu", gw, "+tls", str(key), str(cert), *trust, "\0".join(map(str, files)))
    assert stored.returncode == 0, stored.stdout
    wait_until(lambda: gw.index.count_instances() == 3, 10, "3 instances over TLS")

    # Refused in the handshake: no certificate, an expired one, one from another CA.
    for args in (
        ("+tla",),
        ("+tls", str(old_key), str(old_cert)),
        ("+tls", str(other_key), str(other_cert)),
    ):
        refused = dcmtk("echoscu", gw, *args, *trust)
        assert refused.returncode != 0, (args, refused.stdout)
    # The gateway's certificate is checked by DCMTK too: without the CA it refuses us.
    untrusting = dcmtk("echoscu", gw, "+tls", str(key), str(cert))
    assert untrusting.returncode != 0

    accepted = audit(gw, event="association.accepted")
    assert len(accepted) == 2 and {e["actor"] for e in accepted} == {"ECHOSCU", "STORESCU"}
    # Every refused handshake left an audit row (with the peer, no certificate detail), a
    # log line and a metric increment.
    wait_until(lambda: len(rejected_codes(gw)) == 4, 10, "4 rejected handshakes audited")
    rejected = audit(gw, event="association.rejected")
    assert {e["detail"]["code"] for e in rejected} == {"tls_handshake_failed"}
    assert {e["source_ip"] for e in rejected} == {"127.0.0.1"}
    assert {e["outcome"] for e in rejected} == {"failure"}
    errors = sorted(e["detail"]["tls_error"] for e in rejected)
    assert errors == sorted(
        [
            "no_client_certificate",
            "certificate_expired",
            "unknown_ca",
            "client_refused_our_certificate",
        ]
    ), errors
    assert gw.log_count("association.rejected") == 4
    assert tls_failures(gw) == 4
    # The plain listener is still there (tls.plain defaults to true).
    assert gw.echoscu().returncode == 0


def _tls_client(ca: Ca, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ca.client_context()
    if maximum is not None:
        context.maximum_version = maximum
    return context


def served_serial(gw: GatewayProcess, ca: Ca) -> int:
    with (
        connect(tls_port(gw)) as raw,
        _tls_client(ca).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_tls_only_reload_and_version(gateway: Gateway, pki: ClientCa) -> None:
    config = tls_config(pki, plain=False, min_version="1.3", check_interval=0)
    config.pop("ca")
    gw = gateway({"dimse": {"tls": config}})
    with pytest.raises(OSError):  # plain: false -> nothing listens on dimse.port
        connect(gw.dimse_port, timeout=2).close()

    # TLS 1.2 is refused when min_version is 1.3.
    with connect(tls_port(gw)) as raw, pytest.raises(ssl.SSLError):
        _tls_client(pki, ssl.TLSVersion.TLSv1_2).wrap_socket(raw, server_hostname="127.0.0.1")

    first = served_serial(gw, pki)
    # An association opened before the reload keeps working after it.
    raw = connect(tls_port(gw))
    with _tls_client(pki).wrap_socket(raw, server_hostname="127.0.0.1") as open_assoc:
        assert associate(open_assoc, gw.ae_title)[0] == 0x02
        second = pki.issue("dicomgate", pki.folder / "server.crt", pki.folder / "server.key")
        os.kill(gw.pid, signal.SIGHUP)
        gw.wait_log("tls.reloaded")
        assert served_serial(gw, pki) == second != first
        open_assoc.sendall(release_rq())
        assert read_pdu(open_assoc)[0] == 0x06  # A-RELEASE-RP on the old certificate

    # A broken renewal is refused; the current certificate stays in use.
    (pki.folder / "server.key").write_text("not a key")
    os.kill(gw.pid, signal.SIGHUP)
    gw.wait_log("tls.reload_failed")
    assert served_serial(gw, pki) == second


def _client_with_cert(ca: Ca, cert: Path, key: Path) -> ssl.SSLContext:
    context = ca.client_context()
    context.load_cert_chain(str(cert), str(key))
    return context


def test_tls_reload_removes_a_ca(gateway: Gateway, pki: ClientCa, tmp_path: Path) -> None:
    gw = gateway({"dimse": {"tls": tls_config(pki, require_client_cert=True, check_interval=0)}})
    cert, key = pki.issue_client("modality", pki.folder)
    ca_a = tmp_path / "ca-a.pem"  # DCMTK checks the server's certificate (CA-A) with it
    ca_a.write_bytes(pki.path.read_bytes())
    trust = ("+cf", str(ca_a))
    assert dcmtk("echoscu", gw, "+tls", str(key), str(cert), *trust).returncode == 0

    # An association opened with the CA-A certificate before the reload outlives it.
    raw = connect(tls_port(gw))
    with _client_with_cert(pki, cert, key).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert associate(tls, gw.ae_title)[0] == 0x02
        folder_b = tmp_path / "ca-b"
        folder_b.mkdir()
        ca_b = ClientCa(folder_b)
        new_cert, new_key = ca_b.issue_client("newmodality", folder_b)
        pki.path.write_bytes(ca_b.path.read_bytes())  # dimse.tls.ca now holds CA-B only
        os.kill(gw.pid, signal.SIGHUP)
        gw.wait_log("tls.reloaded")
        tls.sendall(release_rq())
        assert read_pdu(tls)[0] == 0x06
    wait_until(lambda: bool(audit(gw, event="tls.reloaded")), 10, "tls.reloaded audited")
    [reloaded] = audit(gw, event="tls.reloaded")
    assert (reloaded["object"], reloaded["outcome"]) == ("dimse.tls", "success")
    assert reloaded["detail"]["trigger"] == "sighup"

    # New associations: the CA-A client is refused, the CA-B one accepted (the server's own
    # certificate is still CA-A's).
    refused = dcmtk("echoscu", gw, "+tls", str(key), str(cert), *trust)
    assert refused.returncode != 0, refused.stdout
    ok = dcmtk("echoscu", gw, "+tls", str(new_key), str(new_cert), *trust)
    assert ok.returncode == 0, ok.stdout


def test_tls_refuses_to_start_without_its_ca(gateway: Gateway, pki: ClientCa) -> None:
    config = tls_config(pki, require_client_cert=True)
    config.pop("ca")
    gw = gateway({"dimse": {"tls": config}}, start=False)
    run = subprocess.run(
        [DICOMGATE, "serve", "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode != 0
    assert "dimse.tls.ca" in run.stdout + run.stderr


# -- network access control -------------------------------------------------------------------


def test_ip_allow_list_and_ae_host_binding(gateway: Gateway) -> None:
    gw = gateway(
        {
            "dimse": {
                "allowed_ips": ["127.0.0.1/32"],
                "ae_hosts": {"FROMTWO": [SECOND_LOOPBACK], "LOCALONLY": ["localhost"]},
            }
        }
    )
    # From 127.0.0.2: the connection is closed before anything is read or answered.
    with connect(gw.dimse_port, source=SECOND_LOOPBACK) as outsider:
        with_rq = associate_rq(gw.ae_title, "ANY", ECHO_CONTEXT)
        with contextlib.suppress(OSError):
            outsider.sendall(with_rq)
        assert closed_without_answer(outsider)

    # AE-to-host binding: FROMTWO only from 127.0.0.2, so from 127.0.0.1 it is rejected.
    with connect(gw.dimse_port) as sock:
        pdu_type, body = associate(sock, gw.ae_title, "FROMTWO")
        assert pdu_type == 0x03  # A-ASSOCIATE-RJ
        assert tuple(body[1:4]) == (1, 1, 3)  # permanent, service-user, calling AE unknown
    # LOCALONLY is bound to a host name that resolves to 127.0.0.1; others are not bound.
    for calling in ("LOCALONLY", "UNBOUND"):
        with connect(gw.dimse_port) as sock:
            assert associate(sock, gw.ae_title, calling)[0] == 0x02, calling
            sock.sendall(release_rq())
            assert read_pdu(sock)[0] == 0x06

    wait_until(
        lambda: sorted(rejected_codes(gw)) == ["ae_host", "ip_not_allowed"], 10, "audit rows"
    )
    rows = {e["detail"]["code"]: e for e in audit(gw, event="association.rejected")}
    assert rows["ip_not_allowed"]["source_ip"] == SECOND_LOOPBACK
    assert rows["ae_host"]["actor"] == "FROMTWO"


def test_ae_hosts_and_allowed_ips_are_checked_at_load(gateway: Gateway) -> None:
    from dicomgate.config import DimseConfig

    with pytest.raises(ValueError, match="allowed_ips"):
        DimseConfig.model_validate({"allowed_ips": ["10.0.0.0/33"]})
    with pytest.raises(ValueError, match="ae_hosts"):
        DimseConfig.model_validate({"ae_hosts": {"CT1": ["not a host"]}})


# -- abuse ------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class LegitimateSender:
    """``storescu`` in a loop in a thread; every attempt must succeed."""

    def __init__(self, gw: GatewayProcess, files: list[Path]) -> None:
        self.gw, self.files = gw, files
        self.results: list[subprocess.CompletedProcess[str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.results.append(self.gw.storescu(self.files))

    def __enter__(self) -> LegitimateSender:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(120)


@pytest.fixture
def abused(gateway: Gateway) -> Iterator[GatewayProcess]:
    yield gateway(
        {"dimse": {"acse_timeout": 2, "max_associations_per_ae": 64, "max_associations": 128}}
    )


def rapid_associations(gw: GatewayProcess, count: int) -> int:
    accepted = 0
    for _ in range(count):
        with connect(gw.dimse_port) as sock:
            if associate(sock, gw.ae_title)[0] == 0x02:
                accepted += 1
                sock.sendall(release_rq())
                read_pdu(sock)
    return accepted


def _abuse(gw: GatewayProcess, corpus: Corpus, rapid: int, half_open: int) -> None:
    files = corpus.mr("abuse", 2, seed=902)
    baseline = rss_kib(gw.pid)
    with LegitimateSender(gw, files) as sender:
        # Garbage: not a PDU at all -> A-ABORT, connection closed.
        with connect(gw.dimse_port) as sock:
            sock.sendall(os.urandom(4096))
            assert read_pdu(sock)[0] == 0x07
        # An association, then a P-DATA-TF announcing 2 GB -> A-ABORT before the body.
        with connect(gw.dimse_port) as sock:
            assert associate(sock, gw.ae_title)[0] == 0x02
            sock.sendall(struct.pack(">BBI", 0x04, 0, 0x7FFFFFF0) + b"\0" * 64)
            assert read_pdu(sock)[0] == 0x07
        # A-ASSOCIATE-RQ announcing 2 GB -> A-ABORT.
        with connect(gw.dimse_port) as sock:
            sock.sendall(struct.pack(">BBI", 0x01, 0, 0x7FFFFFF0))
            assert read_pdu(sock)[0] == 0x07
        # Half-open: connections that send nothing or half an A-ASSOCIATE-RQ.
        rq = associate_rq(gw.ae_title, "HALFOPEN", ECHO_CONTEXT)
        idle = []
        for i in range(half_open):
            sock = connect(gw.dimse_port)
            if i % 2:
                sock.sendall(rq[: len(rq) // 2])
            idle.append(sock)
        assert rapid_associations(gw, rapid) == rapid
        # acse_timeout (2 s) ends every one of them with A-ABORT or a close.
        deadline = time.monotonic() + 15
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = sock.recv(10)
            except OSError:
                data = b""
            assert data == b"" or data[:6] == bytes([0x07, 0, 0, 0, 0, 4]), data  # A-ABORT
            sock.close()
        time.sleep(1)
    assert sender.results, "the legitimate sender never ran"
    failures = [r.stdout[-400:] for r in sender.results if r.returncode != 0]
    assert not failures, failures
    assert rss_kib(gw.pid) < baseline + 200 * 1024, "gateway memory grew by more than 200 MiB"
    assert gw.running()


def test_abuse_while_a_legitimate_sender_is_served(abused: GatewayProcess, corpus: Corpus) -> None:
    # The issue's 10^4 rapid associations: ~10 s here (2 cores), so CI runs the full count.
    _abuse(abused, corpus, rapid=10_000, half_open=1000)
