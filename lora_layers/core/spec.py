"""Argument checks shared by the layers, surgery and the loaders.

Each check returns the value normalised (plain ``int``/``float``, so NumPy
scalars never reach a JSON header) or raises a ``ValueError``/``TypeError``
that names the argument, the value and what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch

from .functional import BACKENDS

__all__ = ["LORA_DTYPES", "INITS", "check_init", "check_rank", "check_alpha", "check_dropout", "check_backend",
           "check_lora_dtype", "check_lora_args", "check_dora", "rank_divisor", "lora_scaling"]

# Adapters are trained: they need a dtype with arithmetic and random init (not fp8).
LORA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_rank(r, arg: str = "r", positive: bool = False) -> int:
    """A rank: a non-negative integer (0 is a layer without an adapter), or with ``positive`` one
    that is at least 1 (where an adapter is asked for: ``inject_lora``'s ``r`` and ``rank_pattern``)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < int(positive):
        raise ValueError(f"{arg} must be a {'positive' if positive else 'non-negative'} integer, got {r!r}")
    return int(r)


def check_alpha(lora_alpha):
    """A finite real number, as a plain ``int`` (if integral) or ``float``."""
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    return int(lora_alpha) if isinstance(lora_alpha, numbers.Integral) else float(lora_alpha)


def check_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {p!r}")
    return float(p)


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_lora_dtype(lora_dtype):
    if lora_dtype is not None and lora_dtype not in LORA_DTYPES:
        raise TypeError(f"lora_dtype must be None or one of {[str(d) for d in LORA_DTYPES]}, got {lora_dtype!r}")
    return lora_dtype


#: Adapter initialisations: loralib's (A kaiming-uniform, B zero) and PEFT's "gaussian" (A ~ N(0, 1/r²), B zero).
INITS = ("kaiming", "gaussian")


def check_init(init) -> str:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init


def check_dora(layer, use_dora, has_adapter: bool) -> None:
    """DoRA needs a layer type that implements it and an adapter to decompose."""
    numpy_bool = type(use_dora).__module__ == "numpy" and type(use_dora).__name__ in ("bool_", "bool")
    if not (isinstance(use_dora, bool) or numpy_bool):  # a string such as "false" would read as True
        raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
    if not use_dora:
        return
    if not getattr(layer, "_supports_dora", False):
        raise TypeError(f"use_dora=True is not supported by {type(layer).__name__} (DoRA is implemented for "
                        f"Linear and MergedLinear)")
    if not has_adapter:
        fix = "enable at least one split in enable_lora" if layer.r else "use r > 0"
        raise ValueError(f"use_dora=True needs an adapter to decompose, but this {type(layer).__name__} has "
                         f"none (r={layer.r}{', no enabled split' if layer.r else ''}); {fix}")


def check_lora_args(r=0, lora_alpha=1, lora_dropout=0.0, backend="auto", lora_dtype=None, init="kaiming") -> None:
    """All the checks above at once, before anything is built or changed."""
    check_rank(r), check_alpha(lora_alpha), check_dropout(lora_dropout)
    check_backend(backend), check_lora_dtype(lora_dtype), check_init(init)


def rank_divisor(r, use_rslora: bool = False):
    """What ``lora_alpha`` is divided by to give the scaling: ``r``, or ``√r`` with rsLoRA."""
    return math.sqrt(r) if use_rslora else r


def lora_scaling(r, lora_alpha, use_rslora: bool = False) -> float:
    """The adapter's scaling: ``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA; 0.0 for ``r=0``."""
    return 0.0 if r == 0 else lora_alpha / rank_divisor(r, use_rslora)
