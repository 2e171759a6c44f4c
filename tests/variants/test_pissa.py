"""PiSSA and OLoRA (init="pissa" | "pissa_niter_<N>" | "olora"): against PEFT's own init, a float64 naive
formula, PEFT serving our export on the original base, and a resume under another seed."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers.io.checkpoint import META_MODULES
from lora_layers.io.fileio import CheckpointError

F64 = torch.float64


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 12))


def _inject(model, init, seed=0, **kwargs):
    torch.manual_seed(seed)  # pissa_niter_N draws from torch's generator
    kwargs = {"r": 3, "lora_alpha": 5, **kwargs}
    L.inject_lora(model, ["0", "2"], init=init, merged_splits={"2": ([4, 8], [True, True])}, **kwargs)
    return model


def _train(model, steps=3, seed=1):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(L.lora_parameters(model), lr=0.2)
    for _ in range(steps):
        loss = model(torch.randn(5, 24)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_matches_peft(init, rslora):
    """Same A, B (signs included) and residual base as PEFT's LoraConfig(init_lora_weights=init)."""
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(24, 16))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=init, use_rslora=rslora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(base), config).base_model.model[0]
    ours = L.Linear.from_module(copy.deepcopy(base)[0], r=4, lora_alpha=8, init=init, use_rslora=rslora)
    torch.testing.assert_close(ours.lora_A, ref.lora_A["default"].weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.lora_B, ref.lora_B["default"].weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.weight, ref.base_layer.weight, rtol=1e-5, atol=1e-6)


def _top_r(W, r):
    """float64 naive: the rank-r truncated SVD of W."""
    U, S, Vh = torch.linalg.svd(W.to(F64), full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_per_split(fan_in_fan_out):
    """Each enabled split's rows get their own top-r (float64 SVD of those rows); a disabled split's rows
    stay bit for bit; residual + s·B A is the original weight; A₀, B₀ are kept and not trained."""
    torch.manual_seed(0)
    W = torch.randn(14, 10)
    layer = L.MergedLinear(10, 14, r=2, lora_alpha=3, enable_lora=[True, False, True], split_sizes=[4, 3, 7],
                           fan_in_fan_out=fan_in_fan_out, init="pissa")
    with torch.no_grad():  # the same weight, then decomposed again
        layer.weight.copy_(W.t() if fan_in_fan_out else W)
    layer.reset_lora_parameters()
    stored = layer.weight.t() if fan_in_fan_out else layer.weight
    s, A, B = layer.scaling, layer.lora_A.to(F64), layer.lora_B.to(F64)
    for (o0, o1), a, b in (((0, 4), slice(0, 2), slice(0, 4)), ((7, 14), slice(2, 4), slice(4, 11))):
        torch.testing.assert_close(s * B[b] @ A[a], _top_r(W[o0:o1], 2), rtol=0, atol=1e-5)
        torch.testing.assert_close(stored[o0:o1].to(F64), W[o0:o1].to(F64) - s * B[b] @ A[a], rtol=0, atol=1e-6)
    assert torch.equal(stored[4:7], W[4:7])
    assert torch.equal(layer.lora_init_A, layer.lora_A) and torch.equal(layer.lora_init_B, layer.lora_B)
    assert "lora_init_A" not in dict(layer.named_parameters())


def test_pissa_niter_reproducible_and_low_rank():
    """pissa_niter_N is seeded by torch.manual_seed, and on a weight of rank r it finds that part exactly."""
    torch.manual_seed(0)
    W = torch.randn(16, 3) @ torch.randn(3, 20)
    layers = []
    for _ in range(2):
        module = nn.Linear(20, 16)
        with torch.no_grad():
            module.weight.copy_(W)
        torch.manual_seed(7)
        layers.append(L.Linear.from_module(module, r=3, lora_alpha=6, init="pissa_niter_4"))
    assert torch.equal(layers[0].lora_A, layers[1].lora_A) and torch.equal(layers[0].weight, layers[1].weight)
    layer = layers[0]
    delta = layer.scaling * layer.lora_B.to(F64) @ layer.lora_A.to(F64)
    torch.testing.assert_close(delta, W.to(F64), rtol=0, atol=1e-4)
    assert layer.weight.abs().max() < 1e-4


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_init_keeps_output_and_exact_merging(init):
    """At init the model's output is the original's; after training, eval()/train() restore the residual
    bit for bit, and merge_and_unload gives W + s(B A − B₀ A₀) (float64 naive) on the original W."""
    orig = _net()
    model = _inject(copy.deepcopy(orig), init)
    x = torch.randn(6, 24)
    torch.testing.assert_close(model(x), orig(x), rtol=0, atol=1e-5)
    _train(model)
    residuals = [m.weight.detach().clone() for m in (model[0], model[2])]
    for _ in range(3):
        model.eval()
        model.train()
    assert all(torch.equal(w, m.weight) for w, m in zip(residuals, (model[0], model[2])))
    layer = model[0]
    s = layer.scaling
    expected = orig[0].weight.to(F64) + s * (layer.lora_B.to(F64) @ layer.lora_A.to(F64)
                                             - layer.lora_init_B.to(F64) @ layer.lora_init_A.to(F64))
    y = model(x)
    merged = L.merge_and_unload(model)
    assert type(merged[0]) is nn.Linear and set(merged.state_dict()) == set(orig.state_dict())
    torch.testing.assert_close(merged[0].weight.to(F64), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged(x), y, rtol=0, atol=1e-5)


def test_unload_gives_the_original_weight():
    orig = _net()
    model = _inject(copy.deepcopy(orig), "pissa")
    _train(model)
    plain = L.unload(model)
    assert set(plain.state_dict()) == set(orig.state_dict())
    for key, value in orig.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_export_serves_on_the_original_base(tmp_path, rslora):
    """export_peft writes a plain rank-2r LoRA (ΔW = s(B A − B₀A₀)); PEFT on the untouched base gives our logits."""
    peft = pytest.importorskip("peft")
    orig = _net()
    model = _inject(copy.deepcopy(orig), "pissa", use_rslora=rslora)
    _train(model)
    L.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] in (6, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        served = peft.PeftModel.from_pretrained(copy.deepcopy(orig), str(tmp_path))
    x = torch.randn(7, 24)
    torch.testing.assert_close(served(x), model(x), rtol=0, atol=1e-5)


def test_save_load_resume_under_another_seed(tmp_path):
    """save_lora keeps A₀, B₀; load_lora into a model initialised under another seed (another random
    SVD) moves its residual base with them, and load_adapter rebuilds the PiSSA layers from the header."""
    orig = _net()
    model = _inject(copy.deepcopy(orig), "pissa_niter_2")
    _train(model)
    path = tmp_path / "a.safetensors"
    L.save_lora(model, path)
    x = torch.randn(4, 24)
    other = _inject(copy.deepcopy(orig), "pissa_niter_2", seed=5)
    assert (other(x) - model(x)).abs().max() > 1e-3
    L.load_lora(other, path)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=1e-5)
    rebuilt = copy.deepcopy(orig)
    L.load_adapter(rebuilt, path)
    assert rebuilt[2].init == "pissa_niter_2"
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=1e-5)
    kaiming = _inject(copy.deepcopy(orig), "kaiming")  # its base is the original weight: refused
    before = copy.deepcopy(kaiming.state_dict())
    with pytest.raises(CheckpointError, match="init: checkpoint 'pissa_niter_2', model 'kaiming'") as info:
        L.load_lora(kaiming, path)
    assert "lora_layers.load_adapter(model, path)" in str(info.value)
    assert all(torch.equal(v, kaiming.state_dict()[k]) for k, v in before.items())


def test_load_state_dict_of_the_adapter_moves_the_residual():
    """model.load_state_dict(lora_state_dict(...), strict=False) under another seed: the residual moves with
    the loaded A₀, B₀ (merged or not); with the weight in the state dict, nothing moves."""
    orig = _net()
    model = _inject(copy.deepcopy(orig), "pissa_niter_2")
    _train(model)
    x = torch.randn(4, 24)
    for merged in (False, True):
        other = _inject(copy.deepcopy(orig), "pissa_niter_2", seed=5)
        other.train(not merged)
        other.load_state_dict(L.lora_state_dict(model), strict=False)
        torch.testing.assert_close(other.eval()(x), model(x), rtol=0, atol=1e-5)
    full = _inject(copy.deepcopy(orig), "pissa_niter_2", seed=5)
    full.load_state_dict(model.state_dict())
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in model.state_dict().items())


def test_training_state_resume(tmp_path):
    orig = _net()
    model = _inject(copy.deepcopy(orig), "pissa_niter_2")
    opt = torch.optim.AdamW(L.lora_parameters(model))
    _train(model)
    L.save_training_state(tmp_path / "state", model, opt)
    other = _inject(copy.deepcopy(orig), "pissa_niter_2", seed=5)
    L.load_training_state(tmp_path / "state", other, torch.optim.AdamW(L.lora_parameters(other)))
    x = torch.randn(4, 24)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=1e-5)


def test_other_inits_write_what_they_wrote_before(tmp_path):
    """Without PiSSA/OLoRA: no lora_init_* key, no 'init' in the header, state_dict keys unchanged."""
    model = _inject(_net(), "gaussian")
    assert not [k for k in model.state_dict() if "lora_init" in k]
    L.save_lora(model, tmp_path / "a.safetensors")
    from lora_layers.io.fileio import read_file
    tensors, meta = read_file(str(tmp_path / "a.safetensors"))[:2]
    assert set(tensors) == {n for n, _ in L.named_lora_parameters(model)}
    assert all("init" not in cfg for cfg in json.loads(meta[META_MODULES]).values())


def test_merged_state_dict_has_no_initial_keys():
    orig = _net()
    model = _inject(copy.deepcopy(orig), "olora")
    assert set(L.merged_state_dict(model)) == set(orig.state_dict())
    assert {"0.lora_init_A", "2.lora_init_B"} <= set(L.lora_state_dict(model))


def test_phi3_apply_lora(tiny_phi3_factory):
    """phi3.apply_lora(init=...) on the fused qkv/gate_up: the output at init is the original model's."""
    model = tiny_phi3_factory()
    ids = torch.randint(3, 128, (2, 9))
    ref = model(ids).logits
    L.phi3.apply_lora(model, r=4, init="pissa", lora_dropout=0.0)
    model.eval()
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-4)
    assert model.model.layers[0].self_attn.qkv_proj.lora_init_A.shape[0] == 12


@pytest.mark.parametrize("make, exc, text", [
    (lambda: L.Linear(8, 4, r=5, init="pissa"), ValueError, r"needs r <= min\(out, in\).*r=5.*use r <= 4"),
    (lambda: L.MergedLinear(8, 6, r=3, enable_lora=[True, True], split_sizes=[2, 4], init="olora"), ValueError,
     r"split 0 \(output rows 0:2\)"),
    (lambda: L.Linear(8, 4, r=2, init="pissa", use_dora=True), ValueError, "use_dora=True is not supported"),
    (lambda: L.Embedding(8, 4, r=2, init="pissa"), TypeError, "not supported by Embedding"),
    (lambda: L.Linear(8, 4, r=2, init="pissa_niter_0"), ValueError, "'pissa_niter_<N>' with N a positive"),
    (lambda: L.Linear(8, 4, r=2, init="pissa_niter_x"), ValueError, "init must be one of"),
])
def test_bad_input(make, exc, text):
    with pytest.raises(exc, match=text):
        make()


def test_refused_wrap_changes_nothing():
    module = nn.Linear(8, 4)
    before = module.weight.detach().clone()
    with pytest.raises(ValueError, match="needs r <= min"):
        L.Linear.from_module(module, r=6, init="pissa")
    assert torch.equal(module.weight, before) and module.weight.requires_grad


def test_quantized_base_refused():
    pytest.importorskip("torchao")
    model = nn.Sequential(nn.Linear(64, 64))
    L.quantize_base(model, targets=["0"])
    with pytest.raises(ValueError, match="quantized base.*requantized"):
        L.inject_lora(model, ["0"], r=2, init="pissa")


def test_import_of_a_peft_pissa_adapter_is_refused(tmp_path):
    """PEFT recomputes B₀A₀ from the base it loads on: the folder alone does not say what it serves."""
    peft = pytest.importorskip("peft")
    base = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0"],
                                                                          init_lora_weights="pissa"))
        model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="residual base weight W - s·B₀A₀"):
        L.import_peft(copy.deepcopy(base), tmp_path)


def test_set_initial_adapter_refuses_before_any_change():
    layer = L.Linear(8, 6, r=2, init="olora")
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=r"lora_init_B must have shape \(6, 2\), got \(6, 3\)"):
        layer.set_initial_adapter(B=torch.zeros(6, 3))
    with pytest.raises(ValueError, match="has no initial adapter .init='kaiming'"):
        L.Linear(8, 6, r=2).set_initial_adapter(A=torch.zeros(2, 8))
    bad = {"lora_init_A": torch.zeros(3, 8)}
    with pytest.raises(RuntimeError, match="lora_init_A must have shape"):
        layer.load_state_dict(bad, strict=False)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    assert "init='olora'" in repr(layer) and "init=" not in repr(L.Linear(8, 6, r=2))


def test_set_initial_adapter_keeps_the_original_weight():
    """float64 naive: weight + s·B₀A₀ is the same before and after another A₀, B₀."""
    layer = L.Linear(8, 6, r=2, lora_alpha=4, init="pissa")
    s = layer.scaling
    original = layer.weight.to(F64) + s * layer.lora_init_B.to(F64) @ layer.lora_init_A.to(F64)
    A0, B0 = torch.randn(2, 8), torch.randn(6, 2)
    layer.set_initial_adapter(A0, B0)
    assert torch.equal(layer.lora_init_A, A0) and torch.equal(layer.lora_init_B, B0)
    torch.testing.assert_close(layer.weight.to(F64) + s * B0.to(F64) @ A0.to(F64), original, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lora_dtype", [None, torch.float32])
def test_bf16_weight_rounded_once(lora_dtype):
    """A bf16 weight: A, B from the fp32 SVD (in the adapter dtype), the residual W − s·B A of the stored A, B
    formed in float64 and rounded once to bf16 (float64 naive reference)."""
    torch.manual_seed(0)
    module = nn.Linear(32, 16).to(torch.bfloat16)
    W = module.weight.detach().clone()
    layer = L.Linear.from_module(module, r=4, lora_alpha=8, init="pissa", lora_dtype=lora_dtype)
    assert layer.lora_A.dtype == (lora_dtype or torch.bfloat16)
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    A = ((S[:4] / layer.scaling).sqrt()[:, None] * Vh[:4]).to(layer.lora_A.dtype)
    assert torch.equal(layer.lora_A, A)
    expected = W.to(F64) - layer.scaling * layer.lora_B.to(F64) @ layer.lora_A.to(F64)
    torch.testing.assert_close(layer.weight, expected.to(torch.bfloat16), rtol=0, atol=0)
