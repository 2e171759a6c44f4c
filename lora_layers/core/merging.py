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
The layer-side lifecycle over these functions is
:class:`lora_layers.layers.merge_state.ExactMerge`.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from .sharded import is_sharded

__all__ = ["BITS_DTYPE", "accumulation_dtype", "check_mergeable", "merge_into", "restore_from", "merged_copy",
           "weight_sums", "same_sums", "MERGED_MARK", "MERGED_FACTORS", "MERGED_CHECK", "BASE_CHECK"]

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
    if is_sharded(W):
        return _sharded_weight_sums(W)
    flat = W.detach().reshape(-1)
    s1 = s2 = torch.zeros((), dtype=torch.float64, device=W.device)
    buffer = torch.empty(min(flat.numel(), _SUMS_CHUNK), dtype=torch.float64, device=W.device)
    for chunk in flat.split(_SUMS_CHUNK):
        # One buffer for every chunk: a fresh 8 MiB temporary per chunk costs more than the sums.
        x = buffer[:chunk.numel()].copy_(chunk)
        s1, s2 = s1 + x.sum(), s2 + x.dot(x)
    return float(s1), float(s2)


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
