"""The file layer: every byte lora_layers writes or reads goes through here.

* Destination checks (:func:`as_path`, :func:`check_destination`): a path that
  cannot be written is refused, naming the argument and the value, before
  anything is created.
* Atomic writes (:func:`atomic_write`): a temp file in the same folder, created
  with the mode ``open()`` gives (0o666 less the umask), flushed, fsynced and
  renamed over the destination, so a crash leaves the previous file intact.
* Atomic folders (:func:`atomic_folder`, :func:`read_folder`,
  :func:`remove_folder`): a folder of several files is built beside the
  destination and swapped in whole, so a crash leaves the old folder or the new
  one, never a mix of their files, and is never seen half-deleted.
* The safetensors writer (:func:`safetensors_bytes`), numpy-free, and the
  tensor checksum (:func:`tensor_checksum`).
* Reading (:func:`read_file`): the file is opened once and parsed from those
  bytes; its format (safetensors, torch.save zip, legacy pickle) is recognised
  by parsing, and torch files are read with ``torch.load(weights_only=True)``.

What the files mean (header schema, validation against a model) lives in
:mod:`lora_layers.checkpoint`, :mod:`lora_layers.training_state` and
:mod:`lora_layers.peft_format`. The core depends only on torch and safetensors.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import io
import json
import os
import secrets
import shutil
import stat
import struct
import sys
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple, TypeVar

try:
    import fcntl
except ImportError:  # not POSIX: temp files are not locked, and a crash's leftovers are not swept
    fcntl = None

import torch
from torch import Tensor

__all__ = [
    "CheckpointError",
    "as_path",
    "check_destination",
    "atomic_write",
    "atomic_folder",
    "read_folder",
    "remove_folder",
    "dir_opener",
    "to_storable",
    "raw_bytes",
    "safetensors_bytes",
    "tensor_checksum",
    "read_file",
]

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip archive
PICKLE_PROTOCOLS = range(2, 6)  # a legacy torch.save file is a pickle: 0x80, then its protocol
_NAME_MAX = 255  # the usual file-name limit, where the folder cannot tell its own
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model, or the file is unreadable. The model was not changed."""


# ----------------------------------------------------------------------------- destinations and atomic writes

def as_path(path, arg: str = "path") -> str:
    """``path`` as a ``str``; refuse what can name no file (the error names ``arg`` and the value)."""
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"{arg} must be a str or os.PathLike, got {type(path).__name__} {path!r}") from None
    if not path:
        raise ValueError(f"{arg} must be a non-empty path, got ''")
    if "\0" in path:
        raise ValueError(f"{arg} must not contain a NUL character, got {path!r}")
    return path


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return _NAME_MAX


def _split(path: str):
    """``(folder, name)`` as the OS resolves them: ``missing/../x`` needs ``missing`` (and a symlink
    before ``..`` is followed), so the folder is not normalised lexically."""
    folder, name = os.path.split(path)
    return folder or os.curdir, name


def check_destination(path, what: str, arg: str = "path") -> str:
    """Refuse a destination that cannot be written, before anything is created.

    Returns the path as a ``str``. Raises TypeError / ValueError (not a usable
    path), IsADirectoryError, FileNotFoundError (no such folder) or
    PermissionError (folder not writable), each naming ``arg`` and the value.
    """
    path = as_path(path, arg)
    folder, name = _split(path)
    if path.endswith((os.sep, os.altsep or os.sep)) or name in ("", ".", "..") or os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {what} to {arg}={path!r}: it is a directory or names a folder, "
                                f"expected a file path")
    _check_parent(path, folder, name, what, arg)
    return path


def _check_parent(path: str, folder: str, name: str, what: str, arg: str) -> None:
    """Refuse a destination whose folder is missing or not writable, or whose name is too long."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {what} to {arg}={path!r}: folder {folder!r} does not exist")
    limit = _name_max(folder)
    if len(os.fsencode(name)) > limit:
        raise ValueError(f"cannot write {what} to {arg}={path!r}: the file name is {len(os.fsencode(name))} "
                         f"bytes, longer than the {limit} this folder allows")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write {what} to {arg}={path!r}: folder {folder!r} is not writable")


def _open_new(tmp: str) -> int:
    """Create a file as ``open()`` creates files (mode 0o666 less the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    return os.open(tmp, flags, 0o666)


def _temp_stem(name: str) -> str:
    return name[:_NAME_MAX - 30]  # the temp name must fit wherever the destination's name fits


def _create_temp(folder: str, name: str, create: Callable[[str], Any] = _open_new, suffix: str = ".tmp"):
    """``(create(tmp), tmp)`` for a new name ``.<name>.<random><suffix>`` next to the destination."""
    stem = _temp_stem(name)
    for _ in range(100):
        tmp = os.path.join(folder, f".{stem}.{secrets.token_hex(6)}{suffix}")
        try:
            return create(tmp), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder!r}")


def _lock(fd: int, block: bool) -> bool:
    """Take the exclusive ``flock`` on ``fd``; False where it is held (``block=False``) or not supported."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def _create_locked_temp(folder: str, name: str, directory: bool) -> Tuple[Optional[int], str]:
    """``(fd, tmp)``: a new temp file (or folder) beside the destination, opened and ``flock``-ed
    (a folder is not opened, ``fd`` None, where there are no locks: Windows cannot open folders).

    The lock, held until the descriptor is closed (by the kernel when the process dies), tells
    :func:`_sweep_temps` that the temp belongs to a live writer. A temp that a sweep removed before it
    was locked is replaced by another."""
    for _ in range(100):
        if directory:
            _, tmp = _create_temp(folder, name, create=os.mkdir)
            if fcntl is None:
                return None, tmp
            try:
                fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except FileNotFoundError:
                continue
        else:
            fd, tmp = _create_temp(folder, name)
        if not _lock(fd, block=True):
            return fd, tmp  # no locks here: nothing is swept either
        try:
            if os.path.samestat(os.fstat(fd), os.lstat(tmp)):
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)  # swept between its creation and the lock
    raise FileExistsError(f"could not create a temporary file in {folder!r}")


def _sweep_temps(folder: str, name: str) -> None:
    """Remove the ``.<name>.<random>.tmp`` files and folders that killed writers of ``name`` left in ``folder``.

    Only a temp whose ``flock`` can be taken is removed: a live writer holds its own. Where locks are not
    supported, nothing is removed. Errors are ignored: this is housekeeping."""
    if fcntl is None:
        return
    prefix = f".{_temp_stem(name)}."
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".tmp")
                 and len(n) == len(prefix) + 16 and all(c in "0123456789abcdef" for c in n[len(prefix):-4])]
    except OSError:
        return
    for entry in names:
        path = os.path.join(folder, entry)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not _lock(fd, block=False) or not os.path.samestat(st, os.lstat(path)):
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path, ignore_errors=True)
            elif stat.S_ISREG(st.st_mode):
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _fsync_folder(folder: str) -> None:
    """Make renames in ``folder`` durable; not every platform can fsync a folder."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write(path, write: Callable, what: str = "file", arg: str = "path") -> None:
    """Write a file atomically: temp file in the same folder, flush + fsync, ``os.replace``.

    The file gets the mode ``open()`` would give it (0o666 less the umask). A
    symlink at ``path`` is written through: the file it points to is replaced.

    Args:
        path: destination file; its folder must exist.
        write: called with the open binary temp file.
        what: a description used in error messages.
        arg: the caller's name for ``path``, used in error messages.

    Raises:
        TypeError / ValueError / FileNotFoundError / PermissionError / IsADirectoryError:
            bad destination (see :func:`check_destination`); any previous file at
            ``path`` is left intact and nothing is created.
        Whatever ``write`` raises: the temp file is removed, the previous file kept.
    """
    path = check_destination(path, what, arg)
    if os.path.islink(path):
        # Write through a symlink (``latest.pt -> runs/7/step.pt``), as torch.save does: the file it
        # points to is replaced atomically and the link stays. Renaming onto the link itself would
        # turn it into a plain file and leave the target stale.
        path = check_destination(os.path.realpath(path), what, arg)
    folder, name = _split(path)
    _sweep_temps(folder, name)
    try:
        fd, tmp = _create_locked_temp(folder, name, directory=False)
    except PermissionError as exc:
        raise PermissionError(f"cannot write {what} to {arg}={path!r}: folder {folder!r} is not writable "
                              f"({exc})") from exc
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {what} to {arg}={path!r}: {exc.strerror}") from exc
    lock = os.dup(fd)  # holds the temp's lock until it is renamed into place
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(lock)
    _fsync_folder(folder)


# ----------------------------------------------------------------------------- atomic folders

_AT_FDCWD = -100  # Linux: paths relative to the current directory
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15, glibc >= 2.28): swap two paths in one step
_T = TypeVar("_T")


def _exchange(a: str, b: str) -> bool:
    """Swap the folders at ``a`` and ``b`` in one atomic step; False where the OS or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # no such libc function (not Linux, or an old glibc)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # an old kernel or filesystem
        return False
    raise OSError(err, f"cannot swap {a!r} and {b!r}: {os.strerror(err)}")


def _move_aside(path: str, suffix: str) -> str:
    """Rename the folder ``path`` to a new ``.<name>.<random><suffix>`` beside it, in one step; return that."""
    _, aside = _create_temp(*_split(path), create=os.mkdir, suffix=suffix)
    os.rename(path, aside)  # over the empty placeholder, which reserved a fresh name
    return aside


def remove_folder(path, arg: str = "path") -> None:
    """Delete a folder so that it is never seen half-deleted: renamed aside in one step, then removed.

    A crash during the removal leaves a ``.<name>.<random>.tmp`` folder, which the next atomic write
    of ``path`` removes.
    """
    path = as_path(path, arg)
    if os.path.islink(path) or not os.path.isdir(path):
        raise NotADirectoryError(f"cannot remove {arg}={path!r}: it is not a folder")
    aside = _move_aside(path, ".tmp")
    while True:
        try:
            shutil.rmtree(aside)
            return
        except FileNotFoundError:  # another process's sweep (see _sweep_temps) is removing it too
            if not os.path.lexists(aside):
                return


def _swap_in(new: str, path: str, exists: bool) -> Optional[str]:
    """Put the folder ``new`` at ``path``; return where the old folder went (to delete), if there was one."""
    if not exists:
        try:
            os.rename(new, path)
            return None
        except OSError as exc:  # another writer created the folder since it was checked: replace it
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not os.path.isdir(path):
                raise
    if _exchange(new, path):
        return new
    # No exchange here: the old folder steps aside first, so ``path`` is missing for an instant, and a
    # crash in that instant leaves the old folder whole under ``.<name>.<random>.old`` beside it.
    backup = _move_aside(path, ".old")
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(backup, path)
        raise
    return backup


def _folder_destination(path, what: str, arg: str) -> Tuple[str, bool]:
    """``(folder to replace, whether it exists)``, refusing what cannot be swapped before anything is created.
    A symlink is resolved: the folder it points to is replaced and the link stays."""
    given = as_path(path, arg)
    target = os.path.realpath(given) if os.path.islink(given) else given
    folder, name = _split(target.rstrip(os.sep + (os.altsep or "")) or target)
    if name in ("", ".", ".."):
        raise ValueError(f"cannot write {what} to {arg}={given!r}: expected a path ending in the folder's own "
                         f"name (e.g. 'out/adapter'), so that the folder can be replaced whole")
    target = os.path.join(folder, name)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise FileExistsError(f"cannot write {what} to {arg}={given!r}: it is a file, expected a folder")
    _check_parent(given, folder, name, what, arg)
    return target, os.path.isdir(target)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no data copied, and the old folder is deleted right after anyway
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str, owned: Tuple[str, ...]) -> None:
    """Bring into ``new`` the entries of ``old`` that it lacks, except the writer's own (``owned``)."""
    with os.scandir(old) as entries:
        for entry in entries:
            dst = os.path.join(new, entry.name)
            if os.path.lexists(dst) or any(fnmatch.fnmatchcase(entry.name, p) for p in owned):
                continue
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), dst)
            elif entry.is_dir():
                shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry.path, dst)


def _fsync_tree(folder: str) -> None:
    """fsync every file and folder under ``folder``: the swap must not publish data still in the page cache."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_folder(root)


@contextlib.contextmanager
def atomic_folder(path, what: str = "folder", arg: str = "path", owned: Iterable[str] = ()) -> Iterator[str]:
    """Write a folder of several files atomically: build it beside ``path``, then swap it in whole.

    Yields a new empty folder ``.<name>.<random>.tmp`` next to ``path`` to write
    into. When the block succeeds: entries of the old folder that the block did
    not write are carried over (hard links, or copies), except names matching an
    ``owned`` glob pattern (the writer's stale files); every file is fsynced; the
    folder takes the old one's permission bits (a new one gets 0o777 less the
    umask); and it replaces the old folder in one step (``renameat2`` with
    ``RENAME_EXCHANGE``), which is then deleted. Where the OS cannot exchange two
    folders, the old one is renamed aside first, leaving ``path`` missing for an
    instant. A symlink at ``path`` is written through: its target is replaced.
    A folder that is a mount point (a Docker or Kubernetes volume) cannot be
    renamed: the block's files are built in a temp folder inside it and renamed
    into place one by one, each whole, so a crash there may leave a mix of old
    and new files.

    A crash or an exception at any point leaves the old folder or the new one at
    ``path``, never a mix; a crash leaves a ``.<name>.<random>.tmp`` folder
    beside it, which the next write to ``path`` removes (a temp is ``flock``-ed
    while its writer lives, so a concurrent writer's is never touched). Readers that open several files of the folder
    should use :func:`read_folder` to see one version.

    Raises:
        TypeError / ValueError: not a usable path, or one that does not end in a
            folder name (``.``, ``..``, ``/``).
        FileExistsError: ``path`` is a file. FileNotFoundError / PermissionError:
            its parent is missing or not writable. Nothing is created then.
        Whatever the block raises: the temp folder is removed, the old folder kept.
    """
    if isinstance(owned, (str, bytes)):  # iterated, "*.bin" would be "*", ".", ... and "*" matches everything
        raise TypeError(f"owned must be a collection of glob patterns, e.g. ({owned!r},), got the string {owned!r}")
    owned = tuple(owned)
    path, exists = _folder_destination(path, what, arg)
    if exists and os.path.ismount(path):
        with _into_mount_point(path, owned) as tmp:
            yield tmp
        return
    _sweep_temps(*_split(path))
    lock, tmp = _create_locked_temp(*_split(path), directory=True)
    try:
        yield tmp
        if exists:
            _carry_over(path, tmp, owned)
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # keep the permissions the user gave the folder
        _fsync_tree(tmp)
        old = _swap_in(tmp, path, exists)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    _fsync_folder(_split(path)[0])
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _into_mount_point(path: str, owned: Tuple[str, ...]) -> Iterator[str]:
    """:func:`atomic_folder` for a folder that is a mount point (a Docker volume, a Kubernetes volume), which
    cannot be renamed or swapped (EBUSY): the new files are built in a temp folder inside it, then each is
    renamed into place whole, one after the other, and the owned entries the build did not write are
    removed. Each file is old or new, never partial; the folder may briefly hold a mix of the two versions."""
    name = os.path.basename(path)
    _sweep_temps(path, name)
    lock, tmp = _create_locked_temp(path, name, directory=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        written = set(os.listdir(tmp))
        for entry in sorted(written):
            src, dst = os.path.join(tmp, entry), os.path.join(path, entry)
            if os.path.isdir(src) and not os.path.islink(src) and os.path.isdir(dst) and not os.path.islink(dst):
                if not _exchange(src, dst):
                    shutil.rmtree(_move_aside(dst, ".tmp"))
                    os.rename(src, dst)
            else:
                if os.path.isdir(dst) and not os.path.islink(dst):
                    shutil.rmtree(_move_aside(dst, ".tmp"))
                os.replace(src, dst)
        for entry in os.listdir(path):
            if (entry not in written and entry != os.path.basename(tmp)
                    and any(fnmatch.fnmatchcase(entry, p) for p in owned)):
                stale = os.path.join(path, entry)
                if os.path.isdir(stale) and not os.path.islink(stale):
                    shutil.rmtree(_move_aside(stale, ".tmp"))
                else:
                    os.unlink(stale)
        _fsync_folder(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # empty once its entries are in place; the build, on failure
        if lock is not None:
            os.close(lock)


def _left_aside(path: str) -> str:
    """Where the rename-aside swap left the old folder of ``path``, when a crash came between its renames."""
    folder, name = _split(path.rstrip(os.sep + (os.altsep or "")) or path)
    prefix = f".{name[:_NAME_MAX - 30]}."
    try:
        found = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".old"))
    except OSError:
        return ""
    if not found:
        return ""
    return (f"; a folder swap was interrupted and left the previous version at "
            f"{os.path.join(folder, found[-1])!r}: rename it to {path!r}")


def read_folder(path, read: Callable[[int], _T], what: str = "folder") -> _T:
    """``read(dir_fd)`` on the folder at ``path``, opened once.

    Files that ``read`` opens relative to ``dir_fd`` (``open(name,
    opener=dir_opener(dir_fd))``, :func:`read_file` with ``dir_fd``) all come from one version
    of the folder, even while :func:`atomic_folder` swaps a new one in. When
    that version is deleted under the reader (a FileNotFoundError while another
    folder now stands at ``path``), ``read`` runs again on the new one.

    Raises:
        FileNotFoundError: ``path`` is not a folder (naming the old version, if a
            crash during a rename-aside swap left one beside it); or what ``read`` raises.
    """
    path = as_path(path)
    while True:
        try:
            dir_fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"{what} {path!r} does not exist or is not a folder{_left_aside(path)}") from None
        try:
            return read(dir_fd)
        except FileNotFoundError:
            try:
                swapped = not os.path.samestat(os.fstat(dir_fd), os.stat(path))
            except FileNotFoundError:
                swapped = True
            if not swapped:
                raise
        finally:
            os.close(dir_fd)


# ----------------------------------------------------------------------------- tensors to bytes

def to_storable(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """CPU, contiguous tensors that own their storage (safetensors refuses shared or strided ones)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if (not t.is_contiguous() or ptr in seen
                or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.contiguous().clone()
        if ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def raw_bytes(t: Tensor) -> bytes:
    """The bytes of a contiguous CPU tensor, without numpy (not a core dependency)."""
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def safetensors_bytes(tensors: Dict[str, Tensor], metadata: Dict[str, str]) -> bytes:
    """safetensors bytes: 8-byte little-endian header size, JSON header, raw data.

    Written here because ``safetensors.torch.save`` imports numpy.

    Raises:
        TypeError: a tensor of a dtype this writer does not store (named).
    """
    if sys.byteorder != "little":
        raise NotImplementedError("writing safetensors on a big-endian machine is not supported")
    header, blobs, offset = {"__metadata__": dict(metadata)}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}; safetensors files are written for "
                            f"{sorted(str(d) for d in _ST_DTYPES)}")
        data = raw_bytes(t)
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def tensor_checksum(tensors: Dict[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors``, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(raw_bytes(t))
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading

def _safetensors_header_size(data: bytes) -> Optional[int]:
    """The header size if ``data`` starts like a safetensors file (a length that fits, then a JSON object)."""
    if len(data) < 10:
        return None
    (size,) = struct.unpack("<Q", data[:8])
    if size < 2 or 8 + size > len(data) or data[8:9] != b"{" or not data[8:8 + size].rstrip(b" ").endswith(b"}"):
        return None
    return size


def _parse_safetensors(data: bytes, size: int, path: str) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    from safetensors.torch import load

    try:
        header = json.loads(data[8:8 + size])
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ must map str -> str")
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path!r} is not a valid safetensors file (truncated, corrupted or another "
                              f"format): {exc}") from exc
    return tensors, meta


def _parse_torch(data: bytes, path: str):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot load {path!r} with torch.load(weights_only=True): it is truncated, corrupted, or holds "
            f"objects other than tensors and plain containers, which lora_layers refuses to unpickle "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def dir_opener(dir_fd: Optional[int]):
    """An ``open(..., opener=)`` that opens names in the folder ``dir_fd`` (see :func:`read_folder`);
    None, ``open()``'s default, for ``dir_fd=None``."""
    return None if dir_fd is None else (lambda name, flags: os.open(name, flags, dir_fd=dir_fd))


def read_file(path, what: str = "checkpoint", dir_fd: Optional[int] = None) -> Tuple[Any, Dict[str, str]]:
    """Read a safetensors or ``torch.save`` file, opening it once.

    The whole file is read through one descriptor and parsed from those bytes,
    so a concurrent ``os.replace`` of the path cannot pair one file's header
    with another's data. The format is recognised by parsing, not by the
    extension: a safetensors header (8-byte length that fits the file, then a
    JSON object), else a zip archive or a pickle (``torch.load(weights_only=True)``).
    With ``dir_fd`` (see :func:`read_folder`), the file named ``basename(path)``
    is opened in that folder; ``path`` names it in messages.

    Returns:
        ``(tensors, header_metadata)`` for safetensors, ``(object, {})`` for torch files.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: an unrecognised, truncated, corrupted or unsafe file (names the path).
    """
    path = as_path(path)
    try:
        with open(path if dir_fd is None else os.path.basename(path), "rb", opener=dir_opener(dir_fd)) as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(f"{what} {path!r} does not exist or is not a file") from None
    size = _safetensors_header_size(data)
    if size is not None:
        return _parse_safetensors(data, size, path)
    if data.startswith(ZIP_MAGIC) or (data[:1] == b"\x80" and data[1:2] and data[1] in PICKLE_PROTOCOLS):
        return _parse_torch(data, path), {}
    raise CheckpointError(f"{path!r} is not a valid safetensors file nor a torch.save file (empty, truncated, "
                          f"corrupted or another format; it starts with {data[:8]!r})")
