"""Job records: per-job state files, OUT/status.json and OUT/JOB/meta.json, all written atomically.

Each job's state file is written only by the rank that renders the job, so no locks are needed and
it works on shared file systems; status.json is a merge of the state files that anyone may rebuild.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
import os
import math
import shlex
import stat
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hpcrender
from hpcrender.errors import BadInput
from hpcrender.output import files
from hpcrender.output.shards import done_shards
from hpcrender.output.store import WRITER_GONE, WRITER_LIVE, writer_state

STATE_DIR = ".state"
GROUPS_DIR = "groups"
STATUS_FILE = "status.json"
META_FILE = "meta.json"
STORES = "tiles.h5*"  # a job's store (run/kinds.store_path, gigapixel/job.STORE_NAME) and the ones set aside


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON, written atomically (files.write_json_atomic); dataclasses, enums and paths as plain values."""
    files.write_json_atomic(path, obj, default=_jsonable)


def state_path(out_dir: str | os.PathLike, name: str) -> Path:
    """OUT/.state/NAME.json"""
    if not name or name in (".", "..") or any(ch in name for ch in "/\\\0"):
        raise ValueError(f"job name {name!r} cannot name a state file")
    return Path(out_dir) / STATE_DIR / f"{name}.json"


def record_job_state(
    out_dir: str | os.PathLike, name: str, state: JobState, *, error: str | None = None, **timings: Any
) -> None:
    """Update OUT/.state/NAME.json: state, error, timestamps, seconds, attempt count.

    RUNNING starts an attempt (started, attempt + 1); DONE and FAILED stamp `finished` and the
    `seconds` since `started`. Extra keywords (rank, node, step timings, ...) are stored as given
    and override the computed ones; `started`/`finished` may be given as Unix times and are
    stored, like the computed ones, as UTC ISO 8601.
    """
    state = JobState(state)
    path = state_path(out_dir, name)
    record = _read_json(path) or {}
    now = _now()
    for key in ("started", "finished"):
        if isinstance(timings.get(key), (int, float)) and not isinstance(timings[key], bool):
            timings[key] = _iso(float(timings[key]))
    record["name"] = name
    record["state"] = state.value
    record["error"] = error
    if state is JobState.RUNNING:
        record["attempt"] = int(record.get("attempt", 0)) + 1
        record["started"] = _iso(now)
        for key in ("finished", "seconds", "checkpoint_step", "step", "steps", "tiles_per_s", "eta_s"):  # earlier
            record.pop(key, None)
    elif state in (JobState.DONE, JobState.FAILED):
        record["finished"] = _iso(now)
        started = _parse_iso(record.get("started"))
        if started is not None:
            record["seconds"] = round(now - started, 3)
    if state in (JobState.DONE, JobState.PENDING):  # a failed job keeps the step it failed at
        record.pop("step", None)
        record.pop("tiles_per_s", None)  # a rate and ETA are of a running job only
        record.pop("eta_s", None)
    record["updated"] = _iso(now)
    record.update(timings)
    write_json_atomic(path, record)


def record_progress(out_dir: str | os.PathLike, name: str, step: int, steps: int, **extra: Any) -> None:
    """Steps (or tiles) done by a running job, in its state file (state, attempt and times unchanged); `extra`
    (a gigapixel job's tiles per level, rate and ETA) is stored as given."""
    path = state_path(out_dir, name)
    record = _read_json(path) or {"name": name, "state": JobState.RUNNING.value, "error": None}
    record.update(step=int(step), steps=int(steps), updated=_iso(_now()), **extra)
    write_json_atomic(path, record)


def merge_status(out_dir: str | os.PathLike, job_names: Sequence[str]) -> dict:
    """Build OUT/status.json from the state files, write it atomically and return it.

    Jobs in `job_names` come first, in that order (no state file: pending); jobs that only have a
    state file (from another manifest selection) follow, by name, so nothing recorded is hidden.
    """
    status = _merge(Path(out_dir), job_names)
    write_json_atomic(Path(out_dir) / STATUS_FILE, status)
    return status


# A state file modified less than this before a scan began is read again by the next scan whatever its stat says:
# file times are coarse (a few ms locally, a second or two on some shared file systems) and another node's clock may
# be a little off.
RESCAN_MARGIN_S = 5.0


class StatusMerger:
    """merge_status for rank 0 of a render, in O(jobs) for the whole run rather than per unit: the records are kept
    in memory and a state file is read again only when its stat changed (or it changed just before the last scan);
    status.json is rewritten by `update` only when `min_interval` seconds have passed and at most `share` of the
    time goes to it, and by `flush` (a full rebuild: the final status.json is exact)."""

    def __init__(self, out_dir: str | os.PathLike, job_names: Sequence[str], *, min_interval: float = 5.0,
                 share: float = 0.05, clock=time.monotonic):
        self._out = Path(out_dir)
        self._names = list(job_names)
        self._min_interval, self._share, self._clock = min_interval, share, clock
        self._files: dict[str, tuple] = {}  # stem -> (stat fingerprint, status entry or None)
        self._scanned: float | None = None  # wall time the last scan began
        self._due = -math.inf              # clock time from which update writes again

    def refresh(self) -> dict:
        """The status as merge_status would build it now (not written)."""
        started = _now()
        since = None if self._scanned is None else self._scanned - RESCAN_MARGIN_S
        self._files = _scan_states(self._out / STATE_DIR, self._files, since)
        self._scanned = started
        return _assemble(self._out, self._names, {stem: entry for stem, (_, entry) in self._files.items()},
                         started)

    def update(self) -> dict | None:
        """Rewrite status.json if it is due; the status written, or None."""
        if self._clock() < self._due:
            return None
        began = self._clock()
        status = self.refresh()
        write_json_atomic(self._out / STATUS_FILE, status)
        spent = self._clock() - began
        self._due = self._clock() + max(self._min_interval, spent / self._share)
        return status

    def flush(self) -> dict:
        """Read every state file again and write status.json now: what merge_status would."""
        self._files, self._scanned = {}, None
        status = self.refresh()
        write_json_atomic(self._out / STATUS_FILE, status)
        self._due = self._clock() + self._min_interval
        return status


def read_status(out_dir: str | os.PathLike) -> dict:
    """The status of OUT for `hpcrender status`: status.json's jobs refreshed from the state files.

    Reads only; status.json is left as the last render wrote it. A job whose store is marked open for writing
    gets `open_stores` ([{path, writer}], store.writer_state): HDF5's plain readers refuse such a store.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise BadInput(f"{out}: no such output directory")
    previous = _read_json(out / STATUS_FILE) or {}
    jobs = previous.get("jobs") if isinstance(previous.get("jobs"), dict) else {}
    names = list(jobs)
    started = _now()
    # status.json's entries stand for the state files not modified since its merge began (less a margin); the
    # others are read, so that a status of 100,000 finished jobs does not open 100,000 files.
    since = _parse_iso(previous.get("updated"))
    since = None if since is None else since - RESCAN_MARGIN_S
    cached = {name: (None, entry) for name, entry in jobs.items() if isinstance(entry, dict)}
    if since is not None and _unchanged_since(out / STATE_DIR, since):
        files = cached  # no state file written, added or removed since (they are only ever renamed into place)
    else:
        files = _scan_states(out / STATE_DIR, cached, since)
    status = _assemble(out, names, {stem: entry for stem, (_, entry) in files.items()}, started)
    folders = _folders(out)
    for name, job in status["jobs"].items():
        if "shards" in job:  # a sweep: its shards on disk are the record of what is done
            job.update(sweep_progress(out / name, job, _now()))
            continue
        marked = _marked_stores(out / name) if name in folders else []
        if marked:
            job["open_stores"] = marked
    return status


def sweep_progress(folder: Path, record: dict, now: float) -> dict:
    """A sweep's samples and shards done, from the shards in its folder; while it runs, the rate since its last
    start (sweep.json) and the ETA at that rate."""
    shards, size, samples = int(record["shards"]), int(record.get("shard_size", 1)), int(record.get("samples", 0))
    done = done_shards(folder) & set(range(shards))
    samples_done = len(done) * size - (size * shards - samples if shards - 1 in done else 0)
    progress = {"shards_done": len(done), "samples_done": samples_done}
    started = (_read_json(folder / "sweep.json") or {}).get("started")
    if record.get("state") == JobState.RUNNING.value and isinstance(started, (int, float)) and now > started:
        since = [n for n in done if _mtime(folder / f"shard-{n:06d}.tar") >= started]
        if since:
            rate = len(since) * size / (now - started)
            progress["samples_per_s"] = round(rate, 3)
            progress["eta_s"] = round((samples - samples_done) / rate, 1)
    return progress


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def format_status(status: dict) -> str:
    """A table, one line per job (job, state, seconds, error), then a line of counts."""
    jobs: dict = status.get("jobs", {})
    rows = [("job", "state", "seconds", "error")]
    pending, running = JobState.PENDING.value, JobState.RUNNING.value  # an enum's .value costs, 100,000 times
    for name, job in jobs.items():
        seconds = job.get("seconds")
        error = (job.get("error") or "").strip().splitlines()
        seconds_text = "" if seconds is None else f"{float(seconds):.1f}"
        state = job.get("state", "")
        if state == pending and job.get("checkpoint_step"):
            state += f" (checkpoint after step {job['checkpoint_step']}/{job.get('steps', '?')})"
        elif job.get("shards") is not None and job.get("shards_done") is not None:  # a sweep
            rate = job.get("samples_per_s")
            pace = f"; {rate:.2f} samples/s, ETA {_clock(job['eta_s'])}" if rate and job.get("eta_s") is not None \
                else ""
            state += (f" (samples {job['samples_done']}/{job.get('samples', '?')}, shards "
                      f"{job['shards_done']}/{job['shards']}{pace})")
        elif job.get("tiles"):  # a gigapixel job: tiles done of total per level, and while it runs rate and ETA
            levels = ", ".join(f"L{k} {done}/{total}" for k, (done, total) in enumerate(job["tiles"]))
            rate = job.get("tiles_per_s")
            pace = f"; {rate:.2f} tile/s, ETA {_clock(job['eta_s'])}" if rate and job.get("eta_s") is not None \
                and state == running else ""
            state += f" (tiles {levels}{pace})"
        elif state == running and job.get("step") is not None:
            # After a kill the state stays "running": the periodic checkpoint tells where the next run starts.
            again = f"; checkpoint after step {job['checkpoint_step']}" if job.get("checkpoint_step") else ""
            state += f" (step {job['step']}/{job.get('steps', '?')}{again})"
        rows.append((name, state, seconds_text, error[0] if error else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        f"{name:<{widths[0]}}  {state:<{widths[1]}}  {seconds:>{widths[2]}}  {error}".rstrip()
        for name, state, seconds, error in rows
    ]
    counts = _counts(jobs)
    summary = ", ".join(f"{counts[s.value]} {s.value}" for s in JobState if counts[s.value])
    total = len(jobs)
    lines.append(f"{total} job{'' if total == 1 else 's'}" + (f": {summary}" if summary else ""))
    for job in jobs.values():
        lines.extend(_open_store_line(store["path"], store["writer"]) for store in job.get("open_stores", ()))
    return "\n".join(lines)


def _open_store_line(path: str, writer: str) -> str:
    """What a store marked open for writing means for its readers, and the fix when its writer is gone."""
    fix = f"h5clear -s {shlex.quote(path)}"
    if writer == WRITER_LIVE:
        # The lock probe cannot tell the writer's lock from that of a reader that took HDF5's (swmr=True, locking on).
        return (f"{path}: being written, or held by a reader with HDF5's file lock (h5py reads it with swmr=True; "
                "h5dump and h5ls once it is closed)")
    if writer == WRITER_GONE:
        rerun = " (a rerun of the job that resumes this store clears it too)" if Path(path).name == "tiles.h5" \
            else ""
        return (f"{path}: left marked open for writing by a writer that is gone (killed): h5dump, h5ls and h5py "
                f"without swmr=True refuse it until `{fix}`{rerun}")
    return (f"{path}: marked open for writing; no file locks here to tell whether its writer still runs: "
            f"when no render writes it, `{fix}`")


def clear_groups(out_dir: str | os.PathLike) -> None:
    """Forget the group records of an earlier run into OUT (called by rank 0 before any group starts)."""
    folder = Path(out_dir) / STATE_DIR / GROUPS_DIR
    if folder.is_dir():
        for path in folder.glob("*.json"):
            path.unlink(missing_ok=True)


def record_group(out_dir: str | os.PathLike, phase: int, group: int, ranks: Sequence[int], size: int,
                 busy_seconds: float, units: Sequence[str]) -> None:
    """OUT/.state/groups/PHASE-GROUP.json, written by the group's first rank after every unit it finishes: which
    ranks the group is, how long it has been busy, and the units (jobs) it took, in order."""
    record = {"phase": phase, "group": group, "ranks": list(ranks), "group_size": size,
              "busy_seconds": round(busy_seconds, 3), "units": list(units), "updated": _iso(_now())}
    write_json_atomic(Path(out_dir) / STATE_DIR / GROUPS_DIR / f"{phase}-{group}.json", record)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def meta_header(job) -> dict:
    """What every meta.json starts with: the resolved job, its parameter hash, the model and the versions that made
    the bytes."""
    import platform

    import diffusers
    import torch
    import transformers

    return {
        "job": job.to_dict(),
        "params_hash": job.params_hash(),
        "model": job.model,
        "versions": {"hpcrender": hpcrender.__version__, "python": platform.python_version(),
                     "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }


def write_meta(job_dir: str | os.PathLike, meta: dict) -> None:
    """OUT/JOB/meta.json: the resolved job, model, versions, layout, timings (atomic)."""
    write_json_atomic(Path(job_dir) / META_FILE, meta)


# -- helpers ---------------------------------------------------------------------------------


def _merge(out: Path, job_names: Sequence[str]) -> dict:
    started = _now()
    files = _scan_states(out / STATE_DIR, {}, None)
    return _assemble(out, job_names, {stem: entry for stem, (_, entry) in files.items()}, started)


def _scan_states(state_dir: Path, cached: dict[str, tuple], since: float | None) -> dict[str, tuple]:
    """stem -> (stat fingerprint, status entry of its record or None) of every state file. A `cached` entry stands
    when its file was last modified before `since` (a wall time; None: read every file) and its fingerprint, if
    known, is unchanged; the other files are read."""
    found: dict[str, tuple] = {}
    try:
        entries = os.scandir(state_dir)
    except (FileNotFoundError, NotADirectoryError):
        return found
    since_ns = None if since is None else int(since * 1e9)
    with entries:
        for entry in entries:
            if not entry.name.endswith(".json"):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # removed since it was listed
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            stem = entry.name[: -len(".json")]
            fingerprint = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            known = cached.get(stem)
            if known is not None and since_ns is not None and st.st_mtime_ns < since_ns and \
                    known[0] in (None, fingerprint):
                found[stem] = (fingerprint, known[1])
                continue
            record = _read_json(Path(entry.path))
            found[stem] = (fingerprint, _entry(record) if isinstance(record, dict) else None)
    return found


def _assemble(out: Path, job_names: Sequence[str], entries: dict[str, dict | None], updated: float) -> dict:
    """The status from the state files' entries (None: unreadable, as if missing), jobs in `job_names` first."""
    recorded = {stem: entry for stem, entry in entries.items() if entry is not None}
    jobs: dict[str, dict] = {}
    for name in job_names:
        entry = recorded.pop(name, None)
        jobs[name] = _entry(None) if entry is None else entry
    for name in sorted(recorded):
        jobs[name] = recorded[name]
    state_dir = out / STATE_DIR
    groups = []
    if (state_dir / GROUPS_DIR).is_dir():
        for path in (state_dir / GROUPS_DIR).glob("*.json"):
            record = _read_json(path)
            if isinstance(record, dict):
                groups.append(record)
    groups.sort(key=lambda g: (g.get("phase", 0), g.get("group", 0)))
    return {"updated": _iso(updated), "counts": _counts(jobs), "jobs": jobs, "groups": groups}


def _unchanged_since(folder: Path, since: float) -> bool:
    """Whether no entry of `folder` was created, renamed or removed since the wall time `since`: its own mtime."""
    try:
        return os.stat(folder).st_mtime_ns < int(since * 1e9)
    except OSError:
        return False


def _folders(out: Path) -> set[str]:
    """Names of OUT's folders: one listing, rather than a look into each of 100,000 jobs' folders."""
    with os.scandir(out) as entries:
        return {entry.name for entry in entries if entry.is_dir()}


def _marked_stores(job_dir: Path) -> list[dict]:
    """The job's stores whose superblock says "open for writing", each with whose mark it is."""
    marked = []
    try:
        with os.scandir(job_dir) as entries:
            paths = sorted(Path(entry.path) for entry in entries if fnmatch.fnmatchcase(entry.name, STORES))
    except (FileNotFoundError, NotADirectoryError):
        return marked
    for path in paths:
        writer = writer_state(path) if path.is_file() else None
        if writer is not None:
            marked.append({"path": str(path), "writer": writer})
    return marked


def _entry(record: dict | None) -> dict:
    if record is None:
        return {"state": JobState.PENDING.value, "error": None}
    entry = {"state": record.get("state", JobState.PENDING.value), "error": record.get("error")}
    entry.update((k, v) for k, v in record.items() if k not in ("name", "state", "error"))
    return entry


def _counts(jobs: dict) -> dict:
    counts = {s.value: 0 for s in JobState}
    pending = JobState.PENDING.value
    for job in jobs.values():
        state = job.get("state", pending)
        counts[state] = counts.get(state, 0) + 1
    counts["total"] = len(jobs)
    return counts


def read_json(path: Path) -> Any:
    """A record as JSON, or None when it is missing or unreadable (what the sweep kind reads of its own records)."""
    return _read_json(path)


def _read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable (a state is then rebuilt)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_iso(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _jsonable(obj: Any) -> Any:
    """json.dump fallback for the types a job record holds: enums, paths, numpy, dataclasses."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, without importing numpy here
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
