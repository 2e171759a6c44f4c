"""Model-level helpers: choose trainable parameters, extract adapter state, merge.

Adapter parameters are found by identity (the ``lora_A``/``lora_B`` Parameters
of :class:`~lora_layers.LoRALayer` modules), never by substring, so a module
named ``lora_block`` or ``flora_head`` is not mistaken for an adapter.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch.nn as nn
from torch import Tensor

from ..layers.ties import find_shared_weights
from .unwrap import unwrap_model
from ..layers.notices import warn_conv_lora_only_biases, warn_lora_named_parameters, warn_wrapper_keys
from ..layers.base import LoRALayer
from ..layers.conv import _ConvNd
from ..core.merging import BASE_CHECK, MERGED_CHECK, MERGED_FACTORS, MERGED_MARK
from ..core.sharded import gathered, gathered_parameters, is_writer, on_every_rank, shard_group
from ..layers.merge_state import SHARDED_REASON
from ..variants.pissa import INITIAL_NAMES

__all__ = [
    "BIAS_MODES",
    "lora_modules",
    "lora_parameters",
    "named_lora_parameters",
    "named_initial_buffers",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "merge_lora",
    "unmerge_lora",
    "merged_state_dict",
    "lora_plus_param_groups",
    "count_lora_parameters",
]

BIAS_MODES = ("none", "all", "lora_only")


def check_bias(bias) -> str:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    return bias


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def lora_modules(model: nn.Module) -> Iterator[Tuple[str, LoRALayer]]:
    """Yield ``(qualified_name, module)`` for every LoRA layer in ``model`` (itself included).

    Here and in every model-level function, a ``torch.compile``, DDP or
    ``DataParallel`` wrapper is seen through: names are the bare model's.
    """
    model = unwrap_model(model)
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def named_lora_parameters(model: nn.Module, adapter: Optional[str] = None) -> Iterator[Tuple[str, nn.Parameter]]:
    """Yield ``(qualified_name, parameter)`` for every adapter parameter, each once: the default
    adapters' and every named adapter's (``<layer>.lora_adapters.<name>.lora_A``).

    With ``adapter``, only that adapter's parameters of the layers that have it, named as a default
    adapter's are (``<layer>.lora_A``): the keys of a single-adapter model.

    Raises:
        KeyError: no layer has an adapter ``adapter`` (the message lists the model's adapters).
    """
    if adapter is not None:
        check_adapter(model, adapter, "named_lora_parameters")
    seen = set()
    for name, module in lora_modules(model):
        for local, param in layer_adapter_parameters(module, adapter).items():
            if id(param) not in seen:
                seen.add(id(param))
                yield _join(name, local), param


def named_initial_buffers(model: nn.Module) -> Iterator[Tuple[str, Tensor]]:
    """Yield ``(qualified_name, buffer)`` for the initial adapters ``A₀``, ``B₀`` that PiSSA/OLoRA layers
    keep (``lora_init_A``, ``lora_init_B``): not trained, but saved with the adapter, since the base weight
    is ``W − s·B₀A₀`` and the change to ``W`` is ``s(B A − B₀A₀)``."""
    for name, module in lora_modules(model):
        for local in INITIAL_NAMES:
            buffer = module._buffers.get(local)
            if buffer is not None:
                yield _join(name, local), buffer


def layer_adapter_parameters(layer: LoRALayer, adapter: Optional[str] = None) -> Dict[str, nn.Parameter]:
    """A layer's adapter parameters by local name: every adapter's (None), or adapter ``adapter``'s named
    as the default's are (empty when the layer lacks it)."""
    if adapter is None:
        return layer.all_adapter_parameters()
    return layer.adapter_parameters(adapter) if adapter in layer.adapter_names else {}


def check_adapter(model: nn.Module, adapter, fn: str) -> None:
    """Raise a KeyError naming ``adapter`` and the model's adapters unless some LoRA layer has it."""
    known = {}
    for _, module in lora_modules(model):
        known.update(dict.fromkeys(module.adapter_names))
    if adapter not in known:
        raise KeyError(f"{fn}: {type(unwrap_model(model)).__name__} has no adapter {adapter!r}; its adapters "
                       f"are {tuple(known)}")


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The adapter parameters, e.g. for ``torch.optim.AdamW(lora_parameters(model))``."""
    return [p for _, p in named_lora_parameters(model)]


def named_bias_parameters(model: nn.Module, bias: str) -> Dict[str, nn.Parameter]:
    """Qualified names of the biases selected by ``bias``: every parameter whose
    local name is exactly ``bias`` ("all"), or the biases of LoRA layers ("lora_only")."""
    model = unwrap_model(model)
    if bias == "none":
        return {}
    out = {}
    for name, module in model.named_modules():
        if bias == "lora_only" and not isinstance(module, LoRALayer):
            continue
        param = module._parameters.get("bias")
        if param is not None:
            out[_join(name, "bias")] = param
    return out


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Make the adapters trainable and freeze everything else (loralib's semantics).

    Args:
        model: any module containing LoRA layers.
        bias: ``"none"`` freezes every bias; ``"all"`` trains every bias;
            ``"lora_only"`` trains the biases of LoRA layers only.

    Raises:
        ValueError: ``bias`` is not one of ``"none"``, ``"all"``, ``"lora_only"``
            (the model is left unchanged).

    Warns (UserWarning) when ``model`` has no adapter parameters (e.g. only
    ``r=0`` layers, loralib's default): everything but the chosen biases is
    then frozen, as loralib does silently.
    With ``bias="lora_only"``, warns once per process when it trains the bias of
    a conv LoRA layer: loralib's ``"lora_only"`` leaves conv biases frozen.
    Warns once per process when it freezes parameters whose names contain
    ``lora_`` but that are no LoRA layer's adapter (loralib's name test trains them).
    """
    model = unwrap_model(model)
    check_bias(bias)
    find_shared_weights(model)  # a tied weight must never be merged into by eval()
    trainable = {id(p) for p in lora_parameters(model)}
    if not trainable:
        warnings.warn(f"mark_only_lora_as_trainable: {type(model).__name__} has no adapter parameters (no LoRA "
                      f"layer with r > 0; loralib's layers default to r=0), so every parameter "
                      f"{'is now frozen' if bias == 'none' else f'but the biases of bias={bias!r} is now frozen'}. "
                      f"Give the LoRA layers r > 0, or use inject_lora", UserWarning, stacklevel=2)
    biases = named_bias_parameters(model, bias)
    trainable |= {id(p) for p in biases.values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
    if bias == "lora_only":
        conv_biases = [_join(name, "bias") for name, module in model.named_modules()
                       if isinstance(module, _ConvNd) and _join(name, "bias") in biases]
        if conv_biases:
            warn_conv_lora_only_biases(conv_biases)
    named_only = [n for n, p in _lora_named_non_adapters(model) if not p.requires_grad]
    if named_only:
        warn_lora_named_parameters("mark_only_lora_as_trainable", named_only)


def _lora_named_non_adapters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Parameters that loralib's name test (``'lora_' in name``) takes for adapters and lora_layers does not."""
    adapters = {id(p) for p in lora_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n and id(p) not in adapters]


def lora_state_dict(model: nn.Module, bias: str = "none", adapter: Optional[str] = None) -> Dict[str, Tensor]:
    """The adapter tensors (and biases per ``bias``) keyed as in ``model.state_dict()``: every
    adapter's, named ones included (``<layer>.lora_adapters.<name>.lora_A``).

    With ``adapter="name"``, that adapter alone, keyed as a default adapter is (``<layer>.lora_A``)
    on the layers that have it: a plain single-adapter state dict (KeyError for a name no layer has).

    Works whether or not the model is merged (adapters are never merged away). PiSSA/OLoRA layers add
    their initial adapters ``lora_init_A``/``lora_init_B`` (buffers: :func:`named_initial_buffers`).
    Load it back with ``model.load_state_dict(sd, strict=False)`` or, with
    validation, :func:`lora_layers.load_lora`. For a ``torch.compile`` or DDP
    wrapper, the keys are the bare model's (loralib kept the wrapper's prefix;
    this warns once). Trainable parameters whose names contain ``lora_`` but that
    are no LoRA layer's adapter are left out, with a warning (once per process):
    loralib's name test saves them.

    On a model sharded by ``fully_shard``, call it on every rank (with the same ``bias``): every rank
    gets the whole tensors (gathered copies), equal to one process's.
    """
    group = shard_group(unwrap_model(model))
    def check():
        check_bias(bias)
        if adapter is not None:
            check_adapter(model, adapter, "lora_state_dict")

    on_every_rank(group, "lora_state_dict", check, same=dict(bias=bias, adapter=adapter))
    if unwrap_model(model) is not model:
        warn_wrapper_keys(model)
    out = {name: gathered(p) for name, p in named_lora_parameters(model, adapter)}
    out.update({name: gathered(p) for name, p in named_bias_parameters(model, bias).items()})
    out.update(named_initial_buffers(model))
    left_out = [n for n, p in _lora_named_non_adapters(unwrap_model(model)) if p.requires_grad and n not in out]
    if left_out:
        warn_lora_named_parameters("lora_state_dict", left_out)
    return out


def merge_lora(model: nn.Module, safe_merge: bool = False) -> None:
    """Merge every LoRA layer's adapter into its weight (see :meth:`LoRALayer.merge`).

    All or nothing: if one layer refuses (its weight is shared with another
    module, or ``safe_merge`` found non-finite values), the layers merged by
    this call are unmerged again, exactly, and the error is re-raised with the
    layer's name.
    """
    model = unwrap_model(model)
    find_shared_weights(model)
    merge_layers(list(lora_modules(model)), safe_merge)


def merge_layers(layers, safe_merge: bool = False) -> None:
    """:func:`merge_lora` over ``(name, layer)`` pairs: all or nothing, errors named."""
    done = []
    try:
        for name, module in layers:
            if not module.merged:
                try:
                    module.merge(safe_merge=safe_merge)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{name or type(module).__name__}: {exc}") from exc
                done.append(module)
    except BaseException:
        for module in done:
            module.unmerge()
        raise


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora` exactly."""
    for _, module in lora_modules(model):
        module.unmerge()


def merged_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """``model.state_dict()`` as loralib's ``eval(); state_dict()`` gave it: every
    adapted weight with ``scaling · B A`` folded in, and no adapter keys.

    The model is not changed, merged or not: the merged weights are copies. Load
    the result into the plain model (before LoRA surgery) with ``strict=True``.
    It is what ``model.eval(); model.state_dict()`` gives without the adapter
    keys, and it is a plain model's state dict: loaded into a LoRA model, its
    weights become the base weights.

    On a model sharded by ``fully_shard``, call it on every rank: each tensor is gathered in turn
    (``DTensor.full_tensor()``), each LoRA layer's weight merged from its gathered parameters as one process
    merges it, and rank 0 gets the whole state dict, equal to one process's bit for bit, **on the CPU** (each
    gathered tensor is copied there at once, so at most one layer's worth is whole on the device); the other
    ranks get an empty dict (as torch's ``get_model_state_dict`` with ``full_state_dict=True``).

    Raises:
        ValueError: a layer cannot be merged (its weight is shared with another
            module, e.g. tied embeddings, or an Embedding with ``max_norm``); names it.
    """
    model = unwrap_model(model)
    group = shard_group(model)

    def check():
        find_shared_weights(model)
        layers = [(name, layer) for name, layer in lora_modules(model) if layer.has_adapter]
        for name, layer in layers:
            blocker = layer._merge_blocker()
            if blocker is not None and not (group is not None and blocker == SHARDED_REASON):
                raise ValueError(f"merged_state_dict: cannot merge {name or type(layer).__name__}: {blocker}")
        return layers

    layers = on_every_rank(group, "merged_state_dict", check)
    state = model.state_dict()
    if group is not None:
        _gather_merged(state, layers, is_writer(group))
    for name, layer in layers:
        if group is None:
            state[_join(name, "weight")] = layer.merged_weight()
        for local in [*layer.all_adapter_parameters(), *INITIAL_NAMES]:
            state.pop(_join(name, local), None)
        # No adapter keys: a plain model's state dict, so no merged mark (it only means something next to them).
        for key in (MERGED_MARK, MERGED_FACTORS, MERGED_CHECK, BASE_CHECK):
            getattr(state, "_metadata", {}).get(name, {}).pop(key, None)
    return state


def _gather_merged(state: Dict[str, Tensor], layers, keep: bool) -> None:
    """Replace, in key order, each tensor of a sharded model's ``state`` by its whole value on the CPU (a
    collective per tensor: every rank calls it), and each LoRA layer's weight by the merged one, computed from
    the layer's gathered parameters; adapter keys are left for the caller to drop. Where ``keep`` is False
    (not rank 0) nothing is kept, nor merged: ``state`` ends empty."""
    merging = {_join(name, "weight"): layer for name, layer in layers}
    adapters = {_join(name, local) for name, layer in layers for local in layer.all_adapter_parameters()}
    for key in list(state):
        layer = merging.get(key)
        if layer is not None:
            with gathered_parameters(layer):  # the whole weight and adapter, merged as one process does
                value = layer.merged_weight() if keep else None
        elif key not in adapters:
            value = gathered(state[key])
        else:
            continue  # dropped by the caller: never gathered
        state[key] = value.cpu() if keep else None  # off the device at once: one layer whole there at a time
    if not keep:
        state.clear()


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                           weight_decay: float = 0.0) -> List[Dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024): ``lora_B`` learns ``ratio`` times faster.

    ``torch.optim.AdamW(lora_plus_param_groups(model, lr=2e-4))`` trains every
    ``lora_B`` of a Linear, MergedLinear or Conv layer at ``ratio · lr`` and the
    other adapter parameters (``lora_A``, DoRA's ``lora_magnitude``, and both
    factors of Embedding adapters, whose roles are swapped) at ``lr``, together
    with every other parameter that requires grad (e.g. biases trained with
    ``mark_only_lora_as_trainable(bias=...)``), so no trainable parameter is left
    out of the optimizer.

    Returns:
        Two groups (empty ones left out), each with ``params``, ``lr`` and ``weight_decay``.

    Raises:
        ValueError: ``lr``, ``ratio`` or ``weight_decay`` is not a finite number
            (``lr`` and ``ratio`` positive, ``weight_decay`` non-negative), or the
            model has no adapter parameters.
    """
    for arg, value, low in (("lr", lr, 0.0), ("ratio", ratio, 0.0), ("weight_decay", weight_decay, None)):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (low is not None and value <= low) or (low is None and value < 0):
            expected = "a positive finite number" if low is not None else "a non-negative finite number"
            raise ValueError(f"{arg} must be {expected}, got {value!r}")
    fast, base = [], []
    for name, module in lora_modules(model):
        for local, param in module.all_adapter_parameters().items():
            fast_one = local.rsplit(".", 1)[-1] == "lora_B" and not isinstance(module, nn.Embedding)
            (fast if fast_one else base).append(param)
    if not fast and not base:
        raise ValueError("lora_plus_param_groups: the model has no adapter parameters")
    # Every other trainable parameter (biases from mark_only_lora_as_trainable(bias=...), a trainable
    # head) trains at lr, as in PEFT's LoRA+ optimizer; left out, an optimizer built from these
    # groups would silently never update it.
    seen = {id(p) for p in fast + base}
    base += [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [{"params": base, "lr": float(lr), "weight_decay": float(weight_decay)},
              {"params": fast, "lr": float(lr) * float(ratio), "weight_decay": float(weight_decay)}]
    return [g for g in groups if g["params"]]


def count_lora_parameters(model: nn.Module) -> int:
    """Number of adapter parameter elements in ``model``."""
    return sum(p.numel() for p in lora_parameters(model))
