"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensors outside its forward.

Inside forward and backward FSDP2 has gathered every parameter into a plain tensor; outside them
(``eval()``, ``merge()``, ``reset_magnitude()``, checkpoints) a parameter is a DTensor whose local
tensor is this rank's shard. What needs the whole tensor gathers it with torch's own
``DTensor.full_tensor()`` (:func:`gathered`), and writes a whole tensor back as this rank's shard
with ``distribute_tensor(..., src_data_rank=None)`` (:func:`write_shard`), which slices locally as
FSDP2 sharded it. Both are collectives or follow one: every rank calls them, as every rank calls
``eval()`` or ``train()``. ``torch.distributed.tensor`` is only looked up when already imported, so
plain use never imports it.

Model-level functions (checkpoints, exports, merged state dicts) run on every rank of a sharded model:
:func:`shard_group` finds the process group, :func:`on_every_rank` runs a step that may raise and makes
every rank raise the same error when any rank's step raised (so no rank goes on to a collective the
others never reach), and :func:`gathered_parameters` gives a layer its whole parameters for a while.
"""
from __future__ import annotations

import pickle
import sys
from contextlib import contextmanager
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["is_sharded", "fsdp_managed", "any_fsdp_managed", "check_not_unsharded", "gathered", "write_shard", "shard_group",
           "is_writer", "on_every_rank", "gathered_parameters", "shard_like"]


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (a parameter of a ``fully_shard`` module, outside its forward)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def fsdp_managed(module) -> bool:
    """Whether ``fully_shard`` manages ``module`` (it or an ancestor was sharded): its parameters are this
    rank's shards, or, between a root module's forward and its backward, gathered copies that FSDP2 frees."""
    return bool(getattr(module, "_is_fsdp_managed_module", False))


def any_fsdp_managed(model: nn.Module) -> bool:
    """Whether ``fully_shard`` manages ``model`` or any module in it, or a parameter is sharded (a DTensor). The
    same answer on every rank of a model built and sharded alike, so a refusal on it needs no collective to be
    raised by every rank."""
    return shard_group(model) is not None or any(fsdp_managed(m) for m in model.modules())


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
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(full.to(t.dtype), t.device_mesh, t.placements, src_data_rank=None).to_local()
    t.to_local().copy_(local)


def shard_group(module: nn.Module):
    """The process group over which ``module``'s parameters are sharded (that of the first DTensor's
    one-dimensional mesh; the default group for a mesh of more dimensions), or None when none is sharded."""
    for p in module.parameters():
        if is_sharded(p):
            import torch.distributed as dist

            mesh = p.device_mesh
            return mesh.get_group() if mesh.ndim == 1 else dist.group.WORLD
    return None


def is_writer(group) -> bool:
    """Whether this process writes a model-level file: always without a group, else rank 0 of ``group``."""
    if group is None:
        return True
    import torch.distributed as dist

    return dist.get_rank(group) == 0


def _report(error: Optional[BaseException]):
    """What another rank needs to raise ``error`` again: ``(class, message)``; ``RuntimeError`` for a class
    that does not pickle (a local class)."""
    if error is None:
        return None
    cls = type(error)
    try:
        pickle.dumps(cls)
    except Exception:
        return RuntimeError, f"{cls.__name__}: {error}"
    return cls, str(error)


def _rebuilt(report, rank: int, world: int) -> BaseException:
    cls, message = report
    message = f"{message} (raised on rank {rank} of {world}; every rank raises it)"
    try:
        return cls(message)
    except Exception:
        return RuntimeError(f"{cls.__name__}: {message}")


def on_every_rank(group, what: str, step: Callable[[], Any], same: Optional[Dict[str, Any]] = None):
    """``step()``, run on every rank of ``group`` (or alone without one), then agreed on: when it raised
    on some rank, or the arguments in ``same`` differ between ranks, every rank raises the same error
    (the lowest failing rank's class and message), so that no rank goes on to a collective that the others
    never reach. One ``all_gather_object``: every rank must call it.

    Raises:
        ValueError: a value of ``same`` differs between ranks (names it and each rank's value).
    """
    if group is None:
        return step()
    import torch.distributed as dist

    try:
        result, error = step(), None
    except Exception as exc:
        result, error = None, exc
    mine = (_report(error), {k: repr(v) for k, v in (same or {}).items()})
    reports = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, mine, group=group)
    for name in same or {}:
        values = [r[1][name] for r in reports]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {i} {v}" for i, v in enumerate(values))
            raise ValueError(f"{what}: {name} differs between ranks ({per_rank}); every rank of a sharded model "
                             f"calls {what} with the same {name}")
    for rank, (report, _) in enumerate(reports):
        if report is not None:
            raise _rebuilt(report, rank, len(reports)) from error
    return result


@contextmanager
def gathered_parameters(module: nn.Module):
    """Within the block, each sharded parameter of ``module`` itself (not of its children) is replaced by a
    plain ``Parameter`` holding the whole tensor (gathered: a collective, every rank enters the block);
    the shards are put back on leaving. For reading only: writes into the whole tensors are lost."""
    saved = {}
    try:
        for name, p in list(module._parameters.items()):
            if p is not None and is_sharded(p):
                saved[name] = p
                module._parameters[name] = nn.Parameter(gathered(p), requires_grad=p.requires_grad)
        yield module
    finally:
        module._parameters.update(saved)


def shard_like(full: Tensor, like) -> Tensor:
    """``full`` as a DTensor placed as the DTensor ``like`` (its mesh and placements): each rank keeps its own
    slice, cut locally (``src_data_rank=None``), so every rank must pass the same ``full``; no data moves.
    (A sharded optimizer's state, loaded from whole tensors, is placed so.)"""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
