"""DoRA (weight-decomposed LoRA): the adapted rows rescaled by ``m / ‖W + s·BA‖``.

``y = (m / ‖W + s·BA‖) ⊙ (x Wᵀ + s·drop(x) Aᵀ Bᵀ) + b`` on the adapted rows, with a trainable
magnitude ``m`` and the row norm a constant in backward (the DoRA paper's section 4.3). The
core computes the LoRA part and applies the factor through its row-scale hook
(:class:`~lora_layers.core.row_scale.RowScale`); this file holds what is DoRA's own: the norm
(:func:`dora_weight_norm`, never building ``W + s·BA``), the factor (:func:`dora_row_scale`)
and the magnitude's gradient (:class:`DoRAScale`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.row_scale import RowScale
from ..core.segments import Segments
from ..core.spec import check_dora_mode

__all__ = ["DoRAScale", "dora_weight_norm", "dora_row_scale", "row_sq_norm"]


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
        weight, lora_A, lora_B, scaling, segments, fan_in_fan_out: as :func:`lora_layers.functional.lora_linear`.

    Returns:
        ``(Σ adapted rows,)``, in ``lora_B``'s row order, detached.
    """
    W = weight.detach().t() if fan_in_fan_out else weight.detach()
    acc = torch.promote_types(W.dtype, torch.float32)
    blocks = Segments.of(segments, W.shape[0]).adapter_blocks(lora_A, lora_B)
    weight_sq_norm = row_sq_norm(weight, fan_in_fan_out)
    A, B = lora_A.detach().to(acc), lora_B.detach().to(acc)
    pieces = []
    for o0, o1, a0, a1, b0, b1 in blocks:
        Aj, Bj = A[a0:a1], B[b0:b1]
        cross = (Bj * (W[o0:o1].to(acc) @ Aj.t())).sum(1)
        square = ((Bj @ (Aj @ Aj.t())) * Bj).sum(1)
        pieces.append(weight_sq_norm[o0:o1].to(acc) + (2 * scaling) * cross + (scaling * scaling) * square)
    return torch.cat(pieces).clamp_min_(0).sqrt_()


class DoRAScale(RowScale):
    """DoRA's row-scale hook: ``c = m / ‖W + s·BA‖`` (:func:`dora_row_scale`).

    Args:
        magnitude: ``m``, one entry per adapted output row (``(out,)``, or ``(Σ enabled
            slice sizes,)`` with segments); trainable.
        weight_norm: ``‖W + s·BA‖`` per adapted row, if already known (else computed by
            :func:`dora_weight_norm` when the call prepares the hook).
        mode: ``"lean"`` (backward recomputes ``x Wᵀ`` for the magnitude's gradient) or
            ``"fast"`` (the forward keeps ``x Wᵀ + s·uBᵀ`` on the adapted rows for it:
            :attr:`~lora_layers.core.row_scale.RowScale.keep_product`).

    Raises:
        ValueError: ``mode`` is not one of ``("lean", "fast")``.
    """

    def __init__(self, magnitude: Tensor, weight_norm: Optional[Tensor] = None, mode: str = "lean"):
        self.magnitude = magnitude
        self.weight_norm = weight_norm
        self.keep_product = check_dora_mode(mode) == "fast"

    def prepare(self, weight, lora_A, lora_B, scaling, segments, *, fan_in_fan_out, rows):
        if tuple(self.magnitude.shape) != (rows,):
            raise ValueError(f"magnitude must have shape ({rows},) (one entry per adapted output row), "
                             f"got {tuple(self.magnitude.shape)}")
        norm = self.weight_norm
        if norm is None:
            dense = weight if isinstance(weight, Tensor) else weight.dequantize()  # a quantized base
            norm = dora_weight_norm(dense, lora_A, lora_B, scaling, segments, fan_in_fan_out=fan_in_fan_out)
        return self.magnitude, norm

    def factor(self, magnitude: Tensor, norm: Tensor) -> Tensor:
        return dora_row_scale(magnitude, norm)

    def param_grad(self, magnitude: Tensor, norm: Tensor, z: Tensor) -> Tensor:
        """``dL/dm = z / norm``, and 0 where the norm is 0 (the factor is 1 there, whatever ``m``)."""
        zero = norm == 0
        return (z / norm.masked_fill(zero, 1)).masked_fill_(zero, 0).to(magnitude.dtype)
