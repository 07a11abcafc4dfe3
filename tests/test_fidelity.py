"""Displaced steps against one process, on 2 and 3 MPI ranks: what a stale activation is replaced by, what the first
stale step holds, and on a UNet deep enough for staleness to compound, the order of the modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcrender.parallel.groupnorm import corrected_moments, mean_var, stale_moments

SCRIPTS = Path(__file__).parent / "mpi_scripts"
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def _moments(count: float, mean: float, second: float) -> torch.Tensor:
    return torch.tensor([[[count, count * mean, count * second]]], dtype=torch.float64)


def test_corrected_groupnorm_moves_the_whole_image_means_by_this_bands_change():
    # Two bands of 4 and 12 values; this band (4 values) moved its mean by +1 and its E[x^2] by +3 since the last
    # step. Corrected: the whole image's mean and E[x^2] move by the same (the other band assumed to drift alike).
    stale_local = _moments(4, 1.0, 2.0)
    other = _moments(12, 5.0, 30.0)
    fresh_local = _moments(4, 2.0, 5.0)
    stale_full = stale_local + other
    mean, var = mean_var(corrected_moments(stale_full, stale_local, fresh_local))
    old_mean = (4 * 1.0 + 12 * 5.0) / 16
    old_second = (4 * 2.0 + 12 * 30.0) / 16
    assert mean.item() == pytest.approx(old_mean + 1.0)
    assert var.item() == pytest.approx(old_second + 3.0 - (old_mean + 1.0) ** 2)
    # Stale: the other band's last statistics pooled with this band's fresh ones.
    mean, var = mean_var(stale_moments(stale_full, stale_local, fresh_local))
    assert mean.item() == pytest.approx((4 * 2.0 + 12 * 5.0) / 16)
    assert var.item() == pytest.approx((4 * 5.0 + 12 * 30.0) / 16 - ((4 * 2.0 + 12 * 5.0) / 16) ** 2)


def test_both_groupnorm_estimates_are_exact_when_nothing_moved():
    stale_local, other = _moments(4, 1.0, 2.0), _moments(12, 5.0, 30.0)
    full = stale_local + other
    for pool in (corrected_moments, stale_moments):
        assert torch.allclose(pool(full, stale_local, stale_local), full, rtol=1e-15, atol=0)


def _run(n: int, *args: str) -> dict:
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS)}
    result = subprocess.run([str(MPIEXEC), "-n", str(n), sys.executable, str(SCRIPTS / "fidelity_checks.py"), *args],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout[-3000:]
    report = json.loads(lines[0])
    assert report["world_size"] == n
    return report


_REPORTS: dict[int, dict] = {}


def _report(n: int) -> dict:
    """One launch per world size; the deep UNet's modes once, on 2 ranks."""
    if n not in _REPORTS:
        _REPORTS[n] = _run(n, *(["--deep"] if n == 2 else []))
    return _REPORTS[n]


@pytest.fixture(params=[2, 3], ids=["2ranks", "3ranks"])
def checks(request):
    return _report(request.param)


@pytest.mark.mpi
@pytest.mark.parametrize("layer", ["conv", "downsample"])
def test_fresh_halo_rows_give_the_whole_convolution_in_displaced_steps(checks, layer):
    layers = checks["layers"]
    assert layers[f"{layer}_fresh_async_steps"] == layers[f"{layer}_stale_async_steps"] == 1
    assert layers[f"{layer}_fresh"] <= 1e-6
    assert layers[f"{layer}_stale"] > 1e-2  # the same step with the previous step's halo rows


@pytest.mark.mpi
def test_the_input_convolution_reads_a_fresh_halo_in_displaced_steps(checks):
    assert checks["layers"]["conv_in_fresh"] <= 1e-6
    assert checks["layers"]["conv_in_stale"] <= 1e-6


@pytest.mark.mpi
@pytest.mark.parametrize("halo", ["fresh", "stale"])
def test_a_displaced_step_whose_stale_activations_are_fresh_equals_sync(checks, halo):
    repeat = checks["repeat"][halo]
    assert repeat["async_steps"] == 1
    assert repeat["error"] <= 1e-6


@pytest.mark.mpi
def test_modes_order_by_distance_from_one_process_on_a_deep_unet():
    deep = _report(2)["deep"]
    print("deep UNet, 2 ranks, final latent relative L2:", deep)
    assert deep["sync"] <= 1e-5
    assert deep["sync"] * 1000 < deep["displaced_corrected"]
    # corrected GroupNorm measurably closer than stale statistics, both far closer than no exchange
    assert deep["displaced_corrected"] * 1.5 < deep["displaced_stale"]
    assert deep["displaced_stale"] * 2 < deep["naive"]
    # fresh halo rows (the default) measurably closer than the previous step's
    assert deep["displaced_corrected"] * 1.3 < deep["displaced_stale_halo"]
