"""``GET /api/audit``: the audit trail, newest first (JSON), which holds PHI.

Access: with ``http.auth``, the ``admin`` permission (:mod:`dicomgate.security.http_auth`);
without it, 127.0.0.1 and ::1 only, like the rest of ``/api``
(:class:`dicomgate.security.ip_filter.LocalAdminMiddleware`, docs/security.md).

Filters (all optional, combined): ``since`` / ``until`` (ISO 8601; a time without offset is
UTC), ``event`` (exact kind, or a prefix ending in ``.`` or ``*``: ``delivery.``),
``actor``, ``study`` (Study Instance UID), ``patient`` (Patient ID), ``outcome``
(``success`` | ``failure``), ``limit`` (1-1000, default 100), ``offset`` (beyond the
database's 64-bit range: an empty page). A bad filter, or a limit or offset that is not an
integer, is 400 with ``{"error": "..."}``; an unavailable database is 503.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter

from dicomgate.api import errors, sql_offset
from dicomgate.dicomweb.server import problem
from dicomgate.errors import IndexUnavailable
from dicomgate.observability.audit import AuditQuery, AuditTrail


def _time(name: str, value: str | None) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 date or time, not {value!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def audit_router(trail: AuditTrail) -> APIRouter:
    """Routes for ``/api/audit`` bound to ``trail`` (sync handler: runs in a thread pool)."""
    router = APIRouter(prefix="/api/audit", tags=["audit"])

    @router.get("", responses=errors(400, 503))
    def list_audit_events(
        since: str | None = None,
        until: str | None = None,
        event: str | None = None,
        actor: str | None = None,
        study: str | None = None,
        patient: str | None = None,
        outcome: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Any:
        """Audit events matching the filters, newest first."""
        if not 1 <= limit <= 1000 or offset < 0:
            return problem(400, "limit must be 1-1000 and offset >= 0")
        if outcome not in (None, "", "success", "failure"):
            return problem(400, "outcome must be success or failure")
        try:
            query = AuditQuery(
                since=_time("since", since),
                until=_time("until", until),
                event=event or None,
                actor=actor,
                study=study or None,
                patient=patient or None,
                outcome=outcome or None,
                limit=limit,
                offset=sql_offset(offset),
            )
        except ValueError as exc:
            return problem(400, str(exc))
        try:
            events = trail.query(query)
        except IndexUnavailable as exc:
            return problem(503, f"index unavailable: {exc}")
        return {"events": events, "limit": limit, "offset": offset}

    return router


__all__ = ["audit_router"]
