"""FSDP2 for Phi-3: :func:`fully_shard` shards every decoder layer, then the whole model (issue #22).

It makes exactly torch's own calls, which work on their own too (docs/distributed.md)::

    for layer in model.model.layers:
        torch.distributed.fsdp.fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    torch.distributed.fsdp.fully_shard(model, mesh=mesh, mp_policy=mp_policy)

and checks its arguments first on every rank together, so that a rank given a bad one raises the
same error everywhere instead of leaving the others waiting in a collective.
"""
from __future__ import annotations

from typing import List, Optional

import torch.nn as nn

from ...bases.quantized import _is_nf4
from ...core.sharded import fsdp_managed

__all__ = ["fully_shard"]


def decoder_layers(model: nn.Module) -> Optional[nn.ModuleList]:
    """The decoder layers of a ``Phi3ForCausalLM`` (``model.model.layers``) or ``Phi3Model`` (``model.layers``)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    return None


def _problem(model, mesh, mp_policy) -> Optional[str]:
    """What is wrong with this rank's arguments (None: nothing)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not isinstance(model, nn.Module) or decoder_layers(model) is None:
        return (f"model: expected a Phi-3 model with decoder layers (model.model.layers or model.layers, a "
                f"non-empty nn.ModuleList), got {type(model).__name__}")
    if any(fsdp_managed(m) for m in model.modules()):
        return "model: fully_shard was already called on it or on one of its modules; shard an unsharded model once"
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        return f"mesh: expected None (all ranks, torch's default mesh) or a DeviceMesh, got {type(mesh).__name__}"
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        return f"mp_policy: expected None (no mixed precision) or a MixedPrecisionPolicy, got {mp_policy!r}"
    return _nf4_problem(model, mesh)


#: The inner tensors of torchao's NF4Tensor that FSDP2 splits into shards (torchao's own list, whose names the
#: NF4Tensor carries): each must split into ``world`` equal parts.
NF4_SHARDED_INNER = ("quantized_scalers", "quantization_factor", "quantized_data")


def _nf4_problem(model, mesh) -> Optional[str]:
    """What torchao's NF4Tensor cannot do under ``fully_shard`` on ``mesh`` (None: nothing), found here because
    torchao fails later, in ``fully_shard`` or FSDP2's first forward, with an error that does not say why
    (torch 2.13, torchao 0.18: ``AssertionError: quantization_factor.numel() not divisible by 2``, ``ValueError:
    not enough values to unpack (expected 3, got 1)``). A ``MixedPrecisionPolicy`` with a ``param_dtype`` runs
    on 2 ranks: torchao keeps the gathered NF4 weight computing in the dtype it was quantized from."""
    nf4 = [(name, p) for name, p in model.named_parameters() if _is_nf4(p)]
    if not nf4:
        return None
    import torch.distributed as dist

    world = dist.get_world_size() if mesh is None else mesh.size()
    name, weight = nf4[0]
    if world == 1:
        return (f"model: torchao NF4 base weights ({name}, {len(nf4)} in all) on a mesh of one rank: FSDP2's "
                f"first forward fails there inside torchao (its all-gather hook is handed one tensor, not three). "
                f"Shard over 2 or more ranks, or train one process without fully_shard")
    uneven = [n for n, w in nf4 if w.size(0) % world or any(getattr(w, a).numel() % world for a in NF4_SHARDED_INNER)]
    if uneven:
        w = dict(nf4)[uneven[0]]
        sizes = ", ".join(f"{a} {getattr(w, a).numel()}" for a in NF4_SHARDED_INNER)
        listed = f"{uneven[:3]}" + (f" and {len(uneven) - 3} more" if len(uneven) > 3 else "")
        return (f"model: torchao NF4 base weights that do not split evenly over {world} ranks: {listed} "
                f"({uneven[0]}: {w.size(0)} rows, {sizes}); FSDP2 shards each weight's rows in {world} equal "
                f"parts and torchao splits its packed tensors alike (one scale factor per "
                f"{w.block_size * w.scaler_block_size} weights), failing inside torchao otherwise. Use a number "
                f"of ranks that divides every such count, or leave these layers unquantized (quantize_base's "
                f"targets)")
    return None


def _agree(problem: Optional[str]) -> None:
    """Raise on every rank if any rank found a problem: the first such rank's, named."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("phi3.fully_shard: torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group (run under torchrun) first")
    problems: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)  # over every rank of the default group, whatever the mesh
    bad = [(rank, p) for rank, p in enumerate(problems) if p is not None]
    if bad:
        rank, first = bad[0]
        raise ValueError(f"phi3.fully_shard: on rank {rank}, {first} (ranks with a bad argument: "
                         f"{[r for r, _ in bad]}; this call sharded nothing on any rank)")


def fully_shard(model: nn.Module, mesh=None, mp_policy=None) -> nn.Module:
    """Shard a Phi-3 model with FSDP2: each decoder layer, then the whole model (embeddings, final norm,
    lm_head and whatever else is left). Call it on every rank, after the adapters are on
    (:func:`apply_lora`) and before the optimizer is built (sharding replaces the parameters).

    Every rank of the default process group calls it (it checks the arguments of all of them together).

    Args:
        model: a ``Phi3ForCausalLM`` or ``Phi3Model``, built identically on every rank.
        mesh: a 1-D ``DeviceMesh`` of the ranks to shard over; None: all of them (torch's default, on the
            device of the model's parameters' type, from ``torch.distributed``'s default group).
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy``, for example
            ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``; None: none
            (the parameters compute in their own dtypes).

    Returns:
        ``model``, sharded in place: its parameters are DTensors, each rank holding a 1/N slice.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        ValueError: on every rank, if any rank's argument is bad (not a Phi-3 model, already sharded, a
            ``mesh`` or ``mp_policy`` of the wrong type): the same message, naming the rank and argument.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    _agree(_problem(model, mesh, mp_policy))
    policy = MixedPrecisionPolicy() if mp_policy is None else mp_policy
    for layer in decoder_layers(model):
        torch_fully_shard(layer, mesh=mesh, mp_policy=policy)
    torch_fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
