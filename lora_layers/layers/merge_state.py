""":class:`ExactMerge` is the layer-side lifecycle over the pure merge functions of
:mod:`lora_layers.core.merging`:
``train()``/``eval()``, ``merge``/``unmerge``, and state_dict hooks. A merged
layer's ``state_dict()`` holds the merged weight (loralib's export) and marks it
in the state dict's per-module metadata, so that loading it takes the merge out
again instead of counting the adapter twice. The state dict's tensors are the
layer's own, so a later ``train()`` unmerges them in place: the mark carries
fingerprints of the merged weight and of the base under it, and a weight that is
the base loads as such.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..core.merging import (BASE_CHECK, BITS_DTYPE, MERGED_CHECK, MERGED_FACTORS, MERGED_MARK, merge_into, merged_copy,
                            restore_from, same_sums, weight_sums)
from ..core.sharded import check_not_unsharded, fsdp_managed, gathered, is_sharded, write_shard
from .notices import warn_merged_export_as_base
from .ties import LOADING_ATTR, register_weight, shared_weight_reason
from .adapters import ADAPTERS_ATTR, DEFAULT_ADAPTER, named_adapters

__all__ = ["ExactMerge", "unmerged"]

#: Instance attribute of a layer merged with a named adapter: ``(name, scaling)`` of that merge.
_MERGED_WITH = "_merged_with"

#: Why a layer whose weight FSDP2 shards does not merge (docs/distributed.md, "eval() and merging").
SHARDED_REASON = ("its weight is sharded (a DTensor: fully_shard holds it so outside forward), and a merge "
                  "would write the whole delta into one rank's shard; under FSDP2, eval() serves the adapter "
                  "unmerged, with the same outputs. Merge a gathered copy of the model instead")


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` is a view of ``b``'s storage (a state dict's tensor of the layer's own weight)."""
    try:
        return (a.device == b.device and not a.is_meta and a.numel() > 0
                and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without a plain storage
        return False


@contextlib.contextmanager
def unmerged(*layers) -> Iterator[None]:
    """Unmerge the merged ones of ``layers`` for the body of a ``with``, then merge them again.

    The re-merge runs however the body ends (an exception included), so that a failed write
    leaves no layer unmerged that was merged; a layer that can no longer merge then (its weight
    was tied or assigned meanwhile) stays unmerged, as ``eval()`` leaves it. Layers that were not
    merged are left alone, and a layer given twice is handled once.
    """
    done = []
    try:
        for layer in {id(layer): layer for layer in layers}.values():
            if layer.merged:
                layer.unmerge()
                done.append(layer)
        yield
    finally:
        for layer in done:
            if layer._merge_blocker() is None:
                layer.merge()


class ExactMerge:
    """The merge lifecycle of a LoRA layer (a mixin of :class:`~lora_layers.LoRALayer`).

    The layer provides ``weight``, ``has_adapter``, ``lora_A``/``lora_B``,
    ``merge_weights`` and ``_delta_blocks(A, B)``; ``_merge_blocker()`` says why it
    must not merge (a tied weight; subclasses add their own reasons).
    """

    def _merge_blocker(self) -> Optional[str]:
        """Why this layer cannot merge, or None. A shared (tied) weight never merges, nor a sharded one."""
        if is_sharded(self.weight) or fsdp_managed(self):
            return SHARDED_REASON
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

    def _blocks(self, factors, scaling: Optional[float] = None):
        # None: the default adapter's, which _delta_blocks reads from the layer (as a loralib-style
        # subclass's _delta_blocks(A, B) does); a named adapter's scaling is passed.
        if scaling is None:
            return lambda: self._delta_blocks(*factors)
        return lambda: self._delta_blocks(*factors, scaling=scaling)

    def _merge_factors(self) -> tuple:
        """A snapshot of what ``_delta_blocks`` needs (the active adapter's ``lora_A``, ``lora_B``, ...),
        so that unmerge removes what was merged even if the adapter changed meanwhile."""
        view = self._active_view()
        return view.lora_A.detach().clone(), view.lora_B.detach().clone()

    def _default_factors(self) -> tuple:
        """The default adapter's ``lora_A``, ``lora_B`` (what a loaded or hand-made merge holds)."""
        return self.lora_A.detach().clone(), self.lora_B.detach().clone()

    def _active_blocks(self):
        """The blocks of the active adapter, as :meth:`merge` adds them."""
        return self._blocks(self._merge_factors(), self._merge_scaling())

    def _merged_blocks(self, factors):
        """The blocks of what is merged now (recorded by :meth:`merge`) for these factors."""
        named = self.__dict__.get(_MERGED_WITH)
        return self._blocks(factors, None if named is None else named[1])

    def _merge_scaling(self) -> Optional[float]:
        return None

    def merge(self, safe_merge: bool = False) -> None:
        """Add ``scaling · B A`` into the base weight. Idempotent.

        The delta is computed in fp32 and the sum rounded once; a small residual
        (usually int8, one byte per weight while merged) makes :meth:`unmerge`
        restore the weight bit for bit (see :mod:`lora_layers.merging`).

        Args:
            safe_merge: check the merged weight is finite first; if not, raise
                ``ValueError`` and leave the weight untouched.
        """
        if self.merged or not self._uses_adapter():
            return
        blocker = self._merge_blocker()
        if blocker is not None:
            raise ValueError(f"cannot merge this {type(self).__name__}: {blocker}")
        factors, scaling = self._merge_factors(), self._merge_scaling()
        W = self.weight.data
        base_sums = weight_sums(W)
        residuals = merge_into(W, self._blocks(factors, scaling), check_finite=safe_merge,
                               what=f"{type(self).__name__}.weight")
        self._merge_state = (factors, W.dtype, residuals)
        self._record_merged_with(None if scaling is None else (self.active_adapter, scaling))
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
            check_not_unsharded(self, self.weight, f"unmerging this {type(self).__name__}")
            self._restore(self.weight.data)
            self._merge_state, self.merged = None, False
            self._record_merged_with(None)

    def _record_merged_with(self, named) -> None:
        if named is None:
            self.__dict__.pop(_MERGED_WITH, None)  # a default merge: the layer holds no new attribute
        else:
            self.__dict__[_MERGED_WITH] = named

    def _uses_adapter(self) -> bool:
        return self.has_adapter

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
            self._merge_state = (self._default_factors(), self.weight.dtype, None)
            self._record_merged_with(None)

    def _merged_here(self) -> bool:
        # A loralib-style subclass may merge by itself and set ``merged``: that state is not ours.
        return self.merged and getattr(self, "_merge_state", None) is not None

    def _restore(self, W: Tensor) -> None:
        if is_sharded(W):  # merged before fully_shard: restore the whole weight, keep this rank's shard of it
            full = gathered(W)
            self._restore(full)
            write_shard(W, full)
            return
        factors, dtype, residuals = self._merge_state
        # The saved factors stay where they were made if the module moved while merged. A residual
        # no longer applies once the weight was cast; a weight loaded merged has none (None).
        factors = tuple(f.to(W.device) for f in factors)
        if residuals is None or W.dtype != dtype:
            residuals = itertools.repeat(None)
        restore_from(W, self._merged_blocks(factors), residuals)

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
        if self.merged or not self._uses_adapter():
            return self.weight.detach().clone()
        return merged_copy(self.weight, self._active_blocks())

    # -- state_dict ------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._merged_here() and _MERGED_WITH in self.__dict__ and prefix + "weight" in destination:
            # Merged with a named adapter: the state dict holds the base weight (a copy), unmarked, so
            # that it loads as the base next to every adapter's keys, whichever adapter is active then.
            destination[prefix + "weight"] = self.unmerged_weight()
            return
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
        factors = self._default_factors() if factors is None else tuple(f.to(W.device) for f in factors)
        self._merge_state, self.merged = (factors, W.dtype, None), True
        self._record_merged_with(None)  # a saved merge is the default adapter's
        merges = not self.training and self.merge_weights and self._merge_blocker() is None
        if merges and self.active_adapter == DEFAULT_ADAPTER:
            # the base that train() will restore is this one rounding, not the saved base
            self._merge_sums = (weight_sums(self.unmerged_weight()), weight_sums(W))
            return
        self.unmerge()
        if merges:  # another adapter is active: eval() merges that one
            self.merge()

    @torch.no_grad()
    def _preload_named(self, state_dict, prefix, name: str) -> None:
        """Copy the incoming tensors of the named adapter ``name`` (merged until now) into it before the
        re-merge: it is a child module, which ``load_state_dict`` loads only after this layer, so the
        re-merge would otherwise fold in its old values. Its own load then copies the same values (and
        reports its keys); a tensor that does not fit is left to that load to report."""
        holders = named_adapters(self)
        for local, param in (holders[name]._parameters.items() if name in holders else ()):
            t = state_dict.get(f"{prefix}{ADAPTERS_ATTR}.{name}.{local}")
            if isinstance(t, Tensor) and param is not None and t.shape == param.shape and t.is_floating_point():
                param.copy_(t)

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
        named = self.__dict__.get(_MERGED_WITH) if was_merged else None
        self.unmerge()
        if named is not None:
            self._preload_named(state_dict, prefix, named[0])
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
