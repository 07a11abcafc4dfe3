"""Band arithmetic: partitions, alignment, rows at every scale, conv halos and the per-step byte count."""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import pytest

from hpcrender.errors import DoesNotFit
from hpcrender.parallel.bands import (
    GROUPNORM_STAT_BYTES, TOKEN_COUNT_BYTES, Band, BufferBytes, ComputeKind, ComputeSpec, LayerKind, LayerSpec,
    Tokens, band_conv_rows, band_rows, conv_halo, conv_output_rows, exchange_buffers, expected_bytes,
    gathered_keys_values, keeps_band_geometry, latent_bands, layer_macs, layer_scale, memory_estimate, split_rows,
    step_macs, unet_alignment,
)


def test_split_rows_covers_every_row_in_near_equal_contiguous_bands_larger_first():
    for rows in range(1, 41):
        for parts in range(1, rows + 1):
            bands = split_rows(rows, parts)
            assert len(bands) == parts
            assert bands[0].start == 0 and bands[-1].stop == rows
            assert all(a.stop == b.start for a, b in zip(bands, bands[1:]))
            sizes = [b.size for b in bands]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("rows, parts", [(0, 1), (2, 3), (5, 6), (3, 0)])
def test_split_rows_refuses_fewer_rows_than_parts(rows, parts):
    with pytest.raises(DoesNotFit):
        split_rows(rows, parts)


def test_latent_bands_start_on_coarse_rows_and_cover_the_whole_latent():
    for align in (1, 2, 4, 8):
        for latent_rows in range(1, 80):
            for parts in range(1, 7):
                if latent_rows // align < parts:
                    with pytest.raises(DoesNotFit):
                        latent_bands(latent_rows, align, parts)
                    continue
                bands = latent_bands(latent_rows, align, parts)
                assert len(bands) == parts
                assert bands[0].start == 0 and bands[-1].stop == latent_rows
                assert all(a.stop == b.start for a, b in zip(bands, bands[1:]))
                assert all(b.start % align == 0 for b in bands)
                coarse = [b.size // align for b in bands]
                assert coarse == [s.size for s in split_rows(latent_rows // align, parts)]
                # only the last band holds rows past the last whole coarse row
                assert all(b.size % align == 0 for b in bands[:-1])
                assert bands[-1].size % align == latent_rows % align


def test_latent_bands_too_small_an_image_names_pixels_coarse_rows_and_ranks():
    with pytest.raises(DoesNotFit, match=r"^a height of 192 px gives 3 row\(s\) of the coarsest feature map \(one per "
                                         r"64 px\), fewer than its 4 ranks: make it at least 256 px high"):
        latent_bands(24, 8, 4)


def test_unet_alignment_counts_downsampling_blocks():
    sd = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
    sdxl = SimpleNamespace(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"))
    assert unet_alignment(sd) == 8
    assert unet_alignment(sdxl) == 4


@pytest.mark.parametrize("kernel, stride, padding, dilation, halo", [
    (3, 1, 1, 1, (1, 1)),
    (3, 2, 1, 1, (1, 0)),
    (1, 1, 0, 1, (0, 0)),
    (1, 2, 0, 1, (0, -1)),
    (5, 1, 2, 1, (2, 2)),
    (3, 1, 2, 2, (2, 2)),
    (7, 2, 3, 1, (3, 2)),
])
def test_conv_halo_table(kernel, stride, padding, dilation, halo):
    assert conv_halo(kernel, stride, padding, dilation) == halo


def _read_rows(start: int, stop: int, rows: int, kernel: int, stride: int, padding: int, dilation: int):
    """Input rows (inside the image) that the outputs of band [start, stop) read, by brute force."""
    out_rows = (rows + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    read = set()
    for o in range(out_rows):
        if start <= o * stride < stop:
            read.update(o * stride - padding + dilation * i for i in range(kernel))
    return {r for r in read if 0 <= r < rows}


def test_conv_halo_is_exactly_what_the_band_reads_beyond_itself():
    for kernel in range(1, 8):
        for stride in (1, 2, 3):
            for dilation in (1, 2):
                for padding in range(0, 4):
                    if not keeps_band_geometry(kernel, stride, padding, dilation):
                        continue
                    above, below = conv_halo(kernel, stride, padding, dilation)
                    rows = 12 * stride
                    start, stop = 4 * stride, 8 * stride  # an interior band, aligned to the stride
                    read = _read_rows(start, stop, rows, kernel, stride, padding, dilation)
                    assert min(read) == start - above
                    assert max(read) == stop - 1 + below


def test_keeps_band_geometry_is_exactly_ceil_rows_over_stride():
    for kernel in range(1, 8):
        for stride in (1, 2, 3):
            for dilation in (1, 2):
                for padding in range(0, 5):
                    span = dilation * (kernel - 1) + 1
                    ceil_everywhere = all((h + 2 * padding - span) // stride + 1 == math.ceil(h / stride)
                                          for h in range(span, 40))
                    assert keeps_band_geometry(kernel, stride, padding, dilation) == ceil_everywhere


def _rows_by_brute_force(bands, level: int, rows: int) -> list[int]:
    """Rows of each band after `level` stride-2 "same" convolutions of an image of `rows` rows."""
    total = rows
    for _ in range(level):
        total = math.ceil(total / 2)
    owner = [next(i for i, b in enumerate(bands) if b.start <= o * 2 ** level < b.stop) for o in range(total)]
    return [owner.count(i) for i in range(len(bands))]


def test_band_rows_and_layer_scale_follow_stride_two_levels_including_a_remainder_band():
    for align in (2, 4, 8):
        levels = align.bit_length() - 1
        for latent_rows in range(align, 10 * align):
            for parts in range(1, 5):
                if latent_rows // align < parts:
                    continue
                bands = latent_bands(latent_rows, align, parts)
                for level in range(levels + 1):
                    scale = Fraction(1, 2 ** level)
                    rows = band_rows(bands, scale)
                    assert list(rows) == _rows_by_brute_force(bands, level, latent_rows)
                    for rank in range(parts):
                        assert layer_scale(bands, rank, rows[rank]) == scale
                for up in range(1, 4):  # a decoder's feature maps double
                    scale = Fraction(2 ** up)
                    rows = band_rows(bands, scale)
                    assert list(rows) == [b.size * 2 ** up for b in bands]
                    assert all(layer_scale(bands, r, rows[r]) == scale for r in range(parts))


def test_band_rows_refuses_boundaries_between_feature_map_rows():
    with pytest.raises(DoesNotFit):
        band_rows((Band(0, 3), Band(3, 8)), Fraction(1, 2))


def test_expected_bytes_counts_halo_rows_to_neighbours_padded_keys_values_and_statistics():
    bands = (Band(0, 8), Band(8, 16), Band(16, 20))
    conv = LayerSpec(LayerKind.HALO_CONV, Fraction(1), width=10, channels=4, halo=(1, 1))
    down = LayerSpec(LayerKind.HALO_CONV, Fraction(1), width=10, channels=4, halo=(1, 0))
    attn = LayerSpec(LayerKind.SELF_ATTENTION, Fraction(1, 2), width=5, channels=8)
    norm = LayerSpec(LayerKind.GROUP_NORM, Fraction(1), width=10, groups=4)
    row = 2 * 4 * 10 * 4  # batch 2, 4 channels, 10 columns, float32
    assert [expected_bytes([conv], bands, r, 2, 4) for r in range(3)] == [row, 2 * row, row]
    # a stride-2 conv only reads the row above: each band sends its last row down, nothing up
    assert [expected_bytes([down], bands, r, 2, 4) for r in range(3)] == [row, row, 0]
    # keys and values padded to the largest band: (4, 4, 2) rows at half scale, 5 columns
    assert expected_bytes([attn], bands, 2, 2, 4) == 2 * 4 * 5 * 8 * 4
    assert expected_bytes([norm], bands, 1, 2, 4) == 2 * 4 * GROUPNORM_STAT_BYTES
    layers = [conv, attn, norm]
    total = expected_bytes(layers, bands, 1, 2, 4)
    assert total == 2 * row + 2 * 4 * 5 * 8 * 4 + 2 * 4 * GROUPNORM_STAT_BYTES
    assert expected_bytes(layers, bands, 1, 2, 4, groupnorm_stats=False) == total - 2 * 4 * GROUPNORM_STAT_BYTES
    assert expected_bytes(layers, bands, 1, 2, 4, registration=True) == total + TOKEN_COUNT_BYTES
    assert expected_bytes(layers, (Band(0, 20),), 0, 2, 4) == 0


def test_exchange_buffers_hold_both_halos_every_band_s_keys_values_and_statistics_twice():
    bands = (Band(0, 8), Band(8, 16), Band(16, 20))
    conv = LayerSpec(LayerKind.HALO_CONV, Fraction(1), width=10, channels=4, halo=(1, 1))
    down = LayerSpec(LayerKind.HALO_CONV, Fraction(1), width=10, channels=4, halo=(1, 0))
    wide = LayerSpec(LayerKind.HALO_CONV, Fraction(1), width=10, channels=4, halo=(2, 2))
    attn = LayerSpec(LayerKind.SELF_ATTENTION, Fraction(1, 2), width=5, channels=8)
    norm = LayerSpec(LayerKind.GROUP_NORM, Fraction(1), width=10, groups=4)
    row = 2 * 4 * 10 * 4  # batch 2, 4 channels, 10 columns, float32
    # rows to send and to receive, up and down, on every rank (the image's edges keep theirs unused)
    assert exchange_buffers([conv], bands, 2, 4) == BufferBytes(halos=4 * row)
    assert exchange_buffers([down], bands, 2, 4) == BufferBytes(halos=2 * row)
    assert exchange_buffers([wide], bands, 2, 4) == BufferBytes(halos=8 * row)
    # 3 bands received + 1 sent, each padded to the largest: 4 rows at half scale, 5 columns
    assert exchange_buffers([attn], bands, 2, 4) == BufferBytes(keys_values=4 * 2 * 4 * 5 * 8 * 4)
    assert exchange_buffers([norm], bands, 2, 4) == BufferBytes(statistics=2 * 2 * 4 * GROUPNORM_STAT_BYTES)
    # float64 statistics whatever the activations' type
    assert exchange_buffers([norm], bands, 2, 2) == exchange_buffers([norm], bands, 2, 4)
    both = exchange_buffers([conv, attn, norm, attn], bands, 2, 4)
    assert both.total == 4 * row + 2 * 4 * 2 * 4 * 5 * 8 * 4 + 2 * 2 * 4 * GROUPNORM_STAT_BYTES
    assert exchange_buffers([conv, attn, norm], (Band(0, 20),), 2, 4) == BufferBytes()


@pytest.mark.parametrize("ranks", [2, 3, 4, 8])
def test_stale_keys_values_are_the_whole_image_s_whatever_the_number_of_bands(ranks):
    attn = LayerSpec(LayerKind.SELF_ATTENTION, Fraction(1), width=64, channels=16)
    bands = latent_bands(64, 1, ranks)
    received = exchange_buffers([attn], bands, 2, 2).keys_values * ranks // (ranks + 1)
    assert received == 2 * (ranks * max(b.size for b in bands)) * 64 * 16 * 2 >= 2 * 64 * 64 * 16 * 2


def test_memory_estimate_adds_the_weights_to_the_buffers():
    norm = LayerSpec(LayerKind.GROUP_NORM, Fraction(1), width=10, groups=4)
    bands = (Band(0, 8), Band(8, 16))
    estimate = memory_estimate([norm], 1000, bands, 1, 2)
    assert (estimate.weights, estimate.total) == (2000, 2000 + 2 * 4 * GROUPNORM_STAT_BYTES)
    assert memory_estimate([norm], 1000, (), 1, 2).total == 2000


def test_memory_estimate_adds_activations_and_says_what_a_loop_adds_to_a_loaded_model():
    norm = LayerSpec(LayerKind.GROUP_NORM, Fraction(1), 8, groups=4)
    bands = split_rows(8, 2)
    estimate = memory_estimate([norm], 1000, bands, 2, 2, activations=500)
    buffers = 2 * 2 * 4 * GROUPNORM_STAT_BYTES
    assert (estimate.total, estimate.step) == (2000 + buffers + 500, buffers + 500)


def test_gathered_keys_values_are_the_other_bands_tokens_of_the_largest_self_attention():
    bands = (Band(0, 8), Band(8, 16), Band(16, 20))  # 20 latent rows: 8, 8, 4; at scale 1/2: 4, 4, 2
    fine = LayerSpec(LayerKind.SELF_ATTENTION, Fraction(1, 2), 6, channels=10)
    coarse = LayerSpec(LayerKind.SELF_ATTENTION, Fraction(1, 4), 3, channels=40)
    conv = LayerSpec(LayerKind.HALO_CONV, Fraction(1), 12, channels=4, halo=(1, 1))
    for rank, others in enumerate((6, 6, 8)):  # rows of the other bands at scale 1/2
        want = max(2 * others * 6 * 10 * 4, 2 * (others // 2) * 3 * 40 * 4)
        assert gathered_keys_values([conv, fine, coarse], bands, rank, 2, 4) == want
    assert gathered_keys_values([fine], (Band(0, 20),), 0, 2, 4) == 0
    assert gathered_keys_values([conv], bands, 0, 2, 4) == 0


def test_conv_output_rows_of_same_padded_and_unpadded_convolutions():
    for rows in range(1, 30):
        assert conv_output_rows(rows, 3, 1, 1) == rows
        assert conv_output_rows(rows, 3, 2, 1) == -(-rows // 2)
        assert conv_output_rows(rows, 3, 1, 0) == max(rows - 2, 0)
        assert conv_output_rows(rows, 3, 1, 2, dilation=2) == rows


def test_band_conv_rows_are_a_band_s_own_rows_plus_at_most_the_recomputed_edges():
    for kernel, stride, dilation in [(3, 1, 1), (3, 2, 1), (5, 1, 1), (5, 2, 1), (3, 1, 2), (1, 1, 1)]:
        pad = dilation * (kernel - 1) // 2
        for height in range(1, 20):
            own = conv_output_rows(height, kernel, stride, pad, dilation)
            assert band_conv_rows(height, kernel, stride, pad, dilation, True, True) == own
            for first, last in [(True, False), (False, True), (False, False)]:
                if not last and height % stride:
                    continue  # bands above the last end on a multiple of the stride (BandConv2d refuses others)
                extra = band_conv_rows(height, kernel, stride, pad, dilation, first, last) - own
                edges = (not first) + (not last)
                assert 0 <= extra <= edges * -(-pad // stride) * 2


def test_layer_macs_of_convolutions_linear_layers_and_attention():
    bands = (Band(0, 8), Band(8, 12))  # at scale 1: 8 and 4 rows, width 6
    conv = ComputeSpec(ComputeKind.CONV, Fraction(1), 6, in_channels=4, out_channels=8, kernel=(3, 3), padding=1,
                       halo=True)
    per_output = 8 * 4 * 9
    assert layer_macs(conv, bands, 1, 2, 77, exchanging=False) == 2 * 4 * 6 * per_output
    # band 1's first output row reads the halo: it is computed twice (zero rows, then the strip)
    assert layer_macs(conv, bands, 1, 2, 77, exchanging=True) == 2 * 5 * 6 * per_output
    assert layer_macs(conv, bands, 0, 2, 77, exchanging=True) == 2 * 9 * 6 * per_output
    down = ComputeSpec(ComputeKind.CONV, Fraction(1), 6, in_channels=4, out_channels=4, kernel=(3, 3), stride=2,
                       padding=1, groups=2, halo=True)
    assert layer_macs(down, bands, 0, 1, 77, exchanging=False) == 4 * 3 * 4 * 2 * 9
    spatial = ComputeSpec(ComputeKind.LINEAR, Fraction(1, 2), 3, in_channels=5, out_channels=7)
    text = ComputeSpec(ComputeKind.LINEAR, Fraction(1, 2), 3, in_channels=5, out_channels=7, tokens=Tokens.TEXT,
                       text_kv=True)
    image = ComputeSpec(ComputeKind.LINEAR, in_channels=5, out_channels=7, tokens=Tokens.IMAGE)
    assert layer_macs(spatial, bands, 0, 2, 77, True) == 2 * 4 * 3 * 35
    assert layer_macs(text, bands, 0, 2, 77, True) == 2 * 77 * 35
    assert layer_macs(text, bands, 0, 2, 77, True, text_kv_cached=True) == 0
    assert layer_macs(image, bands, 1, 2, 77, True) == 2 * 35
    own = ComputeSpec(ComputeKind.ATTENTION, Fraction(1, 2), 3, channels=16, self_attention=True)
    cross = ComputeSpec(ComputeKind.ATTENTION, Fraction(1, 2), 3, channels=16)
    assert layer_macs(own, bands, 1, 2, 77, exchanging=True) == 2 * (2 * 3) * (6 * 3) * 16
    assert layer_macs(own, bands, 1, 2, 77, exchanging=False) == 2 * (2 * 3) * (2 * 3) * 16
    assert layer_macs(cross, bands, 1, 2, 77, exchanging=True) == 2 * (2 * 3) * 77 * 16
    specs = [conv, down, spatial, text, image, own, cross]
    assert step_macs(specs, bands, 1, 2, 77, True) == sum(layer_macs(s, bands, 1, 2, 77, True) for s in specs)
