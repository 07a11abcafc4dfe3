"""LoRA on one process: two adapters with scales equal diffusers' own loaders and pipeline bit for bit (SD, SDXL,
SD3, Flux; diffusers/PEFT and Kohya files), taken off bit for bit so that no job inherits another's, resumed from a
checkpoint bit for bit; through the commands: a LoRA's content is the job's, and every bad `loras` entry is one line
with exit 2 before anything renders. Band parallelism with LoRA: test_verify (fused, 2 and 3 ranks) and
test_parallel (unfused peft wrappers)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hpcrender.config import DType, InitImage, Job, Lora, Mode, ParallelConfig, SchedulerName
from hpcrender.manifest import load_manifest
from hpcrender.models import Family, family, load_pipeline
from hpcrender.models.cache import ModelCache
from hpcrender.models.facts import facts_of
from hpcrender.models.lora import file_sha256
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.render.checkpoint import read_checkpoint, write_checkpoint
from hpcrender.render.image import render_image
from hpcrender.render.latents import initial_noise, pack_2x2, unpack_2x2
from hpcrender.render.prompt import t5_tokens
from hpcrender.render.samplers import make_scheduler

from clirun import hpcrender, write_manifest
from lora_files import ATTENTION, make_lora, to_kohya
from test_img2img import diffusers_img2img, diffusers_text_to_image

ALONE = (GroupLayout(size=1, rank=0, mode=Mode.NONE), Comms(None, None, (0,)))
SCALES = (0.8, -0.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    made = {
        "sd-a": make_lora("builtin:tiny-sd", d / "sd-a", 1),
        "sd-b": make_lora("builtin:tiny-sd", d / "sd-b", 2, targets=[*ATTENTION, "conv1"], text_encoder=True),
        "xl-a": make_lora("builtin:tiny-sdxl", d / "xl-a", 3),
        "xl-b": make_lora("builtin:tiny-sdxl", d / "xl-b", 4, targets=["to_q", "to_v", "conv2"]),
        "sd3-a": make_lora("builtin:tiny-sd3", d / "sd3-a", 5),
        "sd3-b": make_lora("builtin:tiny-sd3", d / "sd3-b", 6, targets=["to_k", "to_out.0"]),
        "flux-a": make_lora("builtin:tiny-flux", d / "flux-a", 7),
        "flux-b": make_lora("builtin:tiny-flux", d / "flux-b", 8, targets=["to_q", "to_v"]),
    }
    made["sd-a-kohya"] = to_kohya(made["sd-a"], d / "sd-a-kohya.safetensors")
    return made


def lora(path, scale: float = 1.0) -> Lora:
    return Lora(path=str(path), sha256=file_sha256(path), scale=scale, where=f"test: {path.parent.name}")


def job(model: str, loras=(), **kw) -> Job:
    fields = dict(name="a", prompt="a harbor at dawn", width=64, height=48, seed=7, model=f"builtin:{model}",
                  steps=4, negative_prompt="fog", parallel=ParallelConfig(mode=Mode.NONE), loras=tuple(loras))
    if model in ("tiny-sd3", "tiny-flux"):
        fields.update(width=64, height=64)
    fields.update(kw)
    return Job(**fields)


def diffusers_with_loras(model: str, loras) -> object:
    """diffusers' own recipe on a fresh pipeline: each file loaded as an adapter, weighted, fused."""
    pipe = load_pipeline(f"builtin:{model}")
    names = [f"n{i}" for i in range(len(loras))]
    for name, item in zip(names, loras):
        pipe.load_lora_weights(item.path, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[item.scale for item in loras])
    pipe.fuse_lora(adapter_names=names)
    return pipe


def diffusers_transformer(pipe, render: Job) -> torch.Tensor:
    """diffusers' SD3 or Flux pipeline from the job's start noise (Flux's packed 2x2, as its pipeline takes it)."""
    noise = initial_noise(render, facts_of(pipe).latent_channels, 8)
    flux = family(pipe) is Family.FLUX
    kwargs = dict(num_inference_steps=render.steps, height=render.height, width=render.width,
                  guidance_scale=render.guidance_scale, output_type="latent",
                  max_sequence_length=t5_tokens(pipe, family(pipe)), latents=pack_2x2(noise) if flux else noise)
    if not flux:
        kwargs["negative_prompt"] = render.negative_prompt
    own = pipe.scheduler
    pipe.scheduler = make_scheduler(render.scheduler, own.config)
    pipe.set_progress_bar_config(disable=True)
    try:
        latent = pipe(render.prompt, **kwargs).images
    finally:
        pipe.scheduler = own
    return unpack_2x2(latent, render.height // 8, render.width // 8) if flux else latent


CASES = [("tiny-sd", "sd", SchedulerName.EULER), ("tiny-sd", "sd", SchedulerName.EULER_A),
         ("tiny-sdxl", "xl", SchedulerName.DPMPP_2M), ("tiny-sd3", "sd3", SchedulerName.EULER),
         ("tiny-flux", "flux", SchedulerName.EULER)]


@pytest.mark.parametrize("model, short, scheduler", CASES, ids=[f"{m}-{s.value}" for m, _, s in CASES])
def test_two_adapters_with_scales_equal_diffusers_own_loaders_and_pipeline_bit_for_bit(files, model, short,
                                                                                      scheduler):
    loras = (lora(files[f"{short}-a"], SCALES[0]), lora(files[f"{short}-b"], SCALES[1]))
    render = job(model, loras, scheduler=scheduler)
    models = ModelCache("cpu")
    plain = render_image(models.get(render.model, DType.FLOAT32).pipe, dataclasses.replace(render, loras=()),
                         *ALONE, "cpu")
    loaded = models.get(render.model, DType.FLOAT32, render.loras)
    ours = render_image(loaded.pipe, render, *ALONE, "cpu", facts=loaded.facts)
    pipe = diffusers_with_loras(model, loras)
    theirs = (diffusers_transformer(pipe, render) if model in ("tiny-sd3", "tiny-flux")
              else diffusers_text_to_image(pipe, render))
    assert torch.equal(torch.from_numpy(ours.latent), theirs[0])
    assert not np.array_equal(ours.latent, plain.latent)  # the adapters change the image


@pytest.mark.parametrize("model, short, scheduler", [("tiny-sd", "sd", SchedulerName.EULER_A),
                                                     ("tiny-sdxl", "xl", SchedulerName.DDIM)])
def test_img2img_with_two_adapters_equals_diffusers_img2img_pipeline_bit_for_bit(files, tmp_path, model, short,
                                                                                scheduler):
    start = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(start)
    loras = (lora(files[f"{short}-a"], SCALES[0]), lora(files[f"{short}-b"], SCALES[1]))
    render = job(model, loras, scheduler=scheduler, steps=5, init_image=InitImage(str(start), "-", 0.6))
    loaded = ModelCache("cpu").get(render.model, DType.FLOAT32, render.loras)
    ours = render_image(loaded.pipe, render, *ALONE, "cpu")
    resized = Image.open(start).convert("RGB").resize((render.width, render.height),
                                                       resample=Image.Resampling.LANCZOS)
    theirs = diffusers_img2img(diffusers_with_loras(model, loras), scheduler)(
        render.prompt, image=resized, strength=0.6, num_inference_steps=render.steps, negative_prompt="fog",
        guidance_scale=render.guidance_scale, generator=torch.Generator("cpu").manual_seed(render.seed),
        output_type="latent").images
    assert torch.equal(torch.from_numpy(ours.latent), theirs[0])


def test_a_kohya_file_is_read_as_its_diffusers_twin(files):
    models = ModelCache("cpu")
    ours = {}
    for name in ("sd-a", "sd-a-kohya"):
        render = job("tiny-sd", (lora(files[name], 0.7),))
        loaded = models.get(render.model, DType.FLOAT32, render.loras)
        ours[name] = render_image(loaded.pipe, render, *ALONE, "cpu").latent
    assert np.array_equal(ours["sd-a"], ours["sd-a-kohya"])


def test_adapters_are_taken_off_bit_for_bit_and_no_job_inherits_another_jobs(files):
    models = ModelCache("cpu")
    pipe = models.get("builtin:tiny-sd", DType.FLOAT32).pipe
    before = {part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()}
              for part in ("unet", "text_encoder")}
    alone = render_image(pipe, job("tiny-sd"), *ALONE, "cpu").latent
    with_b = render_image(models.get("builtin:tiny-sd", DType.FLOAT32, (lora(files["sd-b"], 0.9),)).pipe,
                          job("tiny-sd"), *ALONE, "cpu").latent
    # Other adapters (taken off, then put on), then none again: the model's own weights, every one of them.
    models.get("builtin:tiny-sd", DType.FLOAT32, (lora(files["sd-a"]), lora(files["sd-b"], 0.3)))
    after_b = render_image(models.get("builtin:tiny-sd", DType.FLOAT32).pipe, job("tiny-sd"), *ALONE, "cpu").latent
    assert models.fused is None and not any(pipe.get_list_adapters().values())
    for part, state in before.items():
        now = getattr(pipe, part).state_dict()
        assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state), part
    assert np.array_equal(after_b, alone) and not np.array_equal(with_b, alone)
    # The same adapters again are served as they are: nothing reloaded.
    models.get("builtin:tiny-sd", DType.FLOAT32, (lora(files["sd-a"]),))
    fused = models.fused
    models.get("builtin:tiny-sd", DType.FLOAT32, (lora(files["sd-a"]),))
    assert models.fused is fused


@pytest.mark.parametrize("scheduler", [SchedulerName.DPMPP_2M_SDE])  # every sampler's resume: test_img2img
def test_a_render_with_loras_resumes_from_its_checkpoint_bit_for_bit(files, scheduler, tmp_path):
    render = job("tiny-sd", (lora(files["sd-a"], 0.6), lora(files["sd-b"], 0.4)), steps=4, scheduler=scheduler)
    pipe = ModelCache("cpu").get(render.model, DType.FLOAT32, render.loras).pipe
    whole = render_image(pipe, render, *ALONE, "cpu")
    done: list[int] = []
    stopped = render_image(pipe, render, *ALONE, "cpu", on_step=lambda i, n: done.append(i),
                           should_stop=lambda: len(done) == 2)
    write_checkpoint(tmp_path / "checkpoint.h5", stopped.checkpoint, render.params_hash())
    back = read_checkpoint(tmp_path / "checkpoint.h5", render.params_hash())
    resumed = render_image(pipe, render, *ALONE, "cpu", resume=back)
    assert resumed.resumed_from == 2 and np.array_equal(resumed.latent, whole.latent)


# --- through the commands ------------------------------------------------------------------------------------------

def test_a_lora_is_part_of_the_job_its_content_not_where_it_lies(files, tmp_path):
    text = """
[[jobs]]
name = "a"
prompt = "p"
loras = [{ path = "%s", scale = 0.5 }]
"""
    first = tmp_path / "first.safetensors"
    first.write_bytes(files["sd-a"].read_bytes())
    moved = tmp_path / "elsewhere" / "moved.safetensors"
    moved.parent.mkdir()
    moved.write_bytes(first.read_bytes())
    hashes = {}
    for key, path, scale in (("first", first, 0.5), ("moved", moved, 0.5), ("scaled", first, 0.6),
                             ("other", files["sd-b"], 0.5)):
        manifest = write_manifest(tmp_path / f"{key}.toml", (text % path).replace("0.5", str(scale)))
        (job_,) = load_manifest(manifest).jobs
        assert job_.loras[0].path == str(path) and job_.loras[0].where == f"{manifest}:5: jobs[a].loras[0].path"
        hashes[key] = job_.params_hash()
    no_lora = write_manifest(tmp_path / "none.toml", '[[jobs]]\nname = "a"\nprompt = "p"\n')
    assert hashes["first"] == hashes["moved"]
    assert len({hashes["first"], hashes["scaled"], hashes["other"], load_manifest(no_lora).jobs[0].params_hash()}) == 4


def test_a_job_after_a_job_with_loras_renders_as_it_does_alone(files, tmp_path):
    """One process renders a (two LoRAs from [defaults]), b (`loras = []`) and c (another LoRA) in turn from one
    model cache; b alone in another run is the same latent, bit for bit."""
    manifest = write_manifest(tmp_path / "jobs.toml", f"""
[defaults]
model = "builtin:tiny-sd"
prompt = "a harbor at dawn"
width = 64
height = 64
steps = 2
loras = [
  {{ path = "{files['sd-a']}", scale = 0.8 }},
  {{ path = "{files['sd-b']}", scale = 0.5 }},
]
[defaults.parallel]
mode = "none"

[[jobs]]
name = "a"

[[jobs]]
name = "b"
loras = []

[[jobs]]
name = "c"
loras = [{{ path = "{files['sd-a-kohya']}" }}]
""")
    done = hpcrender("render", manifest, "--out", tmp_path / "all", "--save-latent")
    assert done.returncode == 0, done.stderr[-2000:]
    alone = hpcrender("render", manifest, "--only", "b", "--out", tmp_path / "alone", "--save-latent")
    assert alone.returncode == 0, alone.stderr[-2000:]
    latents = {name: np.load(tmp_path / "all" / name / "latent.npy") for name in "abc"}
    assert np.array_equal(latents["b"], np.load(tmp_path / "alone" / "b" / "latent.npy"))
    assert not np.array_equal(latents["a"], latents["b"]) and not np.array_equal(latents["c"], latents["b"])
    meta = (tmp_path / "all" / "a" / "meta.json").read_text()
    assert file_sha256(files["sd-a"]) in meta and file_sha256(files["sd-b"]) in meta


def test_bad_loras_exit_2_with_one_line_each_naming_the_key_and_nothing_rendered(files, tmp_path):
    not_lora = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(not_lora))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["sd-a"].read_bytes()[:-100])
    pickled = tmp_path / "style.pt"
    pickled.write_bytes(b"\x80\x04")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    manifest = write_manifest(tmp_path / "bad.toml", f"""
[defaults]
model = "builtin:tiny-sd"
prompt = "p"

[[jobs]]
name = "not-a-list"
loras = "{files['sd-a']}"

[[jobs]]
name = "missing"
loras = [{{ path = "nowhere.safetensors" }}]

[[jobs]]
name = "not-lora"
loras = [{{ path = "model.safetensors" }}]

[[jobs]]
name = "truncated"
loras = [{{ path = "{files['sd-a']}" }}, {{ path = "truncated.safetensors" }}]

[[jobs]]
name = "pickled"
loras = [{{ path = "style.pt" }}]

[[jobs]]
name = "garbage"
loras = [{{ path = "garbage.safetensors" }}]

[[jobs]]
name = "scale"
loras = [{{ path = "{files['sd-a']}", scale = "strong" }}]

[[jobs]]
name = "unknown"
loras = [{{ path = "{files['sd-a']}", scal = 0.5 }}]

[[jobs]]
name = "no-path"
loras = [
  {{ path = "{files['sd-a']}" }},
  {{ scale = 0.5 }},
]
""")
    done = hpcrender("render", manifest, "--out", tmp_path / "out")
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    lines = [line.removeprefix("hpcrender: error: ") for line in done.stderr.strip().splitlines()]
    expected = [
        (8, "jobs[not-a-list].loras: must be a list of tables"),
        (12, "jobs[missing].loras[0].path: no such file"),
        (16, "jobs[not-lora].loras[0].path: "),
        (20, "jobs[truncated].loras[1].path: cannot read"),
        (24, "jobs[pickled].loras[0].path: must be a .safetensors file"),
        (28, "jobs[garbage].loras[0].path: cannot read"),
        (32, "jobs[scale].loras[0].scale: must be a number"),
        (36, "jobs[unknown].loras[0].scal: unknown key (did you mean 'scale'?)"),
        (42, "jobs[no-path].loras[1].path: missing"),
    ]
    assert len(lines) == len(expected), done.stderr
    for line, (number, start) in zip(lines, expected):
        assert line.startswith(f"{manifest}:{number}: {start}"), line
    assert "is not a LoRA" in lines[2] and "truncated" in lines[3]


def test_a_lora_for_another_model_or_no_layer_is_refused_before_anything_renders(files, tmp_path):
    nowhere = tmp_path / "nowhere.safetensors"
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.ones(2, 8),
               "unet.no_such_block.to_q.lora_B.weight": torch.ones(8, 2)}, str(nowhere))
    manifest = write_manifest(tmp_path / "jobs.toml", f"""
[defaults]
prompt = "p"
width = 64
height = 64
steps = 1

[[jobs]]
name = "fine"
model = "builtin:tiny-sd"
loras = [{{ path = "{files['sd-a']}" }}]

[[jobs]]
name = "sdxl-lora-on-sd"
model = "builtin:tiny-sd"
loras = [{{ path = "{files['xl-a']}" }}]

[[jobs]]
name = "no-layer"
model = "builtin:tiny-sd"
loras = [{{ path = "{files['sd-a']}" }}, {{ path = "nowhere.safetensors" }}]

[[jobs]]
name = "pixart"
model = "builtin:tiny-pixart"
loras = [{{ path = "{files['sd-a']}" }}]
""")
    for command in (("render", manifest, "--out", tmp_path / "out"), ("verify", manifest, "--mode", "sync",
                                                                        *[a for name in ("fine", "sdxl-lora-on-sd",
                                                                                         "no-layer", "pixart")
                                                                          for a in ("--only", name)])):
        done = hpcrender(*command)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = [line.removeprefix("hpcrender: error: ") for line in done.stderr.strip().splitlines()]
        assert len(lines) == 3, done.stderr
        assert lines[0].startswith(f"{manifest}:16: jobs[sdxl-lora-on-sd].loras[0].path: made for another model: ")
        assert lines[1].startswith(f"{manifest}:21: jobs[no-layer].loras[1].path: matches no layer of "
                                   "builtin:tiny-sd (none of the 1 layers it names, e.g. 'no_such_block.to_q'")
        assert lines[2] == (f"{manifest}:26: jobs[pixart].loras[0].path: diffusers has no LoRA loader for "
                            "PixArt-Sigma pipelines")
    assert not (tmp_path / "out").exists()


def test_gigapixel_tiles_render_with_the_jobs_loras_and_a_changed_lora_is_a_new_store(files, tmp_path):
    style = tmp_path / "style.safetensors"
    style.write_bytes(files["xl-a"].read_bytes())
    manifest = write_manifest(tmp_path / "giga.toml", """
[defaults]
model = "builtin:tiny-sdxl"
prompt = "an aerial harbor"
width = 256
height = 192
steps = 2
guidance_scale = 1.0
[defaults.parallel]
mode = "none"
[defaults.gigapixel]
base = 96
tile = 64
overlap = 16
strength = 0.5

[[jobs]]
name = "with-lora"
loras = [{ path = "style.safetensors", scale = 0.8 }]

[[jobs]]
name = "plain"
""")
    out = tmp_path / "out"
    first = hpcrender("render", manifest, "--out", out)
    assert first.returncode == 0, first.stderr[-2000:]
    image = {name: np.asarray(Image.open(out / name / "image.png")) for name in ("with-lora", "plain")}
    assert not np.array_equal(image["with-lora"], image["plain"])
    assert file_sha256(style) in (out / "with-lora" / "meta.json").read_text()
    style.write_bytes(files["xl-b"].read_bytes())  # the same file name, another LoRA: another image
    kept = hpcrender("render", manifest, "--out", out, "--only", "with-lora")
    assert kept.returncode == 1 and "a tile store written for other parameters" in kept.stderr  # not resumed
    again = hpcrender("render", manifest, "--out", out, "--only", "with-lora", "--no-resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert not np.array_equal(np.asarray(Image.open(out / "with-lora" / "image.png")), image["with-lora"])
