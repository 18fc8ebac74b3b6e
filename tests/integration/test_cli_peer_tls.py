"""The TLS files of the peers the gateway connects to (DIMSE destinations and move
destinations, bridge sources, the JWKS URL, JWT public keys, the ATNA repository) are
loaded by ``check-config`` and at the start of ``serve``: a missing or unusable file is one
line naming the key, not a failure at the first delivery or login."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.conftest import free_port
from tests.integration.test_cli_errors import one_line_error, run, write_config

pytestmark = pytest.mark.timeout(120)

PACS = {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def _base(tmp_path: Path) -> dict[str, Any]:
    return {
        "storage": {"path": str(tmp_path / "data")},
        "database": {"url": f"sqlite:///{tmp_path / 'data' / 'index.db'}"},
        "dimse": {"host": "127.0.0.1", "port": free_port()},
        "http": {"host": "127.0.0.1", "port": free_port()},
    }


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.pem"
    path.write_text("this is no PEM file\n")
    return path


CASES: dict[str, tuple[str, str]] = {
    # id: (where the file goes, key named in the error)
    "dest-ca": ("dest.ca", "destinations.pacs.tls.ca"),
    "dest-cert": ("dest.cert", "destinations.pacs.tls.cert"),
    "bridge-source-ca": ("bridge.ca", "destinations.upstream.tls.ca"),
    "move-dest-ca": ("move.ca", "dimse.move_destinations.VIEWER.tls.ca"),
    "jwks-verify": ("jwks", "http.auth.jwt.jwks_verify"),
    "jwt-public-key": ("pubkey", "http.auth.jwt.public_keys[0]"),
    "syslog-ca": ("syslog.ca", "audit.syslog.ca"),
}


def _config(tmp_path: Path, where: str, path: Path) -> dict[str, Any]:
    data = _base(tmp_path)
    if where == "dest.ca":
        data["destinations"] = {"pacs": {**PACS, "tls": {"ca": str(path)}}}
    elif where == "dest.cert":
        data["destinations"] = {"pacs": {**PACS, "tls": {"cert": str(path), "key": str(path)}}}
    elif where == "bridge.ca":
        data["destinations"] = {"upstream": {**PACS, "tls": {"ca": str(path)}}}
        data["query"] = {"dimse": {"source": "upstream"}}
    elif where == "move.ca":
        move = {"host": "127.0.0.1", "port": 104, "tls": {"ca": str(path)}}
        data["dimse"]["move_destinations"] = {"VIEWER": move}
    elif where == "jwks":
        jwt = {"jwks_url": "https://idp.example/jwks", "jwks_verify": str(path)}
        data["http"]["auth"] = {"jwt": {**jwt, "issuer": "https://idp", "audience": "gw"}}
    elif where == "pubkey":
        jwt = {"public_keys": [str(path)], "issuer": "https://idp", "audience": "gw"}
        data["http"]["auth"] = {"jwt": jwt}
    elif where == "syslog.ca":
        data["audit"] = {
            "syslog": {"host": "127.0.0.1", "port": 6514, "protocol": "tls", "ca": str(path)}
        }
    return data


@pytest.mark.parametrize("kind", ["missing", "garbage"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_unusable_peer_tls_file_is_refused_naming_the_key(
    tmp_path: Path, case: str, kind: str
) -> None:
    where, key = CASES[case]
    path = tmp_path / "nowhere.pem" if kind == "missing" else _garbage(tmp_path)
    config = write_config(tmp_path, _config(tmp_path, where, path))

    line = one_line_error(run("check-config", str(config)), 2)
    assert line.startswith(f"dicomgate: config error: {key}: "), line
    assert str(path) in line, line
    if kind == "missing":
        assert "No such file or directory" in line, line

    served = run("serve", "--config", str(config), timeout=60)
    assert served.returncode == 1, (served.stdout, served.stderr)
    assert "Traceback" not in served.stdout + served.stderr, served.stderr
    assert f"dicomgate: cannot start: {key}: " in served.stderr, served.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was touched
