"""A webhook destination over HTTPS to a real TLS peer whose certificate a CA made here
signed: trusted with ``verify: <the CA bundle>``, refused against the system CA store
(retried, then dead-lettered with the certificate verification named)."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import Corpus, GatewayProcess, sop_uid_of, wait_until
from tests.integration.test_http_security import Ca

pytestmark = [pytest.mark.timeout(120)]

Gateway = Callable[..., GatewayProcess]


class HttpsReceiver:
    """An HTTPS endpoint on 127.0.0.1 recording the JSON bodies POSTed to it."""

    def __init__(self, ca: Ca) -> None:
        cert, key = ca.folder / "hook.crt", ca.folder / "hook.key"
        ca.issue("ai-engine", cert, key)
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.bodies.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Handshake in the handler thread (on first read), not in accept(): a client that
        # refuses us must not stall the accepting loop.
        self.server.socket = context.wrap_socket(
            self.server.socket, server_side=True, do_handshake_on_connect=False
        )
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[HttpsReceiver]:
    folder = tmp_path / "pki"
    folder.mkdir()
    peer = HttpsReceiver(Ca(folder))
    yield peer
    peer.stop()


def _jobs(gw: GatewayProcess, destination: str) -> list[dict[str, Any]]:
    status, body = gw.http_get(f"/api/queue?destination={destination}&limit=100")
    assert status == 200, body
    jobs: list[dict[str, Any]] = body["jobs"]
    return jobs


def test_webhook_ca_bundle(
    gateway: Gateway, receiver: HttpsReceiver, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("webhook-tls", 2, seed=621)
    uids = {sop_uid_of(f) for f in files}
    gw = gateway(
        {
            "destinations": {
                "ai": {
                    "type": "webhook",
                    "url": receiver.url,
                    "verify": str(tmp_path / "pki/ca.pem"),
                },
                "ai_system_store": {"type": "webhook", "url": receiver.url},
            },
            "routes": [{"name": "to-ai", "to": ["ai", "ai_system_store"]}],
            "queue": {
                "poll_interval": 0.2,
                "retry": {"initial": 0.2, "max": 0.5, "jitter": 0.0, "max_attempts": 2},
            },
        }
    )
    assert gw.storescu(files).returncode == 0

    # Trusted through the bundle: one notification per instance, the jobs done.
    wait_until(lambda: len(receiver.bodies) == 2, 20, "two notifications over HTTPS")
    assert {b["sop_instance_uid"] for b in receiver.bodies} == uids
    wait_until(
        lambda: {j["state"] for j in _jobs(gw, "ai")} == {"done"}, 10, "the trusted jobs done"
    )

    # The same peer against the system CA store: refused in the handshake, retried, then
    # dead-lettered; the reason names the certificate verification.
    wait_until(
        lambda: [j["state"] for j in _jobs(gw, "ai_system_store")] == ["dead", "dead"],
        30,
        "the untrusted jobs dead-lettered",
    )
    for job in _jobs(gw, "ai_system_store"):
        assert job["attempts"] == 2, job
        assert "CERTIFICATE_VERIFY_FAILED" in job["last_error"], job["last_error"]
    assert len(receiver.bodies) == 2  # nothing reached the handler from the untrusted side
    assert gw.log_count("delivery.dead_lettered") >= 1
