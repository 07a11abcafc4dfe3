"""The arithmetic of a gigapixel render: level sizes, each level's tile grid (cores and extended boxes), feather
weights and which tiles blend into a core. Pure functions, no torch, no files."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcrender.config import Job, first_step
from hpcrender.errors import BadInput


@dataclass(frozen=True)
class Box:
    """A half-open pixel box of one level: rows y0:y1, columns x0:x1."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def intersect(self, other: Box) -> Box | None:
        y0, y1 = max(self.y0, other.y0), min(self.y1, other.y1)
        x0, x1 = max(self.x0, other.x0), min(self.x1, other.x1)
        return Box(y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


@dataclass(frozen=True)
class TilePlan:
    """One tile of a level: the core it owns in the level image and the extended box it is rendered over
    (the core, `overlap` px of context on each side inside the image, grown to the model's alignment)."""

    row: int
    col: int
    core: Box
    extended: Box


@dataclass(frozen=True)
class LevelPlan:
    """One level: its size and tile grid. Level 0 is the base render, one tile covering the whole image."""

    index: int
    height: int
    width: int
    tile: int
    rows: int
    cols: int
    tiles: tuple[TilePlan, ...]  # raster order
    reach: int = 0               # how many tiles away an extended box can reach past its core

    def tile_at(self, row: int, col: int) -> TilePlan:
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"tile ({row}, {col}) outside level {self.index}'s {self.rows} x {self.cols} grid")
        return self.tiles[row * self.cols + col]

    @property
    def patch_shape(self) -> tuple[int, int]:
        """The largest extended box of the level (height, width): what a stored patch slot holds."""
        return max(t.extended.height for t in self.tiles), max(t.extended.width for t in self.tiles)


@dataclass(frozen=True)
class GigaPlan:
    job_name: str
    height: int
    width: int
    overlap: int
    vae_scale: int
    alignment: int          # pixels: every level side and every extended box side is a multiple of it
    base_steps: int         # denoising steps of the base render
    tile_steps: int         # denoising steps of one tile (the last `strength` of the schedule)
    first_step: int         # the schedule's first step a tile runs
    levels: tuple[LevelPlan, ...]
    calls_per_step: int = 1  # UNet evaluations per step (per guidance branch): Heun's 2, its last step 1

    @property
    def tile_shape(self) -> tuple[int, int]:
        """The largest extended box of any refinement level (height, width), px; the base's size without levels."""
        if len(self.levels) == 1:
            return self.levels[0].height, self.levels[0].width
        return (max(lv.patch_shape[0] for lv in self.levels[1:]), max(lv.patch_shape[1] for lv in self.levels[1:]))

    @property
    def unit_heights(self) -> tuple[int, ...]:
        """Every height a unit is rendered at (the base's, each tile's extended box), px, once each, ascending."""
        heights = {self.levels[0].height} | {t.extended.height for lv in self.levels[1:] for t in lv.tiles}
        return tuple(sorted(heights))

    @property
    def base_calls(self) -> int:
        return _calls(self.base_steps, self.calls_per_step)

    @property
    def tile_calls(self) -> int:
        return _calls(self.tile_steps, self.calls_per_step)

    @property
    def total_tiles(self) -> int:
        """Refinement tiles of all levels (the base render not counted)."""
        return sum(len(level.tiles) for level in self.levels[1:])

    @property
    def unet_evaluations(self) -> int:
        return self.base_calls + self.total_tiles * self.tile_calls


def _calls(steps: int, calls_per_step: int) -> int:
    """UNet evaluations of `steps` steps run to the schedule's end (config.SchedulerName.denoiser_calls)."""
    return calls_per_step * steps - (calls_per_step - 1) if steps else 0


@dataclass(frozen=True)
class TileUnit:
    """What a rank group is handed: one tile of one level of one job."""

    job_name: str
    level: int
    row: int
    col: int


def gigapixel_plan(job: Job, vae_scale: int, alignment: int) -> GigaPlan:
    """The levels and tiles of `job`'s gigapixel render for a model whose VAE has `vae_scale` pixels per latent
    and whose UNet needs latent sides that are multiples of `alignment` (both from the loaded model).

    Base render `base` px on the longer side (aspect kept, sides rounded to the pixel alignment), then x2 levels,
    the last by any factor in (1, 2] on the longer side up to the job's width x height."""
    giga = job.gigapixel
    if giga is None:
        raise BadInput(f"{job.name}: not a gigapixel job")
    if vae_scale < 1 or alignment < 1:
        raise BadInput(f"vae_scale and alignment must be positive, got {vae_scale} and {alignment}")
    align = vae_scale * alignment
    for key, value in (("width", job.width), ("height", job.height)):
        if value % align:
            raise BadInput(f"{key}: a gigapixel image needs a multiple of {align} px with this "
                           f"model ({vae_scale} px per latent x {alignment} latents), got {value}")
    if not 0 <= giga.overlap < giga.tile:
        raise BadInput(f"gigapixel.overlap: must be >= 0 and smaller than the tile ({giga.tile}), "
                       f"got {giga.overlap}")
    if not 0 < giga.base <= max(job.width, job.height):
        raise BadInput(f"gigapixel.base: must be in 1..{max(job.width, job.height)}, got {giga.base}")
    first = first_step(job.steps, giga.strength)
    if first >= job.steps:
        raise BadInput(f"gigapixel.strength: {giga.strength} with {job.steps} steps runs no "
                       "denoising step on a tile")
    sizes = level_sizes(job.height, job.width, giga.base, align)
    levels = [_base_level(*sizes[0])]
    for index, (height, width) in enumerate(sizes[1:], start=1):
        levels.append(_tile_level(index, height, width, giga.tile, giga.overlap, align))
    return GigaPlan(job_name=job.name, height=job.height, width=job.width, overlap=giga.overlap,
                    vae_scale=vae_scale, alignment=align, base_steps=job.steps, tile_steps=job.steps - first,
                    first_step=first, levels=tuple(levels), calls_per_step=job.scheduler.calls_per_step)


def level_sizes(height: int, width: int, base: int, align: int) -> tuple[tuple[int, int], ...]:
    """(height, width) of every level: the base (longer side `base` rounded to `align`, the other side in proportion,
    at least `align`), doubled while the next doubling stays short of the target, then the target itself."""
    longest = max(height, width)

    def scaled(side: int) -> int:  # side * base / longest, to the nearest multiple of align (ties up)
        return max(align, (2 * side * base + longest * align) // (2 * longest * align) * align)

    h, w = scaled(height), scaled(width)
    sizes = [(h, w)]
    base_long = w if width >= height else h
    while base_long * 2 < longest:
        h, w, base_long = 2 * h, 2 * w, 2 * base_long
        sizes.append((h, w))
    if sizes[-1] != (height, width):
        sizes.append((height, width))
    return tuple(sizes)


def extend(c0: int, c1: int, overlap: int, size: int, align: int) -> tuple[int, int]:
    """The extended span of core span [c0, c1) on an axis of `size` px: `overlap` px of context on each side,
    clipped to the axis, then grown to a multiple of `align` (downwards, or upwards at the far edge).
    `size` must be a multiple of `align`."""
    e0, e1 = max(0, c0 - overlap), min(size, c1 + overlap)
    length = -(-(e1 - e0) // align) * align
    e1 = min(size, e0 + length)
    return e1 - length, e1


def _base_level(height: int, width: int) -> LevelPlan:
    whole = Box(0, height, 0, width)
    return LevelPlan(0, height, width, max(height, width), 1, 1, (TilePlan(0, 0, whole, whole),))


def _tile_level(index: int, height: int, width: int, tile: int, overlap: int, align: int) -> LevelPlan:
    rows, cols = -(-height // tile), -(-width // tile)
    tiles = []
    for row in range(rows):
        y0, y1 = row * tile, min(height, (row + 1) * tile)
        ey = extend(y0, y1, overlap, height, align)
        for col in range(cols):
            x0, x1 = col * tile, min(width, (col + 1) * tile)
            ex = extend(x0, x1, overlap, width, align)
            tiles.append(TilePlan(row, col, Box(y0, y1, x0, x1), Box(*ey, *ex)))
    # A box passes its core by the overlap plus less than one alignment step of growth.
    margin = max(max(t.core.y0 - t.extended.y0, t.extended.y1 - t.core.y1,
                     t.core.x0 - t.extended.x0, t.extended.x1 - t.core.x1) for t in tiles)
    return LevelPlan(index, height, width, tile, rows, cols, tuple(tiles), reach=-(-margin // tile))


def level_units(plan: GigaPlan, level: int) -> tuple[TileUnit, ...]:
    """The units of one level in raster order; any group may render any of them, in any order."""
    if not 0 <= level < len(plan.levels):
        raise IndexError(f"level {level} outside the plan's {len(plan.levels)} levels")
    return tuple(TileUnit(plan.job_name, level, t.row, t.col) for t in plan.levels[level].tiles)


def contributors(level: LevelPlan, row: int, col: int) -> tuple[TilePlan, ...]:
    """The tiles whose extended box reaches into the core of tile (row, col), in raster order: the fixed order in
    which their patches are accumulated there."""
    core = level.tile_at(row, col).core
    rows = range(max(0, row - level.reach), min(level.rows, row + level.reach + 1))
    cols = range(max(0, col - level.reach), min(level.cols, col + level.reach + 1))
    found = (level.tile_at(r, c) for r in rows for c in cols)
    return tuple(t for t in found if t.extended.intersect(core) is not None)


def feather(c0: int, c1: int, e0: int, e1: int, overlap: int, size: int) -> np.ndarray:
    """Blend weights along one axis of an extended span [e0, e1) whose core is [c0, c1), float32.

    A linear ramp across the 2 x overlap px centred on each core edge that has a neighbour (1 at an image edge), so
    two neighbours' weights sum to 1 across their overlap; 1 on the core and 0 outside it when overlap is 0.
    """
    p = np.arange(e0, e1, dtype=np.float64) + 0.5  # pixel centres
    if overlap == 0:
        return ((p > c0) & (p < c1)).astype(np.float32)
    left = np.ones_like(p) if c0 == 0 else np.clip((p - (c0 - overlap)) / (2 * overlap), 0.0, 1.0)
    right = np.ones_like(p) if c1 == size else np.clip(((c1 + overlap) - p) / (2 * overlap), 0.0, 1.0)
    return (left * right).astype(np.float32)


def tile_weights(level: LevelPlan, tile: TilePlan, overlap: int) -> np.ndarray:
    """2-D blend weights (h, w, 1) over a tile's extended box: the product of the two axes' feathers."""
    c, e = tile.core, tile.extended
    wy = feather(c.y0, c.y1, e.y0, e.y1, overlap, level.height)
    wx = feather(c.x0, c.x1, e.x0, e.x1, overlap, level.width)
    return (wy[:, None] * wx[None, :])[..., None]


def preview_level(plan: GigaPlan, side: int) -> int:
    """The smallest level whose longer side reaches `side` px (or the last): what a preview is reduced from."""
    for level in plan.levels:
        if max(level.height, level.width) >= side:
            return level.index
    return len(plan.levels) - 1


@dataclass(frozen=True, eq=False)
class TilePatch:
    """A refined tile: its extended box (y0, y1, x0, x1) in its level and the uint8 RGB pixels over it."""

    level: int
    row: int
    col: int
    box: tuple[int, int, int, int]
    pixels: np.ndarray
