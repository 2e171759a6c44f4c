"""lora_layers.mixed_batch: one adapter per batch row through the layers and a model (issue #23).

The reference for every output is the same model run row by row with ``set_adapter(model, name)``
(the single-adapter path, which other tests check against loralib, PEFT and float64 formulas)."""
import copy

import pytest
import torch
import torch.nn as nn

import lora_layers as ll
from conftest import make_tiny_phi3

NAMES = ["b", None, "default", "c", "b"]
TOL = 1e-6


def _randomize(model, seed=1, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _with_adapters(model, dora=False, p=0.0, seed=1, std=0.3):
    ll.add_adapter(model, "b", r=3, lora_alpha=5, lora_dropout=p, use_dora=dora)
    ll.add_adapter(model, "c", r=1, lora_alpha=2, lora_dropout=p, use_dora=dora, use_rslora=True)
    _randomize(model, seed, std)
    return model


def build(kind, p=0.0):
    """``(model, input)`` of a layer kind, with adapters default (r 2), b (r 3) and c (r 1)."""
    torch.manual_seed(0)
    n = len(NAMES)
    dora = kind == "dora"
    if kind in ("lora", "dora"):
        model = nn.Sequential(ll.Linear(6, 10, r=2, lora_alpha=4, lora_dropout=p, use_dora=dora), nn.Tanh(),
                              ll.Linear(10, 4, r=2, lora_alpha=4, lora_dropout=p, use_dora=dora))
        x = torch.randn(n, 3, 6)
    elif kind == "merged":  # GQA-like unequal q, k, v with k not adapted
        model = nn.Sequential(ll.MergedLinear(6, 11, r=2, lora_alpha=4, lora_dropout=p, enable_lora=[True, False, True],
                                              split_sizes=[6, 3, 2]), nn.Tanh(), ll.Linear(11, 4, r=2, lora_alpha=4))
        x = torch.randn(n, 3, 6)
    elif kind == "embedding":
        model = nn.Sequential(ll.Embedding(20, 6, r=2, lora_alpha=4), ll.Linear(6, 4, r=2, lora_alpha=4))
        x = torch.randint(0, 20, (n, 3))
    elif kind in ("conv1d", "conv2d", "conv3d"):
        d = int(kind[-2])
        cls = {1: ll.Conv1d, 2: ll.Conv2d, 3: ll.Conv3d}[d]
        model = nn.Sequential(cls(3, 4, 3, r=2, lora_alpha=4, lora_dropout=p, padding=1), nn.Tanh())
        x = torch.randn(n, 3, *([4] * d))
    else:
        raise AssertionError(kind)
    return _with_adapters(model, dora=dora, p=p), x


def per_row_reference(model, x, names):
    """Each row alone through a copy of ``model`` with that row's adapter active."""
    ref = copy.deepcopy(model)
    outs = []
    for i, name in enumerate(names):
        ll.set_adapter(ref, name)
        outs.append(ref(x[i:i + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize("kind", ["lora", "dora", "merged", "embedding", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_each_row_gets_its_own_adapter(kind, mode):
    model, x = build(kind)
    getattr(model, mode)()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ll.mixed_batch(model, NAMES):
        y = model(x)
    torch.testing.assert_close(y, per_row_reference(model, x, NAMES), atol=TOL, rtol=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # eval() merged again, bit for bit


def test_gradients_equal_the_per_row_runs():
    model, x = build("merged")
    ref = copy.deepcopy(model)
    with ll.mixed_batch(model, NAMES):
        model(x).square().sum().backward()
    for i, name in enumerate(NAMES):  # the per-row losses are independent: their gradients add up
        ll.set_adapter(ref, name)
        ref(x[i:i + 1]).square().sum().backward()
    ll.set_adapter(ref, "default")
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=TOL, rtol=0, msg=n)


def test_unused_adapters_get_no_gradient():
    model, x = build("lora")
    with ll.mixed_batch(model, ["b", None, "b", "b", None]):
        model(x).sum().backward()
    assert model[0].lora_A.grad is None and model[0].lora_adapters.c.lora_A.grad is None
    assert model[0].lora_adapters.b.lora_A.grad is not None


def test_a_layer_without_the_adapter_runs_its_base_on_those_rows():
    torch.manual_seed(0)
    model = nn.Sequential(ll.Linear(6, 8, r=2), nn.Tanh(), ll.Linear(8, 4, r=2))
    ll.add_adapter(model, "b", r=3, lora_alpha=5, targets=["2"])
    _randomize(model)
    x = torch.randn(3, 6)
    with ll.mixed_batch(model, ["b", "default", None]):
        y = model(x)
    torch.testing.assert_close(y, per_row_reference(model, x, ["b", "default", None]), atol=TOL, rtol=0)


def test_rows_of_the_base_alone_equal_the_base_model():
    model, x = build("lora")
    with ll.mixed_batch(model, [None] * len(NAMES)):
        y = model(x)
    ll.set_adapter(model, None)
    torch.testing.assert_close(y, model(x), atol=0, rtol=0)


def test_a_model_without_mixed_batch_or_add_adapter_is_bitwise_todays():
    torch.manual_seed(0)
    layer = ll.MergedLinear(6, 11, r=2, lora_alpha=4, lora_dropout=0.1, enable_lora=[True, False, True],
                            split_sizes=[6, 3, 2])
    torch.manual_seed(0)
    fresh = ll.MergedLinear(6, 11, r=2, lora_alpha=4, lora_dropout=0.1, enable_lora=[True, False, True],
                            split_sizes=[6, 3, 2])
    torch.manual_seed(1)
    with torch.no_grad():
        for lay in (layer, fresh):
            lay.lora_B.copy_(torch.randn(lay.lora_B.shape, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(2, 3, 6)
    other = nn.Sequential(ll.Linear(6, 4, r=2))
    with ll.mixed_batch(other, ["default", None]):  # another model's batch leaves this one alone
        other(x)
    for mode in ("train", "eval"):
        getattr(layer, mode)(), getattr(fresh, mode)()
        torch.manual_seed(2)
        y = layer(x)
        torch.manual_seed(2)
        assert torch.equal(y, fresh(x))
    assert list(layer.state_dict()) == list(fresh.state_dict()) and repr(layer) == repr(fresh)
    assert "_mixed_rows" not in layer.__dict__


def test_a_merged_model_is_unmerged_for_the_batch_and_merged_again():
    model, x = build("dora")
    model.eval()
    assert model[0].merged
    merged_weight = model[0].weight.detach().clone()
    with ll.mixed_batch(model, NAMES):
        assert not model[0].merged
        y = model(x)
        model.eval()  # eval() inside the batch merges nothing
        assert not model[0].merged
    assert model[0].merged and torch.equal(model[0].weight, merged_weight)
    unmerged = copy.deepcopy(model).train()
    with ll.mixed_batch(unmerged, NAMES):
        torch.testing.assert_close(y, unmerged(x), atol=TOL, rtol=0)


def test_a_plain_call_and_close():
    model, x = build("lora")
    batch = ll.mixed_batch(model, NAMES)
    assert batch.live
    y = model(x)
    batch.close()
    batch.close()  # idempotent
    assert not batch.live
    torch.testing.assert_close(y, per_row_reference(model, x, NAMES), atol=TOL, rtol=0)
    torch.testing.assert_close(model(x), per_row_reference(model, x, ["default"] * len(NAMES)), atol=TOL, rtol=0)
    assert "_mixed_rows" not in model[0].__dict__  # the ordinary forward dropped the rows


def test_the_batch_ends_however_the_body_ends():
    model, x = build("lora")
    with pytest.raises(ZeroDivisionError):
        with ll.mixed_batch(model, NAMES):
            1 / 0
    torch.testing.assert_close(model(x), per_row_reference(model, x, ["default"] * len(NAMES)), atol=TOL, rtol=0)


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.merged, m.active_adapter, m.__dict__.get("_mixed_rows")) for m in model if isinstance(m, ll.LoRALayer)])


def _same_state(model, state):
    tensors, flags = _state(model)
    assert tensors.keys() == state[0].keys() and all(torch.equal(tensors[k], state[0][k]) for k in tensors)
    assert flags == state[1]


@pytest.mark.parametrize("names, error, match", [
    (["b", "nobody"], KeyError, r"names\[1\] is 'nobody'.*\('default', 'b', 'c'\)"),
    ([], ValueError, "at least one batch row"),
    ("b", TypeError, "names must be a list"),
])
def test_bad_names_are_refused_before_any_change(names, error, match):
    model, _ = build("lora")
    model.eval()
    state = _state(model)
    with pytest.raises(error, match=match):
        ll.mixed_batch(model, names)
    _same_state(model, state)


def test_a_batch_size_that_does_not_match_is_refused_at_the_first_layer():
    model, x = build("lora")
    state = _state(model)
    with pytest.raises(ValueError, match=r"mixed_batch: 0 \(Linear\): 4 row adapters .* shape \(5, 3, 6\)"):
        with ll.mixed_batch(model, NAMES[:4]):
            model(x)
    model(x)  # an ordinary forward: the rows are gone
    _same_state(model, state)


def test_conv_input_without_the_rows_is_refused():
    model, x = build("conv2d")
    with pytest.raises(ValueError, match=r"batched input \(N, C, \*spatial\) with N = 5"):
        with ll.mixed_batch(model, NAMES):
            model(x[0])


def test_nested_batches_are_refused():
    model, x = build("lora")
    with ll.mixed_batch(model, NAMES):
        with pytest.raises(RuntimeError, match="already set on 0"):
            ll.mixed_batch(model, NAMES)
        model(x)


def test_layers_that_cannot_run_a_batch_are_refused():
    class Own(ll.Linear):
        def forward(self, x):
            return super().forward(x)

    model = nn.Sequential(Own(4, 4, r=2))
    with pytest.raises(ValueError, match="0 cannot run a mixed batch: its class Own has a forward of its own"):
        ll.mixed_batch(model, ["default"])
    conv = nn.Sequential(ll.Conv2d(2, 2, 3, r=1, layout="loralib"))
    with pytest.raises(ValueError, match="layout='loralib'"):
        ll.mixed_batch(conv, ["default"])
    with pytest.raises(ValueError, match="no LoRA layer"):
        ll.mixed_batch(nn.Linear(2, 2), [None])
    model, _ = build("lora")
    model[2].merged = True  # loralib-style code merged it by itself
    state = _state(model)
    with pytest.raises(ValueError, match="2 cannot run a mixed batch: it was merged by code of its own"):
        ll.mixed_batch(model, NAMES)
    _same_state(model, state)


def test_a_flattened_input_is_read_batch_major():
    model, x = build("lora")
    with ll.mixed_batch(model, NAMES):
        y = model(x.reshape(-1, x.shape[-1]))
    torch.testing.assert_close(y.view(len(NAMES), 3, -1), per_row_reference(model, x, NAMES), atol=TOL, rtol=0)


@pytest.mark.parametrize("lean", [False, True])
def test_phi3_forward_with_the_hf_signature(lean):
    model = make_tiny_phi3(gqa=True, hidden_size=32, intermediate_size=48)
    ll.phi3.apply_lora(model, r=2, lora_alpha=4, lora_dropout=0.0, lean=lean)
    _with_adapters(model)
    model.train()
    ids = torch.randint(3, 128, (len(NAMES), 5))
    with ll.mixed_batch(model, NAMES):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), return_logits=True) if lean else \
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    ref = copy.deepcopy(model)
    rows = []
    for i, name in enumerate(NAMES):
        ll.set_adapter(ref, name)
        kwargs = dict(return_logits=True) if lean else {}
        rows.append(ref(input_ids=ids[i:i + 1], **kwargs).logits)
    torch.testing.assert_close(out.logits, torch.cat(rows), atol=1e-5, rtol=0)



def test_quantized_base_phi3():
    pytest.importorskip("torchao")
    model = make_tiny_phi3(gqa=True, hidden_size=64, intermediate_size=128)  # sizes NF4 can pack
    ll.quantize_base(model)
    ll.phi3.apply_lora(model, r=2, lora_alpha=4, lora_dropout=0.0)
    _with_adapters(model, std=0.05)
    assert model.model.layers[0].self_attn.qkv_proj.quantized is not None
    model.train()
    ids = torch.randint(3, 128, (len(NAMES), 5))
    with ll.mixed_batch(model, NAMES):
        logits = model(input_ids=ids).logits
    logits.sum().backward()
    assert model.model.layers[0].mlp.down_proj.lora_adapters.c.lora_B.grad is not None
    rows = []
    for i, name in enumerate(NAMES):
        ll.set_adapter(model, name)
        rows.append(model(input_ids=ids[i:i + 1]).logits)
    torch.testing.assert_close(logits, torch.cat(rows), atol=1e-5, rtol=0)
    ll.set_adapter(model, None)
    assert (logits - model(input_ids=ids).logits).abs().amax(dim=(1, 2)).gt(1e-3).tolist() == [
        name is not None for name in NAMES]  # the adapters matter: the comparison is not of the base alone


def test_the_first_ordinary_forward_drops_the_rows_of_every_layer_of_the_batch():
    model, x = build("lora")
    with ll.mixed_batch(model, NAMES):
        model(x)
    assert "_mixed_rows" in model[2].__dict__  # kept for recomputes in a backward
    model[0](x)
    assert "_mixed_rows" not in model[0].__dict__ and "_mixed_rows" not in model[2].__dict__


def test_a_copy_made_during_a_batch_runs_its_active_adapter():
    model, x = build("lora")
    with ll.mixed_batch(model, NAMES):
        copied = copy.deepcopy(model)
    torch.testing.assert_close(copied(x), per_row_reference(model, x, ["default"] * len(NAMES)), atol=TOL, rtol=0)


def test_phi3_generate_gives_each_row_its_adapters_tokens():
    model = make_tiny_phi3(gqa=True, hidden_size=32, intermediate_size=48)
    ll.phi3.apply_lora(model, r=2, lora_alpha=4, lora_dropout=0.0)
    _with_adapters(model, std=0.5)
    model.eval()
    ids = torch.randint(3, 128, (len(NAMES), 4))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with ll.mixed_batch(model, NAMES):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    rows = []
    for i, name in enumerate(NAMES):
        ll.set_adapter(model, name)
        rows.append(model.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kwargs))
    assert torch.equal(out, torch.cat(rows))
    assert len({tuple(r[0, 4:].tolist()) for r in rows}) > 1  # the adapters lead to different tokens


def test_layers_skip_the_range_check_that_costs_a_host_sync_and_direct_calls_keep_it(monkeypatch):
    # The layers' per-token indices come from mixed_batch's names, in range by construction: checking them
    # again on every layer forward would be one aminmax (a host sync on a GPU) per projection.
    from lora_layers.core import mixed as core_mixed

    torch.manual_seed(0)
    model = nn.Sequential(ll.Linear(8, 6, r=2, lora_alpha=4),
                          ll.MergedLinear(6, 9, r=2, enable_lora=[True, False, True]))
    _randomize(model)
    ll.add_adapter(model, "b", r=3, lora_alpha=2)
    _randomize(model, seed=2)
    x = torch.randn(3, 5, 8)
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    with ll.mixed_batch(model, ["b", None, "default"]):
        mixed = model(x)
    assert calls == []
    for i, name in enumerate(["b", None, "default"]):
        ll.set_adapter(model, name)
        torch.testing.assert_close(mixed[i:i + 1], model(x[i:i + 1]), rtol=0, atol=1e-6)  # each row alone
    layer = model[0]
    with pytest.raises(ValueError, match=r"token_adapter values must be in \[-1, 1\)"):
        core_mixed.lora_linear_mixed(x, layer.weight, layer.bias, [core_mixed.MixedAdapter(
            layer.lora_A, layer.lora_B, layer.scaling, 0.0)], torch.tensor([0, 1, -1]).repeat_interleave(5))
    assert calls  # the direct call checked its indices
