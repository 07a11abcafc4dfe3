"""diffusers' own StableDiffusionPipeline loop driving a parallelized UNet: each rank hands the pipeline its band of
the noise, and the plan's forward pre-hook counts the steps with no call from the loop.

usage: mpiexec -n K driver_checks.py     Rank 0 prints one JSON object: the world size, the final latent's relative
error against the pipeline on one process (sync and displaced), and the steps each run counted as sync and async.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from hpcrender.config import GroupNormMode, Mode
from hpcrender.models import load_pipeline
from hpcrender.parallel.bands import latent_bands, unet_alignment
from hpcrender.parallel.gather import gather_rows
from hpcrender.parallel.parallelize import parallelize
from hpcrender.parallel.plan import PatchPlan
from parallel_models import start_torch_distributed, report_and_finish

STEPS = 4
WIDTH = 64


def main() -> None:
    rank, size = start_torch_distributed()
    group = dist.new_group(list(range(size)))
    pipe = load_pipeline("builtin:tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    align = unet_alignment(pipe.unet.config)
    rows = align * size + 2  # uneven bands, the last past the coarse rows
    noise = torch.randn(1, 4, rows, WIDTH // 8, generator=torch.Generator().manual_seed(5))

    def run(height: int, latents: torch.Tensor) -> torch.Tensor:
        return pipe("a harbor at dawn", height=height, width=WIDTH, num_inference_steps=STEPS, guidance_scale=5.0,
                    latents=latents, output_type="latent").images

    reference = run(rows * 8, noise)
    bands = latent_bands(rows, align, size)
    mine = bands[rank]
    report = {"world_size": size, "bands": [[b.start, b.stop] for b in bands]}
    for mode in (Mode.SYNC, Mode.DISPLACED):
        handle = parallelize(pipe.unet, PatchPlan(mode=mode, groupnorm=GroupNormMode.CORRECTED, warmup_steps=1,
                                                  bands=bands, rank=rank), group)
        try:
            band = run(mine.size * 8, noise[:, :, mine.start:mine.stop])
            stats = handle.stats()
        finally:
            handle.remove()
        whole = gather_rows(band, bands, group, dim=2)
        report[mode.value] = {"error": float((whole - reference).norm() / reference.norm()),
                              "sync_steps": stats["sync_steps"], "async_steps": stats["async_steps"]}
    report_and_finish(report, rank)


if __name__ == "__main__":
    main()
