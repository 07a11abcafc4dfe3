"""Shared fixtures: `slurm`, a private one-node Slurm started once per test session (per pytest-xdist worker), and
`small_disk`; the grouping of tests over pytest-xdist workers."""

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


# The longest groups first, so that no worker is left with one at the end.
LONGEST_FIRST = ("test_render", "test_verify", "slurm", "test_gigapixel_queue", "test_gigapixel_render", "test_queue",
                 "test_fidelity", "test_parallel", "test_img2img", "test_dit")


def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup` (make test): every test file whole on one worker, so that its module
    fixtures (the reference renders several tests compare against) run once; every test that needs the local Slurm
    on one worker, which starts it once. The longest groups are handed out first."""
    def group_of(item) -> str:
        return "slurm" if "slurm" in getattr(item, "fixturenames", ()) else item.module.__name__

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group_of(item), len(rank)))  # stable: the files' own order otherwise
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group_of(item)))
