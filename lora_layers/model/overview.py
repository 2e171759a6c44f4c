"""What adapters a model carries and what they cost: :func:`summary` and its :class:`AdapterSummary`.

They read a model, not files, so they sit with the other model-level helpers; the old path
``lora_layers.adapters.summary`` keeps working.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from ..layers import MergedLinear
from .params import lora_modules, lora_parameters
from .unwrap import unwrap_model

__all__ = ["summary", "AdapterSummary"]


@dataclass
class AdapterSummary:
    """What :func:`summary` found; ``str()`` gives the printable table, :meth:`as_dict` plain data.

    Attributes:
        modules: per LoRA layer with an adapter: ``name``, ``class``, ``r``, ``lora_alpha``,
            ``scaling`` and ``variants`` (``"DoRA"``, ``"rsLoRA"``, ``"quantized base (nf4)"``,
            ``"splits [...] on [...]"``, ``"layout=loralib"``, ``"fan_in_fan_out"``, ``"merged"``, and
            ``"adapters [...], active '...'"`` on a layer with named adapters).
        trainable_params: elements of the parameters with ``requires_grad`` (each shared Parameter once).
        total_params: elements of every parameter; a quantized weight counts its logical ``out × in``
            elements, not its packed bytes (as PEFT and transformers' ``num_parameters`` count them).
        adapter_params: elements of the adapter parameters (:func:`~lora_layers.lora_parameters`),
            every named adapter's included.
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
    if len(layer.adapter_names) > 1:  # named adapters (the r and alpha shown are the default's)
        out.append(f"adapters {list(layer.adapter_names)}, active {layer.active_adapter!r}")
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
