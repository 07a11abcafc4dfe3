"""Array shards, Slurm array indices, rank groups and job balancing: exhaustive over small ranges."""

from __future__ import annotations

import itertools

import pytest

from hpcrender.errors import BadInput, DoesNotFit
from hpcrender.run.environment import SlurmInfo
from hpcrender.run.schedule import array_shard, assign_jobs, job_cost, rank_groups, slurm_array_index


def array_task(task_id, first, last, step, count=None) -> SlurmInfo:
    return SlurmInfo(job_id="100", procid=0, ntasks=1, localid=0, nodeid=0, nodelist="n1", cpus_per_task=None,
                     restart_count=0, array_task_id=task_id, array_task_min=first, array_task_max=last,
                     array_task_step=step, array_task_count=count)


# --- array_shard -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_jobs", range(0, 13))
@pytest.mark.parametrize("count", range(1, 6))
def test_array_shards_cover_every_job_exactly_once(n_jobs, count):
    shards = [array_shard(n_jobs, index, count) for index in range(count)]
    assert sorted(itertools.chain(*shards)) == list(range(n_jobs))
    for index, shard in enumerate(shards):
        assert shard == tuple(i for i in range(n_jobs) if i % count == index)


@pytest.mark.parametrize("n_jobs,index,count", [(5, 0, 0), (5, -1, 2), (5, 2, 2), (5, 7, 3), (-1, 0, 1)])
def test_array_shard_rejects_impossible_requests(n_jobs, index, count):
    with pytest.raises(BadInput):
        array_shard(n_jobs, index, count)


# --- slurm_array_index -------------------------------------------------------------------------------------

def test_slurm_array_1_7_3_runs_shards_0_1_2_not_the_ids():
    # --array=1-7:3 runs task ids 1, 4, 7 (what Slurm exports, seen on a real Slurm).
    assert [slurm_array_index(array_task(i, 1, 7, 3, 3)) for i in (1, 4, 7)] == [(0, 3), (1, 3), (2, 3)]
    owner = {j: 1 + 3 * (j % 3) for j in range(10)}  # the contract's formula, solved for the task id
    for task_id in (1, 4, 7):
        index, count = slurm_array_index(array_task(task_id, 1, 7, 3, 3))
        assert array_shard(10, index, count) == tuple(j for j in range(10) if owner[j] == task_id)


@pytest.mark.parametrize("first", range(0, 4))
@pytest.mark.parametrize("last_offset", range(0, 9))
@pytest.mark.parametrize("step", range(1, 5))
@pytest.mark.parametrize("with_count", [True, False])
def test_slurm_array_ranges_map_onto_every_shard_once(first, last_offset, step, with_count):
    ids = list(range(first, first + last_offset + 1, step))
    last = ids[-1]
    got = [slurm_array_index(array_task(i, first, last, step, len(ids) if with_count else None)) for i in ids]
    assert got == [(k, len(ids)) for k in range(len(ids))]
    for task_id in ids:  # the contract's formula, verbatim
        index, count = slurm_array_index(array_task(task_id, first, last, step, len(ids)))
        assert array_shard(11, index, count) == tuple(
            i for i in range(11) if i % len(ids) == (task_id - first) // step)


def test_no_slurm_or_no_array_means_no_array_index():
    assert slurm_array_index(None) is None
    assert slurm_array_index(array_task(None, None, None, None)) is None


@pytest.mark.parametrize("task_id", [0, 3, 8])
def test_a_list_array_is_refused_by_every_task(task_id):
    # --array=0,3,8 exports MIN=0 MAX=8 STEP=1 COUNT=3 (seen on a real Slurm): ids are not shard indices.
    with pytest.raises(BadInput, match="regular range"):
        slurm_array_index(array_task(task_id, 0, 8, 1, 3))


def test_an_array_id_without_its_bounds_is_refused():
    with pytest.raises(BadInput, match="MIN/MAX"):
        slurm_array_index(array_task(3, None, None, None))


# --- rank_groups -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("size", range(0, 10))
def test_rank_groups_are_consecutive_and_partition_the_world(world_size, size):
    if size and world_size % size:
        with pytest.raises(DoesNotFit, match=f"^{world_size} ranks do not divide into groups of {size}$"):
            rank_groups(world_size, size)
        return
    groups = rank_groups(world_size, size)
    expected_size = size or world_size
    assert sorted(itertools.chain(*groups)) == list(range(world_size))
    assert all(len(g) == expected_size for g in groups)
    assert all(g == tuple(range(g[0], g[0] + expected_size)) for g in groups)
    assert [r // expected_size for g in groups for r in g] == [i for i, g in enumerate(groups) for _ in g]


def test_zero_ranks_per_image_is_one_group_of_all():
    assert rank_groups(4, 0) == ((0, 1, 2, 3),)


@pytest.mark.parametrize("world_size,size", [(0, 1), (4, -1)])
def test_rank_groups_reject_nonsense(world_size, size):
    with pytest.raises(BadInput):
        rank_groups(world_size, size)


# --- assign_jobs -------------------------------------------------------------------------------------------

def optimal_makespan(costs, n_groups):
    best = float("inf")
    for choice in itertools.product(range(n_groups), repeat=len(costs)):
        loads = [0.0] * n_groups
        for c, g in zip(costs, choice):
            loads[g] += c
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("n_groups", [1, 2, 3])
def test_assign_jobs_gives_every_job_once_within_the_lpt_bound(n_groups):
    for n in range(0, 6):
        for costs in itertools.product((1.0, 2.0, 3.0), repeat=n):
            shares = assign_jobs(costs, n_groups)
            assert len(shares) == n_groups
            assert sorted(itertools.chain(*shares)) == list(range(n))
            assert all(list(s) == sorted(s) for s in shares)
            makespan = max((sum(costs[i] for i in s) for s in shares), default=0.0)
            # Graham: longest-processing-time-first is within 4/3 - 1/(3m) of the optimum.
            assert makespan <= optimal_makespan(costs, n_groups) * (4 / 3 - 1 / (3 * n_groups)) + 1e-9


def test_assign_jobs_balances_long_and_short_jobs():
    # Loads 8+1+1 and 4+4+1+1: a perfect split of 20, each group's jobs in manifest order.
    assert assign_jobs([8.0, 1.0, 1.0, 1.0, 1.0, 4.0, 4.0], 2) == ((0, 1, 3), (2, 4, 5, 6))
    assert assign_jobs([1.0] * 6, 3) == ((0, 3), (1, 4), (2, 5))
    assert assign_jobs([5.0, 2.0], 4) == ((0,), (1,), (), ())


def test_assign_jobs_is_deterministic_for_ties():
    costs = [2.0, 2.0, 1.0, 1.0, 2.0]
    assert all(assign_jobs(costs, 2) == assign_jobs(list(costs), 2) for _ in range(5))
    # 0 -> A, 1 -> B, 4 -> A (equal loads: lower group), then 2 and 3 -> B.
    assert assign_jobs(costs, 2) == ((0, 4), (1, 2, 3))


@pytest.mark.parametrize("costs,n_groups", [([1.0], 0), ([-1.0], 1), ([float("nan")], 1), ([float("inf")], 2)])
def test_assign_jobs_rejects_bad_costs_and_group_counts(costs, n_groups):
    with pytest.raises(BadInput):
        assign_jobs(costs, n_groups)


# --- job_cost ----------------------------------------------------------------------------------------------

def test_job_cost_grows_with_pixels_and_steps():
    sides = (64, 512, 1024, 2048, 4096)
    for w, h in itertools.product(sides, sides):
        assert job_cost(w, h, 20) == pytest.approx(2 * job_cost(w, h, 10))
        assert job_cost(w * 2, h, 10) > job_cost(w, h, 10)
        assert job_cost(w, h * 2, 10) > job_cost(w, h, 10)
    assert job_cost(1024, 1024, 1) == pytest.approx(1.0625)  # one step at 1 Mpx, plus the attention term


@pytest.mark.parametrize("side,measured", [(2048, 23.7 / 5.02), (3840, 140 / 5.02)])
def test_job_cost_tracks_measured_sdxl_latency_ratios(side, measured):
    # DistriFusion's single-GPU SDXL latencies: attention makes big images cost more than their pixels.
    ratio = job_cost(side, side, 50) / job_cost(1024, 1024, 50)
    assert ratio > (side / 1024) ** 2
    assert ratio == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("w,h,s", [(0, 8, 1), (8, 0, 1), (8, 8, 0)])
def test_job_cost_rejects_empty_jobs(w, h, s):
    with pytest.raises(BadInput):
        job_cost(w, h, s)
