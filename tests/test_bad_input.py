"""Bad input: a ValueError/TypeError that names the argument and the value, and changes nothing."""
import math

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers.functional import lora_linear
from _naive_lora import bit_equal

CONSTRUCTORS = {
    "Linear": lambda **kw: L.Linear(6, 4, **kw),
    "MergedLinear": lambda **kw: L.MergedLinear(6, 4, enable_lora=[True, False], **kw),
    "Embedding": lambda **kw: L.Embedding(6, 4, **kw),
    "Conv1d": lambda **kw: L.Conv1d(2, 3, 2, **kw),
    "Conv2d": lambda **kw: L.Conv2d(2, 3, (2, 1), **kw),
    "Conv3d": lambda **kw: L.Conv3d(2, 3, 1, **kw),
}

WRAP = {
    "Linear": (L.Linear, lambda: nn.Linear(6, 4)),
    "MergedLinear": (L.MergedLinear, lambda: nn.Linear(6, 4)),
    "Embedding": (L.Embedding, lambda: nn.Embedding(6, 4)),
    "Conv1d": (L.Conv1d, lambda: nn.Conv1d(2, 3, 2)),
    "Conv2d": (L.Conv2d, lambda: nn.Conv2d(2, 3, (2, 1))),
    "Conv3d": (L.Conv3d, lambda: nn.Conv3d(2, 3, 1)),
}


def _raises(exc, fn, *names):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for name in names:
        assert name in msg, f"error message {msg!r} does not mention {name!r}"
    return msg


class _Snapshot:
    """Everything about a module that a failed call must not change."""

    def __init__(self, module):
        self.module = module
        self.params = {n: (p, p.detach().clone(), p.requires_grad) for n, p in module.named_parameters()}
        self.keys = list(module.state_dict())
        self.dict_keys = set(module.__dict__)

    def assert_unchanged(self):
        m = self.module
        assert list(m.state_dict()) == self.keys and set(m.__dict__) == self.dict_keys
        now = dict(m.named_parameters())
        assert set(now) == set(self.params)
        for n, (p, value, rg) in self.params.items():
            assert now[n] is p and bit_equal(p.detach(), value) and p.requires_grad == rg


BAD_R = [-1, 2.5, 2.0, True, "4", None]


@pytest.mark.parametrize("bad", BAD_R, ids=repr)
@pytest.mark.parametrize("cls", list(CONSTRUCTORS))
def test_bad_rank(cls, bad):
    _raises((ValueError, TypeError), lambda: CONSTRUCTORS[cls](r=bad), "r ", repr(bad))
    layer_cls, make = WRAP[cls]
    base = make()
    snap = _Snapshot(base)
    kw = {"enable_lora": [True, False]} if cls == "MergedLinear" else {}
    _raises((ValueError, TypeError), lambda: layer_cls.from_module(base, r=bad, **kw), "r ", repr(bad))
    snap.assert_unchanged()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, "0.1", True], ids=repr)
@pytest.mark.parametrize("cls", ["Linear", "MergedLinear", "Conv2d"])
def test_bad_dropout(cls, bad):
    _raises((ValueError, TypeError), lambda: CONSTRUCTORS[cls](r=2, lora_dropout=bad), "lora_dropout", repr(bad))
    layer_cls, make = WRAP[cls]
    base = make()
    snap = _Snapshot(base)
    kw = {"enable_lora": [True, False]} if cls == "MergedLinear" else {}
    _raises((ValueError, TypeError), lambda: layer_cls.from_module(base, r=2, lora_dropout=bad, **kw),
            "lora_dropout")
    snap.assert_unchanged()


@pytest.mark.parametrize("bad", [math.inf, math.nan, "8", None], ids=repr)
def test_bad_alpha(bad):
    _raises((ValueError, TypeError), lambda: L.Linear(4, 4, r=2, lora_alpha=bad), "lora_alpha", repr(bad))


@pytest.mark.parametrize("bad", [torch.int64, "float32", torch.bool, torch.float8_e4m3fn, torch.complex64], ids=repr)
def test_bad_lora_dtype(bad):
    _raises(TypeError, lambda: L.Linear(4, 4, r=2, lora_dtype=bad), "lora_dtype", repr(bad))


def test_split_sizes_not_summing():
    msg = _raises(ValueError, lambda: L.MergedLinear(8, 16, r=2, enable_lora=[True, True],
                                                     split_sizes=[8, 4]), "split_sizes", "16", "[8, 4]")
    assert "12" in msg  # the sum it got
    base = nn.Linear(8, 16)
    snap = _Snapshot(base)
    _raises(ValueError, lambda: L.MergedLinear.from_module(base, r=2, enable_lora=[True, True],
                                                           split_sizes=[8, 4]), "split_sizes")
    snap.assert_unchanged()


@pytest.mark.parametrize("bad", [[0, 16], [-4, 20], [8.0, 8], "88", [True, 15]], ids=repr)
def test_split_sizes_not_positive_ints(bad):
    _raises(ValueError, lambda: L.MergedLinear(8, 16, r=2, enable_lora=[True, True], split_sizes=bad),
            "split_sizes", repr(bad))


def test_enable_lora_length_mismatch():
    _raises(ValueError, lambda: L.MergedLinear(8, 12, r=2, enable_lora=[True, False],
                                               split_sizes=[4, 4, 4]),
            "enable_lora", "split_sizes", "[True, False]", "[4, 4, 4]")
    base = nn.Linear(8, 12)
    snap = _Snapshot(base)
    _raises(ValueError, lambda: L.MergedLinear.from_module(base, r=2, enable_lora=[True, False],
                                                           split_sizes=[4, 4, 4]), "enable_lora")
    snap.assert_unchanged()


@pytest.mark.parametrize("bad", [[], True, "TF", [True, "yes"], None], ids=repr)
def test_enable_lora_not_bools(bad):
    _raises((ValueError, TypeError), lambda: L.MergedLinear(8, 12, r=2, enable_lora=bad), "enable_lora", repr(bad))


def test_equal_splits_not_dividing():
    _raises(ValueError, lambda: L.MergedLinear(8, 10, r=2, enable_lora=[True, False, True]),
            "out_features=10", "enable_lora", "3")
    base = nn.Linear(8, 10)
    snap = _Snapshot(base)
    _raises(ValueError, lambda: L.MergedLinear.from_module(base, r=2, enable_lora=[True, False, True]),
            "out_features=10")
    snap.assert_unchanged()


@pytest.mark.parametrize("cls,module", [
    (L.Linear, nn.Conv2d(2, 3, 3)),
    (L.Linear, L.Linear(4, 4, r=2)),
    (L.Linear, L.Linear(4, 4, r=0)),
    (L.MergedLinear, nn.Embedding(4, 4)),
    (L.Embedding, nn.Linear(4, 4)),
    (L.Conv2d, nn.Conv3d(2, 3, 1)),
    (L.Conv2d, nn.Conv1d(2, 3, 1)),
    (L.Conv2d, L.Conv2d(2, 3, 1, r=1)),
    (L.Conv1d, nn.ConvTranspose1d(2, 3, 1)),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v.__name__)
def test_from_module_unsupported_type(cls, module):
    snap = _Snapshot(module)
    kw = {"enable_lora": [True]} if cls is L.MergedLinear else {}
    _raises(TypeError, lambda: cls.from_module(module, r=2, **kw), cls.__name__, type(module).__name__)
    snap.assert_unchanged()


@pytest.mark.parametrize("cls,kernel", [(L.Conv2d, (3, 3, 3)), (L.Conv1d, (2, 2)), (L.Conv3d, (1, 2)),
                                        (L.Conv2d, [3])], ids=repr)
def test_kernel_size_mismatch(cls, kernel):
    _raises(ValueError, lambda: cls(2, 3, kernel, r=2), "kernel_size", repr(kernel))


@pytest.mark.parametrize("reparametrize", [
    lambda m: torch.nn.utils.weight_norm(m),
    lambda m: torch.nn.utils.parametrizations.weight_norm(m),
    lambda m: torch.nn.utils.parametrizations.orthogonal(m),
], ids=["weight_norm", "parametrizations.weight_norm", "orthogonal"])
def test_from_module_refuses_a_computed_weight(reparametrize):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        module = reparametrize(nn.Linear(4, 4))
    snap = _Snapshot(module)
    _raises(TypeError, lambda: L.Linear.from_module(module, r=2), "weight", "Parameter", "remove")
    snap.assert_unchanged()


def test_merged_linear_from_module_needs_enable_lora():
    # The constructor keeps loralib's default enable_lora=[False]; from_module has no
    # default rather than a second, different one.
    _raises(TypeError, lambda: L.MergedLinear.from_module(nn.Linear(4, 6), r=2), "enable_lora")
    assert not L.MergedLinear(4, 6, r=2).has_adapter  # loralib: nothing enabled by default


def test_from_module_kernel_does_not_match_weight():
    conv = nn.Conv2d(2, 3, (3, 3))
    conv.weight = nn.Parameter(torch.randn(3, 2, 3, 2))  # weight no longer matches kernel_size
    snap = _Snapshot(conv)
    _raises(ValueError, lambda: L.Conv2d.from_module(conv, r=2), "kernel_size", "(3, 3)", "(3, 2)")
    snap.assert_unchanged()


def test_from_module_linear_weight_shape_mismatch():
    lin = nn.Linear(6, 4)
    snap = _Snapshot(lin)
    _raises(ValueError, lambda: L.Linear.from_module(lin, r=2, fan_in_fan_out=True), "fan_in_fan_out", "(4, 6)")
    snap.assert_unchanged()


@pytest.mark.parametrize("bad", ["cuda", "Torch", "", None], ids=repr)
def test_backend_invalid(bad):
    _raises(ValueError, lambda: L.Linear(4, 4, r=2, backend=bad), "backend", repr(bad))
    _raises(ValueError, lambda: L.Conv1d(2, 2, 1, r=2, backend=bad), "backend", repr(bad))
    lin = nn.Linear(4, 4)
    snap = _Snapshot(lin)
    _raises(ValueError, lambda: L.Linear.from_module(lin, r=2, backend=bad), "backend", repr(bad))
    snap.assert_unchanged()
    x, W, A, B = torch.randn(2, 4), torch.randn(4, 4), torch.randn(2, 4), torch.randn(4, 2)
    _raises(ValueError, lambda: lora_linear(x, W, None, A, B, 1.0, backend=bad), "backend", repr(bad))


def test_backend_env_var(monkeypatch):
    layer = L.Linear(4, 3, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4)
    expected = layer(x)
    w0 = layer.weight.detach().clone()
    monkeypatch.setenv("LORA_LAYERS_BACKEND", "bogus")
    _raises(ValueError, lambda: layer(x), "LORA_LAYERS_BACKEND", "'bogus'")
    assert bit_equal(layer.weight, w0)
    monkeypatch.setenv("LORA_LAYERS_BACKEND", "torch")
    torch.testing.assert_close(layer(x), expected)  # a valid override still works
    monkeypatch.setenv("LORA_LAYERS_BACKEND", " Torch ")  # case and spaces are tolerated
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0], ids=repr)
def test_functional_dropout_out_of_range(bad):
    x, W, A, B = torch.randn(2, 4), torch.randn(4, 4), torch.randn(2, 4), torch.randn(4, 2)
    _raises(ValueError, lambda: lora_linear(x, W, None, A, B, 1.0, bad, True), "dropout_p", repr(bad))


def test_functional_shape_errors():
    x, W, A = torch.randn(2, 4), torch.randn(6, 4), torch.randn(4, 4)
    _raises(ValueError, lambda: lora_linear(x, W, None, A[:2], torch.randn(5, 2), 1.0), "lora_B", "6")
    _raises(ValueError, lambda: lora_linear(x, W, None, A, torch.randn(4, 2), 1.0, segments=[(0, 2), (4, 8)]),
            "segments[1]", "(4, 8)")
    _raises(ValueError, lambda: lora_linear(x, W, None, A[:3], torch.randn(4, 1), 1.0, segments=[(0, 2), (2, 4)]),
            "lora_A", "segments")
    _raises(ValueError, lambda: lora_linear(x, W, None, A, torch.randn(5, 2), 1.0, segments=[(0, 2), (2, 4)]),
            "lora_B", "4")
