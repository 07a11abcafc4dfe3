"""Job records: atomic JSON, per-job state files, the merged status.json and its table."""

from __future__ import annotations

import enum
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from hpcrender.output import records
from hpcrender.errors import BadInput
from hpcrender.output.records import (
    JobState, format_status, merge_status, read_status, record_job_state, record_progress, state_path, write_json_atomic, write_meta,
)


@pytest.fixture
def clock(monkeypatch):
    """A settable wall clock for records._now."""
    now = [1_700_000_000.0]
    monkeypatch.setattr(records, "_now", lambda: now[0])
    return now


def test_atomic_write_replaces_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_running_then_done_records_attempt_timestamps_and_seconds(tmp_path, clock):
    record_job_state(tmp_path, "harbor", JobState.RUNNING, rank=3, node="n01")
    clock[0] += 12.5
    record_job_state(tmp_path, "harbor", JobState.DONE, steps_per_s=1.6)
    rec = json.loads(state_path(tmp_path, "harbor").read_text())
    assert rec["state"] == "done" and rec["error"] is None
    assert rec["attempt"] == 1 and rec["seconds"] == 12.5
    assert rec["started"] == "2023-11-14T22:13:20.000Z" and rec["finished"] == "2023-11-14T22:13:32.500Z"
    assert (rec["rank"], rec["node"], rec["steps_per_s"]) == (3, "n01", 1.6)
    assert state_path(tmp_path, "harbor") == tmp_path / ".state" / "harbor.json"


def test_unix_times_given_by_the_caller_are_stored_as_iso(tmp_path, clock):
    record_job_state(tmp_path, "a", JobState.RUNNING, started=1_700_000_000.25)
    record_job_state(tmp_path, "a", JobState.DONE, finished=1_700_000_010.5, seconds=10.25)
    rec = json.loads(state_path(tmp_path, "a").read_text())
    assert (rec["started"], rec["finished"]) == ("2023-11-14T22:13:20.250Z", "2023-11-14T22:13:30.500Z")
    assert rec["seconds"] == 10.25


def test_second_attempt_counts_and_failure_keeps_the_error(tmp_path, clock):
    record_job_state(tmp_path, "giga", JobState.RUNNING)
    clock[0] += 3
    record_job_state(tmp_path, "giga", JobState.FAILED, error="out of memory")
    clock[0] += 100
    record_job_state(tmp_path, "giga", JobState.RUNNING)
    rec = json.loads(state_path(tmp_path, "giga").read_text())
    assert rec["attempt"] == 2 and rec["state"] == "running" and rec["error"] is None
    assert "finished" not in rec and "seconds" not in rec
    clock[0] += 4
    record_job_state(tmp_path, "giga", JobState.FAILED, error="out of memory\nTraceback ...")
    rec = json.loads(state_path(tmp_path, "giga").read_text())
    assert rec["seconds"] == 4.0 and rec["error"].startswith("out of memory")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b"])
def test_names_that_cannot_be_files_are_refused(tmp_path, name):
    with pytest.raises(ValueError):
        record_job_state(tmp_path, name, JobState.RUNNING)


def test_merge_collects_state_files_of_several_ranks(tmp_path, clock):
    # each "rank" records only the jobs it renders
    record_job_state(tmp_path, "a", JobState.RUNNING, rank=0)
    record_job_state(tmp_path, "a", JobState.DONE, rank=0)
    record_job_state(tmp_path, "b", JobState.RUNNING, rank=1)
    record_job_state(tmp_path, "b", JobState.FAILED, rank=1, error="boom")
    record_job_state(tmp_path, "c", JobState.RUNNING, rank=2)
    record_job_state(tmp_path, "old", JobState.DONE, rank=1)  # from an earlier --only run
    status = merge_status(tmp_path, ["c", "a", "b", "d"])
    assert list(status["jobs"]) == ["c", "a", "b", "d", "old"]
    assert {n: j["state"] for n, j in status["jobs"].items()} == {
        "c": "running", "a": "done", "b": "failed", "d": "pending", "old": "done"
    }
    assert status["jobs"]["b"]["error"] == "boom" and status["jobs"]["b"]["rank"] == 1
    assert status["jobs"]["d"] == {"state": "pending", "error": None}
    assert status["counts"] == {"pending": 1, "running": 1, "done": 2, "failed": 1, "total": 5}
    assert json.loads((tmp_path / "status.json").read_text()) == status


def test_read_status_sees_state_newer_than_status_json(tmp_path):
    merge_status(tmp_path, ["a", "b"])
    record_job_state(tmp_path, "b", JobState.RUNNING)
    status = read_status(tmp_path)
    assert {n: j["state"] for n, j in status["jobs"].items()} == {"a": "pending", "b": "running"}
    assert json.loads((tmp_path / "status.json").read_text())["jobs"]["b"]["state"] == "pending"


def test_read_status_of_a_missing_directory_is_bad_input(tmp_path):
    with pytest.raises(BadInput):
        read_status(tmp_path / "nope")
    assert read_status(tmp_path)["jobs"] == {}


def test_concurrent_writers_and_mergers_never_see_torn_files(tmp_path):
    names = [f"job{i}" for i in range(4)]
    errors: list[BaseException] = []

    def render(name):
        try:
            for _ in range(15):
                record_job_state(tmp_path, name, JobState.RUNNING)
                record_job_state(tmp_path, name, JobState.DONE)
                merge_status(tmp_path, names)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=render, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    status = merge_status(tmp_path, names)
    assert status["counts"]["done"] == 4 and all(j["attempt"] == 15 for j in status["jobs"].values())
    assert sorted(p.name for p in (tmp_path / ".state").iterdir()) == [f"{n}.json" for n in names]


def test_format_status_is_a_table_with_a_summary(tmp_path, clock):
    record_job_state(tmp_path, "harbor", JobState.RUNNING)
    clock[0] += 12.5
    record_job_state(tmp_path, "harbor", JobState.DONE)
    record_job_state(tmp_path, "giga-tile", JobState.RUNNING)
    record_job_state(tmp_path, "giga-tile", JobState.FAILED, error="CUDA out of memory\nTraceback (most recent call)")
    text = format_status(merge_status(tmp_path, ["harbor", "giga-tile", "x"]))
    lines = text.splitlines()
    assert lines[0].split() == ["job", "state", "seconds", "error"]
    assert lines[1].split() == ["harbor", "done", "12.5"]
    assert lines[2].split() == ["giga-tile", "failed", "0.0", "CUDA", "out", "of", "memory"]
    assert lines[3].split() == ["x", "pending"]
    assert lines[-1] == "3 jobs: 1 pending, 1 done, 1 failed"
    assert lines[0].index("state") == lines[1].index("done") == lines[3].index("pending")  # aligned columns
    assert format_status({"jobs": {}}).splitlines()[-1] == "0 jobs"


def test_a_stopped_job_shows_its_checkpoint_until_it_runs_again(tmp_path, clock):
    record_job_state(tmp_path, "big", JobState.RUNNING)
    record_job_state(tmp_path, "big", JobState.PENDING, checkpoint_step=12, steps=40)
    assert format_status(merge_status(tmp_path, ["big"])).splitlines()[1].split() == [
        "big", "pending", "(checkpoint", "after", "step", "12/40)"]
    record_job_state(tmp_path, "big", JobState.RUNNING)
    job = merge_status(tmp_path, ["big"])["jobs"]["big"]
    assert job["state"] == "running" and job["attempt"] == 2 and "checkpoint_step" not in job and "steps" not in job


def test_a_running_job_shows_its_steps_done(tmp_path, clock):
    record_job_state(tmp_path, "big", JobState.RUNNING, rank=3)
    clock[0] += 7
    record_progress(tmp_path, "big", 12, 40)
    job = merge_status(tmp_path, ["big"])["jobs"]["big"]
    assert (job["state"], job["attempt"], job["rank"], job["step"], job["steps"]) == ("running", 1, 3, 12, 40)
    assert job["updated"] == "2023-11-14T22:13:27.000Z"
    assert format_status(merge_status(tmp_path, ["big"])).splitlines()[1].split() == [
        "big", "running", "(step", "12/40)"]
    record_job_state(tmp_path, "big", JobState.DONE)
    assert "step" not in merge_status(tmp_path, ["big"])["jobs"]["big"]


class _Colour(str, enum.Enum):
    RED = "red"


def test_meta_json_serialises_paths_enums_and_numpy(tmp_path):
    write_meta(tmp_path / "job", {"out": Path("/x/y"), "mode": _Colour.RED, "peak": np.int64(7), "t": np.arange(3.0)})
    meta = json.loads((tmp_path / "job" / "meta.json").read_text())
    assert meta == {"out": "/x/y", "mode": "red", "peak": 7, "t": [0.0, 1.0, 2.0]}


# --- StatusMerger: rank 0's merge, incremental ---------------------------------------------------------------------

def _without_time(status: dict) -> dict:
    return {k: v for k, v in status.items() if k != "updated"}


def test_status_merger_equals_a_full_rebuild_after_arbitrary_state_file_changes(tmp_path, monkeypatch):
    import os
    import random

    names = [f"j{i}" for i in range(12)]
    merger = records.StatusMerger(tmp_path, names[:9])  # j9.. only have state files: they follow, by name
    reads = []
    read = records._read_json
    monkeypatch.setattr(records, "_read_json", lambda path: reads.append(path.name) or read(path))
    rng = random.Random(7)
    stamp = [1_000_000_000]  # file times long before any scan, a second apart: a changed file always looks changed

    def age(name):
        path = state_path(tmp_path, name)
        if path.exists():
            stamp[0] += 1
            os.utime(path, ns=(stamp[0] * 10**9, stamp[0] * 10**9))

    for _ in range(60):
        name, action = rng.choice(names), rng.randrange(6)
        if action == 0:
            record_job_state(tmp_path, name, JobState.RUNNING, rank=rng.randrange(2))
        elif action == 1:
            record_job_state(tmp_path, name, rng.choice([JobState.DONE, JobState.FAILED]), error="boom")
        elif action == 2:
            record_progress(tmp_path, name, rng.randrange(1, 9), 8)
        elif action == 3:
            state_path(tmp_path, name).unlink(missing_ok=True)
        elif action == 4:
            state_path(tmp_path, name).parent.mkdir(parents=True, exist_ok=True)
            state_path(tmp_path, name).write_text("{ torn")
        else:
            records.record_group(tmp_path, 0, rng.randrange(2), [0], 1, 1.0, [name])
        age(name)
        reads.clear()
        incremental = merger.refresh()
        touched = set(reads)
        assert _without_time(incremental) == _without_time(records._merge(tmp_path, names[:9]))
        # only the file just changed (and the group records) were read again
        assert {r for r in touched if not r[0].isdigit()} <= {f"{name}.json"}


def test_status_merger_writes_when_due_and_exactly_at_flush(tmp_path):
    now = [0.0]
    merger = records.StatusMerger(tmp_path, ["a", "b"], min_interval=5.0, clock=lambda: now[0])
    assert merger.flush()["counts"]["pending"] == 2
    record_job_state(tmp_path, "a", JobState.DONE)
    now[0] = 1.0
    assert merger.update() is None  # not due: status.json still says pending
    assert json.loads((tmp_path / "status.json").read_text())["jobs"]["a"]["state"] == "pending"
    now[0] = 6.0
    assert merger.update()["jobs"]["a"]["state"] == "done"
    record_job_state(tmp_path, "b", JobState.FAILED, error="x")
    status = merger.flush()
    assert _without_time(status) == _without_time(records._merge(tmp_path, ["a", "b"]))
    assert json.loads((tmp_path / "status.json").read_text()) == status


def test_read_status_of_a_quiet_folder_reads_status_json_alone_and_agrees_with_a_full_merge(tmp_path, monkeypatch):
    import os

    for name, state in (("a", JobState.DONE), ("b", JobState.FAILED), ("extra", JobState.DONE)):
        record_job_state(tmp_path, name, state, error="boom" if state is JobState.FAILED else None)
    old = 1_000_000_000 * 10**9  # every state file, and the folder, written long before status.json's merge
    for path in (tmp_path / ".state").iterdir():
        os.utime(path, ns=(old, old))
    os.utime(tmp_path / ".state", ns=(old, old))
    merged = merge_status(tmp_path, ["a", "b", "c"])
    reads = []
    read = records._read_json
    monkeypatch.setattr(records, "_read_json", lambda path: reads.append(path.name) or read(path))
    assert _without_time(read_status(tmp_path)) == _without_time(merged)
    assert reads == ["status.json"]
    record_job_state(tmp_path, "c", JobState.RUNNING)  # the folder changes: the state files are looked at again
    assert read_status(tmp_path)["jobs"]["c"]["state"] == "running"
