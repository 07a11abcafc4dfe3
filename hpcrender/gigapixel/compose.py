"""The writer's side of a level: patches in, the level image out, composed tile by tile in a fixed order."""

from __future__ import annotations

import numpy as np

from collections.abc import Iterator
from typing import NamedTuple

from hpcrender.gigapixel.pixels import low_frequencies, seam_statistics
from hpcrender.gigapixel.plan import Box, GigaPlan, TilePlan, contributors, tile_weights

# The window of the tiles' local detail variance and covariance: a-trous levels of 1..8 px, about 31 px across.
CORRELATION_LEVELS = 4


def compose_level(store, plan: GigaPlan, level: int) -> int:
    """Blend the stored patches of `level` into its image, one core tile at a time in raster order; returns how
    many tiles were composed (tiles composed before, by a run that was stopped, are kept). compose_rows does the
    work; this writes what it yields."""
    composed = 0
    for row, col, rgb in compose_rows(store, plan, level, range(plan.levels[level].rows)):
        store.write_level_tile(level, row, col, rgb)
        composed += 1
    return composed


def compose_rows(store, plan: GigaPlan, level: int, rows) -> Iterator[tuple[int, int, np.ndarray]]:
    """(row, col, uint8 pixels) of every tile of `rows` of `level` not composed yet, in raster order: what
    write_level_tile takes. `store` may be a reader: any rank can compose any row, with the same bytes.

    Each core pixel is a blend of the patches that reach it with their feather weights: the low frequencies (what
    the colour fix took from the shared reference) as a weighted mean, the detail as a weighted sum scaled so that
    its local variance stays that of the patches (blend_detail). Sums run in float32 in raster order of the patches, so
    the bytes do not depend on the order the tiles were rendered in, nor on which rows a rank composes. Memory: the
    patches of a 3 x 3 neighbourhood (more only when the overlap exceeds the tile), whatever the level's size."""
    lp = plan.levels[level]
    missing = store.missing_patches(level)
    if missing:
        raise ValueError(f"level {level}: {len(missing)} tile(s) not rendered yet, first {missing[0]}")
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    covariances: dict[tuple[int, int, int, int], tuple[Box, np.ndarray]] = {}
    for row in rows:
        for col in range(lp.cols):
            if store.is_composed(level, row, col):
                continue
            core = lp.tile_at(row, col).core
            parts = []
            for other in contributors(lp, row, col):
                part = other.extended.intersect(core)
                e = other.extended
                inside = (slice(part.y0 - e.y0, part.y1 - e.y0), slice(part.x0 - e.x0, part.x1 - e.x0))
                w = tile_weights(lp, other, plan.overlap)[inside]
                if not w.any():
                    continue
                pixels, detail, variance = _patch(store, level, other, cache)
                parts.append((other, part, w, pixels[inside], detail[inside], variance[inside]))
            yield row, col, blend_detail(core, parts, lambda a, b: _covariance(a, b, cache, covariances))
            # Within a row a patch is needed again only by the next `reach` tiles; each row reads its own.
            for key in [k for k in cache if k[1] < col + 1 - lp.reach]:
                del cache[key]
            for key in [k for k in covariances if max(k[1], k[3]) < col + 1 - lp.reach]:
                del covariances[key]
        cache.clear()
        covariances.clear()


def share_rows(rows: int, composers: int, position: int) -> range:
    """The rows of a level that composer `position` of `composers` blends: every composers-th row from its
    position, so that each gets rows from the whole level (the image's edges compose faster)."""
    if not 0 <= position < composers:
        raise ValueError(f"composer {position} of {composers}")
    return range(position, rows, composers)


def blend_detail(core: Box, parts: list, covariance) -> np.ndarray:
    """uint8 pixels of `core` from the patches reaching it: parts of (tile, box inside the core, weights (h, w, 1),
    pixels, detail (h, w, 3), local detail variance (h, w, 1)) in a fixed order; covariance(tile_a, tile_b) ->
    (their boxes' overlap, local covariance of their detail over it).

    Low frequencies: sum w_i low_i / sum w_i. Detail: sum w_i d_i scaled so that its local variance is the
    weighted mean of the patches' own, sum w_i v_i / sum w_i, instead of sum_ij w_i w_j c_ij: a plain mean where
    the patches agree, no faded band where their detail differs (a linear cross-fade of two unrelated textures
    halves the variance of their detail along the seam)."""
    shape = (core.height, core.width)
    low = np.zeros((*shape, 3), np.float32)
    detail = np.zeros((*shape, 3), np.float32)
    total = np.zeros((*shape, 1), np.float32)
    target = np.zeros((*shape, 1), np.float32)
    spread = np.zeros((*shape, 1), np.float32)
    for i, (tile, box, w, pixels, d, v) in enumerate(parts):
        into = (slice(box.y0 - core.y0, box.y1 - core.y0), slice(box.x0 - core.x0, box.x1 - core.x0))
        low[into] += w * (pixels.astype(np.float32) - d)
        detail[into] += w * d
        total[into] += w
        target[into] += w * v
        spread[into] += w * w * v
        for tile_b, box_b, w_b, *_ in parts[:i]:
            both = box.intersect(box_b)
            if both is None:
                continue
            pair, cov = covariance(tile_b, tile)
            cov = cov[both.y0 - pair.y0:both.y1 - pair.y0, both.x0 - pair.x0:both.x1 - pair.x0]
            here = (slice(both.y0 - core.y0, both.y1 - core.y0), slice(both.x0 - core.x0, both.x1 - core.x0))
            mine = w[both.y0 - box.y0:both.y1 - box.y0, both.x0 - box.x0:both.x1 - box.x0]
            theirs = w_b[both.y0 - box_b.y0:both.y1 - box_b.y0, both.x0 - box_b.x0:both.x1 - box_b.x0]
            spread[here] += 2 * mine * theirs * cov
    # Every core pixel has its own tile's weight (above 1/2 with overlap, 1 without).
    tiny = np.float32(1e-6)
    scale = np.where(spread > tiny, np.sqrt(np.maximum(target / total, 0) / np.maximum(spread, tiny)), 1 / total)
    out = low / total + detail * scale
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _patch(store, level: int, tile: TilePlan, cache: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stored patch, its detail (what the colour fix's low pass leaves) and the detail's local variance, cached
    for the row."""
    key = (tile.row, tile.col)
    if key not in cache:
        box = tile.extended
        stored_box, pixels = store.read_patch(level, tile.row, tile.col)
        if stored_box != (box.y0, box.y1, box.x0, box.x1):
            raise ValueError(f"{store.path}: level {level} tile {key} was stored over {stored_box}, the plan has "
                             f"{(box.y0, box.y1, box.x0, box.x1)}")
        pixels = np.asarray(pixels)
        detail = pixels.astype(np.float32) - low_frequencies(pixels.astype(np.float32))
        cache[key] = (pixels, detail, _local_mean(detail * detail))
    return cache[key]


def _local_mean(a: np.ndarray) -> np.ndarray:
    """Mean over the channels and a window of about 31 px (a-trous levels 1..8 px), (h, w, 1)."""
    return low_frequencies(a.mean(axis=2, keepdims=True), CORRELATION_LEVELS)


def _covariance(a: TilePlan, b: TilePlan, cache: dict, known: dict) -> tuple[Box, np.ndarray]:
    """Local covariance of two patches' detail over the overlap of their boxes, computed over the whole overlap so
    that a pixel's value does not depend on the core it is composed in."""
    key = (a.row, a.col, b.row, b.col)
    if key not in known:
        both = a.extended.intersect(b.extended)
        da = cache[(a.row, a.col)][1][both.y0 - a.extended.y0:both.y1 - a.extended.y0,
                                      both.x0 - a.extended.x0:both.x1 - a.extended.x0]
        db = cache[(b.row, b.col)][1][both.y0 - b.extended.y0:both.y1 - b.extended.y0,
                                      both.x0 - b.extended.x0:both.x1 - b.extended.x0]
        known[key] = (both, _local_mean(da * db))
    return known[key]


class Seams(NamedTuple):
    """What seam_statistics finds on one level: the seam score and the boundary detail ratio (None: one tile)."""

    score: float | None
    detail_ratio: float | None


def level_seams(store, plan: GigaPlan, level: int) -> Seams:
    """seam_statistics of a composed level over its tile grid, read tile by tile from the store, against lines
    inside the tiles on the same phase of the model's coarsest grid as the boundaries (seam_period)."""
    lp = plan.levels[level]
    return Seams(*seam_statistics(lambda y0, y1, x0, x1: store.read_level(level, y0, y1, x0, x1), lp.height,
                                  lp.width, lp.tile, seam_period(lp.tile, plan.alignment)))


def seam_period(tile: int, alignment: int) -> int:
    """The pixel alignment of the model (whose grid a random or real UNet leaves faint steps on), halved until a
    tile holds at least one such line besides its edge."""
    period = alignment
    while period > 1 and tile < 2 * period:
        period //= 2
    return period
