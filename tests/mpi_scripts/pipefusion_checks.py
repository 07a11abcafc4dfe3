"""PipeFusion on every rank of the MPI world for the builtin tiny PixArt-Sigma, SD3 and Flux (four blocks each), compared
with the render of one process.

usage: mpiexec -n K pipefusion_checks.py     Rank 0 prints one JSON object: the world size, and per model the stages
and patches; for every warm-up-covers-all layout (M = K and M = 2K + 1 patches) the final-latent error and largest
PNG difference against one process; for 1 warm-up step of 12 the PSNR of pipefusion, displaced and naive bands;
every rank's parameter bytes against the whole model's and its blocks'; whether every rank sent the bytes the layout
gives. On 4 ranks only split_cfg, over two pipelines of 2 stages (PixArt and SD3; Flux has no guidance branches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from hpcrender.config import InitImage, Job, Mode, ParallelConfig
from hpcrender.models import denoiser_of, load_pipeline
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.parallel.pipefusion import held_parameter_bytes
from hpcrender.parallel.pipeline import block_lists
from hpcrender.render.image import layout_of, render_image
from dit_checks import all_ranks, compare as dit_compare
from parallel_models import start_torch_distributed

MODELS = ("tiny-pixart", "tiny-sd3", "tiny-flux")
WIDTH, HEIGHT = 64, 112  # 7 token rows: uneven patches for M = K and M = 2K + 1 on 2 and 3 ranks, not square
SHORT = 3


def job(model: str, mode: Mode, steps: int, warmup: int, patches: int = 0, split_cfg: bool = False) -> Job:
    return Job(name="pipe", prompt="a lighthouse on a cliff", width=WIDTH, height=HEIGHT, seed=11,
               model=f"builtin:{model}", steps=steps, guidance_scale=4.5, negative_prompt="fog",
               parallel=ParallelConfig(mode=mode, warmup_steps=warmup, pipeline_patches=patches,
                                       split_cfg=split_cfg))


def compare(result, alone) -> dict:
    return dit_compare(result, alone) or {}


def gathered(value, size: int) -> list:
    out = [None] * size
    dist.all_gather_object(out, value)
    return out


def start_image(folder: Path) -> InitImage:
    path = folder / "start.png"
    pixels = np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return InitImage(path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), strength=0.75)


def img2img_and_resume(name: str, fresh, size: int, rank: int, whole: Comms, alone_at) -> dict:
    """img2img with every step synchronous against one process; a render stopped after step 2 of 4 and resumed
    against the same render uninterrupted (synchronous throughout: bit for bit), and with 1 warm-up step (the
    resumed render warms up again: close, not equal)."""
    out = {}
    layout = GroupLayout(size, rank, Mode.PIPEFUSION)
    with tempfile.TemporaryDirectory() as tmp:
        init = start_image(Path(tmp))  # the same bytes on every rank
        spec = dataclasses.replace(job(name, Mode.PIPEFUSION, 4, 4), init_image=init)
        alone = render_image(fresh(), dataclasses.replace(spec, parallel=ParallelConfig(mode=Mode.NONE)), *alone_at,
                             "cpu")
        out["img2img_sync"] = compare(render_image(fresh(), spec, layout, whole, "cpu"), alone)
    for warmup in (4, 1):
        spec = job(name, Mode.PIPEFUSION, 4, warmup, 2 * size + 1)
        pipe = fresh()
        straight = render_image(pipe, spec, layout, whole, "cpu")
        calls = iter([False, True])
        stopped = render_image(pipe, spec, layout, whole, "cpu", should_stop=lambda: next(calls))
        saved = [stopped.checkpoint]
        dist.broadcast_object_list(saved, src=0)
        resumed = render_image(pipe, spec, layout, whole, "cpu", resume=saved[0])
        if rank == 0:
            out[f"stopped_at_w{warmup}"] = stopped.stopped_at
            out[f"resumed_w{warmup}"] = {"equal": bool(np.array_equal(resumed.latent, straight.latent)),
                                         **compare(resumed, straight)}
    return out


def main() -> None:
    rank, size = start_torch_distributed()
    everyone = list(range(size))
    group = dist.new_group(everyone)
    whole = Comms(group, group, tuple(everyone))
    alone_at = (GroupLayout(1, 0, Mode.NONE), Comms(None, None, (rank,)))
    report = {"world_size": size, "models": {}}
    for name in MODELS:
        entry = {}
        fresh = lambda: load_pipeline(f"builtin:{name}")  # noqa: E731 - a pipefusion render keeps its stage only
        pipe = fresh()
        if size == 4:
            if name == "tiny-flux":
                continue
            alone_short = render_image(pipe, job(name, Mode.NONE, SHORT, 0), *alone_at, "cpu")
            half = dist.new_group(everyone[:2]), dist.new_group(everyone[2:])
            comms = Comms(group, half[rank // 2], tuple(everyone))
            spec = job(name, Mode.PIPEFUSION, SHORT, SHORT, split_cfg=True)
            result = render_image(pipe, spec, GroupLayout(size, rank, Mode.PIPEFUSION, split_cfg=True), comms, "cpu")
            entry["split_cfg_sync"] = compare(result, alone_short)
            report["models"][name] = entry
            continue
        model_bytes = held_parameter_bytes(denoiser_of(pipe))
        entry["model_parameter_bytes"] = model_bytes
        entry["block_parameter_bytes"] = [held_parameter_bytes(blocks._modules[key])
                                          for blocks, key in block_lists(denoiser_of(pipe))]
        alone_short = render_image(pipe, job(name, Mode.NONE, SHORT, 0), *alone_at, "cpu")
        alone_long = render_image(pipe, job(name, Mode.NONE, 12, 0), *alone_at, "cpu")
        for mode in (Mode.DISPLACED, Mode.NAIVE):
            result = render_image(pipe, job(name, mode, 12, 1), GroupLayout(size, rank, mode), whole, "cpu")
            entry[f"{mode.value}_warmup1"] = compare(result, alone_long)
        for patches in (size, 2 * size + 1):
            pipe = fresh()
            spec = job(name, Mode.PIPEFUSION, SHORT, SHORT, patches)
            result = render_image(pipe, spec, GroupLayout(size, rank, Mode.PIPEFUSION), whole, "cpu")
            entry[f"sync_m{patches}"] = compare(result, alone_short)
        pipe = fresh()
        spec = job(name, Mode.PIPEFUSION, 12, 1, 2 * size + 1)
        result = render_image(pipe, spec, GroupLayout(size, rank, Mode.PIPEFUSION), whole, "cpu")
        entry["pipefusion_warmup1"] = compare(result, alone_long)
        layout = layout_of(denoiser_of(pipe).config, spec, size, 8)
        entry["stages"] = [[s.start, s.stop] for s in layout.stages]
        entry["patches"] = [[p.start, p.stop] for p in layout.patches]
        batch = 1 if name == "tiny-flux" else 2
        expected = [layout.step_bytes(rank, batch, 4, sync=step == 0) for step in range(12)]
        entry["bytes_match"] = all_ranks(result.exchange["bytes_sent"] == expected, group)
        entry["bytes_sent"] = gathered(result.exchange["bytes_sent"][:2], size)
        entry["expected"] = gathered(expected[:2], size)
        entry["parameter_bytes"] = gathered(result.exchange["parameter_bytes"], size)
        entry["sync_steps"] = result.exchange["sync_steps"]
        if name == "tiny-sd3":
            entry.update(img2img_and_resume(name, fresh, size, rank, whole, alone_at))
        report["models"][name] = entry
    if rank == 0:
        print(json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
