"""Native checkpoints: save_lora/load_lora round trips, validation, loralib files, refused saves.

The file layer under them (atomic writes, reading by parsing) is tested in tests/io/test_fileio.py;
files that loralib itself writes, in tests/parity/test_checkpoint_loralib.py.
"""
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers import checkpoint as ckpt
from lora_layers.checkpoint import CheckpointError, load_lora, save_lora

from _adapter_net import IDS, assert_unchanged, make, snapshot


@pytest.fixture
def saved(tmp_path):
    src = make(seed=0).eval()
    path = tmp_path / "adapter.safetensors"
    save_lora(src, path, metadata={"run": "unit-test"})
    return src, path


# ----------------------------------------------------------------------------- round trip

def test_round_trip_header_and_identity(saved):
    src, path = saved
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(L.lora_state_dict(src))
    assert meta[ckpt.META_FORMAT] == ckpt.FORMAT_NAME and meta[ckpt.META_FORMAT_VERSION] == ckpt.FORMAT_VERSION
    assert meta[ckpt.META_LIBRARY_VERSION] == L.__version__
    modules = json.loads(meta[ckpt.META_MODULES])
    assert modules["qkv"] == {"class": "MergedLinear", "r": 2, "lora_alpha": 4, "scaling": 2.0, "use_rslora": False,
                              "lora_dropout": 0.0, "fan_in_fan_out": False, "split_sizes": [8, 4, 4],
                              "enable_lora": [True, False, True], "use_dora": False, "lora_dtype": None}
    assert modules["conv"]["layout"] == "lora_layers"  # load_adapter rebuilds the layer from these fields
    assert set(modules) == {"emb", "qkv", "out", "conv"}

    dst = make(seed=0, randomize=False).eval()
    params = {k: p for k, p in L.named_lora_parameters(dst)}
    result = load_lora(dst, path)
    assert result.missing_keys == result.unexpected_keys == result.mismatched_keys == []
    assert result.metadata == {"run": "unit-test"}
    for k, p in L.named_lora_parameters(dst):
        assert p is params[k]  # same Parameter objects: optimizer state stays attached
    assert torch.equal(dst(IDS), src(IDS))


def test_load_into_merged_equals_load_then_merge(saved):
    _, path = saved
    merged = make(seed=0, randomize=False).eval()
    merged.emb.lora_A.data.normal_()  # make the merged delta non-zero before the load
    L.merge_lora(merged)
    load_lora(merged, path)
    reference = make(seed=0, randomize=False).train()
    load_lora(reference, path)
    L.merge_lora(reference)
    assert all(m.merged for _, m in L.lora_modules(merged))
    for (k, a), b in zip(merged.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k
    for name in ("emb", "qkv", "out", "conv"):
        assert torch.equal(getattr(merged, name).weight, getattr(reference, name).weight), name
    assert torch.equal(merged(IDS), reference(IDS))


def test_a_copy_that_fails_leaves_the_merged_layers_merged(saved, monkeypatch):
    """load_lora unmerges around its copies (layers.unmerged): a copy that raises re-merges every
    layer it unmerged, bit for bit, before the error reaches the caller."""
    _, path = saved
    model = make(seed=0).eval()
    L.merge_lora(model)
    before = {name: m.weight.detach().clone() for name, m in L.lora_modules(model)}
    plan_load = ckpt.plan_load

    def first_copy_fails(*args, **kwargs):
        copies, result = plan_load(*args, **kwargs)
        key, layer, param, tensor = copies[0]
        return [(key, layer, param, torch.empty_like(tensor, device="meta"))] + copies[1:], result

    monkeypatch.setattr(ckpt, "plan_load", first_copy_fails)
    with pytest.raises(NotImplementedError):  # torch cannot copy out of a meta tensor
        load_lora(model, path)
    for name, m in L.lora_modules(model):
        assert m.merged, name
        assert torch.equal(m.weight, before[name]), name


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes(tmp_path, bias):
    src = make(seed=0)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith("bias"):
                p.add_(1.0)
    save_lora(src, tmp_path / "b.safetensors", bias=bias)
    dst = make(seed=0)
    load_lora(dst, tmp_path / "b.safetensors")
    assert set(L.lora_state_dict(src, bias)) > set(L.lora_state_dict(src))
    for k, v in L.lora_state_dict(src, bias).items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert torch.equal(dst.head.bias, src.head.bias) == (bias == "all")


def test_dtype_cast_into_parameter_dtype(tmp_path):
    src = make(seed=0, lora_dtype=torch.bfloat16)
    save_lora(src, tmp_path / "bf16.safetensors")
    dst = make(seed=0, randomize=False)
    load_lora(dst, tmp_path / "bf16.safetensors")
    for (k, a), (_, b) in zip(L.named_lora_parameters(dst), L.named_lora_parameters(src)):
        assert a.dtype == torch.float32 and torch.equal(a, b.float()), k  # bf16 -> fp32 is exact


def test_shared_and_strided_tensors_are_saved(tmp_path):
    src = make(seed=0)
    src.out.lora_B = nn.Parameter(torch.randn(2, 8).t())  # non-contiguous view
    save_lora(src, tmp_path / "s.safetensors")
    dst = make(seed=0, randomize=False)
    load_lora(dst, tmp_path / "s.safetensors")
    assert torch.equal(dst.out.lora_B, src.out.lora_B)


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kw, expected", [
    ({"r": 4}, ["r: checkpoint 2, model 4", "scaling"]),
    ({"alpha": 8}, ["lora_alpha: checkpoint 4, model 8"]),
    ({"splits": (4, 6, 6)}, ["split_sizes: checkpoint [8, 4, 4], model [4, 6, 6]"]),
    ({"enable": (True, True, False)}, ["enable_lora: checkpoint [True, False, True], model [True, True, False]"]),
])
def test_different_rank_alpha_or_splits_raise_and_change_nothing(saved, kw, expected):
    _, path = saved
    model = make(seed=1, **kw)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_lora(model, path)
    msg = str(info.value)
    assert str(path) in msg and "nothing was loaded" in msg
    for text in expected:
        assert text in msg
    assert_unchanged(model, before)


def test_shape_mismatch_names_key_expected_and_got(tmp_path):
    src = make(seed=0)
    sd = {k: v.contiguous() for k, v in L.lora_state_dict(src).items()}
    sd["out.lora_A"] = torch.zeros(3, 16)
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "x.safetensors"))  # plain safetensors, no lora_layers header
    model = make(seed=1)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"out\.lora_A: shape mismatch, expected \(2, 16\) \(model\), "
                                              r"got \(3, 16\)"):
        load_lora(model, tmp_path / "x.safetensors")
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="shape mismatch"):
        result = load_lora(model, tmp_path / "x.safetensors", strict=False)  # the rest loads
    assert result.mismatched_keys == ["out.lora_A"]
    assert torch.equal(model.out.lora_B, src.out.lora_B) and torch.equal(model.qkv.lora_A, src.qkv.lora_A)
    assert torch.equal(model.out.lora_A, before["__lora__out.lora_A"])


def test_missing_and_unexpected_keys(tmp_path):
    src = make(seed=0)
    sd = {k: v.contiguous() for k, v in L.lora_state_dict(src).items() if k != "emb.lora_B"}
    sd["ghost.lora_A"] = torch.zeros(2, 2)
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "k.safetensors"))
    model = make(seed=1)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_lora(model, tmp_path / "k.safetensors")
    assert "missing keys (in the model, not in the checkpoint): ['emb.lora_B']" in str(info.value)
    assert "unexpected keys (in the checkpoint, not in the model): ['ghost.lora_A']" in str(info.value)
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="strict=False"):
        result = load_lora(model, tmp_path / "k.safetensors", strict=False)
    assert result.missing_keys == ["emb.lora_B"] and result.unexpected_keys == ["ghost.lora_A"]
    assert torch.equal(model.emb.lora_A, src.emb.lora_A)
    assert torch.equal(model.emb.lora_B, before["__lora__emb.lora_B"])


def test_model_without_those_layers(saved):
    _, path = saved
    model = nn.Sequential(L.Linear(4, 4, r=2))
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="missing keys.*0.lora_A"):
        load_lora(model, path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("damage", ["text", "truncated", "flipped_data", "flipped_header", "empty"])
def test_damaged_files_raise_naming_path(saved, tmp_path, damage):
    _, path = saved
    data = bytearray(path.read_bytes())
    bad = tmp_path / f"{damage}.safetensors"
    if damage == "text":
        bad.write_text("this is not a checkpoint at all\n")
    elif damage == "truncated":
        bad.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flipped_data":
        data[-3] ^= 0xFF
        bad.write_bytes(bytes(data))
    elif damage == "flipped_header":
        data[12] ^= 0xFF
        bad.write_bytes(bytes(data))
    else:
        bad.write_bytes(b"")
    model = make(seed=1)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_lora(model, bad)
    assert str(bad) in str(info.value)
    assert "corrupted" in str(info.value) or "not a valid safetensors" in str(info.value)
    assert_unchanged(model, before)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora(make(), tmp_path / "nope.safetensors")


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))  # unpickling would create the sentinel file


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_never_runs(tmp_path, writer):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"out.lora_A": _Evil(str(sentinel))}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    model = make(seed=1)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="weights_only=True") as info:
        load_lora(model, path)
    assert str(path) in str(info.value)
    assert not sentinel.exists()
    assert_unchanged(model, before)


def test_torch_file_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        load_lora(make(), tmp_path / "list.pt")


# ----------------------------------------------------------------------------- writing

@pytest.mark.parametrize("metadata, exc, text", [
    ({"lora_layers.version": "x"}, ValueError, "reserved"),
    ({"format": "x"}, ValueError, "reserved"),
    ({"a": 1}, TypeError, "str -> str"),
    (["a"], TypeError, "dict"),
])
def test_bad_user_metadata(tmp_path, metadata, exc, text):
    with pytest.raises(exc, match=text):
        save_lora(make(), tmp_path / "m.safetensors", metadata=metadata)
    assert not (tmp_path / "m.safetensors").exists()


def test_bad_bias_mode(tmp_path):
    with pytest.raises(ValueError, match="bias must be one of"):
        save_lora(make(), tmp_path / "m.safetensors", bias="some")


# ----------------------------------------------------------------------------- format detection

def _header_lengths(src, folder, suffix):
    """Save ``src`` with header lengths growing 8 bytes at a time: one of them starts with 0x80."""
    for k in range(41):
        path = folder / f"k{k}{suffix}"
        save_lora(src, path, metadata={"n": "x" * 8 * k})
        yield k, path


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_every_header_length_is_read_as_safetensors_and_validated(tmp_path, suffix):
    # A safetensors file starts with its header length (8 bytes, little endian):
    # a length whose low byte is 0x80 looks like a pickle's first byte.
    src = make(seed=0)
    first_bytes = set()
    for k, path in _header_lengths(src, tmp_path, suffix):
        data = path.read_bytes()
        first_bytes.add(data[0])
        dst = make(seed=0, randomize=False)
        assert load_lora(dst, path).metadata == {"n": "x" * 8 * k}, k
        assert torch.equal(dst(IDS), src(IDS)), k

        other = make(seed=0, alpha=8)
        before = snapshot(other)
        with pytest.raises(CheckpointError, match="lora_alpha: checkpoint 4, model 8"):
            load_lora(other, path)
        assert_unchanged(other, before)

        damaged = tmp_path / f"damaged{suffix}"
        damaged.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
        with pytest.raises(CheckpointError, match="SHA-256"):
            load_lora(make(seed=0), damaged)
    assert 0x80 in first_bytes  # the case that used to be read as a pickle was covered


def test_legacy_pickle_and_zip_torch_files_both_load(tmp_path):
    src = make(seed=0)
    sd = L.lora_state_dict(src)
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert (tmp_path / "zip.pt").read_bytes()[:4] == b"PK\x03\x04"
    assert (tmp_path / "legacy.pt").read_bytes()[:2] == b"\x80\x02"
    for name in ("zip.pt", "legacy.pt"):
        dst = make(seed=0, randomize=False)
        assert load_lora(dst, tmp_path / name).missing_keys == []
        assert torch.equal(dst(IDS), src(IDS)), name


# ----------------------------------------------------------------------------- refused saves

def test_save_without_adapters_raises_before_touching_the_filesystem(tmp_path):
    merged = L.merge_and_unload(make(seed=0))
    for model in (merged, nn.Sequential(nn.Linear(4, 4)), nn.Sequential(L.Linear(4, 4, r=0))):
        with pytest.raises(ValueError, match="has no LoRA adapters"):
            save_lora(model, tmp_path / "empty.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad, exc, text", [
    ("", ValueError, "path must be a non-empty path, got ''"),
    (None, TypeError, "path must be a str or os.PathLike, got NoneType None"),
])
def test_bad_paths_are_refused_before_any_file_is_created(tmp_path, monkeypatch, bad, exc, text):
    # every bad destination is refused by lora_layers.fileio (tests/io/test_fileio.py); "" used to leave a temp file
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exc, match=text):
        save_lora(make(), bad)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_file_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_lora(make(), tmp_path / "a.safetensors")
        torch.save({}, tmp_path / "reference.pt")
    finally:
        os.umask(old)
    mode = (tmp_path / "a.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "reference.pt").stat().st_mode & 0o777


# ----------------------------------------------------------------------------- trainable parameters left out

def _unsaved_warning(model, path, bias="none"):
    """The message of save_lora's warning, or None; the file is written either way."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_lora(model, path, bias=bias)
    assert path.exists()
    messages = [str(w.message) for w in caught if "not saved" in str(w.message)]
    assert len(messages) <= 1 and all(w.filename == __file__ for w in caught), messages
    return messages[0] if messages else None


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_no_warning_when_only_saved_parameters_are_trainable(tmp_path, bias):
    model = make(seed=0)
    L.mark_only_lora_as_trainable(model, bias=bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_lora(model, tmp_path / "a.safetensors", bias=bias)
        save_lora(model, tmp_path / "b.safetensors", bias="all")  # saving more than is trained is fine


@pytest.mark.parametrize("trained, saved, named, hint", [
    ("lora_only", "none", ["qkv.bias", "out.bias", "conv.bias"], "bias='lora_only' saves them"),
    ("all", "none", ["qkv.bias", "out.bias", "conv.bias", "head.bias"], "bias='all' saves them"),
    ("all", "lora_only", ["head.bias"], "bias='all' saves them"),
])
def test_trained_biases_left_out_are_named_with_the_bias_that_keeps_them(tmp_path, trained, saved, named, hint):
    model = make(seed=0)
    L.mark_only_lora_as_trainable(model, bias=trained)
    msg = _unsaved_warning(model, tmp_path / "a.safetensors", bias=saved)
    assert msg is not None and f"save_lora: {len(named)} trainable parameter" in msg and hint in msg
    assert all(repr(name) in msg for name in named)


def test_never_marked_model_warns_naming_a_few_and_counting_the_rest(tmp_path):
    model = make(seed=0, marked=False)  # biases and the head stay trainable
    msg = _unsaved_warning(model, tmp_path / "a.safetensors")
    assert msg.startswith("save_lora: 5 trainable parameters are not saved: 'qkv.bias', 'out.bias'")
    assert "'head.weight'" in msg and "mark_only_lora_as_trainable" in msg and "bias='all'" in msg

    for i in range(4):  # more of them: a few are named, the rest counted
        model.add_module(f"extra{i}", nn.Linear(2, 2))
    msg = _unsaved_warning(model, tmp_path / "b.safetensors")
    assert "13 trainable parameters" in msg and "and 8 more" in msg


def test_unsaved_warning_names_the_bare_models_parameters_through_a_wrapper(tmp_path):
    model = make(seed=0, marked=False)
    msg = _unsaved_warning(torch.compile(model, backend="eager"), tmp_path / "a.safetensors")
    assert msg.startswith("save_lora: 5 trainable parameters are not saved: 'qkv.bias', 'out.bias'")
    assert "_orig_mod" not in msg


# ----------------------------------------------------------------------------- square adapters

class _Square(nn.Module):
    """Every adapter square (r equal to both of its other dimensions), so a transposed one keeps its shape."""

    def __init__(self, lora=True):
        super().__init__()
        kw = {"lora_alpha": 8} if lora else {}
        self.lin = L.Linear(4, 4, r=4, **kw) if lora else nn.Linear(4, 4)  # A (4, 4), B (4, 4)
        self.conv = L.Conv2d(2, 8, 2, r=8, **kw) if lora else nn.Conv2d(2, 8, 2)  # A (8, 2·2·2), B (8, 8)
        self.emb = L.Embedding(6, 6, r=6, **kw) if lora else nn.Embedding(6, 6)  # A (6, 6), B (6, 6)


def _square(seed, lora=True):
    torch.manual_seed(0)  # the same base weights every time
    model = _Square(lora)
    if lora:
        L.mark_only_lora_as_trainable(model)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in L.lora_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g))
                assert p.shape[0] == p.shape[1] and not torch.equal(p, p.t())
    return model


def _round_trip(how, src, folder):
    if how == "native":
        save_lora(src, folder / "a.safetensors")
        dst = _square(seed=2)
        load_lora(dst, folder / "a.safetensors")
    elif how == "training_state":
        opt = torch.optim.AdamW(L.lora_parameters(src))
        L.save_training_state(folder / "s.pt", src, opt)
        dst = _square(seed=2)
        L.load_training_state(folder / "s.pt", dst, torch.optim.AdamW(L.lora_parameters(dst)))
    else:
        L.export_peft(src, folder / "peft", task_type=None)
        dst = _square(seed=2) if how == "peft_in_place" else _square(seed=2, lora=False)
        L.import_peft(dst, folder / "peft")
    return dst


@pytest.mark.parametrize("how", ["native", "training_state", "peft_in_place", "peft_into_plain_layers"])
def test_square_adapters_round_trip_untransposed(tmp_path, how):
    src = _square(seed=1)
    dst = _round_trip(how, src, tmp_path)
    expected, got = L.lora_state_dict(src), L.lora_state_dict(dst)
    assert sorted(got) == sorted(expected)
    differ = [k for k, v in expected.items() if got[k].dtype != v.dtype or not torch.equal(got[k], v)]
    assert differ == []


@pytest.mark.parametrize("strict", [True, False])
def test_load_lora_into_a_model_still_on_the_meta_device_is_refused(tmp_path, strict):
    """A copy into a meta parameter does nothing: load_lora reported a load that never happened."""
    source = make(seed=0)
    L.save_lora(source, tmp_path / "a.safetensors")
    with torch.device("meta"):
        model = make(seed=0)
    if strict:
        with pytest.raises(L.CheckpointError, match="meta device.*to_empty"):
            L.load_lora(model, tmp_path / "a.safetensors")
    else:
        result = L.load_lora(model, tmp_path / "a.safetensors", strict=False)
        assert set(result.mismatched_keys) == set(L.lora_state_dict(source))
