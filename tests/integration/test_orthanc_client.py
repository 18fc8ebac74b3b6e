"""Orthanc's DICOMweb plugin as a *client* of dicomgate: an independent implementation
storing (STOW-RS), searching (QIDO-RS) and retrieving (WADO-RS) through our /dicomweb.

Orthanc is told of the gateway under ``DicomWeb.Servers``; its REST calls
``/dicom-web/servers/dicomgate/{stow,qido,retrieve,get}`` then make the requests. What each
side holds is compared by SOP Instance UID and pixel data.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid
from tests.conftest import (
    Corpus,
    GatewayProcess,
    OrthancProcess,
    bundled_file,
    launch_orthanc,
    needs_dcmtk,
    sop_uid_of,
    wait_until,
)
from tests.integration.test_http_security import new_key
from tests.integration.test_stow import multipart, post

Gateway = Callable[..., GatewayProcess]

pytestmark = [pytest.mark.timeout(180), needs_dcmtk]


class OrthancClient:
    def __init__(self, server: OrthancProcess) -> None:
        self.base = f"http://127.0.0.1:{server.http_port}"

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=60) as answer:
            text = answer.read()
        return json.loads(text) if text else None

    def upload(self, path: Path) -> dict[str, Any]:
        return dict(self.call("POST", "/instances", raw=path.read_bytes()))

    def sops(self) -> set[str]:
        out = set()
        for orthanc_id in self.call("GET", "/instances"):
            tags = self.call("GET", f"/instances/{orthanc_id}/simplified-tags")
            out.add(tags["SOPInstanceUID"])
        return out

    def file_of(self, sop: str) -> bytes:
        (found,) = self.call(
            "POST", "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop}}
        )
        request = urllib.request.Request(f"{self.base}/instances/{found}/file")
        with urllib.request.urlopen(request, timeout=60) as answer:
            return bytes(answer.read())


@pytest.fixture
def orthanc_of(tmp_path: Path) -> Iterator[Callable[..., OrthancClient]]:
    started: list[OrthancProcess] = []

    def start(gw: GatewayProcess, servers: dict[str, Any] | None = None) -> OrthancClient:
        server = launch_orthanc(
            tmp_path / f"orthanc{len(started)}",
            {
                "DicomWeb": {
                    "Enable": True,
                    "Root": "/dicom-web/",
                    "Servers": servers or {"dicomgate": [gw.url("/dicomweb/")]},
                }
            },
        )
        started.append(server)
        return OrthancClient(server)

    yield start
    for server in started:
        server.stop()


def _own_study(name: str, folder: Path) -> Path:
    """A bundled file as a study of its own (the bundled MR_small variants share UIDs)."""
    ds = pydicom.dcmread(bundled_file(name))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = folder / name
    ds.save_as(out)
    return out


def _pixels(data: bytes) -> bytes:
    return bytes(pydicom.dcmread(BytesIO(data)).PixelData)


def test_orthanc_stores_searches_and_retrieves_through_dicomgate(
    gateway: Gateway,
    corpus: Corpus,
    orthanc_of: Callable[..., OrthancClient],
    tmp_path: Path,
) -> None:
    gw = gateway()
    orthanc = orthanc_of(gw)

    # STOW-RS: a study Orthanc holds, sent to the gateway by Orthanc. Its client's
    # multipart boundary is 73 characters (two UUIDs), past RFC 2046's 70: the gateway
    # refused every such upload with 400 until it took boundaries up to 256.
    sent = corpus.mr("orthanc-client-stow", 4, seed=301)
    uploaded = [orthanc.upload(p) for p in sent]
    answer = orthanc.call(
        "POST", "/dicom-web/servers/dicomgate/stow", {"Resources": [uploaded[0]["ParentStudy"]]}
    )
    assert answer["InstancesCount"] == "4", answer
    status, found = gw.http_get("/dicomweb/instances?limit=100")
    assert status == 200, found
    assert {i["00080018"]["Value"][0] for i in found} == {sop_uid_of(p) for p in sent}
    stored = {sop_uid_of(p): p for p in (gw.data / "store").rglob("*.dcm")}
    for path in sent:
        assert _pixels(stored[sop_uid_of(path)].read_bytes()) == _pixels(path.read_bytes())

    # QIDO-RS: Orthanc searches the gateway (and answers in its own JSON shape: one value
    # per attribute, not a list).
    study_uid = pydicom.dcmread(sent[0], stop_before_pixels=True).StudyInstanceUID
    studies = orthanc.call(
        "POST",
        "/dicom-web/servers/dicomgate/qido",
        {"Uri": "/studies", "Arguments": {"PatientName": "DOE*", "includefield": "all"}},
    )
    assert [s["0020000D"]["Value"] for s in studies] == [study_uid]
    assert studies[0]["00100010"]["Value"] == "DOE^JOHN"
    assert studies[0]["00081030"]["Value"] == "MR BRAIN W/O CONTRAST"
    # Orthanc's plugin (1.7) drops IS values sent as JSON numbers, as PS3.18 F.2.3 has
    # them (NumberOfStudyRelatedInstances ...): its shortcoming, not a difference here.

    # WADO-RS: a study only the gateway holds, retrieved by Orthanc, then its metadata.
    held = corpus.ct("orthanc-client-wado", 3, seed=302)
    assert gw.storescu(held).returncode == 0
    held_study = pydicom.dcmread(held[0], stop_before_pixels=True).StudyInstanceUID
    got = orthanc.call(
        "POST", "/dicom-web/servers/dicomgate/retrieve", {"Resources": [{"Study": held_study}]}
    )
    assert got["ReceivedInstancesCount"] == "3", got
    assert {sop_uid_of(p) for p in held} <= orthanc.sops()
    for path in held:
        assert _pixels(orthanc.file_of(sop_uid_of(path))) == _pixels(path.read_bytes())
    # Compressed instances come to Orthanc as stored (it asks for any transfer syntax).
    compressed = [
        _own_study(name, tmp_path)
        for name in ("MR_small_jp2klossless.dcm", "SC_rgb_rle_2frame.dcm", "image_dfl.dcm")
    ]
    assert post(gw, multipart([p.read_bytes() for p in compressed])).status_code == 200
    for path in compressed:
        ds = pydicom.dcmread(path)
        orthanc.call(
            "POST",
            "/dicom-web/servers/dicomgate/retrieve",
            {"Resources": [{"Study": ds.StudyInstanceUID}]},
        )
        back = pydicom.dcmread(BytesIO(orthanc.file_of(ds.SOPInstanceUID)))
        assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID, path.name
        assert back.PixelData == ds.PixelData, path.name

    metadata = orthanc.call(
        "POST", "/dicom-web/servers/dicomgate/get", {"Uri": f"/studies/{held_study}/metadata"}
    )
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(
        sop_uid_of(p) for p in held
    )


def test_orthanc_authenticates_with_an_api_key_as_its_basic_password(
    gateway: Gateway, corpus: Corpus, orthanc_of: Callable[..., OrthancClient]
) -> None:
    """Orthanc's DICOMweb client knows HTTP Basic only (``Username`` and ``Password``): an
    API key as the password lets it in; the user name is not checked. It was refused (401)
    until Basic was taken."""
    key, entry = new_key("orthanc", "read,write")
    admin, admin_entry = new_key("ops", "admin")
    gw = gateway({"http": {"auth": {"api_keys": [entry, admin_entry]}}})
    url = gw.url("/dicomweb/")
    orthanc = orthanc_of(
        gw,
        {
            "dicomgate": {"Url": url, "Username": "any-name", "Password": key},
            "wrong": {"Url": url, "Username": "orthanc", "Password": key[:-1]},
            "none": {"Url": url},
        },
    )
    sent = corpus.mr("orthanc-client-basic", 2, seed=303)
    study = [orthanc.upload(p) for p in sent][-1]["ParentStudy"]  # both in one study
    answer = orthanc.call("POST", "/dicom-web/servers/dicomgate/stow", {"Resources": [study]})
    assert answer["InstancesCount"] == "2", answer
    studies = orthanc.call("POST", "/dicom-web/servers/dicomgate/qido", {"Uri": "/studies"})
    assert len(studies) == 1

    for refused in ("wrong", "none"):
        with pytest.raises(urllib.error.HTTPError):  # Orthanc reports the 401 as its error
            orthanc.call("POST", f"/dicom-web/servers/{refused}/qido", {"Uri": "/studies"})
    gw.wait_log("auth.denied", 2)
    log = gw.log_text()
    assert "reason=invalid_api_key" in log and "reason=missing_credentials" in log
    assert key not in log and "any-name" not in log

    def searches() -> set[tuple[str, str]]:
        audit = httpx.get(gw.url("/api/audit?event=query"), headers={"X-API-Key": admin})
        return {(e["actor"], e["outcome"]) for e in audit.json()["events"]}

    # The search is audited under the key's name, whatever user name was sent (the audit
    # writer batches its rows: wait for them).
    wait_until(lambda: bool(searches()), 10, "the search's audit row")
    assert searches() == {("orthanc", "success")}
