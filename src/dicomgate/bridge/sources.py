"""Query sources: where a C-FIND / C-MOVE / C-GET is answered (``query:`` in the config).

A source answers two questions, whatever protocol it speaks:

* :meth:`find` ``(level, identifier)``: the matches, as identifier data sets, one at a
  time as the upstream hands them over;
* :meth:`retrieve` ``(level, identifier)``: a :class:`Retrieval`: how many instances
  (when known) and the instances themselves, each a Part 10 file spooled to disk as soon
  as it has arrived (never the whole study first).

Three kinds:

* :class:`LocalSource`: the gateway's own index and store (``index/query.py``). The Q/R
  SCP (``dimse/qr.py``) keeps its own, faster, local path; this one is for callers that
  want the same interface.
* :class:`DicomwebSource`: QIDO-RS (PS3.18 10.6) and WADO-RS (PS3.18 10.4) on a
  ``dicomweb`` destination. Identifier keys become query parameters (single values,
  ``*``/``?`` wildcards, ``a-b`` ranges, UID lists as comma-separated values), the other
  requested keys ``includefield``; ``application/dicom+json`` answers become data sets.
* :class:`DimseSource`: C-FIND / C-MOVE / C-GET relayed to a ``dimse`` destination with
  our AE title (the destination's ``calling_ae_title``, else ``dimse.ae_title``).

Failures of the upstream raise :class:`UpstreamFailed`, which ``bridge/qr.py`` maps to a
DIMSE status (PS3.4 C.4.1.1.4, C.4.2.1.5).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomgate.bridge.dimse_upstream import get_contexts
from dicomgate.dicomweb.multipart import (
    MultipartError,
    MultipartParser,
    PartEnd,
    PartStart,
    parse_content_type,
)
from dicomgate.dimse.negotiation import QRModel
from dicomgate.dimse.scu import _AssociationFailed, _open_association
from dicomgate.egress.base import http_transport
from dicomgate.egress.dicomweb import _httpx_auth, first_value
from dicomgate.egress.models import DicomwebDestination, DimseDestination
from dicomgate.errors import DicomgateError
from dicomgate.index.db import Index
from dicomgate.index.query import QueryOptions, identifier_keys, instance_files, search
from dicomgate.store.filestore import ContentStore

__all__ = [
    "DicomwebSource",
    "DimseSource",
    "LocalSource",
    "QuerySourceClient",
    "Relay",
    "Retrieval",
    "Retrieved",
    "UpstreamFailed",
    "qido_params",
    "query_string",
    "remove_spooled",
    "sop_class_for",
]

QIDO_PAGE = 1000  # matches asked per QIDO-RS request (limit / offset paging)
QIDO_MAX_MATCHES = 100_000  # matches read for one C-FIND / retrieve at most
_SKIP_KEYS = {0x00080052, 0x00080005, 0x00080054}  # level, character set, Retrieve AE
_UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_COUNT_KEY = {"STUDY": "NumberOfStudyRelatedInstances", "SERIES": "NumberOfSeriesRelatedInstances"}
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_WADO_ACCEPT = (
    'multipart/related; type="application/dicom"; transfer-syntax=*',
    'multipart/related; type="application/dicom"',
)


class UpstreamFailed(DicomgateError):
    """The upstream could not answer. ``client_error``: it refused the request itself
    (HTTP 4xx, a DIMSE failure status): retrying the same request cannot help."""

    def __init__(self, cause: str, *, client_error: bool = False, status: int | None = None):
        super().__init__(cause)
        self.client_error = client_error
        self.status = status  # the upstream's DIMSE status, when it sent one


@dataclass(frozen=True)
class Retrieved:
    """One instance of a retrieve, spooled to ``path`` (a Part 10 file)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int
    temporary: bool  # the caller removes it once sent


@dataclass
class Retrieval:
    """What a retrieve brings: ``total`` instances (None: unknown; a source may learn it
    during the retrieve, e.g. from a PACS's pending C-GET responses), as they arrive."""

    total: int | None
    instances: AsyncIterator[Retrieved]


class QuerySourceClient(Protocol):
    """A source of matches and instances (see the module docstring)."""

    name: str

    def find(
        self, level: str, identifier: Dataset, model: QRModel | None = None
    ) -> AsyncIterator[Dataset]: ...

    async def retrieve(
        self, level: str, identifier: Dataset, model: QRModel | None = None
    ) -> Retrieval: ...

    async def close(self) -> None: ...


# -- local --------------------------------------------------------------------------------


class LocalSource:
    """The gateway's own index and store."""

    name = "local"

    def __init__(self, index: Index, store: ContentStore, page: int = 500) -> None:
        self.index = index
        self.store = store
        self.page = page

    async def find(
        self, level: str, identifier: Dataset, model: QRModel | None = None
    ) -> AsyncIterator[Dataset]:
        from dicomgate.index.query import Level

        keys = identifier_keys(identifier)
        keys.pop("RetrieveAETitle", None)
        offset = 0
        while True:
            options = QueryOptions(limit=self.page, offset=offset)

            def run(options: QueryOptions = options) -> Any:
                with self.index.engine.connect() as connection:
                    return search(connection, Level[level], keys, options)

            result = await asyncio.to_thread(run)
            for match in result.matches:
                yield match.to_dataset()
            if not result.more:
                return
            offset += self.page

    async def retrieve(
        self, level: str, identifier: Dataset, model: QRModel | None = None
    ) -> Retrieval:
        keys = {k: v for k, v in identifier_keys(identifier).items() if v.strip() not in ("", "*")}

        def run() -> Any:
            with self.index.engine.connect() as connection:
                return instance_files(connection, keys)

        files = await asyncio.to_thread(run)

        async def instances() -> AsyncIterator[Retrieved]:
            for f in files:
                yield Retrieved(
                    f.sop_class_uid,
                    f.sop_instance_uid,
                    f.transfer_syntax_uid,
                    self.store.path_of(f.relpath),
                    f.size,
                    temporary=False,
                )

        return Retrieval(len(files), instances())

    async def close(self) -> None:
        return None


# -- DICOMweb upstream ------------------------------------------------------------------


def _query_value(value: Any, vr: str) -> str | None:
    """A QIDO-RS query value for an identifier value; None: universal matching."""
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        parts = [str(v) for v in value]  # a multi-valued key, e.g. a UID list
        return ",".join(parts) if any(parts) else None
    text = str(value).strip()
    if text in ("", "*"):
        return None
    return text


def qido_params(identifier: Dataset) -> list[tuple[str, str]]:
    """QIDO-RS query parameters for a C-FIND identifier (PS3.18 8.3.4): a key with a value
    is a matching parameter, a key without one (or ``*``) an ``includefield``."""
    params: list[tuple[str, str]] = []
    for element in identifier:
        if element.tag in _SKIP_KEYS or element.tag.is_private or element.tag.group == 0x0002:
            continue
        name = element.keyword or f"{element.tag:08X}"
        if element.VR == "SQ":
            params.append(("includefield", name))
            continue
        value = _query_value(element.value, element.VR)
        if value is None:
            params.append(("includefield", name))
        else:
            params.append((name, value))
    return params


# Characters left as they are in a query value: RFC 3986 allows them in a query, and some
# servers (Orthanc 1.10's DICOMweb plugin) do not decode %2A (*) or %5E (^) before matching.
_QUERY_SAFE = "*?^,-.:_~/@!$'()"


def query_string(params: list[tuple[str, str]]) -> str:
    """``k=v&...`` with values percent-encoded minimally (see :data:`_QUERY_SAFE`)."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe=_QUERY_SAFE)}" for k, v in params)


def _bulk_data(tag: str, vr: str, uri: str) -> bytes:
    return b""  # a bulk data URI in a QIDO answer: the value is not fetched


def _uids(identifier: Dataset, keyword: str) -> list[str]:
    value = identifier.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v for v in value.split("\\") if v]
    return [str(v) for v in value if str(v)]


def _first(item: dict[str, Any], tag: str) -> str:
    value = first_value(item, tag)
    return "" if value is None else str(value)


def _count(item: dict[str, Any], tag: str) -> int | None:
    """An IS count of a QIDO-RS match (a JSON number, or a string some servers send);
    None when it is missing or not a count."""
    value = first_value(item, tag)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class DicomwebSource:
    """QIDO-RS and WADO-RS on a ``dicomweb`` destination."""

    def __init__(
        self,
        name: str,
        model: DicomwebDestination,
        *,
        spool_dir: Path,
        timeout: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.url = model.url.rstrip("/")
        self.spool_dir = spool_dir
        auth, auth_headers = _httpx_auth(model.parsed_auth)
        self._client = httpx.AsyncClient(
            auth=auth,
            headers={"User-Agent": "dicomgate", **model.headers, **auth_headers},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport or http_transport(model.verify),
        )

    # QIDO-RS --------------------------------------------------------------------------

    def _qido_path(self, level: str, identifier: Dataset) -> tuple[str, set[str]]:
        """The resource to search, and the keys the path already matches on."""
        studies = _uids(identifier, "StudyInstanceUID")
        series = _uids(identifier, "SeriesInstanceUID")
        if level in ("PATIENT", "STUDY"):
            return "/studies", set()
        if level == "SERIES":
            if len(studies) == 1:
                return f"/studies/{studies[0]}/series", {"StudyInstanceUID"}
            return "/series", set()
        if len(studies) == 1 and len(series) == 1:
            return (
                f"/studies/{studies[0]}/series/{series[0]}/instances",
                {"StudyInstanceUID", "SeriesInstanceUID"},
            )
        if len(studies) == 1:
            return f"/studies/{studies[0]}/instances", {"StudyInstanceUID"}
        return "/instances", set()

    async def _qido(
        self, path: str, params: list[tuple[str, str]]
    ) -> AsyncIterator[dict[str, Any]]:
        offset = 0
        cap = QIDO_PAGE  # the upstream's own page size, once it has capped one
        while True:
            page = [*params, ("limit", str(QIDO_PAGE)), ("offset", str(offset))]
            try:
                response = await self._client.get(
                    f"{self.url}{path}?{query_string(page)}",
                    headers={"Accept": "application/dicom+json"},
                )
            except httpx.TimeoutException as exc:
                raise UpstreamFailed(f"QIDO-RS timed out: {type(exc).__name__}") from exc
            except httpx.HTTPError as exc:
                raise UpstreamFailed(f"QIDO-RS failed: {type(exc).__name__}: {exc}") from exc
            if response.status_code == 204:
                return
            if response.status_code >= 400:
                raise UpstreamFailed(
                    f"QIDO-RS answered HTTP {response.status_code}",
                    client_error=400 <= response.status_code < 500,
                )
            try:
                items = response.json()
            except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
                raise UpstreamFailed("QIDO-RS answer is not JSON") from exc
            if not isinstance(items, list):
                raise UpstreamFailed("QIDO-RS answer is not a JSON array")
            for item in items:
                if not isinstance(item, dict):
                    raise UpstreamFailed("QIDO-RS answer holds a match that is not a JSON object")
                yield item
            # PS3.18 8.3.4.4: a server that caps a page says more exist in a Warning; a page
            # as long as asked, or as a capped page before it (the server's own page size,
            # even without a Warning), may be followed by more.
            more = _says_more(response)
            if more:
                cap = len(items)
            if not items or not (more or len(items) >= min(QIDO_PAGE, cap)):
                return
            offset += len(items)
            if offset >= QIDO_MAX_MATCHES:
                raise UpstreamFailed(
                    f"QIDO-RS: over {QIDO_MAX_MATCHES} matches; narrow the query",
                    client_error=True,
                )

    async def find(
        self, level: str, identifier: Dataset, model: QRModel | None = None
    ) -> AsyncIterator[Dataset]:
        path, in_path = self._qido_path(level, identifier)
        params = [(k, v) for k, v in qido_params(identifier) if k not in in_path]
        if level == "PATIENT":  # QIDO-RS has no patient resource: distinct patients of studies
            seen: set[str] = set()
            async for item in self._qido(path, params):
                key = _first(item, "00100020") + "\0" + _first(item, "00100010")
                if key not in seen:
                    seen.add(key)
                    yield _from_json(item)
            return
        async for item in self._qido(path, params):
            yield _from_json(item)

    # WADO-RS --------------------------------------------------------------------------

    async def _targets(self, level: str, identifier: Dataset) -> tuple[list[str], int | None]:
        """The WADO-RS resources a retrieve names, and how many instances they hold."""
        unique = _UNIQUE[level]
        query = Dataset()
        for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if keyword in identifier and identifier[keyword].value not in (None, ""):
                query[keyword] = identifier[keyword]
        query.StudyInstanceUID = query.get("StudyInstanceUID", "")
        if level in ("SERIES", "IMAGE"):
            query.SeriesInstanceUID = query.get("SeriesInstanceUID", "")
        if level == "IMAGE":
            query.SOPInstanceUID = query.get("SOPInstanceUID", "")
        if level in _COUNT_KEY:
            setattr(query, _COUNT_KEY[level], None)
        if unique not in query or query[unique].value in (None, ""):
            raise UpstreamFailed(f"a {level} retrieve needs {unique}", client_error=True)
        path, in_path = self._qido_path("STUDY" if level == "PATIENT" else level, query)
        params = [(k, v) for k, v in qido_params(query) if k not in in_path]
        targets: list[str] = []
        total: int | None = 0
        async for item in self._qido(path, params):
            study = _first(item, _STUDY_UID)
            if not study:
                raise UpstreamFailed("QIDO-RS match without a Study Instance UID")
            count: int | None = 1
            if level in ("PATIENT", "STUDY"):
                targets.append(f"/studies/{study}")
                count = _count(item, "00201208")
            elif level == "SERIES":
                targets.append(f"/studies/{study}/series/{_first(item, _SERIES_UID)}")
                count = _count(item, "00201209")
            else:
                targets.append(
                    f"/studies/{study}/series/{_first(item, _SERIES_UID)}"
                    f"/instances/{_first(item, _SOP_UID)}"
                )
            total = None if total is None or count is None else total + count
        return targets, total

    async def retrieve(
        self, level: str, identifier: Dataset, model: QRModel | None = None
    ) -> Retrieval:
        targets, total = await self._targets(level, identifier)

        async def instances() -> AsyncIterator[Retrieved]:
            for target in targets:
                async for retrieved in self._wado(target):
                    yield retrieved

        return Retrieval(total, instances())

    async def _wado(self, path: str) -> AsyncIterator[Retrieved]:
        for n, accept in enumerate(_WADO_ACCEPT):
            try:
                async with self._client.stream(
                    "GET", self.url + path, headers={"Accept": accept}
                ) as response:
                    if response.status_code in (400, 406) and n + 1 < len(_WADO_ACCEPT):
                        continue  # no transfer-syntax=*: ask for the server's default
                    if response.status_code >= 400:
                        raise UpstreamFailed(
                            f"WADO-RS answered HTTP {response.status_code}",
                            client_error=400 <= response.status_code < 500,
                        )
                    async for retrieved in self._split(response):
                        yield retrieved
                    return
            except httpx.TimeoutException as exc:
                raise UpstreamFailed(f"WADO-RS timed out: {type(exc).__name__}") from exc
            except httpx.HTTPError as exc:
                raise UpstreamFailed(f"WADO-RS failed: {type(exc).__name__}: {exc}") from exc

    async def _split(self, response: httpx.Response) -> AsyncIterator[Retrieved]:
        """Each part of a multipart/related answer, spooled to a file as it arrives."""
        main, params = parse_content_type(response.headers.get("content-type", ""))
        if main != "multipart/related" or "boundary" not in params:
            raise UpstreamFailed(f"WADO-RS answer is {main or 'untyped'}, not multipart/related")
        parser = MultipartParser(params["boundary"])
        fh: Any = None
        path: Path | None = None
        try:
            async for chunk in response.aiter_bytes():
                try:
                    events = parser.feed(chunk)
                except MultipartError as exc:
                    raise UpstreamFailed(f"WADO-RS answer: {exc}") from exc
                for event in events:
                    if isinstance(event, PartStart):
                        path = self.spool_dir / f"bridge-{uuid.uuid4().hex}.part"
                        fh = path.open("wb")
                    elif isinstance(event, PartEnd):
                        assert fh is not None and path is not None
                        fh.close()
                        fh = None
                        done, path = path, None
                        yield await asyncio.to_thread(_describe, done)
                    elif fh is not None:
                        fh.write(event)
            try:
                parser.close()
            except MultipartError as exc:
                raise UpstreamFailed(f"WADO-RS answer: {exc}") from exc
        finally:
            if fh is not None:
                fh.close()
            if path is not None:
                path.unlink(missing_ok=True)

    async def close(self) -> None:
        await self._client.aclose()


def _says_more(response: httpx.Response) -> bool:
    """Whether a QIDO-RS answer's Warning headers say that more matches exist (PS3.18
    8.3.4.4, e.g. ``299 server "... Additional results can be requested."``)."""
    return any(
        "additional results" in w.lower() or "exceeded the maximum" in w.lower()
        for w in response.headers.get_list("warning")
    )


def _from_json(item: dict[str, Any]) -> Dataset:
    try:
        return Dataset.from_json(item, bulk_data_uri_handler=_bulk_data)
    except Exception as exc:  # pydicom raises several kinds for bad JSON
        raise UpstreamFailed(f"QIDO-RS match is not valid DICOM JSON: {exc}"[:120]) from exc


def _describe(path: Path) -> Retrieved:
    """A spooled Part 10 file's UIDs; the file is removed when it is not one."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        meta = ds.file_meta
        # The data set's UIDs name the instance, not the file meta's (PS3.7 9.3.1.1: the
        # Affected SOP Instance UID of the C-STORE is the data set's SOP Instance UID);
        # a WADO-RS server may rewrite the file meta.
        return Retrieved(
            str(ds.get("SOPClassUID") or meta.MediaStorageSOPClassUID),
            str(ds.get("SOPInstanceUID") or meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
            path,
            path.stat().st_size,
            temporary=True,
        )
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise UpstreamFailed(f"WADO-RS part is not a DICOM Part 10 file: {exc}"[:120]) from exc


# -- DIMSE upstream ---------------------------------------------------------------------


_END = object()


async def _from_thread(
    work: Callable[[Callable[[Any], None], threading.Event], None],
) -> AsyncIterator[Any]:
    """Run ``work(put, stop)`` on a thread; yield what it puts, in order. Leaving the
    iteration early sets ``stop``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def run() -> None:
        try:
            work(put, stop)
        except BaseException as exc:  # handed to the consumer
            put(exc)
        finally:
            put(_END)

    thread = threading.Thread(target=run, name="bridge-dimse", daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _status_of(status: Dataset) -> tuple[int, str]:
    return int(status.get("Status", 0xC000)), str(status.get("ErrorComment", "") or "")


_RELAY_MSG_ID = 1  # the Message ID of a relayed request on its own association


class Relay:
    """A request relayed to a PACS on an association of its own, which another thread may
    cancel: :meth:`cancel` sends a C-CANCEL-RQ for it (PS3.7 9.3.2.3), at once when the PACS
    has answered once already (so that the request is known to have gone out), else after
    its first response."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._assoc: Association | None = None
        self._sop_class = ""
        self._answered = False
        self._wanted = False
        self._sent = False

    def attach(self, assoc: Association, sop_class: str) -> None:
        with self._lock:
            self._assoc, self._sop_class = assoc, sop_class

    def detach(self) -> None:
        with self._lock:
            self._assoc = None

    def answered(self) -> None:
        """The PACS sent a response to the request (called on the relaying thread)."""
        with self._lock:
            self._answered = True
            self._send_locked()

    def cancel(self) -> None:
        """Ask the PACS to stop (thread-safe; sends one C-CANCEL-RQ at most)."""
        with self._lock:
            self._wanted = True
            self._send_locked()

    @property
    def cancel_sent(self) -> bool:
        return self._sent

    def _send_locked(self) -> None:
        assoc = self._assoc
        if not (self._wanted and self._answered) or self._sent or assoc is None:
            return
        if assoc.is_established:  # pynetdicom queues the message: safe from any thread
            assoc.send_c_cancel(_RELAY_MSG_ID, query_model=self._sop_class)
            self._sent = True


_MODEL_SOP_CLASSES = {
    ("patient", "find"): PatientRootQueryRetrieveInformationModelFind,
    ("patient", "move"): PatientRootQueryRetrieveInformationModelMove,
    ("patient", "get"): PatientRootQueryRetrieveInformationModelGet,
    ("study", "find"): StudyRootQueryRetrieveInformationModelFind,
    ("study", "move"): StudyRootQueryRetrieveInformationModelMove,
    ("study", "get"): StudyRootQueryRetrieveInformationModelGet,
}


def sop_class_for(model: QRModel | None, level: str, service: str) -> str:
    """The SOP class to relay a request with: the requestor's information model (PS3.4
    C.6.1 / C.6.2), so that the PACS answers with the keys of that model (Patient ID in
    Patient Root). The retired Patient/Study Only model goes upstream as Patient Root (its
    levels and keys are a subset); without a model (DICOMweb callers), Patient Root for a
    PATIENT level request and Study Root otherwise."""
    if model is None:
        root = "patient" if level == "PATIENT" else "study"
    else:
        root = "study" if model is QRModel.STUDY_ROOT else "patient"
    return str(_MODEL_SOP_CLASSES[(root, service)])


def _cancel_or_abort(
    relay: Relay, assoc: Association, cancelled_at: float, timeout: float
) -> float | None:
    """The consumer of a relayed C-FIND/C-GET went away: the first time, ask the PACS to
    stop (C-CANCEL-RQ) and return when; later, None once it ignored that for ``timeout``
    seconds (the association is then aborted), else ``cancelled_at`` (read on)."""
    if not cancelled_at:
        relay.cancel()
        return time.monotonic()
    if time.monotonic() - cancelled_at > timeout:
        assoc.abort()
        return None
    return cancelled_at


class DimseSource:
    """C-FIND / C-MOVE / C-GET relayed to a ``dimse`` destination (a PACS)."""

    def __init__(
        self,
        name: str,
        model: DimseDestination,
        *,
        calling_ae: str,
        spool_dir: Path,
        timeout: float,
    ) -> None:
        self.name = name
        self.model = model
        self.calling_ae = model.calling_ae_title or calling_ae
        self.spool_dir = spool_dir
        self.timeout = timeout

    def _associate(self, contexts: list[Any]) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10.0)
        try:
            return _open_association(
                ae, self.model.host, self.model.port, self.model.ae_title, contexts, self.timeout
            )
        except _AssociationFailed as exc:
            raise UpstreamFailed(f"cannot associate with {self.name}: {exc}") from exc

    def _responses(
        self,
        send: Callable[[Association], Iterator[tuple[Dataset, Dataset | None]]],
        sop_class: str,
        relay: Relay | None = None,
    ) -> Callable[[Callable[[Any], None], threading.Event], None]:
        def work(put: Callable[[Any], None], stop: threading.Event) -> None:
            assoc = self._associate([build_context(sop_class)])
            if relay is not None:
                relay.attach(assoc, sop_class)
            cancelled_at = 0.0
            try:
                for status, identifier in send(assoc):
                    if not status:  # no response in time, or the association went away
                        if cancelled_at:
                            return  # the PACS stopped answering after our cancel: done
                        raise UpstreamFailed(f"{self.name}: no response (timeout or abort)")
                    if relay is not None:
                        relay.answered()
                    if not stop.is_set():
                        put((status, identifier))
                        continue
                    # The consumer is gone (the requester cancelled, or a QIDO limit was
                    # reached): ask the PACS to stop (PS3.7 9.3.2.3) and read on to its
                    # final response, so the association can be released, not aborted.
                    if relay is None:
                        assoc.abort()
                        return
                    after = _cancel_or_abort(relay, assoc, cancelled_at, self.timeout)
                    if after is None:
                        return
                    cancelled_at = after
            finally:
                if relay is not None:
                    relay.detach()
                if assoc.is_established:
                    assoc.release()

        return work

    async def find_raw(
        self, identifier: Dataset, sop_class: str
    ) -> AsyncIterator[tuple[Dataset, Dataset | None]]:
        """Each C-FIND response (status, identifier) of the PACS; leaving the iteration
        early sends the PACS a C-CANCEL-RQ."""
        work = self._responses(
            lambda a: a.send_c_find(identifier, sop_class, msg_id=_RELAY_MSG_ID),
            sop_class,
            Relay(),
        )
        async for item in _from_thread(work):
            yield item

    async def find(
        self, level: str, identifier: Dataset, model: QRModel | None = None
    ) -> AsyncIterator[Dataset]:
        sop_class = sop_class_for(model, level, "find")
        async for status, found in self.find_raw(identifier, sop_class):
            code, comment = _status_of(status)
            if code in (0xFF00, 0xFF01) and found is not None:
                yield found
            elif code != 0:
                raise UpstreamFailed(
                    f"{self.name} answered C-FIND 0x{code:04X} {comment}".strip(),
                    client_error=True,
                    status=code,
                )

    async def move_raw(
        self, identifier: Dataset, sop_class: str, destination: str, relay: Relay | None = None
    ) -> AsyncIterator[tuple[Dataset, Dataset | None]]:
        """Each C-MOVE response (status, identifier) of the PACS, which sends the
        instances itself to ``destination`` (an AE title it must know). ``relay.cancel()``
        sends the PACS a C-CANCEL-RQ for it."""
        work = self._responses(
            lambda a: a.send_c_move(identifier, destination, sop_class, msg_id=_RELAY_MSG_ID),
            sop_class,
            relay,
        )
        async for item in _from_thread(work):
            yield item

    def _sop_classes(self, identifier: Dataset, model: QRModel | None) -> tuple[list[str], int]:
        """The SOP classes of the instances a retrieve names (an IMAGE-level C-FIND in the
        requestor's model), to offer as storage contexts, and how many instances there
        are; ([], 0) when the PACS does not say."""
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            query.add_new(keyword, "LO" if keyword == "PatientID" else "UI", None)
            if keyword in identifier:
                query[keyword].value = identifier[keyword].value
        query.SOPClassUID = None
        sop_class = sop_class_for(model, "IMAGE", "find")
        classes: set[str] = set()
        count = 0
        try:
            assoc = self._associate([build_context(sop_class)])
        except UpstreamFailed:
            return [], 0
        try:
            for status, found in assoc.send_c_find(query, sop_class, msg_id=_RELAY_MSG_ID):
                code = int(status.get("Status", 0xC000)) if status else 0xC000
                if code in (0xFF00, 0xFF01) and found is not None:
                    classes.add(str(found.get("SOPClassUID", "") or ""))
                    count += 1
                elif code != 0x0000:
                    return [], 0
        finally:
            if assoc.is_established:
                assoc.release()
        classes.discard("")
        return sorted(classes), count

    async def retrieve(
        self, level: str, identifier: Dataset, model: QRModel | None = None
    ) -> Retrieval:
        """C-GET on the PACS; each instance it sends is spooled, then handed on.

        The storage contexts offered are those of the SOP classes an IMAGE-level C-FIND
        names, each with the compressed syntaxes in contexts of their own
        (:func:`.dimse_upstream.get_contexts`), so that the PACS sends instances as
        stored; a destination that does not accept a syntax gets them transcoded at
        egress. Leaving the iteration early (the requestor cancelled) sends the PACS a
        C-CANCEL-RQ (PS3.7 9.3.3.3) and releases the association once it has answered,
        aborting only when it ignores the cancel for ``timeout``."""
        sop_class = sop_class_for(model, level, "get")
        spool = self.spool_dir

        def work(put: Callable[[Any], None], stop: threading.Event) -> None:
            def on_store(event: evt.Event) -> int:
                if stop.is_set():
                    return 0xA700  # cancelled: nobody takes it any more
                path = spool / f"bridge-{uuid.uuid4().hex}.part"
                try:
                    # The data set as the PACS encoded it (no decode / re-encode).
                    path.write_bytes(event.encoded_dataset(include_meta=True))
                    meta = event.file_meta  # from the C-STORE's Affected SOP UIDs
                    put(
                        Retrieved(
                            str(meta.MediaStorageSOPClassUID),
                            str(meta.MediaStorageSOPInstanceUID),
                            str(meta.TransferSyntaxUID),
                            path,
                            path.stat().st_size,
                            temporary=True,
                        )
                    )
                except Exception:  # a broken data set or a full disk: this instance fails
                    path.unlink(missing_ok=True)
                    return 0xA700
                return 0x0000

            classes, count = self._sop_classes(identifier, model)
            if classes:
                retrieval.total = count  # until the PACS's own counts arrive
            else:  # the PACS did not say: the storage classes we know best
                classes = [str(c.abstract_syntax) for c in StoragePresentationContexts[:120]]
            contexts, roles = get_contexts(build_context(sop_class), classes)
            ae = AE(ae_title=self.calling_ae)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
            ae.connection_timeout = min(self.timeout, 10.0)
            assoc = ae.associate(
                self.model.host,
                self.model.port,
                contexts,
                ae_title=self.model.ae_title,
                ext_neg=roles,
                evt_handlers=[(evt.EVT_C_STORE, on_store)],
            )
            if not assoc.is_established:
                raise UpstreamFailed(f"cannot associate with {self.name}")
            relay = Relay()
            relay.attach(assoc, sop_class)
            cancelled_at = 0.0
            try:
                for status, _found in assoc.send_c_get(identifier, sop_class, msg_id=_RELAY_MSG_ID):
                    if not status:
                        if cancelled_at:
                            return  # the PACS stopped answering after our cancel: done
                        raise UpstreamFailed(f"{self.name}: no C-GET response (timeout or abort)")
                    relay.answered()
                    code, comment = _status_of(status)
                    if code in (0xFF00, 0xFF01):  # the PACS's counts: how many in all
                        retrieval.total = sum(
                            int(status.get(k) or 0)
                            for k in (
                                "NumberOfRemainingSuboperations",
                                "NumberOfCompletedSuboperations",
                                "NumberOfFailedSuboperations",
                                "NumberOfWarningSuboperations",
                            )
                        )
                    if code not in (0xFF00, 0x0000, 0xB000, 0xFE00) and not cancelled_at:
                        raise UpstreamFailed(
                            f"{self.name} answered C-GET 0x{code:04X} {comment}".strip(),
                            client_error=(code & 0xF000) == 0xC000 or code == 0xA900,
                            status=code,
                        )
                    if not stop.is_set():
                        continue
                    # The requestor cancelled: ask the PACS to stop (PS3.7 9.3.3.3) and
                    # read on to its final response, so the association is released.
                    after = _cancel_or_abort(relay, assoc, cancelled_at, self.timeout)
                    if after is None:
                        return
                    cancelled_at = after
            finally:
                relay.detach()
                if assoc.is_established:
                    assoc.release()

        async def instances() -> AsyncIterator[Retrieved]:
            async for item in _from_thread(work):
                yield item

        retrieval = Retrieval(None, instances())
        return retrieval

    async def close(self) -> None:
        return None


def remove_spooled(retrieved: Retrieved) -> None:
    """Remove a retrieved instance's spool file (when it is one)."""
    if retrieved.temporary:
        with contextlib.suppress(OSError):
            retrieved.path.unlink()
