"""Weighted combinations of named adapters into a new one: :func:`merge_adapters` (issue #23).

Two combinations, PEFT's ``add_weighted_adapter`` ``"cat"`` and ``"linear"``, with ``c_i = w_i·s_i``
(``s_i`` adapter ``i``'s scaling in that layer) and the new adapter's scaling 1 (``lora_alpha = r``,
no rsLoRA):

* ``"cat"``: ``A = [c_1 A_1; c_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, rank ``Σ r_i``, so that
  ``ΔW = Σ w_i s_i B_i A_i`` exactly (per split of a MergedLinear).
* ``"linear"`` (same ranks only): ``A = Σ sign(c_i)·√|c_i|·A_i``, ``B = Σ √|c_i|·B_i``, rank ``r``. This
  blends the factors, not the products: ``ΔW = (Σ √|c_i| B_i)(Σ sign(c_i) √|c_i| A_i)``, which has
  the cross terms ``B_i A_j``; it equals ``Σ w_i s_i B_i A_i`` only for one adapter.
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..layers.adapters import check_adapter_name, named_adapters
from ..layers.base import LoRALayer
from ..layers.merged import MergedLinear
from .adapters import adapter_names
from .params import lora_modules
from .unwrap import unwrap_model

__all__ = ["merge_adapters"]

_COMBINATIONS = ("auto", "cat", "linear")


def _checked_weights(model: nn.Module, weights) -> Dict[str, float]:
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"merge_adapters: weights must be a non-empty dict {{adapter name: weight}}, got {weights!r}")
    known = adapter_names(model)
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise KeyError(f"merge_adapters: {type(model).__name__} has no adapter {unknown[0]!r}; its adapters are {known}")
    bad = {n: w for n, w in weights.items()
           if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)}
    if bad:
        raise ValueError(f"merge_adapters: weights must be finite real numbers, got {bad}")
    return {n: float(w) for n, w in weights.items()}


def _sources(layer: LoRALayer, weights: Dict[str, float]) -> List[Tuple[float, object]]:
    """``[(weight, view)]`` of the weighted adapters this layer has; ValueError for a DoRA one."""
    views = [(w, layer.adapter(n)) for n, w in weights.items() if n in layer.adapter_names]
    dora = [v.name for _, v in views if v.use_dora]
    if dora:
        raise ValueError(f"adapters {dora} are DoRA adapters: a DoRA magnitude rescales W + ΔW as a whole, so a "
                         f"weighted sum of DoRA adapters is no DoRA adapter of any rank; merge plain LoRA adapters")
    return views


def _combination(plan, combination: str) -> str:
    mixed = [(n, {v.name: v.r for _, v in views}) for n, _, views in plan if len({v.r for _, v in views}) > 1]
    if combination == "linear" and mixed:
        raise ValueError(f"merge_adapters: combination='linear' needs adapters of one rank in each layer, but "
                         f"{mixed[0][0]!r} has ranks {mixed[0][1]}; use combination='cat'")
    return combination if combination != "auto" else ("cat" if mixed else "linear")


@contextmanager
def rng_untouched(layers):
    """The RNG streams of the CPU and of the layers' GPUs as they were: ``add_adapter`` draws a random
    ``A`` that a load or a blend replaces at once, and a caller's seeded run must not depend on that."""
    devices = sorted({layer.weight.device.index or 0 for layer in layers if layer.weight.is_cuda})
    with torch.random.fork_rng(devices=devices):
        yield


def _rank_blocks(layer: LoRALayer, r: int):
    """``[(A rows, B rows)]`` of each split's rank block for rank ``r`` (one block but on a MergedLinear)."""
    if isinstance(layer, MergedLinear):
        return [(slice(b.a0, b.a1), slice(b.b0, b.b1)) for b in layer.segments.blocks(r)]
    return [(slice(0, None), slice(0, None))]


def _cat(layer: LoRALayer, views) -> Tuple[Tensor, Tensor]:
    """``"cat"``'s factors in float64: per rank block, each ``w·s·A_i`` stacked and each ``B_i`` side by side."""
    blocks = [_rank_blocks(layer, v.r) for _, v in views]
    A = torch.cat([w * v.scaling * v.lora_A.detach().double()[blk[j][0]]
                   for j in range(len(blocks[0])) for (w, v), blk in zip(views, blocks)])
    B = torch.cat([torch.cat([v.lora_B.detach().double()[blk[j][1]] for (_, v), blk in zip(views, blocks)], dim=1)
                   for j in range(len(blocks[0]))])
    return A, B


def _linear(views) -> Tuple[Tensor, Tensor]:
    """``"linear"``'s factors in float64 (PEFT's: the weight and scale split as square roots over A and B)."""
    A = sum(math.copysign(math.sqrt(abs(w * v.scaling)), w * v.scaling) * v.lora_A.detach().double() for w, v in views)
    B = sum(math.sqrt(abs(w * v.scaling)) * v.lora_B.detach().double() for w, v in views)
    return A, B


def merge_adapters(model: nn.Module, weights: Dict[str, float], name: str, combination: str = "auto") -> None:
    """Add the named adapter ``name``, a weighted combination of the adapters ``weights`` names.

    ``combination`` (PEFT's ``add_weighted_adapter`` names, with ``c_i = w_i·s_i``, ``s_i`` the scaling):

    * ``"cat"``: ranks concatenated (``Σ r_i``), ``A = [c_1 A_1; c_2 A_2; ...]``, ``B = [B_1, B_2, ...]``,
      so ``ΔW = Σ w_i s_i B_i A_i`` exactly (per split of a MergedLinear); any ranks.
    * ``"linear"``: adapters of one rank ``r``; ``A = Σ sign(c_i)√|c_i| A_i``, ``B = Σ √|c_i| B_i``, rank ``r``:
      the factors are blended, so ``ΔW`` has cross terms ``B_i A_j`` (it is not ``Σ w_i ΔW_i``).
    * ``"auto"`` (the default): ``"linear"`` when every layer's weighted adapters share one rank, else
      ``"cat"``, as the issue's API reads (use ``"cat"`` for the exact weighted sum of the deltas).

    The new adapter has ``lora_alpha = r`` and no rsLoRA (scaling 1: the scales are in ``A``), the dropout
    of the first weighted adapter the layer has, and is computed in float64 and stored in the adapters'
    dtype. Each layer combines the weighted adapters it has (layers with none get no new adapter). It is
    not made active (:func:`~lora_layers.set_adapter`). The result equals PEFT 0.21's ``add_weighted_adapter``
    (tested on a Phi-3 for both combinations) except where PEFT's first weighted adapter uses rsLoRA: PEFT
    keeps its ``use_rslora`` for the new adapter (``lora_alpha = r`` over ``√r``) and so scales the blend by
    ``√r`` more (measured: scaling 2 for a rank-4 blend); here the scale is always 1.

    Raises:
        ValueError: ``weights`` empty or not finite reals, ``name`` not an identifier or taken, a DoRA
            adapter, ``"linear"`` over different ranks, a bad ``combination``.
        KeyError: a weighted adapter no layer has. Nothing changes when any of these is raised.
    """
    model = unwrap_model(model)
    if combination not in _COMBINATIONS:
        raise ValueError(f"merge_adapters: combination must be one of {_COMBINATIONS}, got {combination!r}")
    weights = _checked_weights(model, weights)
    check_adapter_name(name, "merge_adapters: name")
    if name in adapter_names(model):
        raise ValueError(f"merge_adapters: the model has an adapter {name!r} already; pick another name")
    plan = []
    for n, layer in lora_modules(model):
        views = _named(n, _sources, layer, weights) if layer.has_adapter else []
        if views:
            plan.append((n, layer, views))
    combination = _combination(plan, combination)
    ranks = [sum(v.r for _, v in views) if combination == "cat" else views[0][1].r for _, _, views in plan]
    for (n, layer, views), r in zip(plan, ranks):  # every check before any change
        _named(n, layer._check_new_adapter, name, r, r, views[0][1].dropout_p)
    factors = [_cat(layer, views) if combination == "cat" else _linear(views) for _, layer, views in plan]
    with torch.no_grad(), rng_untouched([layer for _, layer, _ in plan]):
        for (_, layer, views), r, (A, B) in zip(plan, ranks, factors):
            layer.add_adapter(name, r, r, views[0][1].dropout_p)
            held = named_adapters(layer)[name]
            held.lora_A.copy_(A.reshape(held.lora_A.shape))
            held.lora_B.copy_(B.reshape(held.lora_B.shape))


def _named(layer_name: str, call, *args) -> Optional[object]:
    try:
        return call(*args)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"merge_adapters: {layer_name or '<root>'}: {exc}") from exc
