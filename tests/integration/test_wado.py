"""WADO-RS and WADO-URI end to end: a real ``dicomgate serve``, loaded with DCMTK storescu,
read back with ``dicomweb-client`` (a client we did not write), httpx and urllib.

The pydicom test files go in in their own transfer syntaxes. Several of them are one
instance (MR_small in six syntaxes, JPEG2000 / JPGExtended): those get their own SOP
Instance UIDs here (pixel data untouched), so each is a distinct instance of one series.
"""

from __future__ import annotations

import io
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid
from tests.conftest import (
    AE_TITLE,
    Corpus,
    GatewayProcess,
    _merge,
    bundled_file,
    free_port,
    needs_dcmtk,
)
from tests.corpus import make_large_instance
from tests.integration.test_qr_scp import STUDY_ROOT, getscu

from dicomgate.dicomweb.multipart import MultipartParser, PartEnd, PartStart, parse_content_type

pytestmark = [pytest.mark.timeout(300), needs_dcmtk]

EXPLICIT_LE = "1.2.840.10008.1.2.1"
MR_VARIANTS = {  # storescu flag -> MR_small in that syntax
    "-xe": "MR_small.dcm",
    "-xi": "MR_small_implicit.dcm",
    "-xb": "MR_small_bigendian.dcm",
    "-xr": "MR_small_RLE.dcm",
    "-xv": "MR_small_jp2klossless.dcm",
    "-xt": "MR_small_jpeg_ls_lossless.dcm",
}
OTHERS = {  # storescu flag -> files sent as they are (distinct SOP Instance UIDs)
    "-xe": ["CT_small.dcm", "examples_palette.dcm", "test-SR.dcm"],
    "-xi": ["rtdose.dcm"],  # 15 native frames, 32-bit
    "-xd": ["image_dfl.dcm"],  # deflated
    "-xy": ["SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm"],  # JPEG baseline; 30 frames
    "-xr": ["SC_rgb_rle_2frame.dcm"],  # RLE, 2 frames
    "-xw": ["693_J2KI.dcm"],  # JPEG 2000 (lossy)
    "-xx": ["JPGExtended.dcm"],  # JPEG extended
}


def read(path: Path | bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(path) if isinstance(path, bytes) else path)


def pixels(ds: Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


@dataclass
class Sent:
    path: Path  # the file storescu sent
    study: str
    series: str
    sop: str
    syntax: str


@dataclass
class Loaded:
    gw: GatewayProcess
    files: dict[str, Sent] = field(default_factory=dict)  # by bundled name

    @property
    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.gw.url("/dicomweb"))

    def stored(self, name: str) -> Path:
        row = self.gw.index.instance(self.files[name].sop)
        assert row is not None
        return self.gw.data / str(row["relpath"])

    def url(self, name: str, suffix: str = "") -> str:
        s = self.files[name]
        return self.gw.url(
            f"/dicomweb/studies/{s.study}/series/{s.series}/instances/{s.sop}{suffix}"
        )


def _renamed_copy(source: Path, folder: Path, series_uid: str | None = None) -> Path:
    """``source`` with a new SOP Instance UID (and optionally Series UID), pixels untouched."""
    ds = read(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    out = folder / source.name
    ds.save_as(out, enforce_file_format=True)
    return out


def start_gateway(root: Path, overrides: dict[str, Any] | None = None) -> GatewayProcess:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    base: dict[str, Any] = {
        "storage": {"path": str(data)},
        "database": {"url": f"sqlite:///{data}/index.db"},
        "dimse": {"ae_title": AE_TITLE, "host": "127.0.0.1", "port": free_port()},
        "http": {"host": "127.0.0.1", "port": free_port()},
    }
    gw = GatewayProcess(root=root, config=_merge(base, overrides or {}))
    gw.start()
    return gw


def stop_gateway(gw: GatewayProcess) -> None:
    gw.close_index()
    assert gw.terminate() == 0, gw.log_tail()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    root = tmp_path_factory.mktemp("wado")
    copies = root / "copies"
    copies.mkdir()
    gw = start_gateway(root / "gw")
    state = Loaded(gw)
    try:
        mr_series = generate_uid()
        batches: dict[str, list[tuple[str, Path]]] = {}
        for flag, name in MR_VARIANTS.items():
            path = _renamed_copy(bundled_file(name), copies, mr_series)
            batches.setdefault(flag, []).append((name, path))
        for flag, names in OTHERS.items():
            for name in names:
                path = bundled_file(name)
                if name == "JPGExtended.dcm":  # same UID as MR_small and JPEG2000.dcm
                    path = _renamed_copy(path, copies)
                batches.setdefault(flag, []).append((name, path))
        for flag, items in batches.items():
            result = gw.storescu([p for _, p in items], "-R", flag)
            assert result.returncode == 0, f"{flag}: {result.stdout}\n{gw.log_tail()}"
            for name, path in items:
                ds = read(path)
                state.files[name] = Sent(
                    path,
                    str(ds.StudyInstanceUID),
                    str(ds.SeriesInstanceUID),
                    str(ds.SOPInstanceUID),
                    str(ds.file_meta.TransferSyntaxUID),
                )
        yield state
    finally:
        stop_gateway(gw)


def multipart_parts(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related response, parsed independently of the client."""
    media, params = parse_content_type(response.headers["content-type"])
    assert media == "multipart/related"
    parser = MultipartParser(params["boundary"])
    parts: list[tuple[dict[str, str], bytes]] = []
    current = bytearray()
    for event in parser.feed(response.content):
        if isinstance(event, PartStart):
            current = bytearray()
            parts.append((event.headers, b""))
        elif isinstance(event, PartEnd):
            parts[-1] = (parts[-1][0], bytes(current))
        else:
            current += event
    parser.close()
    return parts


def get(url: str, accept: str | None = None, **params: Any) -> httpx.Response:
    headers = {"Accept": accept} if accept is not None else {}
    return httpx.get(url, headers=headers, params=params, timeout=60)


# -- retrieve instances ------------------------------------------------------------------


def test_retrieve_instance_as_stored_is_byte_identical(loaded: Loaded) -> None:
    for name, sent in loaded.files.items():
        response = get(
            loaded.url(name), 'multipart/related; type="application/dicom"; transfer-syntax=*'
        )
        assert response.status_code == 200, (name, response.text)
        parts = multipart_parts(response)
        assert len(parts) == 1
        headers, body = parts[0]
        assert headers["content-type"] == f"application/dicom; transfer-syntax={sent.syntax}"
        assert body == loaded.stored(name).read_bytes(), name


def test_dicomweb_client_retrieves_instances_as_stored(loaded: Loaded) -> None:
    client = loaded.client
    for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm", "examples_ybr_color.dcm"):
        sent = loaded.files[name]
        ds = client.retrieve_instance(
            sent.study, sent.series, sent.sop, media_types=(("application/dicom", "*"),)
        )
        assert ds.file_meta.TransferSyntaxUID == sent.syntax
        assert ds.SOPInstanceUID == sent.sop
        assert np.array_equal(pixels(ds), pixels(read(sent.path))), name


def test_default_syntax_is_explicit_le_pixel_equal(loaded: Loaded) -> None:
    """No transfer-syntax parameter: Explicit VR Little Endian (PS3.18 8.7.3.5.2), pixel
    data decompressed by the gateway, equal to the original's; lossy pixel data as stored."""
    mr = loaded.files["MR_small.dcm"]
    expected = pixels(read(bundled_file("MR_small.dcm")))
    series = loaded.client.retrieve_series(mr.study, mr.series)
    assert len(series) == len(MR_VARIANTS)
    for ds in series:  # big endian included: re-encoded little endian
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
        assert np.array_equal(pixels(ds), expected)
    no_syntax = 'multipart/related; type="application/dicom"'
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "693_J2KI.dcm"):  # lossy: as stored
        [(headers, body)] = multipart_parts(get(loaded.url(name), no_syntax))
        assert headers["content-type"].endswith(f"transfer-syntax={loaded.files[name].syntax}")
        assert body == loaded.stored(name).read_bytes()
    [(headers, body)] = multipart_parts(get(loaded.url("MR_small_RLE.dcm"), no_syntax))
    assert headers["content-type"].endswith(f"transfer-syntax={EXPLICIT_LE}")
    assert np.array_equal(pixels(read(body)), expected)
    rle = loaded.files["SC_rgb_rle_2frame.dcm"]
    ds = loaded.client.retrieve_instance(
        rle.study, rle.series, rle.sop, media_types=(("application/dicom", EXPLICIT_LE),)
    )
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(pixels(ds), pixels(read(rle.path)))
    dfl = loaded.files["image_dfl.dcm"]
    ds = loaded.client.retrieve_instance(
        dfl.study, dfl.series, dfl.sop, media_types=(("application/dicom", EXPLICIT_LE),)
    )
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(pixels(ds), pixels(read(dfl.path)))


def test_compressed_on_request_by_the_processing_transcoder(loaded: Loaded) -> None:
    """A client asking for JPEG-LS gets it, lossless: the pixels equal the original's; a
    lossy rendition keeps the SOP Instance UID and says it is lossy."""
    jls = "1.2.840.10008.1.2.4.80"
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={jls}'
    [(headers, body)] = multipart_parts(get(loaded.url("CT_small.dcm"), accept))
    assert headers["content-type"].endswith(f"transfer-syntax={jls}")
    ds = read(body)
    assert ds.file_meta.TransferSyntaxUID == jls
    assert np.array_equal(pixels(ds), pixels(read(bundled_file("CT_small.dcm"))))
    baseline = "1.2.840.10008.1.2.4.50"
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={baseline}'
    [(headers, body)] = multipart_parts(get(loaded.url("SC_rgb_rle_2frame.dcm"), accept))
    ds = read(body)
    assert ds.file_meta.TransferSyntaxUID == baseline
    assert ds.SOPInstanceUID == loaded.files["SC_rgb_rle_2frame.dcm"].sop
    assert ds.LossyImageCompression == "01"


def test_retrieve_study_and_series(loaded: Loaded) -> None:
    ct = loaded.files["CT_small.dcm"]
    study = loaded.client.retrieve_study(ct.study, media_types=(("application/dicom", "*"),))
    expected = {s.sop for s in loaded.files.values() if s.study == ct.study}
    assert {str(ds.SOPInstanceUID) for ds in study} == expected
    ybr = loaded.files["examples_ybr_color.dcm"]
    series = loaded.client.retrieve_series(
        ybr.study, ybr.series, media_types=(("application/dicom", "*"),)
    )
    assert [str(ds.SOPInstanceUID) for ds in series] == [ybr.sop]


# -- metadata and bulk data ----------------------------------------------------------------


def _compared_tags(ds: Dataset) -> list[int]:
    return [e.tag for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC]


def test_instance_metadata_round_trips_with_bulk_data(loaded: Loaded) -> None:
    client = loaded.client
    for name in ("CT_small.dcm", "MR_small_bigendian.dcm", "rtdose.dcm", "examples_palette.dcm"):
        sent = loaded.files[name]
        meta = client.retrieve_instance_metadata(sent.study, sent.series, sent.sop)
        assert "BulkDataURI" in meta["7FE00010"]
        assert not any(key.startswith("0002") for key in meta)
        fetched: list[str] = []

        def bulk(tag: str, vr: str, uri: str, fetched: list[str] = fetched) -> bytes:
            fetched.append(uri)
            return b"".join(client.retrieve_bulkdata(uri))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rebuilt = Dataset.from_json(meta, bulk_data_uri_handler=bulk)
        original = read(loaded.stored(name))
        assert _compared_tags(rebuilt) == _compared_tags(original), name
        for tag in _compared_tags(original):
            if tag == 0x7FE00010 and original.file_meta.TransferSyntaxUID != EXPLICIT_LE:
                continue  # implicit/big endian: bulk data come little endian, compared below
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # odd values in the bundled files
                assert rebuilt[tag].value == original[tag].value, (name, tag)
        expected = pixels(original).astype(pixels(original).dtype.newbyteorder("<")).tobytes()
        assert rebuilt.PixelData == expected, name
        if name == "CT_small.dcm":  # a private OB value of 9 KB goes by BulkDataURI too
            assert "BulkDataURI" in meta["00431029"]
            assert len(fetched) == 2


def test_series_and_study_metadata(loaded: Loaded) -> None:
    mr = loaded.files["MR_small.dcm"]
    series = loaded.client.retrieve_series_metadata(mr.study, mr.series)
    assert len(series) == len(MR_VARIANTS)
    expected = {loaded.files[n].sop for n in MR_VARIANTS.values()}
    assert {m["00080018"]["Value"][0] for m in series} == expected
    assert all(m["00280010"]["Value"] == [64] for m in series)
    study = loaded.client.retrieve_study_metadata(mr.study)
    assert len(study) == len([s for s in loaded.files.values() if s.study == mr.study])
    sr = loaded.files["test-SR.dcm"]
    meta = loaded.client.retrieve_instance_metadata(sr.study, sr.series, sr.sop)
    assert meta["0040A730"]["vr"] == "SQ" and meta["0040A730"]["Value"]
    assert "7FE00010" not in meta


def test_encapsulated_pixel_bulk_data_is_the_frames(loaded: Loaded) -> None:
    ybr = loaded.files["examples_ybr_color.dcm"]
    meta = loaded.client.retrieve_instance_metadata(ybr.study, ybr.series, ybr.sop)
    frames = loaded.client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    original = read(ybr.path)
    assert frames == list(generate_frames(original.PixelData, number_of_frames=30))


# -- frames --------------------------------------------------------------------------------


def test_native_frames(loaded: Loaded) -> None:
    dose = loaded.files["rtdose.dcm"]
    expected = pixels(read(dose.path))
    frames = loaded.client.retrieve_instance_frames(
        dose.study, dose.series, dose.sop, [2, 15, 5], media_types=("application/octet-stream",)
    )
    assert frames == [expected[i].astype("<u4").tobytes() for i in (1, 14, 4)]
    response = get(loaded.url("rtdose.dcm", "/frames/1"))
    assert response.status_code == 200
    [(headers, body)] = multipart_parts(response)
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    assert body == expected[0].astype("<u4").tobytes()
    be = loaded.files["MR_small_bigendian.dcm"]  # big endian on disk: sent little endian
    [frame] = loaded.client.retrieve_instance_frames(be.study, be.series, be.sop, [1])
    assert frame == pixels(read(bundled_file("MR_small.dcm"))).astype("<i2").tobytes()


def test_compressed_frames_in_their_own_media_type(loaded: Loaded) -> None:
    cases = {
        "examples_ybr_color.dcm": ("image/jpeg", [1, 30, 7]),
        "SC_rgb_rle_2frame.dcm": ("image/dicom-rle", [2, 1]),
        "MR_small_jp2klossless.dcm": ("image/jp2", [1]),
        "MR_small_jpeg_ls_lossless.dcm": ("image/jls", [1]),
        "693_J2KI.dcm": ("image/jp2", [1]),
    }
    for name, (media, numbers) in cases.items():
        sent = loaded.files[name]
        original = read(sent.path)
        count = int(original.get("NumberOfFrames", 1))
        all_frames = list(generate_frames(original.PixelData, number_of_frames=count))
        got = loaded.client.retrieve_instance_frames(
            sent.study, sent.series, sent.sop, numbers, media_types=(media,)
        )
        assert got == [all_frames[n - 1] for n in numbers], name
        response = get(loaded.url(name, "/frames/1"), f'multipart/related; type="{media}"')
        assert response.status_code == 200
        headers, body = multipart_parts(response)[0]
        assert headers["content-type"] == f"{media}; transfer-syntax={sent.syntax}"
        assert body == all_frames[0]
        # Any syntax as octet-stream (OHIF's request): as stored too, labelled.
        anything = get(
            loaded.url(name, "/frames/1"),
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
        )
        headers, body = multipart_parts(anything)[0]
        assert headers["content-type"] == f"application/octet-stream; transfer-syntax={sent.syntax}"
        assert body == all_frames[0]


LOSSLESS_FRAMES = {  # stored losslessly compressed -> the file frame 1 decodes to
    "SC_rgb_rle_2frame.dcm": "SC_rgb_rle_2frame.dcm",
    "MR_small_jp2klossless.dcm": "MR_small.dcm",
    "MR_small_jpeg_ls_lossless.dcm": "MR_small.dcm",
    "MR_small_RLE.dcm": "MR_small.dcm",
}


def _le(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


def test_frames_and_pixel_bulk_data_default_to_explicit_le(loaded: Loaded) -> None:
    """PS3.18 8.7.3.3: a request naming no transfer syntax (no Accept, */*, or
    dicomweb-client's type="*/*") gets Explicit VR Little Endian, application/octet-stream,
    decoded by the gateway, "unless the origin server has only access to the pixel data in
    lossy compressed form": JPEG baseline and lossy JPEG 2000 still come as stored. The
    stored RLE / JPEG-LS / JPEG 2000 bitstream used to be sent."""
    octets = f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    for name, source in LOSSLESS_FRAMES.items():
        decoded = pixels(read(bundled_file(source)))
        frame = _le(decoded[0] if decoded.ndim == 4 else decoded)  # 2 RGB frames: the first
        for accept in (None, "*/*", 'multipart/related; type="*/*"', "multipart/related"):
            response = get(loaded.url(name, "/frames/1"), accept)
            assert response.status_code == 200, (name, accept, response.text)
            [(headers, body)] = multipart_parts(response)
            assert headers["content-type"] == octets, (name, accept)
            assert body == frame, (name, accept)
        sent = loaded.files[name]
        meta = loaded.client.retrieve_instance_metadata(sent.study, sent.series, sent.sop)
        bulk = loaded.client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])  # type="*/*"
        assert bulk[0] == frame, name
        parts = multipart_parts(get(loaded.url(name, "/bulkdata/7FE00010")))  # no Accept
        assert {headers["content-type"] for headers, _ in parts} == {octets}, name
        assert parts[0][1] == frame, name
        # Named explicitly, the stored form is still there (OHIF asks transfer-syntax=*).
        anything = "multipart/related; type=application/octet-stream; transfer-syntax=*"
        [(headers, body)] = multipart_parts(get(loaded.url(name, "/frames/1"), anything))
        assert headers["content-type"].endswith(f"transfer-syntax={sent.syntax}"), name
        assert body != frame
    for name in ("examples_ybr_color.dcm", "693_J2KI.dcm", "JPGExtended.dcm"):  # lossy
        sent = loaded.files[name]
        original = read(sent.path)
        first = next(generate_frames(original.PixelData, number_of_frames=1))
        for accept in (None, "*/*"):
            [(headers, body), *_] = multipart_parts(get(loaded.url(name, "/frames/1"), accept))
            assert headers["content-type"].endswith(f"transfer-syntax={sent.syntax}"), name
            assert not headers["content-type"].startswith("application/octet-stream"), name
            assert body == first, name


def test_bulk_data_and_frame_parts_carry_their_content_location(loaded: Loaded) -> None:
    """PS3.18 10.4.3.3.5: bulk data in a multipart response carry a Content-Location, the
    BulkDataURI of the metadata; frames carry their own URL (.../frames/{n})."""
    ct = loaded.files["CT_small.dcm"]
    meta = loaded.client.retrieve_instance_metadata(ct.study, ct.series, ct.sop)
    for key in ("00431029", "7FE00010"):  # a private OB value; native Pixel Data
        uri = meta[key]["BulkDataURI"]
        [(headers, _)] = multipart_parts(get(uri))
        assert headers["content-location"] == uri, key
    lower = meta["7FE00010"]["BulkDataURI"].replace("7FE00010", "7fe00010")
    [(headers, _)] = multipart_parts(get(lower))
    assert headers["content-location"] == meta["7FE00010"]["BulkDataURI"]
    for name in ("693_J2KI.dcm", "MR_small_RLE.dcm"):  # one frame: the value itself
        sent = loaded.files[name]
        meta = loaded.client.retrieve_instance_metadata(sent.study, sent.series, sent.sop)
        uri = meta["7FE00010"]["BulkDataURI"]
        [(headers, _)] = multipart_parts(get(uri))
        assert headers["content-location"] == uri, name
    ybr = loaded.files["examples_ybr_color.dcm"]  # 30 JPEG frames: each at its own URL
    meta = loaded.client.retrieve_instance_metadata(ybr.study, ybr.series, ybr.sop)
    parts = multipart_parts(get(meta["7FE00010"]["BulkDataURI"]))
    instance = loaded.url("examples_ybr_color.dcm")
    assert [h["content-location"] for h, _ in parts] == [
        f"{instance}/frames/{n}" for n in range(1, 31)
    ]
    for name, numbers in (("rtdose.dcm", "2,15,5"), ("SC_rgb_rle_2frame.dcm", "2,1")):
        for accept in (None, "multipart/related; type=application/octet-stream; transfer-syntax=*"):
            response = get(loaded.url(name, f"/frames/{numbers}"), accept)
            locations = [h["content-location"] for h, _ in multipart_parts(response)]
            assert locations == [loaded.url(name, f"/frames/{n}") for n in numbers.split(",")], (
                name,
                accept,
            )


def test_compressed_frames_decoded_on_request(loaded: Loaded) -> None:
    expected = pixels(read(bundled_file("MR_small.dcm"))).astype("<i2").tobytes()
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        sent = loaded.files[name]
        [frame] = loaded.client.retrieve_instance_frames(
            sent.study, sent.series, sent.sop, [1], media_types=("application/octet-stream",)
        )
        assert frame == expected, name
    rle = loaded.files["SC_rgb_rle_2frame.dcm"]
    frames = loaded.client.retrieve_instance_frames(
        rle.study, rle.series, rle.sop, [1, 2], media_types=("application/octet-stream",)
    )
    assert frames == [f.tobytes() for f in pixels(read(rle.path))]


# -- rendered ------------------------------------------------------------------------------


def image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_rendered_instance_jpeg_png_viewport_window(loaded: Loaded) -> None:
    ct = loaded.files["CT_small.dcm"]
    client = loaded.client
    jpeg = image(client.retrieve_instance_rendered(ct.study, ct.series, ct.sop))
    assert jpeg.format == "JPEG" and jpeg.size == (128, 128)
    png = image(
        client.retrieve_instance_rendered(
            ct.study, ct.series, ct.sop, media_types=("image/png",), params={"viewport": "64,32"}
        )
    )
    assert png.format == "PNG" and png.size == (32, 32)  # fits 64x32, aspect kept
    values = pixels(read(ct.path)).astype(float) - 1024  # Hounsfield units
    bright, dark = np.unravel_index(values.argmax(), values.shape), (5, 118)
    full = np.asarray(
        image(client.retrieve_instance_rendered(ct.study, ct.series, ct.sop, ("image/png",)))
    )
    assert full[bright] > full[dark]
    # A window above every value renders black; one below every value renders white.
    black = np.asarray(
        image(
            client.retrieve_instance_rendered(
                ct.study, ct.series, ct.sop, ("image/png",), params={"window": "5000,10"}
            )
        )
    )
    white = np.asarray(
        image(
            client.retrieve_instance_rendered(
                ct.study, ct.series, ct.sop, ("image/png",), params={"window": "-5000,10,linear"}
            )
        )
    )
    assert black.max() == 0 and white.min() == 255
    low_quality = client.retrieve_instance_rendered(
        ct.study, ct.series, ct.sop, params={"quality": "5"}
    )
    high_quality = client.retrieve_instance_rendered(
        ct.study, ct.series, ct.sop, params={"quality": "100"}
    )
    assert len(low_quality) < len(high_quality)


def test_rendered_colour_frames_series_and_thumbnails(loaded: Loaded) -> None:
    rgb = loaded.files["SC_rgb_rle_2frame.dcm"]
    expected = pixels(read(rgb.path))
    client = loaded.client
    png = image(
        client.retrieve_instance_frames_rendered(
            rgb.study, rgb.series, rgb.sop, [2], media_types=("image/png",)
        )
    )
    assert png.mode == "RGB"
    assert np.array_equal(np.asarray(png), expected[1])
    ybr = loaded.files["SC_rgb_jpeg_dcmtk.dcm"]  # YCbCr JPEG: converted to RGB
    top = np.asarray(
        image(get(loaded.url("SC_rgb_jpeg_dcmtk.dcm", "/rendered"), "image/png").content)
    )
    assert top[5, 50, 0] > 200 and top[5, 50, 1] < 40  # the red band
    assert top[95, 50].min() > 200  # the white band
    series = image(client.retrieve_series_rendered(ybr.study, ybr.series, ("image/jpeg",)))
    assert series.size == (100, 100)  # the first image of the series
    dose = loaded.files["rtdose.dcm"]
    frame = image(get(loaded.url("rtdose.dcm", "/frames/3/rendered"), "image/png").content)
    assert frame.size == (10, 10)
    for suffix in ("/thumbnail", "/frames/1/thumbnail"):
        thumb = image(get(loaded.url("CT_small.dcm", suffix)).content)
        assert thumb.format == "JPEG" and thumb.size == (128, 128)
    study_thumb = get(loaded.gw.url(f"/dicomweb/studies/{dose.study}/thumbnail"), viewport="40,40")
    assert image(study_thumb.content).size == (40, 40)
    series_thumb = get(
        loaded.gw.url(f"/dicomweb/studies/{ybr.study}/series/{ybr.series}/thumbnail")
    )
    assert image(series_thumb.content).size == (128, 128)


def test_the_accept_query_parameter_chooses_like_the_header(loaded: Loaded) -> None:
    """PS3.18 8.3.3.1: the origin server shall support ``accept=`` (a link cannot set
    headers; OHIF asks for thumbnails with it). It takes precedence over the header."""
    ct = loaded.url("CT_small.dcm", "")

    def ask(suffix: str, accept: str, header: str | None = None) -> httpx.Response:
        headers = {"Accept": header} if header is not None else {}
        return httpx.get(ct + suffix, params={"accept": accept}, headers=headers, timeout=60)

    png = ask("/thumbnail", "image/png", header="image/jpeg")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert image(png.content).size == (128, 128)
    jpeg = ask("/rendered", "image/jpeg")
    assert jpeg.headers["content-type"] == "image/jpeg" and image(jpeg.content).format == "JPEG"
    metadata = ask("/metadata", "application/dicom+json")
    assert metadata.status_code == 200 and metadata.json()[0]["00080018"]["Value"]
    frames = ask("/frames/1", 'multipart/related; type="application/octet-stream"')
    assert frames.status_code == 200 and len(multipart_parts(frames)) == 1
    refused = ask("/rendered", "application/dicom")
    assert refused.status_code == 406, refused.text
    bad = ask("/rendered", "no-slash")
    assert bad.status_code == 400 and "media type" in bad.json()["error"]


# -- WADO-URI ------------------------------------------------------------------------------


def wado_uri(loaded: Loaded, name: str, **params: str) -> httpx.Response:
    s = loaded.files[name]
    query = {"requestType": "WADO", "studyUID": s.study, "seriesUID": s.series, "objectUID": s.sop}
    return httpx.get(loaded.gw.url("/dicomweb/wado"), params={**query, **params}, timeout=30)


def test_wado_uri(loaded: Loaded) -> None:
    response = wado_uri(loaded, "CT_small.dcm")
    assert response.headers["content-type"] == "image/jpeg"
    assert image(response.content).size == (128, 128)
    response = wado_uri(loaded, "CT_small.dcm", contentType="application/dicom")
    assert response.headers["content-type"] == "application/dicom"
    assert response.content == loaded.stored("CT_small.dcm").read_bytes()
    response = wado_uri(loaded, "MR_small_RLE.dcm", contentType="application/dicom")
    ds = read(response.content)  # default: Explicit VR Little Endian
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    response = wado_uri(
        loaded,
        "MR_small_RLE.dcm",
        contentType="application/dicom",
        transferSyntax="1.2.840.10008.1.2.5",
    )
    assert response.content == loaded.stored("MR_small_RLE.dcm").read_bytes()
    response = wado_uri(
        loaded, "CT_small.dcm", contentType="image/png", rows="50", columns="100"
    )  # no frameNumber: a 400 on a single-frame image (PS3.18 9.5.2.1, test_wado_uri.py)
    assert image(response.content).size == (50, 50)
    response = wado_uri(loaded, "CT_small.dcm", region="0,0,0.5,0.25", contentType="image/png")
    assert image(response.content).size == (64, 32)  # a quarter of the width, kept 1:1
    response = wado_uri(loaded, "CT_small.dcm", windowCenter="5000", windowWidth="10")
    assert np.asarray(image(response.content)).max() < 10
    response = wado_uri(loaded, "test-SR.dcm")  # not an image: the object itself
    assert response.headers["content-type"] == "application/dicom"
    # urllib, as the oldest clients would
    import urllib.request

    with urllib.request.urlopen(str(wado_uri(loaded, "rtdose.dcm").request.url)) as r:
        assert r.headers["Content-Type"] == "image/jpeg"


# -- refusals ------------------------------------------------------------------------------


def assert_problem(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert words in response.json()["error"], response.json()


def test_malformed_requests_get_documented_statuses(loaded: Loaded) -> None:
    gw = loaded.gw
    ct = loaded.files["CT_small.dcm"]
    base = f"/dicomweb/studies/{ct.study}/series/{ct.series}"
    assert_problem(get(gw.url("/dicomweb/studies/1.2.3")), 404, "unknown study")
    assert_problem(get(gw.url(f"/dicomweb/studies/{ct.study}/series/1.2.3")), 404, "unknown series")
    assert_problem(get(gw.url(f"{base}/instances/1.2.3")), 404, "unknown instance")
    assert_problem(get(gw.url("/dicomweb/studies/1.2.3/metadata")), 404, "unknown study")
    assert_problem(get(gw.url(f"{base}/instances/1.2.3/frames/1")), 404, "unknown instance")
    assert_problem(get(gw.url(f"{base}/instances/1.2.3/rendered")), 404, "unknown instance")
    for bad in ("0", "a", "1,,2", "-1", "1.5"):
        assert_problem(get(loaded.url("CT_small.dcm", f"/frames/{bad}")), 400, "frame list")
    assert_problem(get(loaded.url("CT_small.dcm", "/frames/2")), 404, "frame 2 does not exist")
    assert_problem(get(loaded.url("test-SR.dcm", "/frames/1")), 404, "no pixel data")
    jpeg_ts = "1.2.840.10008.1.2.4.50"
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={jpeg_ts}'
    assert_problem(get(loaded.url("CT_small.dcm"), accept), 406, "cannot send")
    assert_problem(get(loaded.url("CT_small.dcm"), "application/dicom"), 406, "cannot send")
    assert_problem(get(loaded.url("CT_small.dcm", "/frames/1"), "image/jpeg"), 406, "frames")
    assert_problem(
        get(loaded.url("CT_small.dcm", "/frames/1"), 'multipart/related; type="image/jpeg"'),
        406,
        "frames",
    )
    assert_problem(
        get(loaded.url("CT_small.dcm", "/metadata"), "application/dicom+xml"), 406, "dicom+json"
    )
    assert_problem(get(loaded.url("CT_small.dcm", "/rendered"), "image/gif"), 406, "image/jpeg")
    assert_problem(get(loaded.url("test-SR.dcm", "/rendered")), 406, "no image")
    assert_problem(get(loaded.url("CT_small.dcm"), 'multipart/related; type="a'), 400, "quotes")
    for params in ({"window": "1"}, {"window": "a,b"}, {"viewport": "0,10"}, {"quality": "101"}):
        response = get(loaded.url("CT_small.dcm", "/rendered"), **params)
        assert_problem(response, 400, next(iter(params)))
    assert_problem(get(loaded.url("CT_small.dcm", "/rendered"), foo="1"), 400, "foo")
    assert_problem(get(loaded.url("CT_small.dcm", "/frames/1,2/rendered")), 400, "one frame")
    assert_problem(get(loaded.url("CT_small.dcm", "/bulkdata/zz")), 400, "bulk data path")
    assert_problem(get(loaded.url("CT_small.dcm", "/bulkdata/00100010/0")), 400, "bulk data path")
    assert_problem(get(loaded.url("CT_small.dcm", "/bulkdata/00091001")), 404, "no bulk data")
    assert_problem(wado_uri(loaded, "CT_small.dcm", requestType="XYZ"), 400, "requestType")
    response = httpx.get(gw.url("/dicomweb/wado"), params={"requestType": "WADO"})
    assert_problem(response, 400, "studyUID")
    assert_problem(wado_uri(loaded, "CT_small.dcm", objectUID="1.2.3"), 404, "unknown instance")
    assert_problem(wado_uri(loaded, "CT_small.dcm", contentType="image/gif"), 406, "contentType")
    assert_problem(wado_uri(loaded, "CT_small.dcm", windowCenter="10"), 400, "windowWidth")
    assert_problem(wado_uri(loaded, "CT_small.dcm", rows="0"), 400, "rows")
    assert_problem(
        wado_uri(loaded, "CT_small.dcm", contentType="application/dicom", transferSyntax=jpeg_ts),
        406,
        jpeg_ts,
    )
    assert gw.running()


# -- memory (DESIGN rule 2) ----------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssPeak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.done.wait(0.02)


def _large_retrieve(tmp_path: Path, size: int) -> None:
    big = make_large_instance(tmp_path / "big.dcm", size, seed=3)
    gw = start_gateway(tmp_path / "gw")
    try:
        assert gw.storescu([big]).returncode == 0
        ds = pydicom.dcmread(big, stop_before_pixels=True)
        url = gw.url(
            f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )
        frames = int(ds.NumberOfFrames)
        frame_size = int(ds.Rows) * int(ds.Columns) * 2
        get(url + "/metadata")  # warm up imports and caches before the baseline
        get(url + "/frames/1")
        time.sleep(0.2)
        before = rss_bytes(gw.pid)
        sampler = RssPeak(gw.pid)
        sampler.start()
        received = 0
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        with httpx.stream("GET", url, headers={"Accept": accept}, timeout=120) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes(1 << 20):
                received += len(chunk)
                time.sleep(0.0005)  # a slowish reader: the server must not buffer ahead
        last = get(url + f"/frames/{frames}")
        sampler.done.set()
        sampler.join()
        assert received > big.stat().st_size
        [(_, frame)] = multipart_parts(last)
        with open(big, "rb") as fh:
            fh.seek(-frame_size, 2)
            assert frame == fh.read()
        growth = sampler.peak - before
        assert growth < 50 * 1024 * 1024, f"RSS grew by {growth / 1e6:.0f} MB"
    finally:
        stop_gateway(gw)


def test_large_instance_streams_with_flat_memory(tmp_path: Path) -> None:
    _large_retrieve(tmp_path, 80 * 1000 * 1000)


@pytest.mark.slow
def test_200mb_instance_streams_with_flat_memory(tmp_path: Path) -> None:
    _large_retrieve(tmp_path, 200 * 1000 * 1000)


def test_a_file_missing_from_the_store_is_a_clear_error_before_any_byte(
    gateway: Any, corpus: Corpus, tmp_path: Path
) -> None:
    """An indexed instance whose file was removed behind the gateway's back (a damaged or
    half-restored store): every retrieve answers a JSON error before its first byte (a
    multipart retrieve used to send its headers and then cut the connection, with a
    traceback), C-GET fails that sub-operation, and neither the answers nor the log hold
    the file's path, which is made of the study, series and SOP Instance UIDs."""
    gw: GatewayProcess = gateway()
    files = corpus.mr("wado-missing", 2, seed=962)
    assert gw.storescu(files).returncode == 0
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    row = gw.index.instance(sop)
    assert row is not None
    gw.stored_path(row).unlink()
    instance = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    for path in (
        instance,
        f"/dicomweb/studies/{study}",
        f"{instance}/metadata",
        f"{instance}/frames/1",
        f"{instance}/rendered",
        f"/dicomweb/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}",
    ):
        answer = httpx.get(gw.url(path), timeout=30)
        assert answer.status_code == 500, (path, answer.status_code)
        assert answer.headers["content-type"] == "application/json", path
        error = answer.json()["error"]
        assert "missing from the store" in error or "No such file" in error, (path, error)
        assert sop not in error and study not in error, (path, error)
    got = getscu(
        gw, STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}, tmp_path / "get"
    )
    assert got.counts()[-1] == (0, 1, 1, 0), got.output[-2000:]
    log = gw.log_text()
    assert gw.log_count("wado.file_missing") == 2
    assert study not in log and sop not in log
    assert "Traceback" not in log and "Exception in ASGI application" not in log
