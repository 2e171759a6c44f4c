"""The file layer: destination checks, atomic writes, the safetensors writer, reading by parsing."""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn

import lora_layers as L
from lora_layers import fileio
from lora_layers.fileio import CheckpointError, atomic_write, read_file, safetensors_bytes


def _write(data):
    return lambda f: f.write(data)


@pytest.fixture
def previous(tmp_path):
    """A destination that already holds a file, which a failed write must leave intact."""
    path = tmp_path / "result.bin"
    atomic_write(path, _write(b"previous content"))
    return path


# ----------------------------------------------------------------------------- destinations

def test_missing_folder_raises_and_writes_nothing(tmp_path):
    target = tmp_path / "no_such_dir" / "a.safetensors"
    with pytest.raises(FileNotFoundError, match="no_such_dir.*does not exist"):
        atomic_write(target, _write(b"x"))
    assert not target.parent.exists()


def test_a_missing_folder_before_dot_dot_is_refused_up_front(tmp_path, monkeypatch):
    # "missing/../a" resolves lexically to "a", but the OS needs "missing" to exist: the check
    # must see the folder the OS will use, or the write fails late with a bare rename error.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"path='missing/\.\./a\.safetensors'.*does not exist"):
        atomic_write("missing/../a.safetensors", _write(b"x"))
    assert os.listdir(tmp_path) == []
    (tmp_path / "real").mkdir()
    atomic_write("real/../a.safetensors", _write(b"x"))
    assert (tmp_path / "a.safetensors").read_bytes() == b"x"


def test_a_symlink_is_written_through_and_kept(tmp_path):
    # As torch.save: latest -> store/a is updated in store/a; the link is not replaced by a file.
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "a").write_bytes(b"old")
    link = tmp_path / "latest"
    link.symlink_to(tmp_path / "store" / "a")
    atomic_write(link, _write(b"new"))
    assert link.is_symlink() and (tmp_path / "store" / "a").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path / "store")) == ["a"] and sorted(os.listdir(tmp_path)) == ["latest", "store"]


def test_destination_is_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write(tmp_path, _write(b"x"))


@pytest.mark.parametrize("bad, exc, text", [
    ("", ValueError, "out must be a non-empty path, got ''"),
    (None, TypeError, "out must be a str or os.PathLike, got NoneType None"),
    (3, TypeError, "out must be a str or os.PathLike, got int 3"),
    ("sub" + os.sep, IsADirectoryError, "out='sub/'.*names a folder"),
    ("a\0b.safetensors", ValueError, "out must not contain a NUL character"),
    ("n" * 300 + ".safetensors", ValueError, "out='n+.safetensors'.*longer than the 255"),
])
def test_bad_paths_are_refused_before_any_file_is_created(tmp_path, monkeypatch, bad, exc, text):
    monkeypatch.chdir(tmp_path)  # relative paths resolve here, so any stray file would show
    (tmp_path / "sub").mkdir()
    with pytest.raises(exc, match=text):
        atomic_write(bad, _write(b"x"), "result", arg="out")
    assert sorted(os.listdir(tmp_path)) == ["sub"] and os.listdir(tmp_path / "sub") == []


def test_a_long_but_valid_file_name_is_written(tmp_path):
    path = tmp_path / ("n" * 250)  # the temp file's name must still fit
    atomic_write(path, _write(b"x"))
    assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == b"x"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_mode_follows_the_umask_as_torch_save(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.bin", _write(b"x"))
        torch.save({}, tmp_path / "reference.pt")
    finally:
        os.umask(old)
    mode = (tmp_path / "a.bin").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "reference.pt").stat().st_mode & 0o777


# ----------------------------------------------------------------------------- failures keep the previous file

def test_read_only_destination_keeps_previous_file(previous, monkeypatch):
    if os.geteuid() != 0:  # root ignores permission bits, so simulate below as well
        os.chmod(previous.parent, 0o500)
        try:
            with pytest.raises(PermissionError, match="not writable"):
                atomic_write(previous, _write(b"new"))
        finally:
            os.chmod(previous.parent, 0o700)
        assert previous.read_bytes() == b"previous content"

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(fileio.os, "access", lambda *a, **k: True)
    monkeypatch.setattr(fileio, "_create_temp", refuse)
    with pytest.raises(PermissionError, match="not writable"):
        atomic_write(previous, _write(b"new"))
    assert previous.read_bytes() == b"previous content"


def test_failed_write_removes_temp_and_keeps_previous(previous):
    def half_then_full_disk(f):
        f.write(b"half of the new")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic_write(previous, half_then_full_disk)
    assert previous.read_bytes() == b"previous content"
    assert os.listdir(previous.parent) == [previous.name]


def test_failed_fsync_removes_temp_and_keeps_previous(previous, monkeypatch):
    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(fileio.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_write(previous, _write(b"new"))
    assert previous.read_bytes() == b"previous content"
    assert os.listdir(previous.parent) == [previous.name]


_CHILD = textwrap.dedent("""
    import sys, time
    from lora_layers.fileio import atomic_write
    def write(f):
        f.write(b"half of the new file")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)  # killed here
        f.write(b"never written")
    atomic_write(sys.argv[1], write)
""")


def test_kill_mid_write_keeps_previous_file(previous):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(previous)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        temps = [n for n in os.listdir(previous.parent) if n.endswith(".tmp")]
        assert len(temps) == 1  # the new file is being written next to, not over, the old one
        assert (previous.parent / temps[0]).read_bytes() == b"half of the new file"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert previous.read_bytes() == b"previous content"


# ----------------------------------------------------------------------------- the safetensors writer

def test_numpy_free_writer_matches_the_safetensors_library():
    # lora_layers writes safetensors itself (safetensors.torch.save needs numpy,
    # which is not a core dependency): the library must read it back exactly.
    from safetensors.torch import load

    tensors = {
        "b.f64": torch.randn(3, 2, dtype=torch.float64), "a.f32": torch.randn(5),
        "c.f16": torch.randn(2, 3).half(), "d.bf16": torch.randn(4, 1).bfloat16(),
        "e.i64": torch.arange(7), "f.i8": torch.tensor([-3, 4], dtype=torch.int8),
        "g.bool": torch.tensor([True, False, True]), "h.empty": torch.empty(0, 4),
        "i.scalar": torch.tensor(2.5), "j.noncontig": torch.randn(4, 6).t(),
    }
    data = safetensors_bytes(tensors, {"k": "v"})
    back = load(data)
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0 and json.loads(data[8:8 + n])["__metadata__"] == {"k": "v"}


def test_writer_refuses_a_dtype_it_does_not_store():
    with pytest.raises(TypeError, match="tensor 'z' has dtype torch.complex64"):
        safetensors_bytes({"z": torch.zeros(2, dtype=torch.complex64)}, {})


# ----------------------------------------------------------------------------- reading by parsing

def test_every_safetensors_header_length_is_read_as_safetensors(tmp_path):
    # The header length comes first, little endian: when its low byte is 0x80
    # the file starts like a pickle, and must still be read as safetensors.
    t = {"w": torch.arange(6.0).reshape(2, 3)}
    first_bytes = set()
    for k in range(41):
        path = tmp_path / f"k{k}.bin"
        path.write_bytes(safetensors_bytes(t, {"n": "x" * 8 * k}))
        first_bytes.add(path.read_bytes()[0])
        tensors, meta = read_file(path)
        assert meta == {"n": "x" * 8 * k} and torch.equal(tensors["w"], t["w"]), k
    assert 0x80 in first_bytes


def test_torch_zip_and_legacy_pickle_files_are_read_with_weights_only(tmp_path):
    sd = {"w": torch.arange(3.0)}
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        obj, meta = read_file(tmp_path / name)
        assert meta == {} and torch.equal(obj["w"], sd["w"]), name


@pytest.mark.parametrize("content", [
    b"",
    b"\x80\x07" + b"\x00" * 30,  # pickle-like byte, unknown protocol, not safetensors either
    b"\x80\x02garbage",  # claims to be a pickle, is not one
    b"\xff" * 8 + b"{}",  # a header length larger than the file
    (2).to_bytes(8, "little") + b"[]",  # a header that is not a JSON object
    (10).to_bytes(8, "little") + b'{"a": 1}  ',  # a JSON object, not a safetensors header
    b"PK\x03\x04 not really a zip",
])
def test_unrecognised_content_is_a_clear_error(tmp_path, content):
    path = tmp_path / "odd.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_file(path)
    assert str(path) in str(info.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_file(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        read_file(tmp_path)


# ----------------------------------------------------------------------------- readers racing writers

_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    import lora_layers as L
    seed, path, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(seed)
    layer = L.Linear(32, 32, r=4)
    torch.nn.init.normal_(layer.lora_B)
    L.mark_only_lora_as_trainable(layer)
    meta = {"writer": str(seed) * (40 * seed)}  # the two writers' headers differ in length
    print("ready", flush=True)
    while not os.path.exists(stop):
        L.save_lora(layer, path, metadata=meta)
""")


def _writer_layer(seed):
    torch.manual_seed(seed)
    layer = L.Linear(32, 32, r=4)
    nn.init.normal_(layer.lora_B)
    L.mark_only_lora_as_trainable(layer)
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
                meta = L.load_lora(reader, path).metadata
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
