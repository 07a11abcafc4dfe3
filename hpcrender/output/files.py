"""Writing files so that a kill at any moment leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` to write to; on success it is fsynced and renamed onto `path`, and the folder
    is fsynced so that the rename itself survives a crash of the node."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per writer (pid + random) so concurrent writers never share a temporary file; created by the
    # caller rather than mkstemp so the file gets the user's umask, not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, f"{path}: {e.strerror}") from e  # a full disk says which file it stopped
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Have `write` create the file at the temporary path it is given; see atomic_path."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any, default: Callable[[Any], Any] | None = None) -> None:
    """JSON (indented, newline-terminated), written with atomic_path."""
    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=default)
        fh.write("\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some file systems refuse fsync on a folder; the file itself must be synced
            raise
    finally:
        os.close(fd)
