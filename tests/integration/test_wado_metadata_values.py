"""WADO-RS metadata of values pydicom's own JSON writer gets wrong, on a real gateway.

An instance built with pydicom (its odd values written as stored bytes) goes in by STOW-RS
and its ``/metadata`` is read back with httpx (as a strict JSON parser reads it) and with
dicomweb-client + pydicom's ``Dataset.from_json`` (a client we did not write):

- an empty value inside a multi-valued DS, IS, PN or CS is ``null`` (PS3.18 F.2.5); the
  whole attribute used to be dropped (``{"vr": "DS"}``), or an empty string sent;
- a PN value holds only its non-empty component groups (PS3.18 F.2.2);
- FL/FD infinities and NaN are strings, never the bare ``Infinity``/``NaN`` that RFC 8259
  does not allow; DS and IS text that is no JSON number is sent as that text (Table
  F.2.3-1 allows "Number or String").
"""

from __future__ import annotations

import io
import json
import math
import struct
import warnings
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from tests.conftest import GatewayProcess

pytestmark = pytest.mark.timeout(120)

DOE_IDEOGRAPHIC = "\u30c9\u30a6"  # ドウ, in ISO 2022 IR 87
STORED: dict[int, tuple[str, bytes]] = {  # tag -> (VR, value as stored)
    0x00080008: ("CS", b"ORIGINAL\\\\AXIAL"),  # Image Type: empty second value
    0x00080090: ("PN", b"=" + DOE_IDEOGRAPHIC.encode("iso2022_jp")),  # only Ideographic
    0x00081070: ("PN", b"\\C^D"),  # Operators' Name: empty first value
    0x00101001: ("PN", b"A^B\\\\C^D"),  # Other Patient Names: empty middle value
    0x00180050: ("DS", b"1.5\\\\2"),
    0x00180088: ("DS", b"inf"),  # Spacing Between Slices: no JSON number
    0x00180091: ("IS", b"abc"),  # Echo Train Length: no number at all
    0x00189087: ("FD", struct.pack("<d", math.nan)),  # Diffusion b-value
    0x00189089: ("FD", struct.pack("<3d", 1.5, 2.5, math.inf)),  # Gradient Orientation
    0x00189098: ("FD", struct.pack("<2d", -math.inf, 64.0)),  # Transmitter Frequency
    0x00200037: ("DS", b"1\\\\0\\0\\1\\0"),  # Image Orientation (Patient)
    0x00201002: ("IS", b"\\7"),  # Images in Acquisition: empty first value
}
EXPECTED: dict[str, list[Any]] = {  # what the JSON "Value" must be
    "00080008": ["ORIGINAL", None, "AXIAL"],
    "00080090": [{"Ideographic": DOE_IDEOGRAPHIC}],
    "00081070": [None, {"Alphabetic": "C^D"}],
    "00101001": [{"Alphabetic": "A^B"}, None, {"Alphabetic": "C^D"}],
    "00180050": [1.5, None, 2.0],
    "00180088": ["inf"],
    "00180091": ["abc"],
    "00189087": ["NaN"],
    "00189089": [1.5, 2.5, "Infinity"],
    "00189098": ["-Infinity", 64.0],
    "00200037": [1.0, None, 0.0, 0.0, 1.0, 0.0],
    "00201002": [None, 7],
}


def _instance(syntax: str) -> bytes:
    """A Part 10 file holding ``STORED`` byte for byte."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "WADO-JSON"
    ds.Modality = "OT"
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    for tag, (vr, value) in STORED.items():
        if len(value) % 2:
            value += b" "
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the values it cannot read
        ds.save_as(out, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return out.getvalue()


def _stow(gw: GatewayProcess, body: bytes) -> str:
    answer = httpx.post(
        gw.url("/dicomweb/studies"),
        content=body,
        headers={"Content-Type": "application/dicom"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True)
    return (
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def _strict_json(text: str) -> Any:
    """RFC 8259 JSON: Python's parser takes NaN and Infinity unless told not to."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON (RFC 8259 section 6)")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_metadata_keeps_empty_values_pn_groups_and_non_finite_numbers(
    gateway: Callable[..., GatewayProcess], syntax: str
) -> None:
    gw = gateway()
    instance = _stow(gw, _instance(syntax))
    response = httpx.get(gw.url(f"/dicomweb{instance}/metadata"), timeout=60)
    assert response.status_code == 200, response.text
    [meta] = _strict_json(response.text)
    for key, values in EXPECTED.items():
        assert meta[key].get("Value") == values, (key, meta[key])
    # The same through a client we did not write, back into a pydicom data set.
    study, series, sop = instance.split("/")[2::2]
    client = DICOMwebClient(url=gw.url("/dicomweb"))
    got = client.retrieve_instance_metadata(study, series, sop)
    assert got["00180091"] == {"vr": "IS", "Value": ["abc"]}
    del got["00180091"]  # pydicom refuses an IS that is no number (JavaScript takes it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = Dataset.from_json(got)
        assert list(ds.ImageOrientationPatient) == [1, None, 0, 0, 1, 0]
        assert list(ds.SliceThickness) == [1.5, None, 2]
        assert list(ds.ImageType) == ["ORIGINAL", "", "AXIAL"]
        assert [str(n) for n in ds.OtherPatientNames] == ["A^B", "", "C^D"]
        assert str(ds.ReferringPhysicianName) == "=" + DOE_IDEOGRAPHIC
        orientation = ds[0x00189089].value
        assert orientation[:2] == [1.5, 2.5] and orientation[2] == math.inf
        assert math.isnan(ds[0x00189087].value)
        assert ds[0x00189098].value[0] == -math.inf
    assert gw.running()
