"""SIGTERM while STOW-RS uploads are in flight (docs/dicomweb.md, *Stopping*).

On SIGTERM the HTTP port stops taking connections at once, beside the DIMSE drain;
requests already running get ``http.shutdown_grace`` seconds to finish (answered as usual:
what was acknowledged is stored), and a request still running then is cut: answered 503
with a JSON error, nothing of an upload's body kept. The gateway exits 0 within the grace.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
from tests.conftest import Corpus, GatewayProcess, dcmtk_env, large_mr, sop_uid_of

Gateway = Callable[..., GatewayProcess]
BOUNDARY = "shutdown-boundary"
HEADERS = {"content-type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}


def _instances(paths: list[Path]) -> list[tuple[str, bytes]]:
    """(SOP Instance UID, Part 10 bytes) of each file."""
    return [(sop_uid_of(p), p.read_bytes()) for p in paths]


def _body(data: bytes) -> bytes:
    """A one-part STOW-RS body."""
    part = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return part + data + f"\r\n--{BOUNDARY}--\r\n".encode()


class SlowUpload:
    """One STOW-RS request whose parts are sent ``pause`` seconds apart, from a thread."""

    def __init__(self, gw: GatewayProcess, parts: list[bytes], pause: float) -> None:
        self.sent = threading.Event()  # the first part is out
        self.result: httpx.Response | Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(gw, parts, pause))
        self._thread.start()

    def _run(self, gw: GatewayProcess, parts: list[bytes], pause: float) -> None:
        def body() -> Iterator[bytes]:
            for n, data in enumerate(parts):
                if n:
                    time.sleep(pause)
                yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                yield data + b"\r\n"
                self.sent.set()
            yield f"--{BOUNDARY}--\r\n".encode()

        try:
            self.result = httpx.post(
                gw.url("/dicomweb/studies"), content=body(), headers=HEADERS, timeout=60
            )
        except Exception as exc:  # the connection closed under it
            self.result = exc

    def join(self, timeout: float = 60) -> httpx.Response | Exception | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the upload never ended"
        return self.result


def _refused(gw: GatewayProcess) -> bool:
    try:
        httpx.get(gw.url("/healthz"), timeout=2)
    except httpx.TransportError:
        return True
    return False


def test_both_ports_stop_taking_work_at_once_and_running_work_finishes(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    """storescu sends on one association and a STOW-RS upload is half sent when SIGTERM
    comes: the HTTP port refuses new connections at once, while DIMSE still drains; the
    upload is answered 200 and every instance either sender saw acknowledged is indexed."""
    gw = gateway({"http": {"shutdown_grace": 20}, "dimse": {"shutdown_grace": 20}})
    files = corpus.mr("shutdown", 800, seed=5)
    output = tmp_path / "storescu.log"  # a file: a pipe nobody reads would stall storescu
    with output.open("w") as sink:
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", gw.ae_title, "127.0.0.1", str(gw.dimse_port)]
            + [str(p) for p in files],
            env=dcmtk_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        gw.wait_log("instance.stored", 20, timeout=30)
        items = _instances(corpus.mr("shutdown-upload", 4, seed=6))
        upload = SlowUpload(gw, [data for _, data in items], pause=0.7)
        assert upload.sent.wait(10)
        assert sender.poll() is None, "storescu finished before SIGTERM; send more files"
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert _refused(gw), "a new HTTP connection was taken after SIGTERM"
        assert sender.poll() is None, "storescu finished before HTTP was checked"
        code = gw.terminate(timeout=30)
        elapsed = time.monotonic() - started
        result = upload.join()
        sender.wait(30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert code == 0, gw.log_tail()
    assert elapsed < 20, f"took {elapsed:.1f} s to stop"
    assert isinstance(result, httpx.Response), result
    assert result.status_code == 200, result.text
    for uid, _ in items:
        assert gw.index.instance(uid) is not None, "acknowledged but not indexed"
    out = output.read_text()
    acked = out.count("Received Store Response (Success)")
    assert acked == len(files), out[-2000:]  # the association was let finish
    for path in files[:: len(files) // 20]:
        assert gw.index.instance(sop_uid_of(path)) is not None
    assert gw.log_count("http.request_cut") == 0
    assert list(gw.spool.glob("*.part")) == []


def test_an_upload_past_the_grace_is_cut_and_keeps_nothing(
    gateway: Gateway, corpus: Corpus
) -> None:
    """An upload still arriving ``http.shutdown_grace`` after SIGTERM is answered 503 with
    a JSON error (or its connection closes first, if the client is still sending): none
    of its parts is kept, what was acknowledged before stays, the gateway exits 0."""
    grace = 2.0
    gw = gateway({"http": {"shutdown_grace": grace}})
    before = _instances(corpus.mr("shutdown-before", 1, seed=7))
    answer = httpx.post(
        gw.url("/dicomweb/studies"), content=_body(before[0][1]), headers=HEADERS, timeout=30
    )
    assert answer.status_code == 200, answer.text
    items = _instances(corpus.mr("shutdown-cut", 12, seed=8))
    upload = SlowUpload(gw, [data for _, data in items], pause=1.0)  # ~11 s in all
    assert upload.sent.wait(10)
    started = time.monotonic()
    code = gw.terminate()
    elapsed = time.monotonic() - started
    result = upload.join()
    assert code == 0, gw.log_tail()
    assert grace - 0.5 < elapsed < grace + 5, f"took {elapsed:.1f} s to stop"
    if isinstance(result, httpx.Response):
        assert result.status_code == 503, result.text
        assert "shutdown_grace" in result.json()["error"]
    else:
        assert isinstance(result, httpx.TransportError), result
    assert gw.index.instance(before[0][0]) is not None  # acknowledged before: kept
    for uid, _ in items:
        assert gw.index.instance(uid) is None, "a part of the cut upload was kept"
    assert list(gw.spool.glob("*.part")) == []
    assert gw.log_count("http.request_cut") == 1
    assert "Exception in ASGI application" not in gw.log_text()


def _cut_download(gw: GatewayProcess, tmp_path: Path, grace: float) -> None:
    """Store a ~40 MB instance, retrieve it with WADO-RS, stop reading after the first
    chunk, SIGTERM: the answer is cut at the grace and the gateway exits 0."""
    big = large_mr(tmp_path / "big.dcm", 40)  # more than the sockets buffer
    ds = pydicom.dcmread(big, stop_before_pixels=True)
    stored = httpx.post(
        gw.url("/dicomweb/studies"), content=_body(big.read_bytes()), headers=HEADERS, timeout=120
    )
    assert stored.status_code == 200, stored.text
    url = gw.url(
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    received = 0
    with httpx.stream("GET", url, timeout=60) as answer:
        assert answer.status_code == 200
        chunks = answer.iter_raw()
        received += len(next(chunks))  # the answer has begun; then the client stalls
        time.sleep(0.5)
        started = time.monotonic()
        code = gw.terminate()
        elapsed = time.monotonic() - started
        try:
            for chunk in chunks:
                received += len(chunk)
        except httpx.TransportError:
            pass  # cut mid-body
    assert code == 0, gw.log_tail()
    assert elapsed < grace + 5, f"took {elapsed:.1f} s to stop"
    assert received < big.stat().st_size, "the whole instance arrived although it was cut"


def test_a_download_past_the_grace_has_its_connection_closed(
    gateway: Gateway, tmp_path: Path
) -> None:
    """A WADO-RS retrieve whose client stopped reading holds its answer half sent: past
    the grace its connection is closed (the client sees a cut body, not a complete one)
    and the gateway exits 0."""
    gw = gateway({"http": {"shutdown_grace": 1.0}})
    _cut_download(gw, tmp_path, 1.0)
    assert gw.log_count("http.request_cut") == 1


def test_with_json_logs_every_line_is_json_other_libraries_lines_too(
    gateway: Gateway, tmp_path: Path
) -> None:
    """``logging.format: json`` promises one JSON object per line: uvicorn's own error for
    the answer it closed unfinished used to reach stderr bare (logging's last-resort
    handler); it is now formatted like the gateway's lines."""
    gw = gateway({"http": {"shutdown_grace": 1.0}, "logging": {"format": "json"}})
    _cut_download(gw, tmp_path, 1.0)
    lines = [line for line in gw.log_text().splitlines() if line.strip()]
    docs = []
    for line in lines:
        try:
            docs.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line[:200]!r}") from None
    assert [d["event"] for d in docs].count("http.request_cut") == 1
    assert any(d["logger"].startswith("uvicorn") for d in docs), "uvicorn's line is missing"
