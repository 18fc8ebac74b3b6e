"""Server TLS contexts (HTTPS and DICOM TLS), reloadable without a restart.

uvicorn takes one :class:`ssl.SSLContext` at start-up and cannot swap it. We own that
context and call ``load_cert_chain`` on it again when the files change or on SIGHUP:
OpenSSL copies the certificate into each connection when it starts, so new connections get
the new certificate and open ones keep theirs. A new pair is first loaded into a scratch
context; if it does not load (a renewal half-written, a key that does not match), the
error is logged and the previous certificate stays in use.

Loading into the same context can only add CAs (OpenSSL has no way to remove one from a
context's trust store), which is harmless for HTTPS (no client certificates) but not for
DICOM TLS. The DICOM listener (:mod:`dicomgate.dimse.tls_listener`) does each handshake
itself with :attr:`ServerTls.context` of the moment, so there the scratch context replaces
the old one (``swap=True``): new associations are checked against the new bundle only (a
CA removed from it is no longer trusted), open ones continue.

DICOM TLS (PS3.15 B.1, BCP 195): TLS 1.2 or later, the BCP 195 cipher suites unless
configured, client certificates checked against ``ca``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from dicomgate.errors import DicomgateError
from dicomgate.security.dimse_models import DestinationTls, DimseTlsConfig
from dicomgate.security.http_models import HttpTlsConfig

if TYPE_CHECKING:
    from dicomgate.config import GatewayConfig

log = logging.getLogger("dicomgate.security")

_EXPIRY_WARNING = datetime.timedelta(days=14)

Signature = tuple[tuple[int, int, int], ...]

# BCP 195 (RFC 9325 4.2): AEAD suites with forward secrecy only.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM"


def _readable(key: str, path: Path) -> None:
    """Raise :class:`DicomgateError` naming ``key`` and ``path`` unless the file can be read
    (OpenSSL's own error names neither: ``cannot read None``)."""
    try:
        with path.open("rb") as file:
            file.read(1)
    except OSError as exc:
        raise DicomgateError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc


def check_tls_files(
    http: HttpTlsConfig | None,
    dimse: DimseTlsConfig | None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Load the HTTPS and DICOM TLS files as ``serve`` would (``dicomgate check-config``);
    raises :class:`DicomgateError` naming the configuration key."""
    if http is not None:
        ServerTls(http, environ, section="http.tls").check()
    if dimse is not None:
        ServerTls(dimse, environ, section="dimse.tls", swap=True).check()


def check_ca_file(key: str, path: Path) -> None:
    """Load a CA bundle as a client context would; raises :class:`DicomgateError` naming
    ``key`` when it cannot be read or holds no PEM certificate."""
    _readable(key, path)
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "reason", None) or str(exc)
        raise DicomgateError(
            f"{key}: cannot load {path}: no PEM CA certificate ({reason})"
        ) from exc


def check_client_pair(section: str, cert: Path, key: Path | None) -> None:
    """Load a client certificate (and its key; None: in the certificate's file) as a
    client context would; raises :class:`DicomgateError` naming ``section.cert`` or
    ``section.key``."""
    _readable(f"{section}.cert", cert)
    if key is not None:
        _readable(f"{section}.key", key)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
            str(cert), str(key) if key is not None else None, password=lambda: b""
        )
    except (OSError, ValueError) as exc:
        try:
            x509.load_pem_x509_certificate(cert.read_bytes())
        except (OSError, ValueError):
            raise DicomgateError(
                f"{section}.cert: cannot load {cert}: not a PEM certificate"
            ) from exc
        where = key if key is not None else cert
        try:
            serialization.load_pem_private_key(where.read_bytes(), None)
        except TypeError:  # encrypted: client keys take no password here
            raise DicomgateError(
                f"{section}.key: {where} is encrypted: client keys must be unencrypted"
            ) from exc
        except (OSError, ValueError, UnsupportedAlgorithm):
            raise DicomgateError(
                f"{section}.key: cannot load {where}: not a PEM private key"
            ) from exc
        reason = getattr(exc, "reason", None) or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            raise DicomgateError(
                f"{section}.key: cannot load {where}: it does not match the certificate {cert}"
            ) from exc
        raise DicomgateError(f"{section}: cannot load {cert}: {reason}") from exc


def _check_destination_tls(section: str, tls: DestinationTls) -> None:
    if tls.ca is not None:
        check_ca_file(f"{section}.ca", Path(tls.ca))
    if tls.cert is not None:
        check_client_pair(section, Path(tls.cert), Path(tls.key) if tls.key else None)
    elif tls.key is not None:
        raise DicomgateError(f"{section}.key: needs {section}.cert")


def check_peer_tls_files(config: GatewayConfig) -> None:
    """Load the TLS files of every peer the gateway connects to, as its client will
    (``check-config``, and :meth:`Gateway.open` before anything is touched): DICOMweb and
    webhook destinations' ``verify:``, DIMSE destinations' and move
    destinations' ``tls`` (also when a bridge source: query sources are destinations),
    ``http.auth.jwt.jwks_verify`` and ``public_keys``, and the ATNA syslog TLS files.
    Raises :class:`DicomgateError` naming the key. The destinations' ``verify:`` CA
    bundles first, loaded by the senders' own :func:`~dicomgate.egress.base.tls_verify`."""
    from dicomgate.egress.base import check_destination_tls

    check_destination_tls(config.destinations)
    for name, dest in config.destinations.items():
        tls = getattr(dest, "tls", None)
        if isinstance(tls, DestinationTls):
            _check_destination_tls(f"destinations.{name}.tls", tls)
    for title, where in config.dimse.move_destinations.items():
        if where.tls is not None:
            _check_destination_tls(f"dimse.move_destinations.{title}.tls", where.tls)
    auth = config.http.auth
    jwt = auth.jwt if auth is not None else None
    if jwt is not None:
        if isinstance(jwt.jwks_verify, Path):
            check_ca_file("http.auth.jwt.jwks_verify", jwt.jwks_verify)
        from dicomgate.security.oidc import load_pem_keys

        for i, path in enumerate(jwt.public_keys):
            try:
                load_pem_keys([path])
            except ValueError as exc:
                raise DicomgateError(f"http.auth.jwt.public_keys[{i}]: {exc}") from exc
    syslog = config.audit.syslog
    if syslog is not None and syslog.protocol == "tls":
        if syslog.ca is not None:
            check_ca_file("audit.syslog.ca", Path(syslog.ca))
        if syslog.cert is not None:
            check_client_pair(
                "audit.syslog", Path(syslog.cert), Path(syslog.key) if syslog.key else None
            )


class ServerTls:
    """The listener's TLS context and the files it comes from.

    ``section`` names the configuration key in error messages (``http.tls``,
    ``dimse.tls``); ``swap``: replace :attr:`context` on reload instead of loading into it.
    """

    def __init__(
        self,
        config: HttpTlsConfig | DimseTlsConfig,
        environ: Mapping[str, str] | None = None,
        *,
        section: str = "http.tls",
        swap: bool = False,
    ) -> None:
        self.config = config
        self.environ = os.environ if environ is None else environ
        self.section = section
        self.swap = swap
        self.label = "HTTPS" if isinstance(config, HttpTlsConfig) else "DICOM TLS"
        self.context = self._new_context()
        self._loaded: Signature | None = None
        self._failed: Signature | None = None

    def _files(self) -> list[Path]:
        files = [Path(self.config.cert), Path(self.config.key)]
        if isinstance(self.config, DimseTlsConfig) and self.config.ca is not None:
            files.append(Path(self.config.ca))
        return files

    def _new_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = (
            ssl.TLSVersion.TLSv1_3 if self.config.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        )
        if isinstance(self.config, HttpTlsConfig):
            context.set_alpn_protocols(["http/1.1"])
        # HTTPS and DICOM TLS alike: BCP 195 (RFC 9325 4.2) / PS3.15 B.9, TLS 1.2 suites with
        # forward secrecy and AEAD only (no CBC, no RSA key exchange) unless ``ciphers`` says.
        try:
            context.set_ciphers(self.config.ciphers or BCP195_CIPHERS)
        except ssl.SSLError as exc:
            raise DicomgateError(
                f"{self.section}.ciphers: no cipher matches {self.config.ciphers!r}"
            ) from exc
        return context

    def _password(self) -> str | None:
        name = self.config.key_password_env
        if name is None:
            return None
        if name not in self.environ:
            raise DicomgateError(
                f"{self.section}.key_password_env: environment variable {name} is unset"
            )
        return self.environ[name]

    def _signature(self) -> Signature | None:
        try:
            stats = [os.stat(path) for path in self._files()]
        except OSError:
            return None
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)

    def _load_into(self, context: ssl.SSLContext) -> None:
        cert, key = Path(self.config.cert), Path(self.config.key)
        _readable(f"{self.section}.cert", cert)
        _readable(f"{self.section}.key", key)
        password = self._password()
        asked: list[bool] = []

        def no_password() -> bytes:
            # Without key_password_env an encrypted key would make OpenSSL prompt on the
            # terminal (a service has none: it would fail, or hang a foreground start).
            asked.append(True)
            return b""

        try:
            context.load_cert_chain(
                str(cert), str(key), password=password if password is not None else no_password
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise DicomgateError(self._load_problem(exc, cert, key, bool(asked))) from exc
        if isinstance(self.config, DimseTlsConfig):
            self._load_clients(context, self.config)

    def _load_problem(self, exc: Exception, cert: Path, key: Path, asked: bool) -> str:
        """Which key of the config is wrong, and why (OpenSSL's error names no file)."""
        section = self.section
        if asked and self.config.key_password_env is None:
            return (
                f"{section}.key: {key} is encrypted: set {section}.key_password_env to the"
                " name of an environment variable holding its password"
            )
        try:
            x509.load_pem_x509_certificate(cert.read_bytes())
        except (OSError, ValueError):
            return f"{section}.cert: cannot load {cert}: not a PEM certificate"
        try:
            password = self._password()
            serialization.load_pem_private_key(
                key.read_bytes(), password.encode() if password is not None else None
            )
        except TypeError:  # encrypted, no password; or a password for a plain key
            pass
        except (OSError, ValueError, UnsupportedAlgorithm):
            if self.config.key_password_env is not None:
                return (
                    f"{section}.key: cannot load {key}: not a PEM private key, or the password"
                    f" in {self.config.key_password_env} does not decrypt it"
                )
            return f"{section}.key: cannot load {key}: not a PEM private key"
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            return f"{section}.key: cannot load {key}: it does not match the certificate {cert}"
        return f"{section}: cannot load {cert} with {key}: {reason or type(exc).__name__}"

    def _load_clients(self, context: ssl.SSLContext, config: DimseTlsConfig) -> None:
        """Which client certificates are checked: against ``ca``, required or not."""
        if config.ca is None:
            if config.require_client_cert:
                raise DicomgateError(f"{self.section}.ca: needed with require_client_cert")
            context.verify_mode = ssl.CERT_NONE
            return
        ca = Path(config.ca)
        _readable(f"{self.section}.ca", ca)
        try:
            context.load_verify_locations(cafile=str(ca))
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            raise DicomgateError(
                f"{self.section}.ca: cannot load {ca}: no PEM CA certificate ({reason})"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED if config.require_client_cert else ssl.CERT_OPTIONAL

    def check(self) -> None:
        """Load the files into a scratch context, as start-up would (``check-config``);
        raises :class:`DicomgateError` naming the key. Logs nothing, changes nothing."""
        self._load_into(self._new_context())

    def load(self) -> None:
        """Load the pair at start-up; raises :class:`DicomgateError` naming the key."""
        signature = self._signature()
        self._load_into(self.context)
        self._loaded = signature
        self._log_loaded("tls.loaded")

    def reload(self, why: str = "sighup") -> bool:
        """Load the pair again for new connections; False (logged) when it does not load."""
        signature = self._signature()
        try:
            scratch = self._new_context()
            self._load_into(scratch)  # check the new pair first
            if self.swap:
                self.context = scratch
            else:
                self._load_into(self.context)
        except DicomgateError as exc:
            if signature != self._failed:  # once per version of the files, not every look
                log.error(
                    "certificate reload failed; the previous certificate stays in use: %s",
                    exc,
                    extra={"event": "tls.reload_failed", "trigger": why, "listener": self.section},
                )
            self._failed = signature
            return False
        self._loaded = signature
        self._failed = None
        self._log_loaded("tls.reloaded", trigger=why)
        return True

    def changed(self) -> bool:
        """Whether the files differ from what was last loaded (or last failed to load)."""
        signature = self._signature()
        return signature is not None and signature not in (self._loaded, self._failed)

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload whenever the files change, every ``check_interval`` seconds, until stop."""
        interval = self.config.check_interval
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if not stop.is_set() and self.changed():
                self.reload("file_changed")

    def _log_loaded(self, event: str, **fields: str) -> None:
        not_after: datetime.datetime | None = None
        subject = ""
        try:
            cert = x509.load_pem_x509_certificate(Path(self.config.cert).read_bytes())
            not_after = cert.not_valid_after_utc
            subject = cert.subject.rfc4514_string()
        except (OSError, ValueError):
            pass
        extra: dict[str, object] = {
            "event": event,
            "listener": self.section,
            "subject": subject,
            **fields,
        }
        if not_after is not None:
            extra["not_after"] = not_after.isoformat()
        log.info("%s certificate loaded", self.label, extra=extra)
        if not_after is not None:
            left = not_after - datetime.datetime.now(datetime.UTC)
            if left < _EXPIRY_WARNING:
                log.warning(
                    "the %s certificate expires in %d days",
                    self.label,
                    max(0, left.days),
                    extra={"event": "tls.expiring", "not_after": not_after.isoformat()},
                )
