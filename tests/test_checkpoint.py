"""Native checkpoints: save_lora/load_lora validation, format detection, atomicity, loralib files."""
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

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
    monkeypatch.setattr(ckpt, "_create_temp", refuse)
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


@pytest.mark.parametrize("content", [
    b"\x80\x07" + b"\x00" * 30,  # pickle-like byte, unknown protocol, not safetensors either
    b"\x80\x02garbage",  # claims to be a pickle, is not one
    b"\xff" * 8 + b"{}",  # a header length larger than the file
    (2).to_bytes(8, "little") + b"[]",  # a header that is not a JSON object
    b"PK\x03\x04 not really a zip",
])
def test_unrecognised_content_is_a_clear_error(tmp_path, content):
    path = tmp_path / "odd.bin"
    path.write_bytes(content)
    model = make(seed=1)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_lora(model, path)
    assert str(path) in str(info.value)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- readers racing writers

_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    import lora_layers as L
    seed, path, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(seed)
    layer = L.Linear(32, 32, r=4)
    torch.nn.init.normal_(layer.lora_B)
    meta = {"writer": str(seed) * (40 * seed)}  # the two writers' headers differ in length
    print("ready", flush=True)
    while not os.path.exists(stop):
        L.save_lora(layer, path, metadata=meta)
""")


def _writer_layer(seed):
    torch.manual_seed(seed)
    layer = L.Linear(32, 32, r=4)
    nn.init.normal_(layer.lora_B)
    return layer


def test_readers_racing_two_writers_always_see_one_whole_file(tmp_path):
    path, stop = tmp_path / "shared.safetensors", tmp_path / "stop"
    expected = {str(s): _writer_layer(s).lora_B.detach().clone() for s in (1, 2)}
    L.save_lora(_writer_layer(1), path, metadata={"writer": "1" * 40})
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(s), str(path), str(stop)],
                                stdout=subprocess.PIPE, text=True) for s in (1, 2)]
    failures, loads, seen = [], 0, set()
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "ready"
        reader = L.Linear(32, 32, r=4)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                meta = load_lora(reader, path).metadata
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            loads += 1
            who = meta["writer"][0]
            seen.add(who)
            if not torch.equal(reader.lora_B, expected[who]):
                failures.append(f"load {loads}: header of writer {who}, tensors of the other")
    finally:
        stop.touch()
        for w in writers:
            w.wait(timeout=60)
    assert failures == [], f"{len(failures)} of {loads + len(failures)} loads failed: {failures[:3]}"
    assert loads > 50 and seen == {"1", "2"}


# ----------------------------------------------------------------------------- refused saves

def test_save_without_adapters_raises_before_touching_the_filesystem(tmp_path):
    merged = L.merge_and_unload(make(seed=0))
    for model in (merged, nn.Sequential(nn.Linear(4, 4)), nn.Sequential(L.Linear(4, 4, r=0))):
        with pytest.raises(ValueError, match="has no LoRA adapters"):
            save_lora(model, tmp_path / "empty.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad, exc, text", [
    ("", ValueError, "path must be a file path, got ''"),
    (None, TypeError, "path must be a str or os.PathLike, got NoneType None"),
    (3, TypeError, "path must be a str or os.PathLike, got int 3"),
    ("sub" + os.sep, IsADirectoryError, "names a folder"),
    ("a\0b.safetensors", ValueError, "NUL"),
    ("n" * 300 + ".safetensors", ValueError, "longer than"),
])
def test_bad_paths_are_refused_before_any_file_is_created(tmp_path, monkeypatch, bad, exc, text):
    monkeypatch.chdir(tmp_path)  # relative paths resolve here, so any stray file would show
    (tmp_path / "sub").mkdir()
    with pytest.raises(exc, match=text):
        save_lora(make(), bad)
    assert sorted(os.listdir(tmp_path)) == ["sub"] and os.listdir(tmp_path / "sub") == []


def test_a_long_but_valid_file_name_saves(tmp_path):
    path = tmp_path / ("n" * 240 + ".safetensors")  # the temp file's name must still fit
    save_lora(make(), path)
    assert load_lora(make(seed=0, randomize=False), path).missing_keys == []
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_lora(make(), tmp_path / "a.safetensors")
        torch.save({}, tmp_path / "reference.pt")
    finally:
        os.umask(old)
    mode = (tmp_path / "a.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "reference.pt").stat().st_mode & 0o777
