"""Several samples of a sweep in one denoiser call on one rank: the batch of [uncond x B, cond x B] that diffusers'
pipelines make from a list of prompts, each sample's start noise and every step's noise drawn from its own seed's
generator (as diffusers does with a list of generators), so that a sample does not depend on its batch mates. Only the
arithmetic of the batched kernels differs from the sample rendered alone (BENCHMARKS.md measures by how much).

The stages are render.stages' own; only the batch is put together here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from hpcrender.config import Job
from hpcrender.errors import BadInput
from hpcrender.models.facts import ModelFacts
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.render.latents import from_latent_space, initial_noise, job_generator
from hpcrender.render.options import check_size
from hpcrender.render.prompt import encode_prompt, encode_prompts
from hpcrender.render.stages import Conditioning, Render, denoiser, denoiser_step, peak_memory, timesteps

# What every sample of one batch must share: one schedule, one shape, one guidance arithmetic.
SHARED = ("model", "width", "height", "steps", "scheduler", "timestep_spacing", "dtype", "guidance_scale", "loras")


@dataclass
class BatchResult:
    images: list[np.ndarray]      # uint8 (H, W, 3) per sample, in order
    latents: np.ndarray           # float32 (B, C, h, w): the final latents
    denoise_seconds: float
    decode_seconds: float
    peak_memory_bytes: int


def batch_problem(jobs: list[Job]) -> str | None:
    """Why `jobs` cannot share a denoiser call, or None."""
    first = jobs[0]
    for key in SHARED:
        for job in jobs[1:]:
            if getattr(job, key) != getattr(first, key):
                return f"samples {first.name} and {job.name} differ in {key}"
    if any(job.init_image is not None or job.controlnets or job.gigapixel is not None for job in jobs):
        return "a batch renders text-to-image samples only"
    return None


def _batched(per_sample: list[torch.Tensor], guided: bool) -> torch.Tensor:
    """Per-sample tensors of batch [uncond, cond] (or [cond]) -> [uncond x B, cond x B]; ones without a batch
    dimension (Flux's text ids) are the same for every sample and kept once."""
    first = per_sample[0]
    halves = 2 if guided else 1
    if first.dim() < 2 or first.shape[0] != halves:
        return first
    return torch.cat([t[h:h + 1] for h in range(halves) for t in per_sample])


def batch_conditioning(run: Render, jobs: list[Job]) -> Conditioning:
    """The batch's text conditioning in one call of each text encoder where that encodes what each sample alone
    would get (render.prompt.encode_prompts), else sample by sample."""
    with torch.no_grad():
        together = encode_prompts(run.pipe, run.facts.family, jobs, run.device, run.guidance)
        if together is not None:
            embeds, added = together
            if added is not None:
                added = {k: v.to(run.dtype) if v.is_floating_point() else v for k, v in added.items()}
            return Conditioning(embeds.to(run.dtype), added)
        encoded = []
        for job in jobs:
            embeds, added = encode_prompt(run.pipe, run.facts.family, job, run.device, run.guidance)
            encoded.append((embeds.to(run.dtype), added))
    embeds = _batched([e for e, _ in encoded], run.guidance)
    added = None
    if encoded[0][1] is not None:
        added = {}
        for key in encoded[0][1]:
            value = _batched([a[key] for _, a in encoded], run.guidance)
            added[key] = value.to(run.dtype) if value.is_floating_point() else value
    return Conditioning(embeds, added)


def render_batch(pipe, facts: ModelFacts, jobs: list[Job], comms: Comms, device) -> BatchResult:
    """Text-to-image for `jobs` (samples sharing SHARED) in one batch on this rank alone."""
    problem = batch_problem(jobs)
    if problem:
        raise BadInput(problem)
    job = jobs[0]
    check_size(facts, job)
    layout = GroupLayout(size=1, rank=0, mode=job.parallel.mode)
    run = Render(pipe, facts, job, layout, comms, device)
    t0 = time.perf_counter()
    cond = batch_conditioning(run, jobs)
    scheduler = timesteps(run)
    generators = [job_generator(j.seed) for j in jobs]
    noise = torch.cat([initial_noise(j, facts.latent_channels, facts.vae_scale, g) for j, g in zip(jobs, generators)])
    sigma = getattr(scheduler, "init_noise_sigma", None)
    latent = (noise if sigma is None else noise * sigma).to(device=device, dtype=run.dtype)
    entries = len(scheduler.timesteps)
    if entries != job.scheduler.denoiser_calls(job.steps):
        raise RuntimeError(f"{type(scheduler).__name__} set {entries} timesteps for {job.steps} steps of "
                           f"{job.scheduler.value}")
    step_kwargs = {"generator": generators} if job.scheduler.stochastic else {}
    model = denoiser(run)
    halves = 2 if run.guidance else 1
    with torch.no_grad():
        for k in range(entries):
            latent = denoiser_step(run, model, cond, scheduler, latent, scheduler.timesteps[k], halves, step_kwargs,
                                   None)
    t1 = time.perf_counter()
    vae = pipe.vae
    with torch.no_grad():
        whole = from_latent_space(vae.config, latent.float()).to(dtype=next(vae.parameters()).dtype)
        pixels = vae.decode(whole, return_dict=False)[0].float()
    pixels = (pixels / 2 + 0.5).clamp(0, 1)
    images = [(p.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8) for p in pixels]
    return BatchResult(images=images, latents=latent.float().cpu().numpy(), denoise_seconds=t1 - t0, decode_seconds=time.perf_counter() - t1,
                       peak_memory_bytes=peak_memory(device))
