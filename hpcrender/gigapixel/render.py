"""Rendering a gigapixel job's units on one rank group: the base render, one refinement tile (img2img over the
upscaled previous level, with noise keyed on position and a colour fix), and a sequential driver over all levels.

A tile's bytes depend only on the job, its level, its position and the previous level's pixels, so any group may
render any tile in any order; the pipeline's img2img stages do the work, band-parallel inside the group.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hpcrender.config import ControlNetConfig, Job, Mode
from hpcrender.gigapixel.compose import Seams, compose_level, level_seams
from hpcrender.gigapixel.pixels import ReadBox, upscale_region, wavelet_colour_fix
from hpcrender.gigapixel.plan import GigaPlan, TilePatch, TileUnit, gigapixel_plan, level_units
from hpcrender.models.facts import ModelFacts, facts_of
from hpcrender.parallel.bands import image_bands
from hpcrender.parallel.gather import array_from_leader, objects_from_leader
from hpcrender.parallel.layout import Comms, GroupLayout, check_layout
from hpcrender.render.image import gigapixel_stages, layout_of, render_image
from hpcrender.render.latents import noised_to, to_latent_space
from hpcrender.render.stages import Render, conditioning, denoise, encode_image, finish, peak_memory, timesteps

# Latent pixels per side of a noise block: each block's noise comes from its own generator, keyed on
# (seed, level, block row, block column), so overlapping tiles draw the same noise where they overlap.
NOISE_BLOCK = 64


def plan_for(facts: ModelFacts, job: Job) -> GigaPlan:
    """The job's plan for a loaded model (its VAE scale and the denoiser's alignment)."""
    return gigapixel_plan(job, facts.vae_scale, facts.alignment)


def block_seed(seed: int, level: int, block_row: int, block_col: int) -> int:
    """The generator seed of one noise block: a hash, so that neighbouring blocks and levels are unrelated."""
    digest = hashlib.sha256(f"hpcrender-noise:{seed}:{level}:{block_row}:{block_col}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def position_noise(seed: int, level: int, channels: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """Standard normal noise (1, channels, y1 - y0, x1 - x0) over a box of a level's latent grid, float32: cut
    from the fixed NOISE_BLOCK grid of per-block generators, so a latent pixel's noise is a function of
    (seed, level, its coordinates) alone."""
    out = torch.empty((1, channels, y1 - y0, x1 - x0), dtype=torch.float32)
    b = NOISE_BLOCK
    for br in range(y0 // b, -(-y1 // b)):
        for bc in range(x0 // b, -(-x1 // b)):
            gen = torch.Generator("cpu").manual_seed(block_seed(seed, level, br, bc))
            block = torch.randn((channels, b, b), generator=gen, dtype=torch.float32)
            ty0, ty1 = max(y0, br * b), min(y1, (br + 1) * b)
            tx0, tx1 = max(x0, bc * b), min(x1, (bc + 1) * b)
            out[0, :, ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] = block[:, ty0 - br * b:ty1 - br * b,
                                                                   tx0 - bc * b:tx1 - bc * b]
    return out


def pipeline_stages(pipe, job: Job, plan: GigaPlan, layout: GroupLayout) -> tuple | None:
    """A pipefusion job's stages for all its units (render.image.gigapixel_stages); None for other modes."""
    if job.parallel.mode is not Mode.PIPEFUSION or layout.patch_ranks < 2:
        return None
    return gigapixel_stages(pipe.transformer.config, job, plan, layout.patch_ranks)


def base_job(job: Job, plan: GigaPlan) -> Job:
    """The base render as an ordinary text-to-image job of the base level's size."""
    base = plan.levels[0]
    return dataclasses.replace(job, width=base.width, height=base.height, gigapixel=None, init_image=None)


def render_base(pipe, job: Job, plan: GigaPlan, layout: GroupLayout, comms: Comms, device,
                should_stop: Callable[[], bool] | None = None, *, facts: ModelFacts | None = None,
                stages: tuple | None = None) -> TilePatch | None:
    """Level 0: text-to-image at the base size from the job's seed; the image on the group's first rank, None
    when stopped (the base is cheap beside the levels: it is rendered again on resume). stages: a pipefusion
    job's (pipeline_stages), the same for every unit."""
    base = base_job(job, plan)
    pipeline = None
    if stages is not None:
        pipeline = layout_of(pipe.transformer.config, base, layout.patch_ranks, plan.vae_scale, cut=stages)
    result = render_image(pipe, base, layout, comms, device, should_stop=should_stop, facts=facts,
                          pipeline=pipeline)
    if result.stopped_at is not None:
        return None
    base = plan.levels[0]
    return TilePatch(0, 0, 0, (0, base.height, 0, base.width), result.image) if layout.rank == 0 else _NOT_LEADER


def render_tile(pipe, job: Job, plan: GigaPlan, unit: TileUnit, read_previous: ReadBox | None, layout: GroupLayout,
                comms: Comms, device, should_stop: Callable[[], bool] | None = None, *,
                colour_fix: bool = True, facts: ModelFacts | None = None, controlnet=None,
                stages: tuple | None = None) -> TilePatch | None:
    """Refine one tile of a level >= 1 on this rank group: the previous level upscaled over the tile's extended
    box, encoded, noised with position-keyed noise to the strength's first step, denoised (band-parallel when the
    group has several ranks), decoded and colour-fixed against the upscaled reference.

    read_previous(y0, y1, x0, x1) reads the previous level; it is called on the group's first rank only (the
    others may pass None) and the upscaled box is broadcast to the group. Returns the patch on the group's first
    rank (a TilePatch with pixels None elsewhere); None when should_stop said so between two denoising steps.
    should_stop must give the group's common answer. facts: the loaded model's, asked of the pipeline when not
    given. controlnet: the loaded ControlNetModel of job.gigapixel.controlnet (a tile model), conditioned on the
    tile's upscaled reference box at scale 1 over every step, as Ultimate SD Upscale's tile recipe does. stages: a
    pipefusion job's (pipeline_stages): the tile's patches are its own, the stages the job's."""
    if unit.level < 1 or unit.level >= len(plan.levels):
        raise ValueError(f"{unit}: refinement levels are 1..{len(plan.levels) - 1}")
    level, previous = plan.levels[unit.level], plan.levels[unit.level - 1]
    box = level.tile_at(unit.row, unit.col).extended
    tile_control = ()
    if controlnet is not None:  # the reference box is the image: no file, nothing more in the job's hash
        tile_control = (ControlNetConfig(model=job.gigapixel.controlnet, image="", sha256=""),)
    tile_job = dataclasses.replace(job, width=box.width, height=box.height, gigapixel=None, init_image=None,
                                   controlnets=tile_control)
    check_layout(layout.size, layout.split_cfg, tile_job.guidance_scale > 1.0)
    run = Render(pipe, facts_of(pipe) if facts is None else facts, tile_job, layout, comms, device,
                 should_stop=should_stop, controlnets=() if controlnet is None else (controlnet,))
    if run.parallel:
        run.bands = run.result.bands = image_bands(tile_job.height, plan.vae_scale,
                                                   plan.alignment // plan.vae_scale, layout.patch_ranks)
    if run.pipelined:
        run.pipeline = layout_of(pipe.transformer.config, tile_job, layout.patch_ranks, plan.vae_scale,
                                 cut=stages if stages is not None else pipeline_stages(pipe, job, plan, layout))
    reference = None
    if layout.rank == 0:
        reference = upscale_region(read_previous, previous.height, previous.width, level.height, level.width,
                                   box.y0, box.y1, box.x0, box.x1)
    reference = array_from_leader(reference, (box.height, box.width, 3), layout, comms)
    if controlnet is not None:  # uint8 (H, W, 3) -> (1, 3, H, W) in [0, 1], as the control image processor scales
        run.control_pixels = (torch.from_numpy(reference.astype("float32") / 255.0).permute(2, 0, 1)[None],)

    cond = conditioning(run)
    scheduler = timesteps(run, first=plan.first_step)
    pixels = torch.from_numpy(reference.transpose(2, 0, 1)[None].copy()) / 127.5 - 1.0
    with torch.no_grad():
        moments = encode_image(run, pixels)
    channels = moments.shape[1] // 2
    # The latent distribution's mean: a sample would need noise of its own, and adds nothing at these strengths.
    latent = to_latent_space(pipe.vae.config, moments[:, :channels])
    s = plan.vae_scale
    noise = position_noise(job.seed, unit.level, channels, box.y0 // s, box.y1 // s, box.x0 // s, box.x1 // s)
    start = noised_to(scheduler, latent, noise, plan.first_step)
    latent = denoise(run, cond, scheduler, run.band_of(start), plan.first_step)
    if run.result.stopped_at is not None:
        return None
    result = finish(run, scheduler, latent, decode=True)
    if layout.rank != 0:
        return _NOT_LEADER
    image = wavelet_colour_fix(result.image, reference) if colour_fix else result.image
    return TilePatch(unit.level, unit.row, unit.col, (box.y0, box.y1, box.x0, box.x1), image)


# What the group's other ranks get back from a finished unit: no pixels, but not None (None means stopped).
_NOT_LEADER = TilePatch(-1, -1, -1, (0, 0, 0, 0), None)


@dataclass
class GigaResult:
    plan: GigaPlan
    stopped: bool = False
    tiles_rendered: int = 0                      # units rendered by this run (a resumed run skips stored ones)
    base_seconds: float = 0.0
    tile_seconds: list[float] = field(default_factory=list)
    compose_seconds: float = 0.0
    seams: dict[int, Seams] = field(default_factory=dict)  # level -> its seams; on the group's first rank
    peak_memory_bytes: int = 0


def render_gigapixel(pipe, job: Job, store, layout: GroupLayout, comms: Comms, device,
                     should_stop: Callable[[], bool] | None = None,
                     on_tile: Callable[[TileUnit, int, int], None] | None = None, *,
                     colour_fix: bool = True, facts: ModelFacts | None = None, controlnet=None) -> GigaResult:
    """Base, then every level's missing tiles in raster order, then its composition: the whole job on one group.

    `store` (a LevelStore for the plan, open for writing) is needed on the group's first rank only. A stop (asked
    between tiles and between denoising steps) loses at most the tile in flight; rerunning resumes from the store.
    on_tile(unit, done, total) follows every stored unit. The group's other ranks wait for the first rank's
    composition of a level in the next level's first broadcast (within the collective timeout). controlnet: the
    loaded tile ControlNet of job.gigapixel.controlnet (render_tile)."""
    facts = facts_of(pipe) if facts is None else facts
    plan = plan_for(facts, job)
    leader = layout.rank == 0
    result = GigaResult(plan)
    stages = pipeline_stages(pipe, job, plan, layout)
    total = len(plan.levels[0].tiles) + plan.total_tiles
    done = 0
    for lp in plan.levels:
        k = lp.index
        todo = objects_from_leader(
            None if not leader else (None if store.level_complete(k) else store.missing_patches(k)), layout, comms)
        if todo is None:  # composed by an earlier run
            done += len(lp.tiles)
            continue
        done += len(lp.tiles) - len(todo)
        todo = set(todo)
        for unit in level_units(plan, k):
            if (unit.row, unit.col) not in todo:
                continue
            if should_stop is not None and should_stop():
                result.stopped = True
                return result
            t0 = time.perf_counter()
            if k == 0:
                patch = render_base(pipe, job, plan, layout, comms, device, should_stop, facts=facts, stages=stages)
            else:
                read = (lambda y0, y1, x0, x1, k=k: store.read_level(k - 1, y0, y1, x0, x1)) if leader else None
                patch = render_tile(pipe, job, plan, unit, read, layout, comms, device, should_stop,
                                    colour_fix=colour_fix, facts=facts, controlnet=controlnet, stages=stages)
            if patch is None:
                result.stopped = True
                return result
            if leader:
                store.write_patch(k, unit, patch)
            seconds = time.perf_counter() - t0
            if k == 0:
                result.base_seconds = seconds
            else:
                result.tile_seconds.append(seconds)
            result.tiles_rendered += 1
            done += 1
            if on_tile is not None:
                on_tile(unit, done, total)
        if leader:
            t0 = time.perf_counter()
            compose_level(store, plan, k)
            result.compose_seconds += time.perf_counter() - t0
    if leader:
        for lp in plan.levels[1:]:
            result.seams[lp.index] = level_seams(store, plan, lp.index)
    result.peak_memory_bytes = peak_memory(device)
    return result
