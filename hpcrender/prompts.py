"""Prompt files of a sweep: `.txt` (a prompt a line), `.csv` (a header row naming the columns) or `.jsonl` (an object
a line). Scanned once, row by row, when the manifest is read: every problem is a `FILE:LINE: column: problem` line,
and what is kept is a row count, a content hash and the byte offset of every `stride`-th row - a ten-million-row file
is never held in memory. read_rows reads a shard's rows again from those offsets.

Torch-free: `hpcrender validate` reads it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from hpcrender.config import PromptSource

FORMATS = {".txt": "txt", ".csv": "csv", ".jsonl": "jsonl"}
# Columns a row may give; each but the prompt replaces the sweep's own setting for that row's samples.
COLUMNS = ("prompt", "negative_prompt", "seed", "name", "guidance_scale")
STRIDE = 1024
# Problems reported per file before the rest are only counted: a wrong file would otherwise print a line per row.
MAX_PROBLEMS = 20
MAX_SEED = 2**63 - 1
# A sample's key in a shard: WebDataset splits a member's name at its first dot, so a key has none.
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class Row(NamedTuple):
    """One prompt row; None where the row does not give the column."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    name: str | None = None
    guidance_scale: float | None = None


class PromptFileError(Exception):
    """Every problem of a prompt file, one `FILE:LINE: column: problem` line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Bad(Exception):
    """One cell's problem: (column, message)."""

    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column = column


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "an array"
    return repr(value) if isinstance(value, str) else str(value)


def _seed(value: object, text: bool) -> int:
    if text and isinstance(value, str):  # a CSV cell
        text = value.strip()
        if not re.fullmatch(r"[0-9]+", text):
            raise _Bad("seed", f"must be an integer from 0 to {MAX_SEED}, got {_show(value)}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise _Bad("seed", f"must be an integer from 0 to {MAX_SEED}, got {_show(value)}")
    return value


def _guidance(value: object, text: bool) -> float:
    if text and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Bad("guidance_scale", f"must be a number >= 0, got {_show(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _Bad("guidance_scale", f"must be a number >= 0, got {_show(value)}")
    return float(value)


def _text(column: str, value: object) -> str:
    if not isinstance(value, str):
        raise _Bad(column, f"must be a string, got {_show(value)}")
    return value


def _key(value: object) -> str:
    name = _text("name", value)
    if not _KEY_RE.match(name):
        raise _Bad("name", f"must use only letters, digits, '_' and '-' (a shard member's key has no dot), got "
                           f"{_show(name)}")
    return name


def make_row(cells: dict, text: bool = False) -> Row:
    """A row from its cells by column: CSV's (`text`: strings, a number written as one; empty cells absent) or
    JSONL's (JSON values, a seed a JSON integer); raises _Bad."""
    unknown = [c for c in cells if c not in COLUMNS]
    if unknown:
        raise _Bad(unknown[0], f"unknown column (known: {', '.join(COLUMNS)})")
    if "prompt" not in cells:
        raise _Bad("prompt", "missing (every row needs a prompt)")
    return Row(
        prompt=_text("prompt", cells["prompt"]),
        negative_prompt=_text("negative_prompt", cells["negative_prompt"]) if "negative_prompt" in cells else None,
        seed=_seed(cells["seed"], text) if "seed" in cells else None,
        name=_key(cells["name"]) if "name" in cells else None,
        guidance_scale=_guidance(cells["guidance_scale"], text) if "guidance_scale" in cells else None,
    )


# --- reading a file row by row, with each row's line and byte offset ------------------------------------------


class _Lines:
    """A binary file's lines decoded, with the byte offset and the number of the next line to be read."""

    def __init__(self, fh, offset: int, lineno: int, digest=None):
        self._fh = fh
        self.offset = offset
        self.lineno = lineno  # of the line the next next() returns
        self._digest = digest

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self._fh.readline()
        if not raw:
            raise StopIteration
        if self._digest is not None:
            self._digest.update(raw)
        if self.offset == 0 and raw.startswith(b"\xef\xbb\xbf"):
            text = raw[3:].decode("utf-8")
        else:
            text = raw.decode("utf-8")
        self.offset += len(raw)
        self.lineno += 1
        return text


def _records(fmt: str, lines: _Lines, columns: tuple[str, ...] | None) -> Iterator[tuple[int, int, dict | str]]:
    """(byte offset, line, cells) of each row from where `lines` stands; cells is a problem's text for a row that
    cannot be parsed at all. Blank lines (txt, jsonl) are no rows."""
    if fmt == "csv":
        reader = csv.reader(lines, strict=True)
        while True:
            offset, line = lines.offset, lines.lineno
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield offset, line, f"not a CSV row: {error}"
                return  # a broken quote leaves the rest of the file unreadable
            if not values:  # a blank line
                continue
            if len(values) != len(columns):
                yield offset, line, f"{len(values)} cells where the header names {len(columns)} columns"
                continue
            yield offset, line, {c: v for c, v in zip(columns, values) if v != "" or c == "prompt"}
        return
    while True:
        offset, line = lines.offset, lines.lineno
        try:
            text = next(lines)
        except StopIteration:
            return
        except UnicodeDecodeError:
            yield offset, line, "not UTF-8 text"
            continue
        body = text.rstrip("\r\n")
        if not body.strip():
            continue
        if fmt == "txt":
            yield offset, line, {"prompt": body}
            continue
        try:
            cells = json.loads(body)
        except ValueError as error:
            yield offset, line, f"not a JSON object: {error}"
            continue
        if not isinstance(cells, dict):
            yield offset, line, f"must be a JSON object, got {_show(cells)}"
            continue
        yield offset, line, cells


def _csv_header(lines: _Lines, shown: str) -> tuple[str, ...]:
    try:
        header = next(csv.reader(lines, strict=True))
    except StopIteration:
        raise PromptFileError([f"{shown}:1: prompt: missing (the file is empty; its first row names the columns)"])
    except (csv.Error, UnicodeDecodeError) as error:
        raise PromptFileError([f"{shown}:1: header: not a CSV row: {error}"]) from None
    columns = tuple(c.strip() for c in header)
    problems = [f"{shown}:1: {c or '(empty)'}: unknown column (known: {', '.join(COLUMNS)})"
                for c in columns if c not in COLUMNS]
    problems += [f"{shown}:1: {c}: named twice" for i, c in enumerate(columns) if c in columns[:i]]
    if "prompt" not in columns:
        problems.append(f"{shown}:1: prompt: missing column (the header names {', '.join(columns) or 'none'})")
    if problems:
        raise PromptFileError(problems)
    return columns


def scan(path: Path, shown: str, stride: int = STRIDE) -> tuple[PromptSource, list[str]]:
    """Read every row of a prompt file once: its source (count, hash, offsets) and its problems (names given twice
    included). Raises PromptFileError for a file that cannot be read at all."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PromptFileError([f"{shown}: must be a .txt, .csv or .jsonl file"])
    problems: list[str] = []
    more = 0
    names: dict[str, int] = {}
    offsets: list[int] = []
    rows = 0
    digest = hashlib.sha256()
    try:
        fh = open(path, "rb")
    except OSError as error:
        raise PromptFileError([f"{shown}: cannot read: {error.strerror or error}"]) from None
    with fh:
        lines = _Lines(fh, 0, 1, digest)
        columns = _csv_header(lines, shown) if fmt == "csv" else ("prompt",) if fmt == "txt" else COLUMNS
        for offset, line, cells in _records(fmt, lines, columns):
            problem = None
            if isinstance(cells, str):
                problem = f"{shown}:{line}: row: {cells}"
            else:
                try:
                    row = make_row(cells, fmt == "csv")
                except _Bad as bad:
                    problem = f"{shown}:{line}: {bad.column}: {bad}"
                else:
                    if row.name is not None:
                        if row.name in names:
                            problem = f"{shown}:{line}: name: {row.name!r} is given twice (first on line " \
                                      f"{names[row.name]})"
                        else:
                            names[row.name] = line
            if problem is not None:
                if len(problems) < MAX_PROBLEMS:
                    problems.append(problem)
                else:
                    more += 1
                continue
            if rows % stride == 0:
                offsets.append(offset)
            rows += 1
        digest.update(fh.read())  # nothing left after the last row, but a hash of the whole file all the same
    if more:
        problems.append(f"{shown}: and {more} more problem(s)")
    if not rows and not problems:
        problems.append(f"{shown}:1: prompt: no rows (the file holds no prompt)")
    return PromptSource(format=fmt, shown=shown, path=str(path), sha256=digest.hexdigest(), rows=rows,
                        columns=columns, offsets=tuple(offsets), stride=stride), problems


def inline_source(prompts: tuple[str, ...], shown: str) -> PromptSource:
    """`prompts = [...]` in the manifest: the rows are the strings."""
    digest = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()
    return PromptSource(format="inline", shown=shown, sha256=digest, rows=len(prompts), inline=tuple(prompts))


def read_rows(source: PromptSource, start: int, stop: int) -> list[Row]:
    """Rows start..stop-1 of a scanned source (a file that has changed since: ValueError)."""
    stop = min(stop, source.rows)
    if start >= stop:
        return []
    if source.format == "inline":
        return [Row(prompt=p) for p in source.inline[start:stop]]
    first = start // source.stride
    out: list[Row] = []
    with open(source.path, "rb") as fh:
        fh.seek(source.offsets[first])
        lines = _Lines(fh, source.offsets[first], 0)
        index = first * source.stride
        for _, _, cells in _records(source.format, lines, source.columns):
            if isinstance(cells, str):
                raise ValueError(f"{source.shown}: changed since it was read ({cells})")
            try:
                row = make_row(cells, source.format == "csv")
            except _Bad as bad:
                raise ValueError(f"{source.shown}: changed since it was read ({bad.column}: {bad})") from None
            if index >= start:
                out.append(row)
            index += 1
            if index >= stop:
                break
    if len(out) != stop - start:
        raise ValueError(f"{source.shown}: changed since it was read (rows {start}..{stop - 1} not found)")
    return out


def find_names(source: PromptSource, wanted: set[str]) -> dict[str, int]:
    """The row index of each wanted name in a source's `name` column (those found)."""
    found: dict[str, int] = {}
    if source.format in ("inline", "txt") or "name" not in source.columns or not wanted:
        return found
    with open(source.path, "rb") as fh:
        lines = _Lines(fh, 0, 1)
        if source.format == "csv":
            next(csv.reader(lines, strict=True))
        index = 0
        for _, _, cells in _records(source.format, lines, source.columns):
            if isinstance(cells, str):
                continue
            name = cells.get("name")
            if name in wanted:
                found[name] = index
            try:
                make_row(cells, source.format == "csv")
            except _Bad:
                continue
            index += 1
    return found

