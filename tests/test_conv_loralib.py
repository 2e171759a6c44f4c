"""loralib 0.1.2's conv layers, as programs use them: ``.conv`` (issue #20 item 7) and
loralib's conv adapter layout, its checkpoints included (issue #20 item 8).

The reference is the installed loralib itself: same weights in, same outputs out.
"""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_layers as L

loralib = pytest.importorskip("loralib")


def _randomize(*tensors):
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn_like(t))


# ----------------------------------------------------------------------------- item 7: .conv

def test_conv_is_a_view_of_the_layers_own_conv():
    layer = L.Conv2d(3, 4, 3, r=2, stride=2, padding=1, groups=1)
    ref = loralib.Conv2d(3, 4, 3, r=2, stride=2, padding=1)
    assert layer.conv.weight is layer.weight and layer.conv.bias is layer.bias
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(layer.conv, name) == getattr(ref.conv, name), name
    assert isinstance(layer.conv, nn.Conv2d) and isinstance(L.Conv1d(2, 2, 1).conv, nn.Conv1d)
    assert repr(layer.conv).endswith("(3, 4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))")
    assert not layer.conv.weight.requires_grad  # frozen, as loralib's conv.weight
    # The layer's structure is loralib-free: no submodule, no conv.* keys.
    assert [n for n, _ in layer.named_modules()] == ["", "lora_dropout"]
    assert sorted(layer.state_dict()) == ["bias", "lora_A", "lora_B", "weight"]
    assert sorted(n for n, _ in layer.conv.named_parameters()) == ["bias", "weight"]
    assert sorted(layer.conv.state_dict()) == sorted(ref.conv.state_dict()) == ["bias", "weight"]


def _inject(lora, old: nn.Conv2d, **kw):
    """RNAformer-style injection: build the LoRA conv, then copy the old conv's tensors through ``.conv``."""
    new = lora.Conv2d(old.in_channels, old.out_channels, old.kernel_size[0], r=2, lora_alpha=4,
                      padding=old.padding[0], **kw)
    new.conv.weight.data.copy_(old.weight.data)
    new.conv.bias.data.copy_(old.bias.data)
    return new


def test_injection_through_conv_matches_loralib():
    torch.manual_seed(0)
    old = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    ref, ours = _inject(loralib, old), _inject(L, old)
    assert torch.equal(ours.weight, old.weight) and torch.equal(ours.bias, old.bias)
    assert torch.equal(ours(x), ref(x)) and torch.equal(ours(x), old(x))  # B = 0: the base conv

    # With a trained adapter, .conv(x) is still the plain conv (unmerged), as loralib's.
    old = nn.Conv2d(3, 5, 1)  # kernel 1: loralib's adapter shapes are ours
    ref, ours = _inject(loralib, old), _inject(L, old)
    _randomize(ref.lora_A, ref.lora_B)
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.conv(x), ref.conv(x)) and torch.equal(ours.conv(x), old(x))
    assert not torch.allclose(ours(x), old(x))
    # Merged (eval), loralib's .conv holds the merged weight; so does ours.
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours.conv(x), ref.conv(x), rtol=0, atol=0)


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
