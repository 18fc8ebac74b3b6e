"""Pixel Data encoded against its file meta's transfer syntax, and file metas naming a
syntax no ingress accepts: refused by STOW-RS, C-STORE and the watched folder, nothing
stored (PS3.5 A.4; PS3.18 I.2). Before, such an instance was stored and acknowledged, then
served to viewers as the wrong pixels (a JPEG 2000 codestream as raw samples) or a 500."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid
from tests.conftest import (
    Corpus,
    GatewayProcess,
    bundled_file,
    sop_uid_of,
    wait_until,
)
from tests.integration.test_dimse_bad_input import _store_raw

pytestmark = pytest.mark.timeout(120)

Gateway = Callable[..., GatewayProcess]
BOUNDARY = "pixel-encoding-boundary"
CANNOT_UNDERSTAND, SYNTAX_NOT_SUPPORTED = 0xC000, 0xC122


def _relabelled(source: Path, transfer_syntax: str, target: Path) -> Path:
    """``source``'s data set, bytes unchanged, under a file meta naming ``transfer_syntax``
    (new UIDs, so that no test's instance is another's)."""
    ds = pydicom.dcmread(source)
    encoding = (ds.original_encoding[0], ds.original_encoding[1])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    body = pydicom.filebase.DicomBytesIO()
    body.is_implicit_VR, body.is_little_endian = encoding
    write_dataset(body, ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    target.write_bytes(out.getvalue() + body.getvalue())
    return target


def _stow(gw: GatewayProcess, files: list[Path]) -> httpx.Response:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + f.read_bytes()
        + b"\r\n"
        for f in files
    )
    return httpx.post(
        gw.url("/dicomweb/studies"),
        content=body + f"--{BOUNDARY}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        },
        timeout=60,
    )


def _failed(answer: dict[str, Any]) -> dict[str, int]:
    items = answer.get("00081198", {}).get("Value", [])
    return {i["00081155"]["Value"][0]: i["00081197"]["Value"][0] for i in items}


def _stored(gw: GatewayProcess) -> set[str]:
    return {p.stem for p in (gw.data / "store").rglob("*.dcm")}


def test_stow_refuses_pixels_encoded_against_the_transfer_syntax(
    gateway: Gateway, tmp_path: Path, corpus: Corpus
) -> None:
    native_as_jpeg = _relabelled(corpus.ct("pix", 1, seed=931)[0], JPEGBaseline8Bit, tmp_path / "a")
    native_as_rle = _relabelled(corpus.mr("pix", 1, seed=932)[0], RLELossless, tmp_path / "b")
    # A JPEG 2000 codestream (encapsulated) under Explicit VR Little Endian: a viewer would
    # draw the 250-byte codestream as raw samples.
    j2k_as_native = _relabelled(
        bundled_file("JPEG2000.dcm"), ExplicitVRLittleEndian, tmp_path / "c"
    )
    private = _relabelled(corpus.mr("pix", 1, seed=933)[0], "1.2.3.4.5.6", tmp_path / "d")
    good = corpus.mr("pix-good", 1, seed=934)[0]
    gw = gateway({})
    bad = [native_as_jpeg, native_as_rle, j2k_as_native, private]

    answer = _stow(gw, [*bad, good])
    assert answer.status_code == 202, answer.text  # the good one stored, the others failed
    assert _failed(answer.json()) == {
        sop_uid_of(native_as_jpeg): CANNOT_UNDERSTAND,
        sop_uid_of(native_as_rle): CANNOT_UNDERSTAND,
        sop_uid_of(j2k_as_native): CANNOT_UNDERSTAND,
        sop_uid_of(private): SYNTAX_NOT_SUPPORTED,
    }
    assert _stored(gw) == {sop_uid_of(good)}
    assert gw.log_count("instance.refused") == 4
    assert "requires it encapsulated" in gw.log_text() and "is native" in gw.log_text()

    alone = _stow(gw, [native_as_jpeg])
    assert alone.status_code == 409 and _stored(gw) == {sop_uid_of(good)}
    # The same data under their true syntaxes are stored.
    for f, syntax in ((native_as_jpeg, ExplicitVRLittleEndian), (j2k_as_native, None)):
        fixed = tmp_path / f"fixed-{f.name}"
        source = bundled_file("JPEG2000.dcm") if syntax is None else f
        _relabelled(source, syntax or pydicom.dcmread(source).file_meta.TransferSyntaxUID, fixed)
        assert _stow(gw, [fixed]).status_code == 200


def test_c_store_of_native_pixels_in_a_jpeg_context_is_refused(
    gateway: Gateway, tmp_path: Path, corpus: Corpus
) -> None:
    """A modality whose encoder labels native pixels JPEG Baseline: it proposes that syntax
    and sends the data set's bytes in it (a scripted peer: DCMTK's storescu checks its
    file and refuses to send it). The C-STORE fails with 0xC000, nothing is stored."""
    bad = _relabelled(corpus.ct("pix-dimse", 1, seed=935)[0], JPEGBaseline8Bit, tmp_path / "bad")
    gw = gateway({})
    assert _store_raw(gw, bad) == CANNOT_UNDERSTAND
    assert _stored(gw) == set()
    gw.wait_log("instance.refused")
    assert "requires it encapsulated" in gw.log_text()


def test_a_dropped_file_with_pixels_against_its_syntax_is_rejected(
    gateway: Gateway, tmp_path: Path, corpus: Corpus
) -> None:
    watch, rejected = tmp_path / "drop", tmp_path / "rejected"
    gw = gateway(
        {
            "ingest": {
                "watch": str(watch),
                "rejected": str(rejected),
                "settle": 0.2,
                "poll_interval": 0.1,
            }
        }
    )
    watch.mkdir(exist_ok=True)
    _relabelled(corpus.ct("pix-folder", 1, seed=936)[0], JPEGBaseline8Bit, watch / "x.dcm")
    wait_until(lambda: any(rejected.rglob("*")), 30, "the file moved to rejected/")
    assert _stored(gw) == set()
    assert gw.log_count("folder.rejected") == 1
