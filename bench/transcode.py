#!/usr/bin/env python3
"""Transcoding throughput: dicomgate's ``transcode`` step vs DCMTK's ``dcmcjpls``.

Run by hand (never as a timed test), from the repository root:

    .venv/bin/python bench/transcode.py                  # 50 CT 512x512, best of 3
    .venv/bin/python bench/transcode.py --ct 100 --repeat 5 --json /tmp/transcode.json

A CT series (tests/corpus.py, explicit VR little endian, 16-bit) is transcoded file to file,
in one process, by what a delivery worker runs: ``pydicom.dcmread`` -> ``transcode_dataset``
-> ``write_part10``, to JPEG-LS lossless and to JPEG 2000 lossless. DCMTK's ``dcmcjpls``
(one process per file, as it is used) does the JPEG-LS work for comparison; to compare the
encoders without DCMTK's process start-up, the whole series is also put in one multi-frame
file and converted once by each. Throughput is input Part 10 bytes / wall time, 10^6
bytes per second; the best of ``--repeat`` runs is kept. Every output of the first run is
decoded (with pydicom) and compared with the input pixels, so a fast but wrong encoder
cannot win. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.corpus import make_ct_series  # noqa: E402

from dicomgate.processing.pipeline import write_part10  # noqa: E402
from dicomgate.processing.transcode import transcode_dataset  # noqa: E402

MB = 1_000_000
TARGETS = {"jpeg-ls": "JPEGLSLossless", "j2k": "JPEG2000Lossless", "htj2k": "HTJ2KLossless"}


def run_dicomgate(files: list[Path], target: str, out: Path) -> float:
    """Seconds to transcode every file into ``out`` (file to file, one process)."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for n, path in enumerate(files):
        ds = pydicom.dcmread(path)
        transcode_dataset(ds, target)
        write_part10(ds, out / f"{n}.dcm")
    return time.perf_counter() - start


def run_dcmcjpls(files: list[Path], out: Path) -> float:
    """Seconds for ``dcmcjpls`` (lossless, default options) on every file, one process each."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for n, path in enumerate(files):
        subprocess.run(["dcmcjpls", str(path), str(out / f"{n}.dcm")], check=True)
    return time.perf_counter() - start


def make_multiframe(files: list[Path], path: Path) -> None:
    """All the series' frames in one file: one ``dcmcjpls`` process, no start-up per image."""
    ds = pydicom.dcmread(files[0])
    ds.NumberOfFrames = len(files)
    ds.PixelData = b"".join(pydicom.dcmread(f).PixelData for f in files)
    write_part10(ds, path)


def time_multiframe(path: Path, out: Path, dcmtk: bool) -> float:
    start = time.perf_counter()
    if dcmtk:
        subprocess.run(["dcmcjpls", str(path), str(out)], check=True)
    else:
        ds = pydicom.dcmread(path)
        transcode_dataset(ds, "JPEGLSLossless")
        write_part10(ds, out)
    return time.perf_counter() - start


def check_outputs(files: list[Path], out: Path) -> None:
    for n, path in enumerate(files):
        got = pydicom.dcmread(out / f"{n}.dcm").pixel_array
        if not np.array_equal(got, pydicom.dcmread(path).pixel_array):
            raise SystemExit(f"{out / f'{n}.dcm'} does not decode to the input pixels")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=50, help="CT instances (default 50)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--workdir", type=Path, help="where the temporary folders go")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and outputs")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    have_dcmtk = shutil.which("dcmcjpls") is not None
    work = Path(tempfile.mkdtemp(prefix="bench-transcode-", dir=args.workdir))
    try:
        files = make_ct_series(work / "ct", args.ct, seed=args.seed)
        size = sum(p.stat().st_size for p in files)
        runs: dict[str, list[float]] = {f"dicomgate {k}": [] for k in TARGETS}
        multi = work / "multiframe.dcm"
        make_multiframe(files, multi)
        runs["dicomgate jpeg-ls, one multi-frame file"] = []
        if have_dcmtk:
            runs["dcmcjpls"] = []
            runs["dcmcjpls, one multi-frame file"] = []
        for r in range(args.repeat):
            for key, target in TARGETS.items():
                out = work / f"out-{key}-{r}"
                runs[f"dicomgate {key}"].append(run_dicomgate(files, target, out))
                if r == 0:
                    check_outputs(files, out)
            if have_dcmtk:
                out = work / f"out-dcmcjpls-{r}"
                runs["dcmcjpls"].append(run_dcmcjpls(files, out))
                if r == 0:
                    check_outputs(files, out)
                runs["dcmcjpls, one multi-frame file"].append(
                    time_multiframe(multi, work / "multi-dcmtk.dcm", dcmtk=True)
                )
            runs["dicomgate jpeg-ls, one multi-frame file"].append(
                time_multiframe(multi, work / "multi-ours.dcm", dcmtk=False)
            )
            for name, times in runs.items():
                print(f"run {r + 1}: {name}: {times[-1]:.2f} s", file=sys.stderr)
        best = {name: min(times) for name, times in runs.items()}
        rate = {name: size / MB / secs for name, secs in best.items()}
        print(f"\n{len(files)} CT files, {size / MB:.1f} MB, best of {args.repeat}\n")
        print("| what | seconds | MB/s |")
        print("|---|---|---|")
        for name in rate:
            print(f"| {name} | {best[name]:.2f} | {rate[name]:.1f} |")
        if have_dcmtk:
            for ours, ref in (
                ("dicomgate jpeg-ls", "dcmcjpls"),
                ("dicomgate jpeg-ls, one multi-frame file", "dcmcjpls, one multi-frame file"),
            ):
                ratio = rate[ours] / rate[ref]
                print(f"\n{ours} / {ref}: {ratio:.2f}x (target >= 0.50x)")
        if args.json:
            args.json.write_text(json.dumps({"bytes": size, "runs": runs, "mb_per_s": rate}))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
