"""ControlNet: the builtin ControlNets, the conditioning image as diffusers prepares it, text-to-image, img2img and
several ControlNets equal to diffusers' own ControlNet pipelines bit for bit, scale 0 and 1, a stopped render resumed
exactly, the manifest key checked key by key, and through the commands: a ControlNet on a transformer refused before
loading, a render equal to the in-process one. (Band-parallel ControlNet: tests/test_verify.py, in its launches.)"""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap

import numpy as np
import pytest
import torch
from diffusers import (
    MultiControlNetModel, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from hpcrender.config import ControlNetConfig, GigapixelConfig, InitImage, Job, Mode, ParallelConfig, SchedulerName
from hpcrender.gigapixel.job import open_store
from hpcrender.gigapixel.render import plan_for, render_gigapixel
from hpcrender.errors import ManifestError
from hpcrender.manifest import load_manifest
from hpcrender.models import load_controlnet, load_pipeline
from hpcrender.models.facts import facts_of
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.render.checkpoint import read_checkpoint, write_checkpoint
from hpcrender.render.control import kept, load_control_image
from hpcrender.render.image import render_image
from hpcrender.render.samplers import make_scheduler

from clirun import hpcrender, meta_of, write_manifest

SIZE = (64, 48)  # width, height
ALONE = (GroupLayout(size=1, rank=0, mode=Mode.NONE), Comms(None, None, (0,)))
MODELS = ("tiny-sd", "tiny-sdxl")


@pytest.fixture(scope="module")
def pipes():
    return {name: load_pipeline(f"builtin:{name}") for name in MODELS}


@pytest.fixture(scope="module")
def nets():
    return {name: load_controlnet(f"builtin:{name}-controlnet") for name in MODELS}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two conditioning images of another size than the jobs' (resized): edges-like noise and its mirror, RGBA."""
    folder = tmp_path_factory.mktemp("control")
    rng = np.random.default_rng(3)
    edges = folder / "edges.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 4), dtype=np.uint8), "RGBA").save(edges)
    mirrored = folder / "mirrored.png"
    Image.open(edges).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    start = folder / "start.png"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(start)
    return {"edges": edges, "mirrored": mirrored, "start": start}


def control(model: str, image, **kw) -> ControlNetConfig:
    return ControlNetConfig(model=f"builtin:{model}-controlnet", image=str(image), sha256="-", **kw)


def job(model: str, controls=(), **kw) -> Job:
    fields = dict(name="a", prompt="a harbor at dawn", width=SIZE[0], height=SIZE[1], seed=7, model=f"builtin:{model}",
                  steps=4, negative_prompt="fog", parallel=ParallelConfig(mode=Mode.NONE), controlnets=tuple(controls))
    fields.update(kw)
    return Job(**fields)


def diffusers_controlnet(pipe, controlnet, scheduler: SchedulerName, img2img: bool = False):
    """diffusers' own ControlNet pipeline of the same components and the job's sampler."""
    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor",
                                                                    "safety_checker")}
    parts["scheduler"] = make_scheduler(scheduler, pipe.scheduler.config)
    if "text_encoder_2" in parts:
        built = StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet, force_zeros_for_empty_prompt=True,
                                                    add_watermarker=False)
    else:
        cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
        built = cls(**parts, controlnet=controlnet, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)
    built.set_progress_bar_config(disable=True)
    return built


def diffusers_latent(pipe, nets_of_job, render: Job, **extra) -> torch.Tensor:
    """diffusers' ControlNet pipeline's final latent for `render`: the conditioning images as PIL images (resized by
    diffusers' control image processor), a CPU generator seeded by the job's seed, no latents."""
    controls = render.controlnets
    single = len(controls) == 1
    controlnet = nets_of_job[0] if single else MultiControlNetModel(list(nets_of_job))
    built = diffusers_controlnet(pipe, controlnet, render.scheduler, img2img="image" in extra)
    images = [Image.open(c.image) for c in controls]
    per = (lambda values: values[0]) if single else list
    keyword = "control_image" if "image" in extra else "image"
    return built(render.prompt, negative_prompt=render.negative_prompt, num_inference_steps=render.steps,
                 height=render.height, width=render.width, guidance_scale=render.guidance_scale,
                 **{keyword: per(images)},
                 controlnet_conditioning_scale=per([c.scale for c in controls]),
                 control_guidance_start=per([c.start for c in controls]),
                 control_guidance_end=per([c.end for c in controls]),
                 generator=torch.Generator("cpu").manual_seed(render.seed), output_type="latent", **extra).images[0]


# --- the builtin ControlNets and the conditioning image ----------------------------------------------------------

def test_builtin_controlnets_are_the_unets_copy_with_seeded_zero_convolutions(pipes, nets):
    for model in MODELS:
        unet, net = pipes[model].unet, nets[model]
        shared = {k: v for k, v in net.state_dict().items() if not k.startswith("controlnet_")}
        assert shared and all(torch.equal(v, unet.state_dict()[k]) for k, v in shared.items()), model
        zero_convs = [m.weight for m in (*net.controlnet_down_blocks, net.controlnet_mid_block)]
        assert all(w.abs().mean() > 1e-3 for w in zero_convs), "zero convolutions left at zero have no effect"
        again = load_controlnet(f"builtin:{model}-controlnet")
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    own = nets["tiny-sd"].controlnet_down_blocks[0].weight.flatten()[:8]
    assert not torch.equal(own, nets["tiny-sdxl"].controlnet_down_blocks[0].weight.flatten()[:8])


def test_a_controlnet_loads_from_a_diffusers_folder_or_its_controlnet_subfolder(nets, tmp_path):
    from hpcrender.errors import ModelNotFound
    from hpcrender.render.options import controlnet_problem

    nets["tiny-sd"].save_pretrained(tmp_path / "own")
    nets["tiny-sd"].save_pretrained(tmp_path / "pipeline" / "controlnet")
    for folder in (tmp_path / "own", tmp_path / "pipeline"):
        loaded = load_controlnet(str(folder))
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in nets["tiny-sd"].state_dict().items())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="config.json is missing"):
        load_controlnet(str(tmp_path / "empty"))
    unet = dict(load_pipeline("builtin:tiny-sd").unet.config)
    assert controlnet_problem(dict(nets["tiny-sd"].config), unet) is None
    assert "made for another UNet: its cross_attention_dim" in controlnet_problem(
        dict(nets["tiny-sd"].config, cross_attention_dim=64), unet)
    assert "a SD3ControlNetModel" in controlnet_problem({"_class_name": "SD3ControlNetModel"}, unet)


def test_the_control_image_is_prepared_as_diffusers_control_image_processor_prepares_it(images):
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    for name in ("edges", "start"):  # resized (and its alpha dropped), and already the job's size
        ours = load_control_image(str(images[name]), *SIZE)
        theirs = processor.preprocess(Image.open(images[name]), height=SIZE[1], width=SIZE[0])
        assert torch.equal(ours, theirs) and ours.stride() == theirs.stride()
        assert 0.0 <= ours.min() and ours.max() <= 1.0 and ours.shape == (1, 3, SIZE[1], SIZE[0])


def test_a_controlnet_is_kept_between_start_and_end_of_the_calls_run():
    assert [kept(i, 10, 0.0, 1.0) for i in range(10)] == [1.0] * 10
    assert [kept(i, 10, 0.2, 0.5) for i in range(10)] == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    assert [kept(i, 3, 0.0, 0.5) for i in range(3)] == [1, 0, 0]  # (i + 1) / n > end drops the call ending past it


def test_a_controlnets_exchange_buffers_take_p2p_tags_past_the_unets():
    """Displaced buckets of the UNet and its ControlNets are in flight together on one group: their tags differ."""
    from hpcrender.config import GroupNormMode
    from hpcrender.errors import BadInput
    from hpcrender.parallel.bands import Band
    from hpcrender.parallel.plan import TAGS_PER_SET, BandContext, PatchPlan

    unet = PatchPlan(mode=Mode.DISPLACED, groupnorm=GroupNormMode.CORRECTED, warmup_steps=1, bands=(Band(0, 4),),
                     rank=0, calls_per_step=2)
    controlnet = dataclasses.replace(unet, first_buffer_set=unet.buffer_sets)
    unet_tags = {e.tag_base for e in BandContext(unet, None).exchanges}
    control_tags = {e.tag_base for e in BandContext(controlnet, None).exchanges}
    assert unet_tags == {0, TAGS_PER_SET} and control_tags == {2 * TAGS_PER_SET, 3 * TAGS_PER_SET}
    with pytest.raises(BadInput, match="first set of exchange buffers"):
        dataclasses.replace(unet, first_buffer_set=-1)


# --- equal to diffusers' own ControlNet pipelines -------------------------------------------------------------------

CASES = [("tiny-sd", SchedulerName.EULER, 1.0, 0.0, 1.0),
         ("tiny-sd", SchedulerName.EULER_A, 0.7, 0.25, 1.0),
         ("tiny-sdxl", SchedulerName.EULER, 0.8, 0.0, 0.75),
         ("tiny-sdxl", SchedulerName.DPMPP_2M_SDE, 1.2, 0.0, 1.0),
         ("tiny-sd", SchedulerName.HEUN, 0.9, 0.0, 0.6)]


@pytest.mark.parametrize("model, scheduler, scale, start, end", CASES,
                         ids=[f"{m}-{s.value}-{a}-{b}" for m, s, _, a, b in CASES])
def test_text_to_image_with_controlnet_equals_diffusers_controlnet_pipeline_bit_for_bit(pipes, nets, images, model,
                                                                                       scheduler, scale, start, end):
    render = job(model, [control(model, images["edges"], scale=scale, start=start, end=end)], scheduler=scheduler)
    ours = render_image(pipes[model], render, *ALONE, "cpu", controlnets=(nets[model],))
    assert torch.equal(torch.from_numpy(ours.latent), diffusers_latent(pipes[model], (nets[model],), render))


def test_several_controlnets_equal_diffusers_multicontrolnet_bit_for_bit(pipes, nets, images):
    second = load_controlnet("builtin:tiny-sd-controlnet")  # a second, different ControlNet: other zero convolutions
    with torch.no_grad():
        for m in (*second.controlnet_down_blocks, second.controlnet_mid_block):
            m.weight.mul_(-0.5)
    render = job("tiny-sd", [control("tiny-sd", images["edges"], scale=0.6, start=0.0, end=0.5),
                             control("tiny-sd", images["mirrored"], scale=1.1, start=0.25, end=1.0)],
                 scheduler=SchedulerName.EULER_A)
    pair = (nets["tiny-sd"], second)
    ours = render_image(pipes["tiny-sd"], render, *ALONE, "cpu", controlnets=pair)
    assert torch.equal(torch.from_numpy(ours.latent), diffusers_latent(pipes["tiny-sd"], pair, render))
    first_only = render_image(pipes["tiny-sd"], dataclasses.replace(render, controlnets=render.controlnets[:1]),
                              *ALONE, "cpu", controlnets=pair[:1])
    assert np.abs(first_only.latent - ours.latent).mean() > 1e-3


@pytest.mark.parametrize("scheduler, strength", [(SchedulerName.EULER, 0.6), (SchedulerName.EULER_A, 0.75)])
def test_img2img_with_controlnet_equals_diffusers_controlnet_img2img_pipeline_bit_for_bit(pipes, nets, images,
                                                                                         scheduler, strength):
    """The keeps count the calls after the strength's cut, as diffusers' img2img ControlNet pipeline counts them."""
    render = job("tiny-sd", [control("tiny-sd", images["edges"], scale=0.9, start=0.0, end=0.7)],
                 init_image=InitImage(str(images["start"]), "-", strength), steps=6, scheduler=scheduler)
    ours = render_image(pipes["tiny-sd"], render, *ALONE, "cpu", controlnets=(nets["tiny-sd"],))
    assert ours.first_step > 0
    theirs = diffusers_latent(pipes["tiny-sd"], (nets["tiny-sd"],), render, image=Image.open(images["start"]),
                              strength=strength)
    assert torch.equal(torch.from_numpy(ours.latent), theirs)


def test_scale_zero_gives_the_image_without_controlnet_and_scale_one_changes_it(pipes, nets, images):
    for model in MODELS:
        plain = render_image(pipes[model], job(model), *ALONE, "cpu")
        for scale, same in ((0.0, True), (1.0, False)):
            render = job(model, [control(model, images["edges"], scale=scale)])
            got = render_image(pipes[model], render, *ALONE, "cpu", controlnets=(nets[model],))
            assert np.array_equal(got.latent, plain.latent) is same, (model, scale)
            assert np.array_equal(got.image, plain.image) is same, (model, scale)
        mirrored = render_image(pipes[model], job(model, [control(model, images["mirrored"])]), *ALONE, "cpu",
                                controlnets=(nets[model],))
        assert np.abs(mirrored.latent - got.latent).mean() > 1e-3, "the conditioning image changes the result"


@pytest.mark.parametrize("scheduler", [SchedulerName.EULER_A, SchedulerName.DPMPP])
def test_a_stopped_render_with_controlnet_resumes_from_its_checkpoint_file_bit_for_bit(pipes, nets, images,
                                                                                      scheduler, tmp_path):
    """Text-to-image and img2img, stopped inside the ControlNet's span and resumed after it ends (end 0.6)."""
    pipe, net = pipes["tiny-sdxl"], (nets["tiny-sdxl"],)
    cn = [control("tiny-sdxl", images["edges"], scale=0.8, end=0.6)]
    for render in (job("tiny-sdxl", cn, steps=6, scheduler=scheduler),
                   job("tiny-sdxl", cn, steps=6, scheduler=scheduler,
                       init_image=InitImage(str(images["start"]), "-", 0.8))):
        whole = render_image(pipe, render, *ALONE, "cpu", controlnets=net)
        done: list[int] = []
        stopped = render_image(pipe, render, *ALONE, "cpu", controlnets=net, on_step=lambda i, n: done.append(i),
                               should_stop=lambda: len(done) == 2)
        assert stopped.image is None and stopped.checkpoint.step == render.first_step + 2
        write_checkpoint(tmp_path / "checkpoint.h5", stopped.checkpoint, "hash")
        resumed = render_image(pipe, render, *ALONE, "cpu", controlnets=net,
                               resume=read_checkpoint(tmp_path / "checkpoint.h5", "hash"))
        assert resumed.resumed_from == render.first_step + 2
        assert np.array_equal(resumed.latent, whole.latent) and np.array_equal(resumed.image, whole.image)


# --- the manifest ---------------------------------------------------------------------------------------------------

def write(folder, text: str):
    path = folder / "jobs.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_the_controlnet_key_in_defaults_or_a_job_one_table_or_a_list(tmp_path, images):
    (tmp_path / "edges.png").write_bytes(images["edges"].read_bytes())
    path = write(tmp_path, """
        [defaults]
        model = "builtin:tiny-sd"
        controlnet = { model = "builtin:tiny-sd-controlnet", image = "edges.png" }
        [[jobs]]
        name = "inherits"
        prompt = "x"
        [[jobs]]
        name = "two"
        prompt = "x"
        controlnet = [{ model = "builtin:tiny-sd-controlnet", image = "edges.png", scale = 0.5, start = 0.1, end = 0.9 },
                      { model = "builtin:tiny-sd-controlnet", image = "edges.png", scale = 2 }]
        [[jobs]]
        name = "none"
        prompt = "x"
        controlnet = []
        [[jobs]]
        name = "table"
        prompt = "x"
        [jobs.controlnet]
        model = "builtin:tiny-sd-controlnet"
        image = "edges.png"
        scale = 0.25
        """)
    inherits, two, none, table = load_manifest(path).jobs
    digest = hashlib.sha256(images["edges"].read_bytes()).hexdigest()
    image = str(tmp_path / "edges.png")
    plain = ControlNetConfig(model="builtin:tiny-sd-controlnet", image=image, sha256=digest)
    assert inherits.controlnets == (plain,)
    assert two.controlnets == (dataclasses.replace(plain, scale=0.5, start=0.1, end=0.9),
                               dataclasses.replace(plain, scale=2.0))
    assert none.controlnets == () and table.controlnets == (dataclasses.replace(plain, scale=0.25),)
    # The image's content is part of the job, not where it lies; a job without a ControlNet keeps its old hash.
    moved = dataclasses.replace(inherits, controlnets=(dataclasses.replace(plain, image="/elsewhere.png"),))
    assert moved.params_hash() == inherits.params_hash()
    assert dataclasses.replace(plain, sha256="0" * 64) != plain
    changed = dataclasses.replace(inherits, controlnets=(dataclasses.replace(plain, sha256="0" * 64),))
    assert changed.params_hash() != inherits.params_hash()


BAD_LINES = [
    ('controlnet = "builtin:tiny-sd-controlnet"', "jobs[a].controlnet: must be a table"),
    ('controlnet = { image = "edges.png" }', "jobs[a].controlnet.model: missing"),
    ('controlnet = { model = "builtin:tiny-sd-controlnet" }', "jobs[a].controlnet.image: missing"),
    ('controlnet = { model = "builtin:tiny-sd-controlnett", image = "edges.png" }',
     "jobs[a].controlnet.model: unknown builtin ControlNet 'tiny-sd-controlnett' (builtins: tiny-sd-controlnet, "
     "tiny-sdxl-controlnet) (did you mean 'tiny-sd-controlnet'?)"),
    ('controlnet = { model = "weights.safetensors", image = "edges.png" }', "jobs[a].controlnet.model: "),
    ('controlnet = { model = "./nowhere", image = "edges.png" }', "jobs[a].controlnet.model: no such folder"),
    ('controlnet = { model = "builtin:tiny-sd-controlnet", image = "gone.png" }',
     "jobs[a].controlnet.image: no such file"),
    ('controlnet = { model = "builtin:tiny-sd-controlnet", image = "notes.png" }',
     "jobs[a].controlnet.image: cannot read"),
    ('controlnet = { model = "builtin:tiny-sd-controlnet", image = "edges.png", scale = -1 }',
     "jobs[a].controlnet.scale: must be >= 0, got -1"),
    ('controlnet = { model = "builtin:tiny-sd-controlnet", image = "edges.png", scale = true }',
     "jobs[a].controlnet.scale: must be a number, got true"),
    ('controlnet = { model = "builtin:tiny-sd-controlnet", image = "edges.png", start = 1.5 }',
     "jobs[a].controlnet.start: must be in [0, 1], got 1.5"),
    ('controlnet = { model = "builtin:tiny-sd-controlnet", image = "edges.png", start = 0.6, end = 0.4 }',
     "jobs[a].controlnet.start: must be smaller than end (0.4), got 0.6"),
    ('controlnet = { model = "builtin:tiny-sd-controlnet", image = "edges.png", weight = 1 }',
     "jobs[a].controlnet.weight: unknown key (known: model, image, scale, start, end)"),
    ('controlnet = [{ model = "builtin:tiny-sd-controlnet", image = "edges.png" }, { image = "edges.png" }]',
     "jobs[a].controlnet[1].model: missing"),
]


@pytest.mark.parametrize("line, fragment", BAD_LINES, ids=[f[1].split(":")[0] + str(i)
                                                           for i, f in enumerate(BAD_LINES)])
def test_each_bad_controlnet_value_is_one_line_with_its_key(tmp_path, images, line, fragment):
    (tmp_path / "edges.png").write_bytes(images["edges"].read_bytes())
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "weights.safetensors").write_bytes(b"\0" * 16)
    path = write(tmp_path, f'[[jobs]]\nname = "a"\nprompt = "x"\nmodel = "builtin:tiny-sd"\n{line}\n')
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.problems[0].startswith(f"{path}:5: {fragment}"), caught.value.problems
    assert len(caught.value.problems) == 1, caught.value.problems


def test_a_controlnet_on_a_gigapixel_job_is_refused_and_one_from_defaults_is_not_inherited(tmp_path, images):
    (tmp_path / "edges.png").write_bytes(images["edges"].read_bytes())
    path = write(tmp_path, """
        [defaults]
        controlnet = { model = "builtin:tiny-sdxl-controlnet", image = "edges.png" }
        [[jobs]]
        name = "giga"
        prompt = "x"
        width = 2048
        height = 2048
        [jobs.gigapixel]
        base = 512
        """)
    assert load_manifest(path).jobs[0].controlnets == ()
    path.write_text(path.read_text().replace('[jobs.gigapixel]', 'controlnet = { model = "builtin:tiny-sdxl-'
                                             'controlnet", image = "edges.png" }\n[jobs.gigapixel]'))
    with pytest.raises(ManifestError, match=r"jobs\[giga\]\.controlnet: does not apply to a gigapixel job"):
        load_manifest(path)


# --- through the commands -------------------------------------------------------------------------------------------

def test_validate_refuses_a_controlnet_on_a_transformer_or_for_another_unet_before_loading(tmp_path, images):
    (tmp_path / "edges.png").write_bytes(images["edges"].read_bytes())
    manifest = write_manifest(tmp_path / "jobs.toml", textwrap.dedent("""
        [defaults]
        width = 64
        height = 64
        [defaults.parallel]
        mode = "none"
        [[jobs]]
        name = "fine"
        prompt = "x"
        model = "builtin:tiny-sdxl"
        controlnet = { model = "builtin:tiny-sdxl-controlnet", image = "edges.png" }
        [[jobs]]
        name = "pixart"
        prompt = "x"
        model = "builtin:tiny-pixart"
        controlnet = { model = "builtin:tiny-sd-controlnet", image = "edges.png" }
        [[jobs]]
        name = "mismatch"
        prompt = "x"
        model = "builtin:tiny-sd"
        controlnet = { model = "builtin:tiny-sdxl-controlnet", image = "edges.png" }
        """))
    for command in (("validate", manifest, "--ranks", "1"), ("render", manifest, "--out", tmp_path / "out")):
        done = hpcrender(*command, timeout=300)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 2, lines
        assert "jobs[pixart]: controlnet: ControlNet applies to the UNets of SD 1.x/2.x and SDXL" in lines[0]
        assert "jobs[mismatch]: controlnet.model: builtin:tiny-sdxl-controlnet: made for another UNet: its " \
               "block_out_channels" in lines[1]
        assert not (tmp_path / "out" / "fine").exists()


def test_a_rendered_controlnet_job_equals_the_in_process_render(tmp_path, pipes, nets, images):
    """The render command loads the ControlNet by its reference and conditions the job with it."""
    (tmp_path / "edges.png").write_bytes(images["edges"].read_bytes())
    manifest = write_manifest(tmp_path / "jobs.toml", textwrap.dedent(f"""
        [defaults]
        model = "builtin:tiny-sd"
        width = {SIZE[0]}
        height = {SIZE[1]}
        steps = 4
        seed = 7
        negative_prompt = "fog"
        [defaults.parallel]
        mode = "none"
        [[jobs]]
        name = "edges"
        prompt = "a harbor at dawn"
        controlnet = {{ model = "builtin:tiny-sd-controlnet", image = "edges.png", scale = 0.7, end = 0.75 }}
        """))
    done = hpcrender("render", manifest, "--out", tmp_path / "out", "--save-latent", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    render = load_manifest(manifest).jobs[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command ran (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        ours = render_image(pipes["tiny-sd"], render, *ALONE, "cpu", controlnets=(nets["tiny-sd"],))
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(np.load(tmp_path / "out" / "edges" / "latent.npy"), ours.latent)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "edges" / "image.png").convert("RGB")), ours.image)


# --- stretch: a gigapixel job's tiles conditioned on their upscaled reference boxes ----------------------------------

GIGA = Job(name="giga", prompt="an aerial harbor", width=256, height=192, seed=5, model="builtin:tiny-sdxl", steps=2,
           guidance_scale=1.0, parallel=ParallelConfig(mode=Mode.NONE),
           gigapixel=GigapixelConfig(base=96, tile=64, overlap=16, strength=0.5))


def giga_levels(pipe, job: Job, folder, controlnet=None) -> list[np.ndarray]:
    plan = plan_for(facts_of(pipe), job)
    with open_store(folder, job, plan) as store:
        render_gigapixel(pipe, job, store, *ALONE, "cpu", controlnet=controlnet)
        return [np.asarray(store.read_level(lp.index, 0, lp.height, 0, lp.width)) for lp in plan.levels]


GIGA_TOML = """
[[jobs]]
name = "giga"
prompt = "an aerial harbor"
model = "builtin:tiny-sdxl"
width = 256
height = 192
seed = 5
steps = 2
guidance_scale = 1.0
[jobs.parallel]
mode = "none"
[jobs.gigapixel]
base = 96
tile = 64
overlap = 16
strength = 0.5
controlnet = "builtin:tiny-sdxl-controlnet"
"""


@pytest.fixture(scope="module")
def giga(pipes, nets, tmp_path_factory):
    """The gigapixel job with a tile ControlNet and without, rendered in-process on one thread (as the command runs):
    (its manifest, its levels, the levels without the ControlNet)."""
    folder = tmp_path_factory.mktemp("giga")
    manifest = write_manifest(folder / "giga.toml", GIGA_TOML)
    job = load_manifest(manifest).jobs[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = giga_levels(pipes["tiny-sdxl"], GIGA, folder / "plain")
        tiled = giga_levels(pipes["tiny-sdxl"], job, folder / "tiled", controlnet=nets["tiny-sdxl"])
    finally:
        torch.set_num_threads(threads)
    return manifest, tiled, plain


def test_a_gigapixel_tile_controlnet_conditions_every_tile_and_the_render_command_gives_the_same_bytes(giga,
                                                                                                     tmp_path):
    manifest, tiled, plain = giga
    job = load_manifest(manifest).jobs[0]
    assert job == dataclasses.replace(GIGA, gigapixel=dataclasses.replace(GIGA.gigapixel,
                                                                          controlnet="builtin:tiny-sdxl-controlnet"))
    assert job.params_hash() != GIGA.params_hash()
    assert np.array_equal(plain[0], tiled[0]), "the base render has no reference to be conditioned on"
    for level in range(1, len(plain)):
        assert np.abs(plain[level].astype(int) - tiled[level].astype(int)).mean() > 0.5, level
    done = hpcrender("render", manifest, "--out", tmp_path / "out", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "giga" / "image.png").convert("RGB")), tiled[-1])
    bad = write_manifest(tmp_path / "bad.toml", GIGA_TOML.replace('"builtin:tiny-sdxl-controlnet"',
                                                                              '"builtin:tiny-sd-controlnet"'))
    refused = hpcrender("render", bad, "--out", tmp_path / "bad", timeout=300)
    assert refused.returncode == 2 and "gigapixel.controlnet: builtin:tiny-sd-controlnet: made for another UNet" \
        in refused.stderr, refused.stderr


@pytest.mark.mpi
def test_on_two_ranks_controlnet_traffic_is_counted_and_gigapixel_tiles_keep_their_controlnet_in_bands(giga, images,
                                                                                                      tmp_path):
    """One launch: a displaced ControlNet job's meta.json counts the ControlNet's exchange beside the UNet's, and the
    gigapixel job's tiles, band-parallel in sync mode with the tile ControlNet cut to each band, give the one-process
    image within a level or two (uint8 rounding carried through the levels)."""
    (tmp_path / "edges.png").write_bytes(images["edges"].read_bytes())
    manifest = write_manifest(tmp_path / "jobs.toml", GIGA_TOML.replace('mode = "none"', 'mode = "sync"') + """
[[jobs]]
name = "edges"
prompt = "a lighthouse"
model = "builtin:tiny-sdxl"
width = 128
height = 160
steps = 3
controlnet = { model = "builtin:tiny-sdxl-controlnet", image = "edges.png", scale = 0.7 }
[jobs.parallel]
mode = "displaced"
warmup_steps = 1
""")
    done = hpcrender("render", manifest, "--out", tmp_path / "out", ranks=2, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    exchange = meta_of(tmp_path / "out", "edges")["exchange"]
    assert 0 < exchange["controlnet_bytes_total"] < exchange["bytes_total"] == sum(exchange["bytes_sent"])
    banded = np.asarray(Image.open(tmp_path / "out" / "giga" / "image.png").convert("RGB")).astype(int)
    alone = giga[1][-1].astype(int)
    mse = ((banded - alone) ** 2).mean()
    assert np.abs(banded - alone).max() <= 4 and (mse == 0 or 10 * np.log10(255 ** 2 / mse) > 50), mse
