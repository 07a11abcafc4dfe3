"""The image kind: text-to-image or img2img, one unit per job: the whole image on one group, written as tiles into
the job's store, then exported."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import numpy as np

from hpcrender.config import Job, runs_synchronous_throughout
from hpcrender.output.export import export_job, image_name
from hpcrender.output.records import JobState, meta_header, record_job_state, record_progress, write_meta
from hpcrender.output.store import TileStore
from hpcrender.output.tiles import default_tile
from hpcrender.parallel.layout import GroupLayout
from hpcrender.parallel.pipefusion import stage_cut
from hpcrender.render.checkpoint import (
    CheckpointWriter, checkpoint_path, read_checkpoint, remove_checkpoint, write_checkpoint,
)
from hpcrender.render.image import render_image
from hpcrender.render.stages import Between
from hpcrender.run.kinds import (
    FAIL_TOGETHER_S, PROGRESS_RECORD_S, RenderOptions, Unit, UnitContext, failure_ends_world, store_path,
)
from hpcrender.run.protocol import Outcome

log = logging.getLogger("hpcrender")


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
        steps_run = job.steps - (resume.step if resume else job.first_step)
        # A displaced job whose warm-up covers every step it runs says so, on its progress line and in meta.json.
        synchronous = (plan.banded or plan.pipelined) and runs_synchronous_throughout(job.parallel, steps_run)
        note = synchronous_note(job, steps_run) if synchronous else None
        shown = f"{job.name} ({note})" if note else job.name
        if leader:
            progress.start(shown, steps_run)
        if resume is not None:
            log.info("%s: resuming after step %d of %d", job.name, resume.step, job.steps)
        if note:
            log.warning("%s: %s", job.name, note)
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

        # Periodic checkpoints: the leader's clock says when one is due, the group agrees between two steps.
        writer = CheckpointWriter(saved, job.params_hash()) if leader and job.checkpoint_every else None
        if writer is not None and resume is not None:
            writer.step = resume.step  # the file on disk until the first new one: what status names meanwhile
        try:
            model = ctx.models.get(job.model, job.dtype, job.loras, cut=_cut(plan, layout))
            controlnets = ctx.models.controlnets([c.model for c in job.controlnets], job.dtype)
            last_record = time.monotonic()
            last_checkpoint = time.monotonic()
            recorded_step = None  # the periodic checkpoint step the job's state file names

            def on_step(done: int, total: int) -> None:
                nonlocal last_record, recorded_step
                if leader:
                    progress.update(1)
                    saved_step = writer.step if writer is not None else None
                    if time.monotonic() - last_record >= PROGRESS_RECORD_S or saved_step != recorded_step:
                        extra = {} if saved_step is None else {"checkpoint_step": saved_step}
                        record_progress(out, job.name, done, total, **extra)  # what `hpcrender status` shows
                        last_record, recorded_step = time.monotonic(), saved_step
                log.debug("%s: step %d/%d", job.name, done, total)

            def between() -> Between:
                due = writer is not None and not writer.busy and \
                    time.monotonic() - last_checkpoint >= job.checkpoint_every
                stop, checkpoint = group.between_steps(ctx.stop.signum is not None, due)
                return Between.STOP if stop else Between.CHECKPOINT if checkpoint else Between.GO_ON

            def on_checkpoint(checkpoint) -> None:
                nonlocal last_checkpoint
                if writer is not None:
                    if writer.error is not None:
                        log.warning("%s: %s", job.name, writer.error)
                        writer.error = None
                    writer.submit(checkpoint)
                last_checkpoint = time.monotonic()

            periodic = job.checkpoint_every is not None
            result = render_image(model.pipe, job, layout, comms, env.device, on_step=on_step,
                                  should_stop=lambda: group.stop(ctx.stop.signum is not None), resume=resume,
                                  on_collective=on_collective, bands=plan.bands, facts=model.facts,
                                  between=between if periodic else None,
                                  on_checkpoint=on_checkpoint if periodic else None, controlnets=controlnets,
                                  pipeline=plan.pipeline)
            if writer is not None:
                writer.wait()  # the last periodic write lands before the checkpoint is replaced or removed
                if writer.error is not None:
                    log.warning("%s: %s", job.name, writer.error)
            checkpoints = {"checkpoints": writer.written if writer is not None else 0,
                           "checkpoint_hold_seconds": round(result.checkpoint_seconds, 4),
                           "checkpoint_write_seconds": round(writer.seconds, 4) if writer is not None else 0.0}
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
                for key in ("parameter_bytes", "stage_blocks"):  # pipefusion: the rank's blocks and their weights
                    if key in result.exchange:
                        mine[key] = result.exchange[key]
            peaks = group.gather(mine)
            together = False  # what follows is the first rank's alone; the others have gone on to the next unit
            if leader:
                _write_outputs(out, job, result, layout, comms, peaks, options, started, world, group, checkpoints,
                               note)
                remove_checkpoint(saved)
                resumed = f", resumed after step {resume.step}/{job.steps}" if resume is not None else ""
                progress.finish(f"{shown}: done in {time.time() - started:.1f}s{resumed}")
                record_job_state(out, job.name, JobState.DONE, started=started, finished=time.time(),
                                 seconds=round(time.time() - started, 3), **where)
            log.info("%s: done in %.1fs", job.name, time.time() - started)
            return Outcome.DONE
        except Exception as e:  # a job's failure is recorded; the batch goes on
            if writer is not None:
                writer.wait()
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


def _cut(plan, layout: GroupLayout):
    """What a pipefusion render keeps of the model on this rank (models.cache), None for other modes."""
    if plan.pipeline is None or layout.patch_ranks < 2:
        return None
    return stage_cut(plan.pipeline, layout.patch_rank)


def synchronous_note(job: Job, steps_run: int) -> str:
    """What a displaced or pipefusion job whose warm-up covers every step it runs does instead, in words."""
    warmup = max(job.parallel.warmup_steps, 1)  # the first step is always synchronous: nothing stale exists yet
    return (f"{job.parallel.mode.value}, but its warm-up of {warmup} step(s) covers all {steps_run} step(s) run: "
            "synchronous throughout")


def _write_outputs(out: Path, job: Job, result, layout, comms, peaks, options: RenderOptions, started, world, group,
                   checkpoints: dict, note: str | None = None):
    """Stream the image into the job's store, export it, and write meta.json (and the latent when asked)."""
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
    write_meta(job_dir, _meta(job, result, layout, comms, peaks, exported, started, world, group, checkpoints, note))


def _meta(job: Job, result, layout, comms, peaks, exported, started, world, group, checkpoints: dict,
          note: str | None = None) -> dict:
    steps = result.step_seconds
    exchange = dict(result.exchange)
    if exchange:  # every rank's traffic and waits: a slow or overloaded band shows up here
        exchange["per_rank"] = [{"rank": p["rank"], **p["exchange"]} for p in peaks if "exchange" in p]
    stages = {}
    if "stage_blocks" in exchange:  # pipefusion: every rank's blocks, the weights it held, the patches
        stages = {"stages": [p["stage_blocks"] for p in peaks], "patches": exchange.pop("patches"),
                  "parameter_bytes": [p["parameter_bytes"] for p in peaks]}
        for key in ("stage_blocks", "parameter_bytes"):
            exchange.pop(key)
    peaks = [{k: v for k, v in p.items() if k not in ("exchange", "parameter_bytes", "stage_blocks")} for p in peaks]
    return {
        **meta_header(job),
        "layout": {"world_size": world.env.world_size, "group": group.index, "ranks": list(comms.global_ranks),
                   "mode": job.parallel.mode.value, "split_cfg": layout.split_cfg,
                   "warmup_steps": job.parallel.warmup_steps, "groupnorm": job.parallel.groupnorm.value,
                   "halo": job.parallel.halo.value,
                   # displaced with a warm-up over every step run: what ran, and why
                   **({"ran_as": "sync", "note": note} if note else {}),
                   "bands": [[b.start, b.stop] for b in result.bands], **stages,
                   "nodes": sorted({p["node"] for p in peaks}), "device": world.env.device},
        "timings": {"started": started, "finished": time.time(), "seconds": round(time.time() - started, 3),
                    "encode_seconds": round(result.encode_seconds, 4),
                    "first_step": result.first_step,  # img2img: the schedule's steps before it are not run
                    "resumed_after_step": result.resumed_from,  # step_seconds are the steps after it
                    "step_seconds": [round(s, 4) for s in steps],
                    "decode_seconds": round(result.decode_seconds, 4),
                    **checkpoints},  # periodic checkpoints this run wrote, and the thread's time writing them
        "exchange": exchange,
        "peak_memory": peaks,
        "outputs": [p.name for p in exported],
    }
