"""Gigapixel jobs on the work queue: every group of the world takes tiles; the bytes are those of one process,
whoever took which tile, across SIGKILLs of the whole run at random moments and a stop (exit 3), and beside
ordinary jobs and other gigapixel jobs of the same manifest."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hpcrender.gigapixel.compose import share_rows
from hpcrender.output.store import LevelStore

from clirun import HPCRENDER, MPIEXEC, clean_env, hpcrender, status_of, write_manifest

pytestmark = pytest.mark.mpi

MANIFEST = """
[defaults]
model = "builtin:tiny-sd"
steps = 2
guidance_scale = 1.0
[defaults.parallel]
mode = "none"
[[jobs]]
name = "coast"
prompt = "a coastline"
width = 256
height = 192
seed = 3
[jobs.gigapixel]
base = 128
tile = 64
overlap = 16
strength = 0.5
[[jobs]]
name = "plain"
prompt = "a harbor"
width = 64
height = 64
[[jobs]]
name = "hills"
prompt = "rolling hills"
width = 192
height = 128
seed = 4
[jobs.gigapixel]
base = 128
tile = 64
overlap = 16
strength = 0.5
"""
JOBS = ("coast", "plain", "hills")
GIGA = ("coast", "hills")


def images(out: Path) -> dict[str, bytes]:
    return {name: (out / name / "image.png").read_bytes() for name in JOBS}


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    root = tmp_path_factory.mktemp("giga-queue")
    manifest = write_manifest(root / "giga.toml", MANIFEST)
    one = hpcrender("render", manifest, "--out", root / "one")
    assert one.returncode == 0, one.stderr
    two = hpcrender("render", manifest, "--out", root / "two", ranks=2)
    assert two.returncode == 0, two.stderr
    return root, manifest


def test_two_groups_share_the_tiles_and_give_the_bytes_of_one_process(renders):
    root, _ = renders
    assert images(root / "two") == images(root / "one")
    status = status_of(root / "two")
    assert {n: j["state"] for n, j in status["jobs"].items()} == dict.fromkeys(JOBS, "done")
    units = [u for g in status["groups"] for u in g["units"]]
    for name in GIGA:
        meta = json.loads((root / "two" / name / "meta.json").read_text())
        tiles = [u for u in units if u.startswith(name + "@")]
        levels = meta["gigapixel"]["levels"]
        assert len(tiles) == len(set(tiles)) == sum(lv["rows"] * lv["cols"] for lv in levels), "each tile once"
        taken = meta["layout"]["groups"]
        assert sum(len(t) for t in taken.values()) == len(tiles)
        assert meta["gigapixel"]["seam_score"] is not None
        # the level images composed by both groups' first ranks, every other row each; the bytes are one process's
        shares = [sum(len(share_rows(lv["rows"], 2, p)) * lv["cols"] for lv in levels) for p in (0, 1)]
        assert meta["layout"]["composed_by"] == {"0": shares[0], "1": shares[1]} and min(shares) > 0
        # each group's first rank, the writer's peak covering its composition and export
        peaks = {p["rank"]: p["peak_memory_bytes"] for p in meta["peak_memory"]}
        assert set(peaks) == {0, 1} and min(peaks.values()) > 100 * 2**20
    assert all(len(g["units"]) > 1 for g in status["groups"]), "both groups took work"


def _launch(manifest: Path, out: Path) -> subprocess.Popen:
    cmd = [str(MPIEXEC), "-n", "2", str(HPCRENDER), "render", str(manifest), "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env(),
                            start_new_session=True)


def _stored(out: Path, name: str) -> int:
    """Patches of job `name` in its store now (read while the writer runs)."""
    path = out / name / "tiles.h5"
    if not path.exists():
        return 0
    try:
        with LevelStore.read(path) as store:
            return sum(int(d.sum()) for d in store._done)
    except Exception:  # the writer is creating the file
        return 0


def _wait_for(out: Path, name: str, patches: int, run: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _stored(out, name) < patches:
        assert run.poll() is None, run.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_killed_and_stopped_runs_resume_to_the_same_bytes(renders):
    """SIGKILL of every process at two random moments, then SIGUSR1 (exit 3), then the same command to the end."""
    root, manifest = renders
    out = root / "interrupted"
    total = _stored(root / "one", "coast")
    rng = random.Random(11)
    for _ in range(2):
        run = _launch(manifest, out)
        _wait_for(out, "coast", _stored(out, "coast") + rng.randint(1, 3), run)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=60)
        with LevelStore.read(out / "coast" / "tiles.h5") as store:  # readable right after the kill
            assert store.params_hash
    stored = _stored(out, "coast")
    assert stored < total - 3, "the kills left work for the stop"
    run = _launch(manifest, out)
    _wait_for(out, "coast", stored + 1, run)
    for rank in range(2):  # as Slurm signals every task: each rank's own pid, from its log (this run's: the last)
        pid = re.findall(r"pid (\d+)", (out / "logs" / f"rank-{rank:04d}.log").read_text())[-1]
        os.kill(int(pid), signal.SIGUSR1)
    assert run.wait(timeout=240) == 3, run.stderr.read()
    states = {n: j["state"] for n, j in status_of(out)["jobs"].items()}
    assert "pending" in states.values() or "running" in states.values(), states
    again = hpcrender("render", manifest, "--out", out, ranks=2)
    assert again.returncode == 0, again.stderr
    assert images(out) == images(root / "one")


def test_status_shows_tiles_per_level_of_a_gigapixel_job(renders):
    root, _ = renders
    shown = hpcrender("status", root / "two")
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if line.startswith("coast"))
    assert "done" in line and "tiles" in line, shown.stdout


DIT = """
[defaults]
model = "builtin:tiny-flux"
steps = 2
guidance_scale = 1.0
[[jobs]]
name = "flux-giga"
prompt = "a coastline"
width = 256
height = 128
seed = 3
[jobs.parallel]
mode = "{mode}"
[jobs.gigapixel]
base = 128
tile = 128
overlap = 32
strength = 0.5
"""


def test_a_diffusion_transformer_renders_gigapixel_tiles_alone_and_band_parallel(tmp_path):
    """Flux (packed latents, shifted flow-matching sampler, 16-channel VAE): one process, and sync tiles on a group
    of two ranks within one level of it."""
    import numpy as np
    from PIL import Image

    alone = write_manifest(tmp_path / "alone.toml", DIT.format(mode="none"))
    banded = write_manifest(tmp_path / "banded.toml", DIT.format(mode="sync"))
    one = hpcrender("render", alone, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = hpcrender("render", banded, "--out", tmp_path / "two", ranks=2)
    assert two.returncode == 0, two.stderr
    a, b = (np.asarray(Image.open(tmp_path / d / "flux-giga" / "image.png"), dtype=np.int16) for d in ("one", "two"))
    assert a.shape == (128, 256, 3) and a.std() > 1
    assert np.abs(a - b).max() <= 1
    meta = json.loads((tmp_path / "two" / "flux-giga" / "meta.json").read_text())
    assert meta["gigapixel"]["tiles"] == 2 and meta["layout"]["mode"] == "sync"
