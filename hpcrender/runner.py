"""The render command: this rank's jobs -> rank groups over MPI -> pipeline -> HDF5 store -> export -> records.

Every rank runs this. Rank 0 validates the whole request before any model is loaded; groups of ranks then work
through their share of the jobs independently, and a failed job is recorded without stopping the others.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcrender.config import Job, Manifest, Mode
from hpcrender.environment import Backend, torch_backend
from hpcrender.errors import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK, HpcrenderError
from hpcrender.schedule import array_shard, assign_jobs, job_cost, rank_groups

log = logging.getLogger("hpcrender")
# How long ranks that failed wait for the rest of their group to fail as well before ending the world (a failure
# that every rank meets, such as a model that cannot be loaded, arrives everywhere within this).
FAIL_TOGETHER_S = 20.0
# How often a group's first rank writes its steps done into the job's state file.
PROGRESS_RECORD_S = 5.0


@dataclass(frozen=True)
class RenderOptions:
    out: Path
    resume: bool = True
    save_latent: bool = False
    array: tuple[int, int] | None = None   # (index, count) of a job array
    debug: bool = False


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


def phases(manifest: Manifest, indices: tuple[int, ...], world_size: int) -> list[tuple[int, list[int]]]:
    """Jobs grouped by group size, in order of first appearance: one phase per distinct size."""
    out: dict[int, list[int]] = {}
    for i in indices:
        out.setdefault(ranks_per_image(manifest.jobs[i], world_size), []).append(i)
    return list(out.items())


def check_request(manifest: Manifest, indices: tuple[int, ...], world_size: int, limit=None) -> None:
    """Everything that can be known wrong before a model is loaded: group sizes, band fits, split_cfg, and with a
    memory `limit` (environment.MemoryLimit) whether a rank can hold the job's weights and exchange buffers."""
    from hpcrender.models import unet_config_of
    from hpcrender.pipeline import check_layout, check_model_options

    problems = []
    for size, members in phases(manifest, indices, world_size):
        rank_groups(world_size, size)
        for i in members:
            job = manifest.jobs[i]
            try:
                check_layout(size, job.parallel.split_cfg, job.guidance_scale > 1.0)
                check_model_options(job)
                patch = size // (2 if job.parallel.split_cfg else 1)
                config = unet_config_of(job.model) if patch > 1 else None
                if config is not None:  # a hub id not yet cached is checked once loaded
                    from hpcrender.parallel.bands import latent_bands, unet_alignment

                    latent_bands(job.height // 8, unet_alignment(config), patch)
                need = job_memory(job, size) if limit is not None else None
                if need is not None and need.total > limit.bytes:
                    problems.append(f"{manifest.path}: jobs[{job.name}]: does not fit: a rank needs at least "
                                    f"{describe_memory(need)} but {limit.source} is {_size(limit.bytes)}")
            except HpcrenderError as e:
                problems.append(f"{manifest.path}: jobs[{job.name}]: {e}")
    if problems:
        from hpcrender.errors import DoesNotFit
        raise DoesNotFit("\n".join(problems))


@functools.lru_cache(maxsize=4)
def _meta_unet(model: str):
    """The model's UNet on the meta device (shapes, no memory), or None when its shapes cannot be read here (a hub id
    not in the cache; a model that does not load is the job's failure, reported when it is loaded)."""
    import torch
    from diffusers import UNet2DConditionModel

    from hpcrender.models import unet_config_of

    try:
        config = unet_config_of(model)
        if config is None:
            return None
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)
    except Exception:  # noqa: BLE001 - see above
        return None


# Prompt tokens a step's cross-attention reads: CLIP's context length, to which SD and SDXL pipelines pad.
TEXT_TOKENS = 77


@dataclass(frozen=True)
class RankCost:
    """What one rank of a group costs per denoising step of a job, from the UNet's shapes: multiply-accumulates
    (a steady step: band-parallel runs keep the text's cross-attention keys and values from the first) and memory."""

    rank: int
    macs: int
    memory: object  # bands.MemoryEstimate


def job_costs(job: Job, size: int) -> tuple[RankCost, ...] | None:
    """RankCost of every rank of a group of `size` for `job` (split_cfg: both halves alike), before anything is
    loaded; None for a model whose shapes cannot be read here."""
    from hpcrender.parallel.bands import (
        Band, gathered_keys_values, latent_bands, memory_estimate, step_macs, unet_alignment,
    )
    from hpcrender.parallel.plan import unet_compute, unet_layers
    from hpcrender.pipeline import TORCH_DTYPES

    unet = _meta_unet(job.model)
    if unet is None:
        return None
    patch = size // (2 if job.parallel.split_cfg else 1)
    banded = job.parallel.mode is not Mode.NONE and patch > 1
    exchanging = banded and job.parallel.mode in (Mode.SYNC, Mode.DISPLACED)
    rows = job.height // 8
    bands = latent_bands(rows, unet_alignment(unet.config), patch) if banded else (Band(0, rows),)
    batch = 2 if job.guidance_scale > 1.0 and not job.parallel.split_cfg else 1
    element = TORCH_DTYPES[job.dtype].itemsize
    width = job.width // 8
    layers = unet_layers(unet, width)
    compute = unet_compute(unet, width)
    parameters = sum(p.numel() for p in unet.parameters())
    costs = []
    for rank in range(size):
        band = rank % len(bands)
        own = _band_activations(job.model, batch, bands[band].size, width)
        activations = 0
        if own is not None:
            extra = gathered_keys_values(layers, bands, band, batch, element) if exchanging else 0
            activations = own * element // 4 + extra  # the meta model is float32
        memory = memory_estimate(layers, parameters, bands if exchanging else (), batch, element, activations)
        macs = step_macs(compute, bands, band, batch, TEXT_TOKENS, exchanging, text_kv_cached=banded)
        costs.append(RankCost(rank, macs, memory))
    return tuple(costs)


@functools.lru_cache(maxsize=64)
def _band_activations(model: str, batch: int, rows: int, width: int) -> int | None:
    from hpcrender.parallel.plan import unet_activation_bytes

    unet = _meta_unet(model)
    return None if unet is None else unet_activation_bytes(unet, batch, rows, width, TEXT_TOKENS)


def job_memory(job: Job, size: int):
    """bands.MemoryEstimate of the rank of a group of `size` that needs the most for `job`, from the UNet's shapes
    before anything is loaded; None for a model not in the local cache."""
    costs = job_costs(job, size)
    if costs is None:
        return None
    return max((c.memory for c in costs), key=lambda m: m.total)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe_memory(need) -> str:
    return (f"{_size(need.total)} (UNet weights {_size(need.weights)}, exchange buffers {_size(need.buffers.total)} "
            f"of which stale keys/values {_size(need.buffers.keys_values)}, activations {_size(need.activations)})")


def _macs(n: int) -> str:
    return f"{n / 1e12:.2f} TMAC" if n >= 1e12 else f"{n / 1e9:.2f} GMAC"


def describe_costs(costs) -> str:
    """Per rank: multiply-accumulates of a step and activation memory (a group's ranks in order)."""
    return ", ".join(f"rank {c.rank} {_macs(c.macs)} + {_size(c.memory.activations)}" for c in costs)


def failure_ends_world(device: str, collective_issued: bool) -> bool:
    """Whether a job that failed on every rank of its group must end the run instead of letting the group go on.

    gloo completes each collective on the host, so ranks that all failed are in step again. NCCL's wait() does not
    block the host: once the job's first collective is issued, the failed ranks (out of memory, typically) may have
    queued different numbers of them, and the next job would hang on a communicator out of step."""
    return collective_issued and torch_backend(device) is Backend.NCCL


class StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGINT; checked between denoising steps and between jobs, so that a stop loses neither a
    finished image nor the finished steps of the current one. A second SIGINT stops at once."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signum = signum
        log.warning("signal %s received: stopping after the current denoising step", signal.Signals(signum).name)


@dataclass
class _Models:
    """Pipelines loaded by this rank, by (reference, dtype): a manifest's jobs usually share one model."""

    device: str
    cache: dict = field(default_factory=dict)

    def get(self, job: Job):
        import torch

        from hpcrender.models import load_pipeline
        from hpcrender.pipeline import TORCH_DTYPES

        key = (job.model, job.dtype)
        if key not in self.cache:
            self.cache.clear()  # one model at a time: memory, not load time, is the scarce thing
            pipe = load_pipeline(job.model, dtype=TORCH_DTYPES[job.dtype], device=self.device)
            pipe.vae.to(torch.float32)  # fp16 VAEs overflow on decode; the decode is a small part of the time
            self.cache[key] = pipe
        return self.cache[key]


def run_render(world, manifest: Manifest, options: RenderOptions) -> int:
    """Render this rank's share; returns the contract's exit code (the same on every rank)."""
    from hpcrender.pipeline import GroupLayout
    from hpcrender.progress import Progress, setup_rank_logging
    from hpcrender.records import merge_status

    env = world.env
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    setup_rank_logging(out, env.rank, env.node, debug=options.debug,
                       array_task=options.array[0] if options.array is not None else None)
    indices = selected_jobs(manifest, options.array)
    names = [manifest.jobs[i].name for i in indices]
    if env.rank == 0:
        merge_status(out, names)
    stop = StopFlag()
    stop.install()
    world.init_torch_distributed()
    models = _Models(device=env.device)
    progress = Progress(enabled=env.rank == 0)
    failed = 0
    interrupted = False
    log.info("rank %d/%d on %s (%s, pid %d), device %s, %d threads", env.rank, env.world_size, env.node,
             env.launcher.value, os.getpid(), env.device, env.threads)

    for size, members in phases(manifest, indices, env.world_size):
        groups = rank_groups(env.world_size, size)
        comms = _make_groups(world, groups, size, any(manifest.jobs[i].parallel.split_cfg for i in members))
        g = env.rank // size
        # The group's MPI communicator, for its small agreements (stop, skip, resume, records); tensors go through
        # torch.distributed. Ranks are consecutive, so rank r of `agree` is rank r of the group.
        agree = world.split(g)
        shares = assign_jobs([_cost(manifest.jobs[i]) for i in members], len(groups))
        for pos in shares[g]:
            job = manifest.jobs[members[pos]]
            # The group agrees on stopping, so that no rank waits in a collective for a rank that left.
            if _group_any(agree, stop.signum is not None):
                interrupted = True
                break
            layout = GroupLayout(size=size, rank=env.rank % size, mode=job.parallel.mode,
                                 split_cfg=job.parallel.split_cfg)
            outcome = _render_job(world, job, layout, comms[job.parallel.split_cfg], models, progress, options,
                                  stop, agree)
            failed += outcome == "failed"
            if outcome == "stopped":
                interrupted = True
                break
            if env.rank == 0:  # the other ranks' jobs show up too: they keep their own state files current
                merge_status(out, names)
        agree.Free()  # every rank goes through every phase: the world-wide collectives above stay matched
    world.barrier()
    if env.rank == 0:
        status = merge_status(out, names)
        counts = {s: sum(1 for j in status["jobs"].values() if j["state"] == s)
                  for s in ("done", "failed", "pending", "running")}
        print(f"hpcrender: {counts['done']} done, {counts['failed']} failed, "
              f"{counts['pending'] + counts['running']} not finished -> {out}", file=sys.stderr)
    failed = world.allreduce_max(failed)
    interrupted = world.allreduce_max(int(interrupted))
    world.close()
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_JOB_FAILED if failed else EXIT_OK


def _cost(job: Job) -> float:
    return job_cost(job.width, job.height, job.steps)


def _make_groups(world, groups, size: int, split: bool) -> dict:
    """Comms for this rank, keyed by split_cfg; every rank creates every group in the same order."""
    from hpcrender.pipeline import Comms

    rank = world.env.rank
    mine = groups[rank // size]
    if size == 1:
        single = Comms(group=None, patch_group=None, global_ranks=mine)
        return {False: single, True: single}
    handles = world.new_groups(groups)
    whole = handles[rank // size]
    out = {False: Comms(group=whole, patch_group=whole, global_ranks=mine)}
    if split and size % 2 == 0:
        halves = [h for grp in groups for h in (grp[: size // 2], grp[size // 2:])]
        half_handles = world.new_groups(halves)
        h = (rank // size) * 2 + (rank % size) // (size // 2)
        out[True] = Comms(group=whole, patch_group=half_handles[h], global_ranks=mine)
    else:
        out[True] = out[False]
    return out


def _group_any(agree, flag: bool) -> bool:
    """Whether any rank of the group (the MPI communicator `agree`) passed True; over MPI, so that the check
    between denoising steps does not wait behind the group's asynchronous exchanges in torch.distributed."""
    from mpi4py import MPI

    return bool(agree.allreduce(int(flag), op=MPI.MAX))


def _store_path(out: Path, job: Job) -> Path:
    return out / job.name / "tiles.h5"


def _already_done(out: Path, job: Job) -> bool:
    """A complete store of the same parameters and its exported image: nothing to render again."""
    from hpcrender.export import MAX_PNG_PIXELS
    from hpcrender.store import TileStore

    path = _store_path(out, job)
    image = out / job.name / ("image.png" if job.width * job.height <= MAX_PNG_PIXELS else "image.tif")
    if not (path.exists() and image.exists()):
        return False
    try:
        store = TileStore.read(path)
    except Exception:
        return False
    try:
        return store.params_hash == job.params_hash() and store.complete()
    finally:
        store.close()


def _render_job(world, job: Job, layout, comms, models: _Models, progress, options: RenderOptions,
                stop: StopFlag, agree) -> str:
    """Render one job on this rank's group; the group's first rank writes everything.

    Returns "done", "failed" or "stopped" (a signal came during the job: its finished steps are in a checkpoint).
    A failure is the job's alone when every rank of the group fails with it; when only some ranks fail, the others
    wait for them inside a collective, and the failing ranks end the world (see _fail_together).
    """
    from hpcrender.checkpoint import checkpoint_path, read_checkpoint, remove_checkpoint, write_checkpoint
    from hpcrender.pipeline import render_image
    from hpcrender.records import JobState, record_job_state, record_progress

    env = world.env
    out = options.out
    leader = layout.rank == 0
    if options.resume and agree.bcast(_already_done(out, job) if leader else None):
        log.info("%s: already done, skipped", job.name)
        return "done"
    started = time.time()
    saved = checkpoint_path(out / job.name)
    if leader:
        record_job_state(out, job.name, JobState.RUNNING, rank=env.rank, node=env.node, started=started)
    # The first rank reads the checkpoint and hands it to the others: one read, and one answer for the whole group.
    resume = agree.bcast(read_checkpoint(saved, job.params_hash()) if leader and options.resume else None)
    if leader:
        progress.start(job.name, job.steps - (resume.step if resume else job.first_step))
    if resume is not None:
        log.info("%s: resuming after step %d of %d", job.name, resume.step, job.steps)

    def should_stop() -> bool:  # the whole group stops after the same step
        return _group_any(agree, stop.signum is not None)

    log.info("%s: %dx%d, %d steps, mode %s on %d rank(s)", job.name, job.width, job.height, job.steps,
             job.parallel.mode.value, layout.size)
    together = True  # until the group's last collective of the job: the ranks must fail or succeed together
    issued = False   # whether the group's first collective of the job has been issued

    def on_collective() -> None:
        nonlocal issued
        issued = True

    try:
        if job.gigapixel is not None:
            raise NotImplementedError("gigapixel refinement ([jobs.gigapixel]) is not available in this version")
        pipe = models.get(job)

        last_record = time.monotonic()

        def on_step(done: int, total: int) -> None:
            nonlocal last_record
            if leader:
                progress.update(1)
                if time.monotonic() - last_record >= PROGRESS_RECORD_S:  # what `hpcrender status` shows
                    record_progress(out, job.name, done, total)
                    last_record = time.monotonic()
            log.debug("%s: step %d/%d", job.name, done, total)

        result = render_image(pipe, job, layout, comms, env.device, on_step=on_step, should_stop=should_stop,
                              resume=resume, on_collective=on_collective)
        if result.stopped_at is not None:
            together = False  # the checkpoint is gathered: writing it is the first rank's alone
            if leader:
                write_checkpoint(saved, result.checkpoint, job.params_hash())
                record_job_state(out, job.name, JobState.PENDING, rank=env.rank, node=env.node,
                                 checkpoint_step=result.stopped_at, steps=job.steps)
                progress.finish(f"{job.name}: stopped after step {result.stopped_at}/{job.steps}, checkpoint saved")
            log.warning("%s: stopped after step %d of %d; the checkpoint resumes it", job.name, result.stopped_at,
                        job.steps)
            return "stopped"
        mine = {"rank": env.rank, "node": env.node, "peak_memory_bytes": result.peak_memory_bytes}
        if result.exchange:
            mine["exchange"] = {k: result.exchange[k] for k in ("bytes_sent", "wait_seconds")}
        peaks = agree.allgather(mine)
        together = False  # what follows is the first rank's alone; the others have gone on to the next job
        if leader:
            _write_outputs(out, job, result, layout, comms, peaks, options, started, world)
            remove_checkpoint(saved)
            progress.finish(f"{job.name}: done in {time.time() - started:.1f}s")
            record_job_state(out, job.name, JobState.DONE, rank=env.rank, node=env.node, started=started,
                             finished=time.time(), seconds=round(time.time() - started, 3))
        log.info("%s: done in %.1fs", job.name, time.time() - started)
        return "done"
    except Exception as e:  # a job's failure is recorded; the batch goes on
        message = f"{type(e).__name__}: {e}".splitlines()[0]
        log.error("%s: failed: %s", job.name, message)
        log.debug("%s", traceback.format_exc())
        alone = together and layout.size > 1 and not _fail_together(agree, FAIL_TOGETHER_S)
        out_of_step = together and not alone and failure_ends_world(env.device, issued)
        if leader or alone:
            if leader:
                progress.finish(f"{job.name}: FAILED: {message}")
            record_job_state(out, job.name, JobState.FAILED, error=message, rank=env.rank, node=env.node,
                             started=started, finished=time.time(), seconds=round(time.time() - started, 3))
        if options.debug:
            traceback.print_exc()
        if alone:
            world.abort(f"{job.name}: {message} (on this rank only: the rest of its group waits for it in a "
                        "collective, so the run stops here; finished jobs are kept and a rerun resumes)")
        if out_of_step:
            world.abort(f"{job.name}: {message} (after the group's first NCCL collective: its communicator may be "
                        "out of step, so the run stops here; finished jobs are kept and a rerun resumes)")
        return "failed"


def _fail_together(agree, grace_s: float) -> bool:
    """After a failure inside the group's collective work: whether every rank of the group failed too.

    Ranks that failed together all arrive here within moments and go on to their next job in step. A rank that did
    not fail is blocked in a collective that waits for this one and never arrives: after grace_s the failing ranks
    must end the world, or that rank would hang until the collective's timeout and then run out of step.
    """
    request = agree.Ibarrier()
    deadline = time.monotonic() + grace_s
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _write_outputs(out: Path, job: Job, result, layout, comms, peaks, options: RenderOptions, started, world):
    """Stream the image into the job's store, export it, and write meta.json (and the latent when asked)."""
    from hpcrender.export import export_job
    from hpcrender.records import write_meta
    from hpcrender.store import TileStore
    from hpcrender.tiles import default_tile

    job_dir = out / job.name
    job_dir.mkdir(parents=True, exist_ok=True)
    with TileStore.open(_store_path(out, job), height=job.height, width=job.width,
                        tile=default_tile(job.height, job.width), params_hash=job.params_hash(),
                        resume=True) as store:
        store.set_attrs(job=job.to_dict())
        store.write_region(0, 0, result.image)
        exported = export_job(store, job_dir)
    if options.save_latent:
        np.save(job_dir / "latent.npy", result.latent.astype(np.float32))
    write_meta(job_dir, _meta(job, result, layout, comms, peaks, exported, started, world))


def _meta(job: Job, result, layout, comms, peaks, exported, started, world) -> dict:
    import diffusers
    import torch
    import transformers

    import hpcrender

    steps = result.step_seconds
    exchange = dict(result.exchange)
    if exchange:  # every rank's traffic and waits: a slow or overloaded band shows up here
        exchange["per_rank"] = [{"rank": p["rank"], **p["exchange"]} for p in peaks if "exchange" in p]
    peaks = [{k: v for k, v in p.items() if k != "exchange"} for p in peaks]
    return {
        "job": job.to_dict(),
        "params_hash": job.params_hash(),
        "model": job.model,
        "versions": {"hpcrender": hpcrender.__version__, "python": platform.python_version(),
                     "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "layout": {"world_size": world.env.world_size, "ranks": list(comms.global_ranks),
                   "mode": job.parallel.mode.value, "split_cfg": layout.split_cfg,
                   "warmup_steps": job.parallel.warmup_steps, "groupnorm": job.parallel.groupnorm.value,
                   "bands": [[b.start, b.stop] for b in result.bands],
                   "nodes": sorted({p["node"] for p in peaks}), "device": world.env.device},
        "timings": {"started": started, "finished": time.time(), "seconds": round(time.time() - started, 3),
                    "encode_seconds": round(result.encode_seconds, 4),
                    "first_step": result.first_step,  # img2img: the schedule's steps before it are not run
                    "resumed_after_step": result.resumed_from,  # step_seconds are the steps after it
                    "step_seconds": [round(s, 4) for s in steps],
                    "decode_seconds": round(result.decode_seconds, 4)},
        "exchange": exchange,
        "peak_memory": peaks,
        "outputs": [p.name for p in exported],
    }


def describe_plan(manifest: Manifest, world_size: int, limit=None) -> str:
    """`hpcrender plan`: which group renders which job, each job's bands and the memory a rank needs at least, for a
    world of `world_size` (refused like render does when a job does not fit `limit`)."""
    from hpcrender.models import unet_config_of
    from hpcrender.parallel.bands import latent_bands, unet_alignment

    indices = selected_jobs(manifest, None)
    check_request(manifest, indices, world_size, limit)
    lines = [f"{manifest.path}: {len(indices)} job(s) on {world_size} rank(s)"]
    for size, members in phases(manifest, indices, world_size):
        groups = rank_groups(world_size, size)
        shares = assign_jobs([_cost(manifest.jobs[i]) for i in members], len(groups))
        lines.append(f"{len(groups)} group(s) of {size} rank(s):")
        for g, share in enumerate(shares):
            ranks = f"{groups[g][0]}-{groups[g][-1]}" if size > 1 else f"{groups[g][0]}"
            for pos in share:
                job = manifest.jobs[members[pos]]
                patch = size // (2 if job.parallel.split_cfg else 1)
                bands = "-"
                config = unet_config_of(job.model) if patch > 1 else None
                if config is not None:
                    found = latent_bands(job.height // 8, unet_alignment(config), patch)
                    bands = ",".join(f"{b.start}:{b.stop}" for b in found)
                cfg = " split_cfg" if job.parallel.split_cfg else ""
                steps = f"{job.steps} steps" + (f" from step {job.first_step} (img2img)" if job.init_image else "")
                lines.append(f"  {job.name:<24} group {g} (rank {ranks})  {job.width}x{job.height}  "
                             f"{steps}  {job.parallel.mode.value}{cfg}  latent bands {bands}")
                costs = job_costs(job, size)
                if costs is not None:
                    need = max((c.memory for c in costs), key=lambda m: m.total)
                    lines.append(f"  {'':<24} memory per rank: at least {describe_memory(need)}")
                    lines.append(f"  {'':<24} per step, compute + activations: {describe_costs(costs)}")
    return "\n".join(lines)
