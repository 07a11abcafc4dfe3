"""hpcrender under a real (local, one-node) Slurm: srun worlds, renders under srun, job-array shares, and
stopping on a signal with exit 3 then resuming (SIGTERM to the ranks; the overnight template's USR1 -> requeue)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from slurm_fixture import TERMINAL_STATES, VENV_BIN, LocalSlurm, exit_status

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
PYTHON = VENV_BIN / "python"
HPCRENDER = VENV_BIN / "hpcrender"
# The templates ask for GPUs and 8 CPUs per task; the test cluster has neither, and options on the
# sbatch command line override the #SBATCH lines.
NO_GPU = ("--gpus-per-node=0", "--cpus-per-task=1")


def write_manifest(path: Path, names: Sequence[str], *, side: int = 64, steps: int = 2) -> Path:
    """A manifest of tiny builtin-model jobs, one image per rank (mode none)."""
    lines = ["[defaults]", 'model = "builtin:tiny-sd"', f"steps = {steps}", f"width = {side}", f"height = {side}",
             "", "[defaults.parallel]", 'mode = "none"', ""]
    for i, name in enumerate(names):
        lines += ["[[jobs]]", f'name = "{name}"', f'prompt = "test image {i}"', f"seed = {i}", ""]
    path.write_text("\n".join(lines))
    return path


def job_states(out: Path) -> dict[str, str]:
    status = json.loads((out / "status.json").read_text())
    return {name: job["state"] for name, job in status["jobs"].items()}


def images(out: Path) -> dict[str, int]:
    """Finished images by job name, with their modification times."""
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/image.png")}


def logs_of(paths: Sequence[Path]) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')}" for p in paths if p.exists())


def test_srun_with_pmi2_makes_one_mpi_world_of_all_tasks(slurm: LocalSlurm):
    done = slurm.srun(2, PYTHON, "-c",
                      "from mpi4py import MPI; c = MPI.COMM_WORLD; print('rank', c.rank, 'of', c.size)")
    assert done.returncode == 0, done.stderr + slurm.log_tail()
    # The wrong PMI would print "rank 0 of 1" twice.
    assert sorted(done.stdout.splitlines()) == ["rank 0 of 2", "rank 1 of 2"]


def test_srun_tasks_find_the_venv_first_on_path(slurm: LocalSlurm):
    done = slurm.srun(1, "sh", "-c", "command -v python; command -v hpcrender")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(PYTHON), str(HPCRENDER)]


def test_render_under_srun_with_the_wrong_pmi_is_refused_with_the_fix(slurm: LocalSlurm, tmp_path):
    manifest = write_manifest(tmp_path / "tiny.toml", ["one"])
    # Every task refuses alike; without kill-on-bad-exit the first refusal cannot turn the other's exit into a kill.
    done = slurm.srun(2, HPCRENDER, "render", manifest, "--out", tmp_path / "out", mpi="none", kill_on_bad_exit=False)
    # Two separate one-rank worlds would each render everything; hpcrender must notice and stop.
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--mpi=pmi2" in done.stderr
    assert not list((tmp_path / "out").glob("*/image.png"))


def test_srun_two_ranks_render_every_job_of_a_manifest(slurm: LocalSlurm, tmp_path):
    names = ["harbor", "forest", "lighthouse"]
    manifest = write_manifest(tmp_path / "tiny.toml", names)
    out = tmp_path / "out"
    done = slurm.srun(2, HPCRENDER, "render", manifest, "--out", out, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert job_states(out) == {name: "done" for name in names}
    assert sorted(images(out)) == sorted(names)
    # One log per rank: two ranks of one world, not two rank-0 processes.
    assert len(list((out / "logs").iterdir())) == 2


def test_job_array_tasks_render_their_own_shares_and_all_jobs_together(slurm: LocalSlurm, tmp_path):
    names = [f"job{i}" for i in range(5)]
    manifest = write_manifest(tmp_path / "tiny.toml", names)
    # A sweep beside the jobs: its 5 shards of 2 samples are shared as the jobs are, shard n to task n % 3.
    prompts = ", ".join(f'"sample {i}"' for i in range(10))
    manifest.write_text(manifest.read_text() + f'[[sweeps]]\nname = "sw"\nprompts = [{prompts}]\nshard_size = 2\n')
    out, shares = tmp_path / "out", tmp_path / "shares"
    shares.mkdir()
    # jobs/array.sbatch's body, wrapped to record which images each task added. %1 runs one task at a
    # time so that the images a task adds are its own.
    script = tmp_path / "array-task.sh"
    script.write_text(f"""#!/bin/bash
set -uo pipefail
list() {{ (cd "{out}" 2>/dev/null && {{ ls -d */image.png 2>/dev/null | cut -d/ -f1; ls sw/shard-*.tar 2>/dev/null; }} | sort); }}
before=$(list)
bash "{REPO}/jobs/array.sbatch" "{manifest}" "{out}"
rc=$?
comm -13 <(echo "$before") <(list) > "{shares}/$SLURM_ARRAY_TASK_ID"
exit $rc
""")
    done = slurm.sbatch_wait("--array=1-7:3%1", *NO_GPU, f"--output={tmp_path}/task-%a.out", script,
                             timeout=300, cwd=tmp_path)
    task_logs = sorted(tmp_path.glob("task-*.out"))
    assert done.returncode == 0, done.stdout + done.stderr + logs_of(task_logs)
    rendered = {int(p.name): p.read_text().split() for p in shares.iterdir()}
    # Task ids 1, 4, 7 are shard indices 0, 1, 2 = (ID - MIN) // STEP: job i belongs to shard i % 3, and so does
    # the sweep's shard i: disjoint, and together every shard.
    assert rendered == {1: ["job0", "job3", "sw/shard-000000.tar", "sw/shard-000003.tar"],
                        4: ["job1", "job4", "sw/shard-000001.tar", "sw/shard-000004.tar"],
                        7: ["job2", "sw/shard-000002.tar"]}, logs_of(task_logs)
    assert job_states(out) == {**{name: "done" for name in names}, "sw": "done"}
    index = [json.loads(line)["key"] for line in (out / "sw" / "index.jsonl").read_text().splitlines()]
    assert index == [f"sw-{i:07d}" for i in range(10)]
    # The template ran the venv's hpcrender (sbatch and srun passed PATH on).
    assert f"{HPCRENDER}:" in logs_of(task_logs)


def wait_for_an_image(out: Path, log: Path, timeout: float = 120) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while not images(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    found = images(out)
    assert found, f"no image finished within {timeout} s\n" + logs_of([log])
    return found


def test_single_template_stops_on_sigterm_with_exit_3_and_the_same_command_resumes(slurm: LocalSlurm, tmp_path):
    names = [f"img{i}" for i in range(6)]
    manifest = write_manifest(tmp_path / "batch.toml", names, side=128, steps=16)
    out, log = tmp_path / "out", tmp_path / "single.out"
    job_id = slurm.submit("--ntasks=2", *NO_GPU, f"--output={log}", REPO / "jobs" / "single.sbatch", manifest, out,
                          cwd=tmp_path)
    before = wait_for_an_image(out, log)
    # What a preemption or `scancel --signal=TERM` does: SIGTERM to every rank of the step.
    signalled = slurm.scancel(job_id, "--signal=TERM")
    assert signalled.returncode == 0, signalled.stderr
    record = slurm.wait_until(job_id, TERMINAL_STATES, timeout=120)
    text = logs_of([log])
    assert exit_status(record) == 3, text
    states = job_states(out)
    assert "done" in states.values() and set(states.values()) != {"done"}, (states, text)

    done = slurm.srun(2, HPCRENDER, "render", manifest, "--out", out, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert job_states(out) == {name: "done" for name in names}
    after = images(out)
    assert {name: after[name] for name in before} == before


def test_overnight_template_checkpoints_on_usr1_requeues_and_resumes(slurm: LocalSlurm, tmp_path):
    names = [f"tile{i}" for i in range(4)]
    manifest = write_manifest(tmp_path / "giga.toml", names, side=128, steps=16)
    out, log = tmp_path / "out", tmp_path / "giga.out"
    job_id = slurm.submit("--ntasks=1", *NO_GPU, "--time=10:00", f"--output={log}",
                          REPO / "jobs" / "gigapixel.sbatch", manifest, out, cwd=tmp_path)
    before = wait_for_an_image(out, log)
    # What the time-limit warning of `#SBATCH --signal=B:USR1@120` does: USR1 to the batch shell only.
    signalled = slurm.scancel(job_id, "--batch", "--signal=USR1")
    assert signalled.returncode == 0, signalled.stderr
    record = slurm.wait_until(job_id, TERMINAL_STATES, timeout=240)
    text = logs_of([log])
    assert record["JobState"] == "COMPLETED", text
    assert int(record.get("Restarts", 0)) == 1, text
    assert "requeueing" in text and "run 2 of job" in text, text
    assert job_states(out) == {name: "done" for name in names}, text
    after = images(out)
    assert sorted(after) == sorted(names)
    # The second run resumed: images finished before the signal were not rendered again.
    assert {name: after[name] for name in before} == before


# --- how hpcrender finds its world under srun (from test_environment: every Slurm test in one file) -------

@pytest.mark.slurm
def test_srun_with_pmi2_gives_the_real_world_size(slurm):
    result = slurm.srun(2, sys.executable, Path(__file__).parent / "mpi_scripts" / "env_world.py", mpi="pmi2")
    assert result.returncode == 0, result.stderr
    got = sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")),
                 key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["dist_size"], r["launcher"]) for r in got] == [
        (0, 2, 2, "srun"), (1, 2, 2, "srun")]


@pytest.mark.slurm
def test_srun_without_pmi_is_refused_instead_of_two_worlds_of_one(slurm):
    result = slurm.srun(2, sys.executable, Path(__file__).parent / "mpi_scripts" / "env_world.py", mpi="none",
                        kill_on_bad_exit=False)
    assert result.returncode != 0
    assert "srun started 2 ranks but MPI sees a world of 1" in result.stderr
    assert "{" not in result.stdout
