"""Shared fixtures: `slurm`, a private one-node Slurm started once per test session."""

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
