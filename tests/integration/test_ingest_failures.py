"""The store's file system refusing what the committer does around a commit: a removal
that fails, a folder that cannot be written, and a crash between an overwrite's commit and
the removal of the version it replaced. Never a committed file deleted, never the
committer gone, never an old version back as current.

The failures are made with ``chattr +i`` (an immutable file or folder refuses unlink,
rename and create with EPERM, root included), on the ext4 the tests' temporary folders
live on.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pydicom
import pytest
from tests.conftest import Corpus, GatewayProcess, needs_dcmtk, sop_uid_of
from tests.integration.test_stow import multipart, post, referenced

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]


@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """``chattr +i`` on ``paths`` for the block; skips the test where the file system has
    no such attribute (tmpfs) or the test is not root."""
    done: list[Path] = []
    try:
        for path in paths:
            result = subprocess.run(
                ["chattr", "+i", str(path)], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                # Only a file system without the attribute (tmpfs) skips; anything else
                # (a wrong path) fails.
                assert "not supported" in result.stderr.lower(), result.stderr
                pytest.skip(f"chattr +i not supported here: {result.stderr.strip()}")
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run(["chattr", "-i", str(path)], check=False)


def _version_two(source: Path, folder: Path) -> Path:
    """The same instance (same UIDs) with other content: a corrected resend."""
    ds = pydicom.dcmread(source)
    ds.ImageComments = "version two"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / source.name
    ds.save_as(out)
    return out


def test_a_replaced_file_that_cannot_be_removed_loses_nothing_committed(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    """Overwrite: the removal of the replaced version failed after the commit. The last-
    resort handler then "discarded" every job of the batch, and after the rename a job's
    spool path is its store file: an acknowledged instance lost its file (WADO-RS 500)."""
    gw = gateway({"storage": {"duplicates": "overwrite"}})
    a, b = corpus.mr("replace-fails", 2, seed=511)
    assert gw.storescu([b]).returncode == 0
    row = gw.index.instance(sop_uid_of(b))
    assert row is not None
    old = gw.stored_path(row)
    b2 = _version_two(b, tmp_path / "v2")
    with immutable(old):
        response = post(gw, multipart([a.read_bytes(), b2.read_bytes()]))
    assert response.status_code == 200, response.text
    assert sorted(referenced(response.json())) == sorted([sop_uid_of(a), sop_uid_of(b)])
    for path in (a, b):
        current = gw.index.instance(sop_uid_of(path))
        assert current is not None
        assert gw.stored_path(current).is_file(), "a committed row names a missing file"
    assert pydicom.dcmread(gw.stored_path(gw.index.instance(sop_uid_of(b)) or {})).ImageComments
    assert old.is_file()  # left, and said so
    gw.wait_log("store.remove_failed")
    study = pydicom.dcmread(a).StudyInstanceUID
    retrieved = httpx.get(gw.url(f"/dicomweb/studies/{study}"), timeout=30)
    assert retrieved.status_code == 200, retrieved.text[:300]


def test_a_store_that_refuses_writes_gets_refusals_and_the_gateway_recovers(
    gateway: Gateway, corpus: Corpus
) -> None:
    """The spool and store folders refuse changes (read-only, as a file system remounted
    read-only after an error): the instance is refused with a status, the gateway keeps
    answering, and stores again once the folders are writable. The failed clean-up of the
    refused spool file used to raise inside the refusal and end the committer thread:
    every later C-STORE went unanswered while /readyz said ready."""
    gw = gateway()
    assert gw.storescu(corpus.mr("ro-first", 1, seed=521)).returncode == 0
    second = corpus.mr("ro-second", 1, seed=522)  # another study: a new store folder
    # The spool is per node on PostgreSQL (storage.path/nodes/<name>/spool).
    (spool,) = [p for p in gw.data.rglob("spool") if p.is_dir()]
    with immutable(spool, gw.data / "store"):
        out = gw.storescu(second, "-v", "-td", "15")
        assert "Received Store Response (Refused: OutOfResources)" in out.stdout, out.stdout
        assert gw.echoscu().returncode == 0
    again = gw.storescu(second, "-td", "15")
    assert again.returncode == 0, again.stdout
    assert gw.index.instance(sop_uid_of(second[0])) is not None
    status, body = gw.http_get("/readyz")
    assert status == 200, body


def test_recovery_keeps_the_newer_version_an_overwrite_committed(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    """kill -9 after an overwrite's commit, before the replaced file was removed: the next
    start found that file without a row and indexed it under ``overwrite``, so the old
    version became current again (its replacement's file removed), and the start itself
    failed on the file it had just removed. Made on purpose: the old file put back."""
    gw = gateway({"storage": {"duplicates": "overwrite", "recovery_grace": 1}})
    (b,) = corpus.mr("recovery-overwrite", 1, seed=531)
    assert gw.storescu([b]).returncode == 0
    row = gw.index.instance(sop_uid_of(b))
    assert row is not None
    old = gw.stored_path(row)
    kept = tmp_path / "old-version.dcm"
    shutil.copy2(old, kept)  # its modification time too
    assert gw.storescu([_version_two(b, tmp_path / "v2")]).returncode == 0
    assert not old.exists()
    gw.kill9()
    shutil.copy2(kept, old)  # as the crash left it
    gw.restart()
    gw.wait_log("recovery.done", timeout=30)
    assert gw.running()
    rows = gw.index.instances(sop_uid_of(b))
    current = [r for r in rows if r["is_current"]]
    assert len(current) == 1
    newer = pydicom.dcmread(gw.stored_path(current[0]))
    assert newer.ImageComments == "version two"
    assert not old.exists()
    assert gw.log_count("recovery.replaced_removed") == 1
