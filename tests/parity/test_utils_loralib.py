"""The trainable-parameter and state-dict helpers against loralib: the same selection where loralib
is right, and where its substring match takes a plain module named ``lora_*`` for an adapter, not.
The torch-only tests of these helpers are in tests/model/test_utils.py."""
import pytest
import torch.nn as nn

import lora_layers as L
from _params_model import build_model, trainable

loralib = pytest.importorskip("loralib")


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_mark_only_lora_as_trainable_selects_as_loralib(bias):
    # Same selection as loralib on a model without the decoy.
    ours, ref = build_model(L, False), build_model(loralib, False)
    L.mark_only_lora_as_trainable(ours, bias=bias)
    loralib.mark_only_lora_as_trainable(ref, bias=bias)
    assert trainable(ours) == trainable(ref)


def test_loralib_takes_lora_block_for_an_adapter():
    ours, ref = build_model(L), build_model(loralib)
    L.mark_only_lora_as_trainable(ours)
    loralib.mark_only_lora_as_trainable(ref)
    assert "lora_block.0.weight" not in trainable(ours)
    assert "lora_block.0.weight" in trainable(ref)  # loralib's substring match gets it wrong
    assert not any(k.startswith("lora_block") for k in L.lora_state_dict(ours))
    assert any(k.startswith("lora_block") for k in loralib.lora_state_dict(ref))


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_mark_only_lora_as_trainable_without_adapters_selects_as_loralib(bias):
    model = nn.Sequential(L.Linear(16, 32), nn.LayerNorm(32))  # loralib's default r=0: no adapter
    with pytest.warns(UserWarning, match=r"no adapter parameters.*r=0"):
        L.mark_only_lora_as_trainable(model, bias=bias)
    ref = nn.Sequential(loralib.Linear(16, 32), nn.LayerNorm(32))
    loralib.mark_only_lora_as_trainable(ref, bias=bias)
    assert trainable(model) == trainable(ref)  # loralib's semantics are kept, only made loud
