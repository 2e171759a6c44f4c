"""hotswap: another adapter copied into a model's adapter tensors in place (issue #23, hot swap).

The references: a compiled model compiles no new graph after a swap (a counting dynamo backend),
and gives the outputs of an eager model built at the incoming adapter's own rank and alpha and
loaded with ``load_lora``; a zero-padded layer gives the output of the layer of the smaller rank
and of the float64 formula; a refused swap leaves every tensor, attribute and buffer as it was.
"""
import copy

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers import phi3
from lora_layers.checkpoint import CheckpointError
from lora_layers.layers.base import HOTSWAP_SCALE

from conftest import make_tiny_phi3
from _model_checks import assert_unchanged, logits, randomize_adapters, snapshot

SPLITS, ENABLE = [16, 8, 8], [True, False, True]  # a GQA qkv with q and v adapted


class _Counter:
    """A dynamo backend that counts the graphs it compiles and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 32))


def _net(base, r, alpha, *, seed, dora=False, rslora=False):
    """``base`` with a Linear and a GQA MergedLinear adapter of rank ``r``, random adapters from ``seed``."""
    net = copy.deepcopy(base)
    kw = dict(r=r, lora_alpha=alpha, use_dora=dora, use_rslora=rslora)
    net[0] = L.Linear.from_module(net[0], **kw)
    net[2] = L.MergedLinear.from_module(net[2], enable_lora=ENABLE, split_sizes=SPLITS, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in L.named_lora_parameters(net):
            value = torch.randn(p.shape, generator=gen) * 0.3
            p.copy_(value.abs() + 1 if name.endswith("magnitude") else value)
    L.mark_only_lora_as_trainable(net)
    return net


def _full_snapshot(model):
    state = snapshot(model)
    state["settings"] = [(m.r, m.lora_alpha, m.scaling, m.merged) for _, m in L.lora_modules(model)]
    state["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
    return state


def _assert_same(model, before):
    assert_unchanged(model, before)
    after = _full_snapshot(model)
    assert after["settings"] == before["settings"]
    assert after["buffers"].keys() == before["buffers"].keys()
    assert all(torch.equal(after["buffers"][k], v) for k, v in before["buffers"].items())


def _source(tmp_path, net, kind):
    """``net``'s adapter as a save_lora file, a PEFT folder or a lora_state_dict."""
    if kind == "file":
        L.save_lora(net, tmp_path / "a.safetensors")
        return tmp_path / "a.safetensors"
    if kind == "peft":
        L.export_peft(net, tmp_path / "peft")
        return tmp_path / "peft"
    return L.lora_state_dict(net)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["file", "peft", "state_dict"])
def test_compiled_model_runs_a_smaller_adapter_with_another_alpha_without_recompiling(tmp_path, kind, mode):
    torch._dynamo.reset()
    base = _base()
    model = _net(base, r=8, alpha=16, seed=1)
    # A state dict records no alpha: its adapter keeps the layer's alpha at its own rank (scale 16/4).
    alpha = 16 if kind == "state_dict" else 12
    incoming = _net(base, r=4, alpha=alpha, seed=2)
    getattr(model, mode)()
    L.prepare_for_hotswap(model)
    counter = _Counter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # no graph break either
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-6)
        graphs = counter.graphs
        params = [(id(p), p.data_ptr()) for p in model.parameters()]
        assert L.hotswap(compiled, _source(tmp_path, incoming, kind)) == ["0", "2"]
        after = compiled(x)
    assert counter.graphs == graphs, "the swap recompiled"
    assert [(id(p), p.data_ptr()) for p in model.parameters()] == params
    reference = _net(base, r=4, alpha=alpha, seed=3)
    L.load_lora(reference, _source(tmp_path, incoming, "file"))
    getattr(reference, mode)()
    with torch.no_grad():
        torch.testing.assert_close(after, reference(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-6, atol=1e-6)  # eager agrees too
    assert all(m.scaling == alpha / 4 and m.lora_alpha == alpha * 2 and m.r == 8 for _, m in L.lora_modules(model))


def test_compiled_phi3_swaps_without_recompiling_and_matches_load_lora(tmp_path):
    torch._dynamo.reset()
    model, incoming, reference = make_tiny_phi3(), make_tiny_phi3(), make_tiny_phi3()
    phi3.apply_lora(model, r=8, lora_alpha=16, lora_dropout=0.0)
    phi3.apply_lora(incoming, r=4, lora_alpha=2, lora_dropout=0.0)
    phi3.apply_lora(reference, r=4, lora_alpha=2, lora_dropout=0.0)
    randomize_adapters(model, seed=1)
    randomize_adapters(incoming, seed=2)
    L.save_lora(incoming, tmp_path / "b.safetensors")
    L.load_lora(reference, tmp_path / "b.safetensors")
    L.prepare_for_hotswap(model)
    counter = _Counter()
    compiled = torch.compile(model, backend=counter)
    before = logits(compiled)
    graphs = counter.graphs
    swapped = L.hotswap(compiled, tmp_path / "b.safetensors")
    assert len(swapped) == 8  # qkv, o, gate_up, down in each of two decoder layers
    after = logits(compiled)
    assert counter.graphs == graphs, "the swap recompiled"
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, logits(reference), rtol=1e-6, atol=1e-6)


def _embedding_dora_net(base, r, alpha, seed):
    net = copy.deepcopy(base)
    net[0] = L.Embedding.from_module(net[0], r=r, lora_alpha=alpha)
    net[1] = L.Linear.from_module(net[1], r=r, lora_alpha=alpha, use_dora=True)
    randomize_adapters(net, seed=seed, std=0.3)
    with torch.no_grad():
        net[1].lora_magnitude.abs_().add_(1)
    L.mark_only_lora_as_trainable(net)
    return net


def test_compiled_embedding_and_dora_layers_swap_without_recompiling(tmp_path):
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 8))
    model, incoming = _embedding_dora_net(base, 8, 16, seed=1), _embedding_dora_net(base, 4, 12, seed=2)
    L.save_lora(incoming, tmp_path / "e.safetensors")
    L.prepare_for_hotswap(model)
    counter = _Counter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        compiled(ids)
        graphs = counter.graphs
        L.hotswap(compiled, tmp_path / "e.safetensors")
        torch.testing.assert_close(compiled(ids), incoming(ids), rtol=1e-6, atol=1e-6)
    assert counter.graphs == graphs, "the swap recompiled"


def test_without_prepare_the_first_swap_recompiles_once_and_later_ones_do_not(tmp_path):
    torch._dynamo.reset()
    base = _base()
    model = _net(base, r=8, alpha=16, seed=1)  # train mode: the forward reads the scale (eval's merged one does not)
    counter = _Counter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        first = counter.graphs
        for seed, alpha in ((2, 8), (3, 4), (4, 2)):
            L.hotswap(compiled, L.lora_state_dict(_net(base, r=8, alpha=alpha, seed=seed)))
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    assert counter.graphs == first + 1


def _padding_cases():
    def linear(r, dora=False):
        torch.manual_seed(0)
        return L.Linear(12, 10, r=r, lora_alpha=6, use_dora=dora)

    def merged(r):
        torch.manual_seed(0)
        return L.MergedLinear(12, 32, r=r, lora_alpha=6, enable_lora=ENABLE, split_sizes=SPLITS)

    def embedding(r):
        torch.manual_seed(0)
        return L.Embedding(20, 12, r=r, lora_alpha=6)

    def conv(r, layout="lora_layers"):
        torch.manual_seed(0)
        return L.Conv2d(3, 6, 3, r=r, lora_alpha=6, padding=1, layout=layout)

    return {"linear": (linear, lambda: torch.randn(4, 12)), "dora": (lambda r: linear(r, True), lambda: torch.randn(4, 12)),
            "merged": (merged, lambda: torch.randn(4, 12)), "embedding": (embedding, lambda: torch.randint(0, 20, (4, 5))),
            "conv2d": (conv, lambda: torch.randn(2, 3, 5, 5)),
            "conv2d_loralib": (lambda r: conv(r, "loralib"), lambda: torch.randn(2, 3, 5, 5))}


def _float64_linear(layer, x, A, B, scaling):
    """``x Wᵀ + b + s·(x Aᵀ_j) B_jᵀ`` per adapted split, in float64, from the small adapter's tensors."""
    W, b = layer.weight.double(), layer.bias.double()
    y = x.double() @ W.t() + b
    spans = getattr(layer, "segments", None)
    spans = spans.spans if spans is not None else [(0, W.shape[0])]
    r, row = A.shape[0] // len(spans), 0
    for j, (o0, o1) in enumerate(spans):
        y[:, o0:o1] += scaling * (x.double() @ A[j * r:(j + 1) * r].double().t()) @ B[row:row + o1 - o0].double().t()
        row += o1 - o0
    return y


@pytest.mark.parametrize("case", ["linear", "dora", "merged", "embedding", "conv2d", "conv2d_loralib"])
def test_a_zero_padded_adapter_gives_the_smaller_adapters_output(case):
    build, inputs = _padding_cases()[case]
    small, big = build(3), build(6)
    randomize_adapters(small, seed=5, std=0.3)
    randomize_adapters(big, seed=6, std=0.3)
    L.hotswap(big, L.lora_state_dict(small))
    x = inputs()
    assert big.r == 6 and big.scaling == small.scaling == 2.0 and big.lora_alpha == 12
    A, B = big.lora_A.detach(), big.lora_B.detach()
    splits = 2 if case == "merged" else 1
    rows, kept = A.shape[0] // splits, small.lora_A.shape[0] // splits  # per split: r (r·k in loralib's layout)
    for j in range(splits):  # the padded rows of A and columns of B are zero
        assert torch.equal(A[j * rows:j * rows + kept], small.lora_A[j * kept:(j + 1) * kept])
        assert not A[j * rows + kept:(j + 1) * rows].any()
    assert not B[:, kept:].any() and torch.equal(B[:, :kept], small.lora_B)
    with torch.no_grad():
        torch.testing.assert_close(big(x), small(x), rtol=0, atol=1e-6)
        if case in ("linear", "merged"):
            expected = _float64_linear(small, x, small.lora_A, small.lora_B, small.scaling)
            torch.testing.assert_close(big(x).double(), expected, rtol=0, atol=1e-5)
        big.eval(), small.eval()  # merged: the padded delta merges to the same weight
        torch.testing.assert_close(big(x), small(x), rtol=0, atol=1e-6)


def test_a_save_after_a_swap_describes_the_loaded_adapter(tmp_path):
    base = _base()
    model, incoming = _net(base, r=8, alpha=16, seed=1, rslora=True), _net(base, r=2, alpha=3, seed=2)
    L.hotswap(model, _source(tmp_path, incoming, "file"))
    L.save_lora(model, tmp_path / "after.safetensors")
    fresh = copy.deepcopy(base)
    L.load_adapter(fresh, tmp_path / "after.safetensors")
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), incoming(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), incoming(x), rtol=1e-6, atol=1e-6)
    layer = fresh[0]
    assert layer.r == 8 and layer.use_rslora and abs(layer.scaling - 1.5) < 1e-12


def test_dora_magnitudes_swap_into_merged_layers(tmp_path):
    base = _base()
    model = _net(base, r=4, alpha=8, seed=1, dora=True).eval()
    incoming = _net(base, r=4, alpha=4, seed=2, dora=True).eval()
    assert model[0].merged and model[2].merged
    L.hotswap(model, _source(tmp_path, incoming, "peft"))
    assert model[0].merged and model[2].merged
    torch.testing.assert_close(model[2].lora_magnitude, incoming[2].lora_magnitude, rtol=0, atol=1e-6)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), incoming(x), rtol=1e-5, atol=1e-5)
        model.train(), incoming.train()
        torch.testing.assert_close(model(x), incoming(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[0].weight, base[0].weight, rtol=0, atol=0)  # unmerged exactly


def _refusals(base):
    """``(what is wrong, the source, a word of the error)`` for sources that must change nothing."""
    other = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 32), nn.Linear(32, 4))
    other[3] = L.Linear.from_module(other[3], r=4)
    extra = _net(base, r=4, alpha=8, seed=2)
    extra.append(other[3])
    missing = L.lora_state_dict(_net(base, r=4, alpha=8, seed=2))
    missing = {k: v for k, v in missing.items() if not k.startswith("2.")}
    embedding = _net(base, r=4, alpha=8, seed=2)
    embedding[0] = L.Embedding(16, 24, r=4)
    return {
        "missing module": (missing, "no adapter for"),
        "one more module": (L.lora_state_dict(extra), "without a LoRA adapter"),
        "larger rank": (L.lora_state_dict(_net(base, r=16, alpha=8, seed=2)), "larger than the layer's r=8"),
        "dora into plain": (L.lora_state_dict(_net(base, r=4, alpha=8, seed=2, dora=True)), "use_dora"),
        "other layer kind": (embedding, "Embedding"),
        "other shape": ({**missing, **{k: v for k, v in L.lora_state_dict(_net(base, r=4, alpha=8, seed=2)).items()
                                       if k == "2.lora_A"}, "2.lora_B": torch.zeros(33, 4)}, "shape"),
    }


@pytest.mark.parametrize("case", ["missing module", "one more module", "larger rank", "dora into plain",
                                  "other layer kind", "other shape"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_refused_swap_changes_nothing(tmp_path, case, mode):
    base = _base()
    model = getattr(_net(base, r=8, alpha=16, seed=1), mode)()
    L.prepare_for_hotswap(model)
    source, word = _refusals(base)[case]
    if isinstance(source, nn.Module):  # a save_lora file, whose header names the layer class
        L.save_lora(source, tmp_path / "s.safetensors")
        source = tmp_path / "s.safetensors"
    before = _full_snapshot(model)
    with pytest.raises(CheckpointError, match=word) as info:
        L.hotswap(model, source)
    assert "nothing was changed" in str(info.value)
    _assert_same(model, before)


def test_a_file_with_biases_and_a_named_adapter_are_refused(tmp_path):
    base = _base()
    model = _net(base, r=8, alpha=16, seed=1)
    L.save_lora(_net(base, r=4, alpha=8, seed=2), tmp_path / "b.safetensors", bias="all")
    before = _full_snapshot(model)
    with pytest.raises(CheckpointError, match="hot swap changes adapters only"):
        L.hotswap(model, tmp_path / "b.safetensors")
    with pytest.raises(KeyError, match="no adapter 'alice'"):  # named adapters swap too, known ones only
        L.hotswap(model, L.lora_state_dict(model), adapter="alice")
    with pytest.raises(TypeError, match="path_or_state_dict"):
        L.hotswap(model, 3)
    _assert_same(model, before)


def test_the_scale_survives_casts_and_unload_leaves_no_buffer():
    base = _base()
    model = _net(base, r=3, alpha=8, seed=1)  # scale 8/3: not a bfloat16 number
    L.prepare_for_hotswap(model)
    model.to(torch.bfloat16)
    for _, layer in L.lora_modules(model):
        assert getattr(layer, HOTSWAP_SCALE).view(torch.float64).item() == layer.scaling == 8 / 3
    assert "0.hotswap_scaling" not in model.state_dict()
    L.unload(model)
    assert not dict(model.named_buffers())
    assert model.state_dict().keys() == base.state_dict().keys()


@pytest.mark.parametrize("case", ["linear", "merged", "dora"])
def test_training_on_after_a_padded_swap_trains_the_smaller_adapter(case):
    """AdamW steps on the padded layer equal those on the layer of the smaller rank: the padding gets
    zero gradients and stays zero, so later training (and a save) stays that of the incoming adapter."""
    build, inputs = _padding_cases()[case]
    small, big = build(3), build(6)
    randomize_adapters(small, seed=5, std=0.3)
    L.hotswap(big, L.lora_state_dict(small))
    x, target = inputs(), torch.randn(4, big.out_features)
    optimizers = [torch.optim.AdamW(L.lora_parameters(m), lr=0.05, weight_decay=0.1) for m in (small, big)]
    for _ in range(3):
        for layer, opt in zip((small, big), optimizers):
            opt.zero_grad()
            nn.functional.mse_loss(layer(x), target).backward()
            opt.step()
    splits = 2 if case == "merged" else 1
    for j in range(splits):
        torch.testing.assert_close(big.lora_A[j * 6:j * 6 + 3], small.lora_A[j * 3:(j + 1) * 3], rtol=0, atol=1e-6)
        assert not big.lora_A[j * 6 + 3:(j + 1) * 6].any()
    assert not big.lora_B[:, 3:].any()
    with torch.no_grad():
        torch.testing.assert_close(big(x), small(x), rtol=0, atol=1e-5)
