"""--fsdp in examples/phi3_finetune.py: FSDP2 sharding per decoder layer, and the gathered copy the exports use.

Kept out of the main script so that it reads top to bottom. Under ``--fsdp`` every rank holds 1/N of each
parameter (a DTensor shard) and ``lora_layers.phi3.fully_shard`` makes torch's own calls::

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)

Until lora_layers' checkpoint functions read a sharded model themselves (issue #22 item 4), the
adapter files and the merged model are written from a copy of the unsharded model that rank 0 keeps on
the CPU: at each save every rank gathers the trained adapters with torch's
``get_model_state_dict(..., StateDictOptions(full_state_dict=True, cpu_offload=True))`` and rank 0
loads them into its copy. That copy costs rank 0 one unsharded model of CPU memory.
"""
from __future__ import annotations

import contextlib
import copy

import torch

import lora_layers as lora


def shard(run, model):
    """Shard ``model`` in place (every rank), after rank 0 copies it for the exports; then the dropout seed rule.

    Returns ``model``: build the optimizer after this, as sharding replaces the parameters.
    """
    run.export_copy = copy.deepcopy(model).to("cpu") if run.master else None
    lora.phi3.fully_shard(model)
    # docs/distributed.md, the dropout seed rule: base seed + rank, after building and sharding.
    torch.manual_seed(run.tc["seed"] + run.rank)
    return model


def for_export(run):
    """The model the savers read: under --fsdp (on every rank: it is a collective), rank 0's copy holding the
    gathered trained adapters (None on the other ranks); otherwise the model itself."""
    if not run.fsdp:
        return run.raw_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    adapters = get_model_state_dict(run.raw_model, options=options)  # whole tensors on rank 0, {} elsewhere
    if not run.master:
        return None
    result, n = run.export_copy.load_state_dict(adapters, strict=False), len(list(lora.lora_parameters(run.export_copy)))
    if result.unexpected_keys or len(adapters) != n:
        raise RuntimeError(f"the gathered adapters do not fit rank 0's copy: unexpected {result.unexpected_keys}, "
                           f"{len(adapters)} tensors for {n} adapters")
    return run.export_copy


def gradient_sync(run, last: bool):
    """The context of a micro-batch's forward and backward: gradients are reduced over the ranks on the last
    micro-batch of a step only (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if last or not run.ddp:
        return contextlib.nullcontext()
    if not run.fsdp:
        return run.model.no_sync()

    @contextlib.contextmanager
    def no_sync():
        run.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            run.model.set_requires_gradient_sync(True)

    return no_sync()
