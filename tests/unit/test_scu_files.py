"""File scanning and association planning of the C-STORE SCU, without a network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from dicomgate.dimse.scu import (
    FALLBACK_SYNTAXES,
    MAX_CONTEXTS,
    ContextSpec,
    ScannedFile,
    SendSummary,
    UnreadableDicom,
    _status_outcome,
    can_send_uncompressed,
    iter_candidate_files,
    plan_associations,
    scan_file,
)

CT = UID("1.2.840.10008.5.1.4.1.1.2")
MR = UID("1.2.840.10008.5.1.4.1.1.4")


def _testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(path)


def _fake(n: int, sop_class: str = CT, ts: str = ExplicitVRLittleEndian) -> ScannedFile:
    return ScannedFile(
        path=Path(f"/nowhere/{n:05d}.dcm"),
        sop_class_uid=UID(sop_class),
        sop_instance_uid=UID(f"1.2.3.{n}"),
        transfer_syntax_uid=UID(ts),
        streamable=True,
    )


# --------------------------------------------------------------------------- scan_file


def test_scan_reads_uids_and_transfer_syntax_of_a_part10_file() -> None:
    found = scan_file(_testfile("CT_small.dcm"))
    assert found is not None
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    assert found.sop_class_uid == ds.SOPClassUID == CT
    assert found.sop_instance_uid == ds.SOPInstanceUID
    assert found.transfer_syntax_uid == ExplicitVRLittleEndian
    assert found.streamable


def test_scan_keeps_the_compressed_transfer_syntax() -> None:
    found = scan_file(_testfile("JPEG2000.dcm"))
    assert found is not None
    assert found.transfer_syntax_uid == JPEG2000
    assert found.streamable


def test_scan_skips_text_and_binary_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert scan_file(text) is None
    assert scan_file(blob) is None
    assert scan_file(empty) is None


def test_scan_accepts_a_data_set_without_file_meta_but_does_not_stream_it() -> None:
    found = scan_file(_testfile("ExplVR_LitEndNoMeta.dcm"))
    assert found is not None
    assert found.transfer_syntax_uid == ExplicitVRLittleEndian
    assert not found.streamable


def test_scan_prefers_the_data_set_uid_over_disagreeing_file_meta() -> None:
    # rtplan.dcm's MediaStorageSOPInstanceUID differs from its SOPInstanceUID.
    path = _testfile("rtplan.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    found = scan_file(path)
    assert found is not None
    assert found.sop_instance_uid == ds.SOPInstanceUID
    assert not found.streamable


def test_scan_does_not_stream_an_odd_length_file() -> None:
    path = _testfile("image_dfl.dcm")
    assert path.stat().st_size % 2 == 1
    found = scan_file(path)
    assert found is not None
    assert found.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert not found.streamable


def test_scan_reports_a_broken_file_with_the_dicm_prefix(tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    with pytest.raises(UnreadableDicom):
        scan_file(broken)


def test_scan_reports_a_part10_file_without_sop_uids(tmp_path: Path) -> None:
    ds = Dataset()
    ds.PatientID = "X"
    path = tmp_path / "nouids.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)
    with path.open("rb") as fp:
        body = fp.read()
    path.write_bytes(b"\0" * 128 + b"DICM" + _meta_only() + body)
    with pytest.raises(UnreadableDicom, match="SOP"):
        scan_file(path)


def _meta_only() -> bytes:
    # Group 0002 with only a Transfer Syntax UID (Explicit VR Little Endian).
    value = ExplicitVRLittleEndian.encode() + b"\0"
    value = value if len(value) % 2 == 0 else value + b"\0"
    return b"\x02\x00\x10\x00UI" + len(value).to_bytes(2, "little") + value


def test_scan_skips_a_dicomdir() -> None:
    source = Path(pydicom.data.get_testdata_file("DICOMDIR", download=False) or "")
    assert source.is_file()
    assert scan_file(source) is None


def test_candidate_files_recurse_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ("b/c/2.dcm", "b/1.dcm", "a.dcm"):
        (tmp_path / name).write_bytes(b"x")
    single = tmp_path / "single.dcm"
    single.write_bytes(b"x")
    found = list(iter_candidate_files([tmp_path / "b", single]))
    assert found == [tmp_path / "b/1.dcm", tmp_path / "b/c/2.dcm", single]


def test_can_send_uncompressed() -> None:
    assert can_send_uncompressed(ExplicitVRLittleEndian)
    assert can_send_uncompressed(ImplicitVRLittleEndian)
    assert can_send_uncompressed(DeflatedExplicitVRLittleEndian)
    assert not can_send_uncompressed(ExplicitVRBigEndian)
    assert can_send_uncompressed(JPEG2000Lossless)  # pylibjpeg-openjpeg is installed
    assert not can_send_uncompressed(UID("1.2.826.0.1.3680043.8.498.99999"))  # unknown


# --------------------------------------------------------------------------- planning


def test_one_association_with_exact_and_fallback_contexts() -> None:
    files = [
        _fake(1, CT, ExplicitVRLittleEndian),
        _fake(2, MR, JPEG2000Lossless),
        _fake(3, CT, ExplicitVRLittleEndian),
        _fake(4, MR, ExplicitVRBigEndian),
    ]
    (plan,) = plan_associations(files)
    assert plan.files == files
    assert plan.contexts == [
        ContextSpec(CT, (ExplicitVRLittleEndian,)),
        ContextSpec(CT, FALLBACK_SYNTAXES),
        ContextSpec(MR, (JPEG2000Lossless,)),
        ContextSpec(MR, (ExplicitVRBigEndian,)),
        ContextSpec(MR, FALLBACK_SYNTAXES),
    ]


def test_no_fallback_when_nothing_can_be_converted_or_both_are_proposed() -> None:
    big_endian = [_fake(1, CT, ExplicitVRBigEndian)]
    (plan,) = plan_associations(big_endian)
    assert plan.contexts == [ContextSpec(CT, (ExplicitVRBigEndian,))]

    both = [_fake(1, MR, ExplicitVRLittleEndian), _fake(2, MR, ImplicitVRLittleEndian)]
    (plan,) = plan_associations(both)
    assert plan.contexts == [
        ContextSpec(MR, (ExplicitVRLittleEndian,)),
        ContextSpec(MR, (ImplicitVRLittleEndian,)),
    ]


def test_no_files_no_associations() -> None:
    assert plan_associations([]) == []


def _check_plans(files: list[ScannedFile], max_contexts: int = MAX_CONTEXTS) -> int:
    plans = plan_associations(files, max_contexts)
    sent = [f for plan in plans for f in plan.files]
    assert sorted(sent, key=lambda f: f.path) == sorted(files, key=lambda f: f.path)
    for plan in plans:
        assert 0 < len(plan.contexts) <= max_contexts
        exact = {(c.sop_class_uid, c.transfer_syntaxes[0]) for c in plan.contexts}
        for f in plan.files:
            assert (f.sop_class_uid, f.transfer_syntax_uid) in exact
        order = [files.index(f) for f in plan.files]
        assert order == sorted(order)
    return len(plans)


def test_more_than_128_contexts_are_split_over_several_associations() -> None:
    # 200 SOP classes, each needs its exact context and a fallback: 64 per association.
    files = [_fake(n, f"1.2.826.0.1.3680043.8.498.{n + 1}") for n in range(200)]
    assert _check_plans(files) == 4


def test_one_sop_class_with_too_many_syntaxes_is_split() -> None:
    files = [_fake(n, CT, f"1.2.826.0.1.3680043.8.498.7.{n + 1}") for n in range(300)]
    files.append(_fake(300, CT, ExplicitVRLittleEndian))
    assert _check_plans(files) == 3


def test_small_limit_packs_whole_sop_classes() -> None:
    files = [_fake(n, f"1.2.826.0.1.3680043.8.498.{n % 5 + 1}") for n in range(20)]
    assert _check_plans(files, max_contexts=4) == 3


# --------------------------------------------------------------------------- outcome


def _status(code: int | None, comment: str | None = None) -> Dataset:
    ds = Dataset()
    if code is not None:
        ds.Status = code
    if comment:
        ds.ErrorComment = comment
    return ds


def test_status_mapping() -> None:
    assert _status_outcome(_status(0x0000), 0.1, 5).kind == "sent"
    for warning in (0xB000, 0xB006, 0xB007):
        outcome = _status_outcome(_status(warning), 0.1, 5)
        assert outcome.kind == "warning"
        assert f"0x{warning:04X}" in outcome.reason
    failure = _status_outcome(_status(0xA700, "disk full"), 0.1, 5)
    assert failure.kind == "failed"
    assert failure.reason == "status 0xA700 Refused: Out of Resources: disk full"
    assert _status_outcome(_status(0x0001), 0.1, 5).kind == "failed"
    timed_out = _status_outcome(_status(None), 5.0, 5)
    assert (timed_out.kind, timed_out.reason) == ("lost", "no response within 5 s")
    assert "aborted" in _status_outcome(_status(None), 0.2, 5).reason


def test_describe_lists_at_most_twenty_failures() -> None:
    summary = SendSummary(sent=120, warnings=1, skipped=1, elapsed=3.2)
    for n in range(25):
        summary.add_failure(Path(f"in/{n}.dcm"), "status 0xA700")
    lines = summary.describe().splitlines()
    assert lines[0] == (
        "sent 120, warnings 1, failed 25, skipped 1 (not DICOM) in 3.2 s (37.5 inst/s)"
    )
    assert lines[1] == "  in/0.dcm: status 0xA700"
    assert len(lines) == 1 + 20 + 1
    assert lines[-1] == "  ... and 5 more failures"


def test_describe_of_an_empty_run() -> None:
    assert SendSummary().describe() == (
        "sent 0, warnings 0, failed 0, skipped 0 (not DICOM) in 0.0 s (0.0 inst/s)"
    )


def test_scan_does_not_depend_on_the_file_name(tmp_path: Path) -> None:
    copy = tmp_path / "IM0001"
    shutil.copy(_testfile("MR_small.dcm"), copy)
    found = scan_file(copy)
    assert found is not None
    assert (found.path, found.sop_class_uid, found.streamable) == (copy, MR, True)
