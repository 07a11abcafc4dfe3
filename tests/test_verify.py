"""Patch parallelism through the commands: `hpcrender verify` against single-device on 2, 3 and 4 ranks (sync,
displaced, naive, split_cfg; text-to-image and img2img; every sampler, Heun's two calls a step and the stochastic
samplers' noise drawn whole; LoRA adapters fused), a displaced render's meta.json (and one whose warm-up covers every step), and the layouts
that must be refused with exit 2."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from clirun import hpcrender, meta_of, write_manifest
from lora_files import ATTENTION, make_lora, to_kohya

pytestmark = pytest.mark.mpi

# tiny-sdxl: 4 latent rows per coarse row; 288 px high = 36 latent rows = 9 coarse rows -> bands of 20 and 16 rows.
# tiny-sd: 8 latent rows per coarse row; 200 px high = 25 latent rows = 3 coarse rows (+1 row) -> 8, 8, 9.
JOBS = """
[defaults]
prompt = "a lighthouse on a cliff at night"
steps = 6
seed = 5
guidance_scale = 5.0
[defaults.parallel]
mode = "displaced"
warmup_steps = 1

[[jobs]]
name = "xl"
model = "builtin:tiny-sdxl"
width = 256
height = 288

[[jobs]]
name = "sd"
model = "builtin:tiny-sd"
scheduler = "dpmpp"
width = 320
height = 200

[[jobs]]
name = "xl-split"
model = "builtin:tiny-sdxl"
width = 192
height = 160
[jobs.parallel]
mode = "sync"
split_cfg = true

[[jobs]]
name = "too-small"
model = "builtin:tiny-sd"
width = 64
height = 64

[[jobs]]
name = "pairs"
model = "builtin:tiny-sd"
width = 128
height = 128
[jobs.parallel]
ranks_per_image = 2

# img2img: the same layouts, each job starting from an image (the VAE encodes it band-parallel over the group).
[[jobs]]
name = "xl-i2i"
model = "builtin:tiny-sdxl"
width = 256
height = 288
steps = 8
init_image = "sketches/start.png"
strength = 0.75

# img2img: the same layouts, each job starting from an image (the VAE encodes it band-parallel over the group).
[[jobs]]
name = "sd-i2i"
model = "builtin:tiny-sd"
scheduler = "dpmpp"
width = 320
height = 200
steps = 8
init_image = "sketches/start.png"
strength = 0.75

# Every other sampler on 2 ranks (tiny-sdxl 128 x 160: 5 coarse rows -> bands of 12 and 8 latent rows) and on 3
# (tiny-sd 128 x 200: bands of 8, 8 and 9), in the same launches; SD3's flow-matching Heun on 2 (token rows 3 and 2).
[[jobs]]
name = "xl-heun"
model = "builtin:tiny-sdxl"
scheduler = "heun"
width = 128
height = 160

[[jobs]]
name = "xl-euler_a"
model = "builtin:tiny-sdxl"
scheduler = "euler_a"
width = 128
height = 160

[[jobs]]
name = "xl-dpmpp_2m_sde"
model = "builtin:tiny-sdxl"
scheduler = "dpmpp_2m_sde"
width = 128
height = 160

[[jobs]]
name = "xl-dpmpp_2m_karras"
model = "builtin:tiny-sdxl"
scheduler = "dpmpp_2m_karras"
width = 128
height = 160

[[jobs]]
name = "xl-unipc"
model = "builtin:tiny-sdxl"
scheduler = "unipc"
width = 128
height = 160

[[jobs]]
name = "xl-lcm"
model = "builtin:tiny-sdxl"
scheduler = "lcm"
width = 128
height = 160

[[jobs]]
name = "sd-heun"
model = "builtin:tiny-sd"
scheduler = "heun"
width = 128
height = 200

[[jobs]]
name = "sd-euler_a"
model = "builtin:tiny-sd"
scheduler = "euler_a"
width = 128
height = 200

[[jobs]]
name = "sd-dpmpp_2m_sde_karras"
model = "builtin:tiny-sd"
scheduler = "dpmpp_2m_sde_karras"
width = 128
height = 200

[[jobs]]
name = "sd-ddim"
model = "builtin:tiny-sd"
scheduler = "ddim"
width = 128
height = 200

[[jobs]]
name = "sd-unipc"
model = "builtin:tiny-sd"
scheduler = "unipc"
width = 128
height = 200

[[jobs]]
name = "sd-lcm"
model = "builtin:tiny-sd"
scheduler = "lcm"
width = 128
height = 200

[[jobs]]
name = "sd3-heun"
model = "builtin:tiny-sd3"
scheduler = "heun"
width = 64
height = 80

# ControlNet beside the UNet, on the UNet's bands (its conditioning image cut to each band's pixel rows): SDXL on 2
# ranks (12 and 8 latent rows), kept for the first 80% of the calls; SD on 3 (8, 8, 9) with two ControlNets, one
# of them joining at 20% of the calls (its exchange registered in a later step), the same model as the other.
[[jobs]]
name = "xl-controlnet"
model = "builtin:tiny-sdxl"
width = 128
height = 160
controlnet = { model = "builtin:tiny-sdxl-controlnet", image = "sketches/start.png", scale = 0.7, end = 0.8 }

[[jobs]]
name = "xl-split-controlnet"
model = "builtin:tiny-sdxl"
width = 128
height = 160
controlnet = { model = "builtin:tiny-sdxl-controlnet", image = "sketches/start.png", scale = 0.7 }
[jobs.parallel]
mode = "sync"
split_cfg = true

[[jobs]]
name = "sd-controlnet"
model = "builtin:tiny-sd"
width = 128
height = 200
controlnet = [{ model = "builtin:tiny-sd-controlnet", image = "sketches/start.png", scale = 0.7, start = 0.2 },
              { model = "builtin:tiny-sd-controlnet", image = "sketches/start.png", scale = 0.4 }]

# A displaced job whose warm-up covers both its steps: synchronous throughout, and it says so.
[[jobs]]
name = "xl-few"
model = "builtin:tiny-sdxl"
width = 128
height = 160
steps = 2
guidance_scale = 1.0
timestep_spacing = "trailing"
[jobs.parallel]
warmup_steps = 2

# img2img: the same layouts, each job starting from an image (the VAE encodes it band-parallel over the group).
[[jobs]]
name = "xl-split-i2i"
model = "builtin:tiny-sdxl"
width = 192
height = 160
steps = 8
init_image = "sketches/start.png"
strength = 0.75
[jobs.parallel]
mode = "sync"
split_cfg = true

# LoRA: two adapters with scales fused into the weights (diffusers/PEFT files; Kohya's names for the SD one).
[[jobs]]
name = "xl-lora"
model = "builtin:tiny-sdxl"
width = 128
height = 160
loras = [{ path = "loras/xl-a.safetensors", scale = 0.8 }, { path = "loras/xl-b.safetensors", scale = -0.5 }]

[[jobs]]
name = "sd-lora"
model = "builtin:tiny-sd"
width = 128
height = 200
loras = [{ path = "loras/sd-a-kohya.safetensors", scale = 0.7 }, { path = "loras/sd-b.safetensors" }]
"""

BLOCK = re.compile(
    r"verify (?P<job>\S+): (?P<ranks>\d+) rank\(s\), mode (?P<mode>\w+)(?P<split>, split_cfg)?, .*bands (?P<bands>.*)\n"
    r"latent relative L2: (?P<latent>\S+)\n"
    r"image PSNR: (?P<psnr>\S+) dB\n"
    r"image SSIM: (?P<ssim>\S+)\n"
    r"image max level difference: (?P<level>\d+)")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    (folder / "sketches").mkdir()
    shutil.copy(Path(__file__).parent / "data" / "manifests" / "sketches" / "harbor.png", folder / "sketches" / "start.png")
    loras = folder / "loras"
    loras.mkdir()
    for name, model, seed, targets in (("xl-a", "tiny-sdxl", 3, ATTENTION), ("xl-b", "tiny-sdxl", 4, ["to_q", "conv2"]),
                                       ("sd-a", "tiny-sd", 1, ATTENTION), ("sd-b", "tiny-sd", 2, [*ATTENTION, "conv1"])):
        made = make_lora(f"builtin:{model}", folder / "made" / name, seed, targets=targets, text_encoder=name == "sd-b")
        shutil.copy(made, loras / f"{name}.safetensors")
    to_kohya(loras / "sd-a.safetensors", loras / "sd-a-kohya.safetensors")
    return write_manifest(folder / "jobs.toml", JOBS)


def verify(manifest, jobs: tuple[str, ...], ranks: int, *modes: str) -> dict[str, dict[str, dict]]:
    """`hpcrender verify` of `jobs` in one launch on `ranks` ranks: {job: {mode: its comparison block}}."""
    args = [a for m in modes for a in ("--mode", m)] + [a for job in jobs for a in ("--only", job)]
    done = hpcrender("verify", manifest, *args, ranks=ranks, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    found: dict[str, dict[str, dict]] = {}
    for m in BLOCK.finditer(done.stdout):
        block = m.groupdict()
        assert int(block["ranks"]) == ranks  # the world size mpiexec gave us
        for key in ("latent", "psnr", "ssim"):
            block[key] = float(block[key])
        block["level"] = int(block["level"])
        found.setdefault(block["job"], {})[block["mode"]] = block
    assert {job: list(got) for job, got in found.items()} == {job: list(modes) for job in jobs}, done.stdout
    return found


ALL_MODES = ("sync", "displaced", "naive")
SAMPLERS_ON_2 = ("xl-heun", "xl-euler_a", "xl-dpmpp_2m_sde", "xl-dpmpp_2m_karras", "xl-unipc", "xl-lcm", "sd3-heun")
SAMPLERS_ON_3 = ("sd-heun", "sd-euler_a", "sd-dpmpp_2m_sde_karras", "sd-ddim", "sd-unipc", "sd-lcm")


def sync_exact_and_displaced_beats_naive(got: dict, what: str) -> None:
    """`sync` equals single-device (relative L2, PNG levels) and `displaced` beats `naive` by 3 dB or more."""
    sync, displaced, naive = got["sync"], got["displaced"], got["naive"]
    print(what, {mode: (r["latent"], r["psnr"]) for mode, r in got.items()})
    assert sync["latent"] <= 1e-4 and sync["level"] <= 1
    assert displaced["psnr"] >= naive["psnr"] + 3, got
    assert displaced["latent"] < naive["latent"]


@pytest.fixture(scope="module")
def on_two_ranks(manifest):
    """Every 2-rank check in one launch: SDXL shape, split_cfg (one branch each), text-to-image and img2img, the
    other samplers, LoRA, ControlNet."""
    return verify(manifest, ("xl", "xl-split", "xl-i2i", "xl-split-i2i", *SAMPLERS_ON_2, "xl-lora", "xl-controlnet",
                             "xl-split-controlnet"), 2, *ALL_MODES)


@pytest.fixture(scope="module")
def on_three_ranks(manifest):
    return verify(manifest, ("sd", "sd-i2i", *SAMPLERS_ON_3, "sd-lora", "sd-controlnet"), 3, *ALL_MODES)


@pytest.fixture
def launch(request):
    """The report of the launch with this many ranks."""
    return lambda ranks: request.getfixturevalue({2: "on_two_ranks", 3: "on_three_ranks"}[ranks])


@pytest.mark.parametrize("job, ranks, bands", [
    ("xl", 2, "0-20,20-36"),          # SDXL shape, uneven bands, non-square
    ("sd", 3, "0-8,8-16,16-25"),      # SD shape, 3 ranks, the last band holds a row past the coarse rows
])
def test_sync_equals_single_device_and_displaced_beats_naive(launch, job, ranks, bands):
    got = launch(ranks)[job]
    sync, displaced, naive = got["sync"], got["displaced"], got["naive"]
    assert sync["bands"] == bands
    assert sync["latent"] <= 1e-4
    assert sync["level"] <= 1
    assert displaced["psnr"] >= naive["psnr"] + 3, got
    assert displaced["latent"] < naive["latent"]


def test_split_cfg_on_two_ranks_is_one_branch_each(on_two_ranks):
    got = on_two_ranks["xl-split"]["sync"]
    assert got["split"] and got["bands"] == "whole latent per rank"
    assert got["latent"] <= 1e-4 and got["level"] <= 1


def test_split_cfg_on_four_ranks_is_patch_parallel_in_each_half(manifest):
    got = verify(manifest, ("xl-split",), 4, "sync", "displaced")["xl-split"]
    assert got["sync"]["bands"] == "0-12,12-20"  # 5 coarse rows over the two ranks of each branch
    assert got["sync"]["latent"] <= 1e-4 and got["sync"]["level"] <= 1
    assert got["displaced"]["latent"] < 0.5


@pytest.mark.parametrize("job, ranks", [(job, 2) for job in SAMPLERS_ON_2] + [(job, 3) for job in SAMPLERS_ON_3])
def test_every_sampler_in_sync_equals_single_device_and_displaced_beats_naive(launch, job, ranks):
    """Heun calls the denoiser twice a step (displaced: each call's own stale activations), euler_a, the SDE
    variants and LCM draw noise every step (whole, from the job's generator, cut to the band)."""
    got = launch(ranks)[job]
    bands = got["sync"]["bands"].split(",")
    assert len(set(int(b.split("-")[1]) - int(b.split("-")[0]) for b in bands)) > 1, "uneven"
    sync_exact_and_displaced_beats_naive(got, f"{job} on {ranks} ranks")


def test_displaced_render_records_bands_bytes_waits_and_step_times(manifest, tmp_path):
    done = hpcrender("render", manifest, "--only", "xl", "--only", "xl-few", "--out", tmp_path, ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    # warm-up over every step: the progress line and meta.json say it ran synchronous throughout
    note = "displaced, but its warm-up of 2 step(s) covers all 2 step(s) run: synchronous throughout"
    assert f"xl-few ({note}): done in" in done.stderr, done.stderr[-3000:]
    few = meta_of(tmp_path, "xl-few")
    assert (few["layout"]["mode"], few["layout"]["ran_as"], few["layout"]["note"]) == ("displaced", "sync", note)
    assert (few["exchange"]["sync_steps"], few["exchange"]["async_steps"]) == (2, 0)
    meta = meta_of(tmp_path, "xl")
    assert "ran_as" not in meta["layout"]
    assert meta["layout"]["bands"] == [[0, 20], [20, 36]]
    exchange = meta["exchange"]
    assert (exchange["mode"], exchange["ranks"], exchange["warmup_steps"]) == ("displaced", 2, 1)
    assert (exchange["sync_steps"], exchange["async_steps"]) == (1, 5)
    assert len(exchange["bytes_sent"]) == len(exchange["wait_seconds"]) == 6
    # the first step also registers the attention layers' token counts: 8 bytes each, more than later steps
    assert exchange["bytes_sent"][0] > exchange["bytes_sent"][1] == exchange["bytes_sent"][-1] > 0
    assert len(meta["timings"]["step_seconds"]) == 6
    per_rank = exchange["per_rank"]
    assert [r["rank"] for r in per_rank] == [0, 1]
    assert per_rank[0]["bytes_sent"] == exchange["bytes_sent"] and len(per_rank[1]["wait_seconds"]) == 6
    assert [p["rank"] for p in meta["peak_memory"]] == [0, 1] and "exchange" not in meta["peak_memory"][0]


def test_too_few_coarse_rows_for_the_ranks_exits_2_before_any_model_is_loaded(manifest, tmp_path):
    for command in (("render", manifest, "--only", "too-small", "--out", tmp_path / "out"),
                    ("verify", manifest, "--only", "too-small")):
        done = hpcrender(*command, ranks=2)
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [
            f"hpcrender: error: {manifest}: jobs[too-small]: a height of 64 px gives 1 row(s) of the coarsest "
            "feature map (one per 64 px), fewer than its 2 ranks: make it at least 128 px high or give it fewer "
            "ranks (ranks_per_image)"]
        assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


def test_a_world_that_does_not_divide_into_the_groups_exits_2(manifest, tmp_path):
    done = hpcrender("render", manifest, "--only", "pairs", "--out", tmp_path / "out", ranks=3)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"hpcrender: error: {manifest}: jobs[pairs]: 3 ranks do not divide into "
                                        "groups of 2"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("job, ranks", [("xl-i2i", 2), ("sd-i2i", 3)])
def test_img2img_sync_equals_single_device_and_displaced_beats_naive(launch, job, ranks):
    sync_exact_and_displaced_beats_naive(launch(ranks)[job], f"{job} on {ranks} ranks, img2img")


def test_img2img_with_split_cfg_equals_single_device(on_two_ranks):
    got = on_two_ranks["xl-split-i2i"]["sync"]
    assert got["split"] and got["latent"] <= 1e-4 and got["level"] <= 1


@pytest.mark.parametrize("job, ranks", [("xl-lora", 2), ("sd-lora", 3)])
def test_loras_in_sync_equal_single_device_and_displaced_beats_naive(launch, job, ranks):
    """Fused adapters are plain weights to the bands; the 3-rank launch puts the 2-rank job's adapters on and takes
    them off between jobs of one model cache."""
    sync_exact_and_displaced_beats_naive(launch(ranks)[job], f"{job} on {ranks} ranks, LoRA")


@pytest.mark.parametrize("job, ranks, bands", [("xl-controlnet", 2, "0-12,12-20"),
                                               ("sd-controlnet", 3, "0-8,8-16,16-25")])
def test_controlnet_in_sync_equals_single_device_and_displaced_beats_naive(launch, job, ranks, bands):
    """The ControlNets run band-parallel with the UNet's plan: their residuals are each band's own."""
    got = launch(ranks)[job]
    assert got["sync"]["bands"] == bands
    sync_exact_and_displaced_beats_naive(got, f"{job} on {ranks} ranks, ControlNet")


def test_controlnet_with_split_cfg_is_one_branch_each_and_equals_single_device(on_two_ranks):
    got = on_two_ranks["xl-split-controlnet"]["sync"]
    assert got["split"] and got["bands"] == "whole latent per rank"
    assert got["latent"] <= 1e-4 and got["level"] <= 1
