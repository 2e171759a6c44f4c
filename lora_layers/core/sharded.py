"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensors outside its forward.

Inside forward and backward FSDP2 has gathered every parameter into a plain tensor; outside them
(``eval()``, ``merge()``, ``reset_magnitude()``, checkpoints) a parameter is a DTensor whose local
tensor is this rank's shard. What needs the whole tensor gathers it with torch's own
``DTensor.full_tensor()`` (:func:`gathered`), and writes a whole tensor back as this rank's shard
with ``distribute_tensor(..., src_data_rank=None)`` (:func:`write_shard`), which slices locally as
FSDP2 sharded it. Both are collectives or follow one: every rank calls them, as every rank calls
``eval()`` or ``train()``. ``torch.distributed.tensor`` is only looked up when already imported, so
plain use never imports it.

A model-level function on a sharded model runs on every rank, and a rank that fails must not leave the
others waiting in a collective: :func:`together` runs a function's checks on every rank and raises the
same error on every rank when any rank failed; :func:`same_on_every_rank` refuses values that differ.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["is_sharded", "fsdp_managed", "check_not_unsharded", "gathered", "write_shard", "shard_like",
           "world", "raise_together", "together", "same_on_every_rank"]


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (a parameter of a ``fully_shard`` module, outside its forward)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def fsdp_managed(module) -> bool:
    """Whether ``fully_shard`` manages ``module`` (it or an ancestor was sharded): its parameters are this
    rank's shards, or, between a root module's forward and its backward, gathered copies that FSDP2 frees."""
    return bool(getattr(module, "_is_fsdp_managed_module", False))


def check_not_unsharded(module, t: Tensor, what: str) -> None:
    """Refuse to write into ``t``, a parameter of ``module``, while FSDP2 holds it gathered: the write would
    go into a copy that FSDP2 frees at its next reshard, leaving the shard as it was."""
    if fsdp_managed(module) and not is_sharded(t):
        raise RuntimeError(f"{what}: fully_shard holds this layer's parameters gathered now (a root module keeps "
                           f"them so between its forward and its backward), and a write would go into a copy "
                           f"that it frees. Call .reshard() on the fully_shard module first")


def gathered(t: Tensor) -> Tensor:
    """The whole of ``t``, detached: ``t.full_tensor()`` for a DTensor (a collective), else ``t`` itself."""
    return t.detach().full_tensor() if is_sharded(t) else t.detach()


@torch.no_grad()
def write_shard(t: Tensor, full: Tensor) -> None:
    """Write the whole tensor ``full`` into ``t`` in place: into this rank's shard of a DTensor, else all of it.

    Every rank passes the same ``full`` (computed from :func:`gathered` values), so no data moves.
    """
    if not is_sharded(t):
        t.copy_(full)
        return
    t.to_local().copy_(shard_like(full.to(t.dtype), t).to_local())


def shard_like(full: Tensor, like) -> Tensor:
    """``full`` as a DTensor placed as the DTensor ``like`` (its mesh and placements): each rank keeps its own
    slice, cut locally (``src_data_rank=None``), so every rank must pass the same ``full``; no data moves."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


# -- every rank calls, every rank raises ----------------------------------------------------------------------
def world():
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when torch.distributed is not running."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def raise_together(error) -> None:
    """A collective over the default group: each rank passes the exception it met, or None. When any rank
    met one, every rank raises the same error (the lowest such rank's type and message, naming the rank),
    so that no rank goes on into a collective that a failed rank never reaches. In one process it raises
    ``error`` itself, unchanged."""
    rank, size = world()
    if size == 1:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    found = [None] * size
    dist.all_gather_object(found, None if error is None else (type(error), str(error)))
    failed = next((r for r, item in enumerate(found) if item is not None), None)
    if failed is None:
        return
    cls, message = found[failed]
    text = f"on rank {failed} of {size}: {message}"
    try:
        same = cls(text)
    except Exception:  # an exception class that does not take one message
        same = RuntimeError(f"{cls.__name__} {text}")
    raise same from error


def together(fn, *args):
    """``fn(*args)`` on every rank, then :func:`raise_together`: its result where no rank failed."""
    try:
        result, error = fn(*args), None
    except Exception as exc:
        result, error = None, exc
    raise_together(error)
    return result


def same_on_every_rank(value, what: str) -> None:
    """A collective over the default group: raise the same ValueError on every rank unless every rank passes
    an equal ``value`` (plain data: it is pickled); ``what`` names it in the message. Nothing in one process."""
    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    values = [None] * size
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        seen = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise ValueError(f"{what} differs between the ranks ({seen}); every rank must pass the same")
