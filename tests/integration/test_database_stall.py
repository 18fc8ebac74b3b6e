"""The index database stops answering without going away: it is still there, its
connections stay open, but nothing comes back in time.

Two ways, both seen in hospitals: another session holds a lock the gateway needs (a
maintenance script, a long migration by hand), and a network partition between the
gateway and its PostgreSQL server (packets dropped, no reset: :mod:`tests.partition`).
Before ``database.timeout`` each hung every store, query and health check: a modality's
association until the gateway's own idle timeout aborted it, ``/readyz`` and QIDO-RS until
the client gave up; after a one-minute partition the stuck connections kept the gateway
unusable for minutes more (TCP's retransmission backoff). What a PACS administrator
expects instead:

- a store is refused within about ``database.timeout`` with a status that says *retry
  later* (C-STORE 0xA700), and nothing refused is kept;
- readers answer 503; ``/readyz`` answers 503 within seconds and says why;
- once the lock is released or the network is back, everything works again at once.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pydicom
import pytest
from tests.conftest import Corpus, GatewayProcess, pg_cut_off, sop_uid_of, wait_until
from tests.partition import Partition

pytestmark = [pytest.mark.timeout(240)]

Gateway = Callable[..., GatewayProcess]
TIMEOUT = 4  # database.timeout of these gateways, in seconds


def _store_files(gw: GatewayProcess) -> list[Path]:
    return sorted(p for p in (gw.data / "store").rglob("*.dcm") if p.is_file())


def _readyz(gw: GatewayProcess) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    answer = httpx.get(gw.url("/readyz"), timeout=30)
    return answer.status_code, answer.json(), time.monotonic() - started


def _refused_within(gw: GatewayProcess, path: Path, seconds: float) -> None:
    started = time.monotonic()
    sent = gw.storescu([path], "-v")
    took = time.monotonic() - started
    assert "Received Store Response (Refused: OutOfResources)" in sent.stdout, sent.stdout
    assert took < seconds, f"refused after {took:.1f} s"


@pytest.fixture
def partition() -> Iterator[Partition]:
    cut = Partition()
    cut.start()
    yield cut
    cut.stop()


def test_a_lock_held_by_another_session(
    gateway: Gateway, own_database: tuple[str, str], corpus: Corpus
) -> None:
    name, url = own_database
    gw = gateway({"database": {"url": url, "timeout": TIMEOUT}})
    files = corpus.mr("db-stall-lock", 3, seed=941)
    assert gw.storescu(files[:1]).returncode == 0
    holder = psycopg.connect(f"host=127.0.0.1 user=postgres dbname={name}")
    try:
        holder.execute("LOCK TABLE instance IN ACCESS EXCLUSIVE MODE")
        sender = threading.Thread(target=_refused_within, args=(gw, files[1], TIMEOUT + 8))
        sender.start()
        # While the store waits, /readyz says so (SELECT 1 still answers), at once.
        looks: list[tuple[int, dict[str, Any], float]] = []
        wait_until(
            lambda: looks.append(_readyz(gw)) or looks[-1][0] == 503,
            TIMEOUT + 5,
            "/readyz to see the stall",
        )
        body = looks[-1][1]
        sender.join(30)
        assert not sender.is_alive()
        # The statement was cancelled by the server; the refused file was not kept.
        assert "statement timeout" in gw.log_text()
        assert len(_store_files(gw)) == 1
    finally:
        holder.rollback()
        holder.close()
    assert body["failing"] == ["ingest"], body
    assert body["checks"]["ingest"].startswith("failed: storing has waited"), body
    assert max(look[2] for look in looks) < 2, looks
    again = gw.storescu(files[1:])
    assert again.returncode == 0, again.stdout
    assert len(_store_files(gw)) == 3
    assert _readyz(gw)[0] == 200
    assert "Traceback" not in gw.log_text()


def test_a_network_partition(
    gateway: Gateway, own_database: tuple[str, str], corpus: Corpus, partition: Partition
) -> None:
    name, _ = own_database
    gw = gateway({"database": {"url": partition.url(name), "timeout": TIMEOUT}})
    files = corpus.mr("db-stall-partition", 4, seed=942)
    assert gw.storescu(files[:1]).returncode == 0
    study = httpx.get(gw.url("/dicomweb/studies"), timeout=10)
    assert study.status_code == 200 and len(study.json()) == 1
    partition.cut()
    try:
        # A store: the committer's connection is found dead, a new one cannot be made.
        _refused_within(gw, files[1], 3 * TIMEOUT + 10)
        started = time.monotonic()
        qido = httpx.get(gw.url("/dicomweb/studies"), timeout=60)
        assert qido.status_code == 503, qido.text
        assert "unavailable" in qido.json()["error"]
        assert time.monotonic() - started < 3 * TIMEOUT + 10
        status, body, took = _readyz(gw)
        assert status == 503 and "database" in body["failing"], body
        assert took < 7, took  # the probe's deadline (5 s), not the connection's
        assert len(_store_files(gw)) == 1
        assert gw.running()
    finally:
        partition.mend()
    # Back at once: no connection is left waiting out a retransmission backoff.
    started = time.monotonic()
    again = gw.storescu(files[1:])
    assert again.returncode == 0, again.stdout
    assert time.monotonic() - started < TIMEOUT + 10
    wait_until(lambda: _readyz(gw)[0] == 200, 15, "/readyz to be ready again")
    instances = httpx.get(gw.url("/dicomweb/instances"), timeout=10).json()
    assert {i["00080018"]["Value"][0] for i in instances} == {sop_uid_of(f) for f in files}
    assert len(_store_files(gw)) == 4
    assert "Traceback" not in gw.log_text()


def _admin(name: str) -> psycopg.Connection[Any]:
    return psycopg.connect(f"host=127.0.0.1 user=postgres dbname={name}", autocommit=True)


def _slow_commit(name: str, sop: str, seconds: float) -> None:
    """The COMMIT of the transaction that indexes ``sop`` takes ``seconds`` (a deferred
    constraint trigger sleeps), so the test can act while it runs."""
    with _admin(name) as admin:
        admin.execute(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" IF NEW.sop_instance_uid = '{sop}' THEN PERFORM pg_sleep({seconds}); END IF;"
            " RETURN NULL; END $$"
        )
        admin.execute(
            "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON instance"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
        )


def _committing(name: str) -> int | None:
    """The backend sleeping in that COMMIT, if one is."""
    with _admin(name) as admin:
        row = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event = 'PgSleep'",
            (name,),
        ).fetchone()
    return None if row is None else int(row[0])


def _rows_of(name: str, sop: str) -> int:
    with _admin(name) as admin:
        row = admin.execute(
            "SELECT count(*) FROM instance WHERE sop_instance_uid = %s", (sop,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def _store_with_a_slow_commit(
    gw: GatewayProcess, name: str, files: list[Path], seconds: float
) -> threading.Thread:
    """``files[0]`` stored; ``files[1]`` being sent (to be refused within 40 s) by the
    thread returned, once its COMMIT has begun to take ``seconds``."""
    assert gw.storescu(files[:1]).returncode == 0
    _slow_commit(name, sop_uid_of(files[1]), seconds)
    sender = threading.Thread(target=_refused_within, args=(gw, files[1], 40))
    sender.start()
    wait_until(lambda: _committing(name) is not None, 20, "the slow COMMIT")
    return sender


def test_a_commit_that_went_through_unseen_keeps_its_file(
    gateway: Gateway, own_database: tuple[str, str], corpus: Corpus, partition: Partition
) -> None:
    """The network goes while the server commits: the gateway cannot know the outcome and
    refuses the store (the sender sends again), but the server did commit. Its row must
    not name a missing file: before, the file was removed as for any refusal, so the
    index listed an instance that could not be retrieved (and with ``duplicates: reject``
    the sender's resend was refused as a duplicate: the image was lost)."""
    name, _ = own_database
    gw = gateway({"database": {"url": partition.url(name), "timeout": TIMEOUT}})
    files = corpus.mr("db-stall-unseen", 3, seed=943)
    target = sop_uid_of(files[1])
    sender = _store_with_a_slow_commit(gw, name, files, 3)
    try:
        partition.cut()
        sender.join(45)
        assert not sender.is_alive()
        assert gw.log_count("ingest.commit_uncertain") == 1
    finally:
        partition.mend()
    assert _rows_of(name, target) == 1  # the server did commit
    # The next store finds the index back and settles the outcome: the file stays.
    assert gw.storescu(files[2:]).returncode == 0
    gw.wait_log("ingest.commit_settled")
    assert "committed=True" in gw.log_text()
    ds = pydicom.dcmread(files[1], stop_before_pixels=True)
    path = (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{target}"
    )
    back = httpx.get(gw.url(path), headers={"Accept": "multipart/related; type=application/dicom"})
    assert back.status_code == 200, back.text[:300]
    start = back.content.index(b"DICM") - 128
    end = back.content.rindex(b"\r\n--")
    got = pydicom.dcmread(io.BytesIO(back.content[start:end]))
    assert got.SOPInstanceUID == target
    assert got.PixelData == pydicom.dcmread(files[1]).PixelData
    assert len(_store_files(gw)) == 3


def test_a_commit_that_was_rolled_back_unseen_keeps_nothing(
    gateway: Gateway, own_database: tuple[str, str], corpus: Corpus
) -> None:
    """The server is lost during the COMMIT and did not commit (its backend was ended):
    once the index answers, the refused file is removed, as any refused instance's."""
    name, url = own_database
    gw = gateway({"database": {"url": url, "timeout": 10}})
    files = corpus.mr("db-stall-rolled-back", 3, seed=944)
    target = sop_uid_of(files[1])
    sender = _store_with_a_slow_commit(gw, name, files, 5)
    pid = _committing(name)
    with _admin(name) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    sender.join(40)
    assert not sender.is_alive()
    assert gw.log_count("ingest.commit_uncertain") == 1
    assert _rows_of(name, target) == 0
    assert len(_store_files(gw)) == 2  # kept until the outcome is known
    assert gw.storescu(files[2:]).returncode == 0
    gw.wait_log("ingest.commit_settled")
    assert "committed=False" in gw.log_text()
    assert len(_store_files(gw)) == 2
    assert gw.storescu(files[1:2]).returncode == 0  # the sender's resend
    assert len(_store_files(gw)) == 3


def test_a_commit_still_unknown_at_stop_is_looked_at_by_the_next_start(
    gateway: Gateway, own_database: tuple[str, str], corpus: Corpus
) -> None:
    """The gateway stops before the index answers again: the file's fate is decided by the
    next start's recovery, which indexes it if no row names it (the sender was told to send
    again, so it is stored twice at worst, never lost)."""
    name, url = own_database
    gw = gateway({"database": {"url": url, "timeout": 10}, "storage": {"recovery_grace": 0.5}})
    files = corpus.mr("db-stall-unsettled", 2, seed=945)
    target = sop_uid_of(files[1])
    sender = _store_with_a_slow_commit(gw, name, files, 5)
    pg_cut_off(name, allow=False)  # ends the backend in its COMMIT; no new connection
    try:
        sender.join(40)
        assert not sender.is_alive()
        assert gw.log_count("ingest.commit_uncertain") == 1
        assert gw.terminate() == 0
        assert gw.log_count("ingest.commit_unsettled") == 1
    finally:
        pg_cut_off(name, allow=True)
    assert _rows_of(name, target) == 0
    assert len(_store_files(gw)) == 2
    gw.restart()
    wait_until(lambda: _rows_of(name, target) == 1, 20, "recovery to index the file")
    gw.wait_log("recovery.done")
    assert len(_store_files(gw)) == 2
    assert "Traceback" not in gw.log_text()
