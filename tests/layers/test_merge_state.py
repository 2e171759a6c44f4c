"""unmerged(): the one "unmerge, do, re-merge" of the merge lifecycle (issue #21).

The reference is the layer itself before the ``with``: its base weight (saved before any
merge) and its merged weight (saved after eval()), compared bit for bit, and the merged
weight checked against ``W + s·B A`` written out here.
"""
import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers.layers import unmerged


def _layer(seed=0):
    """A merged Linear with a non-zero adapter, its base weight and its merged weight."""
    torch.manual_seed(seed)
    layer = L.Linear(8, 6, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    base = layer.weight.detach().clone()
    layer.eval()
    assert layer.merged
    merged = layer.weight.detach().clone()
    by_hand = base + layer.scaling * (layer.lora_B.detach() @ layer.lora_A.detach())
    torch.testing.assert_close(merged, by_hand, rtol=0, atol=1e-6)
    assert not torch.equal(merged, base)
    return layer, base, merged


def test_the_body_sees_the_base_and_the_merge_comes_back():
    layer, base, merged = _layer()
    with unmerged(layer):
        assert not layer.merged
        assert torch.equal(layer.weight, base)
    assert layer.merged
    assert torch.equal(layer.weight, merged)


def test_an_exception_in_the_body_merges_again():
    layer, base, merged = _layer()
    with pytest.raises(KeyError, match="boom"):
        with unmerged(layer):
            assert torch.equal(layer.weight, base)
            raise KeyError("boom")
    assert layer.merged
    assert torch.equal(layer.weight, merged)


def test_the_merge_after_uses_what_the_body_wrote():
    layer, base, _ = _layer()
    with unmerged(layer), torch.no_grad():
        layer.lora_A.mul_(2)
    torch.testing.assert_close(layer.weight, base + layer.scaling * (layer.lora_B @ layer.lora_A), rtol=0, atol=1e-6)
    layer.train()
    assert torch.equal(layer.weight, base)  # and it still comes out exactly


def test_a_layer_that_was_not_merged_is_left_alone():
    layer, base, _ = _layer()
    layer.train()
    with unmerged(layer):
        assert not layer.merged
    assert not layer.merged
    assert torch.equal(layer.weight, base)


def test_several_layers_and_one_given_twice():
    (a, base_a, merged_a), (b, base_b, _) = _layer(0), _layer(1)
    b.train()
    with unmerged(a, b, a):
        assert torch.equal(a.weight, base_a) and torch.equal(b.weight, base_b)
    assert a.merged and not b.merged
    assert torch.equal(a.weight, merged_a)  # merged once, not twice
    assert torch.equal(b.weight, base_b)


def test_a_layer_tied_in_the_body_stays_unmerged():
    """As eval() leaves a layer whose weight another module holds: merging it would change that module."""
    layer, base, _ = _layer()
    other = nn.Linear(8, 6)
    with unmerged(layer):
        other.weight = layer.weight
    assert not layer.merged
    assert torch.equal(layer.weight, base)
