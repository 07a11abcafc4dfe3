"""Older HDF5 readers: every dataset of every kind of HDF5 file hpcrender writes, read with the system's h5dump and
h5ls (Debian's hdf5-tools, HDF5 1.10.8: `make reader-deps`) and compared with h5py; a store whose writer was killed,
named by `hpcrender status` with the fix, and readable by h5dump once the fix is applied."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from clirun import hpcrender
from hpcrender.output import store as store_module
from hpcrender.render.checkpoint import Checkpoint, write_checkpoint
from hpcrender.output.records import JobState, format_status, read_status, record_job_state
from hpcrender.output.store import (
    WRITER_GONE, WRITER_LIVE, LevelShape, LevelStore, TileStore, _clear_status_flags, writer_state,
)

H, W, TILE = 100, 70, 32  # 4 x 3 tiles, the last row and column clipped
LEVELS = (LevelShape(48, 40, 16, 24, 24), LevelShape(96, 80, 32, 40, 40))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} missing (Debian's hdf5-tools; `make reader-deps` installs it as root)")
    return path


def _pixels(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _tile_store(path) -> None:
    """An ordinary image's store with some tiles done and metadata."""
    image = _pixels(1, (H, W, 3))
    with TileStore.open(path, height=H, width=W, tile=TILE, params_hash="h1") as store:
        store.set_attrs(job={"name": "harbor", "steps": 4})
        for row, col in [(0, 0), (1, 2), (3, 1)]:
            y0, y1, x0, x1 = store.grid.box(row, col)
            store.write_tile(row, col, image[y0:y1, x0:x1])


def _level_store(path) -> None:
    """A gigapixel render's store: patches and composed tiles on both levels, level 0 complete."""
    with LevelStore.open(path, levels=LEVELS, params_hash="g1") as store:
        store.set_attrs(job={"name": "giga"}, levels=[[s.width, s.height, s.tile] for s in LEVELS])
        for k, shape in enumerate(LEVELS):
            grid = shape.grid
            tiles = list(grid) if k == 0 else [(0, 0), (2, 1)]
            for n, (row, col) in enumerate(tiles):
                y0, y1, x0, x1 = grid.box(row, col)
                box = (y0, min(y0 + shape.patch_height, shape.height), x0, min(x0 + shape.patch_width, shape.width))
                patch = SimpleNamespace(box=box, pixels=_pixels(10 * k + n, (box[1] - box[0], box[3] - box[2], 3)))
                store.write_patch(k, SimpleNamespace(row=row, col=col), patch)
                store.write_level_tile(k, row, col, _pixels(100 * k + n, (y1 - y0, x1 - x0, 3)))


def _checkpoint(path) -> None:
    latent = np.random.default_rng(2).standard_normal((1, 4, 8, 6)).astype(np.float32)
    history = (None, np.random.default_rng(3).standard_normal((1, 4, 8, 6)).astype(np.float32))
    write_checkpoint(path, Checkpoint(step=3, steps=8, latent=latent, scalars={"_step_index": 3, "_begin_index": None},
                                      history=history, channels_last=(True, False, False)), "c1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of every kind hpcrender writes: {kind: path}."""
    folder = tmp_path_factory.mktemp("stores")
    made = {"tiles": folder / "tiles.h5", "levels": folder / "levels.h5", "checkpoint": folder / "checkpoint.h5"}
    _tile_store(made["tiles"])
    _level_store(made["levels"])
    _checkpoint(made["checkpoint"])
    return made


def _datasets(path) -> dict[str, np.ndarray]:
    """Every dataset's values as h5py reads them, by absolute name."""
    found = {}

    def take(name, obj):
        if isinstance(obj, h5py.Dataset):
            found[f"/{name}"] = obj[...]

    with h5py.File(path, "r") as f:
        f.visititems(take)
    return found


@pytest.mark.parametrize("kind", ["tiles", "levels", "checkpoint"])
def test_h5dump_reads_every_dataset_with_the_values_h5py_reads(files, kind, tmp_path):
    h5dump = _tool("h5dump")
    path = files[kind]
    datasets = _datasets(path)
    assert len(datasets) >= 2
    for name, values in datasets.items():
        out = tmp_path / "values.bin"
        done = subprocess.run([h5dump, "-b", "LE", "-d", name, "-o", str(out), str(path)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and "error" not in (done.stdout + done.stderr).lower(), (name, done.stderr)
        dumped = np.fromfile(out, dtype=values.dtype.newbyteorder("<"))
        np.testing.assert_array_equal(dumped.reshape(values.shape), values, err_msg=f"{kind} {name}")
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
    for key, value in attrs.items():
        dumped = subprocess.run([h5dump, "-a", f"/{key}", str(path)], capture_output=True, text=True, timeout=60)
        assert dumped.returncode == 0, dumped.stderr
        text = ", ".join(map(str, value)) if isinstance(value, np.ndarray) else (
            f'"{value}"' if isinstance(value, str) else str(value))
        assert f"(0): {text}" in dumped.stdout, (key, dumped.stdout)


@pytest.mark.parametrize("kind", ["tiles", "levels", "checkpoint"])
def test_h5ls_lists_every_dataset_without_errors(files, kind):
    h5ls = _tool("h5ls")
    done = subprocess.run([h5ls, "-r", str(files[kind])], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "*ERROR*" not in done.stdout + done.stderr, done.stdout
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.split()[1:2] == ["Dataset"]}
    assert listed == set(_datasets(files[kind]))


def test_stores_are_swmr_files_with_superblock_3(files):
    """SWMR needs superblock 3; _clear_status_flags and writer_state read and rewrite that one."""
    for kind in ("tiles", "levels"):
        head = files[kind].read_bytes()[:12]
        assert head[8] == 3 and head[11] == 0, kind  # closed cleanly: no "open for writing" flags


def test_a_store_written_with_libver_latest_still_reads_and_resumes(tmp_path, monkeypatch):
    path = tmp_path / "tiles.h5"
    monkeypatch.setattr(store_module, "_LIBVER", "latest")
    _tile_store(path)
    monkeypatch.undo()
    with TileStore.read(path) as store:
        assert store.missing() == [t for t in store.grid if t not in [(0, 0), (1, 2), (3, 1)]]
    with TileStore.open(path, height=H, width=W, tile=TILE, params_hash="h1") as store:
        assert store.is_done(1, 2) and store.attrs["job"]["name"] == "harbor"
        store.write_tile(0, 1, np.zeros((32, 32, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.h5"]


_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from hpcrender.output.store import TileStore
    image = np.random.default_rng(5).integers(0, 256, (100, 70, 3), dtype=np.uint8)
    store = TileStore.open(sys.argv[1], height=100, width=70, tile=32, params_hash="h1")
    for row, col in [(0, 0), (1, 2)]:
        y0, y1, x0, x1 = store.grid.box(row, col)
        store.write_tile(row, col, image[y0:y1, x0:x1])
    print("written", flush=True)
    time.sleep(60)
    """
)


def test_status_tells_a_live_writer_from_a_killed_one_and_the_fix_opens_the_store(tmp_path):
    h5dump, h5clear = _tool("h5dump"), _tool("h5clear")
    out = tmp_path / "out"
    path = out / "harbor" / "tiles.h5"
    path.parent.mkdir(parents=True)
    record_job_state(out, "harbor", JobState.RUNNING)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        assert writer_state(path) == WRITER_LIVE
        live = format_status(read_status(out))
        assert f"{path}: being written" in live and "h5clear" not in live
        refused = subprocess.run([h5clear, "-s", str(path)], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0  # the live writer's lock keeps h5clear out
    finally:
        proc.kill()  # SIGKILL: no close, the superblock keeps its "open for writing" flags
        proc.wait(timeout=30)
    assert proc.returncode == -9
    before = subprocess.run([h5dump, "-H", str(path)], capture_output=True, text=True, timeout=60)
    assert before.returncode != 0  # what the fix is for
    copy = tmp_path / "copy.h5"
    shutil.copyfile(path, copy)
    assert _clear_status_flags(copy)  # what a resuming render does: HDF5 1.10.8 takes its checksum too
    assert subprocess.run([h5dump, "-H", str(copy)], capture_output=True, timeout=60).returncode == 0
    status = read_status(out)
    assert status["jobs"]["harbor"]["open_stores"] == [{"path": str(path), "writer": WRITER_GONE}]
    shown = hpcrender("status", out, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"{path}: left marked open for writing by a writer that is gone" in shown.stdout
    fix = re.search(r"`(h5clear -s [^`]+)`", shown.stdout)
    assert fix is not None and shlex.split(fix[1]) == ["h5clear", "-s", str(path)]
    subprocess.run(shlex.split(fix[1]), check=True, capture_output=True, timeout=60)
    image = np.random.default_rng(5).integers(0, 256, (100, 70, 3), dtype=np.uint8)
    dumped = tmp_path / "image.bin"
    after = subprocess.run([h5dump, "-b", "LE", "-d", "/image", "-o", str(dumped), str(path)], capture_output=True,
                           text=True, timeout=60)
    assert after.returncode == 0, after.stderr
    pixels = np.fromfile(dumped, np.uint8).reshape(H, W, 3)
    np.testing.assert_array_equal(pixels[32:64, 64:70], image[32:64, 64:70])  # tile (1, 2), clipped
    assert writer_state(path) is None and "open_stores" not in read_status(out)["jobs"]["harbor"]
    assert "h5clear" not in hpcrender("status", out, timeout=60).stdout


def test_status_imports_neither_torch_nor_diffusers(tmp_path):
    probe = ("import sys; from hpcrender.cli import main; sys.argv = ['hpcrender', 'status', sys.argv[1]]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
