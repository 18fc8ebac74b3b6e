#!/usr/bin/env python3
"""QIDO-RS latency benchmark: study searches on an index of 10^5 instances.

Run by hand (never as a timed test), from the repository root:

    .venv/bin/python bench/qido.py                          # 100,000 instances, 2,000 studies
    .venv/bin/python bench/qido.py --instances 20000 --studies 400 --searches 400
    .venv/bin/python bench/qido.py --json /tmp/qido.json --keep

The index rows are generated straight into a fresh SQLite index with SQLAlchemy (no
files: QIDO answers from the index only), then ``dicomgate serve`` is started on it and
the searches are timed from a keep-alive HTTP client on loopback. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
DICOMGATE = shutil.which("dicomgate") or str(Path(sys.executable).parent / "dicomgate")
SURNAMES = [
    "Smith", "Müller", "García", "Dubois", "Rossi", "Nowak", "Jensen", "Kowalski", "Silva",
    "Brown", "Martin", "Bernard", "Lefèvre", "Schmidt", "Novák", "Johansson", "Ødegård",
    "Papadopoulos", "Yilmaz", "Kim",
]  # fmt: skip
GIVEN = ["Anna", "John", "Jérôme", "Maria", "Li", "Ahmed", "Zoë", "Olaf", "Chloé", "Sam"]
MODALITIES = ["CT", "MR", "US", "CR", "DX", "MG", "PT", "NM", "XA", "OT"]
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
}
OTHER_CLASS = "1.2.840.10008.5.1.4.1.1.7"
KINDS = ("PatientName wildcard", "StudyDate range", "ModalitiesInStudy", "no filter, limit=100")


def populate(url: str, instances: int, studies: int, seed: int) -> None:
    """Write ``instances`` instance rows across ``studies`` studies (2 studies per patient)."""
    from sqlalchemy import insert

    from dicomgate.index.db import Index
    from dicomgate.index.extract import STUDY_PATIENT_COLUMNS, search_name
    from dicomgate.index.schema import instance, patient, series, study

    rng = random.Random(seed)
    index = Index.open(url)
    now = datetime.now(UTC)
    per_study = max(1, instances // studies)
    patients, study_rows, series_rows, instance_rows = [], [], [], []
    series_pk = 0
    for s in range(studies):
        patient_pk = s // 2 + 1
        if s % 2 == 0:
            name = f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}"
            patients.append(
                {
                    "id": patient_pk,
                    "patient_id": f"PID{patient_pk:06d}",
                    "issuer_of_patient_id": "",
                    "patient_name": name,
                    "patient_name_search": search_name(name),
                    "patient_birth_date": f"{rng.randrange(1930, 2020)}0101",
                    "patient_sex": rng.choice("MFO"),
                }
            )
        day = date(2015, 1, 1) + timedelta(days=rng.randrange(3650))
        study_rows.append(
            {
                "id": s + 1,
                "study_instance_uid": f"1.2.826.0.1.3680043.10.1.{s + 1}",
                "patient_pk": patient_pk,
                "study_date": day.strftime("%Y%m%d"),
                "study_time": f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}00",
                "accession_number": f"ACC{s + 1:07d}",
                "referring_physician_name": "Referrer^Rita",
                "referring_physician_name_search": "REFERRER^RITA",
                "study_id": str(s + 1),
                "study_description": rng.choice(["CT CHEST", "MR BRAIN", "US ABDOMEN", "XR"]),
                "last_received_at": now,
                # The study's own copy of its patient's attributes (index/schema.py).
                **{k: patients[-1][k] for k in STUDY_PATIENT_COLUMNS},
            }
        )
        count = per_study + (1 if s < instances - per_study * studies else 0)
        n_series = rng.randrange(1, 4)
        for k in range(n_series):
            series_pk += 1
            modality = rng.choice(MODALITIES)
            series_rows.append(
                {
                    "id": series_pk,
                    "series_instance_uid": f"1.2.826.0.1.3680043.10.2.{series_pk}",
                    "study_pk": s + 1,
                    "modality": modality,
                    "series_number": k + 1,
                    "series_description": f"series {k + 1}",
                    "series_date": day.strftime("%Y%m%d"),
                    "last_received_at": now,
                }
            )
            share = count // n_series + (1 if k < count % n_series else 0)
            for i in range(share):
                number = len(instance_rows) + 1
                instance_rows.append(
                    {
                        "sop_instance_uid": f"1.2.826.0.1.3680043.10.3.{number}",
                        "series_pk": series_pk,
                        "sop_class_uid": SOP_CLASS.get(modality, OTHER_CLASS),
                        "instance_number": i + 1,
                        "rows": 512,
                        "columns": 512,
                        "bits_allocated": 16,
                        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                        "relpath": f"bench/{number}.dcm",
                        "size": 525_000,
                        "sha256": "0" * 64,
                        "received_via": "bench",
                        "received_at": now,
                        "is_current": True,
                    }
                )
    with index.engine.begin() as connection:
        for table, rows in (
            (patient, patients),
            (study, study_rows),
            (series, series_rows),
            (instance, instance_rows),
        ):
            for start in range(0, len(rows), 10_000):
                connection.execute(insert(table), rows[start : start + 10_000])
        connection.exec_driver_sql("ANALYZE")
    index.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def searches(count: int, seed: int) -> list[tuple[str, dict[str, str]]]:
    """``count`` study searches, the four kinds in turn."""
    rng = random.Random(seed)
    out: list[tuple[str, dict[str, str]]] = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        if kind == KINDS[0]:
            params = {"PatientName": rng.choice(SURNAMES)[:3] + "*"}
        elif kind == KINDS[1]:
            start = date(2015, 1, 1) + timedelta(days=rng.randrange(3600))
            end = start + timedelta(days=30)
            params = {"StudyDate": f"{start:%Y%m%d}-{end:%Y%m%d}"}
        elif kind == KINDS[2]:
            params = {"ModalitiesInStudy": rng.choice(MODALITIES), "limit": "100"}
        else:
            params = {"limit": "100", "offset": str(rng.randrange(0, 1900))}
        out.append((kind, params))
    return out


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--studies", type=int, default=2_000)
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the index and the log")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="qido-bench-", dir=args.workdir))
    data = root / "data"
    url = f"sqlite:///{data}/index.db"
    started = time.perf_counter()
    populate(url, args.instances, args.studies, args.seed)
    print(
        f"index: {args.instances} instances, {args.studies} studies "
        f"in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    http_port = free_port()
    config = {
        "storage": {"path": str(data)},
        "database": {"url": url},
        "dimse": {"ae_title": "DICOMGATE", "host": "127.0.0.1", "port": free_port()},
        "http": {"host": "127.0.0.1", "port": http_port},
        "logging": {"level": "WARNING"},
    }
    (root / "dicomgate.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    log = (root / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [DICOMGATE, "serve", "--config", str(root / "dicomgate.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    base = f"http://127.0.0.1:{http_port}"
    timings: dict[str, list[float]] = {kind: [] for kind in KINDS}
    matches: dict[str, list[int]] = {kind: [] for kind in KINDS}
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"gateway did not start; see {root / 'gateway.log'}")
                time.sleep(0.1)
            for _, params in searches(20, args.seed + 1):  # warm-up, not counted
                client.get("/dicomweb/studies", params=params).raise_for_status()
            for kind, params in searches(args.searches, args.seed):
                t0 = time.perf_counter()
                response = client.get("/dicomweb/studies", params=params)
                elapsed = (time.perf_counter() - t0) * 1000
                response.raise_for_status()
                timings[kind].append(elapsed)
                matches[kind].append(len(response.json()))
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()

    every = [t for values in timings.values() for t in values]
    rows = [(kind, timings[kind], matches[kind]) for kind in KINDS] + [("all", every, [])]
    print("| study search | n | mean matches | p50 ms | p95 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, values, found in rows:
        mean_found = f"{statistics.mean(found):.0f}" if found else "-"
        print(
            f"| {kind} | {len(values)} | {mean_found} | {percentile(values, 0.5):.1f} "
            f"| {percentile(values, 0.95):.1f} | {max(values):.1f} |"
        )
    p95 = percentile(every, 0.95)
    print(f"\np95 over all searches: {p95:.1f} ms (target < 50 ms)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "instances": args.instances,
                    "studies": args.studies,
                    "timings_ms": timings,
                    "p95_ms": p95,
                },
                indent=2,
            )
        )
    if args.keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
