"""A large instance streams socket -> disk with flat memory (DESIGN rule 2).

CI runs a bounded 300 MB instance; the 1 GB one is marked ``slow``. The gateway's RSS is
sampled from /proc every 50 ms while it receives; it must not grow by 100 MB or more.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import GatewayProcess, bundled_file, dcmtk_env, needs_dcmtk, sop_uid_of
from tests.corpus import make_large_instance

pytestmark = [
    needs_dcmtk,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc"),
]

Gateway = Callable[..., GatewayProcess]

MB = 1024 * 1024
MAX_GROWTH = 100 * MB


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler(threading.Thread):
    """Samples a process's resident set size every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def dataset_sha256(path: Path) -> tuple[str, int]:
    """sha256 and length of the data set part of a Part 10 file (after its File Meta)."""
    with open(path, "rb") as fh:
        head = fh.read(144)
        assert head[128:132] == b"DICM" and head[132:136] == b"\x02\x00\x00\x00", path
        fh.seek(144 + struct.unpack("<I", head[140:144])[0])
        digest = hashlib.sha256()
        length = 0
        for chunk in iter(lambda: fh.read(4 * MB), b""):
            digest.update(chunk)
            length += len(chunk)
    return digest.hexdigest(), length


def _send_large(gateway: Gateway, tmp_path: Path, size: int) -> None:
    source = make_large_instance(tmp_path / "large.dcm", size)
    gw = gateway()
    stored: Path | None = None
    try:
        # Warm up: the first instance loads code paths that a large one must not be blamed for.
        assert gw.storescu([bundled_file("CT_small.dcm")]).returncode == 0
        time.sleep(0.5)
        baseline = rss_bytes(gw.pid)
        sampler = RssSampler(gw.pid)
        sampler.start()
        try:
            started = time.monotonic()
            result = subprocess.run(
                [
                    "storescu",
                    "-v",
                    "-aec",
                    gw.ae_title,
                    "127.0.0.1",
                    str(gw.dimse_port),
                    str(source),
                ],
                env=dcmtk_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=600,
                check=False,
            )
            elapsed = time.monotonic() - started
        finally:
            sampler.stop()
        assert result.returncode == 0, result.stdout[-2000:] + gw.log_tail()
        assert "Received Store Response (Success)" in result.stdout
        assert sampler.samples >= 3, "receipt too quick to sample"
        growth = sampler.peak - baseline
        assert growth < MAX_GROWTH, (
            f"RSS grew {growth / MB:.0f} MB receiving {size / MB:.0f} MB in {elapsed:.1f} s"
        )

        row = gw.index.instance(sop_uid_of(source))
        assert row is not None
        stored = gw.stored_path(row)
        assert row["size"] == stored.stat().st_size
        assert dataset_sha256(stored) == dataset_sha256(source)
    finally:
        source.unlink(missing_ok=True)
        if stored is not None:
            stored.unlink(missing_ok=True)  # keep pytest's retained tmp folders small


def test_300mb_instance_streams_with_flat_memory(gateway: Gateway, tmp_path: Path) -> None:
    _send_large(gateway, tmp_path, 300 * MB)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_1gb_instance_streams_with_flat_memory(gateway: Gateway, tmp_path: Path) -> None:
    _send_large(gateway, tmp_path, 1024 * MB)
