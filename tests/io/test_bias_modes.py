"""The bias modes have one home (``model.params.BIAS_MODES``, issue #21): what ``save_lora`` and
``lora_state_dict`` accept is what a checkpoint header may record."""
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import lora_layers as L
from lora_layers.io.checkpoint import META_BIAS
from lora_layers.model.params import BIAS_MODES


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    L.inject_lora(model, ["0"], r=2)
    return model


def _with_bias_field(path, value):
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    meta[META_BIAS] = value
    save_file(tensors, str(path), metadata=meta)


def test_the_modes_are_loralibs():
    assert BIAS_MODES == ("none", "all", "lora_only")


@pytest.mark.parametrize("bias", BIAS_MODES)
def test_every_mode_saves_and_loads(tmp_path, bias):
    path = tmp_path / "a.safetensors"
    L.save_lora(_model(), path, bias=bias)
    L.load_lora(_model(), path)


def test_a_header_with_another_mode_is_refused_naming_the_modes(tmp_path):
    path = tmp_path / "a.safetensors"
    L.save_lora(_model(), path)
    _with_bias_field(path, "some")
    with pytest.raises(L.CheckpointError, match=r"header field lora_layers\.bias='some' is not a valid bias mode, "
                                               r"expected 'none', 'all' or 'lora_only'$"):
        L.load_lora(_model(), path)


def test_save_lora_refuses_another_mode():
    with pytest.raises(ValueError, match=r"bias must be one of \('none', 'all', 'lora_only'\), got 'some'"):
        L.save_lora(_model(), "unused.safetensors", bias="some")
