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
attributes it cannot return, a result cut at the server's maximum (whatever ``limit`` asked,
PS3.18 8.3.4.4) are reported in ``Warning: 299 <host> "<text>"`` headers (PS3.18 8.3.4.1,
RFC 7234 5.5). ``emptyvaluematching=true`` also matches the entities without a value for a
key (PS3.18 8.3.4.5).
``multiplevaluematching=true`` is what matching always does with a ``\\``-separated value of
a text key (PS3.18 8.3.4.6, PS3.4 C.2.2.2.8). A malformed request (unknown attribute, bad
value, bad limit/offset/fuzzymatching/emptyvaluematching/multiplevaluematching, repeated
non-UID key) is a 400 with ``{"error": ...}``; an Accept the service cannot produce (or
refuses with ``q=0``) is a 406. No match is a 200 with ``[]`` (PS3.18 also allows 204; every
client we tried handles ``[]``).

With ``query.dicomweb.source`` naming a ``dimse`` destination, searches become C-FIND on
that PACS instead (:mod:`dicomgate.bridge.dicomweb_bridge`; 502/504 when it fails).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response

from dicomgate.bridge.dicomweb_bridge import bridge_for
from dicomgate.bridge.dimse_upstream import UpstreamFailed
from dicomgate.dicomweb.negotiate import AcceptError, choose_by_quality
from dicomgate.dicomweb.server import PREFIX, problem
from dicomgate.errors import INDEX_UNAVAILABLE, IndexUnavailable
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
    validate,
)
from dicomgate.security.forwarded import FORWARDED_HEADERS

if TYPE_CHECKING:
    from dicomgate.service import Gateway

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
# The most matches one response carries; more are announced in a Warning (PS3.18 8.3.4.4).
MAX_RESULTS = {Level.STUDY: 1000, Level.SERIES: 1000, Level.IMAGE: 10_000}
_RESERVED = {"limit", "offset", "fuzzymatching", "includefield", "accept", "charset"}
# Parameters of PS3.18 Table 8.3.4-1 that are true or false, each given at most once.
_SWITCHES = ("fuzzymatching", "emptyvaluematching", "multiplevaluematching")
# PS3.18 8.3.4.5: a search bridged to C-FIND is answered without it, with this warning.
_NO_EMPTY_VALUE_MATCHING = (
    "The emptyvaluematching parameter is not supported. "
    "Empty Value Matching has not been performed."
)
_TRUNCATED = (
    "The number of results exceeded the maximum supported by the server. "
    "Additional results can be requested."
)


@dataclass(frozen=True)
class _Search:
    """A QIDO-RS request as the index takes it."""

    keys: dict[str, str]  # attribute key -> value
    options: QueryOptions
    capped: bool  # the server's maximum replaced the client's limit (or its absence)
    warnings: list[str]  # for the Warning headers, whatever the index adds


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
            parsed = _parse(request, level, defaults)
            keys, options = parsed.keys, parsed.options
            for name, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
                if uid is not None:
                    if not nameable_uid(uid):
                        raise _BadRequest(400, f"{uid!r} in the path is not a UID")
                    asked = keys.get(name)
                    if asked is not None and uid not in re.split(r"[\\,]", asked):
                        # The path and the query key both constrain the search (PS3.18
                        # 10.6.1): another UID in the query leaves nothing to match.
                        options = dataclasses.replace(options, limit=0)
                    keys[name] = uid
            if bridge is not None:
                # The local search's checks of every key and value (InvalidQuery: 400)
                # before anything goes upstream.
                validate(level, keys, options)
                found, more = bridge.search(level, keys, options)
                result = QueryResult([], [], more)
            else:
                with gateway.index.engine.connect() as connection:
                    result = search(connection, level, keys, options)
        except _BadRequest as error:
            return problem(error.status, error.message)
        except InvalidQuery as error:
            return problem(400, str(error))
        except IndexUnavailable:
            return problem(503, INDEX_UNAVAILABLE)
        except UpstreamFailed as error:
            return problem(error.status, f"upstream {error}")
        warnings = [*parsed.warnings, *result.warnings]
        if result.more and parsed.capped:
            warnings.append(_TRUNCATED)
        if bridge is not None and options.empty_matches:
            warnings.append(_NO_EMPTY_VALUE_MATCHING)  # C-FIND has no such matching
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

    From the scheme and the Host header of the request. Through a proxy listed in
    ``http.trusted_proxies`` those are already its ``X-Forwarded-Proto`` and
    ``X-Forwarded-Host`` (:class:`dicomgate.security.forwarded.ForwardedHeaders`, which
    drops forwarded headers from anyone else). A Host without a port (dicomweb-client sends
    one) gets the port the request arrived on when that is not the scheme's default, unless
    a trusted proxy forwarded it: the port we listen on is then not the client's.
    """
    url = request.base_url
    host = request.headers.get("host", "")
    server = request.scope.get("server")
    proxied = any(name in request.headers for name in FORWARDED_HEADERS)
    if host and ":" not in host.rsplit("]", 1)[-1] and not proxied and server:
        port = int(server[1]) if server[1] is not None else None
        if port is not None and port != {"http": 80, "https": 443}.get(url.scheme):
            host = f"{host}:{port}"
    if not host:
        return str(url).rstrip("/")
    return f"{url.scheme}://{host}{request.scope.get('root_path', '')}".rstrip("/")


def _negotiate(request: Request) -> str:
    """The media type to answer with: application/dicom+json unless the client prefers
    application/json (the ``accept`` parameter, PS3.18 8.3.3.1, wins over the header)."""
    accept = request.query_params.get("accept") or request.headers.get("accept")
    try:
        chosen = choose_by_quality(accept, (DICOM_JSON, "application/json"))
    except AcceptError as error:
        raise _BadRequest(400, str(error)) from None
    if chosen is None:
        raise _BadRequest(
            406,
            f"cannot answer in {accept!r}: QIDO-RS answers application/dicom+json "
            "(or application/json); application/dicom+xml is not supported",
        )
    return chosen


def _parse(request: Request, level: Level, defaults: tuple[Level, ...]) -> _Search:
    """The keys and options of a search, refused with :class:`_BadRequest` (400)."""
    keys: dict[str, str] = {}
    include: list[str] = []
    include_all = False
    switches = dict.fromkeys(_SWITCHES, False)
    limit: int | None = None
    offset = 0
    seen: set[str] = set()
    listed: list[str] = []  # text keys given several values (CT\MR)
    for name, value in request.query_params.multi_items():
        if name in ("limit", "offset", *_SWITCHES) and name in seen:
            raise _BadRequest(400, f"{name} is given more than once")
        seen.add(name)
        if name == "limit":
            limit = _limit(value)
        elif name == "offset":
            offset = _count(name, value)
        elif name in switches:
            if value not in ("true", "false"):
                raise _BadRequest(400, f"{name} must be true or false, not {value!r}")
            switches[name] = value == "true"
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
            if attribute is not None and attribute.vr != "UI" and "\\" in value:
                listed.append(name)
            if key in keys:
                if attribute is None or attribute.vr != "UI":
                    raise _BadRequest(400, f"{name} is given more than once")
                keys[key] = f"{keys[key]}\\{value}"
            else:
                keys[key] = value
    if listed and "multiplevaluematching" in seen and not switches["multiplevaluematching"]:
        # PS3.18 8.3.4.6: "false" asks for a search without Multiple Value Matching, where
        # a backslash (the value delimiter, PS3.5 6.4) has no meaning left: the index
        # cannot match it literally, so this is not a search we can run.
        raise _BadRequest(
            400,
            f"{listed[0]} has several values ('\\'-separated) but multiplevaluematching=false",
        )
    warnings: list[str] = []
    maximum = MAX_RESULTS[level]
    capped = limit is None or limit > maximum
    options = QueryOptions(
        fuzzy=switches["fuzzymatching"],
        empty_matches=switches["emptyvaluematching"],
        limit=maximum if capped else limit,
        offset=offset,
        include=include,
        include_all=include_all,
        default_levels=defaults,
    )
    return _Search(keys, options, capped, warnings)


def _count(name: str, value: str) -> int:
    # ASCII digits only: '²'.isdigit() is True, yet int('²') fails.
    if not (value.isascii() and value.isdecimal()) or len(value) > 9:
        raise _BadRequest(400, f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


def _limit(value: str) -> int:
    """``limit``: any non-negative integer (PS3.18 8.3.4.4, ``uint``); one beyond the
    server's maximum is cut to it, so its size does not matter past 9 digits."""
    if not (value.isascii() and value.isdecimal()):
        raise _BadRequest(400, f"limit must be a non-negative integer, not {value!r}")
    digits = value.lstrip("0") or "0"
    return int(digits) if len(digits) <= 9 else 10**9


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
