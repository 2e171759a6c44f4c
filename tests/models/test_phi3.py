"""lora_layers.phi3 on tiny random Phi-3 models (MHA and GQA), built offline.

The reference for random adapters writes ``W + s·B_j A_j`` into each part of a
deepcopy of the original model in float64, with the split offsets computed here
from the head counts, not read from the library.
"""
import copy
import types

import pytest
import torch
from conftest import make_tiny_phi3
from _model_checks import IDS, assert_unchanged, logits, randomize_adapters, snapshot

from lora_layers import phi3
from lora_layers.layers import Linear, MergedLinear
from lora_layers.surgery import merge_and_unload
from lora_layers.utils import lora_modules, named_lora_parameters

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, INTER = 64, 4, 96  # make_tiny_phi3's sizes


def kv_heads(gqa):
    return 2 if gqa else 4


def test_qkv_split_sizes():
    d = HIDDEN // HEADS
    assert phi3.qkv_split_sizes(make_tiny_phi3(gqa=False).config) == [64, 64, 64]
    assert phi3.qkv_split_sizes(make_tiny_phi3(gqa=True).config) == [64, 32, 32] == [HEADS * d, 2 * d, 2 * d]
    medium = types.SimpleNamespace(num_attention_heads=40, num_key_value_heads=10, hidden_size=5120)
    assert phi3.qkv_split_sizes(medium) == [5120, 1280, 1280]
    explicit = types.SimpleNamespace(num_attention_heads=8, num_key_value_heads=None, hidden_size=100, head_dim=16)
    assert phi3.qkv_split_sizes(explicit) == [128, 128, 128]
    with pytest.raises(ValueError, match="not divisible"):
        phi3.qkv_split_sizes(types.SimpleNamespace(num_attention_heads=3, hidden_size=64))
    with pytest.raises(ValueError, match="num_attention_heads"):
        phi3.qkv_split_sizes(types.SimpleNamespace(hidden_size=64))


@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_apply_lora_layout_sharing_and_exact_logits(gqa):
    model = make_tiny_phi3(gqa=gqa)
    reference = copy.deepcopy(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    names = phi3.apply_lora(model, r=4, qkv=("q", "v"))
    assert len(names) == 8
    kv = kv_heads(gqa) * HIDDEN // HEADS
    for i in range(2):
        layer = model.model.layers[i]
        qkv, gate_up = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj
        assert type(qkv) is MergedLinear and qkv.split_sizes == [HIDDEN, kv, kv]
        assert qkv.enable_lora == [True, False, True] and qkv.lora_B.shape == (HIDDEN + kv, 4)
        assert type(gate_up) is MergedLinear and gate_up.split_sizes == [INTER, INTER]
        assert gate_up.enable_lora == [True, True] and gate_up.lora_A.shape == (8, HIDDEN)
        assert type(layer.self_attn.o_proj) is Linear and type(layer.mlp.down_proj) is Linear
        assert qkv.lora_dropout.p == 0.05 and qkv.scaling == 32 / 4
    assert {n: p.data_ptr() for n, p in model.named_parameters() if n in ptrs} == ptrs
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in named_lora_parameters(model)}
    assert torch.equal(logits(model), logits(reference))


def naive_reference(reference, model, gqa, enable_qkv):
    """Patch W + s·B_j A_j per part into ``reference`` (float64), offsets from the head counts."""
    d = HIDDEN // HEADS
    parts = {
        "qkv_proj": [HEADS * d, kv_heads(gqa) * d, kv_heads(gqa) * d],
        "gate_up_proj": [INTER, INTER],
    }
    with torch.no_grad():
        for name, layer in lora_modules(model):
            W = reference.get_submodule(name).weight
            A, B, r = layer.lora_A.double(), layer.lora_B.double(), layer.r
            sizes = parts.get(name.rsplit(".", 1)[-1], [W.shape[0]])
            enable = enable_qkv if name.endswith("qkv_proj") else [True] * len(sizes)
            patched, row, j, b = W.double().clone(), 0, 0, 0
            for size, on in zip(sizes, enable):
                if on:
                    patched[row:row + size] += layer.scaling * B[b:b + size] @ A[j * r:(j + 1) * r]
                    j, b = j + 1, b + size
                row += size
            W.copy_(patched)


@pytest.mark.parametrize("gqa, qkv", [(True, ("q", "k", "v")), (True, ("q", "v")), (False, ("k",)),
                                       (False, ("v", "q"))])
def test_random_adapters_match_naive_reference(gqa, qkv):
    model = make_tiny_phi3(gqa=gqa)
    reference = copy.deepcopy(model)
    phi3.apply_lora(model, r=3, lora_alpha=5, lora_dropout=0.0, qkv=qkv, use_rslora=True)
    randomize_adapters(model, std=0.2)
    base = logits(reference)
    naive_reference(reference, model, gqa, [p in qkv for p in "qkv"])
    expected = logits(reference)
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapters matter
    model.train()  # unmerged LoRA path (every dropout in the model is 0)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    model.eval()  # merged
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_bare_phi3_model():
    causal = make_tiny_phi3(gqa=True)
    bare = causal.model
    expected = bare(IDS).last_hidden_state.detach()
    names = phi3.apply_lora(bare)
    assert names[0] == "layers.0.self_attn.o_proj" and len(names) == 8
    assert type(bare.layers[1].self_attn.qkv_proj) is MergedLinear
    assert torch.equal(bare(IDS).last_hidden_state, expected)


def test_one_adamw_step_changes_only_adapters():
    model = make_tiny_phi3(gqa=True)
    phi3.apply_lora(model, r=4)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = {n for n, _ in named_lora_parameters(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # B starts at zero, so A's first gradient is zero; every B moves, and nothing else does.
    assert {n for n in adapters if n.endswith("lora_B")} <= changed <= adapters


def lora_grads(model, checkpointing):
    model.train()
    if checkpointing is not None:
        phi3.enable_gradient_checkpointing(model, use_reentrant=checkpointing == "reentrant")
        assert model.model.gradient_checkpointing
    torch.manual_seed(7)
    model(IDS, labels=IDS).loss.backward()
    return {n: p.grad for n, p in named_lora_parameters(model)}


@pytest.mark.parametrize("checkpointing, dropout", [
    ("reentrant", 0.0),
    ("non-reentrant", 0.0),
    ("non-reentrant", 0.1),  # the recompute must redraw the same dropout masks
    ("reentrant", 0.1),  # the no-grad first pass and the recompute draw the same mask
])
def test_gradient_checkpointing_matches_plain_backward(checkpointing, dropout):
    model = make_tiny_phi3(gqa=True)
    phi3.apply_lora(model, r=4, lora_dropout=dropout)
    randomize_adapters(model)
    expected = lora_grads(copy.deepcopy(model), None)
    got = lora_grads(model, checkpointing)
    for name, grad in expected.items():
        assert got[name] is not None and got[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_apply_lora_can_enable_checkpointing():
    model = make_tiny_phi3()
    phi3.apply_lora(model, gradient_checkpointing={"use_reentrant": True})
    assert model.model.gradient_checkpointing
    model.train()
    randomize_adapters(model)
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in named_lora_parameters(model))


def test_merge_and_unload_reloads_as_plain_phi3(tmp_path):
    model = make_tiny_phi3(gqa=True)
    phi3.apply_lora(model, r=4, qkv=("q", "v"))
    randomize_adapters(model)
    expected = logits(model.eval())
    merge_and_unload(model).save_pretrained(tmp_path)
    reloaded = transformers.Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded.model.layers[0].self_attn.qkv_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_torch_compile_matches_eager():
    # One layer, aot_eager: traces the LoRA layers through dynamo and AOTAutograd
    # (forward and backward) without paying for inductor's C++ codegen.
    torch._dynamo.reset()
    model = make_tiny_phi3(gqa=True, num_hidden_layers=1)
    phi3.apply_lora(model, r=4, lora_dropout=0.0)
    randomize_adapters(model)
    model.train()
    twin = copy.deepcopy(model)
    eager = model(IDS, labels=IDS)
    compiled = torch.compile(twin, backend="aot_eager")(IDS, labels=IDS)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-5)
    eager.loss.backward()
    compiled.loss.backward()
    got = dict(named_lora_parameters(twin))
    for name, p in named_lora_parameters(model):
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def _llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def _phi3_with_wrong_kv_heads():
    model = make_tiny_phi3(gqa=True)
    model.config.num_key_value_heads = 4  # config no longer describes the modules
    return model


BAD = [
    (_llama, {}, ValueError, "expects a Phi-3 model"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2)), {}, ValueError, "expects a Phi-3 model"),
    (_phi3_with_wrong_kv_heads, {}, ValueError, "not Phi-3-shaped"),
    (make_tiny_phi3, dict(qkv=("q", "x")), ValueError, "qkv must name"),
    (make_tiny_phi3, dict(qkv=()), ValueError, "qkv must name"),
    (make_tiny_phi3, dict(qkv=("q", "q")), ValueError, "qkv must name"),
    (make_tiny_phi3, dict(targets=("qkv_proj", "lm_head")), ValueError, "targets must be"),
    (make_tiny_phi3, dict(targets=()), TypeError, "targets must be"),
    (make_tiny_phi3, dict(gradient_checkpointing="yes"), ValueError, "gradient_checkpointing"),
    (make_tiny_phi3, dict(r=0), ValueError, "r must be"),
]


@pytest.mark.parametrize("build, kwargs, exc, match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_raises_and_changes_nothing(build, kwargs, exc, match):
    model = build()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        phi3.apply_lora(model, **kwargs)
    assert_unchanged(model, before)


def test_second_apply_raises_and_changes_nothing():
    model = make_tiny_phi3()
    phi3.apply_lora(model, targets=("qkv_proj",))
    before = snapshot(model)
    with pytest.raises(ValueError, match="already carry LoRA adapters"):
        phi3.apply_lora(model)
    assert_unchanged(model, before)
