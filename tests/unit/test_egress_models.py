"""Destination config models: defaults, auth shapes, folder templates, build_sender."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from dicomgate.config import parse_config
from dicomgate.egress import build_sender
from dicomgate.egress.base import failure_status_retryable, retry_after_seconds
from dicomgate.egress.dicomweb import DicomwebSender
from dicomgate.egress.dimse import DimseSender
from dicomgate.egress.folder import FolderSender
from dicomgate.egress.models import BasicAuth, DicomwebDestination, HttpAuth
from dicomgate.egress.webhook import WebhookSender
from dicomgate.errors import ConfigError


def _destination(spec: dict[str, Any]) -> Any:
    return parse_config({"destinations": {"d": spec}}, environ={}).destinations["d"]


def test_defaults_match_the_contract() -> None:
    dimse = _destination({"type": "dimse", "ae_title": "PACS", "host": "h"})
    assert (dimse.max_associations, dimse.idle_timeout, dimse.port) == (2, 30.0, 104)
    web = _destination({"type": "dicomweb", "url": "http://h/dicom-web/"})
    assert web.url == "http://h/dicom-web"  # trailing slash dropped: we append /studies
    assert (web.batch_max_instances, web.batch_max_bytes, web.verify) == (50, 64 << 20, True)
    folder = _destination({"type": "folder", "path": "/tmp/x"})
    assert folder.template == "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


@pytest.mark.parametrize(
    ("auth", "parsed"),
    [
        ({"bearer": "tok"}, HttpAuth(bearer="tok")),
        ({"bearer_file": "/run/token"}, HttpAuth(bearer_file=Path("/run/token"))),
        (
            {"basic": {"username": "u", "password": "p"}},
            HttpAuth(basic=BasicAuth("u", "p")),
        ),
    ],
)
def test_auth_shapes(auth: dict[str, Any], parsed: HttpAuth) -> None:
    model = _destination({"type": "dicomweb", "url": "https://h", "auth": auth})
    assert isinstance(model, DicomwebDestination)
    assert model.parsed_auth == parsed


@pytest.mark.parametrize(
    "auth",
    [
        {"bearer": "a", "basic": {"username": "u", "password": "p"}},
        {"token": "x"},
        {"basic": {"username": "u"}},
        {"bearer": ""},
    ],
)
def test_bad_auth_is_a_config_error_naming_the_key(auth: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"destinations\.d\.auth"):
        _destination({"type": "dicomweb", "url": "https://h", "auth": auth})


def test_verify_takes_a_ca_bundle_path() -> None:
    model = _destination({"type": "dicomweb", "url": "https://h", "verify": "/etc/ca.pem"})
    assert model.verify == Path("/etc/ca.pem")
    assert _destination({"type": "dicomweb", "url": "https://h", "verify": False}).verify is False


@pytest.mark.parametrize(
    "template",
    [
        "{PatientNmae}/{SOPInstanceUID}.dcm",
        "../{SOPInstanceUID}.dcm",
        "/abs/{SOPInstanceUID}",
        "{SOPInstanceUID}/",
        "{SOPInstanceUID!r}.dcm",
        "{StudyDate:>10}.dcm",
    ],
)
def test_bad_folder_template_is_a_config_error(template: str) -> None:
    with pytest.raises(ConfigError, match=r"destinations\.d\.template"):
        _destination({"type": "folder", "path": "/x", "template": template})


def test_failure_status_classes() -> None:
    assert failure_status_retryable(0xA700)
    assert failure_status_retryable(0xA7FF)
    assert failure_status_retryable(0x0110)
    assert failure_status_retryable(0x0210)
    assert not failure_status_retryable(0xA900)
    assert not failure_status_retryable(0xC000)
    assert not failure_status_retryable(0xC122)
    assert not failure_status_retryable(0x0122)


def test_build_sender_picks_the_kind(tmp_path: Path) -> None:
    config = parse_config(
        {
            "destinations": {
                "pacs": {"type": "dimse", "ae_title": "PACS", "host": "h", "max_associations": 3},
                "own": {"type": "dimse", "ae_title": "P", "host": "h", "calling_ae_title": "ME"},
                "cloud": {"type": "dicomweb", "url": "https://h", "batch_max_instances": 7},
                "share": {"type": "folder", "path": str(tmp_path)},
                "ai": {"type": "webhook", "url": "https://ai", "concurrency": 5},
            }
        },
        environ={},
    )

    async def build_and_close() -> dict[str, Any]:
        senders = {
            name: build_sender(name, model, calling_ae="GW", gateway_base_url="http://gw")
            for name, model in config.destinations.items()
        }
        for sender in senders.values():
            await sender.close()
        return senders

    senders = asyncio.run(build_and_close())
    assert isinstance(senders["pacs"], DimseSender)
    assert (senders["pacs"].name, senders["pacs"].concurrency) == ("pacs", 3)
    assert senders["pacs"]._calling_ae == "GW"
    assert senders["own"]._calling_ae == "ME"
    assert isinstance(senders["cloud"], DicomwebSender)
    assert senders["cloud"].max_batch == 7
    assert isinstance(senders["share"], FolderSender)
    assert isinstance(senders["ai"], WebhookSender)
    assert senders["ai"].concurrency == 5


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    def answer(status: int, value: str | None) -> httpx.Response:
        return httpx.Response(status, headers={} if value is None else {"Retry-After": value})

    assert retry_after_seconds(answer(429, "120")) == 120.0
    assert retry_after_seconds(answer(503, "0")) == 0.0
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    assert 80 <= retry_after_seconds(answer(503, soon)) <= 90
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    assert retry_after_seconds(answer(429, past)) == 0.0
    for unreadable in (None, "", "soon", "-5", "1.5"):
        assert retry_after_seconds(answer(429, unreadable)) == 0.0, unreadable
    assert retry_after_seconds(answer(500, "120")) == 0.0  # only a 429 or 503 asks to wait
