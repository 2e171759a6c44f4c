"""Seeing through ``torch.compile`` and data-parallel wrappers.

``torch.compile(model)`` returns an ``OptimizedModule`` holding the model as
``_orig_mod``; ``DistributedDataParallel`` and ``DataParallel`` hold it as
``module``. Their ``state_dict()`` and ``named_*()`` names carry those prefixes,
so every model-level function works on :func:`unwrap_model` instead: files
then hold the bare model's names (as ``torch.distributed.checkpoint.state_dict``
writes them) and load into the bare or wrapped model alike.
:func:`wrapper_prefix` recognises the prefixes in files written from a wrapper.
"""
from __future__ import annotations

import sys
import warnings
from typing import Iterable, Optional

import torch.nn as nn

__all__ = ["unwrap_model", "wrapper_prefix", "strip_prefix"]

_PREFIXES = ("_orig_mod.", "module.")
_DDP = nn.parallel.DistributedDataParallel


def _inner(model: nn.Module) -> Optional[nn.Module]:
    """The module ``model`` wraps, or None when it is no wrapper."""
    if isinstance(model, (_DDP, nn.DataParallel)):
        return model.module
    # No OptimizedModule can exist before torch.compile imported torch._dynamo, so it is not imported here.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod
    return None


def unwrap_model(model: nn.Module, changes_parameters: Optional[str] = None) -> nn.Module:
    """The bare model inside any nesting of ``torch.compile``, DDP and ``DataParallel`` wrappers.

    ``changes_parameters`` names a caller that adds or replaces Parameters: it
    warns when a DDP wrapper is peeled, since DDP only synchronises the
    Parameters it saw when it was built.
    """
    inner = _inner(model)
    while inner is not None:
        if changes_parameters and isinstance(model, _DDP):
            fn = changes_parameters
            warnings.warn(f"{fn}: the model is wrapped in DistributedDataParallel, which registered its "
                          f"parameters when it was built; the parameters {fn} adds or replaces are not "
                          f"synchronised across ranks. Call {fn} on the bare model, then wrap it in DDP",
                          UserWarning, stacklevel=3)
        model, inner = inner, _inner(inner)
    return model


def wrapper_prefix(keys: Iterable[str], names: Iterable[str]) -> str:
    """The wrapper prefix (e.g. ``"module._orig_mod."``) to strip from ``keys`` so that they match ``names``
    (the bare model's names), or ``""``.

    A prefix is stripped only when no key matches as it is, every key carries
    it, and the stripped keys match: a model whose own submodule is called
    ``module`` keeps its ``module.`` keys.
    """
    keys, names = list(keys), set(names)
    prefix = ""
    while keys and not names.intersection(keys):
        level = next((p for p in _PREFIXES if all(k.startswith(p) for k in keys)), None)
        if level is None:
            return ""
        prefix += level
        keys = [k[len(level):] for k in keys]
    return prefix if keys and names.intersection(keys) else ""


def strip_prefix(name: str, prefix: str) -> str:
    """``name`` without ``prefix``; the wrapped module's own name (``prefix`` without its dot) becomes ``""``."""
    if not prefix:
        return name
    if name == prefix[:-1]:
        return ""
    return name[len(prefix):] if name.startswith(prefix) else name
