"""Retention ``relay`` end to end: delivered instances go, everything still owed stays.

A real gateway with a folder destination that works, a DIMSE destination nobody listens on
(its jobs end dead-lettered) and a study_stable route whose timer is armed for a while.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select
from tests.conftest import Corpus, GatewayProcess, free_port, needs_dcmtk, wait_until

from dicomgate.index.schema import delivery_attempt, instance, patient, series, study

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]


def _rows(gw: GatewayProcess, table: object) -> int:
    with gw.index.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def _stored(gw: GatewayProcess) -> set[str]:
    # os.walk, not rglob: retention removes emptied folders while we look, and rglob
    # raises for a folder that went between listing its parent and reading it (CI saw it).
    return {
        name
        for _, _, files in os.walk(gw.data / "store")
        for name in files
        if name.endswith(".dcm")
    }


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_relay_deletes_only_what_every_route_delivered(
    gateway: Gateway, corpus: Corpus, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    delivered = corpus.mr("retention-delivered", 5, seed=81)
    owed = corpus.ct("retention-owed", 2, seed=82)
    waiting = corpus.mr("retention-waiting", 3, seed=83)
    waiting_study = str(pydicom.dcmread(waiting[0], stop_before_pixels=True).StudyInstanceUID)
    share, later = tmp_path / "share", tmp_path / "later"
    database = {"url": request.getfixturevalue("database_url")} if backend == "postgresql" else {}
    gw = gateway(
        {
            "database": database,
            "storage": {"retention": "relay", "keep_for": 0, "retention_interval": 0.2},
            "destinations": {
                "share": {"type": "folder", "path": str(share)},
                "later": {"type": "folder", "path": str(later)},
                "gone": {
                    "type": "dimse",
                    "ae_title": "NOBODY",
                    "host": "127.0.0.1",
                    "port": free_port(),
                },
            },
            "routes": [
                {"name": "mr", "match": {"Modality": "MR"}, "to": ["share"]},
                {"name": "ct", "match": {"Modality": "CT"}, "to": ["gone"]},
                {
                    "name": "stable",
                    "match": {"StudyInstanceUID": waiting_study},
                    "trigger": "study_stable",
                    "stable_after": "3s",
                    "to": ["later"],
                },
            ],
            "queue": {
                "poll_interval": 0.1,
                "retry": {"initial": 0.1, "max": 0.2, "max_attempts": 2},
            },
        }
    )
    assert gw.storescu(delivered + owed + waiting).returncode == 0
    names = {f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm" for p in owed}
    waiting_names = {
        f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm" for p in waiting
    }
    # The delivered MR series goes (file, rows, emptied folders)...
    wait_until(lambda: _stored(gw) == names | waiting_names, 45, "the delivered series deleted")
    n_share = len(delivered) + len(waiting)
    wait_until(lambda: len(list(share.rglob("*.dcm"))) == n_share, 45, "the share copies")
    # ...the waiting study stays while its timer is armed, although "mr" delivered it...
    assert not later.exists() or not list(later.rglob("*.dcm"))
    # ...and goes once the stable trigger delivered it too.
    wait_until(lambda: _stored(gw) == names, 45, "the stable study deleted after its delivery")
    assert len(list(later.rglob("*.dcm"))) == len(waiting)
    # Dead-lettered deliveries keep their instances (an operator may re-drive them).
    wait_until(
        lambda: gw.http_get("/api/queue")[1]["counts"]["gone"] == {"dead": 2}, 45, "dead-letter"
    )
    time.sleep(0.6)  # a few more sweeps
    assert _stored(gw) == names
    assert _rows(gw, instance) == 2 and _rows(gw, series) == 1 and _rows(gw, study) == 1
    assert _rows(gw, patient) == 1
    # The deleted instances' jobs took their history along; the dead jobs keep theirs.
    assert _rows(gw, delivery_attempt) == 2 * 2
    study_folders = [p for p in (gw.data / "store").iterdir() if p.is_dir()]
    assert len(study_folders) == 1  # emptied study and series folders were removed
    assert gw.log_count("retention.deleted") >= 1
    # The same instances may arrive again after deletion: stored and delivered anew.
    assert gw.storescu(delivered[:1]).returncode == 0
    wait_until(lambda: gw.log_count("retention.deleted") >= 2, 45, "the re-sent instance")


def test_archive_keeps_everything(gateway: Gateway, corpus: Corpus, tmp_path: Path) -> None:
    files = corpus.mr("retention-archive", 3, seed=84)
    share = tmp_path / "share"
    gw = gateway(
        {
            "storage": {"keep_for": 0, "retention_interval": 0.2},  # retention: archive
            "destinations": {"share": {"type": "folder", "path": str(share)}},
            "routes": [{"name": "all", "match": {}, "to": ["share"]}],
            "queue": {"poll_interval": 0.1},
        }
    )
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: len(list(share.rglob("*.dcm"))) == 3, 45, "deliveries")
    time.sleep(0.6)
    assert len(_stored(gw)) == 3 and _rows(gw, instance) == 3
