"""The tile store: an RGB8 image in an HDF5 file, written tile by tile, that survives kills and resumes; and the
level store of a gigapixel render (LevelStore, below): every level's image and the patches composed into it.

Layout (format_version 1): dataset `image` uint8 (H, W, 3) chunked one chunk per tile, gzip level 1;
dataset `done` uint8 (rows, cols), 1 where a tile is finished; dataset `meta` holding a JSON object
(set_attrs); attributes `params_hash`, `format_version`, `tile`. The writer runs in SWMR mode and
flushes after every tile, so the file stays readable when the writer is killed. Files are in HDF5 1.10's format
(_LIBVER), which the HDF5 1.10-1.14 tools and libraries on clusters read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from hpcrender.errors import BadInput, HpcrenderError
from hpcrender.output.tiles import TileGrid

FORMAT_VERSION = 1
# Measured per 512 x 512 tile on one core: gzip 1 takes 4 ms (smooth) to 24 ms (noisy) and makes
# the file 6x (smooth) to 1.1x (noisy) smaller; level 6 costs twice as much for ~30 % more on smooth
# images. Either is noise beside a tile's render time; none (1 ms) would triple gigapixel files.
GZIP_LEVEL = 1
_META_CHUNK = 4096
# "best-effort": HDF5 locks where the file system can, and carries on where it cannot (Lustre
# mounts without flock).
_LOCKING: dict[str, Any] = (
    {"locking": "best-effort"} if h5py.version.hdf5_version_tuple >= (1, 12, 1) else {}
)
# Readers (SWMR) take no HDF5 lock at all: a reader that holds the file while the writer (re)opens it - `hpcrender
# status`, a viewer, the next level's readers - would make the writer's exclusive lock fail. Writers are kept apart
# by the store's own lock file (_hold_lock, _refuse_if_busy).
_READ_LOCKING: dict[str, Any] = {"locking": False} if _LOCKING else {}
_LOCK_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}
_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# The oldest format SWMR takes (superblock 3; "v108" refuses SWMR) and nothing newer: with "latest", HDF5 2.0 writes
# its gzip-chunked datasets with a version 5 layout message, which HDF5 1.10.8's h5dump and h5ls cannot decode
# ("bad version number for layout message"). Stores written that way still open, for reading and for resuming.
_LIBVER = ("v110", "v110")
# Refused flocks are tried again (_flock), 40 ms in all.
_LOCK_TRIES = 5
_LOCK_RETRY_S = 0.01

log = logging.getLogger(__name__)


class StoreBusy(HpcrenderError):
    """The store is held open for writing by a live process."""


class _StoreFile:
    """What both store layouts share: the JSON metadata, the write lock, closing, readable write errors."""

    _file: h5py.File
    _meta_ds: h5py.Dataset
    _lock_fd: int | None
    path: Path
    writable: bool

    # -- metadata ----------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        """The JSON metadata set with set_attrs (a copy)."""
        if not self.writable:
            self._meta_ds.refresh()
        return json.loads(self._meta_ds[...].tobytes().decode())

    def set_attrs(self, **kv: Any) -> None:
        """Merge JSON-able key/values into the store's metadata and flush."""
        self._check_writable()
        merged = self.attrs
        merged.update(kv)
        data = np.frombuffer(json.dumps(merged, sort_keys=True).encode(), np.uint8)
        with self._writing():
            self._meta_ds.resize(data.shape)
            self._meta_ds[...] = data
            self._file.flush()

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close; the file is closed and the lock released even when the flush fails (a full disk), so
        that the error reaches the caller instead of a half-open HDF5 file at interpreter exit."""
        try:
            if self._file.id.valid and self.writable:
                with self._writing():
                    self._file.flush()
        finally:
            try:
                if self._file.id.valid:
                    with self._writing():
                        self._file.close()
            finally:
                if self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing releases the flock
                    self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except OSError:
            if exc is None:
                raise  # otherwise the first failure (say, a full disk) is the one worth reporting

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """HDF5's write failures as one readable OSError naming the store (its own text spans lines)."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            found = re.search(r"errno = (\d+), error message = '([^']*)'", str(e))
            code, reason = (int(found[1]), found[2]) if found else (getattr(e, "errno", None), str(e).splitlines()[0])
            raise OSError(code, f"{self.path}: cannot write the tile store: {reason}") from e

    def _check_writable(self) -> None:
        if not self.writable:
            raise ValueError(f"{self.path}: store opened read-only")
        if not self._file.id.valid:
            raise ValueError(f"{self.path}: store is closed")


class TileStore(_StoreFile):
    """RGB8 image in an HDF5 file, written tile by tile; survives kills (SWMR, flush per tile) and resumes."""

    def __init__(self, file: h5py.File, path: Path, *, writable: bool, lock_fd: int | None = None):
        self._file = file
        self.path = path
        self.writable = writable
        self._lock_fd = lock_fd
        self._image = file["image"]
        self._done_ds = file["done"]
        self._meta_ds = file["meta"]
        height, width, _ = self._image.shape
        self.grid = TileGrid(height, width, int(file.attrs["tile"]))
        self.params_hash = str(file.attrs["params_hash"])
        self._done = np.asarray(self._done_ds[...], dtype=bool)

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        height: int,
        width: int,
        tile: int,
        params_hash: str,
        resume: bool = True,
    ) -> TileStore:
        """A store for writing: a new file, or the existing one with its finished tiles.

        An existing file is kept and reopened when its params_hash, shape and tile match and
        `resume` is set; otherwise it is moved aside to `NAME.<UTC stamp>.old` (never deleted)
        and a new file is started.
        """
        path = Path(path)
        grid = TileGrid(height, width, tile)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _refuse_if_busy(path)
            reason = _mismatch(path, grid, params_hash) if resume else "resume disabled"
            if reason is None:
                try:
                    return cls._reopen(path)
                except OSError as exc:
                    reason = f"cannot be reopened for writing ({exc})"
            _move_aside(path, reason)
        return cls._create(path, grid, params_hash)

    @classmethod
    def read(cls, path: str | os.PathLike) -> TileStore | LevelImage:
        """Open read-only (export, status); works while a writer is running or after it was killed.

        A gigapixel render's level store opens as its final level's image, which every reader takes alike."""
        path = Path(path)
        file = _open_for_reading(path)
        if _is_level_store(file):  # a gigapixel render's store: its final level is the image
            file.close()
            levels = LevelStore.read(path)
            return LevelImage(levels, len(levels.levels) - 1, owns=True)
        problem = _layout_problem(file)
        if problem is not None:
            file.close()
            raise BadInput(f"{path}: not an hpcrender tile store ({problem})")
        return cls(file, path, writable=False)

    @classmethod
    def _create(cls, path: Path, grid: TileGrid, params_hash: str) -> TileStore:
        file = h5py.File(path, "w", libver=_LIBVER, **_LOCKING)
        try:
            chunk = (min(grid.tile, grid.height), min(grid.tile, grid.width), 3)
            file.create_dataset(
                "image",
                shape=(grid.height, grid.width, 3),
                dtype=np.uint8,
                chunks=chunk,
                compression="gzip" if GZIP_LEVEL else None,
                compression_opts=GZIP_LEVEL or None,
            )
            # Allocated now (see LevelStore._create): a reader may refresh it while the first tile is written.
            file.create_dataset("done", data=np.zeros((grid.rows, grid.cols), np.uint8))
            # SWMR forbids creating attributes later: free-form metadata lives in a growable dataset.
            file.create_dataset(
                "meta", data=np.frombuffer(b"{}", np.uint8), maxshape=(None,), chunks=(_META_CHUNK,)
            )
            file.attrs["params_hash"] = params_hash
            file.attrs["format_version"] = FORMAT_VERSION
            file.attrs["tile"] = grid.tile
            file.swmr_mode = True
            file.flush()
            lock_fd = _hold_lock(path)
        except BaseException:
            file.close()
            raise
        return cls(file, path, writable=True, lock_fd=lock_fd)

    @classmethod
    def _reopen(cls, path: Path) -> TileStore:
        store = cls(**_reopen_for_writing(path), writable=True)
        log.info("%s: resuming, %d of %d tiles already done", path, int(store._done.sum()), len(store.grid))
        return store

    # -- tiles -------------------------------------------------------------------------------

    def write_tile(self, row: int, col: int, rgb: np.ndarray) -> None:
        """Write one finished tile (uint8, exactly the tile's box), mark it done, flush."""
        self._check_writable()
        y0, y1, x0, x1 = self.grid.box(row, col)
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.shape != (y1 - y0, x1 - x0, 3):
            got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise ValueError(f"tile ({row}, {col}) needs uint8 {(y1 - y0, x1 - x0, 3)}, got {got}")
        with self._writing():
            self._image[y0:y1, x0:x1] = rgb
            # Pixels reach the file before the done mark does: a kill between the two flushes
            # leaves a tile that is rendered again, never one marked done with missing pixels.
            self._file.flush()
            self._done_ds[row, col] = 1
            self._file.flush()
        self._done[row, col] = True

    def write_region(self, y0: int, x0: int, rgb: np.ndarray) -> None:
        """Write a region made of whole tiles (clipped at the image edge), tile by tile."""
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3:
            raise ValueError(f"region must be an (h, w, 3) array, got {getattr(rgb, 'shape', type(rgb))}")
        grid = self.grid
        y1, x1 = y0 + rgb.shape[0], x0 + rgb.shape[1]
        aligned = (
            y0 % grid.tile == 0
            and x0 % grid.tile == 0
            and (y1 % grid.tile == 0 or y1 == grid.height)
            and (x1 % grid.tile == 0 or x1 == grid.width)
            and 0 <= y0 < y1 <= grid.height
            and 0 <= x0 < x1 <= grid.width
        )
        if not aligned:
            raise ValueError(
                f"region y {y0}:{y1}, x {x0}:{x1} is not made of whole tiles of {grid.tile} "
                f"in a {grid.height}x{grid.width} image"
            )
        for row in range(y0 // grid.tile, -(-y1 // grid.tile)):
            for col in range(x0 // grid.tile, -(-x1 // grid.tile)):
                ty0, ty1, tx0, tx1 = grid.box(row, col)
                self.write_tile(row, col, rgb[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0])

    def is_done(self, row: int, col: int) -> bool:
        self.grid.box(row, col)  # bounds check
        self._refresh_done()
        return bool(self._done[row, col])

    def missing(self) -> list[tuple[int, int]]:
        """Tiles not finished yet, raster order."""
        self._refresh_done()
        return [(int(r), int(c)) for r, c in zip(*np.nonzero(~self._done))]

    def complete(self) -> bool:
        self._refresh_done()
        return bool(self._done.all())

    def read_region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels of the half-open box; tiles not written yet read as black."""
        if not (0 <= y0 < y1 <= self.grid.height and 0 <= x0 < x1 <= self.grid.width):
            raise ValueError(
                f"region y {y0}:{y1}, x {x0}:{x1} outside a {self.grid.height}x{self.grid.width} image"
            )
        return self._image[y0:y1, x0:x1]

    def refresh(self) -> None:
        """Read-only stores: see what a running writer has flushed since opening."""
        if not self.writable:
            for ds in (self._image, self._done_ds, self._meta_ds):
                ds.refresh()

    def _refresh_done(self) -> None:
        if not self.writable:
            self._done_ds.refresh()
            self._done = np.asarray(self._done_ds[...], dtype=bool)

    def __repr__(self) -> str:
        mode = "w" if self.writable else "r"
        g = self.grid
        return f"TileStore({str(self.path)!r}, {g.width}x{g.height}, tile {g.tile}, {mode})"


LEVELS_FORMAT_VERSION = 2
LEVELS_LAYOUT = "levels"


@dataclass(frozen=True)
class LevelShape:
    """One level of a level store: the image's size, its tile (chunk) side, and the slot a patch is stored in."""

    height: int
    width: int
    tile: int
    patch_height: int
    patch_width: int

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.height, self.width, self.tile)


class LevelStore(_StoreFile):
    """The images of every level of a gigapixel render, and the refined patches they are composed from.

    Layout (format_version 2, attribute `layout` = "levels"): per level a group `levels/K` with `image` uint8 (H, W, 3)
    chunked one chunk per tile; `patches` uint8 (rows, cols, ph, pw, 3), one chunk per patch; `boxes` int64
    (rows, cols, 4), each patch's box (y0, y1, x0, x1) in the level; `done` uint8 (rows, cols), 1 where a patch is
    stored; `composed` uint8 (rows, cols), 1 where the level image's tile is final. All datasets are made when the
    file is (SWMR allows no new ones later); HDF5 allocates their chunks only when written. One writer, SWMR, a flush
    after every patch and every composed tile.
    """

    def __init__(self, file: h5py.File, path: Path, *, writable: bool, lock_fd: int | None = None):
        self._file = file
        self.path = path
        self.writable = writable
        self._lock_fd = lock_fd
        self._meta_ds = file["meta"]
        self.params_hash = str(file.attrs["params_hash"])
        count = int(file.attrs["levels"])
        groups = [file[f"levels/{k}"] for k in range(count)]
        self.levels = tuple(_level_shape(g) for g in groups)
        # Each dataset opened once and held: a dataset object let go right after a write closes its HDF5 id, which
        # writes its cached chunks from a destructor, where a failure (a full disk) cannot raise; held, the chunks
        # reach the file at the next flush, inside _writing, whose error the caller sees.
        self._groups = [{name: g[name] for name in _LEVEL_DATASETS} for g in groups]
        self._done = [np.asarray(g["done"][...], dtype=bool) for g in self._groups]
        self._composed = [np.asarray(g["composed"][...], dtype=bool) for g in self._groups]

    @classmethod
    def open(cls, path: str | os.PathLike, *, levels: tuple[LevelShape, ...], params_hash: str,
             resume: bool = True) -> LevelStore:
        """A store for writing: a new file, or the existing one with its finished patches and levels.

        An existing file written for other parameters or levels is refused (BadInput) and left as it is; with
        resume=False it is moved aside to `NAME.<UTC stamp>.old` (never deleted) and a new file is started."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _refuse_if_busy(path)
            if not resume:
                _move_aside(path, "resume disabled")
            else:
                reason = _levels_mismatch(path, levels, params_hash)
                if reason is not None:
                    raise BadInput(f"{path}: a tile store {reason}; it is kept as it is: render into another "
                                   "--out, move it away, or render with --no-resume to set it aside")
                store = cls(**_reopen_for_writing(path), writable=True)
                log.info("%s: resuming, %d of %d patches already done", path,
                         sum(int(d.sum()) for d in store._done), sum(d.size for d in store._done))
                return store
        return cls._create(path, levels, params_hash)

    @classmethod
    def read(cls, path: str | os.PathLike) -> LevelStore:
        """Open read-only; works while the writer runs or after it was killed."""
        path = Path(path)
        file = _open_for_reading(path)
        problem = _levels_problem(file)
        if problem is not None:
            file.close()
            raise BadInput(f"{path}: not an hpcrender level store ({problem})")
        return cls(file, path, writable=False)

    @classmethod
    def _create(cls, path: Path, levels: tuple[LevelShape, ...], params_hash: str) -> LevelStore:
        if not levels:
            raise ValueError("a level store needs at least one level")
        file = h5py.File(path, "w", libver=_LIBVER, **_LOCKING)
        try:
            for k, shape in enumerate(levels):
                group = file.create_group(f"levels/{k}")
                grid = shape.grid
                group.create_dataset(
                    "image", shape=(shape.height, shape.width, 3), dtype=np.uint8,
                    chunks=(min(shape.tile, shape.height), min(shape.tile, shape.width), 3),
                    compression="gzip" if GZIP_LEVEL else None, compression_opts=GZIP_LEVEL or None)
                group.create_dataset(
                    "patches", shape=(grid.rows, grid.cols, shape.patch_height, shape.patch_width, 3),
                    dtype=np.uint8, chunks=(1, 1, shape.patch_height, shape.patch_width, 3),
                    compression="gzip" if GZIP_LEVEL else None, compression_opts=GZIP_LEVEL or None)
                # Written now, before SWMR starts: a contiguous dataset's storage is otherwise allocated at its
                # first write, which changes its header under a reader that is refreshing it.
                group.create_dataset("boxes", data=np.zeros((grid.rows, grid.cols, 4), np.int64))
                group.create_dataset("done", data=np.zeros((grid.rows, grid.cols), np.uint8))
                group.create_dataset("composed", data=np.zeros((grid.rows, grid.cols), np.uint8))
                group.attrs["tile"] = shape.tile
            file.create_dataset(
                "meta", data=np.frombuffer(b"{}", np.uint8), maxshape=(None,), chunks=(_META_CHUNK,))
            file.attrs["params_hash"] = params_hash
            file.attrs["format_version"] = LEVELS_FORMAT_VERSION
            file.attrs["layout"] = LEVELS_LAYOUT
            file.attrs["levels"] = len(levels)
            file.swmr_mode = True
            file.flush()
            lock_fd = _hold_lock(path)
        except BaseException:
            file.close()
            raise
        return cls(file, path, writable=True, lock_fd=lock_fd)

    # -- patches -----------------------------------------------------------------------------

    def write_patch(self, level: int, unit, patch) -> None:
        """Store a refined patch (`patch.box` (y0, y1, x0, x1), `patch.pixels` uint8) of tile (unit.row,
        unit.col), mark it done, flush: the pixels reach the file before the mark does."""
        self._check_writable()
        shape = self._shape(level)
        row, col = unit.row, unit.col
        shape.grid.box(row, col)  # bounds check
        y0, y1, x0, x1 = (int(v) for v in patch.box)
        pixels = patch.pixels
        h, w = y1 - y0, x1 - x0
        fits = 0 <= y0 < y1 <= shape.height and 0 <= x0 < x1 <= shape.width
        if not fits or h > shape.patch_height or w > shape.patch_width:
            raise ValueError(f"level {level} tile ({row}, {col}): box {patch.box} does not fit the level")
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape != (h, w, 3):
            raise ValueError(f"level {level} tile ({row}, {col}) needs uint8 {(h, w, 3)}, got "
                             f"{getattr(pixels, 'dtype', type(pixels).__name__)} {getattr(pixels, 'shape', '')}")
        slot = np.zeros((shape.patch_height, shape.patch_width, 3), np.uint8)
        slot[:h, :w] = pixels
        group = self._groups[level]
        with self._writing():
            group["patches"][row, col] = slot
            group["boxes"][row, col] = (y0, y1, x0, x1)
            self._file.flush()
            group["done"][row, col] = 1
            self._file.flush()
        self._done[level][row, col] = True

    def read_patch(self, level: int, row: int, col: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
        """(box, pixels) of a stored patch."""
        if not self.patch_done(level, row, col):
            raise ValueError(f"{self.path}: level {level} tile ({row}, {col}) has no patch yet")
        group = self._groups[level]
        y0, y1, x0, x1 = (int(v) for v in group["boxes"][row, col])
        return (y0, y1, x0, x1), group["patches"][row, col, : y1 - y0, : x1 - x0]

    def patch_done(self, level: int, row: int, col: int) -> bool:
        self._shape(level).grid.box(row, col)
        self._refresh(level)
        return bool(self._done[level][row, col])

    def missing_patches(self, level: int) -> list[tuple[int, int]]:
        """Tiles of a level without a stored patch, raster order."""
        self._shape(level)
        self._refresh(level)
        return [(int(r), int(c)) for r, c in zip(*np.nonzero(~self._done[level]))]

    # -- level images ------------------------------------------------------------------------

    def write_level_tile(self, level: int, row: int, col: int, rgb: np.ndarray) -> None:
        """Write one final tile of a level's image (exactly the tile's box), mark it composed, flush."""
        self._check_writable()
        grid = self._shape(level).grid
        y0, y1, x0, x1 = grid.box(row, col)
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.shape != (y1 - y0, x1 - x0, 3):
            got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise ValueError(f"level {level} tile ({row}, {col}) needs uint8 {(y1 - y0, x1 - x0, 3)}, got {got}")
        group = self._groups[level]
        with self._writing():
            group["image"][y0:y1, x0:x1] = rgb
            self._file.flush()
            group["composed"][row, col] = 1
            self._file.flush()
        self._composed[level][row, col] = True

    def is_composed(self, level: int, row: int, col: int) -> bool:
        self._shape(level).grid.box(row, col)
        self._refresh(level)
        return bool(self._composed[level][row, col])

    def level_complete(self, level: int) -> bool:
        """Every tile of the level's image is final."""
        self._shape(level)
        self._refresh(level)
        return bool(self._composed[level].all())

    def read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels of a box of a level's image; tiles not composed yet read as black."""
        shape = self._shape(level)
        if not (0 <= y0 < y1 <= shape.height and 0 <= x0 < x1 <= shape.width):
            raise ValueError(f"region y {y0}:{y1}, x {x0}:{x1} outside level {level} ({shape.height}x{shape.width})")
        return self._groups[level]["image"][y0:y1, x0:x1]

    def level(self, level: int) -> LevelImage:
        """One level's image as the exporters read a store."""
        self._shape(level)
        return LevelImage(self, level)

    def final(self) -> LevelImage:
        return self.level(len(self.levels) - 1)

    def refresh(self) -> None:
        if not self.writable:
            self._meta_ds.refresh()
            for k in range(len(self.levels)):
                self._refresh(k)
                self._groups[k]["image"].refresh()

    def _refresh(self, level: int) -> None:
        if not self.writable:
            group = self._groups[level]
            for name, into in (("done", self._done), ("composed", self._composed)):
                group[name].refresh()
                into[level] = np.asarray(group[name][...], dtype=bool)
            group["patches"].refresh()
            group["boxes"].refresh()

    def _shape(self, level: int) -> LevelShape:
        if not 0 <= level < len(self.levels):
            raise IndexError(f"level {level} outside the store's {len(self.levels)} levels")
        return self.levels[level]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s.width}x{s.height}" for s in self.levels)
        return f"LevelStore({str(self.path)!r}, levels {sizes}, {'w' if self.writable else 'r'})"


class LevelImage:
    """One level's image of a LevelStore, with the reading side of TileStore (grid, read_region, complete,
    missing), so that every exporter takes it as it takes a one-level store."""

    def __init__(self, store: LevelStore, level: int, *, owns: bool = False):
        self.store = store
        self.index = level
        shape = store.levels[level]
        self.grid = shape.grid
        self.path = store.path
        self.params_hash = store.params_hash
        self._owns = owns

    def read_region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.store.read_level(self.index, y0, y1, x0, x1)

    def complete(self) -> bool:
        return self.store.level_complete(self.index)

    def missing(self) -> list[tuple[int, int]]:
        self.store._refresh(self.index)
        return [(int(r), int(c)) for r, c in zip(*np.nonzero(~self.store._composed[self.index]))]

    def refresh(self) -> None:
        self.store.refresh()

    @property
    def attrs(self) -> dict:
        return self.store.attrs

    def close(self) -> None:
        if self._owns:
            self.store.close()

    def __enter__(self) -> LevelImage:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


_LEVEL_DATASETS = ("image", "patches", "boxes", "done", "composed")


def _level_shape(group: h5py.Group) -> LevelShape:
    height, width, _ = group["image"].shape
    _, _, ph, pw, _ = group["patches"].shape
    return LevelShape(int(height), int(width), int(group.attrs["tile"]), int(ph), int(pw))


def _levels_problem(file: h5py.File) -> str | None:
    for key in ("params_hash", "format_version", "layout", "levels"):
        if key not in file.attrs:
            return f"no attribute {key!r}"
    if str(file.attrs["layout"]) != LEVELS_LAYOUT or int(file.attrs["format_version"]) != LEVELS_FORMAT_VERSION:
        return f"layout {file.attrs['layout']!r} format_version {int(file.attrs['format_version'])}"
    if "meta" not in file:
        return "no dataset 'meta'"
    for k in range(int(file.attrs["levels"])):
        for name in ("image", "patches", "boxes", "done", "composed"):
            if f"levels/{k}/{name}" not in file:
                return f"no dataset 'levels/{k}/{name}'"
    return None


def _is_level_store(file: h5py.File) -> bool:
    return str(file.attrs.get("layout", "")) == LEVELS_LAYOUT


def _levels_mismatch(path: Path, levels: tuple[LevelShape, ...], params_hash: str) -> str | None:
    """Why the existing file cannot be resumed for these levels and parameters, or None when it can."""
    try:
        with h5py.File(path, "r", libver=_LIBVER, swmr=True, **_READ_LOCKING) as file:
            if not _is_level_store(file):
                return "of another kind (not a gigapixel level store)"
            problem = _levels_problem(file)
            if problem is not None:
                return f"that is damaged ({problem})"
            old_hash = str(file.attrs["params_hash"])
            if old_hash != params_hash:
                return f"written for other parameters (params_hash {old_hash}, this job {params_hash})"
            old = tuple(_level_shape(file[f"levels/{k}"]) for k in range(int(file.attrs["levels"])))
            if old != tuple(levels):
                return "written with other levels or tiles"
    except (OSError, KeyError, ValueError) as exc:
        return f"that cannot be read ({exc})"
    return None


# -- helpers ---------------------------------------------------------------------------------


def _layout_problem(file: h5py.File) -> str | None:
    for name in ("image", "done", "meta"):
        if name not in file:
            return f"no dataset {name!r}"
    for key in ("params_hash", "format_version", "tile"):
        if key not in file.attrs:
            return f"no attribute {key!r}"
    if int(file.attrs["format_version"]) != FORMAT_VERSION:
        return f"format_version {int(file.attrs['format_version'])}, expected {FORMAT_VERSION}"
    image = file["image"]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        return f"image is {image.dtype} {image.shape}, expected uint8 (H, W, 3)"
    grid = TileGrid(image.shape[0], image.shape[1], int(file.attrs["tile"]))
    if file["done"].shape != (grid.rows, grid.cols):
        return f"done is {file['done'].shape}, expected {(grid.rows, grid.cols)}"
    return None


def _mismatch(path: Path, grid: TileGrid, params_hash: str) -> str | None:
    """Why the existing file cannot be resumed for this job, or None when it can."""
    try:
        with h5py.File(path, "r", libver=_LIBVER, swmr=True, **_READ_LOCKING) as file:
            problem = _layout_problem(file)
            if problem is not None:
                return problem
            if str(file.attrs["params_hash"]) != params_hash:
                return "written for other parameters (params_hash differs)"
            height, width, _ = file["image"].shape
            old = TileGrid(height, width, int(file.attrs["tile"]))
            if old != grid:
                return f"written as {old}, now {grid}"
    except (OSError, KeyError, ValueError, BadInput) as exc:
        return f"unreadable ({exc})"
    return None


def _open_for_reading(path: Path) -> h5py.File:
    """A store's file opened read-only in SWMR mode (without an HDF5 lock); BadInput (one line) when there is none."""
    if not path.is_file():
        raise BadInput(f"{path}: no tile store there")
    try:
        return h5py.File(path, "r", libver=_LIBVER, swmr=True, **_READ_LOCKING)
    except OSError as exc:
        raise BadInput(f"{path}: not a readable HDF5 file ({exc})") from exc


def _reopen_for_writing(path: Path) -> dict:
    """An existing store's file opened for writing in SWMR mode, with its lock held: a store's constructor's
    arguments (file, path, lock_fd)."""
    # A writer that was killed leaves the superblock marked "open for writing"; HDF5 refuses to reopen such a file
    # until the mark is cleared (what `h5clear -s` does).
    _clear_status_flags(path)
    file = h5py.File(path, "r+", libver=_LIBVER, **_LOCKING)
    try:
        file.swmr_mode = True
        lock_fd = _hold_lock(path)
    except BaseException:
        file.close()
        raise
    return {"file": file, "path": path, "lock_fd": lock_fd}


def _move_aside(path: Path, reason: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.{stamp}.old")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{stamp}-{n}.old")
    os.replace(path, target)
    log.warning("%s: %s; moved aside to %s and starting a new store", path, reason, target.name)
    return target


def _hold_lock(path: Path) -> int | None:
    """Hold a shared flock for as long as the store is open for writing.

    HDF5 drops its own lock once SWMR starts; a shared lock still lets SWMR readers in, but an
    opener that asks for an exclusive one learns that a live writer holds the file.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        _flock(fd, fcntl.LOCK_SH)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _LOCK_UNSUPPORTED:
            return None
        raise StoreBusy(f"{path}: is being written by another process") from exc
    return fd


def _refuse_if_busy(path: Path) -> bool:
    """StoreBusy when a live writer holds the store; whether the probe could tell (False: no file locks here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno not in _LOCK_UNSUPPORTED:
            raise StoreBusy(
                f"{path}: is open in another process (a render still running into the same "
                "output directory?)"
            ) from exc
        return False
    finally:
        os.close(fd)  # also releases the probe lock
    return True


def _flock(fd: int, mode: int) -> None:
    """flock(mode | LOCK_NB), tried again for a moment when refused: another probe's exclusive lock (a second
    writer's, `hpcrender status`'s) lasts microseconds; a live writer's shared one lasts."""
    for _ in range(_LOCK_TRIES - 1):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(_LOCK_RETRY_S)
    fcntl.flock(fd, mode | fcntl.LOCK_NB)


WRITER_LIVE, WRITER_GONE, WRITER_UNKNOWN = "live", "gone", "unknown"


def writer_state(path: str | os.PathLike) -> str | None:
    """Whether the store's superblock says "open for writing", which makes HDF5's plain readers (h5dump, h5ls,
    h5py without swmr=True) refuse it, and whose mark that is: WRITER_LIVE while a process holds the store's lock
    (its writer, or a reader that took HDF5's), WRITER_GONE when none does (the writer was killed: `h5clear -s` or a
    resuming render clears it), WRITER_UNKNOWN where the file system has no locks; None when the mark is not set (or
    the file is no HDF5 file)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            found = _superblock(fh)
        if found is None:
            return None
        version, flags = found[1][8], found[1][11]
        if version not in (2, 3) or flags == 0:
            return None
        probed = _refuse_if_busy(path)
    except StoreBusy:
        return WRITER_LIVE
    except OSError:
        return None
    return WRITER_GONE if probed else WRITER_UNKNOWN


def _superblock(fh) -> tuple[int, bytes] | None:
    """(offset, first 12 bytes) of the HDF5 superblock in an open binary file; None when it has none."""
    size = os.fstat(fh.fileno()).st_size
    base = 0
    while base + 12 <= size:
        fh.seek(base)
        head = fh.read(12)
        if head[:8] == _SIGNATURE:
            return base, head
        base = 512 if base == 0 else base * 2  # the superblock sits at 0, 512, 1024, ...
    return None


def _clear_status_flags(path: Path) -> bool:
    """Clear the 'open for writing' flags that a killed writer leaves in the superblock.

    Superblock versions 2 and 3 (3 is what libver v110 and later write): signature, version, offset size, length
    size, status flags, four addresses, then a Jenkins lookup3 checksum of all of that. Returns whether the file
    was changed.
    """
    with open(path, "r+b") as fh:
        found = _superblock(fh)
        if found is None:
            return False
        base, head = found
        version, offset_size, flags = head[8], head[9], head[11]
        if version not in (2, 3) or flags == 0:
            return False
        fh.seek(base)
        body = bytearray(fh.read(12 + 4 * offset_size))
        body[11] = 0
        fh.seek(base)
        fh.write(bytes(body) + _lookup3(bytes(body)).to_bytes(4, "little"))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 `hashlittle`, the checksum HDF5 puts on its metadata."""
    abc = [(0xDEADBEEF + len(data) + initval) & _U32] * 3
    # Blocks of 12 bytes go through `mix`; the last 1-12 bytes (zero padded) through `final`.
    n_blocks = max(0, (len(data) - 1) // 12)
    for i in range(n_blocks + (1 if data else 0)):
        block = data[12 * i : 12 * i + 12].ljust(12, b"\0")
        for k in range(3):
            abc[k] = (abc[k] + int.from_bytes(block[4 * k : 4 * k + 4], "little")) & _U32
        steps = _LOOKUP3_MIX if i < n_blocks else _LOOKUP3_FINAL
        for x, y, z, r in steps:
            if steps is _LOOKUP3_MIX:  # x -= z; x ^= rot(z, r); z += y
                abc[x] = ((abc[x] - abc[z]) & _U32) ^ _rot(abc[z], r)
                abc[z] = (abc[z] + abc[y]) & _U32
            else:  # x ^= y; x -= rot(y, r)
                abc[x] = ((abc[x] ^ abc[y]) - _rot(abc[y], r)) & _U32
    return abc[2]


_U32 = 0xFFFFFFFF
_LOOKUP3_MIX = ((0, 1, 2, 4), (1, 2, 0, 6), (2, 0, 1, 8), (0, 1, 2, 16), (1, 2, 0, 19), (2, 0, 1, 4))
_LOOKUP3_FINAL = ((2, 1, None, 14), (0, 2, None, 11), (1, 0, None, 25), (2, 1, None, 16),
                  (0, 2, None, 4), (1, 0, None, 14), (2, 1, None, 24))


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _U32
