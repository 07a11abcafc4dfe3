"""One image on one rank group, in stages as diffusers' pipelines are: encode the prompt, prepare the latent (noise
from the seed, an image encoded at a strength, or a checkpoint), denoise over a slice of the timesteps, decode.
text_to_image and img2img are two compositions of those stages.

The same code renders on one rank and on many: the parallel plan is put around the denoiser (a UNet, or a diffusion
transformer: PixArt-Sigma, SD3, Flux) for the loop and taken off afterwards, and whatever crosses ranks goes through
hpcrender.parallel. Noise is always drawn full-size from the seed on the CPU and then sliced, which is what makes a
K-rank result comparable with the single-device one.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from hpcrender.checkpoint import Checkpoint, is_channels_last, restore_scheduler, scheduler_state, with_layout
from hpcrender.config import DType, Job, Mode, SchedulerName
from hpcrender.errors import BadInput
from hpcrender.models import Family, denoiser_of, family
from hpcrender.parallel.layout import Comms, GroupLayout, check_layout

if TYPE_CHECKING:
    from hpcrender.parallel.plan import Parallelized

TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}


def check_model_options(job: Job) -> None:
    """Refuse, before anything is loaded, what does not apply to the job's model: a sampler (ddim or dpmpp for a
    flow-matching model), split_cfg for Flux (no classifier-free guidance), a transformer's image that is not whole
    patches (the VAEs of all three families scale by 8)."""
    from hpcrender.models import scheduler_config_of, unet_config_of
    from hpcrender.parallel.bands import is_flux_config, is_transformer_config, transformer_alignment

    try:
        config = scheduler_config_of(job.model)
        denoiser = unet_config_of(job.model)
    except Exception:  # noqa: BLE001 - a model that does not load is the job's failure, reported when it is loaded
        return
    if config is not None and is_flow_matching(config) and job.scheduler is not SchedulerName.EULER:
        make_scheduler(job.scheduler, config)
    if denoiser is None or not is_transformer_config(denoiser):
        return
    if job.parallel.split_cfg and is_flux_config(denoiser):
        raise BadInput("split_cfg needs classifier-free guidance, which Flux does not use (its guidance scale "
                       "is an input of the model)")
    _check_patches(job, 8 * transformer_alignment(denoiser))


def _check_patches(job: Job, step: int) -> None:
    if job.width % step or job.height % step:
        raise BadInput(f"{job.width}x{job.height}: this model needs a width and height that are multiples of {step} "
                       "px (whole patches)")


def check_size(pipe, job: Job) -> None:
    """A transformer's image must be whole patches (Flux: whole 2x2 packs), as its diffusers pipeline demands."""
    if family(pipe).transformer:
        _check_patches(job, vae_scale_of(pipe) * alignment_of(pipe))


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


def is_flow_matching(config) -> bool:
    """A sampler config of the flow-matching kind (SD3, Flux): only samplers of that kind apply to its model."""
    return "shift" in config or str(config.get("_class_name", "")).startswith("FlowMatch")


def make_scheduler(name: SchedulerName, config):
    """The manifest's sampler over the model's own noise schedule. Flow-matching models take euler only (their
    FlowMatchEulerDiscreteScheduler); BadInput for the others."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if is_flow_matching(config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if name is not SchedulerName.EULER:
            raise BadInput(f"scheduler {name.value!r} does not apply to a flow-matching model (SD3, Flux): use "
                           "\"euler\"")
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    if name is SchedulerName.EULER:
        return EulerDiscreteScheduler.from_config(config)
    if name is SchedulerName.DDIM:
        return DDIMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def is_sdxl(pipe) -> bool:
    return family(pipe) is Family.SDXL


# T5 tokens the diffusers pipelines encode by default; a tokenizer with a shorter context (the builtins') caps it.
T5_TOKENS = {Family.PIXART: 300, Family.SD3: 256, Family.FLUX: 512}


def t5_tokens(pipe) -> int:
    """The T5 sequence length a DiT pipeline is run with."""
    fam = family(pipe)
    tokenizer = getattr(pipe, {Family.PIXART: "tokenizer", Family.SD3: "tokenizer_3", Family.FLUX: "tokenizer_2"}[fam],
                        None)
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    return min(T5_TOKENS[fam], int(limit)) if limit else T5_TOKENS[fam]


def uses_guidance(pipe, job: Job) -> bool:
    """Classifier-free guidance (a batch of two): not for Flux, whose guidance scale is an input of the model."""
    return job.guidance_scale > 1.0 and family(pipe) is not Family.FLUX


def encode_prompt(pipe, job: Job, device, guidance: bool) -> tuple[torch.Tensor, dict | None]:
    """Text conditioning for the batch [uncond, cond] (or [cond] without guidance), and the model's extra inputs
    (SDXL's pooled text and time ids, PixArt's text mask, SD3's and Flux's pooled text, Flux's text ids)."""
    negative = job.negative_prompt or None
    fam = family(pipe)
    if fam is Family.PIXART:
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            job.prompt, guidance, negative_prompt=job.negative_prompt, num_images_per_prompt=1, device=device,
            clean_caption=False, max_sequence_length=t5_tokens(pipe))
        if guidance:
            embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
        return embeds, {"encoder_attention_mask": mask}
    if fam is Family.SD3:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=job.prompt, prompt_2=None, prompt_3=None, negative_prompt=negative,
            do_classifier_free_guidance=guidance, device=device, num_images_per_prompt=1,
            max_sequence_length=t5_tokens(pipe))
        if guidance:
            embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
        return embeds, {"pooled_projections": pooled}
    if fam is Family.FLUX:
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=job.prompt, prompt_2=None, device=device,
                                                      num_images_per_prompt=1, max_sequence_length=t5_tokens(pipe))
        return embeds, {"pooled_projections": pooled, "txt_ids": text_ids}
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


# Pixels in [-1, 1] (the VAE's range) from an init image: resized with Lanczos, as diffusers' VaeImageProcessor does.
INIT_IMAGE_RESAMPLE = "LANCZOS"


def load_init_image(path: str, width: int, height: int) -> torch.Tensor:
    """An img2img start image as (1, 3, height, width) float32 in [-1, 1]: RGB (alpha dropped), resized to the job's
    size with a Lanczos filter when it has another, scaled as diffusers' image processor does."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=getattr(Image.Resampling, INIT_IMAGE_RESAMPLE))
        pixels = np.array(image).astype(np.float32)[None] / 255.0
    # (1, H, W, 3) seen as (1, 3, H, W) without a copy, as diffusers does: the VAE's convolutions round differently
    # on a contiguous tensor, and the encode would no longer equal diffusers' own bit for bit.
    return 2.0 * torch.from_numpy(pixels.transpose(0, 3, 1, 2)) - 1.0


def vae_scale_of(pipe) -> int:
    """Pixel rows per latent row of the pipeline's VAE."""
    from hpcrender.parallel.bands import vae_scale

    return vae_scale(pipe.vae.config)


def latent_channels(pipe) -> int:
    """Channels of the latent the sampler steps (Flux's transformer reads them packed 2x2, four times as many)."""
    config = denoiser_of(pipe).config
    return config.in_channels // 4 if family(pipe) is Family.FLUX else config.in_channels


def alignment_of(pipe) -> int:
    """Latent rows per row of the denoiser's coarsest grid: the UNet's coarsest feature map, a transformer's token
    rows. Band edges fall on them."""
    from hpcrender.parallel.bands import unet_alignment

    return unet_alignment(denoiser_of(pipe).config)


def to_latent_space(vae_config, latent: torch.Tensor) -> torch.Tensor:
    """A VAE latent as the denoiser sees it: scaled (and for VAEs that give them, centred by the latents' mean and
    std, or shifted), as diffusers' img2img pipelines do. decode() undoes it."""
    if getattr(vae_config, "latents_mean", None) is not None and getattr(vae_config, "latents_std", None) is not None:
        mean = torch.tensor(vae_config.latents_mean).view(1, -1, 1, 1).to(latent)
        std = torch.tensor(vae_config.latents_std).view(1, -1, 1, 1).to(latent)
        return (latent - mean) * vae_config.scaling_factor / std
    if getattr(vae_config, "shift_factor", None) is not None:
        return (latent - vae_config.shift_factor) * vae_config.scaling_factor
    return vae_config.scaling_factor * latent


def from_latent_space(vae_config, latent: torch.Tensor) -> torch.Tensor:
    if getattr(vae_config, "latents_mean", None) is not None and getattr(vae_config, "latents_std", None) is not None:
        mean = torch.tensor(vae_config.latents_mean).view(1, -1, 1, 1).to(latent)
        std = torch.tensor(vae_config.latents_std).view(1, -1, 1, 1).to(latent)
        return latent * std / vae_config.scaling_factor + mean
    if getattr(vae_config, "shift_factor", None) is not None:
        return latent / vae_config.scaling_factor + vae_config.shift_factor
    return latent / vae_config.scaling_factor


def noised_image_latent(moments: torch.Tensor, vae_config, scheduler, first: int, seed: int) -> torch.Tensor:
    """The img2img start latent, whole and float32: a sample of the image's latent distribution (`moments`, as the
    VAE's encoder gives them) and the noise added to it at timestep `first`, both drawn on the CPU from one
    generator seeded by the job's seed, in that order, as diffusers' img2img pipelines draw them."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    gen = torch.Generator("cpu").manual_seed(seed)
    latent = to_latent_space(vae_config, DiagonalGaussianDistribution(moments.float()).sample(gen))
    noise = torch.randn(latent.shape, generator=gen, dtype=torch.float32)
    return noised_to(scheduler, latent, noise, first)


def noised_to(scheduler, latent: torch.Tensor, noise: torch.Tensor, first: int) -> torch.Tensor:
    """`latent` with `noise` added as the sampler's step `first` expects its input."""
    if hasattr(scheduler, "scale_noise"):  # flow matching: a straight line from the image to the noise
        return scheduler.scale_noise(latent, scheduler.timesteps[first:first + 1], noise)
    return scheduler.add_noise(latent, noise, scheduler.timesteps[first:first + 1])


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
    from hpcrender.parallel.gather import exchange_branch

    return exchange_branch(prediction, layout.branch, comms.global_ranks[branch_partner(layout)], comms.group)


def _peak_memory(device) -> int:
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
    job: Job
    layout: GroupLayout
    comms: Comms
    device: object
    on_step: Callable[[int, int], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_collective: Callable[[], None] | None = None
    result: ImageResult = field(default_factory=lambda: ImageResult(image=None, latent=None))
    bands: tuple = ()  # the UNet's latent row bands on this rank's patch group (empty: no bands)

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.job.dtype]

    @property
    def guidance(self) -> bool:
        return uses_guidance(self.pipe, self.job)

    @property
    def parallel(self) -> bool:
        """The UNet runs band-parallel."""
        return self.job.parallel.mode is not Mode.NONE and self.layout.patch_ranks > 1

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


# --- the stages ------------------------------------------------------------------------------------------------


def conditioning(run: Render) -> Conditioning:
    """Encode the prompt (every rank: it is cheap next to the UNet, and saves a broadcast of the embeddings)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        embeds, added = encode_prompt(run.pipe, run.job, run.device, run.guidance)
    embeds = _select_branch(embeds.to(run.dtype), run.layout)
    if added is not None:
        added = {k: _select_branch(v.to(run.dtype) if v.is_floating_point() else v, run.layout)
                 for k, v in added.items()}
    run.result.encode_seconds += time.perf_counter() - t0
    return Conditioning(embeds, added)


def set_timesteps(scheduler, pipe, steps: int, latent_rows: int, latent_cols: int, device) -> None:
    """The sampler's timesteps for `steps` steps, as the model's diffusers pipeline sets them: Flux's sigmas and
    both flow models' resolution-dependent shift `mu` from the whole image's token count (never a band's)."""
    fam = family(pipe)
    config = scheduler.config
    if not fam.flow_matching:
        scheduler.set_timesteps(steps, device=device)
        return
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    patch = alignment_of(pipe)
    tokens = (latent_rows // patch) * (latent_cols // patch)
    kwargs = {}
    if fam is Family.FLUX or config.get("use_dynamic_shifting", None):
        kwargs["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.15 if fam is Family.FLUX else 1.16))
    if fam is Family.FLUX and not config.get("use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)


def timesteps(run: Render, first: int = 0):
    """The job's sampler with its timesteps set; from step `first` on (img2img), as diffusers' pipelines begin
    there (set_begin_index)."""
    scheduler = make_scheduler(run.job.scheduler, run.pipe.scheduler.config)
    scale = vae_scale_of(run.pipe)
    set_timesteps(scheduler, run.pipe, run.job.steps, run.job.height // scale, run.job.width // scale, run.device)
    if first and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first * scheduler.order)
    run.result.first_step = first
    return scheduler


def noise_latent(run: Render, scheduler) -> tuple[torch.Tensor, int]:
    """Text-to-image's start: this rank's band of the seed's noise at the schedule's first sigma."""
    whole = initial_noise(run.job, latent_channels(run.pipe), vae_scale_of(run.pipe))
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
    whole = noised_image_latent(moments, run.pipe.vae.config, scheduler, first, job.seed)
    run.result.encode_seconds += time.perf_counter() - t0
    return run.band_of(whole), first


def checkpoint_latent(run: Render, scheduler, resume: Checkpoint) -> tuple[torch.Tensor, int]:
    """A stopped render's start: its latent band and the sampler's state after its last step."""
    job = run.job
    if resume.steps != job.steps or not job.first_step < resume.step < len(scheduler.timesteps):
        raise ValueError(f"a checkpoint after step {resume.step} of {resume.steps} does not fit {job.steps} steps "
                         f"from step {job.first_step}")
    def band(index: int, array: np.ndarray) -> torch.Tensor:
        return with_layout(run.band_of(torch.from_numpy(array)), resume.is_channels_last(index))

    restore_scheduler(scheduler, resume.scalars,
                      tuple(None if h is None else band(i, h) for i, h in enumerate(resume.history, start=1)))
    run.result.resumed_from = resume.step
    return band(0, resume.latent), resume.step


def denoise(run: Render, cond: Conditioning, scheduler, latent: torch.Tensor, start: int) -> torch.Tensor:
    """Steps `start`.. of the schedule over this rank's band, the parallel plan around the UNet for their duration.

    The plan's forward pre-hook counts the steps from `start` as its 0: a resumed or img2img displaced render warms
    up again. Stops early (run.result.stopped_at) when should_stop says so between steps."""
    job, layout, result = run.job, run.layout, run.result
    run.collective()  # the loop's exchanges, or the gather and decode after it
    handle: Parallelized | None = None
    model = denoiser_of(run.pipe)
    if run.parallel:
        from hpcrender.parallel.plan import PatchPlan, parallelize

        plan = PatchPlan(mode=job.parallel.mode, groupnorm=job.parallel.groupnorm,
                         warmup_steps=job.parallel.warmup_steps, bands=run.bands, rank=layout.patch_rank,
                         halo=job.parallel.halo)
        handle = parallelize(model, plan, run.comms.patch_group)
    batch = 2 if run.guidance and not layout.split_cfg else 1
    try:
        with torch.no_grad():
            for i in range(start, len(scheduler.timesteps)):
                t = scheduler.timesteps[i]
                t0 = time.perf_counter()
                model_in = torch.cat([latent] * batch)
                if hasattr(scheduler, "scale_model_input"):
                    model_in = scheduler.scale_model_input(model_in, t)
                noise = predict(run, model, cond, model_in, t)
                if layout.split_cfg:
                    noise = guidance_pair(noise, layout, run.comms)
                if run.guidance:
                    uncond, text = noise.chunk(2)
                    noise = uncond + job.guidance_scale * (text - uncond)
                if noise.shape[1] == 2 * latent.shape[1]:  # PixArt's learnt variance: the sampler takes the mean
                    noise = noise.chunk(2, dim=1)[0]
                latent = scheduler.step(noise, t, latent, return_dict=False)[0]
                _sync(run.device)
                result.step_seconds.append(time.perf_counter() - t0)
                if run.on_step is not None:
                    run.on_step(i + 1, job.steps)
                if run.should_stop is not None and i + 1 < job.steps and run.should_stop():
                    result.stopped_at = i + 1
                    break
    finally:
        if handle is not None:
            result.exchange = handle.stats()
            handle.remove()
    return latent


def pack_2x2(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> Flux's tokens (B, h/2 * w/2, 4C), each token a 2x2 patch, row by row."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """pack_2x2 undone: Flux's tokens -> (B, C, rows, cols)."""
    b, _, channels = tokens.shape
    x = tokens.view(b, rows // 2, cols // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, rows, cols)


def flux_image_ids(rows: int, cols: int, device, dtype) -> torch.Tensor:
    """Flux's RoPE positions (0, row, col) of every token of a whole image of rows x cols tokens, as FluxPipeline
    makes them; a band's plan slices its own out."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def predict(run: Render, model, cond: Conditioning, model_in: torch.Tensor, t) -> torch.Tensor:
    """One forward of the denoiser over this rank's band, called as the model's diffusers pipeline calls it."""
    fam = family(run.pipe)
    batch = model_in.shape[0]
    if fam is Family.PIXART:
        return model(model_in, encoder_hidden_states=cond.embeds, timestep=t.expand(batch),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
                     **cond.added)[0]
    if fam is Family.SD3:
        return model(hidden_states=model_in, timestep=t.expand(batch), encoder_hidden_states=cond.embeds,
                     return_dict=False, **cond.added)[0]
    if fam is Family.FLUX:
        scale = vae_scale_of(run.pipe)
        whole_ids = flux_image_ids(run.job.height // scale // 2, run.job.width // scale // 2, model_in.device,
                                   cond.embeds.dtype)
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full([1], run.job.guidance_scale, device=model_in.device,
                                  dtype=torch.float32).expand(batch)
        out = model(hidden_states=pack_2x2(model_in), timestep=t.expand(batch).to(model_in.dtype) / 1000,
                    guidance=guidance, encoder_hidden_states=cond.embeds, img_ids=whole_ids, return_dict=False,
                    **cond.added)[0]
        return unpack_2x2(out, model_in.shape[2], model_in.shape[3])
    return model(model_in, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added, return_dict=False)[0]


def finish(run: Render, scheduler, latent: torch.Tensor, decode: bool) -> ImageResult:
    """After the loop: a checkpoint when it was stopped, else the whole latent and the decoded image."""
    result = run.result
    if result.stopped_at is not None:
        result.checkpoint = _checkpoint(run, latent, scheduler, result.stopped_at)
        return result
    if not decode:
        result.peak_memory_bytes = _peak_memory(run.device)
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
    result.peak_memory_bytes = _peak_memory(run.device)
    return result


# --- the compositions ------------------------------------------------------------------------------------------


def text_to_image(run: Render, resume: Checkpoint | None = None, decode: bool = True) -> ImageResult:
    cond = conditioning(run)
    scheduler = timesteps(run)
    latent, start = checkpoint_latent(run, scheduler, resume) if resume else noise_latent(run, scheduler)
    latent = denoise(run, cond, scheduler, latent, start)
    return finish(run, scheduler, latent, decode)


def img2img(run: Render, resume: Checkpoint | None = None, decode: bool = True) -> ImageResult:
    cond = conditioning(run)
    scheduler = timesteps(run, first=run.job.first_step)
    latent, start = checkpoint_latent(run, scheduler, resume) if resume else image_latent(run, scheduler)
    latent = denoise(run, cond, scheduler, latent, start)
    return finish(run, scheduler, latent, decode)


def render_image(pipe, job: Job, layout: GroupLayout, comms: Comms, device,
                 on_step: Callable[[int, int], None] | None = None, decode: bool = True,
                 should_stop: Callable[[], bool] | None = None, resume: Checkpoint | None = None,
                 on_collective: Callable[[], None] | None = None, bands: tuple = ()) -> ImageResult:
    """Render `job` with this rank's share of the work; the group's first rank gets the image (and the latent).

    bands: the run plan's latent bands for a band-parallel layout; found from the loaded model when not given.
    decode=False stops after the denoising loop (benchmarks of the UNet alone). should_stop is asked after every
    step but the last, on every rank of the group alike (it must give the group's common answer): when it says
    yes, the loop ends there and the group's first rank gets a checkpoint instead of an image. resume continues
    from such a checkpoint. on_collective is called before the group's first torch.distributed collective (never
    on a group of one): a failure after it may leave the group's communicator out of step.
    """
    check_layout(layout.size, layout.split_cfg, uses_guidance(pipe, job))
    check_size(pipe, job)
    run = Render(pipe, job, layout, comms, device, on_step=on_step, should_stop=should_stop,
                 on_collective=on_collective)
    if run.parallel:
        from hpcrender.parallel.bands import image_bands

        if not bands:
            bands = image_bands(job.height, vae_scale_of(pipe), alignment_of(pipe), layout.patch_ranks)
        run.bands = run.result.bands = tuple(bands)
    compose = img2img if job.init_image is not None else text_to_image
    return compose(run, resume, decode)


# --- what crosses ranks, through hpcrender.parallel ------------------------------------------------------------


def _whole(run: Render, band: torch.Tensor) -> torch.Tensor:
    """The whole float32 latent-shaped tensor of this rank's band, on every rank of the patch group."""
    band = band.float()
    if not run.bands:
        return band
    from hpcrender.parallel.gather import gather_rows

    return gather_rows(band, run.bands, run.comms.patch_group, dim=2)


def _checkpoint(run: Render, latent: torch.Tensor, scheduler, step: int) -> Checkpoint | None:
    """The whole latent and sampler history after `step`, gathered from the bands; on the group's first rank."""
    scalars, history = scheduler_state(scheduler)
    arrays = tuple(None if h is None else _whole(run, h).cpu().numpy() for h in (latent, *history))
    if run.layout.rank != 0:
        return None
    return Checkpoint(step=step, steps=run.job.steps, latent=arrays[0], scalars=scalars, history=arrays[1:],
                      channels_last=tuple(is_channels_last(h) for h in (latent, *history)))


def encode_image(run: Render, pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) pixels in [-1, 1] -> the whole latent distribution's parameters (float32, on the CPU),
    band-parallel over the whole group when it has more than one rank."""
    vae = run.pipe.vae
    pixels = pixels.to(device=run.device, dtype=next(vae.parameters()).dtype)
    if run.vae_parallel:
        run.collective()
        from hpcrender.parallel.vae import encode_group

        moments = encode_group(vae, pixels, vae_scale_of(run.pipe), run.layout.rank, run.layout.size,
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
        from hpcrender.parallel.vae import decode_group

        image = decode_group(vae, latent, run.layout.rank, run.layout.size, run.comms.group)
    else:
        image = vae.decode(latent, return_dict=False)[0].float()
    if run.layout.rank != 0:
        return None
    image = (image / 2 + 0.5).clamp(0, 1)
    return (image[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
