"""Configuration models of HTTP security: ``http.tls``, ``http.auth``, ``http.limits``,
``http.cors``.

They are parts of :class:`dicomgate.config.HttpConfig`; the descriptions are the
configuration reference (``docs/configuration.md``), written for a PACS administrator.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dicomgate.models import ConfigModel as _Model


class Permission(StrEnum):
    """What a credential may do over HTTP (see docs/security.md for the table per path)."""

    READ = "read"  # QIDO-RS, WADO-RS, WADO-URI, FHIR
    WRITE = "write"  # STOW-RS
    ADMIN = "admin"  # /api (queue operations, OpenAPI pages)


# Asymmetric signatures only: ``none`` and the HMAC family (HS256 ...) are never accepted,
# since an HMAC "verified" with a public key lets anyone who knows the key sign tokens.
JWT_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


def parse_networks(values: list[str]) -> list[str]:
    """Validate CIDR blocks (``10.0.0.0/8``, ``192.0.2.7``, ``fd00::/8``); host bits allowed."""
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR block") from None
    return values


class HttpTlsConfig(_Model):
    """HTTPS for the HTTP listener. Without it the listener speaks plain HTTP."""

    cert: Path = Field(
        description=(
            "Server certificate file (PEM): the certificate first, then any intermediate CA"
            " certificates. A relative path is taken from the working directory. Read again on"
            " SIGHUP and when the file changes (see `check_interval`), without a restart."
        ),
    )
    key: Path = Field(
        description=(
            "Private key file (PEM) of the certificate. Keep it readable by the gateway's user"
            " only."
        ),
    )
    key_password_env: str | None = Field(
        None,
        description=(
            "Name of an environment variable holding the password of an encrypted private"
            " key; unset for an unencrypted key."
        ),
    )
    check_interval: float = Field(
        60.0,
        ge=0,
        description=(
            "Seconds between two looks at the certificate and key files; when they changed"
            " (a renewal by certbot or cert-manager), they are loaded for new connections."
            " Open connections keep the certificate they started with. `0`: only on SIGHUP."
            " A pair that does not load (e.g. the certificate written, the key not yet) is"
            " logged and the previous certificate stays in use."
        ),
    )
    min_version: Literal["1.2", "1.3"] = Field(
        "1.2",
        description="Oldest TLS version accepted: `1.2` or `1.3`.",
    )
    ciphers: str | None = Field(
        None,
        description=(
            "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults); unset:"
            " the BCP 195 recommendation `ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM` (forward"
            " secrecy and AEAD only, as `dimse.tls.ciphers`), which refuses CBC suites."
        ),
    )
    hsts_max_age: int = Field(
        0,
        ge=0,
        description=(
            "Seconds of `Strict-Transport-Security` sent with every HTTPS answer; `0` (the"
            " default) sends none. HSTS applies to the whole host name, every port: set it"
            " only when no plain-HTTP service is reached under the gateway's host name."
        ),
    )

    @field_validator("min_version", mode="before")
    @classmethod
    def _version(cls, value: object) -> object:
        return f"{value:.1f}" if isinstance(value, float) else value  # YAML reads 1.2 as a number


class ApiKeyConfig(_Model):
    """One API key, stored as the SHA-256 of the key (the key itself is never in the file)."""

    name: str = Field(
        description=(
            "Who holds the key (`viewer`, `ai-engine`); written in the log and the audit"
            " trail with every request denied or made with it."
        ),
    )
    sha256: str = Field(
        description=(
            "SHA-256 of the key, 64 hexadecimal digits. `dicomgate keys new` prints a new key"
            " and this line; give the key to the client and keep only the hash here."
        ),
    )
    scopes: list[Permission] = Field(
        default_factory=lambda: [Permission.READ],
        description=(
            "What the key may do: `read` (QIDO-RS, WADO-RS, WADO-URI, FHIR), `write`"
            " (STOW-RS), `admin` (`/api`). Each must be given; `admin` does not imply the"
            " others. An empty list allows only `/metrics` when it is protected."
        ),
    )

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256_HEX.match(value):
            raise ValueError("expected 64 hexadecimal digits (dicomgate keys new prints them)")
        return value.lower()


class JwtConfig(_Model):
    """OAuth2 / OpenID Connect access tokens (JWT) issued by an identity provider."""

    issuer: str = Field(
        description=(
            "Expected `iss` claim, exactly as the identity provider writes it, e.g."
            " `https://keycloak.example.org/realms/hospital` or"
            " `https://login.microsoftonline.com/<tenant-id>/v2.0`."
        ),
    )
    audience: str | list[str] = Field(
        description=(
            "Expected `aud` claim: the identifier of this gateway at the identity provider"
            " (Keycloak: the client ID; Azure AD: the Application ID URI or client ID). A list"
            " accepts a token for any of them."
        ),
    )
    jwks_url: str | None = Field(
        None,
        description=(
            "URL of the provider's signing keys (JSON Web Key Set), e.g."
            " `https://idp/realms/hospital/protocol/openid-connect/certs`. Fetched when first"
            " needed, kept `jwks_cache_seconds`, and fetched again at once (at most every"
            " `jwks_min_refresh_seconds`) when a token names a key it does not hold, so key"
            " rotation needs no restart."
        ),
    )
    jwks_verify: bool | Path = Field(
        True,
        description=(
            "TLS verification of `jwks_url`: `true` (system CA store), a CA bundle (PEM) to"
            " trust instead, or `false` (test systems only)."
        ),
    )
    jwks_cache_seconds: float = Field(
        600.0,
        gt=0,
        description="Seconds the fetched key set is used before it is fetched again.",
    )
    jwks_min_refresh_seconds: float = Field(
        10.0,
        ge=0,
        description=(
            "Least seconds between two fetches caused by tokens naming unknown keys, so"
            " forged tokens cannot make the gateway hammer the identity provider."
        ),
    )
    public_keys: list[Path] = Field(
        default_factory=list,
        description=(
            "Static verification keys instead of (or besides) `jwks_url`: PEM files holding a"
            " public key or a certificate (RSA, EC or Ed25519). For providers without a key"
            " set URL, or air-gapped sites."
        ),
    )
    algorithms: list[str] = Field(
        default_factory=lambda: list(JWT_ALGORITHMS),
        description=(
            "Signature algorithms accepted (the token's `alg` header). Only asymmetric ones"
            " are allowed: RS256/384/512, PS256/384/512, ES256/384/512, EdDSA; `none` and"
            " HS256/384/512 are refused. A key whose key set entry names an `alg` accepts"
            " only that one."
        ),
    )
    leeway: float = Field(
        30.0,
        ge=0,
        le=300,
        description=(
            "Seconds of clock difference tolerated when checking `exp` (expiry) and `nbf`"
            " (not before). Tokens without `exp` are refused."
        ),
    )
    scope_claims: list[str] = Field(
        default_factory=lambda: ["scope", "scp", "roles"],
        description=(
            "Claims read for the token's scopes and roles: space-separated strings (`scope`,"
            " `scp`) or lists (`roles`). A dotted name reads a nested claim, e.g."
            " `realm_access.roles` (Keycloak realm roles) or `resource_access.dicomgate.roles`"
            " (Keycloak client roles)."
        ),
    )
    permissions: dict[Permission, list[str]] = Field(
        default_factory=lambda: {p: [p.value] for p in Permission},
        description=(
            "Which scope or role values grant each permission, e.g. `{read: [dicom.read,"
            " Viewer], write: [dicom.write], admin: [Gateway.Admin]}`. Permissions left out"
            " are granted by no token. The default grants `read`, `write` and `admin` for"
            " scope or role values of the same name."
        ),
    )

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("give at least one algorithm")
        for value in values:
            if value not in JWT_ALGORITHMS:
                raise ValueError(
                    f"{value!r} is not accepted; use some of {', '.join(JWT_ALGORITHMS)}"
                )
        return values

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("expected an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _some_keys(self) -> JwtConfig:
        if self.jwks_url is None and not self.public_keys:
            raise ValueError("give jwks_url or public_keys: tokens cannot be verified without")
        return self


class HttpAuthConfig(_Model):
    """Who may use the HTTP interface. When present, every request needs credentials except
    `/healthz`, `/readyz` and (unless `protect_metrics`) `/metrics`."""

    api_keys: list[ApiKeyConfig] = Field(
        default_factory=list,
        description=(
            "API keys, sent as `Authorization: Bearer <key>` or `X-API-Key: <key>`. Example:"
            ' `[{name: viewer, sha256: "<hash>", scopes: [read]}]`; `dicomgate keys new'
            " --name viewer --scopes read` makes one."
        ),
    )
    jwt: JwtConfig | None = Field(
        None,
        description=(
            "OAuth2 / OpenID Connect bearer tokens (JWT) from an identity provider such as"
            " Keycloak or Azure AD, checked against its signing keys, issuer, audience and"
            " validity times; scopes or roles give the permissions."
        ),
    )
    protect_metrics: bool = Field(
        False,
        description=(
            "Require credentials on `/metrics` too (any valid API key or token, whatever its"
            " scopes). Off: Prometheus scrapes without credentials; use `allowed_ips` to"
            " restrict who can."
        ),
    )

    @model_validator(mode="after")
    def _something(self) -> HttpAuthConfig:
        if not self.api_keys and self.jwt is None:
            raise ValueError(
                "give api_keys or jwt (remove http.auth to leave HTTP without authentication)"
            )
        names = [key.name for key in self.api_keys]
        dupes = sorted({name for name in names if names.count(name) > 1})
        if dupes:
            raise ValueError(f"api key name {dupes[0]!r} is used twice")
        hashes = [key.sha256 for key in self.api_keys]
        if len(set(hashes)) != len(hashes):
            raise ValueError("the same api key hash is listed twice")
        return self


_ORIGIN = re.compile(r"^https?://[^/?#\s*]+/?$")


class HttpCorsConfig(_Model):
    """Cross-origin requests from web pages: a viewer (OHIF ...) served from another origin
    than the gateway may call DICOMweb, FHIR and `/api` from the user's browser."""

    allow_origins: list[str] = Field(
        description=(
            "Origins whose pages may call the gateway, exactly as the browser sends them:"
            ' scheme, host and port, e.g. `["https://viewer.hospital.org"]`. `["*"]` allows'
            " every origin; the gateway's own authentication (`http.auth`) still applies to"
            " each request. Other origins get no CORS headers, so their pages cannot read"
            " the answers."
        ),
        min_length=1,
    )
    allow_headers: list[str] = Field(
        default_factory=lambda: ["Authorization", "Accept", "Content-Type", "X-API-Key"],
        description=("Request headers those pages may send (answered to the browser's preflight)."),
    )
    expose_headers: list[str] = Field(
        default_factory=lambda: ["Warning", "Content-Location", "Location", "Retry-After"],
        description=(
            "Answer headers those pages may read beyond the always readable ones (`Warning`"
            " names QIDO-RS query keys that were not used)."
        ),
    )
    max_age: int = Field(
        600,
        ge=0,
        description="Seconds a browser may keep a preflight's answer.",
    )

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        if "*" in values and len(values) > 1:
            raise ValueError('"*" allows every origin: list it alone')
        for value in values:
            if value != "*" and not _ORIGIN.match(value):
                raise ValueError(
                    f"{value!r} is not an origin: expected scheme://host[:port], no path"
                )
        return [value.rstrip("/") for value in values]


class HttpLimitsConfig(_Model):
    """Size, rate and time limits that keep one client from exhausting the gateway."""

    max_body_bytes: int = Field(
        1024 * 1024,
        ge=0,
        description=(
            "Largest request body, in bytes, of every request but STOW-RS (queries and /api"
            " calls need little). A larger one is refused with 413; 0 = no limit."
        ),
    )
    max_stow_bytes: int = Field(
        4 * 1024**3,
        ge=0,
        description=(
            "Largest STOW-RS request body, in bytes (default 4 GiB). Counted as the body"
            " arrives, so chunked uploads are limited too: the upload is cut off with 413 and"
            " nothing from it is stored. 0 = no limit (`storage.min_free_bytes` still"
            " protects the disk)."
        ),
    )
    requests_per_second: float = Field(
        0.0,
        ge=0,
        description=(
            "Requests per second allowed per client IP address, on average; more get 429 with"
            " `Retry-After`. 0 = no rate limit. Viewers fetch many frames at once: allow for"
            " bursts with `request_burst`."
        ),
    )
    request_burst: int = Field(
        100,
        ge=1,
        description=(
            "Requests a client may make at once above `requests_per_second` (the size of its"
            " token bucket)."
        ),
    )
    max_connections_per_client: int = Field(
        100,
        ge=0,
        description=(
            "Open connections allowed per client IP address; more are closed at once. Behind"
            " a reverse proxy every connection comes from the proxy: raise it. 0 = no limit."
        ),
    )
    header_timeout: float = Field(
        15.0,
        gt=0,
        description=(
            "Seconds a client has, from opening a connection (or the end of its previous"
            " request), to send complete request headers; then the connection is closed."
            " Stops slow-loris attacks that hold connections with headers sent a byte at a"
            " time."
        ),
    )
    max_header_bytes: int = Field(
        65536,
        ge=1024,
        description="Largest request head (request line and headers), in bytes; then the"
        " connection is closed.",
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description=(
            "Seconds a request body may stall (no data arriving) before the request is"
            " refused with 408 and the connection closed; a STOW-RS upload cut off this way"
            " stores nothing."
        ),
    )
    keep_alive_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds an idle keep-alive connection stays open between two requests.",
    )
