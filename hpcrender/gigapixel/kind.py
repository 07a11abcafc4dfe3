"""The gigapixel job kind: levels of tiles handed out by the work queue to every group of the phase.

Round r of a phase renders level r of every gigapixel job in it (round 0: the base render, beside the phase's
ordinary jobs); a level starts when the previous one is composed. World rank 0 - the first rank of group 0 in every
phase - is the one writer of every gigapixel store: the other groups' first ranks send it their finished patches over
MPI (on a communicator of their own, so the order of one sender's messages is kept), and it writes each one, flushed,
between its own units and at the end of the round. Then the groups' first ranks compose the level, a share of its
rows each (compose.share_rows), and send the composed tiles to the writer the same way; the next round reads the
level. A kill of any rank loses at most the patches and tiles in flight; the same command resumes from the store's
done-bitmaps.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hpcrender.config import Job
from hpcrender.errors import HpcrenderError
from hpcrender.gigapixel.compose import compose_level, compose_rows, level_seams, share_rows
from hpcrender.gigapixel.job import GigaJobOutcome, gigapixel_meta, job_meta, open_store
from hpcrender.gigapixel.plan import TilePatch, TileUnit, preview_level
from hpcrender.gigapixel.render import GigaResult, pipeline_stages, plan_for, render_base, render_tile
from hpcrender.output.export import PREVIEW_MAX_SIDE, export_job, image_name
from hpcrender.output.records import JobState, record_job_state, record_progress, write_meta
from hpcrender.output.store import LevelStore
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.parallel.pipefusion import stage_cut
from hpcrender.render.stages import peak_memory
from hpcrender.run.environment import idle_barrier
from hpcrender.run.kinds import FAIL_TOGETHER_S, PROGRESS_RECORD_S, Unit, UnitContext, failure_ends_world
from hpcrender.run.progress import Progress
from hpcrender.run.protocol import Outcome

log = logging.getLogger("hpcrender")
WRITER = 0          # world rank of the stores' writer
_PATCH, _FAILED, _ROUND_DONE, _COMPOSED = 1, 2, 3, 4  # message tags
_POLL_S = 0.005
_COMPOSED_IN_FLIGHT = 4  # composed tiles a composer may have on their way to the writer


@dataclass
class _JobState:
    """One gigapixel job of the phase, as this rank sees it (the store and the tallies on the writer only)."""

    index: int
    job: Job
    plan: object                         # gigapixel.plan.GigaPlan
    store: object = None                 # LevelStore open for writing (writer) or reading (other leaders)
    active: bool = True                  # False once done, failed, skipped or refused
    failed: str | None = None
    started: float = 0.0
    tile_seconds: list = field(default_factory=list)
    base_seconds: float = 0.0
    compose_seconds: float = 0.0
    rendered: int = 0
    done_tiles: int = 0
    last_record: float = 0.0
    groups: dict = field(default_factory=dict)   # group -> units it rendered
    peaks: dict = field(default_factory=dict)    # world rank of a group's first rank -> (node, peak bytes)
    composed_by: dict = field(default_factory=dict)  # world rank -> tiles of level images it composed (this run)
    missing: list = field(default_factory=list)  # tiles of the round's level not stored yet
    seams: dict = field(default_factory=dict)
    progress: object = None                      # progress.Progress of this job's tiles, on the writer


class GigapixelKind:
    """Levels of tiles (gigapixel.plan) rendered by every group of a phase through the work queue."""

    def __init__(self, plan, indices: list[int]):
        self.states = {i: _JobState(i, plan.jobs[i].job, plan.jobs[i].gigapixel) for i in indices}
        self.rounds = max((len(s.plan.levels) for s in self.states.values()), default=0)
        self._sends: list = []
        self._dones = 0  # done messages the writer has had in the current stage of a round
        self._composers: list[int] | None = None  # world ranks that compose levels: the groups' first ranks
        self._comm = None
        self.failed_jobs = 0  # jobs the writer found failed (store refused, a tile failed)

    # -- the phase's rounds ------------------------------------------------------------------------------------

    def begin_round(self, r: int, ctx: UnitContext) -> None:
        """Collective over the world: the writer opens the stores (round 0) and tells everyone which tiles of
        level r are still missing; the other leaders (re)open the stores to read level r - 1."""
        world, group = ctx.world, ctx.protocol
        if self._comm is None:
            self._comm = world.comm.Dup()
        writer = world.env.rank == WRITER
        missing = {}
        if writer:
            for s in self.states.values():
                if r == 0:
                    self._open(s, ctx)
                if s.active and r < len(s.plan.levels):
                    missing[s.index] = s.store.missing_patches(r) if not s.store.level_complete(r) else []
        idle_barrier(self._comm)  # the writer may take a while opening stores
        missing, active = self._comm.bcast((missing, {i: s.active for i, s in self.states.items()}), root=WRITER)
        for i, s in self.states.items():
            s.active = active[i]
            s.missing = missing.get(i, [])
        if group.leader and not writer and r > 0:
            for s in self.states.values():
                if s.active and r < len(s.plan.levels):
                    if s.store is None:
                        s.store = LevelStore.read(ctx.options.out / s.job.name / "tiles.h5")
                    s.store.refresh()

    def units(self, job_plan, r: int) -> tuple[Unit, ...]:
        s = self.states[job_plan.index]
        if not s.active or r >= len(s.plan.levels):
            return ()
        return tuple(Unit(s.index, (r, row, col)) for row, col in s.missing)

    def between_units(self, ctx: UnitContext) -> None:
        """The writer stores what has arrived; the others drop the sends that completed."""
        if ctx.world.env.rank == WRITER:
            self._drain(ctx, until_done=0)
        else:
            self._sends = [req for req in self._sends if not req.Test()]

    def end_round(self, r: int, ctx: UnitContext, leaders: int) -> None:
        """Collective over the world: every patch of the round reaches the store, the groups' first ranks compose
        level r of every job whose level is complete (a share of its rows each, sent to the writer), and the writer
        finishes the jobs whose last level it was."""
        world, group = ctx.world, ctx.protocol
        writer = world.env.rank == WRITER
        if self._composers is None:  # the groups' first ranks, the same in every round of the phase
            self._composers = [rank for rank, leader in enumerate(self._comm.allgather(group.leader)) if leader]
        composers = self._composers
        if group.leader and not writer:
            self._wait_sends()
            self._comm.send(None, dest=WRITER, tag=_ROUND_DONE)
        work = {}
        if writer:
            self._drain(ctx, until_done=leaders - 1)
            work = self._compose_work(r, ctx)
        idle_barrier(self._comm)  # the others sleep while the writer stores the last patches
        work = self._comm.bcast(work, root=WRITER)
        if group.leader:
            self._compose_share(r, ctx, work, composers.index(world.env.rank), len(composers))
        if writer:
            for s in self.states.values():
                if s.active and r < len(s.plan.levels):
                    try:
                        self._finish_level(s, r, ctx)
                    except OSError as e:  # seam scores or export on a full disk: the store keeps the tiles
                        self._store_failed(s, ctx, e)
        idle_barrier(self._comm)  # the others sleep while the writer scores and exports

    def _wait_sends(self) -> None:
        from mpi4py import MPI

        while not MPI.Request.Testall(self._sends):
            time.sleep(_POLL_S)
        self._sends = []

    def _compose_work(self, r: int, ctx: UnitContext) -> dict[int, int]:
        """On the writer: {job index: rows of level r} of the jobs whose level r has every patch and is not
        composed yet; a job a group found failed fails here."""
        work = {}
        for s in self.states.values():
            if not s.active or r >= len(s.plan.levels):
                continue
            if s.failed is not None:
                self._fail(s, ctx, s.failed)
            elif not s.store.missing_patches(r) and not s.store.level_complete(r):
                work[s.index] = s.plan.levels[r].rows
        return work

    def _compose_share(self, r: int, ctx: UnitContext, work: dict[int, int], position: int, composers: int) -> None:
        """This composer's rows of each job's level r (compose.share_rows): the writer stores its tiles and, between
        them, those the others send; the others send theirs, then a done message. A job's compose_seconds is the
        writer's time on its share and its share of the wait for the others' last tiles."""
        writer = ctx.world.env.rank == WRITER
        for index, rows in work.items():
            s = self.states[index]
            mine = share_rows(rows, composers, position)
            if not mine or (writer and not s.active):
                continue
            t0 = time.perf_counter()
            try:
                if not writer:
                    if s.store is None:
                        s.store = LevelStore.read(ctx.options.out / s.job.name / "tiles.h5")
                    s.store.refresh()
                for row, col, rgb in compose_rows(s.store, s.plan, r, mine):
                    if writer:
                        s.store.write_level_tile(r, row, col, rgb)
                        s.composed_by[WRITER] = s.composed_by.get(WRITER, 0) + 1
                        self._drain(ctx, until_done=0)
                        if not s.active:
                            break
                    else:
                        self._sends.append(self._comm.isend((index, r, row, col, rgb, ctx.world.env.rank),
                                                            dest=WRITER, tag=_COMPOSED))
                        while len(self._sends) > _COMPOSED_IN_FLIGHT:  # a few tiles' worth of memory at most
                            self._sends = [req for req in self._sends if not req.Test()]
                            time.sleep(_POLL_S)
            except OSError as e:
                if writer:  # the store cannot be written (a full disk): the job fails, its tiles are kept
                    self._store_failed(s, ctx, e)
                else:
                    self._sends.append(self._comm.isend((index, r, -1, -1, f"composing: {e}"), dest=WRITER,
                                                        tag=_FAILED))
            s.compose_seconds += time.perf_counter() - t0
        if writer:
            t0 = time.perf_counter()
            self._drain(ctx, until_done=composers - 1)
            for index in work:  # the wait for the other composers' last tiles, shared by the round's jobs
                self.states[index].compose_seconds += (time.perf_counter() - t0) / len(work)
        else:
            self._wait_sends()
            self._comm.send(None, dest=WRITER, tag=_ROUND_DONE)

    def end_phase(self, ctx: UnitContext, interrupted: bool) -> None:
        """Close the stores; the writer records the jobs a stop left unfinished."""
        for s in self.states.values():
            if ctx.world.env.rank == WRITER and s.active and interrupted:
                record_job_state(ctx.options.out, s.job.name, JobState.PENDING, rank=WRITER)
                if s.progress is not None:
                    s.progress.finish(f"{s.job.name}: stopped; finished tiles are in the store")
            if s.store is not None:
                try:
                    s.store.close()
                except OSError as e:
                    if s.failed is None:
                        raise
                    log.debug("%s: closing the store: %s", s.job.name, e)  # the failure was said once: a full disk
                s.store = None
        if self._comm is not None:
            self._comm.Free()
            self._comm = None

    # -- one unit on this rank's group ---------------------------------------------------------------------------

    def render(self, unit: Unit, job_plan, ctx: UnitContext) -> Outcome:
        s = self.states[unit.job]
        job, group, world = s.job, ctx.protocol, ctx.world
        level, row, col = unit.part
        layout = GroupLayout(size=group.size, rank=group.rank, mode=job.parallel.mode,
                             split_cfg=job.parallel.split_cfg)
        comms = ctx.comms[job.parallel.split_cfg]
        issued = False

        def on_collective() -> None:
            nonlocal issued
            issued = True

        started = time.perf_counter()
        try:
            pipeline = job_plan.pipeline if job_plan is not None else None
            cut = stage_cut(pipeline, layout.patch_rank) if pipeline is not None else None
            model = ctx.models.get(job.model, job.dtype, job.loras, cut=cut)
            pipe, facts = model.pipe, model.facts
            stages = pipeline.stages if pipeline is not None else pipeline_stages(pipe, job, s.plan, layout)
            tile_control = job.gigapixel.controlnet
            controlnets = ctx.models.controlnets([tile_control] if tile_control else [], job.dtype)
            plan = plan_for(facts, job)
            if plan != s.plan:
                raise ValueError("the loaded model's VAE scale or alignment differs from its configs on disk")
            should_stop = lambda: group.stop(ctx.stop.signum is not None)  # noqa: E731 - the group's answer
            if level == 0:
                patch = render_base(pipe, job, plan, layout, comms, world.env.device, should_stop, facts=facts,
                                    stages=stages)
            else:
                read = None
                if group.leader:
                    read = lambda y0, y1, x0, x1: s.store.read_level(level - 1, y0, y1, x0, x1)  # noqa: E731
                patch = render_tile(pipe, job, plan, TileUnit(job.name, level, row, col), read, layout, comms,
                                    world.env.device, should_stop, facts=facts,
                                    controlnet=controlnets[0] if controlnets else None,  # not for the base
                                    stages=stages)
        except Exception as e:  # the job fails; this group goes on with the next unit
            message = f"{type(e).__name__}: {e}".splitlines()[0]
            log.error("%s: level %d tile (%d, %d) failed: %s", job.name, level, row, col, message)
            log.debug("%s", traceback.format_exc())
            alone = layout.size > 1 and not group.fail_together(FAIL_TOGETHER_S)
            if group.leader:
                self._submit(ctx, (unit.job, level, row, col, message), _FAILED)
            if alone:
                world.abort(f"{job.name}: {message} (on this rank only: the rest of its group waits for it in a "
                            "collective, so the run stops here; finished tiles are kept and a rerun resumes)")
            if failure_ends_world(world.env.device, issued):
                world.abort(f"{job.name}: {message} (after the group's first NCCL collective: its communicator may "
                            "be out of step, so the run stops here; finished tiles are kept and a rerun resumes)")
            return Outcome.FAILED
        if patch is None:
            return Outcome.STOPPED
        if group.leader:
            seconds = time.perf_counter() - started
            message = (unit.job, level, row, col, patch.box, patch.pixels, seconds, group.index,
                       (world.env.rank, world.env.node, peak_memory(world.env.device)))
            self._submit(ctx, message, _PATCH)
        return Outcome.DONE

    # -- the writer ----------------------------------------------------------------------------------------------

    def _submit(self, ctx: UnitContext, message, tag: int) -> None:
        if ctx.world.env.rank == WRITER:
            self._receive(ctx, message, tag)
        else:
            self._sends.append(self._comm.isend(message, dest=WRITER, tag=tag))

    def _drain(self, ctx: UnitContext, until_done: int) -> None:
        """Store every message that has arrived; with until_done > 0, wait until that many done messages have come
        in this stage (counted across calls: a composer may be done while the writer still composes), then start
        the count again."""
        from mpi4py import MPI

        status = MPI.Status()
        while True:
            if not self._comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
                if until_done == 0:
                    return
                if self._dones >= until_done:
                    self._dones = 0
                    return
                time.sleep(_POLL_S)  # waiting without spinning: the other groups are still rendering
                continue
            message = self._comm.recv(source=status.Get_source(), tag=status.Get_tag())
            if status.Get_tag() == _ROUND_DONE:
                self._dones += 1
            else:
                self._receive(ctx, message, status.Get_tag())

    def _receive(self, ctx: UnitContext, message, tag: int) -> None:
        s = self.states[message[0]]
        if tag == _COMPOSED:
            _, level, row, col, rgb, rank = message
            if not s.active:
                return  # the job failed on the writer: the tile is dropped
            try:
                s.store.write_level_tile(level, row, col, rgb)
            except OSError as e:
                self._store_failed(s, ctx, e)
                return
            s.composed_by[rank] = s.composed_by.get(rank, 0) + 1
            return
        if tag == _FAILED:
            _, level, row, col, error = message
            if s.failed is None:
                s.failed = f"level {level}: {error}" if row < 0 else f"level {level} tile ({row}, {col}): {error}"
            return
        _, level, row, col, box, pixels, seconds, group, peaks = message
        if not s.active:
            return  # the job failed on the writer (its store could not be written): the patch is dropped
        try:
            s.store.write_patch(level, TileUnit(s.job.name, level, row, col), TilePatch(level, row, col, box, pixels))
        except OSError as e:  # a full disk, say: this job fails, the tiles stored before are kept
            self._store_failed(s, ctx, e)
            return
        if level == 0:
            s.base_seconds = seconds
        else:
            s.tile_seconds.append(seconds)
        s.rendered += 1
        s.done_tiles += 1
        s.groups.setdefault(group, []).append([level, row, col])
        rank, node, peak = peaks
        s.peaks[rank] = (node, max(peak, s.peaks.get(rank, (node, 0))[1]))
        if time.monotonic() - s.last_record >= PROGRESS_RECORD_S:
            self._record(s, ctx)
            s.last_record = time.monotonic()
        s.progress.update(1)

    @staticmethod
    def _record(s: _JobState, ctx: UnitContext, final: bool = False) -> None:
        """What `hpcrender status` shows of the job: tiles done of total per level, and the rate and ETA of this
        run."""
        tiles = [[int(d.sum()), int(d.size)] for d in s.store._done]
        left = sum(total - done for done, total in tiles)
        spent = time.time() - s.started
        rate = s.rendered / spent if s.rendered and spent > 0 else None
        eta = left / rate if rate else None
        extra = {"tiles": tiles} if final else {"tiles": tiles, "tiles_per_s": rate, "eta_s": eta}
        record_progress(ctx.options.out, s.job.name, sum(d for d, _ in tiles), sum(t for _, t in tiles), **extra)

    @staticmethod
    def _total(s: _JobState) -> int:
        return sum(len(level.tiles) for level in s.plan.levels)

    def _open(self, s: _JobState, ctx: UnitContext) -> None:
        """Round 0 on the writer: skip a finished job, else open (or resume) its store and record it running."""
        out = ctx.options.out
        if ctx.options.resume and self._already_done(out, s.job):
            log.info("%s: already done, skipped", s.job.name)
            s.active = False
            return
        s.started = time.time()
        record_job_state(out, s.job.name, JobState.RUNNING, started=s.started, rank=WRITER)
        try:
            s.store = open_store(out / s.job.name, s.job, s.plan, ctx.options.resume)
        except (HpcrenderError, OSError) as e:  # a store for other parameters, or none can be created here
            self._fail(s, ctx, str(e).splitlines()[0])
            return
        s.done_tiles = self._total(s) - sum(len(s.store.missing_patches(k)) for k in range(len(s.plan.levels)))

        s.progress = Progress()  # a job's own counter: its tiles arrive interleaved with other jobs' work
        s.progress.start(s.job.name, self._total(s) - s.done_tiles, unit="tile")

    @staticmethod
    def _already_done(out: Path, job: Job) -> bool:
        path = out / job.name / "tiles.h5"
        if not (path.exists() and (out / job.name / image_name(job.height, job.width)).exists()):
            return False
        try:
            store = LevelStore.read(path)
        except Exception:
            return False
        try:
            return store.params_hash == job.params_hash() and store.level_complete(len(store.levels) - 1)
        finally:
            store.close()

    def _fail(self, s: _JobState, ctx: UnitContext, message: str) -> None:
        """The job fails on the writer: said first (the records below may not be writable on a full disk)."""
        log.error("%s: failed: %s", s.job.name, message)
        (s.progress or ctx.progress).finish(f"{s.job.name}: FAILED: {message}")
        s.active = False
        s.failed = message
        self.failed_jobs += 1
        record_job_state(ctx.options.out, s.job.name, JobState.FAILED, error=message, rank=WRITER,
                         started=s.started or time.time(), finished=time.time())

    def _store_failed(self, s: _JobState, ctx: UnitContext, error: OSError) -> None:
        """The store could not be written (a full disk): close it now, so that nothing is left for HDF5 to write at
        exit; what was flushed before stays readable and a rerun resumes from it."""
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        try:
            s.store.close()
        except (OSError, RuntimeError) as e:
            log.debug("%s: closing the store after a failed write: %s", s.job.name, e)
        s.store = None
        self._fail(s, ctx, message)

    def _finish_level(self, s: _JobState, r: int, ctx: UnitContext) -> None:
        """On the writer after round r: compose level r when all its patches are in, and finish the job after its
        last level (seam scores, exports, meta.json)."""
        if s.failed is not None:
            self._fail(s, ctx, s.failed)
            return
        if s.store.missing_patches(r):
            return  # a stop came: the same command renders the rest
        t0 = time.perf_counter()
        compose_level(s.store, s.plan, r)  # what the composers left (nothing, unless one failed): stored here
        s.compose_seconds += time.perf_counter() - t0
        if r > 0:
            s.seams[r] = level_seams(s.store, s.plan, r)
        if r == len(s.plan.levels) - 1:
            self._finish_job(s, ctx)

    def _finish_job(self, s: _JobState, ctx: UnitContext) -> None:
        out, job, env = ctx.options.out, s.job, ctx.world.env

        for k in range(1, len(s.plan.levels)):
            if k not in s.seams:  # composed by an earlier run
                s.seams[k] = level_seams(s.store, s.plan, k)
        preview = s.store.level(preview_level(s.plan, PREVIEW_MAX_SIDE))
        exported = export_job(s.store.final(), out / job.name, preview_from=preview)
        result = GigaResult(s.plan, tiles_rendered=s.rendered, base_seconds=s.base_seconds,
                            tile_seconds=s.tile_seconds, compose_seconds=s.compose_seconds,
                            seams=dict(s.seams))
        outcome = GigaJobOutcome(result, exported)
        layout = GroupLayout(size=1, rank=0, mode=job.parallel.mode, split_cfg=job.parallel.split_cfg)

        # The writer's own peak covers its composition, seam scores and export too (and is there when an earlier
        # run rendered every tile).
        s.peaks[env.rank] = (env.node, max(peak_memory(env.device), s.peaks.get(env.rank, (env.node, 0))[1]))
        peaks = [{"rank": rank, "node": node, "peak_memory_bytes": peak} for rank, (node, peak) in sorted(s.peaks.items())]
        meta = job_meta(job, outcome, layout, Comms(None, None, tuple(range(env.world_size))), peaks, s.started,
                        env.world_size, env.device)
        meta["layout"]["groups"] = {str(g): units for g, units in sorted(s.groups.items())}
        meta["layout"]["writer"] = WRITER
        meta["layout"]["composed_by"] = {str(rank): n for rank, n in sorted(s.composed_by.items())}
        write_meta(out / job.name, meta)
        self._record(s, ctx, final=True)
        seconds = round(time.time() - s.started, 3)
        record_job_state(out, job.name, JobState.DONE, rank=WRITER, started=s.started, finished=time.time(),
                         seconds=seconds, seam_score=gigapixel_meta(outcome)["seam_score"])
        s.progress.finish(f"{job.name}: done in {seconds:.1f}s, seam score {gigapixel_meta(outcome)['seam_score']}")
        s.active = False
