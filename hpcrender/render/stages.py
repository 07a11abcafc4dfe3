"""One image on one rank group, in stages as diffusers' pipelines are: encode the prompt, prepare the latent (noise
from the seed, an image encoded at a strength, or a checkpoint), denoise over a slice of the timesteps, decode.
render.image composes them into text-to-image and img2img.

The same code renders on one rank and on many: the parallel plan is put around the denoiser (a UNet, or a diffusion
transformer: PixArt-Sigma, SD3, Flux), and around the ControlNets beside a UNet, for the loop and taken off
afterwards, and whatever crosses ranks goes through hpcrender.parallel. Noise is always drawn full-size from the seed
on the CPU and then sliced, which is what makes a K-rank result comparable with the single-device one. What the
stages need to know of the model comes from its ModelFacts, asked once when it was loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import inspect
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from hpcrender.config import DType, Job, Mode
from hpcrender.models.facts import ModelFacts
from hpcrender.models.reference import Family
from hpcrender.parallel.gather import exchange_branch, gather_rows
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.parallel.parallelize import parallelize
from hpcrender.parallel.pipefusion import PipeFused, PipePlan, pipefuse
from hpcrender.parallel.plan import Parallelized, PatchPlan
from hpcrender.parallel.vae import decode_group, encode_group
from hpcrender.render.checkpoint import (
    Checkpoint, is_channels_last, keep_carried, restore_carried, restore_scheduler, scheduler_state, with_layout,
)
from hpcrender.render.latents import (
    WholeStepNoise, flux_image_ids, from_latent_space, initial_noise, job_generator, load_init_image,
    noised_image_latent, pack_2x2, unpack_2x2,
)
from hpcrender.render.control import Control, control_image_band, control_residuals, load_control_image
from hpcrender.render.prompt import encode_prompt
from hpcrender.render.samplers import make_scheduler, set_timesteps

class Between(enum.Enum):
    """What the group does between two denoising steps (its common answer)."""

    GO_ON = "go on"
    CHECKPOINT = "checkpoint"  # gather the whole latent and the sampler's state, hand it to on_checkpoint, go on
    STOP = "stop"              # a checkpoint instead of an image: the loop ends here


TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}


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
    first_step: int = 0               # the schedule's first step this render ran (img2img: from its strength)
    stopped_at: int | None = None     # steps done when should_stop ended the loop (no image then)
    checkpoint: Checkpoint | None = None  # with stopped_at, on the group's first rank
    checkpoint_seconds: float = 0.0   # in the loop for periodic checkpoints (the write itself runs beside it)


def _sync(device) -> None:
    """Wait for this rank's compute stream only: torch.cuda.synchronize would also wait for NCCL's streams, so a
    displaced exchange posted late in a step could not overlap the next one."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _select_branch(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    return x[layout.branch:layout.branch + 1] if layout.split_cfg else x


def branch_partner(layout: GroupLayout) -> int:
    """split_cfg: the group rank that runs the other branch over the same band."""
    return (layout.rank + layout.patch_ranks) % layout.size


def guidance_pair(prediction: torch.Tensor, layout: GroupLayout, comms: Comms) -> torch.Tensor:
    """split_cfg: [uncond, cond] from this rank's branch and its partner's, swapped on the image group's
    communicator."""
    return exchange_branch(prediction, layout.branch, comms.global_ranks[branch_partner(layout)], comms.group)


def peak_memory(device) -> int:
    """This rank's peak memory: the device's allocator on a GPU, the process's peak RSS on a CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024




@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, for this rank's branch: text states and SDXL's added inputs."""

    embeds: torch.Tensor
    added: dict | None


@dataclass
class Render:
    """One render of one job on this rank: what the stages share, and the result they fill in."""

    pipe: object
    facts: ModelFacts
    job: Job
    layout: GroupLayout
    comms: Comms
    device: object
    on_step: Callable[[int, int], None] | None = None
    should_stop: Callable[[], bool] | None = None
    between: Callable[[], Between] | None = None  # asked instead of should_stop when given
    on_checkpoint: Callable[[Checkpoint | None], None] | None = None  # a periodic checkpoint (None off the leader)
    on_collective: Callable[[], None] | None = None
    result: ImageResult = field(default_factory=lambda: ImageResult(image=None, latent=None))
    bands: tuple = ()  # the UNet's latent row bands on this rank's patch group (empty: no bands)
    generator: torch.Generator | None = None  # the job's, after the start latent's draws: stochastic samplers' noise
    controlnets: tuple = ()  # the loaded ControlNetModel of each of job.controlnets, in order
    control_pixels: tuple = ()  # (1, 3, H, W) [0, 1] images given for them instead of their files (gigapixel tiles)
    pipeline: object = None  # pipefusion: the stages and patches (parallel.pipeline.PipelineLayout)
    fused: PipeFused | None = None  # pipefusion: this rank's stage, for the loop's duration

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.job.dtype]

    @property
    def guidance(self) -> bool:
        return self.facts.uses_guidance(self.job.guidance_scale)

    @property
    def parallel(self) -> bool:
        """The UNet runs band-parallel."""
        return self.job.parallel.mode.banded and self.layout.patch_ranks > 1

    @property
    def pipelined(self) -> bool:
        """The transformer runs as a pipeline of stages, one per rank of the patch group (pipefusion)."""
        return self.job.parallel.mode is Mode.PIPEFUSION and self.layout.patch_ranks > 1

    @property
    def stage_ranks(self) -> tuple[int, ...]:
        """Global ranks of the pipeline's stages: this rank's branch half with split_cfg, else the group."""
        layout, ranks = self.layout, self.comms.global_ranks
        return tuple(ranks[layout.branch * layout.patch_ranks:(layout.branch + 1) * layout.patch_ranks])

    @property
    def vae_parallel(self) -> bool:
        """The VAE runs band-parallel over the whole group."""
        return self.layout.size > 1 and self.layout.mode is not Mode.NONE

    def band_of(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's UNet band of a whole latent-shaped tensor, on the device in the job's dtype."""
        if self.bands:
            mine = self.bands[self.layout.patch_rank]
            whole = whole[:, :, mine.start:mine.stop]
        return whole.to(device=self.device, dtype=self.dtype)

    def collective(self) -> None:
        """Before the group's first collective of the job (never on a group of one)."""
        if self.layout.size > 1 and self.on_collective is not None:
            self.on_collective()
            self.on_collective = None


def denoiser(run: Render) -> torch.nn.Module:
    """The model the denoising loop calls: the transformer of a DiT pipeline, else the UNet."""
    return run.pipe.transformer if run.facts.transformer else run.pipe.unet


# --- the stages ------------------------------------------------------------------------------------------------


def conditioning(run: Render) -> Conditioning:
    """Encode the prompt (every rank: it is cheap next to the UNet, and saves a broadcast of the embeddings)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        embeds, added = encode_prompt(run.pipe, run.facts.family, run.job, run.device, run.guidance)
    embeds = _select_branch(embeds.to(run.dtype), run.layout)
    if added is not None:
        added = {k: _select_branch(v.to(run.dtype) if v.is_floating_point() else v, run.layout)
                 for k, v in added.items()}
    run.result.encode_seconds += time.perf_counter() - t0
    return Conditioning(embeds, added)


def timesteps(run: Render, first: int = 0):
    """The job's sampler with its timesteps set; from step `first` on (img2img), as diffusers' pipelines begin
    there (set_begin_index)."""
    scheduler = make_scheduler(run.job.scheduler, run.pipe.scheduler.config, run.job.timestep_spacing,
                               run.facts.family)
    scale = run.facts.vae_scale
    set_timesteps(scheduler, run.facts, run.job.steps, run.job.height // scale, run.job.width // scale, run.device)
    if first and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first * scheduler.order)
    run.result.first_step = first
    return scheduler


def noise_latent(run: Render, scheduler) -> tuple[torch.Tensor, int]:
    """Text-to-image's start: this rank's band of the seed's noise at the schedule's first sigma."""
    run.generator = job_generator(run.job.seed)
    whole = initial_noise(run.job, run.facts.latent_channels, run.facts.vae_scale, run.generator)
    sigma = getattr(scheduler, "init_noise_sigma", None)  # flow matching starts from the noise itself
    return run.band_of(whole if sigma is None else whole * sigma), 0


def image_latent(run: Render, scheduler) -> tuple[torch.Tensor, int]:
    """img2img's start: the init image encoded by the VAE (band-parallel over the group), sampled and noised to the
    strength's first timestep; this rank's band of it."""
    job, first = run.job, run.job.first_step
    t0 = time.perf_counter()
    pixels = load_init_image(job.init_image.path, job.width, job.height)
    with torch.no_grad():
        moments = encode_image(run, pixels)
    run.generator = job_generator(job.seed)
    whole = noised_image_latent(moments, run.pipe.vae.config, scheduler, first, job.seed, run.generator)
    run.result.encode_seconds += time.perf_counter() - t0
    return run.band_of(whole), first


def checkpoint_latent(run: Render, scheduler, resume: Checkpoint) -> tuple[torch.Tensor, int]:
    """A stopped render's start: its latent band and the sampler's state after its last step."""
    job = run.job
    if resume.steps != job.steps or not job.first_step < resume.step < job.steps:
        raise ValueError(f"a checkpoint after step {resume.step} of {resume.steps} does not fit {job.steps} steps "
                         f"from step {job.first_step}")
    if resume.generator is None and job.scheduler.stochastic:
        raise ValueError(f"a checkpoint without the generator's state cannot resume {job.scheduler.value}'s noise")
    def band(index: int, array: np.ndarray) -> torch.Tensor:
        return with_layout(run.band_of(torch.from_numpy(array)), resume.is_channels_last(index))

    restore_scheduler(scheduler, resume.scalars,
                      tuple(None if h is None else band(i, h) for i, h in enumerate(resume.history, start=1)))
    restore_carried(scheduler, resume.state, cut=run.band_of, device=scheduler.timesteps.device)
    run.generator = job_generator(job.seed)
    if resume.generator is not None:
        run.generator.set_state(torch.from_numpy(resume.generator))
    run.result.resumed_from = resume.step
    return band(0, resume.latent), resume.step


def next_action(run: Render) -> Between:
    """The group's answer between two steps: `between` when given, else stop or go on as should_stop says."""
    if run.between is not None:
        return run.between()
    return Between.STOP if run.should_stop is not None and run.should_stop() else Between.GO_ON


def denoise(run: Render, cond: Conditioning, scheduler, latent: torch.Tensor, start: int) -> torch.Tensor:
    """Steps `start`.. of the schedule over this rank's band, the parallel plan around the UNet for their duration.

    A step is one denoiser call, or two for Heun (its timesteps list both, as diffusers' own loop runs them). The
    plan's forward pre-hook counts the steps from `start` as its 0, and a Heun step's calls as its calls 0 and 1: a
    resumed or img2img displaced render warms up again, and displaced Heun keeps stale activations per call. A
    stochastic sampler draws its noise whole from the job's generator (WholeStepNoise). The job's ControlNets get the
    UNet's plan too, and their conditioning images are cut to the band's pixel rows. Stops early
    (run.result.stopped_at) when should_stop says so between steps."""
    job, layout, result = run.job, run.layout, run.result
    calls = job.scheduler.calls_per_step
    entries = len(scheduler.timesteps)
    if entries != job.scheduler.denoiser_calls(job.steps):
        raise RuntimeError(f"{type(scheduler).__name__} set {entries} timesteps for {job.steps} steps of "
                           f"{job.scheduler.value}")
    run.collective()  # the loop's exchanges, or the gather and decode after it
    handle: Parallelized | None = None
    model = denoiser(run)
    batch = 2 if run.guidance and not layout.split_cfg else 1
    controls = [Control(net, config, control_image(run, index, batch, net))
                for index, (net, config) in enumerate(zip(run.controlnets, job.controlnets))]
    control_handles: dict[int, Parallelized] = {}
    if run.parallel:
        plan = PatchPlan(mode=job.parallel.mode, groupnorm=job.parallel.groupnorm,
                         warmup_steps=job.parallel.warmup_steps, bands=run.bands, rank=layout.patch_rank,
                         halo=job.parallel.halo, calls_per_step=calls)
        handle = parallelize(model, plan, run.comms.patch_group)
    if run.pipelined:
        pipe_plan = PipePlan(layout=run.pipeline, stage=layout.patch_rank, warmup_steps=job.parallel.warmup_steps,
                             calls_per_step=calls)
        run.fused = pipefuse(model, pipe_plan, run.comms.patch_group, run.stage_ranks)
    try:
        seen: set[int] = set()
        for control in controls if handle is not None else ():
            if id(control.model) in seen:  # the same ControlNet twice: each use keeps its own stale activations
                control.model = copy.deepcopy(control.model)
            seen.add(id(control.model))
        for index, control in enumerate(controls):
            if handle is not None:
                # The UNet's plan for each ControlNet, over the same group: its residuals are the band's own. Its
                # exchange buffers take p2p tags past the UNet's (and the ControlNets' before it).
                own = dataclasses.replace(plan, first_buffer_set=(index + 1) * plan.buffer_sets)
                control_handles[id(control)] = parallelize(control.model, own, run.comms.patch_group)
        latent = _loop(run, model, cond, scheduler, latent, start, batch, controls, control_handles)
    finally:
        if run.fused is not None:
            result.exchange = run.fused.stats()
            run.fused.remove()
            run.fused = None
        if handle is not None:
            result.exchange = _with_controls(handle.stats(), [h.stats() for h in control_handles.values()])
        for control_handle in control_handles.values():
            control_handle.remove()
        if handle is not None:
            handle.remove()
    return latent


def _with_controls(stats: dict, controls: list[dict]) -> dict:
    """The UNet's exchange statistics with the ControlNets' traffic and waits added step by step (what the rank sent
    and waited in all), and the ControlNets' share of the bytes apart."""
    if not controls:
        return stats
    stats = dict(stats)
    for key in ("bytes_sent", "wait_seconds"):
        total = list(stats[key])
        for other in controls:
            for i, value in enumerate(other[key]):
                if i < len(total):
                    total[i] += value
                else:
                    total.append(value)
        stats[key] = [round(v, 6) for v in total] if key == "wait_seconds" else total
    stats["bytes_total"] = sum(stats["bytes_sent"])
    stats["wait_seconds_total"] = round(sum(stats["wait_seconds"]), 6)
    stats["controlnet_bytes_total"] = sum(other["bytes_total"] for other in controls)
    return stats


def control_image(run: Render, index: int, batch: int, net: torch.nn.Module) -> torch.Tensor:
    """ControlNet `index`'s conditioning image for this rank: the pixel rows of its UNet band (its residuals stay
    band-local), batched as the UNet's input, in the ControlNet's dtype."""
    job = run.job
    if run.control_pixels:
        pixels = run.control_pixels[index]
    else:
        pixels = load_control_image(job.controlnets[index].image, job.width, job.height)
    rows = None
    if run.bands:
        mine, scale = run.bands[run.layout.patch_rank], run.facts.vae_scale
        rows = slice(mine.start * scale, mine.stop * scale)
    return control_image_band(pixels, rows, batch, run.device, next(net.parameters()).dtype)


def _loop(run: Render, model, cond: Conditioning, scheduler, latent: torch.Tensor, start: int, batch: int,
          controls: list[Control], control_handles: dict) -> torch.Tensor:
    """The steps of denoise, with the models already parallelized."""
    job, layout, result = run.job, run.layout, run.result
    calls = job.scheduler.calls_per_step
    entries = len(scheduler.timesteps)
    step_kwargs, noise = {}, None
    if run.generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        # as diffusers' pipelines pass it (prepare_extra_step_kwargs); deterministic samplers draw nothing from it
        step_kwargs["generator"] = run.generator
        scale = run.facts.vae_scale
        whole = (1, run.facts.latent_channels, job.height // scale, job.width // scale)
        band = run.bands[layout.patch_rank] if run.bands else None
        noise = WholeStepNoise(run.generator, whole, slice(band.start, band.stop) if band else slice(None))
    skipped = job.first_step * calls  # diffusers' ControlNet pipelines count their keeps from the strength's cut
    with torch.no_grad():
        for i in range(start, job.steps):
            t0 = time.perf_counter()
            for k in range(i * calls, min((i + 1) * calls, entries)):
                residuals = _control_at(controls, control_handles, cond, k - skipped, entries - skipped, i - start,
                                        k % calls)
                latent = denoiser_step(run, model, cond, scheduler, latent, scheduler.timesteps[k], batch,
                                       step_kwargs, noise, residuals)
            _sync(run.device)
            result.step_seconds.append(time.perf_counter() - t0)
            if run.on_step is not None:
                run.on_step(i + 1, job.steps)
            action = next_action(run) if i + 1 < job.steps else Between.GO_ON
            if action is Between.STOP:
                result.stopped_at = i + 1
                break
            if action is Between.CHECKPOINT:
                t1 = time.perf_counter()
                run.on_checkpoint(_checkpoint(run, latent, scheduler, i + 1))
                result.checkpoint_seconds += time.perf_counter() - t1  # what the group waits: gather and copy
    return latent


def _control_at(controls: list[Control], handles: dict, cond: Conditioning, call: int, calls: int, step: int,
                step_call: int):
    """The ControlNets' residuals at denoiser call `call` of the `calls` run, as a function of the UNet's input and
    timestep; None without ControlNets. A band-parallel ControlNet is told its plan's step (`step`, counted from the
    loop's start as the UNet's plan counts, and the step's call) before each forward: where its scale is 0 it is not
    called at all, so its forwards cannot count the steps themselves."""
    if not controls:
        return None
    scales = [control.scale_at(call, calls) for control in controls]

    def before(control: Control) -> None:
        handle = handles.get(id(control))
        if handle is not None:
            handle.begin_step(step, step_call)

    return lambda model_in, t: control_residuals(controls, scales, before, model_in, t, cond.embeds, cond.added)


def denoiser_step(run: Render, model, cond: Conditioning, scheduler, latent: torch.Tensor, t, batch: int,
                  step_kwargs: dict, noise: WholeStepNoise | None, residuals=None) -> torch.Tensor:
    """One denoiser call and the sampler's step on it: the latent after timestep `t`. residuals(model_in, t): the
    ControlNets' residuals for the UNet, or None."""
    job, layout = run.job, run.layout
    model_in = torch.cat([latent] * batch)
    if hasattr(scheduler, "scale_model_input"):
        model_in = scheduler.scale_model_input(model_in, t)
    control = None if residuals is None else residuals(model_in, t)
    prediction = predict(run, model, cond, model_in, t, control)
    if layout.split_cfg:
        prediction = guidance_pair(prediction, layout, run.comms)
    if run.guidance:
        uncond, text = prediction.chunk(2)
        prediction = uncond + job.guidance_scale * (text - uncond)
    if prediction.shape[1] == 2 * latent.shape[1]:  # PixArt's learnt variance: the sampler takes the mean
        prediction = prediction.chunk(2, dim=1)[0]
    if noise is None:
        return scheduler.step(prediction, t, latent, return_dict=False, **step_kwargs)[0]
    with noise:
        return scheduler.step(prediction, t, latent, return_dict=False, **step_kwargs)[0]


def predict(run: Render, model, cond: Conditioning, model_in: torch.Tensor, t, control=None) -> torch.Tensor:
    """The denoiser's output over this rank's band (pipefusion: the whole latent, the patches through the stages),
    called as the model's diffusers pipeline calls it; control: the ControlNets' (down-block, mid-block) residuals
    for a UNet, as diffusers' ControlNet pipelines pass them."""
    if run.fused is not None:
        return run.fused.forward(lambda rows: _forward(run, model, cond, rows, t, control), model_in)
    return _forward(run, model, cond, model_in, t, control)


def _forward(run: Render, model, cond: Conditioning, model_in: torch.Tensor, t, control=None) -> torch.Tensor:
    """One forward of the denoiser over `model_in`."""
    fam = run.facts.family
    batch = model_in.shape[0]
    if fam is Family.PIXART:
        return model(model_in, encoder_hidden_states=cond.embeds, timestep=t.expand(batch),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
                     **cond.added)[0]
    if fam is Family.SD3:
        return model(hidden_states=model_in, timestep=t.expand(batch), encoder_hidden_states=cond.embeds,
                     return_dict=False, **cond.added)[0]
    if fam is Family.FLUX:
        scale = run.facts.vae_scale
        whole_ids = flux_image_ids(run.job.height // scale // 2, run.job.width // scale // 2, model_in.device,
                                   cond.embeds.dtype)
        guidance = None
        if run.facts.guidance_embeds:
            guidance = torch.full([1], run.job.guidance_scale, device=model_in.device,
                                  dtype=torch.float32).expand(batch)
        out = model(hidden_states=pack_2x2(model_in), timestep=t.expand(batch).to(model_in.dtype) / 1000,
                    guidance=guidance, encoder_hidden_states=cond.embeds, img_ids=whole_ids, return_dict=False,
                    **cond.added)[0]
        return unpack_2x2(out, model_in.shape[2], model_in.shape[3])
    extra = {} if control is None else {"down_block_additional_residuals": control[0],
                                        "mid_block_additional_residual": control[1]}
    return model(model_in, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added, return_dict=False,
                 **extra)[0]


def finish(run: Render, scheduler, latent: torch.Tensor, decode: bool) -> ImageResult:
    """After the loop: a checkpoint when it was stopped, else the whole latent and the decoded image."""
    result = run.result
    if result.stopped_at is not None:
        result.checkpoint = _checkpoint(run, latent, scheduler, result.stopped_at)
        return result
    if not decode:
        result.peak_memory_bytes = peak_memory(run.device)
        return result
    t0 = time.perf_counter()
    whole = _whole(run, latent)
    with torch.no_grad():
        image = decode_image(run, whole)
    _sync(run.device)
    result.decode_seconds = time.perf_counter() - t0
    if run.layout.rank == 0:
        result.latent = whole[0].cpu().numpy()
        result.image = image
    result.peak_memory_bytes = peak_memory(run.device)
    return result


# --- what crosses ranks, through hpcrender.parallel ------------------------------------------------------------


def _whole(run: Render, band: torch.Tensor) -> torch.Tensor:
    """The whole float32 latent-shaped tensor of this rank's band, on every rank of the patch group."""
    band = band.float()
    if not run.bands:
        return band
    return gather_rows(band, run.bands, run.comms.patch_group, dim=2)


def _checkpoint(run: Render, latent: torch.Tensor, scheduler, step: int) -> Checkpoint | None:
    """The whole latent, the sampler's history and carried tensors after `step`, gathered from the bands, and the
    job generator's state (the same on every rank: each drew the whole noise); on the group's first rank."""
    scalars, history = scheduler_state(scheduler)
    # Copies: the loop goes on with these tensors while a periodic checkpoint is being written.
    arrays = tuple(None if h is None else np.array(_whole(run, h).cpu().numpy()) for h in (latent, *history))
    state = keep_carried(scheduler, lambda t: t.dim() == 4 and t.shape[2:] == latent.shape[2:],
                         lambda t: _whole(run, t))
    if run.layout.rank != 0:
        return None
    generator = None if run.generator is None else run.generator.get_state().numpy()
    return Checkpoint(step=step, steps=run.job.steps, latent=arrays[0], scalars=scalars, history=arrays[1:],
                      channels_last=tuple(is_channels_last(h) for h in (latent, *history)), state=state,
                      generator=generator)


def encode_image(run: Render, pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) pixels in [-1, 1] -> the whole latent distribution's parameters (float32, on the CPU),
    band-parallel over the whole group when it has more than one rank."""
    vae = run.pipe.vae
    pixels = pixels.to(device=run.device, dtype=next(vae.parameters()).dtype)
    if run.vae_parallel:
        run.collective()
        moments = encode_group(vae, pixels, run.facts.vae_scale, run.layout.rank, run.layout.size,
                               run.comms.group)
    else:
        moments = vae.encode(pixels).latent_dist.parameters
    return moments.float().cpu()


def decode_image(run: Render, latent: torch.Tensor) -> np.ndarray | None:
    """The whole latent -> uint8 RGB on the group's first rank, band-parallel over the whole group when it has more
    than one rank."""
    vae = run.pipe.vae
    latent = from_latent_space(vae.config, latent).to(device=run.device, dtype=next(vae.parameters()).dtype)
    if run.vae_parallel:
        image = decode_group(vae, latent, run.layout.rank, run.layout.size, run.comms.group)
    else:
        image = vae.decode(latent, return_dict=False)[0].float()
    if run.layout.rank != 0:
        return None
    image = (image / 2 + 0.5).clamp(0, 1)
    return (image[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
