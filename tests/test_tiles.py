"""The tile grid covers the image exactly once, in raster order, with clipped edge tiles."""

from __future__ import annotations

import numpy as np
import pytest

from hpcrender.errors import BadInput
from hpcrender.output.tiles import STORE_TILE, TileGrid, default_tile


def test_tiles_cover_every_pixel_exactly_once_for_all_small_sizes():
    for height in range(1, 22):
        for width in range(1, 22):
            for tile in range(1, 9):
                grid = TileGrid(height, width, tile)
                cover = np.zeros((height, width), np.int32)
                tiles = list(grid)
                assert len(tiles) == len(grid) == grid.rows * grid.cols
                for row, col in tiles:
                    y0, y1, x0, x1 = grid.box(row, col)
                    assert 0 < y1 - y0 <= tile and 0 < x1 - x0 <= tile
                    cover[y0:y1, x0:x1] += 1
                assert (cover == 1).all(), (height, width, tile)


def test_rows_and_cols_round_up_and_only_edge_tiles_are_clipped():
    grid = TileGrid(height=10, width=7, tile=4)
    assert (grid.rows, grid.cols) == (3, 2)
    assert grid.box(0, 0) == (0, 4, 0, 4)
    assert grid.box(1, 1) == (4, 8, 4, 7)
    assert grid.box(2, 0) == (8, 10, 0, 4)


def test_iteration_is_raster_order():
    assert list(TileGrid(5, 5, 2)) == [(r, c) for r in range(3) for c in range(3)]


def test_box_outside_the_grid_raises():
    grid = TileGrid(8, 8, 4)
    for row, col in [(2, 0), (0, 2), (-1, 0), (0, -1)]:
        with pytest.raises(IndexError):
            grid.box(row, col)


@pytest.mark.parametrize("kw", [dict(height=0), dict(width=-3), dict(tile=0), dict(tile=2.5), dict(height=True)])
def test_invalid_grid_is_bad_input(kw):
    args = dict(height=8, width=8, tile=4) | kw
    with pytest.raises(BadInput):
        TileGrid(**args)


def test_default_tile_is_512_or_one_aligned_tile_for_small_images():
    for height in range(1, 1300, 37):
        for width in range(1, 1300, 41):
            tile = default_tile(height, width)
            assert tile % 16 == 0 and 16 <= tile <= STORE_TILE
            if max(height, width) <= STORE_TILE:
                grid = TileGrid(height, width, tile)
                assert (grid.rows, grid.cols) == (1, 1)
                assert tile - max(height, width) < 16
            else:
                assert tile == STORE_TILE
    assert default_tile(1024, 1024) == 512
    assert default_tile(100, 30) == 112
    with pytest.raises(BadInput):
        default_tile(0, 10)
