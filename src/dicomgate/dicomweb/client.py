"""Batch upload with STOW-RS (PS3.18 10.5): ``dicomgate send --via dicomweb``.

The files are found and told from non-DICOM files exactly as for a DIMSE send
(:func:`dicomgate.dimse.scu.iter_candidate_files`, :func:`~dicomgate.dimse.scu.scan_file`),
then cut into requests of at most ``batch`` instances / ``batch_bytes`` bytes and posted
``concurrency`` at a time by the gateway's own STOW-RS client
(:class:`dicomgate.egress.dicomweb.DicomwebSender`: multipart body streamed from disk, the
response read per instance, a refused batch without detail split so one bad instance does
not fail the others).

Each instance ends *sent* (Referenced SOP Sequence, or a 200), *failed* for good (a Failure
Reason that repeats, e.g. 0xC000, or an HTTP status that will not change, e.g. 404), or is
retried: connection errors, timeouts, 5xx, 408/429 and the Failure Reasons that may pass
(0xA7xx out of resources, 0x0110 processing failure; any other reason fails at once, whatever
the gateway's own delivery retry policy says) are sent again up to ``retries`` times,
waiting ``retry_wait`` seconds, doubled each time (capped at 30 s, with jitter). A Failure
Reason is printed with its meaning (PS3.4 Annex B.2.3). The result is a
:class:`~dicomgate.dimse.scu.SendSummary`, the same as a DIMSE send prints.

A server that answers before it has read the whole request (a wrong path refused at once)
and closes the connection often makes the kernel drop its answer: the client then sees only
a connection error. :class:`_EarlyAnswerTransport` then asks the same URL again without a
body, and a status that does not depend on the body (404, 405, 3xx, 401, 403...) stands for
the lost answer; otherwise the error says how much of the request was sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicomgate.dimse.scu import (
    ScannedFile,
    SendSummary,
    UnreadableDicom,
    iter_candidate_files,
    scan_file,
    uid_hash,
)
from dicomgate.egress.base import Delivery, Outcome, http_transport
from dicomgate.egress.dicomweb import DicomwebSender, split_batch
from dicomgate.egress.models import DicomwebDestination
from dicomgate.queue.jobs import backoff
from dicomgate.queue.models import RetryPolicy

__all__ = ["StowOptions", "upload_paths"]

LOGGER = logging.getLogger(__name__)

MAX_RETRY_WAIT = 30.0

# The "FailureReason 0xNNNN" of an Outcome's error (egress.dicomweb.outcomes_from_response).
_FAILURE_REASON = re.compile(r"FailureReason 0x([0-9A-Fa-f]{4})")
# Statuses that depend on the request body: a probe without one says nothing about them.
_BODY_STATUSES = frozenset({400, 409, 411, 415, 422})


def send_may_retry(reason: int) -> bool:
    """Whether ``send`` retries an instance refused with STOW-RS Failure Reason `reason`:
    out of resources (0xA7xx) and processing failure (0x0110) may pass later (README)."""
    return (reason & 0xFF00) == 0xA700 or reason == 0x0110


def failure_reason_text(reason: int) -> str:
    """``0xA900 Data Set Does Not Match SOP Class``: the code and its meaning, when known."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(reason, ("", ""))[1]
    return f"0x{reason:04X}" + (f" {meaning}" if meaning else "")


def _for_send(outcome: Outcome) -> Outcome:
    """`outcome` with the send command's retry rule for Failure Reasons, and the reason's
    meaning in its error."""
    match = _FAILURE_REASON.search(outcome.error)
    if outcome.delivered or match is None:
        return outcome
    reason = int(match.group(1), 16)
    error = outcome.error[: match.start()] + "FailureReason " + failure_reason_text(reason)
    error += outcome.error[match.end() :]
    return Outcome(outcome.job_id, False, send_may_retry(reason), error)


class _CountingStream(httpx.AsyncByteStream):
    """A request body that counts the bytes handed to the connection."""

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self.sent += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class _EarlyAnswerTransport(httpx.AsyncBaseTransport):
    """Recovers the status of an answer lost to a connection closed mid-request (see the
    module docstring)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        total = int(request.headers.get("Content-Length", "0") or 0)
        body = _CountingStream(request.stream)  # type: ignore[arg-type]
        request.stream = body
        try:
            return await self._inner.handle_async_request(request)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
            if body.sent >= total:
                raise
            answer = await self._probe(request)
            if answer is not None:
                return answer
            mib = 1 << 20
            raise type(exc)(
                f"the server closed the connection after {body.sent / mib:.1f} of"
                f" {total / mib:.1f} MiB of the request, without an answer"
                f" ({type(exc).__name__}{': ' if str(exc) else ''}{exc})",
                request=request,
            ) from exc

    async def _probe(self, request: httpx.Request) -> httpx.Response | None:
        """The same request without a body: its answer when its status does not depend on
        the body, else None."""
        headers = httpx.Headers(request.headers)
        headers["Content-Length"] = "0"
        probe = httpx.Request(
            request.method,
            request.url,
            headers=headers,
            content=b"",
            extensions=dict(request.extensions),  # the timeouts
        )
        try:
            response = await self._inner.handle_async_request(probe)
            content = await response.aread()
            await response.aclose()
        except httpx.HTTPError:
            return None
        if response.status_code < 300 or response.status_code in _BODY_STATUSES:
            return None
        LOGGER.info(
            "STOW-RS connection closed mid-request; %s answers HTTP %d without a body",
            request.url,
            response.status_code,
            extra={"event": "stow.early_answer"},
        )
        kept = ("content-type", "location", "retry-after")  # content is already decoded
        headers = httpx.Headers({k: v for k, v in response.headers.items() if k in kept})
        return httpx.Response(
            response.status_code, headers=headers, content=content, request=request
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass(frozen=True)
class StowOptions:
    """How to upload (the ``dicomgate send --via dicomweb`` options)."""

    destination: DicomwebDestination  # URL, auth, headers, TLS, timeout, batch limits
    retries: int = 3  # further attempts of a retryable failure
    retry_wait: float = 1.0  # seconds before the first retry, doubled for each next one


def _has_part10_header(path: Path) -> bool:
    with path.open("rb") as fp:
        head = fp.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _part10_copy(found: ScannedFile, folder: Path, n: int) -> Path:
    """A Part 10 copy of a data set stored without preamble and file meta: a STOW-RS part
    is a Part 10 file (PS3.18 8.6.1.1.1). Such files are rare (old archives) and small."""
    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(found.path, force=True)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = found.sop_class_uid
        meta.MediaStorageSOPInstanceUID = found.sop_instance_uid
        meta.TransferSyntaxUID = found.transfer_syntax_uid
        ds.file_meta = meta
        copy = folder / f"{n}.dcm"
        ds.save_as(copy, enforce_file_format=True)
    return copy


def _scan(paths: Sequence[Path], summary: SendSummary) -> list[ScannedFile]:
    scanned: list[ScannedFile] = []
    for path in iter_candidate_files(paths):
        try:
            found = scan_file(path)
        except OSError as exc:
            summary.add_failure(path, f"cannot read: {exc.strerror or exc}")
            continue
        except UnreadableDicom as exc:
            summary.add_failure(path, str(exc))
            continue
        if found is None:
            summary.skipped += 1
        else:
            scanned.append(found)
    return scanned


def _deliveries(
    scanned: list[ScannedFile], summary: SendSummary, spool: Path
) -> tuple[list[Delivery], dict[int, Path]]:
    """One :class:`Delivery` per file (its number as job id) and the file each stands for."""
    deliveries: list[Delivery] = []
    origin: dict[int, Path] = {}
    for n, found in enumerate(scanned):
        try:
            path = found.path if _has_part10_header(found.path) else _part10_copy(found, spool, n)
            size = path.stat().st_size
        except Exception as exc:  # one unreadable file is a failure in the summary, not a crash
            summary.add_failure(found.path, f"cannot read: {type(exc).__name__}: {exc}")
            continue
        deliveries.append(
            Delivery(
                job_id=n,
                path=path,
                sop_class_uid=str(found.sop_class_uid),
                sop_instance_uid=str(found.sop_instance_uid),
                transfer_syntax_uid=str(found.transfer_syntax_uid),
                study_instance_uid="",  # not read by the STOW-RS client
                series_instance_uid="",
                size=size,
                route="send",
            )
        )
        origin[n] = found.path
    return deliveries, origin


class _Uploader:
    def __init__(
        self,
        sender: DicomwebSender,
        options: StowOptions,
        summary: SendSummary,
        origin: dict[int, Path],
        on_done: Callable[[int], None],
        on_retry: Callable[[str], None],
    ) -> None:
        self._sender = sender
        self._options = options
        self._summary = summary
        self._origin = origin
        self._on_done = on_done
        self._on_retry = on_retry
        self._slots = asyncio.Semaphore(options.destination.concurrency)
        self._policy = RetryPolicy(
            initial=options.retry_wait,
            max=max(options.retry_wait, MAX_RETRY_WAIT),
            multiplier=2.0,
            jitter=0.1,
        )

    async def upload(self, deliveries: list[Delivery]) -> None:
        model = self._options.destination
        batches = split_batch(deliveries, model.batch_max_instances, model.batch_max_bytes)
        await asyncio.gather(*(self._upload_batch(batch) for batch in batches))

    async def _upload_batch(self, batch: list[Delivery]) -> None:
        pending = batch
        attempt = 0
        while pending:
            async with self._slots:
                outcomes = await self._sender.send(pending)
            attempt += 1
            by_id: dict[int, Outcome] = {o.job_id: _for_send(o) for o in outcomes}
            again: list[Delivery] = []
            last_error = ""
            for delivery in pending:
                outcome = by_id.get(delivery.job_id) or Outcome(
                    delivery.job_id, False, True, "no answer for this instance"
                )
                if outcome.delivered:
                    self._summary.sent += 1
                    self._summary.warnings += bool(outcome.warning)
                elif outcome.retryable and attempt <= self._options.retries:
                    again.append(delivery)
                    last_error = outcome.error
                    continue
                else:
                    self._fail(delivery, outcome, attempt)
                self._on_done(1)
            if again:
                wait = backoff(attempt, self._policy)
                self._on_retry(
                    f"{len(again)} instance(s) failed ({last_error}); retry {attempt} of "
                    f"{self._options.retries} in {wait:.1f} s"
                )
                await asyncio.sleep(wait)
            pending = again

    def _fail(self, delivery: Delivery, outcome: Outcome, attempts: int) -> None:
        reason = outcome.error
        if outcome.retryable and attempts > 1:
            reason += f" (after {attempts} attempts)"
        self._summary.add_failure(self._origin[delivery.job_id], reason)
        LOGGER.info(
            "STOW-RS of instance %s failed: %s",
            uid_hash(delivery.sop_instance_uid),
            reason,
            extra={"event": "stow.instance_failed"},
        )


def upload_paths(
    paths: Sequence[Path],
    options: StowOptions,
    *,
    progress: bool,
    transport: httpx.AsyncBaseTransport | None = None,  # tests: httpx.MockTransport
) -> SendSummary:
    """STOW-RS every DICOM file under `paths` to ``options.destination.url``; never raises
    for a per-file or per-request problem: each one is a failure in the summary."""
    start = time.monotonic()
    summary = SendSummary()
    scanned = _scan(paths, summary)
    show_bar = progress and sys.stderr.isatty() and bool(scanned)
    with tempfile.TemporaryDirectory(prefix="dicomgate-send-") as spool:
        deliveries, origin = _deliveries(scanned, summary, Path(spool))
        LOGGER.info(
            "sending %d instances to %s",
            len(deliveries),
            options.destination.url,
            extra={"event": "stow.send_start"},
        )

        async def run(on_done: Callable[[int], None], on_retry: Callable[[str], None]) -> None:
            model = options.destination
            sender = DicomwebSender(
                "send",
                model,
                transport=_EarlyAnswerTransport(
                    transport or http_transport(model.verify, model.concurrency)
                ),
                url_setting="the --to URL",
            )
            try:
                await _Uploader(sender, options, summary, origin, on_done, on_retry).upload(
                    deliveries
                )
            finally:
                await sender.close()

        if show_bar:
            from rich.console import Console
            from rich.progress import Progress

            console = Console(stderr=True)
            with Progress(console=console, transient=True) as bar:
                task = bar.add_task("sending", total=len(deliveries))
                asyncio.run(
                    run(
                        lambda n: bar.advance(task, n),
                        lambda text: console.print(text, markup=False, highlight=False),
                    )
                )
        else:
            asyncio.run(run(lambda n: None, lambda text: print(text, file=sys.stderr)))
    summary.elapsed = time.monotonic() - start
    return summary
