"""The MPI work queue: every unit taken exactly once, faster groups take more, a slow or failing group holds nobody
up, and the bytes of an image never depend on which group rendered it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hpcrender.run.schedule import assign_jobs

from clirun import HPCRENDER, MPIEXEC, clean_env, hpcrender, meta_of, status_of, write_manifest

pytestmark = pytest.mark.mpi
SCRIPTS = Path(__file__).parent / "mpi_scripts"


def run_script(ranks: int, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [str(MPIEXEC), "-n", str(ranks), str(HPCRENDER.parent / "python"), str(SCRIPTS / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env())


@pytest.mark.parametrize("ranks, group_size, units", [(3, 1, 40), (4, 2, 30)])
def test_every_unit_goes_to_exactly_one_group_and_faster_groups_take_more(ranks, group_size, units):
    done = run_script(ranks, "queue_checks.py", str(units), str(group_size))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["world_size"] == ranks
    assert report["agreed"], "every rank of a group saw the units its leader took"
    taken = [u for group in report["groups"].values() for u in group]
    assert sorted(taken) == sorted(f"unit-{i}" for i in range(units))
    for group in report["groups"].values():  # each group takes them in the queue's order
        assert group == sorted(group, key=lambda u: int(u.split("-")[1]))
    counts = {int(g): len(t) for g, t in report["groups"].items()}
    assert counts[0] > counts[max(counts)], counts  # group 0 sleeps least per unit
    # 1.5 s busy without MPI on rank 0, which holds the counter: the others took every other unit meanwhile
    assert report["taken_by_rank0_after_its_busy_time"] == []


QUEUE = """
[defaults]
model = "builtin:tiny-sd"
steps = 2
width = 64
height = 64
[defaults.parallel]
mode = "none"
[[jobs]]
name = "n1"
prompt = "a harbor"
[[jobs]]
name = "n2"
prompt = "a valley"
[[jobs]]
name = "n3"
prompt = "a forest"
width = 96
[[jobs]]
name = "s1"
prompt = "a lighthouse"
height = 128
[jobs.parallel]
mode = "sync"
ranks_per_image = 2
[[jobs]]
name = "s2"
prompt = "a desert"
height = 128
[jobs.parallel]
mode = "sync"
ranks_per_image = 2
[[jobs]]
name = "s3"
prompt = "a city"
height = 128
seed = 5
[jobs.parallel]
mode = "sync"
ranks_per_image = 2
"""
NONE_JOBS, SYNC_JOBS = ("n1", "n2", "n3"), ("s1", "s2", "s3")


def test_four_ranks_in_groups_render_each_job_once_with_the_bytes_of_one_and_two_ranks(tmp_path):
    manifest = write_manifest(tmp_path / "queue.toml", QUEUE)
    four = hpcrender("render", manifest, "--out", tmp_path / "four", ranks=4)
    assert four.returncode == 0, four.stderr
    # The references in one launch of 2 ranks: the mode-none jobs on its two groups of one (the bytes of one
    # process: test_render's test_one_rank_and_two_ranks_give_identical_images), the sync jobs on its group of two.
    two = hpcrender("render", manifest, "--out", tmp_path / "two", ranks=2)
    assert two.returncode == 0, two.stderr
    assert {g["group_size"] for g in status_of(tmp_path / "two")["groups"] if g["units"]} == {1, 2}

    status = status_of(tmp_path / "four")
    assert {n: j["state"] for n, j in status["jobs"].items()} == dict.fromkeys(NONE_JOBS + SYNC_JOBS, "done")
    assert all(j["attempt"] == 1 for j in status["jobs"].values())
    groups = status["groups"]
    taken = [u for g in groups for u in g["units"]]
    assert sorted(taken) == sorted(NONE_JOBS + SYNC_JOBS), "every job rendered exactly once"
    assert {(g["group_size"], tuple(g["ranks"])) for g in groups if g["units"]} <= {
        (1, (0,)), (1, (1,)), (1, (2,)), (1, (3,)), (2, (0, 1)), (2, (2, 3))}
    assert all(g["busy_seconds"] > 0 for g in groups if g["units"])
    for name in NONE_JOBS + SYNC_JOBS:
        meta = meta_of(tmp_path / "four", name)
        group = next(g for g in groups if name in g["units"])
        assert meta["layout"]["group"] == group["group"] == status["jobs"][name]["group"]
        assert meta["layout"]["ranks"] == group["ranks"]
        reference = tmp_path / "two" / name / "image.png"
        assert (tmp_path / "four" / name / "image.png").read_bytes() == reference.read_bytes(), name
    assert {len(meta_of(tmp_path / "four", n)["layout"]["bands"]) for n in SYNC_JOBS} == {2}


SPREAD = """
[defaults]
model = "builtin:tiny-sd"
steps = 2
width = 64
height = 64
[defaults.parallel]
mode = "none"
""" + "".join(f'[[jobs]]\nname = "{name}"\nprompt = "{name}"\n' for name in ("slow", "a", "bad", "b", "c", "d"))


def test_a_slow_group_leaves_the_rest_to_the_other_and_a_failing_group_keeps_taking_work(tmp_path):
    """Six jobs of one estimated cost on two groups of one rank. Job `slow` takes as long as all the others together
    (its group waits inside it until they are finished); job `bad` fails on its group. The static split that the
    estimates give would have left three jobs to the slow group; the queue gives it only its own."""
    manifest = write_manifest(tmp_path / "spread.toml", SPREAD)
    cmd = [str(MPIEXEC), "-n", "2", str(HPCRENDER.parent / "python"), str(SCRIPTS / "render_slow.py"), "slow", "bad",
           "--", "hpcrender", "render", str(manifest), "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env())
    assert done.returncode == 1, done.stderr  # a job failed
    status = status_of(tmp_path / "out")
    states = {n: j["state"] for n, j in status["jobs"].items()}
    assert states == {"slow": "done", "a": "done", "bad": "failed", "b": "done", "c": "done", "d": "done"}
    units = {g["group"]: g["units"] for g in status["groups"]}
    slow_group = next(g for g, u in units.items() if "slow" in u)
    assert units[slow_group] == ["slow"]
    assert units[1 - slow_group] == ["a", "bad", "b", "c", "d"], "the failing group went on taking work"
    static = assign_jobs([1.0] * 6, 2)
    assert max(len(share) for share in static) == 3 and 0 in static[0] and len(static[0]) == 3
