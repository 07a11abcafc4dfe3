"""Shared fixtures: `slurm`, a private one-node Slurm started once per test session."""

from __future__ import annotations

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
