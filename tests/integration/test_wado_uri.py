"""WADO-URI (PS3.18 9) against a real gateway: which media type answers (contentType, the
``accept`` query parameter, the Accept header) and the 400s of ``frameNumber``.

The rendering parameters and transfer syntaxes of WADO-URI are checked in test_wado.py
(``test_wado_uri``), on the gateway that file loads with storescu.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import httpx
import pydicom
import pytest
from PIL import Image
from tests.conftest import GatewayProcess, bundled_file

pytestmark = [pytest.mark.timeout(120)]

Gateway = Callable[..., GatewayProcess]
IMAGE = "CT_small.dcm"  # one frame, no Number of Frames (0028,0008)
MULTI_FRAME = "SC_rgb_rle_2frame.dcm"  # Number of Frames 2
NOT_IMAGE = "test-SR.dcm"
BOUNDARY = "wado-uri-test"


class Loaded:
    """A gateway holding the three files, stored with STOW-RS."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        body = b""
        self.uids: dict[str, tuple[str, str, str]] = {}
        for name in (IMAGE, MULTI_FRAME, NOT_IMAGE):
            path = bundled_file(name)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            self.uids[name] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            body += path.read_bytes() + b"\r\n"
        r = httpx.post(
            gw.url("/dicomweb/studies"),
            content=body + f"--{BOUNDARY}--\r\n".encode(),
            headers={
                "content-type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
            },
            timeout=60,
        )
        assert r.status_code == 200, r.text

    def get(
        self, name: str, header: str | None = "*/*", query: str = "", **params: str
    ) -> httpx.Response:
        """GET /dicomweb/wado for ``name`` with ``Accept: header`` (None: no Accept);
        ``query`` is appended to the URL as it is."""
        study, series, sop = self.uids[name]
        url = httpx.URL(
            self.gw.url("/dicomweb/wado"),
            params={
                "requestType": "WADO",
                "studyUID": study,
                "seriesUID": series,
                "objectUID": sop,
                **params,
            },
        )
        if query:
            url = httpx.URL(f"{url}&{query}")
        headers = {"Accept": header} if header is not None else {}
        with httpx.Client() as client:
            request = client.build_request("GET", url, headers=headers, timeout=30)
            if header is None:
                del request.headers["Accept"]  # httpx adds */* by default
            return client.send(request)


@pytest.fixture
def loaded(gateway: Gateway) -> Loaded:
    return Loaded(gateway())


def media_type(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["content-type"]


def assert_problem(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert words in response.json()["error"], response.json()


def test_the_accept_header_and_parameter_choose_when_there_is_no_content_type(
    loaded: Loaded,
) -> None:
    """PS3.18 9.3: the Selected Media Type tells the two transactions apart; image/jpeg is
    the default for ``*/*`` only. The Accept header (and the accept query parameter, which
    takes precedence over it) chose nothing: every image came back as image/jpeg."""
    dicom = loaded.get(IMAGE, "application/dicom")
    assert media_type(dicom) == "application/dicom"
    assert pydicom.dcmread(io.BytesIO(dicom.content)).SOPInstanceUID == loaded.uids[IMAGE][2]
    png = loaded.get(IMAGE, "image/png")
    assert media_type(png) == "image/png"
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    assert media_type(loaded.get(IMAGE, "image/png;q=0.5, application/dicom")) == (
        "application/dicom"
    )
    assert media_type(loaded.get(IMAGE, "image/*")) == "image/jpeg"
    # The defaults: */*, no Accept at all, and a browser's Accept (*/* at a lower q).
    assert media_type(loaded.get(IMAGE, "*/*")) == "image/jpeg"
    assert media_type(loaded.get(IMAGE, None)) == "image/jpeg"
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    assert media_type(loaded.get(IMAGE, browser)) == "image/jpeg"
    assert media_type(loaded.get(NOT_IMAGE, "*/*")) == "application/dicom"
    assert media_type(loaded.get(NOT_IMAGE, "application/dicom")) == "application/dicom"
    # The accept query parameter (PS3.18 8.3.3.1), over the header.
    assert media_type(loaded.get(IMAGE, accept="application/dicom")) == "application/dicom"
    assert media_type(loaded.get(IMAGE, "application/dicom", accept="image/png")) == "image/png"
    # contentType wins over both.
    png = loaded.get(
        IMAGE, "application/dicom", accept="application/dicom", contentType="image/png"
    )
    assert media_type(png) == "image/png"
    assert "Accept" in png.headers["vary"]


def test_an_accept_that_allows_nothing_we_send_is_406(loaded: Loaded) -> None:
    assert_problem(loaded.get(IMAGE, "text/html"), 406, "image/jpeg, image/png, application/dicom")
    assert_problem(loaded.get(IMAGE, "image/jpeg;q=0"), 406, "allows none of")
    assert_problem(loaded.get(NOT_IMAGE, "image/jpeg"), 406, "not an image")
    assert_problem(loaded.get(NOT_IMAGE, accept="image/png"), 406, "not an image")
    # A literal "+" in a query string is a space: read back as "+" (media types hold none).
    asked = loaded.get(IMAGE, query="accept=application/dicom+json")
    assert_problem(asked, 406, "'application/dicom+json'")
    assert_problem(loaded.get(IMAGE, "no-slash"), 400, "not a media type")


def test_frame_number_beyond_the_frames_or_on_a_single_frame_object_is_400(
    loaded: Loaded,
) -> None:
    """PS3.18 9.5.2.1: not a multi-frame image, not one value, or not a positive integer
    at most the number of frames: 400 (it was 404, and frameNumber=1 of a single-frame
    image was rendered)."""
    last = loaded.get(MULTI_FRAME, frameNumber="2")
    assert media_type(last) == "image/jpeg"
    assert_problem(loaded.get(MULTI_FRAME, frameNumber="3"), 400, "beyond the object's 2")
    assert_problem(loaded.get(MULTI_FRAME, frameNumber="0"), 400, "frameNumber")
    both = loaded.get(MULTI_FRAME, query="frameNumber=2", frameNumber="1")
    assert_problem(both, 400, "exactly one value")
    assert_problem(loaded.get(IMAGE, frameNumber="2"), 400, "multi-frame images only")
    assert_problem(loaded.get(IMAGE, frameNumber="1"), 400, "multi-frame images only")
    assert media_type(loaded.get(IMAGE)) == "image/jpeg"  # without frameNumber: the image
