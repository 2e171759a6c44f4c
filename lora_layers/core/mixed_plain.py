"""The plain-op form of a mixed-adapter batch, and the pieces the lean paths share with it.

:func:`_plain` computes :func:`lora_layers.core.mixed.lora_linear_mixed` from plain
differentiable ops, for ``torch.compile``, ``torch.func``, double backward, DoRA adapters and
quantized bases: one down projection by every adapter's ``A`` stacked (``T × Σr``), zero
outside each token's own adapter's columns, the up projections, and each token's row-scale
factor. Exact and differentiable to any order; it keeps autograd's usual tensors (not lean).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import _cast, _dense_t, _is_quantized, _scatter_add
from .dropout import keep_scale, lane_threshold, random_lanes
from .row_scale import expand_rows
from .segments import Block

__all__ = []


class _Spec(NamedTuple):
    """What the Function needs of one adapter besides its tensors."""

    scaling: float
    p: float  # the dropout probability in effect (0 outside training)
    blocks: Tuple[Block, ...]



def _row_mask(seed: int, shape, token_adapter: Tensor, ps: Sequence[float]) -> Optional[Tensor]:
    """The drop mask of the module docstring's rule for a 2-D ``shape``; None without dropout."""
    if not any(p > 0.0 for p in ps):
        return None
    thresholds = torch.tensor([lane_threshold(0.0)] + [lane_threshold(p) for p in ps], dtype=torch.int16,
                              device=token_adapter.device)
    return random_lanes(seed, shape, token_adapter.device) < thresholds[token_adapter + 1][:, None]


def _row_scale_vector(ps: Sequence[float], token_adapter: Tensor, dtype) -> Tensor:
    """Each token's inverted-dropout scale (1 for base-only tokens and p = 0)."""
    scales = torch.tensor([1.0] + [keep_scale(p) if p > 0.0 else 1.0 for p in ps], dtype=dtype,
                          device=token_adapter.device)
    return scales[token_adapter + 1]

def _base(x2: Tensor, weight, bias: Optional[Tensor], fan_in_fan_out: bool) -> Tensor:
    """``x Wᵀ (+ b)`` for a weight tensor or a quantized base; plain differentiable ops."""
    if _is_quantized(weight):
        y = weight.linear(x2).to(x2.dtype)
        return y if bias is None else y + _cast(bias, x2.dtype)
    return F.linear(x2, _dense_t(weight, fan_in_fan_out, x2.dtype), _cast(bias, x2.dtype))


def _seeded_drop(seed: int, token_adapter: Tensor, specs):
    """The lean path's masks (the module docstring's rule) as plain ops; None without dropout."""
    ps = [s.p for s in specs]
    if not any(p > 0.0 for p in ps):
        return None

    def drop(t: Tensor) -> Tensor:
        mask = _row_mask(seed, t.shape, token_adapter, ps)
        return torch.where(mask, 0.0, t) * _row_scale_vector(ps, token_adapter, t.dtype)[:, None]
    return drop


def _random_drop(token_adapter: Tensor, specs):
    """Per-row dropout from ``torch.rand`` (traceable by torch.compile and torch.func); None without it."""
    ps = [s.p for s in specs]
    if not any(p > 0.0 for p in ps):
        return None

    def drop(t: Tensor) -> Tensor:
        p_row = t.new_tensor([0.0] + ps)[token_adapter + 1][:, None]
        return torch.where(torch.rand_like(t) >= p_row, t / (1 - p_row), 0.0)
    return drop


def _selected_u(xd: Tensor, As, token_adapter: Tensor) -> Tensor:
    """``(T, Σr)``: every adapter's down projection, zero outside each token's own adapter's columns."""
    A = torch.cat([_cast(a, xd.dtype) for a in As])
    owner = torch.cat([torch.full((a.shape[0],), k, device=xd.device) for k, a in enumerate(As)])
    return F.linear(xd, A) * (token_adapter[:, None] == owner).to(xd.dtype)


def _plain(x2, weight, bias, params, specs, hooks, token_adapter, fan_in_fan_out, drop):
    """``(T, out)`` from plain differentiable ops; ``hooks`` holds each adapter's
    ``(row_scale, param, const)`` or None."""
    scaled = any(h is not None for h in hooks)
    y = _base(x2, weight, None if scaled else bias, fan_in_fan_out)
    u = _selected_u(x2 if drop is None else drop(x2), params[::2], token_adapter)
    parts, off = {}, 0
    for k, spec in enumerate(specs):
        B = _cast(params[2 * k + 1], x2.dtype)
        for o0, o1, a0, a1, b0, b1 in spec.blocks:
            term = F.linear(u[:, off + a0:off + a1], B[b0:b1]) * spec.scaling
            parts[(o0, o1)] = term if (o0, o1) not in parts else parts[(o0, o1)] + term
        off += params[2 * k].shape[0]
    if list(parts) == [(0, y.shape[-1])]:
        y = y + parts[(0, y.shape[-1])]
    else:
        y = _scatter_add(y, [(o0, o1, d) for (o0, o1), d in parts.items()])
    if scaled:
        y = y * _token_factors(hooks, specs, token_adapter, y.shape[-1], y.dtype)
        y = y if bias is None else y + _cast(bias, y.dtype)
    return y


def _token_factors(hooks, specs, token_adapter: Tensor, out: int, dtype) -> Tensor:
    """``(T, out)``: each token's row-scale factor (1 for base-only tokens and plain adapters)."""
    ones = torch.ones(out, dtype=dtype, device=token_adapter.device)
    rows = [ones] + [ones if h is None else expand_rows(h[0].factor(h[1], h[2]), spec.blocks, out, dtype)
                     for h, spec in zip(hooks, specs)]
    return torch.stack(rows).index_select(0, token_adapter + 1)
