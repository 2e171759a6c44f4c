"""DoRA against PEFT's own ``use_dora=True``: adapters and training steps both ways, the fused GQA
layer's block-diagonal export, and the Gaussian init. The torch-only DoRA tests are in
tests/variants/test_dora.py."""
import copy

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from _fused import GQA

peft = pytest.importorskip("peft")


def _peft_pair(p=0.0, seed=0):
    """A two-layer MLP under PEFT's use_dora=True and the same weights in lora_layers."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0", "2"], use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return base, theirs


def test_export_import_round_trip_through_peft(tmp_path):
    base, theirs = _peft_pair()
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    assert L.import_peft(ours, tmp_path / "peft") == ["0", "2"]
    assert ours[0].use_dora and ours[2].use_dora
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # and back: PEFT loads our export on a fresh base
    L.export_peft(ours, tmp_path / "ours", task_type=None)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(again(x), ours(x), rtol=1e-5, atol=1e-5)


def test_twenty_steps_from_the_same_adapter_agree_with_peft(tmp_path):
    base, theirs = _peft_pair()
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    L.import_peft(ours, tmp_path / "peft")
    theirs.train(), ours.train()
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    opt_o = torch.optim.AdamW(L.lora_parameters(ours), lr=1e-2)
    torch.manual_seed(1)
    data = [(torch.randn(8, 12), torch.randn(8, 6)) for _ in range(20)]
    losses = []
    for model, opt in ((theirs, opt_t), (ours, opt_o)):
        curve = []
        for x, target in data:
            loss = (model(x) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses.append(curve)
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-5, losses


def test_fused_gqa_layer_exports_block_diagonal_with_unit_factors_elsewhere(tmp_path):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 16))
    model = copy.deepcopy(plain)
    model[0] = L.MergedLinear.from_module(model[0], r=2, lora_alpha=4, use_dora=True, **{
        "enable_lora": GQA["enable"], "split_sizes": GQA["split_sizes"]})
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[0].lora_magnitude.mul_(1.3)
    L.export_peft(model, tmp_path / "a", task_type=None)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "a")
    x = torch.randn(5, 12)
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs(x)[:, 8:12], plain(x)[:, 8:12], rtol=1e-5, atol=1e-5)  # k rows untouched
    back = nn.Sequential(L.MergedLinear.from_module(copy.deepcopy(plain)[0], r=2, lora_alpha=4, use_dora=True,
                                                    enable_lora=GQA["enable"], split_sizes=GQA["split_sizes"]))
    L.import_peft(back, tmp_path / "a")
    torch.testing.assert_close(back(x), model(x), rtol=1e-6, atol=1e-6)


def test_gaussian_init_is_peft_s():
    def peft_adapter(base, **extra):  # PEFT's own init on the same base, as (A, B)
        torch.manual_seed(1)
        wrapped = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(
            r=base.weight.shape[0] // 8 if isinstance(base, nn.Linear) else 4, target_modules=["0"],
            init_lora_weights="gaussian", **extra)).base_model.model[0]
        if isinstance(base, nn.Embedding):
            return wrapped.lora_embedding_A["default"].detach(), wrapped.lora_embedding_B["default"].detach()
        return wrapped.lora_A["default"].weight.detach(), wrapped.lora_B["default"].weight.detach()

    torch.manual_seed(0)
    layer = L.Linear(256, 64, r=8, init="gaussian")
    A, B = peft_adapter(nn.Linear(256, 64))
    assert not layer.lora_B.any() and not B.any()
    assert abs(layer.lora_A.std().item() - A.std().item()) < 0.01 and abs(A.std().item() - 1 / 8) < 0.01
    emb = L.Embedding(100, 512, r=4, init="gaussian")
    A, B = peft_adapter(nn.Embedding(100, 512))
    assert not emb.lora_A.any() and not A.any()
    assert abs(emb.lora_B.std().item() - 1.0) < 0.1 and abs(B.std().item() - 1.0) < 0.1
    assert L.Linear(8, 8, r=2).lora_A.abs().max() <= 1 / (8 ** 0.5)  # kaiming-uniform(a=√5) bound stays default
