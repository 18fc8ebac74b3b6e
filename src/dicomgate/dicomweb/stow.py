"""STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]``.

The body is parsed as it arrives (:mod:`dicomgate.dicomweb.multipart`) and every part is
written straight into a spool file behind our own Part 10 header, exactly as a C-STORE is
(DESIGN rule 2: a 2 GB upload never sits in memory). Parts are *staged* until the body is
complete and well formed; only then are they handed to the ingestor together (one group
commit), so a malformed request (bad boundary, truncated body, a part that is not DICOM,
a wrong part type) is refused with 400/415 and stores nothing (rule 6). The response is
sent after every accepted instance is durable and indexed with its route jobs (rule 1).

Statuses: 200 all stored; 202 some stored, some failed; 409 none stored (each failure in
FailedSOPSequence with its FailureReason, the C-STORE status codes of PS3.4 B.2.3); 503
with Retry-After and the same body, none stored and every failure 0xA7xx (out of
resources: the index unreachable, the disk full; PS3.18 10.5.3 "Busy"); 400
malformed body; 406 an Accept we cannot answer (we answer ``application/dicom+json``);
415 a content type other than ``multipart/related; type="application/dicom"``,
``application/dicom`` or ``multipart/related; type="application/dicom+json"`` (metadata
and bulk data, :mod:`dicomgate.dicomweb.stow_json`), or a content coding other than gzip,
deflate or identity (RFC 9110 15.5.16); 413 a body that decodes past
``http.limits.max_stow_bytes``; 507 the store is below ``storage.min_free_bytes``.

A gzip or deflate body (RFC 9110 8.4.1) is decoded as it arrives, at most
:data:`INFLATE_STEP` bytes of output at a time, into the same spool files.

No item carries WarningReason (0008,1196, PS3.18 10.5.3): the gateway never coerces or
discards elements, and a duplicate that ``storage.duplicates`` stores is a success, as the
C-STORE path answers it 0x0000 (docs/dicomweb.md records the decision).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from dicomgate.dicomweb.multipart import (
    MultipartError,
    MultipartParser,
    PartEnd,
    PartStart,
    parse_content_type,
)
from dicomgate.dicomweb.qido import public_base_url
from dicomgate.dicomweb.server import PREFIX, problem, retry_later
from dicomgate.dicomweb.stow_json import JsonStager, MetadataError
from dicomgate.dimse.commands import Status
from dicomgate.dimse.server import status_for
from dicomgate.errors import DicomgateError, InvalidInstance, StoreFullError
from dicomgate.ingest import IngestJob
from dicomgate.ingress.sniff import HEAD_BYTES, NotDicom, Sniffed, sniff
from dicomgate.observability.logging import uid_hash
from dicomgate.store.part10 import arrival_json, encode_file_meta
from dicomgate.store.scan import stored_transfer_syntax

if TYPE_CHECKING:
    from dicomgate.service import Gateway
    from dicomgate.store.filestore import SpoolFile

CLIENT_CLOSED_REQUEST = 499  # no answer reaches the client; the status for metrics (nginx's)

log = logging.getLogger("dicomgate.stow")

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.4 C.4.2.1.4 / PS3.18 FailureReason: a DICOMDIR part
_ANSWERABLE = {DICOM_JSON, "application/json", "application/*", "*/*"}


class _Refused(Exception):
    """The request is refused as a whole: nothing from it is stored."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass
class _Staged:
    """A part fully written to its spool file, waiting for the end of the body."""

    spool: SpoolFile
    data_offset: int
    sniffed: Sniffed
    # The syntax of the stored file's meta when it is not the part's own: a data set in
    # the other VR encoding (store/scan.py stored_transfer_syntax); "" otherwise.
    stored: str = ""

    @property
    def transfer_syntax(self) -> str:
        """The syntax of the stored file's meta."""
        return self.stored or self.sniffed.transfer_syntax

    @property
    def declared_transfer_syntax(self) -> str:
        """The part's own syntax when the stored file says another; "" otherwise."""
        return self.sniffed.transfer_syntax if self.stored else ""


@dataclass
class _Failed:
    sop_class_uid: str
    sop_instance_uid: str
    reason: int


# Staged parts of one request that keep their in-memory copy for the header scan
# (SpoolFile.content, at most MEMORY_COPY_MAX bytes each): 16 MiB at most per request.
COPIES_PER_REQUEST = 256


class _Stager:
    """Turns parser events into staged spool files (one per part)."""

    def __init__(self, gateway: Gateway, source_ip: str) -> None:
        self.store = gateway.store
        self.source_ip = source_ip
        self.private = arrival_json("", "", source_ip, "stow")
        self.staged: list[_Staged] = []
        self.failed: list[_Failed] = []
        self.bytes = 0
        self._head: bytearray | None = None
        self._spool: SpoolFile | None = None
        self._part = 0
        self._skip = False

    def start(self, event: PartStart) -> None:
        self._part += 1
        media, _ = parse_content_type(event.content_type) if event.content_type else (DICOM, {})
        if media != DICOM:
            # PS3.18 10.5.1.2.1: under type="application/dicom" every part is a Part 10
            # file; metadata and bulk data parts go under type="application/dicom+json"
            # (10.5.1.2.2, :mod:`dicomgate.dicomweb.stow_json`).
            raise _Refused(
                415,
                f"part {self._part} is {media or 'untyped'}, but the request is"
                ' multipart/related; type="application/dicom", whose parts must all be'
                " application/dicom (DICOM Part 10 files). To upload metadata with bulk data"
                " (application/octet-stream or compressed frames), send multipart/related;"
                ' type="application/dicom+json" with application/dicom+json metadata parts'
                " and bulk data parts named by Content-Location (PS3.18 10.5.1.2.2)",
            )
        self._head = bytearray()
        self._spool = None
        self._skip = False

    def data(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if self._skip:
            return
        if self._spool is not None:
            self._spool.write(chunk)
            return
        assert self._head is not None
        self._head += chunk
        if len(self._head) >= HEAD_BYTES:
            self._begin(complete=False)

    def end(self) -> None:
        if self._spool is None and not self._skip:
            self._begin(complete=True)
        if self._spool is not None:
            self._spool.park()
            self._spool = None
        self._head = None

    def discard(self) -> None:
        if self._spool is not None:
            self._spool.discard()
            self._spool = None
        for staged in self.staged:
            staged.spool.discard()
        self.staged.clear()

    def _begin(self, complete: bool) -> None:
        assert self._head is not None
        head = bytes(self._head)
        self._head = None
        if not head:
            raise _Refused(400, f"part {self._part} is empty")
        try:
            sniffed = sniff(head, complete)
        except NotDicom as exc:
            raise _Refused(400, f"part {self._part} is not a DICOM instance: {exc}") from None
        except InvalidInstance as exc:
            raise _Refused(400, f"part {self._part} is not a usable DICOM file: {exc}") from None
        if sniffed.is_dicomdir:  # a media index, not an instance: fail this part only
            self.failed.append(
                _Failed(sniffed.sop_class_uid, sniffed.sop_instance_uid, SOP_CLASS_NOT_SUPPORTED)
            )
            self._skip = True
            return
        syntax = stored_transfer_syntax(
            sniffed.transfer_syntax, head[sniffed.data_offset : sniffed.data_offset + 6]
        )
        relabelled = syntax != sniffed.transfer_syntax
        private = self.private
        if relabelled:
            private = arrival_json("", "", self.source_ip, "stow", sniffed.transfer_syntax)
        spool = self.store.new_spool(write_behind=True)
        try:
            header = encode_file_meta(
                sniffed.sop_class_uid,
                sniffed.sop_instance_uid,
                syntax,
                private_information=private,
            )
            spool.write(header)
            spool.write(head[sniffed.data_offset :])
        except DicomgateError:
            spool.discard()
            raise
        self._spool = spool
        self.add(_Staged(spool, len(header), sniffed, syntax if relabelled else ""))

    def add(self, staged: _Staged) -> None:
        """Stage a part; past the first COPIES_PER_REQUEST, its spool file keeps no
        in-memory copy (its header is read back from disk)."""
        self.staged.append(staged)
        if len(self.staged) > COPIES_PER_REQUEST:
            staged.spool.forget()


def _accepts_json(accept: str | None) -> bool:
    if not accept:
        return True
    for item in accept.split(","):
        media, params = parse_content_type(item.strip())
        if media in _ANSWERABLE and not _refused_by_q(params.get("q")):
            return True
    return False


def _refused_by_q(q: str | None) -> bool:
    """``q=0`` (RFC 9110 12.4.2) means "not acceptable"."""
    try:
        return q is not None and float(q) <= 0
    except ValueError:
        return False


def _boundary(request: Request) -> tuple[str | None, str]:
    """(the multipart boundary, the part type); no boundary for a single application/dicom
    body."""
    media, params = parse_content_type(request.headers.get("content-type", ""))
    if media == DICOM:
        return None, DICOM
    if media != "multipart/related":
        raise _Refused(
            415,
            f"Content-Type {media or '(none)'} is not supported; send multipart/related;"
            ' type="application/dicom" or application/dicom',
        )
    part_type = params.get("type", DICOM).lower()
    if part_type not in (DICOM, DICOM_JSON):
        raise _Refused(
            415,
            f"multipart/related type={part_type} is not supported; use"
            ' type="application/dicom" (or "application/dicom+json" with bulk data parts)',
        )
    boundary = params.get("boundary")
    if not boundary:
        raise _Refused(400, "multipart/related without a boundary parameter")
    return boundary, part_type


def _content_coding(request: Request) -> str | None:
    """The content coding to undo (RFC 9110 8.4): None for none or ``identity``; a coding
    we cannot decode, or more than one, is a 415 naming it with ``Accept-Encoding``
    (RFC 9110 15.5.16, 12.5.3)."""
    declared = request.headers.get("content-encoding", "")
    codings = [c.strip().lower() for c in declared.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _WBITS:
        return codings[0]
    raise _Refused(
        415,
        f"Content-Encoding {declared.strip()} is not supported: send the body as it is"
        " (identity) or with one of gzip, deflate",
        {"Accept-Encoding": "gzip, deflate, identity"},
    )


# zlib's wbits per content coding (RFC 9110 8.4.1): gzip (x-gzip is its old name) has
# the RFC 1952 header; deflate is RFC 1950 zlib data, though some clients send raw
# RFC 1951 deflate (told apart by the first two bytes, as browsers do).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Decoded bytes per step: memory stays bounded whatever the compression ratio (a "zip
# bomb" is decoded into the spool file a step at a time, and cut off at the body limit).
INFLATE_STEP = 1 << 20


class _Inflater:
    """Undoes a gzip or deflate content coding chunk by chunk."""

    def __init__(self, coding: str, limit: int) -> None:
        self.coding = coding
        self.limit = limit  # http.limits.max_stow_bytes; 0: no limit
        self.decoded = 0
        self._zlib: zlib._Decompress | None = None  # made once the first 2 bytes are in
        self._head = b""

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes of the next ``data``, in pieces of at most INFLATE_STEP."""
        decoder = self._zlib
        if decoder is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return
            self._head = b""
            decoder = self._zlib = zlib.decompressobj(self._wbits(data))
        try:
            while data:
                out = decoder.decompress(data, INFLATE_STEP)
                data = decoder.unconsumed_tail
                while out:
                    self._count(out)
                    yield out
                    # Output may still be pending with all input consumed: drain it.
                    out = decoder.decompress(b"", INFLATE_STEP) if not data else b""
                if decoder.eof:
                    data = decoder.unused_data + data
                    if data and self.coding == "deflate":
                        raise _Refused(400, "data after the end of the deflate body")
                    if data:  # RFC 1952 2.2: a gzip file is a series of members
                        decoder = self._zlib = zlib.decompressobj(_WBITS["gzip"])
        except zlib.error as exc:
            raise _Refused(400, f"the {self.coding} body cannot be decoded: {exc}") from None

    def close(self) -> None:
        """The body ended: it must have ended with its compressed data."""
        if self._head or (self._zlib is not None and not self._zlib.eof):
            raise _Refused(400, f"the {self.coding} body is truncated")

    def _wbits(self, head: bytes) -> int:
        wbits = _WBITS[self.coding]
        if self.coding == "deflate" and not (
            head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
        ):
            return -zlib.MAX_WBITS  # raw deflate (no RFC 1950 header)
        return wbits

    def _count(self, out: bytes) -> None:
        self.decoded += len(out)
        if self.limit and self.decoded > self.limit:
            raise _Refused(
                413,
                f"the decoded ({self.coding}) request body is larger than"
                f" http.limits.max_stow_bytes ({self.limit} bytes)",
            )


def _body(gateway: Gateway, request: Request) -> AsyncIterator[bytes]:
    """The request body, its content coding undone as it arrives (never held whole). A
    coding we cannot undo is refused (415) here, before a byte is read."""
    coding = _content_coding(request)
    if coding is None:
        return request.stream()
    return _decoded(request, _Inflater(coding, gateway.config.http.limits.max_stow_bytes))


async def _decoded(request: Request, inflater: _Inflater) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        for out in inflater.feed(chunk):
            yield out
    inflater.close()


async def _receive(gateway: Gateway, request: Request, stager: _Stager) -> None:
    boundary, part_type = _boundary(request)
    body = _body(gateway, request)
    if part_type == DICOM_JSON:
        assert boundary is not None
        await _receive_json(gateway, body, stager, boundary)
        return
    if boundary is None:  # one application/dicom body
        stager.start(PartStart({"content-type": DICOM}))
        async for chunk in body:
            if chunk:
                stager.data(chunk)
        stager.end()
        return
    try:
        parser = MultipartParser(boundary)
    except MultipartError as exc:
        raise _Refused(400, str(exc)) from None
    try:
        async for chunk in body:
            for event in parser.feed(chunk):
                if isinstance(event, bytes):
                    stager.data(event)
                elif isinstance(event, PartStart):
                    stager.start(event)
                else:
                    assert isinstance(event, PartEnd)
                    stager.end()
        parser.close()
    except MultipartError as exc:
        raise _Refused(400, f"malformed multipart body: {exc}") from None


async def _receive_json(
    gateway: Gateway, body: AsyncIterator[bytes], stager: _Stager, boundary: str
) -> None:
    """A metadata + bulk data request (:mod:`dicomgate.dicomweb.stow_json`): its
    instances are built into spool files and staged like application/dicom parts."""
    parts = JsonStager(gateway.store, stager.private)
    try:
        try:
            parser = MultipartParser(boundary)
            async for chunk in body:
                for event in parser.feed(chunk):
                    if isinstance(event, bytes):
                        stager.bytes += len(event)
                        parts.data(event)
                    elif isinstance(event, PartStart):
                        parts.start(event)
                    else:
                        parts.end()
            parser.close()
        except MultipartError as exc:
            raise _Refused(400, f"malformed multipart body: {exc}") from None
        except MetadataError as exc:
            raise _Refused(400, str(exc)) from None
        try:
            built, unbuilt = await asyncio.to_thread(parts.build)
        except MetadataError as exc:
            raise _Refused(400, str(exc)) from None
    finally:
        parts.discard()
    for b in built:
        stager.add(_Staged(b.spool, b.sniffed.data_offset, b.sniffed))
    for u in unbuilt:
        log.warning(
            "STOW-RS metadata instance refused: %s",
            u.why,
            extra={"event": "stow.instance_refused", "sop": uid_hash(u.sop_instance_uid)},
        )
        stager.failed.append(_Failed(u.sop_class_uid, u.sop_instance_uid, u.reason))


def _seq_item(sop_class: str, sop_instance: str) -> dict[str, Any]:
    return {
        "00081150": {"vr": "UI", "Value": [sop_class]},
        "00081155": {"vr": "UI", "Value": [sop_instance]},
    }


async def store_instances(
    gateway: Gateway, request: Request, expected_study: str | None
) -> Response:
    """Receive, stage, ingest and answer one STOW-RS request."""
    started = time.monotonic()
    source_ip = request.client.host if request.client else ""
    user = str(getattr(request.state, "principal", "") or "")  # set by http.auth

    def _refused(status: int, why: str, headers: dict[str, str] | None = None) -> Response:
        """A request refused as a whole: one ``stow.refused`` line (counted as
        ``stow_requests_total{result="refused"}``, its duration observed, audited as a
        failed ``stow.request``), then the JSON error."""
        log.warning(
            "STOW-RS request refused: %s",
            why,
            extra={
                "event": "stow.refused",
                "status": status,
                "peer": source_ip,
                "user": user,
                "seconds": round(time.monotonic() - started, 6),
            },
        )
        return problem(status, why, headers)

    if not _accepts_json(request.headers.get("accept")):
        return _refused(406, "the response is application/dicom+json; XML is not supported")
    try:
        gateway.store.check_space()
    except StoreFullError as exc:
        return _refused(507, str(exc))
    stager = _Stager(gateway, source_ip)
    try:
        await _receive(gateway, request, stager)
    except _Refused as exc:
        stager.discard()
        return _refused(exc.status, str(exc), exc.headers)
    except StoreFullError as exc:
        stager.discard()
        return _refused(507, str(exc))
    except DicomgateError as exc:
        stager.discard()
        return _refused(500, f"cannot stage the upload: {exc}")
    except ClientDisconnect:
        # The client went away mid-upload (a viewer closed, a network cut): nothing is
        # kept, and it is the client's doing, not a server error (it was an ASGI
        # traceback and a 500 in dicomgate_http_requests_total, which 5xx alerts watch).
        stager.discard()
        log.warning(
            "STOW-RS upload cut off by the client; nothing of it was kept",
            extra={"event": "stow.client_gone", "peer": source_ip, "user": user},
        )
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except BaseException:  # cancelled: nothing is kept
        stager.discard()
        raise

    loop = asyncio.get_running_loop()
    jobs = [
        IngestJob(
            spool=s.spool,
            data_offset=s.data_offset,
            transfer_syntax=s.transfer_syntax,
            declared_transfer_syntax=s.declared_transfer_syntax,
            sop_class_uid=s.sniffed.sop_class_uid,
            sop_instance_uid=s.sniffed.sop_instance_uid,
            calling_ae="",
            called_ae="",
            source_ip=source_ip,
            user=user,
            received_via="stow",
            loop=loop,
            future=loop.create_future(),
            expected_study_uid=expected_study,
        )
        for s in stager.staged
    ]
    results = await asyncio.gather(*(gateway.ingestor.ingest(job) for job in jobs))

    # As QIDO and FHIR build theirs: the Host header lacks the port for some clients.
    base = public_base_url(request) + PREFIX
    referenced: list[dict[str, Any]] = []
    failed = [
        {**_seq_item(f.sop_class_uid, f.sop_instance_uid), "00081197": _us(f.reason)}
        for f in stager.failed
    ]
    reasons = [f.reason for f in stager.failed]
    studies: set[str] = set()
    for job, error in zip(jobs, results, strict=True):
        if error is None and job.stored is not None:
            rec = job.stored
            studies.add(rec.study_uid)
            url = (
                f"{base}/studies/{rec.study_uid}/series/{rec.series_uid}"
                f"/instances/{rec.sop_instance_uid}"
            )
            referenced.append(
                {
                    **_seq_item(rec.sop_class_uid, rec.sop_instance_uid),
                    "00081190": {"vr": "UR", "Value": [url]},
                }
            )
        else:
            reason = status_for(error) if error is not None else 0x0110
            reasons.append(reason)
            failed.append(
                {**_seq_item(job.sop_class_uid, job.sop_instance_uid), "00081197": _us(reason)}
            )
    # PS3.18 Annex I, Table I.1-1: Retrieve URL (0008,1190) is Type 2, always present and
    # empty when there is no one study to name (instances of several studies, or none
    # stored); Failed SOP Sequence (0008,1198) and Referenced SOP Sequence (0008,1199) are
    # Type 1C, present only when they have items.
    body: dict[str, Any] = {"00081190": {"vr": "UR"}}
    if len(studies) == 1:
        body["00081190"]["Value"] = [f"{base}/studies/{next(iter(studies))}"]
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    status = 200 if not failed else (202 if referenced else 409)
    if status == 409 and all(reason >> 8 == Status.OUT_OF_RESOURCES >> 8 for reason in reasons):
        # PS3.18 10.5.3: "503 Busy", none stored for want of resources (the index is
        # unreachable, the disk filled): a client's retry policy takes a 503, not a 409.
        status = 503
    log.info(
        "STOW-RS: %d stored, %d failed, %d bytes in %.0f ms",
        len(referenced),
        len(failed),
        stager.bytes,
        (time.monotonic() - started) * 1000,
        extra={
            "event": "stow.request",
            "stored": len(referenced),
            "failed": len(failed),
            "bytes": stager.bytes,
            "peer": source_ip,
            "user": user,
            "study": uid_hash(next(iter(studies))) if len(studies) == 1 else "",
            "seconds": round(time.monotonic() - started, 6),
        },
    )
    return JSONResponse(
        body, status_code=status, media_type=DICOM_JSON, headers=retry_later(status)
    )


def _us(value: int) -> dict[str, Any]:
    return {"vr": "US", "Value": [int(value)]}


def router(gateway: Gateway) -> APIRouter:
    r = APIRouter(tags=["STOW-RS"])

    @r.post("/studies")
    async def stow(request: Request) -> Response:
        """Store instances (multipart/related; type="application/dicom")."""
        return await store_instances(gateway, request, None)

    @r.post("/studies/{study}")
    async def stow_study(study: str, request: Request) -> Response:
        """Store instances of one study; an instance of another study fails (0xA900)."""
        return await store_instances(gateway, request, study)

    return r
