"""Independent float64 reference formulas for the LoRA layers, plus comparison helpers.

Nothing here imports lora_layers: every formula is written from the maths
(``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` and friends) with plain torch ops in
float64, so the tests compare the library against something it cannot share a
bug with. Gradients of the reference come from autograd on these formulas.
"""
import torch
import torch.nn.functional as F

F64 = torch.float64

# Norm-relative tolerances per compute dtype (the error of a rounded matmul
# chain relative to the result's norm).
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_err(actual, expected) -> float:
    """||actual - expected|| / max(||expected||, tiny), computed in float64."""
    a, e = actual.detach().to(F64), expected.detach().to(F64)
    return float((a - e).norm() / e.norm().clamp_min(1e-12))


def assert_rel_close(actual, expected, dtype, what="", factor=1.0):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({dtype})"


def leaf64(t):
    """A float64 leaf copy that requires grad."""
    return t.detach().to(F64).requires_grad_(True)


def delta_merged(A, B, split_sizes, enable, r):
    """Full ΔW (out, in) of a fused layer, zero rows for disabled splits (reference only)."""
    out = sum(split_sizes)
    rows, a, b, o = [], 0, 0, 0
    for size, on in zip(split_sizes, enable):
        if on:
            rows.append(B[b:b + size] @ A[a:a + r])
            a, b = a + r, b + size
        else:
            rows.append(A.new_zeros(size, A.shape[1]))
        o += size
    assert o == out
    return torch.cat(rows, 0)


def splits_of_segments(segments, out_features):
    """``(split_sizes, enable)`` of a fused layer given as the kernels' segments.

    ``segments`` are the ascending ``(start, end)`` output ranges of the enabled
    splits; each gap between them (and before/after them) becomes one disabled split.
    """
    flat = [0] + [bound for segment in segments for bound in segment] + [out_features]
    assert all(a <= b for a, b in zip(flat, flat[1:])), f"segments must ascend within {out_features}: {segments}"
    bounds = sorted(set(flat))
    splits = list(zip(bounds[:-1], bounds[1:]))
    enabled = {tuple(segment) for segment in segments}
    return [end - start for start, end in splits], [split in enabled for split in splits]


def naive_linear(x, W, b, A, B, s, fan_in_fan_out=False, mask=None, split_sizes=None, enable=None):
    """y = x W_effᵀ + b + s · (x ⊙ mask) ΔWᵀ, with ΔW = B A (or per split for fused layers).

    ``mask`` is dropout's scaled keep mask (0 or 1/(1-p)); ``split_sizes``/``enable``
    describe a fused layer as ``MergedLinear`` does (see :func:`splits_of_segments`).
    """
    W_eff = W.t() if fan_in_fan_out else W
    if split_sizes is None:
        dW = B @ A
    else:
        dW = delta_merged(A, B, split_sizes, enable, A.shape[0] // sum(enable))
    xd = x if mask is None else x * mask
    y = x @ W_eff.t() + s * (xd @ dW.t())
    return y if b is None else y + b


def naive_embedding(idx, W, A, B, s):
    """W[idx] + s · (Aᵀ[idx]) Bᵀ."""
    return W[idx] + s * (A.t()[idx] @ B.t())


def naive_conv(x, W, b, A, B, s, dims, mask=None, **conv_kwargs):
    """conv(x, W) + s · conv(x ⊙ mask, (B A).view(W.shape)) + b."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    dW = (B @ A).view(W.shape)
    xd = x if mask is None else x * mask
    return conv(x, W, b, **conv_kwargs) + s * conv(xd, dW, None, **conv_kwargs)


def bits(t):
    """Bit pattern view for bitwise equality checks."""
    return t.detach().view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def bit_equal(a, b) -> bool:
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def naive_dora(x, W, b, A, B, m, s, split_sizes=None, enable=None, mask=None, fan_in_fan_out=False):
    """DoRA: (m / ‖W + s·ΔW‖_row) ⊙ (x Wᵀ + s·(x ⊙ mask) ΔWᵀ) + b on the adapted rows, the norm detached.

    ``m`` holds one entry per adapted row (all rows for a plain layer, the enabled
    splits' rows in order for a fused one); the other rows are the base's. A row whose
    norm is 0 (a pruned neuron) has the factor 1, whatever ``m`` (lora_layers' convention;
    PEFT gives 0/0 = NaN there).
    """
    W_eff = W.t() if fan_in_fan_out else W
    if split_sizes is None:
        dW, rows = B @ A, torch.ones(W_eff.shape[0], dtype=torch.bool)
    else:
        dW = delta_merged(A, B, split_sizes, enable, A.shape[0] // sum(enable))
        rows = torch.cat([torch.full((size,), bool(on)) for size, on in zip(split_sizes, enable)])
    norm = (W_eff + s * dW).norm(dim=1).detach()
    m_full = torch.ones(W_eff.shape[0], dtype=m.dtype).masked_scatter(rows, m)
    zero = norm == 0
    # The denominator is made safe on zero rows so that where()'s unused branch has no 0/0 in backward.
    scale = torch.where(rows & ~zero, m_full / norm.masked_fill(zero, 1), torch.ones_like(norm))
    xd = x if mask is None else x * mask
    y = (x @ W_eff.t() + s * (xd @ dW.t())) * scale
    return y if b is None else y + b
