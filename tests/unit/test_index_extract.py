"""extract_record on pydicom's bundled files: UIDs, character sets, truncation."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from dicomgate.errors import InvalidInstance
from dicomgate.index.extract import extract_record, search_name


def _testdata(name: str) -> str:
    path = get_testdata_file(name)
    if not isinstance(path, str):
        raise LookupError(f"pydicom test file {name} is missing")
    return path


def _charset_file(name: str) -> Dataset:
    return pydicom.dcmread(get_charset_files(name)[0])


def _roundtrip(ds: Dataset) -> Dataset:
    """Write ``ds`` and read it back, so its elements are raw as on the ingest path."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return pydicom.dcmread(BytesIO(buffer.getvalue()), force=True)


def _minimal(**attributes: object) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_ct_small_fills_every_level() -> None:
    record = extract_record(pydicom.dcmread(_testdata("CT_small.dcm")))
    assert record.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert record.sop_instance_uid == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert record.patient["patient_id"] == "1CT1"
    assert record.patient["patient_name"] == "CompressedSamples^CT1"
    assert record.patient["patient_name_search"] == "COMPRESSEDSAMPLES^CT1"
    assert record.patient["patient_sex"] == "O"
    assert record.patient["patient_birth_date"] is None  # present but empty
    assert record.study["study_date"] == "20040119"
    assert record.study["study_time"] == "072730"
    assert record.study["study_id"] == "1CT1"
    assert record.study["accession_number"] is None
    assert record.series["modality"] == "CT"
    assert record.series["series_number"] == 1
    assert record.instance["rows"] == 128
    assert record.instance["columns"] == 128
    assert record.instance["bits_allocated"] == 16
    assert record.instance["instance_number"] == 1
    assert record.instance["specific_character_set"] == "ISO_IR 100"


def test_mr_small_without_character_set() -> None:
    record = extract_record(pydicom.dcmread(_testdata("MR_small.dcm")))
    assert record.series["modality"] == "MR"
    assert record.patient["patient_name"] == "CompressedSamples^MR1"
    assert record.instance["rows"] == 64
    assert record.instance["specific_character_set"] is None


@pytest.mark.parametrize(
    ("filename", "name", "search"),
    [
        (
            "chrH31.dcm",
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
            "YAMADA^TAROU=山田^太郎=やまだ^たろう",
        ),
        ("chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", "ヤマダ^タロウ=山田^太郎=やまだ^たろう"),
        ("chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동", "HONG^GILDONG=洪^吉洞=홍^길동"),
        ("chrKoreanMulti.dcm", "김희중", "김희중"),
        ("chrJapMulti.dcm", "やまだ^たろう", "やまだ^たろう"),
        ("chrX1.dcm", "Wang^XiaoDong=王^小東", "WANG^XIAODONG=王^小東"),
        ("chrX2.dcm", "Wang^XiaoDong=王^小东", "WANG^XIAODONG=王^小东"),
        ("chrGreek.dcm", "Διονυσιος", "ΔΙΟΝΥΣΙΟΣ"),
        ("chrFren.dcm", "Buc^Jérôme", "BUC^JEROME"),
        ("chrGerm.dcm", "Äneas^Rüdiger", "ANEAS^RUDIGER"),
        ("chrRuss.dcm", "Люкceмбypг", "ЛЮКCEМБYPГ"),  # noqa: RUF001 - the file mixes scripts
        ("chrArab.dcm", "قباني^لنزار", "قباني^لنزار"),
        ("chrHbrw.dcm", "שרון^דבורה", "שרון^דבורה"),
    ],
)
def test_person_names_are_decoded_with_the_character_set(
    filename: str, name: str, search: str
) -> None:
    record = extract_record(_charset_file(filename))
    assert record.patient["patient_name"] == name
    assert record.patient["patient_name_search"] == search


def test_japanese_study_text_is_decoded() -> None:
    record = extract_record(_charset_file("chrJapMulti.dcm"))
    assert record.study["study_description"] == "Chest"
    assert record.patient["patient_birth_date"] == "18000101"
    assert record.instance["specific_character_set"] == "\\ISO 2022 IR 87"


def test_sequence_encoding_file_has_no_uids() -> None:
    # chrSQEncoding.dcm carries only a sequence with its own character set, no UIDs.
    with pytest.raises(InvalidInstance, match="StudyInstanceUID"):
        extract_record(_charset_file("chrSQEncoding.dcm"))


def test_request_attributes_item_uses_its_own_character_set() -> None:
    item = Dataset()
    item.SpecificCharacterSet = "ISO_IR 100"
    item.ScheduledProcedureStepID = "SPS-é"
    item.RequestedProcedureID = "RP1"
    ds = _minimal(SpecificCharacterSet="ISO_IR 192", RequestAttributesSequence=[item])
    record = extract_record(_roundtrip(ds))
    assert record.series["scheduled_procedure_step_id"] == "SPS-é"
    assert record.series["requested_procedure_id"] == "RP1"


@pytest.mark.parametrize(
    "missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
)
def test_missing_uid_is_invalid(missing: str) -> None:
    ds = _minimal()
    delattr(ds, missing)
    with pytest.raises(InvalidInstance, match=missing):
        extract_record(ds)


def test_empty_uid_is_invalid() -> None:
    ds = _roundtrip(_minimal(SOPInstanceUID=""))
    with pytest.raises(InvalidInstance, match="SOPInstanceUID"):
        extract_record(ds)


def test_overlong_identifier_uid_is_invalid_not_truncated() -> None:
    with pydicom_config.disable_value_validation():
        ds = _roundtrip(_minimal(SOPInstanceUID="1." + "2" * 200))
    with pytest.raises(InvalidInstance, match="SOPInstanceUID"):
        extract_record(ds)


def test_long_values_are_truncated_to_the_column() -> None:
    with pydicom_config.disable_value_validation():
        ds = _roundtrip(
            _minimal(
                StudyDescription="D" * 300,
                AccessionNumber="A" * 40,
                PatientName="N" * 500,
                PatientID="P" * 100,
            )
        )
    record = extract_record(ds)
    assert record.study["study_description"] == "D" * 64
    assert record.study["accession_number"] == "A" * 16
    assert record.patient["patient_name"] == "N" * 194
    assert record.patient["patient_id"] == "P" * 64


def test_malformed_values_are_skipped_not_errors() -> None:
    with pydicom_config.disable_value_validation():
        ds = _roundtrip(
            _minimal(StudyDate="2004.01.19", SeriesDate="yesterday", SeriesNumber="1.0")
        )
    # A value pydicom itself refuses to convert, as it arrives off the wire.
    ds[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 2, b"x7", 0, False, True)
    record = extract_record(ds)
    assert record.study["study_date"] == "20040119"  # ACR-NEMA form
    assert record.series["series_date"] is None
    assert record.series["series_number"] == 1
    assert record.instance["instance_number"] is None


def test_dataset_built_in_memory_is_read_too() -> None:
    record = extract_record(_minimal(PatientName="Doe^John", Rows=512, Modality="CT"))
    assert record.patient["patient_name"] == "Doe^John"
    assert record.instance["rows"] == 512
    assert record.series["modality"] == "CT"


def test_search_name_form() -> None:
    assert search_name("Müller^Jürgen^^^") == "MÜLLER^JÜRGEN".replace("Ü", "U")
    assert search_name(" Doe ^ John ") == "DOE^JOHN"
    assert search_name("") is None
    assert search_name(None) is None
