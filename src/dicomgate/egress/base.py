"""What the dispatcher hands to a destination, what it gets back, and how senders are built.

A :class:`Sender` delivers :class:`Delivery` batches to one destination and answers one
:class:`Outcome` per delivery. It never raises for a failure of one instance or of the
whole destination: a refused connection or a timeout is an ``Outcome`` with
``retryable=True`` for every delivery of the batch; a failure that would repeat on every
attempt (the peer cannot understand the instance) has ``retryable=False`` so that the job
is dead-lettered at once.
"""

from __future__ import annotations

import email.utils
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx

from dicomgate.errors import DicomgateError, os_error_reason

if TYPE_CHECKING:
    from dicomgate.egress.models import (
        DicomwebDestination,
        DimseDestination,
        FolderDestination,
        WebhookDestination,
    )

__all__ = [
    "CaBundleError",
    "Delivery",
    "Outcome",
    "Sender",
    "build_sender",
    "check_destination_tls",
    "exception_reason",
    "failed_all",
    "failure_status_retryable",
    "http_transport",
    "os_error_reason",
    "read_at_most",
    "tls_verify",
]


@dataclass(frozen=True)
class Delivery:
    """One instance to deliver to one destination (a leased job)."""

    job_id: int
    path: Path  # the stored Part 10 file; read only, never modified
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    size: int  # bytes of the file
    route: str  # name of the route that asked for this delivery


@dataclass(frozen=True)
class Outcome:
    """What became of one delivery."""

    job_id: int
    delivered: bool
    # When not delivered: False means retrying cannot help (dead-letter at once).
    retryable: bool = True
    error: str = ""  # short reason, no PHI: status code, HTTP code, exception class
    warning: str = ""  # delivered, but the peer reported a warning
    # Seconds the peer asked us to wait before the next request (its Retry-After on a 429
    # or 503); 0 when it said nothing.
    retry_after: float = 0.0


class Sender(Protocol):
    """A destination's delivery client (one per destination, long-lived)."""

    name: str
    max_batch: int  # most deliveries one send() call takes
    concurrency: int  # most send() calls that may run at once

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        """Deliver `batch`; one outcome per delivery, in the same order."""
        ...

    async def close(self) -> None:
        """Release connections and threads; the sender is not used afterwards."""
        ...


def failed_all(
    batch: Sequence[Delivery], error: str, *, retryable: bool = True, retry_after: float = 0.0
) -> list[Outcome]:
    """The same failure for every delivery of `batch`."""
    return [Outcome(d.job_id, False, retryable, error, retry_after=retry_after) for d in batch]


def retry_after_seconds(response: httpx.Response) -> float:
    """Seconds a 429 or 503 answer asks the client to wait (RFC 9110 10.2.3: delay-seconds
    or an HTTP-date); 0 for any other status, or no or an unreadable header."""
    if response.status_code not in (429, 503):
        return 0.0
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0.0
    if when.tzinfo is None:  # an HTTP-date is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# PS3.4 B.2.3 (Storage) and GG.4 (STOW-RS FailureReason): failures that repeat on every
# attempt. Out of resources (A7xx), processing failure (0110) and the 02xx "try later"
# class are transient; "cannot understand" (Cxxx), data set / SOP class mismatch (A9xx),
# invalid instance (0117), SOP class not supported (0122), not authorized (0124) and
# duplicate SOP instance (0111) are not.
_PERMANENT_STATUSES = frozenset({0x0111, 0x0117, 0x0122, 0x0124})


def failure_status_retryable(status: int) -> bool:
    """Whether a DIMSE C-STORE failure status (or STOW-RS FailureReason) may succeed later."""
    if status in _PERMANENT_STATUSES:
        return False
    return not ((status & 0xF000) == 0xC000 or (status & 0xFF00) == 0xA900)


def exception_reason(exc: BaseException) -> str:
    """``ClassName: message`` of an exception, for :attr:`Outcome.error`."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class CaBundleError(DicomgateError):
    """A ``verify:`` CA bundle that cannot be read or holds no PEM certificate."""


def tls_verify(setting: bool | Path) -> bool | ssl.SSLContext:
    """httpx's ``verify`` for a ``verify:`` setting.

    ``True`` means the system's CA store (``/etc/ssl/certs``, where a hospital installs its
    own CA), as documented: httpx alone would trust only certifi's bundle. A path is a CA
    bundle (PEM) trusted instead; ``False`` turns verification off.
    """
    if setting is True:
        return ssl.create_default_context()
    if setting is False:
        return False
    try:
        return ssl.create_default_context(cafile=str(setting))
    except ssl.SSLError as exc:  # an OSError too: test it first
        reason = exc.reason.lower().replace("_", " ") if exc.reason else str(exc)
        raise CaBundleError(f"{setting}: not a PEM CA bundle ({reason})") from exc
    except OSError as exc:
        raise CaBundleError(f"cannot read {setting}: {exc.strerror or exc}") from exc


def check_destination_tls(destinations: Mapping[str, object]) -> None:
    """Load each destination's ``verify:`` CA bundle as its sender will (``check-config``
    and the start of ``serve``); raises :class:`DicomgateError` naming the key."""
    for name, model in destinations.items():
        verify = getattr(model, "verify", None)
        if isinstance(verify, Path):
            try:
                tls_verify(verify)
            except CaBundleError as exc:
                raise DicomgateError(f"destinations.{name}.verify: {exc}") from exc


def http_transport(
    verify: bool | Path, max_connections: int | None = None
) -> httpx.AsyncHTTPTransport:
    """The httpx transport of our HTTP clients: TLS per ``verify``, and TCP_NODELAY, so a
    request written in parts (headers, then a streamed body) never waits for a delayed ACK."""
    return httpx.AsyncHTTPTransport(
        verify=tls_verify(verify),
        limits=httpx.Limits(max_connections=max_connections),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


async def read_at_most(response: httpx.Response, limit: int) -> bytes | None:
    """A streamed response's body, or None once it passes ``limit`` bytes (the rest is not
    read: a peer sending without end must not fill memory nor hold a worker for ever)."""
    content = bytearray()
    async for chunk in response.aiter_bytes():
        content += chunk
        if len(content) > limit:
            return None
    return bytes(content)


def build_sender(
    name: str,
    model: DimseDestination | DicomwebDestination | FolderDestination | WebhookDestination,
    *,
    calling_ae: str,
    gateway_base_url: str,
) -> Sender:
    """The sender of destination `name` configured by `model`.

    `calling_ae` is ``dimse.ae_title`` (used unless the destination sets its own);
    `gateway_base_url` (e.g. ``http://gateway:8080``) is where webhook receivers fetch
    instances back with WADO-RS. Nothing connects before the first ``send()``.
    """
    # Imported here: each kind's module imports this one.
    from dicomgate.egress.dicomweb import DicomwebSender
    from dicomgate.egress.dimse import DimseSender
    from dicomgate.egress.folder import FolderSender
    from dicomgate.egress.models import (
        DicomwebDestination,
        DimseDestination,
        FolderDestination,
        WebhookDestination,
    )
    from dicomgate.egress.webhook import WebhookSender

    if isinstance(model, DimseDestination):
        return DimseSender(name, model, calling_ae=model.calling_ae_title or calling_ae)
    if isinstance(model, DicomwebDestination):
        return DicomwebSender(name, model)
    if isinstance(model, FolderDestination):
        return FolderSender(name, model)
    if isinstance(model, WebhookDestination):
        return WebhookSender(name, model, gateway_base_url=gateway_base_url)
    raise TypeError(f"unknown destination model {type(model).__name__}")
