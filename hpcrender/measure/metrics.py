"""Image metrics for comparing a parallel render with the single-device one: PSNR, SSIM, relative L2."""

from __future__ import annotations

import math

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical images."""
    x, y = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean structural similarity (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
    population statistics over the window, no padding; images (H, W) or (H, W, C), averaged over channels.
    """
    x, y = _pair(a, b)
    if x.ndim not in (2, 3):
        raise ValueError(f"ssim needs (H, W) or (H, W, C) images, got shape {x.shape}")
    if min(x.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {x.shape[:2]}")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    window = _gaussian(SSIM_WINDOW, SSIM_SIGMA)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x**2
    var_y = _filter(y * y, window) - mu_y**2
    cov = _filter(x * y, window) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(np.mean(ssim_map.mean(axis=(0, 1))))  # per channel, then over channels


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||, with b the reference; 0 for equal arrays, inf when b is zero and a is not."""
    x, y = _pair(a, b)
    diff, ref = float(np.linalg.norm(x - y)), float(np.linalg.norm(y))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if x.size == 0:
        raise ValueError("images are empty")
    return x, y


def _gaussian(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(r**2) / (2 * sigma**2))
    return w / w.sum()


def _filter(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of the first two axes with the 1-D window `w`."""
    k = len(w)
    h, width = img.shape[:2]
    rows = sum(w[i] * img[i : h - k + 1 + i] for i in range(k))
    return sum(w[i] * rows[:, i : width - k + 1 + i] for i in range(k))
