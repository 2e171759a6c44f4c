"""load_adapter: a plain model gets the adapters a save_lora file or a PEFT folder describes (issue #24).

The reference for every round trip is the model that was saved: the fresh model
must give its outputs bit for bit (native files) or within float rounding (PEFT
folders, where a fused layer comes back as one rank-r·n Linear). Folders that PEFT itself
writes are in tests/parity/test_load_adapter_peft.py.
"""
import copy

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers import phi3
from lora_layers.checkpoint import CheckpointError

from conftest import make_tiny_phi3
from _model_checks import assert_unchanged, logits, randomize_adapters, snapshot


def _saved_phi3(tmp_path, build, seed=1):
    model = make_tiny_phi3()
    build(model)
    randomize_adapters(model, seed=seed)
    path = tmp_path / "adapter.safetensors"
    L.save_lora(model, path)
    return model, path


def _per_module_differences(model):
    """rsLoRA on a GQA qkv with only q and v adapted, per-module ranks and alphas, DoRA in fp64 on down_proj."""
    L.inject_lora(model, ["qkv_proj", "o_proj"], r=4, lora_alpha=8, use_rslora=True,
                  merged_splits={"qkv_proj": (phi3.qkv_split_sizes(model.config), [True, False, True])},
                  rank_pattern={r"model\.layers\.1\.self_attn\.o_proj": 2}, alpha_pattern={"o_proj": 3.0})
    L.inject_lora(model, ["down_proj"], r=2, lora_alpha=5, use_dora=True, lora_dtype=torch.float64)


PHI3_BUILDS = {
    "preset": lambda m: phi3.apply_lora(m, r=4, lora_alpha=8),
    "preset_dora_rslora_qv": lambda m: phi3.apply_lora(m, r=4, lora_alpha=16, use_dora=True, use_rslora=True,
                                                      qkv=("q", "v"), targets=("qkv_proj", "gate_up_proj")),
    "per_module": _per_module_differences,
}


def _config(layer):
    cfg = (type(layer), layer.r, layer.lora_alpha, layer.scaling, layer.use_rslora, layer.use_dora,
           layer.lora_dropout.p, layer.lora_A.dtype, getattr(layer, "lora_dtype", None))
    return cfg + ((list(layer.split_sizes), list(layer.enable_lora)) if isinstance(layer, L.MergedLinear) else ())


@pytest.mark.parametrize("build", list(PHI3_BUILDS), ids=list(PHI3_BUILDS))
def test_phi3_round_trip_gives_the_same_logits_bitwise(tmp_path, build):
    saved, path = _saved_phi3(tmp_path, PHI3_BUILDS[build])
    fresh = make_tiny_phi3()

    names = L.load_adapter(fresh, path)

    assert names == [n for n, _ in L.lora_modules(saved)]
    assert {n: _config(m) for n, m in L.lora_modules(fresh)} == {n: _config(m) for n, m in L.lora_modules(saved)}
    assert torch.equal(logits(fresh), logits(saved))
    want = L.lora_state_dict(saved)
    got = L.lora_state_dict(fresh)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(want)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 8)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.conv_loralib = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.lin(self.emb(ids))
        h = h + self.conv(h.unsqueeze(1)).mean(1) + self.conv_loralib(h.unsqueeze(1)).mean(1)
        return self.head(h)


IDS = torch.tensor([[1, 5, 9, 17], [2, 3, 4, 19]])


def _adapted_net(tmp_path, bias="none"):
    net = Net()
    L.inject_lora(net, ["emb", "lin", "conv"], r=2, lora_alpha=4, rank_pattern={"lin": 3})
    net.conv_loralib = L.Conv2d.from_module(net.conv_loralib, r=2, lora_alpha=6, layout="loralib")
    randomize_adapters(net, seed=3)
    with torch.no_grad():
        net.lin.bias.add_(1.0)  # a trained bias: only bias="all" carries it over
    path = tmp_path / "net.safetensors"
    L.save_lora(net, path, bias=bias)
    return net, path


def test_plain_module_round_trip_with_embedding_linear_and_both_conv_layouts(tmp_path):
    saved, path = _adapted_net(tmp_path, bias="all")
    fresh = Net()

    assert L.load_adapter(fresh, path) == ["emb", "lin", "conv", "conv_loralib"]

    assert [type(m) for m in (fresh.emb, fresh.lin, fresh.conv, fresh.conv_loralib)] == [
        L.Embedding, L.Linear, L.Conv2d, L.Conv2d]
    assert (fresh.conv.layout, fresh.conv_loralib.layout) == ("lora_layers", "loralib")
    assert fresh.lin.r == 3 and fresh.conv_loralib.scaling == 3.0
    with torch.no_grad():
        assert torch.equal(fresh(IDS), saved(IDS))
    assert fresh.lin.bias.requires_grad and not fresh.lin.weight.requires_grad  # bias="all", as saved


def test_a_file_with_a_wrappers_prefix_loads(tmp_path):
    # issue #20 review: older versions wrote a compiled/DDP model's file with '_orig_mod.'/'module.' in every
    # key and header module name; load_lora strips it, load_adapter refused "no such module".
    import json
    from lora_layers.checkpoint import META_MODULES, META_SHA256, read_checkpoint, tensor_checksum
    from lora_layers.fileio import safetensors_bytes

    saved, path = _adapted_net(tmp_path, bias="all")
    tensors, meta = read_checkpoint(path)
    tensors = {"module._orig_mod." + k: v for k, v in tensors.items()}
    modules = {"module._orig_mod." + k: v for k, v in json.loads(meta[META_MODULES]).items()}
    path = tmp_path / "wrapped.safetensors"
    path.write_bytes(safetensors_bytes(tensors, {**meta, META_MODULES: json.dumps(modules),
                                                 META_SHA256: tensor_checksum(tensors)}))
    fresh = Net()

    assert L.load_adapter(fresh, path) == ["emb", "lin", "conv", "conv_loralib"]

    with torch.no_grad():
        assert torch.equal(fresh(IDS), saved(IDS))


@pytest.mark.parametrize("cls", [L.Linear, L.MergedLinear])
@pytest.mark.parametrize("shape", [(8, 8), (8, 6)], ids=["square", "wide"])
def test_a_hand_built_fan_in_fan_out_layer_loads_onto_its_unloaded_model(tmp_path, cls, shape):
    # issue #20 review: unload() gives a loralib-style fan_in_fan_out layer (weight stored (in, out)) back as
    # an nn.Linear storing (out, in); load_adapter built fan_in_fan_out=True over it, reading that weight
    # transposed: silently wrong for a square layer, refused ("weight has shape (6, 8)") for another.
    torch.manual_seed(0)
    kwargs = {"enable_lora": [True, False]} if cls is L.MergedLinear else {}
    net = nn.Sequential(cls(*shape, r=2, fan_in_fan_out=True, **kwargs), nn.ReLU())
    L.mark_only_lora_as_trainable(net)
    randomize_adapters(net, seed=1)
    L.save_lora(net, tmp_path / "a.safetensors")
    plain = L.unload(copy.deepcopy(net))

    L.load_adapter(plain, tmp_path / "a.safetensors")

    assert type(plain[0]) is cls and not plain[0].fan_in_fan_out
    x = torch.randn(3, shape[0])
    with torch.no_grad():  # unload's transposed copy of the weight may round differently in the matmul
        torch.testing.assert_close(plain(x), net(x), rtol=1e-6, atol=1e-6)


def test_a_file_without_biases_leaves_the_biases_alone(tmp_path):
    saved, path = _adapted_net(tmp_path, bias="none")
    fresh = Net()
    L.load_adapter(fresh, path)
    assert torch.equal(fresh.lin.bias, Net().lin.bias)  # the file holds no bias: the fresh one stays
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "lora_" not in n)


def test_peft_folder_from_export_peft(tmp_path):
    saved = make_tiny_phi3()
    phi3.apply_lora(saved, r=4, lora_alpha=8, qkv=("q", "v"))
    randomize_adapters(saved, seed=2)
    L.export_peft(saved, tmp_path / "peft")
    fresh = make_tiny_phi3()

    names = L.load_adapter(fresh, tmp_path / "peft")

    assert names == [n for n, _ in L.lora_modules(saved)]
    torch.testing.assert_close(logits(fresh), logits(saved), rtol=0, atol=1e-6)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, _ in L.named_lora_parameters(fresh)}


# ----------------------------------------------------------------------------- refusals change nothing

def _loralib_file(tmp_path):
    net = Net()
    L.inject_lora(net, ["lin"], r=2)
    path = tmp_path / "loralib.pt"
    torch.save(L.lora_state_dict(net), path)
    return path


class Renamed(nn.Module):
    """Net's names with other layer types: ``emb`` is a Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(20, 8)
        self.lin = nn.Linear(8, 8)


def _tampered(tmp_path, **changes):
    """Net's file with ``changes`` made to module 'lin''s header entry (the checksum covers tensors only)."""
    import json
    from lora_layers.checkpoint import META_MODULES, read_checkpoint
    from lora_layers.fileio import safetensors_bytes

    tensors, meta = read_checkpoint(_adapted_net(tmp_path)[1])
    modules = json.loads(meta[META_MODULES])
    modules["lin"].update(changes)
    path = tmp_path / "tampered.safetensors"
    path.write_bytes(safetensors_bytes(tensors, {**meta, META_MODULES: json.dumps(modules)}))
    return path, Net()


def _root_adapter(tmp_path):
    torch.manual_seed(0)
    layer = L.Linear(4, 4, r=2)
    L.mark_only_lora_as_trainable(layer)
    L.save_lora(layer, tmp_path / "root.safetensors")
    torch.manual_seed(0)
    return tmp_path / "root.safetensors", nn.Linear(4, 4)


def _peft_folder(tmp_path):
    model = make_tiny_phi3()
    L.inject_lora(model, ["down_proj"], r=2)
    L.export_peft(model, tmp_path / "peft")
    return tmp_path / "peft"


REFUSALS = {
    "already_adapted": (lambda tmp: _adapted_net(tmp)[::-1],
                        CheckpointError, r"already has LoRA layers \(emb, lin, conv, conv_loralib\).*load_lora"),
    "loralib_file": (lambda tmp: (_loralib_file(tmp), Net()), CheckpointError,
                     r"records no adapter settings.*inject_lora.*load_lora"),
    "no_such_module": (lambda tmp: (_adapted_net(tmp)[1], nn.Sequential(nn.Linear(8, 8))), CheckpointError,
                       r"'emb': no such module in Sequential"),
    "other_layer_type": (lambda tmp: (_adapted_net(tmp)[1], Renamed()), CheckpointError,
                         r"'emb' \(Linear\): the file has an adapter of class Embedding, which cannot go on a Linear"),
    # Built fine from the header, refused by the shape check afterwards: the swap is undone.
    "other_model_size": (lambda tmp: (_saved_phi3(tmp, lambda m: L.inject_lora(m, ["o_proj", "down_proj"]))[1],
                                      make_tiny_phi3(intermediate_size=64)), CheckpointError,
                         r"down_proj.lora_A: shape mismatch, expected \(8, 64\) \(model\), got \(8, 96\)"),
    # Refused while building (the header's splits do not add up to this model's qkv_proj).
    "other_splits": (lambda tmp: (_saved_phi3(tmp, PHI3_BUILDS["preset"])[1], make_tiny_phi3(gqa=False)),
                     CheckpointError, r"cannot put a LoRA adapter on model.layers.0.self_attn.qkv_proj"),
    "class_not_a_name": (lambda tmp: _tampered(tmp, **{"class": ["Linear"]}), CheckpointError,
                         r"'lin' \(Linear\): the file has an adapter of class \['Linear'\], expected one of"),
    "bad_rank": (lambda tmp: _tampered(tmp, r="x"), CheckpointError, r"cannot put a LoRA adapter on lin: .*'x'"),
    "bad_dtype": (lambda tmp: _tampered(tmp, lora_dtype="int8"), CheckpointError,
                  r"'lin' \(Linear\): lora_dtype 'int8' is not a floating torch dtype"),
    # issue #20 review: a header contradicting itself (a stale scaling) was refused with the advice to call
    # load_adapter, the very call that refused it.
    "stale_scaling": (lambda tmp: _tampered(tmp, scaling=99.0), CheckpointError,
                      r"(?s)module 'lin' \(Linear\) differs: scaling: checkpoint 99.0, model 1.33+(?!.*load_adapter)"),
    "peft_other_model_size": (lambda tmp: (_peft_folder(tmp), make_tiny_phi3(intermediate_size=64)),
                              CheckpointError, r"(?s)cannot import PEFT adapter .*down_proj' \(Linear\): "
                                               r"lora_A shape mismatch, expected \(2, 64\), got \(2, 96\)"),
    "root_module": (_root_adapter, CheckpointError,
                    r"the adapter is on the model itself \(Linear\).*lora_layers.Linear.from_module\(model"),
    "missing_file": (lambda tmp: (tmp / "nothing.safetensors", Net()), FileNotFoundError, "nothing.safetensors"),
    "not_a_path": (lambda tmp: (3, Net()), TypeError, r"path must be a file or folder path .*got int 3"),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_refusals_name_the_problem_and_change_nothing(tmp_path, case):
    make, exc, match = REFUSALS[case]
    path, model = make(tmp_path)
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        L.load_adapter(model, path)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- load_lora says it once

def test_load_lora_with_other_settings_says_it_once_and_names_the_call_that_fits(tmp_path):
    saved, path = _saved_phi3(tmp_path, lambda m: phi3.apply_lora(m, r=8, lora_alpha=8, use_rslora=True,
                                                                  qkv=("q", "v")))
    model = make_tiny_phi3()
    phi3.apply_lora(model)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        L.load_lora(model, path)
    assert_unchanged(model, before)
    message = str(info.value)
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    # qkv_proj also differs in enable_lora: three groups of modules, then the hint.
    assert len(lines) == 4, message
    assert "4 MergedLinear modules (qkv_proj ×2, gate_up_proj ×2) differ" not in message  # qkv differs more
    assert "2 MergedLinear modules (gate_up_proj ×2) differ: r: checkpoint 8, model 16" in message
    assert "'model.layers.0" not in message
    call = "lora_layers.phi3.apply_lora(model, r=8, lora_alpha=8, use_rslora=True, qkv=('q', 'v'))"
    assert call in message and "lora_layers.load_adapter(model, path)" in message

    fresh = make_tiny_phi3()  # the named call really fits
    eval(call, {"lora_layers": L, "model": fresh})
    L.load_lora(fresh, path)
    assert torch.equal(logits(fresh), logits(saved))


def test_the_named_call_keeps_the_dropout_of_layers_beside_an_embedding(tmp_path):
    # issue #20 review: an Embedding records dropout 0.0, so the dropout 'varied' and was left out of the call.
    from lora_layers.checkpoint import fitting_call

    saved = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    L.inject_lora(saved, ["0", "1"], r=2, lora_dropout=0.1)
    L.save_lora(saved, tmp_path / "a.safetensors")
    from lora_layers.checkpoint import META_MODULES, read_checkpoint
    import json
    modules = json.loads(read_checkpoint(tmp_path / "a.safetensors")[1][META_MODULES])
    fresh = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    call = fitting_call(fresh, modules)
    assert call == "lora_layers.inject_lora(model, ['0', '1'], r=2, lora_alpha=16, lora_dropout=0.1)"
    eval(call, {"lora_layers": L, "model": fresh})
    assert fresh[1].lora_dropout.p == 0.1
    L.load_lora(fresh, tmp_path / "a.safetensors")


def test_load_lora_names_an_inject_lora_call_for_other_models(tmp_path):
    saved = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    L.inject_lora(saved, ["0", "2"], r=3, lora_alpha=6, use_dora=True)
    randomize_adapters(saved)
    L.save_lora(saved, tmp_path / "a.safetensors")
    model = copy.deepcopy(saved)
    model = L.unload(model)
    L.inject_lora(model, ["0", "2"], r=2)
    with pytest.raises(CheckpointError) as info:
        L.load_lora(model, tmp_path / "a.safetensors")
    call = "lora_layers.inject_lora(model, ['0', '2'], r=3, lora_alpha=6, use_dora=True)"
    assert call in str(info.value)
    assert "2 Linear modules (0, 2) differ: r: checkpoint 3, model 2; lora_alpha: checkpoint 6, model 16; " \
           "scaling: checkpoint 2.0, model 8.0; use_dora: checkpoint True, model False" in str(info.value)
    assert "unexpected keys" not in str(info.value)  # the magnitudes are explained by use_dora
    fresh = L.unload(copy.deepcopy(model))
    eval(call, {"lora_layers": L, "model": fresh})
    L.load_lora(fresh, tmp_path / "a.safetensors")
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(fresh(x), saved(x))


FITTING = {
    "preset": (lambda m: phi3.apply_lora(m, r=4, lora_alpha=8, targets=("qkv_proj", "o_proj")),
               "lora_layers.phi3.apply_lora(model, r=4, lora_alpha=8, targets=('qkv_proj', 'o_proj'))"),
    "one_module": (lambda m: L.inject_lora(m, ["model.layers.0.self_attn.o_proj"], r=2),
                   "lora_layers.inject_lora(model, ['model.layers.0.self_attn.o_proj'], r=2, lora_alpha=16)"),
    "unfused_qkv": (lambda m: L.inject_lora(m, ["qkv_proj"], r=2, lora_alpha=2, use_rslora=True),
                    "lora_layers.inject_lora(model, ['qkv_proj'], r=2, lora_alpha=2, use_rslora=True)"),
    "ranks_vary": (lambda m: L.inject_lora(m, ["o_proj"], r=2, rank_pattern={r"model\.layers\.1\..*": 4}), None),
    "gate_only": (lambda m: L.inject_lora(m, ["gate_up_proj"], merged_splits={"gate_up_proj": ([96, 96], [1, 0])}),
                  None),
    # issue #20 review: without lora_dtype the call built float32 adapters that load_lora rounded the
    # saved float64 values into.
    "adapter_dtype": (lambda m: phi3.apply_lora(m, r=4, lora_alpha=8, lora_dtype=torch.float64),
                      "lora_layers.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dtype=torch.float64)"),
    "adapter_dtype_inject": (lambda m: L.inject_lora(m, ["o_proj"], r=2, lora_dtype=torch.float64),
                             "lora_layers.phi3.apply_lora(model, r=2, lora_alpha=16, lora_dtype=torch.float64, "
                             "targets=('o_proj',), lora_dropout=0.0)"),
    # issue #20 review: the named call left out the dropout (apply_lora's default is 0.05, inject_lora's 0).
    "dropout_off": (lambda m: phi3.apply_lora(m, r=4, lora_alpha=8, lora_dropout=0.0),
                    "lora_layers.phi3.apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)"),
    "dropout_on": (lambda m: L.inject_lora(m, ["model.layers.0.self_attn.o_proj"], r=2, lora_dropout=0.1),
                   "lora_layers.inject_lora(model, ['model.layers.0.self_attn.o_proj'], r=2, lora_alpha=16, "
                   "lora_dropout=0.1)"),
    "adapter_dtype_varies": (lambda m: (L.inject_lora(m, ["o_proj"], r=2, lora_dtype=torch.float64),
                                        L.inject_lora(m, ["down_proj"], r=2)), None),
}


@pytest.mark.parametrize("case", list(FITTING), ids=list(FITTING))
def test_the_named_call_builds_exactly_the_saved_adapters(tmp_path, case):
    import json
    from safetensors import safe_open
    from lora_layers.checkpoint import META_MODULES, fitting_call

    build, expected = FITTING[case]
    saved, path = _saved_phi3(tmp_path, build)
    with safe_open(str(path), "pt") as f:
        modules = json.loads(f.metadata()[META_MODULES])
    fresh = make_tiny_phi3()
    call = fitting_call(fresh, modules)
    assert call == expected
    if call is not None:
        eval(call, {"lora_layers": L, "model": fresh, "torch": torch})
        L.load_lora(fresh, path)
        assert torch.equal(logits(fresh), logits(saved))
        dropouts = [[getattr(layer.lora_dropout, "p", 0.0) for _, layer in L.lora_modules(m)] for m in (fresh, saved)]
        assert dropouts[0] == dropouts[1]  # training on drops out as before


def test_round_trip_over_a_quantized_base(tmp_path):
    pytest.importorskip("torchao")
    saved, path = _saved_phi3(tmp_path, lambda m: (L.quantize_base(m), phi3.apply_lora(m, r=4, lora_alpha=8)))
    fresh = make_tiny_phi3()
    L.quantize_base(fresh)

    L.load_adapter(fresh, path)

    qkv = fresh.model.layers[0].self_attn.qkv_proj
    assert type(qkv) is L.MergedLinear and qkv.quantized is not None
    assert torch.equal(logits(fresh), logits(saved))
    assert "quantized base" in str(L.summary(fresh))
