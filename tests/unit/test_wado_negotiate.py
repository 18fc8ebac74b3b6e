"""Accept header negotiation for WADO-RS (dicomweb/negotiate.py, PS3.18 8.7)."""

from __future__ import annotations

import pytest

from dicomgate.dicomweb.negotiate import (
    AcceptError,
    FrameEncoding,
    choose_frame_encoding,
    choose_instance_syntax,
    choose_simple,
    parse_accept,
)

LE = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"
JPEG = "1.2.840.10008.1.2.4.50"
MPEG4 = "1.2.840.10008.1.2.4.102"
DICOM = 'multipart/related; type="application/dicom"'


def test_parse_orders_by_quality_and_keeps_quoted_parameters() -> None:
    ranges = parse_accept(
        f'{DICOM}; transfer-syntax={RLE}; q=0.5, multipart/related; type="application/dicom";'
        f" transfer-syntax=*, image/png;q=0"
    )
    assert [r.transfer_syntax for r in ranges] == ["*", RLE]
    assert ranges[0].params["type"] == "application/dicom"
    assert [r.media_type for r in parse_accept(None)] == ["*/*"]
    for bad in ('multipart/related; type="a', "nonsense", "a/b; q=x", "a/b; x"):
        with pytest.raises(AcceptError):
            parse_accept(bad)


@pytest.mark.parametrize(
    ("accept", "stored", "chosen"),
    [
        (f"{DICOM}; transfer-syntax=*", RLE, RLE),
        (DICOM, RLE, LE),  # default: Explicit VR Little Endian (PS3.18 8.7.3.5.2)
        (DICOM, JPEG, JPEG),  # ... but lossy pixel data as stored
        (DICOM, MPEG4, MPEG4),  # ... and what we cannot decode as stored
        (f"{DICOM}; transfer-syntax={LE}", RLE, LE),
        (f"{DICOM}; transfer-syntax={RLE}", RLE, RLE),
        (f"{DICOM}; transfer-syntax={RLE}", LE, RLE),  # compressed on request (#6 transcoder)
        (f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.4.100", LE, None),  # MPEG-2: not made
        (f"{DICOM}; transfer-syntax={LE}", MPEG4, None),
        ("*/*", RLE, LE),
        ("application/dicom", LE, None),  # single part: not offered
        (f'multipart/related; type="application/dicom+xml", {DICOM}; transfer-syntax=*', LE, LE),
    ],
)
def test_instance_syntax(accept: str, stored: str, chosen: str | None) -> None:
    assert choose_instance_syntax(parse_accept(accept), stored) == chosen


NATIVE = FrameEncoding("application/octet-stream", LE, False)


@pytest.mark.parametrize(
    ("accept", "stored", "chosen"),
    [
        (None, LE, NATIVE),
        (None, JPEG, FrameEncoding("image/jpeg", JPEG, False)),
        (
            'multipart/related; type="application/octet-stream"',
            JPEG,
            FrameEncoding("application/octet-stream", LE, True),
        ),
        (
            "multipart/related; type=image/x-dicom-rle",
            RLE,
            FrameEncoding("image/dicom-rle", RLE, False),
        ),
        ('multipart/related; type="image/*"', RLE, FrameEncoding("image/dicom-rle", RLE, False)),
        ('multipart/related; type="image/jpeg"', LE, None),  # no re-compression
        ('multipart/related; type="image/jpeg"', RLE, None),
        ("image/jpeg", JPEG, None),  # single part: not offered
        ('multipart/related; type="application/octet-stream"', MPEG4, None),
        # Any syntax (OHIF's request), or the stored one named: the frame as stored.
        (
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
            JPEG,
            FrameEncoding("application/octet-stream", JPEG, False),
        ),
        (
            f'multipart/related; type="application/octet-stream"; transfer-syntax={RLE}',
            RLE,
            FrameEncoding("application/octet-stream", RLE, False),
        ),
        (
            f'multipart/related; type="application/octet-stream"; transfer-syntax={LE}',
            JPEG,
            FrameEncoding("application/octet-stream", LE, True),
        ),
        (
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
            LE,
            NATIVE,
        ),
        ("multipart/related; type=application/octet-stream; transfer-syntax=*", MPEG4, None),
    ],
)
def test_frame_encoding(accept: str | None, stored: str, chosen: FrameEncoding | None) -> None:
    assert choose_frame_encoding(parse_accept(accept), stored) == chosen


def test_simple_types() -> None:
    offered = ["image/jpeg", "image/png"]
    assert choose_simple(parse_accept(None), offered) == "image/jpeg"
    assert choose_simple(parse_accept("image/png, image/jpeg;q=0.5"), offered) == "image/png"
    assert choose_simple(parse_accept("image/*"), offered) == "image/jpeg"
    assert choose_simple(parse_accept("image/gif"), offered) is None
