"""Gigapixel renders: a base render, then x2 levels of overlapping tiles refined by img2img, each tile a unit that
any rank group renders in any order, composed level by level in a fixed order into the HDF5 level store.

plan.py holds the arithmetic, pixels.py the region-wise pixel operations, compose.py the writer's side, render.py
the torch side (imported on first use, so that planning and composing need no model)."""

from hpcrender.gigapixel.compose import compose_level, level_seam_score
from hpcrender.gigapixel.pixels import seam_score
from hpcrender.gigapixel.plan import (
    Box, GigaPlan, LevelPlan, TilePatch, TilePlan, TileUnit, gigapixel_plan, level_units,
)

__all__ = [
    "Box", "GigaPlan", "LevelPlan", "TilePatch", "TilePlan", "TileUnit", "compose_level", "gigapixel_plan",
    "level_seam_score", "level_units", "seam_score",
]
