"""LoRA files, read without torch: is a file a LoRA, what its content hash is, which layers of a model it names.

`validate` refuses a missing, unreadable or non-LoRA file from the header alone; whether it names any layer of the
job's model is asked of the model's module names (models.adapters builds them on the meta device) before anything
renders. Putting adapters on a loaded pipeline is models.adapters'.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

# The formats diffusers' loaders read: diffusers/PEFT (`lora_A`/`lora_B`), diffusers' older attention processors
# (`lora.down`/`lora.up`, `lora_linear_layer`), Kohya and other trainers (`lora_down`/`lora_up`, `.alpha`).
_LORA_KEY = re.compile(r"(?:^|[._])(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer|"
                       r"lora_te\d?_|lora_unet_|lora_transformer_)")
# Where a key stops naming a layer and starts naming the adapter's own tensors.
_TENSOR_SUFFIX = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up|lora|lora_linear_layer|lora_magnitude_vector|alpha|"
                            r"diff|diff_b)(\.|$).*")
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header
_CHUNK = 2**20


class LoraFileError(ValueError):
    """A file that is not a LoRA diffusers could read; the message says why, in one line."""


def read_lora_keys(path: str | Path) -> tuple[str, ...]:
    """The tensor names of a LoRA .safetensors file, from its header; LoraFileError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"no such file: {path}")
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(f"must be a .safetensors file (pickled formats can run code when loaded), got {path}")
    try:
        with path.open("rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if size is None or not 2 <= size <= _HEADER_LIMIT:
                raise LoraFileError(f"cannot read {path}: not a safetensors file (no header)")
            header = f.read(size)
    except OSError as error:
        raise LoraFileError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        tensors = json.loads(header)
    except (UnicodeDecodeError, ValueError):
        raise LoraFileError(f"cannot read {path}: its safetensors header is not JSON (a truncated file?)") from None
    if not isinstance(tensors, dict):
        raise LoraFileError(f"cannot read {path}: its safetensors header is not a table of tensors")
    keys = tuple(k for k in tensors if k != "__metadata__")
    if not keys:
        raise LoraFileError(f"{path} holds no tensors")
    if not any(_LORA_KEY.search(k) for k in keys):
        raise LoraFileError(f"{path} is not a LoRA: none of its {len(keys)} tensors is a LoRA weight (lora_A/lora_B, "
                            f"lora_down/lora_up), e.g. {keys[0]!r}")
    end = 8 + size + max((int(t["data_offsets"][1]) for t in tensors.values()
                          if isinstance(t, dict) and "data_offsets" in t), default=0)
    if path.stat().st_size < end:
        raise LoraFileError(f"cannot read {path}: truncated ({path.stat().st_size} bytes, its header needs {end})")
    return keys


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


_DOWN = re.compile(r"\.(lora_A|lora_down|lora\.down|lora_linear_layer\.down)\.weight$")


def target_layers(shapes) -> dict[str, dict[str, int | None]]:
    """The layers a LoRA's (diffusers-format) tensors name, by component, each with the input features its down
    projection expects (None where no down weight says): `unet.down_blocks.0...to_q.lora_A.weight` of shape (4, 32)
    -> {"unet": {"down_blocks.0...to_q": 32}}. Tensors without a component prefix are the denoiser's."""
    layers: dict[str, dict[str, int | None]] = {}
    for key, shape in shapes.items():
        layer = _TENSOR_SUFFIX.sub("", key)
        if layer == key:
            continue
        component, _, rest = layer.partition(".")
        if component not in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3") or not rest:
            component, rest = "denoiser", layer
        features = layers.setdefault(component, {})
        if _DOWN.search(key) and len(shape) >= 2:
            features[rest] = int(shape[1])
        else:
            features.setdefault(rest, None)
    return layers


def matched_layers(layers: dict[str, dict], modules: dict[str, dict[str, int | None]]):
    """(layers named, those of them the model has with the input features the LoRA expects, the first layer the
    model has with other input features as (name, the LoRA's, the model's) or None): `modules` holds the layers of
    each component whose layers are known; a component not in it (a text encoder) counts as matched."""
    named = found = 0
    mismatch = None
    for component, wanted in sorted(layers.items()):
        named += len(wanted)
        known = modules.get(component)
        if known is None:
            found += len(wanted)
            continue
        for name, features in sorted(wanted.items()):
            if name not in known:
                continue
            if features is None or known[name] in (None, features):
                found += 1
            elif mismatch is None:
                mismatch = (name, features, known[name])
    return named, found, mismatch
