"""Checkpoints that loralib writes (its lora_state_dict, torch.save'd), loaded by load_lora: the same
outputs as the loralib model. The other checkpoint tests are in tests/io/test_checkpoint.py."""
import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers.checkpoint import load_lora

loralib = pytest.importorskip("loralib")


def test_loralib_checkpoint_loads_and_matches_loralib(tmp_path):
    torch.manual_seed(0)
    ref = nn.Sequential(loralib.Embedding(20, 12, r=2, lora_alpha=4),
                        loralib.MergedLinear(12, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]),
                        loralib.Linear(12, 5, r=3, lora_alpha=3))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.normal_()
    base = {k: v.clone() for k, v in ref.state_dict().items() if "lora_" not in k}  # before loralib merges
    ref.eval()
    torch.save(loralib.lora_state_dict(ref), tmp_path / "loralib.pt")
    ours = nn.Sequential(L.Embedding(20, 12, r=2, lora_alpha=4),
                         L.MergedLinear(12, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]),
                         L.Linear(12, 5, r=3, lora_alpha=3))
    ours.load_state_dict(base, strict=False)
    ours.eval()
    assert load_lora(ours, tmp_path / "loralib.pt").missing_keys == []
    ids = torch.randint(0, 20, (3, 4))
    torch.testing.assert_close(ours(ids), ref(ids), rtol=1e-5, atol=1e-5)


def test_loralib_conv_checkpoint_with_biases_loads(tmp_path):
    # loralib's Conv2d keeps its conv as ``.conv``: lora_state_dict(bias="all") writes "0.conv.bias".
    torch.manual_seed(0)
    ref = nn.Sequential(loralib.Conv2d(3, 4, 1, r=2, lora_alpha=4))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p))  # adapters and the bias "trained"
    torch.save(loralib.lora_state_dict(ref, bias="all"), tmp_path / "loralib.pt")
    ours = nn.Sequential(L.Conv2d(3, 4, 1, r=2, lora_alpha=4))
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k == "0.conv.weight"}, strict=False)
    result = load_lora(ours, tmp_path / "loralib.pt")
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
