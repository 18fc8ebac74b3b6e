"""``dicomgate process``: the batch CLI over real folders, run as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from tests.conftest import Corpus, bundled_file

DICOMGATE = str(Path(sys.executable).parent / "dicomgate")
SECRET_ENV = {"DEID_SECRET": "a batch secret of 16+ characters"}

PIPELINE = """\
pipeline:
  - deidentify:
      secret_env: DEID_SECRET
      options: [retain_longitudinal_modified_dates]
  - transcode: {transfer_syntax: RLELossless}
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DICOMGATE, "process", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env if env is not None else SECRET_ENV)},
        check=False,
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture
def source(tmp_path: Path, corpus: Corpus) -> Path:
    """A folder as a research export looks: a series in a sub-folder, a loose file, a
    file that is not DICOM, and an ultrasound that the profile must refuse unmasked."""
    src = tmp_path / "in"
    (src / "patient1" / "series1").mkdir(parents=True)
    for path in corpus.mr("batch-mr", 5, seed=11):
        shutil.copy(path, src / "patient1" / "series1" / path.name)
    shutil.copy(bundled_file("CT_small.dcm"), src / "ct.dcm")
    (src / "notes.txt").write_text("not DICOM")
    us = pydicom.dcmread(bundled_file("SC_rgb_rle.dcm"))
    us.Modality = "US"
    us.save_as(src / "patient1" / "us.dcm")
    return src


def test_process_folder_writes_deidentified_transcoded_tree(tmp_path: Path, source: Path) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE)
    out = tmp_path / "out"
    result = run("--pipeline", str(pipeline), str(source), str(out))  # the IN OUT form
    assert result.returncode == 1, result.stderr  # one instance refused
    summary = result.stdout
    assert "6 processed (6 written), 1 failed, 1 skipped (not DICOM)" in summary
    assert "us.dcm: burned_in_annotation" in summary
    written = _tree(out)
    assert sorted(written) == sorted(
        [f"patient1/series1/{p.name}" for p in (source / "patient1" / "series1").iterdir()]
        + ["ct.dcm"]
    )
    for rel in written:
        original = pydicom.dcmread(source / rel)
        ds = pydicom.dcmread(out / rel)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.SOPInstanceUID != original.SOPInstanceUID
        assert str(original.PatientName) not in str(ds.PatientName)
        assert (ds.pixel_array == original.pixel_array).all()  # lossless
    # The same input, pipeline and key: byte-identical output (and --out works too).
    again = tmp_path / "again"
    assert run("--pipeline", str(pipeline), str(source), "--out", str(again)).returncode == 1
    assert _tree(again) == written


def test_process_split_names_each_frame(tmp_path: Path) -> None:
    pipeline = tmp_path / "split.yaml"
    pipeline.write_text("- split: {}\n")
    src = bundled_file("SC_rgb_rle_2frame.dcm")  # 2 frames
    result = run("--pipeline", str(pipeline), str(src), str(tmp_path / "out"), env={})
    assert result.returncode == 0, result.stdout + result.stderr
    frames = sorted((tmp_path / "out").glob("SC_rgb_rle_2frame-*.dcm"))
    assert len(frames) == int(pydicom.dcmread(src).NumberOfFrames) > 1
    assert "1 processed (2 written), 0 failed" in result.stdout


@pytest.mark.parametrize(
    ("pipeline", "args", "message"),
    [
        ("- deidentify: {secret_env: NOT_SET_ANYWHERE}\n", ["IN", "OUT"], "secret_env"),
        ("- transcode: {transfer_syntax: NoSuchSyntax}\n", ["IN", "OUT"], "transfer_syntax"),
        ("- nosuchstep: {}\n", ["IN", "OUT"], "nosuchstep"),
        ("[]\n", ["IN", "OUT"], "non-empty list"),
        ("- split: {}\n", ["IN"], "output folder"),
        ("- split: {}\n", ["MISSING", "OUT"], "no such file"),
    ],
)
def test_process_bad_input_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, source: Path, pipeline: str, args: list[str], message: str
) -> None:
    file = tmp_path / "p.yaml"
    file.write_text(pipeline)
    paths = {"IN": str(source), "OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "nope")}
    result = run("--pipeline", str(file), *[paths[a] for a in args], env={})
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
