"""Folder and webhook destinations with real files and a real HTTP endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from pathlib import Path

import pydicom
from tests.conftest import Corpus, RecordingServer, bundled_file, delivery_of

from dicomgate.egress import build_sender
from dicomgate.egress.base import Outcome
from dicomgate.egress.models import FolderDestination, WebhookDestination


def test_folder_writes_the_template_path_and_overwrites(tmp_path: Path, corpus: Corpus) -> None:
    files = [*corpus.mr("egress-folder", 3, seed=41), bundled_file("CT_small.dcm")]
    out = tmp_path / "share"
    model = FolderDestination(
        type="folder", path=out, template="{PatientID}/{Modality}/{SOPInstanceUID}.dcm"
    )
    mode_before = {f: stat.S_IMODE(f.stat().st_mode) for f in files}

    async def run() -> tuple[list[Outcome], list[Outcome]]:
        sender = build_sender("share", model, calling_ae="GW", gateway_base_url="http://gw")
        try:
            first = await sender.send([delivery_of(f, n) for n, f in enumerate(files)])
            again = await sender.send([delivery_of(files[0], 9)])  # at-least-once repeat
            return first, again
        finally:
            await sender.close()

    first, again = asyncio.run(run())
    assert first == [Outcome(n, True) for n in range(len(files))]
    assert again == [Outcome(9, True)]
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        target = out / str(ds.PatientID) / str(ds.Modality) / f"{ds.SOPInstanceUID}.dcm"
        assert target.read_bytes() == f.read_bytes()
        assert stat.S_IMODE(f.stat().st_mode) == mode_before[f]  # source untouched
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no temporary files left behind
    assert sum(1 for p in out.rglob("*.dcm")) == len(files)


def test_folder_files_are_readable_by_the_folder_s_other_users(tmp_path: Path) -> None:
    """A share or research drop box is read by other programs: files get 0666 less the
    umask, as any file the gateway creates (not tempfile's owner-only 0600)."""
    source = bundled_file("MR_small.dcm")
    out = tmp_path / "share"
    sender = build_sender(
        "share",
        FolderDestination(type="folder", path=out, template="{SOPInstanceUID}.dcm"),
        calling_ae="GW",
        gateway_base_url="http://gw",
    )
    modes = []
    old = os.umask(0o022)
    try:
        for job_id, umask in ((1, 0o022), (2, 0o007)):  # the second one replaces the first
            os.umask(umask)
            assert asyncio.run(sender.send([delivery_of(source, job_id)])) == [
                Outcome(job_id, True)
            ]
            (written,) = out.glob("*.dcm")
            modes.append(stat.S_IMODE(written.stat().st_mode))
    finally:
        os.umask(old)
    assert modes == [0o644, 0o660]
    assert written.read_bytes() == source.read_bytes()


def test_folder_replaces_an_existing_file_atomically(tmp_path: Path) -> None:
    source = bundled_file("MR_small.dcm")
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    out = tmp_path / "share"
    target = out / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"an older, different copy")
    old_inode = target.stat().st_ino
    sender = build_sender(
        "share",
        FolderDestination(type="folder", path=out),
        calling_ae="GW",
        gateway_base_url="http://gw",
    )
    assert asyncio.run(sender.send([delivery_of(source, 1)])) == [Outcome(1, True)]
    assert target.read_bytes() == source.read_bytes()
    assert target.stat().st_ino != old_inode  # renamed over, never rewritten in place
    assert os.listdir(target.parent) == [target.name]


def test_webhook_posts_the_notification(http_server: RecordingServer) -> None:
    source = bundled_file("CT_small.dcm")
    model = WebhookDestination(type="webhook", url=http_server.url + "/hook", bearer="abc")

    async def run() -> list[Outcome]:
        sender = build_sender("ai", model, calling_ae="GW", gateway_base_url="http://gw:8080")
        try:
            return await sender.send([delivery_of(source, 4)])
        finally:
            await sender.close()

    assert asyncio.run(run()) == [Outcome(4, True)]
    (request,) = http_server.requests
    assert request.path == "/hook"
    assert request.headers["authorization"] == "Bearer abc"
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.body)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    assert body["event"] == "instance.received"
    assert body["route"] == "test"
    assert body["sop_instance_uid"] == ds.SOPInstanceUID
    assert body["wado_rs"] == (
        f"http://gw:8080/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def test_webhook_statuses(http_server: RecordingServer) -> None:
    source = bundled_file("CT_small.dcm")
    model = WebhookDestination(type="webhook", url=http_server.url)
    results = {}
    for code in (422, 429, 503):
        http_server.status = code

        async def run() -> list[Outcome]:
            sender = build_sender("ai", model, calling_ae="GW", gateway_base_url="http://gw")
            try:
                return await sender.send([delivery_of(source, 1)])
            finally:
                await sender.close()

        (results[code],) = asyncio.run(run())
    assert results[422] == Outcome(1, False, False, "HTTP 422")
    assert results[429] == Outcome(1, False, True, "HTTP 429")
    assert results[503] == Outcome(1, False, True, "HTTP 503")


def test_webhook_answer_without_end_does_not_hold_the_worker() -> None:
    """An endpoint that answers 200 and then streams for ever (a misrouted URL serving a
    live feed): the notification is delivered, its answer read no further than 64 KiB."""
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (4096, b"x" * 4096)
        with contextlib.suppress(ConnectionError):
            while sent < 64 << 20:  # the test's own bound: 64 MiB
                writer.write(chunk)
                await writer.drain()
                sent += 4096
        writer.close()

    async def run() -> list[Outcome]:
        server = await asyncio.start_server(endless, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        model = WebhookDestination(type="webhook", url=f"http://127.0.0.1:{port}/hook")
        sender = build_sender("ai", model, calling_ae="GW", gateway_base_url="http://gw")
        try:
            return await sender.send([delivery_of(bundled_file("CT_small.dcm"), 1)])
        finally:
            await sender.close()
            server.close()

    assert asyncio.run(run()) == [Outcome(1, True)]
    assert sent < 32 << 20  # it stopped reading: the writes filled the socket buffers, then failed
