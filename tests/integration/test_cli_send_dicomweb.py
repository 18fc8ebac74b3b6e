"""``dicomgate send --via dicomweb``: the console script against Orthanc's DICOMweb plugin
and a scripted STOW-RS server (``tests/stow_server.py``)."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from tests.conftest import (
    DICOMGATE,
    Corpus,
    GatewayProcess,
    Orthanc,
    bundled_file,
    sop_uid_of,
)
from tests.stow_server import StowRequest, StowServer, stow_body, stow_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def stow() -> Iterator[StowServer]:
    with stow_server() as server:
        yield server


def _send(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DICOMGATE, "send", *args], capture_output=True, text=True, timeout=100, check=False
    )


def _folder(tmp_path: Path, files: list[Path], *, junk: bool = True) -> Path:
    """A folder to upload: the files (in a sub-folder for half of them) and a README."""
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    for n, f in enumerate(files):
        shutil.copy(f, folder / ("sub" if n % 2 else "") / f"{n:04d}-{f.name}")
    if junk:
        (folder / "README.txt").write_text("not an image\n")
    return folder


def _orthanc_file(orthanc: Orthanc, instance_id: str) -> bytes:
    url = f"http://127.0.0.1:{orthanc.http_port}/instances/{instance_id}/file"
    with urllib.request.urlopen(url, timeout=10) as response:
        data: bytes = response.read()
        return data


# ----------------------------------------------------------------- Orthanc


def test_folder_is_uploaded_to_orthanc_byte_identical(
    orthanc: Orthanc, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("send-dw-mr", 30, seed=801) + corpus.ct("send-dw-ct", 3, seed=802)
    files.append(bundled_file("CT_small.dcm"))
    folder = _folder(tmp_path, files)
    result = _send(
        str(folder),
        "--via",
        "dicomweb",
        "--to",
        f"http://127.0.0.1:{orthanc.http_port}/dicom-web",
        "--batch",
        "8",
        "--batch-bytes",
        "1M",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"sent {len(files)}, warnings 0, failed 0, skipped 1 (not DICOM)")
    by_uid = {sop_uid_of(f): f.read_bytes() for f in files}
    ids = orthanc.get("/instances")
    assert len(ids) == len(files)
    for instance_id in ids:
        uid = orthanc.get(f"/instances/{instance_id}")["MainDicomTags"]["SOPInstanceUID"]
        assert _orthanc_file(orthanc, instance_id) == by_uid.pop(uid)
    assert by_uid == {}


def test_a_file_without_part10_header_is_sent_as_part10(orthanc: Orthanc, tmp_path: Path) -> None:
    raw = bundled_file("ExplVR_LitEndNoMeta.dcm")  # no preamble, no file meta
    result = _send(str(raw), "--to", f"http://127.0.0.1:{orthanc.http_port}/dicom-web")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("sent 1, warnings 0, failed 0, skipped 0")
    (instance_id,) = orthanc.get("/instances")
    tags = orthanc.get(f"/instances/{instance_id}")["MainDicomTags"]
    assert tags["SOPInstanceUID"] == pydicom.dcmread(raw, force=True).SOPInstanceUID
    stored = pydicom.dcmread(io.BytesIO(_orthanc_file(orthanc, instance_id)))
    assert stored.file_meta.MediaStorageSOPInstanceUID == tags["SOPInstanceUID"]
    assert stored == pydicom.dcmread(raw, force=True)  # the same data set, elements compared


def test_wrong_base_url_fails_every_instance_without_retrying(
    orthanc: Orthanc, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("send-dw-mr", 30, seed=801)[:3]
    result = _send(*map(str, files), "--to", f"http://127.0.0.1:{orthanc.http_port}/no-such-root")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sent 0, warnings 0, failed 3")
    assert all("HTTP 404" in line for line in lines[1:]) and len(lines) == 4
    assert "retry" not in result.stderr
    assert orthanc.get("/instances") == []


def _big_file(tmp_path: Path) -> Path:
    """A 32 MiB instance: the server answers long before the request is all sent."""
    ds = pydicom.dcmread(bundled_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 2048
    ds.NumberOfFrames = 4
    ds.PixelData = bytes(2048 * 2048 * 2 * 4)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "big.dcm"
    ds.save_as(path)
    return path


def test_wrong_path_on_the_gateway_reports_its_http_status_for_a_large_file(
    gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    # The gateway refuses the unknown path before reading the body and closes the
    # connection: its answer is lost to the client, which saw only a ReadError.
    gw = gateway()
    big = _big_file(tmp_path)
    result = _send(str(big), "--to", gw.url("/no-such-root"), "--retry-wait", "0.1")
    assert result.returncode == 1
    assert result.stdout.splitlines()[1:] == [
        f"  {big}: HTTP 404 from {gw.url('/no-such-root/studies')}"
    ]
    assert "retry" not in result.stderr


# ----------------------------------------------------------------- scripted server


def test_server_errors_are_retried_then_everything_is_sent(
    stow: StowServer, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("send-dw-retry", 5, seed=803)
    answers = iter([500, 503])

    def respond(request: StowRequest) -> tuple[int, bytes]:
        status = next(answers, 200)
        return status, stow_body(request.uids) if status == 200 else b""

    stow.respond = respond
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    result = _send(
        str(_folder(tmp_path, files, junk=False)),
        "--to",
        stow.url,
        "--retry-wait",
        "0.1",
        "--token-file",
        str(token),
        "--header",
        "X-Tenant: radiology",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("sent 5, warnings 0, failed 0, skipped 0")
    assert "retry 1 of 3" in result.stderr and "retry 2 of 3" in result.stderr
    assert [len(r.uids) for r in stow.requests] == [5, 5, 5]
    assert stow.requests[2].at - stow.requests[1].at >= 0.2 * 0.9  # the doubled wait
    for request in stow.requests:
        assert request.path == "/dw/studies"
        assert request.headers["authorization"] == "Bearer secret-token"
        assert request.headers["x-tenant"] == "radiology"
    by_uid = {sop_uid_of(f): f.read_bytes() for f in files}
    received = stow.parts_by_uid(200)
    assert {uid: parts[0] for uid, parts in received.items()} == by_uid


def test_retries_run_out_exit_1_with_the_reason(
    stow: StowServer, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("send-dw-retry", 5, seed=803)[:2]
    stow.respond = lambda request: (500, b"")
    result = _send(*map(str, files), "--to", stow.url, "--retries", "1", "--retry-wait", "0.1")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sent 0, warnings 0, failed 2")
    assert sorted(lines[1:]) == sorted(f"  {f}: HTTP 500 (after 2 attempts)" for f in files)
    assert len(stow.requests) == 2


def test_refused_instances_are_listed_and_the_others_sent(
    stow: StowServer, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("send-dw-409", 6, seed=804)
    uids = [sop_uid_of(f) for f in files]
    refused = {uids[1]: 0xC000, uids[4]: 0xA900}  # cannot understand; SOP class mismatch
    busy = {uids[5]: 0xA700}  # out of resources: retried, then stored

    def respond(request: StowRequest) -> tuple[int, bytes]:
        failed = {u: refused[u] for u in request.uids if u in refused}
        if len(stow.requests) < 2:  # the first two answers: still busy
            failed.update({u: busy[u] for u in request.uids if u in busy})
        stored = [u for u in request.uids if u not in failed]
        return (202 if stored else 409), stow_body(stored, failed)

    stow.respond = respond
    user = "dicom:pass word"
    result = _send(
        *map(str, files),
        "--to",
        stow.url,
        "--batch",
        "3",
        "--retry-wait",
        "0.1",
        "--user",
        user,
        "--no-progress",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sent 4, warnings 0, failed 2, skipped 0")
    assert sorted(lines[1:]) == [
        f"  {files[1]}: HTTP 202, FailureReason 0xC000 Cannot Understand",
        f"  {files[4]}: HTTP 202, FailureReason 0xA900 Data Set Does Not Match SOP Class",
    ]
    sent = [u for r in stow.requests for u in r.uids]
    assert sorted(sent) == sorted([*uids, uids[5]])  # only the busy one went again
    expected = "Basic " + base64.b64encode(user.encode()).decode()
    assert all(r.headers["authorization"] == expected for r in stow.requests)


def test_a_failure_reason_that_will_not_pass_is_not_retried(
    stow: StowServer, corpus: Corpus
) -> None:
    # 0x0120 (Missing Attribute) repeats whatever the wait: only 0xA7xx and 0x0110 are
    # retried by send (README), 0xA701 here is retried and then stored.
    files = corpus.mr("send-dw-409-final", 2, seed=805)
    uids = [sop_uid_of(f) for f in files]

    def respond(request: StowRequest) -> tuple[int, bytes]:
        failed = {uids[0]: 0x0120} if uids[0] in request.uids else {}
        if len(stow.requests) < 2 and uids[1] in request.uids:
            failed[uids[1]] = 0xA701
        stored = [u for u in request.uids if u not in failed]
        return (202 if stored else 409), stow_body(stored, failed)

    stow.respond = respond
    result = _send(*map(str, files), "--to", stow.url, "--retry-wait", "0.1", "--batch", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sent 1, warnings 0, failed 1, skipped 0")
    assert lines[1:] == [f"  {files[0]}: HTTP 409, FailureReason 0x0120 Missing Attribute"]
    sent = [u for r in stow.requests for u in r.uids]
    assert sorted(sent) == sorted([uids[0], uids[1], uids[1]])
    assert "0xA701 Refused: Out of Resources" in result.stderr


def test_a_server_that_closes_mid_request_is_named_with_the_bytes_sent(
    tmp_path: Path,
) -> None:
    # No status at all (the peer reads a little and closes): the error says so, with how
    # much of the request went, instead of a bare "ReadError".
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" + bytes(4))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    big = _big_file(tmp_path)
    try:
        result = _send(str(big), "--to", f"http://127.0.0.1:{port}/dw", "--retries", "0")
    finally:
        listener.close()
    assert result.returncode == 1
    (line,) = result.stdout.splitlines()[1:]
    assert "the server closed the connection after" in line, line
    assert "of 32.0 MiB of the request, without an answer" in line, line


@pytest.fixture
def tls_stow(tmp_path: Path) -> Iterator[tuple[StowServer, Path]]:
    """An HTTPS STOW-RS server with a self-signed certificate for 127.0.0.1, and that
    certificate (the CA bundle to trust)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with stow_server(tls=(cert, key)) as server:
        yield server, cert


def test_tls_is_verified_against_the_ca_bundle(
    tls_stow: tuple[StowServer, Path], corpus: Corpus
) -> None:
    server, cert = tls_stow
    files = corpus.mr("send-dw-retry", 5, seed=803)[:2]
    untrusted = _send(*map(str, files), "--to", server.url, "--retries", "0")
    assert untrusted.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout
    assert server.requests == []

    trusted = _send(*map(str, files), "--to", server.url, "--ca-bundle", str(cert))
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert trusted.stdout.startswith("sent 2, warnings 0, failed 0")
    insecure = _send(*map(str, files), "--to", server.url, "--insecure")
    assert insecure.returncode == 0, insecure.stdout + insecure.stderr
    assert len(server.answered(200)) == 2
