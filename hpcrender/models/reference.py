"""What a model reference names: a builtin, a diffusers folder, a single .safetensors file or a hub id.

Resolving looks at the file system only; nothing is loaded here, so `hpcrender validate` can check references cheaply.
"""

from __future__ import annotations

import difflib
import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hpcrender.errors import ModelNotFound

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("tiny-sd", "tiny-sdxl", "sdxl-mini", "sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux", "pixart-mini")
# Builtin ControlNets, each made from the UNet of the builtin model it names (models.builtin.build_controlnet).
CONTROLNET_BASES = {"tiny-sd-controlnet": "tiny-sd", "tiny-sdxl-controlnet": "tiny-sdxl"}

# Pickle-based formats can run code when loaded; only safetensors weights are read.
PICKLED_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Family(str, enum.Enum):
    SD = "sd"        # Stable Diffusion 1.x: one CLIP text encoder, 3 downsamples
    SDXL = "sdxl"    # two text encoders, text_time conditioning, 2 downsamples
    PIXART = "pixart"  # PixArt-Sigma: T5 -> cross-attention, patch embedding with 2D sin-cos positions
    SD3 = "sd3"        # SD3/3.5: two CLIPs + T5 joined to the image tokens (joint attention), flow matching
    FLUX = "flux"      # Flux.1: 2x2-packed latents, joint then single-stream blocks, RoPE, flow matching

    @property
    def transformer(self) -> bool:
        """A diffusion transformer (pipe.transformer) rather than a UNet (pipe.unet)."""
        return self in (Family.PIXART, Family.SD3, Family.FLUX)

    @property
    def flow_matching(self) -> bool:
        """Trained for flow matching: samplers of the flow-matching kind only."""
        return self in (Family.SD3, Family.FLUX)


class SourceKind(str, enum.Enum):
    BUILTIN = "builtin"
    FOLDER = "folder"
    SINGLE_FILE = "single_file"
    HUB = "hub"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model reference: `location` is the builtin name, the absolute path or the hub id."""

    ref: str
    kind: SourceKind
    location: str


def resolve(ref: str, base_dir: str | os.PathLike | None = None) -> ModelSpec:
    """Classify a model reference; raises ModelNotFound (one line) for anything that cannot name a model.

    The one set of rules for references: `hpcrender validate` and the loaders both call this. A reference that
    looks like a path (absolute, starting with `.` or `~`, or ending in .safetensors) or names an existing folder
    or file is local, relative to `base_dir` (the manifest's folder) when given; otherwise owner/name is a hub id.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ModelNotFound(f"model {ref!r}: empty model reference")
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_NAMES:
            close = difflib.get_close_matches(name, BUILTIN_NAMES, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ModelNotFound(
                f"model {ref!r}: unknown builtin model {name!r} (builtins: {', '.join(BUILTIN_NAMES)}){hint}"
            )
        return ModelSpec(ref, SourceKind.BUILTIN, name)
    if ref.lower().endswith(PICKLED_SUFFIXES):
        raise ModelNotFound(
            f"model {ref!r}: pickled checkpoints ({Path(ref).suffix}) are never loaded because they can run code;"
            " convert it to .safetensors"
        )
    path = Path(os.path.normpath(Path(base_dir or ".") / Path(ref).expanduser()))
    local = os.path.isabs(ref) or ref.startswith((".", "~")) or ref.lower().endswith(".safetensors")
    if path.is_dir():
        return ModelSpec(ref, SourceKind.FOLDER, str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelNotFound(f"model {ref!r}: a file must be a .safetensors checkpoint, got {path}")
        return ModelSpec(ref, SourceKind.SINGLE_FILE, str(path.resolve()))
    if local:
        raise ModelNotFound(f"model {ref!r}: no such folder or file: {path}")
    if _HUB_ID.match(ref):
        return ModelSpec(ref, SourceKind.HUB, ref)
    raise ModelNotFound(f"model {ref!r}: must be builtin:NAME, a diffusers folder, a .safetensors file or a hub id "
                        "owner/name")


def resolve_controlnet(ref: str, base_dir: str | os.PathLike | None = None) -> ModelSpec:
    """Classify a ControlNet reference by the models' rules (resolve): a builtin ControlNet, a diffusers folder
    (ControlNetModel's config.json and weights) or a hub id; ModelNotFound (one line) otherwise. Single files are
    refused: nothing in one tells which ControlNet configuration it was trained with."""
    if isinstance(ref, str) and ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX):]
        if name not in CONTROLNET_BASES:
            close = difflib.get_close_matches(name, CONTROLNET_BASES, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ModelNotFound(f"controlnet {ref!r}: unknown builtin ControlNet {name!r} (builtins: "
                                f"{', '.join(CONTROLNET_BASES)}){hint}")
        return ModelSpec(ref, SourceKind.BUILTIN, name)
    spec = resolve(ref, base_dir)
    if spec.kind is SourceKind.SINGLE_FILE:
        raise ModelNotFound(f"controlnet {ref!r}: a ControlNet loads from a diffusers folder (config.json and its "
                            "weights) or a hub id, not from a single file")
    if spec.kind is SourceKind.FOLDER and not controlnet_config_path(Path(spec.location)).is_file():
        raise ModelNotFound(f"controlnet {ref!r}: {Path(spec.location) / 'config.json'} is missing (not a diffusers "
                            "ControlNetModel folder)")
    return spec


def controlnet_config_path(folder: Path) -> Path:
    """A ControlNet folder's config.json: its own, or its controlnet/ subfolder's (a pipeline folder's part)."""
    own = folder / "config.json"
    return own if own.is_file() or not (folder / "controlnet" / "config.json").is_file() else \
        folder / "controlnet" / "config.json"
