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
from ..core.mixed import MixedAdapter, lora_linear_mixed, token_adapters
from ..core.segments import Segments
from ..core.sharded import check_not_unsharded, gathered, is_sharded, write_shard
from ..core.spec import NOT_GIVEN, LoRASpec
from ..variants.dora import DoRAScale, dora_row_scale, dora_weight_norm
from ..variants.pissa import INITIAL_NAMES, check_residual_rank, residual_init
from .adapters import ADAPTERS_ATTR, DEFAULT_ADAPTER, named_adapters
from .base import MAGNITUDE_NAME, LoRALayer
from .merge_state import unmerged
from .ties import SHARED_ATTR

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

    def _adapter_shapes(self, r: Optional[int] = None):
        r = self.r if r is None else r
        return (r, self.in_features), (self.out_features, r)

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
        if self.quantized is None:
            return super().merged_weight()
        if not self._uses_adapter():  # no adapter active (r=0, or a named one this layer lacks): the base, dense
            return self.quantized.dequantize()  # (a clone of the packed weight is torchao's re-quantization)
        return merged_copy(self.quantized.dequantize(), self._active_blocks())

    def _delta_blocks(self, A, B, row_scale=None, *, scaling=None):
        """``s·B_j A_j`` per adapter in the weight's storage layout (``s``: ``scaling``, default the
        layer's); with DoRA's ``row_scale`` (``m / ‖W + s·BA‖`` per adapted row) the merged rows are
        ``row_scale ⊙ (W + s·BA)``."""
        segments = self.segments or Segments.full(self.out_features)
        scaling = self.scaling if scaling is None else scaling
        for blk, delta in segments.deltas(A, B, scaling, accumulation_dtype(self._base_dtype())):
            rows = slice(blk.out0, blk.out1)
            scale = None if row_scale is None else row_scale[blk.b0:blk.b1]
            # The weight's storage layout: (out, in), or (in, out) with fan_in_fan_out.
            if self.fan_in_fan_out:
                yield ((slice(None), rows), delta.t()) + (() if scale is None else (scale[None, :],))
            else:
                yield ((rows, slice(None)), delta) + (() if scale is None else (scale[:, None],))

    def _merge_factors(self) -> tuple:
        factors = super()._merge_factors()
        view = self._active_view()
        if not view.use_dora:
            return factors
        norm = self._dora_norm(view).to(accumulation_dtype(self._base_dtype()))
        if view.lora_magnitude.shape != norm.shape:
            raise ValueError(f"cannot merge: lora_magnitude must have shape {tuple(norm.shape)} (one entry per "
                             f"adapted output row), got {tuple(view.lora_magnitude.shape)}")
        return factors + (dora_row_scale(view.lora_magnitude.detach().to(norm.dtype), norm),)

    def _dense_weight(self) -> Tensor:
        """The frozen base weight as a dense tensor in its storage layout: ``weight`` itself, or a
        dequantized copy over a quantized base (whose ``weight`` holds packed bytes)."""
        return self.weight if self.quantized is None else self.quantized.dequantize()

    def _dora_norm(self, view=None) -> Tensor:
        """``‖W + s·BA‖`` per adapted row (detached), from the weight as it is now, for the adapter
        ``view`` (an :class:`~lora_layers.layers.adapters.AdapterView`; default the active one).

        Nothing is cached: ``‖W‖²`` is one pass over W, cheap next to the step's GEMMs, and no
        cache key is safe (``weight.data`` writes keep ``_version``; a freed weight's address and
        version can come back with other values).
        """
        # Inside forward FSDP2 has gathered the parameters (plain tensors); outside it they are DTensors,
        # gathered here (a collective), so that the norm is always that of the whole weight.
        view = self._active_view() if view is None else view
        return dora_weight_norm(gathered(self._dense_weight()), gathered(view.lora_A), gathered(view.lora_B),
                                view.scaling, self.segments, fan_in_fan_out=self.fan_in_fan_out)

    @torch.no_grad()
    def _reset_magnitude(self) -> None:
        if self.use_dora and self.has_adapter:
            self._derive_magnitude(self, self.adapter(DEFAULT_ADAPTER))

    def _dora_holders(self):
        """``[(holder, view)]`` of every DoRA adapter: the layer for the default one, each named
        :class:`~lora_layers.layers.adapters.Adapter` for the others (each holds its own magnitude)."""
        own = [(self, self.adapter(DEFAULT_ADAPTER))] if self.use_dora and self.has_adapter else []
        return own + [(a, self.adapter(n)) for n, a in named_adapters(self).items() if a.use_dora]

    @torch.no_grad()
    def _derive_magnitude(self, holder, view) -> None:
        check_not_unsharded(self, holder.lora_magnitude, "reset_magnitude")
        write_shard(holder.lora_magnitude, self._dora_norm(view))
        # A copy, not a flag: training, load_lora and .data writes all change the values, and
        # only a magnitude still equal to it may follow a newly loaded weight.
        holder.__dict__[_DERIVED_MAGNITUDE] = holder.lora_magnitude.detach().clone()

    def reset_magnitude(self) -> None:
        """Set DoRA's magnitude to ``‖W + s·BA‖`` per adapted row (PEFT's init) from the weight as
        it is now, so that the layer returns the base output plus the LoRA update; every DoRA adapter's,
        the named ones' (:meth:`add_adapter`) included, each with its own ``A``, ``B`` and scale.

        ``load_state_dict`` does this by itself, per adapter, when it replaces the weight without bringing
        that adapter's magnitude (and the magnitude was not trained or loaded since it was derived). Call it after
        changing the weight any other way: ``weight.data.copy_(...)``, assigning a new ``weight``
        Parameter, or a load through the module that :meth:`from_module` wrapped. A merged layer is unmerged, updated and merged again.
        Make such changes in train mode: a weight written into, or assigned to, a merged (eval-mode)
        layer is taken as a merged weight, as loralib takes it. A merged layer that can no longer
        merge (its weight was assigned or tied since) stays unmerged, as ``eval()`` leaves it.

        Raises:
            ValueError: the layer has no magnitude (``use_dora=False`` or ``r=0``); nothing changes.
        """
        holders = self._dora_holders()
        if not holders:
            raise ValueError(f"reset_magnitude: this {type(self).__name__} has no DoRA magnitude "
                             f"(use_dora={self.use_dora}, r={self.r}); expected a layer built with use_dora=True")
        was_merged = self.merged
        self.unmerge()  # the norm is that of the base weight, not of a merged one
        try:
            for holder, view in holders:
                self._derive_magnitude(holder, view)
        finally:
            if was_merged and self._merge_blocker() is None:  # else unmerged, as eval() leaves it
                self.merge()

    def _magnitude_is_derived(self, holder=None) -> bool:
        """True while ``holder``'s (default: the layer's) ``lora_magnitude`` holds the values it was last
        derived to (never for one derived on the meta device: it had no values)."""
        holder = self if holder is None else holder
        derived, m = holder.__dict__.get(_DERIVED_MAGNITUDE), holder.lora_magnitude.detach()
        return derived is not None and not derived.is_meta and derived.shape == m.shape \
            and torch.equal(derived.to(m.device, m.dtype), m)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        args = (state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        initial = self._initial_adapter()
        if initial[0] is None or prefix + "weight" in state_dict \
                or not any(prefix + name in state_dict for name in INITIAL_NAMES):
            return self._load_with_magnitude(*args)
        # PiSSA/OLoRA's A₀, B₀ loaded without the weight (lora_state_dict): the residual base moves with
        # them, as load_lora moves it (a weight loaded with them is their residual already).
        try:
            self._checked_initial_adapter(*(state_dict.get(prefix + name) for name in INITIAL_NAMES))
        except ValueError as exc:
            error_msgs.append(f"{prefix}lora_init_A/B: {exc} (this layer was left unchanged)")
            return None
        old = tuple(t.detach().clone() for t in initial)
        with unmerged(self):
            self._load_with_magnitude(*args)
            new = self._initial_adapter()
            # Even when another key failed (load_state_dict raises after copying the rest): A₀, B₀ copied
            # without the residual moving would leave weight + s·B₀A₀ no longer the original weight.
            if not self.weight.is_meta and not all(torch.equal(o, n) for o, n in zip(old, new)):
                self._move_residual(old, new)

    def _load_with_magnitude(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                             error_msgs):
        follow = [(holder, view) for holder, view in self._dora_holders() if prefix + "weight" in state_dict
                  and prefix + self._magnitude_key(view.name) not in state_dict]
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
                self._follow_loaded_weight(prefix, follow)
        finally:
            if was_merged and self._merge_blocker() is None:  # else unmerged, as eval() leaves it
                self.merge()

    @staticmethod
    def _magnitude_key(adapter: str) -> str:
        return MAGNITUDE_NAME if adapter == DEFAULT_ADAPTER else f"{ADAPTERS_ATTR}.{adapter}.{MAGNITUDE_NAME}"

    def _follow_loaded_weight(self, prefix: str, holders) -> None:
        """Each DoRA adapter of ``holders`` whose magnitude the load did not bring follows the new weight
        if it is still as derived (the default one and each named one alike); the others are kept, with a warning."""
        if any(t.is_meta for t in (self.weight, *(t for _, v in holders for t in (v.lora_A, v.lora_B,
                                                                                   v.lora_magnitude)))):
            return  # no values to derive from or into (a meta-device model being materialised)
        kept = []
        for holder, view in holders:
            if self._magnitude_is_derived(holder):
                self._derive_magnitude(holder, view)
            else:
                kept.append(prefix + self._magnitude_key(view.name))
        if kept:
            warnings.warn(
                f"lora_layers: load_state_dict gave {type(self).__name__} '{prefix.rstrip('.') or '<root>'}' a new "
                f"weight without a lora_magnitude and kept lora_magnitude as it is ({', '.join(kept)}), because it was "
                f"trained, loaded or set since it was derived from the old weight. Call reset_magnitude() on the "
                f"layer to derive every DoRA magnitude from the new weight instead (‖W + s·BA‖ per row).", UserWarning,
                stacklevel=4)

    # -- PiSSA / OLoRA (lora_layers.variants.pissa) ---------------------------------------------
    def _check_residual_init(self) -> None:
        """Refuse, before anything changes, what PiSSA/OLoRA cannot initialise exactly."""
        init = self.init
        if self.quantized is not None:
            raise ValueError(f"init={init!r} cannot go on a quantized base ({self.quantized.kind}): it rewrites "
                             f"the base weight as the residual W - s·B A, which would have to be requantized "
                             f"(a new quantization error in the frozen base, and a packed weight is never "
                             f"rewritten here); use init='kaiming' or 'gaussian' on a quantized base")
        if self.use_dora:
            raise ValueError(f"init={init!r} together with use_dora=True is not supported; use one of them")
        if is_sharded(self.weight):
            raise ValueError(f"init={init!r} needs the whole weight, and this one is sharded (a DTensor); "
                             f"initialise before fully_shard")
        for j, blk in enumerate((self.segments or Segments.full(self.out_features)).blocks(self.r)):
            what = "the weight" if self.segments is None else f"split {j} (output rows {blk.out0}:{blk.out1})"
            check_residual_rank(init, self.r, blk.out1 - blk.out0, self.in_features, what)

    def _init_blocks(self):
        """``(block, rows of W (out, in) as a view)`` per adapter: what PiSSA/OLoRA decompose."""
        W = self._weight_t().detach()
        for blk in (self.segments or Segments.full(self.out_features)).blocks(self.r):
            yield blk, W[blk.out0:blk.out1]

    @torch.no_grad()
    def _reset_residual(self) -> None:
        """PiSSA/OLoRA: A and B from each adapted block of the weight as it is now (per split of a
        MergedLinear), the block becoming ``W − s·B A``; ``A₀``, ``B₀`` kept as buffers."""
        if self.merged:
            raise ValueError(f"cannot initialise init={self.init!r} on a merged {type(self).__name__} (eval "
                             f"mode): it rewrites the base weight; call train() first")
        self._check_residual_init()
        shared = self.__dict__.get(SHARED_ATTR)  # known by now: from_module checks the weight it adopts first
        if shared:
            raise ValueError(f"init={self.init!r} rewrites the base weight in place as the residual W - s·B A, and "
                             f"{shared}: that module would silently hold the residual too; untie the weights, or "
                             f"use init='kaiming' or 'gaussian' on this layer")
        if not any(t.is_meta for t in (self.weight, self.lora_A, self.lora_B)):  # meta: no values to decompose
            for blk, rows in self._init_blocks():
                A, B, residual = residual_init(rows, self.r, self.scaling, self.init, self.lora_A.dtype)
                self.lora_A[blk.a0:blk.a1] = A
                self.lora_B[blk.b0:blk.b1] = B
                rows.copy_(residual)
        for name, factor in zip(INITIAL_NAMES, (self.lora_A, self.lora_B)):
            self.register_buffer(name, factor.detach().clone())

    @torch.no_grad()
    def _move_residual(self, old, new) -> None:
        """``W += s·B₀A₀`` of ``old`` and ``−= s·B₀A₀`` of ``new`` (each ``(A₀, B₀)`` or None), per adapted
        block, in float64 and rounded once."""
        for blk, rows in self._init_blocks():
            acc = rows.to(torch.float64)
            for factors, sign in ((old, self.scaling), (new, -self.scaling)):
                if factors is not None:
                    A0, B0 = (f.to(device=rows.device, dtype=torch.float64) for f in factors)
                    acc += sign * (B0[blk.b0:blk.b1] @ A0[blk.a0:blk.a1])
            rows.copy_(acc)

    def _initial_adapter(self):
        return tuple(self._buffers.get(name) for name in INITIAL_NAMES)

    def _undo_residual(self) -> None:
        initial = self._initial_adapter()
        # A sharded (FSDP2) weight keeps its residual: moving it would need the whole weight (docs/pissa.md).
        if initial[0] is not None and not self.weight.is_meta and not is_sharded(self.weight):
            self._move_residual(initial, None)

    def _checked_initial_adapter(self, A: Optional[Tensor], B: Optional[Tensor]) -> Optional[tuple]:
        """``(A₀, B₀)`` to set (None where unchanged), or None when nothing would change; raises
        ValueError (before any change) for a layer without one, a wrong shape, or a sharded weight."""
        current = self._initial_adapter()
        if current[0] is None:
            raise ValueError(f"set_initial_adapter: this {type(self).__name__} has no initial adapter "
                             f"(init={self.init!r}); expected a layer built with init='pissa' or 'olora'")
        new = tuple(c if t is None else t.detach() for c, t in zip(current, (A, B)))
        for name, c, t in zip(INITIAL_NAMES, current, new):
            if tuple(t.shape) != tuple(c.shape):
                raise ValueError(f"set_initial_adapter: {name} must have shape {tuple(c.shape)}, "
                                 f"got {tuple(t.shape)}")
        if all(torch.equal(c, t.to(c.device, c.dtype)) for c, t in zip(current, new)):
            return None
        if is_sharded(self.weight):
            raise ValueError("set_initial_adapter: the weight is sharded (a DTensor), and another initial "
                             "adapter would move the residual base in every shard; load it before fully_shard")
        return tuple(t.to(c.device, c.dtype) for c, t in zip(current, new))

    @torch.no_grad()
    def set_initial_adapter(self, A: Optional[Tensor] = None, B: Optional[Tensor] = None) -> None:
        """Give a PiSSA/OLoRA layer another initial adapter ``A₀``/``B₀`` (a loaded one; None keeps
        the current one), moving the residual base with it, so that ``weight + s·B₀A₀`` (the original
        weight) stays as it was, up to one rounding; nothing moves when they are unchanged.
        ``load_lora``, ``load_adapter`` and ``load_state_dict`` (without the weight) do this, so a file
        from ``pissa_niter_N`` under another seed still gives the trained model.

        Raises:
            ValueError: the layer has no initial adapter (another init), a shape differs, or the
                weight is sharded and the values differ; nothing changes.
        """
        new = self._checked_initial_adapter(A, B)
        if new is None:
            return
        current = self._initial_adapter()
        with unmerged(self):
            self._move_residual(current, new)
            for c, t in zip(current, new):
                c.copy_(t)

    def _weight_t(self) -> Tensor:
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self._mixed_rows is not None:
            return self._mixed_forward(x)
        if not self._uses_adapter() or self.merged:
            return self._base_forward(x)
        v = self._forward_view()
        return lora_linear(
            x, self.weight if self.quantized is None else self.quantized, self.bias, v.lora_A, v.lora_B, v.scaling,
            v.dropout_p, self.training,
            fan_in_fan_out=self.fan_in_fan_out, segments=self.segments, backend=self.backend,
            row_scale=DoRAScale(v.lora_magnitude, self._dora_norm(v), getattr(self, "dora_mode", "lean"))
            if v.use_dora else None,
        )

    def _base_forward(self, x: Tensor) -> Tensor:
        if self.quantized is not None:
            y = self.quantized.linear(x).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self._weight_t(), self.bias)

    def _mixed_index(self, x: Tensor, rows: Tensor) -> Tensor:
        return token_adapters(rows, x.shape, x.device)

    def _mixed_call(self, x: Tensor, views, index: Tensor) -> Tensor:
        adapters = [MixedAdapter(v.lora_A, v.lora_B, v.scaling, v.dropout_p,
                                 DoRAScale(v.lora_magnitude, self._dora_norm(v)) if v.use_dora else None)
                    for v in views]
        return lora_linear_mixed(x, self.weight if self.quantized is None else self.quantized, self.bias, adapters,
                                 index, training=self.training, fan_in_fan_out=self.fan_in_fan_out,
                                 segments=self.segments, check_range=False)  # mixed_batch's rows are in range

    @classmethod
    def from_module(cls, module: nn.Linear, r: int = NOT_GIVEN, lora_alpha: float = NOT_GIVEN,
                    lora_dropout: float = NOT_GIVEN, merge_weights: bool = NOT_GIVEN, *,
                    spec: Optional[LoRASpec] = None, fan_in_fan_out: bool = False, **kwargs) -> "Linear":
        """Wrap ``module`` (an ``nn.Linear``, or transformers' GPT-2 ``Conv1D``, which
        implies ``fan_in_fan_out=True``) sharing its Parameters; see :meth:`LoRALayer.from_module`."""
        return super().from_module(module, r, lora_alpha, lora_dropout, merge_weights, spec=spec,
                                   fan_in_fan_out=fan_in_fan_out, **kwargs)
