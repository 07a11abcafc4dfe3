"""The render command: run plan -> work queue over MPI -> job kinds (pipeline + parallel layer) -> store -> records.

Every rank runs this. Rank 0 checks the whole request (the run plan) before any model is loaded; then, phase by
phase (one per group size), each rank group takes the next unit of work from the queue whenever it is free, and a
failed job is recorded without stopping the others.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time

from hpcrender.config import Manifest
from hpcrender.errors import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK
from hpcrender.gigapixel.kind import GigapixelKind
from hpcrender.models.cache import ModelCache
from hpcrender.output.records import StatusMerger, clear_groups, record_group
from hpcrender.parallel.groups import make_comms
from hpcrender.run.image import ImageKind
from hpcrender.run.kinds import PROGRESS_RECORD_S, RenderOptions, UnitContext
from hpcrender.run.plan import JobPlan, RunPlan
from hpcrender.run.progress import Progress, setup_rank_logging
from hpcrender.run.protocol import GroupProtocol, Outcome
from hpcrender.run.queue import WorkQueue
from hpcrender.run.sweep import SweepKind

log = logging.getLogger("hpcrender")


class StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGINT; checked between denoising steps and between units, so that a stop loses neither
    a finished image nor the finished steps of the current one. A second SIGINT stops at once."""

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


def _part(part: tuple) -> str:
    """How a group record names a part of a job: a gigapixel tile as `@level/row/col`."""
    return "@" + "/".join(str(p) for p in part) if part else ""


def kind_of(plan: JobPlan) -> type:
    """The kind (class) that renders a job's plan; the runner makes one of each per phase for the phase's jobs."""
    if plan.sweep is not None:
        return SweepKind
    return GigapixelKind if plan.job.gigapixel is not None else ImageKind


def run_render(world, manifest: Manifest, plan: RunPlan, options: RenderOptions) -> int:
    """Render the plan's jobs; returns the contract's exit code (the same on every rank)."""
    env = world.env
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    setup_rank_logging(out, env.rank, env.node, debug=options.debug,
                       array_task=options.array[0] if options.array is not None else None)
    names = [plan.jobs[i].job.name for i in plan.indices]
    merger = StatusMerger(out, names) if env.rank == 0 else None  # status.json, O(jobs) for the whole run
    if env.rank == 0:
        clear_groups(out)
        merger.flush()
    stop = StopFlag()
    stop.install()
    world.init_torch_distributed()  # collective: the group records above are cleared before any group writes
    models = ModelCache(device=env.device)
    progress = Progress(enabled=env.rank == 0)
    failed = 0
    interrupted = False
    log.info("rank %d/%d on %s (%s, pid %d), device %s, %d threads", env.rank, env.world_size, env.node,
             env.launcher.value, os.getpid(), env.device, env.threads)

    for number, phase in enumerate(plan.phases):
        size = phase.size
        comms = make_comms(world, phase.groups, size, any(plan.jobs[i].job.parallel.split_cfg for i in phase.order))
        g = env.rank // size
        group = GroupProtocol(world.split(g), g, phase.groups[g])
        context = UnitContext(world=world, protocol=group, comms=comms, models=models, progress=progress,
                              options=options, stop=stop)
        members: dict[type, list[int]] = {}
        for i in phase.order:
            members.setdefault(kind_of(plan.jobs[i]), []).append(i)
        kinds = {cls: cls(plan, indices) for cls, indices in members.items()}
        busy, taken = 0.0, []
        # The group's record lists every unit it took: rewritten after each one it would cost O(units^2) in all, so
        # it is written at most every PROGRESS_RECORD_S and when the group takes no more.
        recorded, written = -math.inf, -1
        for r in range(max(k.rounds for k in kinds.values())):
            # A round's units may need the previous round's results (a gigapixel level the one before): each
            # round has its own queue, and every kind agrees on what the round holds before anyone takes.
            for kind in kinds.values():
                kind.begin_round(r, context)
            units = [u for i in phase.order for u in kinds[kind_of(plan.jobs[i])].units(plan.jobs[i], r)]
            queue = WorkQueue(world.comm, units)
            while not interrupted:
                for kind in kinds.values():
                    kind.between_units(context)
                # The group agrees on stopping, so that no rank waits in a collective for a rank that left.
                if group.stop(stop.signum is not None):
                    interrupted = True
                    break
                index = group.take(queue)
                if index is None:
                    break
                unit = units[index]
                job_plan = plan.jobs[unit.job]
                started = time.monotonic()
                outcome = kinds[kind_of(job_plan)].render(unit, job_plan, context)
                if outcome is not Outcome.SKIPPED:
                    busy += time.monotonic() - started
                    taken.append(job_plan.job.name + _part(unit.part))
                failed += outcome is Outcome.FAILED
                interrupted = outcome is Outcome.STOPPED
                if group.leader and time.monotonic() - recorded >= PROGRESS_RECORD_S:
                    record_group(out, number, g, phase.groups[g], size, busy, taken)
                    recorded, written = time.monotonic(), len(taken)
                if env.rank == 0:  # the other groups' jobs show up too: they keep their own state files current
                    merger.update()
            if group.leader and written != len(taken):  # the group's record is whole once it takes no more
                record_group(out, number, g, phase.groups[g], size, busy, taken)
                recorded, written = time.monotonic(), len(taken)
            # Every rank goes through every round of every phase: the world-wide collectives stay matched.
            queue.free()
            for kind in kinds.values():
                kind.end_round(r, context, len(phase.groups))
            interrupted = bool(world.allreduce_max(int(interrupted)))
            if interrupted:
                break
        for kind in kinds.values():
            kind.end_phase(context, interrupted)
            failed += kind.failed_jobs
        group.free()
    world.barrier()
    if env.rank == 0:
        status = merger.flush()
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
