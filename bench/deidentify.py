#!/usr/bin/env python3
"""De-identification benchmark: small MR instances through the ``deidentify`` step.

Run by hand (never as a timed test), from the repository root:

    .venv/bin/python bench/deidentify.py                           # 1000 small MR, best of 3
    .venv/bin/python bench/deidentify.py --count 500 --repeat 5 --json /tmp/deid.json
    .venv/bin/python bench/deidentify.py --options retain_uids,clean_descriptors

One process, one thread. Three measurements on the same corpus (``tests/corpus.py`` small
MR, 64x64, about 12 KB a file):

* ``step``: ``Deidentify.apply`` alone on data sets already read into memory (read again
  before every repeat, so every run de-identifies fresh data sets): the step's own cost;
* ``file to file``: ``Pipeline.process_file`` per file (pydicom read, the step,
  ``write_part10``), what a delivery worker or ``dicomgate process`` does per instance;
* ``read + write only``: the same file to file path without the step (pydicom's own I/O
  floor), for comparison.

Target (issue #6): de-identification >= 1,000 small instances/s.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.corpus import make_mr_series  # noqa: E402

from dicomgate.processing.base import StepContext  # noqa: E402
from dicomgate.processing.pipeline import Pipeline, build, write_part10  # noqa: E402

SECRET_ENV = {"DEID_SECRET": "benchmark-secret-0123456789abcdef"}


def pipeline_for(options: list[str]) -> Pipeline:
    spec = [{"deidentify": {"options": options, "secret_env": "DEID_SECRET"}}]
    return build(spec, "pipeline", StepContext(environ=SECRET_ENV))


def best_rate(runs: list[float], count: int) -> float:
    return count / min(runs)


def measure(files: list[Path], pipeline: Pipeline, repeat: int, work: Path) -> dict[str, Any]:
    blobs = [f.read_bytes() for f in files]
    step_runs, file_runs, io_runs = [], [], []
    for n in range(repeat):
        datasets = [pydicom.dcmread(io.BytesIO(b)) for b in blobs]
        started = time.perf_counter()
        for ds in datasets:
            pipeline.run(ds)
        step_runs.append(time.perf_counter() - started)

        out = work / f"run{n}"
        started = time.perf_counter()
        for i, source in enumerate(files):
            pipeline.process_file(source, out / str(i))
        file_runs.append(time.perf_counter() - started)

        plain = work / f"plain{n}"
        plain.mkdir(parents=True)
        started = time.perf_counter()
        for i, source in enumerate(files):
            write_part10(pydicom.dcmread(source), plain / f"{i}.dcm")
        io_runs.append(time.perf_counter() - started)
        print(
            f"run {n + 1}: step {len(files) / step_runs[-1]:,.0f}/s, file to file "
            f"{len(files) / file_runs[-1]:,.0f}/s, read + write only "
            f"{len(files) / io_runs[-1]:,.0f}/s",
            file=sys.stderr,
        )
    return {
        "count": len(files),
        "step_per_s": best_rate(step_runs, len(files)),
        "file_to_file_per_s": best_rate(file_runs, len(files)),
        "read_write_only_per_s": best_rate(io_runs, len(files)),
        "runs_s": {"step": step_runs, "file_to_file": file_runs, "read_write_only": io_runs},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="small MR instances")
    parser.add_argument("--repeat", type=int, default=3, help="best of N")
    parser.add_argument("--options", default="", help="comma-separated deidentify options")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--workdir", type=Path, help="temporary folders here (default $TMPDIR)")
    args = parser.parse_args()
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    pipeline = pipeline_for(options)
    with tempfile.TemporaryDirectory(prefix="dicomgate-bench-deid-", dir=args.workdir) as tmp:
        files = make_mr_series(Path(tmp) / "corpus", args.count, seed=6)
        result = measure(files, pipeline, args.repeat, Path(tmp))
    result.update(options=options, python=platform.python_version(), pydicom=pydicom.__version__)
    print(f"| measurement ({args.count} small MR, best of {args.repeat}) | instances/s |")
    print("|---|---:|")
    print(f"| deidentify step alone | {result['step_per_s']:,.0f} |")
    print(f"| file to file (read + deidentify + write) | {result['file_to_file_per_s']:,.0f} |")
    print(f"| read + write only (no step) | {result['read_write_only_per_s']:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
