"""Configuration models of metrics and the audit trail (``metrics:`` and ``audit:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dicomgate.models import ConfigModel as _Model
from dicomgate.routing.models import parse_duration


def _seconds(value: object) -> float:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a number with a unit")
    if value in (0, "0", 0.0):
        return 0.0
    return parse_duration(value)


class MetricsConfig(_Model):
    """Prometheus metrics at `/metrics` on the HTTP port."""

    enabled: bool = Field(
        True,
        description=(
            "Serve Prometheus metrics at `/metrics` (every name starts with `dicomgate_`)."
            " When several gateway processes share one host, set the environment variable"
            " `PROMETHEUS_MULTIPROC_DIR` to an empty folder before start-up so their counters"
            " are added up (see docs/observability.md)."
        ),
    )
    scrape_cache: float = Field(
        2.0,
        ge=0,
        description=(
            "Seconds a scrape reuses the queue depth and disk figures read by the previous"
            " one, so frequent scrapes or several Prometheus servers do not load the database."
        ),
    )
    max_label_values: int = Field(
        200,
        ge=1,
        description=(
            "Most distinct calling AE titles (or destinations, routes) kept as metric labels;"
            " further ones are counted under `other`. Protects Prometheus from a sender that"
            " tries thousands of made-up AE titles."
        ),
    )


class SyslogConfig(_Model):
    """An ATNA audit record repository (IHE ITI-20) reached over syslog."""

    host: str = Field(description="Host name or IP address of the audit record repository.")
    port: int = Field(
        514,
        ge=1,
        le=65535,
        description="Port of the repository: 514 for UDP and TCP, 6514 for TLS (RFC 5425).",
    )
    protocol: Literal["udp", "tcp", "tls"] = Field(
        "udp",
        description=(
            "`udp` (RFC 5426, one message per datagram; messages may be lost), `tcp` (RFC 6587"
            " octet counting) or `tls` (RFC 5425, required by IHE ATNA for production)."
        ),
    )
    ca: str | None = Field(
        None,
        description=(
            "With `tls`: PEM file of the certificate authorities that sign the repository's"
            " certificate; absent = the system's trust store."
        ),
    )
    cert: str | None = Field(
        None, description="With `tls`: PEM certificate of this node, if the repository asks."
    )
    key: str | None = Field(None, description="With `tls`: PEM private key of `cert`.")
    required: bool = Field(
        False,
        description=(
            "`true`: `/readyz` answers 503 while the repository cannot be reached (TCP, TLS),"
            " for sites whose policy is no audit repository, no service. `false`: the"
            " gateway keeps serving (audit rows are still written to the database) and"
            " `/readyz` answers 200 with status `degraded`, naming `syslog`."
        ),
    )
    app_name: str = Field(
        "dicomgate",
        max_length=48,
        description="APP-NAME of the syslog header (RFC 5424 6.2.5).",
    )


class AuditConfig(_Model):
    """The audit trail: who sent, received, queried and moved which data, and when."""

    enabled: bool = Field(
        True,
        description=(
            "Record audit events in the database (shown at `/api/audit`): associations"
            " accepted and rejected, instances received (sender, address, patient, study),"
            " deliveries done, failed and dead-lettered, queries and retrieves, STOW-RS"
            " requests, authentication failures, start-up and configuration. Unlike the"
            " application log, audit rows hold patient identifiers."
        ),
    )
    keep_for: float = Field(
        365 * 86400.0,
        ge=0,
        description=(
            "How long audit rows are kept (e.g. `365d`, `2190d` for six years); older ones are"
            " deleted in batches once an hour. `0` keeps them forever."
        ),
    )
    node_name: str | None = Field(
        None,
        max_length=64,
        description=(
            "Name of this gateway in audit rows and audit messages; absent = the host name."
        ),
    )
    syslog: SyslogConfig | None = Field(
        None,
        description=(
            "Also send each audit event as a DICOM audit message (PS3.15 A.5, RFC 3881 XML) in"
            " an RFC 5424 syslog message to an ATNA audit record repository. Absent = only the"
            " database."
        ),
    )

    @field_validator("keep_for", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return _seconds(value)
