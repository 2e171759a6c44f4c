"""Tests of the optional Triton kernels, run on CPU in triton's interpreter.

TRITON_INTERPRET must be set before the kernel module imports triton (the
``@triton.jit`` decorators read it), hence the assignment at the very top.
Shapes stay tiny because the interpreter is slow; block sizes in the
interpreter are 32 (16 for R), so these shapes still span several tiles.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from _naive_lora import naive_linear, splits_of_segments  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it; triton does not declare it
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need TRITON_INTERPRET=1 (set elsewhere to another value)",
                allow_module_level=True)

from lora_layers import functional  # noqa: E402
from lora_layers import kernels as lk  # noqa: E402
from lora_layers.kernels import _ops  # noqa: E402

TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def reference(t, scaling, keep=None, p=0.0, fan_in_fan_out=False, segments=None):
    """The float64 formula of tests/_naive_lora.py on float64 copies of ``t``'s tensors.

    Returns the output and the copies (those of tensors that require grad do too).
    ``keep`` is the kernels' boolean keep mask for dropout probability ``p``.
    """
    t64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
           for k, v in t.items()}
    out_features = t["weight"].shape[1 if fan_in_fan_out else 0]
    split_sizes, enable = splits_of_segments(segments, out_features) if segments is not None else (None, None)
    mask = keep.double() / (1.0 - p) if keep is not None else None
    y = naive_linear(t64["x"], t64["weight"], t64["bias"], t64["A"], t64["B"], scaling, fan_in_fan_out,
                     mask=mask, split_sizes=split_sizes, enable=enable)
    return y, t64


def build(shape_x, in_f, out_f, R, dtype, segments=None, adapter_dtype=None, bias=True,
          fan_in_fan_out=False, grads=("x", "A", "B"), seed=0):
    """Random inputs; B is (sum of segment sizes, R // n) when segments are given."""
    g = torch.Generator().manual_seed(seed)
    ad = adapter_dtype or dtype

    def rnd(*s, dt=dtype, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dt)

    if segments is None:
        b_shape = (out_f, R)
    else:
        b_shape = (sum(e - s for s, e in segments), R // len(segments))
    w_shape = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    t = dict(x=rnd(*shape_x, in_f), weight=rnd(*w_shape, scale=in_f ** -0.5),
             bias=rnd(out_f) if bias else None, A=rnd(R, in_f, dt=ad, scale=in_f ** -0.5),
             B=rnd(*b_shape, dt=ad))
    for name in grads:
        t[name].requires_grad_(True)
    return t


def check(t, dtype, scaling=0.7, p=0.0, segments=None, fan_in_fan_out=False, rng_seed=1234):
    """Run the kernels and the float64 reference; compare y and every gradient."""
    x, w, b, A, B = t["x"], t["weight"], t["bias"], t["A"], t["B"]
    keep = None
    if p > 0:
        torch.manual_seed(rng_seed)
        keep = lk.keep_mask(lk.draw_seed(), x.shape, p)
    torch.manual_seed(rng_seed)
    y = lk.lora_linear(x, w, b, A, B, scaling, p, True, fan_in_fan_out=fan_in_fan_out,
                       segments=segments)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[1] if fan_in_fan_out else w.shape[0])

    leaves = {k: v for k, v in t.items() if v is not None and v.requires_grad}
    ref, ref_in = reference(t, scaling, keep, p, fan_in_fan_out, segments)
    tol = TOL[dtype]
    scale = ref.abs().max().item() + 1e-6
    torch.testing.assert_close(y.double(), ref.detach(), rtol=tol, atol=tol * scale)

    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    y.backward(gy)
    ref.backward(gy.double())
    for name, leaf in leaves.items():
        assert leaf.grad is not None, name
        assert leaf.grad.dtype == leaf.dtype, (name, leaf.grad.dtype)
        expect = ref_in[name].grad
        gscale = expect.abs().max().item() + 1e-6
        torch.testing.assert_close(leaf.grad.double(), expect, rtol=tol, atol=tol * gscale,
                                   msg=lambda m, n=name: f"grad {n}: {m}")
    return y


# --------------------------------------------------------------------------- basics

def test_available_and_interpreted():
    assert lk.is_available()
    assert _ops.INTERPRETED


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_plain_linear_ragged_2d(dtype, p):
    # 37 x 45 -> 50, r=5: nothing divides the 32/16 interpreter blocks.
    t = build((37,), 45, 50, 5, dtype)
    check(t, dtype, p=p)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_3d_input_no_bias_fan_in_fan_out(p):
    t = build((2, 19), 40, 33, 6, torch.float32, bias=False, fan_in_fan_out=True)
    check(t, torch.float32, p=p, fan_in_fan_out=True)


def test_rank_one_and_weight_bias_grads():
    t = build((21,), 33, 35, 1, torch.float32, grads=("x", "weight", "bias", "A", "B"))
    check(t, torch.float32, scaling=2.0)


def test_rank_above_block_r():
    # R=40 > the interpreter's BLOCK_R=16: exercises the R loop in every kernel.
    t = build((34,), 36, 39, 40, torch.float32)
    check(t, torch.float32, p=0.1)


def test_fp32_adapters_on_fp16_base():
    t = build((2, 17), 48, 40, 8, torch.float16, adapter_dtype=torch.float32)
    check(t, torch.float16, p=0.2)
    assert t["A"].grad.dtype == torch.float32 and t["B"].grad.dtype == torch.float32
    assert t["x"].grad.dtype == torch.float16


# --------------------------------------------------------------------------- segments

SEGMENT_CASES = {
    # out = 48, three equal splits of 16 (loralib's MergedLinear default)
    "equal_all": (48, ((0, 16), (16, 32), (32, 48))),
    "equal_middle_off": (48, ((0, 16), (32, 48))),
    # GQA-like [q | k | v] = [24 | 12 | 12]
    "gqa_all": (48, ((0, 24), (24, 36), (36, 48))),
    "gqa_q_v": (48, ((0, 24), (36, 48))),
    "gqa_k_only": (48, ((24, 36),)),
}


@pytest.mark.parametrize("case", sorted(SEGMENT_CASES))
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_merged_linear_segments(case, p):
    out_f, segs = SEGMENT_CASES[case]
    t = build((29,), 35, out_f, 6 * len(segs), torch.float32, segments=segs)
    check(t, torch.float32, p=p, segments=segs)


def test_segments_fp16_many_r_chunks():
    # r=8, n=3 -> R=24 spans two BLOCK_R chunks with a split inside a chunk.
    segs = ((0, 20), (20, 30), (30, 40))
    t = build((2, 13), 33, 40, 24, torch.float16, segments=segs)
    check(t, torch.float16, p=0.1, segments=segs)


def test_disabled_split_gets_base_only():
    segs = ((0, 16), (32, 48))
    t = build((9,), 20, 48, 8, torch.float32, segments=segs, grads=())
    y = lk.lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], 3.0, 0.0, False,
                       segments=segs)
    base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
    torch.testing.assert_close(y[:, 16:32], base[:, 16:32], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y[:, :16], base[:, :16])


# --------------------------------------------------------------------------- dropout

def test_same_seed_same_mask_and_dropout_statistics():
    t = build((40,), 64, 32, 4, torch.float32, grads=())
    args = (t["x"], t["weight"], t["bias"], t["A"], t["B"], 1.0, 0.5, True)
    torch.manual_seed(5)
    y1 = lk.lora_linear(*args)
    torch.manual_seed(5)
    y2 = lk.lora_linear(*args)
    y3 = lk.lora_linear(*args)  # fresh seed
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    # eval mode ignores dropout entirely
    y_eval = lk.lora_linear(*args[:-1], False)
    torch.testing.assert_close(y_eval, reference(t, 1.0)[0].float(), rtol=1e-4, atol=1e-4)
    keep = lk.keep_mask(11, (64, 96), 0.5)
    assert keep.dtype == torch.bool and keep.shape == (64, 96)
    assert torch.equal(keep, lk.keep_mask(11, (64, 96), 0.5))
    assert 0.45 < keep.float().mean().item() < 0.55
    assert not torch.equal(keep, lk.keep_mask(12, (64, 96), 0.5))
    # the mask is a function of the flat element index: a 3-D shape agrees with 2-D
    assert torch.equal(lk.keep_mask(11, (4, 16, 96), 0.5).reshape(64, 96), keep)


def test_backward_regenerates_forward_mask():
    """dA from the kernels must equal du^T (mask * x)/(1-p) with the forward's mask;
    a different mask in backward would break it even though forward matched."""
    p = 0.4
    t = build((33,), 40, 24, 4, torch.float32, grads=("A",))
    torch.manual_seed(77)
    seed = lk.draw_seed()
    keep = lk.keep_mask(seed, t["x"].shape, p)
    torch.manual_seed(77)
    y = lk.lora_linear(t["x"], t["weight"], None, t["A"], t["B"], 1.5, p, True)
    gy = torch.randn_like(y)
    y.backward(gy)
    xd = t["x"] * keep / (1 - p)
    du = 1.5 * gy @ t["B"]
    torch.testing.assert_close(t["A"].grad, du.t() @ xd, rtol=1e-4, atol=1e-4)


def test_saves_only_x_and_u():
    t = build((2, 30), 40, 36, 4, torch.float32)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        torch.manual_seed(0)
        lk.lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], 1.0, 0.3, True)
    params = {id(v) for v in (t["weight"], t["bias"], t["A"], t["B"])}
    activations = [s for s in saved if id(s) not in params]
    shapes = sorted(tuple(s.shape) for s in activations)
    assert shapes == [(60, 4), (60, 40)], shapes  # u and the flattened x: no mask
    assert any(s.data_ptr() == t["x"].data_ptr() for s in activations)  # x is not copied


# --------------------------------------------------------------------------- grads skipped

def test_needs_input_grad_skips_work(monkeypatch):
    calls = []
    real_g, real_x = _ops.backward_g, _ops.backward_x

    def spy_g(*a, **k):
        calls.append(("g", k["need_du"], k["need_db"]))
        return real_g(*a, **k)

    def spy_x(*a, **k):
        calls.append(("x", a[8], a[9]))  # need_dx, need_da
        return real_x(*a, **k)

    monkeypatch.setattr(_ops, "backward_g", spy_g)
    monkeypatch.setattr(_ops, "backward_x", spy_x)
    for grads, expect in [(("B",), [("g", False, True)]),
                          (("A",), [("g", True, False), ("x", False, True)]),
                          (("x",), [("g", True, False), ("x", True, False)])]:
        calls.clear()
        t = build((10,), 20, 18, 4, torch.float32, grads=grads)
        check(t, torch.float32, p=0.2)
        assert calls == expect, (grads, calls)
        for name in {"x", "A", "B"} - set(grads):
            assert t[name].grad is None
        assert t["weight"].grad is None


# --------------------------------------------------------------------------- cuBLAS mode

def test_cublas_gemm_mode(monkeypatch):
    monkeypatch.setenv(_ops.GEMM_ENV, "cublas")
    segs = ((0, 12), (20, 30))
    t = build((23,), 30, 30, 10, torch.float32, segments=segs)
    check(t, torch.float32, p=0.2, segments=segs)
    t = build((23,), 30, 30, 5, torch.float32, fan_in_fan_out=True)
    check(t, torch.float32, p=0.0, fan_in_fan_out=True)
    monkeypatch.setenv(_ops.GEMM_ENV, "cutlass")
    with pytest.raises(ValueError, match="LORA_LAYERS_TRITON_GEMM"):
        _ops.gemm_mode()


# --------------------------------------------------------------------------- supports()

def _ok_args():
    t = build((5,), 8, 6, 2, torch.float32, grads=())
    return dict(x=t["x"], weight=t["weight"], lora_A=t["A"], lora_B=t["B"])


@pytest.mark.parametrize("change,needle", [
    (dict(x=torch.zeros(5, 8, dtype=torch.float64)), "x dtype"),
    (dict(weight=torch.zeros(6, 8, dtype=torch.float16)), "weight dtype"),
    (dict(lora_A=torch.zeros(2, 8, dtype=torch.int32)), "lora_A dtype"),
    (dict(x=torch.zeros(5, 7)), "in_features=8"),
    (dict(x=torch.zeros(0, 8)), "non-empty"),
    (dict(lora_A=torch.zeros(0, 8), lora_B=torch.zeros(6, 0)), "rank per segment"),
    (dict(lora_A=torch.zeros(129, 8), lora_B=torch.zeros(6, 129)), "rank per segment"),
    (dict(lora_B=torch.zeros(6, 3)), "lora_B must be"),
    (dict(dropout_p=1.0), "dropout_p"),
    (dict(segments=((0, 4), (3, 6))), "overlap"),
    (dict(segments=((0, 3), (3, 7))), "out_features=6"),
    (dict(segments=((0, 3), (3, 6), (6, 6))), "segments[2]=(6, 6)"),
    (dict(segments=((0, 2), (2, 4), (4, 6))), "lora_A rows (2)"),
    (dict(segments=((0, 3),), lora_B=torch.zeros(6, 2)), "sum of segment sizes=3"),
    (dict(x=torch.zeros(5, 8, device="meta")), "device"),
    (dict(weight="W"), "torch.Tensor"),
])
def test_supports_rejects_with_reason(change, needle):
    kw = _ok_args()
    kw.update(change)
    ok, why = lk.supports(**kw)
    assert not ok and needle in why, why
    p = kw.pop("dropout_p", 0.0)
    segs = kw.pop("segments", None)
    with pytest.raises(ValueError, match="cannot run"):
        lk.lora_linear(kw["x"], kw["weight"], None, kw["lora_A"], kw["lora_B"], 1.0, p, True,
                       segments=segs)


def test_supports_accepts_valid():
    assert lk.supports(**_ok_args()) == (True, "")
    kw = _ok_args()
    kw["lora_B"] = torch.zeros(6, 1)
    assert lk.supports(**kw, segments=((0, 2), (2, 6)))[0]


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch; from lora_layers import kernels as k\n"
            "assert not k.is_available()\n"
            "ok, why = k.supports(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, 4), "
            "torch.zeros(3, 2), 0.0, None)\n"
            "assert not ok and 'triton' in why, why\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- torch path

def test_agrees_with_functional_torch_path():
    for segs, out_f, R in [(None, 26, 4), (((0, 10), (18, 26)), 26, 8)]:
        t = build((2, 11), 30, out_f, R, torch.float32, segments=segs)
        y = lk.lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], 0.5, 0.0, True,
                           segments=segs)
        y.sum().backward()
        kern = [t[n].grad.clone() for n in ("x", "A", "B")]
        for n in ("x", "A", "B"):
            t[n].grad = None
        y_ref = functional.lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], 0.5,
                                       0.0, True, segments=segs, backend="torch")
        y_ref.sum().backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        for got, n in zip(kern, ("x", "A", "B")):
            torch.testing.assert_close(got, t[n].grad, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- property test

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # the property test is extra coverage, not a reason to skip the file
    hypothesis = None

if hypothesis is not None:

    @st.composite
    def _layer_cases(draw):
        out_f = draw(st.integers(2, 70))
        n = draw(st.integers(0, min(3, out_f)))  # 0 = plain Linear
        segments = None
        if n:
            cuts = sorted(draw(st.sets(st.integers(1, out_f - 1), min_size=n - 1, max_size=n - 1)))
            bounds = [0, *cuts, out_f]
            splits = list(zip(bounds[:-1], bounds[1:]))
            enabled = draw(st.lists(st.booleans(), min_size=len(splits), max_size=len(splits)))
            segments = tuple(s for s, on in zip(splits, enabled) if on) or (splits[0],)
        r = draw(st.integers(1, 10))
        return dict(lead=draw(st.sampled_from([(1,), (37,), (3, 11), (70,)])),
                    in_f=draw(st.integers(1, 70)), out_f=out_f, segments=segments, r=r,
                    dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                    p=draw(st.sampled_from([0.0, 0.3])), bias=draw(st.booleans()),
                    fan=draw(st.booleans()))

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
    @hypothesis.given(_layer_cases())
    def test_property_matches_float64(case):
        segs = case["segments"]
        R = case["r"] * (len(segs) if segs else 1)
        t = build(case["lead"], case["in_f"], case["out_f"], R, case["dtype"], segments=segs,
                  bias=case["bias"], fan_in_fan_out=case["fan"])
        check(t, case["dtype"], p=case["p"], segments=segs, fan_in_fan_out=case["fan"])


def test_autocast_runs_in_autocast_dtype():
    t = build((20,), 24, 18, 4, torch.float32, grads=("A", "B"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lk.lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], 1.0, 0.0, False)
    assert y.dtype == torch.bfloat16
    ref, _ = reference(t, 1.0)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=6e-2, atol=6e-2)
    y.float().sum().backward()
    assert t["A"].grad.dtype == torch.float32 and t["B"].grad is not None


def test_many_tiles_grouped_order():
    # 150 x 70 -> 100: 5 row tiles with GROUP_M=2 leaves a partial group.
    t = build((150,), 70, 100, 8, torch.float16)
    check(t, torch.float16, p=0.1)


def test_non_contiguous_inputs():
    # Kernels take strides: a transposed x and a column-sliced weight need no copy.
    t = build((23,), 30, 26, 4, torch.float32)
    t["x"] = t["x"].detach().t().contiguous().t().requires_grad_(True)
    t["weight"] = torch.cat([t["weight"], torch.zeros(26, 5)], dim=1)[:, :30]
    assert not t["x"].is_contiguous() and not t["weight"].is_contiguous()
    check(t, torch.float32, p=0.2)


# --------------------------------------------------------------------------- issue #26, 1b

def _second_order(fn, t):
    """Gradient penalty: d/d(x, A, B) of ||d(sum y^2)/dx||^2, through ``fn(t)``."""
    y = fn(t)
    dx, = torch.autograd.grad(y.pow(2).sum(), t["x"], create_graph=True)
    assert dx.grad_fn is not None, "dx has no graph: second-order terms would be lost"
    return torch.autograd.grad(dx.pow(2).sum(), [t["x"], t["A"], t["B"]])


@pytest.mark.parametrize("p,segments", [(0.0, None), (0.3, None), (0.25, ((0, 10), (18, 26)))])
def test_double_backward_matches_float64(p, segments):
    out_f, R = (26, 8) if segments else (13, 3)
    t = build((2, 5), 11, out_f, R, torch.float32, segments=segments)
    torch.manual_seed(3)
    keep = lk.keep_mask(lk.draw_seed(), t["x"].shape, p) if p > 0 else None

    def kern(tt):
        torch.manual_seed(3)
        return functional.lora_linear(tt["x"], tt["weight"], tt["bias"], tt["A"], tt["B"], 0.7, p, True,
                                      segments=segments, backend="triton")

    def naive64(tt):
        split_sizes, enable = splits_of_segments(segments, out_f) if segments else (None, None)
        mask = keep.double() / (1.0 - p) if keep is not None else None
        return naive_linear(tt["x"], tt["weight"], tt["bias"], tt["A"], tt["B"], 0.7, mask=mask,
                            split_sizes=split_sizes, enable=enable)

    got = _second_order(kern, t)
    _, t64 = reference(t, 0.7, keep, p, segments=segments)
    expect = _second_order(naive64, t64)
    for name, a, e in zip("xAB", got, expect):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4 * e.abs().max().item(),
                                   msg=lambda m, n=name: f"second-order grad {n}: {m}")


def test_torch_func_transforms_route_to_torch_path():
    t = build((6,), 9, 7, 2, torch.float32, grads=())
    x, w, b, A, B = t["x"], t["weight"], t["bias"], t["A"], t["B"]
    x64, w64, b64, B64 = (v.double() for v in (x, w, b, B))
    ref64 = lambda A_: naive_linear(x64, w64, b64, A_, B64, 0.7)  # noqa: E731
    f = lambda A_: functional.lora_linear(x, w, b, A_, B, 0.7, backend="triton")  # noqa: E731
    g = torch.func.grad(lambda A_: f(A_).pow(2).sum())(A)
    g64 = torch.func.grad(lambda A_: ref64(A_).pow(2).sum())(A.double())
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-4)
    jac = torch.func.jacrev(f)(A)
    torch.testing.assert_close(jac.double(), torch.func.jacrev(ref64)(A.double()), rtol=1e-4, atol=1e-5)
    xs = torch.randn(3, 4, 9)
    ys = torch.func.vmap(lambda xi: functional.lora_linear(xi, w, b, A, B, 0.7, backend="triton"))(xs)
    expect = naive_linear(xs.double(), w64, b64, A.double(), B64, 0.7)
    torch.testing.assert_close(ys.double(), expect, rtol=1e-4, atol=1e-4)
    # the kernels themselves cannot run under a transform: a clear refusal, not PyTorch's internals
    with pytest.raises(ValueError, match="torch.func"):
        torch.func.grad(lambda A_: lk.lora_linear(x, w, b, A_, B, 0.7, 0.0, False).sum())(A)


@pytest.mark.parametrize("x_dtype,bias_dtype", [(torch.float16, torch.float32), (torch.float16, torch.bfloat16)])
def test_cublas_mode_bias_of_another_dtype(monkeypatch, x_dtype, bias_dtype):
    monkeypatch.setenv(_ops.GEMM_ENV, "cublas")
    t = build((17,), 24, 20, 4, x_dtype, grads=("x", "bias", "A", "B"))
    t["bias"] = t["bias"].detach().to(bias_dtype).requires_grad_(True)
    assert lk.supports(t["x"], t["weight"], t["A"], t["B"], bias=t["bias"])[0]
    check(t, x_dtype, p=0.2)
    assert t["bias"].grad.dtype == bias_dtype


def _nan_case(where):
    """A fused layer [split 0 | no adapter | split 1] with one non-finite value at ``where``."""
    segs = ((0, 12), (20, 36))
    t = build((23,), 30, 36, 8, torch.float32, segments=segs)
    bad = {"A": ("A", (1, 3), float("nan")), "B": ("B", (13, 2), float("inf")),
           "x": ("x", (4, 7), float("-inf"))}[where]
    with torch.no_grad():
        t[bad[0]][bad[1]] = bad[2]
    return t, segs


def _assert_same_nonfinite(got, expect, what):
    assert torch.equal(got.isnan(), expect.isnan()), f"{what}: NaN at {got.isnan().nonzero().tolist()[:6]}, " \
        f"expected {expect.isnan().nonzero().tolist()[:6]}"
    assert torch.equal(got.isinf(), expect.isinf()), f"{what}: Inf pattern differs"
    fin = expect.isfinite()
    torch.testing.assert_close(got[fin].double(), expect[fin], rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("mode", ["fused", "cublas"])
@pytest.mark.parametrize("where", ["A", "B", "x"])
def test_non_finite_stays_in_its_split(monkeypatch, mode, where):
    monkeypatch.setenv(_ops.GEMM_ENV, mode)
    t, segs = _nan_case(where)
    y = lk.lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], 0.5, 0.0, False, segments=segs)
    ref = functional.lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], 0.5, segments=segs,
                                 backend="torch")
    _assert_same_nonfinite(y, ref.detach().double(), "y")
    if where == "A":  # here the association order does not matter: the float64 formula agrees too
        _assert_same_nonfinite(y, reference(t, 0.5, segments=segs)[0].detach(), "y vs float64")


@pytest.mark.parametrize("mode", ["fused", "cublas"])
def test_non_finite_gradient_stays_in_its_split(monkeypatch, mode):
    """A NaN in dL/dy on a column with no adapter must not reach dA or dB (it reaches dx
    through the base term), and an Inf in split 0 must not reach split 1's rows."""
    monkeypatch.setenv(_ops.GEMM_ENV, mode)
    segs = ((0, 12), (20, 36))
    t = build((23,), 30, 36, 8, torch.float32, segments=segs)
    gy = torch.randn(23, 36)
    gy[5, 15] = float("nan")  # column 15: no adapter
    gy[9, 2] = float("inf")  # column 2: split 0
    lk.lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], 0.5, 0.0, False, segments=segs).backward(gy)
    got = {name: t[name].grad.clone() for name in ("x", "A", "B")}
    for name in got:
        t[name].grad = None
    functional.lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], 0.5, segments=segs,
                           backend="torch").backward(gy)
    for name in got:
        _assert_same_nonfinite(got[name], t[name].grad.double(), f"grad {name}")


def test_interpret_set_after_import_says_before_first_import():
    code = ("import os, torch\n"
            "os.environ.pop('TRITON_INTERPRET', None)\n"
            "import lora_layers.kernels._ops\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "from lora_layers import kernels as k, functional as F\n"
            "ok, why = k.supports(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(3, 2))\n"
            "assert not ok and 'before' in why and 'first import' in why, why\n"
            "try:\n"
            "    F.lora_linear(torch.zeros(2, 4), torch.zeros(3, 4), None, torch.zeros(2, 4), torch.zeros(3, 2), 1.0,"
            " backend='triton')\n"
            "except RuntimeError as e:\n"
            "    assert 'before' in str(e) and 'first import' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('no error')\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""  # the message is about the CPU case
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_autotune_keys_bucket_the_token_count(monkeypatch):
    """Compiled mode tunes per key: a new sequence length inside a bucket must reuse the tuning."""
    keys = {}

    real_tuned = _ops._tuned

    class Recorder:
        def __init__(self, name):
            self.name, self.tuned = name, real_tuned(name)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                bound = dict(zip(self.tuned.arg_names, args), **kwargs)
                keys.setdefault(self.name, []).append(tuple(bound[k] for k in self.tuned.keys))
            return run

    monkeypatch.setattr(_ops, "INTERPRETED", False)
    monkeypatch.setattr(_ops, "_tuned", Recorder)
    monkeypatch.setattr(_ops, "_block_r", lambda R: 16)
    for T in (100, 120, 300):
        t = build((T,), 16, 24, 4, torch.float32, grads=("x", "A", "B"))
        u = _ops.down_proj(t["x"].detach(), t["A"].detach(), 0, 0.0)
        _ops.forward_fused(t["x"].detach(), t["weight"], None, u, t["B"].detach(), 1.0, None, False, 4)
        g = torch.ones(T, 24)
        du, _ = _ops.backward_g(g, u, t["B"].detach(), 1.0, None, 4, True, True)
        _ops.backward_x(g, t["weight"], du, t["A"].detach(), t["x"].detach(), 0, 0.0, False, True, True, "fused")
    assert sorted(keys) == ["bwd_g", "bwd_x", "down", "fwd"]
    for name, (k100, k120, k300) in keys.items():
        assert k100 == k120, (name, k100, k120)  # same bucket
        assert k100 != k300, (name, k100, k300)  # a different size class re-tunes
        assert 100 not in k100 and 120 not in k120, (name, k100)  # the raw count is not a key


def test_dropout_scale_exact_at_high_p(monkeypatch):
    """1/(1-p) must be rounded once from float64, not computed from an fp32 p (off by ~1e-6 at p=0.99)."""
    p = 0.99
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (40, 32), generator=g).float().requires_grad_(True)
    A = torch.randint(-3, 4, (4, 32), generator=g).float().requires_grad_(True)
    B = torch.eye(4)
    torch.manual_seed(9)
    keep = lk.keep_mask(lk.draw_seed(), x.shape, p)
    torch.manual_seed(9)
    y = lk.lora_linear(x, torch.zeros(4, 32), None, A, B, 1.0, p, True)  # y = u exactly
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).double()
    u_ref = ((x.detach() * keep).double() @ A.detach().double().t()) * scale
    torch.testing.assert_close(y.double(), u_ref.float().double(), rtol=0, atol=0)
    y.backward(torch.ones_like(y))
    dA_ref = (torch.ones(40, 4).double().t() @ (x.detach() * keep).double()) * scale
    torch.testing.assert_close(A.grad.double(), dA_ref.float().double(), rtol=0, atol=0)
    # Compiled kernels get float arguments as fp32 (the interpreter keeps float64, so
    # the check above cannot see it): the scale must arrive ready-made, not as p.
    seen = []
    monkeypatch.setattr(_ops, "_launch", lambda name, grid, meta, *a, **k: seen.append((name, a)))
    _ops.down_proj(x.detach(), A.detach(), 1, p)
    _ops.backward_x(torch.ones(40, 4), torch.zeros(4, 32), torch.ones(40, 4), A.detach(), x.detach(), 1, p,
                    False, True, True, "fused")
    for name, args in seen:
        floats = [v for v in args if isinstance(v, float)]
        assert any(torch.tensor(v, dtype=torch.float32).item() == scale.item() for v in floats), (name, floats)
