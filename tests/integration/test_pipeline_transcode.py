"""A route that transcodes: storescu -> dicomgate -> (JPEG-LS) -> DCMTK storescp.

The received files are decoded by DCMTK's ``dcmdjpls`` (an independent JPEG-LS decoder) and
must give the pixels that were sent; an image the target cannot hold is dead-lettered with
the reason ``cannot_transcode`` instead of being sent.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from tests.conftest import Corpus, GatewayProcess, needs_dcmtk, sop_uid_of, wait_until
from tests.integration.test_routing_delivery import StoreSCP

pytestmark = [
    pytest.mark.timeout(180),
    needs_dcmtk,
    pytest.mark.skipif(shutil.which("dcmdjpls") is None, reason="needs DCMTK dcmdjpls"),
]

Gateway = Callable[..., GatewayProcess]
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs", "PACS").start()  # storescp +xa: accepts JPEG-LS
    yield scp
    scp.stop()


def _config(port: int, transcode: dict[str, Any]) -> dict[str, Any]:
    return {
        "destinations": {
            "pacs": {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": port}
        },
        "routes": [{"name": "compress", "pipeline": [{"transcode": transcode}], "to": ["pacs"]}],
    }


def test_route_sends_jpeg_ls_that_dcmtk_decodes_to_the_original_pixels(
    gateway: Gateway, pacs: StoreSCP, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.ct("transcode-ct", 6, seed=611) + corpus.mr("transcode-mr", 6, seed=612)
    gw = gateway(_config(pacs.port, {"transfer_syntax": "JPEGLSLossless"}))
    assert gw.storescu(files).returncode == 0
    sops = {sop_uid_of(f) for f in files}
    wait_until(lambda: set(pacs.received()) == sops, 60, "storescp to receive every instance")

    by_sop = {sop_uid_of(f): f for f in files}
    for n, (sop, received) in enumerate(sorted(pacs.received().items())):
        assert pydicom.dcmread(received).file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
        decoded = tmp_path / f"decoded-{n}.dcm"
        run = subprocess.run(
            ["dcmdjpls", str(received), str(decoded)], capture_output=True, check=False
        )
        assert run.returncode == 0, run.stderr.decode()
        theirs = pydicom.dcmread(decoded).pixel_array
        assert np.array_equal(theirs, pydicom.dcmread(by_sop[sop]).pixel_array)
    # The stored originals are untouched (DESIGN rule 4).
    for stored in (gw.data / "store").rglob("*.dcm"):
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID != JPEG_LS_LOSSLESS


def test_an_image_the_target_cannot_hold_is_dead_lettered_not_sent(
    gateway: Gateway, pacs: StoreSCP, corpus: Corpus
) -> None:
    files = corpus.ct("transcode-refused", 2, seed=613)  # 16 bits allocated: no JPEG baseline
    gw = gateway(_config(pacs.port, {"transfer_syntax": "JPEGBaseline8Bit"}))
    assert gw.storescu(files).returncode == 0

    def dead() -> list[dict[str, Any]]:
        status, body = gw.http_get("/api/queue?destination=pacs&state=dead&limit=100")
        assert status == 200, body
        jobs: list[dict[str, Any]] = body["jobs"]
        return jobs

    wait_until(lambda: len(dead()) == len(files), 60, "both jobs dead-lettered")
    assert all("cannot_transcode" in str(job["last_error"]) for job in dead()), dead()
    assert pacs.received() == {}
