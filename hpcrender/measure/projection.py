"""Scaling of displaced patch parallelism to K devices, projected from one (`hpcrender bench --project K,...`).

A machine with one GPU cannot run K bands at once. What it can measure is the compute of one band: the band is
rendered alone, in displaced mode, on a fake process group of K ranks (torch's FakeProcessGroup: every collective
completes at once and moves no data), so a steady step's time is the band's compute with nothing waited for.
The exchange is then what the plan says a rank sends per step, at a link's bandwidth. The projection is labelled
as one wherever it is shown: no K-device run stands behind it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from hpcrender.config import Job, Mode
from hpcrender.errors import HpcrenderError
from hpcrender.parallel.layout import Comms, GroupLayout
from hpcrender.render.image import render_image

# Per-direction bandwidth of the links a projection is made for, bytes per second.
LINKS = (("NVLink (A100, 300 GB/s)", 300e9), ("InfiniBand 200 Gb/s", 25e9))

# DistriFusion's measured speedups (SDXL, 50 DDIM steps, A100s with NVLink, no CFG split) by image side and GPUs.
DISTRIFUSION_SPEEDUP = {1024: {2: 1.5, 4: 2.2, 8: 2.8}, 2048: {2: 1.8, 4: 3.1, 8: 4.9},
                        3840: {2: 1.8, 4: 3.4, 8: 6.1}}


def parse_ranks(text: str) -> tuple[int, ...]:
    """'2,4,8' -> (2, 4, 8): distinct group sizes of at least 2, in the order given."""
    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated rank counts such as 2,4,8, got {text!r}") from None
    if any(k < 2 for k in ranks):
        raise ValueError(f"a projection is for 2 or more ranks, got {text!r}")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"rank count given twice in {text!r}")
    return ranks


def steps_problem(steps: int, warmup_steps: int) -> str | None:
    """Why `steps` cannot be projected (fewer than two displaced steps after the warm-up: the first one also lays
    out the buckets, so no steady step would be left), or None."""
    first_stale = max(warmup_steps, 1)
    if steps < first_stale + 2:
        return (f"{steps} steps leave fewer than two displaced steps after {first_stale} warm-up step(s); give "
                f"--steps {first_stale + 2} or more")
    return None


def widest_band(bands: Sequence) -> int:
    """The rank whose band has the most rows (the first of them): the one the group waits for."""
    return max(range(len(bands)), key=lambda r: (bands[r].size, -r))


def project(one_rank_s: float, ranks: int, compute_s: float, bytes_per_step: int,
            links: Sequence[tuple[str, float]] = LINKS) -> list[dict]:
    """Per link: the exchange time of a step and the step's time and speedup over one rank, displaced and sync.

    Displaced hides the exchange behind the step's compute (the previous step's activations are used), so a step
    takes the longer of the two; sync waits for it, so a step takes their sum. Both ignore what a real group adds
    (kernel launch jitter, stragglers): upper bounds on the speedup.
    """
    if one_rank_s <= 0 or compute_s <= 0:
        raise ValueError(f"times must be positive, got one rank {one_rank_s} s and a band {compute_s} s")
    rows = []
    for name, bandwidth in links:
        exchange_s = bytes_per_step / bandwidth
        displaced_s = max(compute_s, exchange_s)
        sync_s = compute_s + exchange_s
        rows.append({"link": name, "bandwidth_bytes_s": bandwidth, "exchange_s": exchange_s,
                     "displaced_s": displaced_s, "displaced_speedup": one_rank_s / displaced_s,
                     "displaced_efficiency": one_rank_s / displaced_s / ranks,
                     "sync_s": sync_s, "sync_speedup": one_rank_s / sync_s})
    return rows


def reference_speedup(width: int, height: int, ranks: int) -> float | None:
    """DistriFusion's measured speedup for this square size and GPU count, when it published one."""
    return DISTRIFUSION_SPEEDUP.get(width, {}).get(ranks) if width == height else None


def measure_band(pipe, job: Job, ranks: int, device: str, bands: Sequence, planned_bytes: Sequence[int]) -> dict:
    """The widest band of `job` on `ranks` ranks rendered alone in displaced mode: the mean time of its steady
    steps (the displaced steps after the first).

    The world's process group is replaced by a fake one of `ranks` ranks for the render and destroyed after it;
    call only from a launch of one rank. The other bands' token counts are taken as this band's (the fake
    all-gather returns a rank's own data), so attention over the gathered keys is, if anything, overestimated.
    """
    import torch
    import torch.distributed as dist

    if job.parallel.mode is not Mode.DISPLACED:
        raise ValueError(f"a projection renders the displaced mode, got {job.parallel.mode.value}")
    problem = steps_problem(job.steps, job.parallel.warmup_steps)
    if problem:
        raise ValueError(problem)
    first_stale = max(job.parallel.warmup_steps, 1)
    try:
        # Importing the module registers torch's "fake" backend (FakeProcessGroup).
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:
        raise HpcrenderError(f"--project needs torch's fake process group, which torch {torch.__version__} does "
                             f"not have ({e})") from None
    rank = widest_band(bands)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=ranks)
    try:
        group = dist.new_group(list(range(ranks)))
        comms = Comms(group=group, patch_group=group, global_ranks=tuple(range(ranks)))
        layout = GroupLayout(size=ranks, rank=rank, mode=Mode.DISPLACED)
        result = render_image(pipe, job, layout, comms, device, decode=False, bands=tuple(bands))
    finally:
        dist.destroy_process_group()
    steady = result.step_seconds[first_stale + 1:]  # the first displaced step also lays out the buckets
    sent = (result.exchange or {}).get("bytes_sent") or [0]
    return {"ranks": ranks, "rank": rank, "band_rows": bands[rank].size, "compute_s": statistics.fmean(steady),
            "compute_steps_s": steady, "bytes_per_step": int(sent[-1]), "planned_bytes_per_step": planned_bytes[rank]}


def projection_rows(one_rank_s: float, width: int, height: int, measured: Sequence[dict],
                    links: Sequence[tuple[str, float]] = LINKS) -> list[dict]:
    """measure_band's results with each link's projection and DistriFusion's measured speedup beside them."""
    rows = []
    for band in measured:
        rows.append({**band, "one_rank_s": one_rank_s,
                     "links": project(one_rank_s, band["ranks"], band["compute_s"], band["bytes_per_step"], links),
                     "distrifusion_speedup": reference_speedup(width, height, band["ranks"])})
    return rows


def format_projection(rows: list[dict], size: str, model: str) -> str:
    """The projection's table, labelled as a projection."""
    head = (f"{'ranks':>5} {'band rows':>9} {'band s/step':>11} {'MiB sent/step':>13}  {'link':<24} "
            f"{'exchange s':>10} {'displaced s':>11} {'speedup':>7} {'eff.':>5} {'sync speedup':>12} "
            f"{'DistriFusion':>12}")
    lines = [f"PROJECTION for {model} at {size} (not measured on K devices): the widest band computed alone on a "
             "fake process group, the exchange at each link's bandwidth", head]
    for row in rows:
        for i, link in enumerate(row["links"]):
            reference = row["distrifusion_speedup"]
            lead = (f"{row['ranks']:>5} {row['band_rows']:>9} {row['compute_s']:>11.4f} "
                    f"{row['bytes_per_step'] / 2**20:>13.2f}") if i == 0 else " " * 41
            lines.append(f"{lead}  {link['link']:<24} {link['exchange_s']:>10.4f} {link['displaced_s']:>11.4f} "
                         f"{link['displaced_speedup']:>7.2f} {link['displaced_efficiency']:>5.2f} "
                         f"{link['sync_speedup']:>12.2f} "
                         f"{(f'{reference:.1f}x' if reference and i == 0 else '-'):>12}")
    lines.append("speedup: over hpcrender on one rank of this launch; displaced: max(compute, exchange), sync: their "
                 "sum; DistriFusion: its measured SDXL speedup on A100s at this size")
    return "\n".join(lines)
