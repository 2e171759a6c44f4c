"""Lean training on tiny random Phi-3 models: phi3.apply_lora(lean=True) / phi3.enable_lean.

Recomputed adapter inputs run the same ops in the same order as the plain
model, so their loss and gradients are compared bit for bit; the fused loss is
compared with a float64 copy of the plain model. Saved bytes are exact.
"""
import copy
import os
import pickle
import sys

import pytest
import torch
from conftest import make_tiny_phi3
from _model_checks import IDS, assert_unchanged, randomize_adapters, snapshot

from lora_layers import lean as lean_mod
from lora_layers import lora_state_dict, merge_and_unload, phi3, unload
from lora_layers.utils import named_lora_parameters

transformers = pytest.importorskip("transformers")
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")

LABELS = IDS.clone()
LABELS[:, :3] = -100  # a masked prompt


def adapted(gqa=True, dropout=0.0, qkv=("q", "k", "v"), layers=2, **kw):
    model = make_tiny_phi3(gqa=gqa, num_hidden_layers=layers)
    phi3.apply_lora(model, r=4, lora_dropout=dropout, qkv=qkv, **kw)
    randomize_adapters(model, std=0.2)
    return model.train()


def loss_and_grads(model, labels=LABELS, seed=7):
    for _, p in named_lora_parameters(model):
        p.grad = None
    torch.manual_seed(seed)  # the same dropout masks in every model
    loss = model(IDS, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in named_lora_parameters(model)}


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("gqa, qkv, dropout", [(True, ("q", "k", "v"), 0.0), (True, ("q", "v"), 0.1),
                                                (False, ("k",), 0.1)])
def test_recomputed_inputs_are_bit_identical(gqa, qkv, dropout):
    plain = adapted(gqa, dropout, qkv)
    lean = copy.deepcopy(plain)
    made = phi3.enable_lean(lean, loss=False)
    assert made == [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp", "input_layernorm",
                                                                          "post_attention_layernorm")]
    loss, grads = loss_and_grads(plain)
    lean_loss, lean_grads = loss_and_grads(lean)
    assert torch.equal(lean_loss, loss)
    assert grads.keys() == lean_grads.keys()
    for name, g in grads.items():
        assert g.abs().sum() > 0 and torch.equal(lean_grads[name], g), name


def test_recomputed_inputs_bit_identical_in_bf16():
    plain = adapted(dropout=0.1).to(torch.bfloat16)
    lean = copy.deepcopy(plain)
    phi3.enable_lean(lean, loss=False)
    loss, grads = loss_and_grads(plain)
    lean_loss, lean_grads = loss_and_grads(lean)
    assert torch.equal(lean_loss, loss)
    assert all(torch.equal(lean_grads[n], g) for n, g in grads.items())


@pytest.mark.parametrize("variant", ["dora", "nf4"])
def test_recomputed_inputs_with_dora_and_a_quantized_base(variant):
    """The rebuilt input reaches every gradient the LoRA autograd computes, DoRA's magnitude included."""
    if variant == "nf4":
        pytest.importorskip("torchao")
        from lora_layers import quantize_base

        base = make_tiny_phi3(gqa=False, hidden_size=128, intermediate_size=256)  # sizes NF4 can pack
        quantize_base(base)
        phi3.apply_lora(base, r=4, lora_dropout=0.1)
        randomize_adapters(base, std=0.2)
        plain = base.train()
    else:
        plain = adapted(dropout=0.1, use_dora=True)
    lean = copy.deepcopy(plain)
    phi3.enable_lean(lean, loss=False)
    loss, grads = loss_and_grads(plain)
    lean_loss, lean_grads = loss_and_grads(lean)
    assert torch.equal(lean_loss, loss)
    if variant == "dora":
        assert any(name.endswith("lora_magnitude") for name in grads)
    assert all(torch.equal(lean_grads[n], g) for n, g in grads.items())


def test_lean_loss_and_every_gradient_match_the_float64_model():
    """Within fp32 rounding: no further from the float64 model than the plain fp32 model is (up to 2x)."""
    plain = adapted()
    reference = copy.deepcopy(plain).double()
    model = copy.deepcopy(plain)
    phi3.enable_lean(model)
    loss, grads = loss_and_grads(model)
    plain_loss, plain_grads = loss_and_grads(plain)
    ref_loss, ref_grads = loss_and_grads(reference)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, name
        assert rel(grads[name], g) <= 2 * rel(plain_grads[name], g) + 1e-6 and rel(grads[name], g) <= 1e-4, name


@pytest.mark.parametrize("checkpointing, dropout", [("reentrant", 0.1), ("non-reentrant", 0.1),
                                                    ("non-reentrant", 0.0)])
def test_gradient_checkpointing(checkpointing, dropout):
    plain = adapted(dropout=dropout)
    lean = copy.deepcopy(plain)
    phi3.enable_lean(lean)
    phi3.enable_gradient_checkpointing(lean, use_reentrant=checkpointing == "reentrant")
    loss, grads = loss_and_grads(plain)
    lean_loss, lean_grads = loss_and_grads(lean)
    assert abs(lean_loss.item() - loss.item()) <= 1e-6 * loss.item()
    for name, g in grads.items():
        assert rel(lean_grads[name], g) <= 1e-5, name


def _saved_bytes(model, labels):
    """Bytes autograd keeps for one forward, once per storage, parameters and ids excluded."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {IDS.untyped_storage().data_ptr()}
    seen, keep = {}, []

    def pack(t):
        keep.append(t)
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(IDS, labels=labels)
    del out, keep
    return sum(seen.values())


def test_saved_bytes_follow_the_formula():
    """Lean LoRA keeps what the frozen model with the fused loss keeps, plus per layer each
    adapter's u = x Aᵀ (T × r per enabled split) and o_proj's input (the attention output,
    not an RMSNorm or SwiGLU output); the plain LoRA model also keeps the inputs of
    qkv_proj, gate_up_proj (T × H each) and down_proj (T × I)."""
    base = make_tiny_phi3(gqa=True)
    frozen = copy.deepcopy(base).requires_grad_(False)
    plain = copy.deepcopy(base)
    phi3.apply_lora(plain, r=4)
    lean = copy.deepcopy(plain)
    phi3.enable_lean(lean)
    frozen_lean = copy.deepcopy(frozen)
    phi3.enable_lean(frozen_lean)
    for m in (frozen, frozen_lean, plain, lean):
        m.enable_input_require_grads()  # the embedding output needs grad: every layer's norm keeps its input
        m.train()
    T, H, I, V, r, layers = IDS.numel(), 64, 96, 128, 4, 2
    u = T * r * (3 + 1 + 2 + 1) * 4  # qkv: 3 splits, o_proj, gate_up: 2 splits, down_proj
    o_input = T * H * 4
    assert _saved_bytes(lean, LABELS) == _saved_bytes(frozen_lean, LABELS) + layers * (u + o_input)
    assert _saved_bytes(plain, LABELS) == _saved_bytes(frozen, LABELS) + layers * (u + o_input + (2 * H + I) * T * 4)
    # The fused loss keeps (counted tokens × H) and their indices; the plain one a (T × V) log-softmax,
    # the shifted labels (int64) and the count of tokens (one float).
    counted = int((LABELS[:, 1:] != -100).sum())
    plain_loss, fused_loss = T * V * 4 + T * 8 + 4, counted * (H * 4 + 8)
    assert _saved_bytes(frozen, LABELS) - _saved_bytes(frozen_lean, LABELS) == plain_loss - fused_loss


def test_forward_outputs():
    plain = adapted()
    model = copy.deepcopy(plain)
    phi3.apply_lora  # noqa: B018 (documented entry point; enable_lean is what it calls)
    phi3.enable_lean(model)
    out = model(IDS, labels=LABELS)
    assert out.logits is None
    expected = plain(IDS, labels=LABELS)
    assert abs(out.loss.item() - expected.loss.item()) <= 1e-6 * expected.loss.item()
    asked = model(IDS, labels=LABELS, return_logits=True)  # the plain path: the same numbers as the plain model
    assert torch.equal(asked.logits, expected.logits) and torch.equal(asked.loss, expected.loss)
    assert torch.equal(model(IDS).logits, plain(IDS).logits)  # no labels: logits as usual
    as_tuple = model(IDS, labels=LABELS, return_dict=False)
    plain_tuple = plain(IDS, labels=LABELS, return_dict=False)  # (loss, logits, cache): the same positions
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss) and as_tuple[1] is None
    assert len(as_tuple) == len(plain_tuple) and type(as_tuple[2]) is type(plain_tuple[2])
    counted = (LABELS[:, 1:] != -100).sum()
    summed = model(IDS, labels=LABELS, num_items_in_batch=2 * counted).loss  # transformers' gradient accumulation
    assert abs(summed.item() - out.loss.item() / 2) <= 1e-6
    model.eval()
    with torch.no_grad():
        assert abs(model(IDS, labels=LABELS).loss.item() - plain.eval()(IDS, labels=LABELS).loss.item()) <= 1e-5
        greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(IDS, **greedy), plain.generate(IDS, **greedy))


def test_merge_and_unload_and_unload_give_back_plain_modules(tmp_path):
    plain = adapted()
    model = copy.deepcopy(plain)
    phi3.enable_lean(model)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert lora_state_dict(model).keys() == lora_state_dict(plain).keys()
    classes = {n: type(m) for n, m in plain.named_modules()}
    twin = copy.deepcopy(model)
    for undo in (merge_and_unload, unload):
        restored = undo(model if undo is merge_and_unload else twin)
        assert not lean_mod.is_lean(restored) and "forward" not in vars(restored)
        layer = restored.model.layers[0]
        assert type(layer.input_layernorm).__name__ == "Phi3RMSNorm" and type(layer.mlp).__name__ == "Phi3MLP"
        assert all(type(m) is classes[n] for n, m in restored.named_modules() if "norm" in n or n.endswith("mlp"))
    with torch.no_grad():
        expected = plain.eval()(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = transformers.Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_pickle_and_deepcopy_keep_lean_mode():
    model = adapted()
    phi3.enable_lean(model)
    expected = model(IDS, labels=LABELS).loss
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert lean_mod.is_lean(copied) and copied.forward.model is copied
        out = copied(IDS, labels=LABELS)
        assert out.logits is None and torch.equal(out.loss, expected)


def test_enable_lean_is_idempotent_and_checks_before_changing():
    model = adapted()
    assert phi3.enable_lean(model) and phi3.enable_lean(model) == []
    bare = adapted().model
    before = snapshot(bare)
    with pytest.raises(ValueError, match="loss=True needs a causal LM"):
        phi3.enable_lean(bare)
    assert_unchanged(bare, before)
    assert phi3.enable_lean(bare, loss=False)  # a bare Phi3Model: recomputed inputs only
    odd = adapted()
    odd.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(64)
    before = snapshot(odd)
    with pytest.raises(ValueError, match="post_attention_layernorm is a LayerNorm, expected transformers' Phi3RMSNorm"):
        phi3.enable_lean(odd)
    assert_unchanged(odd, before)
    assert "forward" not in vars(odd)


def test_apply_lora_lean_switch():
    model = make_tiny_phi3()
    phi3.apply_lora(model, r=4, targets=("qkv_proj", "o_proj"), lean=True)
    layer = model.model.layers[0]
    assert type(layer.input_layernorm) is lean_mod.LeanRMSNorm
    # gate_up_proj and down_proj keep no adapter: their producers stay as they are.
    assert type(layer.post_attention_layernorm).__name__ == "Phi3RMSNorm" and type(layer.mlp).__name__ == "Phi3MLP"
    assert model.train()(IDS, labels=LABELS).logits is None


@pytest.mark.slow
def test_torch_compile_adds_no_graph_break():
    torch._dynamo.reset()
    plain = adapted(layers=1)
    lean = copy.deepcopy(plain)
    phi3.enable_lean(lean)
    breaks = {}
    for name, model in (("plain", plain), ("lean", lean)):
        explanation = torch._dynamo.explain(model)(IDS, labels=LABELS)
        breaks[name] = explanation.graph_break_count
        torch._dynamo.reset()
    assert breaks["lean"] <= breaks["plain"], breaks
    compiled = torch.compile(copy.deepcopy(lean), backend="aot_eager")
    out, eager = compiled(IDS, labels=LABELS), lean(IDS, labels=LABELS)
    assert out.logits is None
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_lean_loss_curve_matches_plain_curve():
    sys.path.insert(0, BENCH)
    import loss_parity

    res = loss_parity.run_lean_parity(lambda: make_tiny_phi3(gqa=True), steps=20)
    assert len(res["lean"]) == 20 and res["lean"][-1] < res["lean"][0]
    assert res["max_abs_diff"] <= 1e-5, res


def test_benchmark_rows():
    sys.path.insert(0, BENCH)
    import bench_phi3_step as bench

    data = bench.main(["--quick", "--threads", "1", "--reps", "1"])["results"]
    peft, lean, frozen_lean = data[bench.PEFT], data[bench.LEAN], data[bench.FLOOR_LEAN]
    for row in (lean, frozen_lean):
        assert abs(row["first_loss"] - peft["first_loss"]) <= 1e-5
    assert lean["trainable_params"] == data[bench.PHI3]["trainable_params"]
    assert lean["saved_bytes"] < data[bench.PHI3]["saved_bytes"]
    assert frozen_lean["saved_bytes"] < data[bench.FLOOR]["saved_bytes"]
