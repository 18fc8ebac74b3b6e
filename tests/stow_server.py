"""A scripted STOW-RS server for tests: real HTTP on a free port, behaviour switchable.

It parses every ``multipart/related`` request into its parts (kept byte for byte, with the
SOP Instance UID of each) and answers with whatever :attr:`StowServer.respond` returns for
the request (a status, a body and optionally more response headers), by default a 200
naming every instance in the Referenced SOP Sequence (PS3.18 10.5.3). A test switches
behaviour by assigning ``respond`` (or ``delay`` / ``hold``) at any time; requests are
recorded in arrival order.
"""

from __future__ import annotations

import io
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom

__all__ = [
    "Answer",
    "StowRequest",
    "StowServer",
    "failed_item",
    "referenced_item",
    "stow_body",
    "stow_server",
]

# (status, body) or (status, body, extra response headers)
Answer = tuple[int, bytes] | tuple[int, bytes, Mapping[str, str]]


@dataclass(frozen=True)
class StowRequest:
    """One request as received."""

    at: float  # time.monotonic() when it arrived
    path: str
    headers: dict[str, str]  # lower-case names
    parts: list[bytes]  # each part's body, exactly as sent
    uids: list[str]  # SOP Instance UID of each part ('' when unreadable)


def referenced_item(uid: str) -> dict[str, Any]:
    return {"00081155": {"vr": "UI", "Value": [uid]}}


def failed_item(uid: str, reason: int) -> dict[str, Any]:
    return {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}


def stow_body(referenced: Iterable[str] = (), failed: Mapping[str, int] | None = None) -> bytes:
    """A PS3.18 10.5.3 response data set in DICOM JSON."""
    doc: dict[str, Any] = {}
    refs = [referenced_item(uid) for uid in referenced]
    if refs:
        doc["00081199"] = {"vr": "SQ", "Value": refs}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": [failed_item(u, r) for u, r in failed.items()]}
    return json.dumps(doc).encode()


def accept_all(request: StowRequest) -> Answer:
    return 200, stow_body(request.uids)


def _parts(content_type: str, body: bytes) -> list[bytes]:
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"').encode()
    pieces = (b"\r\n" + body).split(b"\r\n--" + boundary)
    assert pieces[0] == b"", "preamble before the first boundary"
    assert pieces[-1].startswith(b"--"), "no closing boundary"
    parts = []
    for piece in pieces[1:-1]:
        headers, sep, content = piece.partition(b"\r\n\r\n")
        assert sep and b"application/dicom" in headers.lower(), headers
        parts.append(content)
    return parts


def _uid(part: bytes) -> str:
    try:
        ds = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
        return str(ds.SOPInstanceUID)
    except Exception:
        return ""


@dataclass
class StowServer:
    """State of the server; see the module docstring."""

    port: int = 0
    scheme: str = "http"
    respond: Callable[[StowRequest], Answer] = accept_all
    delay: float = 0.0  # seconds to wait before answering each request
    hold: threading.Event | None = None  # when set to an unset Event: answer once it is set
    requests: list[StowRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _statuses: list[int] = field(default_factory=list)  # the answer to each request

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/dw"

    def answered(self, status: int) -> list[StowRequest]:
        """The requests answered with `status` (recorded after answering)."""
        with self.lock:
            return [r for r, s in zip(self.requests, self._statuses, strict=True) if s == status]

    def parts_by_uid(self, status: int = 200) -> dict[str, list[bytes]]:
        """Every part received in requests answered `status`, by SOP Instance UID."""
        out: dict[str, list[bytes]] = {}
        for request in self.answered(status):
            for uid, part in zip(request.uids, request.parts, strict=True):
                out.setdefault(uid, []).append(part)
        return out

    def record(self, request: StowRequest, status: int) -> None:
        with self.lock:
            self.requests.append(request)
            self._statuses.append(status)


@contextmanager
def stow_server(tls: tuple[Path, Path] | None = None) -> Iterator[StowServer]:
    """Run a :class:`StowServer` on a free 127.0.0.1 port until the block ends; HTTPS with
    `tls` = (certificate, key) PEM files."""
    state = StowServer(scheme="https" if tls else "http")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            parts = _parts(self.headers.get("Content-Type", ""), body)
            request = StowRequest(
                at=time.monotonic(),
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                parts=parts,
                uids=[_uid(p) for p in parts],
            )
            if state.hold is not None:
                state.hold.wait(60)
            if state.delay:
                time.sleep(state.delay)
            reply = state.respond(request)
            status, answer = reply[0], reply[1]
            state.record(request, status)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(answer)))
                for name, value in (reply[2] if len(reply) > 2 else {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer)
            except OSError:
                pass  # the client gave up waiting (a timeout under test)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        if state.hold is not None:
            state.hold.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
