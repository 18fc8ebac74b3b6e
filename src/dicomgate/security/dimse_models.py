"""Configuration of DICOM TLS (PS3.15 Annex B, BCP 195): the listener and the destinations."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from dicomgate.models import ConfigModel as _Model

_CIPHERS_HELP = (
    "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults); unset: the"
    " BCP 195 recommendation `ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM`."
)


class DimseTlsConfig(_Model):
    """A DICOM TLS listener beside (or instead of) the plain one."""

    port: int = Field(
        2762,
        ge=1,
        le=65535,
        description=(
            'TCP port of the TLS listener, 1-65535 (0, "any free port", is refused: senders'
            " need a known port); 2762 is the registered DICOM TLS port."
        ),
    )
    cert: Path = Field(description="Server certificate (PEM), then intermediate CAs.")
    key: Path = Field(description="Private key (PEM) of the certificate.")
    key_password_env: str | None = Field(
        None, description="Environment variable holding the key's password, if encrypted."
    )
    ca: Path | None = Field(
        None,
        description=(
            "CA bundle (PEM) that client certificates must chain to; needed with"
            " `require_client_cert`."
        ),
    )
    require_client_cert: bool = Field(
        False,
        description=(
            "Mutual TLS: refuse a client without a certificate signed by `ca` (or with an"
            " expired one) during the handshake, before any association."
        ),
    )
    min_version: Literal["1.2", "1.3"] = Field(
        "1.2", description="Lowest TLS version accepted (BCP 195: 1.2 or later)."
    )
    ciphers: str | None = Field(None, description=_CIPHERS_HELP)
    plain: bool = Field(
        True,
        description=(
            "Keep the plain (non-TLS) listener on `dimse.port` as well; `false` serves DICOM"
            " over TLS only."
        ),
    )
    check_interval: float = Field(
        60.0,
        ge=0,
        description=(
            "Seconds between two looks at the certificate and key files: changed files are"
            " loaded for new associations (also on SIGHUP); `0`: only on SIGHUP."
        ),
    )

    @field_validator("min_version", mode="before")
    @classmethod
    def _version(cls, value: object) -> object:
        return f"{value:.1f}" if isinstance(value, float) else value  # YAML reads 1.2 as a number


class DestinationTls(_Model):
    """TLS to a DICOM peer (a `dimse` destination or move destination)."""

    ca: Path | None = Field(
        None,
        description=(
            "CA bundle (PEM) the peer's certificate must chain to; unset: the system CA store."
        ),
    )
    verify: bool = Field(
        True,
        description=("Check the peer's certificate and host name; `false` only for test systems."),
    )
    cert: Path | None = Field(
        None, description="Our client certificate (PEM), for peers that require mutual TLS."
    )
    key: Path | None = Field(None, description="Private key (PEM) of `cert`.")
    server_name: str | None = Field(
        None,
        description="Host name the peer's certificate must name; unset: the `host` setting.",
    )
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="Lowest TLS version used.")
    ciphers: str | None = Field(None, description=_CIPHERS_HELP)
