"""The arithmetic and pixel operations of gigapixel renders, without a model: level sizes and tile grids
(exhaustively), feather weights, position-keyed noise, region-wise upscaling, the colour fix, the seam score, the
fixed-order composition, and the level store (refusal, resume, SIGKILL, export)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from hpcrender.config import GigapixelConfig, Job, Mode, ParallelConfig
from hpcrender.errors import BadInput
from hpcrender.gigapixel.compose import compose_level
from hpcrender.gigapixel.compose import blend_detail
from hpcrender.gigapixel.job import level_shapes
from hpcrender.gigapixel.pixels import seam_score, seam_statistics
from hpcrender.gigapixel.pixels import cubic_taps, low_frequencies, upscale_region, wavelet_colour_fix
from hpcrender.gigapixel.plan import gigapixel_plan, level_units
from hpcrender.gigapixel.plan import TilePatch, contributors, feather, level_sizes, preview_level, tile_weights
from hpcrender.output.store import LevelStore, TileStore


def giga_job(width=256, height=192, base=96, tile=64, overlap=16, strength=0.5, steps=2, **kw) -> Job:
    return Job(name="g", prompt="p", width=width, height=height, seed=3, steps=steps,
               parallel=ParallelConfig(mode=Mode.NONE),
               gigapixel=GigapixelConfig(base=base, tile=tile, overlap=overlap, strength=strength), **kw)


# --- the plan --------------------------------------------------------------------------------------------------


def _check_plan(plan, job, align):
    giga = job.gigapixel
    levels = plan.levels
    assert (levels[-1].height, levels[-1].width) == (job.height, job.width)
    base = levels[0]
    assert max(base.height, base.width) == max(align, (2 * giga.base + align) // (2 * align) * align) or \
        abs(max(base.height, base.width) - giga.base) < align
    long_axis = 1 if job.width >= job.height else 0
    for prev, lp in zip(levels, levels[1:]):
        if lp is not levels[-1]:
            assert (lp.height, lp.width) == (2 * prev.height, 2 * prev.width)
        factor = (lp.width / prev.width) if long_axis else (lp.height / prev.height)
        assert 1 < factor <= 2
    for lp in levels:
        assert lp.height % align == 0 and lp.width % align == 0
        covered = np.zeros((lp.height, lp.width), np.int32)
        for t in lp.tiles:
            c, e = t.core, t.extended
            covered[c.y0:c.y1, c.x0:c.x1] += 1
            assert 0 <= e.y0 <= c.y0 < c.y1 <= e.y1 <= lp.height and 0 <= e.x0 <= c.x0 < c.x1 <= e.x1 <= lp.width
            assert e.height % align == 0 and e.width % align == 0
            overlap = giga.overlap if lp.index else 0
            assert e.y0 <= max(0, c.y0 - overlap) and e.y1 >= min(lp.height, c.y1 + overlap)
            assert e.x0 <= max(0, c.x0 - overlap) and e.x1 >= min(lp.width, c.x1 + overlap)
            # grown to the alignment and no more
            assert e.height - align < min(lp.height, c.y1 + overlap) - max(0, c.y0 - overlap) <= e.height
        assert (covered == 1).all()
        assert [(t.row, t.col) for t in lp.tiles] == list(itertools.product(range(lp.rows), range(lp.cols)))
    assert plan.total_tiles == sum(len(lp.tiles) for lp in levels[1:])
    assert plan.unet_evaluations == job.steps + plan.total_tiles * plan.tile_steps


def test_plan_covers_every_pixel_once_with_aligned_boxes_inside_every_level():
    checked = 0
    for vae, unet_align in ((8, 1), (8, 4), (8, 8)):
        align = vae * unet_align
        for w_units, h_units in itertools.product((1, 2, 3, 5, 8, 13), repeat=2):
            width, height = w_units * align, h_units * align
            for base in sorted({8, align, max(width, height) // 3 // 8 * 8 or 8, max(width, height)}):
                if not 0 < base <= max(width, height):
                    continue
                for tile, overlap in ((align, 0), (align + 8, 8), (2 * align, align // 2), (48, 40)):
                    if overlap >= tile:
                        continue
                    job = giga_job(width, height, base, tile, overlap)
                    _check_plan(gigapixel_plan(job, vae, unet_align), job, align)
                    checked += 1
    assert checked > 1000


def test_level_sizes_double_up_to_the_target():
    assert level_sizes(16384, 32768, 1024, 64) == tuple((512 * 2**k, 1024 * 2**k) for k in range(6))
    assert level_sizes(3000, 5000, 1000, 8) == ((600, 1000), (1200, 2000), (2400, 4000), (3000, 5000))
    assert level_sizes(1024, 3008, 1000, 64) == ((320, 1024), (640, 2048), (1024, 3008))  # base to the alignment
    assert level_sizes(512, 512, 512, 64) == ((512, 512),)


def test_plan_refuses_sizes_off_the_alignment_and_strengths_without_a_step():
    with pytest.raises(BadInput, match="multiple of 32"):
        gigapixel_plan(giga_job(width=264), 8, 4)
    with pytest.raises(BadInput, match="no denoising step"):
        gigapixel_plan(giga_job(strength=0.2, steps=2), 8, 4)
    with pytest.raises(BadInput, match="not a gigapixel job"):
        gigapixel_plan(Job(name="g", prompt="p", width=64, height=64, seed=1), 8, 4)


def test_units_and_contributors_match_a_search_of_every_tile():
    plan = gigapixel_plan(giga_job(width=320, height=224, tile=40, overlap=24), 8, 4)
    for lp in plan.levels:
        units = level_units(plan, lp.index)
        assert [(u.level, u.row, u.col) for u in units] == [(lp.index, t.row, t.col) for t in lp.tiles]
        for t in lp.tiles:
            brute = [o for o in lp.tiles if o.extended.intersect(t.core) is not None]
            assert list(contributors(lp, t.row, t.col)) == brute
    assert preview_level(plan, 2048) == len(plan.levels) - 1 and preview_level(plan, 100) == 1


def test_feather_weights_cross_fade_to_one_and_own_core_dominates():
    for size, tile, overlap in ((200, 40, 16), (96, 32, 0), (131, 24, 12), (64, 64, 8)):
        total = np.zeros(size)
        own = np.zeros(size)
        for c0 in range(0, size, tile):
            c1 = min(size, c0 + tile)
            e0, e1 = max(0, c0 - overlap - 5), min(size, c1 + overlap + 3)  # grown boxes reach further
            w = feather(c0, c1, e0, e1, overlap, size)
            total[e0:e1] += w
            own[c0:c1] = w[c0 - e0:c1 - e0]
        np.testing.assert_allclose(total, 1.0, atol=1e-6)
        assert own.min() >= 0.5


# --- pixels ----------------------------------------------------------------------------------------------------


def test_upscale_of_a_region_equals_that_region_of_the_whole_upscale():
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    read = lambda y0, y1, x0, x1: src[y0:y1, x0:x1]  # noqa: E731
    whole = upscale_region(read, 37, 53, 74, 100, 0, 74, 0, 100)
    for y0, y1, x0, x1 in ((0, 10, 0, 13), (30, 74, 41, 100), (5, 6, 99, 100)):
        np.testing.assert_array_equal(upscale_region(read, 37, 53, 74, 100, y0, y1, x0, x1), whole[y0:y1, x0:x1])
    same = upscale_region(read, 37, 53, 37, 53, 0, 37, 0, 53)
    np.testing.assert_allclose(same, src, atol=1e-3)
    index, weights = cubic_taps(10, 20, 0, 20)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert index.min() == 0 and index.max() == 9


def test_colour_fix_takes_the_references_colour_and_keeps_the_tiles_detail():
    rng = np.random.default_rng(2)
    reference = np.full((96, 96, 3), 120.0, np.float32) + np.linspace(0, 40, 96, dtype=np.float32)[None, :, None]
    detail = rng.normal(0, 12, (96, 96, 3)).astype(np.float32)
    shifted = np.clip(reference + 35 + detail, 0, 255)  # a tile that came back brighter
    fixed = wavelet_colour_fix(shifted, reference).astype(np.float32)
    assert abs(fixed.mean() - reference.mean()) < 1.0
    kept = fixed - low_frequencies(fixed)
    assert np.corrcoef(kept.ravel(), (detail - low_frequencies(detail)).ravel())[0, 1] > 0.95


def _reader(a):
    return lambda y0, y1, x0, x1: a[y0:y1, x0:x1]


def test_seam_score_is_one_without_seams_and_shows_steps_and_flat_borders():
    rng = np.random.default_rng(3)
    texture = rng.integers(60, 190, (192, 256, 3)).astype(np.uint8)
    assert seam_score(_reader(texture), 192, 256, 64) == pytest.approx(1.0, abs=0.05)
    stepped = texture.astype(np.int16)
    for (r, c) in itertools.product(range(3), range(4)):
        stepped[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64] += (r * 4 + c) % 3 * 25 - 25
    assert seam_score(_reader(np.clip(stepped, 0, 255).astype(np.uint8)), 192, 256, 64) > 1.15
    flat = texture.copy()
    for k in range(0, 256, 64):
        flat[:, max(0, k - 2):k + 2] = 128
    for k in range(0, 192, 64):
        flat[max(0, k - 2):k + 2] = 128
    assert seam_score(_reader(flat), 192, 256, 64) < 0.6
    assert seam_score(_reader(texture), 64, 64, 64) is None


def test_a_broad_band_of_detail_along_the_boundaries_is_no_seam_but_shows_in_the_detail_ratio():
    """Texture 1.5 x stronger within 48 px of every boundary (smoothly, no step): the seam score compares each
    boundary with lines 8 px either side and stays 1; the detail ratio, against every inner line, reads the band."""
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 20, (512, 512, 3))
    distance = np.minimum(np.arange(512) % 256, 256 - np.arange(512) % 256).astype(float)
    gain = 1 + 0.5 * np.clip(1 - distance / 48, 0, 1)
    banded = np.clip(128 + noise * np.maximum(gain[:, None], gain[None, :])[..., None], 0, 255).astype(np.uint8)
    score, ratio = seam_statistics(_reader(banded), 512, 512, 256, period=8)
    assert score == pytest.approx(1.0, abs=0.05)
    assert ratio > 1.2
    uniform = np.clip(128 + noise, 0, 255).astype(np.uint8)
    assert seam_statistics(_reader(uniform), 512, 512, 256, period=8) == pytest.approx((1.0, 1.0), abs=0.05)


def test_blend_of_agreeing_patches_is_the_image_and_unrelated_detail_keeps_its_contrast():
    plan = gigapixel_plan(giga_job(width=256, height=192, tile=64, overlap=16), 8, 4)
    lp = plan.levels[-1]
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (lp.height, lp.width, 3)).astype(np.uint8)
    patches = {(t.row, t.col): image[t.extended.y0:t.extended.y1, t.extended.x0:t.extended.x1] for t in lp.tiles}
    composed = _compose(lp, plan.overlap, patches).astype(np.int16)
    assert np.abs(composed - image).max() <= 1 and (composed == image).mean() > 0.999  # float rounding only
    # Unrelated noise per tile: the blend keeps its contrast along the boundaries (no faded band).
    noise = {(t.row, t.col): np.clip(128 + rng.normal(0, 30, (t.extended.height, t.extended.width, 3)), 0, 255)
             .astype(np.uint8) for t in lp.tiles}
    blended = _compose(lp, plan.overlap, noise).astype(np.float32)
    boundary = blended[:, 60:68].std()
    inside = blended[:, 24:40].std()
    assert boundary == pytest.approx(inside, rel=0.08)


def _compose(lp, overlap, patches):
    """The composition of compose_level, from patches in memory."""
    from hpcrender.gigapixel.compose import _covariance, _local_mean

    out = np.zeros((lp.height, lp.width, 3), np.uint8)
    cache = {}
    for k, v in patches.items():
        detail = v.astype(np.float32) - low_frequencies(v.astype(np.float32))
        cache[k] = (v, detail, _local_mean(detail * detail))
    known = {}
    for t in lp.tiles:
        parts = []
        for o in contributors(lp, t.row, t.col):
            part = o.extended.intersect(t.core)
            e = o.extended
            inside = (slice(part.y0 - e.y0, part.y1 - e.y0), slice(part.x0 - e.x0, part.x1 - e.x0))
            w = tile_weights(lp, o, overlap)[inside]
            if w.any():
                parts.append((o, part, w, *(a[inside] for a in cache[(o.row, o.col)])))
        c = t.core
        out[c.y0:c.y1, c.x0:c.x1] = blend_detail(c, parts, lambda a, b: _covariance(a, b, cache, known))
    return out


# --- the level store -------------------------------------------------------------------------------------------


def _fill_level(store, plan, level, image_of_tile, order=None):
    lp = plan.levels[level]
    for t in (order or lp.tiles):
        e = t.extended
        store.write_patch(level, level_units(plan, level)[t.row * lp.cols + t.col],
                          TilePatch(level, t.row, t.col, (e.y0, e.y1, e.x0, e.x1), image_of_tile(t)))


def test_composition_does_not_depend_on_the_order_patches_arrive_in_and_resumes(tmp_path):
    plan = gigapixel_plan(giga_job(width=256, height=192, tile=48, overlap=16), 8, 4)
    rng = np.random.default_rng(5)
    lp = plan.levels[-1]
    made = {(t.row, t.col): rng.integers(0, 256, (t.extended.height, t.extended.width, 3)).astype(np.uint8)
            for t in lp.tiles}
    images = []
    for name, order in (("a", None), ("b", lp.tiles[::-1]), ("c", sorted(lp.tiles, key=lambda t: (t.col, -t.row)))):
        with LevelStore.open(tmp_path / f"{name}.h5", levels=level_shapes(plan), params_hash="h") as store:
            _fill_level(store, plan, lp.index, lambda t: made[(t.row, t.col)], order)
            if name == "c":  # a composition stopped half way is finished by the next
                store.write_level_tile(lp.index, 0, 0, np.zeros((48, 48, 3), np.uint8))
                with pytest.raises(ValueError):
                    compose_level(store, plan, lp.index - 1)
            composed = compose_level(store, plan, lp.index)
            assert composed == len(lp.tiles) - (name == "c")
            images.append(store.read_level(lp.index, 0, lp.height, 0, lp.width))
    np.testing.assert_array_equal(images[0], images[1])
    np.testing.assert_array_equal(images[0][48:], images[2][48:])


def test_level_store_refuses_other_parameters_and_keeps_the_file(tmp_path):
    plan = gigapixel_plan(giga_job(), 8, 4)
    path = tmp_path / "tiles.h5"
    with LevelStore.open(path, levels=level_shapes(plan), params_hash="one") as store:
        _fill_level(store, plan, 1, lambda t: np.full((t.extended.height, t.extended.width, 3), 7, np.uint8))
    before = path.read_bytes()
    with pytest.raises(BadInput, match="other parameters.*kept"):
        LevelStore.open(path, levels=level_shapes(plan), params_hash="two")
    other = gigapixel_plan(giga_job(tile=96), 8, 4)
    with pytest.raises(BadInput, match="other levels"):
        LevelStore.open(path, levels=level_shapes(other), params_hash="one")
    assert path.read_bytes() == before
    with LevelStore.open(path, levels=level_shapes(plan), params_hash="one") as store:
        assert store.missing_patches(1) == [] and store.missing_patches(2) == [(r, c) for r in range(3)
                                                                              for c in range(4)]
    with LevelStore.open(path, levels=level_shapes(plan), params_hash="two", resume=False) as store:
        assert store.missing_patches(1)
    assert len(list(tmp_path.glob("tiles.h5.*.old"))) == 1


_KILLED = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_gigapixel_plan import giga_job, _fill_level
    from hpcrender.gigapixel.plan import gigapixel_plan, level_units
    from hpcrender.gigapixel.job import level_shapes
    from hpcrender.output.store import LevelStore
    plan = gigapixel_plan(giga_job(), 8, 4)
    store = LevelStore.open(sys.argv[1], levels=level_shapes(plan), params_hash="h")
    lp = plan.levels[2]
    _fill_level(store, plan, 2, lambda t: np.full((t.extended.height, t.extended.width, 3), 9, np.uint8),
                lp.tiles[:5])
    print("written", flush=True)
    time.sleep(60)
    """
)


def test_level_store_reads_after_sigkill_and_resumes(tmp_path):
    path = tmp_path / "tiles.h5"
    tests = str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(path), tests], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    plan = gigapixel_plan(giga_job(), 8, 4)
    with LevelStore.read(path) as store:
        assert len(store.missing_patches(2)) == 7
        box, pixels = store.read_patch(2, 0, 4 // 4)
        assert (pixels == 9).all()
    with LevelStore.open(path, levels=level_shapes(plan), params_hash="h") as store:
        assert [t for t in itertools.product(range(3), range(4)) if store.patch_done(2, *t)] == \
            [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]


def test_a_level_store_reads_and_exports_as_its_final_level(tmp_path):
    from hpcrender.output.export import export_job, export_tiff

    plan = gigapixel_plan(giga_job(), 8, 4)
    path = tmp_path / "tiles.h5"
    rng = np.random.default_rng(6)
    with LevelStore.open(path, levels=level_shapes(plan), params_hash="h") as store:
        for lp in plan.levels:
            _fill_level(store, plan, lp.index,
                        lambda t: rng.integers(0, 256, (t.extended.height, t.extended.width, 3)).astype(np.uint8))
            compose_level(store, plan, lp.index)
        final = store.read_level(2, 0, 192, 0, 256)
        outputs = export_job(store.final(), tmp_path / "job", preview_from=store.level(1))
    assert [p.name for p in outputs] == ["image.png", "preview.png"]
    with TileStore.read(path) as view:
        assert view.complete() and view.params_hash == "h" and (view.grid.height, view.grid.width) == (192, 256)
        np.testing.assert_array_equal(view.read_region(0, 192, 0, 256), final)
        export_tiff(view, tmp_path / "image.tif", tile=64)
    with tifffile.TiffFile(tmp_path / "image.tif") as tif:
        page = tif.pages[0]
        assert len(tif.pages) >= 3  # reduced levels as further pages (OpenSlide's generic TIFF), not SubIFDs
        np.testing.assert_array_equal(page.asarray(), final)


def test_seam_period_is_the_alignment_halved_until_a_tile_holds_a_line():
    from hpcrender.gigapixel.compose import seam_period

    assert [seam_period(t, 32) for t in (64, 72, 48, 32, 16, 1024)] == [32, 32, 16, 16, 8, 32]
    assert seam_period(8, 64) == 4


def test_a_gigapixel_job_off_the_models_alignment_is_refused_before_loading():
    from hpcrender.config import Manifest
    from hpcrender.errors import DoesNotFit
    from hpcrender.models.shapes import model_shape
    from hpcrender.run.plan import make_run_plan

    bad = giga_job(width=264, model="builtin:tiny-sdxl")
    with pytest.raises(DoesNotFit, match=r"jobs\[g\]: width: a gigapixel image needs a multiple of 32"):
        make_run_plan(Manifest(path="m.toml", jobs=(bad,)), (0,), 1, model_shape)
    with pytest.raises(DoesNotFit, match="planned from its model's configs before anything loads"):
        make_run_plan(Manifest(path="m.toml", jobs=(bad,)), (0,), 1, lambda ref: None)
    make_run_plan(Manifest(path="m.toml", jobs=(giga_job(model="builtin:tiny-sdxl"),)), (0,), 1, model_shape)


def test_composers_share_every_row_of_a_level_once():
    from hpcrender.gigapixel.compose import share_rows

    for rows in range(0, 12):
        for composers in range(1, 6):
            shares = [list(share_rows(rows, composers, p)) for p in range(composers)]
            assert sorted(r for share in shares for r in share) == list(range(rows))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="composer 2 of 2"):
        share_rows(4, 2, 2)
