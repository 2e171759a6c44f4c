"""Adapters that describe themselves: :func:`load_adapter` and :func:`summary`.

:func:`load_adapter` puts on a plain model the adapters a file describes and
loads them, reading every setting (targets, ranks, alphas, rsLoRA, DoRA, fused
splits, conv layout, adapter dtype) from a :func:`~lora_layers.save_lora`
header or a PEFT ``adapter_config.json``. :func:`summary` says what a model's
adapters are and how many parameters and bytes they take.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

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
from ..model.params import lora_modules, lora_parameters, mark_only_lora_as_trainable

__all__ = ["load_adapter", "summary", "AdapterSummary"]

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

    On any error the model is unchanged (modules, parameters, values, ``requires_grad``).
    """
    model = unwrap_model(model, changes_parameters="load_adapter")
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


# ----------------------------------------------------------------------------- summary

@dataclass
class AdapterSummary:
    """What :func:`summary` found; ``str()`` gives the printable table, :meth:`as_dict` plain data.

    Attributes:
        modules: per LoRA layer with an adapter: ``name``, ``class``, ``r``, ``lora_alpha``,
            ``scaling`` and ``variants`` (``"DoRA"``, ``"rsLoRA"``, ``"quantized base (nf4)"``,
            ``"splits [...] on [...]"``, ``"layout=loralib"``, ``"fan_in_fan_out"``, ``"merged"``).
        trainable_params: elements of the parameters with ``requires_grad`` (each shared Parameter once).
        total_params: elements of every parameter; a quantized weight counts its logical ``out × in``
            elements, not its packed bytes (as PEFT and transformers' ``num_parameters`` count them).
        adapter_params: elements of the adapter parameters (:func:`~lora_layers.lora_parameters`).
        adapter_bytes: their size in memory, what :func:`~lora_layers.save_lora` writes for them.
    """

    modules: List[Dict[str, Any]] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    adapter_params: int = 0
    adapter_bytes: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def groups(self) -> List[Tuple[str, int, Dict[str, Any]]]:
        """``(suffix, count, settings)``: modules with the same last name component and settings, in model order."""
        out: Dict[str, Tuple[str, int, Dict[str, Any]]] = {}
        for m in self.modules:
            settings = {k: v for k, v in m.items() if k != "name"}
            leaf = m["name"].rsplit(".", 1)[-1] or "<root>"
            key = leaf + json.dumps(settings, sort_keys=True)
            _, n, _ = out.get(key, (leaf, 0, settings))
            out[key] = (leaf, n + 1, settings)
        return list(out.values())

    def __str__(self) -> str:
        n = len(self.modules)
        lines = [f"LoRA adapters on {n} module{'' if n == 1 else 's'}:"]
        for leaf, n, s in self.groups():
            extra = f"  [{', '.join(s['variants'])}]" if s["variants"] else ""
            lines.append(f"  {leaf} ×{n}  {s['class']}  r={s['r']}  alpha={s['lora_alpha']:g}  "
                         f"scaling={s['scaling']:.4g}{extra}")
        pct = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0
        lines.append(f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
                     f"trainable%: {pct:.4f}")
        lines.append(f"adapter params: {self.adapter_params:,} ({_human_bytes(self.adapter_bytes)})")
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    return f"{n / 1024:.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.1f} MiB"


def _logical_numel(p: torch.Tensor) -> int:
    # bitsandbytes' Params4bit stores two 4-bit values per byte of its storage dtype (a torchao
    # NF4 tensor already reports its logical size).
    return p.numel() * 2 * p.element_size() if type(p).__name__ == "Params4bit" else p.numel()


def _variants(layer) -> List[str]:
    out = [v for v, on in (("DoRA", layer.use_dora), ("rsLoRA", layer.use_rslora)) if on]
    quantized = getattr(layer, "quantized", None)
    if quantized is not None:
        out.append(f"quantized base ({quantized.kind})")
    if isinstance(layer, MergedLinear):
        out.append(f"splits {list(layer.split_sizes)} on {[int(e) for e in layer.enable_lora]}")
    if getattr(layer, "layout", "lora_layers") != "lora_layers":
        out.append(f"layout={layer.layout}")
    if getattr(layer, "fan_in_fan_out", False):
        out.append("fan_in_fan_out")
    if layer.merged:
        out.append("merged")
    return out


def summary(model: nn.Module) -> AdapterSummary:
    """What adapters ``model`` carries, and what they cost: ``print(lora_layers.summary(model))``.

    The adapted modules are grouped by their last name component and settings
    (``qkv_proj ×32  MergedLinear  r=16  alpha=32 ...``), with their variants
    (DoRA, rsLoRA, a quantized base, fused splits, conv layout, merged); then
    the trainable and total parameter counts and percentage (PEFT's
    ``print_trainable_parameters`` line) and the adapters' parameters and bytes.

    Args:
        model: any module (``torch.compile``/DDP wrappers are seen through).

    Returns:
        An :class:`AdapterSummary`: ``str()`` is the table, the attributes and
        :meth:`AdapterSummary.as_dict` the numbers.
    """
    model = unwrap_model(model)
    modules = [{"name": name, "class": type(layer).__name__, "r": layer.r, "lora_alpha": layer.lora_alpha,
                "scaling": layer.scaling, "variants": _variants(layer)}
               for name, layer in lora_modules(model) if layer.has_adapter]
    params = list(model.parameters())  # each shared Parameter once
    adapters = lora_parameters(model)
    return AdapterSummary(modules, trainable_params=sum(_logical_numel(p) for p in params if p.requires_grad),
                          total_params=sum(_logical_numel(p) for p in params),
                          adapter_params=sum(p.numel() for p in adapters),
                          adapter_bytes=sum(p.numel() * p.element_size() for p in adapters))
