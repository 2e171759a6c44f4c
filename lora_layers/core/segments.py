"""Where a fused layer's adapters go: the :class:`Segments` value object.

A :class:`~lora_layers.MergedLinear` (fused qkv, ``[gate | up]``) has one
rank-``r`` adapter per *enabled* split. They are stored stacked: ``lora_A``
is ``(r·n, in)`` and ``lora_B`` is ``(Σ enabled split sizes, r)``. Adapter
``j`` uses rows ``[j·r, (j+1)·r)`` of ``lora_A`` and the ``j``-th block of rows
of ``lora_B``, and adds into output rows ``[out_start, out_end)``. A plain
``Linear`` is the one-span case ``(0, out)``.

Everything that needs this bookkeeping (the functional core, the Triton
kernels, merging, the PEFT block-diagonal layout) asks a :class:`Segments`.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["Block", "Segments"]


class Block(NamedTuple):
    """One adapter of a fused layer: output rows ``out0:out1``, ``lora_A`` rows ``a0:a1``, ``lora_B`` rows ``b0:b1``."""

    out0: int
    out1: int
    a0: int
    a1: int
    b0: int
    b1: int


def covers_all(blocks: Sequence[Block], out_features: int) -> bool:
    """One adapter over every output row (no per-block bookkeeping). Fields, not slices:
    slicing a NamedTuple breaks older dynamo."""
    return len(blocks) == 1 and blocks[0].out0 == 0 and blocks[0].out1 == out_features


@dataclass(frozen=True)
class Segments:
    """The output spans of a layer's adapters, in ``lora_A``/``lora_B`` order.

    Attributes:
        out_features: the layer's output size.
        spans: ``(out_start, out_end)`` per adapter; non-empty, inside
            ``[0, out_features)``, not overlapping (any order).
    """

    out_features: int
    spans: Tuple[Tuple[int, int], ...]

    def __post_init__(self):
        spans = tuple((int(a), int(b)) for a, b in self.spans)
        object.__setattr__(self, "spans", spans)
        if not spans:
            raise ValueError("segments must hold at least one (out_start, out_end) pair, got ()")
        for j, (o0, o1) in enumerate(spans):
            if not 0 <= o0 < o1 <= self.out_features:
                raise ValueError(f"segments[{j}]={(o0, o1)} is not a non-empty slice of the output rows "
                                 f"[0, out_features={self.out_features})")
        ordered = sorted(spans)
        for (p0, p1), (q0, q1) in zip(ordered, ordered[1:]):
            if q0 < p1:
                raise ValueError(f"segments must not overlap, got {(p0, p1)} and {(q0, q1)} in {spans}")

    # -- construction ---------------------------------------------------------
    @classmethod
    def full(cls, out_features: int) -> "Segments":
        """One adapter over every output row (a plain ``Linear``)."""
        return cls(out_features, ((0, out_features),))

    @classmethod
    def of(cls, spans: Optional[Sequence[Tuple[int, int]]], out_features: int) -> "Segments":
        """``spans`` as given to :func:`~lora_layers.functional.lora_linear` (None: the whole output)."""
        if isinstance(spans, Segments):
            if spans.out_features != out_features:
                raise ValueError(f"segments are for out_features={spans.out_features}, the weight has {out_features}")
            return spans
        return cls.full(out_features) if spans is None else cls(out_features, tuple(spans))

    @classmethod
    def from_splits(cls, split_sizes: Sequence[int], enable_lora: Sequence[bool]) -> "Segments":
        """The enabled splits of a fused layer whose output rows are ``split_sizes`` in order.

        Raises:
            ValueError: no split is enabled (such a layer has no adapter), or the
                lengths differ, or a size is not a positive integer.
        """
        if len(split_sizes) != len(enable_lora):
            raise ValueError(f"len(enable_lora)={len(enable_lora)} must equal len(split_sizes)={len(split_sizes)}")
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in split_sizes):
            raise ValueError(f"split_sizes must be positive integers, got {list(split_sizes)}")
        spans, start = [], 0
        for size, on in zip(split_sizes, enable_lora):
            if on:
                spans.append((start, start + int(size)))
            start += int(size)
        return cls(start, tuple(spans))

    # -- what the adapters look like -----------------------------------------
    @property
    def count(self) -> int:
        """Number of adapters ``n``."""
        return len(self.spans)

    @property
    def b_rows(self) -> int:
        """Rows of the stacked ``lora_B``: the enabled output rows."""
        return sum(o1 - o0 for o0, o1 in self.spans)

    @property
    def is_full(self) -> bool:
        """One adapter over the whole output (no bookkeeping needed)."""
        return self.spans == ((0, self.out_features),)

    def blocks(self, r: int) -> Tuple[Block, ...]:
        """The row ranges of each adapter for rank ``r`` per adapter."""
        out, b = [], 0
        for j, (o0, o1) in enumerate(self.spans):
            out.append(Block(o0, o1, j * r, (j + 1) * r, b, b + o1 - o0))
            b += o1 - o0
        return tuple(out)

    def rank_of(self, lora_A: Tensor, lora_B: Tensor) -> int:
        """The rank per adapter, after checking the stacked shapes fit these segments.

        Raises:
            ValueError: ``lora_A`` rows are not ``r·n``, or ``lora_B`` is not ``(b_rows, r)``.
        """
        n, R = self.count, lora_A.shape[0]
        if R % n:
            raise ValueError(f"lora_A rows ({R}) must be r * len(segments) with len(segments)={n}")
        r = R // n
        if tuple(lora_B.shape[:1]) != (self.b_rows,) or (lora_B.dim() > 1 and lora_B.shape[1] != r):
            rows = (f"out_features={self.out_features}" if self.is_full
                    else f"sum of segment sizes={self.b_rows}")
            raise ValueError(f"lora_B must be ({rows}, r={r}) for segments {self.spans}, "
                             f"got {tuple(lora_B.shape)}")
        return r

    def adapter_blocks(self, lora_A: Tensor, lora_B: Tensor) -> Tuple[Block, ...]:
        """The :meth:`blocks` of the stacked ``lora_A``/``lora_B``, after :meth:`rank_of` checked their shapes."""
        return self.blocks(self.rank_of(lora_A, lora_B))

    # -- the delta and the PEFT layout ----------------------------------------
    def deltas(self, lora_A: Tensor, lora_B: Tensor, scaling: float,
               dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[Block, Tensor]]:
        """``(block, scaling · B_j A_j)`` per adapter, each ``(out1 - out0, in)``, in ``dtype``."""
        r = self.rank_of(lora_A, lora_B)
        for blk in self.blocks(r):
            A, B = lora_A[blk.a0:blk.a1], lora_B[blk.b0:blk.b1]
            if dtype is not None:
                A, B = A.to(dtype), B.to(dtype)
            yield blk, (B @ A).mul_(scaling)

    def to_block_diagonal(self, lora_B: Tensor) -> Tensor:
        """PEFT's layout of the stacked ``lora_B``: ``(out_features, r·n)``, block ``j`` at
        ``[out0:out1, j·r:(j+1)·r]``, zeros elsewhere (disabled splits get zero rows)."""
        r = lora_B.shape[1]
        full = lora_B.new_zeros(self.out_features, r * self.count)
        for blk in self.blocks(r):
            full[blk.out0:blk.out1, blk.a0:blk.a1] = lora_B[blk.b0:blk.b1]
        return full

    def to_full_rows(self, values: Tensor, fill: Tensor) -> Tensor:
        """An ``(out_features,)`` vector: ``values`` (one per adapted row, in ``lora_B`` order)
        on the adapted rows, ``fill`` elsewhere (DoRA's magnitude in PEFT's layout)."""
        full = fill.clone()
        for blk in self.blocks(1):
            full[blk.out0:blk.out1] = values[blk.b0:blk.b1]
        return full

    def from_full_rows(self, full: Tensor) -> Tuple[Tensor, Tensor]:
        """Split an ``(out_features,)`` vector into its adapted rows (in ``lora_B`` order)
        and a mask of the other rows."""
        if tuple(full.shape) != (self.out_features,):
            raise ValueError(f"expected a vector of shape ({self.out_features},), got {tuple(full.shape)}")
        other = torch.ones(self.out_features, dtype=torch.bool, device=full.device)
        parts = []
        for blk in self.blocks(1):
            parts.append(full[blk.out0:blk.out1])
            other[blk.out0:blk.out1] = False
        return torch.cat(parts), other

    def from_block_diagonal(self, full_B: Tensor, r: int) -> Tensor:
        """The stacked ``lora_B`` back from PEFT's ``(out_features, r·n)`` layout.

        Raises:
            ValueError: the shape does not fit, or ``full_B`` is non-zero outside the blocks
                (it then holds an adapter this layer cannot represent).
        """
        if tuple(full_B.shape) != (self.out_features, r * self.count):
            raise ValueError(f"lora_B has shape {tuple(full_B.shape)}, expected "
                             f"{(self.out_features, r * self.count)} for {self.count} adapters of rank {r}")
        rest = full_B.clone()
        parts = []
        for blk in self.blocks(r):
            parts.append(full_B[blk.out0:blk.out1, blk.a0:blk.a1])
            rest[blk.out0:blk.out1, blk.a0:blk.a1] = 0
        if rest.any():
            raise ValueError(f"lora_B is not block-diagonal in the layout of the output spans {self.spans}")
        return torch.cat(parts, 0)
