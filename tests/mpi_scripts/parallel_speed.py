"""Seconds per UNet step, patch-parallel in each mode, beside one process on the whole latent with all the threads.

usage: mpiexec -n K parallel_speed.py [--model sdxl-mini|sdxl-tiny] [--size 512] [--steps 4] [--threads 1]
       (or under torchrun). Batch 2 (classifier-free guidance), float32, on the CPU.

`plain`: rank 0 alone runs the unmodified UNet on the whole latent with K x threads threads (the others wait);
`naive`: bands without any exchange (the no-communication ideal); `sync` and `displaced` (1 warm-up step,
corrected GroupNorm). The first step of each mode is not timed. Rank 0 prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from hpcrender.config import GroupNormMode, Mode
from hpcrender.parallel.bands import latent_bands, unet_alignment
from hpcrender.parallel.plan import PatchPlan, parallelize
from parallel_models import conditioning, noise, sdxl_mini_unet, sdxl_unet, start_torch_distributed

MODELS = {"sdxl-mini": sdxl_mini_unet, "sdxl-tiny": sdxl_unet}


def slowest(seconds: float, group) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def timed_steps(unet, latent, cond, steps: int, group, handle=None) -> list[float]:
    """Seconds of each step after the first (the slowest rank's), the input drifting a little from step to step."""
    drift = noise(latent.shape[0], latent.shape[2], latent.shape[3], seed=5)
    times = []
    with torch.no_grad():
        for i in range(steps + 1):
            if group is not None:
                dist.barrier(group=group)
            t0 = time.perf_counter()
            if handle is not None:
                handle.begin_step(i)
            unet(latent + 0.02 * i * drift, 999.0 - 50.0 * i, **cond, return_dict=False)
            elapsed = time.perf_counter() - t0
            times.append(slowest(elapsed, group) if group is not None else elapsed)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(MODELS), default="sdxl-mini")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = side / 8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--modes", default="plain,naive,sync,displaced")
    args = parser.parse_args()

    rank, size = start_torch_distributed()
    group = dist.new_group(list(range(size)))
    torch.set_num_threads(args.threads)
    unet = MODELS[args.model]()
    side = args.size // 8
    cond = conditioning(unet, 2)
    latent = noise(2, side, side)
    bands = latent_bands(side, unet_alignment(unet.config), size)
    band = bands[rank]
    rows = []
    for mode in args.modes.split(","):
        exchange = {}
        if mode == "plain":
            times = None
            if rank == 0:
                torch.set_num_threads(args.threads * size)
                times = timed_steps(unet, latent, cond, args.steps, None)
                torch.set_num_threads(args.threads)
            box = [times]
            dist.broadcast_object_list(box, src=0, group=group)
            times = box[0]
        else:
            plan = PatchPlan(mode=Mode(mode), groupnorm=GroupNormMode.CORRECTED, warmup_steps=1, bands=bands, rank=rank)
            handle = parallelize(unet, plan, group)
            try:
                times = timed_steps(unet, latent[:, :, band.start:band.stop].contiguous(), cond, args.steps, group,
                                    handle)
                stats = handle.stats()
            finally:
                handle.remove()
            exchange = {"bytes_per_step": stats["bytes_sent"][-1], "wait_seconds_per_step":
                        statistics.mean(stats["wait_seconds"][1:]) if len(stats["wait_seconds"]) > 1 else 0.0}
        rows.append({"mode": mode, "per_step_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     **exchange})
    if rank == 0:
        print(f"{args.model} {args.size}x{args.size}, batch 2, {size} ranks x {args.threads} thread(s), "
              f"{args.steps} timed steps")
        for r in rows:
            extra = (f"  sent {r['bytes_per_step'] / 2**20:.1f} MiB/step, waited {r['wait_seconds_per_step']:.3f} s"
                     if "bytes_per_step" in r else "")
            print(f"  {r['mode']:<10} {r['per_step_s']:8.3f} s/step "
                  f"(min {r['min_s']:.3f}, max {r['max_s']:.3f}){extra}")
        print(json.dumps({"model": args.model, "size": args.size, "ranks": size, "threads": args.threads,
                          "rows": rows}), flush=True)
    dist.barrier(group=group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
