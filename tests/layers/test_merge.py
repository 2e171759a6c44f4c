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
    torch.manual_seed(0)  # 64 inputs: bitsandbytes' CPU kernels misread 4-bit rows that are not whole blocks
    plain = nn.Linear(64, 8)
    if kind == "nf4":
        q = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(64, 8, has_fp16_weights=False)
    q.load_state_dict(plain.state_dict())
    layer = L.Linear.from_module(q.to("cpu"), r=2, lora_alpha=2)
    src = L.Linear(64, 8, r=2, lora_alpha=2)
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


# ------------------------------------------------- an eval-mode state dict whose tensors change afterwards
MARK_KINDS = {  # one layer of each kind, fed by the same token ids through an embedding
    "linear": lambda dt: L.Linear(8, 12, r=2, lora_alpha=4, dtype=dt),
    "merged": lambda dt: L.MergedLinear(8, 12, r=2, enable_lora=[True, False, True], dtype=dt),
    "embedding": lambda dt: L.Embedding(10, 8, r=2, lora_alpha=4, dtype=dt),
    "dora": lambda dt: L.Linear(8, 12, r=2, lora_alpha=4, use_dora=True, dtype=dt),
}


def _mark_model(kind, dt, seed=0):
    torch.manual_seed(seed)
    first = MARK_KINDS["embedding"](dt) if kind == "embedding" else nn.Embedding(10, 8, dtype=dt)
    model = nn.Sequential(first, MARK_KINDS[kind](dt)) if kind != "embedding" else nn.Sequential(first)
    L.mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for m in model:
            if isinstance(m, L.LoRALayer):  # as if trained (an Embedding's zero factor is lora_A)
                m.lora_A.normal_()
                m.lora_B.normal_()
    return model


def _steps(model, n=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(n):
        model(IDX).float().square().mean().backward()
        opt.step()
        opt.zero_grad()


def _state(model):
    return [p.detach().clone() for p in model.state_dict(keep_vars=True).values()]


def _lora(model):
    return [m for m in model if isinstance(m, L.LoRALayer)]


@pytest.mark.parametrize("kind", list(MARK_KINDS))
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("load_in", ["train", "eval"])
def test_best_state_dict_kept_in_memory_across_training_loads_the_model_as_it_is(kind, dt, load_in):
    # best = model.state_dict() while validating, training goes on, later model.load_state_dict(best).
    model = _mark_model(kind, dt)
    bases = [m.weight.detach().clone() for m in _lora(model)]
    best = model.eval().state_dict()
    model.train()
    _steps(model)
    model.train(load_in == "train")  # eval(): merged again, with the adapter trained since
    before = _state(model)
    assert torch.equal(best[f"{len(model) - 1}.lora_B"], _lora(model)[-1].lora_B)  # torch's: the live tensors
    model.load_state_dict(best)
    # The state dict holds the model's own tensors, so loading it changes nothing (as in torch and loralib).
    assert all(bit_equal(a, b) for a, b in zip(_state(model), before))
    model.train()
    assert all(bit_equal(m.weight, base) for m, base in zip(_lora(model), bases))
    # Into another model, the weight is recognised as the base under the mark.
    if load_in == "train":
        fresh = _mark_model(kind, dt, seed=1).train()
        fresh.load_state_dict(best)
        assert all(bit_equal(a, b) for a, b in zip(_state(fresh), before))


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
def test_weight_fingerprint_is_exact_up_to_summation_order_and_sees_a_small_merge(dt):
    import math

    from lora_layers.merging import same_sums, weight_sums

    torch.manual_seed(0)
    W = torch.randn(1500, 1000).to(dt)  # more than one chunk
    values = W.double().flatten().tolist()
    exact = (math.fsum(values), math.fsum(v * v for v in values))  # correctly rounded reference
    got = weight_sums(W)
    assert same_sums(got, exact, W.numel()) and same_sums(weight_sums(W.flip(0, 1)), exact, W.numel())
    assert abs(got[1] - exact[1]) <= 1e-13 * exact[1]
    # A rank-2 update of about 1e-3 of |W|, rounded into W: most bf16 elements do not even move.
    delta = 1e-3 * torch.randn(1500, 2) @ torch.randn(2, 1000) / 2 ** 0.5
    merged = (W.float() + delta).to(dt)
    assert 0 < (merged != W).float().mean() < (0.5 if dt == torch.bfloat16 else 1.0)
    assert not same_sums(weight_sums(merged), got, W.numel())
    nan = W.clone()
    nan[3, 4] = float("nan")
    assert same_sums(weight_sums(nan), weight_sums(nan.clone()), W.numel()) and not same_sums(
        weight_sums(nan), got, W.numel())


@pytest.mark.parametrize("kind", list(MARK_KINDS))
def test_eval_model_loading_its_own_state_dict_is_unchanged(kind):
    model = _mark_model(kind, torch.float32)
    bases = [m.weight.detach().clone() for m in _lora(model)]
    before = _state(model.eval())
    model.load_state_dict(model.state_dict())  # the weight is the layer's own: its merge state says what it is
    assert all(bit_equal(a, b) for a, b in zip(_state(model), before))
    assert all(bit_equal(m.weight, base) for m, base in zip(_lora(model.train()), bases))


@pytest.mark.parametrize("kind", list(MARK_KINDS))
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("load_in", ["train", "eval"])
def test_eval_state_dict_saved_after_train_reloads_as_the_base(tmp_path, kind, dt, load_in):
    # sd = model.eval().state_dict(); model.train(); torch.save(sd, f): the file holds the base weight.
    model = _mark_model(kind, dt)
    bases = [m.weight.detach().clone() for m in _lora(model)]
    sd = model.eval().state_dict()
    y_eval = model(IDX)
    model.train()
    torch.save(sd, tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert loaded._metadata[str(len(model) - 1)]["lora_merged"]  # still marked merged
    fresh = _mark_model(kind, dt, seed=1).train(load_in == "train")
    fresh.load_state_dict(loaded)
    torch.testing.assert_close(fresh.eval()(IDX), y_eval, rtol=0, atol=0 if load_in == "eval" else TOL[dt])
    fresh.train()
    assert all(bit_equal(m.weight, base) for m, base in zip(_lora(fresh), bases))
    assert all(bit_equal(a, b) for a, b in zip(_state(fresh), _state(model)))


@pytest.mark.parametrize("kind", ["linear", "dora"])
def test_a_model_loaded_merged_then_saved_in_eval_and_unmerged_reloads_as_its_base(kind):
    # Kept merged as loaded (no residual): the base that train() gives back is the one to recognise.
    src = _mark_model(kind, torch.float32)
    model = _mark_model(kind, torch.float32, seed=1).eval()
    model.load_state_dict(src.eval().state_dict())
    sd = model.state_dict()
    assert "lora_base_check" in sd._metadata["1"]
    model.train()
    fresh = _mark_model(kind, torch.float32, seed=2)
    fresh.load_state_dict(sd)
    assert all(bit_equal(a, b) for a, b in zip(_state(fresh), _state(model)))


@pytest.mark.parametrize("kind", ["linear", "dora"])
def test_eval_state_dict_changed_otherwise_is_refused_and_the_layer_left_unchanged(tmp_path, kind):
    model = _mark_model(kind, torch.float32)
    sd = model.eval().state_dict()
    model.train()
    _steps(model)
    model.eval()  # sd's weight: merged with the adapter trained since, its check that of the first merge
    y_eval = model(IDX)
    torch.save(sd, tmp_path / "sd.pt")
    fresh = _mark_model(kind, torch.float32, seed=1)
    before = _state(fresh[1])
    with pytest.raises(RuntimeError, match=r"1.weight is marked merged .* neither the merged weight .* "
                                           r"delete sd._metadata\['1'\]\['lora_merged_check'\]"):
        fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert all(bit_equal(a, b) for a, b in zip(_state(fresh[1]), before)) and not fresh[1].merged
    # The caller who knows what the weight holds says so: merged with the adapter saved next to it.
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    del loaded._metadata["1"]["lora_merged_check"]
    if kind == "dora":  # the factors saved are those of the first merge: the new row scale is not known
        del loaded._metadata["1"]["lora_merge_factors"]
        return
    fresh.load_state_dict(loaded)
    torch.testing.assert_close(fresh.eval()(IDX), y_eval, rtol=0, atol=1e-6)


def test_eval_state_dict_cast_in_place_is_refused_unless_the_cast_is_exact():
    model = _mark_model("linear", torch.bfloat16)
    base = model[1].weight.detach().clone()
    sd = model.eval().state_dict()
    for key in list(sd):
        sd[key] = sd[key].float()  # bf16 -> fp32 is exact: still the merged weight, the merge taken out
    fresh = _mark_model("linear", torch.bfloat16, seed=1)
    fresh.load_state_dict(sd)
    assert _close_to_base(fresh[1].weight.detach(), base, model[1].weight.detach())
    assert not torch.equal(fresh[1].weight, model[1].weight)
    sd = _mark_model("linear", torch.float32).eval().state_dict()
    sd["1.weight"] = sd["1.weight"].bfloat16()  # rounds: neither the merged weight nor the base
    with pytest.raises(RuntimeError, match="1.weight is marked merged .* neither"):
        _mark_model("linear", torch.bfloat16, seed=1).load_state_dict(sd)


def test_merged_state_dict_carries_no_merged_mark():
    # A plain model's state dict: loaded into a LoRA model, its weights are base weights.
    sd = L.merged_state_dict(_mark_model("linear", torch.float32).eval())
    assert not [k for entry in sd._metadata.values() for k in entry if k.startswith("lora_")]


def test_malformed_merged_check_is_refused_and_the_layer_left_unchanged():
    sd = _mark_model("linear", torch.float32).eval().state_dict()
    sd._metadata["1"]["lora_base_check"] = ("1", 2.0)
    fresh = _mark_model("linear", torch.float32, seed=1)
    before = _state(fresh[1])
    with pytest.raises(RuntimeError, match=r"metadata 'lora_base_check' of 1.weight must be two numbers .*'1'"):
        fresh.load_state_dict(sd)
    assert all(bit_equal(a, b) for a, b in zip(_state(fresh[1]), before))


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


def test_fingerprint_of_an_fsdp2_sharded_weight_is_the_full_weights_and_eval_serves_unmerged(process_group):
    """Under fully_shard the weight is a DTensor outside forward: its fingerprint is taken through the mesh,
    and eval() does not merge into the shard (docs/distributed.md): it serves the adapter unmerged, with
    the same outputs, and train() after it changes nothing. The 2-process checks are
    tests/distributed/test_fsdp2.py's."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lora_layers.merging import weight_sums

    torch.manual_seed(0)
    model = nn.Sequential(L.Linear(12, 4, r=2))
    nn.init.normal_(model[0].lora_B)
    x = torch.randn(3, 12)
    expected = model(x).detach()
    full_sums = weight_sums(model[0].weight.detach().double())
    fully_shard(model)
    assert isinstance(model[0].weight, DTensor)
    assert weight_sums(model[0].weight) == pytest.approx(full_sums, rel=1e-12)
    before = model[0].weight.full_tensor().clone()
    model.eval()
    assert not model[0].merged
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    # The root module keeps its parameters gathered after its forward (plain tensors until its backward):
    # the layer still refuses to merge, since a merge into that copy would be lost at the next reshard.
    assert not isinstance(model[0].weight, DTensor)
    with pytest.raises(ValueError, match="sharded"):
        model[0].merge()
    model.eval()
    assert not model[0].merged
    model.train()
    model.reshard()
    assert torch.equal(model[0].weight.full_tensor(), before)


@pytest.mark.parametrize("how", ["load_state_dict", "load_lora", "import_peft"])
def test_a_merged_layer_whose_weight_was_reassigned_loads_and_stays_unmerged(tmp_path, how):
    """A weight Parameter assigned to a merged layer may be shared, so the layer must not merge again;
    a load re-merging it raised half-way through the load."""
    torch.manual_seed(0)
    source = nn.Sequential(L.Linear(8, 6, r=2, lora_alpha=4))
    nn.init.normal_(source[0].lora_B)
    model = nn.Sequential(L.Linear(8, 6, r=2, lora_alpha=4))
    model[0].weight.data.copy_(source[0].weight.data)
    model[0].bias.data.copy_(source[0].bias.data)
    model.eval()
    assert model[0].merged
    model[0].weight = nn.Parameter(model[0].weight.detach().clone(), requires_grad=False)
    if how == "load_state_dict":
        model.load_state_dict(L.lora_state_dict(source), strict=False)
    elif how == "load_lora":
        L.save_lora(source, tmp_path / "a.safetensors")
        L.load_lora(model, tmp_path / "a.safetensors")
    else:
        L.export_peft(source, tmp_path / "peft")
        L.import_peft(model, tmp_path / "peft")
    assert not model[0].merged
    torch.testing.assert_close(L.lora_state_dict(model), L.lora_state_dict(source), rtol=0, atol=0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), source.eval()(x), rtol=0, atol=1e-6)


def test_under_fully_shard_a_write_into_parameters_the_root_holds_gathered_is_refused(process_group):
    """Between a root module's forward and its backward, fully_shard holds its parameters gathered (plain
    tensors it frees at the next reshard): unmerging a layer merged before sharding, or reset_magnitude,
    would write into that copy and leave the shard as it was. Both refuse, change nothing, and work after
    reshard(); the unmerge then gives the base back bit for bit."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(L.Linear(12, 6, r=2, use_dora=True))
    nn.init.normal_(model[0].lora_B)
    base = model[0].weight.detach().clone()
    model.eval()  # merged before sharding
    fully_shard(model)
    x = torch.randn(3, 12)
    model(x)  # the root keeps its parameters gathered now
    with pytest.raises(RuntimeError, match="reshard"):
        model.train()
    assert not model[0].training and model[0].merged  # the layer is left as it was
    with pytest.raises(RuntimeError, match="reshard"):
        model[0].reset_magnitude()
    model.reshard()
    model.train()
    assert not model[0].merged
    assert torch.equal(model[0].weight.full_tensor(), base)
