"""inject_lora / merge_and_unload / unload on tiny Phi-3 models and a non-HF toy model.

References are independent of the library: a deepcopy of the original model
with ``W + s·ΔW`` written into its weights in float64 by hand.
"""
import copy

import pytest
import torch
import torch.nn as nn
from _model_checks import IDS, assert_unchanged, logits, randomize_adapters, snapshot
from conftest import make_tiny_phi3

import lora_layers as L
from lora_layers.layers import Conv2d, Embedding, Linear, LoRALayer, MergedLinear
from lora_layers.surgery import inject_lora, merge_and_unload, unload
from lora_layers.utils import lora_modules


def module(model, name):
    return model.get_submodule(name)


# ----------------------------------------------------------------------------- injection

@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_inject_shares_parameters_and_keeps_logits_exactly(gqa):
    model = make_tiny_phi3(gqa=gqa)
    reference = copy.deepcopy(model)
    before = dict(model.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in before.items()}
    expected_logits = logits(reference)

    names = inject_lora(model, ["qkv_proj", "down_proj"], r=4)

    assert names == [f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.qkv_proj", "mlp.down_proj")]
    for name in names:
        assert type(module(model, name)) is Linear
    after = dict(model.named_parameters())
    for n, p in before.items():  # every original Parameter is still there, same object, same storage
        assert after[n] is p and p.data_ptr() == ptrs[n], n
    assert {n for n, p in after.items() if p.requires_grad} == {
        f"{name}.{ab}" for name in names for ab in ("lora_A", "lora_B")}
    assert torch.equal(logits(model), expected_logits)  # B = 0: unmerged path
    model.eval()  # merges
    assert all(m.merged for _, m in lora_modules(model))
    assert torch.equal(logits(model), expected_logits)


@pytest.mark.parametrize("targets, exclude, expected", [
    (["model.layers.1.self_attn.o_proj"], None, ["model.layers.1.self_attn.o_proj"]),
    (["self_attn.o_proj", "embed_tokens"], None,
     ["model.embed_tokens", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
    (r"model\.layers\.\d+\.mlp\.(gate_up|down)_proj", ["layers.0.mlp.down_proj"],
     ["model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj", "model.layers.1.mlp.down_proj"]),
    ("all-linear", None, [f"model.layers.{i}.{s}" for i in range(2) for s in
                          ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")]),
    ("all-linear", r".*\.layers\.0\..*", [f"model.layers.1.{s}" for s in
                                          ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj",
                                           "mlp.down_proj")]),
])
def test_target_and_exclude_forms(targets, exclude, expected):
    model = make_tiny_phi3()
    assert inject_lora(model, targets, exclude=exclude) == expected
    assert {n for n, _ in lora_modules(model)} == set(expected)
    assert type(model.lm_head) is nn.Linear  # the head is never picked by "all-linear"


def test_all_linear_on_bare_model_and_custom_head_name():
    phi = make_tiny_phi3()
    names = inject_lora(phi.model, "all-linear")  # bare Phi3Model: no head at all
    assert len(names) == 8 and all(n.startswith("layers.") for n in names)

    class Net(nn.Module):  # no get_output_embeddings: the module named lm_head is the head
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 3)

    assert inject_lora(Net(), "all-linear") == ["body"]


def test_rank_alpha_patterns_and_rslora():
    model = make_tiny_phi3()
    inject_lora(model, "all-linear", r=8, lora_alpha=16,
                rank_pattern={"qkv_proj": 4, r"model\.layers\.1\.mlp\..*": 2},
                alpha_pattern={"o_proj": 3.0, r"layers\.1\.mlp\.down_proj": 5})
    q0, o1 = module(model, "model.layers.0.self_attn.qkv_proj"), module(model, "model.layers.1.self_attn.o_proj")
    d0, d1 = module(model, "model.layers.0.mlp.down_proj"), module(model, "model.layers.1.mlp.down_proj")
    assert (q0.r, q0.lora_alpha, q0.lora_A.shape, q0.lora_B.shape) == (4, 16, (4, 64), (128, 4))
    assert (o1.r, o1.scaling) == (8, 3.0 / 8)
    assert (d0.r, d0.scaling) == (8, 2.0) and (d1.r, d1.scaling) == (2, 2.5)

    rs = make_tiny_phi3()
    inject_lora(rs, ["o_proj"], r=4, lora_alpha=8, use_rslora=True, lora_dtype=torch.float64)
    o = module(rs, "model.layers.0.self_attn.o_proj")
    assert o.scaling == 8 / 2 and o.lora_A.dtype == torch.float64 and o.weight.dtype == torch.float32


def test_merged_splits_make_merged_linear():
    model = make_tiny_phi3(gqa=True)
    inject_lora(model, ["qkv_proj", "o_proj"], r=2,
                merged_splits={"qkv_proj": ([64, 32, 32], [True, False, True])})
    qkv = module(model, "model.layers.0.self_attn.qkv_proj")
    assert type(qkv) is MergedLinear and qkv.split_sizes == [64, 32, 32]
    assert qkv.lora_A.shape == (4, 64) and qkv.lora_B.shape == (96, 2)
    assert type(module(model, "model.layers.0.self_attn.o_proj")) is Linear


class Toy(nn.Module):
    """A non-HF model with every supported layer type, one module shared by two parents."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.body = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
        self.conv = nn.Conv2d(1, 3, kernel_size=(2, 3), padding=1)
        self.alias = self.body[2]  # same module, second parent

    def forward(self, ids):
        h = self.body(self.emb(ids))  # (B, T, 6)
        return self.conv(h.unsqueeze(1))


def naive_patch(reference, lora_model):
    """Write W + s·ΔW (float64) into ``reference`` for every LoRA layer of ``lora_model``."""
    with torch.no_grad():
        for name, layer in lora_modules(lora_model):
            A, B = layer.lora_A.double(), layer.lora_B.double()
            W = module(reference, name).weight
            delta = B @ A
            if isinstance(layer, Embedding):
                delta = delta.t()
            W.copy_(W.double() + layer.scaling * delta.view(W.shape))


def test_toy_model_all_layer_types_against_naive_reference():
    torch.manual_seed(0)
    model = Toy()
    reference = copy.deepcopy(model)
    dict_keys = {n: set(m.__dict__) for n, m in model.named_modules()}
    ids = torch.randint(0, 20, (2, 5))
    base_out = reference(ids).detach()

    names = inject_lora(model, ["emb", "body.2", "conv"], r=2, lora_alpha=4)
    assert names == ["emb", "body.2", "conv"]  # the alias is reported once, by its first name
    assert type(model.emb) is Embedding and type(model.conv) is Conv2d and type(model.body[2]) is Linear
    assert model.alias is model.body[2]  # both parents now hold the same LoRA layer
    assert torch.equal(model(ids), base_out)

    randomize_adapters(model)
    naive_patch(reference, model)
    torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)

    plain = merge_and_unload(model)
    assert plain is model and type(model.emb) is nn.Embedding and type(model.conv) is nn.Conv2d
    assert type(model.body[2]) is nn.Linear and model.alias is model.body[2]
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == dict_keys
    torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)


def test_unsupported_subclass_and_root():
    mha = nn.MultiheadAttention(8, 2)  # out_proj is a Linear subclass read via .weight: never wrapped
    with pytest.raises(TypeError, match="cannot take a LoRA adapter"):
        inject_lora(mha, ["out_proj"])
    with pytest.raises(ValueError, match="match no module"):
        inject_lora(mha, "all-linear")
    layer = nn.Linear(3, 3)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="match no module"):  # the root itself is never replaced
        inject_lora(layer, r".*")
    assert_unchanged(layer, before)


# ----------------------------------------------------------------------------- errors change nothing

BAD_INPUTS = [
    (dict(targets=["nope"]), ValueError, "match no module"),
    (dict(targets=r".*\.nope"), ValueError, "match no module"),
    (dict(targets=r".*\.mlp"), TypeError, "cannot take a LoRA adapter"),
    (dict(targets=r".*(qkv_proj|activation_fn)"), TypeError, "activation_fn"),
    (dict(targets="(unclosed"), ValueError, "not a valid regular expression"),
    (dict(targets=[]), TypeError, "non-empty"),
    (dict(targets=None), TypeError, "targets"),
    (dict(targets=["qkv_proj", 3]), TypeError, "targets entries"),
    (dict(targets=["qkv_proj"], r=0), ValueError, "r must be a positive integer"),
    (dict(targets=["qkv_proj"], r=2.5), ValueError, "r must be"),
    (dict(targets=["qkv_proj"], lora_alpha=float("nan")), ValueError, "lora_alpha"),
    (dict(targets=["qkv_proj"], lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(targets=["qkv_proj"], backend="cuda"), ValueError, "backend"),
    (dict(targets=["qkv_proj"], lora_dtype=torch.int8), TypeError, "lora_dtype"),
    (dict(targets=["qkv_proj"], exclude=["nope"]), ValueError, "exclude"),
    (dict(targets=["qkv_proj"], exclude=["qkv_proj"]), ValueError, "leaves no module"),
    (dict(targets=["qkv_proj"], exclude="all-linear"), ValueError, "exclude"),
    (dict(targets="all-linear", rank_pattern={"nope": 4}), ValueError, "rank_pattern keys"),
    (dict(targets=["o_proj"], rank_pattern={"qkv_proj": 4}), ValueError, "rank_pattern keys"),
    (dict(targets="all-linear", rank_pattern={"qkv_proj": 0}), ValueError, "rank_pattern"),
    (dict(targets="all-linear", alpha_pattern={"nope": 4}), ValueError, "alpha_pattern keys"),
    (dict(targets="all-linear", alpha_pattern={"o_proj": "x"}), ValueError, "alpha_pattern"),
    (dict(targets="all-linear", rank_pattern=[("qkv_proj", 4)]), TypeError, "rank_pattern"),
    (dict(targets="all-linear", merged_splits={"nope": ([1], None)}), ValueError, "merged_splits keys"),
    (dict(targets="all-linear", merged_splits={"qkv_proj": [64]}), TypeError, "pair"),
    (dict(targets=["embed_tokens"], merged_splits={"embed_tokens": ([32, 32], None)}), TypeError, "MergedLinear"),
    # Built after o_proj/qkv_proj/gate_up_proj of layer 0: their frozen flags must be restored.
    (dict(targets="all-linear", merged_splits={"down_proj": ([10, 10], None)}), ValueError, "split_sizes"),
    (dict(targets="all-linear", merged_splits={"qkv_proj": ([64, 32, 32], [True, False])}), ValueError,
     "enable_lora"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_raises_and_changes_nothing(kwargs, exc, match):
    model = make_tiny_phi3()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        inject_lora(model, **kwargs)
    assert_unchanged(model, before)


def test_reinjection_raises_and_changes_nothing():
    model = make_tiny_phi3()
    inject_lora(model, ["qkv_proj"])
    before = snapshot(model)
    for targets in (["qkv_proj"], "all-linear", r".*\.layers\.0\..*_proj"):
        with pytest.raises(ValueError, match="already carry LoRA adapters"):
            inject_lora(model, targets)
        assert_unchanged(model, before)
    # Excluding the wrapped ones works, and adds adapters elsewhere only.
    assert len(inject_lora(model, "all-linear", exclude=["qkv_proj"])) == 6
    assert type(module(model, "model.layers.0.self_attn.qkv_proj")) is Linear


# ----------------------------------------------------------------------------- unloading

@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_merge_and_unload_saves_and_reloads_as_plain_phi3(tmp_path, gqa):
    from transformers import Phi3ForCausalLM

    model = make_tiny_phi3(gqa=gqa)
    keys = set(model.state_dict())
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    inject_lora(model, r".*\.(qkv_proj|o_proj|gate_up_proj|down_proj|embed_tokens)", r=4,
                merged_splits={"gate_up_proj": ([96, 96], [False, True])})
    randomize_adapters(model)
    model.train()
    expected = logits(model)  # unmerged forward

    assert merge_and_unload(model) is model
    assert not list(lora_modules(model)) and not any(isinstance(m, LoRALayer) for m in model.modules())
    assert type(model.model.layers[0].mlp.gate_up_proj) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    assert set(model.state_dict()) == keys
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # merged in place, no copy
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    reloaded, info = Phi3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(logits(reloaded.eval()), logits(model))


def test_unload_restores_original_weights_bitwise():
    model = make_tiny_phi3()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = logits(model)
    inject_lora(model, "all-linear", r=4)
    randomize_adapters(model)
    model.eval()  # merged: the weights now hold W + sBA
    assert not torch.equal(model.model.layers[0].self_attn.o_proj.weight, original[
        "model.layers.0.self_attn.o_proj.weight"])
    assert unload(model) is model
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    assert torch.equal(logits(model), base_logits)


def test_unload_on_a_single_layer_and_a_model_without_adapters():
    layer = Linear.from_module(nn.Linear(4, 3), r=2)
    plain = unload(layer)
    assert type(plain) is nn.Linear and plain.weight is layer.weight
    model = make_tiny_phi3()
    assert merge_and_unload(model) is model and unload(model) is model


def test_merge_and_unload_failure_changes_nothing():
    model = make_tiny_phi3()
    inject_lora(model, ["o_proj", "down_proj"], r=2)
    randomize_adapters(model)
    with torch.no_grad():  # the last layer's adapter overflows fp32 when merged
        module(model, "model.layers.1.mlp.down_proj").lora_B.fill_(3e38)
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        merge_and_unload(model, safe_merge=True)
    assert_unchanged(model, before)
    assert not any(m.merged for _, m in lora_modules(model))


def test_generate_runs_on_the_injected_model():
    model = make_tiny_phi3()
    reference = copy.deepcopy(model)
    inject_lora(model, "all-linear", r=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS[:, :4], **kwargs), reference.generate(IDS[:, :4], **kwargs))
    randomize_adapters(model)
    out = model.generate(IDS[:, :4], **kwargs)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], IDS[:, :4])


@pytest.mark.parametrize("fn", ["unload", "merge_and_unload"])
def test_unload_of_a_users_own_lora_layer_subclass_is_refused_by_name_and_changes_nothing(fn):
    """A loralib-style subclass over a bare nn.Module has no plain layer to return to: unload raised
    TypeError('Module.__init__() got an unexpected keyword argument device')."""
    class Mine(L.LoRALayer, nn.Module):
        def __init__(self):
            nn.Module.__init__(self)
            L.LoRALayer.__init__(self, r=2, lora_alpha=2, lora_dropout=0.0, merge_weights=False)
            self.weight = nn.Parameter(torch.randn(4, 4))
            self.lora_A = nn.Parameter(torch.randn(2, 4))
            self.lora_B = nn.Parameter(torch.randn(4, 2))

        def forward(self, x):
            return x @ (self.weight + self.lora_B @ self.lora_A).T

    model = nn.Sequential(Mine(), nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=f"{fn}: 0 is a Mine.*_base_type"):
        getattr(L, fn)(model)
    assert isinstance(model[0], Mine)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("settings, unknown", [(dict(r=0, rr=4), "rr"),
                                                (dict(lora_alpha=float("nan"), target_modules=["0"]), "target_modules"),
                                                (dict(use_dora="x", lora_droput=0.1), "lora_droput")])
def test_inject_lora_names_an_unknown_keyword_before_checking_the_values(settings, unknown):
    """As before LoRASpec (issue #21 review): Python refused a misspelt keyword before any value was checked,
    so the error names the typo, not a bad value beside it."""
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=rf"^inject_lora\(\) got an unexpected keyword argument '{unknown}'$"):
        inject_lora(model, ["0"], **settings)
    assert type(model[0]) is nn.Linear
