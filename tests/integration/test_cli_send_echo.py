"""``dicomgate echo`` and ``dicomgate send`` against real peers (DCMTK storescp, pynetdicom).

The console script runs in a subprocess, as a user would run it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]
from tests.conftest import free_port

from dicomgate.dimse import scu

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None, reason="needs DCMTK")

DICOMGATE = str(Path(sys.executable).parent / "dicomgate")

# Different SOP classes and transfer syntaxes, distinct SOP Instance UIDs.
SENT_FILES = [
    "CT_small.dcm",  # CT, Explicit VR Little Endian
    "MR_small_implicit.dcm",  # MR, Implicit VR Little Endian
    "JPEG2000.dcm",  # Secondary Capture, JPEG 2000
    "SC_rgb_rle.dcm",  # Secondary Capture, RLE Lossless
    "693_J2KI.dcm",  # CT, JPEG 2000
    "rtplan.dcm",  # RT Plan, Implicit VR, file meta UID disagrees with the data set
    "image_dfl.dcm",  # Deflated, odd length (re-encoded, not streamed)
    "waveform_ecg.dcm",  # 12-lead ECG
    "test-SR.dcm",  # Comprehensive SR
    "ExplVR_LitEndNoMeta.dcm",  # no preamble, no file meta
]


def _testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(path)


def _free_port() -> int:
    return free_port()


def _wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"peer exited with {proc.returncode}")
        # echoscu rather than a bare connect, which storescp would log as an error
        probe = subprocess.run(
            ["echoscu", "-aec", "STORESCP", "-to", "1", "127.0.0.1", str(port)],
            env=_dcmtk_env(),
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def _dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


StartStorescp = Callable[..., tuple[int, Path]]


@pytest.fixture
def start_storescp(tmp_path: Path) -> Iterator[StartStorescp]:
    """Start DCMTK storescp with extra options; returns (port, output folder)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> tuple[int, Path]:
        out = tmp_path / f"received{len(procs)}"
        out.mkdir()
        port = _free_port()
        proc = subprocess.Popen(
            ["storescp", "--output-directory", str(out), "-aet", "STORESCP", *options, str(port)],
            env=_dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        _wait_listening(port, proc)
        return port, out

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def _dicomgate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DICOMGATE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _send(folder: Path | str, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return _dicomgate("send", str(folder), "--to", f"127.0.0.1:{port}", "--aec", "STORESCP", *extra)


def _received(folder: Path) -> dict[tuple[str, str], Dataset]:
    found: dict[tuple[str, str], Dataset] = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        found[(ds.SOPClassUID, ds.SOPInstanceUID)] = ds
    return found


def _comparable(ds: Dataset) -> Dataset:
    """The data set without file meta and without trailing padding (PS3.10 7.2 lets
    a receiver drop (FFFC,FFFC), and storescp does)."""
    copy = Dataset(ds)  # a shallow copy holds the data set elements only
    if 0xFFFCFFFC in copy:
        del copy[0xFFFCFFFC]
    return copy


# --------------------------------------------------------------------------- echo


def test_echo_succeeds(start_storescp: StartStorescp) -> None:
    port, _ = start_storescp()
    result = _dicomgate("echo", "127.0.0.1", str(port), "--aec", "STORESCP")
    assert result.returncode == 0, result.stderr
    assert "success" in result.stdout


def test_echo_to_a_closed_port_fails_with_one_clear_line() -> None:
    port = _free_port()
    result = _dicomgate("echo", "127.0.0.1", str(port), "--timeout", "5")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"dicomgate: echo 127.0.0.1:{port} failed: connection refused\n"


def test_echo_rejected_association_gives_the_reason() -> None:
    ae = AE(ae_title="PICKY")
    ae.add_supported_context("1.2.840.10008.1.1")
    ae.require_called_aet = True
    port = _free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        result = _dicomgate("echo", "127.0.0.1", str(port), "--aec", "WRONG", "--timeout", "5")
    finally:
        server.shutdown()
    assert result.returncode == 1
    assert "association rejected" in result.stderr
    assert "Called AE title not recognised" in result.stderr
    assert len(result.stderr.splitlines()) == 1


# --------------------------------------------------------------------------- send


def test_send_folder_delivers_every_instance_unchanged(
    start_storescp: StartStorescp, tmp_path: Path
) -> None:
    port, out = start_storescp("+xa", "+B")  # +B: write exactly what arrived
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for n, name in enumerate(SENT_FILES):
        shutil.copy(_testfile(name), folder / ("sub" if n % 2 else "") / name)
    (folder / "README.txt").write_text("these are test images\n")

    result = _send(folder, port)

    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"sent {len(SENT_FILES)}, warnings 0, failed 0, skipped 1 (not DICOM)")
    received = _received(out)
    assert len(received) == len(SENT_FILES)
    streamed = 0
    for name in SENT_FILES:
        sent = pydicom.dcmread(_testfile(name), force=True)
        got = received[(sent.SOPClassUID, sent.SOPInstanceUID)]
        assert _comparable(got) == _comparable(sent), name
        scanned = scu.scan_file(_testfile(name))
        assert scanned is not None
        if scanned.streamable:  # sent as is: the very same bytes arrived
            streamed += 1
            assert _dataset_bytes(Path(got.filename)) == _dataset_bytes(_testfile(name)), name
    assert streamed == 7


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # writing the files here
def test_send_of_odd_values_prints_the_summary_not_a_warning_per_file(
    start_storescp: StartStorescp, tmp_path: Path
) -> None:
    """Files from old modalities (a letter in a UID) are sent as they are; pydicom's
    "Invalid value for VR UI" warning had been printed for each file and UID."""
    from tests.integration.test_uid_slips import BY_DIMSE, BY_STOW, _part10

    port, out = start_storescp()
    folder = tmp_path / "old"
    folder.mkdir()
    for uid in (BY_DIMSE, BY_STOW):
        (folder / f"{uid}.dcm").write_bytes(_part10(uid))
    result = _send(folder, port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("sent 2, warnings 0, failed 0")
    assert "Warning" not in result.stderr, result.stderr
    assert len(list(out.iterdir())) == 2


def _dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_send_counts_a_refused_sop_class_as_failed(
    start_storescp: StartStorescp, tmp_path: Path
) -> None:
    port, out = start_storescp()  # knows the standard storage SOP classes only
    private = pydicom.dcmread(_testfile("CT_small.dcm"))
    private_class = UID("1.2.826.0.1.3680043.8.498.1")
    private.SOPClassUID = private.file_meta.MediaStorageSOPClassUID = private_class
    private.SOPInstanceUID = private.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder = tmp_path / "in"
    folder.mkdir()
    private.save_as(folder / "private.dcm")
    shutil.copy(_testfile("CT_small.dcm"), folder / "ct.dcm")

    result = _send(folder, port)

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sent 1, warnings 0, failed 1, skipped 0")
    assert lines[1].startswith(f"  {folder / 'private.dcm'}: peer did not accept")
    assert [p.name.split(".", 1)[0] for p in out.iterdir()] == ["CT"]


def test_send_decompresses_when_the_peer_takes_only_uncompressed(
    start_storescp: StartStorescp, tmp_path: Path
) -> None:
    port, out = start_storescp()  # without +xa storescp accepts uncompressed syntaxes only
    source = _testfile("MR_small_jp2klossless.dcm")
    original = pydicom.dcmread(source)
    assert original.file_meta.TransferSyntaxUID == JPEG2000Lossless

    result = _send(source, port)

    assert result.returncode == 0, result.stdout
    (path,) = out.iterdir()
    got = pydicom.dcmread(path)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, original.pixel_array)
    # The same instance, decompressed: not a new SOP Instance UID.
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert got.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID


def test_send_reconnects_after_the_peer_aborts(
    start_storescp: StartStorescp, tmp_path: Path
) -> None:
    port, _ = start_storescp("+xa", "--abort-during")  # aborts every association
    names = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"]
    folder = tmp_path / "in"
    folder.mkdir()
    for name in names:
        shutil.copy(_testfile(name), folder / name)

    started = time.monotonic()
    result = _send(folder, port, "--timeout", "20")

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sent 0, warnings 0, failed 3, skipped 0")
    # Each file was tried on a new association, and none waited for a timeout.
    assert sorted(lines[1:]) == sorted(
        f"  {folder / name}: association aborted or connection closed by the peer" for name in names
    )
    assert time.monotonic() - started < 15


def test_send_to_nobody_fails_every_file() -> None:
    port = _free_port()
    result = _send(_testfile("CT_small.dcm"), port, "--timeout", "5")
    assert result.returncode == 1
    assert result.stdout.splitlines()[1].endswith(": connection refused")


def _pynetdicom_scp(statuses: dict[str, Dataset]) -> tuple[int, Callable[[], None]]:
    """A pynetdicom storage SCP answering each SOP class with the status given."""
    ae = AE(ae_title="STORESCP")
    for sop_class in statuses:
        ae.add_supported_context(sop_class, ExplicitVRLittleEndian)

    def on_store(event: evt.Event) -> Dataset:
        return statuses[str(event.request.AffectedSOPClassUID)]

    port = _free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    return port, server.shutdown


def test_send_maps_warning_and_failure_statuses(tmp_path: Path) -> None:
    warning = Dataset()
    warning.Status = 0xB000
    failure = Dataset()
    failure.Status = 0xA700
    failure.ErrorComment = "disk full"
    port, stop = _pynetdicom_scp({CTImageStorage: warning, MRImageStorage: failure})
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(_testfile("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(_testfile("MR_small.dcm"), folder / "mr.dcm")
    try:
        result = _send(folder, port)
    finally:
        stop()

    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        result.stdout.splitlines()[0],
        f"  {folder / 'mr.dcm'}: status 0xA700 Refused: Out of Resources: disk full",
    ]
    assert result.stdout.startswith("sent 1, warnings 1, failed 1, skipped 0 (not DICOM)")


def test_sockets_have_tcp_nodelay(start_storescp: StartStorescp) -> None:
    port, _ = start_storescp()
    ae = AE(ae_title="DICOMGATE")
    assoc = scu._open_association(
        ae, "127.0.0.1", port, "STORESCP", [build_context("1.2.840.10008.1.1")], 5.0
    )
    try:
        assert assoc.dul.socket is not None
        sock = assoc.dul.socket.socket
        assert sock is not None
        nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        assoc.release()
    assert nodelay == 1
