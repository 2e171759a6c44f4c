"""Checkpoints, exports and merged state dicts of a ``fully_shard`` model on 2 gloo processes (issue #22
items 4 and the merge half of 6), against one process on the unsharded model.

One launch of 2 processes (:func:`_worker`) builds test_fsdp2.py's tiny GQA Phi-3 (LoRA, DoRA everywhere,
MergedLinear GQA splits), shards it per decoder layer and, on every rank:

- ``save_lora``, ``export_peft``, ``lora_state_dict`` and ``merged_state_dict``: rank 0 writes (or gets)
  exactly what one process writes (gets): the same bytes, bitwise tensors; PEFT loads the export;
- ``load_lora`` / ``import_peft`` of a file one process wrote: every rank's shards equal the one-process
  load, sliced as FSDP2 slices (dim 0, ``torch.chunk``);
- bad input on rank 1 only (or on rank 0 only, the writer): every rank raises the same clear error, and
  no rank deadlocks (a 60 s gloo timeout in the workers, and a deadline on the launch here).
"""
import datetime
import pathlib

import pytest
import torch

from _spawn import spawned, wait
from conftest import make_tiny_phi3
from test_fsdp2 import WORLD, _adapters, _build, _dora_layer, _eval_batch, _shard

PHI3_CASES = [("lora", 0.0), ("dora", 0.0), ("merged_gqa", 0.0)]
#: test_fsdp2.py's DoRA Linear stored (in, out): shards split every output row, and r = 3, out = 7 shard
#: lora_A, lora_B and the magnitude unevenly (4 + 3 rows, 2 + 1).
CASES = PHI3_CASES + [("dora_rows", 0.0)]
DEADLINE_S = 240  # the launch takes ~30 s; past this, a rank is stuck: fail instead of hanging


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

    for case in CASES:
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


def _bad_inputs(rank, out: pathlib.Path):
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


def _worker(rank, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # a mismatched collective fails, not hangs
    out = pathlib.Path(folder)
    try:
        if rank == 0:
            _write_sources(out)  # one process's files, unsharded
        dist.barrier()
        results = {case: _case_sharded(case, out) for case in CASES}
        results["errors"] = _bad_inputs(rank, out)
        if rank == 0:
            torch.save(results, out / "results.pt")
    finally:
        dist.destroy_process_group()


# -- the launch and the one-process references ---------------------------------------------------------------
@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2_ckpt")
    with spawned(_worker, folder, WORLD) as context:
        yield context, folder


@pytest.fixture(scope="module")
def references(launch, tmp_path_factory):
    """One process's files and state dicts, written while the 2 processes run theirs."""
    import lora_layers as L

    out = tmp_path_factory.mktemp("one_process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    refs = {}
    try:
        for case in CASES:
            model = _make(case)
            L.save_lora(model, out / f"{_name(case)}.safetensors")
            L.export_peft(model, out / f"{_name(case)}-peft")
            refs[case] = dict(model=model, lora_state_dict=L.lora_state_dict(model), merged=L.merged_state_dict(model))
    finally:
        torch.set_num_threads(threads)
    return out, refs


@pytest.fixture(scope="module")
def sharded(launch, references):
    context, folder = launch
    wait(context, DEADLINE_S)
    return folder, torch.load(folder / "results.pt", weights_only=False)


def _bitwise(got: dict, ref: dict):
    assert list(got) == list(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key


def _slice(full, rank):
    """FSDP2's shard of ``full`` on ``rank``: chunk ``rank`` of dim 0 (``torch.chunk``), empty past the last."""
    chunks = full.chunk(WORLD, dim=0)
    return chunks[rank] if rank < len(chunks) else full[:0]


# -- the tests -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_rank0_writes_the_files_one_process_writes(sharded, references, case):
    folder, _ = sharded
    ref_dir, _ = references
    name = _name(case)
    assert (folder / f"{name}.safetensors").read_bytes() == (ref_dir / f"{name}.safetensors").read_bytes()
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (folder / f"{name}-peft" / file).read_bytes() == (ref_dir / f"{name}-peft" / file).read_bytes()


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_lora_and_merged_state_dicts_equal_one_process(sharded, references, case):
    import lora_layers as L

    _, got = sharded
    ref = references[1][case]
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
def test_peft_loads_the_sharded_export_with_one_process_logits(sharded, references, case):
    peft = pytest.importorskip("peft")
    folder, _ = sharded
    ref_model = references[1][case]["model"]
    base = make_tiny_phi3(seed=0)
    model = peft.PeftModel.from_pretrained(base, str(folder / f"{_name(case)}-peft")).eval()
    x = _eval_batch()
    with torch.no_grad():
        got, want = model(input_ids=x).logits, ref_model.eval()(input_ids=x).logits
    print(f"{_name(case)}: PEFT on the sharded export vs one process: logits max |Δ| {float((got - want).abs().max()):.2e}")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


#: load_adapter builds its adapters on a plain Phi-3 (the Phi-3 cases), before fully_shard.
LOADS = [(case, how) for how in ("load_lora", "import_peft", "load_adapter") for case in CASES
         if how != "load_adapter" or case in PHI3_CASES]


@pytest.mark.parametrize("case, how", LOADS, ids=[f"{_name(c)}-{h}" for c, h in LOADS])
def test_every_rank_loads_its_slice_of_the_one_process_load(sharded, case, how):
    import lora_layers as L

    folder, got = sharded
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
def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(sharded, what):
    _, got = sharded
    every = got["errors"][what]
    cls, words = EXPECTED_ERRORS[what]
    print(f"{what}: {every[0]}")
    assert every[0] is not None and every == [every[0]] * WORLD  # the same class and message on each rank
    assert every[0][0] == cls and all(w in every[0][1] for w in words), every[0]


def test_a_refused_call_changes_and_writes_nothing(sharded):
    _, got = sharded
    assert got["errors"]["unchanged"] == [True] * WORLD  # no refused load loaded anything, on any rank
    assert got["errors"]["written"] == []
    assert got["errors"]["plain_unchanged"] == [True] * WORLD
