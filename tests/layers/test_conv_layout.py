"""lora_layers' conv layers as loralib programs use them, without loralib: ``.conv`` (issue #20
item 7) and ``layout='loralib'`` (issue #20 item 8): writes through ``.conv``, refusals, and the
PEFT round trip of a loralib-layout conv. The comparisons with the installed loralib are in
tests/parity/test_conv_loralib.py."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_layers as L


def test_conv_writes_reach_the_layer():
    layer = L.Conv2d(3, 4, 3, r=2, lora_alpha=4)
    x = torch.randn(1, 3, 5, 5)
    new_weight = nn.Parameter(torch.randn(4, 3, 3, 3))
    layer.conv.weight = new_weight  # loralib: replaces the wrapped conv's weight
    assert layer.weight is new_weight and layer._parameters["weight"] is new_weight
    layer.conv.bias.data.zero_()
    layer.conv.padding = (1, 1)
    layer.conv.stride = (2, 2)
    assert layer.padding == (1, 1) and layer.stride == (2, 2)
    torch.testing.assert_close(layer(x), F.conv2d(x, new_weight, None, stride=2, padding=1), rtol=0, atol=0)
    layer.conv.weight.requires_grad = False
    assert not layer.weight.requires_grad
    nn.init.kaiming_normal_(layer.conv.weight)  # another injection idiom: in place, seen by the layer
    assert torch.equal(layer.weight, new_weight)
    # load_state_dict through .conv (a plain conv's keys) loads the layer's base, not its adapter.
    plain = nn.Conv2d(3, 4, 3)
    A = layer.lora_A.detach().clone()
    layer.conv.load_state_dict(plain.state_dict())
    assert torch.equal(layer.weight, plain.weight) and torch.equal(layer.lora_A, A)
    for p in layer.conv.parameters():  # "freeze the base conv" leaves the adapter trainable
        p.requires_grad = False
    assert layer.lora_A.requires_grad and not layer.bias.requires_grad


def test_replacing_conv_is_refused_and_changes_nothing():
    layer = L.Conv2d(3, 4, 3, r=2)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(TypeError, match=r"conv.*Conv2d.*from_module"):
        layer.conv = nn.Conv2d(3, 4, 3)
    assert "conv" not in layer._modules and "conv" not in layer.__dict__
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_conv_survives_pickle_deepcopy_and_utilities():
    model = nn.Sequential(L.Conv2d(3, 4, 3, r=2))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone[0].conv.weight is clone[0].weight
        assert clone[0].conv.weight is not model[0].weight
        assert [n for n, _ in clone.named_modules()] == ["", "0", "0.lora_dropout"]
    model[0].conv.bias.requires_grad = True
    L.mark_only_lora_as_trainable(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_A", "0.lora_B"]
    assert sorted(L.lora_state_dict(model, bias="all")) == ["0.bias", "0.lora_A", "0.lora_B"]


@pytest.mark.parametrize("make, text", [
    (lambda: L.Conv2d(3, 4, 3, r=2, layout="LoRAlib"), ["layout", "'LoRAlib'", "'lora_layers'", "'loralib'"]),
    (lambda: L.Conv2d(3, 4, 3, r=2, layout=None), ["layout", "None"]),
    (lambda: L.Conv2d(3, 4, (3, 1), r=2, layout="loralib"), ["layout='loralib'", "kernel_size=(3, 1)", "square"]),
    (lambda: L.Conv1d(3, 4, 3, r=2, layout="loralib"), ["layout='loralib'", "Conv1d", "kernel_size=(3,)"]),
    (lambda: L.Conv3d(3, 4, 2, r=2, layout="loralib"), ["layout='loralib'", "Conv3d", "kernel_size=(2, 2, 2)"]),
], ids=["unknown", "none", "non_square", "conv1d_k3", "conv3d_k2"])
def test_bad_layout_is_refused(make, text):
    with pytest.raises(ValueError) as info:
        make()
    for t in text:
        assert t in str(info.value)


def test_bad_layout_in_from_module_changes_nothing():
    conv = nn.Conv2d(3, 4, 3)
    before = copy.deepcopy(conv.__dict__)
    with pytest.raises(ValueError, match="layout"):
        L.Conv2d.from_module(conv, r=2, layout="peft")
    assert conv.__dict__.keys() == before.keys() and conv.weight.requires_grad
    wrapped = L.Conv2d.from_module(conv, r=2, layout="loralib")
    assert wrapped.weight is conv.weight and wrapped.lora_A.shape == (6, 9)


def test_our_layout_into_a_loralib_layout_layer_names_layout():
    ours = L.Conv2d(3, 6, 3, r=2)
    target = L.Conv2d(3, 6, 3, r=2, layout="loralib")
    with pytest.raises(RuntimeError, match=r"layout='lora_layers'"):
        target.load_state_dict(ours.state_dict())
    assert target.layout == "loralib"


def test_loralib_conv1d_kernel3_checkpoint_is_explained():
    # loralib's Conv1d builds these shapes for kernel 3 but its forward fails on them.
    state = {"lora_A": torch.randn(6, 12), "lora_B": torch.randn(15, 6)}
    ours = L.Conv1d(4, 5, 3, r=2)
    with pytest.raises(RuntimeError, match=r"loralib.*Conv1d.*kernel_size=\(3,\)"):
        ours.load_state_dict(state, strict=False)
    assert ours.layout == "lora_layers" and ours.lora_A.shape == (2, 12)


@pytest.mark.parametrize("rslora", [False, True])
def test_export_peft_of_a_loralib_layout_conv_imports_back_into_that_layout(tmp_path, rslora):
    """issue #20 review: the rank-r·k² adapter export_peft writes for a loralib-layout conv was refused
    by import_peft into a model built the same way ('already a Conv2d with r=2 ... the adapter has r=18')."""
    def build(seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3))
        model[0] = L.Conv2d.from_module(model[0], r=2, lora_alpha=4, layout="loralib", use_rslora=rslora)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in L.lora_parameters(model):
                p.normal_()
        return model

    src, dst = build(1), build(2)
    L.export_peft(src, tmp_path / "peft", task_type=None)
    assert L.import_peft(dst, tmp_path / "peft") == ["0"]
    for name in ("lora_A", "lora_B"):
        assert torch.equal(getattr(dst[0], name), getattr(src[0], name)), name
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(dst(x), src(x))

    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    key = "base_model.model.0.lora_A.weight"
    weights[key] = weights[key] + 1  # rank r·k², but not k copies of one block
    save_file(weights, tmp_path / "peft" / "adapter_model.safetensors")
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(L.CheckpointError, match=r"only as export_peft writes it.*block on a diagonal"):
        L.import_peft(dst, tmp_path / "peft")
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
