"""A route's pipeline end to end: storescu -> dicomgate -> processed copies and originals.

One ingest, two routes: ``processed`` runs ``standardize`` + ``split`` and delivers to one
folder, ``originals`` has no pipeline and delivers to another. The stored original never
changes (DESIGN rule 4); a refused instance is dead-lettered with the step's reason.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from tests.conftest import (
    DICOMGATE,
    Corpus,
    GatewayProcess,
    assert_relayed,
    bundled_file,
    needs_dcmtk,
    wait_until,
)
from tests.unit.test_split import make_enhanced

from dicomgate.processing.split import frame_uid

PIPELINE = [
    {
        "standardize": {
            "rules": [
                {"copy": {"from": "SIEMENS MR HEADER,0019,0C", "to": "DiffusionBValue"}},
                {
                    "match": {"calling_ae": "MODALITY*"},
                    "set": {"tag": "InstitutionName", "value": "Standardized"},
                },
            ]
        }
    },
    {"split": {}},
]


def _dead(gw: GatewayProcess, destination: str) -> list[dict[str, Any]]:
    status, body = gw.http_get(f"/api/queue?state=dead&destination={destination}")
    assert status == 200, body
    jobs: list[dict[str, Any]] = body["jobs"]
    return jobs


@needs_dcmtk
def test_processed_copies_to_one_folder_and_originals_to_another(
    gateway: Any, corpus: Corpus, tmp_path: Path
) -> None:
    mr = corpus.mr("pipeline-routes", 2, seed=611)
    enhanced = make_enhanced("CT", 3, tmp_path / "enhanced-ct.dcm")
    rtdose = bundled_file("rtdose.dcm")  # 15 frames, no single-frame IOD: refused by split
    sent = [*mr, enhanced, rtdose]
    processed, originals = tmp_path / "processed", tmp_path / "originals"
    gw = gateway(
        {
            "destinations": {
                "processed": {"type": "folder", "path": str(processed)},
                "originals": {"type": "folder", "path": str(originals)},
            },
            "routes": [
                {"name": "processed", "pipeline": PIPELINE, "to": ["processed"]},
                {"name": "originals", "to": ["originals"]},
            ],
            "queue": {"retry": {"initial": 0.1, "max": 0.2, "max_attempts": 2}},
        }
    )
    assert gw.storescu(sent, "-aet", "MODALITY1").returncode == 0
    stored = {p.stem: p for p in (gw.data / "store").rglob("*.dcm")}
    assert len(stored) == len(sent)
    digests = {sop: hashlib.sha256(p.read_bytes()).hexdigest() for sop, p in stored.items()}

    # originals: every instance, the stored file (less our arrival context in its meta)
    wait_until(lambda: len(list(originals.rglob("*.dcm"))) == len(sent), 60, "the originals")
    for path in originals.rglob("*.dcm"):
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert_relayed(path.read_bytes(), stored[sop].read_bytes())

    # processed: 2 MR + 3 frames of the enhanced CT; the RT Dose is dead-lettered
    wait_until(lambda: len(list(processed.rglob("*.dcm"))) == 5, 60, "the processed copies")
    wait_until(lambda: len(_dead(gw, "processed")) == 1, 60, "the refused RT Dose")
    (dead,) = _dead(gw, "processed")
    assert "cannot_split" in dead["last_error"]
    assert gw.log_count("processing.refused") >= 1

    out = {}
    for path in processed.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        out[str(ds.SOPInstanceUID)] = ds
        assert "PrivateInformation" not in ds.file_meta  # our arrival context stays home
    for path in mr:
        source = pydicom.dcmread(path)
        copy = out[str(source.SOPInstanceUID)]
        b_value = source.private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value
        assert copy.DiffusionBValue == float(b_value)
        assert copy.InstitutionName == "Standardized"  # the rule's calling_ae match held
        assert "DiffusionBValue" not in source
    ct = pydicom.dcmread(enhanced)
    for n in (1, 2, 3):
        frame = out[frame_uid(str(ct.SOPInstanceUID), n)]
        assert frame.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert frame.InstanceNumber == n
        assert frame.InstitutionName == "Standardized"

    # the stored originals are unchanged
    for sop, path in stored.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digests[sop]
        assert gw.index.instance(sop)["sha256"] == digests[sop]


def test_check_config_names_the_bad_pipeline_key(tmp_path: Path) -> None:
    config = {
        "storage": {"path": str(tmp_path / "data")},
        "destinations": {"share": {"type": "folder", "path": str(tmp_path / "share")}},
        "routes": [
            {
                "name": "research",
                "to": ["share"],
                "pipeline": [
                    {"split": {}},
                    {
                        "standardize": {
                            "rules": [
                                {"remove": {"tag": "PatientComments"}},
                                {"copy": {"from": "SIEMENS MR HEADER,0019,0C", "to": "BValue"}},
                            ]
                        }
                    },
                ],
            }
        ],
    }
    path = tmp_path / "dicomgate.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run(
        [DICOMGATE, "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "routes[0].pipeline[1].standardize.rules[1].copy.to" in lines[0]
    assert "BValue" in lines[0]


@pytest.mark.parametrize("step", [{"split": {"new_series": "sometimes"}}, {"splitt": {}}])
def test_check_config_refuses_bad_steps(tmp_path: Path, step: dict[str, Any]) -> None:
    config = {
        "storage": {"path": str(tmp_path / "data")},
        "destinations": {"share": {"type": "folder", "path": str(tmp_path / "share")}},
        "routes": [{"name": "r", "to": ["share"], "pipeline": [step]}],
    }
    path = tmp_path / "dicomgate.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run(
        [DICOMGATE, "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "routes[0].pipeline[0]" in result.stderr


@needs_dcmtk
def test_two_routes_to_one_destination_make_one_job_per_pipeline(
    gateway: Any, corpus: Corpus, tmp_path: Path
) -> None:
    """Two routes without a pipeline that both match send each instance to their common
    destination ONCE (one job per instance and destination, at the higher priority); a third
    route to it with a pipeline is another delivery (another content)."""
    files = corpus.mr("routes-dedupe", 3, seed=612)
    share = tmp_path / "share"
    gw = gateway(
        {
            "destinations": {"share": {"type": "folder", "path": str(share),
                                       "template": "{InstitutionName}/{SOPInstanceUID}.dcm"}},
            "routes": [
                {"name": "by-modality", "match": {"Modality": "MR"}, "to": ["share"]},
                {"name": "everything", "priority": "high", "to": ["share"]},
                {
                    "name": "tagged",
                    "pipeline": [{"standardize": {"rules": [
                        {"set": {"tag": "InstitutionName", "value": "Tagged"}}]}}],
                    "to": ["share"],
                },
            ],
        }
    )  # fmt: skip
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: len(list(share.rglob("*.dcm"))) == 2 * len(files), 60, "the deliveries")

    def jobs() -> list[dict[str, Any]]:
        status, body = gw.http_get("/api/queue?destination=share")
        assert status == 200, body
        found: list[dict[str, Any]] = body["jobs"]
        return found

    wait_until(lambda: all(j["state"] == "done" for j in jobs()), 30, "every job done")
    assert len(jobs()) == 2 * len(files)  # not 3 per instance
    assert sorted({j["route"] for j in jobs()}) == ["by-modality", "tagged"]
    assert {j["priority"] for j in jobs() if j["route"] == "by-modality"} == {10}
    assert len(list((share / "Tagged").glob("*.dcm"))) == len(files)


@needs_dcmtk
def test_a_standardize_refusal_keeps_the_instances_values_out_of_log_and_queue(
    gateway: Any, tmp_path: Path
) -> None:
    """A copy whose value does not fit the target VR is refused (cannot_standardize); its
    reason went into the log and the job's last_error with the value quoted: the patient's
    name there. The reason names the rule, not the value."""
    source = pydicom.dcmread(bundled_file("MR_small.dcm"))
    source.PatientName = "ZQXNAME^PLANTED"
    sent = tmp_path / "planted.dcm"
    source.save_as(sent)
    rule = {"copy": {"from": "PatientName", "to": "SliceThickness"}}
    gw = gateway(
        {
            "destinations": {"out": {"type": "folder", "path": str(tmp_path / "out")}},
            "routes": [
                {"name": "std", "to": ["out"], "pipeline": [{"standardize": {"rules": [rule]}}]}
            ],
        }
    )
    assert gw.storescu([sent]).returncode == 0
    wait_until(lambda: len(_dead(gw, "out")) == 1, 60, "the refused instance")
    (dead,) = _dead(gw, "out")
    assert "cannot_standardize" in dead["last_error"], dead
    assert "PatientName -> SliceThickness" in dead["last_error"], dead
    assert "ZQXNAME" not in dead["last_error"], dead
    gw.wait_log("delivery.dead_lettered")
    assert "ZQXNAME" not in gw.log_text()
