"""Every layer against an independent float64 formula (tests/_naive_lora.py).

Hypothesis draws shapes, ranks, dtypes (fp32, bf16, fp16, fp32 adapters on a
bf16 base), rsLoRA, fan_in_fan_out, split patterns and conv geometry; each case
checks the forward and the gradient of every trainable input.
"""
import itertools
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_layers as L
from lora_layers.functional import draw_seed, dropout_mask
from _naive_lora import F64, assert_rel_close, leaf64, naive_conv, naive_embedding, naive_linear

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# (base dtype, lora_dtype)
DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32)]


def _scaling(alpha, r, rslora):
    return alpha / (math.sqrt(r) if rslora else r)


def _randomise(layer, scale=0.5):
    """Give the adapter non-trivial values (B starts at zero, Embedding's A too)."""
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn_like(layer.lora_A) * scale)
        layer.lora_B.copy_(torch.randn_like(layer.lora_B) * scale)


def _compare(y, y64, inputs, inputs64, dtype, what, factor=1.0):
    assert y.dtype == dtype, f"{what}: output dtype {y.dtype}, expected the base dtype {dtype}"
    assert_rel_close(y, y64, dtype, f"{what} forward", factor)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, g)
    grads64 = torch.autograd.grad(y64, inputs64, g.to(F64))
    for name, gr, gr64, inp in zip(("x", "lora_A", "lora_B", "bias"), grads, grads64, inputs):
        assert gr.dtype == inp.dtype, f"{what}: grad of {name} has dtype {gr.dtype}, input {inp.dtype}"
        assert_rel_close(gr, gr64, dtype, f"{what} d{name}", factor)


def _lora_mask(seed_state, x, p, dtype):
    """The mask lora_linear drew: replay the default generator, then regenerate."""
    if p == 0.0:
        return None
    torch.manual_seed(seed_state)
    seed = draw_seed()
    return dropout_mask(seed, x.detach().reshape(-1, x.shape[-1]).to(dtype), p).to(F64).view(x.shape)


# ----------------------------------------------------------------------------- Linear

@SETTINGS
@given(in_f=st.integers(1, 24), out_f=st.integers(1, 24), r=st.integers(1, 6), lead=st.sampled_from([(5,), (2, 3), (1, 2, 2)]),
       dt=st.sampled_from(DTYPES), fifo=st.booleans(), rslora=st.booleans(), bias=st.booleans(),
       alpha=st.sampled_from([1, 4, 16.0]), p=st.sampled_from([0.0, 0.3]))
def test_linear_vs_float64(in_f, out_f, r, lead, dt, fifo, rslora, bias, alpha, p):
    dtype, lora_dtype = dt
    layer = L.Linear(in_f, out_f, r=r, lora_alpha=alpha, lora_dropout=p, fan_in_fan_out=fifo, bias=bias,
                     use_rslora=rslora, lora_dtype=lora_dtype, dtype=dtype)
    assert layer.scaling == pytest.approx(_scaling(alpha, r, rslora))
    assert layer.lora_A.dtype == (lora_dtype or dtype) and layer.lora_A.shape == (r, in_f)
    assert layer.weight.shape == ((in_f, out_f) if fifo else (out_f, in_f))
    _randomise(layer)
    x = torch.randn(*lead, in_f, dtype=dtype, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    mask = _lora_mask(123, x, p, dtype)
    inputs = [x, layer.lora_A, layer.lora_B] + ([layer.bias] if bias else [])
    x64, A64, B64 = leaf64(x), leaf64(layer.lora_A), leaf64(layer.lora_B)
    b64 = leaf64(layer.bias) if bias else None
    y64 = naive_linear(x64, layer.weight.detach().to(F64), b64, A64, B64, _scaling(alpha, r, rslora),
                       fan_in_fan_out=fifo, mask=mask)
    _compare(y, y64, inputs, [x64, A64, B64] + ([b64] if bias else []), dtype, "Linear")


# ----------------------------------------------------------------------------- MergedLinear

@st.composite
def _splits(draw):
    n = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 12), min_size=n, max_size=n))
    enable = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
    return sizes, enable


def _check_merged(in_f, sizes, enable, r, dtype, lora_dtype, fifo, rslora, alpha, p, lead, equal=False):
    out_f = sum(sizes)
    layer = L.MergedLinear(in_f, out_f, r=r, lora_alpha=alpha, lora_dropout=p, enable_lora=enable,
                           fan_in_fan_out=fifo, split_sizes=None if equal else sizes,
                           use_rslora=rslora, lora_dtype=lora_dtype, dtype=dtype)
    n = sum(enable)
    assert layer.lora_A.shape == (r * n, in_f)
    assert layer.lora_B.shape == (sum(s for s, e in zip(sizes, enable) if e), r)
    assert layer.split_sizes == list(sizes) and layer.enable_lora == list(enable)
    _randomise(layer)
    x = torch.randn(*lead, in_f, dtype=dtype, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    mask = _lora_mask(7, x, p, dtype)
    x64, A64, B64, b64 = leaf64(x), leaf64(layer.lora_A), leaf64(layer.lora_B), leaf64(layer.bias)
    y64 = naive_linear(x64, layer.weight.detach().to(F64), b64, A64, B64, _scaling(alpha, r, rslora),
                       fan_in_fan_out=fifo, mask=mask, split_sizes=sizes, enable=enable)
    _compare(y, y64, [x, layer.lora_A, layer.lora_B, layer.bias], [x64, A64, B64, b64], dtype,
             f"MergedLinear{sizes}{enable}")


@SETTINGS
@given(in_f=st.integers(1, 16), splits=_splits(), r=st.integers(1, 4), dt=st.sampled_from(DTYPES),
       fifo=st.booleans(), rslora=st.booleans(), p=st.sampled_from([0.0, 0.25]))
def test_merged_linear_vs_float64(in_f, splits, r, dt, fifo, rslora, p):
    sizes, enable = splits
    _check_merged(in_f, sizes, enable, r, dt[0], dt[1], fifo, rslora, 8, p, (3, 2))


ENABLE3 = [list(e) for e in itertools.product([False, True], repeat=3) if any(e)]


@pytest.mark.parametrize("enable", ENABLE3, ids=lambda e: "".join("TF"[not v] for v in e))
@pytest.mark.parametrize("fifo", [False, True])
def test_merged_linear_gqa_all_patterns(enable, fifo):
    # GQA qkv: q = H·d = 48, k = v = KV·d = 16.
    _check_merged(12, [48, 16, 16], enable, 4, torch.float32, None, fifo, False, 16, 0.1, (2, 5))


@pytest.mark.parametrize("enable", ENABLE3, ids=lambda e: "".join("TF"[not v] for v in e))
def test_merged_linear_equal_splits_default(enable):
    _check_merged(10, [6, 6, 6], enable, 2, torch.float32, None, False, False, 2, 0.0, (4,), equal=True)


# ----------------------------------------------------------------------------- Embedding

@SETTINGS
@given(num=st.integers(2, 20), dim=st.integers(1, 12), r=st.integers(1, 6), dt=st.sampled_from(DTYPES),
       rslora=st.booleans(), use_pad=st.booleans(), lead=st.sampled_from([(7,), (2, 5)]))
def test_embedding_vs_float64(num, dim, r, dt, rslora, use_pad, lead):
    dtype, lora_dtype = dt
    pad = num // 2 if use_pad else None
    layer = L.Embedding(num, dim, r=r, lora_alpha=3, padding_idx=pad, use_rslora=rslora,
                        lora_dtype=lora_dtype, dtype=dtype)
    assert layer.lora_A.shape == (r, num) and layer.lora_B.shape == (dim, r)
    _randomise(layer)
    idx = torch.randint(0, num, lead)
    if use_pad:
        idx.view(-1)[0] = pad  # make sure the padding entry is looked up
    y = layer(idx)
    A64, B64 = leaf64(layer.lora_A), leaf64(layer.lora_B)
    y64 = naive_embedding(idx, layer.weight.detach().to(F64), A64, B64, _scaling(3, r, rslora))
    assert y.dtype == dtype
    assert_rel_close(y, y64, dtype, "Embedding forward")
    g = torch.randn_like(y)
    dA, dB = torch.autograd.grad(y, [layer.lora_A, layer.lora_B], g)
    dA64, dB64 = torch.autograd.grad(y64, [A64, B64], g.to(F64))
    if use_pad:
        # nn.Embedding semantics: the padding entry gets no gradient.
        dA64 = dA64.clone()
        dA64[:, pad] = 0
        assert torch.count_nonzero(dA[:, pad]) == 0
    assert_rel_close(dA, dA64, dtype, "Embedding dlora_A")
    assert_rel_close(dB, dB64, dtype, "Embedding dlora_B")


# ----------------------------------------------------------------------------- Conv

@st.composite
def _conv_case(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    pad = tuple(draw(st.integers(0, 1)) for _ in range(dims))
    size = tuple(d * (kk - 1) + 1 + draw(st.integers(0, 3)) for d, kk in zip(dil, k))
    return dims, groups, cin, cout, k, stride, dil, pad, size


@SETTINGS
@given(case=_conv_case(), r=st.integers(1, 4), dt=st.sampled_from(DTYPES), rslora=st.booleans(),
       bias=st.booleans(), p=st.sampled_from([0.0, 0.25]))
def test_conv_vs_float64(case, r, dt, rslora, bias, p):
    dims, groups, cin, cout, k, stride, dil, pad, size = case
    dtype, lora_dtype = dt
    cls = {1: L.Conv1d, 2: L.Conv2d, 3: L.Conv3d}[dims]
    kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias)
    layer = cls(cin, cout, k, r=r, lora_alpha=2, lora_dropout=p, use_rslora=rslora, lora_dtype=lora_dtype,
                dtype=dtype, **kw)
    # rank r whatever the kernel (loralib uses r·k)
    assert layer.lora_A.shape == (r, cin // groups * math.prod(k)) and layer.lora_B.shape == (cout, r)
    _randomise(layer)
    x = torch.randn(2, cin, *size, dtype=dtype, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x)
    mask = None
    if p > 0:
        # Conv dropout is an nn.Dropout on x: replay the default generator.
        torch.manual_seed(11)
        mask = torch.nn.functional.dropout(torch.ones_like(x.detach()), p, True).to(F64)
    x64, A64, B64 = leaf64(x), leaf64(layer.lora_A), leaf64(layer.lora_B)
    b64 = leaf64(layer.bias) if bias else None
    kw.pop("bias")
    y64 = naive_conv(x64, layer.weight.detach().to(F64), b64, A64, B64, _scaling(2, r, rslora), dims,
                     mask=mask, **kw)
    inputs = [x, layer.lora_A, layer.lora_B] + ([layer.bias] if bias else [])
    # The conv delta is formed in the base dtype before the convolution: allow
    # two roundings' worth more error in half precision.
    _compare(y, y64, inputs, [x64, A64, B64] + ([b64] if bias else []), dtype, f"Conv{dims}d", factor=2.0)


# ----------------------------------------------------------------------------- plain layers

def test_all_disabled_merged_linear_is_plain():
    layer = L.MergedLinear(8, 12, r=4, enable_lora=[False, False, False])
    assert not layer.has_adapter and layer.adapter_parameters() == {}
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert layer.weight.requires_grad  # nothing to adapt, nothing frozen
    ref = nn.Linear(8, 12)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), ref(x))
    layer.eval()
    assert torch.equal(layer(x), ref(x))


@pytest.mark.parametrize("make, ref_cls", [
    (lambda: L.Linear(6, 5, r=0), nn.Linear),
    (lambda: L.MergedLinear(6, 6, r=0, enable_lora=[True, False]), nn.Linear),
    (lambda: L.Embedding(9, 4, r=0), nn.Embedding),
    (lambda: L.Conv2d(2, 3, 3, r=0), nn.Conv2d),
])
def test_r0_is_plain_layer(make, ref_cls):
    layer = make()
    assert not layer.has_adapter and layer.scaling == 0.0
    assert not any("lora" in n for n, _ in layer.named_parameters())
    assert all(p.requires_grad for p in layer.parameters())
    x = torch.randint(0, 9, (4,)) if ref_cls is nn.Embedding else torch.randn(2, 6) if ref_cls is nn.Linear \
        else torch.randn(1, 2, 5, 5)
    plain = ref_cls(*{nn.Linear: (6, layer.weight.shape[0]), nn.Embedding: (9, 4), nn.Conv2d: (2, 3, 3)}[ref_cls])
    plain.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(layer(x), plain(x))
    layer.eval()
    assert torch.equal(layer(x), plain(x))


def test_embedding_sparse_backward():
    """sparse=True used to crash in backward (as in loralib): the adapter lookup is dense."""
    torch.manual_seed(0)
    sparse = L.Embedding(10, 4, r=2, sparse=True, padding_idx=0)
    dense = L.Embedding(10, 4, r=2, padding_idx=0)
    dense.load_state_dict(sparse.state_dict())
    for layer in (sparse, dense):
        layer.weight.requires_grad_(True)
        with torch.no_grad():
            layer.lora_A.copy_(torch.arange(20.0).view(2, 10) / 10)
        layer(torch.tensor([[0, 3, 3, 9]])).pow(2).sum().backward()
    assert sparse.weight.grad.layout == torch.sparse_coo  # the base keeps its sparse gradient
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(sparse, name).grad, getattr(dense, name).grad)


@pytest.mark.parametrize("kind", ["linear", "merged", "embedding", "conv2d"])
@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_from_module_shares_and_matches_base(kind, dtype, lora_dtype):
    base = {"linear": lambda: nn.Linear(6, 4, dtype=dtype), "merged": lambda: nn.Linear(6, 9, dtype=dtype),
            "embedding": lambda: nn.Embedding(7, 4, dtype=dtype),
            "conv2d": lambda: nn.Conv2d(2, 4, (3, 1), groups=2, dtype=dtype)}[kind]()
    x = {"embedding": torch.tensor([[1, 6]]), "conv2d": torch.randn(1, 2, 5, 3, dtype=dtype)}.get(
        kind, torch.randn(2, 6, dtype=dtype))
    y_base = base(x).detach()
    params = dict(base.named_parameters())
    if kind == "merged":
        layer = L.MergedLinear.from_module(base, r=2, enable_lora=[True, False, True], split_sizes=[3, 3, 3],
                                           lora_dtype=lora_dtype)
    else:
        cls = {"linear": L.Linear, "embedding": L.Embedding, "conv2d": L.Conv2d}[kind]
        layer = cls.from_module(base, r=2, lora_dtype=lora_dtype)
    for name, p in params.items():
        assert getattr(layer, name) is p  # shared, not copied
    assert not layer.weight.requires_grad and layer.lora_A.dtype == (lora_dtype or dtype)
    assert torch.equal(layer.train()(x), y_base) and torch.equal(layer.eval()(x), y_base)
    _randomise(layer)
    layer.train()
    assert not torch.equal(layer(x), y_base)
    layer.eval()  # merging writes into the shared weight (the wrapped module sees it)
    assert torch.equal(base.weight, layer.weight)


def test_from_module_refuses_an_instance_level_forward():
    # accelerate's dispatch hooks (device_map/offload) replace forward on the
    # instance; a wrapper copying it would call the old layer and skip the adapter.
    lin = nn.Linear(4, 3)
    original = lin.forward
    lin.forward = lambda x: original(x)
    with pytest.raises(TypeError, match="instance-level forward"):
        L.Linear.from_module(lin, r=2)
    assert lin.weight.requires_grad  # nothing changed


def test_from_module_does_not_keep_a_compiled_forward():
    lin = nn.Linear(4, 3)
    lin.__dict__["_compiled_call_impl"] = lambda *a, **k: torch.zeros(1)  # what module.compile() sets
    layer = L.Linear.from_module(lin, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4)
    expected = torch.nn.functional.linear(x, lin.weight, lin.bias)
    expected = expected + layer.scaling * (x @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(layer(x), expected)


def test_wrapped_module_restores_the_original_class_and_attributes():
    lin = nn.Linear(5, 3)
    layer = L.Linear.from_module(lin, r=2)
    plain = layer.wrapped_module()
    assert type(plain) is nn.Linear and set(plain.__dict__) == set(lin.__dict__)
    assert plain.weight is lin.weight and plain.bias is lin.bias
    hand = L.MergedLinear(5, 6, r=2, enable_lora=[True, False])
    plain = hand.wrapped_module()
    assert type(plain) is nn.Linear and set(plain.__dict__) == set(nn.Linear(1, 1).__dict__)
    assert set(plain._parameters) == {"weight", "bias"} and not plain._modules


# ----------------------------------------------------------------------------- dtypes, devices, numbers

@pytest.mark.parametrize("dtype", [torch.float16, torch.complex64, torch.float64])
@pytest.mark.parametrize("merged", [False, True], ids=["train", "eval"])
def test_input_dtype_mismatch_raises_in_train_and_eval_like_nn_linear(dtype, merged):
    layer = L.Linear(4, 3, r=2)
    nn.init.normal_(layer.lora_B)
    layer.train(not merged)
    x = torch.randn(5, 4).to(dtype)
    with pytest.raises(RuntimeError):
        nn.Linear(4, 3)(x)
    with pytest.raises(RuntimeError, match="dtype"):
        layer(x)


@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_autocast_never_lowers_float64(kind):
    torch.manual_seed(0)
    layer = (L.Linear(4, 3, r=2) if kind == "linear" else
             L.MergedLinear(4, 6, r=2, enable_lora=[True, False, True])).double()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_train = layer.train()(x)
        y_eval = layer.eval()(x)
        y_plain = nn.functional.linear(x, layer.weight, layer.bias)
    assert y_train.dtype == y_eval.dtype == y_plain.dtype == torch.float64
    torch.testing.assert_close(y_train, y_eval)


def test_meta_device_forward_train_and_eval():
    with torch.device("meta"):
        model = nn.Sequential(L.Linear(4, 6, r=2, lora_dropout=0.1),
                              L.MergedLinear(6, 9, r=2, enable_lora=[True, False, True]),
                              L.Embedding(5, 4, r=2), L.Conv1d(2, 3, 2, r=1))
        x = torch.randn(3, 4)
    assert model[1](model[0](x)).shape == (3, 9)
    model.eval()
    assert all(m.merged for m in model)
    assert model[1](model[0](x)).shape == (3, 9)
    model.train()
    assert not any(m.merged for m in model)
    y = model[0](x.requires_grad_())
    y.sum().backward()
    assert model[0].lora_A.grad.shape == (2, 4) and model[0].lora_A.grad.is_meta


def test_numpy_numbers_are_normalised(tmp_path):
    np = pytest.importorskip("numpy")
    layer = L.MergedLinear(4, 6, r=np.int64(2), lora_alpha=np.float32(8), lora_dropout=np.float64(0.1),
                           enable_lora=[True, True])
    assert type(layer.r) is int and type(layer.lora_alpha) is float and type(layer.lora_dropout.p) is float
    assert type(L.Linear(4, 4, r=2, lora_alpha=np.int32(3)).lora_alpha) is int
    L.mark_only_lora_as_trainable(layer)
    L.save_lora(layer, tmp_path / "a.safetensors")
    opt = torch.optim.SGD(L.lora_parameters(layer), lr=0.1)
    L.save_training_state(tmp_path / "state", layer, opt)
    L.load_lora(layer, tmp_path / "a.safetensors")
