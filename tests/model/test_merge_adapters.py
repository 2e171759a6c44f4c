"""merge_adapters (issue #23): "cat" gives ΔW = Σ w_i s_i B_i A_i exactly, "linear" PEFT's blend of the
factors, both checked per layer against float64 formulas on every layer kind; bad input changes nothing."""
import math

import pytest
import torch

import lora_layers as L
from _adapter_net import IDS, assert_unchanged, make, snapshot
from _naive_lora import delta_merged

F64 = torch.float64


def _net():
    net = make(seed=0)
    L.add_adapter(net, "b", r=3, lora_alpha=5.0)
    L.add_adapter(net, "c", r=2, lora_alpha=3.0, use_rslora=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in L.lora_parameters(net):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def delta(layer, A, B, r):
    """ΔW / s in the weight's layout, float64, from the factors (independent of the library's code)."""
    A, B = A.detach().to(F64), B.detach().to(F64)
    if isinstance(layer, L.MergedLinear):
        return delta_merged(A, B, layer.split_sizes, layer.enable_lora, r)
    if isinstance(layer, L.Embedding):
        return (B @ A).t()
    return (B @ A).view(layer.weight.shape)


def scaled_delta(layer, name):
    v = layer.adapter(name)
    return v.scaling * delta(layer, v.lora_A, v.lora_B, v.r)


def test_cat_is_the_weighted_sum_of_the_deltas_in_every_layer():
    net = _net()
    weights = {"default": 0.7, "b": -0.3, "c": 0.5}
    L.merge_adapters(net, weights, name="blend")  # ranks 2, 3, 2 differ: "auto" concatenates
    kinds = set()
    for name, layer in L.lora_modules(net):
        blend = layer.adapter("blend")
        assert (blend.r, blend.lora_alpha, blend.scaling, blend.use_rslora) == (7, 7, 1.0, False), name
        expected = sum(w * scaled_delta(layer, n) for n, w in weights.items())
        torch.testing.assert_close(scaled_delta(layer, "blend"), expected, rtol=1e-5, atol=1e-6)
        kinds.add(type(layer))
    assert kinds == {L.Embedding, L.MergedLinear, L.Linear, L.Conv2d}
    assert net.qkv.active_adapter == "default"  # added, not made active
    L.set_adapter(net, "blend")
    net(IDS).sum().backward()  # a trainable adapter like any other
    assert net.out.lora_adapters.blend.lora_A.grad is not None


def test_linear_blends_the_factors_as_peft_does():
    net = _net()
    weights = {"default": 0.7, "c": -0.4}  # both rank 2: "auto" blends linearly
    L.merge_adapters(net, weights, name="blend")
    for name, layer in L.lora_modules(net):
        views = [(w, layer.adapter(n)) for n, w in weights.items()]
        A = sum(math.copysign(math.sqrt(abs(w * v.scaling)), w) * v.lora_A.to(F64) for w, v in views)
        B = sum(math.sqrt(abs(w * v.scaling)) * v.lora_B.to(F64) for w, v in views)
        blend = layer.adapter("blend")
        assert (blend.r, blend.scaling) == (2, 1.0)
        torch.testing.assert_close(blend.lora_A.to(F64), A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(blend.lora_B.to(F64), B, rtol=1e-6, atol=1e-7)
    # One adapter: the blend is that adapter times its weight, whichever combination.
    for combination in ("linear", "cat"):
        L.merge_adapters(net, {"b": -0.6}, name=f"only_{combination}", combination=combination)
        for _, layer in L.lora_modules(net):
            torch.testing.assert_close(scaled_delta(layer, f"only_{combination}"), -0.6 * scaled_delta(layer, "b"),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights, name, kw, exc, text", [
    ({"nope": 1.0}, "x", {}, KeyError, "no adapter 'nope'"),
    ({}, "x", {}, ValueError, "non-empty dict"),
    ({"b": 1.0}, "c", {}, ValueError, "adapter 'c' already"),
    ({"b": 1.0}, "default", {}, ValueError, "adapter 'default' already"),
    ({"b": float("nan")}, "x", {}, ValueError, "finite real"),
    ({"b": float("inf"), "c": 1.0}, "x", {}, ValueError, "finite real"),
    ({"b": True}, "x", {}, ValueError, "finite real"),
    ({"b": 1.0}, "not valid", {}, ValueError, "identifier"),
    ({"b": 1.0, "c": 1.0}, "x", {"combination": "linear"}, ValueError, "one rank"),
    ({"b": 1.0}, "x", {"combination": "svd"}, ValueError, "combination must be"),
])
def test_bad_input_changes_nothing(weights, name, kw, exc, text):
    net = _net()
    before, names = snapshot(net), L.adapter_names(net)
    with pytest.raises(exc, match=text):
        L.merge_adapters(net, weights, name=name, **kw)
    assert_unchanged(net, before)
    assert L.adapter_names(net) == names


def test_dora_adapters_are_refused():
    net = make(seed=0)
    del net.emb, net.conv  # DoRA is on Linear layers only
    L.add_adapter(net, "d", r=2, lora_alpha=4.0, use_dora=True)
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"qkv.*\['d'\] are DoRA"):
        L.merge_adapters(net, {"default": 0.5, "d": 0.5}, name="x")
    assert_unchanged(net, before)
    assert L.adapter_names(net) == ("default", "d")
