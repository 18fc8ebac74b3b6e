"""ATNA (IHE ITI-20) over TCP (RFC 6587 octet counting) and TLS (RFC 5425) to a real
receiving peer: a syslog server in this module, on loopback, with a CA made here.

Each received frame is checked byte by byte: ``MSG-LEN SP SYSLOG-MSG`` with MSG-LEN the
exact octet count, an RFC 5424 header (PRI authpriv.notice, version 1, MSGID
``IHE+RFC-3881``), a BOM, and a DICOM audit message (PS3.15 A.5.1, RFC 3881 element names
in the order the schema requires).
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import Corpus, GatewayProcess, wait_until
from tests.integration.test_dimse_security import ClientCa

pytestmark = [pytest.mark.timeout(120)]

Gateway = Callable[..., GatewayProcess]

# RFC 5424 6: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP MSG
_HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<host>\S+)"
    rb" (?P<app>\S+) (?P<procid>\d+) (?P<msgid>\S+) - "
)


@dataclass
class Frame:
    """One syslog message as it came off the wire."""

    declared: int  # MSG-LEN
    message: bytes  # SYSLOG-MSG, exactly MSG-LEN octets


class SyslogReceiver:
    """An RFC 6587 (TCP) / RFC 5425 (TLS) receiver: frames are ``MSG-LEN SP SYSLOG-MSG``.

    A frame whose MSG-LEN is not a number followed by one space, or a connection that
    ends inside a frame, is recorded in ``errors``: the test then fails.
    """

    def __init__(self, port: int = 0, context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self.frames: list[Frame] = []
        self.errors: list[str] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(16)
        self.port = int(self._listener.getsockname()[1])
        self._open: list[socket.socket] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.context is not None:
                conn.settimeout(10)
                conn = self.context.wrap_socket(conn, server_side=True)
                conn.settimeout(None)
        except (OSError, ssl.SSLError) as exc:
            with self._lock:
                self.errors.append(f"handshake: {exc}")
            conn.close()
            return
        with self._lock:
            self.connections += 1
            self._open.append(conn)
        buffer = b""
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                buffer = self._frames_from(buffer)
        except OSError:
            pass
        finally:
            conn.close()
        if buffer and not self._stopped:
            with self._lock:
                self.errors.append(f"connection ended inside a frame: {buffer[:40]!r}")

    def _frames_from(self, buffer: bytes) -> bytes:
        while buffer:
            head = re.match(rb"([1-9][0-9]*) ", buffer)
            if head is None:
                if not re.fullmatch(rb"[0-9]{0,10}", buffer):
                    with self._lock:
                        self.errors.append(f"not octet-counted: {buffer[:40]!r}")
                    return b""
                return buffer  # the MSG-LEN is still arriving
            length, start = int(head.group(1)), head.end()
            if len(buffer) < start + length:
                return buffer
            with self._lock:
                self.frames.append(Frame(length, buffer[start : start + length]))
            buffer = buffer[start + length :]
        return buffer

    def stop(self) -> None:
        """Refuse new connections and end the open ones (a repository that went away)."""
        self._stopped = True
        with contextlib.suppress(OSError):  # wakes the accept() of the accepting thread
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()

    def messages(self) -> list[tuple[dict[str, bytes], ET.Element]]:
        """(RFC 5424 header fields, AuditMessage root) of every frame, checked."""
        out = []
        with self._lock:
            frames = list(self.frames)
        for frame in frames:
            assert len(frame.message) == frame.declared
            header = _HEADER.match(frame.message)
            assert header is not None, frame.message[:120]
            body = frame.message[header.end() :]
            assert body.startswith(b"\xef\xbb\xbf"), body[:10]  # RFC 5424 6.4: BOM, UTF-8
            out.append((header.groupdict(), ET.fromstring(body[3:])))
        return out


def check_audit_message(root: ET.Element) -> None:
    """The DICOM audit message schema (PS3.15 A.5.1): element order, required attributes,
    coded values with ``csd-code`` and ``codeSystemName``."""

    def coded(element: ET.Element | None) -> None:
        assert element is not None
        assert element.get("csd-code") and element.get("codeSystemName"), element.attrib

    assert root.tag == "AuditMessage"
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification", tags
    participants = [i for i, t in enumerate(tags) if t == "ActiveParticipant"]
    source = tags.index("AuditSourceIdentification")
    objects = [i for i, t in enumerate(tags) if t == "ParticipantObjectIdentification"]
    assert participants and participants == list(range(1, source)), tags
    assert objects == list(range(source + 1, len(tags))), tags
    ident = root[0]
    assert ident.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", ident.get("EventDateTime", ""))
    assert ident.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    coded(ident.find("EventID"))
    for element in ident.findall("EventTypeCode"):
        coded(element)
    for index in participants:
        participant = root[index]
        assert participant.get("UserID")
        assert participant.get("UserIsRequestor") in {"true", "false"}
        if participant.get("NetworkAccessPointID"):
            assert participant.get("NetworkAccessPointTypeCode") in {"1", "2"}
        for role in participant.findall("RoleIDCode"):
            coded(role)
    audit_source = root[source]
    assert audit_source.get("AuditSourceID")
    for code in audit_source.findall("AuditSourceTypeCode"):
        coded(code)
    for index in objects:
        obj = root[index]
        assert obj.get("ParticipantObjectID")
        assert obj.get("ParticipantObjectTypeCode") in {"1", "2", "3", "4"}
        coded(obj.find("ParticipantObjectIDTypeCode"))


def audit_gateway(gateway: Gateway, syslog: dict[str, Any]) -> GatewayProcess:
    return gateway({"audit": {"node_name": "gw-atna", "syslog": syslog}})


def received_events(receiver: SyslogReceiver) -> list[str]:
    return [root[0].find("EventID").get("originalText", "") for _, root in receiver.messages()]  # type: ignore[union-attr]


def _study_sent(gw: GatewayProcess, corpus: Corpus, name: str) -> str:
    files = corpus.mr(name, 2, seed=811)
    sent = gw.storescu(files)
    assert sent.returncode == 0, sent.stdout
    import pydicom

    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _instances_transferred(receiver: SyslogReceiver, study: str) -> ET.Element:
    for _, root in receiver.messages():
        objects = root.findall("ParticipantObjectIdentification")
        if any(o.get("ParticipantObjectID") == study for o in objects):
            return root
    raise AssertionError(f"no audit message for the study; got {received_events(receiver)}")


def test_atna_over_tcp_octet_counting(gateway: Gateway, corpus: Corpus) -> None:
    receiver = SyslogReceiver()
    try:
        gw = audit_gateway(gateway, {"host": "127.0.0.1", "port": receiver.port, "protocol": "tcp"})
        study = _study_sent(gw, corpus, "atna-tcp")
        wait_until(
            lambda: "DICOM Instances Transferred" in received_events(receiver),
            10,
            "the instances-transferred message",
        )
        assert receiver.errors == []
        messages = receiver.messages()
        for header, root in messages:
            assert header["pri"] == b"85"  # authpriv (10) * 8 + notice (5)
            assert header["msgid"] == b"IHE+RFC-3881" and header["app"] == b"dicomgate"
            assert header["host"] == b"gw-atna"
            check_audit_message(root)
        assert received_events(receiver)[0] == "Application Activity"  # application.start
        root = _instances_transferred(receiver, study)
        assert root[0].get("EventActionCode") == "C"
        # Several messages, one connection: frames are delimited by their octet count only.
        assert len(messages) >= 2 and receiver.connections == 1
    finally:
        receiver.stop()


def _tls_receiver(pki: ClientCa, port: int = 0) -> SyslogReceiver:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(pki.folder / "syslog.crt", pki.folder / "syslog.key")
    return SyslogReceiver(port, context)


@pytest.fixture
def pki(tmp_path: Path) -> ClientCa:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = ClientCa(folder)
    ca.issue("audit-repository", folder / "syslog.crt", folder / "syslog.key")
    return ca


def test_atna_over_tls_and_a_repository_we_do_not_trust(
    gateway: Gateway, corpus: Corpus, pki: ClientCa, tmp_path: Path
) -> None:
    receiver = _tls_receiver(pki)
    try:
        gw = audit_gateway(
            gateway,
            {"host": "127.0.0.1", "port": receiver.port, "protocol": "tls", "ca": str(pki.path)},
        )
        study = _study_sent(gw, corpus, "atna-tls")
        wait_until(
            lambda: "DICOM Instances Transferred" in received_events(receiver),
            10,
            "the instances-transferred message over TLS",
        )
        assert receiver.errors == []
        for _, root in receiver.messages():
            check_audit_message(root)
        root = _instances_transferred(receiver, study)
        patient = [
            o
            for o in root.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCodeRole") == "1"
        ]
        assert len(patient) == 1 and patient[0].get("ParticipantObjectID")
        assert receiver.connections == 1
    finally:
        receiver.stop()

    # A repository whose certificate our CA did not sign gets nothing; the failure is
    # logged and counted, the database row is still written.
    other = tmp_path / "other"
    other.mkdir()
    stranger = ClientCa(other)
    stranger.issue("audit-repository", other / "syslog.crt", other / "syslog.key")
    impostor = _tls_receiver(stranger)
    try:
        gw2 = audit_gateway(
            gateway,
            {"host": "127.0.0.1", "port": impostor.port, "protocol": "tls", "ca": str(pki.path)},
        )
        _study_sent(gw2, corpus, "atna-tls-impostor")
        wait_until(lambda: gw2.log_count("audit.forward_failed") >= 1, 10, "forward_failed")
        assert impostor.frames == [] and impostor.connections == 0
        assert "certificate verify failed" in gw2.log_text()
        status, body = gw2.http_get("/api/audit?event=instance.received")
        assert status == 200
        assert sum(e["detail"]["instances"] for e in body["events"]) == 2
    finally:
        impostor.stop()
