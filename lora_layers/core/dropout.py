"""Dropout on the adapter's input without a stored mask.

The mask is a pure function of a seed drawn in forward (:func:`draw_seed`), so
backward regenerates it (:func:`drop_mask`) instead of keeping it: dropout costs
no activation memory. Every place the LoRA math meets dropout is here: the
down-projection ``u = drop(x) Aᵀ`` (:func:`down_project`), the two gradients that
see the mask (:func:`grad_A`, :func:`input_grad`), and the plain-op forms used
where a custom autograd Function does not fit (:func:`seeded_dropout`,
:func:`random_dropout`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["draw_seed", "drop_mask", "keep_mask", "keep_scale", "dropout_mask"]

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
    return random_lanes(seed, shape, device) < lane_threshold(p)


def random_lanes(seed: int, shape, device) -> Tensor:
    """The 16 random bits per element behind :func:`drop_mask`, as an int16 tensor of ``shape``:
    an element is dropped where its lane is below :func:`lane_threshold` of its probability, so
    rows with different probabilities can share one draw (the mixed-adapter batches)."""
    n = math.prod(shape)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=gen)  # all 64 bits
    return words.view(torch.int16)[:n].view(shape)


def lane_threshold(p: float) -> int:
    """The int16 value below which a :func:`random_lanes` lane is dropped for probability ``p``
    (``-32768`` for ``p = 0``: nothing is dropped)."""
    return _drop_threshold(p) - _LANES // 2


def keep_mask(seed: int, shape, p: float, device) -> Tensor:
    """The complement of :func:`drop_mask`: True where an element is kept."""
    return ~drop_mask(seed, shape, p, device)


def dropout_mask(seed: int, like: Tensor, p: float) -> Tensor:
    """The scaled dropout mask (``0`` or :func:`keep_scale`) for ``seed``, shaped and typed like ``like``.

    A reference helper for tests; the hot path uses :func:`drop_mask` directly.
    """
    keep = keep_mask(seed, like.shape, p, like.device)
    return keep.to(like.dtype).mul_(keep_scale(p))


def down_project(x2: Tensor, A: Tensor, p: float, seed: int) -> Tensor:
    """``u = drop(x) Aᵀ`` for a 2-D ``x2``, with the mask of ``seed`` when ``p > 0``."""
    return masked_down_project(x2, A, drop_mask(seed, x2.shape, p, x2.device) if p > 0.0 else None, p)


def masked_down_project(x2: Tensor, A: Tensor, mask: Optional[Tensor], p: float) -> Tensor:
    """``u = drop(x) Aᵀ`` with a given drop ``mask`` (True = dropped; None without dropout)."""
    if mask is None:
        return x2 @ A.t()
    # The keep-scale is applied to the (T, r) product, not to x.
    return (torch.where(mask, 0.0, x2) @ A.t()).mul_(keep_scale(p))


def backward_mask(seed: int, x2: Tensor, p: float) -> Optional[Tensor]:
    """The drop mask forward used on ``x2`` (None without dropout), regenerated from its seed."""
    return drop_mask(seed, x2.shape, p, x2.device) if p > 0.0 else None


def grad_A(du: Tensor, x2: Tensor, mask: Optional[Tensor], p: float) -> Tensor:
    """``dA = duᵀ drop(x)``, with :func:`backward_mask`'s ``mask``."""
    if mask is None:
        return du.t() @ x2
    return (du.t() @ torch.where(mask, 0.0, x2)).mul_(keep_scale(p))


def input_grad(du: Tensor, A: Tensor, mask: Optional[Tensor], p: float, out: Optional[Tensor] = None) -> Tensor:
    """The adapter's part of ``dx``, ``drop'(du A)``: a fresh tensor (or ``out``, filled) the base
    ``g W`` may accumulate into."""
    if mask is None:
        return torch.mm(du, A, out=out)
    return torch.mm(du * keep_scale(p), A, out=out).masked_fill_(mask, 0)


def seeded_dropout(seed: int, x: Tensor, p: float) -> Optional[Callable[[Tensor], Tensor]]:
    """Dropout with the mask of ``seed`` on a tensor shaped like ``x``, as plain differentiable
    ops (double backward rebuilds the forward's mask this way); None without dropout."""
    if p == 0.0:
        return None
    dropped = drop_mask(seed, (x.numel() // x.shape[-1], x.shape[-1]), p, x.device).view(x.shape)
    scale = keep_scale(p)
    return lambda t: torch.where(dropped, 0.0, t) * scale


def random_dropout(p: float) -> Optional[Callable[[Tensor], Tensor]]:
    """``F.dropout`` (torch's own random stream), for torch.compile and torch.func transforms,
    which trace it without a seeded generator; None without dropout."""
    return (lambda t: F.dropout(t, p, True)) if p > 0.0 else None
