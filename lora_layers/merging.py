"""Exact merging as pure functions over tensors.

A merge writes ``W' = round(W + Δ)`` block by block, in place. Floating-point
subtraction does not give ``W`` back exactly, so :func:`merge_into` also
returns, per block, the bitwise *residual* ``bits(W) - bits(round(W' - Δ))``:
almost always 0 or ±1 ulp, stored as int8 (one byte per weight while merged),
or None when nothing needs restoring. :func:`restore_from` subtracts the same
``Δ`` and adds the residual to the bit pattern, which restores ``W`` bit for
bit after any number of merge/restore cycles.

Callers describe their change as *blocks*: ``(index, delta)`` pairs with
``W[index] += delta``, or ``(index, delta, row_scale)`` with
``W[index] = (W[index] + delta) * row_scale`` (DoRA), in the accumulation
dtype (fp32, or fp64 for an fp64 weight). The blocks come from a factory, called again on restore and on
a failed merge, so a fused layer never holds more than one block's delta.
A LoRA layer's blocks are ``scaling · B_j A_j`` per adapter; another variant
(DoRA) or base plugs in as a different block factory or a different ``W``.

:class:`ExactMerge` is the layer-side lifecycle over these functions:
``train()``/``eval()``, ``merge``/``unmerge``, and state_dict hooks. A merged
layer's ``state_dict()`` holds the merged weight (loralib's export) and marks it
in the state dict's per-module metadata, so that loading it takes the merge out
again instead of counting the adapter twice.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ._ties import LOADING_ATTR, register_weight, shared_weight_reason

__all__ = ["BITS_DTYPE", "accumulation_dtype", "check_mergeable", "merge_into", "restore_from", "merged_copy",
           "ExactMerge", "MERGED_MARK", "MERGED_FACTORS"]

#: Set in a module's ``state_dict()._metadata`` entry when its ``weight`` has the adapter merged in.
#: Metadata, not a key: a loralib model loads the file with ``strict=True`` as it loads its own.
MERGED_MARK = "lora_merged"
#: Next to the mark, only when the adapter keys alone do not say what was merged (DoRA's row
#: scale, or an adapter changed in place while merged): the merge factors themselves.
MERGED_FACTORS = "lora_merge_factors"

#: The integer view of each mergeable dtype (same width), for bitwise residuals.
BITS_DTYPE = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}

Blocks = Callable[[], Iterable[Tuple[tuple, Tensor]]]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Deltas are computed in fp32 (fp64 for fp64 weights) and rounded once into the weight."""
    return torch.promote_types(dtype, torch.float32)


def _apply(block: Tensor, delta: Tensor, row_scale: Optional[Tensor]) -> Tensor:
    merged = block + delta
    return merged if row_scale is None else merged.mul_(row_scale)


def _invert(block: Tensor, delta: Tensor, row_scale: Optional[Tensor]) -> Tensor:
    if row_scale is None:
        return block - delta
    # A zero factor (DoRA's m = 0) merged its rows to 0: nothing to divide back. Dividing by 1 there
    # gives -delta, and the bitwise residual restores the row exactly.
    return block / row_scale.masked_fill(row_scale == 0, 1) - delta


def _bits(t: Tensor) -> Tensor:
    return t.view(BITS_DTYPE[t.dtype])


def _residual(original: Tensor, restored: Tensor) -> Optional[Tensor]:
    """What must be added, bitwise, to ``restored`` to get ``original`` back (None: nothing).

    Integer arithmetic on the bit patterns wraps around, so
    ``bits(restored) + residual == bits(original)`` holds exactly.
    """
    if original.is_meta:
        return None  # no values to restore
    diff = _bits(original) - _bits(restored)
    if not diff.any():
        return None
    if diff.min() >= -128 and diff.max() <= 127:
        return diff.to(torch.int8)
    return diff


def check_mergeable(W: Tensor) -> None:
    if W.dtype not in BITS_DTYPE:
        raise TypeError(f"cannot merge into a weight of dtype {W.dtype}; expected one of {list(BITS_DTYPE)}")


@torch.no_grad()
def merge_into(W: Tensor, blocks: Blocks, *, check_finite: bool = False,
               what: str = "weight") -> List[Optional[Tensor]]:
    """Add every block's delta into ``W`` in place; return the per-block residuals.

    Args:
        W: the weight (its ``.data``), fp16/bf16/fp32/fp64.
        blocks: returns a fresh iterable of ``(index, delta)``.
        check_finite: refuse (ValueError) a non-finite merged block.
        what: names the weight in error messages.

    On any error, the blocks already written are restored exactly and ``W`` is
    left as it was.
    """
    check_mergeable(W)
    acc = accumulation_dtype(W.dtype)
    residuals: List[Optional[Tensor]] = []
    try:
        for index, delta, *row_scale in blocks():
            row_scale = row_scale[0] if row_scale else None
            block = W[index]
            merged = _apply(block.to(acc), delta, row_scale).to(W.dtype)
            if check_finite and not W.is_meta and not torch.isfinite(merged).all():
                raise ValueError(f"safe_merge: merging the adapter into {what} gives non-finite values; "
                                 f"the weight was left unchanged")
            residuals.append(_residual(block, _invert(merged.to(acc), delta, row_scale).to(W.dtype)))
            block.copy_(merged)
    except BaseException:
        restore_from(W, blocks, residuals)
        raise
    return residuals


@torch.no_grad()
def restore_from(W: Tensor, blocks: Blocks, residuals: List[Optional[Tensor]]) -> None:
    """Undo :func:`merge_into`: subtract each block's delta, then add its residual.

    Only the first ``len(residuals)`` blocks are restored (a partial merge).
    Pass None residuals when ``W`` changed dtype since the merge: they no longer
    apply, and the restore is then exact up to the cast's rounding.
    """
    acc = accumulation_dtype(W.dtype)
    for (index, delta, *row_scale), residual in zip(blocks(), residuals):
        row_scale = row_scale[0].to(W.device) if row_scale else None
        block = W[index]
        restored = _invert(block.to(acc), delta.to(W.device), row_scale).to(W.dtype)
        if residual is not None:
            _bits(restored).add_(residual.to(device=W.device, dtype=BITS_DTYPE[W.dtype]))
        block.copy_(restored)


@torch.no_grad()
def merged_copy(W: Tensor, blocks: Blocks) -> Tensor:
    """A copy of ``W`` with the blocks added, exactly as :func:`merge_into` would write it."""
    check_mergeable(W)
    out = W.detach().clone()
    acc = accumulation_dtype(W.dtype)
    for index, delta, *row_scale in blocks():
        out[index] = _apply(out[index].to(acc), delta, row_scale[0] if row_scale else None).to(W.dtype)
    return out


class ExactMerge:
    """The merge lifecycle of a LoRA layer (a mixin of :class:`~lora_layers.LoRALayer`).

    The layer provides ``weight``, ``has_adapter``, ``lora_A``/``lora_B``,
    ``merge_weights`` and ``_delta_blocks(A, B)``; ``_merge_blocker()`` says why it
    must not merge (a tied weight; subclasses add their own reasons).
    """

    def _merge_blocker(self) -> Optional[str]:
        """Why this layer cannot merge, or None. A shared (tied) weight never merges."""
        return shared_weight_reason(self)

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; with ``merge_weights``, ``eval()`` merges and ``train()`` unmerges. Returns self."""
        was_training = self.training
        super().train(mode)
        if self.merge_weights:
            try:
                if mode:
                    self.unmerge()
                elif self._merge_blocker() is None:
                    self.merge()
            except BaseException:
                super().train(was_training)  # a failed merge changes nothing, the mode included
                raise
        return self

    def _blocks(self, factors):
        return lambda: self._delta_blocks(*factors)

    def _merge_factors(self) -> tuple:
        """A snapshot of what ``_delta_blocks`` needs (``lora_A``, ``lora_B``, ...), so that
        unmerge removes what was merged even if the adapter changed meanwhile."""
        return self.lora_A.detach().clone(), self.lora_B.detach().clone()

    def merge(self, safe_merge: bool = False) -> None:
        """Add ``scaling · B A`` into the base weight. Idempotent.

        The delta is computed in fp32 and the sum rounded once; a small residual
        (usually int8, one byte per weight while merged) makes :meth:`unmerge`
        restore the weight bit for bit (see :mod:`lora_layers.merging`).

        Args:
            safe_merge: check the merged weight is finite first; if not, raise
                ``ValueError`` and leave the weight untouched.
        """
        if self.merged or not self.has_adapter:
            return
        blocker = self._merge_blocker()
        if blocker is not None:
            raise ValueError(f"cannot merge this {type(self).__name__}: {blocker}")
        factors = self._merge_factors()
        W = self.weight.data
        residuals = merge_into(W, self._blocks(factors), check_finite=safe_merge,
                               what=f"{type(self).__name__}.weight")
        self._merge_state = (factors, W.dtype, residuals)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the merged delta, restoring the base weight exactly. Idempotent.

        The delta removed is the one that was merged, even if the adapter
        tensors were changed in place meanwhile. A weight loaded merged (a
        ``state_dict()`` saved in eval mode) is restored up to one rounding.
        A merge made by a subclass's own code (``merged`` set without
        :meth:`merge`, as loralib subclasses do) is left to that code.
        """
        if self._merged_here():
            self._restore(self.weight.data)
            self._merge_state, self.merged = None, False

    def _merged_here(self) -> bool:
        # A loralib-style subclass may merge by itself and set ``merged``: that state is not ours.
        return self.merged and getattr(self, "_merge_state", None) is not None

    def _restore(self, W: Tensor) -> None:
        factors, dtype, residuals = self._merge_state
        # The saved factors stay where they were made if the module moved while merged. A residual
        # no longer applies once the weight was cast; a weight loaded merged has none (None).
        factors = tuple(f.to(W.device) for f in factors)
        if residuals is None or W.dtype != dtype:
            residuals = itertools.repeat(None)
        restore_from(W, self._blocks(factors), residuals)

    def unmerged_weight(self) -> Tensor:
        """The base weight without the adapter: a restored copy if merged, else the weight itself."""
        if not self._merged_here():
            return self.weight.detach()
        W = self.weight.detach().clone()
        self._restore(W)
        return W

    def merged_weight(self) -> Tensor:
        """A copy of the weight with the adapter folded in, as :meth:`merge` would write it;
        the layer is not changed."""
        if self.merged or not self.has_adapter:
            return self.weight.detach().clone()
        return merged_copy(self.weight, self._blocks(self._merge_factors()))

    # -- state_dict ------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)  # a caller's own destination may have none
        if self._merged_here() and prefix + "weight" in destination and metadata is not None:
            # The merged weight stays as loralib wrote it (exports that drop the adapter keys rely
            # on it); the mark lets our own load take the merge out instead of counting it twice.
            metadata.setdefault(prefix[:-1], {}).update(self._merged_mark())

    def _merged_mark(self) -> dict:
        factors = self._merge_state[0]
        adapter = (getattr(self, "lora_A", None), getattr(self, "lora_B", None))
        if len(factors) == 2 and all(isinstance(a, Tensor) and torch.equal(f, a.detach().to(f.device))
                                     for f, a in zip(factors, adapter)):
            return {MERGED_MARK: True}  # what was merged is the adapter saved next to the weight
        return {MERGED_MARK: True, MERGED_FACTORS: tuple(f.detach().clone() for f in factors)}

    def _merged_load_problem(self, state_dict, prefix, factors) -> Optional[str]:
        """Why a weight marked merged cannot be loaded into this layer, or None."""
        adapter = self.adapter_parameters()
        missing = [prefix + name for name in adapter if prefix + name not in state_dict]
        if missing:
            return (f"{prefix}weight was saved merged (eval mode) but the state dict lacks {missing}: without "
                    f"the adapter merged into it, the base weight cannot be recovered. Load the whole state "
                    f"dict, or one saved in train mode (this layer was left unchanged)")
        quantized = getattr(self, "quantized", None)
        if quantized is not None or self.weight.dtype not in BITS_DTYPE:
            what = f"quantized ({quantized.kind})" if quantized is not None else f"not floating ({self.weight.dtype})"
            return (f"{prefix}weight was saved merged (eval mode), and this layer's base weight is {what}: "
                    f"the merge cannot be taken out of it (this layer was left unchanged)")
        shapes = [tuple(p.shape) for p in adapter.values()]  # lora_A, lora_B[, lora_magnitude]
        if factors is not None and (not isinstance(factors, (tuple, list)) or [
                tuple(f.shape) if isinstance(f, Tensor) and f.is_floating_point() else None
                for f in factors] != shapes):
            return (f"the metadata {MERGED_FACTORS!r} of {prefix}weight must hold floating tensors of shapes "
                    f"{shapes}, got {factors!r} (this layer was left unchanged)")
        return None

    def _adopt_merged(self, factors) -> None:
        """The weight just loaded has ``factors`` (default: the loaded adapter) merged in. Record
        that merge, then take it out unless this layer is merged now (eval with merge_weights)."""
        W = self.weight.data
        factors = ExactMerge._merge_factors(self) if factors is None else tuple(f.to(W.device) for f in factors)
        self._merge_state, self.merged = (factors, W.dtype, None), True
        if self.training or not self.merge_weights or self._merge_blocker() is not None:
            self.unmerge()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        marked = bool(local_metadata.get(MERGED_MARK)) and prefix + "weight" in state_dict and self.has_adapter
        factors = local_metadata.get(MERGED_FACTORS) if marked else None
        problem = self._merged_load_problem(state_dict, prefix, factors) if marked else None
        if problem is not None:
            error_msgs.append(problem)
            return
        was_merged = self._merged_here()
        self.unmerge()
        weight, errors_before = self._parameters.get("weight"), len(error_msgs)
        self.__dict__[LOADING_ATTR] = True  # load_state_dict(assign=True) registers a new weight: not a tie
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            del self.__dict__[LOADING_ATTR]
            if self._parameters.get("weight") is not weight:
                register_weight(self)
            if marked and len(error_msgs) == errors_before:
                self._adopt_merged(factors)
            elif was_merged:
                self.merge()
