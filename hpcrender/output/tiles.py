"""The tile grid of an image: which pixel box each tile of the store covers (pure arithmetic)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from hpcrender.errors import BadInput

# 512 x 512 RGB8 = 768 KiB per chunk: inside h5py's 10 KiB - 1 MiB advice, and a multiple of
# the VAE's factor 8 and of the latent alignment 16, so tile edges fall on latent pixels.
STORE_TILE = 512
TILE_ALIGN = 16


@dataclass(frozen=True)
class TileGrid:
    """An image of `height` x `width` cut into square tiles of side `tile`, raster order.

    Tiles on the bottom row and right column are clipped to the image; every pixel lies in
    exactly one tile.
    """

    height: int
    width: int
    tile: int

    def __post_init__(self) -> None:
        for key in ("height", "width", "tile"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadInput(f"tile grid: {key} must be a positive integer, got {value!r}")

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile)

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile)

    def __len__(self) -> int:
        return self.rows * self.cols

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Pixel box `(y0, y1, x0, x1)` of tile (row, col), half-open, clipped at the image edge."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"tile ({row}, {col}) outside a {self.rows} x {self.cols} grid")
        y0, x0 = row * self.tile, col * self.tile
        return y0, min(y0 + self.tile, self.height), x0, min(x0 + self.tile, self.width)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for row in range(self.rows):
            for col in range(self.cols):
                yield row, col


def default_tile(height: int, width: int) -> int:
    """Tile side for the store of a `height` x `width` image.

    512 for any image with a side of at least 512; a smaller image is one tile, its longest side
    rounded up to a multiple of 16 (the chunk itself is clipped to the image).
    """
    if height < 1 or width < 1:
        raise BadInput(f"image size must be positive, got {width}x{height}")
    longest = max(height, width)
    return min(STORE_TILE, -(-longest // TILE_ALIGN) * TILE_ALIGN)
