"""The render command end to end (mode none): outputs, determinism, ranks, failures, resume, exit codes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpcrender.output.records import read_status

from clirun import MPIEXEC, HPCRENDER, hpcrender, meta_of, status_of, clean_env, write_manifest

pytestmark = pytest.mark.mpi

BATCH = """
[defaults]
model = "builtin:tiny-sd"
steps = 3
[defaults.parallel]
mode = "none"

[[jobs]]
name = "harbor"
prompt = "a harbor at dawn"
width = 64
height = 64
seed = 7

[[jobs]]
name = "harbor-again"
prompt = "a harbor at dawn"
width = 64
height = 64
seed = 7

[[jobs]]
name = "harbor-seed8"
prompt = "a harbor at dawn"
width = 64
height = 64
seed = 8

[[jobs]]
name = "wide-xl"
prompt = "a wide valley"
model = "builtin:tiny-sdxl"
scheduler = "dpmpp"
width = 96
height = 64
seed = 3
"""


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """The same batch rendered by one plain process and by 2 MPI ranks."""
    root = tmp_path_factory.mktemp("batch")
    manifest = write_manifest(root / "batch.toml", BATCH)
    one = hpcrender("render", manifest, "--out", root / "one", "--save-latent")
    two = hpcrender("render", manifest, "--out", root / "two", ranks=2)
    return root, manifest, one, two


def test_batch_renders_every_job_with_contract_outputs(batch):
    root, _, one, _ = batch
    assert one.returncode == 0, one.stderr
    status = status_of(root / "one")
    assert {name: j["state"] for name, j in status["jobs"].items()} == dict.fromkeys(
        ["harbor", "harbor-again", "harbor-seed8", "wide-xl"], "done")
    for job in status["jobs"]:
        d = root / "one" / job
        for f in ("meta.json", "tiles.h5", "image.png", "preview.png", "latent.npy"):
            assert (d / f).is_file(), f"{job}/{f}"
    img = Image.open(root / "one" / "wide-xl" / "image.png")
    assert img.size == (96, 64) and img.mode == "RGB"
    latent = np.load(root / "one" / "wide-xl" / "latent.npy")
    assert latent.dtype == np.float32 and latent.shape == (4, 8, 12)
    meta = meta_of(root / "one", "wide-xl")
    assert meta["layout"]["world_size"] == 1
    assert len(meta["timings"]["step_seconds"]) == 3
    assert meta["versions"]["torch"] and meta["job"]["scheduler"] == "dpmpp_2m"  # written "dpmpp", its old name
    assert (root / "one" / "logs" / "rank-0000.log").is_file()


def test_same_seed_same_png_bytes_other_seed_other_image(batch):
    root = batch[0] / "one"
    a = (root / "harbor" / "image.png").read_bytes()
    assert a == (root / "harbor-again" / "image.png").read_bytes()
    x = np.asarray(Image.open(root / "harbor" / "image.png"), dtype=np.int16)
    y = np.asarray(Image.open(root / "harbor-seed8" / "image.png"), dtype=np.int16)
    assert np.abs(x - y).mean() > 1.0


def test_one_rank_and_two_ranks_give_identical_images(batch):
    root, _, _, two = batch
    assert two.returncode == 0, two.stderr
    ranks_used = set()
    for job in ("harbor", "harbor-again", "harbor-seed8", "wide-xl"):
        assert (root / "one" / job / "image.png").read_bytes() == (root / "two" / job / "image.png").read_bytes()
        meta = meta_of(root / "two", job)
        assert meta["layout"]["world_size"] == 2
        ranks_used.update(meta["layout"]["ranks"])
    assert ranks_used == {0, 1}, "mode none shares the jobs among the ranks"
    assert (root / "two" / "logs" / "rank-0001.log").is_file()


def test_rerun_skips_finished_jobs(batch):
    root, manifest, _, _ = batch
    before = (root / "one" / "harbor" / "image.png").stat().st_mtime_ns
    again = hpcrender("render", manifest, "--out", root / "one")
    assert again.returncode == 0, again.stderr
    assert (root / "one" / "harbor" / "image.png").stat().st_mtime_ns == before
    assert "already done" in (root / "one" / "logs" / "rank-0000.log").read_text()


def test_status_and_stitch_commands(batch):
    root = batch[0]
    st = hpcrender("status", root / "one")
    assert st.returncode == 0 and "harbor-seed8" in st.stdout and "done" in st.stdout
    tif = hpcrender("stitch", root / "one" / "wide-xl", "--format", "tiff", "--out", root / "w.tif")
    assert tif.returncode == 0, tif.stderr
    import tifffile

    assert np.array_equal(tifffile.imread(root / "w.tif"), np.asarray(Image.open(root / "one" / "wide-xl" / "image.png")))
    missing = hpcrender("status", root / "nowhere")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_a_failing_job_does_not_stop_the_batch(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()  # exists, so it validates; holds no pipeline, so loading fails at render time
    manifest = write_manifest(tmp_path / "m.toml", f"""
[defaults]
model = "builtin:tiny-sd"
steps = 2
[defaults.parallel]
mode = "none"
[[jobs]]
name = "bad"
prompt = "x"
model = "{broken}"
width = 64
height = 64
[[jobs]]
name = "good"
prompt = "y"
width = 64
height = 64
""")
    r = hpcrender("render", manifest, "--out", tmp_path / "out")
    assert r.returncode == 1, r.stderr
    status = status_of(tmp_path / "out")
    assert status["jobs"]["good"]["state"] == "done"
    assert status["jobs"]["bad"]["state"] == "failed" and status["jobs"]["bad"]["error"]
    assert "Traceback" not in r.stderr


def test_bad_manifest_exits_2_on_every_rank_and_renders_nothing(tmp_path):
    manifest = write_manifest(tmp_path / "bad.toml", """
[defaults]
steps = 0
[[jobs]]
name = "a"
prompt = "x"
width = 100
""")
    r = hpcrender("render", manifest, "--out", tmp_path / "out", ranks=2)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert any(re.search(r"bad\.toml:3: defaults\.steps", line) for line in lines), r.stderr
    assert any(re.search(r"bad\.toml:7: jobs\[a\]\.width", line) for line in lines), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "a").exists()


def test_bad_arguments_exit_2(tmp_path):
    manifest = write_manifest(tmp_path / "m.toml", BATCH)
    r = hpcrender("render", manifest, "--array-index", "1")
    assert r.returncode == 2 and "--array-count" in r.stderr
    r = hpcrender("render", manifest, "--only", "harbour")
    assert r.returncode == 2 and "harbor" in r.stderr  # did-you-mean
    r = hpcrender("render", tmp_path / "missing.toml")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_array_index_renders_its_share(tmp_path):
    manifest = write_manifest(tmp_path / "m.toml", BATCH)
    r = hpcrender("render", manifest, "--out", tmp_path / "out", "--array-index", "1", "--array-count", "3",
                  "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert set(status_of(tmp_path / "out")["jobs"]) == {"harbor-again"}  # job i with i % 3 == 1
    # Tasks of one array may share OUT from different nodes: each its own log.
    assert [p.name for p in (tmp_path / "out" / "logs").iterdir()] == ["rank-0000.task-1.log"]


def test_validate_and_plan(tmp_path):
    manifest = write_manifest(tmp_path / "m.toml", BATCH)
    v = hpcrender("validate", manifest)
    assert v.returncode == 0 and "4 job(s), OK" in v.stdout
    p = hpcrender("plan", manifest, "--ranks", "2")
    assert p.returncode == 0, p.stderr
    assert "2 group(s) of 1 rank(s)" in p.stdout and "wide-xl" in p.stdout


def test_plan_shows_the_memory_a_rank_needs_and_refuses_what_does_not_fit(tmp_path):
    manifest = write_manifest(tmp_path / "m.toml", BATCH)
    p = hpcrender("plan", manifest)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("memory per rank: at least") == 4
    # multiply-accumulates and activations of every rank, from the model's shapes
    assert p.stdout.count("per step, compute + activations: rank 0 ") == 4
    assert re.search(r"activations \d+\.\d MiB\)", p.stdout)
    refused = hpcrender("plan", manifest, HPCRENDER_MAX_MEMORY="1M")
    assert refused.returncode == 2
    lines = refused.stderr.splitlines()
    assert len(lines) == 4 and all("does not fit" in line and "HPCRENDER_MAX_MEMORY is 1.0 MiB" in line
                                   for line in lines), refused.stderr
    assert lines[0].startswith(f"hpcrender: error: {manifest}: jobs[harbor]: does not fit: a rank needs at least")
    assert hpcrender("plan", manifest, HPCRENDER_MAX_MEMORY="lots").returncode == 2


def test_render_refuses_a_job_that_does_not_fit_before_loading_anything(tmp_path):
    manifest = write_manifest(tmp_path / "m.toml", BATCH)
    out = tmp_path / "out"
    r = hpcrender("render", manifest, "--out", out, "--only", "harbor", HPCRENDER_MAX_MEMORY="2M")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [line for line in r.stderr.splitlines() if "jobs[harbor]: does not fit" in line]
    assert len(r.stderr.splitlines()) == 1
    assert not (out / "harbor").exists()
    fits = hpcrender("render", manifest, "--out", out, "--only", "harbor", HPCRENDER_MAX_MEMORY="1G")
    assert fits.returncode == 0, fits.stderr


def test_a_killed_rank_ends_the_world_within_60s(tmp_path):
    manifest = write_manifest(tmp_path / "long.toml", """
[defaults]
model = "builtin:tiny-sd"
steps = 1000
[defaults.parallel]
mode = "none"
[[jobs]]
name = "long-a"
prompt = "x"
width = 128
height = 128
[[jobs]]
name = "long-b"
prompt = "y"
width = 128
height = 128
""")
    out = tmp_path / "out"
    proc = subprocess.Popen([str(MPIEXEC), "-n", "2", str(HPCRENDER), "render", str(manifest), "--out", str(out)],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "logs" / "rank-0001.log"
    deadline = time.time() + 120
    pid = None
    while time.time() < deadline and pid is None:
        if log.exists():
            m = re.search(r"pid (\d+)", log.read_text())
            if m and "long-" in log.read_text():
                pid = int(m.group(1))
        time.sleep(0.5)
    assert pid is not None, "rank 1 never started a job"
    os.kill(pid, signal.SIGKILL)
    start = time.time()
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert time.time() - start < 60


LONG = """
[defaults]
model = "{model}"
steps = {steps}
scheduler = "dpmpp"
width = 64
height = 128
[defaults.parallel]
mode = "{mode}"
[[jobs]]
name = "long"
prompt = "a long night"
seed = 5
"""


def stop_mid_image(args: list[str], out: Path, ranks: int | None, after_step: int) -> subprocess.CompletedProcess:
    """Run `hpcrender render ARGS --debug`, send SIGUSR1 to every rank once rank 0 has logged `after_step`."""
    cmd = [str(HPCRENDER), *args, "--out", str(out), "--debug"]
    if ranks is not None:
        cmd = [str(MPIEXEC), "-n", str(ranks), *cmd]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [out / "logs" / f"rank-{r:04d}.log" for r in range(ranks or 1)]
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        text = logs[0].read_text() if logs[0].exists() else ""
        if f"step {after_step}/" in text:
            pids = [int(re.search(r"pid (\d+)", log.read_text()).group(1)) for log in logs]
            for pid in pids:
                os.kill(pid, signal.SIGUSR1)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_a_signal_mid_image_checkpoints_exits_3_and_the_rerun_resumes_bit_for_bit(tmp_path):
    """2 ranks in sync on an SDXL-family model: stopped after step 3, resumed bit for bit; the same checkpoint
    finished by one process (it holds the whole latent), and started over with --no-resume."""
    steps, ranks = 16, 2
    manifest = write_manifest(tmp_path / "long.toml", LONG.format(model="builtin:tiny-sdxl", mode="sync", steps=steps))
    whole = hpcrender("render", manifest, "--out", tmp_path / "whole", ranks=ranks)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "stopped"
    stopped = stop_mid_image(["render", str(manifest)], out, ranks, after_step=3)
    assert stopped.returncode == 3, stopped.stderr
    job = status_of(out)["jobs"]["long"]
    assert job["state"] == "pending" and 3 <= job["checkpoint_step"] < steps, job
    assert (out / "long" / "checkpoint.h5").exists() and not (out / "long" / "image.png").exists()
    assert f"checkpoint after step {job['checkpoint_step']}/{steps}" in hpcrender("status", out).stdout

    fresh = tmp_path / "fresh"  # --no-resume starts from the first step and overwrites the checkpoint's job
    shutil.copytree(out, fresh)
    again = hpcrender("render", manifest, "--out", fresh, "--no-resume")
    assert again.returncode == 0, again.stderr
    assert meta_of(fresh, "long")["timings"]["resumed_after_step"] == 0
    assert not (fresh / "long" / "checkpoint.h5").exists()

    alone = tmp_path / "alone"  # one process finishes what 2 ranks started
    shutil.copytree(out, alone)
    finished = hpcrender("render", manifest, "--out", alone)
    assert finished.returncode == 0, finished.stderr
    assert meta_of(alone, "long")["timings"]["resumed_after_step"] == job["checkpoint_step"]
    a = np.asarray(Image.open(alone / "long" / "image.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "whole" / "long" / "image.png"), dtype=int)
    assert np.abs(a - b).max() <= 1

    resumed = hpcrender("render", manifest, "--out", out, ranks=ranks)
    assert resumed.returncode == 0, resumed.stderr
    meta = meta_of(out, "long")
    assert meta["timings"]["resumed_after_step"] == job["checkpoint_step"]
    assert len(meta["timings"]["step_seconds"]) == steps - job["checkpoint_step"]
    assert (out / "long" / "image.png").read_bytes() == (tmp_path / "whole" / "long" / "image.png").read_bytes()
    assert not (out / "long" / "checkpoint.h5").exists()


def test_a_sigkilled_run_resumes_from_its_latest_periodic_checkpoint_bit_for_bit(tmp_path):
    """checkpoint_every = "2s" on a 90-step sync job over 2 ranks: SIGKILL every rank once a periodic checkpoint is
    on disk; status names the step the next run starts after; the same command resumes from it and says so, and the
    image equals an uninterrupted run's byte for byte."""
    steps, ranks = 90, 2
    manifest = write_manifest(tmp_path / "long.toml", LONG.format(model="builtin:tiny-sdxl", mode="sync", steps=steps)
                              + 'checkpoint_every = "2s"\n')
    whole = hpcrender("render", manifest, "--out", tmp_path / "whole", ranks=ranks)
    assert whole.returncode == 0, whole.stderr
    timings = meta_of(tmp_path / "whole", "long")["timings"]
    assert timings["checkpoints"] >= 1 and not (tmp_path / "whole" / "long" / "checkpoint.h5").exists()

    out = tmp_path / "killed"
    cmd = [str(MPIEXEC), "-n", str(ranks), str(HPCRENDER), "render", str(manifest), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state, logs = out / ".state" / "long.json", [out / "logs" / f"rank-{r:04d}.log" for r in range(ranks)]
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and '"checkpoint_step"' in state.read_text():
            for log in logs:
                os.kill(int(re.search(r"pid (\d+)", log.read_text()).group(1)), signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.communicate(timeout=60)
    assert not (out / "long" / "image.png").exists(), "the run finished before it could be killed"
    job = read_status(out)["jobs"]["long"]
    assert job["state"] == "running" and 0 < job["checkpoint_step"] < steps, job
    assert f"checkpoint after step {job['checkpoint_step']})" in hpcrender("status", out).stdout

    resumed = hpcrender("render", manifest, "--out", out, ranks=ranks)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after step {job['checkpoint_step']}/{steps}" in resumed.stdout + resumed.stderr
    assert meta_of(out, "long")["timings"]["resumed_after_step"] == job["checkpoint_step"]
    assert (out / "long" / "image.png").read_bytes() == (tmp_path / "whole" / "long" / "image.png").read_bytes()
    assert not (out / "long" / "checkpoint.h5").exists()


def test_a_resumed_displaced_render_warms_up_again(tmp_path):
    manifest = write_manifest(tmp_path / "long.toml", LONG.format(model="builtin:tiny-sd", mode="displaced", steps=16)
                              + "[jobs.parallel]\nwarmup_steps = 2\n")
    out = tmp_path / "out"
    assert stop_mid_image(["render", str(manifest)], out, 2, after_step=4).returncode == 3
    step = status_of(out)["jobs"]["long"]["checkpoint_step"]
    resumed = hpcrender("render", manifest, "--out", out, ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    exchange = meta_of(out, "long")["exchange"]
    # The stale activations of the stopped run are gone: 2 warm-up steps again, then displaced ones.
    assert (exchange["sync_steps"], exchange["async_steps"]) == (2, 16 - step - 2)



FAULTS = """
[defaults]
model = "builtin:tiny-sd"
steps = 4
width = 64
height = 128
[defaults.parallel]
mode = "sync"
[[jobs]]
name = "first"
prompt = "one"
[[jobs]]
name = "bad"
prompt = "two"
[[jobs]]
name = "last"
prompt = "three"
"""


def render_with_fault(tmp_path, failing_ranks: str, **env: str) -> tuple[subprocess.CompletedProcess, float, Path]:
    manifest = write_manifest(tmp_path / "faults.toml", FAULTS)
    out = tmp_path / "out"
    script = Path(__file__).parent / "mpi_scripts" / "render_fault.py"
    cmd = [str(MPIEXEC), "-n", "2", str(HPCRENDER.parent / "python"), str(script), "bad", "2", failing_ranks,
           "--", "hpcrender", "render", str(manifest), "--out", str(out)]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(**env))
    return done, time.time() - start, out


def test_a_job_that_fails_on_every_rank_of_its_group_does_not_stop_the_batch(tmp_path):
    done, _, out = render_with_fault(tmp_path, "0,1")
    assert done.returncode == 1, done.stderr
    jobs = status_of(out)["jobs"]
    assert {name: job["state"] for name, job in jobs.items()} == {"first": "done", "bad": "failed", "last": "done"}
    assert jobs["bad"]["error"] == "RuntimeError: injected fault on rank 0"


def test_under_nccl_a_job_that_fails_on_every_rank_after_a_collective_ends_the_run(tmp_path):
    done, _, out = render_with_fault(tmp_path, "0,1", FAULT_AS_NCCL="1")
    assert done.returncode == 1, done.stderr
    assert "communicator may be out of step" in done.stderr, done.stderr
    jobs = {name: job["state"] for name, job in read_status(out)["jobs"].items()}
    # The group did not go on to its next job on a communicator that may be out of step.
    assert jobs == {"first": "done", "bad": "failed", "last": "pending"}, jobs


def test_a_job_that_fails_on_one_rank_of_its_group_ends_the_world_instead_of_hanging(tmp_path):
    done, seconds, out = render_with_fault(tmp_path, "1", FAULT_GRACE_S="4")
    # Rank 0 waits in a collective for rank 1, which ends the world once the others have not failed with it
    # within the grace period (20 s, here 4 s).
    assert done.returncode != 0 and seconds < 120, (done.returncode, seconds)
    assert "injected fault on rank 1" in done.stderr and "on this rank only" in done.stderr, done.stderr
    # The world ended before rank 0 could refresh status.json: what `hpcrender status` reads is current.
    jobs = {name: job["state"] for name, job in read_status(out)["jobs"].items()}
    assert jobs["bad"] == "failed" and "failed" not in {jobs["first"], jobs["last"]}, jobs
    assert jobs["first"] == "done" or jobs["last"] == "done", jobs


def test_a_second_ctrl_c_stops_at_once():
    from hpcrender.run.runner import StopFlag

    flag = StopFlag()
    flag._handle(signal.SIGTERM, None)
    flag._handle(signal.SIGUSR1, None)  # more requests to stop: still the graceful stop
    assert flag.signum == signal.SIGUSR1
    with pytest.raises(KeyboardInterrupt):
        flag._handle(signal.SIGINT, None)
    first = StopFlag()
    first._handle(signal.SIGINT, None)
    assert first.signum == signal.SIGINT


FULL_DISK = """
[defaults]
model = "builtin:tiny-sd"
steps = 2
[defaults.parallel]
mode = "none"
[[jobs]]
name = "small"
prompt = "x"
width = 64
height = 64
[[jobs]]
name = "big"
prompt = "y"
width = 512
height = 512
"""


def test_a_full_disk_ends_with_one_line_naming_the_file_and_keeps_finished_images(tmp_path, small_disk):
    manifest = write_manifest(tmp_path / "disk.toml", FULL_DISK)
    out = small_disk / "out"
    first = hpcrender("render", manifest, "--out", out, "--only", "small")
    assert first.returncode == 0, first.stderr
    image = (out / "small" / "image.png").read_bytes()

    full = hpcrender("render", manifest, "--out", out)
    assert full.returncode == 1, full.stderr  # no crash in HDF5's exit handler
    lines = [line for line in full.stderr.splitlines() if "step/s, ETA" not in line]
    assert "Traceback" not in full.stderr, full.stderr
    assert f"big: FAILED: OSError: [Errno 28] {out / 'big' / 'tiles.h5'}: cannot write the tile store: " \
           "No space left on device" in lines[0], full.stderr
    assert lines[-1].startswith("hpcrender: rank 0 on ") and "No space left on device" in lines[-1], full.stderr
    assert (out / "small" / "image.png").read_bytes() == image
