"""The HTTP application: health, the admin API (/api), DICOMweb (/dicomweb), FHIR (/fhir).

Security (IP allow-list, rate and body limits, API keys and JWTs, permissions per path) is
middleware from :mod:`dicomgate.security.middleware`; see docs/security.md. Forwarded
headers count only from ``http.trusted_proxies`` (:mod:`dicomgate.security.forwarded`);
every GET resource answers HEAD too (:mod:`dicomgate.http_semantics`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomgate import __version__
from dicomgate.api import install_api, validation_message
from dicomgate.dicomweb.server import PREFIX, install_dicomweb, problem
from dicomgate.errors import error_type
from dicomgate.http_semantics import HeadAsGet, VaryOnAccept
from dicomgate.observability.health import readiness
from dicomgate.observability.http import _template, install_observability
from dicomgate.security.forwarded import ForwardedHeaders
from dicomgate.security.http_models import HttpCorsConfig
from dicomgate.security.ip_filter import IpAllowList
from dicomgate.security.middleware import install_http_security
from dicomgate.ui.console import install_ui

if TYPE_CHECKING:
    from dicomgate.service import Gateway

log = logging.getLogger(__name__)

_CUT = (
    "the gateway is stopping and this request did not finish within http.shutdown_grace;"
    " send it again"
)


class _CutAtStop:
    """A request still running ``http.shutdown_grace`` after SIGTERM is cancelled by
    uvicorn, which would answer it 500 and log a traceback. It is answered 503 with a JSON
    error instead (or, when its answer had begun, its connection is closed) and logged as
    one warning. A STOW-RS upload cut while its body arrives keeps nothing;
    one cut while its instances are being stored is stored, as when a client goes away."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watch = _Watched(send)
        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            if not self.gateway.stopping:
                raise
            client = scope.get("client")
            log.warning(
                "HTTP request cut at shutdown (http.shutdown_grace passed)",
                extra={
                    "event": "http.request_cut",
                    "method": scope.get("method", ""),
                    "peer": client[0] if client else "",
                    "answered": watch.started,
                },
            )
            if watch.started:
                return  # uvicorn closes the connection of an answer left unfinished
            await problem(503, _CUT, headers={"connection": "close"})(scope, receive, send)


class _Watched:
    """``send`` of an ASGI request, remembering whether the answer has begun."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


class _InternalError:
    """Any exception a request handler lets escape is answered 500 with the documented
    JSON body ``{"error": "internal error"}`` and logged as one ``http.internal_error``
    line: the exception's type and its traceback's frames, never its text (it may quote a
    value: a patient's name in a query). The exception goes no further: passed on,
    uvicorn would log it again with its text and close the connection, and a client's next
    request on that keep-alive connection would meet a reset. If the answer had begun
    (a stream that failed midway), the connection is left for uvicorn to close."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watch = _Watched(send)
        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            log.error(
                "unexpected %s while answering an HTTP request; answered 500",
                error_type(exc),
                extra={
                    "event": "http.internal_error",
                    "method": scope.get("method", ""),
                    "route": _template(scope, scope.get("route")),
                    "answered": watch.started,
                    "traceback": _frames(exc),
                },
            )
            if not watch.started:
                await problem(500, "internal error")(scope, receive, send)


def _frames(exc: BaseException) -> str:
    """The traceback of ``exc`` on one line, innermost call last: ``file:line function``
    for each frame (paths from the package down), no source text and no values."""
    frames = []
    for frame in traceback.extract_tb(exc.__traceback__)[-20:]:
        path = frame.filename.replace("\\", "/")
        for marker in ("/site-packages/", "/src/"):
            if marker in path:
                path = path.rsplit(marker, 1)[1]
                break
        frames.append(f"{path}:{frame.lineno} {frame.name}")
    return " > ".join(frames)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no route) and 405 (a method the path does not serve, with its
    Allow header) in the documented shape: ``{"error": "not found"}``."""
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status in (204, 304):
        return Response(status_code=status, headers=exc.headers)
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    message = exc.detail if exc.detail and exc.detail != phrase else phrase.lower()
    headers = dict(exc.headers or {})
    if status == 405 and "Allow" in headers:
        headers["Allow"] = _allowed(request) or headers["Allow"]
    return problem(status, message or "error", headers=headers or None)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed(request: Request) -> str:
    """Every method some route serves at this path. Starlette's Allow names only the first
    route whose path matched: ``PUT /api/queue/retry-dead`` said ``Allow: GET`` (the
    ``/api/queue/{job_id}`` route) though the path serves POST. Each method is tried
    against the routes (included routers match as one route, so their routes' own
    ``methods`` cannot be read). A path that serves GET serves HEAD (:class:`HeadAsGet`)."""
    routes = request.app.router.routes
    served = {
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes
        )
    }
    if "GET" in served:
        served.add("HEAD")
    return ", ".join(method for method in _METHODS if method in served)


async def _invalid_parameter(_request: Request, exc: Exception) -> Response:
    """A parameter FastAPI cannot convert (``limit=abc``): 400 ``{"error": "limit: must be
    an integer"}`` as documented, not FastAPI's 422 ``{"detail": [...]}``."""
    assert isinstance(exc, RequestValidationError)
    return problem(400, validation_message(exc))


def _openapi_with_400(app: FastAPI) -> None:
    """The OpenAPI document says what the handlers above answer: a 400 with
    ``{"error": ...}`` where FastAPI would list its 422 validation error."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        error = {"$ref": "#/components/schemas/Error"}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = {
                        "description": "Bad request (a parameter that cannot be understood)",
                        "content": {"application/json": {"schema": error}},
                    }
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        schemas["Error"] = {
            "type": "object",
            "properties": {"error": {"type": "string"}},
            "required": ["error"],
        }
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _framework_telemetry_off() -> dict[str, Any]:
    """FastAPI 0.165 and later trace every request with OpenTelemetry on their own: each
    request asks whether a provider is configured, and ``FASTAPI_OTEL_AUTO_CONFIGURE=true``
    in the environment would export spans and metrics whose attributes hold request paths
    and query strings (study UIDs, patient names in QIDO-RS queries) to an OTLP endpoint
    the gateway's config knows nothing of. dicomgate's own metrics and logs are its
    telemetry (docs/observability.md), so the framework's is switched off. Older FastAPI
    has no such hooks, and no ``telemetry`` argument either."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    off = ("tracing", "metrics", "logs", "operation_spans", "auto_configure")
    return {"telemetry": dict.fromkeys(off, False)}


class _Cors(CORSMiddleware):
    """Starlette's CORS answers, with a refused preflight's 400 in the JSON error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code != 400:
            return answer
        headers = {k: v for k, v in answer.headers.items() if k.startswith("access-control-")}
        reason = bytes(answer.body).decode()  # "Disallowed CORS origin, headers"
        return JSONResponse({"error": reason}, status_code=400, headers=headers)


def _install_cors(app: FastAPI, cors: HttpCorsConfig | None) -> None:
    """CORS answers for the origins of ``http.cors`` (none when unset)."""
    if cors is None:
        return
    app.add_middleware(
        _Cors,
        allow_origins=cors.allow_origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
        allow_headers=cors.allow_headers,
        expose_headers=cors.expose_headers,
        max_age=cors.max_age,
    )


def create_app(gateway: Gateway) -> FastAPI:
    """Build the ASGI app bound to a running :class:`Gateway`."""
    app = FastAPI(
        title="dicomgate",
        version=__version__,
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        redoc_url=None,
        **_framework_telemetry_off(),
    )

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Alive: the process answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Ready: every component answers (docs/observability.md, *Health*)."""
        status, body = readiness(gateway)
        return JSONResponse(body, status_code=status)

    install_api(app, gateway.queue, gateway.dispatcher)
    # Before observability: it stays outermost.
    jwt_verifier = install_http_security(app, gateway.config.http)
    # Outside security, inside observability: a cut request is counted as its 503.
    app.add_middleware(_CutAtStop, gateway=gateway)
    # Outside security: a browser's preflight carries no credentials, and a 401 or 403
    # needs the CORS headers for the page to read it; inside observability: counted.
    _install_cors(app, gateway.config.http.cors)
    install_observability(app, gateway)  # /metrics, /api/audit, HTTP metrics middleware
    install_dicomweb(app, gateway)
    install_ui(app, gateway, jwt_verifier)  # the web console at /ui
    # Every JSON answer in the documented shape, {"error": "..."} (docs/dicomweb.md, api.py).
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_parameter)
    _openapi_with_400(app)
    # Representations chosen by Accept (PS3.18 8.7, 9.3; QIDO-RS JSON or dicom+json).
    app.add_middleware(VaryOnAccept, prefixes=(PREFIX,))
    # An exception no handler took is a JSON 500 and one log line.
    app.add_middleware(_InternalError)
    # Outside all of the above: each sees a HEAD as the GET it is answered as.
    app.add_middleware(HeadAsGet)
    # Outermost: the client address, scheme and host every layer sees (trusted proxies).
    app.add_middleware(ForwardedHeaders, trusted=IpAllowList(gateway.config.http.trusted_proxies))
    return app
