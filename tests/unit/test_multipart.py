"""The streaming multipart/related parser (dicomweb/multipart.py)."""

from __future__ import annotations

import random

import pytest

from dicomgate.dicomweb.multipart import (
    MultipartError,
    MultipartParser,
    PartEnd,
    PartStart,
    parse_content_type,
)

B = "dicomgate-7f3a"


def body(*parts: bytes, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for i, part in enumerate(parts):
        out += (b"\r\n" if out or i else b"") + f"--{B}\r\n".encode()
        out += b"Content-Type: application/dicom\r\n\r\n" + part
    return out + f"\r\n--{B}--\r\n".encode() + epilogue


def parse(
    data: bytes, chunk: int | None = None, seed: int = 0
) -> list[tuple[dict[str, str], bytes]]:
    parser = MultipartParser(B)
    rng = random.Random(seed)
    parts: list[tuple[dict[str, str], bytes]] = []
    current: bytearray | None = None
    pos = 0
    while pos < len(data):
        size = chunk or rng.randint(1, 64)
        for event in parser.feed(data[pos : pos + size]):
            if isinstance(event, PartStart):
                current = bytearray()
                parts.append((event.headers, b""))
            elif isinstance(event, PartEnd):
                assert current is not None
                parts[-1] = (parts[-1][0], bytes(current))
                current = None
            else:
                assert current is not None
                current += event
        pos += size
    parser.close()
    return parts


PAYLOADS = [
    b"",
    b"x",
    b"\r\n",
    b"\r\n--" + B[:-1].encode() + b"\r\n",  # almost the delimiter
    b"--" + B.encode() + b"not at line start",
    bytes(range(256)) * 40,
]


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 10**6, None])
def test_round_trip_in_any_chunking(chunk: int | None) -> None:
    data = body(*PAYLOADS, preamble=b"ignored preamble", epilogue=b"ignored epilogue")
    for seed in range(5):
        parts = parse(data, chunk, seed)
        assert [p for _, p in parts] == PAYLOADS
        assert all(h == {"content-type": "application/dicom"} for h, _ in parts)


def test_headers_folding_and_no_headers() -> None:
    data = (
        f"--{B}\r\nContent-Type: application/dicom;\r\n transfer-syntax=1.2.840.10008.1.2.1\r\n"
        f"X-Extra:  v \r\n\r\nAAA\r\n--{B}\r\n\r\nBBB\r\n--{B}--"
    ).encode()
    parts = parse(data, 3)
    assert parts[0] == (
        {
            "content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
            "x-extra": "v",
        },
        b"AAA",
    )
    assert parts[1] == ({}, b"BBB")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no part"),
        (b"no boundary at all" * 10, "no part"),
        (f"--{B}\r\nContent-Type: application/dicom\r\n\r\nAAA".encode(), "truncated"),
        (f"--{B}\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n--{B}".encode(), "truncated"),
        (f"--{B}--".encode(), "no parts"),
        (f"--{B}junk\r\n\r\nAAA\r\n--{B}--".encode(), "malformed boundary"),
        (f"--{B}\r\nno colon here\r\n\r\nAAA\r\n--{B}--".encode(), "malformed part header"),
    ],
)
def test_malformed_bodies(data: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        parse(data, 5)


def test_header_and_preamble_limits() -> None:
    parser = MultipartParser(B)
    parser.feed(f"--{B}\r\n".encode())
    with pytest.raises(MultipartError, match="too long"):
        parser.feed(b"X-Long: " + b"a" * 20000)
    with pytest.raises(MultipartError, match="no part"):
        MultipartParser(B).feed(b"a" * 70000)
    with pytest.raises(MultipartError, match="boundary"):
        MultipartParser("")


def test_content_type_parameters() -> None:
    assert parse_content_type('multipart/related; type="application/dicom"; boundary="a b"') == (
        "multipart/related",
        {"type": "application/dicom", "boundary": "a b"},
    )
    assert parse_content_type("Application/DICOM") == ("application/dicom", {})
    assert parse_content_type("") == ("", {})


def test_boundaries_longer_than_rfc_2046_allows_are_taken_within_reason() -> None:
    """RFC 2046 says 70 characters at most; Orthanc's STOW-RS client sends 73 (two
    UUIDs). Up to 256 are taken; more, or none, is a MultipartError (a 400)."""
    orthanc = "0b8a5f0e-5d51-4c2a-9f1e-3a6c1f6f0d2e-6d2b3c4e-1f0a-4b5c-8d7e-9f0a1b2c3d4e"
    assert len(orthanc) == 73
    parser = MultipartParser(orthanc)
    events = parser.feed(
        f"--{orthanc}\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--{orthanc}--\r\n".encode()
    )
    assert [type(e) for e in events] == [PartStart, bytes, PartEnd]
    MultipartParser("b" * 256)
    for bad in ("", "b" * 257):
        with pytest.raises(MultipartError, match="1-256 characters"):
            MultipartParser(bad)
