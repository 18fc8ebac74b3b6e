"""``kill -9`` during a C-STORE stream loses nothing that was acknowledged (DESIGN rule 1).

storescu sends a stream of small MR instances; its ``-v`` output names every file before
sending it and prints the C-STORE-RSP status when it arrives, so it tells exactly which
instances the gateway acknowledged. The gateway is killed with SIGKILL mid-stream, then
restarted on the same data.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataelem import DataElement
from tests.conftest import (
    TEST_DB,
    Corpus,
    GatewayProcess,
    SlowPacs,
    dcmtk_env,
    needs_dcmtk,
    sop_uid_of,
    wait_until,
)
from tests.integration.test_stow import dataset_bytes, multipart, post, referenced

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
    gw = gateway({"storage": {"recovery_grace": 1}})
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
    # The gateway logs "stored" lines after the answers (up to 64 behind, docs/architecture.md)
    # and storescu may not have read the last answers at the kill: the two counts differ a
    # little either way, hence the margin.
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
    if TEST_DB != "sqlite":
        # PostgreSQL: the scan for files moved into the store whose commit the kill
        # prevented runs storage.recovery_grace after start-up (not at once: in a shared
        # store it would race other nodes' commits in flight), among older files only.
        gw.wait_log("recovery.done", timeout=30)
    indexed = gw.index.count_instances(current_only=False)
    assert indexed >= len(acked)
    in_store = {sop_uid_of(p): p for p in (gw.data / "store").rglob("*.dcm")}
    # Every file in the store is indexed: the acknowledged ones had their rows, and the
    # recovery scan indexed the ones whose rows the kill lost or prevented.
    assert {uid for uid in in_store if gw.index.instance(uid) is None} == set()
    assert len(in_store) == indexed

    # And the restarted gateway takes the rest of the stream; every file has its row.
    result = gw.storescu(files)
    assert result.returncode == 0, result.stdout[-2000:]
    assert gw.index.count_instances() == len(files)
    files_now = len(list((gw.data / "store").rglob("*.dcm")))
    assert files_now == gw.index.count_instances(current_only=False)


def test_store_files_a_crash_left_without_rows_are_indexed_or_removed(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    """What a kill between "file moved into the store" and "row committed" leaves, made
    on purpose: a complete file in its store folder with no row, and a byte-identical
    second copy of an indexed instance. After the restart (on PostgreSQL: after
    storage.recovery_grace), the first is indexed and routed, the second removed."""
    share = tmp_path / "share"
    gw = gateway(
        {
            "storage": {"recovery_grace": 1},
            "destinations": {"share": {"type": "folder", "path": str(share)}},
            "routes": [{"name": "all", "to": ["share"]}],
        }
    )
    sent, lost = corpus.mr("recovery-adopt", 2, seed=31)
    assert gw.storescu([sent]).returncode == 0
    wait_until(lambda: len(list(share.rglob("*.dcm"))) == 1, 30, "the first delivery")
    row = gw.index.instance(sop_uid_of(sent))
    assert row is not None
    stored = gw.stored_path(row)
    copy = stored.with_name(stored.stem + ".0123456789abcdef.dcm")
    shutil.copyfile(stored, copy)  # as a resend stores beside an orphan
    lost_ds = pydicom.dcmread(lost, stop_before_pixels=True)
    orphan = gw.data / "store" / lost_ds.StudyInstanceUID / lost_ds.SeriesInstanceUID
    orphan.mkdir(parents=True, exist_ok=True)
    orphan = orphan / f"{lost_ds.SOPInstanceUID}.dcm"
    # Its file meta names a Source AE Title recovery records as the calling AE: one past
    # 16 characters and with a NUL, as a STOW-RS client may write, was refused by
    # PostgreSQL (too long for the column, NUL in text), so the file stayed unindexed.
    orphan_ds = pydicom.dcmread(lost)
    orphan_ds.file_meta[0x00020016] = DataElement(
        0x00020016, "AE", "A SENDER WITH\x00A LONG AE TITLE", validation_mode=0
    )
    orphan_ds.save_as(orphan)
    gw.kill9()
    gw.restart()
    gw.wait_log("recovery.done", timeout=30)
    assert gw.index.instance(sop_uid_of(lost)) is not None  # indexed ...
    wait_until(lambda: len(list(share.rglob("*.dcm"))) == 2, 30, "... and routed")
    assert not copy.exists()  # the identical copy is gone, the indexed file stays
    assert stored.is_file()
    assert len(gw.index.instances(sop_uid_of(sent))) == 1
    assert gw.log_count("recovery.duplicate_removed") == 1


def test_kill9_mid_stow_stream_loses_no_acknowledged_instance(
    gateway: Gateway, corpus: Corpus
) -> None:
    """The same over STOW-RS: one client posts requests back to back, alternately one small
    MR, ten small MRs, and two CT instances (~0.5 MB parts, which a thread writes behind
    the receipt); the gateway is killed mid-stream. Every instance an answer referenced
    is indexed after the restart, with its data set unchanged; nothing half-received is
    kept; every store file is indexed."""
    small = corpus.mr("stow-stream", 240, seed=41)
    ct = corpus.ct("stow-stream-ct", 40, seed=42)
    requests: list[list[Path]] = []
    for k in range(0, len(small), 11):
        requests += [small[k : k + 1], small[k + 1 : k + 11], ct[2 * k // 11 : 2 * k // 11 + 2]]
    requests = [r for r in requests if r]
    gw = gateway({"storage": {"recovery_grace": 1}})
    acked: list[Path] = []
    answers: list[int] = []
    stop = threading.Event()

    def client() -> None:
        for files in requests:
            if stop.is_set():
                return
            try:
                answer = post(gw, multipart([p.read_bytes() for p in files]))
            except httpx.HTTPError:
                return
            answers.append(answer.status_code)
            if answer.status_code in (200, 202):
                done = set(referenced(answer.json()))
                acked.extend(p for p in files if sop_uid_of(p) in done)

    sender = threading.Thread(target=client)
    sender.start()
    try:
        gw.wait_log("instance.stored", 80, timeout=60)
        gw.kill9()
    finally:
        stop.set()
        sender.join(60)
    assert not sender.is_alive()
    assert 60 <= len(acked) < sum(len(r) for r in requests), (len(acked), answers[-5:])
    assert set(answers) == {200}, answers
    assert any(p.stat().st_size > 100_000 for p in acked), "no CT was acknowledged"

    gw.restart()
    for path in acked:
        row = gw.index.instance(sop_uid_of(path))
        assert row is not None, f"{path.name} was acknowledged but is not indexed"
        stored = gw.stored_path(row)
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["sha256"]
        assert dataset_bytes(stored) == dataset_bytes(path), path.name
    assert list((gw.data / "store").rglob("*.part")) == []
    if TEST_DB != "sqlite":
        gw.wait_log("recovery.done", timeout=30)
    in_store = {sop_uid_of(p) for p in (gw.data / "store").rglob("*.dcm")}
    assert {uid for uid in in_store if gw.index.instance(uid) is None} == set()
    assert len(in_store) == gw.index.count_instances(current_only=False)


def test_a_restart_sends_the_previous_runs_leased_jobs_at_once(
    gateway: Gateway, corpus: Corpus, slow_pacs: SlowPacs
) -> None:
    """Jobs a killed process had leased (in flight to a slow PACS) are sent again as soon
    as the node is back, not after ``queue.lease_seconds`` (300 s by default)."""
    gw = gateway(
        {
            "storage": {"recovery_grace": 1},
            "destinations": {"slow": slow_pacs.destination},
            "routes": [{"name": "all", "to": ["slow"]}],
        }
    )
    files = corpus.mr("restart-leases", 4, seed=43)
    assert gw.storescu(files).returncode == 0
    gw.wait_log("egress.dimse_associated")  # leased, the first send under way
    gw.kill9()
    gw.restart()
    gw.wait_log("delivery.leases_released")

    def done() -> bool:
        status, body = gw.http_get("/api/queue?state=done")
        return status == 200 and body["counts"].get("slow") == {"done": 4}

    wait_until(done, 60, "every job done within a minute of the restart (lease: 300 s)")
    assert set(slow_pacs.received()) == {sop_uid_of(f) for f in files}
