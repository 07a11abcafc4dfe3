"""One image on one rank group: encode the prompt, prepare the latent band, loop over timesteps, decode.

Reads top to bottom like the algorithm. The parallel plan is put around the UNet for the loop and taken off
afterwards, so the same code renders on one rank and on many; the initial noise is always drawn full-size from
the seed and then sliced, which is what makes a K-rank result comparable with the single-device one.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.distributed as dist

from hpcrender.checkpoint import Checkpoint, restore_scheduler, scheduler_state
from hpcrender.config import DType, Job, Mode, SchedulerName
from hpcrender.errors import BadInput

if TYPE_CHECKING:
    from hpcrender.parallel.bands import Band

TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}


@dataclass(frozen=True)
class GroupLayout:
    """Where this rank sits in the group that renders one image.

    With split_cfg the group's first half runs the unconditional branch and the second half the conditional
    one, each half patch-parallel over the same bands; rank r of one half pairs with rank r of the other.
    """

    size: int
    rank: int
    mode: Mode
    split_cfg: bool = False

    @property
    def branches(self) -> int:
        return 2 if self.split_cfg else 1

    @property
    def patch_ranks(self) -> int:
        return self.size // self.branches

    @property
    def patch_rank(self) -> int:
        return self.rank % self.patch_ranks

    @property
    def branch(self) -> int:
        return self.rank // self.patch_ranks


def check_layout(size: int, split_cfg: bool, guidance: bool) -> None:
    """Reject a group layout that cannot work, before anything is loaded."""
    if split_cfg and not guidance:
        raise BadInput("split_cfg needs classifier-free guidance (guidance_scale > 1)")
    if split_cfg and size % 2:
        raise BadInput(f"split_cfg needs an even number of ranks per image, got {size}")


def unet_bands(job: Job, layout: GroupLayout, alignment: int, vae_scale: int = 8) -> tuple:
    """The latent row bands of one image; DoesNotFit when the coarsest feature map has too few rows."""
    from hpcrender.parallel.bands import latent_bands

    return latent_bands(job.height // vae_scale, alignment, layout.patch_ranks)


@dataclass(frozen=True)
class Comms:
    """torch.distributed handles of the group (in group-rank order) and of this rank's branch half."""

    group: object | None
    patch_group: object | None
    global_ranks: tuple[int, ...]


@dataclass
class ImageResult:
    image: np.ndarray | None          # uint8 (H, W, 3), on the group's first rank only
    latent: np.ndarray | None         # float32 final latent (C, h, w), on the group's first rank only
    step_seconds: list[float] = field(default_factory=list)
    decode_seconds: float = 0.0
    encode_seconds: float = 0.0
    exchange: dict = field(default_factory=dict)
    bands: tuple = ()                 # latent row bands of the UNet (empty: one rank, no bands)
    peak_memory_bytes: int = 0
    resumed_from: int = 0             # the step a checkpoint let this render start from
    stopped_at: int | None = None     # steps done when should_stop ended the loop (no image then)
    checkpoint: Checkpoint | None = None  # with stopped_at, on the group's first rank


def make_scheduler(name: SchedulerName, config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name is SchedulerName.EULER:
        return EulerDiscreteScheduler.from_config(config)
    if name is SchedulerName.DDIM:
        return DDIMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def encode_prompt(pipe, job: Job, device, guidance: bool) -> tuple[torch.Tensor, dict | None]:
    """Text conditioning for the batch [uncond, cond] (or [cond] without guidance), and SDXL's extra inputs."""
    negative = job.negative_prompt or None
    if is_sdxl(pipe):
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            job.prompt, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=negative)
        proj_dim = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                    else int(pooled.shape[-1]))
        time_ids = pipe._get_add_time_ids((job.height, job.width), (0, 0), (job.height, job.width),
                                          dtype=embeds.dtype, text_encoder_projection_dim=proj_dim).to(device)
        if guidance:
            embeds = torch.cat([neg, embeds])
            pooled = torch.cat([neg_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return embeds, {"text_embeds": pooled, "time_ids": time_ids}
    embeds, neg = pipe.encode_prompt(job.prompt, device, 1, guidance, negative)
    if guidance:
        embeds = torch.cat([neg, embeds])
    return embeds, None


def initial_noise(job: Job, channels: int, vae_scale: int) -> torch.Tensor:
    """Full-size float32 noise from the job's seed, drawn on the CPU so every rank and device agrees."""
    gen = torch.Generator("cpu").manual_seed(job.seed)
    return torch.randn((1, channels, job.height // vae_scale, job.width // vae_scale), generator=gen,
                       dtype=torch.float32)


def _sync(device) -> None:
    """Wait for this rank's compute stream only: torch.cuda.synchronize would also wait for NCCL's streams, so a
    displaced exchange posted late in a step could not overlap the next one."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _select_branch(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    return x[layout.branch:layout.branch + 1] if layout.split_cfg else x


def _gather_rows(band: torch.Tensor, bands: tuple[Band, ...], group, dim: int, scale: int = 1) -> torch.Tensor:
    """All-gather uneven row bands along `dim` (padded to the largest band, sliced back); `scale` maps band rows
    to rows of `band` (the VAE decoder's output is 8x the latent rows)."""
    biggest = max(b.size for b in bands) * scale
    pad = list(band.shape)
    pad[dim] = biggest
    padded = band.new_zeros(pad)
    padded.narrow(dim, 0, band.shape[dim]).copy_(band)
    parts = [torch.empty_like(padded) for _ in bands]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p.narrow(dim, 0, b.size * scale) for p, b in zip(parts, bands)], dim=dim)


def branch_partner(layout: GroupLayout) -> int:
    """split_cfg: the group rank that runs the other branch over the same band."""
    return (layout.rank + layout.patch_ranks) % layout.size


def _exchange_branch(noise: torch.Tensor, layout: GroupLayout, comms: Comms) -> torch.Tensor:
    """split_cfg: swap this rank's branch prediction with its partner's; returns [uncond, cond].

    On the image group's own communicator, where every rank swaps at once: NCCL wants the first batched
    point-to-point on a communicator to involve all its ranks, and the world holds other groups' ranks that never
    take part."""
    partner = comms.global_ranks[branch_partner(layout)]
    other = torch.empty_like(noise)
    ops = [dist.P2POp(dist.isend, noise.contiguous(), partner, comms.group),
           dist.P2POp(dist.irecv, other, partner, comms.group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return torch.cat([noise, other]) if layout.branch == 0 else torch.cat([other, noise])


def _peak_memory(device) -> int:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def render_image(pipe, job: Job, layout: GroupLayout, comms: Comms, device,
                 on_step: Callable[[int, int], None] | None = None, decode: bool = True,
                 should_stop: Callable[[], bool] | None = None, resume: Checkpoint | None = None,
                 on_collective: Callable[[], None] | None = None) -> ImageResult:
    """Render `job` with this rank's share of the work; the group's first rank gets the image (and the latent).

    decode=False stops after the denoising loop (benchmarks of the UNet alone). should_stop is asked after every
    step but the last, on every rank of the group alike (it must give the group's common answer): when it says
    yes, the loop ends there and the group's first rank gets a checkpoint instead of an image. resume continues
    from such a checkpoint. on_collective is called before the group's first torch.distributed collective (never
    on a group of one): a failure after it may leave the group's communicator out of step.
    """
    dtype = TORCH_DTYPES[job.dtype]
    guidance = job.guidance_scale > 1.0
    check_layout(layout.size, layout.split_cfg, guidance)
    parallel = job.parallel.mode is not Mode.NONE and layout.patch_ranks > 1
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    result = ImageResult(image=None, latent=None)

    # 1. Encode the prompt (every rank: it is cheap next to the UNet, and saves a broadcast of the embeddings).
    t0 = time.perf_counter()
    with torch.no_grad():
        embeds, added = encode_prompt(pipe, job, device, guidance)
    embeds = _select_branch(embeds.to(dtype), layout)
    if added is not None:
        added = {k: _select_branch(v.to(dtype) if v.is_floating_point() else v, layout) for k, v in added.items()}
    result.encode_seconds = time.perf_counter() - t0

    # 2. Timesteps and the latent band.
    scheduler = make_scheduler(job.scheduler, pipe.scheduler.config)
    scheduler.set_timesteps(job.steps, device=device)
    if resume is not None:
        if resume.steps != job.steps or resume.step >= len(scheduler.timesteps):
            raise ValueError(f"a checkpoint after step {resume.step} of {resume.steps} does not fit {job.steps} steps")
        latent = torch.from_numpy(resume.latent)
    else:
        latent = initial_noise(job, pipe.unet.config.in_channels, vae_scale) * scheduler.init_noise_sigma
    bands = ()
    if parallel:
        from hpcrender.parallel.bands import unet_alignment

        bands = unet_bands(job, layout, unet_alignment(pipe.unet.config), vae_scale)

    def band_of(whole: torch.Tensor) -> torch.Tensor:
        if bands:
            mine = bands[layout.patch_rank]
            whole = whole[:, :, mine.start:mine.stop]
        return whole.to(device=device, dtype=dtype)

    result.bands = bands
    latent = band_of(latent)
    start = 0
    if resume is not None:
        start = result.resumed_from = resume.step
        restore_scheduler(scheduler, resume.scalars,
                          tuple(None if h is None else band_of(torch.from_numpy(h)) for h in resume.history))

    # 3. The denoising loop, with the parallel plan around the UNet for its duration.
    if layout.size > 1 and on_collective is not None:  # the loop's exchanges, or the gather and decode after it
        on_collective()
    handle = None
    if parallel:
        from hpcrender.parallel.plan import PatchPlan, parallelize

        plan = PatchPlan(mode=job.parallel.mode, groupnorm=job.parallel.groupnorm,
                         warmup_steps=job.parallel.warmup_steps, bands=bands, rank=layout.patch_rank,
                         halo=job.parallel.halo)
        handle = parallelize(pipe.unet, plan, comms.patch_group)
        handle.begin_image()
    try:
        with torch.no_grad():
            for i in range(start, len(scheduler.timesteps)):
                t = scheduler.timesteps[i]
                t_start = time.perf_counter()
                if handle is not None:  # counted from the (re)start: a resumed displaced run warms up again
                    handle.begin_step(i - start)
                batch = 2 if guidance and not layout.split_cfg else 1
                model_in = scheduler.scale_model_input(torch.cat([latent] * batch), t)
                noise = pipe.unet(model_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added,
                                  return_dict=False)[0]
                if layout.split_cfg:
                    noise = _exchange_branch(noise, layout, comms)
                if guidance:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + job.guidance_scale * (cond - uncond)
                latent = scheduler.step(noise, t, latent, return_dict=False)[0]
                _sync(device)
                result.step_seconds.append(time.perf_counter() - t_start)
                if on_step is not None:
                    on_step(i + 1, job.steps)
                if should_stop is not None and i + 1 < job.steps and should_stop():
                    result.stopped_at = i + 1
                    break
    finally:
        if handle is not None:
            result.exchange = handle.stats()
            handle.remove()

    if result.stopped_at is not None:
        result.checkpoint = _checkpoint(latent, scheduler, result.stopped_at, job.steps, bands, layout, comms)
        return result

    # 4. The whole latent on every rank of the group (it is small), then a band-parallel exact VAE decode.
    if not decode:
        result.peak_memory_bytes = _peak_memory(device)
        return result
    t0 = time.perf_counter()
    if parallel:
        latent = _gather_rows(latent, bands, comms.patch_group, dim=2)
    full_latent = latent.float()
    with torch.no_grad():
        image = _decode(pipe, full_latent, layout, comms, device)
    _sync(device)
    result.decode_seconds = time.perf_counter() - t0
    if layout.rank == 0:
        result.latent = full_latent[0].cpu().numpy()
        result.image = image
    result.peak_memory_bytes = _peak_memory(device)
    return result


def _checkpoint(latent: torch.Tensor, scheduler, step: int, steps: int, bands: tuple, layout: GroupLayout,
                comms: Comms) -> Checkpoint | None:
    """The whole latent and sampler history after `step`, gathered from the bands; on the group's first rank."""
    def whole(band: torch.Tensor) -> np.ndarray:
        band = band.float()
        if bands:
            band = _gather_rows(band, bands, comms.patch_group, dim=2)
        return band.cpu().numpy()

    scalars, history = scheduler_state(scheduler)
    arrays = (whole(latent),) + tuple(None if h is None else whole(h) for h in history)
    if layout.rank != 0:
        return None
    return Checkpoint(step=step, steps=steps, latent=arrays[0], scalars=scalars, history=arrays[1:])


def _decode(pipe, latent: torch.Tensor, layout: GroupLayout, comms: Comms, device) -> np.ndarray | None:
    """Latent -> uint8 RGB, band-parallel over the whole group when it has more than one rank."""
    vae = pipe.vae
    vae_dtype = next(vae.parameters()).dtype
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latent)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latent)
        latent = latent * std / cfg.scaling_factor + mean
    else:
        latent = latent / cfg.scaling_factor
    latent = latent.to(device=device, dtype=vae_dtype)
    if layout.size > 1 and layout.mode is not Mode.NONE:
        from hpcrender.parallel.bands import split_rows
        from hpcrender.parallel.plan import decode_parallel

        bands = split_rows(latent.shape[2], layout.size)
        mine = bands[layout.rank]
        part = decode_parallel(vae, latent[:, :, mine.start:mine.stop], bands, layout.rank, comms.group)
        image = _gather_rows(part.float(), bands, comms.group, dim=2, scale=part.shape[2] // mine.size)
    else:
        image = vae.decode(latent, return_dict=False)[0].float()
    if layout.rank != 0:
        return None
    image = (image / 2 + 0.5).clamp(0, 1)
    return (image[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
