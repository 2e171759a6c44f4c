"""A PEFT adapter folder into a named adapter (issue #23): ``import_peft(model, folder, adapter=name)``.

A named adapter lives next to each layer's default one (:mod:`lora_layers.layers.adapters`), so
every module the folder names must be a LoRA layer already (``inject_lora``, ``phi3.apply_lora`` or
an ``import_peft`` into ``"default"`` put it there). A new name is added to each of those layers
with the folder's rank, alpha, dropout, rsLoRA and DoRA settings; an existing one is loaded in
place and must have them already. The folder is read as :func:`~lora_layers.hotswap` reads one
(each tensor in the layer's own layout: a MergedLinear's block-diagonal B back to its splits, with
the alpha ``export_peft`` rescaled per split undone). Everything is checked before anything changes.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List

import torch
import torch.nn as nn
from torch import Tensor

from ..core.sharded import shard_group
from ..core.spec import lora_scaling
from ..layers.adapters import named_adapters
from ..layers.base import LoRALayer
from ..layers.merge_state import unmerged
from ..model.blend import rng_untouched
from ..model.params import lora_modules
from ..model.unwrap import unwrap_model
from .fileio import CheckpointError
from .hot_swap import _Incoming, _peft_module
from .peft_format import _module_settings, _read_adapter

__all__ = ["import_named"]


def _new_plan(layer: LoRALayer, adapter: str, inc: _Incoming, dropout: float):
    """``(add_adapter kwargs, {local: tensor})`` for a new adapter; ValueError if the layer cannot take it."""
    kwargs = dict(r=inc.r, lora_alpha=inc.lora_alpha, lora_dropout=dropout if layer._adapter_dropout else 0.0,
                  use_rslora=inc.use_rslora, use_dora=inc.M is not None)
    layer._check_new_adapter(adapter, **kwargs)
    shapes = layer._adapter_shapes(r=inc.r)
    if inc.M is not None:
        shapes = shapes + ((shapes[1][0],),)
    return kwargs, _fitted(inc, shapes)


def _existing_plan(layer: LoRALayer, adapter: str, inc: _Incoming):
    """``(None, {local: tensor})`` for an adapter the layer has; ValueError unless its settings match."""
    v = layer.adapter(adapter)
    scaling = lora_scaling(inc.r, inc.lora_alpha, inc.use_rslora)
    if v.r != inc.r or not math.isclose(scaling, v.scaling, rel_tol=1e-6) or v.use_dora != (inc.M is not None):
        raise ValueError(f"its adapter {adapter!r} has r={v.r}, scaling={v.scaling}, use_dora={v.use_dora}; the "
                         f"folder's has r={inc.r}, scaling={scaling}, use_dora={inc.M is not None} "
                         f"(delete_adapter it first to import it with the folder's settings)")
    shapes = [tuple(t.shape) for t in (v.lora_A, v.lora_B, v.lora_magnitude) if t is not None]
    return None, _fitted(inc, shapes)


def _fitted(inc: _Incoming, shapes) -> Dict[str, Tensor]:
    tensors = {"lora_A": inc.A, "lora_B": inc.B}
    if inc.M is not None:
        tensors["lora_magnitude"] = inc.M
    for (local, t), want in zip(tensors.items(), shapes):
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{local} has shape {tuple(t.shape)}, expected {tuple(want)}")
    return tensors


def _plan(model: nn.Module, adapter_dir: str, adapter: str, strict: bool):
    """``[(module name, layer, add_adapter kwargs or None, {local: tensor})]``; CheckpointError (strict)
    naming every problem, else the modules that do not fit are skipped with a warning."""
    config, groups, problems = _read_adapter(model, adapter_dir)
    layers = dict(lora_modules(model))
    plan = []
    for name in sorted(groups):
        layer = layers.get(name)
        if layer is None or not layer.has_adapter:
            what = "no such module" if layer is None and _missing(model, name) else "not a LoRA layer with an adapter"
            problems.append(f"{name!r}: {what}; a named adapter goes next to a layer's default adapter "
                            f"(inject_lora, or import_peft into 'default', first)")
            continue
        s = _module_settings(config, name)
        try:
            inc = _peft_module(layer, dict(groups[name]), config, name)
            exists = adapter in named_adapters(layer)
            kwargs, tensors = _existing_plan(layer, adapter, inc) if exists else _new_plan(layer, adapter, inc,
                                                                                          s.dropout)
        except (ValueError, TypeError) as exc:
            problems.append(f"{name!r} ({type(layer).__name__}): {exc}")
            continue
        plan.append((name, layer, kwargs, tensors))
    if problems and strict:
        raise CheckpointError(f"cannot import PEFT adapter {adapter_dir!r} as adapter {adapter!r} (the model was "
                              f"not changed):\n  - " + "\n  - ".join(problems))
    if problems:
        import warnings
        warnings.warn(f"import_peft {adapter_dir!r} (adapter {adapter!r}): skipping:\n  - "
                      + "\n  - ".join(problems), stacklevel=4)
    return plan


def _missing(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return False
    except AttributeError:
        return True


@torch.no_grad()
def _apply(plan, adapter: str) -> None:
    """Add the new adapters, then copy the tensors in (a merged layer is unmerged, written, merged again)."""
    with rng_untouched([layer for _, layer, *_ in plan]):
        for _, layer, kwargs, _ in plan:
            if kwargs is not None:
                layer.add_adapter(adapter, **kwargs)
    for _, layer, _, tensors in plan:
        with unmerged(layer):
            held = named_adapters(layer)[adapter]
            for local, t in tensors.items():
                getattr(held, local).copy_(t)


def import_named(model: nn.Module, adapter_dir, adapter: str, strict: bool = True) -> List[str]:
    """:func:`~lora_layers.import_peft` with a named ``adapter`` (the docs are there)."""
    model = unwrap_model(model)
    if shard_group(model) is not None:
        raise NotImplementedError("import_peft: adapter= other than 'default' on a model sharded by fully_shard "
                                  "is not supported (its new adapters would not be sharded): add and load the "
                                  "adapters before fully_shard")
    plan = _plan(model, os.fspath(adapter_dir), adapter, strict)
    _apply(plan, adapter)
    return [name for name, *_ in plan]
