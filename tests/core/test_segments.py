"""segments: where each adapter of a fused layer reads its rows of ``lora_A``/``lora_B`` and adds
its output rows. Checked against slices written out by hand (equal splits, GQA's
``[H·d, KV·d, KV·d]``), against a naive row count for every ``enable_lora`` mask, and against
the full ΔW built split by split (``_naive_lora.delta_merged``), plus the refusals of bad input."""
import dataclasses
import itertools

import pytest
import torch

import lora_layers as L
from lora_layers.core.segments import Block, Segments
from _naive_lora import delta_merged

GQA_SPLITS = [4 * 8, 2 * 8, 2 * 8]  # 4 query heads, 2 KV heads, head size 8
MASKS = [list(m) for m in itertools.product([True, False], repeat=3) if any(m)]


def _adapter(split_sizes, enable, r, in_features=5, seed=0):
    """Random stacked ``lora_A (r·n, in)`` and ``lora_B (Σ enabled sizes, r)``."""
    gen = torch.Generator().manual_seed(seed)
    n, rows = sum(enable), sum(size for size, on in zip(split_sizes, enable) if on)
    return (torch.randn(r * n, in_features, generator=gen, dtype=torch.float64),
            torch.randn(rows, r, generator=gen, dtype=torch.float64))


def _naive_blocks(split_sizes, enable, r):
    """(output rows, lora_A rows, lora_B rows) of each enabled split, counted row by row."""
    blocks, a_row, b_row = [], 0, 0
    for j, size in enumerate(split_sizes):
        out_row = sum(split_sizes[:j])
        if enable[j]:
            blocks.append((out_row, out_row + size, a_row, a_row + r, b_row, b_row + size))
            a_row, b_row = a_row + r, b_row + size
    return blocks


# ----------------------------------------------------------------------------- the row ranges, by hand

def test_equal_splits_as_loralib_lays_them_out():
    seg = Segments.from_splits([4, 4, 4], [True, True, True])
    assert seg.out_features == 12 and seg.spans == ((0, 4), (4, 8), (8, 12))
    assert seg.count == 3 and seg.b_rows == 12 and not seg.is_full
    assert seg.blocks(2) == (Block(0, 4, 0, 2, 0, 4), Block(4, 8, 2, 4, 4, 8), Block(8, 12, 4, 6, 8, 12))


def test_gqa_splits_with_k_disabled():
    seg = Segments.from_splits(GQA_SPLITS, [True, False, True])
    assert seg.out_features == 64 and seg.spans == ((0, 32), (48, 64))
    assert seg.count == 2 and seg.b_rows == 48
    # q: A rows 0:3, B rows 0:32, outputs 0:32; v: A rows 3:6, B rows 32:48, outputs 48:64
    assert seg.blocks(3) == (Block(0, 32, 0, 3, 0, 32), Block(48, 64, 3, 6, 32, 48))


def test_gqa_splits_all_enabled():
    seg = Segments.from_splits(GQA_SPLITS, [True, True, True])
    assert seg.blocks(1) == (Block(0, 32, 0, 1, 0, 32), Block(32, 48, 1, 2, 32, 48), Block(48, 64, 2, 3, 48, 64))


def test_one_span_over_everything_is_a_plain_linear():
    for seg in (Segments.full(7), Segments.from_splits([7], [True]), Segments.of(None, 7)):
        assert seg.spans == ((0, 7),) and seg.is_full and seg.count == 1 and seg.b_rows == 7
        assert seg.blocks(4) == (Block(0, 7, 0, 4, 0, 7),)
    assert not Segments.from_splits([3, 4], [True, True]).is_full  # two adapters over all rows: not one


@pytest.mark.parametrize("enable", MASKS, ids=lambda m: "".join("x" if on else "-" for on in m))
@pytest.mark.parametrize("split_sizes", [[4, 4, 4], GQA_SPLITS, [1, 6, 2]], ids=["equal", "gqa", "odd"])
def test_every_mask_gives_the_naive_rows(split_sizes, enable):
    seg = Segments.from_splits(split_sizes, enable)
    assert [tuple(block) for block in seg.blocks(3)] == _naive_blocks(split_sizes, enable, 3)
    assert seg.count == sum(enable) and seg.b_rows == sum(s for s, on in zip(split_sizes, enable) if on)
    assert seg.out_features == sum(split_sizes)


def test_merged_linear_uses_the_segments_of_its_splits():
    layer = L.MergedLinear(12, 64, r=2, enable_lora=[True, False, True], split_sizes=GQA_SPLITS)
    assert layer.segments == Segments.from_splits(GQA_SPLITS, [True, False, True])
    assert tuple(layer.lora_A.shape) == (2 * 2, 12) and tuple(layer.lora_B.shape) == (48, 2)


def test_spans_in_any_order_keep_their_order():
    seg = Segments(10, [[6, 10], [0, 2]])  # lists, and v before q: stored as given, as int tuples
    assert seg.spans == ((6, 10), (0, 2)) and all(type(v) is int for span in seg.spans for v in span)
    assert seg.blocks(2) == (Block(6, 10, 0, 2, 0, 4), Block(0, 2, 2, 4, 4, 6))
    with pytest.raises(dataclasses.FrozenInstanceError):
        seg.spans = ((0, 10),)


# ----------------------------------------------------------------------------- the delta and PEFT's layout

@pytest.mark.parametrize("enable", MASKS, ids=lambda m: "".join("x" if on else "-" for on in m))
def test_deltas_are_the_rows_of_the_full_delta(enable):
    seg, r = Segments.from_splits(GQA_SPLITS, enable), 3
    A, B = _adapter(GQA_SPLITS, enable, r)
    full = 0.5 * delta_merged(A, B, GQA_SPLITS, enable, r)  # zero rows where a split is disabled
    covered = torch.zeros(64, dtype=torch.bool)
    for block, delta in seg.deltas(A, B, 0.5):
        torch.testing.assert_close(delta, full[block.out0:block.out1], rtol=1e-12, atol=0)
        covered[block.out0:block.out1] = True
    assert not full[~covered].any()
    (_, delta), *_ = seg.deltas(A, B, 0.5, dtype=torch.float32)
    assert delta.dtype == torch.float32


@pytest.mark.parametrize("enable", MASKS, ids=lambda m: "".join("x" if on else "-" for on in m))
def test_block_diagonal_b_times_stacked_a_is_the_delta(enable):
    # PEFT's fused layout: one (out, r·n) lora_B whose product with the stacked lora_A is ΔW.
    seg, r = Segments.from_splits(GQA_SPLITS, enable), 2
    A, B = _adapter(GQA_SPLITS, enable, r)
    full_B = seg.to_block_diagonal(B)
    assert tuple(full_B.shape) == (64, r * sum(enable))
    torch.testing.assert_close(full_B @ A, delta_merged(A, B, GQA_SPLITS, enable, r), rtol=1e-12, atol=0)
    assert torch.equal(seg.from_block_diagonal(full_B, r), B)


def test_block_diagonal_by_hand_for_gqa():
    seg = Segments.from_splits(GQA_SPLITS, [True, False, True])
    B = torch.arange(48 * 1, dtype=torch.float64).view(48, 1) + 1
    full_B = seg.to_block_diagonal(B)
    expected = torch.zeros(64, 2, dtype=torch.float64)
    expected[0:32, 0] = B[0:32, 0]
    expected[48:64, 1] = B[32:48, 0]
    assert torch.equal(full_B, expected)


def test_full_rows_put_values_on_the_adapted_rows():
    seg = Segments.from_splits(GQA_SPLITS, [True, False, True])
    values = torch.arange(48, dtype=torch.float64) + 1
    full = seg.to_full_rows(values, torch.full((64,), -1.0, dtype=torch.float64))
    expected = torch.cat([values[:32], torch.full((16,), -1.0, dtype=torch.float64), values[32:]])
    assert torch.equal(full, expected)
    back, other = seg.from_full_rows(full)
    assert torch.equal(back, values)
    assert torch.equal(other, torch.tensor([False] * 32 + [True] * 16 + [False] * 16))


# ----------------------------------------------------------------------------- bad input

def test_all_splits_disabled_is_refused():
    with pytest.raises(ValueError, match=r"at least one \(out_start, out_end\) pair, got \(\)"):
        Segments.from_splits([4, 4], [False, False])


@pytest.mark.parametrize("split_sizes, enable, text", [
    ([4, 4], [True], r"len\(enable_lora\)=1 must equal len\(split_sizes\)=2"),
    ([4, 0], [True, True], r"positive integers, got \[4, 0\]"),
    ([4, -1], [True, True], r"positive integers, got \[4, -1\]"),
    ([4, 2.0], [True, True], r"positive integers, got \[4, 2.0\]"),
    ([4, True], [True, True], r"positive integers, got \[4, True\]"),
], ids=["lengths", "zero", "negative", "float", "bool"])
def test_bad_splits_are_refused_by_name(split_sizes, enable, text):
    with pytest.raises(ValueError, match=text):
        Segments.from_splits(split_sizes, enable)


@pytest.mark.parametrize("spans, text", [
    ((), r"at least one"),
    (((0, 4), (4, 11)), r"segments\[1\]=\(4, 11\) is not a non-empty slice of the output rows \[0, out_features=10\)"),
    (((3, 3),), r"segments\[0\]=\(3, 3\) is not a non-empty slice"),
    (((-1, 2),), r"segments\[0\]=\(-1, 2\)"),
    (((5, 9), (0, 6)), r"must not overlap, got \(0, 6\) and \(5, 9\)"),
], ids=["none", "past_the_end", "empty", "negative", "overlapping"])
def test_bad_spans_are_refused_by_name(spans, text):
    with pytest.raises(ValueError, match=text):
        Segments(10, spans)


def test_of_checks_the_output_size():
    seg = Segments.from_splits(GQA_SPLITS, [True, False, True])
    assert Segments.of(seg, 64) is seg
    assert Segments.of([(0, 32), (48, 64)], 64) == seg
    with pytest.raises(ValueError, match="segments are for out_features=64, the weight has 32"):
        Segments.of(seg, 32)


def test_rank_of_checks_the_stacked_shapes():
    seg = Segments.from_splits(GQA_SPLITS, [True, False, True])
    A, B = _adapter(GQA_SPLITS, [True, False, True], 3)
    assert seg.rank_of(A, B) == 3
    with pytest.raises(ValueError, match=r"lora_A rows \(5\) must be r \* len\(segments\) with len\(segments\)=2"):
        seg.rank_of(A[:5], B)
    with pytest.raises(ValueError, match=r"lora_B must be \(sum of segment sizes=48, r=3\).*got \(64, 3\)"):
        seg.rank_of(A, torch.zeros(64, 3))
    with pytest.raises(ValueError, match=r"lora_B must be \(sum of segment sizes=48, r=3\).*got \(48, 2\)"):
        seg.rank_of(A, B[:, :2])
    with pytest.raises(ValueError, match=r"lora_B must be \(out_features=64, r=3\)"):
        Segments.full(64).rank_of(A[:3], B)


def test_layout_conversions_refuse_what_does_not_fit():
    seg = Segments.from_splits(GQA_SPLITS, [True, False, True])
    with pytest.raises(ValueError, match=r"lora_B has shape \(64, 3\), expected \(64, 2\) for 2 adapters of rank 1"):
        seg.from_block_diagonal(torch.zeros(64, 3), 1)
    off = torch.zeros(64, 2)
    off[40, 0] = 1.0  # a k row: no adapter of this layer can hold it
    with pytest.raises(ValueError, match=r"not block-diagonal in the layout of the output spans \(\(0, 32\), \(48, 64\)\)"):
        seg.from_block_diagonal(off, 1)
    with pytest.raises(ValueError, match=r"expected a vector of shape \(64,\), got \(48,\)"):
        seg.from_full_rows(torch.zeros(48))
