"""The scaling formula and the rank check, each in one home (issue #21): ``core.spec`` holds
them, and the layers, inject_lora and the PEFT format read them from there."""
import json
import math

import pytest
import torch.nn as nn

import lora_layers as L
from lora_layers.core.spec import check_rank, lora_scaling, rank_divisor


@pytest.mark.parametrize("r, alpha, rslora, expected", [
    (4, 8, False, 2.0), (4, 8, True, 4.0), (16, 32, False, 2.0), (16, 32, True, 8.0), (3, 1, False, 1 / 3),
    (9, 1.5, True, 0.5), (0, 8, False, 0.0), (0, 8, True, 0.0),
])
def test_lora_scaling_against_hand_values(r, alpha, rslora, expected):
    assert lora_scaling(r, alpha, rslora) == pytest.approx(expected, rel=1e-15)
    assert rank_divisor(r, rslora) == (math.sqrt(r) if rslora else r)


@pytest.mark.parametrize("rslora", [False, True])
def test_every_layer_type_scales_by_the_formula(rslora):
    expected = 6 / (math.sqrt(9) if rslora else 9)
    layers = [L.Linear(4, 3, r=9, lora_alpha=6, use_rslora=rslora),
              L.MergedLinear(4, 6, r=9, lora_alpha=6, enable_lora=[True, False], use_rslora=rslora),
              L.Embedding(5, 3, r=9, lora_alpha=6, use_rslora=rslora),
              L.Conv2d(2, 3, 3, r=9, lora_alpha=6, use_rslora=rslora),
              L.Conv1d.from_module(nn.Conv1d(2, 3, 1), r=9, lora_alpha=6, use_rslora=rslora)]
    for layer in layers:
        assert layer.scaling == pytest.approx(expected, rel=1e-15), type(layer).__name__
    assert L.Linear(4, 3, r=0, lora_alpha=6).scaling == 0.0


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_export_keeps_a_merged_linears_scaling(tmp_path, rslora):
    # n enabled splits of rank r become one rank-r·n adapter whose alpha gives the same scaling.
    model = nn.Sequential(L.MergedLinear(4, 9, r=2, lora_alpha=5, enable_lora=[True, False, True],
                                         use_rslora=rslora))
    L.export_peft(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_rslora"] is rslora
    r, alpha = config["r"], config["lora_alpha"]
    assert alpha / (math.sqrt(r) if rslora else r) == pytest.approx(model[0].scaling, rel=1e-12)


def test_check_rank_messages():
    assert check_rank(0) == 0 and check_rank(3, positive=True) == 3
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"^r must be a non-negative integer, got {bad!r}$"):
            check_rank(bad)
    for bad in (0, -1, 2.0, False):
        with pytest.raises(ValueError, match=rf"^r must be a positive integer, got {bad!r}$"):
            check_rank(bad, positive=True)
    with pytest.raises(ValueError, match=r"^rank_pattern\['q'\] must be a positive integer, got 0$"):
        check_rank(0, "rank_pattern['q']", positive=True)


def test_inject_lora_rank_errors_are_the_shared_check():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"^r must be a positive integer, got 0$"):
        L.inject_lora(model, ["0"], r=0)
    with pytest.raises(ValueError, match=r"^rank_pattern\['0'\] must be a positive integer, got -2$"):
        L.inject_lora(model, ["0"], r=2, rank_pattern={"0": -2})
    with pytest.raises(ValueError, match=r"^r must be a non-negative integer, got -1$"):
        L.Linear(4, 3, r=-1)
    assert type(model[0]) is nn.Linear
