"""Image decoding (PNG/JPEG/DICOM -> float32 [H, W] in [0, 1]), resizing and read errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from chx.data.images import is_dicom, load_image, read_image
from chx.errors import ImageReadError
from helpers import shared_path

DICOM_M2 = ("dicom", "siim_pneumothorax_sample.dcm")
DICOM_M1 = ("dicom", "monochrome1_sample.dcm")


def _check_unit_2d(a: np.ndarray) -> None:
    assert isinstance(a, np.ndarray) and a.ndim == 2 and a.dtype == np.float32
    assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0


def _raises_naming(path: Path, fn=read_image, *args) -> ImageReadError:
    with pytest.raises(ImageReadError, match=re.escape(str(path))) as info:
        fn(path, *args)
    assert "\n" not in str(info.value)
    return info.value


def _write_dicom(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.set_pixel_data(arr, photometric_interpretation=photometric,
                      bits_stored=attrs.pop("bits_stored", arr.dtype.itemsize * 8))
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------- real files

def test_real_dicom_monochrome1_is_inverted_monochrome2():
    m2 = read_image(shared_path(*DICOM_M2))
    m1 = read_image(shared_path(*DICOM_M1))
    for a in (m1, m2):
        _check_unit_2d(a)
        assert a.shape == (1024, 1024)
        assert a.std() > 0.05  # a real radiograph, not a constant
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m2.min() == 0.0 and m2.max() == 1.0


def test_real_dicom_load_image_tensor():
    t = load_image(shared_path(*DICOM_M2), 64)
    assert t.shape == (1, 64, 64) and t.dtype == torch.float32
    assert torch.isfinite(t).all() and 0.0 <= t.min() and t.max() <= 1.0


def test_dicom_detected_by_magic_without_suffix(tmp_path):
    src = shared_path(*DICOM_M2)
    dst = tmp_path / "no_suffix_image"
    shutil.copyfile(src, dst)
    assert is_dicom(dst)
    np.testing.assert_array_equal(read_image(dst), read_image(src))


def test_real_covid_png():
    png = sorted(shared_path("covid-cxr", "images").glob("*.png"))[0]
    a = read_image(png)
    _check_unit_2d(a)
    assert a.shape == Image.open(png).size[::-1]
    assert a.std() > 0.01


def test_real_nih_rgb_and_rgba_png():
    files = sorted(shared_path("nih-64px", "images").glob("*.png"))
    by_mode = {}
    for f in files:
        by_mode.setdefault(Image.open(f).mode, f)
        if {"RGB", "RGBA"} <= by_mode.keys():
            break
    assert {"RGB", "RGBA"} <= by_mode.keys(), by_mode.keys()
    for mode, f in by_mode.items():
        a = read_image(f)
        _check_unit_2d(a)
        assert a.shape == (64, 64)
        rgb = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255
        np.testing.assert_allclose(a, rgb @ np.array([0.299, 0.587, 0.114], np.float32), atol=1e-5)


# ------------------------------------------------------------------------------ synthetic files

def test_16bit_png_ramp(tmp_path):
    ramp = np.linspace(0, 65535, 256 * 4).round().astype(np.uint16).reshape(4, 256)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    a = read_image(path)
    _check_unit_2d(a)
    np.testing.assert_allclose(a, ramp.astype(np.float32) / 65535, atol=1e-6)
    assert a.min() == 0.0 and a.max() == 1.0


def test_8bit_modes_gray_la_palette(tmp_path):
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    want = gray.astype(np.float32) / 255
    for name in ("l.png", "la.png", "p.png"):
        np.testing.assert_allclose(read_image(tmp_path / name), want, atol=1e-6, err_msg=name)


def test_rgb_to_luminance(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1, :] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.dstack([rgb, np.full((2, 3), 7, np.uint8)])  # alpha is ignored
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    want = np.array([[0.299, 0.587, 0.114], [1.0, 1.0, 1.0]], np.float32)
    for name in ("rgb.png", "rgba.png"):
        a = read_image(tmp_path / name)
        _check_unit_2d(a)
        np.testing.assert_allclose(a, want, atol=1e-6, err_msg=name)


def test_constant_image_is_zeros_not_nan(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "c.png")
    assert np.isfinite(read_image(tmp_path / "c.png")).all()
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        path = _write_dicom(tmp_path / f"c_{photometric}.dcm", np.full((8, 8), 300, np.uint16),
                            photometric, bits_stored=12)
        a = read_image(path)
        _check_unit_2d(a)
        assert (a == 0).all()


def test_dicom_rescale_window_and_first_frame(tmp_path):
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))  # 12-bit ramp, 256 wide
    # Modality LUT: HU = 2 * stored - 1000; window (in rescaled units) 3096 +- 1024.
    path = _write_dicom(tmp_path / "win.dcm", ramp, bits_stored=12, RescaleSlope=2,
                        RescaleIntercept=-1000, WindowCenter=3096, WindowWidth=2048)
    a = read_image(path)
    _check_unit_2d(a)
    hu = ramp.astype(np.float64) * 2 - 1000
    want = np.clip((hu - (3096 - 1024)) / 2048, 0, 1)
    np.testing.assert_allclose(a, want, atol=2e-3)

    frames = np.stack([ramp, ramp[:, ::-1]]).astype(np.uint16)
    multi = _write_dicom(tmp_path / "multi.dcm", frames, bits_stored=12)
    np.testing.assert_allclose(read_image(multi), ramp / ramp.max(), atol=1e-6)


def test_jpeg_draft_decoding_close_to_full(tmp_path):
    y, x = np.mgrid[0:512, 0:384]
    img = ((np.sin(x / 23.0) * np.cos(y / 31.0) + 1) * 127).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(img).save(path, quality=95)
    with Image.open(path) as decoded:                      # the JPEG fully decoded, kept losslessly (no draft)
        decoded.save(tmp_path / "big.png")
    full = load_image(tmp_path / "big.png", 96)[0].numpy()
    fast = load_image(path, 96)[0].numpy()
    assert np.abs(full - fast).mean() < 0.01


# ------------------------------------------------------------------------------------ errors

def test_missing_file(tmp_path):
    msg = str(_raises_naming(tmp_path / "nope.png"))
    assert "not found" in msg
    _raises_naming(tmp_path / "nope.png", load_image, 32)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("this is not an image\n")
    assert "not an image" in str(_raises_naming(path))


def test_truncated_png_and_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (128, 128), dtype=np.uint8)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    for name in ("t.png", "t.jpg"):
        full = tmp_path / ("full_" + name)
        Image.fromarray(noise).save(full)
        data = full.read_bytes()
        path = tmp_path / name
        path.write_bytes(data[: len(data) // 2])
        assert "truncated" in str(_raises_naming(path))
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_truncated_dicom(tmp_path):
    data = shared_path(*DICOM_M2).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in str(_raises_naming(path))


def test_non_dicom_with_dcm_suffix(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"\x00" * 10)
    _raises_naming(path)


@pytest.mark.parametrize("limit", [1000, 3000])  # 64x64 = 4096 px: Pillow's error (> 2x), warning
def test_decompression_bomb(tmp_path, monkeypatch, limit):
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    msg = str(_raises_naming(path))
    assert "4,096 pixels" in msg and f"{limit:,}" in msg


def test_decompression_bomb_inside_dicom(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600_000)  # 1024 x 1024 JPEG inside
    msg = str(_raises_naming(shared_path(*DICOM_M2)))
    assert "1,048,576 pixels" in msg and "decompression" in msg


# ----------------------------------------------------------------------------------- resizing

def _png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)
    return path


def test_letterbox_keeps_aspect_with_zero_bands(tmp_path):
    white = _png(tmp_path / "wide.png", np.full((50, 100), 255))  # 100 wide, 50 high
    out = load_image(white, 64, "letterbox")[0].numpy()
    assert out.shape == (64, 64) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:16], 0)
    np.testing.assert_array_equal(out[48:], 0)
    np.testing.assert_allclose(out[16:48], 1, atol=1e-6)
    tall = load_image(_png(tmp_path / "tall.png", np.full((100, 50), 255)), 64)[0].numpy()  # bands left and right
    np.testing.assert_array_equal(tall[:, :16], 0)
    np.testing.assert_allclose(tall[:, 16:48], 1, atol=1e-6)


def test_squash_fills_and_is_deterministic(tmp_path):
    white = _png(tmp_path / "wide.png", np.full((50, 100), 255))
    np.testing.assert_allclose(load_image(white, 64, "squash").numpy(), 1, atol=1e-6)
    rng = np.random.default_rng(1)
    noise = _png(tmp_path / "noise.png", rng.integers(0, 256, (300, 200)))
    a, b = load_image(noise, 64, "squash")[0].numpy(), load_image(noise, 64, "squash")[0].numpy()
    np.testing.assert_array_equal(a, b)
    assert a.shape == (64, 64) and 0 <= a.min() and a.max() <= 1


def test_same_size_keeps_the_pixels(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32))
    out = load_image(_png(tmp_path / "p.png", pixels), 32)[0].numpy()
    np.testing.assert_array_equal(out, (pixels / 255).astype(np.float32))


def test_resize_rejects_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="crop"):
        load_image(_png(tmp_path / "p.png", np.zeros((4, 4))), 8, "crop")
