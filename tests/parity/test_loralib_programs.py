"""Programs written for loralib run unchanged with ``import lora_layers as lora``.

Each test is a pattern taken from public loralib code: a class of its own that
subclasses ``LoRALayer`` and calls its ``__init__``; adapters swapped for plain
tensors before the forward (intrinsic-dimension / subspace training,
``torch.func.functional_call``); ``model.eval(); model.state_dict()`` to export a
merged model (fish-speech's ``merge_lora.py``); subclasses that merge by themselves
(ColossalAI's ``LoraLinear``).
"""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_layers as L
from _naive_lora import F64, naive_linear

loralib = pytest.importorskip("loralib")


# ----------------------------------------------------------------------------- subclassing LoRALayer

def _custom_linear_class(lora):
    """A loralib-style layer of the user's own, written against ``lora`` (loralib or lora_layers)."""

    class CustomLoRALinear(nn.Linear, lora.LoRALayer):
        def __init__(self, in_features, out_features, r=0, lora_alpha=1, lora_dropout=0.0, merge_weights=True):
            nn.Linear.__init__(self, in_features, out_features)
            lora.LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                    merge_weights=merge_weights)
            if r > 0:
                self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
                self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
                self.scaling = self.lora_alpha / self.r
                self.weight.requires_grad = False
                nn.init.normal_(self.lora_A)
                nn.init.normal_(self.lora_B)

        def train(self, mode=True):
            nn.Linear.train(self, mode)
            if self.merge_weights and self.r > 0:
                delta = (self.lora_B @ self.lora_A) * self.scaling
                if mode and self.merged:
                    self.weight.data -= delta
                    self.merged = False
                elif not mode and not self.merged:
                    self.weight.data += delta
                    self.merged = True
            return self

        def forward(self, x):
            result = F.linear(x, self.weight, self.bias)
            if self.r > 0 and not self.merged:
                result = result + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
            return result

    return CustomLoRALinear


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_subclass_calling_lora_layer_init_runs_like_loralib(p):
    ours_cls, ref_cls = _custom_linear_class(L), _custom_linear_class(loralib)
    torch.manual_seed(0)
    ref = nn.Sequential(ref_cls(6, 5, r=2, lora_alpha=4, lora_dropout=p), nn.Linear(5, 3))
    torch.manual_seed(0)
    ours = nn.Sequential(ours_cls(6, 5, r=2, lora_alpha=4, lora_dropout=p), nn.Linear(5, 3))
    # loralib's attribute semantics
    layer = ours[0]
    assert (layer.r, layer.lora_alpha, layer.merged, layer.merge_weights, layer.scaling) == (2, 4, False, True, 2.0)
    assert callable(layer.lora_dropout) and "CustomLoRALinear" in repr(ours)
    assert ref[0].state_dict().keys() == layer.state_dict().keys()

    loralib.mark_only_lora_as_trainable(ref)
    L.mark_only_lora_as_trainable(ours)
    assert [n for n, q in ours.named_parameters() if q.requires_grad] == ["0.lora_A", "0.lora_B"]
    assert L.lora_state_dict(ours).keys() == loralib.lora_state_dict(ref).keys()
    x = torch.randn(4, 6)
    for mode in (True, False, True):
        ref.train(mode), ours.train(mode)
        torch.manual_seed(1)
        y_ref = ref(x)
        torch.manual_seed(1)
        y = ours(x)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_subclass_repr_with_an_identity_function_as_dropout():
    class Mine(L.LoRALayer, nn.Linear):  # the mixin's extra_repr comes first in this order
        def __init__(self):
            nn.Linear.__init__(self, 4, 4)
            self.r, self.lora_alpha, self.merged, self.merge_weights = 2, 4, False, True
            self.lora_dropout = lambda x: x  # what loralib itself stores for p == 0

    assert "r=2, lora_alpha=4, lora_dropout=0.0" in repr(Mine())


def test_lora_layer_init_validates_like_the_layers():
    cls = _custom_linear_class(L)
    with pytest.raises(ValueError, match="lora_dropout"):
        cls(4, 4, r=2, lora_dropout=1.5)
    with pytest.raises(ValueError, match="r must"):
        cls(4, 4, r=-1)


# ----------------------------------------------------------------------------- adapters as plain tensors

def test_adapters_replaced_by_plain_tensors_are_used_in_forward_and_backward():
    # Intrinsic-dimension training: the adapters are a fixed projection of a small trainable vector.
    torch.manual_seed(0)
    layer = L.Linear(6, 4, r=2, lora_alpha=2, lora_dropout=0.0)
    W, b = layer.weight.detach().double(), layer.bias.detach().double()
    theta = torch.randn(5, requires_grad=True)
    proj_A, proj_B = torch.randn(2 * 6, 5), torch.randn(4 * 2, 5)
    del layer.lora_A, layer.lora_B
    layer.lora_A = (proj_A @ theta).view(2, 6)
    layer.lora_B = (proj_B @ theta).view(4, 2)
    assert layer.has_adapter
    x = torch.randn(3, 6)
    y = layer(x)

    theta64 = theta.detach().double().requires_grad_()
    ref = naive_linear(x.double(), W, b, (proj_A.double() @ theta64).view(2, 6),
                       (proj_B.double() @ theta64).view(4, 2), layer.scaling)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(theta.grad.double(), theta64.grad, rtol=1e-4, atol=1e-4)


def test_functional_call_with_plain_tensor_adapters():
    torch.manual_seed(0)
    layer = L.MergedLinear(6, 9, r=2, lora_alpha=2, enable_lora=[True, False, True])
    A = torch.randn_like(layer.lora_A, dtype=F64).requires_grad_()
    B = torch.randn_like(layer.lora_B, dtype=F64).requires_grad_()
    layer.double()
    x = torch.randn(3, 6, dtype=F64)
    y = torch.func.functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))
    ref = naive_linear(x, layer.weight.detach(), layer.bias.detach(), A, B, layer.scaling,
                       split_sizes=[3, 3, 3], enable=[True, False, True])
    torch.testing.assert_close(y, ref)
    (gA,) = torch.autograd.grad(y.sum(), A)
    (rA,) = torch.autograd.grad(ref.sum(), A)
    torch.testing.assert_close(gA, rA)


# ----------------------------------------------------------------------------- eval() then state_dict()

def _trained_pair():
    torch.manual_seed(0)
    ref = nn.Sequential(loralib.Linear(6, 5, r=2, lora_alpha=4), nn.ReLU(),
                        loralib.MergedLinear(5, 6, r=2, lora_alpha=2, enable_lora=[True, False, True]))
    ours = nn.Sequential(L.Linear(6, 5, r=2, lora_alpha=4), nn.ReLU(),
                         L.MergedLinear(5, 6, r=2, lora_alpha=2, enable_lora=[True, False, True]))
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p_ref, p in zip(ref.parameters(), ours.parameters()):
            p.copy_(torch.randn_like(p))
            p_ref.copy_(p)
    return ref, ours


def _train_steps(model, x, steps=3):
    """A few SGD steps on the adapters only, so that every B is non-zero."""
    L.mark_only_lora_as_trainable(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model


def _exporting_model(dora=True):
    """Embedding, Linear, MergedLinear (and a DoRA Linear), trained so that B != 0."""
    torch.manual_seed(0)
    layers = [L.Embedding(10, 8, r=2, lora_alpha=4), L.Linear(8, 6, r=2, lora_alpha=4), nn.ReLU(),
              L.MergedLinear(6, 9, r=2, lora_alpha=2, enable_lora=[True, False, True])]
    if dora:
        layers.append(L.Linear(9, 5, r=2, lora_alpha=2, use_dora=True))
    model = _train_steps(nn.Sequential(*layers), IDS)
    assert all(m.lora_B.abs().min() > 0 for m in model if isinstance(m, L.LoRALayer))
    return model


def _plain_model(dora=True):
    layers = [nn.Embedding(10, 8), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 9)]
    return nn.Sequential(*(layers + [nn.Linear(9, 5)] if dora else layers))


IDS = torch.tensor([[1, 2, 3, 9], [0, 0, 5, 4]])


def test_fish_speech_export_filters_lora_keys_of_the_eval_state_dict():
    # fish-speech tools/llama/merge_lora.py: eval(), state_dict(), drop the "lora" keys, load into the plain model.
    model = _exporting_model().eval()
    y = model(IDS)
    exported = {k: v for k, v in model.state_dict().items() if "lora" not in k}
    plain = _plain_model()
    plain.load_state_dict(exported, strict=True)
    assert torch.equal(plain(IDS), y)
    # the DoRA layer's export against a float64 formula: m / ||W + s BA|| (row-wise) * (W + s BA)
    dora = model[4]
    W = dora.unmerged_weight().double()
    V = W + dora.scaling * dora.lora_B.double() @ dora.lora_A.double()
    ref = dora.lora_magnitude.double()[:, None] * V / V.norm(dim=1, keepdim=True)
    torch.testing.assert_close(exported["4.weight"].double(), ref, rtol=1e-6, atol=1e-6)


def test_eval_state_dict_equals_loralibs_for_the_same_weights():
    ours = _exporting_model(dora=False)
    torch.manual_seed(0)
    ref = nn.Sequential(loralib.Embedding(10, 8, r=2, lora_alpha=4), loralib.Linear(8, 6, r=2, lora_alpha=4),
                        nn.ReLU(), loralib.MergedLinear(6, 9, r=2, lora_alpha=2, enable_lora=[True, False, True]))
    ref.load_state_dict(ours.state_dict(), strict=True)
    unmerged = {k: v.clone() for k, v in ours.state_dict().items()}
    ref.eval(), ours.eval()
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    for key in theirs:  # rounding once from an fp32 delta may differ from loralib's by 1 ulp
        assert _ulps(mine[key], theirs[key]) <= 1, key
    assert not any(torch.equal(mine[f"{i}.weight"], unmerged[f"{i}.weight"]) for i in (0, 1, 3))  # merged


def _ulps(a, b) -> int:
    """Largest distance in units in the last place between two fp32 tensors of the same shape."""
    ia, ib = (t.contiguous().view(torch.int32).long() for t in (a, b))
    ia, ib = (torch.where(i < 0, -(i & 0x7FFFFFFF), i) for i in (ia, ib))  # monotone in the float's value
    return int((ia - ib).abs().max())


def test_a_loralib_model_loads_our_eval_file_as_it_loads_loralibs_own():
    ours = _exporting_model(dora=False)

    def loralib_model():
        torch.manual_seed(1)
        return nn.Sequential(loralib.Embedding(10, 8, r=2, lora_alpha=4), loralib.Linear(8, 6, r=2, lora_alpha=4),
                             nn.ReLU(), loralib.MergedLinear(6, 9, r=2, lora_alpha=2, enable_lora=[True, False, True]))

    ref = loralib_model()
    ref.load_state_dict(ours.state_dict())
    ref.eval(), ours.eval()
    from_ours, from_ref = loralib_model(), loralib_model()
    from_ours.load_state_dict(ours.state_dict(), strict=True)
    from_ref.load_state_dict(ref.state_dict(), strict=True)
    for mode in (True, False, True):  # loralib itself double-counts here after eval(): so must our file
        from_ours.train(mode), from_ref.train(mode)
        torch.testing.assert_close(from_ours(IDS), from_ref(IDS), rtol=1e-6, atol=1e-6)


def test_merged_state_dict_is_the_filtered_eval_state_dict():
    model = _exporting_model()
    merged = L.merged_state_dict(model)  # from the unmerged model: the model is not changed
    assert not model[1].merged
    exported = {k: v for k, v in model.eval().state_dict().items() if "lora" not in k}
    assert merged.keys() == exported.keys()
    assert all(torch.equal(merged[k], exported[k]) for k in merged)
    _plain_model().load_state_dict(merged, strict=True)


def test_merged_state_dict_of_an_unmerged_model_equals_the_merged_one(monkeypatch):
    _, ours = _trained_pair()
    unmerged = L.merged_state_dict(ours.train())
    merged = L.merged_state_dict(ours.eval())
    assert unmerged.keys() == merged.keys()
    for key in merged:
        assert torch.equal(unmerged[key], merged[key]), key


# ----------------------------------------------------------------------------- subclasses that merge by themselves

def _self_merging_class(lora, delete_adapters):
    """ColossalAI's ``LoraLinear`` pattern over ``lora`` (loralib or lora_layers): its own ``train`` merges,
    and with ``delete_adapters`` deletes the adapters once merged."""

    class LoraLinear(lora.LoRALayer, nn.Module):
        def __init__(self):
            nn.Module.__init__(self)
            lora.LoRALayer.__init__(self, r=2, lora_alpha=2, lora_dropout=0.0, merge_weights=False)
            self.weight = nn.Parameter(torch.randn(4, 4))
            self.lora_A = nn.Parameter(torch.randn(2, 4))
            self.lora_B = nn.Parameter(torch.randn(4, 2))

        def train(self, mode=True):
            self.training = mode
            if not mode and not self.merged:
                self.weight.data += self.lora_B @ self.lora_A
                if delete_adapters:
                    del self.lora_A, self.lora_B
                self.merged = True
            return self

    return LoraLinear


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _load_outcome(module, sd, strict):
    try:
        result = module.load_state_dict(sd, strict=strict)
    except RuntimeError as exc:
        return "error", str(exc).split("\n\t", 1)[-1]
    return sorted(result.missing_keys), sorted(result.unexpected_keys)


@pytest.mark.parametrize("delete_adapters", [True, False], ids=["del_adapters", "keep_adapters"])
def test_subclass_merging_by_itself_saves_and_loads_as_with_loralib(delete_adapters):
    ours_cls, ref_cls = _self_merging_class(L, delete_adapters), _self_merging_class(loralib, delete_adapters)
    torch.manual_seed(0)
    ref = ref_cls()
    torch.manual_seed(0)
    ours = ours_cls()
    train_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    assert _same_state(ours.state_dict(), train_sd)
    ref.eval(), ours.eval()
    assert ours.merged and _same_state(ours.state_dict(), ref.state_dict())
    eval_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    for sd in (train_sd, eval_sd):
        for strict in (True, False):
            # into a fresh (train-mode) layer and into the merged one, as loralib does
            for make in (lambda c: c(), lambda c: c().eval()):
                mine, theirs = (torch.manual_seed(1) and make(c) for c in (ours_cls, ref_cls))
                assert _load_outcome(mine, sd, strict) == _load_outcome(theirs, sd, strict)
                assert mine.merged == theirs.merged and _same_state(mine.state_dict(), theirs.state_dict())


# ----------------------------------------------------------------------------- LoRALayer first in the bases

def _mixin_first_class(lora, own_train):
    """A loralib-style layer with ``LoRALayer`` first among its bases, so that ``nn.Module.train``
    (``model.eval()``), or its own ``train`` through ``super()``, reaches lora_layers' merging first."""

    class MixinFirst(lora.LoRALayer, nn.Linear):
        def __init__(self, n_in, n_out, r=2):
            nn.Linear.__init__(self, n_in, n_out)
            lora.LoRALayer.__init__(self, r=r, lora_alpha=2, lora_dropout=0.0, merge_weights=True)
            self.lora_A = nn.Parameter(torch.randn(r, n_in))
            self.lora_B = nn.Parameter(torch.randn(n_out, r))
            self.scaling = self.lora_alpha / self.r

        def forward(self, x):
            return F.linear(x, self.weight, self.bias) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    if own_train:
        def train(self, mode=True):
            super(MixinFirst, self).train(mode)
            return self

        MixinFirst.train = train
    return MixinFirst


@pytest.mark.parametrize("own_train", [False, True], ids=["inherited_train", "super_train"])
def test_subclass_with_lora_layer_first_evaluates_like_loralib(own_train):
    # issue #20 review: eval() reached lora_layers' merge, which cannot know the subclass's delta
    # (NotImplementedError); loralib's LoRALayer has no train(), so the weight is left alone.
    ours_cls, ref_cls = _mixin_first_class(L, own_train), _mixin_first_class(loralib, own_train)
    torch.manual_seed(0)
    ref = nn.Sequential(ref_cls(4, 3))
    torch.manual_seed(0)
    ours = nn.Sequential(ours_cls(4, 3))
    x = torch.randn(5, 4)
    for mode in (False, True, False):
        ref.train(mode), ours.train(mode)
        assert not ours[0].merged
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
        assert _same_state(ours.state_dict(), ref.state_dict())
    with pytest.raises(ValueError, match="cannot merge this MixinFirst: its class subclasses LoRALayer without defining _delta_blocks"):
        ours[0].merge()
    with pytest.raises(ValueError, match="0: cannot merge this MixinFirst"):
        L.merge_lora(ours)
    with pytest.raises(ValueError, match="merged_state_dict: cannot merge 0"):
        L.merged_state_dict(ours)
    assert _same_state(ours.state_dict(), ref.state_dict())  # nothing changed


def test_weight_saved_merged_into_a_subclass_without_delta_is_refused():
    torch.manual_seed(0)
    layer = L.Linear(4, 3, r=2, lora_alpha=2)
    nn.init.normal_(layer.lora_B)
    marked = layer.eval().state_dict()
    mine = _mixin_first_class(L, own_train=False)(4, 3)
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    with pytest.raises(RuntimeError, match="MixinFirst defines no _delta_blocks"):
        mine.load_state_dict(marked)
    assert _same_state(mine.state_dict(), before) and not mine.merged
    mine.load_state_dict(layer.train().state_dict())  # saved in train mode: loads as with loralib
    assert torch.equal(mine.weight, layer.weight)


# ----------------------------------------------------------------------------- merged by hand

def _hand_merged_run(lora):
    """An export script's own merge (``weight.data += scaling · B A; merged = True``), then training
    resumes: loralib's ``train()`` subtracts the adapter's delta again."""
    torch.manual_seed(0)
    model = nn.Sequential(lora.Embedding(10, 4, r=2, lora_alpha=2), lora.Linear(4, 4, r=2, lora_alpha=2),
                          nn.ReLU(), lora.Linear(4, 3, r=2, lora_alpha=4))
    nn.init.normal_(model[1].lora_B), nn.init.normal_(model[3].lora_B)
    lora.mark_only_lora_as_trainable(model)
    y_before = model(IDS)
    with torch.no_grad():
        model[0].weight.data += (model[0].lora_B @ model[0].lora_A).t() * model[0].scaling
        for layer in model[1], model[3]:
            layer.weight.data += (layer.lora_B @ layer.lora_A) * layer.scaling
        for layer in model[0], model[1], model[3]:
            layer.merged = True
    y_merged = model(IDS)
    exported = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    y_after = model(IDS)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(IDS).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [y_before, y_merged, y_after], exported, losses, {k: v.clone() for k, v in model.state_dict().items()}


def test_a_merge_by_hand_is_taken_out_by_train_as_with_loralib():
    # issue #20 review: train() ignored merged=True set by the user's code, so the adapter stayed out of
    # the forward and training crashed (no grad) or left the adapters untrained.
    outs, exported, losses, final = _hand_merged_run(L)
    ref_outs, ref_exported, ref_losses, ref_final = _hand_merged_run(loralib)
    for ours, ref in zip(outs, ref_outs):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert _same_state(exported, ref_exported)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-6, atol=1e-6)
    assert final.keys() == ref_final.keys()
    for key in final:
        torch.testing.assert_close(final[key], ref_final[key], rtol=1e-6, atol=1e-6)


def test_a_merge_by_hand_is_left_alone_without_merge_weights():
    # loralib's train() subtracts only with merge_weights=True
    layer = L.Linear(4, 3, r=2, merge_weights=False)
    nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        layer.weight.data += (layer.lora_B @ layer.lora_A) * layer.scaling
    merged = layer.weight.detach().clone()
    layer.merged = True
    layer.train()
    assert layer.merged and torch.equal(layer.weight, merged)


# ----------------------------------------------------------------------------- conv injection (RNAformer)

def _conv_program(lora, freeze_conv_biases=False):
    """RNAformer's injection: plain layers replaced under no_grad, the conv's weights copied through
    ``.conv``; then ``bias="lora_only"`` training. Kernel 1, so both libraries' adapters have the same shapes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(4 * 9, 3))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, old in list(model.named_children()):
            if isinstance(old, nn.Conv2d):
                new = lora.Conv2d(old.in_channels, old.out_channels, old.kernel_size[0], r=2, lora_alpha=4)
                new.conv.weight.copy_(old.weight)
                new.conv.bias.copy_(old.bias)
            else:
                if not isinstance(old, nn.Linear):
                    continue
                new = lora.Linear(old.in_features, old.out_features, r=2, lora_alpha=4)
                new.weight.copy_(old.weight)
                new.bias.copy_(old.bias)
            setattr(model, name, new)
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    if freeze_conv_biases:
        model[0].bias.requires_grad_(False), model[2].bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, losses = torch.randn(2, 3, 3, 3), []
    for _ in range(3):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_only_training_conv_biases_warns_and_is_loralibs_once_frozen(monkeypatch):
    # issue #20 review: loralib's 'lora_only' leaves conv biases frozen (its conv layers keep the bias in
    # their wrapped conv); ours trains them, which was silent.
    monkeypatch.setattr("lora_layers.layers.notices._WARNED_CONV_LORA_ONLY", False)
    ref_losses, ref_count = _conv_program(loralib)
    with pytest.warns(UserWarning, match=r"bias='lora_only'\) trains the biases of the LoRA conv layers "
                                         r"\('0.bias', '2.bias'\)"):
        losses, count = _conv_program(L)
    assert count == ref_count + 6 + 4 and not torch.equal(losses, ref_losses)
    losses, count = _conv_program(L, freeze_conv_biases=True)  # once per process: no second warning
    assert count == ref_count
    torch.testing.assert_close(losses, ref_losses, rtol=1e-6, atol=1e-6)


def test_lora_only_without_conv_layers_does_not_warn(monkeypatch, recwarn):
    monkeypatch.setattr("lora_layers.layers.notices._WARNED_CONV_LORA_ONLY", False)
    model = nn.Sequential(L.Linear(4, 4, r=2), nn.Conv2d(3, 3, 1), L.Conv2d(3, 3, 1, r=2, bias=False))
    L.mark_only_lora_as_trainable(model, bias="lora_only")
    assert not [w for w in recwarn if "lora_only" in str(w.message)]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.bias", "0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]


# ----------------------------------------------------------------------------- a merged export as a new base

def _fresh_exporting_model(lora, dora):
    torch.manual_seed(5)
    layers = [lora.Embedding(10, 8, r=2, lora_alpha=4), lora.Linear(8, 6, r=2, lora_alpha=4), nn.ReLU(),
              lora.MergedLinear(6, 9, r=2, lora_alpha=2, enable_lora=[True, False, True])]
    if dora:
        layers.append(lora.Linear(9, 5, r=2, lora_alpha=2, use_dora=True))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_an_export_with_the_lora_keys_popped_in_place_loads_as_base_weights(dora, monkeypatch):
    # issue #20 review: fish-speech's save_pretrained(drop_lora=True) pops the 'lora' keys of the eval
    # state dict in place, so the merged mark stays, and from_pretrained(merged, lora_config=...) loads the
    # file into a fresh LoRA model with strict=False to train a new adapter on it. That load was refused.
    model = _exporting_model(dora=dora).eval()
    y = model(IDS)
    exported = model.state_dict()
    for key in list(exported):
        if "lora" in key:
            exported.pop(key)
    buf = io.BytesIO()
    torch.save(exported, buf)
    buf.seek(0)
    exported = torch.load(buf, weights_only=True)
    assert exported._metadata["1"]["lora_merged"]  # the mark travelled with the file
    assert exported.keys() == L.merged_state_dict(model).keys()

    fresh = _fresh_exporting_model(L, dora)
    monkeypatch.setattr("lora_layers.layers.notices._WARNED_MERGED_EXPORT", False)
    with pytest.warns(UserWarning, match=r"0.weight was saved merged .* loaded as a base weight"):
        result = fresh.load_state_dict(exported, strict=False, assign=True)
    assert not result.unexpected_keys and all("lora" in k for k in result.missing_keys)
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[k], exported[k]) for k in exported)  # the merged weights are the base
    for mode in (True, False, True):  # B = 0: the fresh adapters add nothing
        torch.testing.assert_close(fresh.train(mode)(IDS), y, rtol=1e-6, atol=1e-6)
    if not dora:  # and as loralib loads it
        ref = _fresh_exporting_model(loralib, dora)
        ref.load_state_dict(exported, strict=False)
        assert _same_state(ref.state_dict(), fresh.state_dict())


def test_an_export_missing_only_part_of_a_layers_adapter_is_still_refused():
    model = _exporting_model(dora=False).eval()
    exported = model.state_dict()
    exported.pop("1.lora_B")  # a partial load: the merged weight cannot be told from a base weight
    fresh = _fresh_exporting_model(L, False)
    with pytest.raises(RuntimeError, match=r"1.weight was saved merged .*1.lora_B"):
        fresh.load_state_dict(exported, strict=False)


# ----------------------------------------------------------------------------- whole programs, run under both imports

def _gpt2_nlg_program(lora):
    """microsoft/LoRA's NLG example: a fan_in_fan_out ``MergedLinear`` c_attn (q and v adapted,
    merge_weights=False) over GPT-2 ``Conv1D`` weights loaded by ``load_weight`` (a deepcopy, the model's
    own missing parameters filled in, strict=False); AdamW on the adapters; eval between steps; the
    adapters saved as ``{'model_state_dict': lora_state_dict(model)}`` and loaded into a fresh model."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = lora.MergedLinear(8, 24, r=2, lora_alpha=4, lora_dropout=0.0,
                                            enable_lora=[True, False, True], fan_in_fan_out=True,
                                            merge_weights=False)
            self.c_proj = nn.Linear(8, 8)

        def forward(self, x):
            q, k, v = self.c_attn(x).split(8, dim=-1)
            return x + self.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(20, 8)
            self.h = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.wte.weight

        def forward(self, ids):
            x = self.wte(ids)
            for block in self.h:
                x = block(x)
            return self.head(x)

        def load_weight(self, state_dict):
            state_dict = copy.deepcopy(state_dict.get("model_state_dict", state_dict))
            for name, param in self.named_parameters():
                if name not in state_dict:
                    state_dict[name] = param
            self.load_state_dict(state_dict, strict=False)
            self.head.weight = self.wte.weight

    gen = torch.Generator().manual_seed(0)
    pretrained = {"wte.weight": torch.randn(20, 8, generator=gen)}
    for i in range(2):  # Conv1D layout: (in, out)
        pretrained[f"h.{i}.c_attn.weight"] = torch.randn(8, 24, generator=gen) * 0.3
        pretrained[f"h.{i}.c_attn.bias"] = torch.randn(24, generator=gen) * 0.1
        pretrained[f"h.{i}.c_proj.weight"] = torch.randn(8, 8, generator=gen) * 0.3
        pretrained[f"h.{i}.c_proj.bias"] = torch.randn(8, generator=gen) * 0.1
    torch.manual_seed(5)
    model = LM()
    model.load_weight(pretrained)
    lora.mark_only_lora_as_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    ids = torch.randint(0, 20, (2, 5), generator=gen)
    losses = []
    for _ in range(4):
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        model.eval()
        with torch.no_grad():
            evaluated = model(ids)
    buf = io.BytesIO()
    torch.save({"model_state_dict": lora.lora_state_dict(model)}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    torch.manual_seed(5)
    reloaded = LM()
    reloaded.load_weight(pretrained)
    reloaded.load_weight(checkpoint)
    return dict(losses=torch.stack(losses), evaluated=evaluated, reloaded=reloaded.eval()(ids),
                saved=checkpoint["model_state_dict"])


def _sublora_program(lora):
    """SubLoRA: a nanoGPT with a ``MergedLinear`` c_attn and a LoRA lm_head whose weight the token
    embedding shares; the adapters are deleted from the model and set, before every forward, to their
    initial values plus a fixed projection of a few trainable subspace parameters."""

    def parent_and_name(root, path):
        *parents, name = path.split(".")
        for part in parents:
            root = getattr(root, part)
        return root, name

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(20, 8)
            self.c_attn = nn.ModuleList([lora.MergedLinear(8, 24, r=2, enable_lora=[True, False, True])
                                         for _ in range(2)])
            self.lm_head = lora.Linear(8, 20, r=2, bias=False, lora_alpha=32, lora_dropout=0.0)
            self.wte.weight = self.lm_head.weight
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)

        def forward(self, ids):
            x = self.wte(ids)
            for c_attn in self.c_attn:
                q, k, v = c_attn(x).split(8, dim=2)
                x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.lm_head(x)

    class IntrinsicDimension(nn.Module):
        def __init__(self, net, d=6):
            super().__init__()
            self._net = [net]  # not a submodule
            init = copy.deepcopy(net)
            for name, param in init.named_parameters():
                if param.requires_grad:
                    delattr(*parent_and_name(net, name))
            self.names, self.init = zip(*[(n, p.detach()) for n, p in init.named_parameters() if p.requires_grad])
            D = sum(p.numel() for p in self.init)
            self.P = torch.randn(D, d, generator=torch.Generator().manual_seed(137)) / D ** 0.5
            self.subspace_params = nn.Parameter(torch.zeros(d))

        def forward(self, ids):
            flat, i = self.P @ self.subspace_params, 0
            for name, init in zip(self.names, self.init):
                setattr(*parent_and_name(self._net[0], name), init + flat[i:i + init.numel()].view(init.shape))
                i += init.numel()
            return self._net[0](ids)

    torch.manual_seed(0)
    net = GPT()
    lora.mark_only_lora_as_trainable(net)
    model = IntrinsicDimension(net)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return dict(names=list(model.names), losses=torch.stack(losses), subspace=model.subspace_params.detach())


@pytest.mark.parametrize("program", [_gpt2_nlg_program, _sublora_program], ids=["gpt2_nlg", "sublora"])
def test_program_runs_as_under_loralib(program):
    ours, ref = program(L), program(loralib)
    assert ours.keys() == ref.keys()
    for key in ref:
        if isinstance(ref[key], dict):
            assert ours[key].keys() == ref[key].keys(), key
            for name in ref[key]:
                torch.testing.assert_close(ours[key][name], ref[key][name], rtol=1e-5, atol=1e-6)
        elif isinstance(ref[key], list):
            assert ours[key] == ref[key], key
        else:
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("enable", [[True, False, True], [False, True], [True, True, True, True]])
def test_merged_linear_has_loralibs_helpers(enable, fan_in_fan_out):
    # issue #20 review: code written against loralib.MergedLinear (a subclass's own train() or export)
    # calls lora_ind, zero_pad and merge_AB; they were missing (AttributeError).
    torch.manual_seed(0)
    ref = loralib.MergedLinear(6, 12, r=2, lora_alpha=4, enable_lora=enable, fan_in_fan_out=fan_in_fan_out)
    nn.init.normal_(ref.lora_B)
    ours = L.MergedLinear(6, 12, r=2, lora_alpha=4, enable_lora=enable, fan_in_fan_out=fan_in_fan_out)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert torch.equal(ours.lora_ind, ref.lora_ind)
    assert torch.equal(ours.zero_pad(ours.lora_B.detach()), ref.zero_pad(ref.lora_B.detach()))
    torch.testing.assert_close(ours.merge_AB(), ref.merge_AB(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.weight + ours.merge_AB() * ours.scaling, ours.merged_weight(),
                               rtol=1e-6, atol=1e-6)
    ours.merge_AB().square().sum().backward()  # differentiable, as loralib's
    ref.merge_AB().square().sum().backward()
    torch.testing.assert_close(ours.lora_A.grad, ref.lora_A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.lora_B.grad, ref.lora_B.grad, rtol=1e-5, atol=1e-5)


def test_an_unmarked_state_dict_loaded_into_an_eval_model_is_taken_as_base_weights():
    # The documented side of the ambiguity: a train-mode file into a model in eval mode is right (loralib
    # drops the adapter); loralib's own eval-mode file, unmarked, counts the adapter twice (loralib: right).
    torch.manual_seed(0)
    src = loralib.Linear(8, 8, r=2, lora_alpha=4)
    nn.init.normal_(src.lora_B)
    x = torch.randn(3, 8)
    train_sd = {k: v.clone() for k, v in src.state_dict().items()}
    src.eval()  # loralib's eval() returns None
    y, eval_sd = src(x), src.state_dict()
    outcomes = {}
    for lib in (loralib, L):
        for name, sd in (("train file", train_sd), ("eval file", eval_sd)):
            model = lib.Linear(8, 8, r=2, lora_alpha=4)
            model.eval()
            model.load_state_dict(sd)
            outcomes[lib.__name__, name] = torch.allclose(model(x), y, atol=1e-5)
    assert outcomes == {("loralib", "train file"): False, ("loralib", "eval file"): True,
                        ("lora_layers", "train file"): True, ("lora_layers", "eval file"): False}


def _with_adapters_of_its_own(lora):
    """A model mixing the library's layers with a LoRA module of the program's own that does not subclass
    LoRALayer (kohya-style lora_down / lora_up), which loralib's name test trains and saves."""

    class OwnLoRA(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(4, 4)
            self.lora_down = nn.Linear(4, 2, bias=False)
            self.lora_up = nn.Linear(2, 4, bias=False)

        def forward(self, x):
            return self.base(x) + self.lora_up(self.lora_down(x))

    torch.manual_seed(0)
    return nn.Sequential(lora.Linear(4, 4, r=2), OwnLoRA())


def test_lora_named_parameters_that_are_no_adapter_warn(monkeypatch):
    # issue #20 review: lora_layers finds adapters by identity, so a program's own lora_* modules were
    # frozen and left out of lora_state_dict without a word, where loralib trains and saves them.
    monkeypatch.setattr("lora_layers.layers.notices._WARNED_LORA_NAMED", set())
    ref = _with_adapters_of_its_own(loralib)
    loralib.mark_only_lora_as_trainable(ref)
    ours = _with_adapters_of_its_own(L)
    with pytest.warns(UserWarning, match=r"mark_only_lora_as_trainable froze '1.lora_down.weight', "
                                         r"'1.lora_up.weight': their names contain 'lora_'"):
        L.mark_only_lora_as_trainable(ours)
    assert [n for n, p in ref.named_parameters() if p.requires_grad] == [
        "0.lora_A", "0.lora_B", "1.lora_down.weight", "1.lora_up.weight"]
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["0.lora_A", "0.lora_B"]
    ours[1].lora_down.weight.requires_grad_(True)  # trained anyway, by the program's own choice
    with pytest.warns(UserWarning, match=r"lora_state_dict left out the trainable parameters '1.lora_down.weight'"):
        assert sorted(L.lora_state_dict(ours)) == ["0.lora_A", "0.lora_B"]


def test_lora_named_parameters_warn_once_and_not_for_adapters(monkeypatch, recwarn):
    monkeypatch.setattr("lora_layers.layers.notices._WARNED_LORA_NAMED", set())
    cls = _custom_linear_class(L)  # a LoRALayer subclass: its lora_* Parameters are adapters
    L.mark_only_lora_as_trainable(nn.Sequential(cls(4, 4, r=2), L.Linear(4, 4, r=2, use_dora=True)))
    assert not [w for w in recwarn if "names contain 'lora_'" in str(w.message)]
    for _ in range(2):
        L.mark_only_lora_as_trainable(_with_adapters_of_its_own(L))
    assert len([w for w in recwarn if "names contain 'lora_'" in str(w.message)]) == 1
