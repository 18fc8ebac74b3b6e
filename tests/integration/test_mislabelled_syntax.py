"""An Implicit VR data set sent as Explicit VR Little Endian: stored as what it is.

Some senders negotiate (or write in their file meta) Explicit VR Little Endian and encode
the data set in Implicit VR. The gateway relabels the stored file Implicit VR Little Endian
(data set bytes untouched), so that a strict reader and every destination get a syntax
that matches the bytes (docs/conformance.md 4.2.3). DCMTK's storescu refuses to read such
a file, so the DIMSE sender here is the scripted raw peer of test_dimse_bad_input.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID
from tests.conftest import GatewayProcess, bundled_file, needs_dcmtk, wait_until
from tests.integration.test_dimse_bad_input import RawPeer, c_store_rq, p_data, parse_command
from tests.integration.test_dimse_bad_input import dataset_bytes as part10_data_set
from tests.integration.test_routing_delivery import StoreSCP
from tests.integration.test_stow import multipart, post

from dicomgate.store.part10 import arrival_json, encode_file_meta

pytestmark = [pytest.mark.timeout(120)]

Gateway = Callable[..., GatewayProcess]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
STATUS_SUCCESS = 0x0000


def implicit_data_set(
    suffix: str, source: str = "MR_small_implicit.dcm"
) -> tuple[pydicom.Dataset, bytes]:
    """MR_small (``source``: a bundled copy of it) in Implicit VR Little Endian (its data set
    bytes), under its SOP Instance UID + ``suffix`` (not the one of MR_small.dcm, which the
    tests also send)."""
    ds = pydicom.dcmread(bundled_file(source))
    ds.SOPInstanceUID = f"{ds.SOPInstanceUID}{suffix}"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    data = fp.getvalue()
    assert data[4:6] == b"\x18\x00"  # (0008,0008) length 24: no VR bytes
    return ds, data


def mislabelled_part10(ds: pydicom.Dataset, data: bytes, syntax: str = EXPLICIT_LE) -> bytes:
    """A Part 10 file whose meta (written by pydicom) says ``syntax`` over the Implicit VR
    data set ``data``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1.99")
    buf = DicomBytesIO()
    buf.write(bytes(128) + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue() + data


def read_strictly(path: Path) -> pydicom.Dataset:
    """pydicom's read: pytest turns its "Expected explicit VR, but found implicit VR"
    warning (a file that lies about its encoding) into an error."""
    return pydicom.dcmread(path)


def declared_syntax(ds: pydicom.Dataset) -> str | None:
    """``declared_transfer_syntax`` of the arrival record in (0002,0102)."""
    doc = json.loads(bytes(ds.file_meta.PrivateInformation).decode("ascii").strip())
    value = doc.get("declared_transfer_syntax")
    return None if value is None else str(value)


def c_store_in(peer: RawPeer, sop_class: str, sop: str, fragments: list[bytes]) -> int:
    """A C-STORE whose data set goes in exactly these PDVs (one PDU each)."""
    peer.send(p_data(1, c_store_rq(1, sop_class, sop), command=True))
    for i, fragment in enumerate(fragments):
        peer.send(p_data(1, fragment, command=False, last=i == len(fragments) - 1))
    answer = peer.read_pdu()
    assert answer.pdu_type == 0x04, answer
    status: int = struct.unpack("<H", parse_command(answer.body[6:])[0x00000900])[0]
    return status


def stored_file(gw: GatewayProcess, sop: str) -> Path:
    row = gw.index.instance(sop)
    assert row is not None, gw.log_tail()
    return gw.stored_path(row)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs", "PACS").start()
    yield scp
    scp.stop()


def routed_to(gateway: Gateway, pacs: StoreSCP) -> GatewayProcess:
    """A gateway sending every MR instance on to ``pacs``."""
    pacs_destination = {"type": "dimse", "ae_title": "PACS", "host": "127.0.0.1"}
    return gateway(
        {
            "destinations": {"pacs": {**pacs_destination, "port": pacs.port}},
            "routes": [{"name": "mr", "match": {"Modality": "MR"}, "to": ["pacs"]}],
        }
    )


def store_all(
    gw: GatewayProcess, syntax: str, sop_class: str, sent: list[tuple[str, list[bytes]]]
) -> None:
    """C-STOREs of (SOP Instance UID, data set fragments) on one ``syntax`` context."""
    with RawPeer(gw.dimse_port) as peer:
        peer.associate(gw.ae_title, [(1, sop_class, [syntax])])
        assert peer.accepted == {1: syntax}
        for sop, fragments in sent:
            assert c_store_in(peer, sop_class, sop, fragments) == STATUS_SUCCESS
        peer.release()


def assert_relabelled(
    gw: GatewayProcess, sop: str, sent_data: bytes, stored: str, declared: str
) -> pydicom.Dataset:
    """Stored under ``stored`` with the data set bytes as received, ``declared`` kept in
    the arrival record, readable without pydicom's warning; the stored data set."""
    row = gw.index.instance(sop)
    assert row is not None, gw.log_tail()
    assert row["transfer_syntax_uid"] == stored
    path = gw.stored_path(row)
    assert path.read_bytes().endswith(sent_data)
    ds = read_strictly(path)
    assert ds.file_meta.TransferSyntaxUID == stored
    assert declared_syntax(ds) == declared
    return ds


@needs_dcmtk
def test_dimse_implicit_data_set_under_explicit_context_is_relabelled_and_forwarded(
    gateway: Gateway, pacs: StoreSCP
) -> None:
    gw = routed_to(gateway, pacs)
    ds, data = implicit_data_set(".5")
    tiny, tiny_data = implicit_data_set(".7")
    normal_path = bundled_file("MR_small.dcm")  # Explicit VR Little Endian, another instance
    normal = pydicom.dcmread(normal_path)
    normal_data = part10_data_set(normal_path)
    assert str(normal.SOPInstanceUID) != str(ds.SOPInstanceUID)
    sop_class = str(ds.SOPClassUID)
    # The tiny one's first fragments are shorter than an element header: decided once 6
    # bytes are in.
    pieces = [tiny_data[:3], tiny_data[3:5], tiny_data[5:4000], tiny_data[4000:]]
    store_all(
        gw,
        EXPLICIT_LE,
        sop_class,
        [
            (str(ds.SOPInstanceUID), [data]),
            (str(tiny.SOPInstanceUID), pieces),
            (str(normal.SOPInstanceUID), [normal_data]),
        ],
    )

    for sop, sent_data in ((ds.SOPInstanceUID, data), (tiny.SOPInstanceUID, tiny_data)):
        stored = assert_relabelled(gw, str(sop), sent_data, IMPLICIT_LE, EXPLICIT_LE)
        assert stored.PixelData == ds.PixelData

    # A normal explicit instance is untouched: its syntax, its bytes, no declared syntax.
    row = gw.index.instance(str(normal.SOPInstanceUID))
    assert row is not None and row["transfer_syntax_uid"] == EXPLICIT_LE
    arrival = arrival_json("RAWPEER", gw.ae_title, "127.0.0.1", "dimse")
    header = encode_file_meta(
        sop_class, str(normal.SOPInstanceUID), EXPLICIT_LE, "RAWPEER", arrival
    )
    assert gw.stored_path(row).read_bytes() == header + normal_data
    kept = read_strictly(gw.stored_path(row))
    assert kept.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert declared_syntax(kept) is None

    # QIDO-RS finds it and says what it is stored as.
    found = httpx.get(
        gw.url("/dicomweb/instances"),
        params={"SOPInstanceUID": str(ds.SOPInstanceUID), "includefield": "00083002"},
        timeout=10,
    )
    assert found.status_code == 200, found.text
    (item,) = found.json()
    assert item["00083002"]["Value"] == [IMPLICIT_LE]

    # The DCMTK destination gets it (it aborted every attempt before) and can read it.
    wanted = {str(ds.SOPInstanceUID), str(tiny.SOPInstanceUID), str(normal.SOPInstanceUID)}
    wait_until(lambda: set(pacs.received()) == wanted, 60, "storescp to receive all three")
    received = pacs.received()
    for sop in (str(ds.SOPInstanceUID), str(tiny.SOPInstanceUID)):
        copy = read_strictly(received[sop])
        assert copy.file_meta.TransferSyntaxUID == IMPLICIT_LE
        assert copy.PixelData == ds.PixelData
    assert gw.log_count("delivery.failed") == 0, gw.log_tail()

    gw.wait_log("instance.relabelled", count=2)
    metrics = httpx.get(gw.url("/metrics"), timeout=10).text
    relabelled = [
        line
        for line in metrics.splitlines()
        if line.startswith("dicomgate_instances_mislabelled_total{")
        and 'action="relabelled"' in line
        and 'ingress="dimse"' in line
    ]
    assert relabelled and relabelled[0].endswith(" 2.0"), relabelled


def test_stow_part10_implicit_data_set_under_explicit_meta_is_relabelled(
    gateway: Gateway,
) -> None:
    gw = gateway()
    ds, data = implicit_data_set(".5")
    normal_path = bundled_file("CT_small.dcm")
    normal = pydicom.dcmread(normal_path)
    # Implicit VR under RLE Lossless (its pixels RLE fragments, as the syntax requires): no
    # Implicit VR form to relabel to; kept, with a warning.
    rle, rle_data = implicit_data_set(".9", "MR_small_RLE.dcm")
    body = multipart(
        [
            mislabelled_part10(ds, data),
            normal_path.read_bytes(),
            mislabelled_part10(rle, rle_data, RLE_LOSSLESS),
        ]
    )
    r = post(gw, body)
    assert r.status_code == 200, r.text

    path = stored_file(gw, str(ds.SOPInstanceUID))
    assert path.read_bytes().endswith(data)
    stored = read_strictly(path)
    assert stored.file_meta.TransferSyntaxUID == IMPLICIT_LE
    assert declared_syntax(stored) == EXPLICIT_LE
    assert stored.PixelData == ds.PixelData
    row = gw.index.instance(str(ds.SOPInstanceUID))
    assert row is not None and row["transfer_syntax_uid"] == IMPLICIT_LE

    # WADO-RS offers it as what it is.
    wado = httpx.get(
        gw.url(
            f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        ),
        headers={"accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=10,
    )
    assert wado.status_code == 200, wado.text
    assert f"transfer-syntax={IMPLICIT_LE}".encode() in wado.content[:400]
    assert data in wado.content

    # The explicit one beside it is untouched.
    kept_path = stored_file(gw, str(normal.SOPInstanceUID))
    kept = read_strictly(kept_path)
    assert kept.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert declared_syntax(kept) is None
    assert kept_path.read_bytes().endswith(part10_data_set(normal_path))
    gw.wait_log("instance.relabelled")
    assert gw.log_count("instance.relabelled") == 1

    row = gw.index.instance(str(rle.SOPInstanceUID))
    assert row is not None and row["transfer_syntax_uid"] == RLE_LOSSLESS
    assert gw.stored_path(row).read_bytes().endswith(rle_data)
    gw.wait_log("instance.mislabelled")
    (line,) = [x for x in gw.log_text().splitlines() if " instance.mislabelled " in x]
    assert "declared=RLELossless" in line and str(rle.SOPInstanceUID) not in line


def test_watched_folder_implicit_data_set_under_explicit_meta_is_relabelled(
    gateway: Gateway, tmp_path: Path
) -> None:
    watch = tmp_path / "drop"
    gw = gateway({"ingest": {"watch": str(watch), "settle": 0.2, "poll_interval": 0.1}})
    ds, data = implicit_data_set(".5")
    watch.mkdir(exist_ok=True)
    (watch / "mislabelled.dcm").write_bytes(mislabelled_part10(ds, data))
    wait_until(
        lambda: gw.index.instance(str(ds.SOPInstanceUID)) is not None, 30, "the folder ingest"
    )
    path = stored_file(gw, str(ds.SOPInstanceUID))
    assert path.read_bytes().endswith(data)
    stored = read_strictly(path)
    assert stored.file_meta.TransferSyntaxUID == IMPLICIT_LE
    assert declared_syntax(stored) == EXPLICIT_LE
    row = gw.index.instance(str(ds.SOPInstanceUID))
    assert row is not None and row["transfer_syntax_uid"] == IMPLICIT_LE


# -- the reverse slip: an Explicit VR data set sent as Implicit VR Little Endian ----------


def explicit_data_set(suffix: str) -> tuple[pydicom.Dataset, bytes]:
    """MR_small in Explicit VR Little Endian (its data set bytes), under its SOP Instance
    UID + ``suffix``."""
    ds = pydicom.dcmread(bundled_file("MR_small.dcm"))
    ds.SOPInstanceUID = f"{ds.SOPInstanceUID}{suffix}"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    data = fp.getvalue()
    assert data[4:6] == b"CS"  # (0008,0008) CS: a VR where Implicit VR has a length
    return ds, data


@needs_dcmtk
def test_dimse_explicit_data_set_under_implicit_context_is_relabelled_and_forwarded(
    gateway: Gateway, pacs: StoreSCP
) -> None:
    """It had been refused with 0xC000 ("element (0008,0008) has length 1594179"). DCMTK's
    storescp aborts such an association; the gateway stores the image truthfully labelled,
    and the storescp destination then takes it."""
    gw = routed_to(gateway, pacs)
    ds, data = explicit_data_set(".15")
    tiny, tiny_data = explicit_data_set(".17")
    normal, normal_data = implicit_data_set(".19")  # Implicit VR as announced: untouched
    store_all(
        gw,
        IMPLICIT_LE,
        str(ds.SOPClassUID),
        [
            (str(ds.SOPInstanceUID), [data]),
            (str(tiny.SOPInstanceUID), [tiny_data[:5], tiny_data[5:6], tiny_data[6:]]),
            (str(normal.SOPInstanceUID), [normal_data]),
        ],
    )

    for sop, sent_data in ((ds.SOPInstanceUID, data), (tiny.SOPInstanceUID, tiny_data)):
        stored = assert_relabelled(gw, str(sop), sent_data, EXPLICIT_LE, IMPLICIT_LE)
        assert stored.PixelData == ds.PixelData
    row = gw.index.instance(str(normal.SOPInstanceUID))
    assert row is not None and row["transfer_syntax_uid"] == IMPLICIT_LE
    assert declared_syntax(read_strictly(gw.stored_path(row))) is None

    wanted = {str(ds.SOPInstanceUID), str(tiny.SOPInstanceUID), str(normal.SOPInstanceUID)}
    wait_until(lambda: set(pacs.received()) == wanted, 60, "storescp to receive all three")
    copy = read_strictly(pacs.received()[str(ds.SOPInstanceUID)])
    assert copy.PixelData == ds.PixelData
    assert gw.log_count("delivery.failed") == 0, gw.log_tail()
    gw.wait_log("instance.relabelled", count=2)
    line = next(x for x in gw.log_text().splitlines() if " instance.relabelled " in x)
    assert "declared=ImplicitVRLittleEndian stored=ExplicitVRLittleEndian" in line, line


def test_stow_part10_explicit_data_set_under_implicit_meta_is_relabelled(
    gateway: Gateway,
) -> None:
    gw = gateway()
    ds, data = explicit_data_set(".15")
    r = post(gw, multipart([mislabelled_part10(ds, data, IMPLICIT_LE)]))
    assert r.status_code == 200, r.text
    assert_relabelled(gw, str(ds.SOPInstanceUID), data, EXPLICIT_LE, IMPLICIT_LE)


def test_watched_folder_explicit_data_set_under_implicit_meta_is_relabelled(
    gateway: Gateway, tmp_path: Path
) -> None:
    watch = tmp_path / "drop"
    gw = gateway({"ingest": {"watch": str(watch), "settle": 0.2, "poll_interval": 0.1}})
    ds, data = explicit_data_set(".25")
    watch.mkdir(exist_ok=True)
    (watch / "mislabelled.dcm").write_bytes(mislabelled_part10(ds, data, IMPLICIT_LE))
    wait_until(
        lambda: gw.index.instance(str(ds.SOPInstanceUID)) is not None, 30, "the folder ingest"
    )
    assert_relabelled(gw, str(ds.SOPInstanceUID), data, EXPLICIT_LE, IMPLICIT_LE)
