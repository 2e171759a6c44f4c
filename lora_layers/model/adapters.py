"""Named adapters over a whole model: add one to every LoRA layer (or those ``targets`` selects), make
one active, delete one, list them. Each call checks every layer before it changes any.

The adapter ``"default"`` is each layer's own (what ``inject_lora`` made); see
:mod:`lora_layers.layers.adapters` for how a layer holds the others.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch.nn as nn

from ..layers.adapters import DEFAULT_ADAPTER, check_adapter_name, named_adapters
from ..layers.base import LoRALayer
from ..layers.linear import Linear
from .params import lora_modules
from .surgery import ALL_LINEAR, _parse_targets
from .unwrap import unwrap_model

__all__ = ["add_adapter", "set_adapter", "delete_adapter", "adapter_names"]


def _adapter_layers(model: nn.Module) -> List[Tuple[str, LoRALayer]]:
    """The LoRA layers that have an adapter (``r > 0``), by qualified name."""
    return [(name, layer) for name, layer in lora_modules(model) if layer.r > 0]


def adapter_names(model: nn.Module) -> Tuple[str, ...]:
    """Every adapter name in ``model``: ``"default"`` first, then the named ones in the order they
    were added (a name held by only some layers included); ``()`` without LoRA layers."""
    names = {}
    for _, layer in _adapter_layers(model):
        names.update(dict.fromkeys(layer.adapter_names))
    return tuple(names)


def _targeted(model: nn.Module, targets) -> List[Tuple[str, LoRALayer]]:
    layers = _adapter_layers(model)
    if not layers:
        raise ValueError(f"add_adapter: {type(model).__name__} has no LoRA layer with an adapter (r > 0) to add "
                         f"a named adapter to; call inject_lora first")
    if targets is None:
        return layers
    entries = _parse_targets(targets, "targets")
    if targets == ALL_LINEAR:
        return [(n, layer) for n, layer in layers if isinstance(layer, Linear)]
    missing = [label for label, match in entries if not any(match(n) for n, _ in layers)]
    if missing:
        raise ValueError(f"add_adapter: targets {missing} match no LoRA layer of {type(model).__name__} "
                         f"(its LoRA layers are named like {[n for n, _ in layers][:4]})")
    return [(n, layer) for n, layer in layers if any(match(n) for _, match in entries)]


def add_adapter(model: nn.Module, name: str, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0, *,
                targets=None, use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming") -> None:
    """Add the named adapter ``name`` to every LoRA layer of ``model``, or to those ``targets`` selects.

    Each layer gets it as :meth:`LoRALayer.add_adapter` gives it (initialised as a default adapter
    with these settings would be, so the model's outputs do not change); it is not made active
    (:func:`set_adapter`). Layers without adapter dropout (Embedding) get none.

    Args:
        model: a model with LoRA layers (``torch.compile``/DDP wrappers are seen through).
        name: the adapter's name, a Python identifier other than ``"default"``.
        r, lora_alpha, lora_dropout, use_rslora, use_dora, init: its settings (as ``inject_lora``'s).
        targets: None (every LoRA layer), or which LoRA layers, as ``inject_lora`` reads them: a list
            of name suffixes, a regex for the whole name, or ``"all-linear"``.

    Raises:
        ValueError, TypeError: a bad name or setting, a name a selected layer has already, a target
            that matches no LoRA layer, or a layer that cannot hold it (DoRA on an Embedding or conv);
            the error names the layer. No layer is changed.
    """
    model = unwrap_model(model)
    chosen = _targeted(model, targets)
    check_adapter_name(name)
    settings = dict(use_rslora=use_rslora, use_dora=use_dora, init=init)
    plan = [(n, layer, lora_dropout if layer._adapter_dropout else 0.0) for n, layer in chosen]
    for n, layer, dropout in plan:  # every check before any change
        _named(n, layer._check_new_adapter, name, r, lora_alpha, dropout, **settings)
    done = []
    try:
        for n, layer, dropout in plan:
            layer.add_adapter(name, r, lora_alpha, dropout, **settings)
            done.append(layer)
    except BaseException:
        for layer in done:
            layer.delete_adapter(name)
        raise


def _named(layer_name: str, call, *args, **kwargs):
    """``call(*args, **kwargs)``, its ValueError/TypeError/KeyError naming the layer."""
    try:
        return call(*args, **kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise type(exc)(f"{layer_name or '<root>'}: {text}") from exc


def _check_known(model: nn.Module, name, fn: str) -> None:
    known = adapter_names(model)
    if name not in known:
        raise KeyError(f"{fn}: {type(model).__name__} has no adapter {name!r}; its adapters are {known}")


def set_adapter(model: nn.Module, name: Optional[str]) -> None:
    """Make ``name`` the active adapter of every LoRA layer that has it; the layers that lack it (an
    adapter added with ``targets=``) run their base alone, as PEFT does. None: the base model.

    A merged layer (eval mode) is unmerged and merged again with the new adapter (a layer in eval mode
    with ``merge_weights`` merges it also after None, as ``eval()`` would).

    Raises:
        KeyError: no layer has an adapter ``name`` (the message lists :func:`adapter_names`); nothing changes.
        ValueError: a PiSSA/OLoRA layer would be left without its adapter (its base is the residual
            ``W − s·B₀A₀``, docs/pissa.md); nothing changes.
    """
    model = unwrap_model(model)
    if name is not None:
        _check_known(model, name, "set_adapter")
    layers = _adapter_layers(model)
    before = [layer.active_adapter for _, layer in layers]
    try:
        for n, layer in layers:
            _named(n, layer.set_adapter, name if name in layer.adapter_names else None)
    except BaseException:
        for (_, layer), old in zip(layers, before):
            layer.set_adapter(old)
        raise


def delete_adapter(model: nn.Module, name: str) -> None:
    """Delete the named adapter ``name`` from every LoRA layer that has it.

    Raises:
        ValueError: ``name`` is ``"default"`` (each layer's own adapter: ``unload`` drops it), or it is
            active (:func:`set_adapter` another first).
        KeyError: no layer has it. Nothing changes when any of these is raised.
    """
    model = unwrap_model(model)
    if name == DEFAULT_ADAPTER:
        raise ValueError(f"delete_adapter: {DEFAULT_ADAPTER!r} is each layer's own adapter and cannot be deleted "
                         f"(lora_layers.unload(model) drops every adapter)")
    _check_known(model, name, "delete_adapter")
    holders = [(n, layer) for n, layer in _adapter_layers(model) if name in named_adapters(layer)]
    active = [n or "<root>" for n, layer in holders if layer.active_adapter == name]
    if active:
        raise ValueError(f"delete_adapter: {name!r} is the active adapter of {active[:4]}"
                         f"{' ...' if len(active) > 4 else ''}; set_adapter(model, ...) another one first")
    for _, layer in holders:
        layer.delete_adapter(name)
