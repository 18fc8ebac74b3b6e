"""The retrieve cache of the DICOMweb -> DIMSE bridge, and QIDO -> C-FIND identifiers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomgate.bridge.cache import CacheEntry, RetrieveCache
from dicomgate.bridge.dimse_upstream import UpstreamFailed, find_identifier
from dicomgate.dicomweb.catalog import StoredRef
from dicomgate.index.query import Level, QueryOptions


def _ref(entry: CacheEntry, series: str, sop: str, size: int = 100) -> StoredRef:
    path = entry.folder / f"{sop}.dcm"
    path.write_bytes(b"x" * size)
    return StoredRef(
        "1.2", series, sop, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
        f"{entry.relfolder}/{sop}.dcm", size, 64, 64, None,
    )  # fmt: skip


def _cache(tmp_path: Path, seconds: float = 60, max_bytes: int = 1 << 20) -> RetrieveCache:
    return RetrieveCache(tmp_path / "cache", "cache", seconds, max_bytes, wait_seconds=5, linger=0)


def test_readers_get_instances_while_they_arrive(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    release = threading.Event()

    def fetch(entry: CacheEntry, add: Callable[[StoredRef], None]) -> None:
        add(_ref(entry, "1.2.3", "1.2.3.1"))
        assert release.wait(5)
        add(_ref(entry, "1.2.3", "1.2.3.2"))

    lease = cache.open(("1.2", None, None), fetch)
    refs = lease.iterate()
    assert next(refs).sop_instance_uid == "1.2.3.1"  # before the second one exists
    release.set()
    assert [r.sop_instance_uid for r in refs] == ["1.2.3.2"]
    lease.close()
    # The study's completed entry answers a series and an instance of it: no new fetch.
    for key in (("1.2", "1.2.3", None), ("1.2", "1.2.3", "1.2.3.2")):
        lease = cache.open(key, fetch)
        assert [r.sop_instance_uid for r in lease] == (
            ["1.2.3.1", "1.2.3.2"] if key[2] is None else ["1.2.3.2"]
        )
        lease.close()
    assert cache.fetches == 1


def test_failures_are_not_cached_and_expired_entries_are_deleted(tmp_path: Path) -> None:
    cache = _cache(tmp_path, seconds=0.2)
    calls = []

    def failing(entry: CacheEntry, add: Callable[[StoredRef], None]) -> None:
        calls.append(1)
        raise UpstreamFailed("connection refused")

    for _ in range(2):
        lease = cache.open(("1.2", None, None), failing)
        with pytest.raises(UpstreamFailed, match="refused"):
            list(lease)
        lease.close()
    assert len(calls) == 2

    def fetch(entry: CacheEntry, add: Callable[[StoredRef], None]) -> None:
        add(_ref(entry, "1.2.3", "1.2.3.1"))

    lease = cache.open(("1.2", None, None), fetch)
    folder = lease.entry.folder
    assert len(list(lease)) == 1
    lease.close()
    time.sleep(0.3)
    cache.purge()
    deadline = time.monotonic() + 5
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not folder.exists()
    assert cache.size == 0


def test_least_recently_used_entries_go_over_cache_bytes(tmp_path: Path) -> None:
    cache = _cache(tmp_path, max_bytes=250)

    def fetch(entry: CacheEntry, add: Callable[[StoredRef], None]) -> None:
        add(_ref(entry, "s" + entry.key[0], "i" + entry.key[0]))

    folders = []
    for study in ("1", "2", "3"):
        lease = cache.open((study, None, None), fetch)
        list(lease)
        lease.close()
        folders.append(lease.entry.folder)
    cache.purge()
    deadline = time.monotonic() + 5  # a fetch thread's purge may still be deleting
    while folders[0].exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [f.exists() for f in folders] == [False, True, True]
    assert cache.size == 200


def test_qido_keys_become_a_c_find_identifier() -> None:
    options = QueryOptions(include=["StudyDescription"], default_levels=(Level.STUDY,))
    keys = {"PatientName": "Doe*", "StudyDate": "20230101-20230110", "StudyInstanceUID": "1.2,1.3"}
    ds = find_identifier(Level.STUDY, keys, options)
    assert ds.QueryRetrieveLevel == "STUDY"
    assert ds.PatientName == "Doe*"
    assert ds.StudyDate == "20230101-20230110"
    assert list(ds.StudyInstanceUID) == ["1.2", "1.3"]
    assert "StudyDescription" in ds and not ds.StudyDescription
    assert "ModalitiesInStudy" in ds  # a PS3.18 default return key
    assert 0x00081190 not in ds  # RetrieveURL is ours
