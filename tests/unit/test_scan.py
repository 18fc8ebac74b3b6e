"""scan_dataset: completeness check and index header, against pydicom's bundled files.

Only ``get_testdata_file(NAME)`` with names bundled in pydicom's ``data/test_files`` is used:
anything else would make pydicom try to download.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.sequence import Sequence

from dicomgate.errors import InvalidInstance
from dicomgate.ingest import _data_offset
from dicomgate.store.part10 import encode_file_meta
from dicomgate.store.scan import (
    KEEP_VALUE_MAX,
    scan_buffer,
    scan_dataset,
    stored_transfer_syntax,
)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
PIXEL_DATA = 0x7FE00010
IMPLICIT_VR_MESSAGE = "Expected explicit VR, but found implicit VR"


def _bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if not isinstance(path, str):
        raise LookupError(f"pydicom test file {name} is not bundled")
    return Path(path)


@contextmanager
def _quiet_implicit_vr() -> Iterator[None]:
    """SC_rgb_jpeg.dcm is Implicit VR under an explicit syntax; pydicom warns about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=IMPLICIT_VR_MESSAGE, category=UserWarning)
        yield


def _read(path: Path) -> Dataset:
    with _quiet_implicit_vr():
        return pydicom.dcmread(path)


def _scan_file(path: Path, end: int | None = None) -> Dataset | None:
    """Scan the data set of a Part 10 file (one with a File Meta group length)."""
    ts = str(read_file_meta_info(path).TransferSyntaxUID)
    with open(path, "rb") as fh:
        start = _data_offset(fh)
        size = path.stat().st_size if end is None else end
        return _scan(fh, start, size, ts)


def _scan(fh: BinaryIO, start: int, end: int, ts: str) -> Dataset | None:
    with _quiet_implicit_vr():
        return scan_dataset(fh, start, end, ts)


def _truncated_copy(tmp_path: Path, source: Path, length: int) -> Path:
    target = tmp_path / f"cut-{length}-{source.name}"
    target.write_bytes(source.read_bytes()[:length])
    return target


# -- complete files ------------------------------------------------------------------------

COMPLETE = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_padded.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "ExplVR_BigEnd.dcm",
    "JPEG2000.dcm",
    "JPEG-lossy.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg.dcm",
    "rtplan.dcm",
    "rtdose.dcm",
    "test-SR.dcm",
    "reportsi.dcm",
    "waveform_ecg.dcm",
    "nested_priv_SQ.dcm",
    "priv_SQ.dcm",
    "UN_sequence.dcm",
    "examples_overlay.dcm",
    "liver_1frame.dcm",
]

KEYWORDS = [
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "StudyDate",
    "SeriesNumber",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "PixelSpacing",
]


@pytest.mark.parametrize("name", COMPLETE)
def test_complete_file_passes_with_pydicom_values(name: str) -> None:
    path = _bundled(name)
    ds = _scan_file(path)
    assert ds is not None
    reference = _read(path)
    checked = 0
    for keyword in KEYWORDS:
        if keyword in reference:
            assert keyword in ds, keyword
            assert ds[keyword].value == reference[keyword].value, keyword
            checked += 1
    if name not in ("nested_priv_SQ.dcm", "priv_SQ.dcm", "UN_sequence.dcm"):
        assert checked >= 4


def test_ct_small_header_values() -> None:
    ds = _scan_file(_bundled("CT_small.dcm"))
    assert ds is not None
    assert str(ds.PatientName) == "CompressedSamples^CT1"
    assert ds.Modality == "CT"
    assert ds.Rows == 128
    assert ds.ImagePositionPatient == [-158.135803, -179.035797, -75.699997]
    assert "PixelData" not in ds  # bulk data is never read


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in COMPLETE
        if n not in ("SC_rgb_jpeg.dcm",)  # see test_implicit_encapsulated_pixel_data_kept_right
    ],
)
def test_every_kept_element_matches_dcmread(name: str) -> None:
    path = _bundled(name)
    ds = _scan_file(path)
    assert ds is not None
    reference = _read(path)
    with warnings.catch_warnings():
        # rtdose.dcm holds a UID pydicom warns about; both sides would warn alike.
        warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)
        for elem in ds:
            assert elem.tag in reference, elem.tag
            assert elem.value == reference[elem.tag].value, elem.tag


@pytest.mark.parametrize("name", COMPLETE)
def test_scan_buffer_matches_the_file_scan(name: str) -> None:
    """scan_buffer (a small spool file's in-memory copy) finds what the file scan finds."""
    path = _bundled(name)
    data = path.read_bytes()
    ts = str(read_file_meta_info(path).TransferSyntaxUID)
    with open(path, "rb") as fh:
        start = _data_offset(fh)
    with _quiet_implicit_vr():
        from_file = _scan_file(path)
        from_memory = scan_buffer(data, start, ts)
    assert from_file is not None and from_memory is not None
    assert [e.tag for e in from_memory] == [e.tag for e in from_file]
    with warnings.catch_warnings():
        # rtdose.dcm holds a UID pydicom warns about; both sides would warn alike.
        warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)
        assert all(from_memory[e.tag].value == e.value for e in from_file)
    assert from_memory.original_encoding == from_file.original_encoding


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9, 0.999])
def test_scan_buffer_refuses_a_cut_data_set(keep: float) -> None:
    path = _bundled("MR_small.dcm")
    data = path.read_bytes()
    with open(path, "rb") as fh:
        start = _data_offset(fh)
    cut = start + int((len(data) - start) * keep)
    with pytest.raises(InvalidInstance):
        scan_buffer(data[:cut], start, EXPLICIT_LE)
    with pytest.raises(InvalidInstance, match="empty"):
        scan_buffer(data[:start], start, EXPLICIT_LE)


def test_values_up_to_keep_max_are_kept_and_bulk_is_not() -> None:
    mr = _bundled("MR_small.dcm")  # every value, 8 KiB Pixel Data included, is small
    ds = _scan_file(mr)
    assert ds is not None
    assert set(ds.keys()) == set(_read(mr).keys())

    ct = _bundled("CT_small.dcm")  # 32 KiB Pixel Data
    ds = _scan_file(ct)
    assert ds is not None
    reference = _read(ct)
    assert len(reference.PixelData) > KEEP_VALUE_MAX
    assert set(ds.keys()) == set(reference.keys()) - {PIXEL_DATA}


def test_sequences_are_readable() -> None:
    path = _bundled("rtplan.dcm")
    ds = _scan_file(path)
    assert ds is not None
    reference = _read(path)
    assert isinstance(ds.BeamSequence, Sequence)
    assert len(ds.BeamSequence) == len(reference.BeamSequence)
    assert ds.BeamSequence[0].BeamName == reference.BeamSequence[0].BeamName


@pytest.mark.parametrize(
    ("name", "implicit", "little"),
    [
        ("MR_small.dcm", False, True),
        ("MR_small_bigendian.dcm", False, False),
        ("MR_small_implicit.dcm", True, True),
        ("SC_rgb_jpeg.dcm", True, True),  # Implicit VR under JPEG Baseline
    ],
)
def test_original_encoding(name: str, implicit: bool, little: bool) -> None:
    ds = _scan_file(_bundled(name))
    assert ds is not None
    assert ds.original_encoding == (implicit, little)


def test_implicit_vr_under_explicit_syntax_passes() -> None:
    path = _bundled("SC_rgb_jpeg.dcm")
    ds = _scan_file(path)
    assert ds is not None
    reference = _read(path)
    assert ds.Rows == reference.Rows
    assert ds.SOPInstanceUID == reference.SOPInstanceUID


_IMPLICIT_HEAD = struct.pack("<HHI", 0x0008, 0x0008, 24)  # (0008,0008), no VR
_EXPLICIT_HEAD = struct.pack("<HH2sH", 0x0008, 0x0008, b"CS", 24)


@pytest.mark.parametrize(
    ("received", "first", "stored"),
    [
        ("1.2.840.10008.1.2.1", _IMPLICIT_HEAD, "1.2.840.10008.1.2"),  # relabelled
        ("1.2.840.10008.1.2.1", memoryview(_IMPLICIT_HEAD), "1.2.840.10008.1.2"),
        ("1.2.840.10008.1.2.1", _EXPLICIT_HEAD, "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.1.2.1", _IMPLICIT_HEAD[:5], "1.2.840.10008.1.2.1"),  # too short
        ("1.2.840.10008.1.2", _IMPLICIT_HEAD, "1.2.840.10008.1.2"),
        # The reverse slip: Explicit VR under Implicit VR Little Endian, relabelled too.
        ("1.2.840.10008.1.2", _EXPLICIT_HEAD, "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.1.2", _EXPLICIT_HEAD[:5], "1.2.840.10008.1.2"),  # too short
        # An implicit first element of 16,705+ bytes ("AA") would look explicit; "ZZ" is no VR
        ("1.2.840.10008.1.2", struct.pack("<HH2sH", 8, 8, b"ZZ", 0), "1.2.840.10008.1.2"),
        # No Implicit VR form of these: kept (and logged by the ingestor).
        ("1.2.840.10008.1.2.4.50", _IMPLICIT_HEAD, "1.2.840.10008.1.2.4.50"),
        ("1.2.840.10008.1.2.2", _IMPLICIT_HEAD, "1.2.840.10008.1.2.2"),
        ("1.2.840.10008.1.2.1.99", _IMPLICIT_HEAD, "1.2.840.10008.1.2.1.99"),
    ],
)
def test_stored_transfer_syntax(received: str, first: bytes | memoryview, stored: str) -> None:
    assert stored_transfer_syntax(received, first) == stored


def test_relabelled_file_scans_as_implicit_without_pydicom_warning(tmp_path: Path) -> None:
    """The scan and the relabel agree: a file written with the relabelled meta scans as
    Implicit VR and pydicom reads it without "Expected explicit VR" (an error here)."""
    source = _bundled("MR_small_implicit.dcm")
    raw = source.read_bytes()
    with source.open("rb") as fh:
        data = raw[_data_offset(fh) :]
    ref = _read(source)
    syntax = stored_transfer_syntax("1.2.840.10008.1.2.1", data)
    header = encode_file_meta(str(ref.SOPClassUID), str(ref.SOPInstanceUID), syntax)
    path = tmp_path / "relabelled.dcm"
    path.write_bytes(header + data)
    with path.open("rb") as fh:
        ds = scan_dataset(fh, len(header), len(header) + len(data), syntax)
    assert ds.original_encoding == (True, True)
    assert pydicom.dcmread(path).PixelData == ref.PixelData


def test_implicit_encapsulated_pixel_data_kept_right() -> None:
    path = _bundled("SC_rgb_jpeg.dcm")
    ds = _scan_file(path)
    assert ds is not None
    if "PixelData" in ds:
        assert ds.PixelData == _read(path).PixelData


def test_deflated_is_inflated_and_scanned() -> None:
    path = _bundled("image_dfl.dcm")
    ds = _scan_file(path)
    assert ds is not None
    full = _read(path)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "Rows", "Columns"):
        assert getattr(ds, keyword) == getattr(full, keyword)
    with open(path, "rb") as fh:
        start = _data_offset(fh)
    assert scan_buffer(path.read_bytes(), start, DEFLATED) is None  # the caller scans the file


def _deflated_file(tmp_path: Path, data_set: bytes, *, finish: bool = True) -> Path:
    """A Part 10 file of ``data_set`` (explicit VR LE) under the deflated syntax."""
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = deflater.compress(data_set) + (deflater.flush() if finish else b"")
    meta = encode_file_meta("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", DEFLATED)
    path = tmp_path / f"deflated-{len(data_set)}-{finish}.dcm"
    path.write_bytes(meta + stream)
    return path


def _explicit_le(path: Path) -> bytes:
    """The data set of ``path`` encoded explicit VR little endian."""
    with open(path, "rb") as fh:
        start = _data_offset(fh)
        return fh.read()[start - 144 :]


@pytest.mark.parametrize("cut", ["stream ends early", "half the data set", "one byte short"])
def test_deflated_truncated_is_invalid(tmp_path: Path, cut: str) -> None:
    """pydicom inflates all of these without complaint: half an image would be stored."""
    data_set = _explicit_le(_bundled("CT_small.dcm"))
    if cut == "stream ends early":
        path = _deflated_file(tmp_path, data_set, finish=False)
    else:
        keep = len(data_set) // 2 if cut == "half the data set" else len(data_set) - 1
        path = _deflated_file(tmp_path, data_set[:keep])
    with pytest.raises(InvalidInstance, match=r"truncated|past the end"):
        _scan_file(path)


def test_deflated_garbage_is_invalid(tmp_path: Path) -> None:
    path = _deflated_file(tmp_path, _explicit_le(_bundled("CT_small.dcm")))
    raw = bytearray(path.read_bytes())
    with open(path, "rb") as fh:
        start = _data_offset(fh)
    raw[start : start + 64] = bytes(b ^ 0x5A for b in raw[start : start + 64])
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidInstance, match="does not inflate"):
        _scan_file(path)


def test_large_deflated_data_set_is_inflated_into_a_temporary_file(tmp_path: Path) -> None:
    """Inflated past 64 MiB, the rest goes to a file beside the spool file; ``room`` is
    asked at each block (a deflate bomb meets storage.min_free_bytes)."""
    ds = _read(_bundled("CT_small.dcm"))
    ds.PixelData = bytes(70 << 20)  # zeros: ~70 KB deflated
    ds["PixelData"].VR = "OB"
    del ds[0xFFFCFFFC]  # its Data Set Trailing Padding
    source = tmp_path / "source.dcm"
    ds.save_as(source, implicit_vr=False, little_endian=True, enforce_file_format=True)
    path = _deflated_file(tmp_path, _explicit_le(source))
    source.unlink()
    assert path.stat().st_size < 1 << 20
    asked = []
    with open(path, "rb") as fh:
        scanned = scan_dataset(
            fh, _data_offset(fh), path.stat().st_size, DEFLATED, room=lambda: asked.append(1)
        )
    assert scanned.SOPInstanceUID == ds.SOPInstanceUID
    assert len(asked) >= 5
    assert list(tmp_path.iterdir()) == [path]  # the temporary file is gone


def test_private_transfer_syntax_is_read_as_explicit_little_endian() -> None:
    path = _bundled("MR_small.dcm")
    with open(path, "rb") as fh:
        start = _data_offset(fh)
        ds = _scan(fh, start, path.stat().st_size, "1.3.6.1.4.1.99999.1")
    assert ds is not None
    assert ds.Rows == 64


def test_empty_data_set_is_invalid() -> None:
    path = _bundled("MR_small.dcm")
    with open(path, "rb") as fh, pytest.raises(InvalidInstance):
        _scan(fh, 200, 200, EXPLICIT_LE)


# -- truncated files -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_bundled_truncated_files_are_invalid(name: str) -> None:
    with pytest.raises(InvalidInstance):
        _scan_file(_bundled(name))


def _find(data: bytes, needle: bytes) -> int:
    pos = data.find(needle)
    assert pos > 0, needle
    return pos


PATIENT_NAME_EXPLICIT = b"\x10\x00\x10\x00PN"
PATIENT_NAME_IMPLICIT = b"\x10\x00\x10\x00"


@pytest.mark.parametrize("into_header", [1, 4, 6, 7])
def test_cut_inside_element_header(tmp_path: Path, into_header: int) -> None:
    source = _bundled("MR_small.dcm")
    cut = _find(source.read_bytes(), PATIENT_NAME_EXPLICIT) + into_header
    with pytest.raises(InvalidInstance):
        _scan_file(_truncated_copy(tmp_path, source, cut))


def test_cut_inside_long_element_header(tmp_path: Path) -> None:
    source = _bundled("MR_small.dcm")
    cut = _find(source.read_bytes(), b"\xe0\x7f\x10\x00OW") + 10  # OW: 12-byte header
    with pytest.raises(InvalidInstance):
        _scan_file(_truncated_copy(tmp_path, source, cut))


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_bigendian.dcm"])
def test_cut_inside_a_value(tmp_path: Path, name: str) -> None:
    source = _bundled(name)
    data = source.read_bytes()
    needle = b"\x00\x10\x00\x10PN" if "bigendian" in name else PATIENT_NAME_EXPLICIT
    cut = _find(data, needle) + 8 + 3
    with pytest.raises(InvalidInstance, match="past the end"):
        _scan_file(_truncated_copy(tmp_path, source, cut))


def test_cut_inside_implicit_vr_value(tmp_path: Path) -> None:
    source = _bundled("MR_small_implicit.dcm")
    data = source.read_bytes()
    start = _find(data[132:], PATIENT_NAME_IMPLICIT) + 132
    with pytest.raises(InvalidInstance):
        _scan_file(_truncated_copy(tmp_path, source, start + 9))


def test_cut_inside_native_pixel_data(tmp_path: Path) -> None:
    source = _bundled("CT_small.dcm")
    with pytest.raises(InvalidInstance):
        _scan_file(_truncated_copy(tmp_path, source, source.stat().st_size - 100))


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm", "SC_rgb_jpeg.dcm"])
def test_cut_anywhere_inside_encapsulated_pixel_data(tmp_path: Path, name: str) -> None:
    source = _bundled(name)
    data = source.read_bytes()
    pixel_start = _find(data, b"\xe0\x7f\x10\x00")
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # Pixel Data is last
    # A real truncated file, cut in the middle of the first fragment ...
    with pytest.raises(InvalidInstance):
        _scan_file(_truncated_copy(tmp_path, source, (pixel_start + len(data)) // 2))
    # ... and every other cut point, through the data set end.
    ts = str(read_file_meta_info(source).TransferSyntaxUID)
    with open(source, "rb") as fh:
        start = _data_offset(fh)
        # Every offset in small files; in larger ones the pixel data header, a stride
        # through the fragments and the final delimiter.
        ends = set(range(pixel_start + 1, len(data), 1 if len(data) < 5000 else 11))
        ends |= set(range(pixel_start + 1, pixel_start + 64)) | set(
            range(len(data) - 24, len(data))
        )
        for end in sorted(ends):
            with pytest.raises(InvalidInstance):
                _scan(fh, start, end, ts)
        assert _scan(fh, start, len(data), ts) is not None


# -- undefined-length sequences, encoded by hand ------------------------------------------


def _el(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _undefined_sq(group: int, element: int, items: list[bytes]) -> bytes:
    out = struct.pack("<HH2sHI", group, element, b"SQ", 0, 0xFFFFFFFF)
    for item in items:
        out += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item
        out += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return out + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _sequence_file(tmp_path: Path) -> tuple[Path, list[int]]:
    """A Part 10 file with nested undefined-length sequences; returns it and the offsets of
    its top-level element boundaries (where a cut is undetectable by design)."""
    nested = _undefined_sq(0x0040, 0xA043, [_el(0x0008, 0x0100, b"SH", b"CODE1")])
    defined_item = _el(0x0020, 0x000E, b"UI", b"1.2.3.5")
    defined_sq = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 8 + len(defined_item))
    elements = [
        _el(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.7"),
        _el(0x0008, 0x0018, b"UI", b"1.2.3.4.1"),
        _el(0x0008, 0x0060, b"CS", b"OT"),
        _undefined_sq(0x0008, 0x1110, [_el(0x0020, 0x000E, b"UI", b"1.2.3.4") + nested, b""]),
        defined_sq + struct.pack("<HHI", 0xFFFE, 0xE000, len(defined_item)) + defined_item,
        _el(0x0010, 0x0010, b"PN", b"Doe^Jane"),
        _el(0x0020, 0x000D, b"UI", b"1.2.3"),
        _el(0x0028, 0x0010, b"US", struct.pack("<H", 4)),
    ]
    head = encode_file_meta("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.1", EXPLICIT_LE)
    boundaries = []
    pos = len(head)
    for elem in elements:
        boundaries.append(pos)
        pos += len(elem)
    path = tmp_path / "sequences.dcm"
    path.write_bytes(head + b"".join(elements))
    return path, boundaries


def test_hand_encoded_sequences_pass_and_match_pydicom(tmp_path: Path) -> None:
    path, _ = _sequence_file(tmp_path)
    ds = _scan_file(path)
    assert ds is not None
    reference = pydicom.dcmread(path)
    assert ds.ReferencedStudySequence[0].ConceptNameCodeSequence[0].CodeValue == "CODE1"
    assert len(ds.ReferencedStudySequence) == 2
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.3.5"
    for elem in reference:
        assert ds[elem.tag].value == elem.value, elem.tag


def test_cut_anywhere_inside_a_sequence_is_invalid(tmp_path: Path) -> None:
    path, boundaries = _sequence_file(tmp_path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        start = _data_offset(fh)
        for end in range(start + 1, size):
            if end in boundaries:
                continue  # the data set simply ends after a complete element
            with pytest.raises(InvalidInstance):
                _scan(fh, start, end, EXPLICIT_LE)


def test_truncated_file_inside_nested_item(tmp_path: Path) -> None:
    path, _ = _sequence_file(tmp_path)
    data = path.read_bytes()
    cut = _find(data, b"CODE1") + 2
    target = tmp_path / "cut.dcm"
    target.write_bytes(data[:cut])
    with pytest.raises(InvalidInstance):
        _scan_file(target)
    # Cut exactly after the nested element: the item end delimiter is missing.
    target.write_bytes(data[: cut + 4])
    with pytest.raises(InvalidInstance, match="item"):
        _scan_file(target)


def test_stray_delimiter_at_top_level_is_invalid(tmp_path: Path) -> None:
    head = encode_file_meta("1.2.840.10008.5.1.4.1.1.7", "1.2.3", EXPLICIT_LE)
    body = _el(0x0008, 0x0018, b"UI", b"1.2.3") + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    path = tmp_path / "stray.dcm"
    path.write_bytes(head + body)
    with pytest.raises(InvalidInstance, match="delimiter"):
        _scan_file(path)


def test_bad_vr_is_invalid(tmp_path: Path) -> None:
    head = encode_file_meta("1.2.840.10008.5.1.4.1.1.7", "1.2.3", EXPLICIT_LE)
    body = _el(0x0008, 0x0018, b"UI", b"1.2.3") + struct.pack("<HH2sH", 0x0010, 0x0010, b"p1", 2)
    path = tmp_path / "badvr.dcm"
    path.write_bytes(head + body + b"AB")
    with pytest.raises(InvalidInstance, match="VR"):
        _scan_file(path)


def test_file_shorter_than_the_announced_end_is_invalid(tmp_path: Path) -> None:
    """A small file is read whole; a shorter read than announced is a truncation."""
    source = _bundled("MR_small.dcm")
    ts = str(read_file_meta_info(source).TransferSyntaxUID)
    with open(source, "rb") as fh:
        start = _data_offset(fh)
        with pytest.raises(InvalidInstance):
            _scan(fh, start, source.stat().st_size + 100, ts)
