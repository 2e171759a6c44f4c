"""Tied weights: a LoRA layer whose weight another module also holds never merges.

``eval()`` keeps it unmerged (outputs exact, the shared weight bit-identical),
and every explicit merge (``merge()``, ``merge_lora``, ``merge_and_unload``,
``merged_state_dict``) refuses with an error that names the tie. Ties are seen
whether they exist before surgery or are made later by assignment, in either
direction.
"""
import pytest
import torch
import torch.nn as nn

import lora_layers as L
from _naive_lora import bit_equal
from conftest import make_tiny_phi3, restored

V, D = 11, 6


class TinyLM(nn.Module):
    def __init__(self, emb=None, head=None):
        super().__init__()
        self.embed_tokens = emb if emb is not None else nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.lm_head = head if head is not None else nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.mix(self.embed_tokens(ids))))


def _randomise(model):
    with torch.no_grad():
        for name, p in L.named_lora_parameters(model):
            p.copy_(torch.randn_like(p))


def _check_never_merged(model, ids, adapted):
    shared = model.embed_tokens.weight
    w0 = shared.detach().clone()
    model.train()
    y_train = model(ids)
    model.eval()
    assert not any(m.merged for m in adapted)
    torch.testing.assert_close(model(ids), y_train, rtol=0, atol=0)
    model.train()
    assert bit_equal(shared, w0)
    for fn in (L.merge_lora, L.merge_and_unload, L.merged_state_dict):
        with pytest.raises(ValueError, match="tied|shared|also") as info:
            fn(model)
        assert "lm_head" in str(info.value) or "embed_tokens" in str(info.value)
        assert bit_equal(shared, w0) and not any(m.merged for m in adapted)
    for m in adapted:
        with pytest.raises(ValueError, match="cannot merge"):
            m.merge()
    torch.testing.assert_close(model(ids), y_train, rtol=0, atol=0)


@pytest.mark.parametrize("targets", [["lm_head"], ["embed_tokens"], ["lm_head", "embed_tokens"]])
def test_surgery_on_a_tied_model(targets):
    torch.manual_seed(0)
    model = TinyLM()
    L.inject_lora(model, targets, r=2, lora_alpha=4)
    _randomise(model)
    _check_never_merged(model, torch.randint(0, V, (3, 5)), [m for _, m in L.lora_modules(model)])


def test_tie_made_by_assigning_to_a_lora_layer():
    torch.manual_seed(0)
    model = TinyLM(head=L.Linear(D, V, r=2, lora_alpha=4, bias=False))
    assert model.lm_head.weight is model.embed_tokens.weight
    _randomise(model)
    _check_never_merged(model, torch.randint(0, V, (3, 5)), [model.lm_head])


def test_tie_made_by_assigning_a_lora_layers_weight_elsewhere():
    torch.manual_seed(0)
    model = TinyLM(emb=L.Embedding(V, D, r=2, lora_alpha=4))  # the plain head takes the LoRA layer's weight
    _randomise(model)
    _check_never_merged(model, torch.randint(0, V, (3, 5)), [model.embed_tokens])


def test_untied_layer_merges_again_after_a_rescan():
    torch.manual_seed(0)
    model = TinyLM(head=L.Linear(D, V, r=2, lora_alpha=4, bias=False))
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    L.mark_only_lora_as_trainable(model)  # a model-level call rescans
    _randomise(model)
    ids = torch.randint(0, V, (3, 5))
    y = model.train()(ids)
    model.eval()
    assert model.lm_head.merged
    torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-5)


def test_fresh_weights_from_load_state_dict_assign_are_not_a_tie():
    torch.manual_seed(0)
    layer = L.Linear(4, 3, r=2)
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    assert layer.merged


def test_tied_phi3_lm_head_and_embeddings():
    model = make_tiny_phi3()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    L.phi3.apply_lora(model, r=2, lora_alpha=4, lora_dropout=0.0)
    L.inject_lora(model, ["lm_head", "embed_tokens"], r=2, lora_alpha=4, lora_dropout=0.0)
    _randomise(model)
    ids = torch.randint(0, 128, (2, 7))
    shared = model.lm_head.weight
    w0 = shared.detach().clone()
    logits = model.train()(ids).logits
    model.eval()
    assert model.model.layers[0].self_attn.qkv_proj.merged  # untied layers still merge
    assert not model.lm_head.merged and not model.model.embed_tokens.merged
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    model.train()
    assert bit_equal(shared, w0)
    with pytest.raises(ValueError, match="lm_head|embed_tokens"):
        L.merge_and_unload(model)
    assert isinstance(model.lm_head, L.Linear) and bit_equal(shared, w0)


# -- ties seen without a model-level call -------------------------------------------------------

@pytest.mark.parametrize("which", ["lm_head", "embed_tokens"])
def test_tie_made_before_from_module_is_seen_by_a_plain_eval(which):
    torch.manual_seed(0)
    model = TinyLM()  # tied before wrapping, as a loaded model is
    if which == "lm_head":
        model.lm_head = L.Linear.from_module(model.lm_head, r=2, lora_alpha=4)
    else:
        model.embed_tokens = L.Embedding.from_module(model.embed_tokens, r=2, lora_alpha=4)
    layer = getattr(model, which)
    _randomise(model)
    ids = torch.randint(0, V, (3, 5))
    w0 = model.embed_tokens.weight.detach().clone()
    y_train = model.train()(ids)
    model.eval()  # no model-level call in between
    assert not layer.merged
    torch.testing.assert_close(model(ids), y_train, rtol=0, atol=0)
    assert bit_equal(model.embed_tokens.weight, w0)
    with pytest.raises(ValueError, match="cannot merge"):
        layer.merge()


def test_one_base_module_wrapped_twice_never_merges():
    torch.manual_seed(0)
    base = nn.Linear(6, 6)
    a = L.Linear.from_module(base, r=2, lora_alpha=4)
    b = L.Linear.from_module(base, r=2, lora_alpha=4)
    for m in (a, b):
        nn.init.normal_(m.lora_B)
    x = torch.randn(3, 6)
    ya, yb, w0 = a(x), b(x), base.weight.detach().clone()
    a.eval()
    assert not a.merged
    torch.testing.assert_close(a(x), ya, rtol=0, atol=0)
    torch.testing.assert_close(b(x), yb, rtol=0, atol=0)  # the other holder is unchanged
    assert bit_equal(base.weight, w0)
    # a model-level rescan of one model keeps the mark: the other model's layer still holds the weight
    m1, m2 = nn.Sequential(a.train()), nn.Sequential(b)
    L.mark_only_lora_as_trainable(m1)
    L.mark_only_lora_as_trainable(m2)
    m1.eval()
    assert not a.merged
    torch.testing.assert_close(b(x), yb, rtol=0, atol=0)
    assert bit_equal(base.weight, w0)
    with pytest.raises(ValueError, match="also"):
        L.merge_lora(m1)


def test_single_wrap_of_an_untied_module_still_merges():
    torch.manual_seed(0)
    layer = L.Linear.from_module(nn.Linear(6, 6), r=2, lora_alpha=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    y = layer(x)
    layer.eval()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.load"])
def test_tie_made_after_restoring_a_layer_is_seen(how):
    torch.manual_seed(0)
    head = L.Linear(D, V, r=2, lora_alpha=4, bias=False)
    nn.init.normal_(head.lora_B)
    head = restored(head, how)
    emb = nn.Embedding(V, D)
    emb.weight = head.weight  # tie made after the restore
    ids = torch.arange(V)
    e0, x = emb(ids).detach().clone(), torch.randn(3, D)
    y = head(x)
    head.eval()
    assert not head.merged
    torch.testing.assert_close(head(x), y, rtol=0, atol=0)
    assert bit_equal(emb(ids), e0)
