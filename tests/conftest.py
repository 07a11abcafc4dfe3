"""Shared fixtures: `slurm`, a private one-node Slurm started once per test session (per pytest-xdist worker), and
`small_disk`; the order test files are handed to pytest-xdist workers in."""

from __future__ import annotations

import subprocess

import pytest

from slurm_fixture import LocalSlurm, SlurmUnavailable, start_local_slurm, stop_local_slurm


@pytest.fixture(scope="session")
def slurm() -> LocalSlurm:
    """A running local Slurm (skips the test only when Slurm is absent and cannot be installed)."""
    try:
        cluster = start_local_slurm()
    except SlurmUnavailable as reason:
        pytest.skip(f"no local Slurm: {reason}")
    try:
        yield cluster
    finally:
        stop_local_slurm(cluster)


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB file system (a tmpfs; needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


# The longest files first, so that no worker is left alone with one at the end.
LONGEST_FIRST = ("test_verify", "test_render", "test_slurm", "test_gigapixel_queue", "test_gigapixel_render",
                 "test_img2img", "test_controlnet", "test_sweeps", "test_lora", "test_queue", "test_fidelity",
                 "test_parallel", "test_dit", "test_checkpoint")


def pytest_collection_modifyitems(config, items):
    """`make test` runs `pytest -n 2 --dist loadfile`: each test file whole on one worker, so that its module fixtures
    (the reference renders several tests compare against) run once, and the local Slurm starts once (every test that
    needs it is in test_slurm.py). The longest files are handed out first."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: the files' own order otherwise
