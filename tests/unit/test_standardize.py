"""The ``standardize`` step: rules on real and synthetic data sets, config errors by key."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from tests.conftest import Corpus, bundled_file

from dicomgate.errors import ConfigError
from dicomgate.processing.base import ProcessingError
from dicomgate.processing.pipeline import Pipeline, build
from dicomgate.store.part10 import arrival_json

CHARSET_FILES = Path(pydicom.data.__file__).parent / "charset_files"


def pipeline(*rules: dict[str, Any], **settings: Any) -> Pipeline:
    return build([{"standardize": {"rules": list(rules), **settings}}], "routes[0].pipeline")


def run(p: Pipeline, ds: Dataset) -> Dataset:
    (out,) = p.run(ds)
    return out


def reread(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """``ds`` written as a Part 10 file with ``syntax`` and read back, as the gateway would."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.3")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3.4")
    ds.file_meta = meta
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def minimal() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientID = "P1"
    ds.Modality = "MR"
    return ds


# -- the design's example: a private b-value to DiffusionBValue ------------------------------


def test_copies_the_siemens_b_value_to_diffusion_b_value(corpus: Corpus) -> None:
    source = corpus.mr("std-mr", 3, seed=7)
    p = pipeline({"copy": {"from": "SIEMENS MR HEADER,0019,0C", "to": "DiffusionBValue"}})
    for path in source:
        ds = pydicom.dcmread(path)
        b_value = int(ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value)
        out = reread(run(p, ds))
        assert out["DiffusionBValue"].VR == "FD"
        assert out.DiffusionBValue == float(b_value)
        assert out.private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value == b_value  # kept


def test_finds_the_private_block_wherever_the_scanner_put_it() -> None:
    ds = minimal()
    ds.add_new(0x00190010, "LO", "OTHER VENDOR")
    ds.add_new(0x00190011, "LO", "SIEMENS MR HEADER")  # block 0x11, not 0x10
    ds.add_new(0x0019100C, "IS", "9")
    ds.add_new(0x0019110C, "FD", 1500.0)
    p = pipeline({"copy": {"from": "SIEMENS MR HEADER,0019,0C", "to": "DiffusionBValue"}})
    assert run(p, ds).DiffusionBValue == 1500.0


def test_private_b_value_stored_as_un_is_decoded() -> None:
    # An implicit VR file with a creator pydicom's dictionary does not know: the value is
    # UN bytes. Text bytes are read as a number string; binary ones need from_vr.
    ds = minimal()
    ds.add_new(0x00190010, "LO", "ACME MR")
    ds.add_new(0x0019100C, "LO", "1000")
    ds.add_new(0x00190011, "LO", "ACME BINARY")
    ds.add_new(0x0019110C, "FD", 800.0)
    stored = reread(ds, ImplicitVRLittleEndian)
    assert stored[0x0019100C].VR == "UN" and stored[0x0019110C].VR == "UN"

    text = pipeline({"copy": {"from": "ACME MR,0019,0C", "to": "DiffusionBValue"}})
    assert run(text, stored).DiffusionBValue == 1000.0

    unknown = pipeline({"copy": {"from": "ACME BINARY,0019,0C", "to": "DiffusionBValue"}})
    with pytest.raises(ProcessingError) as refused:
        unknown.run(reread(ds, ImplicitVRLittleEndian))
    assert refused.value.reason == "cannot_standardize"
    assert "from_vr" in str(refused.value)

    binary = pipeline(
        {"copy": {"from": "ACME BINARY,0019,0C", "to": "DiffusionBValue", "from_vr": "FD"}}
    )
    assert run(binary, reread(ds, ImplicitVRLittleEndian)).DiffusionBValue == 800.0


def test_copy_converts_between_vrs_and_refuses_what_does_not_fit() -> None:
    ds = minimal()
    ds.add_new(0x00190010, "LO", "ACME")
    ds.add_new(0x00191001, "FD", [2.5, 3.0])
    ds.add_new(0x00191002, "LO", "not a number")
    p = pipeline(
        {"copy": {"from": "ACME,0019,01", "to": "PixelSpacing"}},  # FD -> DS, 2 values
        {"copy": {"from": "PatientID", "to": "ACME,0019,03", "vr": "SH"}},
        {"copy": {"from": "ACME,0019,01", "to": "OTHER,0021,05"}},  # source VR kept
    )
    out = reread(run(p, ds))
    assert out["PixelSpacing"].VR == "DS" and list(out.PixelSpacing) == [2.5, 3.0]
    assert out.private_block(0x0019, "ACME")[0x03].value == "P1"
    assert list(out.private_block(0x0021, "OTHER")[0x05].value) == [2.5, 3.0]

    bad = pipeline({"copy": {"from": "ACME,0019,02", "to": "SliceThickness"}})
    with pytest.raises(ProcessingError) as refused:
        bad.run(ds)
    assert refused.value.reason == "cannot_standardize"
    assert "not a number" in str(refused.value)

    whole = pipeline({"copy": {"from": "ACME,0019,01", "to": "InstanceNumber"}})
    with pytest.raises(ProcessingError, match="not a whole number"):
        whole.run(ds)


def test_missing_source_leaves_the_target_alone() -> None:
    ds = minimal()
    ds.DiffusionBValue = 5.0
    p = pipeline({"copy": {"from": "SIEMENS MR HEADER,0019,0C", "to": "DiffusionBValue"}})
    assert run(p, ds).DiffusionBValue == 5.0


# -- set, remove, map, regex_replace ---------------------------------------------------------


def test_set_remove_map_and_regex_replace() -> None:
    ds = minimal()
    ds.PatientName = "Doe^John"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M_SE"]
    ds.InstitutionName = "St. Mary"
    ds.PatientComments = "secret"
    p = pipeline(
        {"set": {"tag": "InstitutionName", "value": "Hospital A"}},
        {"set": {"tag": "(0008,1030)", "value": "Brain"}},
        {"set": {"tag": "ImageType", "value": ["DERIVED", "SECONDARY"]}},
        {"set": {"tag": "BodyPartExamined", "value": None}},
        {"set": {"tag": "ACME 1.0,0011,10", "vr": "LO", "value": "tag me"}},
        {"remove": {"tag": "PatientComments"}},
        {"remove": {"tag": "NOT THERE,0029,01"}},
        {"map": {"tag": "Modality", "values": {"MR": "MRI?", "CT": "CT"}}},
        {"map": {"tag": "ImageType", "values": {"DERIVED": "ORIGINAL"}}},
        {
            "regex_replace": {
                "tag": "PatientName",
                "pattern": r"^(\w+)\^(\w+)$",
                "replacement": r"\2^\1",
            }
        },
    )
    with pytest.raises(ProcessingError) as refused:  # "MRI?" is not a CS value
        p.run(ds)
    assert refused.value.reason == "cannot_standardize"

    p = pipeline(
        {"set": {"tag": "InstitutionName", "value": "Hospital A"}},
        {"set": {"tag": "(0008,1030)", "value": "Brain"}},
        {"set": {"tag": "ImageType", "value": ["DERIVED", "SECONDARY"]}},
        {"set": {"tag": "BodyPartExamined", "value": None}},
        {"set": {"tag": "ACME 1.0,0011,10", "vr": "LO", "value": "tag me"}},
        {"remove": {"tag": "PatientComments"}},
        {"remove": {"tag": "NOT THERE,0029,01"}},
        {"map": {"tag": "Modality", "values": {"MR": "OT"}, "default": "OT"}},
        {"map": {"tag": "ImageType", "values": {"DERIVED": "ORIGINAL"}}},
        {
            "regex_replace": {
                "tag": "PatientName",
                "pattern": r"^(\w+)\^(\w+)$",
                "replacement": r"\2^\1",
            }
        },
    )
    out = reread(run(p, minimal_with(ds)))
    assert out.InstitutionName == "Hospital A"
    assert out.StudyDescription == "Brain"
    assert list(out.ImageType) == ["ORIGINAL", "SECONDARY"]
    assert "BodyPartExamined" in out and out.BodyPartExamined == ""
    assert out.private_block(0x0011, "ACME 1.0")[0x10].value == "tag me"
    assert "PatientComments" not in out
    assert out.Modality == "OT"
    assert str(out.PatientName) == "John^Doe"


def minimal_with(ds: Dataset) -> Dataset:
    fresh = minimal()
    for elem in ds:
        fresh[elem.tag] = elem
    return fresh


def test_map_default_and_numbers_as_keys() -> None:
    ds = minimal()
    ds.SeriesNumber = 7
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    p = pipeline(
        {"map": {"tag": "SeriesNumber", "values": {7: 700}}},
        {"map": {"tag": "Manufacturer", "values": {"SIEMENS": "Siemens"}, "default": "Other"}},
    )
    out = run(p, ds)
    assert out.SeriesNumber == 700
    assert out.Manufacturer == "Other"


def test_regex_result_must_fit_the_vr() -> None:
    ds = minimal()
    ds.StudyDate = "20260115"
    p = pipeline({"regex_replace": {"tag": "StudyDate", "pattern": "^2026", "replacement": "26-"}})
    with pytest.raises(ProcessingError) as refused:
        p.run(ds)
    assert refused.value.reason == "cannot_standardize"
    assert "StudyDate" in str(refused.value)


# -- conditions ------------------------------------------------------------------------------


def test_rules_apply_only_where_their_match_holds(corpus: Corpus) -> None:
    path = corpus.mr("std-match", 1, seed=8)[0]
    p = pipeline(
        {"match": {"calling_ae": "MR_*"}, "set": {"tag": "InstitutionName", "value": "From MR"}},
        {"match": {"Modality": "CT"}, "set": {"tag": "StationName", "value": "never"}},
        {
            "match": {"InstitutionName": "From MR"},  # sees the change of the first rule
            "set": {"tag": "StationName", "value": "chained"},
        },
    )
    from_mr = pydicom.dcmread(path)
    from_mr.file_meta.PrivateInformationCreatorUID = "1.2.3"
    from_mr.file_meta.PrivateInformation = arrival_json("MR_3T", "GW", "10.0.0.1", "dimse")
    out = run(p, from_mr)
    assert out.InstitutionName == "From MR"
    assert out.StationName == "chained"

    other = pydicom.dcmread(path)
    other.file_meta.PrivateInformationCreatorUID = "1.2.3"
    other.file_meta.PrivateInformation = arrival_json("CT_1", "GW", "10.0.0.1", "dimse")
    before = other.get("InstitutionName")
    out = run(p, other)
    assert out.get("InstitutionName") == before
    assert out.get("StationName") != "chained"


# -- sequences -------------------------------------------------------------------------------


def test_sequence_paths_address_one_item_or_every_item() -> None:
    ds = minimal()
    ds.RequestAttributesSequence = Sequence([Dataset(), Dataset()])
    for n, item in enumerate(ds.RequestAttributesSequence):
        item.ScheduledProcedureStepID = f"SPS{n}"
        item.RequestedProcedureID = f"RP{n}"
    p = pipeline(
        {"set": {"tag": "RequestAttributesSequence[0].ScheduledProcedureStepID", "value": "A"}},
        {
            "regex_replace": {
                "tag": "RequestAttributesSequence[*].RequestedProcedureID",
                "pattern": "^RP",
                "replacement": "REQ",
            }
        },
        {
            "copy": {
                "from": "RequestAttributesSequence[1].ScheduledProcedureStepID",
                "to": "PerformedProcedureStepID",
            }
        },
        {"set": {"tag": "ReferencedStudySequence[0].ReferencedSOPInstanceUID", "value": "1.2"}},
    )
    out = reread(run(p, ds))
    items = out.RequestAttributesSequence
    assert [i.ScheduledProcedureStepID for i in items] == ["A", "SPS1"]
    assert [i.RequestedProcedureID for i in items] == ["REQ0", "REQ1"]
    assert out.PerformedProcedureStepID == "SPS1"
    assert "ReferencedStudySequence" not in out  # missing items are not created


def test_sequence_copy_is_a_deep_copy() -> None:
    ds = minimal()
    ds.ReferencedStudySequence = Sequence([Dataset()])
    ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID = "1.2.3"
    p = pipeline(
        {"copy": {"from": "ReferencedStudySequence", "to": "ACME,0019,10", "vr": "SQ"}},
        {"set": {"tag": "ReferencedStudySequence[0].ReferencedSOPInstanceUID", "value": "9.9"}},
    )
    out = reread(run(p, ds))
    assert out.private_block(0x0019, "ACME")[0x10].value[0].ReferencedSOPInstanceUID == "1.2.3"
    assert out.ReferencedStudySequence[0].ReferencedSOPInstanceUID == "9.9"


# -- character set ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["chrRuss.dcm", "chrH31.dcm", "chrFrenMulti.dcm", "chrSQEncoding1.dcm"]
)
def test_charset_utf8_keeps_every_text_value(name: str) -> None:
    original = pydicom.dcmread(CHARSET_FILES / name)
    original.decode()
    out = reread(run(pipeline(charset="utf8"), pydicom.dcmread(CHARSET_FILES / name)))
    assert out.SpecificCharacterSet == "ISO_IR 192"

    def texts(ds: Dataset) -> list[str]:
        found: list[str] = []
        ds.walk(
            lambda _, e: found.append(str(e.value)) if e.VR in ("PN", "LO", "SH", "LT") else None
        )
        return found

    assert texts(out) == texts(original)
    assert str(out.get("PatientName")) == str(original.get("PatientName"))
    nested = [e for e in out.iterall() if e.keyword == "SpecificCharacterSet"]
    assert len(nested) == 1  # items inherit ISO_IR 192


def test_charset_utf8_lets_rules_write_any_text() -> None:
    ds = pydicom.dcmread(CHARSET_FILES / "chrRuss.dcm")
    p = pipeline({"set": {"tag": "InstitutionName", "value": "Hôpital 北京"}}, charset="utf8")
    out = reread(run(p, ds))
    assert out.InstitutionName == "Hôpital 北京"


# -- configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "key", "words"),
    [
        (
            {"copy": {"from": "SIEMENS MR HEADER,0019,0C", "to": "DiffusionBValu"}},
            "rules[1].copy.to",
            "not a DICOM keyword",
        ),
        ({"copy": {"to": "DiffusionBValue"}}, "rules[1].copy.from", "missing"),
        ({"copy": {"from": "Seq[0].X", "to": "PatientID"}}, "rules[1].copy.from", "keyword"),
        (
            {"copy": {"from": "ReferencedSeriesSequence[*].SeriesInstanceUID", "to": "PatientID"}},
            "rules[1].copy.from",
            "[*]",
        ),
        (
            {"copy": {"from": "PatientID", "to": "PatientName", "vr": "XX"}},
            "rules[1].copy.vr",
            "unknown VR",
        ),
        ({"set": {"tag": "StudyDate", "value": "yesterday"}}, "rules[1].set.value", "DA"),
        ({"set": {"tag": "ACME,0019,01", "value": "1"}}, "rules[1].set.value", "add vr"),
        (
            {"set": {"tag": "ACME,0018,01", "vr": "LO", "value": "1"}},
            "rules[1].set.tag",
            "not private",
        ),
        ({"set": {"tag": "PatientID.Foo", "value": "1"}}, "rules[1].set.tag", "item index"),
        (
            {"remove": {"tag": "PatientID"}, "set": {"tag": "PatientID", "value": "1"}},
            "rules[1]",
            "exactly one action",
        ),
        ({"match": {"Modality": "MR"}}, "rules[1]", "exactly one action"),
        (
            {"match": {"Modalty": "MR"}, "remove": {"tag": "PatientID"}},
            "rules[1].match",
            "did you mean 'Modality'",
        ),
        (
            {"regex_replace": {"tag": "PatientID", "pattern": "(", "replacement": ""}},
            "rules[1].regex_replace.pattern",
            "not a regular expression",
        ),
        (
            {"regex_replace": {"tag": "PatientID", "pattern": "a", "replacement": r"\1"}},
            "rules[1].regex_replace.replacement",
            "group 1",
        ),
        ({"map": {"tag": "Modality", "values": "MR"}}, "rules[1].map.values", "dictionary"),
        ({"rename": {"tag": "PatientID"}}, "rules[1].rename", "unknown key"),
    ],
)
def test_config_errors_name_the_key(rule: dict[str, Any], key: str, words: str) -> None:
    good = {"remove": {"tag": "PatientComments"}}
    with pytest.raises(ConfigError) as error:
        pipeline(good, rule)
    assert error.value.key == f"routes[0].pipeline[0].standardize.{key}", str(error.value)
    assert words in error.value.problem, str(error.value)


def test_unknown_setting_and_charset() -> None:
    with pytest.raises(ConfigError) as error:
        build([{"standardize": {"charset": "latin1"}}], "routes[2].pipeline")
    assert error.value.key == "routes[2].pipeline[0].standardize.charset"


def test_a_whole_file_goes_through_process_file(tmp_path: Path) -> None:
    p = pipeline({"set": {"tag": "InstitutionName", "value": "Processed"}})
    source = bundled_file("CT_small.dcm")
    before = source.read_bytes()
    (output,) = p.process_file(source, tmp_path / "out")
    assert pydicom.dcmread(output.path).InstitutionName == "Processed"
    assert source.read_bytes() == before
