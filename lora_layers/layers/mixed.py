"""A LoRA layer's forward under a mixed-adapter batch (:func:`lora_layers.mixed_batch`).

While a mixed batch is set, a layer holds a :class:`MixedRows` record as its ``_mixed_rows``: one
adapter index per batch row, in the order of the adapters the batch uses on this layer (``-1``:
base only, for ``None`` rows and for adapters this layer lacks). Its forward then runs the core's
mixed function (:mod:`lora_layers.core.mixed`) with those adapters' tensors, read through
:meth:`~lora_layers.LoRALayer.adapter` at call time.

**After the batch is closed** the record stays on the layer for recomputes only: a forward that
runs inside a backward (gradient checkpointing recomputing a block, possibly after the ``with``
block has exited) still sees the batch's rows; the first ordinary forward of any of the batch's
layers drops the records of all of them and runs as if no batch had been set.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
from torch import Tensor

__all__ = ["MixedRows", "ROWS_ATTR"]

ROWS_ATTR = "_mixed_rows"  # the instance attribute the layers' forward checks (class default None)


class MixedRows(NamedTuple):
    """One layer's part of a mixed batch."""

    batch: object  # the model-level batch: ``batch.live`` is False once it is closed; ``batch.drop()``
    rows: Tensor  # (N,) int64: each row's index into ``names``, -1 = base only
    names: Tuple[str, ...]  # the adapters the batch uses on this layer, in the layer's order
    where: str  # the layer's qualified name (for errors)


def in_backward() -> bool:
    """True inside a backward pass (e.g. a checkpointed block recomputing its forward)."""
    return torch._C._current_graph_task_id() != -1


def mixed_forward(layer, x: Tensor) -> Tensor:
    """The layer's forward with its :class:`MixedRows` record (see the module docstring)."""
    record: MixedRows = layer._mixed_rows
    if not record.batch.live and not in_backward():
        # closed, and this is no recompute: an ordinary forward, after which no layer of the batch may
        # take a later recompute (of another graph) for one of the batch's
        layer.__dict__.pop(ROWS_ATTR, None)
        record.batch.drop()
        return layer.forward(x)
    if layer.merged:  # only possible for a recompute after an eval() merge: the base would hold an adapter
        raise RuntimeError(f"{record.where or '<root>'}: a forward of a mixed batch (recomputed in backward) "
                           f"found the layer merged; call train() before backward, or backward before eval()")
    views = tuple(layer.adapter(name) for name in record.names)
    try:
        index = layer._mixed_index(x, record.rows.to(x.device))
    except ValueError as err:
        raise ValueError(f"mixed_batch: {record.where or '<root>'} ({type(layer).__name__}): {len(record.rows)} "
                         f"row adapters were given, which do not fit its input: {err}") from None
    if not views:  # no row of the batch uses an adapter this layer has
        return layer._base_forward(x)
    return layer._mixed_call(x, views, index)
