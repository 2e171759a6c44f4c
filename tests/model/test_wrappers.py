"""Model-level functions see through torch.compile and DDP (issue #20 item 12).

Every pairing of {bare, compiled, DDP, compiled DDP} between saving and loading
is checked against the bare model: files hold the bare model's names, and what
is loaded is bitwise what was saved. Files written with wrapper prefixes (older
versions, loralib's ``lora_state_dict(ddp_model)``) still load.
"""
import copy
import itertools
import json
import re
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

import lora_layers as L
import lora_layers.layers.notices
from lora_layers.checkpoint import META_MODULES, CheckpointError, adapter_payload
from lora_layers.fileio import safetensors_bytes, tensor_checksum
from lora_layers.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_peft, import_peft
from lora_layers.training_state import KEY_SHA256, KEY_STATE, payload_sha256

from conftest import make_tiny_phi3

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
DDP = torch.nn.parallel.DistributedDataParallel

KINDS = ("bare", "compiled", "ddp", "compiled-ddp")
PAIRS = list(itertools.product(KINDS, KINDS))
ADAPTER_KEYS = ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
PREFIXES = ["_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."]


@pytest.fixture
def wrap(process_group):
    def wrap(model, kind):
        if "ddp" in kind:
            model = DDP(model)
        if "compiled" in kind:
            model = torch.compile(model, backend="eager")  # an OptimizedModule is what matters here
        return model
    return wrap


def make_model(seed):
    """(plain, adapted): the same plain two-Linear model for every seed, and a copy with LoRA adapters
    drawn from ``seed``."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model = copy.deepcopy(plain)
    L.inject_lora(model, ["0", "2"], r=2, lora_alpha=4)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in L.lora_parameters(model):
            p.normal_(0, 0.5)
    return plain, model


def assert_bitwise(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warnings these tests check separately
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- unwrap_model

def test_unwrap_model_peels_every_nesting(process_group):
    from lora_layers.model.unwrap import unwrap_model

    _, model = make_model(0)
    compiled = lambda m: torch.compile(m, backend="eager")  # noqa: E731
    for wrapped in (model, compiled(model), DDP(model), compiled(DDP(model)), DDP(compiled(model)),
                    nn.DataParallel(model), compiled(DDP(compiled(model))), DDP(nn.DataParallel(compiled(model)))):
        assert unwrap_model(wrapped) is model


# ----------------------------------------------------------------------------- save_lora -> load_lora

@pytest.mark.parametrize("saver,loader", PAIRS)
def test_save_lora_then_load_lora_across_wrappers(wrap, tmp_path, saver, loader):
    _, src = make_model(1)
    _, dst = make_model(2)
    path = tmp_path / "a.safetensors"
    L.save_lora(wrap(src, saver), path)
    assert sorted(load_file(path)) == ADAPTER_KEYS
    with safe_open(path, "pt") as f:
        assert sorted(json.loads(f.metadata()[META_MODULES])) == ["0", "2"]

    wrapped = wrap(dst, loader)
    result = L.load_lora(wrapped, path)
    assert result.missing_keys == result.unexpected_keys == result.mismatched_keys == []
    assert_bitwise(L.lora_state_dict(dst), L.lora_state_dict(src))
    x = torch.randn(4, 6)
    with torch.no_grad():  # a compiled forward may order float operations differently
        torch.testing.assert_close(wrapped(x), src(x), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- training state

def train(model, opt, sched, steps, first):
    for step in range(first, first + steps):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()


def optimizer_for(model):
    opt = torch.optim.AdamW(L.lora_parameters(model), lr=1e-2)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))


@pytest.mark.parametrize("saver,loader", PAIRS)
def test_training_state_resumes_bitwise_across_wrappers(wrap, tmp_path, saver, loader):
    _, reference = make_model(1)
    opt, sched = optimizer_for(reference)
    train(reference, opt, sched, 4, 0)

    # The steps run on the bare models (a compiled forward may round differently from the reference's);
    # the wrappers go to the functions under test, whose names are what matters.
    _, first = make_model(1)
    first_wrapped = wrap(first, saver)
    opt, sched = optimizer_for(first_wrapped)
    train(first, opt, sched, 2, 0)
    L.save_training_state(tmp_path / "s.pt", first_wrapped, opt, sched, step=2)
    saved = torch.load(tmp_path / "s.pt", weights_only=True)[KEY_STATE]
    assert sorted(saved["adapter"]["tensors"]) == ADAPTER_KEYS
    assert sorted(saved["optimizer"]["param_names"][0]) == ADAPTER_KEYS

    _, second = make_model(3)
    second_wrapped = wrap(second, loader)
    opt, sched = optimizer_for(second_wrapped)
    assert L.load_training_state(tmp_path / "s.pt", second_wrapped, opt, sched)["step"] == 2
    train(second, opt, sched, 2, 2)
    assert_bitwise(L.lora_state_dict(second), L.lora_state_dict(reference))


# ----------------------------------------------------------------------------- PEFT

@pytest.mark.parametrize("saver,loader", PAIRS)
def test_export_peft_then_import_peft_across_wrappers(wrap, tmp_path, saver, loader):
    plain, src = make_model(1)
    export_peft(wrap(src, saver), tmp_path / "a", task_type=None)
    assert sorted(load_file(tmp_path / "a" / PEFT_WEIGHTS_NAME)) == sorted(
        f"base_model.model.{k}.weight" for k in ADAPTER_KEYS)

    base = copy.deepcopy(plain)
    wrapped = wrap(base, loader)
    assert quiet(import_peft, wrapped, tmp_path / "a") == ["0", "2"]
    assert_bitwise(L.lora_state_dict(base), L.lora_state_dict(src))
    x = torch.randn(4, 6)
    with torch.no_grad():  # a compiled forward may order float operations differently
        torch.testing.assert_close(wrapped(x), src(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("saver", KINDS)
def test_peft_loads_an_export_from_a_wrapped_model(wrap, tmp_path, saver):
    peft = pytest.importorskip("peft")
    plain, src = make_model(1)
    export_peft(wrap(src, saver), tmp_path / "a", task_type=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT only warns about keys it did not find
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "a")).eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), src(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- names seen through wrappers

@pytest.mark.parametrize("kind", KINDS)
def test_state_dicts_and_parameter_helpers_use_canonical_names(wrap, kind):
    plain, model = make_model(1)
    wrapped = wrap(model, kind)
    assert list(quiet(L.lora_state_dict, wrapped)) == list(L.lora_state_dict(model))  # it warns: see below
    assert sorted(quiet(L.lora_state_dict, wrapped, bias="all")) == sorted(ADAPTER_KEYS + ["0.bias", "2.bias"])
    merged = L.merged_state_dict(wrapped)
    assert list(merged) == list(plain.state_dict())
    assert_bitwise(merged, L.merged_state_dict(model))
    assert [n for n, _ in L.named_lora_parameters(wrapped)] == [n for n, _ in L.named_lora_parameters(model)]
    assert [n for n, _ in L.lora_modules(wrapped)] == ["0", "2"]
    assert [id(p) for p in L.lora_parameters(wrapped)] == [id(p) for p in L.lora_parameters(model)]
    assert L.count_lora_parameters(wrapped) == L.count_lora_parameters(model) == 2 * (6 + 5) + 2 * (5 + 3)
    groups = L.lora_plus_param_groups(wrapped, lr=1.0)
    assert [[id(p) for p in g["params"]] for g in groups] == [
        [id(p) for p in g["params"]] for g in L.lora_plus_param_groups(model, lr=1.0)]
    for p in model.parameters():
        p.requires_grad_(True)
    L.mark_only_lora_as_trainable(wrapped, bias="lora_only")
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        ADAPTER_KEYS + ["0.bias", "2.bias"])


def test_lora_state_dict_of_a_wrapper_warns_that_its_keys_differ_from_loralib(wrap, monkeypatch):
    _, model = make_model(1)
    monkeypatch.setattr(lora_layers.layers.notices, "_WARNED_WRAPPER_KEYS", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.lora_state_dict(model)
    ddp = wrap(model, "ddp")
    expected = r"lora_state_dict of a wrapped model \(DistributedDataParallel\) .* loralib kept"
    with pytest.warns(UserWarning, match=expected):
        state = L.lora_state_dict(ddp)
    assert sorted(state) == ADAPTER_KEYS
    # Why it must be loud: the wrapper's own non-strict load would take none of these keys.
    assert sorted(ddp.load_state_dict(state, strict=False).unexpected_keys) == ADAPTER_KEYS


@pytest.mark.parametrize("kind", KINDS)
def test_surgery_on_a_wrapped_model(wrap, kind):
    plain, _ = make_model(1)
    reference = plain.state_dict()
    model = copy.deepcopy(plain)
    wrapped = wrap(model, kind)
    assert quiet(L.inject_lora, wrapped, ["0", "2"], r=2) == ["0", "2"]
    assert isinstance(model[0], L.Linear)
    # The wrapper's graphs and DDP's buckets were built for the LoRA layers: the plain model comes back.
    assert L.merge_and_unload(wrapped) is model
    assert type(model[0]) is nn.Linear and list(model.state_dict()) == list(reference)

    quiet(L.inject_lora, wrapped, ["0", "2"], r=2)
    assert L.unload(wrapped) is model
    assert_bitwise(model.state_dict(), reference)


def test_calls_that_add_parameters_warn_under_ddp(process_group):
    model = copy.deepcopy(make_model(1)[0])
    with pytest.warns(UserWarning, match=r"inject_lora: .*DistributedDataParallel.*not synchronised"):
        L.inject_lora(DDP(model), ["0"], r=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.inject_lora(torch.compile(model, backend="eager"), ["2"], r=2)  # nothing to synchronise


def test_import_peft_warns_under_ddp_only_when_it_replaces_layers(process_group, tmp_path):
    """issue #20 review: import_peft into a DDP model whose LoRA layers exist copies values in place (no
    Parameter added), yet warned that the parameters it adds are not synchronised."""
    plain, src = make_model(1)
    export_peft(src, tmp_path / "a", task_type=None)
    with pytest.warns(UserWarning, match=r"import_peft: .*DistributedDataParallel.*not synchronised"):
        import_peft(DDP(copy.deepcopy(plain)), tmp_path / "a")
    _, dst = make_model(2)
    ddp = DDP(dst)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert import_peft(ddp, tmp_path / "a") == ["0", "2"]
    assert_bitwise(L.lora_state_dict(dst), L.lora_state_dict(src))


def test_phi3_apply_lora_on_a_compiled_model_names_canonical_modules():
    model = make_tiny_phi3(num_hidden_layers=1)
    names = L.phi3.apply_lora(torch.compile(model, backend="eager"), r=2, targets=("o_proj",))
    assert names == ["model.layers.0.self_attn.o_proj"]
    assert isinstance(model.model.layers[0].self_attn.o_proj, L.Linear)


# ----------------------------------------------------------------------------- files with wrapper prefixes

def write_prefixed_native(model, path, prefix, modules_prefix=None):
    """A save_lora file as older versions wrote it from a wrapped model: every key and header module
    name carries ``prefix``."""
    tensors, header = adapter_payload(model, "none")
    tensors = {prefix + k: v for k, v in tensors.items()}
    modules = json.loads(header[META_MODULES])
    header[META_MODULES] = json.dumps(
        {(prefix if modules_prefix is None else modules_prefix) + k: v for k, v in modules.items()})
    header["lora_layers.sha256"] = tensor_checksum(tensors)
    path.write_bytes(safetensors_bytes(tensors, header))


@pytest.mark.parametrize("loader", ["bare", "compiled"])
@pytest.mark.parametrize("fmt", ["native", "loralib"])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_files_with_wrapper_prefixes_still_load(wrap, tmp_path, prefix, fmt, loader):
    _, src = make_model(1)
    _, dst = make_model(2)
    path = tmp_path / ("a.safetensors" if fmt == "native" else "a.pt")
    if fmt == "native":
        write_prefixed_native(src, path, prefix)
    else:  # what loralib's lora_state_dict(ddp_model) gives, saved with torch.save
        torch.save({prefix + k: v for k, v in L.lora_state_dict(src).items()}, path)
    wrapped = wrap(dst, loader)
    result = L.load_lora(wrapped, path)
    assert result.unexpected_keys == result.missing_keys == []
    assert_bitwise(L.lora_state_dict(dst), L.lora_state_dict(src))


def test_prefixed_file_header_is_still_checked(tmp_path):
    _, src = make_model(1)
    path = tmp_path / "a.safetensors"
    write_prefixed_native(src, path, "module.")
    dst = copy.deepcopy(make_model(2)[0])
    L.inject_lora(dst, ["0", "2"], r=2, lora_alpha=8)  # same shapes, another scaling
    before = snapshot(dst)
    with pytest.raises(CheckpointError, match=r"2 Linear modules \(0, 2\) differ: lora_alpha: checkpoint 4"):
        L.load_lora(dst, path)
    assert_bitwise(dst.state_dict(), before)


def test_keys_that_carry_a_prefix_inconsistently_are_not_stripped(tmp_path):
    _, src = make_model(1)
    _, dst = make_model(2)
    state = L.lora_state_dict(src)
    path = tmp_path / "a.pt"
    torch.save({("module." + k if k.startswith("0.") else k): v for k, v in state.items()}, path)
    before = snapshot(dst)
    with pytest.raises(CheckpointError, match=r"unexpected keys .*'module\.0\.lora_A', 'module\.0\.lora_B'"):
        L.load_lora(dst, path)
    assert_bitwise(dst.state_dict(), before)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_peft_folder_with_prefixed_module_names_still_imports(tmp_path, prefix):
    plain, _ = make_model(1)
    src = copy.deepcopy(plain)
    L.inject_lora(src, ["0", "2"], r=2, lora_alpha=4, rank_pattern={"2": 3}, alpha_pattern={"2": 9})
    with torch.no_grad():
        for p in L.lora_parameters(src):
            p.normal_()
    export_peft(src, tmp_path / "a", task_type=None)
    # As an older version wrote it from a wrapped model: prefixed keys, and patterns under full names.
    folder = tmp_path / "a"
    weights = load_file(folder / PEFT_WEIGHTS_NAME)
    head = "base_model.model."
    (folder / PEFT_WEIGHTS_NAME).write_bytes(safetensors_bytes(
        {head + prefix + k[len(head):]: v for k, v in weights.items()}, {"format": "pt"}))
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    assert config["rank_pattern"] == {"2": 3} and config["alpha_pattern"] == {"2": 9}
    config["rank_pattern"] = {prefix + "2": 3}  # full names, as _pattern_key writes unique ones
    config["alpha_pattern"] = {"^" + re.escape(prefix + "2"): 9}
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config))

    base = copy.deepcopy(plain)
    assert import_peft(base, folder) == ["0", "2"]
    assert (base[2].r, base[2].scaling) == (3, 3.0)
    assert_bitwise(L.lora_state_dict(base), L.lora_state_dict(src))


class Holder(nn.Module):
    """A model whose own submodule is called ``module``, as DDP names its child."""

    def __init__(self):
        super().__init__()
        self.module = nn.Sequential(L.Linear(4, 3, r=2))

    def forward(self, x):
        return self.module(x)


def make_holder(seed):
    torch.manual_seed(seed)
    holder = Holder()
    with torch.no_grad():
        for p in L.lora_parameters(holder):
            p.normal_()
    return holder


@pytest.mark.parametrize("saver,loader", [("bare", "bare"), ("ddp", "bare"), ("bare", "ddp"),
                                          ("compiled-ddp", "compiled")])
def test_a_submodule_named_module_is_never_stripped(wrap, tmp_path, saver, loader):
    src, dst = make_holder(1), make_holder(2)
    L.save_lora(wrap(src, saver), tmp_path / "a.safetensors")
    assert sorted(load_file(tmp_path / "a.safetensors")) == ["module.0.lora_A", "module.0.lora_B"]
    L.load_lora(wrap(dst, loader), tmp_path / "a.safetensors")
    assert_bitwise(L.lora_state_dict(dst), L.lora_state_dict(src))


def test_an_old_ddp_file_of_a_model_with_a_submodule_named_module_loads(tmp_path):
    src, dst = make_holder(1), make_holder(2)
    torch.save({"module." + k: v for k, v in L.lora_state_dict(src).items()}, tmp_path / "a.pt")
    L.load_lora(dst, tmp_path / "a.pt")
    assert_bitwise(L.lora_state_dict(dst), L.lora_state_dict(src))


@pytest.mark.parametrize("prefix", PREFIXES)
def test_training_state_with_prefixed_names_still_loads(tmp_path, prefix):
    _, model = make_model(1)
    opt, sched = optimizer_for(model)
    train(model, opt, sched, 2, 0)
    L.save_training_state(tmp_path / "s.pt", model, opt, sched, step=2)
    raw = torch.load(tmp_path / "s.pt", weights_only=True)
    state = raw[KEY_STATE]  # rewritten as an older version wrote it from a wrapped model
    adapter = state["adapter"]
    adapter["tensors"] = {prefix + k: v for k, v in adapter["tensors"].items()}
    modules = json.loads(adapter["header"][META_MODULES])
    adapter["header"][META_MODULES] = json.dumps({prefix + k: v for k, v in modules.items()})
    adapter["header"]["lora_layers.sha256"] = tensor_checksum(adapter["tensors"])
    state["optimizer"]["param_names"] = [[prefix + n for n in group] for group in state["optimizer"]["param_names"]]
    raw[KEY_SHA256] = payload_sha256(state)
    torch.save(raw, tmp_path / "old.pt")

    _, fresh = make_model(3)
    opt2, sched2 = optimizer_for(fresh)
    L.load_training_state(tmp_path / "old.pt", fresh, opt2, sched2)
    assert_bitwise(L.lora_state_dict(fresh), L.lora_state_dict(model))
    train(model, opt, sched, 2, 2)
    train(fresh, opt2, sched2, 2, 2)
    assert_bitwise(L.lora_state_dict(fresh), L.lora_state_dict(model))
