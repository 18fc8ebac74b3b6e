"""Operations a PACS administrator relies on: full disk, JSON logs without PHI, PostgreSQL,
recovery of index rows lost to an unclean stop."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import (
    DICOMGATE,
    Corpus,
    GatewayProcess,
    needs_dcmtk,
    sop_uid_of,
    sqlite_only,
    wait_until,
)
from tests.integration.test_stow import multipart

pytestmark = needs_dcmtk


def test_store_below_min_free_bytes_refuses_with_a700_and_stores_nothing(
    gateway: Callable[..., GatewayProcess], corpus: Corpus
) -> None:
    files = corpus.mr("ops-full", 3, seed=301)
    gw = gateway({"storage": {"min_free_bytes": 10**18}})
    out = gw.storescu(files, "-v")
    assert out.returncode != 0
    assert "refused:outofresources" in out.stdout.lower().replace(" ", ""), out.stdout
    assert gw.index.count_instances() == 0
    assert not list((gw.data / "store").rglob("*.dcm"))
    assert gw.log_count("instance.refused") >= 1
    assert "below storage.min_free_bytes" in gw.log_text()
    # still serving
    assert gw.echoscu().returncode == 0


def test_json_logs_carry_event_names_and_no_patient_identifiers(
    gateway: Callable[..., GatewayProcess], corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("ops-json", 4, seed=302)
    gw = gateway({"logging": {"format": "json", "level": "DEBUG"}})
    assert gw.storescu(files).returncode == 0
    gw.echoscu("-aec", "WRONG")  # a rejection line too
    gw.terminate()
    lines = [line for line in gw.log_text().splitlines() if line.strip()]
    events = set()
    for line in lines:
        doc = json.loads(line)  # every line is one JSON object
        events.add(doc["event"])
    assert {"association.accepted", "instance.stored", "association.rejected"} <= events
    text = gw.log_text()
    import pydicom

    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    for phi in (str(ds.PatientName), str(ds.PatientID), str(ds.SOPInstanceUID)):
        assert phi and phi not in text, f"{phi!r} leaked into the log"


@pytest.mark.postgres
def test_gateway_on_postgresql_stores_and_indexes(
    gateway: Callable[..., GatewayProcess], corpus: Corpus, database_url: str
) -> None:
    files = corpus.mr("ops-pg", 20, seed=303)
    gw = gateway({"database": {"url": database_url}})
    ready = gw.http_get("/readyz")
    assert ready[0] == 200, ready
    out = gw.storescu(files)
    assert out.returncode == 0, out.stdout
    assert gw.index.count_instances() == 20
    row = gw.index.instance(sop_uid_of(files[0]))
    assert row is not None
    assert gw.stored_path(row).is_file()


@sqlite_only(
    "rows lost to SQLite's relaxed commits (synchronous=NORMAL) and the recovery scan that"
    " re-indexes them; PostgreSQL commits synchronously and skips the scan"
)
def test_unclean_stop_reindexes_lost_rows_and_quarantines_torn_files(
    gateway: Callable[..., GatewayProcess], corpus: Corpus
) -> None:
    """What a power cut can do with relaxed SQLite commits, reproduced by hand: rows that
    were not yet synced are gone, and a never-acknowledged file is torn. Restart repairs."""
    files = corpus.mr("ops-recover", 10, seed=304)
    gw = gateway()
    assert gw.storescu(files).returncode == 0
    gw.close_index()
    gw.kill9()  # leaves the run marker: the next start knows the stop was unclean
    assert (gw.node_dir / ".dicomgate-running").exists()
    db = gw.data / "index.db"
    lost = [sop_uid_of(f) for f in files[:3]]
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT sop_instance_uid, relpath FROM instance WHERE sop_instance_uid IN (?,?,?,?)",
            [*lost, sop_uid_of(files[3])],
        ).fetchall()
        torn_relpath = next(r for s, r in rows if s == sop_uid_of(files[3]))
        con.execute(
            "DELETE FROM instance WHERE sop_instance_uid IN (?,?,?,?)",
            [*lost, sop_uid_of(files[3])],
        )
    torn = gw.data / torn_relpath
    size = torn.stat().st_size
    with open(torn, "r+b") as fh:
        fh.truncate(size - 100)
    gw.restart()
    assert gw.log_count("recovery.done") == 1
    for sop in lost:
        row = gw.index.instance(sop)
        assert row is not None, "lost row was not re-indexed"
        assert row["received_via"] == "recovery"
    assert gw.index.instance(sop_uid_of(files[3])) is None
    assert not torn.exists()
    quarantined = list((gw.data / "quarantine").iterdir())
    assert len(quarantined) == 1
    assert gw.index.count_instances() == 9
    # a clean stop removes the marker: the next start does not recover again
    assert gw.terminate() == 0
    assert not (gw.node_dir / ".dicomgate-running").exists()
    assert os.listdir(gw.spool) == [] or all(
        (gw.spool / name).stat().st_size == 0 for name in os.listdir(gw.spool)
    )


def test_a_second_gateway_on_the_same_store_is_refused_before_touching_it(
    gateway: Callable[..., GatewayProcess], corpus: Corpus
) -> None:
    """An administrator starts ``dicomgate serve`` by hand beside the running service (other
    ports, same storage.path and index). It must stop at once: before the store lock it
    removed the running gateway's half-received spool files (an upload in flight failed),
    and with free ports it served the same SQLite index and store beside the first."""
    (source,) = corpus.mr("ops-twin", 1, seed=311)
    first = gateway()
    body = multipart([source.read_bytes()])
    half = len(body) // 2
    spool = first.node_dir / "spool"
    with socket.create_connection(("127.0.0.1", first.http_port), timeout=30) as upload:
        upload.sendall(
            b"POST /dicomweb/studies HTTP/1.1\r\nHost: gw\r\nAccept: application/dicom+json\r\n"
            b'Content-Type: multipart/related; type="application/dicom"; '
            b"boundary=dicomgate-test-boundary\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:half]
        )
        wait_until(lambda: any(spool.iterdir()), 10, "the upload's spool file")
        second = gateway(
            {"storage": first.config["storage"], "database": first.config["database"]},
            start=False,
        )
        result = subprocess.run(
            [DICOMGATE, "serve", "--config", str(second.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1, result.stderr
        assert "is in use by another dicomgate process" in result.stderr
        assert f"pid {first.pid}" in result.stderr
        assert any(spool.iterdir()), "the running gateway's spool file was removed"
        assert (first.node_dir / ".dicomgate-running").exists()
        upload.sendall(body[half:])
        answer = upload.makefile("rb").readline()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert first.index.count_instances() == 1
    assert first.echoscu().returncode == 0
