"""Builtin diffusion transformers: PixArt-Sigma, SD3 and Flux.1 pipelines built offline from configs, with seeded
weights, the local tokenizer and the schedulers of the real checkpoints.

The tiny configs follow the ones diffusers' own tests build, with four blocks each (Flux: two joint, two
single-stream) so that a pipeline can cut them two and three ways; their T5 and CLIP encoders are configured here
instead of downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpcrender.models.builtin import (
    LOCAL_TOKEN_IDS, LOCAL_VOCAB_SIZE, _vae, build_tokenizer, fill_seeded,
)
from hpcrender.models.reference import Family

DIT_NAMES = ("tiny-pixart", "tiny-sd3", "tiny-flux", "pixart-mini")

# Text tokens of the tiny builtins' encoders (CLIP's and T5's): short, so that tests spend their time on the image.
TINY_TOKENS = 16

# The samplers of the real checkpoints: PixArt-Sigma's DPM-Solver over SD's linear betas (epsilon), SD3's flow
# matching with a fixed shift of 3, Flux.1's flow matching with the shift worked out from the image's token count.
PIXART_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
    "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
    "solver_order": 2, "algorithm_type": "dpmsolver++", "lower_order_final": True, "timestep_spacing": "linspace",
    "steps_offset": 0, "use_karras_sigmas": False, "clip_sample": False, "sample_max_value": 1.0,
    "set_alpha_to_one": False,
}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
    "max_shift": 1.15,
}


@dataclass(frozen=True)
class DitArchitecture:
    """Component configs of one transformer pipeline; text encoders in the pipeline's order, each (class, config)."""

    name: str
    family: Family
    transformer: dict
    vae: dict
    text_encoders: tuple[tuple[str, dict], ...]
    scheduler: dict
    tokens: int  # the local tokenizer's length (every encoder's)


def _clip(hidden: int, layers: int, heads: int, projection: int, tokens: int) -> dict:
    return dict(vocab_size=LOCAL_VOCAB_SIZE, hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=tokens,
                hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=projection, **LOCAL_TOKEN_IDS)


def _t5(width: int, layers: int, heads: int) -> dict:
    return dict(vocab_size=LOCAL_VOCAB_SIZE, d_model=width, d_kv=width // heads, d_ff=2 * width, num_layers=layers,
                num_heads=heads, relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                is_encoder_decoder=False, use_cache=False, pad_token_id=LOCAL_TOKEN_IDS["pad_token_id"],
                eos_token_id=LOCAL_TOKEN_IDS["eos_token_id"], decoder_start_token_id=0)


def _flow_vae(widths, scaling: float, shift: float) -> dict:
    """SD3's and Flux's VAE: 16 latent channels, a shift, no quantization convolutions."""
    return dict(_vae(widths, groups=8, layers=1, scaling=scaling, sample_size=256), latent_channels=16,
                shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)


def architecture(name: str) -> DitArchitecture:
    if name == "tiny-pixart":
        return DitArchitecture(
            name, Family.PIXART,
            transformer=dict(sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                             caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8,
                             attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                             norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6),
            vae=_vae((8, 16, 16, 16), groups=8, layers=1, scaling=0.13025, sample_size=256),
            text_encoders=(("t5", _t5(32, 2, 4)),),
            scheduler=PIXART_SCHEDULER, tokens=TINY_TOKENS,
        )
    if name == "pixart-mini":
        # PixArt-Sigma's structure (patch 2, head width 72, AdaLN-single, T5 cross-attention) at a quarter of its
        # width and 12 of its 28 blocks: a 1024x1024 step runs in seconds on a CPU core.
        return DitArchitecture(
            name, Family.PIXART,
            transformer=dict(sample_size=128, num_layers=12, patch_size=2, attention_head_dim=72,
                             num_attention_heads=4, caption_channels=256, in_channels=4, cross_attention_dim=288,
                             out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                             num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                             norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False),
            vae=_vae((32, 64, 64, 64), groups=8, layers=1, scaling=0.13025, sample_size=1024),
            text_encoders=(("t5", _t5(256, 4, 4)),),
            scheduler=PIXART_SCHEDULER, tokens=120,
        )
    if name == "tiny-sd3":
        # SD3.5's extras too: RMS query/key norms and a second (image-only) attention in the first block.
        return DitArchitecture(
            name, Family.SD3,
            transformer=dict(sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8,
                             num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                             pooled_projection_dim=32, out_channels=16, pos_embed_max_size=32,
                             dual_attention_layers=(0,), qk_norm="rms_norm"),
            vae=_flow_vae((8, 16, 16, 16), scaling=1.5305, shift=0.0609),
            text_encoders=(("clip_projection", _clip(16, 2, 2, 16, TINY_TOKENS)),
                           ("clip_projection", _clip(16, 2, 2, 16, TINY_TOKENS)),
                           ("t5", _t5(32, 2, 4))),
            scheduler=SD3_SCHEDULER, tokens=TINY_TOKENS,
        )
    if name == "tiny-flux":
        return DitArchitecture(
            name, Family.FLUX,
            transformer=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
            vae=_flow_vae((8, 16, 16, 16), scaling=0.3611, shift=0.1159),
            text_encoders=(("clip", _clip(32, 2, 2, 32, TINY_TOKENS)), ("t5", _t5(32, 2, 4))),
            scheduler=FLUX_SCHEDULER, tokens=TINY_TOKENS,
        )
    raise KeyError(name)


TRANSFORMER_CLASSES = {Family.PIXART: "PixArtTransformer2DModel", Family.SD3: "SD3Transformer2DModel",
                       Family.FLUX: "FluxTransformer2DModel"}
PIPELINE_CLASSES = {Family.PIXART: "PixArtSigmaPipeline", Family.SD3: "StableDiffusion3Pipeline",
                    Family.FLUX: "FluxPipeline"}


def transformer_config(name: str) -> dict:
    """The transformer's config with its class name (what a diffusers folder's transformer/config.json holds)."""
    arch = architecture(name)
    return {"_class_name": TRANSFORMER_CLASSES[arch.family], **arch.transformer}


def _text_encoder(kind: str, config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if kind == "t5":
        return T5EncoderModel(T5Config(**config))
    cls = CLIPTextModelWithProjection if kind == "clip_projection" else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def build_dit(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The pipeline of builtin transformer `name`. Built on the CPU (the position tables are buffers the models make
    themselves), then every parameter overwritten from its seeded stream."""
    import diffusers
    from diffusers import AutoencoderKL

    arch = architecture(name)
    transformer_cls = getattr(diffusers, TRANSFORMER_CLASSES[arch.family])
    parts = {"transformer": transformer_cls(**arch.transformer), "vae": AutoencoderKL(**arch.vae)}
    for index, (kind, config) in enumerate(arch.text_encoders):
        parts["text_encoder" if index == 0 else f"text_encoder_{index + 1}"] = _text_encoder(kind, config)
    for component, module in parts.items():
        fill_seeded(module, name, component, keep_buffers=True)
        parts[component] = torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)
    for index in range(len(arch.text_encoders)):
        parts["tokenizer" if index == 0 else f"tokenizer_{index + 1}"] = build_tokenizer(arch.tokens)
    scheduler_cls = getattr(diffusers, arch.scheduler["_class_name"])
    parts["scheduler"] = scheduler_cls.from_config(arch.scheduler)
    pipeline_cls = getattr(diffusers, PIPELINE_CLASSES[arch.family])
    return pipeline_cls(**parts)
