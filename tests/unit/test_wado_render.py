"""Rendering (dicomweb/render.py): VOI windows, parameters, MONOCHROME1, viewport."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicomgate.dicomweb.render import (
    RenderOptions,
    Viewport,
    Window,
    apply_window,
    parse_render_options,
    render_frame,
)


def test_linear_window_follows_ps3_3_c_11_2_1_2() -> None:
    values = np.array([0.0, 39.5, 40.0, 50.0, 60.0, 60.5, 100.0])
    out = apply_window(values, Window(50, 21))  # c - 0.5 - (w-1)/2 = 39.5; top 59.5
    assert out[0] == 0 and out[1] == 0 and out[-1] == 255 and out[-2] == 255
    assert 0 < out[2] < out[3] < out[4] <= 255
    assert abs(out[3] - 127.5 - 255 * 0.5 / 20) < 1e-9
    exact = apply_window(values, Window(50, 20, "linear-exact"))
    assert exact[3] == 127.5 and exact[1] == 0 and exact[5] == 255
    sigmoid = apply_window(values, Window(50, 20, "sigmoid"))
    assert sigmoid[3] == 127.5 and np.all(np.diff(sigmoid) > 0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"window": "1"}, "window"),
        ({"window": "1,0"}, "width"),
        ({"window": "1,2,cubic"}, "function"),
        ({"window": "nan,2"}, "finite"),
        ({"viewport": "10"}, "viewport"),
        ({"viewport": "10,0"}, "viewport height"),
        ({"viewport": "10,10,0,0,0,5"}, "sw"),
        ({"quality": "0"}, "quality"),
        ({"quality": "x"}, "quality"),
        ({"zoom": "2"}, "unsupported parameter: zoom"),
    ],
)
def test_bad_parameters_are_named(params: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_render_options(params, "image/jpeg")


def test_parameters_and_thumbnail_default() -> None:
    options = parse_render_options(
        {
            "window": "40,400,SIGMOID",
            "viewport": "64,32,1,2,3,4",
            "quality": "70",
            "annotation": "patient",
        },
        "image/png",
        Viewport(128, 128),
    )
    assert options == RenderOptions(
        "image/png", Window(40, 400, "sigmoid"), Viewport(64, 32, (1, 2, 3, 4)), 70
    )
    assert parse_render_options({}, "image/jpeg", Viewport(128, 128)).viewport == Viewport(128, 128)


def _image(tmp_path: Path, photometric: str, pixels: np.ndarray, **extra: object) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    path = tmp_path / f"{photometric}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _render(path: Path, options: RenderOptions) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(render_frame(path, 0, options))))


def test_monochrome1_is_inverted_and_rescale_applied(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(0, 4000, 125, dtype=np.uint16), (8, 1))  # 8 x 32, left dark
    png = RenderOptions("image/png")
    mono2 = _render(_image(tmp_path, "MONOCHROME2", ramp), png)
    mono1 = _render(_image(tmp_path, "MONOCHROME1", ramp), png)
    assert mono2[0, 0] == 0 and mono2[0, -1] == 255
    assert np.array_equal(mono1, 255 - mono2)
    # Rescale to HU, then a window in HU: the file's own Window Center/Width is used.
    ct = _image(
        tmp_path,
        "MONOCHROME2",
        ramp,
        RescaleIntercept=-1024,
        RescaleSlope=1,
        WindowCenter=0,
        WindowWidth=100,
    )
    windowed = _render(ct, png)
    hu = ramp[0].astype(float) - 1024
    assert np.all(windowed[0][hu < -60] == 0) and np.all(windowed[0][hu > 60] == 255)
    overridden = _render(ct, RenderOptions("image/png", Window(5000, 10)))
    assert overridden.max() == 0


def test_viewport_fits_and_crops(tmp_path: Path) -> None:
    path = _image(tmp_path, "MONOCHROME2", np.zeros((100, 200), np.uint16))
    assert _render(path, RenderOptions("image/png", viewport=Viewport(50, 50))).shape == (25, 50)
    cropped = RenderOptions("image/png", viewport=Viewport(40, 40, (0, 0, 20, 20)))
    assert _render(path, cropped).shape == (40, 40)
    jpeg = render_frame(path, 0, RenderOptions("image/jpeg", quality=50))
    assert jpeg[:2] == b"\xff\xd8"
