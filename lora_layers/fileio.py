"""The file layer: every byte lora_layers writes or reads goes through here.

* Destination checks (:func:`as_path`, :func:`check_destination`): a path that
  cannot be written is refused, naming the argument and the value, before
  anything is created.
* Atomic writes (:func:`atomic_write`): a temp file in the same folder, created
  with the mode ``open()`` gives (0o666 less the umask), flushed, fsynced and
  renamed over the destination, so a crash leaves the previous file intact.
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

import ctypes
import hashlib
import io
import json
import os
import secrets
import struct
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "CheckpointError",
    "as_path",
    "check_destination",
    "atomic_write",
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
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {what} to {arg}={path!r}: folder {folder!r} does not exist")
    limit = _name_max(folder)
    if len(os.fsencode(name)) > limit:
        raise ValueError(f"cannot write {what} to {arg}={path!r}: the file name is {len(os.fsencode(name))} "
                         f"bytes, longer than the {limit} this folder allows")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write {what} to {arg}={path!r}: folder {folder!r} is not writable")
    return path


def _create_temp(folder: str, name: str):
    """A new file next to the destination, created as ``open()`` creates files (mode 0o666 less the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    stem = name[:_NAME_MAX - 30]  # the temp name must fit wherever the destination's name fits
    for _ in range(100):
        tmp = os.path.join(folder, f".{stem}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder!r}")


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
    try:
        fd, tmp = _create_temp(folder, name)
    except PermissionError as exc:
        raise PermissionError(f"cannot write {what} to {arg}={path!r}: folder {folder!r} is not writable "
                              f"({exc})") from exc
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {what} to {arg}={path!r}: {exc.strerror}") from exc
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
    try:  # make the rename itself durable; not every platform can fsync a folder
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


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


def read_file(path, what: str = "checkpoint") -> Tuple[Any, Dict[str, str]]:
    """Read a safetensors or ``torch.save`` file, opening it once.

    The whole file is read through one descriptor and parsed from those bytes,
    so a concurrent ``os.replace`` of the path cannot pair one file's header
    with another's data. The format is recognised by parsing, not by the
    extension: a safetensors header (8-byte length that fits the file, then a
    JSON object), else a zip archive or a pickle (``torch.load(weights_only=True)``).

    Returns:
        ``(tensors, header_metadata)`` for safetensors, ``(object, {})`` for torch files.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: an unrecognised, truncated, corrupted or unsafe file (names the path).
    """
    path = as_path(path)
    try:
        with open(path, "rb") as f:
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
