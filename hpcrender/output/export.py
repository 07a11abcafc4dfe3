"""Export a tile store to files people open: PNG, preview, pyramidal BigTIFF and OME-TIFF, DeepZoom.

Every exporter reads the store a strip of tiles at a time, so a gigapixel image is never in memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from hpcrender.errors import BadInput
from hpcrender.output.files import atomic_path
from hpcrender.output.store import TileStore

MAX_PNG_PIXELS = 64 * 2**20   # contract: image.png up to 64 Mpx, image.tif above
PREVIEW_MAX_SIDE = 2048
DZI_TILE = 254                # OpenSeadragon's defaults: 254 + 2 x 1 overlap = 256 px tiles
DZI_OVERLAP = 1
PNG_LEVEL = 6                 # zlib level, the PNG default
# TIFF: horizontal differencing + zlib level 1 came out 5x faster than level 6 and only ~7 %
# larger on rendered images; the predictor alone saves ~35 %.
TIFF_ZLIB_LEVEL = 1
_PREDICTED = {"zlib", "deflate", "adobe_deflate", "lzw", "zstd"}
_PNG_FILTER_BYTES = 2**20  # rows filtered at once: ~10 int16 scratch copies of this many bytes
_TIFF_BUFFER_BYTES = 32 * 2**20  # tiles tifffile gathers to compress in parallel (default 512 MiB)

# read(y0, y1) -> full-width rows y0:y1 of one pyramid level
ReadRows = Callable[[int, int], np.ndarray]


# -- whole-image exports --------------------------------------------------------------------


def export_png(store: TileStore, path: str | os.PathLike) -> Path:
    """The full image as an RGB8 PNG, encoded strip by strip (Paeth filter, zlib)."""
    path = Path(path)
    grid = store.grid
    with atomic_path(path) as part, open(part, "wb") as fh:
        strips = (strip for *_, strip in _strips(_store_rows(store), grid.height, grid.tile))
        _write_png(fh, grid.height, grid.width, strips)
    return path


def export_preview(store: TileStore, path: str | os.PathLike, max_side: int = PREVIEW_MAX_SIDE) -> Path:
    """A PNG whose longest side is at most `max_side`, aspect kept.

    Each strip is box-filtered by the integer factor that keeps the result at least `max_side`
    long; only that reduced image (under 2 x max_side a side) is resampled to the final size.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    path = Path(path)
    height, width = store.grid.height, store.grid.width
    longest = max(height, width)
    factor = max(1, longest // max_side)
    rows_per_strip = factor * -(-store.grid.tile // factor)  # whole blocks per strip
    reduced = np.empty((-(-height // factor), -(-width // factor), 3), np.uint8)
    for y0, y1, _, strip in _strips(_store_rows(store), height, rows_per_strip):
        reduced[y0 // factor : -(-y1 // factor)] = _box_reduce(strip, factor)
    image = Image.fromarray(reduced)
    if longest > max_side:
        scale = max_side / longest
        size = (max(1, min(max_side, round(width * scale))), max(1, min(max_side, round(height * scale))))
        image = image.resize(size, Image.Resampling.LANCZOS)
    with atomic_path(path) as part:
        image.save(part, format="PNG")
    return path


def export_tiff(
    store: TileStore, path: str | os.PathLike, *, tile: int = 512, compression: str | None = "zlib"
) -> Path:
    """A tiled, pyramidal BigTIFF in the generic tiled-TIFF layout: full resolution as the first page, then
    half-size levels as further pages marked reduced (SubFileType 1) down to the first level that fits in one
    tile, and no ImageDescription.

    OpenSlide's generic-tiff driver (3.4.1) takes only top-level pages as levels, not SubIFDs; libvips sees them
    as pages (n-pages) and tifffile as series[0].levels. While a level is written its half-size level is built
    into a scratch file beside `path` (LevelFile).
    """
    return _write_tiff_pyramid(store, Path(path), tile, compression, ome=False)


def export_ome_tiff(
    store: TileStore, path: str | os.PathLike, *, tile: int = 512, compression: str | None = "zlib"
) -> Path:
    """An OME-TIFF for Bio-Formats, QuPath and napari: OME-XML in the first page's ImageDescription, the same
    half-size levels as export_tiff in that page's SubIFDs (OME-TIFF's pyramid layout), RGB interleaved, tiled."""
    return _write_tiff_pyramid(store, Path(path), tile, compression, ome=True)


def _write_tiff_pyramid(store: TileStore, path: Path, tile: int, compression: str | None, ome: bool) -> Path:
    """Both TIFF layouts: the levels differ only in where their pages go (top level or SubIFDs of the first)."""
    if tile < 16 or tile % 16:
        raise ValueError(f"TIFF tile side must be a positive multiple of 16, got {tile}")
    shapes = _pyramid_shapes(store.grid.height, store.grid.width, lambda h, w: max(h, w) > tile)
    options: dict = dict(
        tile=(tile, tile), photometric="rgb", compression=compression, dtype=np.uint8, buffersize=_TIFF_BUFFER_BYTES
    )
    if compression is not None and compression.lower() in _PREDICTED:
        options["predictor"] = True
    if compression is not None and compression.lower() in {"zlib", "deflate", "adobe_deflate"}:
        options["compressionargs"] = {"level": TIFF_ZLIB_LEVEL}
    with atomic_path(path) as part, _scratch(path) as scratch:
        # ome given either way: tifffile's default decides by the file name, and `part` is a temporary one
        with tifffile.TiffWriter(part, bigtiff=True, ome=ome) as tif:
            for level, read, below in _levels(store, shapes, scratch):
                h, w = shapes[level]
                tiles = _tiff_tiles(_strips(read, h, tile, below=below), w, tile)
                if level == 0 and ome:
                    tif.write(tiles, shape=(h, w, 3), subifds=len(shapes) - 1, metadata={"axes": "YXS"}, **options)
                else:
                    # no metadata: tifffile's JSON ImageDescription would only repeat the shape
                    tif.write(tiles, shape=(h, w, 3), subfiletype=int(level > 0), metadata=None, **options)
    return path


def export_dzi(store: TileStore, path: str | os.PathLike) -> Path:
    """DeepZoom for OpenSeadragon: `PATH.dzi` and `PATH_files/LEVEL/COL_ROW.png`.

    Level 0 is 1 x 1 px, the top level the full image; each tile is 254 px plus a 1 px overlap
    on every side that has a neighbour. Returns the `.dzi` path.
    """
    path = Path(path)
    base = path.with_suffix("") if path.suffix == ".dzi" else path
    dzi = base.with_name(base.name + ".dzi")
    files = base.with_name(base.name + "_files")
    height, width = store.grid.height, store.grid.width
    shapes = _pyramid_shapes(height, width, lambda h, w: max(h, w) > 1)  # full size ... 1 x 1
    top = len(shapes) - 1
    part = files.with_name(f".{files.name}.part")
    shutil.rmtree(part, ignore_errors=True)
    try:
        with _scratch(path) as scratch:
            for index, read, below in _levels(store, shapes, scratch):
                h, w = shapes[index]
                level_dir = part / str(top - index)
                level_dir.mkdir(parents=True)
                for row, (*_, strip) in enumerate(_strips(read, h, DZI_TILE, DZI_OVERLAP, below)):
                    for col, x0 in enumerate(range(0, w, DZI_TILE)):
                        left, right = max(0, x0 - DZI_OVERLAP), min(w, x0 + DZI_TILE + DZI_OVERLAP)
                        Image.fromarray(strip[:, left:right]).save(level_dir / f"{col}_{row}.png")
        if files.exists():
            shutil.rmtree(files)  # an earlier export of the same store: derived data, safe to replace
        os.replace(part, files)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
        f'Format="png" Overlap="{DZI_OVERLAP}" TileSize="{DZI_TILE}">\n'
        f'  <Size Width="{width}" Height="{height}"/>\n'
        "</Image>\n"
    )
    with atomic_path(dzi) as tmp:
        tmp.write_text(xml)
    write_viewer(dzi, width, height)
    return dzi


def image_name(height: int, width: int) -> str:
    """The full image's file of a job: image.png up to 64 Mpx, image.tif above (the contract's rule)."""
    return "image.png" if height * width <= MAX_PNG_PIXELS else "image.tif"


VIEWER = Path(__file__).parent / "viewer" / "openseadragon"  # OpenSeadragon's build, BSD-3-Clause (LICENSE.txt there)

_VIEWER_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>html, body {{ margin: 0; height: 100%; background: #111; }} #viewer {{ width: 100%; height: 100%; }}</style>
</head>
<body>
<div id="viewer"></div>
<script src="openseadragon/openseadragon.min.js"></script>
<script>
// The DeepZoom descriptor is given inline: browsers refuse to fetch image.dzi from a file:// page, but load its
// tiles as images. The canvas drawer shows file:// tiles, which WebGL may not use.
OpenSeadragon({{
  id: "viewer",
  prefixUrl: "openseadragon/images/",
  drawer: "canvas",
  showNavigator: true,
  maxZoomPixelRatio: 4,
  tileSources: {{
    Image: {{
      xmlns: "http://schemas.microsoft.com/deepzoom/2008",
      Url: "{files}/",
      Format: "png",
      Overlap: "{overlap}",
      TileSize: "{tile}",
      Size: {{ Width: "{width}", Height: "{height}" }}
    }}
  }}
}});
</script>
</body>
</html>
"""


def write_viewer(dzi: Path, width: int, height: int) -> Path:
    """index.html beside a DeepZoom export that shows it in OpenSeadragon, and the viewer's files it loads
    (openseadragon/): opened straight from disk, no server and no network."""
    folder = dzi.parent
    target = folder / "openseadragon"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(VIEWER, target)
    page = folder / "index.html"
    base = dzi.name[: -len(".dzi")]
    html = _VIEWER_PAGE.format(title=base, files=base + "_files", overlap=DZI_OVERLAP, tile=DZI_TILE,
                               width=width, height=height)
    with atomic_path(page) as tmp:
        tmp.write_text(html)
    return page


def export_job(store: TileStore, job_dir: str | os.PathLike, *, allow_incomplete: bool = False,
               preview_from: TileStore | None = None) -> list[Path]:
    """The contract's outputs of a finished job: image.png (<= 64 Mpx) or image.tif, and preview.png (reduced from
    `preview_from` when given: a gigapixel render's smaller level, read in a fraction of the time)."""
    job_dir = Path(job_dir)
    if not allow_incomplete and not store.complete():
        missing = len(store.missing())
        raise BadInput(
            f"{store.path}: {missing} of {len(store.grid)} tiles not rendered yet; "
            "render the job again to finish it"
        )
    job_dir.mkdir(parents=True, exist_ok=True)
    name = image_name(store.grid.height, store.grid.width)
    exporter = export_png if name.endswith(".png") else export_tiff
    image = exporter(store, job_dir / name)
    return [image, export_preview(preview_from if preview_from is not None else store, job_dir / "preview.png")]


# -- reading levels strip by strip -----------------------------------------------------------


def _store_rows(store: TileStore) -> ReadRows:
    width = store.grid.width
    return lambda y0, y1: store.read_region(y0, y1, 0, width)


def _strips(
    read: ReadRows, height: int, step: int, overlap: int = 0, below: LevelFile | None = None
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Full-width strips of `step` rows (plus `overlap` rows above and below where there are any),
    as (y0, y1, first row of strip, strip). When `below` is given, each strip's own rows are
    box-reduced 2x into it, so the next pyramid level is ready when this one has been read."""
    for y0 in range(0, height, step):
        y1 = min(y0 + step, height)
        first, last = max(0, y0 - overlap), min(height, y1 + overlap)
        strip = read(first, last)
        if below is not None:
            # step is even, so 2x2 blocks never straddle strips
            below[y0 // 2 : -(-y1 // 2)] = _box_reduce(strip[y0 - first : y1 - first], 2)
        yield y0, y1, first, strip


def _levels(
    store: TileStore, shapes: list[tuple[int, int]], scratch: Path
) -> Iterator[tuple[int, ReadRows, LevelFile | None]]:
    """(index, reader, scratch file for the next level) per pyramid level; the caller must read each
    level completely (through _strips with `below`) before asking for the next."""
    read = _store_rows(store)
    open_files: list[LevelFile] = []  # the level being read and the one being built
    try:
        for index in range(len(shapes)):
            below = None
            if index + 1 < len(shapes):
                below = LevelFile(scratch / f"level-{index + 1}.u8", *shapes[index + 1])
                open_files.append(below)
            yield index, read, below
            while len(open_files) > (below is not None):
                open_files.pop(0).close()  # the level just read
            if below is not None:
                read = below.read
    finally:
        for level in open_files:
            level.close()


class LevelFile:
    """An RGB8 pyramid level in a raw scratch file, written and read by whole rows with pwrite/pread.

    Not a memory map: a mapped level's written pages count in the process's RSS while they stay cached (768 MiB
    for the half-size level of a 32768-px image); through pread they stay in the page cache only, and a rank's
    memory is bounded by a strip of rows.
    """

    def __init__(self, path: Path, height: int, width: int):
        self.path, self.height, self.width = path, height, width
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, height * width * 3)

    def __setitem__(self, rows: slice, values: np.ndarray) -> None:
        y0, y1, _ = rows.indices(self.height)
        values = np.ascontiguousarray(values, dtype=np.uint8)
        if values.shape != (y1 - y0, self.width, 3):
            raise ValueError(f"rows {y0}:{y1} of a {self.width}-px level, got an array of shape {values.shape}")
        data, offset = memoryview(values).cast("B"), y0 * self.width * 3
        while data:
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written

    def read(self, y0: int, y1: int) -> np.ndarray:
        y0, y1 = max(0, y0), min(self.height, y1)
        out = np.empty((y1 - y0, self.width, 3), np.uint8)
        view, offset = memoryview(out).cast("B"), y0 * self.width * 3
        while view:
            got = os.preadv(self._fd, [view], offset)
            if got == 0:
                raise OSError(f"{self.path}: short read at byte {offset}")
            view, offset = view[got:], offset + got
        return out

    def close(self) -> None:
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


def _pyramid_shapes(height: int, width: int, go_on: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """(h, w) of the full image and each half-size level (rounded up) while go_on(previous)."""
    shapes = [(height, width)]
    while go_on(*shapes[-1]):
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def _tiff_tiles(
    strips: Iterator[tuple[int, int, int, np.ndarray]], width: int, tile: int
) -> Iterator[np.ndarray]:
    # tifffile zero-pads the clipped tiles at the right and bottom edges
    for *_, strip in strips:
        for x0 in range(0, width, tile):
            yield strip[:, x0 : x0 + tile]


def _box_reduce(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor block (rounded); edge blocks average the pixels they hold."""
    if factor == 1:
        return np.ascontiguousarray(a)
    h, w, channels = a.shape
    hf, wf = h // factor, w // factor  # whole blocks
    sums = np.zeros((-(-h // factor), -(-w // factor), channels), np.uint32)
    # sum(dtype=) widens in small buffers: no uint32 copy of the strip
    y, x = hf * factor, wf * factor
    sums[:hf, :wf] = a[:y, :x].reshape(hf, factor, wf, factor, channels).sum(axis=(1, 3), dtype=np.uint32)
    if x < w:
        sums[:hf, wf] = a[:y, x:].reshape(hf, factor, w - x, channels).sum(axis=(1, 2), dtype=np.uint32)
    if y < h:
        sums[hf, :wf] = a[y:, :x].reshape(h - y, wf, factor, channels).sum(axis=(0, 2), dtype=np.uint32)
    if y < h and x < w:
        sums[hf, wf] = a[y:, x:].sum(axis=(0, 1), dtype=np.uint32)
    rows = np.minimum(np.arange(1, sums.shape[0] + 1) * factor, h) - np.arange(sums.shape[0]) * factor
    cols = np.minimum(np.arange(1, sums.shape[1] + 1) * factor, w) - np.arange(sums.shape[1]) * factor
    counts = (rows[:, None] * cols[None, :]).astype(np.uint32)[..., None]
    return ((sums + counts // 2) // counts).astype(np.uint8)


# -- PNG encoder -----------------------------------------------------------------------------


def _write_png(fh, height: int, width: int, strips: Iterator[np.ndarray]) -> None:
    """RGB8 PNG from strips of rows: every row Paeth-filtered, one zlib stream over all IDATs."""
    fh.write(b"\x89PNG\r\n\x1a\n")
    _png_chunk(fh, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    compressor = zlib.compressobj(PNG_LEVEL)
    above = np.zeros(width * 3, np.uint8)  # the row above the first is zeros (PNG spec)
    rows_at_once = max(1, _PNG_FILTER_BYTES // (width * 3))
    for strip in strips:
        rows = strip.reshape(strip.shape[0], width * 3)
        for r0 in range(0, rows.shape[0], rows_at_once):
            part = rows[r0 : r0 + rows_at_once]
            data = compressor.compress(_paeth_rows(part, above).tobytes())
            if data:
                _png_chunk(fh, b"IDAT", data)
            above = part[-1]
    _png_chunk(fh, b"IDAT", compressor.flush())
    _png_chunk(fh, b"IEND", b"")


def _paeth_rows(rows: np.ndarray, above: np.ndarray) -> np.ndarray:
    """Rows (n, w*3) as PNG filter type 4 (Paeth), each prefixed with its filter byte."""
    x = rows.astype(np.int16)
    up = np.vstack([above[None], rows[:-1]]).astype(np.int16)
    left = np.zeros_like(x)
    left[:, 3:] = x[:, :-3]
    up_left = np.zeros_like(x)
    up_left[:, 3:] = up[:, :-3]
    pa = np.abs(up - up_left)            # |p - left| with p = left + up - up_left
    pb = np.abs(left - up_left)          # |p - up|
    pc = np.abs(left + up - 2 * up_left)  # |p - up_left|
    predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    out = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    out[:, 0] = 4
    out[:, 1:] = (x - predictor) & 0xFF
    return out


def _png_chunk(fh, kind: bytes, data: bytes) -> None:
    fh.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))


# -- files -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _scratch(path: Path) -> Iterator[Path]:
    """Scratch folder for pyramid levels, on the output's file system (node-local /tmp may be small)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        yield Path(tmp)
