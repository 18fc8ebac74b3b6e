"""Deterministic synthetic DICOM corpora for tests and benchmarks.

Nothing is downloaded: every file is built here from a seed, so the same call gives the
same bytes on every run (UIDs included). Files are Part 10 files with explicit VR little
endian that DCMTK (``dcmdump``) and dicom3tools (``dciodvfy``) accept.

* :func:`make_mr_series`: small MR images (64x64, 16-bit, about 12 KB a file).
* :func:`make_ct_series`: CT images (512x512, 16-bit, about 514 KB a file).
* :func:`make_large_instance`: one multi-frame instance of any size up to about 4 GB,
  written frame by frame so memory stays flat (the pixel array is never built whole).

Import it from tests as ``from tests.corpus import make_mr_series`` (with the repository
root on ``sys.path``).
"""

from __future__ import annotations

import datetime as _dt
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)

__all__ = [
    "IMPLEMENTATION_VERSION_NAME",
    "make_ct_series",
    "make_large_instance",
    "make_mr_series",
]

IMPLEMENTATION_VERSION_NAME = "DICOMGATE_TEST"

#: Largest value length a 32-bit VL can hold for defined-length Pixel Data (even).
_MAX_VL = 0xFFFFFFFE

#: A private block like the ones scanners write (here, the one the design's standardize
#: example reads: "SIEMENS MR HEADER",0019,0C = diffusion b-value).
_MR_PRIVATE_CREATOR = "SIEMENS MR HEADER"

#: Our own private creator for filler bytes that bring the MR files to a realistic size.
_FILLER_CREATOR = "DICOMGATE SYNTHETIC"

#: Target file size of one small MR instance.
_MR_TARGET_BYTES = 12 * 1024


# --------------------------------------------------------------------------- helpers


def _rng(seed: int, kind: str) -> random.Random:
    """A stream of its own per (seed, kind), stable across Python versions."""
    return random.Random(f"dicomgate-corpus:{kind}:{seed}")


def _uid(rng: random.Random) -> str:
    """A UUID-derived UID (PS3.5 B.2): ``2.25.`` + a 128-bit integer, at most 44 chars."""
    return f"2.25.{rng.getrandbits(128)}"


def _date(base: _dt.date, rng: random.Random, spread_days: int) -> str:
    return (base + _dt.timedelta(days=rng.randrange(spread_days))).strftime("%Y%m%d")


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _phantom(
    rows: int, cols: int, rng: random.Random, *, base: int, peak: int
) -> npt.NDArray[np.uint16]:
    """A smooth round "body" with a few "organs" plus deterministic noise, as uint16.

    The noise comes from ``random.Random.randbytes`` (stable across versions), the shapes
    from plain arithmetic, so the result only depends on ``rng``'s state.
    """
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = (rows - 1) / 2.0, (cols - 1) / 2.0
    r2 = ((y - cy) / (rows * 0.45)) ** 2 + ((x - cx) / (cols * 0.40)) ** 2
    img = np.where(r2 <= 1.0, float(base) + (peak - base) * 0.35 * (1.0 - r2), 0.0)
    for _ in range(3):
        oy = rng.uniform(0.3, 0.7) * rows
        ox = rng.uniform(0.3, 0.7) * cols
        rad = rng.uniform(0.05, 0.12) * min(rows, cols)
        level = rng.uniform(0.4, 1.0) * peak
        img = np.where((y - oy) ** 2 + (x - ox) ** 2 <= rad * rad, level, img)
    noise = np.frombuffer(rng.randbytes(rows * cols), dtype=np.uint8).reshape(rows, cols)
    img = img + (noise.astype(np.float32) - 128.0) * (peak / 2048.0)
    out: npt.NDArray[np.uint16] = np.clip(img, 0, peak).astype("<u2")
    return out


def _shared(rng: random.Random) -> dict[str, str]:
    """Study-level values shared by every instance of one generated series."""
    study_date = _date(_dt.date(2023, 1, 1), rng, 365)
    return {
        "study_uid": _uid(rng),
        "series_uid": _uid(rng),
        "for_uid": _uid(rng),
        "study_date": study_date,
        "study_time": f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
        "study_id": str(rng.randrange(1, 100000)),
        "accession": f"A{rng.randrange(10**7):07d}",
        "patient_id": f"P{rng.randrange(10**6):06d}",
        "birth_date": f"{rng.randrange(1940, 2000)}{rng.randrange(1, 13):02d}15",
        "sex": rng.choice(["M", "F", "O"]),
        "age": f"{rng.randrange(20, 85):03d}Y",
        "weight": f"{rng.randrange(50, 110)}",
    }


def _patient_study(
    ds: Dataset, shared: dict[str, str], *, patient_name: str, study_description: str
) -> None:
    ds.PatientName = patient_name
    ds.PatientID = shared["patient_id"]
    ds.PatientBirthDate = shared["birth_date"]
    ds.PatientSex = shared["sex"]
    ds.PatientAge = shared["age"]
    ds.PatientWeight = shared["weight"]
    ds.StudyInstanceUID = shared["study_uid"]
    ds.StudyDate = shared["study_date"]
    ds.StudyTime = shared["study_time"]
    ds.StudyID = shared["study_id"]
    ds.AccessionNumber = shared["accession"]
    ds.ReferringPhysicianName = "REFERRER^RITA"
    ds.StudyDescription = study_description


def _image_pixel(ds: Dataset, rows: int, cols: int, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def _series(
    folder: Path,
    count: int,
    *,
    seed: int,
    kind: str,
    prefix: str,
    build: Callable[[random.Random, dict[str, str], int], Dataset],
) -> list[Path]:
    if count < 0:
        raise ValueError("count must be >= 0")
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, kind)
    shared = _shared(rng)
    paths: list[Path] = []
    for i in range(count):
        ds = build(rng, shared, i)
        paths.append(_write(ds, folder / f"{prefix}{i + 1:05d}.dcm"))
    return paths


# --------------------------------------------------------------------------- MR


def make_mr_series(
    folder: Path, count: int, *, seed: int = 0, patient_name: str = "DOE^JOHN"
) -> list[Path]:
    """Write ``count`` MR Image Storage instances of one series (one study) into ``folder``.

    64x64 pixels, 16-bit (12 stored), explicit VR little endian, about 12 KB a file. UIDs
    are ``2.25.<int>`` and derive from ``seed``; the same seed gives the same files.
    Returns the paths in instance-number order.
    """

    def build(rng: random.Random, shared: dict[str, str], i: int) -> Dataset:
        sop_uid = _uid(rng)
        ds = Dataset()
        ds.file_meta = _file_meta(MRImageStorage, sop_uid)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.InstanceCreationDate = shared["study_date"]
        ds.InstanceCreationTime = shared["study_time"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        _patient_study(
            ds, shared, patient_name=patient_name, study_description="MR BRAIN W/O CONTRAST"
        )
        ds.SeriesDate = shared["study_date"]
        ds.SeriesTime = shared["study_time"]
        ds.AcquisitionDate = shared["study_date"]
        ds.AcquisitionTime = shared["study_time"]
        ds.ContentDate = shared["study_date"]
        ds.ContentTime = shared["study_time"]
        ds.Modality = "MR"
        ds.Manufacturer = "DICOMGATE SYNTHETIC"
        ds.InstitutionName = "GENERAL HOSPITAL"
        ds.StationName = "MR01"
        ds.SeriesDescription = "t2_tse_tra"
        ds.ManufacturerModelName = "SYNTH-MR"
        ds.BodyPartExamined = "BRAIN"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = ["SK", "SP"]
        ds.ScanOptions = "PFP"
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "*tse2d1_15"
        ds.SliceThickness = "5"
        ds.RepetitionTime = "4000"
        ds.EchoTime = "95"
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = "123.2"
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.MagneticFieldStrength = "3"
        ds.SpacingBetweenSlices = "6"
        ds.EchoTrainLength = "15"
        ds.SoftwareVersions = "synthetic 1.0"
        ds.ProtocolName = "t2_tse_tra"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = shared["study_uid"]
        ds.SeriesInstanceUID = shared["series_uid"]
        ds.SeriesNumber = 3
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        z = -60.0 + 6.0 * i
        ds.ImagePositionPatient = [-120.0, -120.0, z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.FrameOfReferenceUID = shared["for_uid"]
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.1f}"
        _image_pixel(ds, 64, 64, 12)
        ds.PixelSpacing = [3.75, 3.75]
        ds.WindowCenter = "600"
        ds.WindowWidth = "1200"
        # Scanner-style private block, and filler to a realistic header size.
        block = ds.private_block(0x0019, _MR_PRIVATE_CREATOR, create=True)
        block.add_new(0x0C, "IS", str(rng.choice([0, 500, 1000])))
        filler = ds.private_block(0x0029, _FILLER_CREATOR, create=True)
        filler.add_new(0x10, "OB", b"")
        pixels = _phantom(64, 64, rng, base=200, peak=1800)
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"
        # Fill up to the target size (even length).
        probe_size = _encoded_size(ds)
        pad = max(0, _MR_TARGET_BYTES - probe_size)
        pad -= pad % 2
        filler[0x10].value = rng.randbytes(pad)
        return ds

    return _series(folder, count, seed=seed, kind="mr", prefix="MR", build=build)


def _encoded_size(ds: Dataset) -> int:
    from io import BytesIO

    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.tell()


# --------------------------------------------------------------------------- CT


def make_ct_series(folder: Path, count: int, *, seed: int = 0) -> list[Path]:
    """Write ``count`` CT Image Storage instances of one series (one study) into ``folder``.

    512x512 pixels, 16-bit (12 stored, rescale -1024), explicit VR little endian, about
    514 KB a file. Deterministic from ``seed``. Returns the paths in instance order.
    """

    def build(rng: random.Random, shared: dict[str, str], i: int) -> Dataset:
        sop_uid = _uid(rng)
        ds = Dataset()
        ds.file_meta = _file_meta(CTImageStorage, sop_uid)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceCreationDate = shared["study_date"]
        ds.InstanceCreationTime = shared["study_time"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        _patient_study(
            ds, shared, patient_name="ROE^JANE", study_description="CT CHEST W/O CONTRAST"
        )
        ds.SeriesDate = shared["study_date"]
        ds.SeriesTime = shared["study_time"]
        ds.AcquisitionDate = shared["study_date"]
        ds.AcquisitionTime = shared["study_time"]
        ds.ContentDate = shared["study_date"]
        ds.ContentTime = shared["study_time"]
        ds.Modality = "CT"
        ds.Manufacturer = "DICOMGATE SYNTHETIC"
        ds.InstitutionName = "GENERAL HOSPITAL"
        ds.StationName = "CT01"
        ds.SeriesDescription = "CHEST 1.0 B30f"
        ds.ManufacturerModelName = "SYNTH-CT"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = "1"
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.SoftwareVersions = "synthetic 1.0"
        ds.ProtocolName = "CHEST"
        ds.ReconstructionDiameter = "380"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = "200"
        ds.Exposure = "100"
        ds.ConvolutionKernel = "B30f"
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = shared["study_uid"]
        ds.SeriesInstanceUID = shared["series_uid"]
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        z = -100.0 - 1.0 * i
        ds.ImagePositionPatient = [-190.0, -190.0, z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.FrameOfReferenceUID = shared["for_uid"]
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.1f}"
        _image_pixel(ds, 512, 512, 12)
        ds.PixelSpacing = [0.742, 0.742]
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        pixels = _phantom(512, 512, rng, base=900, peak=2400)
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"
        return ds

    return _series(folder, count, seed=seed, kind="ct", prefix="CT", build=build)


# --------------------------------------------------------------------------- large


def _large_frames(rows: int, cols: int, frames: int, rng: random.Random) -> Iterator[bytes]:
    """Distinct, deterministic frames, one at a time: a base image shifted per frame, with
    the frame number in the first pixel row (so no two frames are equal)."""
    base = _phantom(rows, cols, rng, base=300, peak=4000)
    for n in range(frames):
        frame = np.roll(base, shift=(n * 7) % cols, axis=1)
        frame[0, :4] = (n & 0xFFF, (n >> 12) & 0xFFF, (n >> 24) & 0xFFF, 0xABC)
        yield frame.tobytes()


def make_large_instance(path: Path, size_bytes: int, *, seed: int = 0) -> Path:
    """Write one Multi-frame Grayscale Word Secondary Capture instance of about
    ``size_bytes`` to ``path`` (frames of 512x512, or smaller for small sizes).

    The header (file meta + data set up to, not including, Pixel Data) is written by
    pydicom; the Pixel Data element header and the frames are then appended one frame at
    a time, so memory use does not grow with the size. The Pixel Data VL equals
    frames x frame size (always even), and NumberOfFrames matches it. Sizes above about
    4 GB do not fit a defined-length 32-bit VL and are refused.
    """
    if size_bytes <= 0:
        raise ValueError("size_bytes must be > 0")
    rng = _rng(seed, "large")
    side = 512
    while side > 16 and side * side * 2 * 4 > size_bytes:
        side //= 2
    rows = cols = side
    frame_bytes = rows * cols * 2
    frames = max(1, round(size_bytes / frame_bytes))
    pixel_len = frames * frame_bytes
    if pixel_len > _MAX_VL:
        raise ValueError(f"{size_bytes} bytes do not fit one defined-length Pixel Data")

    shared = _shared(rng)
    sop_uid = _uid(rng)
    sop_class = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    _patient_study(ds, shared, patient_name="BIG^FRAME", study_description="LARGE MULTIFRAME")
    ds.ContentDate = shared["study_date"]
    ds.ContentTime = shared["study_time"]
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.Manufacturer = "DICOMGATE SYNTHETIC"
    ds.SeriesInstanceUID = shared["series_uid"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.Laterality = ""  # no body part: dciodvfy wants it present (type 2C)
    ds.BurnedInAnnotation = "NO"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = "40"
    _image_pixel(ds, rows, cols, 12)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = "2000"
    ds.WindowWidth = "4000"
    ds.PresentationLUTShape = "IDENTITY"

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        dcmwrite(fh, ds, enforce_file_format=True)
        # (7FE0,0010) OW, explicit VR LE: tag, VR, 2 reserved bytes, 32-bit length.
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_len))
        chunk: list[bytes] = []
        pending = 0
        for frame in _large_frames(rows, cols, frames, rng):
            chunk.append(frame)
            pending += len(frame)
            if pending >= 4 * 1024 * 1024:
                fh.write(b"".join(chunk))
                chunk.clear()
                pending = 0
        if chunk:
            fh.write(b"".join(chunk))
    return path
