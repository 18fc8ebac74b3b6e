"""The patient attributes of a study are its own instances' (PS3.4 C.6.2.1), over QIDO-RS
and C-FIND, as Orthanc answers them too.

Before, the index kept one Patient Module per Patient ID (and Issuer), rewritten by the
last instance stored: two studies of one Patient ID under two names both showed the
latest name, the other one was not found by its own name, and every study without a
Patient ID (emergency registrations, unknown patients) showed one patient's name.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from tests.conftest import GatewayProcess, Orthanc, needs_dcmtk
from tests.corpus import make_mr_series
from tests.integration.test_qido_orthanc import _upload
from tests.integration.test_qr_scp import STUDY_ROOT, findscu

pytestmark = [pytest.mark.timeout(180), needs_dcmtk]

# (patient ID, name, birth date, sex) per study: P1 renamed between two visits; two
# patients registered without an ID.
STUDIES = {
    "first-visit": ("PPS1", "Doe^John", "19500101", "M"),
    "second-visit": ("PPS1", "Doe^Johnny", "19500101", "M"),
    "unknown-1": ("", "Anon^One", "19800101", "F"),
    "unknown-2": ("", "Anon^Two", "19900101", "M"),
}


def _corpus(folder: Path) -> tuple[list[Path], dict[str, str]]:
    files, study_of = [], {}
    for seed, (key, (pid, name, birth, sex)) in enumerate(STUDIES.items(), start=960):
        for path in make_mr_series(folder / key, 2, seed=seed):
            ds = pydicom.dcmread(path)
            ds.PatientID, ds.PatientName = pid, name
            ds.PatientBirthDate, ds.PatientSex = birth, sex
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            study_of[key] = str(ds.StudyInstanceUID)
    return files, study_of


def _qido(base: str, query: str = "") -> dict[str, str]:
    """StudyInstanceUID -> PatientName of every study a QIDO-RS study search returns."""
    url = f"{base}studies?includefield=00100010" + (f"&{query}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        found: list[dict[str, Any]] = json.loads(response.read())
    return {
        r["0020000D"]["Value"][0]: r["00100010"]["Value"][0]["Alphabetic"]
        for r in found
        if "Value" in r.get("00100010", {})
    }


def test_each_study_answers_with_its_own_patient_like_orthanc(
    gateway: Any, orthanc: Orthanc, tmp_path: Path
) -> None:
    files, study_of = _corpus(tmp_path / "corpus")
    gw: GatewayProcess = gateway()
    sent = gw.storescu(files)
    assert sent.returncode == 0, sent.stdout
    _upload(orthanc, files)
    ours, theirs = gw.url("/dicomweb/"), f"http://127.0.0.1:{orthanc.http_port}/dicom-web/"
    expected = {study_of[key]: spec[1] for key, spec in STUDIES.items()}

    assert _qido(ours) == expected
    assert _qido(theirs) == expected  # what the cross-check server answers
    for key, (_, name, _, _) in STUDIES.items():
        assert _qido(ours, f"PatientName={name}") == {study_of[key]: name}, name
        assert _qido(theirs, f"PatientName={name}") == {study_of[key]: name}, name
    # Both visits are still found by the Patient ID.
    visits = {study_of["first-visit"], study_of["second-visit"]}
    assert set(_qido(ours, "PatientID=PPS1")) == visits

    # C-FIND, Study Root, study level: the same names.
    answer = findscu(
        gw,
        STUDY_ROOT,
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "PatientName": "Anon^One"},
        tmp_path / "find",
    )
    assert answer.returncode == 0, answer.output
    assert [(str(r.StudyInstanceUID), str(r.PatientName)) for r in answer.responses] == [
        (study_of["unknown-1"], "Anon^One")
    ]


def test_qido_sequence_matching_finds_any_request_item(gateway: Any, tmp_path: Path) -> None:
    """Two instances of one series: the first fulfils two requested procedures (RPX, RPY),
    the second one (RPZ). A series search on any of them finds the series (PS3.4
    C.2.2.2.6); before, only RPZ did (the first item of the last instance stored)."""
    from pydicom.dataset import Dataset as Item

    files = make_mr_series(tmp_path / "requests", 2, seed=971)
    for path, procedures in zip(files, (["RPX", "RPY"], ["RPZ"]), strict=True):
        ds = pydicom.dcmread(path)
        items = []
        for procedure in procedures:
            item = Item()
            item.RequestedProcedureID = procedure
            items.append(item)
        ds.RequestAttributesSequence = items
        ds.save_as(path, enforce_file_format=True)
    series = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    gw: GatewayProcess = gateway()
    assert gw.storescu(files).returncode == 0
    for procedure, expected in (
        ("RPX", [series]),
        ("RPY", [series]),
        ("RPZ", [series]),
        ("RPW", []),
    ):
        url = gw.url(f"/dicomweb/series?RequestAttributesSequence.RequestedProcedureID={procedure}")
        with urllib.request.urlopen(url, timeout=10) as response:
            found = [r["0020000E"]["Value"][0] for r in json.loads(response.read())]
        assert found == expected, procedure
