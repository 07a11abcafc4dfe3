"""Command line: parses arguments once, maps every user error to one line on stderr and the contract's exit code."""

from __future__ import annotations

import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

import click

# Quiet libraries before they are imported: their import-time notices would repeat once per rank.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from hpcrender.config import DPMPP_ALIAS, Lora, Mode, SchedulerName
from hpcrender.errors import EXIT_BAD_INPUT, BadInput, HpcrenderError, ManifestError
from hpcrender.manifest import apply_overrides, load_manifest
from hpcrender.models.lora import LoraFileError, file_sha256, read_lora_keys
from hpcrender.models.shapes import model_shape
from hpcrender.run.environment import World, guarded, max_memory_bytes, memory_limit, rank_memory_limit
from hpcrender.run.kinds import RenderOptions
from hpcrender.run.schedule import slurm_array_index
from hpcrender.sweeps import sweep_words

# What needs torch, diffusers or h5py (the run plan, the runner, measuring, the stores, records and exports) is
# imported inside the commands that use it: `validate` loads none of them, `status` h5py alone (tests/test_imports.py).

MODES = [m.value for m in Mode]


def _fail(err: BaseException, debug: bool) -> int:
    """Print a user error as one line (a manifest's problems one line each); traceback only with --debug."""
    if debug:
        traceback.print_exc()
    lines = err.problems if isinstance(err, ManifestError) else str(err).splitlines() or [type(err).__name__]
    for line in lines:
        click.echo(f"hpcrender: error: {line}", err=True)
    return getattr(err, "exit_code", 1)


def _start_world(debug: bool):
    """The MPI world; a launcher set up wrongly (e.g. srun with the wrong PMI) is a user error, exit 2."""
    try:
        return World.start()
    except HpcrenderError as e:
        sys.exit(_fail(e, debug))


def _default_out(manifest: str) -> Path:
    return Path("out") / Path(manifest).stem


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpcrender")
def cli():
    """hpcrender: batch renderer for diffusion models on HPC clusters."""


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [default: out/<manifest stem>/].")
@click.option("--only", multiple=True, metavar="NAME", help="Render only this job (repeatable).")
@click.option("--mode", type=click.Choice(MODES), help="Override every job's parallel mode.")
@click.option("--ranks-per-image", type=click.IntRange(min=0), help="Ranks that render one image together (0: all).")
@click.option("--warmup-steps", type=click.IntRange(min=0), help="Synchronous steps before stale exchange.")
@click.option("--steps", type=click.IntRange(min=1), help="Override every job's number of steps.")
@click.option("--no-resume", is_flag=True, help="Render again even where a finished store exists.")
@click.option("--save-latent", is_flag=True, help="Also write the final latent as latent.npy.")
@click.option("--array-index", type=click.IntRange(min=0), help="This task's index in a job array (without Slurm).")
@click.option("--array-count", type=click.IntRange(min=1), help="Number of tasks in the job array.")
@click.option("--debug", is_flag=True, help="Tracebacks and debug logs.")
def render(manifest, out, only, mode, ranks_per_image, warmup_steps, steps, no_resume, save_latent,
           array_index, array_count, debug):
    """Render the jobs of MANIFEST (under mpiexec/srun the ranks share the work)."""
    from hpcrender.models.adapters import check_targets
    from hpcrender.run.plan import make_run_plan, selected_jobs
    from hpcrender.run.runner import run_render

    world = _start_world(debug)
    with guarded(world, debug):
        request, error = None, None
        if world.env.rank == 0:
            try:
                m = _load(manifest, only=only, mode=mode, ranks_per_image=ranks_per_image,
                          warmup_steps=warmup_steps, steps=steps)
                array = _array(world.env, array_index, array_count)
                plan = make_run_plan(m, selected_jobs(m, array), world.env.world_size, model_shape,
                                     rank_memory_limit(world.env.device, os.environ))
                check_targets(plan.jobs[i].job for i in plan.indices)
                request = (m, array, plan)
            except HpcrenderError as e:
                error = e
        request, error = world.bcast((request, error))
        if error is not None:
            code = _fail(error, debug) if world.env.rank == 0 else error.exit_code
            world.close()
            sys.exit(code)
        m, array, plan = request
        options = RenderOptions(out=Path(out) if out else _default_out(manifest), resume=not no_resume,
                                save_latent=save_latent, array=array, debug=debug)
        code = run_render(world, m, plan, options)
    sys.exit(code)


def _load(manifest, **overrides):
    m = load_manifest(manifest)
    mode = overrides.pop("mode")
    return apply_overrides(m, mode=Mode(mode) if mode else None, **overrides)


def _array(env, index, count) -> tuple[int, int] | None:
    """The job-array share: --array-index/--array-count, else Slurm's array variables, else none."""
    if (index is None) != (count is None):
        raise BadInput("--array-index and --array-count go together")
    if index is not None:
        if index >= count:
            raise BadInput(f"--array-index {index} must be smaller than --array-count {count}")
        return index, count
    return slurm_array_index(env.slurm) if env.slurm is not None else None


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--ranks", type=click.IntRange(min=1), help="Also check that every job fits a world of this size "
              "(group sizes, bands; loads model configs, not weights).")
def validate(manifest, ranks):
    """Check MANIFEST and print its jobs; exit 2 with one line per problem."""
    try:
        m = _load(manifest, only=(), mode=None, ranks_per_image=None, warmup_steps=None, steps=None)
        if ranks is not None:
            from hpcrender.run.plan import make_run_plan, selected_jobs

            make_run_plan(m, selected_jobs(m, None), ranks, model_shape)
    except HpcrenderError as e:
        sys.exit(_fail(e, False))
    for job in m.jobs:
        gp = " gigapixel" if job.gigapixel else ""
        click.echo(f"{job.name}: {job.width}x{job.height}, {job.steps} steps, {job.model}, "
                   f"{job.parallel.mode.value}{gp}")
    for sweep in m.sweeps:
        click.echo(f"{sweep.name}: sweep of {sweep_words(sweep)}")
    sweeps = f", {len(m.sweeps)} sweep(s) of {sum(s.samples for s in m.sweeps)} sample(s)" if m.sweeps else ""
    click.echo(f"{manifest}: {len(m.jobs)} job(s){sweeps}, OK")


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--ranks", type=click.IntRange(min=1), default=1, show_default=True, help="World size to plan for.")
@click.option("--ranks-per-image", type=click.IntRange(min=0), help="Override ranks per image (0: all).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), metavar="GMAC/S",
              help="Multiply-accumulates per second of one rank, for the estimated times "
                   "[default: one CPU core, measured with sdxl-mini].")
@click.option("--tile-seconds", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="A gigapixel tile's measured time on one group (meta.json: gigapixel.tile_seconds_mean; "
                   "hpcrender status: 1 / tiles per s per group), for the estimate of the whole render, VAE included.")
def plan(manifest, ranks, ranks_per_image, rate, tile_seconds):
    """Show how MANIFEST's jobs would be spread over RANKS ranks: groups, bands, bytes, memory and time per job."""
    from hpcrender.run.plan import CPU_CORE_MACS_PER_S, describe_plan, make_run_plan, selected_jobs

    try:
        m = _load(manifest, only=(), mode=None, ranks_per_image=ranks_per_image, warmup_steps=None, steps=None)
        run_plan = make_run_plan(m, selected_jobs(m, None), ranks, model_shape,
                                 memory_limit("cpu", None, max_memory_bytes(os.environ)))
        click.echo(describe_plan(m, run_plan, rate * 1e9 if rate else CPU_CORE_MACS_PER_S, tile_seconds))
    except HpcrenderError as e:
        sys.exit(_fail(e, False))


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--only", "names", required=True, multiple=True, metavar="NAME",
              help="A job to verify (repeatable: each in turn, in one launch).")
@click.option("--mode", "modes", multiple=True, type=click.Choice([m.value for m in Mode if m is not Mode.NONE]),
              help="Parallel mode to check (repeatable; default: each job's own).")
@click.option("--debug", is_flag=True)
def verify(manifest, names, modes, debug):
    """Render jobs single-device and on all ranks; print latent error, PSNR and SSIM per job and mode."""
    from hpcrender.measure.verify import run_verify
    from hpcrender.models.adapters import check_targets

    world = _start_world(debug)
    with guarded(world, debug):
        jobs, error = None, None
        if world.env.rank == 0:
            try:
                from hpcrender.run.plan import make_run_plan

                m = _load(manifest, only=names, mode=modes[0] if modes else None, ranks_per_image=0,
                          warmup_steps=None, steps=None)
                make_run_plan(m, tuple(range(len(m.jobs))), world.env.world_size, model_shape)
                check_targets(m.jobs)
                jobs = m.jobs
            except HpcrenderError as e:
                error = e
        jobs, error = world.bcast((jobs, error))
        if error is not None:
            code = _fail(error, debug) if world.env.rank == 0 else error.exit_code
            world.close()
            sys.exit(code)
        code = run_verify(world, jobs, tuple(Mode(m) for m in modes))
    sys.exit(code)


@cli.command()
@click.argument("jobdir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["tiff", "ome-tiff", "png", "dzi"]), default="tiff",
              show_default=True)
@click.option("--out", type=click.Path(),
              help="Output path [default: JOBDIR/image.tif, image.ome.tif, image.png or image.dzi].")
def stitch(jobdir, fmt, out):
    """Export a job's HDF5 store (finished or not) as pyramidal BigTIFF, OME-TIFF, PNG or DeepZoom."""
    from hpcrender.output.export import export_dzi, export_ome_tiff, export_png, export_tiff
    from hpcrender.output.store import TileStore

    path = Path(jobdir) / "tiles.h5"
    try:
        if not path.exists():
            raise BadInput(f"{path}: no tile store here")
        target = Path(out) if out else Path(jobdir) / {"tiff": "image.tif", "ome-tiff": "image.ome.tif",
                                                       "png": "image.png", "dzi": "image.dzi"}[fmt]
        with TileStore.read(path) as store:
            if not store.complete():
                click.echo(f"hpcrender: warning: {len(store.missing())} tile(s) not finished; exported as black",
                           err=True)
            {"tiff": export_tiff, "ome-tiff": export_ome_tiff, "png": export_png,
             "dzi": export_dzi}[fmt](store, target)
        click.echo(str(target))
    except HpcrenderError as e:
        sys.exit(_fail(e, False))


@cli.command()
@click.argument("outdir", type=click.Path())
def status(outdir):
    """Show every job's state in OUTDIR (pending, running, done, failed)."""
    from hpcrender.output.records import format_status, read_status

    try:
        click.echo(format_status(read_status(Path(outdir))))
    except HpcrenderError as e:
        sys.exit(_fail(e, False))


@cli.command()
@click.option("--model", default="builtin:sdxl-mini", show_default=True)
@click.option("--size", default="1024x1024", show_default=True, metavar="WxH")
@click.option("--steps", type=click.IntRange(min=2), default=6, show_default=True)
@click.option("--modes", default=None, help="Comma-separated modes [default: none on 1 rank, sync,displaced on more].")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--pipeline-patches", type=click.IntRange(min=0), default=0, show_default=True,
              help="pipefusion: patches per step (0: as many as ranks).")
@click.option("--scheduler", type=click.Choice([n.value for n in SchedulerName] + [DPMPP_ALIAS]), default="ddim",
              show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw seconds per step and parallel efficiency against ranks as a PNG.")
@click.option("--project", "project", metavar="K,...",
              help="Also project displaced scaling to K ranks (e.g. 2,4,8) from this one-rank launch: the widest "
                   "band computed alone, the exchange at NVLink and InfiniBand bandwidth.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="A LoRA fused into every hpcrender run (repeatable); diffusers' loop runs it unfused and fused.")
@click.option("--controlnet", metavar="REF", help="A ControlNet every run is conditioned on (scale 1), e.g. "
              "builtin:tiny-sd-controlnet; diffusers' row runs its ControlNet pipeline.")
@click.option("--control-image", type=click.Path(dir_okay=False, exists=True),
              help="Its conditioning image [default: an edge map of circles and lines].")
@click.option("--debug", is_flag=True)
def bench(model, size, steps, modes, warmup_steps, pipeline_patches, scheduler, dtype, json_path, plot_path, project,
          loras, controlnet, control_image, debug):
    """Time the denoising steps (UNet with CFG, no VAE): diffusers' own loop with the node's cores, hpcrender on one
    rank, then on all ranks of this launch in each mode; beside the plan's bytes, compute and memory."""
    from hpcrender.measure.bench import BenchRequest, bench_control, run_bench

    from hpcrender.measure.projection import parse_ranks, steps_problem

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        sys.exit(_fail(BadInput(f"--size: expected WxH, got {size!r}"), debug))
    try:
        projected = parse_ranks(project) if project else ()
    except ValueError as e:
        sys.exit(_fail(BadInput(f"--project: {e}"), debug))
    try:
        adapters = tuple(_bench_lora(i, text) for i, text in enumerate(loras))
    except BadInput as e:
        sys.exit(_fail(e, debug))
    problem = steps_problem(steps, warmup_steps) if projected else None
    if problem:
        sys.exit(_fail(BadInput(f"--project: {problem}"), debug))
    world = _start_world(debug)
    with guarded(world, debug):
        if projected and world.env.world_size > 1:
            if world.env.rank == 0:
                _fail(BadInput(f"--project runs in a launch of one rank (it renders each band alone), got "
                               f"{world.env.world_size}"), debug)
            sys.exit(EXIT_BAD_INPUT)
        try:
            wanted = [Mode(m.strip()) for m in modes.split(",")] if modes else None
        except ValueError as e:
            if world.env.rank == 0:
                _fail(BadInput(f"--modes: {e}"), debug)
            sys.exit(EXIT_BAD_INPUT)
        with tempfile.TemporaryDirectory(prefix="hpcrender-bench-") as folder:
            control = bench_control(controlnet, Path(control_image) if control_image else None, w, h,
                                    Path(folder)) if controlnet else None
            req = BenchRequest(model=model, width=w, height=h, steps=steps, modes=wanted, warmup_steps=warmup_steps,
                               scheduler=scheduler, dtype=dtype, json_path=Path(json_path) if json_path else None,
                               plot_path=Path(plot_path) if plot_path else None, project=projected,
                               loras=adapters, controlnet=control, pipeline_patches=pipeline_patches)
            code = run_bench(world, req)
    sys.exit(code)


def _bench_lora(index: int, text: str) -> Lora:
    """--lora FILE[:SCALE], its file checked as a manifest's `loras` entry is."""
    where = f"--lora {text}"
    path, _, suffix = text.rpartition(":")
    try:
        scale = float(suffix)
    except ValueError:  # no scale given: the colon, if any, is the path's own
        path, scale = text, 1.0
    if not math.isfinite(scale):
        raise BadInput(f"{where}: the scale must be a finite number")
    try:
        read_lora_keys(path)
        return Lora(path=str(Path(path).resolve()), sha256=file_sha256(path), scale=scale, where=where)
    except LoraFileError as e:
        raise BadInput(f"{where}: {e}") from None


def main() -> None:
    """Console entry point; errors outside a command (bad options) are click's usage errors, exit 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_BAD_INPUT)
    except click.exceptions.Abort:
        sys.exit(EXIT_BAD_INPUT)
    except HpcrenderError as e:
        sys.exit(_fail(e, "--debug" in sys.argv))
