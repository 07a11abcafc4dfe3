"""Gigapixel renders: a base render, then x2 levels of overlapping tiles refined by img2img, each tile a unit that
any rank group renders in any order, composed level by level in a fixed order into the HDF5 level store.

plan.py holds the arithmetic, pixels.py the region-wise pixel operations, compose.py the writer's side, render.py
the torch side (imported on first use, so that planning and composing need no model), job.py a job from store to
exports. The work queue (run/gigapixel.py) drives it over every group of the world, and render.render_gigapixel
over one group, alike:

    plan = gigapixel_plan(job, vae_scale, alignment)          # or render.plan_for(pipe, job)
    store = job.open_store(job_dir, job, plan)                # the one writer
    level 0: render.render_base(...) -> store.write_patch(0, unit, patch); compose_level(store, plan, 0)
    level k: for unit in level_units(plan, k) (any group, any order, skipping store.patch_done):
                 render.render_tile(pipe, job, plan, unit, read_previous, layout, comms, device, should_stop)
                 -> store.write_patch(k, unit, patch)
             when store.missing_patches(k) is empty: compose_level(store, plan, k)
"""

from hpcrender.gigapixel.compose import Seams, compose_level, level_seams
from hpcrender.gigapixel.pixels import seam_score, seam_statistics
from hpcrender.gigapixel.plan import (
    Box, GigaPlan, LevelPlan, TilePatch, TilePlan, TileUnit, gigapixel_plan, level_units,
)

__all__ = [
    "Box", "GigaPlan", "LevelPlan", "TilePatch", "TilePlan", "TileUnit", "compose_level", "gigapixel_plan",
    "Seams", "level_seams", "level_units", "seam_score", "seam_statistics",
]
