"""`hpcrender verify`: jobs rendered single-device and K-way in one launch, compared number by number."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from hpcrender.config import Job, Mode
from hpcrender.errors import BadInput, EXIT_OK
from hpcrender.measure.metrics import psnr, relative_l2, ssim
from hpcrender.models.cache import ModelCache
from hpcrender.models.shapes import model_shape
from hpcrender.parallel.groups import make_comms
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.parallel.pipefusion import stage_cut
from hpcrender.render.image import render_image
from hpcrender.run.plan import plan_job


def run_verify(world, jobs: Sequence[Job], modes: Sequence[Mode] = ()) -> int:
    """For each job in turn: rank 0 renders the reference alone, then all ranks render together once per mode (the
    job's own mode when none is given); rank 0 prints one comparison block per job and mode. One launch for
    several jobs: the world and torch.distributed start once."""
    if Mode.NONE in modes:
        raise BadInput("verify compares a parallel mode with single-device: use --mode "
                       "sync|displaced|naive|pipefusion")
    world.init_torch_distributed()
    size = world.env.world_size
    comms = make_comms(world, (tuple(range(size)),), size, any(job.parallel.split_cfg for job in jobs))
    models = ModelCache(device=world.env.device)
    for job in jobs:
        _verify_job(world, models, comms[job.parallel.split_cfg], job, tuple(modes) or (job.parallel.mode,))
    world.barrier()
    world.close()
    return EXIT_OK


def _verify_job(world, models, comms, job: Job, modes: Sequence[Mode]) -> None:
    env = world.env
    model = models.get(job.model, job.dtype, job.loras)
    pipe, facts = model.pipe, model.facts
    controlnets = models.controlnets([c.model for c in job.controlnets], job.dtype)
    reference = None
    if env.rank == 0:
        single = GroupLayout(size=1, rank=0, mode=Mode.NONE)
        reference = render_image(pipe, job, single, Comms(None, None, (0,)), env.device, facts=facts,
                                 controlnets=controlnets)
    world.barrier()
    size = env.world_size
    for mode in modes:
        run = dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, mode=mode))
        layout = GroupLayout(size=size, rank=env.rank, mode=mode, split_cfg=job.parallel.split_cfg)
        planned = plan_job(0, run, size, model_shape(run.model))
        # pipefusion keeps only this rank's stage of the model: the cache loads it again for the modes after it
        cut = stage_cut(planned.pipeline, layout.patch_rank) if planned.pipeline is not None else None
        pipe = models.get(job.model, job.dtype, job.loras, cut=cut).pipe
        result = render_image(pipe, run, layout, comms, env.device, bands=planned.bands, facts=facts,
                              controlnets=controlnets, pipeline=planned.pipeline)
        if env.rank == 0:
            print(_report(run, size, result, reference, relative_l2, psnr, ssim), flush=True)


def _report(job: Job, size: int, result, reference, relative_l2, psnr, ssim) -> str:
    p = job.parallel
    where = "bands " + (",".join(f"{b.start}-{b.stop}" for b in result.bands) or "whole latent per rank")
    if "stage_blocks" in result.exchange:  # pipefusion: rank 0 is the first stage
        first, last = result.exchange["stage_blocks"]
        patches = ",".join(f"{a}-{b}" for a, b in result.exchange["patches"])
        where = f"first stage blocks {first}-{last}, patches {patches}"
    branches = ", split_cfg" if p.split_cfg else ""
    level = int(np.abs(result.image.astype(np.int16) - reference.image.astype(np.int16)).max())
    return "\n".join([
        f"verify {job.name}: {size} rank(s), mode {p.mode.value}{branches}, warm-up {p.warmup_steps}, "
        f"groupnorm {p.groupnorm.value}, halo {p.halo.value}, {where}",
        f"latent relative L2: {relative_l2(result.latent, reference.latent):.3e}",
        f"image PSNR: {psnr(result.image, reference.image):.2f} dB",
        f"image SSIM: {ssim(result.image, reference.image):.6f}",
        f"image max level difference: {level}",
    ])
