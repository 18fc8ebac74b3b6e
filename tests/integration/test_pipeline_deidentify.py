"""A route with ``pipeline: [deidentify]`` next to a plain route, end to end.

storescu -> dicomgate -> two folder destinations from the same ingest: the research
folder gets de-identified copies (no PHI byte left, UIDs replaced consistently), the
archive folder gets the stored originals byte for byte; a burned-in ultrasound
instance is never sent to the research folder but dead-lettered with the reason
``burned_in_annotation``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from tests.conftest import (
    Corpus,
    GatewayProcess,
    assert_relayed,
    needs_dcmtk,
    sop_uid_of,
    wait_until,
)

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]
SECRET = "integration-test-secret-0123456789"
PATIENT_NAME = "PHIPERSON^PLANTED"


def _ultrasound(path: Path) -> Path:
    """A small US image that says it carries burned-in text."""
    ds = pydicom.Dataset()
    sop = "1.2.826.0.1.3680043.2.1125.77.1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.77.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.77.3"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "PHI-US-0001"
    ds.Modality = "US"
    ds.BurnedInAnnotation = "YES"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((16, 16), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def archive_path(folder: Path, sop: str) -> Path:
    (path,) = [p for p in folder.rglob("*.dcm") if sop_uid_of(p) == sop]
    return path


def _jobs(gw: GatewayProcess, destination: str, state: str) -> list[dict[str, Any]]:
    status, body = gw.http_get(f"/api/queue?destination={destination}&state={state}&limit=100")
    assert status == 200, body
    jobs: list[dict[str, Any]] = body["jobs"]
    return jobs


def test_research_copy_is_deidentified_and_the_archive_gets_originals(
    gateway: Gateway, corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEID_SECRET", SECRET)  # the gateway inherits the environment
    files = corpus.mr("deid-route", 5, seed=913)
    us = _ultrasound(tmp_path / "us.dcm")
    research, archive = tmp_path / "research", tmp_path / "archive"
    gw = gateway(
        {
            "destinations": {
                "research": {"type": "folder", "path": str(research)},
                "archive": {"type": "folder", "path": str(archive)},
            },
            "routes": [
                {
                    "name": "research",
                    "match": {},
                    "pipeline": [
                        {
                            "deidentify": {
                                "profile": "basic",
                                "options": ["retain_longitudinal_modified_dates"],
                                "secret_env": "DEID_SECRET",
                            }
                        }
                    ],
                    "to": ["research"],
                },
                {"name": "archive", "match": {}, "to": ["archive"]},
            ],
        }
    )
    assert gw.storescu([*files, us]).returncode == 0

    wait_until(lambda: len(list(archive.rglob("*.dcm"))) == len(files) + 1, 30, "archive copies")
    wait_until(lambda: len(list(research.rglob("*.dcm"))) == len(files), 30, "research copies")
    wait_until(lambda: len(_jobs(gw, "research", "dead")) == 1, 30, "the US dead-lettered")

    # Archive: the stored originals, byte for byte (the store never changes, rule 4), and
    # their data sets are the ones sent.
    stored = {p.stem: p.read_bytes() for p in (gw.data / "store").rglob("*.dcm")}
    archived = {sop_uid_of(p): p.read_bytes() for p in archive.rglob("*.dcm")}
    assert set(archived) == set(stored)
    for sop, data in archived.items():
        assert_relayed(data, stored[sop])
    originals = {sop_uid_of(f): f.read_bytes() for f in [*files, us]}
    assert set(archived) == set(originals)
    for f in [*files, us]:
        archived_ds = pydicom.dcmread(archive_path(archive, sop_uid_of(f)))
        assert archived_ds == pydicom.dcmread(f)  # data set equality (file meta aside)

    # Research: no PHI byte, new UIDs consistent across the series, the marks set.
    sources = [pydicom.dcmread(f) for f in files]
    phi = {PATIENT_NAME.encode(), b"DOE^JOHN", b"REFERRER^RITA", b"GENERAL HOSPITAL"}
    for src in sources:
        phi |= {str(src.PatientID).encode(), str(src.AccessionNumber).encode()}
        phi |= {str(src.StudyInstanceUID).encode(), str(src.SOPInstanceUID).encode()}
        phi |= {str(src.StudyDate).encode(), str(src.PatientBirthDate).encode()}
    outputs = [pydicom.dcmread(p) for p in research.rglob("*.dcm")]
    for path in research.rglob("*.dcm"):
        data = path.read_bytes()
        assert [s for s in phi if s in data] == []
    assert {o.PatientIdentityRemoved for o in outputs} == {"YES"}
    assert len({o.StudyInstanceUID for o in outputs}) == 1
    assert len({o.SeriesInstanceUID for o in outputs}) == 1
    assert len({o.PatientID for o in outputs}) == 1
    assert {o.SOPInstanceUID for o in outputs}.isdisjoint(originals)
    assert {o.StudyDate for o in outputs} != {sources[0].StudyDate}
    assert all(o.DeidentificationMethodCodeSequence[1].CodeValue == "113107" for o in outputs)

    # The burned-in instance: refused for research (never sent), delivered to the archive.
    (dead,) = _jobs(gw, "research", "dead")
    assert dead["sop_instance_uid"] == sop_uid_of(us)
    assert str(dead["last_error"]).startswith("burned_in_annotation")
    assert PATIENT_NAME not in str(dead) and "PHI-US-0001" not in str(dead)
    assert _jobs(gw, "archive", "dead") == []
