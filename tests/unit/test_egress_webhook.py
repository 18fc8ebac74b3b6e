"""Webhook destination without a network (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from dicomgate.egress.base import Delivery, Outcome
from dicomgate.egress.models import WebhookDestination
from dicomgate.egress.webhook import WebhookSender

DELIVERY = Delivery(
    3,
    Path("/x"),
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.3.4",
    "1.2.840.10008.1.2.1",
    "1.2.3",
    "1.2.3.1",
    10,
    "to-ai",
)


def _send(code: int, requests: list[httpx.Request] | None = None) -> Outcome:
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        if requests is not None:
            requests.append(request)
        return httpx.Response(code)

    model = WebhookDestination(
        type="webhook", url="http://ai.test/hook", bearer="sekret", headers={"X-Engine": "lung"}
    )

    async def run() -> Outcome:
        sender = WebhookSender(
            "ai", model, gateway_base_url="http://gw:8080/", transport=httpx.MockTransport(handler)
        )
        (outcome,) = await sender.send([DELIVERY])
        await sender.close()
        return outcome

    return asyncio.run(run())


def test_notification_body_and_headers() -> None:
    requests: list[httpx.Request] = []
    assert _send(204, requests) == Outcome(3, True)
    (request,) = requests
    assert request.method == "POST"
    assert request.headers["authorization"] == "Bearer sekret"
    assert request.headers["x-engine"] == "lung"
    assert json.loads(request.content) == {
        "event": "instance.received",
        "route": "to-ai",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.1",
        "sop_instance_uid": "1.2.3.4",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "wado_rs": "http://gw:8080/dicomweb/studies/1.2.3/series/1.2.3.1/instances/1.2.3.4",
    }


@pytest.mark.parametrize(
    ("code", "retryable"), [(400, False), (404, False), (408, True), (429, True), (500, True)]
)
def test_failure_statuses(code: int, retryable: bool) -> None:
    assert _send(code) == Outcome(3, False, retryable, f"HTTP {code}")
