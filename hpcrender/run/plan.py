"""The run plan: from the manifest, the selected jobs and the world size, everything decided before a model loads.

Group sizes, rank groups, the order the work queue hands jobs out in, each job's layout and latent bands (from the
model's own VAE scale and alignment), the bytes each rank sends per step, compute, memory and an estimated time.
`validate`, `plan`, `render`, `verify` and `bench` all read it; nothing else computes bands (parallel.bands.
image_bands is the one formula, and the pipeline only calls it itself for a model this plan could not see).

make_run_plan is pure given its `shapes` lookup (models.shapes.model_shape, or a test's own).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hpcrender.config import Job, Manifest, Mode, runs_synchronous_throughout
from hpcrender.errors import DoesNotFit, HpcrenderError
from hpcrender.gigapixel.plan import gigapixel_plan
from hpcrender.parallel.bands import (
    Band, expected_bytes, gathered_keys_values, image_bands, is_flux_config, memory_estimate, step_macs, transformer_step_bytes,
)
from hpcrender.parallel.layout import check_layout
from hpcrender.parallel.pipeline import (
    default_text_tokens, kv_buffer_bytes, output_channels, pipeline_layout, pipeline_patches, stage_parameters,
)
from hpcrender.parallel.plan import unet_activation_bytes, unet_compute, unet_layers
from hpcrender.render.options import PIPEFUSION_UNET, check_model_options, model_options_key
from hpcrender.run.schedule import array_shard, assign_jobs, job_cost, queue_order, rank_groups
from hpcrender.sweeps import sweep_words

# Prompt tokens a step's cross-attention reads: CLIP's context length, to which SD and SDXL pipelines pad.
TEXT_TOKENS = 77
# Multiply-accumulates per second of one CPU core running a UNet step in float32: sdxl-mini at 512x512 with CFG
# (batch 2) is 109.7 GMAC per step by this plan's count and took 2.36 s on one process with one thread
# (BENCHMARKS.md, "Cost per step"; 2-core x86 VM). `hpcrender plan --rate` replaces it with the user's own rate.
CPU_CORE_MACS_PER_S = 46.5e9


@dataclass(frozen=True)
class RankCost:
    """What one rank of a group costs per steady denoiser call of a job (a step, but for Heun's two calls a step):
    multiply-accumulates (band-parallel runs keep the text's cross-attention keys and values from the first step),
    bytes sent, and memory (displaced Heun: a set of exchange buffers per call)."""

    rank: int
    macs: int
    bytes_sent: int
    memory: object  # bands.MemoryEstimate


@dataclass(frozen=True)
class JobPlan:
    """One job's layout. bands is () when the image is not cut (mode none, one rank) or the model's shapes could not
    be read before loading (costs is None then, and the pipeline finds the bands from the loaded model)."""

    index: int
    job: Job
    size: int                # ranks in the group that renders it
    patch_ranks: int         # ranks that share its bands (half the group with split_cfg)
    bands: tuple             # latent row bands (parallel.bands.Band)
    costs: tuple[RankCost, ...] | None
    estimate: float          # relative cost (schedule.job_cost), which orders the queue
    gigapixel: object = None  # gigapixel.plan.GigaPlan of a gigapixel job: its levels and tiles
    sent: tuple[int, ...] | None = None  # bytes each rank of the group sends in a steady step
    base_costs: tuple[RankCost, ...] | None = None  # a gigapixel job's base render (costs: one of its tiles)
    sweep: object = None  # config.Sweep of a sweep (job: its template): its units are shards, each sample as `job`
    pipeline: object = None  # pipefusion: its stages and patches (parallel.pipeline.PipelineLayout)
    parameter_split: tuple | None = None  # pipefusion: the transformer's parameter counts (stage weights)
    batch: int = 1  # images per denoiser call (2 with classifier-free guidance unless split_cfg)

    @property
    def banded(self) -> bool:
        return self.job.parallel.mode.banded and self.patch_ranks > 1

    @property
    def pipelined(self) -> bool:
        return self.job.parallel.mode is Mode.PIPEFUSION and self.patch_ranks > 1

    @property
    def steps_run(self) -> int:
        return self.job.steps - self.job.first_step

    @property
    def synchronous_throughout(self) -> bool:
        """A displaced band-parallel or pipefusion job whose warm-up covers every step it runs."""
        return (self.banded or self.pipelined) and runs_synchronous_throughout(self.job.parallel, self.steps_run)

    def seconds(self, macs_per_s: float) -> float | None:
        """Estimated time of the denoising loops at `macs_per_s` per rank (the slowest rank sets it), on one group;
        a gigapixel job's tiles spread over all the groups of its phase. costs are per denoiser call (a Heun step
        makes two, its last one)."""
        if self.costs is None:
            return None
        if self.gigapixel is not None:
            giga = self.gigapixel
            macs = giga.base_calls * max(c.macs for c in self.base_costs) + \
                giga.total_tiles * giga.tile_calls * max(c.macs for c in self.costs)
            return macs / macs_per_s
        return self.job.scheduler.denoiser_calls(self.steps_run) * max(c.macs for c in self.costs) / macs_per_s

    @property
    def store_bytes(self) -> int | None:
        """A gigapixel store's size at most (uncompressed): every level's image and its refined patches."""
        if self.gigapixel is None:
            return None
        total = 0
        for level in self.gigapixel.levels:
            h, w = level.patch_shape
            total += 3 * (level.height * level.width + len(level.tiles) * h * w)
        return total


@dataclass(frozen=True)
class Phase:
    """Jobs rendered by groups of one size; the queue hands them out in `order` (largest estimate first)."""

    size: int
    groups: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]   # job indices


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    phases: tuple[Phase, ...]
    jobs: Mapping[int, JobPlan]

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(self.jobs)


def ranks_per_image(job: Job, world_size: int) -> int:
    """Group size for a job: 1 in mode none, else ranks_per_image (0: the whole world)."""
    if job.parallel.mode is Mode.NONE:
        return 1
    return job.parallel.ranks_per_image or world_size


def selected_jobs(manifest: Manifest, array: tuple[int, int] | None) -> tuple[int, ...]:
    """Indices of the manifest's jobs this run renders (a job array's share, or all)."""
    if array is None:
        return tuple(range(len(manifest.jobs)))
    return array_shard(len(manifest.jobs), array[0], array[1])


def make_run_plan(manifest: Manifest, indices: tuple[int, ...], world_size: int,
                  shapes: Callable[[str], object | None], limit=None) -> RunPlan:
    """The plan for rendering jobs `indices` of `manifest` on `world_size` ranks.

    DoesNotFit lists every job that cannot work: a world that does not divide into its groups, too few latent rows
    for its bands, split_cfg without guidance or an odd group, and with a memory `limit`
    (environment.MemoryLimit) a rank that cannot hold the job's weights, buffers and activations.
    """
    # Jobs by their index; a sweep after them (len(jobs) + its index), as its template: a job array shares its
    # shards, not the sweep.
    entries = {i: manifest.jobs[i] for i in indices}
    sweeps = {len(manifest.jobs) + s: sweep for s, sweep in enumerate(manifest.sweeps)}
    entries.update((key, sweep.template) for key, sweep in sweeps.items())
    by_size: dict[int, list[int]] = {}
    for i, job in entries.items():
        by_size.setdefault(ranks_per_image(job, world_size), []).append(i)
    problems, phases, jobs = [], [], {}
    checked: dict = {}  # model_options_key -> the problem check_model_options found (None: none), for this plan
    for size, members in by_size.items():
        try:
            groups = rank_groups(world_size, size)
        except HpcrenderError as e:
            problems.extend(f"{manifest.path}: {_table(i in sweeps)}[{entries[i].name}]: {e}" for i in members)
            continue
        for i in members:
            job = entries[i]
            try:
                jobs[i] = plan_job(i, job, size, _shape(shapes, job, size), checked, sweeps.get(i))
                need = _largest_need(jobs[i]) if limit is not None else None
                if need is not None and need.total > limit.bytes:
                    raise DoesNotFit(f"does not fit: a rank needs at least {describe_memory(need)} but "
                                     f"{limit.source} is {_size(limit.bytes)}")
            except HpcrenderError as e:
                problems.append(f"{manifest.path}: {_table(i in sweeps)}[{job.name}]: {e}")
        order = queue_order([jobs[i].estimate if i in jobs else 0.0 for i in members])
        phases.append(Phase(size=size, groups=groups, order=tuple(members[k] for k in order)))
    if problems:
        raise DoesNotFit("\n".join(problems))
    return RunPlan(world_size=world_size, phases=tuple(phases), jobs={i: jobs[i] for i in entries})


def _table(sweep: bool) -> str:
    return "sweeps" if sweep else "jobs"


def _shape(shapes: Callable[[str], object | None], job: Job, size: int):
    """The model's shape; a model whose configs cannot be read is refused here only when its bands need them (else
    it is the job's own failure when it is loaded, and the rest of the batch renders)."""
    try:
        return shapes(job.model)
    except HpcrenderError:
        patch = size // (2 if job.parallel.split_cfg else 1)
        if job.parallel.mode is not Mode.NONE and patch > 1:
            raise
        return None


def plan_job(index: int, job: Job, size: int, shape, checked: dict | None = None, sweep=None) -> JobPlan:
    """One job's layout on a group of `size`, from the model's shape (None: not known before loading); `checked`
    remembers the model option checks of a plan's earlier jobs. A sweep is planned from its template, each of its
    samples laid out alike."""
    plan = _plan_job(index, job, size, shape, checked)
    if sweep is None:
        return plan
    if sweep.batch > 1 and plan.patch_ranks > 1 and job.parallel.mode is not Mode.NONE:
        raise DoesNotFit(f"batch = {sweep.batch} renders a batch on one rank: give the sweep ranks_per_image = 1 "
                         f"(or batch = 1 for band-parallel samples on groups of {size})")
    return dataclasses.replace(plan, sweep=sweep, estimate=plan.estimate * sweep.samples)


def _plan_job(index: int, job: Job, size: int, shape, checked: dict | None) -> JobPlan:
    check_layout(size, job.parallel.split_cfg, job.guidance_scale > 1.0)
    _check_model_options(job, checked)
    patch = size // (2 if job.parallel.split_cfg else 1)
    estimate = job_cost(job.width, job.height, job.steps)
    banded = job.parallel.mode.banded and patch > 1
    if job.parallel.mode is Mode.PIPEFUSION and patch > 1:
        return _plan_pipeline(index, job, size, patch, shape, estimate)
    if shape is None:
        if job.gigapixel is not None:
            raise DoesNotFit("a gigapixel job's levels and tiles are planned from its model's configs before "
                             "anything loads: the model must be a builtin, a folder, a file or a hub id in the cache")
        return JobPlan(index, job, size, patch, (), None, estimate)
    if job.gigapixel is not None:  # sides on the model's alignment, a step per tile: refused before loading

        giga = gigapixel_plan(job, shape.facts.vae_scale, shape.facts.alignment)
        base = giga.levels[0]
        base_job = dataclasses.replace(job, width=base.width, height=base.height, gigapixel=None)
        bands = image_bands(base.height, shape.facts.vae_scale, shape.facts.alignment, patch) if banded else ()
        if shape.transformer is not None:
            return JobPlan(index, job, size, patch, bands, None, estimate, giga)
        base_costs = _rank_costs(base_job, size, patch, bands, shape)
        tile_h = max((lv.patch_shape[0] for lv in giga.levels[1:]), default=base.height)
        tile_w = max((lv.patch_shape[1] for lv in giga.levels[1:]), default=base.width)
        tile_job = dataclasses.replace(job, width=tile_w, height=tile_h, gigapixel=None)
        tile_bands = image_bands(tile_h, shape.facts.vae_scale, shape.facts.alignment, patch) if banded else ()
        tile_costs = _rank_costs(tile_job, size, patch, tile_bands, shape)
        return JobPlan(index, job, size, patch, bands, tile_costs, estimate, giga, base_costs=base_costs,
                       sent=tuple(c.bytes_sent for c in tile_costs))
    bands = image_bands(job.height, shape.facts.vae_scale, shape.facts.alignment, patch) if banded else ()
    if shape.transformer is not None:  # bytes from the transformer's config; compute and memory not estimated
        return JobPlan(index, job, size, patch, bands, None, estimate,
                       sent=_transformer_sent(job, size, bands, shape))
    costs = _rank_costs(job, size, patch, bands, shape)
    return JobPlan(index, job, size, patch, bands, costs, estimate, sent=tuple(c.bytes_sent for c in costs))


def _plan_pipeline(index: int, job: Job, size: int, patch: int, shape, estimate: float) -> JobPlan:
    """A pipefusion job: its stages and patches, refused before loading when they cannot work (a UNet, fewer blocks
    than stages, fewer patches than stages or more than token rows). LoRAs are fused before a rank gives back the
    other stages' weights (models.cache loads the model again for other LoRAs)."""
    if shape is None:
        if job.gigapixel is not None:
            raise DoesNotFit("a gigapixel job's levels and tiles are planned from its model's configs before "
                             "anything loads: the model must be a builtin, a folder, a file or a hub id in the cache")
        return JobPlan(index, job, size, patch, (), None, estimate)
    if shape.transformer is None:
        raise DoesNotFit(PIPEFUSION_UNET)
    config = shape.transformer
    text = shape.text_tokens or default_text_tokens(config)
    scale = shape.facts.vae_scale
    giga = None
    if job.gigapixel is None:
        layout = pipeline_layout(config, patch, job.parallel.pipeline_patches, job.height // scale,
                                 job.width // scale, text, output_channels(config))
    else:  # stages balanced at the largest tile for every unit; each unit's patches on its own rows
        giga = gigapixel_plan(job, scale, shape.facts.alignment)
        tile_h, tile_w = giga.tile_shape
        layout = pipeline_layout(config, patch, job.parallel.pipeline_patches, tile_h // scale, tile_w // scale,
                                 text, output_channels(config))
        for height in giga.unit_heights:
            try:
                pipeline_patches(height // scale, layout.align, len(layout.patches))
            except DoesNotFit as e:
                raise DoesNotFit(f"a unit {height} px high: {e}") from None
    guided = job.guidance_scale > 1.0 and not is_flux_config(config)
    batch = 2 if guided and not job.parallel.split_cfg else 1
    element = _element_size(job.dtype.value)
    sent = tuple(layout.step_bytes(rank % patch, batch, element, sync=False) for rank in range(size))
    return JobPlan(index, job, size, patch, (), None, estimate, giga, sent=sent, pipeline=layout,
                   parameter_split=shape.parameter_split, batch=batch)


def _check_model_options(job: Job, checked: dict | None) -> None:
    """check_model_options once per model_options_key in one plan: each check reads the model's configs."""
    if checked is None:
        check_model_options(job)
        return
    key = model_options_key(job)
    if key not in checked:
        try:
            check_model_options(job)
            checked[key] = None
        except HpcrenderError as e:
            checked[key] = (type(e), e.args)
    if checked[key] is not None:
        kind, args = checked[key]
        raise kind(*args)


def _transformer_sent(job: Job, size: int, bands: tuple, shape) -> tuple[int, ...]:
    if not bands or job.parallel.mode not in (Mode.SYNC, Mode.DISPLACED):
        return (0,) * size
    guided = job.guidance_scale > 1.0 and not is_flux_config(shape.transformer)
    batch = 2 if guided and not job.parallel.split_cfg else 1
    return _transformer_sent_of(shape, size, bands, job.width // shape.facts.vae_scale, batch,
                                _element_size(job.dtype.value))


@functools.lru_cache(maxsize=4096)
def _transformer_sent_of(shape, size: int, bands: tuple, width: int, batch: int, element: int) -> tuple[int, ...]:
    """Bytes each rank sends per step; cached by everything they depend on, so that a manifest's many alike jobs
    share one count."""
    return tuple(transformer_step_bytes(shape.transformer, bands, rank % len(bands), width, batch, element)
                 for rank in range(size))


def _rank_costs(job: Job, size: int, patch: int, bands: tuple, shape) -> tuple[RankCost, ...]:
    """RankCost of every rank of the group (split_cfg: both halves alike), from cost_key's fields only."""
    return _cached_costs(*cost_key(job, size, bands, shape))


def cost_key(job: Job, size: int, bands: tuple, shape) -> tuple:
    """All that a job's RankCosts depend on: (shape, size, bands, latent rows, latent width, batch, element size,
    exchanging, buffer sets). Jobs with equal keys have equal costs (prompt, seed, steps and name do not count)."""
    exchanging = bool(bands) and job.parallel.mode in (Mode.SYNC, Mode.DISPLACED)
    rows, width = job.height // shape.facts.vae_scale, job.width // shape.facts.vae_scale
    batch = 2 if job.guidance_scale > 1.0 and not job.parallel.split_cfg else 1
    return (shape, size, tuple(bands), rows, width, batch, _element_size(job.dtype.value), exchanging,
            _buffer_sets(job))


@functools.lru_cache(maxsize=4096)
def _cached_costs(shape, size: int, bands: tuple, rows: int, width: int, batch: int, element: int,
                  exchanging: bool, buffer_sets: int) -> tuple[RankCost, ...]:
    """compute_rank_costs once per distinct key: planning 100,000 alike jobs would otherwise count every layer's
    multiply-accumulates 100,000 times."""
    return compute_rank_costs(shape, size, bands, rows, width, batch, element, exchanging, buffer_sets)


def compute_rank_costs(shape, size: int, bands: tuple, rows: int, width: int, batch: int, element: int,
                       exchanging: bool, buffer_sets: int) -> tuple[RankCost, ...]:
    """RankCost of every rank of a group of `size` (pure; the expensive part of a plan)."""
    whole = bands or (Band(0, rows),)
    layers, compute = _layers(shape, width), _compute(shape, width)
    costs = []
    for rank in range(size):
        band = rank % len(whole)
        own = _band_activations(shape, batch, whole[band].size, width)
        activations = 0
        if own is not None:
            extra = gathered_keys_values(layers, whole, band, batch, element) if exchanging else 0
            activations = own * element // 4 + extra  # the meta model is float32
        memory = memory_estimate(layers, shape.parameters, whole if exchanging else (), batch, element, activations,
                                 buffer_sets=buffer_sets)
        macs = step_macs(compute, whole, band, batch, TEXT_TOKENS, exchanging, text_kv_cached=bool(bands))
        sent = expected_bytes(layers, whole, band, batch, element) if exchanging else 0
        costs.append(RankCost(rank, macs, sent, memory))
    return tuple(costs)


def _buffer_sets(job: Job) -> int:
    """Sets of exchange buffers a rank keeps (parallel.plan.PatchPlan.buffer_sets)."""
    return job.scheduler.calls_per_step if job.parallel.mode is Mode.DISPLACED else 1


def _element_size(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


@functools.lru_cache(maxsize=64)
def _layers(shape, width: int):
    return unet_layers(shape.unet, width)


@functools.lru_cache(maxsize=64)
def _compute(shape, width: int):
    return unet_compute(shape.unet, width)


@functools.lru_cache(maxsize=64)
def _band_activations(shape, batch: int, rows: int, width: int) -> int | None:
    return unet_activation_bytes(shape.unet, batch, rows, width, TEXT_TOKENS)


def _largest_need(plan: JobPlan):
    if plan.costs is None:
        return None
    return max((c.memory for c in plan.costs), key=lambda m: m.total)


def job_memory(job: Job, size: int, shapes: Callable[[str], object | None]):
    """bands.MemoryEstimate of the rank of a group of `size` that needs the most for `job`; None for a model whose
    shapes cannot be read before loading."""
    return _largest_need(plan_job(0, job, size, shapes(job.model)))


# --- words --------------------------------------------------------------------------------------------------------

def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _macs(n: int) -> str:
    return f"{n / 1e12:.2f} TMAC" if n >= 1e12 else f"{n / 1e9:.2f} GMAC"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def describe_memory(need) -> str:
    return (f"{_size(need.total)} (UNet weights {_size(need.weights)}, exchange buffers {_size(need.buffers.total)} "
            f"of which stale keys/values {_size(need.buffers.keys_values)}, activations {_size(need.activations)})")


def describe_costs(costs) -> str:
    """Per rank: multiply-accumulates of a step and activation memory (a group's ranks in order)."""
    return ", ".join(f"rank {c.rank} {_macs(c.macs)} + {_size(c.memory.activations)}" for c in costs)


def tile_rate_seconds(giga, tile_seconds: float, groups: int) -> float:
    """A gigapixel render's time at a measured time per tile on one group: level by level (a level starts when
    the previous one is done), each level's tiles spread over the groups; the base render counts as one tile."""
    return tile_seconds * (1 + sum(-(-len(lv.tiles) // groups) for lv in giga.levels[1:]))


def describe_pipeline(p: JobPlan) -> list[str]:
    """A pipefusion job's stages, patches, bytes per step, weights and kept keys/values per rank, in words."""
    layout, job = p.pipeline, p.job
    element = _element_size(job.dtype.value)
    batch = p.batch
    stages = ", ".join(f"{s.start}:{s.stop}" for s in layout.stages)
    patches = ",".join(f"{b.start}:{b.stop}" for b in layout.patches)
    lines = [f"stages (blocks) {stages} of {len(layout.blocks)}; {len(layout.patches)} patches (latent rows) "
             f"{patches}; warm-up {max(job.parallel.warmup_steps, 1)} step(s) synchronous"]
    sent = ", ".join(_size(b) for b in p.sent[:p.patch_ranks])
    lines.append(f"sends per step, by stage: {sent} (the last: the model's output to the others)")
    if p.parameter_split is not None:
        weights = ", ".join(_size(stage_parameters(p.parameter_split, layout.stages, k) * element)
                            for k in range(len(layout.stages)))
        whole = sum(sum(part) if isinstance(part, tuple) else part for part in p.parameter_split) * element
        kv = ", ".join(_size(kv_buffer_bytes(layout, k, batch, element, job.scheduler.calls_per_step))
                       for k in range(len(layout.stages)))
        lines.append(f"weights by stage: {weights} (the whole model {_size(whole)}); keys/values kept: {kv}")
    if p.synchronous_throughout:
        lines.append(f"the warm-up covers all {p.steps_run} step(s): synchronous throughout")
    return lines


def describe_plan(manifest: Manifest, plan: RunPlan, macs_per_s: float = CPU_CORE_MACS_PER_S,
                  tile_seconds: float | None = None) -> str:
    """`hpcrender plan`: per job its group (as the queue would hand jobs out if the estimates held), bands, bytes
    per step, memory and estimated time at `macs_per_s` per rank; for a gigapixel job also at a measured
    `tile_seconds` per tile on one group, which covers what the MAC count leaves out (VAE, colour fix, I/O)."""
    lines = [f"{manifest.path}: {len(plan.jobs)} job(s) on {plan.world_size} rank(s); estimated times at "
             f"{macs_per_s / 1e9:.0f} GMAC/s per rank"]
    # The words of a RankCost tuple, once per tuple: a manifest's many alike jobs share one (_cached_costs).
    memory_words: dict[int, str] = {}
    cost_words: dict[int, str] = {}
    for phase in plan.phases:
        seconds = [plan.jobs[i].seconds(macs_per_s) for i in phase.order]
        known = [s for s in seconds if s is not None]
        fallback = max(known) if known else 1.0
        shares = assign_jobs([s if s is not None else fallback for s in seconds], len(phase.groups))
        group_of = {phase.order[k]: g for g, share in enumerate(shares) for k in share}
        seconds_of = dict(zip(phase.order, seconds))
        lines.append(f"{len(phase.groups)} group(s) of {phase.size} rank(s), jobs handed out by a work queue "
                     "(predicted groups):")
        for i in phase.order:
            p = plan.jobs[i]
            job, g = p.job, group_of[i]
            ranks = phase.groups[g]
            where = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"{ranks[0]}"
            bands = ",".join(f"{b.start}:{b.stop}" for b in p.bands) if p.bands else "-"
            cfg = " split_cfg" if job.parallel.split_cfg else ""
            steps = f"{job.steps} steps" + (f" from step {job.first_step} (img2img)" if job.init_image else "")
            cut = "" if p.pipeline is not None else f"  latent bands {bands}"
            lines.append(f"  {job.name:<24} group {g} (rank {where})  {job.width}x{job.height}  {steps}  "
                         f"{job.parallel.mode.value}{cfg}{cut}")
            if p.sweep is not None:
                lines.append(f"  {'':<24} sweep of {sweep_words(p.sweep)}: its shards are the queue's units, on "
                             f"every group of {phase.size} rank(s); the estimates below are per sample")
            if p.pipeline is not None:
                lines.extend(f"  {'':<24} {line}" for line in describe_pipeline(p))
                continue
            if p.costs is None:
                if p.sent is not None:
                    lines.append(f"  {'':<24} sends per step: {_size(max(p.sent) * job.scheduler.calls_per_step)} "
                                 "per rank at most (compute and memory are estimated for UNets only)")
                else:
                    lines.append(f"  {'':<24} model shapes not readable before loading (a hub id not in the cache)")
                continue
            need = _largest_need(p)
            sent = max(c.bytes_sent for c in p.costs)
            if p.gigapixel is not None:
                giga = p.gigapixel
                levels = ", ".join(f"{lv.width}x{lv.height} ({len(lv.tiles)} tile{'s' if len(lv.tiles) > 1 else ''})"
                                   for lv in giga.levels)
                seconds = p.seconds(macs_per_s)
                lines.append(f"  {'':<24} gigapixel levels: {levels}")
                lines.append(f"  {'':<24} {giga.total_tiles} tiles of {giga.tile_steps} steps + a base of "
                             f"{giga.base_steps}: {giga.unet_evaluations} UNet evaluations; store at most "
                             f"{_size(p.store_bytes)} uncompressed")
                lines.append(f"  {'':<24} estimated UNet time {_duration(seconds)} on one group, "
                             f"{_duration(seconds / len(phase.groups))} with the tiles on all {len(phase.groups)} "
                             f"group(s); a tile sends {_size(sent)} per step per rank at most")
                if tile_seconds is not None:
                    lines.append(f"  {'':<24} at {tile_seconds:g} s per tile (measured): "
                                 f"{_duration(tile_rate_seconds(giga, tile_seconds, 1))} on one group, "
                                 f"{_duration(tile_rate_seconds(giga, tile_seconds, len(phase.groups)))} on all "
                                 f"{len(phase.groups)} group(s), composition between levels not included")
                lines.append(f"  {'':<24} memory per rank for a tile: at least {describe_memory(need)}")
                continue
            calls = job.scheduler.calls_per_step
            lines.append(f"  {'':<24} sends per step: {_size(sent * calls)} per rank at most; estimated "
                         f"{_duration(seconds_of[i])} for {p.steps_run} steps"
                         + (f" ({job.scheduler.denoiser_calls(p.steps_run)} UNet calls)" if calls > 1 else ""))
            if p.synchronous_throughout:
                lines.append(f"  {'':<24} displaced, but the warm-up covers all {p.steps_run} step(s): "
                             "synchronous throughout")
            if id(p.costs) not in memory_words:
                memory_words[id(p.costs)] = describe_memory(need)
                cost_words[id(p.costs)] = describe_costs(p.costs)
            lines.append(f"  {'':<24} memory per rank: at least {memory_words[id(p.costs)]}")
            per = "UNet call" if calls > 1 else "step"
            lines.append(f"  {'':<24} per {per}, compute + activations: {cost_words[id(p.costs)]}")
    return "\n".join(lines)
