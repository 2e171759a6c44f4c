"""Exact resume under FSDP2 (issue #22 item 5): save_training_state / load_training_state on a model sharded
with torch's own ``fully_shard``, with its DTensor optimizer state, on 2 gloo processes against one process.

One launch of 2 processes (:func:`_worker`) runs everything distributed; each rank writes what it gathered
into a folder, and the tests compare it with references computed here, in one process. The model, the data,
the seed rule and the one-process reference are test_fsdp2.py's (imported, not copied); the case is DoRA at
dropout 0.05, so that DoRA's norm is gathered and every rank's dropout stream matters to the resume.

- **Exact resume**: 10 AdamW steps on 2 ranks, saving after step 5; a fresh sharded model that loads the file
  and runs steps 6 to 10 gives bitwise the same losses, adapter parameters, optimizer state (DTensors,
  gathered) and RNG states. The run that saved equals one process's run bitwise (saving changed nothing).
- **Another world size**: the 2-rank file loads into one process (2 -> 1), and a file one process wrote
  loads on 2 ranks (1 -> 2), the values bit for bit, with a warning about the RNG states.
- **Every rank raises the same error**: a corrupted file on rank 1 only, and a bad ``step`` on rank 1 only:
  both ranks raise the same error naming rank 1, nothing changes and nothing is written. The process
  group has a timeout, and the launch a deadline, so a deadlock fails rather than hangs.
"""
import datetime
import pathlib
import warnings

import pytest
import torch
from _spawn import spawned, wait

from test_fsdp2 import BASE_SEED, LR, STEPS, WORLD, _adapters, _batches, _build, _full, _half, _shard, \
    _train_reference

CASE = ("dora", 0.05)
SAVE_AT = 5
DEADLINE_S = 240  # the whole launch; a deadlock fails the tests instead of hanging them


def _optimizer(model):
    return torch.optim.AdamW(list(_adapters(model).values()), lr=LR)


def _snapshot(model, opt):
    """Whole adapter parameters and optimizer state (DTensors gathered: collectives, on every rank)."""
    state = {key: {name: _full(value) if isinstance(value, torch.Tensor) else value for name, value in entry.items()}
             for key, entry in opt.state_dict()["state"].items()}
    return dict(params={n: _full(p) for n, p in _adapters(model).items()}, opt=state,
                rng=torch.get_rng_state())


def _steps(model, opt, rank, batches):
    import torch.distributed as dist

    losses = []
    for batch in batches:
        opt.zero_grad()
        x = _half(batch, rank)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / WORLD)
        opt.step()
    return losses


def _uninterrupted(rank, folder):
    """10 steps, saving after step 5 (every rank calls; rank 0 writes)."""
    import lora_layers as L

    model = _shard(_build(CASE))
    opt = _optimizer(model)
    torch.manual_seed(BASE_SEED + rank)
    losses = _steps(model, opt, rank, _batches()[:SAVE_AT])
    at_save = _snapshot(model, opt)
    L.save_training_state(folder / "state5.pt", model, opt, step=SAVE_AT, extra={"note": "fsdp2"})
    losses += _steps(model, opt, rank, _batches()[SAVE_AT:])
    return dict(losses=losses, at_save=at_save, end=_snapshot(model, opt))


def _resumed(rank, folder):
    """A fresh sharded model and optimizer, another RNG state; load, then steps 6 to 10."""
    import lora_layers as L

    model = _shard(_build(CASE))
    opt = _optimizer(model)
    torch.manual_seed(99 + rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = L.load_training_state(folder / "state5.pt", model, opt)
    loaded = _snapshot(model, opt)
    losses = _steps(model, opt, rank, _batches()[info["step"]:])
    return dict(info=info, loaded=loaded, losses=losses, end=_snapshot(model, opt),
                warnings=[str(w.message) for w in caught])


def _one_to_two(rank, folder):
    """Rank 0 alone loads the 2-rank file into an unsharded model and saves it as one process; both ranks
    then load that file into a sharded model."""
    import torch.distributed as dist

    import lora_layers as L

    if rank == 0:
        model = _build(CASE)
        opt = _optimizer(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "saved by 2 rank(s) and loads on 1", tested in one process below
            L.load_training_state(folder / "state5.pt", model, opt)
        L.save_training_state(folder / "one5.pt", model, opt, step=SAVE_AT, extra={"note": "fsdp2"})
    dist.barrier()
    model = _shard(_build(CASE))
    opt = _optimizer(model)
    torch.manual_seed(77 + rank)
    before = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.load_training_state(folder / "one5.pt", model, opt)
    return dict(loaded=_snapshot(model, opt), rng_before=before, warnings=[str(w.message) for w in caught])


def _error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def _bad_on_rank1(rank, folder):
    """Rank 1 alone reads a corrupted file, then another valid file; alone passes an ``extra`` that is not
    plain data, another step, another path: every rank must raise the same error; nothing loads or is written."""
    import torch.distributed as dist

    import lora_layers as L

    if rank == 1:
        data = bytearray((folder / "state5.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "corrupted.pt").write_bytes(bytes(data))
    dist.barrier()
    model = _shard(_build(CASE))
    opt = _optimizer(model)
    before = _snapshot(model, opt)
    load = _error(L.load_training_state, folder / ("state5.pt" if rank == 0 else "corrupted.pt"), model, opt)
    after = _snapshot(model, opt)
    unchanged = all(torch.equal(before["params"][n], after["params"][n]) for n in before["params"])
    other = _error(L.load_training_state, folder / ("state5.pt" if rank == 0 else "one5.pt"), model, opt)
    after = _snapshot(model, opt)
    unchanged = unchanged and all(torch.equal(before["params"][n], after["params"][n]) for n in before["params"])
    save = _error(L.save_training_state, folder / "bad_step.pt", model, opt, step=SAVE_AT,
                  extra={"f": None if rank == 0 else print})
    other_step = _error(L.save_training_state, folder / "bad_step.pt", model, opt, step=SAVE_AT + rank)
    other_path = _error(L.save_training_state, folder / f"rank{rank}.pt", model, opt, step=SAVE_AT)
    dist.barrier()
    return dict(load=load, other=other, unchanged=unchanged and not after["opt"], save=save, other_step=other_step,
                other_path=other_path, written=[f.name for f in folder.iterdir() if f.name.startswith(("bad", "rank"))])


def _small_run(rank, folder, resume):
    """A LoRA Linear with 7 outputs (uneven shards: 4 and 3 rows) whose bias trains too (saved as a trained
    parameter beyond the adapter), AdamW and a StepLR: 4 steps, saving after step 2, or resuming there."""
    import torch.nn as nn
    from torch.distributed.fsdp import fully_shard

    import lora_layers as L

    torch.manual_seed(21)
    model = nn.Sequential(L.Linear(13, 7, r=3, lora_alpha=6))
    nn.init.normal_(model[0].lora_B, std=0.3)
    L.mark_only_lora_as_trainable(model, bias="lora_only")
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    gen = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(4, 13, generator=gen) for _ in range(4)]
    start = L.load_training_state(folder / "small.pt", model, opt, sched)["step"] if resume else 0
    for i in range(start, 4):
        model(xs[i]).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if not resume and i == 1:
            L.save_training_state(folder / "small.pt", model, opt, sched, step=2)
    trained = {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}
    state = {key: {name: _full(value) for name, value in entry.items()} for key, entry in opt.state_dict()["state"].items()}
    return dict(params=trained, opt=state, sched=sched.state_dict(), shard=tuple(model[0].bias.to_local().shape))


def _worker(rank, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)
    folder = pathlib.Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=90))
    try:
        results = dict(uninterrupted=_uninterrupted(rank, folder))
        results["resumed"] = _resumed(rank, folder)
        results["one_to_two"] = _one_to_two(rank, folder)
        results["bad"] = _bad_on_rank1(rank, folder)
        results["small"] = [_small_run(rank, folder, resume) for resume in (False, True)]
        torch.save(results, folder / f"results{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- the launch and the one-process references -----------------------------------------------------------
@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2_resume")
    with spawned(_worker, folder, WORLD) as context:
        yield context, folder


@pytest.fixture(scope="module")
def reference(launch):
    """One process's 10 steps (each half from its rank's RNG stream), computed while the 2 processes run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            return _train_reference(CASE)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks(launch, reference):
    """Each rank's results, once both processes ended (within DEADLINE_S, or the tests fail)."""
    context, folder = launch
    wait(context, DEADLINE_S)
    return [torch.load(folder / f"results{r}.pt", weights_only=False) for r in range(WORLD)], folder


def _assert_equal(a, b):
    """Bitwise equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (sorted(a), sorted(b) if isinstance(b, dict) else b)
        for key in a:
            _assert_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


# -- the tests -----------------------------------------------------------------------------------------------
def test_resume_after_step_5_equals_the_uninterrupted_2_rank_run_bitwise(ranks, reference):
    results, _ = ranks
    for rank, got in enumerate(results):
        full, resumed = got["uninterrupted"], got["resumed"]
        assert resumed["info"] == {"step": SAVE_AT, "extra": {"note": "fsdp2"}} and not resumed["warnings"]
        _assert_equal(resumed["loaded"], full["at_save"])  # adapter, optimizer state and this rank's RNG
        assert resumed["losses"] == full["losses"][SAVE_AT:]
        _assert_equal(resumed["end"], full["end"])
    assert results[0]["uninterrupted"]["losses"] == results[1]["uninterrupted"]["losses"]
    assert not torch.equal(results[0]["uninterrupted"]["at_save"]["rng"], results[1]["uninterrupted"]["at_save"]["rng"])
    # the run that saved is one process's run without a save, bit for bit: saving changed nothing
    full = results[0]["uninterrupted"]
    assert len(full["losses"]) == STEPS and full["losses"] == reference["losses"]
    _assert_equal(full["end"]["params"], reference["params"])
    assert full["end"]["opt"] and all(isinstance(entry["exp_avg"], torch.Tensor) for entry in full["end"]["opt"].values())


def test_rank_0_writes_the_file_one_process_writes_plus_every_ranks_rng(ranks):
    import lora_layers as L
    from lora_layers.io.training_state import KEY_RANK_RNGS, payload_sha256

    results, folder = ranks
    saved = torch.load(folder / "state5.pt", weights_only=True)
    one = torch.load(folder / "one5.pt", weights_only=True)  # one process, after loading the 2-rank file
    rngs = saved["state"].pop(KEY_RANK_RNGS)
    assert [torch.equal(r["torch"], got["uninterrupted"]["at_save"]["rng"]) for r, got in zip(rngs, results)] == [
        True, True]
    _assert_equal(saved["state"], one["state"])  # the same content: tensors bit for bit, every field
    assert payload_sha256(saved["state"]) == one["sha256"]
    at_save = results[0]["uninterrupted"]["at_save"]
    _assert_equal(saved["state"]["adapter"]["tensors"], at_save["params"])
    _assert_equal(saved["state"]["optimizer"]["state_dict"]["state"], at_save["opt"])
    assert L.__version__ == saved["state"]["library_version"]


def test_a_2_rank_file_loads_in_one_process_bit_for_bit(ranks):
    import lora_layers as L

    results, folder = ranks
    model = _build(CASE)
    opt = _optimizer(model)
    with pytest.warns(UserWarning, match=r"saved by 2 rank\(s\) and loads on 1"):
        info = L.load_training_state(folder / "state5.pt", model, opt)
    assert info["step"] == SAVE_AT
    got = dict(params={n: p.detach() for n, p in _adapters(model).items()}, opt=opt.state_dict()["state"],
               rng=torch.get_rng_state())
    _assert_equal(got, results[0]["uninterrupted"]["at_save"])  # rank 0's RNG, every value bit for bit
    x = _half(_batches()[SAVE_AT], 0)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()  # the restored state steps


def test_a_one_process_file_loads_on_2_ranks_bit_for_bit(ranks):
    results, _ = ranks
    at_save = results[0]["uninterrupted"]["at_save"]
    for rank, got in enumerate(results):
        loaded = got["one_to_two"]["loaded"]
        _assert_equal(loaded["params"], at_save["params"])
        _assert_equal(loaded["opt"], at_save["opt"])
        assert len(got["one_to_two"]["warnings"]) == 1
        assert "saved by 1 rank(s) and loads on 2" in got["one_to_two"]["warnings"][0]
    assert torch.equal(results[0]["one_to_two"]["loaded"]["rng"], at_save["rng"])  # rank 0: the file's
    assert torch.equal(results[1]["one_to_two"]["loaded"]["rng"], results[1]["one_to_two"]["rng_before"])  # kept


def test_a_bad_file_or_argument_on_one_rank_raises_the_same_error_on_every_rank(ranks):
    results, _ = ranks
    loads = [got["bad"]["load"] for got in results]
    assert loads[0] is not None and loads == [loads[0]] * WORLD
    assert loads[0][0] == "CheckpointError" and "corrupted" in loads[0][1]
    assert loads[0][1].endswith("(raised on rank 1 of 2; every rank raises it)")
    assert all(got["bad"]["unchanged"] for got in results)  # nothing loaded on either rank
    saves = [got["bad"]["save"] for got in results]
    assert saves[0] is not None and saves == [saves[0]] * WORLD and saves[0][0] == "TypeError"
    assert saves[0][1].startswith("extra['f'] is a builtin_function_or_method")
    assert saves[0][1].endswith("(raised on rank 1 of 2; every rank raises it)")
    assert not any(got["bad"]["written"] for got in results)


def test_ranks_that_read_different_files_or_pass_different_steps_all_raise(ranks):
    """Two valid files, one per rank (each would keep its slice of other values), steps 5 and 6, and two
    paths: every rank raises the same ValueError, and nothing is loaded or written."""
    results, _ = ranks
    others = [got["bad"]["other"] for got in results]
    assert others[0] is not None and others == [others[0]] * WORLD and others[0][0] == "ValueError"
    assert others[0][1].startswith("load_training_state: file (its SHA-256) differs between ranks (rank 0 '")
    paths = [got["bad"]["other_path"] for got in results]
    assert paths[0] is not None and paths == [paths[0]] * WORLD and paths[0][0] == "ValueError"
    assert paths[0][1].startswith("save_training_state: path_or_dir differs between ranks (rank 0 ")
    steps = [got["bad"]["other_step"] for got in results]
    assert steps == [("ValueError", "save_training_state: step differs between ranks (rank 0 5, rank 1 6); every "
                                    "rank of a sharded model calls save_training_state with the same step")] * WORLD
    assert all(got["bad"]["unchanged"] for got in results)


def test_trained_biases_uneven_shards_and_a_scheduler_resume_bitwise(ranks):
    results, _ = ranks
    assert [got["small"][0]["shard"] for got in results] == [(4,), (3,)]  # 7 rows: uneven shards
    for got in results:
        uninterrupted, resumed = got["small"]
        assert "0.bias" in uninterrupted["params"] and uninterrupted["sched"]["last_epoch"] == 4
        _assert_equal(resumed, uninterrupted)
