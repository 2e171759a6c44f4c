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
again instead of counting the adapter twice. The state dict's tensors are the
layer's own, so a later ``train()`` unmerges them in place: the mark carries
fingerprints of the merged weight and of the base under it, and a weight that is
the base loads as such.
"""
from __future__ import annotations

import itertools
import math
import sys
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ._ties import LOADING_ATTR, register_weight, shared_weight_reason
from ._warnings import warn_merged_export_as_base

__all__ = ["BITS_DTYPE", "accumulation_dtype", "check_mergeable", "merge_into", "restore_from", "merged_copy",
           "weight_sums", "same_sums", "ExactMerge", "MERGED_MARK", "MERGED_FACTORS", "MERGED_CHECK", "BASE_CHECK"]

#: Set in a module's ``state_dict()._metadata`` entry when its ``weight`` has the adapter merged in.
#: Metadata, not a key: a loralib model loads the file with ``strict=True`` as it loads its own.
MERGED_MARK = "lora_merged"
#: Next to the mark, only when the adapter keys alone do not say what was merged (DoRA's row
#: scale, or an adapter changed in place while merged): the merge factors themselves.
MERGED_FACTORS = "lora_merge_factors"
#: Next to the mark: :func:`weight_sums` of the merged weight at ``state_dict()`` time. The state
#: dict's tensors are the layer's own, so a later ``train()`` unmerges them in place; the check
#: tells a weight still merged from one changed since.
MERGED_CHECK = "lora_merged_check"
#: Next to the check, when known: :func:`weight_sums` of the base weight that ``train()`` restores
#: (bit for bit), so a weight unmerged in place after ``state_dict()`` loads as the base it is.
BASE_CHECK = "lora_base_check"

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


#: Elements summed at once by :func:`weight_sums`: bounds its float64 temporary (8 MiB).
_SUMS_CHUNK = 1 << 20


@torch.no_grad()
def weight_sums(W: Tensor) -> Optional[Tuple[float, float]]:
    """``(Σ w, Σ w²)`` of ``W`` in float64: a fingerprint that changes when any element does.

    Plain floats, so a state dict's metadata holding it loads with ``torch.load(weights_only=True)``.
    Two fingerprints are compared with :func:`same_sums`. None for a weight without values (meta).
    """
    if W.is_meta:
        return None
    if _is_dtensor(W):
        return _sharded_weight_sums(W)
    flat = W.detach().reshape(-1)
    s1 = s2 = torch.zeros((), dtype=torch.float64, device=W.device)
    buffer = torch.empty(min(flat.numel(), _SUMS_CHUNK), dtype=torch.float64, device=W.device)
    for chunk in flat.split(_SUMS_CHUNK):
        # One buffer for every chunk: a fresh 8 MiB temporary per chunk costs more than the sums.
        x = buffer[:chunk.numel()].copy_(chunk)
        s1, s2 = s1 + x.sum(), s2 + x.dot(x)
    return float(s1), float(s2)


def _is_dtensor(W: Tensor) -> bool:
    # FSDP2 (fully_shard) holds parameters as DTensors outside its forward; torch.distributed.tensor is
    # only looked up when already imported, so plain use never imports it.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(W, dtensor.DTensor)


def _sharded_weight_sums(W: Tensor) -> Tuple[float, float]:
    """:func:`weight_sums` of a DTensor: the local shard's sums, added over the mesh dimensions that
    shard it (a collective: every rank calls it, as every rank calls ``eval()`` or ``state_dict()``)."""
    from torch.distributed.tensor import Partial, Replicate

    local = weight_sums(W.to_local())
    sums = torch.tensor(local, dtype=torch.float64, device=W.to_local().device)
    placements = [Partial() if p.is_shard() else Replicate() for p in W.placements]
    total = type(W).from_local(sums, W.device_mesh, placements).full_tensor()
    return float(total[0]), float(total[1])


def same_sums(a: Tuple[float, float], b: Tuple[float, float], numel: int) -> bool:
    """Whether two :func:`weight_sums` are of the same weight, up to the float64 summation order
    (another device or thread count): 1e-10 relative, where changing one element of a bf16 weight
    of 10⁷ by an ulp moves ``Σ w²`` by about 1e-9 and an adapter merged in moves it far more."""
    (a1, a2), (b1, b2) = a, b
    if not all(math.isfinite(v) for v in (a1, a2, b1, b2)):  # a weight with inf or nan: alike or not
        return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in ((a1, b1), (a2, b2)))
    scale = max(a2, b2)
    # Σ|w| <= sqrt(n Σw²) bounds the rounding of Σ w, which sums terms of both signs.
    return abs(a2 - b2) <= 1e-10 * scale and abs(a1 - b1) <= 1e-10 * math.sqrt(numel * scale)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` is a view of ``b``'s storage (a state dict's tensor of the layer's own weight)."""
    try:
        return (a.device == b.device and not a.is_meta and a.numel() > 0
                and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without a plain storage
        return False


class ExactMerge:
    """The merge lifecycle of a LoRA layer (a mixin of :class:`~lora_layers.LoRALayer`).

    The layer provides ``weight``, ``has_adapter``, ``lora_A``/``lora_B``,
    ``merge_weights`` and ``_delta_blocks(A, B)``; ``_merge_blocker()`` says why it
    must not merge (a tied weight; subclasses add their own reasons).
    """

    def _merge_blocker(self) -> Optional[str]:
        """Why this layer cannot merge, or None. A shared (tied) weight never merges."""
        return shared_weight_reason(self)

    def _knows_its_delta(self) -> bool:
        """False for a loralib-style subclass without ``_delta_blocks``: its merges are its own code's."""
        return True

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; with ``merge_weights``, ``eval()`` merges and ``train()`` unmerges. Returns self."""
        was_training = self.training
        super().train(mode)
        if self.merge_weights:
            try:
                if mode:
                    self._adopt_hand_merge()
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
        base_sums = weight_sums(W)
        residuals = merge_into(W, self._blocks(factors), check_finite=safe_merge,
                               what=f"{type(self).__name__}.weight")
        self._merge_state = (factors, W.dtype, residuals)
        self._merge_sums = (base_sums, weight_sums(W))  # unmerge restores this base bit for bit
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

    def _adopt_hand_merge(self) -> None:
        """``merged`` set by the user's own code (``weight.data += scaling · B A; merged = True``, as
        export scripts write it) on a layer whose delta lora_layers knows: loralib's ``train()``
        subtracts the adapter's delta then, so record that merge for :meth:`unmerge` to take out
        (up to one rounding). A subclass without ``_delta_blocks`` keeps its merges to itself."""
        if not self.merged or self._merged_here() or not self._knows_its_delta():
            return
        if not self.has_adapter:
            self.merged = False  # as loralib: nothing to subtract
        elif getattr(self, "quantized", None) is None and self.weight.dtype in BITS_DTYPE:
            self._merge_state = (ExactMerge._merge_factors(self), self.weight.dtype, None)

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
        mark = {MERGED_MARK: True}
        sums = weight_sums(self.weight)
        if sums is not None:
            mark[MERGED_CHECK] = sums
            base_sums, merged_sums = getattr(self, "_merge_sums", None) or (None, None)
            if base_sums is not None and merged_sums is not None and same_sums(sums, merged_sums,
                                                                               self.weight.numel()):
                mark[BASE_CHECK] = base_sums  # the weight is as merged: train() gives that base back
        factors = self._merge_state[0]
        adapter = (getattr(self, "lora_A", None), getattr(self, "lora_B", None))
        if len(factors) == 2 and all(isinstance(a, Tensor) and torch.equal(f, a.detach().to(f.device))
                                     for f, a in zip(factors, adapter)):
            return mark  # what was merged is the adapter saved next to the weight
        return {**mark, MERGED_FACTORS: tuple(f.detach().clone() for f in factors)}

    def _read_mark(self, state_dict, prefix, metadata) -> Tuple[bool, Optional[str]]:
        """Whether ``<prefix>weight`` is to be loaded as merged, and why it cannot be loaded at all.

        Unmarked, or the layer's own weight (its merge state says what it holds): not merged. With
        a check, the weight must still be the one ``state_dict()`` returned (merged), or the base
        under it (a ``train()`` unmerged it in place since); anything else changed it in a way
        that this layer cannot tell, so it is refused rather than guessed.
        """
        W = state_dict.get(prefix + "weight")
        if not (metadata.get(MERGED_MARK) and isinstance(W, Tensor) and self.has_adapter) \
                or _shares_memory(W, self.weight):
            return False, None
        problem = self._mark_format_problem(prefix, metadata)
        if problem is not None:
            return False, problem
        merged_check, base_check = metadata.get(MERGED_CHECK), metadata.get(BASE_CHECK)
        sums = None if merged_check is None else weight_sums(W)
        if sums is None:  # no check (deleted on purpose), or a weight without values: the mark is trusted
            return True, None
        if base_check is not None and same_sums(sums, base_check, W.numel()):
            return False, None  # the base weight: a train() unmerged it after state_dict()
        if same_sums(sums, merged_check, W.numel()):
            return True, None
        name = prefix[:-1]
        return False, (f"{prefix}weight is marked merged (saved in eval mode) but is neither the merged weight "
                       f"that state_dict() returned nor the base weight under it: it changed after "
                       f"state_dict() (whose tensors are the model's own, so eval() with a newer adapter, an "
                       f"optimizer step or a cast changes them). Loading it as merged or as base could both "
                       f"be wrong, so this layer was left unchanged. Save or copy.deepcopy the state dict "
                       f"right after state_dict(). If you know it holds the merged weight of the adapter saved "
                       f"with it, delete sd._metadata[{name!r}][{MERGED_CHECK!r}]; if it holds the base "
                       f"weight, delete sd._metadata[{name!r}][{MERGED_MARK!r}]")

    def _merged_load_problem(self, state_dict, prefix) -> Optional[str]:
        """Why a weight marked merged cannot be loaded into this layer, or None."""
        adapter = self.adapter_parameters()
        missing = [prefix + name for name in adapter if prefix + name not in state_dict]
        if missing:
            return (f"{prefix}weight was saved merged (eval mode) but the state dict lacks {missing}: without "
                    f"the adapter merged into it, the base weight cannot be recovered. Load the whole state "
                    f"dict, or one saved in train mode (this layer was left unchanged)")
        if not self._knows_its_delta():
            return (f"{prefix}weight was saved merged (eval mode), and {type(self).__name__} defines no "
                    f"_delta_blocks: lora_layers cannot take the merge out of it. Load a state dict saved in "
                    f"train mode (this layer was left unchanged)")
        quantized = getattr(self, "quantized", None)
        if quantized is not None or self.weight.dtype not in BITS_DTYPE:
            what = f"quantized ({quantized.kind})" if quantized is not None else f"not floating ({self.weight.dtype})"
            return (f"{prefix}weight was saved merged (eval mode), and this layer's base weight is {what}: "
                    f"the merge cannot be taken out of it (this layer was left unchanged)")
        return None

    def _mark_format_problem(self, prefix, metadata) -> Optional[str]:
        """Why the metadata next to a weight marked merged is malformed, or None."""
        for name in (MERGED_CHECK, BASE_CHECK):
            check = metadata.get(name)
            if check is not None and not (isinstance(check, (tuple, list)) and len(check) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in check)):
                return (f"the metadata {name!r} of {prefix}weight must be two numbers (Σw, Σw²), got "
                        f"{check!r} (this layer was left unchanged)")
        factors = metadata.get(MERGED_FACTORS)
        shapes = [tuple(p.shape) for p in self.adapter_parameters().values()]  # lora_A, lora_B[, lora_magnitude]
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
        else:  # the base that train() will restore is this one rounding, not the saved base
            self._merge_sums = (weight_sums(self.unmerged_weight()), weight_sums(W))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        marked, problem = self._read_mark(state_dict, prefix, local_metadata)
        adapter = list(self.adapter_parameters())
        if marked and adapter and not any(prefix + name in state_dict for name in adapter):
            # Every adapter key dropped (fish-speech's export pops the 'lora' keys of the eval state dict in
            # place, keeping the mark): a plain merged model, whose weight loads as the base weight, as the
            # same weights from merged_state_dict do. Only some missing is a partial load: refused below.
            warn_merged_export_as_base(prefix + "weight")
            marked = False
        factors = local_metadata.get(MERGED_FACTORS) if marked else None
        if marked:
            problem = self._merged_load_problem(state_dict, prefix)
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
            elif was_merged and self._merge_blocker() is None:  # else unmerged, as eval() leaves it
                self.merge()
