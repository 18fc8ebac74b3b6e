"""Defects an outside probe of processing pipelines found, each checked as a user meets it:
``dicomgate process`` run as a subprocess on pydicom's own test files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_charset_files
from tests.conftest import bundled_file

from dicomgate.processing.base import ProcessingError
from dicomgate.processing.pipeline import build

DICOMGATE = str(Path(sys.executable).parent / "dicomgate")


def process(pipeline: str, *paths: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(pipeline)
    return subprocess.run(
        [DICOMGATE, "process", "--no-progress", "--pipeline", str(spec), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        check=False,
    )


def _values(ds: Dataset, keyword: str) -> list[str]:
    if keyword not in ds or ds[keyword].VM == 0:
        return []
    value = ds[keyword].value
    return [str(v) for v in value] if ds[keyword].VM > 1 else [str(value)]


def _no_sop_class() -> Path:
    """pydicom's chrSQEncoding.dcm: file meta, then a data set without SOP Class UID."""
    (path,) = get_charset_files("chrSQEncoding.dcm")
    return Path(path)


# ---- 1. lossy sources: Lossy Image Compression Ratio and Method stay paired ---------------


def test_process_keeps_lossy_ratio_and_method_paired(tmp_path: Path) -> None:
    """Both sources say Lossy Image Compression 01 and a ratio, without a method (PS3.3
    C.7.6.1.1.5 wants one method per ratio). Before: no method in the lossless outputs,
    and ratio ``19\\13.56`` with method ``ISO_15444_1`` alone after lossy JPEG 2000."""
    sources = [bundled_file("examples_ybr_color.dcm"), bundled_file("JPEG2000.dcm")]
    lossless = tmp_path / "lossless"
    run = process(
        "- transcode: {transfer_syntax: JPEG2000Lossless}\n", *sources, lossless, tmp_path=tmp_path
    )
    assert run.returncode == 0, run.stdout + run.stderr
    expected = {"examples_ybr_color.dcm": "ISO_10918_1", "JPEG2000.dcm": "ISO_15444_1"}
    for name, method in expected.items():
        out = pydicom.dcmread(lossless / name)
        assert out.LossyImageCompression == "01"
        assert _values(out, "LossyImageCompressionMethod") == [method], name
        assert len(_values(out, "LossyImageCompressionRatio")) == 1, name

    lossy = tmp_path / "lossy"
    run = process(
        "- transcode: {transfer_syntax: JPEG2000, compression_ratio: 8}\n",
        sources[0],
        lossy,
        tmp_path=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = pydicom.dcmread(lossy / "examples_ybr_color.dcm")
    assert _values(out, "LossyImageCompressionMethod") == ["ISO_10918_1", "ISO_15444_1"]
    ratios = _values(out, "LossyImageCompressionRatio")
    assert len(ratios) == 2 and ratios[0] == "19"


# ---- 2. a data set without SOP Class UID -----------------------------------------------


def test_process_refuses_an_instance_without_sop_class_and_goes_on(tmp_path: Path) -> None:
    """Before: an AttributeError traceback, rc 1, the files after it never processed and
    no summary (the probe's repro/03_process_crash.sh)."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(bundled_file("CT_small.dcm"), src / "a_ct.dcm")
    shutil.copy(_no_sop_class(), src / "m_nosop.dcm")
    shutil.copy(bundled_file("MR_small.dcm"), src / "z_after.dcm")
    out = tmp_path / "out"
    run = process("- transcode: {transfer_syntax: JPEG2000Lossless}\n", src, out, tmp_path=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert "2 processed (2 written), 1 failed, 0 skipped" in run.stdout
    (failure,) = [line for line in run.stdout.splitlines() if "m_nosop.dcm" in line]
    assert "not_storable: not a storable instance: no SOP Class UID" in failure
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "a_ct.dcm",
        "z_after.dcm",
    ]


def test_pipeline_refuses_a_stored_file_without_sop_class_with_a_reason(
    tmp_path: Path,
) -> None:
    """What a delivery worker calls (egress dispatcher): a ProcessingError dead-letters the
    job with its reason; anything else (before: AttributeError) is retried for ever as a
    "processing error"."""
    pipeline = build([{"transcode": {"transfer_syntax": "ExplicitVRLittleEndian"}}], "pipeline")
    with pytest.raises(ProcessingError) as info:
        pipeline.process_file(_no_sop_class(), tmp_path / "work")
    assert info.value.reason == "not_storable"
    assert "no SOP Class UID" in str(info.value)
