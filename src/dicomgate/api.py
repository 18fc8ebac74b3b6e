"""Admin API under ``/api``: the delivery queue and the destinations (JSON); `admin`
permission when `http.auth` is set, 127.0.0.1/::1 only when it is not (docs/security.md).

``GET /api/destinations`` lists each destination's state; ``POST
/api/destinations/{name}/pause`` and ``/resume`` stop and restart its deliveries (jobs wait
meanwhile, no attempt spent; the pause lasts until resumed or the gateway restarts).

Errors are JSON bodies ``{"error": "..."}`` with 400 (bad filter, a parameter that is not
an integer), 404 (unknown job or destination) or 409 (job in a state that cannot be
retried); database trouble is 503. A job id beyond the database's 64-bit range is a 404
like any unknown job; an offset beyond it is an empty page (it is clamped, as no table
holds that many rows).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from dicomgate.dicomweb.server import problem
from dicomgate.errors import DicomgateError

if TYPE_CHECKING:
    from dicomgate.egress.dispatcher import Dispatcher
    from dicomgate.queue.jobs import JobQueue


# The largest id or OFFSET the index databases take (SQLite INTEGER, PostgreSQL BIGINT).
MAX_SQL_INTEGER = 2**63 - 1


_ERROR_MEANING = {
    400: "Bad request: a filter or parameter that cannot be understood",
    404: "Not found",
    409: "Conflict: the job is leased or done",
    503: "The index database is unavailable; try again later",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the JSON errors ``{"error": ...}`` it answers, so that
    the OpenAPI document lists them (the ``Error`` schema is added in app.py)."""
    schema = {"$ref": "#/components/schemas/Error"}
    return {
        status: {
            "description": _ERROR_MEANING[status],
            "content": {"application/json": {"schema": schema}},
        }
        for status in statuses
    }


def validation_message(exc: RequestValidationError) -> str:
    """``<param>: <what is wrong>`` for each parameter FastAPI refused (never the value:
    a query value may be patient data)."""
    parts = []
    for error in exc.errors():
        where = [str(p) for p in error.get("loc", ()) if p not in _LOCATIONS]
        what = _WHAT.get(str(error.get("type", "")), str(error.get("msg", "is not valid")))
        parts.append(f"{'.'.join(where) or 'request'}: {what}")
    return "; ".join(dict.fromkeys(parts)) or "malformed request"


_LOCATIONS = {"query", "path", "body", "header", "cookie"}
_WHAT = {
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "missing": "is required",
}


def operator(request: Request) -> dict[str, str]:
    """Who asked for an operator action (``actor``: the user or API key name once
    authenticated; ``source_ip``), for its audit row (docs/observability.md)."""
    client = request.client
    return {
        "actor": str(getattr(request.state, "principal", "") or ""),
        "source_ip": client.host if client else "",
    }


def sql_offset(offset: int) -> int:
    """``offset`` as the database takes it: beyond 64 bits it would fail (OverflowError on
    SQLite), and no table holds that many rows, so the page is empty either way."""
    return min(offset, MAX_SQL_INTEGER)


def known_id(job_id: int) -> bool:
    """Whether ``job_id`` can name a row at all (a bigger one is simply not found)."""
    return 0 < job_id <= MAX_SQL_INTEGER


def queue_router(queue: JobQueue, destinations: Collection[str] | None = None) -> APIRouter:
    """Routes for ``/api/queue`` bound to ``queue`` (sync handlers run in a thread pool);
    ``destinations``: the configured ones (None: any name is taken as known)."""
    router = APIRouter(prefix="/api/queue", tags=["queue"])

    @router.get("", responses=errors(400, 503))
    def list_jobs(
        state: str | None = None,
        destination: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Any:
        """Counts per destination and state, and the jobs matching the filters."""
        if not 1 <= limit <= 1000 or offset < 0:
            return problem(400, "limit must be 1-1000 and offset >= 0")
        try:
            jobs = queue.list(
                state=state, destination=destination, limit=limit, offset=sql_offset(offset)
            )
        except ValueError as exc:
            return problem(400, str(exc))
        counts: dict[str, dict[str, int]] = {}
        for (dest, st), n in queue.counts().items():
            counts.setdefault(dest, {})[st] = n
        return {"counts": counts, "jobs": jobs}

    @router.get("/{job_id}", responses=errors(400, 404, 503))
    def show_job(job_id: int) -> Any:
        """One job, with ``history``: its finished attempts and re-drives, oldest first."""
        row = queue.get(job_id) if known_id(job_id) else None
        if row is None:
            return problem(404, f"no job {job_id}")
        return {**row, "history": queue.history(job_id)}

    @router.post("/{job_id}/retry", responses=errors(400, 404, 409, 503))
    def retry_job(job_id: int, request: Request) -> Any:
        """Re-drive one job now (dead-lettered or waiting), attempts reset."""
        if not known_id(job_id) or queue.get(job_id) is None:
            return problem(404, f"no job {job_id}")
        if not queue.retry(job_id, by=operator(request)):
            return problem(409, f"job {job_id} is leased or done; it cannot be retried")
        return {"retried": job_id}

    @router.post("/retry-dead", responses=errors(404, 503))
    def retry_dead(request: Request, destination: str | None = None) -> Any:
        """Re-drive every dead-lettered job (of ``destination``), attempts reset.

        404 for a destination that is neither configured nor named by any job. One removed
        from the configuration whose jobs are still queued is known: its jobs are re-driven
        and wait until it is configured again (or another node that has it sends them).
        """
        if (
            destination is not None
            and destinations is not None
            and destination not in destinations
            and not any(name == destination for name, _ in queue.counts())
        ):
            return problem(404, f"no destination {destination!r}")
        return {"retried": queue.retry_dead(destination, by=operator(request))}

    @router.delete("", responses=errors(400, 503))
    def purge(state: str = "done", destination: str | None = None) -> Any:
        try:
            return {"deleted": queue.purge(state=state, destination=destination)}
        except ValueError as exc:
            return problem(400, str(exc))

    return router


def destinations_router(dispatcher: Dispatcher) -> APIRouter:
    """Routes for ``/api/destinations``: state, pause and resume (async: the dispatcher
    lives on the event loop)."""
    router = APIRouter(prefix="/api/destinations", tags=["destinations"])

    @router.get("")
    async def list_destinations() -> Any:
        """Per destination: paused, breaker, schedule, delivered and failed counters."""
        return {"destinations": dispatcher.states()}

    @router.post("/{name}/pause", responses=errors(404))
    async def pause(name: str, request: Request) -> Any:
        if not dispatcher.pause(name, by=operator(request)):
            return problem(404, f"no destination {name!r}")
        return {"destination": name, **dispatcher.states()[name]}

    @router.post("/{name}/resume", responses=errors(404))
    async def resume(name: str, request: Request) -> Any:
        if not dispatcher.resume(name, by=operator(request)):
            return problem(404, f"no destination {name!r}")
        return {"destination": name, **dispatcher.states()[name]}

    return router


def install_api(app: FastAPI, queue: JobQueue, dispatcher: Dispatcher | None = None) -> None:
    configured = frozenset(dispatcher.states()) if dispatcher is not None else None
    app.include_router(queue_router(queue, configured))
    if dispatcher is not None:
        app.include_router(destinations_router(dispatcher))

    @app.exception_handler(DicomgateError)
    async def _unavailable(_request: Request, exc: DicomgateError) -> JSONResponse:
        return problem(503, f"index unavailable: {exc}")
