"""The model the parameter-helper tests share (tests/model/test_utils.py and its loralib comparison,
tests/parity/test_utils_loralib.py): an Embedding, a Linear and a fused MergedLinear with adapters, plain
layers, and a decoy plain module named like an adapter. ``lib`` is ``lora_layers`` or ``loralib``."""
import torch
import torch.nn as nn

import lora_layers as L


class Block(nn.Module):
    def __init__(self, lib, with_decoy=True):
        super().__init__()
        self.emb = lib.Embedding(10, 8, r=2)
        self.q = lib.Linear(8, 8, r=2, lora_alpha=4)
        self.qkv = lib.MergedLinear(8, 12, r=2, enable_lora=[True, False, True])
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)
        if with_decoy:
            # Named like an adapter, but a plain layer: must not be treated as one.
            self.lora_block = nn.Sequential(nn.Linear(3, 3))

    def forward(self, idx):
        h = self.head(self.norm(self.qkv(self.q(self.emb(idx)))))
        return self.lora_block(h) if hasattr(self, "lora_block") else h


def build_model(lib=L, with_decoy=True):
    """A seeded Block with random (non-zero) adapters."""
    torch.manual_seed(0)
    m = Block(lib, with_decoy)
    for mod in (m.emb, m.q, m.qkv):
        with torch.no_grad():
            mod.lora_A.normal_()
            mod.lora_B.normal_()
    return m


ADAPTERS = {"emb.lora_A", "emb.lora_B", "q.lora_A", "q.lora_B", "qkv.lora_A", "qkv.lora_B"}
BIASES = {
    "none": set(),
    "lora_only": {"q.bias", "qkv.bias"},
    "all": {"q.bias", "qkv.bias", "norm.bias", "head.bias", "lora_block.0.bias"},
}


def trainable(model):
    """The names of the parameters that require grad."""
    return {n for n, p in model.named_parameters() if p.requires_grad}
