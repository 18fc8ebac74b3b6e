"""An instance whose UIDs slip from PS3.5 9.1 (a letter) is stored as received, and is
then found by those UIDs everywhere a client can name one.

Old modalities and hand-made test objects write such UIDs. Ingest keeps them (a gateway
forwards, it does not repair), so refusing them as query keys made a stored image
unreachable: QIDO-RS, C-FIND, C-GET and FHIR answered "not a UID" for a study WADO-RS
served, and STOW-RS refused the same file DIMSE took. Real peers: DCMTK ``storescu``,
``findscu`` and ``getscu``; ``httpx`` for STOW-RS, QIDO-RS, WADO-RS and FHIR.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from tests.conftest import GatewayProcess, loaded_gateway, needs_dcmtk
from tests.integration.test_qr_scp import findscu, getscu
from tests.integration.test_stow import multipart, post

pytestmark = [
    pytest.mark.timeout(180),
    needs_dcmtk,
    # pydicom reading the answers warns of the letter: the point here
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]

STUDY = "1.2.826.0.1.3680043.10.1234.77a"  # a letter: a slip from PS3.5 9.1
SERIES = STUDY + ".1"
BY_DIMSE = SERIES + ".1"  # SOP Instance UIDs with the letter too
BY_STOW = SERIES + ".2b"


def _part10(sop_uid: str) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.PatientID, ds.PatientName = "SLIP1", "SLIP^UID"
    ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20260101", "OT", 1, 1
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    buffer = io.BytesIO()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("uid-slips")
    first = root / "by-dimse.dcm"
    first.write_bytes(_part10(BY_DIMSE))
    with loaded_gateway(root / "gw", [first]) as gateway:
        yield gateway


def _get(gw: GatewayProcess, path: str) -> httpx.Response:
    return httpx.get(gw.url(path), timeout=30)


def test_stow_rs_takes_the_file_dimse_took(gw: GatewayProcess) -> None:
    """Its SOP Instance UID holds a letter: refused as 'malformed' by STOW-RS (409) while
    C-STORE had stored the same kind of file."""
    r = post(gw, multipart([_part10(BY_STOW)]))
    assert r.status_code == 200, r.text
    assert gw.index.count_instances() == 2


def test_qido_rs_finds_it_by_its_uids(gw: GatewayProcess) -> None:
    post(gw, multipart([_part10(BY_STOW)]))  # again: stored once, whatever the test order
    studies = _get(gw, f"/dicomweb/studies?StudyInstanceUID={STUDY}")
    assert studies.status_code == 200, studies.text
    assert [s["0020000D"]["Value"][0] for s in studies.json()] == [STUDY]
    series = _get(gw, f"/dicomweb/studies/{STUDY}/series")
    assert series.status_code == 200, series.text
    assert [s["0020000E"]["Value"][0] for s in series.json()] == [SERIES]
    instances = _get(gw, f"/dicomweb/studies/{STUDY}/series/{SERIES}/instances")
    assert instances.status_code == 200, instances.text
    assert sorted(i["00080018"]["Value"][0] for i in instances.json()) == [BY_DIMSE, BY_STOW]
    listed = _get(gw, f"/dicomweb/instances?SOPInstanceUID={BY_STOW}")
    assert [i["00080018"]["Value"][0] for i in listed.json()] == [BY_STOW]
    # its RetrieveURL is served
    retrieve = httpx.get(
        instances.json()[0]["00081190"]["Value"][0],
        headers={"accept": 'multipart/related; type="application/dicom"'},
        timeout=30,
    )
    assert retrieve.status_code == 200


def test_c_find_and_c_get_find_it_by_its_uids(gw: GatewayProcess, tmp_path: Path) -> None:
    found = findscu(
        gw, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY}, tmp_path / "f"
    )
    assert found.final == 0x0000, found.output[-2000:]
    assert found.values("StudyInstanceUID") == [STUDY]
    image = findscu(
        gw,
        "-S",
        {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": STUDY,
            "SeriesInstanceUID": SERIES,
            "SOPInstanceUID": BY_DIMSE,
        },
        tmp_path / "i",
    )
    assert image.values("SOPInstanceUID") == [BY_DIMSE]
    got = getscu(
        gw,
        "-S",
        {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": STUDY, "SOPInstanceUID": BY_DIMSE},
        tmp_path / "g",
    )
    assert got.final == 0x0000, got.output[-2000:]
    received = [pydicom.dcmread(p) for p in (tmp_path / "g").iterdir()]
    assert [str(ds.SOPInstanceUID) for ds in received] == [BY_DIMSE]


def test_fhir_imaging_study_by_id_and_identifier(gw: GatewayProcess) -> None:
    read = _get(gw, f"/fhir/ImagingStudy/{STUDY}")
    assert read.status_code == 200, read.text
    assert read.json()["id"] == STUDY
    search = _get(gw, f"/fhir/ImagingStudy?identifier=urn:oid:{STUDY}")
    assert search.status_code == 200, search.text
    assert [e["resource"]["id"] for e in search.json()["entry"]] == [STUDY]


@pytest.mark.parametrize(
    "path",
    [
        "/dicomweb/studies?StudyInstanceUID=1.2%2F3",  # a character no stored UID holds
        "/dicomweb/studies/1.2%203/series",
        "/dicomweb/instances?SOPInstanceUID=" + "1" * 65,  # longer than any UID
    ],
)
def test_what_no_stored_uid_can_be_is_still_400(gw: GatewayProcess, path: str) -> None:
    r = _get(gw, path)
    assert r.status_code == 400, r.text
    assert "not a UID" in r.json()["error"]
