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

from cryptography import x509

from dicomgate.errors import DicomgateError
from dicomgate.security.dimse_models import DimseTlsConfig
from dicomgate.security.http_models import HttpTlsConfig

log = logging.getLogger("dicomgate.security")

_EXPIRY_WARNING = datetime.timedelta(days=14)

Signature = tuple[tuple[int, int, int], ...]

# BCP 195 (RFC 9325 4.2): AEAD suites with forward secrecy only.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM"


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
            return context
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
        try:
            context.load_cert_chain(
                str(self.config.cert), str(self.config.key), password=self._password()
            )
        except FileNotFoundError as exc:
            raise DicomgateError(f"{self.section}: cannot read {exc.filename}") from exc
        except OSError as exc:  # ssl.SSLError is an OSError
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            raise DicomgateError(
                f"{self.section}: cannot load {self.config.cert} with {self.config.key}: {reason}"
            ) from exc
        if isinstance(self.config, DimseTlsConfig):
            self._load_clients(context, self.config)

    def _load_clients(self, context: ssl.SSLContext, config: DimseTlsConfig) -> None:
        """Which client certificates are checked: against ``ca``, required or not."""
        if config.ca is None:
            if config.require_client_cert:
                raise DicomgateError(f"{self.section}.ca: needed with require_client_cert")
            context.verify_mode = ssl.CERT_NONE
            return
        try:
            context.load_verify_locations(cafile=str(config.ca))
        except FileNotFoundError as exc:
            raise DicomgateError(f"{self.section}.ca: cannot read {exc.filename}") from exc
        except (OSError, ValueError) as exc:
            raise DicomgateError(f"{self.section}.ca: cannot load {config.ca}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED if config.require_client_cert else ssl.CERT_OPTIONAL

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
