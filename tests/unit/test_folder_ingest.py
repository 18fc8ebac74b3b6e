"""Folder ingest pieces: sniffing DICOM from a file's head, config keys, settle, moves."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import struct
import zipfile
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.data import get_testdata_file

from dicomgate.config import parse_config
from dicomgate.errors import ConfigError, DicomgateError, InvalidInstance
from dicomgate.ingest import Ingestor
from dicomgate.ingress.folder import FolderWatcher, Signature, _move_keeping, candidate_names
from dicomgate.ingress.models import IngestConfig
from dicomgate.ingress.sniff import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    HEAD_BYTES,
    IMPLICIT_LE,
    MEDIA_STORAGE_DIRECTORY,
    NotDicom,
    is_zip,
    sniff,
)

CT_SOP = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
MR_SOP = "1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457"


def _bundled(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(str(path)).read_bytes()


def _sniff(data: bytes) -> Any:
    head = data[:HEAD_BYTES]
    return sniff(head, complete=len(head) < HEAD_BYTES)


def _without_meta(data: bytes) -> bytes:
    assert data[128:136] == b"DICM\x02\x00\x00\x00"
    return data[144 + int.from_bytes(data[140:144], "little") :]


# -- sniffing ---------------------------------------------------------------------------


def test_part10_file_gives_its_meta() -> None:
    data = _bundled("CT_small.dcm")
    found = _sniff(data)
    assert (found.sop_class_uid, found.sop_instance_uid) == ("1.2.840.10008.5.1.4.1.1.2", CT_SOP)
    assert found.transfer_syntax == EXPLICIT_LE
    assert found.has_meta and not found.is_dicomdir
    assert data[found.data_offset :] == _without_meta(data)


def test_bare_data_sets_in_every_encoding() -> None:
    implicit = _without_meta(_bundled("MR_small_implicit.dcm"))
    found = _sniff(implicit)
    assert (found.transfer_syntax, found.sop_instance_uid) == (IMPLICIT_LE, MR_SOP)
    assert (found.data_offset, found.has_meta) == (0, False)
    explicit = _sniff(_bundled("ExplVR_LitEndNoMeta.dcm"))
    assert (explicit.transfer_syntax, explicit.sop_instance_uid) == (
        EXPLICIT_LE,
        "1.2.333.4444.5.6.7.8",
    )
    big = _sniff(_bundled("ExplVR_BigEndNoMeta.dcm"))
    assert (big.transfer_syntax, big.sop_instance_uid) == (EXPLICIT_BE, "1.2.333.4444.5.6.7.8")


def test_meta_without_preamble_and_without_group_length() -> None:
    data = _bundled("CT_small.dcm")
    found = _sniff(data[128 + 4 :])  # PS3.10 needs the preamble; some writers omit it
    assert found.sop_instance_uid == CT_SOP
    assert _sniff(_bundled("no_meta_group_length.dcm")).transfer_syntax == IMPLICIT_LE


def test_deflated_file_keeps_its_syntax() -> None:
    assert _sniff(_bundled("image_dfl.dcm")).transfer_syntax == "1.2.840.10008.1.2.1.99"


def test_dicomdir_is_recognised() -> None:
    found = _sniff(_bundled("dicomdirtests/DICOMDIR"))
    assert found.sop_class_uid == MEDIA_STORAGE_DIRECTORY
    assert found.is_dicomdir


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello\n", "too short"),
        (b"%PDF-1.4\n" + bytes(500), "no DICM prefix"),
        (bytes(200), "no DICM prefix"),
        (b"\x08\x00\x05\x00" + bytes(100), "not a DICOM file"),  # group 0008, then nonsense
    ],
)
def test_not_dicom(data: bytes, reason: str) -> None:
    with pytest.raises(NotDicom, match=reason):
        _sniff(data)


def test_dicom_but_unusable_is_not_called_not_dicom() -> None:
    data = _bundled("CT_small.dcm")
    with pytest.raises(InvalidInstance, match="file meta information truncated") as info:
        _sniff(data[:200])
    assert not isinstance(info.value, NotDicom)
    with pytest.raises(InvalidInstance, match="longer than"):
        sniff(data[:200], complete=False)  # the head was cut, not the file
    # a '/' (a letter is a slip stored as received, test_uid_slips.py)
    bad_uid = data.replace(CT_SOP.encode(), b"1.2/x" + b"4" * (len(CT_SOP) - 5), 1)
    with pytest.raises(InvalidInstance, match="malformed SOP"):
        _sniff(bad_uid)


def test_missing_transfer_syntax_is_read_from_the_data_set() -> None:
    data = _bundled("CT_small.dcm")
    offset = _sniff(data).data_offset
    # Rebuild the meta with only the SOP Class/Instance UIDs (no Transfer Syntax UID).
    elements = b""
    for element, value in ((0x0002, b"1.2.840.10008.5.1.4.1.1.2\x00"), (0x0003, CT_SOP.encode())):
        elements += struct.pack("<HH2sH", 2, element, b"UI", len(value)) + value
    found = _sniff(bytes(128) + b"DICM" + elements + data[offset:])
    assert (found.transfer_syntax, found.sop_instance_uid) == (EXPLICIT_LE, CT_SOP)


def test_zip_is_told_apart() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("IM0001", b"x")
    assert is_zip(buffer.getvalue())
    assert not is_zip(_bundled("CT_small.dcm"))
    assert not is_zip(b"PK\x03\x04" + bytes(124) + b"DICM")  # a preamble may hold anything


# -- configuration ----------------------------------------------------------------------


def test_no_watch_folder_by_default() -> None:
    config = parse_config({}, {})
    assert config.ingest.watch is None
    assert config.ingest.rejected_folder is None
    assert config.ingest.after == "delete" and config.ingest.move_to is None


def test_keys_and_derived_folders() -> None:
    config = parse_config(
        {"ingest": {"watch": "/in", "after": "move:/done", "calling_ae": " SCANNER "}}, {}
    )
    assert config.ingest.move_to == Path("/done")
    assert config.ingest.rejected_folder == Path("/in/rejected")
    assert config.ingest.calling_ae == "SCANNER"
    env = parse_config({}, {"DICOMGATE_INGEST__WATCH": "/drop", "DICOMGATE_INGEST__SETTLE": "1"})
    assert env.ingest.watch == Path("/drop") and env.ingest.settle == 1.0


@pytest.mark.parametrize(
    ("ingest", "message"),
    [
        ({"after": "keep"}, "ingest.after: use `delete` or `move:/path/to/folder`"),
        ({"after": "move:"}, "ingest.after: use `delete`"),
        ({"watch": "/in", "after": "move:/in/"}, "ingest.after: the move target must not be"),
        ({"watch": "/in", "rejected": "/in"}, "ingest.rejected: must not be the watch folder"),
        (
            {"watch": "/in", "after": "move:/out", "rejected": "/out"},
            "ingest.rejected: must not be the folder of `after: move:`",
        ),
        ({"settle": -1}, "ingest.settle:"),
        ({"poll_interval": 0}, "ingest.poll_interval:"),
        ({"concurrency": 0}, "ingest.concurrency:"),
        ({"calling_ae": "A\\B"}, "ingest.calling_ae: an AE title"),
        ({"whatch": "/in"}, "ingest.whatch: unknown key"),
    ],
)
def test_config_errors_name_the_key(ingest: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"ingest": ingest}, {})
    assert str(info.value).startswith(message)


# -- the watcher's rules, without an ingestor --------------------------------------------


def _watcher(tmp_path: Path, **keys: Any) -> FolderWatcher:
    config = IngestConfig(watch=tmp_path / "drop", **keys)
    return FolderWatcher(config, cast(Ingestor, None), "DICOMGATE", tmp_path / "data")


def test_names_that_never_overwrite() -> None:
    def names(name: str) -> list[str]:
        it = candidate_names(Path("/x") / name)
        return [next(it).name for _ in range(3)]

    assert names("IM0001") == ["IM0001", "IM0001-1", "IM0001-2"]
    assert names("a.dcm") == ["a.dcm", "a-1.dcm", "a-2.dcm"]
    assert names("1.2.840.5") == ["1.2.840.5", "1.2.840.5-1", "1.2.840.5-2"]


def test_move_keeps_both_files(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "a.dcm").write_bytes(b"old")
    source = tmp_path / "a.dcm"
    source.write_bytes(b"new")
    assert _move_keeping(source, tmp_path / "done" / "a.dcm") == tmp_path / "done" / "a-1.dcm"
    assert (tmp_path / "done" / "a.dcm").read_bytes() == b"old"
    assert (tmp_path / "done" / "a-1.dcm").read_bytes() == b"new"
    assert not source.exists()


def test_a_file_is_taken_only_after_it_settles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher = _watcher(tmp_path, settle=2.0)
    now = [100.0]
    monkeypatch.setattr("dicomgate.ingress.folder.time.monotonic", lambda: now[0])
    path = tmp_path / "drop" / "a.dcm"
    assert watcher._settled({path: Signature(10, 1, 7)}) == []
    now[0] = 101.5
    assert watcher._settled({path: Signature(20, 2, 7)}) == []  # grew: the clock restarts
    now[0] = 103.0
    assert watcher._settled({path: Signature(20, 2, 7)}) == []
    now[0] = 103.5
    assert watcher._settled({path: Signature(20, 2, 7)}) == [(path, Signature(20, 2, 7))]
    assert watcher._settled({}) == [] and watcher._seen == {}  # gone: forgotten


def test_scan_skips_hidden_partial_and_excluded(tmp_path: Path) -> None:
    watcher = _watcher(tmp_path, after=f"move:{tmp_path / 'drop' / 'done'}")
    drop = tmp_path / "drop"
    for name in (
        "a/IM1",
        "b.dcm",
        ".hidden",
        ".git/x",
        "c.dcm.part",
        "d.TMP",
        "rejected/e",
        "done/f",
    ):
        (drop / name).parent.mkdir(parents=True, exist_ok=True)
        (drop / name).write_bytes(b"x")
    (drop / "link").symlink_to(drop / "b.dcm")
    found = watcher._scan()
    assert sorted(p.relative_to(drop).as_posix() for p in found) == ["a/IM1", "b.dcm"]


def test_watch_folder_must_be_usable_and_apart_from_the_store(tmp_path: Path) -> None:
    inside = FolderWatcher(
        IngestConfig(watch=tmp_path), cast(Ingestor, None), "DICOMGATE", tmp_path / "data"
    )
    with pytest.raises(DicomgateError, match=r"^ingest\.watch: .* overlaps storage\.path"):
        asyncio.run(inside.start())
    (tmp_path / "file").write_bytes(b"")
    blocked = FolderWatcher(
        IngestConfig(watch=tmp_path / "file" / "drop"),
        cast(Ingestor, None),
        "DICOMGATE",
        tmp_path / "data",
    )
    with pytest.raises(DicomgateError, match=r"^ingest\.watch: cannot use folder"):
        asyncio.run(blocked.start())
    ok = _watcher(tmp_path, after=f"move:{tmp_path / 'done'}")
    ok._open_folders()
    assert (tmp_path / "drop" / "rejected").is_dir() and (tmp_path / "done").is_dir()


def test_cut_or_damaged_heads_are_refused_never_crash() -> None:
    """Whatever the bytes, the answer is a result or InvalidInstance (never struct.error)."""
    rng = random.Random(808)
    implicit = _bundled("MR_small_implicit.dcm")
    for data in (_bundled("CT_small.dcm"), implicit, _without_meta(implicit)):
        for cut in range(0, 1200, 3):
            for complete in (True, False):
                with contextlib.suppress(InvalidInstance):
                    sniff(data[:cut], complete)
        for _ in range(300):
            damaged = bytearray(data[:1200])
            for _ in range(rng.randint(1, 6)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            with contextlib.suppress(InvalidInstance):
                sniff(bytes(damaged), complete=False)
