"""core/amp.compute_dtype (the one home of the autocast dtype) and the dropout pieces of
core/dropout.py, each against a formula written here."""
import pytest
import torch

from lora_layers.core.amp import compute_dtype
from lora_layers.core.autograd import refuse_double_backward, tracing
from lora_layers.core.dropout import (backward_mask, down_project, draw_seed, dropout_mask, grad_A, input_grad,
                                      seeded_dropout)
from _naive_lora import F64, assert_rel_close

MESSAGE = "f: x is {x}, w is {w}"


def test_compute_dtype_outside_autocast_is_x_dtype_and_refuses_a_mismatch():
    x, w = torch.ones(2, 3), torch.ones(4, 3)
    assert compute_dtype(x, w, RuntimeError, MESSAGE) is torch.float32
    assert compute_dtype(x.double(), w.double(), RuntimeError, MESSAGE) is torch.float64
    with pytest.raises(TypeError, match=r"^f: x is torch.float64, w is torch.float32$"):
        compute_dtype(x.double(), w, TypeError, MESSAGE)


def test_compute_dtype_under_autocast_is_autocasts_for_the_dtypes_it_lowers():
    x, w = torch.ones(2, 3), torch.ones(4, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x, w, RuntimeError, MESSAGE) is torch.bfloat16  # no mismatch check
        assert compute_dtype(x.double(), w.double(), RuntimeError, MESSAGE) is torch.float64  # never lowered
        with pytest.raises(RuntimeError, match="x is torch.float64"):
            compute_dtype(x.double(), w, RuntimeError, MESSAGE)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_the_dropout_pieces_match_the_masked_formulas(p):
    g = torch.Generator().manual_seed(0)
    x, A, du = torch.randn(9, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(9, 4, generator=g)
    seed = draw_seed()
    scaled = dropout_mask(seed, x, p).to(F64) if p else torch.ones(9, 6, dtype=F64)  # 0 or 1/(1-p')
    mask = backward_mask(seed, x, p)
    assert (mask is None) == (p == 0.0)
    x64, A64, du64 = x.to(F64), A.to(F64), du.to(F64)
    assert_rel_close(down_project(x, A, p, seed), (x64 * scaled) @ A64.t(), torch.float32, "u")
    assert_rel_close(grad_A(du, x, mask, p), du64.t() @ (x64 * scaled), torch.float32, "dA")
    assert_rel_close(input_grad(du, A, mask, p), (du64 @ A64) * scaled, torch.float32, "dx term")
    drop = seeded_dropout(seed, x.view(3, 3, 6), p)
    if p == 0.0:
        assert drop is None
    else:
        assert_rel_close(drop(x.view(3, 3, 6)), (x64 * scaled).view(3, 3, 6), torch.float32, "seeded")


def test_tracing_is_true_only_inside_a_transform():
    assert not tracing()
    seen = []
    torch.func.vmap(lambda t: seen.append(tracing()) or t)(torch.ones(2, 3))
    assert seen == [True]


def test_refuse_double_backward_raises_only_while_grad_is_on():
    with torch.no_grad():
        refuse_double_backward("f", "why")
    with pytest.raises(RuntimeError, match=r"^f does not support double backward \(create_graph=True\): why$"):
        refuse_double_backward("f", "why")
