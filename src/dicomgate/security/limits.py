"""HTTP request limits: body size (413), stalled bodies (408), request rate per client (429).

Bodies are limited in the ASGI layer because STOW-RS streams them (``request.stream()``):
a declared ``Content-Length`` over the limit is refused before a byte is read; a chunked
body is counted as it arrives and cut off when it passes the limit. The app then sees the
client as gone (``http.disconnect``), so STOW-RS discards what it staged and stores nothing,
and the middleware answers 413 and closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomgate.security.asgi import area, client_ip, content_length, has_body, send_json

log = logging.getLogger("dicomgate.security")

_MAX_TRACKED_CLIENTS = 50_000
_LOG_EVERY = 10.0  # seconds: one rate-limit line per client at most this often


def is_stow(scope: Scope) -> bool:
    """A STOW-RS request (``POST /dicomweb/studies[/{study}]``)."""
    path = str(scope.get("path", ""))
    return scope.get("method") == "POST" and (
        path == "/dicomweb/studies" or path.startswith("/dicomweb/studies/")
    )


@dataclass
class _BodyState:
    received: int = 0
    done: bool = False
    refused: int = 0  # 413 or 408 once the body was cut off


class BodyLimitMiddleware:
    """Limits request body size (STOW-RS and the rest separately) and body stalls."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, max_stow_bytes: int, body_timeout: float
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_stow_bytes = max_stow_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            await self.app(scope, receive, send)
            return
        limit = self.max_stow_bytes if is_stow(scope) else self.max_body_bytes
        declared = content_length(scope)
        if limit and declared is not None and declared > limit:
            self._log(scope, 413, declared)
            await send_json(send, 413, "request body too large", close=True)
            return
        state = _BodyState()
        started = False

        async def limited_receive() -> Message:
            if state.refused:
                return {"type": "http.disconnect"}
            if state.done:  # e.g. a streaming response waiting for the client to go away
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                state.refused = 408
                self._log(scope, 408, state.received)
                return {"type": "http.disconnect"}
            if message["type"] != "http.request":
                state.done = True
                return message
            state.received += len(message.get("body", b""))
            if limit and state.received > limit:
                state.refused = 413
                self._log(scope, 413, state.received)
                return {"type": "http.disconnect"}
            if not message.get("more_body", False):
                state.done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if state.refused:
                return  # the app's answer to a body we cut off is replaced by ours
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state.refused:
                raise
            # The app saw the client "disconnect" (Starlette's ClientDisconnect ...).
        if state.refused and not started:
            message = "request body too large" if state.refused == 413 else "request body timeout"
            await send_json(send, state.refused, message, close=True)

    @staticmethod
    def _log(scope: Scope, status: int, size: int) -> None:
        event = "http.body_too_large" if status == 413 else "http.body_timeout"
        log.warning(
            "request body refused",
            extra={
                "event": event,
                "status": status,
                "client_ip": client_ip(scope),
                "method": scope.get("method", ""),
                "area": area(str(scope.get("path", ""))),
                "bytes": size,
            },
        )


class TokenBuckets:
    """One token bucket per client: ``rate`` tokens per second, at most ``burst`` saved up.

    :meth:`take` spends a token and returns 0, or returns the seconds until one is there.
    Pure and clock-driven, so it is unit-tested with a fake clock.
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def take(self, client: str) -> float:
        now = self.clock()
        tokens, at = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._store(client, tokens - 1.0, now)
            return 0.0
        self._store(client, tokens, now)
        return (1.0 - tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)

    def _store(self, client: str, tokens: float, now: float) -> None:
        if client not in self._buckets and len(self._buckets) >= _MAX_TRACKED_CLIENTS:
            self._forget_full(now)
        self._buckets[client] = (tokens, now)

    def _forget_full(self, now: float) -> None:
        """Drop clients whose bucket has filled up again (they lose nothing)."""
        refill = self.burst / self.rate
        self._buckets = {c: (t, at) for c, (t, at) in self._buckets.items() if now - at < refill}
        if len(self._buckets) >= _MAX_TRACKED_CLIENTS:  # a flood of addresses: start over
            self._buckets.clear()


class RateLimitMiddleware:
    """Answers 429 with ``Retry-After`` to a client over its request rate."""

    def __init__(self, app: ASGIApp, buckets: TokenBuckets) -> None:
        self.app = app
        self.buckets = buckets
        self._logged: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = client_ip(scope)
        wait = self.buckets.take(client)
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        now = time.monotonic()
        if now - self._logged.get(client, float("-inf")) >= _LOG_EVERY:
            if len(self._logged) > _MAX_TRACKED_CLIENTS:
                self._logged.clear()
            self._logged[client] = now
            log.warning(
                "client over its request rate",
                extra={"event": "http.rate_limited", "status": 429, "client_ip": client},
            )
        retry_after = str(max(1, math.ceil(wait))).encode()
        await send_json(
            send,
            429,
            "too many requests",
            [(b"retry-after", retry_after)],
            close=has_body(scope),
        )
