"""WADO-URI (PS3.18 9, formerly PS3.18 "WADO") for old clients: ``GET /dicomweb/wado``.

``requestType=WADO&studyUID=..&seriesUID=..&objectUID=..`` and optionally
``contentType`` (``application/dicom``; ``image/jpeg``, the default for images;
``image/png``), ``transferSyntax`` (with application/dicom), ``frameNumber``, ``rows``,
``columns``, ``region``, ``windowCenter``/``windowWidth``, ``imageQuality``.

The answer is a single part: the Part 10 file (as stored, or transcoded when a
``transferSyntax`` other than the stored one is asked; without one, Explicit VR Little
Endian as for WADO-RS) or the rendered image. ``anonymize=yes`` is refused (400);
``annotation``, ``charset`` and ``presentation*`` parameters are ignored.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from dicomgate.dicomweb.negotiate import default_syntax
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

_IMAGE_TYPES = ("image/jpeg", "image/png")
_SUPPORTED = ("application/dicom", *_IMAGE_TYPES)


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


def _content_type(params: dict[str, str], is_image: bool) -> str:
    """The first supported entry of ``contentType`` (a comma-separated list, PS3.18 9.1.2.1.2)."""
    from dicomgate.dicomweb.wado import WadoError

    raw = params.get("contentType")
    if raw is None:
        return "image/jpeg" if is_image else "application/dicom"
    for item in raw.split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("*/*", "image/*") and is_image:
            return "image/jpeg"
        if media in _SUPPORTED:
            return media
    raise WadoError(
        406, f"contentType {raw!r} is not supported; use one of {', '.join(_SUPPORTED)}"
    )


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
        media = _content_type(params, bool(ref.rows))
        if media == "application/dicom":
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
        frame = _int(params, "frameNumber", 1, (1 << 31) - 1) or 1
        options = _render_options(params, media, ref.rows, ref.columns or 0)
        return await service.render(ref, frame, options)

    @api.get("/wado")
    async def wado_uri(request: Request) -> Response:
        """WADO-URI: ``?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..``."""
        try:
            return await answer(request)
        except WadoError as exc:
            return problem(exc.status, exc.message)
