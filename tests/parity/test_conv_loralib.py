"""loralib 0.1.2's conv layers, as programs use them: ``.conv`` (issue #20 item 7) and
loralib's conv adapter layout, its checkpoints included (issue #20 item 8).

The reference is the installed loralib itself: same weights in, same outputs out. The tests
of these layers that need no loralib are in tests/layers/test_conv_layout.py.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

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


# ----------------------------------------------------------------------------- item 8: loralib's layout

LORALIB_CASES = {  # loralib 0.1.2's conv works for Conv2d (int kernel), and for Conv1d/Conv3d with kernel 1
    "conv2d_k3": (lambda m, **kw: m.Conv2d(3, 6, 3, r=2, lora_alpha=4, padding=1, **kw), (2, 3, 7, 7)),
    "conv2d_k3_groups2": (lambda m, **kw: m.Conv2d(4, 6, 3, r=1, lora_alpha=3, groups=2, stride=2, **kw),
                          (2, 4, 9, 9)),
    "conv2d_k2": (lambda m, **kw: m.Conv2d(2, 3, 2, r=3, lora_alpha=2, bias=False, **kw), (1, 2, 5, 5)),
    "conv1d_k1": (lambda m, **kw: m.Conv1d(4, 6, 1, r=2, lora_alpha=4, groups=2, **kw), (2, 4, 7)),
    "conv3d_k1": (lambda m, **kw: m.Conv3d(3, 5, 1, r=2, lora_alpha=4, **kw), (1, 3, 3, 4, 5)),
}


def _loralib_pair(case, seed=0, **kw):
    make, shape = LORALIB_CASES[case]
    torch.manual_seed(seed)
    ref = make(loralib)
    torch.manual_seed(seed)
    ours = make(L, layout="loralib", **kw)
    return ref, ours, torch.randn(shape)


@pytest.mark.parametrize("case", list(LORALIB_CASES))
def test_loralib_layout_same_seed_same_init(case):
    ref, ours, _ = _loralib_pair(case)
    mine = dict(ours.named_parameters())
    theirs = {k.replace("conv.", ""): v for k, v in ref.named_parameters()}
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
        assert mine[name].requires_grad == theirs[name].requires_grad, name
    assert ours.layout == "loralib" and "layout='loralib'" in repr(ours)


def _run(module, x):
    """The output and the gradients of x and of each trainable parameter (by loralib-free name)."""
    y = module(x)
    params = {n.replace("conv.", ""): p for n, p in module.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(y, [x] + list(params.values()), torch.linspace(-1, 1, y.numel()).view_as(y),
                                allow_unused=True)
    return {"y": y.detach(), "x": grads[0], **dict(zip(params, grads[1:]))}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", list(LORALIB_CASES))
def test_loralib_layout_matches_loralib_outputs_and_grads(case, mode):
    ref, ours, x = _loralib_pair(case, seed=1)
    _randomize(ref.lora_A, ref.lora_B)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train(mode == "train"), ours.train(mode == "train")
    x.requires_grad_(True)
    got, want = _run(ours, x), _run(ref, x)
    assert got.keys() == want.keys()
    for name in got:
        assert (got[name] is None and want[name] is None) or torch.equal(got[name], want[name]), name


def test_loralib_layout_ignores_dropout_as_loralib_and_says_so():
    with pytest.warns(UserWarning, match=r"lora_dropout=0\.5.*not applied"):
        ref, ours, x = _loralib_pair("conv2d_k3", lora_dropout=0.5)
    ref = LORALIB_CASES["conv2d_k3"][0](loralib, lora_dropout=0.5)
    _randomize(ref.lora_A, ref.lora_B)
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours(x), ref(x)) and ours.training


# -- a checkpoint of a model fine-tuned with loralib

def _net(lora, **kw):
    return nn.Sequential(lora.Conv2d(3, 6, 3, r=2, lora_alpha=4, padding=1, **kw), nn.ReLU(),
                         lora.Conv2d(6, 4, 3, r=1, lora_alpha=2, groups=2, **kw))


def _trained_loralib_net(steps=3):
    torch.manual_seed(0)
    ref = _net(loralib)
    loralib.mark_only_lora_as_trainable(ref)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        ref(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
    assert all(m.lora_B.any() for m in (ref[0], ref[2]))
    return ref


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr("lora_layers.layers.notices._WARNED_CONV_LAYOUT", False)


def _load(how, ours, ref, tmp_path):
    state = ref.state_dict()
    base = {k: v for k, v in state.items() if "lora_" not in k}
    if how == "strict":
        ours.load_state_dict(state, strict=True)
    elif how == "base_then_adapter":
        ours.load_state_dict(base, strict=False)
        ours.load_state_dict(loralib.lora_state_dict(ref), strict=False)
    else:
        torch.save(loralib.lora_state_dict(ref), tmp_path / "loralib.pt")
        ours.load_state_dict(base, strict=False)
        assert L.load_lora(ours, tmp_path / "loralib.pt").missing_keys == []


def _layout_warnings(record):
    return [w for w in record if "layout='loralib'" in str(w.message)]


@pytest.mark.parametrize("how", ["strict", "base_then_adapter", "load_lora"])
def test_loralib_checkpoint_switches_a_fresh_layer(how, tmp_path, fresh_warning):
    ref = _trained_loralib_net()
    state = copy.deepcopy(ref.state_dict())  # loralib's eval() below writes merged weights into it
    ours = _net(L)
    A = ours[0].lora_A
    with pytest.warns(UserWarning) as record:
        _load(how, ours, ref, tmp_path)
    assert len(_layout_warnings(record)) == 1  # two layers switched, one warning
    assert ours[0].layout == ours[2].layout == "loralib"
    assert ours[0].lora_A is A  # the same Parameter, so an optimizer made before the load still holds it
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(ours(x), ref(x))
    weights = [m.weight.detach().clone() for m in (ours[0], ours[2])]
    ref.eval(), ours.eval()
    assert ours[0].merged and torch.equal(ours(x), ref(x))
    for _ in range(3):
        ours.train(), ours.eval()
    ours.train()
    assert all(torch.equal(m.weight, w) for m, w in zip((ours[0], ours[2]), weights))  # exact unmerge
    L.mark_only_lora_as_trainable(ours)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in ref.named_parameters() if p.requires_grad]
    assert {k: v.shape for k, v in L.lora_state_dict(ours).items()} == \
        {k: v.shape for k, v in loralib.lora_state_dict(ref).items()}

    other = _net(L)  # the warning is shown once per process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(state)
    assert torch.equal(other(x), ours(x))


def test_a_merged_fresh_layer_switches_and_an_earlier_optimizer_trains_it(fresh_warning):
    ref = _trained_loralib_net()
    state = copy.deepcopy(ref.state_dict())
    x = torch.randn(2, 3, 8, 8)
    ours = _net(L).eval()  # merged (a zero delta) before the load
    opt = torch.optim.SGD(L.lora_parameters(ours), lr=0.1)
    with pytest.warns(UserWarning, match="layout='loralib'"):
        ours.load_state_dict(state)
    ref.eval()
    assert ours[0].merged and torch.equal(ours(x), ref(x))
    ref.train(), ours.train()
    ours(x).square().mean().backward()
    opt.step()
    assert not torch.equal(ours[0].lora_A, state["0.lora_A"])  # the optimizer holds the loaded Parameters
    merged = L.merge_and_unload(copy.deepcopy(ours))
    torch.testing.assert_close(merged(x), ours(x), rtol=1e-6, atol=1e-6)


def test_save_lora_of_a_switched_model_loads_into_a_fresh_one(tmp_path, fresh_warning):
    ref = _trained_loralib_net()
    ours = _net(L, layout="loralib")
    ours.load_state_dict(ref.state_dict())
    L.save_lora(ours, tmp_path / "a.safetensors")
    fresh = _net(L)
    fresh.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k}, strict=False)
    with pytest.warns(UserWarning, match="layout='loralib'"):
        L.load_lora(fresh, tmp_path / "a.safetensors")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), ref(x))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("how", ["load_state_dict", "load_lora"])
def test_a_trained_layer_is_not_switched_and_the_error_names_layout(how, tmp_path, fresh_warning):
    ref = _trained_loralib_net()
    ours = _net(L)
    _randomize(ours[0].lora_B)  # a trained lora_layers adapter: switching would throw it away
    before = _snapshot(ours)
    torch.save(loralib.lora_state_dict(ref), tmp_path / "loralib.pt")
    load = {"load_state_dict": lambda: ours.load_state_dict(loralib.lora_state_dict(ref), strict=False),
            "load_lora": lambda: L.load_lora(ours, tmp_path / "loralib.pt")}[how]
    with pytest.raises((RuntimeError, ValueError)) as info:
        load()
    message = str(info.value)
    assert "0.lora_A" in message or "lora_A" in message
    assert "layout='loralib'" in message and "(6, 9)" in message and "(2, 27)" in message
    if how == "load_lora":
        assert _unchanged(ours, before) and ours[0].layout == ours[2].layout == "lora_layers"


@pytest.mark.parametrize("rslora", [False, True])
def test_export_peft_of_a_loralib_layout_conv_is_exact(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    ref = _trained_loralib_net()
    plain = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3))
    ours = copy.deepcopy(plain)
    ours[0] = L.Conv2d.from_module(ours[0], r=2, lora_alpha=4, layout="loralib", use_rslora=rslora)
    ours[0].load_state_dict({k[2:]: v for k, v in loralib.lora_state_dict(ref).items() if k.startswith("0.")},
                            strict=False)
    L.export_peft(ours, tmp_path / "peft", task_type=None)
    config = __import__("json").loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["rank_pattern"].get("0", config["r"]) == 2 * 3 * 3  # rank r·k²: exact
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "peft")).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(peft_model.base_model.model(x), ours(x), rtol=0, atol=1e-5)
        back = copy.deepcopy(plain)
        L.import_peft(back, tmp_path / "peft")
        torch.testing.assert_close(back(x), ours(x), rtol=0, atol=1e-5)


def test_a_training_state_of_a_switched_model_resumes_into_a_fresh_one(tmp_path, fresh_warning, monkeypatch):
    # issue #20 review: the resume builds the model as the first run did (default layout) and an optimizer
    # over its fresh adapters; the training state's adapter switches the layers, so the saved optimizer state
    # has loralib's shapes and must be checked against those, not against the fresh layout's.
    ref = _trained_loralib_net()
    x = torch.randn(2, 3, 8, 8)

    def run():
        model = _net(L)
        L.mark_only_lora_as_trainable(model)
        return model, torch.optim.AdamW(L.lora_parameters(model), lr=1e-2)

    model, opt = run()
    with pytest.warns(UserWarning, match="layout='loralib'"):
        model.load_state_dict(ref.state_dict())
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    L.save_training_state(tmp_path / "state", model, opt, step=2)
    resumed, resumed_opt = run()
    resumed.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" not in k}, strict=False)
    monkeypatch.setattr("lora_layers.layers.notices._WARNED_CONV_LAYOUT", False)
    with pytest.warns(UserWarning, match="layout='loralib'"):
        assert L.load_training_state(tmp_path / "state", resumed, resumed_opt)["step"] == 2
    assert resumed[0].layout == resumed[2].layout == "loralib"
    for m, o in ((model, opt), (resumed, resumed_opt)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(L.lora_parameters(model), L.lora_parameters(resumed)))
