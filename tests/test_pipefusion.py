"""PipeFusion: the pipeline arithmetic (blocks, their cost, balanced stages, patches, bytes per step, weights per
stage) exhaustively; on 2, 3 and 4 MPI ranks the tiny PixArt, SD3 and Flux against one process; what cannot work
refused before anything loads; meta.json's parameter bytes and bytes per step against the plan's."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpcrender.errors import DoesNotFit
from hpcrender.manifest import load_manifest
from hpcrender.models import dit
from hpcrender.models.shapes import model_shape
from hpcrender.parallel.bands import Band
from hpcrender.parallel.pipeline import (
    Block, BlockKind, Stage, balanced_stages, block_macs, kv_buffer_bytes, model_blocks, patch_count,
    pipeline_layout, pipeline_patches, stage_parameters,
)
from hpcrender.run.plan import make_run_plan, selected_jobs

from clirun import MPIEXEC, hpcrender, write_manifest
from lora_files import make_lora

SCRIPTS = Path(__file__).parent / "mpi_scripts"


# --- arithmetic ---------------------------------------------------------------------------------------------------

def _cuts(n: int, parts: int):
    """Every cut of n blocks into `parts` non-empty contiguous stages, as tuples of stage ends."""
    for inner in itertools.combinations(range(1, n), parts - 1):
        yield inner + (n,)


@pytest.mark.parametrize("n", range(1, 7))
def test_balanced_stages_are_the_least_costly_cut_with_the_longest_first_stages(n):
    for costs in itertools.product((0, 1, 2, 5), repeat=n):
        for parts in range(1, n + 1):
            stages = balanced_stages(costs, parts)
            assert len(stages) == parts and stages[0].start == 0 and stages[-1].stop == n
            assert all(a.stop == b.start for a, b in zip(stages, stages[1:])) and all(s.size >= 1 for s in stages)

            def worst(ends):
                starts = (0,) + ends[:-1]
                return max(sum(costs[a:b]) for a, b in zip(starts, ends))

            best = min(worst(ends) for ends in _cuts(n, parts))
            ends = tuple(s.stop for s in stages)
            assert worst(ends) == best
            assert ends == max(e for e in _cuts(n, parts) if worst(e) == best)


def test_fewer_blocks_than_stages_are_refused():
    with pytest.raises(DoesNotFit, match="4 transformer block"):
        balanced_stages([1, 1, 1, 1], 5)


@pytest.mark.parametrize("align", [1, 2, 4])
@pytest.mark.parametrize("latent_rows", [8, 13, 14, 30])
def test_patches_are_whole_token_rows_the_larger_first(latent_rows, align):
    rows = latent_rows // align
    for count in range(1, rows + 1):
        patches = pipeline_patches(latent_rows, align, count)
        assert len(patches) == count and patches[0].start == 0 and patches[-1].stop == latent_rows
        assert all(a.stop == b.start for a, b in zip(patches, patches[1:]))
        assert all(p.stop % align == 0 for p in patches[:-1])
        token_rows = [p.size // align for p in patches]
        assert max(token_rows) - min(token_rows) <= 1 and token_rows == sorted(token_rows, reverse=True)
    with pytest.raises(DoesNotFit, match="token row"):
        pipeline_patches(latent_rows, align, rows + 1)


def test_patch_count_defaults_to_the_stages_and_refuses_fewer():
    assert patch_count(0, 3) == 3 and patch_count(7, 3) == 7
    with pytest.raises(DoesNotFit, match="fewer than the pipeline's 3 stages"):
        patch_count(2, 3)


def test_the_tiny_transformers_have_four_blocks_in_their_forward_order():
    sd3 = model_blocks(dit.transformer_config("tiny-sd3"))
    assert [b.kind for b in sd3] == [BlockKind.JOINT] * 4
    assert [b.dual for b in sd3] == [True, False, False, False] and [b.text_ends for b in sd3] == [0, 0, 0, 1]
    flux = model_blocks(dit.transformer_config("tiny-flux"))
    assert [b.kind for b in flux] == [BlockKind.JOINT] * 2 + [BlockKind.SINGLE] * 2
    assert model_blocks(dit.transformer_config("tiny-pixart")) == (Block(BlockKind.PIXART),) * 4
    # a dual-attention block costs more, a block whose text ends inside it less: the split follows the cost
    config = dit.transformer_config("tiny-sd3")
    costs = [block_macs(b, 64, 32, 32, 1) for b in sd3]
    assert costs[0] > costs[1] == costs[2] > costs[3]
    layout = pipeline_layout(config, 3, 0, 14, 8, 32, 16)
    assert layout.stages == (Stage(0, 1), Stage(1, 2), Stage(2, 4))


def test_bytes_per_step_and_kept_keys_values_by_stage():
    config = dit.transformer_config("tiny-sd3")   # 32 channels a token, patch 2
    layout = pipeline_layout(config, 2, 5, 14, 8, 32, 16)
    assert layout.patches == (Band(0, 4), Band(4, 8), Band(8, 10), Band(10, 12), Band(12, 14))
    tokens = 7 * 4  # token rows x token columns
    # stage 0: every patch's tokens and, beside each patch, the text stream (32 tokens), batch 2, float32
    assert layout.step_bytes(0, 2, 4, sync=False) == 2 * tokens * 32 * 4 + 5 * 2 * 32 * 32 * 4
    assert layout.step_bytes(0, 2, 4, sync=True) == 2 * tokens * 32 * 4 + 2 * 32 * 32 * 4
    # the last stage: the model's output (16 channels of 14 x 8) to the one other stage
    assert layout.step_bytes(1, 2, 4, sync=False) == 2 * 16 * 14 * 8 * 4
    # stage 0 holds blocks 0 and 1: three image attentions (block 0 has two), keys and values of every token
    assert kv_buffer_bytes(layout, 0, 2, 4) == 3 * 2 * tokens * 2 * 32 * 4
    pixart = pipeline_layout(dit.transformer_config("tiny-pixart"), 2, 0, 14, 8, 16, 8)
    assert not pixart.text_crosses(0)  # PixArt's text is projected on every stage: only the image tokens cross
    assert pixart.step_bytes(0, 2, 4, sync=False) == 2 * tokens * 24 * 4


@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-sd3", "tiny-flux"])
def test_stage_weights_add_up_to_the_model_with_the_conditioning_on_every_stage(name):
    shape = model_shape(f"builtin:{name}")
    blocks, first, last, shared = shape.parameter_split
    assert sum(blocks) + first + last + shared == shape.parameters
    for parts in (2, 3, 4):
        stages = balanced_stages(blocks, parts)
        held = [stage_parameters(shape.parameter_split, stages, k) for k in range(parts)]
        assert sum(held) == shape.parameters + (parts - 1) * shared


# --- on MPI ranks -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[2, 3, 4])
def checks(request):
    """pipefusion_checks.py on 2, 3 and 4 ranks (4: split_cfg only)."""
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS)}
    result = subprocess.run([str(MPIEXEC), "-n", str(request.param), sys.executable,
                             str(SCRIPTS / "pipefusion_checks.py")],
                            capture_output=True, text=True, timeout=400, env={**os.environ, **env}, cwd=SCRIPTS)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["world_size"] == request.param
    return report


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-sd3", "tiny-flux"])
def test_pipefusion_against_one_process_and_bands(checks, name):
    size = checks["world_size"]
    if size == 4:
        pytest.skip("4 ranks: split_cfg only")
    entry = checks["models"][name]
    assert len(entry["stages"]) == size and len(entry["patches"]) == 2 * size + 1
    heights = {b - a for a, b in entry["patches"]}  # 7 token rows: 5 patches uneven on 2 ranks, 3 on 3 ranks
    assert len(heights) > 1 if size == 2 else len({b - a for a, b in entry["stages"]}) > 1, entry
    for patches in (size, 2 * size + 1):  # every step synchronous: one process's render
        assert entry[f"sync_m{patches}"]["error"] <= 1e-4 and entry[f"sync_m{patches}"]["png_max_diff"] <= 1
    stale, displaced, naive = (entry[k]["psnr"] for k in ("pipefusion_warmup1", "displaced_warmup1", "naive_warmup1"))
    assert entry["naive_warmup1"]["error"] > 1e-4, "naive bands must differ, or the comparison says nothing"
    assert stale >= naive + 3.0 and stale >= displaced - 1.0, entry
    assert entry["sync_steps"] == 1 and entry["bytes_match"], entry
    whole, blocks = entry["model_parameter_bytes"], entry["block_parameter_bytes"]
    others = whole - sum(blocks)  # embedders, head and the conditioning every stage holds
    for (start, stop), held in zip(entry["stages"], entry["parameter_bytes"]):
        assert held <= sum(blocks[start:stop]) + others
        assert held < whole
    if size == 2 and name != "tiny-flux":
        assert all(held <= whole / size + others for held in entry["parameter_bytes"])
    # Flux's stages balance compute: its joint blocks cost about what its single-stream ones do per token but hold
    # twice the weights (a text and an image stream), so the stage of the joint blocks holds more than 1/K.


@pytest.mark.mpi
def test_pipefusion_img2img_resume_and_split_cfg(checks):
    models = checks["models"]
    if checks["world_size"] == 4:
        for name in ("tiny-pixart", "tiny-sd3"):
            result = models[name]["split_cfg_sync"]
            assert result["error"] <= 1e-4 and result["png_max_diff"] <= 1
        return
    sd3 = models["tiny-sd3"]
    assert sd3["img2img_sync"]["error"] <= 1e-4 and sd3["img2img_sync"]["png_max_diff"] <= 1
    assert sd3["stopped_at_w4"] == 2 and sd3["resumed_w4"]["equal"]
    # one warm-up step: the resumed render warms up again, as displaced does
    assert sd3["stopped_at_w1"] == 2 and 0 < sd3["resumed_w1"]["error"] < 1e-2


# --- refused before loading; meta.json against the plan ------------------------------------------------------------

REFUSED = """
[defaults]
steps = 2
width = 64
height = 64
prompt = "a lighthouse"
[defaults.parallel]
mode = "pipefusion"

[[jobs]]
name = "unet"
model = "builtin:tiny-sd"
[jobs.parallel]
ranks_per_image = 2

[[jobs]]
name = "few-patches"
model = "builtin:tiny-pixart"
[jobs.parallel]
pipeline_patches = 3

[[jobs]]
name = "many-patches"
model = "builtin:tiny-pixart"
[jobs.parallel]
ranks_per_image = 2
pipeline_patches = 5
"""


def test_what_pipefusion_cannot_run_is_refused_before_loading_with_exit_2(tmp_path):
    manifest = write_manifest(tmp_path / "m.toml", REFUSED)
    r = hpcrender("plan", manifest, "--ranks", "4")
    assert r.returncode == 2, r.stderr
    lines = {line.split("jobs[")[1].split("]")[0]: line for line in r.stderr.splitlines() if "jobs[" in line}
    assert len(lines) == 3, r.stderr
    assert "skip connections" in lines["unet"]
    assert "fewer than the pipeline's 4 stages" in lines["few-patches"]
    assert "4 token row(s)" in lines["many-patches"]
    five = write_manifest(tmp_path / "five.toml", REFUSED.split("[[jobs]]")[0] + '[[jobs]]\nname = "five"\n'
                          'model = "builtin:tiny-flux"\n')
    r = hpcrender("plan", five, "--ranks", "5")
    assert r.returncode == 2 and "4 transformer block(s) cannot be cut into 5 stages" in r.stderr, r.stderr


RENDER = """
[defaults]
steps = 3
width = 64
height = 112
prompt = "a lighthouse"
[defaults.parallel]
mode = "pipefusion"
warmup_steps = 1
pipeline_patches = 5

[[jobs]]
name = "sd3"
model = "builtin:tiny-sd3"

[[jobs]]
name = "flux"
model = "builtin:tiny-flux"

# gigapixel: every unit on the 2-stage pipeline (the stages balanced at the largest tile), every step synchronous
[[jobs]]
name = "giga"
model = "builtin:tiny-sd3"
width = 256
height = 192
steps = 4
[jobs.parallel]
warmup_steps = 4
[jobs.gigapixel]
base = 128
tile = 128
overlap = 32
strength = 0.5
"""


@pytest.mark.mpi
def test_meta_json_records_each_ranks_weights_and_the_bytes_the_plan_predicts(tmp_path):
    manifest = write_manifest(tmp_path / "m.toml", RENDER)
    out = tmp_path / "out"
    r = hpcrender("render", manifest, "--out", out, ranks=2)
    assert r.returncode == 0, r.stderr
    alone = hpcrender("render", manifest, "--out", tmp_path / "alone", "--only", "giga", "--mode", "none")
    assert alone.returncode == 0, alone.stderr
    giga = [np.asarray(Image.open(o / "giga" / "image.png")).astype(np.int16) for o in (out, tmp_path / "alone")]
    assert giga[0].shape == (192, 256, 3) and np.abs(giga[0] - giga[1]).max() <= 2  # the VAE's bands' rounding
    assert json.loads((out / "giga" / "meta.json").read_text())["gigapixel"]["tiles"] == 4
    loaded = load_manifest(manifest)
    plan = make_run_plan(loaded, selected_jobs(loaded, None), 2, model_shape)
    for index, name in enumerate(("sd3", "flux")):
        meta = json.loads((out / name / "meta.json").read_text())
        layout, exchange = meta["layout"], meta["exchange"]
        assert layout["mode"] == "pipefusion" and layout["stages"] == [[0, 2], [2, 4]]
        assert len(layout["parameter_bytes"]) == 2
        job_plan = plan.jobs[index]
        shape = model_shape(f"builtin:tiny-{name}")
        expected = [stage_parameters(shape.parameter_split, job_plan.pipeline.stages, k) * 4 for k in range(2)]
        assert layout["parameter_bytes"] == expected
        for rank in exchange["per_rank"]:
            assert rank["bytes_sent"][1:] == [job_plan.sent[rank["rank"]]] * 2
        assert (out / name / "image.png").exists()


VERIFY = """
[defaults]
prompt = "a lighthouse on a cliff at night"
width = 64
height = 112
seed = 5
[defaults.parallel]
mode = "pipefusion"
pipeline_patches = 3

# Heun's two calls a step, each with its own kept keys and values; every step synchronous
[[jobs]]
name = "sd3-heun"
model = "builtin:tiny-sd3"
scheduler = "heun"
steps = 3
[jobs.parallel]
warmup_steps = 3

# a LoRA fused before the rank gives back the other stage's weights; every step synchronous, then 1 warm-up of 8
[[jobs]]
name = "flux-lora"
model = "builtin:tiny-flux"
steps = 3
loras = [{ path = "flux.safetensors", scale = 0.8 }]
[jobs.parallel]
warmup_steps = 3

[[jobs]]
name = "pixart-stale"
model = "builtin:tiny-pixart"
steps = 8
[jobs.parallel]
warmup_steps = 1
"""


@pytest.mark.mpi
def test_verify_pipefusion_with_heun_and_a_lora_against_single_device(tmp_path):
    (tmp_path / "flux.safetensors").write_bytes(make_lora("builtin:tiny-flux", tmp_path / "made", 7).read_bytes())
    manifest = write_manifest(tmp_path / "jobs.toml", VERIFY)
    args = [a for job in ("sd3-heun", "flux-lora", "pixart-stale") for a in ("--only", job)]
    done = hpcrender("verify", manifest, *args, "--mode", "pipefusion", "--mode", "naive", ranks=2, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    blocks = {}
    for block in done.stdout.split("verify ")[1:]:
        name, mode = block.split(":")[0], block.split("mode ")[1].split(",")[0]
        values = dict(line.split(": ") for line in block.strip().splitlines()[1:])
        blocks[name, mode] = (float(values["latent relative L2"]), int(values["image max level difference"]),
                              float(values["image PSNR"].split()[0]))
        assert " 2 rank(s)" in block.splitlines()[0]
    for name in ("sd3-heun", "flux-lora"):
        error, level, _ = blocks[name, "pipefusion"]
        assert error <= 1e-4 and level <= 1, blocks
    assert blocks["pixart-stale", "pipefusion"][2] >= blocks["pixart-stale", "naive"][2] + 3, blocks


# --- the model after a plan -----------------------------------------------------------------------------------------

def _snapshot(model) -> dict:
    import hashlib

    return {
        "modules": [(name, id(m)) for name, m in model.named_modules()],
        "processors": [(name, id(m.processor)) for name, m in model.named_modules() if hasattr(m, "set_processor")],
        "hooks": (len(model._forward_pre_hooks), len(model._forward_hooks)),
        "weights": hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values()))
        .hexdigest(),
    }


@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-sd3", "tiny-flux"])
def test_removing_the_plan_restores_the_model_and_a_released_one_serves_its_stage_only(name):
    from hpcrender.config import Job, Mode, ParallelConfig
    from hpcrender.errors import BadInput
    from hpcrender.models import denoiser_of, load_pipeline
    from hpcrender.parallel.layout import Comms, GroupLayout
    from hpcrender.parallel.pipefusion import PipePlan, held_parameter_bytes, pipefuse
    from hpcrender.render.image import render_image

    pipe = load_pipeline(f"builtin:{name}")
    model = denoiser_of(pipe)
    layout = pipeline_layout(model.config, 2, 0, 14, 8, 16, 16)
    before = _snapshot(model)
    handle = pipefuse(model, PipePlan(layout, stage=1, warmup_steps=1), None, (0, 1), hold_only=False)
    assert _snapshot(model) != before
    handle.remove()
    assert _snapshot(model) == before  # bit for bit, the same modules, processors and hooks
    whole = held_parameter_bytes(model)
    handle = pipefuse(model, PipePlan(layout, stage=1, warmup_steps=1), None, (0, 1))
    handle.remove()
    assert held_parameter_bytes(model) < whole  # the first stage's blocks and the embedders given back
    with pytest.raises(BadInput, match="holds only stage 1"):
        pipefuse(model, PipePlan(layout, stage=0, warmup_steps=1), None, (0, 1))
    job = Job(name="j", prompt="p", width=64, height=112, seed=1, model=f"builtin:{name}", steps=1,
              parallel=ParallelConfig(mode=Mode.NONE))
    with pytest.raises(BadInput, match="load it again for mode none"):
        render_image(pipe, job, GroupLayout(1, 0, Mode.NONE), Comms(None, None, (0,)), "cpu")
