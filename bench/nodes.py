#!/usr/bin/env python3
"""Scale-out benchmark: 1, 2, 3 gateway nodes on one PostgreSQL behind HAProxy, end to end.

Run by hand (never as a timed test), from the repository root, with dcmtk, haproxy and a
PostgreSQL server on 127.0.0.1:5432 (user ``postgres``, trust or ``PGPASSWORD``):

    .venv/bin/python bench/nodes.py                          # 1,2,3 nodes + SQLite, 1200 MR
    .venv/bin/python bench/nodes.py --instances 400 --nodes 1,3 --no-sqlite
    .venv/bin/python bench/nodes.py --json /tmp/nodes.json

Each run starts from nothing: a fresh PostgreSQL database (dropped afterwards), N
``dicomgate serve`` nodes sharing one store folder, Debian's HAProxy (TCP, round robin) in
front of their DIMSE ports, and DCMTK ``storescp`` as the destination of one route
``match: {}``. ``--streams`` storescu processes (one association each) send the corpus
through HAProxy at once. The clock runs from the first storescu start until storescp holds
every instance (ingest, index, route, lease and delivery all included). CPU time (user +
system) of every node is read with psutil before and after; ``cpu ms/inst`` is a node's CPU
time divided by the instances the cluster moved, summed over the nodes it is the cost of one
instance through the cluster. The SQLite row is one node with the embedded default.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (
    _dicomgate_exe,
    count_files,
    dcmtk_env,
    echo_ok,
    free_ports,
    http_status,
    make_corpus,
    stop_process,
    tail,
)

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


@dataclass
class Result:
    setup: str  # "postgresql x3", "sqlite x1"
    nodes: int
    instances: int
    seconds: float
    rate: float  # instances/s end to end
    cpu_ms_per_instance: list[float]  # per node
    machine_cpu_percent: float  # whole machine, average over the run


def _create_database() -> str:
    import psycopg

    name = f"dicomgate_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _haproxy(work: Path, backends: list[tuple[int, int]]) -> tuple[subprocess.Popen[bytes], int]:
    (port,) = free_ports(1)
    servers = "\n".join(
        f"  server n{i} 127.0.0.1:{dimse} check port {http}"
        for i, (dimse, http) in enumerate(backends)
    )
    cfg = work / "haproxy.cfg"
    cfg.write_text(
        "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 2s\n"
        "  timeout client 120s\n  timeout server 120s\n"
        f"frontend dimse\n  bind 127.0.0.1:{port}\n  default_backend nodes\n"
        "backend nodes\n  balance roundrobin\n  option httpchk GET /readyz\n"
        f"  default-server inter 500ms rise 1\n{servers}\n"
    )
    log = open(work / "haproxy.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=log, stderr=log)
    log.close()
    return proc, port


def run_once(
    work: Path, files: list[Path], nodes: int, url: str, streams: int, label: str
) -> Result:
    exe = _dicomgate_exe()
    out = work / "received"
    out.mkdir()
    (scp_port,) = free_ports(1)
    scp = subprocess.Popen(
        # --fork: one process per association, as a PACS serves several senders at once.
        ["storescp", "--fork", "-aet", "STORESCP", "--output-directory", str(out), str(scp_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dcmtk_env(),
    )
    procs: list[subprocess.Popen[bytes]] = []
    backends: list[tuple[int, int]] = []
    proxy: subprocess.Popen[bytes] | None = None
    try:
        for n in range(nodes):
            dimse, http = free_ports(2)
            node = work / f"node{n}"
            node.mkdir()
            cfg = node / "dicomgate.yaml"
            cfg.write_text(
                f"storage: {{path: {json.dumps(str(work / 'store'))}}}\n"
                f"database: {{url: {json.dumps(url)}}}\n"
                f"node: {{name: node{n}}}\n"
                f"dimse: {{ae_title: DICOMGATE, host: 127.0.0.1, port: {dimse}}}\n"
                f"http: {{host: 127.0.0.1, port: {http}}}\n"
                "logging: {level: WARNING}\n"
                "destinations:\n"
                f"  pacs: {{type: dimse, ae_title: STORESCP, host: 127.0.0.1, port: {scp_port}}}\n"
                "routes: [{name: all, match: {}, to: [pacs]}]\n"
            )
            log = open(node / "dicomgate.log", "wb")  # noqa: SIM115
            procs.append(
                subprocess.Popen([str(exe), "serve", "--config", str(cfg)], stdout=log, stderr=log)
            )
            log.close()
            backends.append((dimse, http))
            deadline = time.monotonic() + 30
            while http_status(f"http://127.0.0.1:{http}/readyz") != 200:
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"node{n} did not start: {tail(node / 'dicomgate.log')}")
                time.sleep(0.05)
        proxy, port = _haproxy(work, backends)
        deadline = time.monotonic() + 10
        while not echo_ok("DICOMGATE", port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy does not forward: {tail(work / 'haproxy.log')}")
            time.sleep(0.1)
        time.sleep(1.0)  # every backend passed its first health check
        cpu = [psutil.Process(p.pid) for p in procs]
        before = [sum(c.cpu_times()[:2]) for c in cpu]
        psutil.cpu_percent(None)
        slices = [files[i::streams] for i in range(streams)]
        started = time.monotonic()
        senders = [
            subprocess.Popen(
                ["storescu", "-aec", "DICOMGATE", "127.0.0.1", str(port), *map(str, part)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=dcmtk_env(),
            )
            for part in slices
            if part
        ]
        for sender in senders:
            if sender.wait(600) != 0:
                raise RuntimeError(f"storescu exited with {sender.returncode}")
        while count_files(out, "*") < len(files):
            if time.monotonic() - started > 600:
                raise RuntimeError("delivery did not finish in 10 minutes")
            time.sleep(0.01)
        seconds = time.monotonic() - started
        machine = psutil.cpu_percent(None)
        after = [sum(c.cpu_times()[:2]) for c in cpu]
    finally:
        if proxy is not None:
            stop_process(proxy)
        for proc in procs:
            stop_process(proc)
        stop_process(scp)
    return Result(
        setup=f"{label} x{nodes}",
        nodes=nodes,
        instances=len(files),
        seconds=round(seconds, 2),
        rate=round(len(files) / seconds, 1),
        cpu_ms_per_instance=[
            round((a - b) * 1000 / len(files), 2) for a, b in zip(after, before, strict=True)
        ],
        machine_cpu_percent=machine,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1200, help="small MR instances")
    parser.add_argument("--streams", type=int, default=8, help="parallel storescu")
    parser.add_argument("--nodes", default="1,2,3", help="node counts to run on PostgreSQL")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite one-node run")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    for tool in ("haproxy", "storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"needs {tool} (make peers)", file=sys.stderr)
            return 2
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="dicomgate-nodes-") as tmp:
        root = Path(tmp)
        (corpus,) = make_corpus(root, args.instances, 0, seed=8)
        files = sorted(corpus.folder.glob("*.dcm"))
        plan = [("postgresql", int(n)) for n in args.nodes.split(",")]
        if not args.no_sqlite:
            plan.append(("sqlite", 1))
        for label, nodes in plan:
            work = root / f"{label}-{nodes}"
            work.mkdir()
            database = None
            if label == "postgresql":
                database = _create_database()
                url = f"postgresql://postgres@127.0.0.1:5432/{database}"
            else:
                url = f"sqlite:///{work}/index.db"
            try:
                result = run_once(work, files, nodes, url, args.streams, label)
            finally:
                if database is not None:
                    _drop_database(database)
            results.append(result)
            print(
                f"{result.setup:<14} {result.instances} inst in {result.seconds:6.2f} s"
                f" = {result.rate:7.1f} inst/s; cpu ms/inst per node"
                f" {result.cpu_ms_per_instance} (sum {sum(result.cpu_ms_per_instance):.2f});"
                f" machine cpu {result.machine_cpu_percent:.0f}%",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
