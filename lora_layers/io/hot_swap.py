"""Hot swap: another adapter's weights copied into a model's adapter tensors, in place.

:func:`hotswap` reads a :func:`~lora_layers.save_lora` file, a PEFT adapter folder or a
``lora_state_dict``, checks every target first, and then copies into the existing
Parameters (same objects, same storage), so a ``torch.compile``d model runs the new
adapter without recompiling. A smaller rank is zero-padded up to the layer's rank (per
split of a :class:`~lora_layers.MergedLinear`); the new scale goes into the 0-d tensor
that :func:`prepare_for_hotswap` gives each layer (see ``HOTSWAP_SCALE`` in
:mod:`lora_layers.layers.base`), which compiled code reads as data.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..core.sharded import shard_group
from ..core.spec import lora_scaling, rank_divisor
from ..layers.adapters import DEFAULT_ADAPTER, named_adapters
from ..layers.base import ADAPTER_NAMES, HOTSWAP_SCALE, MAGNITUDE_NAME, LoRALayer
from ..layers.conv import _ConvNd
from ..layers.embedding import Embedding
from ..layers.linear import Linear
from ..layers.merge_state import unmerged
from ..layers.merged import MergedLinear
from ..model.params import check_adapter, lora_modules
from ..model.unwrap import unwrap_model
from ..variants.pissa import INITIAL_NAMES
from .checkpoint import (META_BIAS, _config_mismatches, _copy_problem, _saved_modules, canonical_payload,
                         read_native)
from .fileio import CheckpointError
from .peft_format import _adapted_magnitude, _adapter_tensors, _module_settings, _read_adapter

__all__ = ["hotswap", "prepare_for_hotswap"]

# Header fields a hot swap may change (the scale goes into lora_alpha); every other one must match the layer.
_SWAPPED_FIELDS = ("r", "lora_alpha", "scaling", "use_rslora", "lora_dropout", "lora_dtype")
_LOCAL_NAMES = ADAPTER_NAMES + (MAGNITUDE_NAME,)


@dataclass
class _Incoming:
    """One module's adapter as read: ``A``/``B`` in the layer's own layout at rank ``r`` (per split),
    the DoRA magnitude or None, and the settings that give its scale (None: the adapter's own in the
    model, for a state dict, which records none)."""

    A: Tensor
    B: Tensor
    M: Optional[Tensor]
    r: int
    lora_alpha: Optional[float]
    use_rslora: Optional[bool]


def _adapter_holder(layer: LoRALayer, adapter: str):
    """The object that holds ``adapter``'s Parameters (``lora_A``, ``lora_B``, ``lora_magnitude``) and
    settings (``r``, ``lora_alpha``, ``use_rslora``, ``scaling``) on ``layer``: for ``"default"`` the
    layer itself, for a named adapter its :class:`~lora_layers.layers.adapters.Adapter` (same names)."""
    return layer if adapter == DEFAULT_ADAPTER else named_adapters(layer)[adapter]


def _write_scale(holder: nn.Module) -> None:
    """Put ``holder.scaling`` (a layer's, or a named adapter's) into its hot-swap scale buffer (added on
    first use), in place."""
    bits = torch.tensor(float(holder.scaling), dtype=torch.float64).view(torch.int64)
    buffer = holder._buffers.get(HOTSWAP_SCALE)
    if buffer is None:
        holder.register_buffer(HOTSWAP_SCALE, bits.to(holder.lora_B.device), persistent=False)
    else:
        buffer.copy_(bits)  # the same tensor: compiled code sees the new value without a recompile


def prepare_for_hotswap(model: nn.Module) -> None:
    """Hold each LoRA layer's scale in a 0-d tensor, so that :func:`hotswap` can change it without a
    recompile (``torch.compile`` guards a float attribute such as ``layer.scaling`` as a constant).

    Call it before ``torch.compile``; :func:`hotswap` calls it too, but on a model compiled before
    then the first swap recompiles once. Eager forwards are unchanged (they read ``layer.scaling``);
    the tensor is a non-persistent buffer (no state_dict key) that moves with ``model.to(device)``.
    Change the scale only through :func:`hotswap` afterwards (or call this again): compiled code
    reads the tensor, not ``layer.scaling``.
    """
    for _, layer in lora_modules(unwrap_model(model)):
        if layer.has_adapter:
            for holder in (layer, *named_adapters(layer).values()):  # each named adapter holds its own scale
                _write_scale(holder)


# ----------------------------------------------------------------------------- reading


def _rank_unit(layer: LoRALayer) -> int:
    """Rows of the rank dimension per unit of rank: ``k`` for a loralib-layout conv (rank ``r·k``), else 1."""
    return layer.kernel_size[0] if isinstance(layer, _ConvNd) and layer.layout == "loralib" else 1


def _splits(layer: LoRALayer) -> int:
    return layer.segments.count if isinstance(layer, MergedLinear) else 1


def _native_module(layer: LoRALayer, t: Dict[str, Tensor], cfg: Optional[Dict[str, Any]],
                   adapter: Optional[str] = None) -> _Incoming:
    """One module of a native file or state dict; ValueError if it cannot go into ``layer``."""
    if "lora_A" not in t or "lora_B" not in t:
        raise ValueError(f"needs lora_A and lora_B, got {sorted(t)}")
    A, B, M = t["lora_A"], t["lora_B"], t.get(MAGNITUDE_NAME)
    n, unit = _splits(layer), _rank_unit(layer)
    if cfg is None:  # a state dict records no settings: its rank is in the shapes, its alpha is the model's
        if A.dim() < 1 or A.shape[0] % (n * unit):
            raise ValueError(f"lora_A has shape {tuple(A.shape)}: its rows are not {n * unit}·r")
        return _Incoming(A, B, M, A.shape[0] // (n * unit), None, None)
    fixed = {k: v for k, v in cfg.items() if k not in _SWAPPED_FIELDS}
    differs = _config_mismatches(fixed, layer, adapter)
    if differs:
        raise ValueError("; ".join(differs))
    r, alpha, rslora = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("use_rslora", False)
    if not (isinstance(r, int) and r > 0) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"the header records r={r!r}, lora_alpha={alpha!r}: expected a positive int and a "
                         f"finite number")
    return _Incoming(A, B, M, r, alpha, bool(rslora))


def _from_state_dict(model: nn.Module, tensors: Dict[str, Tensor], meta: Dict[str, str], source: str,
                     adapter: Optional[str] = None):
    """``({module name: _Incoming}, the module names the tensors name, problems)`` from a native file's or a
    state dict's tensors."""
    problems = []
    bias = meta.get(META_BIAS, "none")
    groups: Dict[str, Dict[str, Tensor]] = {}
    for key, t in tensors.items():
        module, _, local = key.rpartition(".")
        if local in _LOCAL_NAMES:
            groups.setdefault(module, {})[local] = t
        elif local == "bias":
            problems.append(f"{key}: a bias (bias={bias!r}); hot swap changes adapters only (load a file with "
                            f"biases with lora_layers.load_lora)")
        else:
            problems.append(f"{key}: not an adapter tensor ({', '.join(_LOCAL_NAMES)})")
    saved = _saved_modules(meta, source)
    layers = _holding(model, adapter)
    incoming = {}
    for name in sorted(groups):
        layer = layers.get(name)
        if layer is None:
            continue  # reported by _target_problems
        try:
            incoming[name] = _native_module(layer, groups[name], saved.get(name), adapter)
        except ValueError as exc:
            problems.append(f"{name!r} ({type(layer).__name__}): {exc}")
    return incoming, sorted(groups), problems


def _peft_module(layer: LoRALayer, t: Dict[str, Tensor], config: Dict[str, Any], name: str) -> _Incoming:
    """One module of a PEFT folder in ``layer``'s layout; ValueError if it cannot go into ``layer``."""
    s = _module_settings(config, name)
    A, B, M, embedding = _adapter_tensors(layer, t, s)
    if embedding != isinstance(layer, Embedding):
        raise ValueError(f"{'embedding' if embedding else 'linear'} adapter keys for a {type(layer).__name__}")
    if _rank_unit(layer) != 1:
        raise ValueError("a layout='loralib' conv layer takes no PEFT adapter in a hot swap")
    if isinstance(layer, _ConvNd):
        A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
    if not isinstance(layer, MergedLinear):
        return _Incoming(A, B, M, s.r, s.alpha, s.rslora)
    n = layer.segments.count
    if s.r % n:
        raise ValueError(f"PEFT rank {s.r} is not {n}·r for this layer's {n} enabled splits")
    r = s.r // n
    M = None if M is None else _adapted_magnitude(layer, M)
    # export_peft writes α·n (α·√n with rsLoRA) to keep the per-split scale; undo it.
    return _Incoming(A, layer.segments.from_block_diagonal(B, r), M, r, s.alpha / rank_divisor(n, s.rslora), s.rslora)


def _holding(model: nn.Module, adapter: Optional[str]) -> Dict[str, LoRALayer]:
    """The LoRA layers with an adapter ``adapter`` (None: with an adapter), by name; a source's tensors for
    any other module are no target (:func:`_target_problems` names them)."""
    return {name: layer for name, layer in lora_modules(model) if layer.has_adapter
            and (adapter is None or adapter in layer.adapter_names)}


def _from_peft(model: nn.Module, folder: str, adapter: Optional[str] = None):
    """As :func:`_from_state_dict`, for a PEFT adapter folder."""
    config, groups, problems = _read_adapter(model, folder)
    layers = _holding(model, adapter)
    incoming = {}
    for name in sorted(groups):
        layer = layers.get(name)
        if layer is None:
            continue
        try:
            incoming[name] = _peft_module(layer, dict(groups[name]), config, name)
        except ValueError as exc:
            problems.append(f"{name!r} ({type(layer).__name__}): {exc}")
    return incoming, sorted(groups), problems


def _read_source(model: nn.Module, source, adapter: Optional[str] = None):
    """``(incoming, module names in the source, problems, a description of the source)``; a native
    source's settings are compared with adapter ``adapter``'s (None: the layer's own)."""
    if isinstance(source, dict):
        if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in source.items()):
            raise TypeError("hotswap: a state dict must map str -> Tensor (lora_layers.lora_state_dict(model))")
        tensors, meta, _ = canonical_payload(model, dict(source), {})
        return (*_from_state_dict(model, tensors, meta, "state dict", adapter), "the state dict")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"hotswap: path_or_state_dict must be a save_lora file, a PEFT adapter folder or a "
                        f"state dict, got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        return (*_from_peft(model, path, adapter), f"PEFT adapter {path!r}")
    tensors, meta = read_native(path)
    tensors, meta, _ = canonical_payload(model, tensors, meta)
    return (*_from_state_dict(model, tensors, meta, f"LoRA checkpoint {path!r}", adapter),
            f"LoRA checkpoint {path!r}")


# ----------------------------------------------------------------------------- planning and applying


def _target_problems(layers: Dict[str, LoRALayer], names: List[str], adapter: str) -> List[str]:
    """The modules the source and the model disagree on: a hot swap replaces every adapter or none."""
    problems = []
    missing = sorted(set(layers) - set(names))
    extra = [n for n in names if n not in layers]
    if missing:
        problems.append(f"the source has no adapter for these LoRA layers of the model: {missing}")
    if extra:
        where = "a LoRA adapter" if adapter == DEFAULT_ADAPTER else f"an adapter {adapter!r}"
        problems.append(f"the source has adapters for modules without {where} in the model: {extra}")
    for name, layer in layers.items():
        if not isinstance(layer, (Linear, Embedding, _ConvNd)):
            problems.append(f"{name!r} ({type(layer).__name__}) is a LoRALayer class of your own, whose forward "
                            f"does not read the hot-swap scale")
        elif getattr(layer, INITIAL_NAMES[0], None) is not None:
            problems.append(f"{name!r}: init={layer.init!r}: its base weight is the residual W - s·B₀A₀ of its own "
                            f"initial adapter, which a hot swap (A and B only) cannot move; use lora_layers.load_lora")
    return problems


def _padded(t: Tensor, n: int, rank: int, dim: int) -> Tensor:
    """``t`` with its rank dimension ``dim`` (``n`` blocks, one per split) zero-padded to ``rank`` per block."""
    blocks = t.reshape(t.shape[:dim] + (n, t.shape[dim] // n) + t.shape[dim + 1:])
    out = blocks.new_zeros(blocks.shape[:dim + 1] + (rank,) + blocks.shape[dim + 2:])
    out.narrow(dim + 1, 0, blocks.shape[dim + 1]).copy_(blocks)
    return out.reshape(t.shape[:dim] + (n * rank,) + t.shape[dim + 1:])


def _plan_layer(name: str, layer: LoRALayer, holder, inc: _Incoming):
    """``(layer, holder, [(parameter, padded tensor)], new lora_alpha)``; ValueError if it does not fit."""
    n, unit = _splits(layer), _rank_unit(layer)
    if inc.r > holder.r:
        raise ValueError(f"the adapter has rank {inc.r}, larger than the layer's r={holder.r}: a hot swap can "
                         f"only zero-pad a smaller rank up (build the adapters with r >= {inc.r})")
    A_shape = (n * inc.r * unit,) + tuple(holder.lora_A.shape[1:])
    B_shape = (holder.lora_B.shape[0], inc.r * unit)
    for label, t, want in (("lora_A", inc.A, A_shape), ("lora_B", inc.B, B_shape)):
        if tuple(t.shape) != want:
            raise ValueError(f"{label} has shape {tuple(t.shape)}, expected {want} (rank {inc.r} in this "
                             f"layer's layout)")
    tensors = {"lora_A": _padded(inc.A, n, holder.r * unit, 0), "lora_B": _padded(inc.B, 1, holder.r * unit, 1)}
    if holder.use_dora != (inc.M is not None):
        raise ValueError(f"the layer has use_dora={holder.use_dora}, the adapter "
                         f"{'has' if inc.M is not None else 'has no'} DoRA magnitude")
    if inc.M is not None:
        tensors[MAGNITUDE_NAME] = inc.M
    copies = []
    for local, t in tensors.items():
        param = getattr(holder, local)
        problem = _copy_problem(f"{name}.{local}", t, param, tuple(param.shape), None)
        if problem is not None:
            raise ValueError(problem)
        copies.append((param, t))
    alpha_in = holder.lora_alpha if inc.lora_alpha is None else inc.lora_alpha
    rslora_in = holder.use_rslora if inc.use_rslora is None else inc.use_rslora
    if inc.r == holder.r and rslora_in == holder.use_rslora:
        alpha = alpha_in
    else:  # the alpha that gives the incoming adapter's scale at the layer's rank
        alpha = lora_scaling(inc.r, alpha_in, rslora_in) * rank_divisor(holder.r, holder.use_rslora)
    return layer, holder, copies, alpha


@torch.no_grad()
def _apply(plan) -> None:
    """Copy in place and set the new alpha and scale; merged layers are unmerged, written and merged again."""
    with unmerged(*(layer for layer, *_ in plan)):
        for layer, holder, copies, alpha in plan:
            for param, t in copies:
                param.copy_(t)  # casts to the parameter's dtype and device, keeps its identity and storage
            holder.lora_alpha = alpha
            holder.scaling = lora_scaling(holder.r, alpha, holder.use_rslora)
            _write_scale(holder)


def hotswap(model: nn.Module, path_or_state_dict, adapter: str = "default") -> List[str]:
    """Copy another adapter into ``model``'s adapter tensors in place, so that a ``torch.compile``d
    model runs it without recompiling.

    The source is a :func:`~lora_layers.save_lora` file (or a loralib ``torch.save`` file), a PEFT
    adapter folder (as :func:`~lora_layers.import_peft` reads it), or a state dict as
    :func:`~lora_layers.lora_state_dict` returns it. It must hold an adapter for every LoRA layer of
    the model with an adapter, and for nothing else, each of the same kind, splits, layout and DoRA
    setting. An adapter of smaller rank is zero-padded up to the layer's rank (per split of a
    ``MergedLinear``) and gives exactly its own output; a larger rank is refused.

    Afterwards each layer describes the adapter it now holds: ``r`` stays the layer's (the tensors'
    shapes), and ``lora_alpha`` and ``scaling`` give the incoming adapter's scale at that rank
    (``lora_alpha / r``, or ``/ √r`` with rsLoRA, as the layer's ``use_rslora`` says), so a
    :func:`~lora_layers.save_lora` file written now, read by :func:`~lora_layers.load_adapter`,
    gives the same outputs. A state dict records no alpha: its adapters are taken to have the
    layer's ``lora_alpha`` and ``use_rslora`` at their own rank. Dropout and the other training
    settings stay the layer's. Merged layers (``eval()``) are unmerged, written and merged again.

    The first call (or :func:`prepare_for_hotswap`, which is best called before ``torch.compile``)
    gives each layer the 0-d tensor that compiled code reads the scale from.

    Args:
        model: the model with LoRA layers (``torch.compile``/DDP wrappers are seen through).
        path_or_state_dict: a file path, a PEFT folder path, or a dict of str -> Tensor.
        adapter: the adapter to write into: ``"default"`` (the layer's own), or a named adapter
            (:func:`~lora_layers.add_adapter`), which then must be on exactly the layers the source
            covers; the source is a single adapter as ``save_lora(..., adapter=name)``,
            ``lora_state_dict(..., adapter=name)`` or ``export_peft(..., adapter=name)`` write it, and
            its settings are compared with that adapter's. Each named adapter holds its own scale tensor.

    Returns:
        The names of the modules swapped, sorted.

    Raises:
        CheckpointError (a ValueError): the source does not fit the model (a module missing or
            extra, another layer kind, shape, splits or DoRA setting, a larger rank, a bias); every
            problem is named and nothing changes.
        ValueError: a model without adapters.
        KeyError: no layer has an adapter ``adapter``.
        TypeError: a source that is neither a path nor a dict of tensors.
        NotImplementedError: a model sharded by ``fully_shard``.
        FileNotFoundError: no such file or folder.
    """
    model = unwrap_model(model)
    if not isinstance(adapter, str):
        raise TypeError(f"hotswap: adapter must be a str, got {type(adapter).__name__} {adapter!r}")
    if shard_group(model) is not None:
        raise NotImplementedError("hotswap: a model sharded by fully_shard is not supported; load_lora loads "
                                  "into it (and recompiles a compiled model)")
    layers = {name: layer for name, layer in lora_modules(model) if layer.has_adapter}
    if not layers:
        raise ValueError(f"hotswap: the model ({type(model).__name__}) has no LoRA adapters to swap into")
    check_adapter(model, adapter, "hotswap")
    layers = {name: layer for name, layer in layers.items() if adapter in layer.adapter_names}
    holders = {name: _adapter_holder(layer, adapter) for name, layer in layers.items()}
    incoming, names, problems, what = _read_source(model, path_or_state_dict,
                                                   None if adapter == DEFAULT_ADAPTER else adapter)
    problems = problems + _target_problems(layers, names, adapter)
    plan = []
    for name in sorted(incoming):
        try:
            plan.append(_plan_layer(name, layers[name], holders[name], incoming[name]))
        except ValueError as exc:
            problems.append(f"{name!r} ({type(layers[name]).__name__}): {exc}")
    if problems:
        raise CheckpointError(f"hotswap: {what} does not fit the model (nothing was changed):\n  - "
                              + "\n  - ".join(problems))
    _apply(plan)
    return sorted(incoming)
