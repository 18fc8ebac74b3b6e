#!/usr/bin/env python3
"""STOW-RS ingest benchmark: one Python HTTP client -> {dicomgate, Orthanc + DICOMweb}.

Run by hand (never as a timed test), from the repository root:

    .venv/bin/python bench/stow.py                     # 1000 small MR (1 and 50 per request),
                                                       # 400 CT (1 and 20 per request)
    .venv/bin/python bench/stow.py --small 200 --ct 50 --repeat 3

    .venv/bin/python bench/stow.py --connections 4     # four clients at once

For every (receiver, corpus, instances per request, repeat) a fresh receiver starts on free
127.0.0.1 ports in an empty folder. The request bodies are built in memory *before* the
clock starts, then posted one after the other over one keep-alive connection (httpx), or
over ``--connections N`` connections at once, each from its own thread, taking every N-th
request; the clock stops at the last response. A run counts only if every instance is
reported stored (HTTP 200) and the receiver's own count agrees. The best run per cell is
reported, with dicomgate / Orthanc ratios, and the CPU time the receiver process spent
per instance during that run (user + system, from /proc). Both receivers use their default
durability (dicomgate flushes each file and folder before answering; Orthanc flushes its
index, not the files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (
    MB,
    Corpus,
    Receiver,
    _spawn,
    cpu_seconds,
    dcmtk_env,
    free_ports,
    http_json,
    http_status,
    make_corpus,
    start_dicomgate,
    stop_process,
    tail,
    wait_ready,
)

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
BOUNDARY = "dicomgate-bench-boundary"


@dataclass
class Run:
    receiver: str
    corpus: str
    per_request: int
    ok: bool
    seconds: float
    instances: int
    bytes: int
    error: str = ""
    cpu_seconds: float = 0.0  # the receiver process's user + system time during the run

    @property
    def rate(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0

    @property
    def mbps(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        """Receiver CPU milliseconds per instance."""
        return self.cpu_seconds * 1000 / self.instances if self.instances else 0.0


def start_orthanc_dicomweb(work: Path) -> tuple[Receiver, str]:
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(exe).exists() or not DICOMWEB_PLUGIN.exists():
        raise RuntimeError("needs orthanc and orthanc-dicomweb (apt-get install)")
    dicom_port, http_port = free_ports(2)
    config = {
        "Name": "dicomgate-bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "StorageCompression": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "SaveJobs": False,
    }
    (work / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = work / "orthanc.log"
    proc = _spawn([exe, str(work / "orthanc.json")], work, log, dcmtk_env())
    base = f"http://127.0.0.1:{http_port}"
    rec = Receiver(
        "orthanc",
        "ORTHANC",
        dicom_port,
        proc,
        log,
        count=lambda: int(http_json(f"{base}/statistics")["CountInstances"]),
        ready=lambda: http_status(f"{base}/dicom-web/studies") == 200,
    )
    return rec, f"{base}/dicom-web/studies"


def start_dicomgate_http(work: Path) -> tuple[Receiver, str]:
    rec = start_dicomgate(work)
    text = (work / "dicomgate.yaml").read_text()
    port = int(text.split("http: {host: 127.0.0.1, port: ")[1].split("}")[0])
    return rec, f"http://127.0.0.1:{port}/dicomweb/studies"


STARTERS = {"dicomgate": start_dicomgate_http, "orthanc": start_orthanc_dicomweb}


def bodies(files: list[Path], per_request: int) -> list[bytes]:
    out = []
    for i in range(0, len(files), per_request):
        body = bytearray()
        for f in files[i : i + per_request]:
            body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            body += f.read_bytes() + b"\r\n"
        body += f"--{BOUNDARY}--\r\n".encode()
        out.append(bytes(body))
    return out


def post_all(
    url: str, payloads: list[bytes], connections: int, on_start: Callable[[], None] | None = None
) -> tuple[str, float]:
    """Post every body, over ``connections`` keep-alive connections at once. Returns the
    first error ("" when every request answered 200) and the seconds from the first post
    to the last answer; the connections are opened before that clock starts, and
    ``on_start`` is called just before it."""
    headers = {
        "content-type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        "accept": "application/dicom+json",
    }
    clients = [httpx.Client(timeout=300) for _ in range(connections)]
    errors: list[str] = []

    def send(k: int) -> None:
        try:
            for body in payloads[k::connections]:
                r = clients[k].post(url, content=body, headers=headers)
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    return
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    try:
        for client in clients:  # open the connections before the clock starts
            client.get(url.rsplit("/studies", 1)[0] + "/studies?limit=1")
        threads = [threading.Thread(target=send, args=(k,)) for k in range(connections)]
        if on_start is not None:
            on_start()
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    finally:
        for client in clients:
            client.close()
    return (errors[0] if errors else ""), seconds


def measure(
    receiver: str, corpus: Corpus, per_request: int, root: Path, connections: int = 1
) -> Run:
    files = sorted(p for p in corpus.folder.iterdir() if p.suffix == ".dcm")
    payloads = bodies(files, per_request)
    run = Run(receiver, corpus.name, per_request, False, 0.0, len(files), corpus.bytes)
    work = Path(tempfile.mkdtemp(prefix=f"stow-{receiver}-", dir=root))
    try:
        rec, url = STARTERS[receiver](work)
        wait_ready(rec)
    except Exception as exc:
        run.error = f"failed to start: {exc}"
        return run
    try:
        cpu_at_start = 0.0

        def snapshot() -> None:
            nonlocal cpu_at_start
            cpu_at_start = cpu_seconds(rec.proc.pid)

        run.error, run.seconds = post_all(url, payloads, connections, snapshot)
        run.cpu_seconds = cpu_seconds(rec.proc.pid) - cpu_at_start
        stored = rec.count()
        if not run.error and stored != len(files):
            run.error = f"stored {stored} of {len(files)}"
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc} {tail(rec.log, 2)}"
    finally:
        stop_process(rec.proc)
    run.ok = not run.error
    # The run's folder stays until the end, when the root is removed: deleting it here
    # would slow file creation in the next runs (bench/README.md, "Deleting between runs").
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000, help="small MR instances")
    parser.add_argument("--ct", type=int, default=400, help="CT instances")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per cell; the best is kept, and each ratio"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--receivers", default="dicomgate,orthanc")
    parser.add_argument(
        "--connections", type=int, default=1, help="client connections posting at once"
    )
    args = parser.parse_args(argv)
    if args.connections < 1:
        parser.error("--connections must be 1 or more")
    receivers = args.receivers.split(",")
    root = Path(tempfile.mkdtemp(prefix="dicomgate-stow-bench-"))
    best: dict[tuple[str, str, int], Run] = {}
    # Each repeat's own dicomgate / Orthanc ratio (the two runs beside each other): the
    # spread the best-of ratio hides when the machine's speed drifts between runs.
    paired: dict[tuple[str, int], list[float]] = {}
    try:
        corpora = make_corpus(root, args.small, args.ct, args.seed)
        cells = [(c, n) for c in corpora for n in ((1, 50) if c.name == "small" else (1, 20))]
        for _ in range(args.repeat):
            for corpus, per_request in cells:
                this: dict[str, Run] = {}
                for receiver in receivers:
                    run = measure(receiver, corpus, per_request, root, args.connections)
                    status = "ok" if run.ok else f"FAILED {run.error}"
                    print(
                        f"{receiver:10} {corpus.name:5} x{per_request:<3} {run.seconds:7.2f} s"
                        f" {run.rate:8.1f} inst/s {run.mbps:7.1f} MB/s"
                        f" {run.cpu_ms:6.2f} CPU ms/inst  {status}",
                        file=sys.stderr,
                        flush=True,
                    )
                    key = (receiver, corpus.name, per_request)
                    if run.ok and (key not in best or run.seconds < best[key].seconds):
                        best[key] = run
                    if run.ok:
                        this[receiver] = run
                if "dicomgate" in this and "orthanc" in this:
                    paired.setdefault((corpus.name, per_request), []).append(
                        this["orthanc"].seconds / this["dicomgate"].seconds
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    conns = "one client connection"
    if args.connections > 1:
        conns = f"{args.connections} client connections at once"
    print(
        f"\nSTOW-RS, {conns}, loopback, best of {args.repeat}; receiver CPU ms per instance"
        f" in brackets; {os.cpu_count()} CPUs, {platform.platform()}\n"
    )
    print(
        "| corpus | per request | "
        + " | ".join(receivers)
        + " | dicomgate / orthanc | each repeat (median) |"
    )
    print("|---|---:|" + "---:|" * len(receivers) + "---:|---|")
    for corpus, per_request in cells:
        row = []
        for receiver in receivers:
            r = best.get((receiver, corpus.name, per_request))
            cell = "failed"
            if r is not None:
                cell = f"{r.rate:,.0f} inst/s" if corpus.name == "small" else f"{r.mbps:,.0f} MB/s"
                cell += f" ({r.cpu_ms:.2f})"
            row.append(cell)
        a = best.get(("dicomgate", corpus.name, per_request))
        b = best.get(("orthanc", corpus.name, per_request))
        ratio = f"**{b.seconds / a.seconds:.2f}x**" if a and b else "-"
        each = paired.get((corpus.name, per_request), [])
        spread = ", ".join(f"{x:.2f}x" for x in each)
        if len(each) > 1:
            spread += f" ({statistics.median(each):.2f}x)"
        print(
            f"| {corpus.name} | {per_request} | "
            + " | ".join(row)
            + f" | {ratio} | {spread or '-'} |"
        )
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
