"""Small diffusers models built from configs with fixed seeds (SD-shaped and SDXL-shaped UNets, one with a LoRA, a VAE), the
inputs they take, and torch.distributed started from MPI: shared by the patch-parallel tests and scripts."""

from __future__ import annotations

import os
import socket

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig

TEXT_TOKENS = 7
TEXT_DIM = 24


def sd_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 1.x/2.x shape: 3 downsamples, cross-attention in the three finer levels (alignment 8)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8, attention_head_dim=4,
        cross_attention_dim=TEXT_DIM,
    ).eval()


def sd_unet_with_lora(seed: int = 0) -> UNet2DConditionModel:
    """sd_unet with an unfused LoRA (seeded, non-zero) on its attention projections and its resnets' 3x3
    convolutions: peft's wrappers stand around layers the plan swaps, and their own down convolutions need halos."""
    unet = sd_unet(seed)
    torch.manual_seed(seed + 100)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]))
    return unet.eval()


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL shape: 2 downsamples, no attention at the finest level, text_time conditioning (alignment 4)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
        norm_num_groups=8, cross_attention_dim=TEXT_DIM, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8,
    ).eval()


def small_vae(seed: int = 0) -> AutoencoderKL:
    """An AutoencoderKL with 3 upsampling levels (8x) and the mid-block self-attention."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
    ).eval()


def conditioning(unet: UNet2DConditionModel, batch: int, seed: int = 1) -> dict:
    """Keyword arguments of a UNet call: text states (and SDXL's pooled text and time ids) for `batch` images."""
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    kwargs = {"encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config.cross_attention_dim, generator=g)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return kwargs


def noise(batch: int, height: int, width: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed))


def start_torch_distributed():
    """torch.distributed (gloo) over the MPI world, or over torchrun's ranks when launched by it; returns
    (rank, size)."""
    import torch.distributed as dist

    if "TORCHELASTIC_RUN_ID" in os.environ:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    port = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    return rank, size


def report_and_finish(report: dict, rank: int) -> None:
    """Rank 0 prints the checks' report as one JSON line; then every rank leaves torch.distributed together."""
    import json

    import torch.distributed as dist

    if rank == 0:
        print(json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()
