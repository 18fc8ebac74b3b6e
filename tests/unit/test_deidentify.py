"""The ``deidentify`` step: PS3.15 Annex E Basic Profile, options, UIDs, pseudonyms, pixels."""

from __future__ import annotations

import copy
import datetime as dt
import io
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage
from tests.conftest import Corpus, bundled_file

from dicomgate.errors import ConfigError
from dicomgate.processing import ps315_tables
from dicomgate.processing.base import ProcessingError, StepContext
from dicomgate.processing.deidentify import Deidentify
from dicomgate.processing.pipeline import Pipeline, build, write_part10

SECRET = "correct horse battery staple"
ENV = {"DEID_SECRET": SECRET, "OTHER_SECRET": "another secret of 16+ chars"}


def step(tmp: Path | None = None, env: dict[str, str] | None = None, **settings: Any) -> Deidentify:
    settings.setdefault("secret_env", "DEID_SECRET")
    pipeline = build(
        [{"deidentify": settings}],
        "pipeline",
        StepContext(environ=ENV if env is None else env, base_dir=tmp or Path(".")),
    )
    deid = pipeline.steps[0]
    assert isinstance(deid, Deidentify)
    return deid


def roundtrip(ds: Dataset) -> tuple[Dataset, bytes]:
    """``ds`` written as Part 10 and read back (what a destination gets), and its bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return pydicom.dcmread(io.BytesIO(data)), data


def item(**values: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


# --------------------------------------------------------------------------- a PHI corpus

#: Strings planted in the PHI data set; none may survive de-identification (as bytes).
PHI = [
    "SMITHERSON",
    "JOHNATHAN",
    "MUELLERMANN",
    "PID-778899",
    "ALT-ID-5566",
    "ACC-PHI-4321",
    "19610704",  # birth date
    "20190315",  # study date
    "1 ELM STREET",
    "555-0100",
    "DR^NOSYPARKER",
    "OPERATOR^OTTO",
    "St. Elsewhere",
    "SER-0099887",
    "ROOM 101",
    "PRIVATE SECRET NOTE",
    "HEARTSURGEON",
    "REQ-77-PHI",
    "BADGE-31337",  # a person's code inside PersonIdentificationCodeSequence
]


def phi_dataset(patient_id: str = "PID-778899", study: str = "1") -> Dataset:
    """An MR instance with identifying values at every level: top level, sequences (two
    deep), descriptions, comments, dates, a private block, an overlay and an SR-like
    content tree."""
    ds = Dataset()
    sop = f"1.2.826.0.1.3680043.2.1125.{study}.3.1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.2.1125.{study}.1"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.2.1125.{study}.2"
    ds.FrameOfReferenceUID = f"1.2.826.0.1.3680043.2.1125.{study}.4"
    ds.PatientName = "SMITHERSON^JOHNATHAN"
    ds.PatientID = patient_id
    ds.OtherPatientIDsSequence = [item(PatientID="ALT-ID-5566", TypeOfPatientID="TEXT")]
    ds.PatientBirthDate = "19610704"
    ds.PatientSex = "M"
    ds.PatientAge = "057Y"
    ds.PatientWeight = "81"
    ds.PatientAddress = "1 ELM STREET"
    ds.PatientTelephoneNumbers = "555-0100"
    ds.PatientBirthName = "MUELLERMANN"
    ds.PatientComments = "JOHNATHAN is claustrophobic"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20190315"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101500"
    ds.AcquisitionDateTime = "20190315101500.000000"
    ds.InstanceCreationDate = "20190315"
    ds.AccessionNumber = "ACC-PHI-4321"
    ds.StudyID = "ACC-PHI-4321"
    ds.ReferringPhysicianName = "DR^NOSYPARKER"
    ds.OperatorsName = "OPERATOR^OTTO"
    ds.PerformingPhysicianName = "HEARTSURGEON"
    ds.InstitutionName = "St. Elsewhere"
    ds.InstitutionAddress = "ROOM 101, 1 ELM STREET"
    ds.StationName = "MR-ROOM 101"
    ds.DeviceSerialNumber = "SER-0099887"
    ds.StudyDescription = "MR BRAIN for SMITHERSON"
    ds.SeriesDescription = "t2 JOHNATHAN follow-up"
    ds.ImageComments = "seen by DR^NOSYPARKER on 20190315"
    ds.Modality = "MR"
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "SCANNER 3000"
    ds.RequestAttributesSequence = [
        item(
            RequestedProcedureID="REQ-77-PHI",
            ScheduledProcedureStepID="REQ-77-PHI",
            ScheduledProcedureStepDescription="for SMITHERSON",
            ReferencedStudySequence=[
                item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID=sop)
            ],
        )
    ]
    ds.ProcedureCodeSequence = [
        item(CodeValue="X1", CodingSchemeDesignator="99LOCAL", CodeMeaning="MR HEAD")
    ]
    ds.ReferencedImageSequence = [
        item(ReferencedSOPClassUID=MRImageStorage, ReferencedSOPInstanceUID=sop + ".9")
    ]
    ds.ContentSequence = [
        item(
            RelationshipType="HAS OBS CONTEXT",
            ValueType="PNAME",
            ConceptNameCodeSequence=[
                item(CodeValue="121008", CodingSchemeDesignator="DCM", CodeMeaning="Person")
            ],
            PersonName="HEARTSURGEON^JOHNATHAN",
        ),
        # Attributes Table E.1-1 does not list, inside sequences it replaces or cleans.
        item(
            RelationshipType="CONTAINS",
            ValueType="TEXT",
            ConceptNameCodeSequence=[
                item(CodeValue="121106", CodingSchemeDesignator="DCM", CodeMeaning="Comment")
            ],
            TextValue="SMITHERSON (PID-778899) seen on 20190315 by DR^NOSYPARKER",
            ContentSequence=[
                item(
                    RelationshipType="HAS PROPERTIES",
                    ValueType="TEXT",
                    TextValue="JOHNATHAN born 19610704, ACC-PHI-4321",
                )
            ],
        ),
    ]
    ds.OperatorIdentificationSequence = [
        item(
            PersonIdentificationCodeSequence=[
                item(CodeValue="BADGE-31337", CodingSchemeDesignator="99HOSP", CodeMeaning="ID")
            ]
        )
    ]
    ds.GraphicAnnotationSequence = [
        item(
            GraphicLayer="LAYER1",
            TextObjectSequence=[
                item(
                    UnformattedTextValue="marked by OPERATOR^OTTO for SMITHERSON",
                    AnchorPointAnnotationUnits="PIXEL",
                    AnchorPoint=[2.0, 2.0],
                )
            ],
            GraphicObjectSequence=[
                item(
                    GraphicAnnotationUnits="PIXEL",
                    GraphicDimensions=2,
                    NumberOfGraphicPoints=2,
                    GraphicData=[1.0, 1.0, 4.0, 4.0],
                    GraphicType="POLYLINE",
                )
            ],
        )
    ]
    # Instance UIDs of attributes the table does not list: mapped like U.
    ds.MultiFrameSourceSOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.{study}.3.7"
    ds.SOPInstanceUIDOfConcatenationSource = sop
    block = ds.private_block(0x0011, "ACME PRIVATE", create=True)
    block.add_new(0x01, "LO", "PRIVATE SECRET NOTE")
    block.add_new(0x02, "LO", "SMITHERSON")
    safe = ds.private_block(0x0019, "ACME SAFE", create=True)
    safe.add_new(0x0C, "DS", "1000")
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    ds.add_new(0x60004000, "LT", "overlay drawn by OPERATOR^OTTO")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(64, dtype="<u2").tobytes()
    return ds


def assert_no_phi(data: bytes, planted: list[str]) -> None:
    left = [s for s in planted if s.encode("latin-1") in data or s.upper().encode() in data]
    assert left == [], f"PHI survived: {left}"


ALL_CLEANING = ["clean_descriptors", "clean_structured_content", "clean_graphics"]


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["retain_longitudinal_modified_dates"],
        ["retain_patient_characteristics", "retain_device_identity"],
        ALL_CLEANING,
        ["retain_safe_private", *ALL_CLEANING, "retain_longitudinal_modified_dates"],
    ],
)
def test_no_phi_string_survives(options: list[str]) -> None:
    settings: dict[str, Any] = {"options": options}
    if "retain_safe_private" in options:
        settings["safe_private"] = ["ACME SAFE,0019,0C"]
    planted = list(PHI)
    if "retain_device_identity" in options:
        planted.remove("SER-0099887")  # kept on purpose by that option
        planted.remove("ROOM 101")  # StationName is a device identity
    _, original = roundtrip(phi_dataset())
    assert [p for p in planted if p.encode("latin-1") not in original] == []  # all planted
    deid = step(**settings)
    out, data = roundtrip(deid.apply(phi_dataset())[0])
    assert_no_phi(data, planted)
    assert out.PatientIdentityRemoved == "YES"


def test_basic_profile_actions_on_the_phi_corpus() -> None:
    src = phi_dataset()
    out, _ = roundtrip(step().apply(copy.deepcopy(src))[0])
    # Z: present, zero length (Type 2 attributes stay).
    for keyword in ("AccessionNumber", "StudyDate", "ReferringPhysicianName", "PatientBirthDate"):
        assert keyword in out and out[keyword].is_empty, keyword
    # X: gone, sequences included.
    for keyword in ("PatientAddress", "OtherPatientIDsSequence", "RequestAttributesSequence"):
        assert keyword not in out, keyword
    for keyword in ("StudyDescription", "SeriesDescription", "ImageComments"):
        assert keyword not in out, keyword
    # X/D and Z/D with a value: a dummy keeps the attribute valid.
    assert out.InstitutionName == out.OperatorsName == "ANONYMIZED"  # X/Z/D
    assert out.ContentDate == "19000101"  # Z/D
    # K: what the table does not list stays.
    assert (out.Modality, out.Manufacturer, out.Rows) == ("MR", "ACME", 8)
    assert out.ProcedureCodeSequence[0].CodeMeaning == "MR HEAD"
    # Private attributes and whole overlay planes are gone.
    assert [e.tag for e in out if e.tag.is_private] == []
    assert [e.tag for e in out if e.tag.group == 0x6000] == []
    assert out.PixelData == src.PixelData
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


def test_unlisted_attributes_inside_replaced_sequences_get_dummies() -> None:
    """ContentSequence, PersonIdentificationCodeSequence and GraphicAnnotationSequence are
    D in the Basic Profile: what Table E.1-1 does not list inside them (TextValue,
    CodeValue, UnformattedTextValue) becomes a dummy; the structure stays parseable."""
    out, _ = roundtrip(step().apply(phi_dataset())[0])
    text = out.ContentSequence[1]
    assert (text.RelationshipType, text.ValueType) == ("CONTAINS", "TEXT")  # CS kept
    assert text.TextValue == "ANONYMIZED"
    assert text.ContentSequence[0].TextValue == "ANONYMIZED"  # two deep
    assert text.ConceptNameCodeSequence[0].CodeMeaning == "ANONYMIZED"
    code = out.OperatorIdentificationSequence[0].PersonIdentificationCodeSequence[0]
    assert code.CodeValue == "ANONYMIZED"
    annotation = out.GraphicAnnotationSequence[0]
    assert annotation.TextObjectSequence[0].UnformattedTextValue == "ANONYMIZED"
    assert annotation.TextObjectSequence[0].AnchorPoint == [2.0, 2.0]  # numbers kept
    assert annotation.GraphicObjectSequence[0].GraphicData == [1.0, 1.0, 4.0, 4.0]


def test_clean_options_scrub_unlisted_text_inside_their_sequences() -> None:
    options = ["clean_structured_content", "clean_graphics"]
    out, _ = roundtrip(step(options=options).apply(phi_dataset())[0])
    text = out.ContentSequence[1]
    # Identifiers the data set spells out are removed; the rest of the text stays.
    assert text.TextValue == "( ) seen on by ^"  # 'DR', a name part, as a whole word
    assert text.ContentSequence[0].TextValue == "born ,"
    assert text.ConceptNameCodeSequence[0].CodeMeaning == "Comment"
    annotation = out.GraphicAnnotationSequence[0]
    assert annotation.TextObjectSequence[0].UnformattedTextValue == "marked by ^ for"
    assert annotation.GraphicLayer == "LAYER1"
    # PersonIdentificationCodeSequence has no clean option: still dummies.
    code = out.OperatorIdentificationSequence[0].PersonIdentificationCodeSequence[0]
    assert code.CodeValue == "ANONYMIZED"


def test_unlisted_instance_uids_are_mapped_and_class_uids_kept() -> None:
    src = phi_dataset()
    src.ReferencedImageSequence[0].ReferencedSOPClassUID = "1.2.3.999.1"  # a private class
    src.ReferencedImageSequence[0].SpecimenUID = "1.2.826.0.1.3680043.2.1125.1.3.8"
    deid = step()
    out, _ = roundtrip(deid.apply(copy.deepcopy(src))[0])
    assert out.SOPInstanceUIDOfConcatenationSource == out.SOPInstanceUID  # still coherent
    assert out.MultiFrameSourceSOPInstanceUID == deid.map_uid(src.MultiFrameSourceSOPInstanceUID)
    ref = out.ReferencedImageSequence[0]
    assert ref.ReferencedSOPClassUID == "1.2.3.999.1"  # a class names no one
    assert ref.SpecimenUID == deid.map_uid("1.2.826.0.1.3680043.2.1125.1.3.8")
    assert out.SOPClassUID == src.SOPClassUID
    kept, _ = roundtrip(step(options=["retain_uids"]).apply(copy.deepcopy(src))[0])
    assert kept.MultiFrameSourceSOPInstanceUID == src.MultiFrameSourceSOPInstanceUID


def test_options_retain_what_they_say() -> None:
    src = phi_dataset()
    options = [
        "retain_uids",
        "retain_device_identity",
        "retain_institution_identity",
        "retain_patient_characteristics",
        "retain_longitudinal_full_dates",
        "clean_graphics",
        "retain_safe_private",
    ]
    deid = step(options=options, safe_private=["ACME SAFE,0019,0C"])
    out, _ = roundtrip(deid.apply(copy.deepcopy(src))[0])
    assert out.SOPInstanceUID == src.SOPInstanceUID
    assert out.StudyInstanceUID == src.StudyInstanceUID
    assert out.DeviceSerialNumber == "SER-0099887"
    assert out.InstitutionName == "St. Elsewhere"
    assert (out.PatientSex, out.PatientAge, out.PatientWeight) == ("M", "057Y", 81)
    assert (out.StudyDate, out.AcquisitionDateTime) == ("20190315", "20190315101500.000000")
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert out[0x60003000].value == b"\xff" * 8  # overlays kept with clean_graphics
    assert out[0x60000010].value == 8
    assert "OPERATOR" not in out[0x60004000].value  # its comment cleaned
    # retain_safe_private: the listed element and its creator, nothing else.
    assert out[0x00190010].value == "ACME SAFE"
    assert out[0x0019100C].value == "1000"
    assert 0x00110010 not in out and 0x00111001 not in out
    codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113111", "113110", "113109", "113112", "113108", "113106", "113103"]
    assert out.PatientName != src.PatientName  # identity itself is never retained


def test_clean_descriptors_keeps_descriptions_without_identifiers() -> None:
    out = step(options=["clean_descriptors"]).apply(phi_dataset())[0]
    assert out.StudyDescription == "MR BRAIN for"
    assert out.SeriesDescription == "t2 follow-up"
    assert out.ImageComments == "seen by ^ on"  # 'DR' (a name part) goes as a whole word
    assert "JOHNATHAN" not in out.PatientComments


def test_modified_dates_shift_per_patient_consistently_across_studies() -> None:
    deid = step(options=["retain_longitudinal_modified_dates"], max_date_shift_days=3650)
    first = deid.apply(phi_dataset(study="1"))[0]
    second_src = phi_dataset(study="2")
    second_src.StudyDate = "20200101"
    second = deid.apply(second_src)[0]
    other = deid.apply(phi_dataset(patient_id="SOMEONE-ELSE", study="3"))[0]

    def day(value: str) -> dt.date:
        return dt.datetime.strptime(value[:8], "%Y%m%d").date()

    shift = day("20190315") - day(first.StudyDate)
    assert 1 <= shift.days <= 3650
    assert day("20200101") - day(second.StudyDate) == shift  # same patient, other study
    assert day("19610704") - day(first.PatientBirthDate or "19610704") in (shift, dt.timedelta(0))
    shifted = (day("20190315") - shift).strftime("%Y%m%d")
    assert first.AcquisitionDateTime == shifted + "101500.000000"
    assert first.StudyTime == "101500"  # TM unchanged
    assert day("20190315") - day(other.StudyDate) != shift
    assert first.LongitudinalTemporalInformationModified == "MODIFIED"


# --------------------------------------------------------------------------- UIDs


def _mr_files(corpus: Corpus) -> list[Path]:
    return corpus.mr("deid-mr", 4, seed=77)


def test_uids_are_consistent_across_a_series_and_runs(corpus: Corpus) -> None:
    files = _mr_files(corpus)
    sources = [pydicom.dcmread(f) for f in files]
    run1 = [step().apply(pydicom.dcmread(f))[0] for f in files]
    run2_step = step()
    run2 = [run2_step.apply(pydicom.dcmread(f))[0] for f in files]
    other = step(secret_env="OTHER_SECRET").apply(pydicom.dcmread(files[0]))[0]

    assert len({d.StudyInstanceUID for d in run1}) == 1
    assert len({d.SeriesInstanceUID for d in run1}) == 1
    assert len({d.FrameOfReferenceUID for d in run1}) == 1
    assert len({d.SOPInstanceUID for d in run1}) == len(files)
    for src, a, b in zip(sources, run1, run2, strict=True):
        assert a.SOPInstanceUID == b.SOPInstanceUID
        assert a.StudyInstanceUID == b.StudyInstanceUID
        assert a.SOPInstanceUID != src.SOPInstanceUID
        assert a.SOPClassUID == src.SOPClassUID  # a standard UID is not an identifier
        for uid in (a.SOPInstanceUID, a.StudyInstanceUID, a.FrameOfReferenceUID):
            assert uid.startswith("2.25.") and len(uid) <= 64 and UID(uid).is_valid
    assert other.SOPInstanceUID != run1[0].SOPInstanceUID
    assert other.StudyInstanceUID != run1[0].StudyInstanceUID


def test_references_inside_sequences_follow_their_targets(corpus: Corpus) -> None:
    files = _mr_files(corpus)
    image = pydicom.dcmread(files[0])
    derived = pydicom.dcmread(files[1])
    derived.ReferencedImageSequence = [
        item(ReferencedSOPClassUID=image.SOPClassUID, ReferencedSOPInstanceUID=image.SOPInstanceUID)
    ]
    derived.SourceImageSequence = copy.deepcopy(derived.ReferencedImageSequence)
    derived.ReferencedFrameOfReferenceUID = image.FrameOfReferenceUID
    deid = step()
    new_image = deid.apply(image)[0]
    new_derived = deid.apply(derived)[0]
    for seq in (new_derived.ReferencedImageSequence, new_derived.SourceImageSequence):
        assert seq[0].ReferencedSOPInstanceUID == new_image.SOPInstanceUID
        assert seq[0].ReferencedSOPClassUID == image.SOPClassUID
    assert new_derived.ReferencedFrameOfReferenceUID == new_image.FrameOfReferenceUID


def test_rt_structure_set_references_stay_coherent() -> None:
    src = pydicom.dcmread(bundled_file("rtstruct.dcm"), force=True)
    deid = step()
    out = deid.apply(copy.deepcopy(src))[0]
    for_ref = src.ReferencedFrameOfReferenceSequence[0]
    new_ref = out.ReferencedFrameOfReferenceSequence[0]
    assert new_ref.FrameOfReferenceUID == deid.map_uid(for_ref.FrameOfReferenceUID)
    for roi_in, roi_out in zip(
        src.StructureSetROISequence, out.StructureSetROISequence, strict=True
    ):
        assert roi_out.ReferencedFrameOfReferenceUID == deid.map_uid(
            roi_in.ReferencedFrameOfReferenceUID
        )
    study_in = for_ref.RTReferencedStudySequence[0]
    study_out = new_ref.RTReferencedStudySequence[0]
    assert study_out.ReferencedSOPInstanceUID == deid.map_uid(study_in.ReferencedSOPInstanceUID)
    series_in = study_in.RTReferencedSeriesSequence[0]
    series_out = study_out.RTReferencedSeriesSequence[0]
    assert series_out.SeriesInstanceUID == deid.map_uid(series_in.SeriesInstanceUID)


# --------------------------------------------------------------------------- pseudonyms


def test_hmac_pseudonym_is_stable_and_prefixed() -> None:
    a = step(pseudonym_prefix="PRJ1-").apply(phi_dataset())[0]
    b = step(pseudonym_prefix="PRJ1-").apply(phi_dataset(study="2"))[0]
    c = step(pseudonym_prefix="PRJ1-").apply(phi_dataset(patient_id="OTHER"))[0]
    assert a.PatientID == b.PatientID == str(a.PatientName)
    assert re.fullmatch(r"PRJ1-[0-9A-F]{16}", a.PatientID)
    assert c.PatientID != a.PatientID


def test_lookup_table_pseudonyms(tmp_path: Path) -> None:
    (tmp_path / "ids.csv").write_text(
        "original,pseudonym,name\nPID-778899,SUBJ-001,SUBJECT^ONE\nX,SUBJ-002\n", encoding="utf-8"
    )
    deid = step(tmp_path, pseudonyms="table", lookup_table="ids.csv")
    out = deid.apply(phi_dataset())[0]
    assert (out.PatientID, str(out.PatientName)) == ("SUBJ-001", "SUBJECT^ONE")
    with pytest.raises(ProcessingError) as info:
        deid.apply(phi_dataset(patient_id="NOT-LISTED-123"))
    assert info.value.reason == "patient_not_in_lookup_table"
    assert "NOT-LISTED-123" not in str(info.value)  # no PHI in the dead-letter message


def test_lookup_table_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pipeline\[0\]\.deidentify.*lookup_table.*cannot"):
        step(tmp_path, pseudonyms="table", lookup_table="missing.csv")
    (tmp_path / "bad.csv").write_text("only-one-column\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1"):
        step(tmp_path, pseudonyms="table", lookup_table="bad.csv")


def test_secret_rules() -> None:
    with pytest.raises(ConfigError, match=r"deidentify.*secret_env.*MISSING_VAR is not set"):
        step(secret_env="MISSING_VAR")
    with pytest.raises(ConfigError, match="secret_env: required"):
        step(secret_env=None)
    with pytest.raises(ConfigError, match="shorter than 16"):
        step(env={"DEID_SECRET": "short"})
    # Nothing keyed: no secret needed.
    deid = step(secret_env=None, options=["retain_uids"], pseudonyms="empty")
    out = deid.apply(phi_dataset())[0]
    assert out.PatientID == "" and str(out.PatientName) == ""


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"options": ["retain_everything"]}, "options"),
        (
            {"options": ["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"]},
            "not both",
        ),
        ({"safe_private": ["ACME,0019,0C"]}, "safe_private"),
        ({"options": ["retain_safe_private"], "safe_private": ["ACME,0018,0C"]}, "odd group"),
        ({"profile": "extended"}, "profile"),
        ({"burned_in": {"masks": [{"rectangles": [[0, 0, 0, 5]]}]}}, "rectangle"),
    ],
)
def test_config_errors_name_the_key(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        step(**settings)
    assert "pipeline[0].deidentify" in str(info.value)


# --------------------------------------------------------------------------- burned-in text


def _ultrasound(burned_in: str | None = None) -> Dataset:
    ds = phi_dataset()
    ds.Modality = "US"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.6.1")
    ds.Rows = ds.Columns = 8
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    return ds


def test_burned_in_annotation_is_refused_without_a_mask() -> None:
    for ds in (_ultrasound(), _ultrasound("NO")):
        with pytest.raises(ProcessingError) as info:
            step().apply(ds)
        assert info.value.reason == "burned_in_annotation"
    flagged = phi_dataset()
    flagged.BurnedInAnnotation = "YES"
    with pytest.raises(ProcessingError, match="burned_in_annotation"):
        step(burned_in={"assume_for": []}).apply(flagged)
    # Trusting the attribute: an US instance that says NO goes through.
    assert step(burned_in={"assume_for": []}).apply(_ultrasound("NO"))


def test_burned_in_refusal_names_the_rule_that_matched() -> None:
    """The refusal says why the pixels were suspected: the BurnedInAnnotation flag, the
    Modality listed in assume_for, or the SOP class an assume_for family covers. Before,
    it always said "BurnedInAnnotation YES or a <Modality> instance", e.g. "a OT instance"
    for a Secondary Capture that matched by its SOP class."""
    capture = phi_dataset()
    capture.Modality = "OT"
    capture.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture Image Storage
    capture.file_meta.MediaStorageSOPClassUID = capture.SOPClassUID
    capture.Rows = capture.Columns = 8
    flagged = phi_dataset()
    flagged.BurnedInAnnotation = "YES"
    cases: list[tuple[Dataset, dict[str, Any], str]] = [
        (capture, {}, "SOP class Secondary Capture Image Storage, covered by SC in "),
        (_ultrasound("NO"), {}, "Modality US, listed in burned_in.assume_for"),
        (flagged, {"assume_for": []}, "(BurnedInAnnotation YES)"),
    ]
    for ds, burned_in, why in cases:
        with pytest.raises(ProcessingError) as info:
            step(burned_in=burned_in).apply(ds)
        assert info.value.reason == "burned_in_annotation"
        assert why in str(info.value)
        assert "OT instance" not in str(info.value)


def test_matching_mask_rule_blacks_out_the_rectangle() -> None:
    rule = {
        "match": {"Manufacturer": "AC*", "ManufacturerModelName": "SCANNER 3000", "Rows": 8},
        "rectangles": [[0, 0, 8, 2], [6, 6, 10, 10]],
    }
    src = _ultrasound("YES")
    before = src.pixel_array.copy()
    out, _ = roundtrip(step(burned_in={"masks": [rule]}).apply(src)[0])
    after = out.pixel_array
    assert (after[0:2, :] == 0).all() and (after[6:, 6:] == 0).all()
    assert (after[2:6, :] == before[2:6, :]).all()
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    other = {**rule, "match": {"Rows": 512}}
    with pytest.raises(ProcessingError, match="burned_in_annotation"):
        step(burned_in={"masks": [other]}).apply(_ultrasound())


def test_compressed_secondary_capture_is_decoded_and_masked() -> None:
    src = pydicom.dcmread(bundled_file("SC_rgb_rle.dcm"))
    rule = {"rectangles": [[0, 0, 20, 10]]}
    out, _ = roundtrip(step(burned_in={"masks": [rule]}).apply(src)[0])
    assert not out.file_meta.TransferSyntaxUID.is_compressed
    pixels = out.pixel_array
    assert (pixels[0:10, 0:20] == pixels[0:10, 0:20].min()).all()
    assert pixels.shape[-1] == 3


def test_masking_compressed_pixels_is_deterministic() -> None:
    """Decoding to mask must not mint a random SOP Instance UID (pydicom's decompress()
    does by default): the same input and secret give byte-identical output."""
    rule = {"rectangles": [[0, 0, 20, 10]]}
    outputs = []
    for _ in range(2):
        src = pydicom.dcmread(bundled_file("SC_rgb_jpeg_dcmtk.dcm"))
        deid = step(burned_in={"masks": [rule]})
        out = deid.apply(src)[0]
        outputs.append(roundtrip(out)[1])
        assert out.SOPInstanceUID == deid.map_uid(
            pydicom.dcmread(bundled_file("SC_rgb_jpeg_dcmtk.dcm")).SOPInstanceUID
        )
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    "name",
    [
        "SC_ybr_full_422_uncompressed.dcm",  # native, subsampled chroma
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
        "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG baseline, YBR_FULL_422
        "GDCMJ2K_TextGBR.dcm",  # JPEG 2000, YBR_RCT
        "SC_rgb_rle_2frame.dcm",  # RLE, two frames
    ],
)
def test_masked_colour_images_stay_valid(name: str) -> None:
    """The masked output decodes to the source image with the rectangle black, whatever
    the colour model and transfer syntax; the attributes describe what was written."""
    src = pydicom.dcmread(bundled_file(name))
    expected = src.pixel_array.astype(int)  # as RGB, pydicom's default
    rule = {"rectangles": [[0, 0, 10, 6]]}
    out, _ = roundtrip(step(burned_in={"masks": [rule]}).apply(copy.deepcopy(src))[0])
    assert not out.file_meta.TransferSyntaxUID.is_compressed
    assert out.PhotometricInterpretation in ("RGB", "YBR_FULL")
    assert out.get("PlanarConfiguration", 0) == 0
    got = out.pixel_array.astype(int)
    assert got.shape == expected.shape
    frames = got if int(out.get("NumberOfFrames", 1) or 1) > 1 else got[None, ...]
    wanted = expected if expected.ndim == frames.ndim else expected[None, ...]
    assert (frames[:, 0:6, 0:10] <= 2).all()  # black (YCbCr round-trip error <= 2)
    assert abs(frames[:, 6:, :] - wanted[:, 6:, :]).max() <= 2
    assert abs(frames[:, :, 10:] - wanted[:, :, 10:]).max() <= 2


def test_masking_colour_by_plane_native_pixels() -> None:
    src = pydicom.dcmread(bundled_file("SC_rgb_small_odd.dcm"))
    planes = src.pixel_array.transpose(2, 0, 1).copy()  # R plane, G plane, B plane
    src.PlanarConfiguration = 1
    src.PixelData = planes.tobytes()
    expected = src.pixel_array.copy()
    out, _ = roundtrip(
        step(burned_in={"masks": [{"rectangles": [[0, 0, 1, 1]]}]}).apply(copy.deepcopy(src))[0]
    )
    assert out.PlanarConfiguration == 0
    got = out.pixel_array
    assert (got[0, 0] == 0).all()
    expected[0, 0] = 0
    assert (got == expected).all()


# --------------------------------------------------------------------------- the table


def test_generated_table_has_the_edition_and_known_rows() -> None:
    assert re.fullmatch(r"20\d\d[a-e]", ps315_tables.EDITION)
    assert 600 <= len(ps315_tables.BASIC_PROFILE) <= 800
    basic = ps315_tables.BASIC_PROFILE
    assert basic[0x00100010] == "Z"  # PatientName
    assert basic[0x00100020] == "Z/D"  # PatientID
    assert basic[0x00080018] == "U"  # SOPInstanceUID
    assert basic[0x00081155] == "U"  # ReferencedSOPInstanceUID
    assert basic[0x00200052] == "U"  # FrameOfReferenceUID
    assert basic[0x00081030] == "X"  # StudyDescription
    assert basic[0x0040A730] == "D"  # ContentSequence
    assert ps315_tables.OPTIONS["retain_patient_characteristics"][0x00101010] == "K"
    assert ps315_tables.OPTIONS["retain_institution_identity"][0x00080080] == "K"
    assert ps315_tables.OPTIONS["retain_longitudinal_modified_dates"][0x00080020] == "C"
    assert ps315_tables.OPTIONS["clean_descriptors"][0x00081030] == "C"
    assert len(ps315_tables.OPTIONS) == 10
    codes = {code for code, _ in ps315_tables.METHOD_CODES.values()}
    assert codes == {f"1131{n:02d}" for n in (0, *range(3, 13))}


def test_output_names_the_edition_and_method() -> None:
    out = step(options=["retain_longitudinal_modified_dates"]).apply(phi_dataset())[0]
    assert out.DeidentificationMethod[0] == (
        f"PS3.15-{ps315_tables.EDITION} Basic Application Level Confidentiality Profile"
    )
    assert all(len(v) <= 64 for v in out.DeidentificationMethod)
    items = out.DeidentificationMethodCodeSequence
    assert [(i.CodeValue, i.CodingSchemeDesignator) for i in items] == [
        ("113100", "DCM"),
        ("113107", "DCM"),
    ]


# --------------------------------------------------------------------------- validity


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    # Values differ after de-identification; compare what is wrong, not the values.
    errors = (re.sub(r"= <[^>]*>", "= <>", line) for line in lines if line.startswith("Error"))
    return sorted(re.sub(r"\b[0-9.]+\b", "<n>", line) for line in errors)


def _validity_inputs(tmp: Path, corpus: Corpus) -> Iterator[Path]:
    yield _mr_files(corpus)[0]
    for name in (
        "CT_small.dcm",
        "MR_small.dcm",
        "rtplan.dcm",
        "rtdose.dcm",
        "reportsi.dcm",
        "test-SR.dcm",
        "examples_overlay.dcm",
        "SC_rgb_small_odd.dcm",
    ):
        yield bundled_file(name)
    rtstruct = pydicom.dcmread(bundled_file("rtstruct.dcm"), force=True)  # no file meta
    rtstruct.file_meta = FileMetaDataset()
    rtstruct.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    write_part10(rtstruct, tmp / "rtstruct.dcm")
    yield tmp / "rtstruct.dcm"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dicom3tools")
@pytest.mark.parametrize("options", [[], ["retain_longitudinal_modified_dates", *ALL_CLEANING]])
def test_dciodvfy_reports_no_new_errors(tmp_path: Path, corpus: Corpus, options: list[str]) -> None:
    mask_everything = {"masks": [{"rectangles": [[0, 0, 4, 4]]}]}
    pipeline = Pipeline([step(options=options, burned_in=mask_everything)])
    new_errors = {}
    for n, source in enumerate(_validity_inputs(tmp_path, corpus)):
        (output,) = pipeline.process_file(source, tmp_path / str(n))
        before, after = _dciodvfy_errors(source), _dciodvfy_errors(output.path)
        added = [line for line in after if line not in before]
        if added:
            new_errors[source.name] = added
    assert new_errors == {}


def test_written_output_is_a_readable_part10_file(tmp_path: Path, corpus: Corpus) -> None:
    source = _mr_files(corpus)[0]
    ds = step().apply(pydicom.dcmread(source))[0]
    write_part10(ds, tmp_path / "out.dcm")
    back = pydicom.dcmread(tmp_path / "out.dcm")
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.PatientIdentityRemoved == "YES"
    assert isinstance(back.DeidentificationMethodCodeSequence, Sequence)


def test_clean_options_leave_no_short_name_other_date_spelling_or_binary_value() -> None:
    """What a PS3.15 probe found left by clean_descriptors / clean_structured_content: a PN
    inside a cleaned sequence split into characters (the name still readable), a Maker
    Note kept byte for byte, names and IDs under three characters (Li, Wu, P7, 山田),
    dates written 1961-02-03 or 03/02/1961; and, with any options, a public attribute no
    dictionary knows."""
    ds = phi_dataset()
    ds.PatientName = "Li^Wu=山田^太郎"
    ds.PatientID = "P7"
    ds.PatientBirthDate = "19610203"
    ds.StudyDescription = "Li Wu P7 brain 山田太郎 clinical"
    ds.ImageComments = "born 1961-02-03, seen 03/02/1961 and 02/03/1961"
    ds.add_new(0x0016002B, "OB", b"MAKERNOTE serial 998877")  # Maker Note
    ds.add_new(0x00209999, "UN", b"UNKNOWNPUB")  # in no dictionary
    item = Dataset()
    item.add_new(0x0040A067, "PN", "Authorqx^Ann")  # Document Author (Trial): unlisted
    item.RequestedProcedureID = "RP1"
    ds.RequestAttributesSequence = [item]
    out = step(options=["clean_descriptors"]).apply(ds)[0]
    assert out.StudyDescription == "brain clinical"  # 'li' inside 'clinical' stays
    assert out.ImageComments == "born , seen and"
    assert 0x0016002B not in out
    assert 0x00209999 not in out
    author = out.RequestAttributesSequence[0][0x0040A067]
    assert author.VM == 1 and str(author.value) == "ANONYMIZED"
    bare = phi_dataset()  # the Basic Profile without options
    bare.add_new(0x00209999, "UN", b"UNKNOWNPUB")
    assert 0x00209999 not in step().apply(bare)[0]
