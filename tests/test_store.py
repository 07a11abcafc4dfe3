"""The HDF5 tile store: writing, reading, resuming, moving stale files aside, surviving SIGKILL."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from hpcrender.errors import BadInput
from hpcrender.output.store import FORMAT_VERSION, StoreBusy, TileStore, _clear_status_flags, _lookup3

H, W, TILE = 100, 70, 32  # 4 x 3 tiles, the last row and column clipped


def _image(seed: int = 0, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _open(path, params_hash="h1", **kw) -> TileStore:
    return TileStore.open(path, height=H, width=W, tile=TILE, params_hash=params_hash, **kw)


def _write(store: TileStore, image: np.ndarray, tiles) -> None:
    for row, col in tiles:
        y0, y1, x0, x1 = store.grid.box(row, col)
        store.write_tile(row, col, image[y0:y1, x0:x1])


def test_new_store_has_the_layout_and_nothing_done(tmp_path):
    with _open(tmp_path / "tiles.h5") as store:
        assert store.missing() == list(store.grid)
        assert not store.complete()
    with h5py.File(tmp_path / "tiles.h5", "r") as f:
        assert f["image"].shape == (H, W, 3) and f["image"].dtype == np.uint8
        assert f["image"].chunks == (TILE, TILE, 3)
        assert f["image"].compression == "gzip"
        assert f["done"].shape == (4, 3)
        assert f.attrs["params_hash"] == "h1" and f.attrs["format_version"] == FORMAT_VERSION


def test_written_tiles_are_done_and_read_back_across_tile_borders(tmp_path):
    image = _image()
    with _open(tmp_path / "tiles.h5") as store:
        _write(store, image, [(0, 0), (1, 1), (3, 2)])
        assert store.is_done(1, 1) and not store.is_done(0, 1)
        assert (0, 1) in store.missing() and (3, 2) not in store.missing()
        np.testing.assert_array_equal(store.read_region(40, 60, 40, 60), image[40:60, 40:60])
        _write(store, image, store.missing())
        assert store.complete() and store.missing() == []
        np.testing.assert_array_equal(store.read_region(10, 97, 5, 69), image[10:97, 5:69])
        np.testing.assert_array_equal(store.read_region(0, H, 0, W), image)


def test_unwritten_tiles_read_black(tmp_path):
    with _open(tmp_path / "tiles.h5") as store:
        assert not store.read_region(0, H, 0, W).any()


def test_write_region_splits_whole_tiles(tmp_path):
    image = _image(1)
    with _open(tmp_path / "tiles.h5") as store:
        store.write_region(32, 32, image[32:100, 32:70])  # reaches both image edges
        assert store.missing() == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (3, 0)]
        np.testing.assert_array_equal(store.read_region(32, 100, 32, 70), image[32:100, 32:70])
        for y0, x0, shape in [(16, 0, (32, 32, 3)), (0, 0, (20, 32, 3)), (0, 32, (32, 30, 3)), (96, 0, (10, 32, 3))]:
            with pytest.raises(ValueError):
                store.write_region(y0, x0, np.zeros(shape, np.uint8))


@pytest.mark.parametrize("bad", [np.zeros((32, 32, 3), np.float32), np.zeros((32, 31, 3), np.uint8), np.zeros((32, 32), np.uint8)])
def test_write_tile_rejects_wrong_dtype_or_shape(tmp_path, bad):
    with _open(tmp_path / "tiles.h5") as store:
        with pytest.raises(ValueError):
            store.write_tile(0, 0, bad)
        assert not store.is_done(0, 0)


def test_reopen_with_same_hash_resumes_finished_tiles(tmp_path):
    image = _image(2)
    path = tmp_path / "tiles.h5"
    with _open(path) as store:
        _write(store, image, [(0, 0), (2, 1)])
        store.set_attrs(job={"name": "harbor", "steps": 4})
    with _open(path) as store:
        assert store.is_done(0, 0) and store.is_done(2, 1) and len(store.missing()) == 10
        np.testing.assert_array_equal(store.read_region(0, 32, 0, 32), image[:32, :32])
        assert store.attrs == {"job": {"name": "harbor", "steps": 4}}
        store.set_attrs(seconds=1.5)
        assert store.attrs == {"job": {"name": "harbor", "steps": 4}, "seconds": 1.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles.h5"]


@pytest.mark.parametrize(
    "change",
    [dict(params_hash="h2"), dict(resume=False), dict(height=H + 1), dict(tile=16)],
    ids=["other-hash", "no-resume", "other-shape", "other-tile"],
)
def test_stale_store_is_moved_aside_never_deleted(tmp_path, change):
    image = _image(3)
    path = tmp_path / "tiles.h5"
    with _open(path) as store:
        _write(store, image, [(1, 1)])
    args = dict(height=H, width=W, tile=TILE, params_hash="h1") | change
    with TileStore.open(path, **args) as store:
        assert store.missing() == list(store.grid)
        assert store.params_hash == args["params_hash"]
    aside = [p for p in tmp_path.iterdir() if p.name != "tiles.h5"]
    assert len(aside) == 1 and aside[0].name.startswith("tiles.h5.") and aside[0].name.endswith(".old")
    with TileStore.read(aside[0]) as old:
        assert old.is_done(1, 1)
        np.testing.assert_array_equal(old.read_region(32, 64, 32, 64), image[32:64, 32:64])


def test_second_move_aside_in_the_same_second_gets_its_own_name(tmp_path):
    path = tmp_path / "tiles.h5"
    for n in range(3):
        _open(path, params_hash=f"h{n}").close()
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".old"]) == 2


def test_file_that_is_not_a_store_is_moved_aside(tmp_path):
    path = tmp_path / "tiles.h5"
    path.write_bytes(b"half-written garbage")
    with _open(path) as store:
        _write(store, _image(), [(0, 0)])
    assert any(p.name.endswith(".old") and p.read_bytes() == b"half-written garbage" for p in tmp_path.iterdir())


def test_read_rejects_missing_and_foreign_files_and_writes(tmp_path):
    with pytest.raises(BadInput):
        TileStore.read(tmp_path / "nothing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(BadInput, match="not an hpcrender tile store"):
        TileStore.read(tmp_path / "other.h5")
    _open(tmp_path / "tiles.h5").close()
    with TileStore.read(tmp_path / "tiles.h5") as store:
        with pytest.raises(ValueError):
            store.write_tile(0, 0, np.zeros((32, 32, 3), np.uint8))
        with pytest.raises(ValueError):
            store.set_attrs(a=1)


def test_second_writer_is_refused_while_the_first_is_open(tmp_path):
    path = tmp_path / "tiles.h5"
    with _open(path):
        with pytest.raises(StoreBusy):
            _open(path)
        with pytest.raises(StoreBusy):
            _open(path, params_hash="h2")  # would otherwise move a live file aside
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.h5"]
    _open(path).close()  # closed: free again


_READER = textwrap.dedent(
    """
    import sys
    from hpcrender.output.store import TileStore
    with TileStore.read(sys.argv[1]) as store:
        print(len(store.missing()), int(store.read_region(0, 32, 0, 32).sum()), store.attrs["job"])
    """
)


def test_reader_opens_the_store_while_the_writer_is_running(tmp_path):
    path = tmp_path / "tiles.h5"
    with _open(path) as store:
        store.set_attrs(job="harbor")
        store.write_tile(0, 0, np.full((32, 32, 3), 1, np.uint8))
        out = subprocess.run([sys.executable, "-c", _READER, str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["11", str(32 * 32 * 3), "harbor"]


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from hpcrender.output.store import TileStore
    image = np.random.default_rng(5).integers(0, 256, (100, 70, 3), dtype=np.uint8)
    store = TileStore.open(sys.argv[1], height=100, width=70, tile=32, params_hash="h1")
    store.set_attrs(job="harbor")
    for row, col in [(0, 0), (1, 2), (3, 1)]:
        y0, y1, x0, x1 = store.grid.box(row, col)
        store.write_tile(row, col, image[y0:y1, x0:x1])
    print("written", flush=True)
    time.sleep(60)
    """
)


def test_store_survives_sigkill_and_resumes_with_finished_tiles(tmp_path):
    path = tmp_path / "tiles.h5"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.kill()  # SIGKILL: no close, no flush at exit
        proc.wait(timeout=30)
    assert proc.returncode == -9
    image = np.random.default_rng(5).integers(0, 256, (100, 70, 3), dtype=np.uint8)
    with TileStore.read(path) as store:
        assert len(store.missing()) == 9
    with _open(path) as store:  # the killed writer's "open for writing" mark must not block this
        assert [t for t in store.grid if store.is_done(*t)] == [(0, 0), (1, 2), (3, 1)]
        for row, col in [(0, 0), (1, 2), (3, 1)]:
            y0, y1, x0, x1 = store.grid.box(row, col)
            np.testing.assert_array_equal(store.read_region(y0, y1, x0, x1), image[y0:y1, x0:x1])
        assert store.attrs == {"job": "harbor"}
        _write(store, image, store.missing())
        assert store.complete()
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.h5"]


def test_lookup3_matches_reference_values_and_hdf5_superblock(tmp_path):
    # test vectors printed by lookup3.c's driver5()
    assert _lookup3(b"") == 0xDEADBEEF
    assert _lookup3(b"Four score and seven years ago") == 0x17770551
    assert _lookup3(b"Four score and seven years ago", 1) == 0xCD628161
    _open(tmp_path / "tiles.h5").close()
    head = (tmp_path / "tiles.h5").read_bytes()[:48]
    assert head[8] in (2, 3) and head[9] == 8
    assert _lookup3(head[:44]) == int.from_bytes(head[44:48], "little")


def test_clearing_status_flags_leaves_a_valid_checksum(tmp_path):
    path = tmp_path / "tiles.h5"
    _open(path).close()
    raw = bytearray(path.read_bytes())
    raw[11] = 0x05  # what a killed SWMR writer leaves: write + SWMR-write flags
    raw[44:48] = _lookup3(bytes(raw[:44])).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(OSError):
        h5py.File(path, "r+")
    assert _clear_status_flags(path)
    assert not _clear_status_flags(path)  # nothing left to clear
    with h5py.File(path, "r+") as f:
        assert f.attrs["params_hash"] == "h1"
