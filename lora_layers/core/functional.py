"""The LoRA functional core: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with a lean autograd.

``lora_linear`` is the one hot path used by :class:`~lora_layers.Linear` and
:class:`~lora_layers.MergedLinear`. Compared with the usual composition of
``nn.Dropout`` and two ``nn.Linear`` calls it

* adds the LoRA term into the base output in place (no ``T × out`` temporary);
* saves only ``x`` (already alive for the base layer) and ``u = drop(x) Aᵀ``
  (``T × r``) for backward. The dropout mask is *not* stored: backward
  regenerates it from a seed drawn in forward, so dropout costs no activation
  memory at all (:mod:`.dropout`);
* computes only the gradients autograd asks for, and accumulates the LoRA part
  of ``dx`` in place into the base ``dx`` (:mod:`.autograd`).

``lora_linear`` itself only checks its arguments, picks a path and hands the call
to that path's executor: the Triton kernels, the plain-op form (torch.compile and
torch.func), the no-grad forward, the lean Function keeping a rebuildable input
(:mod:`.recipes`), or the lean Function. A variant that rescales the adapted rows
(DoRA) passes a :class:`~.row_scale.RowScale` hook; the public
:func:`lora_layers.functional.lora_linear` builds DoRA's from ``magnitude=``.

Fused layers (qkv, gate_up) are described by ``segments``: one
``(out_start, out_end)`` pair per enabled split, or a
:class:`~lora_layers.segments.Segments`, which knows which rows of ``lora_A``
and ``lora_B`` each split uses. The full ``ΔW`` is never built.

Backends: ``"torch"`` (the reference), ``"triton"`` (fused kernels
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
import os
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import recipes
from .amp import compute_dtype, no_autocast
from .autograd import _cast, _composite, _is_quantized, _LoRALinear, _out_features, lora_forward, tracing
from .dropout import draw_seed, random_dropout
from .row_scale import RowScale
from .segments import Block, Segments, covers_all

__all__ = ["lora_linear", "lora_embedding", "lora_conv", "BACKENDS", "BACKEND_ENV"]

# The public module name, as before the folders: logging.getLogger("lora_layers.functional") still
# shows the "triton backend declined" debug lines (docs/kernels.md).
log = logging.getLogger("lora_layers.functional")

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "LORA_LAYERS_BACKEND"

_DTYPE_MISMATCH = ("lora_linear: x has dtype {x} but the weight has dtype {w}; they must match, as for "
                   "nn.Linear (cast the input, or run under torch.autocast)")


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
    if tracing():
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


class _Call(NamedTuple):
    """One ``lora_linear`` call after its checks: what every executor takes."""

    x: Tensor
    weight: object  # a weight tensor or a quantized base
    bias: Optional[Tensor]
    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    p: float  # the dropout probability in effect (0 outside training)
    fan_in_fan_out: bool
    blocks: Tuple[Block, ...]
    segments: Optional[Tuple[Tuple[int, int], ...]]  # None for one adapter over every output row
    row_scale: Optional[RowScale]
    param: Optional[Tensor]  # the hook's prepared tensors (RowScale.prepare)
    const: Optional[Tensor]


def _checked_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, segments,
                  row_scale) -> _Call:
    """Check the arguments (in the order the errors are documented) and normalise them."""
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if _is_quantized(weight) and fan_in_fan_out:
        raise ValueError("a quantized base is stored (out, in): fan_in_fan_out must be False")
    out_features = _out_features(weight, fan_in_fan_out)
    blocks = Segments.of(segments, out_features).adapter_blocks(lora_A, lora_B)
    segments = None if covers_all(blocks, out_features) else tuple((b.out0, b.out1) for b in blocks)
    param = const = None
    if row_scale is not None:
        param, const = row_scale.prepare(weight, lora_A, lora_B, scaling, segments, fan_in_fan_out=fan_in_fan_out,
                                         rows=blocks[-1].b1)
    return _Call(x, weight, bias, lora_A, lora_B, scaling, p, fan_in_fan_out, blocks, segments, row_scale, param,
                 const)


def _route(call: _Call, backend: str):
    """The executor that runs ``call``: one of the ``_run_*`` functions below."""
    choice = resolve_backend(backend)
    plain = call.row_scale is None and not _is_quantized(call.weight)  # the kernels know neither
    if choice != "torch" and plain and _use_triton(choice, call.x, call.weight, call.bias, call.lora_A, call.lora_B,
                                                   call.p, call.segments, call.fan_in_fan_out):
        return _run_triton
    if tracing():
        return _run_composite
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (call.x, call.weight, call.bias, call.lora_A, call.lora_B,
                                                    call.param))
    if not needs_grad:
        return _run_no_grad
    # x can be rebuilt from tensors autograd keeps anyway (lora_layers.lean): keep those instead
    return _run_recipe if recipes.find(call.x) is not None else _run_autograd


def _run_triton(call: _Call) -> Tensor:
    from .. import kernels  # lazy: importing the package never needs triton

    return kernels.lora_linear(call.x, call.weight, call.bias, call.lora_A, call.lora_B, call.scaling, call.p, True,
                               fan_in_fan_out=call.fan_in_fan_out, segments=call.segments)


def _dtype(call: _Call) -> torch.dtype:
    """The compute dtype. A quantized base computes in its own dtype and returns x's (as
    bitsandbytes' layers do)."""
    if _is_quantized(call.weight):
        return call.x.dtype
    return compute_dtype(call.x, call.weight, RuntimeError, _DTYPE_MISMATCH)


def _run_composite(call: _Call) -> Tensor:
    """Plain differentiable ops: under torch.compile they trace without graph breaks (the
    Function's seeded mask needs a torch.Generator, and its per-split ``out=`` writes into
    column slices are not traceable), and torch.func transforms need them; their dropout is
    F.dropout's."""
    return _composite(_cast(call.x, _dtype(call)), call.weight, call.bias, call.lora_A, call.lora_B, call.scaling,
                      call.fan_in_fan_out, call.blocks, random_dropout(call.p), call.row_scale, call.param,
                      call.const)


def _eager(call: _Call):
    """The compute dtype and :class:`_LoRALinear`'s arguments after ``x``, with the seed drawn.

    The mask depends only on the seed, drawn the same way with or without grad: reentrant
    checkpointing reruns a no-grad forward with grad enabled and must see the same mask.
    """
    dt = _dtype(call)
    p = 0.0 if call.x.is_meta else call.p  # meta: shapes only, no mask to draw
    seed = draw_seed() if p > 0.0 else 0
    return dt, (call.weight, call.bias, call.lora_A, call.lora_B, call.param, call.const, call.row_scale,
                float(call.scaling), p, seed, call.fan_in_fan_out, call.blocks)


def _run_no_grad(call: _Call) -> Tensor:
    dt, args = _eager(call)
    with no_autocast(call.x.device.type):
        y2, _ = lora_forward(_cast(call.x, dt), *args)
    return y2.view(*call.x.shape[:-1], y2.shape[-1])


def _run_recipe(call: _Call) -> Tensor:
    dt, args = _eager(call)
    with no_autocast(call.x.device.type):
        return recipes.apply_rebuilding_input(recipes.find(call.x), _LoRALinear, call.x, dt, args)


def _run_autograd(call: _Call) -> Tensor:
    dt, args = _eager(call)
    with no_autocast(call.x.device.type):
        return _LoRALinear.apply(_cast(call.x, dt), *args)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False, *, fan_in_fan_out: bool = False,
                segments: Optional[Sequence[Tuple[int, int]]] = None, backend: str = "auto",
                row_scale: Optional[RowScale] = None) -> Tensor:
    """``x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with a lean autograd; a variant's row scale with a hook.

    The arguments are those of :func:`lora_layers.functional.lora_linear`, except that a
    variant comes as a ``row_scale`` hook (:class:`~lora_layers.core.row_scale.RowScale`)
    instead of DoRA's ``magnitude``/``weight_norm``: the adapted rows become
    ``c ⊙ (x Wᵀ + s·dropout(x) Aᵀ Bᵀ) + b`` with the hook's factor ``c``. A hook always
    runs the torch path.
    """
    call = _checked_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, segments,
                         row_scale)
    return _route(call, backend)(call)


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
