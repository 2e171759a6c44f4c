"""Mixed-adapter batches: every token of one call carries its own adapter (or none).

One frozen base, K adapters: token ``t`` gets

    ``y_t = x_t Wᵀ + b + s_k · drop_k(x_t) A_kᵀ B_kᵀ``  with ``k = token_adapter[t]``

and ``y_t = x_t Wᵀ + b`` where ``k = -1`` (base only). A DoRA adapter (a
:class:`~.row_scale.RowScale` hook) rescales its own tokens' adapted rows as the
single-adapter path does: ``c_k ⊙ (x_t Wᵀ + s_k·…) + b``.

The interface:

* :class:`MixedAdapter` ``(lora_A, lora_B, scaling, dropout_p, row_scale=None)``: one
  adapter, shaped as the layer's default adapter would be (Linear ``(r, in)``/``(out, r)``;
  MergedLinear stacked per enabled split as described by ``segments``; Embedding
  ``(r, num_embeddings)``/``(dim, r)``; Conv ``(r, C_in/groups·∏kernel)``/``(C_out, r)``).
  Ranks, scalings and dropouts may differ between adapters.
* :func:`token_adapters` expands per-row adapter indices to the flattened tokens.
* :func:`lora_linear_mixed`, :func:`lora_embedding_mixed`, :func:`lora_conv_mixed`.

**Rows and tokens** (:func:`token_adapters`). Rows are the leading dimension of the
layer input. For an input of 3 or more dimensions the leading size must equal the number
of rows N; each row's adapter covers its ``prod(shape[1:-1])`` tokens. A flattened input
``(tokens, in)`` is accepted when ``tokens = m·N``: it is read as N consecutive groups of
m tokens (batch-major flattening, as Hugging Face models and the Phi-3 helper flatten
``(N, L, in)``). A sequence-major flattening would be silently misread, so it is the
caller's job to flatten batch-major. Anything else raises ``ValueError``.

**Dropout.** Masks are per token row, each with its adapter's probability, all drawn
from one seed per call (:func:`~.dropout.draw_seed`) and regenerated in backward, never
stored. The rule, so a test can rebuild them: token ``t`` of adapter ``k`` uses row ``t``
of ``drop_mask(seed, (T, in), p_k)`` (:func:`~.dropout.drop_mask`), i.e. one draw of
:func:`~.dropout.random_lanes` for the whole ``(T, in)`` compared with a per-row
threshold. With one adapter on every token this is exactly ``lora_linear``'s mask.
Under ``torch.compile`` and ``torch.func`` the masks come from ``torch.rand`` instead
(as ``lora_linear`` uses ``F.dropout`` there).

**How it computes.** The lean path (plain LoRA on a dense base, training) is one base
GEMM over all tokens; the LoRA part is grouped: tokens are sorted by adapter once
(a stable ``argsort``), and each adapter's down and up projections run on its own
tokens only (gathered, used, dropped). Backward keeps ``x``, the sort order
(``T`` int64) and the parameters; never a per-adapter copy of ``x``, a mask, a
``T × out`` tensor, nor even ``u = drop(x) A_kᵀ``: backward gathers each adapter's
tokens for ``dA`` anyway and recomputes its ``u`` from them (a rank-``r`` product).
Gradients are computed only where asked.

A *stacked* plain-op form runs where a custom Function does not fit
(``torch.compile``, ``torch.func``, double backward) and for DoRA adapters and
quantized bases: one down projection by all adapters' ``A`` stacked
(``T × Σr``), a one-hot token/adapter selection, and the up projections; exact,
differentiable to any order, but it keeps autograd's usual tensors (not lean).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import recipes
from .amp import compute_dtype, no_autocast
from .autograd import _cast, _dense_t, _is_quantized, _out_features, _scatter_add, _seed_output, tracing
from .autograd import _g_t_u, _grad_u
from .dropout import draw_seed, grad_A, input_grad, keep_scale, lane_threshold, masked_down_project, random_lanes
from .row_scale import RowScale, expand_rows
from .segments import Block, Segments, covers_all

__all__ = ["MixedAdapter", "token_adapters", "lora_linear_mixed", "lora_embedding_mixed", "lora_conv_mixed"]


class MixedAdapter(NamedTuple):
    """One adapter of a mixed batch (see the module docstring for the shapes)."""

    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    dropout_p: float
    row_scale: Optional[RowScale] = None


# ----------------------------------------------------------------------------- rows -> tokens

def _row_tensor(rows, device) -> Tensor:
    if isinstance(rows, Tensor):
        if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
            raise ValueError(f"rows must be a 1-D integer tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
        return rows.to(device=device, dtype=torch.long)
    rows = list(rows)
    bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, int)]
    if bad:
        raise ValueError(f"rows must hold integer adapter indices (-1 = base only), got {bad[0]!r} in {rows}")
    return torch.tensor(rows, dtype=torch.long, device=device)


def token_adapters(rows, x_shape, device=None) -> Tensor:
    """Per-row adapter indices (``-1`` = base only) expanded to the tokens of an input of ``x_shape``.

    Args:
        rows: a sequence of ints or a 1-D integer tensor, one per batch row (N of them).
        x_shape: the layer input's shape ``(*, in)``; ``T = prod(x_shape[:-1])``.
        device: where the result lives.

    Returns:
        A ``(T,)`` int64 tensor: row ``i``'s index repeated over its ``T / N`` tokens.

    Raises:
        ValueError: ``rows`` is empty or not integers; a 3-D or larger input whose leading
            size is not N; ``T`` not a multiple of N (see the module docstring's rule).
    """
    idx = _row_tensor(rows, device)
    n, shape = idx.shape[0], tuple(x_shape)
    if n == 0:
        raise ValueError("rows must name at least one row, got none")
    tokens = math.prod(shape[:-1])
    if len(shape) >= 3 and shape[0] != n:
        raise ValueError(f"an input of shape {shape} has {shape[0]} rows (its leading dimension), "
                         f"but {n} row adapters were given")
    if len(shape) < 2 or tokens % n:
        raise ValueError(f"an input of shape {shape} has {tokens} tokens, not a multiple of the {n} rows: "
                         f"a flattened (tokens, in) input must hold N consecutive groups of equal size")
    return idx.repeat_interleave(tokens // n)


# ----------------------------------------------------------------------------- checks

_DTYPE_MISMATCH = ("lora_linear_mixed: x has dtype {x} but the weight has dtype {w}; they must match, as for "
                   "nn.Linear (cast the input, or run under torch.autocast)")


def _check_token_adapter(token_adapter, tokens: int, k: int, check_values: bool = True) -> Tensor:
    """The per-token indices as int64, after checking length and (outside tracing) range."""
    if not isinstance(token_adapter, Tensor) or token_adapter.dim() != 1 or token_adapter.dtype.is_floating_point \
            or token_adapter.dtype == torch.bool:
        what = (f"{token_adapter.dtype} of shape {tuple(token_adapter.shape)}" if isinstance(token_adapter, Tensor)
                else type(token_adapter).__name__)
        raise ValueError(f"token_adapter must be a 1-D integer tensor (one index per token), got {what}")
    if token_adapter.shape[0] != tokens:
        raise ValueError(f"token_adapter has {token_adapter.shape[0]} entries, but the input has {tokens} tokens")
    token_adapter = token_adapter.long()
    if check_values and tokens and not tracing():
        lo, hi = (int(v) for v in torch.aminmax(token_adapter))
        if lo < -1 or hi >= k:
            raise ValueError(f"token_adapter values must be in [-1, {k}) for {k} adapters (-1 = base only), "
                             f"got values in [{lo}, {hi}]")
    return token_adapter


def _check_adapters(adapters, in_features: int, what: str) -> Tuple[MixedAdapter, ...]:
    adapters = tuple(MixedAdapter(*a) for a in adapters)
    if not adapters:
        raise ValueError(f"{what}: adapters must hold at least one MixedAdapter, got none")
    for k, a in enumerate(adapters):
        if a.lora_A.dim() != 2 or a.lora_B.dim() != 2 or a.lora_A.shape[1] != in_features:
            raise ValueError(f"{what}: adapters[{k}].lora_A must be (r, {in_features}) and lora_B 2-D, got "
                             f"{tuple(a.lora_A.shape)} and {tuple(a.lora_B.shape)}")
        if not 0.0 <= float(a.dropout_p) < 1.0:
            raise ValueError(f"{what}: adapters[{k}].dropout_p must be in [0, 1), got {a.dropout_p!r}")
    return adapters


class _Spec(NamedTuple):
    """What the Function needs of one adapter besides its tensors."""

    scaling: float
    p: float  # the dropout probability in effect (0 outside training)
    blocks: Tuple[Block, ...]


class _Call(NamedTuple):
    x: Tensor
    weight: object  # a weight tensor or a quantized base
    bias: Optional[Tensor]
    adapters: Tuple[MixedAdapter, ...]
    token_adapter: Tensor  # (T,) int64
    specs: Tuple[_Spec, ...]
    prepared: Tuple[Tuple[Optional[Tensor], Optional[Tensor]], ...]  # each hook's (param, const)
    fan_in_fan_out: bool


def _checked_call(x, weight, bias, adapters, token_adapter, training, fan_in_fan_out, segments) -> _Call:
    if _is_quantized(weight) and fan_in_fan_out:
        raise ValueError("a quantized base is stored (out, in): fan_in_fan_out must be False")
    adapters = _check_adapters(adapters, x.shape[-1], "lora_linear_mixed")
    out = _out_features(weight, fan_in_fan_out)
    segs = Segments.of(segments, out)
    specs, prepared = [], []
    for k, a in enumerate(adapters):
        try:
            blocks = segs.adapter_blocks(a.lora_A, a.lora_B)
        except ValueError as err:
            raise ValueError(f"lora_linear_mixed: adapters[{k}]: {err}") from None
        specs.append(_Spec(float(a.scaling), float(a.dropout_p) if training else 0.0, blocks))
        spans = None if segs.is_full else segs.spans
        prepared.append((None, None) if a.row_scale is None else a.row_scale.prepare(
            weight, a.lora_A, a.lora_B, a.scaling, spans, fan_in_fan_out=fan_in_fan_out, rows=blocks[-1].b1))
    ta = _check_token_adapter(token_adapter, math.prod(x.shape[:-1]), len(adapters))
    return _Call(x, weight, bias, adapters, ta, tuple(specs), tuple(prepared), fan_in_fan_out)


# ----------------------------------------------------------------------------- shared pieces

def _row_mask(seed: int, shape, token_adapter: Tensor, ps: Sequence[float]) -> Optional[Tensor]:
    """The drop mask of the module docstring's rule for a 2-D ``shape``; None without dropout."""
    if not any(p > 0.0 for p in ps):
        return None
    thresholds = torch.tensor([lane_threshold(0.0)] + [lane_threshold(p) for p in ps], dtype=torch.int16,
                              device=token_adapter.device)
    return random_lanes(seed, shape, token_adapter.device) < thresholds[token_adapter + 1][:, None]


def _row_scale_vector(ps: Sequence[float], token_adapter: Tensor, dtype) -> Tensor:
    """Each token's inverted-dropout scale (1 for base-only tokens and p = 0)."""
    scales = torch.tensor([1.0] + [keep_scale(p) if p > 0.0 else 1.0 for p in ps], dtype=dtype,
                          device=token_adapter.device)
    return scales[token_adapter + 1]


def _groups(token_adapter: Tensor, k: int):
    """``(order, n_base, spans)``: the stable sort of the tokens by adapter, and ``(k, start, end)`` in
    ``order`` for each adapter with tokens (base-only tokens sort first and are skipped)."""
    order = torch.argsort(token_adapter, stable=True)
    counts = torch.bincount(token_adapter + 1, minlength=k + 1).tolist()
    spans, start = [], counts[0]
    for j, n in enumerate(counts[1:]):
        if n:
            spans.append((j, start, start + n))
        start += n
    return order, counts[0], tuple(spans)


def _base(x2: Tensor, weight, bias: Optional[Tensor], fan_in_fan_out: bool) -> Tensor:
    """``x Wᵀ (+ b)`` for a weight tensor or a quantized base; plain differentiable ops."""
    if _is_quantized(weight):
        y = weight.linear(x2).to(x2.dtype)
        return y if bias is None else y + _cast(bias, x2.dtype)
    return F.linear(x2, _dense_t(weight, fan_in_fan_out, x2.dtype), _cast(bias, x2.dtype))


# ----------------------------------------------------------------------------- the lean path (grouped by adapter)

class _Static(NamedTuple):
    """The Function's non-tensor arguments."""

    specs: Tuple[_Spec, ...]
    seed: int
    fan_in_fan_out: bool
    stacked: bool  # the stacked lean path (small Σr) rather than the grouped one


# The lean path stacks the adapters (one rank-Σr adapter, each token's columns selected) while
# Σr per split is at most this; beyond it, it sorts the tokens by adapter (grouped). Stacking costs
# Σr/r more LoRA flops, but those skinny products are bound by reading x and g, not by the flops,
# and it runs a fixed number of ops whatever K; grouping costs ~7 small ops and two gathers per
# adapter.
STACKED_MAX_RANK = 64


def _lanes(static: _Static, x2: Tensor, rows: Tensor) -> Optional[Tensor]:
    """The call's one lane draw over ``x2``'s shape, gathered at ``rows`` (None without dropout)."""
    if not any(s.p > 0.0 for s in static.specs):
        return None
    return random_lanes(static.seed, x2.shape, x2.device).index_select(0, rows)


def _group_mask(lanes: Optional[Tensor], s: int, e: int, p: float) -> Optional[Tensor]:
    """The drop mask of one adapter's sorted tokens ``s:e``."""
    return None if p == 0.0 else lanes[s:e] < lane_threshold(p)


def _grouped_forward(x2, weight, bias, token_adapter, static: _Static, params):
    """``(y2, order, spans)``: the output ``(T, out)`` and :func:`_groups`' sort.

    The adapted tokens are gathered once in sorted order (a transient copy, not kept), each
    adapter's ``s·drop(x)AᵀBᵀ`` is written into its rows of one sorted buffer, and one
    ``index_add_`` puts the buffer under the base GEMM's output: few large ops, not K of each."""
    out = _out_features(weight, static.fan_in_fan_out)
    order, n_base, spans = _groups(token_adapter, len(static.specs))
    adapted = order[n_base:]
    y2 = _base(x2, weight, _cast(bias, x2.dtype), static.fan_in_fan_out)
    xs, lanes = x2.index_select(0, adapted), _lanes(static, x2, adapted)
    delta = x2.new_empty(xs.shape[0], out)
    for k, s, e in spans:
        spec, s, e = static.specs[k], s - n_base, e - n_base
        A, B = _cast(params[2 * k], x2.dtype), _cast(params[2 * k + 1], x2.dtype)
        uk = masked_down_project(xs[s:e], A, _group_mask(lanes, s, e, spec.p), spec.p)
        _scaled_up(uk, B, spec, out, delta[s:e])
    return y2.index_add_(0, adapted, delta), order, spans


def _whole(spec: _Spec, out_features: int) -> bool:
    return covers_all(spec.blocks, out_features)


def _scaled_up(u: Tensor, B: Tensor, spec: _Spec, out_features: int, dst: Tensor) -> None:
    """``dst = s · u Bᵀ`` (zeros on the rows without an adapter). One op for a whole-output adapter:
    with K adapters the op count, not the flops, is what a small group costs."""
    if _whole(spec, out_features):
        torch.addmm(dst, u, B.t(), beta=0, alpha=spec.scaling, out=dst)
    else:
        _seed_output(u, B, spec.scaling, None, spec.blocks, out_features, out=dst)


def _adapter_grads(spec: _Spec, xs, gs, s: int, e: int, lanes, dxs, lora_A, lora_B, needs):
    """``(dA_k, dB_k)`` from adapter ``k``'s sorted tokens ``s:e``; writes its part of ``dx`` into
    ``dxs[s:e]`` (when ``dxs`` is given).

    ``u = drop(x) A_kᵀ`` is recomputed from the gathered tokens (``n_k × in × r`` flops, under
    0.2% of the base GEMMs at the layer bench shape) rather than kept: ``x_k`` is gathered for
    ``dA`` anyway, so the mixed path keeps no ``T × r`` tensor at all."""
    A, B = _cast(lora_A, gs.dtype), _cast(lora_B, gs.dtype)
    gk, xk, mask = gs[s:e], xs[s:e], _group_mask(lanes, s, e, spec.p)
    dA = dB = None
    whole = _whole(spec, gs.shape[1])
    if needs[1]:
        uk = masked_down_project(xk, A, mask, spec.p)
        dB = (torch.addmm(B, gk.t(), uk, beta=0, alpha=spec.scaling) if whole
              else _g_t_u(gk, uk, B, spec.blocks).mul_(spec.scaling)).to(lora_B.dtype)
    if needs[0] or dxs is not None:
        du = (torch.addmm(gk.new_zeros(()), gk, B, beta=0, alpha=spec.scaling)
              if whole else _grad_u(gk, B, A.shape[0], spec.scaling, spec.blocks))
        if needs[0]:
            dA = grad_A(du, xk, mask, spec.p).to(lora_A.dtype)
        if dxs is not None:
            input_grad(du, A, mask, spec.p, out=dxs[s:e])
    return dA, dB


def _grouped_backward(ctx, g):
    """The gradients asked for, from ``x``, the sort order and the parameters."""
    x, weight, bias, order, *params = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    needs = ctx.needs_input_grad[5:]
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    n_base = order.shape[0] - sum(e - s for _, s, e in ctx.spans)
    adapted = order[n_base:]
    gs, xs = g2.index_select(0, adapted), x2.index_select(0, adapted).to(g2.dtype)
    lanes = _lanes(ctx.static, x2, adapted) if need_x or any(needs[::2]) else None
    dxs = gs.new_empty(xs.shape) if need_x else None
    grads = [None] * len(params)
    for k, s, e in ctx.spans:
        grads[2 * k], grads[2 * k + 1] = _adapter_grads(ctx.static.specs[k], xs, gs, s - n_base, e - n_base, lanes,
                                                        dxs, params[2 * k], params[2 * k + 1], needs[2 * k:2 * k + 2])
    # an adapter without tokens: a zero gradient, as the other forms give
    grads = [torch.zeros_like(p) if need and d is None else d for p, need, d in zip(params, needs, grads)]
    dx = dw = None
    if need_x:
        dx = (g2 @ _dense_t(weight, ctx.static.fan_in_fan_out, g2.dtype)).index_add_(0, adapted, dxs)
        dx = dx.view(x.shape).to(x.dtype)
    if need_w:
        dw = g2.t() @ x2.to(g2.dtype)
        dw = (dw.t() if ctx.static.fan_in_fan_out else dw).to(weight.dtype)
    db = g2.sum(0).to(bias.dtype) if need_b else None
    return (dx, dw, db, None, None, *grads)


def _token_adapter_back(order: Tensor, spans) -> Tensor:
    """The per-token indices again, from the saved sort (for the differentiable backward)."""
    values = order.new_full(order.shape, -1)
    for k, s, e in spans:
        values[s:e] = k
    return torch.empty_like(values).index_copy_(0, order, values)


# ----------------------------------------------------------------------------- the lean path (stacked)

class _Stack(NamedTuple):
    """The K adapters as one adapter of rank ``R = Σ r_k`` per split: ``A`` split-major
    (``(n·R, in)``), ``B`` with each adapter's scaling folded in (``(b_rows, R)``), the blocks
    for rank ``R``, and each adapter's first column inside a split."""

    A: Tensor
    B: Tensor
    blocks: Tuple[Block, ...]
    ranks: Tuple[int, ...]
    offsets: Tuple[int, ...]


def _stack(params, specs, dtype) -> _Stack:
    """Built with a fixed number of ops whatever K (under load each op, however small, costs a
    thread-pool round trip)."""
    ranks = tuple(spec.blocks[0].a1 - spec.blocks[0].a0 for spec in specs)
    R, offsets = sum(ranks), tuple(sum(ranks[:k]) for k in range(len(ranks)))
    A = torch.cat([params[2 * k][blk.a0:blk.a1]
                   for j in range(len(specs[0].blocks)) for k, blk in enumerate(s.blocks[j] for s in specs)])
    col_scale = torch.tensor([spec.scaling for spec, r in zip(specs, ranks) for _ in range(r)], dtype=dtype)
    B = _cast(torch.cat(params[1::2], 1), dtype).mul_(col_scale.to(params[1].device))
    blocks = tuple(Block(b.out0, b.out1, j * R, (j + 1) * R, b.b0, b.b1) for j, b in enumerate(specs[0].blocks))
    return _Stack(_cast(A, dtype), B, blocks, ranks, offsets)


def _selection(token_adapter: Tensor, stack: _Stack, specs, dtype) -> Tensor:
    """``(T, n·R)``: each token's inverted-dropout scale on its own adapter's columns, 0 elsewhere
    (a row of a small ``(K+1, n·R)`` table per token; row 0, base only, is all 0)."""
    R = sum(stack.ranks)
    table = torch.zeros(len(specs) + 1, len(stack.blocks) * R, dtype=dtype)
    for k, spec in enumerate(specs):
        for j in range(len(stack.blocks)):
            c0 = j * R + stack.offsets[k]
            table[k + 1, c0:c0 + stack.ranks[k]] = keep_scale(spec.p) if spec.p > 0.0 else 1.0
    return table.to(token_adapter.device).index_select(0, token_adapter + 1)


def _stacked_u(x2, token_adapter, static: _Static, stack: _Stack):
    """``(u, mask, S)``: ``u = (drop-masked x) Aᵀ ⊙ S`` with the selection ``S``, and the mask."""
    mask = _row_mask(static.seed, x2.shape, token_adapter, [s.p for s in static.specs])
    S = _selection(token_adapter, stack, static.specs, x2.dtype)
    return masked_down_project(x2, stack.A, mask, 0.0).mul_(S), mask, S


def _stacked_forward(x2, weight, bias, token_adapter, static: _Static, params) -> Tensor:
    """The single-adapter forward (:func:`.autograd.lora_forward`'s order) on the stacked adapter."""
    stack = _stack(params, static.specs, x2.dtype)
    u = _stacked_u(x2, token_adapter, static, stack)[0]
    y2 = _seed_output(u, stack.B, 1.0, _cast(bias, x2.dtype), stack.blocks, _out_features(weight, static.fan_in_fan_out))
    return y2.addmm_(x2, _dense_t(weight, static.fan_in_fan_out, x2.dtype).t())


def _unstack(dA, dB, stack: _Stack, specs, params, needs):
    """Each adapter's ``(dA_k, dB_k)`` from the stacked adapter's gradients."""
    grads = []
    for k, spec in enumerate(specs):
        c0, c1 = stack.offsets[k], stack.offsets[k] + stack.ranks[k]
        grads.append(None if not needs[2 * k] else torch.cat(
            [dA[blk.a0 + c0:blk.a0 + c1] for blk in stack.blocks]).to(params[2 * k].dtype))
        grads.append(None if not needs[2 * k + 1] else (dB[:, c0:c1] * spec.scaling).to(params[2 * k + 1].dtype))
    return grads


def _stacked_backward(ctx, g):
    x, weight, bias, token_adapter, *params = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    needs = ctx.needs_input_grad[5:]
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]).to(g.dtype)
    stack = _stack(params, ctx.static.specs, g2.dtype)
    u, mask, S = _stacked_u(x2, token_adapter, ctx.static, stack)
    dB = _g_t_u(g2, u, stack.B, stack.blocks) if any(needs[1::2]) else None
    du = _grad_u(g2, stack.B, stack.A.shape[0], 1.0, stack.blocks).mul_(S) if need_x or any(needs[::2]) else None
    dA = grad_A(du, x2, mask, 0.0) if any(needs[::2]) else None
    dx = dw = None
    if need_x:
        dx = input_grad(du, stack.A, mask, 0.0).addmm_(g2, _dense_t(weight, ctx.static.fan_in_fan_out, g2.dtype))
        dx = dx.view(x.shape).to(x.dtype)
    if need_w:
        dw = g2.t() @ x2
        dw = (dw.t() if ctx.static.fan_in_fan_out else dw).to(weight.dtype)
    db = g2.sum(0).to(bias.dtype) if need_b else None
    return (dx, dw, db, None, None, *_unstack(dA, dB, stack, ctx.static.specs, params, needs))


def _forward(x2, weight, bias, token_adapter, static: _Static, params):
    """``(y2, index, spans)``: the output and what backward needs to find each adapter's tokens."""
    if static.stacked:
        return _stacked_forward(x2, weight, bias, token_adapter, static, params), token_adapter, None
    return _grouped_forward(x2, weight, bias, token_adapter, static, params)


class _MixedLoRA(torch.autograd.Function):
    """The lean autograd of a mixed batch (no row-scale hooks, dense base).

    Inputs: ``x`` (compute dtype), ``weight``, ``bias``, ``token_adapter``, a :class:`_Static`,
    then ``lora_A, lora_B`` of every adapter in order. Saved: ``x``, the per-token indices
    (stacked) or the sort order (grouped), ``T`` int64 either way, and the parameters (as given;
    cast in backward); no mask, no ``u``, nothing of size ``T × out``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, token_adapter, static, *params):
        x2 = x.reshape(-1, x.shape[-1])
        y2, index, spans = _forward(x2, weight, bias, token_adapter, static, params)
        ctx.save_for_backward(x, weight, bias, index, *params)
        ctx.static, ctx.spans = static, spans
        return y2.view(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: a higher-order derivative follows
            return _differentiable_backward(ctx, g)
        return _stacked_backward(ctx, g) if ctx.static.stacked else _grouped_backward(ctx, g)


def _differentiable_backward(ctx, g):
    """The gradients as differentiable functions of the inputs (double backward): the plain-op
    form with the forward's seeded masks, differentiated with ``create_graph=True``."""
    x, weight, bias, order, *params = ctx.saved_tensors
    inputs = (x, weight, bias, None, None, *params)
    wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need]
    ta = order if ctx.static.stacked else _token_adapter_back(order, ctx.spans)
    specs = ctx.static.specs
    drop = _seeded_drop(ctx.static.seed, ta, specs)
    y = _plain(x.reshape(-1, x.shape[-1]), weight, bias, params, specs, (None,) * len(specs), ta,
                 ctx.static.fan_in_fan_out, drop)
    grads = torch.autograd.grad(y.view(g.shape), [inputs[i] for i in wanted], g, create_graph=True,
                                allow_unused=True)
    out = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        out[i] = grad
    return tuple(out)


# ----------------------------------------------------------------------------- the plain-op form

def _seeded_drop(seed: int, token_adapter: Tensor, specs):
    """The lean path's masks (the module docstring's rule) as plain ops; None without dropout."""
    ps = [s.p for s in specs]
    if not any(p > 0.0 for p in ps):
        return None

    def drop(t: Tensor) -> Tensor:
        mask = _row_mask(seed, t.shape, token_adapter, ps)
        return torch.where(mask, 0.0, t) * _row_scale_vector(ps, token_adapter, t.dtype)[:, None]
    return drop


def _random_drop(token_adapter: Tensor, specs):
    """Per-row dropout from ``torch.rand`` (traceable by torch.compile and torch.func); None without it."""
    ps = [s.p for s in specs]
    if not any(p > 0.0 for p in ps):
        return None

    def drop(t: Tensor) -> Tensor:
        p_row = t.new_tensor([0.0] + ps)[token_adapter + 1][:, None]
        return torch.where(torch.rand_like(t) >= p_row, t / (1 - p_row), 0.0)
    return drop


def _selected_u(xd: Tensor, As, token_adapter: Tensor) -> Tensor:
    """``(T, Σr)``: every adapter's down projection, zero outside each token's own adapter's columns."""
    A = torch.cat([_cast(a, xd.dtype) for a in As])
    owner = torch.cat([torch.full((a.shape[0],), k, device=xd.device) for k, a in enumerate(As)])
    return F.linear(xd, A) * (token_adapter[:, None] == owner).to(xd.dtype)


def _plain(x2, weight, bias, params, specs, hooks, token_adapter, fan_in_fan_out, drop):
    """``(T, out)`` from plain differentiable ops; ``hooks`` holds each adapter's
    ``(row_scale, param, const)`` or None."""
    scaled = any(h is not None for h in hooks)
    y = _base(x2, weight, None if scaled else bias, fan_in_fan_out)
    u = _selected_u(x2 if drop is None else drop(x2), params[::2], token_adapter)
    parts, off = {}, 0
    for k, spec in enumerate(specs):
        B = _cast(params[2 * k + 1], x2.dtype)
        for o0, o1, a0, a1, b0, b1 in spec.blocks:
            term = F.linear(u[:, off + a0:off + a1], B[b0:b1]) * spec.scaling
            parts[(o0, o1)] = term if (o0, o1) not in parts else parts[(o0, o1)] + term
        off += params[2 * k].shape[0]
    if list(parts) == [(0, y.shape[-1])]:
        y = y + parts[(0, y.shape[-1])]
    else:
        y = _scatter_add(y, [(o0, o1, d) for (o0, o1), d in parts.items()])
    if scaled:
        y = y * _token_factors(hooks, specs, token_adapter, y.shape[-1], y.dtype)
        y = y if bias is None else y + _cast(bias, y.dtype)
    return y


def _token_factors(hooks, specs, token_adapter: Tensor, out: int, dtype) -> Tensor:
    """``(T, out)``: each token's row-scale factor (1 for base-only tokens and plain adapters)."""
    ones = torch.ones(out, dtype=dtype, device=token_adapter.device)
    rows = [ones] + [ones if h is None else expand_rows(h[0].factor(h[1], h[2]), spec.blocks, out, dtype)
                     for h, spec in zip(hooks, specs)]
    return torch.stack(rows).index_select(0, token_adapter + 1)


# ----------------------------------------------------------------------------- routing

def _params(call: _Call):
    return [t for a in call.adapters for t in (a.lora_A, a.lora_B)]


def _run_plain(call: _Call, dt, seed: Optional[int]) -> Tensor:
    """The plain-op form, with the seeded masks (eager) or ``torch.rand`` ones (``seed`` None)."""
    x2 = _cast(call.x, dt).reshape(-1, call.x.shape[-1])
    hooks = tuple(None if a.row_scale is None else (a.row_scale, *pc) for a, pc in zip(call.adapters, call.prepared))
    drop = (_random_drop(call.token_adapter, call.specs) if seed is None
            else _seeded_drop(seed, call.token_adapter, call.specs))
    y = _plain(x2, call.weight, call.bias, _params(call), call.specs, hooks, call.token_adapter,
                 call.fan_in_fan_out, drop)
    return y.view(*call.x.shape[:-1], y.shape[-1])


def _run(call: _Call, dt: torch.dtype) -> Tensor:
    if tracing():
        return _run_plain(call, dt, None)
    seed = draw_seed() if any(s.p > 0.0 for s in call.specs) and not call.x.is_meta else 0
    if _is_quantized(call.weight) or any(a.row_scale is not None for a in call.adapters):
        return _run_plain(call, dt, seed)
    stacked = sum(s.blocks[0].a1 - s.blocks[0].a0 for s in call.specs) <= STACKED_MAX_RANK
    static = _Static(call.specs, seed, call.fan_in_fan_out, stacked)
    args = (call.weight, call.bias, call.token_adapter, static, *_params(call))
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (call.x, *args[:2], *args[4:]))):
        x2 = _cast(call.x, dt).reshape(-1, call.x.shape[-1])
        y2 = _forward(x2, call.weight, call.bias, call.token_adapter, static, args[4:])[0]
        return y2.view(*call.x.shape[:-1], y2.shape[-1])
    recipe = recipes.find(call.x)
    if recipe is not None:  # x can be rebuilt from tensors autograd keeps anyway (lora_layers.lean)
        return recipes.apply_rebuilding_input(recipe, _MixedLoRA, call.x, dt, args)
    return _MixedLoRA.apply(_cast(call.x, dt), *args)


def lora_linear_mixed(x: Tensor, weight, bias: Optional[Tensor], adapters: Sequence[MixedAdapter],
                      token_adapter: Tensor, *, training: bool = False, fan_in_fan_out: bool = False,
                      segments=None) -> Tensor:
    """``x_t Wᵀ + b + s_k · drop_k(x_t) A_kᵀ B_kᵀ`` per token, ``k = token_adapter[t]`` (``-1``: base only).

    Args:
        x: ``(*, in)``; its ``T = prod(x.shape[:-1])`` tokens are the rows of ``token_adapter``.
        weight: ``(out, in)`` (``(in, out)`` with ``fan_in_fan_out``) or a quantized base.
        bias: ``(out,)`` or None.
        adapters: K :class:`MixedAdapter`; ``row_scale`` (e.g. DoRA) rescales that adapter's
            tokens' adapted rows.
        token_adapter: ``(T,)`` integer indices in ``[-1, K)`` (:func:`token_adapters`).
        training: dropout applies only when True.
        fan_in_fan_out, segments: as :func:`lora_layers.functional.lora_linear`; every adapter
            is stacked per enabled split as ``segments`` describe.

    Returns:
        ``(*, out)``.

    Raises:
        ValueError: no adapter, an adapter whose shapes do not fit the layer, a dropout outside
            ``[0, 1)``, ``token_adapter`` not 1-D integer of length ``T`` or out of range.
        RuntimeError: ``x`` and ``weight`` dtypes differ outside autocast.
    """
    call = _checked_call(x, weight, bias, adapters, token_adapter, training, fan_in_fan_out, segments)
    # A quantized base computes in x's dtype and returns it (as bitsandbytes' layers do).
    dt = x.dtype if _is_quantized(weight) else compute_dtype(x, weight, RuntimeError, _DTYPE_MISMATCH)
    with no_autocast(x.device.type):
        return _run(call, dt)


# ----------------------------------------------------------------------------- embedding and conv (plain ops)

def _no_hooks(adapters, what: str) -> None:
    for k, a in enumerate(adapters):
        if a.row_scale is not None:
            raise ValueError(f"{what}: adapters[{k}] has a row_scale hook; only the linear layers support one")


def lora_embedding_mixed(x: Tensor, weight: Tensor, adapters: Sequence[MixedAdapter], token_adapter: Tensor,
                         padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
                         norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """``W[x_t] + s_k · A_kᵀ[x_t] B_kᵀ`` per token, ``k = token_adapter[t]`` (``-1``: base only).

    As :func:`lora_layers.core.functional.lora_embedding`, one adapter per token: ``lora_A``
    ``(r, num_embeddings)``, ``lora_B`` ``(dim, r)``. An embedding has no adapter dropout, so
    ``dropout_p`` must be 0. Stacked plain ops: one lookup in all adapters' ``A`` (``T × Σr``),
    zero outside each token's adapter, and one product with the scaled ``B`` stacked.
    """
    adapters = _check_adapters(adapters, weight.shape[0], "lora_embedding_mixed")
    _no_hooks(adapters, "lora_embedding_mixed")
    for k, a in enumerate(adapters):
        if a.lora_B.shape != (weight.shape[1], a.lora_A.shape[0]) or a.dropout_p:
            raise ValueError(f"lora_embedding_mixed: adapters[{k}] needs lora_B ({weight.shape[1]}, "
                             f"{a.lora_A.shape[0]}) and dropout_p 0, got {tuple(a.lora_B.shape)} and {a.dropout_p}")
    ta = _check_token_adapter(token_adapter, x.numel(), len(adapters))
    result = F.embedding(x, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    A = torch.cat([a.lora_A for a in adapters])
    u = F.embedding(x.reshape(-1), A.t(), padding_idx, None, 2.0, scale_grad_by_freq, False)
    owner = torch.cat([torch.full((a.lora_A.shape[0],), k, device=x.device) for k, a in enumerate(adapters)])
    u = u.to(result.dtype) * (ta[:, None] == owner).to(result.dtype)
    B = torch.cat([a.lora_B.to(result.dtype) * a.scaling for a in adapters], 1)
    return result + (u @ B.t()).view(result.shape)


def lora_conv_mixed(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[MixedAdapter],
                    row_adapter: Tensor, conv, *, training: bool = False) -> Tensor:
    """``conv(x, W, b) + s_k · conv(drop_k(x_n), B_k A_k)`` per sample ``n``, ``k = row_adapter[n]``.

    As :func:`lora_layers.core.functional.lora_conv`, one adapter per sample of the batch
    dimension ``N`` of ``x`` (``(N, C_in, *spatial)``); ``row_adapter`` is ``(N,)`` in ``[-1, K)``.
    Each adapter's samples are gathered and convolved with its kernel-sized ``ΔW`` (plain ops).
    Dropout follows the module docstring's rule on ``x`` viewed as ``(N, C_in·∏spatial)``.
    """
    adapters = _check_adapters(adapters, adapters[0].lora_A.shape[1] if adapters else 0, "lora_conv_mixed")
    _no_hooks(adapters, "lora_conv_mixed")
    k_in = math.prod(weight.shape[1:])
    for k, a in enumerate(adapters):
        if a.lora_A.shape[1] != k_in or a.lora_B.shape != (weight.shape[0], a.lora_A.shape[0]):
            raise ValueError(f"lora_conv_mixed: adapters[{k}] needs lora_A (r, {k_in}) and lora_B "
                             f"({weight.shape[0]}, r), got {tuple(a.lora_A.shape)} and {tuple(a.lora_B.shape)}")
    ta = _check_token_adapter(row_adapter, x.shape[0], len(adapters))
    specs = [_Spec(float(a.scaling), float(a.dropout_p) if training else 0.0, ()) for a in adapters]
    seed = draw_seed() if any(s.p > 0.0 for s in specs) else 0
    drop = _seeded_drop(seed, ta, specs)
    xd = x if drop is None else drop(x.reshape(x.shape[0], -1)).view(x.shape)
    y = conv(x, weight, bias)
    for k, a in enumerate(adapters):
        idx = torch.nonzero(ta == k).flatten()
        if idx.numel():
            delta = (a.lora_B.to(weight.dtype) @ a.lora_A.to(weight.dtype)).view(weight.shape) * a.scaling
            y = y.index_add(0, idx, conv(xd.index_select(0, idx), delta, None))
    return y
