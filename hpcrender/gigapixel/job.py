"""A gigapixel job from start to outputs on one rank group: the level store opened (or resumed), the sequential
driver, the exports, and what meta.json records of it (levels, tiles, timings, seam scores)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from hpcrender.config import Job
from hpcrender.errors import HpcrenderError
from hpcrender.gigapixel.compose import Seams, seam_period
from hpcrender.gigapixel.plan import GigaPlan, preview_level
from hpcrender.gigapixel.render import plan_for, render_gigapixel
from hpcrender.models.facts import facts_of
from hpcrender.output.export import PREVIEW_MAX_SIDE, export_job
from hpcrender.output.records import meta_header
from hpcrender.output.store import LevelShape, LevelStore
from hpcrender.parallel.gather import objects_from_leader

STORE_NAME = "tiles.h5"


def level_shapes(plan: GigaPlan) -> tuple[LevelShape, ...]:
    """The level store's layout for a plan: each level's size, its tile as the chunk, the largest patch."""
    return tuple(LevelShape(lp.height, lp.width, lp.tile, *lp.patch_shape) for lp in plan.levels)


def open_store(job_dir: Path, job: Job, plan: GigaPlan, resume: bool = True) -> LevelStore:
    """The job's level store for writing (resumed when it was written for the same job and plan)."""
    store = LevelStore.open(Path(job_dir) / STORE_NAME, levels=level_shapes(plan), params_hash=job.params_hash(),
                            resume=resume)
    try:
        if "job" not in store.attrs:
            store.set_attrs(job=job.to_dict(), levels=[[lp.width, lp.height, lp.tile] for lp in plan.levels])
    except BaseException:
        store.close()
        raise
    return store


@dataclass
class GigaJobOutcome:
    result: object                                  # render.GigaResult
    exported: list[Path] = field(default_factory=list)


def render_job(pipe, job: Job, job_dir: Path, layout, comms, device, *, resume: bool = True, should_stop=None,
               on_tile=None, colour_fix: bool = True) -> GigaJobOutcome:
    """Render (or resume) a gigapixel job on this rank group; the group's first rank holds the store, writes every
    unit and exports image.png or image.tif and preview.png (from a small level) when the job is complete."""
    facts = facts_of(pipe)
    plan = plan_for(facts, job)
    leader = layout.rank == 0
    store, problem = None, None
    if leader:
        try:
            store = open_store(job_dir, job, plan, resume)
        except HpcrenderError as e:
            problem = e
    # The whole group stops when the store cannot be opened: the others would wait for the first rank forever.
    refused = objects_from_leader(None if problem is None else str(problem), layout, comms)
    if problem is not None:
        raise problem
    if refused is not None:
        raise HpcrenderError(refused)
    try:
        result = render_gigapixel(pipe, job, store, layout, comms, device, should_stop, on_tile,
                                  colour_fix=colour_fix, facts=facts)
        exported = []
        if leader and not result.stopped:
            preview = store.level(preview_level(plan, PREVIEW_MAX_SIDE))
            exported = export_job(store.final(), job_dir, preview_from=preview)
    finally:
        if store is not None:
            store.close()
    return GigaJobOutcome(result, exported)


def _seams(result, level: int) -> Seams:
    return result.seams.get(level, Seams(None, None))


def gigapixel_meta(outcome: GigaJobOutcome) -> dict:
    """meta.json's `gigapixel` section."""
    result = outcome.result
    plan = result.plan
    final = plan.levels[-1].index
    tiles = result.tile_seconds
    return {
        "levels": [{"level": lp.index, "width": lp.width, "height": lp.height, "tile": lp.tile, "rows": lp.rows,
                    "cols": lp.cols, "seam_score": _round(_seams(result, lp.index).score),
                    "boundary_detail_ratio": _round(_seams(result, lp.index).detail_ratio)}
                   for lp in plan.levels],
        "seam_score": _round(_seams(result, final).score),
        "seam_score_definition": "summed |difference| of pixel pairs straddling tile boundaries of the final level, "
                                 "divided by its expectation from the pairs across the lines seam_period px either "
                                 "side of each boundary, inside the tiles (1.0: no seams)",
        "boundary_detail_ratio": _round(_seams(result, final).detail_ratio),
        "boundary_detail_ratio_definition": "the same straddling pairs against the lines at every multiple of "
                                            "seam_period px inside the tiles (a band of more or less detail along "
                                            "the boundaries shows here and not in the seam score)",
        "seam_period": seam_period(plan.levels[-1].tile, plan.alignment),
        "overlap": plan.overlap,
        "alignment": plan.alignment,
        "tiles": plan.total_tiles,
        "unet_evaluations": plan.unet_evaluations,
        "first_step": plan.first_step,
        "units_rendered": result.tiles_rendered,
        "base_seconds": round(result.base_seconds, 4),
        "tile_seconds_mean": round(sum(tiles) / len(tiles), 4) if tiles else None,
        "tile_seconds_max": round(max(tiles), 4) if tiles else None,
        "compose_seconds": round(result.compose_seconds, 4),
    }


def _round(x):
    return None if x is None else round(x, 4)


def job_meta(job: Job, outcome: GigaJobOutcome, layout, comms, peaks: list, started: float, world_size: int,
             device) -> dict:
    """meta.json of a gigapixel job: as an ordinary job's (job, model, versions, layout, timings, peak memory,
    outputs) with the gigapixel section."""
    return {
        **meta_header(job),
        "layout": {"world_size": world_size, "ranks": list(comms.global_ranks), "mode": job.parallel.mode.value,
                   "split_cfg": layout.split_cfg, "nodes": sorted({p["node"] for p in peaks}), "device": str(device)},
        "timings": {"started": started, "finished": time.time(), "seconds": round(time.time() - started, 3)},
        "peak_memory": peaks,
        "gigapixel": gigapixel_meta(outcome),
        "outputs": [p.name for p in outcome.exported],
    }
