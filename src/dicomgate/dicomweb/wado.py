"""WADO-RS (PS3.18 10.4) and WADO-URI (PS3.18 9) over the store and the index.

Resources under ``/dicomweb``:

- ``/studies/{s}``, ``.../series/{r}``, ``.../instances/{i}``: instances as
  ``multipart/related; type="application/dicom"``, streamed from disk (as stored) or
  transcoded (:mod:`.transcode`), per the Accept header (:mod:`.negotiate`);
- ``.../metadata``: ``application/dicom+json`` (:mod:`.dicomjson`);
- ``.../instances/{i}/frames/{list}`` and ``.../bulkdata/{path}``: frames and bulk values
  located without reading the rest of the file (:mod:`.frames`);
- ``.../rendered`` and ``.../thumbnail`` for study, series, instance and frame
  (:mod:`.render`);
- ``/wado?requestType=WADO...``: WADO-URI (:mod:`.wado_uri`).

Errors are JSON bodies (:func:`dicomgate.dicomweb.server.problem`): 400 malformed request,
404 unknown study/series/instance/frame, 406 no acceptable representation, 503 index
unavailable; 502/504 when the instances come from an upstream PACS
(``query.dicomweb.source``, :mod:`dicomgate.bridge.dicomweb_bridge`) that fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from dicomgate.bridge.dicomweb_bridge import bridge_for, wado_error
from dicomgate.bridge.dimse_upstream import UpstreamFailed, UpstreamNotFound
from dicomgate.dicomweb.catalog import StoredRef, find_instances
from dicomgate.dicomweb.dicomjson import MetadataCache, bulk_path, locate_bulk
from dicomgate.dicomweb.frames import (
    FrameError,
    PixelLayout,
    all_fragments,
    decode_frame,
    encapsulated_frames,
    inflated_pixel_data,
    locate_pixel_data,
    native_frame,
    native_frame_chunks,
    read_span_chunks,
)
from dicomgate.dicomweb.negotiate import (
    AcceptError,
    FrameEncoding,
    MediaRange,
    choose_frame_encoding,
    choose_instance_syntax,
    choose_simple,
    default_syntax,
    is_native,
    parse_accept,
)
from dicomgate.dicomweb.render import (
    THUMBNAIL_SIZE,
    RenderError,
    RenderOptions,
    Viewport,
    ascii_integer,
    parse_render_options,
    render_frame,
)
from dicomgate.dicomweb.server import PREFIX, problem
from dicomgate.dicomweb.streaming import Multipart, file_chunks, iterate_in_thread
from dicomgate.dicomweb.transcode import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    MAX_TRANSCODE_BYTES,
    TranscodeError,
    transcode,
)
from dicomgate.errors import INDEX_UNAVAILABLE, IndexUnavailable, error_text, os_error_reason
from dicomgate.observability.logging import uid_hash

if TYPE_CHECKING:
    from dicomgate.service import Gateway

__all__ = ["WadoError", "WadoService", "frame_encoding", "router"]

log = logging.getLogger(__name__)

METADATA_TYPES = ["application/dicom+json", "application/json"]
IMAGE_TYPES = ["image/jpeg", "image/png"]
MAX_FRAMES_IN_LIST = 10000
MAX_FRAME_NUMBER = (1 << 31) - 1  # Number of Frames is an IS: at most 2^31 - 1
# Frames sent decoded are decoded before the status line (a frame that cannot be decoded
# is then a 500 JSON error) until this many bytes are held; the rest of a longer request
# is decoded while it streams, one frame at a time.
PREDECODED_BYTES = 64 << 20


class WadoError(Exception):
    """A request refused with an HTTP status and a message (turned into a JSON body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_frame_list(text: str) -> list[int]:
    """``1,3,5`` -> [1, 3, 5] (1-based, PS3.18 8.3.4.4); ``WadoError`` 400 if malformed.

    Frame numbers are ASCII digits from 1 to 2^31 - 1, each named once: PS3.18 asks for
    "non duplicate frame numbers", and a list naming one frame 10,000 times would make
    one request decode it 10,000 times.
    """
    shown = text if len(text) <= 40 else text[:40] + "..."
    pieces = text.split(",")
    if not text or len(pieces) > MAX_FRAMES_IN_LIST:
        raise WadoError(400, f"bad frame list {shown!r}: 1 to {MAX_FRAMES_IN_LIST} numbers")
    frames: list[int] = []
    seen: set[int] = set()
    for piece in pieces:
        number = ascii_integer(piece)
        if number is None or not 1 <= number <= MAX_FRAME_NUMBER:
            raise WadoError(
                400,
                f"bad frame list {shown!r}: frame numbers are integers from 1 to "
                f"{MAX_FRAME_NUMBER}",
            )
        if number in seen:
            raise WadoError(400, f"bad frame list {shown!r}: names frame {number} more than once")
        seen.add(number)
        frames.append(number)
    return frames


def _accept(request: Request) -> list[MediaRange]:
    """The media ranges asked for: the ``accept`` query parameter (PS3.18 8.3.3.1: an
    origin server shall support it; a link in a page cannot set headers, and OHIF asks
    for thumbnails with it) when present, else the Accept header."""
    try:
        return parse_accept(request.query_params.get("accept") or request.headers.get("accept"))
    except AcceptError as exc:
        raise WadoError(400, str(exc)) from None


def _swap(data: bytes, width: int) -> bytes:
    import numpy as np

    if width < 2 or len(data) % width:
        return data
    return np.frombuffer(data, f">u{width}").astype(f"<u{width}").tobytes()


_SWAP_WIDTH = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def _names_no_representation(entry: MediaRange) -> bool:
    """The media range asks for no media type nor transfer syntax in particular: ``*/*``,
    ``multipart/*`` or ``multipart/related`` without ``type`` (also no Accept at all)."""
    inner = entry.inner_type if entry.media_type == "multipart/related" else "*/*"
    return inner == "*/*" and entry.transfer_syntax is None


def frame_encoding(accept: list[MediaRange], stored: str) -> FrameEncoding | None:
    """How to send frames (or Pixel Data bulk data) stored in ``stored``; ``None``: 406.

    As :func:`~.negotiate.choose_frame_encoding`, except for a request that names no media
    type and no transfer syntax: PS3.18 8.7.3.3 (and the Selected Media Type of 8.7.8) make
    that Explicit VR Little Endian (``application/octet-stream``, decoded) "unless the
    origin server has only access to the pixel data in lossy compressed form", which is
    then sent as stored, as is what pydicom cannot decode (the same rule as whole
    instances, :func:`~.negotiate.default_syntax`). A compressed media type, ``image/*``
    or ``transfer-syntax=*`` still gets the frames as stored.
    """
    for entry in accept:
        encoding = choose_frame_encoding([entry], stored)
        if encoding is None:
            continue
        if (
            not encoding.decode
            and not is_native(stored)
            and _names_no_representation(entry)
            and default_syntax(stored) == EXPLICIT_VR_LITTLE_ENDIAN
        ):
            return FrameEncoding("application/octet-stream", EXPLICIT_VR_LITTLE_ENDIAN, True)
        return encoding
    return None


def _located(head: bytes, location: str) -> bytes:
    """The opening of a part (:meth:`Multipart.part`, headers ending with an empty line)
    with a ``Content-Location`` header: PS3.18 10.4.3.3.5, bulk data in a multipart
    response carry the URI that names them (the ``BulkDataURI`` of the metadata, or the
    frame's URL)."""
    return head[:-2] + b"Content-Location: " + location.encode("latin-1") + b"\r\n\r\n"


@dataclass(frozen=True)
class _FramePlan:
    path: Path
    sop: str  # SOP Instance UID (hashed in log lines)
    layout: PixelLayout
    encoding: FrameEncoding
    spans: list[list[tuple[int, int]]] | None  # encapsulated frames as stored
    inflated: bytes | None = None  # Pixel Data of a deflated data set

    @property
    def decodes(self) -> bool:
        """Frames come from pydicom's decoder (compressed asked as octet-stream, big endian
        8-bit); a deflated data set's are cut from its inflated value instead."""
        return self.encoding.decode or (self.layout.needs_decoder and not self.layout.deflated)


class WadoService:
    """The WADO-RS and WADO-URI handlers of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.metadata_cache = MetadataCache()
        # query.dicomweb.source: a dimse destination -> instances come from that PACS.
        self.bridge = bridge_for(gateway)

    # -- lookups ---------------------------------------------------------------------

    async def instances(
        self, study: str, series: str | None = None, sop: str | None = None
    ) -> list[StoredRef]:
        """The stored instances of a resource; ``WadoError`` 404 when there are none."""
        if self.bridge is not None:
            try:
                if self.bridge.move_to is None:
                    return await asyncio.to_thread(self.bridge.instances, study, series, sop)
                await asyncio.to_thread(self.bridge.move_in, study, series, sop)
            except (UpstreamFailed, UpstreamNotFound) as exc:
                raise wado_error(exc) from None
        try:
            refs = await asyncio.to_thread(
                find_instances, self.gateway.index.engine, study, series, sop
            )
        except IndexUnavailable:
            raise WadoError(503, INDEX_UNAVAILABLE) from None
        if not refs:
            what = "instance" if sop else "series" if series else "study"
            raise WadoError(404, f"unknown {what}")
        return refs

    def path_of(self, ref: StoredRef) -> Path:
        return self.gateway.store.path_of(ref.relpath)

    @staticmethod
    def base_url(request: Request) -> str:
        """The DICOMweb root as the client reached it (for BulkDataURIs).

        From the Host header; a Host without a port on a direct (not proxied) connection to
        a non-default port gets the port it came in on: some clients (dicomweb-client) drop
        the port from Host, and a URI without it would point elsewhere.
        """
        url = request.base_url
        host = request.headers.get("host", "")
        server = request.scope.get("server")
        proxied = any(
            name in request.headers for name in ("forwarded", "x-forwarded-host", "x-forwarded-for")
        )
        if host and ":" not in host.rsplit("]", 1)[-1] and server and not proxied:
            port = int(server[1])
            if port != (443 if url.scheme == "https" else 80):
                url = url.replace(port=port)
        return str(url).rstrip("/") + PREFIX

    def instance_url(self, request: Request, ref: StoredRef) -> str:
        return (
            f"{self.base_url(request)}/studies/{ref.study_uid}/series/{ref.series_uid}"
            f"/instances/{ref.sop_instance_uid}"
        )

    # -- retrieve instances ------------------------------------------------------------

    async def retrieve(self, request: Request, refs: list[StoredRef]) -> Response:
        accept = _accept(request)
        plan: dict[str, str] = {}
        for syntax in {ref.transfer_syntax_uid for ref in refs}:
            target = choose_instance_syntax(accept, syntax)
            if target is None:
                raise WadoError(
                    406,
                    f"cannot send instances stored in {syntax} in any of the accepted "
                    'representations (multipart/related; type="application/dicom" with '
                    "a transfer-syntax the transcoder writes, see docs/dicomweb.md)",
                )
            plan[syntax] = target
        # Every file is there before the answer starts: once its headers are out, a missing
        # file could only cut the connection (a client sees a truncated download).
        missing = await asyncio.to_thread(
            lambda: [ref for ref in refs if not self.path_of(ref).is_file()]
        )
        if missing:
            log.error(
                "%d of %d requested instances are indexed but missing from the store",
                len(missing),
                len(refs),
                extra={
                    "event": "wado.file_missing",
                    "sop": uid_hash(missing[0].sop_instance_uid),
                    "missing": len(missing),
                },
            )
            raise WadoError(
                500,
                f"{len(missing)} of the {len(refs)} instances are indexed but their files are"
                " missing from the store",
            )
        first: bytes | None = None
        if len(refs) == 1 and plan[refs[0].transfer_syntax_uid] != refs[0].transfer_syntax_uid:
            # One instance: transcode before answering, so a failure is a clean 500.
            first = await self.transcode_instance(refs[0], plan[refs[0].transfer_syntax_uid])
        writer = Multipart("application/dicom")
        heads = [
            writer.part(f"application/dicom; transfer-syntax={plan[ref.transfer_syntax_uid]}")
            for ref in refs
        ]
        tail = writer.close()

        async def body() -> AsyncIterator[bytes]:
            for head, ref in zip(heads, refs, strict=True):
                target = plan[ref.transfer_syntax_uid]
                yield head
                if first is not None:
                    yield first
                elif target == ref.transfer_syntax_uid:
                    async for chunk in file_chunks(self.path_of(ref)):
                        yield chunk
                else:
                    yield await self.transcode_instance(ref, target)
            yield tail

        headers = {"Content-Type": writer.content_type}
        if all(plan[ref.transfer_syntax_uid] == ref.transfer_syntax_uid for ref in refs):
            # Sizes are known (stored files never change): a Content-Length spares the
            # chunked encoding, which copies every chunk once more in the server.
            length = sum(map(len, heads)) + sum(ref.size for ref in refs) + len(tail)
            headers["Content-Length"] = str(length)
        return StreamingResponse(body(), headers=headers)

    async def transcode_instance(self, ref: StoredRef, target: str) -> bytes:
        try:
            return await asyncio.to_thread(transcode, self.path_of(ref), target)
        except (TranscodeError, OSError) as exc:
            reason = error_text(exc)
            log.warning(
                "cannot transcode an instance: %s",
                reason,
                extra={"event": "wado.transcode_failed"},
            )
            status = 406 if isinstance(exc, TranscodeError) and exc.unacceptable else 500
            raise WadoError(status, f"cannot send the instance as {target}: {reason}") from None

    # -- metadata ------------------------------------------------------------------------

    async def metadata(self, request: Request, refs: list[StoredRef]) -> Response:
        if choose_simple(_accept(request), METADATA_TYPES) is None:
            raise WadoError(406, "metadata is available as application/dicom+json only")
        urls = [self.instance_url(request, ref) for ref in refs]

        async def encoded(n: int) -> bytes:
            try:
                return await asyncio.to_thread(
                    self.metadata_cache.get, self.path_of(refs[n]), urls[n]
                )
            except Exception as exc:  # unreadable file: a 500 saying why, never a hang
                reason = error_text(exc)
                log.error(
                    "cannot read metadata: %s",
                    reason,
                    extra={
                        "event": "wado.metadata_failed",
                        "sop": uid_hash(refs[n].sop_instance_uid),
                    },
                )
                raise WadoError(500, f"cannot read the stored instance: {reason}") from None

        head = await encoded(0)

        async def body() -> AsyncIterator[bytes]:
            yield b"[" + head
            for n in range(1, len(refs)):
                yield b"," + await encoded(n)
            yield b"]"

        return StreamingResponse(body(), media_type="application/dicom+json")

    # -- frames and bulk data ---------------------------------------------------------------

    async def _frame_plan(
        self, request: Request, ref: StoredRef, frames: list[int] | None
    ) -> tuple[_FramePlan, list[int]]:
        path = self.path_of(ref)
        try:
            layout = await asyncio.to_thread(locate_pixel_data, path)
        except OSError as exc:
            reason = os_error_reason(exc)
            raise WadoError(500, f"cannot read the stored instance: {reason}") from None
        if layout is None:
            raise WadoError(404, "the instance has no pixel data")
        frames = frames or list(range(1, layout.frames + 1))
        beyond = [n for n in frames if n > layout.frames]
        if beyond:
            raise WadoError(404, f"frame {beyond[0]} does not exist ({layout.frames} frame(s))")
        encoding = frame_encoding(_accept(request), layout.transfer_syntax)
        if encoding is None:
            raise WadoError(
                406,
                f"frames stored in {layout.transfer_syntax} cannot be sent in any of the "
                "accepted media types (as stored, or decompressed as application/octet-stream)",
            )
        offsets_apply = not (layout.encapsulated or layout.needs_decoder)
        if offsets_apply and layout.frame_bits % 8 == 0:
            needed = max(frames) * layout.frame_bits // 8
            if layout.value_length < needed:
                raise WadoError(500, "the stored pixel data is shorter than its header says")
        inflated = None
        if layout.deflated and not encoding.decode:
            inflated = await self._inflate(path, ref, layout, max(frames))
        spans = None
        if layout.encapsulated and not encoding.decode:

            def table() -> list[list[tuple[int, int]]]:
                with open(path, "rb") as fh:
                    if encoding.media_type.startswith("video/"):
                        return [all_fragments(fh, layout)] * layout.frames
                    return encapsulated_frames(fh, layout)

            try:
                spans = await asyncio.to_thread(table)
            except (FrameError, OSError) as exc:
                raise WadoError(500, f"cannot locate the frames: {exc}") from None
            if encoding.media_type.startswith("video/"):
                frames = frames[:1]  # a video is sent whole, once
        plan = _FramePlan(path, ref.sop_instance_uid, layout, encoding, spans, inflated)
        return plan, frames

    @staticmethod
    async def _inflate(path: Path, ref: StoredRef, layout: PixelLayout, last: int) -> bytes:
        """The Pixel Data of a deflated data set, inflated in memory before the answer
        starts (at most ``MAX_TRANSCODE_BYTES``, as transcoding), holding frame ``last``."""
        if layout.frame_bits * layout.frames // 8 > MAX_TRANSCODE_BYTES:
            raise WadoError(
                500,
                f"the deflated pixel data is over {MAX_TRANSCODE_BYTES >> 20} MiB inflated: "
                "retrieve the instance instead",
            )
        try:
            value = await asyncio.to_thread(inflated_pixel_data, path)
        except OSError as exc:
            raise WadoError(
                500, f"cannot read the stored instance: {os_error_reason(exc)}"
            ) from None
        except FrameError as exc:
            log.error(
                "cannot inflate a stored instance: %s",
                exc,
                extra={"event": "wado.inflate_failed", "sop": uid_hash(ref.sop_instance_uid)},
            )
            raise WadoError(500, str(exc)) from None
        if len(value) * 8 < last * layout.frame_bits:
            raise WadoError(500, "the stored pixel data is shorter than its header says")
        return value

    def _frame_chunks(self, plan: _FramePlan, index: int) -> AsyncIterator[bytes]:
        """Frame ``index`` (0-based) as stored, or cut from the inflated value (not
        decoded: :meth:`_decode` does that)."""
        layout = plan.layout
        if plan.inflated is not None:
            return _one(native_frame(plan.inflated, layout, index))
        spans = plan.spans

        def chunks() -> Iterator[bytes]:
            with open(plan.path, "rb") as fh:
                if spans is not None:
                    yield from read_span_chunks(fh, spans[index])
                else:
                    yield from native_frame_chunks(fh, layout, index)

        return iterate_in_thread(chunks)

    @staticmethod
    async def _decode(plan: _FramePlan, number: int) -> bytes:
        """Frame ``number`` (1-based) decoded; ``FrameError`` is logged (one line)."""
        try:
            return await asyncio.to_thread(decode_frame, plan.path, number - 1)
        except FrameError as exc:
            log.error(
                "cannot decode a frame: %s",
                exc,
                extra={
                    "event": "wado.frame_decode_failed",
                    "sop": uid_hash(plan.sop),
                    "frame": number,
                },
            )
            raise

    async def frames(self, request: Request, ref: StoredRef, frames: list[int]) -> Response:
        plan, sent = await self._frame_plan(request, ref, frames)
        instance = self.instance_url(request, ref)
        if plan.encoding.media_type.startswith("video/"):  # one part: the frames asked
            asked = f"{instance}/frames/{','.join(map(str, frames))}"
            return await self._frames_response(plan, sent, lambda _: asked)
        return await self._frames_response(plan, sent, lambda n: f"{instance}/frames/{n}")

    async def _frames_response(
        self, plan: _FramePlan, frames: list[int], location: Callable[[int], str]
    ) -> Response:
        """The frames as multipart/related, each part's Content-Location ``location(frame
        number)``. Decoded frames are decoded before the status line while they fit
        ``PREDECODED_BYTES`` (the first one always), so a frame that cannot be decoded is a
        500 JSON error; past that budget they are decoded as they are sent, and one that
        fails then ends the body without its close delimiter (the status is out; the
        client sees a truncated multipart) with one log line."""
        encoding = plan.encoding
        writer = Multipart(encoding.media_type)
        part_type = f"{encoding.media_type}; transfer-syntax={encoding.transfer_syntax}"
        ready: list[bytes] = []
        if plan.decodes:
            held = 0
            for number in frames:
                if held >= PREDECODED_BYTES:
                    break
                try:
                    ready.append(await self._decode(plan, number))
                except FrameError as exc:
                    raise WadoError(500, str(exc)) from None
                held += len(ready[-1])

        async def body() -> AsyncIterator[bytes]:
            for n, number in enumerate(frames):
                if n < len(ready):
                    data, ready[n] = ready[n], b""  # let it go once sent
                    yield _located(writer.part(part_type), location(number))
                    yield data
                elif plan.decodes:
                    try:
                        data = await self._decode(plan, number)
                    except FrameError:
                        return
                    yield _located(writer.part(part_type), location(number))
                    yield data
                else:
                    yield _located(writer.part(part_type), location(number))
                    async for chunk in self._frame_chunks(plan, number - 1):
                        yield chunk
            yield writer.close()

        return StreamingResponse(body(), headers={"Content-Type": writer.content_type})

    async def bulkdata(self, request: Request, ref: StoredRef, tag_path: str) -> Response:
        path = self.path_of(ref)
        try:
            value = await asyncio.to_thread(locate_bulk, path, tag_path)
        except ValueError as exc:
            raise WadoError(400, f"bad bulk data path: {exc}") from None
        except OSError as exc:
            reason = os_error_reason(exc)
            raise WadoError(500, f"cannot read the stored instance: {reason}") from None
        if value is None:
            raise WadoError(404, f"no bulk data at {tag_path}")
        # PS3.18 10.4.3.3.5: the part names itself by the BulkDataURI of the metadata.
        instance = self.instance_url(request, ref)
        uri = f"{instance}/bulkdata/{bulk_path(tag_path)}"
        if value.pixel_data:
            plan, frames = await self._frame_plan(request, ref, None)
            if plan.layout.encapsulated or plan.decodes:
                if len(frames) == 1:  # one frame (or a video stream): the value itself
                    return await self._frames_response(plan, frames, lambda _: uri)
                return await self._frames_response(plan, frames, lambda n: f"{instance}/frames/{n}")
            # Native pixel data: the whole value as one part.
            if plan.inflated is not None:
                return self._bulk_response(uri, [], plan.inflated, 0)
            layout = plan.layout
            value_span = (layout.value_offset, layout.value_length)
            swap = 0 if layout.little_endian else layout.bits_allocated // 8
            return self._bulk_response(uri, [value_span], None, swap, plan.path)
        if choose_frame_encoding(_accept(request), EXPLICIT_VR_LITTLE_ENDIAN) is None:
            raise WadoError(406, "bulk data is available as application/octet-stream only")
        swap = _SWAP_WIDTH.get(value.vr, 0) if value.big_endian else 0
        if value.data is not None:
            return self._bulk_response(uri, [], _swap(value.data, swap), 0, path)
        return self._bulk_response(uri, [(value.offset, value.length)], None, swap, path)

    def _bulk_response(
        self,
        location: str,
        spans: list[tuple[int, int]],
        data: bytes | None,
        swap: int,
        path: Path | None = None,
    ) -> Response:
        writer = Multipart("application/octet-stream")
        part_type = f"application/octet-stream; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
        source = path

        async def body() -> AsyncIterator[bytes]:
            yield _located(writer.part(part_type), location)
            if data is not None:
                yield data
            elif source is not None:

                def chunks() -> Iterator[bytes]:
                    with open(source, "rb") as fh:
                        step = (1 << 20) - (1 << 20) % 8
                        for chunk in read_span_chunks(fh, spans, step):
                            yield _swap(chunk, swap) if swap > 1 else chunk

                async for chunk in iterate_in_thread(chunks):
                    yield chunk
            yield writer.close()

        return StreamingResponse(body(), headers={"Content-Type": writer.content_type})

    # -- rendered ------------------------------------------------------------------------

    async def rendered(
        self,
        request: Request,
        refs: list[StoredRef],
        frame: int,
        thumbnail: bool,
        params: dict[str, str] | None = None,
    ) -> Response:
        media_type = choose_simple(_accept(request), IMAGE_TYPES)
        if media_type is None:
            raise WadoError(406, "rendered images are available as image/jpeg or image/png")
        images = [ref for ref in refs if ref.rows]
        if not images:
            raise WadoError(406, "nothing to render: no image in the requested resource")
        default = Viewport(THUMBNAIL_SIZE, THUMBNAIL_SIZE) if thumbnail else None
        try:
            options = parse_render_options(
                params if params is not None else dict(request.query_params), media_type, default
            )
        except ValueError as exc:
            raise WadoError(400, str(exc)) from None
        return await self.render(images[0], frame, options)

    async def render(self, ref: StoredRef, frame: int, options: RenderOptions) -> Response:
        frames = ref.number_of_frames or 1
        if frame > frames:
            raise WadoError(404, f"frame {frame} does not exist ({frames} frame(s))")
        try:
            image = await asyncio.to_thread(render_frame, self.path_of(ref), frame - 1, options)
        except ValueError as exc:
            raise WadoError(400, str(exc)) from None
        except (RenderError, OSError) as exc:
            raise WadoError(500, f"cannot render the instance: {exc}") from None
        return Response(image, media_type=options.media_type)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def router(gateway: Gateway) -> APIRouter:
    """The WADO-RS and WADO-URI routes (mounted under ``/dicomweb``)."""
    from dicomgate.dicomweb.wado_uri import install_wado_uri

    service = WadoService(gateway)
    # The tag is how observability/http.py recognises a retrieval (audit row, wado queries).
    api = APIRouter(tags=["WADO-RS"])
    instance_path = "/studies/{study}/series/{series}/instances/{sop}"

    async def run(work: Callable[[], Awaitable[Response]]) -> Response:
        try:
            return await work()
        except WadoError as exc:
            return problem(exc.status, exc.message)

    async def retrieve(
        request: Request, study: str, series: str | None = None, sop: str | None = None
    ) -> Response:
        if service.bridge is not None:  # streamed as the instances arrive from the PACS
            if service.bridge.move_to is None:  # C-GET into the retrieve cache
                return await service.bridge.retrieve(service, request, study, series, sop)
            return await service.bridge.retrieve_moved(service, request, study, series, sop)
        return await service.retrieve(request, await service.instances(study, series, sop))

    @api.get("/studies/{study}")
    async def retrieve_study(request: Request, study: str) -> Response:
        """Retrieve a study (multipart/related; type="application/dicom")."""
        return await run(lambda: retrieve(request, study))

    @api.get("/studies/{study}/series/{series}")
    async def retrieve_series(request: Request, study: str, series: str) -> Response:
        """Retrieve a series."""
        return await run(lambda: retrieve(request, study, series))

    @api.get(instance_path)
    async def retrieve_instance(request: Request, study: str, series: str, sop: str) -> Response:
        """Retrieve an instance."""
        return await run(lambda: retrieve(request, study, series, sop))

    @api.get("/studies/{study}/metadata")
    async def study_metadata(request: Request, study: str) -> Response:
        """Metadata of a study (application/dicom+json)."""
        return await run(lambda: _chain(service.instances(study), service.metadata, request))

    @api.get("/studies/{study}/series/{series}/metadata")
    async def series_metadata(request: Request, study: str, series: str) -> Response:
        """Metadata of a series."""
        return await run(
            lambda: _chain(service.instances(study, series), service.metadata, request)
        )

    @api.get(instance_path + "/metadata")
    async def instance_metadata(request: Request, study: str, series: str, sop: str) -> Response:
        """Metadata of an instance."""
        return await run(
            lambda: _chain(service.instances(study, series, sop), service.metadata, request)
        )

    @api.get(instance_path + "/frames/{frame_list}")
    async def frames(
        request: Request, study: str, series: str, sop: str, frame_list: str
    ) -> Response:
        """Frames of an instance (multipart/related; octet-stream or the frame's media type)."""

        async def work() -> Response:
            numbers = parse_frame_list(frame_list)
            refs = await service.instances(study, series, sop)
            return await service.frames(request, refs[0], numbers)

        return await run(work)

    @api.get(instance_path + "/bulkdata/{tag_path:path}")
    async def bulkdata(
        request: Request, study: str, series: str, sop: str, tag_path: str
    ) -> Response:
        """A bulk data value named by a BulkDataURI of the metadata."""

        async def work() -> Response:
            refs = await service.instances(study, series, sop)
            return await service.bulkdata(request, refs[0], tag_path)

        return await run(work)

    def add_rendered(path: str, level: str, thumbnail: bool) -> None:
        async def endpoint(
            request: Request,
            study: str,
            series: str | None = None,
            sop: str | None = None,
            frame_list: str | None = None,
        ) -> Response:
            async def work() -> Response:
                frame = 1
                if frame_list is not None:
                    numbers = parse_frame_list(frame_list)
                    if len(numbers) != 1:
                        raise WadoError(400, "render one frame at a time")
                    frame = numbers[0]
                refs = await service.instances(study, series, sop)
                return await service.rendered(request, refs, frame, thumbnail)

            return await run(work)

        kind = "thumbnail" if thumbnail else "rendered"
        endpoint.__name__ = f"{level}_{kind}"
        endpoint.__doc__ = f"{kind.capitalize()} {level} as image/jpeg or image/png" + (
            " (the first image of the resource)" if level in ("study", "series") else ""
        )
        api.add_api_route(path, endpoint, methods=["GET"])

    for thumbnail in (False, True):
        suffix = "/thumbnail" if thumbnail else "/rendered"
        add_rendered("/studies/{study}" + suffix, "study", thumbnail)
        add_rendered("/studies/{study}/series/{series}" + suffix, "series", thumbnail)
        add_rendered(instance_path + suffix, "instance", thumbnail)
        add_rendered(instance_path + "/frames/{frame_list}" + suffix, "frames", thumbnail)

    install_wado_uri(api, service)
    return api


async def _chain(
    refs: Awaitable[list[StoredRef]],
    handler: Callable[[Request, list[StoredRef]], Awaitable[Response]],
    request: Request,
) -> Response:
    return await handler(request, await refs)
