"""Frame location without reading pixel data (dicomweb/frames.py), checked against pydicom."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid
from tests.conftest import bundled_file

from dicomgate.dicomweb.frames import (
    FrameError,
    decode_frame,
    encapsulated_frames,
    locate_pixel_data,
    native_frame_chunks,
    read_span_chunks,
)


def read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def native_frame(path: Path, index: int) -> bytes:
    layout = locate_pixel_data(path)
    assert layout is not None
    with open(path, "rb") as fh:
        return b"".join(native_frame_chunks(fh, layout, index))


def stored_frames(path: Path) -> list[bytes]:
    layout = locate_pixel_data(path)
    assert layout is not None and layout.encapsulated
    with open(path, "rb") as fh:
        return [b"".join(read_span_chunks(fh, spans)) for spans in encapsulated_frames(fh, layout)]


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "rtdose.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "rtdose_expb.dcm",  # 32-bit big endian
    ],
)
def test_native_frames_by_offset_are_little_endian(name: str) -> None:
    path = bundled_file(name)
    ds = read(path)
    array = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1))
    for index in {0, frames - 1, frames // 2}:
        frame = array[index] if frames > 1 else array
        expected = frame.astype(frame.dtype.newbyteorder("<")).tobytes()
        assert native_frame(path, index) == expected


def test_bit_packed_frames_not_on_byte_boundaries(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2, size=(3, 5, 5), dtype=np.uint8)  # 25 bits a frame
    packed = np.packbits(bits.reshape(-1), bitorder="little").tobytes()
    path = _write(
        tmp_path, packed + b"\0" * (len(packed) % 2), ExplicitVRLittleEndian, 5, 5, 3, bits=1
    )
    for index in range(3):
        got = np.unpackbits(np.frombuffer(native_frame(path, index), np.uint8), bitorder="little")
        assert np.array_equal(got[:25], bits[index].reshape(-1))


@pytest.mark.parametrize(
    ("name", "count"),
    [("examples_ybr_color.dcm", 30), ("SC_rgb_rle_2frame.dcm", 2), ("JPEG2000.dcm", 1)],
)
def test_encapsulated_frames_match_pydicom(name: str, count: int) -> None:
    path = bundled_file(name)
    expected = list(generate_frames(read(path).PixelData, number_of_frames=count))
    assert stored_frames(path) == expected


def _write(
    folder: Path,
    pixel_data: bytes,
    syntax: str,
    rows: int,
    cols: int,
    frames: int,
    bits: int = 8,
    extra: dict[str, object] | None = None,
) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.PixelData = pixel_data
    if syntax != ExplicitVRLittleEndian:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    path = folder / f"{generate_uid()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _j2k(n: int, size: int) -> bytes:
    return b"\xff\x4f\xff\x51" + bytes([n]) * (size - 4)


def test_fragmented_frames_without_offset_table_split_at_markers(tmp_path: Path) -> None:
    frames = [_j2k(n, 40 + 2 * n) for n in range(4)]
    # Frame 1 in three fragments, frame 3 in two: no Basic Offset Table.
    fragments = [frames[0], frames[1][:10], frames[1][10:20], frames[1][20:], frames[2]]
    fragments += [frames[3][:8], frames[3][8:]]
    body = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    for fragment in fragments:
        body += struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)) + fragment
    body += b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    path = _write(tmp_path, body, JPEG2000Lossless, 4, 4, 4)
    layout = locate_pixel_data(path)
    assert layout is not None and layout.encapsulated
    assert stored_frames(path) == frames


def test_basic_and_extended_offset_tables(tmp_path: Path) -> None:
    frames = [_j2k(n, 30 + 2 * n) for n in range(3)]
    with_bot = _write(
        tmp_path,
        encapsulate(frames, fragments_per_frame=2, has_bot=True),
        JPEG2000Lossless,
        4,
        4,
        3,
    )
    assert stored_frames(with_bot) == frames
    data, offsets, lengths = encapsulate_extended(frames)
    extended = _write(
        tmp_path,
        data,
        JPEG2000Lossless,
        4,
        4,
        3,
        extra={"ExtendedOffsetTable": offsets, "ExtendedOffsetTableLengths": lengths},
    )
    layout = locate_pixel_data(extended)
    assert layout is not None and len(layout.extended_offsets) == 3
    assert stored_frames(extended) == frames


def test_truncated_or_inconsistent_pixel_data_is_a_frame_error(tmp_path: Path) -> None:
    frames = [_j2k(n, 30) for n in range(3)]
    path = _write(tmp_path, encapsulate(frames[:2], has_bot=False), JPEG2000Lossless, 4, 4, 3)
    with pytest.raises(FrameError, match="cannot tell 3 frames apart"):
        stored_frames(path)
    data = path.read_bytes()
    path.write_bytes(data[:-12])  # cut the sequence delimiter and part of a fragment
    with pytest.raises(FrameError):
        stored_frames(path)
    native = _write(tmp_path, b"\0" * 32, ExplicitVRLittleEndian, 4, 4, 3)
    layout = locate_pixel_data(native)
    assert layout is not None
    with open(native, "rb") as fh, pytest.raises(FrameError, match="fewer than 3 frames"):
        b"".join(native_frame_chunks(fh, layout, 2))


def test_no_pixel_data_and_decoding() -> None:
    assert locate_pixel_data(bundled_file("test-SR.dcm")) is None
    rle = bundled_file("MR_small_RLE.dcm")
    assert (
        decode_frame(rle, 0)
        == read(bundled_file("MR_small.dcm")).pixel_array.astype("<i2").tobytes()
    )
    deflated = locate_pixel_data(bundled_file("image_dfl.dcm"))
    assert deflated is not None and deflated.deflated and deflated.needs_decoder
    odd = bundled_file("SC_rgb_small_odd_big_endian.dcm")  # 8-bit OW: word-swapped pairs
    layout = locate_pixel_data(odd)
    assert layout is not None and layout.needs_decoder
    assert decode_frame(odd, 0) == read(odd).pixel_array.tobytes()
    assert RLELossless == locate_pixel_data(rle).transfer_syntax  # type: ignore[union-attr]
