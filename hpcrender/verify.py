"""`hpcrender verify`: one job rendered single-device and K-way in one launch, compared number by number."""

from __future__ import annotations

import sys

import numpy as np

from hpcrender.config import Job, Mode
from hpcrender.errors import EXIT_OK, BadInput


def run_verify(world, job: Job) -> int:
    """Rank 0 renders the reference alone, then all ranks render together; rank 0 prints the comparison."""
    from hpcrender.metrics import psnr, relative_l2, ssim
    from hpcrender.pipeline import Comms, GroupLayout, render_image
    from hpcrender.runner import _Models, _make_groups

    if job.parallel.mode is Mode.NONE:
        raise BadInput("verify compares a parallel mode with single-device: use --mode sync|displaced|naive")
    env = world.env
    world.init_torch_distributed()
    models = _Models(device=env.device)
    pipe = models.get(job)
    reference = None
    if env.rank == 0:
        single = GroupLayout(size=1, rank=0, mode=Mode.NONE)
        reference = render_image(pipe, job, single, Comms(None, None, (0,)), env.device)
    world.barrier()
    size = env.world_size
    comms = _make_groups(world, (tuple(range(size)),), size, job.parallel.split_cfg)[job.parallel.split_cfg]
    layout = GroupLayout(size=size, rank=env.rank, mode=job.parallel.mode, split_cfg=job.parallel.split_cfg)
    result = render_image(pipe, job, layout, comms, env.device)
    if env.rank == 0:
        bands = ",".join(f"{b.start}-{b.stop}" for b in result.bands)
        level = int(np.abs(result.image.astype(np.int16) - reference.image.astype(np.int16)).max())
        lines = [
            f"verify {job.name}: {size} rank(s), mode {job.parallel.mode.value}, "
            f"warm-up {job.parallel.warmup_steps}, groupnorm {job.parallel.groupnorm.value}, bands {bands}",
            f"latent relative L2: {relative_l2(result.latent, reference.latent):.3e}",
            f"image PSNR: {psnr(result.image, reference.image):.2f} dB",
            f"image SSIM: {ssim(result.image, reference.image):.6f}",
            f"image max level difference: {level}",
        ]
        print("\n".join(lines), flush=True)
    world.barrier()
    world.close()
    return EXIT_OK
