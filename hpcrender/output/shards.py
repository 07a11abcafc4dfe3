"""A sweep's samples as WebDataset shards: OUT/NAME/shard-NNNNNN.tar, each sample KEY.png and KEY.json, consecutive
members; index.jsonl beside them names each sample's shard. One file per S samples instead of a folder of four per
image, and no fsync per image: the shard is written under a temporary name and renamed once it is complete, so a
shard that exists is whole, and a killed run leaves only shards to render again.

The members' headers are fixed (mode, owner, time), so a sample's bytes depend only on the sample.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from hpcrender.output import files

# PNG as diffusers' users save it (PIL's defaults), so that encoding costs what it costs them.
PNG_OPTIONS: dict = {}
MEMBER_MODE = 0o644


def png_bytes(image) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", **PNG_OPTIONS)
    return buffer.getvalue()


def sample_record(job, params_hash: str) -> dict:
    """KEY.json: what made the sample, enough to render it again alone."""
    return {"key": job.name, "prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed,
            "model": job.model, "sampler": job.scheduler.value,
            "timestep_spacing": job.timestep_spacing.value if job.timestep_spacing is not None else None,
            "steps": job.steps, "guidance_scale": job.guidance_scale, "width": job.width, "height": job.height,
            "dtype": job.dtype.value, "loras": [{"sha256": lora.sha256, "scale": lora.scale} for lora in job.loras],
            "params_hash": params_hash}


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = MEMBER_MODE
    info.mtime = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, bytes, dict]]) -> None:
    """The shard at `path`, whole or not at all: (key, PNG bytes, record) per sample, in order."""
    with files.atomic_path(path) as tmp:
        with tarfile.open(tmp, "x", format=tarfile.USTAR_FORMAT) as tar:
            for key, png, record in samples:
                _member(tar, f"{key}.png", png)
                _member(tar, f"{key}.json", (json.dumps(record, sort_keys=True) + "\n").encode())


def read_shard(path: str | os.PathLike) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of a shard's samples, in the shard's order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def done_shards(folder: Path) -> set[int]:
    """The numbers of the complete shards in a sweep's folder (a temporary name is not a shard)."""
    done = set()
    if folder.is_dir():
        for entry in os.scandir(folder):
            name = entry.name
            if name.startswith("shard-") and name.endswith(".tar") and name[6:-4].isdigit():
                done.add(int(name[6:-4]))
    return done


def write_index(path: str | os.PathLike, lines: Iterable[dict]) -> None:
    """index.jsonl: one JSON object a line, written whole or not at all."""
    with files.atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
