"""`hpcrender bench`: per-step time of the denoising loop (UNet with CFG batch 2, no VAE) on this launch's ranks."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from hpcrender.config import DType, Job, Mode, ParallelConfig, SchedulerName
from hpcrender.errors import EXIT_OK


@dataclass(frozen=True)
class BenchRequest:
    model: str
    width: int
    height: int
    steps: int
    modes: list[Mode] | None
    warmup_steps: int
    scheduler: str
    dtype: str
    json_path: Path | None


def bench_job(req: BenchRequest, mode: Mode) -> Job:
    return Job(name=f"bench-{mode.value}", prompt="a lighthouse on a cliff at dusk, oil painting", width=req.width,
               height=req.height, seed=0, model=req.model, steps=req.steps, guidance_scale=5.0,
               scheduler=SchedulerName(req.scheduler), dtype=DType(req.dtype),
               parallel=ParallelConfig(mode=mode, warmup_steps=req.warmup_steps, ranks_per_image=0))


def summarize(step_seconds: list[float]) -> dict:
    """Per-step statistics after the first step (the first one pays for allocation and registration)."""
    steady = step_seconds[1:] or step_seconds
    return {"steps": len(step_seconds), "first_s": step_seconds[0], "mean_s": statistics.fmean(steady),
            "median_s": statistics.median(steady), "min_s": min(steady), "max_s": max(steady)}


def run_bench(world, req: BenchRequest) -> int:
    import torch

    from hpcrender.pipeline import GroupLayout, render_image
    from hpcrender.runner import _Models, _make_groups, check_request

    env = world.env
    size = env.world_size
    modes = req.modes or ([Mode.NONE] if size == 1 else [Mode.SYNC, Mode.DISPLACED])
    world.init_torch_distributed()
    models = _Models(device=env.device)
    rows = []
    for mode in modes:
        job = bench_job(req, mode)
        group = 1 if mode is Mode.NONE else size
        if env.rank == 0:
            from hpcrender.config import Manifest

            check_request(Manifest(path=Path("bench"), jobs=(job,)), (0,), size)
        pipe = models.get(job)
        comms = _make_groups(world, tuple(tuple(range(g, g + group)) for g in range(0, size, group)), group,
                             False)[False]
        layout = GroupLayout(size=group, rank=env.rank % group, mode=mode)
        world.barrier()
        result = render_image(pipe, job, layout, comms, env.device, decode=False)
        stats = summarize(result.step_seconds)
        per_rank = world.allgather({"rank": env.rank, **stats, "peak_memory_bytes": result.peak_memory_bytes,
                                    "exchange": result.exchange})
        slowest = max(per_rank, key=lambda r: r["mean_s"])
        exchange = per_rank[0]["exchange"] or {}
        rows.append({"mode": mode.value, "ranks": size, "ranks_per_image": group, "threads_per_rank": env.threads,
                     "model": req.model, "size": f"{req.width}x{req.height}", "steps": req.steps,
                     "scheduler": req.scheduler, "dtype": req.dtype, "warmup_steps": req.warmup_steps,
                     "device": env.device, "per_step_s": slowest["mean_s"], "median_s": slowest["median_s"],
                     "min_s": slowest["min_s"], "max_s": slowest["max_s"], "first_s": slowest["first_s"],
                     "exchange": exchange, "per_rank": per_rank,
                     "versions": {"torch": torch.__version__}})
    if env.rank == 0:
        print(f"{'mode':<10} {'ranks':>5} {'thr/rank':>8} {'s/step':>9} {'min':>8} {'max':>8}  size, model")
        for r in rows:
            print(f"{r['mode']:<10} {r['ranks']:>5} {r['threads_per_rank']:>8} {r['per_step_s']:>9.3f} "
                  f"{r['min_s']:>8.3f} {r['max_s']:>8.3f}  {r['size']}, {r['model']}, {r['steps']} steps")
        if req.json_path:
            req.json_path.parent.mkdir(parents=True, exist_ok=True)
            req.json_path.write_text(json.dumps(rows, indent=2, default=str))
        sys.stdout.flush()
    world.barrier()
    world.close()
    return EXIT_OK
