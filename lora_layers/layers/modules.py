"""LoRA layers, drop-in compatible with Microsoft's ``loralib``.

Each layer subclasses its torch counterpart (``isinstance(m, nn.Linear)`` holds,
``weight``/``bias`` keep their state_dict keys) and the :class:`LoRALayer`
mixin (:mod:`lora_layers.base`), which holds the configuration and *all*
merge logic once for every layer type. A layer only says which adapter
shapes it has, how to initialise them, what its ``ΔW`` blocks are, and how
its forward runs.

Differences from loralib 0.1.2 (all bug fixes; see docs/migrating-from-loralib.md):

* ``train()`` returns ``self``; modules pickle and deepcopy (no lambdas).
* Merging is exact: after any number of ``eval()``/``train()`` cycles the base
  weight is bit-identical to the original, in every dtype.
* ``state_dict()`` of a merged layer holds the merged weight, as loralib's,
  marked in its metadata, so reloading a checkpoint saved in eval mode never
  double-counts the adapter.
* Conv layers have rank ``r`` (loralib uses ``r·k``), support tuple kernels,
  groups, Conv1d/Conv3d, and apply dropout. ``layout="loralib"`` gives loralib's
  conv adapter instead, and a fresh conv layer loading a loralib conv adapter
  switches to it (with a one-time warning). ``.conv`` is loralib's wrapped conv.
* ``MergedLinear`` accepts unequal ``split_sizes`` (GQA qkv, ``[gate | up]``)
  and never builds the full ``ΔW`` or a zero-padded output in forward.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import MutableMapping
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core.wrap import _base_attribute_names
from .notices import warn_conv_layout_switch
from .base import ADAPTER_NAMES, MAGNITUDE_NAME, LoRALayer
from ..core.functional import lora_conv, lora_embedding, lora_linear
from ..core.merging import accumulation_dtype, merged_copy
from ..bases.quantized import QuantizedBase, quantized_base
from ..core.segments import Segments
from ..core.spec import check_dora, check_lora_args
from ..variants.dora import DoRAScale, dora_row_scale, dora_weight_norm

__all__ = ["Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d"]

_DERIVED_MAGNITUDE = "_derived_magnitude"  # the magnitude as last derived from the weight (not state)


# ----------------------------------------------------------------------------- Linear

def _is_hf_conv1d(module) -> bool:
    # Duck-typed so transformers need not be imported: GPT-2's Conv1D has ``nf`` and a 2-D weight.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2

class Linear(LoRALayer, nn.Linear):
    """``nn.Linear`` with a LoRA adapter: ``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Shapes: input ``(*, in_features)``, output ``(*, out_features)``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: adapter rank; ``0`` gives a plain ``nn.Linear`` with no adapter.
        lora_alpha: scaling numerator; ``scaling = lora_alpha / r``.
        lora_dropout: dropout on the adapter input, in ``[0, 1)``.
        fan_in_fan_out: the weight is stored as ``(in, out)`` (GPT-2 ``Conv1D``).
        merge_weights: ``eval()`` merges and ``train()`` unmerges the adapter.
        use_rslora: ``scaling = lora_alpha / √r`` (rank-stabilised LoRA).
        lora_dtype: dtype of the adapter parameters (default: the weight's).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`lora_layers.functional`).
        use_dora: DoRA: ``y = (m / ‖W + s·BA‖) ⊙ (x Wᵀ + s·dropout(x) Aᵀ Bᵀ) + b`` with a
            trainable per-row magnitude ``m`` (the norm is a constant in backward; on a row whose
            norm is 0 the factor is 1, where PEFT gives NaN: docs/dora.md).
        init: ``"kaiming"`` (loralib's A init) or ``"gaussian"`` (PEFT's: A ~ N(0, 1/r²)).
        **kwargs: passed to ``nn.Linear`` (``bias``, ``device``, ``dtype``).

    Attributes:
        lora_A: ``(r, in_features)``, kaiming-uniform init.
        lora_B: ``(out_features, r)``, zero init, so a new adapter changes nothing.
        lora_magnitude: ``(out_features,)`` with ``use_dora``, initialised to ``‖W‖`` per row; a
            ``load_state_dict`` that replaces the weight without it derives it again
            (:meth:`reset_magnitude`, docs/dora.md).

    Example::

        >>> layer = Linear(64, 32, r=8, lora_alpha=16)
        >>> layer(torch.randn(4, 10, 64)).shape
        torch.Size([4, 10, 32])
    """

    _base_type = nn.Linear
    _supports_dora = True

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True, *,
                 use_rslora: bool = False, lora_dtype=None, backend: str = "auto", use_dora: bool = False,
                 init: str = "kaiming", **kwargs):
        check_lora_args(r, lora_alpha, lora_dropout, backend, lora_dtype, init)
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self.fan_in_fan_out = False  # the weight is (out, in) until the transpose below
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora, lora_dtype, backend, use_dora,
                        init)
        self.reset_parameters()
        if fan_in_fan_out:  # loralib's order (the same seed gives the same numbers)
            self.weight.data = self.weight.data.t().contiguous()
            self.fan_in_fan_out = True

    @classmethod
    def _can_wrap(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or _is_hf_conv1d(module)

    def _validate_wrapped(self, fan_in_fan_out: bool = False) -> None:
        if getattr(self.__dict__.get("_wrapped_class"), "__name__", "") == "Conv1D" and "nf" in self.__dict__:
            # transformers' Conv1D (GPT-2) is a linear layer storing its weight as (in, out).
            fan_in_fan_out = True
            self.in_features, self.out_features = self.weight.shape
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.quantized = quantized_base(self)
        if self.quantized is not None:
            if self.fan_in_fan_out:
                raise ValueError(f"a quantized base ({self.quantized.kind}) is stored (out, in): "
                                 f"fan_in_fan_out must be False")
            return  # the packed weight has its own layout
        expected = (self.in_features, self.out_features) if fan_in_fan_out else (self.out_features, self.in_features)
        if tuple(self.weight.shape) != expected:
            raise ValueError(
                f"weight has shape {tuple(self.weight.shape)}, expected {expected} "
                f"for in_features={self.in_features}, out_features={self.out_features}, "
                f"fan_in_fan_out={fan_in_fan_out}"
            )

    def _adapter_shapes(self):
        return (self.r, self.in_features), (self.out_features, self.r)

    #: Where the adapters add into the output (:class:`~lora_layers.segments.Segments`);
    #: None for one adapter over every output row.
    segments: Optional[Segments] = None
    #: The frozen quantized base (:class:`~lora_layers.quantized.QuantizedBase`), or None.
    quantized: Optional[QuantizedBase] = None

    def _base_dtype(self) -> torch.dtype:
        return self.weight.dtype if self.quantized is None else self.quantized.dtype

    def _merge_blocker(self) -> Optional[str]:
        if self.quantized is not None:
            return (f"its base weight is quantized ({self.quantized.kind}); a merge into packed weights cannot be "
                    f"exact, so it stays unmerged in eval() (merge_and_unload gives a plain layer with the "
                    f"dequantized weight plus the adapter)")
        return super()._merge_blocker()

    def merged_weight(self) -> Tensor:
        if self.quantized is None or not self.has_adapter:
            return super().merged_weight()
        return merged_copy(self.quantized.dequantize(), self._blocks(self._merge_factors()))

    def _delta_blocks(self, A, B, row_scale=None):
        """``s·B_j A_j`` per adapter in the weight's storage layout; with DoRA's ``row_scale``
        (``m / ‖W + s·BA‖`` per adapted row) the merged rows are ``row_scale ⊙ (W + s·BA)``."""
        segments = self.segments or Segments.full(self.out_features)
        for blk, delta in segments.deltas(A, B, self.scaling, accumulation_dtype(self._base_dtype())):
            rows = slice(blk.out0, blk.out1)
            scale = None if row_scale is None else row_scale[blk.b0:blk.b1]
            # The weight's storage layout: (out, in), or (in, out) with fan_in_fan_out.
            if self.fan_in_fan_out:
                yield ((slice(None), rows), delta.t()) + (() if scale is None else (scale[None, :],))
            else:
                yield ((rows, slice(None)), delta) + (() if scale is None else (scale[:, None],))

    def _merge_factors(self) -> tuple:
        factors = super()._merge_factors()
        if not self.use_dora:
            return factors
        norm = self._dora_norm().to(accumulation_dtype(self._base_dtype()))
        if self.lora_magnitude.shape != norm.shape:
            raise ValueError(f"cannot merge: lora_magnitude must have shape {tuple(norm.shape)} (one entry per "
                             f"adapted output row), got {tuple(self.lora_magnitude.shape)}")
        return factors + (dora_row_scale(self.lora_magnitude.detach().to(norm.dtype), norm),)

    def _dense_weight(self) -> Tensor:
        """The frozen base weight as a dense tensor in its storage layout: ``weight`` itself, or a
        dequantized copy over a quantized base (whose ``weight`` holds packed bytes)."""
        return self.weight if self.quantized is None else self.quantized.dequantize()

    def _dora_norm(self) -> Tensor:
        """``‖W + s·BA‖`` per adapted row (detached), from the weight as it is now.

        Nothing is cached: ``‖W‖²`` is one pass over W, cheap next to the step's GEMMs, and no
        cache key is safe (``weight.data`` writes keep ``_version``; a freed weight's address and
        version can come back with other values).
        """
        return dora_weight_norm(self._dense_weight(), self.lora_A, self.lora_B, self.scaling, self.segments,
                                fan_in_fan_out=self.fan_in_fan_out)

    @torch.no_grad()
    def _reset_magnitude(self) -> None:
        if self.use_dora and self.has_adapter:
            self.lora_magnitude.copy_(self._dora_norm())
            # A copy, not a flag: training, load_lora and .data writes all change the values, and
            # only a magnitude still equal to it may follow a newly loaded weight.
            self.__dict__[_DERIVED_MAGNITUDE] = self.lora_magnitude.detach().clone()

    def reset_magnitude(self) -> None:
        """Set DoRA's magnitude to ``‖W + s·BA‖`` per adapted row (PEFT's init) from the weight as
        it is now, so that the layer returns the base output plus the LoRA update.

        ``load_state_dict`` does this by itself when it replaces the weight without bringing a
        magnitude (and the magnitude was not trained or loaded since it was derived). Call it after
        changing the weight any other way: ``weight.data.copy_(...)``, assigning a new ``weight``
        Parameter, or a load through the module that :meth:`from_module` wrapped. A merged layer is unmerged, updated and merged again.
        Make such changes in train mode: a weight written into, or assigned to, a merged (eval-mode)
        layer is taken as a merged weight, as loralib takes it. A merged layer that can no longer
        merge (its weight was assigned or tied since) stays unmerged, as ``eval()`` leaves it.

        Raises:
            ValueError: the layer has no magnitude (``use_dora=False`` or ``r=0``); nothing changes.
        """
        if not (self.use_dora and self.has_adapter):
            raise ValueError(f"reset_magnitude: this {type(self).__name__} has no DoRA magnitude "
                             f"(use_dora={self.use_dora}, r={self.r}); expected a layer built with use_dora=True")
        was_merged = self.merged
        self.unmerge()  # the norm is that of the base weight, not of a merged one
        try:
            self._reset_magnitude()
        finally:
            if was_merged and self._merge_blocker() is None:  # else unmerged, as eval() leaves it
                self.merge()

    def _magnitude_is_derived(self) -> bool:
        """True while ``lora_magnitude`` holds the values :meth:`_reset_magnitude` last gave it
        (never for one derived on the meta device: it had no values)."""
        derived, m = self.__dict__.get(_DERIVED_MAGNITUDE), self.lora_magnitude.detach()
        return derived is not None and not derived.is_meta and derived.shape == m.shape \
            and torch.equal(derived.to(m.device, m.dtype), m)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        follow = self.use_dora and self.has_adapter and prefix + "weight" in state_dict \
            and prefix + MAGNITUDE_NAME not in state_dict
        if not follow:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        # Unmerged here rather than by ExactMerge, so that the merge after the load uses the new magnitude.
        was_merged, errors = self.merged, len(error_msgs)
        self.unmerge()
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            if len(error_msgs) == errors:
                self._follow_loaded_weight(prefix)
        finally:
            if was_merged and self._merge_blocker() is None:  # else unmerged, as eval() leaves it
                self.merge()

    def _follow_loaded_weight(self, prefix: str) -> None:
        if any(t.is_meta for t in (self.weight, self.lora_A, self.lora_B, self.lora_magnitude)):
            return  # no values to derive from or into (a meta-device model being materialised)
        if self._magnitude_is_derived():
            self._reset_magnitude()
            return
        warnings.warn(
            f"lora_layers: load_state_dict gave {type(self).__name__} '{prefix.rstrip('.') or '<root>'}' a new "
            f"weight without a lora_magnitude and kept lora_magnitude as it is, because it was trained, loaded or "
            f"set since it was derived from the old weight. Call reset_magnitude() on the layer to derive it "
            f"from the new weight instead (‖W + s·BA‖ per row).", UserWarning, stacklevel=4)

    def _weight_t(self) -> Tensor:
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: Tensor) -> Tensor:
        if not self.has_adapter or self.merged:
            if self.quantized is not None:
                y = self.quantized.linear(x).to(x.dtype)
                return y if self.bias is None else y + self.bias.to(y.dtype)
            return F.linear(x, self._weight_t(), self.bias)
        dora = self.use_dora
        return lora_linear(
            x, self.weight if self.quantized is None else self.quantized, self.bias, self.lora_A, self.lora_B,
            self.scaling,
            self.lora_dropout.p, self.training,
            fan_in_fan_out=self.fan_in_fan_out, segments=self.segments, backend=self.backend,
            row_scale=DoRAScale(self.lora_magnitude, self._dora_norm()) if dora else None,
        )

    @classmethod
    def from_module(cls, module: nn.Linear, r: int = 8, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    merge_weights: bool = True, *, fan_in_fan_out: bool = False, **kwargs) -> "Linear":
        """Wrap ``module`` (an ``nn.Linear``, or transformers' GPT-2 ``Conv1D``, which
        implies ``fan_in_fan_out=True``) sharing its Parameters; see :meth:`LoRALayer.from_module`."""
        return super().from_module(module, r, lora_alpha, lora_dropout, merge_weights,
                                   fan_in_fan_out=fan_in_fan_out, **kwargs)


# ----------------------------------------------------------------------------- MergedLinear

class MergedLinear(Linear):
    """One ``nn.Linear`` that holds several projections (fused qkv, ``[gate | up]``).

    The output rows are split into ``split_sizes`` (equal splits by default, as
    in loralib); ``enable_lora[j]`` says whether split ``j`` gets an adapter.
    Each enabled split has its own rank-``r`` adapter; they share one dropout.

    Args:
        enable_lora: one bool per split, e.g. ``[True, False, True]`` for q and v.
        split_sizes: output size of each split; must sum to ``out_features``.
            GQA qkv: ``[H·d, KV·d, KV·d]``; Phi-3 gate_up: ``[I, I]``.
        in_features, out_features, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, **kwargs:
            as :class:`Linear`.

    Attributes:
        lora_A: ``(r · n_enabled, in_features)``.
        lora_B: ``(Σ enabled split sizes, r)``; for equal splits this is loralib's shape.
        lora_magnitude: ``(Σ enabled split sizes,)`` with ``use_dora``: only the adapted
            rows are rescaled, the rows of disabled splits stay exactly the base's.

    The forward computes ``u = dropout(x) Aᵀ`` once and adds ``u_j B_jᵀ`` into
    each enabled output slice in place: no full ``ΔW``, no zero padding.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                 fan_in_fan_out: bool = False, merge_weights: bool = True,
                 split_sizes: Optional[Sequence[int]] = None, **kwargs):
        # use_dora, init, use_rslora, lora_dtype, backend and nn.Linear's kwargs go through **kwargs.
        self._set_splits(out_features, enable_lora, split_sizes)
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, fan_in_fan_out,
                         merge_weights, **kwargs)

    def _set_splits(self, out_features, enable_lora, split_sizes) -> None:
        if isinstance(enable_lora, (bool, str)) or not isinstance(enable_lora, Sequence) or not enable_lora \
                or not all(isinstance(e, (bool,)) or e in (0, 1) for e in enable_lora):
            raise ValueError(f"enable_lora must be a non-empty sequence of bools, got {enable_lora!r}")
        enable = [bool(e) for e in enable_lora]
        if split_sizes is None:
            if out_features % len(enable):
                raise ValueError(
                    f"out_features={out_features} is not divisible into len(enable_lora)={len(enable)} "
                    f"equal splits; pass split_sizes"
                )
            sizes = [out_features // len(enable)] * len(enable)
        else:
            if isinstance(split_sizes, (str, bytes)) or not isinstance(split_sizes, Sequence) or not all(
                    isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in split_sizes):
                raise ValueError(f"split_sizes must be a sequence of positive integers, got {split_sizes!r}")
            sizes = [int(s) for s in split_sizes]
            if len(sizes) != len(enable):
                raise ValueError(
                    f"len(enable_lora)={len(enable)} must equal len(split_sizes)={len(sizes)} "
                    f"(enable_lora={enable_lora!r}, split_sizes={split_sizes!r})"
                )
            if sum(sizes) != out_features:
                raise ValueError(
                    f"split_sizes must sum to out_features={out_features}, got {sizes} (sum {sum(sizes)})"
                )
        self.enable_lora = enable
        self.split_sizes = sizes
        self.segments = Segments.from_splits(sizes, enable) if any(enable) else None

    def _validate_wrapped(self, fan_in_fan_out: bool = False, enable_lora: Sequence[bool] = (False,),
                          split_sizes: Optional[Sequence[int]] = None) -> None:
        super()._validate_wrapped(fan_in_fan_out)
        self._set_splits(self.out_features, enable_lora, split_sizes)

    @classmethod
    def from_module(cls, module: nn.Linear, r: int = 8, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    merge_weights: bool = True, *, enable_lora: Sequence[bool],
                    split_sizes: Optional[Sequence[int]] = None, fan_in_fan_out: bool = False,
                    **kwargs) -> "MergedLinear":
        """Wrap a fused ``nn.Linear`` sharing its Parameters, e.g. a qkv projection.

        ``enable_lora`` has no default here: the constructor's loralib default
        ``(False,)`` would silently give a layer without adapters.
        """
        return super().from_module(module, r, lora_alpha, lora_dropout, merge_weights,
                                   fan_in_fan_out=fan_in_fan_out, enable_lora=enable_lora,
                                   split_sizes=split_sizes, **kwargs)

    def _adapter_shapes(self):
        if self.segments is None:
            return None  # nothing enabled: a plain layer
        return (self.r * self.segments.count, self.in_features), (self.segments.b_rows, self.r)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, enable_lora={self.enable_lora}, split_sizes={self.split_sizes}"

    # -- loralib's helpers, for code written against loralib.MergedLinear (the forward uses neither) --
    @property
    def lora_ind(self) -> Tensor:
        """loralib's mask of the output rows that carry an adapter: ``(out_features,)`` bool."""
        enabled = torch.tensor([on for size, on in zip(self.split_sizes, self.enable_lora) for _ in range(size)])
        return enabled.to(self.weight.device)

    def zero_pad(self, x: Tensor) -> Tensor:
        """loralib's: the adapted rows ``x`` (``(Σ enabled split sizes, *)``) placed in ``out_features``
        rows, zeros elsewhere."""
        result = x.new_zeros((self.out_features, *x.shape[1:]))
        result[self.lora_ind] = x
        return result

    def merge_AB(self) -> Tensor:
        """loralib's: ``B_j A_j`` of every enabled split, zero-padded to the weight's shape and in its
        storage layout (transposed with ``fan_in_fan_out``), without ``scaling``. Differentiable."""
        sizes = [size for size, on in zip(self.split_sizes, self.enable_lora) if on]
        delta = torch.cat([b @ a for a, b in zip(self.lora_A.split(self.r), self.lora_B.split(sizes))])
        delta = self.zero_pad(delta)
        return delta.t() if self.fan_in_fan_out else delta


# ----------------------------------------------------------------------------- Embedding

class Embedding(LoRALayer, nn.Embedding):
    """``nn.Embedding`` with a LoRA adapter: ``y = W[x] + scaling · Aᵀ[x] Bᵀ``.

    Args:
        num_embeddings, embedding_dim, **kwargs: as ``nn.Embedding``.
        r, lora_alpha, merge_weights, use_rslora, lora_dtype: as :class:`Linear` (no dropout, as in loralib).

    Attributes:
        lora_A: ``(r, num_embeddings)``, zero init.
        lora_B: ``(embedding_dim, r)``, normal init.

    Unlike loralib, ``max_norm`` is not applied to the adapter lookup (it would
    renormalise ``lora_A`` in place).
    """

    _base_type = nn.Embedding

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, *, use_rslora: bool = False, lora_dtype=None, init: str = "kaiming",
                 use_dora: bool = False, **kwargs):
        check_lora_args(r, lora_alpha, lora_dtype=lora_dtype, init=init)
        check_dora(self, use_dora, r > 0)  # a clear TypeError: DoRA is Linear's
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._init_lora(r, lora_alpha, 0.0, merge_weights, use_rslora, lora_dtype, init=init)
        self.reset_parameters()

    @classmethod
    def from_module(cls, module: nn.Embedding, r: int = 8, lora_alpha: float = 1,
                    merge_weights: bool = True, **kwargs) -> "Embedding":
        """Wrap ``module`` (an ``nn.Embedding``) sharing its weight; see :meth:`LoRALayer.from_module`."""
        return super().from_module(module, r, lora_alpha, 0.0, merge_weights, **kwargs)

    def _adapter_shapes(self):
        return (self.r, self.num_embeddings), (self.embedding_dim, self.r)

    def reset_lora_parameters(self) -> None:
        """loralib's init: A zero, B ~ N(0, 1). PEFT's ``init_lora_weights="gaussian"`` leaves an
        embedding adapter the same way, so ``init="gaussian"`` does too."""
        if self.has_adapter:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _delta_blocks(self, A, B):
        acc = accumulation_dtype(self.weight.dtype)
        yield (slice(None), slice(None)), (B.to(acc) @ A.to(acc)).t().mul_(self.scaling)

    def _merge_blocker(self) -> Optional[str]:
        shared = super()._merge_blocker()
        if shared is not None:
            return shared
        if self.max_norm is not None:
            # nn.Embedding renormalises looked-up rows of the weight in place,
            # which would change a merged weight irreversibly.
            return f"max_norm={self.max_norm} renormalises the weight in place (it stays unmerged in eval())"
        return None

    def forward(self, x: Tensor) -> Tensor:
        if not self.has_adapter or self.merged:
            return nn.Embedding.forward(self, x)
        return lora_embedding(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.padding_idx,
                              self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)


# ----------------------------------------------------------------------------- Conv

_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_PARAMS = ("weight", "bias")
# A plain conv's own attributes (in_channels, kernel_size, stride, padding, ...), not nn.Module's.
_CONV_ATTRS = _base_attribute_names(nn.Conv2d) - frozenset(nn.Module().__dict__)


class _ConvParameters(MutableMapping):
    """The ``weight`` and ``bias`` entries of a layer's ``_parameters``, as a ``_parameters`` of
    their own: a view's reads, registrations and deletions act on the layer's dict."""

    def __init__(self, params: dict):
        self.params = params

    def _check(self, name):
        if name not in _CONV_PARAMS:
            raise KeyError(f"{name!r}: loralib's .conv holds only {_CONV_PARAMS}")

    def __getitem__(self, name):
        self._check(name)
        return self.params[name]

    def __setitem__(self, name, value):
        self._check(name)
        self.params[name] = value

    def __delitem__(self, name):
        self._check(name)
        del self.params[name]

    def __iter__(self):
        return (name for name in _CONV_PARAMS if name in self.params)

    def __len__(self):
        return sum(name in self.params for name in _CONV_PARAMS)


class _ConvView:
    """What ``layer.conv`` returns: the layer seen as the plain torch conv loralib wraps.

    Its ``weight``, ``bias`` and geometry (``kernel_size``, ``stride``, ``padding``, ...)
    are the layer's, for reading and writing; calling it runs the base conv alone.
    It is built on each access and never registered, so the layer's ``state_dict``
    keys and ``named_modules()`` stay those of a plain conv with an adapter.
    """

    @classmethod
    def of(cls, layer: nn.Module) -> nn.Module:
        view = cls.__new__(cls)
        nn.Module.__init__(view)
        view.__dict__.update(_parameters=_ConvParameters(layer._parameters), _layer=layer, training=layer.training)
        return view

    def __getattr__(self, name):
        if name in _CONV_ATTRS:
            return getattr(self.__dict__["_layer"], name)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in _CONV_ATTRS or name in _CONV_PARAMS:
            setattr(self.__dict__["_layer"], name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return nn.modules.conv._ConvNd.extra_repr(self.__dict__["_layer"])  # it formats from __dict__


class _Conv1dView(_ConvView, nn.Conv1d):
    pass


class _Conv2dView(_ConvView, nn.Conv2d):
    pass


class _Conv3dView(_ConvView, nn.Conv3d):
    pass


_CONV_VIEWS = {nn.Conv1d: _Conv1dView, nn.Conv2d: _Conv2dView, nn.Conv3d: _Conv3dView}

#: Conv adapter layouts, both ``ΔW = scaling · (B A).view(weight.shape)``: lora_layers' rank ``r``
#: (A ``(r, in/groups·∏k)``, B ``(out, r)``) and loralib 0.1.2's rank ``r·k``
#: (A ``(r·k, in·k)``, B ``(out/groups·k, r·k)``, no dropout).
CONV_LAYOUTS = ("lora_layers", "loralib")


def _check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in CONV_LAYOUTS:
        raise ValueError(f"layout must be one of {CONV_LAYOUTS}, got {layout!r}")
    return layout


class _ConvNd(LoRALayer):
    """Shared LoRA logic for :class:`Conv1d`, :class:`Conv2d` and :class:`Conv3d`.

    ``ΔW = B A`` reshaped to the weight's shape ``(out, in/groups, *kernel)``,
    with ``A (r, in/groups · ∏kernel)`` and ``B (out, r)``: rank ``r``
    whatever the kernel (loralib uses ``r · k`` and only square 2-D kernels).
    The signature is loralib's: ``(in_channels, out_channels, kernel_size,
    r=0, lora_alpha=1, lora_dropout=0., merge_weights=True, **kwargs)``; the
    kwargs (stride, padding, dilation, groups, bias, padding_mode, device,
    dtype) go to the torch convolution.

    ``layout="loralib"`` gives loralib 0.1.2's adapter instead: ``A (r·k, in·k)``,
    ``B (out/groups·k, r·k)``, the same ``(B A).view(weight.shape)``, and no
    dropout, so loralib's checkpoints load and give loralib's outputs. It needs
    a square kernel, and kernel 1 for Conv1d/Conv3d (where loralib's own layer
    fails). A fresh layer (``lora_B`` still zero) that loads a loralib-shaped
    adapter switches to this layout by itself, with a one-time warning.
    """

    layout = "lora_layers"  # also the value for layers pickled before layouts existed

    def __init__(self, in_channels: int, out_channels: int, kernel_size, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, merge_weights: bool = True, *, use_rslora: bool = False,
                 lora_dtype=None, backend: str = "auto", init: str = "kaiming", use_dora: bool = False,
                 layout: str = "lora_layers", **kwargs):
        check_lora_args(r, lora_alpha, lora_dropout, backend, lora_dtype, init)
        check_dora(self, use_dora, r > 0)  # a clear TypeError: DoRA is Linear's
        _check_layout(layout)
        dims = _CONV_DIMS[self._base_type]
        if isinstance(kernel_size, Sequence) and len(kernel_size) != dims:
            raise ValueError(f"kernel_size must be an int or {dims} ints for {self._base_type.__name__}, "
                             f"got {kernel_size!r}")
        self._base_type.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._validate_wrapped(layout)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora, lora_dtype, backend, init=init)
        self.reset_parameters()

    def _validate_wrapped(self, layout: str = "lora_layers") -> None:
        k = tuple(self.kernel_size)
        if tuple(self.weight.shape[2:]) != k:
            raise ValueError(
                f"kernel_size={k} does not match the weight's spatial shape {tuple(self.weight.shape[2:])}"
            )
        if getattr(self, "transposed", False):
            raise TypeError("transposed convolutions are not supported")
        if _check_layout(layout) == "loralib" and (problem := self._loralib_layout_problem()):
            raise ValueError(f"layout='loralib' {problem}")
        self.layout = layout

    def _init_lora(self, r, lora_alpha, lora_dropout, *args, **kwargs) -> None:
        super()._init_lora(r, lora_alpha, lora_dropout, *args, **kwargs)
        if self.layout == "loralib" and self.lora_dropout.p > 0:
            warnings.warn(f"{type(self).__name__}(layout='loralib'): lora_dropout={self.lora_dropout.p} is not "
                          f"applied, as in loralib 0.1.2, whose conv layers never apply it (the default "
                          f"layout='lora_layers' does)", UserWarning, stacklevel=3)

    def _loralib_layout_problem(self) -> Optional[str]:
        """Why loralib's ``(r·k, in·k)``/``(out/groups·k, r·k)`` adapter cannot be this layer's, or None."""
        k, name = tuple(self.kernel_size), type(self).__name__
        if len(set(k)) != 1:
            return f"needs a square kernel (loralib takes an int kernel_size), got kernel_size={k}"
        if k[0] != 1 and len(k) != 2:
            return (f"fits {name} only with kernel_size 1, got kernel_size={k}: loralib's B A has "
                    f"in·out·k²/groups elements, the weight in·out·k^{len(k)}/groups (loralib's own {name} "
                    f"fails in forward)")
        return None

    def _adapter_shapes(self, layout: Optional[str] = None):
        if (layout or self.layout) == "loralib":
            k = self.kernel_size[0]
            return (self.r * k, self.in_channels * k), (self.out_channels // self.groups * k, self.r * k)
        fan_in = self.weight.shape[1] * math.prod(self.kernel_size)
        return (self.r, fan_in), (self.out_channels, self.r)

    def _switches_layout_for(self, shapes) -> bool:
        """True when loading an adapter of ``shapes`` (lora_A's, lora_B's) switches this layer to
        loralib's layout: they are loralib's shapes, and this layer's adapter is fresh (``lora_B``
        zero, so nothing trained is thrown away)."""
        B = getattr(self, "lora_B", None)
        return (self.layout == "lora_layers" and self.has_adapter and isinstance(B, nn.Parameter)
                and self._loralib_layout_problem() is None and shapes == self._adapter_shapes("loralib")
                and shapes != self._adapter_shapes() and (B.is_meta or not B.detach().any()))

    @torch.no_grad()
    def _use_loralib_layout(self) -> None:
        """Switch to loralib's layout. The adapter Parameters stay the same objects (an optimizer
        built before still holds them), zero until the loaded values are copied in."""
        shapes = self._adapter_shapes("loralib")
        for name, shape in zip(ADAPTER_NAMES, shapes):
            param = getattr(self, name)
            param.data, param.grad = param.new_zeros(shape), None
        self.layout = "loralib"
        warn_conv_layout_switch(type(self).__name__, shapes, self.lora_dropout.p)

    def _layout_hint(self, shapes) -> Optional[str]:
        """For a shape error: how a layout explains adapter ``shapes`` that do not fit, or None."""
        name, current = type(self).__name__, self._adapter_shapes()
        got = f"lora_A {shapes[0]} and lora_B {shapes[1]}"
        if self.layout == "lora_layers" and shapes == self._adapter_shapes("loralib") != current:
            problem = self._loralib_layout_problem()
            if problem:
                return (f"{got} are loralib's conv adapter shapes, which do not fit this {name}: loralib's "
                        f"layout {problem}; only the base weights of that checkpoint can be loaded")
            return (f"{got} are loralib's conv layout (rank r·k); this {name} has lora_A {current[0]} and "
                    f"lora_B {current[1]} and was not switched to it because its adapter is trained "
                    f"(lora_B is non-zero): build it with {name}(..., layout='loralib')")
        if self.layout == "loralib" and shapes == self._adapter_shapes("lora_layers") != current:
            return (f"{got} are lora_layers' conv layout (rank r); this {name} has layout='loralib': build it "
                    f"with layout='lora_layers' (the default)")
        return None

    def _delta_blocks(self, A, B):
        acc = accumulation_dtype(self.weight.dtype)
        yield (slice(None),), (B.to(acc) @ A.to(acc)).mul_(self.scaling).view(self.weight.shape)

    def forward(self, x: Tensor) -> Tensor:
        if not self.has_adapter or self.merged:
            return self._conv_forward(x, self.weight, self.bias)
        # loralib's conv never applies its dropout: its layout does the same, to give its outputs.
        p = 0.0 if self.layout == "loralib" else self.lora_dropout.p
        return lora_conv(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self._conv_forward,
                         p, self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", layout='loralib'" if self.layout == "loralib" else "")

    @property
    def conv(self) -> nn.Module:
        """loralib's ``.conv``: this layer as a plain ``nn.Conv{1,2,3}d`` without the adapter.

        ``layer.conv.weight`` *is* ``layer.weight`` (so ``layer.conv.weight.data.copy_(w)``
        and ``layer.conv.weight = nn.Parameter(w)`` change the layer), likewise ``bias``,
        ``kernel_size``, ``stride``, ``padding`` and the other conv attributes;
        ``layer.conv(x)`` is the base convolution alone (with the merged weight while merged,
        as loralib's). It is not a submodule: the state_dict keys stay ``weight``/``bias``.
        """
        return _CONV_VIEWS[self._base_type].of(self)

    def __setattr__(self, name, value):
        if name == "conv":
            raise TypeError(
                f"{type(self).__name__}.conv cannot be replaced: this layer is its own conv (loralib wraps one). "
                f"Copy the tensors instead (layer.conv.load_state_dict(conv.state_dict())), or wrap the conv "
                f"itself with {type(self).__name__}.from_module(conv, r=...)")
        super().__setattr__(name, value)

    @staticmethod
    def _rename_loralib_keys(state_dict, prefix: str) -> None:
        """loralib 0.1.2 stores the wrapped conv under ``conv.``: rename its base keys
        (``<prefix>conv.weight``, ``<prefix>conv.bias``) to this layer's, in place."""
        for name in ("weight", "bias"):
            old = prefix + "conv." + name
            if old in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = state_dict.pop(old)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._rename_loralib_keys(state_dict, prefix)
        shapes = tuple(tuple(state_dict[prefix + n].shape) if isinstance(state_dict.get(prefix + n), Tensor)
                       else None for n in ADAPTER_NAMES)
        if self._switches_layout_for(shapes):
            self._use_loralib_layout()
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        hint = self._layout_hint(shapes) if len(error_msgs) > errors and None not in shapes else None
        if hint:
            error_msgs.append(f"{prefix.rstrip('.') or type(self).__name__}: {hint}")


class Conv1d(_ConvNd, nn.Conv1d):
    """``nn.Conv1d`` with a rank-``r`` LoRA adapter (loralib's ``Conv1d`` crashes for kernel > 1).

    Attributes:
        lora_A: ``(r, in_channels/groups · kernel_size)``, kaiming-uniform init.
        lora_B: ``(out_channels, r)``, zero init.
            (``layout="loralib"``, kernel 1 only: ``(r, in_channels)`` and ``(out_channels/groups, r)``.)
        conv, layout: as :class:`Conv2d`.
    """

    _base_type = nn.Conv1d


class Conv2d(_ConvNd, nn.Conv2d):
    """``nn.Conv2d`` with a rank-``r`` LoRA adapter; tuple kernels and groups supported.

    Attributes:
        lora_A: ``(r, in_channels/groups · kh · kw)``, kaiming-uniform init.
        lora_B: ``(out_channels, r)``, zero init.
            (``layout="loralib"``, square kernel ``k``: ``(r·k, in_channels·k)`` and
            ``(out_channels/groups·k, r·k)``, as loralib.)
        conv: loralib's wrapped conv, a view of this layer (same ``weight``/``bias``, base conv only).

    Args:
        layout: ``"lora_layers"`` (the default, rank ``r``) or ``"loralib"``: loralib 0.1.2's
            rank-``r·k`` adapter and forward (no dropout), so its checkpoints load and give its
            outputs. A fresh layer (``lora_B`` zero) that loads a loralib-shaped adapter switches
            to ``"loralib"`` by itself and warns once per process.
    """

    _base_type = nn.Conv2d


class Conv3d(_ConvNd, nn.Conv3d):
    """``nn.Conv3d`` with a rank-``r`` LoRA adapter (loralib's ``Conv3d`` crashes for kernel > 1).

    Attributes:
        lora_A: ``(r, in_channels/groups · kd · kh · kw)``, kaiming-uniform init.
        lora_B: ``(out_channels, r)``, zero init.
            (``layout="loralib"``, kernel 1 only: ``(r, in_channels)`` and ``(out_channels/groups, r)``.)
        conv, layout: as :class:`Conv2d`.
    """

    _base_type = nn.Conv3d
