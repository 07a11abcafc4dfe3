"""`hpcrender bench`: the arithmetic of its table (ratios, hidden exchange, the cores diffusers gets) and, under
mpiexec -n 2, one launch that runs diffusers' loop, hpcrender on one rank and on two, with JSON and a PNG; with a
LoRA, diffusers' loop unfused and fused; with a ControlNet, diffusers' ControlNet pipeline."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from clirun import hpcrender
from hpcrender.config import Mode
from hpcrender.measure.bench import (
    DIFFUSERS, UNFUSED, add_ratios, exchange_hidden, node_threads, parallel_modes, relative_error, scaling_series, steady_waits,
    summarize,
)
from hpcrender.models.lora import file_sha256
from lora_files import make_lora


def test_parallel_modes_leave_none_to_the_one_rank_row_and_default_to_sync_and_displaced():
    assert parallel_modes(None, 1) == []
    assert parallel_modes([Mode.SYNC], 1) == []
    assert parallel_modes(None, 2) == [Mode.SYNC, Mode.DISPLACED]
    assert parallel_modes([Mode.NONE, Mode.NAIVE], 3) == [Mode.NAIVE]


def test_diffusers_gets_the_threads_of_every_rank_on_rank_0_s_node():
    placements = [("a", 2), ("a", 2), ("b", 4), ("a", 1)]
    assert node_threads(placements, "a") == 5
    assert node_threads(placements, "b") == 4
    assert node_threads(placements, "c") == 0


def test_steady_waits_and_the_share_of_the_exchange_hidden_against_sync():
    assert steady_waits([5.0, 1.0, 3.0], 1) == 2.0
    assert steady_waits([5.0], 1) is None
    assert exchange_hidden(0.25, 1.0) == 0.75
    assert exchange_hidden(1.0, 1.0) == 0.0
    assert exchange_hidden(1.5, 1.0) == -0.5  # waited longer than sync: reported, not clipped
    assert exchange_hidden(None, 1.0) is None and exchange_hidden(0.1, None) is None
    assert exchange_hidden(0.1, 0.0) is None


def test_step_statistics_leave_out_the_first_step_and_heuns_short_last_one():
    assert summarize([9.0, 2.0, 4.0, 1.0])["mean_s"] == pytest.approx(7 / 3)
    heun = summarize([9.0, 2.0, 4.0, 1.0], short_last=True)  # Heun's last step is one call of two
    assert (heun["mean_s"], heun["min_s"], heun["steps"], heun["first_s"]) == (3.0, 2.0, 4, 9.0)
    assert summarize([9.0, 1.0], short_last=True)["mean_s"] == 1.0  # too few steps to leave one out


def test_relative_error_is_signed_and_needs_a_plan():
    assert relative_error(110, 100) == pytest.approx(0.1)
    assert relative_error(90, 100) == pytest.approx(-0.1)
    assert relative_error(None, 100) is None and relative_error(5, 0) is None


def test_ratios_against_diffusers_and_one_rank_and_parallel_efficiency():
    rows = [{"run": DIFFUSERS, "ranks": 1, "per_step_s": 6.0}, {"run": "none", "ranks": 1, "per_step_s": 8.0},
            {"run": "displaced", "ranks": 2, "per_step_s": 5.0}]
    add_ratios(rows)
    assert [r["speedup_vs_diffusers"] for r in rows] == [1.0, 0.75, 1.2]
    assert [r["speedup_vs_1_rank"] for r in rows] == [None, 1.0, 1.6]
    assert [r["parallel_efficiency"] for r in rows] == [None, 1.0, 0.8]
    alone = [{"run": "displaced", "ranks": 2, "per_step_s": 5.0}]
    add_ratios(alone)
    assert alone[0]["speedup_vs_diffusers"] is None and alone[0]["parallel_efficiency"] is None


def test_scaling_series_start_every_mode_at_the_one_rank_run():
    rows = [{"run": DIFFUSERS, "ranks": 1, "per_step_s": 6.0},
            {"run": "none", "ranks": 1, "per_step_s": 8.0, "parallel_efficiency": 1.0},
            {"run": "sync", "ranks": 2, "per_step_s": 5.0, "parallel_efficiency": 0.8},
            {"run": "displaced", "ranks": 2, "per_step_s": 4.0, "parallel_efficiency": 1.0}]
    series = scaling_series(rows)
    assert series == {DIFFUSERS: [(1, 6.0, None)], "sync": [(1, 8.0, 1.0), (2, 5.0, 0.8)],
                      "displaced": [(1, 8.0, 1.0), (2, 4.0, 1.0)]}
    assert scaling_series(rows[:2])["none"] == [(1, 8.0, 1.0)]


@pytest.mark.mpi
def test_bench_on_two_ranks_runs_diffusers_one_rank_and_each_mode_with_json_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = hpcrender("bench", "--model", "builtin:tiny-sdxl", "--size", "128x128", "--steps", "2",
                  "--modes", "sync,displaced", "--warmup-steps", "1", "--json", out, "--plot", png, ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout.splitlines()
    assert table[0].split()[:3] == ["run", "ranks", "thr/rank"]
    assert [line.split()[0] for line in table[1:5]] == [DIFFUSERS, "none", "sync", "displaced"]
    rows = json.loads(out.read_text())
    assert [(row["run"], row["ranks"]) for row in rows] == [(DIFFUSERS, 1), ("none", 1), ("sync", 2),
                                                           ("displaced", 2)]
    diffusers, one, sync, displaced = rows
    assert diffusers["threads_per_rank"] == 2 and one["threads_per_rank"] == 1  # the node's two ranks' threads
    for row in rows:
        assert row["per_step_s"] > 0 and row["steps"] == 2 and len(row["per_rank"]) == row["ranks"]
        assert row["speedup_vs_diffusers"] == pytest.approx(diffusers["per_step_s"] / row["per_step_s"])
    for row in (sync, displaced):
        assert row["speedup_vs_1_rank"] == pytest.approx(one["per_step_s"] / row["per_step_s"])
        assert row["parallel_efficiency"] == pytest.approx(row["speedup_vs_1_rank"] / 2)
        plan = row["plan"]
        assert set(plan) >= {"bytes_per_step", "macs_per_step", "loop_memory_bytes", "activation_bytes"}
        # bytes sent in a steady step are what the plan counts, on every rank
        assert row["bytes_per_step"] == plan["bytes_per_step"] and min(row["bytes_per_step"]) > 0
        assert row["bytes_error"] == 0.0
        assert len(plan["macs_per_step"]) == 2 and min(plan["macs_per_step"]) > 0
        assert len(row["peak_memory_bytes"]) == 2 and len(row["loop_memory_bytes"]) == 2
        assert row["wait_s_per_step"] is not None and "exchange_hidden" in row
    assert sync["exchange_hidden"] == 0.0
    assert displaced["exchange_hidden"] == pytest.approx(1 - displaced["wait_s_per_step"] / sync["wait_s_per_step"])
    assert one["plan"]["bytes_per_step"] == [0] and one["bytes_per_step"] == [0]
    # each of two bands computes part of what one rank computes for the whole image
    assert max(sync["plan"]["macs_per_step"]) < one["plan"]["macs_per_step"][0]
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 400


def test_bench_with_a_lora_and_a_controlnet_times_diffusers_unfused_and_fused_beside_hpcrender(tmp_path):
    made = make_lora("builtin:tiny-sd", tmp_path / "lora", 1)
    out = tmp_path / "bench.json"
    r = hpcrender("bench", "--model", "builtin:tiny-sd", "--size", "64x64", "--steps", "2", "--lora", f"{made}:0.7",
                  "--controlnet", "builtin:tiny-sd-controlnet", "--json", out)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["run"] for row in rows] == [UNFUSED, DIFFUSERS, "none"]
    for row in rows:
        assert row["loras"] == [{"file": made.name, "sha256": file_sha256(made), "scale": 0.7}]
        assert row["controlnet"] == "builtin:tiny-sd-controlnet"
        assert row["per_step_s"] > 0
    assert rows[0]["speedup_vs_1_rank"] is None and rows[2]["speedup_vs_1_rank"] == 1.0
    bad = hpcrender("bench", "--model", "builtin:tiny-sd", "--lora", str(tmp_path / "none.safetensors"))
    assert bad.returncode == 2
    assert bad.stderr.strip().endswith(f"--lora {tmp_path / 'none.safetensors'}: no such file: "
                                       f"{tmp_path / 'none.safetensors'}")
