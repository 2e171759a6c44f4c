"""DoRA: the float64 formula (forward, every gradient, dropout, fused GQA splits,
fan_in_fan_out), exact merging, bf16 stability, what backward keeps, checkpoints,
LoRA+ and the Gaussian init, and bad input. None of these needs PEFT; the comparisons
with PEFT are in tests/parity/test_dora_peft.py."""
import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers.functional import dora_weight_norm, draw_seed, dropout_mask, lora_linear
from _fused import GQA
from _naive_lora import F64, assert_rel_close, bit_equal, leaf64, naive_dora


def _layer(kind, dtype=torch.float32, p=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "linear":
        layer = L.Linear(12, 10, r=3, lora_alpha=6, lora_dropout=p, use_dora=True, dtype=dtype, **kw)
    elif kind == "fifo":
        layer = L.Linear(12, 10, r=3, lora_alpha=6, lora_dropout=p, use_dora=True, fan_in_fan_out=True,
                         dtype=dtype, **kw)
    else:
        layer = L.MergedLinear(12, 16, r=2, lora_alpha=4, lora_dropout=p, enable_lora=GQA["enable"],
                               split_sizes=GQA["split_sizes"], use_dora=True, dtype=dtype, **kw)
    with torch.no_grad():  # "trained" adapters and magnitudes
        layer.lora_B.normal_(0, 0.5)
        layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
    return layer


def _reference(kind, layer, x, mask=None):
    """Float64 leaves (x, A, B, m, b) and the naive DoRA output on them."""
    leaves = [leaf64(t) for t in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.bias)]
    fused = GQA if kind == "merged" else {}
    y = naive_dora(leaves[0], layer.weight.detach().double(), leaves[4], *leaves[1:4], layer.scaling, mask=mask,
                   fan_in_fan_out=kind == "fifo", **fused)
    return leaves, y


def _forward_and_reference(kind, layer, x, p):
    """The layer's output on ``x`` and the float64 reference with the same dropout mask."""
    torch.manual_seed(7)
    y = layer(x)
    mask = None
    if p > 0:
        torch.manual_seed(7)
        mask = dropout_mask(draw_seed(), x.detach().reshape(-1, 12), p).view(x.shape).double()
    return (y,) + _reference(kind, layer, x, mask)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["linear", "fifo", "merged"])
def test_forward_and_every_gradient_match_the_float64_formula(kind, p):
    layer = _layer(kind, p=p).train()
    x = torch.randn(2, 5, 12, requires_grad=True)
    y, leaves, ref = _forward_and_reference(kind, layer, x, p)
    assert_rel_close(y, ref, torch.float32, "forward")
    g = torch.randn_like(y)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.bias]
    grads = torch.autograd.grad(y, params, g)
    for name, got, want in zip("x A B m b".split(), grads, torch.autograd.grad(ref, leaves, g.double())):
        assert_rel_close(got, want, torch.float32, f"d{name}")


def test_gradcheck_float64_with_the_norm_held_constant():
    layer = _layer("merged").double()
    norm = dora_weight_norm(layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.segments)
    inputs = [leaf64(t) for t in (torch.randn(3, 12), layer.lora_A, layer.lora_B, layer.lora_magnitude,
                                  layer.bias)]

    def fn(x, A, B, m, b):
        torch.manual_seed(3)
        return lora_linear(x, layer.weight, b, A, B, layer.scaling, 0.3, True, segments=layer.segments,
                           magnitude=m, weight_norm=norm)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "fifo", "merged"])
def test_the_norm_follows_weight_data_writes(kind):
    # ``weight.data`` writes (how pretrained weights are often loaded) keep the address and do
    # not bump ``_version``: the norm must still be that of the weight as it is, in forward and
    # in eval()'s merge.
    layer = _layer(kind)
    x = torch.randn(5, 12)
    layer(x)  # a forward before the change, as a cache would have seen
    layer.weight.data.mul_(2.0)
    _, expected = _reference(kind, layer, x)
    torch.testing.assert_close(layer(x).double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.eval()(x).double(), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_norm_from_w_a_and_a_a_equals_the_built_matrix_in_bf16(kind):
    # The cancellation-prone formula, run in fp32 on a bf16 base, against ‖W + s·BA‖ in float64.
    layer = _layer(kind, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 3.0)  # a large update: the cross term matters
    norm = layer._dora_norm()
    assert norm.dtype == torch.float32
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    if kind == "merged":
        from _naive_lora import delta_merged
        dW = delta_merged(A, B, GQA["split_sizes"], GQA["enable"], 2)
        rows = torch.tensor([True] * 8 + [False] * 4 + [True] * 4)
    else:
        dW, rows = B @ A, torch.ones(10, dtype=torch.bool)
    expected = (W + layer.scaling * dW).norm(dim=1)[rows]
    torch.testing.assert_close(norm.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "fifo", "merged"])
def test_merge_is_exact_and_restores_the_weight_bit_for_bit(kind, dtype):
    layer = _layer(kind, dtype=dtype)
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 12).to(dtype)
    y = layer.train()(x)
    for _ in range(3):
        layer.eval()
        assert layer.merged
        y_merged = layer(x)
        layer.train()
        assert bit_equal(layer.weight, w0)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(y_merged, y, rtol=tol, atol=tol)
    # merged weight = (m / ‖W + s·BA‖) ⊙ (W + s·BA), computed in float64
    (_, A, B, m, _), _ = _reference(kind, layer, x)
    W = w0.double().t() if kind == "fifo" else w0.double()
    if kind == "merged":
        from _naive_lora import delta_merged
        dW = delta_merged(A.detach(), B.detach(), GQA["split_sizes"], GQA["enable"], 2)
        rows = torch.tensor([True] * 8 + [False] * 4 + [True] * 4)
    else:
        dW, rows = B.detach() @ A.detach(), torch.ones(10, dtype=torch.bool)
    V = W + layer.scaling * dW
    scale = torch.ones(V.shape[0], dtype=F64).masked_scatter(rows, m.detach()) / V.norm(dim=1)
    expected = torch.where(rows[:, None], V * scale[:, None], W)
    merged = layer.merged_weight().double()
    torch.testing.assert_close(merged.t() if kind == "fifo" else merged, expected,
                               rtol={torch.float32: 1e-6}.get(dtype, 1e-2), atol=1e-6)


def test_backward_keeps_x_u_and_vectors_only():
    torch.manual_seed(0)
    T, d, r = 512, 96, 4
    layer = L.Linear(d, d, r=r, lora_alpha=8, lora_dropout=0.1, use_dora=True)
    x = torch.randn(T, d, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer.train()(x)
    beyond_x = sum(t.numel() * t.element_size() for t in saved
                   if t.untyped_storage().data_ptr() not in {x.untyped_storage().data_ptr(),
                                                            layer.weight.untyped_storage().data_ptr(),
                                                            layer.lora_A.untyped_storage().data_ptr(),
                                                            layer.lora_B.untyped_storage().data_ptr(),
                                                            layer.lora_magnitude.untyped_storage().data_ptr(),
                                                            layer.bias.untyped_storage().data_ptr()})
    # u (T × r) and the (out,) norm: nothing of size T × out, no mask
    assert beyond_x == (T * r + d) * 4, beyond_x
    y.sum().backward()
    assert layer.lora_magnitude.grad is not None


# ----------------------------------------------------------------------------- the PEFT format

def test_mixed_dora_and_lora_cannot_be_one_peft_adapter(tmp_path):
    model = nn.Sequential(L.Linear(4, 4, r=2, use_dora=True), L.Linear(4, 4, r=2))
    with pytest.raises(NotImplementedError, match="mixes DoRA and plain LoRA"):
        L.export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- surgery, checkpoints, LoRA+

def test_phi3_dora_trains_saves_and_merges(tmp_path, tiny_phi3_factory):
    model = tiny_phi3_factory()
    ids = torch.randint(0, 128, (2, 9))
    base_logits = model(ids).logits
    L.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0, qkv=("q", "v"), use_dora=True)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.use_dora and qkv.lora_magnitude.shape == (64 + 32,)  # q and v rows of [64 | 32 | 32]
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=1e-5, atol=1e-5)  # at init: the base
    opt = torch.optim.AdamW(L.lora_plus_param_groups(model, lr=1e-2, ratio=4.0))
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = model.eval()(ids).logits
    assert not torch.allclose(trained, base_logits)
    L.save_lora(model, tmp_path / "a.safetensors")
    fresh = tiny_phi3_factory()
    L.phi3.apply_lora(fresh, r=4, lora_alpha=8, lora_dropout=0.0, qkv=("q", "v"), use_dora=True)
    L.load_lora(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(fresh.eval()(ids).logits, trained, rtol=1e-5, atol=1e-5)
    plain = L.merge_and_unload(fresh)
    assert type(plain.model.layers[0].self_attn.qkv_proj) is nn.Linear
    torch.testing.assert_close(plain(ids).logits, trained, rtol=1e-4, atol=1e-4)
    lora_model = tiny_phi3_factory()
    L.phi3.apply_lora(lora_model, r=4, lora_alpha=8, qkv=("q", "v"))
    with pytest.raises(L.CheckpointError, match="use_dora"):
        L.load_lora(lora_model, tmp_path / "a.safetensors")


def test_lora_plus_groups():
    model = nn.Sequential(L.Linear(4, 4, r=2, use_dora=True), L.Embedding(5, 4, r=2),
                          L.MergedLinear(4, 6, r=2, enable_lora=[True, False]))
    fast, slow = model[0].lora_B, model[0].lora_A
    groups = L.lora_plus_param_groups(model, lr=1e-3, ratio=8.0, weight_decay=0.1)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr[8e-3] == {id(model[0].lora_B), id(model[2].lora_B)} and id(fast) in by_lr[8e-3]
    assert {id(slow), id(model[0].lora_magnitude), id(model[1].lora_A), id(model[1].lora_B)} <= by_lr[1e-3]
    assert all(g["weight_decay"] == 0.1 for g in groups)
    # Every parameter that requires grad is in exactly one group: the adapters, and the biases
    # that mark_only_lora_as_trainable(bias="lora_only") leaves trainable (at lr, as in PEFT).
    L.mark_only_lora_as_trainable(model, bias="lora_only")
    groups = L.lora_plus_param_groups(model, lr=1e-3, ratio=8.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert {id(model[0].bias), id(model[2].bias)} <= {id(p) for p in groups[0]["params"]}
    assert groups[0]["lr"] == 1e-3
    L.mark_only_lora_as_trainable(model)
    assert sorted(id(p) for g in L.lora_plus_param_groups(model, lr=1e-3) for p in g["params"]) == sorted(
        id(p) for p in L.lora_parameters(model))
    for bad in (dict(lr=0.0), dict(lr=1e-3, ratio=-1.0), dict(lr=1e-3, weight_decay=float("nan")),
                dict(lr=True)):
        with pytest.raises(ValueError, match=next(iter(k for k in bad if k != "lr" or len(bad) == 1))):
            L.lora_plus_param_groups(model, **{"lr": 1e-3, **bad})


def test_gaussian_init_draws_a_from_n_0_1_over_r_and_leaves_b_zero():
    # PEFT's init_lora_weights="gaussian": A ~ N(0, 1/r) with B = 0 for Linear; for Embedding,
    # whose roles are swapped, A = 0 and B ~ N(0, 1). (tests/parity/test_dora_peft.py compares with PEFT.)
    torch.manual_seed(0)
    layer = L.Linear(256, 64, r=8, init="gaussian")
    assert not layer.lora_B.any()
    assert abs(layer.lora_A.mean().item()) < 0.01 and abs(layer.lora_A.std().item() - 1 / 8) < 0.01
    emb = L.Embedding(100, 512, r=4, init="gaussian")
    assert not emb.lora_A.any()
    assert abs(emb.lora_B.mean().item()) < 0.1 and abs(emb.lora_B.std().item() - 1.0) < 0.1
    bound = 1 / (8 ** 0.5)  # the default stays kaiming-uniform(a=√5): U(-1/√in, 1/√in)
    default = L.Linear(8, 8, r=2).lora_A
    assert default.abs().max() <= bound and default.abs().max() > bound / 2


@pytest.mark.parametrize("make, exc, text", [
    (lambda: L.Linear(4, 4, r=0, use_dora=True), ValueError, "use_dora=True needs an adapter"),
    (lambda: L.MergedLinear(4, 6, r=2, enable_lora=[False, False], use_dora=True), ValueError,
     "no enabled split.*enable at least one split"),
    (lambda: L.Linear(4, 4, r=2, use_dora="false"), TypeError, "use_dora must be True or False, got 'false'"),
    (lambda: L.Linear(4, 4, r=2, use_dora=1), TypeError, "use_dora must be True or False, got 1"),
    (lambda: L.Conv2d.from_module(nn.Conv2d(2, 2, 1), r=2, use_dora=True), TypeError, "not supported by Conv2d"),
    (lambda: L.Embedding.from_module(nn.Embedding(4, 4), r=2, use_dora=True), TypeError, "Embedding"),
    (lambda: L.Linear(4, 4, r=2, init="corda"), ValueError, "init must be one of"),
    (lambda: L.Embedding(4, 4, r=2, use_dora=True), TypeError, "not supported by Embedding"),
    (lambda: L.Conv1d(2, 2, 1, r=2, use_dora=True), TypeError, "not supported by Conv1d"),
    (lambda: L.inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Embedding(4, 4)), ["0", "1"], r=2, use_dora=True),
     TypeError, "cannot put a LoRA adapter on 1"),
])
def test_bad_input(make, exc, text):
    with pytest.raises(exc, match=text):
        make()


def test_refused_surgery_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(4, 4))
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(TypeError):
        L.inject_lora(model, ["0", "1"], r=2, use_dora=True)
    assert [type(m) for m in model] == [nn.Linear, nn.Embedding]
    for n, p in model.named_parameters():
        assert p is before[n][0] and torch.equal(p, before[n][1]) and p.requires_grad == before[n][2]


@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_torch_compile_no_graph_breaks_and_matches_eager(kind):
    layer = _layer(kind).train()
    x = torch.randn(4, 12, requires_grad=True)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y_c, y_e = compiled(x), layer(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude]
    for a, b in zip(torch.autograd.grad(y_c.sum(), params), torch.autograd.grad(y_e.sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_export_over_a_bitsandbytes_base_writes_the_dequantized_row_norms(kind, tmp_path):
    # A DoRA MergedLinear's rows without an adapter are exported as ‖W_row‖ (PEFT's factor one).
    # Over bitsandbytes ``weight`` holds packed bytes: the norms must come from the dequantized
    # weight, or PEFT (and import_peft) rescale the k rows or refuse the file's shape.
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    def wrapped():
        torch.manual_seed(0)
        plain = nn.Linear(64, 128, bias=False)
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(64, 128, bias=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        q.load_state_dict(plain.state_dict())
        q = q.to("cpu")  # no switch against bitsandbytes' CPU repacking: the LoRA layer never triggers it
        return nn.Sequential(L.MergedLinear.from_module(q, r=4, lora_alpha=8, use_dora=True,
                                                        enable_lora=[True, False, True], split_sizes=[64, 32, 32]))

    model = wrapped()
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(1.5)
    L.export_peft(model, tmp_path / "a", task_type=None)
    (magnitude,) = [t for k, t in load_file(tmp_path / "a" / "adapter_model.safetensors").items() if "magnitude" in k]
    W = layer.quantized.dequantize().double()
    assert magnitude.shape == (128,)
    torch.testing.assert_close(magnitude[64:96].double(), W[64:96].norm(dim=1), rtol=1e-6, atol=0)
    back = wrapped()
    L.import_peft(back, tmp_path / "a")
    x = torch.randn(3, 64)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_eval_with_a_wrongly_shaped_magnitude_raises_by_name_and_changes_nothing():
    layer = _layer("linear")
    weight = layer.weight.detach().clone()
    layer.lora_magnitude = nn.Parameter(torch.ones(5))  # the layer has 10 rows
    with pytest.raises(ValueError, match=r"lora_magnitude must have shape \(10,\).*got \(5,\)"):
        layer.eval()
    assert layer.training and not layer.merged and bit_equal(layer.weight, weight)



# ----------------------------------------------------------------------------- the magnitude follows a loaded weight

def _pretrained_state(kind, seed=1):
    """A plain pretrained layer for ``kind`` and its state_dict in that layer's storage layout."""
    torch.manual_seed(seed)
    pre = nn.Linear(12, 16 if kind == "merged" else 10)
    state = {"weight": pre.weight.detach().clone(), "bias": pre.bias.detach().clone()}
    if kind == "fifo":  # GPT-2 Conv1D checkpoints store (in, out)
        state["weight"] = state["weight"].t().contiguous()
    return pre, state


def _fresh(kind, **kw):
    layer = _layer(kind, **kw)
    layer.reset_lora_parameters()  # B = 0 and m = ‖W‖: a new layer
    return layer


@pytest.mark.parametrize("how", ["strict_false", "assign", "whole_model", "merged"])
@pytest.mark.parametrize("kind", ["linear", "fifo", "merged"])
def test_loading_a_pretrained_weight_gives_the_pretrained_output(kind, how):
    # issue #20 item 1: the loralib workflow (build, then load the base with strict=False).
    pre, state = _pretrained_state(kind)
    layer = _fresh(kind)
    model = nn.Sequential(layer)
    if how == "merged":
        model.eval()
        assert layer.merged
    if how == "whole_model":
        model.load_state_dict({"0." + k: v for k, v in state.items()}, strict=False)
    else:
        layer.load_state_dict(state, strict=False, assign=how == "assign")
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), pre(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.train()(x), pre(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.lora_magnitude.double(), _row_norms(kind, pre.weight), rtol=1e-6, atol=0)


def _row_norms(kind, weight, delta=None):
    """‖W + ΔW‖ per adapted row in float64 (``weight`` in (out, in) layout)."""
    V = weight.detach().double() + (0 if delta is None else delta)
    rows = torch.tensor([True] * 8 + [False] * 4 + [True] * 4) if kind == "merged" else slice(None)
    return V.norm(dim=1)[rows]


@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_a_loaded_weight_without_magnitude_gets_peft_s_init_from_the_loaded_adapter(kind):
    # PEFT initialises m to ‖W + s·BA‖ with the adapter it has: a load that brings W, A and B
    # but no magnitude gives the same, so the layer returns base + LoRA (factor one).
    pre, state = _pretrained_state(kind)
    donor = _layer(kind, seed=5)
    state.update(lora_A=donor.lora_A.detach(), lora_B=donor.lora_B.detach())
    layer = _fresh(kind)
    layer.load_state_dict(state, strict=False)
    A, B = donor.lora_A.detach().double(), donor.lora_B.detach().double()
    if kind == "merged":
        from _naive_lora import delta_merged
        dW = delta_merged(A, B, GQA["split_sizes"], GQA["enable"], 2)
    else:
        dW = B @ A
    expected = _row_norms(kind, pre.weight, layer.scaling * dW)
    torch.testing.assert_close(layer.lora_magnitude.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_a_magnitude_in_the_loaded_state_wins(kind):
    _, state = _pretrained_state(kind)
    trained = _layer(kind, seed=3)
    state.update({k: v for k, v in trained.state_dict().items() if k.startswith("lora_")})
    layer = _fresh(kind)
    layer.load_state_dict(state, strict=True)
    assert bit_equal(layer.lora_magnitude, trained.lora_magnitude)


@pytest.mark.parametrize("kind", ["linear", "fifo", "merged"])
def test_reset_parameters_derives_the_magnitude_from_the_new_weight(kind):
    layer = _layer(kind).eval()  # merged, trained adapter and magnitude
    layer.reset_parameters()
    x = torch.randn(5, 12)
    W = layer.weight.t() if kind == "fifo" else layer.weight
    torch.testing.assert_close(layer.train()(x), x @ W.t() + layer.bias, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.lora_magnitude.double(), _row_norms(kind, W), rtol=1e-6, atol=0)


def test_from_module_then_loading_the_model_gives_the_pretrained_output():
    # The quickstart's order: inject into a randomly initialised model, then load the base.
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
    L.inject_lora(model, ["0", "2"], r=4, lora_alpha=8, use_dora=True)
    result = model.load_state_dict(pretrained.state_dict(), strict=False)
    assert all(k.endswith(("lora_A", "lora_B", "lora_magnitude")) for k in result.missing_keys)
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), pretrained(x), rtol=1e-6, atol=1e-6)


def test_a_trained_magnitude_is_kept_when_the_base_is_loaded_after_it(tmp_path):
    # Adapter first, base second: the magnitude is learned state, never re-derived (loudly).
    pre, state = _pretrained_state("linear")
    trained = _layer("linear", seed=3)
    L.save_lora(nn.Sequential(trained), tmp_path / "a.safetensors")
    model = nn.Sequential(_fresh("linear"))
    L.load_lora(model, tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match=r"kept lora_magnitude.*reset_magnitude\(\)"):
        model.load_state_dict({"0." + k: v for k, v in state.items()}, strict=False)
    assert bit_equal(model[0].lora_magnitude, trained.lora_magnitude)
    # and in the usual order the adapter's magnitude replaces the derived one
    model = nn.Sequential(_fresh("linear"))
    model.load_state_dict({"0." + k: v for k, v in state.items()}, strict=False)
    L.load_lora(model, tmp_path / "a.safetensors")
    assert bit_equal(model[0].lora_magnitude, trained.lora_magnitude)


@pytest.mark.parametrize("kind", ["linear", "fifo", "merged"])
def test_reset_magnitude_resyncs_after_a_weight_written_by_hand(kind):
    # weight.data writes cannot be seen cheaply: reset_magnitude() is the documented re-sync.
    pre, state = _pretrained_state(kind)
    layer = _fresh(kind).eval()
    layer.train()
    layer.weight.data.copy_(state["weight"])
    layer.bias.data.copy_(state["bias"])
    layer.eval()
    layer.reset_magnitude()  # merged: re-derived from the unmerged weight, and merged again
    assert layer.merged
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), pre(x), rtol=1e-6, atol=1e-6)
    layer.train()
    assert bit_equal(layer.weight, state["weight"])
    torch.testing.assert_close(layer(x), pre(x), rtol=1e-6, atol=1e-6)


def test_reset_magnitude_of_a_merged_layer_that_can_no_longer_merge_does_not_raise():
    # issue #20 review: a weight assigned to a merged layer marks it as possibly tied (it never merges
    # again until a model-level call rescans it); reset_magnitude() used to unmerge, re-derive, then
    # raise in merge() with the layer already changed. It now leaves it unmerged, as eval() would.
    layer = _layer("linear").eval()
    layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)  # same values
    assert layer.merged and layer._merge_blocker() is not None
    layer.reset_magnitude()
    assert not layer.merged
    ref = _layer("linear")
    ref.reset_magnitude()
    x = torch.randn(5, 12)
    assert bit_equal(layer.lora_magnitude, ref.lora_magnitude)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-6, atol=1e-6)
    # the same for a load of the base weight that the magnitude follows
    pre, state = _pretrained_state("linear")
    layer = _fresh("linear").eval()
    layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    layer.load_state_dict(state, strict=False)
    assert not layer.merged
    torch.testing.assert_close(layer(x), pre(x), rtol=1e-6, atol=1e-6)


def test_reset_magnitude_without_dora_raises_by_name():
    layer = L.Linear(4, 4, r=2)
    with pytest.raises(ValueError, match=r"reset_magnitude.*use_dora=False"):
        layer.reset_magnitude()


def test_loading_a_bitsandbytes_int8_base_derives_the_magnitude_from_the_dequantized_weight():
    bnb = pytest.importorskip("bitsandbytes")

    def int8(seed):
        torch.manual_seed(seed)
        q = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
        q.load_state_dict(nn.Linear(64, 32, bias=False).state_dict())
        return q.to("cpu")

    layer = L.Linear.from_module(int8(0), r=4, lora_alpha=8, use_dora=True)
    pretrained = int8(1)
    layer.load_state_dict(pretrained.state_dict(), strict=False)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), pretrained(x), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- a zero row (a pruned neuron)

# (output row, lora_B row): for "merged", row 13 is in the adapted v split (B row 9), and row 9 in the
# k split has no adapter at all.
PRUNED = {"linear": [(0, 0), (3, 3)], "fifo": [(0, 0), (3, 3)], "merged": [(0, 0), (13, 9)]}


def _pruned(kind, p=0.0):
    """A trained DoRA layer with zero weight rows and zero B rows: ‖W + s·BA‖ = 0 there. The first
    pruned row keeps a trained magnitude, the second has the derived one (‖0‖ = 0)."""
    layer = _layer(kind, p=p)
    with torch.no_grad():
        for out_row, b_row in PRUNED[kind] + ([(9, None)] if kind == "merged" else []):
            (layer.weight[:, out_row] if kind == "fifo" else layer.weight[out_row]).zero_()
            if b_row is not None:
                layer.lora_B[b_row].zero_()
        layer.lora_magnitude[PRUNED[kind][1][1]] = 0.0
    return layer


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["linear", "fifo", "merged"])
def test_a_zero_row_keeps_the_base_output_with_finite_gradients(kind, p, create_graph):
    # issue #20 item 10: PEFT computes 0/0 there; lora_layers takes the factor as 1.
    layer = _pruned(kind, p=p).train()
    assert (layer._dora_norm()[[b for _, b in PRUNED[kind]]] == 0).all()
    x = torch.randn(2, 5, 12, requires_grad=True)
    y, leaves, ref = _forward_and_reference(kind, layer, x, p)
    for out_row, _ in PRUNED[kind]:
        assert torch.equal(y[..., out_row], layer.bias[out_row].expand(2, 5))  # the base output: 0·x + b
    assert_rel_close(y, ref, torch.float32, "forward")
    g = torch.randn_like(y)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.bias]
    grads = torch.autograd.grad(y, params, g, create_graph=create_graph)
    for name, got, want in zip("x A B m b".split(), grads, torch.autograd.grad(ref, leaves, g.double())):
        assert torch.isfinite(got).all(), f"d{name}"
        assert_rel_close(got, want, torch.float32, f"d{name}")
    assert not grads[3][[b for _, b in PRUNED[kind]]].any()  # the factor does not depend on m there


@pytest.mark.parametrize("kind", ["linear", "fifo", "merged"])
def test_a_zero_row_merges_and_unmerges_exactly(kind):
    layer = _pruned(kind)
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 12)
    y = layer.train()(x)
    layer.eval()
    assert layer.merged and torch.isfinite(layer.weight).all()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.train()
    assert bit_equal(layer.weight, w0)


def test_a_zero_magnitude_on_a_nonzero_row_merges_and_unmerges_exactly():
    # m = 0 with ‖W + s·BA‖ > 0 merges a zero row: restoring it must not divide by the zero factor.
    layer = _layer("linear")
    with torch.no_grad():
        layer.lora_magnitude[[1, 4]] = 0.0
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 12)
    y = layer.train()(x)
    for _ in range(2):
        layer.eval()
        assert torch.isfinite(layer.weight).all() and not layer.weight[[1, 4]].any()
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        layer.train()
        assert bit_equal(layer.weight, w0)


def test_export_to_peft_refuses_a_zero_row_by_name(tmp_path):
    model = nn.Sequential(_pruned("merged"))
    with pytest.raises(ValueError, match=r"'0'.*rows \[0, 9, 13\].*NaN"):
        L.export_peft(model, tmp_path / "a", task_type=None)
    assert not (tmp_path / "a").exists()


def test_a_layer_built_on_meta_then_materialised_keeps_its_magnitude_loudly():
    # to_empty() leaves a magnitude with unknown values and nothing to compare it with: the load keeps it,
    # warns, and reset_magnitude() (or reset_lora_parameters()) derives it.
    pre, state = _pretrained_state("linear")
    with torch.device("meta"):
        layer = L.Linear(12, 10, r=3, lora_alpha=6, use_dora=True)
    layer = layer.to_empty(device="cpu")
    layer.reset_lora_parameters()
    layer.load_state_dict(state, strict=False)  # derived after to_empty: follows
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), pre(x), rtol=1e-6, atol=1e-6)
    with torch.device("meta"):
        layer = L.Linear(12, 10, r=3, lora_alpha=6, use_dora=True)
    layer = layer.to_empty(device="cpu")
    with pytest.warns(UserWarning, match="kept lora_magnitude"):
        layer.load_state_dict(state, strict=False)
