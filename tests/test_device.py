"""The library on the device chosen with ``pytest --device`` (default cpu; ``--device cuda`` on a GPU).

Each test builds its tensors on that device, in fp32, bf16 and fp16 where it
applies, and compares with a float64 reference on the CPU (the formulas of
tests/_naive_lora.py, or ``F.cross_entropy``), or checks bitwise restoration.
On the CPU these repeat, at small sizes, what the other test files cover at
length, so that ``benchmarks/gpu_check.sh`` has one quick file that proves the
same on a GPU: ``pytest -m cuda --device cuda tests/test_device.py``.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from _naive_lora import (F64, assert_rel_close, bit_equal, leaf64, naive_conv, naive_dora, naive_embedding,
                         naive_linear)
from conftest import make_tiny_phi3

import lora_layers as L
from lora_layers import functional
from lora_layers import phi3
from lora_layers.loss import fused_linear_cross_entropy
from lora_layers.utils import named_lora_parameters

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = [str(d).split(".")[-1] for d in DTYPES]


def _randomise(layer, scale=0.5):
    """Non-zero adapters (B, and Embedding's A, start at zero)."""
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn_like(layer.lora_A) * scale)
        layer.lora_B.copy_(torch.randn_like(layer.lora_B) * scale)
    return layer


def _grads_close(y, y64, inputs, inputs64, dtype, what, factor=1.0, out_dtype=None):
    """y and the gradients of ``inputs`` (on the device) against the float64 CPU ones."""
    assert y.dtype == (out_dtype or dtype), f"{what}: output dtype {y.dtype}, expected {out_dtype or dtype}"
    assert_rel_close(y.cpu(), y64, dtype, f"{what} forward", factor)
    g = torch.randn(y.shape, dtype=F64)
    grads = torch.autograd.grad(y, inputs, g.to(y.device, y.dtype))
    grads64 = torch.autograd.grad(y64, inputs64, g)
    for i, (gr, gr64, inp) in enumerate(zip(grads, grads64, inputs)):
        assert gr.device == inp.device and gr.dtype == inp.dtype, f"{what}: grad {i} is {gr.dtype} on {gr.device}"
        assert_rel_close(gr.cpu(), gr64, dtype, f"{what} grad {i}", factor)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("kind", ["Linear", "MergedLinear"])
def test_linear_layers(device, dtype, kind):
    kw = dict(r=4, lora_alpha=8, dtype=dtype, device=device)
    if kind == "Linear":
        layer, split = L.Linear(24, 20, bias=True, **kw), {}
    else:  # GQA-like [q | k | v] = [16 | 8 | 8], k without an adapter
        split = dict(split_sizes=[16, 8, 8], enable=[True, False, True])
        layer = L.MergedLinear(24, 32, enable_lora=split["enable"], split_sizes=split["split_sizes"], bias=True,
                               **kw)
    _randomise(layer)
    x = torch.randn(2, 5, 24, dtype=dtype, device=device, requires_grad=True)
    y = layer(x)
    x64, A64, B64, b64 = (leaf64(t.cpu()) for t in (x, layer.lora_A, layer.lora_B, layer.bias))
    y64 = naive_linear(x64, layer.weight.detach().cpu().to(F64), b64, A64, B64, layer.scaling, **split)
    _grads_close(y, y64, [x, layer.lora_A, layer.lora_B, layer.bias], [x64, A64, B64, b64], dtype, kind)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_embedding(device, dtype):
    layer = _randomise(L.Embedding(30, 12, r=3, lora_alpha=6, padding_idx=2, dtype=dtype, device=device))
    idx = torch.tensor([[0, 2, 7, 29], [5, 5, 1, 2]], device=device)
    y = layer(idx)
    A64, B64 = leaf64(layer.lora_A.cpu()), leaf64(layer.lora_B.cpu())
    y64 = naive_embedding(idx.cpu(), layer.weight.detach().cpu().to(F64), A64, B64, layer.scaling)
    assert_rel_close(y.cpu(), y64, dtype, "Embedding forward")
    dA, dB = torch.autograd.grad(y, [layer.lora_A, layer.lora_B], torch.ones_like(y))
    dA64, dB64 = torch.autograd.grad(y64, [A64, B64], torch.ones_like(y64))
    dA64 = dA64.clone()
    dA64[:, 2] = 0  # nn.Embedding: the padding entry gets no gradient
    assert_rel_close(dA.cpu(), dA64, dtype, "Embedding dA")
    assert_rel_close(dB.cpu(), dB64, dtype, "Embedding dB")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_conv2d(device, dtype):
    layer = _randomise(L.Conv2d(4, 6, 3, r=2, lora_alpha=4, padding=1, dtype=dtype, device=device))
    x = torch.randn(2, 4, 7, 7, dtype=dtype, device=device, requires_grad=True)
    y = layer(x)
    x64, A64, B64, b64 = (leaf64(t.cpu()) for t in (x, layer.lora_A, layer.lora_B, layer.bias))
    y64 = naive_conv(x64, layer.weight.detach().cpu().to(F64), b64, A64, B64, layer.scaling, 2, padding=1)
    # the conv delta is formed in the base dtype first: two roundings more in half precision
    _grads_close(y, y64, [x, layer.lora_A, layer.lora_B, layer.bias], [x64, A64, B64, b64], dtype, "Conv2d", 2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_functional_forward_backward(device, dtype, p):
    segments = ((0, 12), (20, 36))  # [split 0 | no adapter | split 1]
    x = torch.randn(37, 30, dtype=dtype, device=device, requires_grad=True)
    W = (torch.randn(36, 30) / 6).to(device, dtype)
    A = (torch.randn(8, 30) / 6).to(device, dtype).requires_grad_(True)
    B = torch.randn(28, 4).to(device, dtype).requires_grad_(True)
    torch.manual_seed(5)
    y = functional.lora_linear(x, W, None, A, B, 0.5, p, True, segments=segments, backend="torch")
    mask = None
    if p > 0:  # replay the forward's seed and rebuild its mask
        torch.manual_seed(5)
        mask = functional.dropout_mask(functional.draw_seed(), x.detach(), p).cpu().to(F64)
    x64, A64, B64 = (leaf64(t.cpu()) for t in (x, A, B))
    y64 = naive_linear(x64, W.cpu().to(F64), None, A64, B64, 0.5, mask=mask, split_sizes=[12, 8, 16],
                       enable=[True, False, True])
    _grads_close(y, y64, [x, A, B], [x64, A64, B64], dtype, f"lora_linear p={p}")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_merge_restores_every_bit(device, dtype):
    layers = [L.Linear(24, 20, r=4, dtype=dtype, device=device),
              L.MergedLinear(24, 30, r=2, enable_lora=[True, False, True], dtype=dtype, device=device),
              L.Embedding(30, 12, r=3, dtype=dtype, device=device),
              L.Conv2d(4, 6, 3, r=2, dtype=dtype, device=device)]
    for layer in layers:
        _randomise(layer)
        w0 = layer.weight.detach().clone()
        layer.eval()  # merges
        assert layer.merged and not bit_equal(layer.weight, w0), type(layer).__name__
        layer.train()  # unmerges
        assert not layer.merged and bit_equal(layer.weight, w0), f"{type(layer).__name__}: weight not restored"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_dora(device, dtype):
    layer = _randomise(L.Linear(24, 20, r=4, lora_alpha=8, use_dora=True, dtype=dtype, device=device))
    x = torch.randn(9, 24, dtype=dtype, device=device, requires_grad=True)
    y = layer(x)
    x64, A64, B64, m64, b64 = (leaf64(t.cpu()) for t in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude,
                                                          layer.bias))
    y64 = naive_dora(x64, layer.weight.detach().cpu().to(F64), b64, A64, B64, m64, layer.scaling)
    _grads_close(y, y64, [x, layer.lora_A, layer.lora_B, layer.lora_magnitude], [x64, A64, B64, m64], dtype, "DoRA",
                 2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_fused_loss(device, dtype):
    h = torch.randn(2, 11, 16, dtype=dtype, device=device, requires_grad=True)
    W = (torch.randn(40, 16) / 4).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, 40, (2, 11), device=device)
    labels[0, :3] = -100
    loss = fused_linear_cross_entropy(h, W, labels, chunk_size=7)
    h64, W64 = leaf64(h.cpu()), leaf64(W.cpu())
    loss64 = F.cross_entropy((h64 @ W64.t()).view(-1, 40), labels.cpu().view(-1), ignore_index=-100)
    # documented: the loss is float32 for half-precision inputs
    _grads_close(loss, loss64, [h, W], [h64, W64], dtype, "fused loss",
                 out_dtype=torch.promote_types(dtype, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS[:2])
def test_lean_phi3_step_matches_plain(device, dtype):
    plain = make_tiny_phi3(num_hidden_layers=1).to(device, dtype)
    phi3.apply_lora(plain, r=4, lora_dropout=0.1)
    _randomise_all(plain)
    lean = copy.deepcopy(plain)
    phi3.enable_lean(lean)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 7], [1, 3, 4, 50, 60, 70, 80, 90]], device=device)
    labels = ids.clone()
    labels[:, :3] = -100
    out = {}
    for name, model in (("plain", plain), ("lean", lean)):
        model.train()
        torch.manual_seed(7)  # the same dropout masks
        loss = model(ids, labels=labels).loss
        loss.backward()
        out[name] = (loss.detach().cpu(), {n: p.grad.cpu() for n, p in named_lora_parameters(model)})
    assert_rel_close(out["lean"][0], out["plain"][0].double(), dtype, "lean loss")
    assert out["lean"][1].keys() == out["plain"][1].keys()
    for n, g in out["plain"][1].items():
        assert_rel_close(out["lean"][1][n], g.double(), dtype, f"lean grad {n}", 4.0)


def _randomise_all(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in named_lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_kernels_match_torch_path(device, dtype):
    from lora_layers import kernels

    x = torch.randn(37, 45, dtype=dtype, device=device)
    ok, why = kernels.supports(x, x.new_empty(50, 45), x.new_empty(8, 45), x.new_empty(50, 8))
    if not ok:
        pytest.skip(f"the Triton kernels cannot run here: {why}")
    W = (torch.randn(50, 45) / 7).to(device, dtype)
    for segments, B_rows in ((None, 50), (((0, 20), (30, 50)), 40)):
        A = (torch.randn(8, 45) / 7).to(device, dtype)
        B = torch.randn(B_rows, 8 if segments is None else 4).to(device, dtype)
        res = {}
        for backend in ("torch", "triton"):
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
            y = functional.lora_linear(leaves[0], W, None, leaves[1], leaves[2], 0.5, segments=segments,
                                       backend=backend)
            y.backward(torch.ones_like(y))
            res[backend] = [y.detach()] + [t.grad for t in leaves]
        for what, a, b in zip(("y", "dx", "dA", "dB"), res["triton"], res["torch"]):
            assert_rel_close(a.cpu(), b.cpu().double(), dtype, f"triton vs torch {what} (segments={segments})", 2.0)


def test_bf16_autocast(device):
    layer = _randomise(L.Linear(24, 20, r=4, lora_alpha=8, device=device))
    x = torch.randn(9, 24, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    x64, A64, B64, b64 = (leaf64(t.cpu()) for t in (x, layer.lora_A, layer.lora_B, layer.bias))
    y64 = naive_linear(x64, layer.weight.detach().cpu().to(F64), b64, A64, B64, layer.scaling)
    assert_rel_close(y.cpu(), y64, torch.bfloat16, "autocast forward")
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    y64.sum().backward()
    assert_rel_close(layer.lora_A.grad.cpu(), A64.grad, torch.bfloat16, "autocast dA")
    assert_rel_close(x.grad.cpu(), x64.grad, torch.bfloat16, "autocast dx")
