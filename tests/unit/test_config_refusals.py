"""Config mistakes an outside probe found accepted or badly reported, run as a user runs
them: ``dicomgate check-config FILE``, exit 2 and one line naming the key."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "dicomgate: config error: "


def check(
    tmp_path: Path, text: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "dicomgate.yaml"
    config.write_text(text, encoding="utf-8")
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("DICOMGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "dicomgate", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**environ, **(env or {})},
        check=False,
    )


def refused(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    """The one error line (without the prefix) of a refused config."""
    result = check(tmp_path, text, env)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    return lines[0].removeprefix(PREFIX)


# -- 1. one AE title, two move destinations ------------------------------------------------


def test_two_dimse_destinations_with_one_ae_title_are_refused(tmp_path: Path) -> None:
    line = refused(
        tmp_path,
        "destinations:\n"
        "  site_a: {type: dimse, ae_title: STORESCP, host: 127.0.0.1, port: 59275}\n"
        "  site_b: {type: dimse, ae_title: STORESCP, host: 127.0.0.1, port: 41941}\n",
    )
    assert line == (
        "destinations.site_b.ae_title: 'STORESCP' is also the AE title of destinations.site_a"
        " (C-MOVE could not tell them apart); give each its own AE title"
    )


def test_move_destination_with_a_destinations_ae_title_elsewhere_is_refused(
    tmp_path: Path,
) -> None:
    line = refused(
        tmp_path,
        "dimse: {move_destinations: {PACS: {host: 10.9.9.9, port: 104}}}\n"
        "destinations:\n  pacs: {type: dimse, ae_title: PACS, host: 10.0.0.5, port: 104}\n",
    )
    assert line.startswith("dimse.move_destinations.PACS: 'PACS' is also the AE title of")
    # The same AE title at the same address twice is one move destination: fine.
    result = check(
        tmp_path,
        "dimse: {move_destinations: {PACS: {host: 10.0.0.5, port: 104}}}\n"
        "destinations:\n"
        "  pacs: {type: dimse, ae_title: PACS, host: 10.0.0.5, port: 104}\n"
        "  pacs_night: {type: dimse, ae_title: PACS, host: 10.0.0.5, port: 104}\n",
    )
    assert result.returncode == 0, result.stderr


# -- 2. duplicate YAML keys ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (
            "destinations:\n  pacs: {type: folder, path: ./a}\n  pacs: {type: folder, path: ./b}\n",
            "destinations: duplicate key 'pacs' (line 3; first given on line 2)",
        ),
        (
            "dimse: {port: 11112}\ndimse: {port: 104}\n",
            "duplicate top-level key 'dimse' (line 2; first given on line 1)",
        ),
        (
            "destinations:\n  share: {type: folder, path: ./out}\nrouting: 1\n"
            "destinations:\n  pacs: {type: dimse, host: pacs.local, ae_title: PACS}\n",
            "duplicate top-level key 'destinations' (line 4; first given on line 1)",
        ),
        (
            "routes:\n  - {name: a, to: [], name: b}\n",
            "routes[0]: duplicate key 'name' (line 2; first given on line 2)",
        ),
    ],
)
def test_duplicate_yaml_keys_are_refused_with_their_line(
    tmp_path: Path, text: str, want: str
) -> None:
    assert refused(tmp_path, text) == want


def test_duplicate_key_refused_but_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    anchor = "  a: &pacs {type: dimse, ae_title: PACS, host: 10.0.0.5, port: 104}\n"
    line = refused(tmp_path, f"destinations:\n{anchor}  b: {{<<: *pacs, port: 1, port: 2}}\n")
    assert line == "destinations.b: duplicate key 'port' (line 3; first given on line 3)"
    result = check(tmp_path, f"destinations:\n{anchor}  b: {{<<: *pacs, ae_title: PACS}}\n")
    assert result.returncode == 0, result.stderr


def test_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    line = refused(tmp_path, "dimse:\n\tport: 11112\n")
    assert re.fullmatch(r".*dicomgate\.yaml line 2, column 1: not valid YAML: .*\\t.*", line)


# -- 3. folders that feed on each other ----------------------------------------------------


def test_folder_destination_inside_the_watch_folder_is_refused(tmp_path: Path) -> None:
    line = refused(
        tmp_path,
        "ingest: {watch: ./w}\ndestinations:\n  share: {type: folder, path: ./w/out}\n"
        "routes:\n  - {name: all, to: [share]}\n",
    )
    assert line.startswith("destinations.share.path: 'w/out' is inside ingest.watch 'w'")


def test_folder_destination_equal_to_the_watch_folder_is_refused(tmp_path: Path) -> None:
    line = refused(
        tmp_path,
        f"ingest: {{watch: {tmp_path}/w}}\n"
        f"destinations:\n  share: {{type: folder, path: {tmp_path}/w/}}\n",
    )
    assert line.startswith("destinations.share.path:")


def test_watch_folder_inside_the_store_is_refused_by_check_config(tmp_path: Path) -> None:
    line = refused(tmp_path, "storage: {path: ./data}\ningest: {watch: ./data/store}\n")
    assert line.startswith("ingest.watch: 'data/store' overlaps storage.path 'data'")


def test_folder_destination_inside_the_store_is_refused(tmp_path: Path) -> None:
    line = refused(
        tmp_path, "storage: {path: ./data}\ndestinations:\n  s: {type: folder, path: data/store}\n"
    )
    assert line.startswith("destinations.s.path:")


# -- 4. YAML booleans where numbers belong -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("dimse: {port: true}\n", "dimse.port"),
        ("dimse: {port: on}\n", "dimse.port"),
        ("storage: {min_free_bytes: no}\n", "storage.min_free_bytes"),
        ("dimse: {max_associations: yes}\n", "dimse.max_associations"),
        (
            "destinations:\n  s: {type: folder, path: ./o, breaker: {failures: off}}\n",
            "destinations.s.breaker.failures",
        ),
        ("database: {timeout: yes}\n", "database.timeout"),
    ],
)
def test_yaml_booleans_are_not_numbers(tmp_path: Path, text: str, key: str) -> None:
    line = refused(tmp_path, text)
    assert line.startswith(f"{key}: expected a number, not the boolean"), line


# -- 5. environment overrides --------------------------------------------------------------

BASE = (
    "destinations:\n"
    "  PACS: {type: dimse, ae_title: PACS, host: 10.0.0.5, port: 104}\n"
    '  cloud: {type: dicomweb, url: "https://example.org/dicomWeb"}\n'
    "routes:\n  - {name: r, to: [PACS]}\n"
)


def test_the_commands_own_variables_are_not_config_overrides(tmp_path: Path) -> None:
    env = {
        "DICOMGATE_TOKEN": "abc",
        "DICOMGATE_API_KEY": "dgk_x",
        "DICOMGATE_TEST_ALLOW_MISSING_PEERS": "1",
    }
    result = check(tmp_path, BASE, env)
    assert result.returncode == 0, result.stderr


def test_override_reaches_a_destination_named_in_upper_case(tmp_path: Path) -> None:
    line = refused(tmp_path, BASE, {"DICOMGATE_DESTINATIONS__PACS__HOST": "http://pacs"})
    # The override landed on destinations.PACS (not on a new "pacs" without a type).
    assert line.startswith("destinations.PACS.host: 'http://pacs' is not a host name")


def test_override_of_a_text_key_is_taken_as_given(tmp_path: Path) -> None:
    script = (
        "from dicomgate.config import load_config\n"
        "c = load_config('dicomgate.yaml')\n"
        "print(repr(c.destinations['cloud'].auth.bearer), repr(c.dimse.ae_title))\n"
    )
    (tmp_path / "dicomgate.yaml").write_text(BASE, encoding="utf-8")
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("DICOMGATE_")}
    environ["DICOMGATE_DESTINATIONS__CLOUD__AUTH__BEARER"] = "secret #tail"
    environ["DICOMGATE_DIMSE__AE_TITLE"] = "123456"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=environ,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "'secret #tail' '123456'"


def test_override_of_a_number_is_not_cut_at_a_hash(tmp_path: Path) -> None:
    line = refused(tmp_path, BASE, {"DICOMGATE_DIMSE__PORT": "104 # the old port"})
    assert line.startswith("dimse.port:")


# -- 6. date ranges that can never match ---------------------------------------------------


@pytest.mark.parametrize("spec", ["2026-13", "2004-13", "20260301-202602"])
def test_date_range_of_mixed_precision_that_is_empty_is_refused(tmp_path: Path, spec: str) -> None:
    line = refused(
        tmp_path,
        "destinations:\n  s: {type: folder, path: ./o}\n"
        f"routes:\n  - {{name: r, to: [s], match: {{StudyDate: '{spec}'}}}}\n",
    )
    assert line.startswith("routes[0].match.StudyDate: empty range"), line
    # Mixed precision that can match is fine: March 2026 is within 2026-202603.
    good = "routes:\n  - {name: r, to: [s], match: {StudyDate: '2026-202603'}}\n"
    result = check(tmp_path, "destinations:\n  s: {type: folder, path: ./o}\n" + good)
    assert result.returncode == 0, result.stderr


# -- 7. hosts, URLs, PDU size, ports -------------------------------------------------------


@pytest.mark.parametrize("host", ["''", "'  '", "http://pacs", "'pacs host'"])
def test_bad_destination_host_is_refused(tmp_path: Path, host: str) -> None:
    line = refused(
        tmp_path, f"destinations:\n  pacs: {{type: dimse, ae_title: PACS, host: {host}}}\n"
    )
    assert line.startswith("destinations.pacs.host: "), line


def test_bad_move_destination_host_is_refused(tmp_path: Path) -> None:
    line = refused(tmp_path, "dimse: {move_destinations: {WS: {host: 'a b', port: 104}}}\n")
    assert line.startswith("dimse.move_destinations.WS.host: "), line


@pytest.mark.parametrize("url", ["http://", "http://exa mple.org/dw", "https://:443/x"])
def test_bad_dicomweb_url_is_refused(tmp_path: Path, url: str) -> None:
    line = refused(tmp_path, f"destinations:\n  c: {{type: dicomweb, url: '{url}'}}\n")
    assert line.startswith("destinations.c.url: "), line


def test_tiny_max_pdu_size_is_refused(tmp_path: Path) -> None:
    assert refused(tmp_path, "dimse: {max_pdu_size: 10}\n").startswith("dimse.max_pdu_size: ")
    assert check(tmp_path, "dimse: {max_pdu_size: 0}\n").returncode == 0
    assert check(tmp_path, "dimse: {max_pdu_size: 4096}\n").returncode == 0


@pytest.mark.parametrize("key", ["dimse", "http"])
def test_port_zero_is_refused(tmp_path: Path, key: str) -> None:
    assert refused(tmp_path, f"{key}: {{port: 0}}\n").startswith(f"{key}.port: ")


def test_http_and_dimse_on_one_port_are_refused(tmp_path: Path) -> None:
    line = refused(tmp_path, "dimse: {port: 8080}\nhttp: {port: 8080}\n")
    assert line == "http.port: port 8080 is also dimse.port; give each its own"
    text = "dimse: {host: 127.0.0.1, port: 8080}\nhttp: {host: 127.0.0.2, port: 8080}\n"
    assert check(tmp_path, text).returncode == 0  # different addresses: fine


# -- 8. messages ---------------------------------------------------------------------------


def test_missing_destination_type_names_the_type_key(tmp_path: Path) -> None:
    line = refused(tmp_path, "destinations:\n  pacs: {ae_title: PACS, host: h}\n")
    assert line == (
        "destinations.pacs.type: required key is missing (one of dimse, dicomweb, folder, webhook)"
    )


def test_unknown_destination_type_names_the_value(tmp_path: Path) -> None:
    line = refused(tmp_path, "destinations:\n  pacs: {type: dimsee, host: h}\n")
    assert line == (
        "destinations.pacs.type: unknown destination type 'dimsee' (one of dimse, dicomweb,"
        " folder, webhook)"
    )


def test_misspelt_required_key_names_the_unknown_key(tmp_path: Path) -> None:
    line = refused(tmp_path, "destinations:\n  pacs: {type: dimse, ae_title: PACS, hots: h}\n")
    assert line == (
        "destinations.pacs.host: required key is missing (is the unknown key 'hots' a"
        " misspelling of it?)"
    )


# -- 9. documentation ----------------------------------------------------------------------


def test_security_production_example_keys_are_full_hashes(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    block = text.split("A production gateway sets at least", 1)[1]
    example = yaml.safe_load(block.split("```yaml", 1)[1].split("```", 1)[0])
    del example["http"]["tls"]  # its certificate files are the reader's
    result = check(tmp_path, yaml.safe_dump(example))
    assert result.returncode == 0, result.stderr
    line = text.split("dgk_Hx0y1P0fW0oA1pZ7Xn9r5Yk2qL8vT3sB6cD4eF1gH2i", 1)[1]
    shown = re.search(r'sha256: "([0-9a-f]{64})"', line)
    key = "dgk_Hx0y1P0fW0oA1pZ7Xn9r5Yk2qL8vT3sB6cD4eF1gH2i"
    assert shown and shown[1] == hashlib.sha256(key.encode()).hexdigest()


def test_configuration_reference_says_which_durations_take_units() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    row = next(r for r in text.splitlines() if r.startswith("| `storage.keep_for`"))
    assert "duration" in row and "24h" in row
    assert "`audit.keep_for`" in text and "365d" in text


def test_dimse_tls_port_zero_is_refused(tmp_path: Path) -> None:
    pem = tmp_path / "server.pem"
    pem.write_text("unused: the port is refused first\n")
    line = refused(tmp_path, f"dimse: {{tls: {{port: 0, cert: {pem}, key: {pem}}}}}\n")
    assert line.startswith("dimse.tls.port: "), line


@pytest.mark.parametrize("key", ["dimse", "http"])
@pytest.mark.parametrize(
    "host", ["not an address!", "http://0.0.0.0", "0.0.0.0:8080", "", "  "], ids=repr
)
def test_listener_host_that_is_no_address_is_refused(tmp_path: Path, key: str, host: str) -> None:
    line = refused(tmp_path, f"{key}: {{host: '{host}'}}\n")
    assert line.startswith(f"{key}.host: "), line
    # An address or a name of this machine still passes (IPv6 included).
    good = "dimse: {host: '::1'}\nhttp: {host: localhost}\n"
    assert check(tmp_path, good).returncode == 0, check(tmp_path, good).stderr


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("dimsee: {}\n", "dimsee: unknown key (did you mean 'dimse'?)"),
        ("http: {limits: {max_body_byte: 1}}\n", "http.limits.max_body_byte: unknown key"),
        (
            "destinations:\n  pacs: {type: dimse, ae_title: P, host: h, port: 104, hots: h}\n",
            "destinations.pacs.hots: unknown key (did you mean 'host'?)",
        ),
        (
            "destinations: {share: {type: folder, path: /tmp}}\n"
            "routes:\n  - {name: r, to: [share], tirgger: instance}\n",
            "routes[0].tirgger: unknown key (did you mean 'trigger'?)",
        ),
        (
            "dimse: {move_destinations: {WS: {host: h, port: 104, max_assoc: 2}}}\n",
            "dimse.move_destinations.WS.max_assoc: unknown key (did you mean 'max_associations'?)",
        ),
        ("queue: {retry: {Max_Attemps: 3}}\n", "(did you mean 'max_attempts'?)"),
    ],
    ids=["top", "nested", "destination", "route", "move-destination", "case"],
)
def test_unknown_key_close_to_a_known_one_gets_a_suggestion(
    tmp_path: Path, text: str, want: str
) -> None:
    line = refused(tmp_path, text)
    assert want in line, line
    if "max_body_byte" in text:
        assert line.endswith("(did you mean 'max_body_bytes'?)"), line
    # Nothing close: no guess.
    assert refused(tmp_path, "dimse: {zzzzqqq: 1}\n") == "dimse.zzzzqqq: unknown key"
