"""Sweeps: prompt files read row by row, samples and shards by arithmetic, WebDataset shards written whole, and
real runs - 2 MPI ranks, samples against the same prompt and seed rendered as an ordinary job, batches of 4, SIGKILL
twice and the same command again."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clirun import HPCRENDER, MPIEXEC, clean_env, hpcrender
from hpcrender.config import PromptSource, Sweep
from hpcrender.errors import BadInput, ManifestError
from hpcrender.manifest import apply_overrides, load_manifest
from hpcrender.output.records import format_status, read_status, sweep_progress
from hpcrender.output.shards import done_shards, read_shard, write_shard
from hpcrender.prompts import Row, read_rows, scan
from hpcrender.sweeps import (
    array_shards, batches, find_samples, sample_jobs, shard_count, shard_name, shard_samples, sweep_hash,
)

HEAD = """[defaults]
model = "builtin:tiny-sd"
steps = 2
width = 64
height = 64
"""


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def manifest(tmp_path: Path, body: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(HEAD + body)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return caught.value.problems


# --- prompt files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl"])
def test_rows_read_back_from_any_offset_equal_the_whole_file_in_order(tmp_path, fmt):
    prompts = [f"prompt {i}, with a comma and \"quotes\"" if i % 3 else f"plain {i}" for i in range(23)]
    path = tmp_path / f"p.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(prompts[:10]) + "\n\n" + "\n".join(prompts[10:]) + "\n")  # a blank line: no row
    elif fmt == "csv":
        with open(path, "w", newline="") as fh:
            import csv
            writer = csv.writer(fh)
            writer.writerow(["prompt", "seed"])
            for i, p in enumerate(prompts):
                writer.writerow([p.replace("plain", "two\nlines") if i == 6 else p, i])
        prompts[6] = prompts[6].replace("plain", "two\nlines")
    else:
        jsonl(path, [{"prompt": p, "seed": i} for i, p in enumerate(prompts)])
    for stride in (1, 3, 7, 1024):
        source, problems = scan(path, "p", stride=stride)
        assert problems == [] and source.rows == 23
        assert len(source.offsets) == -(-23 // stride)
        for start in range(24):
            for stop in range(start, 25):
                assert [r.prompt for r in read_rows(source, start, stop)] == prompts[start:stop]
    if fmt != "txt":
        assert [r.seed for r in read_rows(source, 0, 23)] == list(range(23))


def test_bad_rows_are_named_by_file_line_and_column(tmp_path):
    jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": "x", "seed": 3.5}, {"promt": "typo"}, {"seed": 1},
                                 {"prompt": "y", "seed": "7"}])
    (tmp_path / "p.jsonl").write_text((tmp_path / "p.jsonl").read_text() + "not json\n\n[1]\n")
    problems = problems_of(manifest(tmp_path, '[[sweeps]]\nname = "s"\nprompts_file = "p.jsonl"\n'))
    shown = str(tmp_path / "p.jsonl")
    assert problems == [
        f"{shown}:2: seed: must be an integer from 0 to {2**63 - 1}, got 3.5",
        f"{shown}:3: promt: unknown column (known: prompt, negative_prompt, seed, name, guidance_scale)",
        f"{shown}:4: prompt: missing (every row needs a prompt)",
        f"{shown}:5: seed: must be an integer from 0 to {2**63 - 1}, got '7'",
        f"{shown}:6: row: not a JSON object: Expecting value: line 1 column 1 (char 0)",
        f"{shown}:8: row: must be a JSON object, got an array",
    ]
    (tmp_path / "c.csv").write_text("text,seed\nhello,1\n")
    (tmp_path / "d.csv").write_text("prompt,seed,size\na,1,2\nb,x,3\n")
    problems = problems_of(manifest(tmp_path, '[[sweeps]]\nname = "s"\nprompts_file = "c.csv"\n'
                                              '[[sweeps]]\nname = "t"\nprompts_file = "d.csv"\n'))
    assert f"{tmp_path / 'c.csv'}:1: text: unknown column (known: prompt, negative_prompt, seed, name, " \
           "guidance_scale)" in problems
    assert f"{tmp_path / 'c.csv'}:1: prompt: missing column (the header names text, seed)" in problems
    assert f"{tmp_path / 'd.csv'}:1: size: unknown column (known: prompt, negative_prompt, seed, name, " \
           "guidance_scale)" in problems


def test_bad_rows_exit_2_before_anything_renders(tmp_path):
    jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "seed": "x"}])
    path = manifest(tmp_path, '[[sweeps]]\nname = "s"\nprompts_file = "p.jsonl"\n')
    for command in (["validate", path], ["render", path, "--out", tmp_path / "out"]):
        done = hpcrender(*command)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"hpcrender: error: {tmp_path / 'p.jsonl'}:2: seed: must be an integer from 0 to {2**63 - 1}, got 'x'"]
    assert not (tmp_path / "out" / "s").exists()


def test_a_wrong_file_is_reported_in_twenty_lines_and_a_count(tmp_path):
    jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "seed": -1}] * 50)
    problems = problems_of(manifest(tmp_path, '[[sweeps]]\nname = "s"\nprompts_file = "p.jsonl"\n'))
    assert len(problems) == 21 and problems[-1] == f"{tmp_path / 'p.jsonl'}: and 30 more problem(s)"


def test_row_names_are_keys_given_once(tmp_path):
    jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "name": "cat_1"}, {"prompt": "b", "name": "cat.2"},
                                 {"prompt": "c", "name": "cat_1"}])
    problems = problems_of(manifest(tmp_path, '[[sweeps]]\nname = "s"\nprompts_file = "p.jsonl"\n'))
    assert problems == [
        f"{tmp_path / 'p.jsonl'}:2: name: must use only letters, digits, '_' and '-' (a shard member's key has no "
        "dot), got 'cat.2'",
        f"{tmp_path / 'p.jsonl'}:3: name: 'cat_1' is given twice (first on line 1)"]


# --- the manifest's [[sweeps]] ----------------------------------------------------------------------------------


def test_sweep_keys_are_checked_with_their_lines(tmp_path):
    body = """
[[jobs]]
name = "cats"
prompt = "a job"

[[sweeps]]
name = "cats"
prompts = ["a"]

[[sweeps]]
name = "b.c"
prompt = "one"
prompts = []
seeds = { start = 0 }
batch = 0

[[sweeps]]
name = "d"
prompts = ["a"]
prompts_file = "p.txt"
seeds = [1]
images_per_prompt = 2
output = "folder"
[sweeps.gigapixel]
base = 512
"""
    shown = tmp_path / "sweep.toml"
    assert problems_of(manifest(tmp_path, body)) == [
        f"{shown}:12: sweeps[#1].name: duplicate name 'cats', already used by job #1 (line 8)",
        f"{shown}:16: sweeps[b.c].name: must have no '.' (its samples' keys in a shard are NAME-0000000, and "
        "WebDataset splits a key at its first dot), got 'b.c'",
        f"{shown}:17: sweeps[b.c].prompt: a sweep's prompts are `prompts = [...]` or `prompts_file` (one sample per "
        "prompt and seed)",
        f"{shown}:18: sweeps[b.c].prompts: must be a non-empty list of strings, got an array",
        f"{shown}:19: sweeps[b.c].seeds.count: missing (how many seeds from start)",
        f"{shown}:20: sweeps[b.c].batch: must be an integer from 1 to 4096, got 0",
        f"{shown}:25: sweeps[d].prompts: give `prompts = [...]` or `prompts_file`, not both",
        f"{shown}:27: sweeps[d].images_per_prompt: give `seeds` or `images_per_prompt`, not both (each prompt gets "
        "one sample per seed)",
        f"{shown}:28: sweeps[d].output: must be one of shards, folders, got 'folder' (did you mean 'folders'?)",
        f"{shown}:29: sweeps[d].gigapixel: does not apply to a sweep: a gigapixel image is a [[jobs]] table of its "
        "own",
    ]


def test_seeds_names_and_defaults_of_samples(tmp_path):
    jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "seed": 100, "name": "bee"},
                                 {"prompt": "c", "negative_prompt": "blur", "guidance_scale": 2}])
    m = load_manifest(manifest(tmp_path, """
[defaults.parallel]
mode = "sync"
[[sweeps]]
name = "s"
prompts_file = "p.jsonl"
seeds = { start = 5, count = 2 }
steps = 3
[[sweeps]]
name = "t"
prompts = ["x", "y"]
images_per_prompt = 3
seed = 40
[[sweeps]]
name = "u"
prompts = ["x"]
[sweeps.parallel]
ranks_per_image = 2
"""))
    s, t, u = m.sweeps
    assert (s.samples, t.samples, u.samples) == (6, 6, 1)
    jobs = sample_jobs(s, range(6))
    assert [(j.name, j.prompt, j.seed) for j in jobs] == [
        ("s-0000000", "a", 5), ("s-0000001", "a", 6), ("bee-0", "b", 100), ("bee-1", "b", 101),
        ("s-0000004", "c", 5), ("s-0000005", "c", 6)]
    assert jobs[4].negative_prompt == "blur" and jobs[4].guidance_scale == 2.0 and jobs[0].guidance_scale == 5.0
    assert all(j.steps == 3 and j.parallel.ranks_per_image == 1 for j in jobs)  # a sweep's default: one rank each
    assert [j.seed for j in sample_jobs(t, range(6))] == [40, 41, 42, 40, 41, 42]
    assert u.template.parallel.ranks_per_image == 2
    assert find_samples(s, {"bee-1", "s-0000004", "s-0000009", "bee-2", "t-0000001"}) == {"bee-1": 3,
                                                                                        "s-0000004": 4}
    only = apply_overrides(m, only=["bee-1", "t"], steps=4)
    assert [j.name for j in only.jobs] == ["bee-1"] and only.jobs[0].seed == 101 and only.jobs[0].steps == 4
    assert [x.name for x in only.sweeps] == ["t"] and only.sweeps[0].template.steps == 4
    with pytest.raises(BadInput, match="no job, sweep or sample named 'bee-7'"):
        apply_overrides(m, only=["bee-7"])


def test_output_folders_makes_each_sample_a_job(tmp_path):
    m = load_manifest(manifest(tmp_path, '[[sweeps]]\nname = "f"\nprompts = ["a", "b"]\noutput = "folders"\n'
                                         'seeds = [1, 2]\n'))
    assert m.sweeps == () and [(j.name, j.prompt, j.seed) for j in m.jobs] == [
        ("f-0000000", "a", 1), ("f-0000001", "a", 2), ("f-0000002", "b", 1), ("f-0000003", "b", 2)]
    clash = manifest(tmp_path, '[[jobs]]\nname = "f-0000001"\nprompt = "x"\n[[sweeps]]\nname = "f"\n'
                               'prompts = ["a"]\nseeds = [1, 2]\noutput = "folders"\n', "clash.toml")
    assert problems_of(clash) == [f"{clash}:13: sweeps[f].output: sample 'f-0000001' would be the folder of "
                                  "another job or sweep"]


def test_the_sweep_hash_follows_the_prompts_content_seeds_and_batches(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\nb\n")
    body = '[[sweeps]]\nname = "s"\nprompts_file = "p.txt"\nseeds = [1, 2]\n'
    first = sweep_hash(load_manifest(manifest(tmp_path, body)).sweeps[0])
    assert sweep_hash(load_manifest(manifest(tmp_path, body)).sweeps[0]) == first
    path.write_text("a\nc\n")
    changed = sweep_hash(load_manifest(manifest(tmp_path, body)).sweeps[0])
    path.write_text("a\nb\n")
    batched = sweep_hash(load_manifest(manifest(tmp_path, body + "batch = 2\n")).sweeps[0])
    seeds = sweep_hash(load_manifest(manifest(tmp_path, body.replace("[1, 2]", "[1, 3]"))).sweeps[0])
    assert len({first, changed, batched, seeds}) == 4


# --- samples and shards by arithmetic -----------------------------------------------------------------------------


def fake_sweep(rows: int, per_prompt: int, shard_size: int) -> Sweep:
    from hpcrender.config import Job
    return Sweep(name="s", template=Job(name="s", prompt="", width=64, height=64, seed=0),
                 source=PromptSource(format="inline", shown="x", rows=rows, inline=("p",) * rows),
                 images_per_prompt=per_prompt, shard_size=shard_size)


def test_shards_and_array_tasks_cover_every_sample_exactly_once():
    for rows in range(1, 12):
        for per_prompt in (1, 2, 3):
            for size in (1, 2, 5, 1000):
                sweep = fake_sweep(rows, per_prompt, size)
                shards = shard_count(sweep.samples, size)
                covered = [i for n in range(shards) for i in shard_samples(sweep, n)]
                assert covered == list(range(sweep.samples))
                for count in (1, 2, 3, 7):
                    tasks = [list(array_shards(shards, (k, count))) for k in range(count)]
                    assert sorted(n for task in tasks for n in task) == list(range(shards))
    assert list(array_shards(5, None)) == [0, 1, 2, 3, 4]


def test_batches_keep_order_and_split_where_guidance_differs():
    from hpcrender.config import Job
    jobs = [Job(name=f"j{i}", prompt="", width=64, height=64, seed=i, guidance_scale=2.0 if i in (4, 5) else 5.0)
            for i in range(9)]
    assert [[j.name for j in b] for b in batches(jobs, 3)] == [["j0", "j1", "j2"], ["j3"], ["j4", "j5"],
                                                               ["j6", "j7", "j8"]]
    assert [len(b) for b in batches(jobs, 1)] == [1] * 9


def test_a_shard_is_whole_or_absent_and_its_members_are_fixed(tmp_path):
    folder = tmp_path / "s"
    samples = [(f"s-{i:07d}", bytes([i]) * 10, {"key": f"s-{i:07d}", "seed": i}) for i in range(3)]
    write_shard(folder / shard_name(0), samples)
    write_shard(folder / shard_name(0).replace("0.tar", "0.tar.copy"), samples)
    (folder / ".shard-000001.tar.123.abcd.tmp").write_bytes(b"torn")  # what a SIGKILL leaves
    assert done_shards(folder) == {0}
    assert (folder / shard_name(0)).read_bytes() == (folder / "shard-000000.tar.copy").read_bytes()
    back = read_shard(folder / shard_name(0))
    assert list(back) == [k for k, _, _ in samples]
    assert back["s-0000001"]["png"] == bytes([1]) * 10 and json.loads(back["s-0000002"]["json"])["seed"] == 2
    with tarfile.open(folder / shard_name(0)) as tar:
        assert {(m.mtime, m.mode, m.uname) for m in tar} == {(0, 0o644, "")}


def test_status_counts_samples_and_shards_from_the_folder(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    started = time.time() - 10
    (folder / "sweep.json").write_text(json.dumps({"started": started}))
    for n in (0, 2, 3):  # shard 3 is the short last one: 10 samples in shards of 4
        (folder / shard_name(n)).write_bytes(b"")
    record = {"state": "running", "samples": 10, "shards": 3, "shard_size": 4}
    progress = sweep_progress(folder, record, time.time())
    assert (progress["shards_done"], progress["samples_done"]) == (2, 6)  # shard 3 is not one of its 3
    progress = sweep_progress(folder, {**record, "shards": 4, "samples": 14}, started + 10)
    assert (progress["shards_done"], progress["samples_done"]) == (3, 10)
    assert progress["samples_per_s"] == pytest.approx(1.2) and progress["eta_s"] == pytest.approx(3.3, abs=0.1)
    (tmp_path / ".state").mkdir()
    (tmp_path / ".state" / "s.json").write_text(json.dumps({"name": "s", "state": "running", "samples": 14,
                                                            "shards": 4, "shard_size": 4}))
    text = format_status(read_status(tmp_path))
    assert "running (samples 10/14, shards 3/4; " in text and "samples/s, ETA 0:00:0" in text


# --- real runs ---------------------------------------------------------------------------------------------------

PROMPTS = 60
SWEEPS = """
[[sweeps]]
name = "cats"
prompts_file = "prompts.jsonl"
seeds = [3, 4]
shard_size = 16

[[sweeps]]
name = "cats4"
prompts_file = "prompts.jsonl"
seeds = [3, 4]
shard_size = 16
batch = 4
"""
# Pixels of a sample rendered in a batch of 4 against the same sample alone (tiny-sd, 64x64, 2 euler steps, one
# thread): the batched convolutions and matmuls round differently, measured at most 1 (of 255) here.
BATCH_PIXEL_FLOOR = 2


def pixels(png: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png)))


def all_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    found: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob("shard-*.tar")):
        for key, members in read_shard(path).items():
            assert key not in found, f"{key} in two shards"
            found[key] = members
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-rank run of both sweeps, and the 3 samples it must equal rendered as ordinary jobs."""
    root = tmp_path_factory.mktemp("sweeps")
    jsonl(root / "prompts.jsonl", [{"prompt": f"a cat, study {i}"} for i in range(PROMPTS)])
    path = manifest(root, SWEEPS)
    done = hpcrender("render", path, "--out", root / "out", ranks=2)
    assert done.returncode == 0, done.stderr
    chosen = random.Random(19).sample(range(2 * PROMPTS), 3)
    names = [f"cats-{i:07d}" for i in chosen]
    alone = hpcrender("render", path, "--out", root / "alone", *[a for n in names for a in ("--only", n)])
    assert alone.returncode == 0, alone.stderr
    return root, path, names


def test_two_ranks_render_every_sample_once_into_shards_with_an_index(run):
    root, _, _ = run
    out = root / "out"
    groups = sorted(json.loads(p.read_text())["ranks"] for p in (out / ".state" / "groups").glob("*.json"))
    assert groups == [[0], [1]]  # a world of 2: each rank a group of its own, taking shards from the queue
    for name in ("cats", "cats4"):
        samples = all_samples(out / name)
        assert sorted(samples) == [f"{name}-{i:07d}" for i in range(120)]
        assert len(list((out / name).glob("shard-*.tar"))) == 8
        record = json.loads(samples[f"{name}-0000043"]["json"])
        assert (record["prompt"], record["seed"], record["steps"], record["sampler"]) == ("a cat, study 21", 4, 2,
                                                                                        "euler")
        index = [json.loads(line) for line in (out / name / "index.jsonl").read_text().splitlines()]
        assert [(e["key"], e["shard"]) for e in index] == [(f"{name}-{i:07d}", shard_name(i // 16))
                                                          for i in range(120)]
    status = read_status(out)["jobs"]
    assert status["cats"]["state"] == "done" and status["cats"]["samples_done"] == 120
    assert "done (samples 120/120, shards 8/8)" in hpcrender("status", out).stdout


def test_samples_equal_their_ordinary_jobs_alone_and_in_batches_of_four(run):
    root, _, names = run
    cats, cats4 = all_samples(root / "out" / "cats"), all_samples(root / "out" / "cats4")
    worst = 0
    for name in names:
        alone = np.array(Image.open(root / "alone" / name / "image.png"))
        assert np.array_equal(pixels(cats[name]["png"]), alone), name
        batched = pixels(cats4[name.replace("cats", "cats4")]["png"]).astype(int)
        worst = max(worst, int(np.abs(batched - alone).max()))
    assert worst <= BATCH_PIXEL_FLOOR
    # Every batched sample within the floor of its batch-1 twin, not only the three.
    for key, members in cats.items():
        other = pixels(cats4[key.replace("cats", "cats4")]["png"]).astype(int)
        assert np.abs(other - pixels(members["png"]).astype(int)).max() <= BATCH_PIXEL_FLOOR, key


def _start(path: Path, out: Path) -> subprocess.Popen:
    cmd = [str(MPIEXEC), "-n", "2", str(HPCRENDER), "render", str(path), "--out", str(out), "--only", "cats"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env(),
                            start_new_session=True)


def test_sigkill_twice_then_the_same_command_gives_the_same_samples(run):
    root, path, _ = run
    out = root / "killed"
    rng = random.Random()
    moments = []
    for shards_first in (1, 3):
        proc = _start(path, out)
        deadline = time.monotonic() + 180
        while len(done_shards(out / "cats")) < shards_first and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        delay = rng.uniform(0.0, 1.5)
        time.sleep(delay)
        moments.append((shards_first, round(delay, 2), len(done_shards(out / "cats"))))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = hpcrender("render", path, "--out", out, "--only", "cats", ranks=2)
    assert done.returncode == 0, done.stderr
    expected, got = all_samples(root / "out" / "cats"), all_samples(out / "cats")
    assert sorted(got) == sorted(expected), moments
    assert all(got[k] == expected[k] for k in expected), moments
    assert not list((out / "cats").glob(".*.tmp"))  # what the kills left half-written is gone once all are done
    # Other parameters over these shards: refused with the reason, nothing replaced.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cats").glob("shard-*.tar")}
    again = hpcrender("render", path, "--out", out, "--only", "cats", "--steps", "1")
    assert again.returncode == 1, again.stderr
    status = read_status(out)["jobs"]["cats"]
    assert status["state"] == "failed" and "shards written for other parameters" in status["error"] \
        and "--no-resume" in status["error"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cats").glob("shard-*.tar")} == before


# --- batches against samples alone, in process ------------------------------------------------------------------

# (model, sampler): a UNet with a stochastic sampler (each sample's step noise from its own generator), SDXL's added
# inputs, and the three transformer families (PixArt's mask, SD3's pooled text, Flux's unbatched text ids).
# SDXL twice: with some negative prompts empty its samples are encoded one by one (diffusers zeroes the negative
# embeddings only when no negative prompt is given at all), without any in one call.
BATCHED = [("tiny-sd", "euler_a", "fog"), ("tiny-sdxl", "dpmpp_2m_sde", "fog"), ("tiny-sdxl", "euler", ""),
           ("tiny-pixart", "dpmpp_2m", "fog"), ("tiny-sd3", "euler", "fog"), ("tiny-flux", "euler", "fog")]
# Final latents of a sample in a batch of 3 against the sample alone, relative to the latent's largest value: measured
# at most 6e-7 here (float32, one thread; PixArt's latents reach 450, so 1.3e-4 there in absolute terms).
LATENT_FLOOR = 1e-5


@pytest.mark.parametrize("name, sampler, negative", BATCHED)
def test_a_batch_of_three_is_each_sample_alone_within_the_floor_whatever_its_batch_mates(name, sampler, negative):
    import torch

    from hpcrender.config import Job, Mode, ParallelConfig, SchedulerName
    from hpcrender.models import load_pipeline
    from hpcrender.models.facts import facts_of
    from hpcrender.parallel.layout import Comms, GroupLayout
    from hpcrender.render.batch import render_batch
    from hpcrender.render.image import render_image

    torch.set_num_threads(1)
    pipe = load_pipeline(f"builtin:{name}")
    facts = facts_of(pipe)
    comms = Comms(None, None, (0,))

    def job(i: int, prompt: str, seed: int, negative: str = "") -> Job:
        return Job(name=f"s{i}", prompt=prompt, width=32, height=48, seed=seed, model=f"builtin:{name}", steps=3,
                   scheduler=SchedulerName(sampler), guidance_scale=4.0, negative_prompt=negative,
                   parallel=ParallelConfig(mode=Mode.NONE))

    jobs = [job(0, "a red fox", 1), job(1, "a blue bird", 2, negative), job(2, "a red fox", 3)]
    batch = render_batch(pipe, facts, jobs, comms, "cpu")
    alone = render_batch(pipe, facts, jobs[:1], comms, "cpu")
    single = render_image(pipe, jobs[0], GroupLayout(size=1, rank=0, mode=Mode.NONE), comms, "cpu", facts=facts)
    assert np.array_equal(alone.latents[0], single.latent)  # a batch of one is the ordinary render, bit for bit
    for k, sample in enumerate(jobs):
        own = render_image(pipe, sample, GroupLayout(size=1, rank=0, mode=Mode.NONE), comms, "cpu", facts=facts)
        assert np.abs(batch.latents[k] - own.latent).max() <= LATENT_FLOOR * np.abs(own.latent).max()
        assert np.abs(batch.images[k].astype(int) - own.image.astype(int)).max() <= BATCH_PIXEL_FLOOR
    # Other batch mates of the same batch size: the same bits (the rounding is the batch shape's, not theirs).
    mates = render_batch(pipe, facts, [jobs[0], job(3, "a green hill", 9, negative and "rain"), job(4, "", 4)], comms,
                         "cpu")
    assert np.array_equal(mates.latents[0], batch.latents[0])
    assert np.abs(batch.latents[0] - batch.latents[2]).max() > 0.1  # the same prompt, other seeds: other samples


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_a_batch_equals_diffusers_own_call_with_lists_of_prompts_and_generators(name):
    import torch

    from hpcrender.config import Job, Mode, ParallelConfig, SchedulerName
    from hpcrender.models import load_pipeline
    from hpcrender.models.facts import facts_of
    from hpcrender.parallel.layout import Comms
    from hpcrender.render.batch import render_batch
    from hpcrender.render.samplers import make_scheduler

    torch.set_num_threads(1)
    pipe = load_pipeline(f"builtin:{name}")
    jobs = [Job(name=f"s{i}", prompt=f"a photograph of subject {i}", width=64, height=48, seed=10 + i,
                model=f"builtin:{name}", steps=3, parallel=ParallelConfig(mode=Mode.NONE)) for i in range(4)]
    ours = render_batch(pipe, facts_of(pipe), jobs, Comms(None, None, (0,)), "cpu")
    pipe.scheduler = make_scheduler(SchedulerName.EULER, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=[j.prompt for j in jobs], height=48, width=64, num_inference_steps=3, guidance_scale=5.0,
                  generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs], output_type="latent").images
    assert np.array_equal(ours.latents, theirs.float().numpy())
