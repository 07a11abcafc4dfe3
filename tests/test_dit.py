"""Diffusion transformers (builtin tiny PixArt-Sigma, SD3 and Flux): mode none equals diffusers' own pipelines bit for
bit; on 2 and 3 MPI ranks sync equals one process, displaced comes closer than naive, every rank sends the bytes the
pure count gives and the model comes back bit for bit; layouts and samplers that cannot work are refused before
any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcrender.config import Job, Mode, ParallelConfig, SchedulerName
from hpcrender.errors import BadInput
from hpcrender.models import Family, denoiser_of, family, load_pipeline, scheduler_config_of, unet_config_of
from hpcrender.models import dit
from hpcrender.models.facts import facts_of
from hpcrender.parallel.bands import (
    Band, exchange_buffers, latent_bands, transformer_alignment, transformer_layers, transformer_step_bytes, unet_alignment,
)
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.render.image import render_image
from hpcrender.render.latents import from_latent_space, initial_noise, pack_2x2, unpack_2x2
from hpcrender.render.prompt import t5_tokens
from hpcrender.render.samplers import make_scheduler

from clirun import MPIEXEC, hpcrender, write_manifest

SCRIPTS = Path(__file__).parent / "mpi_scripts"
TINY = ("tiny-pixart", "tiny-sd3", "tiny-flux")
ALONE = (GroupLayout(size=1, rank=0, mode=Mode.NONE), Comms(None, None, (0,)))


@pytest.fixture(scope="module")
def pipes():
    """The tiny builtins, built once for the module, run on one thread (the others are the MPI tests')."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    built = {name: load_pipeline(f"builtin:{name}") for name in TINY}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    yield built
    torch.set_num_threads(threads)


# --- the builtins ---------------------------------------------------------------------------------------------

def test_tiny_transformers_are_the_diffusers_families_with_their_samplers(pipes):
    expected = {"tiny-pixart": (Family.PIXART, 4, "DPMSolverMultistepScheduler"),
                "tiny-sd3": (Family.SD3, 16, "FlowMatchEulerDiscreteScheduler"),
                "tiny-flux": (Family.FLUX, 16, "FlowMatchEulerDiscreteScheduler")}
    for name, pipe in pipes.items():
        fam, channels, sampler = expected[name]
        assert family(pipe) is fam and fam.transformer
        assert facts_of(pipe).latent_channels == channels == pipe.vae.config.latent_channels
        assert type(pipe.scheduler).__name__ == sampler
        assert pipe.vae_scale_factor == 8
        assert unet_config_of(f"builtin:{name}")["_class_name"] == type(denoiser_of(pipe)).__name__
        assert sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                   for p in m.parameters()) < 1_000_000


def test_building_twice_gives_identical_weights(pipes):
    for name, pipe in pipes.items():
        again = load_pipeline(f"builtin:{name}")
        for part in ("transformer", "vae", "text_encoder"):
            first, second = getattr(pipe, part).state_dict(), getattr(again, part).state_dict()
            assert first.keys() == second.keys()
            assert all(torch.equal(first[k], second[k]) for k in first), (name, part)


def test_pixart_mini_is_pixart_sigma_at_a_quarter_width():
    config = dit.transformer_config("pixart-mini")
    assert config["_class_name"] == "PixArtTransformer2DModel"
    assert (config["patch_size"], config["attention_head_dim"], config["num_attention_heads"]) == (2, 72, 4)
    assert transformer_alignment(config) == 2


# --- equal to diffusers' own pipelines ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_mode_none_equals_diffusers_pipeline_bit_for_bit(pipes, name):
    pipe = pipes[name]
    job = Job(name="a", prompt="a harbor at dawn", width=64, height=48, seed=7, model=f"builtin:{name}", steps=3,
              guidance_scale=4.0, negative_prompt="fog", parallel=ParallelConfig(mode=Mode.NONE))
    ours = render_image(pipe, job, *ALONE, "cpu")
    noise = initial_noise(job, facts_of(pipe).latent_channels, 8)
    kwargs = dict(num_inference_steps=job.steps, height=job.height, width=job.width,
                  guidance_scale=job.guidance_scale, output_type="latent", max_sequence_length=t5_tokens(pipe, family(pipe)))
    if name == "tiny-pixart":
        kwargs.update(use_resolution_binning=False, clean_caption=False, negative_prompt=job.negative_prompt,
                      latents=noise)
    elif name == "tiny-sd3":
        kwargs.update(negative_prompt=job.negative_prompt, latents=noise)
    else:
        kwargs.update(latents=pack_2x2(noise))  # Flux's pipeline takes its latents packed
    own = pipe.scheduler
    pipe.scheduler = make_scheduler(job.scheduler, own.config)
    try:
        theirs = pipe(job.prompt, **kwargs).images
    finally:
        pipe.scheduler = own
    if name == "tiny-flux":
        theirs = unpack_2x2(theirs, job.height // 8, job.width // 8)
    assert torch.equal(torch.from_numpy(ours.latent), theirs[0])
    decoded = pipe.vae.decode(from_latent_space(pipe.vae.config, theirs), return_dict=False)[0]
    image = pipe.image_processor.postprocess(decoded, output_type="np")
    assert np.array_equal(ours.image, (image[0] * 255).round().astype(np.uint8))
    assert ours.image.std() > 1.0


def test_flow_matching_models_take_euler_and_heun_and_flux_euler_only(pipes):
    config = pipes["tiny-sd3"].scheduler.config
    assert type(make_scheduler(SchedulerName.EULER, config)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(make_scheduler(SchedulerName.HEUN, config)).__name__ == "FlowMatchHeunDiscreteScheduler"
    for name in SchedulerName:
        if name not in (SchedulerName.EULER, SchedulerName.HEUN):
            with pytest.raises(BadInput, match="does not apply to a flow-matching model") as exc:
                make_scheduler(name, scheduler_config_of("builtin:tiny-flux"))
            assert "\n" not in str(exc.value)
    with pytest.raises(BadInput, match="'heun' does not apply to Flux"):
        make_scheduler(SchedulerName.HEUN, scheduler_config_of("builtin:tiny-flux"))
    pixart = pipes["tiny-pixart"].scheduler.config
    assert type(make_scheduler(SchedulerName.DDIM, pixart)).__name__ == "DDIMScheduler"
    assert type(make_scheduler(SchedulerName.LCM, pixart)).__name__ == "LCMScheduler"


@pytest.mark.parametrize("name, scheduler", [("tiny-sd3", SchedulerName.HEUN), ("tiny-pixart", SchedulerName.HEUN),
                                             ("tiny-pixart", SchedulerName.EULER_A),
                                             ("tiny-pixart", SchedulerName.DPMPP_2M_SDE_KARRAS),
                                             ("tiny-pixart", SchedulerName.UNIPC), ("tiny-pixart", SchedulerName.LCM)])
def test_the_other_samplers_equal_diffusers_pipeline_with_the_same_generator(pipes, name, scheduler):
    """Drawing the start noise (and PixArt's stochastic samplers their steps' noise) from the pipeline's generator;
    SD3 takes Heun's flow-matching twin."""
    pipe = pipes[name]
    job = Job(name="a", prompt="a harbor at dawn", width=64, height=48, seed=7, model=f"builtin:{name}", steps=3,
              guidance_scale=4.0, negative_prompt="fog", scheduler=scheduler, parallel=ParallelConfig(mode=Mode.NONE))
    ours = render_image(pipe, job, *ALONE, "cpu")
    kwargs = dict(num_inference_steps=job.steps, height=job.height, width=job.width, guidance_scale=job.guidance_scale,
                  negative_prompt=job.negative_prompt, output_type="latent",
                  max_sequence_length=t5_tokens(pipe, family(pipe)),
                  generator=torch.Generator("cpu").manual_seed(job.seed))
    if name == "tiny-pixart":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    own = pipe.scheduler
    pipe.scheduler = make_scheduler(job.scheduler, own.config)
    try:
        theirs = pipe(job.prompt, **kwargs).images
    finally:
        pipe.scheduler = own
    assert torch.equal(torch.from_numpy(ours.latent), theirs[0])


# --- bands: alignment and bytes (pure) ---------------------------------------------------------------------------

def test_transformer_alignment_is_token_rows_in_latent_rows():
    assert transformer_alignment(dit.transformer_config("tiny-pixart")) == 2
    assert transformer_alignment(dit.transformer_config("tiny-sd3")) == 2
    assert transformer_alignment(dit.transformer_config("tiny-flux")) == 2  # patch 1, packed 2x2
    assert transformer_alignment({"patch_size": 1, "num_layers": 1}) == 1
    assert unet_alignment(dit.transformer_config("tiny-sd3")) == 2
    assert unet_alignment({"down_block_types": ["a", "b", "c"]}) == 4
    assert latent_bands(10, 2, 3) == (Band(0, 4), Band(4, 8), Band(8, 10))


def test_transformer_step_bytes_count_every_image_attention():
    bands = latent_bands(10, 2, 2)  # token rows 3 and 2, 4 tokens each (a latent 8 columns wide)
    pixart = dit.transformer_config("tiny-pixart")  # 4 blocks, 3 heads x 8: keys + values 48 channels
    assert len(transformer_layers(pixart, 8)) == 4
    per_layer = 2 * (3 * 4) * 48 * 4  # batch 2, padded to the larger band, float32
    assert transformer_step_bytes(pixart, bands, 0, 8, 2, 4) == 4 * per_layer
    assert transformer_step_bytes(pixart, bands, 1, 8, 2, 4) == 4 * per_layer  # padded: the same on every rank
    assert transformer_step_bytes(pixart, bands, 0, 8, 2, 4, registration=True) == 4 * per_layer + 4 * 8
    assert len(transformer_layers(dit.transformer_config("tiny-sd3"), 8)) == 5  # 4 joint + SD3.5's second one
    assert len(transformer_layers(dit.transformer_config("tiny-flux"), 8)) == 4  # 2 joint + 2 single-stream
    assert transformer_step_bytes(pixart, (Band(0, 10),), 0, 8, 2, 4) == 0
    # the stale keys/values every rank keeps: every band's, padded, and its own sent copy, per layer
    assert exchange_buffers(transformer_layers(pixart, 8), bands, 2, 4).keys_values == 4 * 3 * 2 * 12 * 48 * 4


# --- on MPI ranks -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[2, 3])
def checks(request):
    """dit_checks.py on 2 and 3 ranks: every model's checks in one launch per world size."""
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS)}
    result = subprocess.run([str(MPIEXEC), "-n", str(request.param), sys.executable, str(SCRIPTS / "dit_checks.py")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, **env}, cwd=SCRIPTS)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["world_size"] == request.param
    return report


@pytest.mark.mpi
@pytest.mark.parametrize("name", TINY)
def test_sync_equals_one_process_and_displaced_beats_naive(checks, name):
    entry = checks["models"][name]
    sizes = [stop - start for start, stop in entry["bands"]]
    assert len(sizes) == checks["world_size"] and len(set(sizes)) > 1, "uneven bands"
    assert entry["sync"]["error"] <= 1e-4 and entry["sync"]["png_max_diff"] <= 1
    assert entry["displaced"]["error"] < entry["naive"]["error"]
    assert entry["displaced"]["psnr"] >= entry["naive"]["psnr"] + 3.0, entry
    assert entry["naive"]["error"] > 1e-4, "naive bands must differ, or the comparison says nothing"
    assert entry["sync"]["bytes_match"] and entry["displaced"]["bytes_match"]
    assert entry["sync"]["bytes_per_step"] > 0
    assert entry["restored"], "removing the plans must give the model back bit for bit"


@pytest.mark.mpi
def test_split_cfg_and_img2img_through_16_channel_vaes(checks):
    models = checks["models"]
    for name in ("tiny-sd3", "tiny-flux"):
        assert models[name]["img2img_sync"]["error"] <= 1e-4 and models[name]["img2img_sync"]["png_max_diff"] <= 1
        assert models[name]["img2img_differs_from_text"]
    if checks["world_size"] % 2 == 0:
        for name in ("tiny-pixart", "tiny-sd3"):
            assert models[name]["split_cfg"]["error"] <= 1e-4 and models[name]["split_cfg"]["png_max_diff"] <= 1


# --- refusals before anything loads -------------------------------------------------------------------------------

REFUSED = """
[defaults]
steps = 2
[defaults.parallel]
mode = "sync"

[[jobs]]
name = "strip"
model = "builtin:tiny-pixart"
prompt = "a strip"
width = 64
height = 16
seed = 1

[[jobs]]
name = "ddim-flux"
model = "builtin:tiny-flux"
scheduler = "ddim"
prompt = "a lighthouse"
width = 64
height = 64
seed = 1

[[jobs]]
name = "odd-sd3"
model = "builtin:tiny-sd3"
scheduler = "euler"
prompt = "a lighthouse"
width = 72
height = 64
seed = 1

[[jobs]]
name = "cfg-flux"
model = "builtin:tiny-flux"
prompt = "a lighthouse"
width = 64
height = 64
seed = 1
[jobs.parallel]
split_cfg = true

[[jobs]]
name = "heun-flux"
model = "builtin:tiny-flux"
scheduler = "heun"
prompt = "a lighthouse"
width = 64
height = 64
seed = 1

[[jobs]]
name = "spaced-sd3"
model = "builtin:tiny-sd3"
timestep_spacing = "trailing"
prompt = "a lighthouse"
width = 64
height = 64
seed = 1
"""


@pytest.mark.mpi
def test_too_few_token_rows_and_what_does_not_apply_to_the_model_are_refused_with_exit_2(tmp_path):
    manifest = write_manifest(tmp_path / "m.toml", REFUSED)
    out = tmp_path / "out"
    r = hpcrender("render", manifest, "--out", out, ranks=2)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("hpcrender: error:")]
    assert len(lines) == 6, r.stderr  # one line per job, from every rank alike but printed once
    assert "jobs[strip]" in lines[0] and "fewer than its 2 ranks" in lines[0]
    assert "jobs[ddim-flux]" in lines[1] and "does not apply to a flow-matching model" in lines[1]
    assert "jobs[odd-sd3]" in lines[2] and "multiples of 16 px" in lines[2]
    assert "jobs[cfg-flux]" in lines[3] and "split_cfg needs classifier-free guidance" in lines[3]
    assert "jobs[heun-flux]: scheduler 'heun' does not apply to Flux" in lines[4]
    assert "jobs[spaced-sd3]: timestep_spacing 'trailing' does not apply to a flow-matching model" in lines[5]
    assert not any((out / name).exists() for name in ("strip", "ddim-flux", "odd-sd3", "cfg-flux", "heun-flux",
                                                      "spaced-sd3"))


@pytest.mark.parametrize("name, scheduler", [("tiny-pixart", SchedulerName.DPMPP), ("tiny-flux", SchedulerName.EULER),
                                             ("tiny-sd3", SchedulerName.HEUN)])
def test_a_stopped_render_resumes_bit_for_bit(pipes, name, scheduler):
    """The checkpoint after step 2 of 4 (DPM-Solver++ keeps a history; Flux's sampler its shifted sigmas; Heun two
    calls a step) resumed gives the uninterrupted latent."""
    pipe = pipes[name]
    job = Job(name="a", prompt="a lighthouse", width=64, height=48, seed=3, model=f"builtin:{name}", steps=4,
              scheduler=scheduler, parallel=ParallelConfig(mode=Mode.NONE))
    done = []
    stopped = render_image(pipe, job, *ALONE, "cpu", on_step=lambda i, n: done.append(i),
                           should_stop=lambda: len(done) == 2)
    assert stopped.stopped_at == 2 and stopped.checkpoint is not None and stopped.image is None
    resumed = render_image(pipe, job, *ALONE, "cpu", resume=stopped.checkpoint)
    assert resumed.resumed_from == 2
    straight = render_image(pipe, job, *ALONE, "cpu")
    assert np.array_equal(resumed.latent, straight.latent) and np.array_equal(resumed.image, straight.image)


@pytest.mark.parametrize("name", TINY)
def test_a_saved_diffusers_folder_loads_bit_exactly(pipes, name, tmp_path):
    pipes[name].save_pretrained(tmp_path / name, safe_serialization=True)
    loaded = load_pipeline(str(tmp_path / name))
    assert family(loaded) is family(pipes[name])
    assert unet_config_of(str(tmp_path / name))["_class_name"] == type(denoiser_of(loaded)).__name__
    for part, module in pipes[name].components.items():
        if isinstance(module, torch.nn.Module):
            ours, theirs = module.state_dict(), getattr(loaded, part).state_dict()
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert scheduler_config_of(str(tmp_path / name))["_class_name"] == type(pipes[name].scheduler).__name__


def _forward(name: str, model, latent: torch.Tensor) -> torch.Tensor:
    """One forward of a tiny transformer on `latent` (1 image) with fixed text states."""
    g = torch.Generator().manual_seed(4)
    config = model.config
    t = torch.tensor([500.0])
    with torch.no_grad():
        if name == "tiny-pixart":
            text = torch.randn(1, 5, config.caption_channels, generator=g)
            return model(latent, encoder_hidden_states=text, timestep=t, return_dict=False,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None})[0]
        if name == "tiny-sd3":
            text = torch.randn(1, 5, config.joint_attention_dim, generator=g)
            pooled = torch.randn(1, config.pooled_projection_dim, generator=g)
            return model(latent, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                         return_dict=False)[0]
        from hpcrender.render.latents import flux_image_ids

        text = torch.randn(1, 5, config.joint_attention_dim, generator=g)
        pooled = torch.randn(1, config.pooled_projection_dim, generator=g)
        rows, cols = latent.shape[2] // 2, latent.shape[3] // 2
        out = model(pack_2x2(latent), encoder_hidden_states=text, pooled_projections=pooled, timestep=t / 1000,
                    guidance=torch.tensor([3.0]), txt_ids=torch.zeros(5, 3),
                    img_ids=flux_image_ids(rows, cols, "cpu", torch.float32), return_dict=False)[0]
        return unpack_2x2(out, latent.shape[2], latent.shape[3])


@pytest.mark.parametrize("name", TINY)
def test_one_band_plan_runs_the_model_unchanged_and_is_removed_without_a_trace(pipes, name):
    from hpcrender.config import GroupNormMode
    from hpcrender.parallel.parallelize import parallelize
    from hpcrender.parallel.plan import PatchPlan

    model = denoiser_of(pipes[name])
    latent = torch.randn(1, facts_of(pipes[name]).latent_channels, 10, 8, generator=torch.Generator().manual_seed(1))
    before = _forward(name, model, latent)
    modules = [(n, id(m)) for n, m in model.named_modules()]
    processors = [id(m.processor) for m in model.modules() if hasattr(m, "set_processor")]
    handle = parallelize(model, PatchPlan(mode=Mode.SYNC, groupnorm=GroupNormMode.SYNC, warmup_steps=0,
                                          bands=(Band(0, 10),), rank=0), None)
    try:
        assert [id(m.processor) for m in model.modules() if hasattr(m, "set_processor")] != processors
        with pytest.raises(BadInput, match="already band-parallel"):
            parallelize(model, handle.plan, None)
        assert torch.equal(_forward(name, model, latent), before)
    finally:
        handle.remove()
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    assert [id(m.processor) for m in model.modules() if hasattr(m, "set_processor")] == processors
    assert torch.equal(_forward(name, model, latent), before)


class CustomProcessor:
    """A processor hpcrender knows nothing of (what a plugin might install)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        raise AssertionError("never called")


def test_an_attention_processor_that_cannot_be_split_is_refused_and_the_model_left_as_it_was(pipes):
    from hpcrender.config import GroupNormMode
    from hpcrender.errors import DoesNotFit
    from hpcrender.parallel.parallelize import parallelize
    from hpcrender.parallel.plan import PatchPlan

    model = denoiser_of(pipes["tiny-sd3"])
    attentions = [m for m in model.modules() if hasattr(m, "set_processor")]
    original = attentions[-1].processor
    attentions[-1].set_processor(CustomProcessor())
    try:
        modules = [(n, id(m)) for n, m in model.named_modules()]
        processors = [id(m.processor) for m in attentions]
        with pytest.raises(DoesNotFit, match="cannot be split into bands"):
            parallelize(model, PatchPlan(mode=Mode.SYNC, groupnorm=GroupNormMode.SYNC, warmup_steps=0,
                                         bands=(Band(0, 10),), rank=0), None)
        assert [(n, id(m)) for n, m in model.named_modules()] == modules
        assert [id(m.processor) for m in attentions] == processors
    finally:
        attentions[-1].set_processor(original)


@pytest.mark.parametrize("key, fam", [("double_blocks.0.img_attn.qkv.weight", "FLUX"),
                                      ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "SD3")])
def test_a_single_sd3_or_flux_file_goes_to_diffusers_loader_and_fails_offline_with_one_line(tmp_path, monkeypatch,
                                                                                             key, fam):
    """Its variant's repository is not in the cache here: one ModelNotFound line naming the family and the cache;
    before loading, it is known to be a flow-matching model that takes euler only."""
    from safetensors.torch import save_file

    from hpcrender.errors import ModelNotFound

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(3, 2)}, str(path))
    assert unet_config_of(str(path)) is None
    ddim = Job(name="a", prompt="a", width=64, height=64, seed=1, model=str(path), scheduler=SchedulerName.DDIM)
    from hpcrender.render.options import check_model_options

    with pytest.raises(BadInput, match="does not apply to a flow-matching model"):
        check_model_options(ddim)
    with pytest.raises(ModelNotFound) as exc:
        load_pipeline(str(path))
    message = str(exc.value)
    assert "\n" not in message and f"single-file {fam} checkpoint" in message and "local Hugging Face cache" in message
