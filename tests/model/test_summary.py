"""lora_layers.summary: what adapters a model carries and what they cost (issue #24).

The counts are checked against sums written out here from the layer shapes and against
the bytes save_lora writes; tests/parity/test_summary_peft.py checks them against PEFT's own
trainable/all parameter counts.
"""
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import lora_layers as L
from lora_layers import phi3

from conftest import make_tiny_phi3


def test_counts_match_the_shapes_and_the_saved_file(tmp_path):
    model = make_tiny_phi3()  # hidden 64, intermediate 96, 4 heads / 2 KV heads: qkv splits [64, 32, 32]
    phi3.apply_lora(model, r=4, lora_alpha=8, qkv=("q", "v"), use_dora=True)
    s = L.summary(model)

    r, hidden, inter = 4, 64, 96
    qkv = 2 * r * hidden + (64 + 32) * r + (64 + 32)  # two A blocks, B over the q and v rows, magnitudes
    o = r * (hidden + hidden) + hidden
    gate_up = 2 * r * hidden + 2 * inter * r + 2 * inter
    down = r * (inter + hidden) + hidden
    assert s.adapter_params == 2 * (qkv + o + gate_up + down)
    assert s.trainable_params == s.adapter_params  # apply_lora leaves only the adapters trainable
    assert s.total_params == sum(p.numel() for _, p in model.named_parameters())
    L.save_lora(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        saved_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert s.adapter_bytes == saved_bytes == 4 * s.adapter_params


def test_the_table_groups_modules_by_suffix_and_settings():
    model = make_tiny_phi3()
    phi3.apply_lora(model, r=4, lora_alpha=16, use_rslora=True, qkv=("q", "v"), targets=("qkv_proj", "o_proj"))
    L.unload(model)
    L.inject_lora(model, ["qkv_proj"], r=4, lora_alpha=16, use_rslora=True, rank_pattern={r"model\.layers\.1\..*": 2},
                  merged_splits={"qkv_proj": (phi3.qkv_split_sizes(model.config), [True, False, True])})
    L.inject_lora(model, ["down_proj"], r=2, lora_alpha=2, use_dora=True)
    model.model.layers[0].mlp.down_proj.merge()
    text = str(L.summary(model))

    assert text.splitlines()[0] == "LoRA adapters on 4 modules:"
    assert "  qkv_proj ×1  MergedLinear  r=4  alpha=16  scaling=8  [rsLoRA, splits [64, 32, 32] on [1, 0, 1]]" in text
    assert "  qkv_proj ×1  MergedLinear  r=2  alpha=16  scaling=11.31" in text
    assert "  down_proj ×1  Linear  r=2  alpha=2  scaling=1  [DoRA, merged]" in text
    assert "  down_proj ×1  Linear  r=2  alpha=2  scaling=1  [DoRA]" in text
    s = L.summary(model)
    assert [m["name"] for m in s.modules] == [n for n, _ in L.lora_modules(model)]
    assert s.as_dict()["modules"][0] == {"name": "model.layers.0.self_attn.qkv_proj", "class": "MergedLinear",
                                         "r": 4, "lora_alpha": 16, "scaling": 8.0,
                                         "variants": ["rsLoRA", "splits [64, 32, 32] on [1, 0, 1]"]}


def test_identical_modules_collapse_to_one_line_and_shared_parameters_count_once():
    model = make_tiny_phi3()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: one Parameter under two names
    phi3.apply_lora(model, r=4, lora_alpha=8)
    s = L.summary(model)
    text = str(s)
    assert "  qkv_proj ×2  MergedLinear  r=4  alpha=8  scaling=2  [splits [64, 32, 32] on [1, 1, 1]]" in text
    assert "  o_proj ×2  Linear  r=4  alpha=8  scaling=2\n" in text
    unique = {id(p): p.numel() for p in model.parameters()}
    assert s.total_params == sum(unique.values()) < sum(p.numel() for p in model.state_dict().values())


def test_a_model_without_adapters_and_a_conv_in_loralib_layout():
    plain = nn.Sequential(nn.Linear(3, 3))
    s = L.summary(plain)
    assert (s.adapter_params, s.adapter_bytes, s.trainable_params, s.total_params) == (0, 0, 12, 12)
    assert str(s).splitlines()[0] == "LoRA adapters on 0 modules:"

    conv = nn.Sequential(L.Conv2d(2, 4, 3, r=2, lora_alpha=4, layout="loralib", lora_dtype=torch.float64))
    s = L.summary(conv)
    assert s.adapter_bytes == 8 * (2 * 3 * 2 * 3 + 4 * 3 * 2 * 3)  # loralib's (r·k, in·k) and (out·k, r·k)
    assert "  0 ×1  Conv2d  r=2  alpha=4  scaling=2  [layout=loralib]" in str(s)


def test_a_bitsandbytes_4bit_weight_counts_its_logical_elements():
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(nn.Linear(128, 64).state_dict())
    model = nn.Sequential(q.to("cpu"))  # bitsandbytes quantizes on the move
    assert model[0].weight.numel() < 128 * 64  # packed: what a plain numel sum would count
    L.inject_lora(model, ["0"], r=4)
    s = L.summary(model)
    assert s.total_params == 128 * 64 + 64 + 4 * (128 + 64)
    assert s.trainable_params == s.adapter_params == 4 * (128 + 64)
    assert "  0 ×1  Linear  r=4  alpha=16  scaling=4  [quantized base (bnb-4bit)]" in str(s)


def test_summary_lives_in_the_model_tier_and_keeps_its_old_paths():
    """It reads a model, not files (issue #21): lora_layers.model.overview holds it; the top level,
    lora_layers.model and the old module path lora_layers.adapters give the same objects."""
    import importlib

    import lora_layers.adapters
    import lora_layers.io
    import lora_layers.model

    module = importlib.import_module("lora_layers.model.overview")
    for obj in (module.summary, module.AdapterSummary):
        assert obj.__module__ == "lora_layers.model.overview"
        assert getattr(L, obj.__name__) is obj
        assert getattr(lora_layers.model, obj.__name__) is obj
        assert getattr(lora_layers.adapters, obj.__name__) is obj
    assert {"summary", "AdapterSummary"} <= set(lora_layers.model.__all__)
    # The io tier's contract does not list them; the old module's __all__ still does, for its star import.
    assert not {"summary", "AdapterSummary"} & set(lora_layers.io.__all__)
    assert {"summary", "AdapterSummary"} <= set(lora_layers.adapters.__all__)
