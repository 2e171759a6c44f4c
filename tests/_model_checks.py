"""Helpers the model-level tests share: Phi-3 logits, random adapters, and a snapshot that
an error must leave unchanged."""
import torch

from lora_layers.model.params import lora_parameters

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 7], [1, 3, 4, 50, 60, 70, 80, 90]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def randomize_adapters(model, seed=1, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def snapshot(model):
    """Everything an error must leave alone: module objects, Parameter objects and flags, values."""
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.data_ptr(), p.requires_grad, p.dtype) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    for key in ("modules", "params", "training"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
