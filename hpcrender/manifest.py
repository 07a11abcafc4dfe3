"""Reads a TOML manifest into typed, validated jobs, and applies command-line overrides to them.

Every problem is collected and reported at once, one `FILE:LINE: key: problem` line each.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

from hpcrender.config import (
    ControlNetConfig, DType, GigapixelConfig, GroupNormMode, HaloMode, InitImage, Job, Lora, Manifest, Mode,
    ParallelConfig, SchedulerName, Sweep, SweepOutput, TimestepSpacing, derive_seed, first_step,
)
from hpcrender.errors import BadInput, ManifestError, ModelNotFound
from hpcrender.models.lora import LoraFileError, file_sha256, read_lora_keys
from hpcrender.models.reference import SourceKind, resolve, resolve_controlnet
from hpcrender.prompts import PromptFileError, inline_source, scan
from hpcrender.sweeps import find_samples, sample_jobs
from hpcrender.render.samplers import lcm_spacing_problem


DEFAULT_SIDE = 1024
MAX_SIDE = 65536
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
# Names a job directory may not take: they are OUT's own entries.
RESERVED_NAMES = frozenset({"logs", "status.json"})

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


# --- value checks: pure, raise _Invalid with the problem, return the typed value -----------------


class _Invalid(Exception):
    """One value's problem (without file, line or key)."""


def _show(value: object) -> str:
    """A value as the user wrote it, short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _as_int(value: object) -> int:
    # TOML booleans are Python ints; a `true` where a count is meant is a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"must be an integer, got {_show(value)}")
    return value


def _as_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise _Invalid(f"must be a finite number, got {_show(value)}")
    return float(value)


def _as_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_show(value)}")
    return value


def _as_str(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_show(value)}")
    return value


def _int_range(lo: int, hi: int | None) -> Callable[[object], int]:
    def check(value: object) -> int:
        n = _as_int(value)
        if n < lo or (hi is not None and n > hi):
            span = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
            raise _Invalid(f"must be an integer {span}, got {n}")
        return n

    return check


def _side(value: object) -> int:
    """An image or tile side in pixels: whole latent cells (8 px) and within TIFF's reach."""
    n = _as_int(value)
    if n <= 0 or n % 8:
        raise _Invalid(f"must be a positive multiple of 8, got {n}")
    if n > MAX_SIDE:
        raise _Invalid(f"must be at most {MAX_SIDE}, got {n}")
    return n


def _overlap(value: object) -> int:
    n = _as_int(value)
    if n < 0 or n % 8:
        raise _Invalid(f"must be a multiple of 8 that is >= 0, got {n}")
    return n


def _non_negative_float(value: object) -> float:
    x = _as_float(value)
    if x < 0:
        raise _Invalid(f"must be >= 0, got {_show(value)}")
    return x


def _strength(value: object) -> float:
    x = _as_float(value)
    if not 0 < x <= 1:
        raise _Invalid(f"must be in (0, 1], got {_show(value)}")
    return x


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")
_SECONDS_PER = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as "30s", "10m", "1h" or "1h30m" (hours, minutes, seconds in that order, each at
    most once); ValueError with the reason otherwise. A bare number is refused: seconds or minutes would be a guess."""
    compact = text.strip()
    parts = _DURATION_RE.findall(compact)
    units = [unit for _, unit in parts]
    if not parts or "".join(n + u for n, u in parts) != compact or units != sorted(set(units), key="hms".index):
        raise ValueError(f'must be a duration such as "30s", "10m", "1h" or "1h30m", got {text!r}')
    seconds = sum(float(n) * _SECONDS_PER[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"must be longer than 0 s, got {text!r}")
    return seconds


def _duration(value: object) -> float:
    if not isinstance(value, str):
        raise _Invalid(f'must be a duration string such as "30s", "10m" or "1h", got {_show(value)}')
    try:
        return parse_duration(value)
    except ValueError as error:
        raise _Invalid(str(error)) from None


def _choice(enum_cls) -> Callable[[object], object]:
    known = [member.value for member in enum_cls]

    def check(value: object):
        if not isinstance(value, str):
            raise _Invalid(f"must be one of {', '.join(known)}, got {_show(value)}")
        try:
            return enum_cls(value)
        except ValueError:
            raise _Invalid(
                f"must be one of {', '.join(known)}, got {_show(value)}{_did_you_mean(value, known)}"
            ) from None

    return check


def _job_name(value: object) -> str:
    name = _as_str(value)
    if not _NAME_RE.match(name):
        raise _Invalid(f"must use only letters, digits, '.', '_' and '-', got {_show(name)}")
    if name in (".", ".."):
        raise _Invalid(f"cannot be {_show(name)}")
    if name in RESERVED_NAMES:
        raise _Invalid(f"{_show(name)} is reserved for the output folder's own files")
    return name


def _check_model(value: object, base_dir: Path) -> str:
    """A model reference by models.reference's rules, local paths made absolute against `base_dir`."""
    ref = _as_str(value)
    try:
        spec = resolve(ref, base_dir)
    except ModelNotFound as e:
        raise _Invalid(str(e).removeprefix(f"model {ref!r}: ")) from None
    return spec.location if spec.kind in (SourceKind.FOLDER, SourceKind.SINGLE_FILE) else ref


# Formats an init_image may have (what Pillow reports); others are refused rather than half-supported.
INIT_IMAGE_FORMATS = ("PNG", "TIFF", "JPEG")


class _ImageFile(NamedTuple):
    path: str
    sha256: str


def _check_init_image(value: object, base_dir: Path) -> _ImageFile:
    """An img2img start image: a readable PNG, TIFF or JPEG file, relative paths from the manifest's folder.

    Decoded in full here, so that a truncated file is refused before anything is rendered; its content hash makes
    a changed image a changed job (params_hash)."""
    import io

    from PIL import Image, UnidentifiedImageError

    ref = _as_str(value)
    path = Path(os.path.normpath(base_dir / Path(ref).expanduser()))
    if not path.is_file():
        raise _Invalid(f"no such file: {path}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _Invalid(f"cannot read {path}: {error.strerror or error}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _Invalid(f"cannot read {path} as an image: {str(error).splitlines()[0] or type(error).__name__}") \
            from None
    if kind not in INIT_IMAGE_FORMATS:
        raise _Invalid(f"must be a {', '.join(INIT_IMAGE_FORMATS)} file, got {kind} ({path})")
    return _ImageFile(str(path), hashlib.sha256(data).hexdigest())


def _check_controlnet_model(value: object, base_dir: Path) -> str:
    """A ControlNet reference by models.reference's rules for them, a local folder made absolute."""
    ref = _as_str(value)
    try:
        spec = resolve_controlnet(ref, base_dir)
    except ModelNotFound as e:
        raise _Invalid(str(e).removeprefix(f"controlnet {ref!r}: ").removeprefix(f"model {ref!r}: ")) from None
    return spec.location if spec.kind is SourceKind.FOLDER else ref


def _fraction(value: object) -> float:
    x = _as_float(value)
    if not 0 <= x <= 1:
        raise _Invalid(f"must be in [0, 1], got {_show(value)}")
    return x


_Check = Callable[[object], object]

# Keys a job may set, and [defaults] too (except `name`); `model` is checked apart (needs the folder).
_SETTINGS: dict[str, _Check] = {
    "prompt": _as_str,
    "negative_prompt": _as_str,
    "width": _side,
    "height": _side,
    "seed": _int_range(0, MAX_SEED),
    "steps": _int_range(1, MAX_STEPS),
    "guidance_scale": _non_negative_float,
    "scheduler": _choice(SchedulerName),
    "timestep_spacing": _choice(TimestepSpacing),
    "dtype": _choice(DType),
    "strength": _strength,
    "checkpoint_every": _duration,
}
_MODEL_KEY = "model"
_INIT_IMAGE_KEY = "init_image"
_LORAS_KEY = "loras"
_LORA_KEYS = ("path", "scale")
_NAME_KEY = "name"
_PARALLEL: dict[str, _Check] = {
    "mode": _choice(Mode),
    "warmup_steps": _int_range(0, None),
    "groupnorm": _choice(GroupNormMode),
    "halo": _choice(HaloMode),
    "split_cfg": _as_bool,
    "ranks_per_image": _int_range(0, None),
    "pipeline_patches": _int_range(0, None),
}
_GIGAPIXEL: dict[str, _Check] = {
    "base": _side,
    "tile": _side,
    "overlap": _overlap,
    "strength": _strength,
}
_CONTROLNET_KEY = "controlnet"
# A ControlNet's table: model and image are needed, the others default as diffusers' ControlNet pipelines' do.
_CONTROLNET: dict[str, _Check] = {
    "scale": _non_negative_float,
    "start": _fraction,
    "end": _fraction,
}
_CONTROLNET_NEEDED = ("model", "image")
_TABLES = ("parallel", "gigapixel")
_TOP_KEYS = ("defaults", "jobs", "sweeps")
# Keys of a [[sweeps]] table besides the job keys its samples share.
_SWEEP_KEYS = ("prompts", "prompts_file", "seeds", "images_per_prompt", "batch", "shard_size", "output")
MAX_BATCH = 4096


# --- line locator: tomllib keeps no positions, so the text is scanned for headers and keys ------

_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r"\"(?:[^\"\\]|\\.)*\"|'[^']*'"
_KEY = rf"(?:{_BARE}|{_QUOTED})"
_DOTTED = rf"{_KEY}(?:[ \t]*\.[ \t]*{_KEY})*"
_HEADER_RE = re.compile(rf"[ \t]*(\[\[?)[ \t]*({_DOTTED})[ \t]*\]")
_KEYVAL_RE = re.compile(rf"[ \t]*({_DOTTED})[ \t]*=")
_KEY_PART_RE = re.compile(_KEY)


def _key_parts(dotted: str) -> tuple[str, ...]:
    parts = []
    for raw in _KEY_PART_RE.findall(dotted):
        if raw.startswith('"'):
            try:
                raw = json.loads(raw)
            except ValueError:  # a TOML escape JSON lacks; close enough for locating
                raw = raw[1:-1]
        elif raw.startswith("'"):
            raw = raw[1:-1]
        parts.append(raw)
    return tuple(parts)


@dataclass
class _ValueScan:
    """Where the scan stands inside a value that may span lines (multi-line string, array)."""

    string_end: str | None = None  # the closing `\"\"\"` or `'''` while inside a multi-line string
    # One entry per open `[` or `{`: an inline table's key path, or an array's [key path, index of the element
    # being read]; None where the path is not located (arrays in arrays).
    stack: list = dataclasses.field(default_factory=list)
    last_key: tuple | None = None

    @property
    def busy(self) -> bool:
        return self.string_end is not None or bool(self.stack)


class _Locator:
    """Line of a (table, key) path such as ("jobs", 2, "parallel", "mode"); array tables count from 0."""

    def __init__(self, text: str):
        self._lines: dict[tuple, int] = {}
        self._array_index: dict[tuple, int] = {}
        table: tuple = ()
        scan = _ValueScan()
        for lineno, line in enumerate(text.split("\n"), 1):
            if scan.busy:
                self._scan_value(line, 0, lineno, scan)
                continue
            header = _HEADER_RE.match(line)
            if header:
                table = self._header(header.group(1) == "[[", _key_parts(header.group(2)), lineno)
                continue
            keyval = _KEYVAL_RE.match(line)
            if keyval:
                path = table + _key_parts(keyval.group(1))
                self._record(path, lineno)
                scan.last_key = path
                self._scan_value(line, keyval.end(), lineno, scan)

    def line(self, path: tuple) -> int:
        """The key's own line, else its nearest enclosing table's, else line 1."""
        for end in range(len(path), 0, -1):
            if path[:end] in self._lines:
                return self._lines[path[:end]]
        return 1

    def _record(self, path: tuple, lineno: int) -> None:
        self._lines[path] = lineno
        for end in range(1, len(path)):  # dotted keys open their tables implicitly
            self._lines.setdefault(path[:end], lineno)

    def _resolve(self, parts: tuple) -> tuple:
        path: tuple = ()
        for part in parts:
            path += (part,)
            if path in self._array_index:
                path += (self._array_index[path],)
        return path

    def _header(self, is_array: bool, parts: tuple, lineno: int) -> tuple:
        if not is_array:
            path = self._resolve(parts)
            self._record(path, lineno)
            return path
        array = self._resolve(parts[:-1]) + parts[-1:]
        index = self._array_index.get(array, -1) + 1
        self._array_index[array] = index
        self._lines.setdefault(array, lineno)
        self._record(array + (index,), lineno)
        return array + (index,)

    def _scan_value(self, line: str, pos: int, lineno: int, scan: _ValueScan) -> None:
        i, n = pos, len(line)
        while i < n:
            if scan.string_end is not None:
                end = line.find(scan.string_end, i)
                if end < 0:
                    return
                i, scan.string_end = end + 3, None
                continue
            c = line[i]
            if c == "#":
                return
            if line.startswith('"""', i) or line.startswith("'''", i):
                scan.string_end, i = line[i : i + 3], i + 3
            elif c == '"':
                i += 1
                while i < n and line[i] != '"':
                    i += 2 if line[i] == "\\" else 1
                i += 1
            elif c == "'":
                end = line.find("'", i + 1)
                i = end + 1 if end >= 0 else n
            elif c == "[":
                scan.stack.append([self._element_path(scan), 0])
                i += 1
            elif c == "{":
                path = self._element_path(scan)
                if path is not None:
                    self._record(path, lineno)
                scan.stack.append(path)
                i = self._inline_key(line, i + 1, lineno, scan)
            elif c in "]}":
                if scan.stack:
                    scan.stack.pop()
                i += 1
            elif c == "," and scan.stack and isinstance(scan.stack[-1], list):
                scan.stack[-1][1] += 1
                i += 1
            elif c == "," and scan.stack and scan.stack[-1] is not None:
                i = self._inline_key(line, i + 1, lineno, scan)
            else:
                i += 1

    @staticmethod
    def _element_path(scan: _ValueScan) -> tuple | None:
        """The path of a value opened here: the key just read, or the next element of the array it is in."""
        if not scan.stack:
            return scan.last_key
        top = scan.stack[-1]
        if isinstance(top, list):
            return None if top[0] is None else top[0] + (top[1],)
        return scan.last_key

    def _inline_key(self, line: str, pos: int, lineno: int, scan: _ValueScan) -> int:
        table = scan.stack[-1]
        keyval = _KEYVAL_RE.match(line, pos)
        if table is None or isinstance(table, list) or not keyval:
            return pos
        path = table + _key_parts(keyval.group(1))
        self._record(path, lineno)
        scan.last_key = path
        return keyval.end()


# --- reading: raw TOML tables -> layers of checked values -> jobs ------------------------------


class _Value(NamedTuple):
    value: object  # the typed value, or _BROKEN when its check failed (already reported)
    path: tuple    # where it was written, for the locator


_BROKEN = object()


@dataclass
class _Layer:
    """The settings one table ([defaults] or one [[jobs]]) writes, checked but not yet merged."""

    path: tuple
    settings: dict[str, _Value] = dataclasses.field(default_factory=dict)
    parallel: dict[str, _Value] = dataclasses.field(default_factory=dict)
    gigapixel: dict[str, _Value] | None = None
    gigapixel_path: tuple | None = None
    controlnets: _Value | None = None  # a tuple of ControlNetConfig, or _BROKEN


class _Reader:
    """Collects every problem of one manifest while turning its tables into jobs."""

    def __init__(self, shown: str, text: str, base_dir: Path):
        self._shown = shown
        self._text = text
        self._lines: _Locator | None = None
        self._base_dir = base_dir
        self.problems: list[tuple[int, int, str]] = []  # (line, order, message) for sorting
        self._lora_files: dict[Path, str] = {}  # content hashes of the LoRA files read so far

    @property
    def _locator(self) -> _Locator:
        """Built on first use: a manifest without problems (or LoRAs) never needs its lines, and scanning 100,000
        tables for them costs as much as parsing them."""
        if self._lines is None:
            self._lines = _Locator(self._text)
        return self._lines

    def problem(self, path: tuple, label: str, message: str) -> None:
        line = self._locator.line(path)
        self.problems.append((line, len(self.problems), f"{self._shown}:{line}: {label}: {message}"))

    def read(self, doc: dict) -> tuple[tuple[Job, ...], tuple[Sweep, ...]]:
        for key, value in doc.items():
            if key not in _TOP_KEYS:
                self.problem((key,), key, _unknown(key, value, _TOP_KEYS, {}))

        defaults = _Layer(("defaults",))
        raw_defaults = doc.get("defaults", {})
        if isinstance(raw_defaults, dict):
            defaults = self._layer(raw_defaults, ("defaults",), "defaults", "[defaults]")
        else:
            self.problem(("defaults",), "defaults", f"must be a table, got {_show(raw_defaults)}")

        raw_jobs = doc.get("jobs", [])
        raw_sweeps = doc.get("sweeps", [])
        if not isinstance(raw_jobs, list):
            self.problem(("jobs",), "jobs", "must be an array of tables ([[jobs]])")
            raw_jobs = None
        elif not raw_jobs and not raw_sweeps:
            self.problem(("jobs",), "jobs", "no jobs: add at least one [[jobs]] or [[sweeps]] table")
        if not isinstance(raw_sweeps, list):
            self.problem(("sweeps",), "sweeps", "must be an array of tables ([[sweeps]])")
            raw_sweeps = []

        jobs = []
        first_use: dict[str, tuple] = {}  # name -> (its table's path, what it is called)
        for index, raw in enumerate(raw_jobs or []):
            path = ("jobs", index)
            label = f"jobs[#{index + 1}]"
            if not isinstance(raw, dict):
                self.problem(path, label, f"must be a table, got {_show(raw)}")
                continue
            name = self._name(raw, path, label, first_use, index)
            if name is not None:
                label = f"jobs[{name}]"
            layer = self._layer(raw, path, label, "[[jobs]]")
            job = self._job(name, defaults, layer, label)
            if job is not None:
                jobs.append(job)
        sweeps = []
        for index, raw in enumerate(raw_sweeps):
            sweep = self._sweep(raw, ("sweeps", index), defaults, first_use, index)
            if sweep is not None:
                sweeps.append(sweep)
        return tuple(jobs), tuple(sweeps)

    def _name(self, raw: dict, path: tuple, label: str, first_use: dict, index: int) -> str | None:
        if _NAME_KEY not in raw:
            self.problem(path + (_NAME_KEY,), f"{label}.name", "missing (every job needs a unique name)")
            return None
        try:
            name = _job_name(raw[_NAME_KEY])
        except _Invalid as invalid:
            self.problem(path + (_NAME_KEY,), f"{label}.name", str(invalid))
            return None
        if name in first_use:
            where, what = first_use[name]
            line = self._locator.line(where + (_NAME_KEY,))
            self.problem(
                path + (_NAME_KEY,),
                f"{label}.name",
                f"duplicate name {_show(name)}, already used by {what} (line {line})",
            )
            return None
        first_use[name] = (path, f"{'sweep' if path[0] == 'sweeps' else 'job'} #{index + 1}")
        return name

    def _sweep(self, raw: object, path: tuple, defaults: _Layer, first_use: dict, index: int) -> Sweep | None:
        """A [[sweeps]] table: its own keys checked here, the rest as a job's, merged over [defaults] into the
        template every sample is made from; its prompt file scanned row by row."""
        label = f"sweeps[#{index + 1}]"
        if not isinstance(raw, dict):
            self.problem(path, label, f"must be a table, got {_show(raw)}")
            return None
        name = self._name(raw, path, label, first_use, index)
        if name is not None:
            label = f"sweeps[{name}]"
            if "." in name:
                self.problem(path + (_NAME_KEY,), f"{label}.name", f"must have no '.' (its samples' keys in a shard "
                             f"are NAME-0000000, and WebDataset splits a key at its first dot), got {_show(name)}")
                name = None
        own = {key: raw[key] for key in _SWEEP_KEYS if key in raw}
        rest = {key: value for key, value in raw.items() if key not in _SWEEP_KEYS}
        ok = name is not None
        if "prompt" in rest:
            self.problem(path + ("prompt",), f"{label}.prompt", "a sweep's prompts are `prompts = [...]` or "
                         "`prompts_file` (one sample per prompt and seed)")
            rest.pop("prompt")
            ok = False
        if "gigapixel" in rest:
            self.problem(path + ("gigapixel",), f"{label}.gigapixel", "does not apply to a sweep: a gigapixel image "
                         "is a [[jobs]] table of its own")
            rest.pop("gigapixel")
            ok = False
        layer = self._layer(rest, path, label, "[[sweeps]]")
        layer.settings["prompt"] = _Value("", path)
        template = self._job(name or "sweep", defaults, layer, label)
        source = self._prompts(own, path, label)
        seeds, per_prompt = self._seeds(own, path, label)
        checks = {"batch": _int_range(1, MAX_BATCH), "shard_size": _int_range(1, None),
                  "output": _choice(SweepOutput)}
        values = {key: self._check(path + (key,), f"{label}.{key}", check, own[key])
                  for key, check in checks.items() if key in own}
        if template is None or source is None or seeds is _BROKEN or per_prompt is _BROKEN or                 any(v.value is _BROKEN for v in values.values()) or not ok:
            return None
        batch = values["batch"].value if "batch" in values else 1
        if batch > 1 and (template.init_image is not None or template.controlnets):
            key = _INIT_IMAGE_KEY if template.init_image is not None else _CONTROLNET_KEY
            self.problem(values["batch"].path, f"{label}.batch", f"must be 1 with {key}: its samples render one by "
                         "one")
            return None
        parallel = {**defaults.parallel, **layer.parallel}
        if "ranks_per_image" not in parallel:  # a sweep's samples render on one rank each unless told otherwise
            template = dataclasses.replace(template, parallel=dataclasses.replace(template.parallel,
                                                                                  ranks_per_image=1))
        seed_given = "seed" in defaults.settings or "seed" in layer.settings
        if not seed_given:
            template = dataclasses.replace(template, seed=derive_seed(name))
        return Sweep(name=name, template=template, source=source, seeds=seeds,
                     images_per_prompt=per_prompt, seed_given=seed_given, batch=batch,
                     shard_size=values["shard_size"].value if "shard_size" in values else 1000,
                     output=values["output"].value if "output" in values else SweepOutput.SHARDS)

    def _prompts(self, own: dict, path: tuple, label: str):
        """The sweep's PromptSource from `prompts` or `prompts_file` (exactly one), None after a problem."""
        if ("prompts" in own) == ("prompts_file" in own):
            both = "prompts" in own
            self.problem(path + ("prompts_file" if both else "prompts",), f"{label}.prompts",
                         "give `prompts = [...]` or `prompts_file`, not both" if both else
                         "missing: `prompts = [...]` or `prompts_file = \"FILE\"` (.txt, .csv or .jsonl)")
            return None
        if "prompts" in own:
            value, at = own["prompts"], path + ("prompts",)
            if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
                self.problem(at, f"{label}.prompts", f"must be a non-empty list of strings, got {_show(value)}")
                return None
            return inline_source(tuple(value), f"{self._shown}:{self._locator.line(at)}")
        value, at = own["prompts_file"], path + ("prompts_file",)
        if not isinstance(value, str):
            self.problem(at, f"{label}.prompts_file", f"must be a string, got {_show(value)}")
            return None
        file = Path(os.path.normpath(self._base_dir / Path(value).expanduser()))
        shown = os.path.normpath(os.path.join(os.path.dirname(self._shown), os.path.expanduser(value)))
        if not file.is_file():
            self.problem(at, f"{label}.prompts_file", f"no such file: {file}")
            return None
        line = self._locator.line(at)
        try:
            source, problems = scan(file, shown)
        except PromptFileError as error:
            problems, source = error.problems, None
        for message in problems:  # already FILE:LINE: column: problem; sorted with the key that named the file
            self.problems.append((line, len(self.problems), message))
        return None if problems else source

    def _seeds(self, own: dict, path: tuple, label: str):
        """(seeds, images_per_prompt): a list of seeds, or `{ start = S, count = N }`, or images_per_prompt alone."""
        if "seeds" in own and "images_per_prompt" in own:
            self.problem(path + ("images_per_prompt",), f"{label}.images_per_prompt", "give `seeds` or "
                         "`images_per_prompt`, not both (each prompt gets one sample per seed)")
            return _BROKEN, _BROKEN
        if "images_per_prompt" in own:
            n = self._check(path + ("images_per_prompt",), f"{label}.images_per_prompt", _int_range(1, None),
                            own["images_per_prompt"])
            return None, n.value
        if "seeds" not in own:
            return None, 1
        value, at, where = own["seeds"], path + ("seeds",), f"{label}.seeds"
        seed = _int_range(0, MAX_SEED)
        if isinstance(value, list):
            if not value:
                self.problem(at, where, "must not be empty")
                return _BROKEN, 1
            checked = [self._check(at + (i,), f"{where}[{i}]", seed, v) for i, v in enumerate(value)]
            if any(c.value is _BROKEN for c in checked):
                return _BROKEN, 1
            return tuple(c.value for c in checked), 1
        if isinstance(value, dict):
            unknown = [k for k in value if k not in ("start", "count")]
            for k in unknown:
                self.problem(at + (k,), f"{where}.{k}", _unknown(k, value[k], ("start", "count"), {}))
            if "count" not in value:
                self.problem(at, f"{where}.count", "missing (how many seeds from start)")
                return _BROKEN, 1
            start = self._check(at + ("start",), f"{where}.start", seed, value.get("start", 0))
            count = self._check(at + ("count",), f"{where}.count", _int_range(1, None), value["count"])
            if unknown or start.value is _BROKEN or count.value is _BROKEN:
                return _BROKEN, 1
            if start.value + count.value - 1 > MAX_SEED:
                self.problem(at, where, f"start + count - 1 must be at most {MAX_SEED}")
                return _BROKEN, 1
            return range(start.value, start.value + count.value), 1
        self.problem(at, where, f"must be a list of seeds or {{ start = 0, count = N }}, got {_show(value)}")
        return _BROKEN, 1

    def _layer(self, raw: dict, path: tuple, label: str, where: str) -> _Layer:
        is_job = path[0] != "defaults"
        layer = _Layer(path)
        for key, value in raw.items():
            key_path, key_label = path + (key,), f"{label}.{key}"
            if key == _NAME_KEY:
                if not is_job:
                    self.problem(key_path, key_label, "a name belongs to each [[jobs]] table, not to defaults")
            elif key == _MODEL_KEY:
                check_model = functools.partial(_check_model, base_dir=self._base_dir)
                layer.settings[key] = self._check(key_path, key_label, check_model, value)
            elif key == _INIT_IMAGE_KEY:
                check_image = functools.partial(_check_init_image, base_dir=self._base_dir)
                layer.settings[key] = self._check(key_path, key_label, check_image, value)
            elif key == _LORAS_KEY:
                layer.settings[key] = _Value(self._loras(value, key_path, key_label), key_path)
            elif key in _SETTINGS:
                layer.settings[key] = self._check(key_path, key_label, _SETTINGS[key], value)
            elif key == _CONTROLNET_KEY:
                layer.controlnets = self._controlnets(value, key_path, key_label)
            elif key in _TABLES:
                if not isinstance(value, dict):
                    self.problem(key_path, key_label, f"must be a table, got {_show(value)}")
                    continue
                checks = _PARALLEL if key == "parallel" else {
                    **_GIGAPIXEL, _CONTROLNET_KEY: functools.partial(_check_controlnet_model, base_dir=self._base_dir)}
                values = self._table(value, key_path, key_label, checks, where)
                if key == "parallel":
                    layer.parallel = values
                else:
                    layer.gigapixel, layer.gigapixel_path = values, key_path
            else:
                self.problem(key_path, key_label, _unknown_in_layer(key, value, path[0], is_job))
        return layer

    def _loras(self, raw: object, path: tuple, label: str):
        """`loras = [{ path = "style.safetensors", scale = 0.8 }, ...]`: each file a LoRA diffusers reads (its
        header is read here, the whole file hashed: a changed LoRA is a changed job); _BROKEN after a problem."""
        if not isinstance(raw, list):
            self.problem(path, label, f"must be a list of tables {{ path = ..., scale = ... }}, got {_show(raw)}")
            return _BROKEN
        loras, broken = [], False
        for i, entry in enumerate(raw):
            at, where = path + (i,), f"{label}[{i}]"
            if not isinstance(entry, dict):
                self.problem(at, where, f"must be a table {{ path = ..., scale = ... }}, got {_show(entry)}")
                broken = True
                continue
            for key, value in entry.items():
                if key not in _LORA_KEYS:
                    self.problem(at + (key,), f"{where}.{key}", _unknown(key, value, _LORA_KEYS, {}))
                    broken = True
            scale = self._check(at + ("scale",), f"{where}.scale", _as_float, entry.get("scale", 1.0))
            if "path" not in entry:
                self.problem(at, f"{where}.path", "missing (the LoRA's .safetensors file)")
                broken = True
                continue
            file = self._check(at + ("path",), f"{where}.path", self._lora_file, entry["path"])
            if file.value is _BROKEN or scale.value is _BROKEN:
                broken = True
                continue
            shown = f"{self._shown}:{self._locator.line(at + ('path',))}: {where}.path"
            loras.append(Lora(path=str(file.value), sha256=self._lora_files[file.value], scale=scale.value,
                              where=shown))
        return _BROKEN if broken else tuple(loras)

    def _lora_file(self, value: object) -> Path:
        path = Path(os.path.normpath(self._base_dir / Path(_as_str(value)).expanduser()))
        if path not in self._lora_files:
            try:
                read_lora_keys(path)
                self._lora_files[path] = file_sha256(path)
            except LoraFileError as error:
                raise _Invalid(str(error)) from None
            except OSError as error:
                raise _Invalid(f"cannot read {path}: {error.strerror or error}") from None
        return path

    def _controlnets(self, raw: object, path: tuple, label: str) -> _Value:
        """`controlnet`: one table or a list of them (an empty list: none, over a default); each needs a model and an
        image, and may set scale, start and end (start < end)."""
        if isinstance(raw, dict):
            tables = [(raw, path, label)]
        elif isinstance(raw, list):
            tables = [(item, path + (i,), f"{label}[{i}]") for i, item in enumerate(raw)]
        else:
            self.problem(path, label, f"must be a table {{ model = ..., image = ... }} or a list of them, got "
                         f"{_show(raw)}")
            return _Value(_BROKEN, path)
        controls, broken = [], False
        for table, where, name in tables:
            control = self._controlnet(table, where, name)
            broken |= control is None
            controls.append(control)
        return _Value(_BROKEN if broken else tuple(controls), path)

    def _controlnet(self, table: object, where: tuple, name: str) -> ControlNetConfig | None:
        """One ControlNet's table, None when it has a problem (reported)."""
        if not isinstance(table, dict):
            self.problem(where, name, f"must be a table {{ model = ..., image = ... }}, got {_show(table)}")
            return None
        checks = {"model": functools.partial(_check_controlnet_model, base_dir=self._base_dir),
                  "image": functools.partial(_check_init_image, base_dir=self._base_dir), **_CONTROLNET}
        values, ok = {}, True
        for key, value in table.items():
            key_path, key_label = where + (key,), f"{name}.{key}"
            if key in checks:
                values[key] = self._check(key_path, key_label, checks[key], value)
                ok &= values[key].value is not _BROKEN
            else:
                self.problem(key_path, key_label, _unknown(key, value, list(checks), {}))
                ok = False
        for key in _CONTROLNET_NEEDED:
            if key not in values:
                what = "a ControlNet reference" if key == "model" else "the conditioning image's file"
                self.problem(where, f"{name}.{key}", f"missing ({what})")
                ok = False
        if not ok:
            return None
        start = values["start"].value if "start" in values else 0.0
        end = values["end"].value if "end" in values else 1.0
        if start >= end:
            at = values.get("start", values.get("end"))
            self.problem(at.path, f"{name}.start", f"must be smaller than end ({end:g}), got {start:g}")
            return None
        image = values["image"].value
        return ControlNetConfig(model=values["model"].value, image=image.path, sha256=image.sha256,
                                **{k: values[k].value for k in _CONTROLNET if k in values})

    def _table(self, raw: dict, path: tuple, label: str, checks: Mapping[str, _Check], parent: str) -> dict:
        values = {}
        parent_keys = {key: parent for key in [*_SETTINGS, _MODEL_KEY, _INIT_IMAGE_KEY, _LORAS_KEY, _CONTROLNET_KEY]}
        for key, value in raw.items():
            key_path, key_label = path + (key,), f"{label}.{key}"
            if key in checks:
                values[key] = self._check(key_path, key_label, checks[key], value)
            else:
                self.problem(key_path, key_label, _unknown(key, value, list(checks), parent_keys))
        return values

    def _check(self, path: tuple, label: str, check: _Check, value: object) -> _Value:
        try:
            return _Value(check(value), path)
        except _Invalid as invalid:
            self.problem(path, label, str(invalid))
            return _Value(_BROKEN, path)

    def _job(self, name: str | None, defaults: _Layer, layer: _Layer, label: str) -> Job | None:
        """Merge defaults with the job key by key, run the checks that span keys, build the Job."""
        settings = {**defaults.settings, **layer.settings}
        parallel = {**defaults.parallel, **layer.parallel}
        gigapixel = None
        if defaults.gigapixel is not None or layer.gigapixel is not None:
            gigapixel = {**(defaults.gigapixel or {}), **(layer.gigapixel or {})}
        gigapixel_path = layer.gigapixel_path or defaults.gigapixel_path
        controlnets = layer.controlnets if layer.controlnets is not None else defaults.controlnets

        if "prompt" not in settings:
            self.problem(layer.path + ("prompt",), f"{label}.prompt", "missing (every job needs a prompt)")
        broken = name is None or "prompt" not in settings or any(
            v.value is _BROKEN for table in (settings, parallel, gigapixel or {}) for v in table.values()
        ) or (controlnets is not None and controlnets.value is _BROKEN)
        if gigapixel is not None:
            self._check_gigapixel(settings, gigapixel, gigapixel_path, label)
            every = settings.pop("checkpoint_every", None)  # from [defaults]: for the ordinary images only
            if every is not None and every.path[0] != "defaults":
                self.problem(every.path, f"{label}.checkpoint_every", "does not apply to a gigapixel job: its store "
                             "keeps every finished tile, and a rerun resumes from there")
                broken = True
        if gigapixel is not None and controlnets is not None and controlnets.value:
            if controlnets.path[0] != "defaults":
                self.problem(controlnets.path, f"{label}.controlnet", "does not apply to a gigapixel job (its tiles "
                             "are not conditioned on one image)")
                broken = True
            controlnets = None  # from [defaults]: for the ordinary images only
        broken |= not self._check_img2img(settings, layer.path, label)
        broken |= not self._check_sampler(settings, gigapixel is not None, label)
        if broken:
            return None

        fields = {key: v.value for key, v in settings.items()}
        image, strength = fields.pop(_INIT_IMAGE_KEY, None), fields.pop("strength", None)
        if image is not None:
            fields[_INIT_IMAGE_KEY] = InitImage(path=image.path, sha256=image.sha256, strength=strength)
        fields.setdefault("width", DEFAULT_SIDE)
        fields.setdefault("height", DEFAULT_SIDE)
        if "seed" not in fields:
            fields["seed"] = derive_seed(name)
        if controlnets is not None:
            fields["controlnets"] = controlnets.value
        return Job(
            name=name,
            parallel=ParallelConfig(**{key: v.value for key, v in parallel.items()}),
            gigapixel=(
                GigapixelConfig(**{key: v.value for key, v in gigapixel.items()})
                if gigapixel is not None
                else None
            ),
            **fields,
        )

    def _check_img2img(self, settings: dict, job_path: tuple, label: str) -> bool:
        """init_image and strength come together, and the strength leaves at least one step to run."""
        image, strength = settings.get(_INIT_IMAGE_KEY), settings.get("strength")
        if image is None and strength is None:
            return True
        if image is None:
            if strength.path[0] == "defaults":
                return True  # a default strength serves the jobs that give an init_image
            self.problem(strength.path, f"{label}.strength", "needs an init_image (img2img): without one every step "
                         "is run from noise")
            return False
        if strength is None:
            self.problem(image.path, f"{label}.init_image", "needs a strength in (0, 1]: how much of the schedule "
                         "is run again over the image")
            return False
        steps = settings["steps"].value if "steps" in settings else Job.__dataclass_fields__["steps"].default
        if strength.value is _BROKEN or steps is _BROKEN:
            return True  # reported already
        problem = _no_step_left(steps, strength.value)
        if problem:
            self.problem(strength.path, f"{label}.strength", problem)
            return False
        return True

    def _check_sampler(self, settings: dict, gigapixel: bool, label: str) -> bool:
        """What the sampler alone rules out, whatever the model: a timestep spacing for lcm (its timesteps are its
        own) and, in a gigapixel job, a sampler that draws noise in every step (its tiles' noise is keyed on their
        position; a step's would not be)."""
        name, spacing = settings.get("scheduler"), settings.get("timestep_spacing")
        if name is None or name.value is _BROKEN:
            return True
        ok = True
        if name.value is SchedulerName.LCM and spacing is not None and spacing.value is not _BROKEN:
            self.problem(spacing.path, f"{label}.timestep_spacing", lcm_spacing_problem(spacing.value))
            ok = False
        if gigapixel and name.value.stochastic:
            deterministic = ", ".join(n.value for n in SchedulerName if not n.stochastic)
            self.problem(name.path, f"{label}.scheduler", f"{name.value.value!r} draws noise in every step, which a "
                         f"gigapixel job's tiles would not share where they overlap: use one of {deterministic}")
            ok = False
        return ok

    def _check_gigapixel(self, settings: dict, gigapixel: dict, table_path: tuple, label: str) -> None:
        defaults = GigapixelConfig()

        def get(table: dict, key: str, default):
            value = table[key].value if key in table else default
            return None if value is _BROKEN else value

        tile, overlap = get(gigapixel, "tile", defaults.tile), get(gigapixel, "overlap", defaults.overlap)
        if tile is not None and overlap is not None and overlap >= tile:
            where = gigapixel.get("overlap", gigapixel.get("tile"))
            self.problem(
                where.path if where else table_path,
                f"{label}.gigapixel.overlap",
                f"must be smaller than the tile ({tile}), got {overlap}",
            )
        base = get(gigapixel, "base", defaults.base)
        width, height = get(settings, "width", DEFAULT_SIDE), get(settings, "height", DEFAULT_SIDE)
        if base is not None and width is not None and height is not None and base > max(width, height):
            where = gigapixel.get("base")
            self.problem(
                where.path if where else table_path,
                f"{label}.gigapixel.base",
                f"must be at most the image's longest side ({max(width, height)}), got {base}",
            )


def _no_step_left(steps: int, strength: float) -> str | None:
    """The problem when `strength` over `steps` runs no denoising step at all."""
    if first_step(steps, strength) < steps:
        return None
    return (f"{_show(strength)} with {steps} steps runs no denoising step: make it at least {math.ceil(1000 / steps) / 1000:g} "
            "or give the job more steps")


def _unknown_in_layer(key: str, value: object, table: str, is_job: bool) -> str:
    """_unknown for a key of [defaults] or a [[jobs]] table (`table`: the prefix of their sub-table headers)."""
    known = [*_SETTINGS, _MODEL_KEY, _INIT_IMAGE_KEY, _LORAS_KEY, _CONTROLNET_KEY, *_TABLES] + \
        ([_NAME_KEY] if is_job else [])
    table_of = {key: f"[{table}.parallel]" for key in _PARALLEL}
    table_of.update({key: f"[{table}.gigapixel]" for key in _GIGAPIXEL})
    return _unknown(key, value, known, table_of)


def _unknown(key: str, value: object, known: Sequence[str], table_of: Mapping[str, str]) -> str:
    kind = "table" if isinstance(value, dict) else "key"
    if key in table_of:
        return f"unknown {kind} ('{key}' belongs in {table_of[key]})"
    hint = _did_you_mean(key, known)
    return f"unknown {kind}{hint or ' (known: ' + ', '.join(known) + ')'}"


def _syntax_problem(shown: str, text: str, error: tomllib.TOMLDecodeError) -> str:
    message = str(error)
    line = getattr(error, "lineno", None)
    at = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if at:
        line = line or int(at.group(1))
        message = f"{message[: at.start()]} (column {at.group(2)})"
    elif message.endswith("(at end of document)"):
        line = line or text.rstrip().count("\n") + 1
        message = message[: -len("(at end of document)")].rstrip() + " (at the end of the file)"
    message = message[:1].lower() + message[1:]
    return f"{shown}:{line or 1}: syntax: {message}"


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Parse and check a manifest; raises ManifestError with every problem, BadInput if unreadable."""
    shown = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise BadInput(f"{shown}: cannot read manifest: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")  # tolerate the byte-order mark some editors write
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ManifestError([f"{shown}:{line}: syntax: not UTF-8 text"]) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ManifestError([_syntax_problem(shown, text, error)]) from None

    reader = _Reader(shown, text, Path(os.path.abspath(shown)).parent)
    jobs, sweeps = reader.read(doc)
    if reader.problems:
        raise ManifestError([message for _, _, message in sorted(reader.problems)])
    jobs, sweeps = _folders(shown, reader, jobs, sweeps)
    return Manifest(path=Path(path), jobs=jobs, sweeps=sweeps)


def _folders(shown: str, reader: _Reader, jobs: tuple, sweeps: tuple) -> tuple[tuple, tuple]:
    """Sweeps with `output = "folders"` as the jobs of their samples (each its own folder, as [[jobs]] are)."""
    if not any(s.output is SweepOutput.FOLDERS for s in sweeps):
        return jobs, sweeps
    names = {job.name for job in jobs} | {s.name for s in sweeps}
    jobs, kept = list(jobs), []
    for index, sweep in enumerate(sweeps):
        if sweep.output is SweepOutput.SHARDS:
            kept.append(sweep)
            continue
        for job in sample_jobs(sweep, range(sweep.samples)):
            if job.name in names or job.name in RESERVED_NAMES:
                line = reader._locator.line(("sweeps", index, "output"))
                raise ManifestError([f"{shown}:{line}: sweeps[{sweep.name}].output: sample {job.name!r} would be "
                                     "the folder of another job or sweep"])
            names.add(job.name)
            jobs.append(job)
    return tuple(jobs), tuple(kept)


def _override(option: str, check: _Check, value: object):
    try:
        return check(value)
    except _Invalid as invalid:
        raise BadInput(f"{option}: {invalid}") from None


def apply_overrides(
    manifest: Manifest,
    *,
    only: Sequence[str] = (),
    mode: Mode | None = None,
    ranks_per_image: int | None = None,
    warmup_steps: int | None = None,
    steps: int | None = None,
) -> Manifest:
    """The manifest as the command line narrows and overrides it; bad values raise BadInput.

    --only names jobs, sweeps, or samples of a sweep (NAME-0000042, or a name from its file): a sample is rendered
    as a job of its own, into its own folder."""
    jobs, sweeps = manifest.jobs, manifest.sweeps
    if only:
        names = [job.name for job in jobs] + [sweep.name for sweep in sweeps]
        wanted = set(only)
        rest = {name for name in wanted if name not in names}
        samples = []
        for sweep in sweeps:
            found = find_samples(sweep, rest)
            samples += [sample_jobs(sweep, range(i, i + 1))[0] for i in sorted(found.values())]
            rest -= set(found)
        missing = [name for name in dict.fromkeys(only) if name in rest]
        what = "job, sweep or sample" if sweeps else "job"
        if missing:
            raise BadInput(
                "--only: "
                + "; ".join(
                    f"no {what} named {_show(name)} in {manifest.path}{_did_you_mean(name, names)}"
                    for name in missing
                )
            )
        jobs = tuple(job for job in jobs if job.name in wanted) + tuple(samples)  # manifest order, not --only's
        sweeps = tuple(sweep for sweep in sweeps if sweep.name in wanted)

    parallel: dict[str, object] = {}
    if mode is not None:
        parallel["mode"] = _override("--mode", _choice(Mode), mode.value if isinstance(mode, Mode) else mode)
    if ranks_per_image is not None:
        parallel["ranks_per_image"] = _override("--ranks-per-image", _PARALLEL["ranks_per_image"], ranks_per_image)
    if warmup_steps is not None:
        parallel["warmup_steps"] = _override("--warmup-steps", _PARALLEL["warmup_steps"], warmup_steps)
    top: dict[str, object] = {}
    if steps is not None:
        top["steps"] = _override("--steps", _SETTINGS["steps"], steps)

    if parallel or top:  # a copy of each of 100,000 jobs costs seconds; without overrides they stay as they are
        replaced: dict[ParallelConfig, ParallelConfig] = {}  # the many jobs that share a parallel table share its copy

        def overridden(job: Job) -> Job:
            return dataclasses.replace(job, parallel=replaced.get(job.parallel) or replaced.setdefault(
                job.parallel, dataclasses.replace(job.parallel, **parallel)), **top)

        jobs = tuple(overridden(job) for job in jobs)
        sweeps = tuple(dataclasses.replace(sweep, template=overridden(sweep.template)) for sweep in sweeps)
    for job in jobs + tuple(sweep.template for sweep in sweeps):
        problem = job.init_image is not None and _no_step_left(job.steps, job.init_image.strength)
        if problem:
            raise BadInput(f"--steps: jobs[{job.name}].strength {problem}")
    return Manifest(path=manifest.path, jobs=jobs, sweeps=sweeps)
