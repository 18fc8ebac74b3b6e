"""``dicomgate route test`` (the dry-run in a terminal) and ``dicomgate status``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import GatewayProcess, bundled_file, free_port

from dicomgate.security.http_auth import hash_api_key, new_api_key

DICOMGATE = str(Path(sys.executable).parent / "dicomgate")
SECRET = "cli-test-secret-0123456789"
CONFIG: dict[str, Any] = {
    "storage": {"path": "data"},
    "destinations": {"pacs": {"type": "dimse", "host": "127.0.0.1", "port": 1, "ae_title": "P"}},
    "routes": [
        {
            "name": "ct-deid",
            "match": {"Modality": "CT"},
            "to": ["pacs"],
            "pipeline": [{"deidentify": {"profile": "basic", "secret_env": "DEID_SECRET"}}],
        },
        {"name": "mr-only", "match": {"Modality": "MR", "calling_ae": "MRI*"}, "to": ["pacs"]},
        {"name": "anything-else", "match": {}, "to": ["pacs"], "fallback": True},
    ],
}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "COLUMNS": "200", "DEID_SECRET": SECRET, **(env or {})}
    return subprocess.run(
        [DICOMGATE, *args], capture_output=True, text=True, env=environ, timeout=60, check=False
    )


def _config(tmp_path: Path, data: dict[str, Any] = CONFIG) -> Path:
    path = tmp_path / "dicomgate.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _row(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if f" {name} " in line)


def test_route_test_prints_verdicts_reasons_and_header_diff(tmp_path: Path) -> None:
    config = _config(tmp_path)
    result = _run("route", "test", str(bundled_file("CT_small.dcm")), "--config", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "matched" in _row(out, "ct-deid") and "not matched" not in _row(out, "ct-deid")
    assert "not matched" in _row(out, "mr-only")
    assert "does not hold: Modality, calling_ae" in out
    assert "skipped" in _row(out, "anything-else")  # fallback: an earlier route matched
    assert "Pipeline of ct-deid" in out
    name_row = _row(out, "PatientName")
    assert "CompressedSamples^CT1" in name_row and "changed" in name_row
    assert "PatientIdentityRemoved" in out
    assert not (tmp_path / "data").exists(), "a dry run stores nothing"


def test_route_test_context_options_and_errors(tmp_path: Path) -> None:
    config = _config(tmp_path)
    mr = str(bundled_file("MR_small.dcm"))
    result = _run("route", "test", mr, "--config", str(config), "--calling-ae", "MRI_3T")
    assert result.returncode == 0, result.stderr
    assert "matched" in _row(result.stdout, "mr-only")
    assert "not matched" not in _row(result.stdout, "mr-only")
    assert "Pipeline of" not in result.stdout  # mr-only has no pipeline

    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")
    bad = _run("route", "test", str(not_dicom), "--config", str(config))
    assert bad.returncode == 1 and "not a DICOM file" in bad.stderr
    missing = _run("route", "test", str(tmp_path / "nope.dcm"), "--config", str(config))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    via = _run("route", "test", mr, "--config", str(config), "--via", "fax")
    assert via.returncode == 2 and "--via" in via.stderr
    no_secret = _run("route", "test", mr, "--config", str(config), env={"DEID_SECRET": ""})
    assert no_secret.returncode == 2 and "routes[0].pipeline[0].deidentify" in no_secret.stderr


def test_status_prints_the_overview_of_a_running_gateway(
    gateway: Callable[..., GatewayProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEID_SECRET", SECRET)
    gw = gateway(
        {
            "queue": {"poll_interval": 0.2, "retry": {"max_attempts": 1}},
            "destinations": {
                "pacs": {"type": "dimse", "host": "127.0.0.1", "port": free_port(), "ae_title": "P"}
            },
            "routes": [{"name": "all", "to": ["pacs"]}],
        }
    )
    gw.storescu([bundled_file("CT_small.dcm")], "-aet", "CT_SCANNER")
    gw.wait_log("delivery.dead_lettered")
    # Only `http:` of the config is read: the gateway's secrets need not be set here.
    result = _run("status", "--config", str(gw.config_path), env={"DEID_SECRET": ""})
    assert result.returncode == 0, result.stderr
    assert "0 associations now, 1 instances stored" in result.stdout
    assert "CT_SCANNER" in _row(result.stdout, "CT_SCANNER")
    pacs = _row(result.stdout, "pacs")
    assert "connection refused" in pacs and "closed" in pacs
    assert pacs.split("│")[3].strip() == "1"  # dead


def test_status_errors(gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    down = _run(
        "status", "--config", str(_config(tmp_path)), "--url", f"http://127.0.0.1:{free_port()}"
    )
    assert down.returncode == 1 and "cannot reach the gateway" in down.stderr
    key = new_api_key()
    gw = gateway(
        {
            "http": {
                "auth": {
                    "api_keys": [{"name": "ro", "sha256": hash_api_key(key), "scopes": ["read"]}]
                }
            }
        }
    )
    refused = _run("status", "--config", str(gw.config_path))
    assert refused.returncode == 1 and "401" in refused.stderr
    ok = _run("status", "--config", str(gw.config_path), env={"DICOMGATE_API_KEY": key})
    assert ok.returncode == 0 and "0 associations now, 0 instances stored" in ok.stdout
