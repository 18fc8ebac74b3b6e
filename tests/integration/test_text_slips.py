"""Text values a sender got wrong: stored, indexed and found, and a log without noise.

A NUL character inside a value, on SQLite and PostgreSQL:

PS3.5 allows NUL only as the trailing padding of a UI value; senders still put one inside
a name or an ID, or pad an AE title with NULs. PostgreSQL refuses a NUL in any text value,
and before the fix such an instance failed its whole commit there: C-STORE answered
0xA700 (out of resources, so the modality retried for ever), STOW-RS failed the part. Now
the index keeps each NUL inside a value as a space (on both databases, so they answer
alike) and the stored file keeps its bytes as received.

Bytes that do not decode in the declared character set: indexed with U+FFFD in their
place, named (not quoted) in the instance.stored line, and no pydicom warning in the log
(they named no instance, and some quote the value).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from tests.conftest import Corpus, GatewayProcess, create_pg_database, drop_pg_database
from tests.integration.test_dimse_bad_input import RawPeer, dataset_bytes
from tests.integration.test_stow import multipart, post

Gateway = Callable[..., GatewayProcess]

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The gateway's database: its own SQLite file, or a PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield {"url": f"sqlite:///{tmp_path}/gw-index.db"}
        return
    name, url = create_pg_database()
    try:
        yield {"url": url}
    finally:
        drop_pg_database(name)


def _with_nuls(src: Path, out: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(src)
    ds.PatientName = "Doe\x00Jane"
    ds.PatientID = "12\x0034"
    ds.StudyDescription = "brain\x00scan"
    ds.save_as(out)
    return ds


def _study_found(gw: GatewayProcess, ds: pydicom.Dataset) -> dict[str, object]:
    status, body = gw.http_get("/dicomweb/studies?PatientID=12%2034&includefield=00081030")
    assert status == 200, body
    (study,) = body
    assert study["0020000D"]["Value"] == [ds.StudyInstanceUID]
    assert study["00100010"]["Value"] == [{"Alphabetic": "Doe Jane"}]
    assert study["00081030"]["Value"] == ["brain scan"]
    return dict(study)


def test_c_store_of_values_with_a_nul_inside(
    gateway: Gateway, database: dict[str, str], corpus: Corpus, tmp_path: Path
) -> None:
    gw = gateway({"database": database})
    (src,) = corpus.mr("nul-store", 1, seed=5)
    ds = _with_nuls(src, tmp_path / "nul.dcm")
    store = gw.storescu([tmp_path / "nul.dcm"])
    assert store.returncode == 0, store.stdout + gw.log_tail()
    _study_found(gw, ds)
    (stored,) = (p for p in (gw.data / "store").rglob("*.dcm"))
    assert pydicom.dcmread(stored).PatientName == "Doe\x00Jane"  # the file as received
    assert gw.log_count("ingest.commit_failed") == 0


def test_an_ae_title_padded_with_nuls(
    gateway: Gateway, database: dict[str, str], corpus: Corpus
) -> None:
    """NULs after a calling AE title are padding, as spaces are (PS3.8 9.3.2)."""
    gw = gateway({"database": database})
    (src,) = corpus.mr("nul-ae", 1, seed=6)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    ts = str(ds.file_meta.TransferSyntaxUID)
    with RawPeer(gw.dimse_port) as peer:
        peer.associate(gw.ae_title, [(1, ds.SOPClassUID, [ts])], calling="NULPAD" + "\x00" * 10)
        status = peer.c_store(1, ds.SOPClassUID, ds.SOPInstanceUID, dataset_bytes(src))
        peer.release()
    assert status == 0x0000, gw.log_tail()
    status, body = gw.http_get("/api/audit?event=instance.received")
    assert status == 200, body
    assert [e["actor"] for e in body["events"]] == ["NULPAD"]


def test_stow_rs_of_values_with_a_nul_inside(
    gateway: Gateway, database: dict[str, str], corpus: Corpus, tmp_path: Path
) -> None:
    """The same values, and a NUL inside the file meta's Source AE Title, by STOW-RS."""
    gw = gateway({"database": database})
    (src,) = corpus.mr("nul-stow", 1, seed=7)
    ds = _with_nuls(src, tmp_path / "nul.dcm")
    # Set without pydicom's validation (it warns of the NUL, and warnings are errors here).
    ds.file_meta[0x00020016] = DataElement(0x00020016, "AE", "MOD\x00X", validation_mode=0)
    ds.save_as(tmp_path / "nul.dcm")
    answer = post(gw, multipart([(tmp_path / "nul.dcm").read_bytes()]))
    assert answer.status_code == 200, answer.text
    _study_found(gw, ds)


def test_undecodable_values_are_named_once_not_warned_of(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    gw = gateway()
    files = []
    for i, src in enumerate(corpus.mr("undecodable", 3, seed=8)):
        ds = pydicom.dcmread(src)
        ds.SpecificCharacterSet = "ISO_IR 192"
        # Latin-1 bytes declared as UTF-8, as legacy modalities send them.
        raw = b"M\xfcller^J\xe9r\xf4me"
        ds[0x00100010] = DataElement(0x00100010, "PN", raw + b" ", validation_mode=0)
        ds[0x00081030] = DataElement(0x00081030, "LO", b"Sch\xe4del ", validation_mode=0)
        ds.save_as(tmp_path / f"u{i}.dcm")
        files.append(tmp_path / f"u{i}.dcm")
    store = gw.storescu(files)
    assert store.returncode == 0, store.stdout
    gw.wait_log("instance.stored", count=3)
    status, body = gw.http_get("/dicomweb/studies?includefield=00081030")
    assert status == 200, body
    (study,) = body
    assert study["00100010"]["Value"] == [{"Alphabetic": "M\ufffdller^J\ufffdr\ufffdme"}]
    log = gw.log_text()
    stored = [line for line in log.splitlines() if "instance.stored" in line]
    assert len(stored) == 3
    assert all(
        "undecodable=patient.patient_name,study.study_description" in line for line in stored
    ), stored
    assert "Failed to decode" not in log and "warn_and_log" not in log, log[-3000:]
    assert "ller" not in log  # no value quoted
