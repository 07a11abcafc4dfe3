"""Exports of a tile store: PNG, preview, pyramidal BigTIFF and OME-TIFF, DeepZoom, and the job's contract outputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile
from clirun import hpcrender
from PIL import Image

from hpcrender.output import export
from hpcrender.errors import BadInput
from hpcrender.output.export import (
    _box_reduce, export_dzi, export_job, export_ome_tiff, export_png, export_preview, export_tiff,
)
from hpcrender.output.store import TileStore

H, W = 150, 230


def _reduce_reference(a: np.ndarray, f: int) -> np.ndarray:
    """Block means by explicit loops: the slow definition _box_reduce must agree with."""
    h, w = a.shape[:2]
    out = np.empty((-(-h // f), -(-w // f), a.shape[2]), np.uint8)
    for by in range(out.shape[0]):
        for bx in range(out.shape[1]):
            block = a[by * f : (by + 1) * f, bx * f : (bx + 1) * f].astype(np.int64)
            n = block.shape[0] * block.shape[1]
            out[by, bx] = (block.sum(axis=(0, 1)) + n // 2) // n
    return out


def _make_store(path, image: np.ndarray, tile: int = 64, skip=()) -> TileStore:
    h, w = image.shape[:2]
    store = TileStore.open(path, height=h, width=w, tile=tile, params_hash="h")
    for row, col in store.grid:
        if (row, col) not in skip:
            y0, y1, x0, x1 = store.grid.box(row, col)
            store.write_tile(row, col, np.ascontiguousarray(image[y0:y1, x0:x1]))
    store.close()
    return TileStore.read(path)


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    smooth = np.stack([xx, yy, xx + yy], -1) % 256
    noise = rng.integers(0, 256, (H, W, 3))
    # left half smooth, right half noise: exercises every branch of the PNG Paeth filter
    return np.where(xx[..., None] < W // 2, smooth, noise).astype(np.uint8)


@pytest.fixture
def store(tmp_path, image):
    with _make_store(tmp_path / "tiles.h5", image) as s:
        yield s


def test_box_reduce_matches_block_means_for_all_small_shapes():
    rng = np.random.default_rng(1)
    for h in range(1, 12):
        for w in range(1, 12):
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for f in (1, 2, 3, 5):
                np.testing.assert_array_equal(_box_reduce(a, f), _reduce_reference(a, f))


def test_png_holds_exactly_the_stored_pixels(tmp_path, store, image):
    path = export_png(store, tmp_path / "image.png")
    with Image.open(path) as png:
        assert png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), image)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (37, 1), (65, 3)])
def test_png_of_thin_images(tmp_path, shape):
    image = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
    with _make_store(tmp_path / "t.h5", image, tile=16) as store:
        with Image.open(export_png(store, tmp_path / "x.png")) as png:
            np.testing.assert_array_equal(np.asarray(png), image)


def test_exports_read_the_store_one_strip_of_tiles_at_a_time(tmp_path, store, monkeypatch):
    heights: list[int] = []
    read_region = store.read_region

    def spy(y0, y1, x0, x1):
        heights.append(y1 - y0)
        return read_region(y0, y1, x0, x1)

    monkeypatch.setattr(store, "read_region", spy)
    tile = store.grid.tile  # 64 rows of a 150-row image
    for run, most in [
        (lambda: export_png(store, tmp_path / "a.png"), tile),
        (lambda: export_tiff(store, tmp_path / "a.tif", tile=32), 32),
        (lambda: export_ome_tiff(store, tmp_path / "a.ome.tif", tile=32), 32),
        (lambda: export_preview(store, tmp_path / "p.png", max_side=40), tile + 1),  # 5 x 13 rows
        (lambda: export_dzi(store, tmp_path / "a"), export.DZI_TILE + 2 * export.DZI_OVERLAP),
    ]:
        heights.clear()
        run()
        assert heights and max(heights) <= most
        assert sum(heights) <= H + 2 * export.DZI_OVERLAP * len(heights)  # the store is read once


def test_preview_of_a_wide_image_keeps_aspect_and_longest_side(tmp_path):
    image = np.full((1000, 3000, 3), (40, 90, 200), np.uint8)
    image[:, :1500] = (200, 30, 10)
    with _make_store(tmp_path / "wide.h5", image, tile=512) as store:
        path = export_preview(store, tmp_path / "preview.png")
    with Image.open(path) as png:
        assert png.size == (2048, 683)
        preview = np.asarray(png).astype(int)
    assert np.abs(preview[100, 100] - (200, 30, 10)).max() <= 1
    assert np.abs(preview[600, 2000] - (40, 90, 200)).max() <= 1


def test_preview_is_the_box_filtered_image_when_the_factor_is_whole(tmp_path, image):
    with _make_store(tmp_path / "t.h5", image[:128, :192], tile=64) as store:
        with Image.open(export_preview(store, tmp_path / "p.png", max_side=48)) as png:
            np.testing.assert_array_equal(np.asarray(png), _reduce_reference(image[:128, :192], 4))


def test_preview_of_a_small_image_is_the_image(tmp_path, store, image):
    with Image.open(export_preview(store, tmp_path / "p.png")) as png:
        np.testing.assert_array_equal(np.asarray(png), image)


def test_tiff_is_a_tiled_bigtiff_pyramid_of_half_size_levels(tmp_path, store, image):
    path = export_tiff(store, tmp_path / "image.tif", tile=32)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (32, 32)
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(150, 230, 3), (75, 115, 3), (38, 58, 3), (19, 29, 3)]
        np.testing.assert_array_equal(levels[0].asarray(), image)
        half = _reduce_reference(image, 2)
        np.testing.assert_array_equal(levels[1].asarray(), half)
        np.testing.assert_array_equal(levels[3].asarray(), _reduce_reference(_reduce_reference(half, 2), 2))
        # the generic tiled-TIFF layout OpenSlide reads: every level a top-level page, the reduced ones marked so,
        # no SubIFDs and no ImageDescription (tifffile's JSON shape description)
        assert len(tif.pages) == 4 and not tif.is_ome
        assert [p.subfiletype for p in tif.pages] == [0, 1, 1, 1]
        assert all(p.is_tiled and p.subifds is None and p.description == "" for p in tif.pages)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.tif", "tiles.h5"]  # scratch removed


def test_pyramid_levels_are_built_in_a_scratch_file_read_back_by_rows(tmp_path, image):
    """The half-size level is written and read with pwrite/pread, not mapped: mapped pages would count in the
    process's memory (768 MiB for the next level of a 32768-px image)."""
    level = export.LevelFile(tmp_path / "level.u8", H, W)
    assert (tmp_path / "level.u8").stat().st_size == H * W * 3
    for y0 in range(0, H, 64):  # in strips, as _strips writes them
        level[y0 : y0 + 64] = image[y0 : y0 + 64]
    np.testing.assert_array_equal(level.read(0, H), image)
    np.testing.assert_array_equal(level.read(37, 101), image[37:101])
    np.testing.assert_array_equal(level.read(140, 200), image[140:])  # clipped at the bottom
    with pytest.raises(ValueError, match="rows 0:2 of a 230-px level"):
        level[0:2] = image[:2, :100]
    level.close()
    assert not (tmp_path / "level.u8").exists()


def test_tiff_without_compression_and_rejects_bad_tile(tmp_path, store, image):
    path = export_tiff(store, tmp_path / "raw.tif", tile=256, compression=None)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series[0].levels) == 1  # fits one tile: no reduced levels
        np.testing.assert_array_equal(tif.asarray(), image)
    with pytest.raises(ValueError):
        export_tiff(store, tmp_path / "bad.tif", tile=40)


def _reference_levels(image: np.ndarray, count: int) -> list[np.ndarray]:
    """The pyramid as the exporters document it: each level the previous one box-reduced 2x (_box_reduce)."""
    levels = [image]
    while len(levels) < count:
        levels.append(_reduce_reference(levels[-1], 2))
    return levels


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package})")
    return path


def _tool_fields(*cmd) -> dict[str, str]:
    """`key: value` lines of openslide-show-properties / vipsheader -a, values unquoted."""
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    fields = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip().strip("'")
    return fields


def test_openslide_reads_the_tiff_levels(tmp_path, store):
    path = export_tiff(store, tmp_path / "image.tif", tile=32)
    props = _tool_fields(_tool("openslide-show-properties", "openslide-tools"), path)
    assert props["openslide.vendor"] == "generic-tiff"
    assert int(props["openslide.level-count"]) == 4
    sizes = [(int(props[f"openslide.level[{i}].height"]), int(props[f"openslide.level[{i}].width"])) for i in range(4)]
    assert sizes == [(150, 230), (75, 115), (38, 58), (19, 29)]
    assert props["openslide.level[0].tile-width"] == "32"


def test_openslide_decodes_every_level_to_the_exported_pixels(tmp_path, image):
    """Sides that halve exactly: openslide-write-png reads a row at a time from level-0 coordinates, so a
    level whose downsample is not whole (38 of 150 rows) comes back resampled by the tool itself."""
    image = image[:128, :192]
    with _make_store(tmp_path / "t.h5", image) as store:
        path = export_tiff(store, tmp_path / "image.tif", tile=32)
    write_png = _tool("openslide-write-png", "openslide-tools")
    for level, expected in enumerate(_reference_levels(image, 4)):
        h, w = expected.shape[:2]
        png = tmp_path / f"level{level}.png"
        out = subprocess.run([write_png, str(path), "0", "0", str(level), str(w), str(h), str(png)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        with Image.open(png) as decoded:
            rgba = np.asarray(decoded.convert("RGBA"))
        np.testing.assert_array_equal(rgba[..., :3], expected)
        assert (rgba[..., 3] == 255).all()  # inside the level: opaque


def test_openslide_reads_three_levels_of_a_default_tiled_export(tmp_path):
    """The defaults (512-px tiles): a 2048-px image has 3 levels, 2048, 1024 and 512."""
    image = np.random.default_rng(4).integers(0, 256, (1100, 2048, 3), dtype=np.uint8)
    with _make_store(tmp_path / "t.h5", image, tile=512) as store:
        path = export_tiff(store, tmp_path / "image.tif")
    props = _tool_fields(_tool("openslide-show-properties", "openslide-tools"), path)
    assert int(props["openslide.level-count"]) >= 3
    assert (props["openslide.level[2].width"], props["openslide.level[2].height"]) == ("512", "275")


def test_vips_opens_both_tiffs_and_their_levels(tmp_path, store):
    vipsheader = _tool("vipsheader", "libvips-tools")
    tiff = export_tiff(store, tmp_path / "image.tif", tile=32)
    ome = export_ome_tiff(store, tmp_path / "image.ome.tif", tile=32)
    fields = _tool_fields(vipsheader, "-a", tiff)
    assert (fields["width"], fields["height"], fields["bands"], fields["n-pages"]) == ("230", "150", "3", "4")
    fields = _tool_fields(vipsheader, "-a", ome)
    assert (fields["width"], fields["height"], fields["bands"], fields["n-subifds"]) == ("230", "150", "3", "3")
    assert _tool_fields(vipsheader, "-a", f"{tiff}[page=3]")["width"] == "29"
    assert _tool_fields(vipsheader, "-a", f"{ome}[subifd=2]")["width"] == "29"  # subifd 0 is the first reduced


@pytest.mark.parametrize("exporter", [export_tiff, export_ome_tiff])
def test_every_tile_of_every_level_is_the_box_reduced_store(tmp_path, store, image, exporter):
    """Tile by tile, as a viewer reads them (decoded one at a time, padded with zeros at the edges)."""
    path = exporter(store, tmp_path / "x.tif", tile=32)
    reference = _reference_levels(image, 4)
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert len(levels) == 4
        for level, expected in zip(levels, reference):
            page = level.pages[0]
            assert page.is_tiled and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
            h, w = expected.shape[:2]
            columns = -(-w // 32)
            assert len(page.dataoffsets) == -(-h // 32) * columns
            for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
                tif.filehandle.seek(offset)
                tile, _, _ = page.decode(tif.filehandle.read(count), index)
                y0, x0 = index // columns * 32, index % columns * 32
                padded = np.zeros((32, 32, 3), np.uint8)
                part = expected[y0 : y0 + 32, x0 : x0 + 32]
                padded[: part.shape[0], : part.shape[1]] = part
                np.testing.assert_array_equal(tile.reshape(32, 32, 3), padded)


def test_ome_tiff_is_ome_xml_with_the_pyramid_in_subifds(tmp_path, store, image):
    path = export_ome_tiff(store, tmp_path / "image.ome.tif", tile=32)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff and tif.is_ome
        assert len(tif.pages) == 1  # one top-level page; the reduced levels hang off it
        page = tif.pages[0]
        assert len(page.subifds) == 3 and page.is_tiled and page.photometric == tifffile.PHOTOMETRIC.RGB
        root = ET.fromstring(page.description)
        ns = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
        pixels = root.find("ome:Image/ome:Pixels", ns)
        assert {k: pixels.get(k) for k in ("SizeX", "SizeY", "SizeC", "SizeZ", "SizeT", "Type", "Interleaved")} == {
            "SizeX": "230", "SizeY": "150", "SizeC": "3", "SizeZ": "1", "SizeT": "1", "Type": "uint8",
            "Interleaved": "true"}
        assert pixels.find("ome:Channel", ns).get("SamplesPerPixel") == "3"
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(150, 230, 3), (75, 115, 3), (38, 58, 3), (19, 29, 3)]
        assert [lv.pages[0].subfiletype for lv in levels] == [0, 1, 1, 1]
        np.testing.assert_array_equal(levels[0].asarray(), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.ome.tif", "tiles.h5"]  # scratch removed


def test_plain_tiff_named_ome_stays_plain(tmp_path, store):
    """tifffile writes OME-XML into any file named *.ome.tif unless told not to; --out may name one so."""
    with tifffile.TiffFile(export_tiff(store, tmp_path / "x.ome.tif", tile=32)) as tif:
        assert not tif.is_ome and len(tif.pages) == 4


def test_stitch_writes_image_tif_and_image_ome_tif(tmp_path, image):
    job = tmp_path / "job"
    job.mkdir()
    _make_store(job / "tiles.h5", image).close()
    out = hpcrender("stitch", job, timeout=120)  # --format tiff by default
    assert out.returncode == 0, out.stderr
    with tifffile.TiffFile(job / "image.tif") as tif:
        assert not tif.is_ome and tif.pages[0].description == ""  # the generic layout
        assert len(tif.pages) == 1  # 230 px fits one 512-px tile: no reduced levels
    out = hpcrender("stitch", job, "--format", "ome-tiff", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(job / "image.ome.tif")
    with tifffile.TiffFile(job / "image.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].shape == (150, 230, 3)
    bad = hpcrender("stitch", job, "--format", "ome", timeout=120)
    assert bad.returncode == 2 and "ome-tiff" in bad.stderr  # click lists the choices


def test_dzi_layout_and_tile_content(tmp_path, store, image):
    dzi = export_dzi(store, tmp_path / "image.dzi")
    assert dzi == tmp_path / "image.dzi"
    root = ET.parse(dzi).getroot()
    ns = "{http://schemas.microsoft.com/deepzoom/2008}"
    assert root.tag == f"{ns}Image"
    assert (root.get("TileSize"), root.get("Overlap"), root.get("Format")) == ("254", "1", "png")
    size = root.find(f"{ns}Size")
    assert (size.get("Width"), size.get("Height")) == ("230", "150")
    files = tmp_path / "image_files"
    assert sorted(int(p.name) for p in files.iterdir()) == list(range(9))  # ceil(log2(230)) = 8
    assert [p.name for p in (files / "0").iterdir()] == ["0_0.png"]
    with Image.open(files / "0" / "0_0.png") as png:
        assert png.size == (1, 1)
    with Image.open(files / "8" / "0_0.png") as png:
        np.testing.assert_array_equal(np.asarray(png), image)
    with Image.open(files / "7" / "0_0.png") as png:
        np.testing.assert_array_equal(np.asarray(png), _reduce_reference(image, 2))


def test_dzi_tiles_overlap_their_neighbours_by_one_pixel(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (300, 520, 3), dtype=np.uint8)
    with _make_store(tmp_path / "t.h5", image, tile=128) as store:
        export_dzi(store, tmp_path / "big")
    top = tmp_path / "big_files" / "10"  # ceil(log2(520)) = 10
    assert sorted(p.name for p in top.iterdir()) == ["0_0.png", "0_1.png", "1_0.png", "1_1.png", "2_0.png", "2_1.png"]
    expected = {"0_0": image[0:255, 0:255], "1_1": image[253:300, 253:509], "2_0": image[0:255, 507:520]}
    for name, pixels in expected.items():
        with Image.open(top / f"{name}.png") as png:
            np.testing.assert_array_equal(np.asarray(png), pixels)


def test_dzi_export_again_replaces_the_old_tiles(tmp_path, store):
    export_dzi(store, tmp_path / "image")
    stale = tmp_path / "image_files" / "3" / "stale.png"
    stale.write_bytes(b"x")
    export_dzi(store, tmp_path / "image")
    assert not stale.exists() and (tmp_path / "image_files" / "3" / "0_0.png").exists()


def test_job_export_writes_png_and_preview_for_a_small_image(tmp_path, store, image):
    outputs = export_job(store, tmp_path / "job")
    assert [p.name for p in outputs] == ["image.png", "preview.png"]
    with Image.open(outputs[0]) as png:
        np.testing.assert_array_equal(np.asarray(png), image)


def test_job_export_writes_tiff_above_the_png_limit(tmp_path, store, monkeypatch):
    monkeypatch.setattr(export, "MAX_PNG_PIXELS", H * W - 1)
    outputs = export_job(store, tmp_path / "job")
    assert [p.name for p in outputs] == ["image.tif", "preview.png"]
    assert not (tmp_path / "job" / "image.png").exists()


def test_job_export_refuses_an_unfinished_store(tmp_path, image):
    with _make_store(tmp_path / "t.h5", image, skip={(1, 1)}) as store:
        with pytest.raises(BadInput, match="1 of 12 tiles"):
            export_job(store, tmp_path / "job")
        assert not (tmp_path / "job" / "image.png").exists()
        outputs = export_job(store, tmp_path / "job", allow_incomplete=True)
        with Image.open(outputs[0]) as png:
            assert not np.asarray(png)[64:128, 64:128].any()  # the missing tile is black


def test_store_exporters_and_records_never_import_torch_or_mpi():
    code = (
        "import sys\n"
        "import hpcrender.output.tiles, hpcrender.output.store, hpcrender.output.export, hpcrender.output.records\n"
        "import hpcrender.run.progress, hpcrender.measure.metrics\n"
        "print(sorted(m for m in ('torch', 'mpi4py') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
