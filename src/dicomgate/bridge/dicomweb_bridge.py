"""DICOMweb requests answered by a DIMSE upstream (``query.dicomweb.source: <dimse dest>``).

The QIDO-RS and WADO-RS modules only dispatch here when :func:`bridge_for` returns a
bridge; everything about the upstream (C-FIND, C-GET, the retrieve cache, failure
statuses) lives in :mod:`dicomgate.bridge`. WADO-RS is then served by the usual WADO code
from the cached files (:class:`dicomgate.dicomweb.catalog.StoredRef` with a ``relpath``
under ``<storage.path>/cache/``); a retrieve streams each instance as it arrives. With
``retrieve: move`` the instances arrive through the normal ingest path, and a retrieve
streams each one as soon as it is indexed, while the C-MOVE still runs.

Failures: 502 (PACS down, association refused or aborted, failure status), 504 (no answer
within ``query.dicomweb.timeout``), 404 (the PACS has no such study/series/instance), each
logged as ``bridge.upstream_failed`` with the cause (UIDs hashed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from dicomgate.bridge.cache import CacheEntry, Lease, RetrieveCache
from dicomgate.bridge.dimse_upstream import (
    DimseUpstream,
    UpstreamFailed,
    UpstreamNotFound,
    cfind_json,
    find_identifier,
    write_instance,
)
from dicomgate.dicomweb.catalog import StoredRef, find_instances
from dicomgate.dimse.scu import uid_hash
from dicomgate.index.query import Level, QueryOptions

if TYPE_CHECKING:
    from dicomgate.dicomweb.wado import WadoService
    from dicomgate.service import Gateway

__all__ = ["DicomwebBridge", "bridge_for"]

log = logging.getLogger(__name__)

_NO_MORE = object()
_ARRIVAL_POLL = 0.1  # s; how often a streamed ``retrieve: move`` looks for new instances


def bridge_for(gateway: Gateway) -> DicomwebBridge | None:
    """The bridge of ``gateway`` when ``query.dicomweb.source`` is a dimse destination."""
    cached = getattr(gateway, "_dicomweb_bridge", None)
    if isinstance(cached, DicomwebBridge):
        return cached
    config = gateway.config
    source = config.query.dicomweb
    if source.source == "local":
        return None
    dest: Any = config.destinations[source.source]
    if dest.type != "dimse":
        return None
    upstream = DimseUpstream(
        name=source.source,
        host=dest.host,
        port=dest.port,
        called_ae=dest.ae_title,
        calling_ae=dest.calling_ae_title or config.dimse.ae_title,
        timeout=source.timeout,
    )
    node = config.node.resolved_name()
    bridge = DicomwebBridge(
        upstream,
        Path(config.storage.path),
        f"cache/{node}",
        cache_seconds=source.cache_seconds,
        cache_bytes=source.cache_bytes,
        move_to=config.dimse.ae_title if source.retrieve == "move" else None,
        local_instances=lambda study, series, sop: find_instances(
            gateway.index.engine, study, series, sop
        ),
    )
    gateway._dicomweb_bridge = bridge  # type: ignore[attr-defined]  # one per gateway
    return bridge


class DicomwebBridge:
    """QIDO-RS and WADO-RS of one gateway, answered by a DIMSE upstream."""

    def __init__(
        self,
        upstream: DimseUpstream,
        store_root: Path,
        cache_rel: str,
        *,
        cache_seconds: float,
        cache_bytes: int,
        move_to: str | None = None,
        local_instances: Callable[[str, str | None, str | None], list[StoredRef]] | None = None,
    ) -> None:
        self.upstream = upstream
        self.move_to = move_to  # retrieve: move -> our own AE title (instances are ingested)
        self._local_instances = local_instances
        self.store_root = store_root
        self.cache_rel = cache_rel
        self.cache_seconds = cache_seconds
        self.cache_bytes = cache_bytes
        self._cache: RetrieveCache | None = None

    @property
    def cache(self) -> RetrieveCache:
        if self._cache is None:  # created on first use: emptying the folder is start-up work
            self._cache = RetrieveCache(
                self.store_root / self.cache_rel,
                self.cache_rel,
                self.cache_seconds,
                self.cache_bytes,
                wait_seconds=self.upstream.timeout * 2 + 5,
            )
        return self._cache

    def _failed(self, what: str, exc: UpstreamFailed, uid: str | None = None) -> None:
        log.warning(
            "%s via %s failed: %s",
            what,
            self.upstream.name,
            exc,
            extra={
                "event": "bridge.upstream_failed",
                "destination": self.upstream.name,
                "status": exc.status,
                "cause": str(exc),
                **({"study": uid_hash(uid)} if uid else {}),
            },
        )

    # -- QIDO-RS -----------------------------------------------------------------------

    def search(
        self, level: Level, keys: Mapping[str, str], options: QueryOptions
    ) -> tuple[list[dict[str, Any]], bool]:
        """The matches of one page (dicom+json, without RetrieveURL) and whether more exist.

        Blocking (run it on a worker thread); :class:`UpstreamFailed` on failure.
        """
        identifier = find_identifier(level, keys, options)
        start = options.offset
        stop = None if options.limit is None else start + options.limit
        try:
            # One match past the page tells whether more exist; the PACS is then cancelled.
            matches = self.upstream.find(identifier, None if stop is None else stop + 1)
        except UpstreamFailed as exc:
            self._failed("C-FIND", exc)
            raise
        page = matches[start:stop]
        more = stop is not None and len(matches) > stop
        return [cfind_json(m) for m in page], more

    # -- WADO-RS -----------------------------------------------------------------------

    def _fetch(self, entry: CacheEntry, add: Callable[[StoredRef], None]) -> None:
        study, series, sop = entry.key
        try:
            found = self.upstream.instances_of(study, series, sop)
            count = self.upstream.get(
                study,
                series,
                sop,
                {sop_class for _, _, sop_class in found},
                lambda meta, data: add(write_instance(entry.folder, entry.relfolder, meta, data)),
            )
        except UpstreamFailed as exc:
            self._failed("C-GET", exc, study)
            raise
        log.info(
            "retrieved %d instance(s) from %s",
            count,
            self.upstream.name,
            extra={
                "event": "bridge.retrieved",
                "destination": self.upstream.name,
                "instances": count,
                "study": uid_hash(study),
            },
        )
        if count == 0:
            raise UpstreamFailed(f"{self.upstream.name} sent none of {len(found)} instance(s)")

    def move_in(self, study: str, series: str | None, sop: str | None) -> None:
        """``retrieve: move``: make sure the resource is in our own store, C-MOVEing it to
        our AE title unless every instance the PACS lists is already here (blocking)."""
        try:
            found = self.upstream.instances_of(study, series, sop)
        except UpstreamFailed as exc:
            self._failed("C-FIND", exc, study)
            raise
        if {uid for _, uid, _ in found} <= self._here(study, series, sop):
            return
        self._move(study, series, sop)

    def _here(self, study: str, series: str | None, sop: str | None) -> set[str]:
        if self._local_instances is None:
            return set()
        return {r.sop_instance_uid for r in self._local_instances(study, series, sop)}

    def _move(self, study: str, series: str | None, sop: str | None) -> None:
        """C-MOVE the resource to our AE title; returns once the PACS reports the end."""
        assert self.move_to is not None
        try:
            count = self.upstream.move(study, series, sop, self.move_to)
        except UpstreamFailed as exc:
            self._failed("C-MOVE", exc, study)
            raise
        log.info(
            "moved %d instance(s) from %s",
            count,
            self.upstream.name,
            extra={
                "event": "bridge.retrieved",
                "destination": self.upstream.name,
                "instances": count,
                "study": uid_hash(study),
            },
        )

    async def retrieve_moved(
        self,
        service: WadoService,
        request: Request,
        study: str,
        series: str | None,
        sop: str | None,
    ) -> Response:
        """``retrieve: move`` WADO-RS retrieve, streamed: the C-MOVE runs in the background
        and each instance is sent to the client once it is stored and indexed, without
        waiting for the PACS's final C-MOVE response (WadoError for a clean failure)."""
        from dicomgate.dicomweb.wado import WadoError

        try:
            found = await asyncio.to_thread(self.upstream.instances_of, study, series, sop)
        except UpstreamFailed as exc:
            self._failed("C-FIND", exc, study)
            raise _wado_error(exc) from None
        except UpstreamNotFound as exc:
            raise _wado_error(exc) from None

        def local() -> list[StoredRef]:
            return self._local_instances(study, series, sop) if self._local_instances else []

        here = await asyncio.to_thread(local)
        if {uid for _, uid, _ in found} <= {r.sop_instance_uid for r in here}:
            return await service.retrieve(request, here)  # nothing to move
        move = asyncio.ensure_future(asyncio.to_thread(self._move, study, series, sop))
        # A client that goes away does not stop the C-MOVE (its instances are ingested):
        # its outcome is logged by _move, so it needs no one to await it.
        move.add_done_callback(lambda task: task.cancelled() or task.exception())
        sent: set[str] = set()

        async def arrivals() -> AsyncIterator[StoredRef]:
            """The resource's instances in the store, each once, as they are indexed."""
            while True:
                finished = move.done()
                for ref in await asyncio.to_thread(local):
                    if ref.sop_instance_uid not in sent:
                        sent.add(ref.sop_instance_uid)
                        yield ref
                if finished:
                    move.result()  # UpstreamFailed: the PACS failed or aborted
                    return
                await asyncio.wait({move}, timeout=_ARRIVAL_POLL)

        refs = arrivals()
        try:
            first = await anext(refs, None)
        except UpstreamFailed as exc:
            raise _wado_error(exc) from None
        if first is None:
            what = "instance" if sop else "series" if series else "study"
            raise WadoError(404, f"unknown {what}")
        return await _stream(service, request, first, refs)

    def open(self, study: str, series: str | None, sop: str | None) -> Lease:
        return self.cache.open((study, series, sop), self._fetch)

    def instances(self, study: str, series: str | None, sop: str | None) -> list[StoredRef]:
        """Every instance of the resource, once all arrived (blocking)."""
        lease = self.open(study, series, sop)
        try:
            refs = list(lease)
        finally:
            lease.close()
        if not refs:
            raise UpstreamNotFound(
                "unknown " + ("instance" if sop else "series" if series else "study")
            )
        return refs

    async def retrieve(
        self,
        service: WadoService,
        request: Request,
        study: str,
        series: str | None,
        sop: str | None,
    ) -> Response:
        """WADO-RS retrieve, streamed as instances arrive (WadoError for a clean failure)."""
        from dicomgate.dicomweb.wado import WadoError

        lease = await asyncio.to_thread(self.open, study, series, sop)
        refs: Iterator[StoredRef] = lease.iterate()

        def next_ref() -> object:
            return next(refs, _NO_MORE)

        try:
            first = await asyncio.to_thread(next_ref)
        except (UpstreamFailed, UpstreamNotFound) as exc:
            lease.close()
            raise _wado_error(exc) from None
        if first is _NO_MORE:
            lease.close()
            what = "instance" if sop else "series" if series else "study"
            raise WadoError(404, f"unknown {what}")
        assert isinstance(first, StoredRef)

        async def rest() -> AsyncIterator[StoredRef]:
            try:
                while isinstance(ref := await asyncio.to_thread(next_ref), StoredRef):
                    yield ref
            finally:
                lease.close()

        try:
            return await _stream(service, request, first, rest())
        except BaseException:
            lease.close()
            raise


async def _stream(
    service: WadoService, request: Request, first: StoredRef, rest: AsyncIterator[StoredRef]
) -> Response:
    """A multipart/related answer of ``first`` then ``rest``, each instance sent as soon as
    ``rest`` hands it over; an upstream failure after the first ends the body early."""
    from dicomgate.dicomweb.negotiate import choose_instance_syntax
    from dicomgate.dicomweb.streaming import Multipart, file_chunks
    from dicomgate.dicomweb.wado import WadoError, _accept

    accept = _accept(request)
    target = choose_instance_syntax(accept, first.transfer_syntax_uid)
    if target is None:
        raise WadoError(406, f"cannot send instances stored in {first.transfer_syntax_uid}")
    writer = Multipart("application/dicom")

    async def body() -> AsyncIterator[bytes]:
        ref: StoredRef | None = first
        try:
            while ref is not None:
                syntax = choose_instance_syntax(accept, ref.transfer_syntax_uid)
                if syntax is None:
                    log.warning(
                        "an upstream instance cannot be sent as accepted; skipped",
                        extra={"event": "bridge.instance_skipped"},
                    )
                else:
                    yield writer.part(f"application/dicom; transfer-syntax={syntax}")
                    if syntax == ref.transfer_syntax_uid:
                        async for chunk in file_chunks(service.path_of(ref)):
                            yield chunk
                    else:
                        yield await service.transcode_instance(ref, syntax)
                ref = await anext(rest, None)
            yield writer.close()
        except (UpstreamFailed, UpstreamNotFound) as exc:
            # Headers are gone: the client sees a truncated multipart body.
            log.warning("retrieve cut short: %s", exc, extra={"event": "bridge.retrieve_cut_short"})
            raise
        finally:
            await rest.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(body(), headers={"Content-Type": writer.content_type})


def _wado_error(exc: UpstreamFailed | UpstreamNotFound) -> Exception:
    from dicomgate.dicomweb.wado import WadoError

    if isinstance(exc, UpstreamNotFound):
        return WadoError(404, str(exc))
    return WadoError(exc.status, f"upstream {exc}")


def wado_error(exc: UpstreamFailed | UpstreamNotFound) -> Exception:
    """The WadoError for an upstream failure (404, 502 or 504)."""
    return _wado_error(exc)
