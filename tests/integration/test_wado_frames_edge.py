"""WADO-RS frames, bulk data and rendering, and WADO-URI, on the edges found by fuzzing:
numbers that only look like numbers, deflated data sets, native YBR_FULL_422 (4:2:2
subsampled) pixels, frames that cannot be decoded, and frame lists naming a frame twice.

One real gateway for the module; instances go in by STOW-RS (``application/dicom``), and
are read back over HTTP with httpx.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.utils import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tests.conftest import GatewayProcess, bundled_file
from tests.integration.test_wado import (
    assert_problem,
    image,
    multipart_parts,
    start_gateway,
    stop_gateway,
)

pytestmark = pytest.mark.timeout(300)

OCTETS = "multipart/related; type=application/octet-stream"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
LONG = 2300  # frames of 30,000 decoded bytes: past the 64 MiB decoded before answering


def read(source: Path | bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)


def decoded(ds: Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pixel_array(ds)


@dataclass
class Stored:
    study: str
    series: str
    sop: str
    dataset: Dataset  # as sent


@dataclass
class Edge:
    gw: GatewayProcess
    files: dict[str, Stored]

    def url(self, name: str, suffix: str = "") -> str:
        s = self.files[name]
        return self.gw.url(
            f"/dicomweb/studies/{s.study}/series/{s.series}/instances/{s.sop}{suffix}"
        )

    def wado_uri(self, name: str, **params: str) -> httpx.Response:
        s = self.files[name]
        query = {
            "requestType": "WADO",
            "studyUID": s.study,
            "seriesUID": s.series,
            "objectUID": s.sop,
        }
        return httpx.get(self.gw.url("/dicomweb/wado"), params={**query, **params}, timeout=60)


def get(url: str, accept: str | None = None, **params: str) -> httpx.Response:
    headers = {"Accept": accept} if accept is not None else {}
    return httpx.get(url, headers=headers, params=params, timeout=60)


def _explicit_copy(ds: Dataset) -> Dataset:
    """``ds`` as Explicit VR Little Endian under a new SOP Instance UID."""
    out = copy.deepcopy(ds)
    out.SOPInstanceUID = generate_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return out


def _ybr_two_frames() -> Dataset:
    """The bundled YBR_FULL_422 image with a second, different frame."""
    ds = read(bundled_file("SC_ybr_full_422_uncompressed.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    first = bytes(ds.PixelData)
    ds.NumberOfFrames = 2
    ds.PixelData = first + first[::-1]
    return ds


def _jpeg_with_a_corrupt_second_frame() -> Dataset:
    """JPEG baseline, two frames: the bundled image's, then bytes no decoder takes."""
    ds = read(bundled_file("SC_rgb_jpeg_dcmtk.dcm"))
    good = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.NumberOfFrames = 2
    ds.PixelData = encapsulate([good, b"\xff\xd8\xff\xe0corrupt frame\xff\xd9"])
    return ds


def _jpeg_with_a_corrupt_last_frame(frames: int) -> Dataset:
    """JPEG baseline: ``frames - 1`` copies of the bundled 100 x 100 RGB frame (30,000
    bytes decoded each), then one that does not decode."""
    ds = _jpeg_with_a_corrupt_second_frame()
    good, bad = generate_frames(ds.PixelData, number_of_frames=2)
    ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([good] * (frames - 1) + [bad])
    return ds


def _part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    gw = start_gateway(tmp_path_factory.mktemp("wado-edge") / "gw")
    try:
        deflated = read(bundled_file("image_dfl.dcm"))
        datasets = {
            "deflated": (deflated, bundled_file("image_dfl.dcm").read_bytes()),
            "deflated-as-explicit": (_explicit_copy(deflated), None),
            "ybr422": (None, bundled_file("SC_ybr_full_422_uncompressed.dcm").read_bytes()),
            "ybr422-2": (_ybr_two_frames(), None),
            "jpeg-corrupt-2": (_jpeg_with_a_corrupt_second_frame(), None),
            "jpeg-corrupt-last": (_jpeg_with_a_corrupt_last_frame(LONG), None),
            "jpeg2000": (None, bundled_file("JPEG2000.dcm").read_bytes()),
            "ct": (None, bundled_file("CT_small.dcm").read_bytes()),
        }
        files: dict[str, Stored] = {}
        for name, (ds, raw) in datasets.items():
            body = raw if raw is not None else _part10(ds)  # type: ignore[arg-type]
            answer = httpx.post(
                gw.url("/dicomweb/studies"),
                content=body,
                headers={"Content-Type": "application/dicom"},
                timeout=60,
            )
            assert answer.status_code == 200, (name, answer.text)
            sent = read(body)
            files[name] = Stored(
                str(sent.StudyInstanceUID),
                str(sent.SeriesInstanceUID),
                str(sent.SOPInstanceUID),
                sent,
            )
        yield Edge(gw, files)
    finally:
        stop_gateway(gw)


def assert_no_traceback(gw: GatewayProcess) -> None:
    log = gw.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


# -- 1. numbers ------------------------------------------------------------------------------


def test_numbers_that_only_look_like_numbers_are_400(edge: Edge) -> None:
    """'²' passes str.isdigit() but int() refuses it (that was a 500 and a traceback);
    Arabic-Indic digits, 5000-digit numbers (over int()'s limit) and frame numbers past
    2^31 - 1 are refused as well, and so are non-finite window values."""
    superscript, arabic_five, huge = "\u00b2", "\u0665", "9" * 5000
    for frames in (superscript, f"1,{superscript}", arabic_five, huge, "2147483648"):
        assert_problem(get(edge.url("ct", f"/frames/{frames}")), 400, "frame list")
        assert_problem(get(edge.url("ct", f"/frames/{frames}/rendered")), 400, "frame list")
    for name in ("frameNumber", "rows", "columns", "imageQuality"):
        for value in (superscript, arabic_five, huge):
            assert_problem(edge.wado_uri("ct", **{name: value}), 400, name)
    assert_problem(edge.wado_uri("ct", frameNumber="2147483648"), 400, "frameNumber")
    for center, width in (("nan", "400"), ("40", "inf"), ("40", "nan"), ("-inf", "400")):
        response = edge.wado_uri("ct", windowCenter=center, windowWidth=width)
        assert_problem(response, 400, "window")
    for params in ({"quality": arabic_five}, {"viewport": f"{superscript},10"}):
        assert_problem(get(edge.url("ct", "/rendered"), **params), 400, next(iter(params)))
    assert edge.wado_uri("ct", rows="64").status_code == 200
    # CT_small has no Number of Frames: any frameNumber is a 400 (PS3.18 9.5.2.1).
    assert_problem(edge.wado_uri("ct", frameNumber="1"), 400, "frameNumber")
    assert edge.gw.running()
    assert_no_traceback(edge.gw)


# -- 2. deflated data sets ---------------------------------------------------------------------


def test_deflated_instance_frames_bulk_data_rendered_and_wado_uri(edge: Edge) -> None:
    """Frames and Pixel Data bulk data of a Deflated Explicit VR Little Endian instance are
    its native pixels (they used to be a 200 cut mid-body); rendered and WADO-URI images
    equal those of the same data set stored undeflated (they were a 500)."""
    expected = bytes(edge.files["deflated"].dataset.PixelData)
    assert len(expected) == 512 * 512
    for accept in (None, OCTETS):
        response = get(edge.url("deflated", "/frames/1"), accept)
        assert response.status_code == 200, response.text
        [(headers, body)] = multipart_parts(response)
        assert headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
        assert body == expected
    [(_, bulk)] = multipart_parts(get(edge.url("deflated", "/bulkdata/7FE00010")))
    assert bulk == expected
    for suffix in ("/rendered", "/frames/1/rendered", "/thumbnail"):
        got = get(edge.url("deflated", suffix), "image/png")
        want = get(edge.url("deflated-as-explicit", suffix), "image/png")
        assert got.status_code == 200, (suffix, got.text)
        assert np.array_equal(np.asarray(image(got.content)), np.asarray(image(want.content)))
    got = edge.wado_uri("deflated", contentType="image/png")
    want = edge.wado_uri("deflated-as-explicit", contentType="image/png")
    assert got.status_code == 200, got.text
    assert np.array_equal(np.asarray(image(got.content)), np.asarray(image(want.content)))
    assert_problem(get(edge.url("deflated", "/frames/2")), 404, "frame 2 does not exist")
    assert_no_traceback(edge.gw)


# -- 3. native YBR_FULL_422 ------------------------------------------------------------------


def test_native_ybr_full_422_frames_are_the_subsampled_bytes(edge: Edge) -> None:
    """A native YBR_FULL_422 frame holds 2 samples per pixel (Y Y Cb Cr per pixel pair,
    PS3.3 C.7.6.3.1.2), not 3: frames and bulk data used to be a 500 'shorter than its
    header says'. The frame served is the stored one, and pydicom decodes it to the same
    image as the original file."""
    original = edge.files["ybr422"].dataset
    assert len(original.PixelData) == 100 * 100 * 2
    [(headers, frame)] = multipart_parts(get(edge.url("ybr422", "/frames/1"), OCTETS))
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    assert frame == bytes(original.PixelData)
    rebuilt = copy.deepcopy(original)
    rebuilt.PixelData = frame
    assert np.array_equal(
        decoded(rebuilt), decoded(read(bundled_file("SC_ybr_full_422_uncompressed.dcm")))
    )
    [(_, bulk)] = multipart_parts(get(edge.url("ybr422", "/bulkdata/7FE00010")))
    assert bulk == bytes(original.PixelData)
    two = edge.files["ybr422-2"].dataset
    response = get(edge.url("ybr422-2", "/frames/2,1"), OCTETS)
    assert response.status_code == 200, response.text
    second, first = (body for _, body in multipart_parts(response))
    assert first + second == bytes(two.PixelData)
    single = copy.deepcopy(original)
    single.PixelData = second
    assert np.array_equal(decoded(single), decoded(two)[1])
    assert_problem(get(edge.url("ybr422-2", "/frames/3")), 404, "frame 3 does not exist")
    assert get(edge.url("ybr422-2", "/frames/2/rendered")).status_code == 200


# -- 4. frames that cannot be decoded --------------------------------------------------------


def _stow_corrupt_jpeg(gw: GatewayProcess) -> str:
    """An instance stored by STOW-RS metadata + bulk data with a corrupt image/jpeg frame."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    us = "US"
    meta = [
        {
            "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
            "00080018": {"vr": "UI", "Value": [sop]},
            "0020000D": {"vr": "UI", "Value": [study]},
            "0020000E": {"vr": "UI", "Value": [series]},
            "00280002": {"vr": us, "Value": [1]},
            "00280004": {"vr": "CS", "Value": ["MONOCHROME2"]},
            "00280010": {"vr": us, "Value": [4]},
            "00280011": {"vr": us, "Value": [4]},
            "00280100": {"vr": us, "Value": [8]},
            "00280101": {"vr": us, "Value": [8]},
            "00280102": {"vr": us, "Value": [7]},
            "00280103": {"vr": us, "Value": [0]},
            "7FE00010": {"vr": "OB", "BulkDataURI": "f1"},
        }
    ]
    body = (
        b"--B\r\nContent-Type: application/dicom+json\r\n\r\n"
        + json.dumps(meta).encode()
        + b"\r\n--B\r\nContent-Type: image/jpeg\r\nContent-Location: f1\r\n\r\n"
        + b"\xff\xd8corrupt\xff\xd9\r\n--B--\r\n"
    )
    answer = httpx.post(
        gw.url("/dicomweb/studies"),
        content=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=B'},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return gw.url(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}")


def test_a_frame_that_cannot_be_decoded_is_a_500_json_before_any_byte(edge: Edge) -> None:
    """Frames asked decoded (application/octet-stream) are decoded before the status line:
    one that does not decode is a 500 JSON error and one wado.frame_decode_failed line,
    not a 200 whose body is cut with a traceback. As stored, they are still served."""
    gw = edge.gw
    before = gw.log_count("wado.frame_decode_failed")
    instance = _stow_corrupt_jpeg(gw)
    assert_problem(get(f"{instance}/frames/1", OCTETS), 500, "cannot decode frame 1")
    assert get(f"{instance}/frames/1", 'multipart/related; type="image/jpeg"').status_code == 200
    corrupt = edge.url("jpeg-corrupt-2")
    [(_, first)] = multipart_parts(get(f"{corrupt}/frames/1", OCTETS))
    expected = decoded(read(bundled_file("SC_rgb_jpeg_dcmtk.dcm")))
    assert first == expected.tobytes()
    assert_problem(get(f"{corrupt}/frames/1,2", OCTETS), 500, "cannot decode frame 2")
    assert_problem(get(f"{corrupt}/bulkdata/7FE00010", OCTETS), 500, "cannot decode frame 2")
    assert gw.log_count("wado.frame_decode_failed") == before + 3
    assert gw.running()
    assert_no_traceback(gw)


def test_past_the_predecoded_budget_a_bad_frame_ends_the_body_without_a_traceback(
    edge: Edge,
) -> None:
    """Frames are decoded before the answer only up to 64 MiB (PREDECODED_BYTES): a request
    for 2300 frames whose last one is corrupt gets its 200 and the frames that decode, then
    a body that ends without the multipart close delimiter, one log line, no traceback."""
    gw = edge.gw
    before = gw.log_count("wado.frame_decode_failed")
    numbers = ",".join(str(n) for n in range(1, LONG + 1))
    response = get(edge.url("jpeg-corrupt-last", f"/frames/{numbers}"), OCTETS)
    assert response.status_code == 200
    boundary = response.headers["content-type"].rsplit("boundary=", 1)[1]
    assert response.content.count(f"--{boundary}\r\n".encode()) == LONG - 1
    assert not response.content.endswith(f"--{boundary}--\r\n".encode())
    assert gw.log_count("wado.frame_decode_failed") == before + 1
    assert_problem(
        get(edge.url("jpeg-corrupt-last", f"/frames/{LONG}"), OCTETS), 500, f"frame {LONG}"
    )
    assert gw.running()
    assert_no_traceback(gw)


# -- 5. frame lists naming a frame twice ---------------------------------------------------------


def test_a_frame_list_naming_a_frame_twice_is_refused(edge: Edge) -> None:
    """PS3.18 asks for a list of non-duplicate frame numbers; '1,1,1...' (10,000 times)
    made one request decode the same JPEG 2000 frame 10,000 times (17 s, 1 GB)."""
    url = edge.url("jpeg2000")
    for frames in ("1,1", "1," * 9999 + "1"):
        assert_problem(get(f"{url}/frames/{frames}", OCTETS), 400, "more than once")
    ybr = edge.url("ybr422-2")
    assert_problem(get(f"{ybr}/frames/2,1,2"), 400, "frame 2 more than once")
    assert len(multipart_parts(get(f"{ybr}/frames/2,1"))) == 2
    [(_, frame)] = multipart_parts(get(f"{url}/frames/1", OCTETS))
    assert len(frame) == 1024 * 256 * 2  # JPEG2000.dcm: 1024 x 256, 16 bits
    assert_no_traceback(edge.gw)
