"""Mixed-adapter batches over a whole model: one adapter per batch row (:func:`mixed_batch`)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers.base import LoRALayer
from ..layers.mixed import ROWS_ATTR, MixedRows
from ..variants.pissa import INITIAL_NAMES
from .adapters import adapter_names
from .params import lora_modules
from .unwrap import unwrap_model

__all__ = ["mixed_batch", "MixedBatch"]


def _checked_names(model: nn.Module, names) -> Tuple[Optional[str], ...]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"mixed_batch: names must be a list with one adapter name (or None) per batch row, "
                        f"got {type(names).__name__} {names!r}")
    names = tuple(names)
    if not names:
        raise ValueError("mixed_batch: names must name at least one batch row, got an empty list")
    known = adapter_names(model)
    if not known:
        raise ValueError(f"mixed_batch: {type(model).__name__} has no LoRA layer with an adapter (r > 0)")
    for i, name in enumerate(names):
        if name is not None and name not in known:
            raise KeyError(f"mixed_batch: names[{i}] is {name!r}, an adapter no layer of {type(model).__name__} "
                           f"has; its adapters are {known} (None: the base alone)")
    return names


def _layer_rows(layer: LoRALayer, names) -> Tuple[torch.Tensor, Tuple[str, ...]]:
    """``(rows, used)``: the adapters of this layer that rows name, in the layer's order, and each
    row's index among them (-1: None, or an adapter this layer lacks)."""
    used = tuple(n for n in layer.adapter_names if n in names)
    rows = torch.tensor([used.index(n) if n in used else -1 for n in names], dtype=torch.long)
    return rows.to(layer.weight.device), used  # where the layer computes: no copy per forward


def _plan(model: nn.Module, names) -> List[Tuple[str, LoRALayer]]:
    """The layers the batch sets, after every check (nothing changed yet)."""
    layers = [(n, layer) for n, layer in lora_modules(model) if layer.r > 0 and layer.has_adapter]
    for n, layer in layers:
        where = n or "<root>"
        record = layer.__dict__.get(ROWS_ATTR)
        if record is not None and record.batch.live:
            raise RuntimeError(f"mixed_batch: a mixed batch is already set on {where} (nested or concurrent "
                               f"mixed_batch calls are refused); close the first one before setting another")
        problem = layer._mixed_problem()
        if problem is None and getattr(layer, INITIAL_NAMES[0], None) is not None \
                and any(name not in layer.adapter_names for name in names):
            problem = (f"init={layer.init!r}: its base weight is the residual W - s·B₀A₀, so a row without its "
                       f"adapter (None, or a name it lacks) would run neither the original layer nor the trained one")
        if problem is None and layer.merged and not layer._merged_here():
            problem = ("it was merged by code of its own (merged=True without merge()), so it cannot be unmerged "
                       "exactly for the batch; call train() first")
        if problem is not None:
            raise ValueError(f"mixed_batch: {where} cannot run a mixed batch: {problem}")
    return layers


class MixedBatch:
    """The state :func:`mixed_batch` sets; :meth:`close` (or the end of the ``with`` block) restores the
    model. ``live`` is True until then."""

    def __init__(self, model: nn.Module, names):
        model = unwrap_model(model)
        self.names = _checked_names(model, names)
        plan = _plan(model, self.names)
        self.live = True
        self._restore, self._lingering = [], []
        try:
            for n, layer in plan:
                rows, used = _layer_rows(layer, self.names)
                self._restore.append((layer, layer.merged))
                layer.unmerge()  # a merged weight holds the active adapter: take it out for the batch (exact)
                layer.__dict__[ROWS_ATTR] = MixedRows(self, rows, used, n)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """End the batch: the layers run their active adapter again, and those merged before (or in eval
        mode with ``merge_weights``) merge again. Idempotent. The rows stay for recomputes in backward only
        (see :mod:`lora_layers.layers.mixed`)."""
        if not self.live:
            return
        self.live = False
        restore, self._restore = self._restore, []
        self._lingering = [layer for layer, _ in restore]
        for layer, was_merged in restore:
            if not layer.training and (was_merged or layer.merge_weights) and layer._merge_blocker() is None:
                layer.merge()

    def drop(self) -> None:
        """Take the closed batch's rows off its layers (the first ordinary forward after it does this)."""
        lingering, self._lingering = self._lingering, []
        for layer in lingering:
            record = layer.__dict__.get(ROWS_ATTR)
            if record is not None and record.batch is self:
                del layer.__dict__[ROWS_ATTR]

    def __deepcopy__(self, memo) -> "MixedBatch":
        # A copied model holds a closed batch: closing this one could not end the copy's
        copied = object.__new__(MixedBatch)
        copied.names, copied.live, copied._restore, copied._lingering = self.names, False, [], []
        return copied

    def __enter__(self) -> "MixedBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MixedBatch({list(self.names)}, live={self.live})"

    def __getstate__(self):
        # A model pickled (or copied) inside the batch holds a closed batch: nothing would close the copy's, which
        # would hold its layers to these rows for good; its layers' first forward drops the rows.
        return {**self.__dict__, "live": False, "_restore": [], "_lingering": []}


def mixed_batch(model: nn.Module, names: Sequence[Optional[str]]) -> MixedBatch:
    """Give each batch row its own adapter: row ``i`` of every LoRA layer's input uses adapter ``names[i]``
    (None: the base alone), in forward and backward, in train and eval mode::

        with lora_layers.mixed_batch(model, ["alice", "bob", None, "alice"]):
            loss = model(input_ids, labels=labels).loss
        loss.backward()

    Also a plain call: ``batch = mixed_batch(model, names)`` ... ``batch.close()``.

    Rows are the leading dimension of each layer's input. A flattened input ``(tokens, in)`` is read as
    ``len(names)`` consecutive equal groups (batch-major, as Hugging Face models flatten); see
    :mod:`lora_layers.core.mixed`. A layer that lacks a named adapter (one added with ``targets=``)
    runs its base alone on that adapter's rows, as :func:`set_adapter` does. Each layer computes only
    with the adapters the batch names, so the others get no gradient (None), as in a single-adapter run.

    Merged layers (``eval()``) are unmerged for the batch (exactly) and merged again after it. The
    batch's rows outlive the ``with`` block for recomputes only: gradient checkpointing may recompute
    a block in a ``backward()`` called after the block; the first ordinary forward after it drops them,
    so run backward before the next forward. Dropout masks are per row (the rule of
    :mod:`lora_layers.core.mixed`).

    Args:
        model: a model with LoRA layers (wrappers are seen through).
        names: one adapter name or None per batch row (a list or tuple).

    Returns:
        A :class:`MixedBatch`: a context manager, whose ``close()`` ends the batch.

    Raises:
        TypeError: ``names`` is not a list or tuple.
        KeyError: a name no layer has (the message lists :func:`adapter_names`).
        ValueError: no names; a layer that cannot run a mixed batch (a class with its own forward, a conv
            with ``layout='loralib'``, a merge made by the class's own code). At the first layer's forward:
            an input whose rows do not match ``len(names)``.
        RuntimeError: a mixed batch is set already (nesting and concurrent batches are refused).
            Nothing changes when the call raises.
    """
    return MixedBatch(model, names)
