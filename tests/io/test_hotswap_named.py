"""hotswap into a named adapter (issue #23): a compiled model whose active adapter is a named one runs
the swapped-in adapter without a recompile, equal to an eager model loaded with it; the default
adapter and the other named ones are left alone; a refused swap changes nothing."""
import pytest
import torch

import lora_layers as L
from lora_layers.checkpoint import CheckpointError
from lora_layers.layers.base import HOTSWAP_SCALE

from _adapter_net import randomize_adapters
from test_hotswap import _Counter, _assert_same, _base, _full_snapshot, _net


def _multi(base, seed, r=8, alpha=16.0, rslora=False):
    """``_net`` (default adapter r=6) with named adapters ``b`` (rank ``r``) and ``c``, all random."""
    net = _net(base, r=6, alpha=5, seed=seed)
    L.add_adapter(net, "b", r=r, lora_alpha=alpha, use_rslora=rslora)
    L.add_adapter(net, "c", r=2, lora_alpha=3.0)
    randomize_adapters(net, seed + 50, contains=".lora_adapters.")
    return net


def _source(tmp_path, net, kind):
    """Adapter ``b`` of ``net`` alone, as a save_lora file, a PEFT folder or a lora_state_dict."""
    if kind == "file":
        L.save_lora(net, tmp_path / "b.safetensors", adapter="b")
        return tmp_path / "b.safetensors"
    if kind == "peft":
        L.export_peft(net, tmp_path / "b", adapter="b")
        return tmp_path / "b"
    return L.lora_state_dict(net, adapter="b")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["file", "peft", "state_dict"])
def test_a_compiled_model_swaps_a_named_adapter_without_recompiling(tmp_path, kind, mode):
    torch._dynamo.reset()
    base = _base()
    model = _multi(base, seed=1)
    # A state dict records no alpha: the incoming adapter keeps b's alpha (16) at its own rank 4.
    alpha = 16.0 if kind == "state_dict" else 12.0
    incoming = _multi(base, seed=2, r=4, alpha=alpha, rslora=kind != "state_dict")
    L.set_adapter(model, "b")
    getattr(model, mode)()
    L.prepare_for_hotswap(model)
    counter = _Counter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(5, 16)
    others = {n: p.detach().clone() for n, p in L.named_lora_parameters(model) if ".lora_adapters.b." not in n}
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
        graphs = counter.graphs
        assert L.hotswap(compiled, _source(tmp_path, incoming, kind), adapter="b") == ["0", "2"]
        after = compiled(x)
    assert counter.graphs == graphs, "the swap recompiled"
    L.set_adapter(incoming, "b")
    getattr(incoming, mode)()
    with torch.no_grad():
        torch.testing.assert_close(after, incoming(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), incoming(x), rtol=1e-5, atol=1e-5)  # eager agrees too
    assert all(torch.equal(p, others[n]) for n, p in L.named_lora_parameters(model) if n in others)
    for _, layer in L.lora_modules(model):
        b = layer.lora_adapters.b
        assert b.r == 8 and b.scaling == incoming[0].adapter("b").scaling
        assert getattr(b, HOTSWAP_SCALE).view(torch.float64).item() == b.scaling
        assert layer.scaling == 5 / 6  # the default adapter's scale is its own


def test_swapping_the_inactive_named_adapter_then_activating_it(tmp_path):
    base = _base()
    model, incoming = _multi(base, seed=1), _multi(base, seed=2, r=3, alpha=7.0)
    L.hotswap(model, _source(tmp_path, incoming, "peft"), adapter="b")
    L.set_adapter(model, "b")
    L.set_adapter(incoming, "b")
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), incoming(x), rtol=1e-6, atol=1e-6)


def test_refused_named_swaps_change_nothing(tmp_path):
    base = _base()
    model = _multi(base, seed=1)
    L.set_adapter(model, "b")
    model.eval()
    L.prepare_for_hotswap(model)
    before = _full_snapshot(model)
    big = _multi(base, seed=2, r=9)  # a larger rank than b's 8
    with pytest.raises(CheckpointError, match="rank 9, larger than the layer's r=8"):
        L.hotswap(model, _source(tmp_path, big, "file"), adapter="b")
    only_first = _multi(base, seed=2)
    L.delete_adapter(only_first, "b")
    L.add_adapter(only_first, "b", r=4, lora_alpha=4.0, targets=["0"])  # b on layer 0 only
    with pytest.raises(CheckpointError, match=r"no adapter for these LoRA layers of the model: \['2'\]"):
        L.hotswap(model, _source(tmp_path, only_first, "state_dict"), adapter="b")
    with pytest.raises(KeyError, match="no adapter 'zed'"):
        L.hotswap(model, _source(tmp_path, big, "state_dict"), adapter="zed")
    _assert_same(model, before)


@pytest.mark.parametrize("kind", ["file", "peft", "state_dict"])
def test_a_source_covering_layers_the_named_adapter_is_not_on_is_refused_by_name(tmp_path, kind):
    """Found in review: with ``b`` on layer 0 only, a source with adapters for layers 0 and 2 escaped as a bare
    KeyError('2') (or 'Linear has no adapter b') instead of the CheckpointError naming the extra module."""
    base = _base()
    model = _multi(base, seed=1)
    L.delete_adapter(model, "b")
    L.add_adapter(model, "b", r=8, lora_alpha=16.0, targets=["0"])
    L.set_adapter(model, "b")
    model.eval()
    before = _full_snapshot(model)
    with pytest.raises(CheckpointError, match=r"without an adapter 'b'.*\['2'\]"):
        L.hotswap(model, _source(tmp_path, _multi(base, seed=2, r=4), kind), adapter="b")
    _assert_same(model, before)
