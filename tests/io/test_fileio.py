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


# ----------------------------------------------------------------------------- atomic folders (issue #20 item 3)

from lora_layers.fileio import atomic_folder, read_folder  # noqa: E402


def _tree(folder):
    """Every file under ``folder`` with its bytes, and every symlink with its target."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            out[rel] = ("->", os.readlink(path)) if os.path.islink(path) else open(path, "rb").read()
    return out


def _build(tmp, files):
    for name, data in files.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)


@pytest.fixture
def old_folder(tmp_path):
    """A folder with two files of ours, a stale one of ours and the user's own files."""
    folder = tmp_path / "out"
    folder.mkdir()
    _build(folder, {"a.bin": b"old a", "b.json": b"old b", "stale.bin": b"old stale", "README.md": b"notes"})
    (folder / "sub").mkdir()
    (folder / "sub" / "vocab.txt").write_bytes(b"vocab")
    (folder / "link").symlink_to("README.md")
    return folder


def test_atomic_folder_swaps_in_the_new_files_and_carries_over_the_users(old_folder):
    inode = os.stat(old_folder / "README.md").st_ino
    with atomic_folder(old_folder, owned=("*.bin", "*.json")) as tmp:
        assert os.path.dirname(tmp) == str(old_folder.parent) and os.listdir(tmp) == []
        _build(tmp, {"a.bin": b"new a", "b.json": b"new b"})
    assert _tree(old_folder) == {"a.bin": b"new a", "b.json": b"new b", "README.md": b"notes",
                                 os.path.join("sub", "vocab.txt"): b"vocab", "link": ("->", "README.md")}
    assert os.stat(old_folder / "README.md").st_ino == inode  # a hard link: nothing copied
    assert os.listdir(old_folder.parent) == ["out"]  # the old folder is gone, no temp left


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_failed_build_leaves_the_old_folder_and_no_temp(old_folder, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    before = _tree(old_folder)
    with pytest.raises(RuntimeError, match="mid-build"):
        with atomic_folder(old_folder) as tmp:
            _build(tmp, {"a.bin": b"new a"})
            raise RuntimeError("mid-build")
    assert _tree(old_folder) == before and os.listdir(old_folder.parent) == ["out"]
    with atomic_folder(old_folder) as tmp:  # and without the failure, the same path swaps
        _build(tmp, {"a.bin": b"new a"})
    assert _tree(old_folder)["a.bin"] == b"new a" and os.listdir(old_folder.parent) == ["out"]


def test_the_rename_aside_fallback_restores_the_old_folder_when_the_second_rename_fails(old_folder, monkeypatch):
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    before, real, calls = _tree(old_folder), os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "rename", rename)
    with pytest.raises(OSError, match="Input/output"):
        with atomic_folder(old_folder) as tmp:
            _build(tmp, {"a.bin": b"new a"})
    monkeypatch.undo()
    assert _tree(old_folder) == before and os.listdir(old_folder.parent) == ["out"]


def test_renameat2_exchange_works_here(tmp_path):
    # Linux >= 3.15 on ext4, tmpfs, xfs, btrfs: the atomic path is the one used on this machine.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"")
    assert fileio._exchange(str(tmp_path / "a"), str(tmp_path / "b"))
    assert os.listdir(tmp_path / "b") == ["x"] and os.listdir(tmp_path / "a") == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_new_folder_follows_the_umask_and_an_old_one_keeps_its_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_folder(tmp_path / "new") as tmp:
            _build(tmp, {"f": b"x"})
    finally:
        os.umask(old)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "new" / "f").stat().st_mode & 0o777 == 0o666 & ~umask
    (tmp_path / "new").chmod(0o700)
    with atomic_folder(tmp_path / "new") as tmp:
        _build(tmp, {"f": b"y"})
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


def test_a_symlinked_folder_is_written_through_and_the_link_kept(tmp_path):
    (tmp_path / "runs" / "7").mkdir(parents=True)
    (tmp_path / "runs" / "7" / "f").write_bytes(b"old")
    link = tmp_path / "latest"
    link.symlink_to(tmp_path / "runs" / "7")
    with atomic_folder(link) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path / "runs")
        _build(tmp, {"f": b"new"})
    assert link.is_symlink() and (tmp_path / "runs" / "7" / "f").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path / "runs")) == ["7"]


@pytest.mark.parametrize("bad, exc, text", [
    ("file", FileExistsError, r"path='.*file': it is a file, expected a folder"),
    ("missing/out", FileNotFoundError, r"path='.*missing/out'.*folder '.*missing' does not exist"),
    (".", ValueError, r"path='\.': expected a path ending in the folder's own name"),
    ("out/..", ValueError, r"path='out/\.\.': expected a path ending in the folder's own name"),
    ("x" * 300, ValueError, "the file name is 300 bytes"),
])
def test_bad_folder_destinations_are_refused_before_anything_is_created(tmp_path, monkeypatch, bad, exc, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_bytes(b"keep")
    (tmp_path / "out").mkdir()
    with pytest.raises(exc, match=text):
        with atomic_folder(bad):
            pytest.fail("the block must not run")
    assert sorted(os.listdir(tmp_path)) == ["file", "out"] and os.listdir(tmp_path / "out") == []
    assert (tmp_path / "file").read_bytes() == b"keep"


def test_owned_must_be_patterns_not_one_string(old_folder):
    before = _tree(old_folder)
    with pytest.raises(TypeError, match=r"owned must be a collection of glob patterns, e.g. \('\*\.bin',\), "
                                        r"got the string '\*\.bin'"):
        with atomic_folder(old_folder, owned="*.bin"):
            pytest.fail("the block must not run")
    assert _tree(old_folder) == before and os.listdir(old_folder.parent) == ["out"]


def test_a_trailing_separator_names_the_folder(tmp_path):
    with atomic_folder(str(tmp_path / "out") + os.sep) as tmp:
        _build(tmp, {"f": b"x"})
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out" / "f").read_bytes() == b"x"


_FOLDER_CHILD = textwrap.dedent("""
    import os, sys, time
    from lora_layers import fileio
    folder, stage = sys.argv[1], sys.argv[2]
    real_rmtree = fileio.shutil.rmtree
    def rmtree(path, *args, **kwargs):  # called on the old folder once the new one is in place
        if stage == "swapped":
            print("ready", flush=True)
            time.sleep(60)
        return real_rmtree(path, *args, **kwargs)
    fileio.shutil.rmtree = rmtree
    with fileio.atomic_folder(folder, owned=("*.bin", "*.json")) as tmp:
        open(os.path.join(tmp, "a.bin"), "wb").write(b"new a")
        if stage == "building":
            print("ready", flush=True)
            time.sleep(60)
        open(os.path.join(tmp, "b.json"), "wb").write(b"new b")
""")


@pytest.mark.parametrize("stage", ["building", "swapped"])
def test_a_process_killed_while_writing_a_folder_leaves_the_old_or_the_new_one(old_folder, stage):
    before = _tree(old_folder)
    child = subprocess.Popen([sys.executable, "-c", _FOLDER_CHILD, str(old_folder), stage], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    after = _tree(old_folder)
    if stage == "building":
        assert after == before
    else:
        assert after == {**{k: v for k, v in before.items() if k not in ("a.bin", "b.json", "stale.bin")},
                         "a.bin": b"new a", "b.json": b"new b"}
    leftovers = [n for n in os.listdir(old_folder.parent) if n != "out"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.") and leftovers[0].endswith(".tmp")


def _kill_when_ready(args):
    child = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() in ("ready", "writing")
    return child


def _temps(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_a_killed_writers_temp_folder_is_removed_by_the_next_write_and_a_live_writers_is_not(old_folder):
    """issue #20 review: each SIGKILLed export left its .tmp folder (a whole model's worth, for a merged
    model) and repeated runs piled them up; a temp is now flock-ed by its live writer, and swept otherwise."""
    killed = []
    for _ in range(3):
        child = _kill_when_ready([_FOLDER_CHILD, str(old_folder), "building"])
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        killed = _temps(old_folder.parent)
    assert len(killed) == 1  # each write swept the previous one's leftover
    live = _kill_when_ready([_FOLDER_CHILD, str(old_folder), "building"])
    try:
        (alive,) = set(_temps(old_folder.parent)) - set(killed)
        with atomic_folder(old_folder, owned=("*.bin",)) as tmp:
            _build(tmp, {"a.bin": b"mine"})
        assert _temps(old_folder.parent) == [alive]  # the killed writer's is gone, the live one's kept
        assert _tree(old_folder.parent / alive) == {"a.bin": b"new a"}
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=60)
    with atomic_folder(old_folder, owned=("*.bin",)) as tmp:
        _build(tmp, {"a.bin": b"again"})
    assert _temps(old_folder.parent) == [] and (old_folder / "a.bin").read_bytes() == b"again"


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(previous):
    for _ in range(2):
        child = _kill_when_ready([_CHILD, str(previous)])
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        assert len(_temps(previous.parent)) == 1
    atomic_write(previous, _write(b"new"))
    assert os.listdir(previous.parent) == [previous.name] and previous.read_bytes() == b"new"


def test_without_locks_writes_work_and_nothing_is_swept(tmp_path, monkeypatch):
    """Where there is no flock (Windows), a temp cannot be told from a live writer's: none is removed,
    and a folder is never opened (Windows cannot open one)."""
    monkeypatch.setattr(fileio, "fcntl", None)
    stale = tmp_path / ".out.0123456789ab.tmp"
    stale.mkdir()
    for n in range(2):
        with atomic_folder(tmp_path / "out") as tmp:
            _build(tmp, {"a.bin": b"%d" % n})
        atomic_write(tmp_path / "x.bin", _write(b"%d" % n))
    assert sorted(os.listdir(tmp_path)) == [stale.name, "out", "x.bin"]
    assert (tmp_path / "out" / "a.bin").read_bytes() == (tmp_path / "x.bin").read_bytes() == b"1"


def test_a_folder_another_writer_created_meanwhile_is_replaced(tmp_path):
    """issue #20 review: two first exports to one path raced: the later swap failed with
    'Directory not empty', as the folder was missing when it was checked."""
    dest = tmp_path / "adapter"
    with atomic_folder(dest) as tmp:
        dest.mkdir()
        (dest / "x.bin").write_bytes(b"the other writer's")
        _build(tmp, {"x.bin": b"mine"})
    assert _tree(dest) == {"x.bin": b"mine"} and sorted(os.listdir(tmp_path)) == ["adapter"]


def _check_written_in_place(folder, before):
    inode = os.stat(folder).st_ino
    with atomic_folder(folder, owned=("*.bin", "*.json")) as tmp:
        _build(tmp, {"a.bin": b"new a", "b.json": b"new b"})
        os.mkdir(os.path.join(tmp, "sub"))
        _build(os.path.join(tmp, "sub"), {"vocab.txt": b"new vocab"})
    assert os.stat(folder).st_ino == inode  # the same folder: a mount point cannot be swapped
    assert _tree(folder) == {**{k: v for k, v in before.items() if k not in ("stale.bin", "sub/vocab.txt")},
                             "a.bin": b"new a", "b.json": b"new b", "sub/vocab.txt": b"new vocab"}
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(folder, owned=("*.bin",)) as tmp:
            _build(tmp, {"a.bin": b"never"})
            raise RuntimeError("boom")
    assert (folder / "a.bin").read_bytes() == b"new a"
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_a_folder_that_is_a_mount_point_is_written_in_place(old_folder, monkeypatch):
    """issue #20 review: export_peft into a mount point (a Docker or Kubernetes volume) failed with EBUSY
    (a mount point cannot be renamed or exchanged); its files are now replaced one by one, each whole."""
    before = _tree(old_folder)
    real = os.path.ismount
    monkeypatch.setattr(fileio.os.path, "ismount", lambda p: os.fspath(p) == str(old_folder) or real(p))
    _check_written_in_place(old_folder, before)


def test_export_peft_into_a_real_mount_point(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (mnt / "README.md").write_bytes(b"notes")
        model = nn.Sequential(L.Linear(4, 4, r=2))
        for value in (1.0, 2.0):
            with torch.no_grad():
                model[0].lora_B.fill_(value)
            L.export_peft(model, mnt)
        fresh = nn.Sequential(nn.Linear(4, 4))
        L.import_peft(fresh, mnt)
        assert torch.equal(fresh[0].lora_B, model[0].lora_B)
        assert sorted(os.listdir(mnt)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert sorted(os.listdir(tmp_path)) == ["mnt"]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


_FOLDER_WRITER = textwrap.dedent("""
    import os, sys
    from lora_layers import fileio
    folder, stop = sys.argv[1], sys.argv[2]
    n = 0
    print("ready", flush=True)
    while not os.path.exists(stop):
        n += 1
        with fileio.atomic_folder(folder) as tmp:
            for name in ("config.json", "weights.bin"):
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(str(n) * (1 + n % 7))
""")


def test_a_reader_racing_a_folder_writer_always_sees_one_version(tmp_path):
    folder, stop = tmp_path / "adapter", tmp_path / "stop"
    folder.mkdir()
    for name in ("config.json", "weights.bin"):
        (folder / name).write_text("0")

    def read(dir_fd):
        out = []
        for name in ("config.json", "weights.bin"):
            with open(name, opener=fileio.dir_opener(dir_fd)) as f:
                out.append(f.read())
                time.sleep(0.0005)  # widen the window between the two files
        return out

    writer = subprocess.Popen([sys.executable, "-c", _FOLDER_WRITER, str(folder), str(stop)], stdout=subprocess.PIPE,
                              text=True)
    mixes, reads, seen = [], 0, set()
    try:
        assert writer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            config, weights = read_folder(folder, read)
            reads += 1
            seen.add(config)
            if config != weights:
                mixes.append((config, weights))
    finally:
        stop.touch()
        writer.wait(timeout=60)
    assert mixes == [] and reads > 50 and len(seen) > 10


def test_remove_folder_never_leaves_a_half_deleted_folder(old_folder, monkeypatch):
    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt  # the deletion cut short
    monkeypatch.setattr(fileio.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fileio.remove_folder(old_folder)
    leftovers = os.listdir(old_folder.parent)
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.") and leftovers[0].endswith(".tmp")
    monkeypatch.undo()
    (old_folder.parent / "file").write_bytes(b"keep")
    (old_folder.parent / "link").symlink_to(old_folder.parent / leftovers[0])
    for bad in ("file", "link"):
        with pytest.raises(NotADirectoryError, match=rf"cannot remove folder='.*{bad}': it is not a folder"):
            fileio.remove_folder(old_folder.parent / bad, arg="folder")
    fileio.remove_folder(old_folder.parent / leftovers[0])
    assert sorted(os.listdir(old_folder.parent)) == ["file", "link"]


_ASIDE_CHILD = textwrap.dedent("""
    import os, signal, sys
    from lora_layers import fileio
    fileio._exchange = lambda a, b: False  # an OS that cannot exchange two folders
    real_rename, calls = os.rename, []
    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst)
    fileio.os.rename = rename
    with fileio.atomic_folder(sys.argv[1]) as tmp:
        open(os.path.join(tmp, "a.bin"), "wb").write(b"new a")
""")


def test_a_crash_inside_the_rename_aside_swap_leaves_the_old_folder_whole_and_named(old_folder):
    before = _tree(old_folder)
    child = subprocess.run([sys.executable, "-c", _ASIDE_CHILD, str(old_folder)], capture_output=True, text=True,
                           timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    aside = [n for n in os.listdir(old_folder.parent) if n.endswith(".old")]
    assert not old_folder.exists() and len(aside) == 1 and aside[0].startswith(".out.")
    assert _tree(old_folder.parent / aside[0]) == before
    with pytest.raises(FileNotFoundError, match=rf"does not exist.*interrupted.*previous version at "
                                                rf"'.*{aside[0]}': rename it to '.*out'"):
        read_folder(old_folder, lambda fd: None)
