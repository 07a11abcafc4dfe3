"""Models: turn a model reference (builtin:NAME, diffusers folder, .safetensors file, hub id) into a pipeline, and
say what the render needs to know of it (facts.py). May import: parallel.bands (alignment arithmetic), the input.

Returns a diffusers StableDiffusionPipeline, StableDiffusionXLPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline or
FluxPipeline, in eval mode, on the asked device/dtype.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from hpcrender.errors import ModelNotFound
from hpcrender.models.facts import ModelFacts, facts_of
from hpcrender.models.facts import pipeline_family as family
from hpcrender.models.reference import (
    BUILTIN_NAMES, Family, ModelSpec, SourceKind, controlnet_config_path, resolve, resolve_controlnet,
)

__all__ = [
    "Family", "ModelSpec", "SourceKind", "resolve", "load_pipeline", "family", "weights_checksum", "builtin_names",
    "unet_config_of", "component_config_of", "denoiser_of", "scheduler_config_of", "ModelFacts", "facts_of",
    "load_controlnet", "controlnet_config_of", "text_tokens_of", "T5_TOKENS",
]

# T5 tokens the diffusers pipelines encode by default; a tokenizer with a shorter context (the builtins') caps it.
T5_TOKENS = {Family.PIXART: 300, Family.SD3: 256, Family.FLUX: 512}
# CLIP's context, to which SD3's pipeline pads its two CLIP encodings before the T5 tokens follow.
CLIP_TOKENS = 77

# The loaders (builtin, checkpoints, dit) import torch and diffusers: they are imported inside the functions that
# load, so that reading a reference or a config (`validate`, `status`) stays light.


def builtin_names() -> tuple[str, ...]:
    return BUILTIN_NAMES


def load_pipeline(ref: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """The pipeline `ref` names (float32 unless `dtype`); ModelNotFound (one line) when it names nothing loadable."""
    import torch

    from hpcrender.models import builtin, checkpoints, dit

    dtype = torch.float32 if dtype is None else dtype

    spec = resolve(ref)
    if spec.kind is SourceKind.BUILTIN:
        # Built straight on the device: the full SDXL never needs host memory for its weights.
        if spec.location in dit.DIT_NAMES:
            return dit.build_dit(spec.location, dtype=dtype, device=device)
        return builtin.build_builtin(spec.location, dtype=dtype, device=device)
    if spec.kind is SourceKind.SINGLE_FILE:
        pipe = checkpoints.load_single_file(spec, dtype)
    else:
        pipe = checkpoints.load_pretrained(spec, dtype)
    pipe = pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            _own_memory(module)
            module.eval().requires_grad_(False)
    return pipe


# Bytes of alignment the CPU kernels are given by torch's own allocator.
_ALIGNMENT = 64


def _own_memory(module: torch.nn.Module) -> None:
    """Copy the weights diffusers' loader left in a file's memory mapping (with accelerate installed it maps
    safetensors files and keeps their tensors at any byte offset) into memory of their own: the CPU kernels' sums
    depend on their operands' alignment, and a model loaded from a file must compute what the same weights built
    in memory do."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT:
            tensor.data = tensor.data.clone()


def denoiser_of(pipe) -> torch.nn.Module:
    """The model the denoising loop calls: the transformer of a DiT pipeline, else the UNet."""
    return pipe.transformer if family(pipe).transformer else pipe.unet


def weights_checksum(module: torch.nn.Module) -> str:
    """sha256 over the state dict: names sorted, each name, shape and the values as little-endian fp32 bytes."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(repr(tuple(values.shape)).encode())
        digest.update(values.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


def component_config_of(ref: str, component: str) -> dict | None:
    """A component's config (`unet`, `transformer`, `vae`, ...; `denoiser`: the UNet's or the transformer's, with
    its `_class_name`) without loading any weights, for the run plan's checks before loading; None when only a
    download could tell (a hub id not in the local cache), or for a single file whose variant only loading tells."""
    import json

    from hpcrender.models import builtin, checkpoints, dit

    spec = resolve(ref)
    parts = ("unet", "transformer") if component == "denoiser" else (component,)
    if spec.kind is SourceKind.BUILTIN:
        if spec.location in dit.DIT_NAMES:
            if component in ("denoiser", "transformer"):
                return dit.transformer_config(spec.location)
            config = getattr(dit.architecture(spec.location), component, None)
        else:
            config = getattr(builtin.architecture(spec.location), "unet" if component == "denoiser" else component,
                             None)
        return None if config is None else dict(config)
    if spec.kind is SourceKind.SINGLE_FILE:
        shapes = checkpoints.read_shapes(spec.location)
        if checkpoints.single_file_family(shapes).transformer:
            return None  # diffusers' loader reads SD3/Flux files; only loading tells their variant
        config = getattr(builtin.architecture(checkpoints.match_layout(shapes)),
                         "unet" if component == "denoiser" else component, None)
        return None if config is None else dict(config)
    if spec.kind is SourceKind.FOLDER:
        for part in parts:
            path = Path(spec.location) / part / "config.json"
            if path.is_file():
                return json.loads(path.read_text())
        raise ModelNotFound(f"model {ref!r}: {Path(spec.location) / parts[0] / 'config.json'} is missing (not a "
                            "diffusers pipeline folder)")
    from huggingface_hub import try_to_load_from_cache

    for part in parts:
        found = try_to_load_from_cache(spec.location, f"{part}/config.json")
        if isinstance(found, str):
            return json.loads(Path(found).read_text())
    return None


def unet_config_of(ref: str) -> dict | None:
    """The denoiser's config (the UNet's, or a transformer's with its `_class_name`); see component_config_of."""
    return component_config_of(ref, "denoiser")


def scheduler_config_of(ref: str) -> dict | None:
    """The model's own sampler config without loading anything (to refuse samplers that do not apply before a render);
    None when only a download could tell."""
    import json

    from hpcrender.models import builtin, checkpoints, dit

    spec = resolve(ref)
    if spec.kind is SourceKind.BUILTIN:
        return dict(dit.architecture(spec.location).scheduler if spec.location in dit.DIT_NAMES
                    else builtin.SCHEDULER_CONFIG)
    if spec.kind is SourceKind.SINGLE_FILE:
        try:
            family = checkpoints.single_file_family(checkpoints.read_shapes(spec.location))
        except Exception:  # noqa: BLE001 - a file that does not load is the job's failure, reported when loaded
            return None
        if family.flow_matching:
            return {"_class_name": "FlowMatchEulerDiscreteScheduler"}  # whatever its shift, a flow-matching sampler
        return dict(builtin.SCHEDULER_CONFIG)
    if spec.kind is SourceKind.FOLDER:
        path = Path(spec.location) / "scheduler" / "scheduler_config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.location, "scheduler/scheduler_config.json")
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


def load_controlnet(ref: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """The diffusers ControlNetModel `ref` names (models.reference.resolve_controlnet), in eval mode on `device`;
    ModelNotFound (one line) when it names nothing loadable. A hub id is read from the local cache, and downloaded
    only when the hub is not offline, as pipelines are."""
    import torch
    from diffusers import ControlNetModel

    from hpcrender.models import builtin, checkpoints

    dtype = torch.float32 if dtype is None else dtype
    spec = resolve_controlnet(ref)
    if spec.kind is SourceKind.BUILTIN:
        return builtin.build_controlnet(spec.location, dtype=dtype, device=device)
    location, options = spec.location, {}
    if spec.kind is SourceKind.FOLDER and controlnet_config_path(Path(location)).parent != Path(location):
        options["subfolder"] = "controlnet"
    try:
        try:
            model = ControlNetModel.from_pretrained(location, torch_dtype=dtype, local_files_only=True, **options)
        except Exception:
            if spec.kind is SourceKind.FOLDER or checkpoints.hub_offline():
                raise
            model = ControlNetModel.from_pretrained(location, torch_dtype=dtype, **options)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the reference's, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFound(f"controlnet {ref!r}: could not be loaded: {first}") from exc
    model = model.to(device)
    _own_memory(model)
    return model.eval().requires_grad_(False)


def controlnet_config_of(ref: str) -> dict | None:
    """A ControlNet's config without its weights (the run plan's checks before loading); None when only a download
    could tell (a hub id not in the local cache)."""
    import json

    from hpcrender.models import builtin

    spec = resolve_controlnet(ref)
    if spec.kind is SourceKind.BUILTIN:
        return builtin.controlnet_config(spec.location)
    if spec.kind is SourceKind.FOLDER:
        return json.loads(controlnet_config_path(Path(spec.location)).read_text())
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.location, "config.json")
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


def text_tokens_of(ref: str) -> int | None:
    """Text tokens the transformer of DiT pipeline `ref` reads (PixArt, Flux: T5's; SD3: CLIP's, then T5's), from
    its tokenizers' lengths without loading them; None for a UNet, or where they cannot be read (a hub id)."""
    import json

    from hpcrender.models import dit
    from hpcrender.models.facts import family_of_config

    spec = resolve(ref)
    config = component_config_of(ref, "denoiser") if spec.kind is not SourceKind.SINGLE_FILE else None
    if config is None or config.get("down_block_types") is not None:
        return None
    fam = family_of_config(config)
    if spec.kind is SourceKind.BUILTIN:
        tokens = dit.architecture(spec.location).tokens
        lengths = {"tokenizer": tokens, "tokenizer_2": tokens, "tokenizer_3": tokens}
    elif spec.kind is SourceKind.FOLDER:
        lengths = {}
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            path = Path(spec.location) / name / "tokenizer_config.json"
            if path.is_file():
                lengths[name] = int(json.loads(path.read_text()).get("model_max_length") or 0) or None
    else:
        return None
    t5_name = {Family.PIXART: "tokenizer", Family.SD3: "tokenizer_3", Family.FLUX: "tokenizer_2"}[fam]
    t5 = min(T5_TOKENS[fam], lengths.get(t5_name) or T5_TOKENS[fam])
    if fam is Family.SD3:
        return (lengths.get("tokenizer") or CLIP_TOKENS) + t5
    return t5
