"""`hpcrender render` where one job is far slower than its estimate and another fails.

usage: render_slow.py SLOW FAIL -- hpcrender render ARGS...
Job SLOW, on whichever group takes it, waits after its first step until every other job's state file says done or
failed (at most 120 s): its group is busy for as long as the others need. Job FAIL raises on every rank of its group
after its first step. Everything else renders normally.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hpcrender.run.image
from hpcrender.cli import cli

slow, fail = sys.argv[1], sys.argv[2]
args = sys.argv[sys.argv.index("--") + 2:]
out = Path(args[args.index("--out") + 1])
manifest_jobs = None
original = hpcrender.run.image.render_image


def others_finished() -> bool:
    from hpcrender.manifest import load_manifest

    global manifest_jobs
    if manifest_jobs is None:
        manifest_jobs = [j.name for j in load_manifest(args[1]).jobs if j.name != slow]
    for name in manifest_jobs:
        path = out / ".state" / f"{name}.json"
        try:
            if json.loads(path.read_text())["state"] not in ("done", "failed"):
                return False
        except (OSError, ValueError, KeyError):
            return False
    return True


def render_image(pipe, job, *a, on_step=None, **kw):
    def hooked(done, total):
        if on_step is not None:
            on_step(done, total)
        if job.name == slow and done == 1:
            deadline = time.monotonic() + 120
            while not others_finished() and time.monotonic() < deadline:
                time.sleep(0.1)
        if job.name == fail and done == 1:
            raise RuntimeError("injected fault")

    return original(pipe, job, *a, on_step=hooked, **kw)


hpcrender.run.image.render_image = render_image
cli.main(args=args, prog_name="hpcrender")
