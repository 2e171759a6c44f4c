"""The row-scale hook: how a variant rescales the adapted output rows of the LoRA linear.

With a hook, :func:`~lora_layers.core.functional.lora_linear` computes
``y = c ⊙ (x Wᵀ + s·drop(x) Aᵀ Bᵀ) + b``, where ``c`` is one factor per adapted row
(1 on the rows without an adapter). The core never learns what ``c`` means: DoRA
(:class:`lora_layers.variants.dora.DoRAScale`, ``c = m / ‖W + s·BA‖``) is one hook,
and a future variant that rescales rows is another file in ``variants/``.

The lean backward needs from a hook only ``dL/dθ`` for its trainable tensor θ given
``z = dL/dc``; the core computes ``z`` (it recomputes ``x Wᵀ``, one GEMM, and keeps
no ``T × out`` tensor). Everything else (``dx``, ``dA``, ``dB``, ``dW``) sees
``g ⊙ c``, and the bias gradient sees ``g``. A hook with :attr:`RowScale.keep_product`
set trades memory for that GEMM: the forward keeps the pre-scale product
``x Wᵀ + s·uBᵀ`` on the adapted rows (``T ×`` adapted rows, the compute dtype) and ``z`` is
read from it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .segments import Block, covers_all

__all__ = ["RowScale"]


class RowScale:
    """The hook a variant implements (subclass it, or match its three methods).

    Per call, :meth:`prepare` turns the hook's own inputs into two tensors that travel
    through autograd like the layer's parameters: ``param`` (differentiated, e.g. DoRA's
    magnitude; None if nothing trains) and ``const`` (saved as it is, e.g. DoRA's norm;
    may be None). :meth:`factor` and :meth:`param_grad` receive them back, so a hook
    keeps no per-call state and the core saves the tensors with ``save_for_backward``.

    ``keep_product`` (default False) asks the core to keep the pre-scale product of the adapted
    rows for ``z`` instead of recomputing ``x Wᵀ`` in backward: one GEMM less, one ``T ×``
    adapted-rows tensor more. It changes no result beyond rounding.
    """

    keep_product: bool = False

    def prepare(self, weight, lora_A: Tensor, lora_B: Tensor, scaling: float,
                segments: Optional[Sequence[Tuple[int, int]]], *, fan_in_fan_out: bool,
                rows: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Check the hook's inputs against the layer and return ``(param, const)``.

        Called once per call after the core's own checks. ``weight`` is a weight tensor
        or a quantized base (``weight.dequantize()`` gives its dense weight); ``segments``
        is None for one adapter over every output row; ``rows`` is the number of adapted
        rows (``lora_B.shape[0]``), the length :meth:`factor` must return.
        """
        raise NotImplementedError

    def factor(self, param: Optional[Tensor], const: Optional[Tensor]) -> Tensor:
        """``c``: one factor per adapted row, in ``lora_B``'s row order, as plain ops that are
        differentiable in ``param`` (torch.compile, torch.func and double backward
        differentiate through it)."""
        raise NotImplementedError

    def param_grad(self, param: Tensor, const: Optional[Tensor], z: Tensor) -> Tensor:
        """``dL/dparam`` in ``param``'s dtype, given ``z = dL/dc`` (one entry per adapted row,
        fp32, or fp64 for fp64 inputs). Called by the lean backward only when ``param``
        needs a gradient."""
        raise NotImplementedError


def expand_rows(factor: Tensor, blocks: Sequence[Block], out_features: int, dtype) -> Tensor:
    """An ``(out,)`` vector in ``dtype``: ``factor`` (in ``lora_B`` row order) on each block's
    output rows, 1 on the rows without an adapter. Plain differentiable ops."""
    if covers_all(blocks, out_features):
        return factor.to(dtype)
    pieces, last = [], 0
    for blk in sorted(blocks):
        if blk.out0 > last:
            pieces.append(factor.new_ones(blk.out0 - last))
        pieces.append(factor[blk.b0:blk.b1])
        last = blk.out1
    if last < out_features:
        pieces.append(factor.new_ones(out_features - last))
    return torch.cat(pieces).to(dtype)


def gather_rows(vector: Tensor, blocks: Sequence[Block]) -> Tensor:
    """The entries of an ``(out,)`` vector on the adapted rows, in ``lora_B`` row order."""
    if len(blocks) == 1:
        return vector[blocks[0].out0:blocks[0].out1]
    return torch.cat([vector[o0:o1] for o0, o1, *_ in blocks])
