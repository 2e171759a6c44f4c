"""Named adapters on one layer (issue #23): storage, init, the active adapter's forward and gradients,
merging, and bad input that changes nothing.

The reference for a named adapter "b" is a fresh layer of the same kind whose *default* adapter holds
b's tensors and settings: the same code path today's tests pin down against naive formulas."""
import copy
import math
import pickle

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from _naive_lora import bit_equal

# kind -> (constructor taking r, lora_alpha and extra kwargs, input maker)
KINDS = {
    "linear": (lambda r, a, **kw: L.Linear(12, 10, r=r, lora_alpha=a, **kw), (3, 12)),
    "linear_fifo": (lambda r, a, **kw: L.Linear(12, 10, r=r, lora_alpha=a, fan_in_fan_out=True, **kw), (3, 12)),
    "merged_gqa": (lambda r, a, **kw: L.MergedLinear(12, 24, r=r, lora_alpha=a, enable_lora=[True, False, True],
                                                     split_sizes=[12, 6, 6], **kw), (2, 3, 12)),
    "embedding": (lambda r, a, **kw: L.Embedding(15, 6, r=r, lora_alpha=a, **kw), None),
    "conv1d": (lambda r, a, **kw: L.Conv1d(3, 4, 3, r=r, lora_alpha=a, stride=2, **kw), (2, 3, 9)),
    "conv2d": (lambda r, a, **kw: L.Conv2d(4, 6, (3, 2), r=r, lora_alpha=a, groups=2, **kw), (2, 4, 6, 5)),
    "conv3d": (lambda r, a, **kw: L.Conv3d(2, 3, 2, r=r, lora_alpha=a, **kw), (1, 2, 3, 4, 3)),
    "conv2d_loralib": (lambda r, a, **kw: L.Conv2d(2, 4, 3, r=r, lora_alpha=a, layout="loralib", **kw),
                       (2, 2, 5, 5)),
}
DORA_KINDS = ("linear", "linear_fifo", "merged_gqa")
NO_DROPOUT = ("embedding", "conv2d_loralib")


def _input(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        return torch.randint(0, 15, (3, 5), generator=g)
    return torch.randn(*KINDS[kind][1], generator=g)


def _randomise(*tensors, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if t.dim() == 1 else 0.0))


def _two_adapter_layer(kind, use_dora=False, dropout=0.0, rslora=False):
    """A layer with a default adapter (r=2) and "b" (r=3, another alpha), both non-zero."""
    torch.manual_seed(0)
    make = KINDS[kind][0]
    extra = {} if kind in NO_DROPOUT else dict(lora_dropout=dropout)
    layer = make(2, 4, use_dora=use_dora, **extra) if use_dora else make(2, 4, **extra)
    layer.add_adapter("b", 3, 5.0, lora_dropout=0.0 if kind in NO_DROPOUT else dropout, use_dora=use_dora,
                      use_rslora=rslora)
    _randomise(layer.lora_A, layer.lora_B, seed=3)
    b = layer.lora_adapters.b
    _randomise(*[p for p in b.parameters()], seed=4)
    return layer


def _reference(layer, kind, name="b"):
    """A fresh layer of ``kind`` whose default adapter holds adapter ``name``'s tensors and settings."""
    v = layer.adapter(name)
    make = KINDS[kind][0]
    kw = dict(use_rslora=v.use_rslora)
    if v.use_dora:
        kw["use_dora"] = True
    if kind not in NO_DROPOUT:
        kw["lora_dropout"] = v.dropout_p
    ref = make(v.r, v.lora_alpha, **kw)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        if getattr(layer, "bias", None) is not None:
            ref.bias.copy_(layer.bias)
        ref.lora_A.copy_(v.lora_A)
        ref.lora_B.copy_(v.lora_B)
        if v.use_dora:
            ref.lora_magnitude.copy_(v.lora_magnitude)
    return ref


CASES = [(k, False) for k in KINDS] + [(k, True) for k in DORA_KINDS]


@pytest.mark.parametrize("kind,use_dora", CASES)
def test_active_named_adapter_gives_the_outputs_and_gradients_of_a_layer_holding_it(kind, use_dora):
    layer = _two_adapter_layer(kind, use_dora, rslora=True)
    layer.set_adapter("b")
    ref = _reference(layer, kind)
    x = _input(kind)
    xs = [x, x] if kind == "embedding" else [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y, y_ref = layer(xs[0]), ref(xs[1])
    assert bit_equal(y, y_ref)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    y.backward(g)
    y_ref.backward(g)
    v = layer.adapter("b")
    pairs = [(v.lora_A, ref.lora_A), (v.lora_B, ref.lora_B)]
    pairs += [(v.lora_magnitude, ref.lora_magnitude)] if use_dora else []
    pairs += [] if kind == "embedding" else [(xs[0], xs[1])]
    for mine, theirs in pairs:
        assert mine.grad is not None and bit_equal(mine.grad, theirs.grad)
    # The inactive default adapter takes no part in the step.
    assert layer.lora_A.grad is None and layer.lora_B.grad is None


@pytest.mark.parametrize("kind", ["linear", "merged_gqa", "conv2d"])
def test_named_adapter_dropout_in_training_matches_the_reference_under_one_seed(kind):
    layer = _two_adapter_layer(kind, dropout=0.25)
    layer.set_adapter("b")
    ref = _reference(layer, kind)
    x = _input(kind)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    y_ref = ref(x)
    assert bit_equal(y, y_ref)
    layer.set_adapter("default")
    torch.manual_seed(11)
    assert not bit_equal(layer(x), y)  # the default adapter is another one: the test can tell them apart


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_add_adapter_initialises_as_the_default_adapter_would(kind, init):
    torch.manual_seed(0)
    layer = KINDS[kind][0](2, 4)
    y0 = layer(_input(kind))
    torch.manual_seed(123)
    layer.add_adapter("b", 5, 7.0, init=init)
    b = layer.lora_adapters.b
    shapes = layer._adapter_shapes(r=5)
    assert (tuple(b.lora_A.shape), tuple(b.lora_B.shape)) == shapes
    assert b.lora_A.dtype == layer.weight.dtype and b.lora_A.device == layer.weight.device
    torch.manual_seed(123)
    A, B = torch.empty(shapes[0]), torch.empty(shapes[1])
    if kind == "embedding":  # loralib's: A zero, B normal
        nn.init.zeros_(A)
        nn.init.normal_(B)
    elif init == "gaussian":
        nn.init.normal_(A, std=1 / 5)
        nn.init.zeros_(B)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)
    assert bit_equal(b.lora_A, A) and bit_equal(b.lora_B, B)
    assert b.scaling == 7.0 / 5 and b.r == 5 and b.lora_alpha == 7.0 and b.init == init
    layer.set_adapter("b")
    assert bit_equal(layer(_input(kind)), y0)  # a new adapter changes no output


@pytest.mark.parametrize("kind", DORA_KINDS)
def test_dora_adapter_magnitude_starts_at_the_base_row_norms_even_when_merged(kind):
    torch.manual_seed(0)
    layer = KINDS[kind][0](2, 4)
    _randomise(layer.lora_A, layer.lora_B, seed=3)
    W = layer.weight.detach().double().clone()
    layer.eval()  # merged with the default adapter: the magnitude must come from the base weight
    assert layer.merged
    layer.add_adapter("b", 3, 6, use_dora=True)
    rows = W.norm(dim=0) if getattr(layer, "fan_in_fan_out", False) else W.norm(dim=1)
    if kind == "merged_gqa":
        rows = torch.cat([rows[:12], rows[18:]])
    assert torch.allclose(layer.lora_adapters.b.lora_magnitude.double(), rows, rtol=1e-6, atol=0)
    assert layer.merged and layer.adapter("b").use_dora


def test_lora_dtype_and_trainability_follow_the_default_adapter():
    layer = L.Linear(8, 4, r=2, lora_alpha=2, lora_dtype=torch.float64)
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    layer.add_adapter("b", 3, 3)
    assert layer.lora_adapters.b.lora_A.dtype == torch.float64
    assert not any(p.requires_grad for p in layer.lora_adapters.b.parameters())


def test_names_views_and_the_default_view_reads_the_layer_now():
    layer = L.Linear(8, 4, r=2, lora_alpha=2, lora_dropout=0.1)
    assert layer.adapter_names == ("default",) and layer.active_adapter == "default"
    layer.add_adapter("zeta", 3, 3)
    layer.add_adapter("alpha", 1, 1, lora_dropout=0.2)
    assert layer.adapter_names == ("default", "zeta", "alpha")
    v = layer.adapter("default")
    assert v.lora_A is layer.lora_A and v.scaling == 1.0 and v.dropout_p == 0.1 and v.lora_magnitude is None
    va = layer.adapter("alpha")
    assert va.lora_A is layer.lora_adapters.alpha.lora_A and va.dropout_p == 0.2 and va.r == 1
    plain = torch.zeros_like(layer.lora_A)  # a loralib program swapping the factor for a plain tensor
    del layer.lora_A
    layer.lora_A = plain
    assert layer.adapter("default").lora_A is plain
    assert L.Linear(8, 4).adapter_names == ()


def test_a_layer_without_named_adapters_is_todays_and_deleting_the_last_restores_it():
    torch.manual_seed(0)
    fresh, twin = L.Linear(8, 4, r=2, lora_alpha=2), L.Linear(8, 4, r=2, lora_alpha=2)
    assert "_active_adapter" not in fresh.__dict__ and "lora_adapters" not in fresh._modules
    twin.eval()
    twin.train()  # what today's layer holds after the same eval()/train() cycle
    keys, text, attrs = list(twin.state_dict()), repr(twin), set(twin.__dict__)
    fresh.add_adapter("b", 3, 3)
    fresh.set_adapter("b")
    fresh.eval()
    fresh.set_adapter("default")
    fresh.train()
    fresh.delete_adapter("b")
    assert list(fresh.state_dict()) == keys and repr(fresh) == text and set(fresh.__dict__) == attrs


def _snapshot(layer):
    return ({k: v.clone() for k, v in layer.state_dict().items()}, layer.active_adapter, layer.adapter_names,
            layer.merged)


def _unchanged(layer, snap):
    sd, active, names, merged = snap
    now = layer.state_dict()
    return (list(now) == list(sd) and all(bit_equal(now[k], sd[k]) for k in sd) and layer.active_adapter == active
            and layer.adapter_names == names and layer.merged == merged)


BAD_CALLS = [
    ("add", ("b", 3, 3), ValueError, "already has an adapter 'b'"),
    ("add", ("default", 3, 3), ValueError, "already has an adapter 'default'"),
    ("add", ("", 3, 3), ValueError, "valid Python identifier"),
    ("add", ("a.b", 3, 3), ValueError, "'a.b'"),
    ("add", (3, 3, 3), ValueError, "got 3"),
    ("add", ("c", 0, 3), ValueError, "r must be a positive integer, got 0"),
    ("add", ("c", -1, 3), ValueError, "got -1"),
    ("add", ("c", 2, float("nan")), ValueError, "lora_alpha"),
    ("add", ("c", 2, 2, 1.5), ValueError, "lora_dropout"),
    ("set", ("nope",), KeyError, "no adapter 'nope'"),
    ("delete", ("nope",), KeyError, "('default', 'b')"),
    ("delete", ("default",), ValueError, "cannot be deleted"),
    ("delete", ("b",), ValueError, "is the active adapter"),
]


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("op,args,exc,text", BAD_CALLS)
def test_bad_input_names_the_problem_and_changes_nothing(op, args, exc, text, merged):
    layer = _two_adapter_layer("merged_gqa")
    layer.set_adapter("b")
    if merged:
        layer.eval()
    snap = _snapshot(layer)
    call = {"add": layer.add_adapter, "set": layer.set_adapter, "delete": layer.delete_adapter}[op]
    with pytest.raises(exc, match=None) as info:
        call(*args)
    assert text in str(info.value)
    assert _unchanged(layer, snap)


@pytest.mark.parametrize("make,kwargs,exc,text", [
    (lambda: L.Linear(8, 4), dict(r=2, lora_alpha=2), ValueError, "r=0"),
    (lambda: L.Embedding(8, 4, r=2), dict(r=2, lora_alpha=2, use_dora=True), TypeError, "use_dora"),
    (lambda: L.Conv2d(2, 2, 1, r=2), dict(r=2, lora_alpha=2, use_dora=True), TypeError, "use_dora"),
    (lambda: L.Embedding(8, 4, r=2), dict(r=2, lora_alpha=2, lora_dropout=0.1), ValueError, "no adapter dropout"),
])
def test_add_adapter_refuses_layers_that_cannot_hold_it(make, kwargs, exc, text):
    layer = make()
    keys = list(layer.state_dict())
    with pytest.raises(exc) as info:
        layer.add_adapter("b", **kwargs)
    assert text in str(info.value) and list(layer.state_dict()) == keys and "lora_adapters" not in layer._modules


@pytest.mark.parametrize("kind,use_dora", CASES)
def test_eval_merges_the_active_adapter_and_train_restores_the_base_bitwise(kind, use_dora):
    layer = _two_adapter_layer(kind, use_dora)
    layer.set_adapter("b")
    x = _input(kind)
    w0, y = layer.weight.detach().clone(), layer(x).detach()
    ref = _reference(layer, kind).eval()
    layer.eval()
    assert layer.merged
    assert bit_equal(layer.weight, ref.weight)  # the same merge as a layer holding b as its default
    assert torch.allclose(layer(x), y, atol=1e-5)
    layer.train()
    assert not layer.merged and bit_equal(layer.weight, w0)


@pytest.mark.parametrize("kind", ["linear", "merged_gqa", "embedding", "conv2d"])
def test_set_adapter_on_a_merged_layer_remerges_the_new_one_and_unmerge_stays_exact(kind):
    layer = _two_adapter_layer(kind)
    x = _input(kind)
    w0 = layer.weight.detach().clone()
    y_default = layer(x).detach()
    layer.set_adapter("b")
    y_b = layer(x).detach()
    layer.eval()
    for name, expected in [("default", y_default), ("b", y_b), ("default", y_default)]:
        layer.set_adapter(name)
        assert layer.merged and torch.allclose(layer(x), expected, atol=1e-5)
    layer.set_adapter(None)  # the base alone: nothing merged
    assert not layer.merged and bit_equal(layer.weight, w0)
    layer.set_adapter("b")
    layer.unmerge()
    assert bit_equal(layer.weight, w0)


def test_unmerge_takes_out_the_merged_adapter_even_after_its_settings_change():
    layer = _two_adapter_layer("linear")
    w0 = layer.weight.detach().clone()
    layer.set_adapter("b")
    layer.merge()
    b = layer.lora_adapters.b
    with torch.no_grad():
        b.lora_B.add_(1.0)  # an optimizer step on a merged layer
    b.scaling = 123.0
    layer.unmerge()
    assert bit_equal(layer.weight, w0)


def test_base_only_when_no_adapter_is_active():
    layer = _two_adapter_layer("linear")
    x = _input("linear")
    layer.set_adapter(None)
    assert layer.active_adapter is None
    assert bit_equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer.eval()
    assert not layer.merged
    layer.set_adapter("b")
    with pytest.raises(ValueError, match="'b' is the active adapter"):
        layer.delete_adapter("b")


def test_state_dict_of_a_layer_merged_with_a_named_adapter_holds_the_base_and_loads_back():
    layer = _two_adapter_layer("linear")
    w0 = layer.weight.detach().clone()
    layer.set_adapter("b")
    layer.eval()
    sd = layer.state_dict()
    assert bit_equal(sd["weight"], w0) and not sd._metadata.get("", {}).get("lora_merged")
    other = L.Linear(12, 10, r=2, lora_alpha=4)
    other.add_adapter("b", 3, 5.0)
    other.load_state_dict(sd)
    other.set_adapter("b")
    x = _input("linear")
    assert bit_equal(other(x), L.Linear.forward(layer.train(), x))
    assert bit_equal(other.weight, w0)


def test_a_default_merge_saved_in_eval_loads_into_a_layer_whose_active_adapter_is_named():
    layer = _two_adapter_layer("linear").eval()  # default merged: a marked state dict
    sd = copy.deepcopy(layer.state_dict())
    target = _two_adapter_layer("linear")
    target.set_adapter("b")
    target.eval()
    target.load_state_dict(sd)
    # The loaded default merge is taken out (up to one rounding, as any weight loaded merged) and b merged.
    assert target.merged and target._merged_with[0] == "b"
    assert torch.allclose(target.unmerged_weight(), layer.unmerged_weight(), atol=1e-6)
    target.train()
    x = _input("linear")
    target.set_adapter("default")
    assert torch.allclose(target(x), layer.train()(x), atol=1e-6)


def test_pickle_and_deepcopy_keep_the_adapters_and_the_active_one():
    layer = _two_adapter_layer("merged_gqa", use_dora=True)
    layer.set_adapter("b")
    x = _input("merged_gqa")
    y = layer(x)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied.active_adapter == "b" and copied.adapter_names == ("default", "b")
        assert bit_equal(copied(x), y)


def test_the_mixed_batch_hook_is_checked_first():
    layer = _two_adapter_layer("linear")
    x = _input("linear")
    rows = ["b"] * x.shape[0]
    with L.mixed_batch(nn.Sequential(layer), rows):  # the rows, not the active adapter, pick the adapter
        y = layer(x)
        layer.eval()  # no one adapter to merge: eval() leaves it unmerged, merge() says why
        assert not layer.merged
        with pytest.raises(ValueError, match="mixed-adapter batch"):
            layer.merge()
    assert layer.merged  # merged again once the batch ends (eval mode)
    layer.train().set_adapter("b")
    torch.testing.assert_close(y, layer(x), atol=1e-6, rtol=0)


def test_a_merge_made_by_hand_is_not_switched_silently_and_repr_names_the_active_adapter():
    layer = _two_adapter_layer("linear")
    snap = _snapshot(layer)
    layer.merged = True  # loralib-style code merged it by itself
    with pytest.raises(ValueError, match="merged by code of its own"):
        layer.set_adapter("b")
    assert layer.active_adapter == "default"
    layer.merged = False
    assert _unchanged(layer, snap) and "active_adapter" not in repr(layer)
    layer.set_adapter("b")
    assert "active_adapter='b'" in repr(layer)


def test_a_failed_remerge_in_set_adapter_leaves_the_layer_as_it_was():
    layer = _two_adapter_layer("linear", use_dora=True)
    layer.eval()
    snap = _snapshot(layer)
    with torch.no_grad():
        layer.lora_adapters.b.lora_magnitude.data = torch.ones(3)  # the wrong shape: merging b must fail
    with pytest.raises(ValueError, match="lora_magnitude must have shape"):
        layer.set_adapter("b")
    layer.lora_adapters.b.lora_magnitude.data = snap[0]["lora_adapters.b.lora_magnitude"].clone()
    assert _unchanged(layer, snap)


@pytest.mark.parametrize("layer_init, new_init", [("kaiming", "pissa"), ("kaiming", "olora"), ("pissa", "kaiming")])
def test_pissa_and_named_adapters_do_not_mix(layer_init, new_init):
    # PiSSA/OLoRA turn the shared base weight into the default adapter's residual: a named adapter over it
    # would silently serve W - s·B₀A₀ + its delta, so add_adapter refuses and leaves the layer as it was.
    torch.manual_seed(0)
    layer = L.Linear(8, 6, r=2, lora_alpha=4, init=layer_init)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="PiSSA/OLoRA inits and named adapters do not mix"):
        layer.add_adapter("b", 2, 4, init=new_init)
    assert layer.adapter_names == ("default",)
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _dora_after_base_load(trained_named: bool):
    """A Linear with DoRA default and named ``a`` adapters, then a new base weight loaded without magnitudes
    (pretrained weights loaded after the adapters were built); ``(layer, the new weight, bias)``."""
    torch.manual_seed(0)
    layer = L.Linear(8, 6, r=2, lora_alpha=4, use_dora=True)
    layer.add_adapter("a", 3, 5, use_dora=True)
    if trained_named:
        with torch.no_grad():
            layer.lora_adapters.a.lora_magnitude.mul_(1.5)
    W, b = torch.randn(6, 8) * 3, torch.randn(6)
    return layer, W, b


def test_named_dora_magnitude_follows_a_base_weight_loaded_after_it():
    """Found in review: load_state_dict of a new base weight re-derived the default adapter's DoRA magnitude
    but not a named adapter's, so a fresh named DoRA adapter (B = 0) rescaled every row by ‖W_old‖/‖W_new‖
    without a warning (2.9 off the base output in this test)."""
    layer, W, b = _dora_after_base_load(trained_named=False)
    layer.load_state_dict({"weight": W, "bias": b}, strict=False)
    x = torch.randn(4, 8)
    base = (x.double() @ W.double().t() + b.double()).float()
    for name in ("default", "a"):
        layer.set_adapter(name)
        torch.testing.assert_close(layer(x), base, rtol=1e-5, atol=1e-5)


def test_a_trained_named_dora_magnitude_is_kept_with_a_warning_and_reset_magnitude_derives_it():
    layer, W, b = _dora_after_base_load(trained_named=True)
    kept = layer.lora_adapters.a.lora_magnitude.detach().clone()
    with pytest.warns(UserWarning, match=r"lora_adapters\.a\.lora_magnitude"):
        layer.load_state_dict({"weight": W, "bias": b}, strict=False)
    assert torch.equal(layer.lora_adapters.a.lora_magnitude.detach(), kept)
    layer.set_adapter("a")
    layer.eval()  # merged: reset_magnitude unmerges, derives every DoRA magnitude, merges again
    layer.reset_magnitude()
    torch.testing.assert_close(layer.lora_adapters.a.lora_magnitude.detach(), W.norm(dim=1), rtol=1e-6, atol=0)
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), x @ W.t() + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "merged_gqa", "embedding", "conv2d"])
def test_an_adapter_made_active_after_none_in_eval_mode_is_merged_as_eval_merges_it(kind):
    """Found in review: in eval mode, set_adapter(None) then set_adapter(name) left the layer unmerged, so
    ``eval(); state_dict()`` (loralib's export of the merged weight) held the bare base weight."""
    layer = _two_adapter_layer(kind)
    x = _input(kind)
    w0 = layer.weight.detach().clone()
    expected = {name: (layer.set_adapter(name), layer(x).detach())[1] for name in ("default", "b")}
    layer.eval()
    for name in ("default", "b"):
        layer.set_adapter(None)
        layer.set_adapter(name)
        assert layer.merged and torch.allclose(layer(x), expected[name], atol=1e-5)
    layer.set_adapter(None)
    layer.set_adapter("default")
    merged = layer.state_dict()["weight"]  # loralib's export: the merged weight (W + s·B A, float64 here)
    A, B, r = layer.lora_A.double(), layer.lora_B.double(), layer.r
    if kind == "merged_gqa":  # q (rows 0:12) and v (18:24) adapted, k (12:18) not
        delta = torch.cat([B[:12] @ A[:r], torch.zeros(6, 12, dtype=torch.float64), B[12:] @ A[r:]])
    else:
        delta = B @ A if kind != "embedding" else (B @ A).t()
    delta = delta * layer.scaling
    torch.testing.assert_close(merged.double(), w0.double() + delta.reshape(w0.shape), rtol=0, atol=1e-6)
    layer.train()
    assert bit_equal(layer.weight, w0)


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("kind,use_dora", [("linear", False), ("merged_gqa", True), ("embedding", False),
                                           ("conv2d", False)])
def test_load_state_dict_into_a_layer_merged_with_a_named_adapter_merges_the_loaded_one(kind, use_dora, assign):
    """Found in review: a named adapter is a child module, which load_state_dict loads after the layer; the
    layer re-merged before that, with the old values, so an eval-mode model with ``b`` active served the
    old ``b`` (1.0 off in a two-layer net) until the next train()."""
    layer = _two_adapter_layer(kind, use_dora)
    w0 = layer.weight.detach().clone()
    source = copy.deepcopy(layer)
    _randomise(*source.lora_adapters.b.parameters(), seed=9)
    layer.set_adapter("b")
    layer.eval()
    assert layer.merged
    layer.load_state_dict(copy.deepcopy(source.state_dict()), assign=assign)  # assign: not source's tensors
    x = _input(kind)
    expected = _reference(source, kind).eval()(x)  # b's new tensors as a fresh layer's default adapter
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.train()
    assert bit_equal(layer.weight, w0)
