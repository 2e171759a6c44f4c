"""import_peft/export_peft on plain torch models (no peft needed); the comparisons with PEFT
itself are in tests/parity/test_peft_interop.py."""
import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers import peft_format


def _merged_net():
    """A two-layer net whose LoRA Linear is merged (eval with merge_weights) and has a non-zero B."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    net[0] = L.Linear.from_module(net[0], r=2, lora_alpha=4)
    with torch.no_grad():
        net[0].lora_B.normal_()
    return net.eval()


def test_import_into_a_merged_layer_that_fails_midway_leaves_it_merged(tmp_path, monkeypatch):
    """A copy that raises inside import_peft re-merges the layer it unmerged (it stayed unmerged
    before issue #21): the weight is bit for bit the merged weight it had."""
    net = _merged_net()
    L.export_peft(net, tmp_path)
    layer = net[0]
    assert layer.merged
    merged, A = layer.weight.detach().clone(), layer.lora_A.detach().clone()
    plan_module = peft_format._plan_module

    def bad_first_tensor(*args, **kwargs):
        new, target, tensors = plan_module(*args, **kwargs)
        return new, target, {**tensors, "lora_A": torch.zeros(3, 5, 7)}  # copy_ cannot broadcast it: it raises

    monkeypatch.setattr(peft_format, "_plan_module", bad_first_tensor)
    with pytest.raises(RuntimeError):
        L.import_peft(net, tmp_path)
    assert layer.merged
    assert torch.equal(layer.weight, merged)
    assert torch.equal(layer.lora_A, A)


def test_import_into_a_merged_layer_loads_and_merges_again(tmp_path):
    """The normal path: the adapter is replaced and merged in (W + s·B A from the new tensors)."""
    src = _merged_net()
    L.export_peft(src, tmp_path)
    net = _merged_net()
    with torch.no_grad():
        net[0].lora_A.zero_()
        net[0].train().eval()  # merged again, with A = 0: the weight is the base
    base = net[0].weight.detach().clone()
    assert L.import_peft(net, tmp_path) == ["0"]
    layer = net[0]
    assert layer.merged and torch.equal(layer.lora_A, src[0].lora_A) and torch.equal(layer.lora_B, src[0].lora_B)
    expected = base + layer.scaling * (layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
    assert torch.equal(layer.weight, src[0].weight)  # the same merge of the same base and adapter
