"""Displaced scaling projected from one rank: the arithmetic, the band that is timed, and `bench --project` run on
a fake process group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcrender.measure.projection import (
    DISTRIFUSION_SPEEDUP, LINKS, format_projection, parse_ranks, project, projection_rows, reference_speedup, widest_band,
)
from hpcrender.parallel.bands import Band

from clirun import hpcrender


def test_rank_counts_are_parsed_and_checked():
    assert parse_ranks("2,4,8") == (2, 4, 8)
    assert parse_ranks("3") == (3,)
    for bad, message in [("1,2", "2 or more"), ("2,two", "comma-separated"), ("4,4", "given twice"), ("", "comma")]:
        with pytest.raises(ValueError, match=message):
            parse_ranks(bad)


def test_the_widest_band_is_timed_the_first_of_equals():
    assert widest_band((Band(0, 4), Band(4, 8))) == 0
    assert widest_band((Band(0, 3), Band(3, 7), Band(7, 11))) == 1
    assert widest_band((Band(0, 2), Band(2, 4), Band(4, 7))) == 2


def test_displaced_hides_the_exchange_behind_compute_and_sync_adds_it():
    links = (("fast", 1e9), ("slow", 1e8))
    fast, slow = project(one_rank_s=8.0, ranks=4, compute_s=2.0, bytes_per_step=5e8, links=links)
    # 0.5 s of exchange hides behind 2 s of compute: the ideal 4x
    assert fast["exchange_s"] == pytest.approx(0.5)
    assert fast["displaced_s"] == pytest.approx(2.0) and fast["displaced_speedup"] == pytest.approx(4.0)
    assert fast["displaced_efficiency"] == pytest.approx(1.0)
    assert fast["sync_s"] == pytest.approx(2.5) and fast["sync_speedup"] == pytest.approx(3.2)
    # 5 s of exchange does not: the link sets the step
    assert slow["exchange_s"] == pytest.approx(5.0) and slow["displaced_s"] == pytest.approx(5.0)
    assert slow["displaced_speedup"] == pytest.approx(1.6) and slow["sync_speedup"] == pytest.approx(8 / 7)
    assert [row["link"] for row in project(8.0, 2, 4.0, 0)] == [name for name, _ in LINKS]
    with pytest.raises(ValueError, match="positive"):
        project(8.0, 2, 0.0, 1)


def test_distrifusion_reference_only_for_its_square_sizes():
    assert reference_speedup(3840, 3840, 8) == 6.1 and reference_speedup(2048, 2048, 2) == 1.8
    assert reference_speedup(3840, 2160, 8) is None and reference_speedup(3840, 3840, 3) is None
    assert set(DISTRIFUSION_SPEEDUP) == {1024, 2048, 3840}


def test_the_table_says_it_is_a_projection():
    measured = [{"ranks": 2, "rank": 0, "band_rows": 240, "compute_s": 1.5, "bytes_per_step": 2**20}]
    rows = projection_rows(3.0, 3840, 3840, measured)
    assert rows[0]["distrifusion_speedup"] == 1.8 and rows[0]["links"][0]["displaced_speedup"] == pytest.approx(2.0)
    text = format_projection(rows, "3840x3840", "builtin:sdxl")
    assert text.startswith("PROJECTION for builtin:sdxl at 3840x3840 (not measured on K devices)")
    assert len(text.splitlines()) == 2 + len(LINKS) + 1 and "1.8x" in text


def test_bench_projects_scaling_from_one_rank_on_a_fake_process_group(tmp_path):
    out = tmp_path / "bench.json"
    r = hpcrender("bench", "--model", "builtin:tiny-sdxl", "--size", "128x128", "--steps", "4", "--warmup-steps", "1",
                  "--project", "2,3", "--json", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PROJECTION for builtin:tiny-sdxl at 128x128 (not measured on K devices)" in r.stdout
    rows = json.loads(out.read_text())
    one = next(row for row in rows if row["run"] == "none")
    projected = [row for row in rows if row["run"] == "projection"]
    assert [row["ranks"] for row in projected] == [2, 3]
    for row in projected:
        # the band's steady displaced steps, timed alone
        assert len(row["compute_steps_s"]) == 2 and row["compute_s"] > 0 and row["one_rank_s"] == one["per_step_s"]
        # what the band's layers posted in a steady step is what the plan counts for that rank
        assert row["bytes_per_step"] == row["planned_bytes_per_step"] > 0
        for link in row["links"]:
            assert link["exchange_s"] == pytest.approx(row["bytes_per_step"] / link["bandwidth_bytes_s"])
    # 16 latent rows: 8 + 8 on two ranks; 6 + 5 + 5 or as the plan aligns them on three, the widest timed
    assert projected[0]["band_rows"] == 8 and projected[1]["band_rows"] >= 16 / 3


@pytest.mark.mpi
def test_bench_projection_refuses_too_few_steps_and_a_launch_of_several_ranks():
    few = hpcrender("bench", "--model", "builtin:tiny-sdxl", "--size", "128x128", "--steps", "2", "--project", "2")
    assert few.returncode == 2 and "--project: 2 steps leave fewer than two displaced steps" in few.stderr
    bad = hpcrender("bench", "--project", "1")
    assert bad.returncode == 2 and "--project: a projection is for 2 or more ranks" in bad.stderr
    # a layout the image cannot be cut into: refused before anything is timed
    small = hpcrender("bench", "--model", "builtin:tiny-sdxl", "--size", "128x128", "--steps", "4", "--project", "2,8")
    assert small.returncode == 2 and "fewer than its 8 ranks" in small.stderr and "diffusers" not in small.stdout
    several = hpcrender("bench", "--model", "builtin:tiny-sdxl", "--size", "128x128", "--steps", "4",
                        "--project", "2", ranks=2)
    assert several.returncode == 2, several.stderr[-2000:]
    assert "--project runs in a launch of one rank (it renders each band alone), got 2" in several.stderr


def test_the_device_script_runs_through_on_this_machine_with_the_tiny_model(tmp_path):
    """benchmarks/device.sh is run where device time is short and a broken script wastes it: its smoke mode runs
    every step here."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DEVICE_SMOKE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(root / "benchmarks" / "device.sh"), str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench-128.json", "bench-128.txt", "bench-256-project.json", "bench-256-project.txt", "machine.txt"]
    assert "torch" in (tmp_path / "machine.txt").read_text()
    rows = json.loads((tmp_path / "bench-256-project.json").read_text())
    assert [row["run"] for row in rows] == ["diffusers", "none", "projection", "projection", "projection"]
    assert [row["ranks"] for row in rows[2:]] == [2, 4, 8]
