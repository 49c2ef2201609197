"""KV-cache layouts: prefill <-> logical <-> decode conversions are exact for every pair of grids."""

import numpy as np
import pytest

from kvcache.layout import PrefillKVLayout
from mesh.errors import WaferError
from mesh.executors import Grid
from model.config import TINY_LLAMA
from model.cache_layout import DecodeKVLayout, cache_to_decode_layout, decode_kv_layout
from model.wafer_layout import LayoutMode, WaferLayout

PREFILL_GRIDS = ["1x1", "1x2", "2x2", "1x3", "3x4"]
DECODE_GRIDS = ["1x1", "2x2", "3x3", "1x4", "5x2", "4x1"]


@pytest.mark.parametrize("prefill", PREFILL_GRIDS)
@pytest.mark.parametrize("decode", DECODE_GRIDS)
def test_prefill_to_decode_is_exact(prefill, decode):
    K, n, H = 3, 11, 4  # 3 heads pad to 4 over 2 columns, to 3 over 3, to 4 over 4
    k = np.random.default_rng(0).standard_normal((K, n, H)).astype(np.float32)
    pl = PrefillKVLayout(Grid.parse(prefill), K)
    shards = pl.shards(k)
    assert [s.shape for s in shards] == [(pl.kc, n, H)] * pl.grid.cols
    assert np.array_equal(pl.to_logical(shards), k)
    dl = DecodeKVLayout(Grid.parse(decode), K, positions_per_row=-(-16 // Grid.parse(decode).rows))
    cores = dl.to_cores(pl.to_logical(shards))
    assert cores.shape == (dl.grid.rows, dl.grid.cols, dl.kc, dl.positions_per_row + 1, H)
    assert np.array_equal(dl.from_cores(cores, n), k)
    # Everything that is not one of the n x K positions is zero: padding heads, later positions,
    # the scratch slot.
    assert np.count_nonzero(cores) == np.count_nonzero(k)


def test_decode_layout_by_hand():
    """2 heads, 5 positions on a 2x2 grid: position p on row p % 2 at slot p // 2, head h on column h."""
    k = np.arange(2 * 5 * 1, dtype=np.float32).reshape(2, 5, 1) + 1  # value = 5 h + p + 1
    cores = DecodeKVLayout(Grid(2, 2), 2, 3).to_cores(k)
    assert cores[:, :, 0, :, 0].tolist() == [[[1, 3, 5, 0], [6, 8, 10, 0]],
                                             [[2, 4, 0, 0], [7, 9, 0, 0]]]


def test_decoder_uses_the_decode_layout():
    layout = WaferLayout(TINY_LLAMA, Grid(3, 3), 64, mode=LayoutMode.HEADS)
    k = np.random.default_rng(1).standard_normal((2, 20, 16)).astype(np.float32)
    want = DecodeKVLayout(Grid(3, 3), 2, layout.s).to_cores(k)
    assert np.array_equal(cache_to_decode_layout(k, layout), want)


def test_replicated_kv_heads_land_on_every_column_that_holds_them():
    """tiny-llama (K 2, G 2) on 2x4: each KV head lies on two columns (one query head each)."""
    layout = WaferLayout(TINY_LLAMA, Grid(2, 4), 64, mode=LayoutMode.HEADS)
    dl = decode_kv_layout(layout)
    assert dl.column_heads == ((0,), (0,), (1,), (1,))  # by hand: rep 2, gc 1
    k = np.random.default_rng(2).standard_normal((2, 9, 16)).astype(np.float32)
    cores = cache_to_decode_layout(k, layout)
    assert cores.shape == (2, 4, 1, layout.s + 1, 16)
    for c, h in enumerate([0, 0, 1, 1]):
        assert np.array_equal(cores[0, c, 0, :5], k[h, 0::2]) and np.array_equal(cores[1, c, 0, :4], k[h, 1::2])
    assert np.array_equal(dl.from_cores(cores, 9), k)
    with pytest.raises(WaferError, match="columns hold KV heads"):
        DecodeKVLayout(Grid(1, 2), 2, 4, column_heads=((0,), (0,)))


def test_prefill_layout_json_round_trip_and_refusals():
    pl = PrefillKVLayout(Grid(2, 3), 5, row=1)
    assert pl.to_json() == {"mesh": "prefill", "grid": [2, 3], "row": 1,
                            "axes": {"B": "row", "K": "col", "S": None, "H": None}, "padded": {"K": 6}}
    assert PrefillKVLayout.from_json(pl.to_json(), 5) == pl
    bad = [({**pl.to_json(), "padded": {"K": 5}}, "pad to 6"),
           ({**pl.to_json(), "axes": {"B": "row", "K": None, "S": "col", "H": None}}, "axes"),
           ({**pl.to_json(), "mesh": "decode"}, "'decode'"),
           ({**pl.to_json(), "grid": [2, 0]}, "grid"),
           ({**pl.to_json(), "row": 2}, "row 2 is outside"),
           ({"mesh": "prefill"}, "expected keys")]
    for d, message in bad:
        with pytest.raises(WaferError, match=message):
            PrefillKVLayout.from_json(d, 5)


def test_full_grid_cache_lands_head_dim_slices():
    """tiny-llama (K 2, H 16) on 2x6, full-grid: 2 segments of 3 columns (KV head 0 on columns 0-2,
    head 1 on 3-5), each column 3 rotary pairs = 6 dims: column j of a segment holds pairs 3j ..
    3j+2, i.e. dims [3j, 3j+1, 3j+2, 8+3j, 8+3j+1, 8+3j+2], those >= 8 pairs (j = 2: pair 8) zero."""
    layout = WaferLayout(TINY_LLAMA, Grid(2, 6), 64, mode=LayoutMode.FULL)
    assert (layout.seg, layout.hc) == (3, 6)
    assert layout.column_dims(0) == (0, 1, 2, 8, 9, 10)
    assert layout.column_dims(5) == (6, 7, None, 14, 15, None)
    dl = decode_kv_layout(layout)
    k = np.random.default_rng(5).standard_normal((2, 9, 16)).astype(np.float32)
    cores = cache_to_decode_layout(k, layout)
    assert cores.shape == (2, 6, 1, layout.s + 1, 6)
    for c, h in enumerate([0, 0, 0, 1, 1, 1]):
        dims = [d for d in layout.column_dims(c) if d is not None]
        n = len(dims)
        assert np.array_equal(cores[1, c, 0, :4, :n // 2], k[h, 1::2][:, dims[: n // 2]])
        assert np.array_equal(cores[0, c, 0, :5, 3:3 + n // 2], k[h, 0::2][:, dims[n // 2:]])
    assert np.array_equal(dl.from_cores(cores, 9), k)
    assert np.count_nonzero(cores) == np.count_nonzero(k)  # each dim once: no replicated KV here
