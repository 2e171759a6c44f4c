"""Adapter checkpoints: what a native file holds, and loading it into a model.

Here live the native format (the header fields and their constants), the
adapter payload of a model, and the validate-then-apply load:

* :func:`save_lora` writes the adapter tensors and a header recording the
  format, the library version and each layer's r / alpha / splits;
* :func:`load_lora` validates everything (keys, shapes, dtypes, the header's
  layer configuration, its checksum) *before* touching the model, then copies
  into the existing Parameters (:func:`plan_load`, then :func:`apply_copies`);
* loralib ``torch.save`` state_dicts load too.

Writing and reading bytes (atomic writes, the safetensors writer, the checksum,
format recognition, never unpickling) is :mod:`lora_layers.fileio`.

PEFT's adapter format lives in :mod:`lora_layers.peft_format`, training state
(adapter + optimizer + RNG) in :mod:`lora_layers.training_state`.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..model.unwrap import strip_prefix, unwrap_model, wrapper_prefix
from .._version import __version__
from ..layers.notices import name_some
from .fileio import (
    CheckpointError,
    atomic_write,
    check_destination,
    read_file,
    safetensors_bytes,
    tensor_checksum,
    to_storable,
)
from ..layers.base import ADAPTER_NAMES, LoRALayer
from ..layers.conv import _ConvNd
from ..layers.merge_state import unmerged
from ..core.sharded import gathered, is_writer, on_every_rank, shard_group, write_shard
from ..model.families import FITTING_CALLS
from ..model.params import (BIAS_MODES, check_adapter, check_bias, layer_adapter_parameters, lora_modules,
                            named_bias_parameters, named_initial_buffers, named_lora_parameters)
from ..layers.adapters import ADAPTERS_ATTR, DEFAULT_ADAPTER
from ..variants.pissa import INITIAL_NAMES

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "LoadResult",
    "save_lora",
    "load_lora",
]

FORMAT_NAME = "lora_layers.adapter"
FORMAT_VERSION = "1"

# Header metadata keys. Everything under RESERVED_PREFIX (and "format", the
# Hugging Face convention) belongs to the library; user metadata keeps its own keys.
RESERVED_PREFIX = "lora_layers."
META_FORMAT = RESERVED_PREFIX + "format"
META_FORMAT_VERSION = RESERVED_PREFIX + "format_version"
META_LIBRARY_VERSION = RESERVED_PREFIX + "version"
META_BIAS = RESERVED_PREFIX + "bias"
META_MODULES = RESERVED_PREFIX + "modules"
META_SHA256 = RESERVED_PREFIX + "sha256"
# {layer: {adapter name: settings}} of the named adapters a file holds (absent without any).
META_NAMED = RESERVED_PREFIX + "named_adapters"
META_HF_FORMAT = "format"

# Module-config fields compared against the model's layers at load time.
_CONFIG_FIELDS = ("class", "r", "lora_alpha", "use_rslora", "scaling", "split_sizes", "enable_lora",
                  "fan_in_fan_out", "use_dora")
# What a field means when a checkpoint written before it existed lacks it.
_CONFIG_DEFAULTS = {"use_dora": False}


@dataclass
class LoadResult:
    """What :func:`load_lora` did.

    Attributes:
        missing_keys: adapter keys the model has and the checkpoint lacks (not loaded).
        unexpected_keys: checkpoint keys the model has no adapter/bias for (ignored).
        mismatched_keys: keys skipped for a shape, dtype or layer-config mismatch.
        metadata: the user metadata stored by :func:`save_lora` (empty for loralib files).
    """

    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    mismatched_keys: List[str] = field(default_factory=list)
    metadata: Dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- saving

def _module_config(layer: LoRALayer, adapter: Optional[str] = None) -> Dict[str, Any]:
    """The header settings of ``layer`` with its default adapter, or with adapter ``adapter`` in its place."""
    cfg = {"class": type(layer).__name__, "r": layer.r, "lora_alpha": layer.lora_alpha,
           "scaling": layer.scaling, "use_rslora": getattr(layer, "use_rslora", False),
           "lora_dropout": getattr(layer.lora_dropout, "p", 0.0), "use_dora": getattr(layer, "use_dora", False)}
    if adapter is not None:
        v = layer.adapter(adapter)
        cfg.update(r=v.r, lora_alpha=v.lora_alpha, scaling=v.scaling, use_rslora=v.use_rslora,
                   lora_dropout=v.dropout_p, use_dora=v.use_dora)
    if hasattr(layer, "fan_in_fan_out"):
        cfg["fan_in_fan_out"] = layer.fan_in_fan_out
    if hasattr(layer, "split_sizes"):
        cfg["split_sizes"] = list(layer.split_sizes)
        cfg["enable_lora"] = list(layer.enable_lora)
    if isinstance(layer, _ConvNd):
        cfg["layout"] = layer.layout
    if getattr(layer, INITIAL_NAMES[0], None) is not None:  # only then: other files stay byte for byte as before
        cfg["init"] = layer.init
    # Read by load_adapter to rebuild the layer; files written before these fields load all the same.
    dtype = getattr(layer, "lora_dtype", None)
    cfg["lora_dtype"] = None if dtype is None else str(dtype).replace("torch.", "")
    return cfg


def _check_user_metadata(metadata) -> Dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of str -> str or None, got {type(metadata).__name__} "
                        f"{metadata!r}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str -> str, got {key!r}: {value!r} "
                            f"({type(key).__name__} -> {type(value).__name__})")
        if key.startswith(RESERVED_PREFIX) or key == META_HF_FORMAT:
            raise ValueError(f"metadata key {key!r} is reserved (keys starting with {RESERVED_PREFIX!r} "
                             f"and {META_HF_FORMAT!r} belong to lora_layers)")
    return dict(metadata)


def adapter_payload(model: nn.Module, bias: str,
                    adapter: Optional[str] = None) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """The adapter tensors and the library header fields for ``model`` (with ``adapter``, that adapter
    alone, as a single-adapter model's). Sharded parameters are gathered (a collective: on a
    ``fully_shard`` model every rank calls this)."""
    model = unwrap_model(model)
    check_bias(bias)
    tensors = {name: gathered(p) for name, p in named_lora_parameters(model, adapter)}
    if not tensors:
        raise ValueError(f"the model ({type(model).__name__}) has no LoRA adapters (no LoRA layer with r > 0; "
                         f"merge_and_unload removes them), so there is nothing to save")
    tensors.update({name: gathered(p) for name, p in named_bias_parameters(model, bias).items()})
    if adapter in (None, DEFAULT_ADAPTER):  # PiSSA/OLoRA: what the base weight was reduced by
        tensors.update(named_initial_buffers(model))
    tensors = to_storable(tensors)
    layers = [(name, m) for name, m in lora_modules(model) if m.has_adapter]
    if adapter is None:
        modules = {name: _module_config(m) for name, m in layers}
        named = {name: {a: _module_config(m, a) for a in m.adapter_names[1:]} for name, m in layers}
        named = {name: cfgs for name, cfgs in named.items() if cfgs}
    else:
        modules = {name: _module_config(m, adapter) for name, m in layers if adapter in m.adapter_names}
        named = {}
    header = {
        META_HF_FORMAT: "pt",
        META_FORMAT: FORMAT_NAME,
        META_FORMAT_VERSION: FORMAT_VERSION,
        META_LIBRARY_VERSION: __version__,
        META_BIAS: bias,
        META_MODULES: json.dumps(modules, sort_keys=True),
        META_SHA256: tensor_checksum(tensors),
    }
    if named:  # only a file with named adapters has the field: other files stay byte for byte as before
        header[META_NAMED] = json.dumps(named, sort_keys=True)
    return tensors, header


def _warn_unsaved_trainable(model: nn.Module, bias: str) -> None:
    """Warn, naming a few, when trainable parameters are left out of a ``save_lora(model, bias=bias)`` file:
    training them was lost work, e.g. biases left trainable because mark_only_lora_as_trainable was not called."""
    saved = {id(p) for _, p in named_lora_parameters(model)}
    saved |= {id(p) for p in named_bias_parameters(model, bias).values()}
    unsaved = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved]
    if not unsaved:
        return
    biases = {id(p) for p in named_bias_parameters(model, "all").values()}
    lora_biases = {id(p) for p in named_bias_parameters(model, "lora_only").values()}
    hints = []
    if any(id(p) in biases for _, p in unsaved):
        keeps = "lora_only" if all(id(p) in lora_biases for _, p in unsaved if id(p) in biases) else "all"
        them = "them" if all(id(p) in biases for _, p in unsaved) else "the biases"
        hints.append(f"bias={keeps!r} saves {them}")
    if not all(id(p) in biases for _, p in unsaved):
        hints.append("save_lora never saves other parameters: save them yourself (e.g. from model.state_dict())")
    count = "1 trainable parameter is" if len(unsaved) == 1 else f"{len(unsaved)} trainable parameters are"
    warnings.warn(f"save_lora: {count} not saved: "
                  f"{name_some(n for n, _ in unsaved)}. {'; '.join(hints)}; or, if they were not meant to "
                  f"train, freeze them with mark_only_lora_as_trainable(model) before training",
                  UserWarning, stacklevel=3)


def save_lora(model: nn.Module, path, bias: str = "none", metadata: Optional[Dict[str, str]] = None,
              adapter: Optional[str] = None) -> None:
    """Save the adapter tensors of ``model`` (and biases per ``bias``) as safetensors, atomically.

    Keys are exactly those of ``model.state_dict()`` (as :func:`lora_layers.lora_state_dict`; of the
    bare model inside a ``torch.compile`` or DDP wrapper).
    The header records the format, the library version, the bias mode, a
    SHA-256 of the tensor bytes and, per LoRA module, ``r``, ``lora_alpha``,
    ``scaling``, ``use_rslora``, the layer class and (MergedLinear)
    ``split_sizes``/``enable_lora``, so :func:`load_lora` can check them.

    Args:
        model: a module containing LoRA layers (merged or not: adapters are never merged away).
        path: destination file; its folder must exist. A previous file is replaced
            only once the new one is complete on disk.
        bias: ``"none"``, ``"all"`` or ``"lora_only"`` (as :func:`lora_layers.lora_state_dict`).
        metadata: extra ``str -> str`` header entries, returned by :func:`load_lora`.
        adapter: None saves every adapter (named ones under ``<layer>.lora_adapters.<name>.``, their
            settings in the header field ``lora_layers.named_adapters``); a name saves that adapter
            alone, keyed and described as a model holding it as its only adapter would be (a file
            :func:`load_lora` and :func:`~lora_layers.load_adapter` read into a single-adapter model).

    Raises:
        ValueError: no adapters in ``model``, bad ``bias``, a reserved metadata key,
            or a ``path`` that names no file (e.g. ``""``).
        KeyError: no layer has an adapter ``adapter``.
        TypeError: ``metadata`` is not a dict of str -> str, or ``path`` is not a path.
        FileNotFoundError / PermissionError / IsADirectoryError: bad destination.

    Nothing is written when any of these is raised.

    On a model sharded by ``fully_shard``, call it on every rank: the adapters are gathered and rank 0
    writes the file one process writes, byte for byte. Every rank passes the same arguments; an error on
    one rank (a bad argument, a destination rank 0 cannot write) is raised on every rank.

    Warns (UserWarning) when trainable parameters are not saved (biases left
    out by ``bias``, or a head, a norm... left trainable because
    :func:`mark_only_lora_as_trainable` was not called), naming a few of them
    and the ``bias`` that keeps the biases. The file is written all the same.
    """
    model = unwrap_model(model)
    group = shard_group(model)
    writer = is_writer(group)

    def check():
        user = _check_user_metadata(metadata)
        if writer:
            check_destination(path, "LoRA checkpoint")
        check_bias(bias)
        if adapter is not None:
            check_adapter(model, adapter, "save_lora")
        return user

    same = dict(path=path, bias=bias, metadata=metadata, adapter=adapter)
    user = on_every_rank(group, "save_lora", check, same=same)
    tensors, header = adapter_payload(model, bias, adapter)  # sharded: gathered on every rank
    if writer:
        _warn_unsaved_trainable(model, bias)
    data = safetensors_bytes(tensors, {**user, **header}) if writer else b""
    on_every_rank(group, "save_lora", lambda: atomic_write(path, lambda f: f.write(data), "LoRA checkpoint")
                  if writer else None)


# ----------------------------------------------------------------------------- reading

def read_checkpoint(path, dir_fd: Optional[int] = None) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Read a native/safetensors checkpoint or a loralib ``torch.save`` state_dict.

    The file is read once and its format recognised by parsing
    (:func:`lora_layers.fileio.read_file`); the header checksum, when there is
    one, is verified.
    With ``dir_fd``, the file is opened in that folder (see :func:`lora_layers.fileio.read_folder`).

    Returns:
        ``(tensors, header_metadata)``; the metadata is empty for torch files.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, truncated, corrupted or unsafe file, or a
            torch file that is not a state_dict (names the path).
    """
    obj, meta = read_file(path, "LoRA checkpoint", dir_fd)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{os.fspath(path)!r} does not hold a state_dict (a dict of str -> Tensor), "
                              f"got {type(obj).__name__}")
    expected = meta.get(META_SHA256)
    if expected is not None and tensor_checksum(obj) != expected:
        raise CheckpointError(f"{os.fspath(path)!r} is corrupted: the SHA-256 of its tensor data does not match "
                              f"the checksum in its header")
    return dict(obj), meta


def read_native(path: str) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """:func:`read_checkpoint`, refusing a header of another format or format version."""
    tensors, meta = read_checkpoint(path)
    fmt = meta.get(META_FORMAT)
    if fmt is not None and fmt != FORMAT_NAME:
        raise CheckpointError(f"{path!r} has format {fmt!r}, expected {FORMAT_NAME!r}")
    version = meta.get(META_FORMAT_VERSION)
    if version is not None and version != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has format version {version!r}; this lora_layers reads {FORMAT_VERSION!r}")
    return tensors, meta


# ----------------------------------------------------------------------------- validation

def _config_mismatches(saved: Dict[str, Any], layer: LoRALayer, adapter: Optional[str] = None) -> List[str]:
    current = _module_config(layer, adapter)
    problems = []
    saved = {**_CONFIG_DEFAULTS, **saved}
    for key in _CONFIG_FIELDS:
        if key in saved and key in current and saved[key] != current[key]:
            problems.append(f"{key}: checkpoint {saved[key]!r}, model {current[key]!r}")
    if ("init" in saved) != ("init" in current):  # any two PiSSA/OLoRA inits load into each other (A₀, B₀ move)
        checkpoint = repr(saved["init"]) if "init" in saved else "neither PiSSA nor OLoRA"
        problems.append(f"init: checkpoint {checkpoint}, model {layer.init!r} (a PiSSA/OLoRA layer's base is the "
                        f"residual W - s·B₀A₀, another layer's is W)")
    return problems


def canonical_payload(model: nn.Module, tensors: Dict[str, Tensor],
                      meta: Dict[str, str]) -> Tuple[Dict[str, Tensor], Dict[str, str], str]:
    """``(tensors, meta, prefix)``: a file written from a compiled or DDP model by older versions, or by
    loralib's ``lora_state_dict``, carries the wrapper's prefix in every key and header module name;
    strip it where that makes the keys match ``model`` (see :func:`lora_layers.model.unwrap.wrapper_prefix`)."""
    model = unwrap_model(model)
    prefix = wrapper_prefix(tensors, [n for n, _ in model.named_parameters(remove_duplicate=False)])
    if not prefix:
        return tensors, meta, prefix
    tensors = {strip_prefix(k, prefix): v for k, v in tensors.items()}
    try:
        modules = json.loads(meta[META_MODULES]) if META_MODULES in meta else None
    except ValueError:
        modules = None  # plan_load reports the malformed field
    if isinstance(modules, dict):
        meta = {**meta, META_MODULES: json.dumps({strip_prefix(k, prefix): v for k, v in modules.items()})}
    return tensors, meta, prefix


def _loralib_conv_keys(model: nn.Module, tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """loralib 0.1.2's conv layers hold their conv as ``.conv`` (``lora_state_dict(bias="all")``
    writes ``<layer>.conv.bias``): rename those keys as the layer's ``load_state_dict`` does."""
    renamed = dict(tensors)
    for name, layer in lora_modules(model):
        if isinstance(layer, _ConvNd):
            layer._rename_loralib_keys(renamed, f"{name}." if name else "")
    return renamed


def _conv_layouts(model: nn.Module, tensors: Dict[str, Tensor]) -> Tuple[Dict[str, tuple], Dict[str, str]]:
    """For conv layers: the shapes their adapter keys take once a loralib-shaped adapter switches
    a fresh layer to loralib's layout, and, per key, how a layout explains a shape mismatch."""
    targets, hints = {}, {}
    for name, layer in lora_modules(model):
        if not isinstance(layer, _ConvNd):
            continue
        keys = [f"{name}.{local}" if name else local for local in ADAPTER_NAMES]
        shapes = tuple(tuple(tensors[k].shape) if k in tensors else None for k in keys)
        if layer._switches_layout_for(shapes):
            targets.update(zip(keys, shapes))
        elif None not in shapes and (hint := layer._layout_hint(shapes)):
            hints.update(dict.fromkeys(keys, hint))
    return targets, hints


def plan_load(model: nn.Module, tensors: Dict[str, Tensor], meta: Dict[str, str], strict: bool,
               source: str, hint: str = "load_lora", adapter: Optional[str] = None):
    """Validate ``tensors`` against ``model``; return the copies to make and the report.

    Touches nothing. Raises CheckpointError listing every problem when ``strict``. ``hint`` says what
    the differing-settings message suggests: ``"load_lora"`` the call that builds fitting adapters and
    ``load_adapter``; ``"build"`` (a training state, which ``load_adapter`` does not read) only that call;
    ``"none"`` nothing (``load_adapter`` itself, where only a tampered header can differ).
    ``adapter``: the file holds that adapter alone, keyed as a default adapter (``save_lora(adapter=)``).
    """
    model = unwrap_model(model)
    owner = {}  # key -> LoRA layer whose merge state must be handled
    for name, layer in lora_modules(model):
        initial = [n for n in INITIAL_NAMES if n in layer._buffers] if adapter in (None, DEFAULT_ADAPTER) else []
        for local in [*layer_adapter_parameters(layer, adapter), *initial]:
            owner[f"{name}.{local}" if name else local] = layer
    expected, tensors = _expected_keys(model, tensors, meta, source, adapter)
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    saved_modules = _saved_modules(meta, source)
    differing = _differing_modules(model, saved_modules, adapter)
    if adapter is None:
        differing += _differing_named(model, meta, source)
    names = {name for name, _, _ in differing}
    mismatched = {k for k in tensors if k in owner and k.rpartition(".")[0] in names}
    problems = _config_problems(model, differing, saved_modules, hint)
    copies = _checked_copies(model, tensors, expected, owner, mismatched, problems,
                             layouts=adapter in (None, DEFAULT_ADAPTER))
    problems.extend(_key_problems(missing, unexpected, differing))
    user = {k: v for k, v in meta.items() if not k.startswith(RESERVED_PREFIX) and k != META_HF_FORMAT}
    result = LoadResult(missing, unexpected, sorted(mismatched), user)
    if problems and strict:
        raise CheckpointError(f"{source} does not match the model (nothing was loaded):\n  - "
                              + "\n  - ".join(problems))
    if problems:
        warnings.warn(f"{source}: loading with strict=False, skipping:\n  - " + "\n  - ".join(problems),
                      stacklevel=5)  # load_lora -> on_every_rank -> plan -> here
    return copies, result


def _expected_keys(model: nn.Module, tensors: Dict[str, Tensor], meta: Dict[str, str], source: str,
                   adapter: Optional[str] = None) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """``(the parameters the file should hold by key, the file's tensors)``: the adapters, and the biases of
    the header's bias mode, or, in a loralib file (no mode, loralib's conv keys renamed), those it holds."""
    expected = dict(named_lora_parameters(model, adapter))
    if adapter in (None, DEFAULT_ADAPTER):  # PiSSA/OLoRA's A₀, B₀ belong to the default adapter
        expected.update(named_initial_buffers(model))
    bias_mode = meta.get(META_BIAS)
    if bias_mode is not None and bias_mode not in BIAS_MODES:
        raise CheckpointError(f"{source}: header field {META_BIAS}={bias_mode!r} is not a valid bias mode, "
                              f"expected {', '.join(map(repr, BIAS_MODES[:-1]))} or {BIAS_MODES[-1]!r}")
    if bias_mode is not None:
        expected.update(named_bias_parameters(model, bias_mode))
    else:  # loralib files carry no bias mode: accept whichever biases they hold
        all_biases = named_bias_parameters(model, "all")
        tensors = _loralib_conv_keys(model, tensors)
        expected.update({k: all_biases[k] for k in tensors if k in all_biases})
    return expected, tensors


def _saved_modules(meta: Dict[str, str], source: str) -> Dict[str, Any]:
    """The header's per-module settings (``{}`` in a file without them)."""
    if META_MODULES not in meta:
        return {}
    try:
        saved_modules = json.loads(meta[META_MODULES])
        assert isinstance(saved_modules, dict)
    except (ValueError, AssertionError) as exc:
        raise CheckpointError(f"{source}: header field {META_MODULES} is not a JSON object: {exc}") from exc
    return saved_modules


def _differing_modules(model: nn.Module, saved_modules: Dict[str, Any],
                       adapter: Optional[str] = None) -> List[Tuple[str, LoRALayer, str]]:
    """``(name, layer, what differs)`` for each LoRA layer whose settings (with adapter ``adapter``)
    differ from the header's."""
    modules = dict(lora_modules(model))
    differing = []
    for mod_name, saved in saved_modules.items():
        layer = modules.get(mod_name)
        lacks = layer is None or (adapter is not None and adapter not in layer.adapter_names)
        if lacks or not isinstance(saved, dict):
            continue  # its keys are reported as unexpected
        diffs = _config_mismatches(saved, layer, adapter)
        if diffs:
            differing.append((mod_name, layer, "; ".join(diffs)))
    return differing


def _differing_named(model: nn.Module, meta: Dict[str, str], source: str) -> List[Tuple[str, LoRALayer, str]]:
    """``(<layer>.lora_adapters.<name>, layer, what differs)`` for each named adapter whose settings differ
    from the header's ``lora_layers.named_adapters`` field (absent: nothing to compare)."""
    saved = _saved_modules({META_MODULES: meta[META_NAMED]}, source) if META_NAMED in meta else {}
    modules = dict(lora_modules(model))
    differing = []
    for mod_name, adapters in saved.items():
        layer = modules.get(mod_name)
        for name, cfg in (adapters.items() if layer is not None and isinstance(adapters, dict) else ()):
            if name in layer.adapter_names[1:] and isinstance(cfg, dict):
                diffs = _config_mismatches(cfg, layer, name)
                if diffs:
                    key = f"{mod_name}.{ADAPTERS_ATTR}.{name}" if mod_name else f"{ADAPTERS_ATTR}.{name}"
                    differing.append((key, layer, "; ".join(diffs)))
    return differing


def _checked_copies(model: nn.Module, tensors: Dict[str, Tensor], expected: Dict[str, Tensor], owner,
                    mismatched: set, problems: List[str], layouts: bool = True) -> list:
    """``[(key, owning layer or None, parameter, tensor)]`` for the keys that load; a key that cannot
    goes to ``mismatched``, with its reason to ``problems``. ``layouts``: the keys name the default
    adapters, whose conv layout a loralib-shaped file may switch."""
    copies = []
    layout_shapes, layout_hints = _conv_layouts(model, tensors) if layouts else ({}, {})
    for key in sorted(tensors):
        if key not in expected or key in mismatched:
            continue
        t, p = tensors[key], expected[key]
        problem = _copy_problem(key, t, p, layout_shapes.get(key, tuple(p.shape)), layout_hints.get(key))
        if problem is None:
            copies.append((key, owner.get(key), p, t))
        else:
            problems.append(problem)
            mismatched.add(key)
    return copies


def _copy_problem(key: str, t: Tensor, p: Tensor, shape: tuple, layout_hint: Optional[str]) -> Optional[str]:
    """Why the file's ``t`` cannot be copied into the model's ``p`` (expected to take ``shape``), or None."""
    if tuple(t.shape) != shape:
        hint = f" ({layout_hint})" if layout_hint else ""
        return f"{key}: shape mismatch, expected {tuple(p.shape)} (model), got {tuple(t.shape)} (checkpoint){hint}"
    if not t.is_floating_point():
        return f"{key}: dtype {t.dtype} is not a floating dtype (model has {p.dtype})"
    if p.is_meta:  # a copy into a meta tensor is a no-op: it would report a load that never happened
        return (f"{key}: the model's parameter is on the meta device (no storage to load into); "
                f"materialise the model first, e.g. model.to_empty(device='cpu')")
    return None


def _key_problems(missing: List[str], unexpected: List[str], differing) -> List[str]:
    problems = []
    if missing:
        named = f".{ADAPTERS_ATTR}."
        hint = "" if not any(named in "." + k for k in missing) else (
            " (the model's named adapters; a file of one adapter loads into one of them with "
            "load_lora(model, path, adapter=name), adapter='default' for the layers' own)")
        problems.append(f"missing keys (in the model, not in the checkpoint): {missing}{hint}")
    # A differing module's extra keys (a DoRA magnitude, ...) are explained by its settings line.
    explained = {name for name, _, _ in differing}
    if any(k.rpartition(".")[0] not in explained for k in unexpected):
        problems.append(f"unexpected keys (in the checkpoint, not in the model): "
                        f"{[k for k in unexpected if k.rpartition('.')[0] not in explained]}")
    return problems


def _suffix_counts(names) -> str:
    """``"qkv_proj ×16, o_proj ×16"``: module names grouped by their last component, in first-seen order."""
    counts: Dict[str, int] = {}
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    return ", ".join(f"{leaf} ×{n}" if n > 1 else leaf for leaf, n in counts.items())


def _config_problems(model: nn.Module, differing, saved_modules: Dict[str, Any], hint: str) -> List[str]:
    """One line per distinct difference (not one per module), then one line naming the call that
    builds adapters fitting the file."""
    groups: Dict[Tuple[str, str], List[str]] = {}
    for name, layer, diffs in differing:
        groups.setdefault((type(layer).__name__, diffs), []).append(name)
    lines = []
    for (cls, diffs), names in groups.items():
        if len(names) == 1:
            lines.append(f"module {names[0]!r} ({cls}) differs: {diffs}")
        else:
            lines.append(f"{len(names)} {cls} modules ({_suffix_counts(names)}) differ: {diffs}")
    call = fitting_call(model, saved_modules) if lines and hint != "none" else None
    if call and hint == "build":
        lines.append(f"the checkpoint's adapters have other settings than the model's: on the model without "
                     f"adapters (lora_layers.unload(model) removes them), build them with {call}")
    elif lines and hint == "load_lora":
        build = f"build them with {call}, or " if call else ""
        lines.append(f"the checkpoint's adapters have other settings than the model's: on the model without "
                     f"adapters (lora_layers.unload(model) removes them), {build}call "
                     f"lora_layers.load_adapter(model, path), which reads the settings from the file")
    return lines


_VARIES = object()


def _uniform(saved_modules: Dict[str, Any], key: str):
    """The value of ``key`` shared by every module's settings, or ``_VARIES``."""
    values = {json.dumps(cfg.get(key, _CONFIG_DEFAULTS.get(key))) for cfg in saved_modules.values()}
    return json.loads(values.pop()) if len(values) == 1 else _VARIES


def _exact_targets(model: nn.Module, names: List[str]) -> Optional[List[str]]:
    """Name suffixes (as ``inject_lora``'s ``targets`` reads them) that select exactly ``names`` in
    ``model``: the last name components if they do, else the full names if they do, else None."""
    for targets in (list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names)), list(names)):
        hit = {n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)}
        if hit == set(names):
            return targets
    return None


#: Model families' own presets, registered by their modules (``lora_layers.phi3``) so that this generic
#: module never imports them: ``family_call(model, saved_modules, targets, args)`` returns the preset call
#: (e.g. ``lora_layers.phi3.apply_lora(model, r=16, ...)``) that builds exactly these adapters, or None.
#: The registry is :data:`lora_layers.model.families.FITTING_CALLS`; this is the same list, by its old name.
FAMILY_CALLS = FITTING_CALLS


def fitting_call(model: nn.Module, saved_modules: Dict[str, Any]) -> Optional[str]:
    """The ``phi3.apply_lora(...)`` or ``inject_lora(...)`` call that builds adapters with the settings a
    header records (per module ``saved_modules``) on ``model`` without adapters, or None when no single
    call does (settings that vary per module, a fused layer outside Phi-3, ...)."""
    if not saved_modules or not all(isinstance(c, dict) for c in saved_modules.values()):
        return None
    settings = {key: _uniform(saved_modules, key) for key in ("r", "lora_alpha", "use_rslora", "use_dora")}
    # (an Embedding or conv layer records no fan_in_fan_out: it does not make the setting vary)
    if _VARIES in settings.values() or any(cfg.get("fan_in_fan_out") for cfg in saved_modules.values()):
        return None
    args = [f"r={settings['r']!r}", f"lora_alpha={settings['lora_alpha']!r}"]
    args += [f"{key}=True" for key in ("use_rslora", "use_dora") if settings[key]]
    # An adapter dtype other than the weight's (lora_dtype=torch.float32 on a bf16 base): a call without it
    # builds weight-dtype adapters, into which load_lora would silently round the saved values.
    lora_dtype = _uniform(saved_modules, "lora_dtype")
    if lora_dtype is _VARIES or not (lora_dtype is None
                                     or isinstance(getattr(torch, str(lora_dtype), None), torch.dtype)):
        return None
    if lora_dtype is not None:
        args.append(f"lora_dtype=torch.{lora_dtype}")
    init = _uniform(saved_modules, "init")  # recorded for PiSSA/OLoRA layers only
    if init is _VARIES:
        return None
    if init is not None:
        args.append(f"init={init!r}")
    targets = _exact_targets(model, list(saved_modules))
    if targets is None:
        return None
    for family_call in FITTING_CALLS:
        call = family_call(model, saved_modules, targets, list(args))
        if call is not None:
            return call
    if any("split_sizes" in cfg for cfg in saved_modules.values()):
        return None  # MergedLinear splits come from the model: only the Phi-3 preset knows them
    args += dropout_arg(saved_modules, 0.0)
    return f"lora_layers.inject_lora(model, {targets!r}, {', '.join(args)})"


def dropout_arg(saved_modules: Dict[str, Any], default: float) -> List[str]:
    """``["lora_dropout=0.1"]`` when every module saved that dropout and it is not the callee's ``default``
    (training on after the named call then drops out as before), else nothing."""
    # An Embedding has no dropout (recorded as 0.0); the call's lora_dropout goes to the other layers.
    droppable = {name: cfg for name, cfg in saved_modules.items() if cfg.get("class") != "Embedding"}
    dropout = _uniform(droppable, "lora_dropout") if droppable else None
    if dropout is _VARIES or dropout is None or dropout == default:
        return []
    return [f"lora_dropout={dropout!r}"]


@torch.no_grad()
def apply_copies(copies) -> None:
    """Copy in place; a merged layer is unmerged, loaded and re-merged (as load-unmerged-then-merge).
    A conv layer whose planned adapter has another shape switches to loralib's layout first."""
    initial = {}  # PiSSA/OLoRA's A₀, B₀: the layer moves its residual base with them
    for key, layer, _, tensor in copies:
        if key.rpartition(".")[2] in INITIAL_NAMES and layer is not None:
            initial.setdefault(id(layer), (layer, {}))[1][key.rpartition(".")[2][-1]] = tensor
    for layer, factors in initial.values():
        layer._checked_initial_adapter(factors.get("A"), factors.get("B"))  # refused before any change
    with unmerged(*(layer for _, layer, _, _ in copies if layer is not None)):
        switching = {id(layer): layer for _, layer, param, tensor in copies if param.shape != tensor.shape}
        for layer in switching.values():
            layer._use_loralib_layout()
        for key, layer, param, tensor in copies:
            if id(layer) not in initial or key.rpartition(".")[2] not in INITIAL_NAMES:
                write_shard(param, tensor)  # casts to the parameter's dtype, keeps its device and identity;
                # a sharded parameter takes this rank's slice of the whole tensor
        for layer, factors in initial.values():
            layer.set_initial_adapter(factors.get("A"), factors.get("B"))


def load_lora(model: nn.Module, path, strict: bool = True, adapter: Optional[str] = None) -> LoadResult:
    """Load adapter tensors into ``model`` after validating everything.

    Reads a :func:`save_lora` safetensors file, any safetensors file keyed like
    ``model.state_dict()``, or a loralib ``torch.save(lora_state_dict(model))``
    file (via ``torch.load(weights_only=True)`` only: nothing is unpickled).
    Keys that all carry a ``torch.compile`` or DDP wrapper's prefix
    (``_orig_mod.``, ``module.``) load too, where the bare names match the model.

    Checked before anything is touched: the key sets (missing and unexpected
    keys by name), shapes (name, expected, got), floating dtypes, the header's
    per-module r / alpha / scaling mode / splits against the model's layers,
    and the header checksum. Values are copied into the existing Parameters
    (same objects, device and dtype, so optimizer state stays attached); a
    tensor stored in another floating dtype is cast to the parameter's dtype.
    A merged layer is unmerged, loaded and merged again.

    On a model sharded by ``fully_shard``, call it on every rank: each rank reads the file and keeps its
    own slice of every tensor. The ranks must read the same tensors (compared by checksum); an error on
    one rank (a missing file, a mismatch) is raised on every rank, and nothing is loaded anywhere.

    Args:
        model: the module to load into.
        path: the checkpoint file.
        strict: raise on any mismatch (the model is then bitwise unchanged);
            with ``False``, load what matches, warn, and report the rest.
        adapter: None loads every adapter the model has (a file saved without ``adapter=`` restores
            the named ones too); a name loads a single-adapter file (``<layer>.lora_A`` keys, e.g. one
            saved with ``save_lora(..., adapter=...)``) into that adapter of the layers that have it,
            checking its settings against that adapter's.

    Returns:
        :class:`LoadResult` with ``missing_keys``, ``unexpected_keys``,
        ``mismatched_keys`` and the user ``metadata``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError (a ValueError): unreadable/corrupted/unsafe file, or a mismatch with ``strict=True``.
        KeyError: no layer has an adapter ``adapter`` (nothing is read).
    """
    group = shard_group(unwrap_model(model))

    def plan():
        if adapter is not None:
            check_adapter(model, adapter, "load_lora")
        source = os.fspath(path)
        tensors, meta = read_native(source)
        tensors, meta, _ = canonical_payload(model, tensors, meta)
        return plan_load(model, tensors, meta, strict, f"LoRA checkpoint {source!r}", adapter=adapter), \
            (None if group is None else tensor_checksum(tensors))

    same = dict(strict=strict, adapter=adapter)
    (copies, result), checksum = on_every_rank(group, "load_lora", plan, same=same)
    on_every_rank(group, "load_lora", lambda: None, same={"file contents (SHA-256 of the tensors)": checksum})
    apply_copies(copies)
    return result
