"""``fused_linear_cross_entropy``: a language-model loss that never keeps the logits.

``F.cross_entropy(hidden @ weight.T + bias, labels)`` keeps a ``(tokens, vocab)``
log-softmax for backward: 131 MB for 1,024 tokens of a 32,064-word vocabulary in
fp32, often the largest single activation of a LoRA step. This computes the
same loss chunk by chunk of tokens and, in the same pass, the gradient with
respect to ``hidden`` (and ``weight``/``bias`` when they train). Backward only
scales what forward kept: ``(tokens, hidden)`` elements, not ``(tokens, vocab)``.

Tokens whose label is ``ignore_index`` are skipped before the projection, so a
prompt masked out of the loss costs no vocabulary-sized work at all.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .amp import compute_dtype, no_autocast
from .autograd import refuse_double_backward, tracing

__all__ = ["fused_linear_cross_entropy", "default_chunk_size", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")

# A chunk's fp32 logits may take as many bytes as the gradient this function
# keeps (tokens x hidden), but at least this many: smaller chunks make GEMMs too
# thin to run at full speed (measured in docs/benchmarks.md).
_MIN_CHUNK_BYTES = 32 * 2**20
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk when ``chunk_size=None``: bounded temporary memory.

    A chunk's fp32 logits (``chunk x vocab x 4`` bytes) are held to the size of
    the kept gradient in fp32 (``tokens x hidden x 4``), or 32 MiB if that is
    larger, and rounded down to a multiple of 64 tokens (at least 64).
    """
    budget = max(tokens * hidden * 4, _MIN_CHUNK_BYTES)
    chunk = budget // (4 * max(vocab, 1))
    return int(max(64, chunk - chunk % 64))


_DTYPE_MISMATCH = ("fused_linear_cross_entropy: hidden has dtype {x} but weight has dtype {w}; they must match "
                   "(cast one, or run under torch.autocast)")


def _check(hidden, weight, labels, bias, ignore_index, reduction, chunk_size, label_smoothing) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor) or t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab, hidden) with hidden = hidden.shape[-1]; got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got "
                        f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but weight has dtype {weight.dtype}; they must match")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")


def _select(h2: Tensor, y: Tensor, ignore_index: int, vocab: int):
    """The rows that count: ``(rows or None for all, h, y, n)``, after checking the labels' range."""
    keep = y != ignore_index
    n = int(keep.sum())
    rows = None
    if n < y.numel():
        rows = keep.nonzero().squeeze(1)
        h2, y = h2.index_select(0, rows), y.index_select(0, rows)
    if n:
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels must be in [0, vocab={vocab}) or equal ignore_index={ignore_index}, "
                             f"got {bad}")
    return rows, h2, y, n


def _chunk_loss_and_grad(h, y, W, b, smoothing: float, want_grad: bool):
    """Summed loss of one chunk (fp32 or fp64) and, if ``want_grad``, ``d loss_sum / d logits``."""
    z = F.linear(h, W, b)
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # softmax in fp32
    picked = z.gather(1, y.unsqueeze(1)).squeeze(1)
    if want_grad:
        # One pass gives the softmax (the gradient's main term) and, through the
        # label's probability, the loss: -log p_y = lse - z_y.
        dz = torch.softmax(z, dim=-1)
        p_y = dz.gather(1, y.unsqueeze(1)).squeeze(1)
        nll = p_y.log().neg_()
        tiny = p_y < torch.finfo(dz.dtype).tiny
        if bool(tiny.any()):  # p_y underflowed: take those rows' log-sum-exp from the logits
            rows = tiny.nonzero().squeeze(1)
            nll[rows] = torch.logsumexp(z[rows], dim=-1) - picked[rows]
    else:
        dz = None
        nll = torch.logsumexp(z, dim=-1) - picked
    if smoothing:
        # PyTorch's rule: (1 - ε) · nll + ε · mean over the vocabulary of -log p, where
        # -log p_j = lse - z_j and lse = z_y + nll.
        loss = (nll + smoothing * (picked - z.mean(-1))).sum()
    else:
        loss = nll.sum()
    if dz is not None:
        dz.scatter_add_(1, y.unsqueeze(1), dz.new_full((y.shape[0], 1), smoothing - 1.0))
        if smoothing:
            dz.sub_(smoothing / dz.shape[1])
    return loss, dz


def _loss_and_grads(h2, y, W, b, smoothing, chunk, need_h, need_w, need_b):
    """Sum of the token losses, and the unscaled gradients that were asked for."""
    acc = torch.float64 if h2.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=acc, device=h2.device)
    dh = h2.new_empty(h2.shape) if need_h else None
    dW = torch.zeros(W.shape, dtype=acc, device=W.device) if need_w else None
    db = torch.zeros(W.shape[0], dtype=acc, device=W.device) if need_b else None
    want = need_h or need_w or need_b
    for start in range(0, h2.shape[0], chunk):
        h = h2[start:start + chunk]
        loss, dz = _chunk_loss_and_grad(h, y[start:start + chunk], W, b, smoothing, want)
        total += loss
        if dz is None:
            continue
        if need_h:
            torch.mm(dz.to(h.dtype), W, out=dh[start:start + chunk])
        if need_w:  # in fp32 (fp64 for fp64 inputs): no (V, H) temporary per chunk
            dW.addmm_(dz.t(), h.to(acc))
        if need_b:
            db += dz.sum(0)
    return total, dh, dW, db


def _run(hidden, weight, labels, bias, ignore_index, chunk_size, smoothing, dt, need_h, need_w, need_b):
    """``(rows, loss sum, n, dh, dW, db)`` over the tokens that count (``rows``: their indices, None for all)."""
    H, V = hidden.shape[-1], weight.shape[0]
    rows, h2, y, n = _select(hidden.reshape(-1, H).to(dt), labels.reshape(-1).long(), ignore_index, V)
    chunk = chunk_size or default_chunk_size(h2.shape[0], H, V)
    total, dh, dW, db = _loss_and_grads(h2, y, weight.to(dt), None if bias is None else bias.to(dt), smoothing,
                                        chunk, need_h, need_w, need_b)
    return rows, total, n, dh, dW, db


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and every needed gradient; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, chunk_size, smoothing, dt):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with no_autocast(hidden.device.type):
            rows, total, n, dh, dW, db = _run(hidden, weight, labels, bias, ignore_index, chunk_size, smoothing,
                                              dt, need_h, need_w, need_b)
        if reduction == "mean":
            # F.cross_entropy: the mean over the tokens that count; nan (and zero gradients) if none do.
            loss, scale = total / n if n else total.new_full((), math.nan), 1.0 / n if n else 0.0
        else:
            loss, scale = total, 1.0
        ctx.save_for_backward(dh, rows, dW, db)
        ctx.scale, ctx.shape, ctx.dtypes = scale, hidden.shape, (hidden.dtype, weight.dtype,
                                                                  None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("fused_linear_cross_entropy",
                               "its gradients are computed in forward; use F.cross_entropy on the logits instead")
        dh, rows, dW, db = ctx.saved_tensors
        factor = g * ctx.scale
        d_hidden = d_weight = d_bias = None
        if dh is not None:
            dh = dh * factor.to(dh.dtype)
            if rows is not None:
                dh = dh.new_zeros(ctx.shape.numel() // ctx.shape[-1], dh.shape[1]).index_copy_(0, rows, dh)
            d_hidden = dh.view(ctx.shape).to(ctx.dtypes[0])
        if dW is not None:
            d_weight = (dW * factor).to(ctx.dtypes[1])
        if db is not None:
            d_bias = (db * factor).to(ctx.dtypes[2])
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


def _plain(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, dt):
    """The unfused loss from differentiable ops: for torch.compile and torch.func transforms."""
    logits = F.linear(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                               ignore_index: int = -100, reduction: str = "mean",
                               chunk_size: Optional[int] = None, label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` without keeping the logits.

    The tokens are processed in chunks. Each chunk's loss and its gradient with
    respect to ``hidden`` (and to ``weight``/``bias`` if they require grad,
    accumulated in fp32) are computed in forward; autograd keeps only those
    gradients, so a step keeps ``tokens x hidden`` elements where the unfused
    loss keeps ``tokens x vocab``. The softmax runs in fp32 for bf16/fp16
    inputs. Under ``torch.autocast`` the projection runs in the autocast dtype,
    as ``nn.Linear`` would.

    Args:
        hidden: ``(*, H)`` hidden states, e.g. the last hidden state of a causal LM
            (shifted: position ``t`` predicts ``labels[t]``).
        weight: ``(V, H)`` output projection, e.g. ``model.lm_head.weight``.
        labels: ``(*)`` integer class indices in ``[0, V)``, or ``ignore_index``.
        bias: ``(V,)`` or None.
        ignore_index: label of tokens that do not count (skipped entirely).
        reduction: ``"mean"`` (over the tokens that count, as ``F.cross_entropy``;
            nan if none do) or ``"sum"``.
        chunk_size: tokens per chunk; None picks :func:`default_chunk_size`.
        label_smoothing: as ``F.cross_entropy``, in ``[0, 1]``.

    Returns:
        A 0-dim loss: float32 for bf16/fp16 inputs, else the inputs' dtype.

    Raises:
        TypeError: a non-float ``hidden``/``weight``, non-integer ``labels``, or
            mismatched dtypes outside autocast.
        ValueError: shapes that do not fit, an unknown ``reduction``, a bad
            ``chunk_size``/``label_smoothing``, or a label outside ``[0, V)`` that
            is not ``ignore_index``.

    Double backward (``create_graph=True``) is not supported. Under
    ``torch.compile`` and ``torch.func`` transforms the unfused loss is computed
    instead (same value; no memory saving).
    """
    _check(hidden, weight, labels, bias, ignore_index, reduction, chunk_size, label_smoothing)
    dt = compute_dtype(hidden, weight, TypeError, _DTYPE_MISMATCH)
    smoothing = float(label_smoothing)
    if tracing():
        return _plain(hidden, weight, labels, bias, ignore_index, reduction, smoothing, dt)
    ignore_index = int(ignore_index)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, reduction, chunk_size,
                                              smoothing, dt)
    with no_autocast(hidden.device.type):
        _, total, n, *_ = _run(hidden, weight, labels, bias, ignore_index, chunk_size, smoothing, dt,
                               False, False, False)
    if reduction == "sum":
        return total
    return total / n if n else total.new_full((), math.nan)
