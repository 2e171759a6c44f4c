"""The example's --fsdp savers on 2 gloo processes, against one process (issue #22 item 8).

examples/phi3_finetune.py --fsdp writes its checkpoints, ``lora_adapter.safetensors``, ``peft_adapter/`` and
``merged/`` from the sharded model itself: every rank calls ``phi3_checkpoints.save_checkpoint``,
``phi3_export.save_adapters`` and ``phi3_export.save_merged`` with ``phi3_fsdp.RankZeroFolders``, and rank 0
writes. One launch of 2 processes (:func:`_worker`) shards test_fsdp2.py's tiny GQA Phi-3 (DoRA everywhere,
MergedLinear GQA splits) and saves; the reference is one process calling the same savers on the unsharded
model with the default folders (``merged/`` from ``merge_and_unload``, as the example did before):

- every file of the output folder is byte-identical to one process's (merged/ included: the plain class's
  config and the merged weights), and old checkpoints are rotated as one process rotates them;
- a failure on one rank only (rank 0 cannot make the folder, rank 0's tokenizer write fails, rank 1's block
  fails, ``export_peft``'s argument differs on rank 1) raises on both ranks, naming the failed rank, and the
  folder already there is kept byte for byte; no rank hangs (a 60 s gloo timeout, and a deadline here).
"""
import datetime
import pathlib
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from _spawn import spawned, wait

from test_fsdp2 import WORLD, _build, _shard
from test_fsdp2_ckpt import _caught

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "examples"))  # phi3_export, phi3_fsdp, ...

CASES = [("dora", 0.0), ("merged_gqa", 0.0)]
STEPS = (1, 2, 3)  # checkpoints saved; the last 2 are kept
DEADLINE_S = 240  # the launch takes ~20 s; past this, a rank is stuck: fail instead of hanging


class Tokenizer:
    """Stands in for the example's tokenizer: writes one file, or fails on the ranks in ``fail_on``."""

    def __init__(self, rank=0, fail_on=()):
        self.fail = rank in fail_on

    def save_pretrained(self, folder):
        if self.fail:
            raise OSError("No space left on device (the test's tokenizer)")
        (pathlib.Path(folder) / "tokenizer.json").write_text('{"tokenizer": "stub"}')


def _save_all(out: pathlib.Path, model, folders, rank=0):
    """What the example saves: checkpoints at STEPS, then the adapters (native and PEFT), then merged/."""
    import phi3_checkpoints
    import phi3_export

    for step in STEPS:
        phi3_checkpoints.save_checkpoint(out, model, None, None, step, None, 2, folders)
    phi3_export.save_adapters(model, Tokenizer(rank), out, STEPS[-1], "base_model", folders)
    phi3_export.save_merged(model, Tokenizer(rank), out, torch.float32, folders)


def _files(folder: pathlib.Path):
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _bad_inputs(rank, model, folders, out: pathlib.Path):
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
            model, Tokenizer(rank, fail_on=(0,)), out, STEPS[-1], "base_model", folders),
        "rank 1's block fails": rank_1_block_fails,
        "export_peft argument differs on rank 1": lambda: phi3_export.save_adapters(
            model, Tokenizer(rank), out, STEPS[-1], "elsewhere" if rank else "base_model", folders),
    }
    return {what: _caught(call) for what, call in errors.items()}


def _worker(rank, folder):
    import torch.distributed as dist
    from phi3_fsdp import RankZeroFolders

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # a mismatched collective fails, not hangs
    folders = RankZeroFolders(SimpleNamespace(master=rank == 0, world_size=WORLD))
    out = pathlib.Path(folder)
    try:
        results, times, models = {}, {}, {}
        for name, p in CASES:
            started = time.perf_counter()
            models[name] = _shard(_build((name, p)))
            if rank == 0:
                (out / f"sharded-{name}").mkdir()
            dist.barrier()
            _save_all(out / f"sharded-{name}", models[name], folders, rank)
            times[name] = time.perf_counter() - started
        before = _files(out / "sharded-dora")
        results["errors"] = _bad_inputs(rank, models["dora"], folders, out / "sharded-dora")
        results["kept"] = _files(out / "sharded-dora") == before
        results["times"] = times
        if rank == 0:
            torch.save(results, out / "results.pt")
    finally:
        dist.destroy_process_group()


# -- the launch and the one-process references -----------------------------------------------------------------
@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2_example_exports")
    with spawned(_worker, folder, WORLD) as context:
        yield context, folder


@pytest.fixture(scope="module")
def references(launch, tmp_path_factory):
    """One process's output folders (the default folders: no process group), written while the 2 processes run."""
    import phi3_checkpoints

    out = tmp_path_factory.mktemp("one_process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in CASES:
            (out / case[0]).mkdir()
            _save_all(out / case[0], _build(case), phi3_checkpoints.Folders())
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def sharded(launch, references):
    context, folder = launch
    wait(context, DEADLINE_S)
    return folder, torch.load(folder / "results.pt", weights_only=False)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rank_0_writes_the_folder_one_process_writes(sharded, references, case):
    folder, results = sharded
    got, expected = _files(folder / f"sharded-{case[0]}"), _files(references / case[0])
    print(f"{case[0]}: {len(got)} files, saved in {results['times'][case[0]]:.1f} s on 2 ranks")
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
    assert sorted(name.split("/")[1] for name in got if name.startswith("checkpoints/")) == [
        "step-000002", "step-000003"]  # rotated as one process rotates
    for name in ("lora_adapter.safetensors", "peft_adapter/adapter_model.safetensors", "merged/model.safetensors",
                 "merged/config.json", "peft_adapter/tokenizer.json", "merged/tokenizer.json"):
        assert name in got


def test_merged_folder_loads_as_the_plain_model_with_the_merged_weights(sharded, references):
    from transformers import AutoModelForCausalLM

    import lora_layers as L

    folder, _ = sharded
    merged = AutoModelForCausalLM.from_pretrained(folder / "sharded-dora" / "merged")
    assert type(merged).__name__ == "Phi3ForCausalLM" and merged.config.use_cache is True
    expected = L.merged_state_dict(_build(("dora", 0.0)))  # one process
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in expected.items())


EXPECTED = {  # what -> (the failed rank, rank 0's class, rank 1's class, words both messages hold)
    "rank 0 cannot make the folder": (0, "FileNotFoundError", "RuntimeError", "missing"),
    "rank 0's tokenizer write fails": (0, "OSError", "RuntimeError", "No space left on device"),
    "rank 1's block fails": (1, "RuntimeError", "ValueError", "rank 1's own write failed"),
    "export_peft argument differs on rank 1": (None, "ValueError", "ValueError", "elsewhere"),
}


@pytest.mark.parametrize("what", list(EXPECTED))
def test_a_failure_on_one_rank_raises_on_every_rank_and_keeps_the_folder(sharded, what):
    _, results = sharded
    failed, cls0, cls1, words = EXPECTED[what]
    got = results["errors"][what]
    assert [g and g[0] for g in got] == [cls0, cls1], got
    assert all(words in message for _, message in got), got
    if failed is not None:
        other = got[1 - failed][1]
        assert f"rank {failed} of 2 failed" in other and "every rank stops" in other, other
    else:
        assert got[0][1] == got[1][1]  # the library's own agreement: the same message
    assert results["kept"]
