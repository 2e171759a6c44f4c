"""The LoRA linear's forward and its lean autograd, plus the plain-op form of both.

:class:`_LoRALinear` saves only ``x`` (already alive for the base layer), ``u =
drop(x) Aᵀ`` (``T × r``) and the parameters; never the dropout mask (regenerated
from its seed, :mod:`.dropout`) nor any ``T × out`` tensor. Its backward computes
only the gradients autograd asks for, one small function each. A row-scale hook
(:mod:`.row_scale`, e.g. DoRA) rescales the adapted rows; the code below treats it
as a factor ``c`` and asks the hook only for its parameter's gradient.

:func:`_composite` computes the same result from plain differentiable ops, for
``torch.compile``, ``torch.func`` transforms and double backward.

A hook with ``keep_product`` (DoRA's ``dora_mode="fast"``) makes :class:`_LoRALinear`
also keep the pre-scale product of the adapted rows (:func:`lora_forward_keeping_product`),
from which backward reads the hook's ``dL/dc`` instead of recomputing ``x Wᵀ``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dropout import backward_mask, down_project, grad_A, input_grad, seeded_dropout
from .row_scale import expand_rows, gather_rows
from .segments import covers_all

__all__ = ["tracing", "refuse_double_backward"]


def tracing() -> bool:
    """True under ``torch.compile`` or inside a ``torch.func`` transform (vmap, grad, jacrev, ...):
    there a custom autograd Function does not fit, and plain differentiable ops run instead."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def refuse_double_backward(what: str, why: str) -> None:
    """Raise, from a Function's backward, when autograd builds a graph (``create_graph=True``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what} does not support double backward (create_graph=True): {why}")


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _is_quantized(weight) -> bool:
    """A frozen quantized base (:class:`lora_layers.quantized.QuantizedBase`) instead of a weight tensor."""
    return not isinstance(weight, Tensor)


def _out_features(weight, fan_in_fan_out: bool) -> int:
    return weight.shape[1] if fan_in_fan_out else weight.shape[0]


def _dense_t(weight: Tensor, fan_in_fan_out: bool, dtype: torch.dtype) -> Tensor:
    """The ``(out, in)`` weight in ``dtype`` (a view of a ``fan_in_fan_out`` weight)."""
    return _cast(weight.t() if fan_in_fan_out else weight, dtype)


def _base_matmul(weight, x2: Tensor, fan_in_fan_out: bool) -> Tensor:
    """``x Wᵀ`` for a weight tensor or a quantized base."""
    if _is_quantized(weight):
        return weight.linear(x2).to(x2.dtype)
    return torch.mm(x2, _dense_t(weight, fan_in_fan_out, x2.dtype).t())


def _fill_bias(dst: Tensor, bias: Optional[Tensor], o0: int, o1: int) -> None:
    if bias is None:
        dst.zero_()
    else:
        dst.copy_(bias[o0:o1].expand_as(dst))


def _seed_output(u: Tensor, B: Tensor, scaling: float, bias: Optional[Tensor], blocks, out_features: int,
                 out: Optional[Tensor] = None) -> Tensor:
    """A fresh ``(T, out)`` tensor (or ``out``, filled) holding ``b + scaling · u Bᵀ`` (per block).

    The base GEMM then accumulates into it (``addmm_`` with beta=1), so the
    LoRA term costs one write of the output instead of a separate
    read-modify-write pass after the GEMM.
    """
    Bs = B * scaling  # (out, r): folding the scale here is free
    y2 = u.new_empty(u.shape[0], out_features) if out is None else out
    covered = 0
    for o0, o1, a0, a1, b0, b1 in sorted(blocks):
        if o0 > covered:
            _fill_bias(y2[:, covered:o0], bias, covered, o0)
        dst = y2 if (o0, o1) == (0, out_features) else y2[:, o0:o1]
        if bias is None:
            torch.mm(u[:, a0:a1], Bs[b0:b1].t(), out=dst)
        else:
            torch.addmm(bias[o0:o1], u[:, a0:a1], Bs[b0:b1].t(), out=dst)
        covered = o1
    if covered < out_features:
        _fill_bias(y2[:, covered:], bias, covered, out_features)
    return y2


def lora_forward(x, weight, bias, lora_A, lora_B, param, const, row_scale, scaling, dropout_p, seed, fan_in_fan_out,
                 blocks):
    """The forward math on an ``x`` already in the compute dtype; returns ``(y2, u)``
    with ``y2`` of shape ``(T, out)`` and ``u = drop(x) Aᵀ`` of shape ``(T, R)``.
    With a ``row_scale`` hook, ``y2 = c ⊙ (x Wᵀ + s·uBᵀ) + b``, in place. The arguments
    after ``x`` are :class:`_LoRALinear`'s."""
    if row_scale is not None:
        y2, u = lora_forward(x, weight, None, lora_A, lora_B, None, None, None, scaling, dropout_p, seed,
                             fan_in_fan_out, blocks)
        y2.mul_(expand_rows(row_scale.factor(param, const), blocks, y2.shape[1], y2.dtype))
        if bias is not None:
            y2.add_(_cast(bias, y2.dtype))
        return y2, u
    x2 = x.reshape(-1, x.shape[-1])
    u = down_project(x2, _cast(lora_A, x2.dtype), dropout_p, seed)
    y2 = _seed_output(u, _cast(lora_B, x2.dtype), scaling, _cast(bias, x2.dtype), blocks,
                      _out_features(weight, fan_in_fan_out))
    if _is_quantized(weight):
        y2.add_(weight.linear(x2).to(y2.dtype))  # the library's kernel writes its own output
    else:
        y2.addmm_(x2, _dense_t(weight, fan_in_fan_out, x2.dtype).t())
    return y2, u


def lora_forward_keeping_product(x, weight, bias, lora_A, lora_B, param, const, row_scale, scaling, dropout_p,
                                 seed, fan_in_fan_out, blocks):
    """:func:`lora_forward` with a ``row_scale`` hook (the same ``y2``, bit for bit), also returning
    the pre-scale product ``P = x Wᵀ + s·uBᵀ`` on the adapted rows (``(T, adapted rows)``, in
    ``lora_B`` row order): ``(y2, u, P)``. With one adapter over every row, ``P`` is the GEMM's
    own output and ``y2`` a new tensor; otherwise ``P`` is a copy of the adapted columns and
    ``y2`` is scaled in place, so the rows without an adapter are never kept."""
    y2, u = lora_forward(x, weight, None, lora_A, lora_B, None, None, None, scaling, dropout_p, seed,
                         fan_in_fan_out, blocks)
    c = expand_rows(row_scale.factor(param, const), blocks, y2.shape[1], y2.dtype)
    if covers_all(blocks, y2.shape[1]):
        product, y2 = y2, y2 * c
    else:
        product = y2.new_empty(y2.shape[0], blocks[-1].b1)
        for o0, o1, _, _, b0, b1 in blocks:
            product[:, b0:b1] = y2[:, o0:o1]
        y2.mul_(c)
    if bias is not None:
        y2.add_(_cast(bias, y2.dtype))
    return y2, u, product


def _scatter_add(y: Tensor, parts) -> Tensor:
    pieces, last = [], 0
    for o0, o1, d in sorted(parts, key=lambda t: t[0]):
        if o0 > last:
            pieces.append(y[..., last:o0])
        pieces.append(y[..., o0:o1] + d)
        last = o1
    if last < y.shape[-1]:
        pieces.append(y[..., last:])
    return torch.cat(pieces, dim=-1)


def _composite(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out, blocks, drop=None, row_scale=None,
               param=None, const=None):
    """The same result from plain differentiable ops, ``drop`` (or nothing) applied
    to the LoRA branch's input, a ``row_scale`` hook's factor on the adapted rows. Used
    where a custom Function does not fit: ``torch.compile`` (dynamo traces it without
    graph breaks), ``torch.func`` transforms, and the differentiable backward."""
    scaled = row_scale is not None
    if _is_quantized(weight):  # the library's kernel, differentiable in x
        y = weight.linear(x).to(x.dtype)
        y = y if scaled or bias is None else y + _cast(bias, x.dtype)
    else:
        y = F.linear(x, _dense_t(weight, fan_in_fan_out, x.dtype), None if scaled else _cast(bias, x.dtype))
    u = F.linear(x if drop is None else drop(x), lora_A.to(x.dtype))
    B = lora_B.to(x.dtype)
    parts = [(o0, o1, F.linear(u[..., a0:a1], B[b0:b1]) * scaling) for o0, o1, a0, a1, b0, b1 in blocks]
    if len(parts) == 1 and parts[0][:2] == (0, y.shape[-1]):
        y = y + parts[0][2]
    else:
        y = _scatter_add(y, parts)
    if scaled:
        y = y * expand_rows(row_scale.factor(param, const), blocks, y.shape[-1], y.dtype)
        if bias is not None:
            y = y + _cast(bias, y.dtype)
    return y


# ----------------------------------------------------------------------------- the lean backward, one piece per gradient

def _grad_u(gs: Tensor, B: Tensor, R: int, scaling: float, blocks) -> Tensor:
    """``du = s · gs B``, gathered per block into ``(T, R)``."""
    if covers_all(blocks, gs.shape[1]):
        return (gs @ B).mul_(scaling)
    du = gs.new_empty(gs.shape[0], R)
    for o0, o1, a0, a1, b0, b1 in blocks:
        torch.mm(gs[:, o0:o1], B[b0:b1], out=du[:, a0:a1])
    return du.mul_(scaling)


def _g_t_u(g2: Tensor, u: Tensor, B: Tensor, blocks) -> Tensor:
    """``gᵀu`` per block, shaped like ``B``: ``dB`` before its scales, and part of ``dL/dc``."""
    H = g2.new_empty(B.shape)
    for o0, o1, a0, a1, b0, b1 in blocks:
        torch.mm(g2[:, o0:o1].t(), u[:, a0:a1], out=H[b0:b1])
    return H


def _grad_param(ctx, weight, x2, g2, H, B, param, const):
    """The hook's parameter gradient from ``z = dL/dc = Σ_t g ⊙ (x Wᵀ + s·uBᵀ)`` on the adapted
    rows: the base product is recomputed (one GEMM) rather than kept, so no ``T × out`` tensor is."""
    acc = torch.promote_types(g2.dtype, torch.float32)
    base = _base_matmul(weight, x2.to(g2.dtype), ctx.fan_in_fan_out).mul_(g2).sum(0, dtype=acc)
    z = gather_rows(base, ctx.blocks) + (H.to(acc) * B.to(acc)).sum(1) * ctx.scaling
    return ctx.row_scale.param_grad(param, const, z)


# Rows of g ⊙ P summed per step by _grad_param_kept: its accumulator stays in cache, where a whole
# T × out product would go through memory twice more.
_Z_ROWS = 256


def _grad_param_kept(ctx, product, g2, param, const):
    """The hook's parameter gradient from the kept product ``P``: ``z = Σ_t g ⊙ P`` on the adapted rows,
    accumulated in fp32 (fp64 for fp64 inputs) ``_Z_ROWS`` tokens at a time."""
    T = g2.shape[0]
    part = product.new_zeros(min(T, _Z_ROWS), product.shape[1], dtype=torch.promote_types(g2.dtype, torch.float32))
    for t0 in range(0, T, _Z_ROWS):
        n = min(_Z_ROWS, T - t0)
        for o0, o1, _, _, b0, b1 in ctx.blocks:
            part[:n, b0:b1].addcmul_(g2[t0:t0 + n, o0:o1], product[t0:t0 + n, b0:b1])
    return ctx.row_scale.param_grad(param, const, part.sum(0))


def _grad_x(ctx, weight, x, du, A, gs, mask) -> Tensor:
    """``dx = gs W + drop'(du A)``: seeded with the LoRA term, into which the base GEMM accumulates."""
    dx = input_grad(du, A, mask, ctx.dropout_p)
    if _is_quantized(weight):
        dx.add_(weight.grad_input(gs))  # dequantized on the fly, never kept
    else:
        dx.addmm_(gs, _dense_t(weight, ctx.fan_in_fan_out, gs.dtype))
    return dx.view(x.shape).to(x.dtype) if dx.dtype != x.dtype else dx.view(x.shape)


def _grad_weight(ctx, weight, x2, gs) -> Tensor:
    dw = gs.t() @ x2.to(gs.dtype)
    return (dw.t() if ctx.fan_in_fan_out else dw).to(weight.dtype)


class _LoRALinear(torch.autograd.Function):
    """Autograd for the torch backend: LoRA, with an optional row-scale hook (DoRA).

    ``x`` arrives in the compute dtype; the parameters keep their own dtypes
    and are cast here, so that only the originals (already alive) are saved
    and every gradient gets its input's dtype. Saved: ``x``, ``u = drop(x)Aᵀ``
    (``T × r``), the parameters and the hook's two tensors; never the dropout
    mask (regenerated from ``seed``) nor any ``T × out`` tensor, unless the hook
    asks to ``keep_product`` and its parameter needs a gradient: then also the
    pre-scale product of the adapted rows (the last saved tensor, None otherwise).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, param, const, row_scale, scaling, dropout_p, seed,
                fan_in_fan_out, blocks):
        product = None
        if row_scale is not None and getattr(row_scale, "keep_product", False) and ctx.needs_input_grad[5]:
            y2, u, product = lora_forward_keeping_product(x, weight, bias, lora_A, lora_B, param, const, row_scale,
                                                          scaling, dropout_p, seed, fan_in_fan_out, blocks)
        else:
            y2, u = lora_forward(x, weight, bias, lora_A, lora_B, param, const, row_scale, scaling, dropout_p, seed,
                                 fan_in_fan_out, blocks)
        quantized = _is_quantized(weight)
        ctx.save_for_backward(x, None if quantized else weight, bias, lora_A, lora_B, u, param, const, product)
        ctx.quantized_base = weight if quantized else None  # packed tensors the layer keeps anyway
        ctx.row_scale, ctx.scaling, ctx.dropout_p, ctx.seed = row_scale, scaling, dropout_p, seed
        ctx.fan_in_fan_out, ctx.blocks = fan_in_fan_out, blocks
        return y2.view(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: a higher-order derivative follows
            return _differentiable_backward(ctx, g)
        x, weight, bias, lora_A, lora_B, u, param, const, product = ctx.saved_tensors
        weight = ctx.quantized_base if weight is None else weight
        need_x, need_w, need_b, need_a, need_bb, need_p = ctx.needs_input_grad[:6]
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        A, B = _cast(lora_A, g2.dtype), _cast(lora_B, g2.dtype)
        # A row scale c: everything but the bias and the hook's parameter sees g ⊙ c.
        c = None if ctx.row_scale is None else expand_rows(ctx.row_scale.factor(param, const), ctx.blocks,
                                                            g2.shape[1], g2.dtype)
        gs = g2 if c is None else g2 * c
        du = _grad_u(gs, B, A.shape[0], ctx.scaling, ctx.blocks) if need_x or need_a else None
        H = _g_t_u(g2, u, B, ctx.blocks) if need_bb or (need_p and product is None) else None
        if need_p:
            dp = (_grad_param(ctx, weight, x2, g2, H, B, param, const) if product is None
                  else _grad_param_kept(ctx, product, g2, param, const))
        else:
            dp = None
        dB = None
        if need_bb:  # after dp, which reads H before it is scaled in place
            dB = (H if c is None else H.mul_(gather_rows(c, ctx.blocks)[:, None])).mul_(ctx.scaling).to(lora_B.dtype)
        mask = backward_mask(ctx.seed, x2, ctx.dropout_p) if need_x or need_a else None
        dA = grad_A(du, x2, mask, ctx.dropout_p).to(lora_A.dtype) if need_a else None
        dx = _grad_x(ctx, weight, x, du, A, gs, mask) if need_x else None
        dw = _grad_weight(ctx, weight, x2, gs) if need_w else None
        db = g2.sum(0).to(bias.dtype) if need_b else None
        return dx, dw, db, dA, dB, dp, None, None, None, None, None, None, None


def _differentiable_backward(ctx, g):
    """The same gradients as differentiable functions of the inputs: ``u`` is
    rebuilt from ``x`` and ``A`` (the saved one has no graph) and the mask from
    the seed, so double backward and gradient penalties are exact. Only runs
    under ``create_graph=True``; plain training keeps the lean backward."""
    x, weight, bias, lora_A, lora_B, _, param, const, _ = ctx.saved_tensors
    weight = ctx.quantized_base if weight is None else weight
    inputs = (x, weight, bias, lora_A, lora_B, param)
    wanted = [i for i, need in enumerate(ctx.needs_input_grad[:6]) if need]
    drop = seeded_dropout(ctx.seed, x, ctx.dropout_p)
    y = _composite(x, weight, bias, lora_A, lora_B, ctx.scaling, ctx.fan_in_fan_out, ctx.blocks, drop,
                   ctx.row_scale, param, const)
    grads = torch.autograd.grad(y, [inputs[i] for i in wanted], g, create_graph=True, allow_unused=True)
    out = [None] * 13
    for i, grad in zip(wanted, grads):
        out[i] = grad
    return tuple(out)
