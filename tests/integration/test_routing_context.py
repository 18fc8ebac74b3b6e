"""Routes match how an instance arrived, end to end: source_ip CIDR over DIMSE and STOW-RS
(from 127.0.0.1 and 127.0.0.2), called_ae, received_via, a private tag in (gggg,eeee)
notation, and a fallback route; the gateway is the console script, destinations folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
import pytest
from pynetdicom import AE
from tests.conftest import Corpus, GatewayProcess, needs_dcmtk, sop_uid_of, wait_until

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

SECOND_LOOPBACK = "127.0.0.2"
BOUNDARY = "routing-context"


def _stow(gw: GatewayProcess, files: list[Path], local_address: str) -> None:
    body = b""
    for f in files:
        body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += f.read_bytes() + b"\r\n"
    body += f"--{BOUNDARY}--\r\n".encode()
    transport = httpx.HTTPTransport(local_address=local_address)
    with httpx.Client(transport=transport, timeout=30) as client:
        response = client.post(
            gw.url("/dicomweb/studies"),
            content=body,
            headers={
                "content-type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
            },
        )
    assert response.status_code == 200, response.text


def _store_from(gw: GatewayProcess, files: list[Path], bind: str) -> None:
    """C-STORE with pynetdicom from the address ``bind``."""
    ae = AE(ae_title="SECOND")
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title, bind_address=(bind, 0))
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def _with_private_b_value(source: Path, target: Path, value: str) -> Path:
    ds = pydicom.dcmread(source)
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "IS", value)  # (0019,100C) B_value, replaced if present
    ds.save_as(target, enforce_file_format=True)
    return target


def _received(folder: Path) -> set[str]:
    return {sop_uid_of(p) for p in folder.rglob("*.dcm")} if folder.exists() else set()


def test_routes_match_how_and_from_where_an_instance_arrived(
    gateway: Callable[..., GatewayProcess], corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("route-context", 9, seed=621)
    stow_first, stow_second = files[0:2], files[2:4]
    dimse_second, dimse_research = files[4:6], files[6:7]
    # The corpus's b-values are random: set the two that the diffusion route reads.
    dimse_plain = [_with_private_b_value(files[7], tmp_path / "b0.dcm", "0")]
    diffusion = [_with_private_b_value(files[8], tmp_path / "dwi.dcm", "1000")]
    out = {name: tmp_path / name for name in ("lan", "second", "research", "dwi", "rest")}
    gw = gateway(
        {
            "dimse": {"check_called_ae": False},
            "destinations": {
                name: {"type": "folder", "path": str(path)} for name, path in out.items()
            },
            "routes": [
                {
                    "name": "stow-from-the-first-loopback",
                    "match": {"received_via": "stow", "source_ip": ["127.0.0.1/32", "fd00::/8"]},
                    "to": ["lan"],
                },
                {
                    "name": "anything-from-the-second-loopback",
                    "match": {"source_ip": "127.0.0.2/31", "not": {"source_ip": "127.0.0.3"}},
                    "to": ["second"],
                },
                {
                    "name": "called-research",
                    "match": {"called_ae": "RESEARCH", "received_via": "dimse"},
                    "to": ["research"],
                },
                {
                    "name": "diffusion",
                    "match": {"(0019,100C)": {"ge": 500}, "calling_ae": "STORESCU"},
                    "to": ["dwi"],
                },
                {"name": "the-rest", "fallback": True, "match": {}, "to": ["rest"]},
            ],
        }
    )
    _stow(gw, stow_first, "127.0.0.1")
    _stow(gw, stow_second, SECOND_LOOPBACK)
    _store_from(gw, dimse_second, SECOND_LOOPBACK)
    assert gw.storescu(dimse_research, called="RESEARCH").returncode == 0
    assert gw.storescu(dimse_plain).returncode == 0
    assert gw.storescu(diffusion).returncode == 0

    def uids(group: list[Path]) -> set[str]:
        return {sop_uid_of(f) for f in group}

    expected = {
        "lan": uids(stow_first),
        "second": uids(stow_second) | uids(dimse_second),
        "research": uids(dimse_research),
        "dwi": uids(diffusion),
        "rest": uids(dimse_plain),  # nothing else matched it
    }

    def received() -> dict[str, set[str]]:
        return {name: _received(path) for name, path in out.items()}

    def short(by_folder: dict[str, set[str]]) -> dict[str, list[str]]:
        return {name: sorted(uid[-6:] for uid in uids) for name, uids in by_folder.items()}

    try:
        wait_until(lambda: received() == expected, 30, "every instance where its routes say")
    except AssertionError:
        assert short(received()) == short(expected)  # says which folder got what
        raise
