"""The synthetic corpus generator makes valid, deterministic Part 10 files."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.corpus import make_ct_series, make_large_instance, make_mr_series  # noqa: E402


def _valid_uid(uid: str) -> bool:
    return (
        uid.startswith("2.25.")
        and len(uid) <= 64
        and uid[5:].isdigit()
        and (uid[5] != "0" or uid == "2.25.0")
    )


def test_mr_series_reads_back(tmp_path: Path) -> None:
    paths = make_mr_series(tmp_path / "mr", 20, seed=3, patient_name="ROE^RICHARD")
    assert [p.name for p in paths] == [f"MR{i:05d}.dcm" for i in range(1, 21)]
    datasets = [pydicom.dcmread(p) for p in paths]
    for p in paths:
        assert 10_000 <= p.stat().st_size <= 14_000
    for i, ds in enumerate(datasets, start=1):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == MRImageStorage
        assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "MR"
        assert ds.PatientName == "ROE^RICHARD"
        assert ds.SpecificCharacterSet == "ISO_IR 100"
        assert ds.InstanceNumber == i
        assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (64, 64, 16)
        assert len(ds.PixelData) == 64 * 64 * 2
        assert ds.pixel_array.shape == (64, 64)
        assert int(ds.pixel_array.max()) < 2**12
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert _valid_uid(uid), uid
    # One study, one series, unique instances; patient attributes shared.
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 20
    assert len({(ds.PatientID, ds.PatientBirthDate, ds.PatientSex) for ds in datasets}) == 1
    # Private scanner block the standardize step can read.
    block = datasets[0].private_block(0x0019, "SIEMENS MR HEADER")
    assert block[0x0C].value in (0, 500, 1000)


def test_series_are_deterministic_and_seeded(tmp_path: Path) -> None:
    a = make_mr_series(tmp_path / "a", 3, seed=7)
    b = make_mr_series(tmp_path / "b", 3, seed=7)
    c = make_mr_series(tmp_path / "c", 3, seed=8)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    uids_a = {pydicom.dcmread(p).SOPInstanceUID for p in a}
    uids_c = {pydicom.dcmread(p).SOPInstanceUID for p in c}
    assert not uids_a & uids_c
    ct = pydicom.dcmread(make_ct_series(tmp_path / "ct", 1, seed=7)[0])
    assert ct.StudyInstanceUID != pydicom.dcmread(a[0]).StudyInstanceUID


def test_ct_series_reads_back(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "ct", 4, seed=1)
    datasets = [pydicom.dcmread(p) for p in paths]
    for p in paths:
        assert 512 * 1024 <= p.stat().st_size <= 540 * 1024
    for ds in datasets:
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert len(ds.PixelData) == 512 * 512 * 2
        assert ds.RescaleIntercept == -1024
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 4
    assert datasets[0].PixelData != datasets[1].PixelData


def test_zero_count_makes_nothing(tmp_path: Path) -> None:
    assert make_mr_series(tmp_path / "none", 0) == []


def test_large_instance_about_50_mb(tmp_path: Path) -> None:
    size = 50 * 1024 * 1024
    path = make_large_instance(tmp_path / "big.dcm", size)
    actual = path.stat().st_size
    assert abs(actual - size) < 512 * 1024
    assert actual % 2 == 0
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SOPClassUID == MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert _valid_uid(ds.SOPInstanceUID)
    frame_bytes = ds.Rows * ds.Columns * ds.BitsAllocated // 8
    assert int(ds.NumberOfFrames) == 100
    # Pixel Data is the last element, and its VL is right and ends exactly at EOF.
    pixel_len = int(ds.NumberOfFrames) * frame_bytes
    with open(path, "rb") as fh:
        fh.seek(actual - pixel_len - 12)
        group, element, vr, _, length = struct.unpack("<HH2sHI", fh.read(12))
    assert (group, element, vr, length) == (0x7FE0, 0x0010, b"OW", pixel_len)
    assert len(pydicom.dcmread(path).PixelData) == pixel_len


def test_large_instance_small_sizes(tmp_path: Path) -> None:
    path = make_large_instance(tmp_path / "tiny.dcm", 10_000)
    ds = pydicom.dcmread(path)
    n = int(ds.NumberOfFrames)
    assert n >= 1
    assert len(ds.PixelData) == n * ds.Rows * ds.Columns * 2
    assert ds.pixel_array.shape[-2:] == (ds.Rows, ds.Columns)
    with pytest.raises(ValueError):
        make_large_instance(tmp_path / "bad.dcm", 0)
    with pytest.raises(ValueError):
        make_large_instance(tmp_path / "huge.dcm", 5 * 1024**3)
    assert not (tmp_path / "huge.dcm").exists()


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="needs DCMTK dcmdump")
def test_dcmtk_accepts_files(tmp_path: Path) -> None:
    files = [
        make_mr_series(tmp_path / "mr", 1)[0],
        make_ct_series(tmp_path / "ct", 1)[0],
        make_large_instance(tmp_path / "big.dcm", 2 * 1024 * 1024),
    ]
    for f in files:
        run = subprocess.run(["dcmdump", "-M", str(f)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "E:" not in run.stderr, run.stderr


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dicom3tools")
def test_dciodvfy_finds_no_errors(tmp_path: Path) -> None:
    files = [
        make_mr_series(tmp_path / "mr", 1)[0],
        make_ct_series(tmp_path / "ct", 1)[0],
        make_large_instance(tmp_path / "big.dcm", 1024 * 1024),
    ]
    for f in files:
        run = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        errors = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, (f.name, errors)
