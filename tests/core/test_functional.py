"""functional.lora_linear: float64 reference, gradcheck, dropout determinism,
needs_input_grad skipping, autocast, torch.compile, serialisation, saved bytes."""
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_layers as L
from lora_layers.functional import draw_seed, dropout_mask, lora_linear
from _naive_lora import F64, assert_rel_close, leaf64, naive_dora, naive_linear
from conftest import restored
from _autograd_bytes import saved_bytes

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _segments_case(draw_sizes, enable):
    """(segments, split_sizes) for a fused layer."""
    segs, o = [], 0
    for s, e in zip(draw_sizes, enable):
        if e:
            segs.append((o, o + s))
        o += s
    return tuple(segs)


@st.composite
def _case(draw):
    in_f = draw(st.integers(1, 20))
    r = draw(st.integers(1, 5))
    fused = draw(st.booleans())
    if fused:
        n = draw(st.integers(1, 3))
        sizes = draw(st.lists(st.integers(1, 10), min_size=n, max_size=n))
        enable = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
    else:
        sizes, enable = [draw(st.integers(1, 20))], [True]
    lead = draw(st.sampled_from([(4,), (2, 3), (2, 1, 3)]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    return in_f, r, fused, sizes, enable, lead, dtype, draw(st.booleans()), draw(st.booleans()), \
        draw(st.sampled_from([0.0, 0.4])), draw(st.booleans())


@SETTINGS
@given(case=_case())
def test_lora_linear_vs_float64(case):
    in_f, r, fused, sizes, enable, lead, dtype, fifo, bias, p, train_w = case
    out_f = sum(sizes)
    n = sum(enable)
    W = torch.randn(out_f, in_f, dtype=dtype)
    W = (W.t().contiguous() if fifo else W).requires_grad_(train_w)
    b = torch.randn(out_f, dtype=dtype, requires_grad=True) if bias else None
    A = torch.randn(r * n, in_f, dtype=dtype, requires_grad=True)
    B = torch.randn(sum(s for s, e in zip(sizes, enable) if e), r, dtype=dtype, requires_grad=True)
    x = torch.randn(*lead, in_f, dtype=dtype, requires_grad=True)
    segs = _segments_case(sizes, enable) if fused else None
    torch.manual_seed(99)
    y = lora_linear(x, W, b, A, B, 0.75, p, True, fan_in_fan_out=fifo, segments=segs)
    mask = None
    if p > 0:
        torch.manual_seed(99)
        mask = dropout_mask(draw_seed(), x.detach().reshape(-1, in_f), p).to(F64).view(x.shape)
    inputs = [t for t in (x, W, b, A, B) if t is not None and t.requires_grad]
    ins64 = {id(t): leaf64(t) for t in (x, W, b, A, B) if t is not None}
    t64 = [ins64[id(t)] if t is not None else None for t in (x, W, b, A, B)]
    y64 = naive_linear(t64[0], t64[1], t64[2], t64[3], t64[4], 0.75, fan_in_fan_out=fifo, mask=mask,
                       split_sizes=sizes if fused else None, enable=enable if fused else None)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    assert_rel_close(y, y64, dtype, "forward")
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, g)
    grads64 = torch.autograd.grad(y64, [ins64[id(t)] for t in inputs], g.to(F64))
    for t, gr, gr64 in zip(inputs, grads, grads64):
        assert gr.dtype == t.dtype and gr.shape == t.shape
        assert_rel_close(gr, gr64, dtype, f"grad of input with shape {tuple(t.shape)}")


def _gc_inputs(fifo=False, fused=False):
    torch.manual_seed(0)
    in_f, r = 5, 2
    if fused:
        segs, out_f, nb, n = ((0, 3), (5, 7)), 7, 5, 2
    else:
        segs, out_f, nb, n = None, 4, 4, 1
    W = torch.randn(out_f, in_f, dtype=F64)
    W = (W.t().contiguous() if fifo else W).requires_grad_()
    return (torch.randn(2, 3, in_f, dtype=F64, requires_grad=True), W,
            torch.randn(out_f, dtype=F64, requires_grad=True),
            torch.randn(r * n, in_f, dtype=F64, requires_grad=True),
            torch.randn(nb, r, dtype=F64, requires_grad=True)), segs


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("fifo,fused", [(False, False), (True, False), (False, True), (True, True)])
def test_gradcheck_float64(p, fifo, fused):
    inputs, segs = _gc_inputs(fifo, fused)

    def fn(x, W, b, A, B):
        torch.manual_seed(1234)  # the seed is drawn from the default generator: fix it per call
        return lora_linear(x, W, b, A, B, 1.5, p, True, fan_in_fan_out=fifo, segments=segs)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_dropout_same_seed_same_result_and_mask_regenerated():
    inputs, _ = _gc_inputs()
    x, W, b, A, B = [t.detach().float().requires_grad_() for t in inputs]
    W.requires_grad_(False)
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        y = lora_linear(x, W, b, A, B, 2.0, 0.5, True)
        outs.append((y, torch.autograd.grad(y, [x, A, B, b], torch.ones_like(y))))
    assert torch.equal(outs[0][0], outs[1][0])
    for g0, g1 in zip(outs[0][1], outs[1][1]):
        assert torch.equal(g0, g1)
    torch.manual_seed(43)
    assert not torch.equal(lora_linear(x, W, b, A, B, 2.0, 0.5, True), outs[0][0])
    # dropout actually happens (some but not all of x is dropped) and matches the regenerated mask
    torch.manual_seed(42)
    mask = dropout_mask(draw_seed(), x.detach().reshape(-1, 5), 0.5).view(x.shape)
    assert 0 < int((mask == 0).sum()) < mask.numel()
    assert set(mask.unique().tolist()) <= {0.0, 2.0}
    y_ref = naive_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 2.0, mask=mask.double())
    torch.testing.assert_close(outs[0][0].double(), y_ref, rtol=1e-5, atol=1e-5)
    # eval (training=False) ignores dropout
    torch.testing.assert_close(lora_linear(x, W, b, A, B, 2.0, 0.5, False).double(),
                               naive_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 2.0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("needs", [("A", "B"), ("x",), ("B",), ("A",), ("x", "W"), ("b",), ("x", "A", "B", "b")])
def test_needs_input_grad_subsets(needs, p):
    inputs, _ = _gc_inputs()
    names = ("x", "W", "b", "A", "B")
    ts = [t.detach().float().requires_grad_(n in needs) for n, t in zip(names, inputs)]
    torch.manual_seed(5)
    y = lora_linear(*ts, 0.5, p, True)
    assert y.requires_grad
    want = [t for t in ts if t.requires_grad]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, want, g)
    mask = None
    if p > 0:
        torch.manual_seed(5)
        mask = dropout_mask(draw_seed(), ts[0].reshape(-1, 5), p).to(F64).view(ts[0].shape)
    t64 = [leaf64(t) for t in ts]
    y64 = naive_linear(*t64, 0.5, mask=mask)
    grads64 = torch.autograd.grad(y64, [t64[i] for i, t in enumerate(ts) if t.requires_grad], g.to(F64))
    for gr, gr64 in zip(grads, grads64):
        assert_rel_close(gr, gr64, torch.float32, f"needs={needs}")


def test_no_grad_and_inference_paths():
    inputs, segs = _gc_inputs(fused=True)
    x, W, b, A, B = [t.detach().float() for t in inputs]
    ref = naive_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 0.5,
                       split_sizes=[3, 2, 2], enable=[True, False, True])
    with torch.no_grad():
        assert_rel_close(lora_linear(x, W, b, A, B, 0.5, segments=segs), ref, torch.float32, "no_grad")
    with torch.inference_mode():
        assert_rel_close(lora_linear(x, W, b, A, B, 0.5, segments=segs), ref, torch.float32, "inference")
    # nothing requires grad (frozen everything) outside no_grad
    assert_rel_close(lora_linear(x, W, b, A, B, 0.5, segments=segs), ref, torch.float32, "frozen")


def test_autocast_cpu_bf16():
    torch.manual_seed(0)
    layer = L.Linear(16, 8, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_plain = nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == torch.bfloat16 == y_plain.dtype  # same as a plain Linear under autocast
    x64, A64, B64 = leaf64(x), leaf64(layer.lora_A), leaf64(layer.lora_B)
    y64 = naive_linear(x64, layer.weight.double(), layer.bias.double(), A64, B64, 2.0)
    assert_rel_close(y, y64, torch.bfloat16, "autocast forward")
    g = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], g)
    assert gx.dtype == gA.dtype == gB.dtype == torch.float32
    for a, b in zip((gx, gA, gB), torch.autograd.grad(y64, [x64, A64, B64], g.double())):
        assert_rel_close(a, b, torch.bfloat16, "autocast grad")


@pytest.mark.slow
def test_torch_compile_matches_eager_and_no_graph_breaks():
    torch.manual_seed(0)
    layer = L.Linear(12, 6, r=2, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12, requires_grad=True)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    y_c = compiled(x)
    y_e = layer(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    gc = torch.autograd.grad(y_c.sum(), [x, layer.lora_A, layer.lora_B])
    ge = torch.autograd.grad(y_e.sum(), [x, layer.lora_A, layer.lora_B])
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("enable", [[True, True, True], [True, False, True]])
def test_merged_linear_no_graph_breaks(p, enable):
    layer = L.MergedLinear(8, 12, r=2, lora_dropout=p, enable_lora=enable, split_sizes=[6, 3, 3])
    explanation = torch._dynamo.explain(layer)(torch.randn(3, 8, requires_grad=True))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


def test_compiled_merged_linear_matches_eager():
    layer = L.MergedLinear(8, 12, r=2, enable_lora=[True, False, True], split_sizes=[6, 3, 3])
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 8, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y_c, y_e = compiled(x), layer(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    params = [x, layer.lora_A, layer.lora_B]
    for a, b in zip(torch.autograd.grad(y_c.square().sum(), params), torch.autograd.grad(y_e.square().sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(L.Embedding(10, 8, r=2), L.Linear(8, 8, r=2, lora_dropout=0.1),
                      L.MergedLinear(8, 12, r=2, lora_dropout=0.1, enable_lora=[True, False, True]),
                      L.Conv1d(3, 2, 2, r=1, lora_dropout=0.1))
    for mod in m:
        with torch.no_grad():
            mod.lora_B.normal_()
            mod.lora_A.normal_()
    return m


def _out(m):
    idx = torch.tensor([[1, 2, 3]])
    h = m[2](m[1](m[0](idx)))  # (1, 3, 12): 3 channels for the conv
    return m[3](h)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("merged", [False, True])
def test_copy_pickle_save(how, merged):
    m = _model()
    if merged:
        m.eval()
    else:
        m.train()
    m2 = restored(m, how)
    m.eval()
    m2.eval()
    torch.testing.assert_close(_out(m2), _out(m))
    # the copy is independent and still unmerges exactly
    m.train()
    m2.train()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert _out(m2).shape == (1, 2, 11)


def test_saved_activation_bytes_bound():
    T, r = 64, 8
    torch.manual_seed(0)
    ours = L.Linear(256, 256, r=r, lora_dropout=0.1).train()
    x = torch.randn(T, 256, requires_grad=True)
    extra, y = saved_bytes(ours, x)
    assert extra == T * r * x.element_size()  # only u = drop(x) Aᵀ
    y.sum().backward()  # and backward works from what was saved


def test_saved_activation_bytes_merged_linear_gqa():
    T, r = 32, 4
    layer = L.MergedLinear(64, 96, r=r, lora_dropout=0.1, enable_lora=[True, False, True],
                           split_sizes=[64, 16, 16]).train()
    x = torch.randn(T, 64, requires_grad=True)
    extra, y = saved_bytes(layer, x)
    assert extra == T * r * 2 * x.element_size()  # u for the two enabled splits, nothing else


@pytest.mark.parametrize("grad", [False, True])
def test_unsorted_segments(grad):
    """Segments need not be in output order: lora_B rows follow the segment order."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=F64, requires_grad=grad)
    W, b = torch.randn(9, 6, dtype=F64), torch.randn(9, dtype=F64)
    A, B = torch.randn(4, 6, dtype=F64), torch.randn(5, 2, dtype=F64)
    y = lora_linear(x, W, b, A, B, 0.5, segments=[(6, 9), (0, 2)])
    dW = torch.zeros(9, 6, dtype=F64)
    dW[6:9] = B[:3] @ A[:2]
    dW[0:2] = B[3:] @ A[2:]
    torch.testing.assert_close(y, x @ (W + 0.5 * dW).t() + b)


@pytest.mark.parametrize("grad", [False, True])
def test_overlapping_segments_rejected(grad):
    x = torch.randn(2, 4, requires_grad=grad)
    W, A, B = torch.randn(4, 4), torch.randn(2, 4), torch.randn(6, 1)
    with pytest.raises(ValueError, match="segments"):
        lora_linear(x, W, None, A, B, 1.0, segments=[(0, 3), (1, 4)])


def test_dropout_close_to_one_is_valid():
    layer = L.Linear(4, 4, r=2, lora_dropout=0.999995)  # accepted by validation: p < 1
    x = torch.randn(3, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("fifo,fused", [(False, False), (True, True)])
def test_double_backward_gradgradcheck_float64(p, fifo, fused):
    # create_graph=True switches to a differentiable backward (u and the mask rebuilt),
    # so second derivatives are exact, dropout included (same seed per call).
    inputs, segs = _gc_inputs(fifo, fused)

    def fn(x, W, b, A, B):
        torch.manual_seed(1234)
        return lora_linear(x, W, b, A, B, 1.5, p, True, fan_in_fan_out=fifo, segments=segs)

    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_gradient_penalty_matches_float64_formula():
    # A gradient penalty (WGAN-GP style) through a layer: d/dA of ||dy/dx||^2.
    torch.manual_seed(0)
    layer = L.Linear(5, 3, r=2, lora_alpha=3).double()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    gA, gB = torch.autograd.grad(gx.square().sum(), [layer.lora_A, layer.lora_B])

    W, A, B = layer.weight.detach(), leaf64(layer.lora_A), leaf64(layer.lora_B)
    x2 = x.detach().requires_grad_()
    y = naive_linear(x2, W, layer.bias.detach(), A, B, layer.scaling)
    (rx,) = torch.autograd.grad(y.square().sum(), x2, create_graph=True)
    rA, rB = torch.autograd.grad(rx.square().sum(), [A, B])
    torch.testing.assert_close(gA, rA)
    torch.testing.assert_close(gB, rB)


def _dropout_layer(kind, dora):
    torch.manual_seed(0)
    if kind == "linear":
        layer = L.Linear(6, 5, r=2, lora_alpha=3, lora_dropout=0.3, use_dora=dora)
    else:
        layer = L.MergedLinear(6, 8, r=2, lora_alpha=3, lora_dropout=0.3, enable_lora=[True, False, True],
                               split_sizes=[4, 2, 2], use_dora=dora)
    nn.init.normal_(layer.lora_B)
    return layer.double().train()


def _float64_reference(layer, x, mask):
    """The layer's formula on float64 leaves (x, A, B[, m]) with the given dropout mask."""
    leaves = [x.detach().requires_grad_()] + [leaf64(t) for t in layer.adapter_parameters().values()]
    fused = {} if layer.segments is None else dict(split_sizes=layer.split_sizes, enable=layer.enable_lora)
    W, b = layer.weight.detach(), layer.bias.detach()
    if layer.use_dora:
        return leaves, naive_dora(leaves[0], W, b, *leaves[1:], layer.scaling, mask=mask, **fused)
    return leaves, naive_linear(leaves[0], W, b, *leaves[1:], layer.scaling, mask=mask, **fused)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_create_graph_backward_with_dropout_uses_the_forward_s_mask(kind, dora):
    # issue #20 item 14: create_graph=True rebuilds the dropout mask in backward; it must be the
    # forward's, so the first-order gradients equal the plain backward's and the float64 formula's
    # with that mask, and the second-order ones (a gradient penalty) the formula's too.
    layer = _dropout_layer(kind, dora)
    x = torch.randn(2, 3, 6, dtype=F64, requires_grad=True)
    params = [x] + list(layer.adapter_parameters().values())
    g = torch.randn(2, 3, layer.out_features, dtype=F64)
    torch.manual_seed(5)
    plain = torch.autograd.grad(layer(x), params, g)
    torch.manual_seed(5)
    graph = torch.autograd.grad(layer(x), params, g, create_graph=True)
    torch.manual_seed(5)
    mask = dropout_mask(draw_seed(), x.detach().reshape(-1, 6), 0.3).view(x.shape)
    leaves, y = _float64_reference(layer, x, mask)
    (gx_ref, *_) = ref = torch.autograd.grad(y, leaves, g, create_graph=True)
    for name, a, b, want in zip(["x", *layer.adapter_parameters()], plain, graph, ref):
        torch.testing.assert_close(b, a, msg=f"d{name}: create_graph=True differs from the plain backward")
        torch.testing.assert_close(b, want, msg=f"d{name}: differs from the float64 formula with the mask")
    second = torch.autograd.grad(graph[0].square().sum(), params[1:])
    for name, got, want in zip(layer.adapter_parameters(), second,
                               torch.autograd.grad(gx_ref.square().sum(), leaves[1:], allow_unused=True)):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, msg=f"d²/d{name}")


def test_torch_func_vmap_jacrev_and_hessian_match_float64():
    torch.manual_seed(0)
    layer = L.Linear(4, 3, r=2, lora_alpha=2).double()
    nn.init.normal_(layer.lora_B)
    W, b, A, B, s = layer.weight.detach(), layer.bias.detach(), layer.lora_A.detach(), layer.lora_B.detach(), \
        layer.scaling
    xs = torch.randn(6, 4, dtype=F64)

    def ref(x):
        return naive_linear(x, W, b, A, B, s)

    torch.testing.assert_close(torch.func.vmap(layer)(xs), ref(xs))
    torch.testing.assert_close(torch.func.jacrev(layer)(xs[0]), torch.func.jacrev(ref)(xs[0]))
    params = dict(layer.named_parameters())

    def loss(p):
        return torch.func.functional_call(layer, p, (xs,)).square().sum()

    hess = torch.func.hessian(loss)(params)["lora_A"]["lora_B"]

    def ref_loss(A_, B_):
        return naive_linear(xs, W, b, A_, B_, s).square().sum()

    torch.testing.assert_close(hess, torch.func.hessian(ref_loss, argnums=(0, 1))(A, B)[0][1])
