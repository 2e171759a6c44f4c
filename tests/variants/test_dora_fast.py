"""DoRA's ``dora_mode="fast"`` (issue #25 item 2): the forward keeps the pre-scale product of the
adapted rows so that the magnitude's gradient needs no third GEMM.

References: the ``"lean"`` mode on the same weights and seed (every output and gradient but the
magnitude's must be bit-identical, the magnitude's within 1e-6 of the largest), the float64
naive DoRA formula (``naive_dora``), and the bytes autograd saves (``saved_tensors_hooks``).
"""
import copy

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers.functional import draw_seed, dropout_mask, lora_linear
from _autograd_bytes import saved_bytes
from _fused import GQA
from _model_checks import assert_unchanged, snapshot
from _naive_lora import assert_rel_close, bit_equal, leaf64, naive_dora

KINDS = ["linear", "fifo", "merged"]


def _layer(kind, mode, p=0.0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    common = dict(lora_dropout=p, use_dora=True, dora_mode=mode, dtype=dtype)
    if kind == "merged":
        layer = L.MergedLinear(12, 16, r=2, lora_alpha=4, enable_lora=GQA["enable"],
                               split_sizes=GQA["split_sizes"], **common)
    else:
        layer = L.Linear(12, 10, r=3, lora_alpha=6, fan_in_fan_out=kind == "fifo", **common)
    with torch.no_grad():  # "trained" adapters and magnitudes
        layer.lora_B.normal_(0, 0.5)
        layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
    return layer.train()


def _params(layer):
    return [layer.lora_A, layer.lora_B, layer.lora_magnitude] + ([layer.bias] if layer.bias is not None else [])


def _run(layer, x, g, seed=7, create_graph=False):
    """The output and the gradients of x, A, B, m (and b) for upstream ``g``, dropout drawn from ``seed``."""
    xi = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(xi)
    grads = torch.autograd.grad(y, [xi] + _params(layer), g, create_graph=create_graph)
    return y, grads


def _assert_fast_matches_lean(y_f, grads_f, y_l, grads_l, magnitude_at=3):
    assert bit_equal(y_f, y_l), "output"
    for i, (a, b) in enumerate(zip(grads_f, grads_l)):
        if i == magnitude_at:  # z = Σ g ⊙ P summed in another order: rounding only
            err = float((a.double() - b.double()).abs().max() / b.double().abs().max())
            assert err <= 1e-6, f"dm: {err:.2e} of the largest"
        else:
            assert bit_equal(a, b), f"gradient {i}"


@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_equals_lean_and_the_float64_formula(kind, p):
    x, g = torch.randn(3, 200, 12), torch.randn(3, 200, 16 if kind == "merged" else 10)  # z: 3 chunks
    lean, fast = _layer(kind, "lean", p), _layer(kind, "fast", p)
    y_l, grads_l = _run(lean, x, g)
    y_f, grads_f = _run(fast, x, g)
    _assert_fast_matches_lean(y_f, grads_f, y_l, grads_l)
    # and against the float64 formula, with the mask the layer drew
    mask = None
    if p > 0:
        torch.manual_seed(7)
        mask = dropout_mask(draw_seed(), x.reshape(-1, 12), p).view(x.shape).double()
    leaves = [leaf64(t) for t in [x] + _params(fast)]
    ref = naive_dora(leaves[0], fast.weight.detach().double(), leaves[4], *leaves[1:4], fast.scaling, mask=mask,
                     fan_in_fan_out=kind == "fifo", **(GQA if kind == "merged" else {}))
    assert_rel_close(y_f, ref, torch.float32, "forward")
    for name, got, want in zip("x A B m b".split(), grads_f, torch.autograd.grad(ref, leaves, g.double())):
        assert_rel_close(got, want, torch.float32, f"d{name}")


@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_fast_in_bf16_follows_the_float64_formula(kind):
    x = torch.randn(64, 12).bfloat16()
    fast = _layer(kind, "fast", dtype=torch.bfloat16)
    g = torch.randn(64, fast.out_features).bfloat16()
    y, grads = _run(fast, x, g)
    leaves = [leaf64(t) for t in [x] + _params(fast)]
    ref = naive_dora(leaves[0], fast.weight.detach().double(), leaves[4], *leaves[1:4], fast.scaling,
                     **(GQA if kind == "merged" else {}))
    assert_rel_close(y, ref, torch.bfloat16, "forward")
    for name, got, want in zip("x A B m b".split(), grads, torch.autograd.grad(ref, leaves, g.double())):
        assert_rel_close(got, want, torch.bfloat16, f"d{name}")


def test_saved_bytes_one_product_of_the_adapted_rows_and_lean_unchanged():
    T, d_in, r = 256, 48, 4
    x = torch.randn(T, d_in)
    for kind, out, adapted in (("linear", 40, 40), ("merged", 16, 12)):
        for mode in ("lean", "fast"):
            torch.manual_seed(0)
            if kind == "linear":
                layer = L.Linear(d_in, out, r=r, lora_alpha=8, lora_dropout=0.1, use_dora=True, dora_mode=mode)
                n_r = r
            else:
                layer = L.MergedLinear(d_in, out, r=r, lora_alpha=8, lora_dropout=0.1, enable_lora=GQA["enable"],
                                       split_sizes=GQA["split_sizes"], use_dora=True, dora_mode=mode)
                n_r = 2 * r
            saved, y = saved_bytes(layer.train(), x.clone().requires_grad_(True))
            lean_bytes = (T * n_r + adapted) * 4  # u (T × R) and the norm of the adapted rows
            # fast: plus the product of the adapted rows, T × adapted (not T × out for the fused layer)
            assert saved == lean_bytes + (T * adapted * 4 if mode == "fast" else 0), (kind, mode, saved)
            y.sum().backward()


def test_the_issue_bound_on_the_bench_shape_ratio():
    # The issue's bound: beyond x at most 1.01 · (out/in) · x. At 3072 → 3072, r=16, u is T·16 floats,
    # 16/3072 of the product; here the same r/out, small, and T large enough that the norm is small too.
    T, d, r = 1024, 3072 // 16, 1
    layer = L.Linear(d, d, r=r, lora_alpha=2, use_dora=True, dora_mode="fast").train()
    x = torch.randn(T, d, requires_grad=True)
    saved, _ = saved_bytes(layer, x)
    assert saved <= 1.01 * x.numel() * 4, saved / (x.numel() * 4)


def test_a_frozen_magnitude_keeps_no_product():
    layer = _layer("linear", "fast")
    layer.lora_magnitude.requires_grad_(False)
    x = torch.randn(32, 12, requires_grad=True)
    saved, y = saved_bytes(layer, x)
    assert saved == (32 * 3 + 10) * 4
    y.sum().backward()
    assert layer.lora_magnitude.grad is None and layer.lora_B.grad is not None


@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_double_backward_and_torch_func_take_the_plain_op_path_in_both_modes(kind):
    x, g = torch.randn(6, 12), torch.randn(6, 16 if kind == "merged" else 10)
    lean, fast = _layer(kind, "lean"), _layer(kind, "fast")
    _, grads_l = _run(lean, x, g, create_graph=True)
    _, grads_f = _run(fast, x, g, create_graph=True)
    for a, b in zip(grads_f, grads_l):
        assert bit_equal(a, b)
    second = [torch.autograd.grad(gr[0].square().sum(), layer.lora_magnitude)[0]
              for gr, layer in ((grads_f, fast), (grads_l, lean))]
    assert bit_equal(*second)

    def loss(layer, params, inp):
        return torch.func.functional_call(layer, params, (inp,)).square().sum()

    per = [torch.func.grad(loss, argnums=1)(layer, dict(layer.named_parameters()), x)["lora_magnitude"]
           for layer in (fast, lean)]
    assert bit_equal(*per)


def test_torch_compile_matches_eager_lean():
    fast, lean = _layer("merged", "fast"), _layer("merged", "lean")
    x = torch.randn(4, 12, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    y_c, y_e = compiled(x), lean(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(y_c.sum(), [x] + _params(fast)),
                    torch.autograd.grad(y_e.sum(), [x] + _params(lean))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("p", [0.0, 0.05])
def test_a_quantized_base_gives_the_same_results_in_both_modes(p):
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    base = nn.Linear(256, 64)  # torchao's NF4 needs whole blocks of 64 · 256 scalers
    L.quantize_base(nn.Sequential(base), targets=["0"])
    layers = []
    for mode in ("lean", "fast"):
        torch.manual_seed(1)
        layer = L.Linear.from_module(copy.deepcopy(base), r=4, lora_alpha=8, lora_dropout=p, use_dora=True,
                                     dora_mode=mode)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
            layer.lora_magnitude.mul_(1.2)
        layers.append(layer.train())
    assert layers[1].quantized is not None
    x, g = torch.randn(3, 5, 256), torch.randn(3, 5, 64)
    (y_l, grads_l), (y_f, grads_f) = (_run(layer, x, g) for layer in layers)
    _assert_fast_matches_lean(y_f, grads_f, y_l, grads_l)
    # saved_bytes cannot read the NF4 weight's storage: count beyond x and the adapter by hand
    xi, storages = x.clone().requires_grad_(True), {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layers[1](xi)
    known = {t.untyped_storage().data_ptr() for t in [xi] + _params(layers[1])}
    assert sum(n for ptr, n in storages.items() if ptr not in known) == (15 * 4 + 64) * 4 + 15 * 64 * 4


def test_the_lean_recipe_path_of_phi3_in_fast_mode(tiny_phi3_factory):
    ids = torch.randint(0, 128, (2, 9))
    grads = []
    for mode in ("lean", "fast"):
        torch.manual_seed(0)
        model = tiny_phi3_factory()
        names = L.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0, qkv=("q", "v"), use_dora=True,
                                  dora_mode=mode, lean=True)
        layers = [model.get_submodule(n) for n in names]
        assert {layer.dora_mode for layer in layers} == {mode}
        with torch.no_grad():
            for layer in layers:
                layer.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [layer.lora_magnitude.grad for layer in layers],
                      [layer.lora_A.grad for layer in layers]))
    (loss_l, m_l, a_l), (loss_f, m_f, a_f) = grads
    assert bit_equal(loss_l, loss_f)
    for a, b in zip(m_f, m_l):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    for a, b in zip(a_f, a_l):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


# ----------------------------------------------------------------------------- where the setting lives

BAD_MODE = "dora_mode must be one of ('lean', 'fast'), got 'quick'"
NO_DORA = ("dora_mode='fast' is a DoRA setting but use_dora=False; pass use_dora=True with it, or leave dora_mode "
           "at 'lean'")


@pytest.mark.parametrize("value, message", [("quick", BAD_MODE),
                                            (None, "dora_mode must be one of ('lean', 'fast'), got None")])
def test_a_bad_mode_is_refused_by_name_everywhere_and_changes_nothing(value, message):
    kwargs = dict(r=2, use_dora=True, dora_mode=value)
    for make in (lambda: L.LoRASpec(lora_alpha=1, **kwargs), lambda: L.Linear(4, 4, **kwargs),
                 lambda: L.MergedLinear(4, 4, enable_lora=[True, False], **kwargs)):
        with pytest.raises(ValueError) as info:
            make()
        assert str(info.value) == message
    linear = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        L.Linear.from_module(linear, **kwargs)
    assert linear.weight.requires_grad and not hasattr(linear, "lora_A")
    model = nn.Sequential(nn.Linear(4, 4))
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        L.inject_lora(model, ["0"], **kwargs)
    assert str(info.value) == message
    assert_unchanged(model, before)


def test_fast_without_dora_is_refused_and_changes_nothing(tiny_phi3_factory):
    with pytest.raises(ValueError) as info:
        L.Linear(4, 4, r=2, dora_mode="fast")
    assert str(info.value) == NO_DORA
    model = tiny_phi3_factory()
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        L.phi3.apply_lora(model, r=2, dora_mode="fast")
    assert str(info.value) == NO_DORA
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"dora_mode='fast' is a DoRA setting but no magnitude was given"):
        lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(2, 4), torch.randn(3, 2), 1.0,
                    dora_mode="fast")
    with pytest.raises(ValueError, match=r"dora_mode must be one of \('lean', 'fast'\), got 'quick'"):
        lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(2, 4), torch.randn(3, 2), 1.0,
                    magnitude=torch.ones(3), dora_mode="quick")


def test_the_mode_travels_with_the_spec_through_every_entry_point():
    layer = L.Linear(8, 6, r=2, use_dora=True, dora_mode="fast")
    assert layer.dora_mode == "fast" and layer.spec.dora_mode == "fast"
    assert L.Linear(8, 6, r=2, use_dora=True).spec.dora_mode == "lean"
    wrapped = L.Linear.from_module(nn.Linear(8, 6), spec=layer.spec)
    assert wrapped.dora_mode == "fast" and wrapped.use_dora
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 24))
    L.inject_lora(model, ["0", "2"], r=2, use_dora=True, dora_mode="fast",
                  merged_splits={"2": ([8, 8, 8], [True, False, True])})
    assert isinstance(model[2], L.MergedLinear)
    assert model[0].dora_mode == model[2].dora_mode == "fast"
    assert L.LoRASpec(2, 4, use_dora=True, dora_mode="fast") != L.LoRASpec(2, 4, use_dora=True)


def test_functional_fast_equals_lean():
    torch.manual_seed(0)
    x, W, b = torch.randn(5, 12, requires_grad=True), torch.randn(10, 12), torch.randn(10)
    A, B = torch.randn(3, 12, requires_grad=True), torch.randn(10, 3, requires_grad=True)
    m = (torch.rand(10) + 0.5).requires_grad_(True)
    outs = []
    for mode in ("lean", "fast"):
        y = lora_linear(x, W, b, A, B, 2.0, 0.0, True, magnitude=m, dora_mode=mode)
        outs.append((y,) + torch.autograd.grad(y.square().sum(), [x, A, B, m]))
    _assert_fast_matches_lean(outs[1][0], outs[1][1:], outs[0][0], outs[0][1:])


def test_a_checkpoint_saved_in_one_mode_loads_in_the_other_and_has_the_same_bytes(tmp_path):
    files = {}
    for mode in ("lean", "fast"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8))
        L.inject_lora(model, ["0"], r=2, use_dora=True, dora_mode=mode)
        with torch.no_grad():
            model[0].lora_B.normal_(generator=torch.Generator().manual_seed(1))
            model[0].lora_magnitude.mul_(1.5)
        files[mode] = tmp_path / f"{mode}.safetensors"
        L.save_lora(model, files[mode])
    assert files["lean"].read_bytes() == files["fast"].read_bytes()  # the mode is not in the file
    for saved, mode in (("lean", "fast"), ("fast", "lean")):
        model = nn.Sequential(nn.Linear(8, 8))
        torch.manual_seed(5)
        L.inject_lora(model, ["0"], r=2, use_dora=True, dora_mode=mode)
        result = L.load_lora(model, files[saved])
        assert not (result.missing_keys or result.unexpected_keys or result.mismatched_keys)
        assert model[0].dora_mode == mode and model[0].lora_magnitude.detach().ne(0).all()
