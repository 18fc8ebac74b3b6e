"""Run marker and the choice of store files to re-check after an unclean stop."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dicomgate.errors import InvalidInstance
from dicomgate.recovery import MARGIN_SECONDS, MARKER_NAME, RunMarker, candidate_files, recover

NOW = time.time()
OLD = NOW - 10_000
SINCE = NOW - 1_000


# -- RunMarker -----------------------------------------------------------------------------


def test_no_marker_means_clean_stop(tmp_path: Path) -> None:
    assert RunMarker(tmp_path).previous_durable_until() is None


def test_write_then_read(tmp_path: Path) -> None:
    marker = RunMarker(tmp_path)
    marker.write(1_700_000_000.25)
    assert marker.path == tmp_path / MARKER_NAME
    assert marker.previous_durable_until() == 1_700_000_000.25
    doc = json.loads(marker.path.read_text(encoding="utf-8"))
    assert doc["pid"] == os.getpid()


def test_write_replaces_previous_value_and_leaves_no_temp_files(tmp_path: Path) -> None:
    marker = RunMarker(tmp_path)
    marker.write(1.0)
    marker.write(2.0)
    assert marker.previous_durable_until() == 2.0
    assert [p.name for p in tmp_path.iterdir()] == [MARKER_NAME]


def test_remove(tmp_path: Path) -> None:
    marker = RunMarker(tmp_path)
    marker.write(5.0)
    marker.remove()
    assert not marker.path.exists()
    assert marker.previous_durable_until() is None
    marker.remove()  # idempotent


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"{}",
        b"null",
        b"[]",
        b'{"durable_until": "soon"}',
        b'{"durable_until": null}',
        b"\xff\xfe\x00garbage",
    ],
)
def test_unreadable_marker_means_check_everything(tmp_path: Path, content: bytes) -> None:
    (tmp_path / MARKER_NAME).write_bytes(content)
    assert RunMarker(tmp_path).previous_durable_until() == 0.0


# -- candidate_files -----------------------------------------------------------------------


def _file(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def _age_folder(path: Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime))


def test_missing_store_folder(tmp_path: Path) -> None:
    assert candidate_files(tmp_path / "absent", SINCE) == []


def test_candidate_files_picks_recent_files_only(tmp_path: Path) -> None:
    store = tmp_path / "store"
    old_in_new_series = _file(store / "st1" / "se1" / "old.dcm", OLD)
    new_in_new_series = _file(store / "st1" / "se1" / "new.dcm", NOW)
    exact = _file(store / "st1" / "se1" / "exact.dcm", SINCE)
    new_in_old_series = _file(store / "st1" / "se2" / "hidden.dcm", NOW)
    _file(store / "st2" / "se3" / "a.dcm", OLD)
    _age_folder(store / "st1" / "se1", NOW)
    # A series folder older than `since`: no rename into it happened since, skip it whole.
    _age_folder(store / "st1" / "se2", OLD)
    _age_folder(store / "st2" / "se3", OLD)
    # Study folders are not used for the decision: a new file in an existing series
    # leaves the study folder's mtime alone.
    _age_folder(store / "st1", OLD)
    _age_folder(store / "st2", OLD)

    found = set(candidate_files(store, SINCE))
    assert found == {new_in_new_series, exact}
    assert old_in_new_series not in found
    assert new_in_old_series not in found


def test_candidate_files_ignores_stray_entries(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _file(store / "stray.dcm", NOW)  # a file at study level
    _file(store / "st" / "stray.dcm", NOW)  # a file at series level
    wanted = _file(store / "st" / "se" / "a.dcm", NOW)
    (store / "st" / "se" / "subfolder").mkdir()
    os.symlink(wanted, store / "st" / "se" / "link.dcm")
    assert candidate_files(store, SINCE) == [wanted]


def test_candidate_files_everything_since_zero(tmp_path: Path) -> None:
    store = tmp_path / "store"
    files = {_file(store / "s" / f"e{i}" / f"{i}.dcm", OLD) for i in range(3)}
    for i in range(3):
        _age_folder(store / "s" / f"e{i}", OLD)
    assert set(candidate_files(store, 0.0)) == files


# -- recover -------------------------------------------------------------------------------


def test_recover_indexes_and_quarantines(tmp_path: Path) -> None:
    store = tmp_path / "store"
    good = _file(store / "st" / "se" / "good.dcm", NOW)
    known = _file(store / "st" / "se" / "known.dcm", NOW)
    torn = _file(store / "st" / "se" / "torn.dcm", NOW)
    ancient = _file(store / "st" / "old" / "ancient.dcm", OLD)
    _age_folder(store / "st" / "old", OLD)

    seen: list[Path] = []

    def adopt(path: Path) -> bool:
        seen.append(path)
        if path == torn:
            raise InvalidInstance("truncated")
        return path == good

    report = recover(tmp_path, NOW - 10, adopt)
    assert (report.checked, report.indexed, report.quarantined) == (3, 1, 1)
    assert set(seen) == {good, known, torn}
    assert good.exists() and known.exists() and ancient.exists()
    assert not torn.exists()
    (moved,) = (tmp_path / "quarantine").iterdir()
    assert moved.name.endswith("-torn.dcm")


def test_recover_applies_margin(tmp_path: Path) -> None:
    store = tmp_path / "store"
    just_before = _file(store / "st" / "se" / "a.dcm", NOW - MARGIN_SECONDS / 2)
    report = recover(tmp_path, NOW, lambda path: path == just_before)
    assert report.indexed == 1
