"""Training-state checkpoints: resume a run exactly.

One safetensors file holds the adapter (as :func:`~lora_layers.save_lora`
writes it), the optimizer and scheduler state, the step, user extras and the
RNG states (torch CPU and CUDA, Python ``random``, NumPy when installed).
Tensors are safetensors entries; everything else is JSON in the header, so
loading never unpickles anything. Writes are atomic.
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .checkpoint import (
    META_FORMAT,
    META_SHA256,
    RESERVED_PREFIX,
    CheckpointError,
    _adapter_payload,
    _apply_copies,
    check_destination as _check_destination,
    _checksum,
    _plan_load,
    _to_storable,
    _write_bytes,
    atomic_write,
    read_checkpoint,
    st_serialize,
)

__all__ = ["TRAINING_STATE_FILE", "save_training_state", "load_training_state"]

TRAINING_STATE_FORMAT = "lora_layers.training_state"
TRAINING_STATE_FILE = "training_state.safetensors"
META_TRAINING = RESERVED_PREFIX + "training"
_ADAPTER_PREFIX = "adapter/"
_STATE_PREFIX = "state/"
_TAGS = ("__tensor__", "__tuple__", "__dict__")


def _encode(obj, tensors: Dict[str, Tensor], where: str):
    """Plain containers -> JSON-able data; tensors go to ``tensors`` (no pickle anywhere)."""
    if isinstance(obj, Tensor):
        key = f"{_STATE_PREFIX}{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    raise TypeError(f"{where} is a {type(obj).__name__}; training state may hold only tensors, None, bool, "
                    f"int, float, str, lists, tuples and dicts (no pickled objects)")


def _decode(obj, tensors: Dict[str, Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if len(obj) == 1 and "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if len(obj) == 1 and "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _state_file(path_or_dir, create: bool) -> str:
    path = os.fspath(path_or_dir)
    if path.endswith(".safetensors"):
        return path
    if create and not os.path.isdir(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"cannot write training state to {path!r}: folder {parent!r} does not exist")
        os.mkdir(path)
    return os.path.join(path, TRAINING_STATE_FILE)


def save_training_state(path_or_dir, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                        step: int = 0, extra: Optional[Dict[str, Any]] = None, *, bias: str = "none") -> None:
    """Save everything needed to resume training exactly, in ONE safetensors file, atomically.

    Holds the adapter (as :func:`save_lora`), ``optimizer.state_dict()``,
    ``scheduler.state_dict()``, ``step``, ``extra`` and the RNG states (torch
    CPU, CUDA when available, Python ``random``, NumPy when installed).
    Tensors are stored as safetensors and everything else as JSON in the
    header: nothing is pickled, so loading can never run code.

    Args:
        path_or_dir: a ``.safetensors`` file, or a folder (created if its parent
            exists) that receives ``training_state.safetensors``.
        model, optimizer, scheduler: the objects to checkpoint (scheduler optional).
        step: the training step to resume from.
        extra: plain data (dicts, lists, tuples, numbers, strings, tensors) to keep.
        bias: which biases to save with the adapter (as :func:`save_lora`).

    Raises:
        TypeError: ``extra`` or a state_dict holds an object that is not plain data.
        ValueError: bad ``bias``.
        FileNotFoundError / PermissionError: bad destination (nothing is written).
    """

    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {step!r}")
    adapter, header = _adapter_payload(model, bias)
    state_tensors: Dict[str, Tensor] = {}
    payload = {
        "step": step,
        "extra": _encode(extra, state_tensors, "extra"),
        "optimizer": _encode(optimizer.state_dict(), state_tensors, "optimizer.state_dict()"),
        "scheduler": None if scheduler is None else _encode(scheduler.state_dict(), state_tensors,
                                                            "scheduler.state_dict()"),
        "rng": _encode(_rng_state(), state_tensors, "rng"),
    }
    tensors = {**{_ADAPTER_PREFIX + k: v for k, v in adapter.items()}, **_to_storable(state_tensors)}
    header.update({META_FORMAT: TRAINING_STATE_FORMAT, META_TRAINING: json.dumps(payload),
                   META_SHA256: _checksum(tensors)})
    path = _state_file(path_or_dir, create=True)
    _check_destination(path, "training state")
    data = st_serialize(tensors, header)
    atomic_write(path, lambda f: _write_bytes(f, data), "training state")


def load_training_state(path_or_dir, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler=None) -> Dict[str, Any]:
    """Restore what :func:`save_training_state` saved, into fresh or existing objects.

    The adapter is validated strictly (as :func:`load_lora`) and the optimizer's
    parameter groups checked before anything changes; then the optimizer,
    scheduler, adapter (copied into the existing Parameters) and RNG states are
    restored.

    Args:
        path_or_dir: the file or folder given to :func:`save_training_state`.
        model, optimizer, scheduler: built the same way as when saving.

    Returns:
        ``{"step": int, "extra": ...}``.

    Raises:
        FileNotFoundError: no training state there.
        CheckpointError (a ValueError): unreadable file, or it does not fit the model/optimizer/scheduler.
    """
    path = _state_file(path_or_dir, create=False)
    tensors, meta = read_checkpoint(path)
    if meta.get(META_FORMAT) != TRAINING_STATE_FORMAT or META_TRAINING not in meta:
        raise CheckpointError(f"{path!r} is not a lora_layers training state (format {meta.get(META_FORMAT)!r})")
    try:
        payload = _decode(json.loads(meta[META_TRAINING]), tensors)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path!r}: header field {META_TRAINING} is damaged: {exc}") from exc
    adapter = {k[len(_ADAPTER_PREFIX):]: v for k, v in tensors.items() if k.startswith(_ADAPTER_PREFIX)}
    copies, _ = _plan_load(model, adapter, meta, True, f"training state {path!r}")

    opt_state = payload["optimizer"]
    saved_groups = [len(g["params"]) for g in opt_state["param_groups"]]
    groups = [len(g["params"]) for g in optimizer.param_groups]
    if saved_groups != groups:
        raise CheckpointError(f"training state {path!r}: optimizer parameter groups differ: saved sizes "
                              f"{saved_groups}, optimizer has {groups} (nothing was loaded)")
    if (scheduler is None) != (payload["scheduler"] is None):
        raise CheckpointError(f"training state {path!r}: scheduler {'given' if scheduler is not None else 'not given'}"
                              f" but the file {'has none' if payload['scheduler'] is None else 'holds one'}")
    optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    _apply_copies(copies)
    _set_rng_state(payload["rng"])
    return {"step": payload["step"], "extra": payload["extra"]}
