"""HTTP security of a real gateway: HTTPS and certificate reload, API keys, JWTs from a
local JWKS server, the IP allow-list, body and rate limits, slow-loris connections.

Certificates and keys are generated here with ``cryptography``; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.conftest import DICOMGATE, Corpus, GatewayProcess, free_port, wait_until
from tests.jwt_tokens import (
    AUDIENCE,
    ISSUER,
    SigningKey,
    hs256_with_public_key,
    jwks_server,
    unsigned_token,
)

pytestmark = [pytest.mark.timeout(180)]

Gateway = Callable[..., GatewayProcess]
SECOND_LOOPBACK = "127.0.0.2"


# -- certificates -----------------------------------------------------------------------


class Ca:
    """A test certificate authority that issues server certificates for 127.0.0.1."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicomgate test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.name = name
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, cert_path: Path, key_path: Path) -> int:
        """Write a server certificate and key; returns its serial number."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(_ip("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return serial

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.path))


def _ip(text: str) -> Any:
    import ipaddress

    return ipaddress.ip_address(text)


def served_serial(port: int, ca: Ca) -> int:
    """The serial number of the certificate a new TLS connection gets (verified by the CA)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ca.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def start_https(gw: GatewayProcess, ca: Ca) -> None:
    """Start a gateway whose HTTP is HTTPS (the fixture's readiness check speaks HTTP)."""

    def wait_ready(timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert gw.proc is not None
            if gw.proc.poll() is not None:
                pytest.fail("gateway exited:\n" + gw.log_tail())
            try:
                r = httpx.get(https_url(gw, "/readyz"), verify=ca.client_context(), timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        pytest.fail("gateway not ready:\n" + gw.log_tail())

    gw.wait_ready = wait_ready  # type: ignore[method-assign]
    gw.start()


def https_url(gw: GatewayProcess, path: str) -> str:
    return f"https://127.0.0.1:{gw.http_port}{path}"


# -- HTTPS ----------------------------------------------------------------------------------


def test_https_with_certificate_reload_on_sighup_and_on_change(
    gateway: Gateway, tmp_path: Path
) -> None:
    ca = Ca(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    first = ca.issue("first", cert, key)
    gw = gateway(
        {"http": {"tls": {"cert": str(cert), "key": str(key), "check_interval": 0.5}}},
        start=False,
    )
    start_https(gw, ca)
    response = httpx.get(https_url(gw, "/healthz"), verify=ca.client_context())
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert served_serial(gw.http_port, ca) == first
    with pytest.raises(httpx.ConnectError):  # the client verifies: an unknown CA fails
        httpx.get(https_url(gw, "/healthz"), verify=ssl.create_default_context())
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the HTTPS port gets nowhere
        httpx.get(gw.url("/healthz"), timeout=3)

    # An open keep-alive connection keeps working across the reload.
    client = httpx.Client(verify=ca.client_context())
    assert client.get(https_url(gw, "/healthz")).status_code == 200

    # SIGHUP: renewed files are served to new connections, without a restart. The watcher
    # would find the change too, so check that SIGHUP was the trigger.
    pid = gw.pid
    second = ca.issue("second", cert, key)
    gw.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    gw.wait_log("tls.reloaded")
    wait_until(lambda: served_serial(gw.http_port, ca) == second, 5, "the second certificate")
    assert client.get(https_url(gw, "/healthz")).status_code == 200
    client.close()

    # A half-written renewal (a key that does not match) keeps the working certificate.
    other_cert = tmp_path / "other.pem"
    ca.issue("other", other_cert, tmp_path / "other.key")
    cert.write_bytes(other_cert.read_bytes())
    gw.wait_log("tls.reload_failed")
    assert served_serial(gw.http_port, ca) == second

    # On change (check_interval 0.5 s): the next complete pair is picked up by itself.
    third = ca.issue("third", cert, key)
    wait_until(lambda: served_serial(gw.http_port, ca) == third, 10, "the third certificate")
    assert gw.pid == pid and gw.running()
    assert "trigger=sighup" in gw.log_text() and "trigger=file_changed" in gw.log_text()


def test_https_refuses_to_start_with_a_bad_key_pair(gateway: Gateway, tmp_path: Path) -> None:
    ca = Ca(tmp_path)
    ca.issue("a", tmp_path / "a.pem", tmp_path / "a.key")
    ca.issue("b", tmp_path / "b.pem", tmp_path / "b.key")
    gw = gateway(
        {"http": {"tls": {"cert": str(tmp_path / "a.pem"), "key": str(tmp_path / "b.key")}}},
        start=False,
    )
    result = subprocess.run(
        [DICOMGATE, "serve", "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert (
        f"cannot start: http.tls.key: cannot load {tmp_path / 'b.key'}: it does not match"
        f" the certificate {tmp_path / 'a.pem'}" in result.stderr
    )


def check_config(gw: GatewayProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DICOMGATE, "check-config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_loads_the_tls_files_and_names_the_key(
    gateway: Gateway, tmp_path: Path
) -> None:
    """``check-config`` loads certificates, keys and CAs as ``serve`` does: exit 2 and one
    line naming the key and the file (ssl's own error named neither: ``cannot read None``)."""
    ca = Ca(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue("server", cert, key)
    ca.issue("other", tmp_path / "other.pem", tmp_path / "other.key")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")
    missing = tmp_path / "nowhere" / "server.key"
    http_cases: list[tuple[dict[str, Any], str]] = [
        ({"key": str(missing)}, f"http.tls.key: cannot read {missing}: No such file or directory"),
        ({"cert": str(tmp_path / "no.pem")}, f"http.tls.cert: cannot read {tmp_path / 'no.pem'}"),
        ({"key": str(tmp_path)}, f"http.tls.key: cannot read {tmp_path}: Is a directory"),
        ({"cert": str(garbage)}, f"http.tls.cert: cannot load {garbage}: not a PEM certificate"),
        ({"key": str(garbage)}, f"http.tls.key: cannot load {garbage}: not a PEM private key"),
        (
            {"key": str(tmp_path / "other.key")},
            f"http.tls.key: cannot load {tmp_path / 'other.key'}: it does not match",
        ),
        (
            {"key": str(encrypted)},
            f"http.tls.key: {encrypted} is encrypted: set http.tls.key_password_env",
        ),
        (
            {"key": str(encrypted), "key_password_env": "DICOMGATE_TEST_UNSET_PASSWORD"},
            "http.tls.key_password_env: environment variable DICOMGATE_TEST_UNSET_PASSWORD",
        ),
        ({"ciphers": "NONSENSE"}, "http.tls.ciphers: no cipher matches 'NONSENSE'"),
    ]
    dimse_cases: list[tuple[dict[str, Any], str]] = [
        (
            {"ca": str(tmp_path / "no-ca.pem"), "require_client_cert": True},
            f"dimse.tls.ca: cannot read {tmp_path / 'no-ca.pem'}: No such file or directory",
        ),
        ({"ca": str(garbage)}, f"dimse.tls.ca: cannot load {garbage}: no PEM CA certificate"),
        ({"require_client_cert": True}, "dimse.tls.ca: needed with require_client_cert"),
        ({"ciphers": "NONSENSE"}, "dimse.tls.ciphers: no cipher matches 'NONSENSE'"),
        ({"key": str(missing)}, f"dimse.tls.key: cannot read {missing}"),
    ]
    pair = {"cert": str(cert), "key": str(key)}
    cases = [({"http": {"tls": {**pair, **case}}}, want) for case, want in http_cases] + [
        ({"dimse": {"tls": {"port": free_port(), **pair, **case}}}, want)
        for case, want in dimse_cases
    ]
    for overrides, want in cases:
        gw = gateway(overrides, start=False)
        result = check_config(gw)
        assert result.returncode == 2, (overrides, result.stdout, result.stderr)
        assert result.stderr.startswith("dicomgate: config error: "), result.stderr
        assert want in result.stderr, (want, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    # A good pair passes; serve says the same as check-config about a missing key.
    good = gateway(
        {"http": {"tls": pair}, "dimse": {"tls": {"port": free_port(), **pair}}}, start=False
    )
    assert check_config(good).returncode == 0, check_config(good).stderr
    bad = gateway({"http": {"tls": {**pair, "key": str(missing)}}}, start=False)
    served = subprocess.run(
        [DICOMGATE, "serve", "--config", str(bad.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert served.returncode == 1
    assert f"cannot start: http.tls.key: cannot read {missing}: No such file" in served.stderr


def openssl_handshake(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client`` to 127.0.0.1:port with ``args``; returncode 0 when it connected."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_https_cipher_policy_is_bcp195_and_hsts_is_optional(
    gateway: Gateway, tmp_path: Path
) -> None:
    """HTTPS takes the DICOM TLS cipher policy (BCP 195, PS3.15 B.9): ECDHE with AEAD only
    in TLS 1.2, no CBC suite; ``http.tls.ciphers`` narrows it; HSTS only when asked."""
    ca = Ca(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue("server", cert, key)
    gw = gateway({"http": {"tls": {"cert": str(cert), "key": str(key)}}}, start=False)
    start_https(gw, ca)
    tls12 = ("-tls1_2", "-cipher")
    for cbc in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA"):
        refused = openssl_handshake(gw.http_port, *tls12, cbc)
        assert refused.returncode != 0, (cbc, refused.stdout[-400:])
    for aead in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        accepted = openssl_handshake(gw.http_port, *tls12, aead)
        assert accepted.returncode == 0, (aead, accepted.stderr[-400:])
        assert f"Cipher is {aead}" in accepted.stdout
    assert openssl_handshake(gw.http_port, "-tls1_3").returncode == 0
    response = httpx.get(https_url(gw, "/healthz"), verify=ca.client_context())
    assert response.status_code == 200
    assert "strict-transport-security" not in response.headers  # off by default
    gw.terminate()

    narrow = gateway(
        {
            "http": {
                "tls": {
                    "cert": str(cert),
                    "key": str(key),
                    "ciphers": "ECDHE-ECDSA-AES256-GCM-SHA384",
                    "hsts_max_age": 31536000,
                }
            }
        },
        start=False,
    )
    start_https(narrow, ca)
    assert openssl_handshake(narrow.http_port, *tls12, "ECDHE-ECDSA-AES128-GCM-SHA256").returncode
    assert (
        openssl_handshake(narrow.http_port, *tls12, "ECDHE-ECDSA-AES256-GCM-SHA384").returncode == 0
    )
    for path in ("/healthz", "/api/queue"):
        answer = httpx.get(https_url(narrow, path), verify=ca.client_context())
        assert answer.headers["strict-transport-security"] == "max-age=31536000", path


def test_https_handshakes_are_timed_and_counted_per_client(
    gateway: Gateway, tmp_path: Path
) -> None:
    """Connections that never finish the TLS handshake count against
    ``max_connections_per_client`` from their accept and are closed after
    ``header_timeout`` (asyncio's own limit was 60 s, and nothing counted them)."""
    ca = Ca(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue("server", cert, key)
    gw = gateway(
        {
            "http": {
                "tls": {"cert": str(cert), "key": str(key)},
                "limits": {"header_timeout": 1.5, "max_connections_per_client": 5},
            }
        },
        start=False,
    )
    start_https(gw, ca)
    port = gw.http_port
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        time.sleep(0.3)
        # The sixth from the same address is closed at once, before any handshake.
        with socket.create_connection(("127.0.0.1", port)) as extra:
            extra.settimeout(1.0)
            with contextlib.suppress(ConnectionResetError):
                assert extra.recv(1) == b""
        # Another address is served meanwhile.
        other = httpx.Client(
            transport=httpx.HTTPTransport(
                local_address=SECOND_LOOPBACK, verify=ca.client_context()
            ),
            timeout=5,
        )
        with other:
            assert other.get(https_url(gw, "/healthz")).status_code == 200
        # The silent ones are closed after header_timeout, not after 60 s.
        started = time.monotonic()
        for sock in silent:
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
        assert time.monotonic() - started < 4
    finally:
        for sock in silent:
            sock.close()
    # Their places are free again: this address is served.
    wait_until(
        lambda: httpx.get(https_url(gw, "/healthz"), verify=ca.client_context()).is_success,
        5,
        "served again",
    )
    gw.wait_log("http.connection_refused")
    # A handshake that completes and then sends its head in time is served as before; the
    # scheme the app sees is https (RetrieveURL and the like).
    with httpx.Client(verify=ca.client_context()) as client:
        for _ in range(3):
            assert client.get(https_url(gw, "/healthz")).status_code == 200


# -- API keys --------------------------------------------------------------------------------


def new_key(name: str, scopes: str) -> tuple[str, dict[str, Any]]:
    """``dicomgate keys new``: the key (first line) and its config entry (last line)."""
    result = subprocess.run(
        [DICOMGATE, "keys", "new", "--name", name, "--scopes", scopes],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    entry = yaml.safe_load(lines[-1])[0]
    return lines[0], entry


def stow(gw: GatewayProcess, path: Path, **headers: str) -> httpx.Response:
    return httpx.post(
        gw.url("/dicomweb/studies"),
        content=path.read_bytes(),
        headers={"content-type": "application/dicom", **headers},
        timeout=30,
    )


def test_api_keys_from_the_command_line(gateway: Gateway, corpus: Corpus) -> None:
    viewer, viewer_entry = new_key("viewer", "read")
    uploader, uploader_entry = new_key("modality", "read,write")
    admin, admin_entry = new_key("ops", "admin")
    assert viewer_entry == {"name": "viewer", "sha256": viewer_entry["sha256"], "scopes": ["read"]}
    gw = gateway({"http": {"auth": {"api_keys": [viewer_entry, uploader_entry, admin_entry]}}})
    qido = gw.url("/dicomweb/studies")

    # Open paths; everything else needs a credential.
    assert httpx.get(gw.url("/healthz")).status_code == 200
    assert httpx.get(gw.url("/readyz")).status_code == 200
    for path in ("/dicomweb/studies", "/fhir/ImagingStudy", "/api/queue", "/api/docs", "/"):
        response = httpx.get(gw.url(path))
        assert response.status_code == 401, path
        assert response.json() == {"error": "authentication required"}
        assert response.headers["www-authenticate"].startswith("Bearer")

    assert httpx.get(qido, headers={"Authorization": f"Bearer {viewer}"}).status_code == 200
    assert httpx.get(qido, headers={"X-API-Key": viewer}).status_code == 200
    # Another last character (a key that ended in "A" made "wrong" the right one: a run
    # in 64 or so failed here).
    wrong_key = viewer[:-1] + ("B" if viewer.endswith("A") else "A")
    wrong = httpx.get(qido, headers={"X-API-Key": wrong_key})
    assert wrong.status_code == 401 and wrong.json() == {"error": "authentication required"}
    # HTTP Basic: the key is the password, the user name is not checked (for clients that
    # send only Basic: Orthanc's DICOMweb client, a viewer's requestOptions.auth).
    assert httpx.get(qido, auth=("anyone", viewer)).status_code == 200
    assert httpx.get(qido, auth=("viewer", wrong_key)).status_code == 401
    not_base64 = httpx.get(qido, headers={"Authorization": "Basic %%%"})
    assert not_base64.status_code == 401 and not_base64.json() == {
        "error": "authentication required"
    }

    mr = corpus.mr("http-security", 2, seed=71)
    read_only = stow(gw, mr[0], authorization=f"Bearer {viewer}")
    assert read_only.status_code == 403 and read_only.json() == {"error": "forbidden"}
    assert httpx.get(qido, headers={"X-API-Key": viewer}).json() == []  # nothing stored
    assert stow(gw, mr[0], **{"x-api-key": uploader}).status_code == 200
    assert len(httpx.get(qido, headers={"X-API-Key": viewer}).json()) == 1

    queue = gw.url("/api/queue")
    assert httpx.get(queue, headers={"X-API-Key": viewer}).status_code == 403
    assert httpx.get(queue, headers={"X-API-Key": uploader}).status_code == 403
    assert httpx.get(queue, headers={"X-API-Key": admin}).status_code == 200
    assert httpx.get(qido, headers={"X-API-Key": admin}).status_code == 403  # admin is not read

    # Every denial has a log line with the category and the client, never the key.
    gw.wait_log("auth.denied", 5 + 3 + 1)
    log = gw.log_text()
    assert "reason=missing_credentials" in log and "reason=permission_missing" in log
    assert "reason=malformed_basic" in log
    assert "client_ip=127.0.0.1" in log and "actor=viewer" in log
    for secret in (viewer, uploader, admin):
        assert secret not in log

    # ... and an audit row with the path (never the query string) and the status. The
    # audit trail itself is admin only.
    audit = gw.url("/api/audit")
    assert httpx.get(audit, headers={"X-API-Key": viewer}).status_code == 403
    hidden = httpx.get(
        gw.url("/dicomweb/studies/1.2.3.4/series"), params={"PatientName": "SECRET^NAME"}
    )
    assert hidden.status_code == 401
    gw.wait_log("auth.denied", 14)
    assert "1.2.3.4" not in gw.log_text()  # the log line has the area only

    def denied() -> list[dict[str, Any]]:
        query = {"event": "auth.denied", "limit": "100"}
        response = httpx.get(audit, params=query, headers={"X-API-Key": admin}, timeout=10)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["events"]
        return rows

    wait_until(lambda: len(denied()) == 14, 10, "14 auth.denied audit rows")
    rows = denied()
    assert all(row["outcome"] == "failure" and row["source_ip"] == "127.0.0.1" for row in rows)
    by_path = {(row["object"], row["detail"]["status"], row["detail"]["reason"]) for row in rows}
    assert ("/dicomweb/studies/1.2.3.4/series", 401, "missing_credentials") in by_path
    assert ("/api/audit", 403, "permission_missing") in by_path
    assert ("/api/queue", 403, "permission_missing") in by_path
    assert ("/fhir/ImagingStudy", 401, "missing_credentials") in by_path
    assert not any("SECRET" in str(row) for row in rows)
    viewer_rows = [row for row in rows if row["actor"] == "viewer"]
    assert {row["detail"]["permission"] for row in viewer_rows} == {"write", "admin"}


# -- JWT / OIDC ------------------------------------------------------------------------------


@pytest.fixture
def jwt_keys() -> tuple[SigningKey, SigningKey]:
    return SigningKey.rsa("key-1"), SigningKey.rsa("key-2")


def test_jwt_table_and_key_rotation(
    gateway: Gateway, jwt_keys: tuple[SigningKey, SigningKey]
) -> None:
    key1, key2 = jwt_keys
    with jwks_server([key1]) as idp:
        gw = gateway(
            {
                "http": {
                    "auth": {
                        "jwt": {
                            "jwks_url": idp.url,
                            "issuer": ISSUER,
                            "audience": AUDIENCE,
                            "jwks_min_refresh_seconds": 0.5,
                            "permissions": {"read": ["dicom.read"], "write": ["dicom.write"]},
                        }
                    }
                }
            }
        )
        qido = gw.url("/dicomweb/studies")

        def status(token: str, url: str = qido) -> int:
            return httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code

        now = int(time.time())
        table = {
            "valid": key1.token(scope="openid dicom.read"),
            "expired": key1.token(scope="dicom.read", exp=now - 300, iat=now - 900, nbf=now - 900),
            "wrong audience": key1.token(scope="dicom.read", aud="another-service"),
            "wrong issuer": key1.token(scope="dicom.read", iss="https://evil.test"),
            "unknown key": key2.token(scope="dicom.read"),
            "alg none": unsigned_token(scope="dicom.read"),
            "HS256 with the public key": hs256_with_public_key(key1, scope="dicom.read"),
        }
        results = {name: status(token) for name, token in table.items()}
        assert results == {name: 200 if name == "valid" else 401 for name in table}

        # Permissions come from the scopes: read only is not enough to store or administer.
        reader = table["valid"]
        assert status(reader, gw.url("/api/queue")) == 403
        post = httpx.post(
            qido,
            headers={"Authorization": f"Bearer {reader}", "content-type": "application/dicom"},
            content=b"",
        )
        assert post.status_code == 403

        # Rotation: the provider publishes key-2; a token naming it works at once.
        fetches = idp.fetches
        idp.keys = [key1, key2]
        time.sleep(0.6)  # past jwks_min_refresh_seconds since the "unknown key" refresh
        assert status(key2.token(scope="dicom.read")) == 200
        assert idp.fetches == fetches + 1
        assert status(key1.token(scope="dicom.read")) == 200

        log = gw.log_text()
        for reason in ("token_expired", "token_wrong_audience", "token_wrong_issuer"):
            assert f"reason={reason}" in log
        assert "reason=token_unknown_key" in log
        assert log.count("reason=token_algorithm_not_allowed") == 2
        assert table["valid"] not in log


@pytest.mark.parametrize(
    "garbage",
    [None, b'{"keys": ' + b"[" * 100_000, b'{"keys": [' + b" " * (2 << 20) + b"]}"],
    ids=["503", "nested too deep", "larger than 1 MiB"],
)
def test_jwt_provider_down_is_503_not_401(gateway: Gateway, garbage: bytes | None) -> None:
    key = SigningKey.rsa("k")
    with jwks_server([key]) as idp:
        idp.down = garbage is None
        idp.garbage = garbage
        gw = gateway(
            {
                "http": {
                    "auth": {"jwt": {"jwks_url": idp.url, "issuer": ISSUER, "audience": AUDIENCE}}
                }
            }
        )
        response = httpx.get(
            gw.url("/dicomweb/studies"),
            headers={"Authorization": f"Bearer {key.token()}"},
            timeout=30,
        )
        assert response.status_code == 503
        assert response.json() == {"error": "authentication is unavailable, try again later"}
        assert "retry-after" in response.headers
        gw.wait_log("auth.jwks_unavailable")


# -- network access control and limits -------------------------------------------------------


def from_second_loopback() -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=SECOND_LOOPBACK), timeout=5)


def test_ip_allow_list(gateway: Gateway) -> None:
    gw = gateway({"http": {"allowed_ips": ["127.0.0.1/32", "10.0.0.0/8"]}})
    assert httpx.get(gw.url("/dicomweb/studies")).status_code == 200
    with from_second_loopback() as other:
        for path in ("/healthz", "/dicomweb/studies", "/api/queue"):
            response = other.get(gw.url(path))
            assert response.status_code == 403, path
            assert response.json() == {"error": "forbidden"}
        # A forged X-Forwarded-For is ignored: no proxy is trusted.
        forged = other.get(gw.url("/healthz"), headers={"X-Forwarded-For": "127.0.0.1"})
        assert forged.status_code == 403
    gw.wait_log("auth.denied", 4)
    assert "reason=ip_not_allowed" in gw.log_text()
    assert f"client_ip={SECOND_LOOPBACK}" in gw.log_text()


def test_admin_api_is_local_only_without_auth(gateway: Gateway) -> None:
    gw = gateway()  # no http.auth: open, except /api for non-local clients
    with from_second_loopback() as other:
        for path in ("/api/audit", "/api/queue", "/api"):
            response = other.get(gw.url(path))
            assert response.status_code == 403, path
            assert "configure http.auth" in response.json()["error"]
        assert other.post(gw.url("/api/queue/retry-dead")).status_code == 403
        assert other.get(gw.url("/dicomweb/studies")).status_code == 200
        assert other.get(gw.url("/healthz")).status_code == 200
    assert httpx.get(gw.url("/api/queue")).status_code == 200  # from 127.0.0.1
    gw.wait_log("auth.denied", 4)

    def denied() -> list[dict[str, Any]]:
        response = httpx.get(gw.url("/api/audit"), params={"event": "auth.denied"}, timeout=10)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["events"]
        return rows

    wait_until(lambda: len(denied()) == 4, 10, "4 auth.denied rows")
    assert {(r["object"], r["source_ip"]) for r in denied()} == {
        ("/api/audit", SECOND_LOOPBACK),
        ("/api/queue", SECOND_LOOPBACK),
        ("/api", SECOND_LOOPBACK),
        ("/api/queue/retry-dead", SECOND_LOOPBACK),
    }
    assert {r["detail"]["reason"] for r in denied()} == {"admin_needs_auth"}


def test_trusted_proxy_forwards_the_client_address(gateway: Gateway) -> None:
    gw = gateway(
        {
            "http": {
                "allowed_ips": ["10.0.0.0/8", "127.0.0.1/32"],
                "trusted_proxies": [SECOND_LOOPBACK],
            }
        }
    )
    with from_second_loopback() as proxy:
        assert proxy.get(gw.url("/healthz"), headers={"X-Forwarded-For": "10.1.2.3"}).is_success
        outside = proxy.get(gw.url("/healthz"), headers={"X-Forwarded-For": "8.8.8.8"})
        assert outside.status_code == 403
        assert proxy.get(gw.url("/healthz")).status_code == 403  # the proxy itself: not listed
    # Not a proxy: its forwarded header is not believed (the peer 127.0.0.1 counts).
    assert httpx.get(gw.url("/healthz"), headers={"X-Forwarded-For": "8.8.8.8"}).is_success
    assert "client_ip=8.8.8.8" in gw.log_text()


def test_oversized_bodies_are_refused_while_others_are_served(
    gateway: Gateway, corpus: Corpus
) -> None:
    gw = gateway({"http": {"limits": {"max_stow_bytes": 1024 * 1024, "max_body_bytes": 1024}}})
    qido = gw.url("/dicomweb/studies")
    served: list[int] = []
    stop = threading.Event()

    def legitimate_client() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                served.append(client.get(qido).status_code)

    thread = threading.Thread(target=legitimate_client)
    thread.start()
    try:
        # Declared too large: refused before a byte of the body is read.
        declared = httpx.post(
            qido,
            content=b"x" * (1024 * 1024 + 1),
            headers={"content-type": "application/dicom"},
        )
        assert declared.status_code == 413
        assert declared.json() == {"error": "request body too large"}

        # Chunked, no length: cut off once past the limit, not read to the end. It starts
        # as a real instance, so STOW-RS reads on (a non-DICOM start is refused at once).
        sent = 0
        head = corpus.mr("http-security-big", 1, seed=73)[0].read_bytes()

        def endless() -> Iterator[bytes]:
            nonlocal sent
            sent += len(head)
            yield head
            chunk = b"\0" * 65536
            while sent < 512 * 1024 * 1024:
                sent += len(chunk)
                yield chunk

        try:
            chunked = httpx.post(
                qido, content=endless(), headers={"content-type": "application/dicom"}, timeout=30
            )
            assert chunked.status_code == 413
        except httpx.TransportError:
            pass  # the gateway closed the connection while the client was still writing
        assert sent < 64 * 1024 * 1024

        small = httpx.post(gw.url("/api/queue/retry-dead"), content=b"y" * 2048)
        assert small.status_code == 413
    finally:
        time.sleep(0.3)
        stop.set()
        thread.join(10)
    assert served and set(served) == {200}, served[-5:]
    assert httpx.get(qido).json() == []  # nothing from the refused uploads was stored
    mr = corpus.mr("http-security-small", 1, seed=72)
    assert stow(gw, mr[0]).status_code == 200  # a normal upload still works
    gw.wait_log("http.body_too_large", 2)


def test_rate_limit_per_client(gateway: Gateway) -> None:
    gw = gateway({"http": {"limits": {"requests_per_second": 1, "request_burst": 3}}})
    qido = gw.url("/dicomweb/studies")
    time.sleep(3.1)  # the readiness checks of the start-up spent the budget of 127.0.0.1
    with httpx.Client() as client:
        codes = [client.get(qido).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
        limited = client.get(qido)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json() == {"error": "too many requests"}
    with from_second_loopback() as other:  # another client has its own budget
        assert other.get(qido).status_code == 200
    time.sleep(1.1)
    assert httpx.get(qido).status_code == 200
    gw.wait_log("http.rate_limited")


def test_a_request_head_over_the_limit_is_refused_even_in_one_read(gateway: Gateway) -> None:
    """``max_header_bytes`` (64 KiB) holds when the whole head arrives in one read: 431 and
    the connection closed (the head used to be parsed and served before it was counted)."""
    gw = gateway()

    def send_head(header_bytes: int) -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", gw.http_port)) as sock:
            sock.settimeout(10)
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * header_bytes
            sock.sendall(head + b"\r\n\r\n")
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    answer += chunk
                    if header_bytes < 64 * 1024:
                        break  # a keep-alive answer: the connection stays open
            status, _, rest = answer.partition(b"\r\n")
            return status, rest

    status, _ = send_head(60_000)
    assert status == b"HTTP/1.1 200 OK"
    for size in (70_000, 1_000_000):
        status, rest = send_head(size)  # read to the end: the server closed the connection
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large", size
        assert b"connection: close" in rest.lower()
    gw.wait_log("http.head_too_large")


def test_an_unsupported_authorization_scheme_gets_a_challenge_without_error(
    gateway: Gateway,
) -> None:
    """RFC 6750 3.1: a request with an authentication method we do not support gets the
    challenge without an error code; a bad bearer token gets ``error="invalid_token"``."""
    _, entry = new_key("viewer", "read")
    gw = gateway({"http": {"auth": {"api_keys": [entry]}}})
    qido = gw.url("/dicomweb/studies")
    for scheme in ("Digest abc", "Negotiate YIIB", "Digest"):
        response = httpx.get(qido, headers={"Authorization": scheme})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="dicomgate"', scheme
    bad = httpx.get(qido, headers={"Authorization": "Bearer dgk_not_a_key"})
    assert bad.status_code == 401
    assert bad.headers["www-authenticate"] == 'Bearer realm="dicomgate", error="invalid_token"'
    assert httpx.get(qido).headers["www-authenticate"] == 'Bearer realm="dicomgate"'
    gw.wait_log("auth.denied", 5)
    assert "reason=unsupported_scheme" in gw.log_text()


def test_slow_loris_connections_are_closed(gateway: Gateway) -> None:
    gw = gateway({"http": {"limits": {"header_timeout": 1.0, "max_connections_per_client": 20}}})
    port = gw.http_port

    def drip(sock: socket.socket) -> float:
        """Send a request head one byte every 0.2 s; seconds until the server closes."""
        started = time.monotonic()
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200
        sock.settimeout(0.2)
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1024) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        return time.monotonic() - started

    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        results: list[float] = []
        threads = [threading.Thread(target=lambda s=s: results.append(drip(s))) for s in slow]
        for t in threads:
            t.start()
        # Meanwhile a normal client is served.
        assert httpx.get(gw.url("/healthz")).status_code == 200
        for t in threads:
            t.join(30)
        assert len(results) == 3 and all(0.8 < r < 5 for r in results), results
    finally:
        for s in slow:
            s.close()

    # A silent connection is closed after the timeout too.
    with socket.create_connection(("127.0.0.1", port)) as idle:
        idle.settimeout(5)
        started = time.monotonic()
        assert idle.recv(1) == b""
        assert time.monotonic() - started < 3

    # Connections per client: one more than allowed is closed at once.
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as extra:
            extra.settimeout(2)
            with contextlib.suppress(ConnectionResetError):  # closed, maybe with a reset
                assert extra.recv(1) == b""
        with from_second_loopback() as other:
            assert other.get(gw.url("/healthz")).status_code == 200
    finally:
        for s in held:
            s.close()
    wait_until(lambda: httpx.get(gw.url("/healthz")).status_code == 200, 5, "served again")
    gw.wait_log("http.header_timeout")
    gw.wait_log("http.connection_refused")
