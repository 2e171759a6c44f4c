"""The LoRA settings (:class:`LoRASpec`) and the argument checks shared by the layers,
surgery and the loaders.

Each check returns the value normalised (plain ``int``/``float``, so NumPy
scalars never reach a JSON header) or raises a ``ValueError``/``TypeError``
that names the argument, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Optional

import torch

from .functional import BACKENDS

__all__ = ["LoRASpec", "LORA_DTYPES", "INITS", "check_init", "pissa_niter", "check_rank", "check_alpha", "check_dropout",
           "check_backend", "check_lora_dtype", "check_lora_args", "check_use_dora", "check_dora",
           "check_dora_support", "resolve_spec", "given_settings", "NOT_GIVEN", "rank_divisor", "lora_scaling",
           "DORA_MODES", "check_dora_mode"]

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


#: Adapter initialisations: loralib's (A kaiming-uniform, B zero), PEFT's "gaussian" (A ~ N(0, 1/r²), B zero),
#: and PiSSA's and OLoRA's, which take A and B from the weight and leave the residual as the base
#: (:mod:`lora_layers.variants.pissa`; also ``"pissa_niter_<N>"``, PiSSA by a randomized SVD of N iterations).
INITS = ("kaiming", "gaussian", "pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def pissa_niter(init) -> Optional[int]:
    """``N`` of ``init="pissa_niter_N"`` (a positive integer, no leading zero), else None."""
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def check_init(init) -> str:
    if init not in INITS and pissa_niter(init) is None:
        raise ValueError(f"init must be one of {INITS} or 'pissa_niter_<N>' with N a positive integer "
                         f"(PiSSA by a randomized SVD of N iterations), got {init!r}")
    return init


def check_use_dora(use_dora) -> bool:
    numpy_bool = type(use_dora).__module__ == "numpy" and type(use_dora).__name__ in ("bool_", "bool")
    if not (isinstance(use_dora, bool) or numpy_bool):  # a string such as "false" would read as True
        raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
    return bool(use_dora)


#: DoRA's backward modes: "lean" recomputes ``x Wᵀ`` for the magnitude's gradient (one more GEMM, no
#: ``T × out`` tensor kept); "fast" keeps the pre-scale product from the forward instead.
DORA_MODES = ("lean", "fast")


def check_dora_mode(dora_mode) -> str:
    if not isinstance(dora_mode, str) or dora_mode not in DORA_MODES:
        raise ValueError(f"dora_mode must be one of {DORA_MODES}, got {dora_mode!r}")
    return dora_mode


def _check_mode_needs_dora(dora_mode: str, use_dora: bool) -> None:
    # A backward mode on a layer without DoRA would do nothing: say so rather than ignore it.
    if dora_mode != "lean" and not use_dora:
        raise ValueError(f"dora_mode={dora_mode!r} is a DoRA setting but use_dora=False; pass use_dora=True "
                         f"with it, or leave dora_mode at 'lean'")


def check_dora_support(layer, use_dora: bool, has_adapter: bool) -> None:
    """DoRA (``use_dora``, already a bool) needs a layer type that implements it and an adapter to decompose."""
    if not use_dora:
        return
    if not getattr(layer, "_supports_dora", False):
        raise TypeError(f"use_dora=True is not supported by {type(layer).__name__} (DoRA is implemented for "
                        f"Linear and MergedLinear)")
    if not has_adapter:
        fix = "enable at least one split in enable_lora" if layer.r else "use r > 0"
        raise ValueError(f"use_dora=True needs an adapter to decompose, but this {type(layer).__name__} has "
                         f"none (r={layer.r}{', no enabled split' if layer.r else ''}); {fix}")


def check_dora(layer, use_dora, has_adapter: bool) -> None:
    """:func:`check_use_dora`, then :func:`check_dora_support`."""
    check_dora_support(layer, check_use_dora(use_dora), has_adapter)


def check_lora_args(r=0, lora_alpha=1, lora_dropout=0.0, backend="auto", lora_dtype=None, init="kaiming") -> None:
    """The checks of :class:`LoRASpec` for these six settings, before anything is built or changed."""
    LoRASpec(r, lora_alpha, lora_dropout, backend=backend, lora_dtype=lora_dtype, init=init)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """The LoRA settings of a layer, checked once when the spec is made.

    ``from_module(module, spec=...)`` and ``inject_lora(model, targets, spec=...)`` take one
    in place of these keyword arguments, and ``layer.spec`` gives a layer's. ``r`` and
    ``lora_alpha`` have no default here because the entry points' defaults differ
    (``inject_lora``: 8 and 16; ``from_module``: 8 and 1; the constructors: 0 and 1).

    Args:
        r: adapter rank, an integer ``>= 0`` (``0``: no adapter; model-level calls need ``>= 1``).
        lora_alpha: scaling numerator, a finite number: ``scaling = lora_alpha / r``.
        lora_dropout: dropout on the adapter input, in ``[0, 1)`` (embeddings have none).
        merge_weights: ``eval()`` merges and ``train()`` unmerges the adapter.
        use_rslora: ``scaling = lora_alpha / √r``.
        lora_dtype: dtype of the adapter parameters: None (the weight's) or fp16, bf16, fp32, fp64.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        use_dora: DoRA adapters (``True`` or ``False``; ``Linear`` and ``MergedLinear`` only).
        init: ``"kaiming"`` (loralib's) or ``"gaussian"`` (PEFT's) adapter init; or ``"pissa"``,
            ``"pissa_niter_<N>"``, ``"olora"`` (``Linear``/``MergedLinear``): A and B from the weight's
            top singular vectors or QR, the weight becoming the residual (docs/pissa.md).
        dora_mode: DoRA's backward, ``"lean"`` (the default: ``x Wᵀ`` recomputed for the
            magnitude's gradient) or ``"fast"`` (``x Wᵀ + s·uBᵀ`` kept from the forward, one
            ``T × out`` tensor); the same function either way. Anything but ``"lean"`` needs
            ``use_dora=True``.

    Raises:
        ValueError, TypeError: a setting is out of range or of the wrong type, naming it, the
            value and what was expected (the messages of the layers' constructors).

    Example::

        >>> spec = LoRASpec(r=8, lora_alpha=16, lora_dropout=0.05)
        >>> spec.lora_alpha / spec.r
        2.0
    """

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    merge_weights: bool = True
    use_rslora: bool = False
    lora_dtype: Optional[torch.dtype] = None
    backend: str = "auto"
    use_dora: bool = False
    init: str = "kaiming"
    dora_mode: str = "lean"

    def __post_init__(self):
        # The order of the checks (so of the error when several settings are wrong) is check_lora_args'.
        checked = dict(r=check_rank(self.r), lora_alpha=check_alpha(self.lora_alpha),
                       lora_dropout=check_dropout(self.lora_dropout), backend=check_backend(self.backend),
                       lora_dtype=check_lora_dtype(self.lora_dtype), init=check_init(self.init),
                       use_dora=check_use_dora(self.use_dora), dora_mode=check_dora_mode(self.dora_mode),
                       merge_weights=bool(self.merge_weights),
                       use_rslora=bool(self.use_rslora))  # the last two are flags, read as loralib reads them
        _check_mode_needs_dora(checked["dora_mode"], checked["use_dora"])
        for name, value in checked.items():
            object.__setattr__(self, name, value)


#: The setting names, in LoRASpec's field order (also the order of ``LoRALayer._init_lora``'s arguments).
SPEC_FIELDS = tuple(field.name for field in dataclasses.fields(LoRASpec))


class _NotGiven:
    """The default of a setting that a call also takes by position: not given, so the callee's own
    default (or the spec's value) applies. Unlike None, which is a value, and checked as one."""

    def __repr__(self) -> str:
        return "<default>"


NOT_GIVEN = _NotGiven()


def given_settings(settings: dict, **by_position) -> dict:
    """``settings`` plus the settings a call took by position (the ones before ``spec`` existed,
    ``inject_lora(model, targets, 8, 16)``), leaving out those :data:`NOT_GIVEN`."""
    settings.update({name: value for name, value in by_position.items() if value is not NOT_GIVEN})
    return settings


def resolve_spec(spec, kwargs: dict, caller: str, **defaults) -> LoRASpec:
    """The spec of a call that takes ``spec`` or the settings as keyword arguments.

    The settings are popped from ``kwargs`` (which keeps the call's other keyword arguments);
    ``defaults`` are the caller's own for settings not given. ``spec`` together with a setting
    is refused, so that no setting is silently overridden.
    """
    settings = {name: kwargs.pop(name) for name in SPEC_FIELDS if name in kwargs}
    if spec is None:
        return LoRASpec(**{**defaults, **settings})
    if not isinstance(spec, LoRASpec):
        raise TypeError(f"{caller}: spec must be a LoRASpec or None, got {spec!r} (pass r, lora_alpha, ... "
                        f"as keyword arguments)")
    if settings:
        raise TypeError(f"{caller}: pass the LoRA settings either as spec or as keyword arguments, not both "
                        f"(got spec and {sorted(settings)})")
    return spec


def rank_divisor(r, use_rslora: bool = False):
    """What ``lora_alpha`` is divided by to give the scaling: ``r``, or ``√r`` with rsLoRA."""
    return math.sqrt(r) if use_rslora else r


def lora_scaling(r, lora_alpha, use_rslora: bool = False) -> float:
    """The adapter's scaling: ``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA; 0.0 for ``r=0``."""
    return 0.0 if r == 0 else lora_alpha / rank_divisor(r, use_rslora)
