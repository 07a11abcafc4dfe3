"""Models: turn a model reference (builtin:NAME, diffusers folder, .safetensors file, hub id) into a pipeline.

Returns a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline, in eval mode, on the asked device/dtype.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from hpcrender.errors import BadInput, ModelNotFound
from hpcrender.models.reference import BUILTIN_NAMES, Family, ModelSpec, SourceKind, resolve

__all__ = [
    "Family", "ModelSpec", "SourceKind", "resolve", "load_pipeline", "family", "weights_checksum", "builtin_names",
    "unet_config_of", "component_config_of",
]


def builtin_names() -> tuple[str, ...]:
    return BUILTIN_NAMES


def load_pipeline(ref: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """The pipeline `ref` names (float32 unless `dtype`); ModelNotFound (one line) when it names nothing loadable."""
    import torch

    from hpcrender.models import builtin, checkpoints

    dtype = torch.float32 if dtype is None else dtype

    spec = resolve(ref)
    if spec.kind is SourceKind.BUILTIN:
        # Built straight on the device: the full SDXL never needs host memory for its weights.
        return builtin.build_builtin(spec.location, dtype=dtype, device=device)
    if spec.kind is SourceKind.SINGLE_FILE:
        pipe = checkpoints.load_single_file(spec, dtype)
    else:
        pipe = checkpoints.load_pretrained(spec, dtype)
    pipe = pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


def family(pipe) -> Family:
    """SD or SDXL, from the pipeline's class."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(pipe, StableDiffusionXLPipeline):
        return Family.SDXL
    if isinstance(pipe, StableDiffusionPipeline):
        return Family.SD
    raise BadInput(f"{type(pipe).__name__} is not a Stable Diffusion 1.x or SDXL pipeline")


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
    """A component's config (`unet`, `vae`, ...) without loading any weights, for the run plan's checks before
    loading; None when only a download could tell (a hub id not in the local cache)."""
    import json

    from hpcrender.models import builtin, checkpoints

    spec = resolve(ref)
    if spec.kind in (SourceKind.BUILTIN, SourceKind.SINGLE_FILE):
        name = spec.location if spec.kind is SourceKind.BUILTIN else \
            checkpoints.match_layout(checkpoints.read_shapes(spec.location))
        config = getattr(builtin.architecture(name), component, None)
        return None if config is None else dict(config)
    if spec.kind is SourceKind.FOLDER:
        path = Path(spec.location) / component / "config.json"
        if not path.is_file():
            raise ModelNotFound(f"model {ref!r}: {path} is missing (not a diffusers pipeline folder)")
        return json.loads(path.read_text())
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.location, f"{component}/config.json")
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


def unet_config_of(ref: str) -> dict | None:
    """The UNet's config without loading any weights; see component_config_of."""
    return component_config_of(ref, "unet")
