"""Patch-parallel UNets and VAE decode on every rank of the MPI world, against one process's result.

usage: mpiexec -n K parallel_checks.py [--groupnorm MODE]...   (displaced runs per GroupNorm mode; default all)
Rank 0 prints one JSON object: the world size, and per model shape the relative errors of each mode, the bytes
each rank sent against the analytic count, the warm-up and remove() checks; then the VAE decode error.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from hpcrender.config import GroupNormMode, Mode
from hpcrender.parallel.bands import exchange_buffers, expected_bytes, latent_bands, split_rows, unet_alignment
from hpcrender.parallel.parallelize import parallelize
from hpcrender.parallel.plan import PatchPlan, unet_layers
from hpcrender.parallel.vae import decode_parallel, encode_parallel
from parallel_models import conditioning, noise, sd_unet, sd_unet_with_lora, sdxl_unet, small_vae, start_torch_distributed, report_and_finish

STEPS = 8
WARMUP = 1
LONG_WARMUP = 3
BATCH = 2  # classifier-free guidance's pair

# Latent sizes per world size: uneven bands, non-square; the SD ones also leave rows past the last whole coarse row.
SIZES = {
    "sd": {2: (28, 20), 3: (44, 20)},
    "sdxl": {2: (12, 12), 3: (20, 12)},
    "sd-lora": {2: (28, 20), 3: (44, 20)},
}
BUILDERS = {"sd": sd_unet, "sdxl": sdxl_unet, "sd-lora": sd_unet_with_lora}


def timesteps(steps: int) -> tuple[list[float], list[float]]:
    sigmas = [1.0 - i / steps for i in range(steps + 1)]
    return sigmas, [999.0 * s for s in sigmas[:-1]]


def denoise(unet, latent, cond, steps: int, handle=None, rows: slice = slice(None)):
    """A plain Euler loop over the UNet's output; returns (per-step outputs, final latent) of `rows`."""
    sigmas, ts = timesteps(steps)
    latent = latent[:, :, rows].clone()
    outputs = []
    with torch.no_grad():
        for i, t in enumerate(ts):
            if handle is not None:
                handle.begin_step(i)
            out = unet(latent, t, **cond, return_dict=False)[0]
            outputs.append(out)
            latent = latent + (sigmas[i + 1] - sigmas[i]) * out
    return outputs, latent


def relative_error(part: torch.Tensor, reference: torch.Tensor, group) -> float:
    """||part - reference|| / ||reference|| over the whole image (each rank holds one band)."""
    sums = torch.tensor([(part.double() - reference.double()).pow(2).sum(), reference.double().pow(2).sum()])
    dist.all_reduce(sums, group=group)
    return float(sums[0].sqrt() / sums[1].sqrt())


def largest(value: float, group) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def gathered(value, size: int, group) -> list:
    out = [None] * size
    dist.all_gather_object(out, value, group=group)
    return out


def held_bytes(exchange) -> int:
    """Bytes of the distinct storages behind every slot's buffers (standalone, or views into bucket buffers)."""
    storages = {}
    for slot in exchange.slots.values():
        for tensor in slot.buffers.values():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def check_unet(shape: str, rank: int, size: int, group, groupnorms: list[GroupNormMode]) -> dict:
    unet = BUILDERS[shape]()
    height, width = SIZES[shape][size]
    bands = latent_bands(height, unet_alignment(unet.config), size)
    rows = slice(bands[rank].start, bands[rank].stop)
    cond = conditioning(unet, BATCH)
    latent = noise(BATCH, height, width)
    layers = unet_layers(unet, width)

    before_state = {k: v.clone() for k, v in unet.state_dict().items()}
    before_types = [(n, type(m)) for n, m in unet.named_modules()]
    before_processors = dict(unet.attn_processors)
    ref_outputs, ref_latent = denoise(unet, latent, cond, STEPS)
    ref_band = [o[:, :, rows] for o in ref_outputs]

    def run(mode: Mode, groupnorm: GroupNormMode = GroupNormMode.CORRECTED, warmup: int = WARMUP):
        plan = PatchPlan(mode=mode, groupnorm=groupnorm, warmup_steps=warmup, bands=bands, rank=rank)
        handle = parallelize(unet, plan, group)
        try:
            outputs, final = denoise(unet, latent, cond, STEPS, handle, rows)
            held = held_bytes(handle.ctx.exchange)
        finally:
            handle.remove()
        estimate = exchange_buffers(layers, bands, BATCH, 4).total if mode is not Mode.NAIVE else 0
        stats = handle.stats()  # still readable once the model is restored
        expected = [expected_bytes(layers, bands, rank, BATCH, 4, groupnorm_stats=plan.groupnorm_exchanged(i),
                                   registration=(i == 0)) if mode is not Mode.NAIVE else 0 for i in range(STEPS)]
        return {
            "first_output": relative_error(outputs[0], ref_band[0], group),
            "final_latent": relative_error(final, ref_latent[:, :, rows], group),
            "bytes_match": all(gathered(stats["bytes_sent"] == expected, size, group)),
            "bytes_per_step": gathered(stats["bytes_sent"][-1], size, group),
            "buffers_match": all(gathered(held == estimate, size, group)),
            "buffer_bytes": gathered(held, size, group),
            "sync_steps": stats["sync_steps"], "async_steps": stats["async_steps"],
            "wait_seconds": gathered(stats["wait_seconds_total"], size, group),
        }, outputs

    result = {"bands": [[b.start, b.stop] for b in bands], "latent": [height, width]}
    result["sync"], sync_outputs = run(Mode.SYNC)
    result["naive"], _ = run(Mode.NAIVE)
    for groupnorm in groupnorms:
        result[f"displaced_{groupnorm.value}"], _ = run(Mode.DISPLACED, groupnorm)

    # Warm-up steps are the synchronous steps, bit for bit; the first stale step is not.
    warm, warm_outputs = run(Mode.DISPLACED, GroupNormMode.CORRECTED, LONG_WARMUP)
    diffs = [largest(float((a - b).abs().max()), group) for a, b in zip(warm_outputs, sync_outputs)]
    result["warmup"] = {"steps": LONG_WARMUP, "max_abs_diff_per_step": diffs, "sync_steps": warm["sync_steps"],
                        "async_steps": warm["async_steps"]}

    # remove() gives back the very model: parameters, module types, processors, and its output.
    with torch.no_grad():
        after_output = unet(latent, 999.0, **cond, return_dict=False)[0]
    after_state = unet.state_dict()
    result["removed"] = {
        "state_dict_equal": after_state.keys() == before_state.keys()
        and all(torch.equal(after_state[k], before_state[k]) for k in before_state),
        "module_types_equal": [(n, type(m)) for n, m in unet.named_modules()] == before_types,
        "processors_identical": all(unet.attn_processors[k] is p for k, p in before_processors.items())
        and unet.attn_processors.keys() == before_processors.keys(),
        "output_equal": torch.equal(after_output, ref_outputs[0]),
    }
    return result


def check_vae(rank: int, size: int, group) -> dict:
    vae = small_vae()
    latent = noise(1, 5 * size + 1, 7, seed=3)  # uneven bands, non-square
    bands = split_rows(latent.shape[2], size)
    band = bands[rank]
    with torch.no_grad():
        reference = vae.decode(latent, return_dict=False)[0]
        part = decode_parallel(vae, latent[:, :, band.start:band.stop], bands, rank, group)
    scale = reference.shape[2] // latent.shape[2]
    untouched = all(type(m).__name__ not in ("BandConv2d", "BandGroupNorm") for m in vae.modules())
    report = {"error": relative_error(part, reference[:, :, band.start * scale:band.stop * scale], group),
              "rows": gathered(part.shape[2], size, group), "scale": scale, "vae_restored": untouched}

    # The encoder: an image whose latent rows split into uneven bands, its pixel rows 8 per latent row.
    image = torch.rand(1, 3, latent.shape[2] * scale, 56, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        reference = vae.encode(image).latent_dist.parameters
        part = encode_parallel(vae, image[:, :, band.start * scale:band.stop * scale], bands, rank, group)
    report["encode"] = {
        "error": relative_error(part, reference[:, :, band.start:band.stop], group),
        "rows": gathered(part.shape[2], size, group), "channels": part.shape[1],
        "vae_restored": all(type(m).__name__ not in ("BandConv2d", "BandGroupNorm", "BandDownsample")
                            for m in vae.modules()),
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groupnorm", action="append", type=GroupNormMode, choices=list(GroupNormMode))
    groupnorms = parser.parse_args().groupnorm or list(GroupNormMode)
    rank, size = start_torch_distributed()
    group = dist.new_group(list(range(size)))
    report = {"world_size": size, "unet": {}}
    for shape in BUILDERS:  # the LoRA-wrapped UNet with the default GroupNorm only
        report["unet"][shape] = check_unet(shape, rank, size, group,
                                           [GroupNormMode.CORRECTED] if shape == "sd-lora" else groupnorms)
    report["vae"] = check_vae(rank, size, group)
    report_and_finish(report, rank)


if __name__ == "__main__":
    main()
