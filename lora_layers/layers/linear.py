"""``Linear``: ``nn.Linear`` (and transformers' GPT-2 ``Conv1D``) with a LoRA adapter, DoRA and
quantized bases included. See :mod:`lora_layers.layers` for what every layer shares."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..bases.quantized import QuantizedBase, quantized_base
from ..core.functional import lora_linear
from ..core.merging import accumulation_dtype, merged_copy
from ..core.segments import Segments
from ..core.sharded import check_not_unsharded, gathered, write_shard
from ..core.spec import NOT_GIVEN, LoRASpec
from ..variants.dora import DoRAScale, dora_row_scale, dora_weight_norm
from .base import MAGNITUDE_NAME, LoRALayer

__all__ = ["Linear", "is_hf_conv1d"]

_DERIVED_MAGNITUDE = "_derived_magnitude"  # the magnitude as last derived from the weight (not state)


def is_hf_conv1d(module: nn.Module, cls: Optional[type] = None) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2): a linear layer that stores its weight ``(in, out)``.

    ``cls`` is the class to judge ``module`` by (a LoRA layer's wrapped class; default ``type(module)``).
    Duck-typed so that transformers is never imported: the class is named ``Conv1D``, the module has
    ``nf`` and a 2-D weight.
    """
    weight = getattr(module, "weight", None)
    return (cls or type(module)).__name__ == "Conv1D" and hasattr(module, "nf") and weight is not None \
        and weight.dim() == 2


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
        dora_mode: DoRA's backward: ``"lean"`` (the default) recomputes ``x Wᵀ`` for the
            magnitude's gradient, ``"fast"`` keeps ``x Wᵀ + s·dropout(x) Aᵀ Bᵀ`` from the forward
            (one ``T × out`` tensor, one GEMM less). The same outputs and gradients up to rounding;
            needs ``use_dora=True``. Not saved in checkpoints (it does not change the math).
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
                 init: str = "kaiming", dora_mode: str = "lean", **kwargs):
        spec = LoRASpec(r, lora_alpha, lora_dropout, merge_weights, use_rslora, lora_dtype, backend, use_dora, init,
                        dora_mode)
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self.fan_in_fan_out = False  # the weight is (out, in) until the transpose below
        self._init_lora(spec)
        self.reset_parameters()
        if fan_in_fan_out:  # loralib's order (the same seed gives the same numbers)
            self.weight.data = self.weight.data.t().contiguous()
            self.fan_in_fan_out = True

    @classmethod
    def _can_wrap(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_hf_conv1d(module)

    def _validate_wrapped(self, fan_in_fan_out: bool = False) -> None:
        if is_hf_conv1d(self, self.__dict__.get("_wrapped_class")):
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
        # Inside forward FSDP2 has gathered the parameters (plain tensors); outside it they are DTensors,
        # gathered here (a collective), so that the norm is always that of the whole weight.
        return dora_weight_norm(gathered(self._dense_weight()), gathered(self.lora_A), gathered(self.lora_B),
                                self.scaling, self.segments, fan_in_fan_out=self.fan_in_fan_out)

    @torch.no_grad()
    def _reset_magnitude(self) -> None:
        if self.use_dora and self.has_adapter:
            check_not_unsharded(self, self.lora_magnitude, "reset_magnitude")
            write_shard(self.lora_magnitude, self._dora_norm())
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
            row_scale=DoRAScale(self.lora_magnitude, self._dora_norm(), getattr(self, "dora_mode", "lean"))
            if dora else None,
        )

    @classmethod
    def from_module(cls, module: nn.Linear, r: int = NOT_GIVEN, lora_alpha: float = NOT_GIVEN,
                    lora_dropout: float = NOT_GIVEN, merge_weights: bool = NOT_GIVEN, *,
                    spec: Optional[LoRASpec] = None, fan_in_fan_out: bool = False, **kwargs) -> "Linear":
        """Wrap ``module`` (an ``nn.Linear``, or transformers' GPT-2 ``Conv1D``, which
        implies ``fan_in_fan_out=True``) sharing its Parameters; see :meth:`LoRALayer.from_module`."""
        return super().from_module(module, r, lora_alpha, lora_dropout, merge_weights, spec=spec,
                                   fan_in_fan_out=fan_in_fan_out, **kwargs)
