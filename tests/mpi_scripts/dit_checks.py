"""Band-parallel diffusion transformers (builtin tiny PixArt-Sigma, SD3 and Flux) on every rank of the MPI world,
rendered through the pipeline's stages and compared with the render of one process.

usage: mpiexec -n K dit_checks.py     Rank 0 prints one JSON object: the world size, and per model the bands, each
mode's final-latent error, largest PNG difference and PSNR against one process, whether every rank sent the bytes
transformer_step_bytes gives, whether the model came back bit for bit after the plans were removed, and the
split_cfg (even worlds) and img2img checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from hpcrender.config import InitImage, Job, Mode, ParallelConfig
from hpcrender.models import denoiser_of, load_pipeline
from hpcrender.parallel.bands import latent_bands, transformer_alignment, transformer_step_bytes
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.render.image import render_image
from parallel_models import start_torch_distributed

MODELS = ("tiny-pixart", "tiny-sd3", "tiny-flux")
WIDTH, HEIGHT = 64, 80  # 5 token rows: uneven bands on 2 and 3 ranks, not square
STEPS = 4
WARMUP = 1


def job(model: str, mode: Mode, split_cfg: bool = False, init: InitImage | None = None) -> Job:
    return Job(name="dit", prompt="a lighthouse on a cliff", width=WIDTH, height=HEIGHT, seed=11,
               model=f"builtin:{model}", steps=STEPS, guidance_scale=4.5, negative_prompt="fog",
               parallel=ParallelConfig(mode=mode, warmup_steps=WARMUP, split_cfg=split_cfg), init_image=init)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def compare(result, alone) -> dict | None:
    """Rank 0: the final latent's relative L2 error, the largest PNG level difference, and the image's PSNR."""
    if result.latent is None:
        return None
    error = float(np.linalg.norm(result.latent - alone.latent) / np.linalg.norm(alone.latent))
    diff = int(np.abs(result.image.astype(np.int16) - alone.image.astype(np.int16)).max())
    return {"error": error, "png_max_diff": diff, "psnr": psnr(result.image, alone.image)}


def snapshot(model) -> dict:
    """What remove() must give back: the modules and processors (as objects), hooks, and the weights' bytes."""
    return {
        "modules": [(name, id(m)) for name, m in model.named_modules()],
        "processors": [(name, id(m.processor)) for name, m in model.named_modules() if hasattr(m, "set_processor")],
        "hooks": (len(model._forward_pre_hooks), len(model._forward_hooks)),
        "weights": hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values()))
        .hexdigest(),
    }


def all_ranks(flag: bool, group) -> bool:
    value = torch.tensor([1 if flag else 0])
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


def start_image(folder: Path) -> InitImage:
    path = folder / "start.png"
    pixels = np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return InitImage(path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), strength=0.75)


def main() -> None:
    rank, size = start_torch_distributed()
    everyone = list(range(size))
    group = dist.new_group(everyone)
    halves = [everyone[:size // 2], everyone[size // 2:]] if size % 2 == 0 else []
    half_groups = [dist.new_group(h) for h in halves]
    whole = Comms(group, group, tuple(everyone))
    alone_at = (GroupLayout(1, 0, Mode.NONE), Comms(None, None, (rank,)))
    report = {"world_size": size, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        init = start_image(Path(tmp))
        for name in MODELS:
            pipe = load_pipeline(f"builtin:{name}")
            model = denoiser_of(pipe)
            before = snapshot(model)
            alone = render_image(pipe, job(name, Mode.NONE), *alone_at, "cpu")
            entry = {}
            for mode in (Mode.SYNC, Mode.DISPLACED, Mode.NAIVE):
                result = render_image(pipe, job(name, mode), GroupLayout(size, rank, mode), whole, "cpu")
                entry[mode.value] = compare(result, alone) or {}
                if mode is Mode.NAIVE:
                    continue
                align = transformer_alignment(model.config)
                bands = latent_bands(HEIGHT // 8, align, size)
                batch = 2 if name != "tiny-flux" else 1
                expected = [transformer_step_bytes(model.config, bands, rank, WIDTH // 8, batch, 4,
                                                   registration=step == 0) for step in range(STEPS)]
                entry[mode.value]["bytes_match"] = all_ranks(result.exchange["bytes_sent"] == expected, group)
                entry[mode.value]["bytes_per_step"] = expected[1]
                entry["bands"] = [[b.start, b.stop] for b in result.bands]
            after = snapshot(model)
            entry["restored"] = all_ranks(before == after, group)
            if half_groups and name != "tiny-flux":
                layout = GroupLayout(size, rank, Mode.SYNC, split_cfg=True)
                comms = Comms(group, half_groups[rank // (size // 2)], tuple(everyone))
                entry["split_cfg"] = compare(render_image(pipe, job(name, Mode.SYNC, split_cfg=True), layout, comms,
                                                          "cpu"), alone)
            if name != "tiny-pixart":  # img2img through the 16-channel VAE, encoded and decoded band-parallel
                alone_i2i = render_image(pipe, job(name, Mode.NONE, init=init), *alone_at, "cpu")
                result = render_image(pipe, job(name, Mode.SYNC, init=init), GroupLayout(size, rank, Mode.SYNC),
                                      whole, "cpu")
                entry["img2img_sync"] = compare(result, alone_i2i)
                if rank == 0:
                    entry["img2img_differs_from_text"] = bool(np.abs(alone_i2i.latent - alone.latent).max() > 1e-3)
            report["models"][name] = entry
    if rank == 0:
        print(json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
