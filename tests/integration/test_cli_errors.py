"""The ``dicomgate`` command's refusals, run as a user runs it: one line that names the
problem, the documented exit code, never a Python traceback, and nothing changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import bundled_file, free_port

DICOMGATE = str(Path(sys.executable).parent / "dicomgate")
UNRESOLVABLE = "no.such.host.invalid"  # RFC 2606: never resolves


def run(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DICOMGATE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        timeout=timeout,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single ``dicomgate: ...`` line of a refusal with exit ``code``."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dicomgate: "), result.stderr
    return lines[0]


def write_config(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dicomgate.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- 1. index file


def test_queue_and_db_commands_refuse_a_missing_index_instead_of_creating_one(
    tmp_path: Path,
) -> None:
    # The gateway's config names its index relative to the working directory it runs in;
    # an operator runs the CLI from another folder.
    config = write_config(
        tmp_path / "gw",
        {"database": {"url": "sqlite:///./data/index.db"}, "storage": {"path": "data"}},
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing = elsewhere / "data" / "index.db"
    for command in (["queue", "list"], ["queue", "show", "1"], ["db", "current"]):
        line = one_line_error(run(*command, "--config", str(config), cwd=elsewhere), 1)
        assert f"no index database at {missing} " in line, line
        assert "relative paths are taken from the working directory" in line
    assert not (elsewhere / "data").exists()  # nothing created, not even the folder


def test_db_current_refuses_a_missing_file_and_migrate_creates_it_saying_so(
    tmp_path: Path,
) -> None:
    index = tmp_path / "fresh" / "index.db"
    config = write_config(tmp_path, {"database": {"url": f"sqlite:///{index}"}})
    one_line_error(run("db", "current", "--config", str(config)), 1)
    assert not index.exists()

    migrated = run("db", "migrate", "--config", str(config))
    assert migrated.returncode == 0, migrated.stderr
    assert f"created a new index database at {index}" in migrated.stdout
    assert index.is_file()
    current = run("db", "current", "--config", str(config))
    assert current.returncode == 0 and "up to date" in current.stdout, current.stderr
    # The queue commands now read the (empty) index.
    listed = run("queue", "list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr


# --------------------------------------------------------------------------- 2. verify: CA


@pytest.mark.parametrize(
    ("destination", "reason"),
    [
        ({"type": "dicomweb", "url": "https://pacs.example/dw"}, "cannot read {ca}: No such file"),
        ({"type": "webhook", "url": "https://ai.example/hook"}, "cannot read {ca}: No such file"),
        ({"type": "dicomweb", "url": "https://pacs.example/dw"}, "{ca}: not a PEM CA bundle"),
    ],
    ids=["dicomweb-missing", "webhook-missing", "dicomweb-not-pem"],
)
def test_unusable_destination_ca_bundle_is_refused_naming_the_key(
    tmp_path: Path, destination: dict[str, Any], reason: str
) -> None:
    ca = tmp_path / "ca.pem"
    if "PEM" in reason:
        ca.write_text("this is no certificate\n")
    data = {
        "storage": {"path": str(tmp_path / "data")},
        "database": {"url": f"sqlite:///{tmp_path / 'data' / 'index.db'}"},
        "dimse": {"host": "127.0.0.1", "port": free_port()},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "destinations": {"cloud": {**destination, "verify": str(ca)}},
    }
    config = write_config(tmp_path, data)
    expected = f"destinations.cloud.verify: {reason.format(ca=ca)}"

    line = one_line_error(run("check-config", str(config)), 2)
    assert expected in line, line

    served = run("serve", "--config", str(config), timeout=60)
    assert served.returncode == 1, (served.stdout, served.stderr)
    assert "Traceback" not in served.stdout + served.stderr, served.stderr
    assert f"dicomgate: cannot start: {expected}" in served.stderr, served.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was touched


# --------------------------------------------------------------------------- 3. DIMSE clients


@pytest.mark.parametrize(
    "command",
    [
        ["echo", UNRESOLVABLE, "104"],
        ["find", UNRESOLVABLE, "104", "-k", "PatientID=X"],
        ["move", UNRESOLVABLE, "104", "--dest", "STORESCP", "-k", "StudyInstanceUID=1.2.3"],
    ],
    ids=["echo", "find", "move"],
)
def test_dimse_client_reports_an_unresolvable_host_in_one_line(command: list[str]) -> None:
    line = one_line_error(run(*command, "--timeout", "5"), 1)
    assert f"cannot resolve host {UNRESOLVABLE!r}" in line, line


def test_send_to_an_unresolvable_host_fails_each_file_with_the_reason() -> None:
    result = run(
        "send", str(bundled_file("CT_small.dcm")), "--to", f"{UNRESOLVABLE}:104", "--no-progress"
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert "failed 1" in result.stdout
    assert f"cannot resolve host {UNRESOLVABLE!r}" in result.stdout


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("--aet", "ABCDEFGHIJKLMNOPQRS", "must not exceed 16 characters"),
        ("--aec", "", "must not be empty"),
        ("--aec", "   ", "must not be empty"),
        ("--aec", "A\\B", "backslashes"),
    ],
    ids=["too-long", "empty", "spaces", "backslash"],
)
@pytest.mark.parametrize("command", ["echo", "find", "move", "send"])
def test_bad_ae_title_is_a_usage_error(command: str, option: str, value: str, problem: str) -> None:
    # Refused before any connection: nothing listens on port 104 here.
    args = {
        "echo": ["echo", "127.0.0.1", "104"],
        "find": ["find", "127.0.0.1", "104"],
        "move": ["move", "127.0.0.1", "104", "--dest", "X", "-k", "StudyInstanceUID=1.2"],
        "send": ["send", str(bundled_file("CT_small.dcm")), "--to", "127.0.0.1:104"],
    }[command]
    line = one_line_error(run(*args, option, value), 2)
    assert line.startswith(f"dicomgate: {option}: {value!r} is not a valid AE title"), line
    assert problem in line


def test_move_refuses_a_bad_destination_ae_title() -> None:
    line = one_line_error(
        run("move", "127.0.0.1", "104", "--dest", "X" * 17, "-k", "StudyInstanceUID=1.2"), 2
    )
    assert "--dest:" in line and "16 characters" in line


# --------------------------------------------------------------------------- 4. queue list


def test_queue_list_refuses_an_unknown_state_listing_the_valid_ones(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"database": {"url": f"sqlite:///{tmp_path / 'index.db'}"}})
    line = one_line_error(run("queue", "list", "--config", str(config), "--state", "bogus"), 2)
    assert "--state" in line and "pending, leased, done, dead" in line and "'bogus'" in line
    assert not (tmp_path / "index.db").exists()


# --------------------------------------------------------------------------- 5. process


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "under-proc"])
def test_process_refuses_an_output_folder_it_cannot_create(tmp_path: Path, where: str) -> None:
    pipeline = tmp_path / "split.yaml"
    pipeline.write_text("- split: {}\n")
    afile = tmp_path / "afile.txt"
    afile.write_text("")
    out = {
        "a-file": afile,
        "under-a-file": afile / "sub",
        "under-proc": Path("/proc/dicomgate-no-such-folder"),
    }[where]
    line = one_line_error(
        run("process", "--pipeline", str(pipeline), str(bundled_file("CT_small.dcm")), str(out)),
        2,
    )
    assert f"output folder {out}" in line, line
    assert afile.read_text() == ""


# --------------------------------------------------------------------------- 7. small ones


def test_find_help_gives_the_date_range_form_c_find_takes() -> None:
    result = run("find", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "YYYYMMDD-YYYYMMDD" in text and "2023-2024" not in text


def test_status_with_url_needs_no_config() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(run("status", "--url", url), 1)
    assert f"cannot reach the gateway at {url}" in line, line
    line = one_line_error(run("status"), 2)
    assert "--url" in line and "--config" in line


@pytest.mark.parametrize("what", ["missing-file", "bad-source-ip"])
def test_route_test_usage_errors_exit_2(tmp_path: Path, what: str) -> None:
    config = write_config(tmp_path, {"routes": []})
    file, extra = {
        "missing-file": (str(tmp_path / "nope.dcm"), []),
        "bad-source-ip": (str(bundled_file("CT_small.dcm")), ["--source-ip", "notanip"]),
    }[what]
    line = one_line_error(run("route", "test", file, "--config", str(config), *extra), 2)
    assert ("no such file" if what == "missing-file" else "--source-ip: 'notanip'") in line


def test_keys_new_refuses_no_scope_and_lists_each_scope_once() -> None:
    line = one_line_error(run("keys", "new", "--scopes", ""), 2)
    assert "--scopes" in line
    result = run("keys", "new", "--scopes", "read,read, write")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith("scopes: [read, write]}")
