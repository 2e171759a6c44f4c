"""QLoRA bases and mixed precision under FSDP2 (``fully_shard``), 2 gloo processes against one (issue #22 items 3, 7).

One launch of 2 processes (:func:`_worker`) runs every case; rank 0 writes what it gathered, and the tests
compare it with one process on the unsharded model, computed here meanwhile. The training loops, the data, the
seed rule and the tolerance are test_fsdp2.py's (imported):

- **torchao NF4 (item 3).** ``quantize_base`` + ``phi3.apply_lora`` + ``fully_shard``: 10 AdamW steps equal one
  process's within 1e-6 (LoRA at dropout 0; DoRA at dropout 0.05, whose norm reads the gathered NF4 weight), the
  packed NF4 tensors gathered after training are bit-identical to the one-process model's, and eval() serves
  one process's logits.
- **bitsandbytes (item 3).** ``Params4bit``/``Int8Params`` lose their quantization state in ``fully_shard``:
  the LoRA layer over one refuses, with the same error on every rank, at its first forward after fully_shard
  and when it is wrapped after fully_shard. Nothing runs on unreadable bytes.
- **Mixed precision (item 7).** ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` with
  ``lora_dtype=float32``: the sharded adapters and their gradients stay fp32, every AdamW update is the fp32
  one (replayed here from the gradients each step reduced), and the losses track one process's fp32 run
  within bf16 tolerance (torch.testing's defaults for bfloat16: :data:`BF16_RTOL`).
"""
import pathlib
import time

import pytest
import torch
import torch.nn as nn

from _spawn import spawned, wait
from conftest import make_tiny_phi3
from test_fsdp2 import (LR, STEPS, TOL, WORLD, _adapters, _eval_batch, _full, _half, _max_diff, _train_reference,
                        _train_sharded)

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
LAUNCH_TIMEOUT_S = 300  # a deadlock (one rank raising, the other waiting in a collective) fails, never hangs


def _case_id(case):
    return f"{case[0]}-p{case[1]}"


# -- the models ------------------------------------------------------------------------------------------------
def _random_b(model):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B = 0 would leave A's first gradients 0 and DoRA's norm that of W alone
        for name, param in sorted(model.named_parameters()):
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.train()


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
    model.eval()  # unmerged under fully_shard (test_fsdp2.py's rule), over NF4 shards too
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


def _worker(rank, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    try:
        results = {case: _nf4_sharded(case, rank) for case in NF4_CASES}
        results[MP_CASE] = _mp_sharded(rank)
        results["quantize_after"] = _quantize_after_fully_shard()
        try:
            import bitsandbytes  # noqa: F401
            results["bnb"] = {kind: _bnb_refusals(kind, rank) for kind in BNB_KINDS}
        except ImportError:
            results["bnb"] = None
        if rank == 0:
            torch.save(results, pathlib.Path(folder) / "results.pt")
    finally:
        dist.destroy_process_group()


# -- the launch and the one-process references -----------------------------------------------------------
@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """The 2-process run (one launch for every test here), left running while the references are computed."""
    folder = tmp_path_factory.mktemp("fsdp2_qlora")
    with spawned(_worker, folder, WORLD, needs=('transformers', 'torchao')) as context:
        yield context, folder


@pytest.fixture(scope="module")
def built():
    """Every model the references build, by case (the one-process NF4 weights after training)."""
    return {}


@pytest.fixture(scope="module")
def references(launch, built):
    """One process's runs, on one thread while the 2 processes run theirs."""
    def keep(build):
        def build_and_keep(case):
            built[case] = build(case)
            return built[case]
        return build_and_keep

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            refs = {case: _train_reference(case, build=keep(_build_nf4)) for case in NF4_CASES}
            refs[MP_CASE] = _train_reference(MP_CASE, build=keep(_build_mp))  # fp32, no policy: the fp32 run
            return refs
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sharded(launch, references):
    """What rank 0 gathered from the 2-process run; a run past LAUNCH_TIMEOUT_S (a deadlock) fails."""
    context, folder = launch
    wait(context, LAUNCH_TIMEOUT_S)
    return torch.load(folder / "results.pt", weights_only=False)


# -- item 3: torchao NF4 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", NF4_CASES, ids=_case_id)
def test_nf4_qlora_trains_under_fully_shard_as_one_process(sharded, references, case):
    got, ref = sharded[case], references[case]
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
def test_nf4_packed_bytes_gathered_after_training_are_one_process_bytes(sharded, references, built, case):
    from lora_layers.bases.quantized import torchao_nf4

    got = sharded[case]["packed"]
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
def test_nf4_eval_under_fully_shard_serves_one_process_logits(sharded, references, case):
    got = sharded[case]
    assert got["merged"] and not any(got["merged"])  # nothing merged into an NF4 shard
    print(f"{_case_id(case)}: eval logits max |Δ| {float((got['logits'] - references[case]['logits']).abs().max()):.2e}")
    torch.testing.assert_close(got["logits"], references[case]["logits"], rtol=0, atol=TOL)


def test_nf4_doras_norm_outside_forward_reads_the_whole_nf4_weight(sharded, references, built):
    case = ("nf4_dora", 0.05)
    got = sharded[case]["norms"]
    expected = {n: m._dora_norm() for n, m in built[case].named_modules() if getattr(m, "use_dora", False)}
    assert got.keys() == expected.keys() and len(got) == 8
    diff = max(float((got[n] - expected[n]).abs().max()) for n in got)
    print(f"nf4_dora: norm outside forward max |Δ| {diff:.2e}")
    assert diff <= TOL


def test_quantize_base_after_fully_shard_is_refused_on_every_rank(sharded):
    got = sharded["quantize_after"]
    first = got["errors"][0]
    assert first is not None and got["errors"] == [first] * WORLD and got["unchanged"]
    assert first.startswith("quantize_base: ['0'] are sharded by fully_shard") and "then fully_shard" in first


# -- item 3: bitsandbytes is refused ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BNB_KINDS)
@pytest.mark.parametrize("order", ["forward", "wrap"])
def test_bitsandbytes_under_fully_shard_is_refused_on_every_rank(sharded, kind, order):
    if sharded["bnb"] is None:
        pytest.skip("bitsandbytes is not installed")
    errors = sharded["bnb"][kind][order]
    first = errors[0]
    assert first is not None, f"bitsandbytes {kind} under fully_shard ran ({order}): a silent result"
    assert errors == [first] * WORLD  # the same on every rank: no rank waits on another
    assert first.startswith("RuntimeError: lora_layers: a bitsandbytes bnb-")
    assert "fully_shard" in first and "quantize_base" in first and "DDP" in first


# -- item 7: mixed precision -------------------------------------------------------------------------------------
def test_mixed_precision_keeps_fp32_adapters_and_reduced_gradients(sharded):
    got = sharded[MP_CASE]
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


def test_mixed_precision_updates_are_fp32_not_rounded_to_bf16(sharded):
    got = sharded[MP_CASE]
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


def test_mixed_precision_losses_track_the_fp32_run(sharded, references):
    got, ref = sharded[MP_CASE], references[MP_CASE]
    diffs = [abs(a - b) for a, b in zip(got["losses"], ref["losses"])]
    params = _max_diff(got["params"], ref["params"])
    print(f"mixed precision: max |Δ| loss {max(diffs):.2e} (losses {min(ref['losses']):.3f}-{max(ref['losses']):.3f}), "
          f"adapter parameters {params:.2e} ({got['seconds']:.1f} s on 2 ranks)")
    assert len(diffs) == STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=BF16_RTOL, atol=BF16_ATOL)
    assert max(diffs) > 0  # the forward did run in bf16
    assert _max_diff(ref["params"], _initial(MP_CASE, _build_mp)) > 1e-3  # the steps moved the adapters
