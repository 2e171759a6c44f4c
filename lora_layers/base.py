"""The LoRALayer mixin: LoRA configuration, validation and the exact merge, once for every layer type.

Concrete layers (:mod:`lora_layers.layers`) only say which adapter shapes they
have, how to initialise them, what their ``ΔW`` blocks are and how their
forward runs; everything else (construction checks, ``from_module``,
``merge``/``unmerge`` with bitwise restore, ``train``/``eval`` semantics and the
state_dict hooks that never write a merged weight) lives here.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import threading
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ._ties import LOADING_ATTR, SHARED_ATTR, register_weight, shared_weight_reason
from .functional import BACKENDS

__all__ = ["LoRALayer", "ADAPTER_NAMES"]

ADAPTER_NAMES = ("lora_A", "lora_B")
ADAPTER_PREFIX = "lora_"

_BITS_DTYPE = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


# ----------------------------------------------------------------------------- validation

def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
        raise ValueError(f"r must be a non-negative integer, got {r!r}")
    return int(r)


def _check_alpha(lora_alpha):
    """A finite real number, normalised to a plain ``int`` or ``float`` (a NumPy
    scalar would otherwise reach the JSON of checkpoint headers)."""
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    return int(lora_alpha) if isinstance(lora_alpha, numbers.Integral) else float(lora_alpha)


def _check_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {p!r}")
    return float(p)


def _check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# Adapters are trained: they need a dtype with arithmetic and random init (not fp8).
LORA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_lora_dtype(lora_dtype):
    if lora_dtype is not None and lora_dtype not in LORA_DTYPES:
        raise TypeError(f"lora_dtype must be None or one of {[str(d) for d in LORA_DTYPES]}, got {lora_dtype!r}")
    return lora_dtype


# ----------------------------------------------------------------------------- exact merge

def _bits(t: Tensor) -> Tensor:
    return t.view(_BITS_DTYPE[t.dtype])


def _residual(original: Tensor, restored: Tensor) -> Optional[Tensor]:
    """What must be added, bitwise, to ``restored`` to get ``original`` back.

    Integer arithmetic on the bit patterns wraps around, so
    ``bits(restored) + residual == bits(original)`` holds exactly. The residual
    is almost always 0 or ±1 ulp, so it is stored as int8 (one byte per weight,
    only while merged); None when nothing needs restoring.
    """
    if original.is_meta:
        return None  # no values to restore
    diff = _bits(original) - _bits(restored)
    if not diff.any():
        return None
    if diff.min() >= -128 and diff.max() <= 127:
        return diff.to(torch.int8)
    return diff


_BASE_KEYS: Dict[type, frozenset] = {}


def _base_attribute_names(base: type) -> frozenset:
    """The instance attribute names a ``base`` module has (learned once from a meta-device instance)."""
    if base not in _BASE_KEYS:
        args = (1, 1, 1) if issubclass(base, nn.modules.conv._ConvNd) else (1, 1)
        _BASE_KEYS[base] = frozenset(base(*args, device="meta").__dict__)
    return _BASE_KEYS[base]


_WARNED_UNMERGED_STATE_DICT = False
_QUIET = threading.local()


@contextlib.contextmanager
def quiet_state_dict():
    """Within this block, state_dict() of a merged layer does not warn (the library's own calls)."""
    before = getattr(_QUIET, "on", False)
    _QUIET.on = True
    try:
        yield
    finally:
        _QUIET.on = before


def _warn_unmerged_state_dict(layer: "LoRALayer") -> None:
    """Once per process: a merged model's state_dict() holds the unmerged weight (loralib's holds the merged one)."""
    global _WARNED_UNMERGED_STATE_DICT
    if _WARNED_UNMERGED_STATE_DICT or getattr(_QUIET, "on", False) or not layer._merge_state[1].any():
        return  # (B == 0: the merged and the unmerged weight agree)
    _WARNED_UNMERGED_STATE_DICT = True
    warnings.warn(
        "lora_layers: state_dict() of a merged (eval-mode) LoRA layer holds the UNMERGED base weight next to "
        "the adapter, so reloading it never counts the adapter twice. loralib wrote the merged weight here: "
        "if you meant to export merged weights, use lora_layers.merged_state_dict(model) (or "
        "merge_and_unload(model)). This warning is shown once per process.",
        UserWarning, stacklevel=4)


class LoRALayer:
    """Mixin with the LoRA state and merge logic shared by every layer type.

    Attributes (loralib names): ``r``, ``lora_alpha``, ``scaling``,
    ``lora_dropout`` (an ``nn.Dropout``), ``merged``, ``merge_weights``.
    Extra: ``use_rslora``, ``lora_dtype``, ``backend``.

    Subclasses implement ``_adapter_shapes``, ``reset_lora_parameters``,
    ``_delta_blocks`` and ``forward``.

    As in loralib, a class of your own may subclass it next to a torch layer and
    call ``LoRALayer.__init__(self, r=..., lora_alpha=..., lora_dropout=...,
    merge_weights=...)`` after the torch layer's ``__init__``, then define its own
    adapters, ``forward``, ``train`` and merging.
    """

    _base_type: type = nn.Module  # the torch layer this class wraps

    # -- construction --------------------------------------------------------
    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool):
        """loralib's ``LoRALayer.__init__``: set the configuration attributes, nothing else."""
        self.r = _check_rank(r)
        self.lora_alpha = _check_alpha(lora_alpha)
        dropout = nn.Dropout(p=_check_dropout(lora_dropout))
        if "_modules" in self.__dict__:
            self.lora_dropout = dropout
        elif dropout.p == 0.0:
            # Called before nn.Module.__init__ (loralib tolerates this at p=0):
            # a plain attribute, which Module.__init__ leaves alone.
            object.__setattr__(self, "lora_dropout", dropout)
        else:
            raise TypeError(f"{type(self).__name__}: call the torch layer's __init__ (e.g. nn.Linear.__init__) "
                            f"before LoRALayer.__init__ when lora_dropout={lora_dropout!r} > 0")
        self.merged = False
        self.merge_weights = bool(merge_weights)
        self.use_rslora = False
        self.lora_dtype = None
        self.backend = "auto"
        self._merge_state = None
        self.scaling = self._compute_scaling()
        self.__dict__[SHARED_ATTR] = None

    def _init_lora(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora=False,
                   lora_dtype=None, backend="auto") -> None:
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights)
        self.use_rslora = bool(use_rslora)
        self.lora_dtype = _check_lora_dtype(lora_dtype)
        self.backend = _check_backend(backend)
        self.scaling = self._compute_scaling()
        register_weight(self)
        shapes = self._adapter_shapes() if self.r > 0 else None
        if shapes is not None:
            w = self.weight
            dtype = self.lora_dtype or w.dtype
            for name, shape in zip(ADAPTER_NAMES, shapes):
                self.register_parameter(name, nn.Parameter(torch.empty(shape, device=w.device, dtype=dtype)))
            # loralib freezes the pretrained weight as soon as adapters exist.
            w.requires_grad_(False)

    def _compute_scaling(self) -> float:
        if self.r == 0:
            return 0.0
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_module(cls, module: nn.Module, r: int = 8, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    merge_weights: bool = True, *, use_rslora: bool = False, lora_dtype=None,
                    backend: str = "auto", **layer_kwargs):
        """Wrap an existing torch layer without copying it.

        The new module shares ``module``'s ``weight``/``bias`` Parameter objects
        (same storage, device and dtype; nothing is re-initialised) and adds
        freshly initialised adapters. ``layer_kwargs`` are class-specific
        (``enable_lora``/``split_sizes`` for :class:`MergedLinear`).

        The wrapped module's class and attribute names are remembered, so
        :func:`~lora_layers.unload` / :func:`~lora_layers.merge_and_unload` give
        back exactly that kind of module.

        Raises:
            TypeError: ``module`` is not a ``cls._base_type`` (or is already a LoRA
                layer), or it carries an instance-level ``forward`` (accelerate
                dispatch hooks, a patched forward) that the wrapper would bypass.
            ValueError: a LoRA hyper-parameter is out of range.
        """
        if isinstance(module, LoRALayer) or not cls._can_wrap(module):
            raise TypeError(
                f"{cls.__name__}.from_module expects a {cls._base_type.__module__}.{cls._base_type.__name__}, "
                f"got {type(module).__name__}"
            )
        if not isinstance(module._parameters.get("weight"), nn.Parameter):
            # weight_norm / spectral_norm / parametrizations compute the weight on the fly.
            raise TypeError(
                f"{cls.__name__}.from_module: this {type(module).__name__} has no `weight` Parameter (it is "
                f"computed on the fly by weight_norm, spectral_norm or a parametrization); remove the "
                f"reparametrization first (torch.nn.utils.remove_weight_norm, "
                f"torch.nn.utils.parametrize.remove_parametrizations)"
            )
        if "forward" in module.__dict__:
            # A copied bound forward would call the original layer and silently skip the adapter.
            raise TypeError(
                f"{cls.__name__}.from_module: this {type(module).__name__} has an instance-level forward "
                f"(e.g. accelerate hooks from device_map/offload, or a patched forward); add LoRA before "
                f"dispatching the model"
            )
        # Validate everything before touching the module (errors change nothing).
        _check_rank(r), _check_alpha(lora_alpha), _check_dropout(lora_dropout)
        _check_backend(backend), _check_lora_dtype(lora_dtype)
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        for key, value in module.__dict__.items():
            if key in ("_parameters", "_buffers", "_modules"):
                getattr(obj, key).update(value)
            elif key == "_compiled_call_impl":
                continue  # module.compile() compiled the old forward, not this one
            elif isinstance(value, (dict, set)):
                obj.__dict__[key] = type(value)(value)  # hooks etc.: own copy, same contents
            else:
                obj.__dict__[key] = value
        obj._wrapped_class = type(module)
        obj._wrapped_keys = frozenset(module.__dict__)
        obj._validate_wrapped(**layer_kwargs)
        obj._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora, lora_dtype, backend)
        obj.reset_lora_parameters()
        return obj

    @classmethod
    def _can_wrap(cls, module: nn.Module) -> bool:
        return isinstance(module, cls._base_type)

    def wrapped_module(self) -> nn.Module:
        """A plain module of the wrapped kind sharing this layer's Parameters, without LoRA state.

        For a layer made by :meth:`from_module`, the original class with its own
        attributes; for one built directly, ``_base_type``. Merging is the
        caller's business: the weight is taken as it is now.
        """
        cls = self.__dict__.get("_wrapped_class", self._base_type)
        keys = self.__dict__.get("_wrapped_keys") or _base_attribute_names(self._base_type)
        plain = cls.__new__(cls)
        for key, value in self.__dict__.items():
            if key in keys:
                plain.__dict__[key] = type(value)(value) if isinstance(value, (dict, set)) else value
        for name in ADAPTER_NAMES:
            plain._parameters.pop(name, None)
        plain._modules.pop("lora_dropout", None)
        return plain

    def _validate_wrapped(self, **layer_kwargs) -> None:
        if layer_kwargs:
            raise TypeError(f"{type(self).__name__}.from_module got unexpected arguments {sorted(layer_kwargs)}")

    # -- what subclasses provide ---------------------------------------------
    def _adapter_shapes(self) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
        raise NotImplementedError

    def reset_lora_parameters(self) -> None:
        """Default init (loralib's for Linear/Conv): A kaiming-uniform(a=√5), B zero."""
        if self.has_adapter:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _delta_blocks(self, A: Tensor, B: Tensor) -> Iterator[Tuple[tuple, Tensor]]:
        """Yield ``(index, ΔW_block)`` with ``weight[index] += ΔW_block`` (fp32, scaled)."""
        raise NotImplementedError

    # -- common API ----------------------------------------------------------
    @property
    def _acc_dtype(self) -> torch.dtype:
        # Deltas are computed in fp32 (fp64 for fp64 weights) and rounded once.
        return torch.promote_types(self.weight.dtype, torch.float32)

    @property
    def has_adapter(self) -> bool:
        """True when this layer has an adapter now: ``r > 0`` and ``lora_A`` holds a tensor.

        Read at call time, as loralib does, so adapters replaced by plain
        tensors (``torch.func.functional_call``, subspace training) are used.
        """
        return self.r > 0 and isinstance(getattr(self, "lora_A", None), Tensor)

    def adapter_parameters(self) -> Dict[str, nn.Parameter]:
        """This layer's own parameters whose names start with ``lora_`` (``lora_A``, ``lora_B``);
        empty without adapters."""
        return {n: p for n, p in self._parameters.items() if n.startswith(ADAPTER_PREFIX) and p is not None}

    def reset_parameters(self) -> None:
        # Same call order as loralib, so a given seed gives the same numbers.
        if self.__dict__.get("merged"):
            # Fresh weights carry no merged delta: a later unmerge() must not
            # subtract the old one from them.
            self.merged, self._merge_state = False, None
        super().reset_parameters()
        if "lora_A" in self.__dict__.get("_parameters", {}):
            self.reset_lora_parameters()

    def _merge_blocker(self) -> Optional[str]:
        """Why this layer cannot merge, or None. A shared (tied) weight never merges."""
        return shared_weight_reason(self)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_weights:
            if mode:
                self.unmerge()
            elif self._merge_blocker() is None:
                self.merge()
        return self

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add ``scaling · B A`` into the base weight. Idempotent.

        The delta is computed in fp32 and the sum rounded once. A small residual
        (usually int8, one byte per weight while merged) is kept so that
        :meth:`unmerge` restores the weight bit for bit.

        Args:
            safe_merge: check the merged weight is finite first; if not, raise
                ``ValueError`` and leave the weight untouched.
        """
        if self.merged or not self.has_adapter:
            return
        blocker = self._merge_blocker()
        if blocker is not None:
            raise ValueError(f"cannot merge this {type(self).__name__}: {blocker}")
        W = self.weight.data
        if W.dtype not in _BITS_DTYPE:
            raise TypeError(f"cannot merge into a weight of dtype {W.dtype}; expected one of {list(_BITS_DTYPE)}")
        A, B = self.lora_A.detach().clone(), self.lora_B.detach().clone()
        acc = torch.promote_types(W.dtype, torch.float32)
        residuals = []
        try:
            for index, delta in self._delta_blocks(A, B):
                block = W[index]
                merged = (block.to(acc) + delta).to(W.dtype)
                if safe_merge and not W.is_meta and not torch.isfinite(merged).all():
                    raise ValueError(
                        f"safe_merge: merging the adapter into {type(self).__name__}.weight gives "
                        f"non-finite values; the weight was left unchanged"
                    )
                residuals.append(_residual(block, (merged.to(acc) - delta).to(W.dtype)))
                block.copy_(merged)
        except BaseException:
            self._restore_into(W, A, B, residuals)  # undo the blocks already written
            raise
        self._merge_state = (A, B, W.dtype, residuals)
        self.merged = True

    def _restore_into(self, W: Tensor, A: Tensor, B: Tensor, residuals) -> None:
        """Subtract the delta of (A, B) from ``W`` block by block, then add each
        block's bitwise residual; ``zip`` stops after the blocks in ``residuals``."""
        acc = torch.promote_types(W.dtype, torch.float32)
        # The saved factors stay where they were made if the module moved while merged.
        A, B = A.to(W.device), B.to(W.device)
        for (index, delta), residual in zip(self._delta_blocks(A, B), residuals):
            block = W[index]
            restored = (block.to(acc) - delta).to(W.dtype)
            if residual is not None:
                _bits(restored).add_(residual.to(device=W.device, dtype=_BITS_DTYPE[W.dtype]))
            block.copy_(restored)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged delta, restoring the base weight exactly. Idempotent.

        The delta removed is the one that was merged, even if the adapter
        tensors were changed in place meanwhile.
        """
        if not self.merged:
            return
        A, B, dtype, residuals = self._merge_state
        if self.weight.dtype != dtype:
            # The weight was cast while merged: the residual no longer applies;
            # subtracting the delta is exact up to the cast's rounding.
            residuals = [None] * len(residuals)
        self._restore_into(self.weight.data, A, B, residuals)
        self._merge_state = None
        self.merged = False

    def unmerged_weight(self) -> Tensor:
        """The base weight without the adapter: a restored copy if merged, else the weight itself."""
        if not self.merged:
            return self.weight.detach()
        A, B, dtype, residuals = self._merge_state
        W = self.weight.detach().clone()
        self._restore_into(W, A, B, residuals if W.dtype == dtype else [None] * len(residuals))
        return W

    def merged_weight(self) -> Tensor:
        """A copy of the weight with the adapter folded in, as :meth:`merge` would write it;
        the layer is not changed."""
        if self.merged or not self.has_adapter:
            return self.weight.detach().clone()
        W = self.weight.detach().clone()
        acc = torch.promote_types(W.dtype, torch.float32)
        for index, delta in self._delta_blocks(self.lora_A.detach(), self.lora_B.detach()):
            W[index] = (W[index].to(acc) + delta).to(W.dtype)
        return W

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged and prefix + "weight" in destination:
            # Never write a merged weight: reloading it next to the adapter
            # would count the adapter twice (loralib's bug). This is a restored
            # copy, so with keep_vars=True it is a tensor, not the Parameter.
            destination[prefix + "weight"] = self.unmerged_weight()
            _warn_unmerged_state_dict(self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        was_merged = self.merged
        self.unmerge()
        weight = self._parameters.get("weight")
        # load_state_dict(assign=True) registers a new weight Parameter: that is not a tie.
        self.__dict__[LOADING_ATTR] = True
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            del self.__dict__[LOADING_ATTR]
            if self._parameters.get("weight") is not weight:
                register_weight(self)
            if was_merged:
                self.merge()

    def extra_repr(self) -> str:
        # A loralib-style subclass may hold any callable as lora_dropout.
        extra = f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={getattr(self.lora_dropout, 'p', 0.0)}"
        if getattr(self, "use_rslora", False):
            extra += ", use_rslora=True"
        if getattr(self, "merged", False):
            extra += ", merged=True"
        return f"{super().extra_repr()}, {extra}"

    def _lora_AB(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        return self.lora_A.to(dtype), self.lora_B.to(dtype)
