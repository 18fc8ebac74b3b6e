"""Configuration: defaults, the DESIGN.md example, error keys, environment overrides, files."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomgate.config import DuplicatePolicy, GatewayConfig, load_config, parse_config
from dicomgate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# The part of DESIGN.md "Contracts users rely on" that this config implements.
SECRET = {"DEID_SECRET": "a de-identification key of 32 chars"}

DESIGN_EXAMPLE = """
storage:  {path: ./data}                       # spool + store
database: {url: "sqlite:///./data/index.db"}   # or postgresql://user@host/db
dimse:
  ae_title: DICOMGATE
  host: 0.0.0.0
  port: 11112
  allowed_calling_aets: []                     # empty = any; * and ? wildcards
http:     {host: 0.0.0.0, port: 8080}
destinations:
  pacs:   {type: dimse, ae_title: PACS, host: 10.0.0.5, port: 104}
  cloud:  {type: dicomweb, url: "https://example.org/dicomWeb"}
  share:  {type: folder, path: /mnt/out}
routes:
  - name: ct-to-pacs
    match: {Modality: CT, calling_ae: "CT*"}
    to: [pacs, cloud]
  - name: research
    match: {StudyDescription: "*RESEARCH*"}
    pipeline:
      - deidentify: {profile: basic, secret_env: DEID_SECRET}
    to: [share]
"""

PACS = {"type": "dimse", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}


def _error(data: Any, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, {} if environ is None else environ)
    return info.value


# -- defaults ----------------------------------------------------------------------------


def test_empty_document_gives_documented_defaults() -> None:
    empty: list[dict[str, Any] | None] = [None, {}]
    for data in empty:
        cfg = parse_config(data, {})
        assert isinstance(cfg, GatewayConfig)
        assert cfg.storage.path == Path("data")
        assert cfg.storage.fsync is True
        assert cfg.storage.duplicates is DuplicatePolicy.KEEP_BOTH
        assert cfg.database.url == "sqlite:///./data/index.db"
        assert cfg.dimse.ae_title == "DICOMGATE"
        assert cfg.dimse.host == "0.0.0.0"
        assert cfg.dimse.port == 11112
        assert cfg.dimse.allowed_calling_aets == []
        assert cfg.http.host == "0.0.0.0"
        assert cfg.http.port == 8080
        assert cfg.logging.level == "INFO"
        assert cfg.destinations == {}
        assert cfg.routes == []


def test_config_is_frozen() -> None:
    cfg = parse_config({}, {})
    with pytest.raises(ValueError):
        cfg.dimse.port = 1  # type: ignore[misc]


# -- the DESIGN.md example ---------------------------------------------------------------


def test_design_example_loads() -> None:
    cfg = parse_config(yaml.safe_load(DESIGN_EXAMPLE), SECRET)
    assert cfg.dimse.ae_title == "DICOMGATE"
    assert cfg.http.port == 8080

    pacs = cfg.destinations["pacs"]
    assert pacs.type == "dimse"
    assert (pacs.ae_title, pacs.host, pacs.port) == ("PACS", "10.0.0.5", 104)
    cloud = cfg.destinations["cloud"]
    assert cloud.type == "dicomweb"
    assert cloud.url == "https://example.org/dicomWeb"
    share = cfg.destinations["share"]
    assert share.type == "folder"
    assert share.path == Path("/mnt/out")

    first, second = cfg.routes
    assert first.name == "ct-to-pacs"
    assert first.match == {"Modality": "CT", "calling_ae": "CT*"}
    assert first.to == ["pacs", "cloud"]
    assert first.trigger == "instance"
    assert second.pipeline == [{"deidentify": {"profile": "basic", "secret_env": "DEID_SECRET"}}]
    assert second.to == ["share"]


def test_design_example_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "dicomgate.yaml"
    path.write_text(DESIGN_EXAMPLE, encoding="utf-8")
    assert load_config(path, SECRET) == parse_config(yaml.safe_load(DESIGN_EXAMPLE), SECRET)


def test_bundled_example_loads() -> None:
    cfg = load_config(ROOT / "examples" / "dicomgate.yaml", {})
    assert cfg.dimse.ae_title == "DICOMGATE"
    assert cfg.dimse.port == 11112
    assert cfg.storage.duplicates is DuplicatePolicy.KEEP_BOTH


# -- errors name the key -----------------------------------------------------------------


def test_unknown_key_names_dotted_key() -> None:
    err = _error({"dimse": {"prot": 104}})
    assert err.key == "dimse.prot"
    assert "unknown key" in str(err)
    assert str(err).startswith("dimse.prot:")


def test_unknown_top_level_section() -> None:
    assert _error({"dimsee": {}}).key == "dimsee"


@pytest.mark.parametrize(
    "title",
    ["", "   ", "A" * 17, "BAD\\AE", "TAB\tAE"],
)
def test_bad_ae_title(title: str) -> None:
    err = _error({"dimse": {"ae_title": title}})
    assert err.key == "dimse.ae_title"


def test_ae_title_spaces_are_not_significant() -> None:
    assert parse_config({"dimse": {"ae_title": " GATE "}}, {}).dimse.ae_title == "GATE"


@pytest.mark.parametrize("port", [-1, 65536, "http"])
def test_bad_dimse_port(port: object) -> None:
    assert _error({"dimse": {"port": port}}).key == "dimse.port"


def test_bad_http_port() -> None:
    assert _error({"http": {"port": 70000}}).key == "http.port"


@pytest.mark.parametrize(
    "url", ["gateway.example.org", "ftp://gateway", "https://", "http://gw/?a=1", "http://gw/#x"]
)
def test_bad_http_public_url(url: str) -> None:
    assert _error({"http": {"public_url": url}}).key == "http.public_url"


def test_http_public_url_loses_its_trailing_slash() -> None:
    config = parse_config({"http": {"public_url": "https://gw.example.org:8443/base/"}}, {})
    assert config.http.public_url == "https://gw.example.org:8443/base"


def test_bad_allowed_calling_pattern() -> None:
    assert _error({"dimse": {"allowed_calling_aets": ["A\\B"]}}).key.startswith(
        "dimse.allowed_calling_aets"
    )


def test_bad_database_scheme() -> None:
    assert _error({"database": {"url": "mysql://h/db"}}).key == "database.url"


def test_route_to_unknown_destination() -> None:
    err = _error(
        {"destinations": {"pacs": PACS}, "routes": [{"name": "r", "to": ["pacs", "nowhere"]}]}
    )
    assert err.key == "routes[0].to"
    assert "nowhere" in err.problem


def test_second_route_to_unknown_destination() -> None:
    err = _error(
        {
            "destinations": {"pacs": PACS},
            "routes": [{"name": "ok", "to": ["pacs"]}, {"name": "bad", "to": ["x"]}],
        }
    )
    assert err.key == "routes[1].to"


def test_route_without_destinations() -> None:
    err = _error({"routes": [{"name": "r", "to": []}]})
    assert err.key.startswith("routes")
    assert err.key.endswith("to")


@pytest.mark.parametrize(
    ("destination", "key"),
    [
        ({"type": "dimse", "host": "h"}, "ae_title"),
        ({"type": "dimse", "ae_title": "P"}, "host"),
        ({"type": "dicomweb"}, "url"),
        ({"type": "folder"}, "path"),
        ({"type": "webhook"}, "url"),
    ],
)
def test_destination_missing_required_key(destination: dict[str, Any], key: str) -> None:
    err = _error({"destinations": {"pacs": destination}})
    # No pydantic union tag ("dimse", "folder" ...) between the name and the key.
    assert err.key == f"destinations.pacs.{key}"
    assert "missing" in err.problem


def test_destination_bad_value_key_has_no_union_tag() -> None:
    err = _error({"destinations": {"pacs": {**PACS, "port": 0}}})
    assert err.key == "destinations.pacs.port"


def test_destination_unknown_key() -> None:
    err = _error({"destinations": {"pacs": {**PACS, "bogus": 1}}})
    assert err.key == "destinations.pacs.bogus"
    assert "unknown key" in err.problem


def test_destination_unknown_type() -> None:
    err = _error({"destinations": {"pacs": {"type": "ftp"}}})
    assert err.key == "destinations.pacs.type"
    assert "'ftp'" in err.problem and "dimse, dicomweb, folder, webhook" in err.problem


def test_destination_bad_ae_title() -> None:
    err = _error({"destinations": {"pacs": {**PACS, "ae_title": "X" * 17}}})
    assert err.key == "destinations.pacs.ae_title"


def test_bad_duplicate_policy() -> None:
    assert _error({"storage": {"duplicates": "discard"}}).key == "storage.duplicates"


# -- environment overrides ----------------------------------------------------------------


def test_env_overrides_database_url() -> None:
    url = "postgresql://gate:s3cret@db.example/dicomgate"
    cfg = parse_config({"database": {"url": "sqlite:///x.db"}}, {"DICOMGATE_DATABASE__URL": url})
    assert cfg.database.url == url


def test_env_overrides_dimse_port_as_integer() -> None:
    cfg = parse_config(
        {"dimse": {"port": 104, "ae_title": "KEEP"}}, {"DICOMGATE_DIMSE__PORT": "2000"}
    )
    assert cfg.dimse.port == 2000
    assert cfg.dimse.ae_title == "KEEP"  # siblings of the overridden key are kept


def test_env_creates_missing_section() -> None:
    cfg = parse_config({}, {"DICOMGATE_DIMSE__PORT": "2001"})
    assert cfg.dimse.port == 2001


def test_env_keys_are_case_insensitive() -> None:
    cfg = parse_config({}, {"dicomgate_dimse__port": "2002"})
    assert cfg.dimse.port == 2002


def test_env_list_value() -> None:
    cfg = parse_config({}, {"DICOMGATE_DIMSE__ALLOWED_CALLING_AETS": '["CT*", "MR_?"]'})
    assert cfg.dimse.allowed_calling_aets == ["CT*", "MR_?"]


def test_env_ignores_unrelated_variables_and_config_path() -> None:
    cfg = parse_config(
        {}, {"DICOMGATE_CONFIG": "/etc/dicomgate.yaml", "PATH": "/bin", "HOME": "/root"}
    )
    assert cfg == parse_config({}, {})


def test_env_bad_value_names_the_key() -> None:
    assert _error({}, {"DICOMGATE_DIMSE__PORT": "99999"}).key == "dimse.port"


def test_env_unknown_key_is_an_error() -> None:
    assert _error({}, {"DICOMGATE_DIMSE__PROT": "1"}).key == "dimse.prot"


def test_env_cannot_nest_into_a_value() -> None:
    err = _error({"dimse": {"port": 104}}, {"DICOMGATE_DIMSE__PORT__X": "1"})
    assert "DICOMGATE_DIMSE__PORT__X" in str(err)


def test_env_override_does_not_modify_callers_data() -> None:
    data = {"dimse": {"port": 104}}
    before = copy.deepcopy(data)
    parse_config(data, {"DICOMGATE_DIMSE__PORT": "2000"})
    assert data == before


def test_env_value_that_is_not_yaml_is_a_config_error_or_a_string() -> None:
    try:
        cfg = parse_config({}, {"DICOMGATE_DIMSE__AE_TITLE": "@PACS"})
    except ConfigError as err:
        assert "dimse.ae_title" in str(err) or "DICOMGATE_DIMSE__AE_TITLE" in str(err)
    else:
        assert cfg.dimse.ae_title == "@PACS"


# -- files -------------------------------------------------------------------------------


@pytest.mark.parametrize("document", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path: Path, document: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(document, encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path, {})


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    assert load_config(path, {}) == parse_config({}, {})


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(path, {})
    assert str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, {})


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dimse: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, {})


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"dimse:\n  ae_title: \xff\xfe\n")
    with pytest.raises(ConfigError):
        load_config(path, {})


def test_load_config_applies_env(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dimse: {port: 104}\n", encoding="utf-8")
    assert load_config(path, {"DICOMGATE_DIMSE__PORT": "11113"}).dimse.port == 11113


def test_validation_error_from_file_names_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dimse:\n  prot: 104\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.key == "dimse.prot"


def test_pipeline_secret_missing_is_a_config_error_naming_the_step() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_load(DESIGN_EXAMPLE), {})
    assert info.value.key.startswith("routes[1].pipeline[0].deidentify")
    assert "secret_env" in str(info.value)


def test_cors_origins_are_origins() -> None:
    cfg = parse_config({"http": {"cors": {"allow_origins": ["https://viewer.org:8443/"]}}}, {})
    assert cfg.http.cors is not None
    assert cfg.http.cors.allow_origins == ["https://viewer.org:8443"]
    assert parse_config({}, {}).http.cors is None
    for bad, why in [
        (["https://viewer.org/ohif"], "not an origin"),
        (["viewer.org"], "not an origin"),
        (["*", "https://viewer.org"], "alone"),
        ([], "at least 1"),
    ]:
        err = _error({"http": {"cors": {"allow_origins": bad}}})
        assert "http.cors.allow_origins" in str(err) and why in str(err), str(err)
