"""QIDO-RS (PS3.18 10.6): search studies, series and instances in the index.

Six resources, answered from the index only (never from the stored files):

=======================================================  =========  ======================
path                                                     level      default attributes
=======================================================  =========  ======================
``/studies``                                             study      study
``/studies/{study}/series``                              series     series
``/series``                                              series     study + series
``/studies/{study}/series/{series}/instances``           instance   instance
``/studies/{study}/instances``                           instance   series + instance
``/instances``                                           instance   study + series + inst.
=======================================================  =========  ======================

Matching is :mod:`dicomgate.index.query`. Query keys the index cannot match, includefield
attributes it cannot return and a result cut at the server's maximum are reported in
``Warning: 299 <host> "<text>"`` headers (PS3.18 8.3.4.1, RFC 7234 5.5). A malformed request
(unknown attribute, bad value, bad limit/offset/fuzzymatching, repeated non-UID key) is a
400 with ``{"error": ...}``; an Accept the service cannot produce is a 406. No match is a
200 with ``[]`` (PS3.18 also allows 204; every client we tried handles ``[]``).

With ``query.dicomweb.source`` naming a ``dimse`` destination, searches become C-FIND on
that PACS instead (:mod:`dicomgate.bridge.dicomweb_bridge`; 502/504 when it fails).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response

from dicomgate.bridge.dicomweb_bridge import bridge_for
from dicomgate.bridge.dimse_upstream import UpstreamFailed
from dicomgate.dicomweb.server import PREFIX, problem
from dicomgate.errors import IndexUnavailable
from dicomgate.index.extract import nameable_uid
from dicomgate.index.query import (
    RETRIEVE_URL_TAG,
    InvalidQuery,
    Level,
    Match,
    QueryOptions,
    QueryResult,
    resolve_key,
    search,
)

if TYPE_CHECKING:
    from dicomgate.service import Gateway

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
# The most matches one response carries; more are announced in a Warning (PS3.18 8.3.4.4).
MAX_RESULTS = {Level.STUDY: 1000, Level.SERIES: 1000, Level.IMAGE: 10_000}
_RESERVED = {"limit", "offset", "fuzzymatching", "includefield", "accept", "charset"}
_TRUNCATED = (
    "The number of results exceeded the maximum supported by the server. "
    "Additional results can be requested."
)


class _BadRequest(Exception):
    """A request refused with a status and a reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def router(gateway: Gateway) -> APIRouter:
    """The QIDO-RS resources, to mount under ``/dicomweb``."""
    api = APIRouter(tags=["QIDO-RS"])
    # query.dicomweb.source: a dimse destination -> searches become C-FIND on that PACS.
    bridge = bridge_for(gateway)

    def answer(
        request: Request,
        level: Level,
        defaults: tuple[Level, ...],
        study: str | None = None,
        series: str | None = None,
    ) -> Response:
        started = time.perf_counter()
        try:
            media_type = _negotiate(request)
            keys, options, capped = _parse(request, level, defaults)
            for name, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
                if uid is not None:
                    if not nameable_uid(uid):
                        raise _BadRequest(400, f"{uid!r} in the path is not a UID")
                    keys[name] = uid
            if bridge is not None:
                found, more = bridge.search(level, keys, options)
                result = QueryResult([], [], more)
            else:
                with gateway.index.engine.connect() as connection:
                    result = search(connection, level, keys, options)
        except _BadRequest as error:
            return problem(error.status, error.message)
        except InvalidQuery as error:
            return problem(400, str(error))
        except IndexUnavailable as error:
            return problem(503, f"index unavailable: {error}")
        except UpstreamFailed as error:
            return problem(error.status, f"upstream {error}")
        warnings = list(result.warnings)
        if result.more and capped:
            warnings.append(_TRUNCATED)
        base = public_base_url(request) + PREFIX
        if bridge is not None:
            body = [_render_json(found_json, base, level) for found_json in found]
        else:
            body = [_render(match, base, level) for match in result.matches]
        response = Response(
            json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
            media_type=media_type,
        )
        agent = public_base_url(request).partition("://")[2] or "dicomgate"
        for text in warnings:
            response.headers.append("Warning", f'299 {agent} "{text.replace(chr(34), chr(39))}"')
        log.debug(
            "qido search",
            extra={
                "event": "qido.search",
                "level": level.name.lower(),
                "matches": len(body),
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return response

    @api.get("/studies")
    def search_studies(request: Request) -> Response:
        """Search for studies (PS3.18 10.6.1, Table 6.7.1-2 attributes)."""
        return answer(request, Level.STUDY, (Level.STUDY,))

    @api.get("/studies/{study}/series")
    def search_study_series(study: str, request: Request) -> Response:
        """Search for the series of one study."""
        return answer(request, Level.SERIES, (Level.SERIES,), study)

    @api.get("/series")
    def search_series(request: Request) -> Response:
        """Search for series in every study."""
        return answer(request, Level.SERIES, (Level.STUDY, Level.SERIES))

    @api.get("/studies/{study}/series/{series}/instances")
    def search_series_instances(study: str, series: str, request: Request) -> Response:
        """Search for the instances of one series."""
        return answer(request, Level.IMAGE, (Level.IMAGE,), study, series)

    @api.get("/studies/{study}/instances")
    def search_study_instances(study: str, request: Request) -> Response:
        """Search for the instances of one study."""
        return answer(request, Level.IMAGE, (Level.SERIES, Level.IMAGE), study)

    @api.get("/instances")
    def search_instances(request: Request) -> Response:
        """Search for instances in every study."""
        return answer(request, Level.IMAGE, (Level.STUDY, Level.SERIES, Level.IMAGE))

    return api


def public_base_url(request: Request) -> str:
    """``scheme://host[:port]`` (plus any root path) as the client reached us, no trailing /.

    From the Host header; a Host without a port (dicomweb-client sends one) gets the port the
    request arrived on when that is not the scheme's default and no proxy header says
    otherwise. Behind a reverse proxy, forward Host with its port (or X-Forwarded-Host).
    """
    url = request.base_url
    forwarded = request.headers.get("x-forwarded-host")
    host = forwarded.split(",")[0].strip() if forwarded else request.headers.get("host", "")
    server = request.scope.get("server")
    if host and ":" not in host.rsplit("]", 1)[-1] and not forwarded and server:
        port = int(server[1]) if server[1] is not None else None
        if port is not None and port != {"http": 80, "https": 443}.get(url.scheme):
            host = f"{host}:{port}"
    if not host:
        return str(url).rstrip("/")
    return f"{url.scheme}://{host}{request.scope.get('root_path', '')}".rstrip("/")


def _negotiate(request: Request) -> str:
    """The media type to answer with: application/dicom+json unless only JSON is accepted."""
    accept = request.query_params.get("accept") or request.headers.get("accept") or ""
    ranges = [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]
    if not ranges:
        return DICOM_JSON
    for media_range in ranges:
        if media_range in (DICOM_JSON, "*/*", "application/*"):
            return DICOM_JSON
        if media_range == "application/json":
            return "application/json"
    raise _BadRequest(
        406,
        f"cannot answer in {accept!r}: QIDO-RS answers application/dicom+json "
        "(or application/json); application/dicom+xml is not supported",
    )


def _parse(
    request: Request, level: Level, defaults: tuple[Level, ...]
) -> tuple[dict[str, str], QueryOptions, bool]:
    """Query keys, options, and whether the server's maximum replaced the client's limit."""
    keys: dict[str, str] = {}
    include: list[str] = []
    include_all = False
    fuzzy = False
    limit: int | None = None
    offset = 0
    seen: set[str] = set()
    for name, value in request.query_params.multi_items():
        if name in ("limit", "offset", "fuzzymatching") and name in seen:
            raise _BadRequest(400, f"{name} is given more than once")
        seen.add(name)
        if name == "limit":
            limit = _count(name, value)
        elif name == "offset":
            offset = _count(name, value)
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise _BadRequest(400, f"fuzzymatching must be true or false, not {value!r}")
            fuzzy = value == "true"
        elif name == "includefield":
            for field in (f.strip() for f in value.split(",")):
                if field == "all":
                    include_all = True
                elif field:
                    resolve_key(field)  # InvalidQuery (400) for no attribute at all
                    include.append(field)
        elif name in _RESERVED:
            continue
        else:
            attribute = resolve_key(name)
            key = attribute.key if attribute is not None else name
            if key in keys:
                if attribute is None or attribute.vr != "UI":
                    raise _BadRequest(400, f"{name} is given more than once")
                keys[key] = f"{keys[key]}\\{value}"
            else:
                keys[key] = value
    maximum = MAX_RESULTS[level]
    capped = limit is None or limit > maximum
    options = QueryOptions(
        fuzzy=fuzzy,
        limit=maximum if capped else limit,
        offset=offset,
        include=include,
        include_all=include_all,
        default_levels=defaults,
    )
    return keys, options, capped


def _count(name: str, value: str) -> int:
    # ASCII digits only: '²'.isdigit() is True, yet int('²') fails.
    if not (value.isascii() and value.isdecimal()) or len(value) > 9:
        raise _BadRequest(400, f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


def _render(match: Match, base: str, level: Level) -> dict[str, object]:
    body = match.to_json()
    tag = f"{RETRIEVE_URL_TAG:08X}"
    if tag in body:
        url = f"{base}/studies/{match.study_uid}"
        if level.value >= Level.SERIES.value:
            url += f"/series/{match.series_uid}"
        if level is Level.IMAGE:
            url += f"/instances/{match.sop_instance_uid}"
        body[tag] = {"vr": "UR", "Value": [url]}
    return body


def _render_json(body: dict[str, object], base: str, level: Level) -> dict[str, object]:
    """An upstream C-FIND answer (dicom+json) with our RetrieveURL, keys in tag order."""

    def uid(tag: str) -> str:
        element = body.get(tag)
        values = element.get("Value") if isinstance(element, dict) else None
        return str(values[0]) if isinstance(values, list) and values else ""

    url = f"{base}/studies/{uid('0020000D')}"
    if level.value >= Level.SERIES.value:
        url += f"/series/{uid('0020000E')}"
    if level is Level.IMAGE:
        url += f"/instances/{uid('00080018')}"
    body[f"{RETRIEVE_URL_TAG:08X}"] = {"vr": "UR", "Value": [url]}
    return dict(sorted(body.items()))
