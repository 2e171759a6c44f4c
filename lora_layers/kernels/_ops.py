"""Launchers and the autograd Function behind ``lora_layers.kernels.lora_linear``.

Private and imported lazily: importing it imports triton (see
``_triton_kernels`` for when the interpreter is used).
"""
import os

import torch
import torch.nn.functional as F
import triton

from . import _triton_kernels as K
from . import draw_seed

INTERPRETED = K.INTERPRETED

#: Environment variable choosing how the base GEMMs run under the triton backend.
GEMM_ENV = "LORA_LAYERS_TRITON_GEMM"
#: "fused": the up-projection is folded into a Triton base GEMM (forward) and the
#: LoRA term into a Triton dx GEMM (backward). "cublas": torch/cuBLAS runs the
#: base GEMMs, then the LoRA terms are added in place (addmm_ in forward, a
#: Triton epilogue kernel for dx). Neither has been timed on a GPU yet; see
#: docs/kernels.md and benchmarks/bench_kernels.py, which times both.
GEMM_MODES = ("fused", "cublas")
DEFAULT_GEMM_MODE = "fused"

# Interpreter blocks are small so that the tiny test shapes still cover
# several tiles, several K iterations and several R chunks (BLOCK_R_MAX=16).
_INTERP = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
_INTERP_BLOCK_R_MAX = 16
_GPU_BLOCK_R_MAX = 64


def gemm_mode():
    """The base-GEMM strategy from ``LORA_LAYERS_TRITON_GEMM`` (default "fused")."""
    mode = os.environ.get(GEMM_ENV, DEFAULT_GEMM_MODE).strip().lower() or DEFAULT_GEMM_MODE
    if mode not in GEMM_MODES:
        raise ValueError(f"{GEMM_ENV} must be one of {GEMM_MODES}, got {mode!r}")
    return mode


def _block_r(R):
    cap = _INTERP_BLOCK_R_MAX if INTERPRETED else _GPU_BLOCK_R_MAX
    # tl.dot needs every dimension >= 16.
    return max(16, min(triton.next_power_of_2(R), cap))


def _dot_flags(dtype):
    dot_f32 = INTERPRETED and dtype == torch.bfloat16
    prec = "ieee" if dtype == torch.float32 else "tf32"
    return dict(DOT_F32=dot_f32, PREC=prec)


# ---------------------------------------------------------------------------
# Compiled-mode autotuning. In the interpreter autotune with several configs
# fails, so there the raw kernels are launched with _INTERP block sizes.
# ---------------------------------------------------------------------------
def _cfg(bm, bn, bk, stages, warps, group=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group),
                         num_stages=stages, num_warps=warps)


_GEMM_CONFIGS = [_cfg(128, 256, 64, 3, 8), _cfg(128, 128, 64, 4, 8), _cfg(128, 128, 64, 4, 4),
                 _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4)]
_TUNED = {}


def _tuned(name):
    if name in _TUNED:
        return _TUNED[name]
    if name == "fwd":
        fn = triton.autotune(_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "R"])(K._fwd_kernel)
    elif name == "bwd_x":
        # dx may be accumulated in place (DX_MODE=2) and dA is atomically
        # accumulated, so every tuning run must start from the same buffers.
        fn = triton.autotune(_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "R"],
                             reset_to_zero=["da_ptr"], restore_value=["dx_ptr"])(K._bwd_x_kernel)
    elif name == "down":
        cfgs = [triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_stages=s, num_warps=w)
                for bm, bk, s, w in [(64, 64, 4, 4), (128, 64, 4, 4), (64, 128, 3, 4), (32, 128, 4, 4)]]
        fn = triton.autotune(cfgs, key=["T_BUCKET", "K", "R"])(K._down_kernel)
    elif name == "bwd_g":
        cfgs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_stages=s, num_warps=w)
                for bm, bn, s, w in [(64, 64, 4, 4), (64, 128, 3, 4), (32, 128, 4, 4), (128, 64, 3, 8)]]
        fn = triton.autotune(cfgs, key=["M_BUCKET", "N", "R"], reset_to_zero=["db_ptr"])(K._bwd_g_kernel)
    else:  # pragma: no cover - internal misuse
        raise KeyError(name)
    _TUNED[name] = fn
    return fn


def _bucket(tokens):
    """The autotune key for a token count: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(int(tokens)))


def _keep_scale(p):
    return 1.0 / (1.0 - p) if p > 0 else 1.0


def _launch(name, grid_fn, interp_meta, *args, **kwargs):
    if INTERPRETED:
        kernel = {"fwd": K._fwd_kernel, "bwd_x": K._bwd_x_kernel,
                  "down": K._down_kernel, "bwd_g": K._bwd_g_kernel}[name]
        kernel[grid_fn(interp_meta)](*args, **kwargs, **interp_meta)
    else:
        _tuned(name)[grid_fn](*args, **kwargs)


# ---------------------------------------------------------------------------
# Segment metadata (MergedLinear splits), cached per (segments, out, device).
# ---------------------------------------------------------------------------
_SEG_CACHE = {}


def _segment_columns(segments, out_features, r, device):
    """Per output column: which adapter adds into it (-1: none) and its row in the
    stacked lora_B; per split: its (out_start, out_end), flattened."""
    key = (segments, r, str(device))
    hit = _SEG_CACHE.get(key)
    if hit is None:
        col_seg = torch.full((out_features,), -1, dtype=torch.int32)
        col_brow = torch.zeros((out_features,), dtype=torch.int32)
        bounds = torch.zeros((2 * segments.count,), dtype=torch.int32)
        for j, blk in enumerate(segments.blocks(r)):
            col_seg[blk.out0:blk.out1] = j
            col_brow[blk.out0:blk.out1] = torch.arange(blk.b0, blk.b1, dtype=torch.int32)
            bounds[2 * j], bounds[2 * j + 1] = blk.out0, blk.out1
        hit = (col_seg.to(device), col_brow.to(device), bounds.to(device))
        if len(_SEG_CACHE) > 256:  # bounded: distinct layer layouts are few
            _SEG_CACHE.clear()
        _SEG_CACHE[key] = hit
    return hit


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def keep_mask(seed, shape, p, device):
    """Boolean keep-mask (True = kept) the kernels use for an input of ``shape``."""
    shape = tuple(shape)
    k = shape[-1]
    t = 1
    for d in shape[:-1]:
        t *= d
    out = torch.empty((t, k), dtype=torch.int8, device=device)
    if t and k:
        grid = (triton.cdiv(t, 32), triton.cdiv(k, 64))
        K._keep_mask_kernel[grid](out, seed, float(p), t, k, BLOCK_M=32, BLOCK_K=64)
    return out.bool().reshape(shape)


def down_proj(x, lora_A, seed, p):
    """u = drop(x) A^T in x's dtype (fp32 accumulation)."""
    T, Kdim = x.shape
    R = lora_A.shape[0]
    u = torch.empty((T, R), dtype=x.dtype, device=x.device)
    br = _block_r(R)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]), triton.cdiv(R, br))  # noqa: E731
    _launch("down", grid, dict(BLOCK_M=_INTERP["BLOCK_M"], BLOCK_K=_INTERP["BLOCK_K"]),
            x, lora_A, u, T, Kdim, R, _bucket(T), x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
            u.stride(0), u.stride(1), seed, float(p), _keep_scale(p),
            HAS_DROPOUT=p > 0, BLOCK_R=br, **_dot_flags(x.dtype))
    return u


def _w_strides(weight, fan_in_fan_out):
    # Logical W is (out, in); a fan_in_fan_out weight is stored (in, out).
    if fan_in_fan_out:
        return weight.stride(1), weight.stride(0)
    return weight.stride(0), weight.stride(1)


def forward_fused(x, weight, bias, u, lora_B, scaling, segments, fan_in_fan_out, r):
    """y = x W^T + b + s u B^T with the LoRA term seeding the GEMM accumulator."""
    T, Kdim = x.shape
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    R = u.shape[1]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    col_seg, col_brow, _ = (_segment_columns(segments, N, r, x.device) if segments is not None
                            else (u, u, u))  # unused placeholders when HAS_SEG=False
    swn, swk = _w_strides(weight, fan_in_fan_out)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)  # noqa: E731
    _launch("fwd", grid, dict(_INTERP),
            x, weight, bias if bias is not None else y, u, lora_B, col_seg, col_brow, y,
            T, N, Kdim, R, r, _bucket(T), float(scaling),
            x.stride(0), x.stride(1), swn, swk, u.stride(0), u.stride(1),
            lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, HAS_SEG=segments is not None,
            BLOCK_R=_block_r(R), **_dot_flags(x.dtype))
    return y


def forward_cublas(x, weight, bias, u, lora_B, scaling, segments, fan_in_fan_out, r):
    """cuBLAS base GEMM, then the LoRA term added in place (no T x out temporary)."""
    w = weight.t() if fan_in_fan_out else weight
    y = F.linear(x, w, bias if bias is None else bias.to(x.dtype))  # supports() lets the bias dtype differ
    b = lora_B.to(x.dtype)
    if segments is None:
        y.addmm_(u, b.t(), alpha=scaling)
        return y
    for blk in segments.blocks(r):
        y[:, blk.out0:blk.out1].addmm_(u[:, blk.a0:blk.a1], b[blk.b0:blk.b1].t(), alpha=scaling)
    return y


def backward_g(g, u, lora_B, scaling, segments, r, need_du, need_db):
    """One pass over g: du = s g B (g's dtype) and/or dB = s g^T u (fp32)."""
    T, N = g.shape
    R = u.shape[1]
    dev = g.device
    du = torch.empty((T, R), dtype=g.dtype, device=dev) if need_du else torch.empty(1, device=dev)
    db = (torch.zeros(lora_B.shape, dtype=torch.float32, device=dev) if need_db
          else torch.zeros((1, 1), dtype=torch.float32, device=dev))
    col_seg, col_brow, bounds = (_segment_columns(segments, N, r, dev) if segments is not None
                                 else (u, u, u))  # unused placeholders when HAS_SEG=False
    br = _block_r(R)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]), triton.cdiv(R, br))  # noqa: E731
    _launch("bwd_g", grid, dict(BLOCK_M=_INTERP["BLOCK_M"], BLOCK_N=_INTERP["BLOCK_N"]),
            g, u, lora_B, col_seg, col_brow, bounds, du, db, T, N, R, r, _bucket(T), float(scaling),
            g.stride(0), g.stride(1), u.stride(0), u.stride(1), lora_B.stride(0), lora_B.stride(1),
            du.stride(0) if need_du else 0, du.stride(1) if need_du else 0, db.stride(0), db.stride(1),
            HAS_SEG=segments is not None, COMPUTE_DU=need_du, COMPUTE_DB=need_db,
            BLOCK_R=br, **_dot_flags(g.dtype))
    return (du if need_du else None), (db if need_db else None)


def backward_x(g, weight, du, lora_A, x, seed, p, fan_in_fan_out, need_dx, need_da, mode):
    """dx = g W + mask * (du A)/(1-p) and/or dA = du^T drop(x) (fp32), one kernel."""
    T, N = g.shape
    Kdim = x.shape[1]
    R = du.shape[1]
    dev = g.device
    dx_mode = 0
    if need_dx:
        if mode == "cublas":
            dx = g.mm(weight.t() if fan_in_fan_out else weight)
            dx_mode = 2
        else:
            dx = torch.empty((T, Kdim), dtype=x.dtype, device=dev)
            dx_mode = 1
    else:
        dx = torch.empty((1, 1), dtype=x.dtype, device=dev)
    da = (torch.zeros(lora_A.shape, dtype=torch.float32, device=dev) if need_da
          else torch.zeros((1, 1), dtype=torch.float32, device=dev))
    swn, swk = _w_strides(weight, fan_in_fan_out)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]) * triton.cdiv(Kdim, m["BLOCK_K"]),)  # noqa: E731
    _launch("bwd_x", grid, dict(_INTERP),
            g, weight, du, lora_A, x, dx, da, T, N, Kdim, R, _bucket(T), seed, float(p), _keep_scale(p),
            g.stride(0), g.stride(1), swn, swk, du.stride(0), du.stride(1),
            lora_A.stride(0), lora_A.stride(1), x.stride(0), x.stride(1),
            dx.stride(0), dx.stride(1), da.stride(0), da.stride(1),
            DX_MODE=dx_mode, COMPUTE_DA=need_da, HAS_DROPOUT=p > 0,
            BLOCK_R=_block_r(R), **_dot_flags(x.dtype))
    return (dx if need_dx else None), (da if need_da else None)


class LoRALinearFunction(torch.autograd.Function):
    """Autograd wrapper over the kernels; x is already flattened to (T, in).

    Saves x (already alive), u (T x R), the parameters and the integer seed: never the mask.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, fan_in_fan_out, segments):
        mode = gemm_mode()
        seed = draw_seed() if p > 0 else 0
        R = lora_A.shape[0]
        r = R // segments.count if segments is not None else R
        u = down_proj(x, lora_A, seed, p)
        fwd = forward_fused if mode == "fused" else forward_cublas
        y = fwd(x, weight, bias, u, lora_B, scaling, segments, fan_in_fan_out, r)
        # bias (a parameter, alive anyway) is read only by a double backward
        ctx.save_for_backward(x, u, weight, lora_A, lora_B, bias)
        ctx.conf = (scaling, p, seed, fan_in_fan_out, segments, r, mode)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' results would have no graph
            return _differentiable_backward(ctx, g)
        x, u, weight, lora_A, lora_B, _ = ctx.saved_tensors
        scaling, p, seed, fan_in_fan_out, segments, r, mode = ctx.conf
        need_dx, need_dw, need_db, need_da, need_dB = ctx.needs_input_grad[:5]
        g = g.to(x.dtype)
        dx = dw = dbias = da = dB = None
        if need_dx or need_da or need_dB:
            du, dB32 = backward_g(g, u, lora_B, scaling, segments, r,
                                  need_du=need_dx or need_da, need_db=need_dB)
            if dB32 is not None:
                dB = dB32.to(lora_B.dtype)
            if need_dx or need_da:
                dx, da32 = backward_x(g, weight, du, lora_A, x, seed, p, fan_in_fan_out,
                                      need_dx, need_da, mode)
                if da32 is not None:
                    da = da32.to(lora_A.dtype)
        if need_dw:  # a trainable base weight is rare with LoRA: plain torch is enough
            dw = (x.t().mm(g) if fan_in_fan_out else g.t().mm(x)).to(weight.dtype)
        if need_db:
            dbias = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, dbias, da, dB, None, None, None, None


def _differentiable_backward(ctx, g):
    """The gradients as differentiable functions of the inputs (the torch path's
    plain-op form, with this forward's Philox mask), so double backward is exact."""
    from ..core.autograd import _composite  # lazy: the core imports this package lazily too
    from ..core.segments import Segments

    x, _, weight, lora_A, lora_B, bias = ctx.saved_tensors
    scaling, p, seed, fan_in_fan_out, segments, r, _ = ctx.conf
    segs = segments if segments is not None else Segments.full(g.shape[1])
    drop = None
    if p > 0:
        keep = keep_mask(seed, x.shape, p, x.device)
        drop = lambda t: torch.where(keep, t, 0.0) * _keep_scale(p)  # noqa: E731
    inputs = (x, weight, bias, lora_A, lora_B)
    wanted = [i for i, need in enumerate(ctx.needs_input_grad[:5]) if need]
    y = _composite(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out, segs.blocks(r), drop)
    grads = torch.autograd.grad(y, [inputs[i] for i in wanted], g, create_graph=True, allow_unused=True)
    out = [None] * 9
    for i, grad in zip(wanted, grads):
        out[i] = grad
    return tuple(out)
