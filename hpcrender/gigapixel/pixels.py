"""Pixel operations of a gigapixel level on one region at a time (numpy, no torch): the upscaled previous level
over a tile's box, the colour fix of a refined tile against it, and the seam score of a finished level.

Each reads only the pixels it needs through a `read(y0, y1, x0, x1)` callable, so no level is ever held whole.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# read(y0, y1, x0, x1) -> uint8 (y1 - y0, x1 - x0, 3) of one level
ReadBox = Callable[[int, int, int, int], np.ndarray]

CUBIC_A = -0.5        # Keys' bicubic, as PIL and OpenCV use it
# The seam score compares tile boundaries with lines this far apart inside the tiles (default: the VAE's 8 px).
SEAM_PERIOD = 8
# ... and with the lines this many periods either side of each boundary (the seam score's surroundings).
NEAR_LINES = 1
WAVELET_LEVELS = 5    # StableSR's wavelet colour fix: detail from the tile, the rest (blur radius 31 px) from the reference


def cubic_taps(src: int, dst: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (n, 4) and weights (n, 4) of destination pixels start..stop-1 when `src` pixels are resampled
    to `dst` (pixel centres aligned, edges repeated). A pixel's taps depend on its coordinate alone, so every tile
    that covers it computes the same value."""
    s = (np.arange(start, stop, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    base = np.floor(s)
    offsets = np.arange(-1, 3, dtype=np.float64)
    d = np.abs((s - base)[:, None] - offsets[None, :])
    a = CUBIC_A
    weights = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                       np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))
    index = np.clip(base[:, None] + offsets[None, :], 0, src - 1).astype(np.int64)
    return index, weights.astype(np.float32)


def upscale_region(read: ReadBox, src_h: int, src_w: int, dst_h: int, dst_w: int,
                   y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Box y0:y1, x0:x1 of the src_h x src_w image resampled (bicubic) to dst_h x dst_w, float32 in 0..255.

    Only the source pixels under the box (plus the kernel's reach) are read."""
    iy, wy = cubic_taps(src_h, dst_h, y0, y1)
    ix, wx = cubic_taps(src_w, dst_w, x0, x1)
    r0, r1 = int(iy.min()), int(iy.max()) + 1
    c0, c1 = int(ix.min()), int(ix.max()) + 1
    source = np.asarray(read(r0, r1, c0, c1), dtype=np.float32)
    rows = np.zeros((y1 - y0, c1 - c0, 3), np.float32)
    for t in range(4):  # a fixed order of four terms: the same bits for a pixel whatever its tile
        rows += wy[:, t, None, None] * source[iy[:, t] - r0]
    out = np.zeros((y1 - y0, x1 - x0, 3), np.float32)
    for t in range(4):
        out += wx[None, :, t, None] * rows[:, ix[:, t] - c0]
    return np.clip(out, 0.0, 255.0)


def _blur(a: np.ndarray, radius: int) -> np.ndarray:
    """The a-trous wavelet's low pass: [1/4, 1/2, 1/4] dilated by `radius` along both axes, edges repeated."""
    r = radius
    n = a.shape[0]
    p = np.pad(a, ((r, r), (0, 0), (0, 0)), mode="edge")
    a = p[:n] + p[2 * r:2 * r + n]
    a += 2 * p[r:r + n]
    n = a.shape[1]
    p = np.pad(a, ((0, 0), (r, r), (0, 0)), mode="edge")
    a = p[:, :n] + p[:, 2 * r:2 * r + n]
    a += 2 * p[:, r:r + n]
    a *= np.float32(1 / 16)
    return a


def low_frequencies(a: np.ndarray, levels: int = WAVELET_LEVELS) -> np.ndarray:
    for i in range(levels):
        a = _blur(a, 2**i)
    return a


def wavelet_colour_fix(content: np.ndarray, reference: np.ndarray, levels: int = WAVELET_LEVELS) -> np.ndarray:
    """StableSR's wavelet colour fix: the refined tile's detail over the reference's low frequencies, uint8.

    The reference is the upscaled previous level, continuous across tiles, so neighbouring tiles get the same
    colour and brightness where they meet whatever the VAE and the sampler did to each."""
    content = np.asarray(content, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    fixed = content - low_frequencies(content, levels) + low_frequencies(reference, levels)
    return np.clip(np.rint(fixed), 0, 255).astype(np.uint8)


def seam_score(read: ReadBox, height: int, width: int, tile: int, period: int = SEAM_PERIOD,
               near: int = NEAR_LINES) -> float | None:
    """How much tile boundaries show as seams: the first of seam_statistics."""
    return seam_statistics(read, height, width, tile, period, near)[0]


def seam_statistics(read: ReadBox, height: int, width: int, tile: int, period: int = SEAM_PERIOD,
                    near: int = NEAR_LINES) -> tuple[float | None, float | None]:
    """(seam score, boundary detail ratio) of an image cut into `tile` px tiles, in one pass.

    Seam score: the summed absolute difference of the pixel pairs that straddle a tile boundary, divided by what
    the same pairs would sum to if they differed like the pairs one pixel apart across the `near` lines on each
    side of that boundary that lie a multiple of `period` px from it, inside the tiles (per direction: side by
    side for vertical boundaries, one above the other for horizontal ones). It measures a step at the boundary
    against its own surroundings: 1.0, no seam; above 1, a step in colour, brightness or texture; below 1, a
    border flatter than its surroundings (a decoder's zero padding shows so).

    Boundary detail ratio: the same straddling pairs against the lines at every multiple of `period` inside the
    tiles. It also reads a broad band of more or less detail along the boundaries, which a model whose tiles
    carry more detail near their box's edges than in their middle leaves (random weights do) and which no
    blend of independent tiles removes.

    The reference lines have the boundaries' phase on the model's grids (the decoder's 8 px, the UNet's
    coarsest feature map: pass the model's pixel alignment) and on a x2 upscale's pixel grid, whose own faint
    steps would otherwise count as seams. None for an image of one tile or without differences. Reads one tile
    (and one row and column more) at a time."""
    seam = np.zeros(2)                 # straddling pairs: summed |difference| (side by side, one above the other)
    seam_pairs = np.zeros(2, np.int64)
    close = np.zeros(2)                # pairs across the lines near a boundary, likewise
    close_pairs = np.zeros(2, np.int64)
    inner = np.zeros(2)                # pairs across every line inside the tiles, likewise
    inner_pairs = np.zeros(2, np.int64)
    for y0 in range(0, height, tile):
        y1 = min(height, y0 + tile)
        for x0 in range(0, width, tile):
            x1 = min(width, x0 + tile)
            top, left = max(0, y0 - 1), max(0, x0 - 1)
            a = np.asarray(read(top, y1, left, x1), dtype=np.int16)
            rows = a[y0 - top:]   # the tile's rows, with the column left of it when there is one
            cols = a[:, x0 - left:]
            for d, start, end, size, strip in ((0, x0, x1, width, rows), (1, y0, y1, height, cols)):
                offset = start - (left if d == 0 else top)   # the strip's index of the tile's first pixel
                for p in range(start + period, end, period):   # lines inside the tile
                    i = p - start + offset
                    diff = np.abs(strip[:, i] - strip[:, i - 1]) if d == 0 else np.abs(strip[i] - strip[i - 1])
                    inner[d] += diff.sum()
                    inner_pairs[d] += diff.size
                    # near the tile's first edge (a boundary when start > 0) or its last (when end < size)
                    if (start and p - start <= near * period) or (end < size and end - p <= near * period):
                        close[d] += diff.sum()
                        close_pairs[d] += diff.size
                if start:
                    i = offset
                    diff = np.abs(strip[:, i] - strip[:, i - 1]) if d == 0 else np.abs(strip[i] - strip[i - 1])
                    seam[d] += diff.sum()
                    seam_pairs[d] += diff.size

    def ratio(sums, pairs):
        expected = sum(seam_pairs[d] * sums[d] / pairs[d] for d in (0, 1) if pairs[d] and seam_pairs[d])
        return float(seam.sum() / expected) if seam_pairs.any() and expected else None

    return ratio(close, close_pairs), ratio(inner, inner_pairs)
