"""merge_and_unload(requantize="nf4"): the merged weights packed again as torchao NF4, and the report of what
that cost. Every figure is checked against an independent reference: the requantized weights against
torchao's ``to_nf4`` of the exact merge (``merge_and_unload`` without requantize, on an identical model), the
report's errors against a float64 recomputation, its logit bound against the two models' own logits."""
import pytest
import torch
import torch.nn as nn

import lora_layers as L
from conftest import load_quantized_phi3, make_tiny_phi3

pytest.importorskip("torchao")
transformers = pytest.importorskip("transformers")


def _nf4():
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    return nf4_tensor


def _adapted(base: str, seed: int = 0, folder=None):
    """A tiny Phi-3 with trained-looking adapters over a ``base`` ("dense", "nf4": quantize_base, or "bnb-nf4":
    bitsandbytes loaded), and ``{name: float base weight}`` (None where the base was loaded quantized)."""
    if base in ("bnb-nf4", "bnb-int8"):
        model = load_quantized_phi3(folder, base[4:])
    elif folder is not None:  # the saved model, in float: every in_features a multiple of 64
        model = transformers.Phi3ForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    else:
        model = make_tiny_phi3(seed=seed)
    originals = {n: (None if base.startswith("bnb") else m.weight.detach().clone()) for n, m in model.named_modules()
                 if n.endswith("_proj")}
    if base == "nf4":
        L.quantize_base(model)
    L.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in L.lora_parameters(model):
            p.normal_(0, 0.02)  # B = 0 would make the merge the base itself
    return model, originals


def _rel64(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _blocks(model):
    """{name: (block, scaler_block, double_quant)} of the model's quantized base weights."""
    blocks = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if type(w).__name__ == "NF4Tensor":
            blocks[n] = (w.block_size, w.scaler_block_size, True)
        elif type(w).__name__ == "Params4bit":
            blocks[n] = (w.quant_state.blocksize, None, w.quant_state.nested)
    return blocks


def _reference(scheme, w_exact, block, scaler_block, double_quant):
    """``(packed tensors to compare, dequantized)``: the library's own packer on the exact merged weight."""
    if scheme == "nf4":
        n_blocks = w_exact.numel() // block
        ref = _nf4().to_nf4(w_exact.contiguous(), block, scaler_block or min(256, n_blocks & -n_blocks))
        return {k: getattr(ref, k) for k in ref.__tensor_flatten__()[0]}, ref.get_original_weight()
    import bitsandbytes.functional as bf
    data, state = bf.quantize_4bit(w_exact, blocksize=block, quant_type="nf4", compress_statistics=double_quant)
    return {"data": data, "absmax": state.absmax}, bf.dequantize_4bit(data, state)


def _packed_tensors(weight):
    if type(weight).__name__ == "NF4Tensor":
        return {k: getattr(weight, k) for k in weight.__tensor_flatten__()[0]}
    return {"data": weight.data, "absmax": weight.quant_state.absmax}


def _logits(model, ids):
    """Logits in inference mode, bitsandbytes layers on their training path (eval repacks them on CPU)."""
    model.eval()
    for m in model.modules():
        m.training = type(m).__module__.startswith("bitsandbytes")
    with torch.no_grad():
        return model(ids).logits.double()


def _check_against_exact(base, scheme="nf4", folder=None):
    exact_model, originals = _adapted(base, folder=folder)
    model, _ = _adapted(base, folder=folder)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    base_blocks = _blocks(model)
    bases = {n: m.quantized.dequantize() if m.quantized is not None else originals[n]
             for n, m in model.named_modules() if n.endswith("_proj")}
    exact = L.merge_and_unload(exact_model)
    merged = L.merge_and_unload(model, requantize=scheme, probe=ids)
    report = merged.requantize_report
    assert report.scheme == scheme and [row.name for row in report.layers] == [n for n in bases]
    for row in report.layers:
        w_exact = exact.get_submodule(row.name).weight.detach()
        w_q = merged.get_submodule(row.name).weight
        assert not w_q.requires_grad
        blocks = base_blocks.get(row.name, (64, None, True))
        packed, deq = _reference(scheme, w_exact, *blocks)
        assert _packed_tensors(w_q).keys() == packed.keys()
        for name, tensor in _packed_tensors(w_q).items():  # bit for bit
            assert torch.equal(tensor, packed[name]), (row.name, name)
        assert row.error == pytest.approx(_rel64(deq, w_exact), rel=1e-9)
        w_base = bases[row.name]
        assert row.base_error == pytest.approx(_rel64(_reference(scheme, w_base, *blocks)[1], w_base), rel=1e-9)
        assert row.delta == pytest.approx(_rel64(w_base, w_exact), rel=1e-9)
        assert row.base == {"dense": "dense", "nf4": "torchao-nf4", "bnb-nf4": "bnb-4bit", "bnb-int8": "bnb-8bit"}[base]
        assert 0.01 < row.error < 0.2  # NF4's rounding: a few percent, never zero here
    diff = (_logits(merged, ids) - _logits(exact, ids)).abs().max().item()
    assert 0 < diff <= report.max_logit_diff and diff == pytest.approx(report.max_logit_diff, rel=1e-6)
    assert report.max_logit == pytest.approx(_logits(exact, ids).abs().max().item(), rel=1e-6)
    return merged, report


@pytest.mark.parametrize("base", ["nf4", "dense"])
def test_requantized_weights_are_to_nf4_of_the_exact_merge(base):
    merged, report = _check_against_exact(base)
    if base == "nf4":
        # The dequantized base already lies on the NF4 grid: requantizing it alone costs far less than NF4 itself.
        assert all(row.base_error < row.error / 10 for row in report.layers)
    text = str(report)
    assert "model.layers.1.mlp.down_proj" in text and "max |logit difference|" in text


@pytest.mark.parametrize("base", ["bnb-nf4", "bnb-int8"])
def test_requantized_bnb_base_drops_the_bitsandbytes_record(saved_phi3, base):
    merged, _ = _check_against_exact(base, folder=saved_phi3)
    assert getattr(merged.config, "quantization_config", None) is None  # no bitsandbytes layer left
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())


@pytest.mark.parametrize("base", ["bnb-nf4", "dense"])
def test_bnb_nf4_requantizes_with_bitsandbytes(base, saved_phi3, tmp_path):
    """requantize="bnb-nf4": bitsandbytes' own quantize_4bit of the exact merge; over a model transformers loaded
    in 4-bit nf4, save_pretrained writes a checkpoint that from_pretrained loads back bit for bit."""
    merged, report = _check_against_exact(base, "bnb-nf4", folder=saved_phi3)
    assert all(type(merged.get_submodule(row.name)).__name__ == "Linear4bit" for row in report.layers)
    if base == "bnb-nf4":
        assert all(row.base_error == 0.0 for row in report.layers)  # the same packer, on its own grid
        merged.save_pretrained(tmp_path)
        reloaded = transformers.Phi3ForCausalLM.from_pretrained(tmp_path, device_map="cpu")
        for row in report.layers:
            assert torch.equal(reloaded.get_submodule(row.name).weight.data, merged.get_submodule(row.name).weight.data)
        ids = torch.randint(0, 128, (2, 12))
        assert torch.equal(_logits(reloaded, ids), _logits(merged, ids))


def test_bnb_nf4_refuses_rows_that_bitsandbytes_reads_wrongly_on_cpu():
    """bitsandbytes 0.50.2's CPU kernels misread 4-bit weights whose rows are not whole blocks; checked here
    first, so that the refusal stays justified: its dequantize disagrees with the codes it wrote."""
    bf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 96)
    data, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    codes = torch.stack([data.flatten() >> 4, data.flatten() & 15], 1).flatten().long()
    read = (state.code[codes].view(-1, 64) * state.absmax[:, None]).view(64, 96)
    assert not torch.equal(bf.dequantize_4bit(data, state), read)  # if this fails, bitsandbytes was fixed
    model, _ = _adapted("dense")  # down_proj: 96 input features
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"down_proj has 96 input features, not a multiple of the 64-weight block"):
        L.merge_and_unload(model, requantize="bnb-nf4")
    _assert_unchanged(model, snapshot)


def test_bnb_nf4_over_an_8bit_model_is_refused(saved_phi3):
    model = load_quantized_phi3(saved_phi3, "int8")
    L.phi3.apply_lora(model, r=4, lora_alpha=8)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="requantize='bnb-nf4' on a model transformers loaded with another"):
        L.merge_and_unload(model, requantize="bnb-nf4")
    _assert_unchanged(model, snapshot)


def test_report_without_changing_the_model_equals_the_merge_report():
    """requantize_report changes nothing and gives merge_and_unload's report; a probe's attention_mask leaves the
    padded positions out of the logit figures."""
    model, _ = _adapted("nf4")
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    probe = {"input_ids": ids, "attention_mask": mask}
    before = {k: v.clone() for k, v in L.lora_state_dict(model).items()}
    report = L.requantize_report(model, probe=probe)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, L.MergedLinear)
    assert all(torch.equal(v, L.lora_state_dict(model)[k]) for k, v in before.items())
    merged = L.merge_and_unload(model, requantize="nf4", probe=probe)
    assert merged.requantize_report == report
    exact = L.merge_and_unload(_adapted("nf4")[0]).eval()
    with torch.no_grad():
        reference, got = exact(**probe).logits.double(), merged.eval()(**probe).logits.double()
    kept = mask.bool()
    assert report.max_logit_diff == pytest.approx((got - reference)[kept].abs().max().item(), rel=1e-6)
    assert report.max_logit == pytest.approx(reference[kept].abs().max().item(), rel=1e-6)


def test_requantized_model_loads_into_a_quantize_base_model(tmp_path):
    """The result is what quantize_base makes: its state dict, saved by torch.save and read back without
    unpickling code, loads into a fresh quantize_base model."""
    merged = L.merge_and_unload(_adapted("nf4")[0], requantize="nf4")
    assert merged.requantize_report.max_logit_diff is None
    torch.save(merged.state_dict(), tmp_path / "merged.pt")
    fresh = make_tiny_phi3(seed=3)
    L.quantize_base(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "merged.pt", weights_only=True))
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, merged.eval()(ids).logits)


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    modules, state = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(requantize="int3"), ValueError, ["requantize", "'int3'", "('nf4', 'bnb-nf4')"]),
    (dict(probe=torch.zeros(1, 8)), ValueError, ["probe", "requantize='nf4'"]),
    (dict(requantize="nf4", probe=[1, 2]), TypeError, ["probe", "list"]),
])
def test_bad_arguments_change_nothing(kwargs, error, words):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    L.inject_lora(model, targets=["0", "2"], r=2)
    snapshot = _snapshot(model)
    with pytest.raises(error) as info:
        L.merge_and_unload(model, **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)
    _assert_unchanged(model, snapshot)


def test_a_shape_nf4_cannot_pack_is_refused_before_any_change():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.Linear(10, 5))
    L.inject_lora(model, targets=["0", "2", "3"], r=2)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"3 has a weight of shape \(5, 10\).*multiple of 64 elements, got 50"):
        L.merge_and_unload(model, requantize="nf4", probe=torch.randn(3, 64))
    _assert_unchanged(model, snapshot)
    with pytest.raises(ValueError, match=r"3 has a weight of shape \(5, 10\)"):
        L.requantize_report(model)


def test_plain_model_with_a_tensor_output_and_a_layer_without_adapter():
    """A model whose forward returns a tensor; an NF4 layer without adapter (r=0) keeps its own NF4 weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    L.quantize_base(model, targets=["2"])
    nf4_before = model[2].weight
    L.inject_lora(model, targets=["0"], r=4)
    model[2] = L.Linear.from_module(model[2], r=0)
    nn.init.normal_(model[0].lora_B, std=0.05)
    x, bias = torch.randn(5, 64), model[0].bias
    with torch.no_grad():
        reference = model[2].quantized.dequantize()
        exact = model[2](nn.functional.gelu(x @ model[0].merged_weight().t() + model[0].bias))
        merged = L.merge_and_unload(model, requantize="nf4", probe=x)
        diff = (merged(x) - exact).abs().max().item()
    assert diff == pytest.approx(merged.requantize_report.max_logit_diff, rel=1e-5)
    rows = merged.requantize_report.layers
    assert [row.name for row in rows] == ["0", "2"] and [row.base for row in rows] == ["dense", "torchao-nf4"]
    assert rows[1].error == 0.0 and rows[1].delta == 0.0 and rows[1].base_error > 0  # a round trip would cost
    assert merged[2].weight is not nf4_before and torch.equal(merged[2].weight.get_original_weight(), reference)
    assert all(torch.equal(getattr(merged[2].weight, k), getattr(nf4_before, k))
               for k in nf4_before.__tensor_flatten__()[0])
    assert merged[0].bias is bias  # shared, as merge_and_unload's plain layers share it


def test_safe_merge_refuses_a_non_finite_merge_before_any_change():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    L.inject_lora(model, targets=["0", "1"], r=2)
    with torch.no_grad():
        model[1].lora_B.fill_(float("inf"))
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="safe_merge: merging the adapter into 1 gives non-finite values"):
        L.merge_and_unload(model, safe_merge=True, requantize="nf4")
    _assert_unchanged(model, snapshot)


def test_embeddings_merge_dense_and_the_probe_sees_them_merged():
    """An Embedding adapter merges as usual (dense); the probe's exact reference uses its merged weight too."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 64), nn.Linear(64, 64))
    L.inject_lora(model, targets=["0", "1"], r=4)
    nn.init.normal_(model[0].lora_B, std=0.1)
    nn.init.normal_(model[1].lora_B, std=0.1)
    ids = torch.randint(0, 50, (3, 7))
    exact = L.merge_and_unload(copy.deepcopy(model))
    merged = L.merge_and_unload(model, requantize="nf4", probe=ids)
    assert type(merged[0]) is nn.Embedding and torch.equal(merged[0].weight, exact[0].weight)
    assert [row.name for row in merged.requantize_report.layers] == ["1"]
    with torch.no_grad():
        diff = (merged(ids).double() - exact(ids).double()).abs().max().item()
    assert diff > 0 and diff == pytest.approx(merged.requantize_report.max_logit_diff, rel=1e-6)


def test_a_lora_layer_itself_becomes_an_nf4_linear():
    layer = L.Linear(64, 32, r=4)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(4, 64)
    with torch.no_grad():
        exact = x @ layer.merged_weight().t() + layer.bias
        plain = L.merge_and_unload(layer, requantize="nf4", probe=x)
        assert type(plain) is nn.Linear and type(plain.weight).__name__ == "NF4Tensor"
        assert (plain(x) - exact).abs().max().item() == pytest.approx(plain.requantize_report.max_logit_diff, rel=1e-6)


def test_a_sharded_model_is_refused(process_group):
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(L.Linear(64, 64, r=2))
    fully_shard(model)
    with pytest.raises(ValueError, match="requantize_report: FSDPSequential is sharded by fully_shard"):
        L.requantize_report(model)
    with pytest.raises(ValueError, match="merge_and_unload: FSDPSequential is sharded by fully_shard"):
        L.merge_and_unload(model, requantize="nf4")


def test_a_pissa_layer_reports_against_its_original_weight():
    """Over PiSSA's residual base, the report's base is the original W (float64 naive W_res + s·B₀A₀), so
    delta is the trained change s(BA − B₀A₀), not the adapter's whole top-r part."""
    torch.manual_seed(0)
    module = nn.Linear(64, 64)
    original = module.weight.detach().clone()
    model = nn.Sequential(L.Linear.from_module(module, r=4, lora_alpha=8, init="pissa"))
    with torch.no_grad():
        model[0].lora_B.add_(0.01)
    residual = model[0].weight.detach().clone()
    report = L.requantize_report(model)
    exact = model[0].merged_weight()
    row = report.layers[0]
    assert row.delta == pytest.approx(_rel64(original, exact), rel=1e-4) and row.delta < 0.1
    assert _rel64(residual, exact) > 0.3  # what it reported before: the residual's distance, mostly s·B₀A₀
    n_blocks = original.numel() // 64
    q = _nf4().to_nf4(original.contiguous(), 64, min(256, n_blocks & -n_blocks)).get_original_weight()
    assert row.base_error == pytest.approx(_rel64(q, original), rel=1e-4)
    assert torch.equal(model[0].weight, residual)  # the layer's weight was not touched


def _nf4_with_named_adapter_on_one_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    L.quantize_base(model)
    L.inject_lora(model, ["0", "2"], r=4, lora_alpha=8)
    L.add_adapter(model, "x", targets=["2"], r=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in L.lora_parameters(model):
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("requantize", [None, "nf4"])
def test_merge_of_a_named_adapter_over_nf4_keeps_the_layers_without_it(requantize):
    """merge_and_unload(adapter="x") over torchao NF4, "x" on layer 2 only: layer 0 runs its base alone. Its
    merged_weight() was a clone of the packed weight, which torchao re-quantizes with its default blocks
    (an AssertionError for these shapes). Now the plain model equals the float64 reference (layer 0's
    dequantized base, layer 2's plus s·B A of "x"), and with requantize layer 0 keeps its own NF4 weight."""
    model = _nf4_with_named_adapter_on_one_layer()
    x = torch.randn(5, 64)
    nf4_0, deq0 = model[0].weight, model[0].quantized.dequantize()
    v = model[2].adapter("x")
    w2 = model[2].quantized.dequantize().double() + v.scaling * v.lora_B.double() @ v.lora_A.double()
    with torch.no_grad():
        hidden = nn.functional.gelu(x.double() @ deq0.double().t() + model[0].bias.double())
        reference = hidden @ w2.t() + model[2].bias.double()
        kwargs = {} if requantize is None else {"requantize": requantize, "probe": x}
        merged = L.merge_and_unload(model, adapter="x", **kwargs)
        out = merged(x).double()
    if requantize is None:
        assert torch.equal(merged[0].weight, deq0)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    else:
        assert all(torch.equal(getattr(merged[0].weight, k), getattr(nf4_0, k)) for k in nf4_0.__tensor_flatten__()[0])
        row0 = merged.requantize_report.layers[0]
        assert row0.name == "0" and row0.error == 0.0 and row0.delta == 0.0
        assert (out - reference).abs().max().item() <= merged.requantize_report.max_logit_diff + 1e-5
