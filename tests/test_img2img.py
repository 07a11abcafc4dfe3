"""img2img and the pipeline's stages on one process: the schedule cut as diffusers cuts it, the init image as
diffusers reads it, text-to-image and img2img equal to diffusers' own pipelines bit for bit with every sampler, a
stopped render resumed exactly with every sampler, and through the commands: bad img2img and sampler manifests
refused, a checkpoint resumed or ignored."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from hpcrender.config import InitImage, Job, Mode, ParallelConfig, SchedulerName, TimestepSpacing, first_step
from hpcrender.models import load_pipeline
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.render.checkpoint import read_checkpoint, write_checkpoint
from hpcrender.render.image import render_image
from hpcrender.render.latents import WholeStepNoise, initial_noise, load_init_image
from hpcrender.render.samplers import make_scheduler

from clirun import hpcrender, meta_of, status_of, write_manifest

SIZE = (64, 48)  # width, height: not square, so that a transposed image would show
ALONE = (GroupLayout(size=1, rank=0, mode=Mode.NONE), Comms(None, None, (0,)))


@pytest.fixture(scope="module")
def pipes():
    return {name: load_pipeline(f"builtin:{name}") for name in ("tiny-sd", "tiny-sdxl")}


@pytest.fixture(scope="module")
def start_png(tmp_path_factory):
    """A noisy 56 x 40 RGBA PNG: resized to the job's size, its alpha dropped."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "start.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 4), dtype=np.uint8), "RGBA").save(path)
    return path


def job(model: str, init: InitImage | None = None, **kw) -> Job:
    fields = dict(name="a", prompt="a harbor at dawn", width=SIZE[0], height=SIZE[1], seed=7,
                  model=f"builtin:{model}", steps=5, parallel=ParallelConfig(mode=Mode.NONE), init_image=init)
    fields.update(kw)
    return Job(**fields)


# --- the schedule and the image, as diffusers has them ------------------------------------------------------------

def test_first_step_cuts_the_schedule_where_diffusers_img2img_does():
    from diffusers import StableDiffusionImg2ImgPipeline

    scheduler = make_scheduler(SchedulerName.EULER, load_pipeline("builtin:tiny-sd").scheduler.config)
    diffusers_self = types.SimpleNamespace(scheduler=scheduler)
    checked = 0
    for steps in (1, 3, 10, 49, 50):
        scheduler.set_timesteps(steps)
        for strength in (0.01, 0.1, 0.29, 0.3, 1 / 3, 0.5, 0.6, 0.7, 0.99, 1.0):
            kept, left = StableDiffusionImg2ImgPipeline.get_timesteps(diffusers_self, steps, strength, "cpu")
            if left < 1:
                continue  # diffusers would fail: the manifest refuses such a strength
            assert first_step(steps, strength) == steps - left
            assert torch.equal(scheduler.timesteps[first_step(steps, strength):], kept)
            checked += 1
    assert checked > 30


def test_the_init_image_is_read_as_diffusers_image_processor_reads_it(start_png, pipes):
    pixels = load_init_image(str(start_png), *SIZE)
    assert pixels.shape == (1, 3, SIZE[1], SIZE[0]) and pixels.dtype == torch.float32
    resized = Image.open(start_png).convert("RGB").resize(SIZE, resample=Image.Resampling.LANCZOS)
    expected = pipes["tiny-sd"].image_processor.preprocess(resized)
    assert torch.equal(pixels, expected) and pixels.stride() == expected.stride()
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0
    same = load_init_image(str(start_png), 56, 40)  # already the job's size: not resampled
    assert torch.equal(same, 2 * torch.from_numpy(np.asarray(Image.open(start_png).convert("RGB"))
                                                  .astype(np.float32) / 255).permute(2, 0, 1)[None] - 1)


# --- equal to diffusers' own pipelines ----------------------------------------------------------------------------

def test_text_to_image_in_mode_none_equals_diffusers_pipeline_bit_for_bit(pipes):
    for model, scheduler in (("tiny-sd", SchedulerName.EULER), ("tiny-sdxl", SchedulerName.DPMPP)):
        pipe, render = pipes[model], job(model, scheduler=scheduler, negative_prompt="fog")
        ours = render_image(pipe, render, *ALONE, "cpu")
        own = pipe.scheduler
        pipe.scheduler = make_scheduler(scheduler, own.config)  # diffusers' loop with the job's sampler
        pipe.set_progress_bar_config(disable=True)
        try:
            theirs = pipe(render.prompt, negative_prompt=render.negative_prompt, num_inference_steps=render.steps,
                          height=render.height, width=render.width, guidance_scale=render.guidance_scale,
                          latents=initial_noise(render, 4, 8), output_type="latent").images
        finally:
            pipe.scheduler = own
        assert torch.equal(torch.from_numpy(ours.latent), theirs[0]), model
        image = pipe.image_processor.postprocess(pipe.vae.decode(theirs / pipe.vae.config.scaling_factor,
                                                                 return_dict=False)[0], output_type="np")
        assert np.array_equal(ours.image, (image[0] * 255).round().astype(np.uint8)), model


def diffusers_text_to_image(pipe, render: Job) -> torch.Tensor:
    """diffusers' own text-to-image call with the job's sampler and a CPU generator seeded by its seed, no latents:
    the start noise and then a stochastic sampler's noise of every step come from that generator."""
    own = pipe.scheduler
    pipe.scheduler = make_scheduler(render.scheduler, own.config, render.timestep_spacing)
    pipe.set_progress_bar_config(disable=True)
    try:
        return pipe(render.prompt, negative_prompt=render.negative_prompt, num_inference_steps=render.steps,
                    height=render.height, width=render.width, guidance_scale=render.guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(render.seed), output_type="latent").images
    finally:
        pipe.scheduler = own


SAMPLER_CASES = (
    [("tiny-sd", name, None, 4, 5.0) for name in SchedulerName]
    + [("tiny-sdxl", name, None, 4, 5.0) for name in (SchedulerName.HEUN, SchedulerName.EULER_A,
                                                      SchedulerName.DPMPP_2M_SDE_KARRAS, SchedulerName.UNIPC,
                                                      SchedulerName.LCM)]
    # few-step recipes: SD-Turbo (1 step, trailing, no guidance), SDXL-Lightning (euler, trailing), LCM (no spacing)
    + [("tiny-sd", SchedulerName.EULER, TimestepSpacing.TRAILING, 1, 0.0),
       ("tiny-sdxl", SchedulerName.EULER, TimestepSpacing.TRAILING, 4, 1.0),
       ("tiny-sd", SchedulerName.EULER_A, TimestepSpacing.TRAILING, 2, 0.0),
       ("tiny-sd", SchedulerName.HEUN, TimestepSpacing.LINSPACE, 3, 5.0),
       ("tiny-sdxl", SchedulerName.DPMPP_2M_KARRAS, TimestepSpacing.LEADING, 3, 5.0),
       ("tiny-sd", SchedulerName.LCM, None, 2, 1.0)])


@pytest.mark.parametrize("model, scheduler, spacing, steps, guidance", SAMPLER_CASES,
                         ids=[f"{m}-{n.value}-{s.value if s else 'own'}-{k}" for m, n, s, k, _ in SAMPLER_CASES])
def test_every_sampler_in_mode_none_equals_diffusers_pipeline_with_the_same_generator(pipes, model, scheduler, spacing,
                                                                                     steps, guidance):
    pipe = pipes[model]
    render = job(model, scheduler=scheduler, timestep_spacing=spacing, steps=steps, guidance_scale=guidance,
                 negative_prompt="fog")
    ours = render_image(pipe, render, *ALONE, "cpu")
    assert len(ours.step_seconds) == steps
    assert torch.equal(torch.from_numpy(ours.latent), diffusers_text_to_image(pipe, render)[0])


def test_stochastic_samplers_draw_from_the_job_generator_and_trailing_starts_at_the_last_timestep(pipes):
    pipe = pipes["tiny-sd"]
    for name in SchedulerName:
        if name.stochastic:
            a = render_image(pipe, job("tiny-sd", scheduler=name, steps=3), *ALONE, "cpu").latent
            b = render_image(pipe, job("tiny-sd", scheduler=name, steps=3, seed=8), *ALONE, "cpu").latent
            assert np.abs(a - b).mean() > 1e-3, name
    config = pipe.scheduler.config
    for name in (SchedulerName.EULER, SchedulerName.DDIM, SchedulerName.DPMPP_2M, SchedulerName.UNIPC):
        trailing = make_scheduler(name, config, TimestepSpacing.TRAILING)
        trailing.set_timesteps(1)
        leading = make_scheduler(name, config)
        leading.set_timesteps(1)
        assert int(trailing.timesteps[0]) == 999, name
        if name in (SchedulerName.EULER, SchedulerName.DDIM):  # the config's leading: one step at t = 1, no noise
            assert int(leading.timesteps[0]) == 1, name
    heun = make_scheduler(SchedulerName.HEUN, config)
    heun.set_timesteps(4)
    assert len(heun.timesteps) == SchedulerName.HEUN.denoiser_calls(4) == 7


def test_step_noise_is_drawn_whole_and_cut_to_the_band():
    generator = torch.Generator().manual_seed(5)
    whole = torch.randn((1, 4, 10, 6), generator=torch.Generator().manual_seed(5))
    with WholeStepNoise(generator, (1, 4, 10, 6), slice(3, 7)):
        band = torch.randn((1, 4, 4, 6), generator=generator)
        other = torch.randn((1, 4, 4, 6), generator=torch.Generator().manual_seed(5))  # not the job's: untouched
        with pytest.raises(RuntimeError, match="not its latent band's"):
            torch.randn((1, 4, 10, 6), generator=generator)
    assert torch.equal(band, whole[:, :, 3:7]) and band.is_contiguous()
    assert torch.equal(other, torch.randn((1, 4, 4, 6), generator=torch.Generator().manual_seed(5)))
    with WholeStepNoise(torch.Generator().manual_seed(5), (1, 4, 10, 6), slice(None)) as alone:
        assert torch.equal(torch.randn(1, 4, 10, 6, generator=alone.generator), whole)


def diffusers_img2img(pipe, scheduler):
    """diffusers' img2img pipeline of the same components and sampler. SDXL: no aesthetic score in the time ids
    (requires_aesthetics_score=False, as the base model; the refiner's True would add it) and empty negative
    prompts as zeros, as the text-to-image pipeline builds it."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor",
                                                                    "safety_checker")}
    parts["scheduler"] = make_scheduler(scheduler, pipe.scheduler.config)
    if "text_encoder_2" in parts:
        img2img = StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=False,
                                                   force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        img2img = StableDiffusionImg2ImgPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    return img2img


@pytest.mark.parametrize("model, scheduler, strength", [("tiny-sd", SchedulerName.EULER, 0.6),
                                                        ("tiny-sd", SchedulerName.DDIM, 1.0),
                                                        ("tiny-sdxl", SchedulerName.DPMPP, 0.5),
                                                        ("tiny-sd", SchedulerName.HEUN, 0.6),
                                                        ("tiny-sd", SchedulerName.EULER_A, 0.75),
                                                        ("tiny-sdxl", SchedulerName.DPMPP_2M_SDE, 0.6),
                                                        ("tiny-sdxl", SchedulerName.UNIPC, 0.5),
                                                        ("tiny-sd", SchedulerName.LCM, 0.6)])
def test_img2img_equals_diffusers_img2img_pipeline_bit_for_bit(pipes, start_png, model, scheduler, strength):
    """Both start from the same image, resized by us (diffusers would only round its size to 8 px), and draw the
    latent sample and the noise from one CPU generator seeded by the job's seed, in that order; denoising_start is
    left unset so that the strength cuts the schedule."""
    pipe = pipes[model]
    render = job(model, InitImage(str(start_png), "-", strength), scheduler=scheduler)
    ours = render_image(pipe, render, *ALONE, "cpu")
    assert ours.first_step == first_step(render.steps, strength)
    assert len(ours.step_seconds) == render.steps - ours.first_step
    resized = Image.open(start_png).convert("RGB").resize(SIZE, resample=Image.Resampling.LANCZOS)
    theirs = diffusers_img2img(pipe, scheduler)(
        render.prompt, image=resized, strength=strength, num_inference_steps=render.steps,
        guidance_scale=render.guidance_scale, generator=torch.Generator("cpu").manual_seed(render.seed),
        output_type="latent").images
    assert torch.equal(torch.from_numpy(ours.latent), theirs[0])


def test_the_init_image_and_the_strength_change_the_result(pipes, start_png, tmp_path):
    pipe = pipes["tiny-sd"]
    base = render_image(pipe, job("tiny-sd", InitImage(str(start_png), "-", 0.6)), *ALONE, "cpu")
    other = tmp_path / "other.png"
    Image.open(start_png).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(other)
    flipped = render_image(pipe, job("tiny-sd", InitImage(str(other), "-", 0.6)), *ALONE, "cpu")
    stronger = render_image(pipe, job("tiny-sd", InitImage(str(start_png), "-", 1.0)), *ALONE, "cpu")
    text = render_image(pipe, job("tiny-sd"), *ALONE, "cpu")
    for result in (flipped, stronger, text):
        assert np.abs(result.latent - base.latent).mean() > 1e-3


# --- a stopped img2img render resumes where it stopped --------------------------------------------------------------

@pytest.mark.parametrize("scheduler", [SchedulerName.EULER, SchedulerName.DPMPP])
def test_a_stopped_img2img_render_resumes_from_its_checkpoint_file_bit_for_bit(pipes, start_png, scheduler,
                                                                             tmp_path):
    from hpcrender.render.checkpoint import read_checkpoint, write_checkpoint

    pipe = pipes["tiny-sd"]
    render = job("tiny-sd", InitImage(str(start_png), "-", 0.75), steps=8, scheduler=scheduler)
    whole = render_image(pipe, render, *ALONE, "cpu")
    assert whole.first_step == 2
    done: list[int] = []
    stopped = render_image(pipe, render, *ALONE, "cpu", on_step=lambda i, n: done.append(i),
                           should_stop=lambda: len(done) == 3)
    assert done == [3, 4, 5] and stopped.stopped_at == 5 and stopped.image is None
    assert stopped.checkpoint.step == 5  # an index into the whole schedule, past the strength's first step
    # The latent comes channels-last out of the VAE encoder and stays so; a contiguous copy of it (what the file
    # gives back) would round differently in the UNet's convolutions, a level off in some pixels.
    assert stopped.checkpoint.channels_last[0]
    write_checkpoint(tmp_path / "checkpoint.h5", stopped.checkpoint, "hash")
    back = read_checkpoint(tmp_path / "checkpoint.h5", "hash")
    assert back.latent.flags.c_contiguous and back.channels_last == stopped.checkpoint.channels_last
    resumed = render_image(pipe, render, *ALONE, "cpu", resume=back)
    assert resumed.resumed_from == 5 and len(resumed.step_seconds) == 3
    assert np.array_equal(resumed.latent, whole.latent) and np.array_equal(resumed.image, whole.image)


@pytest.mark.parametrize("scheduler", list(SchedulerName))
def test_every_sampler_resumes_from_its_checkpoint_file_bit_for_bit(pipes, start_png, scheduler, tmp_path):
    """Text-to-image stopped after step 2 of 5 and img2img after step 4 of 6 (from step 2): the file keeps the
    sampler's history, carried tensors and the job generator's state, so the noise of the steps to come is the
    uninterrupted run's."""
    pipe = pipes["tiny-sd"]
    for render, stop in ((job("tiny-sd", steps=5, scheduler=scheduler), 2),
                         (job("tiny-sd", InitImage(str(start_png), "-", 0.7), steps=6, scheduler=scheduler), 2)):
        whole = render_image(pipe, render, *ALONE, "cpu")
        done: list[int] = []
        stopped = render_image(pipe, render, *ALONE, "cpu", on_step=lambda i, n: done.append(i),
                               should_stop=lambda: len(done) == stop)
        assert stopped.image is None and stopped.checkpoint.step == render.first_step + stop
        assert stopped.checkpoint.generator is not None
        write_checkpoint(tmp_path / "checkpoint.h5", stopped.checkpoint, "hash")
        resumed = render_image(pipe, render, *ALONE, "cpu", resume=read_checkpoint(tmp_path / "checkpoint.h5", "hash"))
        assert len(resumed.step_seconds) == render.steps - render.first_step - stop
        assert np.array_equal(resumed.latent, whole.latent), (scheduler, render.init_image is not None)


def test_a_checkpoint_before_the_strengths_first_step_is_refused(pipes, start_png):
    from hpcrender.render.checkpoint import Checkpoint

    render = job("tiny-sd", InitImage(str(start_png), "-", 0.5), steps=8)
    early = Checkpoint(step=3, steps=8, latent=np.zeros((1, 4, 6, 8), np.float32), scalars={}, history=())
    with pytest.raises(ValueError, match="does not fit 8 steps from step 4"):
        render_image(pipes["tiny-sd"], render, *ALONE, "cpu", resume=early)


# --- through the commands -------------------------------------------------------------------------------------------

BAD = """
[defaults]
model = "builtin:tiny-sd"
steps = 4
width = 64
height = 64
[defaults.parallel]
mode = "none"
[[jobs]]
name = "fine"
prompt = "x"
[[jobs]]
name = "missing"
prompt = "x"
init_image = "nowhere.png"
strength = 0.5
[[jobs]]
name = "unreadable"
prompt = "x"
init_image = "notes.png"
strength = 0.5
[[jobs]]
name = "too-strong"
prompt = "x"
init_image = "start.png"
strength = 1.5
[[jobs]]
name = "no-image"
prompt = "x"
strength = 0.5
[[jobs]]
name = "no-strength"
prompt = "x"
init_image = "start.png"
"""


def test_bad_img2img_jobs_exit_2_with_one_line_each_and_nothing_rendered(tmp_path, start_png):
    (tmp_path / "start.png").write_bytes(start_png.read_bytes())
    (tmp_path / "notes.png").write_text("a text file\n")
    manifest = write_manifest(tmp_path / "bad.toml", BAD)
    for command in (("validate", manifest), ("render", manifest, "--out", tmp_path / "out")):
        done = hpcrender(*command)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        expected = [":15: jobs[missing].init_image: no such file: ",
                    ":20: jobs[unreadable].init_image: cannot read ",
                    ":26: jobs[too-strong].strength: must be in (0, 1], got 1.5",
                    ":30: jobs[no-image].strength: needs an init_image",
                    ":34: jobs[no-strength].init_image: needs a strength in (0, 1]"]
        assert len(lines) == len(expected), done.stderr
        for line, fragment in zip(lines, expected):
            assert f"bad.toml{fragment}" in line, done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


BAD_SAMPLERS = """
[defaults]
model = "builtin:tiny-sd"
steps = 4
width = 64
height = 64
[defaults.parallel]
mode = "none"
[[jobs]]
name = "fine"
prompt = "x"
scheduler = "dpmpp"
[[jobs]]
name = "unknown"
prompt = "x"
scheduler = "dpm++"
[[jobs]]
name = "spacing"
prompt = "x"
timestep_spacing = "first"
[[jobs]]
name = "lcm-spaced"
prompt = "x"
scheduler = "lcm"
timestep_spacing = "trailing"
"""

# What only the model's configs rule out: checked before anything loads, one line per job.
BAD_FOR_THE_MODEL = """
[defaults]
steps = 4
width = 64
height = 64
prompt = "x"
[defaults.parallel]
mode = "none"
[[jobs]]
name = "fine"
model = "builtin:tiny-sd3"
scheduler = "heun"
[[jobs]]
name = "unipc-sd3"
model = "builtin:tiny-sd3"
scheduler = "unipc"
[[jobs]]
name = "heun-flux"
model = "builtin:tiny-flux"
scheduler = "heun"
[[jobs]]
name = "spaced-sd3"
model = "builtin:tiny-sd3"
timestep_spacing = "trailing"
[[jobs]]
name = "lcm-long"
model = "builtin:tiny-sd"
scheduler = "lcm"
steps = 60

[[jobs]]
name = "dpmpp-1000"
model = "builtin:tiny-sd"
scheduler = "dpmpp_2m"
steps = 1000

[[jobs]]
name = "dpmpp-1000-trailing"
model = "builtin:tiny-sd"
scheduler = "dpmpp_2m"
timestep_spacing = "trailing"
steps = 1000
"""


def test_bad_sampler_keys_exit_2_with_one_line_each_naming_the_key_and_nothing_rendered(tmp_path):
    manifest = write_manifest(tmp_path / "bad.toml", BAD_SAMPLERS)
    model = write_manifest(tmp_path / "model.toml", BAD_FOR_THE_MODEL)
    for command in (("validate", manifest), ("render", manifest, "--out", tmp_path / "out")):
        done = hpcrender(*command)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        expected = [":16: jobs[unknown].scheduler: must be one of euler, euler_a, heun, ddim, dpmpp_2m, ",
                    ":20: jobs[spacing].timestep_spacing: must be one of leading, trailing, linspace, got 'first'",
                    ":25: jobs[lcm-spaced].timestep_spacing: 'trailing' does not apply to lcm"]
        assert len(lines) == len(expected), done.stderr
        for line, fragment in zip(lines, expected):
            assert f"bad.toml{fragment}" in line, done.stderr
    # (render reads the same run plan before loading: test_dit renders such a manifest on 2 ranks)
    for command in (("validate", model, "--ranks", 1),):
        done = hpcrender(*command)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        expected = ["jobs[unipc-sd3]: scheduler 'unipc' does not apply to a flow-matching model (SD3, Flux): use "
                    "'euler' or 'heun'",
                    "jobs[heun-flux]: scheduler 'heun' does not apply to Flux",
                    "jobs[spaced-sd3]: timestep_spacing 'trailing' does not apply to a flow-matching model",
                    "jobs[lcm-long]: scheduler 'lcm' takes at most 50 steps (its original_inference_steps), got 60",
                    "jobs[dpmpp-1000]: scheduler 'dpmpp_2m' with 'leading' timestep spacing gives all 1000 steps the "
                    "same timestep (diffusers spaces them 1000 // (steps + 1) = 0 apart): use at most 999 steps, or "
                    'timestep_spacing = "trailing"']
        assert len(lines) == len(expected), done.stderr
        for line, fragment in zip(lines, expected):
            assert f"model.toml: {fragment}" in line, done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


REPAINT = """
[defaults]
model = "builtin:tiny-sd"
steps = 8
scheduler = "dpmpp"
[defaults.parallel]
mode = "none"
[[jobs]]
name = "repaint"
prompt = "the same harbor in winter"
width = 64
height = 48
seed = 3
init_image = "sketches/start.png"
strength = 0.75
"""


def test_img2img_render_resumes_a_checkpoint_and_ignores_one_of_another_image(tmp_path, start_png, pipes):
    from hpcrender.render.checkpoint import checkpoint_path
    from hpcrender.manifest import load_manifest

    (tmp_path / "sketches").mkdir()
    (tmp_path / "sketches" / "start.png").write_bytes(start_png.read_bytes())
    manifest = write_manifest(tmp_path / "repaint.toml", REPAINT)
    whole = hpcrender("render", manifest, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    meta = meta_of(tmp_path / "whole", "repaint")
    assert meta["timings"]["first_step"] == 2 and len(meta["timings"]["step_seconds"]) == 6
    assert meta["job"]["init_image"]["strength"] == 0.75

    # A run stopped after step 5 (of the schedule; the third step run), as a signal would leave it: rendered in a
    # process of its own with one thread, as the commands are (this process's state depends on the tests before).
    out = tmp_path / "stopped"
    (out / "repaint").mkdir(parents=True)
    script = f"""
import torch
torch.set_num_threads(1)
from hpcrender.config import Mode
from hpcrender.manifest import load_manifest
from hpcrender.models import load_pipeline
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.render.checkpoint import checkpoint_path, write_checkpoint
from hpcrender.render.image import render_image
job = load_manifest({str(manifest)!r}).jobs[0]
done = []
stopped = render_image(load_pipeline("builtin:tiny-sd"), job, GroupLayout(size=1, rank=0, mode=Mode.NONE),
                       Comms(None, None, (0,)), "cpu", on_step=lambda i, n: done.append(i),
                       should_stop=lambda: len(done) == 3)
write_checkpoint(checkpoint_path({str(out / "repaint")!r}), stopped.checkpoint, job.params_hash())
"""
    made = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert made.returncode == 0, made.stderr[-3000:]
    render = load_manifest(manifest).jobs[0]
    changed = tmp_path / "changed"
    (changed / "repaint").mkdir(parents=True)
    shutil.copy(checkpoint_path(out / "repaint"), checkpoint_path(changed / "repaint"))  # for the second half
    assert "checkpoint" not in status_of(tmp_path / "whole")["jobs"]["repaint"]
    resumed = hpcrender("render", manifest, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    timings = meta_of(out, "repaint")["timings"]
    assert timings["resumed_after_step"] == 5 and len(timings["step_seconds"]) == 3
    assert (out / "repaint" / "image.png").read_bytes() == (tmp_path / "whole" / "repaint" / "image.png").read_bytes()
    assert not checkpoint_path(out / "repaint").exists()

    # The same checkpoint after the init image was changed: another job, rendered from its own start.
    Image.open(start_png).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "sketches" / "start.png")
    again = hpcrender("render", manifest, "--out", changed)
    assert again.returncode == 0, again.stderr
    assert meta_of(changed, "repaint")["timings"]["resumed_after_step"] == 0
    assert meta_of(changed, "repaint")["params_hash"] != render.params_hash()
