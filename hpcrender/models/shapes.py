"""What the run plan needs to know of a model before any weights are loaded: its facts (VAE scale, band alignment,
...) from its configs, and its UNet built on the meta device (shapes, no memory) for bytes, multiply-accumulates and
activation memory.

torch and diffusers are imported in model_shape: `validate` without `--ranks` never builds a shape."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from hpcrender.models import component_config_of, text_tokens_of
from hpcrender.models.facts import ModelFacts, facts_from_configs
from hpcrender.parallel.bands import is_transformer_config
from hpcrender.parallel.pipeline import parameter_split


@dataclass(frozen=True, eq=False)
class ModelShape:
    ref: str
    facts: ModelFacts
    unet: object     # UNet2DConditionModel on the meta device; None for a diffusion transformer
    parameters: int  # the UNet's parameter count
    transformer: dict | None = None  # a diffusion transformer's config (its bytes per step come from it)
    text_tokens: int | None = None   # a diffusion transformer's text tokens (models.text_tokens_of)
    parameter_split: tuple | None = None  # a transformer's parameter counts (parallel.pipefusion.parameter_split)

@functools.lru_cache(maxsize=8)
def model_shape(ref: str) -> ModelShape | None:
    """The model's shape, or None when its configs cannot be read here (a hub id not in the local cache: that model
    is checked once loaded, and a model that does not load is its job's failure)."""
    import torch
    from diffusers import UNet2DConditionModel

    unet_config, vae_config = component_config_of(ref, "denoiser"), component_config_of(ref, "vae")
    if unet_config is None or vae_config is None:
        return None
    facts = facts_from_configs(unet_config, vae_config)
    if is_transformer_config(unet_config):
        import diffusers

        with torch.device("meta"):
            model = getattr(diffusers, unet_config["_class_name"]).from_config(unet_config)
        split = parameter_split(model)
        return ModelShape(ref=ref, facts=facts, unet=None, parameters=sum(p.numel() for p in model.parameters()),
                          transformer=unet_config, text_tokens=text_tokens_of(ref), parameter_split=split)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    return ModelShape(ref=ref, facts=facts, unet=unet, parameters=sum(p.numel() for p in unet.parameters()))
