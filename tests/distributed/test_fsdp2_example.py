"""``lora_layers.phi3.fully_shard`` on 2 gloo processes (issue #22 item 8): the same sharding as torch's own calls.

One launch of 2 processes (:func:`_worker`) shards the tiny GQA Phi-3 of tests/distributed/test_fsdp2.py
twice, with the helper and with the plain ``fully_shard`` calls of that file (``_shard``), and rank 0 writes
what it found; the tests compare the two, and the gathered parameters with the unsharded model built here,
in one process. A rank given a bad argument makes every rank raise the same error, and no rank shards.
"""
import pathlib

import pytest
import torch
import torch.nn as nn
from _spawn import spawned, wait

from test_fsdp2 import WORLD, _batches, _build, _half, _shard

CASE = ("lora", 0.0)
#: Seconds the 2 processes may take; past it they are killed and the test fails (a deadlock never hangs).
TIMEOUT = 120


def _layout(model):
    """{parameter name: (placements, local shard)} and the names of the modules fully_shard manages as units."""
    from torch.distributed.fsdp import FSDPModule

    params = {n: (tuple(p.placements), p.to_local().detach().clone()) for n, p in model.named_parameters()}
    units = sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))
    return params, units


def _one_step(model, rank):
    """A forward and backward on this rank's half of the first batch: (the loss, every adapter gradient's shard)."""
    x = _half(_batches()[0], rank)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return float(loss), {n: p.grad.to_local().clone() for n, p in model.named_parameters() if p.grad is not None}


def _helper_and_plain(rank):
    from lora_layers.models import phi3

    helper, plain = phi3.fully_shard(_build(CASE)), _shard(_build(CASE))
    out = dict(helper=_layout(helper), plain=_layout(plain), full={n: p.full_tensor() for n, p in helper.named_parameters()})
    out["helper_step"], out["plain_step"] = _one_step(helper, rank), _one_step(plain, rank)
    return out


def _mixed_precision(rank):
    """The policy reaches every unit: the helper's bf16 step equals the plain calls' with the same policy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lora_layers.models import phi3

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    helper = phi3.fully_shard(_build(CASE), mp_policy=policy)
    plain = _build(CASE)
    for layer in plain.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(plain, mp_policy=policy)
    return dict(helper=_one_step(helper, rank), plain=_one_step(plain, rank), fp32=_one_step(phi3.fully_shard(
        _build(CASE)), rank))


def _bad_arguments(rank):
    """Rank 1 alone passes a bad argument: every rank must raise the same ValueError, and none shard."""
    from lora_layers.core.sharded import is_sharded
    from lora_layers.models import phi3

    cases = {"mesh": lambda m: dict(model=m, mesh="cpu" if rank == 1 else None),
             "mp_policy": lambda m: dict(model=m, mp_policy=torch.bfloat16 if rank == 1 else None),
             "model": lambda m: dict(model=nn.Linear(3, 3) if rank == 1 else m),
             "sharded twice": lambda m: dict(model=_shard(m) if rank == 1 else m)}  # torch's calls: no collective
    results = {}
    for name, arguments in cases.items():
        model = _build(CASE)
        kwargs = arguments(model)
        try:
            phi3.fully_shard(**kwargs)
            results[name] = (None, None)
        except (ValueError, RuntimeError) as e:
            results[name] = (type(e).__name__, str(e))
        if name != "sharded twice":
            results[name] += (any(is_sharded(p) for p in model.parameters()),)
    return results


def _nf4(**sizes):
    import lora_layers as L
    from conftest import make_tiny_phi3
    from lora_layers.models import phi3

    model = make_tiny_phi3(seed=0, **sizes)
    L.quantize_base(model)
    phi3.apply_lora(model, r=4, lora_alpha=8)
    return model


def _caught(call):
    try:
        call()
        return None
    except Exception as e:  # noqa: BLE001 (what each rank raised, compared by the tests)
        return type(e).__name__, str(e)


def _nf4_limits(rank):
    """torchao NF4 weights that do not split in 2 (the default tiny model: one scale factor per weight): the
    helper refuses on every rank before sharding, where torch's own calls fail inside torchao; weights that
    split (hidden and intermediate size 256) shard and step."""
    from torch.distributed.fsdp import fully_shard

    from lora_layers.core.sharded import is_sharded
    from lora_layers.models import phi3

    uneven, plain, even = _nf4(), _nf4(), _nf4(hidden_size=256, intermediate_size=256)
    out = dict(helper=_caught(lambda: phi3.fully_shard(uneven)), sharded=any(is_sharded(p) for p in uneven.parameters()),
               plain=_caught(lambda: [fully_shard(layer) for layer in plain.model.layers]))
    out["even"] = _caught(lambda: _one_step(phi3.fully_shard(even), rank))
    return out


def _worker(rank, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    try:
        results = dict(same=_helper_and_plain(rank), mixed=_mixed_precision(rank), bad=_bad_arguments(rank),
                       nf4=_nf4_limits(rank))
        for key in ("bad", "nf4"):
            gathered = [None] * WORLD
            dist.all_gather_object(gathered, results[key])
            results[key] = gathered
        torch.save(results, pathlib.Path(folder) / f"results{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Rank 0's and rank 1's results of the one launch; a deadlock fails after TIMEOUT seconds."""
    folder = tmp_path_factory.mktemp("fsdp2_example")
    with spawned(_worker, folder, WORLD) as context:
        wait(context, TIMEOUT)
    return [torch.load(folder / f"results{r}.pt", weights_only=False) for r in range(WORLD)]


def test_the_helper_shards_as_the_plain_torch_calls(sharded):
    for rank in range(WORLD):
        got = sharded[rank]["same"]
        (helper, helper_units), (plain, plain_units) = got["helper"], got["plain"]
        assert helper_units == plain_units == ["", "model.layers.0", "model.layers.1"]
        assert helper.keys() == plain.keys() and len(helper) > 0
        for name, (placements, local) in helper.items():
            assert placements == plain[name][0] and torch.equal(local, plain[name][1]), name
        assert got["helper_step"][0] == got["plain_step"][0]  # bitwise: the same computation
        grads, plain_grads = got["helper_step"][1], got["plain_step"][1]
        assert grads.keys() == plain_grads.keys() and len(grads) > 0
        assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)


def test_the_sharded_parameters_gather_to_the_unsharded_model(sharded):
    reference = dict(_build(CASE).named_parameters())
    full = sharded[0]["same"]["full"]
    assert full.keys() == reference.keys()
    for name, tensor in full.items():
        assert torch.equal(tensor, reference[name].detach()), name
    x = _batches()[0]  # one process's loss on the whole batch: the mean of the two halves' (equal lengths)
    loss = float(_build(CASE)(input_ids=x, labels=x).loss.detach())
    halves = sum(sharded[r]["same"]["helper_step"][0] for r in range(WORLD)) / WORLD
    assert abs(halves - loss) <= 1e-6


def test_the_mixed_precision_policy_reaches_every_unit(sharded):
    for rank in range(WORLD):
        got = sharded[rank]["mixed"]
        assert got["helper"][0] == got["plain"][0]
        assert all(torch.equal(got["helper"][1][n], got["plain"][1][n]) for n in got["plain"][1])
        assert got["helper"][0] != got["fp32"][0]  # bf16 compute: the policy took effect
        assert abs(got["helper"][0] - got["fp32"][0]) < 0.05


@pytest.mark.parametrize("argument", ["mesh", "mp_policy", "model", "sharded twice"])
def test_one_ranks_bad_argument_raises_the_same_error_on_every_rank(sharded, argument):
    seen = sharded[0]["bad"]
    assert seen == sharded[1]["bad"]
    kinds = [rank_results[argument] for rank_results in seen]
    assert kinds[0] == kinds[1], kinds
    kind, message = kinds[0][:2]
    assert kind == "ValueError" and "on rank 1" in message and "this call sharded nothing on any rank" in message
    expected = {"mesh": "mesh: expected None", "mp_policy": "mp_policy: expected None",
                "model": "model: expected a Phi-3 model", "sharded twice": "fully_shard was already called"}[argument]
    assert expected in message, message
    if argument != "sharded twice":
        assert kinds[0][2] is False  # nothing was sharded on rank 0 either


def test_without_a_process_group_it_says_to_initialize_one():
    pytest.importorskip("transformers")
    import torch.distributed as dist

    from lora_layers.models import phi3

    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        phi3.fully_shard(_build(CASE))


def test_nf4_weights_that_do_not_split_over_the_ranks_are_refused_before_sharding(sharded):
    pytest.importorskip("torchao")
    seen = sharded[0]["nf4"]
    assert seen[0]["helper"] == seen[1]["helper"] and seen[0]["helper"] is not None  # every rank, the same error
    kind, message = seen[0]["helper"]
    assert kind == "ValueError" and "do not split evenly over 2 ranks" in message, message
    assert "model.layers.0.self_attn.o_proj.weight: 64 rows, quantized_scalers 64, quantization_factor 1" in message
    assert "this call sharded nothing on any rank" in message and not seen[0]["sharded"] and not seen[1]["sharded"]
    # what it saves the user from: torch's own calls fail inside torchao, with a message that does not say why
    assert seen[0]["plain"] == ("AssertionError", "quantization_factor.numel() not divisible by 2"), seen[0]["plain"]
    assert seen[0]["even"] is None and seen[1]["even"] is None  # weights that split: sharded, a step ran


def test_nf4_on_a_mesh_of_one_rank_is_refused_where_torchao_would_fail(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torchao")
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lora_layers.core.sharded import is_sharded
    from lora_layers.models import phi3

    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        model = _nf4()
        with pytest.raises(ValueError, match="torchao NF4 base weights .* on a mesh of one rank"):
            phi3.fully_shard(model)
        assert not any(is_sharded(p) for p in model.parameters())
        plain = _nf4()  # torch's own calls: torchao fails in the first forward, with no word of why
        for layer in plain.model.layers:
            fully_shard(layer)
        fully_shard(plain)
        with pytest.raises(ValueError, match=r"not enough values to unpack \(expected 3, got 1\)"):
            plain(input_ids=_batches()[0])
    finally:
        dist.destroy_process_group()
