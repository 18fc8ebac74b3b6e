"""Configuration models of the destination kinds (``destinations:`` in the YAML)."""

from __future__ import annotations

import ipaddress
import re
import string
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator
from pydicom.datadict import tag_for_keyword

from dicomgate.models import ConfigModel as _Model
from dicomgate.models import check_ae_title as _check_ae_title
from dicomgate.queue.traffic import Schedule, parse_schedule
from dicomgate.security.dimse_models import DestinationTls

DEFAULT_FOLDER_TEMPLATE = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
# RFC 1123 host names; "_" too, which some internal DNS zones use.
HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def check_host(value: str) -> str:
    """A host name or an IP address (``pacs.local``, ``10.0.0.5``, ``fd00::5``); no URL,
    no spaces. Returns it without surrounding spaces."""
    host = value.strip()
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        if not HOST_NAME.fullmatch(host):
            raise ValueError(
                f"{value!r} is not a host name or IP address (e.g. pacs.local, 10.0.0.5;"
                " no scheme, port or spaces)"
            ) from None
    return host


def check_http_url(value: str) -> str:
    """An absolute ``http(s)://host[:port][/path]`` URL; returns it without a final ``/``."""
    url = value.strip()
    if not url.startswith(("http://", "https://")):
        raise ValueError("the URL must start with http:// or https://")
    if any(c.isspace() for c in url):
        raise ValueError(f"{value!r}: a URL has no spaces (write %20)")
    parsed = urllib.parse.urlsplit(url)
    try:
        parsed.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError:
        raise ValueError(f"{value!r}: bad port") from None
    if not parsed.hostname:
        raise ValueError(f"{value!r} names no host; expected http(s)://host[:port][/path]")
    check_host(parsed.hostname)
    return url


class RateLimit(_Model):
    """Most traffic sent to one destination; either limit may be left unset."""

    instances_per_second: float | None = Field(
        None,
        gt=0,
        description="Most instances sent per second (e.g. `20`); unset: no limit.",
    )
    megabytes_per_second: float | None = Field(
        None,
        gt=0,
        description=(
            "Most megabytes (10^6 bytes) of files sent per second, e.g. `10` to leave room on"
            " a shared WAN link; unset: no limit."
        ),
    )


class BreakerSettings(_Model):
    """When to stop trying a destination that fails every delivery."""

    failures: int = Field(
        5,
        ge=0,
        description=(
            "Consecutive failed batches (nothing delivered, every failure retryable: refused"
            " connection, rejected association, timeout, HTTP 5xx) that open the breaker."
            " While open, jobs wait without spending retry attempts. 0 turns the"
            " breaker off."
        ),
    )
    cooldown: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds the breaker stays open; then one batch probes the destination: success"
            " closes the breaker, failure opens it for another cool-down."
        ),
    )


class DestinationControls(_Model):
    """Traffic control shared by every destination kind."""

    rate_limit: RateLimit = Field(
        default_factory=RateLimit,
        description="Most instances and megabytes per second sent to this destination.",
    )
    schedule: str | list[str] | None = Field(
        None,
        description=(
            'When deliveries may run, e.g. `"20:00-06:00"` (nights) or `["Mon-Fri'
            ' 19:00-07:00", "Sat,Sun"]` (week nights and week-ends). A window is'
            " `[DAYS] HH:MM-HH:MM` or just `DAYS`; a window past midnight belongs to the day it"
            " starts on. Times are the gateway's local time (see `schedule_timezone`). Outside"
            " every window, jobs are queued and wait; an association or request already"
            " running finishes its batch. Unset: always."
        ),
    )
    schedule_timezone: str | None = Field(
        None,
        description=(
            "IANA time zone of `schedule`, e.g. `Europe/Paris`; unset: the gateway host's"
            " local time zone."
        ),
    )
    breaker: BreakerSettings = Field(
        default_factory=BreakerSettings,
        description="Circuit breaker: pause a destination that fails every delivery.",
    )

    @field_validator("schedule")
    @classmethod
    def _windows(cls, value: str | list[str] | None) -> str | list[str] | None:
        parse_schedule(value)
        return value

    @field_validator("schedule_timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{value!r} is not a known IANA time zone") from None
        return value

    def traffic_schedule(self) -> Schedule:
        tz = ZoneInfo(self.schedule_timezone) if self.schedule_timezone else None
        return Schedule(parse_schedule(self.schedule), tz)


class DimseDestination(DestinationControls):
    """Send with C-STORE to a DICOM node (PACS, workstation, AI engine)."""

    type: Literal["dimse"] = Field(description="Destination kind: `dimse`.")
    ae_title: str = Field(description="The peer's AE title (the called AE title we use).")
    host: str = Field(description="The peer's host name or IP address.")
    port: int = Field(104, ge=1, le=65535, description="The peer's DICOM TCP port.")
    calling_ae_title: str | None = Field(
        None,
        description=(
            "Calling AE title we present to this peer; unset means `dimse.ae_title`. Set it"
            " when the peer knows this gateway under another name."
        ),
    )
    max_associations: int = Field(
        2,
        ge=1,
        description=(
            "Most associations open at once to this peer. Raise it for throughput if the peer"
            " accepts more; keep it low for a busy PACS. A peer that serves one association"
            " at a time (DCMTK storescp without --fork, many modalities) is noticed: when a"
            " further association is still unanswered after 1 s while one of ours is idle,"
            " it is given up, that one is used, and for 5 minutes one association is used"
            ' (warning "egress.dimse_one_association"), instead of waiting `idle_timeout`.'
        ),
    )
    idle_timeout: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds an association is kept open with nothing to send; it is reused by the"
            " next instances meanwhile and released (A-RELEASE) after."
        ),
    )
    dimse_timeout: float = Field(
        60.0,
        gt=0,
        description=(
            "Seconds to wait for the TCP connection, the association answer and each C-STORE"
            " response. When it passes the association is aborted and the instances are"
            " retried later."
        ),
    )
    tls: DestinationTls | None = Field(
        None,
        description="DICOM TLS to this peer (PS3.15 Annex B); unset: plain DICOM.",
    )
    batch_max_instances: int = Field(
        16,
        ge=1,
        description=(
            "Most instances sent in one turn over one association. Larger turns cost fewer"
            " hand-overs; smaller ones share the associations more fairly between routes."
        ),
    )

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))
    _host = field_validator("host")(classmethod(lambda cls, v: check_host(v)))

    @field_validator("calling_ae_title")
    @classmethod
    def _calling_ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)


@dataclass(frozen=True)
class BasicAuth:
    """HTTP basic authentication (RFC 7617)."""

    username: str
    password: str


@dataclass(frozen=True)
class HttpAuth:
    """The parsed ``auth:`` of a DICOMweb destination: exactly one way is set."""

    bearer: str | None = None
    bearer_file: Path | None = None
    basic: BasicAuth | None = None


_AUTH_HELP = (
    "use one of {bearer: TOKEN}, {bearer_file: PATH} or {basic: {username: U, password: P}}"
)


class BasicCredentials(_Model):
    """HTTP basic authentication (RFC 7617)."""

    username: str = Field(description="User name.")
    password: str = Field(description="Password; keep it out of the file (environment).")


class DicomwebAuth(_Model):
    """How a DICOMweb destination authenticates: exactly one of its keys."""

    bearer: str | None = Field(
        None, description="A static token, sent as `Authorization: Bearer TOKEN`."
    )
    bearer_file: Path | None = Field(
        None,
        description=(
            "A file holding the token, read again whenever it changes (for tokens refreshed"
            " by another program)."
        ),
    )
    basic: BasicCredentials | None = Field(
        None, description="`{username: U, password: P}`: HTTP basic authentication."
    )

    @field_validator("bearer", "bearer_file", mode="before")
    @classmethod
    def _non_empty(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must be a non-empty string")
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> DicomwebAuth:
        given = [v for v in (self.bearer, self.bearer_file, self.basic) if v is not None]
        if len(given) != 1:
            raise ValueError(_AUTH_HELP)
        return self

    def typed(self) -> HttpAuth:
        if self.basic is not None:
            return HttpAuth(basic=BasicAuth(self.basic.username, self.basic.password))
        return HttpAuth(bearer=self.bearer, bearer_file=self.bearer_file)


class DicomwebDestination(DestinationControls):
    """Send with STOW-RS to a DICOMweb service (cloud archive, VNA)."""

    type: Literal["dicomweb"] = Field(description="Destination kind: `dicomweb`.")
    url: str = Field(
        description=(
            "Base URL of the DICOMweb service (the part before `/studies`), e.g."
            " `https://example.org/dicomWeb`."
        )
    )
    auth: DicomwebAuth | None = Field(
        None,
        description=(
            "How to authenticate, one of: `{bearer: TOKEN}`, `{bearer_file: PATH}` or"
            " `{basic: {username: U, password: P}}`. Unset: no authentication. Keep secrets"
            " out of the file with the environment overrides."
        ),
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra HTTP headers sent with every request, e.g. an API key header.",
    )
    verify: bool | Path = Field(
        True,
        description=(
            "TLS server certificate verification: `true` (system CA store), a path to a CA"
            " bundle (PEM) to trust instead, or `false` (no verification; test systems only)."
        ),
    )
    timeout: float = Field(
        120.0,
        gt=0,
        description=(
            "Seconds to wait for the connection, for each read and write, and for the"
            " response; a timeout makes the batch retried later."
        ),
    )
    batch_max_instances: int = Field(
        50, ge=1, description="Most instances sent in one STOW-RS request."
    )
    batch_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description=(
            "Most bytes of instances in one STOW-RS request (an instance larger than this is"
            " sent alone)."
        ),
    )
    concurrency: int = Field(
        2, ge=1, description="Most STOW-RS requests in flight at once to this service."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_http_url(value).rstrip("/")

    @property
    def parsed_auth(self) -> HttpAuth | None:
        """The ``auth`` setting, as the HTTP client takes it."""
        return None if self.auth is None else self.auth.typed()


_FORMATTER = string.Formatter()


def template_keywords(template: str) -> list[str]:
    """The DICOM keywords a folder template uses; ``ValueError`` says what is wrong."""
    keywords: list[str] = []
    literal_text = ""
    for literal, field, spec, conversion in _FORMATTER.parse(template):
        literal_text += literal
        if field is None:
            continue
        if spec or conversion:
            raise ValueError(f"{{{field}}}: format specs and conversions are not supported")
        if tag_for_keyword(field) is None:
            raise ValueError(f"{{{field}}} is not a DICOM keyword (e.g. {{PatientID}})")
        keywords.append(field)
        literal_text += "x"
    parts = PurePosixPath(literal_text).parts
    if literal_text.startswith("/") or ".." in parts or "\\" in literal_text:
        raise ValueError("the template must be a relative path without '..' or backslashes")
    if literal_text.endswith("/") or not parts:
        raise ValueError("the template must end with a file name")
    return keywords


class FolderDestination(DestinationControls):
    """Write Part 10 files into a folder (a share, a research drop box)."""

    type: Literal["folder"] = Field(description="Destination kind: `folder`.")
    path: Path = Field(description="Folder the files are written into.")
    template: str = Field(
        DEFAULT_FOLDER_TEMPLATE,
        description=(
            "Relative path of each file under `path`. `{Keyword}` is replaced by that DICOM"
            " element of the instance (any keyword, e.g. `{PatientID}`, `{Modality}`), made"
            " safe for file names (`/`, `..` and control characters replaced; an empty value"
            " becomes `UNKNOWN`). A file that exists already is replaced. A template without"
            " `{SOPInstanceUID}` (e.g. `{PatientID}/{SeriesNumber}.dcm`, one file per"
            " series) gives several instances the same file, each replacing the one before:"
            " `dicomgate check-config` and the start-up log warn of it (event"
            " `config.folder_template_overwrites`), and each file of another instance"
            " replaced is logged (event `egress.folder_replaced`, the UIDs hashed)."
        ),
    )

    @field_validator("template")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        template_keywords(value)
        return value

    def overwrite_warning(self) -> str | None:
        """Why instances may replace each other's file (the template names no
        ``{SOPInstanceUID}``: not an error, a per-series export may be intended), or None."""
        if "SOPInstanceUID" in template_keywords(self.template):
            return None
        return (
            f"template {self.template!r} has no {{SOPInstanceUID}}: instances given the same"
            " path replace each other's file (only the last one is kept); add"
            " {SOPInstanceUID} to the file name unless one file per path is intended"
        )


class WebhookDestination(DestinationControls):
    """Notify an HTTP endpoint (e.g. an AI engine) about received instances."""

    type: Literal["webhook"] = Field(description="Destination kind: `webhook`.")
    url: str = Field(
        description=(
            "URL of the endpoint to notify. The JSON names the UIDs and a `wado_rs` link to"
            " fetch the instance back, under `http.public_url` (set it to the gateway's"
            " name as the receiver reaches it)."
        )
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers sent with every notification."
    )
    bearer: str | None = Field(
        None, description="Token sent as `Authorization: Bearer TOKEN`; unset: none."
    )
    verify: bool | Path = Field(
        True,
        description=(
            "TLS server certificate verification: `true`, a path to a CA bundle (PEM), or"
            " `false` (test systems only)."
        ),
    )
    timeout: float = Field(30.0, gt=0, description="Seconds to wait for the endpoint's answer.")
    concurrency: int = Field(4, ge=1, description="Most notifications in flight at once.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_http_url(value)


def destination_warnings(
    destinations: Mapping[
        str, DimseDestination | DicomwebDestination | FolderDestination | WebhookDestination
    ],
) -> list[str]:
    """Settings that are valid but likely unintended, one line each naming the key
    (``dicomgate check-config`` prints them; the senders log them at start-up)."""
    out = []
    for name, model in destinations.items():
        if isinstance(model, FolderDestination) and (warning := model.overwrite_warning()):
            out.append(f"destinations.{name}.template: {warning}")
    return out
