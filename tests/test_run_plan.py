"""The run plan: groups, queue order, bands from the model's own VAE scale, bytes per step, refusals."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from pathlib import Path

import pytest

from hpcrender.config import DType, GigapixelConfig, Job, Manifest, Mode, ParallelConfig, SchedulerName
from hpcrender.errors import DoesNotFit, ModelNotFound
from hpcrender.models.shapes import model_shape
from hpcrender.manifest import load_manifest
from hpcrender.parallel.bands import (
    Band, expected_bytes, gathered_keys_values, image_bands, latent_bands, memory_estimate, step_macs,
)
from hpcrender.run import plan as run_plan
from hpcrender.run.environment import MemoryLimit
from hpcrender.run.plan import CPU_CORE_MACS_PER_S, TEXT_TOKENS, RankCost, describe_plan, make_run_plan, plan_job
from hpcrender.run.schedule import job_cost, queue_order

TINY = "builtin:tiny-sd"


def job(name: str, mode: Mode = Mode.SYNC, width: int = 64, height: int = 256, rpi: int = 0, **kw) -> Job:
    return Job(name=name, prompt=name, width=width, height=height, seed=1, model=kw.pop("model", TINY), steps=4,
               parallel=ParallelConfig(mode=mode, ranks_per_image=rpi, split_cfg=kw.pop("split_cfg", False)), **kw)


def manifest(*jobs: Job) -> Manifest:
    return Manifest(path=Path("m.toml"), jobs=tuple(jobs))


def plan_of(m: Manifest, world: int, shapes=model_shape, limit=None):
    return make_run_plan(m, tuple(range(len(m.jobs))), world, shapes, limit)


def test_phases_group_jobs_by_size_and_hand_them_out_largest_first():
    m = manifest(job("small", Mode.NONE, 64, 64), job("wide", Mode.SYNC, 128, 256, rpi=2),
                 job("big", Mode.NONE, 128, 128), job("all", Mode.DISPLACED, 64, 256),
                 job("tie", Mode.NONE, 64, 64))
    plan = plan_of(m, 4)
    assert [(p.size, p.groups) for p in plan.phases] == [
        (1, ((0,), (1,), (2,), (3,))), (2, ((0, 1), (2, 3))), (4, ((0, 1, 2, 3),))]
    assert [p.order for p in plan.phases] == [(2, 0, 4), (1,), (3,)]
    assert plan.indices == (0, 1, 2, 3, 4)
    assert plan.jobs[1].patch_ranks == 2 and len(plan.jobs[1].bands) == 2
    assert plan.jobs[3].patch_ranks == 4 and len(plan.jobs[3].bands) == 4
    assert plan.jobs[0].bands == () and not plan.jobs[0].banded


@pytest.mark.parametrize("costs", [[], [1.0], [3.0, 1.0, 2.0], [1.0, 1.0, 1.0], [0.0, 5.0, 5.0, 0.5]])
def test_queue_order_is_largest_first_then_manifest_order(costs):
    order = queue_order(costs)
    assert sorted(order) == list(range(len(costs)))
    for a, b in itertools.pairwise(order):
        assert costs[a] > costs[b] or (costs[a] == costs[b] and a < b)


def test_bands_come_from_the_model_own_vae_scale_not_a_fixed_8():
    tiny = model_shape(TINY)
    assert tiny.facts.vae_scale == 8
    coarse = dataclasses.replace(tiny, facts=dataclasses.replace(tiny.facts, vae_scale=16))
    one = plan_job(0, job("j", height=512), 2, tiny)
    other = plan_job(0, job("j", height=512), 2, coarse)
    assert one.bands == latent_bands(64, tiny.facts.alignment, 2) == image_bands(512, 8, tiny.facts.alignment, 2)
    assert other.bands == latent_bands(32, tiny.facts.alignment, 2, pixels_per_row=16)
    assert other.bands[-1].stop == 32


@pytest.mark.parametrize("height", range(64, 64 * 9, 8))
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_image_bands_cover_every_latent_row_once_on_aligned_edges(height, parts):
    align = 8
    try:
        bands = image_bands(height, 8, align, parts)
    except DoesNotFit:
        assert (height // 8) // align < parts
        return
    assert bands[0].start == 0 and bands[-1].stop == height // 8
    assert all(a.stop == b.start for a, b in itertools.pairwise(bands))
    assert all(b.start % align == 0 for b in bands)
    assert len(bands) == parts


def test_bytes_per_step_only_where_bands_exchange():
    shape = model_shape(TINY)
    sent = {mode: [c.bytes_sent for c in plan_job(0, job("j", mode, height=384), 3, shape).costs] for mode in Mode
            if mode is not Mode.PIPEFUSION}  # a UNet: refused (tests/test_pipefusion.py)
    assert sent[Mode.SYNC] == sent[Mode.DISPLACED]
    assert all(b > 0 for b in sent[Mode.SYNC])
    assert sent[Mode.NAIVE] == [0, 0, 0]
    assert sent[Mode.SYNC][1] > sent[Mode.SYNC][0], "a middle band sends halos both ways"
    assert plan_job(0, job("j", Mode.NONE), 1, shape).costs[0].bytes_sent == 0


def test_split_cfg_bands_over_half_the_group():
    plan = plan_job(0, job("j", Mode.SYNC, height=256, split_cfg=True), 4, model_shape(TINY))
    assert plan.patch_ranks == 2 and len(plan.bands) == 2 and len(plan.costs) == 4
    assert plan.costs[0].bytes_sent == plan.costs[2].bytes_sent


def test_every_problem_is_listed_before_anything_loads():
    m = manifest(job("fits"), job("short", height=64), job("odd", split_cfg=True, rpi=3),
                 job("unguided", split_cfg=True, rpi=2, guidance_scale=1.0), job("three", rpi=3))
    with pytest.raises(DoesNotFit) as e:
        plan_of(m, 4)
    lines = str(e.value).splitlines()
    assert len(lines) == 4 and not any("jobs[fits]" in line for line in lines)
    assert any("jobs[short]" in line and "fewer than its 4 ranks" in line for line in lines)
    assert any("jobs[odd]" in line and "do not divide into groups of 3" in line for line in lines)
    assert any("jobs[unguided]" in line and "classifier-free guidance" in line for line in lines)
    assert any("jobs[three]" in line and "do not divide into groups of 3" in line for line in lines)


def test_a_model_whose_shapes_cannot_be_read_is_refused_only_when_its_bands_need_them():
    def unreadable(ref):
        raise ModelNotFound(f"model {ref!r}: no config")

    alone = plan_of(manifest(job("a", Mode.NONE)), 2, shapes=unreadable)
    assert alone.jobs[0].costs is None and alone.jobs[0].bands == ()
    with pytest.raises(DoesNotFit, match="no config"):
        plan_of(manifest(job("b", Mode.SYNC)), 2, shapes=unreadable)
    unknown = plan_of(manifest(job("c", Mode.SYNC)), 2, shapes=lambda ref: None)  # a hub id not in the cache
    assert unknown.jobs[0].bands == () and unknown.jobs[0].seconds(1e9) is None


def test_a_memory_limit_refuses_what_does_not_fit():
    m = manifest(job("j"))
    need = max(c.memory.total for c in plan_of(m, 2).jobs[0].costs)
    assert plan_of(m, 2, limit=MemoryLimit(need, "HPCRENDER_MAX_MEMORY")).jobs[0]
    with pytest.raises(DoesNotFit, match="does not fit: a rank needs at least .* but HPCRENDER_MAX_MEMORY is"):
        plan_of(m, 2, limit=MemoryLimit(need - 1, "HPCRENDER_MAX_MEMORY"))


def test_estimated_time_is_the_slowest_rank_over_the_steps_run():
    p = plan_job(0, job("j", Mode.SYNC, height=384), 3, model_shape(TINY))
    assert p.seconds(2e9) == pytest.approx(4 * max(c.macs for c in p.costs) / 2e9)
    assert p.estimate == job_cost(64, 384, 4)


def test_describe_plan_shows_each_job_once_with_group_bands_bytes_and_time():
    m = manifest(job("a", Mode.NONE, 64, 64), job("b", Mode.NONE, 64, 64), job("c", Mode.SYNC, 64, 256))
    text = describe_plan(m, plan_of(m, 2), CPU_CORE_MACS_PER_S)
    for name in "abc":
        assert sum(line.split()[0] == name for line in text.splitlines() if line.startswith("  ") and
                   line.split()) == 1
    assert "group 0 (rank 0)" in text and "group 1 (rank 1)" in text and "group 0 (rank 0-1)" in text
    assert "latent bands 0:16,16:32" in text
    assert "sends per step:" in text and "estimated" in text


def test_a_gigapixel_job_plans_its_levels_tiles_evaluations_store_and_time():
    from hpcrender.config import GigapixelConfig

    giga = job("g", Mode.NONE, 384, 256, gigapixel=GigapixelConfig(base=128, tile=128, overlap=32, strength=0.5))
    plan = plan_of(manifest(giga, job("p", Mode.NONE, 64, 64)), 2)
    p = plan.jobs[0]
    assert [(lv.width, lv.height, len(lv.tiles)) for lv in p.gigapixel.levels] == [(128, 64, 1), (256, 128, 2),
                                                                                 (384, 256, 6)]
    assert p.gigapixel.unet_evaluations == p.gigapixel.base_steps + 8 * p.gigapixel.tile_steps
    tile = max(c.macs for c in p.costs)
    base = max(c.macs for c in p.base_costs)
    assert p.seconds(1e9) == pytest.approx((p.gigapixel.base_steps * base + 8 * p.gigapixel.tile_steps * tile) / 1e9)
    assert p.store_bytes == sum(3 * (lv.height * lv.width + len(lv.tiles) * lv.patch_shape[0] * lv.patch_shape[1])
                                for lv in p.gigapixel.levels)
    text = describe_plan(manifest(giga), plan_of(manifest(giga), 2))
    assert "gigapixel levels: 128x64 (1 tile), 256x128 (2 tiles), 384x256 (6 tiles)" in text
    assert "UNet evaluations" in text and "uncompressed" in text and "on all 2 group(s)" in text
    assert "per tile (measured)" not in text
    # At a measured time per tile: level by level, each level's tiles over the groups, the base as one tile.
    from hpcrender.run.plan import tile_rate_seconds

    assert tile_rate_seconds(p.gigapixel, 2.0, 1) == 2.0 * (1 + 2 + 6)
    assert tile_rate_seconds(p.gigapixel, 2.0, 2) == 2.0 * (1 + 1 + 3)
    assert tile_rate_seconds(p.gigapixel, 2.0, 4) == 2.0 * (1 + 1 + 2)
    measured = describe_plan(manifest(giga), plan_of(manifest(giga), 2), tile_seconds=2.0)
    assert "at 2 s per tile (measured): 18.0 s on one group, 10.0 s on all 2 group(s)" in measured


def test_heun_costs_two_unet_calls_a_step_and_displaced_heun_two_sets_of_buffers():
    euler = plan_of(manifest(job("e", Mode.DISPLACED)), 2).jobs[0]
    heun = plan_of(manifest(job("h", Mode.DISPLACED, scheduler=SchedulerName.HEUN)), 2).jobs[0]
    sync = plan_of(manifest(job("s", Mode.SYNC, scheduler=SchedulerName.HEUN)), 2).jobs[0]
    assert [c.macs for c in heun.costs] == [c.macs for c in euler.costs]  # per call
    assert heun.seconds(1e9) == pytest.approx(euler.seconds(1e9) * 7 / 4)  # 4 steps: 2 x 4 - 1 calls
    assert heun.costs[0].memory.buffers.total == 2 * euler.costs[0].memory.buffers.total > 0
    assert sync.costs[0].memory.buffers.total == euler.costs[0].memory.buffers.total
    text = describe_plan(manifest(heun.job), plan_of(manifest(heun.job), 2))
    assert f"sends per step: {2 * heun.costs[0].bytes_sent / 2**20:.1f} MiB" in text and "(7 UNet calls)" in text
    giga = job("g", Mode.NONE, 384, 256, scheduler=SchedulerName.HEUN,
               gigapixel=GigapixelConfig(base=128, tile=128, overlap=32, strength=0.5))
    tiles = plan_of(manifest(giga), 1).jobs[0].gigapixel
    assert (tiles.base_calls, tiles.tile_calls) == (7, 3)  # 4 steps; the tiles' last 2
    assert tiles.unet_evaluations == 7 + 8 * 3


def test_a_displaced_job_whose_warm_up_covers_every_step_is_planned_as_synchronous_throughout():
    few = dataclasses.replace(job("few", Mode.DISPLACED), parallel=ParallelConfig(mode=Mode.DISPLACED,
                                                                                  warmup_steps=4))
    more = dataclasses.replace(job("more", Mode.DISPLACED), parallel=ParallelConfig(mode=Mode.DISPLACED,
                                                                                    warmup_steps=3))
    plan = plan_of(manifest(few, more), 2)
    assert plan.jobs[0].synchronous_throughout and not plan.jobs[1].synchronous_throughout
    alone = plan_of(manifest(dataclasses.replace(few, parallel=ParallelConfig(mode=Mode.NONE, warmup_steps=4))), 2)
    assert not alone.jobs[0].synchronous_throughout
    text = describe_plan(manifest(few), plan_of(manifest(few), 2))
    assert "displaced, but the warm-up covers all 4 step(s): synchronous throughout" in text


# --- the cost cache: alike jobs share one computation --------------------------------------------------------------

def _bookkeeping():
    """benchmarks/bookkeeping.py, whose manifest generator the benchmark and these tests share."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bookkeeping.py"
    spec = importlib.util.spec_from_file_location("bookkeeping", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_costs(j: Job, size: int, bands: tuple, shape) -> tuple[RankCost, ...]:
    """The per-job computation as it was before the cache, from the job itself."""
    exchanging = bool(bands) and j.parallel.mode in (Mode.SYNC, Mode.DISPLACED)
    rows, width = j.height // shape.facts.vae_scale, j.width // shape.facts.vae_scale
    whole = bands or (Band(0, rows),)
    batch = 2 if j.guidance_scale > 1.0 and not j.parallel.split_cfg else 1
    element = {"float32": 4, "float16": 2, "bfloat16": 2}[j.dtype.value]
    # The plan's own caches of the per-layer tables (there before the cost cache): a meta forward takes a second.
    layers, compute = run_plan._layers(shape, width), run_plan._compute(shape, width)
    sets = j.scheduler.calls_per_step if j.parallel.mode is Mode.DISPLACED else 1
    costs = []
    for rank in range(size):
        band = rank % len(whole)
        own = run_plan._band_activations(shape, batch, whole[band].size, width)
        activations = 0
        if own is not None:
            extra = gathered_keys_values(layers, whole, band, batch, element) if exchanging else 0
            activations = own * element // 4 + extra
        memory = memory_estimate(layers, shape.parameters, whole if exchanging else (), batch, element, activations,
                                 buffer_sets=sets)
        macs = step_macs(compute, whole, band, batch, TEXT_TOKENS, exchanging, text_kv_cached=bool(bands))
        sent = expected_bytes(layers, whole, band, batch, element) if exchanging else 0
        costs.append(RankCost(rank, macs, sent, memory))
    return tuple(costs)


BASE = job("base", Mode.DISPLACED, 64, 128)
# One variant per field the costs depend on (size 2 unless given): each must miss the others' cache entries.
VARIANTS = {
    "base": (BASE, 2),
    "width": (dataclasses.replace(BASE, width=128), 2),
    "height": (dataclasses.replace(BASE, height=256), 2),
    "no guidance": (dataclasses.replace(BASE, guidance_scale=1.0), 2),
    "split_cfg": (dataclasses.replace(BASE, parallel=dataclasses.replace(BASE.parallel, split_cfg=True)), 2),
    "group size": (BASE, 1),
    "mode sync": (dataclasses.replace(BASE, parallel=dataclasses.replace(BASE.parallel, mode=Mode.SYNC)), 2),
    "mode naive": (dataclasses.replace(BASE, parallel=dataclasses.replace(BASE.parallel, mode=Mode.NAIVE)), 2),
    "mode none": (dataclasses.replace(BASE, parallel=dataclasses.replace(BASE.parallel, mode=Mode.NONE)), 1),
    "dtype": (dataclasses.replace(BASE, dtype=DType.FLOAT16), 2),
    "heun": (dataclasses.replace(BASE, scheduler=SchedulerName.HEUN), 2),
    "model": (dataclasses.replace(BASE, model="another-model"), 2),
}


def shape_of(ref: str):
    """tiny-sd's shape, and for "another-model" one that differs in its weights only (no second meta UNet)."""
    tiny = model_shape(TINY)
    return _OTHER.setdefault("shape", dataclasses.replace(tiny, ref=ref, parameters=2 * tiny.parameters)) \
        if ref == "another-model" else tiny


_OTHER: dict = {}


def test_a_cost_cache_hit_equals_a_fresh_computation_for_jobs_differing_in_each_field_that_matters():
    run_plan._cached_costs.cache_clear()
    planned = {name: plan_job(0, j, size, shape_of(j.model)) for name, (j, size) in VARIANTS.items()}
    again = {name: plan_job(0, j, size, shape_of(j.model)) for name, (j, size) in VARIANTS.items()}
    assert run_plan._cached_costs.cache_info().hits >= len(VARIANTS)
    for name, (j, size) in VARIANTS.items():
        fresh = reference_costs(j, size, planned[name].bands, shape_of(j.model))
        assert planned[name].costs == fresh, name
        assert again[name].costs is planned[name].costs, name  # the second time from the cache
    keys = {name: run_plan.cost_key(j, size, planned[name].bands, shape_of(j.model))
            for name, (j, size) in VARIANTS.items()}
    # sync and displaced exchange the same bytes with one call a step: alike costs, one key (heun tells them apart)
    assert [name for name, key in keys.items() if key == keys["base"]] == ["base", "mode sync"]


def test_jobs_differing_in_name_prompt_seed_steps_and_warmup_share_one_cost_tuple():
    other = dataclasses.replace(BASE, name="other", prompt="another prompt", seed=99, steps=30,
                                negative_prompt="blurry", parallel=dataclasses.replace(BASE.parallel, warmup_steps=1))
    one, two = plan_job(0, BASE, 2, model_shape(TINY)), plan_job(1, other, 2, model_shape(TINY))
    assert one.costs is two.costs and one.sent == two.sent
    assert one.costs == reference_costs(other, 2, two.bands, model_shape(TINY))


def test_a_plan_of_20000_jobs_computes_the_costs_once_per_distinct_key(tmp_path, monkeypatch):
    bookkeeping = _bookkeeping()
    m = load_manifest(bookkeeping.write_manifest(tmp_path / "jobs.toml", 20_000))
    calls, checks = [], []
    compute, check = run_plan.compute_rank_costs, run_plan.check_model_options
    monkeypatch.setattr(run_plan, "compute_rank_costs", lambda *key: calls.append(key) or compute(*key))
    monkeypatch.setattr(run_plan, "check_model_options", lambda j: checks.append(j.name) or check(j))
    run_plan._cached_costs.cache_clear()
    plan = plan_of(m, 1)
    assert len(plan.jobs) == 20_000
    sizes = set(bookkeeping.SIZES)
    assert len(calls) == len(set(calls)) == len(sizes)  # one computation per (width, height): nothing else differs
    assert len(checks) == len(sizes)  # the model option checks too
    by_size = {(p.job.width, p.job.height): p.costs for p in plan.jobs.values()}
    assert all(p.costs is by_size[(p.job.width, p.job.height)] for p in plan.jobs.values())
