"""PSNR, SSIM and relative L2 against values known in closed form or computed the slow way."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpcrender.measure.metrics import psnr, relative_l2, ssim


def _rgb(seed: int, shape=(24, 20, 3), high=256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape, dtype=np.uint8)


def _ssim_slow(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """SSIM by its definition: every 11 x 11 window, Gaussian weights, one channel at a time."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    per_channel = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(float), b[..., ch].astype(float)
        values = []
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


def test_psnr_of_a_known_mse():
    a = _rgb(0, high=250)
    assert psnr(a, a + 5) == pytest.approx(10 * math.log10(255**2 / 25))
    assert psnr(a + 5, a) == psnr(a, a + 5)
    assert psnr(a / 255.0, (a + 5) / 255.0, data_range=1.0) == pytest.approx(psnr(a, a + 5))


def test_psnr_of_identical_images_is_infinite():
    a = _rgb(1)
    assert psnr(a, a.copy()) == math.inf


def test_psnr_does_not_wrap_around_uint8():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 255, np.uint8)
    assert psnr(a, b) == pytest.approx(0.0)


def test_ssim_of_identical_images_is_one():
    a = _rgb(2)
    assert ssim(a, a) == pytest.approx(1.0)


def test_ssim_of_two_flat_images_is_the_luminance_term():
    a, b = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))


def test_ssim_matches_the_windowed_definition():
    a = _rgb(3, shape=(16, 19, 3))
    b = np.clip(a.astype(int) + np.random.default_rng(4).integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, b) == pytest.approx(_ssim_slow(a, b), rel=1e-10)
    grey = ssim(a[..., 0], b[..., 0])
    assert grey == pytest.approx(_ssim_slow(a[..., :1], b[..., :1]), rel=1e-10)


def test_ssim_drops_with_noise_and_is_symmetric():
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:48, 0:48]
    clean = np.stack([xx * 5, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)
    light = np.clip(clean + rng.normal(0, 5, clean.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(clean + rng.normal(0, 40, clean.shape), 0, 255).astype(np.uint8)
    assert 1.0 > ssim(clean, light) > ssim(clean, heavy) > 0.0
    assert ssim(clean, heavy) == pytest.approx(ssim(heavy, clean))


def test_ssim_on_float_images_with_their_range():
    a = _rgb(6, shape=(20, 20, 3))
    b = _rgb(7, shape=(20, 20, 3))
    assert ssim(a / 255.0, b / 255.0, data_range=1.0) == pytest.approx(ssim(a, b))


@pytest.mark.parametrize(
    "a,b",
    [
        (np.zeros((10, 20, 3)), np.zeros((10, 20, 3))),  # smaller than the window
        (np.zeros((20, 20, 3)), np.zeros((20, 21, 3))),  # shapes differ
        (np.zeros((2, 20, 20, 3)), np.zeros((2, 20, 20, 3))),  # a batch
    ],
)
def test_ssim_rejects_what_it_cannot_measure(a, b):
    with pytest.raises(ValueError):
        ssim(a, b)


def test_relative_l2_known_values():
    b = np.array([3.0, 4.0])
    assert relative_l2(b * 1.1, b) == pytest.approx(0.1)
    assert relative_l2(np.array([3.0, 0.0]), b) == pytest.approx(4.0 / 5.0)
    assert relative_l2(b, b) == 0.0
    assert relative_l2(np.zeros(2), np.zeros(2)) == 0.0
    assert relative_l2(b, np.zeros(2)) == math.inf
    with pytest.raises(ValueError):
        relative_l2(np.zeros(2), np.zeros(3))
