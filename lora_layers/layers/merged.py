"""``MergedLinear``: one ``nn.Linear`` holding several projections (fused qkv, ``[gate | up]``), each
split with its own adapter or none."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..core.segments import Segments
from ..core.spec import NOT_GIVEN, LoRASpec
from .linear import Linear

__all__ = ["MergedLinear"]


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
        # use_dora, dora_mode, init, use_rslora, lora_dtype, backend and nn.Linear's kwargs go through **kwargs.
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
    def from_module(cls, module: nn.Linear, r: int = NOT_GIVEN, lora_alpha: float = NOT_GIVEN,
                    lora_dropout: float = NOT_GIVEN, merge_weights: bool = NOT_GIVEN, *,
                    spec: Optional[LoRASpec] = None, enable_lora: Sequence[bool],
                    split_sizes: Optional[Sequence[int]] = None, fan_in_fan_out: bool = False,
                    **kwargs) -> "MergedLinear":
        """Wrap a fused ``nn.Linear`` sharing its Parameters, e.g. a qkv projection.

        ``enable_lora`` has no default here: the constructor's loralib default
        ``(False,)`` would silently give a layer without adapters.
        """
        return super().from_module(module, r, lora_alpha, lora_dropout, merge_weights, spec=spec,
                                   fan_in_fan_out=fan_in_fan_out, enable_lora=enable_lora,
                                   split_sizes=split_sizes, **kwargs)

    def _adapter_shapes(self, r: Optional[int] = None):
        if self.segments is None:
            return None  # nothing enabled: a plain layer
        r = self.r if r is None else r
        return (r * self.segments.count, self.in_features), (self.segments.b_rows, r)

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
