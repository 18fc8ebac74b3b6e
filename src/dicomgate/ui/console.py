"""The console's pages under ``/ui``: Overview, Queue, Studies, Routes (dry-run), Audit.

Server-rendered HTML (escaped f-strings, no template engine), one CSS and one small script
served from the package; every action is a POST form with a CSRF token and answers with a
303 back to its page. Permissions are the API's (see :mod:`dicomgate.ui.access`).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import io
import json
import secrets
from collections.abc import Callable, Coroutine
from html import escape
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

import pydicom
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from dicomgate import __version__
from dicomgate.api import known_id, validation_message
from dicomgate.errors import IndexUnavailable
from dicomgate.index.schema import instance
from dicomgate.observability.audit import AuditQuery
from dicomgate.observability.audit_api import _time
from dicomgate.routing.explain import explain, header_diff, run_pipeline
from dicomgate.routing.matcher import RECEIVED_VIA, MatchContext
from dicomgate.security.http_auth import ApiKeyStore
from dicomgate.ui import data
from dicomgate.ui.access import SESSION_COOKIE, cookie_value, csrf_ok, csrf_token
from dicomgate.ui.signin import SIGN_IN_ERRORS, check_sign_in

if TYPE_CHECKING:
    from pydicom import Dataset

    from dicomgate.security.oidc import JwtVerifier
    from dicomgate.service import Gateway

_PAGES: tuple[tuple[str, str], ...] = (
    ("/ui", "Overview"),
    ("/ui/queue", "Queue"),
    ("/ui/studies", "Studies"),
    ("/ui/routes", "Routes"),
    ("/ui/audit", "Audit"),
)
_STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
_MAX_UPLOAD = 64 * 1024 * 1024


def e(value: object) -> str:
    """HTML-escaped text of ``value`` ("" for None)."""
    return escape("" if value is None else str(value), quote=True)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _table(headers: list[str], rows: list[list[str]], caption: str = "", empty: str = "") -> str:
    """A table; cells are already HTML."""
    head = "".join(f'<th scope="col">{e(h)}</th>' for h in headers)
    if not rows:
        return f'<p class="empty">{e(empty or "Nothing to show.")}</p>'
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{e(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Console:
    """The pages of one gateway; ``secret`` signs the CSRF tokens (new at each start)."""

    def __init__(
        self, gateway: Gateway, secret: bytes, jwt_verifier: JwtVerifier | None = None
    ) -> None:
        self.gateway = gateway
        self.secret = secret
        self.jwt_verifier = jwt_verifier
        auth = gateway.config.http.auth
        self.keys = ApiKeyStore(auth.api_keys) if auth is not None else None
        self.secure_cookie = gateway.config.http.tls is not None

    # -- page frame ---------------------------------------------------------------------

    def token(self, request: Request) -> str:
        return csrf_token(self.secret, cookie_value(request.scope))

    def hidden_token(self, request: Request) -> str:
        return f'<input type="hidden" name="csrf" value="{self.token(request)}">'

    def page(self, request: Request, title: str, body: str, status: int = 200) -> HTMLResponse:
        path = request.url.path
        nav = "".join(
            f'<li><a href="{href}"{" aria-current=page" if path == href else ""}>{label}</a></li>'
            for href, label in _PAGES
        )
        logout = ""
        if self.keys is not None and cookie_value(request.scope):
            logout = (
                f'<form method="post" action="/ui/logout" class="logout">'
                f'{self.hidden_token(request)}<button type="submit">Sign out</button></form>'
            )
        html = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} - dicomgate</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/ui/static/console.css">
<script src="/ui/static/console.js" defer></script>
</head><body>
<header><span class="brand">dicomgate {e(__version__)}</span>
<nav aria-label="Console"><ul>{nav}</ul></nav>{logout}</header>
<main id="main"><h1>{e(title)}</h1>{body}</main>
</body></html>"""
        return HTMLResponse(
            html,
            status_code=status,
            headers={
                "content-security-policy": (
                    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
                ),
                "x-content-type-options": "nosniff",
                "cache-control": "no-store",
            },
        )

    async def form(self, request: Request) -> dict[str, Any]:
        """The fields of a urlencoded or multipart body (file fields as bytes)."""
        body = await request.body()
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {kind}\r\n\r\n".encode("latin-1") + body
            )
            fields: dict[str, Any] = {}
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if not isinstance(name, str):
                    continue
                payload = part.get_payload(decode=True)
                if not isinstance(payload, bytes):
                    payload = b""
                is_file = part.get_filename() is not None
                fields[name] = payload if is_file else payload.decode("utf-8", "replace")
            return fields
        parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] for k, v in parsed.items()}

    def csrf_failed(self, request: Request, fields: dict[str, Any]) -> bool:
        presented = fields.get("csrf")
        session = cookie_value(request.scope)
        return not isinstance(presented, str) or not csrf_ok(self.secret, session, presented)

    def refused(self, request: Request) -> HTMLResponse:
        body = '<p class="error" role="alert">The form expired; reload the page and retry.</p>'
        return self.page(request, "Form expired", body, status=403)

    # -- overview -----------------------------------------------------------------------

    def overview_fragment(self, view: dict[str, Any]) -> str:
        disk = view["disk"]
        index = view.get("index", "ok")
        alert = "" if index == "ok" else _unavailable_alert(index.removeprefix("unavailable: "))
        received = [
            [e(r["source_ae"]), e(r["via"]), str(r["instances"]), e(_size(r["bytes"]))]
            for r in view["received_last_hour"] or []
        ]
        states = []
        for d in view["destinations"]:
            name = quote(d["destination"])
            breaker = f'<span class="state-{e(d["breaker"])}">{e(d["breaker"])}</span>'
            queued = "?" if d["pending"] is None else str(d["pending"] + d["leased"])
            dead = "?" if d["dead"] is None else str(d["dead"])
            states.append(
                [
                    f'<a href="/ui/queue?destination={name}">{e(d["destination"])}</a>',
                    queued,
                    f'<span class="{"bad" if d["dead"] else ""}">{dead}</span>',
                    e(d["oldest_job"] or "-"),
                    e(d["last_success"] or "-"),
                    e(f"{d['last_error_at']}: {d['last_error'][:120]}" if d["last_error"] else "-"),
                    breaker,
                    e(d["schedule"]),
                ]
            )
        unknown = disk["instances"] is None
        return (
            f'{alert}<p class="stamp">As of {e(view["generated_at"])}</p>'
            '<section aria-labelledby="h-now"><h2 id="h-now">Now</h2><dl class="figures">'
            f"<div><dt>Associations</dt><dd>{view['associations']}</dd></div>"
            f"<div><dt>Stored instances</dt><dd>{'?' if unknown else disk['instances']}</dd></div>"
            "<div><dt>Store size</dt>"
            f"<dd>{'?' if unknown else e(_size(disk['store_bytes']))}</dd></div>"
            f"<div><dt>Disk used</dt><dd>{disk['disk_used_percent']}% "
            f"({e(_size(disk['disk_free_bytes']))} free)</dd></div></dl></section>"
            '<section aria-labelledby="h-recv"><h2 id="h-recv">Received in the last hour</h2>'
            + _table(
                ["Source AE", "Via", "Instances", "Bytes"],
                received,
                empty="Not known: the index database is unavailable."
                if view["received_last_hour"] is None
                else "Nothing received in the last hour.",
            )
            + '</section><section aria-labelledby="h-dest"><h2 id="h-dest">Destinations</h2>'
            + _table(
                [
                    "Destination",
                    "Queued",
                    "Dead",
                    "Oldest job",
                    "Last success",
                    "Last error",
                    "Circuit breaker",
                    "Schedule",
                ],
                states,
                empty="No destinations configured.",
            )
            + "</section>"
        )

    # -- queue --------------------------------------------------------------------------

    def queue_body(self, request: Request, state: str, destination: str, msg: str) -> str:
        queue = self.gateway.queue
        counts: dict[str, dict[str, int]] = {}
        for (dest, st), n in queue.counts().items():
            counts.setdefault(dest, {})[st] = n
        names = sorted(set(counts) | set(self.gateway.config.destinations))
        token = self.hidden_token(request)
        count_rows = []
        for name in names:
            c = counts.get(name, {})
            action = ""
            if c.get("dead"):
                action = (
                    f'<form method="post" action="/ui/queue/retry-dead">{token}'
                    f'<input type="hidden" name="destination" value="{e(name)}">'
                    f'<button type="submit">Retry all dead ({c["dead"]})</button></form>'
                )
            count_rows.append(
                [
                    f'<a href="/ui/queue?destination={quote(name)}">{e(name)}</a>',
                    *(str(c.get(s, 0)) for s in ("pending", "leased", "done", "dead")),
                    action,
                ]
            )
        jobs = queue.list(state=state or None, destination=destination or None, limit=200)
        job_rows = []
        for job in jobs:
            retry = ""
            if job["state"] in ("dead", "pending"):
                retry = (
                    f'<form method="post" action="/ui/queue/{job["id"]}/retry">{token}'
                    f'<button type="submit" aria-label="Retry job {job["id"]}">Retry</button>'
                    "</form>"
                )
            job_rows.append(
                [
                    f'<a href="/ui/queue/{job["id"]}">{job["id"]}</a>',
                    e(job["destination"]),
                    e(job["route"]),
                    f'<span class="state-{e(job["state"])}">{e(job["state"])}</span>',
                    str(job["attempts"]),
                    e(str(job["last_error"] or "")[:120]),
                    e(job["updated_at"]),
                    retry,
                ]
            )
        options = "".join(
            f'<option value="{s}"{" selected" if s == state else ""}>{s or "any"}</option>'
            for s in ("", "pending", "leased", "done", "dead")
        )
        dest_options = "".join(
            f'<option value="{e(n)}"{" selected" if n == destination else ""}>{e(n or "any")}'
            "</option>"
            for n in ["", *names]
        )
        flash = f'<p class="flash" role="status">{e(msg)}</p>' if msg else ""
        purge_dest = "".join(
            f'<option value="{e(n)}">{e(n or "all")}</option>' for n in ["", *names]
        )
        return (
            flash
            + '<section aria-labelledby="h-counts"><h2 id="h-counts">Jobs by destination</h2>'
            + _table(["Destination", "Pending", "Leased", "Done", "Dead", ""], count_rows)
            + '</section><section aria-labelledby="h-jobs"><h2 id="h-jobs">Jobs</h2>'
            '<form method="get" action="/ui/queue" class="filters">'
            f'<label>State <select name="state">{options}</select></label>'
            f'<label>Destination <select name="destination">{dest_options}</select></label>'
            '<button type="submit">Filter</button></form>'
            + _table(
                ["Job", "Destination", "Route", "State", "Attempts", "Last error", "Updated", ""],
                job_rows,
                empty="No jobs match.",
            )
            + '</section><section aria-labelledby="h-purge"><h2 id="h-purge">Purge</h2>'
            f'<form method="post" action="/ui/queue/purge" class="filters" '
            'data-confirm="Delete these jobs for good?">'
            f'{token}<label>State <select name="state"><option value="done">done</option>'
            '<option value="dead">dead</option></select></label>'
            f'<label>Destination <select name="destination">{purge_dest}</select></label>'
            '<label><input type="checkbox" name="confirm" value="yes" required> '
            "I understand the jobs are deleted</label>"
            '<button type="submit" class="danger">Purge</button></form></section>'
        )

    # -- routes -------------------------------------------------------------------------

    def routes_table(self) -> str:
        rows = []
        for route in self.gateway.config.routes:
            flags = [f for f, on in (("final", route.final), ("fallback", route.fallback)) if on]
            rows.append(
                [
                    e(route.name),
                    f"<code>{e(json.dumps(route.match, default=str))}</code>",
                    e(", ".join(route.to)),
                    f"<code>{e(json.dumps(route.pipeline, default=str))}</code>"
                    if route.pipeline
                    else "-",
                    e(route.trigger),
                    e(" ".join(flags) or "-"),
                ]
            )
        return _table(
            ["Route", "Match", "To", "Pipeline", "Trigger", "Flags"],
            rows,
            empty="No routes configured: nothing is forwarded.",
        )

    def dry_run_form(self, request: Request, ctx: MatchContext | None = None) -> str:
        ctx = ctx or MatchContext(received_via="dimse")
        via = "".join(
            f"<option{' selected' if v == ctx.received_via else ''}>{v}</option>"
            for v in RECEIVED_VIA
        )
        return (
            '<section aria-labelledby="h-dry"><h2 id="h-dry">Dry run</h2>'
            '<form method="post" action="/ui/routes/dry-run" enctype="multipart/form-data" '
            f'class="dry-run">{self.hidden_token(request)}'
            '<label>DICOM file <input type="file" name="file" id="dry-file" '
            'aria-describedby="dry-hint"></label>'
            "<label>or a stored instance (SOP Instance UID) "
            '<input type="text" name="sop_instance_uid" size="50"></label>'
            "<fieldset><legend>As if received with</legend>"
            f'<label>Calling AE <input name="calling_ae" value="{e(ctx.calling_ae)}"></label>'
            f'<label>Called AE <input name="called_ae" value="{e(ctx.called_ae)}"></label>'
            f'<label>Source IP <input name="source_ip" value="{e(ctx.source_ip)}"></label>'
            f'<label>Received via <select name="received_via">{via}</select></label>'
            '</fieldset><button type="submit">Test the routes</button></form>'
            '<p id="dry-hint" class="stamp">Nothing is stored or sent. Uploads are limited to '
            f"{e(_size(self.gateway.config.http.limits.max_body_bytes))} "
            "(<code>http.limits.max_body_bytes</code>); test a larger instance once stored, by "
            "its SOP Instance UID.</p></section>"
        )

    def dry_run_result(self, ds: Dataset, ctx: MatchContext) -> str:
        config = self.gateway.config
        explanations = explain(config.routes, ds, ctx)
        rows = []
        for x in explanations:
            checks = "".join(
                f'<li class="{"ok" if c.ok else "no"}"><code>{e(c.key)}</code> '
                f"{'✓' if c.ok else '✗'} wants <code>{e(c.condition)}</code>, "
                f"has <code>{e(c.actual or '(empty)')}</code></li>"
                for c in x.checks
            )
            rows.append(
                [
                    e(x.route),
                    f'<span class="verdict-{x.verdict.replace(" ", "-")}">{e(x.verdict)}</span>',
                    e(", ".join(x.destinations)),
                    e(x.reason) + (f"<ul>{checks}</ul>" if checks else ""),
                ]
            )
        out = (
            '<section aria-labelledby="h-match"><h2 id="h-match">Routes</h2>'
            + _table(["Route", "Verdict", "To", "Why"], rows, caption="Match table", empty="-")
            + "</section>"
        )
        pipelines = self.gateway.dispatcher.pipelines
        for x in explanations:
            if x.verdict != "matched" or not x.has_pipeline:
                continue
            result = run_pipeline(x.route, pipelines.get(x.route), ds)
            out += f'<section class="diff"><h2>Pipeline of {e(x.route)}</h2>'
            if result.error:
                out += f'<p class="error" role="alert">{e(result.error)}</p></section>'
                continue
            for n, output in enumerate(result.outputs, 1):
                diff = header_diff(ds, output)
                rows = [
                    [
                        f"<code>{e(d.tag)}</code>",
                        e(d.keyword),
                        e(d.before),
                        e(d.after),
                        f'<span class="change-{d.change}">{d.change}</span>',
                    ]
                    for d in diff
                ]
                out += _table(
                    ["Tag", "Keyword", "Input", "Output", "Change"],
                    rows,
                    caption=f"Output {n} of {len(result.outputs)}: header changes",
                    empty="The pipeline changed nothing in the header.",
                )
            out += "</section>"
        return out

    def stored_instance(self, sop_instance_uid: str) -> tuple[Dataset, MatchContext] | None:
        i = instance.c
        query = select(i.relpath, i.calling_ae, i.called_ae, i.source_ip, i.received_via).where(
            i.sop_instance_uid == sop_instance_uid, i.is_current
        )
        with self.gateway.index.engine.connect() as connection:
            row = connection.execute(query).first()
        if row is None:
            return None
        ds = pydicom.dcmread(self.gateway.store.path_of(row[0]))
        return ds, MatchContext(row[1], row[2], row[3], row[4])


def _unavailable_alert(reason: str) -> str:
    return (
        '<p class="error" role="alert">The index database is unavailable: '
        f"{e(reason)}. Until it answers, images sent here are refused with a status that"
        " asks the sender to retry (C-STORE 0xA700, STOW-RS 409 with 0xA700), queries answer"
        " 503 or 0xA700, and deliveries wait; nothing already stored is lost.</p>"
    )


def _console_route(console: Console) -> type[APIRoute]:
    """Console routes that answer an HTML page (503, with the reason) when the index
    database is unavailable, instead of the API's JSON error; ``/ui/api/`` keeps JSON."""

    class ConsoleRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    # A page asked with a malformed parameter (/ui/queue/abc): a 400 page,
                    # not the API's JSON error.
                    if request.url.path.startswith("/ui/api/"):
                        raise
                    alert = f'<p class="error" role="alert">{e(validation_message(exc))}</p>'
                    return console.page(request, "Bad request", alert, status=400)
                except IndexUnavailable as exc:
                    if request.url.path.startswith("/ui/api/"):
                        raise
                    body = _unavailable_alert(str(exc))
                    return console.page(request, "Index unavailable", body, status=503)

            return guarded

    return ConsoleRoute


def _read_upload(payload: bytes) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(payload), force=False)
    except InvalidDicomError:
        return pydicom.dcmread(io.BytesIO(payload), force=True)


def console_router(
    gateway: Gateway, secret: bytes, jwt_verifier: JwtVerifier | None = None
) -> APIRouter:
    """The ``/ui`` routes bound to ``gateway`` (``jwt_verifier``: the HTTP stack's, if any)."""
    console = Console(gateway, secret, jwt_verifier)
    router = APIRouter(prefix="/ui", include_in_schema=False, route_class=_console_route(console))

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in _STATIC:
            return JSONResponse({"error": "not found"}, status_code=404)
        text = resources.files("dicomgate.ui").joinpath("static", name).read_bytes()
        return Response(text, media_type=_STATIC[name], headers={"cache-control": "max-age=300"})

    @router.get("/login")
    def login_page(request: Request, next: str = "/ui", error: str = "") -> HTMLResponse:
        """The sign-in form; ``error``: a code of SIGN_IN_ERRORS (anything else is ignored,
        so a link cannot put its own words or status on our page)."""
        if console.keys is None:
            body = "<p>The HTTP interface has no authentication configured: no sign-in.</p>"
            return console.page(request, "Sign in", body + '<p><a href="/ui">Overview</a></p>')
        message, status = SIGN_IN_ERRORS.get(error, ("", 200))
        alert = f'<p class="error" role="alert">{e(message)}</p>' if message else ""
        jwt = console.jwt_verifier is not None
        body = (
            f'{alert}<form method="post" action="/ui/login" class="login">'
            f"{console.hidden_token(request)}"
            f'<input type="hidden" name="next" value="{e(next)}">'
            '<label>API key or access token <input type="password" name="api_key"'
            ' autocomplete="current-password" required autofocus></label>'
            '<button type="submit">Sign in</button></form>'
            "<p>Create a key with <code>dicomgate keys new --scopes read,admin</code>"
            + (", or paste an access token (JWT) from your identity provider" if jwt else "")
            + ".</p>"
        )
        return console.page(request, "Sign in", body, status=status)

    @router.post("/login")
    async def login(request: Request) -> Response:
        fields = await console.form(request)
        if console.csrf_failed(request, fields):
            return console.refused(request)
        target = str(fields.get("next") or "/ui")
        if not target.startswith("/ui") or target.startswith("//"):
            target = "/ui"
        key = str(fields.get("api_key", "")).strip()
        if console.keys is None:
            return login_page(request, next=target, error="no_sign_in")
        verdict = await check_sign_in(request.scope, key, console.keys, console.jwt_verifier)
        if not verdict.accepted:
            return login_page(request, next=target, error=verdict.error)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            key,
            max_age=verdict.max_age,
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=console.secure_cookie,
        )
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        fields = await console.form(request)
        if console.csrf_failed(request, fields):
            return console.refused(request)
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/ui")
        return response

    @router.get("")
    def overview_page(request: Request) -> HTMLResponse:
        body = (
            '<div id="live" data-poll="/ui/overview/live" data-interval="5" aria-live="polite">'
            f"{console.overview_fragment(data.overview(gateway))}</div>"
        )
        return console.page(request, "Overview", body)

    @router.get("/overview/live")
    def overview_live() -> HTMLResponse:
        html = console.overview_fragment(data.overview(gateway))
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    @router.get("/api/overview")
    def overview_json() -> dict[str, Any]:
        return data.overview(gateway)

    @router.get("/queue")
    def queue_page(
        request: Request, state: str = "", destination: str = "", msg: str = ""
    ) -> HTMLResponse:
        if state not in ("", "pending", "leased", "done", "dead"):
            body = '<p class="error" role="alert">Unknown state.</p>'
            return console.page(request, "Queue", body, status=400)
        return console.page(request, "Queue", console.queue_body(request, state, destination, msg))

    @router.get("/queue/{job_id}")
    def job_page(request: Request, job_id: int) -> HTMLResponse:
        job = gateway.queue.get(job_id) if known_id(job_id) else None
        if job is None:
            return console.page(request, f"Job {job_id}", "<p>No such job.</p>", status=404)
        fields = "".join(f"<div><dt>{e(k)}</dt><dd>{e(v)}</dd></div>" for k, v in job.items())
        rows = [
            [
                str(a["attempt"]),
                f'<span class="outcome-{e(a["outcome"])}">{e(a["outcome"])}</span>',
                e(a["started_at"]),
                e(a["finished_at"]),
                e(a["node"] or "-"),
                e(a["error"] or ""),
            ]
            for a in gateway.queue.history(job_id)
        ]
        history = (
            '<section aria-labelledby="h-history"><h2 id="h-history">History</h2>'
            + _table(
                ["Attempt", "Outcome", "Started", "Finished", "Node", "Error"],
                rows,
                caption="Attempts and re-drives, oldest first",
                empty="No attempt has finished yet.",
            )
            + f'<p><a href="/ui/audit?study={quote(str(job["study_instance_uid"]))}">'
            "The study in the audit trail</a></p></section>"
        )
        retry = ""
        if job["state"] in ("dead", "pending"):
            retry = (
                f'<form method="post" action="/ui/queue/{job_id}/retry">'
                f'{console.hidden_token(request)}<button type="submit">Retry now</button></form>'
            )
        body = f'<dl class="job">{fields}</dl>{retry}{history}'
        return console.page(request, f"Job {job_id}", body)

    def back(msg: str, destination: str = "") -> RedirectResponse:
        query = {"msg": msg, **({"destination": destination} if destination else {})}
        return RedirectResponse(f"/ui/queue?{urlencode(query)}", status_code=303)

    @router.post("/queue/retry-dead")
    async def retry_dead(request: Request) -> Response:
        fields = await console.form(request)
        if console.csrf_failed(request, fields):
            return console.refused(request)
        destination = str(fields.get("destination") or "") or None
        n = await asyncio.to_thread(gateway.queue.retry_dead, destination)
        gateway.dispatcher.notify(
            [destination] if destination else list(gateway.config.destinations)
        )
        return back(f"{n} dead-lettered jobs queued again", destination or "")

    @router.post("/queue/purge")
    async def purge(request: Request) -> Response:
        fields = await console.form(request)
        if console.csrf_failed(request, fields):
            return console.refused(request)
        state = str(fields.get("state", ""))
        if fields.get("confirm") != "yes" or state not in ("done", "dead"):
            return back("Nothing purged: tick the confirmation and choose done or dead.")
        destination = str(fields.get("destination") or "") or None
        n = await asyncio.to_thread(gateway.queue.purge, state=state, destination=destination)
        return back(f"{n} {state} jobs deleted")

    @router.post("/queue/{job_id}/retry")
    async def retry(request: Request, job_id: int) -> Response:
        fields = await console.form(request)
        if console.csrf_failed(request, fields):
            return console.refused(request)
        job = await asyncio.to_thread(gateway.queue.get, job_id) if known_id(job_id) else None
        ok = job is not None and await asyncio.to_thread(gateway.queue.retry, job_id)
        if job is not None:
            gateway.dispatcher.notify([str(job["destination"])])
        return back(f"job {job_id} queued again" if ok else f"job {job_id} cannot be retried")

    @router.get("/studies")
    def studies_page(request: Request) -> HTMLResponse:
        rows = []
        for s in data.recent_studies(gateway):
            deliveries = "".join(
                f"<li>{e(dest)}: "
                + ", ".join(f'<span class="state-{e(k)}">{e(k)} {v}</span>' for k, v in st.items())
                + "</li>"
                for dest, st in sorted(s["deliveries"].items())
            )
            rows.append(
                [
                    f"<code>{e(s['study_instance_uid'])}</code>",
                    e(s["study_date"]),
                    e(" ".join(s["modalities"])),
                    e(s["study_description"]),
                    e(s["last_received_at"]),
                    f"<ul>{deliveries}</ul>" if deliveries else "not routed",
                ]
            )
        body = _table(
            ["Study Instance UID", "Date", "Modalities", "Description", "Last received", "Sent to"],
            rows,
            empty="No studies stored yet.",
        )
        return console.page(request, "Studies", body)

    @router.get("/routes")
    def routes_page(request: Request) -> HTMLResponse:
        body = console.routes_table() + console.dry_run_form(request)
        return console.page(request, "Routes", body)

    @router.post("/routes/dry-run")
    async def dry_run(request: Request) -> Response:
        fields = await console.form(request)
        if console.csrf_failed(request, fields):
            return console.refused(request)
        ctx = MatchContext(
            calling_ae=str(fields.get("calling_ae", "")).strip(),
            called_ae=str(fields.get("called_ae", "")).strip(),
            source_ip=str(fields.get("source_ip", "")).strip(),
            received_via=str(fields.get("received_via") or "dimse"),
        )
        upload = fields.get("file")
        uid = str(fields.get("sop_instance_uid", "")).strip()
        problem = ""
        ds: Dataset | None = None
        if ctx.received_via not in RECEIVED_VIA:
            problem = "Received via must be one of " + ", ".join(RECEIVED_VIA)
        elif isinstance(upload, bytes) and upload:
            try:
                ds = await asyncio.to_thread(_read_upload, upload)
            except Exception as exc:  # any parse failure of an uploaded file is the user's
                problem = f"Not a DICOM file: {type(exc).__name__}"
        elif uid:
            found = await asyncio.to_thread(console.stored_instance, uid)
            if found is None:
                problem = "No stored instance has this SOP Instance UID."
            else:
                ds, stored_ctx = found
                if not (ctx.calling_ae or ctx.called_ae or ctx.source_ip):
                    ctx = stored_ctx
        else:
            problem = "Choose a DICOM file or give a stored instance's SOP Instance UID."
        body = console.routes_table() + console.dry_run_form(request, ctx)
        if ds is None:
            alert = f'<p class="error" role="alert">{e(problem)}</p>'
            return console.page(request, "Routes", alert + body, status=400)
        result = await asyncio.to_thread(console.dry_run_result, ds, ctx)
        return console.page(request, "Routes: dry run", result + body)

    @router.get("/audit")
    def audit_page(
        request: Request,
        event: str = "",
        actor: str = "",
        study: str = "",
        outcome: str = "",
        since: str = "",
        until: str = "",
    ) -> HTMLResponse:
        trail = gateway.observability.audit
        filters = (
            '<form method="get" action="/ui/audit" class="filters">'
            f'<label>Event <input name="event" value="{e(event)}" placeholder="delivery."></label>'
            f'<label>Actor <input name="actor" value="{e(actor)}"></label>'
            f'<label>Study UID <input name="study" value="{e(study)}"></label>'
            '<label>Outcome <select name="outcome">'
            + "".join(
                f'<option value="{o}"{" selected" if o == outcome else ""}>{o or "any"}</option>'
                for o in ("", "success", "failure")
            )
            + "</select></label>"
            f'<label>Since <input name="since" value="{e(since)}" placeholder="2026-01-31T08:00">'
            f'</label><label>Until <input name="until" value="{e(until)}"></label>'
            '<button type="submit">Filter</button></form>'
        )
        if trail is None:
            body = filters + "<p>The audit trail is disabled (audit.enabled: false).</p>"
            return console.page(request, "Audit", body)
        try:
            query = AuditQuery(
                since=_time("since", since),
                until=_time("until", until),
                event=event or None,
                actor=actor or None,
                study=study or None,
                outcome=outcome if outcome in ("success", "failure") else None,
                limit=200,
            )
        except ValueError as exc:
            alert = f'<p class="error" role="alert">{e(exc)}</p>'
            return console.page(request, "Audit", alert + filters, status=400)
        rows = [
            [
                e(ev["time"]),
                e(ev["event"]),
                f'<span class="outcome-{e(ev["outcome"])}">{e(ev["outcome"])}</span>',
                e(ev.get("actor")),
                f"<code>{e(ev.get('study_uid') or '')}</code>",
                f"<code>{e(json.dumps(ev['detail'], default=str)[:200])}</code>",
            ]
            for ev in trail.query(query)
        ]
        table = _table(
            ["Time", "Event", "Outcome", "Actor", "Study", "Detail"],
            rows,
            empty="No audit events match.",
        )
        return console.page(request, "Audit", filters + table)

    return router


def install_ui(app: FastAPI, gateway: Gateway, jwt_verifier: JwtVerifier | None = None) -> None:
    """Mount the console at ``/ui`` (a new CSRF secret per process)."""
    app.include_router(console_router(gateway, secrets.token_bytes(32), jwt_verifier))
