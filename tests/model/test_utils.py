"""utils: trainable-parameter selection by identity, lora_state_dict, counting, merge helpers.
The comparisons with loralib are in tests/parity/test_utils_loralib.py."""
import warnings

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from _params_model import ADAPTERS, BIASES, build_model, trainable


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_mark_only_lora_as_trainable(bias):
    model = build_model()
    L.mark_only_lora_as_trainable(model, bias=bias)
    assert trainable(model) == ADAPTERS | BIASES[bias]


def test_lora_block_is_not_an_adapter():
    ours = build_model(L)
    L.mark_only_lora_as_trainable(ours)
    assert "lora_block.0.weight" not in trainable(ours)
    assert not any(k.startswith("lora_block") for k in L.lora_state_dict(ours))
    assert {n for n, _ in L.lora_modules(ours)} == {"emb", "q", "qkv"}
    assert {n for n, _ in L.named_lora_parameters(ours)} == ADAPTERS


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_adamw_step_changes_only_adapters_and_chosen_biases(bias):
    model = build_model()
    L.mark_only_lora_as_trainable(model, bias=bias)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.tensor([[1, 2, 3], [4, 5, 6]])).pow(2).sum().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == ADAPTERS | BIASES[bias]


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
@pytest.mark.parametrize("merged", [False, True])
def test_lora_state_dict_matches_model_state_dict(bias, merged):
    model = build_model()
    if merged:
        model.eval()
    sd = L.lora_state_dict(model, bias=bias)
    full = model.state_dict()
    assert set(sd) == ADAPTERS | BIASES[bias]
    for k, v in sd.items():
        assert torch.equal(v, full[k]) and not v.requires_grad
    # and it round-trips into a fresh model
    fresh = build_model()
    with torch.no_grad():
        for p in L.lora_parameters(fresh):
            p.zero_()
    result = fresh.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    for k, v in L.lora_state_dict(fresh, bias=bias).items():
        assert torch.equal(v, sd[k])


def test_count_and_parameters():
    model = build_model()
    expected = 2 * 10 + 8 * 2 + 2 * 8 + 8 * 2 + (2 * 2) * 8 + 8 * 2
    assert L.count_lora_parameters(model) == expected
    assert sum(p.numel() for p in L.lora_parameters(model)) == expected
    assert L.count_lora_parameters(nn.Linear(3, 3)) == 0
    # tied adapters are counted once
    shared = L.Linear(4, 4, r=2)
    assert L.count_lora_parameters(nn.Sequential(shared, shared)) == 16


def test_merge_unmerge_lora_model():
    model = build_model()
    idx = torch.tensor([[1, 2, 3]])
    y = model(idx).detach()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    L.merge_lora(model)
    assert all(m.merged for _, m in L.lora_modules(model))
    torch.testing.assert_close(model(idx), y, rtol=1e-5, atol=1e-5)
    L.unmerge_lora(model)
    assert not any(m.merged for _, m in L.lora_modules(model))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n])


@pytest.mark.parametrize("fn", ["mark_only_lora_as_trainable", "lora_state_dict"])
@pytest.mark.parametrize("bad", ["None", "lora", "", None, 1])
def test_bias_mode_invalid(fn, bad):
    model = build_model()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"bias") as info:
        getattr(L, fn)(model, bias=bad)
    assert repr(bad) in str(info.value) and "lora_only" in str(info.value)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_merge_lora_is_all_or_nothing():
    model = nn.Sequential(L.Linear(4, 4, r=2), L.Linear(4, 4, r=2))
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[1].lora_B.fill_(float("inf"))
    before = [m.weight.detach().clone() for m in model]
    with pytest.raises(ValueError, match="non-finite"):
        L.merge_lora(model, safe_merge=True)
    assert not any(m.merged for m in model)
    assert all(torch.equal(m.weight, b) for m, b in zip(model, before))


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_mark_only_lora_as_trainable_warns_on_a_model_without_adapters(bias):
    model = nn.Sequential(L.Linear(16, 32), nn.LayerNorm(32))  # loralib's default r=0: no adapter
    with pytest.warns(UserWarning, match=r"no adapter parameters.*r=0") as caught:
        L.mark_only_lora_as_trainable(model, bias=bias)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert trainable(model) == {"none": set(), "lora_only": {"0.bias"}, "all": {"0.bias", "1.bias"}}[bias]


def test_mark_only_lora_as_trainable_is_quiet_with_adapters():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.mark_only_lora_as_trainable(build_model())
        L.mark_only_lora_as_trainable(nn.Sequential(L.Linear(4, 4), L.Linear(4, 4, r=2)))
