"""How close displaced steps come to one process, on every rank of the MPI world.

usage: mpiexec -n K fidelity_checks.py [--deep]
Rank 0 prints one JSON object:
- "layers": a convolution, and a model's input convolution ("conv_in"), whose input changes between two steps: the
  second (displaced) step against the whole layer, with fresh and with stale halo rows;
- "repeat": the sdxl-mini-shaped UNet run twice on the same input, the second time displaced: its stale
  activations equal the fresh ones, so it must equal the synchronous first step;
- with --deep: that UNet denoised (Euler, guidance) in sync, naive and displaced modes with corrected and stale
  GroupNorm statistics and stale halo rows, final latent errors against one process.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from torch import nn

from hpcrender.config import GroupNormMode, HaloMode, Mode
from hpcrender.models.builtin import architecture
from hpcrender.parallel.bands import Band, latent_bands, unet_alignment
from hpcrender.parallel.parallelize import parallelize
from hpcrender.parallel.plan import PatchPlan
from parallel_models import start_torch_distributed, report_and_finish

DEEP_SIDE = {2: 32, 3: 48}  # latent rows and columns: 256 and 384 px, coarsest feature map 8 and 12 rows
DEEP_STEPS = 8
GUIDANCE = 5.0


def whole_error(part: torch.Tensor, reference: torch.Tensor, group) -> float:
    sums = torch.tensor([(part.double() - reference.double()).pow(2).sum(), reference.double().pow(2).sum()])
    dist.all_reduce(sums, group=group)
    return float(sums[0].sqrt() / sums[1].sqrt())


class InputConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        return self.conv_in(x)


def layer_checks(rank: int, size: int, group) -> dict:
    """Step 0 sees x, step 1 sees x + noise; the second step is displaced. Fresh halo rows (HaloMode.FRESH, and the
    model's input convolution whatever the mode) give the whole layer's output; stale ones do not."""
    torch.manual_seed(0)
    layers = {"conv": (nn.Sequential(nn.Conv2d(6, 5, 3, padding=1)), 6), "conv_in": (InputConv(), 4),
              "downsample": (nn.Sequential(nn.Conv2d(6, 5, 3, stride=2, padding=1)), 6)}
    # uneven bands of even rows (the stride-2 convolution's outputs start on band boundaries)
    bands = tuple(Band(4 * i, 4 * i + 4) for i in range(size - 1)) + (Band(4 * size - 4, 4 * size + 2),)
    rows = slice(bands[rank].start, bands[rank].stop)
    report = {}
    for name, (layer, channels) in layers.items():
        layer.eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, channels, bands[-1].stop, 7, generator=g)
        moved = x + torch.randn(x.shape, generator=g)
        scale = layer(x).shape[2] / x.shape[2]
        out_rows = slice(int(rows.start * scale), int(rows.stop * scale))
        with torch.no_grad():
            reference = layer(moved)[:, :, out_rows]
        for halo in HaloMode:
            plan = PatchPlan(mode=Mode.DISPLACED, groupnorm=GroupNormMode.CORRECTED, warmup_steps=1, bands=bands,
                             rank=rank, halo=halo)
            handle = parallelize(layer, plan, group)
            with torch.no_grad():
                for step, source in enumerate((x, moved)):
                    handle.begin_step(step)
                    out = layer(source[:, :, rows])
            stats = handle.stats()
            handle.remove()
            report[f"{name}_{halo.value}"] = whole_error(out, reference, group)
            report[f"{name}_{halo.value}_async_steps"] = stats["async_steps"]
    return report


def deep_unet() -> UNet2DConditionModel:
    """The builtin sdxl-mini UNet with torch's default initialisation (deep: 10 transformer layers at the coarsest
    level, where staleness compounds)."""
    torch.manual_seed(1234)
    return UNet2DConditionModel.from_config(architecture("sdxl-mini").unet).eval().requires_grad_(False)


def conditioning(side: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"encoder_hidden_states": torch.randn(2, 77, 512, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 320, generator=g),
                                  "time_ids": torch.tensor([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side]] * 2)}}


def repeat_check(unet, rank: int, size: int, group) -> dict:
    side = DEEP_SIDE[size]
    bands = latent_bands(side, unet_alignment(unet.config), size)
    rows = slice(bands[rank].start, bands[rank].stop)
    latent = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    cond = conditioning(side)
    report = {}
    for halo in HaloMode:
        plan = PatchPlan(mode=Mode.DISPLACED, groupnorm=GroupNormMode.CORRECTED, warmup_steps=1, bands=bands,
                         rank=rank, halo=halo)
        handle = parallelize(unet, plan, group)
        outputs = []
        with torch.no_grad():
            for step in range(2):
                handle.begin_step(step)
                outputs.append(unet(latent[:, :, rows], 500.0, **cond, return_dict=False)[0])
        stats = handle.stats()
        handle.remove()
        report[halo.value] = {"error": whole_error(outputs[1], outputs[0], group),
                               "async_steps": stats["async_steps"]}
    return report


def deep_checks(unet, rank: int, size: int, group) -> dict:
    from diffusers import EulerDiscreteScheduler

    from hpcrender.models.builtin import SCHEDULER_CONFIG

    side = DEEP_SIDE[size]
    bands = latent_bands(side, unet_alignment(unet.config), size)
    rows = slice(bands[rank].start, bands[rank].stop)
    start = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    cond = conditioning(side)

    def denoise(handle=None):
        scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        scheduler.set_timesteps(DEEP_STEPS)
        latent = (start * scheduler.init_noise_sigma)[:, :, rows] if handle else start * scheduler.init_noise_sigma
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                if handle is not None:
                    handle.begin_step(i)
                x = scheduler.scale_model_input(torch.cat([latent] * 2), t)
                uncond, cond_out = unet(x, t, **cond, return_dict=False)[0].chunk(2)
                latent = scheduler.step(uncond + GUIDANCE * (cond_out - uncond), t, latent, return_dict=False)[0]
        return latent

    reference = denoise()[:, :, rows]
    corrected, fresh = GroupNormMode.CORRECTED, HaloMode.FRESH
    runs = {"sync": (Mode.SYNC, corrected, fresh), "naive": (Mode.NAIVE, corrected, fresh),
            "displaced_stale_halo": (Mode.DISPLACED, corrected, HaloMode.STALE)}
    for groupnorm in (GroupNormMode.CORRECTED, GroupNormMode.STALE):
        runs[f"displaced_{groupnorm.value}"] = (Mode.DISPLACED, groupnorm, fresh)
    report = {}
    for name, (mode, groupnorm, halo) in runs.items():
        plan = PatchPlan(mode=mode, groupnorm=groupnorm, warmup_steps=1, bands=bands, rank=rank, halo=halo)
        handle = parallelize(unet, plan, group)
        try:
            report[name] = whole_error(denoise(handle), reference, group)
        finally:
            handle.remove()
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, size = start_torch_distributed()
    group = dist.new_group(list(range(size)))
    report = {"world_size": size, "layers": layer_checks(rank, size, group)}
    unet = deep_unet()
    report["repeat"] = repeat_check(unet, rank, size, group)
    if args.deep:
        report["deep"] = deep_checks(unet, rank, size, group)
    report_and_finish(report, rank)


if __name__ == "__main__":
    main()
