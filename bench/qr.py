#!/usr/bin/env python3
"""Query/Retrieve SCP benchmark: C-MOVE rate against Orthanc, and C-FIND study latency.

Run by hand (never as a timed test), from the repository root:

    .venv/bin/python bench/qr.py                      # 400 CT, 3 moves each; 10^5-instance find
    .venv/bin/python bench/qr.py --ct 100 --repeat 1 --instances 20000 --studies 400
    .venv/bin/python bench/qr.py --skip-find --json /tmp/qr.json

1. C-MOVE: one 400-instance CT study (``tests/corpus.py``) is loaded with storescu into a
   fresh dicomgate and a fresh Orthanc; each is asked by ``movescu`` (Study Root, STUDY
   level) to move it to the same DCMTK ``storescp``; the time is movescu's wall time, from
   its start to its exit, and storescp must hold every instance afterwards. Moves from the
   two alternate, ``--repeat`` times; the best of each is reported.
2. C-FIND: ``bench/qido.py``'s generator writes an index of ``--instances`` rows across
   ``--studies`` studies; dicomgate serves it; a minimal socket SCU sends ``--searches`` STUDY
   level C-FINDs (qido.py's four kinds: PatientName wildcard, StudyDate range,
   ModalitiesInStudy, no filter) over one association, each timed from request to final
   response. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ingest import (  # noqa: E402
    Receiver,
    _dicomgate_exe,
    _spawn,
    dcmtk_env,
    echo_ok,
    free_ports,
    http_status,
    start_orthanc,
    start_storescp,
    stop_process,
    wait_ready,
)
from qido import KINDS, percentile, populate, searches  # noqa: E402

SCP_AET = "STORESCP"


def start_gateway(
    work: Path, scp_port: int, data: Path | None = None, associations: int = 1
) -> Receiver:
    """dicomgate with the storescp as a move destination (and its own index in ``data``)."""
    dimse_port, http_port = free_ports(2)
    data = data or work / "data"
    cfg = work / "dicomgate.yaml"
    cfg.write_text(
        f"storage: {{path: {json.dumps(str(data))}}}\n"
        f'database: {{url: "sqlite:///{data}/index.db"}}\n'
        f"dimse: {{ae_title: DICOMGATE, host: 127.0.0.1, port: {dimse_port},"
        f" move_destinations: {{{SCP_AET}: {{host: 127.0.0.1, port: {scp_port},"
        f" max_associations: {associations}}}}}}}\n"
        f"http: {{host: 127.0.0.1, port: {http_port}}}\n"
        "logging: {level: WARNING}\n"
    )
    log = work / "dicomgate.log"
    proc = _spawn([str(_dicomgate_exe()), "serve", "--config", str(cfg)], work, log, dcmtk_env())

    def ready() -> bool:
        return http_status(f"http://127.0.0.1:{http_port}/readyz") == 200 and echo_ok(
            "DICOMGATE", dimse_port
        )

    return Receiver("dicomgate", "DICOMGATE", dimse_port, proc, log, lambda: 0, ready)


def orthanc_add_modality(work: Path, scp_port: int) -> None:
    """Orthanc moves only to, and only for, modalities it knows: the storescp and movescu."""
    http_port = json.loads((work / "orthanc.json").read_text())["HttpPort"]
    for aet, port in ((SCP_AET, scp_port), ("MOVESCU", 9)):
        body = json.dumps({"AET": aet, "Host": "127.0.0.1", "Port": port}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/modalities/{aet}", data=body, method="PUT"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


def load(rec: Receiver, corpus: Path) -> None:
    sent = subprocess.run(
        ["storescu", "-aec", rec.aet, "+sd", "+r", "127.0.0.1", str(rec.port), str(corpus)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if sent.returncode != 0:
        raise RuntimeError(f"storescu into {rec.name} failed: {sent.stderr[-500:]}")


def timed_move(rec: Receiver, study_uid: str, out: Path, expected: int) -> float:
    for old in out.iterdir():
        old.unlink()
    start = time.perf_counter()
    proc = subprocess.run(
        [
            *("movescu", "-S", "-aec", rec.aet, "-aet", "MOVESCU", "-aem", SCP_AET),
            *("-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"),
            *("127.0.0.1", str(rec.port)),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    got = sum(1 for _ in out.iterdir())
    if proc.returncode != 0 or got != expected:
        raise RuntimeError(f"{rec.name}: movescu rc={proc.returncode}, {got}/{expected} received")
    return elapsed


def bench_move(
    work: Path, count: int, repeat: int, seed: int, associations: int = 1
) -> dict[str, Any]:
    from pydicom import dcmread
    from tests.corpus import make_ct_series

    corpus = work / "corpus"
    paths = make_ct_series(corpus, count, seed=seed)
    size = sum(p.stat().st_size for p in paths)
    study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    receivers: list[Receiver] = []
    try:
        scp_dir = work / "storescp"
        scp_dir.mkdir()
        scp = start_storescp(scp_dir, fork=associations > 1)
        receivers.append(scp)
        wait_ready(scp)
        out = scp_dir / "out"
        gw_dir, orthanc_dir = work / "dicomgate", work / "orthanc"
        gw_dir.mkdir()
        orthanc_dir.mkdir()
        gw = start_gateway(gw_dir, scp.port, associations=associations)
        receivers.append(gw)
        orthanc = start_orthanc(orthanc_dir)
        receivers.append(orthanc)
        wait_ready(gw)
        wait_ready(orthanc)
        orthanc_add_modality(orthanc_dir, scp.port)
        load(gw, corpus)
        load(orthanc, corpus)
        times: dict[str, list[float]] = {"dicomgate": [], "orthanc": []}
        for n in range(repeat):
            for rec in (gw, orthanc) if n % 2 == 0 else (orthanc, gw):
                elapsed = timed_move(rec, study_uid, out, count)
                times[rec.name].append(elapsed)
                print(
                    f"move {rec.name}: {count} in {elapsed:.2f} s"
                    f" ({count / elapsed:.0f} inst/s, {size / elapsed / 1e6:.0f} MB/s)",
                    file=sys.stderr,
                )
    finally:
        for rec in receivers:
            stop_process(rec.proc)
    best = {name: min(values) for name, values in times.items()}
    return {
        "instances": count,
        "bytes": size,
        "seconds": times,
        "best_seconds": best,
        "best_inst_per_s": {name: count / t for name, t in best.items()},
        "ratio_dicomgate_over_orthanc": best["orthanc"] / best["dicomgate"],
    }


class RawFindClient:
    """A minimal C-FIND SCU on a plain socket (PDUs by hand, as in the bad-input tests):
    pynetdicom's reactors poll with millisecond sleeps and would dominate the timing."""

    def __init__(self, port: int, called: str) -> None:
        import socket

        from tests.integration.test_dimse_bad_input import RawPeer

        self.peer = RawPeer(port, timeout=60)
        self.peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer.associate(called, [(1, STUDY_ROOT_FIND, [IMPLICIT_LE])])
        self.message_id = 0

    def find(self, identifier: Any) -> int:
        """Send one C-FIND-RQ; read every response; return the number of matches."""
        import struct

        from pynetdicom.dsutils import encode
        from tests.integration.test_dimse_bad_input import _element, p_data

        from dicomgate.dimse.commands import decode_command

        self.message_id += 1
        elements = (
            _element(0x00000002, STUDY_ROOT_FIND.encode())
            + _element(0x00000100, struct.pack("<H", 0x0020))
            + _element(0x00000110, struct.pack("<H", self.message_id))
            + _element(0x00000700, struct.pack("<H", 0))
            + _element(0x00000800, struct.pack("<H", 0))
        )
        command = _element(0x00000000, struct.pack("<I", len(elements))) + elements
        body = encode(identifier, True, True)
        assert body is not None
        self.peer.send(p_data(1, command, command=True) + p_data(1, body, command=False))
        matches = 0
        buffer = b""
        while True:
            pdu = self.peer.read_pdu()
            pos = 0
            while pos < len(pdu.body):
                length, _, control = struct.unpack_from(">IBB", pdu.body, pos)
                fragment = pdu.body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if not control & 1:
                    continue  # an identifier
                buffer += fragment
                if control & 2:
                    status = decode_command(buffer).status
                    buffer = b""
                    if status in (0xFF00, 0xFF01):
                        matches += 1
                    elif status == 0x0000:
                        return matches
                    else:
                        raise RuntimeError(f"C-FIND status 0x{status:04X}")

    def close(self) -> None:
        self.peer.release()
        self.peer.close()


STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def bench_find(work: Path, instances: int, studies: int, count: int, seed: int) -> dict[str, Any]:
    from pydicom.dataset import Dataset

    data = work / "find-data"
    data.mkdir()
    started = time.perf_counter()
    populate(f"sqlite:///{data}/index.db", instances, studies, seed)
    print(
        f"index of {instances} instances in {time.perf_counter() - started:.0f} s", file=sys.stderr
    )
    gw = start_gateway(work, 9, data)  # no move destination used
    try:
        wait_ready(gw)
        client = RawFindClient(gw.port, "DICOMGATE")
        latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
        matches: dict[str, list[int]] = {kind: [] for kind in KINDS}
        for kind, params in searches(count, seed):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            for key in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate"):
                setattr(ds, key, "")
            ds.ModalitiesInStudy = ""
            ds.NumberOfStudyRelatedInstances = ""
            for key, value in params.items():
                if key not in ("limit", "offset"):
                    setattr(ds, key, value)
            start = time.perf_counter()
            n = client.find(ds)
            latencies[kind].append((time.perf_counter() - start) * 1000)
            matches[kind].append(n)
        client.close()
    finally:
        stop_process(gw.proc)
    every = [v for values in latencies.values() for v in values]
    return {
        "instances": instances,
        "studies": studies,
        "searches": count,
        "p50_ms": statistics.median(every),
        "p95_ms": percentile(every, 0.95),
        "per_kind": {
            kind: {
                "p50_ms": statistics.median(values),
                "p95_ms": percentile(values, 0.95),
                "mean_matches": statistics.mean(matches[kind]),
            }
            for kind, values in latencies.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=400, help="CT instances in the moved study")
    parser.add_argument("--repeat", type=int, default=3, help="moves from each (best counts)")
    parser.add_argument("--instances", type=int, default=100_000, help="index rows for C-FIND")
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--searches", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--associations",
        type=int,
        default=1,
        help="dicomgate's max_associations to the move destination; above 1 storescp runs"
        " with --fork (one process per association, for both movers)",
    )
    parser.add_argument("--skip-move", action="store_true")
    parser.add_argument("--skip-find", action="store_true")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    for tool in ("movescu", "storescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not installed (apt-get install dcmtk)")
    work = Path(tempfile.mkdtemp(prefix="dicomgate-bench-qr-"))
    result: dict[str, Any] = {}
    try:
        if not args.skip_move:
            (work / "move").mkdir()
            move = bench_move(work / "move", args.ct, args.repeat, args.seed, args.associations)
            result["move"] = move
            rate = move["best_inst_per_s"]
            print(
                f"| C-MOVE {args.ct} CT to storescp | dicomgate {rate['dicomgate']:.0f} inst/s"
                f" | orthanc {rate['orthanc']:.0f} inst/s"
                f" | ratio {move['ratio_dicomgate_over_orthanc']:.2f}x |"
            )
        if not args.skip_find:
            (work / "find").mkdir()
            found = bench_find(
                work / "find", args.instances, args.studies, args.searches, args.seed
            )
            result["find"] = found
            print(
                f"| C-FIND STUDY at {args.instances} instances | p50 {found['p50_ms']:.1f} ms"
                f" | p95 {found['p95_ms']:.1f} ms |"
            )
            for kind, numbers in found["per_kind"].items():
                print(
                    f"|   {kind} | p50 {numbers['p50_ms']:.1f} ms | p95 {numbers['p95_ms']:.1f} ms"
                    f" | {numbers['mean_matches']:.0f} matches |"
                )
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
