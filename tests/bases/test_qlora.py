"""QLoRA: LoRA over frozen bitsandbytes 4-bit/8-bit layers and torchao NF4 weights.

Each path is compared with a float64 formula on the dequantized weight (the comparisons with
PEFT on the same quantized base are in tests/parity/test_qlora_peft.py); the packed weights must stay bit-identical
through training, and backward must keep no dequantized weight. Each test skips when a library it
needs is missing; the torch-only base below runs with none of them.
"""
import contextlib
import copy
import importlib
import warnings

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers.layers.ties import shared_weight_reason
from lora_layers.quantized import QuantizedBase, quantized_base
from _naive_lora import assert_rel_close, leaf64, naive_dora, naive_linear
from conftest import load_quantized_phi3



def _library(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


bnb, transformers = _library("bitsandbytes"), _library("transformers")


def _needs(*names):
    """Skip the calling test unless the optional libraries ``names`` are installed."""
    for name in names:
        pytest.importorskip(name)


IN, OUT = 128, 64


def _quantized(kind, bias=True, seed=0, out=OUT):
    _needs("torchao" if kind == "torchao-nf4" else "bitsandbytes")
    torch.manual_seed(seed)
    plain = nn.Linear(IN, out, bias=bias)
    if kind in ("nf4", "fp4"):
        q = bnb.nn.Linear4bit(IN, out, bias=bias, compute_dtype=torch.float32, quant_type=kind)
    elif kind == "int8":
        q = bnb.nn.Linear8bitLt(IN, out, bias=bias, has_fp16_weights=False)
    else:  # torchao NF4 through lora_layers.quantize_base
        q = copy.deepcopy(plain)
        L.quantize_base(nn.Sequential(q), targets=["0"])
        return q
    q.load_state_dict(plain.state_dict())
    return q.to("cpu")  # bitsandbytes quantizes on the move


def _packed(module, copy=True):
    w = module.weight
    inner = [getattr(w, n) for n in w.__tensor_flatten__()[0]] if type(w).__name__ == "NF4Tensor" else [w.data]
    return [t.clone() for t in inner] if copy else inner


KINDS = ["nf4", "fp4", "int8", "torchao-nf4"]


@pytest.mark.parametrize("out", [OUT, IN], ids=["non-square", "square"])  # square: W and Wᵀ fit alike
@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_the_float64_formula_and_keeps_the_packed_weight(kind, out):
    q = _quantized(kind, out=out)
    packed = _packed(q)
    with torch.no_grad():
        base_out = q(torch.ones(2, IN))
    layer = L.Linear.from_module(q, r=4, lora_alpha=8)
    assert layer.quantized is not None and layer.lora_A.dtype == torch.float32
    torch.testing.assert_close(layer(torch.ones(2, IN)), base_out)  # B = 0: exactly the quantized layer
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, IN, requires_grad=True)
    y = layer(x)
    W = layer.quantized.dequantize().double()
    x64, A64, B64 = leaf64(x), leaf64(layer.lora_A), leaf64(layer.lora_B)
    lora64 = naive_linear(x64, torch.zeros_like(W), None, A64, B64, layer.scaling)
    base = layer.quantized.linear(x.detach()).double() + layer.bias.detach().double()
    assert_rel_close(y, base + lora64, torch.float32, "forward")  # the kernel's base plus the exact LoRA term
    # All are x W_deq^T (LLM.int8 too: on CPU its training function does not quantize x, and the layer uses it)
    assert_rel_close(y, x64 @ W.t() + layer.bias.double() + lora64, torch.float32, "forward vs W_deq")
    g = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], g)
    g64 = g.double()
    rx, rA, rB = torch.autograd.grad(lora64, [x64, A64, B64], g64)
    assert_rel_close(gx, g64 @ W + rx, torch.float32, "dx")
    assert_rel_close(gA, rA, torch.float32, "dA")
    assert_rel_close(gB, rB, torch.float32, "dB")
    for before, after in zip(packed, _packed(layer)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("kind", ["nf4", "torchao-nf4"])
def test_backward_keeps_x_and_u_only(kind):
    layer = L.Linear.from_module(_quantized(kind), r=4, lora_alpha=8, lora_dropout=0.1)
    x = torch.randn(256, IN, requires_grad=True)
    owned = {t.untyped_storage().data_ptr()
             for t in [x, layer.lora_A, layer.lora_B, layer.bias] + _packed(layer, copy=False)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer.train()(x)
    beyond = [t for t in saved if t.untyped_storage().data_ptr() not in owned]
    assert sum(t.numel() * t.element_size() for t in beyond) == 256 * 4 * 4  # u: T x r, fp32
    y.sum().backward()


def test_merged_linear_gqa_over_a_4bit_base():
    q = _quantized("nf4", out=96)
    layer = L.MergedLinear.from_module(q, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                       split_sizes=[64, 16, 16])
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, IN)
    W = layer.quantized.dequantize().double()
    ref = naive_linear(x.double(), W, layer.bias.double(), layer.lora_A.double(), layer.lora_B.double(),
                       layer.scaling, split_sizes=[64, 16, 16], enable=[True, False, True])
    assert_rel_close(layer(x), ref, torch.float32, "fused forward")


class _RowInt8(QuantizedBase):
    """A quantized base in plain torch (int8 codes, one fp32 scale per row): the functional core's QLoRA
    path, checked with no quantization library installed."""

    kind = "test-row-int8"
    dtype = torch.float32

    def __init__(self, weight):
        self.out_features, self.in_features = weight.shape
        self.scale = weight.abs().amax(1, keepdim=True) / 127
        self.codes = torch.round(weight / self.scale).to(torch.int8)

    @property
    def device(self):
        return self.codes.device

    def _kernel(self, x):
        return x.to(self.dtype) @ self.dequantize().t()

    def dequantize(self):
        return self.codes.to(self.dtype) * self.scale


@pytest.mark.parametrize("out", [OUT, IN], ids=["non-square", "square"])
def test_functional_over_a_torch_only_quantized_base_matches_the_float64_formula(out):
    torch.manual_seed(0)
    base = _RowInt8(torch.randn(out, IN))
    bias = torch.randn(out)
    A, B = (torch.randn(4, IN) * 0.1).requires_grad_(), torch.randn(out, 4).requires_grad_()
    x = torch.randn(6, IN, requires_grad=True)
    y = L.functional.lora_linear(x, base, bias, A, B, 2.0, 0.0, True)
    x64, A64, B64 = leaf64(x), leaf64(A), leaf64(B)
    reference = naive_linear(x64, base.dequantize().double(), bias.double(), A64, B64, 2.0)
    assert_rel_close(y, reference, torch.float32, "forward")
    g = torch.randn_like(y)
    for name, got, expected in zip(["dx", "dA", "dB"], torch.autograd.grad(y, [x, A, B], g),
                                   torch.autograd.grad(reference, [x64, A64, B64], g.double())):
        assert_rel_close(got, expected, torch.float32, name)


@pytest.mark.parametrize("transform", ["torch.func", "torch.compile"])
@pytest.mark.parametrize("kind", KINDS)
def test_dx_under_torch_func_and_torch_compile_goes_through_the_quantized_base(kind, transform):
    """torch.func and torch.compile take lora_linear's plain-op path, where the base's x Wᵀ must be
    differentiable in x: a detached base term would drop g W from dx, silently."""
    layer = L.Linear.from_module(_quantized(kind, out=IN), r=4, lora_alpha=8)  # square: W and Wᵀ fit alike
    with torch.no_grad():
        layer.lora_B.normal_()
    base, A, B, bias = layer.quantized, layer.lora_A.detach(), layer.lora_B.detach(), layer.bias.detach()
    x, g = torch.randn(6, IN), torch.randn(6, IN)

    def f(x):
        return L.functional.lora_linear(x, base, bias, A, B, layer.scaling, 0.0, True)

    if transform == "torch.func":
        dx = torch.func.grad(lambda x: (f(x) * g).sum())(x)
    else:
        (dx,) = torch.autograd.grad(torch.compile(f, backend="aot_eager")(x.requires_grad_()), x, g)
        torch._dynamo.reset()
    expected = g.double() @ (base.dequantize().double() + layer.scaling * B.double() @ A.double())
    assert_rel_close(dx, expected, torch.float32, f"dx under {transform}")


@pytest.mark.parametrize("kind", KINDS)
def test_weight_nbytes_of_a_quantized_layer_before_and_after_wrapping(kind):
    q = _quantized(kind)
    before = L.quantized.weight_nbytes(q)  # e.g. a model just loaded with a BitsAndBytesConfig
    bias = q.bias
    assert 0 < before <= (0.6 if kind == "int8" else 0.35) * IN * OUT * 2  # vs bf16 (plus small code tables)
    assert L.quantized.weight_nbytes(L.Linear.from_module(q, r=4)) == before
    assert q.bias is bias  # looking did not touch the layer


@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_reads_the_cpu_repacked_layout(nested):
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel in an eval pass (absmax becomes a
    transposed (in/64, out) bf16 table); dequantize (dx, merge_and_unload) must still give each block its own
    scale. Blocks with very different scales make a mix-up visible (a uniform init hides it)."""
    _needs("bitsandbytes")
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    plain = nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        plain.weight.mul_(torch.rand(OUT, IN // 64).repeat_interleave(64, dim=1) * 10 + 0.1)
    q = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                          compress_statistics=nested)
    q.load_state_dict(plain.state_dict())
    layer = L.Linear.from_module(q.to("cpu"), r=4, lora_alpha=8)
    W = layer.quantized.dequantize()
    weight = layer.weight  # what bitsandbytes' Linear4bit.forward does to it (also where the CPU lacks the kernel)
    weight.data, _ = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    assert weight.quant_state.packing_format_for_cpu
    # The repacking rounds absmax to bf16: each weight may move by a small fraction of its own block's scale,
    # never by another block's (nested too: the scales are read back as they are, not requantized).
    error = (layer.quantized.dequantize() - W).abs().view(OUT, IN // 64, 64)
    scale = W.abs().view(OUT, IN // 64, 64).amax(-1, keepdim=True)
    assert (error <= 2 ** -7 * scale).all(), error.max()
    g = torch.randn(3, OUT)
    reference = g @ W
    torch.testing.assert_close(layer.quantized.grad_input(g), reference, rtol=0, atol=1e-2 * reference.abs().max())
    assert weight.quant_state.packing_format_for_cpu  # the layer keeps its format


def _bnb_layer(kind, seed=0):
    """A bitsandbytes layer as bitsandbytes sets it up, CPU repacking on (forced, so that the path is taken
    on any CPU: the repacking itself is plain PyTorch; only its kernel wants AVX512-BF16)."""
    _needs("bitsandbytes")
    torch.manual_seed(seed)
    plain = nn.Linear(IN, OUT)
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=6.0)
    else:
        q = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float32, quant_type=kind.split("-")[0],
                              compress_statistics=kind.endswith("nested"))
    q.load_state_dict(plain.state_dict())
    q = q.to("cpu")
    if kind != "int8":
        q.support_avx512bf16_for_cpu = True
    return q


def _snapshot(obj, depth=0):
    """Every tensor (dtype, shape, bytes) and scalar field of a bitsandbytes weight and its quantization state,
    nested states (state2) included; references to modules are left out."""
    if isinstance(obj, torch.Tensor):
        return (obj.dtype, tuple(obj.shape), obj.detach().clone())
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.Size, tuple)):
        return obj
    if isinstance(obj, nn.Module) or depth > 3:
        return type(obj).__name__
    return _fields(obj, depth)


def _fields(obj, depth=0):
    return {k: _snapshot(v, depth + 1) for k, v in sorted(vars(obj).items())}


def _bnb_snapshot(module):
    state = module.__dict__.get("state")  # Linear8bitLt's MatmulLtState (CB/SCB move there in its forward)
    return {"data": _snapshot(module.weight.data), "weight": _fields(module.weight),
            "layer_state": _fields(state) if state is not None else None}


def _assert_same_snapshot(before, after, where=""):
    def walk(a, b, path):
        assert type(a) is type(b), f"{where}: {path} was {a!r}, now {b!r}"
        if isinstance(a, dict):
            assert a.keys() == b.keys(), f"{where}: {path} fields {sorted(a)} became {sorted(b)}"
            for k in a:
                walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, tuple) and len(a) == 3 and isinstance(a[2], torch.Tensor):
            assert a[:2] == b[:2] and torch.equal(a[2], b[2]), f"{where}: {path} changed ({a[:2]} -> {b[:2]})"
        else:
            assert a == b, f"{where}: {path} was {a!r}, now {b!r}"
    walk(before, after, "")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", ["nf4", "fp4", "nf4-nested", "int8"])
def test_bnb_base_is_bit_identical_through_any_mode_and_eval_is_the_trained_function(kind, dora):
    """bitsandbytes' own forward repacks a 4-bit weight in place (lossily, bf16 scales) in eval mode on CPU,
    and on CPU computes LLM.int8 in eval by quantizing x but in training by dequantizing W. The LoRA layer
    must run one function in every mode and never change a byte of the frozen base."""
    q = _bnb_layer(kind)
    layer = L.Linear.from_module(q, r=4, lora_alpha=8, use_dora=dora)
    with torch.no_grad():
        layer.lora_B.normal_()
        if dora:
            layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
    before = _bnb_snapshot(q)
    x = torch.randn(5, IN)
    xg = x.clone().requires_grad_()
    y_train = layer.train()(xg)
    y_train.backward(torch.randn_like(y_train))
    _assert_same_snapshot(before, _bnb_snapshot(q), "after the train forward and backward")
    outputs = {"train": y_train.detach()}
    for name, mode, context in [("eval", False, contextlib.nullcontext), ("eval no_grad", False, torch.no_grad),
                                ("eval inference_mode", False, torch.inference_mode),
                                ("train no_grad", True, torch.no_grad), ("eval again", False, torch.no_grad),
                                ("train again", True, contextlib.nullcontext)]:
        with context():
            outputs[name] = layer.train(mode)(x).detach().clone()
        _assert_same_snapshot(before, _bnb_snapshot(q), f"after the {name} forward")
    norm = layer._dora_norm() if dora else None
    plain = L.merge_and_unload(copy.deepcopy(nn.Sequential(layer)))
    _assert_same_snapshot(before, _bnb_snapshot(q), "after DoRA's norm and merge_and_unload on a deepcopy")
    for name, y in outputs.items():
        torch.testing.assert_close(y, y_train.detach(), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    # The function trained, in float64 on the dequantized weight (on CPU, bitsandbytes trains LLM.int8 on
    # x W_deqᵀ: its activations are quantized only in its eval path, which the LoRA layer does not take).
    W = layer.quantized.dequantize().double()
    A, B, b = layer.lora_A.double(), layer.lora_B.double(), layer.bias.double()
    if dora:
        reference = naive_dora(x.double(), W, b, A, B, layer.lora_magnitude.double(), layer.scaling)
        torch.testing.assert_close(norm.double(), (W + layer.scaling * B @ A).norm(dim=1))
    else:
        reference = naive_linear(x.double(), W, b, A, B, layer.scaling)
    assert_rel_close(y_train, reference, torch.float32, "train forward vs float64")
    assert_rel_close(plain(x), reference, torch.float32, "merge_and_unload vs float64")


@pytest.mark.parametrize("kind", ["nf4", "fp4", "nf4-nested"])
def test_a_layer_bitsandbytes_repacked_before_wrapping_is_unpacked_exactly_with_a_warning(kind):
    """A model evaluated after from_pretrained and before LoRA: bitsandbytes has already repacked the weight,
    rounding each block's scale to bf16. The LoRA layer says so, and computes with exactly the values the layer
    holds now, in bitsandbytes' standard layout: the 4-bit codes as loaded times the bf16-rounded scales."""
    q = _bnb_layer(kind)
    W0 = quantized_base(q).dequantize()  # as loaded; a block's largest |w| is its scale (codes reach ±1)
    scale = W0.abs().view(-1, 64).amax(1, keepdim=True)
    expected = (W0.view(-1, 64) / scale * scale.bfloat16().float()).view(OUT, IN)
    x = torch.randn(5, IN)
    with torch.no_grad():
        q.eval()(x)
    assert q.weight.quant_state.packing_format_for_cpu  # what bitsandbytes did
    with pytest.warns(UserWarning, match="repacked in place by bitsandbytes' CPU inference path"):
        layer = L.Linear.from_module(q, r=4, lora_alpha=8)
    state = layer.weight.quant_state
    assert not state.packing_format_for_cpu and not state.nested and state.dtype == torch.float32
    assert layer.weight.shape == (IN * OUT // 2, 1) and state.absmax.dtype == torch.float32
    W = layer.quantized.dequantize()
    torch.testing.assert_close(W, expected, rtol=1e-6, atol=0)
    assert not torch.equal(W, W0)  # the rounding is real, and kept
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer.train()(x)
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), y)
    reference = naive_linear(x.double(), expected.double(), layer.bias.double(), layer.lora_A.double(),
                             layer.lora_B.double(), layer.scaling)
    assert_rel_close(y, reference, torch.float32, "forward on the unpacked weight")


@pytest.mark.parametrize("use", ["state_dict", "forward"])
def test_a_weight_the_bitsandbytes_layer_repacks_after_wrapping_is_unpacked_before_use(use):
    """The bitsandbytes layer still shares the weight: its own eval forward repacks it under the LoRA layer."""
    q = _bnb_layer("nf4-nested")
    layer = L.Linear.from_module(q, r=4, lora_alpha=8)
    x = torch.randn(5, IN)
    with torch.no_grad():
        q.eval()(x)
    W = layer.quantized.dequantize()  # read from the repacked layout, on a copy
    assert q.weight.quant_state.packing_format_for_cpu
    with pytest.warns(UserWarning, match="repacked in place"):
        out = layer.state_dict() if use == "state_dict" else layer(x)
    assert not q.weight.quant_state.packing_format_for_cpu
    assert torch.equal(layer.quantized.dequantize(), W)
    if use == "state_dict":  # bitsandbytes reads the same weight back from it
        stats = {k[len("weight."):]: v for k, v in out.items() if k.startswith("weight.")}
        loaded = bnb.nn.Params4bit.from_prequantized(out["weight"], stats, device="cpu")
        assert torch.equal(bnb.functional.dequantize_4bit(loaded.data, loaded.quant_state), W)


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-nf4"])
def test_eval_stays_unmerged_and_merge_and_unload_dequantizes(kind):
    reference = _quantized(kind)  # the same quantized layer, unwrapped
    layer = L.Linear.from_module(_quantized(kind), r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    model = nn.Sequential(layer)
    x = torch.randn(3, IN)
    lora = layer.scaling * (x @ layer.lora_A.t() @ layer.lora_B.t()).detach()
    reference.train()  # in eval on CPU, bitsandbytes computes another function (repacked, or x quantized)
    for mode in (True, False):
        model.train(mode)
        assert not layer.merged
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x) + lora, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="quantized"):
        layer.merge()
    y = model.train()(x).detach()
    expected = layer.quantized.dequantize() + layer.scaling * (layer.lora_B @ layer.lora_A).detach()
    plain = L.merge_and_unload(model)
    assert type(plain[0]) is nn.Linear and plain[0].weight.dtype == torch.float32
    torch.testing.assert_close(plain[0].weight, expected)
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)  # on CPU, LLM.int8 trains on x W_deq^T too


def test_quantize_base_then_apply_lora_trains_and_keeps_packed_weights(tiny_phi3_factory):
    _needs("torchao", "transformers")
    model = tiny_phi3_factory(hidden_size=64, intermediate_size=128)
    names = L.quantize_base(model)
    assert len(names) == 8 and all(n.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")) for n in names)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert L.quantized.weight_nbytes(qkv) <= 0.3 * qkv.weight.numel() * 2  # vs bf16 bytes
    packed = _packed(qkv)
    L.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=True)
    ids = torch.randint(0, 128, (2, 12))
    opt = torch.optim.AdamW(L.lora_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for before, after in zip(packed, _packed(model.model.layers[0].self_attn.qkv_proj)):
        assert torch.equal(before, after)


def test_quantize_base_refusals_change_nothing():
    _needs("torchao")
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 3))  # 3 x 64 = 192 weights: not a multiple of 64? it is
    model.add_module("odd", nn.Linear(10, 3))  # 30 weights: NF4 cannot pack it
    before = [p for p in model.parameters()]
    with pytest.raises(ValueError, match="scheme must be one of .*'int4'"):
        L.quantize_base(model, scheme="int4")
    with pytest.raises(ValueError, match="odd.weight has shape \\(3, 10\\)"):
        L.quantize_base(model, targets=["0", "odd"])
    with pytest.raises(ValueError, match="match no module"):
        L.quantize_base(model, targets=["nope"])
    assert list(model.parameters()) == before and all(type(p) is nn.Parameter for p in model.parameters())
    assert L.quantize_base(model, targets=["0"]) == ["0"]
    with pytest.raises(ValueError, match=r"only plain nn.Linear.*'0 \(already quantized\)'"):
        L.quantize_base(model, targets=["0"])  # already quantized
    model[1].weight = nn.Parameter(torch.randn(3, 64))
    model.add_module("head", nn.Linear(64, 3))
    model.head.weight = model[1].weight  # tied
    with pytest.raises(ValueError, match=r"shared with other modules.*1\.weight \(also \['head\.weight'\]\)"):
        L.quantize_base(model, targets=["1"])
    assert model.head.weight is model[1].weight and type(model[1].weight) is nn.Parameter


# ----------------------------------------------------------------------------- a Phi-3 that transformers loads quantized

def test_apply_lora_after_an_eval_pass_of_the_loaded_4bit_model_warns_and_unpacks(saved_phi3):
    """from_pretrained, evaluate, then apply_lora: bitsandbytes has repacked every projection already."""
    model = load_quantized_phi3(saved_phi3, "nf4")
    for module in model.modules():
        if "support_avx512bf16_for_cpu" in module.__dict__:
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' CPU repacking, on any CPU
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        model(ids)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.quant_state.packing_format_for_cpu
    with pytest.warns(UserWarning, match="repacked in place") as caught:
        L.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    assert all("repacked in place" in str(w.message) for w in caught)
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, L.Linear)]
    assert len(states) == 8 and not any(s.packing_format_for_cpu for s in states)
    with torch.no_grad():
        for p in L.lora_parameters(model):
            p.normal_(0, 0.1)
        assert torch.equal(model.eval()(ids).logits, model.train()(ids).logits)


def test_int8_without_bias_has_a_fixed_dtype_recorded_at_wrap_time():
    # Phi-3's projections have no bias and LLM.int8 has no dtype: the one recorded when wrapping
    # (torch's default here) holds whatever inputs the layer sees, so merging needs no forward first.
    layer = L.Linear.from_module(_quantized("int8", bias=False), r=2, lora_alpha=4)
    assert layer.lora_A.dtype == layer.quantized.dtype == torch.get_default_dtype()
    with torch.no_grad():
        layer.lora_B.normal_()
        assert layer(torch.randn(3, IN, dtype=torch.bfloat16)).dtype == torch.bfloat16  # bnb returns x's dtype
    assert layer.quantized.dtype == torch.float32
    x = torch.randn(3, IN)
    y = layer(x)
    assert y.dtype == torch.float32
    plain = L.merge_and_unload(nn.Sequential(layer))
    assert plain[0].weight.dtype == torch.float32
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)  # on CPU, LLM.int8 trains on x W_deq^T


def test_int8_takes_the_models_dtype_from_record_compute_dtype():
    from lora_layers.quantized import record_compute_dtype

    model = nn.Sequential(nn.Embedding(10, IN, dtype=torch.bfloat16), _quantized("int8", bias=False))
    assert record_compute_dtype(model) == torch.bfloat16
    L.inject_lora(model, ["1"], r=2, lora_alpha=4)
    assert model[1].lora_A.dtype == model[1].quantized.dtype == torch.bfloat16
    merged = L.merge_and_unload(model)  # no forward before
    assert merged[1].weight.dtype == torch.bfloat16
    assert merged(torch.tensor([[1, 2]])).dtype == torch.bfloat16


def _without_lora(state):
    return {k: v for k, v in state.items() if "lora_" not in k}


@pytest.mark.parametrize("kind", ["nf4", "fp4", "nf4-nested", "int8"])
def test_bnb_state_dict_has_the_bitsandbytes_layers_keys_and_loads_as_it_does(kind):
    """The LoRA layer writes bitsandbytes' quantization state (absmax/quant_map/quant_state.*, SCB/
    weight_format) under the same names, and loads it back: as Linear8bitLt does, and, where Linear4bit
    would copy the packed bytes and leave their quantization state unread (read with the old scales, the
    output is ~0.06 off), as transformers loads a 4-bit checkpoint (issue #20 review)."""
    def quantized(seed):
        return _bnb_layer(kind, seed=seed) if kind.endswith("nested") else _quantized(kind, seed=seed)

    plain_a, plain_b = quantized(0), quantized(1)
    ours_a = L.Linear.from_module(quantized(0), r=2, lora_alpha=4)
    ours_b = L.Linear.from_module(quantized(1), r=2, lora_alpha=4)
    expected, state = plain_a.state_dict(), _without_lora(ours_a.state_dict())
    assert sorted(state) == sorted(expected)
    assert any(k not in ("weight", "bias") for k in state)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    x = torch.randn(3, IN)
    with torch.no_grad():
        ours_a.lora_B.normal_()
        plain_res = plain_b.load_state_dict(plain_a.state_dict(), strict=False)
        ours_res = ours_b.load_state_dict(ours_a.state_dict(), strict=False)
        assert not ours_res.unexpected_keys and not ours_res.missing_keys
        assert torch.equal(ours_b(x), ours_a(x))
        ours_b.load_state_dict(ours_a.state_dict())  # strict
        assert torch.equal(ours_b(x), ours_a(x))
        if kind == "int8":  # as Linear8bitLt, which loads its scales
            assert plain_res.unexpected_keys == [] and torch.equal(plain_b(x), plain_a(x))
        else:  # Linear4bit leaves its quant_state keys unread
            assert sorted(plain_res.unexpected_keys) == sorted(k for k in expected if k.startswith("weight."))
    # b holds copies: nothing of a's weight or quantization state is shared
    a_tensors, b_tensors = _packed_state(ours_a), _packed_state(ours_b)
    assert len(a_tensors) == len(b_tensors) >= 2
    assert not {t.untyped_storage().data_ptr() for t in a_tensors} & {t.untyped_storage().data_ptr() for t in b_tensors}


def _packed_state(layer):
    w = layer.weight
    if hasattr(w, "quant_state"):
        state = w.quant_state
        return [w.data, state.absmax] + ([state.state2.absmax] if state.nested else [])
    return [w.data, w.SCB]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bnb_load_state_dict_refuses_a_weight_of_another_shape_and_changes_nothing(kind):
    """(64, 128) and (128, 64) pack into the same bytes: the saved quantization state tells them apart."""
    _needs("bitsandbytes")
    torch.manual_seed(0)
    if kind == "int8":
        other = bnb.nn.Linear8bitLt(OUT, IN, has_fp16_weights=False)
    else:
        other = bnb.nn.Linear4bit(OUT, IN, compute_dtype=torch.float32, quant_type=kind)
    other.load_state_dict(nn.Linear(OUT, IN).state_dict())
    source = L.Linear.from_module(other.to("cpu"), r=2, lora_alpha=4).state_dict()
    layer = L.Linear.from_module(_quantized(kind, seed=1), r=2, lora_alpha=4)
    before = _bnb_snapshot(layer), {k: v.clone() for k, v in layer.state_dict().items()}
    expected = (r"SCB: size mismatch, got scales of shape \(128,\), expected \(64,\)" if kind == "int8"
                else r"weight: a 4-bit weight of logical shape \(128, 64\).*expected shape \(64, 128\)")
    with pytest.raises(RuntimeError, match=expected):
        layer.load_state_dict(source, strict=False)
    _assert_same_snapshot(before[0], _bnb_snapshot(layer))
    assert all(torch.equal(v, before[1][k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bnb_load_state_dict_refuses_a_float_weight_and_changes_nothing(kind):
    """A float checkpoint (the model before quantization) loaded into LLM.int8 codes of the same shape was cast
    to int8, truncated, not quantized, and read with the old scales: silently wrong (issue #20 review)."""
    layer = L.Linear.from_module(_quantized(kind), r=2, lora_alpha=4)
    before = _bnb_snapshot(layer), {k: v.clone() for k, v in layer.state_dict().items()}
    torch.manual_seed(3)
    plain = nn.Linear(IN, OUT).state_dict()
    expected = "weight: LLM.int8 holds int8 codes, got a torch.float32 weight" if kind == "int8" else "size mismatch"
    with pytest.raises(RuntimeError, match=expected):
        layer.load_state_dict(plain, strict=False)
    _assert_same_snapshot(before[0], _bnb_snapshot(layer))
    if kind == "int8":  # (a size mismatch is torch's own: it loads the layer's other keys, as for any module)
        assert all(torch.equal(v, before[1][k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_bnb_phi3_state_dict_round_trip_gives_the_same_logits(saved_phi3, tmp_path, kind):
    from conftest import make_tiny_phi3

    other = tmp_path / "other"
    make_tiny_phi3(seed=7, hidden_size=64, intermediate_size=128).save_pretrained(other)
    a, b = load_quantized_phi3(saved_phi3, kind), load_quantized_phi3(other, kind)
    for model in (a, b):
        L.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
        model.eval()
    with torch.no_grad():
        for p in L.lora_parameters(a):
            p.normal_(0, 0.1)
    keys = set(a.state_dict())
    if kind == "int8":
        assert "model.layers.0.self_attn.qkv_proj.SCB" in keys and "model.layers.0.mlp.down_proj.weight_format" in keys
    else:  # the 4-bit weights' scales were not loaded before (issue #20 review): logits ~0.7 off
        assert "model.layers.0.self_attn.qkv_proj.weight.absmax" in keys
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("kind", ["nf4", "nf4-nested", "int8"])
def test_bnb_load_with_assign_and_a_new_weight_parameter_are_what_the_layer_computes_with(kind):
    """The LoRA layer computes over the weight it holds now: one load_state_dict(assign=True) gave it (a
    bitsandbytes Parameter with its quantization state), or one assigned to it; before, it went on with
    the bitsandbytes view's old weight, silently (issue #20 review)."""
    def quantized(seed):
        return _bnb_layer(kind, seed=seed) if kind.endswith("nested") else _quantized(kind, seed=seed)

    source = L.Linear.from_module(quantized(0), r=2, lora_alpha=4)
    with torch.no_grad():
        source.lora_B.normal_()
    x = torch.randn(3, IN)
    layer = L.Linear.from_module(quantized(1), r=2, lora_alpha=4)
    layer.load_state_dict(source.state_dict(), assign=True)
    assert type(layer.weight) is type(source.weight) and not layer.weight.requires_grad
    assert torch.equal(layer(x), source(x))
    assert torch.equal(layer.quantized.dequantize(), source.quantized.dequantize())
    layer = L.Linear.from_module(quantized(1), r=2, lora_alpha=4)
    other = quantized(0)
    layer.weight = other.weight
    with torch.no_grad():
        layer.bias.copy_(source.bias)
        layer.lora_A.copy_(source.lora_A)
        layer.lora_B.copy_(source.lora_B)
    assert torch.equal(layer(x), source(x))
    assert torch.equal(layer.quantized.dequantize(), source.quantized.dequantize())


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_int8_layer_bitsandbytes_ran_before_wrapping_loads_a_state_dict(assign):
    """A model evaluated before LoRA: Linear8bitLt's forward moved the scales off the weight into its state.
    load_state_dict raised 'Loading a quantized checkpoint into non-quantized Linear8bitLt' (issue #20 review)."""
    source = L.Linear.from_module(_quantized("int8", seed=0), r=2, lora_alpha=4)
    with torch.no_grad():
        source.lora_B.normal_()
    evaluated = _quantized("int8", seed=1)
    x = torch.randn(3, IN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: inputs cast to float16
        evaluated.eval()(x)
    assert evaluated.weight.SCB is None and evaluated.state.SCB is not None
    layer = L.Linear.from_module(evaluated, r=2, lora_alpha=4)
    layer.load_state_dict(source.state_dict(), assign=assign)
    assert torch.equal(layer(x), source(x))


def test_a_torchao_nf4_model_moves_and_casts_with_lora_layers_imported():
    """Module.to/.float of a tensor-subclass Parameter swaps tensors, which torch refuses for a tensor with a
    weak reference: the tied-weight record held one to every Parameter registered after lora_layers was imported,
    so quantize_base's model (or any torchao model) raised "_apply(): Couldn't swap" (issue #20 review)."""
    _needs("torchao")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, OUT))
    L.quantize_base(model)
    L.inject_lora(model, ["0"], r=2, lora_alpha=4)
    with torch.no_grad():
        model[0].lora_B.normal_()
    x = torch.randn(3, IN)
    with torch.no_grad():  # (a graph holding a weight would keep it from being swapped, as in torch)
        y = model(x)
    weights = [model[0].weight, model[1].weight]
    assert model.to("cpu") is model and model.float() is model
    assert [model[0].weight, model[1].weight] == weights  # swapped in place: the same Parameters
    assert torch.equal(model(x), y)
    assert shared_weight_reason(model[0]) is None
    model.add_module("head", nn.Linear(IN, OUT))
    model.head.weight = model[0].weight  # a tie made by assignment is still seen
    assert "also registered as Linear.weight" in shared_weight_reason(model[0])


def test_int8_with_fp16_weights_is_refused_when_wrapped_and_nothing_changes():
    """Linear8bitLt(has_fp16_weights=True) trains a float weight it quantizes in each call: the LoRA layer
    crashed in its first forward ('NoneType' object has no attribute 'unsqueeze') (issue #20 review)."""
    _needs("bitsandbytes")
    q = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=True).to("cpu")
    with pytest.raises(ValueError, match=r"has_fp16_weights=True holds a trainable torch.float32 weight"):
        L.Linear.from_module(q, r=2, lora_alpha=4)
    model = nn.Sequential(nn.Linear(IN, IN), q)
    with pytest.raises(ValueError, match="has_fp16_weights=True"):
        L.inject_lora(model, ["0", "1"], r=2, lora_alpha=4)
    assert type(model[0]) is nn.Linear and model[1] is q


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_unload_of_a_bitsandbytes_phi3_saves_and_reloads_as_a_plain_model(saved_phi3, tmp_path, kind):
    """transformers' record of the quantization stayed on the merged model, so save_pretrained wrote a
    checkpoint that from_pretrained reloaded as a bitsandbytes one and crashed in its forward (issue #20 review)."""
    model = load_quantized_phi3(saved_phi3, kind)
    L.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for p in L.lora_parameters(model):
            p.normal_(0, 0.1)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
    merged = L.merge_and_unload(model)
    assert getattr(merged, "hf_quantizer", None) is None and "quantization_config" not in merged.config.to_dict()
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in again.modules())
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-5, atol=1e-5)
