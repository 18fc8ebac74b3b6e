"""``kill -9`` during a C-STORE stream loses nothing that was acknowledged (DESIGN rule 1).

storescu sends a stream of small MR instances; its ``-v`` output names every file before
sending it and prints the C-STORE-RSP status when it arrives, so it tells exactly which
instances the gateway acknowledged. The gateway is killed with SIGKILL mid-stream, then
restarted on the same data.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable

import pytest
from tests.conftest import (
    TEST_DB,
    Corpus,
    GatewayProcess,
    dcmtk_env,
    needs_dcmtk,
    sop_uid_of,
)

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]


def acknowledged(storescu_output: str) -> list[str]:
    """Files storescu received a success status for, in order."""
    acked: list[str] = []
    current: str | None = None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif "Received Store Response (Success)" in line:
            assert current is not None, storescu_output
            acked.append(current)
            current = None
    return acked


def test_kill9_mid_stream_loses_no_acknowledged_instance(gateway: Gateway, corpus: Corpus) -> None:
    files = corpus.mr("stream", 600, seed=3)[:300]
    gw = gateway()
    sender = subprocess.Popen(
        ["storescu", "-v", "-aec", gw.ae_title, "127.0.0.1", str(gw.dimse_port)]
        + [str(p) for p in files],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        gw.wait_log("instance.stored", 60, timeout=30)
        gw.kill9()
        out, _ = sender.communicate(timeout=30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert sender.returncode != 0, "storescu finished before the kill; the test proves nothing"
    acked = acknowledged(out)
    # The gateway logs "stored" just before the response leaves, so at the kill storescu may
    # have seen a few fewer successes than the log counted.
    assert 50 <= len(acked) < len(files), out[-2000:]

    # What the dead process left in the spool: its half-received instance(s) and its pool
    # of pre-created spool files.
    leftovers = {p.name for p in gw.spool.iterdir()}
    assert leftovers, "a killed gateway leaves spool files; none found"

    gw.restart()
    status, body = gw.http_get("/readyz")
    assert status == 200, body

    by_name = {str(p): p for p in files}
    for name in acked:
        sop = sop_uid_of(by_name[name])
        row = gw.index.instance(sop)
        assert row is not None, f"{name} was acknowledged but is not indexed"
        stored = gw.stored_path(row)
        assert stored.is_file(), stored
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["sha256"]
        assert stored.stat().st_size == row["size"]
    # Nothing half-received survives: the old spool files are gone (the new process keeps
    # a pool of pre-created, still empty spool files there) and the store holds no parts.
    spool_now = list(gw.spool.iterdir())
    assert not leftovers & {p.name for p in spool_now}
    assert [p.stat().st_size for p in spool_now] == [0] * len(spool_now)
    assert gw.log_count("store.spool_recovered") == 1
    assert f"removed {len(leftovers)} half-received spool files" in gw.log_text()
    assert list((gw.data / "store").rglob("*.part")) == []
    indexed = gw.index.count_instances(current_only=False)
    assert indexed >= len(acked)
    in_store = {sop_uid_of(p): p for p in (gw.data / "store").rglob("*.dcm")}
    orphans = {uid for uid in in_store if gw.index.instance(uid) is None}
    if TEST_DB == "sqlite":
        # The recovery scan indexed every file the lost rows named: no orphan is left.
        assert not orphans
    else:
        # PostgreSQL: no recovery scan (it would race other nodes' renames in a shared
        # store). A file renamed into the store whose commit the kill prevented stays
        # unindexed until the sender sends it again; it was never acknowledged.
        assert not orphans & {sop_uid_of(by_name[name]) for name in acked}
    assert len(in_store) == indexed + len(orphans)

    # And the restarted gateway takes the rest of the stream. The store never replaces a
    # file, so under PostgreSQL a resent orphan is stored beside it (<sop>.<sha>.dcm) and
    # the orphan stays on disk, known to no row (a leak of at most the batch in flight at
    # the kill; reported on issue #8).
    result = gw.storescu(files)
    assert result.returncode == 0, result.stdout[-2000:]
    assert gw.index.count_instances() == len(files)
    files_now = len(list((gw.data / "store").rglob("*.dcm")))
    assert files_now == gw.index.count_instances(current_only=False) + len(orphans)
