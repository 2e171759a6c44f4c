"""--fsdp in examples/phi3_finetune.py: FSDP2 sharding per decoder layer, and the folders its savers write.

Kept out of the main script so that it reads top to bottom. Under ``--fsdp`` every rank holds 1/N of each
parameter (a DTensor shard) and ``lora_layers.phi3.fully_shard`` makes torch's own calls::

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)

lora_layers' writers read the sharded model themselves (docs/distributed.md, "Checkpoints, exports and the
merged model"): ``save_lora``, ``export_peft`` and ``merged_state_dict`` are collectives that every rank
calls, gathering one layer at a time, and rank 0 writes what one process would write. No rank keeps an
unsharded copy of the model.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from phi3_checkpoints import Folders

import lora_layers as lora


def shard(run, model):
    """Shard ``model`` in place (every rank), then the dropout seed rule.

    Returns ``model``: build the optimizer after this, as sharding replaces the parameters.
    """
    lora.phi3.fully_shard(model)
    # docs/distributed.md, the dropout seed rule: base seed + rank, after building and sharding.
    torch.manual_seed(run.tc["seed"] + run.rank)
    return model


class RankZeroFolders(Folders):
    """Folders under --fsdp: every rank calls the savers, with the same paths (lora_layers' writers compare them),
    and rank 0 writes. Rank 0 makes the folder (atomic_folder) and shares its temp path; an error on rank 0
    (making it, writing into it, swapping it in) or on another rank is raised on every rank, so that no rank
    waits for the others in a collective they never reach."""

    def __init__(self, run):
        self.run, self.writer = run, run.master

    @contextlib.contextmanager
    def open(self, path, what, make_parent=False):
        opened, tmp, error, agreed = contextlib.ExitStack(), None, None, False
        if self.writer:
            try:
                tmp = opened.enter_context(super().open(path, what, make_parent))
            except Exception as e:
                error = e
        tmp = self.agree(f"making {what} ({path})", error, tmp)
        try:
            with opened:  # rank 0: swaps the folder in, once the block succeeded on every rank
                try:
                    yield tmp
                except Exception as e:
                    error = e
                self.agree(f"writing {what} ({path})", error)  # a rank failed: every rank raises, the old folder stays
                agreed = True
        except Exception as e:
            if not agreed:
                raise
            error = e  # rank 0 could not swap the folder in
        self.agree(f"swapping in {what} ({path})", error)

    def agree(self, what, error, value=None):
        """Rank 0's ``value`` on every rank; ``error`` raised where it happened, and a RuntimeError naming the
        first failed rank on the others (one all_gather_object: every rank calls it)."""
        reports = [None] * self.run.world_size
        dist.all_gather_object(reports, (None if error is None else f"{type(error).__name__}: {error}", value))
        if error is not None:
            raise error
        failed = [(rank, message) for rank, (message, _) in enumerate(reports) if message]
        if failed:
            raise RuntimeError(f"{what}: rank {failed[0][0]} of {self.run.world_size} failed ({failed[0][1]}), "
                               f"so every rank stops")
        return reports[0][1]


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
