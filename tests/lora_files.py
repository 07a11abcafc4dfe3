"""LoRA files the tests make themselves: peft adapters with seeded, non-zero weights on a builtin model, saved with
diffusers' own `save_lora_weights` (diffusers/PEFT format) or renamed to Kohya's keys."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from hpcrender.models import denoiser_of, load_pipeline

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(model: str, path: Path, seed: int, targets=ATTENTION, rank: int = 4, text_encoder: bool = False,
              std: float = 0.3) -> Path:
    """A LoRA for `model` in diffusers' format: every target layer of the denoiser (and the first text encoder's
    attention projections when `text_encoder`) gets seeded random A and B matrices large enough to show."""
    pipe = load_pipeline(model)
    denoiser = denoiser_of(pipe)
    generator = torch.Generator().manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
    denoiser.add_adapter(config, adapter_name="made")
    layers = {"transformer_lora_layers" if hasattr(pipe, "transformer") and pipe.transformer is not None
              else "unet_lora_layers": _seeded(get_peft_model_state_dict(denoiser, adapter_name="made"), generator,
                                               std)}
    if text_encoder:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                                pipe.text_encoder, adapter_name="made")
        layers["text_encoder_lora_layers"] = _seeded(get_peft_model_state_dict(pipe.text_encoder,
                                                                               adapter_name="made"), generator, std)
    path.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(str(path), safe_serialization=True, **layers)
    return path / "pytorch_lora_weights.safetensors"


def _seeded(state: dict, generator: torch.Generator, std: float) -> dict:
    return {k: torch.randn(v.shape, generator=generator) * std for k, v in sorted(state.items())}


def to_kohya(diffusers_file: Path, out: Path) -> Path:
    """The same LoRA under Kohya's names (`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`), as
    Kohya's trainers write them for a diffusers-layout UNet."""
    from safetensors.torch import load_file

    state = load_file(str(diffusers_file))
    kohya = {}
    for key, value in state.items():
        m = re.match(r"unet\.(.+)\.lora_(A|B)\.weight$", key)
        if not m:
            continue
        layer = "lora_unet_" + m.group(1).replace(".", "_")
        kohya[f"{layer}.{'lora_down' if m.group(2) == 'A' else 'lora_up'}.weight"] = value
        if m.group(2) == "A":
            kohya[f"{layer}.alpha"] = torch.tensor(float(value.shape[0]))
    save_file(kohya, str(out))
    return out
