"""`hpcrender render` with a fault injected into one job's denoising loop on some ranks only.

usage: render_fault.py JOB STEP RANKS(comma-separated global ranks) -- hpcrender render ARGS...
The listed ranks raise RuntimeError after STEP steps of JOB; every other rank renders normally.
With FAULT_AS_NCCL=1 the runner decides what a failure ends as it would on GPUs under NCCL; FAULT_GRACE_S shortens
how long failing ranks wait for the rest of their group to fail with them (20 s in production).
"""

from __future__ import annotations

import os
import sys

from mpi4py import MPI

import hpcrender.run.image
from hpcrender.cli import cli

job_name, fail_step, ranks = sys.argv[1], int(sys.argv[2]), {int(r) for r in sys.argv[3].split(",")}
args = sys.argv[sys.argv.index("--") + 2:]
original = hpcrender.run.image.render_image


def render_image(pipe, job, *a, on_step=None, **kw):
    def faulty(done, total):
        if on_step is not None:
            on_step(done, total)
        if job.name == job_name and done == fail_step and MPI.COMM_WORLD.rank in ranks:
            raise RuntimeError(f"injected fault on rank {MPI.COMM_WORLD.rank}")

    return original(pipe, job, *a, on_step=faulty, **kw)


hpcrender.run.image.render_image = render_image
if os.environ.get("FAULT_AS_NCCL") == "1":
    decide = hpcrender.run.image.failure_ends_world
    hpcrender.run.image.failure_ends_world = lambda device, issued: decide("cuda:0", issued)
if os.environ.get("FAULT_GRACE_S"):
    hpcrender.run.image.FAIL_TOGETHER_S = float(os.environ["FAULT_GRACE_S"])
cli.main(args=args, prog_name="hpcrender")
