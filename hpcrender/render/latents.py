"""Latents as the model's diffusers pipeline makes them: the seed's noise drawn full-size on the CPU, a stochastic
sampler's per-step noise drawn full-size from the same generator, an img2img start image, the VAE's latent space, and
Flux's 2x2 packing and token positions."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from torch.overrides import TorchFunctionMode

from hpcrender.config import Job


def job_generator(seed: int) -> torch.Generator:
    """The job's one CPU generator: the start noise (or the img2img sample and noise) and then every step's noise of a
    stochastic sampler come from it, in that order, as diffusers' pipelines draw them from the `generator` they get."""
    return torch.Generator("cpu").manual_seed(seed)


def initial_noise(job: Job, channels: int, vae_scale: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Full-size float32 noise from the job's seed (or from `generator`, left after the draw), drawn on the CPU so
    every rank and device agrees."""
    gen = job_generator(job.seed) if generator is None else generator
    return torch.randn((1, channels, job.height // vae_scale, job.width // vae_scale), generator=gen,
                       dtype=torch.float32)


class WholeStepNoise(TorchFunctionMode):
    """Around a sampler's step: its `randn(band shape, generator=the job's generator)` drawn as the whole latent's
    noise and cut to this rank's rows, so that every rank draws the same numbers and a band-parallel image gets the
    noise the single-device one does. diffusers' samplers draw the noise of the shape of the model output they are
    given (euler_a, DPM-Solver++ SDE, LCM have no argument to hand them noise), which on a band is the band's."""

    def __init__(self, generator: torch.Generator, whole: tuple[int, ...], rows: slice):
        super().__init__()
        self.generator = generator
        self.whole = tuple(whole)
        self.rows = rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.randn or kwargs.get("generator") is not self.generator:
            return func(*args, **kwargs)
        shape = tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else tuple(args)
        band = (*self.whole[:2], len(range(*self.rows.indices(self.whole[2]))), *self.whole[3:])
        if shape != band:
            raise RuntimeError(f"a sampler drew noise of shape {shape}, not its latent band's {band}")
        return func(self.whole, **kwargs)[:, :, self.rows].contiguous()


# Pixels in [-1, 1] (the VAE's range) from an init image: resized with Lanczos, as diffusers' VaeImageProcessor does.
INIT_IMAGE_RESAMPLE = "LANCZOS"


def load_init_image(path: str, width: int, height: int) -> torch.Tensor:
    """An img2img start image as (1, 3, height, width) float32 in [-1, 1]: RGB (alpha dropped), resized to the job's
    size with a Lanczos filter when it has another, scaled as diffusers' image processor does."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=getattr(Image.Resampling, INIT_IMAGE_RESAMPLE))
        pixels = np.array(image).astype(np.float32)[None] / 255.0
    # (1, H, W, 3) seen as (1, 3, H, W) without a copy, as diffusers does: the VAE's convolutions round differently
    # on a contiguous tensor, and the encode would no longer equal diffusers' own bit for bit.
    return 2.0 * torch.from_numpy(pixels.transpose(0, 3, 1, 2)) - 1.0


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


def noised_image_latent(moments: torch.Tensor, vae_config, scheduler, first: int, seed: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The img2img start latent, whole and float32: a sample of the image's latent distribution (`moments`, as the
    VAE's encoder gives them) and the noise added to it at step `first`, both drawn on the CPU from one generator
    seeded by the job's seed (or `generator`, left after the draws), in that order, as diffusers' img2img pipelines
    draw them."""
    gen = job_generator(seed) if generator is None else generator
    latent = to_latent_space(vae_config, DiagonalGaussianDistribution(moments.float()).sample(gen))
    noise = torch.randn(latent.shape, generator=gen, dtype=torch.float32)
    return noised_to(scheduler, latent, noise, first)


def noised_to(scheduler, latent: torch.Tensor, noise: torch.Tensor, first: int) -> torch.Tensor:
    """`latent` with `noise` added as the sampler's step `first` expects its input (Heun's timesteps hold two entries
    a step: the step's first is at first * order, where diffusers' img2img pipelines cut the list)."""
    at = first * scheduler.order
    if hasattr(scheduler, "scale_noise"):  # flow matching: a straight line from the image to the noise
        return scheduler.scale_noise(latent, scheduler.timesteps[at:at + 1], noise)
    return scheduler.add_noise(latent, noise, scheduler.timesteps[at:at + 1])


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
