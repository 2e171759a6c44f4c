"""PiSSA and OLoRA: adapters initialised from the weight itself, with the base becoming the residual.

Both start the adapter on a rank-``r`` piece of ``W`` and leave ``W − s·B A`` as the frozen
base, so the layer's output at init is the original one (up to rounding):

* PiSSA (``init="pissa"``): ``W = U S Vᵀ``; ``A = diag(√(S_r/s)) V_rᵀ`` and
  ``B = U_r diag(√(S_r/s))``, so ``s·B A`` is the top-``r`` part of ``W`` (PEFT's convention:
  the singular values are divided by the scaling and shared as square roots).
  ``"pissa_niter_N"`` takes ``U_r, S_r, V_r`` from ``torch.svd_lowrank(W, q=r, niter=N)``
  (random, from torch's global generator: ``torch.manual_seed`` makes it reproducible).
* OLoRA (``init="olora"``): ``W = Q R``; ``A = R[:r]``, ``B = Q[:, :r]`` (PEFT's convention:
  not divided by the scaling, so ``s·B A`` is ``s`` times the first ``r`` QR components).

The decomposition runs in fp32 as PEFT's does (so the factors and their signs are PEFT's);
``A`` and ``B`` are rounded to the adapter dtype first, and the residual is formed from the rounded
factors in float64 and rounded once to ``W``'s dtype.

A trained adapter's change to the original weight is ``s(B A − B₀ A₀)``: :func:`delta_factors`
writes it as one plain LoRA of rank ``2r``, which serves on the untouched original base.
Pure functions: the layers (:class:`~lora_layers.Linear`, per split of a
:class:`~lora_layers.MergedLinear`) hold the state.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.spec import pissa_niter

__all__ = ["RESIDUAL_INITS", "is_residual_init", "check_residual_rank", "residual_init",
           "delta_factors", "INITIAL_NAMES"]

#: The initialisations that change the base weight (``init="pissa_niter_<N>"`` besides these two).
RESIDUAL_INITS = ("pissa", "olora")
#: Buffer names of the initial adapter ``A₀``, ``B₀`` on a layer built with one of them.
INITIAL_NAMES = ("lora_init_A", "lora_init_B")


def is_residual_init(init) -> bool:
    """Whether ``init`` makes the base weight the residual ``W − s·B A`` (PiSSA or OLoRA)."""
    return init in RESIDUAL_INITS or pissa_niter(init) is not None


def check_residual_rank(init: str, r: int, rows: int, cols: int, what: str) -> None:
    """Refuse a rank the decomposition of a ``rows × cols`` block cannot give."""
    if r > min(rows, cols):
        raise ValueError(f"init={init!r} needs r <= min(out, in) of each adapted block, got r={r} for {what} "
                         f"of shape ({rows}, {cols}); use r <= {min(rows, cols)}")


def _pissa(W: Tensor, r: int, scaling: float, niter: Optional[int]) -> Tuple[Tensor, Tensor]:
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.t()
    root = (S / scaling).sqrt()
    return root[:, None] * Vh, U * root[None, :]


def _olora(W: Tensor, r: int) -> Tuple[Tensor, Tensor]:
    Q, R = torch.linalg.qr(W)
    return R[:r].contiguous(), Q[:, :r].contiguous()


@torch.no_grad()
def residual_init(W: Tensor, r: int, scaling: float, init: str,
                  adapter_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(A (r, in), B (out, r), W − s·B A)`` for ``W`` stored ``(out, in)``.

    ``A``, ``B`` are in ``adapter_dtype`` (default ``W``'s), the residual in ``W``'s dtype, computed
    in float64 from the rounded ``A``, ``B`` (so that ``residual + s·B A`` is ``W`` to one rounding).

    Raises:
        ValueError: ``r`` exceeds ``min(out, in)``, or ``init`` is not PiSSA/OLoRA.
    """
    check_residual_rank(init, r, W.shape[0], W.shape[1], "the weight")
    W32 = W.detach().to(torch.float32)
    if init == "olora":
        A, B = _olora(W32, r)
    elif is_residual_init(init):
        A, B = _pissa(W32, r, scaling, pissa_niter(init))
    else:
        raise ValueError(f"init={init!r} is not a residual initialisation; expected one of {RESIDUAL_INITS} "
                         f"or 'pissa_niter_<N>'")
    dtype = adapter_dtype or W.dtype
    A, B = A.to(dtype), B.to(dtype)
    residual = W.detach().to(torch.float64) - scaling * (B.to(torch.float64) @ A.to(torch.float64))
    return A, B, residual.to(W.dtype)


def delta_factors(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> Tuple[Tensor, Tensor]:
    """``(A', B')`` of rank ``2r`` with ``B' A' = B A − B₀ A₀``: ``A' = [A; A₀]``, ``B' = [B, −B₀]``.

    With the same scaling, ``s·B' A'`` is the trained change to the *original* weight, so this plain
    LoRA adapter serves on the untouched base (PEFT's ``path_initial_model_for_weight_conversion``).
    """
    return torch.cat([A, A0.to(A.dtype)], 0), torch.cat([B, -B0.to(B.dtype)], 1)
