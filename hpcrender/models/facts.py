"""What the render needs to know of a model, asked once: one frozen description built from a loaded pipeline, or from
the model's configs alone (the run plan, before any weights), and passed down instead of asking the pipeline again."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hpcrender.errors import BadInput
from hpcrender.models.reference import Family
from hpcrender.parallel.bands import is_flux_config, is_transformer_config, unet_alignment, vae_scale

# Pipeline classes by family, most derived first (diffusers' SDXL pipeline is no subclass of SD's, but be safe).
_PIPELINE_FAMILIES = (("StableDiffusionXLPipeline", Family.SDXL), ("StableDiffusionPipeline", Family.SD),
                      ("PixArtSigmaPipeline", Family.PIXART), ("StableDiffusion3Pipeline", Family.SD3),
                      ("FluxPipeline", Family.FLUX))


@dataclass(frozen=True)
class ModelFacts:
    family: Family
    vae_scale: int        # pixel rows per latent row, from the model's own VAE config
    alignment: int        # latent rows per row of the denoiser's coarsest grid (a transformer's token row): band edges
    latent_channels: int  # channels of the latent the sampler steps (Flux's transformer reads them packed 2x2)
    guidance_embeds: bool = False  # Flux-dev: the guidance scale is an input of the model

    @property
    def transformer(self) -> bool:
        return self.family.transformer

    @property
    def flow_matching(self) -> bool:
        return self.family.flow_matching

    @property
    def pixel_alignment(self) -> int:
        """Pixel rows per row of the denoiser's coarsest grid: a transformer's image must be whole multiples."""
        return self.vae_scale * self.alignment

    def uses_guidance(self, guidance_scale: float) -> bool:
        """Classifier-free guidance (a batch of two): not for Flux, whose guidance scale is an input of the model."""
        return guidance_scale > 1.0 and self.family is not Family.FLUX


def _get(config: Mapping | object, key: str, default=None):
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def family_of_config(denoiser_config: Mapping | object) -> Family:
    """The family from the denoiser's config alone (the UNet's or the transformer's)."""
    if is_transformer_config(denoiser_config):
        if is_flux_config(denoiser_config):
            return Family.FLUX
        if _get(denoiser_config, "_class_name") == "SD3Transformer2DModel" or \
                _get(denoiser_config, "pooled_projection_dim") is not None:
            return Family.SD3
        return Family.PIXART
    return Family.SDXL if _get(denoiser_config, "addition_embed_type") == "text_time" else Family.SD


def facts_from_configs(denoiser_config: Mapping | object, vae_config: Mapping | object,
                       family: Family | None = None) -> ModelFacts:
    """The facts from the configs alone, before any weights are loaded (the run plan's checks and estimates)."""
    family = family_of_config(denoiser_config) if family is None else family
    channels = int(_get(denoiser_config, "in_channels"))
    return ModelFacts(family=family, vae_scale=vae_scale(vae_config), alignment=unet_alignment(denoiser_config),
                      latent_channels=channels // 4 if family is Family.FLUX else channels,
                      guidance_embeds=bool(_get(denoiser_config, "guidance_embeds", False)))


def pipeline_family(pipe) -> Family:
    """The model family, from the pipeline's class (or a class it derives from)."""
    names = {cls.__name__ for cls in type(pipe).__mro__}
    for name, found in _PIPELINE_FAMILIES:
        if name in names:
            return found
    raise BadInput(f"{type(pipe).__name__} is not a Stable Diffusion 1.x, SDXL, PixArt-Sigma, SD3 or Flux pipeline")


def facts_of(pipe) -> ModelFacts:
    """The facts of a loaded pipeline: asked once when it is loaded, then carried with it."""
    family = pipeline_family(pipe)
    denoiser = pipe.transformer if family.transformer else pipe.unet
    return facts_from_configs(denoiser.config, pipe.vae.config, family)
