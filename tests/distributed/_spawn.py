"""The 2-process launch the FSDP2 test files share: one ``mp.spawn`` of gloo workers, started before
the parent computes its one-process references, and a deadline that turns a deadlock into a failure."""
import contextlib
import os
import time

import pytest


@contextlib.contextmanager
def spawned(worker, folder, nprocs, needs=("transformers",)):
    """Run ``worker(rank, str(folder))`` on ``nprocs`` processes, yield their running context, and
    kill whatever is left when the block ends (a test that failed before joining leaves nothing)."""
    for module in needs:
        pytest.importorskip(module)
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.spawn(worker, args=(str(folder),), nprocs=nprocs, join=False)
    context.started = time.monotonic()
    try:
        yield context
    finally:
        for process in context.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def wait(context, deadline_s: float) -> None:
    """Join every process; past ``deadline_s`` from the start (a rank stuck in a collective), kill them
    and fail the test instead of hanging."""
    while not context.join(timeout=max(1.0, context.started + deadline_s - time.monotonic())):
        if time.monotonic() - context.started > deadline_s:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-process run did not finish in {deadline_s} s: a rank is stuck (a deadlock)")
    print(f"2-process run: {time.monotonic() - context.started:.1f} s")
