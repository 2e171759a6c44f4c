"""Adapters that describe themselves: :func:`load_adapter`.

:func:`load_adapter` puts on a plain model the adapters a file describes and
loads them, reading every setting (targets, ranks, alphas, rsLoRA, DoRA, fused
splits, conv layout, adapter dtype) from a :func:`~lora_layers.save_lora`
header or a PEFT ``adapter_config.json``. (:func:`~lora_layers.summary`, which
says what a model's adapters are, lives in :mod:`lora_layers.model.overview`; it is
imported here for its old path, ``lora_layers.adapters.summary``.)
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import torch
import torch.nn as nn

from ..core.sharded import any_fsdp_managed
from ..model.unwrap import strip_prefix, unwrap_model, wrapper_prefix
from .checkpoint import META_BIAS, META_MODULES, CheckpointError, apply_copies, plan_load, read_native
from ..layers.conv import Conv1d, Conv2d, Conv3d
from ..layers.embedding import Embedding
from ..layers.linear import Linear, is_hf_conv1d
from ..layers.merged import MergedLinear
from ..layers.registry import lora_class_for
from .peft_format import import_peft
from ..model.surgery import build_layers
from ..model.swap import swap_modules
from ..model.params import lora_modules, mark_only_lora_as_trainable
from ..model.overview import AdapterSummary, summary  # noqa: F401  (the old path lora_layers.adapters.summary)

__all__ = ["load_adapter", "summary", "AdapterSummary"]  # the last two: as at the old path

_CLASSES = {cls.__name__: cls for cls in (Linear, MergedLinear, Embedding, Conv1d, Conv2d, Conv3d)}


# ----------------------------------------------------------------------------- load_adapter

def _refuse_adapted(model: nn.Module, path: str) -> None:
    adapted = [name or "<root>" for name, _ in lora_modules(model)]
    if adapted:
        raise CheckpointError(
            f"load_adapter adds the adapters of {path!r} to a model without adapters, but "
            f"{type(model).__name__} already has LoRA layers ({', '.join(adapted[:4])}"
            f"{', ...' if len(adapted) > 4 else ''}): call lora_layers.load_lora(model, path) to load into "
            f"them, or lora_layers.unload(model) first")


def _refuse_sharded(model: nn.Module) -> None:
    """load_adapter on a ``fully_shard`` model: refused on every rank alike (the model is sharded alike on every
    rank, so no collective is needed), before its path is even looked at, so that every rank raises this one."""
    if any_fsdp_managed(model):
        raise CheckpointError(
            f"load_adapter: {type(model).__name__} is sharded by fully_shard, and load_adapter adds new LoRA layers: "
            f"their adapters would be whole, unsharded tensors on every rank, outside FSDP2 (neither sharded nor "
            f"gathered, their gradients never averaged over the ranks). Call load_adapter on the model before "
            f"fully_shard, which then shards the adapters with it; or put the adapters on before fully_shard "
            f"(inject_lora, phi3.apply_lora) and load them into the sharded model with load_lora or import_peft "
            f"(the model was not changed)")


def _header_modules(meta: Dict[str, str], path: str) -> Dict[str, Dict[str, Any]]:
    if META_MODULES not in meta:
        raise CheckpointError(
            f"{path!r} records no adapter settings (a loralib torch.save file or a plain safetensors file, "
            f"not one written by lora_layers.save_lora): build the adapters with the settings used in training "
            f"(lora_layers.inject_lora), then call lora_layers.load_lora(model, path)")
    try:
        modules = json.loads(meta[META_MODULES])
    except ValueError as exc:
        raise CheckpointError(f"{path!r}: header field {META_MODULES} is not valid JSON: {exc}") from None
    if not isinstance(modules, dict) or not modules or not all(isinstance(c, dict) for c in modules.values()):
        raise CheckpointError(f"{path!r}: header field {META_MODULES} must map module names to settings, "
                              f"got {meta[META_MODULES][:200]!r}")
    return modules


def _lora_dtype(value):
    """The header's ``lora_dtype`` (``"float32"``, or null: the weight's dtype) as a torch dtype or None."""
    if value is None:
        return None
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"lora_dtype {value!r} is not a floating torch dtype")
    return dtype


def _layer_spec(module: nn.Module, cfg: Dict[str, Any]):
    """``(cls, from_module kwargs)`` rebuilding the layer a header entry describes; ValueError if it cannot."""
    cls = _CLASSES.get(cfg.get("class")) if isinstance(cfg.get("class"), str) else None
    if cls is None:
        raise ValueError(f"the file has an adapter of class {cfg.get('class')!r}, expected one of "
                         f"{sorted(_CLASSES)}")
    # A transformers Conv1D (GPT-2) carries the fan_in_fan_out Linear that import_peft puts on it.
    base = lora_class_for(module, hf_conv1d=cls is Linear)
    if base is not (Linear if cls is MergedLinear else cls):
        raise ValueError(f"the file has an adapter of class {cls.__name__}, which cannot go on a "
                         f"{type(module).__name__}")
    kwargs = {"r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
              "use_dora": bool(cfg.get("use_dora")), "lora_dtype": _lora_dtype(cfg.get("lora_dtype"))}
    if cls is not Embedding:
        kwargs["lora_dropout"] = cfg.get("lora_dropout", 0.0)
    if cls in (Linear, MergedLinear):
        # fan_in_fan_out says how the saved layer stored its weight, not the adapter (whose tensors mean the
        # same either way): a plain nn.Linear stores (out, in), a GPT-2 Conv1D (in, out).
        kwargs["fan_in_fan_out"] = bool(cfg.get("fan_in_fan_out")) and is_hf_conv1d(module)
    if cls is MergedLinear:
        kwargs.update(split_sizes=cfg.get("split_sizes"), enable_lora=cfg.get("enable_lora"))
    if "init" in cfg:  # PiSSA/OLoRA: the file's A₀, B₀ then set the residual base (load_lora)
        kwargs["init"] = cfg["init"]
    if "layout" in cfg and cls not in (Linear, MergedLinear, Embedding):
        kwargs["layout"] = cfg["layout"]
    return cls, kwargs


def _plan(model: nn.Module, modules: Dict[str, Dict[str, Any]], path: str):
    """``(plan, specs)`` for :func:`~lora_layers.surgery.build_layers`, or CheckpointError naming every problem."""
    plan, specs, problems = [], [], []
    for name, cfg in modules.items():
        if name == "":
            problems.append(f"the adapter is on the model itself ({type(model).__name__}), which cannot be replaced "
                            f"in place: wrap it with lora_layers.{cfg.get('class')}.from_module(model, ...) and call "
                            f"lora_layers.load_lora")
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name!r}: no such module in {type(model).__name__}")
            continue
        try:
            specs.append(_layer_spec(module, cfg))
            plan.append((name, module))
        except ValueError as exc:
            problems.append(f"{name!r} ({type(module).__name__}): {exc}")
    if problems:
        raise CheckpointError(f"the adapters of {path!r} do not fit the model (it was not changed):\n  - "
                              + "\n  - ".join(problems))
    return plan, specs


def _load_native(model: nn.Module, path: str) -> List[str]:
    tensors, meta = read_native(path)
    modules = _header_modules(meta, path)
    # A file an older version wrote from a compiled or DDP model names modules and keys with the wrapper's
    # prefix (``_orig_mod.``, ``module.``), as load_lora reads it (checkpoint.canonical_payload).
    prefix = wrapper_prefix(modules, [name for name, _ in model.named_modules()])
    if prefix:
        modules = {strip_prefix(name, prefix): cfg for name, cfg in modules.items()}
        tensors = {strip_prefix(key, prefix): t for key, t in tensors.items()}
        meta = {**meta, META_MODULES: json.dumps(modules)}
    plan, specs = _plan(model, modules, path)
    for (name, _), (cls, kwargs) in zip(plan, specs):
        if cls in (Linear, MergedLinear) and modules[name].get("fan_in_fan_out") and not kwargs["fan_in_fan_out"]:
            # A hand-built fan_in_fan_out layer, unloaded to an nn.Linear: its adapter goes on that (out, in) weight.
            modules[name] = {**modules[name], "fan_in_fan_out": False}
            meta = {**meta, META_MODULES: json.dumps(modules)}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        built = build_layers(model, plan, specs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the adapters of {path!r} do not fit the model (it was not changed): {exc}") from exc
    swap_modules(model, built)
    try:
        copies, _ = plan_load(model, tensors, meta, True, f"adapter file {path!r}", hint="none")
    except BaseException:
        swap_modules(model, {id(built[id(m)]): m for _, m in plan})
        for param, flag in flags:
            param.requires_grad_(flag)
        raise
    apply_copies(copies)
    mark_only_lora_as_trainable(model, meta.get(META_BIAS, "none"))
    return [name for name, _ in lora_modules(model)]


def load_adapter(model: nn.Module, path) -> List[str]:
    """Add to ``model`` the adapters a file or a PEFT folder describes, and load them.

    Nothing needs repeating by hand: a :func:`~lora_layers.save_lora` file's
    header records, per module, the layer class, ``r``, ``lora_alpha``,
    rsLoRA, DoRA, dropout, ``fan_in_fan_out``, a ``MergedLinear``'s
    ``split_sizes``/``enable_lora`` (Phi-3's fused ``qkv_proj``/``gate_up_proj``),
    a conv layer's layout and the adapter dtype; the layers are built from
    the plain ones (a GPT-2 ``Conv1D`` included, as :func:`~lora_layers.import_peft` adapts it;
    sharing their weights, as :func:`~lora_layers.inject_lora`)
    and the tensors loaded with every check of :func:`~lora_layers.load_lora`.
    Afterwards only the adapters (and the biases the file holds) are trainable.
    A PEFT folder is read by :func:`~lora_layers.import_peft` (a fused layer
    exported from a ``MergedLinear`` comes back as one ``Linear`` adapter of
    rank ``r·n`` with the same output). ``fan_in_fan_out`` follows the module:
    a GPT-2 ``Conv1D`` stores its weight ``(in, out)``, a plain ``nn.Linear``
    (a hand-built ``fan_in_fan_out`` layer after :func:`~lora_layers.unload`)
    ``(out, in)``; the adapter tensors mean the same on either.

    Args:
        model: the base model, without LoRA layers (``torch.compile``/DDP wrappers are seen through).
        path: a ``.safetensors`` file written by ``save_lora``, or a PEFT adapter folder.

    Returns:
        The names of the modules that now carry adapters, in model order.

    Raises:
        CheckpointError (a ValueError): the model already has LoRA layers, the file
            records no settings (loralib files, plain safetensors: use ``inject_lora``
            then ``load_lora``), or the adapters do not fit the model (a module that
            does not exist or has another type, shapes, keys); every problem is named.
        FileNotFoundError: no such file or folder.
        TypeError: ``path`` is not a path.
        CheckpointError: the model is sharded by ``fully_shard`` (on every rank alike): load the adapter
            before sharding (docs/distributed.md).

    On any error the model is unchanged (modules, parameters, values, ``requires_grad``).
    """
    model = unwrap_model(model, changes_parameters="load_adapter")
    _refuse_sharded(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file or folder path (str or os.PathLike), got {type(path).__name__} "
                        f"{path!r}")
    path = os.fspath(path)
    _refuse_adapted(model, path)
    if os.path.isdir(path):
        import_peft(model, path)
        mark_only_lora_as_trainable(model)  # as for a native file (PEFT adapters with biases are refused)
        return [name for name, _ in lora_modules(model)]
    return _load_native(model, path)
