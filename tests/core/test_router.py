"""core.functional.lora_linear is validate -> route -> one executor per path (issue #21).

Each test drives one path, checks that its executor (and no other) ran, and compares the
result with the float64 formula of tests/_naive_lora.py.
"""
import pytest
import torch

from lora_layers.core import functional as cf
from lora_layers.core import recipes
from lora_layers.core.dropout import draw_seed, dropout_mask
from _naive_lora import F64, assert_rel_close, leaf64, naive_linear

EXECUTORS = ("_run_triton", "_run_composite", "_run_no_grad", "_run_recipe", "_run_autograd")
SEGMENTS = [(0, 5), (9, 16)]


@pytest.fixture
def ran(monkeypatch):
    """The names of the executors that ran, in order (each still does its work)."""
    seen = []

    def spy(name, real):
        def executor(call):
            seen.append(name)
            return real(call)
        return executor

    for name in EXECUTORS:
        monkeypatch.setattr(cf, name, spy(name, getattr(cf, name)))
    return seen


def tensors(segments=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 16 if segments is None else sum(b - a for a, b in segments)
    R = 3 * (1 if segments is None else len(segments))
    return {"x": torch.randn(2, 7, 12, generator=g, dtype=dtype), "W": torch.randn(16, 12, generator=g, dtype=dtype),
            "b": torch.randn(16, generator=g, dtype=dtype), "A": torch.randn(R, 12, generator=g, dtype=dtype),
            "B": torch.randn(rows, 3, generator=g, dtype=dtype)}


def reference(t, segments=None, mask=None):
    """The float64 formula, and its autograd graph (leaves x, A, B, b)."""
    x, A, B, b = (leaf64(t[k]) for k in ("x", "A", "B", "b"))
    split = {}
    if segments is not None:
        from _naive_lora import splits_of_segments
        split_sizes, enable = splits_of_segments(segments, 16)
        split = {"split_sizes": split_sizes, "enable": enable}
    y = naive_linear(x, t["W"].to(F64), b, A, B, 0.5, mask=mask, **split)
    return y, (x, A, B, b)


@pytest.mark.parametrize("segments", [None, SEGMENTS])
def test_no_grad_path(ran, segments):
    t = tensors(segments)
    with torch.no_grad():
        y = cf.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5, segments=segments)
    assert ran == ["_run_no_grad"]
    assert_rel_close(y, reference(t, segments)[0], torch.float32, "y")


@pytest.mark.parametrize("segments", [None, SEGMENTS])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_autograd_path(ran, segments, p):
    t = tensors(segments)
    leaves = [t[k].requires_grad_() for k in ("x", "A", "B", "b")]
    torch.manual_seed(3)
    seed = draw_seed()
    torch.manual_seed(3)
    y = cf.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5, p, True, segments=segments)
    assert ran == ["_run_autograd"]
    mask = dropout_mask(seed, t["x"].detach().reshape(-1, 12), p).view(t["x"].shape).to(F64) if p else None
    y_ref, ref_leaves = reference(t, segments, mask)
    assert_rel_close(y, y_ref, torch.float32, "y")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(y_ref, ref_leaves, g.to(F64))
    for name, a, e in zip("xABb", got, want):
        assert_rel_close(a, e, torch.float32, f"d{name}")


def test_recipe_path_keeps_the_recipe_tensors_and_gives_the_same_result(ran):
    t = tensors()
    src = (t["x"] / 2).requires_grad_()
    A, B = t["A"].requires_grad_(), t["B"].requires_grad_()
    x = src * 2  # rebuilt bit for bit from src, which autograd keeps anyway
    recipes.register(x, lambda s: s * 2, src)
    y = cf.lora_linear(x, t["W"], t["b"], A, B, 0.5)
    assert ran == ["_run_recipe"]
    assert type(y.grad_fn).__name__ == "_RebuiltInputBackward"
    y_ref, (x64, A64, B64, _) = reference(t)
    assert_rel_close(y, y_ref, torch.float32, "y")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, [src, A, B], g)
    want = torch.autograd.grad(y_ref, [x64, A64, B64], g.to(F64))
    assert_rel_close(got[0], want[0] * 2, torch.float32, "dsrc")
    assert_rel_close(got[1], want[1], torch.float32, "dA")
    assert_rel_close(got[2], want[2], torch.float32, "dB")


@pytest.mark.parametrize("segments", [None, SEGMENTS])
def test_composite_path_under_a_torch_func_transform(ran, segments):
    t = tensors(segments)

    def loss(A):
        return cf.lora_linear(t["x"], t["W"], t["b"], A, t["B"], 0.5, segments=segments).square().sum()

    dA = torch.func.grad(loss)(t["A"])
    assert ran == ["_run_composite"]
    y_ref, (_, A64, _, _) = reference(t, segments)
    (want,) = torch.autograd.grad(y_ref.square().sum(), A64)
    assert_rel_close(dA, want, torch.float32, "dA")


def test_triton_path_when_the_kernels_run(ran):
    from lora_layers import kernels

    if not kernels.is_available():
        pytest.skip(f"the Triton kernels cannot run here: {kernels.unavailable_reason()}")
    t = tensors()
    with torch.no_grad():
        y = cf.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5, backend="triton")
    assert ran == ["_run_triton"]
    assert_rel_close(y, reference(t)[0], torch.float32, "y", factor=10)


def test_the_torch_backend_and_a_row_scale_hook_never_take_the_triton_path(ran):
    from lora_layers.variants.dora import DoRAScale

    t = tensors()
    with torch.no_grad():
        cf.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5, backend="torch")
        if __import__("lora_layers").kernels.is_available():
            cf.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5, backend="triton",
                           row_scale=DoRAScale(torch.ones(16)))
    assert "_run_triton" not in ran


def test_checks_run_before_any_path(ran):
    t = tensors()
    with pytest.raises(ValueError, match="dropout_p must be in"):
        cf.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5, 1.0, True)
    with pytest.raises(ValueError, match="backend must be one of"):
        cf.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5, backend="cuda")
    with pytest.raises(RuntimeError, match="x has dtype torch.float64 but the weight has dtype torch.float32"):
        cf.lora_linear(t["x"].double(), t["W"], t["b"], t["A"], t["B"], 0.5)
    assert ran == ["_run_no_grad"]  # the dtype is checked by the executor, before it draws a seed


def test_the_public_functional_lora_linear_is_the_core_with_dora():
    import lora_layers
    from lora_layers.variants.dora import DoRAScale

    t = tensors()
    m = torch.rand(16) + 0.5
    with torch.no_grad():
        a = lora_layers.functional.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5, magnitude=m)
        b = cf.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5, row_scale=DoRAScale(m))
        plain = lora_layers.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5)
    assert torch.equal(a, b)
    assert torch.equal(plain, cf.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5))
    assert lora_layers.lora_linear is lora_layers.functional.lora_linear


def test_a_declined_triton_call_is_logged_under_lora_layers_functional(monkeypatch, caplog, ran):
    # The logger's name is part of the logging set-up users write; it stayed "lora_layers.functional"
    # when the router moved into the core (issue #21).
    import logging

    from lora_layers import kernels

    monkeypatch.setattr(kernels, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "supports", lambda *args, **kwargs: (False, "a reason of the test's"))
    caplog.set_level(logging.DEBUG, logger="lora_layers.functional")
    t = tensors()
    with torch.no_grad():
        cf.lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5, backend="triton")
    assert ran == ["_run_no_grad"]
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("lora_layers.functional", "lora_linear: triton backend declined (a reason of the test's); using the torch path")]
