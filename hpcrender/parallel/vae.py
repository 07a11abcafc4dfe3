"""The VAE band-parallel over a whole rank group: exact (fresh halos, pooled GroupNorm statistics, the whole image's
keys and values in the mid-block attention), so that an image encodes and decodes to what one device gives."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hpcrender.config import GroupNormMode, Mode
from hpcrender.errors import DoesNotFit
from hpcrender.parallel.bands import Band, split_rows
from hpcrender.parallel.conv import needs_halo
from hpcrender.parallel.gather import gather_rows
from hpcrender.parallel.parallelize import parallelize
from hpcrender.parallel.plan import PatchPlan


def vae_bands(latent_rows: int, ranks: int) -> tuple[Band, ...]:
    """Latent rows of each rank's band for the VAE: as even as can be (the VAE has no coarse rows to align to
    beyond the latent's own)."""
    return split_rows(latent_rows, ranks)


def _exact_plan(bands: tuple[Band, ...], rank: int) -> PatchPlan:
    return PatchPlan(mode=Mode.SYNC, groupnorm=GroupNormMode.SYNC, warmup_steps=0, bands=bands, rank=rank)


def _local_conv(conv: nn.Module | None, what: str) -> None:
    if conv is not None and isinstance(conv, nn.Conv2d) and needs_halo(conv):
        raise DoesNotFit(f"the VAE's {what} convolution reads neighbouring rows")


def decode_parallel(vae, latent_band: torch.Tensor, bands: Sequence[Band], rank: int, group) -> torch.Tensor:
    """This rank's band of `vae.decode(latent)` (rows scaled by the VAE's factor), decoded band-parallel with fresh
    exchanges: equal to the single-device decode. The VAE is left as it was."""
    bands = tuple(bands)
    if len(bands) == 1:
        return vae.decode(latent_band, return_dict=False)[0]
    post = getattr(vae, "post_quant_conv", None)
    _local_conv(post, "post-quantization")
    handle = parallelize(vae.decoder, _exact_plan(bands, rank), group)
    try:
        z = post(latent_band) if post is not None else latent_band
        return vae.decoder(z)
    finally:
        handle.remove()


def encode_parallel(vae, image_band: torch.Tensor, bands: Sequence[Band], rank: int, group) -> torch.Tensor:
    """This rank's band of the latent distribution's parameters (mean and log-variance, as `vae.encode` gives them
    to DiagonalGaussianDistribution) of the image whose pixel rows `image_band` holds; `bands` are latent rows.
    Encoded band-parallel with fresh exchanges: equal to the single-device encode. The VAE is left as it was."""
    bands = tuple(bands)
    quant = getattr(vae, "quant_conv", None)
    if len(bands) == 1:
        moments = vae.encoder(image_band)
        return quant(moments) if quant is not None else moments
    _local_conv(quant, "quantization")
    scale = image_band.shape[2] // bands[rank].size
    pixel_bands = tuple(Band(b.start * scale, b.stop * scale) for b in bands)
    handle = parallelize(vae.encoder, _exact_plan(pixel_bands, rank), group)
    try:
        moments = vae.encoder(image_band)
    finally:
        handle.remove()
    return quant(moments) if quant is not None else moments


def decode_group(vae, latent: torch.Tensor, rank: int, ranks: int, group) -> torch.Tensor:
    """The whole image of the whole `latent`, decoded band-parallel over a group of `ranks` (every rank holds the
    latent; every rank gets the image, in float32)."""
    bands = vae_bands(latent.shape[2], ranks)
    mine = bands[rank]
    part = decode_parallel(vae, latent[:, :, mine.start:mine.stop], bands, rank, group).float()
    return gather_rows(part, bands, group, dim=2, scale=part.shape[2] // mine.size)


def encode_group(vae, image: torch.Tensor, scale: int, rank: int, ranks: int, group) -> torch.Tensor:
    """The latent distribution's parameters of the whole `image`, encoded band-parallel over a group of `ranks`
    (every rank holds the image; every rank gets the whole result, in float32). `scale`: pixel rows per latent row."""
    bands = vae_bands(image.shape[2] // scale, ranks)
    mine = bands[rank]
    part = encode_parallel(vae, image[:, :, mine.start * scale:mine.stop * scale], bands, rank, group).float()
    return gather_rows(part, bands, group, dim=2)
