"""Merge invariants: explicit and train/eval merging, bitwise-exact unmerge in
every dtype, safe_merge, and state_dict round trips that never double-count."""
import pytest
import torch
import torch.nn as nn

import lora_layers as L
from _naive_lora import bit_equal

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

FACTORIES = {
    "linear": lambda dt, **kw: L.Linear(12, 10, r=4, lora_alpha=8, dtype=dt, **kw),
    "linear_fifo": lambda dt, **kw: L.Linear(12, 10, r=4, lora_alpha=8, fan_in_fan_out=True, dtype=dt, **kw),
    "merged_gqa": lambda dt, **kw: L.MergedLinear(12, 24, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                                  split_sizes=[12, 6, 6], dtype=dt, **kw),
    "merged_fifo": lambda dt, **kw: L.MergedLinear(12, 24, r=2, lora_alpha=4, enable_lora=[False, True, True],
                                                   split_sizes=[12, 6, 6], fan_in_fan_out=True, dtype=dt, **kw),
    "embedding": lambda dt, **kw: L.Embedding(15, 6, r=3, lora_alpha=2, dtype=dt, **kw),
    "conv2d": lambda dt, **kw: L.Conv2d(4, 6, (3, 2), r=2, lora_alpha=2, groups=2, dtype=dt, **kw),
    "conv1d": lambda dt, **kw: L.Conv1d(3, 4, 3, r=2, lora_alpha=2, stride=2, dtype=dt, **kw),
}


def _input(kind, dt):
    g = torch.Generator().manual_seed(1)
    if kind == "embedding":
        return torch.randint(0, 15, (3, 5), generator=g)
    if kind == "conv2d":
        return torch.randn(2, 4, 6, 5, generator=g).to(dt)
    if kind == "conv1d":
        return torch.randn(2, 3, 9, generator=g).to(dt)
    return torch.randn(3, 12, generator=g).to(dt)


def _make(kind, dt=torch.float32, scale=0.5, **kw):
    torch.manual_seed(0)
    layer = FACTORIES[kind](dt, **kw)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn_like(layer.lora_A) * scale)
        layer.lora_B.copy_(torch.randn_like(layer.lora_B) * scale)
    return layer


TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_explicit_merge_unmerge_idempotent_and_outputs_agree(kind):
    layer = _make(kind).train()
    x = _input(kind, torch.float32)
    w0 = layer.weight.detach().clone()
    y_unmerged = layer(x).detach()
    layer.merge()
    w1 = layer.weight.detach().clone()
    assert layer.merged and not bit_equal(w1, w0)
    layer.merge()  # idempotent
    assert bit_equal(layer.weight, w1)
    assert bit_equal(layer.unmerged_weight(), w0)
    y_merged = layer(x).detach()
    torch.testing.assert_close(y_merged, y_unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged and bit_equal(layer.weight, w0)
    layer.unmerge()  # idempotent
    assert bit_equal(layer.weight, w0)
    assert torch.equal(layer(x).detach(), y_unmerged)


@pytest.mark.parametrize("kind", ["linear", "merged_gqa", "embedding", "conv2d"])
def test_train_eval_merging(kind):
    layer = _make(kind)
    assert layer.train() is layer and not layer.merged
    assert layer.eval() is layer and layer.merged
    assert layer.train(True) is layer and not layer.merged
    # a parent's train()/eval() reaches the layer
    model = nn.Sequential(layer)
    model.eval()
    assert layer.merged
    model.train()
    assert not layer.merged


@pytest.mark.parametrize("kind", ["linear", "merged_gqa", "embedding", "conv2d"])
def test_merge_weights_false_never_merges(kind):
    layer = _make(kind, merge_weights=False)
    x = _input(kind, torch.float32)
    w0 = layer.weight.detach().clone()
    y = layer.train()(x).detach()
    layer.eval()
    assert not layer.merged and bit_equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), y)  # still adds the adapter (no dropout here)
    layer.train()
    assert not layer.merged and bit_equal(layer.weight, w0)


def _extreme(layer, how):
    with torch.no_grad():
        if how == "near_zero":  # tiny weights that the delta swamps, and sign crossings
            layer.weight.mul_(1e-3)
        elif how == "large":  # delta much larger than the weight
            layer.lora_B.mul_(30)
        elif how == "subnormal" and layer.weight.dtype == torch.float32:
            layer.weight.mul_(1e-39)


@pytest.mark.parametrize("how", ["random", "near_zero", "large", "subnormal"])
@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_100_cycles_bit_identical(kind, dt, how):
    layer = _make(kind, dt)
    _extreme(layer, how)
    w0 = layer.weight.detach().clone()
    x = _input(kind, dt)
    y0 = layer.train()(x).detach()
    layer.eval()
    w_merged = layer.weight.detach().clone()
    assert not bit_equal(w_merged, w0)  # the adapter is not trivial
    for _ in range(100):
        layer.train()
        assert bit_equal(layer.weight, w0)
        layer.eval()
        assert bit_equal(layer.weight, w_merged)  # merging is deterministic, no drift either way
    layer.train()
    assert bit_equal(layer.weight, w0)
    assert torch.equal(layer(x).detach(), y0)


def test_nan_adapter_unsafe_merge_still_unmerges_exactly():
    layer = _make("merged_gqa")
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    layer.merge()
    assert torch.isnan(layer.weight).any()
    layer.unmerge()
    assert bit_equal(layer.weight, w0)


@pytest.mark.parametrize("kind,dt,bad", [
    ("linear", torch.float32, "inf"),
    ("linear", torch.float16, "huge"),      # finite adapter, overflows the fp16 weight
    ("linear_fifo", torch.bfloat16, "nan"),
    ("embedding", torch.float32, "inf"),
    ("conv2d", torch.float16, "huge"),
    ("merged_gqa", torch.float32, "later_split"),
    ("merged_fifo", torch.float16, "later_split"),
])
def test_safe_merge_refuses_nonfinite(kind, dt, bad):
    layer = _make(kind, dt)
    with torch.no_grad():
        if bad == "inf":
            layer.lora_B[0, 0] = float("inf")
        elif bad == "nan":
            layer.lora_A[0, 0] = float("nan")
        elif bad == "huge":
            layer.lora_A.fill_(300.0)
            layer.lora_B.fill_(300.0)
        else:  # only the last enabled split is non-finite: earlier ones merge first
            layer.lora_B[-1, 0] = float("inf")
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged and bit_equal(layer.weight, w0)
    with pytest.raises(ValueError):
        L.merge_lora(nn.Sequential(layer), safe_merge=True)
    assert not layer.merged and bit_equal(layer.weight, w0)


def _model(merge_weights=True):
    torch.manual_seed(0)
    m = nn.Sequential(L.Embedding(10, 8, r=2, merge_weights=merge_weights),
                      L.Linear(8, 12, r=2, lora_alpha=4, merge_weights=merge_weights),
                      L.MergedLinear(12, 12, r=2, enable_lora=[True, False, True], merge_weights=merge_weights))
    for mod in m:
        with torch.no_grad():
            mod.lora_A.normal_()
            mod.lora_B.normal_()
    return m


IDX = torch.tensor([[1, 2, 3, 9], [0, 0, 5, 4]])


def test_merged_state_dict_reload_no_double_count():
    model = _model().eval()
    y = model(IDX)
    sd = model.state_dict()
    fresh = _model()
    with torch.no_grad():  # make sure every tensor comes from sd
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(sd, strict=True)
    torch.testing.assert_close(fresh.train()(IDX), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh.eval()(IDX), y, rtol=1e-5, atol=1e-5)
    # loading into an already merged model is consistent as well
    merged = _model().eval()
    merged.load_state_dict(sd, strict=True)
    torch.testing.assert_close(merged(IDX), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.train()(IDX), y, rtol=1e-5, atol=1e-5)


def test_loralib_style_flow():
    """model.eval(); sd = model.state_dict(); fresh.load_state_dict(sd); fresh.eval()."""
    model = _model()
    model.eval()
    sd = model.state_dict()
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(sd)
    fresh.eval()
    torch.testing.assert_close(fresh(IDX), model(IDX), rtol=1e-5, atol=1e-5)
    merged = [p.detach().clone() for p in fresh.parameters()]
    for a, b, m in zip(fresh.train().parameters(), model.train().parameters(), merged):
        # the saved weight is merged: taking the adapter out again rounds once
        assert _close_to_base(a.detach(), b.detach(), m)


def _best_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(L.Embedding(10, 8, r=2, lora_alpha=4), L.Linear(8, 12, r=2, lora_alpha=4),
                         L.MergedLinear(12, 12, r=2, enable_lora=[True, False, True]),
                         L.Linear(12, 6, r=2, lora_alpha=2, use_dora=True))


def _sgd_step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    model(IDX).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return [p.detach().clone() for p in params]


def _close_to_base(loaded, base, merged):
    """``round(W_m - delta)`` is within an ulp of ``W`` measured at the larger of ``|W|`` and ``|W_m|``
    (the merge rounded once at ``W_m``'s magnitude)."""
    eps = torch.finfo(base.dtype).eps
    bound = 2 * eps * torch.maximum(base.abs(), merged.abs())
    return bool(((loaded - base).abs() <= bound).all())


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_best_checkpoint_saved_in_eval_reloads_without_double_counting(tmp_path, strict, mode):
    # Validate in eval, torch.save(model.state_dict()) as the best checkpoint, reload, continue training.
    model = _best_model()
    L.mark_only_lora_as_trainable(model)
    _sgd_step(model)
    bases = [m.weight.detach().clone() for m in model]
    y_train = model(IDX).detach()
    model.eval()
    y_eval = model(IDX).detach()
    torch.save(model.state_dict(), tmp_path / "best.pt")
    sd = torch.load(tmp_path / "best.pt", weights_only=True)

    fresh = _best_model(seed=1).train(mode == "train")  # other values everywhere: each must come from sd
    L.mark_only_lora_as_trainable(fresh)
    fresh.load_state_dict(sd, strict=strict)
    if mode == "eval":  # kept as loaded, bit for bit
        assert all(m.merged and torch.equal(m.weight, sd[f"{i}.weight"]) for i, m in enumerate(fresh))
        assert torch.equal(fresh(IDX), y_eval)
    torch.testing.assert_close(fresh.eval()(IDX), y_eval, rtol=1e-6, atol=1e-6)
    fresh.train()
    for i, (m, base) in enumerate(zip(fresh, bases)):
        assert _close_to_base(m.weight.detach(), base, sd[f"{i}.weight"]), i
    torch.testing.assert_close(fresh(IDX), y_train, rtol=1e-5, atol=1e-6)
    # a train -> eval -> train cycle is exact from here on, and training continues as the original would
    weights = [m.weight.detach().clone() for m in fresh]
    fresh.eval().train()
    assert all(bit_equal(m.weight, w) for m, w in zip(fresh, weights))
    torch.testing.assert_close(_sgd_step(fresh), _sgd_step(model.train()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("via", ["load_lora", "load_training_state"])
def test_adapter_loads_into_a_model_loaded_merged_follow_the_new_adapter(tmp_path, via):
    from lora_layers.checkpoint import load_lora, save_lora
    from lora_layers.training_state import load_training_state, save_training_state

    model, other = _best_model(), _best_model()
    L.mark_only_lora_as_trainable(other)
    _sgd_step(other)  # the same base, another adapter
    base = [m.weight.detach().clone() for m in model]
    fresh = _best_model(seed=1).eval()
    fresh.load_state_dict(model.eval().state_dict())  # merged with model's adapter, as loaded
    L.mark_only_lora_as_trainable(fresh)
    if via == "load_lora":
        save_lora(other, tmp_path / "a.safetensors")
        load_lora(fresh, tmp_path / "a.safetensors")
    else:
        save_training_state(tmp_path / "s", other, torch.optim.SGD(L.lora_parameters(other), lr=0.1))
        load_training_state(tmp_path / "s", fresh, torch.optim.SGD(L.lora_parameters(fresh), lr=0.1))
    assert all(m.merged for m in fresh)
    torch.testing.assert_close(fresh(IDX), other.eval()(IDX), rtol=1e-5, atol=1e-6)
    fresh.train()
    merged = model.state_dict()
    assert all(_close_to_base(m.weight.detach(), b, merged[f"{i}.weight"])
               for i, (m, b) in enumerate(zip(fresh, base)))


def test_merged_state_dict_without_the_adapter_is_refused_and_the_layer_left_unchanged():
    model = _best_model()
    with torch.no_grad():
        model[1].lora_B.normal_()
    sd = model.eval().state_dict()
    del sd["1.lora_A"]  # a partial load: the merged weight cannot be told from a base weight
    fresh = _best_model(seed=1)
    before = {k: v.clone() for k, v in fresh[1].state_dict().items()}
    with pytest.raises(RuntimeError, match=r"1.weight was saved merged .*1.lora_A"):
        fresh.load_state_dict(sd, strict=False)
    after = fresh[1].state_dict()
    assert not fresh[1].merged and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_merged_weight_is_refused_by_a_quantized_base(kind):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    plain = nn.Linear(16, 8)
    if kind == "nf4":
        q = bnb.nn.Linear4bit(16, 8, compute_dtype=torch.float32, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
    q.load_state_dict(plain.state_dict())
    layer = L.Linear.from_module(q.to("cpu"), r=2, lora_alpha=2)
    src = L.Linear(16, 8, r=2, lora_alpha=2)
    nn.init.normal_(src.lora_B)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    expected = {"int8": "bnb-8bit", "nf4": "bnb-4bit"}[kind]
    with pytest.raises(RuntimeError, match=rf"weight was saved merged .* is quantized \({expected}\)"):
        layer.load_state_dict(src.eval().state_dict(), strict=False)
    after = layer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_merge_factors_in_the_metadata_are_validated_and_the_layer_left_unchanged():
    model = _best_model()
    sd = model.eval().state_dict()
    assert sd._metadata["3"]["lora_merge_factors"]  # DoRA: the row scale is not in the adapter keys
    sd._metadata["3"]["lora_merge_factors"] = (torch.ones(2, 12), torch.ones(6, 2), torch.ones(5))
    fresh = _best_model(seed=1)
    before = {k: v.clone() for k, v in fresh[3].state_dict().items()}
    with pytest.raises(RuntimeError, match=r"lora_merge_factors.* of 3.weight must hold floating tensors of "
                                           r"shapes \[\(2, 12\), \(6, 2\), \(6,\)\]"):
        fresh.load_state_dict(sd)
    assert all(torch.equal(fresh[3].state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_changed_in_place_while_merged_reloads_to_the_base(dora):
    torch.manual_seed(0)
    layer = L.Linear(8, 6, r=2, lora_alpha=2, use_dora=dora)
    base = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.eval()
        layer.lora_B.normal_()  # the weight still holds the first B: the saved adapter alone does not say so
    sd = layer.state_dict()
    fresh = L.Linear(8, 6, r=2, lora_alpha=2, use_dora=dora)
    fresh.load_state_dict(sd)
    assert _close_to_base(fresh.weight.detach(), base, sd["weight"])
    assert torch.equal(fresh.lora_B, layer.lora_B)


@pytest.mark.parametrize("via", ["full", "lora_state_dict"])
def test_loading_new_adapter_into_merged_layer(via):
    layer = _make("merged_gqa").eval()
    assert layer.merged
    other = _make("merged_gqa")
    with torch.no_grad():
        other.lora_A.normal_()
        other.lora_B.normal_()
    if via == "full":
        layer.load_state_dict(other.state_dict(), strict=True)
    else:
        result = layer.load_state_dict(L.lora_state_dict(other), strict=False)
        assert sorted(result.missing_keys) == ["bias", "weight"] and not result.unexpected_keys
    assert layer.merged
    x = _input("merged_gqa", torch.float32)
    torch.testing.assert_close(layer(x), other.train()(x), rtol=1e-5, atol=1e-5)
    layer.train()
    assert bit_equal(layer.weight, other.weight)
    torch.testing.assert_close(layer(x), other(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "merged_fifo", "embedding", "conv1d"])
@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_inplace_adapter_change_while_merged(kind, dt):
    layer = _make(kind, dt)
    w0 = layer.weight.detach().clone()
    layer.eval()
    with torch.no_grad():
        layer.lora_A.mul_(3.0).add_(1.0)
        layer.lora_B.normal_()
    layer.train()
    assert bit_equal(layer.weight, w0)


def test_merge_without_adapter_is_noop():
    for layer in (L.Linear(4, 4, r=0), L.MergedLinear(4, 4, r=2, enable_lora=[False, False])):
        w0 = layer.weight.detach().clone()
        layer.merge(safe_merge=True)
        layer.eval()
        assert bit_equal(layer.weight, w0)


def test_reset_parameters_while_merged():
    layer = _make("linear").eval()
    assert layer.merged
    layer.reset_parameters()
    w_fresh = layer.weight.detach().clone()
    assert not layer.merged  # the new weight carries no delta
    layer.train()
    assert bit_equal(layer.weight, w_fresh)
    layer.eval()  # B is zero again after the reset: merging changes nothing
    assert bit_equal(layer.weight, w_fresh)


@pytest.mark.parametrize("kind", ["linear", "merged_gqa", "embedding", "conv2d"])
def test_fp32_adapters_on_bf16_base_cycles(kind):
    torch.manual_seed(0)
    layer = FACTORIES[kind](torch.bfloat16, lora_dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = _input(kind, torch.bfloat16)
    w0 = layer.weight.detach().clone()
    y = layer.train()(x).detach()
    for _ in range(100):
        layer.eval()
        layer.train()
    assert bit_equal(layer.weight, w0)
    layer.eval()
    ym = layer(x)
    assert ym.dtype == torch.bfloat16
    assert float((ym.detach().float() - y.float()).norm() / y.float().norm()) < 2e-2


def test_embedding_with_max_norm_refuses_to_merge():
    # nn.Embedding renormalises looked-up weight rows in place; a merged weight
    # would be changed irreversibly, so such a layer never merges.
    emb = L.Embedding(10, 4, r=2, max_norm=1.0)
    nn.init.normal_(emb.lora_A)
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="max_norm"):
        emb.merge()
    assert not emb.merged and torch.equal(emb.weight, before)
    emb.eval()  # eval() keeps it unmerged instead of raising
    assert not emb.merged
