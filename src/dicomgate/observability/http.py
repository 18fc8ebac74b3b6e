"""ASGI middleware: HTTP request metrics by route template, and audit rows for DICOMweb
queries and retrievals.

The route label is the matched route's template (``/dicomweb/studies/{study}/series``),
never the raw path: paths hold UIDs (PHI, and unbounded label values). A request answered
before routing (a 401 or 403 of the authentication middleware) is matched against the
app's route templates here; requests that match none are counted under ``<unmatched>``.

Reading the audit trail (``GET /api/audit``) is itself audited: an ``audit.read`` row
(DICOM "Audit Log Used", PS3.15 A.5.3.2).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.routing import BaseRoute, Mount, Router, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomgate.observability.audit import FAILURE, SUCCESS, AuditEvent, AuditTrail
from dicomgate.observability.audit_api import audit_router
from dicomgate.observability.metrics import Metrics

if TYPE_CHECKING:
    from dicomgate.service import Gateway

UNMATCHED = "<unmatched>"
AUDIT_PATH = "/api/audit"
# Sub-resources a viewer fetches by the hundred after it retrieved the metadata: not
# audited one by one (the metadata or instance retrieval before them is).
_NOT_AUDITED = ("/frames/", "/bulkdata/", "/thumbnail", "/rendered")
# Request-scope keys where authentication may leave who the caller is (issue #7 auth).
_PRINCIPAL_KEYS = ("principal", "user", "api_key", "key_name", "subject")


def _principal(scope: Scope) -> str:
    state = scope.get("state") or {}
    for key in _PRINCIPAL_KEYS:
        value: Any = state.get(key) if isinstance(state, dict) else None
        if value:
            return str(getattr(value, "name", None) or value)[:64]
    return ""


def _template(scope: Scope, route: Any) -> str:
    """The matched route's full template. FastAPI keeps a router included with a prefix
    as a whole (its routes' ``path`` lacks the prefix): the prefix is in its context."""
    path = str(getattr(route, "path", "") or "")
    if not path:
        return UNMATCHED
    extension = scope.get("fastapi")
    included = extension.get("included_router") if isinstance(extension, dict) else None
    prefix = str(getattr(getattr(included, "include_context", None), "prefix", "") or "")
    if prefix and not path.startswith(prefix + "/") and path != prefix:
        path = prefix + path
    return path


RouteTable = list[tuple[re.Pattern[str], str]]


def route_table(routes: Sequence[BaseRoute], prefix: str = "") -> RouteTable:
    """(path regex, template) of every route of ``routes``, included routers flattened
    (their prefix kept in their include context, as in :func:`_template`), in the order
    the router tries them."""
    table: RouteTable = []
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            context = getattr(route, "include_context", None)
            inner = prefix + str(getattr(context, "prefix", "") or "")
            table += route_table(original.routes, inner)
            continue
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        if isinstance(route, Mount):
            table += route_table(route.routes, prefix + path) if route.routes else []
            path = path.rstrip("/") + "/{path:path}"
        regex, template, _ = compile_path(prefix + path)
        table.append((regex, template))
    return table


class ObservabilityMiddleware:
    """Counts every HTTP request and audits DICOMweb/FHIR reads (``query``, ``retrieve``)
    and reads of the audit trail (``audit.read``)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        audit: AuditTrail | None = None,
        router: Router | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.audit = audit
        self._router = router
        self._table: RouteTable | None = None

    def _unrouted(self, scope: Scope) -> str:
        """The template of a request answered before routing (authentication refused it):
        the first route whose path matches, as the router would have chosen. The table is
        built once, at the first such request (every route exists by then)."""
        if self._router is None:
            return UNMATCHED
        if self._table is None:
            self._table = route_table(self._router.routes)
        path = str(scope.get("path", ""))
        for regex, template in self._table:
            if regex.match(path):
                return template
        return UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception before the response starts is answered 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self._observe(scope, status, time.perf_counter() - started)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = _template(scope, route)
        if route is None and status in (401, 403):
            template = self._unrouted(scope)
        method = str(scope.get("method", "GET"))
        m = self.metrics
        m.http_requests.labels(method, template, str(status)).inc()
        m.http_seconds.labels(method, template).observe(seconds)
        if template == AUDIT_PATH and method == "GET" and status not in (401, 403):
            self._audit_read(scope, status)  # a 401/403 is an auth.denied row already
        if route is None or (method != "GET" and not template.endswith("/_search")):  # FHIR POST
            return
        tags = [str(t) for t in getattr(route, "tags", None) or []]
        if "QIDO-RS" in tags or "FHIR" in tags:
            kind, service = "query", "qido" if "QIDO-RS" in tags else "fhir"
        elif any(t.startswith("WADO") for t in tags):
            kind, service = "retrieve", "wado"  # WADO-RS and WADO-URI, frames included
        else:
            return
        m.queries.labels(service, "answered" if status < 400 else "refused").inc()
        if self.audit is None or (
            kind == "retrieve" and any(part in template for part in _NOT_AUDITED)
        ):
            return
        params = scope.get("path_params") or {}
        client = scope.get("client")
        study = params.get("study") or params.get("study_id")
        query = scope.get("query_string", b"").decode("latin-1")
        detail: dict[str, Any] = {"method": method, "status": status}
        if query:
            detail["query"] = query[:2000]  # search keys: PHI, audit-only
        if params:
            detail["params"] = dict(params)
        self.audit.record(
            AuditEvent(
                event=kind,
                outcome=SUCCESS if status < 400 else FAILURE,
                actor=_principal(scope),
                source_ip=str(client[0]) if client else "",
                object=template,
                study_uid=str(study) if study else None,
                detail=detail,
            )
        )

    def _audit_read(self, scope: Scope, status: int) -> None:
        """``audit.read``: who read the audit trail, with which filters (PHI: a patient
        ID may be one), and the answer's status."""
        if self.audit is None:
            return
        client = scope.get("client")
        query = scope.get("query_string", b"").decode("latin-1")
        detail: dict[str, Any] = {"status": status}
        if query:
            detail["query"] = query[:2000]
        self.audit.record(
            AuditEvent(
                event="audit.read",
                outcome=SUCCESS if status < 400 else FAILURE,
                actor=_principal(scope),
                source_ip=str(client[0]) if client else "",
                object=AUDIT_PATH,
                detail=detail,
            )
        )


def install_observability(app: FastAPI, gateway: Gateway) -> None:
    """``/metrics``, ``/api/audit`` and the request middleware on ``app``.

    The audit router lives under ``/api`` like the queue's, so the admin permission that
    protects ``/api`` protects it. Call this after any authentication middleware is added,
    so that this middleware is the outermost and counts refused requests too.
    """
    obs = gateway.observability
    metrics = obs.metrics
    if obs.audit is not None:
        app.include_router(audit_router(obs.audit))
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, audit=obs.audit, router=app.router)
    if not obs.metrics_config.enabled:
        return

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        """Prometheus exposition (text format 0.0.4)."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


__all__ = ["ObservabilityMiddleware", "install_observability", "route_table"]
