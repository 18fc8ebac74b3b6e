#!/usr/bin/env python3
"""Ingest benchmark: DCMTK storescu -> {dicomgate, Orthanc, DCMTK storescp} on loopback.

Run by hand (never as a timed test), from the repository root:

    .venv/bin/python bench/ingest.py                        # 1000 small MR, 400 CT, all three
    .venv/bin/python bench/ingest.py --small 200 --ct 50 --receivers storescp,orthanc
    .venv/bin/python bench/ingest.py --repeat 3 --json /tmp/ingest.json

The corpus is generated once (tests/corpus.py) into a temporary folder. For every receiver,
corpus and repeat, a fresh receiver is started on free 127.0.0.1 ports in its own empty
temporary folder, the corpus is sent in ONE association by ``storescu`` (environment
``TCP_NODELAY=1``), the receiver's instance count is checked, and the receiver is stopped.
The best (fastest valid) run per receiver and corpus is reported. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the [test] extra
    psutil = None

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.corpus import make_ct_series, make_mr_series  # noqa: E402

RECEIVERS = ("dicomgate", "orthanc", "storescp")
CORPORA = ("small", "ct")
READY_TIMEOUT = 60.0
STORESCU_TIMEOUT = 1800.0
SAMPLE_INTERVAL = 0.020
MB = 1_000_000  # throughput in SI megabytes (10^6 bytes) per second

# --------------------------------------------------------------------------- results


@dataclass
class Corpus:
    name: str  # "small" or "ct"
    folder: Path
    files: int
    bytes: int


@dataclass
class Run:
    receiver: str
    corpus: str
    repeat: int
    ok: bool = False
    error: str = ""
    seconds: float = 0.0
    instances_per_s: float = 0.0
    mb_per_s: float = 0.0
    expected: int = 0
    stored: int = 0
    storescu_rc: int | None = None
    startup_s: float = 0.0
    peak_rss_mb: float = 0.0


@dataclass
class Summary:
    receiver: str
    best: dict[str, Run | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    peak_rss_mb: float = 0.0


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def echo_ok(aet: str, port: int) -> bool:
    """A C-ECHO with DCMTK echoscu: the receiver negotiates and answers."""
    if shutil.which("echoscu") is None:
        return True
    run = subprocess.run(
        ["echoscu", "-aec", aet, "-to", "5", "127.0.0.1", str(port)],
        env=dcmtk_env(),
        capture_output=True,
        timeout=30,
    )
    return run.returncode == 0


def count_files(folder: Path, pattern: str) -> int:
    """Files under ``folder`` whose name matches ``pattern``, by ``os.scandir``: 0.6 ms for
    1000 files where ``Path.rglob`` took 7.6 ms. Polled every 10 ms by ``delivery.py`` and
    ``nodes.py``, rglob took three quarters of a core from the receiver under test."""
    n = 0
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    n += count_files(Path(entry.path), pattern)
                elif entry.is_file(follow_symlinks=False) and fnmatch.fnmatch(entry.name, pattern):
                    n += 1
    except FileNotFoundError:  # not created yet, or removed while we looked
        pass
    return n


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class RssSampler:
    """Polls the RSS of a process and all its descendants every 20 ms; keeps the peak.

    The peak also takes the kernel's high-water mark (VmHWM) of each process seen, so a
    spike between two samples is not missed for a single process.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._hwm: dict[int, int] = {}
        self._pids: list[int] = [pid]
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return max(self.peak, max(self._hwm.values(), default=0)) / (1024 * 1024)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def _refresh_pids(self) -> None:
        # Listing descendants scans all of /proc: do it every 0.5 s, not every sample,
        # so the sampler itself does not load a 2-core machine.
        self._pids = [self.pid]
        if psutil is not None:
            with contextlib.suppress(psutil.Error):
                self._pids += [c.pid for c in psutil.Process(self.pid).children(recursive=True)]

    def sample(self) -> None:
        if self._samples % 25 == 0:
            self._refresh_pids()
        self._samples += 1
        total = 0
        for pid in self._pids:
            rss, hwm = _proc_status_kb(pid)
            total += rss * 1024
            if hwm:
                self._hwm[pid] = max(self._hwm.get(pid, 0), hwm * 1024)
        self.peak = max(self.peak, total)


def _proc_status_kb(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, hwm


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the receiver (and then its own descendants), SIGKILL after 15 s."""
    if proc.poll() is not None:
        return
    children: list[Any] = []
    if psutil is not None:
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)
    for child in children:
        with contextlib.suppress(Exception):
            if child.is_running():
                child.kill()


# --------------------------------------------------------------------------- receivers


@dataclass
class Receiver:
    """One started receiver: how to reach it and how to count what it stored."""

    name: str
    aet: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    count: Callable[[], int]
    ready: Callable[[], bool]


def _spawn(cmd: list[str], cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    finally:
        out.close()


def wait_ready(rec: Receiver) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if rec.proc.poll() is not None:
            raise RuntimeError(f"exited with {rec.proc.returncode}: {tail(rec.log, 1)}")
        if rec.ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"not ready after {READY_TIMEOUT:.0f} s: {tail(rec.log)}")


def _dimse_ready(aet: str, port: int) -> Callable[[], bool]:
    def check() -> bool:
        return tcp_open(port) and echo_ok(aet, port)

    return check


def start_storescp(work: Path, fork: bool = False) -> Receiver:
    exe = shutil.which("storescp")
    if exe is None:
        raise RuntimeError("storescp not installed (apt-get install dcmtk)")
    out = work / "out"
    out.mkdir()
    port = free_port()
    log = work / "storescp.log"
    cmd = [exe, *(["--fork"] if fork else []), "--output-directory", str(out)]
    cmd += ["-aet", "STORESCP", "+xa", str(port)]
    proc = _spawn(cmd, work, log, dcmtk_env())
    return Receiver(
        "storescp",
        "STORESCP",
        port,
        proc,
        log,
        count=lambda: count_files(out, "*"),
        ready=_dimse_ready("STORESCP", port),
    )


def start_orthanc(work: Path) -> Receiver:
    exe = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None
    )
    if exe is None:
        raise RuntimeError("Orthanc not installed (apt-get install orthanc)")
    dicom_port, http_port = free_ports(2)
    config = {
        "Name": "dicomgate-bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
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
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log = work / "orthanc.log"
    proc = _spawn([exe, str(cfg)], work, log, dcmtk_env())
    base = f"http://127.0.0.1:{http_port}"

    def count() -> int:
        return int(http_json(f"{base}/statistics")["CountInstances"])

    def ready() -> bool:
        return http_status(f"{base}/system") == 200 and tcp_open(dicom_port)

    return Receiver("orthanc", "ORTHANC", dicom_port, proc, log, count=count, ready=ready)


#: The dicomgate command to benchmark (``--dicomgate-exe``); default: next to this Python.
DICOMGATE_EXE: Path | None = None


def _dicomgate_exe() -> Path:
    if DICOMGATE_EXE is not None:
        return DICOMGATE_EXE
    exe = Path(sys.executable).parent / "dicomgate"
    if exe.exists():
        return exe
    found = shutil.which("dicomgate")
    if found is None:
        raise RuntimeError("dicomgate command not found (pip install -e .)")
    return Path(found)


def start_dicomgate(work: Path) -> Receiver:
    exe = _dicomgate_exe()
    dimse_port, http_port = free_ports(2)
    data = work / "data"
    cfg = work / "dicomgate.yaml"
    cfg.write_text(
        f"storage: {{path: {json.dumps(str(data))}}}\n"
        f'database: {{url: "sqlite:///{data}/index.db"}}\n'
        f"dimse: {{ae_title: DICOMGATE, host: 127.0.0.1, port: {dimse_port}}}\n"
        f"http: {{host: 127.0.0.1, port: {http_port}}}\n"
    )
    log = work / "dicomgate.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMGATE_")}
    proc = _spawn([str(exe), "serve", "--config", str(cfg)], work, log, env)

    def ready() -> bool:
        if http_status(f"http://127.0.0.1:{http_port}/readyz") == 200:
            return True
        return tcp_open(dimse_port) and echo_ok("DICOMGATE", dimse_port)

    return Receiver(
        "dicomgate",
        "DICOMGATE",
        dimse_port,
        proc,
        log,
        count=lambda: count_files(data / "store", "*.dcm"),
        ready=ready,
    )


STARTERS: dict[str, Callable[[Path], Receiver]] = {
    "dicomgate": start_dicomgate,
    "orthanc": start_orthanc,
    "storescp": start_storescp,
}


# --------------------------------------------------------------------------- running


def storescu_cmd(rec: Receiver, corpus: Corpus, extra: list[str]) -> list[str]:
    return [
        "storescu",
        *extra,
        "-aec",
        rec.aet,
        "-aet",
        "STORESCU",
        "+sd",
        "+r",
        "127.0.0.1",
        str(rec.port),
        str(corpus.folder),
    ]


def measure(receiver: str, corpus: Corpus, repeat: int, root: Path, extra: list[str]) -> Run:
    run = Run(receiver=receiver, corpus=corpus.name, repeat=repeat, expected=corpus.files)
    work = Path(tempfile.mkdtemp(prefix=f"{receiver}-{corpus.name}-{repeat}-", dir=root))
    t0 = time.perf_counter()
    try:
        rec = STARTERS[receiver](work)
    except Exception as exc:  # a receiver that cannot start is a row, not a crash
        run.error = f"failed to start: {exc}"
        return run
    try:
        wait_ready(rec)
    except Exception as exc:
        stop_process(rec.proc)
        run.error = f"failed to start: {exc}"
        return run
    run.startup_s = time.perf_counter() - t0
    try:
        with RssSampler(rec.proc.pid) as sampler:
            scu_log = work / "storescu.log"
            with open(scu_log, "wb") as out:
                start = time.perf_counter()
                try:
                    proc = subprocess.run(
                        storescu_cmd(rec, corpus, extra),
                        env=dcmtk_env(),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        timeout=STORESCU_TIMEOUT,
                    )
                    run.storescu_rc = proc.returncode
                except subprocess.TimeoutExpired:
                    run.error = f"storescu did not finish in {STORESCU_TIMEOUT:.0f} s"
                run.seconds = time.perf_counter() - start
            try:
                run.stored = rec.count()
            except Exception as exc:
                run.error = run.error or f"cannot count instances: {exc}"
        run.peak_rss_mb = sampler.peak_mb
    finally:
        stop_process(rec.proc)
    run.instances_per_s = corpus.files / run.seconds if run.seconds else 0.0
    run.mb_per_s = corpus.bytes / MB / run.seconds if run.seconds else 0.0
    if not run.error:
        if run.storescu_rc != 0:
            run.error = f"storescu exit {run.storescu_rc}: {tail(scu_log, 3)}"
        elif run.stored != run.expected:
            run.error = f"stored {run.stored} of {run.expected}"
        elif rec.proc.returncode not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
            run.error = f"receiver exited with {rec.proc.returncode}: {tail(rec.log, 3)}"
    run.ok = not run.error
    # The run's folder stays until the end (the root is removed then, unless --keep):
    # deleting it here would slow file creation in the next runs (bench/README.md,
    # "Deleting between runs").
    return run


def make_corpus(root: Path, small: int, ct: int, seed: int) -> list[Corpus]:
    corpora: list[Corpus] = []
    for name, count, maker in (("small", small, make_mr_series), ("ct", ct, make_ct_series)):
        if count <= 0:
            continue
        folder = root / "corpus" / name
        paths = maker(folder, count, seed=seed)
        corpora.append(Corpus(name, folder, len(paths), sum(p.stat().st_size for p in paths)))
    return corpora


def summarize(runs: list[Run], receivers: list[str]) -> list[Summary]:
    out: list[Summary] = []
    for r in receivers:
        s = Summary(receiver=r)
        mine = [x for x in runs if x.receiver == r]
        s.peak_rss_mb = max((x.peak_rss_mb for x in mine), default=0.0)
        for c in CORPORA:
            valid = [x for x in mine if x.corpus == c and x.ok]
            s.best[c] = min(valid, key=lambda x: x.seconds) if valid else None
            failed = [x.error for x in mine if x.corpus == c and not x.ok]
            if failed and not valid:
                s.errors[c] = failed[-1]
        out.append(s)
    return out


def _cell(s: Summary, corpus: str, metric: str) -> str:
    best = s.best.get(corpus)
    if best is None:
        err = s.errors.get(corpus)
        if err is None:
            return "-"
        return "failed to start" if err.startswith("failed to start") else f"error: {err[:60]}"
    value = best.instances_per_s if metric == "inst" else best.mb_per_s
    return f"{value:,.0f}"


def table(summaries: list[Summary]) -> str:
    lines = [
        "| receiver | small MR inst/s | CT MB/s | peak RSS MB |",
        "|---|---:|---:|---:|",
    ]
    for s in summaries:
        rss = f"{s.peak_rss_mb:,.0f}" if s.peak_rss_mb else "-"
        lines.append(
            f"| {s.receiver} | {_cell(s, 'small', 'inst')} | {_cell(s, 'ct', 'mb')} | {rss} |"
        )
    return "\n".join(lines)


def ratios(summaries: list[Summary], ref: str = "dicomgate") -> list[str]:
    by = {s.receiver: s for s in summaries}
    if ref not in by:
        return []
    mine = by[ref]
    lines: list[str] = []
    for s in summaries:
        if s.receiver == ref:
            continue
        parts: list[str] = []
        for c, label in (("small", "small"), ("ct", "CT")):
            a, b = mine.best.get(c), s.best.get(c)
            if a is not None and b is not None and b.seconds:
                parts.append(f"{b.seconds / a.seconds:.2f}x {label}")
            elif c in mine.best or c in s.best:
                parts.append(f"n/a {label}")
        lines.append(f"{ref} / {s.receiver}: {', '.join(parts)}")
    return lines


def details(runs: list[Run]) -> Iterator[str]:
    for x in runs:
        status = "ok" if x.ok else x.error
        yield (
            f"  {x.receiver:<9} {x.corpus:<5} #{x.repeat}: {x.seconds:7.3f} s "
            f"{x.instances_per_s:8.1f} inst/s {x.mb_per_s:7.1f} MB/s "
            f"stored {x.stored}/{x.expected} rss {x.peak_rss_mb:6.1f} MB "
            f"(start {x.startup_s:.2f} s) {status}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--small", type=int, default=1000, help="small MR instances (default 1000)")
    ap.add_argument("--ct", type=int, default=400, help="CT 512x512 instances (default 400)")
    ap.add_argument(
        "--receivers",
        default=",".join(RECEIVERS),
        help="comma-separated subset of: " + ", ".join(RECEIVERS),
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; best is kept")
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed")
    ap.add_argument("--workdir", type=Path, help="parent of the temp folder (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, stores)")
    ap.add_argument(
        "--dicomgate-exe",
        type=Path,
        help="dicomgate command to run (default: the one next to this Python)",
    )
    ap.add_argument(
        "--storescu-args",
        default="",
        help="extra storescu options, e.g. '-R' or '-xi' (default: none)",
    )
    args = ap.parse_args(argv)
    args.receiver_list = [r.strip() for r in args.receivers.split(",") if r.strip()]
    bad = [r for r in args.receiver_list if r not in RECEIVERS]
    if bad or not args.receiver_list:
        ap.error(f"unknown receiver(s) {bad}; choose from {', '.join(RECEIVERS)}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    global DICOMGATE_EXE
    args = parse_args(argv)
    DICOMGATE_EXE = args.dicomgate_exe
    if shutil.which("storescu") is None:
        print("storescu not found: apt-get install dcmtk", file=sys.stderr)
        return 2
    if psutil is None:
        print("note: psutil missing; RSS covers the main process only", file=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="dicomgate-bench-", dir=args.workdir))
    extra = args.storescu_args.split()
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
        # Interleaved (repeat, corpus, receiver) so that load from other work on a noisy
        # machine falls on every receiver alike. A receiver that cannot start is not
        # retried for the same corpus.
        dead: set[tuple[str, str]] = set()
        for i in range(1, args.repeat + 1):
            for corpus in corpora:
                for receiver in args.receiver_list:
                    if (receiver, corpus.name) in dead:
                        continue
                    run = measure(receiver, corpus, i, root, extra)
                    runs.append(run)
                    print(next(details([run])), file=sys.stderr, flush=True)
                    if run.error.startswith("failed to start"):
                        dead.add((receiver, corpus.name))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}", file=sys.stderr)

    summaries = summarize(runs, args.receiver_list)
    print()
    print(
        f"storescu -> receiver, loopback, one association per corpus, "
        f"best of {args.repeat}; {os.cpu_count()} CPUs, {platform.platform()}"
    )
    print()
    print(table(summaries))
    rl = ratios(summaries)
    if rl:
        print()
        for line in rl:
            print(line)
    if args.json:
        payload = {
            "args": {
                "small": args.small,
                "ct": args.ct,
                "receivers": args.receiver_list,
                "repeat": args.repeat,
                "seed": args.seed,
                "storescu_args": extra,
            },
            "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "corpora": [{"name": c.name, "files": c.files, "bytes": c.bytes} for c in corpora],
            "runs": [asdict(r) for r in runs],
            "summary": [
                {
                    "receiver": s.receiver,
                    "peak_rss_mb": s.peak_rss_mb,
                    "best": {k: (asdict(v) if v else None) for k, v in s.best.items()},
                    "errors": s.errors,
                }
                for s in summaries
            ],
            "ratios": rl,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    any_ok = any(r.ok for r in runs)
    return 0 if any_ok else 1


if __name__ == "__main__":
    sys.exit(main())
