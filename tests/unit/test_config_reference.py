"""docs/configuration.md is generated from the config models and says what they do."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dicomgate.config import Destination, GatewayConfig, RouteConfig, load_config, parse_config
from dicomgate.config_reference import (
    DESTINATIONS_EXAMPLE,
    EXAMPLE_FILE,
    REGENERATE,
    ROUTES_EXAMPLE,
    reference_sections,
    render_reference,
)
from dicomgate.processing.pipeline import STEPS

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"


def _sections_in(annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    """The models a field's value holds, with the key suffix that reaches them: a section
    (""), an optional one (""), a list of them ("[]"), a mapping of them (".<*>")."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    if origin in (typing.Union, types.UnionType):
        return [hit for arg in args for hit in _sections_in(arg)]
    if origin is list:
        return [("[]" + suffix, model) for suffix, model in _sections_in(args[0])]
    if origin is dict:
        return [(".<*>" + suffix, model) for suffix, model in _sections_in(args[1])]
    return []


def _leaf_fields() -> list[tuple[str, FieldInfo]]:
    """Every key a user can write, with its dotted name as the reference spells it (the
    keys of a mapping of sections as ``<*>``), pipeline step options included."""
    models: list[tuple[str, type[BaseModel]]] = []
    for name, field in GatewayConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            models.append((name, annotation))
        elif name == "destinations":
            union = typing.get_args(Destination)[0]
            models.extend((f"{name}.<*>", kind) for kind in typing.get_args(union))
        elif name == "routes":
            models.append((f"{name}[]", RouteConfig))
        else:
            pytest.fail(f"top-level key {name!r} has a shape this test does not know")
    for step in STEPS:  # `- STEP: {...}` items of routes[].pipeline, by Step.Config
        module, _, cls = STEPS[step].partition(":")
        config = getattr(importlib.import_module(module), cls).Config
        models.append((f"routes[].pipeline[].{step}", config))
    leaves: list[tuple[str, FieldInfo]] = []
    while models:
        prefix, model = models.pop(0)
        assert issubclass(model, BaseModel)
        for name, field in model.model_fields.items():
            key = f"{prefix}.{field.alias or name}"
            inner = _sections_in(field.annotation)
            if not (isinstance(field.annotation, type) and inner):
                leaves.append((key, field))  # a value (an optional section is one too)
            models.extend((key + suffix, sub) for suffix, sub in inner)
    return leaves


def _reference_keys() -> set[str]:
    """The keys of the reference's tables, placeholders written ``<*>``."""
    keys = {row.key for section in reference_sections() for row in section.rows}
    return {re.sub(r"<[^>]+>", "<*>", key) for key in keys}


def test_committed_reference_is_up_to_date() -> None:
    committed = DOC.read_text(encoding="utf-8")
    assert committed == render_reference(), (
        f"docs/configuration.md is out of date with src/dicomgate/config.py; run `{REGENERATE}`"
    )


def test_every_key_has_a_description() -> None:
    leaves = _leaf_fields()
    assert len(leaves) > 30
    missing = [key for key, field in leaves if not (field.description or "").strip()]
    assert missing == [], f"give these keys a Field(description=...) in config.py: {missing}"


def test_every_section_has_an_introduction() -> None:
    sections = reference_sections()
    assert {s.title for s in sections if s.level == 2} == set(GatewayConfig.model_fields)
    assert [s.title for s in sections if not s.intro.strip()] == []


def test_reference_mentions_every_key() -> None:
    keys = _reference_keys()
    missing = [key for key, _ in _leaf_fields() if key not in keys]
    assert missing == [], f"keys absent from the reference: {missing}"
    text = render_reference()
    assert all(f"| `{row.key}` |" in text for s in reference_sections() for row in s.rows)


def test_reference_reaches_inside_mappings_and_pipeline_steps() -> None:
    keys = {row.key for section in reference_sections() for row in section.rows}
    for key in (
        "dimse.move_destinations.<AE>.host",
        "dimse.move_destinations.<AE>.port",
        "query.ae_titles.<AE>.source",
        "query.ae_titles.<AE>.timeout",
        "destinations.<name>.auth.bearer",
        "destinations.<name>.auth.bearer_file",
        "destinations.<name>.auth.basic.username",
        "routes[].pipeline[].deidentify.secret_env",
        "routes[].pipeline[].deidentify.burned_in.masks[].rectangles",
        "routes[].pipeline[].standardize.rules[].copy.from",
        "routes[].pipeline[].transcode.transfer_syntax",
        "routes[].pipeline[].split.new_series",
    ):
        assert key in keys, key
    titles = [s.title for s in reference_sections() if s.level == 3]
    assert [f"Pipeline step `{step}`" for step in STEPS] == [t for t in titles if "step" in t]


def test_defaults_shown_are_the_defaults() -> None:
    """Writing the documented default into the file gives the same configuration."""
    default = GatewayConfig()
    checked = 0
    for section in reference_sections():
        for row in section.rows:
            top, _, key = row.key.partition(".")
            if row.default is None or not hasattr(default, top) or "." in key:
                continue
            value = yaml.safe_load(row.default)
            config = parse_config({top: {key: value}}, environ={})
            assert getattr(getattr(config, top), key) == getattr(getattr(default, top), key), (
                row.key
            )
            checked += 1
    assert checked >= 20


def test_readable_types() -> None:
    rows = {row.key: row for section in reference_sections() for row in section.rows}
    assert rows["storage.duplicates"].type == "`keep_both` | `reject` | `overwrite`"
    assert rows["dimse.dimse_timeout"].type == "seconds"
    assert rows["dimse.port"].type == "int"
    assert rows["dimse.allowed_calling_aets"].type == "list of string"
    assert rows["storage.path"].default == "./data"
    assert rows["destinations.<name>.host"].default is None
    # A pipe inside a table cell is escaped, or the row would gain columns.
    assert "`keep_both` \\| `reject` \\| `overwrite`" in render_reference()


def test_an_unnamed_type_is_an_error_not_a_guess() -> None:
    class Odd(BaseModel):
        ratio: complex = 1j

    class Top(BaseModel):
        odd: Odd = Odd()

    with pytest.raises(TypeError, match="ratio"):
        reference_sections(Top)


def test_examples_in_the_reference_are_valid() -> None:
    data = yaml.safe_load(DESTINATIONS_EXAMPLE) | yaml.safe_load(ROUTES_EXAMPLE)
    config = parse_config(data, environ={"DEID_SECRET": "a de-identification key of 32 chars"})
    assert sorted(config.destinations) == ["ai", "cloud", "pacs", "share"]
    assert [route.name for route in config.routes] == ["ct-to-pacs", "research"]


def test_linked_example_file_is_valid() -> None:
    text = render_reference()
    assert f"]({'../' + EXAMPLE_FILE})" in text
    load_config(ROOT / EXAMPLE_FILE, environ={})


def test_documented_environment_overrides_work() -> None:
    url = "postgresql://dicomgate:secret@db/dicomgate"
    environ = {"DICOMGATE_DATABASE__URL": url, "DICOMGATE_DIMSE__PORT": "104"}
    text = render_reference()
    assert all(name in text for name in environ)
    config = parse_config({}, environ=environ)
    assert config.database.url == url
    assert config.dimse.port == 104


def test_documented_unknown_key_error_is_what_the_command_prints(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dimse:\n  prot: 104\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "dicomgate", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line == "dicomgate: config error: dimse.prot: unknown key (did you mean 'port'?)"
    assert f"`{line}`" in render_reference()
