"""STOW-RS client without a network: request shape, response parsing, status handling
(httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from typer.testing import CliRunner

from dicomgate import cli
from dicomgate.cli import _byte_size
from dicomgate.dicomweb.client import StowOptions, upload_paths
from dicomgate.dimse.scu import SendSummary
from dicomgate.egress.base import Delivery, Outcome, tls_verify
from dicomgate.egress.dicomweb import (
    DicomwebSender,
    outcomes_from_response,
    parse_stow_response,
    split_batch,
)
from dicomgate.egress.models import DicomwebDestination


def _deliveries(tmp_path: Path, sizes: list[int]) -> list[Delivery]:
    out = []
    for n, size in enumerate(sizes):
        path = tmp_path / f"f{n}.dcm"
        path.write_bytes(bytes([n % 256]) * size)
        out.append(
            Delivery(
                n,
                path,
                "1.2.840.10008.5.1.4.1.1.4",
                f"1.2.3.{n}",
                "1.2.840.10008.1.2.1",
                "1.2.3",
                "1.2.3.9",
                size,
                "r",
            )
        )
    return out


def _ref(uid: str, warning: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def _failed(uid: str, reason: int) -> dict[str, Any]:
    return {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}


def _body(refs: list[dict[str, Any]], failed: list[dict[str, Any]]) -> bytes:
    doc: dict[str, Any] = {}
    if refs:
        doc["00081199"] = {"vr": "SQ", "Value": refs}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": failed}
    return json.dumps(doc).encode()


def _send(
    tmp_path: Path,
    handler: Callable[[httpx.Request], httpx.Response],
    deliveries: list[Delivery],
    **settings: Any,
) -> list[Outcome]:
    model = DicomwebDestination(type="dicomweb", url="http://stow.test/dw", **settings)

    async def run() -> list[Outcome]:
        sender = DicomwebSender("cloud", model, transport=httpx.MockTransport(handler))
        try:
            return await sender.send(deliveries)
        finally:
            await sender.close()

    return asyncio.run(run())


def test_split_batch_by_count_and_bytes(tmp_path: Path) -> None:
    ds = _deliveries(tmp_path, [10, 10, 10, 100, 10])
    assert [[d.job_id for d in p] for p in split_batch(ds, 2, 1000)] == [[0, 1], [2, 3], [4]]
    assert [[d.job_id for d in p] for p in split_batch(ds, 50, 30)] == [[0, 1, 2], [3], [4]]


def test_request_is_multipart_related_with_every_file(tmp_path: Path) -> None:
    deliveries = _deliveries(tmp_path, [3000, 5, 70000])
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return httpx.Response(200)

    outcomes = _send(tmp_path, handler, deliveries, headers={"X-Site": "a"}, auth={"bearer": "t"})
    assert [o.delivered for o in outcomes] == [True, True, True]
    (request,) = seen
    assert request.url == "http://stow.test/dw/studies"
    ctype = request.headers["content-type"]
    assert ctype.startswith('multipart/related; type="application/dicom"; boundary=')
    assert request.headers["authorization"] == "Bearer t"
    assert request.headers["x-site"] == "a"
    assert "transfer-encoding" not in request.headers
    assert int(request.headers["content-length"]) == len(request.content)
    boundary = ctype.rsplit("boundary=", 1)[1].encode()
    parts = request.content.split(b"--" + boundary)
    assert parts[0] == b"" and parts[-1] == b"--\r\n"
    bodies = [p.split(b"\r\n\r\n", 1)[1][:-2] for p in parts[1:-1]]
    assert bodies == [d.path.read_bytes() for d in deliveries]


def test_partial_response_maps_per_instance(tmp_path: Path) -> None:
    deliveries = _deliveries(tmp_path, [1, 1, 1, 1])
    result = parse_stow_response(
        _body([_ref("1.2.3.0"), _ref("1.2.3.1", 0xB000)], [_failed("1.2.3.2", 0xC000)])
    )
    outcomes = outcomes_from_response(deliveries, 202, result)
    assert outcomes[0] == Outcome(0, True)
    assert outcomes[1].delivered and outcomes[1].warning == "WarningReason 0xB000"
    assert not outcomes[2].delivered and not outcomes[2].retryable
    assert "0xC000" in outcomes[2].error
    assert not outcomes[3].delivered and outcomes[3].retryable  # not in the response


def test_out_of_resources_failure_is_retryable(tmp_path: Path) -> None:
    deliveries = _deliveries(tmp_path, [1])
    result = parse_stow_response(_body([], [_failed("1.2.3.0", 0xA700)]))
    (outcome,) = outcomes_from_response(deliveries, 409, result)
    assert not outcome.delivered and outcome.retryable


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b"{}"])
def test_200_without_usable_body_is_all_delivered(tmp_path: Path, body: bytes) -> None:
    deliveries = _deliveries(tmp_path, [1, 1])
    outcomes = _send(tmp_path, lambda r: httpx.Response(200, content=body), deliveries)
    assert all(o.delivered for o in outcomes)


def test_409_without_detail_isolates_the_bad_instance(tmp_path: Path) -> None:
    deliveries = _deliveries(tmp_path, [1, 2, 3])
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        calls.append(len(request.content))
        # Refuse any request carrying the second file (two bytes of 0x01).
        return httpx.Response(409 if b"\x01\x01" in request.content else 200)

    outcomes = _send(tmp_path, handler, deliveries)
    assert [o.delivered for o in outcomes] == [True, False, True]
    assert outcomes[1].retryable is False and outcomes[1].error == "HTTP 409"
    assert len(calls) == 4  # the batch, then each instance alone


@pytest.mark.parametrize(
    ("code", "retryable"),
    [(500, True), (503, True), (429, True), (401, True), (404, False), (405, False)],
)
def test_whole_request_statuses(tmp_path: Path, code: int, retryable: bool) -> None:
    deliveries = _deliveries(tmp_path, [1, 1])
    outcomes = _send(tmp_path, lambda r: httpx.Response(code), deliveries)
    assert [(o.delivered, o.retryable) for o in outcomes] == [(False, retryable)] * 2
    assert all(f"HTTP {code}" in o.error for o in outcomes)


def test_connection_error_is_retryable(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused")

    outcomes = _send(tmp_path, handler, _deliveries(tmp_path, [1]))
    assert outcomes == [Outcome(0, False, True, "ConnectError: Connection refused")]


def test_missing_file_fails_alone(tmp_path: Path) -> None:
    deliveries = _deliveries(tmp_path, [1, 1])
    deliveries[0].path.unlink()
    outcomes = _send(tmp_path, lambda r: httpx.Response(200), deliveries)
    assert not outcomes[0].delivered and outcomes[0].retryable
    assert "FileNotFoundError" in outcomes[0].error and str(tmp_path) not in outcomes[0].error
    assert outcomes[1].delivered


def test_bearer_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    deliveries = _deliveries(tmp_path, [1])
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200)

    model = DicomwebDestination(
        type="dicomweb", url="http://stow.test", auth={"bearer_file": str(token)}
    )

    async def run() -> None:
        sender = DicomwebSender("cloud", model, transport=httpx.MockTransport(handler))
        await sender.send(deliveries)
        token.write_text("second-token\n")
        await sender.send(deliveries)
        await sender.close()

    asyncio.run(run())
    assert seen == ["Bearer one", "Bearer second-token"]


def test_basic_auth(tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200)

    auth = {"basic": {"username": "u", "password": "p"}}
    _send(tmp_path, handler, _deliveries(tmp_path, [1]), auth=auth)
    assert seen == ["Basic dTpw"]


def test_redirect_is_not_followed_nor_retried(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"Location": "https://stow.test/dw/studies"})

    outcomes = _send(tmp_path, handler, _deliveries(tmp_path, [1, 1]))
    assert [(o.delivered, o.retryable) for o in outcomes] == [(False, False)] * 2
    assert outcomes[0].error == "HTTP 301 redirect to https://stow.test/dw/studies"


def test_verify_true_trusts_the_system_store_and_a_path_its_bundle() -> None:
    import ssl

    import certifi

    system = tls_verify(True)
    assert isinstance(system, ssl.SSLContext) and system.verify_mode == ssl.CERT_REQUIRED
    assert system.cert_store_stats() == ssl.create_default_context().cert_store_stats()
    bundle = tls_verify(Path(certifi.where()))
    assert isinstance(bundle, ssl.SSLContext) and bundle.cert_store_stats()["x509_ca"] > 0
    assert tls_verify(False) is False


# --------------------------------------------------------------------------- send --via dicomweb


def _bundled(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(path)


def _upload(
    paths: list[Path], handler: Callable[[httpx.Request], httpx.Response], **options: Any
) -> SendSummary:
    model = DicomwebDestination(type="dicomweb", url="http://stow.test/dw", concurrency=1)
    stow = StowOptions(model, **{"retries": 2, "retry_wait": 0.01, **options})
    return upload_paths(paths, stow, progress=False, transport=httpx.MockTransport(handler))


def test_upload_retries_server_errors_then_sends(tmp_path: Path) -> None:
    files = [_bundled("CT_small.dcm"), _bundled("MR_small.dcm")]
    (tmp_path / "notes.txt").write_text("not DICOM")
    answers = iter([503, 502])
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request.content.count(b"Content-Type: application/dicom\r\n"))
        return httpx.Response(next(answers, 200))

    summary = _upload([*files, tmp_path], handler)
    assert (summary.sent, summary.failed, summary.skipped) == (2, 0, 1)
    assert seen == [2, 2, 2]


def test_upload_gives_up_after_the_retries_and_names_the_file(tmp_path: Path) -> None:
    file = _bundled("CT_small.dcm")

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused")

    summary = _upload([file], handler, retries=1)
    assert (summary.sent, summary.failed) == (0, 1)
    assert summary.failures == [(str(file), "ConnectError: Connection refused (after 2 attempts)")]


def test_upload_does_not_retry_a_permanent_failure(tmp_path: Path) -> None:
    ct, mr = _bundled("CT_small.dcm"), _bundled("MR_small.dcm")
    mr_uid = str(pydicom.dcmread(mr, stop_before_pixels=True).SOPInstanceUID)
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        ct_uid = str(pydicom.dcmread(ct, stop_before_pixels=True).SOPInstanceUID)
        return httpx.Response(202, content=_body([_ref(ct_uid)], [_failed(mr_uid, 0xC000)]))

    summary = _upload([ct, mr], handler)
    assert (summary.sent, summary.failed) == (1, 1)
    assert summary.failures == [(str(mr), "HTTP 202, FailureReason 0xC000 Cannot Understand")]
    assert len(calls) == 1


def test_byte_sizes() -> None:
    assert _byte_size("--batch-bytes", "64M") == 64 << 20
    assert _byte_size("--batch-bytes", "500k") == 500 << 10
    assert _byte_size("--batch-bytes", "1GiB") == 1 << 30
    assert _byte_size("--batch-bytes", "1048576") == 1048576


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "http://h/dw", "--aec", "PACS"], "--aec: only with --via dimse"),
        (["--to", "h:104", "--token", "t"], "--token: only with --via dicomweb"),
        (["--to", "h:104", "--insecure"], "--insecure: only with --via dicomweb"),
        (["--to", "h:104", "--header", "A:b"], "--header: only with --via dicomweb"),
        (["--via", "dicomweb", "--to", "h:104"], "--to: expected an http:// or https:// URL"),
        (["--via", "dimse", "--to", "http://h/dw"], "--to: expected HOST:PORT"),
        (["--via", "stow", "--to", "h:104"], "--via: expected dimse or dicomweb, got 'stow'"),
        (["--to", "http://h", "--batch", "0"], "--batch: must be at least 1, got 0"),
        (["--to", "http://h", "--retries", "-1"], "--retries: must be at least 0"),
        (["--to", "http://h", "--concurrency", "0"], "--concurrency: must be at least 1"),
        (["--to", "http://h", "--batch-bytes", "lots"], "--batch-bytes: expected a size"),
        (["--to", "http://h", "--header", "novalue"], "--header: expected NAME:VALUE"),
        (["--to", "http://h", "--user", "nopass"], "--user: expected USER:PASSWORD"),
        (["--to", "http://h", "--token", "a", "--user", "u:p"], "give only one"),
        (["--to", "http://h", "--token", " "], "--token: empty token"),
        (["--to", "http://h", "--token-file", "/nonexistent"], "--token-file: /nonexistent"),
        (["--to", "http://h", "--ca-bundle", "/etc/hostname"], "--ca-bundle: /etc/hostname"),
        (["--to", "http://h", "--retry-wait", "0"], "--retry-wait: must be more than 0"),
        (["--to", "http://h", "--timeout", "0"], "--timeout: must be more than 0"),
    ],
)
def test_send_argument_errors_exit_2_with_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli.app, ["send", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dicomgate: "), result.stderr
    assert message in lines[0]


def test_send_ca_bundle_and_insecure_exclude_each_other(tmp_path: Path) -> None:
    import certifi

    args = ["send", str(tmp_path), "--to", "https://h", "--ca-bundle", certifi.where()]
    result = CliRunner().invoke(cli.app, [*args, "--insecure"])
    assert result.exit_code == 2
    assert result.stderr == "dicomgate: --ca-bundle and --insecure: give only one\n"


def test_send_missing_path_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = CliRunner().invoke(cli.app, ["send", str(missing), "--to", "http://h/dw"])
    assert result.exit_code == 2
    assert result.stderr == f"dicomgate: {missing}: no such file or folder\n"
