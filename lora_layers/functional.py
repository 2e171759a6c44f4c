"""The functional API in one namespace, as ``torch.nn.functional`` is for ``torch.nn``.

The LoRA math lives in the tiers (:mod:`lora_layers.core`: the linear, embedding and conv
forms, dropout; :mod:`lora_layers.variants.dora`: DoRA's norm and row scale); this module
gathers it under the name it has always had, ``lora_layers.functional``. Its
:func:`lora_linear` is the core's with DoRA's ``magnitude=`` argument, which it turns into
DoRA's row-scale hook.
"""
from __future__ import annotations

import sys as _sys
import types as _types
from typing import Optional, Sequence, Tuple

from torch import Tensor

from .core import functional as _core
from .core.dropout import draw_seed, drop_mask, dropout_mask, keep_mask, keep_scale
from .core.functional import BACKEND_ENV, BACKENDS, lora_conv, lora_embedding
from .core.functional import resolve_backend  # noqa: F401  (importable here, as before)
from .core.spec import check_dora_mode
from .variants.dora import DoRAScale, dora_row_scale, dora_weight_norm, row_sq_norm

__all__ = ["lora_linear", "lora_embedding", "lora_conv", "dora_weight_norm", "row_sq_norm", "draw_seed",
           "drop_mask", "keep_mask", "keep_scale", "dora_row_scale", "dropout_mask", "BACKENDS", "BACKEND_ENV"]


class _Facade(_types.ModuleType):
    """This module's type. ``AUTO_USES_TRITON`` is the core's flag (its router reads it): read live
    from there, and ``lora_layers.functional.AUTO_USES_TRITON = True`` (a monkeypatch, a
    ``mock.patch``) sets it there, as when the router lived here."""

    @property
    def AUTO_USES_TRITON(self) -> bool:
        return _core.AUTO_USES_TRITON

    @AUTO_USES_TRITON.setter
    def AUTO_USES_TRITON(self, value) -> None:
        _core.AUTO_USES_TRITON = value
        self.__dict__["AUTO_USES_TRITON"] = value  # this module's own too, so mock.patch restores it


AUTO_USES_TRITON = _core.AUTO_USES_TRITON  # (the property above reads the core's, not this copy)
_sys.modules[__name__].__class__ = _Facade


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
    dora_mode: str = "lean",
) -> Tensor:
    """``x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with a lean autograd; DoRA with a ``magnitude``.

    DoRA (``magnitude`` given) computes ``(m / ‖W + s·BA‖) ⊙ (x Wᵀ + s·dropout(x) Aᵀ Bᵀ) + b``
    on the adapted rows, with the row norm a constant in backward (the paper's
    section 4.3), and the factor 1 on a row whose norm is 0 (:func:`dora_row_scale`). The
    norm comes from :func:`dora_weight_norm` (``W + s·BA`` is never built). With
    ``dora_mode="lean"`` backward keeps no ``T × out`` tensor: the magnitude's gradient
    recomputes ``x Wᵀ`` (one extra GEMM); with ``"fast"`` the forward keeps
    ``x Wᵀ + s·dropout(x) Aᵀ Bᵀ`` on the adapted rows for it instead.

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
        dora_mode: ``"lean"`` or ``"fast"`` (DoRA only): what backward keeps for the
            magnitude's gradient; the same result up to rounding.

    Returns:
        ``(*, out)`` in the compute dtype: ``x``'s dtype, or the autocast dtype.

    Raises:
        ValueError: ``dora_mode`` is not ``"lean"`` or ``"fast"``, or is ``"fast"`` without a
            ``magnitude``; and the errors of the checks on the other arguments.
    """
    if check_dora_mode(dora_mode) != "lean" and magnitude is None:
        raise ValueError(f"dora_mode={dora_mode!r} is a DoRA setting but no magnitude was given; pass "
                         f"magnitude= with it, or leave dora_mode at 'lean'")
    row_scale = None if magnitude is None else DoRAScale(magnitude, weight_norm, dora_mode)
    return _core.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training,
                             fan_in_fan_out=fan_in_fan_out, segments=segments, backend=backend, row_scale=row_scale)
