"""DICOMweb destination: a STOW-RS client (PS3.18 10.5) on ``httpx.AsyncClient``.

A batch goes as one ``POST {url}/studies`` with a ``multipart/related;
type="application/dicom"`` body, split so that no request carries more than
``batch_max_instances`` instances or ``batch_max_bytes`` bytes. The body is streamed from
the stored files in chunks (design rule 2) with an exact ``Content-Length``, since some
servers refuse chunked request bodies.

The response (PS3.18 10.5.3, ``application/dicom+json``) is read per instance: the
Referenced SOP Sequence (0008,1199) lists the stored ones, with an optional Warning Reason
(0008,1196); the Failed SOP Sequence (0008,1198) the refused ones with a Failure Reason
(0008,1197). HTTP statuses:

- 200: all stored (an empty or unreadable body too, but not a ``text/html`` page: a proxy's
  or login page, retried); 202: some failed; 409: none stored. Instances named failed are
  retried or dead-lettered by their Failure Reason. Bodies over 16 MiB are not read.
- 400, 409, 413, 415, 422 naming no instance: the batch is split and each instance sent
  alone, so that one bad instance does not take the others down; alone, it is dead-lettered.
- 404 and 405: the URL is wrong (a configuration error): the batch is dead-lettered at once
  and an error is logged naming the URL, so the operator fixes it and re-drives.
- 3xx: redirects are not followed (a streamed body cannot be sent twice, and a credential
  must not follow a redirect to another host): like a wrong URL, with the ``Location`` the
  server named in the log (``http://`` redirected to ``https://`` is the usual cause).
- 401, 403, 408, 425, 429, 5xx, connection errors and timeouts: retried; a 429 or 503 with
  Retry-After holds the destination that long (egress/dispatcher.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from dicomgate.dicomweb.multipart import parse_content_type
from dicomgate.egress.base import (
    Delivery,
    Outcome,
    exception_reason,
    failed_all,
    failure_status_retryable,
    http_transport,
    os_error_reason,
    read_at_most,
    retry_after_seconds,
)
from dicomgate.egress.models import DicomwebDestination, HttpAuth
from dicomgate.store.part10 import relay_header

__all__ = [
    "BearerFileAuth",
    "DicomwebSender",
    "StowResult",
    "first_value",
    "outcomes_from_response",
    "parse_stow_response",
    "split_batch",
]

LOGGER = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
WARNING_REASON = "00081196"
FAILURE_REASON = "00081197"
MAX_ANSWER = 16 << 20  # bytes of a STOW-RS response read (~30 000 instances named)
_ISOLATE_STATUSES = frozenset({400, 409, 413, 415, 422})
_WRONG_URL_STATUSES = frozenset({404, 405})


# --------------------------------------------------------------------------- auth


class BearerFileAuth(httpx.Auth):
    """``Authorization: Bearer`` with a token read from a file, read again when it changes
    (another program refreshes it: e.g. a cloud credential helper)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    def token(self) -> str:
        """The current token; ``OSError`` when the file cannot be read."""
        st = self._path.stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._token = self._path.read_text(encoding="utf-8").strip()
            self._stamp = stamp
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        yield request


def _httpx_auth(auth: HttpAuth | None) -> tuple[httpx.Auth | None, dict[str, str]]:
    """(auth object, extra headers) for an ``auth:`` setting."""
    if auth is None:
        return None, {}
    if auth.bearer is not None:
        return None, {"Authorization": f"Bearer {auth.bearer}"}
    if auth.bearer_file is not None:
        return BearerFileAuth(auth.bearer_file), {}
    assert auth.basic is not None  # DicomwebAuth sets exactly one
    return httpx.BasicAuth(auth.basic.username, auth.basic.password), {}


# --------------------------------------------------------------------------- batches


def split_batch(
    batch: Sequence[Delivery], max_instances: int, max_bytes: int
) -> list[list[Delivery]]:
    """`batch` cut into request-sized pieces, order kept; an instance larger than
    `max_bytes` goes alone."""
    pieces: list[list[Delivery]] = []
    current: list[Delivery] = []
    size = 0
    for delivery in batch:
        if current and (len(current) >= max_instances or size + delivery.size > max_bytes):
            pieces.append(current)
            current, size = [], 0
        current.append(delivery)
        size += delivery.size
    if current:
        pieces.append(current)
    return pieces


@dataclass(frozen=True)
class _Part:
    """One stored file as the body sends it: ``header`` (the file meta without our arrival
    context, :func:`~dicomgate.store.part10.relay_header`), then the file from ``offset``."""

    path: Path
    size: int  # bytes of the file from offset on
    header: bytes = b""
    offset: int = 0


def _parts(paths: list[Path]) -> list[_Part]:
    """Each file's relay header and sizes (blocking: run in a thread)."""
    parts = []
    for path in paths:
        with path.open("rb") as fh:
            header, offset = relay_header(fh)
            size = os.fstat(fh.fileno()).st_size
        parts.append(_Part(path, size - offset, header, offset))
    return parts


@dataclass
class _Body:
    """A multipart/related body streamed from files, with its exact length."""

    parts: list[_Part]
    boundary: str = field(default_factory=lambda: f"dicomgate-{uuid.uuid4().hex}")

    @property
    def part_header(self) -> bytes:
        return f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")

    @property
    def closing(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def length(self) -> int:
        per_part = len(self.part_header) + 2  # header, data, CRLF
        data = sum(len(part.header) + part.size for part in self.parts)
        return data + per_part * len(self.parts) + len(self.closing)

    async def chunks(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield self.part_header + part.header  # one write: the relay header is small
            fp = await asyncio.to_thread(part.path.open, "rb")
            try:
                if part.offset:
                    fp.seek(part.offset)
                left = part.size
                while left > 0:
                    chunk = await asyncio.to_thread(fp.read, min(CHUNK_SIZE, left))
                    if not chunk:
                        raise OSError(f"file shrank while being sent ({left} bytes missing)")
                    left -= len(chunk)
                    yield chunk
            finally:
                await asyncio.to_thread(fp.close)
            yield b"\r\n"
        yield self.closing


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class StowResult:
    """The per-instance content of a STOW-RS response body."""

    stored: dict[str, int | None]  # SOP Instance UID -> Warning Reason (None: no warning)
    failed: dict[str, int | None]  # SOP Instance UID -> Failure Reason (None: not given)
    warning: int | None = None  # a Warning Reason of the whole response

    @property
    def names_instances(self) -> bool:
        return bool(self.stored or self.failed)


def _sequence_items(ds: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = ds.get(tag)
    if not isinstance(element, dict):
        return []
    return [item for item in element.get("Value") or [] if isinstance(item, dict)]


def first_value(ds: dict[str, Any], tag: str) -> Any:
    """The first value of element ``tag`` of a DICOM JSON data set (PS3.18 F.2); None when
    it is missing, empty or malformed (a remote server's answer is never trusted)."""
    element = ds.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    return values[0] if isinstance(values, list) and values else None


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_stow_response(body: bytes) -> StowResult:
    """Read a DICOM JSON (PS3.18 F.2) STOW-RS response; anything unreadable reads as
    naming no instance."""
    empty = StowResult({}, {})
    try:
        doc = json.loads(body) if body.strip() else None
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return empty
    if isinstance(doc, list):  # some servers wrap the response data set in an array
        doc = doc[0] if doc else None
    if not isinstance(doc, dict):
        return empty
    stored: dict[str, int | None] = {}
    failed: dict[str, int | None] = {}
    for item in _sequence_items(doc, REFERENCED_SOP_SEQUENCE):
        uid = first_value(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            stored[uid] = _as_int(first_value(item, WARNING_REASON))
    for item in _sequence_items(doc, FAILED_SOP_SEQUENCE):
        uid = first_value(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            failed[uid] = _as_int(first_value(item, FAILURE_REASON))
    return StowResult(stored, failed, _as_int(first_value(doc, WARNING_REASON)))


def outcomes_from_response(
    batch: Sequence[Delivery], status: int, result: StowResult
) -> list[Outcome]:
    """Per-instance outcomes of a 2xx or 409 response (see the module docstring)."""
    outcomes: list[Outcome] = []
    for d in batch:
        uid = d.sop_instance_uid
        if uid in result.failed:
            reason = result.failed[uid]
            if reason is None:
                outcomes.append(Outcome(d.job_id, False, False, f"HTTP {status}, failed"))
            else:
                outcomes.append(
                    Outcome(
                        d.job_id,
                        False,
                        failure_status_retryable(reason),
                        f"HTTP {status}, FailureReason 0x{reason:04X}",
                    )
                )
        elif (
            uid in result.stored
            or status == 200  # PS3.18 10.5.3.1: 200 means every instance was stored
            or (200 <= status < 300 and status != 202 and not result.names_instances)
        ):
            warning = result.stored.get(uid) or result.warning
            text = f"WarningReason 0x{warning:04X}" if warning is not None else ""
            outcomes.append(Outcome(d.job_id, True, warning=text))
        else:
            outcomes.append(
                Outcome(d.job_id, False, True, f"HTTP {status}, instance not in the response")
            )
    return outcomes


# --------------------------------------------------------------------------- sender


class DicomwebSender:
    """Stores instances with STOW-RS (see the module docstring)."""

    def __init__(
        self,
        name: str,
        model: DicomwebDestination,
        *,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: httpx.MockTransport
        url_setting: str | None = None,  # where the URL comes from, for error messages
    ) -> None:
        self.name = name
        self._url_setting = url_setting or f"destinations.{name}.url"
        self.max_batch = model.batch_max_instances
        self.concurrency = model.concurrency
        self._url = f"{model.url}/studies"
        self._max_instances = model.batch_max_instances
        self._max_bytes = model.batch_max_bytes
        auth, auth_headers = _httpx_auth(model.parsed_auth)
        headers = {
            "Accept": "application/dicom+json",
            "User-Agent": "dicomgate",
            **model.headers,
            **auth_headers,
        }
        self._client = httpx.AsyncClient(
            auth=auth,
            headers=headers,
            timeout=model.timeout,
            transport=transport or http_transport(model.verify, model.concurrency),
        )

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for piece in split_batch(batch, self._max_instances, self._max_bytes):
            outcomes.extend(await self._store(piece))
        return outcomes

    async def _store(self, batch: list[Delivery]) -> list[Outcome]:
        """One STOW-RS request for `batch` (split further when the server names no
        culprit for a refusal)."""
        try:
            parts = await asyncio.to_thread(_parts, [d.path for d in batch])
        except OSError as exc:
            if len(batch) > 1:
                return await self._store_each(batch)
            return self._fail(batch, f"cannot read the stored file: {os_error_reason(exc)}")
        body = _Body(parts)
        try:
            async with self._client.stream(
                "POST",
                self._url,
                content=body.chunks(),
                headers={"Content-Type": body.content_type, "Content-Length": str(body.length())},
            ) as response:
                content = await self._read_answer(response)
        except httpx.HTTPError as exc:
            return self._fail(batch, exception_reason(exc))
        except OSError as exc:  # a file went away mid-request, or the token file
            return self._fail(batch, os_error_reason(exc))
        status = response.status_code
        media_type = parse_content_type(response.headers.get("Content-Type", ""))[0]
        if 200 <= status < 300 and media_type == "text/html":
            # PS3.18 10.5.3: the answer is a DICOM JSON or XML data set. A web page with a
            # 2xx is a proxy's or a login page: counting it as stored would lose the images.
            LOGGER.error(
                "STOW-RS endpoint %s answered HTTP %d with a web page, not a STOW-RS"
                " response: a proxy or login page in front of it? check %s",
                self._url,
                status,
                self._url_setting,
                extra={"event": "egress.dicomweb_not_stow", "destination": self.name},
            )
            return self._fail(batch, f"HTTP {status} with a text/html page, not a STOW-RS answer")
        result = parse_stow_response(content)
        if 200 <= status < 300 or (status == 409 and result.names_instances):
            outcomes = outcomes_from_response(batch, status, result)
            self._log_failures(outcomes, status)
            return outcomes
        if status in _ISOLATE_STATUSES:
            if len(batch) > 1:
                return await self._store_each(batch)
            return self._fail(batch, f"HTTP {status}", retryable=False)
        if 300 <= status < 400:
            location = response.headers.get("Location", "")
            LOGGER.error(
                "STOW-RS endpoint %s answered HTTP %d (redirect to %r, not followed): check %s",
                self._url,
                status,
                location,
                self._url_setting,
                extra={"event": "egress.dicomweb_wrong_url", "destination": self.name},
            )
            return self._fail(
                batch, f"HTTP {status} redirect to {location or '?'}", retryable=False
            )
        if status in _WRONG_URL_STATUSES:
            LOGGER.error(
                "STOW-RS endpoint %s answered HTTP %d: check %s",
                self._url,
                status,
                self._url_setting,
                extra={"event": "egress.dicomweb_wrong_url", "destination": self.name},
            )
            return self._fail(batch, f"HTTP {status} from {self._url}", retryable=False)
        retryable = not (400 <= status < 500) or status in (401, 403, 408, 425, 429)
        wait = retry_after_seconds(response)
        return self._fail(batch, f"HTTP {status}", retryable=retryable, retry_after=wait)

    async def _read_answer(self, response: httpx.Response) -> bytes:
        """The response body, up to :data:`MAX_ANSWER` bytes: a larger one (no STOW-RS
        answer is that large) is not read, and the status alone tells what was stored."""
        content = await read_at_most(response, MAX_ANSWER)
        if content is None:
            LOGGER.warning(
                "STOW-RS answer of more than %d MiB from %s not read",
                MAX_ANSWER >> 20,
                self._url,
                extra={"event": "egress.dicomweb_answer_too_large", "destination": self.name},
            )
            return b""
        return content

    async def _store_each(self, batch: list[Delivery]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for delivery in batch:
            outcomes.extend(await self._store([delivery]))
        return outcomes

    def _fail(
        self,
        batch: list[Delivery],
        error: str,
        *,
        retryable: bool = True,
        retry_after: float = 0.0,
    ) -> list[Outcome]:
        LOGGER.warning(
            "STOW-RS of %d instance(s) failed: %s",
            len(batch),
            error,
            extra={
                "event": "egress.dicomweb_failed",
                "destination": self.name,
                "retryable": retryable,
                **({"retry_after": retry_after} if retry_after else {}),
            },
        )
        return failed_all(batch, error, retryable=retryable, retry_after=retry_after)

    def _log_failures(self, outcomes: list[Outcome], status: int) -> None:
        failed = sum(not o.delivered for o in outcomes)
        if failed:
            LOGGER.warning(
                "STOW-RS answered HTTP %d: %d of %d instance(s) not stored",
                status,
                failed,
                len(outcomes),
                extra={"event": "egress.dicomweb_partial", "destination": self.name},
            )

    async def close(self) -> None:
        await self._client.aclose()
