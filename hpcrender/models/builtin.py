"""Builtin models: SD/SDXL pipelines built offline from configs, with the same seeded weights on every machine.

The architectures here also describe the real SD 1.5 and SDXL checkpoints, so that a single .safetensors file
can be loaded offline against configs written from them (see checkpoints.py).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import string
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcrender.models.reference import BUILTIN_NAMES, CONTROLNET_BASES, Family

# The scheduler config of the real SDXL base checkpoint (SD 1.5's differs only in keys Euler ignores): the renderer
# builds euler/ddim/dpmpp from it, so DDIM, too, must not clip the predicted x0 (clip_sample is off in real configs;
# DDIM's default clips to [-1, 1]). Build with from_config, which keeps the keys Euler itself does not take.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}

MAX_TOKENS = 77  # CLIP's context length, which SD and SDXL pipelines pad to
UPSTREAM_VOCAB_SIZE = 49408
# Token ids of the upstream CLIP configs (eos 2 selects CLIP's argmax pooling, which the real vocab needs).
UPSTREAM_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
_SDXL_TIME_IDS = 6  # original size, crop top-left, target size: 6 numbers, each embedded separately


@dataclass(frozen=True)
class Architecture:
    """Component configs of one pipeline; the last text encoder of SDXL carries the pooled projection."""

    name: str
    family: Family
    unet: dict
    vae: dict
    text_encoders: tuple[dict, ...]
    upstream_tokenizer: bool  # True: needs the real CLIP vocabulary (real checkpoints), False: the local one


# ---------------------------------------------------------------------------------------------- tokenizer


def _byte_symbols() -> list[str]:
    """CLIP's (GPT-2's) printable stand-in for each of the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt of the local byte-level BPE: every byte alone and at a word's end, lowercase
    letter pairs merged (so words take about half as many tokens), and the two special tokens last, as in CLIP."""
    symbols = _byte_symbols()
    letters = string.ascii_lowercase
    merges = [f"{a} {b}" for a in letters for b in letters] + [f"{a} {b}</w>" for a in letters for b in letters]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


LOCAL_VOCAB_SIZE = len(tokenizer_files()[0])
LOCAL_TOKEN_IDS = {"bos_token_id": LOCAL_VOCAB_SIZE - 2, "eos_token_id": LOCAL_VOCAB_SIZE - 1,
                   "pad_token_id": LOCAL_VOCAB_SIZE - 1}


def write_tokenizer_files(folder: Path) -> None:
    vocab, merges = tokenizer_files()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tokenizer(max_tokens: int = MAX_TOKENS):
    """A CLIPTokenizer over the local vocabulary; any text tokenizes (bytes are the fallback)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="hpcrender-tokenizer-") as tmp:
        write_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_tokens)


# ---------------------------------------------------------------------------------------------- configs


def _sd_unet(widths, heads, context, groups, sample_size, layers=2) -> dict:
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers,
        block_out_channels=tuple(widths), down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=heads, cross_attention_dim=context,
        norm_num_groups=groups, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    )


def _sdxl_unet(widths, transformer_layers, heads, context, groups, time_dim, pooled_dim, sample_size) -> dict:
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(widths), down_block_types=_SDXL_DOWN, up_block_types=_SDXL_UP,
        mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=tuple(transformer_layers),
        attention_head_dim=tuple(heads), cross_attention_dim=context, norm_num_groups=groups, norm_eps=1e-5,
        act_fn="silu", flip_sin_to_cos=True, freq_shift=0, use_linear_projection=True,
        addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + _SDXL_TIME_IDS * time_dim,
    )


def _vae(widths, groups, layers, scaling, sample_size, force_upcast=False) -> dict:
    # One down block per width: 4 widths give the VAE scale factor 8 of real SD.
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(widths),
        down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
        layers_per_block=layers, norm_num_groups=groups, act_fn="silu", sample_size=sample_size,
        scaling_factor=scaling, force_upcast=force_upcast,
    )


def _clip(hidden, layers, heads, act, token_ids, vocab_size, projection=None) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=MAX_TOKENS, hidden_act=act, layer_norm_eps=1e-5,
        projection_dim=projection if projection is not None else hidden, **token_ids,
    )


def architecture(name: str) -> Architecture:
    """The builtin architectures plus "sd15" and "sdxl-base", the real checkpoints' layouts."""
    local = dict(token_ids=LOCAL_TOKEN_IDS, vocab_size=LOCAL_VOCAB_SIZE)
    upstream = dict(token_ids=UPSTREAM_TOKEN_IDS, vocab_size=UPSTREAM_VOCAB_SIZE)
    if name == "tiny-sd":
        return Architecture(
            name, Family.SD,
            unet=_sd_unet((16, 32, 32, 32), heads=2, context=32, groups=8, sample_size=32),
            vae=_vae((8, 16, 16, 16), groups=8, layers=1, scaling=0.18215, sample_size=256),
            text_encoders=(_clip(32, 2, 2, "quick_gelu", **local),),
            upstream_tokenizer=False,
        )
    if name == "tiny-sdxl":
        # The two text encoders differ in width: single-file loading tells them apart by it.
        return Architecture(
            name, Family.SDXL,
            unet=_sdxl_unet((16, 32, 48), (1, 1, 2), (2, 4, 6), context=32 + 48, groups=8, time_dim=8,
                            pooled_dim=32, sample_size=32),
            vae=_vae((8, 16, 16, 16), groups=8, layers=1, scaling=0.13025, sample_size=256),
            text_encoders=(_clip(32, 2, 2, "quick_gelu", **local), _clip(48, 2, 2, "gelu", projection=32, **local)),
            upstream_tokenizer=False,
        )
    if name == "sdxl-mini":
        # The UNet measured with the reference code (ANCHORS.md section 7); text encoders 192 + 320 = 512 wide.
        return Architecture(
            name, Family.SDXL,
            unet=_sdxl_unet((80, 160, 320), (1, 2, 10), (5, 10, 20), context=512, groups=8, time_dim=256,
                            pooled_dim=320, sample_size=128),
            vae=_vae((32, 64, 64, 64), groups=8, layers=1, scaling=0.13025, sample_size=1024),
            text_encoders=(_clip(192, 4, 3, "quick_gelu", **local), _clip(320, 4, 5, "gelu", projection=320, **local)),
            upstream_tokenizer=False,
        )
    if name in ("sdxl", "sdxl-base"):
        # stabilityai/stable-diffusion-xl-base-1.0: CLIP ViT-L and OpenCLIP ViT-bigG text encoders.
        vocab = upstream if name == "sdxl-base" else dict(local, vocab_size=UPSTREAM_VOCAB_SIZE)
        return Architecture(
            name, Family.SDXL,
            unet=_sdxl_unet((320, 640, 1280), (1, 2, 10), (5, 10, 20), context=768 + 1280, groups=32,
                            time_dim=256, pooled_dim=1280, sample_size=128),
            vae=_vae((128, 256, 512, 512), groups=32, layers=2, scaling=0.13025, sample_size=1024,
                     force_upcast=True),
            text_encoders=(_clip(768, 12, 12, "quick_gelu", **vocab),
                           _clip(1280, 32, 20, "gelu", projection=1280, **vocab)),
            upstream_tokenizer=name == "sdxl-base",
        )
    if name == "sd15":
        # stable-diffusion-v1-5: CLIP ViT-L text encoder.
        return Architecture(
            name, Family.SD,
            unet=_sd_unet((320, 640, 1280, 1280), heads=8, context=768, groups=32, sample_size=64),
            vae=_vae((128, 256, 512, 512), groups=32, layers=2, scaling=0.18215, sample_size=512),
            text_encoders=(_clip(768, 12, 12, "quick_gelu", **upstream),),
            upstream_tokenizer=True,
        )
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------- weights


def _seed(*names: str) -> int:
    digest = hashlib.sha256("/".join(names).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ParamRole(enum.Enum):
    WEIGHT = "weight"            # uniform on +-1/sqrt(fan_in): torch's default for Linear and Conv layers
    BIAS = "bias"                # small uniform, so that no path is exactly zero
    NORM_WEIGHT = "norm_weight"  # ones
    NORM_BIAS = "norm_bias"      # zeros


def param_role(owner: torch.nn.Module, param_name: str, param: torch.Tensor) -> ParamRole:
    if isinstance(owner, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or type(owner).__name__.endswith("Norm"):
        return ParamRole.NORM_WEIGHT if param_name == "weight" else ParamRole.NORM_BIAS
    return ParamRole.BIAS if param.ndim == 1 else ParamRole.WEIGHT


def seeded_values(model_name: str, component: str, param: str, shape: torch.Size, role: ParamRole) -> torch.Tensor:
    """fp32 values of one parameter from a generator seeded by its name.

    Weights are uniform on +-1/sqrt(fan_in), the variance of torch's default initialisation (kaiming-uniform with
    a = sqrt(5)). With three times that variance, builtin:sdxl-mini was far more sensitive than real models: displaced
    patch parallelism measured 3x closer to single-device than naive patches, against 12x with this one
    (BENCHMARKS.md). Only the
    mt19937 stream and exact float arithmetic are involved, so the bits are the same on every CPU.
    """
    if role is ParamRole.NORM_WEIGHT:
        return torch.ones(shape)
    if role is ParamRole.NORM_BIAS:
        return torch.zeros(shape)
    std = 0.02 if role is ParamRole.BIAS else 1.0 / math.sqrt(3 * max(1, math.prod(shape[1:])))
    generator = torch.Generator().manual_seed(_seed(model_name, component, param))
    values = torch.rand(shape, generator=generator, dtype=torch.float32)
    return values.sub_(0.5).mul_(2.0 * math.sqrt(3.0) * std)


def fill_seeded(module: torch.nn.Module, model_name: str, component: str, keep_buffers: bool = False) -> None:
    """Overwrite every parameter from its seeded stream (values made on the CPU, then copied to the device).

    Parameters are independent streams, so they fill in parallel threads (the full SDXL has 3.5 G values); a
    parameter registered under two names (tied weights) would otherwise be filled twice at once, by a race.
    keep_buffers: a module built off the meta device already holds the buffers it computed itself (position tables).
    """
    params, seen = [], set()
    for module_name, owner in module.named_modules():
        for param_name, param in owner.named_parameters(recurse=False):
            if id(param) in seen:  # a tied weight (T5's shared embedding) fills once, from its first name
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            params.append((full_name, param, param_role(owner, param_name, param)))

    def fill(item) -> None:
        full_name, param, role = item
        with torch.no_grad():  # grad mode is per thread
            param.copy_(seeded_values(model_name, component, full_name, param.shape, role))

    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        list(pool.map(fill, params))
    if keep_buffers:
        return
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            # The only buffers in these models: CLIP's position ids, which must count 0, 1, 2, ...
            if not name.endswith("position_ids"):
                raise RuntimeError(f"no rule to initialise buffer {name!r} of {component}")
            buffer.copy_(torch.arange(buffer.shape[-1]).expand(buffer.shape))


def meta_components(arch: Architecture) -> dict[str, torch.nn.Module]:
    """unet, vae and text encoders of `arch` on the meta device: shapes and parameter counts, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    names = ("text_encoder",) if arch.family is Family.SD else ("text_encoder", "text_encoder_2")
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**arch.unet), "vae": AutoencoderKL(**arch.vae)}
        for index, (name, config) in enumerate(zip(names, arch.text_encoders)):
            # SDXL's second encoder also gives the pooled embedding, through its projection.
            cls = CLIPTextModelWithProjection if index == 1 else CLIPTextModel
            parts[name] = cls(CLIPTextConfig(**config))
    return parts


def build_components(arch: Architecture, dtype: torch.dtype, device: torch.device) -> dict[str, torch.nn.Module]:
    """unet, vae and text encoders of `arch` with seeded weights, allocated directly on `device`.

    Built on the meta device first, so there is no default init to pay for and no host copy of the weights.
    """
    parts = {}
    for name, module in meta_components(arch).items():
        # nn.Module.to itself: diffusers' override warns about casting, which is moot on the meta device.
        module = torch.nn.Module.to(module, dtype=dtype).to_empty(device=device)
        fill_seeded(module, arch.name, name)
        parts[name] = module.eval().requires_grad_(False)
    return parts


def build_builtin(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The pipeline of builtin model `name`: seeded weights, local tokenizer, SD's noise schedule."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if name not in BUILTIN_NAMES:
        raise KeyError(name)
    arch = architecture(name)
    parts = build_components(arch, dtype, torch.device(device))
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    if arch.family is Family.SD:
        return StableDiffusionPipeline(
            **parts, tokenizer=build_tokenizer(), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        **parts, tokenizer=build_tokenizer(), tokenizer_2=build_tokenizer(), scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


# ---------------------------------------------------------------------------------------------- ControlNets

# The conditioning image's encoder of the builtin ControlNets: three stride-2 stages, 8x down to the latent as the
# VAEs of the tiny models scale, at a tenth of the real ones' (16, 32, 96, 256) widths.
TINY_CONDITIONING_CHANNELS = (8, 16, 16, 16)
_CONTROLNET_PARTS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
# The conditioning image's encoder's weights at three times the seeded standard deviation: at one, the image's signal
# fades to the biases' through its 8 convolutions (output std 0.02, whatever the image), and the image would hardly
# matter; at three its output (std 0.42) is of the size of the latent's through conv_in (0.55), as in trained models.
CONDITIONING_GAIN = 3.0


def meta_controlnet(name: str) -> torch.nn.Module:
    """Builtin ControlNet `name` on the meta device: ControlNetModel.from_unet of its base model's UNet."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    arch = architecture(CONTROLNET_BASES[name])
    with torch.device("meta"):
        return ControlNetModel.from_unet(UNet2DConditionModel(**arch.unet), load_weights_from_unet=False,
                                         conditioning_embedding_out_channels=TINY_CONDITIONING_CHANNELS)


def controlnet_config(name: str) -> dict:
    return dict(meta_controlnet(name).config)


def build_controlnet(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Builtin ControlNet `name`: what ControlNetModel.from_unet copies of the base model's UNet holds that UNet's
    seeded weights (same names, same streams), and the parts of its own (the conditioning image's encoder, the zero
    convolutions) are seeded under the ControlNet's name. Real zero convolutions start at zero, where a ControlNet has
    no effect at all; seeded, the conditioning image and its scale change the image, which the tests need."""
    if name not in CONTROLNET_BASES:
        raise KeyError(name)
    base = CONTROLNET_BASES[name]
    model = torch.nn.Module.to(meta_controlnet(name), dtype=dtype).to_empty(device=torch.device(device))
    for module_name, owner in model.named_modules():
        for param_name, param in owner.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            seeded = (name, "controlnet") if full.startswith(_CONTROLNET_PARTS) else (base, "unet")
            role = param_role(owner, param_name, param)
            values = seeded_values(*seeded, full, param.shape, role)
            if full.startswith(_CONTROLNET_PARTS[0]) and role is ParamRole.WEIGHT:
                values.mul_(CONDITIONING_GAIN)
            with torch.no_grad():
                param.copy_(values)
    return model.eval().requires_grad_(False)
