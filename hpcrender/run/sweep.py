"""The sweep kind: one unit per shard. The group that takes shard n renders its samples (in batches on one rank, or
one by one on a band-parallel group) and its first rank writes the shard whole, under a temporary name renamed when
complete: no single writer, no file per image, and a rerun skips the shards that exist.

Rank 0 keeps the sweep's own records: OUT/NAME/sweep.json (what the shards were made with, so that shards of other
parameters are not resumed), the sweep's state for `hpcrender status`, and index.jsonl once every shard exists.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from hpcrender.config import Sweep
from hpcrender.output.records import JobState, read_json, record_job_state, state_path, write_json_atomic
from hpcrender.output.shards import done_shards, png_bytes, sample_record, write_index, write_shard
from hpcrender.parallel.layout import GroupLayout
from hpcrender.render.batch import render_batch
from hpcrender.render.image import render_image
from hpcrender.run.kinds import FAIL_TOGETHER_S, Unit, UnitContext, failure_ends_world
from hpcrender.run.protocol import Outcome
from hpcrender.sweeps import (
    INDEX_FILE, SWEEP_FILE, array_shards, batches, sample_jobs, shard_count, shard_name, shard_samples, sweep_hash,
)

log = logging.getLogger("hpcrender")


def sweep_folder(out: Path, sweep: Sweep) -> Path:
    return out / sweep.name


def sweep_description(sweep: Sweep, started: float) -> dict:
    """OUT/NAME/sweep.json: what `hpcrender status` counts against, and the hash a rerun must match to resume."""
    return {"name": sweep.name, "params_hash": sweep_hash(sweep), "samples": sweep.samples,
            "shards": shard_count(sweep.samples, sweep.shard_size), "shard_size": sweep.shard_size,
            "batch": sweep.batch, "prompts": sweep.source.shown, "started": started}


class SweepKind:
    """A sweep's shards as units of the work queue; the hooks keep the sweep's records on rank 0."""

    rounds = 1

    def __init__(self, plan, indices=()):
        self._plans = [plan.jobs[i] for i in indices]
        self._refused: dict[str, str] = {}  # sweep -> why its shards are not rendered (written for other params)
        self._failed: set[str] = set()      # sweeps of which a shard failed on this rank's group
        self.failed_jobs = 0  # sweeps refused before a shard was rendered; a failed shard is its unit's outcome

    def units(self, plan, r: int = 0) -> tuple[Unit, ...]:
        if r or plan.job.name in self._refused:
            return ()
        sweep = plan.sweep
        return tuple(Unit(plan.index, (n,)) for n in array_shards(shard_count(sweep.samples, sweep.shard_size),
                                                                    self._array))

    def begin_round(self, r: int, ctx: UnitContext) -> None:
        """Rank 0 checks each sweep's earlier shards against its parameters and writes sweep.json; every rank learns
        which sweeps are refused before the units are listed."""
        self._array = ctx.options.array
        refused = {}
        if ctx.world.env.rank == 0:
            started = time.time()
            for plan in self._plans:
                refused.update(self._prepare(plan.sweep, ctx.options, started))
        self._refused = ctx.world.bcast(refused)
        self.failed_jobs = len(self._refused)

    def _prepare(self, sweep: Sweep, options, started: float) -> dict[str, str]:
        folder = sweep_folder(options.out, sweep)
        before = read_json(folder / SWEEP_FILE)
        wanted = sweep_hash(sweep)
        if options.resume and isinstance(before, dict) and before.get("params_hash") != wanted and \
                done_shards(folder):
            why = (f"{folder}: shards written for other parameters (params hash {before.get('params_hash')}, this "
                   f"sweep's is {wanted}): render with --no-resume to replace them, or give the sweep another name")
            log.error("%s: %s", sweep.name, why)
            record_job_state(options.out, sweep.name, JobState.FAILED, error=why)
            return {sweep.name: why}
        write_json_atomic(folder / SWEEP_FILE, sweep_description(sweep, started))
        record_job_state(options.out, sweep.name, JobState.RUNNING, samples=sweep.samples,
                         shards=shard_count(sweep.samples, sweep.shard_size), shard_size=sweep.shard_size)
        return {}

    def between_units(self, ctx) -> None:
        pass

    def end_round(self, r: int, ctx, leaders: int) -> None:
        pass

    def end_phase(self, ctx: UnitContext, interrupted: bool) -> None:
        """Rank 0: a sweep whose shards all exist is done (and gets its index.jsonl); one of which a shard failed
        is failed; else it waits for the rest (other array tasks, or a rerun)."""
        failed = [plan.sweep.name in self._failed for plan in self._plans]
        failed = [bool(ctx.world.allreduce_max(int(f))) for f in failed]
        if ctx.world.env.rank != 0:
            return
        out = ctx.options.out
        for plan, failure in zip(self._plans, failed):
            sweep = plan.sweep
            if sweep.name in self._refused:
                continue
            folder = sweep_folder(out, sweep)
            shards = shard_count(sweep.samples, sweep.shard_size)
            done = len(done_shards(folder) & set(range(shards)))
            if done == shards:
                for torn in folder.glob(".shard-*.tmp"):  # a killed writer's; no writer is left to finish it
                    torn.unlink(missing_ok=True)
                write_index(folder / INDEX_FILE, index_lines(sweep))
                record_job_state(out, sweep.name, JobState.DONE, samples=sweep.samples, shards=shards,
                                 shard_size=sweep.shard_size)
            elif failure:
                error = (read_json(state_path(out, sweep.name)) or {}).get("error")
                record_job_state(out, sweep.name, JobState.FAILED, error=error or "a shard failed",
                                 samples=sweep.samples, shards=shards, shard_size=sweep.shard_size)
            else:
                record_job_state(out, sweep.name, JobState.PENDING, samples=sweep.samples, shards=shards,
                                 shard_size=sweep.shard_size)

    def render(self, unit: Unit, plan, ctx: UnitContext) -> Outcome:
        """Render shard unit.part[0] of the plan's sweep on this rank's group; its first rank writes it."""
        world, group, options, progress = ctx.world, ctx.protocol, ctx.options, ctx.progress
        env, out, sweep = world.env, options.out, plan.sweep
        n = unit.part[0]
        path = sweep_folder(out, sweep) / shard_name(n)
        leader = group.leader
        label = f"{sweep.name}/{shard_name(n)}"
        if options.resume and group.skip(path.exists() if leader else False):
            log.info("%s: already done, skipped", label)
            return Outcome.SKIPPED
        started = time.time()
        layout = GroupLayout(size=group.size, rank=group.rank, mode=sweep.template.parallel.mode,
                             split_cfg=sweep.template.parallel.split_cfg)
        comms = ctx.comms[sweep.template.parallel.split_cfg]
        together, issued = True, False

        def on_collective() -> None:
            nonlocal issued
            issued = True

        try:
            jobs = sample_jobs(sweep, shard_samples(sweep, n))
            if leader:
                progress.start(label, len(jobs), unit="sample")
            model = ctx.models.get(sweep.template.model, sweep.template.dtype, sweep.template.loras)
            controlnets = ctx.models.controlnets([c.model for c in sweep.template.controlnets], sweep.template.dtype)
            params = {job.name: job.params_hash() for job in jobs} if leader else {}
            written = []
            for batch in batches(jobs, sweep.batch):
                if group.stop(ctx.stop.signum is not None):
                    if leader:
                        progress.finish(f"{label}: stopped; its samples are rendered again by the next run")
                    log.warning("%s: stopped before it was complete; the next run renders it again", label)
                    return Outcome.STOPPED
                if len(batch) == 1:
                    result = render_image(model.pipe, batch[0], layout, comms, env.device, bands=plan.bands,
                                          facts=model.facts, on_collective=on_collective, controlnets=controlnets)
                    images = [result.image]
                else:
                    images = render_batch(model.pipe, model.facts, batch, comms, env.device).images
                if leader:
                    written += [(job.name, png_bytes(image), sample_record(job, params[job.name]))
                                for job, image in zip(batch, images)]
                    progress.update(len(batch))
            together = False  # the shard is the first rank's to write
            if leader:
                write_shard(path, written)
                progress.finish(f"{label}: {len(written)} samples in {time.time() - started:.1f}s")
            log.info("%s: %d samples in %.1fs", label, len(jobs), time.time() - started)
            return Outcome.DONE
        except Exception as e:  # the shard's failure is recorded; the other shards go on
            message = f"{label}: {type(e).__name__}: {e}".splitlines()[0]
            log.error("%s: failed: %s", sweep.name, message)
            log.debug("%s", traceback.format_exc())
            alone = together and group.size > 1 and not group.fail_together(FAIL_TOGETHER_S)
            out_of_step = together and not alone and failure_ends_world(env.device, issued)
            self._failed.add(sweep.name)
            if leader or alone:
                if leader:
                    progress.finish(f"{label}: FAILED: {message}")
                record_job_state(out, sweep.name, JobState.FAILED, error=message, samples=sweep.samples,
                                 shards=shard_count(sweep.samples, sweep.shard_size), shard_size=sweep.shard_size)
            if options.debug:
                traceback.print_exc()
            if alone or out_of_step:
                world.abort(f"{message} (the rest of its group waits for it in a collective, so the run stops here; "
                            "finished shards are kept and a rerun resumes)")
            return Outcome.FAILED


def index_lines(sweep: Sweep):
    """index.jsonl's lines: every sample's key, shard, prompt and seed, shard by shard (one shard's rows at a time)."""
    for n in range(shard_count(sweep.samples, sweep.shard_size)):
        shard = shard_name(n)
        for job in sample_jobs(sweep, shard_samples(sweep, n)):
            yield {"key": job.name, "shard": shard, "prompt": job.prompt, "seed": job.seed}
