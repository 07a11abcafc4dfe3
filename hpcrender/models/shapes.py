"""What the run plan needs to know of a model before any weights are loaded: its VAE scale, its band alignment, and
its UNet built on the meta device (shapes, no memory) for bytes, multiply-accumulates and activation memory."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from hpcrender.models import component_config_of


@dataclass(frozen=True, eq=False)
class ModelShape:
    ref: str
    vae_scale: int   # pixel rows per latent row, from the model's own VAE config
    alignment: int   # latent rows per row of the coarsest feature map (a transformer's token row): band edges
    unet: object     # UNet2DConditionModel on the meta device; None for a diffusion transformer
    parameters: int  # the UNet's parameter count
    transformer: dict | None = None  # a diffusion transformer's config (its bytes per step come from it)


@functools.lru_cache(maxsize=8)
def model_shape(ref: str) -> ModelShape | None:
    """The model's shape, or None when its configs cannot be read here (a hub id not in the local cache: that model
    is checked once loaded, and a model that does not load is its job's failure)."""
    import torch
    from diffusers import UNet2DConditionModel

    from hpcrender.parallel.bands import is_transformer_config, transformer_alignment, unet_alignment, vae_scale

    unet_config, vae_config = component_config_of(ref, "denoiser"), component_config_of(ref, "vae")
    if unet_config is None or vae_config is None:
        return None
    if is_transformer_config(unet_config):
        return ModelShape(ref=ref, vae_scale=vae_scale(vae_config), alignment=transformer_alignment(unet_config),
                          unet=None, parameters=0, transformer=unet_config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    return ModelShape(ref=ref, vae_scale=vae_scale(vae_config), alignment=unet_alignment(unet_config), unet=unet,
                      parameters=sum(p.numel() for p in unet.parameters()))
