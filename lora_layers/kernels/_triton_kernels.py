"""Triton kernels for the fused LoRA linear layer (private; imported lazily).

Importing this module imports triton. Whether the kernels run compiled (CUDA)
or in triton's CPU interpreter is fixed when the ``@triton.jit`` decorators
run, i.e. by ``TRITON_INTERPRET`` at the moment this module is first imported.

Notation used throughout: x is (T, K) with K = in_features, W is (N, K) with
N = out_features (strides passed separately, so ``fan_in_fan_out`` weights are
just a transposed view), A is (R, K), u = drop(x) A^T is (T, R), B is
(sum of enabled slice sizes, r), g = dL/dy is (T, N).

Segments (MergedLinear splits) are described per output column by two int32
vectors: ``col_seg[c]`` is the index j of the split that owns column c (-1 when
the split has no adapter) and ``col_brow[c]`` is the row of B that feeds it,
and per split by ``seg_bounds[2j], seg_bounds[2j+1]``, its column range.
Split j reads u columns [j*r, (j+1)*r). The LoRA dots run one split at a
time over the splits a tile touches (usually one) and each split's result is
selected onto its own columns with ``tl.where``: a single dot against a B tile
that is zero outside each split would be cheaper to write but turns an Inf or
NaN of one split into NaN in every other column (Inf * 0), which the torch
path does not.

The dropout mask is ``tl.rand(seed, t * K + k) >= p`` for element (t, k) of the
flattened x; it is a pure function of (seed, index), so backward regenerates
it instead of storing it. Kept values are scaled by ``keep_scale``, 1/(1-p)
computed by the launcher in float64: compiled kernels receive float arguments
as fp32, and 1/(1-p) from an fp32 p is off by about 1e-6 relative at p=0.99.

``T_BUCKET``/``M_BUCKET`` are unused in the kernel bodies: they exist as the
autotune key in place of the token count (which changes with every batch of
variable-length sequences), so a new length reuses the tuning of its bucket.
"""
import triton
import triton.language as tl

try:  # triton >= 3.2 keeps its settings in knobs; older ones only read the env
    from triton import knobs as _knobs

    INTERPRETED = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # pragma: no cover - depends on triton version
    import os

    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mm(a, b, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    # The interpreter's bf16 dot is wrong, so DOT_F32 upcasts there; PREC is
    # "ieee" for fp32 inputs so results match torch's default (no TF32).
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _keep_mask(seed, rows, cols, K, p):
    # int64 offsets: T * in_features passes 2**31 at long sequence lengths.
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    return tl.rand(seed, offs) >= p


@triton.jit
def _grouped_pid(num_m, num_n, GROUP_M: tl.constexpr):
    """Map the 1-D program id to a (row tile, column tile) pair, GROUP_M row
    tiles at a time, so a band of rows stays hot in L2 while columns stream."""
    pid = tl.program_id(0)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_rows, (pid % group) // group_rows


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_N) tile of an (M, N) output, in _grouped_pid's order:
    its row and column indices, their in-bounds masks, and the rows as int64 (for offsets)."""
    pid_m, pid_n = _grouped_pid(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, rows < M, cols < N, rows.to(tl.int64)


@triton.jit
def _expanded_b(b_ptr, stride_bn, stride_br, col_seg_ptr, col_brow_ptr,
                cols, qs, N, r, HAS_SEG: tl.constexpr):
    """Load the (len(cols), len(qs)) tile E with E[c, q] = B[brow(c), q - seg(c)*r]
    inside column c's own r-block and 0 elsewhere (see the module docstring)."""
    col_ok = cols < N
    if HAS_SEG:
        seg = tl.load(col_seg_ptr + cols, mask=col_ok, other=-1)
        brow = tl.load(col_brow_ptr + cols, mask=col_ok, other=0)
    else:
        seg = tl.zeros_like(cols)
        brow = cols
    k = qs[None, :] - (seg * r)[:, None]
    ok = (seg >= 0)[:, None] & (k >= 0) & (k < r) & col_ok[:, None]
    ptrs = b_ptr + brow[:, None].to(tl.int64) * stride_bn + k * stride_br
    return tl.load(ptrs, mask=ok, other=0.0), ok, brow, k


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(out_ptr, seed, p, T, K,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, rows, cols, K, p)
    ok = (rows < T)[:, None] & (cols < K)[None, :]
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=ok)


@triton.jit(do_not_specialize=["seed", "T_BUCKET"])
def _down_kernel(x_ptr, a_ptr, u_ptr, T, K, R, T_BUCKET,
                 stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur,
                 seed, p, keep_scale,
                 HAS_DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """u[T, R] = drop(x) A^T, one pass over x, mask generated in registers."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    qs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < T
    q_ok = qs < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, rows, ks, K, p), x, 0.0)
        a = tl.load(a_ptr + qs[None, :] * stride_ar + ks[:, None] * stride_ak,
                    mask=q_ok[None, :] & k_ok[:, None], other=0.0).to(x.dtype)
        acc += _mm(x, a, DOT_F32, PREC)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(u_ptr + rows.to(tl.int64)[:, None] * stride_um + qs[None, :] * stride_ur,
             acc.to(u_ptr.dtype.element_ty), mask=row_ok[:, None] & q_ok[None, :])


@triton.jit(do_not_specialize=["M_BUCKET"])
def _fwd_kernel(x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, col_seg_ptr, col_brow_ptr, y_ptr,
                M, N, K, R, r, M_BUCKET, scaling,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur,
                stride_bn, stride_br, stride_ym, stride_yn,
                HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """y = s * u B^T (accumulator seed) + x W^T + b: the up-projection rides in
    the base GEMM, so y is written exactly once."""
    rows, cols, row_ok, col_ok, rows64 = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # One dot per split present in the tile (the whole of R without segments),
    # each kept only on its own columns: a dot against a B tile that is zero
    # outside a split would turn an Inf/NaN in u into NaN everywhere (Inf * 0).
    if HAS_SEG:
        seg = tl.load(col_seg_ptr + cols, mask=col_ok, other=-1)
        brow = tl.load(col_brow_ptr + cols, mask=col_ok, other=0)
        j_first = tl.min(tl.where(seg >= 0, seg, 2147483647), axis=0)
        j_last = tl.max(seg, axis=0)
        width = r
    else:
        seg = tl.zeros_like(cols)
        brow = cols
        j_first = 0
        j_last = 0
        width = R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(j_first, j_last + 1):
        mine = (seg == j) & col_ok
        for q0 in range(0, width, BLOCK_R):
            qk = q0 + tl.arange(0, BLOCK_R)
            qk_ok = qk < width
            u = tl.load(u_ptr + rows64[:, None] * stride_um + (j * width + qk)[None, :] * stride_ur,
                        mask=row_ok[:, None] & qk_ok[None, :], other=0.0)
            e = tl.load(b_ptr + brow[:, None].to(tl.int64) * stride_bn + qk[None, :] * stride_br,
                        mask=mine[:, None] & qk_ok[None, :], other=0.0).to(u.dtype)
            part = _mm(u, tl.trans(e), DOT_F32, PREC)
            if HAS_SEG:
                part = tl.where(mine[None, :], part, 0.0)
            acc += part
    acc = acc * scaling

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc += _mm(x, w, DOT_F32, PREC)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["M_BUCKET"])
def _bwd_g_kernel(g_ptr, u_ptr, b_ptr, col_seg_ptr, col_brow_ptr, seg_bounds_ptr, du_ptr, db_ptr,
                  M, N, R, r, M_BUCKET, scaling,
                  stride_gm, stride_gn, stride_um, stride_ur, stride_bn, stride_br,
                  stride_dum, stride_dur, stride_dbn, stride_dbr,
                  HAS_SEG: tl.constexpr, COMPUTE_DU: tl.constexpr, COMPUTE_DB: tl.constexpr,
                  DOT_F32: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One pass over g: du = s * g B (kept in registers) and dB += s * g^T u
    (fp32 atomics into db_ptr, one add per row-block of g)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    qs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    q_ok = qs < R
    rows64 = rows.to(tl.int64)
    if COMPUTE_DB:
        u = tl.load(u_ptr + rows64[:, None] * stride_um + qs[None, :] * stride_ur,
                    mask=row_ok[:, None] & q_ok[None, :], other=0.0)
    # Only the columns of the splits that own this program's R columns are read,
    # one split at a time, and each split's du is kept only on its own R columns:
    # as in the forward, a zero B entry must not meet an Inf/NaN of g.
    if HAS_SEG:
        j_first = (tl.program_id(1) * BLOCK_R) // r
        j_last = (tl.minimum(tl.program_id(1) * BLOCK_R + BLOCK_R, R) - 1) // r
    else:
        j_first = 0
        j_last = 0
    du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j in range(j_first, j_last + 1):
        if HAS_SEG:
            c0 = tl.load(seg_bounds_ptr + 2 * j)
            c1 = tl.load(seg_bounds_ptr + 2 * j + 1)
        else:
            c0 = 0
            c1 = N
        part_du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range((c0 // BLOCK_N) * BLOCK_N, c1, BLOCK_N):
            cols = tl.multiple_of(n0, BLOCK_N) + tl.arange(0, BLOCK_N)
            in_j = (cols >= c0) & (cols < c1)
            g = tl.load(g_ptr + rows64[:, None] * stride_gm + cols[None, :] * stride_gn,
                        mask=row_ok[:, None] & in_j[None, :], other=0.0)
            e, ok, brow, k = _expanded_b(b_ptr, stride_bn, stride_br, col_seg_ptr, col_brow_ptr,
                                         cols, qs, N, r, HAS_SEG)
            if COMPUTE_DU:
                part_du += _mm(g, e.to(g.dtype), DOT_F32, PREC)
            if COMPUTE_DB:
                part = _mm(tl.trans(g), u.to(g.dtype), DOT_F32, PREC)
                tl.atomic_add(db_ptr + brow[:, None].to(tl.int64) * stride_dbn + k * stride_dbr,
                              part * scaling, mask=ok & in_j[:, None] & q_ok[None, :])
        if HAS_SEG:
            part_du = tl.where((qs // r == j)[None, :], part_du, 0.0)
        du += part_du
    if COMPUTE_DU:
        tl.store(du_ptr + rows64[:, None] * stride_dum + qs[None, :] * stride_dur,
                 (du * scaling).to(du_ptr.dtype.element_ty), mask=row_ok[:, None] & q_ok[None, :])


# R is not specialised: with R == 1 (rank 1) triton makes it a constexpr, and
# with dropout and dA the half-precision kernel then fails to compile for
# sm_90 (TritonGPUReduceDataDuplication pass, triton 3.9; found by
# tests/test_kernels_compile.py). A runtime R costs nothing: it only bounds the
# R loop and masks.
@triton.jit(do_not_specialize=["seed", "R", "M_BUCKET"])
def _bwd_x_kernel(g_ptr, w_ptr, du_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
                  M, N, K, R, M_BUCKET, seed, p, keep_scale,
                  stride_gm, stride_gn, stride_wn, stride_wk, stride_dum, stride_dur,
                  stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
                  stride_dar, stride_dak,
                  DX_MODE: tl.constexpr, COMPUTE_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  DOT_F32: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """dx = g W + mask * (du A) / (1-p) and dA += du^T drop(x), sharing one
    regenerated mask tile. DX_MODE: 0 = no dx, 1 = compute g W here,
    2 = dx already holds g W (cuBLAS) and only the LoRA term is added in place."""
    rows, ks, row_ok, k_ok, rows64 = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    tile_ok = row_ok[:, None] & k_ok[None, :]
    dx_ptrs = dx_ptr + rows64[:, None] * stride_dxm + ks[None, :] * stride_dxk

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if DX_MODE == 1:
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(g_ptr + rows64[:, None] * stride_gm + cols[None, :] * stride_gn,
                        mask=row_ok[:, None] & (cols < N)[None, :], other=0.0)
            w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :] * stride_wk,
                        mask=(cols < N)[:, None] & k_ok[None, :], other=0.0)
            acc += _mm(g, w, DOT_F32, PREC)
    if DX_MODE == 2:
        acc += tl.load(dx_ptrs, mask=tile_ok, other=0.0).to(tl.float32)

    inv_keep = 1.0
    if HAS_DROPOUT:
        keep = _keep_mask(seed, rows, ks, K, p)
        inv_keep = keep_scale
    if COMPUTE_DA:
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=tile_ok, other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep, x, 0.0)
    for q0 in range(0, R, BLOCK_R):
        qs = q0 + tl.arange(0, BLOCK_R)
        q_ok = qs < R
        du = tl.load(du_ptr + rows64[:, None] * stride_dum + qs[None, :] * stride_dur,
                     mask=row_ok[:, None] & q_ok[None, :], other=0.0)
        if DX_MODE != 0:
            a = tl.load(a_ptr + qs[:, None] * stride_ar + ks[None, :] * stride_ak,
                        mask=q_ok[:, None] & k_ok[None, :], other=0.0).to(du.dtype)
            lo = _mm(du, a, DOT_F32, PREC)
            if HAS_DROPOUT:
                lo = tl.where(keep, lo * inv_keep, 0.0)
            acc += lo
        if COMPUTE_DA:
            part = _mm(tl.trans(du), x.to(du.dtype), DOT_F32, PREC)
            tl.atomic_add(da_ptr + qs[:, None] * stride_dar + ks[None, :] * stride_dak,
                          part * inv_keep, mask=q_ok[:, None] & k_ok[None, :])
    if DX_MODE != 0:
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=tile_ok)
