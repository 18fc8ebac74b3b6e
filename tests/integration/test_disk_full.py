"""A store that really runs out of space: the file system answers ENOSPC (a small tmpfs
mounted for the test), not the ``storage.min_free_bytes`` guard. What failed is refused
with a clear status and leaves nothing behind; what fitted is stored; the gateway keeps
serving, and stores again once there is room."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import Corpus, GatewayProcess, needs_dcmtk, sop_uid_of
from tests.integration.test_stow import (
    dataset_bytes,
    failed_reasons,
    multipart,
    post,
    referenced,
)

pytestmark = needs_dcmtk

Gateway = Callable[..., GatewayProcess]
OUT_OF_RESOURCES = 0xA700
STORE_SIZE = 800 << 10  # one 514 KB CT instance fits, a second does not


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of STORE_SIZE bytes for ``storage.path`` (mounting needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for a full store needs root")
    mount = tmp_path / "small-store"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={STORE_SIZE}", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def full_gateway(gateway: Gateway, small_store: Path, tmp_path: Path) -> GatewayProcess:
    index = tmp_path / "index"
    index.mkdir()
    return gateway(
        {
            # The guard off, as when the disk fills faster than the once-a-second check,
            # or another program fills it: the writes themselves fail.
            "storage": {"path": str(small_store), "min_free_bytes": 0},
            "database": {"url": f"sqlite:///{index}/index.db"},
        }
    )


def _stored_files(gw: GatewayProcess) -> list[Path]:
    return sorted((gw.data / "store").rglob("*.dcm"))


def _spool_bytes(gw: GatewayProcess) -> int:
    return sum(p.stat().st_size for p in (gw.data / "spool").iterdir())


def test_stow_request_past_the_free_space_stores_what_fits_and_fails_the_rest(
    full_gateway: GatewayProcess, corpus: Corpus
) -> None:
    """Two CT parts where one fits: the first is stored, the second fails with 0xA700
    (HTTP 202); a third CT alone fails (503 Busy, Retry-After); a small instance still fits
    (200)."""
    gw = full_gateway
    ct = corpus.ct("full-ct", 3, seed=701)
    uids = [sop_uid_of(f) for f in ct]
    r = post(gw, multipart([f.read_bytes() for f in ct[:2]]), accept="application/dicom+json")
    assert r.status_code == 202, r.text
    assert referenced(r.json()) == uids[:1]
    assert failed_reasons(r.json()) == {uids[1]: OUT_OF_RESOURCES}
    # Exactly what was answered as stored is indexed and on disk.
    assert gw.index.count_instances() == 1
    (only,) = _stored_files(gw)
    assert dataset_bytes(only) == dataset_bytes(ct[0])
    assert _spool_bytes(gw) == 0  # the failed part's bytes are gone, not left to fill it
    r = post(gw, multipart([ct[2].read_bytes()]), accept="application/dicom+json")
    assert r.status_code == 503 and r.headers["retry-after"] == "10", r.text
    assert failed_reasons(r.json()) == {uids[2]: OUT_OF_RESOURCES}
    assert gw.log_count("instance.refused") == 2
    # Still serving: a small instance fits in what is left, and is stored.
    mr = corpus.mr("full-mr", 1, seed=702)
    r = post(gw, multipart([mr[0].read_bytes()]), accept="application/dicom+json")
    assert r.status_code == 200, r.text
    assert gw.index.count_instances() == 2
    assert _spool_bytes(gw) == 0


def test_stow_request_that_cannot_stage_a_part_is_refused_whole_with_507(
    full_gateway: GatewayProcess, corpus: Corpus
) -> None:
    """A part whose first bytes cannot even be written while the request is read: the
    request is answered 507 with a JSON error and nothing of it is kept (the sender retries
    it whole)."""
    gw = full_gateway
    ct = corpus.ct("full-ct-staged", 4, seed=705)
    r = post(gw, multipart([f.read_bytes() for f in ct]), accept="application/dicom+json")
    assert r.status_code in (202, 507), r.text
    if r.status_code == 507:
        assert r.json() == {"error": "no space left in the store"}
        assert gw.index.count_instances() == 0
        assert _stored_files(gw) == []
    else:  # the writes lagged the reads: every part was staged, the late ones failed
        assert len(referenced(r.json())) == 1
        assert set(failed_reasons(r.json()).values()) == {OUT_OF_RESOURCES}
        assert gw.index.count_instances() == 1
    assert _spool_bytes(gw) == 0
    mr = corpus.mr("full-mr-staged", 1, seed=706)
    assert post(gw, multipart([mr[0].read_bytes()])).status_code == 200


def test_c_store_past_the_free_space_is_refused_with_a700_and_the_next_one_stored(
    full_gateway: GatewayProcess, corpus: Corpus
) -> None:
    gw = full_gateway
    ct = corpus.ct("full-ct-dimse", 2, seed=703)
    out = gw.storescu(ct, "-v")
    assert out.returncode != 0
    assert "refused:outofresources" in out.stdout.lower().replace(" ", ""), out.stdout
    assert gw.index.count_instances() == 1
    (only,) = _stored_files(gw)
    assert dataset_bytes(only) == dataset_bytes(ct[0])
    assert _spool_bytes(gw) == 0
    assert gw.echoscu().returncode == 0
    mr = corpus.mr("full-mr-dimse", 2, seed=704)
    assert gw.storescu(mr).returncode == 0
    assert gw.index.count_instances() == 3


def test_index_on_the_full_disk_refuses_with_a700_and_keeps_index_and_store_in_step(
    gateway: Gateway, small_store: Path, corpus: Corpus
) -> None:
    """The default layout, the SQLite index beside the store on the disk that fills: an
    instance whose file fitted but whose index row did not ("database or disk is full") is
    refused with 0xA700 and its file removed. Whatever the exact split, every success
    storescu saw is one index row and one stored file, and nothing else is left."""
    gw = gateway(
        {
            "storage": {"path": str(small_store), "min_free_bytes": 0},
            "database": {"url": f"sqlite:///{small_store}/index.db"},
        }
    )
    ct = corpus.ct("full-ct-index", 2, seed=707)
    out = gw.storescu(ct, "-v", "--no-halt")
    answers = [
        line.split("(", 1)[1].rstrip(")").replace(" ", "").lower()
        for line in out.stdout.splitlines()
        if "Received Store Response" in line
    ]
    assert len(answers) == 2, out.stdout
    assert "refused:outofresources" in answers, out.stdout
    assert set(answers) <= {"success", "refused:outofresources"}, out.stdout
    stored = answers.count("success")
    assert gw.index.count_instances() == stored
    assert len(_stored_files(gw)) == stored
    assert _spool_bytes(gw) == 0
    assert gw.echoscu().returncode == 0
    assert gw.log_count("ingest.commit_failed") + gw.log_count("instance.refused") >= 1


def test_readyz_says_not_ready_while_the_store_is_below_min_free_bytes(
    gateway: Gateway, small_store: Path, tmp_path: Path, corpus: Corpus
) -> None:
    # A node that refuses every instance (0xA700, 507) must leave a load balancer's pool:
    # /readyz said ready, "store": "ok", while the guard refused everything (os.access is
    # true for root on a full disk).
    index = tmp_path / "index"
    index.mkdir()
    guard = 600 << 10
    gw = gateway(
        {
            "storage": {"path": str(small_store), "min_free_bytes": guard},
            "database": {"url": f"sqlite:///{index}/index.db"},
        }
    )
    status, body = gw.http_get("/readyz")
    assert status == 200 and body["checks"]["store"] == "ok", body
    filler = small_store / "filler"
    filler.write_bytes(b"\0" * (os.statvfs(small_store).f_bavail * 4096 - (400 << 10)))
    try:
        out = gw.storescu(corpus.mr("guard-mr", 1, seed=705), "-v")
        assert "refused:outofresources" in out.stdout.lower().replace(" ", ""), out.stdout
        status, body = gw.http_get("/readyz")
        assert status == 503 and "store" in body["failing"], body
        assert body["checks"]["store"].startswith("failed: full:"), body
        assert "storage.min_free_bytes" in body["checks"]["store"]
    finally:
        filler.unlink()
    status, body = gw.http_get("/readyz")
    assert status == 200 and body["checks"]["store"] == "ok", body
    time.sleep(1.1)  # the ingest's own check keeps its answer for a second
    assert gw.storescu(corpus.mr("guard-mr-2", 1, seed=706)).returncode == 0
