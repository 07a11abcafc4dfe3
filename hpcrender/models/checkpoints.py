"""Loading real checkpoints: a diffusers folder, a hub id, or one .safetensors file in the original SD layout.

All three end in diffusers' own loaders with `use_safetensors` (weights are never unpickled) and the same
pipeline options; every failure becomes one ModelNotFound line naming the reference.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from hpcrender.errors import ModelNotFound
from hpcrender.models.builtin import (
    SCHEDULER_CONFIG, UPSTREAM_VOCAB_SIZE, Architecture, architecture, build_tokenizer,
)
from hpcrender.models.reference import Family, ModelSpec, SourceKind

PIPELINE_CLASSES = {"StableDiffusionPipeline": Family.SD, "StableDiffusionXLPipeline": Family.SDXL,
                    "PixArtSigmaPipeline": Family.PIXART, "StableDiffusion3Pipeline": Family.SD3,
                    "FluxPipeline": Family.FLUX}

# Layouts a single file may have, per family; "sd15" and "sdxl-base" are the real checkpoints.
SINGLE_FILE_LAYOUTS = {Family.SD: ("tiny-sd", "sd15"), Family.SDXL: ("tiny-sdxl", "sdxl-mini", "sdxl-base")}

# Where the real CLIP vocabulary may sit in the Hugging Face cache (a single file does not carry it).
CLIP_TOKENIZER_SOURCES = (
    ("openai/clip-vit-large-patch14", None),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer"),
)

_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_SD_TEXT = "cond_stage_model.transformer.text_model."
_SDXL_TEXT = ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (compute nodes usually have no network)."""
    return any(os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def pipeline_options(family: Family) -> dict:
    """The same options for every source: no safety checker, no watermark (it would change the pixels)."""
    if family is Family.SD:
        return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family is Family.SDXL:
        return dict(add_watermarker=False)
    return {}


def dtype_option(dtype: torch.dtype) -> dict:
    """diffusers renamed `torch_dtype` to `dtype` (0.42); older releases know only the first."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}


def pipeline_class(family: Family):
    import diffusers

    return getattr(diffusers, next(name for name, found in PIPELINE_CLASSES.items() if found is family))


# ---------------------------------------------------------------------------------------------- folder and hub


def load_pretrained(spec: ModelSpec, dtype: torch.dtype):
    """A diffusers folder or hub id; the hub is tried only when the id is missing from the local cache."""
    from diffusers import DiffusionPipeline

    local_only = True
    try:
        index = DiffusionPipeline.load_config(spec.location, local_files_only=True)
    except Exception as exc:
        if spec.kind is SourceKind.FOLDER:
            raise ModelNotFound(f"model {spec.ref!r}: not a diffusers folder (no readable model_index.json)") from exc
        if hub_offline():
            raise ModelNotFound(
                f"model {spec.ref!r}: no such folder, and not in the local Hugging Face cache (hub is offline)"
            ) from exc
        try:
            index = DiffusionPipeline.load_config(spec.location)
        except Exception as exc2:
            raise ModelNotFound(
                f"model {spec.ref!r}: no such folder, not in the local Hugging Face cache, and could not be"
                f" downloaded ({_first_line(exc2)})"
            ) from exc2
        local_only = False
    family = PIPELINE_CLASSES.get(index.get("_class_name"))
    if family is None:
        raise ModelNotFound(
            f"model {spec.ref!r}: a {index.get('_class_name')}, not a Stable Diffusion 1.x, SDXL, PixArt-Sigma, SD3 or"
            " Flux pipeline"
        )
    try:
        return pipeline_class(family).from_pretrained(
            spec.location, use_safetensors=True, local_files_only=local_only, **dtype_option(dtype),
            **pipeline_options(family),
        )
    except Exception as exc:
        raise ModelNotFound(f"model {spec.ref!r}: could not be loaded: {_first_line(exc)}") from exc


# ---------------------------------------------------------------------------------------------- single file


def single_file_family(keys) -> Family:
    """SD 1.x, SDXL, SD3 or Flux from the names in an original-layout checkpoint."""
    keys = list(keys)
    if any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys):
        return Family.SD3
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return Family.FLUX
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return Family.SDXL
    if any(k.startswith(_SD_TEXT) for k in keys):
        return Family.SD
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelNotFound("Stable Diffusion 2.x checkpoints are not supported (only SD 1.x and SDXL)")
    raise ModelNotFound("not a Stable Diffusion 1.x, SDXL, SD3 or Flux checkpoint in the original layout")


def layout_signature(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Shapes that tell the layouts apart: UNet width and conditioning, VAE width, text encoder sizes."""
    unet, vae = arch.unet, arch.vae
    width, context = unet["block_out_channels"][0], unet["cross_attention_dim"]
    signature = {
        _UNET + "input_blocks.0.0.weight": (width, unet["in_channels"], 3, 3),
        _UNET + "time_embed.0.weight": (4 * width, width),
        _VAE + "encoder.conv_in.weight": (vae["block_out_channels"][0], vae["in_channels"], 3, 3),
    }
    if arch.family is Family.SD:
        (text,) = arch.text_encoders
        signature[_UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (width, context)
        signature[_SD_TEXT + "embeddings.token_embedding.weight"] = (text["vocab_size"], text["hidden_size"])
    else:
        first, second = arch.text_encoders
        # SDXL's first attention sits in the second down block (input block 4: two resnets and a downsample before).
        signature[_UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] = (
            unet["block_out_channels"][1], context)
        signature[_UNET + "label_emb.0.0.weight"] = (4 * width, unet["projection_class_embeddings_input_dim"])
        signature[_SDXL_TEXT[0] + "embeddings.token_embedding.weight"] = (first["vocab_size"], first["hidden_size"])
        signature[_SDXL_TEXT[1] + "token_embedding.weight"] = (second["vocab_size"], second["hidden_size"])
    return signature


def match_layout(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Name of the architecture whose signature the checkpoint's tensor shapes match exactly (SD 1.x, SDXL)."""
    family = single_file_family(shapes)
    if family.transformer:
        raise ModelNotFound(f"an {family.name} checkpoint: its layout is diffusers' to read, not hpcrender's")
    for name in SINGLE_FILE_LAYOUTS[family]:
        signature = layout_signature(architecture(name))
        if all(tuple(shapes.get(key, ())) == shape for key, shape in signature.items()):
            return name
    known = ", ".join(SINGLE_FILE_LAYOUTS[family])
    raise ModelNotFound(f"an {family.name} checkpoint whose shapes match none of the known layouts ({known})")


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header, without reading the weights."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def upstream_tokenizer(ref: str):
    """The real CLIP tokenizer from the local Hugging Face cache (downloaded only when the hub is reachable)."""
    from transformers import CLIPTokenizer

    attempts = [True] if hub_offline() else [True, False]
    for local_only in attempts:
        for repo, subfolder in CLIP_TOKENIZER_SOURCES:
            extra = {"subfolder": subfolder} if subfolder else {}
            try:
                tokenizer = CLIPTokenizer.from_pretrained(repo, local_files_only=local_only, **extra)
            except Exception:
                continue
            # A missing repo can still yield an empty tokenizer: only the full CLIP vocabulary will do.
            if len(tokenizer) == UPSTREAM_VOCAB_SIZE:
                return tokenizer
    raise ModelNotFound(
        f"model {ref!r}: a single-file checkpoint needs the CLIP tokenizer ({CLIP_TOKENIZER_SOURCES[0][0]}),"
        " which is not in the local Hugging Face cache and could not be downloaded"
    )


def write_pipeline_config(arch: Architecture, folder: Path, tokenizer) -> None:
    """A diffusers folder without weights: what `from_single_file(config=...)` needs to assemble a pipeline."""
    import diffusers
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig

    version = diffusers.__version__
    modules = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if arch.family is Family.SDXL:
        modules["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        modules["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    cls = "StableDiffusionPipeline" if arch.family is Family.SD else "StableDiffusionXLPipeline"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls, "_diffusers_version": version, **modules}))
    for name, config in (("unet", arch.unet), ("vae", arch.vae)):
        (folder / name).mkdir()
        class_name = modules[name][1]
        (folder / name / "config.json").write_text(
            json.dumps({"_class_name": class_name, "_diffusers_version": version, **config})
        )
    EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    for index, config in enumerate(arch.text_encoders):
        suffix = "" if index == 0 else f"_{index + 1}"
        CLIPTextConfig(**config).save_pretrained(folder / f"text_encoder{suffix}")
        tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
    if arch.family is Family.SDXL and arch.upstream_tokenizer:
        # SDXL's second (OpenCLIP) tokenizer pads with "!" rather than the end token.
        tokenizer.__class__.from_pretrained(folder / "tokenizer", pad_token="!").save_pretrained(folder / "tokenizer_2")


def load_single_file(spec: ModelSpec, dtype: torch.dtype):
    """One original-layout .safetensors file, assembled against configs written from the matching layout; an SD3 or
    Flux file by diffusers' own single-file loader."""
    try:
        shapes = read_shapes(spec.location)
    except Exception as exc:
        raise ModelNotFound(f"model {spec.ref!r}: not a readable safetensors file ({_first_line(exc)})") from exc
    try:
        family = single_file_family(shapes)
    except ModelNotFound as exc:
        raise ModelNotFound(f"model {spec.ref!r}: {exc}") from exc
    if family.transformer:
        return load_single_file_transformer(spec, family, dtype)
    try:
        arch = architecture(match_layout(shapes))
    except ModelNotFound as exc:
        raise ModelNotFound(f"model {spec.ref!r}: {exc}") from exc
    tokenizer = upstream_tokenizer(spec.ref) if arch.upstream_tokenizer else build_tokenizer()
    with tempfile.TemporaryDirectory(prefix="hpcrender-config-") as tmp:
        write_pipeline_config(arch, Path(tmp), tokenizer)
        try:
            return pipeline_class(arch.family).from_single_file(
                spec.location, config=tmp, local_files_only=True, **dtype_option(dtype),
                **pipeline_options(arch.family),
            )
        except Exception as exc:
            raise ModelNotFound(f"model {spec.ref!r}: could not be loaded: {_first_line(exc)}") from exc


def load_single_file_transformer(spec: ModelSpec, family: Family, dtype: torch.dtype):
    """An SD3/3.5 or Flux.1 file in the original layout (SD3's may carry its text encoders, Flux's is the
    transformer alone). diffusers tells the variant from the names and shapes and takes what the file lacks - the
    configs, tokenizers, text encoders, VAE - from the variant's hub repository, which must be in the local cache."""
    try:
        return pipeline_class(family).from_single_file(spec.location, local_files_only=True, **dtype_option(dtype))
    except Exception as exc:
        raise ModelNotFound(
            f"model {spec.ref!r}: a single-file {family.name} checkpoint could not be loaded (it needs the rest of its"
            f" pipeline from the model's repository in the local Hugging Face cache): {_first_line(exc)}"
        ) from exc
