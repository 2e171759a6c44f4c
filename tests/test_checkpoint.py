"""Native checkpoints: save_lora/load_lora validation, atomicity, loralib files, training state."""
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers import checkpoint as ckpt
from lora_layers.checkpoint import CheckpointError, load_lora, save_lora
from lora_layers.training_state import TRAINING_STATE_FILE, load_training_state, save_training_state


class Net(nn.Module):
    """Every adapter kind: Linear, MergedLinear (GQA-like unequal splits), Embedding, Conv2d."""

    def __init__(self, r=2, alpha=4, splits=(8, 4, 4), enable=(True, False, True), dropout=0.0, lora_dtype=None):
        super().__init__()
        self.emb = L.Embedding(20, 8, r=r, lora_alpha=alpha, lora_dtype=lora_dtype)
        self.qkv = L.MergedLinear(8, sum(splits), r=r, lora_alpha=alpha, lora_dropout=dropout,
                                  enable_lora=list(enable), split_sizes=list(splits), lora_dtype=lora_dtype)
        self.out = L.Linear(sum(splits), 8, r=r, lora_alpha=alpha, lora_dropout=dropout, lora_dtype=lora_dtype)
        self.conv = L.Conv2d(1, 2, 3, r=r, lora_alpha=alpha, padding=1, lora_dtype=lora_dtype)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.out(self.qkv(self.emb(ids)))  # (B, T, 8)
        h = h + self.conv(h.unsqueeze(1)).mean(1)
        return self.head(h)


def make(seed=0, randomize=True, **kw):
    torch.manual_seed(seed)  # same seed -> same base weights
    net = Net(**kw)
    if randomize:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in L.lora_parameters(net):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()} | {
        "__lora__" + k: p.detach().clone() for k, p in L.named_lora_parameters(model)}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


IDS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))


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
                              "enable_lora": [True, False, True]}
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


def test_loralib_checkpoint_loads_and_matches_loralib(tmp_path):
    loralib = pytest.importorskip("loralib")
    torch.manual_seed(0)
    ref = nn.Sequential(loralib.Embedding(20, 12, r=2, lora_alpha=4),
                        loralib.MergedLinear(12, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]),
                        loralib.Linear(12, 5, r=3, lora_alpha=3))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.normal_()
    base = {k: v.clone() for k, v in ref.state_dict().items() if "lora_" not in k}  # before loralib merges
    ref.eval()
    torch.save(loralib.lora_state_dict(ref), tmp_path / "loralib.pt")
    ours = nn.Sequential(L.Embedding(20, 12, r=2, lora_alpha=4),
                         L.MergedLinear(12, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]),
                         L.Linear(12, 5, r=3, lora_alpha=3))
    ours.load_state_dict(base, strict=False)
    ours.eval()
    assert load_lora(ours, tmp_path / "loralib.pt").missing_keys == []
    ids = torch.randint(0, 20, (3, 4))
    torch.testing.assert_close(ours(ids), ref(ids), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- writing

def test_missing_folder_raises_and_writes_nothing(tmp_path):
    target = tmp_path / "no_such_dir" / "a.safetensors"
    with pytest.raises(FileNotFoundError, match="no_such_dir.*does not exist"):
        save_lora(make(), target)
    assert not target.parent.exists()


def test_destination_is_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_lora(make(), tmp_path)


def test_read_only_destination_keeps_previous_file(saved, monkeypatch):
    src, path = saved
    old = path.read_bytes()
    if os.geteuid() != 0:  # root ignores permission bits, so simulate below as well
        os.chmod(path.parent, 0o500)
        try:
            with pytest.raises(PermissionError, match="not writable"):
                save_lora(make(seed=3), path)
        finally:
            os.chmod(path.parent, 0o700)
        assert path.read_bytes() == old

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(ckpt.os, "access", lambda *a, **k: True)
    monkeypatch.setattr(ckpt.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match="not writable"):
        save_lora(make(seed=3), path)
    assert path.read_bytes() == old
    assert load_lora(make(seed=1, randomize=False), path).missing_keys == []


def test_failed_write_removes_temp_and_keeps_previous(saved, monkeypatch):
    _, path = saved
    old = path.read_bytes()

    def boom(f, chunk):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "_write_chunk", boom)
    with pytest.raises(OSError, match="No space"):
        save_lora(make(seed=3), path)
    assert path.read_bytes() == old
    assert sorted(os.listdir(path.parent)) == [path.name]


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


_CHILD = textwrap.dedent("""
    import sys, time, torch
    import lora_layers as L
    from lora_layers import checkpoint as ckpt
    model = L.Linear(512, 512, r=64)
    ckpt._CHUNK = 4096
    state = {"first": True}
    def slow(f, chunk):
        f.write(chunk)
        if state["first"]:
            state["first"] = False
            f.flush()
            print("writing", flush=True)
        time.sleep(0.05)
    ckpt._write_chunk = slow
    ckpt.save_lora(model, sys.argv[1])
    print("finished", flush=True)
""")


def test_kill_mid_save_keeps_previous_checkpoint(saved):
    src, path = saved
    old = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        temps = [n for n in os.listdir(path.parent) if n.endswith(".tmp")]
        assert len(temps) == 1  # the new file is being written next to, not over, the old one
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == old
    model = make(seed=0, randomize=False).eval()
    load_lora(model, path)
    assert torch.equal(model(IDS), src(IDS))


# ----------------------------------------------------------------------------- training state

def _train(model, opt, sched, steps, losses):
    x = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(7))
    for _ in range(steps):
        noise = torch.randn(4, 5, 3)  # draws from the global RNG, as data shuffling would
        loss = (model(x) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())


def _setup(seed=0):
    model = make(seed=seed, randomize=False, dropout=0.2).train()
    L.mark_only_lora_as_trainable(model)
    opt = torch.optim.AdamW(L.lora_parameters(model), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def test_resume_is_bitwise_identical(tmp_path):
    torch.manual_seed(42)
    model, opt, sched = _setup()
    straight = []
    _train(model, opt, sched, 10, straight)
    final = {k: p.detach().clone() for k, p in L.named_lora_parameters(model)}

    torch.manual_seed(42)
    model, opt, sched = _setup()
    resumed = []
    _train(model, opt, sched, 5, resumed)
    random.seed(5)
    expected_py = random.random()
    random.seed(5)
    save_training_state(tmp_path / "run", model, opt, sched, step=5, extra={"best": 1.5, "tags": ("a", 2)})

    torch.manual_seed(999)  # scramble every RNG and build fresh objects
    random.seed(999)
    model, opt, sched = _setup(seed=0)
    state = load_training_state(tmp_path / "run", model, opt, sched)
    assert state == {"step": 5, "extra": {"best": 1.5, "tags": ("a", 2)}}
    assert random.random() == expected_py
    _train(model, opt, sched, 5, resumed)
    assert resumed == straight
    for k, p in L.named_lora_parameters(model):
        assert torch.equal(p, final[k]), k


def test_training_state_rejects_objects_and_mismatches(tmp_path):
    model, opt, sched = _setup()
    with pytest.raises(TypeError, match=r"extra\['f'\] is a builtin_function_or_method"):
        save_training_state(tmp_path / "a", model, opt, sched, extra={"f": len})
    assert not (tmp_path / "a" / TRAINING_STATE_FILE).exists()
    save_training_state(tmp_path / "s.safetensors", model, opt, sched, step=3)

    other = make(seed=0, randomize=False, r=4)
    other_opt = torch.optim.AdamW(L.lora_parameters(other))
    before = snapshot(other)
    with pytest.raises(CheckpointError, match="r: checkpoint 2, model 4"):
        load_training_state(tmp_path / "s.safetensors", other, other_opt)
    assert_unchanged(other, before)

    model2, _, _ = _setup()
    split_opt = torch.optim.AdamW([{"params": L.lora_parameters(model2)[:2]},
                                   {"params": L.lora_parameters(model2)[2:]}])
    before = snapshot(model2)
    with pytest.raises(CheckpointError, match="optimizer parameter groups differ"):
        load_training_state(tmp_path / "s.safetensors", model2, split_opt)
    assert_unchanged(model2, before)
    with pytest.raises(CheckpointError, match="not a lora_layers training state"):
        save_lora(model, tmp_path / "plain.safetensors")
        load_training_state(tmp_path / "plain.safetensors", model, opt)


def test_numpy_free_writer_matches_the_safetensors_library():
    # save_lora writes safetensors itself (safetensors.torch.save needs numpy,
    # which is not a core dependency): the library must read it back exactly.
    from safetensors.torch import load

    from lora_layers.checkpoint import st_serialize

    tensors = {
        "b.f64": torch.randn(3, 2, dtype=torch.float64), "a.f32": torch.randn(5),
        "c.f16": torch.randn(2, 3).half(), "d.bf16": torch.randn(4, 1).bfloat16(),
        "e.i64": torch.arange(7), "f.i8": torch.tensor([-3, 4], dtype=torch.int8),
        "g.bool": torch.tensor([True, False, True]), "h.empty": torch.empty(0, 4),
        "i.scalar": torch.tensor(2.5), "j.noncontig": torch.randn(4, 6).t(),
    }
    data = st_serialize(tensors, {"k": "v"})
    back = load(data)
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    import json
    import struct
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0 and json.loads(data[8:8 + n])["__metadata__"] == {"k": "v"}
