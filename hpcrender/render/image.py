"""One image on one rank group: text-to-image and img2img, two compositions of the stages."""

from __future__ import annotations

import dataclasses
from typing import Callable

from hpcrender.config import Job
from hpcrender.errors import BadInput
from hpcrender.models import text_tokens_of
from hpcrender.models.facts import ModelFacts, facts_of
from hpcrender.parallel.bands import image_bands
from hpcrender.parallel.layout import Comms, GroupLayout, check_layout
from hpcrender.parallel.pipeline import default_text_tokens, output_channels, pipeline_layout
from hpcrender.render.checkpoint import Checkpoint
from hpcrender.render.options import PIPEFUSION_UNET, check_size
from hpcrender.render.stages import (
    Between, ImageResult, Render, checkpoint_latent, conditioning, denoise, finish, image_latent, noise_latent,
    timesteps,
)


def text_to_image(run: Render, resume: Checkpoint | None = None, decode: bool = True) -> ImageResult:
    cond = conditioning(run)
    scheduler = timesteps(run)
    latent, start = checkpoint_latent(run, scheduler, resume) if resume else noise_latent(run, scheduler)
    latent = denoise(run, cond, scheduler, latent, start)
    return finish(run, scheduler, latent, decode)


def img2img(run: Render, resume: Checkpoint | None = None, decode: bool = True) -> ImageResult:
    cond = conditioning(run)
    scheduler = timesteps(run, first=run.job.first_step)
    latent, start = checkpoint_latent(run, scheduler, resume) if resume else image_latent(run, scheduler)
    latent = denoise(run, cond, scheduler, latent, start)
    return finish(run, scheduler, latent, decode)


def render_image(pipe, job: Job, layout: GroupLayout, comms: Comms, device,
                 on_step: Callable[[int, int], None] | None = None, decode: bool = True,
                 should_stop: Callable[[], bool] | None = None, resume: Checkpoint | None = None,
                 on_collective: Callable[[], None] | None = None, bands: tuple = (),
                 facts: ModelFacts | None = None, between: Callable[[], Between] | None = None,
                 on_checkpoint: Callable[[Checkpoint | None], None] | None = None,
                 controlnets: tuple = (), pipeline=None) -> ImageResult:
    """Render `job` with this rank's share of the work; the group's first rank gets the image (and the latent).

    facts: the loaded model's (models.facts), asked of the pipeline here when not given.
    bands: the run plan's latent bands for a band-parallel layout; found from the loaded model when not given.
    pipeline: the run plan's stages and patches for pipefusion (parallel.pipeline.PipelineLayout), likewise.
    decode=False stops after the denoising loop (benchmarks of the UNet alone). should_stop is asked after every
    step but the last, on every rank of the group alike (it must give the group's common answer): when it says
    yes, the loop ends there and the group's first rank gets a checkpoint instead of an image. resume continues
    from such a checkpoint. between, when given, is asked instead of should_stop (the group's common answer too) and
    may also ask for a periodic checkpoint, which on_checkpoint receives (the whole state on the group's first rank,
    None on the others) before the loop goes on. controlnets: the loaded ControlNetModel of each of job.controlnets
    (models.load_controlnet), band-parallel beside the UNet when it is. on_collective is called before the group's
    first torch.distributed collective (never on a group of one): a failure after it may leave the group's
    communicator out of step.
    """
    facts = facts_of(pipe) if facts is None else facts
    check_layout(layout.size, layout.split_cfg, facts.uses_guidance(job.guidance_scale))
    check_size(facts, job)
    if len(controlnets) != len(job.controlnets):
        raise BadInput(f"{len(job.controlnets)} ControlNet(s) in the job, {len(controlnets)} loaded")
    if controlnets and facts.transformer:
        raise BadInput(f"controlnet: ControlNet applies to the UNets of SD 1.x/2.x and SDXL, not to a "
                       f"{facts.family.value} transformer")
    run = Render(pipe, facts, job, layout, comms, device, on_step=on_step, should_stop=should_stop,
                 between=between, on_checkpoint=on_checkpoint, on_collective=on_collective,
                 controlnets=tuple(controlnets))
    if run.parallel:
        if not bands:
            bands = image_bands(job.height, facts.vae_scale, facts.alignment, layout.patch_ranks)
        run.bands = run.result.bands = tuple(bands)
    held = getattr(getattr(pipe, "transformer", None), "_hpcrender_stage", None)
    if held is not None and not run.pipelined:
        raise BadInput(f"this model holds only stage {held[1]} of a pipefusion render's weights: load it again "
                       f"for mode {job.parallel.mode.value}")
    if run.pipelined:
        if not facts.transformer:
            raise BadInput(PIPEFUSION_UNET)
        run.pipeline = pipeline or layout_of(pipe.transformer.config, job, layout.patch_ranks, facts.vae_scale)
    compose = img2img if job.init_image is not None else text_to_image
    return compose(run, resume, decode)


def layout_of(config, job: Job, stages: int, vae_scale: int, cut: tuple | None = None):
    """A pipefusion job's stages and patches from its loaded transformer's config (the run plan's, when it could not
    read the configs before loading); cut: the stages, fixed beforehand (a gigapixel job's)."""
    rows, width = job.height // vae_scale, job.width // vae_scale
    text = text_tokens_of(job.model) or default_text_tokens(config)
    return pipeline_layout(config, stages, job.parallel.pipeline_patches, rows, width, text, output_channels(config),
                           cut=cut)


def gigapixel_stages(config, job: Job, plan, stages: int) -> tuple:
    """The stages of a pipefusion gigapixel job: balanced at its largest tile, the same for every unit."""
    height, width = plan.tile_shape
    return layout_of(config, dataclasses.replace(job, width=width, height=height, gigapixel=None, init_image=None),
                     stages, plan.vae_scale).stages
