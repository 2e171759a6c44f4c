"""Adapter checkpoints: safetensors save/load with validation, and loralib files.

A LoRA checkpoint is small and is the result of the run, so:

* writes are atomic (temp file in the same folder, flush + fsync, ``os.replace``):
  a crash mid-save leaves the previous file intact;
* loads validate everything (keys, shapes, dtypes, rank/alpha/splits from the
  header, a checksum of the tensor bytes) *before* touching the model;
* nothing is ever unpickled: safetensors, or ``torch.load(weights_only=True)``.

PEFT's adapter format lives in :mod:`lora_layers.peft_format`, training state
(adapter + optimizer + RNG) in :mod:`lora_layers.training_state`.
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
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ._version import __version__
from .layers import LoRALayer
from .utils import _bias_names, _check_bias, lora_modules, named_lora_parameters

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "LoadResult",
    "save_lora",
    "load_lora",
]

FORMAT_NAME = "lora_layers.adapter"
FORMAT_VERSION = "1"

# Header metadata keys. Everything under RESERVED_PREFIX (and "format", the
# Hugging Face convention) belongs to the library; user metadata keeps its own keys.
RESERVED_PREFIX = "lora_layers."
META_FORMAT = RESERVED_PREFIX + "format"
META_FORMAT_VERSION = RESERVED_PREFIX + "format_version"
META_LIBRARY_VERSION = RESERVED_PREFIX + "version"
META_BIAS = RESERVED_PREFIX + "bias"
META_MODULES = RESERVED_PREFIX + "modules"
META_SHA256 = RESERVED_PREFIX + "sha256"
META_HF_FORMAT = "format"

# Module-config fields compared against the model's layers at load time.
_CONFIG_FIELDS = ("class", "r", "lora_alpha", "use_rslora", "scaling", "split_sizes", "enable_lora",
                  "fan_in_fan_out")

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip archive
_PICKLE_PROTOCOLS = range(2, 6)  # a legacy torch.save file is a pickle: 0x80, then its protocol
_CHUNK = 1 << 20
_NAME_MAX = 255  # the usual file-name limit, where the folder cannot tell its own


class CheckpointError(ValueError):
    """A checkpoint does not fit the model, or the file is unreadable. The model was not changed."""


@dataclass
class LoadResult:
    """What :func:`load_lora` did.

    Attributes:
        missing_keys: adapter keys the model has and the checkpoint lacks (not loaded).
        unexpected_keys: checkpoint keys the model has no adapter/bias for (ignored).
        mismatched_keys: keys skipped for a shape, dtype or layer-config mismatch.
        metadata: the user metadata stored by :func:`save_lora` (empty for loralib files).
    """

    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    mismatched_keys: List[str] = field(default_factory=list)
    metadata: Dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- atomic writes

def _write_chunk(f, chunk) -> None:
    # One indirection so a test can slow the write down and kill the process mid-save.
    f.write(chunk)


def as_path(path, arg: str = "path") -> str:
    """``path`` as a ``str``; refuse what can name no file (the error names ``arg`` and the value)."""
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"{arg} must be a str or os.PathLike, got {type(path).__name__} {path!r}") from None
    if not path:
        raise ValueError(f"{arg} must be a file path, got ''")
    if "\0" in path:
        raise ValueError(f"{arg} must not contain a NUL character, got {path!r}")
    return path


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return _NAME_MAX


def check_destination(path, what: str, arg: str = "path") -> str:
    """Refuse a destination that cannot be written, before anything is created.

    Returns the path as a ``str``. Raises TypeError / ValueError (not a usable
    path), IsADirectoryError, FileNotFoundError (no such folder) or
    PermissionError (folder not writable), each naming ``arg`` and the value.
    """
    path = as_path(path, arg)
    folder, name = os.path.split(os.path.abspath(path))
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

    The file gets the mode ``open()`` would give it (0o666 less the umask).

    Args:
        path: destination file; its folder must exist.
        write: called with the open binary temp file.
        what: a description used in error messages.
        arg: the caller's name for ``path``, used in error messages.

    Raises:
        TypeError / ValueError / FileNotFoundError / PermissionError / IsADirectoryError:
            bad destination (see :func:`check_destination`); any previous file at
            ``path`` is left intact and nothing is created.
    """
    path = check_destination(path, what, arg)
    folder, name = os.path.split(os.path.abspath(path))
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


def _write_bytes(f, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        _write_chunk(f, view[start:start + _CHUNK])


# ----------------------------------------------------------------------------- tensor helpers

def _to_storable(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
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


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _raw_bytes(t: Tensor) -> bytes:
    """The bytes of a contiguous CPU tensor, without numpy (not a core dependency)."""
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def st_serialize(tensors: Dict[str, Tensor], metadata: Dict[str, str]) -> bytes:
    """safetensors bytes: 8-byte little-endian header size, JSON header, raw data.

    Written here because ``safetensors.torch.save`` imports numpy.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("writing safetensors on a big-endian machine is not supported")
    header, blobs, offset = {"__metadata__": dict(metadata)}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        data = _raw_bytes(t)
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _checksum(tensors: Dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_raw_bytes(t))
    return h.hexdigest()


def _module_config(layer: LoRALayer) -> Dict[str, Any]:
    cfg = {"class": type(layer).__name__, "r": layer.r, "lora_alpha": layer.lora_alpha,
           "scaling": layer.scaling, "use_rslora": layer.use_rslora, "lora_dropout": layer.lora_dropout.p}
    if hasattr(layer, "fan_in_fan_out"):
        cfg["fan_in_fan_out"] = layer.fan_in_fan_out
    if hasattr(layer, "split_sizes"):
        cfg["split_sizes"] = list(layer.split_sizes)
        cfg["enable_lora"] = list(layer.enable_lora)
    return cfg


def _check_user_metadata(metadata) -> Dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of str -> str or None, got {type(metadata).__name__} "
                        f"{metadata!r}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str -> str, got {key!r}: {value!r} "
                            f"({type(key).__name__} -> {type(value).__name__})")
        if key.startswith(RESERVED_PREFIX) or key == META_HF_FORMAT:
            raise ValueError(f"metadata key {key!r} is reserved (keys starting with {RESERVED_PREFIX!r} "
                             f"and {META_HF_FORMAT!r} belong to lora_layers)")
    return dict(metadata)


def _adapter_payload(model: nn.Module, bias: str) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """The adapter tensors and the library header fields for ``model``."""
    _check_bias(bias)
    tensors = {name: p for name, p in named_lora_parameters(model)}
    if not tensors:
        raise ValueError(f"the model ({type(model).__name__}) has no LoRA adapters (no LoRA layer with r > 0; "
                         f"merge_and_unload removes them), so there is nothing to save")
    tensors.update(_bias_names(model, bias))
    tensors = _to_storable(tensors)
    modules = {name: _module_config(m) for name, m in lora_modules(model) if m.has_adapter}
    header = {
        META_HF_FORMAT: "pt",
        META_FORMAT: FORMAT_NAME,
        META_FORMAT_VERSION: FORMAT_VERSION,
        META_LIBRARY_VERSION: __version__,
        META_BIAS: bias,
        META_MODULES: json.dumps(modules, sort_keys=True),
        META_SHA256: _checksum(tensors),
    }
    return tensors, header


def save_lora(model: nn.Module, path, bias: str = "none", metadata: Optional[Dict[str, str]] = None) -> None:
    """Save the adapter tensors of ``model`` (and biases per ``bias``) as safetensors, atomically.

    Keys are exactly those of ``model.state_dict()`` (as :func:`lora_layers.lora_state_dict`).
    The header records the format, the library version, the bias mode, a
    SHA-256 of the tensor bytes and, per LoRA module, ``r``, ``lora_alpha``,
    ``scaling``, ``use_rslora``, the layer class and (MergedLinear)
    ``split_sizes``/``enable_lora``, so :func:`load_lora` can check them.

    Args:
        model: a module containing LoRA layers (merged or not: adapters are never merged away).
        path: destination file; its folder must exist. A previous file is replaced
            only once the new one is complete on disk.
        bias: ``"none"``, ``"all"`` or ``"lora_only"`` (as :func:`lora_layers.lora_state_dict`).
        metadata: extra ``str -> str`` header entries, returned by :func:`load_lora`.

    Raises:
        ValueError: no adapters in ``model``, bad ``bias``, a reserved metadata key,
            or a ``path`` that names no file (e.g. ``""``).
        TypeError: ``metadata`` is not a dict of str -> str, or ``path`` is not a path.
        FileNotFoundError / PermissionError / IsADirectoryError: bad destination.

    Nothing is written when any of these is raised.
    """
    user = _check_user_metadata(metadata)
    check_destination(path, "LoRA checkpoint")
    tensors, header = _adapter_payload(model, bias)
    data = st_serialize(tensors, {**user, **header})
    atomic_write(path, lambda f: _write_bytes(f, data), "LoRA checkpoint")


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
    expected = meta.get(META_SHA256)
    if expected is not None and _checksum(tensors) != expected:
        raise CheckpointError(f"{path!r} is corrupted: the SHA-256 of its tensor data does not match the "
                              f"checksum in its header")
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
        ``(tensors, header_metadata)`` for safetensors (the header checksum, if
        any, verified), ``(object, {})`` for torch files.

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
    if data.startswith(_ZIP_MAGIC) or (data[:1] == b"\x80" and data[1:2] and data[1] in _PICKLE_PROTOCOLS):
        return _parse_torch(data, path), {}
    raise CheckpointError(f"{path!r} is not a valid safetensors file nor a torch.save file (empty, truncated, "
                          f"corrupted or another format; it starts with {data[:8]!r})")


def read_checkpoint(path) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Read a native/safetensors checkpoint or a loralib ``torch.save`` state_dict (see :func:`read_file`).

    Returns:
        ``(tensors, header_metadata)``; the metadata is empty for torch files.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, truncated, corrupted or unsafe file, or a
            torch file that is not a state_dict (names the path).
    """
    obj, meta = read_file(path, "LoRA checkpoint")
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{os.fspath(path)!r} does not hold a state_dict (a dict of str -> Tensor), "
                              f"got {type(obj).__name__}")
    return dict(obj), meta


# ----------------------------------------------------------------------------- validation

def _config_mismatches(saved: Dict[str, Any], layer: LoRALayer) -> List[str]:
    current = _module_config(layer)
    problems = []
    for key in _CONFIG_FIELDS:
        if key in saved and key in current and saved[key] != current[key]:
            problems.append(f"{key}: checkpoint {saved[key]!r}, model {current[key]!r}")
    return problems


def _plan_load(model: nn.Module, tensors: Dict[str, Tensor], meta: Dict[str, str], strict: bool,
               source: str):
    """Validate ``tensors`` against ``model``; return the copies to make and the report.

    Touches nothing. Raises CheckpointError listing every problem when ``strict``.
    """
    params = dict(named_lora_parameters(model))
    owner = {}  # key -> LoRA layer whose merge state must be handled
    for name, layer in lora_modules(model):
        for local in layer.adapter_parameters():
            owner[f"{name}.{local}" if name else local] = layer
    all_biases = _bias_names(model, "all")
    bias_mode = meta.get(META_BIAS)
    if bias_mode is not None and bias_mode not in ("none", "all", "lora_only"):
        raise CheckpointError(f"{source}: header field {META_BIAS}={bias_mode!r} is not a valid bias mode, "
                              f"expected 'none', 'all' or 'lora_only'")
    expected = dict(params)
    if bias_mode is not None:
        expected.update(_bias_names(model, bias_mode))
    else:  # loralib files carry no bias mode: accept whichever biases they hold
        expected.update({k: all_biases[k] for k in tensors if k in all_biases})

    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    problems, mismatched = [], set()

    saved_modules = {}
    if META_MODULES in meta:
        try:
            saved_modules = json.loads(meta[META_MODULES])
            assert isinstance(saved_modules, dict)
        except (ValueError, AssertionError) as exc:
            raise CheckpointError(f"{source}: header field {META_MODULES} is not a JSON object: {exc}") from exc
    modules = dict(lora_modules(model))
    for mod_name, saved in saved_modules.items():
        layer = modules.get(mod_name)
        if layer is None or not isinstance(saved, dict):
            continue  # its keys are reported as unexpected
        diffs = _config_mismatches(saved, layer)
        if diffs:
            problems.append(f"module {mod_name!r} ({type(layer).__name__}) differs: " + "; ".join(diffs))
            mismatched.update(k for k in tensors if owner.get(k) is layer)

    copies = []
    for key in sorted(tensors):
        if key not in expected or key in mismatched:
            continue
        t, p = tensors[key], expected[key]
        if tuple(t.shape) != tuple(p.shape):
            problems.append(f"{key}: shape mismatch, expected {tuple(p.shape)} (model), got {tuple(t.shape)} "
                            f"(checkpoint)")
            mismatched.add(key)
        elif not t.is_floating_point():
            problems.append(f"{key}: dtype {t.dtype} is not a floating dtype (model has {p.dtype})")
            mismatched.add(key)
        else:
            copies.append((key, owner.get(key), p, t))

    if missing:
        problems.append(f"missing keys (in the model, not in the checkpoint): {missing}")
    if unexpected:
        problems.append(f"unexpected keys (in the checkpoint, not in the model): {unexpected}")
    user = {k: v for k, v in meta.items() if not k.startswith(RESERVED_PREFIX) and k != META_HF_FORMAT}
    result = LoadResult(missing, unexpected, sorted(mismatched), user)
    if problems and strict:
        raise CheckpointError(f"{source} does not match the model (nothing was loaded):\n  - "
                              + "\n  - ".join(problems))
    if problems:
        warnings.warn(f"{source}: loading with strict=False, skipping:\n  - " + "\n  - ".join(problems),
                      stacklevel=3)
    return copies, result


@torch.no_grad()
def _apply_copies(copies) -> None:
    """Copy in place; a merged layer is unmerged, loaded and re-merged (as load-unmerged-then-merge)."""
    layers = {}
    for _, layer, _, _ in copies:
        if layer is not None and layer.merged:
            layers[id(layer)] = layer
    for layer in layers.values():
        layer.unmerge()
    try:
        for _, _, param, tensor in copies:
            param.copy_(tensor)  # casts to the parameter's dtype, keeps its device and identity
    finally:
        for layer in layers.values():
            layer.merge()


def load_lora(model: nn.Module, path, strict: bool = True) -> LoadResult:
    """Load adapter tensors into ``model`` after validating everything.

    Reads a :func:`save_lora` safetensors file, any safetensors file keyed like
    ``model.state_dict()``, or a loralib ``torch.save(lora_state_dict(model))``
    file (via ``torch.load(weights_only=True)`` only: nothing is unpickled).

    Checked before anything is touched: the key sets (missing and unexpected
    keys by name), shapes (name, expected, got), floating dtypes, the header's
    per-module r / alpha / scaling mode / splits against the model's layers,
    and the header checksum. Values are copied into the existing Parameters
    (same objects, device and dtype, so optimizer state stays attached); a
    tensor stored in another floating dtype is cast to the parameter's dtype.
    A merged layer is unmerged, loaded and merged again.

    Args:
        model: the module to load into.
        path: the checkpoint file.
        strict: raise on any mismatch (the model is then bitwise unchanged);
            with ``False``, load what matches, warn, and report the rest.

    Returns:
        :class:`LoadResult` with ``missing_keys``, ``unexpected_keys``,
        ``mismatched_keys`` and the user ``metadata``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError (a ValueError): unreadable/corrupted/unsafe file, or a mismatch with ``strict=True``.
    """
    path = os.fspath(path)
    tensors, meta = read_checkpoint(path)
    fmt = meta.get(META_FORMAT)
    if fmt is not None and fmt != FORMAT_NAME:
        raise CheckpointError(f"{path!r} has format {fmt!r}, expected {FORMAT_NAME!r}")
    version = meta.get(META_FORMAT_VERSION)
    if version is not None and version != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has format version {version!r}; this lora_layers reads {FORMAT_VERSION!r}")
    copies, result = _plan_load(model, tensors, meta, strict, f"LoRA checkpoint {path!r}")
    _apply_copies(copies)
    return result
