"""The configuration reference (``docs/configuration.md``), rendered from the models in config.py.

The models are the truth; the page is generated from them and committed. After changing a
model or a description, regenerate it::

    python -m dicomgate.config_reference > docs/configuration.md

A unit test fails while the committed page and :func:`render_reference` differ.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePath
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dicomgate.config import ENV_PREFIX, GatewayConfig, parse_config
from dicomgate.errors import ConfigError
from dicomgate.processing.pipeline import STEPS

REGENERATE = "python -m dicomgate.config_reference > docs/configuration.md"
EXAMPLE_FILE = "examples/dicomgate.yaml"

# Shown in the destinations and routes sections; a unit test checks that they validate.
DESTINATIONS_EXAMPLE = """\
destinations:
  pacs:  {type: dimse, ae_title: PACS, host: 10.0.0.5, port: 104}
  cloud: {type: dicomweb, url: "https://example.org/dicomWeb"}
  share: {type: folder, path: /mnt/out}
  ai:    {type: webhook, url: "https://ai.example.org/hooks/dicom"}
"""
ROUTES_EXAMPLE = """\
routes:
  - name: ct-to-pacs
    match: {Modality: CT, calling_ae: "CT*"}
    to: [pacs, cloud]
  - name: research
    match: {StudyDescription: "*RESEARCH*"}
    trigger: study_stable
    stable_after: 60s
    pipeline:
      - deidentify: {profile: basic, secret_env: DEID_SECRET}
    to: [share]
"""

# Placeholders for the keys of mapping-valued fields whose values are sections.
_KEY_PLACEHOLDERS = {"move_destinations": "<AE>", "ae_titles": "<AE>"}
# List fields whose items are one-key mappings naming a processing step (pipeline.STEPS).
_STEP_LISTS = ("routes[].pipeline",)

_SECONDS_SUFFIXES = ("_timeout", "_grace")
_BYTES_SUFFIXES = ("_bytes", "_pdu_size")
# Number fields that also take a number with a unit (storage.keep_for, audit.keep_for).
_DURATION_WITH_UNIT = ("keep_for",)


@dataclass(frozen=True)
class ReferenceRow:
    """One key of the file, as the reference shows it."""

    key: str  # dotted path: "dimse.port", "destinations.<name>.host", "routes[].to"
    type: str  # readable type, Markdown
    default: str | None  # the default written as YAML; None when the key is required
    description: str


@dataclass(frozen=True)
class ReferenceSection:
    """A heading, an introduction and a table of keys."""

    title: str
    level: int  # Markdown heading level
    intro: str
    rows: tuple[ReferenceRow, ...]
    example: str = ""  # YAML shown after the introduction


def reference_sections(model: type[BaseModel] = GatewayConfig) -> list[ReferenceSection]:
    """The sections of the reference, in the order of the top-level keys of ``model``."""
    sections: list[ReferenceSection] = []
    for name, field in model.model_fields.items():
        annotation = _unwrap(field.annotation)
        origin, args = get_origin(annotation), get_args(annotation)
        if _is_model(annotation):
            sections.append(
                ReferenceSection(name, 2, _intro(field, annotation), tuple(_rows(annotation, name)))
            )
        elif origin is dict and _models_in(args[1]):
            sections.append(ReferenceSection(name, 2, _intro(field, None), (), _example(name)))
            for member in _models_in(args[1]):
                kind = _discriminator_value(member)
                sections.append(
                    ReferenceSection(
                        f"`type: {kind}`",
                        3,
                        _intro(None, member),
                        tuple(_rows(member, f"{name}.<name>")),
                    )
                )
        elif origin is list and _is_model(_unwrap(args[0])):
            member = _unwrap(args[0])
            rows = tuple(_rows(member, f"{name}[]"))
            sections.append(ReferenceSection(name, 2, _intro(field, member), rows, _example(name)))
            for row in rows:
                if row.key in _STEP_LISTS:
                    sections.extend(step_sections(row.key))
        else:
            row = _row(name, field)
            sections.append(ReferenceSection(name, 2, row.description, (row,)))
    return sections


def step_models() -> dict[str, tuple[type[Any], type[BaseModel]]]:
    """Per processing step name: its class and the model of its options (``Step.Config``)."""
    out: dict[str, tuple[type[Any], type[BaseModel]]] = {}
    for name, target in STEPS.items():
        module_name, _, class_name = target.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        out[name] = (cls, cls.Config)
    return out


def step_sections(key: str) -> list[ReferenceSection]:
    """One section per processing step: the options of ``- STEP: {...}`` in list ``key``."""
    sections = []
    for name, (cls, model) in step_models().items():
        summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]
        summary = " ".join(re.sub(r"\s*\(see the module docstring\)", "", summary).split())
        intro = (
            f"`- {name}: {{...}}` in `{key}` (and in the files of `dicomgate process"
            f" --pipeline`): {summary.rstrip('.')}. How it works:"
            f" [processing.md](processing.md#{name})."
        )
        rows = tuple(_rows(model, f"{key}[].{name}"))
        sections.append(ReferenceSection(f"Pipeline step `{name}`", 3, intro, rows))
    return sections


def render_reference() -> str:
    """The configuration reference as Markdown (deterministic: no dates, no environment)."""
    out = [_header()]
    for section in reference_sections():
        out.append(f"{'#' * section.level} {section.title}\n")
        if section.intro:
            out.append(f"{section.intro}\n")
        if section.example:
            out.append(f"```yaml\n{section.example}```\n")
        if section.rows:
            out.append(_table(section.rows))
    return "\n".join(out)


# -- the page's opening ---------------------------------------------------------------


def _header() -> str:
    try:
        parse_config({"dimse": {"prot": 104}}, environ={})
    except ConfigError as exc:
        unknown_key_error = f"dicomgate: config error: {exc}"
    else:  # pragma: no cover - config.py would have stopped rejecting unknown keys
        raise AssertionError("an unknown key was accepted")
    top = list(GatewayConfig.model_fields)
    contents = " · ".join(f"[{name}](#{name})" for name in top)
    return f"""\
# Configuration reference

<!-- Generated from src/dicomgate/config.py by `{REGENERATE}`. Do not edit by hand. -->

dicomgate reads one YAML file, given as `dicomgate serve --config FILE`. Every key has a
default except the few that describe a destination or route you add, so an empty file
starts a gateway with an embedded SQLite index and a store in `./data`; set the keys that
describe your site. `dicomgate check-config FILE` validates a file without starting
anything. A complete, commented example is [{EXAMPLE_FILE}](../{EXAMPLE_FILE}).

- **Unknown keys are errors.** A misspelled or misplaced key is never ignored: the gateway
  does not start, and the command exits with code 2 and one line that names the key, e.g.
  `{unknown_key_error}`. Bad values are reported the same way.
- **Environment overrides.** `{ENV_PREFIX}SECTION__KEY=value` overrides `section.key` of the
  file: a double underscore separates levels. Only variables whose first part is a
  top-level key (`storage`, `database`, `dimse`, `http`, `destinations` ...) are overrides;
  others, such as the command's own `{ENV_PREFIX}CONFIG` or `{ENV_PREFIX}TOKEN`, are left
  alone. Names are case-insensitive and match the keys of the file case-insensitively, so
  `{ENV_PREFIX}DESTINATIONS__PACS__HOST` reaches a destination named `PACS` or `pacs` (two
  names that differ only by case cannot be reached: an error). A text key (`host`, `url`,
  `bearer`, `ae_title`, a path) takes the value exactly as given, `#` and digits included
  (`123456` stays text); any other key reads it as YAML (`{ENV_PREFIX}DIMSE__PORT=104` is a
  number, `true` a boolean, `[a, b]` a list), except that a value holding `#` is taken as
  it is. Use it for secrets, e.g.
  `{ENV_PREFIX}DATABASE__URL=postgresql://dicomgate:secret@db/dicomgate`.
- **Units.** Durations (`*_timeout`, `shutdown_grace`, `lease_seconds`, `settle`; type
  *seconds* or *number* below) are plain numbers of seconds: `30`, `2.5`; `30s` is an error.
  Only `storage.keep_for`, `audit.keep_for` (type *duration*) and `routes[].stable_after` also
  take a number with a unit (`ms`, `s`, `m`, `h`, `d`, combined as in `1h30m`): `24h`,
  `365d`. Sizes (`min_free_bytes`, `max_pdu_size`) are plain integers of bytes: write
  `1073741824`, not `1GB`. A number key refuses YAML's booleans (`yes`, `no`, `on`,
  `off`): `port: on` is an error, not port 1.
- **Duplicate keys are errors.** A key given twice in one mapping (two `destinations:`
  blocks, two destinations named `pacs`) stops the gateway with the line of the second,
  instead of the last one silently winning.
- **Key names.** `destinations.<name>.host` means the `host` key of any destination, `<name>`
  being the name you chose for it; `routes[].to` means the `to` key of each item of the
  `routes` list.

Sections: {contents}
"""


# -- walking the models -------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models of a (possibly annotated) union of models, in declaration order."""
    annotation = _unwrap(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        members = [_unwrap(arg) for arg in get_args(annotation)]
        return [m for m in members if _is_model(m)] if all(map(_is_model, members)) else []
    return []


def _discriminator_value(model: type[BaseModel]) -> str:
    literal = model.model_fields["type"].annotation
    return str(get_args(literal)[0])


def _intro(field: FieldInfo | None, model: type[BaseModel] | None) -> str:
    """A field's description, else the model's docstring, as one paragraph."""
    text = field.description if field is not None and field.description else ""
    if not text and model is not None and model.__doc__:
        text = inspect.cleandoc(model.__doc__)
    return " ".join(text.split())


def _rows(model: type[BaseModel], prefix: str) -> list[ReferenceRow]:
    rows: list[ReferenceRow] = []
    for name, field in model.model_fields.items():
        written = field.alias or name  # what the file says: copy, from
        annotation = _unwrap(field.annotation)
        if _is_model(annotation):
            rows.extend(_rows(annotation, f"{prefix}.{written}"))
        else:
            rows.append(_row(f"{prefix}.{written}", field))
            # An optional section, a list of them, a mapping of them.
            inner, suffix = _inner_model(annotation, _KEY_PLACEHOLDERS.get(name, "<name>"))
            if inner is not None:
                rows.extend(_rows(inner, f"{prefix}.{written}{suffix}"))
    return rows


def _inner_model(annotation: Any, placeholder: str) -> tuple[type[BaseModel] | None, str]:
    """(M, "") for ``M | None``, (M, "[]") for ``list[M]``, (M, ".<key>") for
    ``dict[str, M]``, else (None, "")."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        members = [_unwrap(arg) for arg in args if arg is not type(None)]
        if len(members) == 1 and _is_model(members[0]):
            return members[0], ""
    if origin is list and _is_model(_unwrap(args[0])):
        return _unwrap(args[0]), "[]"
    if origin is dict and _is_model(_unwrap(args[1])):
        return _unwrap(args[1]), f".{placeholder}"
    return None, ""


def _row(key: str, field: FieldInfo) -> ReferenceRow:
    type_name = _type_name(field.annotation, key.rsplit(".", 1)[-1])  # first: it names the key
    default = None if field.is_required() else _yaml(field.get_default(call_default_factory=True))
    description = " ".join((field.description or "").split())
    return ReferenceRow(key, type_name, default, description)


def _type_name(annotation: Any, name: str) -> str:
    """A readable type: ``int``, ``list of string``, ``keep_both | reject | overwrite``."""
    annotation = _unwrap(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        members = [arg for arg in args if arg is not type(None)]
        text = " or ".join(_type_name(member, name) for member in members)
        return f"{text} or null" if len(members) < len(args) else text
    if origin is Literal:
        return " | ".join(f"`{value}`" for value in args)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " | ".join(f"`{member.value}`" for member in annotation)
    if origin is list:
        return f"list of {_type_name(args[0], name)}"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return "[" + ", ".join(_type_name(arg, name) for arg in args) + "]"
    if origin is dict or annotation is dict:
        return "mapping"
    if annotation is bool:
        return "boolean"
    if annotation is int:
        return "int (bytes)" if name.endswith(_BYTES_SUFFIXES) else "int"
    if annotation is float:
        if name in _DURATION_WITH_UNIT:
            return "duration (`24h`, `30m`, `365d` or seconds)"
        seconds = name == "timeout" or name.endswith(_SECONDS_SUFFIXES)
        return "seconds" if seconds else "number"
    if annotation is str:
        return "string"
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "path"
    if annotation is Any:
        return "any"
    if _is_model(annotation):
        return "mapping"
    raise TypeError(f"no readable name for the type {annotation!r} of {name!r}")


def _yaml(value: Any) -> str:
    """``value`` written as it would be in the YAML file."""
    if isinstance(value, Enum):
        value = value.value
    elif isinstance(value, list | dict):  # enums inside: [read], {read: [read]}
        value = _plain(value)
    elif isinstance(value, PurePath):
        posix = value.as_posix()
        # Path("./data") prints as "data"; keep the "./" that says "relative to the cwd".
        value = posix if value.is_absolute() or posix.startswith(".") else f"./{posix}"
    text: str = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, sort_keys=True)
    return text.strip().removesuffix("\n...").strip()


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    return value


def _example(section: str) -> str:
    return {"destinations": DESTINATIONS_EXAMPLE, "routes": ROUTES_EXAMPLE}.get(section, "")


# -- Markdown -----------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(rows: tuple[ReferenceRow, ...]) -> str:
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for row in rows:
        default = "*required*" if row.default is None else f"`{row.default}`"
        cells = (f"`{row.key}`", row.type, default, row.description)
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_reference())
