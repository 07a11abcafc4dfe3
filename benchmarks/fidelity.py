"""Fidelity of the parallel modes: the final latent of one fixed job, band-parallel on the ranks of the launch,
against the same job on one process with one thread.

The job is fixed completely, so that numbers compare across implementations: the builtin sdxl-mini UNet with
torch's default initialisation after torch.manual_seed(1234), fp32; a latent from seed 0, random text embeddings
[uncond, cond] from seed 1, SDXL pooled embeddings from seed 2; Euler (SD's scaled-linear betas, leading spacing),
guidance 5; one loop for every run, only the UNet call differs.

    OMP_NUM_THREADS=1 .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/fidelity.py --size 512 --steps 12 \\
        --run sync --run naive --run displaced:w=1 --run displaced:w=2:halo=fresh --json out/fidelity.json

A run is MODE[:w=WARMUP][:gn=GROUPNORM][:halo=fresh|stale]; warm-up counts synchronous steps. The reference
latent is cached under --cache (keyed by size, steps and the weights' hash).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hpcrender.config import GroupNormMode, HaloMode, Mode
from hpcrender.models.builtin import architecture
from hpcrender.parallel.bands import latent_bands, unet_alignment
from hpcrender.parallel.parallelize import parallelize
from hpcrender.parallel.plan import PatchPlan
from hpcrender.run.environment import World

GUIDANCE = 5.0
SEED_WEIGHTS = 1234


def parse_run(text: str) -> dict:
    mode, *options = text.split(":")
    run = {"mode": Mode(mode), "warmup": 1, "groupnorm": GroupNormMode.CORRECTED, "halo": HaloMode.STALE}
    for option in options:
        key, _, value = option.partition("=")
        if key == "w":
            run["warmup"] = int(value)
        elif key == "gn":
            run["groupnorm"] = GroupNormMode(value)
        elif key == "halo":
            run["halo"] = HaloMode(value)
        else:
            raise SystemExit(f"unknown run option {option!r} in {text!r}")
    return run


def run_name(run: dict) -> str:
    if run["mode"] is not Mode.DISPLACED:
        return run["mode"].value
    return f"displaced w={run['warmup']} gn={run['groupnorm'].value} halo={run['halo'].value}"


def build_unet():
    """sdxl-mini's UNet with torch's default initialisation (the same bits on every CPU for a given torch)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED_WEIGHTS)
    return UNet2DConditionModel.from_config(architecture("sdxl-mini").unet).float().eval().requires_grad_(False)


def weights_hash(unet) -> str:
    h = hashlib.sha256()
    for key, value in sorted(unet.state_dict().items()):
        h.update(key.encode())
        h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def make_inputs(size: int) -> dict:
    g = torch.Generator("cpu")
    side = size // 8
    return {
        "latent": torch.randn((1, 4, side, side), generator=g.manual_seed(0)),
        "ehs": torch.randn((2, 77, 512), generator=g.manual_seed(1)),
        "text_embeds": torch.randn((2, 320), generator=g.manual_seed(2)),
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32),
    }


@torch.no_grad()
def denoise(unet_call, inputs: dict, steps: int) -> tuple[torch.Tensor, list[float]]:
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1, prediction_type="epsilon",
                                   num_train_timesteps=1000)
    sched.set_timesteps(steps)
    latent = inputs["latent"].clone() * sched.init_noise_sigma
    added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    seconds = []
    for i, t in enumerate(sched.timesteps):
        t0 = time.perf_counter()
        noise = unet_call(i, sched.scale_model_input(torch.cat([latent] * 2), t), t, inputs["ehs"], added)
        uncond, cond = noise.chunk(2)
        latent = sched.step(uncond + GUIDANCE * (cond - uncond), t, latent, return_dict=False)[0]
        seconds.append(time.perf_counter() - t0)
    return latent, seconds


def gather_rows(part: torch.Tensor, bands, group) -> torch.Tensor:
    biggest = max(b.size for b in bands)
    padded = part.new_zeros(part.shape[0], part.shape[1], biggest, part.shape[3])
    padded[:, :, :part.shape[2]].copy_(part)
    parts = [torch.empty_like(padded) for _ in bands]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:, :, :b.size] for p, b in zip(parts, bands)], dim=2)


def parallel_run(unet, inputs: dict, steps: int, run: dict, world_size: int, rank: int, group) -> dict:
    bands = latent_bands(inputs["latent"].shape[2], unet_alignment(unet.config), world_size)
    band = bands[rank]
    plan = PatchPlan(mode=run["mode"], groupnorm=run["groupnorm"], warmup_steps=run["warmup"], bands=bands,
                     rank=rank, halo=run["halo"])
    handle = parallelize(unet, plan, group)
    handle.begin_image()

    def call(i, x, t, ehs, added):
        handle.begin_step(i)
        out = unet(x[:, :, band.start:band.stop].contiguous(), t, encoder_hidden_states=ehs,
                   added_cond_kwargs=added, return_dict=False)[0]
        return gather_rows(out, bands, group)

    try:
        latent, seconds = denoise(call, inputs, steps)
        stats = handle.stats()
    finally:
        handle.remove()
    return {"latent": latent, "seconds": seconds, "stats": stats}


def compare(latent: torch.Tensor, reference: torch.Tensor) -> dict:
    x, y = latent.double(), reference.double()
    mse = float(((x - y) ** 2).mean())
    span = float(y.max() - y.min())
    return {"rel_l2": float((x - y).norm() / y.norm()), "max_abs": float((x - y).abs().max()),
            "psnr_db": 10 * math.log10(span ** 2 / mse) if mse > 0 else math.inf}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--run", action="append", default=[], help="MODE[:w=W][:gn=GN][:halo=H], repeatable")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cache", type=Path, default=Path("out/fidelity-cache"))
    args = ap.parse_args()
    runs = [parse_run(r) for r in args.run] or [parse_run("displaced:w=1")]

    world = World.start()
    world.init_torch_distributed()
    torch.set_num_threads(1)
    rank, size = dist.get_rank(), dist.get_world_size()
    group = world.new_groups([list(range(size))])[0]
    unet = build_unet()
    digest = weights_hash(unet)
    inputs = make_inputs(args.size)

    cached = args.cache / f"single-{args.size}-{args.steps}-{digest}.pt"
    single_seconds = None
    if rank == 0:
        if cached.exists():
            reference = torch.load(cached)
        else:
            reference, single_seconds = denoise(lambda i, x, t, e, a: unet(
                x, t, encoder_hidden_states=e, added_cond_kwargs=a, return_dict=False)[0], inputs, args.steps)
            args.cache.mkdir(parents=True, exist_ok=True)
            torch.save(reference, cached)
        print(f"weights {digest}, {args.size}x{args.size}, {args.steps} steps, {size} ranks, reference "
              f"{'cached' if single_seconds is None else f'{sum(single_seconds) / args.steps:.2f} s/step'}",
              flush=True)
    world.barrier()

    rows = []
    for run in runs:
        out = parallel_run(unet, inputs, args.steps, run, size, rank, group)
        if rank == 0:
            steady = out["seconds"][max(run["warmup"], 1) if run["mode"] is Mode.DISPLACED else 1:] or out["seconds"]
            row = {"run": run_name(run), **compare(out["latent"], reference),
                   "seconds_per_step": sum(out["seconds"]) / len(out["seconds"]),
                   "seconds_per_steady_step": sum(steady) / len(steady),
                   "bytes_per_step": out["stats"]["bytes_total"] / args.steps,
                   "sync_steps": out["stats"]["sync_steps"], "async_steps": out["stats"]["async_steps"]}
            rows.append(row)
            print(f"{row['run']:<44} rel L2 {row['rel_l2']:.3e}  PSNR {row['psnr_db']:6.1f} dB  "
                  f"{row['seconds_per_step']:.2f} s/step ({row['seconds_per_steady_step']:.2f} after the warm-up)  "
                  f"{row['bytes_per_step'] / 2**20:.1f} MiB/step", flush=True)
    if rank == 0 and args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "size": args.size, "steps": args.steps, "ranks": size, "weights": digest, "torch": torch.__version__,
            "single_seconds_per_step": None if single_seconds is None else sum(single_seconds) / args.steps,
            "runs": rows}, indent=1))
    world.barrier()
    world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
