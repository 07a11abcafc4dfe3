"""Time of the bookkeeping at many jobs: `hpcrender validate`, `plan` and `status` on a generated manifest of small
jobs (builtin:tiny-sd, 64x64 and a few other sizes, one step), in a temporary folder.

    .venv/bin/python benchmarks/bookkeeping.py --jobs 5000 --jobs 100000 [--ranks 1] [--before DIR]

Each command runs as `python -m hpcrender ...` in a process of its own (imports included), its output thrown
away; --before DIR runs each one also with PYTHONPATH=DIR (an export of older code) for a before/after table.
The status folder holds a state file per job (all done) and the status.json a render leaves (its last merge begun
after the jobs' last writes), written here directly: a render's own writes fsync each file, which would take longer
than everything timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# Sides (width, height) the generated jobs cycle through: mostly 64x64, a few others, so that the plan sees more
# than one shape.
SIZES = ((64, 64),) * 7 + ((64, 128), (128, 64), (128, 128))


def manifest_text(count: int, sizes=SIZES, model: str = "builtin:tiny-sd") -> str:
    """A manifest of `count` one-step jobs named j000001... cycling through `sizes`."""
    lines = ["[defaults]", f'model = "{model}"', "width = 64", "height = 64", "steps = 1", ""]
    for n in range(1, count + 1):
        width, height = sizes[(n - 1) % len(sizes)]
        lines += ["[[jobs]]", f'name = "j{n:06d}"', f'prompt = "a small test image number {n}"', f"seed = {n}"]
        if (width, height) != (64, 64):
            lines += [f"width = {width}", f"height = {height}"]
        lines.append("")
    return "\n".join(lines)


def write_manifest(path: Path, count: int, sizes=SIZES) -> Path:
    path.write_text(manifest_text(count, sizes), encoding="utf-8")
    return path


def write_done_out(out: Path, count: int) -> Path:
    """OUT as a finished render of the manifest's `count` jobs leaves it: a state file each and status.json."""
    state = out / ".state"
    state.mkdir(parents=True, exist_ok=True)
    jobs = {}
    for n in range(1, count + 1):
        name = f"j{n:06d}"
        record = {"name": name, "state": "done", "error": None, "attempt": 1, "started": "2026-12-03T10:00:00.000Z",
                  "rank": n % 2, "node": "node1", "finished": "2026-12-03T10:00:01.250Z", "seconds": 1.25,
                  "updated": "2026-12-03T10:00:01.250Z"}
        (state / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        jobs[name] = {k: v for k, v in record.items() if k != "name"}
    time.sleep(6)  # a render's last merge begins after its jobs' last writes (records.RESCAN_MARGIN_S: 5 s)
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    status = {"updated": now, "counts": {"pending": 0, "running": 0, "done": count,
                                                                   "failed": 0, "total": count},
              "jobs": jobs, "groups": []}
    (out / "status.json").write_text(json.dumps(status, indent=2) + "\n", encoding="utf-8")
    return out


def timed(args: list[str], pythonpath: str | None) -> float:
    """Seconds of `python -m hpcrender ARGS` (exit status 0 required)."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hpcrender", *args], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"hpcrender {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, action="append", help="Jobs in the manifest (repeatable).")
    parser.add_argument("--ranks", type=int, default=1, help="World size that plan plans for.")
    parser.add_argument("--before", metavar="DIR", help="Also time the code under DIR (PYTHONPATH=DIR).")
    parser.add_argument("--only", action="append", choices=("validate", "plan", "status"),
                        help="Commands to time (repeatable; default all).")
    args = parser.parse_args()
    codes = [("after", str(Path(__file__).resolve().parents[1]))]
    if args.before:
        codes.insert(0, ("before", str(Path(args.before).resolve())))
    wanted = args.only or ["validate", "plan", "status"]
    with tempfile.TemporaryDirectory(prefix="bookkeeping-") as tmp:
        for count in args.jobs or [5000]:
            manifest = write_manifest(Path(tmp) / f"jobs-{count}.toml", count)
            out = write_done_out(Path(tmp) / f"out-{count}", count) if "status" in wanted else None
            commands = {"validate": ["validate", str(manifest)],
                        "plan": ["plan", str(manifest), "--ranks", str(args.ranks)],
                        "status": ["status", str(out)]}
            for what in wanted:
                for label, code in codes:
                    seconds = timed(commands[what], code)
                    print(f"{count:>7} jobs  {what:<8} {label:<6} {seconds:7.2f} s", flush=True)


if __name__ == "__main__":
    main()
