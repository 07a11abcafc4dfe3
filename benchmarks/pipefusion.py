"""PipeFusion against bands, in one launch: the pipeline's fill/drain cost per step against the number of patches M,
and the fidelity of pipefusion and displaced bands to single-device at several warm-up lengths.

    OMP_NUM_THREADS=1 .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/pipefusion.py --model builtin:pixart-mini \\
        --time-size 1024 --patches 2,4,8,16 --fidelity-size 512 --steps 12 --warmups 1,2,4 --json out/pipefusion.json

Timing: rank 0 renders the job alone (one rank, its thread), then every rank together in pipefusion with each M
(4 steps, 1 warm-up step: steps 2-4 are pipelined) and in displaced bands; s/step is the mean of the pipelined
steps, beside the bubble a pipeline without overlap between steps predicts, (M + K - 1) / M times one rank's time
over K. Fidelity: single-device, then displaced and pipefusion (M = 2K + 1) at each warm-up; the final latent's
relative L2 and the image's PSNR against single-device, on rank 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch.distributed as dist

from hpcrender.config import Job, Mode, ParallelConfig
from hpcrender.models import load_pipeline
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.render.image import render_image
from hpcrender.run.environment import World


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:pixart-mini")
    parser.add_argument("--time-size", type=int, default=1024)
    parser.add_argument("--patches", default="2,4,8,16")
    parser.add_argument("--fidelity-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmups", default="1,2,4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    world = World.start()
    world.init_torch_distributed()
    rank, size = world.env.rank, world.env.world_size
    group = dist.new_group(list(range(size)))
    whole = Comms(group, group, tuple(range(size)))
    alone = (GroupLayout(1, 0, Mode.NONE), Comms(None, None, (0,)))
    base = Job(name="pf", prompt="a lighthouse on a cliff at dusk, oil painting", width=args.time_size,
               height=args.time_size, seed=0, model=args.model, steps=4, guidance_scale=4.5,
               parallel=ParallelConfig(mode=Mode.NONE, warmup_steps=1))
    pipe = load_pipeline(args.model)

    def job(mode: Mode, patches: int = 0, **changes) -> Job:
        return dataclasses.replace(base, parallel=ParallelConfig(mode=mode, warmup_steps=changes.pop("warmup", 1),
                                                                 pipeline_patches=patches), **changes)

    def steady(result) -> float:
        return statistics.fmean(result.step_seconds[1:])

    report = {"model": args.model, "ranks": size, "timing": [], "fidelity": []}
    one = None
    if rank == 0:
        one = steady(render_image(pipe, job(Mode.NONE), *alone, "cpu", decode=False))
    world.barrier()
    report["one_rank_s"] = one
    timed = [("displaced", job(Mode.DISPLACED))]
    timed += [(f"pipefusion M={m}", job(Mode.PIPEFUSION, m)) for m in map(int, args.patches.split(","))]
    for label, spec in timed:
        if spec.parallel.mode is not Mode.PIPEFUSION:
            result = render_image(pipe, spec, GroupLayout(size, rank, spec.parallel.mode), whole, "cpu", decode=False)
        else:
            fresh = load_pipeline(args.model)  # a pipefusion render keeps this rank's stage only
            result = render_image(fresh, spec, GroupLayout(size, rank, Mode.PIPEFUSION), whole, "cpu", decode=False)
        seconds = [None] * size
        dist.all_gather_object(seconds, steady(result))
        if rank == 0:
            patches = spec.parallel.pipeline_patches
            entry = {"run": label, "s_per_step": max(seconds), "per_rank_s": seconds,
                     "bytes_per_step": result.exchange["bytes_sent"][-1]}
            if patches:
                entry["no_overlap_prediction_s"] = (patches + size - 1) / patches * one / size
            report["timing"].append(entry)
            print(json.dumps(entry), flush=True)
    small = {"width": args.fidelity_size, "height": args.fidelity_size, "steps": args.steps}
    reference = render_image(pipe, job(Mode.NONE, **small), *alone, "cpu") if rank == 0 else None
    world.barrier()
    for warmup in map(int, args.warmups.split(",")):
        for mode in (Mode.DISPLACED, Mode.PIPEFUSION):
            spec = job(mode, 2 * size + 1 if mode is Mode.PIPEFUSION else 0, warmup=warmup, **small)
            model = load_pipeline(args.model) if mode is Mode.PIPEFUSION else pipe
            result = render_image(model, spec, GroupLayout(size, rank, mode), whole, "cpu")
            if rank == 0:
                error = float(np.linalg.norm(result.latent - reference.latent) / np.linalg.norm(reference.latent))
                entry = {"mode": mode.value, "warmup": warmup, "latent_rel_l2": error,
                         "psnr": psnr(result.image, reference.image)}
                report["fidelity"].append(entry)
                print(json.dumps(entry), flush=True)
    if rank == 0 and args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    world.barrier()
    world.close()


if __name__ == "__main__":
    main()
