"""PEFT adapter interop: ``export_peft`` / ``import_peft``.

The PEFT (and vLLM) LoRA format is a folder with ``adapter_config.json`` and
``adapter_model.safetensors``; tensor keys are
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``
(``lora_embedding_A`` / ``lora_embedding_B`` for embeddings).

A :class:`~lora_layers.MergedLinear` with ``n`` enabled splits of rank ``r``
is written as ONE Linear adapter of rank ``r·n``: ``A`` stacked ``(r·n, in)``,
``B`` block-diagonal ``(out, r·n)`` with zeros elsewhere (disabled splits get
zero rows), and ``lora_alpha`` rescaled so the scaling is unchanged (``α·n``,
or ``α·√n`` with rsLoRA). Nothing here imports peft: the files are written and
read directly.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..model.unwrap import strip_prefix, unwrap_model, wrapper_prefix
from .fileio import (CheckpointError, atomic_folder, atomic_write, dir_opener, read_folder, safetensors_bytes,
                     tensor_checksum, to_storable)
from ..core.spec import lora_scaling, rank_divisor
from ..layers.adapters import DEFAULT_ADAPTER, AdapterView, named_adapters
from ..layers.base import LoRALayer
from ..layers.conv import Conv1d, Conv2d, Conv3d
from ..layers.embedding import Embedding
from ..layers.linear import Linear, is_hf_conv1d
from ..layers.merge_state import unmerged
from ..layers.merged import MergedLinear
from ..layers.registry import lora_class_for
from ..variants.dora import dora_weight_norm, row_sq_norm
from ..variants.pissa import INITIAL_NAMES, delta_factors
from ..core.segments import Segments
from ..core.sharded import gathered, gathered_parameters, is_writer, on_every_rank, shard_group, write_shard
from ..model.params import check_adapter, lora_modules
from ..model.swap import swap_modules

__all__ = ["export_peft", "import_peft", "PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "PEFT_KEY_PREFIX"]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_BIN_NAME = "adapter_model.bin"
PEFT_KEY_PREFIX = "base_model.model."
_PEFT_FILES = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PEFT_BIN_NAME)  # what a re-export replaces
# PEFT 0.21's TaskType values; the string, not the enum, so that peft is not imported.
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_LINEAR_KEYS = ("lora_A.weight", "lora_B.weight")
_MAGNITUDE_KEY = "lora_magnitude_vector"  # DoRA's (out,) magnitude
_EMBEDDING_KEYS = ("lora_embedding_A", "lora_embedding_B")
# PEFT's save_embedding_layers writes the whole base weight of targeted embeddings under this suffix.
_SAVED_BASE_KEY = "base_layer.weight"
_CONVS = (Conv1d, Conv2d, Conv3d)
# How import_peft treats each field of PEFT 0.21's LoraConfig (and PeftConfig). An allow-list: a
# field in none of these groups is unknown (a later PEFT feature) and refused unless unset.
# (a) Implemented: validated and honoured by _check_config.
_IMPLEMENTED = frozenset({"peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
                          "fan_in_fan_out", "lora_dropout", "bias", "init_lora_weights", "use_dora"})
# (b) Harmless for loading: bookkeeping; which modules to wrap (the saved tensors name them);
# settings read only by an initialisation or feature whose own switch is checked here.
_HARMLESS = frozenset({"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                       "inference_mode", "target_modules", "exclude_modules", "layers_to_transform",
                       "layers_pattern", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
                       "corda_config", "lora_ga_config", "runtime_config"})
# (c) They change what the adapter computes or how it trains: refused unless unset (None, false, empty).
_REFUSED = {
    "lora_bias": "a trained bias on lora_B",
    "modules_to_save": "full trained copies of other modules",
    "target_parameters": "LoRA on raw parameters rather than modules",
    "trainable_token_indices": "trained rows of the embedding",
    "layer_replication": "replicated decoder layers",
    "alora_invocation_tokens": "activated LoRA (the adapter acts only after the invocation tokens)",
    "use_qalora": "QALoRA's pooled adapter input",
    "megatron_config": "Megatron tensor-parallel layers",
    "velora_config": "VeLoRA's approximate backward",
    "monteclora_config": "Monte Carlo sampled adapters",
    "use_bdlora": "block-diagonal A/B layouts",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA's truncated base weight and singular-value diagonal",
    "ensure_weight_tying": "adapters tied between tied layers",
}
# init_lora_weights values that only choose A and B's starting values (the saved tensors replace them).
_HARMLESS_INITS = ("gaussian", "eva", "orthogonal")

def _number(x: float):
    """JSON-friendly alpha: an int when it is integral (PEFT types it as int)."""
    return int(x) if float(x).is_integer() else float(x)


# ----------------------------------------------------------------------------- export

def _conv_representable(layer) -> Optional[str]:
    """Why PEFT's conv LoRA (A: conv with the base's kernel/stride/padding, B: 1x1 conv) can't hold it."""
    if layer.groups != 1:
        return f"groups={layer.groups} (PEFT applies groups to lora_B, lora_layers to the whole ΔW)"
    if any(d != 1 for d in layer.dilation):
        return f"dilation={layer.dilation} (PEFT's lora_A conv ignores dilation)"
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} (PEFT's lora_A conv pads with zeros)"
    return None


def _export_residual_init(name: str, layer: Linear) -> Tuple[Dict[str, Tensor], int, float]:
    """A PiSSA/OLoRA layer (whose base is the residual ``W − s·B₀A₀``) as a plain LoRA for the *original*
    base: ``ΔW = s(B A − B₀ A₀)``, rank ``2r`` per adapter (block-diagonal for a MergedLinear), alpha
    chosen so that PEFT's scaling (``alpha/rank``, or ``alpha/√rank`` with rsLoRA) is ``s``."""
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    A0, B0 = (getattr(layer, local).detach() for local in INITIAL_NAMES)
    segments = layer.segments or Segments.full(layer.out_features)
    parts = [delta_factors(A[b.a0:b.a1], B[b.b0:b.b1], A0[b.a0:b.a1], B0[b.b0:b.b1]) for b in segments.blocks(layer.r)]
    rank = 2 * layer.r * segments.count
    key = PEFT_KEY_PREFIX + name
    tensors = {f"{key}.lora_A.weight": torch.cat([a for a, _ in parts]),
               f"{key}.lora_B.weight": segments.to_block_diagonal(torch.cat([b for _, b in parts]))}
    return tensors, rank, layer.scaling * rank_divisor(rank, layer.use_rslora)


def _export_module(name: str, layer: LoRALayer, v: AdapterView) -> Tuple[Dict[str, Tensor], int, float]:
    """PEFT tensors, rank and alpha for adapter ``v`` of one layer (scaling preserved)."""
    if v.name == DEFAULT_ADAPTER and getattr(layer, INITIAL_NAMES[0], None) is not None:
        return _export_residual_init(name, layer)  # add_adapter refuses named adapters on such layers
    A, B = v.lora_A.detach(), v.lora_B.detach()
    key = PEFT_KEY_PREFIX + name
    extra = {} if not v.use_dora else {f"{key}.{_MAGNITUDE_KEY}": _full_magnitude(name, layer, v)}
    if isinstance(layer, Embedding):
        if layer.max_norm is not None:
            raise NotImplementedError(f"cannot export {name!r}: PEFT renormalises the LoRA lookup with "
                                      f"max_norm={layer.max_norm}, lora_layers does not")
        return {f"{key}.lora_embedding_A": A, f"{key}.lora_embedding_B": B}, v.r, v.lora_alpha
    if isinstance(layer, MergedLinear):
        n, r = layer.segments.count, v.r
        alpha = v.lora_alpha * rank_divisor(n, v.use_rslora)
        full_B = layer.segments.to_block_diagonal(B)
        return {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": full_B, **extra}, r * n, alpha
    if isinstance(layer, Linear):
        return {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B, **extra}, v.r, v.lora_alpha
    if isinstance(layer, _CONVS):
        why = _conv_representable(layer)
        if why:
            raise NotImplementedError(f"cannot export {name!r} ({type(layer).__name__}) to PEFT exactly: {why}")
        k, r, alpha = tuple(layer.kernel_size), v.r, v.lora_alpha
        if layer.layout == "loralib":
            # Row o of ΔW = (B A).view(W.shape) is rows o·k..o·k+k-1 of B A side by side: B viewed as
            # (out, k·r·k) times k copies of A on a block diagonal, a rank r·k² adapter with the same ΔW.
            n = k[0]
            A, B, r = torch.block_diag(*[A] * n), B.reshape(layer.out_channels, -1), r * n * n
            alpha = alpha * rank_divisor(n * n, v.use_rslora)
        A4 = A.reshape(r, layer.in_channels, *k)
        B4 = B.reshape(layer.out_channels, r, *([1] * len(k)))
        return {f"{key}.lora_A.weight": A4, f"{key}.lora_B.weight": B4}, r, alpha
    raise NotImplementedError(f"cannot export {name!r}: no PEFT layout for {type(layer).__name__}")


def _full_magnitude(name: str, layer: Linear, v: AdapterView) -> Tensor:
    """DoRA's magnitude over every output row, as PEFT holds it. A MergedLinear's rows
    without an adapter get ``‖W_row‖``, which makes PEFT's factor ``m / ‖W_row‖`` one.

    Raises ValueError for a row whose norm is 0 (a pruned neuron), which PEFT turns into NaN."""
    m = v.lora_magnitude.detach()
    W = layer.unmerged_weight() if layer.merged else layer._dense_weight()
    norm = dora_weight_norm(W, v.lora_A, v.lora_B, v.scaling, layer.segments,
                            fan_in_fan_out=layer.fan_in_fan_out)
    if layer.segments is not None:
        row_norms = row_sq_norm(W, layer.fan_in_fan_out).sqrt()
        m = layer.segments.to_full_rows(m, row_norms.to(m.dtype))
        norm = layer.segments.to_full_rows(norm, row_norms.to(norm.dtype))
    zero = (norm == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"export_peft: cannot export {name!r}: rows {zero} have ‖W + s·BA‖ = 0 (pruned neurons). "
                         f"lora_layers keeps their base output (factor 1), PEFT's DoRA divides by that norm and "
                         f"gives NaN; merge_and_unload gives plain weights instead")
    return m


def _peft_pattern_matches(key: str, name: str) -> bool:
    r"""PEFT 0.21's rank/alpha_pattern test (``peft.utils.other.get_pattern_key``): ``key`` is a regex
    that must match a dot-separated suffix of the module name, i.e. ``re.match(r"(.*\.)?(key)$", name)``."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _pattern_key(name: str, all_names: List[str]) -> str:
    r"""A rank/alpha_pattern key that PEFT matches to ``name`` and to no other module.

    The full name itself when, read as PEFT's regex, it selects only ``name`` (e.g.
    ``model.layers.0.mlp.down_proj``); otherwise ``^`` + the escaped name. A bare key is a
    suffix match ("0" also hits "1.0"); the ``^`` can only match at the start of the name, so
    ``(.*\.)?(^0)$`` matches exactly "0".
    """
    try:
        if _peft_pattern_matches(name, name) and not any(
                other != name and _peft_pattern_matches(name, other) for other in all_names):
            return name
    except re.error:
        pass
    return "^" + re.escape(name)


def _peft_target_matches(target: str, name: str) -> bool:
    """PEFT's rule for a list of ``target_modules``: the exact name, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def _target_modules(adapted: List[str], all_names: List[str]):
    """``target_modules`` under which PEFT wraps exactly ``adapted`` among ``all_names``.

    A list of leaf names where a leaf name belongs to adapted modules only, else full names;
    if even a full name is a suffix of some other module's name (adapted "0", plain "2.0"), no list
    can do it and a regex string is returned, which PEFT fullmatches against each module name.
    """
    adapted_set = set(adapted)
    targets = set()
    for name in adapted:
        for candidate in (name.rsplit(".", 1)[-1], name):
            if all(m in adapted_set for m in all_names if _peft_target_matches(candidate, m)):
                targets.add(candidate)
                break
        else:
            return "(?:" + "|".join(re.escape(n) for n in sorted(adapted)) + ")"
    return sorted(targets)


def _base_module_names(model: nn.Module) -> List[str]:
    """The module names PEFT sees on the base model: all but the root and LoRA layers' own children."""
    lora_names = {n for n, _ in lora_modules(model)}
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if name and not any(".".join(parts[:i]) in lora_names for i in range(len(parts))):
            names.append(name)
    return names


def _infer_task_type(model: nn.Module) -> Optional[str]:
    """``"CAUSAL_LM"`` for a transformers causal LM, else None (PEFT's plain ``PeftModel``).

    PEFT's CAUSAL_LM model calls the base's ``prepare_inputs_for_generation``, which only a
    model that generates has: one with transformers' ``GenerationMixin`` (found by name, so
    transformers is not imported) that is not an encoder-decoder (T5 is SEQ_2_SEQ_LM).
    """
    generates = any(cls.__name__ == "GenerationMixin" for cls in type(model).__mro__)
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True
    return "CAUSAL_LM" if generates and not encoder_decoder else None


def _task_type(task_type, model: nn.Module) -> Optional[str]:
    """The ``task_type`` to write: inferred for ``"auto"``, else validated (a PEFT TaskType enum becomes its string)."""
    if isinstance(task_type, str) and task_type == "auto":
        return _infer_task_type(model)
    if task_type is None:
        return None
    if not isinstance(task_type, str) or task_type not in _TASK_TYPES:
        raise ValueError(f"task_type must be 'auto', None or one of PEFT's task types {list(_TASK_TYPES)}, "
                         f"got {task_type!r}")
    return _TASK_TYPES[_TASK_TYPES.index(task_type)]


def export_peft(model: nn.Module, out_dir, base_model_name_or_path: Optional[str] = None,
                task_type: Optional[str] = "auto", server: Optional[str] = None, adapter: str = DEFAULT_ADAPTER):
    """Write ``model``'s adapters as a PEFT LoRA adapter folder (loadable by PEFT and vLLM).

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` together:
    the folder is built beside ``out_dir`` and swapped in whole
    (:func:`~lora_layers.fileio.atomic_folder`), so an interrupted re-export
    leaves the previous export, never new weights with an old config. Other
    files already in ``out_dir`` (a tokenizer, a README) are kept; a stale
    ``adapter_model.bin`` is removed. The most common rank and alpha become ``r``/``lora_alpha``;
    modules that differ go to ``rank_pattern``/``alpha_pattern``, each under a
    key that PEFT matches to that module only (the full name, or ``^`` + the
    escaped full name where the bare name is also a suffix of another module's).
    ``target_modules`` makes PEFT wrap exactly the adapted modules: leaf names,
    or full names where a leaf name also belongs to a module without an
    adapter, or, where no list can (adapted ``0``, plain ``2.0``), a regex of
    the full names. Each MergedLinear becomes one rank-``r·n`` Linear adapter
    with a block-diagonal B (see module docs).

    Args:
        model: a module containing LoRA layers (merged or not).
        out_dir: the adapter folder; created if its parent exists, replaced whole if it exists.
        base_model_name_or_path: recorded in the config (default: ``model.name_or_path`` if any).
        task_type: PEFT's task type. ``"auto"`` (the default): ``"CAUSAL_LM"`` for a
            transformers causal LM (a ``GenerationMixin`` model that is not an
            encoder-decoder), else ``None``, which PEFT loads as a plain ``PeftModel``
            (``"CAUSAL_LM"`` on another model fails in PEFT for want of
            ``prepare_inputs_for_generation``). Or one of PEFT's ``TaskType`` values,
            or ``None``, to override.
        adapter: the adapter to write (:func:`~lora_layers.add_adapter`): ``"default"`` (each layer's own,
            the file as before named adapters existed), or a named one, written from the layers that
            have it exactly as a model holding it alone would write it (the same keys, which PEFT
            reads for any adapter name: ``PeftModel.load_adapter(folder, adapter_name=...)``).
        server: ``None`` (the default) writes the export as before and returns None. ``"vllm"`` or
            ``"peft"``: the export is checked against what that server loads
            (:func:`~lora_layers.check_export`'s rules) before anything is written, and refused with
            the reasons if it would not load; for vLLM, ``use_rslora`` is first folded into
            ``lora_alpha`` (each module's alpha times √rank, which vLLM divides by the rank: the same
            scale, and read alike by vLLM releases that ignore ``use_rslora``), and the rank/alpha
            patterns are recomputed from the folded values (an entry equal to the top-level value is
            dropped). PEFT loads the folded export with the same outputs.

    Returns:
        None without ``server``; with one, the :class:`~lora_layers.ExportCheck` of the written
        folder: ``min_max_lora_rank`` (vLLM's smallest ``--max-lora-rank`` for it) and ``changes``,
        what was folded (empty when nothing was).

    On a model sharded by ``fully_shard``, call it on every rank with the same arguments: each layer is
    gathered in turn and rank 0 writes the folder one process writes, byte for byte; an error on one
    rank is raised on every rank.

    Raises:
        ValueError: the model has no adapters, ``task_type`` is not ``"auto"``,
            ``None`` or a PEFT task type, ``server`` is not None, ``"vllm"`` or ``"peft"``, or
            the server would refuse the export (DoRA for vLLM, a rank above 512; each reason
            named). Nothing is written.
        NotImplementedError: a layer PEFT cannot represent exactly (named).
        FileNotFoundError / PermissionError: bad destination.
        KeyError: no layer has an adapter ``adapter``.
    """
    from .serving import check_server

    check_server(server, allow_none=True)
    model = unwrap_model(model)
    group = shard_group(model)
    same = dict(out_dir=out_dir, base_model_name_or_path=base_model_name_or_path, task_type=task_type, server=server,
                adapter=adapter)
    layers, dora = on_every_rank(group, "export_peft", lambda: _exported_layers(model, task_type, adapter), same=same)
    tensors, per_module, rslora = _exported(layers)  # sharded: each layer gathered in turn, on every rank
    settings = dict(use_dora=dora, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    config = _peft_config(model, per_module, rslora, **settings)
    check = None
    if server is not None:
        config, check = on_every_rank(group, "export_peft", lambda: _served_config(
            model, config, per_module, rslora, settings, tensors, os.fspath(out_dir), server))
    writer = is_writer(group)
    data = safetensors_bytes(to_storable(tensors), {"format": "pt"}) if writer else b""
    text = json.dumps(config, indent=2, sort_keys=True).encode()
    on_every_rank(group, "export_peft", lambda: _write_export(out_dir, data, text) if writer else None)
    return check


def _served_config(model: nn.Module, config: Dict[str, Any], per_module: Dict[str, tuple], rslora: bool,
                   settings: Dict[str, Any], tensors: Dict[str, Tensor], out_dir: str, server: str):
    """``(config, ExportCheck)``: ``config`` with what vLLM reads differently folded in, checked against
    ``server``'s rules; ValueError naming every problem when the server would refuse it."""
    from .serving import check_adapter

    changes = []
    if server == "vllm" and rslora:
        # vLLM scales by lora_alpha / r, so alpha' = scale·r (rsLoRA's alpha·√r) keeps each module's scale in
        # every vLLM release; from the layer's own scale, so a power-of-two rank gives it back exactly.
        folded = {n: (r, v.scaling * r, False, layer, v) for n, (r, _, _, layer, v) in per_module.items()}
        new = _peft_config(model, folded, False, **settings)
        changes = ["use_rslora folded into lora_alpha (alpha·√r, which vLLM divides by r: the same scale): "
                   + "; ".join(f"{key} {config[key]!r} -> {new[key]!r}" for key in sorted(config)
                               if config[key] != new[key])]
        config = new
    check = check_adapter(config, {k: tuple(t.shape) for k, t in tensors.items()}, out_dir, server, tuple(changes))
    if not check.ok:
        raise ValueError(f"export_peft: {server} would not load this export, nothing was written:\n  - "
                         + "\n  - ".join(check.problems))
    return config, check


def _exported_layers(model: nn.Module, task_type, adapter: str) -> Tuple[List[Tuple[str, LoRALayer, str]], bool]:
    """``([(name, LoRA layer, adapter)] for the layers that have ``adapter``, whether they are DoRA)``, after
    checking ``task_type``; ValueError / KeyError / NotImplementedError for a model export_peft cannot write."""
    layers = [(n, m) for n, m in lora_modules(model) if m.has_adapter]
    if not layers:
        raise ValueError("export_peft: the model has no LoRA adapters (no LoRA layer with r > 0)")
    if not isinstance(adapter, str):
        raise TypeError(f"export_peft: adapter must be an adapter name (str), got {type(adapter).__name__} "
                        f"{adapter!r}")
    check_adapter(model, adapter, "export_peft")
    layers = [(n, m, adapter) for n, m in layers if adapter in m.adapter_names]
    dora = {bool(m.adapter(a).use_dora) for _, m, a in layers}
    if len(dora) > 1:
        raise NotImplementedError("export_peft: the model mixes DoRA and plain LoRA layers; a PEFT adapter is "
                                  "either all DoRA or all LoRA (use_dora is one flag for the whole adapter)")
    _task_type(task_type, model)
    return layers, dora == {True}


def _write_export(out_dir, data: bytes, text: bytes) -> None:
    # Both files change together or not at all: new weights beside an old config (another alpha) would
    # load in PEFT and vLLM without complaint. An old adapter_model.bin would shadow nothing but mislead.
    with atomic_folder(out_dir, "a PEFT adapter", "out_dir", owned=_PEFT_FILES) as tmp:
        atomic_write(os.path.join(tmp, PEFT_WEIGHTS_NAME), lambda f: f.write(data), "PEFT adapter weights")
        atomic_write(os.path.join(tmp, PEFT_CONFIG_NAME), lambda f: f.write(text), "PEFT adapter config")


def _exported(layers: List[Tuple[str, LoRALayer, str]]) -> Tuple[Dict[str, Tensor], Dict[str, tuple], bool]:
    """``(PEFT tensors, {name: (rank, alpha, use_rslora, layer)}, use_rslora)``: the rsLoRA mode is
    the most common one, and a module in the other mode gets the alpha that keeps its scaling."""
    tensors: Dict[str, Tensor] = {}
    per_module: Dict[str, tuple] = {}  # name -> (rank, alpha, use_rslora, layer, adapter view)
    for name, layer, adapter in layers:
        holder = layer if adapter == DEFAULT_ADAPTER else named_adapters(layer)[adapter]
        # a sharded layer's whole tensors (DoRA's norm needs the whole weight)
        with gathered_parameters(layer), gathered_parameters(holder):
            v = layer.adapter(adapter)
            t, r, alpha = _export_module(name, layer, v)
        tensors.update(t)
        per_module[name] = (r, alpha, v.use_rslora, layer, v)

    rslora = Counter(v[2] for v in per_module.values()).most_common(1)[0][0]
    for name, (r, alpha, use_rs, layer, v) in per_module.items():
        if use_rs != rslora:  # express this module's scaling in the global mode
            per_module[name] = (r, v.scaling * rank_divisor(r, rslora), rslora, layer, v)
    return tensors, per_module, rslora


def _peft_config(model: nn.Module, per_module: Dict[str, tuple], rslora: bool, *, use_dora: bool,
                 base_model_name_or_path: Optional[str], task_type) -> Dict[str, Any]:
    """``adapter_config.json`` for the modules of :func:`_exported`: the most common rank and alpha,
    the others as patterns (see :func:`export_peft`)."""
    r0 = Counter(v[0] for v in per_module.values()).most_common(1)[0][0]
    a0 = Counter(v[1] for v in per_module.values()).most_common(1)[0][0]
    all_names = _base_module_names(model)
    rank_pattern = {_pattern_key(n, all_names): v[0] for n, v in per_module.items() if v[0] != r0}
    alpha_pattern = {_pattern_key(n, all_names): _number(v[1]) for n, v in per_module.items() if v[1] != a0}
    targets = _target_modules(list(per_module), all_names)

    dropouts = Counter(float(v.dropout_p) for *_, v in per_module.values())
    fan_in_fan_out = any(getattr(layer, "fan_in_fan_out", False) for *_, layer, _ in per_module.values())
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": _task_type(task_type, model),
        "r": r0,
        "lora_alpha": _number(a0),
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": rslora,
        "use_dora": use_dora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": dropouts.most_common(1)[0][0],
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path,
    }


# ----------------------------------------------------------------------------- import

def _is_unset(value) -> bool:
    """None, false or empty: how PEFT reads a feature switched off."""
    return value is None or value is False or (isinstance(value, (str, list, tuple, dict)) and not value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


_INT_TEXT = "a positive integer (PEFT types it as int; 2.0 is refused too)"


def _is_positive_int(value) -> bool:
    return _is_int(value) and value > 0


def _init_problem(value) -> Optional[str]:
    """Why an ``init_lora_weights`` value cannot be imported, or None when it only sets A/B's start."""
    if value is True or value is False or (isinstance(value, str) and value in _HARMLESS_INITS):
        return None
    name = value.lower() if isinstance(value, str) else ""
    if name.startswith(("pissa", "olora", "corda")):
        # Refused rather than reproduced: PEFT's result depends on more than the folder holds.
        why = ("the folder holds A and B trained on the residual base weight W - s·B₀A₀, not B₀A₀; PEFT "
               "recomputes B₀A₀ from whatever base it loads on (an SVD or QR of it, random for "
               "pissa_niter_N), so the served weight depends on that base and, for pissa_niter_N, on the "
               "random state. Convert it to a plain LoRA with PEFT's save_pretrained(..., "
               "path_initial_model_for_weight_conversion=...), or export a lora_layers PiSSA/OLoRA model "
               "with export_peft, which writes that plain LoRA itself")
    elif name == "lora_ga":
        why = ("LoRA-GA trained it on a base weight minus the initial adapter; convert it to a plain LoRA "
               "with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)")
    elif name == "loftq":
        why = "LoftQ trained it on a base weight that LoftQ quantized, not on this base weight"
    elif name == "mica":
        why = "MiCA keeps lora_B frozen in training, which lora_layers does not"
    else:
        why = "unknown initialisation (lora_layers accepts true, false, 'gaussian', 'eva' and 'orthogonal')"
    return f"init_lora_weights={value!r} is not supported: {why}"


def _check_config(config: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """The settings import_peft uses (PEFT's default for an absent field) and every problem found."""
    problems = []

    def get(key, default, ok, expected):
        value = config.get(key, default)
        if not ok(value):
            problems.append(f"{key}={value!r} is invalid: expected {expected}")
        return value

    settings = {
        "r": get("r", 8, _is_positive_int, _INT_TEXT),
        "lora_alpha": get("lora_alpha", 8, _is_finite_number, "a finite number"),
        "use_rslora": get("use_rslora", False, lambda v: isinstance(v, bool), "true or false"),
        "fan_in_fan_out": get("fan_in_fan_out", False, lambda v: isinstance(v, bool), "true or false"),
        "use_dora": get("use_dora", False, lambda v: isinstance(v, bool), "true or false"),
        "lora_dropout": get("lora_dropout", 0.0, lambda v: _is_finite_number(v) and 0 <= v < 1,
                            "a number in [0, 1)"),
    }
    for key, ok, expected in (("rank_pattern", _is_positive_int, _INT_TEXT),
                              ("alpha_pattern", _is_finite_number, "a finite number")):
        settings[key] = _check_patterns(key, config.get(key) or {}, ok, expected, problems)
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} is not supported, expected 'none' "
                        f"(trained biases are not part of a LoRA adapter here)")
    init = _init_problem(config.get("init_lora_weights", True))
    if init:
        problems.append(init)
    problems.extend(_option_problems(config))
    return settings, problems


def _check_patterns(key: str, patterns, ok, expected: str, problems: List[str]) -> Dict[str, Any]:
    """A rank/alpha_pattern as import_peft uses it (``{}`` if it is not a mapping); its problems go to ``problems``."""
    if not isinstance(patterns, dict):
        problems.append(f"{key}={patterns!r} is invalid: expected an object mapping module-name patterns "
                        f"to values")
        return {}
    for pattern, value in patterns.items():
        try:
            _peft_pattern_matches(pattern, "")
        except re.error as exc:
            problems.append(f"{key} key {pattern!r} is not a valid regular expression (PEFT matches "
                            f"keys as regexes): {exc}")
        if not ok(value):
            problems.append(f"{key}[{pattern!r}]={value!r} is invalid: expected {expected}")
    return patterns


def _option_problems(config: Dict[str, Any]) -> List[str]:
    """The options that are set and that lora_layers does not implement (refused, or unknown)."""
    problems = []
    for key, value in config.items():
        if key in _REFUSED and not _is_unset(value):
            problems.append(f"{key}={value!r} is not supported: lora_layers does not implement {_REFUSED[key]}")
        elif key not in _REFUSED and key not in _IMPLEMENTED and key not in _HARMLESS and not _is_unset(value):
            problems.append(f"{key}={value!r} is not supported: an unknown option (not a field of PEFT "
                            f"0.21's LoraConfig); unknown options are refused unless null, false or empty")
    return problems


def _is_file_in(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd).st_mode)
    except FileNotFoundError:
        return False


def _read_config(adapter_dir: str, dir_fd: int) -> Dict[str, Any]:
    """The validated settings of ``adapter_config.json`` (see :func:`_check_config`)."""
    path = os.path.join(adapter_dir, PEFT_CONFIG_NAME)
    config = config_json(adapter_dir, dir_fd)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path!r}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    settings, problems = _check_config(config)
    if problems:
        raise CheckpointError(f"cannot import PEFT adapter config {path!r} (the model was not changed):\n  - "
                              + "\n  - ".join(problems))
    return settings


def config_json(adapter_dir: str, dir_fd: int) -> Dict[str, Any]:
    """``adapter_config.json`` of the folder ``dir_fd``, a JSON object, unchecked otherwise."""
    path = os.path.join(adapter_dir, PEFT_CONFIG_NAME)
    if not _is_file_in(dir_fd, PEFT_CONFIG_NAME):
        raise FileNotFoundError(f"{adapter_dir!r} is not a PEFT adapter folder: {PEFT_CONFIG_NAME} is missing")
    try:
        with open(PEFT_CONFIG_NAME, encoding="utf-8", opener=dir_opener(dir_fd)) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path!r} must hold a JSON object, got {type(config).__name__}")
    return config


def _read_weights(adapter_dir: str, dir_fd: int) -> Dict[str, Tensor]:
    from .checkpoint import read_checkpoint

    for name in (PEFT_WEIGHTS_NAME, PEFT_BIN_NAME):
        if _is_file_in(dir_fd, name):
            return read_checkpoint(os.path.join(adapter_dir, name), dir_fd=dir_fd)[0]
    raise FileNotFoundError(f"{adapter_dir!r} has neither {PEFT_WEIGHTS_NAME} nor {PEFT_BIN_NAME}")


def _peft_pattern_value(patterns: Dict[str, Any], name: str, default):
    """``name``'s value in a rank/alpha_pattern, resolved as PEFT 0.21 resolves it: the first key in
    order that matches (:func:`_peft_pattern_matches`), else an entry under the exact name, else ``default``."""
    for key, value in patterns.items():
        if _peft_pattern_matches(key, name):
            return value
    return patterns.get(name, default)


def _group_keys(weights: Dict[str, Tensor]) -> Tuple[Dict[str, Dict[str, Tensor]], List[str], List[str]]:
    groups: Dict[str, Dict[str, Tensor]] = {}
    unprefixed, unknown = [], []
    for key, t in weights.items():
        if not key.startswith(PEFT_KEY_PREFIX):
            unprefixed.append(key)
            continue
        rest = key[len(PEFT_KEY_PREFIX):]
        for suffix, slot in zip(_LINEAR_KEYS + _EMBEDDING_KEYS + (_SAVED_BASE_KEY, _MAGNITUDE_KEY),
                                ("A", "B", "EA", "EB", "base", "M")):
            if rest.endswith("." + suffix):
                groups.setdefault(rest[:-len(suffix) - 1], {})[slot] = t
                break
        else:
            unknown.append(key)
    return groups, sorted(unprefixed), sorted(unknown)


def _strip_wrapper_prefix(model: nn.Module, groups: Dict[str, Dict[str, Tensor]], config: Dict[str, Any]):
    """``(groups, config)`` in ``model``'s names: exports from a compiled or DDP model by older versions name
    every module under the wrapper's prefix, in the keys and in rank/alpha_pattern keys (full names, plain
    or ``^`` + escaped, which stay exact full-name matches)."""
    prefix = wrapper_prefix(groups, [n for n, _ in model.named_modules()])
    if not prefix:
        return groups, config
    escaped = "^" + re.escape(prefix)

    def pattern_key(key: str) -> str:
        if key.startswith(prefix):
            return "^" + re.escape(key[len(prefix):])
        return "^" + key[len(escaped):] if key.startswith(escaped) else key

    patterns = {p: {pattern_key(k): v for k, v in config[p].items()} for p in ("rank_pattern", "alpha_pattern")}
    return {strip_prefix(k, prefix): v for k, v in groups.items()}, {**config, **patterns}


@dataclass(frozen=True)
class _Settings:
    """One module's adapter settings: the config's, with its rank/alpha_pattern entry resolved."""

    r: int
    alpha: float
    rslora: bool
    dropout: float
    fan_in_fan_out: bool
    use_dora: bool

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)


def _module_settings(config: Dict[str, Any], name: str) -> _Settings:
    return _Settings(r=_peft_pattern_value(config["rank_pattern"], name, config["r"]),
                     alpha=_peft_pattern_value(config["alpha_pattern"], name, config["lora_alpha"]),
                     rslora=config["use_rslora"], dropout=float(config["lora_dropout"]),
                     fan_in_fan_out=config["fan_in_fan_out"], use_dora=bool(config["use_dora"]))


def _plan_module(name: str, module: nn.Module, t: Dict[str, Tensor], s: _Settings):
    """Validate one module; return ``(new_layer_or_None, target_layer, {parameter name: tensor})``
    or raise ValueError."""
    A, B, M, embedding = _adapter_tensors(module, t, s)
    if isinstance(module, MergedLinear):
        return None, module, _merged_linear_tensors(module, A, B, M, s, embedding)
    if _holds_as_loralib_conv(module, s, M, embedding):
        return None, module, _loralib_conv_tensors(module, A, B)
    layer = _target_layer(name, module, s, embedding)
    return (layer if layer is not module else None), layer, _layer_tensors(layer, A, B, M)


def _adapter_tensors(module: nn.Module, t: Dict[str, Tensor], s: _Settings):
    """``(A, B, DoRA magnitude or None, whether the keys are an embedding's)`` of one module's
    tensors; ValueError unless they are one adapter of rank ``s.r`` that ``s.use_dora`` describes."""
    t = dict(t)
    M = t.pop("M", None)
    A, B = (t.get("EA"), t.get("EB")) if "EA" in t or "EB" in t else (t.get("A"), t.get("B"))
    if A is None or B is None or len(t) != 2:
        raise ValueError(f"needs exactly one A and one B tensor, got {sorted(t)}")
    embedding = "EA" in t
    if s.use_dora and M is None:
        raise ValueError(f"the config says use_dora=true but there is no {_MAGNITUDE_KEY}")
    if M is not None and not s.use_dora:
        raise ValueError(f"a {_MAGNITUDE_KEY} (DoRA) but the config says use_dora=false")
    if M is not None and (embedding or lora_class_for(module) in _CONVS or isinstance(module, (Embedding,) + _CONVS)):
        raise ValueError("DoRA on embeddings and convolutions is not implemented by lora_layers")
    if A.dim() < 2 or A.shape[0] != s.r:
        raise ValueError(f"lora_A has shape {tuple(A.shape)}, expected rank r={s.r} rows (config/rank_pattern)")
    return A, B, M, embedding


def _merged_linear_tensors(module: MergedLinear, A: Tensor, B: Tensor, M: Optional[Tensor], s: _Settings,
                           embedding: bool) -> Dict[str, Tensor]:
    """A MergedLinear's own tensors from the one rank-``r·n`` adapter :func:`export_peft` writes for it."""
    if embedding:
        raise ValueError("embedding keys for a MergedLinear")
    segments, lr = module.segments, module.r
    n = 0 if segments is None else segments.count
    if not module.has_adapter or s.r != lr * n or tuple(A.shape) != tuple(module.lora_A.shape):
        raise ValueError(f"PEFT rank {s.r} with A {tuple(A.shape)}, B {tuple(B.shape)} does not fit this "
                         f"MergedLinear (r={lr}, {n} enabled splits, lora_A "
                         f"{tuple(module.lora_A.shape) if module.has_adapter else None})")
    if not math.isclose(s.scaling, module.scaling, rel_tol=1e-6):
        raise ValueError(f"PEFT scaling {s.scaling} differs from the layer's {module.scaling}")
    if module.use_dora != s.use_dora:
        raise ValueError(f"the layer has use_dora={module.use_dora}, the adapter use_dora={s.use_dora}")
    try:
        stacked = segments.from_block_diagonal(B, lr)
        tensors = {"lora_A": A, "lora_B": stacked}
        if M is not None:
            tensors["lora_magnitude"] = _adapted_magnitude(module, M)
    except ValueError as exc:
        raise ValueError(f"{exc} (splits {module.split_sizes}, enable_lora {module.enable_lora})") from None
    return tensors


def _holds_as_loralib_conv(module: nn.Module, s: _Settings, M: Optional[Tensor], embedding: bool) -> bool:
    """Whether ``module`` is a loralib-layout conv layer that the rank-``r·k²`` adapter of
    :func:`export_peft` fits (then :func:`_loralib_conv_tensors` takes it apart)."""
    return (isinstance(module, _CONVS) and module.layout == "loralib" and module.has_adapter
            and not embedding and M is None and module.kernel_size[0] > 1
            and s.r == module.r * module.kernel_size[0] ** 2 and math.isclose(s.scaling, module.scaling, rel_tol=1e-6))


def _target_layer(name: str, module: nn.Module, s: _Settings, embedding: bool) -> LoRALayer:
    """``module`` itself if it is a LoRA layer with these settings, else a new layer wrapping it
    (sharing its weights); ValueError if neither can hold the adapter."""
    kind = lora_class_for(module, subclasses=True)  # PEFT wraps subclasses of nn.Linear/nn.Embedding too
    if isinstance(module, LoRALayer):
        if not module.has_adapter or module.r != s.r or not math.isclose(s.scaling, module.scaling, rel_tol=1e-6) \
                or module.use_dora != s.use_dora:
            raise ValueError(f"already a {type(module).__name__} with r={module.r}, scaling={module.scaling}, "
                             f"use_dora={module.use_dora}; the adapter has r={s.r}, scaling={s.scaling}, "
                             f"use_dora={s.use_dora}")
        return module
    if kind is Embedding and embedding:
        if module.max_norm is not None:
            raise ValueError(f"max_norm={module.max_norm} is applied to the LoRA lookup by PEFT, not by lora_layers")
        return Embedding.from_module(module, r=s.r, lora_alpha=s.alpha, use_rslora=s.rslora)
    if kind in _CONVS and not embedding:
        why = _conv_representable(module)
        if why:
            raise ValueError(why)
        return kind.from_module(module, r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, use_rslora=s.rslora)
    if is_hf_conv1d(module) and not embedding:
        if not s.fan_in_fan_out:
            warnings.warn(f"{name!r} is a transformers Conv1D: treating it as fan_in_fan_out=True, as PEFT does")
        return Linear.from_module(module, r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, use_rslora=s.rslora,
                                  fan_in_fan_out=True, use_dora=s.use_dora)
    if kind is Linear and not embedding:
        return Linear.from_module(module, r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, use_rslora=s.rslora,
                                  use_dora=s.use_dora)
    raise ValueError(f"cannot hold a {'embedding' if embedding else 'linear/conv'} LoRA adapter "
                     f"on a {type(module).__name__}")


def _layer_tensors(layer: LoRALayer, A: Tensor, B: Tensor, M: Optional[Tensor]) -> Dict[str, Tensor]:
    """``layer``'s parameters from PEFT's tensors; ValueError on a shape that does not fit."""
    if isinstance(layer, _CONVS):
        # PEFT stores conv adapters as conv weights (r, in/groups, *k) and (out, r, 1, ...).
        A = A.reshape(layer.lora_A.shape) if A.numel() == layer.lora_A.numel() else A
        B = B.reshape(layer.lora_B.shape) if B.numel() == layer.lora_B.numel() else B
    tensors = {"lora_A": A, "lora_B": B}
    if M is not None:
        tensors["lora_magnitude"] = M
    for label, got in tensors.items():
        want = getattr(layer, label)
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{label} shape mismatch, expected {tuple(want.shape)}, got {tuple(got.shape)}")
    return tensors


def _loralib_conv_tensors(layer, A: Tensor, B: Tensor) -> Dict[str, Tensor]:
    """A loralib-layout conv layer's ``lora_A``/``lora_B`` from the rank-``r·k²`` PEFT adapter that
    :func:`export_peft` writes for it (``k`` copies of ``lora_A`` on a block diagonal, ``lora_B`` viewed
    as ``(out, r·k²)``). Raises ValueError for an adapter of another structure, which this layer cannot hold."""
    n = layer.kernel_size[0]
    (ra, ia), (ob, rb) = layer._adapter_shapes()
    what = (f"a rank-{n * n * layer.r} adapter fits this {type(layer).__name__}(layout='loralib', r={layer.r}, "
            f"kernel {n}) only as export_peft writes it")
    if A.numel() != n * ra * n * ia or B.numel() != ob * rb:
        raise ValueError(f"{what}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} have other sizes")
    A2 = A.reshape(n * ra, n * ia)
    block = A2[:ra, :ia]
    if not torch.equal(A2, torch.block_diag(*[block] * n)):
        raise ValueError(f"{what}, with lora_A {n} copies of one ({ra}, {ia}) block on a diagonal; this one is not")
    return {"lora_A": block, "lora_B": B.reshape(ob, rb)}


def _adapted_magnitude(layer: MergedLinear, full: Tensor) -> Tensor:
    """The adapted rows of PEFT's full-row magnitude; the other rows must be ``‖W_row‖`` (factor one),
    else the adapter rescales rows this layer leaves alone."""
    adapted, other = layer.segments.from_full_rows(full)
    norms = row_sq_norm(gathered(layer._dense_weight()), layer.fan_in_fan_out).sqrt()
    if not torch.allclose(full[other].to(norms.dtype), norms[other], rtol=1e-4, atol=1e-6):
        raise ValueError(f"{_MAGNITUDE_KEY} rescales rows outside the enabled splits, which this MergedLinear "
                         f"cannot represent")
    return adapted


def _put(model: nn.Module, name: str, layer: LoRALayer) -> None:
    """Put a new LoRA layer in place of the module at ``name``, everywhere the model holds that module:
    a module shared by two parents becomes one layer that both see."""
    current = model.get_submodule(name)
    if isinstance(current, LoRALayer):
        # The adapter names one shared module twice: each name keeps the layer loaded under it.
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer)
    else:
        swap_modules(model, {id(current): layer})


def import_peft(model: nn.Module, adapter_dir, *, strict: bool = True, adapter: str = DEFAULT_ADAPTER) -> List[str]:
    """Load a PEFT LoRA adapter folder into ``model`` (the same base it was trained on).

    Plain ``nn.Linear``/``nn.Embedding``/``nn.Conv*d`` (and transformers
    ``Conv1D``) modules named by the adapter are replaced by lora_layers layers
    that share their weights; existing LoRA layers of matching rank/scaling are
    loaded in place (a :class:`MergedLinear` only when PEFT's B is exactly
    block-diagonal in its split layout; a ``layout="loralib"`` conv layer of
    rank ``r`` from the rank-``r·k²`` adapter :func:`export_peft` writes for it). ``rank_pattern``/``alpha_pattern``
    (resolved exactly as PEFT resolves them), ``use_rslora`` and
    ``fan_in_fan_out`` are honoured; other config options are accepted only
    where they cannot change the result (an allow-list; see
    docs/checkpoints.md). Adapters are cast to the base weight's dtype.
    Everything is validated before the model changes.

    Args:
        model: the base model (plain or with some LoRA layers already).
        adapter_dir: folder with ``adapter_config.json`` and
            ``adapter_model.safetensors`` (or ``adapter_model.bin``, read with
            ``torch.load(weights_only=True)``).
        strict: raise on any module that cannot be loaded exactly; with
            ``False``, skip such modules with a warning (config-level refusals
            such as DoRA still raise).
        adapter: ``"default"`` (each layer's own adapter: everything above). Another name loads
            the folder into that named adapter (:func:`~lora_layers.add_adapter`): every module the
            folder names must be a LoRA layer already; where the layer lacks the name, the adapter is
            added with the folder's ``r``, ``lora_alpha`` (per module, from ``rank_pattern``/
            ``alpha_pattern``), ``lora_dropout`` (none on an Embedding), ``use_rslora`` and
            ``use_dora``; where it has it, it is loaded in place and must have the same rank, scale
            and DoRA setting. A MergedLinear takes the rank-``r·n`` block-diagonal adapter
            :func:`export_peft` writes; a ``layout="loralib"`` conv layer takes none. The new
            adapters are not made active (:func:`~lora_layers.set_adapter`). PEFT's multi-adapter
            folder (``save_pretrained`` writes a non-default adapter ``x`` to ``folder/x/``) is read
            one adapter at a time: ``import_peft(model, folder / "x", adapter="x")``.

    Returns:
        The full names of the modules loaded, sorted.

    Raises:
        FileNotFoundError: missing config or weights.
        CheckpointError (a ValueError): a config option whose meaning lora_layers
            does not implement (DoRA, ``modules_to_save``, bias, PiSSA/OLoRA/CorDA/
            LoftQ/LoRA-GA/MiCA ``init_lora_weights``, an unknown option that is
            set, a ``peft_type`` other than LORA, ...), an invalid value (``r``
            not a positive int, a non-finite alpha, ...), keys without the
            ``base_model.model.`` prefix, or modules that do not fit; every
            problem is named, and the model is unchanged.

    On a model sharded by ``fully_shard``, call it on every rank: each rank reads the folder (the ranks
    must read the same adapter, compared by checksum) and keeps its slice of every tensor. Only modules
    that are LoRA layers already (adapters put on before ``fully_shard``) load; an error on one rank is
    raised on every rank, and nothing changes anywhere.
    """
    if not (isinstance(adapter, str) and adapter == DEFAULT_ADAPTER):
        from ..layers.adapters import check_adapter_name
        from .named_peft import import_named  # it reads folders with this module's helpers

        return import_named(model, adapter_dir, check_adapter_name(adapter, "import_peft: adapter"), strict)
    wrapped, model = model, unwrap_model(model)
    group = shard_group(model)

    def read():
        config, groups, problems = _read_adapter(model, os.fspath(adapter_dir))
        if group is None:
            return (config, groups, problems), None
        tensors = tensor_checksum({f"{n}.{k}": t for n, g in groups.items() for k, t in g.items()})
        text = json.dumps(config, sort_keys=True, default=repr)
        return (config, groups, problems), hashlib.sha256(f"{tensors} {text}".encode()).hexdigest()

    (config, groups, problems), read_back = on_every_rank(group, "import_peft", read, same=dict(strict=strict))
    on_every_rank(group, "import_peft", lambda: None, same={"adapter contents (SHA-256 of its config and tensors)": read_back})
    # Every rank now holds the same adapter: planning (which gathers DoRA bases) takes the same steps on each.
    plan = on_every_rank(group, "import_peft", lambda: _checked_plan(model, groups, config, problems, strict,
                                                                     os.fspath(adapter_dir), group))
    if any(new_layer is not None for _, new_layer, _, _ in plan):
        unwrap_model(wrapped, changes_parameters="import_peft")  # warns under DDP: layers are replaced
    _apply_import(model, plan)
    return [name for name, *_ in plan]


def _checked_plan(model: nn.Module, groups, config, problems: List[str], strict: bool, adapter_dir: str, group):
    """:func:`_plan_import`, then the problems raised (``strict``) or warned about. On a sharded model
    (``group``) only existing LoRA layers load: a new layer's adapters would not be sharded."""
    if group is not None:
        for name in sorted(groups):
            module = _submodule(model, name)
            if module is not None and not isinstance(module, LoRALayer):
                problems.append(f"{name!r} ({type(module).__name__}): the model is sharded by fully_shard, and a "
                                f"new LoRA layer's adapters would not be sharded: put the adapters on before "
                                f"fully_shard (inject_lora / phi3.apply_lora with the adapter's settings), then "
                                f"import_peft loads into them")
                groups.pop(name)
    plan = _plan_import(model, groups, config, problems)
    if problems and strict:
        raise CheckpointError(f"cannot import PEFT adapter {adapter_dir!r} (the model was not changed):\n  - "
                              + "\n  - ".join(problems))
    if problems:
        warnings.warn(f"import_peft {adapter_dir!r}: skipping:\n  - " + "\n  - ".join(problems), stacklevel=5)
    return plan


def _submodule(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _read_adapter(model: nn.Module, adapter_dir: str):
    """``(config, {module name: tensors}, problems with the keys)`` of a PEFT adapter folder, in ``model``'s names."""
    # One version of the folder, even while export_peft swaps in another: never one's config with the
    # other's weights.
    config, weights = read_folder(
        adapter_dir, lambda fd: (_read_config(adapter_dir, fd), _read_weights(adapter_dir, fd)), "PEFT adapter folder")
    groups, unprefixed, unknown = _group_keys(weights)
    groups, config = _strip_wrapper_prefix(model, groups, config)
    problems = []
    if unprefixed:
        problems.append(f"keys without the {PEFT_KEY_PREFIX!r} prefix (PEFT would silently ignore them): "
                        f"{unprefixed}")
    if unknown:
        problems.append(f"keys that are not plain LoRA A/B tensors: {unknown}")
    return config, groups, problems


def _plan_import(model: nn.Module, groups: Dict[str, Dict[str, Tensor]], config: Dict[str, Any],
                 problems: List[str]) -> list:
    """``[(name, new layer or None, target layer, {parameter name: tensor})]`` for the modules that
    fit, in name order; what does not fit is added to ``problems``. The model is not changed."""
    plan = []
    # from_module freezes the weights it wraps; undo that for the planning phase so a refusal changes nothing.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for name in sorted(groups):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                problems.append(f"{name!r}: no such module in the model")
                continue
            problem = _saved_base_problem(name, module, groups[name].pop("base", None))
            if problem is not None:
                problems.append(problem)
                continue
            try:
                plan.append((name,) + _plan_module(name, module, groups[name], _module_settings(config, name)))
            except (ValueError, TypeError) as exc:
                problems.append(f"{name!r} ({type(module).__name__}): {exc}")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return plan


def _saved_base_problem(name: str, module: nn.Module, saved_base: Optional[Tensor]) -> Optional[str]:
    """Why the base weight that PEFT's save_embedding_layers saved cannot be imported (it differs), or None."""
    if saved_base is None:
        return None
    weight = gathered(module.weight)
    if saved_base.shape == weight.shape and torch.equal(saved_base.to(weight), weight):
        return None
    return (f"{name!r}: the adapter replaces the base weight ({PEFT_KEY_PREFIX}{name}."
            f"{_SAVED_BASE_KEY}, PEFT's save_embedding_layers) with different values; "
            f"lora_layers imports only LoRA A/B (save with save_embedding_layers=False)")


@torch.no_grad()
def _apply_import(model: nn.Module, plan: list) -> None:
    """Put the planned new layers in place and copy the tensors in (a merged layer merges them in)."""
    for name, new_layer, layer, tensors in plan:
        if new_layer is not None:
            _put(model, name, new_layer)
            new_layer.weight.requires_grad_(False)  # loralib semantics, as from_module
        with unmerged(layer):
            for local, value in tensors.items():
                write_shard(getattr(layer, local), value)  # a sharded parameter keeps its slice
