"""LoRASpec: the nine LoRA settings in one value, checked once (issue #21).

The error messages below are literals, as the entry points gave them before the spec
existed (the constructors, ``from_module``, ``inject_lora`` and ``phi3.apply_lora``). The
initial adapters are compared with torch's init functions run on the same seed, not with
the library's own code.
"""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from conftest import make_tiny_phi3
from _model_checks import assert_unchanged, snapshot

import lora_layers as L
from lora_layers import LoRASpec
from lora_layers.core import spec as spec_module

DTYPES = "['torch.float16', 'torch.bfloat16', 'torch.float32', 'torch.float64']"

# (setting, bad value, exception, message): every layer entry point and LoRASpec itself.
BAD = [
    ("r", -1, ValueError, "r must be a non-negative integer, got -1"),
    ("r", "x", ValueError, "r must be a non-negative integer, got 'x'"),
    ("r", 1.5, ValueError, "r must be a non-negative integer, got 1.5"),
    ("r", True, ValueError, "r must be a non-negative integer, got True"),
    ("lora_alpha", float("nan"), ValueError, "lora_alpha must be a finite number, got nan"),
    ("lora_alpha", "a", ValueError, "lora_alpha must be a finite number, got 'a'"),
    ("lora_alpha", True, ValueError, "lora_alpha must be a finite number, got True"),
    ("lora_alpha", float("inf"), ValueError, "lora_alpha must be a finite number, got inf"),
    ("lora_dropout", 1.0, ValueError, "lora_dropout must be a number in [0, 1), got 1.0"),
    ("lora_dropout", -0.1, ValueError, "lora_dropout must be a number in [0, 1), got -0.1"),
    ("lora_dropout", "p", ValueError, "lora_dropout must be a number in [0, 1), got 'p'"),
    ("lora_dropout", True, ValueError, "lora_dropout must be a number in [0, 1), got True"),
    ("backend", "cuda", ValueError, "backend must be one of ('auto', 'torch', 'triton'), got 'cuda'"),
    ("backend", None, ValueError, "backend must be one of ('auto', 'torch', 'triton'), got None"),
    ("lora_dtype", torch.int8, TypeError, f"lora_dtype must be None or one of {DTYPES}, got torch.int8"),
    ("lora_dtype", "float32", TypeError, f"lora_dtype must be None or one of {DTYPES}, got 'float32'"),
    ("init", "xavier", ValueError, "init must be one of ('kaiming', 'gaussian', 'pissa', 'olora') or 'pissa_niter_<N>' with N a positive integer (PiSSA by a randomized SVD of N iterations), got 'xavier'"),
    ("init", None, ValueError, "init must be one of ('kaiming', 'gaussian', 'pissa', 'olora') or 'pissa_niter_<N>' with N a positive integer (PiSSA by a randomized SVD of N iterations), got None"),
    ("init", "pissa_niter_0", ValueError, "init must be one of ('kaiming', 'gaussian', 'pissa', 'olora') or 'pissa_niter_<N>' with N a positive integer (PiSSA by a randomized SVD of N iterations), got 'pissa_niter_0'"),
    ("init", "pissa_niter_x", ValueError, "init must be one of ('kaiming', 'gaussian', 'pissa', 'olora') or 'pissa_niter_<N>' with N a positive integer (PiSSA by a randomized SVD of N iterations), got 'pissa_niter_x'"),
    ("use_dora", "yes", TypeError, "use_dora must be True or False, got 'yes'"),
    ("use_dora", 1, TypeError, "use_dora must be True or False, got 1"),
    ("use_dora", None, TypeError, "use_dora must be True or False, got None"),
]
# A model-level call needs an adapter on every module it selects: its rank message says "positive".
MODEL_BAD = [(s, v, e, m.replace("non-negative", "positive")) for s, v, e, m in BAD] + [
    ("r", 0, ValueError, "r must be a positive integer, got 0")]
IDS = [f"{s}={v!r}" for s, v, _, _ in BAD]
MODEL_IDS = [f"{s}={v!r}" for s, v, _, _ in MODEL_BAD]


def _raises(exc, message, fn):
    with pytest.raises(exc) as info:
        fn()
    assert str(info.value) == message


def _settings(setting, value):
    return {setting: value} if setting == "r" else {"r": 2, setting: value}


@pytest.mark.parametrize("setting, value, exc, message", BAD, ids=IDS)
def test_bad_setting_same_error_from_spec_and_every_layer_entry(setting, value, exc, message):
    kwargs = _settings(setting, value)
    _raises(exc, message, lambda: LoRASpec(**{"lora_alpha": 1, **kwargs}))
    _raises(exc, message, lambda: L.Linear(4, 4, **kwargs))
    _raises(exc, message, lambda: L.MergedLinear(4, 4, enable_lora=[True, False], **kwargs))
    _raises(exc, message, lambda: L.Conv2d(2, 2, 1, **kwargs))
    if setting not in ("lora_dropout", "backend"):  # not arguments of an Embedding
        _raises(exc, message, lambda: L.Embedding(4, 4, **kwargs))
    for cls, module in ((L.Linear, nn.Linear(4, 4)), (L.Conv2d, nn.Conv2d(2, 2, 1)),
                        (L.Embedding, nn.Embedding(4, 4))):
        if cls is L.Embedding and setting == "lora_dropout":
            continue
        before = [(p, p.requires_grad, p.detach().clone()) for p in module.parameters()]
        _raises(exc, message, lambda: cls.from_module(module, **kwargs))
        assert all(p.requires_grad == flag and torch.equal(p, value) for p, flag, value in before)
        assert not hasattr(module, "lora_A")


@pytest.mark.parametrize("setting, value, exc, message", MODEL_BAD, ids=MODEL_IDS)
def test_bad_setting_same_error_from_inject_lora_and_changes_nothing(setting, value, exc, message):
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(4, 4))
    before = snapshot(model)
    _raises(exc, message, lambda: L.inject_lora(model, ["0", "1"], **_settings(setting, value)))
    assert_unchanged(model, before)


@pytest.mark.parametrize("setting, value, exc, message", MODEL_BAD, ids=MODEL_IDS)
def test_bad_setting_same_error_from_apply_lora_and_changes_nothing(setting, value, exc, message):
    model = make_tiny_phi3()
    before = snapshot(model)
    _raises(exc, message, lambda: L.phi3.apply_lora(model, **_settings(setting, value)))
    assert_unchanged(model, before)


def test_inject_lora_refuses_a_spec_without_adapter_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4))
    before = snapshot(model)
    _raises(ValueError, "r must be a positive integer, got 0",
            lambda: L.inject_lora(model, ["0"], spec=LoRASpec(r=0, lora_alpha=1)))
    assert_unchanged(model, before)


def test_spec_and_a_setting_together_is_an_error():
    spec = LoRASpec(r=2, lora_alpha=4)
    model = nn.Sequential(nn.Linear(4, 4))
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"inject_lora: pass the LoRA settings either as spec or as keyword "
                                        r"arguments, not both \(got spec and \['lora_dropout'\]\)"):
        L.inject_lora(model, ["0"], spec=spec, lora_dropout=0.1)
    with pytest.raises(TypeError, match=r"inject_lora: pass the LoRA settings .* \['r'\]"):
        L.inject_lora(model, ["0"], 4, spec=spec)  # r by position, as before the spec existed
    with pytest.raises(TypeError, match=r"inject_lora\(\) got an unexpected keyword argument 'lora_alfa'"):
        L.inject_lora(model, ["0"], lora_alfa=4)
    assert_unchanged(model, before)
    linear = nn.Linear(4, 4)
    with pytest.raises(TypeError, match=r"Linear.from_module: pass the LoRA settings .* \['r'\]"):
        L.Linear.from_module(linear, spec=spec, r=2)
    with pytest.raises(TypeError, match=r"MergedLinear.from_module: pass the LoRA settings .* \['r'\]"):
        L.MergedLinear.from_module(linear, 2, spec=spec, enable_lora=[True])
    with pytest.raises(TypeError, match=r"Embedding.from_module got an unexpected keyword argument 'lora_dropout'"):
        L.Embedding.from_module(nn.Embedding(4, 4), lora_dropout=0.0)
    assert linear.weight.requires_grad and not hasattr(linear, "lora_A")


def test_spec_is_frozen_normalised_and_compares_by_value():
    np = pytest.importorskip("numpy")
    spec = LoRASpec(np.int64(4), np.float32(8.0), np.float64(0.25), merge_weights=0, use_rslora="yes",
                    use_dora=np.bool_(True))
    assert spec == LoRASpec(4, 8.0, 0.25, merge_weights=False, use_rslora=True, use_dora=True)
    assert [type(getattr(spec, f)) for f in ("r", "lora_alpha", "lora_dropout", "merge_weights", "use_rslora",
                                             "use_dora")] == [int, float, float, bool, bool, bool]
    assert type(LoRASpec(2, np.int32(3)).lora_alpha) is int  # an integral alpha stays an int, as before
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.r = 8
    assert hash(spec) == hash(LoRASpec(4, 8.0, 0.25, False, True, use_dora=True))
    assert [f.name for f in dataclasses.fields(LoRASpec)] == [
        "r", "lora_alpha", "lora_dropout", "merge_weights", "use_rslora", "lora_dtype", "backend", "use_dora",
        "init", "dora_mode"]  # dora_mode last (issue #25): every positional call keeps its meaning
    with pytest.raises(TypeError):
        LoRASpec(r=8)  # no default for lora_alpha: the entry points' defaults differ


def _adapter_reference(shape_a, shape_b, dtype, init, r, embedding=False):
    """What the layer's adapters must hold right after the caller seeded torch: torch's own inits."""
    A, B = torch.empty(shape_a, dtype=dtype), torch.empty(shape_b, dtype=dtype)
    if embedding:
        return nn.init.zeros_(A), nn.init.normal_(B)
    if init == "gaussian":
        nn.init.normal_(A, std=1 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, nn.init.zeros_(B)


SETTINGS = [
    dict(r=4, lora_alpha=8),
    dict(r=3, lora_alpha=2.5, lora_dropout=0.1, merge_weights=False, use_rslora=True, lora_dtype=torch.float64,
         backend="torch", init="gaussian"),
    dict(r=2, lora_alpha=4, use_dora=True),
]


def _attributes(layer):
    return (layer.r, layer.lora_alpha, layer.scaling, layer.lora_dropout.p, layer.merge_weights, layer.use_rslora,
            layer.lora_dtype, layer.backend, layer.use_dora, layer.init, layer.lora_A.dtype)


@pytest.mark.parametrize("kind, settings", [
    (kind, settings) for kind in ("linear", "merged", "conv", "embedding") for settings in SETTINGS
    if kind in ("linear", "merged") or not settings.get("use_dora")])  # DoRA is Linear's and MergedLinear's
def test_from_module_spec_and_keywords_build_identical_layers(kind, settings):
    cls, module, extra = {
        "linear": (L.Linear, nn.Linear(6, 4), {}),
        "merged": (L.MergedLinear, nn.Linear(6, 4), {"enable_lora": [True, False]}),
        "conv": (L.Conv2d, nn.Conv2d(2, 4, 3), {}),
        "embedding": (L.Embedding, nn.Embedding(6, 4), {}),
    }[kind]
    if kind == "embedding":  # an embedding takes no lora_dropout; a spec's is not used
        settings = {k: v for k, v in settings.items() if k != "lora_dropout"}
    spec = LoRASpec(**settings)
    torch.manual_seed(7)
    by_keywords = cls.from_module(copy.deepcopy(module), **settings, **extra)
    torch.manual_seed(7)
    by_spec = cls.from_module(copy.deepcopy(module), spec=dataclasses.replace(spec, lora_dropout=0.3)
                              if kind == "embedding" else spec, **extra)
    assert _attributes(by_keywords) == _attributes(by_spec)
    assert by_keywords.spec == by_spec.spec == (dataclasses.replace(spec, lora_dropout=0.0) if kind == "embedding"
                                                else spec)
    r, alpha = settings["r"], settings["lora_alpha"]
    assert by_spec.scaling == (alpha / math.sqrt(r) if settings.get("use_rslora") else alpha / r)
    torch.manual_seed(7)
    A, B = _adapter_reference(by_spec.lora_A.shape, by_spec.lora_B.shape, settings.get("lora_dtype", torch.float32),
                              settings.get("init", "kaiming"), r, embedding=kind == "embedding")
    for layer in (by_keywords, by_spec):
        assert torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B, B)
    for name, p in by_keywords.state_dict().items():
        assert torch.equal(p, by_spec.state_dict()[name]), name


def test_constructor_builds_the_spec_it_was_given_and_keeps_loralib_numbers():
    torch.manual_seed(3)
    layer = L.Linear(6, 4, r=2, lora_alpha=4, lora_dropout=0.1, use_rslora=True)
    torch.manual_seed(3)
    reference = nn.Linear(6, 4)
    reference.reset_parameters()  # LoRALayer.reset_parameters runs nn.Linear's again, as loralib does
    A = nn.init.kaiming_uniform_(torch.empty(2, 6), a=math.sqrt(5))
    assert torch.equal(layer.weight, reference.weight) and torch.equal(layer.bias, reference.bias)
    assert torch.equal(layer.lora_A, A) and not layer.lora_B.any()
    assert layer.spec == LoRASpec(2, 4, 0.1, use_rslora=True)
    assert L.Conv2d(2, 2, 1).spec == L.Embedding(4, 4).spec == LoRASpec(0, 1)


def test_layer_spec_rebuilds_identical_settings():
    source = L.MergedLinear(8, 6, r=2, lora_alpha=3, lora_dropout=0.2, enable_lora=[True, False, True],
                            merge_weights=False, lora_dtype=torch.float64, backend="torch", use_dora=True,
                            init="gaussian")
    rebuilt = L.Linear.from_module(nn.Linear(8, 8), spec=source.spec)
    assert rebuilt.spec == source.spec
    assert _attributes(rebuilt) == _attributes(source)
    emb = L.Embedding.from_module(nn.Embedding(5, 3), spec=LoRASpec(r=2, lora_alpha=3, init="gaussian"))
    assert L.Embedding.from_module(nn.Embedding(5, 3), spec=emb.spec).spec == emb.spec

    class Loralib(nn.Linear, L.LoRALayer):  # a loralib-style class of the user's own
        def __init__(self):
            nn.Linear.__init__(self, 4, 4)
            L.LoRALayer.__init__(self, r=2, lora_alpha=5, lora_dropout=0.1, merge_weights=False)

    assert Loralib().spec == LoRASpec(2, 5, 0.1, merge_weights=False)


def test_inject_lora_spec_and_keywords_build_identical_models():
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Embedding(6, 6), nn.Conv1d(6, 6, 1), nn.Linear(6, 9))
    kwargs = dict(exclude=["1"], rank_pattern={"4": 3}, alpha_pattern={"3": 5},
                  merged_splits={"4": ([3, 6], [True, False])})
    settings = dict(r=2, lora_alpha=4, lora_dropout=0.1, use_rslora=True, init="gaussian", backend="torch")
    models = []
    for spec in (None, LoRASpec(**settings)):
        model = copy.deepcopy(base)
        torch.manual_seed(11)
        names = L.inject_lora(model, r"\d", spec=spec, **kwargs, **({} if spec else settings))
        assert names == ["0", "2", "3", "4"]
        models.append(model)
    by_keywords, by_spec = models
    for name, value in by_keywords.state_dict().items():
        assert torch.equal(value, by_spec.state_dict()[name]), name
    expected = LoRASpec(**settings)
    assert by_spec[0].spec == by_keywords[0].spec == expected
    assert by_spec[2].spec == dataclasses.replace(expected, lora_dropout=0.0)  # an embedding has no dropout
    assert by_spec[3].spec == dataclasses.replace(expected, lora_alpha=5)
    assert by_spec[4].spec == dataclasses.replace(expected, r=3) and type(by_spec[4]) is L.MergedLinear


def test_apply_lora_passes_one_spec_to_every_layer():
    model = make_tiny_phi3()
    L.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True, init="gaussian",
                      backend="torch")
    specs = {layer.spec for _, layer in L.lora_modules(model)}
    assert specs == {LoRASpec(4, 8, 0.1, use_rslora=True, init="gaussian", backend="torch")}


def _count_calls(monkeypatch, name):
    calls = []
    check = getattr(spec_module, name)
    monkeypatch.setattr(spec_module, name, lambda *a, **k: calls.append(a) or check(*a, **k))
    return calls


def test_settings_are_checked_once_per_call(monkeypatch):
    alpha_checks = _count_calls(monkeypatch, "check_alpha")
    dropout_checks = _count_calls(monkeypatch, "check_dropout")
    L.Linear(4, 4, r=2, lora_alpha=3, lora_dropout=0.1)
    L.Linear.from_module(nn.Linear(4, 4), r=2, lora_alpha=3, lora_dropout=0.1)
    L.inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Conv1d(4, 4, 1)), r"\d", r=2, lora_alpha=3,
                  lora_dropout=0.1)
    assert len(alpha_checks) == len(dropout_checks) == 3  # once per call, not once per module or per layer


def _adapters(model):
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("positional, keywords", [
    ((4,), dict(r=4)),
    ((4, 8), dict(r=4, lora_alpha=8)),
    ((4, 8, 0.1), dict(r=4, lora_alpha=8, lora_dropout=0.1)),
])
def test_inject_lora_takes_the_first_settings_by_position_as_before_the_spec(positional, keywords):
    """inject_lora(model, targets, r, lora_alpha, lora_dropout): the positions it had before LoRASpec."""
    built = []
    for args, kwargs in ((positional, {}), ((), keywords)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        L.inject_lora(model, ["0", "2"], *args, **kwargs)
        built.append(model)
    a, b = built
    assert [m.spec for _, m in L.lora_modules(a)] == [m.spec for _, m in L.lora_modules(b)]
    assert a[0].spec == LoRASpec(**{"r": 8, "lora_alpha": 16, **keywords})
    assert all(torch.equal(x, y) for x, y in zip(_adapters(a).values(), _adapters(b).values()))


@pytest.mark.parametrize("cls, base, extra", [
    (L.Linear, lambda: nn.Linear(6, 4), {}),
    (L.MergedLinear, lambda: nn.Linear(6, 4), dict(enable_lora=[True, False])),
    (L.Conv2d, lambda: nn.Conv2d(2, 3, 3), {}),
])
def test_from_module_takes_r_alpha_dropout_and_merge_weights_by_position(cls, base, extra):
    torch.manual_seed(0)
    by_position = cls.from_module(base(), 4, 8, 0.1, False, **extra)
    torch.manual_seed(0)
    by_keyword = cls.from_module(base(), r=4, lora_alpha=8, lora_dropout=0.1, merge_weights=False, **extra)
    assert by_position.spec == by_keyword.spec == LoRASpec(4, 8, 0.1, False)
    assert torch.equal(by_position.lora_A, by_keyword.lora_A)


def test_embedding_from_module_takes_merge_weights_third_by_position():
    """An embedding has no adapter dropout: its positions were (r, lora_alpha, merge_weights)."""
    layer = L.Embedding.from_module(nn.Embedding(5, 3), 4, 8, False)
    assert layer.spec == LoRASpec(4, 8, 0.0, False)


def test_none_by_keyword_is_a_value_and_refused_not_a_default():
    """The positional settings default to 'not given'; None passed for one is checked as a value."""
    with pytest.raises(ValueError, match="r must be a non-negative integer, got None"):
        L.Linear.from_module(nn.Linear(3, 3), r=None)
    with pytest.raises((TypeError, ValueError), match="got None"):
        L.inject_lora(nn.Sequential(nn.Linear(3, 3)), ["0"], lora_alpha=None)
