"""``split``: a multi-frame instance becomes one single-frame instance per frame.

For the receivers that only understand classic images (older PACS, some AI engines). Each
output is an instance of the matching single-frame SOP class (:data:`CLASSIC`): the Shared
and Per-frame Functional Groups (PS3.3 C.7.6.16) are flattened into the classic
attributes (Plane Position -> Image Position (Patient), Pixel Measures -> Pixel Spacing,
Pixel Value Transformation -> Rescale, Frame VOI LUT -> Window, the CT and MR macros ->
the CT Image and MR Image modules, PS3.3 C.8.2.1 and C.8.3.1), the multi-frame modules are
removed, and the frame's pixel data is copied as it is: native frames by offset,
encapsulated frames fragment for fragment behind a new Basic Offset Table (PS3.5 A.4),
never decoded or re-encoded.

Each output gets a new SOP Instance UID derived from the source's UID and the frame
number (a name-based UUID, PS3.5 B.2), so a retried or re-sent delivery produces the same
UIDs. Study and Series Instance UIDs are kept (``new_series: true`` derives a new series
UID the same way). InstanceNumber is the frame number; Source Image Sequence points to the
source frame. A single-frame instance passes through unchanged.
"""

from __future__ import annotations

import copy
import math
import struct
import uuid
from collections.abc import Callable, Iterable
from typing import Final

import numpy as np
from pydantic import Field
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.encaps import generate_fragmented_frames
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID
from pydicom.valuerep import DS, IS

from dicomgate.models import ConfigModel
from dicomgate.processing.base import ProcessingError, Step

__all__ = ["CLASSIC", "Split", "frame_uid"]

REASON: Final = "cannot_split"

_CT: Final = "1.2.840.10008.5.1.4.1.1.2"
_MR: Final = "1.2.840.10008.5.1.4.1.1.4"
_US: Final = "1.2.840.10008.5.1.4.1.1.6.1"
_SC: Final = "1.2.840.10008.5.1.4.1.1.7"

#: Multi-frame SOP class -> the single-frame class its frames become.
CLASSIC: Final[dict[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.2.1": _CT,  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2": _CT,  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1": _MR,  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.4": _MR,  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.3.1": _US,  # Ultrasound Multi-frame
    "1.2.840.10008.5.1.4.1.1.7.1": _SC,  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2": _SC,  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3": _SC,  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4": _SC,  # Multi-frame True Color SC
    _SC: _SC,  # Secondary Capture with Number of Frames > 1 (seen in the field)
}

#: Namespace of the name-based UUIDs of split outputs (fixed forever: UIDs must not change).
_NAMESPACE: Final = uuid.UUID("6f1e7e0a-3c1d-5b8e-9a57-d1c0a6a7e5b1")

#: Attributes only a multi-frame instance has (Multi-frame, Cine, Multi-frame Functional
#: Groups, Multi-frame Dimension, SC Multi-frame Vector modules; PS3.3 C.7.6.6, C.7.6.5,
#: C.7.6.16, C.7.6.17, C.8.6.4) or only an enhanced image (Enhanced CT/MR Image modules).
_MULTI_FRAME_ONLY: Final = (
    "NumberOfFrames",
    "FrameIncrementPointer",
    "FrameDimensionPointer",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
    "DimensionOrganizationType",
    "ConcatenationUID",
    "InConcatenationNumber",
    "InConcatenationTotalNumber",
    "ConcatenationFrameOffsetNumber",
    "RepresentativeFrameNumber",
    "FrameTime",
    "FrameTimeVector",
    "FrameDelay",
    "StartTrim",
    "StopTrim",
    "RecommendedDisplayFrameRate",
    "CineRate",
    "ActualFrameDuration",
    "PreferredPlaybackSequencing",
    "PageNumberVector",
    "FrameLabelVector",
    "FramePrimaryAngleVector",
    "FrameSecondaryAngleVector",
    "SliceLocationVector",
    "DisplayWindowLabelVector",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelPresentation",
    "VolumetricProperties",
    "VolumeBasedCalculationTechnique",
)

#: Functional group macro -> its attributes that the classic modules hold under the same
#: tag (PS3.3 C.7.6.16.2 and C.8.13.5 / C.8.15.3 against C.7.6.2, C.8.2.1, C.8.3.1).
_SAME_TAG: Final[dict[str, tuple[str, ...]]] = {
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
    "FrameVOILUTSequence": (
        "WindowCenter",
        "WindowWidth",
        "WindowCenterWidthExplanation",
        "VOILUTFunction",
    ),
    "IrradiationEventIdentificationSequence": ("IrradiationEventUID",),
    "CTAcquisitionDetailsSequence": (
        "DataCollectionDiameter",
        "RevolutionTime",
        "TableHeight",
        "GantryDetectorTilt",
        "RotationDirection",
        "SingleCollimationWidth",
        "TotalCollimationWidth",
    ),
    "CTTableDynamicsSequence": ("TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor"),
    "CTGeometrySequence": ("DistanceSourceToDetector",),
    "CTReconstructionSequence": ("ReconstructionDiameter", "ConvolutionKernel"),
    "CTExposureSequence": ("CTDIvol", "ExposureModulationType", "EstimatedDoseSaving"),
    "CTXRayDetailsSequence": ("KVP", "FocalSpots", "FilterType"),
    "MRTimingAndRelatedParametersSequence": ("RepetitionTime", "FlipAngle", "EchoTrainLength"),
    "MRFOVGeometrySequence": (
        "InPlanePhaseEncodingDirection",
        "PercentSampling",
        "PercentPhaseFieldOfView",
    ),
    "MRReceiveCoilSequence": ("ReceiveCoilName",),
    "MRTransmitCoilSequence": ("TransmitCoilName",),
    "MRAveragesSequence": ("NumberOfAverages",),
    "MRDiffusionSequence": ("DiffusionBValue",),
    "FrameAnatomySequence": ("AnatomicRegionSequence", "PrimaryAnatomicStructureSequence"),
    "ReferencedImageSequence": (),  # handled below: the sequence itself is copied
}


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, list | tuple | MultiValue) else [value]


def _int_text(value: object) -> IS:
    return IS(round(float(value)))  # type: ignore[arg-type]


def _ds_text(value: object) -> object:
    return DS(float(value), auto_format=True)  # type: ignore[arg-type]


#: (macro, attribute) -> (classic keyword, conversion): same meaning, other tag or VR.
_RENAMED: Final[dict[tuple[str, str], tuple[str, Callable[[object], object]]]] = {
    ("CTExposureSequence", "ExposureTimeInms"): ("ExposureTime", _int_text),
    ("CTExposureSequence", "XRayTubeCurrentInmA"): ("XRayTubeCurrent", _int_text),
    ("CTExposureSequence", "ExposureInmAs"): ("Exposure", _int_text),
    ("MREchoSequence", "EffectiveEchoTime"): ("EchoTime", _ds_text),
    ("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"): (
        "TriggerTime",
        _ds_text,
    ),
    ("FrameContentSequence", "FrameAcquisitionNumber"): ("AcquisitionNumber", _int_text),
    ("FrameContentSequence", "FrameComments"): ("ImageComments", str),
    ("FrameAnatomySequence", "FrameLaterality"): ("ImageLaterality", str),
    ("CTImageFrameTypeSequence", "FrameType"): ("ImageType", _as_list),
    ("MRImageFrameTypeSequence", "FrameType"): ("ImageType", _as_list),
}


def frame_uid(sop_instance_uid: str, frame: int) -> str:
    """The SOP Instance UID of frame ``frame`` (1-based) of ``sop_instance_uid``."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, f'{sop_instance_uid}/frame/{frame}').int}"


def _series_uid(series_instance_uid: str) -> str:
    return f"2.25.{uuid.uuid5(_NAMESPACE, f'{series_instance_uid}/split-series').int}"


class SplitConfig(ConfigModel):
    new_series: bool = Field(
        default=False,
        description="false: the frames keep the source's Series Instance UID; true: they"
        " get a new one derived from it (the same for every frame and on every retry).",
    )


# -- functional groups -----------------------------------------------------------------------


def _frame_groups(ds: Dataset, index: int) -> dict[str, Dataset]:
    """Macro keyword -> its item for one frame: the per-frame item wins over the shared one."""
    groups: dict[str, Dataset] = {}
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(keyword)
        if not seq:
            continue
        item = seq[0] if keyword.startswith("Shared") else seq[index] if index < len(seq) else None
        if item is None:
            continue
        for elem in item:
            if elem.VR == "SQ" and elem.value and elem.keyword:
                groups[elem.keyword] = elem.value[0]
    return groups


def _flatten(out: Dataset, groups: dict[str, Dataset]) -> None:
    for macro, item in groups.items():
        if macro == "ReferencedImageSequence":
            out.ReferencedImageSequence = copy.deepcopy(DicomSequence([item]))
            continue
        for keyword in _SAME_TAG.get(macro, ()):
            if keyword in item:
                out[keyword] = copy.deepcopy(item[keyword])
        for elem in item:
            target = _RENAMED.get((macro, elem.keyword))
            if target is None or elem.value is None or elem.value == "":
                continue
            name, conversion = target
            setattr(out, name, conversion(elem.value))
    content = groups.get("FrameContentSequence")
    if content is not None and content.get("FrameAcquisitionDateTime"):
        stamp = str(content.FrameAcquisitionDateTime)
        out.AcquisitionDateTime = stamp
        if len(stamp) >= 8:
            out.AcquisitionDate = stamp[:8]
        if len(stamp) > 8:
            out.AcquisitionTime = stamp[8:].split("+")[0].split("-")[0]
    modifier = groups.get("MRModifierSequence")
    if modifier is not None and modifier.get("InversionTimes"):
        times = modifier.InversionTimes
        first = times[0] if isinstance(times, MultiValue | list | tuple) else times
        out.InversionTime = _ds_text(first)


def _lookup(keyword: str, out: Dataset, groups: dict[str, Dataset]) -> str:
    for item in groups.values():
        if keyword in item:
            return str(item[keyword].value or "")
    return str(out.get(keyword, "") or "")


def _mr_sequence(out: Dataset, groups: dict[str, Dataset]) -> None:
    """Scanning Sequence and Sequence Variant (type 1 in C.8.3.1) from the enhanced
    MR Pulse Sequence and MR Modifier attributes (C.8.13.1, C.8.13.5.6)."""
    if "ScanningSequence" not in out:
        echo = _lookup("EchoPulseSequence", out, groups)
        scanning = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(echo, [])
        if _lookup("InversionRecovery", out, groups) == "YES":
            scanning.append("IR")
        if _lookup("EchoPlanarPulseSequence", out, groups) == "YES":
            scanning.append("EP")
        out.ScanningSequence = scanning or ["RM"]  # RM: research mode, when nothing says
    if "SequenceVariant" not in out:
        variants = []
        if _lookup("SegmentedKSpaceTraversal", out, groups) not in ("", "SINGLE"):
            variants.append("SK")
        if _lookup("MagnetizationTransfer", out, groups) not in ("", "NONE"):
            variants.append("MT")
        if _lookup("SteadyStatePulseSequence", out, groups) not in ("", "NONE"):
            variants.append("SS")
        if _lookup("Spoiling", out, groups) not in ("", "NONE"):
            variants.append("SP")
        if _lookup("OversamplingPhase", out, groups) not in ("", "NONE"):
            variants.append("OSP")
        out.SequenceVariant = variants or ["NONE"]
    if "SequenceName" not in out and out.get("PulseSequenceName"):
        out.SequenceName = out.PulseSequenceName
    for keyword in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"):
        if keyword not in out:
            setattr(out, keyword, None)  # type 2: present, maybe empty
    if "RepetitionTime" not in out:
        out.RepetitionTime = None


def _slice_location(out: Dataset) -> None:
    """The position along the normal of the image plane (C.7.6.2.1.2), in mm."""
    position, orientation = out.get("ImagePositionPatient"), out.get("ImageOrientationPatient")
    if not position or not orientation or len(position) != 3 or len(orientation) != 6:
        return
    row = np.array([float(v) for v in orientation[:3]])
    column = np.array([float(v) for v in orientation[3:]])
    normal = np.cross(row, column)
    value = float(np.dot(normal, np.array([float(v) for v in position])))
    if math.isfinite(value):
        out.SliceLocation = DS(round(value, 6), auto_format=True)


# -- pixel data ------------------------------------------------------------------------------


def _encapsulated(fragments: Iterable[bytes]) -> bytes:
    """One frame as an encapsulated value: a Basic Offset Table with offset 0, then its
    fragments as items (PS3.5 A.4); the writer adds the sequence delimiter."""
    out = bytearray(struct.pack("<HHII", 0xFFFE, 0xE000, 4, 0))
    for fragment in fragments:
        if len(fragment) % 2:
            fragment += b"\x00"
        out += struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)) + fragment
    return bytes(out)


def _frame_bits(ds: Dataset) -> int:
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
    if str(ds.get("PhotometricInterpretation", "")).startswith("YBR_FULL_422"):
        return rows * columns * 2 * bits  # two samples per pixel after subsampling (C.7.6.3.1.2)
    return rows * columns * samples * bits


def _native_frames(ds: Dataset, count: int, big_endian: bool) -> list[bytes]:
    data = bytes(ds.PixelData)
    bits = _frame_bits(ds)
    if len(data) * 8 < bits * count:
        raise ProcessingError(REASON, f"Pixel Data holds fewer than {count} frames")
    if bits % 8 == 0:
        size = bits // 8
        return [data[n * size : (n + 1) * size] for n in range(count)]
    if big_endian:
        raise ProcessingError(REASON, "1-bit frames in big endian are not supported")
    # Bit-packed frames that do not end on a byte (PS3.5 8.1.1): repack each frame.
    unpacked = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    return [
        np.packbits(unpacked[n * bits : (n + 1) * bits], bitorder="little").tobytes()
        for n in range(count)
    ]


def _pixel_frames(ds: Dataset, count: int) -> list[tuple[str, bytes, bool]]:
    """(VR, value, encapsulated) of each frame's Pixel Data."""
    if "PixelData" not in ds:
        for other in ("FloatPixelData", "DoubleFloatPixelData"):
            if other in ds:
                raise ProcessingError(REASON, f"{other} has no single-frame IOD to split into")
        raise ProcessingError(REASON, "the instance has no Pixel Data")
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if not syntax.is_encapsulated:
        vr = str(ds["PixelData"].VR)
        vr = vr if vr in ("OB", "OW") else "OW" if int(ds.BitsAllocated) > 8 else "OB"
        frames = _native_frames(ds, count, not syntax.is_little_endian)
        return [(vr, f + b"\x00" if len(f) % 2 else f, False) for f in frames]
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        fragmented = list(
            generate_fragmented_frames(
                ds.PixelData, number_of_frames=count, extended_offsets=offsets
            )
        )
    except (ValueError, struct.error) as exc:
        raise ProcessingError(REASON, f"cannot find the frames in the Pixel Data: {exc}") from exc
    if len(fragmented) != count:
        raise ProcessingError(REASON, f"the Pixel Data holds {len(fragmented)} frames, not {count}")
    return [("OB", _encapsulated(frame), True) for frame in fragmented]


# -- the step --------------------------------------------------------------------------------


def _without(ds: Dataset, keywords: Iterable[str]) -> Dataset:
    """A copy of ``ds`` without ``keywords`` and Pixel Data (deep: outputs share nothing)."""
    drop = {tag_for_keyword(k) for k in keywords} | {0x7FE00010}
    base = Dataset()
    for elem in ds:
        if elem.tag not in drop:
            base.add(copy.deepcopy(elem))
    return base


class Split(Step):
    """One single-frame instance per frame (see the module docstring)."""

    name = "split"
    Config = SplitConfig

    def apply(self, ds: Dataset) -> list[Dataset]:
        try:
            count = int(ds.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):
            raise ProcessingError(REASON, "Number of Frames is not a number") from None
        if count <= 1:
            return [ds]
        source_class = str(ds.get("SOPClassUID", ""))
        target_class = CLASSIC.get(source_class)
        if target_class is None:
            name = UID(source_class).name if source_class else "no SOP class"
            raise ProcessingError(REASON, f"{name} has no single-frame SOP class to split into")
        if target_class == _MR and "MONOCHROME" not in str(ds.get("PhotometricInterpretation")):
            raise ProcessingError(REASON, "MR Image Storage holds monochrome images only")
        pixels = _pixel_frames(ds, count)
        base = _without(ds, _MULTI_FRAME_ONLY)
        source_uid = str(ds.SOPInstanceUID)
        slice_vector = list(ds.get("SliceLocationVector") or [])
        outputs = []
        for index, (vr, value, encapsulated) in enumerate(pixels):
            number = index + 1
            out = copy.deepcopy(base)
            out.file_meta = copy.deepcopy(ds.file_meta)
            groups = _frame_groups(ds, index)
            _flatten(out, groups)
            if target_class == _MR:
                _mr_sequence(out, groups)
            if target_class in (_CT, _MR):
                _classic_defaults(out, target_class)
            _slice_location(out)
            if "SliceLocation" not in out and index < len(slice_vector):
                out.SliceLocation = slice_vector[index]
            out.SOPClassUID = target_class
            out.SOPInstanceUID = frame_uid(source_uid, number)
            out.InstanceNumber = number
            if self.config.new_series and "SeriesInstanceUID" in ds:
                out.SeriesInstanceUID = _series_uid(str(ds.SeriesInstanceUID))
            out.SourceImageSequence = DicomSequence([_reference(ds, number)])
            out["PixelData"] = DataElement(0x7FE00010, vr, value, is_undefined_length=encapsulated)
            outputs.append(out)
        return outputs


def _classic_defaults(out: Dataset, target_class: str) -> None:
    """Type 1 and 2 attributes of the CT/MR Image modules an enhanced image may lack."""
    if "SliceThickness" not in out:
        out.SliceThickness = None
    if target_class == _CT:
        for keyword in ("KVP", "AcquisitionNumber"):
            if keyword not in out:
                setattr(out, keyword, None)
        if "RescaleIntercept" not in out or "RescaleSlope" not in out:
            out.RescaleIntercept, out.RescaleSlope = DS(0), DS(1)


def _reference(ds: Dataset, frame: int) -> Dataset:
    """The Source Image Sequence item of one output (PS3.3 C.7.6.1, C.10.4)."""
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if CLASSIC.get(str(ds.SOPClassUID)) != str(ds.SOPClassUID):
        # Only for a multi-frame SOP class: a frame number of a single-frame class (a
        # Secondary Capture with frames) is an error for validators (C.10.4 1C).
        item.ReferencedFrameNumber = frame
    return item
