"""A small model with every adapter kind, shared by the checkpoint and training-state tests."""
import torch
import torch.nn as nn

import lora_layers as L


class Net(nn.Module):
    """Every adapter kind: Linear, MergedLinear (GQA-like unequal splits), Embedding, Conv2d."""

    def __init__(self, r=2, alpha=4, splits=(8, 4, 4), enable=(True, False, True), dropout=0.0, lora_dtype=None):
        super().__init__()
        self.emb = L.Embedding(20, 8, r=r, lora_alpha=alpha, lora_dtype=lora_dtype)
        self.qkv = L.MergedLinear(8, sum(splits), r=r, lora_alpha=alpha, lora_dropout=dropout,
                                  enable_lora=list(enable), split_sizes=list(splits), lora_dtype=lora_dtype)
        self.out = L.Linear(sum(splits), 8, r=r, lora_alpha=alpha, lora_dropout=dropout, lora_dtype=lora_dtype)
        self.conv = L.Conv2d(1, 2, 3, r=r, lora_alpha=alpha, padding=1, lora_dtype=lora_dtype)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.out(self.qkv(self.emb(ids)))  # (B, T, 8)
        h = h + self.conv(h.unsqueeze(1)).mean(1)
        return self.head(h)


def make(seed=0, randomize=True, marked=True, **kw):
    """A Net; ``marked``: only the adapters train (mark_only_lora_as_trainable), as save_lora expects."""
    torch.manual_seed(seed)  # same seed -> same base weights
    net = Net(**kw)
    if marked:
        L.mark_only_lora_as_trainable(net)
    if randomize:
        randomize_adapters(net, seed + 100)
    return net


@torch.no_grad()
def randomize_adapters(net, seed, contains=""):
    """Draw N(0, 0.3²) values, from a generator seeded ``seed``, into the adapter parameters of ``net`` whose
    names contain ``contains`` (every one by default), in ``named_lora_parameters`` order."""
    g = torch.Generator().manual_seed(seed)
    for name, p in L.named_lora_parameters(net):
        if contains in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()} | {
        "__lora__" + k: p.detach().clone() for k, p in L.named_lora_parameters(model)}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


IDS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
