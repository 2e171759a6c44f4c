"""The torch-type -> LoRA-class registry (issue #21): one table that inject_lora, import_peft and
load_adapter read, checked here against a table written out by hand."""
import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers.layers.linear import is_hf_conv1d
from lora_layers.layers.registry import LORA_CLASSES, lora_class_for

# The reference, spelled out: each torch layer and the lora_layers class that wraps it.
EXPECTED = [
    (lambda: nn.Linear(4, 3), L.Linear),
    (lambda: nn.Embedding(5, 3), L.Embedding),
    (lambda: nn.Conv1d(2, 3, 3), L.Conv1d),
    (lambda: nn.Conv2d(2, 3, 3), L.Conv2d),
    (lambda: nn.Conv3d(2, 3, 3), L.Conv3d),
]
NOT_ADAPTABLE = [
    lambda: nn.LayerNorm(4),
    lambda: nn.ConvTranspose2d(2, 3, 3),
    lambda: nn.Bilinear(2, 2, 3),
    lambda: nn.Sequential(nn.Linear(4, 3)),
    lambda: nn.MultiheadAttention(4, 2).out_proj,  # a subclass of nn.Linear that attention reads directly
]


class _MyLinear(nn.Linear):
    pass


class _MyEmbedding(nn.Embedding):
    pass


class _MyConv(nn.Conv2d):
    pass


class Conv1D(nn.Module):
    """A stand-in for transformers' GPT-2 Conv1D (duck-typed: the name, ``nf`` and a 2-D ``(in, out)`` weight)."""

    def __init__(self, nf, nx, with_nf=True, weight_dims=2):
        super().__init__()
        if with_nf:
            self.nf = nf
        self.weight = nn.Parameter(torch.randn((nx, nf) if weight_dims == 2 else (nx * nf,)))
        self.bias = nn.Parameter(torch.zeros(nf))


@pytest.mark.parametrize("make, cls", EXPECTED, ids=[c.__name__ for _, c in EXPECTED])
def test_each_torch_layer_maps_to_its_lora_class(make, cls):
    module = make()
    for kwargs in ({}, {"subclasses": True}, {"hf_conv1d": False}):
        assert lora_class_for(module, **kwargs) is cls
    assert LORA_CLASSES[type(module)] is cls
    assert cls.from_module(module, r=2)._base_type is type(module)  # and that class really wraps it


def test_the_table_holds_exactly_the_five_torch_layers():
    assert list(LORA_CLASSES) == [nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d]


@pytest.mark.parametrize("make", NOT_ADAPTABLE)
def test_other_modules_map_to_nothing(make):
    assert lora_class_for(make()) is None


def test_subclasses_map_only_when_asked_as_before():
    # inject_lora takes exact types (a subclass may override forward); import_peft, like PEFT, wraps
    # subclasses of nn.Linear and nn.Embedding, never of the convolutions.
    assert lora_class_for(_MyLinear(4, 3)) is None
    assert lora_class_for(_MyLinear(4, 3), subclasses=True) is L.Linear
    assert lora_class_for(_MyEmbedding(5, 3)) is None
    assert lora_class_for(_MyEmbedding(5, 3), subclasses=True) is L.Embedding
    assert lora_class_for(_MyConv(2, 3, 3), subclasses=True) is None
    assert lora_class_for(nn.MultiheadAttention(4, 2).out_proj, subclasses=True) is L.Linear


def test_inject_lora_refuses_a_subclass_of_linear_and_import_peft_takes_it(tmp_path):
    model = nn.Sequential(_MyLinear(4, 3))
    with pytest.raises(TypeError, match=r"supported types are exactly \['Linear', 'Embedding', 'Conv1d', "
                                        r"'Conv2d', 'Conv3d'\] and the quantized linears"):
        L.inject_lora(model, ["0"], r=2)
    assert type(model[0]) is _MyLinear  # unchanged

    source = nn.Sequential(nn.Linear(4, 3))
    L.inject_lora(source, ["0"], r=2)
    L.export_peft(source, tmp_path / "adapter")
    assert L.import_peft(model, tmp_path / "adapter") == ["0"]
    assert isinstance(model[0], L.Linear) and model[0]._wrapped_class is _MyLinear


def test_hf_conv1d_maps_to_a_fan_in_fan_out_linear():
    conv = Conv1D(3, 4)
    assert is_hf_conv1d(conv)
    assert lora_class_for(conv) is L.Linear
    assert lora_class_for(conv, hf_conv1d=False) is None  # inject_lora takes torch layers only
    layer = lora_class_for(conv).from_module(conv, r=2)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (4, 3)
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), x @ conv.weight + conv.bias)  # B = 0: the base output


@pytest.mark.parametrize("kwargs", [{"with_nf": False}, {"weight_dims": 1}])
def test_a_module_only_named_conv1d_is_not_one(kwargs):
    conv = Conv1D(3, 4, **kwargs)
    assert not is_hf_conv1d(conv)
    assert lora_class_for(conv, subclasses=True) is None
    with pytest.raises(TypeError, match="expects a torch.nn.modules.linear.Linear, got Conv1D"):
        L.Linear.from_module(conv, r=2)


def test_is_hf_conv1d_judges_by_the_class_given():
    # A LoRA layer made from a Conv1D holds its state; only its wrapped class says what it was.
    conv = Conv1D(3, 4)
    layer = L.Linear.from_module(conv, r=2)
    assert not is_hf_conv1d(layer)
    assert is_hf_conv1d(layer, layer._wrapped_class)
    assert not is_hf_conv1d(L.Linear.from_module(nn.Linear(4, 3), r=2), nn.Linear)


def test_real_transformers_conv1d():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    conv = pytorch_utils.Conv1D(3, 4)
    assert is_hf_conv1d(conv) and lora_class_for(conv) is L.Linear


def test_lora_layers_are_not_excluded_by_the_registry():
    # The registry speaks of kinds; refusing a layer that already has an adapter is the callers' job.
    layer = L.Linear(4, 3, r=2)
    assert lora_class_for(layer) is None  # not an exact nn.Linear
    assert lora_class_for(layer, subclasses=True) is L.Linear


def test_quantized_linears_map_to_linear():
    bnb = pytest.importorskip("bitsandbytes")
    for module in (bnb.nn.Linear4bit(8, 8), bnb.nn.Linear8bitLt(8, 8)):
        assert lora_class_for(module) is L.Linear
        assert lora_class_for(module, hf_conv1d=False) is L.Linear


def test_torchao_nf4_linear_maps_to_linear():
    pytest.importorskip("torchao")
    model = nn.Sequential(nn.Linear(64, 64))
    L.quantize_base(model, targets=["0"])
    assert type(model[0]) is nn.Linear and type(model[0].weight).__name__ == "NF4Tensor"
    assert lora_class_for(model[0]) is L.Linear


def test_load_adapter_puts_only_a_plain_linear_adapter_on_a_conv1d():
    from lora_layers.io.adapters import _layer_spec

    conv = Conv1D(6, 4)
    cls, kwargs = _layer_spec(conv, {"class": "Linear", "r": 2, "lora_alpha": 2, "fan_in_fan_out": True})
    assert cls is L.Linear and kwargs["fan_in_fan_out"] is True
    with pytest.raises(ValueError, match="class MergedLinear, which cannot go on a Conv1D"):
        _layer_spec(conv, {"class": "MergedLinear", "r": 2, "lora_alpha": 2, "split_sizes": [3, 3],
                           "enable_lora": [True, True]})
    with pytest.raises(ValueError, match="class Embedding, which cannot go on a Conv1D"):
        _layer_spec(conv, {"class": "Embedding", "r": 2, "lora_alpha": 2})
