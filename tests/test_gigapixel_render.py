"""Gigapixel renders with a builtin model: the same bytes whatever the order of the tiles and across a stop and
resume, seams that the blend and colour fix remove (scored), the whole job through `hpcrender render`, and the
DeepZoom page shown by OpenSeadragon in a headless browser."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

from hpcrender.config import GigapixelConfig, Job, Mode, ParallelConfig
from hpcrender.gigapixel.compose import compose_level
from hpcrender.gigapixel.job import open_store
from hpcrender.gigapixel.plan import level_units
from hpcrender.gigapixel.render import plan_for, render_base, render_gigapixel, render_tile
from hpcrender.models import load_pipeline
from hpcrender.models.facts import facts_of
from hpcrender.parallel.layout import Comms, GroupLayout

from clirun import HPCRENDER, clean_env, hpcrender, write_manifest

ALONE = (GroupLayout(size=1, rank=0, mode=Mode.NONE), Comms(None, None, (0,)))
JOB = Job(name="harbor-giga", prompt="an aerial harbor", width=256, height=192, seed=5, model="builtin:tiny-sdxl",
          steps=2, guidance_scale=1.0, parallel=ParallelConfig(mode=Mode.NONE),
          gigapixel=GigapixelConfig(base=96, tile=64, overlap=16, strength=0.5))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as `hpcrender` is run from the tests: a render's bytes depend on the thread count (README), and
    two threads each on two busy cores are ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(JOB.model)


def _levels(store, plan):
    return [np.asarray(store.read_level(lp.index, 0, lp.height, 0, lp.width)) for lp in plan.levels]


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    """The job rendered by the sequential driver, tiles in raster order: every level's image and the result."""
    job_dir = tmp_path_factory.mktemp("reference")
    plan = plan_for(facts_of(pipe), JOB)
    with open_store(job_dir, JOB, plan) as store:
        result = render_gigapixel(pipe, JOB, store, *ALONE, "cpu")
        levels = _levels(store, plan)
    return job_dir, plan, result, levels


def test_tiles_rendered_in_another_order_give_the_same_bytes(pipe, reference, tmp_path):
    _, plan, _, expected = reference
    with open_store(tmp_path, JOB, plan) as store:
        store.write_patch(0, level_units(plan, 0)[0], render_base(pipe, JOB, plan, *ALONE, "cpu"))
        compose_level(store, plan, 0)
        for lp in plan.levels[1:]:
            def read(y0, y1, x0, x1, k=lp.index):
                return store.read_level(k - 1, y0, y1, x0, x1)

            units = level_units(plan, lp.index)
            for unit in units[1::2] + units[::2][::-1]:  # odd tiles first, then the rest backwards
                store.write_patch(lp.index, unit, render_tile(pipe, JOB, plan, unit, read, *ALONE, "cpu"))
            compose_level(store, plan, lp.index)
        got = _levels(store, plan)
    for level, (a, b) in enumerate(zip(expected, got)):
        assert np.array_equal(a, b), f"level {level} differs"


def test_a_stopped_render_resumes_to_the_same_bytes(pipe, reference, tmp_path):
    _, plan, full, expected = reference
    calls = []

    def stop_at(n):
        def should_stop():
            calls.append(1)
            return len(calls) >= n
        return should_stop

    with open_store(tmp_path, JOB, plan) as store:
        # The driver asks before the base and then after its first denoising step: stopped inside the base.
        first = render_gigapixel(pipe, JOB, store, *ALONE, "cpu", should_stop=stop_at(2))
        assert first.stopped and store.missing_patches(0) == [(0, 0)]
    calls.clear()
    with open_store(tmp_path, JOB, plan) as store:
        second = render_gigapixel(pipe, JOB, store, *ALONE, "cpu", should_stop=stop_at(12))
        assert second.stopped and 0 < len(store.missing_patches(2)) < len(plan.levels[2].tiles)
    with open_store(tmp_path, JOB, plan) as store:
        third = render_gigapixel(pipe, JOB, store, *ALONE, "cpu")
        assert not third.stopped
        assert second.tiles_rendered + third.tiles_rendered == full.tiles_rendered
        got = _levels(store, plan)
    for level, (a, b) in enumerate(zip(expected, got)):
        assert np.array_equal(a, b), f"level {level} differs"


def test_blended_colour_fixed_tiles_score_no_seams_and_naive_tiles_do(pipe, reference, tmp_path):
    _, plan, result, _ = reference
    refined = result.seams[len(plan.levels) - 1].score
    assert refined == pytest.approx(1.0, abs=0.05)
    naive_job = dataclasses.replace(JOB, gigapixel=dataclasses.replace(JOB.gigapixel, overlap=0))
    naive_plan = plan_for(facts_of(pipe), naive_job)
    with open_store(tmp_path, naive_job, naive_plan) as store:
        naive = render_gigapixel(pipe, naive_job, store, *ALONE, "cpu", colour_fix=False)
    score = naive.seams[len(naive_plan.levels) - 1].score
    assert abs(score - 1.0) > 3 * abs(refined - 1.0) and abs(score - 1.0) > 0.1, (score, refined)


def test_render_command_writes_the_image_meta_and_a_viewable_deepzoom(reference, tmp_path):
    _, plan, _, expected = reference
    manifest = _manifest(tmp_path)
    out = tmp_path / "out"
    run = hpcrender("render", manifest, "--out", out)
    assert run.returncode == 0, run.stderr
    job_dir = out / JOB.name
    meta = json.loads((job_dir / "meta.json").read_text())
    assert meta["gigapixel"]["seam_score"] == pytest.approx(1.0, abs=0.05)
    assert meta["gigapixel"]["tiles"] == plan.total_tiles
    assert sorted(meta["outputs"]) == ["image.png", "preview.png"]
    # rendered a second time, in another process: the same bytes
    assert np.array_equal(np.asarray(Image.open(job_dir / "image.png")), expected[-1])
    stitched = hpcrender("stitch", job_dir, "--format", "dzi")
    assert stitched.returncode == 0, stitched.stderr
    assert (job_dir / "index.html").is_file() and (job_dir / "openseadragon" / "LICENSE.txt").is_file()
    _assert_viewer_shows_tiles(job_dir / "index.html", tmp_path / "shot.png")


def _manifest(tmp_path):
    return write_manifest(tmp_path / "giga.toml", f"""
[defaults]
model = "{JOB.model}"
steps = {JOB.steps}
guidance_scale = {JOB.guidance_scale}
[defaults.parallel]
mode = "none"
[[jobs]]
name = "{JOB.name}"
prompt = "{JOB.prompt}"
width = {JOB.width}
height = {JOB.height}
seed = {JOB.seed}
[jobs.gigapixel]
base = {JOB.gigapixel.base}
tile = {JOB.gigapixel.tile}
overlap = {JOB.gigapixel.overlap}
strength = {JOB.gigapixel.strength}
""")


def test_sigterm_stops_between_tiles_with_exit_3_and_the_rerun_finishes_the_same_image(reference, tmp_path):
    from hpcrender.output.store import LevelStore

    _, plan, _, expected = reference
    manifest, out = _manifest(tmp_path), tmp_path / "out"
    proc = subprocess.Popen([str(HPCRENDER), "render", str(manifest), "--out", str(out)], env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    store_path = out / JOB.name / "tiles.h5"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # signal once the first tile of level 1 is stored
            if store_path.exists():
                try:
                    with LevelStore.read(store_path) as store:
                        if len(store.missing_patches(1)) < len(plan.levels[1].tiles):
                            break
                except Exception:  # noqa: BLE001 - the file is being created
                    pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    with LevelStore.read(store_path) as store:
        assert not store.level_complete(len(plan.levels) - 1)
    rerun = hpcrender("render", manifest, "--out", out)
    assert rerun.returncode == 0, rerun.stderr
    meta = json.loads((out / JOB.name / "meta.json").read_text())
    assert meta["gigapixel"]["units_rendered"] < plan.total_tiles + 1
    assert np.array_equal(np.asarray(Image.open(out / JOB.name / "image.png")), expected[-1])


def _assert_viewer_shows_tiles(page, shot):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium to open the DeepZoom page with (make viewer-deps installs it)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=640,480", "--virtual-time-budget=8000", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    background = np.array([17, 17, 17])  # the page's #111
    shown = np.abs(pixels - background).max(axis=2) > 24
    # the image fills most of the window's middle; the page alone would be all background
    middle = shown[120:360, 160:480]
    assert middle.mean() > 0.9, f"only {middle.mean():.0%} of the middle shows the image"
    assert pixels[120:360, 160:480].std() > 10  # tiles with content, not a flat placeholder


@pytest.mark.mpi
def test_tiles_render_band_parallel_on_a_group_of_two_ranks(pipe, tmp_path):
    """mode sync on 2 ranks: the group's first rank holds the store and hands each tile's upscaled box to the
    other; the image is the one-rank image up to the bands' rounding."""
    small = dataclasses.replace(JOB, name="small", width=128, height=128,
                                gigapixel=dataclasses.replace(JOB.gigapixel, base=64))
    plan = plan_for(facts_of(pipe), small)
    with open_store(tmp_path / "one", small, plan) as store:
        render_gigapixel(pipe, small, store, *ALONE, "cpu")
        alone = np.asarray(store.read_level(len(plan.levels) - 1, 0, 128, 0, 128)).astype(np.int16)
    manifest = write_manifest(tmp_path / "sync.toml", f"""
[defaults]
model = "{small.model}"
steps = {small.steps}
guidance_scale = {small.guidance_scale}
[defaults.parallel]
mode = "sync"
ranks_per_image = 2
[[jobs]]
name = "small"
prompt = "{small.prompt}"
width = 128
height = 128
seed = {small.seed}
[jobs.gigapixel]
base = 64
tile = {small.gigapixel.tile}
overlap = {small.gigapixel.overlap}
strength = {small.gigapixel.strength}
""")
    run = hpcrender("render", manifest, "--out", tmp_path / "out", ranks=2)
    assert run.returncode == 0, run.stderr
    meta = json.loads((tmp_path / "out" / "small" / "meta.json").read_text())
    assert meta["layout"]["ranks"] == [0, 1] and meta["gigapixel"]["tiles"] == plan.total_tiles
    banded = np.asarray(Image.open(tmp_path / "out" / "small" / "image.png")).astype(np.int16)
    assert np.abs(banded - alone).max() <= 8 and np.abs(banded - alone).mean() < 0.5


def test_a_full_disk_fails_the_job_with_one_line_and_the_store_resumes_elsewhere(reference, tmp_path, small_disk):
    """The disk fills while tiles stream in: the job fails naming its store, no traceback; every tile stored before
    stays readable, and the same out folder moved to a roomier disk finishes the same image."""
    from hpcrender.output.store import LevelStore

    _, plan, _, expected = reference
    manifest, out = _manifest(tmp_path), small_disk / "out"
    (small_disk / "filler").write_bytes(b"\0" * FULL_DISK_FILLER)
    full = hpcrender("render", manifest, "--out", out)
    assert full.returncode == 1, full.stderr
    assert "Traceback" not in full.stderr, full.stderr
    store_path = out / JOB.name / "tiles.h5"
    assert f"{JOB.name}: FAILED: OSError: [Errno 28] {store_path}: cannot write the tile store: " \
           "No space left on device" in full.stderr, full.stderr
    with LevelStore.read(store_path) as store:
        stored = sum(int(d.sum()) for d in store._done)
        assert 0 < stored < plan.total_tiles + 1, stored
    roomy = tmp_path / "roomy"
    shutil.copytree(out, roomy)
    resumed = hpcrender("render", manifest, "--out", roomy)
    assert resumed.returncode == 0, resumed.stderr
    meta = json.loads((roomy / JOB.name / "meta.json").read_text())
    assert meta["gigapixel"]["units_rendered"] == plan.total_tiles + 1 - stored
    assert np.array_equal(np.asarray(Image.open(roomy / JOB.name / "image.png")), expected[-1])


# Bytes taken from the 400 KiB disk before the render, so that it fills after a few tiles of level 1.
FULL_DISK_FILLER = 200 * 1024
