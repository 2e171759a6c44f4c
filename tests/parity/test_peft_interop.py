"""PEFT interop on a tiny Phi-3: export -> PeftModel.from_pretrained, PEFT adapter -> import_peft."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers.checkpoint import CheckpointError
from lora_layers.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_peft, import_peft

from conftest import make_tiny_phi3

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base():
    return make_tiny_phi3(gqa=True)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(params, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def qkv_splits(model):
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    return [c.num_attention_heads * d, c.num_key_value_heads * d, c.num_key_value_heads * d]


def inject(model, kind, rslora=False):
    """lora_layers adapters on Phi-3: plain Linear everywhere, or MergedLinear qkv/gate_up (GQA splits)."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if kind == "linear":
            attn.qkv_proj = L.Linear.from_module(attn.qkv_proj, r=4, lora_alpha=8, use_rslora=rslora)
            mlp.gate_up_proj = L.Linear.from_module(mlp.gate_up_proj, r=4, lora_alpha=8, use_rslora=rslora)
        else:
            enable = [True, True, True] if kind == "merged_qkv" else [True, False, True]
            attn.qkv_proj = L.MergedLinear.from_module(attn.qkv_proj, r=4, lora_alpha=8, enable_lora=enable,
                                                       split_sizes=qkv_splits(model), use_rslora=rslora)
            mlp.gate_up_proj = L.MergedLinear.from_module(mlp.gate_up_proj, r=4, lora_alpha=8,
                                                          enable_lora=[True, True], use_rslora=rslora)
        attn.o_proj = L.Linear.from_module(attn.o_proj, r=2, lora_alpha=6, use_rslora=rslora)
        mlp.down_proj = L.Linear.from_module(mlp.down_proj, r=4, lora_alpha=8, use_rslora=rslora)
    return model


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def assert_unchanged(model, before):
    sd, types, grads = before
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == grads
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("kind, rslora, merged", [
    ("linear", False, False),
    ("merged_qkv", False, True),     # GQA splits, all enabled, exported from a merged model
    ("merged_qv", True, False),      # q/v only, rsLoRA
])
def test_export_loads_in_peft_with_same_logits(base, tmp_path, kind, rslora, merged):
    model = inject(copy.deepcopy(base), kind, rslora)
    model.model.embed_tokens = L.Embedding.from_module(model.model.embed_tokens, r=3, lora_alpha=3,
                                                       use_rslora=rslora)
    randomize(L.lora_parameters(model))
    if merged:
        L.merge_lora(model)
    expected = logits(model)
    export_peft(model, tmp_path / "adapter", base_model_name_or_path="tiny-phi3")

    config = json.loads((tmp_path / "adapter" / PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is False and config["bias"] == "none"
    assert config["modules_to_save"] is None and config["use_rslora"] is rslora
    assert config["base_model_name_or_path"] == "tiny-phi3" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["down_proj", "embed_tokens", "gate_up_proj", "o_proj", "qkv_proj"]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter" / PEFT_WEIGHTS_NAME), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        qkv_B = f.get_tensor("base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight")
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in f.keys()
    if kind == "merged_qv":  # one rank-8 Linear adapter: B block-diagonal, k rows zero
        q, k, _ = qkv_splits(base)
        assert qkv_B.shape == (sum(qkv_splits(base)), 8)
        assert not qkv_B[q:q + k].any() and not qkv_B[:q, 4:].any() and not qkv_B[q + k:, :4].any()
        name = "model.layers.0.self_attn.qkv_proj"
        assert config["rank_pattern"].get(name, config["r"]) == 8
        assert config["alpha_pattern"].get(name, config["lora_alpha"]) == pytest.approx(8 * 2 ** 0.5)
        assert config["rank_pattern"]["model.layers.0.self_attn.o_proj"] == 2

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(base), expected, atol=1e-3)  # the adapter matters


def test_export_conv_and_refuse_grouped_conv(tmp_path):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, (3, 2), stride=2, padding=1), nn.ReLU(), nn.Conv1d(4, 2, 1))
    ours = copy.deepcopy(plain)
    ours[0] = L.Conv2d.from_module(ours[0], r=2, lora_alpha=4)
    randomize(L.lora_parameters(ours))
    x = torch.randn(2, 3, 8, 8)
    flat = lambda m: m[2](m[1](m[0](x)).flatten(2))  # noqa: E731
    export_peft(ours, tmp_path / "conv", task_type=None)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "conv")).eval()
    with torch.no_grad():
        torch.testing.assert_close(flat(peft_model.base_model.model), flat(ours), rtol=0, atol=1e-5)
        back = copy.deepcopy(plain)
        assert import_peft(back, tmp_path / "conv") == ["0"]
        torch.testing.assert_close(flat(back), flat(ours), rtol=0, atol=1e-6)

    grouped = nn.Sequential(L.Conv2d(4, 4, 3, r=2, groups=2))
    with pytest.raises(NotImplementedError, match=r"'0' \(Conv2d\).*groups=2"):
        export_peft(grouped, tmp_path / "grouped")
    assert not (tmp_path / "grouped" / PEFT_CONFIG_NAME).exists()


def test_export_bad_destination_and_empty_model(base, tmp_path):
    model = inject(copy.deepcopy(base), "linear")
    with pytest.raises(FileNotFoundError, match="missing.*does not exist"):
        export_peft(model, tmp_path / "missing" / "adapter")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_peft(copy.deepcopy(base), tmp_path / "empty")


def test_full_names_when_leaf_name_is_ambiguous(base, tmp_path):
    model = copy.deepcopy(base)
    attn = model.model.layers[0].self_attn
    attn.o_proj = L.Linear.from_module(attn.o_proj, r=2, lora_alpha=2)  # layer 1's o_proj stays plain
    randomize(L.lora_parameters(model))
    export_peft(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / PEFT_CONFIG_NAME).read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.o_proj"]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    assert sum("lora_A" in n for n, _ in peft_model.named_parameters()) == 1
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- import

@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_trained_adapter(base, tmp_path, rslora):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=rslora, task_type="CAUSAL_LM",
        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens"],
        rank_pattern={"model.layers.1.mlp.down_proj": 2}, alpha_pattern={"o_proj": 3},
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    randomize([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=1)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = peft_model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    model = copy.deepcopy(base)
    loaded = import_peft(model, tmp_path / "peft")
    assert len(loaded) == 9 and "model.embed_tokens" in loaded
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, L.Linear) and down.r == 2 and down.lora_dropout.p == 0.1
    assert model.model.layers[0].self_attn.o_proj.lora_alpha == 3
    assert model.model.layers[0].self_attn.o_proj.use_rslora is rslora
    model.eval()
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["merged_qkv", "merged_qv"])
def test_round_trip_into_existing_merged_linear(base, tmp_path, kind):
    src = inject(copy.deepcopy(base), kind)
    randomize(L.lora_parameters(src), seed=2)
    export_peft(src, tmp_path / "a")
    dst = inject(copy.deepcopy(base), kind).eval()  # merged before the load
    import_peft(dst, tmp_path / "a")
    assert isinstance(dst.model.layers[0].self_attn.qkv_proj, L.MergedLinear)
    for (k, a), (_, b) in zip(L.named_lora_parameters(dst), L.named_lora_parameters(src)):
        assert torch.equal(a, b), k
    src.eval()
    assert torch.equal(logits(dst), logits(src))


def test_import_refuses_non_block_diagonal_into_merged_linear(base, tmp_path):
    src = inject(copy.deepcopy(base), "merged_qv")
    randomize(L.lora_parameters(src), seed=2)
    export_peft(src, tmp_path / "a")
    path = tmp_path / "a" / PEFT_WEIGHTS_NAME
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path))
    sd["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"][70, 0] = 1.0  # a k row
    save_file(sd, str(path), metadata={"format": "pt"})
    dst = inject(copy.deepcopy(base), "merged_qv")
    before = snapshot(dst)
    with pytest.raises(CheckpointError, match=r"qkv_proj.*not block-diagonal"):
        import_peft(dst, tmp_path / "a")
    assert_unchanged(dst, before)


def _write_adapter(folder, config=None, weights=None):
    folder.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["o_proj"], "bias": "none",
           "use_dora": False, "modules_to_save": None}
    cfg.update(config or {})
    if config is not None and config.get("drop_config"):
        cfg = None
    if cfg is not None:
        (folder / PEFT_CONFIG_NAME).write_text(json.dumps(cfg))
    key = "base_model.model.model.layers.0.self_attn.o_proj"
    sd = weights if weights is not None else {f"{key}.lora_A.weight": torch.randn(2, 64),
                                              f"{key}.lora_B.weight": torch.randn(64, 2)}
    from safetensors.torch import save_file
    save_file(sd, str(folder / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("config, weights, text", [
    ({"drop_config": True}, None, "adapter_config.json is missing"),
    ({"peft_type": "IA3"}, None, "peft_type is 'IA3', expected 'LORA'"),
    ({"use_dora": True}, None, "use_dora=true but there is no lora_magnitude_vector"),
    ({"use_dora": "yes"}, None, "use_dora='yes' is invalid"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save=['lm_head'] is not supported"),
    ({"bias": "all"}, None, "bias='all' is not supported"),
    ({}, {"model.layers.0.self_attn.o_proj.lora_A.weight": torch.randn(2, 64),
          "model.layers.0.self_attn.o_proj.lora_B.weight": torch.randn(64, 2)},
     "without the 'base_model.model.' prefix"),
    ({}, {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.randn(2, 64),  # valid
          "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight": torch.randn(64, 2),
          "model.layers.1.self_attn.o_proj.lora_A.weight": torch.randn(2, 64)},
     "without the 'base_model.model.' prefix"),
    ({}, {"base_model.model.model.layers.9.o_proj.lora_A.weight": torch.randn(2, 64),
          "base_model.model.model.layers.9.o_proj.lora_B.weight": torch.randn(64, 2)}, "no such module"),
    ({"r": 4}, None, "expected rank r=4"),
    ({}, {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.randn(2, 64),
          "base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector": torch.randn(64)},
     "needs exactly one A and one B tensor"),
    ({}, {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.randn(2, 64),
          "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight": torch.randn(64, 2),
          "base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector": torch.randn(64)},
     "but the config says use_dora=false"),
    ({}, {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.randn(2, 64),
          "base_model.model.model.layers.0.self_attn.o_proj.lora_C.weight": torch.randn(64, 2)},
     "not plain LoRA A/B tensors"),
])
def test_import_refusals_change_nothing(base, tmp_path, config, weights, text):
    folder = _write_adapter(tmp_path / "bad", config, weights)
    model = copy.deepcopy(base)
    before = snapshot(model)
    exc = FileNotFoundError if "missing" in text else CheckpointError
    with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")) as info:
        import_peft(model, folder)
    assert str(folder) in str(info.value)
    assert_unchanged(model, before)


def test_import_bin_weights_only(base, tmp_path):
    folder = _write_adapter(tmp_path / "a")
    from safetensors.torch import load_file
    sd = load_file(str(folder / PEFT_WEIGHTS_NAME))
    (folder / PEFT_WEIGHTS_NAME).unlink()
    torch.save(sd, folder / "adapter_model.bin")
    model = copy.deepcopy(base)
    assert import_peft(model, folder) == ["model.layers.0.self_attn.o_proj"]
    assert torch.equal(model.model.layers[0].self_attn.o_proj.lora_B, sd[next(k for k in sd if "lora_B" in k)])


def test_import_fan_in_fan_out_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    peft_model = peft.get_peft_model(copy.deepcopy(gpt2), config)
    randomize([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=4)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
    peft_model.save_pretrained(str(tmp_path / "g"))
    model = copy.deepcopy(gpt2)
    assert len(import_peft(model, tmp_path / "g")) == 3
    assert model.transformer.h[0].attn.c_attn.fan_in_fan_out
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    # Unloading gives back GPT-2's own Conv1D layout, so the merged model saves
    # and reloads as a plain GPT-2 with the adapted logits.
    c_attn_weight = gpt2.transformer.h[0].attn.c_attn.weight
    L.merge_and_unload(model)
    c_attn = model.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "Conv1D" and c_attn.weight.shape == c_attn_weight.shape
    assert not hasattr(c_attn, "lora_A") and not hasattr(c_attn, "in_features")
    model.save_pretrained(str(tmp_path / "merged"))
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-4)


def test_import_refuses_a_transposed_lora_B(base, tmp_path):
    # Same element count, wrong layout: must not be silently reshaped.
    key = "base_model.model.model.layers.0.self_attn.o_proj"
    weights = {f"{key}.lora_A.weight": torch.randn(2, 64), f"{key}.lora_B.weight": torch.randn(2, 64)}
    folder = _write_adapter(tmp_path / "t", {"target_modules": ["o_proj"], "r": 2}, weights)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"lora_B shape mismatch, expected \(64, 2\), got \(2, 64\)"):
        import_peft(model, folder)
    assert_unchanged(model, before)


def test_import_refuses_a_changed_saved_embedding_weight(base, tmp_path):
    key = "base_model.model.model.embed_tokens"
    weights = {f"{key}.lora_embedding_A": torch.randn(2, 128), f"{key}.lora_embedding_B": torch.randn(64, 2),
               f"{key}.base_layer.weight": base.model.embed_tokens.weight.detach() + 1.0}
    folder = _write_adapter(tmp_path / "emb", {"target_modules": ["embed_tokens"]}, weights)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="replaces the base weight.*save_embedding_layers"):
        import_peft(model, folder)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- pattern keys (issue 11, item 4)

def _nested_issue_repro():
    """The issue's repro: "0" and "1.0" share the leaf name "0"; only their alphas differ."""
    return nn.Sequential(L.Linear(4, 4, r=2, lora_alpha=8), nn.Sequential(L.Linear(4, 4, r=2, lora_alpha=2)),
                         L.Linear(4, 4, r=2, lora_alpha=2))


def _nested_suffixes():
    """Different ranks and alphas; "1.0" is a suffix of "2.1.0", "0" of every "*.0"; the plain
    nn.Linear "2.0" and "1.1.1" end with the adapted names "0" and "1.1" ... so no list of names
    can target exactly the adapted modules."""
    return nn.Sequential(
        L.Linear(4, 4, r=2, lora_alpha=8),                                             # 0
        nn.Sequential(L.Linear(4, 4, r=4, lora_alpha=2),                               # 1.0
                      nn.Sequential(L.Linear(4, 4, r=3, lora_alpha=6), nn.Linear(4, 4))),  # 1.1.0, 1.1.1 plain
        nn.Sequential(nn.Linear(4, 4), nn.Sequential(L.Linear(4, 4, r=1, lora_alpha=3))),  # 2.0 plain, 2.1.0
        L.Linear(4, 4, r=2, lora_alpha=2),                                             # 3
    )


def _many_full_names():
    """24 adapted modules that need full names ("i.0"; the leaf "0" is also the container "0"),
    enough for PEFT to shorten its target list (MIN_TARGET_MODULES_FOR_OPTIMIZATION)."""
    return nn.Sequential(*[nn.Sequential(L.Linear(4, 4, r=1 + i % 3, lora_alpha=1 + i % 5), nn.Linear(4, 4))
                           for i in range(24)])


def _plain_copy(model):
    """The base model PEFT loads on: every lora_layers layer back to a plain nn.Linear, same weights."""
    base = copy.deepcopy(model)
    for name, m in list(L.lora_modules(base)):
        plain = nn.Linear(m.in_features, m.out_features)
        plain.load_state_dict({"weight": m.weight.detach(), "bias": m.bias.detach()})
        parent, _, leaf = name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, leaf, plain)
    return base


def _peft_lora_modules(peft_model):
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("build", [_nested_issue_repro, _nested_suffixes, _many_full_names])
def test_export_patterns_and_targets_hit_exactly_the_adapted_modules(tmp_path, build):
    torch.manual_seed(0)
    model = build()
    randomize(L.lora_parameters(model), seed=5, std=0.5)
    base = _plain_copy(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = model(x)
    export_peft(model, tmp_path / "a", task_type=None)

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    wrapped = _peft_lora_modules(peft_model)
    ours = dict(L.lora_modules(model))
    assert sorted(wrapped) == sorted(ours)  # no extra module wrapped, none missing
    for name, m in wrapped.items():
        assert (m.r["default"], m.scaling["default"]) == (ours[name].r, ours[name].scaling), name
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), expected, rtol=0, atol=1e-5)
        assert not torch.allclose(base(x), expected, atol=1e-3)  # the adapters matter

    back = copy.deepcopy(base)
    assert import_peft(back, tmp_path / "a") == sorted(ours)
    for name, m in L.lora_modules(back):
        assert (m.r, m.lora_alpha) == (ours[name].r, ours[name].lora_alpha), name
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, rtol=0, atol=1e-6)


def test_import_pattern_lookup_agrees_with_peft():
    """import_peft resolves rank/alpha_pattern exactly as PEFT's get_pattern_key (first matching key
    in order, the key a regex matched as ``(.*\\.)?(key)$``, else an exact-name lookup)."""
    from peft.utils.other import get_pattern_key
    from lora_layers.peft_format import _peft_pattern_value

    names = ["0", "1.0", "2.1.0", "10", "a.0b", "model.layers.0.self_attn.o_proj",
             "model.layers.10.self_attn.o_proj", "o_proj", "x+y", "lm_head"]
    patterns = [
        {"0": 1}, {"^0": 1}, {"1.0": 2}, {r"^1\.0": 2}, {"o_proj": 3}, {"layers.1.*o_proj": 4},
        {"0": 1, "1.0": 2}, {"1.0": 2, "0": 1}, {"x+y": 5}, {r"x\+y": 6}, {"self_attn.o_proj": 7, "o_proj": 8},
        {"model.layers.0.self_attn.o_proj": 9}, {".*": 10}, {"": 11},
    ]
    for pattern in patterns:
        for name in names:
            want = pattern.get(get_pattern_key(pattern.keys(), name), -1)
            assert _peft_pattern_value(pattern, name, -1) == want, (pattern, name)


# ----------------------------------------------------------------------------- config options (issue 11, items 5 and 15)

@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_import_refuses_real_adapters_that_transform_the_base(base, tmp_path, init):
    """PiSSA and OLoRA move the initial adapter out of the base weight; PEFT redoes that on load."""
    config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=init, target_modules=["o_proj", "down_proj"])
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(str(tmp_path / init))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / init))
    o_proj = loaded.base_model.model.model.layers[0].self_attn.o_proj.base_layer
    assert not torch.equal(o_proj.weight, base.model.layers[0].self_attn.o_proj.weight)  # why it is refused

    assert_config_refused(base, tmp_path / init, f"init_lora_weights='{init}' is not supported.*base weight")


@pytest.mark.parametrize("config, text", [
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' is not supported"),
    ({"init_lora_weights": "corda", "corda_config": {"corda_method": "kpm"}}, "init_lora_weights='corda'"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}},
     "init_lora_weights='loftq'.*quantized"),
    ({"init_lora_weights": "lora_ga"}, "init_lora_weights='lora_ga'"),
    ({"init_lora_weights": "mica"}, "init_lora_weights='mica'.*frozen"),
    ({"init_lora_weights": "future_init"}, "init_lora_weights='future_init'"),
    ({"init_lora_weights": 1}, "init_lora_weights=1"),
    ({"lora_bias": True}, "lora_bias=True is not supported"),
    ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters="),
    ({"trainable_token_indices": [5, 6]}, r"trainable_token_indices=\[5, 6\]"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication="),
    ({"alora_invocation_tokens": [7, 8]}, "alora_invocation_tokens="),
    ({"use_qalora": True}, "use_qalora=True"),
    ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config="),
    ({"velora_config": {"rank": 1}}, "velora_config="),
    ({"monteclora_config": {"n_samples": 4}}, "monteclora_config="),
    ({"use_bdlora": {"lora_a_is_blockdiagonal": ["o_proj"]}}, "use_bdlora="),
    ({"arrow_config": {"top_k": 2}}, "arrow_config="),
    ({"kasa_config": {"beta": 0.1}}, "kasa_config="),
    ({"ensure_weight_tying": True}, "ensure_weight_tying=True"),
    ({"lora_future_option": {"mode": "x"}}, r"lora_future_option=\{'mode': 'x'\}.*unknown"),
    ({"lora_future_flag": True}, "lora_future_flag=True.*unknown"),
    ({"lora_future_scale": 0.5}, "lora_future_scale=0.5.*unknown"),
])
def test_import_refuses_options_it_does_not_implement(base, tmp_path, config, text):
    assert_config_refused(base, _write_adapter(tmp_path / "opt", config), text)


def assert_config_refused(base, folder, text):
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=text) as info:
        import_peft(model, folder)
    assert str(folder) in str(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("config", [
    {"init_lora_weights": True}, {"init_lora_weights": False}, {"init_lora_weights": "gaussian"},
    {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}}, {"init_lora_weights": "orthogonal"},
    {"loftq_config": {"loftq_bits": 4}}, {"corda_config": None}, {"lora_ga_config": None},  # ignored by PEFT
    {"task_type": "CAUSAL_LM", "inference_mode": False, "revision": "main", "peft_version": "0.21.2",
     "auto_mapping": None, "base_model_name_or_path": "tiny", "megatron_core": "megatron.core",
     "qalora_group_size": 32, "runtime_config": {"ephemeral_gpu_offload": False}},
    {"target_modules": "model.*o_proj", "exclude_modules": ["lm_head"]},
    {"target_modules": ["o_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
    {"use_dora": False, "lora_bias": False, "modules_to_save": [], "target_parameters": None, "use_qalora": False,
     "layer_replication": None, "ensure_weight_tying": False, "kasa_config": None, "use_bdlora": None},
    {"lora_future_option": None, "lora_future_flag": False, "lora_future_list": [], "lora_future_dict": {}},
    {"rank_pattern": None, "alpha_pattern": None, "lora_dropout": 0, "use_rslora": False, "fan_in_fan_out": False},
])
def test_import_accepts_options_harmless_for_loading(base, tmp_path, config):
    folder = _write_adapter(tmp_path / "ok", config)
    model = copy.deepcopy(base)
    assert import_peft(model, folder) == ["model.layers.0.self_attn.o_proj"]
    assert model.model.layers[0].self_attn.o_proj.scaling == 2.0


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("config, text", [
    ({"r": 2.5}, r"r=2\.5 .*expected a positive integer"),
    ({"r": 2.0}, r"r=2\.0 .*expected a positive integer"),
    ({"r": 0}, "r=0 .*expected a positive integer"),
    ({"r": -2}, "r=-2 .*expected a positive integer"),
    ({"r": "2"}, "r='2' .*expected a positive integer"),
    ({"r": True}, "r=True .*expected a positive integer"),
    ({"r": None}, "r=None .*expected a positive integer"),
    ({"lora_alpha": "4"}, "lora_alpha='4' .*expected a finite number"),
    ({"lora_alpha": NAN}, "lora_alpha=nan .*expected a finite number"),
    ({"lora_alpha": INF}, "lora_alpha=inf .*expected a finite number"),
    ({"lora_alpha": True}, "lora_alpha=True .*expected a finite number"),
    ({"rank_pattern": {"o_proj": 2.5}}, r"rank_pattern\['o_proj'\]=2\.5 .*expected a positive integer"),
    ({"rank_pattern": {"o_proj": 0}}, r"rank_pattern\['o_proj'\]=0 .*expected a positive integer"),
    ({"rank_pattern": ["o_proj"]}, r"rank_pattern=\['o_proj'\] .*expected an object"),
    ({"rank_pattern": {"o_proj(": 2}}, r"rank_pattern key 'o_proj\(' .*not a valid regular expression"),
    ({"alpha_pattern": {"o_proj": "x"}}, r"alpha_pattern\['o_proj'\]='x' .*expected a finite number"),
    ({"alpha_pattern": {"o_proj": NAN}}, r"alpha_pattern\['o_proj'\]=nan .*expected a finite number"),
    ({"use_rslora": "yes"}, "use_rslora='yes' .*expected true or false"),
    ({"use_rslora": 1}, "use_rslora=1 .*expected true or false"),
    ({"fan_in_fan_out": None}, "fan_in_fan_out=None .*expected true or false"),
    ({"lora_dropout": 1.0}, r"lora_dropout=1\.0 .*expected a number in \[0, 1\)"),
    ({"lora_dropout": -0.1}, r"lora_dropout=-0\.1 .*expected a number in \[0, 1\)"),
    ({"lora_dropout": "0.1"}, r"lora_dropout='0\.1' .*expected a number in \[0, 1\)"),
    ({"lora_dropout": NAN}, r"lora_dropout=nan .*expected a number in \[0, 1\)"),
])
def test_import_validates_config_values(base, tmp_path, config, text):
    assert_config_refused(base, _write_adapter(tmp_path / "val", config), text)


def test_import_reports_every_config_problem_at_once(base, tmp_path):
    folder = _write_adapter(tmp_path / "many", {"r": 2.5, "init_lora_weights": "pissa", "lora_future_flag": True})
    with pytest.raises(CheckpointError) as info:
        import_peft(copy.deepcopy(base), folder)
    for text in ("r=2.5", "init_lora_weights='pissa'", "lora_future_flag=True"):
        assert text in str(info.value)


def test_every_lora_config_field_is_classified():
    """Each field of the installed PEFT's LoraConfig is implemented, harmless or refused; a new
    field shows up here (until classified it is refused whenever set, as an unknown option)."""
    import dataclasses
    from lora_layers import peft_format as pf
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    groups = (pf._IMPLEMENTED, pf._HARMLESS, set(pf._REFUSED))
    assert sum(len(g) for g in groups) == len(set().union(*groups))  # disjoint
    assert fields == set().union(*groups)


@pytest.mark.parametrize("bad, exc", [("", ValueError), (None, TypeError), (3, TypeError),
                                      ("/nonexistent/folder", FileNotFoundError)])
def test_export_refuses_a_bad_folder_before_writing(tmp_path, bad, exc):
    model = nn.Sequential(L.Linear(4, 4, r=2))
    with pytest.raises(exc, match="out_dir"):
        L.export_peft(model, bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="out_dir=.*file.*expected a folder"):
        L.export_peft(model, tmp_path / "file")


def test_a_failed_export_leaves_no_half_written_folder(tmp_path, monkeypatch):
    import lora_layers.peft_format as pf

    calls = []

    def failing_write(path, write, what="file", arg="path"):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, write, what, arg)

    real = pf.atomic_write
    monkeypatch.setattr(pf, "atomic_write", failing_write)
    with pytest.raises(OSError, match="No space"):
        L.export_peft(nn.Sequential(L.Linear(4, 4, r=2)), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ----------------------------------------------------------------------------- interrupted re-exports (issue #20 item 3)

def _two_exports(tmp_path):
    """An existing export (alpha 2) in ``adapter`` plus a README of the user's, and a model whose
    re-export (alpha 8, other weights) is about to be interrupted."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    old, new = copy.deepcopy(base), copy.deepcopy(base)
    old[0] = L.Linear.from_module(old[0], r=2, lora_alpha=2)
    new[0] = L.Linear.from_module(new[0], r=2, lora_alpha=8)
    randomize(L.lora_parameters(old), seed=1)
    randomize(L.lora_parameters(new), seed=2)
    folder = tmp_path / "adapter"
    export_peft(old, folder, task_type=None)
    (folder / "README.md").write_text("my notes")
    return base, old, new, folder


def _folder_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _peft_output(base, folder, x):
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()(x)


def test_an_export_failing_between_its_two_files_leaves_the_old_export(tmp_path, monkeypatch):
    import lora_layers.peft_format as pf

    base, old, new, folder = _two_exports(tmp_path)
    before = _folder_bytes(folder)
    real, calls = pf.atomic_write, []

    def fail_on_the_config(path, write, what="file", arg="path"):
        calls.append(path)
        if str(path).endswith(PEFT_CONFIG_NAME):
            raise OSError(28, "No space left on device")
        return real(path, write, what, arg)

    monkeypatch.setattr(pf, "atomic_write", fail_on_the_config)
    with pytest.raises(OSError, match="No space"):
        export_peft(new, folder, task_type=None)
    assert len(calls) == 2  # the weights were written, then the config failed
    assert _folder_bytes(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folder left
    x = torch.randn(4, 6)
    torch.testing.assert_close(_peft_output(base, folder, x), old(x), rtol=0, atol=1e-6)


_KILLED_EXPORT = """
import os, signal, sys, torch
import lora_layers as L
import lora_layers.peft_format as pf
model = torch.load(sys.argv[1], weights_only=False)
real = pf.atomic_write
def write(path, *args, **kwargs):
    if str(path).endswith(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args, **kwargs)
pf.atomic_write = write
L.export_peft(model, sys.argv[2], task_type=None)
"""


@pytest.mark.parametrize("killed_at", [PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME])
def test_a_killed_re_export_leaves_the_old_export(tmp_path, killed_at):
    import signal
    import subprocess
    import sys

    base, old, new, folder = _two_exports(tmp_path)
    before = _folder_bytes(folder)
    torch.save(new, tmp_path / "new.pt")
    proc = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(tmp_path / "new.pt"), str(folder), killed_at],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _folder_bytes(folder) == before
    x = torch.randn(4, 6)
    torch.testing.assert_close(_peft_output(base, folder, x), old(x), rtol=0, atol=1e-6)
    export_peft(new, folder, task_type=None)  # the next export succeeds, keeps the README, loads as new
    assert (folder / "README.md").read_text() == "my notes"
    torch.testing.assert_close(_peft_output(base, folder, x), new(x), rtol=0, atol=1e-6)


def test_a_re_export_replaces_a_stale_bin_and_keeps_unrelated_files(tmp_path):
    base, old, new, folder = _two_exports(tmp_path)
    (folder / "adapter_model.bin").write_bytes(b"stale weights of another export")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    export_peft(new, folder, task_type=None)
    assert sorted(p.name for p in folder.iterdir()) == sorted([PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, "README.md",
                                                                "tokenizer"])
    assert (folder / "tokenizer" / "vocab.json").read_text() == "{}"
    x = torch.randn(4, 6)
    torch.testing.assert_close(_peft_output(base, folder, x), new(x), rtol=0, atol=1e-6)


_EXPORT_LOOP = """
import os, sys, torch
import lora_layers as L
models = [torch.load(p, weights_only=False) for p in sys.argv[1:3]]
folder, stop = sys.argv[3], sys.argv[4]
print("ready", flush=True)
i = 0
while not os.path.exists(stop):
    L.export_peft(models[i % 2], folder, task_type=None)
    i += 1
"""


def test_import_peft_racing_re_exports_loads_one_whole_export(tmp_path):
    import subprocess
    import sys
    import time

    base, old, new, folder = _two_exports(tmp_path)
    torch.save(old, tmp_path / "old.pt")
    torch.save(new, tmp_path / "new.pt")
    stop, x = tmp_path / "stop", torch.randn(4, 6)
    expected = {"old": old(x).detach(), "new": new(x).detach()}
    writer = subprocess.Popen([sys.executable, "-c", _EXPORT_LOOP, str(tmp_path / "old.pt"), str(tmp_path / "new.pt"),
                               str(folder), str(stop)], stdout=subprocess.PIPE, text=True)
    failures, seen, loads = [], set(), 0
    try:
        assert writer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            model = copy.deepcopy(base)
            try:
                import_peft(model, folder)
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            loads += 1
            with torch.no_grad():
                got = model(x)
            match = [k for k, v in expected.items() if torch.allclose(got, v, rtol=0, atol=1e-6)]
            seen.update(match)
            if not match:
                failures.append("one export's config with the other's weights")
    finally:
        stop.touch()
        writer.wait(timeout=60)
    assert failures == [] and loads > 20 and seen == {"old", "new"}, (failures[:3], loads, seen)


# ----------------------------------------------------------------------------- task_type (issue #20 item 13)

def test_a_plain_module_exports_without_a_task_type_and_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    model = copy.deepcopy(base)
    model[2] = L.Linear.from_module(model[2], r=2, lora_alpha=4)
    randomize(L.lora_parameters(model))
    export_peft(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / PEFT_CONFIG_NAME).read_text())["task_type"] is None
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    assert type(peft_model) is peft.PeftModel
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model(x), rtol=0, atol=1e-6)


def test_a_causal_lm_exports_as_causal_lm_and_generates_in_peft(base, tmp_path):
    model = inject(copy.deepcopy(base), "merged_qv")
    randomize(L.lora_parameters(model))
    export_peft(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / PEFT_CONFIG_NAME).read_text())["task_type"] == "CAUSAL_LM"
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    assert isinstance(peft_model, peft.PeftModelForCausalLM)
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=0, atol=1e-5)
    with torch.no_grad():
        ours = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
        theirs = peft_model.generate(input_ids=IDS[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, theirs)


def test_an_encoder_decoder_gets_no_causal_lm_task_type():
    transformers = pytest.importorskip("transformers")
    from lora_layers.peft_format import _infer_task_type

    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2))
    assert _infer_task_type(t5) is None and _infer_task_type(gpt2) == "CAUSAL_LM"
    assert _infer_task_type(gpt2.transformer) is None  # the bare decoder does not generate


def test_task_type_override_is_written_and_validated(tmp_path):
    model = nn.Sequential(L.Linear(4, 4, r=2))
    export_peft(model, tmp_path / "a", task_type="FEATURE_EXTRACTION")
    assert json.loads((tmp_path / "a" / PEFT_CONFIG_NAME).read_text())["task_type"] == "FEATURE_EXTRACTION"
    export_peft(model, tmp_path / "b", task_type=peft.TaskType.SEQ_CLS)  # PEFT's enum is written as its string
    assert json.loads((tmp_path / "b" / PEFT_CONFIG_NAME).read_text())["task_type"] == "SEQ_CLS"
    before = _folder_bytes(tmp_path / "a")
    for bad in ("causal_lm", "CAUSAL-LM", 3):
        with pytest.raises(ValueError, match=rf"task_type must be 'auto', None or one of PEFT's task types "
                                             rf"\['SEQ_CLS', .*'CAUSAL_LM', .*\], got {bad!r}"):
            export_peft(model, tmp_path / "a", task_type=bad)
    assert _folder_bytes(tmp_path / "a") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
