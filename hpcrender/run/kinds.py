"""Job kinds: what a unit of work is for each kind of job, and how a rank group renders one into the job's store.

Today's kind is the image (text-to-image or img2img, one unit per job: the whole image, written as tiles into the
store, then exported). A kind only uses the group's protocol (run.protocol) and the context below, so another kind
(gigapixel levels of tiles) sits beside it without touching the protocol, the queue or the runner's loop.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcrender.config import Job
from hpcrender.environment import Backend, torch_backend
from hpcrender.run.protocol import GroupProtocol, Outcome

log = logging.getLogger("hpcrender")
# How long ranks that failed wait for the rest of their group to fail as well before ending the world (a failure
# that every rank meets, such as a model that cannot be loaded, arrives everywhere within this).
FAIL_TOGETHER_S = 20.0
# How often a group's first rank writes its steps done into the job's state file.
PROGRESS_RECORD_S = 5.0


@dataclass(frozen=True)
class Unit:
    """One piece of work the queue hands out: a job, or a part of one (`part`, for kinds that cut jobs up)."""

    job: int          # index into the manifest's jobs
    part: tuple = ()


@dataclass(frozen=True)
class RenderOptions:
    out: Path
    resume: bool = True
    save_latent: bool = False
    array: tuple[int, int] | None = None   # (index, count) of a job array
    debug: bool = False


@dataclass
class UnitContext:
    """What a kind needs to render a unit on this rank's group."""

    world: object
    protocol: GroupProtocol
    comms: dict          # parallel.layout.Comms by split_cfg
    models: object       # models.cache.ModelCache
    progress: object     # progress.Progress
    options: RenderOptions
    stop: object         # StopFlag


def failure_ends_world(device: str, collective_issued: bool) -> bool:
    """Whether a job that failed on every rank of its group must end the run instead of letting the group go on.

    gloo completes each collective on the host, so ranks that all failed are in step again. NCCL's wait() does not
    block the host: once the job's first collective is issued, the failed ranks (out of memory, typically) may have
    queued different numbers of them, and the next job would hang on a communicator out of step."""
    return collective_issued and torch_backend(device) is Backend.NCCL


def store_path(out: Path, job: Job) -> Path:
    return out / job.name / "tiles.h5"


class ImageKind:
    """Text-to-image and img2img: one unit per job, the whole image on one group; the group's first rank writes.

    The hooks of a kind (a phase's rounds: begin_round, between_units, end_round, end_phase) have nothing to do
    here: an image needs no other group's work."""

    rounds = 1
    failed_jobs = 0  # failures found outside a unit's render (a unit's own count in the runner)

    def __init__(self, plan=None, indices=()):
        pass

    def units(self, plan, r: int = 0) -> tuple[Unit, ...]:
        return (Unit(plan.index),) if r == 0 else ()

    def begin_round(self, r: int, ctx) -> None:
        pass

    def between_units(self, ctx) -> None:
        pass

    def end_round(self, r: int, ctx, leaders: int) -> None:
        pass

    def end_phase(self, ctx, interrupted: bool) -> None:
        pass

    def already_done(self, out: Path, job: Job) -> bool:
        """A complete store of the same parameters and its exported image: nothing to render again."""
        from hpcrender.export import image_name
        from hpcrender.store import TileStore

        path = store_path(out, job)
        if not (path.exists() and (out / job.name / image_name(job.height, job.width)).exists()):
            return False
        try:
            store = TileStore.read(path)
        except Exception:
            return False
        try:
            return store.params_hash == job.params_hash() and store.complete()
        finally:
            store.close()

    def render(self, unit: Unit, plan, ctx: UnitContext) -> Outcome:
        """Render the unit's job on this rank's group.

        A failure is the job's alone when every rank of the group fails with it; when only some ranks fail, the
        others wait for them inside a collective, and the failing ranks end the world (see fail_together).
        """
        from hpcrender.checkpoint import checkpoint_path, read_checkpoint, remove_checkpoint, write_checkpoint
        from hpcrender.parallel.layout import GroupLayout
        from hpcrender.pipeline import render_image
        from hpcrender.records import JobState, record_job_state, record_progress

        world, group, options, progress = ctx.world, ctx.protocol, ctx.options, ctx.progress
        env, out, job = world.env, options.out, plan.job
        leader = group.leader
        where = {"rank": env.rank, "node": env.node, "group": group.index, "group_ranks": list(group.ranks)}
        if options.resume and group.skip(self.already_done(out, job) if leader else False):
            log.info("%s: already done, skipped", job.name)
            return Outcome.SKIPPED
        started = time.time()
        saved = checkpoint_path(out / job.name)
        if leader:
            record_job_state(out, job.name, JobState.RUNNING, started=started, **where)
        resume = group.resume(read_checkpoint(saved, job.params_hash()) if leader and options.resume else None)
        if leader:
            progress.start(job.name, job.steps - (resume.step if resume else job.first_step))
        if resume is not None:
            log.info("%s: resuming after step %d of %d", job.name, resume.step, job.steps)
        layout = GroupLayout(size=group.size, rank=group.rank, mode=job.parallel.mode,
                             split_cfg=job.parallel.split_cfg)
        comms = ctx.comms[job.parallel.split_cfg]
        log.info("%s: %dx%d, %d steps, mode %s on %d rank(s), group %d", job.name, job.width, job.height, job.steps,
                 job.parallel.mode.value, layout.size, group.index)
        together = True  # until the group's last collective of the job: the ranks must fail or succeed together
        issued = False   # whether the group's first collective of the job has been issued

        def on_collective() -> None:
            nonlocal issued
            issued = True

        try:
            pipe = ctx.models.get(job.model, job.dtype)
            last_record = time.monotonic()

            def on_step(done: int, total: int) -> None:
                nonlocal last_record
                if leader:
                    progress.update(1)
                    if time.monotonic() - last_record >= PROGRESS_RECORD_S:  # what `hpcrender status` shows
                        record_progress(out, job.name, done, total)
                        last_record = time.monotonic()
                log.debug("%s: step %d/%d", job.name, done, total)

            result = render_image(pipe, job, layout, comms, env.device, on_step=on_step,
                                  should_stop=lambda: group.stop(ctx.stop.signum is not None), resume=resume,
                                  on_collective=on_collective, bands=plan.bands)
            if result.stopped_at is not None:
                together = False  # the checkpoint is gathered: writing it is the first rank's alone
                if leader:
                    write_checkpoint(saved, result.checkpoint, job.params_hash())
                    record_job_state(out, job.name, JobState.PENDING, checkpoint_step=result.stopped_at,
                                     steps=job.steps, **where)
                    progress.finish(f"{job.name}: stopped after step {result.stopped_at}/{job.steps}, "
                                    "checkpoint saved")
                log.warning("%s: stopped after step %d of %d; the checkpoint resumes it", job.name,
                            result.stopped_at, job.steps)
                return Outcome.STOPPED
            mine = {"rank": env.rank, "node": env.node, "peak_memory_bytes": result.peak_memory_bytes}
            if result.exchange:
                mine["exchange"] = {k: result.exchange[k] for k in ("bytes_sent", "wait_seconds")}
            peaks = group.gather(mine)
            together = False  # what follows is the first rank's alone; the others have gone on to the next unit
            if leader:
                _write_outputs(out, job, result, layout, comms, peaks, options, started, world, group)
                remove_checkpoint(saved)
                progress.finish(f"{job.name}: done in {time.time() - started:.1f}s")
                record_job_state(out, job.name, JobState.DONE, started=started, finished=time.time(),
                                 seconds=round(time.time() - started, 3), **where)
            log.info("%s: done in %.1fs", job.name, time.time() - started)
            return Outcome.DONE
        except Exception as e:  # a job's failure is recorded; the batch goes on
            message = f"{type(e).__name__}: {e}".splitlines()[0]
            log.error("%s: failed: %s", job.name, message)
            log.debug("%s", traceback.format_exc())
            alone = together and layout.size > 1 and not group.fail_together(FAIL_TOGETHER_S)
            out_of_step = together and not alone and failure_ends_world(env.device, issued)
            if leader or alone:
                if leader:
                    progress.finish(f"{job.name}: FAILED: {message}")
                record_job_state(out, job.name, JobState.FAILED, error=message, started=started,
                                 finished=time.time(), seconds=round(time.time() - started, 3), **where)
            if options.debug:
                traceback.print_exc()
            if alone:
                world.abort(f"{job.name}: {message} (on this rank only: the rest of its group waits for it in a "
                            "collective, so the run stops here; finished jobs are kept and a rerun resumes)")
            if out_of_step:
                world.abort(f"{job.name}: {message} (after the group's first NCCL collective: its communicator may "
                            "be out of step, so the run stops here; finished jobs are kept and a rerun resumes)")
            return Outcome.FAILED


def kind_of(job: Job) -> type:
    """The kind (class) that renders `job`; the runner makes one of each per phase for the phase's jobs."""
    if job.gigapixel is not None:
        from hpcrender.run.gigapixel import GigapixelKind

        return GigapixelKind
    return ImageKind


def _write_outputs(out: Path, job: Job, result, layout, comms, peaks, options: RenderOptions, started, world, group):
    """Stream the image into the job's store, export it, and write meta.json (and the latent when asked)."""
    from hpcrender.export import export_job
    from hpcrender.records import write_meta
    from hpcrender.store import TileStore
    from hpcrender.tiles import default_tile

    job_dir = out / job.name
    job_dir.mkdir(parents=True, exist_ok=True)
    with TileStore.open(store_path(out, job), height=job.height, width=job.width,
                        tile=default_tile(job.height, job.width), params_hash=job.params_hash(),
                        resume=True) as store:
        store.set_attrs(job=job.to_dict())
        store.write_region(0, 0, result.image)
        exported = export_job(store, job_dir)
    if options.save_latent:
        np.save(job_dir / "latent.npy", result.latent.astype(np.float32))
    write_meta(job_dir, _meta(job, result, layout, comms, peaks, exported, started, world, group))


def _meta(job: Job, result, layout, comms, peaks, exported, started, world, group) -> dict:
    from hpcrender.records import meta_header

    steps = result.step_seconds
    exchange = dict(result.exchange)
    if exchange:  # every rank's traffic and waits: a slow or overloaded band shows up here
        exchange["per_rank"] = [{"rank": p["rank"], **p["exchange"]} for p in peaks if "exchange" in p]
    peaks = [{k: v for k, v in p.items() if k != "exchange"} for p in peaks]
    return {
        **meta_header(job),
        "layout": {"world_size": world.env.world_size, "group": group.index, "ranks": list(comms.global_ranks),
                   "mode": job.parallel.mode.value, "split_cfg": layout.split_cfg,
                   "warmup_steps": job.parallel.warmup_steps, "groupnorm": job.parallel.groupnorm.value,
                   "halo": job.parallel.halo.value,
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
