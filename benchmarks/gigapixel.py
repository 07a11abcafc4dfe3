"""Peak memory and time per tile of gigapixel renders of growing size with the same tile: the memory of a render
is bounded by its tile, not by the image.

    .venv/bin/python benchmarks/gigapixel.py --sizes 2048,8192 [--model builtin:tiny-sdxl] [--tile 512] ...

Each size runs in a process of its own (peak RSS is per process) on one rank, mode none, one thread unless
--threads says otherwise; the output directory keeps each job's store, meta.json and exports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def render_one(args) -> dict:
    """One job in this process: the render, its exports, and what it cost."""
    import torch

    from hpcrender.config import GigapixelConfig, Job, Mode, ParallelConfig
    from hpcrender.gigapixel.job import gigapixel_meta, render_job
    from hpcrender.models import load_pipeline
    from hpcrender.parallel.layout import Comms, GroupLayout

    torch.set_num_threads(args.threads)
    job = Job(name=f"giga-{args.size}", prompt="an aerial photograph of a coastline with villages", seed=7,
              width=args.size, height=args.size, model=args.model, steps=args.steps, guidance_scale=1.0,
              parallel=ParallelConfig(mode=Mode.NONE),
              gigapixel=GigapixelConfig(base=args.base, tile=args.tile, overlap=args.overlap, strength=args.strength))
    pipe = load_pipeline(args.model)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    outcome = render_job(pipe, job, Path(args.out) / job.name, GroupLayout(1, 0, Mode.NONE), Comms(None, None, (0,)),
                         "cpu")
    seconds = time.perf_counter() - t0
    meta = gigapixel_meta(outcome)
    return {
        "size": f"{args.size}x{args.size}",
        "megapixels": round(args.size * args.size / 1e6, 1),
        "levels": [f"{lv['width']}x{lv['height']}" for lv in meta["levels"]],
        "tiles": meta["tiles"],
        "units_rendered": meta["units_rendered"],
        "tile_seconds_mean": meta["tile_seconds_mean"],
        "compose_seconds": meta["compose_seconds"],
        "seconds_with_export": round(seconds, 1),
        "seam_score": meta["seam_score"],
        "boundary_detail_ratio": meta["boundary_detail_ratio"],
        "rss_after_model_load_mib": round(loaded / 2**20, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "outputs": [p.name for p in outcome.exported],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,8192")
    parser.add_argument("--model", default="builtin:tiny-sdxl")
    parser.add_argument("--base", type=int, default=512)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="out/bench-gigapixel")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)  # one size, in the child process
    args = parser.parse_args()
    if args.size:
        print(json.dumps(render_one(args)))
        return
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        child = [sys.executable, __file__, "--size", str(size)] + [
            f"--{k}={getattr(args, k)}" for k in ("model", "base", "tile", "overlap", "strength", "steps", "threads",
                                                  "out")]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(child, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            sys.exit(f"{size}: failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if len(results) > 1:
        first, last = results[0]["peak_rss_mib"], results[-1]["peak_rss_mib"]
        print(f"peak RSS {first} MiB -> {last} MiB ({(last - first) / first:+.0%}) for "
              f"{results[0]['megapixels']} -> {results[-1]['megapixels']} Mpx")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
