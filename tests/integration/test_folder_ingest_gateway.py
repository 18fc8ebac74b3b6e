"""Folder ingest end to end: files dropped into a watched folder of a real ``dicomgate serve``.

Short ``settle`` and ``poll_interval`` keep these fast; the gateway is the console script,
routes deliver to folder destinations, the index is read from the test process.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from tests.conftest import (
    DICOMGATE,
    Corpus,
    GatewayProcess,
    bundled_file,
    needs_dcmtk,
    sop_uid_of,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

Gateway = Callable[..., GatewayProcess]
FAST = {"settle": 0.2, "poll_interval": 0.1}


def _dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file written with a File Meta Information Group Length."""
    data = path.read_bytes()
    assert data[128:136] == b"DICM\x02\x00\x00\x00", path
    return data[144 + int.from_bytes(data[140:144], "little") :]


def _bare(path: Path, target: Path) -> Path:
    """``path`` without preamble and file meta: a bare data set, as old systems export."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_dataset_bytes(path))
    return target


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _watching(
    gateway: Gateway, tmp_path: Path, ingest: dict[str, Any] | None = None, **extra: Any
) -> tuple[GatewayProcess, Path]:
    watch = tmp_path / "drop"
    config: dict[str, Any] = {"ingest": {"watch": str(watch), **FAST, **(ingest or {})}}
    config.update(extra)
    return gateway(config), watch


def _wait_empty(watch: Path, timeout: float = 30) -> None:
    """Until nothing is left in the watch folder outside ``rejected/``."""
    rejected = watch / "rejected"
    wait_until(
        lambda: [p for p in _files(watch) if not p.is_relative_to(rejected)] == [],
        timeout,
        "the watch folder to be emptied",
    )


def test_dropped_files_are_stored_routed_and_deleted(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("folder-drop", 6, seed=801)
    share, dimse_only = tmp_path / "share", tmp_path / "dimse-only"
    gw, watch = _watching(
        gateway,
        tmp_path,
        destinations={
            "share": {"type": "folder", "path": str(share)},
            "other": {"type": "folder", "path": str(dimse_only)},
        },
        routes=[
            {
                "name": "from-folder",
                "match": {"received_via": "folder", "calling_ae": "FOLDER"},
                "to": ["share"],
            },
            {"name": "from-dimse", "match": {"received_via": "dimse"}, "to": ["other"]},
        ],
    )
    dropped = {
        watch / "CT1" / "a.dcm": files[0],
        watch / "CT1" / "series2" / "IM0001": files[1],  # no extension
        watch / "deep" / "er" / "still" / "x.dcm": files[2],
        watch / "top.dcm": files[3],
    }
    for target, source in dropped.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    _bare(files[4], watch / "old-export" / "bare-explicit")
    _wait_empty(watch)

    sops = {sop_uid_of(f) for f in files[:5]}
    for sop in sops:
        row = gw.index.instance(sop)
        assert row is not None
        assert row["received_via"] == "folder"
        assert row["calling_ae"] == "FOLDER"
        assert row["called_ae"] == gw.ae_title
    assert gw.index.instance(sop_uid_of(files[5])) is None  # never dropped
    wait_until(lambda: len(_files(share)) == 5, 30, "the folder destination copies")
    for delivered in _files(share):
        source = next(f for f in files if sop_uid_of(f) == sop_uid_of(delivered))
        assert _dataset_bytes(delivered) == _dataset_bytes(source)  # byte-identical data set
    assert not dimse_only.exists()  # the received_via: dimse route did not match
    assert gw.log_count("folder.ingested") == 5
    assert (watch / "CT1" / "series2").is_dir()  # folders are kept by default
    assert "SIMPSON" not in gw.log_text()  # no patient data, no file names in the log


def test_after_move_keeps_the_path_and_never_overwrites(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    first, second = corpus.mr("folder-move", 2, seed=802)
    done = tmp_path / "done"
    gw, watch = _watching(gateway, tmp_path, {"after": f"move:{done}"})
    (watch / "in").mkdir(parents=True)
    shutil.copy(first, watch / "in" / "IM1")
    _wait_empty(watch)
    assert (done / "in" / "IM1").read_bytes() == first.read_bytes()

    shutil.copy(second, watch / "in" / "IM1")  # same name, another instance
    _wait_empty(watch)
    shutil.copy(first, watch / "in" / "IM1")  # the very same file once more
    _wait_empty(watch)
    assert (done / "in" / "IM1-1").read_bytes() == second.read_bytes()
    assert (done / "in" / "IM1-2").read_bytes() == first.read_bytes()
    assert gw.index.count_instances(current_only=False) == 2  # the repeat is not stored again
    assert not (watch / "rejected").exists() or _files(watch / "rejected") == []


def test_a_dicomdir_media_tree_is_ingested_and_cleared(gateway: Gateway, tmp_path: Path) -> None:
    dicomdir = Path(str(get_testdata_file("DICOMDIR", download=False)))
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(dicomdir, media / "DICOMDIR")
    for patient in ("77654033", "98892001", "98892003"):
        shutil.copytree(dicomdir.parent / patient, media / patient)
    expected = {sop_uid_of(p) for p in _files(media) if p.name != "DICOMDIR"}
    assert len(expected) == 31

    gw, watch = _watching(gateway, tmp_path, {"remove_empty_folders": True})
    shutil.copytree(media, watch / "CD1")
    wait_until(lambda: not (watch / "CD1").exists(), 30, "the media folder to be cleared")

    assert {sop for sop in expected if gw.index.instance(sop) is not None} == expected
    assert gw.index.count_instances() == 31  # the DICOMDIR itself is not an instance
    assert not (watch / "rejected").exists() or _files(watch / "rejected") == []
    assert gw.log_count("folder.dicomdir_done") == 1
    assert watch.is_dir()  # the watch folder itself stays


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_zip_files_are_read_member_by_member(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("folder-zip", 5, seed=803)
    truncated = bundled_file("MR_truncated.dcm").read_bytes()
    gw, watch = _watching(gateway, tmp_path)
    staging = tmp_path / "staging"
    good = _zip(
        staging / "study.zip",
        {
            "DICOM/IM0001": files[0].read_bytes(),
            "DICOM/sub/IM0002": files[1].read_bytes(),
            "IM0003.dcm": files[2].read_bytes(),
            "README.TXT": b"Burned by a viewer that also wrote this file.\n",
            "__MACOSX/._IM0003.dcm": b"\x00\x05\x16\x07 resource fork",
        },
    )
    mixed = _zip(staging / "mixed.zip", {"ok.dcm": files[3].read_bytes(), "bad.dcm": truncated})
    empty = _zip(staging / "nothing.zip", {"a.txt": b"hello", "b.pdf": b"%PDF-1.4"})
    (watch / "zips").mkdir(parents=True)
    for archive in (good, mixed, empty):
        shutil.copy(archive, watch / "zips" / archive.name)
    _wait_empty(watch)

    stored = {sop_uid_of(f) for f in files[:4]}
    assert {s for s in stored if gw.index.instance(s) is not None} == stored
    assert gw.index.count_instances(current_only=False) == 4
    rejected = watch / "rejected" / "zips"
    names = sorted(p.name for p in rejected.iterdir())
    # study.zip was deleted; its non-DICOM member is listed in a note
    assert names == [
        "mixed.zip",
        "mixed.zip.reason.txt",
        "nothing.zip",
        "nothing.zip.reason.txt",
        "study.zip.reason.txt",
    ]
    note = (rejected / "study.zip.reason.txt").read_text()
    assert "3 zip members stored" in note and "README.TXT: not a DICOM file" in note
    assert "__MACOSX" not in note
    mixed_reason = (rejected / "mixed.zip.reason.txt").read_text()
    assert "1 of 2 zip members stored; 1 refused" in mixed_reason
    assert "bad.dcm: element (7FE0,0010) has length 8192, past the end" in mixed_reason
    assert (rejected / "mixed.zip").read_bytes() == mixed.read_bytes()  # kept whole
    assert "no DICOM instance" in (rejected / "nothing.zip.reason.txt").read_text()


def test_refused_files_go_to_rejected_with_a_reason(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    (source,) = corpus.mr("folder-refused", 1, seed=804)
    mismatch = tmp_path / "mismatch.dcm"
    ds = pydicom.dcmread(source)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    ds.save_as(mismatch, enforce_file_format=False)
    gw, watch = _watching(gateway, tmp_path)
    (watch / "sub").mkdir(parents=True)
    (watch / "notes.txt").write_text("not an image\n")
    (watch / "sub" / "empty").write_bytes(b"")
    shutil.copy(bundled_file("MR_truncated.dcm"), watch / "sub" / "MR_truncated.dcm")
    shutil.copy(bundled_file("rtplan_truncated.dcm"), watch / "sub" / "rtplan")
    shutil.copy(mismatch, watch / "sub" / "mismatch.dcm")
    (watch / "garbage.dcm").write_bytes(bytes(128) + b"DICM" + b"\xff" * 40)
    _wait_empty(watch)

    rejected = watch / "rejected"
    reasons = {
        p.relative_to(rejected).as_posix(): p.read_text()
        for p in _files(rejected)
        if p.name.endswith(".reason.txt")
    }
    assert sorted(reasons) == [
        "garbage.dcm.reason.txt",
        "notes.txt.reason.txt",
        "sub/MR_truncated.dcm.reason.txt",
        "sub/empty.reason.txt",
        "sub/mismatch.dcm.reason.txt",
        "sub/rtplan.reason.txt",
    ]
    assert all(text.count("\n") == 1 for text in reasons.values())  # one line each
    assert "not a DICOM file" in reasons["notes.txt.reason.txt"]
    assert "empty file" in reasons["sub/empty.reason.txt"]
    assert "past the end of the data set" in reasons["sub/MR_truncated.dcm.reason.txt"]
    assert "differs from its file meta" in reasons["sub/mismatch.dcm.reason.txt"]
    assert (rejected / "notes.txt").read_text() == "not an image\n"
    assert (rejected / "sub" / "rtplan").read_bytes() == (
        bundled_file("rtplan_truncated.dcm").read_bytes()
    )
    assert gw.index.count_instances(current_only=False) == 0
    assert gw.log_count("folder.rejected") == 6
    time.sleep(0.5)  # the rejected folder is not scanned: nothing moves again
    assert gw.log_count("folder.rejected") == 6


def test_a_file_being_written_is_not_taken_before_it_settles(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    (source,) = corpus.mr("folder-slow", 1, seed=805)
    data = source.read_bytes()
    gw, watch = _watching(gateway, tmp_path, {"settle": 1.0, "poll_interval": 0.1})
    watch.mkdir(exist_ok=True)
    target = watch / "slow.dcm"
    with open(target, "wb", buffering=0) as fh:
        step = len(data) // 6
        for start in range(0, len(data), step):
            fh.write(data[start : start + step])
            time.sleep(0.4)  # less than settle: the file keeps changing
            assert target.exists(), "taken while it was being written"
            assert gw.index.count_instances(current_only=False) == 0
    _wait_empty(watch)
    assert gw.index.instance(sop_uid_of(source)) is not None
    assert gw.log_count("folder.rejected") == 0


@needs_dcmtk
def test_duplicates_under_reject_policy(gateway: Gateway, corpus: Corpus, tmp_path: Path) -> None:
    over_dimse, dropped = corpus.mr("folder-dup", 2, seed=806)
    gw, watch = _watching(gateway, tmp_path, storage={"duplicates": "reject"})
    assert gw.storescu([over_dimse]).returncode == 0
    watch.mkdir(exist_ok=True)
    shutil.copy(dropped, watch / "first.dcm")
    _wait_empty(watch)
    shutil.copy(dropped, watch / "again.dcm")  # identical: stored already, simply removed
    shutil.copy(over_dimse, watch / "dup.dcm")  # same instance, stored by another sender
    _wait_empty(watch)
    assert gw.index.count_instances(current_only=False) == 2
    reasons = [p.name for p in _files(watch / "rejected")]
    assert reasons == ["dup.dcm", "dup.dcm.reason.txt"]
    assert "duplicate" in (watch / "rejected" / "dup.dcm.reason.txt").read_text()


def test_an_unusable_watch_folder_stops_start_up(gateway: Gateway, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    gw = gateway({"ingest": {"watch": str(blocker / "drop")}}, start=False)
    result = subprocess.run(
        [DICOMGATE, "serve", "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=gw.root,
    )
    assert result.returncode == 1
    assert "ingest.watch" in result.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_a_large_file_and_zip_member_stream_with_flat_memory(
    gateway: Gateway, tmp_path: Path
) -> None:
    from tests.corpus import make_large_instance
    from tests.integration.test_large_instance import MAX_GROWTH, MB, RssSampler, rss_bytes

    big = make_large_instance(tmp_path / "big.dcm", 150 * MB, seed=807)
    packed = tmp_path / "big.zip"
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_STORED) as archive:
        archive.write(big, "member/big.dcm")
    gw, watch = _watching(gateway, tmp_path, {"after": f"move:{tmp_path / 'done'}"})
    baseline = rss_bytes(gw.pid)
    sampler = RssSampler(gw.pid)
    sampler.start()
    try:
        for source in (big, packed):  # copied under a .part name, then renamed
            shutil.copy(source, watch / f"{source.name}.part")
            (watch / f"{source.name}.part").rename(watch / source.name)
            _wait_empty(watch, timeout=90)
    finally:
        sampler.stop()
    assert sampler.peak - baseline < MAX_GROWTH, f"RSS grew {(sampler.peak - baseline) / MB:.0f} MB"
    row = gw.index.instance(sop_uid_of(big))
    assert row is not None
    assert _dataset_bytes(gw.stored_path(row)) == _dataset_bytes(big)
    assert gw.index.count_instances(current_only=False) == 1  # the zip member was the same file
    assert (tmp_path / "done" / "big.zip").is_file()


def test_a_full_store_leaves_files_in_place_until_there_is_room(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("folder-full", 2, seed=809)
    gw, watch = _watching(gateway, tmp_path, storage={"min_free_bytes": 10**17})
    zipped = _zip(tmp_path / "staging" / "two.zip", {f.name: f.read_bytes() for f in files})
    watch.mkdir(exist_ok=True)
    shutil.copy(files[0], watch / "a.dcm")
    shutil.copy(zipped, watch / "two.zip")
    gw.wait_log("folder.retry", count=2)
    time.sleep(0.5)  # several more scans: still waiting, logged once per file
    assert sorted(p.name for p in watch.iterdir()) == ["a.dcm", "rejected", "two.zip"]
    assert _files(watch / "rejected") == []
    assert gw.log_count("folder.retry") == 2
    assert gw.index.count_instances(current_only=False) == 0

    gw.config["storage"]["min_free_bytes"] = 0
    gw.restart()
    _wait_empty(watch)
    assert gw.index.count_instances(current_only=False) == 2
    assert _files(watch / "rejected") == []


def test_kill9_mid_scan_loses_nothing_and_stores_nothing_twice(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    """A gateway killed while it empties the watch folder (files and a zip) takes the rest
    after the restart; files it had stored but not yet deleted are recognised (same bytes)
    and only deleted, so each instance has exactly one row (docs/architecture.md, *At least
    once, without second copies*)."""
    files = corpus.mr("folder-kill9", 260, seed=811)
    loose, zipped = files[:200], files[200:]
    gw, watch = _watching(gateway, tmp_path, storage={"recovery_grace": 1})
    staging = tmp_path / "staging"
    staging.mkdir()
    for i, path in enumerate(loose):
        shutil.copy(path, staging / f"{i:04d}.dcm")
    _zip(staging / "more.zip", {p.name: p.read_bytes() for p in zipped})
    staging.rename(watch / "batch")  # all at once, settled from the start
    gw.wait_log("folder.ingested", 40, timeout=60)
    gw.kill9()
    left = [p for p in _files(watch) if not p.is_relative_to(watch / "rejected")]
    assert 0 < len(left) < len(loose) + 1, "the kill came too late (or too early) to tell"
    gw.restart()
    _wait_empty(watch, timeout=90)
    assert not (watch / "rejected").exists() or _files(watch / "rejected") == []
    index = gw.index
    for path in files:
        assert len(index.instances(sop_uid_of(path))) == 1, path.name
    assert index.count_instances(current_only=False) == len(files)
    assert len(list((gw.data / "store").rglob("*.dcm"))) == len(files)
