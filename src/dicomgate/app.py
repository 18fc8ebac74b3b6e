"""The HTTP application: health, the admin API (/api), DICOMweb (/dicomweb), FHIR (/fhir).

Security (IP allow-list, rate and body limits, API keys and JWTs, permissions per path) is
middleware from :mod:`dicomgate.security.middleware`; see docs/security.md.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomgate import __version__
from dicomgate.api import install_api
from dicomgate.dicomweb.server import install_dicomweb, problem
from dicomgate.observability.health import readiness
from dicomgate.observability.http import install_observability
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
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

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
                    "answered": started,
                },
            )
            if started:
                return  # uvicorn closes the connection of an answer left unfinished
            await problem(503, _CUT, headers={"connection": "close"})(scope, receive, send)


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
    install_observability(app, gateway)  # /metrics, /api/audit, HTTP metrics middleware
    install_dicomweb(app, gateway)
    install_ui(app, gateway, jwt_verifier)  # the web console at /ui
    return app
