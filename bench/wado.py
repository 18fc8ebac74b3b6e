#!/usr/bin/env python3
"""WADO-RS series retrieve benchmark: dicomgate vs Orthanc (DICOMweb plugin), loopback.

Run by hand (never as a timed test), from the repository root:

    .venv/bin/python bench/wado.py                      # 400 CT 512x512, best of 3
    .venv/bin/python bench/wado.py --ct 100 --repeat 5 --servers dicomgate

A CT series (tests/corpus.py) is stored in each server with storescu (one association),
then the whole series is retrieved with WADO-RS by httpx, streaming, with
``Accept: multipart/related; type="application/dicom"; transfer-syntax=*`` (as stored, no
transcoding). Throughput is response bytes / wall time of the request (first byte sent to
last byte read), in 10^6 bytes per second; the best of ``--repeat`` runs is reported
after one warm-up retrieve (page cache warm for both servers). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.ingest import (  # noqa: E402
    dcmtk_env,
    free_ports,
    http_json,
    http_status,
    stop_process,
    tcp_open,
)
from tests.corpus import make_ct_series  # noqa: E402

MB = 1_000_000
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SERVERS = ("dicomgate", "orthanc")


@dataclass
class Server:
    name: str
    aet: str
    dimse_port: int
    base_url: str  # DICOMweb root
    proc: subprocess.Popen[bytes]
    log: Path
    ready: Callable[[], bool]
    count: Callable[[], int]


def _spawn(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - handed to the child, closed below
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMGATE_")}
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    finally:
        out.close()


def start_dicomgate(work: Path) -> Server:
    exe = Path(sys.executable).parent / "dicomgate"
    dimse, http = free_ports(2)
    data = work / "data"
    cfg = work / "dicomgate.yaml"
    cfg.write_text(
        f"storage: {{path: {json.dumps(str(data))}}}\n"
        f'database: {{url: "sqlite:///{data}/index.db"}}\n'
        f"dimse: {{ae_title: DICOMGATE, host: 127.0.0.1, port: {dimse}}}\n"
        f"http: {{host: 127.0.0.1, port: {http}}}\n"
        "logging: {level: WARNING}\n"
    )
    log = work / "dicomgate.log"
    proc = _spawn([str(exe), "serve", "--config", str(cfg)], work, log)
    return Server(
        "dicomgate",
        "DICOMGATE",
        dimse,
        f"http://127.0.0.1:{http}/dicomweb",
        proc,
        log,
        ready=lambda: http_status(f"http://127.0.0.1:{http}/readyz") == 200,
        count=lambda: sum(1 for _ in (data / "store").rglob("*.dcm")),
    )


def start_orthanc(work: Path) -> Server:
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(exe).exists() or not DICOMWEB_PLUGIN.exists():
        raise RuntimeError("needs orthanc and orthanc-dicomweb (apt-get install ...)")
    dimse, http = free_ports(2)
    config = {
        "Name": "dicomgate-bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "StorageCompression": False,
        "HttpPort": http,
        "DicomPort": dimse,
        "DicomAet": "ORTHANC",
        "DicomCheckCalledAet": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SaveJobs": False,
    }
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log = work / "orthanc.log"
    proc = _spawn([exe, str(cfg)], work, log)
    base = f"http://127.0.0.1:{http}"
    return Server(
        "orthanc",
        "ORTHANC",
        dimse,
        f"{base}/dicom-web",
        proc,
        log,
        ready=lambda: http_status(f"{base}/system") == 200 and tcp_open(dimse),
        count=lambda: int(http_json(f"{base}/statistics")["CountInstances"]),
    )


STARTERS = {"dicomgate": start_dicomgate, "orthanc": start_orthanc}


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def retrieve(url: str) -> tuple[int, float]:
    """(bytes received, seconds) of one streamed series retrieve."""
    received = 0
    with httpx.Client(timeout=600) as client:
        start = time.perf_counter()
        with client.stream("GET", url, headers={"Accept": ACCEPT}) as response:
            response.raise_for_status()
            for chunk in response.iter_raw(1 << 20):
                received += len(chunk)
        elapsed = time.perf_counter() - start
    return received, elapsed


def run_server(
    name: str, work: Path, files: list[Path], study: str, series: str, repeat: int
) -> dict[str, float]:
    server = STARTERS[name](work)
    try:
        wait(server.ready, 60, f"{name} to start")
        sent = subprocess.run(
            [
                "storescu",
                "-aec",
                server.aet,
                "+sd",
                "+r",
                "127.0.0.1",
                str(server.dimse_port),
                str(files[0].parent),
            ],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if sent.returncode != 0:
            raise RuntimeError(f"storescu to {name} failed: {sent.stdout[-500:]}")
        wait(lambda: server.count() >= len(files), 120, f"{name} to hold every instance")
        url = f"{server.base_url}/studies/{study}/series/{series}"
        size, _ = retrieve(url)  # warm-up
        expected = sum(p.stat().st_size for p in files)
        if size < expected:
            raise RuntimeError(f"{name}: {size} bytes received, fewer than the files' {expected}")
        best = min(retrieve(url)[1] for _ in range(repeat))
        return {"bytes": size, "seconds": best, "mb_per_s": size / best / MB}
    finally:
        stop_process(server.proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=400, help="CT instances (512x512)")
    parser.add_argument("--repeat", type=int, default=3, help="timed retrieves, best is kept")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    import pydicom

    with tempfile.TemporaryDirectory(prefix="wado-bench-", dir=args.workdir) as tmp:
        root = Path(tmp)
        files = make_ct_series(root / "ct", args.ct, seed=7)
        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        study, series = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
        results: dict[str, dict[str, float]] = {}
        for name in args.servers.split(","):
            work = root / name
            work.mkdir()
            try:
                results[name] = run_server(name, work, files, study, series, args.repeat)
            except RuntimeError as exc:
                print(f"{name}: {exc}", file=sys.stderr)
    print(
        f"WADO-RS series retrieve, {args.ct} CT 512x512, transfer-syntax=*, best of {args.repeat}"
    )
    print("| server | MB | seconds | MB/s |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['bytes'] / MB:.1f} | {r['seconds']:.3f} | {r['mb_per_s']:.0f} |")
    if "dicomgate" in results and "orthanc" in results:
        ratio = results["dicomgate"]["mb_per_s"] / results["orthanc"]["mb_per_s"]
        print(f"dicomgate / orthanc: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
