"""Training-state checkpoints: resume a run exactly.

One ``torch.save`` file holds the adapter (tensors and header as
:func:`~lora_layers.save_lora` writes them), every other parameter the
optimizer updates, the optimizer and scheduler state
with their classes and the optimizer's parameter names, the step, user extras
and the RNG states (torch CPU and CUDA, Python ``random``, NumPy when
installed). It is read with ``torch.load(weights_only=True)``, so loading never
runs code, and everything in it is covered by one SHA-256. Everything is
validated before the model, optimizer, scheduler or RNGs are touched. Writes
are atomic.

On a model sharded with FSDP2's ``fully_shard`` both are called on every rank:
the ranks gather whole values and rank 0 writes the same file (plus every
rank's RNG state, ``rank_rngs``); on load each rank checks the file and keeps
its slice. An error on one rank is raised on every rank (``core.sharded.on_every_rank``).
"""
from __future__ import annotations

import collections
import copy
import functools
import hashlib
import io
import math
import os
import random
import struct
import warnings
from collections import Counter, OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..core.sharded import gathered, is_sharded, is_writer, on_every_rank, shard_group, shard_like
from ..model.unwrap import strip_prefix, unwrap_model
from .._version import __version__
from ..layers.notices import name_some
from .checkpoint import META_BIAS, META_FORMAT, adapter_payload, apply_copies, canonical_payload, plan_load
from .fileio import CheckpointError, as_path, atomic_write, check_destination, raw_bytes, read_file, to_storable
from ..model.params import check_bias, lora_modules, named_bias_parameters, named_lora_parameters

__all__ = ["TRAINING_STATE_FILE", "save_training_state", "load_training_state"]

TRAINING_STATE_FORMAT = "lora_layers.training_state"
TRAINING_STATE_VERSION = "2"  # "1" was a safetensors file with a JSON header
TRAINING_STATE_FILE = "training_state.pt"
_FORMAT1_FILE = "training_state.safetensors"  # recognised only to say that format 1 is not read
FILE_SUFFIX = ".pt"
# The file holds {KEY_FORMAT, KEY_VERSION, KEY_SHA256: payload_sha256(state), KEY_STATE: state}.
KEY_FORMAT, KEY_VERSION, KEY_SHA256, KEY_STATE = "format", "format_version", "sha256", "state"
KEY_TRAINED = "trained_params"  # state[KEY_TRAINED]: {name: value} of the optimizer's non-adapter parameters
# state[KEY_RANK_RNGS]: the RNG states of every rank (rank 0's is also state["rng"]), in a file saved from a model
# sharded with fully_shard over more than one rank; absent otherwise, so one process writes what it always did.
KEY_RANK_RNGS = "rank_rngs"
_WHAT = "training state"
_ARG = "path_or_dir"


# ----------------------------------------------------------------------------- plain data and its checksum

@functools.lru_cache(maxsize=None)
def _savable(dtype: torch.dtype) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "ComplexHalf support is experimental"
            torch.save(torch.empty(0, dtype=dtype), io.BytesIO())
    except Exception:  # e.g. the sub-byte placeholder dtypes (torch.uint3) have no storage type
        return False
    return True


def _tensor(t: Tensor, where: str) -> Tensor:
    if type(t) not in (Tensor, nn.Parameter) or t.layout != torch.strided or t.is_quantized or t.is_meta:
        raise TypeError(f"{where} is a {type(t).__name__} ({t.layout}, {t.dtype}, on {t.device}); a training "
                        f"state may hold only dense tensors with data")
    if not _savable(t.dtype):
        raise TypeError(f"{where} is a tensor of dtype {t.dtype}, which torch.save cannot store")
    return to_storable({"t": t.resolve_conj().resolve_neg()})["t"]


def _plain(obj, where: str, h) -> Any:
    """Check that ``obj`` is plain data, feed it to the hash ``h``, and return it with CPU, compact tensors.

    Plain data is what ``torch.load(weights_only=True)`` reads back as it was:
    None, bool, int, float, str, tensors, and lists, tuples and dicts (and
    ``collections.Counter``, which ``MultiStepLR`` keeps) of them.
    Exact types are required, so that an int or tuple subclass (an enum, a
    namedtuple), which would need unpickling, is refused when saving.
    """
    kind = type(obj)
    if obj is None or kind is bool:
        h.update(b"N" if obj is None else b"T" if obj else b"F")
        return obj
    if kind is int:
        h.update(b"i%d;" % obj)
        return obj
    if kind is float:
        h.update(b"f" + struct.pack("<d", obj))
        return obj
    if kind is str:
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"s%d;" % len(data) + data)
        return obj
    if kind in (list, tuple):
        h.update(b"l%d;" % len(obj) if kind is list else b"t%d;" % len(obj))
        return kind(_plain(v, f"{where}[{i}]", h) for i, v in enumerate(obj))
    if kind in (dict, OrderedDict, Counter):  # MultiStepLR keeps its milestones in a Counter
        h.update(b"d%d;" % len(obj) if kind is not Counter else b"c%d;" % len(obj))
        items = [(_plain(k, f"{where} key {k!r}", h), _plain(v, f"{where}[{k!r}]" if where else k, h))
                 for k, v in obj.items()]
        return kind(dict(items)) if kind is Counter else kind(items)
    if isinstance(obj, Tensor):
        t = _tensor(obj, where)
        h.update(f"x{t.dtype}{tuple(t.shape)};".encode())
        h.update(raw_bytes(t))
        return t
    raise TypeError(f"{where} is a {kind.__name__}; a training state may hold only tensors, None, bool, int, "
                    f"float, str, lists, tuples and dicts (no pickled objects)")


def payload_sha256(state) -> str:
    """The SHA-256 of ``state``'s every value, type and structure. Raises TypeError on non-plain data."""
    h = hashlib.sha256()
    _plain(state, "", h)
    return h.hexdigest()


# ----------------------------------------------------------------------------- what is saved

def _class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[List[Optional[str]]]:
    """Each optimizer parameter's qualified name in ``model`` (found by identity), per group; None if absent."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p)) for p in group["params"]] for group in optimizer.param_groups]


def _optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer, bias: str) -> Dict[str, Tuple]:
    """``{label: (parameter, owner)}`` for each optimizer parameter that the adapter saved with ``bias`` lacks.

    The label is the parameter's qualified name in ``model``, or where it sits in
    the optimizer (``param_groups[g]['params'][i]``) when ``model`` does not hold
    it. ``owner`` is the merged LoRA layer whose base weight it is, else None: its
    value is the unmerged weight, and a load must unmerge, copy and merge again.
    """
    held = {id(p) for _, p in named_lora_parameters(model)}
    held |= {id(p) for p in named_bias_parameters(model, bias).values()}
    names = {id(p): n for n, p in model.named_parameters()}
    merged = {id(m.weight): m for _, m in lora_modules(model) if m.merged}
    out = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in held:
                out[names.get(id(p), f"param_groups[{g}]['params'][{i}]")] = (p, merged.get(id(p)))
    return out


def _refuse_foreign(model: nn.Module, optimizer: torch.optim.Optimizer, bias: str) -> None:
    """Raise ValueError when the optimizer updates a parameter that ``model`` does not hold, which a load
    could not find again."""
    foreign = [label for label in _optimizer_params(model, optimizer, bias) if label.startswith("param_groups[")]
    if foreign:
        raise ValueError(f"optimizer: {', '.join(foreign)} is not a parameter of the model "
                         f"({type(model).__name__}); a training state restores parameters by their name in the "
                         f"model, so it could not restore this one. Register it on the model, or keep it out "
                         f"of the optimizer")


def _trained_values(model: nn.Module, optimizer: torch.optim.Optimizer, bias: str) -> Dict[str, Tensor]:
    """The values of the parameters the optimizer updates beyond the adapter (biases, a head, a norm...);
    :func:`_refuse_foreign` has checked that the model holds them all."""
    params = _optimizer_params(model, optimizer, bias)
    return {label: gathered(p) if owner is None else owner.unmerged_weight()  # a DTensor: its full_tensor()
            for label, (p, owner) in params.items()}


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
        np.random.set_state(_numpy_state(np, state["numpy"]))


def _numpy_state(np, saved):
    name, keys, pos, has_gauss, cached = saved
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


# ----------------------------------------------------------------------------- paths

def _save_destination(path_or_dir) -> Tuple[str, Optional[str]]:
    """``(file, folder to create or None)``; refuses a bad destination before anything is created."""
    path = as_path(path_or_dir, _ARG)
    if path.endswith(".safetensors"):
        raise ValueError(f"{_ARG}={path!r}: a training state is a torch.save file since format "
                         f"{TRAINING_STATE_VERSION}; give a folder, or a file path ending in {FILE_SUFFIX!r}")
    if path.endswith(FILE_SUFFIX):
        return check_destination(path, _WHAT, _ARG), None
    folder = path.rstrip(os.sep + (os.altsep or "")) or path
    if os.path.isdir(folder):
        return check_destination(os.path.join(folder, TRAINING_STATE_FILE), _WHAT, _ARG), None
    if os.path.exists(folder):
        raise NotADirectoryError(f"cannot write {_WHAT} to {_ARG}={path!r}: it is a file; give a folder, or a "
                                 f"file path ending in {FILE_SUFFIX!r}")
    check_destination(folder, _WHAT, _ARG)  # the folder to create: its parent must exist and be writable
    return os.path.join(folder, TRAINING_STATE_FILE), folder


def _load_source(path_or_dir) -> str:
    path = as_path(path_or_dir, _ARG)
    if not os.path.isdir(path):
        return path
    file = os.path.join(path, TRAINING_STATE_FILE)
    if not os.path.exists(file) and os.path.exists(os.path.join(path, _FORMAT1_FILE)):
        return os.path.join(path, _FORMAT1_FILE)  # _read_state then says it is format 1
    return file


# ----------------------------------------------------------------------------- save

def save_training_state(path_or_dir, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                        step: int = 0, extra: Optional[Dict[str, Any]] = None, *, bias: str = "none") -> None:
    """Save everything needed to resume training exactly, in ONE file, atomically.

    Holds the adapter (as :func:`save_lora`), the value of every other
    parameter the optimizer updates (trained biases, an unfrozen head or
    LayerNorm, whatever ``bias`` says), ``optimizer.state_dict()`` with
    the optimizer's class and the qualified name of each of its parameters,
    ``scheduler.state_dict()`` with its class, ``step``, ``extra`` and the RNG
    states (torch CPU, CUDA when available, Python ``random``, NumPy when
    installed), as a ``torch.save`` file with a SHA-256 over all of it. Only
    plain data is accepted, so that ``torch.load(weights_only=True)`` reads it
    back without running code.

    Args:
        path_or_dir: a file path ending in ``.pt``, or a folder (created if its
            parent exists) that receives ``training_state.pt``.
        model, optimizer, scheduler: the objects to checkpoint (scheduler optional).
        step: the training step to resume from.
        extra: plain data (dicts, lists, tuples, numbers, strings, tensors of
            any dtype torch.save stores) to keep.
        bias: which biases to save with the adapter (as :func:`save_lora`); a bias
            the optimizer updates is saved in any case.

    Raises:
        TypeError: ``step`` is not an int, ``extra`` or a state_dict holds an
            object that is not plain data, or a tensor of a dtype torch.save
            cannot store (each named by where it sits).
        ValueError: no adapters in ``model``, bad ``bias``, an optimizer
            parameter that ``model`` does not hold (named by its place in the
            optimizer), or a ``path_or_dir`` that names no file (``""``, a
            ``.safetensors`` path).
        FileNotFoundError / PermissionError / NotADirectoryError: bad destination.

    Nothing is written, and no folder created, when any of these is raised.

    A model sharded with FSDP2's ``fully_shard`` (DTensor parameters and optimizer state): call it on
    every rank, with the same ``path_or_dir``, ``step`` and ``bias`` (else a ValueError on every rank).
    Every rank gathers the adapter, the trained parameters and the optimizer state
    (``DTensor.full_tensor()``), and rank 0 checks the destination and writes the file one process
    would write for the same values, plus every rank's RNG state. An error met on one rank (a bad
    argument, a failed write) is raised on every rank, the same, naming that rank.
    """
    model = unwrap_model(model)
    group = shard_group(model)  # None unless sharded by fully_shard: then every rank calls, and rank 0 writes
    what, writer = "save_training_state", is_writer(group)
    # the same arguments on every rank: rank 0 writes its own, and another rank's would be lost silently
    same = {"path_or_dir": path_or_dir, "step": step, "bias": bias}
    path, new_folder = on_every_rank(group, what, lambda: _save_checks(path_or_dir, model, optimizer, step, extra,
                                                                       bias, writer), same=same)
    state = _state(model, optimizer, scheduler, step, extra, bias, group)  # the collectives, when sharded
    on_every_rank(group, what, lambda: _write(path, new_folder, state, writer))


def _rank_and_size(group) -> Tuple[int, int]:
    """This process's rank in ``group`` and its size; ``(0, 1)`` without one."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _save_checks(path_or_dir, model: nn.Module, optimizer, step, extra, bias: str,
                 writer: bool) -> Tuple[Optional[str], Optional[str]]:
    """Every check of the arguments that can fail, made before anything is gathered or written; the
    destination only on the ``writer`` (rank 0 of a sharded model), where it is written."""
    path, new_folder = _save_destination(path_or_dir) if writer else (None, None)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
    check_bias(bias)
    if not any(True for _ in named_lora_parameters(model)):
        raise ValueError(f"the model ({type(model).__name__}) has no LoRA adapters (no LoRA layer with r > 0; "
                         f"merge_and_unload removes them), so there is nothing to save")
    _refuse_foreign(model, optimizer, bias)
    payload_sha256({"extra": extra})  # a TypeError names what is not plain data, as extra['key']
    return path, new_folder


def _write(path: str, new_folder: Optional[str], state: dict, writer: bool) -> None:
    """Check ``state`` is plain data and, on the ``writer`` (rank 0 of a sharded model), write it with its
    SHA-256, atomically."""
    h = hashlib.sha256()
    state = _plain(state, "", h)
    if not writer:
        return
    payload = {KEY_FORMAT: TRAINING_STATE_FORMAT, KEY_VERSION: TRAINING_STATE_VERSION,
               KEY_SHA256: h.hexdigest(), KEY_STATE: state}
    if new_folder is not None:
        os.mkdir(new_folder)
    try:
        atomic_write(path, lambda f: torch.save(payload, f), _WHAT, _ARG)
    except BaseException:
        if new_folder is not None:
            os.rmdir(new_folder)
        raise


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int, extra, bias: str,
           group) -> dict:
    """What :func:`save_training_state` writes, before it is checked as plain data. On a sharded model every
    rank gathers the same whole values (collectives, in the same order on every rank)."""
    adapter, header = adapter_payload(model, bias)
    state = {
        "library_version": __version__,
        "step": step,
        "extra": extra,
        "adapter": {"tensors": adapter, "header": header},
        KEY_TRAINED: _trained_values(model, optimizer, bias),
        "optimizer": {"class": _class_name(optimizer), "param_names": _param_names(model, optimizer),
                      "state_dict": _optimizer_state(optimizer)},
        "scheduler": None if scheduler is None else {"class": _class_name(scheduler),
                                                     "state_dict": scheduler.state_dict()},
        "rng": _rng_state(),
    }
    _, size = _rank_and_size(group)
    if size > 1:
        import torch.distributed as dist

        states = [None] * size
        dist.all_gather_object(states, state["rng"], group=group)
        state[KEY_RANK_RNGS] = states
    return state


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with each DTensor (the state of a sharded parameter) gathered whole."""
    sd = optimizer.state_dict()
    state = {key: {name: gathered(value) if is_sharded(value) else value for name, value in entry.items()}
             for key, entry in sd["state"].items()}
    return {**sd, "state": state}


# ----------------------------------------------------------------------------- load: read and check the file

class _Fields:
    """Typed access to the loaded state; each error names the file and the field."""

    def __init__(self, source: str):
        self.source = source

    def error(self, field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: field {field!r} {problem} (nothing was loaded)")

    def get(self, mapping: dict, key: str, types, where: str):
        field = f"{where}.{key}" if where else key
        if key not in mapping:
            raise self.error(field, "is missing")
        value = mapping[key]
        types = _as_tuple(types)
        if not isinstance(value, types) or (isinstance(value, bool) and int in types and bool not in types):
            raise self.error(field, f"must be {_type_names(types)}, got {type(value).__name__}")
        return value


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _type_names(types) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in _as_tuple(types))


def _read_state(path: str) -> Tuple[Dict[str, Any], str]:
    """The file's state, checked against its SHA-256, and that SHA-256."""
    source = f"training state {path!r}"
    raw, meta = read_file(path, _WHAT)
    if meta.get(META_FORMAT) == TRAINING_STATE_FORMAT:
        raise CheckpointError(f"{source} is in format 1 (safetensors), written by an older lora_layers; this "
                              f"version reads format {TRAINING_STATE_VERSION} (nothing was loaded)")
    if not isinstance(raw, dict) or raw.get(KEY_FORMAT) != TRAINING_STATE_FORMAT:
        found = meta.get(META_FORMAT) or (raw.get(KEY_FORMAT) if isinstance(raw, dict) else None)
        raise CheckpointError(f"{path!r} is not a lora_layers training state (format {found!r}, expected "
                              f"{TRAINING_STATE_FORMAT!r})")
    if raw.get(KEY_VERSION) != TRAINING_STATE_VERSION:
        raise CheckpointError(f"{source} has format version {raw.get(KEY_VERSION)!r}; this lora_layers reads "
                              f"{TRAINING_STATE_VERSION!r} (nothing was loaded)")
    state = raw.get(KEY_STATE)
    try:
        digest = payload_sha256(state)
    except TypeError as exc:
        raise CheckpointError(f"{source} holds data a training state cannot hold: {exc}") from exc
    if not isinstance(state, dict) or raw.get(KEY_SHA256) != digest:
        raise CheckpointError(f"{source} is corrupted: the SHA-256 of its content does not match the checksum "
                              f"stored with it (nothing was loaded)")
    return state, digest


def _check_rng(f: _Fields, rng: dict) -> None:
    """Try each saved RNG state on a throwaway generator, so a bad one fails before anything changes."""
    for key, probe in (("torch", lambda s: torch.Generator().set_state(s)),
                       ("python", lambda s: random.Random().setstate(s))):
        value = f.get(rng, key, (Tensor, tuple), "rng")
        try:
            probe(value)
        except Exception as exc:
            raise f.error(f"rng.{key}", f"is not a valid {key} RNG state ({type(exc).__name__}: {exc})") from exc
    for t in f.get(rng, "cuda", list, "rng") if "cuda" in rng else []:
        if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            raise f.error("rng.cuda", "must be a list of 1-D uint8 tensors")
    if "numpy" in rng:
        try:
            import numpy as np
        except ImportError:
            return
        try:
            np.random.RandomState().set_state(_numpy_state(np, f.get(rng, "numpy", list, "rng")))
        except (TypeError, ValueError, IndexError) as exc:
            raise f.error("rng.numpy", f"is not a valid NumPy RNG state ({type(exc).__name__}: {exc})") from exc


def _check_optimizer(f: _Fields, saved: dict, model: nn.Module, optimizer, shapes: Dict[int, tuple]) -> dict:
    """The saved optimizer state, checked; ``shapes``: a parameter's shape once loaded, by ``id``."""
    cls = f.get(saved, "class", str, "optimizer")
    if cls != _class_name(optimizer):
        raise f.error("optimizer.class", f"is {cls}, but the optimizer is a {_class_name(optimizer)}: its state "
                                         f"does not fit")
    names = f.get(saved, "param_names", list, "optimizer")
    sd = f.get(saved, "state_dict", dict, "optimizer")
    groups = f.get(sd, "param_groups", list, "optimizer.state_dict")
    per_param = f.get(sd, "state", dict, "optimizer.state_dict")
    if (len(names) != len(groups) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                             and isinstance(n, list) and len(n) == len(g["params"])
                                             and all(type(i) is int for i in g["params"])
                                             for n, g in zip(names, groups))):
        raise f.error("optimizer.param_names", "does not match the saved parameter groups")
    saved_ids = [i for g in groups for i in g["params"]]
    if len(set(saved_ids)) != len(saved_ids):  # torch would pair one id's state with two parameters
        raise f.error("optimizer.state_dict.param_groups", f"repeats parameter ids: {saved_ids}")
    current = _param_names(model, optimizer)
    if names != current:
        raise CheckpointError(f"{f.source}: optimizer parameter groups differ (nothing was loaded): "
                              + _first_difference(names, current))
    _check_groups(f, groups, optimizer)
    # optimizer.load_state_dict pairs the saved ids with the parameters position by position
    params = dict(zip(saved_ids, (p for g in optimizer.param_groups for p in g["params"])))
    param_names = dict(zip(saved_ids, (n for group in names for n in group)))
    for key, value in per_param.items():
        field = f"optimizer.state_dict.state[{key!r}]"
        if key not in params or not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise f.error(field, "is not the state of a saved parameter")
        live = optimizer.state.get(params[key])
        if live and set(live) != set(value):
            raise f.error(field, f"holds {sorted(value)}, but the optimizer keeps {sorted(live)} for that parameter")
        shape = shapes.get(id(params[key]), tuple(params[key].shape))
        for state_key, state_value in value.items():
            expected = _state_problem(optimizer, state_key, state_value, params[key], shape)
            if expected is not None:
                raise f.error(f"{field}[{state_key!r}]", f"(state of parameter {param_names[key]!r}, shape "
                                                         f"{shape}) is {_describe(state_value)}; "
                                                         f"expected {expected}")
    return sd


def _fits(saved, live) -> bool:
    """Whether the saved setting ``saved`` can stand where the live object has ``live``: the same kind
    (a number, a bool, a string, a sequence of as many fitting items...); None fits anything either way
    (``foreach=None``, Adafactor's ``eps=(None, 1e-3)``, LBFGS's ``line_search_fn``)."""
    if saved is None or live is None:
        return True
    if type(saved) in (list, tuple) or type(live) in (list, tuple):
        return (type(saved) in (list, tuple) and type(live) in (list, tuple) and len(saved) == len(live)
                and all(_fits(a, b) for a, b in zip(saved, live)))
    if isinstance(saved, dict) or isinstance(live, dict):
        return isinstance(saved, dict) and isinstance(live, dict)
    if type(saved) is bool or type(live) is bool:
        return type(saved) is type(live)
    number = lambda v: type(v) in (int, float) or (isinstance(v, Tensor) and v.dim() == 0 and not v.is_complex()
                                                   and v.dtype != torch.bool)
    if number(saved) or number(live):
        return number(saved) and number(live)
    if isinstance(saved, Tensor) or isinstance(live, Tensor):
        return isinstance(saved, Tensor) and isinstance(live, Tensor) and saved.shape == live.shape
    return type(saved) is type(live)


def _check_groups(f: _Fields, groups: list, optimizer) -> None:
    """Each saved parameter group's settings against the optimizer's, as its ``load_state_dict`` would take
    them (on a probe, so that defaults it fills in for older files count): ``optimizer.load_state_dict``
    takes a group's settings wholesale, and a missing ``lr`` or a three-item ``betas`` would otherwise fail
    in ``step()``, after the model was overwritten. Extra settings are left alone, and so are missing ones
    that are not the optimizer's own (``initial_lr``, which a scheduler adds)."""
    probe = object.__new__(type(optimizer))
    probe.__dict__.update(optimizer.__dict__)
    probe.defaults = dict(optimizer.defaults)
    probe.state = collections.defaultdict(dict)
    probe.param_groups = [dict(g) for g in optimizer.param_groups]
    field = "optimizer.state_dict.param_groups"
    try:
        probe.load_state_dict({"state": {}, "param_groups": copy.deepcopy(groups)})
    except Exception as exc:
        raise f.error(field, f"does not fit the {type(optimizer).__name__} ({type(exc).__name__}: {exc})") from exc
    for g, (saved, live) in enumerate(zip(probe.param_groups, optimizer.param_groups)):
        for key, value in live.items():
            if key in ("params", "param_names"):
                continue
            if key not in saved:
                if key not in optimizer.defaults:  # added by others (a scheduler's initial_lr): torch drops it
                    continue
                raise f.error(f"{field}[{g}][{key!r}]", f"is missing (the optimizer has {value!r})")
            if not _fits(saved[key], value):
                raise f.error(f"{field}[{g}][{key!r}]", f"is {_describe(saved[key])}, where the optimizer holds "
                                                        f"{_describe(value)}: step() could not use it")


def _strip_param_names(saved: dict, prefix: str) -> dict:
    """``saved`` with ``prefix`` (the adapter keys' wrapper prefix, in states written from a compiled or DDP
    model by older versions) stripped from its parameter names; malformed names are left to the checks."""
    names = saved.get("param_names")
    if not prefix or not isinstance(names, list):
        return saved
    names = [[strip_prefix(n, prefix) if isinstance(n, str) else n for n in group] if isinstance(group, list)
             else group for group in names]
    return {**saved, "param_names": names}


# Per-parameter state of torch.optim's optimizers: one value per element of the parameter, or one number.
# LBFGS is left out: it keeps flat vectors over all parameters in the state of the first one.
_TORCH_OPTIMIZERS = tuple(cls for cls in vars(torch.optim).values() if isinstance(cls, type)
                          and issubclass(cls, torch.optim.Optimizer) and cls not in (torch.optim.Optimizer,
                                                                                     torch.optim.LBFGS))
_ELEMENTWISE_STATE = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "sum", "square_avg",
                                "grad_avg", "acc_delta", "exp_inf", "ax", "prev", "step_size", "variance"})
_SCALAR_STATE = frozenset({"step", "mu_product", "eta", "mu"})
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _state_shape(key: str, shape: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    """The shape of torch.optim's state ``key`` for a parameter of ``shape``; None for a key it does not keep."""
    if key in _ELEMENTWISE_STATE:
        return shape
    if key in ("row_var", "col_var") and len(shape) >= 2:  # Adafactor's factored second moment
        return shape[:-1] + (1,) if key == "row_var" else shape[:-2] + (1,) + shape[-1:]
    return None


def _state_problem(optimizer, key: str, value, param: Tensor, shape: Tuple[int, ...]) -> Optional[str]:
    """What ``value`` should be as ``optimizer``'s state ``key`` for ``param`` (of ``shape`` once
    loaded), or None if it fits.

    Checked so that a wrong value is refused before the optimizer is overwritten,
    not met by ``step()`` afterwards. Another class's keys are not known: there a
    tensor with as many elements as the parameter must have its shape, and
    ``step`` must be a number.
    """
    known = isinstance(optimizer, _TORCH_OPTIMIZERS)
    if key in (_SCALAR_STATE if known else ("step",)):
        number = (type(value) in (int, float) or isinstance(value, Tensor) and value.dim() == 0
                  and (value.is_floating_point() or value.dtype in _INTEGER_DTYPES))
        return None if number else "a number (an int, a float or a 0-dim tensor)"
    if not known:
        wrong = isinstance(value, Tensor) and value.dim() > 0 and value.numel() == math.prod(shape)
        return f"a tensor of the parameter's shape {shape}" if wrong and value.shape != param.shape else None
    expected = _state_shape(key, shape)
    if expected is None or value is None and key == "momentum_buffer":  # torch <= 2.1 SGD without momentum
        return None
    fits = (isinstance(value, Tensor) and tuple(value.shape) == expected
            and (value.is_complex() if param.is_complex() else value.is_floating_point()))
    return None if fits else f"a {'complex' if param.is_complex() else 'floating'} tensor of shape {expected}"


def _first_difference(saved: List[list], current: List[list]) -> str:
    if len(saved) != len(current):
        return (f"the file has {len(saved)} groups of sizes {[len(g) for g in saved]}, the optimizer has "
                f"{len(current)} of sizes {[len(g) for g in current]}")
    for i, (a, b) in enumerate(zip(saved, current)):
        if a != b:
            if len(a) <= 8 and len(b) <= 8:
                return f"group {i} holds {a} in the file, {b} in the optimizer"
            j = next(j for j, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)
            return (f"group {i} has {len(a)} parameters in the file, {len(b)} in the optimizer; the first "
                    f"difference is at position {j}: {a[j] if j < len(a) else None!r} in the file, "
                    f"{b[j] if j < len(b) else None!r} in the optimizer")
    return "they differ"


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    kind = type(value).__name__
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind} {value!r}"


def _check_trained(f: _Fields, state: dict, model: nn.Module, optimizer, bias: str) -> list:
    """Check the saved values of the optimizer's parameters beyond the adapter; return the copies to make."""
    expected = _optimizer_params(model, optimizer, bias)
    if KEY_TRAINED not in state:
        if expected:  # a file from before the field existed: it lost these, say so rather than resume inexactly
            warnings.warn(f"{f.source} does not hold the optimizer's parameters beyond the adapter (it was "
                          f"written before training states saved them): {name_some(sorted(expected))} keep "
                          f"their current values, so the resume is not exact", UserWarning, stacklevel=3)
        return []
    saved = f.get(state, KEY_TRAINED, dict, "")
    if set(saved) != set(expected):
        raise f.error(KEY_TRAINED, f"holds {sorted(map(str, saved))}, but the optimizer updates "
                                   f"{sorted(expected)} beyond the adapter")
    copies = []
    for name, value in saved.items():
        param, owner = expected[name]
        if not isinstance(value, Tensor) or value.shape != param.shape or not value.is_floating_point():
            raise f.error(f"{KEY_TRAINED}[{name!r}]", f"is {_describe(value)}; expected a floating tensor of "
                                                      f"the parameter's shape {tuple(param.shape)}")
        copies.append((name, owner, param, value))
    return copies


def _check_scheduler(f: _Fields, saved, optimizer, scheduler) -> Optional[dict]:
    if (scheduler is None) != (saved is None):
        raise CheckpointError(f"{f.source}: scheduler {'given' if scheduler is not None else 'not given'} but "
                              f"the file {'has none' if saved is None else 'holds one'} (nothing was loaded)")
    if scheduler is None:
        return None
    cls = f.get(saved, "class", str, "scheduler")
    if cls != _class_name(scheduler):
        raise f.error("scheduler.class", f"is {cls}, but the scheduler is a {_class_name(scheduler)}")
    sd = f.get(saved, "state_dict", dict, "scheduler")
    # An LRScheduler's load_state_dict takes every entry as an attribute: check each against the live one.
    live = scheduler.state_dict()
    for key, value in sd.items():
        field = f"scheduler.state_dict[{key!r}]"
        if key in live and not _fits(value, live[key]):
            raise f.error(field, f"is {_describe(value)}, where the {type(scheduler).__name__} holds "
                                 f"{_describe(live[key])}: step() could not use it")
        if key not in live and isinstance(key, str) and key in vars(scheduler):
            raise f.error(field, f"is not part of a scheduler's state: loading it would replace the "
                                 f"{type(scheduler).__name__}'s {key} (a {type(vars(scheduler)[key]).__name__})")
    # Load into a copy first (sharing the optimizer, which a scheduler's load does not touch): a state
    # of another structure (e.g. SequentialLR with more schedulers) fails here, not half-way through.
    memo = {id(optimizer): optimizer, id(getattr(scheduler, "optimizer", optimizer)): optimizer}
    try:
        probe = copy.deepcopy(scheduler, memo)
    except Exception:  # a scheduler that cannot be copied is checked by class only
        return sd
    try:
        probe.load_state_dict(copy.deepcopy(sd))
    except Exception as exc:
        raise f.error("scheduler.state_dict", f"does not fit the {type(scheduler).__name__} "
                                              f"({type(exc).__name__}: {exc})") from exc
    return sd


# ----------------------------------------------------------------------------- load

def load_training_state(path_or_dir, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler=None) -> Dict[str, Any]:
    """Restore what :func:`save_training_state` saved, into fresh or existing objects.

    Checked before anything changes: the file's checksum and every field's
    type; the adapter, strictly (as :func:`load_lora`); the optimizer's class,
    the qualified name of each parameter in each group (so a reordered or
    regrouped optimizer is refused, even with same-shaped parameters), each
    group's settings (none missing, each of the kind the optimizer holds: a
    number, a flag, a tuple of as many items) and the per-parameter state
    (its keys, where the optimizer already holds state, and each value's
    shape and dtype against its parameter); the saved values of the
    optimizer's other parameters (names and shapes); the scheduler's class,
    each entry of its state against the scheduler's, and its state loaded
    into a copy; the RNG states. Then the
    optimizer, scheduler, adapter and other trained parameters (copied into
    the existing Parameters) and RNG states are restored.

    Args:
        path_or_dir: the file or folder given to :func:`save_training_state`.
        model, optimizer, scheduler: built the same way as when saving.

    Returns:
        ``{"step": int, "extra": ...}``.

    Raises:
        FileNotFoundError: no training state there.
        CheckpointError (a ValueError): unreadable or corrupted file, or it does
            not fit the model/optimizer/scheduler (what differs is named).
            Nothing was changed.

    Warns (UserWarning) when the file was written before training states held
    the optimizer's parameters beyond the adapter and the optimizer has some:
    those keep their current values; and when it was saved by another number
    of ranks than loads it (below).

    A model sharded with FSDP2's ``fully_shard``: call it on every rank. Each
    rank reads and checks the file; an error met on one rank is raised on
    every rank, the same, naming that rank, before anything changes. Each rank
    then keeps its own slice of the whole values in the file (adapter, trained
    parameters, optimizer state) and restores its own RNG states. The file
    holds whole tensors, so it loads on any number of ranks, sharded or not; on
    another number than saved it, the ranks the file knows restore their RNG
    states and the others keep theirs (with a UserWarning): the values go on
    exactly, the dropout masks and each rank's share of the data do not.
    """
    model = unwrap_model(model)
    group, what = shard_group(model), "load_training_state"
    plan = on_every_rank(group, what, lambda: _plan_load(path_or_dir, model, optimizer, scheduler, group))
    step, extra, opt_state, sched_state, copies, rng, digest = plan
    if group is not None:  # each rank keeps its slice: of the same values, or the model would be a patchwork
        on_every_rank(group, what, lambda: None, same={"file (its SHA-256)": digest})
        opt_state = _sharded_optimizer_state(opt_state, optimizer)
    optimizer.load_state_dict(opt_state)
    if scheduler is not None:
        scheduler.load_state_dict(sched_state)
    apply_copies(copies)  # a DTensor parameter takes its slice of the whole value (no collective)
    if rng is not None:
        _set_rng_state(rng)
    return {"step": step, "extra": extra}


def _plan_load(path_or_dir, model: nn.Module, optimizer, scheduler, group) -> tuple:
    """Read and check everything :func:`load_training_state` restores; changes nothing.
    Returns ``(step, extra, optimizer state, scheduler state, copies, this rank's RNG states or None,
    the file's SHA-256)``."""
    path = _load_source(path_or_dir)
    state, digest = _read_state(path)
    f = _Fields(f"training state {path!r}")
    step = f.get(state, "step", int, "")
    extra = f.get(state, "extra", object, "")
    adapter = f.get(state, "adapter", dict, "")
    tensors = f.get(adapter, "tensors", dict, "adapter")
    header = f.get(adapter, "header", dict, "adapter")
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()):
        raise f.error("adapter.tensors", "must map str -> Tensor")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in header.items()):
        raise f.error("adapter.header", "must map str -> str")
    tensors, header, prefix = canonical_payload(model, tensors, header)
    copies, _ = plan_load(model, tensors, header, True, f.source, hint="build")
    # A fresh conv layer that the adapter switches to loralib's layout gets the saved shapes.
    shapes = {id(param): tuple(tensor.shape) for _, _, param, tensor in copies}
    opt_state = _check_optimizer(f, _strip_param_names(f.get(state, "optimizer", dict, ""), prefix), model,
                                 optimizer, shapes)
    copies += _check_trained(f, state, model, optimizer, header.get(META_BIAS, "none"))
    sched_state = _check_scheduler(f, f.get(state, "scheduler", (dict, type(None)), ""), optimizer, scheduler)
    rng = _rank_rng(f, state, group)
    return step, extra, opt_state, sched_state, copies, rng, digest


def _rank_rng(f: _Fields, state: dict, group) -> Optional[dict]:
    """This rank's saved RNG states, checked (None for a rank the file does not know), after warning when the
    file was saved by another number of ranks than loads it."""
    rng = f.get(state, "rng", dict, "")
    _check_rng(f, rng)
    ranks = f.get(state, KEY_RANK_RNGS, list, "") if KEY_RANK_RNGS in state else [rng]
    for r, saved in enumerate(ranks):
        if not isinstance(saved, dict):
            raise f.error(f"{KEY_RANK_RNGS}[{r}]", f"must be a dict, got {type(saved).__name__}")
        _check_rng(f, saved)
    rank, size = _rank_and_size(group)
    if len(ranks) != size:
        kept = "" if size <= len(ranks) else (f"; ranks {len(ranks)} to {size - 1} keep their own generators "
                                              f"(seed them base_seed + rank)")
        warnings.warn(f"{f.source} was saved by {len(ranks)} rank(s) and loads on {size}: the adapter, the "
                      f"trained parameters and the optimizer and scheduler state are restored exactly, and the "
                      f"RNG states of rank 0 to {min(size, len(ranks)) - 1}{kept}. Each rank's share of the data "
                      f"and its dropout masks differ from the saved run's, so the run goes on from the same "
                      f"values but not as the saved run would have", UserWarning, stacklevel=4)
    return ranks[rank] if rank < len(ranks) else None


def _sharded_optimizer_state(sd: dict, optimizer: torch.optim.Optimizer) -> dict:
    """``sd`` (whole tensors, as saved) with the state of each DTensor parameter of the parameter's shape placed
    as that parameter (each rank keeps its slice, cut locally): what the optimizer held when it was saved."""
    saved_ids = [i for group in sd["param_groups"] for i in group["params"]]
    params = dict(zip(saved_ids, (p for group in optimizer.param_groups for p in group["params"])))
    state = {}
    for key, entry in sd["state"].items():
        param = params[key]
        state[key] = {name: shard_like(value, param) if is_sharded(param) and isinstance(value, Tensor)
                      and value.dim() > 0 and value.shape == param.shape else value
                      for name, value in entry.items()}
    return {**sd, "state": state}
