"""The ``split`` step: enhanced CT/MR built here, pydicom's multi-frame files, dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
)
from tests.conftest import bundled_file

from dicomgate.errors import ConfigError
from dicomgate.processing.base import ProcessingError
from dicomgate.processing.pipeline import Output, Pipeline, build
from dicomgate.processing.split import frame_uid

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dicom3tools")

SPLIT = build([{"split": {}}], "pipeline")
STUDY, SERIES, FOR = (
    "1.2.826.0.1.3680043.8.498.1",
    "1.2.826.0.1.3680043.8.498.2",
    "1.2.826.0.1.3680043.8.498.3",
)


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _seq(**values: object) -> Sequence:
    return Sequence([_item(**values)])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def make_enhanced(kind: str, frames: int, path: Path, *, rle: bool = False) -> Path:
    """An Enhanced CT or MR image of ``frames`` 16x16 frames, as a scanner's DERIVED volume."""
    rng = np.random.default_rng(frames)
    pixels = rng.integers(0, 4000, size=(frames, 16, 16), dtype=np.uint16)
    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage if kind == "CT" else EnhancedMRImageStorage
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.10.{frames}{kind == 'CT':d}"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Split", "P9", "", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = STUDY, "20260101", "101010"
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = kind, SERIES, 3
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = FOR, ""
    ds.Manufacturer, ds.ManufacturerModelName = "ACME", "Scanner"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "42", "1.0"
    ds.InstanceNumber, ds.ContentDate, ds.ContentTime = 1, "20260101", "101010"
    ds.NumberOfFrames = frames
    # CT: a DERIVED volume (fewer macros required); MR: ORIGINAL, with its pulse sequence.
    ds.ImageType = (
        ["DERIVED", "PRIMARY", "AXIAL", "NONE"]
        if kind == "CT"
        else ["ORIGINAL", "PRIMARY", "M", "NONE"]
    )
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = "20260101101010"
    ds.AcquisitionDuration = 1.0
    ds.PixelPresentation, ds.VolumetricProperties = "MONOCHROME", "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = Sequence()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = 16, 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if kind == "MR":
        ds.ImagingFrequency, ds.ResonantNucleus = 63.9, "1H"
        ds.MagneticFieldStrength, ds.KSpaceFiltering = 1.5, "NONE"
        ds.ApplicableSafetyStandardAgency = "IEC"
        ds.PulseSequenceName, ds.EchoPulseSequence = "se2d", "SPIN"
        ds.MRAcquisitionType = "2D"
        ds.ComplexImageComponent, ds.AcquisitionContrast = "MAGNITUDE", "T1"
        ds.EchoPlanarPulseSequence, ds.SteadyStatePulseSequence = "NO", "NONE"
        ds.SegmentedKSpaceTraversal = "SINGLE"
        ds.MultipleSpinEcho, ds.MultiPlanarExcitation, ds.PhaseContrast = "NO", "NO", "NO"
        ds.TimeOfFlightContrast, ds.SpectrallySelectedSuppression = "NO", "NONE"
        ds.GeometryOfKSpaceTraversal, ds.RectilinearPhaseEncodeReordering = "RECTILINEAR", "LINEAR"
        ds.NumberOfKSpaceTrajectories = 1
        ds.SaturationRecovery = "NO"
        ds.OversamplingPhase = "NONE"
    ds.DimensionOrganizationSequence = _seq(DimensionOrganizationUID=FOR + ".1")
    ds.DimensionIndexSequence = Sequence(
        [
            _item(
                DimensionOrganizationUID=FOR + ".1",
                DimensionIndexPointer=0x00209057,
                FunctionalGroupPointer=0x00209111,
            )
        ]
    )
    shared = Dataset()
    shared.PixelMeasuresSequence = _seq(PixelSpacing=[0.5, 0.5], SliceThickness=2.0)
    shared.PlaneOrientationSequence = _seq(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    shared.PixelValueTransformationSequence = _seq(
        RescaleIntercept=-1024 if kind == "CT" else 0,
        RescaleSlope=1,
        RescaleType="HU" if kind == "CT" else "US",
    )
    shared.FrameVOILUTSequence = _seq(WindowCenter=40, WindowWidth=400)
    shared.FrameAnatomySequence = _seq(
        FrameLaterality="U", AnatomicRegionSequence=Sequence([_code("T-D1100", "SRT", "Head")])
    )
    if kind == "CT":
        shared.IrradiationEventIdentificationSequence = _seq(IrradiationEventUID=FOR + ".9")
        shared.CTImageFrameTypeSequence = _seq(
            FrameType=["DERIVED", "PRIMARY", "AXIAL", "NONE"],
            PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME",
            VolumeBasedCalculationTechnique="NONE",
        )
        shared.CTXRayDetailsSequence = _seq(
            KVP=120,
            FocalSpots=[1.2],
            FilterType="FLAT",
            FilterMaterial=["ALUMINUM"],
            CalciumScoringMassFactorPatient=1.0,
        )
        shared.CTExposureSequence = _seq(
            ExposureTimeInms=500.4,
            XRayTubeCurrentInmA=200.0,
            ExposureInmAs=100.0,
            ExposureModulationType="NONE",
            CTDIvol=12.5,
        )
    else:
        shared.MRImageFrameTypeSequence = _seq(
            FrameType=["ORIGINAL", "PRIMARY", "M", "NONE"],
            PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME",
            VolumeBasedCalculationTechnique="NONE",
            ComplexImageComponent="MAGNITUDE",
            AcquisitionContrast="T1",
        )
        shared.MRTimingAndRelatedParametersSequence = _seq(
            RepetitionTime=500.0,
            FlipAngle=90.0,
            EchoTrainLength=1,
            RFEchoTrainLength=1,
            GradientEchoTrainLength=0,
            OperatingModeSequence=_seq(
                OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL"
            ),
            SpecificAbsorptionRateSequence=_seq(
                SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=0.5
            ),
        )
        shared.MRFOVGeometrySequence = _seq(
            InPlanePhaseEncodingDirection="ROW",
            MRAcquisitionFrequencyEncodingSteps=16,
            MRAcquisitionPhaseEncodingStepsInPlane=16,
            PercentSampling=100.0,
            PercentPhaseFieldOfView=100.0,
        )
        shared.MRModifierSequence = _seq(
            InversionRecovery="NO",
            FlowCompensation="NONE",
            Spoiling="NONE",
            T2Preparation="NO",
            SpectrallySelectedExcitation="NONE",
            SpatialPresaturation="NONE",
            PartialFourier="NO",
            ParallelAcquisition="NO",
        )
        shared.MRImagingModifierSequence = _seq(
            MagnetizationTransfer="NONE",
            BloodSignalNulling="NO",
            Tagging="NONE",
            TransmitterFrequency=63.9,
            PixelBandwidth=200.0,
        )
        shared.MRReceiveCoilSequence = _seq(
            ReceiveCoilName="HEAD",
            ReceiveCoilManufacturerName="ACME",
            ReceiveCoilType="VOLUME",
            QuadratureReceiveCoil="YES",
        )
        shared.MRTransmitCoilSequence = _seq(
            TransmitCoilName="BODY", TransmitCoilManufacturerName="ACME", TransmitCoilType="BODY"
        )
        shared.MREchoSequence = _seq(EffectiveEchoTime=15.0)
        shared.MRAveragesSequence = _seq(NumberOfAverages=2.0)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for n in range(frames):
        item = Dataset()
        item.FrameContentSequence = _seq(
            FrameAcquisitionNumber=1,
            FrameReferenceDateTime="20260101101010",
            FrameAcquisitionDateTime=f"202601011010{10 + n:02d}",
            FrameAcquisitionDuration=10.0,
            DimensionIndexValues=[n + 1],
            InStackPositionNumber=n + 1,
            StackID="1",
        )
        item.PlanePositionSequence = _seq(ImagePositionPatient=[-4.0, -4.0, 2.0 * n - 3.0])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    meta.TransferSyntaxUID = RLELossless if rle else ExplicitVRLittleEndian
    ds.file_meta = meta
    if rle:
        ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
    else:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> set[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return {
        line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")
    }


def split_file(p: Pipeline, source: Path, out: Path) -> list[Output]:
    return p.process_file(source, out)


# -- enhanced CT and MR -----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "rle"), [("CT", False), ("MR", False), ("CT", True)])
def test_enhanced_image_becomes_classic_single_frames(kind: str, rle: bool, tmp_path: Path) -> None:
    source = make_enhanced(kind, 4, tmp_path / "enhanced.dcm", rle=rle)
    outputs = split_file(SPLIT, source, tmp_path / "out")
    assert len(outputs) == 4
    original = pydicom.dcmread(source)
    frames = original.pixel_array
    classic = "1.2.840.10008.5.1.4.1.1.2" if kind == "CT" else "1.2.840.10008.5.1.4.1.1.4"
    uids = set()
    for n, output in enumerate(outputs):
        ds = pydicom.dcmread(output.path)
        assert ds.SOPClassUID == classic == output.sop_class_uid
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert ds.SOPInstanceUID == frame_uid(original.SOPInstanceUID, n + 1)
        uids.add(ds.SOPInstanceUID)
        assert ds.StudyInstanceUID == STUDY and ds.SeriesInstanceUID == SERIES
        assert ds.InstanceNumber == n + 1
        assert [float(v) for v in ds.ImagePositionPatient] == [-4.0, -4.0, 2.0 * n - 3.0]
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SliceLocation) == 2.0 * n - 3.0
        assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.5]
        assert float(ds.SliceThickness) == 2.0
        assert float(ds.WindowCenter) == 40 and float(ds.WindowWidth) == 400
        assert ds.AcquisitionDateTime == f"202601011010{10 + n:02d}"
        for gone in (
            "NumberOfFrames",
            "SharedFunctionalGroupsSequence",
            "PerFrameFunctionalGroupsSequence",
            "DimensionIndexSequence",
        ):
            assert gone not in ds
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == original.SOPInstanceUID
        assert ref.ReferencedFrameNumber == n + 1
        assert np.array_equal(ds.pixel_array, frames[n])
        if kind == "CT":
            assert float(ds.RescaleIntercept) == -1024 and ds.KVP == 120
            assert ds.ExposureTime == 500 and ds.XRayTubeCurrent == 200 and ds.Exposure == 100
        else:
            assert list(ds.ScanningSequence) == ["SE"] or ds.ScanningSequence == "SE"
            assert ds.SequenceVariant == "NONE"
            assert float(ds.EchoTime) == 15.0 and float(ds.RepetitionTime) == 500.0
            assert ds.SequenceName == "se2d"
    assert len(uids) == 4


@needs_dciodvfy
@pytest.mark.parametrize("kind", ["CT", "MR"])
def test_dciodvfy_finds_no_new_errors_in_split_enhanced(kind: str, tmp_path: Path) -> None:
    source = make_enhanced(kind, 3, tmp_path / "enhanced.dcm")
    before = dciodvfy_errors(source)
    assert before == set()  # a valid input: every error of an output would be new
    for output in split_file(SPLIT, source, tmp_path / "out"):
        assert dciodvfy_errors(output.path) - before == set(), output.path


# -- pydicom's multi-frame files --------------------------------------------------------------


@needs_dciodvfy
@pytest.mark.parametrize(
    "name",
    [
        "examples_ybr_color.dcm",  # US Multi-frame, JPEG Baseline, 30 frames
        "SC_rgb_rle_2frame.dcm",  # Secondary Capture with 2 RLE frames
        "SC_rgb_rle_16bit_2frame.dcm",
    ],
)
def test_bundled_multi_frames_split_without_new_errors(name: str, tmp_path: Path) -> None:
    source = bundled_file(name)
    original = pydicom.dcmread(source)
    outputs = split_file(SPLIT, source, tmp_path / "out")
    assert len(outputs) == int(original.NumberOfFrames)
    before = {line.replace("Multi-frame ", "") for line in dciodvfy_errors(source)}
    frames = original.pixel_array if "ybr" not in name else None
    for n, output in enumerate(outputs):
        after = dciodvfy_errors(output.path)
        assert after - before == set(), (output.path, after - before)
        ds = pydicom.dcmread(output.path)
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert "NumberOfFrames" not in ds
        if frames is not None:  # RLE: decoded here only to compare, never by the step
            assert np.array_equal(ds.pixel_array, frames[n])
    if name == "examples_ybr_color.dcm":
        assert pydicom.dcmread(outputs[0].path).SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"
        # JPEG frames are copied byte for byte: the same compressed bytes as the source frame
        from pydicom.encaps import generate_frames

        first = next(generate_frames(original.PixelData, number_of_frames=30))
        out_first = next(
            generate_frames(pydicom.dcmread(outputs[0].path).PixelData, number_of_frames=1)
        )
        assert out_first.rstrip(b"\x00") == first.rstrip(b"\x00")


def test_native_multi_frame_grayscale_word_sc(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled_file("SC_rgb_rle_2frame.dcm"))
    ds.decompress()
    path = tmp_path / "native.dcm"
    ds.save_as(path)
    outputs = split_file(SPLIT, path, tmp_path / "out")
    for n, output in enumerate(outputs):
        assert np.array_equal(pydicom.dcmread(output.path).pixel_array, ds.pixel_array[n])


def test_one_bit_frames_are_repacked() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.1"  # Multi-frame Single Bit SC
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 3, 3, 3  # 9 bits a frame: not byte aligned
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    bits = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1] + [0] * 9 + [1] * 9, dtype=np.uint8)
    ds.PixelData = np.packbits(bits, bitorder="little").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    outputs = SPLIT.run(ds)
    assert len(outputs) == 3
    for n, out in enumerate(outputs):
        unpacked = np.unpackbits(np.frombuffer(out.PixelData, np.uint8), bitorder="little")
        assert list(unpacked[:9]) == list(bits[n * 9 : (n + 1) * 9])
        assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


# -- what passes, what is refused ------------------------------------------------------------


def test_single_frame_instances_pass_unchanged(tmp_path: Path) -> None:
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        ds = pydicom.dcmread(bundled_file(name))
        assert SPLIT.run(ds) == [ds]


@pytest.mark.parametrize(
    ("name", "words"),
    [("rtdose.dcm", "RT Dose Storage"), ("NM", "Nuclear Medicine Image Storage")],
)
def test_classes_without_a_single_frame_iod_are_refused(name: str, words: str) -> None:
    if name == "NM":
        ds = pydicom.dcmread(bundled_file("SC_rgb_rle_2frame.dcm"))
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.20"
    else:
        ds = pydicom.dcmread(bundled_file(name))
    with pytest.raises(ProcessingError) as refused:
        SPLIT.run(ds)
    assert refused.value.reason == "cannot_split"
    assert words in str(refused.value)


def test_truncated_pixel_data_is_refused() -> None:
    ds = pydicom.dcmread(bundled_file("SC_rgb_rle_2frame.dcm"))
    ds.decompress()
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(ProcessingError, match="fewer than 2 frames"):
        SPLIT.run(ds)


def test_uids_are_the_same_on_every_run_and_new_series_is_derived(tmp_path: Path) -> None:
    source = make_enhanced("CT", 2, tmp_path / "ct.dcm")
    first = [o.sop_instance_uid for o in split_file(SPLIT, source, tmp_path / "a")]
    again = [o.sop_instance_uid for o in split_file(SPLIT, source, tmp_path / "b")]
    assert first == again and len(set(first)) == 2
    assert all(len(uid) <= 64 and UID(uid).is_valid for uid in first)
    renamed = build([{"split": {"new_series": True}}], "pipeline")
    outs = split_file(renamed, source, tmp_path / "c")
    series = {o.series_instance_uid for o in outs}
    assert len(series) == 1 and SERIES not in series
    assert series == {o.series_instance_uid for o in split_file(renamed, source, tmp_path / "d")}


def test_outputs_share_nothing_so_later_steps_change_one_frame_only(tmp_path: Path) -> None:
    source = make_enhanced("CT", 2, tmp_path / "ct.dcm")
    first, second = SPLIT.run(pydicom.dcmread(source))
    first.SourceImageSequence[0].ReferencedSOPInstanceUID = "9.9"
    first.AcquisitionContextSequence.append(Dataset())
    assert second.SourceImageSequence[0].ReferencedSOPInstanceUID != "9.9"
    assert len(second.AcquisitionContextSequence) == 0


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as error:
        build([{"split": {"new_series": "maybe"}}], "routes[1].pipeline")
    assert error.value.key == "routes[1].pipeline[0].split.new_series"
    with pytest.raises(ConfigError) as error:
        build([{"split": {"frames": 2}}], "routes[1].pipeline")
    assert error.value.key == "routes[1].pipeline[0].split.frames"


def test_encapsulate_helper_matches_pydicom() -> None:
    # The new Basic Offset Table of a single frame holds one offset, 0 (PS3.5 A.4).
    from dicomgate.processing.split import _encapsulated

    assert _encapsulated([b"ab", b"cd"]) == encapsulate([b"abcd"], fragments_per_frame=1)[:12] + (
        b"\xfe\xff\x00\xe0\x02\x00\x00\x00ab\xfe\xff\x00\xe0\x02\x00\x00\x00cd"
    )
