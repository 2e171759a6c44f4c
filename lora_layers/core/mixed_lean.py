"""The lean autograd of a mixed-adapter batch (:class:`_MixedLoRA`), in two forms.

*Stacked* (``Σr ≤ STACKED_MAX_RANK``): the K adapters run as one adapter of rank ``Σr`` whose
``u`` columns are selected per token; the single-adapter op sequence, whatever K. *Grouped*
(larger ``Σr``): the tokens are sorted by adapter once, and each adapter's products run on its
own tokens only. Both keep for backward ``x``, one ``T``-long int64 index and the parameters;
never a mask, ``u``, a per-adapter copy of ``x`` or a ``T × out`` tensor.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .autograd import _cast, _dense_t, _g_t_u, _grad_u, _out_features, _seed_output
from .dropout import grad_A, input_grad, keep_scale, lane_threshold, masked_down_project, random_lanes
from .mixed_plain import _Spec, _base, _plain, _row_mask, _seeded_drop
from .segments import Block, covers_all

__all__ = ["STACKED_MAX_RANK"]


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


class _Static(NamedTuple):
    """The Function's non-tensor arguments."""

    specs: Tuple[_Spec, ...]
    seed: int
    fan_in_fan_out: bool
    stacked: bool  # the stacked lean path (small Σr) rather than the grouped one


# The lean path stacks the adapters (one rank-Σr adapter, each token's columns selected) while
# Σr per split is at most this; beyond it, it sorts the tokens by adapter (grouped). Stacking costs
# Σr/r more LoRA flops, but those skinny products are bound by reading x and g, not by the flops,
# and it runs a fixed number of ops whatever K; grouping runs ~7 small products per adapter, and
# on a loaded CPU each op, however small, waits for the thread pool.
STACKED_MAX_RANK = 64


def lean_static(specs, seed: int, fan_in_fan_out: bool) -> "_Static":
    """The Function's static arguments, with the path (stacked or grouped) picked by ``Σr``."""
    stacked = sum(s.blocks[0].a1 - s.blocks[0].a0 for s in specs) <= STACKED_MAX_RANK
    return _Static(tuple(specs), seed, fan_in_fan_out, stacked)


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
    B = _cast(torch.cat(params[1::2], 1), dtype).mul_(_column_scale(specs, ranks, dtype).to(params[1].device))
    blocks = tuple(Block(b.out0, b.out1, j * R, (j + 1) * R, b.b0, b.b1) for j, b in enumerate(specs[0].blocks))
    return _Stack(_cast(A, dtype), B, blocks, ranks, offsets)


def _column_scale(specs, ranks, dtype) -> Tensor:
    """Each stacked column's adapter scaling (a CPU tensor)."""
    return torch.tensor([spec.scaling for spec, r in zip(specs, ranks) for _ in range(r)], dtype=dtype)


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
    """``(u, xd, mask, S)``: the masked input ``xd`` (``x2`` itself without dropout), the selection ``S``
    (each token's keep-scale folded in) and ``u = xd Aᵀ ⊙ S``. Written out rather than through
    the single-adapter helpers, which would add a ×1 pass: every op counts on a loaded CPU."""
    mask = _row_mask(static.seed, x2.shape, token_adapter, [s.p for s in static.specs])
    xd = x2 if mask is None else torch.where(mask, 0.0, x2)
    S = _selection(token_adapter, stack, static.specs, x2.dtype)
    return (xd @ stack.A.t()).mul_(S), xd, mask, S


def _stacked_forward(x2, weight, bias, token_adapter, static: _Static, params) -> Tensor:
    """The single-adapter forward (:func:`.autograd.lora_forward`'s order) on the stacked adapter."""
    stack = _stack(params, static.specs, x2.dtype)
    u = _stacked_u(x2, token_adapter, static, stack)[0]
    out = _out_features(weight, static.fan_in_fan_out)
    bias = _cast(bias, x2.dtype)
    if covers_all(stack.blocks, out):
        y2 = u @ stack.B.t() if bias is None else torch.addmm(bias, u, stack.B.t())
    else:
        y2 = _seed_output(u, stack.B, 1.0, bias, stack.blocks, out)
    return y2.addmm_(x2, _dense_t(weight, static.fan_in_fan_out, x2.dtype).t())


def _unstack(dA, dB, stack: _Stack, specs, params, needs):
    """Each adapter's ``(dA_k, dB_k)`` from the stacked adapter's gradients (views where one split)."""
    if dB is not None:
        dB = dB.mul_(_column_scale(specs, stack.ranks, dB.dtype).to(dB.device))
    grads = []
    for k in range(len(specs)):
        c0, c1 = stack.offsets[k], stack.offsets[k] + stack.ranks[k]
        rows = [dA[blk.a0 + c0:blk.a0 + c1] for blk in stack.blocks] if needs[2 * k] else None
        grads.append(None if rows is None else (rows[0] if len(rows) == 1 else torch.cat(rows)).to(params[2 * k].dtype))
        grads.append(None if not needs[2 * k + 1] else dB[:, c0:c1].to(params[2 * k + 1].dtype))
    return grads


def _stacked_backward(ctx, g):
    x, weight, bias, token_adapter, *params = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    needs = ctx.needs_input_grad[5:]
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]).to(g.dtype)
    stack = _stack(params, ctx.static.specs, g2.dtype)
    u, xd, mask, S = _stacked_u(x2, token_adapter, ctx.static, stack)
    whole = covers_all(stack.blocks, g2.shape[1])
    dB = (g2.t() @ u if whole else _g_t_u(g2, u, stack.B, stack.blocks)) if any(needs[1::2]) else None
    du = None
    if need_x or any(needs[::2]):
        du = (g2 @ stack.B if whole else _grad_u(g2, stack.B, stack.A.shape[0], 1.0, stack.blocks)).mul_(S)
    dA = du.t() @ xd if any(needs[::2]) else None
    dx = dw = None
    if need_x:
        dx = du @ stack.A if mask is None else (du @ stack.A).masked_fill_(mask, 0)
        dx = dx.addmm_(g2, _dense_t(weight, ctx.static.fan_in_fan_out, g2.dtype)).view(x.shape).to(x.dtype)
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
