"""FSDP2 (torch's own ``fully_shard``) on 2 gloo processes on CPU, against one process (issue #22).

Everything distributed runs in one launch of 2 processes (:func:`_worker`), which writes what rank 0
gathered into a folder; the tests compare it with a reference computed here, in this one process, on
an unsharded copy of the same model. The rules they check are docs/distributed.md's:

- **Training parity**: each rank takes half of the batch; losses, every adapter gradient and every
  adapter parameter after 10 AdamW steps equal one process's on the whole batch within 1e-6 (fp32).
- **The dropout seed rule**: each rank seeds torch with ``BASE_SEED + rank`` after building and
  sharding the model. The one-process reference runs each half-batch from that half's RNG state and
  sums the half-gradients, which reproduces every rank's masks exactly.
- **DoRA's norm** comes from the whole weight, also where a shard boundary splits every row.
- **eval() under FSDP2** does not merge into a shard: it serves the adapter unmerged, its logits equal
  one process's, and train() after it changes nothing.
"""
import pathlib

import pytest
import torch
import torch.nn as nn

from _spawn import spawned, wait
from conftest import make_tiny_phi3

WORLD = 2
DEADLINE_S = 600  # the launch takes under a minute; past this, a rank is stuck: fail instead of hanging
BASE_SEED = 1234
STEPS = 10
TOL = 1e-6
BATCH, SEQ = 4, 12  # each rank takes BATCH // WORLD sequences
#: AdamW's step is g / sqrt(v): where an element's gradient is near 0, a rounding difference in it (the
#: whole batch summed at once, or two halves averaged: 3e-9 here) becomes a step difference of up to lr.
#: In one process, whole batch against halves, DoRA's adapters differed by 2.6e-6 after 10 steps at lr 1e-2,
#: 3e-7 at 1e-3: this lr keeps the comparison about sharding, not about AdamW's amplification.
LR = 1e-3

#: name -> apply_lora's settings: plain Linear adapters, DoRA everywhere (fused layers included), and
#: MergedLinear's GQA splits with adapters on q and v only, each with dropout 0 and 0.05; then, with
#: dropout 0.05 (whose seeds a recomputation must draw again), DoRA with gradient checkpointing
#: (non-reentrant) and lean mode (the fused loss, adapter inputs recomputed in backward).
SETTINGS = {
    "lora": dict(targets=("o_proj", "down_proj")),
    "dora": dict(use_dora=True),
    "merged_gqa": dict(targets=("qkv_proj", "gate_up_proj"), qkv=("q", "v")),
    "dora_checkpointing": dict(use_dora=True, gradient_checkpointing=True),
    "lean": dict(lean=True),
}
CASES = [(name, p) for name in ("lora", "dora", "merged_gqa") for p in (0.0, 0.05)]
CASES += [("dora_checkpointing", 0.05), ("lean", 0.05)]


def _case_id(case):
    return f"{case[0]}-p{case[1]}"


# -- the model and the data, the same on every rank and in the reference --------------------------------
def _build(case) -> nn.Module:
    from lora_layers.models import phi3

    name, p = case
    model = make_tiny_phi3(seed=0)
    phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=p, **SETTINGS[name])
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B = 0 would leave A's first gradients 0 and DoRA's norm that of W alone
        for param_name, param in sorted(model.named_parameters()):
            if param_name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.train()


def _batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 128, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def _eval_batch():
    return torch.randint(3, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def _half(batch, rank):
    n = BATCH // WORLD
    return batch[rank * n:(rank + 1) * n]


def _adapters(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _full(t):
    from lora_layers.core.sharded import gathered

    return gathered(t).clone()


# -- the 2-process side ------------------------------------------------------------------------------------
def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _train_sharded(case, rank, build=None, shard=None):
    """``build(case)`` (default :func:`_build`) sharded by ``shard(model)`` (default :func:`_shard`), trained."""
    import torch.distributed as dist

    model = (shard or _shard)((build or _build)(case))
    opt = torch.optim.AdamW(list(_adapters(model).values()), lr=LR)
    torch.manual_seed(BASE_SEED + rank)  # the seed rule: after building and sharding, base + rank
    first_seeds = _peek_first_seeds()
    losses, batches = [], _batches()
    for step, batch in enumerate(batches):
        opt.zero_grad()
        x = _half(batch, rank)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / WORLD)
        if step == len(batches) - 1:  # the last step's gradients are compared (one gather each, not one a step)
            grads = {n: _full(p.grad) for n, p in _adapters(model).items()}
        opt.step()
    params = {n: _full(p) for n, p in _adapters(model).items()}
    return model, dict(losses=losses, grads=grads, params=params, first_seeds=first_seeds)


def _peek_first_seeds():
    """Every rank's next dropout seed (gathered), leaving each rank's RNG as it was."""
    import torch.distributed as dist

    from lora_layers.core.dropout import draw_seed

    with torch.random.fork_rng():
        mine = draw_seed()
    seeds = [None] * WORLD
    dist.all_gather_object(seeds, mine)
    return seeds


def _eval_sharded(model, rank):
    """eval() on the sharded model: nothing merges, logits of each half gathered; train() after it."""
    import torch.distributed as dist

    import lora_layers as L

    before = {n: _full(p) for n, p in model.named_parameters()}
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, L.LoRALayer)]
    merged = [m.merged for m in layers]
    try:
        layers[0].merge()
        merge_error = None
    except ValueError as e:
        merge_error = str(e)
    merge_errors = [None] * WORLD
    dist.all_gather_object(merge_errors, merge_error)  # the same error on every rank
    with torch.no_grad():
        logits = model(input_ids=_half(_eval_batch(), rank)).logits.contiguous()
    parts = [torch.empty_like(logits) for _ in range(WORLD)]
    dist.all_gather(parts, logits)
    model.train()
    after = {n: _full(p) for n, p in model.named_parameters()}
    unchanged = all(torch.equal(before[n], after[n]) for n in before)
    return dict(logits=torch.cat(parts), merged=merged, merge_errors=merge_errors, unchanged=unchanged)


def _worker(rank, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case in CASES:
            model, results[case] = _train_sharded(case, rank)
            results[case]["eval"] = _eval_sharded(model, rank)
        results["dora_rows"] = _dora_rows_sharded(rank)
        results["merged_then_sharded"] = _merged_then_sharded()
        if rank == 0:
            torch.save(results, pathlib.Path(folder) / "results.pt")
    finally:
        dist.destroy_process_group()


# -- DoRA's norm where a shard boundary splits every row ----------------------------------------------------
def _dora_layer():
    """A DoRA Linear stored (in, out) (GPT-2 Conv1D's layout): FSDP2 shards dim 0, the input dim, so each
    output row's norm needs both ranks' shards; out = 7 also shards lora_B and the magnitude unevenly."""
    import lora_layers as L

    torch.manual_seed(11)
    layer = L.Linear(13, 7, r=3, lora_alpha=6, fan_in_fan_out=True, use_dora=True)
    nn.init.normal_(layer.lora_B, std=0.3)
    layer.reset_magnitude()
    with torch.no_grad():
        layer.lora_magnitude.mul_(torch.linspace(0.5, 1.5, 7))  # not the norm itself
    return nn.Sequential(layer).train()


def _dora_rows_sharded(rank):
    from torch.distributed.fsdp import fully_shard

    from lora_layers.core.sharded import is_sharded

    model = _dora_layer()
    fully_shard(model)
    layer = model[0]
    shard_rows = tuple(layer.weight.to_local().shape)
    seen = []
    norm_of = layer._dora_norm

    def recording_norm():  # what forward computes the norm from, and the norm
        seen.append((is_sharded(layer.weight), tuple(layer.weight.shape), norm_of().clone()))
        return seen[-1][2]

    layer._dora_norm = recording_norm
    x = torch.randn(4, 5, 13, generator=torch.Generator().manual_seed(rank))
    model(x).square().mean().backward()  # each rank's mean; FSDP2 averages the ranks' gradients
    del layer._dora_norm
    outside = layer._dora_norm()  # outside forward: the weight is a DTensor, gathered for the norm
    grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.requires_grad}
    layer.reset_magnitude()
    return dict(shard_rows=shard_rows, forward=seen, outside=outside, grads=grads,
                reset=_full(layer.lora_magnitude))


# -- a model merged (eval) before fully_shard, trained again after ------------------------------------------
def _merged_model():
    import lora_layers as L

    torch.manual_seed(13)
    model = nn.Sequential(L.Linear(10, 9, r=2, lora_alpha=4), L.Linear(9, 5, r=2, use_dora=True))
    for layer in model:
        nn.init.normal_(layer.lora_B)
    return model


def _merged_then_sharded():
    from torch.distributed.fsdp import fully_shard

    model = _merged_model().eval()  # merges, before sharding
    merged = [layer.merged for layer in model]
    fully_shard(model)
    model.train()  # unmerges the sharded weight: gathers it, restores it, keeps this rank's shard
    return dict(merged=merged, unmerged=[not layer.merged for layer in model],
                weights=[_full(layer.weight) for layer in model])


# -- the launch and the one-process references -----------------------------------------------------------
@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """The 2-process run (one launch for every test here), started and left running while the
    one-process references are computed."""
    folder = tmp_path_factory.mktemp("fsdp2")
    with spawned(_worker, folder, WORLD) as context:
        yield context, folder


@pytest.fixture(scope="module")
def sharded(launch, references):
    """What rank 0 gathered from the 2-process run."""
    context, folder = launch
    wait(context, DEADLINE_S)
    return torch.load(folder / "results.pt", weights_only=False)


def _train_reference(case, build=None):
    """One process, unsharded (``build(case)``, default :func:`_build`). Without dropout: the whole batch at once.
    With it: each half from that rank's RNG stream (seeded BASE_SEED + rank, advanced only by that half's draws),
    half-gradients summed."""
    model = (build or _build)(case)
    params = _adapters(model)
    opt = torch.optim.AdamW(list(params.values()), lr=LR)
    streams = []
    for rank in range(WORLD):
        torch.manual_seed(BASE_SEED + rank)
        streams.append(torch.get_rng_state())
    losses = []
    for batch in _batches():
        opt.zero_grad()
        if case[1] == 0.0:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            loss = loss.detach()
        else:
            loss = 0.0
            for rank in range(WORLD):
                torch.set_rng_state(streams[rank])
                x = _half(batch, rank)
                half = model(input_ids=x, labels=x).loss / WORLD
                half.backward()
                streams[rank] = torch.get_rng_state()
                loss = loss + half.detach()
        losses.append(float(loss))
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=_eval_batch()).logits
    return dict(losses=losses, grads=grads, params={n: p.detach().clone() for n, p in params.items()},
                logits=logits)


@pytest.fixture(scope="module")
def references(launch):
    """One process's runs, computed on one thread while the 2 processes run theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            return {case: _train_reference(case) for case in CASES}
    finally:
        torch.set_num_threads(threads)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# -- the tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_two_ranks_train_as_one_process_on_the_whole_batch(sharded, references, case):
    got, ref = sharded[case], references[case]
    assert len(got["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=TOL)
    assert got["grads"].keys() == ref["grads"].keys() and len(got["grads"]) > 0
    assert all(float(g.abs().max()) > 0 for g in ref["grads"].values())  # no adapter left out
    losses = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
    grads, params = _max_diff(got["grads"], ref["grads"]), _max_diff(got["params"], ref["params"])
    print(f"{_case_id(case)}: max |Δ| loss {losses:.2e}, gradient {grads:.2e}, parameter {params:.2e}")
    assert grads <= TOL and params <= TOL
    assert _max_diff(ref["params"], _adapters(_build(case))) > 1e-3  # the steps moved the adapters


def test_the_seed_rule_gives_each_rank_its_own_dropout_stream(sharded, references):
    """Each rank's first dropout seed is the one torch.manual_seed(BASE_SEED + rank) gives, so the ranks' masks
    are independent, and one process reproduces each of them (the p=0.05 parity cases above)."""
    from lora_layers.core.dropout import draw_seed, drop_mask

    firsts = sharded[("lora", 0.05)]["first_seeds"]
    expected = []
    with torch.random.fork_rng():
        for rank in range(WORLD):
            torch.manual_seed(BASE_SEED + rank)
            expected.append(draw_seed())
    assert firsts == expected and len(set(firsts)) == WORLD
    # the masks were applied: dropout changed the run
    assert sharded[("lora", 0.05)]["losses"][0] != sharded[("lora", 0.0)]["losses"][0]
    masks = [drop_mask(seed, (BATCH // WORLD * SEQ, 64), 0.05, "cpu") for seed in firsts]
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_eval_under_fsdp2_serves_unmerged_with_one_process_logits(sharded, references, case):
    got = sharded[case]["eval"]
    assert not any(got["merged"])  # nothing merged into a shard
    first = got["merge_errors"][0]  # an explicit merge() says why, the same on every rank
    assert first is not None and "sharded" in first and got["merge_errors"] == [first] * WORLD
    print(f"{_case_id(case)}: eval logits max |Δ| {float((got['logits'] - references[case]['logits']).abs().max()):.2e}")
    torch.testing.assert_close(got["logits"], references[case]["logits"], rtol=0, atol=TOL)
    assert got["unchanged"]  # eval() then train() left every parameter as it was


def test_doras_norm_inside_forward_is_the_whole_weights_where_shards_split_every_row(sharded):
    from lora_layers.variants.dora import dora_weight_norm

    got = sharded["dora_rows"]
    assert got["shard_rows"] == (7, 7)  # rank 0 holds 7 of the 13 input rows of every output row
    model = _dora_layer()
    layer = model[0]
    expected = layer._dora_norm()
    assert expected.shape == (7,)
    sharded_weight, shape, norm = got["forward"][0]
    assert (sharded_weight, shape) == (False, (13, 7))  # FSDP2 had gathered the weight
    torch.testing.assert_close(norm, expected, rtol=0, atol=TOL)
    torch.testing.assert_close(got["outside"], expected, rtol=0, atol=TOL)
    shard_only = dora_weight_norm(layer.weight[:7], layer.lora_A[:, :7], layer.lora_B, layer.scaling,
                                  fan_in_fan_out=True)
    assert float((shard_only - expected).abs().max()) > 0.1  # a norm of one shard would be caught
    x = torch.cat([torch.randn(4, 5, 13, generator=torch.Generator().manual_seed(r)) for r in range(WORLD)])
    model(x).square().mean().backward()  # the whole batch's mean
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    print(f"DoRA split rows: norm in forward max |Δ| {float((norm - expected).abs().max()):.2e}, "
          f"gradients {_max_diff(got['grads'], ref_grads):.2e}")
    assert _max_diff(got["grads"], ref_grads) <= TOL
    torch.testing.assert_close(got["reset"], layer._dora_norm(), rtol=0, atol=TOL)


def test_a_model_merged_before_fully_shard_unmerges_bit_for_bit(sharded):
    got = sharded["merged_then_sharded"]
    assert got["merged"] == [True, True] and got["unmerged"] == [True, True]
    for weight, layer in zip(got["weights"], _merged_model()):
        assert torch.equal(weight, layer.weight.detach())
