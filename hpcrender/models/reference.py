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
