"""Frame defaults (PS3.18 8.7.3.3) and DICOM JSON values (PS3.18 F.2) of WADO-RS, in
process: ``wado.frame_encoding`` and ``dicomjson.instance_json`` on files written here."""

from __future__ import annotations

import io
import json
import math
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomgate.dicomweb.dicomjson import bulk_path, encode_json, instance_json
from dicomgate.dicomweb.negotiate import FrameEncoding, parse_accept
from dicomgate.dicomweb.wado import frame_encoding

LE = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"
JLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG = "1.2.840.10008.1.2.4.50"
MPEG4 = "1.2.840.10008.1.2.4.102"
DECODED = FrameEncoding("application/octet-stream", LE, True)
ANY_SYNTAX = "multipart/related; type=application/octet-stream; transfer-syntax=*"


@pytest.mark.parametrize(
    ("accept", "stored", "chosen"),
    [
        # No transfer syntax named: Explicit VR Little Endian, decoded (8.7.3.3) ...
        (None, RLE, DECODED),
        ("*/*", JLS_LOSSLESS, DECODED),
        ('multipart/related; type="*/*"', J2K_LOSSLESS, DECODED),
        ("multipart/related", RLE, DECODED),
        ("multipart/*", RLE, DECODED),
        # ... except lossy pixel data, sent as stored in its own type.
        (None, JPEG, FrameEncoding("image/jpeg", JPEG, False)),
        ("*/*", MPEG4, FrameEncoding("video/mp4", MPEG4, False)),
        # Named explicitly, the stored form.
        ("*/*; transfer-syntax=*", RLE, FrameEncoding("image/dicom-rle", RLE, False)),
        (
            'multipart/related; type="image/dicom-rle"',
            RLE,
            FrameEncoding("image/dicom-rle", RLE, False),
        ),
        ('multipart/related; type="image/*"', RLE, FrameEncoding("image/dicom-rle", RLE, False)),
        (ANY_SYNTAX, RLE, FrameEncoding("application/octet-stream", RLE, False)),
        # The first acceptable range decides: here the client prefers the stored form.
        (
            'multipart/related; type="image/jls", */*;q=0.5',
            JLS_LOSSLESS,
            FrameEncoding("image/jls", JLS_LOSSLESS, False),
        ),
        (None, LE, FrameEncoding("application/octet-stream", LE, False)),
    ],
)
def test_frame_encoding_defaults_to_explicit_little_endian(
    accept: str | None, stored: str, chosen: FrameEncoding
) -> None:
    assert frame_encoding(parse_accept(accept), stored) == chosen


def _file(tmp_path: Path, elements: dict[int, tuple[str, bytes]]) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    for tag, (vr, value) in elements.items():
        if len(value) % 2:
            value += b" "
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(out, enforce_file_format=True)
    path = tmp_path / "instance.dcm"
    path.write_bytes(out.getvalue())
    return path


def _values(tmp_path: Path, vr: str, stored: bytes, tag: int = 0x00091010) -> Any:
    meta = instance_json(_file(tmp_path, {tag: (vr, stored)}), "http://gw/i")
    return meta[f"{tag:08X}"].get("Value")


@pytest.mark.parametrize(
    ("vr", "stored", "values"),
    [
        ("DS", b"1\\\\0\\0\\1\\0", [1.0, None, 0.0, 0.0, 1.0, 0.0]),  # PS3.18 F.2.5
        ("IS", b"\\7", [None, 7]),
        ("IS", b" 1.0 ", [1]),  # as pydicom reads it
        ("DS", b"1e999\\-inf\\NaN", ["1e999", "-inf", "NaN"]),  # no JSON number: the text
        ("IS", b"1_0", ["1_0"]),  # Python's int() takes it, DICOM does not
        ("CS", b"ORIGINAL\\\\AXIAL", ["ORIGINAL", None, "AXIAL"]),
        ("LO", b"\\", [None, None]),
        ("PN", b"A^B\\\\C^D", [{"Alphabetic": "A^B"}, None, {"Alphabetic": "C^D"}]),
        ("PN", b"=C^D=E^F", [{"Ideographic": "C^D", "Phonetic": "E^F"}]),  # PS3.18 F.2.2
        ("PN", b"==", None),  # no group at all: no value
        ("FD", struct.pack("<3d", math.inf, -math.inf, 0.5), ["Infinity", "-Infinity", 0.5]),
        ("FL", struct.pack("<f", math.nan), ["NaN"]),
        ("AT", b"\x10\x00\x20\x00", ["00100020"]),
        ("US", b"\x01\x00\x02\x00", [1, 2]),
        ("DS", b"", None),
    ],
)
def test_json_values(tmp_path: Path, vr: str, stored: bytes, values: Any) -> None:
    assert _values(tmp_path, vr, stored) == values


def test_json_is_strict_and_bulk_paths_are_canonical(tmp_path: Path) -> None:
    path = _file(tmp_path, {0x00189089: ("FD", struct.pack("<d", math.inf))})
    text = encode_json(instance_json(path, "http://gw/i")).decode()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}"))
    with pytest.raises(ValueError):
        encode_json({"x": math.nan})
    assert bulk_path("7fe00010") == "7FE00010"
    assert bulk_path("00400275/00/0009a010") == "00400275/0/0009A010"
    with pytest.raises(ValueError):
        bulk_path("7FE00010/frames/1")
