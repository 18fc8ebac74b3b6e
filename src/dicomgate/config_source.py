"""Reading the configuration's raw data: the YAML file, environment overrides, and the
checks that need the document as written (before pydantic has converted it).

Everything here takes the root model class as an argument, so :mod:`dicomgate.config`
stays the one place that defines the models.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Strict

from dicomgate.errors import ConfigError

ENV_PREFIX = "DICOMGATE_"
_MERGE_TAG = "tag:yaml.org,2002:merge"


# -- YAML ------------------------------------------------------------------------------


def _join(key: str, part: object) -> str:
    if isinstance(part, int):
        return f"{key}[{part}]"
    return f"{key}.{part}" if key else str(part)


def _refuse_duplicate_keys(node: yaml.Node, key: str, seen: set[int]) -> None:
    """PyYAML keeps the last of two equal keys and drops the first without a word: a
    second ``destinations:`` block would replace the first one."""
    if id(node) in seen:  # an alias: checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                name = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if name in first_line:
                    where = (
                        f"duplicate key {key_node.value!r}"
                        if key
                        else (f"duplicate top-level key {key_node.value!r}")
                    )
                    raise ConfigError(
                        key, f"{where} (line {line}; first given on line {first_line[name]})"
                    )
                first_line[name] = line
                _refuse_duplicate_keys(value_node, _join(key, key_node.value), seen)
            else:
                _refuse_duplicate_keys(value_node, key, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, _join(key, i), seen)


def load_yaml(text: str, path: Path) -> Any:
    """The YAML document in ``text`` (read from ``path``), refusing duplicate keys; a syntax
    error is one line naming the file, line and column."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, "", set())
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        context = " ".join(str(exc.context).split()) if exc.context and exc.problem else ""
        raise ConfigError(
            "", f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    finally:
        loader.dispose()


# -- the models' types, followed through the raw document --------------------------------


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types of a union (``None`` left out), else the type alone."""
    annotation = _strip(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(_strip(a) for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def model_for(annotation: Any, value: object) -> type[BaseModel] | None:
    """The model a value of this annotation is validated as; a union of models (the
    destination kinds) is resolved by the value's ``type``."""
    models = [m for m in _members(annotation) if _is_model(m)]
    if len(models) == 1:
        return models[0]  # type: ignore[no-any-return]
    kind = value.get("type") if isinstance(value, dict) else None
    for model in models:
        field = model.model_fields.get("type")
        literal = field is not None and get_origin(field.annotation) is Literal
        if literal and field is not None and kind in get_args(field.annotation):
            return model  # type: ignore[no-any-return]
    return None


def annotation_at(root: type[BaseModel], data: object, path: Sequence[object]) -> Any:
    """The declared type of the key at ``path`` in the document ``data``, or None when the
    path leads nowhere known."""
    annotation: Any = root
    value = data
    for part in path:
        model = model_for(annotation, value)
        if model is not None:
            field = model.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            annotation = field.annotation
        else:
            container = _strip(annotation)
            origin = get_origin(container)
            if origin is dict and isinstance(part, str):
                annotation = get_args(container)[1]
            elif origin is list and isinstance(part, int):
                annotation = get_args(container)[0]
            else:
                return None
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            value = None
    return annotation


def _is_strict(annotation: Any) -> bool:
    """``StrictInt`` and the like: pydantic refuses a boolean itself, with its own words."""
    annotation = _strip_outer_optional(annotation)
    args = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    return any(
        get_origin(a) is Annotated and any(isinstance(m, Strict) for m in get_args(a)[1:])
        for a in (*args, annotation)
    )


def _strip_outer_optional(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated and not any(
        isinstance(m, Strict) for m in get_args(annotation)[1:]
    ):
        annotation = get_args(annotation)[0]
    return annotation


def _is_number(annotation: Any) -> bool:
    if _is_strict(annotation):
        return False
    members = _members(annotation)
    return bool not in members and any(m in (int, float) for m in members)


def _is_text(annotation: Any) -> bool:
    members = _members(annotation)
    return bool(members) and all(isinstance(m, type) and issubclass(m, str | Path) for m in members)


def refuse_booleans(model: type[BaseModel], data: object, key: str = "") -> None:
    """YAML reads ``yes``/``no``/``on``/``off``/``true``/``false`` as booleans, and pydantic
    takes a boolean for a number: ``port: on`` would be port 1, ``breaker: {failures: off}``
    0 (breaker off). A boolean where a number is expected is a config error."""
    if not isinstance(data, dict):
        return
    for name, value in data.items():
        field = model.model_fields.get(name) if isinstance(name, str) else None
        if field is not None:
            _refuse_boolean(field.annotation, value, _join(key, name))


def _refuse_boolean(annotation: Any, value: object, key: str) -> None:
    if isinstance(value, bool):
        if _is_number(annotation):
            raise ConfigError(
                key,
                f"expected a number, not the boolean {str(value).lower()} (YAML reads"
                " yes, no, on, off, true and false as booleans)",
            )
        return
    container = _strip(annotation)
    origin = get_origin(container)
    if origin is dict and isinstance(value, dict):
        for name, item in value.items():
            _refuse_boolean(get_args(container)[1], item, _join(key, name))
    elif origin is list and isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_boolean(get_args(container)[0], item, _join(key, i))
    else:
        model = model_for(annotation, value)
        if model is not None:
            refuse_booleans(model, value, key)


# -- environment overrides ---------------------------------------------------------------


def _env_value(value: str, text: bool) -> Any:
    """An environment value: the raw string for a text key; else read as YAML (numbers,
    booleans, lists), but never cut at a ``#`` nor unquoted, so a string stays as given."""
    if text or not value or "#" in value:
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value  # e.g. "@PACS": a legal AE title that is not valid YAML
    return value if isinstance(parsed, str) else parsed


def _existing_key(node: dict[Any, Any], part: str, variable: str) -> str:
    """The key of ``node`` that ``part`` names, compared case-insensitively (environment
    variable names are upper case by habit; a destination may be called ``PACS``)."""
    matches = [k for k in node if isinstance(k, str) and k.casefold() == part.casefold()]
    if len(matches) > 1:
        names = ", ".join(repr(k) for k in matches)
        raise ConfigError(variable, f"matches several keys of the file ({names}); rename one")
    return matches[0] if matches else part.lower()


def apply_env(
    root: type[BaseModel], data: dict[str, Any], environ: Mapping[str, str]
) -> dict[str, Any]:
    """Overlay ``DICOMGATE_A__B=value`` variables onto the parsed YAML as ``a.b: value``.

    Only variables whose first part is a top-level key (``DICOMGATE_DATABASE__URL``) are
    overrides; the command's own (``DICOMGATE_CONFIG``, ``DICOMGATE_TOKEN``) are not."""
    top = {name.casefold(): name for name in root.model_fields}
    for variable, value in sorted(environ.items()):
        if not variable.upper().startswith(ENV_PREFIX):
            continue
        parts = [part for part in variable[len(ENV_PREFIX) :].split("__") if part]
        if not parts or parts[0].casefold() not in top:
            continue
        path = [top[parts[0].casefold()]]
        node = data
        for part in parts[1:]:
            child = node.setdefault(path[-1], {})
            if not isinstance(child, dict):
                raise ConfigError(
                    ".".join(path), f"environment variable {variable} nests into a value"
                )
            node = child
            path.append(_existing_key(node, part, variable))
        node[path[-1]] = _env_value(value, _is_text(annotation_at(root, data, path)))
    return data


# --------------------------------------------------------------------------- suggestions


def _unwrap(tp: Any) -> Any:
    """``tp`` without ``Annotated`` and ``None`` (``X | None`` is ``X``)."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        members = [m for m in get_args(tp) if m is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return tp


def _union_member(tp: Any, tag: str) -> Any:
    """The member of a union of models whose ``type`` literal is ``tag`` (pydantic's loc
    of a discriminated union names the tag), else None."""
    for member in get_args(tp):
        member = _unwrap(member)
        if isinstance(member, type) and issubclass(member, BaseModel):
            field = member.model_fields.get("type")
            if field is not None and tag in get_args(_unwrap(field.annotation)):
                return member
    return None


def known_keys(root: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The keys the model at ``loc`` (a pydantic error location, below ``root``) accepts;
    empty when ``loc`` leads to no model."""
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                field = next((f for f in tp.model_fields.values() if f.alias == part), None)
            if field is None:
                return []
            tp = field.annotation
        elif origin in (dict, Mapping) and isinstance(part, str):
            tp = get_args(tp)[1]
        elif origin in (list, tuple, Sequence) and isinstance(part, int):
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType) and isinstance(part, str):
            tp = _union_member(tp, part)
            if tp is None:
                return []
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or name for name, f in tp.model_fields.items()]
    return []


def close_key(root: type[BaseModel], loc: Sequence[int | str]) -> str | None:
    """The known key an unknown key at ``loc`` is most likely a misspelling of, if any."""
    import difflib

    if not loc:
        return None
    wrong = str(loc[-1])
    known = known_keys(root, loc[:-1])
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(wrong.lower(), list(by_lower), n=1)
    return by_lower[close[0]] if close else None
