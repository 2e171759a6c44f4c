"""fused_linear_cross_entropy against F.cross_entropy on float64 logits.

The reference is written here from the definition: ``F.cross_entropy(hidden @
W.T + b, labels)`` in float64, with its gradients from autograd. Nothing is
shared with lora_layers.loss.
"""
import pytest
import torch
import torch.nn.functional as F

import lora_layers
from lora_layers.loss import default_chunk_size, fused_linear_cross_entropy

F64 = torch.float64
# Norm-relative tolerance of a gradient or loss, by input dtype. bf16/fp16 logits
# are rounded before the fp32 softmax (as in the unfused model), so those errors
# are the inputs' rounding, not the loss's.
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float64: 1e-12}


def rel(a, b):
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference(hidden, weight, labels, bias, **kw):
    """Loss and gradients of the unfused loss in float64 (hidden, weight and bias all as leaves)."""
    leaves = [t.detach().to(F64).requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().to(F64).requires_grad_()
    logits = leaves[0] @ leaves[1].t() + (0 if b is None else b)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), **kw)
    grads = torch.autograd.grad(loss, leaves + ([] if b is None else [b]))
    return loss, grads


def make(T=(3, 11), H=16, V=37, dtype=torch.float32, bias=True, train_weight=True, ignored=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_(train_weight)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_(train_weight) if bias else None
    labels = torch.randint(0, V, T, generator=g)
    labels[torch.rand(T, generator=g) < ignored] = -100
    return hidden, weight, labels, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction, smoothing", [("mean", 0.0), ("sum", 0.0), ("mean", 0.1), ("sum", 0.25)])
@pytest.mark.parametrize("chunk", [None, 5])  # 5 does not divide the 33 tokens
def test_matches_float64_cross_entropy(dtype, reduction, smoothing, chunk):
    hidden, weight, labels, bias = make(dtype=dtype)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, chunk_size=chunk,
                                      label_smoothing=smoothing)
    grads = torch.autograd.grad(3.0 * loss, [hidden, weight, bias])  # an upstream scale of 3
    ref, ref_grads = reference(hidden, weight, labels, bias, reduction=reduction, label_smoothing=smoothing)
    assert loss.dtype == (F64 if dtype == F64 else torch.float32)
    assert rel(loss, ref) <= TOL[dtype]
    for name, got, want, t in zip(("hidden", "weight", "bias"), grads, ref_grads, (hidden, weight, bias)):
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert rel(got, 3.0 * want) <= TOL[dtype], name


@pytest.mark.parametrize("grad", [True, False])
def test_confident_wrong_predictions_keep_full_precision(grad):
    """Logit gaps of thousands: the label's probability underflows fp32, the loss must not."""
    hidden, weight, labels, bias = make(ignored=0.0)
    hidden = (hidden.detach() * 300).requires_grad_(grad)
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=8)
    ref, ref_grads = reference(hidden, weight, labels, bias)
    assert ref.item() > 500 and rel(loss, ref) <= TOL[torch.float32]
    if grad:
        assert rel(torch.autograd.grad(loss, hidden)[0], ref_grads[0]) <= TOL[torch.float32]


def test_frozen_weight_no_bias_and_ignored_rows_get_zero_gradient():
    hidden, weight, labels, _ = make(bias=False, train_weight=False, ignored=0.5)
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    (gh,) = torch.autograd.grad(loss, [hidden])
    ref, (rh, _) = reference(hidden, weight, labels, None)
    assert rel(loss, ref) <= TOL[torch.float32] and rel(gh, rh) <= TOL[torch.float32]
    assert torch.all(gh[labels == -100] == 0)


def test_all_ignored_behaves_like_f_cross_entropy():
    hidden, weight, labels, bias = make()
    labels.fill_(-100)
    mean = fused_linear_cross_entropy(hidden, weight, labels, bias)
    assert torch.isnan(mean)
    gh, gw = torch.autograd.grad(mean, [hidden, weight])
    assert not gh.any() and not gw.any()  # zero gradients, as F.cross_entropy gives
    total = fused_linear_cross_entropy(hidden, weight, labels, bias, reduction="sum")
    assert total.item() == 0.0


def test_custom_ignore_index_and_int32_labels():
    hidden, weight, labels, bias = make(ignored=0.0)
    labels[0, :4] = 7
    loss = fused_linear_cross_entropy(hidden, weight, labels.int(), bias, ignore_index=7)
    ref, _ = reference(hidden, weight, labels, bias, ignore_index=7)
    assert rel(loss, ref) <= TOL[torch.float32]


def test_no_grad_gives_the_same_loss():
    hidden, weight, labels, bias = make()
    with_grad = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=7)
    with torch.no_grad():
        without = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=7)
    assert without.requires_grad is False and torch.equal(without, with_grad.detach())


def test_autocast_projects_in_the_autocast_dtype():
    hidden, weight, labels, bias = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias)
        plain = F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, 1), labels.flatten())
    assert loss.dtype == torch.float32
    assert abs(loss.item() - plain.item()) <= 1e-5 * abs(plain.item())  # the same bf16 logits, fp32 softmax
    gh, gw = torch.autograd.grad(loss, [hidden, weight])
    assert gh.dtype == gw.dtype == torch.float32
    _, (rh, rw, _) = reference(hidden, weight, labels, bias)
    assert rel(gh, rh) <= TOL[torch.bfloat16] and rel(gw, rw) <= TOL[torch.bfloat16]


def test_keeps_only_the_hidden_gradient():
    """Saved for backward: the (counted tokens, H) gradient and their row indices; never (T, V)."""
    hidden, weight, labels, _ = make(T=(4, 64), H=32, V=1000, bias=False, train_weight=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_linear_cross_entropy(hidden, weight, labels)
    n = int((labels != -100).sum())
    assert sum(t.numel() * t.element_size() for t in saved) == n * 32 * 4 + n * 8
    saved.clear()
    labels.clamp_(min=0)  # every token counts: no index is kept
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_linear_cross_entropy(hidden, weight, labels)
    assert sum(t.numel() * t.element_size() for t in saved) == labels.numel() * 32 * 4


def test_default_chunk_size_bounds_the_temporary():
    assert default_chunk_size(1024, 512, 32064) == 256  # 32 MiB floor: 261 rows, rounded down to 64s
    assert default_chunk_size(8192, 3072, 32064) == 768  # as many fp32 logits bytes as the kept gradient
    assert default_chunk_size(10, 8, 10**9) == 64  # never below 64 tokens
    for tokens, hidden, vocab in ((1024, 512, 32064), (8192, 3072, 32064), (4096, 4096, 128256)):
        chunk = default_chunk_size(tokens, hidden, vocab)
        assert chunk % 64 == 0 and chunk * vocab * 4 <= max(tokens * hidden * 4, 32 * 2**20)


def test_double_backward_is_refused():
    hidden, weight, labels, bias = make()
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [hidden], create_graph=True)


def test_torch_compile_computes_the_plain_loss_without_graph_breaks():
    hidden, weight, labels, bias = make(bias=False)
    fn = lambda h: fused_linear_cross_entropy(h, weight, labels, label_smoothing=0.1)  # noqa: E731
    explanation = torch._dynamo.explain(fn)(hidden)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(hidden)
    eager = fn(hidden)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(compiled, hidden)[0], torch.autograd.grad(eager, hidden)[0],
                               rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


def _bad_inputs():
    h, w, y, b = make()
    yield (h.long(), w, y, None), {}, TypeError, "hidden must be a floating-point"
    yield (h, w.double(), y, None), {}, TypeError, "must match"
    yield (h, w, y.float(), None), {}, TypeError, "labels must be an integer"
    yield (h, w[:, :5], y, None), {}, ValueError, "weight must be \\(vocab, hidden\\)"
    yield (h, w, y[:, :4], None), {}, ValueError, "labels must have shape"
    yield (h, w, y, b[:3]), {}, ValueError, "bias must be None or a tensor of shape"
    yield (h, w, y, b.double()), {}, TypeError, "bias has dtype"
    yield (h, w, y, b), {"reduction": "none"}, ValueError, "reduction must be one of"
    yield (h, w, y, b), {"chunk_size": 0}, ValueError, "chunk_size must be"
    yield (h, w, y, b), {"label_smoothing": 1.5}, ValueError, "label_smoothing must be"
    yield (h, w, y, b), {"ignore_index": 1.0}, TypeError, "ignore_index must be an int"
    too_big = y.clone()
    too_big[1, 2] = 37
    yield (h, w, too_big, b), {}, ValueError, "labels must be in \\[0, vocab=37\\).*got 37"
    negative = y.clone()
    negative[0, 0] = -5
    yield (h, w, negative, b), {}, ValueError, "got -5"


@pytest.mark.parametrize("args, kwargs, exc, match", list(_bad_inputs()), ids=lambda v: "")
def test_bad_input_raises_clearly_and_changes_nothing(args, kwargs, exc, match):
    before = [None if t is None else t.detach().clone() for t in args]
    with pytest.raises(exc, match=match):
        fused_linear_cross_entropy(*args, **kwargs)
    assert all(t is None or torch.equal(t, old) for t, old in zip(args, before))


def test_exported_at_top_level():
    assert lora_layers.fused_linear_cross_entropy is fused_linear_cross_entropy
    assert "fused_linear_cross_entropy" in lora_layers.__all__
