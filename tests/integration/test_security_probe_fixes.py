"""Defects an outside security probe found, each against a real gateway: the console's admin
pages without ``http.auth``, AE titles with control characters (log forging), and the
sign-in page's error text.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Callable

import httpx
import pytest
from tests.conftest import Corpus, GatewayProcess, free_port, needs_dcmtk, wait_until

from dicomgate.security.http_auth import hash_api_key, new_api_key

pytestmark = [pytest.mark.timeout(180)]

Gateway = Callable[..., GatewayProcess]
SECOND_LOOPBACK = "127.0.0.2"


def from_second_loopback() -> httpx.Client:
    """A client on this host's 127.0.0.2: not "local" for the admin rule (a container or a
    tunnel often forwards remote clients from such an address)."""
    transport = httpx.HTTPTransport(local_address=SECOND_LOOPBACK)
    return httpx.Client(transport=transport, timeout=10, follow_redirects=False)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found is not None, html[:500]
    return found.group(1)


# -- the console's admin pages follow /api's local-only rule ----------------------------------


def test_console_admin_pages_are_local_only_without_auth(gateway: Gateway, corpus: Corpus) -> None:
    """Without ``http.auth``, queue re-drive and purge and the audit trail answer only
    127.0.0.1 and ::1, in the console as in ``/api``; the overview pages stay open."""
    gw = gateway(
        {
            "queue": {"poll_interval": 0.2, "retry": {"max_attempts": 1}},
            "destinations": {
                "pacs": {"type": "dimse", "host": "127.0.0.1", "port": free_port(), "ae_title": "P"}
            },
            "routes": [{"name": "all", "match": {}, "to": ["pacs"]}],
        }
    )
    mr = corpus.mr("probe-fixes-console", 1, seed=91)[0]
    stored = httpx.post(
        gw.url("/dicomweb/studies"),
        content=mr.read_bytes(),
        headers={"content-type": "application/dicom"},
        timeout=30,
    )
    assert stored.status_code == 200, stored.text
    wait_until(lambda: _dead(gw) == 1, 20, "the job dead-lettered (the PACS is down)")
    job_id = httpx.get(gw.url("/api/queue"), params={"state": "dead"}).json()["jobs"][0]["id"]

    with from_second_loopback() as other:
        # The read-only pages stay open (documented), and give the form token as before.
        for path in ("/ui", "/ui/studies", "/ui/routes", "/ui/api/overview"):
            assert other.get(gw.url(path)).status_code == 200, path
        token = csrf_of(other.get(gw.url("/ui/routes")).text)
        # The admin pages and their actions are refused, with the fix named.
        for path in ("/ui/queue", f"/ui/queue/{job_id}", "/ui/audit", "/ui/audit?event=x"):
            page = other.get(gw.url(path))
            assert page.status_code == 403, path
            assert page.headers["content-type"].startswith("text/html")
            assert "configure <code>http.auth</code>" in page.text
        actions = [
            (f"/ui/queue/{job_id}/retry", {"csrf": token}),
            ("/ui/queue/retry-dead", {"csrf": token, "destination": "pacs"}),
            ("/ui/queue/purge", {"csrf": token, "state": "dead", "confirm": "yes"}),
        ]
        for path, form in actions:
            assert other.post(gw.url(path), data=form).status_code == 403, path
    # Nothing was changed: the dead job is still there, not re-driven nor purged.
    assert _dead(gw) == 1
    # From the gateway's own host the console administers as before.
    with httpx.Client(base_url=gw.url(""), timeout=10) as local:
        page = local.get("/ui/queue")
        assert page.status_code == 200 and f"/ui/queue/{job_id}/retry" in page.text
        assert local.get("/ui/audit").status_code == 200
        purged = local.post(
            "/ui/queue/purge", data={"csrf": csrf_of(page.text), "state": "dead", "confirm": "yes"}
        )
        assert purged.status_code == 303
    assert _dead(gw) == 0
    gw.wait_log("auth.denied", 7)
    assert "reason=admin_needs_auth" in gw.log_text()
    assert f"client_ip={SECOND_LOOPBACK}" in gw.log_text()


def _dead(gw: GatewayProcess) -> int:
    response = httpx.get(gw.url("/api/queue"), params={"state": "dead"}, timeout=10)
    assert response.status_code == 200
    return len(response.json()["jobs"])


# -- the sign-in page says only what we wrote -------------------------------------------------


def test_sign_in_page_shows_only_known_messages(gateway: Gateway) -> None:
    """``/ui/login?error=...`` used to print any text with any status (phishing on our own
    page); now only known codes, each with its fixed message."""
    key = new_api_key()
    gw = gateway({"http": {"auth": {"api_keys": [{"name": "ops", "sha256": hash_api_key(key)}]}}})
    login = gw.url("/ui/login")
    phishing = "Your session expired. Call +1 555 0100 and read us your key"
    page = httpx.get(login, params={"error": phishing, "status": "418"})
    assert page.status_code == 200
    assert "555" not in page.text and "session expired" not in page.text
    assert 'role="alert"' not in page.text
    known = httpx.get(login, params={"error": "invalid_api_key"})
    assert known.status_code == 401 and "This API key is not valid." in known.text
    unavailable = httpx.get(login, params={"error": "keys_unavailable", "status": "200"})
    assert unavailable.status_code == 503
    # A refused sign-in still says why, in our words.
    with httpx.Client(timeout=10) as browser:
        token = csrf_of(browser.get(login).text)
        refused = browser.post(login, data={"csrf": token, "api_key": "dgk_wrong", "next": "/ui"})
        assert refused.status_code == 401 and "This API key is not valid." in refused.text
        accepted = browser.post(login, data={"csrf": token, "api_key": key, "next": "/ui"})
        assert accepted.status_code == 303 and accepted.headers["location"] == "/ui"


# -- AE titles with control characters --------------------------------------------------------


def _associate_rq(calling: bytes, called: bytes) -> bytes:
    """An A-ASSOCIATE-RQ for Verification with raw 16-byte AE title fields (PS3.8 9.3.2)."""

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    context = item(
        0x20,
        bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"),
    )
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16, b" ")[:16]
        + calling.ljust(16, b" ")[:16]
        + bytes(32)
        + item(0x10, b"1.2.840.10008.3.1.1.1")
        + context
        + user
    )
    return struct.pack(">BBI", 1, 0, len(body)) + body


def _answer(port: int, calling: bytes, called: bytes) -> bytes:
    """The first 10 bytes the gateway answers to the A-ASSOCIATE-RQ."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_associate_rq(calling, called))
        answer = sock.recv(10)
        if answer[:1] == b"\x02":  # accepted: release politely
            sock.sendall(bytes([5, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
        return answer


@needs_dcmtk
def test_ae_titles_with_control_characters_are_rejected_and_logged_on_one_line(
    gateway: Gateway,
) -> None:
    """PS3.5 6.2: an AE title has no control character and no backslash. A calling AE title
    with a newline used to be accepted and printed as it came, forging a line of the text
    log; it is now refused (A-ASSOCIATE-RJ, calling AE title not recognized) and the log
    line shows it escaped."""
    gw = gateway({"logging": {"format": "text"}})
    port = gw.dimse_port
    called = gw.ae_title.encode()
    forged = b"CT\n2099 FAKE LIN"
    # A-ASSOCIATE-RJ (0x03): result 1 permanent, source 1 service user, reason 3.
    assert _answer(port, forged, called) == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 3])
    assert _answer(port, b"CT\x1b[2J", called) == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 3])
    assert _answer(port, b"CT\\ONE", called) == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 3])
    assert _answer(port, b"CT\xe9", called) == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 3])
    # The called AE title: reason 7, called AE title not recognized.
    assert _answer(port, b"CT1", called[:4] + b"\r") == bytes([3, 0, 0, 0, 0, 4, 0, 1, 1, 7])
    # Ordinary titles, padded with spaces or (some senders) NULs, are accepted as before.
    assert _answer(port, b"CT1", called)[:1] == b"\x02"
    assert _answer(port, b"CT1".ljust(16, b"\0"), called)[:1] == b"\x02"
    assert gw.echoscu("-aet", "CT-2 MODALITY").returncode == 0

    gw.wait_log("association.rejected", 5)
    lines = gw.log_text().splitlines()
    assert not any(line.startswith("2099 FAKE") for line in lines), gw.log_tail()
    rejected = [line for line in lines if " association.rejected " in line]
    assert any("calling_ae=CT\\n2099 FAKE LIN" in line for line in rejected), rejected
    assert any("calling_ae=CT\\x1b[2J" in line for line in rejected), rejected
    assert not any("\x1b" in line for line in lines)
    assert "reason=calling_ae" in gw.log_text() and "reason=called_ae" in gw.log_text()
