"""`hpcrender bench`: per-step time of the denoising loop (UNet or diffusion transformer, CFG batch 2, no VAE)
against what a user would run instead - plain diffusers on one process with all the node's cores, and hpcrender on
one rank - then on every rank of the launch in the asked modes, beside what the run plan predicts (bytes, compute,
memory)."""

from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hpcrender.config import ControlNetConfig, DType, Job, Lora, Manifest, Mode, ParallelConfig, SchedulerName
from hpcrender.errors import EXIT_OK
from hpcrender.measure.projection import format_projection, measure_band, projection_rows
from hpcrender.models import Family, denoiser_of
from hpcrender.models.adapters import load_unfused
from hpcrender.models.lora import file_sha256
from hpcrender.models.cache import ModelCache
from hpcrender.models.facts import facts_of
from hpcrender.models.shapes import model_shape
from hpcrender.parallel.groups import make_comms
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.parallel.pipefusion import stage_cut
from hpcrender.parallel.pipeline import stage_parameters
from hpcrender.render.image import render_image
from hpcrender.render.latents import initial_noise, pack_2x2
from hpcrender.render.prompt import t5_tokens
from hpcrender.render.samplers import make_scheduler
from hpcrender.render.stages import TORCH_DTYPES, _sync, peak_memory
from hpcrender.run.environment import idle_barrier
from hpcrender.run.plan import make_run_plan, plan_job

DIFFUSERS = "diffusers"  # the row of diffusers' own pipeline loop (LoRAs fused, as hpcrender runs them)
UNFUSED = "unfused"      # diffusers' loop with the LoRAs loaded and weighted but not fused: its default


@dataclass(frozen=True)
class BenchRequest:
    model: str
    width: int
    height: int
    steps: int
    modes: list[Mode] | None
    warmup_steps: int
    scheduler: str
    dtype: str
    json_path: Path | None
    plot_path: Path | None = None
    project: tuple[int, ...] = ()  # group sizes to project displaced scaling to (projection.py)
    loras: tuple[Lora, ...] = ()    # fused in every hpcrender run; diffusers' loop runs them unfused and fused
    controlnet: ControlNetConfig | None = None  # every run conditioned on it (diffusers: its ControlNet pipeline)
    pipeline_patches: int = 0  # pipefusion's patches per step (0: as many as ranks)


def bench_job(req: BenchRequest, mode: Mode) -> Job:
    return Job(name=f"bench-{mode.value}", prompt="a lighthouse on a cliff at dusk, oil painting", width=req.width,
               height=req.height, seed=0, model=req.model, steps=req.steps, guidance_scale=5.0,
               scheduler=SchedulerName(req.scheduler), dtype=DType(req.dtype), loras=req.loras,
               controlnets=(req.controlnet,) if req.controlnet is not None else (),
               parallel=ParallelConfig(mode=mode, warmup_steps=req.warmup_steps, ranks_per_image=0,
                                       pipeline_patches=req.pipeline_patches))


def summarize(step_seconds: list[float], short_last: bool = False) -> dict:
    """Per-step statistics after the first step (the first one pays for allocation and registration); short_last:
    without the last step too (Heun's is one denoiser call, the others two)."""
    steady = (step_seconds[1:-1] if short_last and len(step_seconds) > 2 else step_seconds[1:]) or step_seconds
    return {"steps": len(step_seconds), "first_s": step_seconds[0], "mean_s": statistics.fmean(steady),
            "median_s": statistics.median(steady), "min_s": min(steady), "max_s": max(steady)}


def parallel_modes(asked: list[Mode] | None, world_size: int) -> list[Mode]:
    """The modes run on every rank: none is the one-rank row, which every bench has; one rank has no other."""
    if world_size == 1:
        return []
    return [m for m in (asked or [Mode.SYNC, Mode.DISPLACED]) if m is not Mode.NONE]


def node_threads(placements: list[tuple[str, int]], node: str) -> int:
    """Threads of all the launch's ranks on `node`: what one process there may use instead of them."""
    return sum(threads for where, threads in placements if where == node)


def steady_waits(wait_seconds: list[float], first: int) -> float | None:
    """Mean seconds waited per step from step `first` on (None when the run had no such step)."""
    steady = wait_seconds[first:]
    return statistics.fmean(steady) if steady else None


def exchange_hidden(wait_s: float | None, sync_wait_s: float | None) -> float | None:
    """Share of the exchange's waiting that a mode hides behind compute: 1 - its wait per step over sync's (which
    exchanges the same bytes and waits for every exchange); None without both, or when sync waited for nothing."""
    if wait_s is None or not sync_wait_s:
        return None
    return 1.0 - wait_s / sync_wait_s


def relative_error(measured: float | None, planned: float | None) -> float | None:
    if measured is None or not planned:
        return None
    return (measured - planned) / planned


def add_ratios(rows: list[dict]) -> None:
    """Speed-up against diffusers and against hpcrender on one rank, and parallel efficiency (one-rank time over
    ranks x time), filled into every row from the rows' per-step times."""
    base = next((r["per_step_s"] for r in rows if r["run"] == DIFFUSERS), None)
    one = next((r["per_step_s"] for r in rows if r["run"] == Mode.NONE.value), None)
    for r in rows:
        t = r["per_step_s"]
        r["speedup_vs_diffusers"] = base / t if base else None
        ours = one and r["run"] not in (DIFFUSERS, UNFUSED)
        r["speedup_vs_1_rank"] = one / t if ours else None
        r["parallel_efficiency"] = one / (r["ranks"] * t) if ours else None


# --- memory a denoising loop adds to the loaded model ------------------------------------------------------------

class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_reader():
    """glibc's bytes in use (small blocks + mmapped ones), or None where mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL(None)
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def read() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd
    return read


class LoopMemory:
    """Peak bytes in use during a denoising loop above what was in use when the UNet was first called.

    On CUDA the allocator's own peak over the whole loop. On CPUs glibc's bytes in use, read before and after every
    module's forward during the first step only (the step the bench leaves out of its times): it misses what lives
    only inside one module's call and the second step's re-layout of the buffers into buckets, so it reads low.
    """

    def __init__(self, unet, device: str):
        import torch

        self.device = torch.device(device)
        self.base: int | None = None
        self.peak = 0
        self._hooks = []
        self._read = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._read = lambda: torch.cuda.memory_allocated(self.device)
        else:
            self._read = _heap_reader()
        if self._read is None:
            return
        self._hooks.append(unet.register_forward_pre_hook(self._start))
        if self.device.type != "cuda":
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

            self._hooks.append(register_module_forward_pre_hook(self._sample))
            self._hooks.append(register_module_forward_hook(self._sample))

    def _start(self, *_) -> None:
        if self.base is None:
            self.base = self.peak = self._read()

    def _sample(self, *_) -> None:
        if self.base is not None:
            self.peak = max(self.peak, self._read())

    def stop_sampling(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def result(self) -> int | None:
        import torch

        self.stop_sampling()
        if self.base is None:
            return None
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        return self.peak - self.base


# --- the runs ----------------------------------------------------------------------------------------------------

def diffusers_steps(pipe, job: Job, device: str, threads: int, controlnet=None) -> list[float]:
    """Seconds per step of diffusers' own pipeline call on the same model, size, steps, scheduler, seed and
    initial noise as hpcrender's, with `threads` intra-op threads; steps are timed by its step-end callback (the
    first one includes encoding the prompt). With `controlnet` (the loaded model of the job's one ControlNet), its
    ControlNet pipeline of the same components."""
    import torch
    from PIL import Image

    facts = facts_of(pipe)
    fam = facts.family
    latents = initial_noise(job, facts.latent_channels, facts.vae_scale).to(device=device,
                                                                             dtype=TORCH_DTYPES[job.dtype])
    kwargs = dict(prompt=job.prompt, height=job.height, width=job.width, num_inference_steps=job.steps,
                  guidance_scale=job.guidance_scale, latents=latents, output_type="latent")
    if fam is not Family.FLUX:
        kwargs["negative_prompt"] = job.negative_prompt or None
    if fam.transformer:
        kwargs["max_sequence_length"] = t5_tokens(pipe, fam)
    if fam is Family.PIXART:
        kwargs.update(negative_prompt=job.negative_prompt, use_resolution_binning=False, clean_caption=False)
    if fam is Family.FLUX:
        kwargs["latents"] = pack_2x2(latents)
    if controlnet is not None:
        control = job.controlnets[0]
        pipe = _controlnet_pipeline(pipe, controlnet)
        with Image.open(control.image) as image:
            kwargs.update(image=image.copy(), controlnet_conditioning_scale=control.scale,
                          control_guidance_start=control.start, control_guidance_end=control.end)
    original, threads_before = pipe.scheduler, torch.get_num_threads()
    pipe.scheduler = make_scheduler(job.scheduler, original.config, job.timestep_spacing, fam)
    pipe.set_progress_bar_config(disable=True)
    marks: list[float] = []

    def on_step_end(_pipe, step, timestep, tensors):
        _sync(device)
        marks.append(time.perf_counter())
        return {}

    if fam is Family.PIXART:  # its pipeline has the older per-step callback only
        kwargs.update(callback=lambda step, timestep, latents: on_step_end(None, step, timestep, {}),
                      callback_steps=1)
    else:
        kwargs["callback_on_step_end"] = on_step_end

    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            pipe(**kwargs)
    finally:
        pipe.scheduler = original
        torch.set_num_threads(threads_before)
    calls = job.scheduler.calls_per_step
    if calls > 1 and fam is not Family.PIXART:  # the step-end callback follows every denoiser call: a step's last
        marks = marks[calls - 1::calls] + ([marks[-1]] if len(marks) % calls else [])
    return [b - a for a, b in zip([start] + marks, marks)]


def bench_control(ref: str, image: Path | None, width: int, height: int, folder: Path) -> ControlNetConfig:
    """The bench's ControlNet at scale 1 over the whole schedule, conditioned on `image`, or on an edge map of
    circles and lines drawn into `folder` (the same bytes on every rank)."""
    from PIL import Image, ImageDraw

    if image is None:
        image = folder / "control.png"
        edges = Image.new("RGB", (width, height))
        draw = ImageDraw.Draw(edges)
        for k in range(1, 8):
            r = k * min(width, height) // 16
            draw.ellipse((width // 2 - r, height // 2 - r, width // 2 + r, height // 2 + r), outline="white", width=2)
        for x in range(0, width, max(width // 8, 1)):
            draw.line((x, 0, width - x, height), fill="white", width=2)
        edges.save(image)
    return ControlNetConfig(model=ref, image=str(Path(image).resolve()), sha256=file_sha256(image))


def _controlnet_pipeline(pipe, controlnet):
    """diffusers' ControlNet pipeline (SD or SDXL) of `pipe`'s components and `controlnet`."""
    import diffusers

    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor",
                                                                    "safety_checker")}
    if "text_encoder_2" in parts:
        return diffusers.StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet, add_watermarker=False)
    return diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)


def planned(job: Job, size: int) -> dict | None:
    """What the run plan says a group of `size` needs per step, rank by rank: bytes sent in a steady step,
    multiply-accumulates, and the memory the loop adds (exchange buffers + activations)."""
    planned_job = plan_job(0, job, size, model_shape(job.model))
    costs = planned_job.costs
    calls = job.scheduler.calls_per_step  # the plan's costs are per denoiser call
    if costs is None:
        if planned_job.sent is not None:  # a diffusion transformer: bytes only (pipefusion: and weights by stage)
            weights = None
            if planned_job.pipeline is not None and planned_job.parameter_split is not None:
                element = {"float32": 4, "float16": 2, "bfloat16": 2}[job.dtype.value]
                stages = planned_job.pipeline.stages
                weights = [stage_parameters(planned_job.parameter_split, stages, r % len(stages)) * element
                           for r in range(size)]
            return {"bytes_per_step": [b * calls for b in planned_job.sent], "macs_per_step": None,
                    "loop_memory_bytes": [None] * size, "activation_bytes": None, "buffer_bytes": None,
                    "parameter_bytes": weights}
        return None
    return {"bytes_per_step": [c.bytes_sent * calls for c in costs],
            "macs_per_step": [c.macs * calls for c in costs], "loop_memory_bytes": [c.memory.step for c in costs],
            "activation_bytes": [c.memory.activations for c in costs],
            "buffer_bytes": [c.memory.buffers.total for c in costs]}


def _hpcrender_run(world, models, job: Job, group: int, comms, measure_memory: bool = True) -> dict:
    """One render of `job` by this rank in a group of `group` ranks: its step times, exchange and memory."""
    env = world.env
    layout = GroupLayout(size=group, rank=env.rank % group, mode=job.parallel.mode)
    job_plan = plan_job(0, job, group, model_shape(job.model))
    cut = stage_cut(job_plan.pipeline, layout.patch_rank) if job_plan.pipeline is not None else None
    model = models.get(job.model, job.dtype, job.loras, cut=cut)
    pipe = model.pipe
    probe = LoopMemory(denoiser_of(pipe), env.device) if measure_memory else None

    def on_step(done: int, total: int) -> None:
        if probe is not None and done == 1 and probe.device.type != "cuda":
            probe.stop_sampling()

    controlnets = models.controlnets([c.model for c in job.controlnets], job.dtype)
    try:
        result = render_image(pipe, job, layout, comms, env.device, on_step=on_step, decode=False,
                              bands=job_plan.bands, facts=model.facts, controlnets=controlnets,
                              pipeline=job_plan.pipeline)
    finally:
        loop_memory = probe.result() if probe is not None else None
    return {"rank": env.rank, **summarize(result.step_seconds, job.scheduler.calls_per_step > 1),
            "step_seconds": result.step_seconds,
            "peak_memory_bytes": peak_memory(env.device), "loop_memory_bytes": loop_memory,
            "exchange": result.exchange}


def _row(run: str, req: BenchRequest, ranks: int, threads: int, device: str, per_rank: list[dict]) -> dict:
    slowest = max(per_rank, key=lambda r: r["mean_s"])
    return {"run": run, "mode": run if run not in (DIFFUSERS, UNFUSED) else None, "ranks": ranks, "threads_per_rank": threads,
            "model": req.model, "size": f"{req.width}x{req.height}", "steps": req.steps, "scheduler": req.scheduler,
            "dtype": req.dtype, "warmup_steps": req.warmup_steps, "device": device,
            "loras": [{"file": Path(lora.path).name, "sha256": lora.sha256, "scale": lora.scale} for lora in req.loras],
            "controlnet": req.controlnet.model if req.controlnet is not None else None,
            "per_step_s": slowest["mean_s"], "median_s": slowest["median_s"], "min_s": slowest["min_s"],
            "max_s": slowest["max_s"], "first_s": slowest["first_s"], "per_rank": per_rank}


def _exchange_fields(row: dict, mode: Mode, req: BenchRequest, plan: dict | None) -> None:
    """Measured bytes and waits of a steady step beside the plan's bytes, compute and memory."""
    per_rank = row["per_rank"]
    exchanges = [r["exchange"] or {} for r in per_rank]
    last = -2 if SchedulerName(req.scheduler).calls_per_step > 1 else -1  # the last whole step (Heun's last: 1 call)
    sent = [e["bytes_sent"][last] if len(e.get("bytes_sent", ())) >= -last else 0 for e in exchanges]
    # displaced, pipefusion: their asynchronous steps; sync: every step after the first (which also registers token
    # counts)
    first = max(req.warmup_steps, 1) if mode in (Mode.DISPLACED, Mode.PIPEFUSION) else 1
    waits = [steady_waits(e.get("wait_seconds", []), first) for e in exchanges]
    waits = [w for w in waits if w is not None]
    row["bytes_per_step"] = sent
    row["wait_s_per_step"] = statistics.fmean(waits) if waits and mode is not Mode.NAIVE else None
    row["loop_memory_bytes"] = [r["loop_memory_bytes"] for r in per_rank]
    row["peak_memory_bytes"] = [r["peak_memory_bytes"] for r in per_rank]
    row["parameter_bytes"] = [e.get("parameter_bytes") for e in exchanges]  # pipefusion: the stage's weights held
    row["plan"] = plan
    if plan is not None:
        row["bytes_error"] = max((abs(relative_error(m, p)) for m, p in zip(sent, plan["bytes_per_step"]) if p),
                                 default=None)
        errors = [relative_error(m, p) for m, p in zip(row["loop_memory_bytes"], plan["loop_memory_bytes"])]
        errors = [e for e in errors if e is not None]
        row["loop_memory_error"] = max(errors, key=abs) if errors else None


def run_bench(world, req: BenchRequest) -> int:
    import diffusers
    import torch

    env = world.env
    size = env.world_size
    modes = parallel_modes(req.modes, size)
    world.init_torch_distributed()
    models = ModelCache(device=env.device)
    if env.rank == 0:
        jobs = tuple(bench_job(req, m) for m in modes)
        make_run_plan(Manifest(path=Path("bench"), jobs=jobs), tuple(range(len(jobs))), size, model_shape)
        for ranks in req.project:  # refused before anything runs, like the launch's own layout
            plan_job(0, bench_job(req, Mode.DISPLACED), ranks, model_shape(req.model))
    placements = world.allgather((env.node, env.threads))
    threads = node_threads(placements, placements[0][0])
    single = Comms(group=None, patch_group=None, global_ranks=(0,))
    rows = []

    # 1. What a user would run instead: diffusers' loop in one process with the node's cores; the rest wait.
    one_job = bench_job(req, Mode.NONE)
    if env.rank == 0:
        short = one_job.scheduler.calls_per_step > 1
        controlnet = models.controlnets([c.model for c in one_job.controlnets], one_job.dtype)
        controlnet = controlnet[0] if controlnet else None
        if req.loras:
            pipe = models.get(one_job.model, one_job.dtype).pipe
            load_unfused(pipe, req.loras)
            seconds = diffusers_steps(pipe, one_job, env.device, threads, controlnet)
            pipe.unload_lora_weights()
            rows.append(_row(UNFUSED, req, 1, threads, env.device, [{"rank": 0, **summarize(seconds, short),
                                                                     "step_seconds": seconds}]))
        seconds = diffusers_steps(models.get(one_job.model, one_job.dtype, one_job.loras).pipe, one_job, env.device,
                                  threads, controlnet)
        rows.append(_row(DIFFUSERS, req, 1, threads, env.device, [{"rank": 0, **summarize(seconds, short),
                                                                   "step_seconds": seconds}]))
    idle_barrier(world.comm, poll_s=0.01)
    # 2. hpcrender on one rank (rank 0, its own threads), the rest waiting.
    if env.rank == 0:
        run = _hpcrender_run(world, models, one_job, 1, single)
        row = _row(Mode.NONE.value, req, 1, env.threads, env.device, [run])
        _exchange_fields(row, Mode.NONE, req, planned(one_job, 1))
        rows.append(row)
    idle_barrier(world.comm, poll_s=0.01)
    # 3. Every rank together, mode by mode.
    for mode in modes:
        job = bench_job(req, mode)
        comms = make_comms(world, (tuple(range(size)),), size, False)[False]
        world.barrier()
        run = _hpcrender_run(world, models, job, size, comms)
        per_rank = world.allgather(run)
        if env.rank == 0:
            row = _row(mode.value, req, size, env.threads, env.device, per_rank)
            _exchange_fields(row, mode, req, planned(job, size))
            rows.append(row)
    if env.rank == 0:
        sync_wait = next((r["wait_s_per_step"] for r in rows if r["run"] == Mode.SYNC.value), None)
        for r in rows:
            if r["run"] in (Mode.SYNC.value, Mode.DISPLACED.value):
                r["exchange_hidden"] = exchange_hidden(r["wait_s_per_step"], sync_wait)
            r["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__}
        add_ratios(rows)
        print(format_table(rows))
        projected = _projection(req, models, env.device, rows) if req.project else []
        if req.json_path:
            req.json_path.parent.mkdir(parents=True, exist_ok=True)
            req.json_path.write_text(json.dumps(rows + projected, indent=2, default=str))
        if req.plot_path:
            plot_scaling(rows, req.plot_path)
        sys.stdout.flush()
    world.barrier()
    world.close()
    return EXIT_OK


def _projection(req: BenchRequest, models, device: str, rows: list[dict]) -> list[dict]:
    """Displaced scaling to each of req.project ranks, projected from this launch's one-rank run (projection.py);
    printed as its own table, and as rows of run "projection" for the JSON."""
    one = next(r for r in rows if r["run"] == Mode.NONE.value)
    job = bench_job(req, Mode.DISPLACED)
    measured = []
    for ranks in req.project:
        bands = plan_job(0, job, ranks, model_shape(job.model)).bands
        plan = planned(job, ranks)
        measured.append(measure_band(models.get(job.model, job.dtype, job.loras).pipe, job, ranks, device, bands,
                                     plan["bytes_per_step"] if plan else [None] * ranks))
    projected = projection_rows(one["per_step_s"], req.width, req.height, measured)
    print(format_projection(projected, f"{req.width}x{req.height}", req.model))
    return [{"run": "projection", "model": req.model, "size": f"{req.width}x{req.height}", "steps": req.steps,
             "dtype": req.dtype, "device": device, **row} for row in projected]


# --- the table ---------------------------------------------------------------------------------------------------

def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def format_table(rows: list[dict]) -> str:
    """One line per run: time and ratios, then the exchange and memory of the slowest/largest rank beside the plan's
    figure in brackets."""
    head = (f"{'run':<10} {'ranks':>5} {'thr/rank':>8} {'s/step':>9} {'vs diffusers':>12} {'vs 1 rank':>9} "
            f"{'efficiency':>10} {'MiB sent/step (plan)':>21} {'hidden':>6} {'GMAC/rank (plan)':>16} "
            f"{'loop MiB/rank (plan)':>21} {'weights MiB/rank':>16}")
    lines = [head]
    for r in rows:
        plan = r.get("plan") or {}
        sent = f"{_mib(max(r['bytes_per_step'], default=0))} ({_mib(max(plan['bytes_per_step'], default=0))})" \
            if "bytes_per_step" in r and plan else "-"
        macs = f"({max(plan['macs_per_step']) / 1e9:.2f})" if plan and plan["macs_per_step"] else "-"
        measured = [m for m in r.get("loop_memory_bytes", []) if m is not None]
        estimates = [m for m in plan.get("loop_memory_bytes") or [] if m is not None]
        memory = f"{_mib(max(measured)) if measured else '-'} ({_mib(max(estimates)) if estimates else '-'})" \
            if plan else "-"
        held = [b for b in r.get("parameter_bytes") or [] if b is not None]
        weights = _mib(max(held)) if held else "all"
        lines.append(f"{r['run']:<10} {r['ranks']:>5} {r['threads_per_rank']:>8} {r['per_step_s']:>9.3f} "
                     f"{_num(r.get('speedup_vs_diffusers'), '.2f'):>12} {_num(r.get('speedup_vs_1_rank'), '.2f'):>9} "
                     f"{_num(r.get('parallel_efficiency'), '.2f'):>10} {sent:>21} "
                     f"{_num(r.get('exchange_hidden'), '.0%'):>6} {macs:>16} {memory:>21} {weights:>16}")
    first = rows[0] if rows else {}
    lines.append(f"{first.get('size')}, {first.get('model')}, {first.get('steps')} steps, {first.get('scheduler')}, "
                 f"{first.get('dtype')}, {first.get('device')}; s/step: mean after the first step, slowest rank")
    return "\n".join(lines)


# --- the plot (Pillow: no plotting library needed) -----------------------------------------------------------------

PLOT_COLOURS = {DIFFUSERS: (120, 120, 120), Mode.NONE.value: (0, 0, 0), Mode.SYNC.value: (31, 119, 180),
                Mode.DISPLACED.value: (214, 39, 40), Mode.NAIVE.value: (44, 160, 44),
                Mode.PIPEFUSION.value: (148, 103, 189)}


def scaling_series(rows: list[dict]) -> dict[str, list[tuple[int, float, float | None]]]:
    """Per mode, (ranks, seconds per step, parallel efficiency) from one rank up; diffusers' time alone."""
    one = [(r["ranks"], r["per_step_s"], r.get("parallel_efficiency")) for r in rows if r["run"] == Mode.NONE.value]
    series = {DIFFUSERS: [(r["ranks"], r["per_step_s"], None) for r in rows if r["run"] == DIFFUSERS]}
    for r in rows:
        if r["run"] not in (DIFFUSERS, UNFUSED, Mode.NONE.value):
            series.setdefault(r["run"], list(one)).append((r["ranks"], r["per_step_s"], r.get("parallel_efficiency")))
    if len(series) == 1 and one:
        series[Mode.NONE.value] = one
    return series


def plot_scaling(rows: list[dict], path: Path, size: tuple[int, int] = (900, 380)) -> None:
    """A PNG of seconds per step (left) and parallel efficiency (right) against ranks, one line per mode from the
    one-rank run; diffusers' time as a dashed grey line."""
    from PIL import Image, ImageDraw

    series = scaling_series(rows)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    max_ranks = max((p[0] for points in series.values() for p in points), default=1)
    top_time = max((p[1] for points in series.values() for p in points), default=1.0) * 1.15 or 1.0
    panels = [("seconds per step", 1, top_time, (60, 40, width // 2 - 20, height - 50)),
              ("parallel efficiency", 2, 1.2, (width // 2 + 50, 40, width - 30, height - 50))]
    for title, field, top, (x0, y0, x1, y1) in panels:
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, y0 - 25), title, fill="black")
        draw.text(((x0 + x1) // 2 - 15, y1 + 25), "ranks", fill="black")

        def at(ranks: float, value: float) -> tuple[float, float]:
            span = max(max_ranks - 1, 1)
            return (x0 + 20 + (ranks - 1) / span * (x1 - x0 - 40), y1 - value / top * (y1 - y0))

        for ranks in range(1, max_ranks + 1):
            x, _ = at(ranks, 0)
            draw.line((x, y1, x, y1 + 5), fill="black")
            draw.text((x - 3, y1 + 8), str(ranks), fill="black")
        for tick in range(5):
            value = top * tick / 4
            _, y = at(1, value)
            draw.line((x0 - 5, y, x0, y), fill="black")
            draw.text((x0 - 50, y - 6), f"{value:.3g}", fill="black")
        for n, (name, points) in enumerate(series.items()):
            colour = PLOT_COLOURS.get(name, (148, 103, 189))
            if name == DIFFUSERS:
                if field == 1 and points:
                    _, y = at(1, points[0][1])
                    for x in range(x0, x1, 12):
                        draw.line((x, y, min(x + 6, x1), y), fill=colour, width=2)
                    draw.text((x1 - 70, y - 14), DIFFUSERS, fill=colour)
                continue
            xy = [at(p[0], p[field]) for p in points if p[field] is not None]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for x, y in xy:
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
            if field == 1:
                draw.text((x1 - 70, y0 + 8 + 14 * n), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
