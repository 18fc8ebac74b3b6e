"""The asyncio C-STORE requestor (dicomgate.dimse.association) against real peers:
DCMTK storescp (plain, tiny max PDU, TLS), a pynetdicom SCP that rejects, a listener that
never answers, and a scripted peer that records every PDU it receives."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import struct
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, StoragePresentationContexts
from tests.conftest import bundled_file, dcmtk_env, delivery_of, free_port
from tests.integration.test_dimse_security import ClientCa

from dicomgate.dimse import pdu
from dicomgate.dimse.association import AssociationError, dataset_offset, request_association
from dicomgate.dimse.commands import CommandField, decode_command, encode_response
from dicomgate.egress.base import Outcome
from dicomgate.egress.dimse import DimseSender
from dicomgate.egress.models import DimseDestination

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None, reason="needs DCMTK")

SMALL = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm")  # distinct UIDs


def _model(port: int, **extra: object) -> DimseDestination:
    return DimseDestination.model_validate(
        {"type": "dimse", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port, **extra}
    )


def _send(model: DimseDestination, files: list[Path]) -> list[Outcome]:
    async def run() -> list[Outcome]:
        sender = DimseSender("pacs", model, calling_ae="DICOMGATE")
        try:
            return await sender.send([delivery_of(f, n) for n, f in enumerate(files)])
        finally:
            await sender.close()

    return asyncio.run(run())


def _dataset_bytes(path: Path) -> bytes:
    return path.read_bytes()[dataset_offset(path) :]


class StoreScp:
    """DCMTK storescp writing exactly what it received (+B) into its own folder."""

    def __init__(self, root: Path, *args: str) -> None:
        self.port = free_port()
        self.out = root / f"scp-{self.port}"
        self.out.mkdir()
        self.log = root / f"scp-{self.port}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    "storescp",
                    "-v",
                    "-aet",
                    "STORESCP",
                    "+B",
                    "-od",
                    str(self.out),
                    *args,
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"storescp exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail("storescp did not listen")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def received(self) -> dict[str, Path]:
        return {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in self.out.iterdir()
        }


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreScp]]:
    started: list[StoreScp] = []

    def factory(*args: str) -> StoreScp:
        scp = StoreScp(tmp_path, *args)
        started.append(scp)
        return scp

    yield factory
    for scp in started:
        scp.stop()


def test_data_sets_arrive_byte_identical(storescp: Callable[..., StoreScp]) -> None:
    scp = storescp("+xa")
    files = [bundled_file(n) for n in SMALL]
    assert _send(_model(scp.port), files) == [Outcome(n, True) for n in range(len(files))]
    received = scp.received()
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert _dataset_bytes(received[uid]) == _dataset_bytes(f), f.name


def test_tiny_peer_max_pdu_is_respected(storescp: Callable[..., StoreScp]) -> None:
    scp = storescp("+xa", "--max-pdu", "4096")
    files = [bundled_file("CT_small.dcm"), bundled_file("JPEG2000.dcm")]
    assert _send(_model(scp.port), files) == [Outcome(0, True), Outcome(1, True)]
    by_uid = scp.received()
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert _dataset_bytes(by_uid[uid]) == _dataset_bytes(f)


def test_compressed_is_transcoded_for_a_peer_taking_only_uncompressed(
    storescp: Callable[..., StoreScp],
) -> None:
    scp = storescp()  # DCMTK's default: uncompressed syntaxes only
    files = [bundled_file("MR_small_jp2klossless.dcm"), bundled_file("SC_rgb_rle.dcm")]
    assert _send(_model(scp.port), files) == [Outcome(0, True), Outcome(1, True)]
    by_uid = scp.received()
    for f in files:
        source = pydicom.dcmread(f)
        got = pydicom.dcmread(by_uid[str(source.SOPInstanceUID)])
        assert not got.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(got.pixel_array, source.pixel_array)


# ----------------------------------------------------------------- a scripted peer


class RecordingPeer:
    """An asyncio SCP accepting every context in its first syntax, announcing
    ``max_pdu``, recording the length of every PDU (its variable field, which the maximum
    length bounds, PS3.8 D.1) and every data set it receives."""

    def __init__(self, max_pdu: int) -> None:
        self.max_pdu = max_pdu
        self.pdu_sizes: list[int] = []
        self.datasets: dict[str, bytes] = {}
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _read(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        header = await reader.readexactly(6)
        kind, _, length = struct.unpack(">BBI", header)
        self.pdu_sizes.append(length)  # the variable field: what max PDU length bounds
        return kind, await reader.readexactly(length)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await self._read(reader)
        rq = pdu.parse_associate_rq(body)
        contexts = [
            pdu.PresentationContextAC(
                c.context_id, pdu.ContextResult.ACCEPTANCE, c.transfer_syntaxes[0]
            )
            for c in rq.contexts
        ]
        writer.write(
            pdu.encode_associate_ac(
                rq,
                contexts,
                max_pdu_length=self.max_pdu,
                implementation_class_uid="1.2.3.4",
                implementation_version_name="RECORDER",
            )
        )
        command, data = bytearray(), bytearray()
        while True:
            kind, body = await self._read(reader)
            if kind == pdu.PduType.RELEASE_RQ:
                writer.write(pdu.encode_release_rp())
                await writer.drain()
                writer.close()
                return
            pos = 0
            while pos < len(body):
                (length,) = struct.unpack_from(">I", body, pos)
                cid, control = body[pos + 4], body[pos + 5]
                (command if control & 1 else data).extend(body[pos + 6 : pos + 4 + length])
                pos += 4 + length
                if control == 2:  # last data set fragment: answer
                    rq_cmd = decode_command(bytes(command))
                    self.datasets[rq_cmd.affected_sop_instance_uid] = bytes(data)
                    rsp = encode_response(
                        CommandField.C_STORE_RSP,
                        rq_cmd.message_id,
                        0,
                        sop_class_uid=rq_cmd.affected_sop_class_uid,
                        sop_instance_uid=rq_cmd.affected_sop_instance_uid,
                    )
                    writer.write(pdu.encode_p_data(cid, rsp, command=True, max_pdu_length=0))
                    command, data = bytearray(), bytearray()


@pytest.mark.parametrize("max_pdu", [4096, 16384, 1 << 20])
def test_pdus_never_exceed_the_peer_maximum(max_pdu: int) -> None:
    files = [bundled_file(n) for n in SMALL]

    async def run() -> tuple[list[Outcome], RecordingPeer]:
        peer = RecordingPeer(max_pdu)
        port = await peer.start()
        sender = DimseSender("pacs", _model(port), calling_ae="DICOMGATE")
        try:
            return await sender.send([delivery_of(f, n) for n, f in enumerate(files)]), peer
        finally:
            await sender.close()
            assert peer.server is not None
            peer.server.close()

    outcomes, peer = asyncio.run(run())
    assert outcomes == [Outcome(n, True) for n in range(len(files))]
    assert max(peer.pdu_sizes[1:]) <= max_pdu  # after the A-ASSOCIATE-RQ
    if max_pdu == 4096:
        assert max(peer.pdu_sizes[1:]) == 4096  # CT_small's pixel data fills them
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert peer.datasets[uid] == _dataset_bytes(f)


# ----------------------------------------------------------------- refusals, timeouts


def test_rejected_association_fails_retryably_with_the_reason() -> None:
    ae = AE(ae_title="OTHER")
    ae.require_called_aet = True
    ae.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        outcomes = _send(_model(port), [bundled_file("CT_small.dcm")])
    finally:
        server.shutdown()
    (outcome,) = outcomes
    assert (outcome.delivered, outcome.retryable) == (False, True)
    assert outcome.error == (
        "association rejected (permanent, service user): called AE title not recognised"
    )


def test_a_peer_that_never_answers_times_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        started = time.monotonic()
        (outcome,) = _send(_model(port, dimse_timeout=1.0), [bundled_file("CT_small.dcm")])
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert (outcome.delivered, outcome.retryable) == (False, True)
    assert "timed out after 1 s" in outcome.error
    assert 0.9 < elapsed < 5


def test_request_association_names_a_refused_connection() -> None:
    async def run() -> None:
        await request_association(
            "127.0.0.1",
            free_port(),
            calling_ae="A",
            called_ae="B",
            contexts=[("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])],
            timeout=2,
        )

    with pytest.raises(AssociationError, match="connection refused"):
        asyncio.run(run())


# ----------------------------------------------------------------- large instances


def _large_instance(path: Path, pixel_bytes: int) -> Path:
    """A Secondary Capture whose pixel data (``pixel_bytes``, pseudo-random) is written in
    1 MiB pieces, never whole in memory."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    frame = 1024 * 1024
    ds.NumberOfFrames = pixel_bytes // frame
    ds.Rows = ds.Columns = 1024
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    size = ds.NumberOfFrames * frame
    block = np.random.default_rng(7).integers(0, 256, frame, dtype=np.uint8).tobytes()
    with path.open("ab") as fh:
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size))
        for n in range(ds.NumberOfFrames):
            fh.write(block[n % 97 :] + block[: n % 97])
    return path


def _sha256_from(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _large_instance_case(storescp: Callable[..., StoreScp], tmp_path: Path, mib: int) -> None:
    source = _large_instance(tmp_path / "large.dcm", mib << 20)
    scp = storescp("+xa")
    tracemalloc.start()
    try:
        outcomes = _send(_model(scp.port), [source])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcomes == [Outcome(0, True)]
    assert peak < 16 << 20, f"peak {peak / 1e6:.1f} MB for a {mib} MiB instance"
    (got,) = scp.received().values()
    assert _sha256_from(got, dataset_offset(got)) == _sha256_from(source, dataset_offset(source))


def test_large_instance_streams_with_flat_memory(
    storescp: Callable[..., StoreScp], tmp_path: Path
) -> None:
    _large_instance_case(storescp, tmp_path, 24)


@pytest.mark.slow
def test_200_mb_instance_streams_with_flat_memory(
    storescp: Callable[..., StoreScp], tmp_path: Path
) -> None:
    _large_instance_case(storescp, tmp_path, 200)


# ----------------------------------------------------------------- TLS


@pytest.fixture
def pki(tmp_path: Path) -> ClientCa:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = ClientCa(folder)
    ca.issue("storescp", folder / "server.crt", folder / "server.key")
    ca.issue_client("dicomgate", folder)
    return ca


def _tls_scp(storescp: Callable[..., StoreScp], ca: ClientCa) -> StoreScp:
    folder = ca.folder
    return storescp(
        "+xa", "+tls", str(folder / "server.key"), str(folder / "server.crt"), "+cf", str(ca.path)
    )


def test_tls_to_storescp_with_client_certificate(
    storescp: Callable[..., StoreScp], pki: ClientCa
) -> None:
    scp = _tls_scp(storescp, pki)
    tls = {
        "ca": str(pki.path),
        "cert": str(pki.folder / "dicomgate.crt"),
        "key": str(pki.folder / "dicomgate.key"),
    }
    files = [bundled_file("CT_small.dcm"), bundled_file("MR_small.dcm")]
    assert _send(_model(scp.port, tls=tls), files) == [Outcome(0, True), Outcome(1, True)]
    by_uid = scp.received()
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert _dataset_bytes(by_uid[uid]) == _dataset_bytes(f)


def test_tls_peer_with_an_unknown_ca_is_refused(
    storescp: Callable[..., StoreScp], pki: ClientCa, tmp_path: Path
) -> None:
    scp = _tls_scp(storescp, pki)
    other = tmp_path / "other"
    other.mkdir()
    stranger = ClientCa(other)
    tls = {
        "ca": str(stranger.path),
        "cert": str(pki.folder / "dicomgate.crt"),
        "key": str(pki.folder / "dicomgate.key"),
    }
    (outcome,) = _send(_model(scp.port, tls=tls), [bundled_file("CT_small.dcm")])
    assert (outcome.delivered, outcome.retryable) == (False, True)
    assert outcome.error.startswith("TLS handshake failed"), outcome.error
    assert not scp.received()


def test_tls_files_are_read_again_when_they_change(
    storescp: Callable[..., StoreScp], pki: ClientCa, tmp_path: Path
) -> None:
    """A destination's CA bundle fixed on disk is used by the next association, without a
    restart (and a broken file then leaves the working context in place)."""
    scp = _tls_scp(storescp, pki)
    bundle = tmp_path / "destination-ca.pem"
    other = tmp_path / "other"
    other.mkdir()
    bundle.write_bytes(ClientCa(other).path.read_bytes())  # the wrong CA first
    tls = {
        "ca": str(bundle),
        "cert": str(pki.folder / "dicomgate.crt"),
        "key": str(pki.folder / "dicomgate.key"),
    }

    async def run() -> list[list[Outcome]]:
        sender = DimseSender("pacs", _model(scp.port, tls=tls), calling_ae="DICOMGATE")
        try:
            results = [await sender.send([delivery_of(bundled_file("CT_small.dcm"), 0)])]
            bundle.write_bytes(pki.path.read_bytes())  # the right CA
            results.append(await sender.send([delivery_of(bundled_file("MR_small.dcm"), 1)]))
            await sender.close()
            bundle.write_text("not a certificate")  # a broken edit: the last good one stays
            results.append(await sender.send([delivery_of(bundled_file("CT_small.dcm"), 2)]))
            return results
        finally:
            await sender.close()

    first, second, third = asyncio.run(run())
    assert first[0].error.startswith("TLS handshake failed"), first[0].error
    assert second == [Outcome(1, True)]
    assert third == [Outcome(2, True)]
    assert len(scp.received()) == 2
