"""OHIF, the web viewer, against dicomgate's DICOMweb: a real client nobody here wrote.

OHIF 3 (the prebuilt ``@ohif/app`` package from the npm registry, installed by ``make
install-test``) is served from its own origin by a small static server, as hospitals
deploy it, and driven in Debian's Chromium by Playwright. Its data source is the gateway's
``/dicomweb``: the study list comes from QIDO-RS, the viewer from series metadata and
WADO-RS frames. A page of another origin may read the answers only with ``http.cors``.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pydicom
import pytest
from PIL import Image, ImageStat
from playwright.sync_api import Browser, Page, Response, sync_playwright
from tests.conftest import Corpus, GatewayProcess, bundled_file, free_port, sop_uid_of
from tests.integration.test_http_security import new_key
from tests.integration.test_stow import multipart, post

REPO = Path(__file__).resolve().parents[2]
OHIF_DIST = REPO / ".venv" / "ohif" / "package" / "dist"
CHROMIUM = "/usr/bin/chromium"

Gateway = Callable[..., GatewayProcess]

pytestmark = [pytest.mark.timeout(240)]


def _app_config(dicomweb: str, **overrides: Any) -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source, the gateway."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomgate",
        "configuration": {
            "friendlyName": "dicomgate",
            "name": "dicomgate",
            "wadoUriRoot": f"{dicomweb}/wado",
            "qidoRoot": dicomweb,
            "wadoRoot": dicomweb,
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
            **overrides,
        },
    }
    config = {
        "routerBasename": None,
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 1,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "defaultDataSourceName": "dicomgate",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config)};\n"


class _Handler(SimpleHTTPRequestHandler):
    """OHIF's files; its own app-config.js; index.html for the app's routes (/viewer)."""

    config_js = b""
    extensions_map: ClassVar[dict[str, str]] = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "application/javascript",
        ".mjs": "application/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
    }

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(self.config_js)))
            self.end_headers()
            self.wfile.write(self.config_js)
            return
        if "." not in path.rsplit("/", 1)[-1]:
            self.path = "/index.html"
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def ohif_site() -> Iterator[Callable[..., str]]:
    """Start OHIF's static server for a gateway's /dicomweb (data source settings as
    keywords); returns its origin."""
    if not (OHIF_DIST / "index.html").exists():
        pytest.fail(f"OHIF is not installed at {OHIF_DIST}: run make install-test")
    servers: list[ThreadingHTTPServer] = []

    def start(dicomweb: str, **settings: Any) -> str:
        config = _app_config(dicomweb, **settings).encode()
        handler = type("Handler", (_Handler,), {"config_js": config})
        server = ThreadingHTTPServer(
            ("127.0.0.1", free_port()), functools.partial(handler, directory=str(OHIF_DIST))
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"],
        )
        yield chromium
        chromium.close()


@dataclass
class Seen:
    """What a page got from the gateway, and what it logged."""

    answers: list[tuple[int, str, str]] = field(default_factory=list)  # status, url, type
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def frames(self) -> list[tuple[int, str, str]]:
        return [a for a in self.answers if "/frames/" in a[1]]

    def assert_clean(self) -> None:
        """Every gateway answer a success, no request failed, no error in OHIF's console."""
        bad = [a for a in self.answers if not 200 <= a[0] < 300]
        assert not bad and not self.failed, (bad, self.failed)
        assert not self.errors, self.errors


def watch(page: Page, gateway_url: str) -> Seen:
    seen = Seen()

    def answered(response: Response) -> None:
        if response.url.startswith(gateway_url):
            kind = response.headers.get("content-type", "")
            seen.answers.append((response.status, response.url, kind))

    page.on("response", answered)
    page.on(
        "requestfailed",
        lambda r: (
            seen.failed.append(f"{r.url} {r.failure}") if r.url.startswith(gateway_url) else None
        ),
    )
    page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
    return seen


def _wait(page: Page, done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"OHIF: no {what} after {timeout} s")
        page.wait_for_timeout(200)


def _image_shown(page: Page, path: Path) -> float:
    """Spread of the grey levels in the middle of the viewport (0 for a blank one)."""
    page.screenshot(path=str(path))
    with Image.open(path) as shot:
        middle = shot.convert("L").crop((500, 250, 1000, 700))
        return float(ImageStat.Stat(middle).stddev[0])


def _gateway_and_site(
    gateway: Gateway,
    ohif_site: Callable[..., str],
    http: dict[str, Any] | None = None,
    **settings: str,
) -> tuple[GatewayProcess, str]:
    """A gateway whose CORS lets OHIF's origin read it (and ``http`` config besides), and
    that OHIF (data source ``settings``); returns both, the gateway started."""
    gw = gateway(start=False)
    origin = ohif_site(gw.url("/dicomweb"), **settings)
    gw.config["http"].update(http or {})
    gw.config["http"]["cors"] = {"allow_origins": [origin]}
    gw.start()
    return gw, origin


def _compressed_study(name: str, folder: Path) -> Path:
    """A bundled compressed file as a study of its own (new UIDs, pixel data untouched)."""
    ds = pydicom.dcmread(bundled_file(name))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, f"2.25.{uuid.uuid4().int}")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    # A patient of its own: the bundled files share one Patient ID, and patient-level
    # attributes are the patient's (the last name stored would show for all three).
    ds.PatientName = f"OHIF^{name.split('.')[0]}"
    ds.PatientID = name.split(".")[0]
    out = folder / name
    ds.save_as(out)
    return out


def _study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_ohif_lists_the_studies_and_shows_their_images(
    gateway: Gateway,
    corpus: Corpus,
    ohif_site: Callable[..., str],
    browser: Browser,
    tmp_path: Path,
) -> None:
    """The study list (QIDO-RS), then each study in the viewer (series metadata and
    WADO-RS frames): native CT, JPEG 2000, JPEG-LS, RLE and 12-bit JPEG. OHIF asks for
    frames in any syntax (transfer-syntax=*) and gets them as stored, decoding them
    itself. Every answer is a success, OHIF logs no error, and the viewport shows an
    image, not a blank."""
    ct = corpus.ct("ohif-ct", 3, seed=71)
    compressed = [
        _compressed_study(name, tmp_path)
        for name in (
            "MR_small_jp2klossless.dcm",
            "MR_small_jpeg_ls_lossless.dcm",
            "MR_small_RLE.dcm",
            # 12-bit JPEG Extended that pydicom's decoders refuse: OHIF decodes it.
            "JPEG-lossy.dcm",
        )
    ]
    gw, origin = _gateway_and_site(gateway, ohif_site)
    stored = gw.storescu(ct)
    assert stored.returncode == 0, stored.stdout
    posted = post(gw, multipart([p.read_bytes() for p in compressed]))  # as they are
    assert posted.status_code == 200, posted.text
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen = watch(page, gw.url(""))

    page.goto(origin + "/", wait_until="load")
    page.get_by_text("ROE, JANE").wait_for(timeout=30_000)
    for path in compressed:
        name = path.name.split(".")[0]
        page.get_by_text(f"OHIF, {name}").wait_for(timeout=5_000)

    for study, count in [(_study_uid(ct[0]), len(ct))] + [(_study_uid(p), 1) for p in compressed]:
        expected = len(seen.frames()) + count
        page.goto(origin + f"/viewer?StudyInstanceUIDs={study}", wait_until="load")
        _wait(page, lambda n=expected: len(seen.frames()) >= n, 60, f"frames of {study}")
        page.wait_for_timeout(1500)  # drawn
        spread = _image_shown(page, tmp_path / f"{study}.png")
        assert spread > 10, f"blank viewport for {study}: {tmp_path / f'{study}.png'}"

    seen.assert_clean()
    kinds = {kind.split(";")[0] for status, url, kind in seen.frames()}
    assert kinds == {"multipart/related"}, kinds


def test_ohif_with_wado_uri_images_and_rendered_thumbnails(
    gateway: Gateway,
    corpus: Corpus,
    ohif_site: Callable[..., str],
    browser: Browser,
    tmp_path: Path,
) -> None:
    """OHIF's other ways to load: images by WADO-URI (whole instances), thumbnails from
    /thumbnail, which it asks for with the ``accept`` query parameter (PS3.18 8.3.3.1;
    before, an unknown rendering parameter: 400)."""
    ct = corpus.ct("ohif-ct", 3, seed=71)
    gw, origin = _gateway_and_site(
        gateway, ohif_site, imageRendering="wadouri", thumbnailRendering="thumbnail"
    )
    assert gw.storescu(ct).returncode == 0
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen = watch(page, gw.url(""))
    page.goto(origin + f"/viewer?StudyInstanceUIDs={_study_uid(ct[0])}", wait_until="load")

    def loaded(kind: str) -> list[tuple[int, str, str]]:
        return [a for a in seen.answers if kind in a[1]]

    _wait(page, lambda: len(loaded("/wado?")) >= len(ct), 60, "WADO-URI instances")
    _wait(page, lambda: bool(loaded("/thumbnail")), 30, "thumbnail")
    page.wait_for_timeout(1500)
    assert _image_shown(page, tmp_path / "wado-uri.png") > 10
    seen.assert_clean()
    assert {a[2] for a in loaded("/thumbnail")} == {"image/jpeg"}
    assert {a[2] for a in loaded("/wado?")} == {"application/dicom"}


def test_ohif_saves_a_measurement_report_by_stow_rs(
    gateway: Gateway, corpus: Corpus, ohif_site: Callable[..., str], browser: Browser
) -> None:
    """A length measured in OHIF, tracked and saved with "Create SR": OHIF stores a DICOM
    SR in the study by STOW-RS, and the gateway indexes and keeps it."""
    ct = corpus.ct("ohif-ct", 3, seed=71)
    study = _study_uid(ct[0])
    gw, origin = _gateway_and_site(gateway, ohif_site)
    assert gw.storescu(ct).returncode == 0
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen = watch(page, gw.url(""))
    page.goto(origin + f"/viewer?StudyInstanceUIDs={study}", wait_until="load")
    _wait(page, lambda: len(seen.frames()) >= len(ct), 60, "frames")
    page.get_by_text("Skip all").click()  # the guided tour
    page.get_by_text("Confirm and hide").click()  # the "investigational use" banner
    page.locator("[data-cy='Length-btn']").click()
    page.mouse.move(600, 400)
    page.mouse.down()
    page.mouse.move(700, 450, steps=8)
    page.mouse.up()
    page.get_by_role("button", name="Yes").click()  # track measurements for this series
    page.locator("[data-cy='trackedMeasurements-btn']").click()
    page.get_by_role("button", name="Create SR").click()
    page.get_by_placeholder("Report name").fill("dicomgate report")
    page.get_by_role("button", name="Save").click()

    def stow() -> list[tuple[int, str, str]]:
        return [a for a in seen.answers if a[1].rstrip("/").endswith("/dicomweb/studies")]

    _wait(page, lambda: bool(stow()), 30, "STOW-RS of the report")
    assert [a[0] for a in stow()] == [200], stow()
    status, found = gw.http_get(f"/dicomweb/studies/{study}/instances?Modality=SR")
    assert status == 200 and len(found) == 1, found
    (path,) = (
        p
        for p in (gw.data / "store").rglob("*.dcm")
        if sop_uid_of(p) not in {sop_uid_of(c) for c in ct}
    )
    report = pydicom.dcmread(path)
    assert report.Modality == "SR" and report.StudyInstanceUID == study
    assert report.SeriesDescription == "dicomgate report"
    numbers = [item for item in _content(report) if item.ValueType == "NUM"]
    assert (
        numbers
        and numbers[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm"
    )
    assert not seen.errors and not seen.failed, (seen.errors, seen.failed)


def _content(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content(item)


def test_ohif_opened_with_an_api_key_as_its_token(
    gateway: Gateway,
    corpus: Corpus,
    ohif_site: Callable[..., str],
    browser: Browser,
    tmp_path: Path,
) -> None:
    """OHIF 3 sends ``Authorization: Bearer`` with the ``token`` of the viewer's URL (its
    ``requestOptions.auth``, HTTP Basic, is OHIF 2's): a viewer link carrying an API key
    shows the study from a gateway that requires a key, with no request refused."""
    key, entry = new_key("ohif", "read")
    gw, origin = _gateway_and_site(gateway, ohif_site, {"auth": {"api_keys": [entry]}})
    ct = corpus.ct("ohif-ct", 3, seed=71)
    assert gw.storescu(ct).returncode == 0
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen = watch(page, gw.url(""))

    study = _study_uid(ct[0])
    page.goto(origin + f"/viewer?StudyInstanceUIDs={study}&token={key}", wait_until="load")
    _wait(page, lambda: len(seen.frames()) >= len(ct), 60, "frames")
    page.wait_for_timeout(1500)  # drawn
    assert _image_shown(page, tmp_path / "token.png") > 10, tmp_path / "token.png"
    seen.assert_clean()
    assert key not in page.url  # OHIF takes the token out of the address bar
    assert gw.log_count("auth.denied") == 0


def test_without_cors_a_viewer_of_another_origin_reads_nothing(
    gateway: Gateway, corpus: Corpus, ohif_site: Callable[..., str], browser: Browser
) -> None:
    """The default (no ``http.cors``): the browser blocks OHIF's reading of the answers,
    so the list stays empty. What makes the test above work is the config, not luck."""
    gw = gateway()
    assert gw.storescu(corpus.ct("ohif-ct", 3, seed=71)).returncode == 0
    origin = ohif_site(gw.url("/dicomweb"))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen = watch(page, gw.url(""))
    page.goto(origin + "/", wait_until="load")
    _wait(page, lambda: bool(seen.failed), 30, "blocked QIDO-RS request")
    assert any("CORS" in e for e in seen.errors), seen.errors
    assert page.get_by_text("ROE, JANE").count() == 0


def test_cors_answers_with_authentication(gateway: Gateway) -> None:
    """Preflights need no credential; a 401 carries the CORS headers (so the page can
    tell the user to log in); another origin gets none, and its preflight a JSON 400."""
    viewer, entry = new_key("viewer", "read")
    site = "https://viewer.example.org"
    gw = gateway({"http": {"auth": {"api_keys": [entry]}, "cors": {"allow_origins": [site]}}})
    qido = gw.url("/dicomweb/studies")
    preflight = {
        "Origin": site,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, accept",
    }
    answer = httpx.options(qido, headers=preflight)
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == site
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    assert "GET" in answer.headers["access-control-allow-methods"]

    denied = httpx.get(qido, headers={"Origin": site})
    assert denied.status_code == 401 and denied.json() == {"error": "authentication required"}
    assert denied.headers["access-control-allow-origin"] == site

    ok = httpx.get(qido, headers={"Origin": site, "Authorization": f"Bearer {viewer}"})
    assert ok.status_code == 200 and ok.json() == []
    assert ok.headers["access-control-allow-origin"] == site
    assert "warning" in ok.headers["access-control-expose-headers"].lower()

    other = {**preflight, "Origin": "https://elsewhere.example.org"}
    refused = httpx.options(qido, headers=other)
    assert refused.status_code == 400
    assert refused.json() == {"error": "Disallowed CORS origin"}
    plain = httpx.get(qido, headers={"Origin": other["Origin"], "X-API-Key": viewer})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
