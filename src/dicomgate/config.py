"""Configuration: one YAML file, validated by pydantic models.

Every key has a default except what names the site. Unknown keys are errors. Secrets can
come from the environment: ``DICOMGATE_DATABASE__URL`` overrides ``database.url`` (a double
underscore separates nesting levels; keys are case-insensitive).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicomgate.errors import ConfigError

ENV_PREFIX = "DICOMGATE_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2 AE VR: no backslash, no control


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae_title(value: str) -> str:
    if not value.strip() or not _AE_RE.match(value):
        raise ValueError("an AE title is 1-16 printable characters, no backslash")
    return value.strip()


class DuplicatePolicy(StrEnum):
    """What to do when a SOP Instance UID arrives that is already stored."""

    KEEP_BOTH = "keep_both"  # the newest becomes current; nothing is deleted
    REJECT = "reject"  # refuse the new one (DIMSE 0xA900 / STOW failure)
    OVERWRITE = "overwrite"  # the newest replaces the stored one (old file removed)


class StorageConfig(_Model):
    path: Path = Path("./data")
    fsync: bool = Field(
        True, description="fsync each file and its directory before acknowledging (power-loss safe)"
    )
    duplicates: DuplicatePolicy = DuplicatePolicy.KEEP_BOTH
    min_free_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="refuse new instances (0xA700) below this free space"
    )


class DatabaseConfig(_Model):
    url: str = "sqlite:///./data/index.db"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not (value.startswith("sqlite:") or value.startswith("postgresql")):
            raise ValueError("use sqlite:///PATH or postgresql://user@host/db")
        return value


class DimseConfig(_Model):
    ae_title: str = "DICOMGATE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    check_called_ae: bool = Field(True, description="reject associations not addressed to ae_title")
    max_associations: int = Field(64, ge=1)
    max_associations_per_ae: int = Field(16, ge=1)
    max_pdu_size: int = Field(
        262144, ge=0, description="largest PDU we accept, bytes; 0 = unlimited (PS3.8 D.1)"
    )
    acse_timeout: float = Field(30.0, gt=0, description="seconds to wait for association messages")
    dimse_timeout: float = Field(60.0, gt=0, description="seconds to wait for a DIMSE message")
    network_timeout: float = Field(120.0, gt=0, description="idle seconds before the link is cut")
    shutdown_grace: float = Field(
        30.0, ge=0, description="seconds in-flight associations get on SIGTERM"
    )

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("allowed_calling_aets")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value or len(value) > 16 or "\\" in value:
                raise ValueError(f"bad AE title pattern {value!r}")
        return values


class HttpConfig(_Model):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)


class LoggingConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class DimseDestination(_Model):
    type: Literal["dimse"]
    ae_title: str
    host: str
    port: int = Field(104, ge=1, le=65535)
    calling_ae_title: str | None = None
    max_associations: int = Field(2, ge=1)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


class DicomwebDestination(_Model):
    type: Literal["dicomweb"]
    url: str


class FolderDestination(_Model):
    type: Literal["folder"]
    path: Path


class WebhookDestination(_Model):
    type: Literal["webhook"]
    url: str


Destination = Annotated[
    DimseDestination | DicomwebDestination | FolderDestination | WebhookDestination,
    Field(discriminator="type"),
]


class RouteConfig(_Model):
    name: str
    match: dict[str, Any] = Field(default_factory=dict)
    pipeline: list[dict[str, Any]] = Field(default_factory=list)
    to: list[str] = Field(min_length=1)
    final: bool = False
    trigger: Literal["instance", "series_stable", "study_stable"] = "instance"
    stable_after: str = "60s"


class GatewayConfig(_Model):
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    dimse: DimseConfig = DimseConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    destinations: dict[str, Destination] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _routes_name_known_destinations(self) -> GatewayConfig:
        for i, route in enumerate(self.routes):
            for name in route.to:
                if name not in self.destinations:
                    raise ValueError(f"routes[{i}].to: unknown destination {name!r}")
        return self


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``DICOMGATE_A__B=value`` variables onto the parsed YAML as ``a.b: value``."""
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == "DICOMGATE_CONFIG":
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(path), f"environment variable {name} nests into a value")
            node = child
        node[path[-1]] = yaml.safe_load(value) if value else value
    return data


def _format_error(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
    if len(loc) > 2 and loc[0] == "destinations":
        del loc[2]  # pydantic's union-member tag (the destination type)
    key = ".".join(loc)
    # Drop pydantic's union-member tags (e.g. "dimse" in destinations.pacs.dimse.port).
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    if msg.startswith("routes["):
        key, _, msg = msg.partition(": ")
    return ConfigError(key, msg)


def parse_config(data: Any, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validate a parsed YAML document (plus environment overrides) into a config."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", "the config file must be a YAML mapping")
    data = _apply_env(dict(data), os.environ if environ is None else environ)
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise _format_error(exc) from exc


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate the YAML config at ``path``; raises :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
    return parse_config(data, environ)
