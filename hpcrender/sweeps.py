"""A sweep's samples and shards by arithmetic: sample i is prompt row i // per_prompt with seed number i % per_prompt,
shard n holds samples n*S .. n*S+S-1. Nothing here holds more than one shard's rows, so a sweep of millions of samples
is planned, split over a job array and resumed without ever being expanded.

Pure but for read_rows (the shard's rows from the prompt file) and torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

from hpcrender.config import Job, Sweep, derive_seed
from hpcrender.prompts import Row, find_names, read_rows

SHARD_PATTERN = "shard-*.tar"
INDEX_FILE = "index.jsonl"
SWEEP_FILE = "sweep.json"


def shard_name(n: int) -> str:
    return f"shard-{n:06d}.tar"


def shard_count(samples: int, shard_size: int) -> int:
    return -(-samples // shard_size)


def shard_samples(sweep: Sweep, n: int) -> range:
    """The samples of shard n (the last one may be short)."""
    start = n * sweep.shard_size
    return range(start, min(start + sweep.shard_size, sweep.samples))


def array_shards(shards: int, array: tuple[int, int] | None) -> range:
    """The shards a job array's task renders: shard n when n % COUNT == INDEX, as jobs are shared."""
    if array is None:
        return range(shards)
    index, count = array
    return range(index, shards, count)


def sample_name(sweep: Sweep, i: int, row: Row) -> str:
    """NAME-0000042, or the row's name (with the seed's number after it when a row has several samples)."""
    if row.name is not None:
        return row.name if sweep.per_prompt == 1 else f"{row.name}-{i % sweep.per_prompt}"
    return f"{sweep.name}-{i:07d}"


def sample_seed(sweep: Sweep, i: int, row: Row, name: str) -> int:
    """The row's own seed counted on, else the sweep's seeds, else its `seed` counted on, else one from the name."""
    j = i % sweep.per_prompt
    if row.seed is not None:
        return row.seed + j
    if sweep.seeds is not None:
        return sweep.seeds[j]
    if sweep.seed_given:
        return sweep.template.seed + j
    return derive_seed(name)


def sample_job(sweep: Sweep, i: int, row: Row) -> Job:
    """Sample i as a job of its own: what renders it as a batch of one, and what `--only SAMPLE` renders."""
    name = sample_name(sweep, i, row)
    fields = {"name": name, "prompt": row.prompt, "seed": sample_seed(sweep, i, row, name)}
    if row.negative_prompt is not None:
        fields["negative_prompt"] = row.negative_prompt
    if row.guidance_scale is not None:
        fields["guidance_scale"] = row.guidance_scale
    return dataclasses.replace(sweep.template, **fields)


def sample_jobs(sweep: Sweep, samples: range) -> list[Job]:
    """The jobs of consecutive samples, their rows read once."""
    if not samples:
        return []
    k = sweep.per_prompt
    first_row, last_row = samples.start // k, (samples.stop - 1) // k
    rows = read_rows(sweep.source, first_row, last_row + 1)
    return [sample_job(sweep, i, rows[i // k - first_row]) for i in samples]


def batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Consecutive samples in batches of at most `size` that one denoiser call can take: the same guidance scale (a
    row may give its own) and so the same batch layout."""
    out: list[list[Job]] = []
    for job in jobs:
        if out and len(out[-1]) < size and out[-1][0].guidance_scale == job.guidance_scale:
            out[-1].append(job)
        else:
            out.append([job])
    return out


_NUMBERED = re.compile(r"^(?P<sweep>.+)-(?P<i>[0-9]{7,})$")


def find_samples(sweep: Sweep, names: set[str]) -> dict[str, int]:
    """The sample index of each of `names` that is one of the sweep's: NAME-0000042, or a name from its file's name
    column (with -J after it when rows have several samples)."""
    found: dict[str, int] = {}
    for name in names:
        m = _NUMBERED.match(name)
        if m and m["sweep"] == sweep.name and int(m["i"]) < sweep.samples:
            found[name] = int(m["i"])
    rest = names - set(found)
    if not rest:
        return found
    k = sweep.per_prompt
    wanted: dict[str, tuple[str, int]] = {}
    for name in rest:
        if k == 1:
            wanted[name] = (name, 0)
        else:
            base, _, j = name.rpartition("-")
            if base and j.isdigit() and int(j) < k:
                wanted[name] = (base, int(j))
    rows = find_names(sweep.source, {base for base, _ in wanted.values()})
    for name, (base, j) in wanted.items():
        if base in rows:
            found[name] = rows[base] * k + j
    return found


def sweep_hash(sweep: Sweep) -> str:
    """What makes a sweep's shards: its template's parameters, its prompts' content, seeds, batches and shards. A
    store of shards written under another hash is not resumed."""
    seeds = sweep.seeds
    if isinstance(seeds, range):
        seeds = {"start": seeds.start, "count": len(seeds)}
    elif seeds is not None:
        seeds = list(seeds)
    blob = json.dumps({"template": sweep.template.params_hash(), "prompts": sweep.source.sha256,
                       "rows": sweep.source.rows, "seeds": seeds, "images_per_prompt": sweep.images_per_prompt,
                       "seed_given": sweep.seed_given, "batch": sweep.batch, "shard_size": sweep.shard_size},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sweep_words(sweep: Sweep) -> str:
    """What `validate` and `plan` say of a sweep: how many samples from what, in which shards."""
    t = sweep.template
    rows = f"{sweep.source.rows} prompt(s) x {sweep.per_prompt} seed(s)"
    shards = shard_count(sweep.samples, sweep.shard_size)
    return (f"{sweep.samples} sample(s) ({rows}) in {shards} shard(s) of {sweep.shard_size}, batch {sweep.batch}, "
            f"{t.width}x{t.height}, {t.steps} steps, {t.scheduler.value}, {t.model}")
