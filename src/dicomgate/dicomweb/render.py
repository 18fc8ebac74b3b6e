"""Rendered and thumbnail resources (PS3.18 8.3.5, 10.4.1.1.3): one frame to JPEG or PNG.

The pipeline of PS3.4 N.2 for grayscale, simplified: decode one frame (pydicom, only
that frame), Modality LUT (Rescale Slope/Intercept or the Modality LUT Sequence), VOI
(``window`` parameter, else the file's first Window Center/Width and VOI LUT Function, else
its VOI LUT Sequence, else the frame's min..max), MONOCHROME1 inverted, 8 bits out.
Colour: YBR is converted to RGB by pydicom, PALETTE COLOR through its lookup tables,
more than 8 bits scaled down. Then the ``viewport`` crop/scale and the encoder (``quality``
for JPEG). Per-frame functional groups of enhanced objects are not read (top level only).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomgate.dicomweb.frames import pydicom_muted
from dicomgate.errors import os_error_reason

__all__ = [
    "DEFAULT_QUALITY",
    "THUMBNAIL_SIZE",
    "RenderError",
    "RenderOptions",
    "Viewport",
    "Window",
    "apply_window",
    "ascii_integer",
    "parse_render_options",
    "render_frame",
]

DEFAULT_QUALITY = 90
THUMBNAIL_SIZE = 128
MAX_VIEWPORT = 8192
_FUNCTIONS = ("linear", "linear-exact", "sigmoid")
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian (PS3.5 A.5)


class RenderError(Exception):
    """The instance cannot be rendered (no pixel data, undecodable)."""


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "linear"  # linear | linear-exact | sigmoid (PS3.3 C.11.2.1.3)


@dataclass(frozen=True)
class Viewport:
    width: int
    height: int
    crop: tuple[int, int, int, int] | None = None  # sx, sy, sw, sh in source pixels


@dataclass(frozen=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = DEFAULT_QUALITY


def _numbers(text: str, name: str, count: tuple[int, ...]) -> list[str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in count or any(not p for p in parts):
        raise ValueError(f"{name} must have {' or '.join(map(str, count))} comma-separated values")
    return parts


def _float(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}: not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}: not a finite number: {text!r}")
    return value


def ascii_integer(text: str, max_digits: int = 10) -> int | None:
    """The value of ``text`` if it is a non-negative integer in ASCII digits (surrounding
    spaces allowed, at most ``max_digits`` of them), else ``None``.

    ``str.isdigit()`` alone is not enough: it is true of '²' and other Unicode digits
    that ``int()`` refuses (or, for Arabic-Indic digits, accepts), and ``int()`` refuses
    numbers of more than 4300 digits.
    """
    text = text.strip()
    if not (text.isascii() and text.isdecimal()) or len(text) > max_digits:
        return None
    return int(text)


def _int(text: str, name: str, low: int, high: int) -> int:
    value = ascii_integer(text)
    if value is None:
        raise ValueError(f"{name}: not an integer: {text[:32]!r}")
    if not low <= value <= high:
        raise ValueError(f"{name}: {value} is outside {low}..{high}")
    return value


def parse_window(text: str) -> Window:
    """``center,width[,function]`` (PS3.18 8.3.5.1.4)."""
    parts = _numbers(text, "window", (2, 3))
    center, width = _float(parts[0], "window center"), _float(parts[1], "window width")
    function = parts[2].lower() if len(parts) == 3 else "linear"
    if function not in _FUNCTIONS:
        raise ValueError(f"window function must be one of {', '.join(_FUNCTIONS)}")
    if (width < 1 and function == "linear") or width <= 0:
        raise ValueError("window width must be positive (>= 1 for linear)")
    return Window(center, width, function)


def parse_viewport(text: str) -> Viewport:
    """``vw,vh`` or ``vw,vh,sx,sy,sw,sh`` (PS3.18 8.3.5.1.3; negative sw/sh unsupported)."""
    parts = _numbers(text, "viewport", (2, 6))
    width = _int(parts[0], "viewport width", 1, MAX_VIEWPORT)
    height = _int(parts[1], "viewport height", 1, MAX_VIEWPORT)
    crop = None
    if len(parts) == 6:
        sx, sy = (
            _int(parts[2], "viewport sx", 0, 1 << 20),
            _int(parts[3], "viewport sy", 0, 1 << 20),
        )
        sw, sh = (
            _int(parts[4], "viewport sw", 1, 1 << 20),
            _int(parts[5], "viewport sh", 1, 1 << 20),
        )
        crop = (sx, sy, sw, sh)
    return Viewport(width, height, crop)


def parse_render_options(
    params: Mapping[str, str], media_type: str, default_viewport: Viewport | None = None
) -> RenderOptions:
    """The rendering parameters of a query; ``ValueError`` names the bad one."""
    known = {"window", "viewport", "quality", "annotation", "charset", "iccprofile", "accept"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unsupported parameter: {unknown[0]}")
    window = parse_window(params["window"]) if "window" in params else None
    viewport = parse_viewport(params["viewport"]) if "viewport" in params else default_viewport
    quality = _int(params["quality"], "quality", 1, 100) if "quality" in params else DEFAULT_QUALITY
    return RenderOptions(media_type, window, viewport, quality)


def apply_window(values: Any, window: Window) -> Any:
    """Grayscale values through a VOI window to 0..255 floats (PS3.3 C.11.2.1.2)."""
    import numpy as np

    x = values.astype(np.float64, copy=False)
    c, w = window.center, window.width
    if window.function == "sigmoid":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if window.function == "linear-exact":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0) * 255.0
    if w <= 1:
        return np.where(x <= c - 0.5, 0.0, 255.0)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0) * 255.0


def _first(value: Any) -> float:
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _grayscale(array: Any, ds: Any, window: Window | None) -> Any:
    import numpy as np
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(array, ds)
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").lower().replace("_", "-")
        try:
            window = Window(
                _first(ds.WindowCenter),
                max(_first(ds.WindowWidth), 1.0),
                function if function in _FUNCTIONS else "linear",
            )
        except (TypeError, ValueError, IndexError):
            window = None
    if window is not None:
        out = apply_window(values, window)
    elif "VOILUTSequence" in ds:
        voi = apply_voi_lut(values, ds).astype(np.float64)
        low, high = float(voi.min()), float(voi.max())
        out = (voi - low) * (255.0 / (high - low)) if high > low else np.zeros_like(voi)
    else:
        values = values.astype(np.float64)
        low, high = float(values.min()), float(values.max())
        out = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255.0 - out
    return np.rint(out).astype(np.uint8)


def _colour(array: Any, ds: Any) -> Any:
    import numpy as np
    from pydicom.pixels.processing import apply_color_lut

    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        array = apply_color_lut(array, ds)
        bits = 8 * array.dtype.itemsize
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
    if array.dtype != np.uint8 or bits > 8:
        shift = max(0, bits - 8)
        array = (array.astype(np.uint32) >> shift).clip(0, 255).astype(np.uint8)
    return array


def _frame_image(path: Path, index: int, window: Window | None) -> Any:
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.pixels.utils import pixel_array

    with warnings.catch_warnings(), pydicom_muted():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if "Rows" not in ds:
                raise RenderError("the instance holds no image")
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            if index >= frames:
                raise RenderError(f"the instance has {frames} frame(s)")
            meta = getattr(ds, "file_meta", None)
            if meta is not None and meta.get("TransferSyntaxUID") == _DEFLATED:
                # pixel_array(path) reads a deflated file without inflating it (and finds
                # no Pixel Data); dcmread inflates the data set, in memory.
                array = pixel_array(pydicom.dcmread(path), index=index)
            else:
                array = pixel_array(path, index=index)
        except RenderError:
            raise
        except OSError as exc:  # the file: its path holds the UIDs, so not in the message
            raise RenderError(f"cannot read the stored instance: {os_error_reason(exc)}") from exc
        except Exception as exc:  # codecs raise anything on bad data
            raise RenderError(f"cannot decode the pixel data: {exc}") from exc
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "")).upper()
        if samples == 1 and photometric != "PALETTE COLOR":
            return Image.fromarray(_grayscale(array, ds, window))
        rgb = _colour(array, ds)
        if rgb.ndim == 3 and rgb.shape[2] == 3:
            return Image.fromarray(rgb)
        return Image.fromarray(np.ascontiguousarray(rgb[..., 0] if rgb.ndim == 3 else rgb))


def _apply_viewport(image: Any, viewport: Viewport) -> Any:
    from PIL import Image

    if viewport.crop is not None:
        sx, sy, sw, sh = viewport.crop
        image = image.crop((sx, sy, min(sx + sw, image.width), min(sy + sh, image.height)))
        if image.width == 0 or image.height == 0:
            raise ValueError("viewport source region is outside the image")
    # Fit inside vw x vh, aspect ratio kept (PS3.18 8.3.5.1.3).
    scale = min(viewport.width / image.width, viewport.height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def render_frame(path: Path, index: int, options: RenderOptions) -> bytes:
    """Frame ``index`` (0-based) of the stored file ``path`` as ``options.media_type``."""
    image = _frame_image(path, index, options.window)
    if options.viewport is not None:
        image = _apply_viewport(image, options.viewport)
    out = io.BytesIO()
    if options.media_type == "image/png":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=options.quality)
    return out.getvalue()
