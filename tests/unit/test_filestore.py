"""Content store (spool, commit, layout, duplicates, free space) and the Part 10 header."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import sys
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomgate import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomgate.errors import StoreError, StoreFullError
from dicomgate.ingest import _data_offset
from dicomgate.store import filestore
from dicomgate.store.filestore import ContentStore, SpoolFile
from dicomgate.store.part10 import encode_file_meta

STUDY = "1.2.826.0.1.3680043.8.498.10"
SERIES = "1.2.826.0.1.3680043.8.498.11"
SOP = "1.2.826.0.1.3680043.8.498.12"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    content = ContentStore(tmp_path / "data", fsync=True)
    content.open()
    return content


def _spool(store: ContentStore, *chunks: bytes, write_behind: bool = False) -> SpoolFile:
    spool = store.new_spool(write_behind)
    for chunk in chunks:
        spool.write(chunk)
    return spool


# -- open ----------------------------------------------------------------------------------


def test_open_creates_folders(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "data"
    content = ContentStore(root)
    assert content.open() == 0
    assert (root / "spool").is_dir()
    assert (root / "store").is_dir()
    assert content.writable()
    assert list((root / "spool").iterdir()) == []  # the write probe is gone


def test_open_removes_leftover_spool_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "spool").mkdir(parents=True)
    (root / "spool" / "half.part").write_bytes(b"half an image")
    (root / "spool" / "other.part").write_bytes(b"")
    stored = root / "store" / STUDY / SERIES / f"{SOP}.dcm"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"kept")
    content = ContentStore(root)
    assert content.open() == 2
    assert list((root / "spool").iterdir()) == []
    assert stored.read_bytes() == b"kept"  # finished files are never touched


def test_open_removes_a_previous_runs_spool_pool(tmp_path: Path) -> None:
    first = ContentStore(tmp_path / "data")
    first.open()
    first.refill_spool_pool()
    pooled = len(list(first.spool_dir.iterdir()))
    assert pooled > 0
    assert ContentStore(tmp_path / "data").open() == pooled


def test_open_on_unusable_root_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a folder")
    with pytest.raises(StoreError):
        ContentStore(blocker / "data").open()


# -- commit --------------------------------------------------------------------------------


def test_commit_lays_out_study_series_sop(store: ContentStore) -> None:
    chunks = [b"DICM" * 100, b"\x00" * 4097, b"tail"]
    spool = _spool(store, *chunks)
    spool_path = spool.path
    stored = store.commit(spool, STUDY, SERIES, SOP)
    data = b"".join(chunks)
    assert stored.relpath == f"store/{STUDY}/{SERIES}/{SOP}.dcm"
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert store.path_of(stored.relpath).read_bytes() == data
    assert not spool_path.exists()
    assert list(store.spool_dir.iterdir()) == []


def test_sync_file_range_is_found_and_accepts_a_whole_file_range(tmp_path: Path) -> None:
    """The batch writeback start (Ingestor._commit_batch) relies on it on Linux."""
    if not sys.platform.startswith("linux"):
        pytest.skip("sync_file_range(2) is Linux-only; elsewhere writeback is not started early")
    assert filestore._SYNC_FILE_RANGE is not None
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert filestore._SYNC_FILE_RANGE(fd, 0, 0, filestore._SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)


def test_start_writeback_changes_nothing_open_or_parked(store: ContentStore) -> None:
    data = b"DICM" * 5000
    open_spool = _spool(store, data)
    open_spool.start_writeback()  # through its own descriptor
    open_spool.write(b"more")  # still writable afterwards
    parked = _spool(store, data)
    parked.park()
    parked.start_writeback()  # through a fresh descriptor
    for spool, expected, sop in ((open_spool, data + b"more", SOP), (parked, data, SOP + ".2")):
        spool.flush()
        stored = store.commit(spool, STUDY, SERIES, sop)
        assert store.path_of(stored.relpath).read_bytes() == expected
    gone = _spool(store, data)
    gone.park()
    gone.path.unlink()
    gone.start_writeback()  # best effort: a vanished file is not an error here


def test_commit_without_fsync(tmp_path: Path) -> None:
    content = ContentStore(tmp_path / "data", fsync=False)
    content.open()
    stored = content.commit(_spool(content, b"abc"), STUDY, SERIES, SOP)
    assert content.path_of(stored.relpath).read_bytes() == b"abc"


def test_second_file_with_same_sop_is_kept_beside_the_first(store: ContentStore) -> None:
    first = store.commit(_spool(store, b"first version"), STUDY, SERIES, SOP)
    second = store.commit(_spool(store, b"second version"), STUDY, SERIES, SOP)
    sha = hashlib.sha256(b"second version").hexdigest()
    assert first.relpath == f"store/{STUDY}/{SERIES}/{SOP}.dcm"
    assert second.relpath == f"store/{STUDY}/{SERIES}/{SOP}.{sha[:16]}.dcm"
    assert store.path_of(first.relpath).read_bytes() == b"first version"
    assert store.path_of(second.relpath).read_bytes() == b"second version"


def test_third_copy_never_replaces_a_stored_file(store: ContentStore) -> None:
    store.commit(_spool(store, b"version A"), STUDY, SERIES, SOP)
    second = store.commit(_spool(store, b"version B"), STUDY, SERIES, SOP)
    inode = store.path_of(second.relpath).stat().st_ino
    third = store.commit(_spool(store, b"version B"), STUDY, SERIES, SOP)
    assert third.relpath != second.relpath
    assert store.path_of(second.relpath).stat().st_ino == inode
    store.remove(third.relpath)
    assert store.path_of(second.relpath).read_bytes() == b"version B"


@pytest.mark.parametrize(
    "uid",
    ["../../etc", "..", ".", "1.2/../../x", "a/b", "", "1.2.3\x00", "1.2.3 ", "x" * 65],
)
def test_malformed_uids_become_hex_components(store: ContentStore, uid: str) -> None:
    stored = store.commit(_spool(store, b"data"), uid, uid, uid)
    path = store.path_of(stored.relpath).resolve()
    assert path.is_relative_to(store.store_dir.resolve())
    parts = Path(stored.relpath).parts
    assert len(parts) == 4  # store / study / series / file: no extra levels
    assert parts[0] == "store"
    for part in parts[1:3]:
        assert part.startswith("x")
        assert set(part[1:]) <= set("0123456789abcdef")
    assert parts[3].startswith("x")
    assert parts[3].endswith(".dcm")
    assert path.read_bytes() == b"data"


def test_hex_component_is_reversible(store: ContentStore) -> None:
    stored = store.commit(_spool(store, b"data"), "../evil", SERIES, SOP)
    component = Path(stored.relpath).parts[1]
    assert bytes.fromhex(component[1:]).decode() == "../evil"


def test_well_formed_uids_are_used_as_is(store: ContentStore) -> None:
    stored = store.commit(_spool(store, b"data"), "1.2", "1.2.3", "1.2.3.4")
    assert stored.relpath == "store/1.2/1.2.3/1.2.3.4.dcm"


def test_discard_removes_spool_file(store: ContentStore) -> None:
    spool = _spool(store, b"partial")
    spool.discard()
    assert not spool.path.exists()
    spool.discard()  # twice is harmless


def test_remove_stored_file(store: ContentStore) -> None:
    stored = store.commit(_spool(store, b"data"), STUDY, SERIES, SOP)
    store.remove(stored.relpath)
    assert not store.path_of(stored.relpath).exists()
    store.remove(stored.relpath)  # missing is fine


def test_spool_pool_is_used_and_drained(store: ContentStore) -> None:
    store.refill_spool_pool()
    pooled = set(store.spool_dir.iterdir())
    spool = store.new_spool()
    assert spool.path in pooled
    spool.discard()
    store.drain_spool_pool()
    assert list(store.spool_dir.iterdir()) == []


@pytest.mark.parametrize("fsync", [True, False])
def test_spool_pool_files_are_settled_when_fsync_is_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    """Pooled spool files are fsynced once while empty (SpoolFile.settle), so the flush of
    their data later does not also write the spool folder; not with storage.fsync off."""
    content = ContentStore(tmp_path / "data", fsync=fsync)
    content.open()
    settled: list[Path] = []
    real = SpoolFile.settle
    monkeypatch.setattr(SpoolFile, "settle", lambda self: (settled.append(self.path), real(self)))
    content.refill_spool_pool()
    pooled = sorted(content.spool_dir.iterdir())
    assert sorted(settled) == (pooled if fsync else [])
    spool = content.new_spool()
    spool.write(b"data")
    stored = content.commit(spool, STUDY, SERIES, SOP)
    assert content.path_of(stored.relpath).read_bytes() == b"data"
    content.drain_spool_pool()


def test_small_spool_file_keeps_a_copy_for_the_header_scan(store: ContentStore) -> None:
    """Up to MEMORY_COPY_MAX the written bytes are also kept in memory (the committer scans
    them without reading the file back); past it, after forget() or the move, they are not."""
    small = store.new_spool()
    small.write(b"a" * 1000)
    small.write(b"b" * 24)
    assert small.content == b"a" * 1000 + b"b" * 24
    small.park()  # a STOW-RS part waits closed: the copy stays
    assert small.content is not None and len(small.content) == small.size
    small.forget()
    assert small.content is None
    small.discard()
    large = store.new_spool()
    large.write(b"x" * filestore.MEMORY_COPY_MAX)
    assert large.content is not None
    large.write(b"y")
    assert large.content is None  # past the limit: the file is read back instead
    large.discard()
    moved = store.new_spool()
    moved.write(b"data")
    store.commit(moved, STUDY, SERIES, SOP)
    assert moved.content is None


def test_settle_on_a_closed_spool_file_is_harmless(store: ContentStore) -> None:
    spool = store.new_spool()
    spool.close()
    spool.settle()  # best effort: a closed descriptor is not an error
    spool.discard()


def test_spool_refiller_keeps_the_pool_full_and_cleans_up(store: ContentStore) -> None:
    """The refiller thread puts back what new_spool() takes; stopping it removes the
    unused files (the committer no longer creates spool files between batches)."""
    store.start_spool_refiller()
    full = len(list(store.spool_dir.iterdir()))
    assert full >= 8
    assert any(t.name == "dicomgate-spool" for t in threading.enumerate())
    taken = [store.new_spool() for _ in range(5)]
    deadline = time.monotonic() + 5
    while len(list(store.spool_dir.iterdir())) < full + 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(list(store.spool_dir.iterdir())) == full + 5  # 5 taken, 5 made again
    store.stop_spool_refiller()
    assert not any(t.name == "dicomgate-spool" for t in threading.enumerate())
    assert sorted(store.spool_dir.iterdir()) == sorted(s.path for s in taken)
    for spool in taken:
        spool.discard()


# -- free space ----------------------------------------------------------------------------


def test_check_space_raises_when_min_free_is_huge(tmp_path: Path) -> None:
    content = ContentStore(tmp_path / "data", min_free_bytes=1 << 62)
    content.open()
    with pytest.raises(StoreFullError):
        content.check_space()
    assert issubclass(StoreFullError, StoreError)


def test_check_space_passes_with_small_minimum(tmp_path: Path) -> None:
    content = ContentStore(tmp_path / "data", min_free_bytes=1)
    content.open()
    content.check_space()
    ContentStore(tmp_path / "data", min_free_bytes=0).check_space()  # 0 = no check


# -- Part 10 header ------------------------------------------------------------------------


def _data_set(sop: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_STORAGE
    ds.SOPInstanceUID = sop
    ds.PatientName = "Doe^John"
    ds.Modality = "CT"
    ds.Rows = 2
    return ds


def _encode(ds: Dataset, implicit: bool) -> bytes:
    """The data set as pydicom writes it (no preamble, no file meta)."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return fp.getvalue()


def _meta_of(header: bytes) -> FileMetaDataset:
    return pydicom.dcmread(BytesIO(header + _encode(_data_set(SOP), False))).file_meta


@pytest.mark.parametrize(
    ("transfer_syntax", "implicit"),
    [(ExplicitVRLittleEndian, False), (ImplicitVRLittleEndian, True)],
)
@pytest.mark.parametrize("sop", [SOP, SOP + "3"])  # even and odd length
@pytest.mark.parametrize("source_ae", ["", "MODALITY", "ODDAE"])
def test_part10_header_reads_back_with_pydicom(
    tmp_path: Path, transfer_syntax: str, implicit: bool, sop: str, source_ae: str
) -> None:
    header = encode_file_meta(CT_STORAGE, sop, transfer_syntax, source_ae)
    assert header[:128] == bytes(128)
    assert header[128:132] == b"DICM"
    path = tmp_path / "f.dcm"
    path.write_bytes(header + _encode(_data_set(sop), implicit))

    with open(path, "rb") as fh:
        assert _data_offset(fh) == len(header)

    ds = pydicom.dcmread(path)
    meta = ds.file_meta
    assert meta.FileMetaInformationGroupLength == len(header) - 144
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.MediaStorageSOPClassUID == CT_STORAGE
    assert meta.MediaStorageSOPInstanceUID == sop
    assert meta.TransferSyntaxUID == transfer_syntax
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    if source_ae:
        assert meta.SourceApplicationEntityTitle == source_ae
    else:
        assert "SourceApplicationEntityTitle" not in meta
    assert ds.SOPInstanceUID == sop
    assert ds.PatientName == "Doe^John"
    assert ds.Rows == 2
    assert ds.original_encoding == (implicit, True)


def test_part10_header_elements_are_even_length() -> None:
    header = encode_file_meta(CT_STORAGE, SOP + "3", ExplicitVRLittleEndian, "ODDAE")
    pos, tags = 132, []
    while pos < len(header):  # PS3.5 7.1.2: explicit VR, every value of even length
        group, element, vr = struct.unpack_from("<HH2s", header, pos)
        assert group == 0x0002
        if vr == b"OB":
            (length,) = struct.unpack_from("<I", header, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", header, pos + 6)
            pos += 8 + length
        assert length % 2 == 0, hex(element)
        tags.append(element)
    assert pos == len(header)
    assert tags == sorted(tags)
    assert tags == [0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x0012, 0x0013, 0x0016]
    assert _meta_of(header).MediaStorageSOPInstanceUID == SOP + "3"  # pad is not in the value


def test_part10_header_long_source_ae_is_cut_to_16(tmp_path: Path) -> None:
    header = encode_file_meta(CT_STORAGE, SOP, ExplicitVRLittleEndian, "A" * 20)
    meta = _meta_of(header)
    assert meta.SourceApplicationEntityTitle == "A" * 16


def test_stored_file_roundtrip(store: ContentStore) -> None:
    """A spooled header + data set, committed, is a valid DICOM file at its final name."""
    header = encode_file_meta(CT_STORAGE, SOP, ExplicitVRLittleEndian, "MODALITY")
    body = _encode(_data_set(SOP), implicit=False)
    stored = store.commit(_spool(store, header, body), STUDY, SERIES, SOP)
    ds = pydicom.dcmread(store.path_of(stored.relpath))
    assert ds.SOPInstanceUID == SOP
    assert ds.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert os.path.getsize(store.path_of(stored.relpath)) == stored.size


def test_place_survives_its_folder_removed_by_retention(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention removes emptied folders; one vanishing between mkdir and rename is re-made."""
    real_replace = os.replace
    removed: list[Path] = []

    def replace_after_rmdir(src: str | Path, dst: str | Path) -> None:
        folder = Path(dst).parent
        if not removed:
            os.rmdir(folder)  # what a retention sweep does to an empty series folder
            removed.append(folder)
        real_replace(src, dst)

    monkeypatch.setattr("dicomgate.store.filestore.os.replace", replace_after_rmdir)
    stored = store.commit(_spool(store, b"data"), STUDY, SERIES, SOP)
    assert removed and (store.root / stored.relpath).read_bytes() == b"data"


def test_a_known_series_folder_removed_by_retention_is_made_again(store: ContentStore) -> None:
    """place() skips the folder checks for a series folder it has used and flushed; when
    retention removed it meanwhile (emptied: study and series folders gone), the rename
    fails, and the folder is made again, with its parents among the folders to flush."""
    first, folders = store.place(_spool(store, b"one"), STUDY, SERIES, SOP)
    series = (store.root / first.relpath).parent
    assert folders == [series, series.parent, series.parent.parent]
    store.sync_folders(folders)
    _, folders = store.place(_spool(store, b"two"), STUDY, SERIES, SOP + ".2")
    assert folders == [series]
    store.sync_folders(folders)
    for path in series.iterdir():  # what a relay-retention sweep does
        path.unlink()
    series.rmdir()
    series.parent.rmdir()
    third, folders = store.place(_spool(store, b"three"), STUDY, SERIES, SOP + ".3")
    assert (store.root / third.relpath).read_bytes() == b"three"
    assert folders == [series, series.parent, series.parent.parent]
    store.sync_folders(folders)
    assert store.place(_spool(store, b"four"), STUDY, SERIES, SOP + ".4")[1] == [series]


def test_a_folder_whose_flush_failed_is_flushed_with_its_parents_again(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A series folder made by a batch whose folder flush failed is not taken as settled:
    the next file into it flushes its parents too, so its entry survives a power cut."""
    first, folders = store.place(_spool(store, b"one"), STUDY, SERIES, SOP)
    series = (store.root / first.relpath).parent

    def failing(folder: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(filestore, "fsync_dir", failing)
    with pytest.raises(StoreError):
        store.sync_folders(folders)
    monkeypatch.undo()
    _, folders = store.place(_spool(store, b"two"), STUDY, SERIES, SOP + ".2")
    assert folders == [series, series.parent, series.parent.parent]
    store.sync_folders(folders)
    assert store.place(_spool(store, b"three"), STUDY, SERIES, SOP + ".3")[1] == [series]


def test_without_fsync_a_used_series_folder_is_known_at_once(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "data", fsync=False)
    store.open()
    first, folders = store.place(_spool(store, b"one"), STUDY, SERIES, SOP)
    series = (store.root / first.relpath).parent
    assert folders == [series, series.parent, series.parent.parent]
    assert store.place(_spool(store, b"two"), STUDY, SERIES, SOP + ".2")[1] == [series]


def test_stow_request_keeps_in_memory_copies_of_its_first_parts_only(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A STOW-RS request's staged parts keep their copy for the header scan up to
    COPIES_PER_REQUEST (memory stays bounded however many parts a request holds)."""
    from types import SimpleNamespace

    from dicomgate.dicomweb import stow
    from dicomgate.dicomweb.multipart import PartStart

    monkeypatch.setattr(stow, "COPIES_PER_REQUEST", 2)
    stager = stow._Stager(SimpleNamespace(store=store), "127.0.0.1")  # type: ignore[arg-type]
    for n in range(3):
        data = _part10_bytes(f"{SOP}.{n}")
        stager.start(PartStart({"content-type": "application/dicom"}))
        stager.data(data)
        stager.end()
    copies = [s.spool.content for s in stager.staged]
    assert [c is not None for c in copies] == [True, True, False]
    assert copies[0] is not None and len(copies[0]) == stager.staged[0].spool.size
    stager.discard()


def _part10_bytes(sop: str) -> bytes:
    return encode_file_meta(CT_STORAGE, sop, ExplicitVRLittleEndian) + _encode(
        _data_set(sop), False
    )


# -- writes behind (the writer thread) ------------------------------------------------------


@pytest.fixture
def running_store(store: ContentStore) -> Iterator[ContentStore]:
    """A store as a running gateway has it: spool refiller and writer thread started."""
    store.start_spool_refiller()
    yield store
    store.stop_spool_refiller()


def test_large_spool_files_are_written_behind_in_order_and_hashed(
    running_store: ContentStore,
) -> None:
    """Past MEMORY_COPY_MAX the writer thread appends and hashes; the stored file is the
    bytes in the order written, even from a buffer the caller changes afterwards."""
    store = running_store
    assert any(t.name == "dicomgate-writer" for t in threading.enumerate())
    first = b"h" * 1000
    body = os.urandom(filestore.MEMORY_COPY_MAX + 5000)
    reused = bytearray(b"r" * 70_000)  # a receive buffer its owner reuses
    spool = _spool(store, first, body, write_behind=True)
    spool.write(reused)
    reused[:] = b"z" * len(reused)
    spool.write(memoryview(b"tail-bytes"))
    expected = first + body + b"r" * 70_000 + b"tail-bytes"
    assert spool.size == len(expected)
    assert spool.content is None
    stored = store.commit(spool, STUDY, SERIES, SOP)
    assert store.path_of(stored.relpath).read_bytes() == expected
    assert stored.sha256 == hashlib.sha256(expected).hexdigest()
    assert stored.size == len(expected)


def test_spool_files_not_asking_for_it_are_written_at_once(
    running_store: ContentStore,
) -> None:
    """Only write_behind spool files (STOW-RS parts) use the writer thread; a C-STORE's
    chain is shorter written directly (bench/README.md)."""
    store = running_store
    data = os.urandom(2 * filestore.MEMORY_COPY_MAX)
    spool = _spool(store, data)
    assert spool.path.read_bytes() == data  # on disk as write() returns
    assert not spool._behind
    spool.discard()


def test_a_parked_large_spool_file_is_closed_by_the_writer_and_still_flushes(
    running_store: ContentStore,
) -> None:
    store = running_store
    data = os.urandom(3 * filestore.MEMORY_COPY_MAX)
    spool = _spool(store, data[:100], data[100:], write_behind=True)
    spool.park()
    spool.drain()
    assert spool._fh.closed
    spool.flush()
    stored = store.commit(spool, STUDY, SERIES, SOP)
    assert store.path_of(stored.relpath).read_bytes() == data


def test_a_failed_write_behind_refuses_the_file_where_it_is_flushed_or_placed(
    running_store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the writer thread could not make (disk full) is raised by drain, flush and
    commit, and the file never enters the store; later writes of that file are skipped."""
    store = running_store
    spool = _spool(store, b"x" * 10, write_behind=True)

    class FullDisk:
        closed = False

        def __init__(self) -> None:
            self.writes = 0

        def write(self, data: object) -> int:
            self.writes += 1
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self) -> int:
            raise AssertionError("not reached")

        def close(self) -> None:
            self.closed = True

    real = spool._fh
    full = FullDisk()
    monkeypatch.setattr(spool, "_fh", full)
    spool.write(b"y" * (filestore.MEMORY_COPY_MAX + 1))  # behind: no error here
    spool.write(b"z" * 100)
    with pytest.raises(StoreFullError):
        spool.drain()
    assert full.writes == 1  # the second write was skipped
    with pytest.raises(StoreFullError):
        spool.flush()
    with pytest.raises(StoreFullError):
        store.commit(spool, STUDY, SERIES, SOP)
    assert not (store.store_dir / STUDY).exists()
    real.close()
    spool.discard()
    assert not spool.path.exists()


def test_writes_behind_wait_when_the_writer_is_behind_by_its_limit(tmp_path: Path) -> None:
    """Back-pressure: a write waits while max_pending bytes are queued (memory stays
    bounded whatever the sender's pace)."""
    release = threading.Event()

    class SlowSpool(SpoolFile):
        def _apply(self, data: bytes | memoryview | None) -> None:
            release.wait(10)
            super()._apply(data)

    writer = filestore._Writer(max_pending=filestore.MEMORY_COPY_MAX * 2)
    try:
        spool = SlowSpool(tmp_path / "slow.part", writer)
        chunk = b"c" * (filestore.MEMORY_COPY_MAX + 1)
        spool.write(chunk)  # queued; the writer holds it
        done = threading.Event()

        def second() -> None:
            spool.write(chunk)  # 2 x (MAX + 1) > max_pending: waits
            done.set()

        thread = threading.Thread(target=second)
        thread.start()
        assert not done.wait(0.3)
        release.set()
        assert done.wait(5)
        thread.join()
        spool.drain()
        assert (tmp_path / "slow.part").read_bytes() == chunk * 2
        spool.discard()
    finally:
        release.set()
        writer.stop()


def test_a_discarded_spool_file_skips_its_queued_writes(tmp_path: Path) -> None:
    release = threading.Event()
    applied: list[int] = []

    class SlowSpool(SpoolFile):
        def _apply(self, data: bytes | memoryview | None) -> None:
            release.wait(10)
            super()._apply(data)
            applied.append(self.path.stat().st_size if self.path.exists() else -1)

    writer = filestore._Writer()
    try:
        spool = SlowSpool(tmp_path / "gone.part", writer)
        spool.write(b"a" * (filestore.MEMORY_COPY_MAX + 1))
        spool.write(b"b" * 10)
        threading.Timer(0.2, release.set).start()
        spool.discard()  # waits for the writer, which skips both writes
        assert applied == [0, 0]  # neither write reached the file
        assert not (tmp_path / "gone.part").exists()
        assert spool._fh.closed
    finally:
        release.set()
        writer.stop()


def test_after_the_writer_stops_writes_are_made_at_once(tmp_path: Path) -> None:
    writer = filestore._Writer()
    spool = SpoolFile(tmp_path / "late.part", writer)
    writer.stop()
    assert not any(t.name == "dicomgate-writer" for t in threading.enumerate())
    data = b"q" * (filestore.MEMORY_COPY_MAX + 10)
    spool.write(data)
    spool.drain()
    assert (tmp_path / "late.part").read_bytes() == data
    assert spool.sha256 == hashlib.sha256(data).hexdigest()
    spool.discard()


def _gated_spool(release: threading.Event) -> type[SpoolFile]:
    """A SpoolFile whose writes of b"a..." chunks wait for ``release``."""

    class GatedSpool(SpoolFile):
        def _apply(self, data: bytes | memoryview | None) -> None:
            if data is not None and bytes(data[:1]) == b"a":
                release.wait(10)
            super()._apply(data)

    return GatedSpool


def _wait_stopping(writer: filestore._Writer) -> None:
    deadline = time.monotonic() + 5
    while not writer._stopping:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_write_made_while_the_writer_stops_comes_after_the_queued_ones(tmp_path: Path) -> None:
    """The gateway stops while a large STOW-RS part still arrives: the writer thread
    finishes what is queued, and a later write to the same file waits for those writes
    before it is made, so the file's bytes stay in the order they arrived."""
    release = threading.Event()
    writer = filestore._Writer()
    try:
        spool = _gated_spool(release)(tmp_path / "order.part", writer)
        first = b"a" * (filestore.MEMORY_COPY_MAX + 1)
        second, third = b"b" * 100, b"c" * 100
        spool.write(first)  # the writer holds it
        spool.write(second)  # queued behind it
        stopper = threading.Thread(target=writer.stop)
        stopper.start()
        _wait_stopping(writer)
        done = threading.Event()

        def write_late() -> None:
            spool.write(third)
            done.set()

        late = threading.Thread(target=write_late)
        late.start()
        assert not done.wait(0.3)  # waits for first and second
        release.set()
        assert done.wait(5)
        late.join()
        stopper.join(10)
        spool.drain()
        assert (tmp_path / "order.part").read_bytes() == first + second + third
        assert spool.sha256 == hashlib.sha256(first + second + third).hexdigest()
        spool.discard()
    finally:
        release.set()
        writer.stop()


def test_a_write_waiting_for_room_when_the_writer_stops_is_still_made(tmp_path: Path) -> None:
    """A write held back by the limit when the writer stops is made (not queued for a
    thread that has exited, which would leave the file's drain waiting forever)."""
    release = threading.Event()
    writer = filestore._Writer(max_pending=filestore.MEMORY_COPY_MAX * 2)
    try:
        spool = _gated_spool(release)(tmp_path / "room.part", writer)
        first = b"a" * (filestore.MEMORY_COPY_MAX + 1)
        second = b"b" * (filestore.MEMORY_COPY_MAX + 1)
        spool.write(first)  # the writer holds it
        done = threading.Event()

        def write_second() -> None:
            spool.write(second)
            done.set()

        waiting = threading.Thread(target=write_second)
        waiting.start()
        assert not done.wait(0.3)  # no room: 2 x (MAX + 1) > max_pending
        stopper = threading.Thread(target=writer.stop)
        stopper.start()
        _wait_stopping(writer)
        release.set()
        assert done.wait(5)
        waiting.join()
        stopper.join(10)
        drained = threading.Thread(target=spool.drain, daemon=True)
        drained.start()
        drained.join(5)
        assert not drained.is_alive()
        assert (tmp_path / "room.part").read_bytes() == first + second
        spool.discard()
    finally:
        release.set()
        writer.stop()


def test_relay_header_leaves_out_only_the_arrival_context() -> None:
    """A stored file's meta as a relay sends it: (0002,0100) and (0002,0102) gone, the group
    length fixed, every other element as it was; a file without them, or not ours, as is."""
    import io

    from dicomgate.store.part10 import arrival_json, relay_header

    data = b"\x08\x00\x16\x00UI\x02\x001\x00"  # one element: the data set follows the meta
    context = arrival_json("MODALITY", "DICOMGATE", "10.1.2.3", "dimse", "")
    stored = encode_file_meta(CT_STORAGE, SOP, ExplicitVRLittleEndian, "MODAE", context) + data
    header, offset = relay_header(io.BytesIO(stored))
    assert stored[offset:] == data
    sent = pydicom.dcmread(io.BytesIO(header + data), stop_before_pixels=True)
    assert 0x00020102 not in sent.file_meta and 0x00020100 not in sent.file_meta
    assert sent.file_meta.MediaStorageSOPInstanceUID == SOP
    assert sent.file_meta.SourceApplicationEntityTitle == "MODAE"
    assert b"10.1.2.3" not in header
    plain = encode_file_meta(CT_STORAGE, SOP, ExplicitVRLittleEndian) + data
    assert relay_header(io.BytesIO(plain)) == (b"", 0)
    assert relay_header(io.BytesIO(data)) == (b"", 0)  # no preamble: sent as it is
    assert relay_header(io.BytesIO(stored[:200])) == (b"", 0)  # meta cut short
