"""core.mixed: mixed-adapter batches (issue #23 items 1-3 at the functional level).

Every test compares against an independent reference: the float64 formulas of _naive_lora applied
per token, K separate single-adapter ``lora_linear`` calls on their own rows, or the eager path.
"""
import pytest
import torch
import torch.nn.functional as F

from lora_layers.bases.quantized import QuantizedBase
from lora_layers.core import mixed_lean
from lora_layers.core import recipes
from lora_layers.core.dropout import draw_seed, keep_mask, keep_scale
from lora_layers.core.functional import lora_linear
from lora_layers.core.mixed import (MixedAdapter, lora_conv_mixed, lora_embedding_mixed, lora_linear_mixed,
                                    token_adapters)
from lora_layers.variants.dora import DoRAScale
from _naive_lora import F64, naive_conv, naive_dora, naive_embedding, naive_linear, rel_err

ROWS = [0, 2, -1, 1, 0, 2]  # K=3 adapters and one base-only row
RANKS, ALPHAS = (2, 3, 4), (4.0, 3.0, 16.0)
IN = 7
# kind -> (split_sizes, enable, segments): GQA-like unequal q, k, v with k disabled
GQA = ([6, 3, 2], [True, False, True], [(0, 6), (9, 11)])
KINDS = {"linear": ([5], [True], None), "fan_in_fan_out": ([5], [True], None), "merged": GQA,
         "dora": ([5], [True], None), "dora_merged": GQA}
TOL32 = 1e-6


@pytest.fixture(params=["stacked", "grouped"])
def lean_path(request, monkeypatch):
    """Both lean paths: the adapters stacked into one (small Σr) and the tokens grouped by adapter."""
    monkeypatch.setattr(mixed_lean, "STACKED_MAX_RANK", 10**6 if request.param == "stacked" else 0)
    return request.param


def _case(kind, dtype=F64, seed=0):
    """Float64 leaves: x (6, 3, IN), W, b, and per adapter (A, B, scaling, magnitude or None)."""
    gen = torch.Generator().manual_seed(seed)
    sizes, enable, _ = KINDS[kind]
    out, n, b_rows = sum(sizes), sum(enable), sum(s for s, e in zip(sizes, enable) if e)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_()

    W = rnd(IN, out) if kind == "fan_in_fan_out" else rnd(out, IN)
    ads = [(rnd(r * n, IN), rnd(b_rows, r), alpha / r, rnd(b_rows) if kind.startswith("dora") else None)
           for r, alpha in zip(RANKS, ALPHAS)]
    return rnd(len(ROWS), 3, IN), W, rnd(out), ads


def _leaves(x, W, b, ads):
    return [x, W, b] + [t for A, B, _, m in ads for t in (A, B, m) if t is not None]


def _mixed(kind, x, W, b, ads, ps=(0.0, 0.0, 0.0), training=False):
    segs = KINDS[kind][2]
    mixed = [MixedAdapter(A, B, s, p, None if m is None else DoRAScale(m)) for (A, B, s, m), p in zip(ads, ps)]
    return lora_linear_mixed(x, W, b, mixed, token_adapters(ROWS, x.shape), training=training,
                             fan_in_fan_out=kind == "fan_in_fan_out", segments=segs)


def _reference(kind, x, W, b, ads, masks=None):
    """The float64 formula token by token: each token takes its adapter's naive output."""
    sizes, enable, _ = KINDS[kind]
    fused = {} if len(sizes) == 1 else {"split_sizes": sizes, "enable": enable}
    fifo = kind == "fan_in_fan_out"
    x2 = x.reshape(-1, x.shape[-1])
    ta = token_adapters(ROWS, x.shape)
    y = x2 @ (W if fifo else W.t()) + b
    for k, (A, B, s, m) in enumerate(ads):
        mask = None if masks is None else masks[k]
        if m is None:
            yk = naive_linear(x2, W, b, A, B, s, fan_in_fan_out=fifo, mask=mask, **fused)
        else:
            yk = naive_dora(x2, W, b, A, B, m, s, mask=mask, fan_in_fan_out=fifo, **fused)
        y = torch.where((ta == k)[:, None], yk, y)
    return y.view(*x.shape[:-1], -1)


def _assert_grads(got_out, got_leaves, ref_out, ref_leaves, tol):
    g = torch.randn(ref_out.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert rel_err(got_out, ref_out) <= tol, f"output: {rel_err(got_out, ref_out):.3g}"
    got = torch.autograd.grad(got_out, got_leaves, g.to(got_out.dtype))
    want = torch.autograd.grad(ref_out, ref_leaves, g)
    for i, (a, e) in enumerate(zip(got, want)):
        assert rel_err(a, e) <= tol, f"grad of leaf {i}: {rel_err(a, e):.3g}"


def _copy(leaves_or_case, dtype):
    x, W, b, ads = leaves_or_case
    cast = lambda t: None if t is None else t.detach().to(dtype).requires_grad_()  # noqa: E731
    return cast(x), cast(W), cast(b), [(cast(A), cast(B), s, cast(m)) for A, B, s, m in ads]


# ----------------------------------------------------------------------------- the float64 formula

@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_matches_the_float64_formula_per_token(kind, dtype, lean_path):
    case = _case(kind)
    ours = _copy(case, dtype)
    tol = TOL32 if dtype == torch.float32 else 1e-12
    _assert_grads(_mixed(kind, *ours), _leaves(*ours), _reference(kind, *case), _leaves(*case), tol)


@pytest.mark.parametrize("kind", list(KINDS))
def test_dropout_masks_follow_the_documented_rule(kind, lean_path):
    """Each adapter's own p; token t of adapter k uses row t of drop_mask(seed, (T, in), p_k); backward
    regenerates the same masks (the gradients of A see them)."""
    ps = (0.1, 0.3, 0.0)
    case = _case(kind)
    ours = _copy(case, torch.float32)
    torch.manual_seed(5)
    seed, T = draw_seed(), len(ROWS) * 3
    masks = [keep_mask(seed, (T, IN), p, "cpu").to(F64) * keep_scale(p) for p in ps]
    torch.manual_seed(5)
    y = _mixed(kind, *ours, ps=ps, training=True)
    _assert_grads(y, _leaves(*ours), _reference(kind, *case, masks=masks), _leaves(*case), TOL32)


def test_dropout_applies_only_in_training():
    case = _case("linear")
    y = _mixed("linear", *case, ps=(0.5, 0.5, 0.5), training=False)
    assert rel_err(y, _reference("linear", *case)) <= 1e-12


@pytest.mark.parametrize("kind", ["linear", "merged", "dora"])
def test_gradcheck_and_gradgradcheck_with_seeded_dropout(kind, lean_path):
    """Finite differences see the same masks as backward only if backward rebuilds the forward's.
    DoRA's norm is a constant in backward (the paper's 4.3), so there only x, b and m are checked."""
    x, W, b, ads = _case(kind)
    x = x[:, :1].detach().requires_grad_()  # fewer tokens: quicker
    dora = kind.startswith("dora")

    def f(x, b, *params):
        torch.manual_seed(11)
        it = iter(params)
        new = [(A, B, s, next(it)) if dora else (next(it), next(it), s, None) for A, B, s, m in ads]
        return _mixed(kind, x, W.detach(), b, new, ps=(0.2, 0.4, 0.1), training=True)

    inputs = [x, b] + ([m for *_, m in ads] if dora else _leaves(x, W, b, ads)[3:])
    assert torch.autograd.gradcheck(f, inputs)
    if not dora:  # the lean Function's differentiable backward (fast mode: one random direction)
        assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


# ----------------------------------------------------------------------------- K separate single-adapter runs

@pytest.mark.parametrize("kind", ["linear", "fan_in_fan_out", "merged", "dora"])
def test_equals_separate_single_adapter_calls_on_their_own_rows(kind, lean_path):
    x, W, b, ads = _copy(_case(kind), torch.float32)
    W.requires_grad_(True)
    sizes, _, segs = KINDS[kind]
    fifo = kind == "fan_in_fan_out"
    rows = torch.tensor(ROWS)
    sep = torch.empty(x.shape[0], x.shape[1], sum(sizes))
    parts = []
    for k, (A, B, s, m) in enumerate(ads):
        idx = (rows == k).nonzero().flatten()
        extra = {} if m is None else {"row_scale": DoRAScale(m)}
        parts.append((idx, lora_linear(x[idx], W, b, A, B, s, fan_in_fan_out=fifo, segments=segs, **extra)))
    base = (rows == -1).nonzero().flatten()
    parts.append((base, F.linear(x[base], W.t() if fifo else W, b)))
    for idx, y in parts:
        sep = sep.index_put((idx,), y)
    leaves = _leaves(x, W, b, ads)
    g = torch.randn(sep.shape)
    want = torch.autograd.grad(sep, leaves, g)
    got_y = _mixed(kind, x, W, b, ads)
    assert rel_err(got_y, sep) <= TOL32
    for i, (a, e) in enumerate(zip(torch.autograd.grad(got_y, leaves, g), want)):
        assert rel_err(a, e) <= TOL32, f"grad of leaf {i}: {rel_err(a, e):.3g}"


def test_no_grad_path_and_frozen_inputs_match_the_lean_path(lean_path):
    x, W, b, ads = _copy(_case("merged"), torch.float32)
    y = _mixed("merged", x, W, b, ads)
    with torch.no_grad():
        assert torch.equal(_mixed("merged", x, W, b, ads), y)
    # only B trains: the lean Function computes only what is asked
    frozen = [(A.detach(), B, s, m) for A, B, s, m in ads]
    y2 = _mixed("merged", x.detach(), W.detach(), None, frozen)
    assert rel_err(y2, y - b.detach()) <= TOL32
    assert [t.shape for t in torch.autograd.grad(y2.sum(), [B for _, B, _, _ in frozen])] == \
        [B.shape for _, B, _, _ in frozen]


def test_a_batch_of_base_only_tokens_is_the_base(lean_path):
    x, W, b, ads = _copy(_case("merged"), torch.float32)
    y = lora_linear_mixed(x, W, b, [MixedAdapter(A, B, s, 0.3) for A, B, s, _ in ads],
                          torch.full((x.shape[0] * x.shape[1],), -1), training=True, segments=GQA[2])
    assert rel_err(y, F.linear(x, W, b)) <= TOL32
    grads = torch.autograd.grad(y.sum(), [t for A, B, _, _ in ads for t in (A, B)])
    assert not any(g.any() for g in grads)


def test_adapter_without_tokens_gets_a_zero_gradient(lean_path):
    x, W, b, ads = _copy(_case("linear"), torch.float32)
    ta = torch.tensor([0, 2, -1, 0, 0, 2]).repeat_interleave(3)
    mixed = [MixedAdapter(A, B, s, 0.0) for A, B, s, _ in ads]
    y = lora_linear_mixed(x, W, b, mixed, ta)
    dA1, dB1 = torch.autograd.grad(y.sum(), [ads[1][0], ads[1][1]])
    assert not dA1.any() and not dB1.any()


# ----------------------------------------------------------------------------- memory

def test_saved_tensors_beyond_x_are_under_two_percent_of_x(lean_path):
    """K=4, T=512, in=out=256, r=16, dropout on: x, the sort order and the parameters only."""
    torch.manual_seed(0)
    T, d, r = 512, 256, 16
    x = torch.randn(T, d, requires_grad=True)
    W, b = torch.randn(d, d), torch.randn(d, requires_grad=True)
    params = [(torch.randn(r, d, requires_grad=True), torch.randn(d, r, requires_grad=True)) for _ in range(4)]
    adapters = [MixedAdapter(A, B, 2.0, 0.1) for A, B in params]
    ta = token_adapters([0, 1, 2, 3, -1, 1, 2, 0], x.shape)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear_mixed(x, W, b, adapters, ta, training=True)
    known = {t.untyped_storage().data_ptr() for t in [x, W, b] + [p for ab in params for p in ab]}
    extra = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
             if t.untyped_storage().data_ptr() not in known}
    x_bytes = x.numel() * x.element_size()
    assert sum(extra.values()) <= 0.02 * x_bytes, extra
    assert not [t for t in saved if t.numel() >= x.numel() and t.untyped_storage().data_ptr() not in known]
    y.sum().backward()  # and backward works from what was kept


def test_a_rebuildable_input_is_not_kept(lean_path):
    """lean mode (recipes): the Function keeps the recipe's tensors instead of x, with equal gradients."""
    x, W, b, ads = _copy(_case("merged"), torch.float32)
    leaves = _leaves(x, W, b, ads)[2:]
    results = []
    for register in (False, True):
        source = x.detach().requires_grad_()
        h = source * 2.0
        if register:
            recipes.register(h, lambda s: s * 2.0, source)
        saved = []
        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = _mixed("merged", h, W, b, ads, ps=(0.1, 0.0, 0.2), training=True)
        kept_h = any(t.untyped_storage().data_ptr() == h.untyped_storage().data_ptr() for t in saved)
        assert kept_h != register
        results.append((y, torch.autograd.grad(y.sum(), [source] + leaves)))
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1)
    for i, (a, e) in enumerate(zip(g1, g0)):
        assert torch.equal(a, e), f"grad of leaf {i}"


# ----------------------------------------------------------------------------- compile, torch.func, quantized

def _plain_call(x, W, b, *params, ta):
    it = iter(params)
    adapters = [MixedAdapter(A, next(it), 0.5 * (k + 1), 0.0) for k, A in enumerate(it)]
    return lora_linear_mixed(x, W, b, adapters, ta, training=True, segments=GQA[2])


def test_torch_compile_fullgraph_matches_eager():
    x, W, b, ads = _copy(_case("merged"), torch.float32)
    ta = token_adapters(ROWS, x.shape)
    params = [t for A, B, _, _ in ads for t in (A, B)]
    leaves = [x, b] + params
    eager = _plain_call(x, W, b, *params, ta=ta)
    compiled = torch.compile(_plain_call, backend="aot_eager", fullgraph=True)(x, W, b, *params, ta=ta)
    assert rel_err(compiled, eager) <= TOL32
    g = torch.randn(eager.shape)
    for a, e in zip(torch.autograd.grad(compiled, leaves, g), torch.autograd.grad(eager, leaves, g)):
        assert rel_err(a, e) <= TOL32
    torch._dynamo.reset()


def test_torch_func_grad_matches_eager():
    x, W, b, ads = _copy(_case("merged"), F64)
    ta = token_adapters(ROWS, x.shape)
    params = [t for A, B, _, _ in ads for t in (A, B)]

    def loss(params):
        return _plain_call(x, W, b, *params, ta=ta).square().sum()

    got = torch.func.grad(loss)([p.detach() for p in params])
    want = torch.autograd.grad(loss(params), params)
    for a, e in zip(got, want):
        assert rel_err(a, e) <= 1e-12


class _Bf16Packed(QuantizedBase):
    """A torch-only frozen base stored in bfloat16, computing in fp32: the quantized-base path
    without a quantization library."""

    kind, dtype, device = "test-bf16", torch.float32, torch.device("cpu")

    def __init__(self, weight):
        self.packed = weight.detach().to(torch.bfloat16)
        self.out_features, self.in_features = weight.shape

    def _kernel(self, x):
        return F.linear(x.float(), self.dequantize())

    def dequantize(self):
        return self.packed.float()


@pytest.mark.parametrize("kind", ["merged", "dora"])
def test_quantized_base_matches_the_float64_formula(kind):
    case = _case(kind)
    x, W, b, ads = _copy(case, torch.float32)
    base = _Bf16Packed(W)
    ref = (case[0], base.dequantize().to(F64), case[2], case[3])
    _assert_grads(_mixed(kind, x, base, b, ads), _leaves(x, None, b, ads)[:1] + _leaves(x, None, b, ads)[2:],
                  _reference(kind, *ref), [ref[0]] + _leaves(*ref)[2:], TOL32)


# ----------------------------------------------------------------------------- embedding and conv

def test_embedding_matches_the_float64_formula_per_token():
    gen = torch.Generator().manual_seed(0)
    num, dim = 11, 6
    W = torch.randn(num, dim, generator=gen, requires_grad=True)
    ads = [(torch.randn(r, num, generator=gen, requires_grad=True),
            torch.randn(dim, r, generator=gen, requires_grad=True), a / r) for r, a in zip(RANKS, ALPHAS)]
    idx = torch.randint(num, (len(ROWS), 4), generator=gen)
    ta = token_adapters(ROWS, (*idx.shape, 1))
    y = lora_embedding_mixed(idx, W, [MixedAdapter(A, B, s, 0.0) for A, B, s in ads], ta)
    leaves = [W] + [t for A, B, _ in ads for t in (A, B)]
    W64 = W.detach().double().requires_grad_()
    ads64 = [(A.detach().double().requires_grad_(), B.detach().double().requires_grad_(), s) for A, B, s in ads]
    ref = W64[idx.flatten()]
    for k, (A, B, s) in enumerate(ads64):
        ref = torch.where((ta == k)[:, None], naive_embedding(idx.flatten(), W64, A, B, s), ref)
    _assert_grads(y.reshape(-1, dim), leaves, ref, [W64] + [t for A, B, _ in ads64 for t in (A, B)], TOL32)



def test_embedding_scale_grad_by_freq_counts_each_adapters_own_tokens():
    """Found in review: with ``scale_grad_by_freq`` an id's frequency was counted over the whole batch (other
    adapters' and base-only rows included), so an adapter's ``A`` gradient differed from a run on its own
    rows (1.1 off). The reference: torch's own ``scale_grad_by_freq`` per adapter on its tokens, float64."""
    gen = torch.Generator().manual_seed(0)
    num, dim = 5, 6  # few ids: many repeats within and across adapters
    W = torch.randn(num, dim, generator=gen, requires_grad=True)
    ads = [(torch.randn(r, num, generator=gen, requires_grad=True),
            torch.randn(dim, r, generator=gen, requires_grad=True), a / r) for r, a in zip(RANKS, ALPHAS)]
    idx = torch.randint(num, (len(ROWS), 6), generator=gen)
    ta = token_adapters(ROWS, (*idx.shape, 1))
    y = lora_embedding_mixed(idx, W, [MixedAdapter(A, B, s, 0.0) for A, B, s in ads], ta, scale_grad_by_freq=True)
    g = torch.randn(y.shape, generator=gen)
    leaves = [W] + [t for A, B, _ in ads for t in (A, B)]
    got = torch.autograd.grad(y, leaves, g)
    flat, g64 = idx.flatten(), g.reshape(-1, dim).double()
    W64 = W.detach().double().requires_grad_()
    ref = (F.embedding(flat, W64, scale_grad_by_freq=True) * g64).sum()  # the shared base: the whole batch
    ads64 = [(A.detach().double().requires_grad_(), B.detach().double().requires_grad_(), s) for A, B, s in ads]
    for k, (A, B, s) in enumerate(ads64):
        own = ta == k
        ref = ref + (s * F.embedding(flat[own], A.t(), scale_grad_by_freq=True) @ B.t() * g64[own]).sum()
    want = torch.autograd.grad(ref, [W64] + [t for A, B, _ in ads64 for t in (A, B)])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_conv2d_matches_the_float64_formula_per_sample_with_dropout():
    gen = torch.Generator().manual_seed(0)
    c_in, c_out, kh = 3, 4, 2
    x = torch.randn(len(ROWS), c_in, 5, 5, generator=gen, requires_grad=True)
    W = torch.randn(c_out, c_in, kh, kh, generator=gen)
    b = torch.randn(c_out, generator=gen, requires_grad=True)
    ads = [(torch.randn(r, c_in * kh * kh, generator=gen, requires_grad=True),
            torch.randn(c_out, r, generator=gen, requires_grad=True), a / r) for r, a in zip(RANKS, ALPHAS)]
    ps = (0.1, 0.0, 0.3)
    conv = lambda inp, w, bias: F.conv2d(inp, w, bias, padding=1)  # noqa: E731
    torch.manual_seed(8)
    seed = draw_seed()
    torch.manual_seed(8)
    y = lora_conv_mixed(x, W, b, [MixedAdapter(A, B, s, p) for (A, B, s), p in zip(ads, ps)], torch.tensor(ROWS),
                        conv, training=True)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ads64 = [(A.detach().double().requires_grad_(), B.detach().double().requires_grad_(), s) for A, B, s in ads]
    ref = F.conv2d(x64, W.double(), b64, padding=1)
    rows = torch.tensor(ROWS)[:, None, None, None]
    for k, ((A, B, s), p) in enumerate(zip(ads64, ps)):
        mask = (keep_mask(seed, (x.shape[0], x[0].numel()), p, "cpu").double() * keep_scale(p)).view(x.shape)
        ref = torch.where(rows == k, naive_conv(x64, W.double(), b64, A, B, s, 2, mask=mask, padding=1), ref)
    _assert_grads(y, [x, b] + [t for A, B, _ in ads for t in (A, B)], ref,
                  [x64, b64] + [t for A, B, _ in ads64 for t in (A, B)], TOL32)


# ----------------------------------------------------------------------------- bad input

def _bad(**change):
    x, W, b, ads = _copy(_case("merged"), torch.float32)
    adapters = [MixedAdapter(A, B, s, 0.0) for A, B, s, _ in ads]
    kwargs = dict(x=x, weight=W, bias=b, adapters=adapters, token_adapter=token_adapters(ROWS, x.shape),
                  segments=GQA[2])
    kwargs.update(change)
    return lambda: lora_linear_mixed(**kwargs)


@pytest.mark.parametrize("change, match", [
    ({"token_adapter": torch.full((18,), 3)}, r"token_adapter values must be in \[-1, 3\).*\[3, 3\]"),
    ({"token_adapter": torch.full((18,), -2)}, r"\[-2, -2\]"),
    ({"token_adapter": torch.zeros(17, dtype=torch.long)}, "17 entries, but the input has 18 tokens"),
    ({"token_adapter": torch.zeros(18)}, "1-D integer tensor"),
    ({"adapters": []}, "at least one MixedAdapter"),
    ({"segments": None}, r"adapters\[0\]: lora_B must be"),
])
def test_bad_linear_input_is_refused_clearly(change, match):
    with pytest.raises(ValueError, match=match):
        _bad(**change)()


def test_bad_adapter_shapes_and_dropout_are_refused_clearly():
    x, W, b, ads = _copy(_case("merged"), torch.float32)
    good = [MixedAdapter(A, B, s, 0.0) for A, B, s, _ in ads]
    ta = token_adapters(ROWS, x.shape)
    wrong_in = good[:2] + [good[2]._replace(lora_A=torch.zeros(8, IN + 1))]
    with pytest.raises(ValueError, match=r"adapters\[2\].lora_A must be \(r, 7\)"):
        lora_linear_mixed(x, W, b, wrong_in, ta, segments=GQA[2])
    wrong_b = [good[0]._replace(lora_B=torch.zeros(8, 3))] + good[1:]
    with pytest.raises(ValueError, match=r"adapters\[0\]: lora_B must be"):
        lora_linear_mixed(x, W, b, wrong_b, ta, segments=GQA[2])
    with pytest.raises(ValueError, match=r"adapters\[1\].dropout_p must be in \[0, 1\), got 1.0"):
        lora_linear_mixed(x, W, b, [good[0], good[1]._replace(dropout_p=1.0), good[2]], ta, segments=GQA[2])


@pytest.mark.parametrize("rows, shape, match", [
    ([0, 1, 2], (4, 5, 7), "has 4 rows .* but 3 row adapters"),
    ([0, 1, 2], (10, 7), "10 tokens, not a multiple of the 3 rows"),
    ([], (6, 7), "at least one row"),
    ([0, 1.0], (4, 7), "integer adapter indices"),
])
def test_token_adapters_refuses_rows_that_do_not_divide_the_tokens(rows, shape, match):
    with pytest.raises(ValueError, match=match):
        token_adapters(rows, shape)


def test_token_adapters_reads_a_flattened_input_batch_major():
    assert token_adapters([2, -1], (2, 3, 5)).tolist() == [2, 2, 2, -1, -1, -1]
    assert token_adapters(torch.tensor([2, -1]), (6, 5)).tolist() == [2, 2, 2, -1, -1, -1]


def test_autocast_computes_in_its_dtype_and_returns_gradients_in_the_parameters(lean_path):
    case = _case("merged")
    x, W, b, ads = _copy(case, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _mixed("merged", x, W, b, ads)
    assert y.dtype == torch.bfloat16
    leaves = _leaves(x, W, b, ads)
    grads = torch.autograd.grad(y.float().sum(), leaves)
    assert all(g.dtype == torch.float32 for g in grads)
    ref = _reference("merged", *case)
    want = torch.autograd.grad(ref.sum(), _leaves(*case))
    assert rel_err(y, ref) <= 3e-2
    assert all(rel_err(a, e) <= 3e-2 for a, e in zip(grads, want))


def test_meta_tensors_give_the_shape():
    x = torch.empty(len(ROWS), 3, IN, device="meta")
    adapters = [MixedAdapter(torch.empty(2 * r, IN, device="meta"), torch.empty(8, r, device="meta"), 1.0, 0.1)
                for r in RANKS]
    y = lora_linear_mixed(x, torch.empty(11, IN, device="meta"), None, adapters,
                          token_adapters(ROWS, x.shape, "meta"), training=True, segments=GQA[2])
    assert y.shape == (len(ROWS), 3, 11) and y.is_meta
