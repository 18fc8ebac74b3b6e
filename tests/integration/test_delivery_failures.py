"""Failure injection at gateway level: a real ``dicomgate serve``, real sockets.

storescu -> dicomgate -> a scripted STOW-RS server (``tests/stow_server.py``) that answers
HTTP 500, 409 or 202 on demand, holds its answers (a slow destination), then accepts; or a
DIMSE peer that accepts TCP connections and never answers. The queue is watched through
``/api/queue`` and the CLI, as an operator would.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import (
    DICOMGATE,
    Corpus,
    GatewayProcess,
    assert_relayed,
    bundled_file,
    needs_dcmtk,
    sop_uid_of,
    wait_until,
)
from tests.integration.test_stow import multipart, post
from tests.stow_server import Answer, StowRequest, StowServer, stow_body, stow_server

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]

# Fast retries: 0.2 s, 0.4 s, 0.8 s, 1 s ... without jitter, so that the jobs failed
# together stay together.
FAST_RETRY = {"initial": 0.2, "max": 1.0, "jitter": 0.0}
# One batch per round: a study's jobs are created together once it has been quiet for
# 2 s, and the idle poll (0.5 s) is longer than the first backoffs, so the jobs failed
# together are leased together again. (0.2 s of quiet split a study in two on a loaded CI
# machine, when one commit on PostgreSQL stalled between two of storescu's instances.)
ONE_BATCH_ROUTE = {"name": "all", "trigger": "study_stable", "stable_after": 2.0, "to": ["cloud"]}
ONE_BATCH_QUEUE: dict[str, Any] = {"poll_interval": 0.5, "retry": FAST_RETRY}


@pytest.fixture
def stow() -> Iterator[StowServer]:
    with stow_server() as server:
        yield server


def _cloud(server: StowServer, **settings: Any) -> dict[str, Any]:
    return {"type": "dicomweb", "url": server.url, "timeout": 30, **settings}


def _jobs(gw: GatewayProcess, destination: str, state: str | None = None) -> list[dict[str, Any]]:
    query = f"/api/queue?destination={destination}&limit=1000"
    if state is not None:
        query += f"&state={state}"
    status, body = gw.http_get(query)
    assert status == 200, body
    jobs: list[dict[str, Any]] = body["jobs"]
    return jobs


def _count(gw: GatewayProcess, destination: str, state: str) -> int:
    return len(_jobs(gw, destination, state))


def _stored_bytes(gw: GatewayProcess) -> dict[str, bytes]:
    """The gateway's stored files by SOP Instance UID: what it must send, byte for byte."""
    return {p.stem: p.read_bytes() for p in (gw.data / "store").rglob("*.dcm")}


def _assert_delivered_identical(gw: GatewayProcess, stow: StowServer, uids: set[str]) -> None:
    received = stow.parts_by_uid(200)
    assert set(received) == uids
    stored = _stored_bytes(gw)
    for uid in uids:
        for part in received[uid]:
            assert_relayed(part, stored[uid])


# ----------------------------------------------------------------- 500, then 200


def test_http_500_is_retried_with_backoff_then_everything_is_delivered(
    gateway: Gateway, stow: StowServer, corpus: Corpus
) -> None:
    files = corpus.mr("fail-500", 6, seed=701)
    uids = {sop_uid_of(f) for f in files}
    refusals: dict[str, list[float]] = {uid: [] for uid in uids}
    may_accept = threading.Event()

    def respond(request: StowRequest) -> tuple[int, bytes]:
        if may_accept.is_set():
            return 200, stow_body(request.uids)
        for uid in request.uids:
            refusals[uid].append(request.at)
        return 500, b'{"error": "database is down"}'

    stow.respond = respond
    gw = gateway(
        {
            "destinations": {"cloud": _cloud(stow)},
            "routes": [ONE_BATCH_ROUTE],
            "queue": ONE_BATCH_QUEUE,
        }
    )
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: all(len(times) >= 2 for times in refusals.values()), 30, "two refusals each")
    # While the server fails: every job waits (pending), its attempts counted, the error kept.
    jobs = _jobs(gw, "cloud")
    assert {j["sop_instance_uid"] for j in jobs} == uids
    assert all(j["state"] in ("pending", "leased") for j in jobs), jobs
    assert all(j["attempts"] >= 2 and j["last_error"] == "HTTP 500" for j in jobs), jobs
    for times in refusals.values():
        assert times[1] - times[0] >= FAST_RETRY["initial"], "retried before its backoff"
    assert stow.parts_by_uid(200) == {}

    may_accept.set()
    wait_until(lambda: _count(gw, "cloud", "done") == len(files), 30, "every job done")
    _assert_delivered_identical(gw, stow, uids)
    done = _jobs(gw, "cloud", "done")
    assert all(j["attempts"] >= 3 for j in done), done  # two refusals, then success
    assert gw.log_count("delivery.failed") >= 2 * len(files)
    assert gw.log_count("delivery.dead_lettered") == 0
    assert gw.log_count("delivery.circuit_open") == 0


# ----------------------------------------------------------------- 409, dead-letter, re-drive


def test_a_retry_after_holds_every_request_to_the_destination_that_long(
    gateway: Gateway, stow: StowServer, corpus: Corpus
) -> None:
    """A cloud DICOMweb service over its quota answers 429 with Retry-After: 3. Its backoff
    (0.2 s) would have sent again at once; the gateway sends nothing to it for 3 s, not the
    refused batch nor the jobs that arrive meanwhile, then delivers everything."""
    # One job first (one request, refused), then two more during the wait.
    first, later = corpus.mr("fail-429", 1, seed=705), corpus.mr("fail-429-later", 2, seed=706)
    refused = threading.Event()

    def respond(request: StowRequest) -> Answer:
        if not refused.is_set():
            refused.set()
            return 429, b'{"error": "quota"}', {"Retry-After": "3"}
        return 200, stow_body(request.uids)

    stow.respond = respond
    route = {"name": "all", "to": ["cloud"]}
    # Retry-After is honoured up to queue.retry.max (10 s here); the backoff starts at 0.2 s.
    queue = {"poll_interval": 0.1, "retry": {**FAST_RETRY, "max": 10.0}}
    gw = gateway({"destinations": {"cloud": _cloud(stow)}, "routes": [route], "queue": queue})
    assert gw.storescu(first).returncode == 0
    gw.wait_log("delivery.held", timeout=30)
    assert gw.storescu(later).returncode == 0  # more jobs for it during the wait
    every = {sop_uid_of(f) for f in first + later}
    wait_until(lambda: _count(gw, "cloud", "done") == len(every), 30, "every job done")
    with stow.lock:
        refused_at, *times = [r.at for r in stow.requests]
    assert times, "nothing sent after the 429"
    assert min(times) - refused_at >= 2.9, f"sent {min(times) - refused_at:.2f} s after the 429"
    assert set(stow.parts_by_uid(200)) == every
    assert gw.log_count("delivery.held") == 1


def test_409_failure_reasons_dead_letter_then_redrive_delivers(
    gateway: Gateway, stow: StowServer, corpus: Corpus
) -> None:
    files = corpus.mr("fail-409", 4, seed=702)
    uids = [sop_uid_of(f) for f in files]
    # Out of resources and processing failure may pass (retried up to max_attempts);
    # "cannot understand" repeats on every attempt (dead-lettered at once).
    reasons = {uids[0]: 0xA700, uids[1]: 0xA700, uids[2]: 0x0110, uids[3]: 0xC000}
    accepting = threading.Event()

    def respond(request: StowRequest) -> tuple[int, bytes]:
        if accepting.is_set():
            return 200, stow_body(request.uids)
        return 409, stow_body(failed={uid: reasons[uid] for uid in request.uids})

    stow.respond = respond
    gw = gateway(
        {
            "destinations": {"cloud": _cloud(stow)},
            "routes": [ONE_BATCH_ROUTE],
            "queue": {**ONE_BATCH_QUEUE, "retry": {**FAST_RETRY, "max_attempts": 2}},
        }
    )
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: _count(gw, "cloud", "dead") == 4, 30, "4 dead-lettered jobs")
    dead = {j["sop_instance_uid"]: j for j in _jobs(gw, "cloud", "dead")}
    for uid, reason in reasons.items():
        assert dead[uid]["last_error"] == f"HTTP 409, FailureReason 0x{reason:04X}"
    assert [dead[u]["attempts"] for u in uids] == [2, 2, 2, 1]
    refused = [uid for r in stow.requests for uid in r.uids]
    assert refused.count(uids[3]) == 1  # never retried
    assert all(refused.count(u) == 2 for u in uids[:3])
    assert gw.log_count("delivery.dead_lettered") == 4
    assert gw.log_count("delivery.circuit_open") == 0

    # Nothing moves by itself once dead-lettered.
    time.sleep(0.5)
    assert len(stow.requests) == len(stow.answered(409))
    assert _count(gw, "cloud", "dead") == 4

    # A destination name that is nowhere (a typo) is an error, not "0 jobs".
    typo = subprocess.run(
        [
            DICOMGATE,
            "queue",
            "retry-dead",
            "--config",
            str(gw.config_path),
            "--destination",
            "clowd",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert typo.returncode == 1 and "no destination 'clowd'" in typo.stderr, typo
    assert _count(gw, "cloud", "dead") == 4
    accepting.set()
    redrive = subprocess.run(
        [DICOMGATE, "queue", "retry-dead", "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert redrive.returncode == 0, redrive.stderr
    assert "4 dead-lettered jobs queued again" in redrive.stdout
    wait_until(lambda: _count(gw, "cloud", "done") == 4, 30, "4 re-driven jobs done")
    _assert_delivered_identical(gw, stow, set(uids))
    assert _count(gw, "cloud", "dead") == 0


# ----------------------------------------------------------------- 202 partial


def test_202_partial_marks_referenced_done_and_retries_the_failed(
    gateway: Gateway, stow: StowServer, corpus: Corpus
) -> None:
    files = corpus.mr("fail-202", 6, seed=703)
    uids = [sop_uid_of(f) for f in files]
    busy, bad = set(uids[:2]), uids[2]  # busy: 0xA700 twice, then stored; bad: 0xC000
    busy_refusals: dict[str, int] = {uid: 0 for uid in busy}

    def respond(request: StowRequest) -> tuple[int, bytes]:
        failed: dict[str, int] = {}
        for uid in request.uids:
            if uid == bad:
                failed[uid] = 0xC000
            elif uid in busy and busy_refusals[uid] < 2:
                busy_refusals[uid] += 1
                failed[uid] = 0xA700
        stored = [uid for uid in request.uids if uid not in failed]
        if not failed:
            return 200, stow_body(stored)
        return (202 if stored else 409), stow_body(stored, failed)

    stow.respond = respond
    gw = gateway(
        {
            "destinations": {"cloud": _cloud(stow)},
            "routes": [ONE_BATCH_ROUTE],
            "queue": {**ONE_BATCH_QUEUE, "retry": {**FAST_RETRY, "max_attempts": 5}},
        }
    )
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: _count(gw, "cloud", "done") == 5, 30, "5 jobs done")
    wait_until(lambda: _count(gw, "cloud", "dead") == 1, 10, "the bad instance dead-lettered")
    jobs = {j["sop_instance_uid"]: j for j in _jobs(gw, "cloud")}
    assert jobs[bad]["state"] == "dead" and jobs[bad]["attempts"] == 1
    assert jobs[bad]["last_error"] == "HTTP 202, FailureReason 0xC000"
    for uid in busy:
        assert jobs[uid]["state"] == "done" and jobs[uid]["attempts"] == 3, jobs[uid]
    for uid in set(uids) - busy - {bad}:
        # Referenced in the first answer: done at once, and never sent again.
        assert jobs[uid]["state"] == "done" and jobs[uid]["attempts"] == 1, jobs[uid]
    sent = [uid for r in stow.requests for uid in r.uids]
    assert all(sent.count(uid) == 1 for uid in set(uids) - busy)
    assert len(stow.answered(202)) == 1  # the first request: all six, one refused
    assert gw.log_count("delivery.circuit_open") == 0
    stored = _stored_bytes(gw)
    for request in stow.requests:
        for uid, part in zip(request.uids, request.parts, strict=True):
            assert_relayed(part, stored[uid])


# ----------------------------------------------------------------- slow destination


def test_slow_dicomweb_destination_does_not_hold_back_a_folder(
    gateway: Gateway, stow: StowServer, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("fail-slow", 8, seed=704)
    uids = {sop_uid_of(f) for f in files}
    stow.hold = threading.Event()  # the cloud answers nothing until released
    share = tmp_path / "share"
    gw = gateway(
        {
            "destinations": {
                "cloud": _cloud(stow, batch_max_instances=2, concurrency=1),
                "share": {"type": "folder", "path": str(share)},
            },
            "routes": [{"name": "both", "to": ["cloud", "share"]}],
            "queue": {"poll_interval": 0.1, "retry": FAST_RETRY},
        }
    )
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: len(list(share.rglob("*.dcm"))) == len(files), 20, "the folder copies")
    wait_until(lambda: len(stow.requests) + _count(gw, "cloud", "leased") > 0, 10, "a lease")
    assert _count(gw, "share", "done") == len(files)
    assert _count(gw, "cloud", "done") == 0  # still waiting for its first answer
    assert stow.answered(200) == []

    stow.hold.set()
    wait_until(lambda: _count(gw, "cloud", "done") == len(files), 30, "the slow destination")
    _assert_delivered_identical(gw, stow, uids)


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a hung PACS)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


def test_hung_dimse_peer_does_not_hold_back_a_folder(
    gateway: Gateway, silent_peer: int, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("fail-hung", 6, seed=705)
    share = tmp_path / "share"
    gw = gateway(
        {
            "destinations": {
                "pacs": {
                    "type": "dimse",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": silent_peer,
                    "dimse_timeout": 8.0,
                },
                "share": {"type": "folder", "path": str(share)},
            },
            "routes": [{"name": "both", "to": ["pacs", "share"]}],
            "queue": {"poll_interval": 0.1, "retry": FAST_RETRY},
        }
    )
    assert gw.storescu(files).returncode == 0
    received = time.monotonic()
    wait_until(lambda: len(list(share.rglob("*.dcm"))) == len(files), 20, "the folder copies")
    # Well within the PACS's first association attempt, which hangs for 8 s.
    assert time.monotonic() - received < 4.0
    assert _count(gw, "share", "done") == len(files)
    pacs_jobs = _jobs(gw, "pacs")
    assert len(pacs_jobs) == len(files)
    assert all(j["state"] != "done" and not j["last_error"] for j in pacs_jobs), pacs_jobs
    # Then the association request times out: the jobs wait for a retry, the reason kept.
    wait_until(
        lambda: any(j["last_error"] for j in _jobs(gw, "pacs", "pending")),
        20,
        "a timed-out attempt recorded",
    )
    errors = {j["last_error"] for j in _jobs(gw, "pacs") if j["last_error"]}
    assert errors and all("timed out" in e for e in errors), errors
    assert _count(gw, "pacs", "done") == _count(gw, "pacs", "dead") == 0


def test_an_instance_a_sender_cannot_read_does_not_hold_back_the_others(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    """An instance stored as received with a VR no DICOM reader knows ('CR' for the CS of
    Specific Character Set: one flipped bit) made the folder sender raise for its whole
    batch of 16, every retry: 'sender failed' tracebacks, the circuit breaker opened, and
    the good instances waited minutes. Now it is dead-lettered alone with the reason and
    the others are delivered at once."""
    good = corpus.mr("fail-unreadable", 5, seed=705)
    raw = bundled_file("CT_small.dcm").read_bytes()
    assert raw.count(b"\x08\x00\x05\x00CS") == 1
    bad = raw.replace(b"\x08\x00\x05\x00CS", b"\x08\x00\x05\x00CR")
    share = tmp_path / "share"
    gw = gateway(
        {
            "destinations": {"share": {"type": "folder", "path": str(share)}},
            "routes": [
                {"name": "all", "trigger": "study_stable", "stable_after": 1.0, "to": ["share"]}
            ],
            "queue": {"poll_interval": 0.1, "retry": FAST_RETRY},
        }
    )
    answer = post(gw, multipart([bad] + [f.read_bytes() for f in good]))
    assert answer.status_code == 200, answer.text  # stored as received (invalid values are)
    wait_until(lambda: _count(gw, "share", "done") == len(good), 15, "the good instances")
    wait_until(lambda: _count(gw, "share", "dead") == 1, 15, "the unreadable one dead-lettered")
    (dead,) = _jobs(gw, "share", "dead")
    assert "cannot read the header" in dead["last_error"]
    assert "Unknown Value Representation 'CR'" in dead["last_error"]
    assert gw.log_count("delivery.sender_error") == 0
    assert gw.log_count("delivery.circuit_open") == 0
