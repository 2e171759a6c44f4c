"""FSDP2 (torch's own ``fully_shard``) on 2 gloo processes on CPU, against one process (issue #22): the suite's
one multi-process test file.

**One launch.** The session fixture :func:`launch` starts 2 processes once (``mp.spawn``, gloo, one thread
each); :func:`_worker` imports torch and transformers once, makes one process group and runs every case of
:func:`_runs` in turn. Each case's result (or the traceback it raised) goes to its own file, so a failing case
fails its own tests, not the others': after each case the ranks meet on a file store (not a collective, which a
failed case may have left unmatched), and after a failure they make a new process group. The process group has a
:data:`GLOO_TIMEOUT_S` timeout (a rank left waiting in a collective raises) and the launch a deadline
(:data:`DEADLINE_S`: past it the processes are killed and the cases without a result fail), so a deadlock fails,
never hangs. The parent computes every one-process reference (:func:`one_process`) while the 2 processes run.

The sections below, each the 2-process side, the references and the tests of one part of issue #22:

- **Training parity** (items 1, 2, 6): each rank takes half of the batch; losses, every adapter gradient and
  every adapter parameter after 10 AdamW steps equal one process's on the whole batch within 1e-6 (fp32).
  *The dropout seed rule*: each rank seeds torch with ``BASE_SEED + rank`` after building and sharding the
  model. The one-process reference runs each half-batch from that half's RNG state and sums the
  half-gradients, which reproduces every rank's masks exactly. *DoRA's norm* comes from the whole weight, also
  where a shard boundary splits every row. *eval() under FSDP2* does not merge into a shard: it serves the
  adapter unmerged, its logits equal one process's, and train() after it changes nothing.
- **Checkpoints** (items 4 and the merge half of 6): ``save_lora``, ``export_peft``, ``lora_state_dict`` and
  ``merged_state_dict`` from rank 0 are what one process writes; ``load_lora`` / ``import_peft`` /
  ``load_adapter`` load every rank's slice; bad input on one rank makes every rank raise the same error.
- **QLoRA and mixed precision** (items 3, 7): torchao NF4 trains as one process and its packed bytes stay
  bit-identical; bitsandbytes bases are refused on every rank; a bf16 ``MixedPrecisionPolicy`` keeps fp32
  adapters whose updates are the fp32 ones.
- **Exact resume** (item 5): save after step 5, resume, bitwise the uninterrupted run; 2 -> 1 and 1 -> 2.
- **The helper** ``lora_layers.phi3.fully_shard`` (item 8): the same sharding as torch's own calls.
- **The example's savers** (item 8): examples/phi3_finetune.py's --fsdp files from rank 0 are one process's.

The example's own ``torchrun`` runs (``--fsdp``, ``--fsdp --resume``) are tests/test_example.py's, beside its
DDP run that they are compared with.
"""
import datetime
import os
import pathlib
import resource
import sys
import time
import traceback
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import make_tiny_phi3

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "examples"))  # phi3_export, phi3_fsdp, ...

WORLD = 2
#: The whole launch, every case: 2-3 minutes on 2 cores shared with other jobs. Past this, a rank is stuck
#: outside a collective: the processes are killed and every case without a result fails.
DEADLINE_S = 900
#: A collective that waits longer than this raises on the rank that waits (one rank failed, the other waits).
GLOO_TIMEOUT_S = 120


# -- the launch: one mp.spawn, every case in turn in the same 2 processes ----------------------------------------
def _key_id(key) -> str:
    return "-".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _result_path(folder: pathlib.Path, section: str, key, rank: int) -> pathlib.Path:
    return folder / "results" / f"{section}.{_key_id(key)}.rank{rank}.pt"


def _init_group(folder: pathlib.Path, rank: int, generation: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/store{generation}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))


def _run_one(run, rank, out: pathlib.Path, shared: dict, path: pathlib.Path) -> bool:
    """Run one case and record its result, or the traceback it raised; True where it raised."""
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        outcome = {"result": run(rank, out, shared)}
    except Exception:  # noqa: BLE001 (recorded: that case's tests report it)
        outcome = {"error": traceback.format_exc()}
    outcome.update(cpu_s=time.process_time() - cpu, wall_s=time.perf_counter() - wall)
    try:
        torch.save(outcome, path)
    except Exception:  # noqa: BLE001 (a result that does not pickle is that case's failure)
        torch.save({"error": traceback.format_exc(), "cpu_s": outcome["cpu_s"], "wall_s": outcome["wall_s"]}, path)
    return "error" in outcome


def _any_failed(store, name: str, rank: int, failed: bool) -> bool:
    """Every rank's word on case ``name``, exchanged on the file store: did it fail on any rank?"""
    store.set(f"{name}/{rank}", "1" if failed else "0")
    keys = [f"{name}/{r}" for r in range(WORLD)]
    store.wait(keys)
    return any(store.get(key) == b"1" for key in keys)


def _runs():
    """Every case, in the order the 2 processes run them: ``(section, key, run(rank, out, shared))``, where
    ``out`` is the section's folder and ``shared`` a dict the cases of a section may pass a model in."""
    return TRAIN_RUNS + CKPT_RUNS + QLORA_RUNS + RESUME_RUNS + HELPER_RUNS + EXPORT_RUNS


def _worker(rank, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)
    started = resource.getrusage(resource.RUSAGE_SELF)
    fresh_rng = torch.get_rng_state()  # every case starts from the RNG state of a fresh process
    folder = pathlib.Path(folder)
    (folder / "results").mkdir(exist_ok=True)
    store = dist.FileStore(str(folder / "sync"), WORLD)
    store.set_timeout(datetime.timedelta(seconds=2 * GLOO_TIMEOUT_S))
    generation, shared = 0, {}
    _init_group(folder, rank, generation)
    try:
        for section, key, run in _runs():
            out = folder / section
            out.mkdir(exist_ok=True)
            torch.set_rng_state(fresh_rng)
            failed = _run_one(run, rank, out, shared, _result_path(folder, section, key, rank))
            if _any_failed(store, f"{section}.{_key_id(key)}", rank, failed):  # a collective may be left unmatched
                dist.destroy_process_group()
                generation += 1
                _init_group(folder, rank, generation)
    finally:
        dist.destroy_process_group()
        ended = resource.getrusage(resource.RUSAGE_SELF)
        torch.save(dict(startup_cpu_s=started.ru_utime + started.ru_stime, cpu_s=ended.ru_utime + ended.ru_stime),
                   folder / "results" / f"process.rank{rank}.pt")


def _wait(context, deadline_s: float):
    """Join the 2 processes; None, or why the launch ended early (a rank stuck past ``deadline_s``: killed)."""
    try:
        while not context.join(timeout=max(1.0, context.started + deadline_s - time.monotonic())):
            if time.monotonic() - context.started > deadline_s:
                for process in context.processes:
                    process.kill()
                return f"the 2 processes were killed after {deadline_s} s: a rank is stuck (a deadlock)"
    except Exception as exc:  # noqa: BLE001 (a process that died: its cases without a result say so)
        return f"a process of the launch ended abnormally: {exc}"
    return None


class _Results:
    """One rank's results of one section, by case; a case that raised (or never ran) fails the test asking."""

    def __init__(self, folder: pathlib.Path, section: str, rank: int, ended):
        self.folder, self.section, self.rank, self.ended = folder, section, rank, ended
        self.loaded = {}

    def __getitem__(self, key):
        if key not in self.loaded:
            path = _result_path(self.folder, self.section, key, self.rank)
            if not path.exists():
                pytest.fail(f"{self.section} case {key!r} left no result on rank {self.rank}: "
                            f"{self.ended or 'the launch never reached it'}")
            self.loaded[key] = torch.load(path, weights_only=False)
        outcome = self.loaded[key]
        if "error" in outcome:
            pytest.fail(f"{self.section} case {key!r} failed:\n{self._errors(key)}", pytrace=False)
        return outcome["result"]

    def _errors(self, key) -> str:
        """What every rank raised in case ``key`` (where one rank raised, the other may have timed out waiting)."""
        said = []
        for rank in range(WORLD):
            path = _result_path(self.folder, self.section, key, rank)
            outcome = torch.load(path, weights_only=False) if path.exists() else {"error": "no result\n"}
            said.append(f"rank {rank}: " + (outcome["error"] if "error" in outcome else "no error\n"))
        return "".join(said)


@pytest.fixture(scope="session")
def launch(tmp_path_factory):
    """The one launch of 2 processes, started and left running while the one-process references are computed."""
    pytest.importorskip("transformers")
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    folder = tmp_path_factory.mktemp("fsdp2")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.spawn(_worker, args=(str(folder),), nprocs=WORLD, join=False)
    context.started = time.monotonic()
    try:
        yield context, folder
    finally:
        for process in context.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="session")
def one_process(launch, tmp_path_factory):
    """Every section's one-process references, computed on one thread while the 2 processes run. A section
    whose references raised (or skipped) raises that again in its own tests only."""
    sections = dict(train=_train_references, ckpt=_ckpt_references, qlora=_qlora_references,
                    exports=_export_references)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    done, spent = {}, {}
    try:
        for name, compute in sections.items():
            cpu = time.process_time()
            try:
                with torch.random.fork_rng():
                    done[name] = compute(tmp_path_factory)
            except (Exception, pytest.skip.Exception) as exc:  # noqa: BLE001 (raised again by that section's tests)
                done[name] = exc
            spent[name] = time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)
    print("\none-process references, CPU: " + ", ".join(f"{name} {s:.1f} s" for name, s in spent.items()))
    return done


def _section(one_process, name):
    got = one_process[name]
    if isinstance(got, BaseException):
        raise got
    return got


@pytest.fixture(scope="session")
def runs(launch, one_process):
    """The launch, ended (within DEADLINE_S); prints where the 2 processes spent their CPU time."""
    context, folder = launch
    ended = _wait(context, DEADLINE_S)
    print(f"\n2-process run: {time.monotonic() - context.started:.1f} s{f' ({ended})' if ended else ''}")
    for rank in range(WORLD):
        path = folder / "results" / f"process.rank{rank}.pt"
        if path.exists():
            cpu = torch.load(path, weights_only=True)
            print(f"rank {rank}: {cpu['cpu_s']:.1f} s of CPU, {cpu['startup_cpu_s']:.1f} s of it before the first "
                  "case; " + ", ".join(f"{name} {s:.1f} s" for name, s in _cpu_by_section(folder, rank).items()))
    return folder, ended


def _cpu_by_section(folder: pathlib.Path, rank: int) -> dict:
    """Seconds of CPU that ``rank`` spent in each section's cases, in the order they ran."""
    spent = {}
    for section, key, _ in _runs():
        path = _result_path(folder, section, key, rank)
        if path.exists():
            spent[section] = spent.get(section, 0.0) + torch.load(path, weights_only=False)["cpu_s"]
    return spent


def _results(runs, section: str, rank: int = 0) -> _Results:
    folder, ended = runs
    return _Results(folder, section, rank, ended)


def _folder_and_results(runs, section: str):
    """The folder the 2 processes wrote the section's files in, and what rank 0 got, by case."""
    return runs[0] / section, _results(runs, section)


# ================================================================================================================
# Training parity, the seed rule, DoRA's norm, eval() (items 1, 2, 6)
# ================================================================================================================
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
    return _random_b(model)


def _random_b(model):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B = 0 would leave A's first gradients 0 and DoRA's norm that of W alone
        for name, param in sorted(model.named_parameters()):
            if name.endswith("lora_B"):
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

    def recording_norm(*view):  # what forward computes the norm from, and the norm (of the active adapter's view)
        seen.append((is_sharded(layer.weight), tuple(layer.weight.shape), norm_of(*view).clone()))
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


def _run_training(case):
    def run(rank, out, shared):
        model, got = _train_sharded(case, rank)
        got["eval"] = _eval_sharded(model, rank)
        return got
    return run


TRAIN_RUNS = [("train", case, _run_training(case)) for case in CASES] + [
    ("train", "dora_rows", lambda rank, out, shared: _dora_rows_sharded(rank)),
    ("train", "merged_then_sharded", lambda rank, out, shared: _merged_then_sharded())]


# -- the one-process references ---------------------------------------------------------------------------------
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


def _train_references(tmp_path_factory):
    return {case: _train_reference(case) for case in CASES}


@pytest.fixture(scope="session")
def references(one_process):
    return _section(one_process, "train")


@pytest.fixture(scope="session")
def sharded(runs):
    """What rank 0 gathered, by case."""
    return _results(runs, "train")


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


# ================================================================================================================
# Checkpoints, exports, state dicts and loads from a sharded model; bad input on one rank (items 4, 6)
# ================================================================================================================
# The tiny GQA Phi-3 (LoRA, DoRA everywhere, MergedLinear GQA splits), sharded per decoder layer, on every rank:
# - save_lora, export_peft, lora_state_dict and merged_state_dict: rank 0 writes (or gets) exactly what one
#   process writes (gets): the same bytes, bitwise tensors; PEFT loads the export;
# - load_lora / import_peft of a file one process wrote: every rank's shards equal the one-process load, sliced
#   as FSDP2 slices (dim 0, torch.chunk);
# - bad input on rank 1 only (or on rank 0 only, the writer): every rank raises the same clear error.
PHI3_CASES = [("lora", 0.0), ("dora", 0.0), ("merged_gqa", 0.0)]
#: The training section's DoRA Linear stored (in, out): shards split every output row, and r = 3, out = 7 shard
#: lora_A, lora_B and the magnitude unevenly (4 + 3 rows, 2 + 1).
CKPT_CASES = PHI3_CASES + [("dora_rows", 0.0)]


def _name(case):
    return case[0]


def _make(case):
    """The unsharded model of ``case``, the same in every process."""
    if case[0] != "dora_rows":
        return _build(case)
    import lora_layers as L

    model = _dora_layer()
    L.mark_only_lora_as_trainable(model)  # its bias is no adapter
    return model


def _sharded_model(case):
    from torch.distributed.fsdp import fully_shard

    model = _make(case)
    return fully_shard(model) if case[0] == "dora_rows" else _shard(model)


def _source(case):
    """A one-process model of ``case`` with other adapter values: the files that the sharded models load."""
    model = _make(case)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for _, p in sorted(_adapters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model


def _write_sources(out: pathlib.Path) -> None:
    import lora_layers as L

    for case in CKPT_CASES:
        model = _source(case)
        L.save_lora(model, out / f"src-{_name(case)}.safetensors")
        L.export_peft(model, out / f"src-{_name(case)}-peft")


# -- the 2-process side ----------------------------------------------------------------------------------------
def _local_shards(model):
    """Every rank's local shard of every adapter parameter, gathered as objects (rank order)."""
    import torch.distributed as dist

    mine = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone() for n, p in _adapters(model).items()}
    shards = [None] * WORLD
    dist.all_gather_object(shards, mine)
    return shards


def _case_sharded(case, out: pathlib.Path):
    import lora_layers as L

    name = _name(case)
    model = _sharded_model(case)
    L.save_lora(model, out / f"{name}.safetensors")
    L.export_peft(model, out / f"{name}-peft")
    got = dict(lora_state_dict=L.lora_state_dict(model), merged=L.merged_state_dict(model))
    got["merged_sizes"] = _every_rank(len(got["merged"]))  # rank 0 the whole state dict, rank 1 an empty one
    fresh = _sharded_model(case)
    got["before_load"] = _local_shards(fresh)
    L.load_lora(fresh, out / f"src-{name}.safetensors")
    got["load_lora"] = _local_shards(fresh)
    fresh = _sharded_model(case)
    got["import_peft"] = L.import_peft(fresh, out / f"src-{name}-peft"), _local_shards(fresh)
    if case in PHI3_CASES:  # load_adapter before fully_shard (the documented order), then shard
        fresh = make_tiny_phi3(seed=0)
        L.load_adapter(fresh, out / f"src-{name}.safetensors")
        got["load_adapter"] = _local_shards(_shard(fresh))
    return got


def _every_rank(value):
    import torch.distributed as dist

    every = [None] * WORLD
    dist.all_gather_object(every, value)
    return every


def _caught(call):
    """``(class name, message)`` of what ``call`` raised on this rank, gathered from every rank."""
    import torch.distributed as dist

    try:
        call()
        mine = None
    except Exception as exc:  # noqa: BLE001 (recorded, compared across ranks by the test)
        mine = (type(exc).__name__, str(exc))
    every = [None] * WORLD
    dist.all_gather_object(every, mine)
    return every


def _ckpt_bad_inputs(rank, out: pathlib.Path):
    """Each call bad on one rank only (rank 1, or rank 0 where only the writer sees it)."""
    import lora_layers as L

    model = _shard(_build(("lora", 0.0)))
    plain = _shard(make_tiny_phi3(seed=0))
    plain_before = {n: p.to_local().clone() for n, p in plain.named_parameters()}
    good, other = out / "src-lora.safetensors", out / "lora.safetensors"  # other: the same keys, other values
    before = _local_shards(model)
    errors = {
        "save_lora path on rank 1": lambda: L.save_lora(model, out / ("nofolder/a.safetensors" if rank else "a.st")),
        "save_lora folder missing (rank 0 writes)": lambda: L.save_lora(model, out / "nofolder" / "b.safetensors"),
        "save_lora bias on rank 1": lambda: L.save_lora(model, out / "c.safetensors", bias="bogus" if rank else "none"),
        "lora_state_dict bias on rank 1": lambda: L.lora_state_dict(model, bias="bogus" if rank else "none"),
        "export_peft folder missing (rank 0 writes)": lambda: L.export_peft(model, out / "nofolder" / "peft"),
        "export_peft task_type on rank 1": lambda: L.export_peft(model, out / "d", task_type="X" if rank else "auto"),
        "load_lora missing file on rank 1": lambda: L.load_lora(model, out / "missing.st" if rank else good),
        "load_lora another file on rank 1": lambda: L.load_lora(model, other if rank else good),
        "import_peft missing folder on rank 1": lambda: L.import_peft(model, out / ("missing" if rank else "src-lora-peft")),
        "import_peft another folder on rank 1": lambda: L.import_peft(model, out / ("lora-peft" if rank else "src-lora-peft")),
        "merge_and_unload": lambda: L.merge_and_unload(model),
        "load_adapter into a sharded model": lambda: L.load_adapter(plain, good if rank else out / "missing.st"),
        "import_peft into a plain sharded model": lambda: L.import_peft(_shard(make_tiny_phi3(seed=0)),
                                                                         out / "src-lora-peft"),
    }
    got = {what: _caught(call) for what, call in errors.items()}
    got["unchanged"] = [all(torch.equal(a[n], b[n]) for n in a) for a, b in zip(before, _local_shards(model))]
    after = dict(plain.named_parameters())  # load_adapter refused: no module swapped, no value changed
    got["plain_unchanged"] = _every_rank(after.keys() == plain_before.keys() and all(
        torch.equal(after[n].to_local(), t) for n, t in plain_before.items()))
    got["written"] = sorted(p.name for p in out.iterdir() if p.name in ("a.st", "c.safetensors", "d"))
    return got


def _write_sources_on_rank_0(rank, out: pathlib.Path) -> None:
    import torch.distributed as dist

    if rank == 0:
        _write_sources(out)  # one process's files, unsharded
    dist.barrier()


CKPT_RUNS = [("ckpt", "sources", lambda rank, out, shared: _write_sources_on_rank_0(rank, out))]
CKPT_RUNS += [("ckpt", case, lambda rank, out, shared, case=case: _case_sharded(case, out)) for case in CKPT_CASES]
CKPT_RUNS += [("ckpt", "errors", lambda rank, out, shared: _ckpt_bad_inputs(rank, out))]


# -- the one-process references -----------------------------------------------------------------------------------
def _ckpt_references(tmp_path_factory):
    """One process's files and state dicts."""
    import lora_layers as L

    out = tmp_path_factory.mktemp("one_process")
    refs = {}
    for case in CKPT_CASES:
        model = _make(case)
        L.save_lora(model, out / f"{_name(case)}.safetensors")
        L.export_peft(model, out / f"{_name(case)}-peft")
        refs[case] = dict(model=model, lora_state_dict=L.lora_state_dict(model), merged=L.merged_state_dict(model))
    return out, refs


@pytest.fixture(scope="session")
def ckpt_references(one_process):
    return _section(one_process, "ckpt")


@pytest.fixture(scope="session")
def ckpt_sharded(runs):
    return _folder_and_results(runs, "ckpt")


def _bitwise(got: dict, ref: dict):
    assert list(got) == list(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key


def _slice(full, rank):
    """FSDP2's shard of ``full`` on ``rank``: chunk ``rank`` of dim 0 (``torch.chunk``), empty past the last."""
    chunks = full.chunk(WORLD, dim=0)
    return chunks[rank] if rank < len(chunks) else full[:0]


# -- the tests -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CKPT_CASES, ids=_name)
def test_rank0_writes_the_files_one_process_writes(ckpt_sharded, ckpt_references, case):
    folder, _ = ckpt_sharded
    ref_dir, _ = ckpt_references
    name = _name(case)
    assert (folder / f"{name}.safetensors").read_bytes() == (ref_dir / f"{name}.safetensors").read_bytes()
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (folder / f"{name}-peft" / file).read_bytes() == (ref_dir / f"{name}-peft" / file).read_bytes()


@pytest.mark.parametrize("case", CKPT_CASES, ids=_name)
def test_lora_and_merged_state_dicts_equal_one_process(ckpt_sharded, ckpt_references, case):
    import lora_layers as L

    _, got = ckpt_sharded
    ref = ckpt_references[1][case]
    _bitwise(got[case]["lora_state_dict"], ref["lora_state_dict"])
    _bitwise(got[case]["merged"], ref["merged"])  # rank 0's: the whole merged state dict
    assert got[case]["merged_sizes"] == [len(ref["merged"]), 0]  # the other rank: an empty dict
    assert all(v.device.type == "cpu" for v in got[case]["merged"].values())  # (gloo: the device is the CPU too)
    if case not in PHI3_CASES:  # merge_and_unload gives a plain Linear (out, in), not the (in, out) storage
        return
    plain = L.merge_and_unload(_make(case)).state_dict()  # one process's merge_and_unload
    diff = max(float((got[case]["merged"][k] - plain[k]).abs().max()) for k in plain)
    print(f"{_name(case)}: sharded merged_state_dict vs one process's merge_and_unload: max |Δ| {diff:.2e}")
    _bitwise(got[case]["merged"], plain)  # bit for bit, the same keys in the same order


@pytest.mark.parametrize("case", PHI3_CASES, ids=_name)
def test_peft_loads_the_sharded_export_with_one_process_logits(ckpt_sharded, ckpt_references, case):
    peft = pytest.importorskip("peft")
    folder, _ = ckpt_sharded
    ref_model = ckpt_references[1][case]["model"]
    base = make_tiny_phi3(seed=0)
    model = peft.PeftModel.from_pretrained(base, str(folder / f"{_name(case)}-peft")).eval()
    x = _eval_batch()
    with torch.no_grad():
        got, want = model(input_ids=x).logits, ref_model.eval()(input_ids=x).logits
    print(f"{_name(case)}: PEFT on the sharded export vs one process: logits max |Δ| {float((got - want).abs().max()):.2e}")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


#: load_adapter builds its adapters on a plain Phi-3 (the Phi-3 cases), before fully_shard.
LOADS = [(case, how) for how in ("load_lora", "import_peft", "load_adapter") for case in CKPT_CASES
         if how != "load_adapter" or case in PHI3_CASES]


@pytest.mark.parametrize("case, how", LOADS, ids=[f"{_name(c)}-{h}" for c, h in LOADS])
def test_every_rank_loads_its_slice_of_the_one_process_load(ckpt_sharded, case, how):
    import lora_layers as L

    folder, got = ckpt_sharded
    name = _name(case)
    ref = _make(case)
    if how == "load_adapter":  # onto the plain model, then fully_shard: one process's load_adapter, sliced
        ref = make_tiny_phi3(seed=0)
        L.load_adapter(ref, folder / f"src-{name}.safetensors")
        shards = got[case]["load_adapter"]
    elif how == "load_lora":
        L.load_lora(ref, folder / f"src-{name}.safetensors")
        shards = got[case]["load_lora"]
    else:
        loaded, shards = got[case]["import_peft"]
        assert loaded == L.import_peft(ref, folder / f"src-{name}-peft")
    expected = {n: p.detach() for n, p in _adapters(ref).items()}
    assert _adapters(_source(case)).keys() == expected.keys()
    for rank in range(WORLD):
        assert shards[rank].keys() == expected.keys()
        for n, full in expected.items():
            assert torch.equal(shards[rank][n], _slice(full, rank)), (rank, n)
        assert any(not torch.equal(shards[rank][n], got[case]["before_load"][rank][n]) for n in expected)


EXPECTED_ERRORS = {  # call -> (class, words its message must hold)
    "save_lora path on rank 1": ("ValueError", ["save_lora", "path differs between ranks", "rank 1"]),
    "save_lora folder missing (rank 0 writes)": ("FileNotFoundError", ["nofolder", "raised on rank 0 of 2"]),
    "save_lora bias on rank 1": ("ValueError", ["bias differs between ranks", "'bogus'"]),
    "lora_state_dict bias on rank 1": ("ValueError", ["lora_state_dict", "bias differs between ranks"]),
    "export_peft folder missing (rank 0 writes)": ("FileNotFoundError", ["nofolder", "raised on rank 0 of 2"]),
    "export_peft task_type on rank 1": ("ValueError", ["export_peft", "task_type differs between ranks"]),
    "load_lora missing file on rank 1": ("FileNotFoundError", ["missing.st", "raised on rank 1 of 2"]),
    "load_lora another file on rank 1": ("ValueError", ["load_lora: file contents (SHA-256 of the tensors) differs"]),
    "import_peft missing folder on rank 1": ("FileNotFoundError", ["missing", "raised on rank 1 of 2"]),
    "import_peft another folder on rank 1": ("ValueError", ["import_peft: adapter contents", "differs between ranks"]),
    "merge_and_unload": ("ValueError", ["fully_shard", "merged_state_dict(model) on every rank"]),
    "load_adapter into a sharded model": ("CheckpointError", ["load_adapter: FSDPPhi3ForCausalLM is sharded by fully_shard",
                                                              "before fully_shard", "(the model was not changed)"]),
    "import_peft into a plain sharded model": ("CheckpointError", ["model.layers.0.self_attn.o_proj", "before fully_shard",
                                                                   "(the model was not changed)"]),
}


@pytest.mark.parametrize("what", list(EXPECTED_ERRORS))
def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(ckpt_sharded, what):
    _, got = ckpt_sharded
    every = got["errors"][what]
    cls, words = EXPECTED_ERRORS[what]
    print(f"{what}: {every[0]}")
    assert every[0] is not None and every == [every[0]] * WORLD  # the same class and message on each rank
    assert every[0][0] == cls and all(w in every[0][1] for w in words), every[0]


def test_a_refused_call_changes_and_writes_nothing(ckpt_sharded):
    _, got = ckpt_sharded
    assert got["errors"]["unchanged"] == [True] * WORLD  # no refused load loaded anything, on any rank
    assert got["errors"]["written"] == []
    assert got["errors"]["plain_unchanged"] == [True] * WORLD


# ================================================================================================================
# QLoRA bases (torchao NF4; bitsandbytes refused) and mixed precision (items 3, 7)
# ================================================================================================================
# The training section's loops, data, seed rule and tolerance:
# - torchao NF4 (item 3): quantize_base + phi3.apply_lora + fully_shard: 10 AdamW steps equal one process's
#   within 1e-6 (LoRA at dropout 0; DoRA at dropout 0.05, whose norm reads the gathered NF4 weight), the packed
#   NF4 tensors gathered after training are bit-identical to the one-process model's, and eval() serves one
#   process's logits.
# - bitsandbytes (item 3): Params4bit/Int8Params lose their quantization state in fully_shard: the LoRA layer
#   over one refuses, with the same error on every rank, at its first forward after fully_shard and when it is
#   wrapped after fully_shard. Nothing runs on unreadable bytes.
# - Mixed precision (item 7): MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32) with
#   lora_dtype=float32: the sharded adapters and their gradients stay fp32, every AdamW update is the fp32 one
#   (replayed here from the gradients each step reduced), and the losses track one process's fp32 run within
#   bf16 tolerance (torch.testing's defaults for bfloat16: BF16_RTOL).
#: NF4 shards along dim 0 in whole scaler blocks: with quantize_base's blocks (64 weights a scale, 256 scales a
#: factor) every weight needs ``numel % (16384 * WORLD) == 0``. Hidden 256 and intermediate 256 give every
#: projection 2 or 4 factors (the default tiny model's 1 would not split in 2: torchao raises in fully_shard).
NF4_SIZES = dict(hidden_size=256, intermediate_size=256)
NF4_CASES = [("nf4_lora", 0.0), ("nf4_dora", 0.05)]
MP_CASE = ("mp_lora", 0.0)
#: "Within bf16 tolerance": torch.testing.assert_close's own defaults for bfloat16 (rtol 1.6e-2, atol 1e-5), i.e.
#: about 2 bf16 epsilons (2^-8 = 3.9e-3 each: bf16 keeps 8 significant bits) of the loss, 0.08 at a loss of 4.85.
#: A bf16 forward rounds every activation and weight by up to half an epsilon; the loss, an average over tokens,
#: moves by far less (measured in docs/distributed.md), and a wrong update (bf16 master weights, a gradient lost)
#: shows in the adapters (the replay test below), which this loose bound would not catch by itself.
BF16_RTOL, BF16_ATOL = 1.6e-2, 1e-5
BNB_KINDS = ("4bit", "8bit")


# -- the models ------------------------------------------------------------------------------------------------
def _build_nf4(case):
    import lora_layers as L
    from lora_layers.models import phi3

    name, p = case
    model = make_tiny_phi3(seed=0, **NF4_SIZES)
    L.quantize_base(model)  # Phi-3's four projections, torchao NF4
    phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=p, use_dora=name == "nf4_dora")
    return _random_b(model)


def _build_mp(case):
    from lora_layers.models import phi3

    model = make_tiny_phi3(seed=0)
    phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=case[1], lora_dtype=torch.float32)
    return _random_b(model)


def _initial(case, build):
    """The adapters ``build(case)`` starts from (detached)."""
    return {n: p.detach() for n, p in _adapters(build(case)).items()}


def _mp_policy():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _shard_mp(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mp_policy=_mp_policy())
    fully_shard(model, mp_policy=_mp_policy())
    return model


def _nf4_layers(model):
    """name -> the LoRA layer's NF4 weight (a DTensor of NF4 shards under fully_shard)."""
    from lora_layers.bases.quantized import quantized_base

    return {name: module.weight for name, module in model.named_modules()
            if getattr(quantized_base(module), "kind", None) == "torchao-nf4"}


def _packed(weight):
    """The NF4 tensor's inner tensors (packed codes, scales, factors...), by name, and its shape."""
    names = weight.__tensor_flatten__()[0]
    return {n: getattr(weight, n).detach().clone() for n in names}, tuple(weight.shape)


# -- the 2-process side ------------------------------------------------------------------------------------
def _nf4_sharded(case, rank):
    import torch.distributed as dist

    from lora_layers.core.sharded import gathered

    t0 = time.perf_counter()
    model, got = _train_sharded(case, rank, build=_build_nf4)
    weights = _nf4_layers(model)
    got["local_types"] = sorted({type(w.to_local()).__name__ for w in weights.values()})
    model.eval()  # unmerged under fully_shard (the training section's rule), over NF4 shards too
    got["merged"] = [m.merged for m in model.modules() if hasattr(m, "merged")]
    with torch.no_grad():
        logits = model(input_ids=_half(_eval_batch(), rank)).logits.contiguous()
    parts = [torch.empty_like(logits) for _ in range(WORLD)]
    dist.all_gather(parts, logits)
    got["logits"] = torch.cat(parts)
    model.train()
    # gathered NF4 after training and eval; not _full's clone(): torchao clones an NF4 tensor by requantizing it
    got["packed"] = {n: _packed(gathered(w)) for n, w in weights.items()}
    # DoRA's norm outside forward: from the whole NF4 weight, gathered (dequantize() of a DTensor of NF4 shards)
    got["norms"] = {n: m._dora_norm() for n, m in model.named_modules() if getattr(m, "use_dora", False)}
    got["seconds"] = time.perf_counter() - t0
    return got


def _mp_sharded(rank):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    t0 = time.perf_counter()
    reduced = []  # every step's gradients, as FSDP2 reduced them into the sharded fp32 adapters

    def record(opt, args, kwargs):
        reduced.append([_full(p.grad) for group in opt.param_groups for p in group["params"]])

    handle = register_optimizer_step_pre_hook(record)
    try:
        model, got = _train_sharded(MP_CASE, rank, build=_build_mp, shard=_shard_mp)
    finally:
        handle.remove()
    adapters = _adapters(model)
    got["reduced"] = reduced
    got["seconds"] = time.perf_counter() - t0
    got["dtypes"] = {n: (p.dtype, p.to_local().dtype, p.grad.dtype) for n, p in adapters.items()}
    return got


def _bnb_layer(kind):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    plain = nn.Linear(128, 64)
    if kind == "4bit":
        q = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False)
    q.load_state_dict(plain.state_dict())
    return nn.Sequential(q.to("cpu"))  # bitsandbytes quantizes on the move


def _bnb_refusals(kind, rank):
    """The error every rank raises: LoRA then fully_shard then a forward; fully_shard then LoRA."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import lora_layers as L

    errors = {}
    for order in ("forward", "wrap"):
        model = _bnb_layer(kind)
        try:
            if order == "forward":
                L.inject_lora(model, r=4, lora_alpha=8, targets=["0"])
                fully_shard(model)
                model(torch.randn(3, 128)).sum().backward()
            else:
                fully_shard(model)
                L.inject_lora(model, r=4, lora_alpha=8, targets=["0"])
            mine = None
        except Exception as e:  # what, if anything, each rank raised
            mine = f"{type(e).__name__}: {e}"
        errors[order] = [None] * WORLD
        dist.all_gather_object(errors[order], mine)
    return errors


def _quantize_after_fully_shard():
    """quantize_base on a sharded model: the error every rank raises, and whether the weight is as it was."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import lora_layers as L

    torch.manual_seed(0)
    model = fully_shard(nn.Sequential(nn.Linear(128, 256)))
    before = _full(model[0].weight)
    try:
        L.quantize_base(model, targets=["0"])
        mine = None
    except ValueError as e:
        mine = str(e)
    errors = [None] * WORLD
    dist.all_gather_object(errors, mine)
    return dict(errors=errors, unchanged=torch.equal(_full(model[0].weight), before))

def _bnb_runs(rank):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return None
    return {kind: _bnb_refusals(kind, rank) for kind in BNB_KINDS}


QLORA_RUNS = [("qlora", case, lambda rank, out, shared, case=case: _nf4_sharded(case, rank)) for case in NF4_CASES]
QLORA_RUNS += [("qlora", MP_CASE, lambda rank, out, shared: _mp_sharded(rank)),
               ("qlora", "quantize_after", lambda rank, out, shared: _quantize_after_fully_shard()),
               ("qlora", "bnb", lambda rank, out, shared: _bnb_runs(rank))]


# -- the one-process references -----------------------------------------------------------------------------------
def _qlora_references(tmp_path_factory):
    """One process's runs, and every model they built, by case (the one-process NF4 weights after training)."""
    pytest.importorskip("torchao")
    built = {}

    def keep(build):
        def build_and_keep(case):
            built[case] = build(case)
            return built[case]
        return build_and_keep

    refs = {case: _train_reference(case, build=keep(_build_nf4)) for case in NF4_CASES}
    refs[MP_CASE] = _train_reference(MP_CASE, build=keep(_build_mp))  # fp32, no policy: the fp32 run
    return refs, built


@pytest.fixture(scope="session")
def qlora_references(one_process):
    return _section(one_process, "qlora")[0]


@pytest.fixture(scope="session")
def built(one_process):
    return _section(one_process, "qlora")[1]


@pytest.fixture(scope="session")
def qlora_sharded(runs):
    """What rank 0 gathered, by case."""
    pytest.importorskip("torchao")
    return _results(runs, "qlora")


# -- item 3: torchao NF4 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", NF4_CASES, ids=_case_id)
def test_nf4_qlora_trains_under_fully_shard_as_one_process(qlora_sharded, qlora_references, case):
    got, ref = qlora_sharded[case], qlora_references[case]
    assert got["local_types"] == ["NF4Tensor"]  # each rank's shard of a base weight stays NF4
    assert len(got["losses"]) == STEPS and got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) > 0
    assert all(float(g.abs().max()) > 0 for g in ref["grads"].values())  # no adapter left out
    losses = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
    grads, params = _max_diff(got["grads"], ref["grads"]), _max_diff(got["params"], ref["params"])
    print(f"{_case_id(case)}: max |Δ| loss {losses:.2e}, gradient {grads:.2e}, parameter {params:.2e} "
          f"({got['seconds']:.1f} s on 2 ranks)")
    assert losses <= TOL and grads <= TOL and params <= TOL
    assert _max_diff(ref["params"], _initial(case, _build_nf4)) > 1e-3  # the steps moved the adapters


@pytest.mark.parametrize("case", NF4_CASES, ids=_case_id)
def test_nf4_packed_bytes_gathered_after_training_are_one_process_bytes(qlora_sharded, qlora_references, built, case):
    from lora_layers.bases.quantized import torchao_nf4

    got = qlora_sharded[case]["packed"]
    expected = {n: _packed(w) for n, w in _nf4_layers(built[case]).items()}
    assert got.keys() == expected.keys() and len(got) == 8  # 4 projections x 2 layers
    for name, (tensors, shape) in got.items():
        ref_tensors, ref_shape = expected[name]
        assert shape == ref_shape and tensors.keys() == ref_tensors.keys()
        for inner, t in tensors.items():
            assert t.dtype == ref_tensors[inner].dtype and torch.equal(t, ref_tensors[inner]), (name, inner, t.flatten()[:4].tolist(), ref_tensors[inner].flatten()[:4].tolist())
    # and the one-process model's are those quantize_base made: training wrote none of them
    fresh = _nf4_layers(_build_nf4(case))
    assert all(isinstance(w, torchao_nf4().NF4Tensor) for w in fresh.values())
    for name, weight in fresh.items():
        assert all(torch.equal(t, expected[name][0][n]) for n, t in _packed(weight)[0].items())


@pytest.mark.parametrize("case", NF4_CASES, ids=_case_id)
def test_nf4_eval_under_fully_shard_serves_one_process_logits(qlora_sharded, qlora_references, case):
    got = qlora_sharded[case]
    assert got["merged"] and not any(got["merged"])  # nothing merged into an NF4 shard
    print(f"{_case_id(case)}: eval logits max |Δ| {float((got['logits'] - qlora_references[case]['logits']).abs().max()):.2e}")
    torch.testing.assert_close(got["logits"], qlora_references[case]["logits"], rtol=0, atol=TOL)


def test_nf4_doras_norm_outside_forward_reads_the_whole_nf4_weight(qlora_sharded, qlora_references, built):
    case = ("nf4_dora", 0.05)
    got = qlora_sharded[case]["norms"]
    expected = {n: m._dora_norm() for n, m in built[case].named_modules() if getattr(m, "use_dora", False)}
    assert got.keys() == expected.keys() and len(got) == 8
    diff = max(float((got[n] - expected[n]).abs().max()) for n in got)
    print(f"nf4_dora: norm outside forward max |Δ| {diff:.2e}")
    assert diff <= TOL


def test_quantize_base_after_fully_shard_is_refused_on_every_rank(qlora_sharded):
    got = qlora_sharded["quantize_after"]
    first = got["errors"][0]
    assert first is not None and got["errors"] == [first] * WORLD and got["unchanged"]
    assert first.startswith("quantize_base: ['0'] are sharded by fully_shard") and "then fully_shard" in first


# -- item 3: bitsandbytes is refused ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BNB_KINDS)
@pytest.mark.parametrize("order", ["forward", "wrap"])
def test_bitsandbytes_under_fully_shard_is_refused_on_every_rank(qlora_sharded, kind, order):
    if qlora_sharded["bnb"] is None:
        pytest.skip("bitsandbytes is not installed")
    errors = qlora_sharded["bnb"][kind][order]
    first = errors[0]
    assert first is not None, f"bitsandbytes {kind} under fully_shard ran ({order}): a silent result"
    assert errors == [first] * WORLD  # the same on every rank: no rank waits on another
    assert first.startswith("RuntimeError: lora_layers: a bitsandbytes bnb-")
    assert "fully_shard" in first and "quantize_base" in first and "DDP" in first


# -- item 7: mixed precision -------------------------------------------------------------------------------------
def test_mixed_precision_keeps_fp32_adapters_and_reduced_gradients(qlora_sharded):
    got = qlora_sharded[MP_CASE]
    assert got["dtypes"] and set(got["dtypes"].values()) == {(torch.float32,) * 3}
    assert len(got["reduced"]) == STEPS
    assert all(g.dtype == torch.float32 for step in got["reduced"] for g in step)


def _replay(initial, reduced, dtype):
    """AdamW on copies of ``initial`` in ``dtype``, fed the gradients each sharded step reduced."""
    params = [p.detach().clone().to(dtype).requires_grad_() for p in initial]
    opt = torch.optim.AdamW(params, lr=LR)
    for grads in reduced:
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt.step()
    return [p.detach().float() for p in params]


def test_mixed_precision_updates_are_fp32_not_rounded_to_bf16(qlora_sharded):
    got = qlora_sharded[MP_CASE]
    names = list(got["params"])
    initial = list(_initial(MP_CASE, _build_mp).values())
    final = [got["params"][n] for n in names]
    fp32 = _replay(initial, got["reduced"], torch.float32)
    bf16 = _replay(initial, got["reduced"], torch.bfloat16)
    off_fp32 = max(float((a - b).abs().max()) for a, b in zip(final, fp32))
    off_bf16 = max(float((a - b).abs().max()) for a, b in zip(final, bf16))
    print(f"mixed precision: sharded adapters against an fp32 AdamW replay {off_fp32:.2e}, a bf16 one {off_bf16:.2e}")
    assert off_fp32 <= 1e-7  # the fp32 master weights took the fp32 updates
    assert off_bf16 > 1e-4  # bf16 master weights would be visibly elsewhere
    # the values are not bf16 values: no rounding to bf16 anywhere on the way
    assert all(float((p != p.to(torch.bfloat16).float()).float().mean()) > 0.9 for p in final)


def test_mixed_precision_losses_track_the_fp32_run(qlora_sharded, qlora_references):
    got, ref = qlora_sharded[MP_CASE], qlora_references[MP_CASE]
    diffs = [abs(a - b) for a, b in zip(got["losses"], ref["losses"])]
    params = _max_diff(got["params"], ref["params"])
    print(f"mixed precision: max |Δ| loss {max(diffs):.2e} (losses {min(ref['losses']):.3f}-{max(ref['losses']):.3f}), "
          f"adapter parameters {params:.2e} ({got['seconds']:.1f} s on 2 ranks)")
    assert len(diffs) == STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=BF16_RTOL, atol=BF16_ATOL)
    assert max(diffs) > 0  # the forward did run in bf16
    assert _max_diff(ref["params"], _initial(MP_CASE, _build_mp)) > 1e-3  # the steps moved the adapters


# ================================================================================================================
# Exact resume under FSDP2 (item 5)
# ================================================================================================================
# save_training_state / load_training_state on a sharded model with its DTensor optimizer state; the model, the
# data, the seed rule and the one-process reference are the training section's:
# - exact resume: 10 AdamW steps on 2 ranks, saving after step 5; a fresh sharded model that loads the file and
#   runs steps 6 to 10 gives bitwise the same losses, adapter parameters, optimizer state (DTensors, gathered)
#   and RNG states. The run that saved equals one process's run bitwise (saving changed nothing).
# - another world size: the 2-rank file loads into one process (2 -> 1), and a file one process wrote loads on
#   2 ranks (1 -> 2), the values bit for bit, with a warning about the RNG states.
# - every rank raises the same error: a corrupted file on rank 1 only, and a bad step on rank 1 only: both
#   ranks raise the same error naming rank 1, nothing changes and nothing is written.
#: DoRA at dropout 0.05: its norm is gathered, and every rank's dropout stream matters to the resume.
RESUME_CASE = ("dora", 0.05)
SAVE_AT = 5


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

    model = _shard(_build(RESUME_CASE))
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

    model = _shard(_build(RESUME_CASE))
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
        model = _build(RESUME_CASE)
        opt = _optimizer(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "saved by 2 rank(s) and loads on 1", tested in one process below
            L.load_training_state(folder / "state5.pt", model, opt)
        L.save_training_state(folder / "one5.pt", model, opt, step=SAVE_AT, extra={"note": "fsdp2"})
    dist.barrier()
    model = _shard(_build(RESUME_CASE))
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
    model = _shard(_build(RESUME_CASE))
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


RESUME_RUNS = [("resume", "uninterrupted", lambda rank, out, shared: _uninterrupted(rank, out)),
               ("resume", "resumed", lambda rank, out, shared: _resumed(rank, out)),
               ("resume", "one_to_two", lambda rank, out, shared: _one_to_two(rank, out)),
               ("resume", "bad", lambda rank, out, shared: _bad_on_rank1(rank, out)),
               ("resume", "small", lambda rank, out, shared: [_small_run(rank, out, resume) for resume in (False, True)])]


@pytest.fixture(scope="session")
def reference(references):
    """One process's 10 steps (each half from its rank's RNG stream): the training section's reference."""
    return references[RESUME_CASE]


@pytest.fixture(scope="session")
def ranks(runs):
    """Each rank's results, and the folder they wrote in."""
    return [_results(runs, "resume", rank) for rank in range(WORLD)], runs[0] / "resume"


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
    model = _build(RESUME_CASE)
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


# ================================================================================================================
# lora_layers.phi3.fully_shard: the same sharding as torch's own calls (item 8)
# ================================================================================================================
# The tiny GQA Phi-3 sharded twice, with the helper and with the plain fully_shard calls (_shard); the tests
# compare the two, and the gathered parameters with the unsharded model built in the parent. A rank given a bad
# argument makes every rank raise the same error, and no rank shards.
HELPER_CASE = ("lora", 0.0)


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

    helper, plain = phi3.fully_shard(_build(HELPER_CASE)), _shard(_build(HELPER_CASE))
    out = dict(helper=_layout(helper), plain=_layout(plain), full={n: p.full_tensor() for n, p in helper.named_parameters()})
    out["helper_step"], out["plain_step"] = _one_step(helper, rank), _one_step(plain, rank)
    return out


def _mixed_precision(rank):
    """The policy reaches every unit: the helper's bf16 step equals the plain calls' with the same policy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lora_layers.models import phi3

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    helper = phi3.fully_shard(_build(HELPER_CASE), mp_policy=policy)
    plain = _build(HELPER_CASE)
    for layer in plain.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(plain, mp_policy=policy)
    return dict(helper=_one_step(helper, rank), plain=_one_step(plain, rank), fp32=_one_step(phi3.fully_shard(
        _build(HELPER_CASE)), rank))


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
        model = _build(HELPER_CASE)
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


def _nf4_limits(rank):
    """torchao NF4 weights that do not split in 2 (the default tiny model: one scale factor per weight): the
    helper refuses on every rank before sharding, where torch's own calls fail inside torchao; weights that
    split (hidden and intermediate size 256) shard and step."""
    from torch.distributed.fsdp import fully_shard

    from lora_layers.core.sharded import is_sharded
    from lora_layers.models import phi3

    uneven, plain, even = _nf4(), _nf4(), _nf4(hidden_size=256, intermediate_size=256)
    out = dict(helper=_error(lambda: phi3.fully_shard(uneven)), sharded=any(is_sharded(p) for p in uneven.parameters()),
               plain=_error(lambda: [fully_shard(layer) for layer in plain.model.layers]))
    out["even"] = _error(lambda: _one_step(phi3.fully_shard(even), rank))
    return out


HELPER_RUNS = [("helper", "same", lambda rank, out, shared: _helper_and_plain(rank)),
               ("helper", "mixed", lambda rank, out, shared: _mixed_precision(rank)),
               ("helper", "bad", lambda rank, out, shared: _every_rank(_bad_arguments(rank))),
               ("helper", "nf4", lambda rank, out, shared: _every_rank(_nf4_limits(rank)))]


@pytest.fixture(scope="session")
def helper_ranks(runs):
    """Rank 0's and rank 1's results."""
    return [_results(runs, "helper", rank) for rank in range(WORLD)]


def test_the_helper_shards_as_the_plain_torch_calls(helper_ranks):
    for rank in range(WORLD):
        got = helper_ranks[rank]["same"]
        (helper, helper_units), (plain, plain_units) = got["helper"], got["plain"]
        assert helper_units == plain_units == ["", "model.layers.0", "model.layers.1"]
        assert helper.keys() == plain.keys() and len(helper) > 0
        for name, (placements, local) in helper.items():
            assert placements == plain[name][0] and torch.equal(local, plain[name][1]), name
        assert got["helper_step"][0] == got["plain_step"][0]  # bitwise: the same computation
        grads, plain_grads = got["helper_step"][1], got["plain_step"][1]
        assert grads.keys() == plain_grads.keys() and len(grads) > 0
        assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)


def test_the_sharded_parameters_gather_to_the_unsharded_model(helper_ranks):
    reference = dict(_build(HELPER_CASE).named_parameters())
    full = helper_ranks[0]["same"]["full"]
    assert full.keys() == reference.keys()
    for name, tensor in full.items():
        assert torch.equal(tensor, reference[name].detach()), name
    x = _batches()[0]  # one process's loss on the whole batch: the mean of the two halves' (equal lengths)
    loss = float(_build(HELPER_CASE)(input_ids=x, labels=x).loss.detach())
    halves = sum(helper_ranks[r]["same"]["helper_step"][0] for r in range(WORLD)) / WORLD
    assert abs(halves - loss) <= 1e-6


def test_the_mixed_precision_policy_reaches_every_unit(helper_ranks):
    for rank in range(WORLD):
        got = helper_ranks[rank]["mixed"]
        assert got["helper"][0] == got["plain"][0]
        assert all(torch.equal(got["helper"][1][n], got["plain"][1][n]) for n in got["plain"][1])
        assert got["helper"][0] != got["fp32"][0]  # bf16 compute: the policy took effect
        assert abs(got["helper"][0] - got["fp32"][0]) < 0.05


@pytest.mark.parametrize("argument", ["mesh", "mp_policy", "model", "sharded twice"])
def test_one_ranks_bad_argument_raises_the_same_error_on_every_rank(helper_ranks, argument):
    seen = helper_ranks[0]["bad"]
    assert seen == helper_ranks[1]["bad"]
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
        phi3.fully_shard(_build(HELPER_CASE))


def test_nf4_weights_that_do_not_split_over_the_ranks_are_refused_before_sharding(helper_ranks):
    pytest.importorskip("torchao")
    seen = helper_ranks[0]["nf4"]
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


# ================================================================================================================
# The example's --fsdp savers: rank 0 writes the folder one process writes (item 8)
# ================================================================================================================
# examples/phi3_finetune.py --fsdp writes its checkpoints, lora_adapter.safetensors, peft_adapter/ and merged/
# from the sharded model itself: every rank calls phi3_checkpoints.save_checkpoint, phi3_export.save_adapters
# and phi3_export.save_merged with phi3_fsdp.RankZeroFolders, and rank 0 writes. The reference is one process
# calling the same savers on the unsharded model with the default folders (merged/ from merge_and_unload):
# - every file of the output folder is byte-identical to one process's (merged/ included), and old checkpoints
#   are rotated as one process rotates them;
# - a failure on one rank only (rank 0 cannot make the folder, rank 0's tokenizer write fails, rank 1's block
#   fails, export_peft's argument differs on rank 1) raises on both ranks, naming the failed rank, and the
#   folder already there is kept byte for byte.
EXPORT_CASES = [("dora", 0.0), ("merged_gqa", 0.0)]
SAVED_STEPS = (1, 2, 3)  # checkpoints saved; the last 2 are kept


class Tokenizer:
    """Stands in for the example's tokenizer: writes one file, or fails on the ranks in ``fail_on``."""

    def __init__(self, rank=0, fail_on=()):
        self.fail = rank in fail_on

    def save_pretrained(self, folder):
        if self.fail:
            raise OSError("No space left on device (the test's tokenizer)")
        (pathlib.Path(folder) / "tokenizer.json").write_text('{"tokenizer": "stub"}')


def _save_all(out: pathlib.Path, model, folders, rank=0):
    """What the example saves: checkpoints at SAVED_STEPS, then the adapters (native and PEFT), then merged/."""
    import phi3_checkpoints
    import phi3_export

    for step in SAVED_STEPS:
        phi3_checkpoints.save_checkpoint(out, model, None, None, step, None, 2, folders)
    phi3_export.save_adapters(model, Tokenizer(rank), out, SAVED_STEPS[-1], "base_model", folders)
    phi3_export.save_merged(model, Tokenizer(rank), out, torch.float32, folders)


def _files(folder: pathlib.Path):
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _export_bad_inputs(rank, model, folders, out: pathlib.Path):
    """Each failure on one rank only; the sharded "dora" folder is already there and must be kept (its
    lora_adapter.safetensors, written before the failing folder, is written again with the same bytes)."""
    import phi3_checkpoints
    import phi3_export

    def rank_1_block_fails():
        with folders.open(out / "peft_adapter", "the PEFT adapter") as tmp:
            (pathlib.Path(tmp) / "adapter_model.safetensors").write_bytes(b"new" if rank == 0 else b"")
            if rank == 1:
                raise ValueError("rank 1's own write failed")

    errors = {
        "rank 0 cannot make the folder": lambda: phi3_checkpoints.save_checkpoint(
            out / "missing", model, None, None, 9, None, 2, folders),
        "rank 0's tokenizer write fails": lambda: phi3_export.save_adapters(
            model, Tokenizer(rank, fail_on=(0,)), out, SAVED_STEPS[-1], "base_model", folders),
        "rank 1's block fails": rank_1_block_fails,
        "export_peft argument differs on rank 1": lambda: phi3_export.save_adapters(
            model, Tokenizer(rank), out, SAVED_STEPS[-1], "elsewhere" if rank else "base_model", folders),
    }
    return {what: _caught(call) for what, call in errors.items()}


def _rank_zero_folders(rank):
    from phi3_fsdp import RankZeroFolders

    return RankZeroFolders(SimpleNamespace(master=rank == 0, world_size=WORLD))


def _export_sharded(case, rank, out: pathlib.Path, shared: dict) -> float:
    """The sharded model of ``case`` saves what the example saves into sharded-NAME/; the seconds it took."""
    import torch.distributed as dist

    started = time.perf_counter()
    model = shared.setdefault("exports", {})[case[0]] = _shard(_build(case))
    if rank == 0:
        (out / f"sharded-{case[0]}").mkdir()
    dist.barrier()
    _save_all(out / f"sharded-{case[0]}", model, _rank_zero_folders(rank), rank)
    return time.perf_counter() - started


def _export_failures(rank, out: pathlib.Path, shared: dict) -> dict:
    """The failures on one rank, over the sharded "dora" model and its folder that the case before saved."""
    before = _files(out / "sharded-dora")
    errors = _export_bad_inputs(rank, shared["exports"]["dora"], _rank_zero_folders(rank), out / "sharded-dora")
    return dict(errors=errors, kept=_files(out / "sharded-dora") == before)


EXPORT_RUNS = [("exports", case, lambda rank, out, shared, case=case: _export_sharded(case, rank, out, shared))
               for case in EXPORT_CASES] + [("exports", "bad", _export_failures)]


# -- the one-process references -----------------------------------------------------------------------------------
def _export_references(tmp_path_factory):
    """One process's output folders (the default folders: no process group)."""
    import phi3_checkpoints

    out = tmp_path_factory.mktemp("one_process_exports")
    for case in EXPORT_CASES:
        (out / case[0]).mkdir()
        _save_all(out / case[0], _build(case), phi3_checkpoints.Folders())
    return out


@pytest.fixture(scope="session")
def export_references(one_process):
    return _section(one_process, "exports")


@pytest.fixture(scope="session")
def export_sharded(runs):
    return _folder_and_results(runs, "exports")


@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_rank_0_writes_the_folder_one_process_writes(export_sharded, export_references, case):
    folder, results = export_sharded
    got, expected = _files(folder / f"sharded-{case[0]}"), _files(export_references / case[0])
    print(f"{case[0]}: {len(got)} files, saved in {results[case]:.1f} s on 2 ranks")
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
    assert sorted(name.split("/")[1] for name in got if name.startswith("checkpoints/")) == [
        "step-000002", "step-000003"]  # rotated as one process rotates
    for name in ("lora_adapter.safetensors", "peft_adapter/adapter_model.safetensors", "merged/model.safetensors",
                 "merged/config.json", "peft_adapter/tokenizer.json", "merged/tokenizer.json"):
        assert name in got


def test_merged_folder_loads_as_the_plain_model_with_the_merged_weights(export_sharded, export_references):
    from transformers import AutoModelForCausalLM

    import lora_layers as L

    folder, _ = export_sharded
    merged = AutoModelForCausalLM.from_pretrained(folder / "sharded-dora" / "merged")
    assert type(merged).__name__ == "Phi3ForCausalLM" and merged.config.use_cache is True
    expected = L.merged_state_dict(_build(("dora", 0.0)))  # one process
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in expected.items())


EXPORT_EXPECTED = {  # what -> (the failed rank, rank 0's class, rank 1's class, words both messages hold)
    "rank 0 cannot make the folder": (0, "FileNotFoundError", "RuntimeError", "missing"),
    "rank 0's tokenizer write fails": (0, "OSError", "RuntimeError", "No space left on device"),
    "rank 1's block fails": (1, "RuntimeError", "ValueError", "rank 1's own write failed"),
    "export_peft argument differs on rank 1": (None, "ValueError", "ValueError", "elsewhere"),
}


@pytest.mark.parametrize("what", list(EXPORT_EXPECTED))
def test_a_failure_on_one_rank_raises_on_every_rank_and_keeps_the_folder(export_sharded, what):
    _, results = export_sharded
    failed, cls0, cls1, words = EXPORT_EXPECTED[what]
    results = results["bad"]
    got = results["errors"][what]
    assert [g and g[0] for g in got] == [cls0, cls1], got
    assert all(words in message for _, message in got), got
    if failed is not None:
        other = got[1 - failed][1]
        assert f"rank {failed} of 2 failed" in other and "every rank stops" in other, other
    else:
        assert got[0][1] == got[1][1]  # the library's own agreement: the same message
    assert results["kept"]
