"""The deployment files we ship (deploy/haproxy, deploy/systemd) are valid as shipped.

HAProxy checks its own config (``haproxy -c``); systemd checks the unit
(``systemd-analyze verify``), with the one substitution its header documents (the install
path of the console script); and the unit's ``ExecStart`` is run as written, on a test
config, to show it starts a gateway that becomes ready and stops cleanly on the unit's
``KillSignal``.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from tests.conftest import DICOMGATE, ROOT, free_port

HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
UNIT = ROOT / "deploy" / "systemd" / "dicomgate.service"
UNIT_BINARY = "/opt/dicomgate/bin/dicomgate"  # where the unit's header installs dicomgate
UNIT_CONFIG = "/etc/dicomgate/dicomgate.yaml"


def _haproxy() -> str:
    path = shutil.which("haproxy")
    if path is None:
        pytest.fail("haproxy is not installed: it is a test peer (`make peers`)")
    return path


def _haproxy_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_haproxy(), "-c", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_shipped_haproxy_config_is_valid_as_shipped() -> None:
    checked = _haproxy_check(HAPROXY_CFG)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Configuration file is valid" in checked.stdout + checked.stderr


def test_haproxy_check_catches_a_broken_copy(tmp_path: Path) -> None:
    """The check above can fail: one misspelt keyword and haproxy refuses the file."""
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(
        HAPROXY_CFG.read_text(encoding="utf-8").replace("balance leastconn", "balance lastconn"),
        encoding="utf-8",
    )
    checked = _haproxy_check(broken)
    assert checked.returncode != 0
    assert "balance only supports" in checked.stdout + checked.stderr


def test_shipped_haproxy_config_routes_both_ports_with_readyz_checks() -> None:
    """What docs/deployment.md promises of it: DIMSE in TCP mode, HTTP in HTTP mode, every
    server health-checked on the node's /readyz (the DIMSE servers on the HTTP port)."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in HAPROXY_CFG.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line[0].isspace():
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(line.strip())
    assert "mode tcp" in sections["defaults"]
    dimse, http = sections["backend dicomgate_dimse"], sections["backend dicomgate_http"]
    assert "option httpchk GET /readyz" in dimse and "option httpchk GET /readyz" in http
    assert "mode http" in http and "mode http" in sections["frontend dicomweb"]
    dimse_servers = [s for s in dimse if s.startswith("server ")]
    http_servers = [s for s in http if s.startswith("server ")]
    assert len(dimse_servers) == len(http_servers) >= 2
    for server in dimse_servers:
        assert re.fullmatch(r"server \S+ \S+:11112 check port 8080", server), server
    for server in http_servers:
        assert re.fullmatch(r"server \S+ \S+:8080 check", server), server
    assert "bind :11112" in sections["frontend dicom"]


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def _substituted_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with the console script at the path it has here (the header's install
    step puts it at /opt/dicomgate/bin)."""
    unit = tmp_path / "dicomgate.service"
    source = UNIT.read_text(encoding="utf-8") if text is None else text
    unit.write_text(source.replace(UNIT_BINARY, DICOMGATE), encoding="utf-8")
    return unit


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (the unit is still parsed below)")
    return subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = _substituted_unit(tmp_path)
    verified = _verify(unit)
    # systemd-analyze exits 0 on unknown keys but warns, naming the file: no such line.
    complaints = [line for line in verified.stderr.splitlines() if unit.name in line]
    assert verified.returncode == 0 and not complaints, verified.stderr


def test_systemd_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The verification above can fail: a misspelt key is reported, a missing binary too."""
    text = UNIT.read_text(encoding="utf-8")
    misspelt = _verify(_substituted_unit(tmp_path, text.replace("TimeoutStopSec", "TimeoutStop")))
    assert "Unknown key" in misspelt.stderr and "TimeoutStop" in misspelt.stderr
    missing = _verify(_substituted_unit(tmp_path, text.replace(UNIT_BINARY, "/nonexistent/dg")))
    assert missing.returncode != 0 and "/nonexistent/dg" in missing.stderr


def test_systemd_unit_has_what_a_node_needs() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["ExecStart"] == f"{UNIT_BINARY} serve --config {UNIT_CONFIG}"
    assert service["User"] == "dicomgate" and service["Group"] == "dicomgate"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"  # what drains associations and sends
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # reloads TLS material
    assert service["EnvironmentFile"].lstrip("-") == "/etc/dicomgate/env"
    # ProtectSystem=strict makes everything read-only but ReadWritePaths: the store must be
    # among them, and mounted first.
    assert service["ProtectSystem"] == "strict"
    store = unit["Unit"]["RequiresMountsFor"]
    assert store in service["ReadWritePaths"].split()
    assert int(service["TimeoutStopSec"]) >= 30
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"].split()


def test_systemd_exec_start_starts_a_gateway_and_kill_signal_stops_it(tmp_path: Path) -> None:
    """ExecStart as written (binary and config path substituted) serves; SIGTERM (the
    unit's KillSignal) stops it with exit 0 within TimeoutStopSec."""
    unit = _unit()
    argv = shlex.split(unit["Service"]["ExecStart"])
    http_port = free_port()
    config = tmp_path / "dicomgate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"path": str(tmp_path / "data")},
                "dimse": {"host": "127.0.0.1", "port": free_port()},
                "http": {"host": "127.0.0.1", "port": http_port},
            }
        ),
        encoding="utf-8",
    )
    argv = [DICOMGATE if a == UNIT_BINARY else str(config) if a == UNIT_CONFIG else a for a in argv]
    assert argv[1:] == ["serve", "--config", str(config)]
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "ExecStart did not become ready"
                time.sleep(0.1)
        proc.send_signal(getattr(signal, unit["Service"]["KillSignal"]))
        assert proc.wait(int(unit["Service"]["TimeoutStopSec"])) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()
