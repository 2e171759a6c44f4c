"""The LoRA math: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with a lean autograd.

``lora_linear`` is the one hot path used by :class:`~lora_layers.Linear` and
:class:`~lora_layers.MergedLinear`. Compared with the usual composition of
``nn.Dropout`` and two ``nn.Linear`` calls it

* adds the LoRA term into the base output in place (no ``T × out`` temporary);
* saves only ``x`` (already alive for the base layer) and ``u = drop(x) Aᵀ``
  (``T × r``) for backward. The dropout mask is *not* stored: backward
  regenerates it from a seed drawn in forward, so dropout costs no activation
  memory at all;
* computes only the gradients autograd asks for, and accumulates the LoRA part
  of ``dx`` in place into the base ``dx``.

Fused layers (qkv, gate_up) are described by ``segments``: one
``(out_start, out_end)`` pair per enabled split, or a
:class:`~lora_layers.segments.Segments`, which knows which rows of ``lora_A``
and ``lora_B`` each split uses. The full ``ΔW`` is never built.

Backends: ``"torch"`` (this file, the reference), ``"triton"`` (fused kernels
in :mod:`lora_layers.kernels`, optional, opt-in) and ``"auto"``. Today
``"auto"`` always takes the torch path: it will pick Triton for CUDA tensors
only once the kernels have been validated on a GPU (``AUTO_USES_TRITON``).
The environment variable ``LORA_LAYERS_BACKEND`` overrides the backend of
every call.

Where a custom autograd Function does not fit (``torch.compile``,
``torch.func`` transforms such as ``vmap``/``jacrev``, and backward with
``create_graph=True``), the same result is computed from plain differentiable
ops, so higher-order derivatives are exact; plain training keeps the lean path.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import recipes
from .amp import autocast_available, no_autocast
from .segments import Block, Segments

__all__ = ["lora_linear", "lora_embedding", "lora_conv", "dora_weight_norm", "row_sq_norm", "draw_seed",
           "drop_mask", "keep_mask", "keep_scale", "dora_row_scale",
           "dropout_mask", "BACKENDS", "BACKEND_ENV"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "LORA_LAYERS_BACKEND"

_SEED_HIGH = 2**62


def draw_seed() -> int:
    """The seed of one forward's dropout mask (:func:`drop_mask`).

    Drawn from torch's default CPU generator, so ``torch.manual_seed`` makes
    dropout reproducible; a CPU draw never synchronises a GPU stream.
    """
    return int(torch.randint(_SEED_HIGH, (1,)).item())


_LANES = 65536  # the drop probability is quantised to 1/65536


def _drop_threshold(p: float) -> int:
    # At most 65535/65536, so that some element is kept and the scale is finite.
    return min(round(p * _LANES), _LANES - 1)


def keep_scale(p: float) -> float:
    """The inverted-dropout scale ``1/(1-p')`` for the quantised probability ``p'``."""
    return _LANES / (_LANES - _drop_threshold(p))


def drop_mask(seed: int, shape, p: float, device) -> Tensor:
    """The boolean dropout mask for ``seed``: True where an element is dropped.

    Each element gets 16 random bits: one 64-bit draw serves four elements,
    several times cheaper on CPU than ``bernoulli_``. An element is dropped
    with probability ``p' = round(p·65536)/65536`` (``p=0.05`` gives
    ``0.0500031``); kept elements are scaled by :func:`keep_scale`.
    Deterministic in ``seed``, so backward regenerates exactly the mask that
    forward used.
    """
    n = math.prod(shape)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=gen)  # all 64 bits
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes < _drop_threshold(p) - _LANES // 2


def keep_mask(seed: int, shape, p: float, device) -> Tensor:
    """The complement of :func:`drop_mask`: True where an element is kept."""
    return ~drop_mask(seed, shape, p, device)


def dropout_mask(seed: int, like: Tensor, p: float) -> Tensor:
    """The scaled dropout mask (``0`` or :func:`keep_scale`) for ``seed``, shaped and typed like ``like``.

    A reference helper for tests; the hot path uses :func:`drop_mask` directly.
    """
    keep = keep_mask(seed, like.shape, p, like.device)
    return keep.to(like.dtype).mul_(keep_scale(p))


def _resolve_segments(lora_A: Tensor, lora_B: Tensor, out_features: int, segments) -> Tuple[Block, ...]:
    """The adapter blocks for ``segments`` (None: the whole output), after checking the shapes."""
    segs = Segments.of(segments, out_features)
    return segs.blocks(segs.rank_of(lora_A, lora_B))


# The dtypes autocast lowers; it never touches float64 (or complex, or integers).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's for eligible inputs, else ``x``'s,
    which must then equal the weight's (``nn.Linear`` refuses a mismatch too)."""
    device = x.device.type
    if x.dtype in _AUTOCAST_ELIGIBLE and autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if x.dtype != weight.dtype:
        raise RuntimeError(
            f"lora_linear: x has dtype {x.dtype} but the weight has dtype {weight.dtype}; they must match, as for "
            f"nn.Linear (cast the input, or run under torch.autocast)"
        )
    return x.dtype


def _functorch_active() -> bool:
    """True inside torch.func transforms (vmap, grad, jacrev, ...), which need plain differentiable ops."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _seed_output(u: Tensor, B: Tensor, scaling: float, bias: Optional[Tensor], blocks, out_features: int) -> Tensor:
    """A fresh ``(T, out)`` tensor holding ``b + scaling · u Bᵀ`` (per block).

    The base GEMM then accumulates into it (``addmm_`` with beta=1), so the
    LoRA term costs one write of the output instead of a separate
    read-modify-write pass after the GEMM.
    """
    Bs = B * scaling  # (out, r): folding the scale here is free
    y2 = u.new_empty(u.shape[0], out_features)
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


def _fill_bias(dst: Tensor, bias: Optional[Tensor], o0: int, o1: int) -> None:
    if bias is None:
        dst.zero_()
    else:
        dst.copy_(bias[o0:o1].expand_as(dst))


def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, blocks, magnitude=None,
             norm=None):
    """The forward math on an ``x`` already in the compute dtype; returns ``(y2, u)``
    with ``y2`` of shape ``(T, out)`` and ``u = drop(x) Aᵀ`` of shape ``(T, R)``.
    With a ``magnitude`` (DoRA), ``y2 = (m / norm) ⊙ (x Wᵀ + s·uBᵀ) + b``, in place."""
    if magnitude is not None:
        y2, u = _forward(x, weight, None, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, blocks)
        y2.mul_(_dora_scale(magnitude, norm, blocks, y2.shape[1], y2.dtype))
        if bias is not None:
            y2.add_(_cast(bias, y2.dtype))
        return y2, u
    x2 = x.reshape(-1, x.shape[-1])
    A = _cast(lora_A, x2.dtype)
    B = _cast(lora_B, x2.dtype)
    if dropout_p > 0.0:
        # The keep-scale is applied to the (T, r) product, not to x.
        u = torch.where(drop_mask(seed, x2.shape, dropout_p, x2.device), 0.0, x2) @ A.t()
        u.mul_(keep_scale(dropout_p))
    else:
        u = x2 @ A.t()
    y2 = _seed_output(u, B, scaling, _cast(bias, x2.dtype), blocks, _out_features(weight, fan_in_fan_out))
    if _is_quantized(weight):
        y2.add_(weight.linear(x2).to(y2.dtype))  # the library's kernel writes its own output
    else:
        y2.addmm_(x2, _cast(weight.t() if fan_in_fan_out else weight, x2.dtype).t())
    return y2, u


def _covers_all(blocks, out_features: int) -> bool:
    """One adapter over every output row (no per-block bookkeeping). Fields, not slices:
    slicing a NamedTuple breaks older dynamo."""
    return len(blocks) == 1 and blocks[0].out0 == 0 and blocks[0].out1 == out_features


def _is_quantized(weight) -> bool:
    """A frozen quantized base (:class:`lora_layers.quantized.QuantizedBase`) instead of a weight tensor."""
    return not isinstance(weight, Tensor)


def _out_features(weight, fan_in_fan_out: bool) -> int:
    return weight.shape[1] if fan_in_fan_out else weight.shape[0]


def _base_matmul(weight, x2: Tensor, fan_in_fan_out: bool) -> Tensor:
    """``x Wᵀ`` for a weight tensor or a quantized base."""
    if _is_quantized(weight):
        return weight.linear(x2).to(x2.dtype)
    return torch.mm(x2, _cast(weight.t() if fan_in_fan_out else weight, x2.dtype).t())


def dora_row_scale(magnitude: Tensor, norm: Tensor) -> Tensor:
    """DoRA's factor ``m / ‖W + s·BA‖`` per adapted row, and 1 where the norm is 0.

    A zero norm (a pruned neuron: its weight row and ``B`` row are zero) would give
    ``0/0``; the factor 1 keeps that row's base output, and its gradient in ``m`` is 0,
    so nothing turns NaN (PEFT gives NaN there). Differentiable in ``magnitude``;
    ``norm`` is a constant. In the promoted dtype of the two.
    """
    zero = norm == 0
    ratio = magnitude.to(torch.promote_types(magnitude.dtype, norm.dtype)) / norm.masked_fill(zero, 1)
    return ratio.masked_fill(zero, 1)


def _dora_scale(magnitude: Tensor, norm: Tensor, blocks, out_features: int, dtype: torch.dtype) -> Tensor:
    """The per-output factor ``m / ‖W + s·BA‖`` (:func:`dora_row_scale`) as an ``(out,)`` vector,
    1 on rows without an adapter.

    Plain differentiable ops in ``magnitude`` (``norm`` is a constant, as in the
    DoRA paper's section 4.3).
    """
    ratio = dora_row_scale(magnitude, norm)
    if _covers_all(blocks, out_features):
        return ratio.to(dtype)
    pieces, last = [], 0
    for blk in sorted(blocks):
        if blk.out0 > last:
            pieces.append(ratio.new_ones(blk.out0 - last))
        pieces.append(ratio[blk.b0:blk.b1])
        last = blk.out1
    if last < out_features:
        pieces.append(ratio.new_ones(out_features - last))
    return torch.cat(pieces).to(dtype)


class _LoRALinear(torch.autograd.Function):
    """Autograd for the torch backend, LoRA and (with a ``magnitude``) DoRA.

    ``x`` arrives in the compute dtype; the parameters keep their own dtypes
    and are cast here, so that only the originals (already alive) are saved
    and every gradient gets its input's dtype. Saved: ``x``, ``u = drop(x)Aᵀ``
    (``T × r``), the parameters, and for DoRA the ``(out,)`` norm; never the
    dropout mask (regenerated from ``seed``) nor any ``T × out`` tensor.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, fan_in_fan_out,
                blocks):
        y2, u = _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, blocks,
                         magnitude, norm)
        quantized = _is_quantized(weight)
        ctx.save_for_backward(x, None if quantized else weight, bias, lora_A, lora_B, u, magnitude, norm)
        ctx.quantized_base = weight if quantized else None  # packed tensors the layer keeps anyway
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.fan_in_fan_out, ctx.blocks = fan_in_fan_out, blocks
        return y2.view(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: a higher-order derivative follows
            return _LoRALinear._differentiable_backward(ctx, g)
        x, weight, bias, lora_A, lora_B, u, magnitude, norm = ctx.saved_tensors
        weight = ctx.quantized_base if weight is None else weight
        need_x, need_w, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
        s, p, blocks = ctx.scaling, ctx.dropout_p, ctx.blocks
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dt = g2.dtype
        A = _cast(lora_A, dt)
        B = _cast(lora_B, dt)
        full = _covers_all(blocks, g2.shape[1])

        dx = dw = db = dA = dB = dm = None
        # DoRA: everything but the bias and the magnitude sees g ⊙ (m / norm).
        scale = None if magnitude is None else _dora_scale(magnitude, norm, blocks, g2.shape[1], dt)
        gs = g2 if scale is None else g2 * scale
        du = None
        if need_x or need_a:
            # du = s · gs B, gathered per block into (T, R)
            if full:
                du = (gs @ B).mul_(s)
            else:
                du = gs.new_empty(gs.shape[0], A.shape[0])
                for o0, o1, a0, a1, b0, b1 in blocks:
                    torch.mm(gs[:, o0:o1], B[b0:b1], out=du[:, a0:a1])
                du.mul_(s)
        if need_bb or need_m:
            H = g2.new_empty(B.shape)  # gᵀu per block: dB, and DoRA's magnitude gradient
            for o0, o1, a0, a1, b0, b1 in blocks:
                torch.mm(g2[:, o0:o1].t(), u[:, a0:a1], out=H[b0:b1])
        if need_m:
            # dL/dm = Σ_t g ⊙ (x Wᵀ + s·uBᵀ) / norm: the base product is recomputed
            # (one GEMM) rather than kept, so DoRA saves no T × out tensor.
            acc = torch.promote_types(dt, torch.float32)
            z = _gather_rows(_base_matmul(weight, x2.to(dt), ctx.fan_in_fan_out).mul_(g2).sum(0, dtype=acc), blocks)
            z = z + (H.to(acc) * B.to(acc)).sum(1) * s
            zero = norm == 0  # dora_row_scale's factor is 1 there, whatever m
            dm = (z / norm.masked_fill(zero, 1)).masked_fill_(zero, 0).to(magnitude.dtype)
        if need_bb:
            dB = (H if scale is None else H.mul_(_gather_rows(scale, blocks)[:, None])).mul_(s).to(lora_B.dtype)

        drop = drop_mask(ctx.seed, x2.shape, p, x2.device) if p > 0.0 and (need_x or need_a) else None
        if need_a:
            if drop is None:
                dA = du.t() @ x2
            else:
                dA = (du.t() @ torch.where(drop, 0.0, x2)).mul_(keep_scale(p))
            dA = dA.to(lora_A.dtype)
        if need_x:
            # Seed dx with the LoRA term, then let the base GEMM accumulate into it.
            if drop is None:
                dx = du @ A
            else:
                dx = ((du * keep_scale(p)) @ A).masked_fill_(drop, 0)
            if _is_quantized(weight):
                dx.add_(weight.grad_input(gs))  # dequantized on the fly, never kept
            else:
                dx.addmm_(gs, _cast(weight.t() if ctx.fan_in_fan_out else weight, dt))
            dx = dx.view(x.shape).to(x.dtype) if dx.dtype != x.dtype else dx.view(x.shape)
        if need_w:
            dw = gs.t() @ x2.to(dt)
            if ctx.fan_in_fan_out:
                dw = dw.t()
            dw = dw.to(weight.dtype)
        if need_b:
            db = g2.sum(0).to(bias.dtype)
        return dx, dw, db, dA, dB, dm, None, None, None, None, None, None

    @staticmethod
    def _differentiable_backward(ctx, g):
        """The same gradients as differentiable functions of the inputs: ``u`` is
        rebuilt from ``x`` and ``A`` (the saved one has no graph) and the mask from
        the seed, so double backward and gradient penalties are exact. Only runs
        under ``create_graph=True``; plain training keeps the lean backward."""
        x, weight, bias, lora_A, lora_B, _, magnitude, norm = ctx.saved_tensors
        weight = ctx.quantized_base if weight is None else weight
        inputs = (x, weight, bias, lora_A, lora_B, magnitude)
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[:6]) if need]
        drop = None
        if ctx.dropout_p > 0.0:
            dropped = drop_mask(ctx.seed, (x.numel() // x.shape[-1], x.shape[-1]), ctx.dropout_p,
                                x.device).view(x.shape)
            scale = keep_scale(ctx.dropout_p)
            drop = lambda t: torch.where(dropped, 0.0, t) * scale  # noqa: E731
        y = _composite(x, weight, bias, lora_A, lora_B, ctx.scaling, ctx.fan_in_fan_out, ctx.blocks, drop,
                       magnitude, norm)
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], g, create_graph=True, allow_unused=True)
        out = [None] * 12
        for i, grad in zip(wanted, grads):
            out[i] = grad
        return tuple(out)


def _gather_rows(vector: Tensor, blocks) -> Tensor:
    """The entries of an ``(out,)`` vector on the adapted rows, in ``lora_B`` row order."""
    if len(blocks) == 1:
        return vector[blocks[0].out0:blocks[0].out1]
    return torch.cat([vector[o0:o1] for o0, o1, *_ in blocks])


def _composite(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out, blocks, drop=None, magnitude=None,
               norm=None):
    """The same result from plain differentiable ops, ``drop`` (or nothing) applied
    to the LoRA branch's input, DoRA's factor with a ``magnitude``. Used where a
    custom Function does not fit: ``torch.compile`` (dynamo traces it without
    graph breaks), ``torch.func`` transforms, and the differentiable backward."""
    dora = magnitude is not None
    if _is_quantized(weight):  # the library's kernel, differentiable in x
        y = weight.linear(x).to(x.dtype)
        y = y if dora or bias is None else y + _cast(bias, x.dtype)
    else:
        W = _cast(weight.t() if fan_in_fan_out else weight, x.dtype)
        y = F.linear(x, W, None if dora else _cast(bias, x.dtype))
    u = F.linear(x if drop is None else drop(x), lora_A.to(x.dtype))
    B = lora_B.to(x.dtype)
    parts = [(o0, o1, F.linear(u[..., a0:a1], B[b0:b1]) * scaling) for o0, o1, a0, a1, b0, b1 in blocks]
    if len(parts) == 1 and parts[0][:2] == (0, y.shape[-1]):
        y = y + parts[0][2]
    else:
        y = _scatter_add(y, parts)
    if dora:
        y = y * _dora_scale(magnitude, norm, blocks, y.shape[-1], y.dtype)
        if bias is not None:
            y = y + _cast(bias, y.dtype)
    return y


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


def resolve_backend(backend: str) -> str:
    """The backend a call will use before dispatch checks: the environment
    variable ``LORA_LAYERS_BACKEND`` wins over the argument when set."""
    env = os.environ.get(BACKEND_ENV, "").strip().lower()
    choice = env or backend
    if choice not in BACKENDS:
        source = f"environment variable {BACKEND_ENV}" if env else "backend"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    return choice


# "auto" picks the Triton kernels only once they have been validated on a GPU
# (benchmarks/bench_kernels.py); until then they are opt-in via backend="triton".
AUTO_USES_TRITON = False


def _use_triton(backend, x, weight, bias, lora_A, lora_B, dropout_p, segments, fan_in_fan_out) -> bool:
    if backend == "torch" or (backend == "auto" and not (AUTO_USES_TRITON and x.is_cuda)):
        return False
    if torch.compiler.is_compiling() or _functorch_active():
        return False  # the kernels would break the graph / lack functorch rules; the torch path fits
    from .. import kernels  # lazy: importing the package never needs triton

    if not kernels.is_available():
        if backend == "triton":
            raise RuntimeError(
                f"backend='triton' was requested but the kernels cannot run here: {kernels.unavailable_reason()}"
            )
        return False
    ok, why = kernels.supports(x, weight, lora_A, lora_B, dropout_p, segments, bias=bias,
                               fan_in_fan_out=fan_in_fan_out)
    if not ok:
        log.debug("lora_linear: triton backend declined (%s); using the torch path", why)
    return ok


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    fan_in_fan_out: bool = False,
    segments: Optional[Sequence[Tuple[int, int]]] = None,
    backend: str = "auto",
    magnitude: Optional[Tensor] = None,
    weight_norm: Optional[Tensor] = None,
) -> Tensor:
    """``x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with a lean autograd; DoRA with a ``magnitude``.

    DoRA (``magnitude`` given) computes ``(m / ‖W + s·BA‖) ⊙ (x Wᵀ + s·dropout(x) Aᵀ Bᵀ) + b``
    on the adapted rows, with the row norm a constant in backward (the paper's
    section 4.3), and the factor 1 on a row whose norm is 0 (:func:`dora_row_scale`). The norm comes from :func:`dora_weight_norm` (``W + s·BA`` is never
    built), and backward keeps no ``T × out`` tensor: the magnitude's gradient
    recomputes ``x Wᵀ`` (one extra GEMM) instead.

    Args:
        x: input ``(*, in)``.
        weight: ``(out, in)``, or ``(in, out)`` with ``fan_in_fan_out=True``; or a frozen
            quantized base (:class:`~lora_layers.quantized.QuantizedBase`), whose own kernel
            computes ``x Wᵀ`` and whose ``g W`` in backward dequantizes on the fly (QLoRA).
        bias: ``(out,)`` or None.
        lora_A: ``(R, in)``; ``R = r`` or ``r · len(segments)``. May have its own dtype.
        lora_B: ``(out, r)``, or ``(Σ enabled slice sizes, r)`` with ``segments``.
        scaling: the LoRA scale (``alpha / r`` or ``alpha / √r``).
        dropout_p: dropout probability on the LoRA branch input, in ``[0, 1)``.
        training: dropout is applied only when True.
        fan_in_fan_out: the weight is stored transposed (GPT-2 ``Conv1D`` style).
        segments: ``(out_start, out_end)`` per enabled split of a fused layer, or a
            :class:`~lora_layers.segments.Segments`; None for one adapter over every output.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (DoRA always runs the torch path).
        magnitude: DoRA's magnitude, one entry per adapted output row (``(out,)``, or
            ``(Σ enabled slice sizes,)`` with ``segments``); None for plain LoRA.
        weight_norm: ``‖W + s·BA‖`` per adapted row, if already known (else computed).

    Returns:
        ``(*, out)`` in the compute dtype: ``x``'s dtype, or the autocast dtype.
    """
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    quantized = _is_quantized(weight)
    if quantized and fan_in_fan_out:
        raise ValueError("a quantized base is stored (out, in): fan_in_fan_out must be False")
    out_features = _out_features(weight, fan_in_fan_out)
    blocks = _resolve_segments(lora_A, lora_B, out_features, segments)
    segments = None if _covers_all(blocks, out_features) else tuple((b.out0, b.out1) for b in blocks)

    norm = None
    if magnitude is not None:
        if tuple(magnitude.shape) != (blocks[-1].b1,):
            raise ValueError(f"magnitude must have shape ({blocks[-1].b1},) (one entry per adapted output row), "
                             f"got {tuple(magnitude.shape)}")
        norm = weight_norm if weight_norm is not None else dora_weight_norm(
            weight.dequantize() if quantized else weight, lora_A, lora_B, scaling, segments,
            fan_in_fan_out=fan_in_fan_out)

    choice = resolve_backend(backend)
    plain = magnitude is None and not quantized  # the kernels know neither DoRA nor packed weights
    if choice != "torch" and plain and _use_triton(choice, x, weight, bias, lora_A, lora_B, p, segments,
                                                   fan_in_fan_out):
        from .. import kernels

        return kernels.lora_linear(
            x, weight, bias, lora_A, lora_B, scaling, p, True,
            fan_in_fan_out=fan_in_fan_out, segments=segments,
        )

    # A quantized base computes in its own dtype and returns x's (as bitsandbytes' layers do).
    dt = x.dtype if quantized else _compute_dtype(x, weight)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B, magnitude)
    )
    if torch.compiler.is_compiling() or _functorch_active():
        # Under torch.compile the plain-op form traces without graph breaks
        # (the custom Function's seeded mask needs a torch.Generator, and its
        # per-split ``out=`` writes into column slices are not traceable);
        # inductor then fuses and recomputes as it sees fit. torch.func
        # transforms (vmap, jacrev, ...) need it too; their dropout is F.dropout's.
        drop = (lambda t: F.dropout(t, p, True)) if p > 0.0 else None  # noqa: E731
        return _composite(_cast(x, dt), weight, bias, lora_A, lora_B, scaling, fan_in_fan_out, blocks, drop,
                          magnitude, norm)
    if x.is_meta:
        p = 0.0  # shapes only: no mask to draw
    # The mask depends only on the seed, drawn the same way with or without
    # grad: reentrant checkpointing reruns a no-grad forward with grad enabled
    # and must see the same mask.
    seed = draw_seed() if p > 0.0 else 0
    with no_autocast(x.device.type):
        if not needs_grad:
            y2, _ = _forward(_cast(x, dt), weight, bias, lora_A, lora_B, float(scaling), p, seed,
                             fan_in_fan_out, blocks, magnitude, norm)
            return y2.view(*x.shape[:-1], y2.shape[-1])
        args = (weight, bias, lora_A, lora_B, magnitude, norm, float(scaling), p, seed, fan_in_fan_out, blocks)
        recipe = recipes.find(x)
        if recipe is not None:  # x can be rebuilt from tensors autograd keeps anyway: keep those (lora_layers.lean)
            return recipes.apply_rebuilding_input(recipe, _LoRALinear, x, dt, args)
        return _LoRALinear.apply(_cast(x, dt), *args)


def row_sq_norm(weight: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """``‖W_o‖²`` per output row, in fp32 (fp64 for an fp64 weight): the first term of DoRA's norm."""
    W = weight.detach().t() if fan_in_fan_out else weight.detach()
    acc = torch.promote_types(W.dtype, torch.float32)
    return torch.linalg.vector_norm(W.to(acc), dim=1).square_()


@torch.no_grad()
def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, segments=None, *,
                     fan_in_fan_out: bool = False) -> Tensor:
    """DoRA's ``‖W + s·BA‖`` per adapted output row, without building ``W + s·BA``.

    ``‖W_o + s·(BA)_o‖² = ‖W_o‖² + 2s·B_o·(W Aᵀ)_o + s²·B_o (A Aᵀ) B_oᵀ``: the
    cross term needs ``W Aᵀ`` (``out × r``), the last ``A Aᵀ`` (``r × r``). Computed
    in fp32 (fp64 for fp64 weights) whatever the weight's dtype, so a bf16 base
    loses nothing to cancellation beyond fp32 rounding.

    Args:
        weight, lora_A, lora_B, scaling, segments, fan_in_fan_out: as :func:`lora_linear`.

    Returns:
        ``(Σ adapted rows,)``, in ``lora_B``'s row order, detached.
    """
    W = weight.detach().t() if fan_in_fan_out else weight.detach()
    acc = torch.promote_types(W.dtype, torch.float32)
    blocks = _resolve_segments(lora_A, lora_B, W.shape[0], segments)
    weight_sq_norm = row_sq_norm(weight, fan_in_fan_out)
    A, B = lora_A.detach().to(acc), lora_B.detach().to(acc)
    pieces = []
    for o0, o1, a0, a1, b0, b1 in blocks:
        Aj, Bj = A[a0:a1], B[b0:b1]
        cross = (Bj * (W[o0:o1].to(acc) @ Aj.t())).sum(1)
        square = ((Bj @ (Aj @ Aj.t())) * Bj).sum(1)
        pieces.append(weight_sq_norm[o0:o1].to(acc) + (2 * scaling) * cross + (scaling * scaling) * square)
    return torch.cat(pieces).clamp_min_(0).sqrt_()


def lora_embedding(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                   padding_idx: Optional[int] = None, max_norm: Optional[float] = None, norm_type: float = 2.0,
                   scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """``W[x] + scaling · Aᵀ[x] Bᵀ``: an embedding lookup plus its LoRA adapter.

    Args:
        x: integer indices ``(*)``.
        weight: ``(num_embeddings, dim)``.
        lora_A: ``(r, num_embeddings)``; lora_B: ``(dim, r)``.
        scaling: the LoRA scale.
        padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse: as
            ``F.embedding``, applied to the base lookup. The adapter lookup is
            always dense and never renormalised (a sparse gradient of the
            transposed ``lora_A`` cannot be formed, and ``max_norm`` would
            renormalise ``lora_A`` in place).

    Returns:
        ``(*, dim)`` in the weight's dtype.
    """
    result = F.embedding(x, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    after_A = F.embedding(x, lora_A.t(), padding_idx, None, 2.0, scale_grad_by_freq, False)
    # The lookup's backward needs only the indices, so adding into its output
    # in place is safe and avoids a (T, dim) temporary.
    result.view(-1, result.shape[-1]).addmm_(
        after_A.reshape(-1, lora_A.shape[0]).to(result.dtype), lora_B.to(result.dtype).t(), alpha=scaling)
    return result


def lora_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
              conv, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """``conv(x, W, b) + scaling · conv(dropout(x), ΔW)`` with ``ΔW = (B A)`` in ``W``'s shape.

    Args:
        x: the input ``(N, C_in, *spatial)``.
        weight: ``(C_out, C_in/groups, *kernel)``; bias ``(C_out,)`` or None.
        lora_A: ``(r, C_in/groups · ∏kernel)``; lora_B: ``(C_out, r)``.
        scaling: the LoRA scale.
        conv: ``conv(input, weight, bias)`` with the layer's stride, padding,
            dilation, groups and padding mode (a conv module's ``_conv_forward``).
        dropout_p, training: dropout on the adapter's input, when training.

    Without dropout this is one convolution with the patched weight (``ΔW`` is
    kernel-sized, so building it is cheap); with dropout, two.
    """
    delta = (lora_B.to(weight.dtype) @ lora_A.to(weight.dtype)).view(weight.shape)
    p = float(dropout_p) if training else 0.0
    if p == 0.0:
        return conv(x, weight + delta * scaling, bias)
    return conv(x, weight, bias) + scaling * conv(F.dropout(x, p, True), delta, None)
