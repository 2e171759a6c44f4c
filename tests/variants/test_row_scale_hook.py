"""The core's row-scale hook (core/row_scale.py): any variant that rescales the adapted rows
gets the LoRA forward, the lean backward, the plain-op path and double backward from the core.

The references are float64 formulas written here from the maths, y = c ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b
on the adapted rows (c = 1 elsewhere), differentiated by autograd.
"""
import pytest
import torch

from lora_layers.core import functional as cf
from lora_layers.core.row_scale import RowScale, expand_rows, gather_rows
from lora_layers.core.segments import Segments
from lora_layers.variants.dora import DoRAScale
from _naive_lora import F64, assert_rel_close, leaf64, naive_dora

SEGMENTS = [(0, 5), (9, 16)]


class LearnedScale(RowScale):
    """c = θ: a trainable factor per adapted row (dL/dθ = z)."""

    def __init__(self, theta):
        self.theta = theta
        self.prepared = []

    def prepare(self, weight, lora_A, lora_B, scaling, segments, *, fan_in_fan_out, rows):
        self.prepared.append((segments, rows))
        return self.theta, None

    def factor(self, theta, const):
        return theta

    def param_grad(self, theta, const, z):
        return z.to(theta.dtype)


class FixedScale(RowScale):
    """c = a constant vector (nothing trains)."""

    def __init__(self, c):
        self.c = c

    def prepare(self, weight, lora_A, lora_B, scaling, segments, *, fan_in_fan_out, rows):
        return None, self.c

    def factor(self, param, c):
        return c

    def param_grad(self, param, c, z):  # pragma: no cover - never asked: no parameter
        raise AssertionError("no parameter, no gradient")


def tensors(segments, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    rows = 16 if segments is None else sum(b - a for a, b in segments)
    R = 3 * (1 if segments is None else len(segments))
    return (torch.randn(2, 7, 12, generator=g, dtype=dtype), torch.randn(16, 12, generator=g, dtype=dtype),
            torch.randn(16, generator=g, dtype=dtype), torch.randn(R, 12, generator=g, dtype=dtype),
            torch.randn(rows, 3, generator=g, dtype=dtype), torch.rand(rows, generator=g, dtype=dtype) + 0.5)


def reference(x, W, b, A, B, c, s, segments):
    """float64: c ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b on the adapted rows, x Wᵀ + b elsewhere."""
    spans = [(0, 16)] if segments is None else segments
    base = x @ W.t()
    lora = torch.zeros_like(base)
    factor = torch.ones(16, dtype=c.dtype)
    r, k = A.shape[0] // len(spans), 0
    for j, (o0, o1) in enumerate(spans):
        piece = (x @ A[j * r:(j + 1) * r].t()) @ B[k:k + o1 - o0].t() * s
        lora = torch.cat([lora[..., :o0], piece, lora[..., o1:]], -1)
        factor = torch.cat([factor[:o0], c[k:k + o1 - o0], factor[o1:]])
        k += o1 - o0
    return (base + lora) * factor + b


@pytest.mark.parametrize("segments", [None, SEGMENTS])
def test_a_learned_row_scale_gives_the_formula_and_its_gradients(segments):
    x, W, b, A, B, theta = (t.requires_grad_() for t in tensors(segments))
    hook = LearnedScale(theta)
    y = cf.lora_linear(x, W, b, A, B, 0.5, segments=segments, row_scale=hook)
    rows = 16 if segments is None else 12
    assert hook.prepared == [(None if segments is None else tuple(segments), rows)]
    leaves64 = [leaf64(t) for t in (x, W, b, A, B, theta)]
    y_ref = reference(*leaves64[:5], leaves64[5], 0.5, segments)
    assert_rel_close(y, y_ref, torch.float32, "y")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, [x, W, b, A, B, theta], g)
    want = torch.autograd.grad(y_ref, leaves64, g.to(F64))
    for name, a, e in zip(["x", "W", "b", "A", "B", "theta"], got, want):
        assert_rel_close(a, e, torch.float32, f"d{name}")


@pytest.mark.parametrize("segments", [None, SEGMENTS])
def test_a_learned_row_scale_on_the_plain_op_path_and_in_double_backward(segments):
    x, W, b, A, B, theta = tensors(segments, torch.float64)
    x.requires_grad_()

    def loss(theta):
        return cf.lora_linear(x, W, b, A, B, 0.5, segments=segments, row_scale=LearnedScale(theta)).square().sum()

    got = torch.func.grad(loss)(theta)  # torch.func: the plain-op path
    theta64 = leaf64(theta)
    want, = torch.autograd.grad(reference(x.detach(), W, b, A, B, theta64, 0.5, segments).square().sum(), theta64)
    assert_rel_close(got, want, torch.float64, "dtheta (torch.func)")
    # A gradient penalty: d/dθ ‖dL/dx‖², through the Function's differentiable backward.
    theta_leaf = theta.clone().requires_grad_()
    y = cf.lora_linear(x, W, b, A, B, 0.5, segments=segments, row_scale=LearnedScale(theta_leaf))
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    got, = torch.autograd.grad(gx.square().sum(), theta_leaf)
    x64 = leaf64(x)
    gx_ref, = torch.autograd.grad(reference(x64, W, b, A, B, theta64, 0.5, segments).square().sum(), x64,
                                  create_graph=True)
    want, = torch.autograd.grad(gx_ref.square().sum(), theta64)
    assert_rel_close(got, want, torch.float64, "double backward")


def test_a_fixed_row_scale_with_dropout():
    x, W, b, A, B, c = tensors(SEGMENTS)
    A.requires_grad_()
    B.requires_grad_()
    from lora_layers.core.dropout import draw_seed, dropout_mask

    torch.manual_seed(7)
    seed = draw_seed()
    torch.manual_seed(7)
    y = cf.lora_linear(x, W, b, A, B, 0.5, 0.25, True, segments=SEGMENTS, row_scale=FixedScale(c))
    mask = dropout_mask(seed, x.reshape(-1, 12), 0.25).view(x.shape).to(F64)
    A64, B64 = leaf64(A), leaf64(B)
    lora_in = x.to(F64) * mask
    base = reference(x.to(F64), W.to(F64), b.to(F64), A64 * 0, B64 * 0, c.to(F64), 0.5, SEGMENTS)
    y_ref = base + reference(lora_in, W.to(F64) * 0, b.to(F64) * 0, A64, B64, c.to(F64), 0.5, SEGMENTS)
    assert_rel_close(y, y_ref, torch.float32, "y")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    for name, a, e in zip("AB", torch.autograd.grad(y, [A, B], g), torch.autograd.grad(y_ref, [A64, B64], g.to(F64))):
        assert_rel_close(a, e, torch.float32, f"d{name}")


@pytest.mark.parametrize("segments", [None, SEGMENTS])
def test_doras_hook_gives_doras_formula_and_magnitude_gradient(segments):
    x, W, b, A, B, m = (t.requires_grad_() for t in tensors(segments))
    y = cf.lora_linear(x, W, b, A, B, 0.5, segments=segments, row_scale=DoRAScale(m))
    split = {}
    if segments is not None:
        split = {"split_sizes": [5, 4, 7], "enable": [True, False, True]}
    leaves64 = [leaf64(t) for t in (x, W, b, A, B, m)]
    x64, W64, b64, A64, B64, m64 = leaves64
    y_ref = naive_dora(x64, W64.detach(), b64, A64, B64, m64, 0.5, **split)
    assert_rel_close(y, y_ref, torch.float32, "y")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, [x, A, B, m], g)
    want = torch.autograd.grad(y_ref, [x64, A64, B64, m64], g.to(F64))
    for name, a, e in zip(["x", "A", "B", "m"], got, want):
        assert_rel_close(a, e, torch.float32, f"d{name}")


def test_dora_hook_checks_the_magnitude_shape():
    x, W, b, A, B, _ = tensors(None)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(16,\)"):
        cf.lora_linear(x, W, b, A, B, 0.5, row_scale=DoRAScale(torch.ones(15)))


def test_expand_rows_and_gather_rows_place_the_adapted_rows():
    blocks = Segments(16, ((9, 16), (0, 5))).blocks(2)  # lora_B order differs from the output order
    factor = torch.arange(1.0, 13.0)  # rows 9..15 are factor[0:7], rows 0..4 are factor[7:12]
    full = expand_rows(factor, blocks, 16, torch.float64)
    want = torch.ones(16, dtype=torch.float64)
    want[9:16], want[0:5] = factor[:7].double(), factor[7:].double()
    assert torch.equal(full, want)
    assert torch.equal(gather_rows(full, blocks), factor.double())
