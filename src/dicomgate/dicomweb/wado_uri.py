"""WADO-URI (PS3.18 9, formerly PS3.18 "WADO") for old clients: ``GET /dicomweb/wado``.

``requestType=WADO&studyUID=..&seriesUID=..&objectUID=..`` and optionally
``contentType`` (``application/dicom``; ``image/jpeg``, the default for images;
``image/png``), ``transferSyntax`` (with application/dicom), ``frameNumber``, ``rows``,
``columns``, ``region``, ``windowCenter``/``windowWidth``, ``imageQuality``.

The media type (PS3.18 9.3: it alone tells Retrieve DICOM Instance, 9.4, from Retrieve
Rendered Instance, 9.5) is ``contentType`` when present; otherwise the ``accept`` query
parameter or, without one, the Accept header chooses; ``*/*`` (or no Accept) gives
image/jpeg for an image and application/dicom for any other object. Nothing we can send
is 406.

The answer is a single part: the Part 10 file (as stored, or transcoded when a
``transferSyntax`` other than the stored one is asked; without one, Explicit VR Little
Endian as for WADO-RS) or the rendered image. ``anonymize=yes`` is refused (400);
``annotation``, ``charset`` and ``presentation*`` parameters are ignored.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from dicomgate.dicomweb.negotiate import (
    AcceptError,
    choose_simple,
    default_syntax,
    parse_accept,
)
from dicomgate.dicomweb.render import (
    DEFAULT_QUALITY,
    MAX_VIEWPORT,
    RenderOptions,
    Viewport,
    Window,
    ascii_integer,
)
from dicomgate.dicomweb.server import problem
from dicomgate.dicomweb.streaming import file_chunks
from dicomgate.dicomweb.transcode import can_transcode

if TYPE_CHECKING:
    from dicomgate.dicomweb.wado import WadoService

__all__ = ["install_wado_uri"]

DICOM = "application/dicom"
_IMAGE_TYPES = ("image/jpeg", "image/png")
_SUPPORTED = (DICOM, *_IMAGE_TYPES)
_MAX_FRAME = (1 << 31) - 1
_SPACE_FOR_PLUS = re.compile(r"(?<=\w) (?=\w)")


def _int(params: dict[str, str], name: str, low: int, high: int) -> int | None:
    from dicomgate.dicomweb.wado import WadoError

    if name not in params:
        return None
    value = ascii_integer(params[name])
    if value is None or not low <= value <= high:
        raise WadoError(400, f"{name} must be an integer in {low}..{high}")
    return value


def _float(params: dict[str, str], name: str) -> float:
    from dicomgate.dicomweb.wado import WadoError

    try:
        value = float(params[name])
    except ValueError:
        raise WadoError(400, f"{name} must be a number") from None
    if not math.isfinite(value):  # nan, inf and 1e999 (as WADO-RS window=)
        raise WadoError(400, f"{name} must be a finite number")
    return value


def _selected_media_type(params: dict[str, str], accept_header: str | None, is_image: bool) -> str:
    """The Selected Media Type (PS3.18 9.3): ``contentType`` when present, else the
    ``accept`` query parameter (PS3.18 8.3.3.1; it takes precedence over the header, as
    for WADO-RS), else the Accept header (9.4.1, 9.5.1). ``*/*`` or no Accept: image/jpeg
    for an image (9.3), application/dicom for an object that is not one."""
    from dicomgate.dicomweb.wado import WadoError

    if "contentType" in params:
        return _content_type(params["contentType"], is_image)
    # A literal "+" in a query string decodes to a space (application/dicom+json arrives
    # as "application/dicom json"); a media type holds no space, so one between two word
    # characters is read as "+" (spaces around "," and ";" are white space, RFC 9110 5.6).
    in_query = _SPACE_FOR_PLUS.sub("+", params.get("accept", ""))
    where = "accept parameter" if in_query else "Accept header"
    try:
        ranges = parse_accept(in_query or accept_header)
    except AcceptError as exc:
        raise WadoError(400, f"{exc} ({where})") from None
    offered = [*_IMAGE_TYPES, DICOM] if is_image else [DICOM]
    chosen = choose_simple(ranges, offered)
    if chosen is None:
        asked = (in_query or accept_header or "")[:200]
        hint = "" if is_image else "; the object is not an image"
        raise WadoError(406, f"the {where} ({asked!r}) allows none of {', '.join(offered)}{hint}")
    return chosen


def _content_type(raw: str, is_image: bool) -> str:
    """The first supported entry of ``contentType`` (a comma-separated list, PS3.18 9.1.2.1.2)."""
    from dicomgate.dicomweb.wado import WadoError

    for item in raw.split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("*/*", "image/*") and is_image:
            return "image/jpeg"
        if media in _SUPPORTED:
            return media
    raise WadoError(
        406, f"contentType {raw!r} is not supported; use one of {', '.join(_SUPPORTED)}"
    )


def _frame_number(request: Request, params: dict[str, str], frames: int | None) -> int:
    """The frame to render: ``frameNumber``, or 1 without it.

    PS3.18 9.5.2.1: 400 when the object is not a multi-frame image, when the parameter
    has other than one value, or when its value is not a positive integer at most the
    instance's number of frames. "Multi-frame" is read as PS3.3 C.7.6.6 defines it: the
    object has Number of Frames (0028,0008), so frameNumber=1 of a single-frame object
    (no such attribute) is a 400 too, as the text says."""
    from dicomgate.dicomweb.wado import WadoError

    if "frameNumber" not in params:
        return 1
    if len(request.query_params.getlist("frameNumber")) != 1:
        raise WadoError(400, "frameNumber takes exactly one value")
    frame = _int(params, "frameNumber", 1, _MAX_FRAME)
    assert frame is not None
    if frames is None:
        raise WadoError(
            400,
            "frameNumber applies to multi-frame images only; this object has no"
            " Number of Frames (0028,0008): leave frameNumber out",
        )
    if frame > frames:
        raise WadoError(400, f"frameNumber {frame} is beyond the object's {frames} frame(s)")
    return frame


def _render_options(
    params: dict[str, str], media_type: str, rows: int, columns: int
) -> RenderOptions:
    from dicomgate.dicomweb.wado import WadoError

    window = None
    if ("windowCenter" in params) != ("windowWidth" in params):
        raise WadoError(400, "windowCenter and windowWidth go together")
    if "windowCenter" in params:
        width = _float(params, "windowWidth")
        if width < 1:
            raise WadoError(400, "windowWidth must be >= 1")
        window = Window(_float(params, "windowCenter"), width)
    out_rows = _int(params, "rows", 1, MAX_VIEWPORT)
    out_columns = _int(params, "columns", 1, MAX_VIEWPORT)
    crop = None
    if "region" in params:
        try:
            x1, y1, x2, y2 = (float(v) for v in params["region"].split(","))
        except ValueError:
            raise WadoError(400, "region must be four numbers x1,y1,x2,y2 in 0..1") from None
        if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
            raise WadoError(400, "region must be four numbers x1,y1,x2,y2 in 0..1")
        sx, sy = round(x1 * columns), round(y1 * rows)
        crop = (sx, sy, max(1, round(x2 * columns) - sx), max(1, round(y2 * rows) - sy))
    viewport = None
    if out_rows or out_columns or crop:
        width = out_columns or (crop[2] if crop and not out_rows else MAX_VIEWPORT)
        height = out_rows or (crop[3] if crop and not out_columns else MAX_VIEWPORT)
        viewport = Viewport(width, height, crop)
    quality = _int(params, "imageQuality", 1, 100) or DEFAULT_QUALITY
    return RenderOptions(media_type, window, viewport, quality)


def install_wado_uri(api: APIRouter, service: WadoService) -> None:
    """Add ``GET /wado`` to the WADO router."""
    from dicomgate.dicomweb.wado import WadoError

    async def answer(request: Request) -> Response:
        params = dict(request.query_params)
        if params.get("requestType") != "WADO":
            raise WadoError(400, "requestType must be WADO")
        missing = [n for n in ("studyUID", "seriesUID", "objectUID") if not params.get(n)]
        if missing:
            raise WadoError(400, f"missing parameter: {missing[0]}")
        if params.get("anonymize", "").lower() == "yes":
            raise WadoError(400, "anonymize=yes is not supported")
        refs = await service.instances(params["studyUID"], params["seriesUID"], params["objectUID"])
        ref = refs[0]
        media = _selected_media_type(params, request.headers.get("accept"), bool(ref.rows))
        if media == DICOM:
            stored = ref.transfer_syntax_uid
            wanted = params.get("transferSyntax")
            target = default_syntax(stored) if wanted is None or wanted == "*" else wanted
            if wanted == "*":
                target = stored
            if target != stored and not can_transcode(stored, target):
                raise WadoError(406, f"cannot send the instance in transfer syntax {target}")
            if target != stored:
                data = await service.transcode_instance(ref, target)
                return Response(data, media_type="application/dicom")
            return StreamingResponse(
                file_chunks(service.path_of(ref)), media_type="application/dicom"
            )
        if not ref.rows:
            raise WadoError(406, "the object is not an image; ask for application/dicom")
        frame = _frame_number(request, params, ref.number_of_frames)
        options = _render_options(params, media, ref.rows, ref.columns or 0)
        return await service.render(ref, frame, options)

    @api.get("/wado")
    async def wado_uri(request: Request) -> Response:
        """WADO-URI: ``?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..``."""
        try:
            response = await answer(request)
        except WadoError as exc:
            return problem(exc.status, exc.message)
        # The answer depends on Accept when contentType is absent: keep caches honest.
        response.headers.append("Vary", "Accept")
        return response
