"""The layers against loralib's: the state_dict keys of r=0 (plain) layers, and what a training
forward keeps for backward. The layer tests that need no loralib are in tests/layers/ and
tests/core/test_functional.py."""
import pytest
import torch

import lora_layers as L
from _autograd_bytes import saved_bytes

loralib = pytest.importorskip("loralib")


@pytest.mark.parametrize("ours, theirs", [
    (lambda: L.Linear(6, 5, r=0), lambda: loralib.Linear(6, 5, r=0)),
    (lambda: L.MergedLinear(6, 6, r=0, enable_lora=[True, False]),
     lambda: loralib.MergedLinear(6, 6, r=0, enable_lora=[True, False])),
    (lambda: L.Embedding(9, 4, r=0), lambda: loralib.Embedding(9, 4, r=0)),
], ids=["Linear", "MergedLinear", "Embedding"])
def test_r0_layers_have_loralib_s_keys(ours, theirs):
    # loralib-compatible keys (loralib's r=0 layers are plain)
    assert list(ours().state_dict()) == list(theirs().state_dict())


def test_loralib_keeps_drop_x_where_lora_layers_keeps_only_u():
    T, r = 64, 8
    torch.manual_seed(0)
    ours = L.Linear(256, 256, r=r, lora_dropout=0.1).train()
    x = torch.randn(T, 256, requires_grad=True)
    extra, _ = saved_bytes(ours, x)
    ref = loralib.Linear(256, 256, r=r, lora_dropout=0.1)
    ref.train()  # (loralib's train() returns None)
    extra_ref, _ = saved_bytes(ref, x)
    assert extra_ref >= T * 256 * x.element_size() > extra  # loralib keeps drop(x) (and its mask)
