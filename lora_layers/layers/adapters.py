"""Named adapters: several adapters on one LoRA layer, one of them active.

The adapter ``"default"`` is the layer's own: its Parameters ``lora_A``, ``lora_B`` (and
``lora_magnitude`` with DoRA) and its attributes ``r``, ``lora_alpha``, ``scaling``,
``lora_dropout``, ``use_rslora``, ``use_dora``, exactly as a layer without named adapters
holds them, so loralib programs, state_dict keys and checkpoint files are unchanged. The
others live in ``layer.lora_adapters``, an ``nn.ModuleDict`` of :class:`Adapter` created by
the first :meth:`~lora_layers.LoRALayer.add_adapter` and removed with the last
:meth:`~lora_layers.LoRALayer.delete_adapter`; a layer that never gets one has no such
submodule, key or attribute.

Everything that needs an adapter's tensors reads them through one accessor,
``layer.adapter(name)``, which returns an :class:`AdapterView` (for ``"default"`` read from
the layer's attributes at call time, so an adapter swapped for plain tensors is used).

A layer's *active* adapter is a name of ``layer.adapter_names``, or None: the layer then
runs its base alone (what a model-level ``set_adapter`` gives a layer that lacks the named
adapter, as PEFT does). Forward uses the active adapter, ``eval()`` merges it.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..core.sharded import fsdp_managed, is_sharded
from ..core.spec import LoRASpec, check_dora_support, check_rank, lora_scaling
from ..variants.pissa import INITIAL_NAMES, is_residual_init

__all__ = ["DEFAULT_ADAPTER", "ADAPTERS_ATTR", "Adapter", "AdapterView", "check_adapter_name"]

DEFAULT_ADAPTER = "default"
ADAPTERS_ATTR = "lora_adapters"  # the ModuleDict of the named adapters (a lora_* name: adapter keys)
_FACTORS = ("lora_A", "lora_B", "lora_magnitude")


class AdapterView(NamedTuple):
    """One adapter of a layer, as forward, merging and io read it (a snapshot of references:
    the tensors are the adapter's own Parameters, or what the layer holds under their names)."""

    name: str
    lora_A: Tensor
    lora_B: Tensor
    lora_magnitude: Optional[Tensor]
    r: int
    lora_alpha: float
    scaling: float
    dropout_p: float
    use_rslora: bool
    use_dora: bool


class Adapter(nn.Module):
    """A named adapter of a LoRA layer (an entry of ``layer.lora_adapters``).

    Its Parameters have the shapes, dtype and device the layer's default adapter would have
    with rank ``r``: ``lora_A``, ``lora_B`` and, with ``use_dora``, ``lora_magnitude``.

    Attributes:
        r, lora_alpha, use_rslora, use_dora, init: its settings (as the layer's own).
        scaling: ``lora_alpha / r`` (``/ √r`` with ``use_rslora``).
        dropout_p: the dropout probability on its input (a float: the layer applies it).
    """

    def __init__(self, spec: LoRASpec, shapes, device, dtype):
        super().__init__()
        self.r, self.lora_alpha, self.dropout_p = spec.r, spec.lora_alpha, float(spec.lora_dropout)
        self.use_rslora, self.use_dora, self.init = spec.use_rslora, spec.use_dora, spec.init
        self.scaling = lora_scaling(spec.r, spec.lora_alpha, spec.use_rslora)
        for name, shape in zip(_FACTORS, shapes):
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))

    def extra_repr(self) -> str:
        extra = f"r={self.r}, lora_alpha={self.lora_alpha}, dropout_p={self.dropout_p}"
        return extra + "".join(f", {flag}=True" for flag in ("use_rslora", "use_dora") if getattr(self, flag))


def check_adapter_name(name, what: str = "adapter name") -> str:
    """``name`` if it can name an adapter: a non-empty str that is a Python identifier (so a
    ModuleDict key and a PEFT adapter name)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{what} must be a non-empty str that is a valid Python identifier "
                         f"(e.g. 'alice', 'task_2'), got {name!r}")
    if hasattr(nn.ModuleDict(), name):  # torch's ModuleDict refuses such keys, after the layer got one
        raise ValueError(f"{what} must not be an attribute of torch's nn.ModuleDict (which holds the named "
                         f"adapters), got {name!r}; pick another name (e.g. {name + '_adapter'!r})")
    return name


def named_adapters(layer) -> nn.ModuleDict:
    """The layer's ModuleDict of named adapters, or an empty dict when it has none."""
    return layer._modules.get(ADAPTERS_ATTR) or {}


def adapter_names(layer) -> Tuple[str, ...]:
    """``("default", *named)`` for a layer with an adapter; ``()`` for ``r == 0``."""
    if not layer.r > 0:
        return ()
    return (DEFAULT_ADAPTER, *named_adapters(layer))


def unknown(layer, name) -> KeyError:
    return KeyError(f"{type(layer).__name__} has no adapter {name!r}; its adapters are {adapter_names(layer)}")


def view(layer, name: str) -> AdapterView:
    """The :class:`AdapterView` of adapter ``name`` of ``layer`` (KeyError for an unknown name)."""
    if name == DEFAULT_ADAPTER and layer.r > 0:
        use_dora = getattr(layer, "use_dora", False)
        return AdapterView(name, getattr(layer, "lora_A"), getattr(layer, "lora_B"),
                           getattr(layer, "lora_magnitude", None) if use_dora else None, layer.r,
                           layer.lora_alpha, layer.scaling, getattr(layer.lora_dropout, "p", 0.0),
                           getattr(layer, "use_rslora", False), use_dora)
    if not (isinstance(name, str) and name in named_adapters(layer)):
        raise unknown(layer, name)
    return view_of(named_adapters(layer)[name], name)


def new_adapter_spec(layer, name, r, lora_alpha, lora_dropout, use_rslora, use_dora, init) -> LoRASpec:
    """Every check of ``add_adapter``, before anything changes."""
    if not layer.r > 0:
        raise ValueError(f"add_adapter: this {type(layer).__name__} has r={layer.r}, no adapter to add named "
                         f"adapters next to; build it with r > 0 (inject_lora or r=...)")
    check_adapter_name(name)
    if is_sharded(layer.weight) or fsdp_managed(layer):
        # new Parameters would be plain tensors FSDP2 neither shards nor reduces: each rank would train its own
        raise ValueError(f"add_adapter: this {type(layer).__name__} is sharded by fully_shard, which would neither "
                         f"shard adapter {name!r} nor reduce its gradients across ranks; add (and load) named "
                         f"adapters before fully_shard")
    if name in adapter_names(layer):
        raise ValueError(f"add_adapter: {type(layer).__name__} already has an adapter {name!r} "
                         f"(adapters: {adapter_names(layer)}); delete_adapter it first or pick another name")
    check_rank(r, "r", positive=True)
    spec = LoRASpec(r, lora_alpha, lora_dropout, use_rslora=use_rslora, use_dora=use_dora, init=init)
    if is_residual_init(spec.init) or is_residual_init(getattr(layer, "init", None)):
        # PiSSA/OLoRA replace the base weight by a residual, which every adapter of the layer would share
        raise ValueError(f"add_adapter: PiSSA/OLoRA inits and named adapters do not mix (the layer's init is "
                         f"{getattr(layer, 'init', None)!r}, the new adapter's {init!r}): the residual base weight "
                         f"belongs to the default adapter; expected init 'kaiming' or 'gaussian' on a layer "
                         f"built with one of them")
    if not layer._adapter_dropout and spec.lora_dropout:
        raise ValueError(f"add_adapter: {type(layer).__name__} has no adapter dropout, got "
                         f"lora_dropout={lora_dropout!r}; expected 0.0")
    check_dora_support(layer, spec.use_dora, True)
    return spec


def add(layer, name, r, lora_alpha, lora_dropout=0.0, *, use_rslora=False, use_dora=False, init="kaiming"):
    """:meth:`LoRALayer.add_adapter` (the docs are there)."""
    spec = new_adapter_spec(layer, name, r, lora_alpha, lora_dropout, use_rslora, use_dora, init)
    shapes = layer._adapter_shapes(r=spec.r)
    if spec.use_dora:
        shapes = shapes + ((shapes[1][0],),)
    adapter = Adapter(spec, shapes, layer.weight.device, layer.lora_dtype or layer._base_dtype())
    layer._init_factors(adapter.lora_A, adapter.lora_B, spec.r, spec.init)
    if spec.use_dora:
        from .merge_state import unmerged  # merge_state imports this module
        with unmerged(layer):  # the norm of the base weight, not of a merged one
            layer._derive_magnitude(adapter, view_of(adapter, name))  # followed by a base weight loaded later
    for p in adapter.parameters():  # trainable as the default adapter is now
        p.requires_grad_(layer.lora_A.requires_grad if isinstance(layer.lora_A, Tensor) else True)
    if ADAPTERS_ATTR not in layer._modules:
        layer.add_module(ADAPTERS_ATTR, nn.ModuleDict())
    layer._modules[ADAPTERS_ATTR][name] = adapter


def view_of(adapter: Adapter, name: str) -> AdapterView:
    """The view of an :class:`Adapter` not (yet) in a layer."""
    return AdapterView(name, adapter.lora_A, adapter.lora_B, getattr(adapter, "lora_magnitude", None), adapter.r,
                       adapter.lora_alpha, adapter.scaling, adapter.dropout_p, adapter.use_rslora, adapter.use_dora)


def delete(layer, name) -> None:
    """:meth:`LoRALayer.delete_adapter`."""
    if name == DEFAULT_ADAPTER:
        raise ValueError(f"delete_adapter: the adapter {DEFAULT_ADAPTER!r} is the layer's own (lora_A, lora_B); "
                         f"it cannot be deleted (unload the layer to drop every adapter)")
    if name not in named_adapters(layer):
        raise unknown(layer, name)
    if name == layer.active_adapter:
        raise ValueError(f"delete_adapter: {name!r} is the active adapter of this {type(layer).__name__}; "
                         f"set_adapter another one ({[n for n in adapter_names(layer) if n != name]}) first")
    adapters = layer._modules[ADAPTERS_ATTR]
    del adapters[name]
    if not len(adapters):  # the last one: the layer is exactly a layer that never had any
        del layer._modules[ADAPTERS_ATTR]


def set_active(layer, name: Optional[str]) -> None:
    """:meth:`LoRALayer.set_adapter`."""
    if name is not None and name not in adapter_names(layer):
        raise unknown(layer, name)
    if name == layer.active_adapter:
        return
    if name is None and getattr(layer, INITIAL_NAMES[0], None) is not None:
        raise ValueError(f"set_adapter: this {type(layer).__name__} has init={layer.init!r}: its base weight is the "
                         f"residual W - s·B₀A₀, so without its adapter it would run neither the original layer nor "
                         f"the trained one; keep its adapter active (lora_layers.unload gives the original layer)")
    if layer.merged and not layer._merged_here():
        raise ValueError(f"set_adapter: this {type(layer).__name__} was merged by code of its own (merged=True "
                         f"without merge()); switching adapters would leave that merge in the weight. Call "
                         f"train() (which takes it out) first")
    was_merged, previous = layer.merged, layer.active_adapter
    layer.unmerge()  # what is merged is the old adapter: take it out before switching
    _store_active(layer, name)
    # eval() merges the active adapter: also one made active after None (which had nothing to merge)
    if (was_merged or (not layer.training and layer.merge_weights)) and layer._merge_blocker() is None:
        try:
            layer.merge()
        except BaseException:  # e.g. a DoRA magnitude of the wrong shape: back to the adapter merged before
            _store_active(layer, previous)
            if was_merged:
                layer.merge()
            raise


def _store_active(layer, name: Optional[str]) -> None:
    if name == DEFAULT_ADAPTER:
        layer.__dict__.pop("_active_adapter", None)  # the class default: no instance attribute
    else:
        layer.__dict__["_active_adapter"] = name


def init_factors(A: Tensor, B: Tensor, r: int, init: str) -> None:
    """The default init of a Linear/Conv adapter: A kaiming-uniform(a=√5) (loralib's) or N(0, 1/r²)
    (``init="gaussian"``, PEFT's); B zero."""
    if init == "gaussian":
        nn.init.normal_(A, std=1 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)
