#!/usr/bin/env python3
"""Delivery benchmark: storescu -> router -> destination, end to end, on loopback.

Run by hand (never as a timed test), from the repository root:

    .venv/bin/python bench/delivery.py                        # 1000 small MR, 400 CT, all paths
    .venv/bin/python bench/delivery.py --small 200 --ct 50 --paths dicomgate-dimse,orthanc-lua
    .venv/bin/python bench/delivery.py --runs 3 --json /tmp/delivery.json

Paths measured (a fresh router and destination per run, free 127.0.0.1 ports, temp folders):

* ``dicomgate-dimse``: ``dicomgate serve`` with one ``dimse`` destination (defaults) and one
  route ``match: {}``, delivering to DCMTK ``storescp``;
* ``orthanc-lua``: Orthanc with a Lua ``OnStoredInstance -> SendToModality`` route to the
  same kind of ``storescp``;
* ``dicomgate-stow``: dicomgate with a ``dicomweb`` destination (defaults: 50 instances a
  request) delivering to Orthanc's DICOMweb plugin; ``dicomgate-stow1``: the same with
  ``batch_max_instances: 1`` (one STOW-RS request per instance);
* ``dicomgate-ingest``: dicomgate without routes: the ingest rate alone, the bound of the
  others.

The corpus is sent in ONE association by ``storescu`` (environment ``TCP_NODELAY=1``). The
clock starts when storescu starts and stops when the destination holds every instance;
then the router's queue must drain (every job done, none dead). See bench/README.md.

``--backlog`` times delivery on its own: dicomgate's destination is paused
(``POST /api/destinations/dest/pause``) while the corpus is ingested, then resumed; the
clock runs from the resume to the destination holding every instance. Orthanc cannot pause
a Lua route: ``orthanc-lua`` is measured end to end as usual (said so in the report), and
``dicomgate-ingest`` has nothing to drain (also end to end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ingest
from ingest import (
    MB,
    Corpus,
    cpu_seconds,
    dcmtk_env,
    echo_ok,
    free_ports,
    http_json,
    http_status,
    make_corpus,
    stop_process,
    tail,
    tcp_open,
)

PATHS = ("dicomgate-dimse", "orthanc-lua", "dicomgate-stow", "dicomgate-stow1", "dicomgate-ingest")
CORPORA = ("small", "ct")
READY_TIMEOUT = 60.0
STALL_TIMEOUT = 120.0  # no progress at the destination for this long: the run failed
DRAIN_TIMEOUT = 60.0  # after the destination holds everything, for the queue to say so
POLL_INTERVAL = 0.010  # destination count; the end time is known to +- this
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DEST_AET = "STORESCP"
LUA_ROUTE = (
    "function OnStoredInstance(instanceId, tags, metadata, origin)\n"
    "  SendToModality(instanceId, 'dest')\nend\n"
)

# --------------------------------------------------------------------------- results


@dataclass
class Run:
    path: str
    corpus: str
    repeat: int
    ok: bool = False
    error: str = ""
    seconds: float = 0.0  # storescu start -> destination holds every instance
    ingest_seconds: float = 0.0  # storescu start -> storescu exit (acknowledged by router)
    drained_seconds: float = 0.0  # storescu start -> router's queue all done
    instances_per_s: float = 0.0
    mb_per_s: float = 0.0
    ingest_per_s: float = 0.0
    expected: int = 0
    delivered: int = 0
    storescu_rc: int | None = None
    startup_s: float = 0.0
    router_cpu_ms: float = 0.0  # the router process's CPU per instance over the whole run


@dataclass
class Summary:
    path: str
    best: dict[str, Run | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- processes


@dataclass
class Process:
    """One started program of a run and how to tell it is ready."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready: Callable[[], bool]


@dataclass
class Setup:
    """Everything started for one run."""

    router_aet: str
    router_port: int
    processes: list[Process]  # started in this order, stopped in the reverse order
    delivered: Callable[[], int]  # instances the destination holds (cheap; polled)
    drained: Callable[[], bool] | None  # router's queue: all done, none dead
    router: Process
    api: str | None = None  # dicomgate's HTTP base URL when it has a destination


def _spawn(name: str, cmd: list[str], work: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = work / f"{name}.log"
    out = open(log, "wb")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(
            cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    finally:
        out.close()


def count_entries(folder: Path) -> int:
    """Files in ``folder`` (not recursive): one ``os.scandir``, cheap enough to poll."""
    with os.scandir(folder) as it:
        return sum(1 for entry in it if entry.is_file(follow_symlinks=False))


def start_storescp(work: Path) -> tuple[Process, int, Path]:
    """DCMTK storescp, one child process per association (a router may open several)."""
    exe = shutil.which("storescp")
    if exe is None:
        raise RuntimeError("storescp not installed (apt-get install dcmtk)")
    out = work / "received"
    out.mkdir()
    (port,) = free_ports(1)
    cmd = [exe, "--fork", "--output-directory", str(out), "-aet", DEST_AET, "+xa", str(port)]
    proc = _spawn("storescp", cmd, work, dcmtk_env())

    def ready() -> bool:
        return tcp_open(port) and echo_ok(DEST_AET, port)

    return Process("storescp", proc, work / "storescp.log", ready), port, out


def _orthanc_config(work: Path, name: str, http_port: int, dicom_port: int) -> dict[str, Any]:
    return {
        "Name": f"dicomgate-bench-{name}",
        "StorageDirectory": str(work / name / "storage"),
        "IndexDirectory": str(work / name / "index"),
        "StorageCompression": False,
        "Plugins": [],
        "LuaScripts": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "DicomModalities": {},
        "OrthancPeers": {},
        "SaveJobs": False,
    }


def _start_orthanc(work: Path, name: str, config: dict[str, Any]) -> Process:
    if not ORTHANC.exists():
        raise RuntimeError("Orthanc not installed (apt-get install orthanc)")
    cfg = work / f"{name}.json"
    cfg.write_text(json.dumps(config, indent=2))
    proc = _spawn(name, [str(ORTHANC), str(cfg)], work, dcmtk_env())
    base = f"http://127.0.0.1:{config['HttpPort']}"
    dicom_port = int(config["DicomPort"])

    def ready() -> bool:
        return http_status(f"{base}/system") == 200 and tcp_open(dicom_port)

    return Process(name, proc, work / f"{name}.log", ready)


def orthanc_count(http_port: int) -> Callable[[], int]:
    url = f"http://127.0.0.1:{http_port}/statistics"

    def count() -> int:
        return int(http_json(url)["CountInstances"])

    return count


#: The dicomgate command to benchmark (``--dicomgate-exe``); default: next to this Python.
DICOMGATE_EXE: Path | None = None


def start_dicomgate(work: Path, destination: dict[str, Any] | None) -> tuple[Process, int, int]:
    """``dicomgate serve`` with production durability and one catch-all route (if any)."""
    ingest.DICOMGATE_EXE = DICOMGATE_EXE
    exe = ingest._dicomgate_exe()
    dimse_port, http_port = free_ports(2)
    data = work / "dicomgate"
    config: dict[str, Any] = {
        "storage": {"path": str(data), "fsync": True},
        "database": {"url": f"sqlite:///{data}/index.db"},
        "dimse": {"ae_title": "DICOMGATE", "host": "127.0.0.1", "port": dimse_port},
        "http": {"host": "127.0.0.1", "port": http_port},
    }
    if destination is not None:
        config["destinations"] = {"dest": destination}
        config["routes"] = [{"name": "everything", "match": {}, "to": ["dest"]}]
    cfg = work / "dicomgate.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMGATE_")}
    proc = _spawn("dicomgate", [str(exe), "serve", "--config", str(cfg)], work, env)

    def ready() -> bool:
        return http_status(f"http://127.0.0.1:{http_port}/readyz") == 200

    return Process("dicomgate", proc, work / "dicomgate.log", ready), dimse_port, http_port


def queue_drained(http_port: int, expected: int) -> Callable[[], bool]:
    url = f"http://127.0.0.1:{http_port}/api/queue?limit=1"

    def drained() -> bool:
        counts = http_json(url)["counts"].get("dest", {})
        if counts.get("dead"):
            raise RuntimeError(f"{counts['dead']} jobs dead-lettered")
        return bool(counts.get("done", 0) >= expected and sum(counts.values()) == counts["done"])

    return drained


def setup_run(path: str, work: Path, expected: int) -> Setup:
    """Start the destination, then the router, for one path (not yet waited for)."""
    procs: list[Process] = []
    try:
        if path in ("dicomgate-dimse", "orthanc-lua"):
            scp, scp_port, received = start_storescp(work)
            procs.append(scp)
            if path == "dicomgate-dimse":
                dest = {
                    "type": "dimse",
                    "ae_title": DEST_AET,
                    "host": "127.0.0.1",
                    "port": scp_port,
                }
                router, port, http_port = start_dicomgate(work, dest)
                procs.append(router)
                return Setup(
                    "DICOMGATE",
                    port,
                    procs,
                    lambda: count_entries(received),
                    queue_drained(http_port, expected),
                    router,
                    f"http://127.0.0.1:{http_port}",
                )
            dicom_port, http_port = free_ports(2)
            lua = work / "route.lua"
            lua.write_text(LUA_ROUTE)
            config = _orthanc_config(work, "orthanc", http_port, dicom_port)
            config["LuaScripts"] = [str(lua)]
            config["DicomModalities"] = {"dest": [DEST_AET, "127.0.0.1", scp_port]}
            router = _start_orthanc(work, "orthanc", config)
            procs.append(router)
            return Setup(
                "ORTHANC", dicom_port, procs, lambda: count_entries(received), None, router
            )
        if path in ("dicomgate-stow", "dicomgate-stow1"):
            if not DICOMWEB_PLUGIN.exists():
                raise RuntimeError(
                    "Orthanc DICOMweb plugin missing (apt-get install orthanc-dicomweb)"
                )
            dicom_port, http_port = free_ports(2)
            config = _orthanc_config(work, "orthanc-dicomweb", http_port, dicom_port)
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
            procs.append(_start_orthanc(work, "orthanc-dicomweb", config))
            dest = {"type": "dicomweb", "url": f"http://127.0.0.1:{http_port}/dicom-web"}
            if path == "dicomgate-stow1":
                dest["batch_max_instances"] = 1
            router, port, gw_http = start_dicomgate(work, dest)
            procs.append(router)
            return Setup(
                "DICOMGATE",
                port,
                procs,
                orthanc_count(http_port),
                queue_drained(gw_http, expected),
                router,
                f"http://127.0.0.1:{gw_http}",
            )
        if path == "dicomgate-ingest":
            router, port, _ = start_dicomgate(work, None)
            procs.append(router)
            data = work / "dicomgate" / "store"
            return Setup(
                "DICOMGATE", port, procs, lambda: ingest.count_files(data, "*.dcm"), None, router
            )
        raise ValueError(f"unknown path {path}")
    except BaseException:
        for p in reversed(procs):
            stop_process(p.proc)
        raise


def wait_ready(processes: list[Process]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    for p in processes:
        while not p.ready():
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode}: {tail(p.log, 2)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{p.name} not ready after {READY_TIMEOUT:.0f} s: {tail(p.log)}")
            time.sleep(0.05)


# --------------------------------------------------------------------------- running


def storescu_cmd(aet: str, port: int, corpus: Corpus) -> list[str]:
    return [
        "storescu",
        "-aec",
        aet,
        "-aet",
        "STORESCU",
        "+sd",
        "+r",
        "127.0.0.1",
        str(port),
        str(corpus.folder),
    ]


def _follow(run: Run, setup: Setup, corpus: Corpus, work: Path) -> None:
    """Send the corpus and watch the destination; fills the timings of ``run``."""
    scu_log = work / "storescu.log"
    with open(scu_log, "wb") as out:
        start = time.perf_counter()
        scu = subprocess.Popen(
            storescu_cmd(setup.router_aet, setup.router_port, corpus),
            env=dcmtk_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            last, last_change = -1, start
            while True:
                now = time.perf_counter()
                if run.storescu_rc is None and scu.poll() is not None:
                    run.storescu_rc = scu.returncode
                    run.ingest_seconds = now - start
                    if scu.returncode != 0:
                        raise RuntimeError(f"storescu exit {scu.returncode}: {tail(scu_log, 3)}")
                n = setup.delivered()
                if n >= corpus.files:
                    run.seconds = time.perf_counter() - start
                    run.delivered = n
                    break
                if n != last:
                    last, last_change = n, now
                elif now - last_change > STALL_TIMEOUT:
                    raise RuntimeError(
                        f"stalled at {n} of {corpus.files} for {STALL_TIMEOUT:.0f} s"
                    )
                if setup.router.proc.poll() is not None:
                    raise RuntimeError(f"router exited with {setup.router.proc.returncode}")
                time.sleep(POLL_INTERVAL)
            run.storescu_rc = scu.wait(timeout=STALL_TIMEOUT)
            if not run.ingest_seconds:
                run.ingest_seconds = time.perf_counter() - start
        finally:
            if scu.poll() is None:
                scu.kill()
                scu.wait()
    if run.storescu_rc != 0:
        raise RuntimeError(f"storescu exit {run.storescu_rc}: {tail(scu_log, 3)}")
    if setup.drained is not None:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while not setup.drained():
            if time.monotonic() > deadline:
                raise RuntimeError(f"queue not drained {DRAIN_TIMEOUT:.0f} s after delivery")
            time.sleep(0.05)
        run.drained_seconds = time.perf_counter() - start


def _post(url: str) -> None:
    request = urllib.request.Request(url, method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as rsp:
        if rsp.status != 200:
            raise RuntimeError(f"POST {url}: HTTP {rsp.status}")


def _follow_backlog(run: Run, setup: Setup, corpus: Corpus, work: Path) -> None:
    """Ingest with the destination paused, then time the drain after the resume."""
    assert setup.api is not None
    _post(f"{setup.api}/api/destinations/dest/pause")
    scu_log = work / "storescu.log"
    start = time.perf_counter()
    with open(scu_log, "wb") as out:
        run.storescu_rc = subprocess.run(
            storescu_cmd(setup.router_aet, setup.router_port, corpus),
            env=dcmtk_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=STALL_TIMEOUT * 5,
            check=False,
        ).returncode
    run.ingest_seconds = time.perf_counter() - start
    if run.storescu_rc != 0:
        raise RuntimeError(f"storescu exit {run.storescu_rc}: {tail(scu_log, 3)}")
    queued = f"{setup.api}/api/queue?limit=1"
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while sum(http_json(queued)["counts"].get("dest", {}).values()) < corpus.files:
        if time.monotonic() > deadline:
            raise RuntimeError("jobs not queued after ingest")
        time.sleep(0.05)
    if setup.delivered():
        raise RuntimeError("delivered while paused")
    start = time.perf_counter()
    _post(f"{setup.api}/api/destinations/dest/resume")
    last, last_change = -1, start
    while True:
        now = time.perf_counter()
        n = setup.delivered()
        if n >= corpus.files:
            run.seconds = now - start
            run.delivered = n
            break
        if n != last:
            last, last_change = n, now
        elif now - last_change > STALL_TIMEOUT:
            raise RuntimeError(f"stalled at {n} of {corpus.files} for {STALL_TIMEOUT:.0f} s")
        if setup.router.proc.poll() is not None:
            raise RuntimeError(f"router exited with {setup.router.proc.returncode}")
        time.sleep(POLL_INTERVAL)
    assert setup.drained is not None
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while not setup.drained():
        if time.monotonic() > deadline:
            raise RuntimeError(f"queue not drained {DRAIN_TIMEOUT:.0f} s after delivery")
        time.sleep(0.05)
    run.drained_seconds = time.perf_counter() - start


def measure(path: str, corpus: Corpus, repeat: int, root: Path, backlog: bool = False) -> Run:
    run = Run(path=path, corpus=corpus.name, repeat=repeat, expected=corpus.files)
    work = Path(tempfile.mkdtemp(prefix=f"{path}-{corpus.name}-{repeat}-", dir=root))
    t0 = time.perf_counter()
    try:
        setup = setup_run(path, work, corpus.files)
    except Exception as exc:  # a path that cannot start is a row, not a crash
        run.error = f"failed to start: {exc}"
        return run
    try:
        try:
            wait_ready(setup.processes)
        except Exception as exc:
            run.error = f"failed to start: {exc}"
            return run
        run.startup_s = time.perf_counter() - t0
        try:
            cpu0 = cpu_seconds(setup.router.proc.pid)
            if backlog and setup.api is not None:
                _follow_backlog(run, setup, corpus, work)
            else:
                _follow(run, setup, corpus, work)
            run.router_cpu_ms = (cpu_seconds(setup.router.proc.pid) - cpu0) * 1000 / corpus.files
        except Exception as exc:
            run.error = str(exc) or type(exc).__name__
    finally:
        for p in reversed(setup.processes):
            stop_process(p.proc)
    if not run.error:
        for p in setup.processes:
            if p.proc.returncode not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
                run.error = f"{p.name} exited with {p.proc.returncode}: {tail(p.log, 3)}"
    if run.seconds:
        run.instances_per_s = corpus.files / run.seconds
        run.mb_per_s = corpus.bytes / MB / run.seconds
    if run.ingest_seconds:
        run.ingest_per_s = corpus.files / run.ingest_seconds
    run.ok = not run.error
    # The run's folder stays until the end (the root is removed then, unless --keep):
    # deleting it here would slow file creation in the next runs (bench/README.md,
    # "Deleting between runs").
    return run


# --------------------------------------------------------------------------- report


def summarize(runs: list[Run], paths: list[str]) -> list[Summary]:
    out: list[Summary] = []
    for p in paths:
        s = Summary(path=p)
        for c in CORPORA:
            mine = [x for x in runs if x.path == p and x.corpus == c]
            valid = [x for x in mine if x.ok]
            s.best[c] = min(valid, key=lambda x: x.seconds) if valid else None
            if mine and not valid:
                s.errors[c] = mine[-1].error
        out.append(s)
    return out


def _cells(s: Summary, corpus: str) -> list[str]:
    best = s.best.get(corpus)
    if best is None:
        err = s.errors.get(corpus)
        if err is None:
            return ["-"] * 4
        short = "failed to start" if err.startswith("failed to start") else f"error: {err[:50]}"
        return [short, "", "", ""]
    ingest_cell = f"{best.ingest_per_s:,.0f}"
    return [
        f"{best.seconds:.2f}",
        f"{best.instances_per_s:,.0f}",
        f"{best.mb_per_s:,.1f}",
        ingest_cell,
    ]


def table(summaries: list[Summary]) -> str:
    lines = [
        "| path | small MR s | inst/s | MB/s | ingest inst/s"
        " | CT s | inst/s | MB/s | ingest inst/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append("| " + " | ".join([s.path, *_cells(s, "small"), *_cells(s, "ct")]) + " |")
    return "\n".join(lines)


def _ratio(by: dict[str, Summary], a: str, b: str, corpus: str) -> float | None:
    if a not in by or b not in by:
        return None
    x, y = by[a].best.get(corpus), by[b].best.get(corpus)
    if x is None or y is None or not x.seconds:
        return None
    return y.seconds / x.seconds


def _paired(runs: Sequence[Run], a: str, b: str, corpus: str) -> list[float]:
    """The ratio of each repeat on its own (``a`` against the ``b`` run beside it): the
    spread the best-of ratio hides on a noisy machine."""

    def done(path: str) -> dict[int, Run]:
        return {x.repeat: x for x in runs if x.path == path and x.corpus == corpus and x.ok}

    mine, theirs = done(a), done(b)
    return [
        theirs[r].seconds / mine[r].seconds for r in sorted(mine) if r in theirs and mine[r].seconds
    ]


def ratios(summaries: list[Summary], backlog: bool = False, runs: Sequence[Run] = ()) -> list[str]:
    """Throughput ratios against the issue #3 targets; > 1 means the first is faster.

    With ``backlog`` dicomgate's times are drains alone and Orthanc's end to end. With
    several repeats in ``runs``, each repeat's own ratio follows the best-of one."""
    by = {s.path: s for s in summaries}
    checks: tuple[tuple[str, str, dict[str, float]], ...] = (
        ("dicomgate-dimse", "orthanc-lua", {"small": 5.0, "ct": 1.5}),
        ("dicomgate-stow", "dicomgate-stow1", {"small": 3.0, "ct": 3.0}),
    )
    if not backlog:
        checks += (("dicomgate-dimse", "dicomgate-ingest", {}),)
    lines: list[str] = []
    for a, b, targets in checks:
        parts: list[str] = []
        for corpus, label in (("small", "small"), ("ct", "CT")):
            r = _ratio(by, a, b, corpus)
            if r is None:
                continue
            text = f"{r:.2f}x {label}"
            if corpus in targets:
                verdict = "met" if r >= targets[corpus] else "MISSED"
                text += f" (target >= {targets[corpus]:g}x: {verdict})"
            paired = _paired(runs, a, b, corpus)
            if len(paired) > 1:
                text += " [runs: " + ", ".join(f"{x:.2f}x" for x in paired)
                text += f"; median {statistics.median(paired):.2f}x]"
            parts.append(text)
        if parts:
            note = " (drain vs Orthanc end to end)" if backlog and b == "orthanc-lua" else ""
            lines.append(f"{a} / {b}{note}: " + ", ".join(parts))
    return lines


def details(runs: list[Run]) -> Iterator[str]:
    for x in runs:
        status = "ok" if x.ok else x.error
        yield (
            f"  {x.path:<16} {x.corpus:<5} #{x.repeat}: {x.seconds:7.3f} s "
            f"{x.instances_per_s:7.1f} inst/s {x.mb_per_s:6.1f} MB/s | ingest "
            f"{x.ingest_seconds:6.3f} s {x.ingest_per_s:6.1f} inst/s | drained "
            f"{x.drained_seconds:6.3f} s | {x.delivered}/{x.expected} "
            f"| router CPU {x.router_cpu_ms:5.2f} ms/inst (start {x.startup_s:.2f} s) {status}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--small", type=int, default=1000, help="small MR instances (default 1000)")
    ap.add_argument("--ct", type=int, default=400, help="CT 512x512 instances (default 400)")
    ap.add_argument(
        "--paths", default=",".join(PATHS), help="comma-separated subset of: " + ", ".join(PATHS)
    )
    ap.add_argument(
        "--runs", "--repeat", dest="runs", type=int, default=1, help="runs per path; best is kept"
    )
    ap.add_argument(
        "--backlog",
        action="store_true",
        help="time dicomgate's delivery alone: ingest paused, then time the drain",
    )
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed")
    ap.add_argument("--workdir", type=Path, help="parent of the temp folder (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, stores)")
    ap.add_argument(
        "--dicomgate-exe",
        type=Path,
        help="dicomgate command to run (default: the one next to this Python)",
    )
    args = ap.parse_args(argv)
    args.path_list = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in args.path_list if p not in PATHS]
    if bad or not args.path_list:
        ap.error(f"unknown path(s) {bad}; choose from {', '.join(PATHS)}")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    global DICOMGATE_EXE
    args = parse_args(argv)
    DICOMGATE_EXE = args.dicomgate_exe
    if shutil.which("storescu") is None:
        print("storescu not found: apt-get install dcmtk", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="dicomgate-delivery-", dir=args.workdir))
    runs: list[Run] = []
    try:
        t = time.perf_counter()
        corpora = make_corpus(root, args.small, args.ct, args.seed)
        print(
            "corpus: "
            + ", ".join(f"{c.name} {c.files} files {c.bytes / MB:.1f} MB" for c in corpora)
            + f" (generated in {time.perf_counter() - t:.1f} s)",
            file=sys.stderr,
        )
        # Interleaved (run, corpus, path): load from other work on a noisy machine falls
        # on every path alike. A path that cannot start is not retried for that corpus.
        dead: set[tuple[str, str]] = set()
        for i in range(1, args.runs + 1):
            for corpus in corpora:
                for path in args.path_list:
                    if (path, corpus.name) in dead:
                        continue
                    run = measure(path, corpus, i, root, args.backlog)
                    runs.append(run)
                    print(next(details([run])), file=sys.stderr, flush=True)
                    if run.error.startswith("failed to start"):
                        dead.add((path, corpus.name))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}", file=sys.stderr)

    summaries = summarize(runs, args.path_list)
    print()
    mode = (
        "BACKLOG: dicomgate paths time the drain after a paused ingest (resume -> destination"
        " holds all); orthanc-lua and dicomgate-ingest are end to end. "
        if args.backlog
        else ""
    )
    print(
        f"{mode}storescu -> router -> destination acknowledged, loopback, one storescu"
        f" association per corpus, best of {args.runs}; {os.cpu_count()} CPUs,"
        f" {platform.platform()}"
    )
    print()
    print(table(summaries))
    rl = ratios(summaries, args.backlog, runs)
    if rl:
        print()
        for line in rl:
            print(line)
    if args.json:
        payload = {
            "args": {
                "small": args.small,
                "ct": args.ct,
                "paths": args.path_list,
                "runs": args.runs,
                "seed": args.seed,
                "backlog": args.backlog,
            },
            "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "corpora": [{"name": c.name, "files": c.files, "bytes": c.bytes} for c in corpora],
            "runs": [asdict(r) for r in runs],
            "summary": [
                {
                    "path": s.path,
                    "best": {k: (asdict(v) if v else None) for k, v in s.best.items()},
                    "errors": s.errors,
                }
                for s in summaries
            ],
            "ratios": rl,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if any(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
