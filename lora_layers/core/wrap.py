"""Wrapping an existing torch layer without copying it, and giving it back.

A LoRA layer made by ``from_module`` adopts the wrapped module's state: its
Parameters, buffers, submodules, hooks and plain attributes, by reference, so
nothing is copied or re-initialised. :func:`plain_module` reverses this for
``unload``/``merge_and_unload``: a module of the wrapped class with the same
attributes and Parameters, and no LoRA state.
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn

__all__ = ["refuse_unwrappable", "adopt", "plain_module"]

_BASE_KEYS: Dict[type, frozenset] = {}
_SHARED_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _base_attribute_names(base: type) -> frozenset:
    """The instance attribute names a ``base`` module has (learned once from a meta-device instance)."""
    if base not in _BASE_KEYS:
        args = (1, 1, 1) if issubclass(base, nn.modules.conv._ConvNd) else (1, 1)
        _BASE_KEYS[base] = frozenset(base(*args, device="meta").__dict__)
    return _BASE_KEYS[base]


def refuse_unwrappable(cls: type, module: nn.Module, wrong_type: bool) -> None:
    """Raise TypeError when ``module`` is not what ``cls`` wraps (``wrong_type``), or wrapping it
    would silently lose behaviour."""
    if wrong_type:
        base = cls._base_type
        raise TypeError(f"{cls.__name__}.from_module expects a {base.__module__}.{base.__name__}, "
                        f"got {type(module).__name__}")
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        # weight_norm / spectral_norm / parametrizations compute the weight on the fly.
        raise TypeError(
            f"{cls.__name__}.from_module: this {type(module).__name__} has no `weight` Parameter (it is "
            f"computed on the fly by weight_norm, spectral_norm or a parametrization); remove the "
            f"reparametrization first (torch.nn.utils.remove_weight_norm, "
            f"torch.nn.utils.parametrize.remove_parametrizations)"
        )
    if "forward" in module.__dict__:
        # A copied bound forward would call the original layer and silently skip the adapter.
        raise TypeError(
            f"{cls.__name__}.from_module: this {type(module).__name__} has an instance-level forward "
            f"(e.g. accelerate hooks from device_map/offload, or a patched forward); add LoRA before "
            f"dispatching the model"
        )


def adopt(cls: type, module: nn.Module) -> nn.Module:
    """A new ``cls`` instance (``__init__`` not run) holding ``module``'s state by reference."""
    obj = cls.__new__(cls)
    nn.Module.__init__(obj)
    for key, value in module.__dict__.items():
        if key in _SHARED_CONTAINERS:
            getattr(obj, key).update(value)
        elif key == "_compiled_call_impl":
            continue  # module.compile() compiled the old forward, not this one
        elif isinstance(value, (dict, set)):
            obj.__dict__[key] = type(value)(value)  # hooks etc.: own copy, same contents
        else:
            obj.__dict__[key] = value
    obj._wrapped_class = type(module)
    obj._wrapped_keys = frozenset(module.__dict__)
    return obj


def plain_module(layer: nn.Module, adapter_names) -> nn.Module:
    """A module of the wrapped class sharing ``layer``'s Parameters, without its LoRA state.

    For a layer made by ``from_module``, the original class with its own
    attributes; for one built directly, ``layer._base_type``.
    """
    cls = layer.__dict__.get("_wrapped_class", layer._base_type)
    keys = layer.__dict__.get("_wrapped_keys") or _base_attribute_names(layer._base_type)
    plain = cls.__new__(cls)
    for key, value in layer.__dict__.items():
        if key in keys:
            plain.__dict__[key] = type(value)(value) if isinstance(value, (dict, set)) else value
    for name in adapter_names:  # Parameters, and the buffers of an adapter's initial values (PiSSA's A₀, B₀)
        plain._parameters.pop(name, None)
        plain._buffers.pop(name, None)
    plain._modules.pop("lora_dropout", None)
    return plain
