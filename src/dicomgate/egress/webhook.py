"""Webhook destination: POST a JSON notification per instance (e.g. to an AI engine).

The receiver fetches the instance back from the gateway with the WADO-RS URL in the
notification. 2xx is delivered; 4xx other than 408 and 429 will not change on retry
(dead-letter); anything else, and any connection problem, is retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httpx

from dicomgate.egress.base import (
    Delivery,
    Outcome,
    exception_reason,
    http_transport,
    read_at_most,
    retry_after_seconds,
)
from dicomgate.egress.models import WebhookDestination
from dicomgate.observability.logging import uid_hash

__all__ = ["WebhookSender", "http_status_retryable", "notification"]

LOGGER = logging.getLogger(__name__)
EVENT = "instance.received"
_MAX_ANSWER = 64 << 10  # bytes of a webhook's answer read (it is not used)


def http_status_retryable(code: int) -> bool:
    """Whether a failed HTTP status may succeed later (RFC 9110 15.5 / 15.6)."""
    return not (400 <= code < 500) or code in (408, 425, 429)


def notification(delivery: Delivery, gateway_base_url: str) -> dict[str, Any]:
    """The JSON body announcing `delivery`."""
    base = gateway_base_url.rstrip("/")
    wado = (
        f"{base}/dicomweb/studies/{delivery.study_instance_uid}"
        f"/series/{delivery.series_instance_uid}/instances/{delivery.sop_instance_uid}"
    )
    return {
        "event": EVENT,
        "route": delivery.route,
        "study_instance_uid": delivery.study_instance_uid,
        "series_instance_uid": delivery.series_instance_uid,
        "sop_instance_uid": delivery.sop_instance_uid,
        "sop_class_uid": delivery.sop_class_uid,
        "wado_rs": wado,
    }


class WebhookSender:
    """Posts notifications to one URL (see the module docstring)."""

    def __init__(
        self,
        name: str,
        model: WebhookDestination,
        *,
        gateway_base_url: str,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: httpx.MockTransport
    ) -> None:
        self.name = name
        self.max_batch = 1
        self.concurrency = model.concurrency
        self._url = model.url
        self._base_url = gateway_base_url
        headers = {"User-Agent": "dicomgate", **model.headers}
        if model.bearer:
            headers["Authorization"] = f"Bearer {model.bearer}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=model.timeout,
            transport=transport or http_transport(model.verify),
        )

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        return list(await asyncio.gather(*(self._post(d) for d in batch)))

    async def _post(self, delivery: Delivery) -> Outcome:
        try:
            async with self._client.stream(
                "POST", self._url, json=notification(delivery, self._base_url)
            ) as response:
                await read_at_most(response, _MAX_ANSWER)  # unused; read to keep the connection
        except httpx.HTTPError as exc:
            return self._failed(delivery, exception_reason(exc), retryable=True)
        if response.is_success:
            return Outcome(delivery.job_id, True)
        code = response.status_code
        return self._failed(
            delivery,
            f"HTTP {code}",
            retryable=http_status_retryable(code),
            retry_after=retry_after_seconds(response),
        )

    def _failed(
        self, delivery: Delivery, error: str, *, retryable: bool, retry_after: float = 0.0
    ) -> Outcome:
        LOGGER.warning(
            "webhook notification failed: %s",
            error,
            extra={
                "event": "egress.webhook_failed",
                "destination": self.name,
                "sop": uid_hash(delivery.sop_instance_uid),
                "retryable": retryable,
            },
        )
        return Outcome(delivery.job_id, False, retryable, error, retry_after=retry_after)

    async def close(self) -> None:
        await self._client.aclose()
