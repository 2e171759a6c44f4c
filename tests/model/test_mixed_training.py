"""Exact mixed-batch training (issue #23 item 1): K=3 adapters, each on its own rows of one batch, one
AdamW over all of them, equal K separate single-adapter runs on their own rows; with dropout, equal a
float64 reference with the masks of lora_layers.core.mixed's documented rule; gradient checkpointing
recomputes with the batch's rows wherever backward is called; the training state resumes a run bitwise."""
import copy

import pytest
import torch
import torch.nn.functional as F

import lora_layers as ll
from lora_layers.core import mixed as core_mixed
from lora_layers.core.dropout import keep_mask, keep_scale
from _naive_lora import delta_merged
from conftest import make_tiny_phi3
from test_mixed_batch import NAMES, _with_adapters, build

ADAPTERS = ("default", "b", "c")
STEPS = 10
TOL = 1e-6
# Adapter weights of this size keep the tiny random Phi-3 well conditioned in fp32: with 0.3, a single
# adapter's fp32 run already differs from its float64 run by 2e-5 in the gradients.
PHI3_STD = 0.05
# Adam divides each gradient by its own running RMS, so an entry whose gradient is ~1e-7 moves by ~lr whatever
# the fp32 rounding of that gradient: over 10 steps the parameters of two exact fp32 runs drift apart by
# ~lr·1e-4. With lr 1e-2 the deeper Phi-3 reaches 2e-6 although each step's gradients agree within 2e-8 (and
# are as close to a float64 run as a single-adapter run's); 1e-3, a usual LoRA rate, keeps it under 1e-6.
PHI3_LR = 1e-3


def _rows(name):
    return [i for i, n in enumerate(NAMES) if n == name]


def _row_losses(y):
    return y.reshape(y.shape[0], -1).square().mean(1)


def _model_rows(model, x):
    return _row_losses(model(x))


def _mixed_loss(model, x, per_row=_model_rows):
    with ll.mixed_batch(model, NAMES):
        losses = per_row(model, x)
    return [losses[_rows(k)].mean() for k in ADAPTERS]


def _optimizer(model):
    ll.mark_only_lora_as_trainable(model)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=getattr(model, "test_lr", 1e-2))


def _params(model, name):
    return {f"{m}.{k}": p.detach().clone() for m, layer in model.named_modules() if isinstance(layer, ll.LoRALayer)
            and name in layer.adapter_names for k, p in layer.adapter_parameters(name).items()}


def _train_mixed(model, x, per_row=_model_rows, steps=STEPS):
    opt, history = _optimizer(model), []
    for _ in range(steps):
        opt.zero_grad()
        losses = _mixed_loss(model, x, per_row)
        sum(losses).backward()
        opt.step()
        history.append([float(v.detach()) for v in losses])
    return history


def _train_separate(model, x, name, per_row=_model_rows):
    model = copy.deepcopy(model)
    ll.set_adapter(model, name)
    opt, history, rows = _optimizer(model), [], _rows(name)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = per_row(model, x[rows]).mean()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return model, history


def _assert_equals_separate_runs(model, x, per_row=_model_rows):
    start = copy.deepcopy(model)
    history = _train_mixed(model, x, per_row)
    for k, name in enumerate(ADAPTERS):
        alone, losses = _train_separate(start, x, name, per_row)
        assert max(abs(a[k] - b) for a, b in zip(history, losses)) <= TOL, name
        got, want = _params(model, name), _params(alone, name)
        assert got.keys() == want.keys() and got
        for key in got:
            torch.testing.assert_close(got[key], want[key], atol=TOL, rtol=0, msg=f"{name}: {key}")
        assert not torch.equal(got[key], _params(start, name)[key])  # it trained


@pytest.mark.parametrize("kind", ["lora", "dora", "merged", "embedding", "conv2d"])
def test_ten_adamw_steps_equal_three_separate_runs(kind):
    model, x = build(kind)
    _assert_equals_separate_runs(model.train(), x)


def _phi3(lean, checkpointing=None):
    model = make_tiny_phi3(gqa=True, hidden_size=32, intermediate_size=48)
    ll.phi3.apply_lora(model, r=2, lora_alpha=4, lora_dropout=0.0, lean=lean)
    _with_adapters(model, std=PHI3_STD)
    if checkpointing is not None:
        ll.phi3.enable_gradient_checkpointing(model, use_reentrant=checkpointing == "reentrant")
    model.test_lr = PHI3_LR  # read by _optimizer (a plain attribute: deepcopy keeps it)
    return model.train()


def _phi3_rows(model, ids):
    logits = model(input_ids=ids, return_logits=True).logits if ll.lean.is_lean(model) else model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


@pytest.mark.parametrize("lean, checkpointing", [(True, None), (False, "reentrant"), (True, "non_reentrant")])
def test_phi3_training_equals_three_separate_runs(lean, checkpointing):
    model = _phi3(lean, checkpointing)
    ids = torch.randint(3, 128, (len(NAMES), 6))
    _assert_equals_separate_runs(model, ids, per_row=_phi3_rows)


# ----------------------------------------------------------------------------- dropout 0.1: float64 reference

def _reference_delta(layer, h2, keep, A, B, s):
    """float64 ``s·ΔW`` applied to the dropped input rows ``h2 ⊙ keep`` (``(T, in)``) of a Linear or
    MergedLinear (``ΔW`` rows zero for the splits without an adapter)."""
    if isinstance(layer, ll.MergedLinear):
        return s * (h2 * keep) @ delta_merged(A, B, layer.split_sizes, layer.enable_lora, A.shape[0] //
                                              sum(layer.enable_lora)).t()
    return s * ((h2 * keep) @ A.t() @ B.t())


def _reference_layer(layer, h, seed, leaves):
    """float64, from the maths: row n of ``h`` through ``layer`` with adapter NAMES[n], token t of adapter k
    dropping row t of drop_mask(seed, (T, in), p_k) (lora_layers.core.mixed's rule; a conv's tokens are
    its samples, each flattened to C·∏spatial)."""
    conv = isinstance(layer, ll.Conv2d)
    rows = h.shape[0] if conv else h.shape[0] * h.shape[1]
    h2 = h.reshape(rows, -1)
    if conv:
        out = F.conv2d(h, layer.weight.double(), layer.bias.double(), padding=layer.padding)
    else:
        out = F.linear(h2, layer.weight.double(), None if layer.bias is None else layer.bias.double())
    for name in ADAPTERS:
        v = layer.adapter(name)
        keep = keep_mask(seed, h2.shape, v.dropout_p, "cpu").double() * keep_scale(v.dropout_p)
        A, B = leaves[(id(layer), name)] = tuple(t.detach().double().requires_grad_() for t in (v.lora_A, v.lora_B))
        if conv:
            delta = v.scaling * F.conv2d((h2 * keep).view(h.shape), (B @ A).view(layer.weight.shape),
                                         padding=layer.padding)
            pick = torch.tensor([n == name for n in NAMES])[:, None, None, None]
        else:
            delta = _reference_delta(layer, h2, keep, A, B, v.scaling)
            pick = torch.tensor([n == name for n in NAMES for _ in range(h.shape[1])])[:, None]
        out = torch.where(pick, out + delta, out)
    return out if conv else out.view(*h.shape[:-1], -1)


@pytest.mark.parametrize("kind", ["lora", "merged", "conv2d"])
def test_dropout_training_equals_the_float64_reference_with_the_documented_masks(kind, monkeypatch):
    model, x = build(kind, p=0.1)
    model.train()
    layers = [m for m in model if isinstance(m, ll.LoRALayer)]
    seeds = []
    draw = core_mixed.draw_seed
    monkeypatch.setattr(core_mixed, "draw_seed", lambda: seeds.append(draw()) or seeds[-1])
    opt = _optimizer(model)
    for _ in range(STEPS):
        opt.zero_grad()
        seeds.clear()
        losses = _mixed_loss(model, x)
        sum(losses).backward()
        assert len(seeds) == len(layers)  # one seed per layer call, none drawn again in backward
        leaves, h = {}, x.double()
        for module in model:
            h = _reference_layer(module, h, seeds[layers.index(module)], leaves) if module in layers else module(h)
        ref = _row_losses(h)
        ref_losses = [ref[_rows(k)].mean() for k in ADAPTERS]
        sum(ref_losses).backward()
        for got, want in zip(losses, ref_losses):
            assert abs(float(got.detach()) - float(want.detach())) <= TOL
        for layer in layers:
            for name in ADAPTERS:
                v, (A, B) = layer.adapter(name), leaves[(id(layer), name)]
                torch.testing.assert_close(v.lora_A.grad.double(), A.grad, atol=TOL, rtol=0)
                torch.testing.assert_close(v.lora_B.grad.double(), B.grad, atol=TOL, rtol=0)
        opt.step()


# ----------------------------------------------------------------------------- gradient checkpointing

def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("backward_inside", [True, False])
def test_checkpointed_recompute_uses_the_batch_rows_wherever_backward_runs(reentrant, backward_inside):
    """Dropout 0.1, so the recompute must also see the same masks (checkpointing restores the RNG)."""
    plain = make_tiny_phi3(gqa=True, hidden_size=32, intermediate_size=48)
    ll.phi3.apply_lora(plain, r=2, lora_alpha=4, lora_dropout=0.1)
    _with_adapters(plain, p=0.1)
    plain.train()
    ckpt = copy.deepcopy(plain)
    ll.phi3.enable_gradient_checkpointing(ckpt, use_reentrant=reentrant)
    ids = torch.randint(3, 128, (len(NAMES), 6))
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(7)
        with ll.mixed_batch(model, NAMES):
            loss = _phi3_rows(model, ids).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        results.append((float(loss.detach()), _grads(model)))
    (loss0, g0), (loss1, g1) = results
    assert loss0 == loss1 and g0.keys() == g1.keys() and any("lora_adapters.c" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=TOL, rtol=0, msg=n)


@pytest.mark.parametrize("reentrant", [True, False])
def test_after_the_batch_the_next_step_and_its_recompute_use_the_active_adapter(reentrant):
    model = _phi3(False, "reentrant" if reentrant else "non_reentrant")
    plain = _phi3(False)
    ids = torch.randint(3, 128, (len(NAMES), 6))
    with ll.mixed_batch(model, NAMES):
        loss = _phi3_rows(model, ids).sum()
    loss.backward()
    model.zero_grad()
    _phi3_rows(model, ids).sum().backward()  # an ordinary step: its recompute must not see the old rows
    _phi3_rows(plain, ids).sum().backward()
    g, g0 = _grads(model), _grads(plain)
    assert g.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g[n], g0[n], atol=TOL, rtol=0, msg=n)


# ----------------------------------------------------------------------------- training state

def test_training_state_resumes_a_mixed_run_bitwise(tmp_path):
    model, x = build("dora")
    model.train()
    start = copy.deepcopy(model)
    full = _train_mixed(model, x)
    half = copy.deepcopy(start)
    opt = _optimizer(half)
    for _ in range(STEPS // 2):
        opt.zero_grad()
        sum(_mixed_loss(half, x)).backward()
        opt.step()
    ll.save_training_state(tmp_path / "state.pt", half, opt, step=STEPS // 2)
    resumed = copy.deepcopy(start)
    opt2 = _optimizer(resumed)
    assert ll.load_training_state(tmp_path / "state.pt", resumed, opt2)["step"] == STEPS // 2
    history = []
    for _ in range(STEPS // 2):
        opt2.zero_grad()
        losses = _mixed_loss(resumed, x)
        sum(losses).backward()
        opt2.step()
        history.append([float(v.detach()) for v in losses])
    assert history == full[STEPS // 2:]
    for name in ADAPTERS:
        got, want = _params(resumed, name), _params(model, name)
        assert all(torch.equal(got[k], want[k]) for k in want)
