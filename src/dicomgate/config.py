"""Configuration: one YAML file, validated by pydantic models.

Every key has a default except what names the site. Unknown keys are errors. Secrets can
come from the environment: ``DICOMGATE_DATABASE__URL`` overrides ``database.url`` (a double
underscore separates nesting levels; keys are case-insensitive).
"""

from __future__ import annotations

import copy
import os
import re
import socket
import urllib.parse
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator

from dicomgate.bridge.models import QueryConfig
from dicomgate.config_source import (
    ENV_PREFIX,
    apply_env,
    close_key,
    load_yaml,
    refuse_booleans,
)
from dicomgate.egress.models import (
    HOST_NAME,
    DicomwebDestination,
    DimseDestination,
    FolderDestination,
    WebhookDestination,
    check_host,
)
from dicomgate.errors import ConfigError
from dicomgate.ingress.models import IngestConfig
from dicomgate.models import ConfigModel as _Model
from dicomgate.models import check_ae_title as _check_ae_title
from dicomgate.observability.models import AuditConfig, MetricsConfig
from dicomgate.processing.base import StepContext
from dicomgate.processing.pipeline import Pipeline, build
from dicomgate.queue.models import QueueConfig
from dicomgate.routing.matcher import Router
from dicomgate.routing.models import NAME_MAX, RouteConfig, parse_duration
from dicomgate.security.dimse_access import is_network as _is_network
from dicomgate.security.dimse_models import DestinationTls, DimseTlsConfig
from dicomgate.security.http_models import (
    HttpAuthConfig,
    HttpCorsConfig,
    HttpLimitsConfig,
    HttpTlsConfig,
    parse_networks,
)

MIN_PDU_SIZE = 4096


class DuplicatePolicy(StrEnum):
    """What to do when a SOP Instance UID arrives that is already stored."""

    KEEP_BOTH = "keep_both"  # the newest becomes current; nothing is deleted
    REJECT = "reject"  # refuse the new one (DIMSE 0x0111 Duplicate SOP Instance)
    OVERWRITE = "overwrite"  # the newest replaces the stored one (old file removed)


class RetentionMode(StrEnum):
    """What happens to a stored instance once it has been delivered."""

    ARCHIVE = "archive"  # keep every instance (deleting is the operator's business)
    RELAY = "relay"  # delete it once every delivery is done and keep_for has passed


def _keep_for(value: object) -> float:
    if value in (0, "0", 0.0):
        return 0.0
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a number with a unit")
    return parse_duration(value)


class StorageConfig(_Model):
    """Where received instances are kept on disk, and how safely."""

    path: Path = Field(
        Path("./data"),
        description=(
            "Folder of the content store, created if missing: `spool/` holds instances while"
            " they arrive, `store/` the acknowledged files, `quarantine/` incomplete files set"
            " aside by crash recovery. A relative path is taken from the working directory."
            " Put it on a disk with room for everything you keep. One gateway process uses"
            " it at a time (`.dicomgate-lock`; with PostgreSQL one per node name): a second"
            " `dicomgate serve` on it is refused at start-up."
        ),
    )
    fsync: bool = Field(
        True,
        description=(
            "Flush each received file and its folder entry to disk before a C-STORE success"
            " is sent, so an acknowledged instance survives a power cut. With SQLite, index"
            " commits are crash-safe immediately and made power-loss-safe by a WAL sync every"
            " 5 s; after an unclean stop the index is recovered from the store files at"
            " start-up. With PostgreSQL every index commit is synchronous. Set `false` only on"
            " test systems: faster, but a power cut can lose instances already acknowledged."
        ),
    )
    duplicates: DuplicatePolicy = Field(
        DuplicatePolicy.KEEP_BOTH,
        description=(
            "What happens when an instance arrives whose SOP Instance UID is already stored."
            " `keep_both`: the newest becomes the current copy and nothing is deleted."
            " `reject`: the new copy is refused and the sender gets status 0x0111 (Duplicate"
            " SOP Instance). `overwrite`: the new copy replaces the old one, whose file is"
            " deleted after the new one is indexed."
        ),
    )
    retention: RetentionMode = Field(
        RetentionMode.ARCHIVE,
        description=(
            "`archive`: keep every received instance. `relay`: delete an instance (file and"
            " index rows) once every delivery of it is done and `keep_for` has passed since it"
            " arrived, so the gateway's disk holds only what is in transit. An instance with a"
            " pending, retrying or dead-lettered delivery, or whose series or study still waits"
            " for a stable trigger, is kept; an instance no route sent anywhere is deleted"
            " after `keep_for`."
        ),
    )
    keep_for: float = Field(
        86400.0,
        ge=0,
        description=(
            "With `retention: relay`, how long a delivered instance is kept after it arrived"
            " (e.g. `24h`, `30m`, `0` = as soon as it is delivered), so a destination that"
            " lost it can be sent it again."
        ),
    )
    retention_interval: float = Field(
        60.0,
        gt=0,
        description="Seconds between two looks for instances `retention: relay` may delete.",
    )
    recovery_grace: float = Field(
        30.0,
        ge=0,
        description=(
            "PostgreSQL (shared store): seconds after start-up before a node that did not stop"
            " cleanly looks for the files it had moved into the store without committing"
            " their rows (a `kill -9` mid-commit; never acknowledged). Only files older than"
            " its start are considered, and only after this grace, so that another node's"
            " commit in flight is never mistaken for one; each is indexed and routed, or"
            " removed when a byte-identical copy is already indexed (the sender resent it)."
        ),
    )
    min_free_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description=(
            "Free space, in bytes, to keep on the store's file system. Below it new instances"
            " are refused with status 0xA700 (Out of Resources) instead of filling the disk, and"
            " senders may retry later. Write a plain number (1073741824 for 1 GiB); 0 turns the"
            " check off."
        ),
    )

    @field_validator("keep_for", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return _keep_for(value)


class DatabaseConfig(_Model):
    """The index database: which instances are stored where, for queries and routing."""

    url: str = Field(
        "sqlite:///./data/index.db",
        description=(
            "Database URL of the index. The default is an embedded SQLite file"
            " (`sqlite:///PATH`, relative to the working directory), right for one gateway."
            " Several gateway nodes share one PostgreSQL database:"
            " `postgresql://user:password@host/db` (keep the password out of the file with"
            " `DICOMGATE_DATABASE__URL`). The schema is created and migrated at start-up."
        ),
    )

    timeout: float = Field(
        30.0,
        ge=1,
        le=3600,
        description=(
            "PostgreSQL: seconds (1 to 3600) the gateway waits on the database before it"
            " gives up and answers *try later* (C-STORE 0xA700, STOW-RS 503 with"
            " FailureReason 0xA700, QIDO-RS 503, C-FIND 0xA700). It bounds a statement"
            " (cancelled by the server:"
            " a lock held by another session, an overloaded server), a connection whose"
            " packets go unanswered (a network partition: without it each connection hangs"
            " for about 15 minutes), a new connection (at most 10 s), and the wait for a free"
            " pooled connection. Schema migrations at start-up have no limit. A libpq"
            " parameter in the URL (`?connect_timeout=5`) wins. Keep it below your"
            " modalities' DIMSE timeout, so they get a status, not a dropped association."
        ),
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not (value.startswith("sqlite:") or value.startswith("postgresql")):
            raise ValueError("use sqlite:///PATH or postgresql://user@host/db")
        return value


class NodeConfig(_Model):
    """This gateway node, when several nodes share one PostgreSQL database and one store."""

    name: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description=(
            "Name of this node: unique among the nodes sharing a database. It appears in"
            " delivery leases (`leased_by`), in the `dicomgate_build_info` metric and in audit"
            " rows (unless `audit.node_name` is set). With PostgreSQL, this node's spool,"
            " run marker and delivery work files live under `<storage.path>/nodes/<name>/`,"
            " so nodes can share `storage.path`; a second live node with the same name is"
            " refused at start-up. Letters, digits, `.`, `_` and `-`. Absent = the host name."
        ),
    )

    def resolved_name(self) -> str:
        """The configured name, else this host's name (cut to a usable folder name)."""
        if self.name:
            return self.name
        host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")
        return host[:64] or "node"


def _check_ae_patterns(values: list[str]) -> list[str]:
    for value in values:
        if not value or len(value) > 16 or "\\" in value:
            raise ValueError(f"bad AE title pattern {value!r}")
    return values


def _check_listen_host(value: str) -> str:
    """The address a listener binds to: an IP address (``0.0.0.0`` every IPv4 interface,
    ``::`` every IPv6 one) or a host name of this machine; never empty (refused rather than
    read as "every interface")."""
    if not value.strip():
        raise ValueError("empty; give an IP address (0.0.0.0: every interface) or a host name")
    return check_host(value).removeprefix("[").removesuffix("]")


class MoveDestinationConfig(_Model):
    """Where a C-MOVE to one AE title sends its instances."""

    host: str = Field(description="Host name or IP address of the move destination.")
    port: int = Field(ge=1, le=65535, description="DICOM TCP port of the move destination.")
    max_associations: int = Field(
        1,
        ge=1,
        le=16,
        description=(
            "Associations a C-MOVE opens to this destination at once, its sub-operations"
            " split between them in batches of 16. Raise it only for a receiver that serves"
            " several associations in parallel (most PACS; DCMTK `storescp --fork`): a"
            " receiver serving one at a time leaves the second waiting until it times out."
            " A `dimse` destination used as a move destination moves over one."
        ),
    )
    tls: DestinationTls | None = Field(
        None,
        description=(
            "DICOM TLS to this move destination (PS3.15 Annex B), the same options as a"
            " `dimse` destination's `tls`; unset: plain DICOM."
        ),
    )

    _host = field_validator("host")(classmethod(lambda cls, v: check_host(v)))


class DimseAllowConfig(_Model):
    """Which calling AE titles may use each DIMSE service, once their association is open."""

    store: list[str] = Field(
        default_factory=list,
        description=(
            "Calling AE titles that may send instances (C-STORE); empty allows any, as before"
            " this key existed. Same `*` and `?` patterns as `allowed_calling_aets`. Others"
            ' get status 0x0124 "Refused: Not Authorized" and nothing is stored.'
        ),
    )
    find: list[str] = Field(
        default_factory=list,
        description=(
            "Calling AE titles that may query (C-FIND); empty allows any. Others get status"
            ' 0x0124 "Refused: Not Authorized" and no matches.'
        ),
    )
    move: list[str] = Field(
        default_factory=list,
        description=(
            "Calling AE titles that may ask for instances to be sent elsewhere (C-MOVE); empty"
            ' allows any. Others get status 0x0124 "Refused: Not Authorized" and nothing'
            " is sent. A C-MOVE can send data to any configured destination: restrict it when"
            " not every caller should be able to."
        ),
    )
    get: list[str] = Field(
        default_factory=list,
        description=(
            "Calling AE titles that may retrieve instances over their own association"
            ' (C-GET); empty allows any. Others get status 0x0124 "Refused: Not Authorized".'
        ),
    )

    @field_validator("store", "find", "move", "get")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        return _check_ae_patterns(values)


class DimseConfig(_Model):
    """The DICOM network (DIMSE) listener: its name, who may connect, how long we wait."""

    ae_title: str = Field(
        "DICOMGATE",
        description=(
            "Our AE title: the called AE title senders must use (see `check_called_ae`)."
            " 1-16 characters, no backslash; surrounding spaces are dropped."
        ),
    )
    host: str = Field(
        "0.0.0.0",
        description=(
            "Address to listen on for DICOM associations: an IP address or a host name of"
            " this machine; `0.0.0.0` means every IPv4 interface, `::` every IPv6 one,"
            " `127.0.0.1` this machine only."
        ),
    )

    _host = field_validator("host")(classmethod(lambda cls, v: _check_listen_host(v)))
    port: int = Field(
        11112,
        ge=1,
        le=65535,
        description=(
            'TCP port for DICOM associations, 1-65535 (0, "any free port", is refused: senders'
            " need a known port). 104 is the registered DICOM port (needs privileges on most"
            " systems); 11112 is the usual unprivileged one. It must differ from `http.port`"
            " and `dimse.tls.port`."
        ),
    )
    allowed_calling_aets: list[str] = Field(
        default_factory=list,
        description=(
            "Calling AE titles that may open an association; empty allows any. Patterns may"
            ' use `*` (any characters) and `?` (one character), case-sensitive, e.g. `["CT*",'
            ' "MR_?"]`. Any other caller is rejected with A-ASSOCIATE-RJ (permanent,'
            ' service-user, reason 3 "calling AE title not recognized"). A filter against'
            " misconfigured senders, not authentication: AE titles are not secret."
        ),
    )
    allowed_ips: list[str] = Field(
        default_factory=list,
        description=(
            "Addresses or CIDR blocks that may connect to the DICOM listeners (plain and"
            ' TLS), e.g. `["10.1.20.0/24", "192.168.5.17"]`; empty allows any. A connection'
            " from anywhere else is closed at once, before any DICOM is read (on the TLS"
            " port: after the handshake; no A-ASSOCIATE-RJ), and recorded as"
            " `association.rejected` in the audit trail."
        ),
    )
    ae_hosts: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            "Binds calling AE titles to the addresses they call from, because an AE title is"
            " not a credential: `{CT1: [10.1.20.5], PACS: [pacs.example.org, 10.2.0.0/16]}`."
            " A listed AE title is accepted only from an address, CIDR block or host name"
            " (resolved at each association) of its list; from elsewhere it is rejected with"
            ' A-ASSOCIATE-RJ (permanent, service-user, reason 3 "calling AE title not'
            ' recognized"). AE titles not listed are accepted from any allowed address.'
        ),
    )
    check_called_ae: bool = Field(
        True,
        description=(
            "Reject associations whose called AE title is not `ae_title`, with A-ASSOCIATE-RJ"
            ' (permanent, service-user, reason 7 "called AE title not recognized"). Set'
            " `false` to accept any called AE title, e.g. while senders still use the name of"
            " the system this gateway replaces."
        ),
    )
    max_associations: int = Field(
        64,
        ge=1,
        description=(
            "Most associations open at once, from all senders together. One more is rejected"
            ' with A-ASSOCIATE-RJ (transient, service-provider presentation, reason 2 "local'
            ' limit exceeded"); senders normally retry later. Raise it when many modalities'
            " send at the same time."
        ),
    )
    max_associations_per_ae: int = Field(
        16,
        ge=1,
        description=(
            "Most associations open at once from one calling AE title, so one busy sender"
            " cannot take every slot. One more is rejected with A-ASSOCIATE-RJ (transient,"
            ' service-provider presentation, reason 2 "local limit exceeded").'
        ),
    )
    max_pdu_size: int = Field(
        262144,
        ge=0,
        description=(
            "Largest PDU, in bytes, we ask senders to use (maximum length announced in"
            " A-ASSOCIATE-AC, PS3.8 D.1); 0 = unlimited, else at least 4096 (the smallest"
            " DCMTK negotiates; a smaller one cannot carry a useful P-DATA-TF). A sender that"
            " announces a longer P-DATA-TF PDU anyway is aborted with A-ABORT (invalid PDU"
            " parameter value) before its body is read. Rarely needs changing."
        ),
    )
    acse_timeout: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds to wait for association negotiation messages (the A-ASSOCIATE-RQ after a"
            " connection opens, the rest of an A-RELEASE-RQ). On expiry the connection is"
            " aborted with A-ABORT."
        ),
    )
    dimse_timeout: float = Field(
        60.0,
        gt=0,
        description=(
            "Seconds to wait for the next part of a DIMSE message once it has started (e.g."
            " the rest of a C-STORE data set). On expiry the association is aborted with"
            " A-ABORT and the partial instance is discarded. Raise it for very slow links."
        ),
    )
    network_timeout: float = Field(
        120.0,
        gt=0,
        description=(
            "Seconds an association may stay idle between messages (or a sender may leave"
            " our responses unread) before it is aborted with A-ABORT."
        ),
    )
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        description=(
            "On SIGTERM or SIGINT the gateway stops accepting associations and waits up to"
            " this many seconds for open ones to finish, then aborts the rest (A-ABORT)."
            " Instances already acknowledged are safe either way; keep it below your service"
            " manager's stop timeout (e.g. systemd `TimeoutStopSec`, Kubernetes"
            " `terminationGracePeriodSeconds`)."
        ),
    )

    tls: DimseTlsConfig | None = Field(
        None,
        description=(
            "DICOM TLS (PS3.15 Annex B): a TLS listener on its own port, optionally requiring"
            " client certificates. Unset: plain DICOM only."
        ),
    )
    allow: DimseAllowConfig = Field(
        default_factory=DimseAllowConfig,
        description=(
            "Per-service permissions by calling AE title (`store`, `find`, `move`, `get`),"
            " checked for each request on an open association; `allowed_calling_aets` still"
            ' decides who may open one at all. Example: `{store: ["CT*", "MR*"], find:'
            ' ["VIEWER?"], move: ["VIEWER?"], get: []}`.'
        ),
    )
    move_destinations: dict[str, MoveDestinationConfig] = Field(
        default_factory=dict,
        description=(
            "C-MOVE destinations by AE title, e.g. `{WORKSTATION1: {host: 10.0.0.20, port:"
            " 104}}`. Every `destinations` entry of `type: dimse` is a move destination too,"
            " under its `ae_title`. Two move destinations (entries here or `dimse`"
            " destinations) with the same AE title but another host or port are a config"
            " error, since a C-MOVE names only the AE title. A C-MOVE to any"
            ' other AE title gets status 0xA801 "Move Destination unknown".'
        ),
    )
    move_timeout: float = Field(
        60.0,
        gt=0,
        description=(
            "Seconds to wait for a move destination's connection, association answer and"
            " each C-STORE response (C-MOVE sub-operations) and for a C-GET requestor's"
            " C-STORE responses. Sub-operations that time out count as failed."
        ),
    )

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("allowed_calling_aets")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        return _check_ae_patterns(values)

    @field_validator("allowed_ips")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        return parse_networks(values)

    @field_validator("max_pdu_size")
    @classmethod
    def _pdu_size(cls, value: int) -> int:
        # PS3.8 D.1 sets no floor, but a PDU must hold its headers and a useful fragment;
        # DCMTK (ASC_MINIMUMPDUSIZE) negotiates nothing below 4096 bytes.
        if 0 < value < MIN_PDU_SIZE:
            raise ValueError(f"{value}: use 0 (unlimited) or at least {MIN_PDU_SIZE} bytes")
        return value

    @field_validator("ae_hosts")
    @classmethod
    def _ae_hosts(cls, values: dict[str, list[str]]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for title, entries in values.items():
            if not entries:
                raise ValueError(f"{title}: give at least one address, CIDR block or host name")
            for entry in entries:
                if not (_is_network(entry) or HOST_NAME.fullmatch(entry)):
                    raise ValueError(f"{title}: {entry!r} is not an address, CIDR or host name")
            out[_check_ae_title(title)] = entries
        return out

    @field_validator("move_destinations")
    @classmethod
    def _move_titles(
        cls, values: dict[str, MoveDestinationConfig]
    ) -> dict[str, MoveDestinationConfig]:
        return {_check_ae_title(title): where for title, where in values.items()}


class HttpConfig(_Model):
    """The HTTP listener: DICOMweb (`/dicomweb`), FHIR (`/fhir`), the admin API (`/api`) and
    health checks (`/healthz`, `/readyz`). Security: docs/security.md."""

    enabled: bool = Field(
        True,
        description="Run the HTTP listener. Set `false` for a DIMSE-only gateway.",
    )
    host: str = Field(
        "0.0.0.0",
        description=(
            "Address to listen on for HTTP: an IP address or a host name of this machine;"
            " `0.0.0.0` means every IPv4 interface, `::` every IPv6 one, `127.0.0.1` this"
            " machine only."
        ),
    )

    _host = field_validator("host")(classmethod(lambda cls, v: _check_listen_host(v)))
    port: int = Field(
        8080,
        ge=1,
        le=65535,
        description=(
            'TCP port for HTTP (or HTTPS with `tls`), 1-65535 (0, "any free port", is'
            " refused: clients need a known port). It must differ from `dimse.port` and"
            " `dimse.tls.port` when both listeners share an address."
        ),
    )
    tls: HttpTlsConfig | None = Field(
        None,
        description=(
            "HTTPS: `{cert: server.pem, key: server.key}`. Unset: plain HTTP; then keep the"
            " port on a trusted network or behind a TLS-terminating reverse proxy, since API"
            " keys and tokens would cross the network readable."
        ),
    )
    auth: HttpAuthConfig | None = Field(
        None,
        description=(
            "Authentication and permissions (API keys, OAuth2/OIDC tokens). Unset: every"
            " HTTP client may read, store and administer (a warning is logged at start-up)."
        ),
    )
    allowed_ips: list[str] = Field(
        default_factory=list,
        description=(
            "Client addresses allowed to use HTTP at all, as IP addresses or CIDR blocks,"
            ' e.g. `["10.0.0.0/8", "192.168.12.7"]`; empty allows any. Others get 403 on'
            " every path, `/healthz` included (list your load balancer's probes)."
        ),
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description=(
            "Reverse proxies (IP addresses or CIDR blocks) whose `X-Forwarded-For`,"
            " `X-Forwarded-Proto` and `X-Forwarded-Host` headers are believed: requests from"
            " them count as coming from the forwarded client address (for `allowed_ips`, rate"
            " limits, routing on `source_ip` and the log), and the URLs in answers (RetrieveURL,"
            " BulkDataURI, FHIR endpoints) use the forwarded scheme and host. From any other"
            " peer these headers (and `Forwarded`) are removed before the request is served."
            " Empty: the TCP peer is the client."
        ),
    )
    limits: HttpLimitsConfig = Field(
        default_factory=HttpLimitsConfig,
        description="Request size, rate and time limits.",
    )
    cors: HttpCorsConfig | None = Field(
        None,
        description=(
            "Cross-origin requests (CORS) from web pages served elsewhere, such as a web"
            ' viewer: `{allow_origins: ["https://viewer.hospital.org"]}`. Unset: no CORS'
            " headers, so a browser lets only pages of the gateway's own origin (`/ui`) read"
            " its answers. See docs/dicomweb.md, *Web viewers*."
        ),
    )
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        description=(
            "On SIGTERM or SIGINT the HTTP port stops taking connections at once (idle"
            " keep-alive ones are closed) and requests already running get up to this many"
            " seconds to finish, answered as usual. A request still running then is cut:"
            " answered 503 with a JSON error (a download whose answer had begun has its"
            " connection closed). A STOW-RS upload cut while its body arrives keeps nothing;"
            " one cut while its instances are being stored is stored, as when a client goes"
            " away. Runs beside `dimse.shutdown_grace`; keep both below your service"
            " manager's stop timeout (the bundled systemd unit: 60 s)."
        ),
    )
    public_url: str | None = Field(
        None,
        description=(
            "The URL other systems reach this gateway's HTTP port by, e.g."
            " `https://gateway.hospital.org:8443` (behind a reverse proxy or a load"
            " balancer: theirs). Webhook notifications link to WADO-RS under it. Unset:"
            " built from `host` and `port`, with `127.0.0.1` for a wildcard `host` -- only"
            " reachable from this machine, so a gateway with a webhook destination and a"
            " wildcard `host` logs a warning at start-up. Responses to HTTP requests (STOW-RS"
            " and QIDO-RS RetrieveURLs, BulkDataURIs, FHIR endpoints) follow the request's"
            " `Host` header, not this key."
        ),
    )

    @field_validator("allowed_ips", "trusted_proxies")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        return parse_networks(values)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urllib.parse.urlsplit(value.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{value!r}: expected http(s)://host[:port][/path]")
        if parsed.query or parsed.fragment:
            raise ValueError(f"{value!r}: no query or fragment")
        return value.strip().rstrip("/")


class LoggingConfig(_Model):
    """The application log, written to standard error. UIDs appear only as short hashes."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        description=(
            "Least severe messages written. `INFO` suits production (associations, start and"
            " stop, failures); `DEBUG` is verbose, for troubleshooting."
        ),
    )
    format: Literal["text", "json"] = Field(
        "text",
        description=(
            "`text`: one readable line per event. `json`: one JSON object per line, for log"
            " collectors (Loki, Elasticsearch, Splunk)."
        ),
    )


Destination = Annotated[
    DimseDestination | DicomwebDestination | FolderDestination | WebhookDestination,
    Field(discriminator="type"),
]

__all__ = [
    "ENV_PREFIX",
    "DicomwebDestination",
    "DimseDestination",
    "FolderDestination",
    "GatewayConfig",
    "RouteConfig",
    "WebhookDestination",
    "load_config",
    "parse_config",
]


class GatewayConfig(_Model):
    """The whole configuration file."""

    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    node: NodeConfig = NodeConfig()
    dimse: DimseConfig = DimseConfig()
    http: HttpConfig = HttpConfig()
    ingest: IngestConfig = Field(
        default_factory=IngestConfig,
        description=(
            "Folder ingest: DICOM files, media folders with a DICOMDIR and zip files dropped"
            " into a watched folder are stored, indexed and routed like instances received"
            " over DIMSE (routes can match `received_via: folder`), then deleted or moved."
            " Without `watch` there is no folder ingest."
        ),
    )
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig,
        description=(
            "Prometheus metrics at `/metrics`: associations, instances and bytes received,"
            " deliveries, queue depth and oldest job per destination, circuit breakers,"
            " latencies, HTTP requests, free disk. Reference: docs/observability.md."
        ),
    )
    audit: AuditConfig = Field(
        default_factory=AuditConfig,
        description=(
            "The audit trail: who sent, received, queried and moved which studies, kept in the"
            " database (`/api/audit`) and optionally sent to an ATNA audit repository over"
            " syslog. It holds patient identifiers; the application log never does."
        ),
    )
    queue: QueueConfig = Field(
        default_factory=QueueConfig,
        description="The durable delivery queue: leases, polling, retries and dead-letter.",
    )
    query: QueryConfig = Field(
        default_factory=QueryConfig,
        description=(
            "Where queries and retrieves are answered: the local store (default) or an"
            " upstream PACS / DICOMweb service (protocol bridging, per entry point)."
        ),
    )
    destinations: dict[str, Destination] = Field(
        default_factory=dict,
        description=(
            "Where instances can be sent, by a name of your choice (1-64 characters) that"
            " routes refer to. Each"
            " destination has a `type` that selects its other keys. Every instance a route"
            " sends to a destination becomes a durable job, created in the same transaction as"
            " the instance's index row, and is retried until delivered or dead-lettered."
        ),
    )
    routes: list[RouteConfig] = Field(
        default_factory=list,
        description=(
            "Forwarding rules, evaluated in order for every instance received; every matching"
            " route sends to its destinations (`final: true` stops evaluation after a match)."
            " Every mistake (unknown destination or keyword, bad regex or range) is a config"
            " error at start-up naming its key."
        ),
    )

    @field_validator("destinations")
    @classmethod
    def _destination_names(cls, values: dict[str, Destination]) -> dict[str, Destination]:
        for name in values:
            if not name.strip() or len(name) > NAME_MAX:
                # Every delivery job row names its destination (PostgreSQL refused longer).
                raise ValueError(f"{name[:80]!r}: a destination name is 1-{NAME_MAX} characters")
        return values


DESTINATION_TYPES = ("dimse", "dicomweb", "folder", "webhook")


def _error_key(loc: tuple[int | str, ...]) -> tuple[list[int | str], str]:
    parts = [p for p in loc if not str(p).startswith("function-after")]
    if len(parts) > 2 and parts[0] == "destinations" and parts[2] in DESTINATION_TYPES:
        del parts[2]  # pydantic's union-member tag (the destination type)
    key = ""
    for part in parts:  # "routes[0].to", "destinations.pacs.port"
        key += f"[{part}]" if isinstance(part, int) else ("." if key else "") + str(part)
    return parts, key


def _format_error(exc: ValidationError) -> ConfigError:
    errors = exc.errors()
    err = errors[0]
    parts, key = _error_key(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    kinds = ", ".join(DESTINATION_TYPES)
    # A misspelt required key gives two errors side by side: name the other one too.
    siblings = {
        other["type"]: _error_key(other["loc"])[0][-1]
        for other in errors[1:]
        if _error_key(other["loc"])[0][:-1] == parts[:-1]
    }
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        if "missing" in siblings:
            msg += f" (did you mean {siblings['missing']!r}? it is required and missing)"
        elif (close := close_key(GatewayConfig, err["loc"])) is not None:
            msg += f" (did you mean {close!r}?)"
    elif err["type"] == "missing":
        msg = "required key is missing"
        if "extra_forbidden" in siblings:
            msg += f" (is the unknown key {siblings['extra_forbidden']!r} a misspelling of it?)"
    elif err["type"] == "union_tag_not_found":
        key += ".type"
        msg = f"required key is missing (one of {kinds})"
    elif err["type"] == "union_tag_invalid":
        key += ".type"
        tag = (err.get("ctx") or {}).get("tag", "")
        msg = f"unknown destination type {tag!r} (one of {kinds})"
    return ConfigError(key, msg)


def parse_config(
    data: Any, environ: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> GatewayConfig:
    """Validate a parsed YAML document (plus environment overrides) into a config.

    ``base_dir`` (the config file's folder) is where relative paths of pipeline settings
    (e.g. a pseudonym table) start.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", "the config file must be a YAML mapping")
    environ = os.environ if environ is None else environ
    data = apply_env(GatewayConfig, copy.deepcopy(data), environ)
    refuse_booleans(GatewayConfig, data)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise _format_error(exc) from exc
    _check_listener_ports(config)
    _check_move_titles(config)
    _check_folder_loops(config)
    # Compiling the routes checks all of them (destinations, match keys, regexes, ranges,
    # durations); its ConfigError names the key itself, e.g. routes[2].match.Modality.
    Router.compile(config.routes, config.destinations)
    _check_webhook_routes(config)
    _check_query_sources(config)
    build_pipelines(config, StepContext(environ=environ, base_dir=base_dir or Path(".")))
    return config


_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def _check_listener_ports(config: GatewayConfig) -> None:
    """Two listeners of this gateway on one port: the second could never start."""
    listeners = []
    if config.dimse.tls is None or config.dimse.tls.plain:
        listeners.append(("dimse.port", config.dimse.host, config.dimse.port))
    if config.dimse.tls is not None:
        listeners.append(("dimse.tls.port", config.dimse.host, config.dimse.tls.port))
    if config.http.enabled:
        listeners.append(("http.port", config.http.host, config.http.port))
    for i, (key, host, port) in enumerate(listeners):
        for other_key, other_host, other_port in listeners[:i]:
            shared = host == other_host or {host, other_host} & set(_WILDCARD_HOSTS)
            if port == other_port and shared:
                raise ConfigError(key, f"port {port} is also {other_key}; give each its own")


def _check_move_titles(config: GatewayConfig) -> None:
    """A C-MOVE names its destination by AE title only (PS3.4 C.4.2.1.4.1): two move
    destinations with one AE title and different addresses could not be told apart."""
    seen: dict[str, tuple[str, str, int]] = {}  # AE title -> (key, host, port)
    entries = [
        (f"destinations.{name}", dest.ae_title, dest.host, dest.port)
        for name, dest in config.destinations.items()
        if isinstance(dest, DimseDestination)
    ]
    entries += [
        (f"dimse.move_destinations.{title}", title, where.host, where.port)
        for title, where in config.dimse.move_destinations.items()
    ]
    for key, title, host, port in entries:
        first = seen.get(title)
        if first is None:
            seen[title] = (key, host, port)
        elif (first[1].casefold(), first[2]) != (host.casefold(), port):
            field = f"{key}.ae_title" if key.startswith("destinations.") else key
            raise ConfigError(
                field,
                f"{title!r} is also the AE title of {first[0]} (C-MOVE could not tell them"
                " apart); give each its own AE title",
            )


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_folder_loops(config: GatewayConfig) -> None:
    """Folders that would feed on each other: a folder destination inside the watched
    folder (each delivered copy would be ingested again, and deleted) or inside the store,
    a watched folder overlapping the store (refused by ``serve`` too, but only there)."""
    watch = config.ingest.watch
    store = config.storage.path
    for name, dest in config.destinations.items():
        if not isinstance(dest, FolderDestination):
            continue
        if watch is not None and _inside(dest.path, watch):
            raise ConfigError(
                f"destinations.{name}.path",
                f"{str(dest.path)!r} is inside ingest.watch {str(watch)!r}: every delivered"
                " copy would be ingested again",
            )
        if _inside(dest.path, store):
            raise ConfigError(
                f"destinations.{name}.path",
                f"{str(dest.path)!r} is inside storage.path {str(store)!r}: the gateway's own"
                " store must not be written into",
            )
    if watch is not None and (_inside(watch, store) or _inside(store, watch)):
        raise ConfigError(
            "ingest.watch",
            f"{str(watch)!r} overlaps storage.path {str(store)!r}: the store's own files"
            " would be ingested (and deleted)",
        )


def _check_webhook_routes(config: GatewayConfig) -> None:
    """A route with a pipeline sends no webhook: a notification is a WADO-RS URL of the
    gateway's store, which holds the originals only, never the processed copies (a
    de-identified UID would answer 404; the original would hand over what the pipeline
    removed)."""
    for i, route in enumerate(config.routes):
        if not route.pipeline:
            continue
        for name in route.to:
            dest = config.destinations.get(name)
            if dest is not None and dest.type == "webhook":
                raise ConfigError(
                    f"routes[{i}].to",
                    f"destination {name!r} is a webhook, whose notification points at the"
                    " stored original, not at this route's processed copy: send the copies to"
                    " a dimse, dicomweb or folder destination, and notify from a route"
                    " without pipeline",
                )


def _check_query_sources(config: GatewayConfig) -> None:
    """Every ``query`` source is ``local`` or a dimse / dicomweb destination."""
    sources = [("query.dimse.source", config.query.dimse.source)]
    sources += [
        (f"query.ae_titles.{ae}.source", q.source) for ae, q in config.query.ae_titles.items()
    ]
    sources.append(("query.dicomweb.source", config.query.dicomweb.source))
    for key, name in sources:
        if name == "local":
            continue
        dest = config.destinations.get(name)
        if dest is None:
            raise ConfigError(key, f"unknown destination {name!r} (use local or a destination)")
        if dest.type not in ("dimse", "dicomweb"):
            raise ConfigError(key, f"destination {name!r} is a {dest.type}; use dimse or dicomweb")
    if config.query.dicomweb.source != "local" and (
        config.destinations[config.query.dicomweb.source].type == "dicomweb"
    ):
        raise ConfigError(
            "query.dicomweb.source",
            "a DICOMweb upstream for DICOMweb requests is a reverse proxy's job; use a dimse"
            " destination or local",
        )


def build_pipelines(config: GatewayConfig, context: StepContext) -> dict[str, Pipeline]:
    """Each route's processing pipeline, by route name (routes without one are absent);
    raises :class:`ConfigError` naming the bad step setting."""
    return {
        route.name: build(route.pipeline, f"routes[{i}].pipeline", context)
        for i, route in enumerate(config.routes)
        if route.pipeline
    }


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate the YAML config at ``path``; raises :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path} is not UTF-8 text (byte {exc.start})") from exc
    return parse_config(load_yaml(text, path), environ, base_dir=path.parent)
