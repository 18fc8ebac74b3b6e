"""DIMSE ingest end to end: the real ``dicomgate serve`` against DCMTK echoscu/storescu.

Every test talks to the gateway over real sockets and checks what a user would notice:
the tool's output, the gateway's log, the index rows and the stored files.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pynetdicom.association import Association
from tests.conftest import (
    DICOMGATE,
    Corpus,
    GatewayProcess,
    bundled_file,
    dcmtk_env,
    needs_dcmtk,
    sop_uid_of,
)

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]

# storescu proposes only uncompressed syntaxes unless told otherwise; one run per flag
# sends each bundled file in its own transfer syntax (storescu -R: required contexts only).
TRANSFER_SYNTAX_FILES: dict[str, list[str]] = {
    "-xe": ["CT_small.dcm", "MR_small.dcm", "waveform_ecg.dcm", "test-SR.dcm"],  # explicit LE
    "-xi": ["MR_small_implicit.dcm"],  # implicit VR little endian
    "-xb": ["MR_small_bigendian.dcm"],  # explicit VR big endian (retired)
    "-xd": ["image_dfl.dcm"],  # deflated explicit VR little endian
    "-xy": ["SC_rgb_jpeg_dcmtk.dcm"],  # JPEG baseline (process 1)
    "-xx": ["JPGExtended.dcm"],  # JPEG extended (process 2 & 4)
    "-xs": ["SC_rgb_jpeg_gdcm.dcm"],  # JPEG lossless SV1
    "-xt": ["MR_small_jpeg_ls_lossless.dcm"],  # JPEG-LS lossless
    "-xv": ["MR_small_jp2klossless.dcm", "GDCMJ2K_TextGBR.dcm"],  # JPEG 2000 lossless
    "-xw": ["JPEG2000.dcm", "693_J2KI.dcm"],  # JPEG 2000
    "-xr": ["MR_small_RLE.dcm", "SC_rgb_rle.dcm"],  # RLE lossless
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bundled files carry a few odd values on purpose
        return pydicom.dcmread(path)


def _compared(ds: Dataset) -> list[BaseTag]:
    # storescu itself drops Data Set Trailing Padding (FFFC,FFFC) and may drop or add
    # group lengths when it encodes the data set for the wire (PS3.10 7.2, PS3.5 7.2).
    return [e.tag for e in ds if e.tag != 0xFFFCFFFC and e.tag.element != 0]


def assert_same_dataset(sent: Path, stored: Path) -> None:
    """The stored data set equals the sent one, element by element (file meta aside)."""
    a, b = _read(sent), _read(stored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tags_a = _compared(a)
        tags_b = _compared(b)
        assert tags_a == tags_b, f"{sent.name}: elements differ"
        for tag in tags_a:
            ea, eb = a[tag], b[tag]
            if tag == 0x7FE00010 and a.file_meta.TransferSyntaxUID.is_compressed:
                # A few bundled files label encapsulated Pixel Data OW; DCMTK sends OB.
                assert {ea.VR, eb.VR} <= {"OB", "OW"}
            else:
                assert ea.VR == eb.VR, f"{sent.name} {tag}: VR {ea.VR} != {eb.VR}"
            assert ea.value == eb.value, f"{sent.name} {tag}: value differs"


def assert_indexed_as_stored(gw: GatewayProcess, row: dict[str, object]) -> Path:
    path = gw.stored_path(row)
    assert path.is_file(), path
    assert row["size"] == path.stat().st_size
    assert row["sha256"] == _sha256(path)
    return path


# -- association acceptance -----------------------------------------------------------------


def test_echoscu_succeeds(gateway: Gateway) -> None:
    gw = gateway()
    result = gw.echoscu("-v")
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr
    assert gw.log_count("association.accepted") == 1


def test_wrong_called_ae_is_rejected(gateway: Gateway) -> None:
    gw = gateway()
    result = gw.echoscu(called="NOTME")
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr
    assert "Called AE Title Not Recognized" in result.stderr
    gw.wait_log("association.rejected")
    assert "'NOTME'" in gw.log_text()
    storescu = gw.storescu([bundled_file("CT_small.dcm")], called="NOTME")
    assert storescu.returncode != 0
    assert "Association Rejected" in storescu.stdout
    assert gw.index.count_instances() == 0


def test_calling_ae_allow_list_with_wildcards(gateway: Gateway) -> None:
    gw = gateway({"dimse": {"allowed_calling_aets": ["CT*"]}})
    assert gw.echoscu("-aet", "CT01").returncode == 0
    rejected = gw.echoscu("-aet", "MR01")
    assert rejected.returncode != 0
    assert "Calling AE Title Not Recognized" in rejected.stderr
    gw.wait_log("association.rejected")
    assert "calling AE title 'MR01' is not allowed" in gw.log_text()


# -- storage --------------------------------------------------------------------------------


def test_storescu_many_transfer_syntaxes(gateway: Gateway) -> None:
    gw = gateway()
    sent: list[Path] = []
    for flag, names in TRANSFER_SYNTAX_FILES.items():
        files = [bundled_file(name) for name in names]
        result = gw.storescu(files, "-v", "-R", flag)
        assert result.returncode == 0, f"{flag}: {result.stdout}\n{gw.log_tail()}"
        assert result.stdout.count("Received Store Response (Success)") == len(files), result.stdout
        sent += files
    for path in sent:
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        sop, ts = str(meta.SOPInstanceUID), str(meta.file_meta.TransferSyntaxUID)
        # Several bundled files are one instance in different syntaxes (policy keep_both).
        rows = [r for r in gw.index.instances(sop) if r["transfer_syntax_uid"] == ts]
        assert len(rows) == 1, f"{path.name}: {len(rows)} rows in {ts}"
        row = rows[0]
        assert row["sop_class_uid"] == meta.SOPClassUID
        assert row["calling_ae"] == "STORESCU"
        stored = assert_indexed_as_stored(gw, row)
        stored_meta = pydicom.dcmread(stored, stop_before_pixels=True)
        assert stored_meta.file_meta.TransferSyntaxUID == ts
        assert stored_meta.file_meta.MediaStorageSOPInstanceUID == sop
        assert_same_dataset(path, stored)
    assert gw.index.count_instances(current_only=False) == len(sent)


def _variant(src: Path, dest: Path, description: str) -> Path:
    """Same SOP Instance UID as ``src``, different content."""
    ds = pydicom.dcmread(src)
    ds.StudyDescription = description
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _series_files(gw: GatewayProcess, row: dict[str, object]) -> list[Path]:
    return sorted(gw.stored_path(row).parent.glob("*.dcm"))


def test_duplicate_keep_both(gateway: Gateway, corpus: Corpus, tmp_path: Path) -> None:
    first = corpus.mr("dup", 1, seed=7)[0]
    second = _variant(first, tmp_path / "second.dcm", "SECOND VERSION")
    sop = sop_uid_of(first)
    gw = gateway({"storage": {"duplicates": "keep_both"}})
    assert gw.storescu([first]).returncode == 0
    assert gw.storescu([second]).returncode == 0
    rows = gw.index.instances(sop)
    assert len(rows) == 2
    for row in rows:
        assert_indexed_as_stored(gw, row)
    current = gw.index.instance(sop)
    assert current is not None
    assert current["sha256"] == rows[-1]["sha256"] != rows[0]["sha256"]
    assert pydicom.dcmread(gw.stored_path(current)).StudyDescription == "SECOND VERSION"
    assert len(_series_files(gw, current)) == 2
    assert gw.index.count_instances() == 1


def test_duplicate_reject(gateway: Gateway, corpus: Corpus, tmp_path: Path) -> None:
    first = corpus.mr("dup", 1, seed=7)[0]
    second = _variant(first, tmp_path / "second.dcm", "SECOND VERSION")
    sop = sop_uid_of(first)
    gw = gateway({"storage": {"duplicates": "reject"}})
    assert gw.storescu([first]).returncode == 0
    result = gw.storescu([second], "-v")
    assert result.returncode != 0
    assert "Received Store Response (Success)" not in result.stdout
    # 0x0111 Duplicate SOP Instance (PS3.7 C.5); DCMTK names it "Unknown Status: 0x111".
    assert re.search(r"Received Store Response \(.*0x111\)", result.stdout), result.stdout
    rows = gw.index.instances(sop)
    assert len(rows) == 1
    stored = assert_indexed_as_stored(gw, rows[0])
    assert pydicom.dcmread(stored).StudyDescription != "SECOND VERSION"
    assert len(_series_files(gw, rows[0])) == 1
    gw.wait_log("instance.duplicate_rejected")


def test_duplicate_overwrite(gateway: Gateway, corpus: Corpus, tmp_path: Path) -> None:
    first = corpus.mr("dup", 1, seed=7)[0]
    second = _variant(first, tmp_path / "second.dcm", "SECOND VERSION")
    sop = sop_uid_of(first)
    gw = gateway({"storage": {"duplicates": "overwrite"}})
    assert gw.storescu([first]).returncode == 0
    assert gw.storescu([second]).returncode == 0
    rows = gw.index.instances(sop)
    assert len(rows) == 1
    stored = assert_indexed_as_stored(gw, rows[0])
    assert pydicom.dcmread(stored).StudyDescription == "SECOND VERSION"
    assert _series_files(gw, rows[0]) == [stored]


def test_parallel_storescu(gateway: Gateway, corpus: Corpus) -> None:
    gw = gateway()
    series = [corpus.mr(f"parallel{i}", 50, seed=100 + i) for i in range(8)]
    procs = [
        subprocess.Popen(
            ["storescu", "-to", "10", "-aec", gw.ae_title, "-aet", f"SENDER{i}"]
            + ["127.0.0.1", str(gw.dimse_port)]
            + [str(p) for p in files],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, files in enumerate(series)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out
        assert "Store Failed" not in out and "E:" not in out, out
    assert gw.index.count_instances() == 400
    for files in series:
        for path in (files[0], files[-1]):
            row = gw.index.instance(sop_uid_of(path))
            assert row is not None
            assert_indexed_as_stored(gw, row)
    assert "ERROR" not in gw.log_text()


# -- association limits --------------------------------------------------------------------


def _hold_association(gw: GatewayProcess, calling_ae: str) -> Association:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title)
    assert assoc.is_established
    return assoc


def test_max_associations(gateway: Gateway) -> None:
    gw = gateway({"dimse": {"max_associations": 1}})
    held = _hold_association(gw, "HOLDER")
    try:
        result = gw.echoscu("-aet", "OTHER")
        assert result.returncode != 0
        assert "Rejected Transient" in result.stderr
        assert "Local Limit Exceeded" in result.stderr
        gw.wait_log("association.rejected")
        assert "limit of 1 associations reached" in gw.log_text()
    finally:
        held.release()
    deadline = time.monotonic() + 5
    while gw.echoscu("-aet", "OTHER").returncode != 0:  # the slot frees after the release
        assert time.monotonic() < deadline, gw.log_tail()
        time.sleep(0.05)


def test_max_associations_per_ae(gateway: Gateway) -> None:
    gw = gateway({"dimse": {"max_associations_per_ae": 1}})
    held = _hold_association(gw, "HOLDER")
    try:
        same = gw.echoscu("-aet", "HOLDER")
        assert same.returncode != 0
        assert "Rejected Transient" in same.stderr
        assert "Local Limit Exceeded" in same.stderr
        assert gw.echoscu("-aet", "OTHER").returncode == 0
        gw.wait_log("association.rejected")
        assert "associations per calling AE reached" in gw.log_text()
    finally:
        held.release()


# -- HTTP health ----------------------------------------------------------------------------


def test_healthz_and_readyz(gateway: Gateway) -> None:
    gw = gateway()
    status, body = gw.http_get("/healthz")
    assert status == 200
    assert body["status"] == "ok"
    status, body = gw.http_get("/readyz")
    assert status == 200
    assert body["status"] == "ready"
    assert set(body["checks"].values()) == {"ok"}


# -- configuration errors -------------------------------------------------------------------


def _bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"storage: {{path: {tmp_path / 'data'}}}\n"
        f"database: {{url: 'sqlite:///{tmp_path / 'data' / 'index.db'}'}}\n"
        "dimse: {prot: 1}\n",
        encoding="utf-8",
    )
    return path


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [DICOMGATE, "check-config", str(_bad_config(tmp_path))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "dimse.prot" in lines[0]
    assert result.stdout == ""


def test_serve_with_bad_config_starts_nothing(tmp_path: Path) -> None:
    from tests.conftest import free_port

    config = _bad_config(tmp_path)
    port = free_port()
    text = config.read_text().replace("dimse: {prot: 1}", f"dimse: {{prot: 1, port: {port}}}")
    config.write_text(text)
    result = subprocess.run(
        [DICOMGATE, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "dimse.prot" in lines[0]
    assert not (tmp_path / "data").exists()


# -- shutdown -------------------------------------------------------------------------------


def _acknowledged(storescu_output: str) -> list[str]:
    """Files storescu saw a success for, from its ``-v`` output (in order)."""
    acked: list[str] = []
    current: str | None = None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif "Received Store Response (Success)" in line:
            assert current is not None
            acked.append(current)
            current = None
    return acked


def test_sigterm_during_storescu(gateway: Gateway, corpus: Corpus) -> None:
    grace = 1.0
    gw = gateway({"dimse": {"shutdown_grace": grace}})
    files = corpus.mr("stream", 600, seed=3)
    sender = subprocess.Popen(
        ["storescu", "-v", "-aec", gw.ae_title, "127.0.0.1", str(gw.dimse_port)]
        + [str(p) for p in files],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        gw.wait_log("instance.stored", 50, timeout=30)
        assert sender.poll() is None, "storescu finished before SIGTERM; send more files"
        started = time.monotonic()
        code = gw.terminate()
        elapsed = time.monotonic() - started
        out, _ = sender.communicate(timeout=30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert code == 0, gw.log_tail()
    assert elapsed < grace + 5, f"took {elapsed:.1f} s to stop"
    acked = _acknowledged(out)
    assert 50 <= len(acked) < len(files), out[-2000:]
    by_path = {str(p): p for p in files}
    for name in acked:
        row = gw.index.instance(sop_uid_of(by_path[name]))
        assert row is not None, f"{name} acknowledged but not indexed"
        assert_indexed_as_stored(gw, row)
    assert gw.log_count("gateway.stopped") == 1
    assert list(gw.spool.glob("*.part")) == []
