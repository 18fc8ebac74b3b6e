"""The transcode step: every pydicom test file x every target either round-trips (pixel-equal
for lossless targets) or is refused with ``cannot_transcode``; DCMTK decodes what we write;
dciodvfy finds no new errors in the outputs."""

from __future__ import annotations

import io
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from tests.conftest import bundled_file

from dicomgate.errors import ConfigError
from dicomgate.processing.base import ProcessingError, StepContext
from dicomgate.processing.pipeline import build, write_part10
from dicomgate.processing.transcode import (
    TARGETS,
    can_produce,
    choose_transfer_syntax,
    transcode_dataset,
)

TEST_FILES = bundled_file("CT_small.dcm").parent
ALL_FILES = sorted(p.name for p in TEST_FILES.glob("*.dcm"))
TARGET_NAMES = [t.keyword for t in TARGETS]
LOSSY = {"JPEGBaseline8Bit", "JPEGExtended12Bit", "JPEGLSNearLossless", "JPEG2000"}

# Not Part 10 files (no file meta): dcmread refuses them.
NOT_PART10 = {"ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm", "no_meta.dcm", "rtstruct.dcm"}
# Files pydicom itself cannot decode (no file meta, truncated pixel data, broken streams):
# any transcoding of them is refused.
UNREADABLE = {
    "JPEG-lossy.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "MR_truncated.dcm",
    "badVR.dcm",
    "meta_missing_tsyntax.dcm",
    "nested_priv_SQ.dcm",
}
# Instances without Pixel Data: re-encoded for uncompressed targets, passed on otherwise.
NO_PIXELS = {
    "UN_sequence.dcm",
    "empty_charset_LEI.dcm",
    "no_meta_group_length.dcm",
    "priv_SQ.dcm",
    "reportsi.dcm",
    "reportsi_with_empty_number_tags.dcm",
    "rtplan.dcm",
    "rtplan_truncated.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
}

_B, _E = "JPEGBaseline8Bit", "JPEGExtended12Bit"
_DCT = {_B, _E}
_ALL_COMPRESSED = {
    "RLELossless",
    _B,
    _E,
    "JPEGLosslessSV1",
    "JPEGLSLossless",
    "JPEGLSNearLossless",
    "JPEG2000Lossless",
    "JPEG2000",
    "HTJ2KLossless",
}
_SIGNED_16 = _DCT  # signed or 16-bit grey: no JPEG DCT process holds it (PS3.5 8.2.1)
_COLOR = {_E}  # JPEG extended is greyscale only
_ABOVE_16_BITS = _ALL_COMPRESSED - {"RLELossless"}  # 32-bit: only RLE's table has no room

# Pairs refused on purpose, each for a reason PS3.5 section 8 (or a codec limit) gives.
REFUSED: dict[str, set[str]] = {
    "693_J2KI.dcm": _SIGNED_16,
    "CT_small.dcm": _SIGNED_16,
    "ExplVR_BigEnd.dcm": _COLOR,
    "GDCMJ2K_TextGBR.dcm": _COLOR,
    "J2K_pixelrep_mismatch.dcm": _SIGNED_16,
    "JPEG2000.dcm": _SIGNED_16,
    "JPEGLSNearLossless_08.dcm": {"JPEG2000"},  # 45x10: lossy J2K needs 32 a side
    "JPEGLSNearLossless_16.dcm": {*_SIGNED_16, "JPEG2000"},
    "JPGExtended.dcm": {_B},
    "MR_small.dcm": _SIGNED_16,
    "MR_small_RLE.dcm": _SIGNED_16,
    "MR_small_bigendian.dcm": _SIGNED_16,
    "MR_small_expb.dcm": _SIGNED_16,
    "MR_small_implicit.dcm": _SIGNED_16,
    "MR_small_jp2klossless.dcm": _SIGNED_16,
    "MR_small_jpeg_ls_lossless.dcm": _SIGNED_16,
    "MR_small_padded.dcm": _SIGNED_16,
    "SC_jpeg_no_color_transform.dcm": _COLOR,
    "SC_jpeg_no_color_transform_2.dcm": _COLOR,
    "SC_rgb_dcmtk_+eb+cr.dcm": _COLOR,
    "SC_rgb_dcmtk_+eb+cy+n1.dcm": _COLOR,
    "SC_rgb_dcmtk_+eb+cy+n2.dcm": _COLOR,
    "SC_rgb_dcmtk_+eb+cy+np.dcm": _COLOR,
    "SC_rgb_dcmtk_+eb+cy+s2.dcm": _COLOR,
    "SC_rgb_dcmtk_+eb+cy+s4.dcm": _COLOR,
    "SC_rgb_gdcm_KY.dcm": _COLOR,
    "SC_rgb_jls_lossy_line.dcm": _COLOR,
    "SC_rgb_jls_lossy_sample.dcm": _COLOR,
    "SC_rgb_jpeg.dcm": _COLOR,
    "SC_rgb_jpeg_app14_dcmd.dcm": _COLOR,
    "SC_rgb_jpeg_dcmd.dcm": _COLOR,
    "SC_rgb_jpeg_dcmtk.dcm": _COLOR,
    "SC_rgb_jpeg_gdcm.dcm": _COLOR,
    "SC_rgb_jpeg_lossy_gdcm.dcm": _COLOR,
    "SC_rgb_rle.dcm": _COLOR,
    "SC_rgb_rle_16bit.dcm": _DCT,
    "SC_rgb_rle_16bit_2frame.dcm": _DCT,
    "SC_rgb_rle_2frame.dcm": _COLOR,
    "SC_rgb_rle_32bit.dcm": _ABOVE_16_BITS,
    "SC_rgb_rle_32bit_2frame.dcm": _ABOVE_16_BITS,
    "SC_rgb_small_odd.dcm": {_E, "JPEG2000"},  # 3x3
    "SC_rgb_small_odd_big_endian.dcm": {_E, "JPEG2000"},
    "SC_rgb_small_odd_jpeg.dcm": {_E, "JPEG2000"},
    "SC_ybr_full_422_uncompressed.dcm": _COLOR,
    "examples_jpeg2k.dcm": _COLOR,
    "examples_overlay.dcm": {_B},  # 16 bits allocated, 12 stored: extended only
    "examples_palette.dcm": {*_DCT, "JPEGLSNearLossless", "JPEG2000"},  # no lossy palette
    "examples_rgb_color.dcm": _COLOR,
    "examples_ybr_color.dcm": _COLOR,
    "liver_1frame.dcm": _ALL_COMPRESSED,  # 1 bit allocated
    "liver_expb_1frame.dcm": _ALL_COMPRESSED,
    "rtdose.dcm": _ALL_COMPRESSED,  # 32 bits
    "rtdose_1frame.dcm": _ALL_COMPRESSED,
    "rtdose_expb.dcm": _ALL_COMPRESSED,
    "rtdose_expb_1frame.dcm": _ALL_COMPRESSED,
    "rtdose_rle.dcm": _ABOVE_16_BITS,
    "rtdose_rle_1frame.dcm": _ABOVE_16_BITS,
}


def _uid(keyword: str) -> str:
    return str(getattr(pydicom.uid, keyword))


def _read(name: str) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(TEST_FILES / name)


def _pixels(ds: Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr: np.ndarray = ds.pixel_array
        return arr


def _written(ds: Dataset, path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some bundled files hold invalid UIDs
        write_part10(ds, path)
        return pydicom.dcmread(path)


def check_pair(name: str, target: str, tmp_path: Path) -> None:
    if name in NOT_PART10:
        with pytest.raises(InvalidDicomError):
            _read(name)  # the pipeline refuses it as "unreadable" before any step
        return
    ds = _read(name)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == _uid(target):
        before = ds.PixelData if "PixelData" in ds else None
        transcode_dataset(ds, target)  # already there: left alone, broken or not
        assert (ds.PixelData if "PixelData" in ds else None) is before
        return
    if name in UNREADABLE:
        with pytest.raises(ProcessingError) as err:
            transcode_dataset(ds, target)
            _written(ds, tmp_path / "out.dcm")  # some break only when written
            _pixels(pydicom.dcmread(tmp_path / "out.dcm"))
        assert isinstance(err.value, ProcessingError)
        return
    source_ts = str(ds.file_meta.TransferSyntaxUID)
    if name in NO_PIXELS:
        transcode_dataset(ds, target)
        native = TARGETS[UID(_uid(target))].backend == "native"
        expected = _uid(target) if native else source_ts
        assert ds.file_meta.TransferSyntaxUID == expected
        if "SOPClassUID" in ds:  # some bundled files are data set fragments
            assert _written(ds, tmp_path / "out.dcm").file_meta.TransferSyntaxUID == expected
        return
    if target in REFUSED.get(name, set()):
        with pytest.raises(ProcessingError) as refused:
            transcode_dataset(ds, target)
        assert refused.value.reason == "cannot_transcode"
        assert "cannot" in str(refused.value) or "needs" in str(refused.value)
        return
    before = _pixels(_read(name))
    original_uid = str(ds.SOPInstanceUID)
    transcode_dataset(ds, target)
    out = _written(ds, tmp_path / "out.dcm")
    assert out.file_meta.TransferSyntaxUID == _uid(target)
    after = _pixels(out)
    assert after.shape == before.shape
    if target not in LOSSY or source_ts == _uid(target):
        assert np.array_equal(after, before), f"{name} -> {target} changed pixel values"
        assert str(out.SOPInstanceUID) == original_uid
        return
    error = np.abs(after.astype(np.float64) - before.astype(np.float64))
    if target == "JPEGLSNearLossless":
        assert error.max() <= 2  # the NEAR bound
    else:
        assert error.mean() <= max(2.0, 0.02 * float(before.max() - before.min()))
    assert out.LossyImageCompression == "01"
    method = {"JPEG2000": "ISO_15444_1", "JPEGLSNearLossless": "ISO_14495_1"}
    methods = out.LossyImageCompressionMethod
    last = methods[-1] if out["LossyImageCompressionMethod"].VM > 1 else methods
    assert last == method.get(target, "ISO_10918_1")
    assert str(out.SOPInstanceUID).startswith("2.25.")
    assert out.SourceImageSequence[-1].ReferencedSOPInstanceUID == original_uid


def test_every_bundled_file_is_in_a_table_or_transcodes() -> None:
    unknown = (set(REFUSED) | UNREADABLE | NO_PIXELS | NOT_PART10) - set(ALL_FILES)
    assert not unknown, f"tables name files pydicom no longer bundles: {unknown}"


# Every bundled file to every target (~10 s): run by default, so CI checks every pair.
@pytest.mark.parametrize("target", TARGET_NAMES)
@pytest.mark.parametrize("name", ALL_FILES)
def test_transcode_matrix_full(name: str, target: str, tmp_path: Path) -> None:
    check_pair(name, target, tmp_path)


# ---- what the output says about itself ---------------------------------------------------


def test_lossy_output_is_a_new_derived_image_with_a_stable_uid() -> None:
    first = transcode_dataset(_read("examples_rgb_color.dcm"), "JPEGBaseline8Bit", quality=80)
    again = transcode_dataset(_read("examples_rgb_color.dcm"), "JPEGBaseline8Bit", quality=80)
    other = transcode_dataset(_read("examples_rgb_color.dcm"), "JPEGBaseline8Bit", quality=50)
    original = _read("examples_rgb_color.dcm")
    assert first.SOPInstanceUID == again.SOPInstanceUID != original.SOPInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert len(first.SOPInstanceUID) <= 64
    assert first.ImageType[0] == "DERIVED"
    assert first.PhotometricInterpretation == "YBR_FULL_422"
    assert float(first.LossyImageCompressionRatio) > 2
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    code = first.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("121320", "DCM")


def test_lossy_output_can_keep_the_uid_when_asked() -> None:
    ds = transcode_dataset(_read("CT_small.dcm"), "JPEG2000", new_uid_for_lossy=False)
    assert ds.SOPInstanceUID == _read("CT_small.dcm").SOPInstanceUID
    assert ds.LossyImageCompression == "01"
    assert "SourceImageSequence" not in ds


def test_a_second_lossy_compression_appends_ratio_and_method() -> None:
    once = transcode_dataset(_read("CT_small.dcm"), "JPEGLSNearLossless", near_lossless=3)
    twice = transcode_dataset(once, "JPEG2000", compression_ratio=20)
    assert list(twice.LossyImageCompressionMethod) == ["ISO_14495_1", "ISO_15444_1"]
    assert len(twice.LossyImageCompressionRatio) == 2
    assert float(twice.LossyImageCompressionRatio[1]) == pytest.approx(20, rel=0.3)


def test_lossy_jpeg_source_stays_marked_lossy_in_a_lossless_target() -> None:
    for target in ("JPEGLSLossless", "ExplicitVRLittleEndian"):
        ds = _read("SC_rgb_jpeg_lossy_gdcm.dcm")  # JPEG baseline, YBR_FULL
        del ds.LossyImageCompression  # as some senders forget it
        out = transcode_dataset(ds, target)
        assert out.LossyImageCompression == "01"
        assert out.PhotometricInterpretation == "RGB"
        assert out.SOPInstanceUID == _read("SC_rgb_jpeg_lossy_gdcm.dcm").SOPInstanceUID


def _ybr_full() -> Dataset:
    """An uncompressed YBR_FULL image (lossless YCbCr: no bundled file has one)."""
    from pydicom.pixels import convert_color_space
    from pydicom.pixels.utils import set_pixel_data

    ds = _read("SC_rgb_rle_2frame.dcm")
    ybr = convert_color_space(_pixels(ds), "RGB", "YBR_FULL")
    set_pixel_data(ds, ybr, "YBR_FULL", 8)
    return ds


@pytest.mark.parametrize("target", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless"])
def test_lossless_keeps_ybr_full_values(target: str, tmp_path: Path) -> None:
    source = _ybr_full()
    source.pixel_array_options(as_rgb=False)
    expected = _pixels(source)
    out = _written(transcode_dataset(_ybr_full(), target), tmp_path / "o.dcm")
    assert out.PhotometricInterpretation == "YBR_FULL"
    out.pixel_array_options(as_rgb=False)
    assert np.array_equal(_pixels(out), expected)


def test_colour_models() -> None:
    jpeg = transcode_dataset(_read("SC_rgb_dcmtk_+eb+cy+s2.dcm"), "JPEGLSLossless")
    assert jpeg.PhotometricInterpretation == "RGB"  # lossy JPEG YBR_FULL_422 -> RGB
    rct = transcode_dataset(_read("SC_rgb_rle_2frame.dcm"), "JPEG2000Lossless")
    assert rct.PhotometricInterpretation == "YBR_RCT"
    assert rct.NumberOfFrames == 2 and rct.PlanarConfiguration == 0


def test_same_syntax_is_left_alone() -> None:
    ds = _read("MR_small_jpeg_ls_lossless.dcm")
    before = ds.PixelData
    assert transcode_dataset(ds, "JPEGLSLossless").PixelData is before


def test_refusal_names_the_problem() -> None:
    with pytest.raises(ProcessingError, match=r"cannot_transcode: .*1-bit"):
        transcode_dataset(_read("liver_1frame.dcm"), "JPEGLSLossless")
    with pytest.raises(ProcessingError, match="not a supported target"):
        transcode_dataset(_read("CT_small.dcm"), "ExplicitVRBigEndian")
    with pytest.raises(ProcessingError, match="not a transfer syntax"):
        transcode_dataset(_read("CT_small.dcm"), "CTImageStorage")


def test_deflated_output_is_deflated_and_equal(tmp_path: Path) -> None:
    ds = transcode_dataset(_read("MR_small_RLE.dcm"), "DeflatedExplicitVRLittleEndian")
    write_part10(ds, tmp_path / "d.dcm")
    raw = (tmp_path / "d.dcm").read_bytes()
    assert len(raw) < (TEST_FILES / "MR_small.dcm").stat().st_size
    assert np.array_equal(_pixels(pydicom.dcmread(io.BytesIO(raw))), _pixels(_read("MR_small.dcm")))


# ---- the small API other code calls ------------------------------------------------------


def test_can_produce_and_choose() -> None:
    assert can_produce("JPEGLSLossless")
    assert can_produce("1.2.840.10008.1.2.4.201")  # HTJ2K lossless, by UID
    assert not can_produce("ExplicitVRBigEndian")
    assert not can_produce("MPEG4HP41")
    assert not can_produce("nonsense")
    jls, j2k, evrle = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.1"
    assert choose_transfer_syntax(jls, [evrle, jls]) == jls
    assert choose_transfer_syntax(evrle, [j2k, jls]) == jls  # never lossy implicitly
    assert choose_transfer_syntax(evrle, [j2k]) is None


# ---- configuration -----------------------------------------------------------------------


def _build(settings: dict[str, object]) -> object:
    return build([{"transcode": settings}], "routes[0].pipeline", StepContext())


def test_config_accepts_keyword_or_uid() -> None:
    assert _build({"transfer_syntax": "JPEGLSLossless"})
    assert _build({"transfer_syntax": "1.2.840.10008.1.2.4.90"})
    assert _build({"transfer_syntax": "JPEGBaseline8Bit", "quality": 75})


@pytest.mark.parametrize(
    ("settings", "key", "words"),
    [
        ({"transfer_syntax": "JPEGLSLosless"}, "transcode.transfer_syntax", "not a transfer"),
        ({"transfer_syntax": "ExplicitVRBigEndian"}, "transcode.transfer_syntax", "supported"),
        ({"transfer_syntax": "MPEG2MPML"}, "transcode.transfer_syntax", "not a supported"),
        ({}, "transcode.transfer_syntax", "required"),
        ({"transfer_syntax": "JPEGLSLossless", "quality": 80}, "transcode", "quality applies"),
        ({"transfer_syntax": "JPEGBaseline8Bit", "quality": 0}, "transcode.quality", ""),
        ({"transfer_syntax": "JPEG2000", "near_lossless": 3}, "transcode", "near_lossless"),
        ({"transfer_syntax": "JPEGLSLossless", "speed": 1}, "transcode.speed", "unknown key"),
    ],
)
def test_config_errors_name_the_key(settings: dict[str, object], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        _build(settings)
    assert err.value.key == f"routes[0].pipeline[0].{key}"
    assert words in err.value.problem


def test_step_through_the_pipeline(tmp_path: Path) -> None:
    pipeline = build(
        [{"transcode": {"transfer_syntax": "JPEGLSLossless"}}], "pipeline", StepContext()
    )
    (output,) = pipeline.process_file(bundled_file("CT_small.dcm"), tmp_path)
    assert output.transfer_syntax_uid == "1.2.840.10008.1.2.4.80"
    assert np.array_equal(_pixels(pydicom.dcmread(output.path)), _pixels(_read("CT_small.dcm")))


# ---- a second, independent decoder: DCMTK ------------------------------------------------

needs_dcmtk_codecs = pytest.mark.skipif(
    shutil.which("dcmdjpls") is None or shutil.which("dcmdjpeg") is None, reason="needs DCMTK"
)
DCMTK_DECODER = {
    "JPEGLSLossless": "dcmdjpls",
    "JPEGLSNearLossless": "dcmdjpls",
    "JPEGLosslessSV1": "dcmdjpeg",
    "JPEGBaseline8Bit": "dcmdjpeg",
    "JPEGExtended12Bit": "dcmdjpeg",
    "RLELossless": "dcmdrle",
}
DCMTK_SOURCES = [
    "CT_small.dcm",
    "MR_small_bigendian.dcm",
    "JPGExtended.dcm",
    "examples_overlay.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "693_J2KI.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_rle_16bit.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "examples_palette.dcm",
    "examples_ybr_color.dcm",
]


def _made(names: list[str], targets: list[str]) -> list[tuple[str, str]]:
    """(source, target) pairs we produce; the refused ones are tested by the matrix."""
    return [(n, t) for n in names for t in targets if t not in REFUSED.get(n, set())]


@needs_dcmtk_codecs
@pytest.mark.parametrize(("name", "target"), _made(DCMTK_SOURCES, sorted(DCMTK_DECODER)))
def test_dcmtk_decodes_what_we_encode(name: str, target: str, tmp_path: Path) -> None:
    ds = transcode_dataset(_read(name), target)
    ours = tmp_path / "ours.dcm"
    write_part10(ds, ours)
    theirs = tmp_path / "theirs.dcm"
    run = subprocess.run(
        [DCMTK_DECODER[target], str(ours), str(theirs)], capture_output=True, check=False
    )
    assert run.returncode == 0, run.stderr.decode()
    dcmtk = _pixels(pydicom.dcmread(theirs))
    original = _pixels(_read(name))
    if target in LOSSY:
        # DCMTK's IDCT and colour conversion round differently from libjpeg-turbo's
        ours_decoded = _pixels(pydicom.dcmread(ours))
        tolerance = 2 if target == "JPEGLSNearLossless" else 3
        assert np.abs(dcmtk.astype(int) - ours_decoded.astype(int)).max() <= tolerance
    else:
        assert np.array_equal(dcmtk, original), f"DCMTK decodes {name} -> {target} differently"


# ---- output validity: dciodvfy finds no new errors --------------------------------------

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dicom3tools")
DCIODVFY_SOURCES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "examples_rgb_color.dcm",
    "SC_rgb_rle_2frame.dcm",
    "JPGExtended.dcm",
    "examples_palette.dcm",
]
# dicom3tools reads neither deflated nor HTJ2K files (it takes the HTJ2K UID for a native
# syntax): those two are checked by DCMTK in test_dcmtk_reads_deflated_and_htj2k_files.
DCIODVFY_TARGETS = [
    "ExplicitVRLittleEndian",
    "RLELossless",
    "JPEGLSLossless",
    "JPEGLSNearLossless",
    "JPEG2000Lossless",
    "JPEG2000",
    "JPEGLosslessSV1",
    "JPEGBaseline8Bit",
]


def _errors(path: Path) -> set[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    return {line.split(" - ", 1)[-1] for line in lines if line.startswith("Error")}


@needs_dciodvfy
@pytest.mark.parametrize(("name", "target"), _made(DCIODVFY_SOURCES, DCIODVFY_TARGETS))
def test_dciodvfy_reports_no_new_errors(name: str, target: str, tmp_path: Path) -> None:
    source = tmp_path / "in.dcm"
    _written(_read(name), source)  # the input as we would send it untouched
    out = tmp_path / "out.dcm"
    _written(transcode_dataset(_read(name), target), out)
    new = _errors(out) - _errors(source)
    assert not new, f"{name} -> {target}: new dciodvfy errors {sorted(new)}"


@needs_dcmtk_codecs
@pytest.mark.parametrize("target", ["DeflatedExplicitVRLittleEndian", "HTJ2KLossless"])
def test_dcmtk_reads_deflated_and_htj2k_files(target: str, tmp_path: Path) -> None:
    out = tmp_path / "out.dcm"
    _written(transcode_dataset(_read("SC_rgb_rle_2frame.dcm"), target), out)
    run = subprocess.run(["dcmdump", "-q", "+E", "-Un", str(out)], capture_output=True, text=True)
    assert run.returncode == 0 and "E:" not in run.stderr, run.stderr
    assert str(getattr(pydicom.uid, target)) in run.stdout
    if target == "DeflatedExplicitVRLittleEndian":  # DCMTK inflates it to the same pixels
        plain = tmp_path / "plain.dcm"
        subprocess.run(["dcmconv", "+te", str(out), str(plain)], check=True)
        assert np.array_equal(
            _pixels(pydicom.dcmread(plain)), _pixels(_read("SC_rgb_rle_2frame.dcm"))
        )


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("JPEGLSNearLossless_08.dcm", "ISO_14495_1"),  # NEAR=2 in the stream, no flag
        ("SC_rgb_jls_lossy_line.dcm", "ISO_14495_1"),
        ("JPEG2000.dcm", "ISO_15444_1"),  # 9-7 irreversible wavelet
        ("SC_rgb_jpeg_dcmtk.dcm", "ISO_10918_1"),
    ],
)
@pytest.mark.parametrize("target", ["ExplicitVRLittleEndian", "JPEGLSLossless", "RLELossless"])
def test_lossy_sources_stay_marked_lossy_in_lossless_outputs(
    name: str, method: str, target: str
) -> None:
    """PS3.3 C.7.6.1.1.5, once lossy always lossy: the output's lossless syntax no longer
    shows the loss, so the flag and its method must. Before, only JPEG sources got the
    flag (without a method), and a near-lossless JPEG-LS or lossy JPEG 2000 lost it."""
    ds = _read(name)
    for keyword in ("LossyImageCompression", "LossyImageCompressionMethod"):
        if keyword in ds:
            delattr(ds, keyword)
    out = transcode_dataset(ds, target)
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == method


def test_lossless_sources_are_not_marked_lossy() -> None:
    """JPEG 2000 with the reversible 5-3 wavelet under the lossy-or-lossless syntax, and
    the lossless-only syntaxes: no flag appears."""
    for name in ("MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"):
        out = transcode_dataset(_read(name), "ExplicitVRLittleEndian")
        assert "LossyImageCompression" not in out, name


# ---- lossy sources: Lossy Image Compression Ratio and Method stay paired ------------------


def _lossy_history(ds: Dataset) -> tuple[list[str], list[str]]:
    def values(keyword: str) -> list[str]:
        if keyword not in ds or ds[keyword].VM == 0:
            return []
        value = ds[keyword].value
        return [str(v) for v in value] if ds[keyword].VM > 1 else [str(value)]

    return values("LossyImageCompressionRatio"), values("LossyImageCompressionMethod")


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("examples_ybr_color.dcm", "ISO_10918_1"),  # 01, ratio 19, no method
        ("JPEG2000.dcm", "ISO_15444_1"),  # 01, ratio 2097, no method (9-7 wavelet)
    ],
)
@pytest.mark.parametrize("target", ["JPEG2000Lossless", "ExplicitVRLittleEndian"])
def test_a_lossy_source_flagged_without_a_method_gets_its_method(
    name: str, method: str, target: str, tmp_path: Path
) -> None:
    """PS3.3 C.7.6.1.1.5: the sender set Lossy Image Compression 01 and a ratio but no
    method; the output says how the pixels were compressed, one method per ratio. Before,
    the method was added only when the flag was not already 01."""
    source = _read(name)
    assert source.LossyImageCompression == "01" and "LossyImageCompressionMethod" not in source
    out = _written(transcode_dataset(_read(name), target), tmp_path / "out.dcm")
    ratios, methods = _lossy_history(out)
    assert out.LossyImageCompression == "01"
    assert methods == [method]
    assert ratios == [str(source.LossyImageCompressionRatio)]


def test_lossy_recompression_of_a_flagged_source_appends_a_paired_ratio_and_method() -> None:
    """A JPEG baseline source (01, ratio 19, no method) re-compressed as lossy JPEG 2000:
    two ratios and two methods, in order. Before: ratio ``19\\13.56``, method
    ``ISO_15444_1`` alone (the probe's repro/02_lossy_method.sh)."""
    out = transcode_dataset(_read("examples_ybr_color.dcm"), "JPEG2000", compression_ratio=8)
    ratios, methods = _lossy_history(out)
    assert methods == ["ISO_10918_1", "ISO_15444_1"]
    assert len(ratios) == 2 and ratios[0] == "19"


def test_a_lossy_source_without_ratio_or_method_gets_both_before_the_new_pair() -> None:
    """A JPEG baseline source whose sender forgot every lossy attribute: its own ratio
    (decoded size / Pixel Data size) and method come first, then this compression's."""
    ds = _read("SC_rgb_jpeg_dcmtk.dcm")
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio"):
        delattr(ds, keyword)
    del ds.LossyImageCompressionMethod
    out = transcode_dataset(ds, "JPEG2000", compression_ratio=8)
    ratios, methods = _lossy_history(out)
    assert methods == ["ISO_10918_1", "ISO_15444_1"]
    assert len(ratios) == 2
    # The file says 17.401 (its pixel data is 100x100 RGB): ours must agree roughly.
    assert float(ratios[0]) == pytest.approx(17.4, rel=0.1)
