"""The MACs each rank performs in a patch-parallel forward, counted as it runs, against bands.step_macs.

usage: mpiexec -n K mac_checks.py
Rank 0 prints one JSON object: per model shape and mode, every rank's [counted, computed] for an image's first
step (text keys/values computed) and its second (kept from the first; displaced: stale and asynchronous).
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from hpcrender.config import GroupNormMode, Mode
from hpcrender.parallel.bands import latent_bands, step_macs, unet_alignment
from hpcrender.parallel.parallelize import parallelize
from hpcrender.parallel.plan import PatchPlan, unet_compute
from mac_count import counted_macs
from parallel_checks import BUILDERS, SIZES
from parallel_models import TEXT_TOKENS, conditioning, noise, start_torch_distributed

BATCH = 2


def main() -> None:
    rank, size = start_torch_distributed()
    group = dist.new_group(list(range(size)))
    report = {"world_size": size}
    for shape, build in BUILDERS.items():
        unet = build()
        height, width = SIZES[shape][size]
        bands = latent_bands(height, unet_alignment(unet.config), size)
        mine = bands[rank]
        latent = noise(BATCH, height, width)[:, :, mine.start:mine.stop]
        cond = conditioning(unet, BATCH)
        specs = unet_compute(unet, width)
        for mode in (Mode.SYNC, Mode.DISPLACED, Mode.NAIVE):
            plan = PatchPlan(mode=mode, groupnorm=GroupNormMode.CORRECTED, warmup_steps=1, bands=bands, rank=rank)
            handle = parallelize(unet, plan, group)
            steps = []
            try:
                with torch.no_grad():
                    for step in range(2):
                        handle.begin_step(step)
                        with counted_macs(unet) as counted:
                            unet(latent, 500.0 - step, **cond)
                        computed = step_macs(specs, bands, rank, BATCH, TEXT_TOKENS, exchanging=mode is not Mode.NAIVE,
                                             text_kv_cached=step > 0)
                        steps.append([counted[0], computed])
            finally:
                handle.remove()
            everyone = [None] * size
            dist.all_gather_object(everyone, steps, group=group)
            report.setdefault(shape, {})[mode.value] = everyone
    if rank == 0:
        print(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
